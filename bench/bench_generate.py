"""Generation speed: minigpt with and without KV cache against transformers, same run.

Greedy decoding of ``--new-tokens`` tokens at batch 1 from a ``--prompt-tokens``-token
prompt, on random weights of the chosen GPT-2 shape (OpenAI's layout: qkv bias, tied
head), for all three in one process, taking turns. Then ``--batch-prompts`` prompts of
different lengths (``prompt-tokens / 2`` to ``2 x prompt-tokens``), ``--batch-new-tokens``
new tokens each: :func:`generate_batch` in one padded batch against generating them one
by one (timed on the first ``--one-by-one-sample`` prompts: its rate does not depend on
how many there are). Prints one JSON line: tokens/s (median of ``--repeats`` runs), the
ratios, and the weight bytes read per second by cached batch-1 decoding as a share of a
memory-bandwidth probe (a sum over a buffer far larger than the caches) timed in the same turns:
``bandwidth_share`` against the probe's median, as the rates are medians, and
``bandwidth_share_of_best_probe`` against its fastest run afterwards.

Opt-in bfloat16 inference weights (``model.to(torch.bfloat16)``) get their own fields
(batch 1 and batched), checked against float32: the largest logit difference on the
prompt and the share of greedy tokens that agree. They run where this CPU's bfloat16
matrix-vector products were measured faster than its float32 ones
(``minigpt.runtime.runtime.has_fast_bfloat16(rows=1)``, from the kernel table) or with ``--bf16``;
``--no-bf16`` skips them.

Weight-only ``--quantize int8 int4`` (the default; ``--quantize`` alone skips them) decode
the same model with its block linears quantized (``minigpt.quantization.layers``), through
PyTorch's packed kernels where the kernel table measured them faster: tokens/s against
transformers' float32, the share of ``--new-tokens`` greedy tokens equal to float32's, the
weight bytes read per token, and the WikiText-2 perplexity of float32 and each scheme on
the first ``--perplexity-tokens`` tokens (0 skips it) in windows of 256.

Greedy agreement on a random model says little: its logits are nearly flat, so any rounding flips
near-ties. ``--trained RUN`` (a checkpoint with trained weights, e.g. ``runs/tiny-shakespeare-tiny``
from ``minigpt pretrain``) adds the same checks on it: the share of ``--new-tokens`` greedy tokens of
each scheme equal to float32's after each of four prompts, and its WikiText-2 perplexities.

The JSON line also names the CPU, its instruction set and the kernel table used
(``common.machine_fields``); ``MINIGPT_LINEAR_KERNEL=f_linear`` or ``=onednn`` forces one
float kernel, to show what measuring the choice buys.

``torch.compile`` (:func:`minigpt.generation.decoding.compile_for_decoding`) gets its own fields: the
seconds its first call takes beyond a compiled run (compile time), and its cached batch-1
and batched rates against eager. ``--no-compile`` skips them. The share of the profiled
operator time spent in matrix products (oneDNN's included) is reported for minigpt and
transformers: where it is near 1, batch-1 decoding is bound by the matrix-vector kernel, and
``weight_gb_s`` against the bandwidth probe says how far that kernel is from the memory's rate.

``--quick`` checks in seconds that everything runs (a 2-layer model, a few tokens, no
compile unless ``--compile``): its figures mean nothing. ``--batch-1-only`` runs only the
batch-1 cached rows (no uncached, batched or one-by-one runs): the decoding targets, in minutes.

    python bench/bench_generate.py [--preset gpt2-small] [--new-tokens 200] [--batch-prompts 32]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from common import interleaved_seconds, machine_fields

from minigpt import GPTConfig, GPTModel, generate
from minigpt.evaluation.perplexity import sliding_window_perplexity
from minigpt.generation.batch import generate_batch
from minigpt.generation.decoding import compile_for_decoding
from minigpt.jobs.evaluate import WIKITEXT2, text_token_ids
from minigpt.models import load, load_tokenizer
from minigpt.quantization.layers import QUANTIZED_LAYERS
from minigpt.quantization.model import quantize_model
from minigpt.runtime.runtime import has_fast_bfloat16

MATMULS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm",
            "mkldnn::_linear_pointwise")
TRAINED_PROMPTS = ("ROMEO:", "First Citizen:\nBefore we proceed", "The meaning of life is", "Once upon a time")
QUICK = dict(new_tokens=8, prompt_tokens=8, repeats=1, batch_prompts=8, batch_new_tokens=8, one_by_one_sample=2,
             perplexity_tokens=0)


def probe_buffer(megabytes: int = 1024) -> torch.Tensor:
    """A float32 buffer of ``megabytes``, far larger than the caches: summing it reads memory at the
    rate this machine can stream weights (the bandwidth probe)."""
    return torch.ones(megabytes * 2**20 // 4)


def best_read_bandwidth(buffer: torch.Tensor, repeats: int = 5) -> float:
    """Bytes per second of the fastest of ``repeats`` sums over ``buffer``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.nbytes / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights one decoding step reads (a tied matrix counted once; the
    position and token embeddings are looked up, one row each, so they are left out
    unless the token embedding is the tied output head; quantized layers as stored)."""
    looked_up = {id(model.pos_emb.weight)}
    if getattr(model.out_head, "weight", None) is not model.tok_emb.weight:  # untied, or a quantized head
        looked_up.add(id(model.tok_emb.weight))
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in looked_up)
    return dense + sum(m.quantized_bytes() for m in model.modules() if isinstance(m, QUANTIZED_LAYERS))


def same_greedy_tokens(reference: GPTModel, other: GPTModel, prompt: torch.Tensor, n: int) -> float:
    """Share of ``n`` greedy tokens of ``other`` equal to ``reference``'s at the same position."""
    start = prompt.shape[1]
    return (generate(reference, prompt, n)[0, start:] == generate(other, prompt, n)[0, start:]).float().mean().item()


def wikitext2_perplexity(model: GPTModel, tokens: int) -> float:
    """Perplexity on WikiText-2's first ``tokens`` test tokens, in separate windows of 256 (or the context)."""
    ids = text_token_ids(WIKITEXT2, max_tokens=tokens)
    window = min(256, model.cfg.context_length)
    return sliding_window_perplexity(model, ids, context_length=window, stride=window, batch_size=1).perplexity


def trained_checks(run: str, schemes: list[str], n: int, perplexity_tokens: int) -> dict[str, float]:
    """On the trained checkpoint ``run``: each scheme's share of greedy tokens equal to float32's
    (``n`` tokens after each of TRAINED_PROMPTS), and WikiText-2 perplexities."""
    model = load(run).eval()
    tokenizer = load_tokenizer(run)
    prompts = [torch.tensor([tokenizer.encode(text)]) for text in TRAINED_PROMPTS]
    checks = {}
    for scheme in schemes:
        quantized = quantize_model(load(run).eval(), scheme)
        shares = [same_greedy_tokens(model, quantized, prompt, n) for prompt in prompts]
        checks[f"trained_{scheme}_same_greedy_tokens"] = round(sum(shares) / len(shares), 3)
        if perplexity_tokens:
            perplexity = wikitext2_perplexity(quantized, perplexity_tokens)
            checks[f"trained_{scheme}_wikitext2_perplexity"] = round(perplexity, 2)
    if perplexity_tokens:
        checks["trained_float32_wikitext2_perplexity"] = round(wikitext2_perplexity(model, perplexity_tokens), 2)
    return checks


def matmul_share(run: Callable[[], object]) -> float:
    """Share of the operator time (self CPU time, profiled over one ``run()``) spent in matrix products."""
    from torch.profiler import profile

    with profile() as prof:
        run()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / total


def compile_seconds(first: Callable[[], object], again: Callable[[], object]) -> float:
    """Seconds the first call of a freshly compiled model spends compiling: its time minus a later call's."""
    start = time.perf_counter()
    first()
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    again()
    return first_s - (time.perf_counter() - start)


def batch_prompts(count: int, tokens: int, vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(max(1, tokens // 2), 2 * tokens + 1, (count,), generator=gen)
    return [torch.randint(0, vocab_size, (int(n),), generator=gen).tolist() for n in lengths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-prompts", type=int, default=32)
    parser.add_argument("--batch-new-tokens", type=int, default=128)
    parser.add_argument("--one-by-one-sample", type=int, default=4)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 rows (default: where the CPU has native bfloat16, not with --quick)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile rows (default: yes, not with --quick)")
    parser.add_argument("--quantize", nargs="*", default=["int8", "int4"], choices=("int8", "int4"),
                        help="weight-only schemes to decode with (speed, greedy agreement, perplexity)")
    parser.add_argument("--perplexity-tokens", type=int, default=512,
                        help="WikiText-2 tokens scored by float32 and each --quantize scheme (0: none)")
    parser.add_argument("--trained", metavar="RUN",
                        help="a trained checkpoint on which to also measure each scheme's greedy agreement")
    parser.add_argument("--batch-1-only", action="store_true",
                        help="only the batch-1 cached rows: no uncached, batched or one-by-one runs")
    parser.add_argument("--quick", action="store_true", help="a seconds-long check that it runs (tiny model)")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    bf16 = (has_fast_bfloat16("cpu", rows=1) and not args.quick) if args.bf16 is None else args.bf16
    compiling = not args.quick if args.compile is None else args.compile

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tiny = dict(emb_dim=64, n_layers=2, n_heads=4, vocab_size=1000) if args.quick else {}
    cfg = GPTConfig.from_preset(args.preset, qkv_bias=True, tie_weights=True, drop_rate=0.0, **tiny)
    ours = GPTModel(cfg).eval()
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
        n_layer=cfg.n_layers, n_head=cfg.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    hf = GPT2LMHeadModel(hf_cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_tokens))
    n = args.new_tokens
    prompts = batch_prompts(args.batch_prompts, args.prompt_tokens, cfg.vocab_size)
    sample = prompts[:args.one_by_one_sample]
    m = args.batch_new_tokens

    runs = {
        "cached": lambda: generate(ours, prompt, n, use_cache=True),
        "transformers": lambda: hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
            max_new_tokens=n, min_new_tokens=n, pad_token_id=0),
    }
    if not args.batch_1_only:
        runs["uncached"] = lambda: generate(ours, prompt, n, use_cache=False)
        runs["batched"] = lambda: generate_batch(ours, prompts, m)
        runs["one_by_one"] = lambda: [generate(ours, torch.tensor([p]), m) for p in sample]
    if bf16:
        half = copy_of(ours, cfg).to(torch.bfloat16)
        runs["bf16_cached"] = lambda: generate(half, prompt, n, use_cache=True)
        if not args.batch_1_only:
            runs["bf16_batched"] = lambda: generate_batch(half, prompts, m)
    quantized = {scheme: quantize_model(copy_of(ours, cfg), scheme) for scheme in args.quantize}
    for scheme, model in quantized.items():
        runs[f"{scheme}_cached"] = lambda model=model: generate(model, prompt, n, use_cache=True)
    # The probe takes its turns with the decoding runs: on a shared machine the memory's rate moves
    # from minute to minute, and a share is only meaningful against the rate of the same moments.
    probe = probe_buffer(256 if args.quick else 1024)
    runs["bandwidth_probe"] = probe.sum
    with torch.inference_mode():
        compiled = {}
        if compiling and not args.batch_1_only:
            fast = compile_for_decoding(ours)
            runs["compiled_cached"] = lambda: generate(fast, prompt, n, use_cache=True)
            runs["compiled_batched"] = lambda: generate_batch(fast, prompts, m)
            compiled["compile_s"] = round(compile_seconds(runs["compiled_cached"], runs["compiled_cached"]), 1)
            compiled["compile_batched_s"] = round(
                compile_seconds(runs["compiled_batched"], runs["compiled_batched"]), 1)
        seconds = interleaved_seconds(runs, args.repeats)
        checks = bf16_checks(ours, half, prompt, n) if bf16 else {}
        checks.update(quantized_checks(ours, quantized, prompt, n, args.perplexity_tokens))
        if args.trained:
            checks.update(trained_checks(args.trained, args.quantize, n, args.perplexity_tokens))
        shares = {"minigpt_matmul_share": round(matmul_share(runs["cached"]), 3),
                  "transformers_matmul_share": round(matmul_share(runs["transformers"]), 3)}
    cached, hf_rate = n / seconds["cached"], n / seconds["transformers"]
    for scheme, model in quantized.items():
        rate = n / seconds[f"{scheme}_cached"]
        checks[f"{scheme}_kv_cache_tok_s"] = round(rate, 2)
        checks[f"{scheme}_vs_transformers"] = round(rate / hf_rate, 3)
        checks[f"{scheme}_weight_mb_per_token"] = round(weight_bytes(model) / 1e6, 1)
    if not args.batch_1_only:
        uncached = n / seconds["uncached"]
        batched = len(prompts) * m / seconds["batched"]
        one_by_one = len(sample) * m / seconds["one_by_one"]
        checks.update({
            "minigpt_no_cache_tok_s": round(uncached, 2),
            "kv_cache_vs_no_cache": round(cached / uncached, 3),
            "batched_prompts": len(prompts),
            "batched_new_tokens": m,
            "batched_tok_s": round(batched, 2),
            "one_by_one_tok_s": round(one_by_one, 2),
            "batched_vs_one_by_one": round(batched / one_by_one, 3),
            "bf16_batched_tok_s": round(len(prompts) * m / seconds["bf16_batched"], 2) if bf16 else None,
        })
    if "compiled_cached" in seconds:
        compiled["compiled_kv_cache_tok_s"] = round(n / seconds["compiled_cached"], 2)
        compiled["compile_speedup"] = round(seconds["cached"] / seconds["compiled_cached"], 3)
        compiled["compiled_kv_cache_vs_transformers"] = round(n / seconds["compiled_cached"] / hf_rate, 3)
        compiled["compiled_batched_tok_s"] = round(len(prompts) * m / seconds["compiled_batched"], 2)
        compiled["compile_batched_speedup"] = round(seconds["batched"] / seconds["compiled_batched"], 3)
    bandwidth = probe.nbytes / seconds["bandwidth_probe"]  # median, as the decoding rates
    best_bandwidth = best_read_bandwidth(probe)
    weights_per_s = weight_bytes(ours) * cached

    print(json.dumps({
        "bench": "generate",
        **machine_fields(),
        "shape": "tiny (--quick)" if args.quick else args.preset,
        "batch": 1,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": n,
        "threads": torch.get_num_threads(),
        "minigpt_kv_cache_tok_s": round(cached, 2),
        "transformers_tok_s": round(hf_rate, 2),
        "kv_cache_vs_transformers": round(cached / hf_rate, 3),
        "weight_mb_per_token": round(weight_bytes(ours) / 1e6, 1),
        "weight_gb_s": round(weights_per_s / 1e9, 2),
        "bandwidth_probe_gb_s": round(bandwidth / 1e9, 2),
        "bandwidth_share": round(weights_per_s / bandwidth, 3),
        "bandwidth_probe_best_gb_s": round(best_bandwidth / 1e9, 2),
        "bandwidth_share_of_best_probe": round(weights_per_s / best_bandwidth, 3),
        **shares,
        "bf16_kv_cache_tok_s": round(n / seconds["bf16_cached"], 2) if bf16 else None,
        "bf16_kv_cache_vs_transformers": round(n / seconds["bf16_cached"] / hf_rate, 3) if bf16 else None,
        **checks,
        **compiled,
    }))


def copy_of(model: GPTModel, cfg: GPTConfig) -> GPTModel:
    copy = GPTModel(cfg).eval()
    copy.load_state_dict(model.state_dict())
    return copy


def quantized_checks(ours: GPTModel, quantized: dict[str, GPTModel], prompt: torch.Tensor, n: int,
                     perplexity_tokens: int) -> dict[str, float]:
    """Each scheme's share of greedy tokens equal to float32's, and WikiText-2 perplexities."""
    checks = {f"{scheme}_same_greedy_tokens": round(same_greedy_tokens(ours, model, prompt, n), 3)
              for scheme, model in quantized.items()}
    if perplexity_tokens and quantized:
        checks["float32_wikitext2_perplexity"] = round(wikitext2_perplexity(ours, perplexity_tokens), 2)
        for scheme, model in quantized.items():
            checks[f"{scheme}_wikitext2_perplexity"] = round(wikitext2_perplexity(model, perplexity_tokens), 2)
    return checks


def bf16_checks(ours: GPTModel, half: GPTModel, prompt: torch.Tensor, n: int) -> dict[str, float]:
    """How far bfloat16 weights move the outputs: the largest logit difference on the prompt
    (next to the logits' spread), and the share of ``n`` greedy tokens equal to float32's."""
    full = ours(prompt)
    same = generate(ours, prompt, n)[0, prompt.shape[1]:] == generate(half, prompt, n)[0, prompt.shape[1]:]
    return {
        "bf16_max_logit_diff": round((half(prompt).float() - full).abs().max().item(), 4),
        "float32_logit_std": round(full.std().item(), 4),
        "bf16_same_greedy_tokens": round(same.float().mean().item(), 3),
    }


if __name__ == "__main__":
    main()
