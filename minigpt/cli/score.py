"""``minigpt score``: a reward model's score of an answer to a prompt."""

from __future__ import annotations

import argparse

HELP = "score an answer to a prompt with a reward model (the output of 'minigpt finetune reward')"


def add(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    p.add_argument("--reward-model", required=True, metavar="DIR", help="the reward model's directory")
    p.add_argument("--prompt", required=True, help="the instruction, written into the prompt format it was "
                                                   "trained with (Alpaca's)")
    p.add_argument("--input", default="", help="the instruction's input, if any (default: none)")
    p.add_argument("--answer", required=True, action="append",
                   help="an answer to score; repeat the option to score several")


def run(args: argparse.Namespace) -> int:
    from minigpt.finetuning.instruction import ALPACA
    from minigpt.finetuning.reward import load_reward_model, score_texts
    from minigpt.tokenizers.gpt2 import get_gpt2_tokenizer

    model = load_reward_model(args.reward_model)
    tokenizer = get_gpt2_tokenizer()
    entry = {"instruction": args.prompt, "input": args.input}
    prompt = ALPACA.encode(ALPACA.prompt(entry) + ALPACA.header, tokenizer=tokenizer)
    answers = [ALPACA.encode(answer, tokenizer=tokenizer) + [tokenizer.eot_token] for answer in args.answer]
    scores = score_texts(model, [prompt] * len(answers), answers, pad_id=tokenizer.eot_token)
    for answer, score in zip(args.answer, scores.tolist(), strict=True):
        print(f"{score:+.4f}  {answer}")
    return 0
