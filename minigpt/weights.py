"""Saving and loading weights: a checkpoint is a dict of named tensors, and loading
one means renaming those tensors onto our modules, straight from the file.

Three formats load with :func:`load_pretrained` (``GPTModel.from_pretrained``):

- minigpt's own directory: ``config.json`` (a :class:`GPTConfig`) + ``model.safetensors``
  with our parameter names;
- a Hugging Face GPT-2 directory (``config.json`` with ``n_embd`` ... + ``model.safetensors``),
  such as OpenAI's released checkpoints, which load by name (``"gpt2-small"``) and are
  downloaded once, verified by SHA-256. :data:`HF_TO_MINIGPT` is the whole mapping;
- the book's ``.pth`` state dict (``torch.save(model.state_dict(), ...)``), given a config.

Memory: a safetensors file is an 8-byte header length, a JSON header, then raw bytes.
:func:`read_safetensors` memory-maps it, the model is built on the ``meta`` device (no
memory) and every parameter is assigned as a *view* into the mapped file, including the
transposed and split Hugging Face tensors. Pages are read when first used, so loading
never holds two copies of the weights (loading plus a forward pass peaks at 1.09x the
file's size; see ``bench/bench_load_memory.py``). The mapping is private: training
writes to copies of the touched pages, never to the file.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import urllib.error
import urllib.request
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors.torch import save_file

from minigpt.attention import CausalAttention, MultiHeadAttention
from minigpt.config import GPTConfig
from minigpt.download import atomic_write, data_dir, download
from minigpt.model import GPTModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SHARD_INDEX_FILE = "model.safetensors.index.json"  # transformers splits large checkpoints
WEIGHTS_DIR_ENV = "MINIGPT_WEIGHTS_DIR"

# OpenAI's released GPT-2 checkpoints, as published in the Hugging Face format.
GPT2_REPOS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
HF_BASE_URL = "https://huggingface.co"

# SHA-256 of the published files (revision 607a30d7 of openai-community/gpt2, the one in
# its Git LFS pointer; 548,105,171 bytes). We could not look up the other sizes' hashes
# offline, so their model.safetensors is checked against the SHA-256 that the hub sends
# in its X-Linked-Etag header, which proves the transfer intact but trusts the server;
# their config.json is not verified at all (a small Git file whose ETag is a Git hash),
# but a config that disagrees with the weights fails the shape check when loading.
KNOWN_SHA256 = {
    ("gpt2-small", WEIGHTS_FILE): "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707",
    ("gpt2-small", CONFIG_FILE): "0daed7749b4f02b8f76240d5444551d7b08712dab4d0adb8239c56ba823bb7b4",
}

# The one mapping between Hugging Face GPT-2 tensors and our parameters ({i}: block index).
# how: "=" same tensor; "T" transposed, because HF's Conv1D stores (in, out) while
# nn.Linear stores (out, in); "q"/"k"/"v": the first/second/third of the fused c_attn
# tensor's last dimension, [query | key | value]; "qT"...: that third, transposed.
#   minigpt parameter                     Hugging Face tensor ("transformer." optional)  how
HF_TO_MINIGPT: tuple[tuple[str, str, str], ...] = (
    ("tok_emb.weight",                     "wte.weight",               "="),
    ("pos_emb.weight",                     "wpe.weight",               "="),
    ("trf_blocks.{i}.norm1.scale",         "h.{i}.ln_1.weight",        "="),
    ("trf_blocks.{i}.norm1.shift",         "h.{i}.ln_1.bias",          "="),
    ("trf_blocks.{i}.att.W_query.weight",  "h.{i}.attn.c_attn.weight", "qT"),
    ("trf_blocks.{i}.att.W_key.weight",    "h.{i}.attn.c_attn.weight", "kT"),
    ("trf_blocks.{i}.att.W_value.weight",  "h.{i}.attn.c_attn.weight", "vT"),
    ("trf_blocks.{i}.att.W_query.bias",    "h.{i}.attn.c_attn.bias",   "q"),
    ("trf_blocks.{i}.att.W_key.bias",      "h.{i}.attn.c_attn.bias",   "k"),
    ("trf_blocks.{i}.att.W_value.bias",    "h.{i}.attn.c_attn.bias",   "v"),
    ("trf_blocks.{i}.att.out_proj.weight", "h.{i}.attn.c_proj.weight", "T"),
    ("trf_blocks.{i}.att.out_proj.bias",   "h.{i}.attn.c_proj.bias",   "="),
    ("trf_blocks.{i}.norm2.scale",         "h.{i}.ln_2.weight",        "="),
    ("trf_blocks.{i}.norm2.shift",         "h.{i}.ln_2.bias",          "="),
    ("trf_blocks.{i}.ff.layers.0.weight",  "h.{i}.mlp.c_fc.weight",    "T"),
    ("trf_blocks.{i}.ff.layers.0.bias",    "h.{i}.mlp.c_fc.bias",      "="),
    ("trf_blocks.{i}.ff.layers.2.weight",  "h.{i}.mlp.c_proj.weight",  "T"),
    ("trf_blocks.{i}.ff.layers.2.bias",    "h.{i}.mlp.c_proj.bias",    "="),
    ("final_norm.scale",                   "ln_f.weight",              "="),
    ("final_norm.shift",                   "ln_f.bias",                "="),
    ("out_head.weight",                    "lm_head.weight",           "="),  # untied heads only
)
# Causal-mask buffers that older GPT-2 files (OpenAI's included) store; we build our own.
_HF_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(masked_)?bias")


# ---------------------------------------------------------------------------- loading

def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    cfg: GPTConfig | Mapping[str, Any] | str | None = None,
    device: str | torch.device = "cpu",
    weights_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> GPTModel:
    """Load a GPT-2 name (``gpt2-small`` ... ``gpt2-xl``), a minigpt or Hugging Face
    directory, or a book ``.pth`` state dict (which needs ``cfg``: a config, dict or preset).

    Names are found in ``MINIGPT_DATA_DIR/<name>/`` or ``weights_dir`` (see
    :func:`download_gpt2`) and downloaded there otherwise. A known name always means
    OpenAI's checkpoint; write ``./gpt2-small`` for a local directory of that name.
    """
    path = Path(name_or_path)
    if path.suffix in (".pth", ".pt") and path.is_file():
        model = _load_pth(path, cfg)
    else:
        if cfg is not None:
            raise ValueError(f"cfg= is only for .pth state dicts; {path} brings its own {CONFIG_FILE}")
        if str(name_or_path) in GPT2_REPOS:
            path = download_gpt2(str(name_or_path), weights_dir, progress=progress)
        elif not path.is_dir():
            raise ValueError(
                f"{str(name_or_path)!r} is neither a GPT-2 name (known: {', '.join(GPT2_REPOS)}) "
                f"nor a directory with {CONFIG_FILE}, nor a .pth state dict"
            )
        model = _load_directory(path)
    return model.to(device)


def _load_directory(directory: Path) -> GPTModel:
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}; is it a weights directory?")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err
    if "emb_dim" in config:  # our own field names
        try:
            cfg = GPTConfig.from_dict(config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{config_path} is not a valid minigpt config: {err}") from err
        return build_model(cfg, _read_weights(directory), source=str(directory))
    if "n_embd" in config or "model_type" in config:  # Hugging Face's
        return _build_from_hf(config_from_hf(config, source=str(config_path)),
                              _read_weights(directory), source=str(directory))
    raise ValueError(f"{config_path} is neither a minigpt config (emb_dim, ...) nor a Hugging Face "
                     "GPT-2 config (n_embd, ...)")


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / WEIGHTS_FILE).is_file():
        return read_safetensors(directory / WEIGHTS_FILE)
    if (directory / SHARD_INDEX_FILE).is_file():
        shards = set(json.loads((directory / SHARD_INDEX_FILE).read_text())["weight_map"].values())
        return {k: v for shard in sorted(shards) for k, v in read_safetensors(directory / shard).items()}
    raise FileNotFoundError(f"{directory} has no {WEIGHTS_FILE}")


def _build_from_hf(cfg: GPTConfig, tensors: Mapping[str, torch.Tensor], source: str) -> GPTModel:
    hf = {name.removeprefix("transformer."): t for name, t in tensors.items()
          if not _HF_MASK_BUFFER.fullmatch(name.removeprefix("transformer."))}
    if cfg.tie_weights:
        _drop_tied_head(hf, "lm_head.weight", "wte.weight", source)
    with torch.device("meta"):  # the shapes our model needs, in Hugging Face's names
        expected = minigpt_to_hf(GPTModel(cfg).state_dict(), cfg)
    _check_tensors(expected, hf, source, cfg)
    return build_model(cfg, hf_to_minigpt(hf, cfg), source)


def _load_pth(path: Path, cfg: GPTConfig | Mapping[str, Any] | str | None) -> GPTModel:
    if cfg is None:
        raise ValueError(
            f"{path} holds only tensors, not the config (n_heads cannot be read from shapes): pass "
            f"it, e.g. from_pretrained({str(path)!r}, cfg=GPTConfig.from_preset('gpt2-small', qkv_bias=True))"
        )
    cfg = GPTConfig.coerce(cfg)
    try:  # weights_only: unpickling arbitrary objects could run code
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for a damaged file
        raise ValueError(f"{path} is corrupt or not a PyTorch state dict: {err}") from err
    state = state.get("model_state_dict", state)  # the book's model-and-optimizer checkpoint
    # The book's attention stores its causal mask as a saved buffer; ours rebuilds it.
    state = {k: v for k, v in state.items() if not k.endswith("att.mask")}
    if cfg.tie_weights:
        _drop_tied_head(state, "out_head.weight", "tok_emb.weight", str(path))
    return build_model(cfg, state, source=str(path))


def _drop_tied_head(state: dict[str, torch.Tensor], head: str, embedding: str, source: str) -> None:
    tensor = state.pop(head, None)
    if tensor is not None and embedding in state and not torch.equal(tensor, state[embedding]):
        raise ValueError(f"{source}: the config ties the output head to the token embedding, "
                         f"but {head} differs from {embedding}; untie it in the config")


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Memory-map a ``.safetensors`` file: ``{name: tensor}`` whose data stays on disk until used.

    Layout: 8 bytes little-endian header size ``n``, ``n`` bytes of JSON
    ``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}}``, then the
    tensors' bytes (offsets count from the end of the header).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 8:
                raise ValueError(f"it has {size} bytes, fewer than the 8-byte header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"the header claims {n} bytes but the file has {size}")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        # shared=False maps the file privately: lazy reads, and writes never reach the file.
        data = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)[8 + n:]
        return {name: _tensor_at(data, name, info) for name, info in header.items()}
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as err:
        raise ValueError(f"{path} is corrupt or truncated: {err}") from err


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _tensor_at(data: torch.Tensor, name: str, info: Mapping[str, Any]) -> torch.Tensor:
    if info.get("dtype") not in _SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {name!r} has unsupported dtype {info.get('dtype')!r}; "
                         f"known: {sorted(_SAFETENSORS_DTYPES)}")
    dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
    begin, end = info["data_offsets"]
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes or end > len(data):
        raise ValueError(f"tensor {name!r} {tuple(shape)} needs bytes [{begin}, {begin + nbytes}) "
                         f"of the data, which has {len(data)} bytes")
    raw = data[begin:end]
    if begin % dtype.itemsize:  # reinterpreting bytes as floats needs aligned data
        raw = raw.clone()
    return raw.view(dtype).view(shape)


def build_model(cfg: GPTConfig, state: Mapping[str, torch.Tensor], source: str) -> GPTModel:
    """A :class:`GPTModel` whose parameters *are* the given tensors (no copy).

    Every expected tensor must be present with the right shape; the error names
    ``source`` and each offending tensor.
    """
    with torch.device("meta"):  # allocates nothing: every parameter is replaced below
        model = GPTModel(cfg)
    expected = model.state_dict()
    if cfg.tie_weights:
        expected.pop("out_head.weight")
    _check_tensors(expected, state, source, cfg)
    model.load_state_dict(dict(state), strict=not cfg.tie_weights, assign=True)
    if cfg.tie_weights:
        model.out_head.weight = model.tok_emb.weight  # assign replaced the shared Parameter
    _materialize_masks(model)
    return model


def tensor_mismatches(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, torch.Tensor]) -> list[str]:
    """What is wrong with ``found`` against the ``expected`` name -> shape table: missing,
    unexpected and wrongly shaped tensors, each named (empty when everything fits)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong_shape = [f"{k}: file has {tuple(found[k].shape)}, model expects {tuple(shape)}"
                   for k, shape in expected.items() if k in found and tuple(found[k].shape) != tuple(shape)]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if wrong_shape:
        problems.append("tensors of the wrong shape: " + "; ".join(wrong_shape))
    return problems


def _check_tensors(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor],
                   source: str, cfg: GPTConfig) -> None:
    problems = tensor_mismatches({k: tuple(v.shape) for k, v in expected.items()}, found)
    dtypes = Counter(t.dtype for t in found.values())
    if len(dtypes) > 1:  # a model of mixed precisions would fail (or silently upcast) later
        usual = dtypes.most_common(1)[0][0]
        odd = sorted(f"{k} ({t.dtype})" for k, t in found.items() if t.dtype != usual)
        problems.append(f"tensors whose dtype differs from the others' {usual}: {odd}")
    if problems:
        raise ValueError(f"{source} does not match its config ({cfg}): " + ", ".join(problems))


def _materialize_masks(model: GPTModel) -> None:
    # Causal masks are buffers that are not saved: recreate the ones left on meta,
    # one tensor shared by every block (they are never written).
    masks: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, (MultiHeadAttention, CausalAttention)):
            n = module.mask.shape[0]
            if n not in masks:
                masks[n] = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
            module.mask = masks[n]


# ------------------------------------------------------------ Hugging Face <-> minigpt

def _rows(cfg: GPTConfig) -> Iterator[tuple[str, str, str]]:
    """:data:`HF_TO_MINIGPT` with ``{i}`` expanded for every block."""
    for ours, theirs, how in HF_TO_MINIGPT:
        if ours == "out_head.weight" and cfg.tie_weights:
            continue
        for i in range(cfg.n_layers) if "{i}" in ours else [0]:
            yield ours.format(i=i), theirs.format(i=i), how


def hf_to_minigpt(hf: Mapping[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 tensors (no ``transformer.`` prefix) -> our state dict, as views."""
    state = {}
    for ours, theirs, how in _rows(cfg):
        tensor = hf[theirs]
        if how[0] in "qkv":  # c_attn is [query | key | value] along its last dimension
            tensor = tensor.chunk(3, dim=-1)["qkv".index(how[0])]
        state[ours] = tensor.T if how.endswith("T") else tensor
    return state


def minigpt_to_hf(state: Mapping[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> Hugging Face GPT-2 tensors (no ``transformer.`` prefix)."""
    hf: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor]] = {}
    for ours, theirs, how in _rows(cfg):
        if ours not in state:  # query/key/value biases of a qkv_bias=False model
            continue
        tensor = state[ours].T if how.endswith("T") else state[ours]
        if how[0] in "qkv":
            fused.setdefault(theirs, []).append(tensor)  # rows come in q, k, v order
        else:
            hf[theirs] = tensor
    for theirs, parts in fused.items():
        hf[theirs] = torch.cat(parts, dim=-1)
    for i in range(cfg.n_layers):  # Hugging Face's c_attn always has a bias: ours is zero
        hf.setdefault(f"h.{i}.attn.c_attn.bias", state["tok_emb.weight"].new_zeros(3 * cfg.emb_dim))
    return hf


# Values transformers' GPT2Config assumes for fields a config.json leaves out.
_HF_DEFAULTS = dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, resid_pdrop=0.1,
                    embd_pdrop=0.1, attn_pdrop=0.1, tie_word_embeddings=True)


def config_from_hf(config: Mapping[str, Any], source: str = "config") -> GPTConfig:
    """A Hugging Face ``GPT2Config`` dict -> :class:`GPTConfig`; refuses variants we cannot run.

    minigpt has one dropout rate; it takes ``resid_pdrop`` (OpenAI's three rates are all 0.1).
    """
    c = {**_HF_DEFAULTS, **config}
    unsupported = [
        f"{field}={c.get(field)!r}" for field, ok in (
            ("model_type", c.get("model_type", "gpt2") == "gpt2"),
            # Our GELU is PyTorch's tanh approximation: gelu_new's formula, fused.
            ("activation_function", c.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh")),
            ("layer_norm_epsilon", c.get("layer_norm_epsilon", 1e-5) == 1e-5),
            ("n_inner", c.get("n_inner") in (None, 4 * c["n_embd"])),
            ("scale_attn_weights", c.get("scale_attn_weights", True) is True),
            ("scale_attn_by_inverse_layer_idx", not c.get("scale_attn_by_inverse_layer_idx", False)),
            ("reorder_and_upcast_attn", not c.get("reorder_and_upcast_attn", False)),
            ("add_cross_attention", not c.get("add_cross_attention", False)),
        ) if not ok
    ]
    if unsupported:
        raise ValueError(f"{source} describes a GPT-2 variant minigpt does not implement: "
                         f"{', '.join(unsupported)}")
    if len({c["resid_pdrop"], c["embd_pdrop"], c["attn_pdrop"]}) > 1:
        warnings.warn(f"{source}: minigpt uses one dropout rate everywhere; taking "
                      f"resid_pdrop={c['resid_pdrop']} (embd_pdrop={c['embd_pdrop']}, "
                      f"attn_pdrop={c['attn_pdrop']})", stacklevel=2)
    return GPTConfig(
        vocab_size=c["vocab_size"], context_length=c.get("n_positions", c.get("n_ctx", 1024)),
        emb_dim=c["n_embd"], n_heads=c["n_head"], n_layers=c["n_layer"],
        drop_rate=float(c["resid_pdrop"]), qkv_bias=True, tie_weights=bool(c["tie_word_embeddings"]),
    )


def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """:class:`GPTConfig` -> the ``config.json`` of a Hugging Face ``GPT2LMHeadModel``."""
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate,
        "tie_word_embeddings": cfg.tie_weights,
    }


# ---------------------------------------------------------------------------- saving

def _write_checkpoint(directory: Path, tensors: Mapping[str, torch.Tensor], config: Mapping) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


def save_pretrained(model: GPTModel, directory: str | os.PathLike) -> None:
    """Write minigpt's format: ``config.json`` and ``model.safetensors`` into ``directory``."""
    state = model.state_dict()
    if model.cfg.tie_weights:
        state.pop("out_head.weight", None)  # it is tok_emb.weight
    _write_checkpoint(Path(directory), state, model.cfg.to_dict())


def export_hf(model: GPTModel, directory: str | os.PathLike) -> None:
    """Write a Hugging Face directory that ``GPT2LMHeadModel.from_pretrained`` loads
    with the same logits (Conv1D weights transposed, query/key/value fused into c_attn)."""
    hf = minigpt_to_hf(model.state_dict(), model.cfg)
    tensors = {name if name == "lm_head.weight" else f"transformer.{name}": t for name, t in hf.items()}
    _write_checkpoint(Path(directory), tensors, config_to_hf(model.cfg))


# ---------------------------------------------------------------------------- download

def default_weights_dir() -> Path:
    """Where GPT-2 checkpoints are kept: ``MINIGPT_WEIGHTS_DIR``, else ``weights/`` in the
    current directory (the book's habit: the checkpoints sit next to the code using them)."""
    return Path(os.environ.get(WEIGHTS_DIR_ENV, "weights")).expanduser()


def download_gpt2(name: str, weights_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """A local directory with OpenAI's GPT-2 ``name`` in the Hugging Face format.

    Uses ``MINIGPT_DATA_DIR/<name>/`` if it holds the files, else ``<weights_dir>/<name>/``
    (default :func:`default_weights_dir`), downloading what is missing there: a progress
    bar, resume of an interrupted transfer, and a SHA-256 check before a file is renamed
    into place (so a file found there was verified when it arrived).
    """
    if name not in GPT2_REPOS:
        raise ValueError(f"unknown GPT-2 name {name!r}; known: {', '.join(GPT2_REPOS)}")
    local = data_dir()
    if local is not None and all((local / name / f).is_file() for f in (CONFIG_FILE, WEIGHTS_FILE)):
        return local / name
    target = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    for filename in (WEIGHTS_FILE, CONFIG_FILE):  # the big one first: a failure leaves no config
        dest = target / name / filename
        if not dest.is_file():
            url = f"{HF_BASE_URL}/{GPT2_REPOS[name]}/resolve/main/{filename}"
            download(url, dest, _expected_sha256(name, filename, url), progress=progress)
    return target / name


def _expected_sha256(name: str, filename: str, url: str) -> str | None:
    known = KNOWN_SHA256.get((name, filename))
    if known is not None or filename == CONFIG_FILE:
        return known
    published = _published_sha256(url)
    if published is None:
        warnings.warn(f"cannot verify {url}: no known SHA-256 and the server published none", stacklevel=3)
    return published


class _KeepRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the hub's own redirect response carries the X-Linked-Etag header


def _published_sha256(url: str) -> str | None:
    """The SHA-256 the Hugging Face hub publishes for an LFS file (``X-Linked-Etag``)."""
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "minigpt"})
    try:
        with urllib.request.build_opener(_KeepRedirect).open(request, timeout=30) as response:
            headers = response.headers
    except urllib.error.HTTPError as err:
        if err.code >= 400:
            raise ConnectionError(f"could not download {url}: HTTP {err.code} {err.reason}") from err
        headers = err.headers  # a redirect arrives here, with the hub's own headers
    except OSError as err:
        raise ConnectionError(f"could not download {url}: {err}. Without internet, put "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE} in $MINIGPT_DATA_DIR/<name>/") from err
    etag = (headers.get("X-Linked-Etag") or headers.get("ETag") or "").removeprefix("W/").strip('"')
    return etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None
