"""Encoding speed of minigpt's from-scratch GPT-2 BPE against tiktoken, in the same run.

The one idea: pure-Python BPE is affordable because text repeats. Each distinct
pre-token is merged once and then looked up, so the *cold* figure (empty cache, every
word merged for the first time) is the honest worst case and the *warm* figure (every
word already cached) shows what the cache buys on a long corpus.

Prints one JSON line: throughput in MB of UTF-8 per second (median of ``--repeats``
rounds) and ``slowdown`` = tiktoken's throughput / ours (cold; ``slowdown_warm`` warm).

    python bench/bench_bpe.py --corpus the-verdict
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

from common import machine_fields

from minigpt.io import sources
from minigpt.io.download import fetch
from minigpt.tokenizers.bpe import BPETokenizer, gpt2_bpe_files
from minigpt.tokenizers.gpt2 import get_gpt2_tokenizer

# Both ship with minigpt: no network or data folder needed.
CORPORA = {"the-verdict": sources.THE_VERDICT, "tinyshakespeare": sources.TINY_SHAKESPEARE}


def seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="the-verdict")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    text = fetch(CORPORA[args.corpus]).read_text(encoding="utf-8")
    megabytes = len(text.encode("utf-8")) / 1e6
    ours = BPETokenizer.from_gpt2_files(*gpt2_bpe_files())
    reference = get_gpt2_tokenizer()
    # A fast wrong answer is worthless: check the ids before timing anything
    if ours.encode(text) != reference.encode_ordinary(text):
        raise SystemExit("minigpt's BPE and tiktoken disagree on this corpus")

    # The three measurements take turns, so that load from other processes on the machine
    # slows them alike instead of spoiling one of them
    cold, warm, tiktoken_s = [], [], []
    for _ in range(args.repeats):
        ours.clear_cache()
        cold.append(seconds(lambda: ours.encode(text)))
        warm.append(seconds(lambda: ours.encode(text)))  # every word is now in the cache
        tiktoken_s.append(seconds(lambda: reference.encode_ordinary(text)))
    cold, warm, tiktoken_s = map(statistics.median, (cold, warm, tiktoken_s))

    print(json.dumps({
        **machine_fields(),
        "bench": "bpe_encode",
        "corpus": args.corpus,
        "mb": round(megabytes, 4),
        "repeats": args.repeats,
        "minigpt_mb_s": round(megabytes / cold, 3),
        "minigpt_warm_mb_s": round(megabytes / warm, 3),
        "tiktoken_mb_s": round(megabytes / tiktoken_s, 3),
        "slowdown": round(cold / tiktoken_s, 2),
        "slowdown_warm": round(warm / tiktoken_s, 2),
    }))


if __name__ == "__main__":
    main()
