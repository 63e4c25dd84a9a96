"""Load check of ``minigpt serve``: N concurrent clients x M requests, all on 127.0.0.1.

Starts the server in this process (on a free port of 127.0.0.1; random weights of
``--preset`` unless ``--model`` names real ones), or uses ``--url`` of one already
running. Each of ``--clients`` threads sends ``--requests`` requests one after another,
taking turns over four kinds: completion, streamed completion, chat, streamed chat (each
with ``--max-tokens`` new tokens, a seed and logprobs). Bounded: no request starts after
``--time-limit`` seconds, and each has a timeout. Every response is checked: status 200,
the right object, every choice finished (``stop`` or ``length``), usage counts that add
up, and for streams, chunks that parse and end with ``data: [DONE]``.

With ``--hostile``, one of the clients sends hostile requests instead, one after another
until the others are done: a 1 MB stop string, 300 prompts times n = 8, a streamed and
a non-streamed request for 1,000 tokens each whose client leaves after 0.2 s. The
latencies reported are the other clients' (their p95 shows what the hostile one costs
them); ``hostile`` counts its requests by the status they got ("left": the client left).

Prints one JSON line: requests/s, p50/p95 latency, generated tokens/s, errors and
malformed responses (both must be 0), and whether all requests ran within the limit.

    python bench/bench_serve.py [--clients 8] [--requests 20] [--max-tokens 32] [--preset tiny] [--hostile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any

import httpx
import torch
from common import machine_fields

from minigpt.serving import create_app, load_engine
from minigpt.serving.protocol import Limits
from minigpt.serving.server import BackgroundServer
from minigpt.serving.settings import ServeConfig

KINDS = ("completion", "completion-stream", "chat", "chat-stream")


def request_body(kind: str, i: int, max_tokens: int) -> tuple[str, dict[str, Any]]:
    """The path and body of the ``i``-th request of this ``kind``."""
    common = {"max_tokens": max_tokens, "seed": i, "temperature": 0.8, "stream": kind.endswith("stream")}
    if kind.startswith("chat"):
        return "/v1/chat/completions", {**common, "logprobs": True, "top_logprobs": 2, "messages": [
            {"role": "user", "content": f"Tell me something about the number {i}."}]}
    return "/v1/completions", {**common, "logprobs": 2, "prompt": f"Request {i}: every effort moves you"}


def check(kind: str, response: httpx.Response, max_tokens: int) -> int:
    """The generated token count of a well-formed answer; ``ValueError`` saying what is wrong."""
    if response.status_code != 200:
        raise ValueError(f"status {response.status_code}: {response.text[:200]}")
    chat = kind.startswith("chat")
    if not kind.endswith("stream"):
        body = response.json()
        choice = body["choices"][0]
        if body["object"] != ("chat.completion" if chat else "text_completion") or \
                not isinstance(choice["message"]["content"] if chat else choice["text"], str):
            raise ValueError(f"not a {kind} response: {body}")
        tokens = body["usage"]["completion_tokens"]
        if choice["finish_reason"] not in ("stop", "length") or not 0 <= tokens <= max_tokens:
            raise ValueError(f"unfinished or miscounted: {choice['finish_reason']}, {tokens} tokens")
        return tokens
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        raise ValueError("the stream does not end with data: [DONE]")
    chunks = [json.loads(e) for e in events[:-1]]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    if reasons[-1] not in ("stop", "length") or any(reasons[:-1]):
        raise ValueError(f"the stream's finish_reason is wrong: {reasons[-3:]}")
    tokens = sum(1 for c in chunks if c["choices"] and c["choices"][0]["logprobs"])
    if tokens > max_tokens:
        raise ValueError(f"{tokens} tokens streamed, more than max_tokens {max_tokens}")
    return tokens


def client(base_url: str, number: int, args: argparse.Namespace, deadline: float, results: list[dict]) -> None:
    with httpx.Client(base_url=base_url, timeout=args.request_timeout) as http:
        for j in range(args.requests):
            if time.monotonic() > deadline:
                return
            kind = KINDS[(number + j) % len(KINDS)]
            path, body = request_body(kind, number * args.requests + j, args.max_tokens)
            start = time.perf_counter()
            result: dict[str, Any] = {"kind": kind}
            try:
                result["tokens"] = check(kind, http.post(path, json=body), args.max_tokens)
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as err:
                result["error"] = f"{type(err).__name__}: {err}"
            result["seconds"] = time.perf_counter() - start
            results.append(result)


HOSTILE = (  # (path, body, seconds before the client leaves)
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "stop": ["x" * 1_000_000]}, 30.0),
    ("/v1/completions", {"prompt": ["a"] * 300, "n": 8, "max_tokens": 1}, 30.0),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1000, "stream": True}, 0.2),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1000}, 0.2),
)


def hostile(base_url: str, done: threading.Event, counts: dict[str, int]) -> None:
    """Hostile requests, in turn, until ``done``: each status (or "left") counted."""
    for i in range(10**9):
        if done.is_set():
            return
        path, body, patience = HOSTILE[i % len(HOSTILE)]
        try:
            with httpx.stream("POST", base_url + path, json=body, timeout=patience) as response:
                outcome = str(response.status_code)
                response.read()
        except httpx.TimeoutException:
            outcome = "left"
        counts[outcome] = counts.get(outcome, 0) + 1


def run(base_url: str, args: argparse.Namespace) -> dict[str, Any]:
    results: list[dict] = []
    deadline = time.monotonic() + args.time_limit
    polite = args.clients - 1 if args.hostile else args.clients
    threads = [threading.Thread(target=client, args=(base_url, n, args, deadline, results)) for n in range(polite)]
    done, hostile_counts = threading.Event(), {}
    attacker = threading.Thread(target=hostile, args=(base_url, done, hostile_counts))
    start = time.perf_counter()
    for t in threads + ([attacker] if args.hostile else []):
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done.set()
    if args.hostile:
        attacker.join()
    ok = [r for r in results if "error" not in r]
    latencies = sorted(r["seconds"] for r in ok)
    return {
        "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
        **({"hostile": hostile_counts} if args.hostile else {}),
        "requests": len(results), "all_ran": len(results) == polite * args.requests,
        "errors": len(results) - len(ok), "first_errors": [r["error"] for r in results if "error" in r][:3],
        "requests_per_s": round(len(ok) / wall, 3),
        "latency_p50_s": round(statistics.median(latencies), 4) if latencies else None,
        "latency_p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 4)
        if latencies else None,
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1), "wall_s": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--time-limit", type=float, default=300.0, help="no request starts after this many seconds")
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--preset", default="tiny", help="random weights of this preset (without --model)")
    parser.add_argument("--model", default=None, help="a GPT-2 name or a model directory")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--url", default=None, help="a running server's base URL instead of one started here")
    parser.add_argument("--hostile", action="store_true", help="one of the clients sends hostile requests")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.url:
        report = {"server": args.url, **run(args.url.rstrip("/"), args)}
    else:
        settings = ServeConfig(model=args.model, preset=args.preset, device=args.device)
        engine = load_engine(settings)
        app = create_app(engine, limits=Limits(max_tokens=max(args.max_tokens, 1000), max_n=1))
        with BackgroundServer(app) as server:
            report = {"model": engine.name, "device": str(engine.model.device), "torch_threads":
                      torch.get_num_threads(), **run(server.base_url, args)}
    print(json.dumps({**report, **machine_fields()}))


if __name__ == "__main__":
    main()
