"""Generation: greedy, sampling filters, KV cache equivalence (also past the context length),
end-of-text, option checks, long prompts, and streaming text without broken characters.
Batches of prompts of different lengths and log-probabilities: test_generation_batches.py."""

import logging

import pytest
import torch
import torch.nn.functional as F

from minigpt.generation.generate import generate, stream_generate
from minigpt.generation.sampling import check_sampling, sample_next_token
from minigpt.generation.text import IncrementalDecoder, truncate_prompt
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.model import GPTModel
from minigpt.tokenizers.gpt2 import get_gpt2_tokenizer

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


def test_prompt_longer_than_the_context_uses_its_last_tokens(model, caplog):
    long_prompt = torch.randint(0, 50, (1, 40))
    with caplog.at_level(logging.WARNING, logger="minigpt.generation.generate"):
        out = generate(model, long_prompt, max_new_tokens=3)
    assert [r.getMessage() for r in caplog.records] == [
        "the prompt has 40 tokens, more than the context of 12: its first 28 tokens are dropped"]
    assert torch.equal(out[:, :40], long_prompt)  # the returned sequence keeps the whole prompt
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="minigpt.generation.generate"):
        again = generate(model, long_prompt[:, -12:], max_new_tokens=3)
    assert caplog.records == []  # a prompt that fits is not mentioned
    assert torch.equal(out[:, 40:], again[:, 12:])


def test_truncate_prompt_keeps_the_last_tokens_and_counts_the_dropped():
    assert truncate_prompt([1, 2, 3, 4, 5], 3) == ([3, 4, 5], 2)
    assert truncate_prompt([1, 2], 3) == ([1, 2], 0)
    ids, dropped = truncate_prompt(torch.arange(10).reshape(2, 5), 2)
    assert ids.tolist() == [[3, 4], [8, 9]] and dropped == 3
    with pytest.raises(ValueError, match="context_length"):
        truncate_prompt([1], 0)


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


class CountingModel(GPTModel):
    """A model whose logits we control: after id ``t`` greedy decoding picks ``t + 1``."""

    def forward(self, in_idx, use_cache=False, **kwargs):
        if use_cache:
            self.cache_pos += in_idx.shape[1]
        return 10.0 * F.one_hot((in_idx + 1) % self.cfg.vocab_size, self.cfg.vocab_size).float()


def test_greedy_picks_each_rows_argmax():
    logits = torch.tensor([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])
    assert sample_next_token(logits).tolist() == [[1], [0]]


@pytest.mark.parametrize("use_cache", [True, False])
def test_eos_pads_finished_rows_in_a_batch(use_cache):
    counter = CountingModel(CFG)
    idx = torch.tensor([[5], [1]])
    assert generate(counter, idx, 4, use_cache=use_cache).tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]]
    out = generate(counter, idx, 10, eos_id=7, use_cache=use_cache)
    # Row 0 reaches end-of-text at its second token and is padded with it (the model alone
    # would go on 8, 9, ...); row 1 goes on until it emits end-of-text too, then both stop.
    assert out.tolist() == [[5, 6, 7, 7, 7, 7, 7], [1, 2, 3, 4, 5, 6, 7]]
    streamed = [t.tolist() for t in stream_generate(counter, idx, 10, eos_id=7, use_cache=use_cache)]
    assert streamed == [[[6], [2]], [[7], [3]], [[7], [4]], [[7], [5]], [[7], [6]], [[7], [7]]]


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


@pytest.mark.parametrize("settings", [dict(temperature=1e-40), dict(temperature=1e-50), dict(temperature=1e-30),
                                      dict(temperature=1.0, top_p=1e-50), dict(temperature=1e-40, top_p=1e-50)])
def test_settings_that_underflow_float32_sample_the_best_token(settings):
    # 30 / 1e-40 overflows float32 to inf, and 1e-50 rounds to 0: a NaN probability made multinomial raise
    logits = torch.tensor([[1.0, 30.0, 29.0, -5.0]]).repeat(50, 1)
    assert set(sample_next_token(logits, **settings).flatten().tolist()) == {1}


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
     ({"temperature": 1.0, "top_p": 1.5}, "top_p"), ({"context_size": 13}, "context_size"),
     ({"max_new_tokens": -5}, "max_new_tokens")],
)
def test_invalid_settings_are_clear_errors(model, kwargs, message):
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, torch.tensor([[1]]), **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": -1}, "temperature must be 0 \\(greedy decoding\\) or more, got -1"),
     ({"temperature": float("nan")}, "temperature"),
     ({"top_k": 0}, "top_k must be a whole number of at least 1"), ({"top_k": 2.5}, "top_k"),
     ({"top_p": 1.5}, "top_p must be more than 0 and at most 1"), ({"top_p": 0.0}, "top_p"),
     ({"max_new_tokens": -5}, "max_new_tokens must be 0 or more, got -5")],
)
def test_check_sampling_names_the_option_out_of_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_sampling(**kwargs)


def test_check_sampling_accepts_every_valid_setting():
    check_sampling()
    check_sampling(temperature=0.0, top_k=1, top_p=1.0, max_new_tokens=0)
    check_sampling(temperature=1.5, top_k=50, top_p=0.9, max_new_tokens=100)


# --- streaming text ---------------------------------------------------------------------

@pytest.mark.parametrize("text", ["Hi 😀 there", "你好，世界", "naïve café 🤖<|endoftext|>"])
def test_streamed_text_never_breaks_a_character(text):
    tokenizer = get_gpt2_tokenizer()
    ids = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    assert "\ufffd" in "".join(tokenizer.decode([i]) for i in ids)  # token by token it would
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_bytes_of_an_unfinished_character_wait_for_the_next_token():
    tokenizer = get_gpt2_tokenizer()
    ids = tokenizer.encode("Hi 😀 there")  # the emoji's four bytes are split 3 + 1 over two tokens
    assert [tokenizer.decode_bytes([i]) for i in ids] == [b"Hi", b" \xf0\x9f\x98", b"\x80", b" there"]
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.add(i) for i in ids] == ["Hi", " ", "😀", " there"]
    assert decoder.flush() == ""


def test_incremental_decoder_takes_tensors_and_starts_afresh_after_flush():
    tokenizer = get_gpt2_tokenizer()
    ids = tokenizer.encode("😀😀")
    decoder = IncrementalDecoder(tokenizer)
    assert decoder.add(torch.tensor([ids[:-1]])) + decoder.add(torch.tensor([[ids[-1]]])) == "😀😀"
    assert decoder.flush() == ""
    assert decoder.add(ids[:1]) == "" and decoder.flush() == "\ufffd"  # an unfinished character, shown
    assert decoder.add(ids) == "😀😀"


class DecodeOnly:
    """A byte-level tokenizer that offers ``decode`` but not ``decode_bytes``."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode


def test_incremental_decoder_without_decode_bytes_holds_back_replacement_characters(char_tokenizer):
    tokenizer = DecodeOnly(get_gpt2_tokenizer())
    ids = get_gpt2_tokenizer().encode("a 🤖 b 你好")
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == "a 🤖 b 你好"
    assert not any("\ufffd" in piece for piece in pieces)
    chars = IncrementalDecoder(char_tokenizer)
    assert [chars.add(i) for i in char_tokenizer.encode("héllo")] == list("héllo")


def test_streaming_a_generation_gives_the_decoded_continuation(model, char_tokenizer):
    idx = torch.tensor([[4, 5, 6]])
    decoder = IncrementalDecoder(char_tokenizer)
    text = "".join(decoder.add(token) for token in stream_generate(model, idx, 8)) + decoder.flush()
    assert text == char_tokenizer.decode(generate(model, idx, 8)[0, 3:].tolist())
