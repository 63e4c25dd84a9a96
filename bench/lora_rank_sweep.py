"""LoRA rank sweep on SMS spam classification: trainable parameters, accuracy, time, memory.

For each rank a fresh copy of the same base model becomes a 2-class classifier
(``make_classifier``), gets LoRA on every linear layer of the blocks and on the head
(``apply_lora``, alpha = rank unless ``--alpha`` is given, so the update's scaling stays 1
as in the book's r=16, alpha=16) and is fine-tuned on the balanced spam training split.
Each rank runs in its own process, so the peak memory measured is that rank's alone:
the growth of the peak resident set size during training on CPU, or
``torch.cuda.max_memory_allocated`` on CUDA.

The default is a smoke run for 2 CPU cores (under 3 minutes): the ``tiny`` preset with
*random* weights, 400 training messages cut to 64 tokens, one epoch. Its accuracies show
that the machinery learns, not what LoRA achieves. ``--full`` runs the book's setting:
GPT-2 124M with its pretrained weights, every message, learning rate 5e-5.

    python bench/lora_rank_sweep.py [--ranks 8 16 32 128] [--full] [--epochs 1]

Writes ``bench/results/lora_sweep.md`` (a Markdown table) and ``lora_sweep.png``, and prints
the table and one JSON line per rank.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import machine_fields
from torch.utils.data import DataLoader

from minigpt.finetuning.classification import ClassificationDataset, calc_accuracy_loader, make_classifier
from minigpt.finetuning.labelled_data import balance_classes, load_labelled_texts, split_examples
from minigpt.io.files import atomic_write, write_text
from minigpt.lora.adapters import apply_lora
from minigpt.models.gpt2.model import GPTModel
from minigpt.training.config import TrainConfig
from minigpt.training.loop import train_model

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 128])
    parser.add_argument("--full", action="store_true",
                        help="gpt2-small with pretrained weights, all messages, lr 5e-5")
    parser.add_argument("--model", default=None,
                        help="preset (random weights) or weights for GPTModel.from_pretrained; "
                             "default: tiny, or gpt2-small with --full")
    parser.add_argument("--alpha", type=float, default=None, help="default: alpha = rank")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=None,
                        help="training messages used; default: 400, or all with --full")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens kept per message; default: 64, or the longest with --full")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3, or 5e-5 with --full")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one-rank", type=int, default=None, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args(argv)
    args.model = args.model or ("gpt2-small" if args.full else "tiny")
    args.train_size = args.train_size or (None if args.full else 400)
    args.max_length = args.max_length or (None if args.full else 64)
    args.lr = args.lr or (5e-5 if args.full else 1e-3)
    return args


def pretrained(args: argparse.Namespace) -> bool:
    return args.full or Path(args.model).is_dir()


def base_model(args: argparse.Namespace) -> GPTModel:
    """The same base for every rank: pretrained weights, or a random init with a fixed seed."""
    torch.manual_seed(args.seed)  # also fixes the new classification head
    return GPTModel.from_pretrained(args.model) if pretrained(args) else GPTModel(args.model)


def data_loaders(args: argparse.Namespace) -> tuple[DataLoader, DataLoader, DataLoader]:
    train, val, test = split_examples(balance_classes(load_labelled_texts("spam")), seed=args.seed)
    train_set = ClassificationDataset(train[: args.train_size], max_length=args.max_length)
    labels = train_set.label_names
    val_set = ClassificationDataset(val, max_length=args.max_length, label_names=labels)
    test_set = ClassificationDataset(test, max_length=args.max_length, label_names=labels)
    generator = torch.Generator().manual_seed(args.seed)  # the same batches for every rank
    return (
        DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, generator=generator),
        DataLoader(val_set, batch_size=args.batch_size),
        DataLoader(test_set, batch_size=args.batch_size),
    )


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: CUDA allocations, or this process's resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def run_rank(args: argparse.Namespace, rank: int) -> dict:
    """Fine-tune one LoRA rank (in this process) and measure it."""
    device = torch.device(args.device)
    train_loader, val_loader, test_loader = data_loaders(args)
    model = make_classifier(base_model(args), num_classes=2)
    report = apply_lora(model, rank=rank, alpha=args.alpha or rank)
    model.to(device)
    # train_classifier's settings (constant learning rate, AdamW with weight decay 0.1), with
    # one evaluation of one batch at the end, so that the time is the training's alone.
    steps = args.epochs * len(train_loader)
    config = TrainConfig(max_steps=steps, lr=args.lr, min_lr=args.lr, warmup_steps=0,
                         weight_decay=0.1, eval_every=steps, eval_iter=1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    memory_before = peak_memory_mib(device)
    start = time.perf_counter()
    train_model(model, train_loader, val_loader, config, device=device, progress=False)
    seconds = (time.perf_counter() - start) / args.epochs
    memory = peak_memory_mib(device) - (0.0 if device.type == "cuda" else memory_before)
    return {
        "rank": rank,
        "alpha": report.alpha,
        "trainable_params": report.trainable,
        "total_params": report.total,
        "val_accuracy": calc_accuracy_loader(val_loader, model, device),
        "test_accuracy": calc_accuracy_loader(test_loader, model, device),
        "seconds_per_epoch": seconds,
        "peak_memory_mib": memory,
    }


def markdown_table(rows: list[dict], args: argparse.Namespace) -> str:
    memory = "peak CUDA memory" if args.device.startswith("cuda") else "peak RSS growth"
    lines = [
        f"LoRA rank sweep: `{args.model}`{'' if pretrained(args) else ' (random weights)'}, "
        f"{args.epochs} epoch(s), {args.train_size or 'all'} training messages, lr {args.lr:g}, "
        f"device {args.device}",
        "",
        f"| rank | alpha | trainable params | % of total | val acc | test acc | s / epoch | {memory} (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['rank']} | {r['alpha']:g} | {r['trainable_params']:,} | "
            f"{100 * r['trainable_params'] / r['total_params']:.2f} | {100 * r['val_accuracy']:.1f}% | "
            f"{100 * r['test_accuracy']:.1f}% | {r['seconds_per_epoch']:.1f} | {r['peak_memory_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = [r["rank"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5))
    panels = [
        ("trainable parameters", [("", "trainable_params")]),
        ("accuracy", [("validation", "val_accuracy"), ("test", "test_accuracy")]),
        ("seconds per epoch", [("", "seconds_per_epoch")]),
        ("peak memory (MiB)", [("", "peak_memory_mib")]),
    ]
    for ax, (title, series) in zip(axes.flat, panels, strict=True):
        for label, key in series:
            ax.plot(ranks, [r[key] for r in rows], marker="o", label=label or None)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("LoRA rank")
        ax.set_title(title)
        if len(series) > 1:
            ax.legend()
    axes[0, 0].set_yscale("log")
    fig.suptitle("LoRA rank sweep, SMS spam classification")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one_rank is not None:
        print(json.dumps(run_rank(args, args.one_rank)))
        return
    passed = argv if argv is not None else sys.argv[1:]
    rows = []
    for rank in args.ranks:
        # A fresh process per rank: the peak resident set size of a process never goes down.
        worker = [sys.executable, __file__, *passed, "--one-rank", str(rank)]
        done = subprocess.run(worker, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"rank {rank} failed:\n{done.stderr}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps({**rows[-1], **machine_fields()}), flush=True)
    table = markdown_table(rows, args)
    write_text(args.out / "lora_sweep.md", table)
    plot(rows, args.out / "lora_sweep.png")
    print(table)
    print(f"wrote {args.out / 'lora_sweep.md'} and {args.out / 'lora_sweep.png'}")


if __name__ == "__main__":
    main()
