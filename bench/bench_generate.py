"""Generation speed: minigpt with and without KV cache against transformers, same run.

Greedy decoding of ``--new-tokens`` tokens at batch 1 from a ``--prompt-tokens``-token
prompt, on random weights of the chosen GPT-2 shape (OpenAI's layout: qkv bias, tied
head), for all three in one process, taking turns. Prints one JSON line with tokens/s (median of
``--repeats`` runs) and the ratios to transformers.

    python bench/bench_generate.py [--preset gpt2-small] [--new-tokens 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from minigpt import GPTConfig, GPTModel, generate


def interleaved_rates(runs: dict[str, Callable[[], object]], new_tokens: int, repeats: int) -> dict[str, float]:
    """Median tokens/s of each run; the runs take turns, so drifting clock speeds or
    background load hit all of them alike instead of whichever ran last."""
    for run in runs.values():
        run()  # warm-up: allocator, kernels, caches
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: new_tokens / statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(args.preset, qkv_bias=True, tie_weights=True, drop_rate=0.0)
    ours = GPTModel(cfg).eval()
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
        n_layer=cfg.n_layers, n_head=cfg.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    hf = GPT2LMHeadModel(hf_cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_tokens))
    n = args.new_tokens

    with torch.inference_mode():
        rates = interleaved_rates({
            "cached": lambda: generate(ours, prompt, n, use_cache=True),
            "uncached": lambda: generate(ours, prompt, n, use_cache=False),
            "transformers": lambda: hf.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                max_new_tokens=n, min_new_tokens=n, pad_token_id=0),
        }, n, args.repeats)
    cached, uncached, hf_rate = rates["cached"], rates["uncached"], rates["transformers"]

    print(json.dumps({
        "bench": "generate",
        "shape": args.preset,
        "batch": 1,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": n,
        "threads": torch.get_num_threads(),
        "minigpt_kv_cache_tok_s": round(cached, 2),
        "minigpt_no_cache_tok_s": round(uncached, 2),
        "transformers_tok_s": round(hf_rate, 2),
        "kv_cache_vs_transformers": round(cached / hf_rate, 3),
        "kv_cache_vs_no_cache": round(cached / uncached, 3),
    }))


if __name__ == "__main__":
    main()
