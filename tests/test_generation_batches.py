"""Prompts of different lengths in one batch (left padding, attention mask), generate_batch,
the log-probabilities of each step, and token_logprobs: each padded row as its prompt alone,
and transformers with the same weights as the reference."""

import logging

import pytest
import torch
from test_generation import CFG, CountingModel

from minigpt.generation.batch import generate_batch, pad_prompts, token_logprobs
from minigpt.generation.generate import generate, stream_generate, stream_steps
from minigpt.models.gpt2.model import GPTModel


@pytest.fixture
def model():
    torch.manual_seed(1)
    return GPTModel(CFG)


# --- prompts of different lengths -------------------------------------------------------

def prompts_of_lengths(*lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (n,), generator=gen).tolist() for n in lengths]


def test_pad_prompts_pads_on_the_left():
    ids, mask = pad_prompts([[7, 8, 9], [4], torch.tensor([1, 2])], pad_id=0)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 4], [0, 1, 2]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pad_prompts([[1], []], pad_id=0)
    with pytest.raises(ValueError, match="no prompts"):
        pad_prompts([], pad_id=0)


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("new_tokens", [6, 20], ids=["within", "past the context"])
def test_each_padded_row_equals_generating_its_prompt_alone(model, use_sdpa, use_cache, new_tokens):
    model.set_attention_impl(use_sdpa)
    prompts = prompts_of_lengths(3, 9, 1, 12)
    ids, mask = pad_prompts(prompts, pad_id=49)
    out = generate(model, ids, new_tokens, use_cache=use_cache, attention_mask=mask)
    for row, prompt in zip(out, prompts, strict=True):
        alone = generate(model, torch.tensor([prompt]), new_tokens, use_cache=use_cache)
        assert row[12:].tolist() == alone[0, len(prompt):].tolist()


def test_generate_batch_equals_one_by_one_in_the_given_order(model):
    prompts = prompts_of_lengths(5, 2, 11, 2, 7, 1)
    alone = [generate(model, torch.tensor([p]), 8)[0, len(p):].tolist() for p in prompts]
    assert generate_batch(model, prompts, 8) == alone
    assert generate_batch(model, prompts, 8, batch_size=4, progress=True) == alone
    assert generate_batch(model, prompts, 8, batch_size=1, use_cache=False) == alone
    assert generate_batch(model, prompts, 0) == [[]] * 6 and generate_batch(model, [], 3) == []
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        generate_batch(model, prompts, 2, batch_size=0)


def test_generate_batch_cuts_each_answer_after_end_of_text():
    counter = CountingModel(CFG)
    answers = generate_batch(counter, [[5], [1, 2], [30]], 6, eos_id=7)
    assert answers == [[6, 7], [3, 4, 5, 6, 7], [31, 32, 33, 34, 35, 36]]


def test_several_end_ids_any_of_them_ends_a_row():
    """Llama-3 configs list several end ids: a row ends at the first of any, and a finished
    row is filled with the first id of the list."""
    counter = CountingModel(CFG)
    out = generate(counter, torch.tensor([[5], [1]]), 10, eos_id=[9, 3])
    assert out.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 9, 9]]
    assert generate(counter, torch.tensor([[5]]), 6, eos_id=(7,)).tolist() == generate(
        counter, torch.tensor([[5]]), 6, eos_id=7).tolist()
    answers = generate_batch(counter, [[5], [1, 2], [30]], 6, eos_id=iter([33, 4]))
    assert answers == [[6, 7, 8, 9, 10, 11], [3, 4], [31, 32, 33]]
    with pytest.raises(ValueError, match="eos_id is an empty collection"):
        generate(counter, torch.tensor([[5]]), 3, eos_id=[])


def test_generate_batch_cuts_long_prompts_to_the_context(model, caplog):
    prompts = prompts_of_lengths(3, 40)
    with caplog.at_level(logging.WARNING, logger="minigpt.generation.generate"):
        out = generate_batch(model, prompts, 4)
    assert [r.getMessage() for r in caplog.records] == [
        "prompt 1 has 40 tokens, more than the context of 12: its first 28 tokens are dropped"]
    assert out[1] == generate(model, torch.tensor([prompts[1][-12:]]), 4)[0, 12:].tolist()


def test_seeded_sampling_of_a_padded_batch_is_reproducible(model):
    ids, mask = pad_prompts(prompts_of_lengths(2, 6, 4), pad_id=0)
    runs = [generate(model, ids, 10, temperature=1.0, top_k=20, attention_mask=mask,
                     generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    # A mask without padding gives what no mask gives, draw for draw.
    ids = ids[1:2]
    with_mask = generate(model, ids, 10, temperature=1.0, attention_mask=torch.ones_like(ids),
                         generator=torch.Generator().manual_seed(5))
    assert torch.equal(with_mask, generate(model, ids, 10, temperature=1.0, generator=torch.Generator().manual_seed(5)))


def test_mask_of_another_shape_is_named(model):
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of idx \(1, 3\)"):
        generate(model, torch.tensor([[1, 2, 3]]), 2, attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="padding on the left"):
        generate(model, torch.tensor([[1, 2, 3]]), 2, attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="token id 50 is outside the vocabulary"):
        generate(model, torch.tensor([[1, 50]]), 2)
    with pytest.raises(ValueError, match=r"top_logprobs must be in \[0, 50\], got 51"):
        next(stream_steps(model, torch.tensor([[1]]), 2, top_logprobs=51))


def test_bfloat16_weights_generate_padded_batches_close_to_float32(model):
    half = GPTModel(CFG)
    half.load_state_dict(model.state_dict())
    half.to(torch.bfloat16).eval()
    ids, mask = pad_prompts(prompts_of_lengths(3, 8), pad_id=0)
    with torch.no_grad():
        diff = (half(ids, attention_mask=mask).float() - model.eval()(ids, attention_mask=mask)).abs()
    assert diff[mask.bool()].max() < 0.05  # bfloat16 keeps 8 bits of mantissa
    steps = list(stream_steps(half, ids, 4, attention_mask=mask, top_logprobs=2))
    assert all(s.logprobs.dtype == torch.float32 and s.top_logprobs.isfinite().all() for s in steps)


# --- log-probabilities -------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_steps_carry_the_log_probabilities_of_the_model(model, temperature):
    ids, mask = pad_prompts(prompts_of_lengths(4, 7), pad_id=0)
    settings = dict(temperature=temperature, attention_mask=mask)
    steps = list(stream_steps(model, ids, 5, top_logprobs=3, generator=torch.Generator().manual_seed(1), **settings))
    out = torch.cat([ids, *[s.ids for s in steps]], dim=1)
    out_mask = torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        logp = torch.log_softmax(model.eval()(out[:, :-1], attention_mask=out_mask[:, :-1]), dim=-1)[:, 6:]
    for t, step in enumerate(steps):
        assert step.ids.shape == (2, 1) and step.logprobs.shape == (2,) and step.top_ids.shape == (2, 3)
        assert torch.allclose(step.logprobs, logp[:, t].gather(-1, step.ids).squeeze(-1), atol=1e-5)
        best = logp[:, t].topk(3)
        assert torch.equal(step.top_ids, best.indices)
        assert torch.allclose(step.top_logprobs, best.values, atol=1e-5)
        if temperature == 0.0:
            assert torch.equal(step.ids[:, 0], step.top_ids[:, 0])
    assert next(stream_steps(model, ids, 1)).top_ids.shape == (2, 0)
    streamed = stream_generate(model, ids, 5, generator=torch.Generator().manual_seed(1), **settings)
    assert torch.equal(torch.cat(list(streamed), dim=1), out[:, 7:])  # the same tokens, ids only


def test_token_logprobs_gather_the_log_softmax(model):
    ids = torch.randint(0, 50, (3, 13))  # context_length + 1: the last id is only a target
    scores, greedy = token_logprobs(model, ids, return_greedy=True)
    with torch.no_grad():
        logp = torch.log_softmax(model.eval()(ids[:, :-1]), dim=-1)
    assert scores.shape == greedy.shape == (3, 12)
    for b in range(3):
        for t in range(1, 13):
            assert abs(scores[b, t - 1] - logp[b, t - 1, ids[b, t]]) < 1e-5
            assert greedy[b, t - 1] == (logp[b, t - 1].argmax() == ids[b, t])
    # A padded row scores its real tokens as alone, and 0 where padding is involved.
    padded, mask = pad_prompts([ids[0, 5:].tolist(), ids[1].tolist()], pad_id=0)
    scored = token_logprobs(model, padded, mask)
    alone = token_logprobs(model, ids[:1, 5:])
    assert torch.allclose(scored[0, 5:], alone[0], atol=1e-5) and scored[0, :5].eq(0).all()
    assert torch.allclose(scored[1], scores[1], atol=1e-5)


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    """A transformers GPT-2 with random weights and the same weights loaded into minigpt."""
    pytest.importorskip("transformers", reason="the reference implementation")
    from test_hf_gpt2 import random_hf_model

    hf = random_hf_model(vocab_size=211, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    directory = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(directory)
    return hf, GPTModel.from_pretrained(directory)


def test_padded_batch_generates_what_transformers_generates(hf_and_ours):
    hf, ours = hf_and_ours
    ids, mask = pad_prompts(prompts_of_lengths(5, 12, 1, 9, seed=3), pad_id=0)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=False, pad_token_id=0)
    for use_cache in (True, False):
        assert torch.equal(generate(ours, ids, 15, attention_mask=mask, use_cache=use_cache), expected)


def test_token_logprobs_equal_transformers_with_the_same_weights(hf_and_ours):
    hf, ours = hf_and_ours
    ids, mask = pad_prompts(prompts_of_lengths(20, 9, 32, seed=3), pad_id=0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = hf(ids, attention_mask=mask, position_ids=positions).logits[:, :-1]
    expected = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    scored = (mask[:, :-1] * mask[:, 1:]).bool()
    got = token_logprobs(ours, ids, mask)
    assert (got - expected)[scored].abs().max() < 1e-4
    assert (token_logprobs(ours, ids[2:]) - expected[2:]).abs().max() < 1e-4  # the unpadded row, no mask
