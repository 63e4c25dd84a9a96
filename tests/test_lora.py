"""LoRA: a fresh adapter changes nothing, training touches only A and B, merging and
saving keep the outputs, parameter counts match the formula r * (in + out)."""

import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

from minigpt.lora.adapters import apply_lora, lora_disabled, merge_lora
from minigpt.lora.files import load_lora, save_lora
from minigpt.lora.layers import LinearWithLoRA, LoRALayer
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.model import GPTModel

# Tied head and qkv biases: the cases that need care.
SMALL = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                  drop_rate=0.0, qkv_bias=True, tie_weights=True)


def ids(batch: int = 2, tokens: int = 16) -> torch.Tensor:
    return torch.randint(0, SMALL.vocab_size, (batch, tokens))


def train_steps(model: nn.Module, steps: int = 2) -> None:
    """A few AdamW steps with weight decay on *all* parameters, as a careless user would."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        x = ids()
        logits = model(x)
        targets = x.roll(-1, dims=1) % logits.shape[-1]  # also fits a 2-class head
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def lora_model(base: GPTModel, **kwargs) -> GPTModel:
    model = copy.deepcopy(base)
    apply_lora(model, **{"rank": 4, "alpha": 8, **kwargs})
    return model


# --- the layer ---------------------------------------------------------------------------

def test_lora_layer_shapes_init_and_formula():
    layer = LoRALayer(in_dim=10, out_dim=6, rank=3, alpha=6)
    assert layer.A.shape == (10, 3) and layer.B.shape == (3, 6)
    assert torch.all(layer.B == 0)
    # Like nn.Linear(10, 3): uniform within 1/sqrt(fan_in) with fan_in = in_dim.
    assert layer.A.abs().max() <= 10 ** -0.5 and layer.A.std() > 0.1
    x = torch.randn(2, 5, 10)
    assert torch.equal(layer(x), torch.zeros(2, 5, 6))
    with torch.no_grad():
        layer.B.normal_()
    assert torch.allclose(layer(x), 2.0 * (x @ layer.A @ layer.B))  # scaling = alpha / rank = 2
    # delta_weight is the same update in nn.Linear's (out, in) layout.
    assert torch.allclose(layer(x), x @ layer.delta_weight().T, atol=1e-6)


def test_linear_with_lora_adds_the_update_to_the_frozen_path():
    linear = nn.Linear(8, 4)
    wrapped = LinearWithLoRA(linear, rank=2, alpha=2)
    x = torch.randn(3, 8)
    assert torch.equal(wrapped(x), linear(x))
    with torch.no_grad():
        wrapped.lora.B.normal_()
    assert torch.allclose(wrapped(x), linear(x) + x @ wrapped.lora.A @ wrapped.lora.B)


def test_lora_dropout_only_acts_in_training():
    wrapped = LinearWithLoRA(nn.Linear(8, 4), rank=2, alpha=2, dropout=0.5)
    with torch.no_grad():
        wrapped.lora.B.normal_()
    x = torch.randn(64, 8)
    wrapped.eval()
    assert torch.equal(wrapped(x), wrapped(x))
    wrapped.train()
    assert not torch.equal(wrapped(x), wrapped(x))


# --- applying to a model -----------------------------------------------------------------

def test_fresh_lora_model_computes_exactly_the_base_output():
    base = GPTModel(SMALL).eval()
    model = lora_model(base).eval()
    x = ids()
    assert torch.equal(model(x), base(x))


def test_training_changes_only_the_lora_tensors():
    base = GPTModel(SMALL)
    model = lora_model(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model)
    after = model.state_dict()
    lora_keys = [k for k in after if ".lora." in k]
    assert len(lora_keys) == 2 * (6 * SMALL.n_layers + 1)
    for key in after:
        if key in lora_keys:
            assert not torch.equal(after[key], before[key]), key
        else:
            assert torch.equal(after[key], before[key]), key
    # The tied head still shares the (frozen) embedding matrix.
    assert model.out_head.linear.weight is model.tok_emb.weight


def test_parameter_counts_match_the_formula():
    r, d, v, hidden = 4, SMALL.emb_dim, SMALL.vocab_size, 4 * SMALL.emb_dim
    base = GPTModel(SMALL)
    per_block = 4 * r * (d + d) + r * (d + hidden) + r * (hidden + d)  # attention + feed-forward
    report = apply_lora(copy.deepcopy(base), rank=r, alpha=8)
    assert report.trainable == SMALL.n_layers * per_block + r * (d + v)
    assert report.total == base.num_parameters() + report.trainable
    assert len(report.modules) == 6 * SMALL.n_layers + 1

    report = apply_lora(copy.deepcopy(base), rank=r, alpha=8, target_modules=["W_query", "W_value"])
    assert report.trainable == SMALL.n_layers * 2 * r * (d + d)
    assert report.modules == ("trf_blocks.0.att.W_query", "trf_blocks.0.att.W_value",
                              "trf_blocks.1.att.W_query", "trf_blocks.1.att.W_value")


@pytest.mark.parametrize("patterns, count", [
    (["att.*"], 4 * SMALL.n_layers),          # every attention projection
    (["ff.layers.0"], SMALL.n_layers),        # a dotted ending
    (["trf_blocks.1.*"], 6),                  # a glob on the full name: the last block
    (["out_head", "W_*"], 1 + 3 * SMALL.n_layers),
])
def test_target_patterns_select_layers(patterns, count):
    report = apply_lora(GPTModel(SMALL), rank=2, alpha=2, target_modules=patterns)
    assert len(report.modules) == count


def test_book_figure_gpt2_small_classifier_rank_16():
    # Appendix E: GPT-2 124M (qkv biases, tied embedding) with a Linear(768, 2) head,
    # LoRA r=16 on every linear layer of the blocks and on the head.
    with torch.device("meta"):  # counting needs no memory
        model = GPTModel(GPTConfig.from_preset("gpt2-small", qkv_bias=True, tie_weights=True))
        model.out_head = nn.Linear(768, 2)
    base_total = model.num_parameters()
    report = apply_lora(model, rank=16, alpha=16)
    attention = 4 * 16 * (768 + 768)
    feed_forward = 16 * (768 + 3072) + 16 * (3072 + 768)
    head = 16 * (768 + 2)
    assert report.trainable == 12 * (attention + feed_forward) + head == 2_666_528
    assert base_total == 124_441_346
    assert report.total == base_total + 2_666_528


def test_clear_errors():
    model = GPTModel(SMALL)
    for rank in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rank must be a positive integer"):
            apply_lora(model, rank=rank, alpha=1)
    with pytest.raises(ValueError, match="alpha must be positive"):
        apply_lora(model, rank=2, alpha=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        apply_lora(model, rank=2, alpha=2, dropout=1.0)
    with pytest.raises(ValueError, match=r"\['W_qeury'\] match no nn.Linear"):
        apply_lora(model, rank=2, alpha=2, target_modules=["W_query", "W_qeury"])
    with pytest.raises(TypeError, match="list of patterns"):
        apply_lora(model, rank=2, alpha=2, target_modules="W_query")
    with pytest.raises(ValueError, match="no LoRA layers to merge"):
        merge_lora(model)
    assert not any(isinstance(m, LinearWithLoRA) for m in model.modules())  # nothing half-applied
    apply_lora(model, rank=2, alpha=2)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(model, rank=2, alpha=2)


# --- merging -----------------------------------------------------------------------------

def test_merged_model_matches_and_deploys_as_a_plain_gpt(tmp_path):
    base = GPTModel(SMALL)
    model = lora_model(base)
    train_steps(model)
    model.eval()
    x = ids()
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        merged = model(x)
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert not any(isinstance(m, LinearWithLoRA) for m in model.modules())
    # The tied head got its own merged copy; the embedding itself is untouched.
    assert torch.equal(model.tok_emb.weight, base.tok_emb.weight)
    assert model.out_head.weight is not model.tok_emb.weight
    assert not model.cfg.tie_weights and base.cfg.tie_weights
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(GPTModel.from_pretrained(tmp_path).eval()(x), merged)


# --- saving and loading adapters -----------------------------------------------------------

def test_saved_adapter_on_a_fresh_base_reproduces_the_outputs(tmp_path):
    base = GPTModel(SMALL)
    model = lora_model(base, target_modules=["att.*", "out_head"], dropout=0.1)
    train_steps(model)
    save_lora(model, tmp_path / "adapter.safetensors")
    with safe_open(tmp_path / "adapter.safetensors", framework="pt") as f:
        assert all(".lora." in key for key in f.keys())  # the base weights are not stored
    fresh = copy.deepcopy(base)
    report = load_lora(fresh, tmp_path / "adapter.safetensors")
    assert (report.rank, report.alpha, report.dropout) == (4, 8, 0.1)
    assert report.modules == tuple(n for n, m in model.named_modules() if isinstance(m, LinearWithLoRA))
    x = ids()
    assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_adapter_can_carry_a_new_classification_head(tmp_path):
    base = GPTModel(SMALL)
    model = copy.deepcopy(base)
    model.out_head = nn.Linear(SMALL.emb_dim, 2)  # random, not part of the base checkpoint
    apply_lora(model, rank=4, alpha=8)
    train_steps(model)
    save_lora(model, tmp_path / "adapter.safetensors", include=["out_head"])

    fresh = copy.deepcopy(base)
    fresh.out_head = nn.Linear(SMALL.emb_dim, 2)  # a different random head
    load_lora(fresh, tmp_path / "adapter.safetensors")
    x = ids()
    assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_loading_a_mismatched_adapter_names_the_tensors_and_leaves_the_model_alone(tmp_path):
    model = lora_model(GPTModel(SMALL))
    save_lora(model, tmp_path / "adapter.safetensors")
    other = GPTModel(GPTConfig.from_dict({**SMALL.to_dict(), "vocab_size": 50}))
    with pytest.raises(ValueError, match=r"out_head.lora.B: file has \(4, 97\), model expects \(4, 50\)"):
        load_lora(other, tmp_path / "adapter.safetensors")
    assert not any(isinstance(m, LinearWithLoRA) for m in other.modules())

    GPTModel(SMALL).save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="no LoRA settings"):
        load_lora(GPTModel(SMALL), tmp_path / "base" / "model.safetensors")
    with pytest.raises(FileNotFoundError):
        load_lora(GPTModel(SMALL), tmp_path / "missing.safetensors")


# --- switching the adapters off ---------------------------------------------------------


def test_with_lora_disabled_the_model_computes_exactly_the_base_model():
    torch.manual_seed(0)
    base = GPTModel(SMALL).eval()
    model = lora_model(base, dropout=0.5)
    train_steps(model)  # the adapters now change the outputs
    model.eval()
    x = ids()
    with torch.no_grad():
        adapted = model(x)
        assert not torch.allclose(adapted, base(x))
        with lora_disabled(model) as same:
            assert same is model
            assert torch.equal(model(x), base(x))  # bit for bit: no second copy, no rounding
        assert torch.equal(model(x), adapted)  # switched on again afterwards


def test_lora_disabled_restores_the_state_after_an_error_and_when_nested():
    torch.manual_seed(0)
    model = lora_model(GPTModel(SMALL))
    layers = [m for m in model.modules() if isinstance(m, LinearWithLoRA)]
    with pytest.raises(RuntimeError, match="boom"):
        with lora_disabled(model):
            raise RuntimeError("boom")
    assert all(layer.enabled for layer in layers)
    with lora_disabled(model):
        with lora_disabled(model):
            pass
        assert not any(layer.enabled for layer in layers)  # the outer block still has them off
    assert all(layer.enabled for layer in layers)
    # Gradients flow only when the adapters are on: with them off, A and B get none.
    model.pos_emb.weight.requires_grad_(True)
    with lora_disabled(model):
        model(ids()).sum().backward()
    assert all(layer.lora.A.grad is None and layer.lora.B.grad is None for layer in layers)


def test_lora_disabled_on_a_model_without_adapters_says_what_to_do():
    with pytest.raises(ValueError, match="no LoRA layers to switch off; call apply_lora or load_lora first"):
        with lora_disabled(GPTModel(SMALL)):
            pass
