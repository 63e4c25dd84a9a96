"""Generation: greedy, sampling filters, KV cache equivalence (also past the context length)."""

import pytest
import torch

from minigpt.config import GPTConfig
from minigpt.generation import generate, sample_next_token, stream_generate
from minigpt.model import GPTModel

CFG = GPTConfig(vocab_size=50, context_length=12, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1)


@pytest.fixture
def model():
    torch.manual_seed(1)
    return GPTModel(CFG)


def test_greedy_appends_the_argmax_of_the_last_position(model):
    idx = torch.tensor([[1, 2, 3]])
    out = generate(model, idx, max_new_tokens=1, use_cache=False)
    with torch.no_grad():
        expected = model.eval()(idx)[0, -1].argmax()
    assert out.shape == (1, 4)
    assert torch.equal(out[:, :3], idx)
    assert out[0, 3] == expected


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("prompt_len", [1, 5, 12])
def test_kv_cache_gives_exactly_the_no_cache_tokens_even_past_the_context(model, use_sdpa, prompt_len):
    model.set_attention_impl(use_sdpa)
    idx = torch.randint(0, 50, (3, prompt_len))
    # 30 new tokens: the 12-token window slides many times.
    cached = generate(model, idx, max_new_tokens=30, use_cache=True)
    plain = generate(model, idx, max_new_tokens=30, use_cache=False)
    assert cached.shape == (3, prompt_len + 30)
    assert torch.equal(cached, plain)


def test_prompt_longer_than_the_context_uses_its_last_tokens(model):
    long_prompt = torch.randint(0, 50, (1, 40))
    out = generate(model, long_prompt, max_new_tokens=3)
    again = generate(model, long_prompt[:, -12:], max_new_tokens=3)
    assert torch.equal(out[:, 40:], again[:, 12:])


def test_generate_restores_training_mode_and_empties_the_cache(model):
    model.train()
    generate(model, torch.tensor([[1]]), max_new_tokens=5)
    assert model.training
    assert model.cache_pos == 0
    assert all(b.att.cache_k is None for b in model.trf_blocks)


def test_stream_yields_the_same_tokens_as_generate(model):
    idx = torch.tensor([[4, 5, 6]])
    streamed = torch.cat(list(stream_generate(model, idx, 8)), dim=1)
    assert torch.equal(streamed, generate(model, idx, 8)[:, 3:])


def test_eos_stops_generation(model):
    idx = torch.tensor([[4, 5, 6]])
    first = generate(model, idx, 1)[0, -1].item()
    out = generate(model, idx, 20, eos_id=first)
    assert out.shape == (1, 4)


def test_eos_pads_finished_rows_in_a_batch():
    logits = torch.tensor([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])
    assert sample_next_token(logits).tolist() == [[1], [0]]


def test_top_k_only_samples_the_k_best():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]]).repeat(500, 1)
    draws = sample_next_token(logits, temperature=5.0, top_k=2)
    assert set(draws.flatten().tolist()) == {1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().repeat(1000, 1)
    # 0.5 + 0.3 >= 0.75: tokens 0 and 1 remain.
    draws = sample_next_token(logits, temperature=1.0, top_p=0.75)
    assert set(draws.flatten().tolist()) == {0, 1}
    only_best = sample_next_token(logits, temperature=1.0, top_p=0.4)
    assert set(only_best.flatten().tolist()) == {0}


def test_temperature_sampling_follows_the_softmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.2, 0.8]])).repeat(20000, 1)
    share = sample_next_token(logits, temperature=1.0, generator=gen).float().mean().item()
    assert abs(share - 0.8) < 0.02
    # Temperature 0.5 squares the odds: 0.8^2 / (0.8^2 + 0.2^2) = 0.941...
    sharp = sample_next_token(logits, temperature=0.5, generator=gen).float().mean().item()
    assert abs(sharp - 0.64 / 0.68) < 0.02


def test_sampling_with_a_seeded_generator_is_reproducible(model):
    idx = torch.tensor([[1, 2]])
    a = generate(model, idx, 10, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(3))
    b = generate(model, idx, 10, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": -1.0}, "temperature"), ({"temperature": 1.0, "top_k": 0}, "top_k"),
     ({"temperature": 1.0, "top_p": 1.5}, "top_p"), ({"context_size": 13}, "context_size")],
)
def test_invalid_settings_are_clear_errors(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, torch.tensor([[1]]), 2, **kwargs)
