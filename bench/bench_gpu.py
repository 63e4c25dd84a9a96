"""GPU speed in one short run: training MFU, cached decoding against transformers, DDP scaling.

Where CUDA is present (about 5 minutes on one card):

* ``train``: gpt2-small (GPT-2 layout: query/key/value bias, tied head, dropout 0) at batch
  ``--batch`` x 1024 tokens, bfloat16 autocast, attention through PyTorch's
  ``scaled_dot_product_attention`` (minigpt's default path), fused AdamW, eager and through
  :func:`minigpt.runtime.runtime.compile_with_loss` (model and loss in one graph, as training
  compiles). ``mfu``: achieved FLOP/s (``6 N + 12 n_layers tokens emb_dim`` per token, as
  in ``bench_train.py``) over the card's published dense bfloat16 peak (:data:`PEAKS`, by
  name; other cards: a measured bfloat16 matmul peak, said so in ``peak_source``).
  Target: >= 40 % compiled. ``compile_s``: first step less a step.
* ``decode``: greedy cached decoding, batch 1, ``--new-tokens`` tokens after a 16-token
  prompt, float32 weights, minigpt ``generate`` against ``transformers.generate`` on the
  same weights (taking turns, medians); ``same_tokens`` says whether both chose the same ids.
  Target: >= 1.5x.
* ``ddp``: only where two or more GPUs are present: the compiled training step under
  ``torchrun`` on every GPU, tokens/s over one GPU's.

Without CUDA it prints ``{"bench": "gpu", "skipped": "<why>"}`` and exits 0. One JSON line::

    python bench/bench_gpu.py [--batch 16] [--steps 10] [--new-tokens 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from bench_train import flops_per_token, gpt2_layout, matmul_weights, transformers_model
from common import machine_fields

from minigpt import GPTModel
from minigpt.generation.generate import generate
from minigpt.runtime.runtime import compile_with_loss
from minigpt.training.losses import next_token_loss

# Published dense (no sparsity) bfloat16 tensor-core peaks, TFLOP/s, by a part of the card's name.
PEAKS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0),
         ("RTX 4090", 165.0))
TOKENS = 1024


def card_peak(device: torch.device) -> tuple[float, str]:
    """``(bfloat16 FLOP/s, where the figure comes from)`` for this card."""
    name = torch.cuda.get_device_name(device)
    for part, tflops in PEAKS:
        if part in name:
            return tflops * 1e12, f"published dense bf16 peak of {part}"
    return matmul_peak(device), f"measured bf16 matmul peak ({name} is not in the table)"


def matmul_peak(device: torch.device, n: int = 8192, repeats: int = 50) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def train_rate(model: torch.nn.Module, device: torch.device, batch: int, steps: int, compiled: bool,
               warmup: int = 3) -> dict:
    """Tokens/s of bfloat16-autocast training steps on a fixed random batch; compiled as
    ``TrainConfig(compile=True)`` compiles: the model and its loss in one graph."""
    loss_of = compile_with_loss(model, next_token_loss) if compiled else partial(next_token_loss, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, model.cfg.vocab_size, (batch, TOKENS), generator=g).to(device) for _ in range(2))
    times = []
    for _ in range(warmup + steps):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_of((x, y))  # cross-entropy over float32 logits, as in training
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    step = statistics.median(times[warmup:])
    out = {"tokens_per_s": round(batch * TOKENS / step, 1), "step_ms": round(1000 * step, 1),
           "fell_back_to_eager": compiled and getattr(loss_of, "fell_back", True)}
    if compiled:
        out["compile_s"] = round(times[0] - step, 1)
    return out


def bench_train(device: torch.device, batch: int, steps: int) -> dict:
    peak, source = card_peak(device)
    cfg = gpt2_layout("gpt2-small")
    rows = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = GPTModel(cfg).to(device).train()
        params, flops = matmul_weights(model), flops_per_token(model, cfg, TOKENS)
        row = train_rate(model, device, batch, steps, compiled)
        row["mfu"] = round(row["tokens_per_s"] * flops / peak, 4)
        rows["compiled" if compiled else "eager"] = row
        del model
        torch.cuda.empty_cache()
    return {"batch": batch, "tokens": TOKENS, "precision": "bfloat16 autocast", "attention": "sdpa",
            "matmul_params": params, "flops_per_token": flops,
            "peak_tflops": round(peak / 1e12, 1), "peak_source": source, **rows,
            "compile_speedup": round(rows["compiled"]["tokens_per_s"] / rows["eager"]["tokens_per_s"], 3),
            "meets_target": rows["compiled"]["mfu"] >= 0.40}


def bench_decode(device: torch.device, new_tokens: int, repeats: int = 3) -> dict:
    """Greedy cached decoding at batch 1 in float32, minigpt against transformers (same weights)."""
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 as asked: both alike
    cfg = gpt2_layout("gpt2-small")
    torch.manual_seed(0)
    hf = transformers_model(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = GPTModel.from_pretrained(tmp).to(device).eval()
    hf = hf.to(device)
    hf.generation_config.eos_token_id = None  # random weights: never stop early
    hf.generation_config.pad_token_id = 0
    prompt = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)

    def run_ours() -> torch.Tensor:
        return generate(ours, prompt, new_tokens)[:, prompt.shape[1]:]

    def run_hf() -> torch.Tensor:
        return hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           attention_mask=torch.ones_like(prompt))[:, prompt.shape[1]:]

    runs, times, outputs = {"minigpt": run_ours, "transformers": run_hf}, {"minigpt": [], "transformers": []}, {}
    with torch.no_grad():
        for run in runs.values():  # warm-up: kernels, caches
            run()
        for _ in range(repeats):
            for name, run in runs.items():
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                outputs[name] = run()
                torch.cuda.synchronize(device)
                times[name].append(time.perf_counter() - start)
    rates = {name: new_tokens / statistics.median(t) for name, t in times.items()}
    ratio = rates["minigpt"] / rates["transformers"]
    return {"new_tokens": new_tokens, "precision": "float32",
            **{f"{name}_tokens_per_s": round(rate, 1) for name, rate in rates.items()},
            "vs_transformers": round(ratio, 3), "meets_target": ratio >= 1.5,
            "same_tokens": bool(torch.equal(outputs["minigpt"].cpu(), outputs["transformers"].cpu()))}


def ddp_worker(batch: int, steps: int) -> None:
    """One process of ``torchrun``: compiled training under DistributedDataParallel."""
    from torch.nn.parallel import DistributedDataParallel

    torch.distributed.init_process_group("nccl")
    rank = torch.distributed.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = DistributedDataParallel(GPTModel(gpt2_layout("gpt2-small")).to(device).train(), device_ids=[device.index])
    model.cfg = model.module.cfg  # what train_rate reads
    row = train_rate(model, device, batch, steps, compiled=True)
    if rank == 0:
        print(json.dumps({"tokens_per_s_per_gpu": row["tokens_per_s"]}), flush=True)
    torch.distributed.destroy_process_group()


def bench_ddp(gpus: int, batch: int, steps: int, one_gpu_rate: float) -> dict:
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}",
                          str(Path(__file__)), "--ddp-worker", "--batch", str(batch), "--steps", str(steps)],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return {"gpus": gpus, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    per_gpu = json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s_per_gpu"]
    return {"gpus": gpus, "tokens_per_s": round(per_gpu * gpus, 1),
            "scaling": round(per_gpu * gpus / one_gpu_rate, 3), "efficiency": round(per_gpu / one_gpu_rate, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="training sequences of 1024 tokens per step")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (after 3 untimed)")
    parser.add_argument("--new-tokens", type=int, default=200, help="tokens to decode")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker:
        ddp_worker(args.batch, args.steps)
        return
    if not torch.cuda.is_available():
        print(json.dumps({"bench": "gpu", "skipped": "no CUDA GPU: PyTorch sees none "
                          f"(torch {torch.__version__}, CUDA build {torch.version.cuda})"}))
        return
    device = torch.device("cuda")
    report = {"bench": "gpu", "device": torch.cuda.get_device_name(device), "gpus": torch.cuda.device_count(),
              "torch": torch.__version__, "cuda": torch.version.cuda}
    report["train"] = bench_train(device, args.batch, args.steps)
    report["decode"] = bench_decode(device, args.new_tokens)
    report["ddp"] = (bench_ddp(report["gpus"], args.batch, args.steps, report["train"]["compiled"]["tokens_per_s"])
                     if report["gpus"] >= 2 else {"skipped": "one GPU: DDP scaling needs two or more"})
    print(json.dumps({**report, **machine_fields()}))


if __name__ == "__main__":
    main()
