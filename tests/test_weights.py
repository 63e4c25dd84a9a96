"""Weights: minigpt runs GPT-2 checkpoints exactly as transformers does.

No real GPT-2 weights exist offline, so the references are transformers' own
``GPT2LMHeadModel``s with random weights, saved with ``save_pretrained``. Run with
``-s`` to see the logit differences measured.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minigpt import weights
from minigpt.cli import main as cli_main
from minigpt.config import GPTConfig
from minigpt.download import ChecksumError, sha256_of
from minigpt.generation import generate
from minigpt.model import GPTModel

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


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """``shape -> (transformers model, its save_pretrained directory)``, each built once."""
    made: dict[str, tuple[GPT2LMHeadModel, Path]] = {}

    def get(shape: str) -> tuple[GPT2LMHeadModel, Path]:
        if shape not in made:
            model = random_hf_model(**SHAPES[shape])
            directory = tmp_path_factory.mktemp(shape)
            model.save_pretrained(directory)
            made[shape] = model, directory
        return made[shape]

    return get


def max_logit_diff(ours: GPTModel, hf: GPT2LMHeadModel, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours.eval()(ids) - hf(ids).logits).abs().max().item()


def random_ids(cfg: GPTConfig, batch: int, tokens: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(2))


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
    weights.export_hf(model, tmp_path)

    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == tie
    ids = random_ids(cfg, 2, cfg.context_length)
    diff = max_logit_diff(model, hf, ids)
    print(f"\nmax |logit diff| export_hf qkv_bias={qkv_bias} tie={tie}: {diff:.2e}")
    assert diff < TOL
    with torch.no_grad():  # and minigpt reads its own export back exactly
        assert torch.equal(GPTModel.from_pretrained(tmp_path).eval()(ids), model(ids))


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


def test_loading_maps_the_file_instead_of_copying(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("tiny")
    file_size = (directory / "model.safetensors").stat().st_size
    model = GPTModel.from_pretrained(directory)
    # Every parameter, the transposed and split ones included, is a view into the mapped file.
    assert all(p.untyped_storage().nbytes() == file_size for p in model.parameters())
    assert model.out_head.weight is model.tok_emb.weight

    model.save_pretrained(tmp_path)  # views of one file save fine, and load back the same
    reloaded = GPTModel.from_pretrained(tmp_path)
    ids = random_ids(model.cfg, 2, 16)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids), model.eval()(ids))


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


# ------------------------------------------------------------------------- clear errors

def rewrite_checkpoint(source: Path, target: Path, edit_tensors=None, edit_config=None) -> Path:
    tensors = load_file(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, target / "model.safetensors")
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_missing_tensor_is_named(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("tiny")
    rewrite_checkpoint(directory, tmp_path, edit_tensors=lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(ValueError, match=r"missing tensors \['h\.1\.mlp\.c_fc\.bias'\]"):
        GPTModel.from_pretrained(tmp_path)


def test_wrong_shape_names_the_tensor_and_both_shapes(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("tiny")

    def shrink(t):
        t["transformer.h.0.attn.c_attn.weight"] = torch.zeros(32, 95)
    rewrite_checkpoint(directory, tmp_path, edit_tensors=shrink)
    with pytest.raises(ValueError, match=re.escape("h.0.attn.c_attn.weight: file has (32, 95), model expects (32, 96)")):
        GPTModel.from_pretrained(tmp_path)


def test_config_that_does_not_match_the_weights(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("tiny")
    rewrite_checkpoint(directory, tmp_path, edit_config=lambda c: c.update(n_layer=3, n_embd=64))
    with pytest.raises(ValueError, match="does not match its config") as err:
        GPTModel.from_pretrained(tmp_path)
    assert "h.2.ln_1.weight" in str(err.value) and "wte.weight: file has (211, 32), model expects (211, 64)" in str(err.value)


def test_tied_config_with_a_different_head_is_refused(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("tiny")

    def add_head(t):
        t["lm_head.weight"] = torch.randn_like(t["transformer.wte.weight"])
    rewrite_checkpoint(directory, tmp_path, edit_tensors=add_head)
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        GPTModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("field, value", [
    ("activation_function", "relu"),
    ("scale_attn_by_inverse_layer_idx", True),
    ("reorder_and_upcast_attn", True),
    ("layer_norm_epsilon", 1e-6),
    ("n_inner", 100),
    ("model_type", "llama"),
])
def test_unsupported_hf_config_is_refused(hf_checkpoint, tmp_path, field, value):
    _, directory = hf_checkpoint("tiny")
    rewrite_checkpoint(directory, tmp_path, edit_config=lambda c: c.update({field: value}))
    with pytest.raises(ValueError, match=f"does not implement: {field}="):
        GPTModel.from_pretrained(tmp_path)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="gpt2-small, gpt2-medium, gpt2-large, gpt2-xl"):
        GPTModel.from_pretrained("gpt2-tiny")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_file_is_named(hf_checkpoint, tmp_path, damage):
    _, directory = hf_checkpoint("tiny")
    rewrite_checkpoint(directory, tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 100)
    with pytest.raises(ValueError, match=re.escape(f"{path} is corrupt or truncated")):
        GPTModel.from_pretrained(tmp_path)


# ------------------------------------------------------------------ download by name

class FakeHub:
    """huggingface.co on 127.0.0.1: ``/<repo>/resolve/main/<file>`` redirects (302, with
    ``X-Linked-Etag`` when set) to ``/cdn/<file>``, which honours ``Range`` requests."""

    def __init__(self, root: Path) -> None:
        self.root, self.etags, self.truncate_once, self.requests = root, {}, set(), []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.serve(self, body=False)

            def do_GET(self) -> None:
                hub.serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((handler.command, handler.path, handler.headers.get("Range")))
        name = handler.path.rsplit("/", 1)[-1]
        if not (self.root / name).is_file():
            handler.send_error(404)
        elif "/resolve/" in handler.path:
            handler.send_response(302)
            handler.send_header("Location", f"/cdn/{name}")
            if name in self.etags:
                handler.send_header("X-Linked-Etag", f'"{self.etags[name]}"')
            handler.send_header("Content-Length", "0")
            handler.end_headers()
        else:
            data = (self.root / name).read_bytes()
            match = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range") or "")
            start = int(match.group(1)) if match else 0
            handler.send_response(206 if start else 200)
            if start:
                handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            handler.send_header("Content-Length", str(len(data) - start))
            handler.end_headers()
            if body:
                sent = data[start:]
                if name in self.truncate_once:  # the connection drops halfway
                    self.truncate_once.discard(name)
                    sent = sent[: len(sent) // 2]
                handler.wfile.write(sent)


@pytest.fixture
def hub(hf_checkpoint, tmp_path, monkeypatch):
    """The tiny checkpoint published as ``gpt2-small`` on a local server; downloads land in tmp."""
    _, directory = hf_checkpoint("tiny")
    fake = FakeHub(directory)
    monkeypatch.setattr(weights, "HF_BASE_URL", fake.url)
    monkeypatch.setattr(weights, "KNOWN_SHA256", {})
    monkeypatch.setenv("MINIGPT_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.delenv("MINIGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def sha_of(hub: FakeHub, name: str = "model.safetensors") -> str:
    return sha256_of(hub.root / name)


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def test_download_by_name_verifies_and_then_needs_no_network(hub, hf_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(weights.KNOWN_SHA256, ("gpt2-small", "model.safetensors"), sha_of(hub))
    assert cli_main(["download", "gpt2-small"]) == 0
    target = tmp_path / "weights" / "gpt2-small"
    assert str(target) in capsys.readouterr().out
    assert sorted(p.name for p in files_under(target)) == ["config.json", "model.safetensors"]

    hub.requests.clear()
    model = GPTModel.from_pretrained("gpt2-small")
    assert hub.requests == []  # the verified copy is used as is
    hf, _ = hf_checkpoint("tiny")
    assert max_logit_diff(model, hf, random_ids(model.cfg, 2, 16)) < TOL


def test_wrong_checksum_is_an_error_and_leaves_nothing(hub, tmp_path, monkeypatch):
    monkeypatch.setitem(weights.KNOWN_SHA256, ("gpt2-small", "model.safetensors"), "0" * 64)
    with pytest.raises(ChecksumError, match="gpt2/resolve/main/model.safetensors"):
        GPTModel.from_pretrained("gpt2-small", progress=False)
    assert files_under(tmp_path / "weights") == []


def test_interrupted_download_resumes_with_a_range_request(hub, tmp_path, monkeypatch):
    monkeypatch.setitem(weights.KNOWN_SHA256, ("gpt2-small", "model.safetensors"), sha_of(hub))
    hub.truncate_once.add("model.safetensors")
    with pytest.raises(ConnectionError, match="call again to resume"):
        GPTModel.from_pretrained("gpt2-small", progress=False)
    part = tmp_path / "weights" / "gpt2-small" / "model.safetensors.part"
    received = part.stat().st_size
    assert 0 < received < (hub.root / "model.safetensors").stat().st_size

    GPTModel.from_pretrained("gpt2-small", progress=False)
    assert ("GET", "/cdn/model.safetensors", f"bytes={received}-") in hub.requests
    assert sha256_of(tmp_path / "weights" / "gpt2-small" / "model.safetensors") == sha_of(hub)


@pytest.mark.parametrize("etag_ok", [True, False], ids=["right_etag", "wrong_etag"])
def test_unknown_checksum_is_taken_from_the_linked_etag(hub, tmp_path, etag_ok):
    hub.etags["model.safetensors"] = sha_of(hub) if etag_ok else "f" * 64
    if etag_ok:
        GPTModel.from_pretrained("gpt2-small", progress=False)
    else:
        with pytest.raises(ChecksumError):
            GPTModel.from_pretrained("gpt2-small", progress=False)
        assert files_under(tmp_path / "weights") == []
    assert ("HEAD", "/openai-community/gpt2/resolve/main/model.safetensors", None) in hub.requests


def test_unverifiable_download_warns(hub):
    with pytest.warns(UserWarning, match="cannot verify"):
        GPTModel.from_pretrained("gpt2-small", progress=False)


def test_local_copy_in_data_dir_needs_no_network(hf_checkpoint, tmp_path, monkeypatch):
    _, directory = hf_checkpoint("tiny")
    (tmp_path / "gpt2-medium").mkdir()
    rewrite_checkpoint(directory, tmp_path / "gpt2-medium")
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(weights, "HF_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    assert GPTModel.from_pretrained("gpt2-medium").cfg.emb_dim == SHAPES["tiny"]["n_embd"]


@pytest.mark.parametrize("name", ["gpt2-small", "gpt2-xl"])  # with and without a known hash
def test_offline_download_is_a_connection_error(tmp_path, monkeypatch, name):
    monkeypatch.setattr(weights, "HF_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("MINIGPT_DATA_DIR", raising=False)
    with pytest.raises(ConnectionError, match="could not download"):
        GPTModel.from_pretrained(name, weights_dir=tmp_path, progress=False)
    assert files_under(tmp_path) == []


def test_cli_generate_accepts_a_directory(tmp_path, capsys):
    pytest.importorskip("minigpt.tokenizer")
    random_hf_model(**{**SHAPES["tiny"], "vocab_size": 50257}).save_pretrained(tmp_path)
    assert cli_main(["generate", "--model", str(tmp_path), "--prompt", "Every effort moves you",
                     "--max-new-tokens", "5", "--temperature", "1.4", "--top-k", "25", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("Every effort moves you")


def test_a_tensor_of_another_dtype_is_named(tmp_path):
    from safetensors.torch import save_file

    model = GPTModel(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["final_norm.scale"] = state["final_norm.scale"].half()
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"final_norm.scale \(torch.float16\)"):
        GPTModel.from_pretrained(tmp_path)


def test_a_file_shorter_than_its_header_length_is_named(tmp_path):
    model = GPTModel(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="model.safetensors is corrupt or truncated: it has 2 bytes"):
        GPTModel.from_pretrained(tmp_path)
