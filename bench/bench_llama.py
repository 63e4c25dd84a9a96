"""LlamaModel against transformers' LlamaForCausalLM, same weights, same run, taking turns.

On random weights of the SmolLM2-135M shape (``--layers`` fewer to go faster): training
tokens/s (forward + backward + AdamW step on ``--batch`` x ``--tokens``) and cached greedy
decoding tokens/s (batch 1, ``--new-tokens`` after a ``--prompt-tokens`` prompt), each the
median of ``--repeats`` runs, and the ratios minigpt / transformers (>= 1.0 means as fast).
Also the KV cache's bytes per token of one sequence in float32: GPT-2-124M (12 layers x
12 heads x 64) against SmolLM2-135M (30 layers x 3 key/value heads x 64), computed from
the configs. Prints one JSON line.

    python bench/bench_llama.py [--layers 30] [--batch 4] [--tokens 256] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable

import torch
from common import interleaved_seconds, machine_fields

from minigpt import GPTConfig
from minigpt.generation.generate import generate
from minigpt.models.llama.config import PRESETS, LlamaConfig
from minigpt.models.llama.model import LlamaModel


def models(layers: int) -> tuple[LlamaModel, torch.nn.Module]:
    """Ours and transformers', with the same random weights (copied through the Hugging Face names)."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    from minigpt.models.llama.hf_layout import llama_to_hf

    cfg = dataclasses.replace(LlamaConfig.from_preset("smollm2-135m"), n_layers=layers)
    torch.manual_seed(0)
    ours = LlamaModel(cfg)
    theirs = LlamaForCausalLM(HFConfig(**{**PRESETS["smollm2-135m"], "num_hidden_layers": layers}))
    missing, unexpected = theirs.load_state_dict(llama_to_hf(ours), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    theirs.tie_weights()
    return ours, theirs


def training_step(model: torch.nn.Module, ids: torch.Tensor, hf: bool) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        logits = model(ids).logits if hf else model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30, help="blocks (SmolLM2-135M has 30)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256, help="training sequence length")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    ours, theirs = models(args.layers)
    ids = torch.randint(0, ours.cfg.vocab_size, (args.batch, args.tokens), generator=torch.Generator().manual_seed(1))
    ours.train(), theirs.train()
    train = interleaved_seconds({"minigpt": training_step(ours, ids, False),
                                 "transformers": training_step(theirs, ids, True)}, args.repeats)
    ours.eval(), theirs.eval()
    prompt = ids[:1, :args.prompt_tokens]
    with torch.no_grad():
        decode = interleaved_seconds({
            "minigpt": lambda: generate(ours, prompt, args.new_tokens, use_cache=True),
            "transformers": lambda: theirs.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                                    max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                                    pad_token_id=0),
        }, args.repeats)
    train_rate = {k: args.batch * args.tokens / s for k, s in train.items()}
    decode_rate = {k: args.new_tokens / s for k, s in decode.items()}
    gpt2 = GPTConfig.from_preset("gpt2-small")
    with torch.device("meta"):
        smol = LlamaModel("smollm2-135m").float()
    print(json.dumps({
        **machine_fields(),
        "shape": f"smollm2-135m ({args.layers} layers)", "threads": torch.get_num_threads(),
        "train_tokens_per_s": train_rate, "train_ratio": train_rate["minigpt"] / train_rate["transformers"],
        "decode_tokens_per_s": decode_rate, "decode_ratio": decode_rate["minigpt"] / decode_rate["transformers"],
        "kv_cache_bytes_per_token": {"gpt2-124m": 2 * gpt2.n_layers * gpt2.emb_dim * 4,
                                     "smollm2-135m": smol.kv_cache_bytes_per_token()},
    }))


if __name__ == "__main__":
    main()
