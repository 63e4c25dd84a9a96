"""Peak memory of loading a gpt2-small-shaped checkpoint straight into a quantized model.

Each way of loading runs in a fresh subprocess; a thread samples ``/proc/self/status``
every millisecond for the process's *anonymous* memory (``RssAnon``: what it allocated
itself) and its resident *file* pages (``RssFile``: the memory-mapped checkpoint, clean
pages the system may drop and read again). Modes:

- ``float``: ``GPTModel.from_pretrained(dir)``: every parameter a view of the mapped file;
- ``nf4``, ``nf4-dq``, ``int8``: ``GPTModel.from_pretrained(dir, quantize=...)``: the block
  linears quantized one at a time while the float ones stay file pages;
- ``copy-then-nf4``: the float model first copied into memory (what a loader without
  memory-mapping does), then quantized: the peak that loading layer by layer avoids.

The children run with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB: by default glibc
raises that threshold after freeing a large block, and later per-layer temporaries then
stay in its heap after being freed, so the figures would vary from run to run by a few
hundred MB of memory that is free to the process but not returned to the system.

Reported per mode, in MB: ``anon_peak`` and ``anon_after`` (growth over the process
after its imports), ``file_after``, ``model`` (bytes of the model's parameters and
buffers), and the seconds the load took. Prints one JSON object::

    python bench/bench_load_quantized.py [--checkpoint-dir DIR] [--modes float nf4 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import machine_fields

MODES = ("float", "nf4", "nf4-dq", "int8", "copy-then-nf4")
MB = 2**20


def status_kib() -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) for key in ("RssAnon", "RssFile")}


class Sampler(threading.Thread):
    """Keeps the highest ``RssAnon`` seen until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.running = 0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, status_kib()["RssAnon"])
            time.sleep(0.001)


def measure(mode: str, directory: Path) -> dict[str, float]:
    import copy

    import torch

    from minigpt.models.gpt2.model import GPTModel
    from minigpt.quantization.model import quantize_model

    torch.set_num_threads(1)
    base = status_kib()
    sampler = Sampler()
    sampler.start()
    start = time.perf_counter()
    if mode == "copy-then-nf4":
        model = quantize_model(copy.deepcopy(GPTModel.from_pretrained(directory)), "nf4")
    else:
        model = GPTModel.from_pretrained(directory, quantize=None if mode == "float" else mode)
    seconds = time.perf_counter() - start
    sampler.running = False
    sampler.join()
    after = status_kib()
    stored = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    return {"anon_peak": (max(sampler.peak, after["RssAnon"]) - base["RssAnon"]) / 1024,
            "anon_after": (after["RssAnon"] - base["RssAnon"]) / 1024,
            "file_after": (after["RssFile"] - base["RssFile"]) / 1024,
            "model": sum(stored.values()) / MB, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-dir", type=Path, help="an existing checkpoint (default: a new random one)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)  # the child process's job
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.checkpoint_dir)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.checkpoint_dir or Path(tmp)
        if args.checkpoint_dir is None:
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                            f"import common; from pathlib import Path; "
                            f"common.random_gpt2_checkpoint(Path({str(directory)!r}))"], check=True)
        results = {}
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
        for mode in args.modes:
            out = subprocess.run([sys.executable, __file__, "--measure", mode, "--checkpoint-dir", str(directory)],
                                 check=True, capture_output=True, text=True, env=env).stdout
            results[mode] = {k: round(v, 1) for k, v in json.loads(out.splitlines()[-1]).items()}
        size = (directory / "model.safetensors").stat().st_size / MB
    print(json.dumps({"checkpoint_mb": round(size, 1), "results": results, **machine_fields()}))


if __name__ == "__main__":
    main()
