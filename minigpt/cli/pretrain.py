"""``minigpt pretrain``: train a fresh model on a corpus; Ctrl-C saves, ``--resume`` continues."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from minigpt.cli.options import TRAIN_HELP, add_settings, fill_default_precision, given_settings, interruptible

HELP = "pretrain a fresh model on a corpus (default: a tiny model on Tiny Shakespeare, ~3 minutes)"


def add(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    from minigpt.jobs.pretrain import PretrainConfig

    p.description = ("Pretrain a fresh model into runs/<name>/: checkpoint, loss.png, lr.png, samples.txt. "
                     "With --resume, options left out keep the run's own settings. Under 'torchrun "
                     "--nproc_per_node=N -m minigpt pretrain' each process trains on its share of every batch.")
    defaults = PretrainConfig()
    add_settings(p.add_argument_group("data and model"), defaults, flags)
    add_settings(p.add_argument_group("training loop"), defaults.train, flags, TRAIN_HELP)
    run = p.add_argument_group("run")
    run.add_argument("--out-dir", default="runs", help="parent of the run directory (default: %(default)s)")
    run.add_argument("--name", help="run directory name (default: <corpus>-<preset>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its settings")
    run.add_argument("--overwrite", action="store_true", help="start afresh in an existing run directory")
    run.add_argument("--device", help="cpu, cuda, mps (default: the best available)")


def run(args: argparse.Namespace) -> int:
    from minigpt.jobs.pretrain import PretrainConfig, new_run_dir, pretrain
    from minigpt.training.config import TrainConfig

    given = given_settings(args, PretrainConfig, TrainConfig)
    if args.resume:
        run_dir = Path(args.resume)
        settings = PretrainConfig.load(run_dir).replace(**given)
    else:
        fill_default_precision(given, args.device)
        settings = PretrainConfig().replace(**given)
        run_dir = new_run_dir(settings, args.out_dir, args.name, args.overwrite)
    device = f" --device {args.device}" if args.device else ""
    result = interruptible(lambda: pretrain(settings, run_dir, resume=bool(args.resume), device=args.device),
                            f"minigpt pretrain --resume {run_dir}{device}")
    if int(os.environ.get("RANK", "0")) == 0:
        h = result.history
        print(f"done in {result.seconds:.0f} s: {h.steps[-1]:,} steps, {h.tokens_seen[-1]:,} tokens seen")
        for i, when in ((0, "first"), (-1, "last")):
            print(f"{when} sample (step {h.steps[i]}, word pairs found in the corpus: {result.pair_shares[i]:.0%}): "
                  f"{h.samples[i]}".replace("\n", " "))
        print(f"validation loss {result.val_loss:.4f} over the whole validation split ({result.val_windows:,} "
              f"windows, {result.val_tokens:,} tokens), perplexity {result.val_perplexity:,.1f}")
        print(f"run directory: {run_dir}  (try: minigpt generate --checkpoint {run_dir})")
    return 0
