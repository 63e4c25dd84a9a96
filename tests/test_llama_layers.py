"""The Llama blocks one at a time: RoPE, RMSNorm, SwiGLU, grouped-query attention, each
against a hand-computed case and against transformers' own implementation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from minigpt.models.llama.layers import GroupedQueryAttention, RMSNorm, SwiGLU, repeat_kv
from minigpt.models.llama.rope import RoPE, inverse_frequencies, rope_inv_freq, rotate

transformers = pytest.importorskip("transformers", reason="the reference implementation comes from transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)


# ---------------------------------------------------------------------------- RoPE

def test_rope_turns_a_pair_by_position_times_frequency():
    rope = RoPE(head_dim=2, context_length=8)  # one pair, inv_freq = theta ** 0 = 1 radian per position
    x = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    for m in range(8):
        out = rope(x, torch.tensor([m])).flatten()
        assert torch.allclose(out, torch.tensor([math.cos(m), math.sin(m)]), atol=1e-6)
    y = rope(torch.tensor([0.0, 2.0]).view(1, 1, 1, 2), torch.tensor([3])).flatten()  # (0, 2) turned by 3 rad
    assert torch.allclose(y, torch.tensor([-2 * math.sin(3), 2 * math.cos(3)]), atol=1e-6)


def test_rope_pairs_are_half_a_head_apart_with_the_published_frequencies():
    assert torch.allclose(inverse_frequencies(4, 100.0), torch.tensor([1.0, 0.1]))
    rope = RoPE(head_dim=4, context_length=4, theta=100.0)
    x = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 4)  # pairs (x0, x2) and (x1, x3)
    out = rope(x, torch.tensor([2])).flatten()
    expected = torch.tensor([math.cos(2), math.cos(0.2), math.sin(2), math.sin(0.2)])
    assert torch.allclose(out, expected, atol=1e-6)


def test_rope_scores_depend_only_on_the_distance():
    torch.manual_seed(0)
    rope = RoPE(head_dim=16, context_length=64)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> float:
        return float((rope(q, torch.tensor([m])) * rope(k, torch.tensor([n]))).sum())

    assert score(10, 7) == pytest.approx(score(40, 37), abs=1e-4)
    assert score(10, 7) != pytest.approx(score(10, 2), abs=1e-3)


@pytest.mark.parametrize("scaling", [None, LLAMA3])
def test_rope_frequencies_and_rotation_equal_transformers(scaling):
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=512,
                                      rope_theta=500000.0, rope_scaling=scaling)
    reference = modeling_llama.LlamaRotaryEmbedding(config)
    ours = rope_inv_freq(32, 500000.0, scaling)
    assert torch.equal(ours, reference.inv_freq)
    if scaling:  # the fastest pair keeps its frequency, the slowest is divided by the factor
        plain = inverse_frequencies(32, 500000.0)
        assert ours[0] == plain[0] and ours[-1] == pytest.approx(plain[-1] / 8)
        assert torch.equal(ours, ROPE_INIT_FUNCTIONS["llama3"](config)[0])
    q, k = torch.randn(2, 3, 10, 32), torch.randn(2, 1, 10, 32)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [300, 301, 302, 303, 304, 305, 306, 307, 308, 309]])
    cos, sin = reference(q, positions)
    ref_q, ref_k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    rope = RoPE(32, 512, 500000.0, scaling)
    assert torch.allclose(rope(q, positions), ref_q, atol=1e-6)
    assert torch.allclose(rope(k, positions), ref_k, atol=1e-6)


def test_rope_rejects_an_odd_head_and_unknown_scaling():
    with pytest.raises(ValueError, match="even"):
        RoPE(head_dim=3, context_length=4)
    with pytest.raises(ValueError, match="yarn"):
        rope_inv_freq(8, 10000.0, {"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="low_freq_factor"):
        rope_inv_freq(8, 10000.0, {"rope_type": "llama3", "factor": 2.0})


def test_rotate_keeps_the_length_of_every_pair():
    x = torch.randn(5, 8)
    angles = torch.rand(5, 4) * 10
    out = rotate(x, angles.cos(), angles.sin())
    pair_norms = lambda t: t[:, :4] ** 2 + t[:, 4:] ** 2  # noqa: E731
    assert torch.allclose(pair_norms(out), pair_norms(x), atol=1e-5)


# ---------------------------------------------------------------------------- RMSNorm, SwiGLU

def test_rmsnorm_of_a_known_vector():
    norm = RMSNorm(2, eps=0.0)
    out = norm(torch.tensor([3.0, 4.0]))  # root mean square sqrt((9 + 16) / 2) = sqrt(12.5)
    assert torch.allclose(out, torch.tensor([3.0, 4.0]) / math.sqrt(12.5))
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, -1.0]))
    assert torch.allclose(norm(torch.tensor([[3.0, 4.0]])), torch.tensor([[6.0, -4.0]]) / math.sqrt(12.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_equals_transformers_bit_for_bit(dtype):
    ours, reference = RMSNorm(64, eps=1e-5).to(dtype), modeling_llama.LlamaRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.normal_()
        reference.weight.copy_(ours.weight)
    x = (torch.randn(3, 7, 64) * 50).to(dtype)  # large values: a bfloat16 mean of squares would lose digits
    assert ours(x).dtype == dtype
    assert torch.equal(ours(x), reference(x))


def test_swiglu_is_gate_silu_times_up_then_down():
    ff = SwiGLU(2, 1)
    with torch.no_grad():
        ff.fc1.weight.copy_(torch.tensor([[1.0, 0.0]]))  # gate = x0
        ff.fc2.weight.copy_(torch.tensor([[0.0, 3.0]]))  # up = 3 x1
        ff.fc3.weight.copy_(torch.tensor([[1.0], [2.0]]))
    x = torch.tensor([2.0, 1.0])
    silu = 2.0 / (1 + math.exp(-2.0))
    assert torch.allclose(ff(x), torch.tensor([1.0, 2.0]) * silu * 3.0)
    assert all(isinstance(m, nn.Linear) and m.bias is None for m in (ff.fc1, ff.fc2, ff.fc3))


# ---------------------------------------------------------------------------- grouped-query attention

def _attention(n_heads: int, n_kv_heads: int, *, qk_norm: bool = False, context: int = 300) -> GroupedQueryAttention:
    torch.manual_seed(0)
    rope = RoPE(8, context)
    return GroupedQueryAttention(16, n_heads, n_kv_heads, 8, rope, qk_norm=qk_norm)


def _as_mha(gqa: GroupedQueryAttention) -> GroupedQueryAttention:
    """The same attention with every key/value head written out once per query head."""
    mha = GroupedQueryAttention(16, gqa.n_heads, gqa.n_heads, gqa.head_dim, gqa.rope[0])
    with torch.no_grad():
        mha.W_query.weight.copy_(gqa.W_query.weight)
        mha.out_proj.weight.copy_(gqa.out_proj.weight)
        for name in ("W_key", "W_value"):
            heads = getattr(gqa, name).weight.view(gqa.n_kv_heads, gqa.head_dim, 16)
            getattr(mha, name).weight.copy_(heads.repeat_interleave(gqa.groups, dim=0).reshape(-1, 16))
    return mha


@pytest.mark.parametrize("n_kv_heads", [1, 2])  # multi-query and grouped-query
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_gqa_equals_mha_with_the_kv_heads_repeated(n_kv_heads, use_sdpa):
    gqa = _attention(4, n_kv_heads)
    mha = _as_mha(gqa)
    gqa.use_sdpa = mha.use_sdpa = use_sdpa
    x = torch.randn(2, 9, 16)
    positions = torch.arange(9)
    assert torch.allclose(gqa(x, positions), mha(x, positions), atol=1e-6)
    assert gqa.W_key.weight.shape == (n_kv_heads * 8, 16)  # the saving: fewer key/value rows


def test_repeat_kv_gives_each_query_head_its_group():
    kv = torch.arange(2).view(1, 2, 1, 1).float()
    assert repeat_kv(kv, 3).flatten().tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("qk_norm", [False, True])
def test_explicit_and_fused_paths_agree_and_the_cache_gives_the_same_outputs(qk_norm):
    att = _attention(4, 2, qk_norm=qk_norm)
    x = torch.randn(2, 270, 16)  # past the cache's first 256 slots: it grows
    positions = torch.arange(270)
    full = att(x, positions)
    att.use_sdpa = False
    assert torch.allclose(att(x, positions), full, atol=1e-5)
    assert att.last_attn_weights.shape == (2, 4, 270, 270)
    for use_sdpa in (True, False):
        att.use_sdpa = use_sdpa
        att.reset_cache()
        parts = [att(x[:, :5], positions[:5], use_cache=True)]  # a prompt, then one token at a time
        parts += [att(x[:, t:t + 1], positions[t:t + 1], use_cache=True) for t in range(5, 260)]
        parts.append(att(x[:, 260:], positions[260:], use_cache=True))  # several new tokens after a cache
        assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
    assert att.cache_k.shape[1] == 2  # the cache holds n_kv_heads heads


def test_cache_refuses_tokens_beyond_the_context():
    att = _attention(2, 1, context=4)
    att(torch.randn(1, 4, 16), torch.arange(4), use_cache=True)
    with pytest.raises(ValueError, match="context_length=4"):
        att(torch.randn(1, 1, 16), torch.tensor([3]), use_cache=True)


def test_heads_must_divide_into_groups():
    with pytest.raises(ValueError, match="multiple of n_kv_heads=3"):
        GroupedQueryAttention(16, 4, 3, 4, RoPE(4, 8))
