"""Memory and speed of quantized GPT-2 weights: bytes per scheme, a QLoRA step's memory, forward time.

Three measures, for models of the GPT-2 shapes with random weights (GPT-2's layout: query/key/value
bias, head tied to the token embedding, dropout 0):

* ``block_weight_mb``: bytes of the weight matrices of the transformer blocks (the layers
  ``quantize_model`` replaces; embeddings, norms and biases left out) in float32, bfloat16, int8,
  nf4 and nf4-dq, and their ratio to float32 (expected about 1 : 0.5 : 0.25 : 0.14 : 0.13).
  The models are built on the meta device: shapes and dtypes without data, so even gpt2-medium
  costs nothing to measure, and the byte counts are those of the real tensors' dtypes and shapes.
* ``lora_step``: one LoRA training step (rank 16 on every linear of the blocks and the head,
  AdamW, batch ``4 x 256`` random tokens) on a float32 base and on an nf4 base, each in a fresh
  subprocess. ``growth_mb`` is the peak resident set size (``VmHWM``) during the step minus the
  resident size right after the model was built (and quantized, and LoRA added); the peak is reset
  there (``/proc/self/clear_refs``). ``total_mb`` is the same peak minus the resident size before
  the model was built. The nf4 run must not keep a dequantized copy of the weights, so
  ``total_mb`` should differ by about the blocks' float32 bytes minus their nf4 bytes
  (``expected_saving_mb``); ``saving_mb`` is the measured difference. These runs use glibc's
  ``MALLOC_MMAP_THRESHOLD_=131072`` so that freed blocks go back to the system at once.
* ``forward_ratio``: the median time of a quantized linear's forward pass over the float one's,
  on the same input (the feed-forward's first layer, ``emb_dim -> 4 * emb_dim``, batch ``4 x 256``),
  the layers taking turns in one process.

Prints one JSON line. ``--quick`` checks that it works in seconds (the ``tiny`` preset, a
``2 x 32`` batch, few repeats)::

    python bench/bench_quantization.py [--quick] [--presets gpt2-small gpt2-medium]
        [--memory-presets gpt2-small] [--repeats 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

from bench_dpo import MMAP_THRESHOLD, peak_kib, reset_peak, resident_kib
from common import machine_fields

SCHEMES = ("int8", "nf4", "nf4-dq")
MIB = 2**20


def config(preset: str):
    from minigpt.models.gpt2.config import GPTConfig

    return GPTConfig.from_preset(preset, qkv_bias=True, tie_weights=True, drop_rate=0.0)


def block_bytes(preset: str) -> dict[str, int]:
    """Bytes of the blocks' weight matrices per storage format, from a meta-device model."""
    import torch

    from minigpt.models.gpt2.model import GPTModel
    from minigpt.quantization.model import quantize_model, weight_bytes

    def meta_model():
        with torch.device("meta"):
            return GPTModel(config(preset))

    sizes = {"float32": weight_bytes(meta_model().trf_blocks),
             "bfloat16": weight_bytes(meta_model().to(torch.bfloat16).trf_blocks)}
    for scheme in SCHEMES:
        sizes[scheme] = weight_bytes(quantize_model(meta_model(), scheme).trf_blocks)
    return sizes


def lora_step_memory(preset: str, base: str, batch: int, tokens: int, threads: int) -> dict:
    """One LoRA step on a float32 (``base="float32"``) or quantized base: memory in MiB."""
    import torch
    from torch.nn import functional as F

    from minigpt.lora.adapters import apply_lora
    from minigpt.models.gpt2.model import GPTModel
    from minigpt.quantization.model import quantize_model

    torch.set_num_threads(threads)
    before_build = resident_kib()
    torch.manual_seed(0)
    model = GPTModel(config(preset)).train()
    if base != "float32":
        quantize_model(model, base)  # each layer's float weight is freed as soon as it is quantized
    apply_lora(model, rank=16, alpha=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, tokens + 1), generator=torch.Generator().manual_seed(1))
    gc.collect()
    after_build, was_reset = resident_kib(), reset_peak()
    start = time.perf_counter()
    logits = model(ids[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    peak = peak_kib()
    return {"growth_mb": (peak - after_build) / 1024, "total_mb": (peak - before_build) / 1024,
            "model_mb": (after_build - before_build) / 1024, "step_s": seconds, "peak_reset": was_reset}


def forward_ratios(preset: str, batch: int, tokens: int, repeats: int, threads: int) -> dict[str, float]:
    """Median forward time of each quantized layer over the float layer's, taking turns."""
    import torch
    from torch import nn

    from minigpt.quantization.model import quantize_linear

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    emb_dim = config(preset).emb_dim
    linear = nn.Linear(emb_dim, 4 * emb_dim)
    layers = {"float32": linear, **{s: quantize_linear(linear, s) for s in SCHEMES}}
    x = torch.randn(batch, tokens, emb_dim)
    times: dict[str, list[float]] = {name: [] for name in layers}
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms up and is dropped
            for name, layer in layers.items():
                start = time.perf_counter()
                layer(x)
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t[1:]) for name, t in times.items()}
    return {name: medians[name] / medians["float32"] for name in SCHEMES}


def run_worker(args: argparse.Namespace, preset: str, base: str) -> dict:
    command = [sys.executable, __file__, "--worker", preset, base, "--threads", str(args.threads)]
    command += ["--quick"] if args.quick else []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_summary(args: argparse.Namespace, preset: str, sizes: dict[str, int]) -> dict:
    runs = {base: run_worker(args, preset, base) for base in ("float32", "nf4")}
    if any("error" in run for run in runs.values()):
        return {"error": {base: run["error"] for base, run in runs.items() if "error" in run}}
    rounded = {base: {k: round(v, 3 if k == "step_s" else 1) if isinstance(v, float) else v for k, v in run.items()}
               for base, run in runs.items()}
    return {**rounded,
            "saving_mb": round(runs["float32"]["total_mb"] - runs["nf4"]["total_mb"], 1),
            "expected_saving_mb": round((sizes["float32"] - sizes["nf4"]) / MIB, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny preset and a small batch: seconds")
    parser.add_argument("--presets", nargs="+", default=["gpt2-small", "gpt2-medium"])
    parser.add_argument("--memory-presets", nargs="+", default=["gpt2-small"])
    parser.add_argument("--repeats", type=int, default=20, help="timed forward passes per layer")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", nargs=2, metavar=("PRESET", "BASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    batch, tokens = (2, 32) if args.quick else (4, 256)
    if args.worker:
        print(json.dumps(lora_step_memory(*args.worker, batch, tokens, args.threads)))
        return
    presets = ["tiny"] if args.quick else args.presets
    memory_presets = ["tiny"] if args.quick else args.memory_presets
    repeats, threads = (3 if args.quick else args.repeats), args.threads
    sizes = {preset: block_bytes(preset) for preset in dict.fromkeys(presets + memory_presets)}
    print(json.dumps({
        **machine_fields(),
        "bench": "quantization", "weights": "random", "batch": batch, "tokens": tokens, "lora_rank": 16,
        "threads": args.threads, "repeats": repeats,
        "malloc": f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} (memory runs only)",
        "block_weight_mb": {p: {k: round(v / MIB, 1) for k, v in sizes[p].items()} for p in presets},
        "ratio_to_float32": {p: {k: round(v / sizes[p]["float32"], 3) for k, v in sizes[p].items()} for p in presets},
        "lora_step": {p: memory_summary(args, p, sizes[p]) for p in memory_presets},
        "forward_ratio": {p: {k: round(v, 2) for k, v in forward_ratios(p, batch, tokens, repeats, threads).items()}
                          for p in presets},
    }))


if __name__ == "__main__":
    main()
