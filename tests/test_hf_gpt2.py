"""Hugging Face's GPT-2 format: minigpt runs its checkpoints exactly as transformers does,
and exports checkpoints that transformers runs with our logits.

No real GPT-2 weights exist offline, so the references are transformers' own
``GPT2LMHeadModel``s with random weights, saved with ``save_pretrained``. Run with
``-s`` to see the logit differences measured. ``test_weights.py`` and ``test_hub.py``
build their references with the helpers defined here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minigpt.cli import main as cli_main
from minigpt.generation.generate import generate
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.hf_layout import HF_TO_MINIGPT, export_hf, hf_shapes, minigpt_to_hf
from minigpt.models.gpt2.model import GPTModel

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

SHAPES = {
    "tiny": dict(vocab_size=211, n_positions=64, n_embd=32, n_layer=2, n_head=2),
    "heads6": dict(vocab_size=1000, n_positions=64, n_embd=96, n_layer=3, n_head=6),
    "gpt2-small": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
}
TOL = 1e-4  # float32, max abs logit difference


def random_hf_model(**config) -> GPT2LMHeadModel:
    """A transformers GPT-2 with random values in every tensor (biases and LayerNorms
    too, which transformers initialises to 0 and 1 and so would hide a mapping mistake)."""
    torch.manual_seed(1)
    with torch.device("meta"):  # transformers' own init is slow on CPU; every tensor is filled below
        model = GPT2LMHeadModel(GPT2Config(**config))
    model.to_empty(device="cpu")
    model.tie_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_ln_scale = ".ln_" in name and name.endswith("weight")
            p.normal_(1.0 if is_ln_scale else 0.0, 0.02 if p.dim() > 1 else 0.1)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model.eval()


def saved_hf_model(shape: str, directory: Path) -> GPT2LMHeadModel:
    """``random_hf_model`` of one of :data:`SHAPES`, saved by transformers into ``directory``."""
    model = random_hf_model(**SHAPES[shape])
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """``shape -> (transformers model, its save_pretrained directory)``, each built once."""
    made: dict[str, tuple[GPT2LMHeadModel, Path]] = {}

    def get(shape: str) -> tuple[GPT2LMHeadModel, Path]:
        if shape not in made:
            directory = tmp_path_factory.mktemp(shape)
            made[shape] = saved_hf_model(shape, directory), directory
        return made[shape]

    return get


def max_logit_diff(ours: GPTModel, hf: GPT2LMHeadModel, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours.eval()(ids) - hf(ids).logits).abs().max().item()


def random_ids(cfg: GPTConfig, batch: int, tokens: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(2))


def assert_same_weights(model: torch.nn.Module, expected: torch.nn.Module) -> None:
    """Every tensor of ``expected`` is in ``model``, bit for bit (HF's layout may add zero biases)."""
    state = model.state_dict()
    for name, tensor in expected.state_dict().items():
        assert torch.equal(state[name], tensor), name


# ------------------------------------------------------------- same numbers as transformers

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("shape", ["tiny", "heads6", "gpt2-small"])
def test_logits_match_transformers(hf_checkpoint, shape, attn):
    hf, directory = hf_checkpoint(shape)
    hf.set_attn_implementation(attn)
    model = GPTModel.from_pretrained(directory)
    assert model.cfg.n_heads == SHAPES[shape]["n_head"] and model.cfg.tie_weights
    # Full context for the small shapes; a short batch keeps gpt2-small fast.
    tokens = 32 if shape == "gpt2-small" else model.cfg.context_length
    diff = max_logit_diff(model, hf, random_ids(model.cfg, 3, tokens))
    print(f"\nmax |logit diff| {shape} ({attn}, 3x{tokens} tokens): {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("shape", ["tiny", "heads6", pytest.param("gpt2-small", marks=pytest.mark.slow)])
def test_greedy_continuation_matches_transformers(hf_checkpoint, shape):
    hf, directory = hf_checkpoint(shape)
    model = GPTModel.from_pretrained(directory)
    prompt = random_ids(model.cfg, 1 if shape == "gpt2-small" else 2, 6)
    with torch.no_grad():
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=50,
                               do_sample=False, pad_token_id=0)
    assert expected.shape == (prompt.shape[0], 56)
    for use_cache in (True, False):
        assert torch.equal(generate(model, prompt, 50, use_cache=use_cache), expected), use_cache


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("qkv_bias", [True, False], ids=["qkv_bias", "no_qkv_bias"])
def test_export_hf_round_trip(tmp_path, qkv_bias, tie):
    cfg = GPTConfig(vocab_size=300, context_length=32, emb_dim=48, n_heads=3, n_layers=2,
                    drop_rate=0.0, qkv_bias=qkv_bias, tie_weights=tie)
    model = GPTModel(cfg).eval()
    with torch.no_grad():  # random biases and LayerNorms as well, so every tensor counts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    export_hf(model, tmp_path)

    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == tie
    ids = random_ids(cfg, 2, cfg.context_length)
    diff = max_logit_diff(model, hf, ids)
    print(f"\nmax |logit diff| export_hf qkv_bias={qkv_bias} tie={tie}: {diff:.2e}")
    assert diff < TOL
    # minigpt reads its own export back exactly, weight for weight; its weights are then
    # transposed views of HF's layout, so the products sum in another order: equal logits to float32 rounding.
    reloaded = GPTModel.from_pretrained(tmp_path).eval()
    assert_same_weights(reloaded, model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), model(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("qkv_bias", [True, False], ids=["qkv_bias", "no_qkv_bias"])
def test_hf_shapes_are_the_shapes_minigpt_to_hf_produces(qkv_bias, tie):
    cfg = GPTConfig(vocab_size=70, context_length=12, emb_dim=24, n_heads=3, n_layers=2,
                    qkv_bias=qkv_bias, tie_weights=tie)
    state = GPTModel(cfg).state_dict()
    produced = {name: tuple(t.shape) for name, t in minigpt_to_hf(state, cfg).items()}
    assert hf_shapes({name: tuple(t.shape) for name, t in state.items()}, cfg) == produced
    assert produced["h.1.attn.c_attn.weight"] == (24, 72) and produced["h.0.mlp.c_proj.weight"] == (96, 24)
    assert ("lm_head.weight" in produced) == (not tie)


def test_the_table_names_every_parameter():
    cfg = GPTConfig(vocab_size=70, context_length=12, emb_dim=24, n_heads=3, n_layers=2, qkv_bias=True)
    ours = {row[0].format(i=i) for row in HF_TO_MINIGPT for i in range(cfg.n_layers)}
    assert ours == set(GPTModel(cfg).state_dict())


def test_openai_file_layout_loads(hf_checkpoint, tmp_path):
    """OpenAI's published files have no ``transformer.`` prefix, keep the causal-mask
    buffers ``h.N.attn.bias``/``masked_bias`` and say ``n_ctx``; none of that matters."""
    hf, directory = hf_checkpoint("tiny")
    n = SHAPES["tiny"]["n_positions"]
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(directory / "model.safetensors").items()}
    for i in range(SHAPES["tiny"]["n_layer"]):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, tmp_path / "model.safetensors")
    config = {**SHAPES["tiny"], "n_ctx": n, "model_type": "gpt2"}
    del config["n_positions"]
    (tmp_path / "config.json").write_text(json.dumps(config))

    model = GPTModel.from_pretrained(tmp_path)
    assert max_logit_diff(model, hf, random_ids(model.cfg, 2, n)) < TOL


def test_sharded_checkpoint_loads(hf_checkpoint, tmp_path):
    hf, _ = hf_checkpoint("tiny")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = GPTModel.from_pretrained(tmp_path)
    assert max_logit_diff(model, hf, random_ids(model.cfg, 2, 16)) < TOL


def rewrite_checkpoint(source: Path, target: Path, edit_tensors=None, edit_config=None) -> Path:
    """Copy a checkpoint directory, editing its tensors and/or its config on the way."""
    tensors = load_file(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, target / "model.safetensors")
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("field, value", [
    ("activation_function", "relu"),
    ("scale_attn_by_inverse_layer_idx", True),
    ("reorder_and_upcast_attn", True),
    ("layer_norm_epsilon", 1e-6),
    ("n_inner", 100),
    ("model_type", "gpt_neo"),
])
def test_unsupported_hf_config_is_refused(hf_checkpoint, tmp_path, field, value):
    _, directory = hf_checkpoint("tiny")
    rewrite_checkpoint(directory, tmp_path, edit_config=lambda c: c.update({field: value}))
    with pytest.raises(ValueError, match=f"does not implement: {field}="):
        GPTModel.from_pretrained(tmp_path)


def test_cli_generate_accepts_a_directory(tmp_path, capsys):
    random_hf_model(**{**SHAPES["tiny"], "vocab_size": 50257}).save_pretrained(tmp_path)
    assert cli_main(["generate", "--model", str(tmp_path), "--prompt", "Every effort moves you",
                     "--max-new-tokens", "5", "--temperature", "1.4", "--top-k", "25", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("Every effort moves you")
