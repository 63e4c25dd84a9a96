"""Hugging Face Llama-family checkpoints: our logits and greedy continuations equal
transformers' on random-weight models shaped like the real ones, saved in float32 and
bfloat16, in one file or in shards; export round-trips; damaged files fail clearly."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import QuietHandler
from safetensors.torch import load_file, save_file

from minigpt.generation.generate import generate
from minigpt.io import hub, hub_llama
from minigpt.models.llama.hf_layout import export_llama
from minigpt.models.llama.model import LlamaModel
from minigpt.models.loader import load
from minigpt.runtime.linear import Linear

transformers = pytest.importorskip("transformers", reason="the reference implementation comes from transformers")

TOL = 1e-4
CONTEXT = 32
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8)
# Small configs mirroring the real ones.
CONFIGS = {
    # SmolLM2-135M scaled down: its vocabulary, 9 query and 3 key/value heads, tied embeddings.
    "smollm2": ("LlamaConfig", dict(vocab_size=49152, hidden_size=72, intermediate_size=192, num_hidden_layers=2,
                                    num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                                    rope_theta=100000.0, tie_word_embeddings=True)),
    "llama-mha": ("LlamaConfig", dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)),
    # Llama 3.2's long-context RoPE, with a short original context so the scaling matters here.
    "llama3-gqa": ("LlamaConfig", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                                       rope_scaling=LLAMA3, tie_word_embeddings=True)),
    # Qwen3: per-head RMSNorm on queries and keys, head_dim set apart from hidden_size / heads.
    "qwen3": ("Qwen3Config", dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                                  tie_word_embeddings=True)),
}


def reference_model(name: str):
    config_class, values = CONFIGS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(max_position_embeddings=CONTEXT, **values)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random norms, so that a swapped or missing norm weight shows
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.uniform_(0.5, 1.5)
    return model


def saved(name: str, directory: Path, dtype: torch.dtype = torch.float32, sharded: bool = False) -> Path:
    model = reference_model(name).to(dtype)
    model.save_pretrained(directory, max_shard_size="20KB" if sharded else "10GB")
    return directory


def reference_from(directory: Path, dtype: torch.dtype = torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def random_ids(vocab_size: int, batch: int = 2, tokens: int = CONTEXT) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sharded", [False, True])
def test_logits_equal_transformers_at_full_context(tmp_path, one_thread, name, dtype, sharded):
    directory = saved(name, tmp_path, dtype, sharded)
    assert (directory / "model.safetensors.index.json").is_file() == sharded
    reference = reference_from(directory)  # both in float32: the bfloat16 file's values exactly
    model = load(directory, dtype=torch.float32).eval()
    ids = random_ids(model.cfg.vocab_size)
    with torch.no_grad():
        expected = reference(ids).logits
        for use_sdpa in (True, False):
            model.set_attention_impl(use_sdpa)
            assert (model(ids) - expected).abs().max() < TOL


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_continuations_equal_transformers_generate(tmp_path, one_thread, name):
    directory = saved(name, tmp_path)
    reference, model = reference_from(directory), load(directory).eval()
    prompt = random_ids(model.cfg.vocab_size, tokens=8)
    expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                  do_sample=False, pad_token_id=0)
    for use_cache in (True, False):
        assert torch.equal(generate(model, prompt, 16, use_cache=use_cache), expected)


@pytest.mark.parametrize("name", ["smollm2", "llama3-gqa", "qwen3"])
def test_bfloat16_logits_and_continuations_equal_transformers_bit_for_bit(tmp_path, one_thread, name):
    directory = saved(name, tmp_path, torch.bfloat16)
    reference, model = reference_from(directory, torch.bfloat16), load(directory).eval()
    ids = random_ids(model.cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids).logits)
    prompt = ids[:, :8]
    expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                  do_sample=False, pad_token_id=0)
    assert torch.equal(generate(model, prompt, 12), expected)


def test_left_padded_batch_equals_transformers(tmp_path, one_thread):
    directory = saved("llama3-gqa", tmp_path)
    reference, model = reference_from(directory), load(directory).eval()
    ids = random_ids(512)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # row 0 is left-padded
    with torch.no_grad():
        expected, ours = reference(ids, attention_mask=mask).logits, model(ids, attention_mask=mask)
    assert (ours[0, 7:] - expected[0, 7:]).abs().max() < TOL
    assert (ours[1] - expected[1]).abs().max() < TOL


def test_bfloat16_file_loads_as_bfloat16_views(tmp_path):
    directory = saved("smollm2", tmp_path, torch.bfloat16)
    model = load(directory)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.out_head.weight is model.tok_emb.weight  # the tied head is one tensor
    stored = load_file(directory / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(model.trf_blocks[1].ff.fc3.weight, stored)


@pytest.mark.parametrize("name", ["llama-mha", "qwen3"])
def test_export_round_trips_through_transformers(tmp_path, one_thread, name):
    model = load(saved(name, tmp_path / "in")).eval()
    model.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == CONFIGS[name][0].removesuffix("Config").lower()
    reloaded = reference_from(tmp_path / "out")
    ids = random_ids(model.cfg.vocab_size)
    with torch.no_grad():
        assert (reloaded(ids).logits - model(ids)).abs().max() < TOL
    again = LlamaModel.from_pretrained(tmp_path / "out")
    assert again.cfg == model.cfg
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values(), strict=True))


def test_loading_quantized_replaces_the_block_linears(tmp_path):
    from minigpt.quantization.layers import QUANTIZED_LAYERS
    from minigpt.quantization.model import is_quantized

    directory = saved("llama-mha", tmp_path)
    full, quantized = load(directory).eval(), load(directory, quantize="nf4").eval()
    assert is_quantized(quantized) and isinstance(quantized.trf_blocks[0].ff.fc2, QUANTIZED_LAYERS)
    assert type(quantized.out_head) is Linear  # the head stays in full precision
    ids = random_ids(full.cfg.vocab_size)
    with torch.no_grad():
        difference = (quantized(ids) - full(ids)).abs().max()
    assert 0 < difference < 0.1 * full(ids).abs().max()


def test_export_refuses_lora_layers(tmp_path):
    from minigpt.lora.adapters import apply_lora

    model = load(saved("llama-mha", tmp_path / "in"))
    apply_lora(model, rank=2, alpha=2)
    with pytest.raises(ValueError, match="merge_lora"):
        export_llama(model, tmp_path / "out")


def test_missing_or_misshapen_tensors_are_named(tmp_path):
    directory = saved("llama-mha", tmp_path)
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        load(directory)
    assert "model.layers.1.self_attn.k_proj.weight" in str(err.value)
    assert "model.norm.weight" in str(err.value)


def test_truncated_file_and_missing_config_fail_clearly(tmp_path):
    directory = saved("llama-mha", tmp_path)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load(directory)
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(directory)
    with pytest.raises(FileNotFoundError, match="nowhere not found"):
        load(tmp_path / "nowhere")


def test_unsupported_variant_is_refused_by_name(tmp_path):
    directory = saved("llama-mha", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        load(directory)


# ---------------------------------------------------------------------------- names on the hub

def test_a_known_name_in_the_data_dir_loads_without_network(tmp_path, monkeypatch):
    saved("smollm2", tmp_path / "smollm2-135m")
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load("smollm2-135m").cfg.n_kv_heads == 3


def test_gated_model_without_a_token_says_how_to_get_access(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no stored login either
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(PermissionError) as err:
        hub_llama.download_llama("llama-3.2-1b", tmp_path / "weights", progress=False)
    message = str(err.value)
    assert "HF_TOKEN" in message and "https://huggingface.co/meta-llama/Llama-3.2-1B" in message
    assert not (tmp_path / "weights").exists()


def test_offline_without_a_copy_says_where_to_put_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="Without internet"):
        hub_llama.download_llama("smollm2-135m", progress=False)


def test_every_name_is_pinned_to_a_commit():
    for name, (repo, revision, gated) in hub_llama.LLAMA_REPOS.items():
        assert len(revision) == 40 and int(revision, 16) >= 0, name
        assert gated == repo.startswith("meta-llama/"), name
    assert set(hub.GPT2_REPOS).isdisjoint(hub_llama.LLAMA_REPOS)
    assert os.environ.get("MINIGPT_DATA_DIR") is None  # the fixture isolates each test


class LlamaHubHandler(QuietHandler):
    """A stand-in hub for one repository at one commit: the file list (``/api/models/{repo}/revision/{commit}``
    or ``.../tree/{commit}``) and each file (``/{repo}/resolve/{commit}/{file}``).
    ``gated`` answers every request as the hub does for a gated model without access."""

    def do_HEAD(self) -> None:
        self.answer(body=False)

    def do_GET(self) -> None:
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        hub = self.server.hub
        repo, commit = hub["repo"], hub["commit"]
        path = self.path.split("?")[0]
        data, headers = None, {"X-Repo-Commit": commit}
        if hub["gated"]:
            self.send_response(403)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to model is restricted")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path == f"/api/models/{repo}/revision/{commit}":
            siblings = [{"rfilename": name} for name in hub["files"]]
            data = json.dumps({"id": repo, "sha": commit, "siblings": siblings}).encode()
        elif path == f"/api/models/{repo}/tree/{commit}":
            data = json.dumps([{"type": "file", "path": name, "size": len(content),
                                "oid": hashlib.sha1(content).hexdigest()}
                               for name, content in hub["files"].items()]).encode()
        elif path.startswith(f"/{repo}/resolve/{commit}/") and path.rsplit("/", 1)[1] in hub["files"]:
            data = hub["files"][path.rsplit("/", 1)[1]]
            headers["ETag"] = f'"{hashlib.sha1(data).hexdigest()}"'
        self.send_response(200 if data is not None else 404)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data or b"")))
        self.end_headers()
        if body and data:
            self.wfile.write(data)


def _serve(http_server, monkeypatch, name: str, files: dict[str, bytes], gated: bool = False):
    repo, commit, _ = hub_llama.LLAMA_REPOS[name]
    server = http_server(LlamaHubHandler)
    server.hub = {"repo": repo, "commit": commit, "files": files, "gated": gated}
    monkeypatch.setenv("HF_ENDPOINT", server.base_url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return server


def test_a_name_downloads_its_pinned_commit_weights_and_tokenizer_only(tmp_path, monkeypatch, http_server):
    source = saved("smollm2", tmp_path / "source", sharded=True)
    files = {p.name: p.read_bytes() for p in source.iterdir()}
    files |= {"tokenizer.json": b"{}", "README.md": b"# card", "model.onnx": b"onnx"}
    server = _serve(http_server, monkeypatch, "smollm2-135m", files)
    directory = hub_llama.download_llama("smollm2-135m", tmp_path / "weights", progress=False)
    assert directory == tmp_path / "weights" / "smollm2-135m"
    assert (directory / "tokenizer.json").is_file() and (directory / "model.safetensors.index.json").is_file()
    assert not (directory / "README.md").exists() and not (directory / "model.onnx").exists()
    commit = hub_llama.LLAMA_REPOS["smollm2-135m"][1]
    assert all(commit in path for _, path in server.requests)  # never "main": always the pinned commit
    assert load("smollm2-135m", weights_dir=tmp_path / "weights").cfg.n_heads == 9
    server.requests.clear()
    hub_llama.download_llama("smollm2-135m", tmp_path / "weights", progress=False)
    assert server.requests == []  # a complete earlier download is used without asking the hub


def test_a_gated_refusal_from_the_hub_says_how_to_get_access(tmp_path, monkeypatch, http_server):
    _serve(http_server, monkeypatch, "llama-3.2-1b", {}, gated=True)
    monkeypatch.setenv("HF_TOKEN", "hf_without_access")
    with pytest.raises(PermissionError, match="accept its licence"):
        hub_llama.download_llama("llama-3.2-1b", tmp_path / "weights", progress=False)
