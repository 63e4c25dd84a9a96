"""The ``minigpt`` command line: one sub-command per job.

Each sub-command is a pair of functions: ``_add_<name>(subparsers)`` declares its
options and ``_cmd_<name>(args)`` runs it, calling the library the same way a
notebook would.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from minigpt.config import PRESETS, GPTConfig


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="list the model presets with parameter counts and memory")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    from minigpt.model import GPTModel

    print(f"{'preset':<12} {'layers':>6} {'heads':>5} {'emb_dim':>7} {'context':>7} "
          f"{'params':>15} {'tied head':>15} {'float32':>10} {'bfloat16':>10}")
    for name in PRESETS:
        cfg = GPTConfig.from_preset(name)
        with torch.device("meta"):  # counts parameters without allocating them
            n = GPTModel(cfg).num_parameters()
            tied = GPTModel(GPTConfig.from_preset(name, tie_weights=True)).num_parameters()
        print(f"{name:<12} {cfg.n_layers:>6} {cfg.n_heads:>5} {cfg.emb_dim:>7} {cfg.context_length:>7} "
              f"{n:>15,} {tied:>15,} {n * 4 / 2**30:>8.2f}GB {n * 2 / 2**30:>8.2f}GB")
    print("'params' is the preset as configured; 'tied head' shares the output head with the "
          "token embedding, as OpenAI's GPT-2 checkpoints do.")
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="GPT-2 name (gpt2-small, ...) or a weights/run directory")
    source.add_argument("--checkpoint", help="a run directory written by 'minigpt pretrain'")
    source.add_argument("--preset", default=None, help="random weights of this preset (a demo)")
    p.add_argument("--prompt", default="Every effort moves you")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context each step")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from minigpt.generation import stream_generate, text_to_token_ids
    from minigpt.model import GPTModel
    from minigpt.tokenizer import get_gpt2_tokenizer

    torch.manual_seed(args.seed)
    source = args.model or args.checkpoint
    model = GPTModel.from_pretrained(source) if source else GPTModel(args.preset or "tiny")
    device = torch.device(args.device) if args.device else _best_device()
    model.to(device).eval()
    tokenizer = get_gpt2_tokenizer()
    idx = text_to_token_ids(args.prompt, tokenizer).to(device)
    print(args.prompt, end="", flush=True)
    for token in stream_generate(model, idx, args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, use_cache=not args.no_cache,
                                 eos_id=tokenizer.eot_token):
        print(tokenizer.decode(token[0].tolist()), end="", flush=True)
    print()
    return 0


def _best_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minigpt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_info, _add_generate):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ConnectionError, KeyError) as err:
        # Bad input is the user's to fix: show the message, not a traceback.
        print(f"minigpt {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
