"""Each attention module: shapes, causality, normalised weights, dropout, agreement between paths."""

import pytest
import torch

from minigpt.models.attention import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttentionV1,
    SelfAttentionV2,
)
from minigpt.models.kv_cache import padded_causal_mask

# The book's six 3-d embeddings of "Your journey starts with one step".
INPUTS = torch.tensor(
    [[0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64],
     [0.22, 0.58, 0.33], [0.77, 0.25, 0.10], [0.05, 0.80, 0.55]]
)


def test_self_attention_v1_matches_hand_computed_softmax():
    torch.manual_seed(123)
    sa = SelfAttentionV1(3, 2)
    q, k, v = INPUTS @ sa.W_query, INPUTS @ sa.W_key, INPUTS @ sa.W_value
    expected = torch.softmax(q @ k.T / 2 ** 0.5, dim=-1) @ v
    assert torch.allclose(sa(INPUTS), expected, atol=1e-6)


def test_self_attention_v1_and_v2_agree_given_transposed_weights():
    v2 = SelfAttentionV2(3, 2)
    v1 = SelfAttentionV1(3, 2)
    with torch.no_grad():
        for name in ("W_query", "W_key", "W_value"):
            getattr(v1, name).copy_(getattr(v2, name).weight.T)
    assert torch.allclose(v1(INPUTS), v2(INPUTS), atol=1e-6)


@pytest.mark.parametrize("cls", [SelfAttentionV1, SelfAttentionV2])
def test_self_attention_accepts_unbatched_and_batched_input(cls):
    sa = cls(3, 2)
    assert sa(INPUTS).shape == (6, 2)
    batch = torch.stack([INPUTS, INPUTS.flip(0)])
    out = sa(batch)
    assert out.shape == (2, 6, 2)
    assert torch.allclose(out[0], sa(INPUTS), atol=1e-6)


def _causal_modules():
    return [
        CausalAttention(3, 4, context_length=8, dropout=0.0),
        MultiHeadAttentionWrapper(3, 2, context_length=8, dropout=0.0, num_heads=3),
        MultiHeadAttention(3, 6, context_length=8, dropout=0.0, num_heads=3),
        MultiHeadAttention(3, 6, context_length=8, dropout=0.0, num_heads=3, use_sdpa=False),
    ]


@pytest.mark.parametrize("module", _causal_modules(), ids=lambda m: type(m).__name__)
def test_output_shapes(module):
    batch = torch.stack([INPUTS, INPUTS])
    expected_width = 6 if not isinstance(module, CausalAttention) else 4
    assert module(batch).shape == (2, 6, expected_width)


@pytest.mark.parametrize("module", _causal_modules(), ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("t", [0, 2, 4])
def test_changing_future_tokens_leaves_earlier_outputs_unchanged(module, t):
    x = torch.rand(2, 6, 3)
    changed = x.clone()
    changed[:, t + 1:] = torch.rand(2, 5 - t, 3) * 10
    before, after = module(x), module(changed)
    assert torch.equal(before[:, : t + 1], after[:, : t + 1])
    assert not torch.allclose(before[:, t + 1:], after[:, t + 1:])


def test_attention_weights_rows_sum_to_one_and_are_zero_above_diagonal():
    mha = MultiHeadAttention(3, 6, context_length=8, dropout=0.0, num_heads=2, use_sdpa=False)
    mha(torch.rand(2, 5, 3))
    w = mha.last_attn_weights
    assert w.shape == (2, 2, 5, 5)
    assert torch.allclose(w.sum(-1), torch.ones(2, 2, 5), atol=1e-6)
    assert torch.all(w.triu(1) == 0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: CausalAttention(3, 4, context_length=8, dropout=0.5),
        lambda: MultiHeadAttention(3, 4, context_length=8, dropout=0.5, num_heads=2),
        lambda: MultiHeadAttention(3, 4, context_length=8, dropout=0.5, num_heads=2, use_sdpa=False),
    ],
)
def test_dropout_is_active_in_train_and_off_in_eval(make):
    module = make()
    x = torch.rand(1, 6, 3)
    module.train()
    assert not torch.equal(module(x), module(x))  # two different dropout masks
    module.eval()
    assert torch.equal(module(x), module(x))


def test_fast_and_explicit_paths_agree():
    torch.manual_seed(0)
    mha = MultiHeadAttention(64, 64, context_length=32, dropout=0.0, num_heads=8).eval()
    x = torch.randn(3, 32, 64)
    fast = mha(x)
    mha.use_sdpa = False
    explicit = mha(x)
    assert (fast - explicit).abs().max() < 1e-5


def test_wrapper_and_fused_module_agree_given_the_same_weights():
    torch.manual_seed(0)
    heads, d_head = 3, 4
    wrapper = MultiHeadAttentionWrapper(5, d_head, context_length=8, dropout=0.0, num_heads=heads)
    fused = MultiHeadAttention(5, heads * d_head, context_length=8, dropout=0.0, num_heads=heads)
    with torch.no_grad():
        for name in ("W_query", "W_key", "W_value"):
            stacked = torch.cat([getattr(h, name).weight for h in wrapper.heads], dim=0)
            getattr(fused, name).weight.copy_(stacked)
        # The wrapper just concatenates heads: an identity out_proj makes the two equal.
        fused.out_proj.weight.copy_(torch.eye(heads * d_head))
        fused.out_proj.bias.zero_()
    x = torch.rand(2, 7, 5)
    for use_sdpa in (True, False):
        fused.use_sdpa = use_sdpa
        assert torch.allclose(wrapper(x), fused(x), atol=1e-6)


def test_d_out_not_divisible_by_num_heads_is_a_clear_value_error():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiHeadAttention(8, 10, context_length=4, dropout=0.0, num_heads=3)


@pytest.mark.parametrize("dropout", [-0.1, 1.0])
def test_invalid_dropout_is_a_value_error(dropout):
    with pytest.raises(ValueError, match="dropout"):
        MultiHeadAttention(8, 8, context_length=4, dropout=dropout, num_heads=2)
    with pytest.raises(ValueError, match="dropout"):
        CausalAttention(8, 8, context_length=4, dropout=dropout)


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_kv_cache_gives_the_same_outputs_as_the_full_sequence(use_sdpa):
    mha = MultiHeadAttention(16, 16, context_length=10, dropout=0.0, num_heads=4, use_sdpa=use_sdpa).eval()
    x = torch.randn(2, 9, 16)
    full = mha(x)
    mha.reset_cache()
    # A prompt of 4 tokens, then one token at a time, then a chunk of 2.
    pieces = [mha(x[:, :4], use_cache=True)]
    pieces += [mha(x[:, i:i + 1], use_cache=True) for i in range(4, 7)]
    pieces.append(mha(x[:, 7:9], use_cache=True))
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-6)


def test_kv_cache_overflow_is_a_clear_error():
    mha = MultiHeadAttention(8, 8, context_length=4, dropout=0.0, num_heads=2).eval()
    mha(torch.randn(1, 4, 8), use_cache=True)
    with pytest.raises(ValueError, match="context_length=4"):
        mha(torch.randn(1, 1, 8), use_cache=True)


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_an_explicit_mask_hides_the_keys_it_marks(use_sdpa):
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 16, context_length=10, dropout=0.0, num_heads=4, use_sdpa=use_sdpa).eval()
    x = torch.randn(2, 6, 16)
    causal = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 1, 6, 6)
    assert (mha(x, attn_mask=causal) - mha(x)).abs().max() < 1e-6  # causality spelled out: the same
    # Row 0 hides keys 0 and 1 from every later query: its outputs 2.. equal those of x[0, 2:] alone.
    allowed = causal.clone()
    allowed[0, :, 2:, :2] = False
    out = mha(x, attn_mask=allowed)
    if not use_sdpa:
        assert mha.last_attn_weights[0, :, 2:, :2].eq(0).all()
    assert (out[0, 2:] - mha(x[:1, 2:])[0]).abs().max() < 1e-6
    assert (out[1] - mha(x)[1]).abs().max() < 1e-6


def test_padded_causal_mask_spelled_out():
    real = torch.tensor([[False, False, True, True], [True, True, True, True]])
    allowed = padded_causal_mask(real, num_tokens=4)
    assert allowed.shape == (2, 1, 4, 4)
    assert allowed[0, 0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert torch.equal(allowed[1, 0], torch.ones(4, 4).tril().bool())
    # The last two queries of a cached call: keys 0..3, queries at positions 2 and 3.
    assert padded_causal_mask(real, num_tokens=2)[0, 0].int().tolist() == [[0, 0, 1, 0], [0, 0, 1, 1]]


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_kv_cache_grows_in_powers_of_two_and_keeps_its_contents(use_sdpa):
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 8, context_length=200, dropout=0.0, num_heads=2, use_sdpa=use_sdpa).eval()
    x = torch.randn(2, 140, 8)
    full = mha(x)
    pieces, capacities = [], []
    for start, end in [(0, 5), (5, 64), (64, 65), (65, 130), (130, 140)]:
        pieces.append(mha(x[:, start:end], use_cache=True))
        capacities.append(mha.cache_k.shape[2])
    assert capacities == [64, 64, 128, 200, 200]  # the last one capped at the context
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_reserving_ahead_grows_the_cache_as_appending_would():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 8, context_length=200, dropout=0.0, num_heads=2).eval()
    x = torch.randn(1, 140, 8)
    full = mha(x)
    mha.kv_cache.reserve(5)  # nothing to grow yet: the first append allocates
    assert mha.cache_k is None
    pieces, capacities = [], []
    for start, end in [(0, 64), (64, 65), (65, 130), (130, 140)]:
        mha.kv_cache.reserve(end - start)
        capacities.append(None if mha.cache_k is None else mha.cache_k.shape[2])
        pieces.append(mha(x[:, start:end], use_cache=True))
    assert capacities == [None, 128, 200, 200]  # grown before the append that needs the room
    assert mha.cache_len == 140 and mha.cache_k.shape[2] == 200
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)  # the prefix was copied over
