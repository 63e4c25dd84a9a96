"""compile_for_decoding: one compilation for the prompt and one for every later step, the eager
model's tokens, and an eager fallback with one warning where compiling fails.

The graph-count tests trace with TorchDynamo but hand the graphs to its "eager" backend
(no C++ compilation), which keeps them fast; the inductor test is marked slow.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch._dynamo.exc import TorchDynamoException
from torch._dynamo.utils import counters

from minigpt import GPTConfig, GPTModel, generate
from minigpt.generation.batch import generate_batch
from minigpt.generation.decoding import DecodingModel, compile_for_decoding
from minigpt.models.llama.config import LlamaConfig
from minigpt.models.llama.model import LlamaModel

CFG = GPTConfig(vocab_size=97, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True)


@pytest.fixture
def model() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(CFG).eval()


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def prompt(tokens: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))


def llama() -> LlamaModel:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=CFG.vocab_size, emb_dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                      context_length=64)
    return LlamaModel(cfg).eval()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_two_graphs_serve_every_step_and_give_the_eager_tokens(model, fresh_dynamo, family):
    model = llama() if family == "llama" else model
    fast = compile_for_decoding(model, backend="eager")
    ids = prompt(5)
    # 40 different cache lengths: torch.compile's defaults would compile again at each one.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither a fallback warning nor a recompile-limit one
        got = generate(fast, ids, 40)
    assert torch.equal(got, generate(model, ids, 40))
    assert fresh_dynamo["stats"]["unique_graphs"] == 2  # the prompt, then one new token
    assert not fresh_dynamo["graph_break"]  # each step is one whole graph


@pytest.mark.slow
def test_a_generation_past_the_caches_first_capacity_still_takes_two_graphs(fresh_dynamo):
    torch.manual_seed(0)
    model = GPTModel(dataclasses.replace(CFG, context_length=256)).eval()
    fast = compile_for_decoding(model, backend="eager")
    ids = prompt(5)
    got = generate(fast, ids, 100)  # the cache grows from 64 to 128 tokens on the way
    assert torch.equal(got, generate(model, ids, 100))
    assert fresh_dynamo["stats"]["unique_graphs"] == 2  # the growth happens outside the compiled step


@pytest.mark.slow
def test_new_prompt_lengths_and_a_sliding_window_compile_nothing_new(model, fresh_dynamo):
    fast = compile_for_decoding(model, backend="eager")

    def run(lengths):
        for tokens in lengths:  # 60 + 10 passes the context of 64: the window slides
            ids = prompt(tokens, seed=tokens)
            assert torch.equal(generate(fast, ids, 10), generate(model, ids, 10))
        return fresh_dynamo["stats"]["unique_graphs"]

    graphs = run((3, 60))  # a few paths: prompt, step, the slide's recomputed window
    assert run((7, 12, 58, 61)) == graphs  # other lengths reuse them


@pytest.mark.slow
def test_padded_batches_through_the_compiled_model_equal_eager(model, fresh_dynamo):
    fast = compile_for_decoding(model, backend="eager")
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9], [10, 11, 12, 13]]
    assert generate_batch(fast, prompts, 12) == generate_batch(model, prompts, 12)
    assert not fresh_dynamo["graph_break"]


def test_a_compiler_failure_falls_back_to_eager_with_one_warning(model, monkeypatch):
    def failing(*args, **kwargs):
        raise TorchDynamoException("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda module, **options: failing)
    fast = compile_for_decoding(model)
    ids = prompt(4)
    with pytest.warns(UserWarning, match="torch.compile failed.*no C\\+\\+ compiler found") as caught:
        got = generate(fast, ids, 6)
    assert len(caught) == 1  # later calls stay eager silently
    assert torch.equal(got, generate(model, ids, 6))


def test_a_refusal_at_once_returns_the_model_itself(model, monkeypatch):
    def refuse(module, **options):
        raise RuntimeError("Python 3.99 is not supported")

    monkeypatch.setattr(torch, "compile", refuse)
    with pytest.warns(UserWarning, match="Python 3.99 is not supported"):
        assert compile_for_decoding(model) is model


def test_the_wrapper_is_the_model_for_everything_but_the_call(model):
    fast = compile_for_decoding(model, backend="eager")
    assert isinstance(fast, DecodingModel)
    assert fast.cfg is model.cfg and fast.device == model.device and fast.cache_pos == 0
    model.train()
    fast.eval()
    assert not model.training
    assert fast.reset_kv_cache.__self__ is model


@pytest.mark.slow
def test_inductor_compiled_decoding_keeps_the_tokens(model, fresh_dynamo):
    fast = compile_for_decoding(model)  # the default backend: C++ kernels (needs a compiler)
    ids = prompt(6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = generate(fast, ids, 30)
    assert torch.equal(got, generate(model, ids, 30))
    assert fresh_dynamo["stats"]["unique_graphs"] == 2
