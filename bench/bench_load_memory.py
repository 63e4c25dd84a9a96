"""Peak memory of loading a 124M-parameter GPT-2 checkpoint and running one forward pass.

Three loaders, each in a fresh subprocess so none inherits another's memory:

- ``minigpt``: ``GPTModel.from_pretrained(dir)``; parameters are views of the
  ``model.safetensors`` that ``safetensors`` memory-maps;
- ``transformers``: ``GPT2LMHeadModel.from_pretrained(dir)``;
- ``book``: the book's load-then-copy, ``model.load_state_dict(torch.load(pth))`` into
  an allocated ``GPTModel`` (its ``.pth`` holds the untied head and the causal masks, as
  the book's does).

The measure: peak resident memory (``VmHWM``) after the forward pass, minus the resident
memory (``VmRSS``) of the same fresh process right after ``import torch``, divided by the size
of ``model.safetensors``. Everything a loader imports therefore counts against it
(``torch._dynamo`` included, about 70 MB, if anything pulls it in); ``import_mb`` is that
share, and ``imports`` lists which of the heavy modules each loader brought in.
``loaded_mb``: the peak (same baseline) once the model is loaded and every weight has been
read (a memory-mapped file pages in then), before the forward pass, whose own
``64 x 50257`` float32 logits (``forward_logits_mb``) and activations the peak then adds.

Wall time, split the same way in each process: ``import_s`` (the loader's imports after
``import torch``), ``load_s`` (the load call, or the book's build + ``torch.load`` +
``load_state_dict``, and one read of every weight: a loader cannot look fast by deferring
its reads) and ``forward_s`` (the first forward pass); ``load_vs_transformers`` compares
``load_s + forward_s``. Targets: memory <= 1.05x the file, time <= 2x transformers'.
``--repeats`` runs every loader that many times (fresh processes, taking turns); medians.
The checkpoint (gpt2-small shape, random weights, saved by transformers' ``save_pretrained``)
is made in its own subprocess too. Prints one JSON line::

    python bench/bench_load_memory.py [--checkpoint-dir DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine_fields, random_gpt2_checkpoint

LOADERS = ("minigpt", "transformers", "book")
FORWARD_TOKENS = 64
HEAVY_MODULES = ("torch._dynamo", "torch._inductor", "transformers", "huggingface_hub", "safetensors", "tqdm")


def make_checkpoint(directory: Path) -> None:
    """gpt2-small-shaped random checkpoint in HF format, plus the book's ``book.pth``."""
    import torch

    from minigpt.models.gpt2.model import GPTModel

    random_gpt2_checkpoint(directory)

    model = GPTModel.from_pretrained(directory)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # untied: a separate head copy
    for i in range(model.cfg.n_layers):
        n = model.cfg.context_length
        state[f"trf_blocks.{i}.att.mask"] = torch.triu(torch.ones(n, n), diagonal=1)
    torch.save(state, directory / "book.pth")


def memory_kib() -> tuple[int, int]:
    """``(resident now, peak resident)`` of this process in KiB."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError):  # not Linux: the peak is all there is (ru_maxrss, KiB on Linux/BSD)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak, peak


def measure(loader: str, directory: Path) -> dict[str, object]:
    """Import ``loader``, load, run one forward pass: peak growth over the process after ``import torch``."""
    import torch

    baseline, _ = memory_kib()
    before = set(sys.modules)
    start = time.perf_counter()
    if loader == "transformers":
        from transformers import GPT2LMHeadModel
    elif loader == "minigpt":
        import minigpt.models.gpt2.weights  # noqa: F401  (what from_pretrained imports, counted as imports)
        from minigpt.models.gpt2.model import GPTModel
    else:
        from minigpt.models.gpt2.config import GPTConfig
        from minigpt.models.gpt2.model import GPTModel
    after_imports, _ = memory_kib()
    loading = time.perf_counter()
    if loader == "minigpt":
        model = GPTModel.from_pretrained(directory)
    elif loader == "transformers":
        model = GPT2LMHeadModel.from_pretrained(directory)
    else:
        model = GPTModel(GPTConfig.from_preset("gpt2-small", qkv_bias=True))
        state = torch.load(directory / "book.pth", weights_only=True)
        model.load_state_dict({k: v for k, v in state.items() if not k.endswith("att.mask")})
        del state
    with torch.no_grad():  # every weight read once: a memory-mapped file pages in here, not in the forward
        for tensor in model.state_dict().values():
            tensor.sum()
    forward = time.perf_counter()
    _, loaded_peak = memory_kib()
    with torch.no_grad():
        model.eval()(torch.randint(0, 50257, (1, FORWARD_TOKENS)))
    end = time.perf_counter()
    _, peak = memory_kib()
    imported = set(sys.modules) - before
    return {"peak_mb": (peak - baseline) / 1024, "import_mb": (after_imports - baseline) / 1024,
            "loaded_mb": (loaded_peak - baseline) / 1024,
            "seconds": end - start, "import_s": loading - start, "load_s": forward - loading,
            "forward_s": end - forward, "modules": len(imported),
            "imports": [m for m in HEAVY_MODULES if m in imported]}


def run_in_subprocess(*args: str) -> str:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-dir", type=Path, help="reuse (or create) the checkpoint here")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per loader (medians)")
    parser.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=2, metavar=("LOADER", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        make_checkpoint(args.make)
        return
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
        return

    with tempfile.TemporaryDirectory() as tmp:
        directory = args.checkpoint_dir or Path(tmp)
        if not (directory / "book.pth").is_file():
            directory.mkdir(parents=True, exist_ok=True)
            run_in_subprocess("--make", str(directory))
        file_mb = (directory / "model.safetensors").stat().st_size / 2**20
        runs = {name: [] for name in LOADERS}
        for _ in range(args.repeats):  # taking turns, so a change in load hits all alike
            for name in LOADERS:
                runs[name].append(json.loads(run_in_subprocess("--measure", name, str(directory))))
        results = {name: {key: statistics.median(r[key] for r in rs) if isinstance(rs[0][key], float) else rs[0][key]
                          for key in rs[0]} for name, rs in runs.items()}
        loaded = {k: v["load_s"] + v["forward_s"] for k, v in results.items()}
        print(json.dumps({
            **machine_fields(),
            "bench": "load_memory",
            "checkpoint": "gpt2-small shape (124M parameters), random weights, transformers save_pretrained",
            "measure": "peak RSS after load + forward minus RSS right after `import torch`, fresh process each",
            "file_mb": round(file_mb, 1),
            "book_pth_mb": round((directory / "book.pth").stat().st_size / 2**20, 1),
            "forward_tokens": FORWARD_TOKENS,
            "peak_rss_mb": {k: round(v["peak_mb"], 1) for k, v in results.items()},
            "ratio_to_file": {k: round(v["peak_mb"] / file_mb, 3) for k, v in results.items()},
            "loaded_ratio_to_file": {k: round(v["loaded_mb"] / file_mb, 3) for k, v in results.items()},
            "forward_logits_mb": round(FORWARD_TOKENS * 50257 * 4 / 2**20, 1),
            "import_mb": {k: round(v["import_mb"], 1) for k, v in results.items()},
            "imports": {k: v["imports"] for k, v in results.items()},
            "modules_imported": {k: v["modules"] for k, v in results.items()},
            "seconds": {k: round(v["seconds"], 2) for k, v in results.items()},
            **{key: {k: round(v[key], 3) for k, v in results.items()} for key in ("import_s", "load_s", "forward_s")},
            "load_vs_transformers": {k: round(v / loaded["transformers"], 3) for k, v in loaded.items()},
            "repeats": args.repeats,
            "meets_target": {"memory_loaded": results["minigpt"]["loaded_mb"] / file_mb <= 1.05,
                             "memory_with_forward": results["minigpt"]["peak_mb"] / file_mb <= 1.05,
                             "time": loaded["minigpt"] <= 2 * loaded["transformers"]},
        }))


if __name__ == "__main__":
    main()
