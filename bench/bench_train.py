"""Training speed: minigpt against transformers' GPT2LMHeadModel, same shape, same run.

Both implementations get the same GPT-2 layout (query/key/value bias, output head tied to
the token embedding, dropout 0), the same batch, loss (cross-entropy over every position)
and optimizer (``torch.optim.AdamW(fused=True)``). Each computes the loss its own way:
transformers over the whole float32 logits, minigpt through its training loss
(``next_token_loss``: the head and the loss in one, a chunk of rows at a time,
``minigpt.training.head_loss``). Rows, their steps taking turns so that a change in machine
load hits all alike:

* transformers and minigpt in float32;
* both with bfloat16 autocast, where ``--precision auto`` picks it (a CPU with AVX-512-BF16
  or AMX, a CUDA GPU since Ampere); elsewhere ``bf16_reason`` says why auto stays float32;
* minigpt through ``torch.compile`` (``--compile``, the default), model and loss in one graph
  as ``TrainConfig(compile=True)`` compiles them: ``compile_s`` is its first
  step's time less a compiled step's (without the on-disk cache of earlier runs unless
  ``--no-cold-compile``), ``compile_speedup`` its rate over the eager row's.

Per row: ``tokens_per_s`` (batch x tokens / the median step after ``--warmup`` steps),
``mfu`` (achieved FLOP/s over this machine's matmul peak in that dtype, measured here; FLOPs
per token ``6 N + 12 n_layers tokens emb_dim`` as in the PaLM paper's appendix B, ``N`` the
weights of every matrix product, head included) and ``peak_mb``: peak resident memory of
``--memory-steps`` training steps in a fresh process, over that process's memory before the
model was built. ``loss_curve`` trains the ``tiny`` shape on real text for ``--curve-steps``
steps from the same start in float32 and in bfloat16 autocast (minigpt's recipe: warm-up,
cosine, clipping) and reports the largest relative gap of 10-step means (target 2 %) and of
single steps. Prints one JSON line::

    python bench/bench_train.py [--config gpt2-small] [--steps 6] [--warmup 2] [--curve-steps 50] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from common import machine_fields
from torch import nn

from minigpt import GPTConfig, GPTModel
from minigpt.runtime.linear import linear
from minigpt.runtime.runtime import autocast, compile_with_loss, no_fast_bfloat16_reason, resolve_precision
from minigpt.training.losses import calc_loss_batch, next_token_loss

SHAPES = {"gpt2-small": (4, 256), "tiny": (8, 128)}  # (batch, tokens)
TARGETS = {"minigpt_fp32_vs_transformers_fp32": 1.1, "minigpt_bf16_vs_transformers_fp32": 1.8,
           "minigpt_bf16_vs_transformers_bf16": 1.0}


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of repeated ``n x n`` products through :func:`minigpt.runtime.linear.linear`, the kernel
    the layers use (oneDNN in float32, ``F.linear`` otherwise; on CPUs without native bfloat16,
    ``a @ b`` in bfloat16 takes a far slower path)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    linear(a, b)  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        linear(a, b)
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def matmul_weights(model: nn.Module) -> int:
    """Weights that take part in a matrix product: linear layers, the (tied) head included."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def flops_per_token(model: nn.Module, cfg: GPTConfig, tokens: int) -> int:
    return 6 * matmul_weights(model) + 12 * cfg.n_layers * tokens * cfg.emb_dim


def gpt2_layout(preset: str) -> GPTConfig:
    # transformers' GPT-2 always has the query/key/value bias and ties the head.
    return GPTConfig.from_preset(preset, qkv_bias=True, tie_weights=True, drop_rate=0.0)


def transformers_model(cfg: GPTConfig) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
                        n_layer=cfg.n_layers, n_head=cfg.n_heads, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, tie_word_embeddings=True)
    return GPT2LMHeadModel(hf_cfg)


def build(impl: str, cfg: GPTConfig) -> nn.Module:
    return transformers_model(cfg) if impl == "transformers" else GPTModel(cfg)


def random_batch(cfg: GPTConfig, batch_size: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, cfg.vocab_size, (batch_size, tokens), generator=g),
            torch.randint(0, cfg.vocab_size, (batch_size, tokens), generator=g))


class Trainer:
    """One model, its optimizer and a fixed batch; ``step()`` times one training step."""

    def __init__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], precision: str,
                 compiled: bool = False) -> None:
        self.model = model.train()
        self.is_hf = not isinstance(model, GPTModel)
        # compiled as minigpt's training loop compiles: the model and its loss in one graph
        self.loss_of = compile_with_loss(model, next_token_loss) if compiled else partial(next_token_loss, model)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        self.batch, self.precision, self.times = batch, precision, []

    def loss(self) -> torch.Tensor:
        x, y = self.batch
        with autocast(torch.device("cpu"), self.precision):
            if self.is_hf:
                logits = self.model(input_ids=x).logits
                return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            return self.loss_of(self.batch)  # next_token_loss: the same cross-entropy, the head chunk by chunk

    def step(self) -> float:
        start = time.perf_counter()
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - start)
        return loss.item()


def speed_rows(preset: str, precisions: list[str], compiled: bool, steps: int, warmup: int) -> dict:
    """Tokens/s of every (implementation, precision[, compiled]) row, trained in turns."""
    batch_size, tokens = SHAPES[preset]
    cfg = gpt2_layout(preset)
    batch = random_batch(cfg, batch_size, tokens)
    runs = {}
    for precision in precisions:
        for impl in ("transformers", "minigpt"):
            torch.manual_seed(0)
            runs[(impl, precision, False)] = Trainer(build(impl, cfg), batch, precision)
        if compiled:
            torch.manual_seed(0)
            runs[("minigpt", precision, True)] = Trainer(GPTModel(cfg), batch, precision, compiled=True)
    for _ in range(warmup + steps):  # take turns, so load changes hit all alike
        for trainer in runs.values():
            trainer.step()
    rates = {key: batch_size * tokens / statistics.median(t.times[warmup:]) for key, t in runs.items()}
    compile_s = {key: t.times[0] - statistics.median(t.times[warmup:]) for key, t in runs.items() if key[2]}
    # an eager module, without the flag, comes back where torch.compile refused at once
    fell_back = {key: getattr(t.loss_of, "fell_back", True) for key, t in runs.items() if key[2]}
    attention = runs[("transformers", precisions[0], False)].model.config._attn_implementation
    return {"rates": rates, "compile_s": compile_s, "fell_back": fell_back, "attention": attention,
            "flops_per_token": flops_per_token(runs[("minigpt", precisions[0], False)].model, cfg, tokens)}


def peak_memory_mb(impl: str, precision: str, preset: str, steps: int) -> float:
    """Peak resident memory growth of ``steps`` training steps, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--measure-memory", impl, precision, preset, str(steps)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def _memory_kib() -> tuple[int, int]:
    """``(resident now, peak resident)`` of this process in KiB (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def measure_memory(impl: str, precision: str, preset: str, steps: int) -> dict:
    batch_size, tokens = SHAPES[preset]
    cfg = gpt2_layout(preset)
    batch = random_batch(cfg, batch_size, tokens)
    if impl == "transformers":
        import transformers  # noqa: F401  (its import is not the model's memory)
    baseline, _ = _memory_kib()
    torch.manual_seed(0)
    trainer = Trainer(build(impl, cfg), batch, precision)
    for _ in range(steps):
        trainer.step()
    _, peak = _memory_kib()
    return {"peak_mb": round((peak - baseline) / 1024, 1)}


def loss_curve_deviation(steps: int, window: int = 10) -> dict:
    """bfloat16 autocast against float32: the same tiny model, start, real text batches and
    recipe as minigpt's training loop (its AdamW groups, warm-up + cosine, clipping at 1.0).
    Single steps can spike in one run and not the other (the trajectories part a little),
    so the target is read on the means of ``window`` consecutive steps."""
    from minigpt.data.corpora import load_token_ids
    from minigpt.training.optim import create_optimizer, lr_at_step

    ids = load_token_ids("python-docs")
    batch_size, tokens = SHAPES["tiny"]
    span = batch_size * tokens
    batches = [(ids[i:i + span].view(batch_size, tokens), ids[i + 1:i + 1 + span].view(batch_size, tokens))
               for i in range(0, steps * span, span)]
    curves = {}
    for precision in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = GPTModel(gpt2_layout("tiny"))
        optimizer = create_optimizer(model, lr=3e-3)
        curve = []
        for step, (x, y) in enumerate(batches):
            for group in optimizer.param_groups:
                group["lr"] = lr_at_step(step, 3e-3, 3e-4, max(1, len(batches) // 10), len(batches))
            with autocast(torch.device("cpu"), precision):
                loss = calc_loss_batch(x, y, model, "cpu")
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            curve.append(loss.item())
        curves[precision] = curve
    fp32, bf16 = curves["float32"], curves["bfloat16"]
    deviation = [abs(b - a) / a for a, b in zip(fp32, bf16, strict=True)]
    means = [(statistics.mean(fp32[i:i + window]), statistics.mean(bf16[i:i + window]))
             for i in range(0, len(fp32), window)]
    window_deviation = max(abs(b - a) / a for a, b in means)
    return {"config": "tiny", "steps": len(batches), "window": window,
            "max_window_deviation_pct": round(100 * window_deviation, 3),
            "max_step_deviation_pct": round(100 * max(deviation), 3),
            "final_deviation_pct": round(100 * deviation[-1], 3), "target_pct": 2.0,
            "meets_target": window_deviation <= 0.02,
            "float32": [round(v, 4) for v in fp32], "bfloat16": [round(v, 4) for v in bf16]}


def ratios_of(rates: dict[tuple[str, str, bool], float]) -> dict[str, float]:
    """minigpt's rates (eager, then compiled with its loss) over transformers' eager ones."""
    short = {"float32": "fp32", "bfloat16": "bf16"}
    ratios = {}
    for (impl, precision, compiled), rate in rates.items():
        if impl != "minigpt":
            continue
        name = f"minigpt_{'compiled_' if compiled else ''}{short[precision]}"
        ratios[f"{name}_vs_transformers_fp32"] = rate / rates[("transformers", "float32", False)]
        if precision == "bfloat16":
            ratios[f"{name}_vs_transformers_bf16"] = rate / rates[("transformers", "bfloat16", False)]
    return ratios


def report(args: argparse.Namespace) -> dict:
    cpu = torch.device("cpu")
    auto = resolve_precision("auto", cpu)
    precisions = ["float32"] + (["bfloat16"] if auto == "bfloat16" or args.force_bf16 else [])
    if args.compile and args.cold_compile:  # what a first run pays: no kernels from an earlier run's cache
        from torch._inductor import config as inductor_config

        inductor_config.force_disable_caches = True
    peaks = {p: matmul_peak(getattr(torch, p), n=2048 if p == "float32" else 1024) for p in precisions}
    speed = speed_rows(args.config, precisions, args.compile, args.steps, args.warmup)
    rates, batch_size, tokens = speed["rates"], *SHAPES[args.config]
    rows = []
    for (impl, precision, compiled), rate in rates.items():
        row = {"impl": impl, "precision": precision, "compiled": compiled, "tokens_per_s": round(rate, 1),
               "mfu": round(rate * speed["flops_per_token"] / peaks[precision], 4),
               "vs_transformers_fp32": round(rate / rates[("transformers", "float32", False)], 3)}
        if compiled:
            row["compile_s"] = round(speed["compile_s"][(impl, precision, compiled)], 1)
            row["compile_speedup"] = round(rate / rates[(impl, precision, False)], 3)
            row["fell_back_to_eager"] = speed["fell_back"][(impl, precision, compiled)]
        elif args.memory_steps:
            row["peak_mb"] = peak_memory_mb(impl, precision, args.config, args.memory_steps)
        rows.append(row)
    ratios = ratios_of(rates)
    memory = {f"{r['impl']}_{r['precision']}": r["peak_mb"] for r in rows if "peak_mb" in r}
    memory_ok = {p: memory[f"minigpt_{p}"] <= memory[f"transformers_{p}"] for p in precisions if memory}
    return {
        "bench": "train", "config": args.config, "batch": batch_size, "tokens": tokens,
        "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx": torch.cpu._is_amx_tile_supported(),
        "auto_precision": auto, "bf16_reason": no_fast_bfloat16_reason(cpu),
        "transformers_attention": speed["attention"], "flops_per_token": speed["flops_per_token"],
        "matmul_peak_tflops": {p: round(v / 1e12, 4) for p, v in peaks.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "meets_target": {k: round(v, 3) >= TARGETS[k.replace("compiled_", "")] for k, v in ratios.items()},
        "peak_memory_not_above_transformers": memory_ok,
        "rows": rows,
        "loss_curve": loss_curve_deviation(args.curve_steps) if args.curve_steps else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="gpt2-small", choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=6, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1: compiling)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time minigpt through torch.compile (minutes of compiling on a CPU)")
    parser.add_argument("--cold-compile", action=argparse.BooleanOptionalAction, default=True,
                        help="time compiling without the compiler's on-disk cache of earlier runs")
    parser.add_argument("--force-bf16", action="store_true",
                        help="time the bfloat16 rows even where bfloat16 is emulated (slow)")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps per peak-memory process (0: skip)")
    parser.add_argument("--curve-steps", type=int, default=50, help="steps of the bf16 loss-curve check (0: skip)")
    parser.add_argument("--measure-memory", nargs=4, metavar=("IMPL", "PRECISION", "CONFIG", "STEPS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_memory:
        impl, precision, preset, steps = args.measure_memory
        print(json.dumps(measure_memory(impl, precision, preset, int(steps))))
        return
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step compiles and allocates)")
    print(json.dumps({**report(args), **machine_fields()}), flush=True)


if __name__ == "__main__":
    main()
