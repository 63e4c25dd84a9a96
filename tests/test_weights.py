"""Loading and saving weights: files are memory-mapped, never copied; every damaged or
mismatched checkpoint is refused with an error that names the file and each tensor.

References are transformers' ``GPT2LMHeadModel``s with random weights (see
``test_hf_gpt2.py``, whose helpers build them).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_hf_gpt2 import assert_same_weights, random_ids, rewrite_checkpoint, saved_hf_model

from minigpt.io.files import sha256_of
from minigpt.io.state_dict import tensor_mismatches
from minigpt.io.weight_files import read_safetensors
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.model import GPTModel
from minigpt.training.checkpoint import load_state

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny GPT-2 saved by transformers (random weights in every tensor)."""
    directory = tmp_path_factory.mktemp("tiny")
    saved_hf_model("tiny", directory)
    return directory


def small_model(**overrides) -> GPTModel:
    return GPTModel(GPTConfig(**{**dict(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1),
                                 **overrides}))


# ----------------------------------------------------------------- mapped, not copied

def file_mappings(path: Path) -> list[tuple[int, int, str]]:
    """``(start, end, permissions)`` of this process's memory mappings of ``path``."""
    mappings = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            mappings.append((start, end, fields[1]))
    return mappings


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the memory map in /proc (Linux)")
def test_loading_maps_the_file_instead_of_copying(tiny_checkpoint, tmp_path):
    weights_file = tiny_checkpoint / "model.safetensors"
    before = sha256_of(weights_file)
    model = GPTModel.from_pretrained(tiny_checkpoint)
    mappings = file_mappings(weights_file)
    assert mappings and all("p" in perms for _, _, perms in mappings)  # mapped privately
    # Every parameter, the transposed and split ones included, lies inside the mapped file.
    for name, p in model.named_parameters():
        storage = p.untyped_storage()
        begin, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        assert any(start <= begin and end <= stop for start, stop, _ in mappings), name
    assert model.out_head.weight is model.tok_emb.weight

    with torch.no_grad():  # training writes to private copies of the touched pages, never to the file
        model.final_norm.scale.add_(1.0)
    assert sha256_of(weights_file) == before

    model.save_pretrained(tmp_path)  # views of one file save fine, and load back the same
    reloaded = GPTModel.from_pretrained(tmp_path)
    assert_same_weights(reloaded, model)
    ids = random_ids(model.cfg, 2, 16)
    with torch.no_grad():  # the same to float32 rounding: a transposed view sums in another order
        torch.testing.assert_close(reloaded.eval()(ids), model.eval()(ids), rtol=1e-5, atol=1e-5)


def test_loading_imports_neither_the_compiler_nor_the_hub_client(tiny_checkpoint, tmp_path):
    """Building the model on the ``meta`` device must not pull in ``torch._dynamo`` (about
    70 MB of memory, counted against loading), and loading a directory needs no hub client."""
    small_model().save_pretrained(tmp_path)
    code = (
        "import sys, torch\n"
        "from minigpt.models.gpt2.model import GPTModel\n"
        "for d in sys.argv[1:]:\n"
        "    with torch.no_grad():\n"
        "        GPTModel.from_pretrained(d).eval()(torch.tensor([[1, 2, 3]]))\n"
        "print(sorted(m for m in ('torch._dynamo', 'huggingface_hub', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tiny_checkpoint), str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_book_pth_state_dict_loads(tmp_path):
    cfg = GPTConfig(vocab_size=300, context_length=32, emb_dim=48, n_heads=4, n_layers=2, qkv_bias=True)
    model = GPTModel(cfg).eval()
    state = model.state_dict()
    for i in range(cfg.n_layers):  # the book's attention saves its float causal mask
        state[f"trf_blocks.{i}.att.mask"] = torch.triu(torch.ones(32, 32), diagonal=1)
    torch.save(state, tmp_path / "model.pth")
    torch.save({"model_state_dict": state, "optimizer_state_dict": {}}, tmp_path / "model_and_optimizer.pth")

    ids = random_ids(cfg, 2, 32)
    for name in ("model.pth", "model_and_optimizer.pth"):
        loaded = GPTModel.from_pretrained(tmp_path / name, cfg=cfg.to_dict())
        with torch.no_grad():
            assert torch.equal(loaded.eval()(ids), model(ids))
    with pytest.raises(ValueError, match="cfg="):
        GPTModel.from_pretrained(tmp_path / "model.pth")


def test_read_safetensors_returns_the_files_tensors(tmp_path):
    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    save_file(tensors, tmp_path / "t.safetensors")
    read = read_safetensors(tmp_path / "t.safetensors")
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)


# ------------------------------------------------------------------------- clear errors

def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    rewrite_checkpoint(tiny_checkpoint, tmp_path, edit_tensors=lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(ValueError, match=r"missing tensors \['h\.1\.mlp\.c_fc\.bias'\]"):
        GPTModel.from_pretrained(tmp_path)


def test_wrong_shape_names_the_tensor_and_both_shapes(tiny_checkpoint, tmp_path):
    def shrink(t):
        t["transformer.h.0.attn.c_attn.weight"] = torch.zeros(32, 95)
    rewrite_checkpoint(tiny_checkpoint, tmp_path, edit_tensors=shrink)
    message = "h.0.attn.c_attn.weight: file has (32, 95), model expects (32, 96)"
    with pytest.raises(ValueError, match=re.escape(message)):
        GPTModel.from_pretrained(tmp_path)


def test_config_that_does_not_match_the_weights(tiny_checkpoint, tmp_path):
    rewrite_checkpoint(tiny_checkpoint, tmp_path, edit_config=lambda c: c.update(n_layer=3, n_embd=64))
    with pytest.raises(ValueError, match="does not match its config") as err:
        GPTModel.from_pretrained(tmp_path)
    assert "h.2.ln_1.weight" in str(err.value)
    assert "wte.weight: file has (211, 32), model expects (211, 64)" in str(err.value)


def test_tied_config_with_a_different_head_is_refused(tiny_checkpoint, tmp_path):
    def add_head(t):
        t["lm_head.weight"] = torch.randn_like(t["transformer.wte.weight"])
    rewrite_checkpoint(tiny_checkpoint, tmp_path, edit_tensors=add_head)
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        GPTModel.from_pretrained(tmp_path)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="gpt2-small, gpt2-medium, gpt2-large, gpt2-xl"):
        GPTModel.from_pretrained("gpt2-tiny")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_file_is_named(tiny_checkpoint, tmp_path, damage):
    rewrite_checkpoint(tiny_checkpoint, tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 100)
    with pytest.raises(ValueError, match=re.escape(f"{path} is corrupt or truncated")) as err:
        GPTModel.from_pretrained(tmp_path)
    if damage == "truncated":  # the first tensor whose bytes are missing is named
        assert re.search(r"truncated: tensor '[\w.]+' \(\d+(, \d+)*\) needs bytes \[\d+, \d+\)", str(err.value))
    else:
        assert "it has 100 bytes" in str(err.value)


def test_a_tensor_of_another_dtype_is_named(tmp_path):
    small_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["final_norm.scale"] = state["final_norm.scale"].half()
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"final_norm.scale \(torch.float16\)"):
        GPTModel.from_pretrained(tmp_path)


def test_a_file_shorter_than_its_header_length_is_named(tmp_path):
    small_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="model.safetensors is corrupt or truncated: it has 2 bytes"):
        GPTModel.from_pretrained(tmp_path)


def test_a_config_that_is_not_json_is_named(tmp_path):
    small_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{emb_dim: 16")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'config.json'} is not valid JSON")):
        GPTModel.from_pretrained(tmp_path)


# ------------------------------------------------------------ saving, and load_state

def test_save_pretrained_stores_a_tied_head_once_and_atomically(tmp_path):
    model = small_model(tie_weights=True)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temporary left
    assert "out_head.weight" not in load_file(tmp_path / "model.safetensors")
    assert json.loads((tmp_path / "config.json").read_text()) == model.cfg.to_dict()
    assert GPTModel.from_pretrained(tmp_path).out_head.weight is not None


def test_a_tensor_under_two_names_is_stored_once(tmp_path):
    class Wrapped(torch.nn.Module):  # as LoRA wraps a layer: the tied head is now out_head.linear
        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            self.linear = linear

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x)

    model = small_model(tie_weights=True)
    model.out_head = Wrapped(model.out_head)
    state = model.state_dict()
    assert state["out_head.linear.weight"].data_ptr() == state["tok_emb.weight"].data_ptr()
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert "tok_emb.weight" in stored and "out_head.linear.weight" not in stored
    assert set(stored) == set(state) - {"out_head.linear.weight"}


def test_load_state_returns_the_saved_tensors(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path)
    state = load_state(tmp_path)
    expected = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_load_state_refuses_mixed_dtypes_and_damaged_files(tmp_path):
    small_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({**state, "pos_emb.weight": state["pos_emb.weight"].double()}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"pos_emb.weight \(torch.float64\)"):
        load_state(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_state(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        load_state(tmp_path / "elsewhere")


def test_tensor_mismatches_names_every_problem():
    expected = {"a": (2, 3), "b": (4,), "c": (1,)}
    found = {"a": torch.zeros(3, 2), "b": torch.zeros(4), "d": torch.zeros(1)}
    assert tensor_mismatches(expected, found) == [
        "missing tensors ['c']",
        "unexpected tensors ['d']",
        "tensors of the wrong shape: a: file has (3, 2), model expects (2, 3)",
    ]
    assert tensor_mismatches(expected, {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}) == []

