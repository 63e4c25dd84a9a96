"""GPTConfig, the layers and GPTModel: exact formulas, parameter counts, clear errors."""

import math

import pytest
import torch

from minigpt.models.base import check_token_ids, evaluating
from minigpt.models.gpt2.config import PRESETS, GPTConfig
from minigpt.models.gpt2.layers import GELU, FeedForward, LayerNorm, TransformerBlock
from minigpt.models.gpt2.model import GPTModel

SMALL = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)

BOOK_DICT = {  # GPT_CONFIG_124M from the book
    "vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12,
    "n_layers": 12, "drop_rate": 0.1, "qkv_bias": False,
}


def meta_model(cfg) -> GPTModel:
    with torch.device("meta"):  # counting parameters needs no memory
        return GPTModel(cfg)


# --- config -----------------------------------------------------------------------------

def test_book_dict_and_preset_give_the_same_config():
    assert GPTConfig.from_dict(BOOK_DICT) == GPTConfig.from_preset("gpt2-small")
    assert GPTModel(dict(BOOK_DICT, context_length=8, n_layers=1)).cfg.emb_dim == 768


@pytest.mark.parametrize(
    "name, emb, layers, heads",
    [("gpt2-small", 768, 12, 12), ("gpt2-medium", 1024, 24, 16),
     ("gpt2-large", 1280, 36, 20), ("gpt2-xl", 1600, 48, 25)],
)
def test_gpt2_presets_have_openais_shapes(name, emb, layers, heads):
    cfg = GPTConfig.from_preset(name)
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads, cfg.vocab_size, cfg.context_length) == (
        emb, layers, heads, 50257, 1024)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="gpt2-medium"):
        GPTConfig.from_preset("gpt3")


@pytest.mark.parametrize(
    "overrides, message",
    [({"n_heads": 5}, "not divisible by n_heads=5"), ({"emb_dim": 0}, "emb_dim"),
     ({"drop_rate": 1.5}, "drop_rate"), ({"n_layers": 2.5}, "n_layers")],
)
def test_invalid_config_is_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**SMALL.to_dict(), **overrides})


def test_unknown_dict_field_is_named():
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig.from_dict({**BOOK_DICT, "n_head": 12})


# --- parameter counts -------------------------------------------------------------------

def test_gpt2_small_parameter_counts():
    assert meta_model(GPTConfig.from_preset("gpt2-small")).num_parameters() == 163_009_536
    tied = GPTConfig.from_preset("gpt2-small", tie_weights=True)
    assert meta_model(tied).num_parameters() == 124_412_160
    openai = GPTConfig.from_preset("gpt2-small", tie_weights=True, qkv_bias=True)
    assert meta_model(openai).num_parameters() == 124_439_808


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_count_matches_the_closed_form(name):
    c = GPTConfig.from_preset(name)
    d = c.emb_dim
    per_block = 3 * d * d + 3 * d * c.qkv_bias + (d * d + d) + (8 * d * d + 5 * d) + 4 * d
    head = 0 if c.tie_weights else c.vocab_size * d
    expected = c.vocab_size * d + c.context_length * d + c.n_layers * per_block + 2 * d + head
    assert meta_model(c).num_parameters() == expected


# --- layers -----------------------------------------------------------------------------

def test_layer_norm_matches_the_formula_and_torch():
    x = torch.randn(3, 5, 32)
    ln = LayerNorm(32)
    with torch.no_grad():
        ln.scale.uniform_(0.5, 1.5)
        ln.shift.uniform_(-1, 1)
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    by_hand = ln.scale * (x - mean) / torch.sqrt(var + 1e-5) + ln.shift
    assert torch.allclose(ln(x), by_hand, atol=1e-5)
    ref = torch.nn.LayerNorm(32, eps=1e-5)
    ref.load_state_dict({"weight": ln.scale, "bias": ln.shift})
    assert torch.equal(ln(x), ref(x))


def test_gelu_is_gpt2s_tanh_approximation():
    x = torch.linspace(-6, 6, 1001)
    formula = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    assert torch.allclose(GELU()(x), formula, atol=1e-6)
    assert GELU()(torch.tensor([0.0])).item() == 0.0


def test_feed_forward_and_block_keep_the_shape():
    x = torch.randn(2, 7, 32)
    assert FeedForward(SMALL).layers[0].out_features == 128
    assert FeedForward(SMALL)(x).shape == x.shape
    assert TransformerBlock(SMALL)(x).shape == x.shape


def test_block_is_pre_layernorm_with_shortcuts():
    block = TransformerBlock(SMALL).eval()
    x = torch.randn(2, 7, 32)
    h = x + block.att(block.norm1(x))
    assert torch.allclose(block(x), h + block.ff(block.norm2(h)), atol=1e-6)


# --- model ------------------------------------------------------------------------------

def test_forward_gives_logits_for_every_position():
    model = GPTModel(SMALL)
    ids = torch.randint(0, 97, (3, 16))
    assert model(ids).shape == (3, 16, 97)


def test_model_is_causal_end_to_end():
    model = GPTModel(SMALL).eval()
    ids = torch.randint(0, 97, (1, 10))
    other = ids.clone()
    other[0, 6:] = (other[0, 6:] + 1) % 97
    assert torch.equal(model(ids)[:, :6], model(other)[:, :6])


def test_tied_weights_share_one_tensor():
    model = GPTModel(GPTConfig(**{**SMALL.to_dict(), "tie_weights": True}))
    assert model.out_head.weight is model.tok_emb.weight
    assert model.out_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    with torch.no_grad():  # one tensor: writing the embedding writes the output head
        model.tok_emb.weight[3].fill_(1.0)
    assert torch.equal(model.out_head.weight[3], torch.ones(32))
    untied = GPTModel(SMALL)
    assert untied.out_head.weight is not untied.tok_emb.weight
    assert untied.out_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert model.num_parameters() == untied.num_parameters() - 97 * 32


def test_fast_and_explicit_attention_give_the_same_logits():
    model = GPTModel(SMALL).eval()
    ids = torch.randint(0, 97, (2, 16))
    fast = model(ids)
    model.set_attention_impl(use_sdpa=False)
    assert (model(ids) - fast).abs().max() < 1e-5


@pytest.mark.parametrize("padded", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(padded):
    ids = torch.randint(0, 97, (2, 12))
    mask = torch.ones(2, 12).index_fill(1, torch.arange(4), 0) if padded else None
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPTModel(SMALL).train()
        model.gradient_checkpointing = checkpointing
        model(ids, attention_mask=mask).logsumexp(-1).mean().backward()
        grads.append(model.trf_blocks[0].att.W_query.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_too_many_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match="exceed context_length=16"):
        GPTModel(SMALL)(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("bad", [97, -1, 1000])
def test_id_outside_the_vocabulary_is_named(bad):
    ids = torch.zeros(1, 4, dtype=torch.long)
    ids[0, 2] = bad
    with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
        check_token_ids(ids, 97)
    with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
        GPTModel(SMALL)(ids)  # on the CPU the forward checks too (no device to wait for)
    check_token_ids(torch.tensor([[0, 96]]), 97)
    check_token_ids(torch.zeros(1, 0, dtype=torch.long), 97)


def test_float_input_is_a_clear_type_error():
    with pytest.raises(TypeError, match="integer token ids"):
        GPTModel(SMALL)(torch.zeros(1, 4))


def test_one_dimensional_input_suggests_a_batch_dimension():
    with pytest.raises(ValueError, match="unsqueeze"):
        GPTModel(SMALL)(torch.zeros(4, dtype=torch.long))


# --- left padding -------------------------------------------------------------------------

def left_pad(ids: torch.Tensor, pads: int, pad_id: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, tokens)`` -> ``(1, pads + tokens)`` ids with ``pad_id`` in front, and the mask."""
    padded = torch.cat([torch.full((1, pads), pad_id), ids], dim=1)
    return padded, torch.cat([torch.zeros(1, pads), torch.ones_like(ids)], dim=1).long()


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_a_padded_row_gives_the_logits_of_the_row_alone(use_sdpa):
    model = GPTModel(SMALL).eval()
    model.set_attention_impl(use_sdpa)
    short, long = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 14))
    padded, mask = left_pad(short, 5)
    ids, attention_mask = torch.cat([padded, long]), torch.cat([mask, torch.ones(1, 14, dtype=torch.long)])
    with torch.no_grad():
        logits = model(ids, attention_mask=attention_mask)
        alone = model(short)
    assert not logits.isnan().any()  # the padding queries see themselves, never nothing
    assert (logits[0, 5:] - alone[0]).abs().max() < 1e-5
    assert (logits[1] - model(long)).abs().max() < 1e-5
    # Different padding values change nothing.
    other = ids.clone()
    other[0, :5] = torch.tensor([0, 96, 3, 3, 50])
    assert (model(other, attention_mask=attention_mask)[0, 5:] - logits[0, 5:]).abs().max() < 1e-6


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("full_mask", [True, False], ids=["past+new mask", "new-only mask"])
def test_padding_works_with_the_kv_cache(use_sdpa, full_mask):
    model = GPTModel(SMALL).eval()
    model.set_attention_impl(use_sdpa)
    row = torch.randint(0, 97, (1, 10))
    padded, mask = left_pad(row, 4)  # 4 pads + 10 tokens
    with torch.no_grad():
        alone = model(row)
        model.reset_kv_cache()
        pieces = [model(padded[:, :8], use_cache=True, attention_mask=mask[:, :8])]
        for t in range(8, 14):  # then one token at a time
            step_mask = mask[:, :t + 1] if full_mask else mask[:, t:t + 1]
            pieces.append(model(padded[:, t:t + 1], use_cache=True, attention_mask=step_mask))
    assert (torch.cat(pieces, dim=1)[0, 4:] - alone[0]).abs().max() < 1e-5
    assert model._past_mask.shape == (1, 14)
    model.reset_kv_cache()
    assert model._past_mask is None and model.cache_pos == 0


def test_a_mask_of_ones_changes_nothing_and_a_wrong_shape_is_named():
    model = GPTModel(SMALL).eval()
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        assert (model(ids, attention_mask=torch.ones(2, 7)) - model(ids)).abs().max() < 1e-5
    with pytest.raises(ValueError, match=r"attention_mask must have shape .* \(2, 7\), got \(2, 6\)"):
        model(ids, attention_mask=torch.ones(2, 6))


def test_logits_to_keep_returns_the_last_positions():
    model = GPTModel(SMALL).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        full = model(ids)
        assert torch.allclose(model(ids, logits_to_keep=1), full[:, -1:], atol=1e-6)
        assert model(ids, logits_to_keep=3).shape == (2, 3, 97)


# --- evaluating ---------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
def test_evaluating_switches_off_dropout_and_restores_the_mode(training):
    model = GPTModel(GPTConfig(**{**SMALL.to_dict(), "drop_rate": 0.5})).train(training)
    ids = torch.randint(0, 97, (2, 8))
    with evaluating(model) as inside:
        assert inside is model
        assert not any(m.training for m in model.modules())
        assert torch.equal(model(ids), model(ids))  # no dropout: the same logits twice
    assert all(m.training is training for m in model.modules())


def test_evaluating_restores_the_mode_after_an_error():
    model = GPTModel(SMALL).train()
    with pytest.raises(ValueError, match="exceed context_length"), evaluating(model):
        model(torch.zeros(1, 17, dtype=torch.long))
    assert model.training
