"""``minigpt download``: OpenAI's GPT-2 weights, or a Llama-family checkpoint, verified by SHA-256."""

from __future__ import annotations

import argparse

HELP = "download OpenAI's GPT-2 weights or a Llama-family checkpoint (SmolLM2, Qwen3, Llama 3.2), verified by SHA-256"


def add(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    from minigpt.io.hub import GPT2_REPOS, LLAMA_REPOS, default_weights_dir

    p.add_argument("name", choices=[*GPT2_REPOS, *LLAMA_REPOS])
    p.add_argument("--weights-dir", help=f"where to keep them (default: {default_weights_dir()})")


def run(args: argparse.Namespace) -> int:
    from minigpt.io.hub import GPT2_REPOS, download_gpt2, download_llama

    download = download_gpt2 if args.name in GPT2_REPOS else download_llama
    print(f"{args.name} is in {download(args.name, args.weights_dir)}")
    return 0
