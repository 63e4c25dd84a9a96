"""Training speed: minigpt against transformers' GPT2LMHeadModel, same shapes, same run.

For each model shape (``gpt2-small`` at batch 4 x 256 tokens, ``tiny`` at batch 8 x 128)
both implementations get the same GPT-2 layout (query/key/value bias, output head tied
to the token embedding, dropout 0), the same data, loss (cross-entropy over every
position) and optimizer (``torch.optim.AdamW(fused=True)``), and train in float32. Their
steps alternate, so a change in machine load hits both alike. Reported per line:

* ``tokens_per_s``: batch x tokens / the median step time after ``--warmup`` steps;
* ``mfu``: model FLOPs utilisation, achieved FLOP/s over the machine's matmul peak
  measured here (a loop of large matrix products in that dtype). The FLOPs per token are
  ``6 * N + 12 * n_layers * tokens * emb_dim``: ``N`` counts the weights of every
  matrix product (all linear layers and the output head; not the embedding lookups),
  6 = 2 (multiply-add) x 3 (forward, and backward for inputs and for weights), and the
  second term is attention's ``Q K^T`` and ``A V`` over the full (not causally halved)
  square, as in the PaLM paper's appendix B.

A third line trains minigpt with bfloat16 autocast (``tiny`` only by default: CPUs
without native bfloat16 emulate it very slowly) and a last line compares its loss
curve with float32's over ``--curve-steps`` steps on real text from the same start.

    python bench/bench_train.py [--configs gpt2-small tiny] [--steps 6] [--warmup 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from minigpt import GPTConfig, GPTModel
from minigpt.losses import calc_loss_batch
from minigpt.runtime import autocast

SHAPES = {"gpt2-small": (4, 256), "tiny": (8, 128)}  # (batch, tokens)


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of repeated ``n x n`` products through ``F.linear``, the kernel the layers use
    (on CPUs without native bfloat16, ``a @ b`` in bfloat16 takes a far slower path)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    F.linear(a, b)  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        F.linear(a, b)
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


class Trainer:
    """One model, its optimizer and a fixed batch; ``step()`` times one training step."""

    def __init__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], precision: str) -> None:
        self.model = model.train()
        self.is_hf = not isinstance(model, GPTModel)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        self.batch, self.precision, self.times = batch, precision, []

    def loss(self) -> torch.Tensor:
        x, y = self.batch
        with autocast(torch.device("cpu"), self.precision):
            if self.is_hf:
                logits = self.model(input_ids=x).logits
                return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            return calc_loss_batch(x, y, self.model, "cpu")

    def step(self) -> float:
        start = time.perf_counter()
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - start)
        return loss.item()


def bench_shape(preset: str, precisions: list[str], steps: int, warmup: int, peaks: dict) -> list[dict]:
    batch_size, tokens = SHAPES[preset]
    cfg = gpt2_layout(preset)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, cfg.vocab_size, (batch_size, tokens), generator=g),
             torch.randint(0, cfg.vocab_size, (batch_size, tokens), generator=g))
    torch.manual_seed(0)
    runs = {("transformers", "float32"): Trainer(transformers_model(cfg), batch, "float32")}
    for precision in precisions:
        runs[("minigpt", precision)] = Trainer(GPTModel(cfg), batch, precision)
    for _ in range(warmup + steps):  # alternate, so load changes hit all alike
        for trainer in runs.values():
            trainer.step()

    ours = runs[("minigpt", precisions[0])].model
    flops = flops_per_token(ours, cfg, tokens)  # the same shape for both implementations
    rates = {key: batch_size * tokens / statistics.median(t.times[warmup:]) for key, t in runs.items()}
    lines = []
    for (impl, precision), trainer in runs.items():
        rate = rates[(impl, precision)]
        achieved = rate * flops
        lines.append({
            "config": preset, "impl": impl, "precision": precision, "batch": batch_size, "tokens": tokens,
            "matmul_params": matmul_weights(ours), "flops_per_token": flops,
            "tokens_per_s": round(rate, 1), "tflops": round(achieved / 1e12, 4),
            "mfu": round(achieved / peaks[precision], 4),
            "vs_transformers_fp32": round(rate / rates[("transformers", "float32")], 3),
            **({"attention": trainer.model.config._attn_implementation} if trainer.is_hf else {}),
        })
    return lines


def loss_curve_deviation(steps: int) -> dict:
    """bfloat16 autocast against float32: the same tiny model, start and real text batches."""
    from minigpt.corpora import load_token_ids

    ids = load_token_ids("python-docs")
    batch_size, tokens = SHAPES["tiny"]
    batches = [(ids[i:i + batch_size * tokens].view(batch_size, tokens),
                ids[i + 1:i + 1 + batch_size * tokens].view(batch_size, tokens))
               for i in range(0, steps * batch_size * tokens, batch_size * tokens)]
    curves = {}
    for precision in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = GPTModel(gpt2_layout("tiny"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, fused=True)
        curve = []
        for x, y in batches:
            with autocast(torch.device("cpu"), precision):
                loss = calc_loss_batch(x, y, model, "cpu")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            curve.append(loss.item())
        curves[precision] = curve
    deviation = [abs(b - a) / a for a, b in zip(curves["float32"], curves["bfloat16"], strict=True)]
    return {"config": "tiny", "check": "bf16_loss_curve", "steps": steps,
            "float32": [round(v, 4) for v in curves["float32"]],
            "bfloat16": [round(v, 4) for v in curves["bfloat16"]],
            "max_deviation_pct": round(100 * max(deviation), 3),
            "final_deviation_pct": round(100 * deviation[-1], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--bf16-configs", nargs="*", default=["tiny"], choices=list(SHAPES),
                        help="shapes also trained with bfloat16 autocast (default: tiny)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--curve-steps", type=int, default=8, help="steps of the bf16 loss-curve check (0: skip)")
    args = parser.parse_args()

    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16, n=1024)}
    print(json.dumps({"check": "matmul_peak", "threads": torch.get_num_threads(),
                      "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      **{f"{k}_tflops": round(v / 1e12, 4) for k, v in peaks.items()}}), flush=True)
    for preset in args.configs:
        precisions = ["float32"] + (["bfloat16"] if preset in args.bf16_configs else [])
        for line in bench_shape(preset, precisions, args.steps, args.warmup, peaks):
            print(json.dumps(line), flush=True)
    if args.curve_steps:
        print(json.dumps(loss_curve_deviation(args.curve_steps)), flush=True)


if __name__ == "__main__":
    main()
