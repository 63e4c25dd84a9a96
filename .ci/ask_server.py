"""Wait for `minigpt serve` at the URL given, then ask it for one completion: exit 0 when it answers."""

import json
import sys
import time
import urllib.request

base = sys.argv[1]
deadline = time.monotonic() + 300
while True:
    try:
        with urllib.request.urlopen(f"{base}/v1/models", timeout=5) as response:
            model = json.loads(response.read())["data"][0]["id"]
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"no answer from {base} within 300 s")
        time.sleep(1)
request = urllib.request.Request(f"{base}/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": model, "prompt": "ROMEO:", "max_tokens": 8}).encode())
with urllib.request.urlopen(request, timeout=120) as response:
    print(json.loads(response.read())["choices"][0]["text"])
