"""Saving and loading weights: a checkpoint is a dict of named tensors, and loading
one means renaming those tensors onto our modules, straight from the file.

Three formats load with :func:`load_pretrained` (``GPTModel.from_pretrained``):

- minigpt's own directory: ``config.json`` (a :class:`GPTConfig`) + ``model.safetensors``
  with our parameter names;
- a Hugging Face GPT-2 directory (``config.json`` with ``n_embd`` ... + ``model.safetensors``,
  or shards listed in ``model.safetensors.index.json``), such as OpenAI's released
  checkpoints, which load by name (``"gpt2-small"``; see :mod:`minigpt.hub`). The names are
  translated by :mod:`minigpt.hf_gpt2`;
- the book's ``.pth`` state dict (``torch.save(model.state_dict(), ...)``), given a config.

Memory: :func:`read_safetensors` opens a file with ``safetensors``' own loader, which maps
it into memory privately: the tensors *are* the file's pages, read from disk when first
used, and writing to one (training) copies only the touched pages, never the file. The
model is built on the ``meta`` device (shapes, no memory) and every parameter is assigned
as a view of those tensors, including the transposed and split Hugging Face ones, so
loading never holds two copies of the weights (see ``bench/bench_load_memory.py``).

Quantized (``quantize="nf4"``, ``"nf4-dq"`` or ``"int8"``, :mod:`minigpt.quantized_linear`):
the model is assigned the mapped tensors as above, then each block linear in turn is
quantized and its float weight let go, so the float model only ever exists as the
file's pages (which the system may drop), never as a second copy in memory
(``bench/bench_load_quantized.py`` measures it). A quantized model saves its packed
tensors, and ``config.json`` gains a ``quantization`` entry (scheme, block sizes, compute
dtype, the shape of each quantized layer) from which loading rebuilds the same layers.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from minigpt.attention import CausalAttention, MultiHeadAttention
from minigpt.config import GPTConfig
from minigpt.hf_gpt2 import (
    CONFIG_FILE,
    SHARD_INDEX_FILE,
    WEIGHTS_FILE,
    config_from_hf,
    hf_shapes,
    hf_to_minigpt,
    strip_hf_names,
    write_checkpoint,
)
from minigpt.hub import GPT2_REPOS, check_model_name, download_gpt2
from minigpt.model import GPTModel
from minigpt.quantization import check_scheme
from minigpt.quantized_weights import (
    QUANTIZATION_KEY,
    quantization_entry,
    quantize_loaded,
    quantize_skeleton,
    tensor_problems,
)
from minigpt.state_dict import tensor_mismatches

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "build_model", "check_tensors", "drop_tied_head", "load_config",
           "load_pretrained", "load_state", "on_meta", "read_safetensors", "read_weights", "save_pretrained"]


# ---------------------------------------------------------------------------- loading

def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    cfg: GPTConfig | Mapping[str, Any] | str | None = None,
    device: str | torch.device = "cpu",
    weights_dir: str | os.PathLike | None = None,
    progress: bool = True,
    quantize: str | None = None,
) -> GPTModel:
    """Load a GPT-2 name (``gpt2-small`` ... ``gpt2-xl``), a minigpt or Hugging Face
    directory, or a book ``.pth`` state dict (which needs ``cfg``: a config, dict or preset).

    Names are found or downloaded by :func:`minigpt.hub.download_gpt2` (``weights_dir``
    and ``progress`` are passed on). A known name always means OpenAI's checkpoint; write
    ``./gpt2-small`` for a local directory of that name. ``quantize`` (``"nf4"``,
    ``"nf4-dq"``, ``"int8"``) quantizes the block linears layer by layer while loading
    (a directory saved quantized loads quantized anyway, and must then name its own scheme).
    """
    if quantize is not None:
        check_scheme(quantize)  # before any download
    path = Path(name_or_path)
    if path.suffix in (".pth", ".pt") and path.is_file():
        model = _load_pth(path, cfg)
    else:
        if cfg is not None:
            raise ValueError(f"cfg= is only for .pth state dicts; {path} brings its own {CONFIG_FILE}")
        if str(name_or_path) in GPT2_REPOS:
            path = download_gpt2(str(name_or_path), weights_dir, progress=progress)
        elif not path.is_dir():
            check_model_name(name_or_path)  # a typo in a name, a path that does not exist
            raise ValueError(f"{path} is neither a directory with {CONFIG_FILE} nor a .pth state dict")
        model = _load_directory(path)
    if quantize is not None:
        # The parameters are still the mapped file's pages: quantizing one linear at a
        # time never holds more than one float layer besides them.
        quantize_loaded(model, quantize, str(name_or_path))
    return model.to(device)


def _read_config(directory: Path) -> dict[str, Any]:
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}; is it a weights directory?")
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err


def _minigpt_config(config: Mapping[str, Any], source: str) -> GPTConfig:
    """Our own config fields; a ``quantization`` entry describes the tensors, not the model."""
    try:
        return GPTConfig.from_dict({k: v for k, v in config.items() if k != QUANTIZATION_KEY})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source} is not a valid minigpt config: {err}") from err


def load_config(directory: str | os.PathLike) -> GPTConfig:
    """The :class:`GPTConfig` of a directory written by :func:`save_pretrained` (quantized or not)."""
    directory = Path(directory)
    return _minigpt_config(_read_config(directory), str(directory / CONFIG_FILE))


def _load_directory(directory: Path) -> GPTModel:
    config = _read_config(directory)
    if "emb_dim" in config:  # our own field names
        cfg = _minigpt_config(config, str(directory / CONFIG_FILE))
        quantization = config.get(QUANTIZATION_KEY)
        if quantization is not None:
            return _build_quantized(cfg, quantization, read_weights(directory), source=str(directory))
        return build_model(cfg, read_weights(directory), source=str(directory))
    if "n_embd" in config or "model_type" in config:  # Hugging Face's
        return _build_from_hf(config_from_hf(config, source=str(directory / CONFIG_FILE)),
                              read_weights(directory), source=str(directory))
    raise ValueError(f"{directory / CONFIG_FILE} is neither a minigpt config (emb_dim, ...) nor a Hugging Face "
                     "GPT-2 config (n_embd, ...)")


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's ``model.safetensors``, or of the shards its index lists (memory-mapped)."""
    if (directory / WEIGHTS_FILE).is_file():
        return read_safetensors(directory / WEIGHTS_FILE)
    if (directory / SHARD_INDEX_FILE).is_file():
        shards = set(json.loads((directory / SHARD_INDEX_FILE).read_text(encoding="utf-8"))["weight_map"].values())
        return {k: v for shard in sorted(shards) for k, v in read_safetensors(directory / shard).items()}
    raise FileNotFoundError(f"{directory} has no {WEIGHTS_FILE}")


def load_state(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a minigpt directory's ``model.safetensors`` (memory-mapped), checked:
    a readable file whose tensors share one dtype (those of quantized layers, which its config
    lists, left out: packed codes are integers). Names and shapes are the caller's to check
    (a classifier's head differs from a language model's)."""
    directory = Path(directory)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_FILE}; is it a directory written by save_pretrained?")
    state = read_safetensors(path)
    config = _read_config(directory) if (directory / CONFIG_FILE).is_file() else {}
    quantized = tuple(name + "." for name in (config.get(QUANTIZATION_KEY) or {}).get("layers", ()))
    problems = _dtype_problems({k: v for k, v in state.items() if not k.startswith(quantized)})
    if problems:
        raise ValueError(f"{path}: " + ", ".join(problems))
    return state


def _build_from_hf(cfg: GPTConfig, tensors: Mapping[str, torch.Tensor], source: str) -> GPTModel:
    hf = strip_hf_names(tensors)
    if cfg.tie_weights:
        drop_tied_head(hf, "lm_head.weight", "wte.weight", source)
    model = _meta_model(cfg)
    # The shapes our model needs, in Hugging Face's names: errors then name the file's tensors.
    expected = hf_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, cfg)
    check_tensors(expected, hf, source, cfg)
    return _assign(model, hf_to_minigpt(hf, cfg))


def _load_pth(path: Path, cfg: GPTConfig | Mapping[str, Any] | str | None) -> GPTModel:
    if cfg is None:
        raise ValueError(
            f"{path} holds only tensors, not the config (n_heads cannot be read from shapes): pass "
            f"it, e.g. from_pretrained({str(path)!r}, cfg=GPTConfig.from_preset('gpt2-small', qkv_bias=True))"
        )
    cfg = GPTConfig.coerce(cfg)
    try:  # weights_only: unpickling arbitrary objects could run code; mmap: no copy in memory
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for a damaged file
        raise ValueError(f"{path} is corrupt or not a PyTorch state dict: {err}") from err
    state = state.get("model_state_dict", state)  # the book's model-and-optimizer checkpoint
    # The book's attention stores its causal mask as a saved buffer; ours rebuilds it.
    state = {k: v for k, v in state.items() if not k.endswith("att.mask")}
    if cfg.tie_weights:
        drop_tied_head(state, "out_head.weight", "tok_emb.weight", str(path))
    return build_model(cfg, state, source=str(path))


def drop_tied_head(state: dict[str, torch.Tensor], head: str, embedding: str, source: str) -> None:
    """Remove a tied ``head`` from ``state`` (the embedding serves); one that differs from it is an error."""
    tensor = state.pop(head, None)
    if tensor is not None and embedding in state and not torch.equal(tensor, state[embedding]):
        raise ValueError(f"{source}: the config ties the output head to the token embedding, "
                         f"but {head} differs from {embedding}; untie it in the config")


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of a ``.safetensors`` file, memory-mapped by ``safetensors`` itself:
    the tensors share the file's pages (read from disk when used) and writes to them never
    reach the file. A damaged file is a ``ValueError`` naming it (and, for a file cut short,
    the first tensor whose bytes are missing)."""
    path = Path(path)
    try:
        return load_file(path)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as err:
        size = path.stat().st_size
        detail = _missing_bytes(path, size) or f"it has {size} bytes"
        raise ValueError(f"{path} is corrupt or truncated: {detail}, and reading it failed with: {err}") from err


def _missing_bytes(path: Path, size: int) -> str | None:
    """For the error message only: which tensor of a truncated file lies past its end.

    A safetensors file starts with 8 bytes (little-endian length ``n``), then ``n`` bytes of
    JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``, then the data.
    """
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
        data = size - 8 - n
        cut = sorted((tuple(info["data_offsets"]), name, tuple(info["shape"]))
                     for name, info in (header or {}).items()
                     if name != "__metadata__" and info["data_offsets"][1] > data)
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        return None  # a header that does not even parse: the size says enough
    if not cut:
        return None
    (begin, end), name, shape = cut[0]  # the first tensor, in the file's order, that is cut off
    return f"tensor {name!r} {shape} needs bytes [{begin}, {end}) of the data, which has {data} bytes"


class _ShapesOnly(TorchFunctionMode):
    """While a model is built on ``meta``: the operations that only fill in values
    (``torch.nn.init``'s in-place fills, the causal mask's ``triu``) return their input.

    Meta tensors have no values to fill, but PyTorch runs some of these operations there
    through its Python reference implementations, which import the whole compiler
    (``torch._dynamo``, about 70 MB of memory) on first use. The values do not matter:
    every parameter is replaced by the file's tensor and every mask is rebuilt.
    """

    _VALUES_ONLY = {getattr(torch.nn.init, n) for n in dir(torch.nn.init) if n.endswith("_") and n[0] != "_"}
    _VALUES_ONLY |= {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.fill_, torch.Tensor.zero_,
                     torch.triu, torch.tril, torch.Tensor.triu, torch.Tensor.tril}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._VALUES_ONLY:
            tensor = args[0] if args else kwargs.get("tensor", kwargs.get("input"))
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextmanager
def on_meta() -> Iterator[None]:
    """Build modules inside on the ``meta`` device: shapes only, and no value-filling operations run."""
    with torch.device("meta"), _ShapesOnly():
        yield


def _meta_model(cfg: GPTConfig) -> GPTModel:
    with on_meta():  # allocates nothing: every parameter is replaced by the file's tensor
        return GPTModel(cfg)


def build_model(cfg: GPTConfig, state: Mapping[str, torch.Tensor], source: str) -> GPTModel:
    """A :class:`GPTModel` whose parameters *are* the given tensors (no copy).

    Every expected tensor must be present with the right shape and all share one dtype;
    the error names ``source`` and each offending tensor.
    """
    model = _meta_model(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_weights:
        expected.pop("out_head.weight")
    check_tensors(expected, state, source, cfg)
    return _assign(model, state)


def _build_quantized(cfg: GPTConfig, entry: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                     source: str) -> GPTModel:
    """A quantized model rebuilt from what :func:`save_pretrained` wrote (see :mod:`minigpt.quantized_weights`)."""
    model = _meta_model(cfg)
    with on_meta():
        quantize_skeleton(model, entry, source)
    expected = dict(model.state_dict())
    if cfg.tie_weights:
        expected.pop("out_head.weight")
    problems = tensor_problems(expected, state)
    if problems:
        raise ValueError(f"{source} does not match its config ({cfg}, {entry['scheme']}): " + ", ".join(problems))
    return _assign(model, state)


def _assign(model: GPTModel, state: Mapping[str, torch.Tensor]) -> GPTModel:
    tied = model.cfg.tie_weights
    model.load_state_dict(dict(state), strict=not tied, assign=True)
    if tied:
        model.out_head.weight = model.tok_emb.weight  # assign replaced the shared Parameter
    _materialize_masks(model)
    return model


def _dtype_problems(found: Mapping[str, torch.Tensor]) -> list[str]:
    dtypes = Counter(t.dtype for t in found.values())
    if len(dtypes) <= 1:
        return []
    usual = dtypes.most_common(1)[0][0]  # a model of mixed precisions would fail (or silently upcast) later
    odd = sorted(f"{k} ({t.dtype})" for k, t in found.items() if t.dtype != usual)
    return [f"tensors whose dtype differs from the others' {usual}: {odd}"]


def check_tensors(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, torch.Tensor],
                   source: str, cfg: GPTConfig) -> None:
    """Every missing, unexpected or misshapen tensor, and any of another dtype, in one error naming ``source``."""
    problems = tensor_mismatches(expected, found)
    problems += _dtype_problems(found)
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


# ---------------------------------------------------------------------------- saving

def save_pretrained(model: GPTModel, directory: str | os.PathLike) -> Path:
    """Write minigpt's format: ``config.json`` and ``model.safetensors`` into ``directory``,
    each atomically. A tensor that appears under several names (a tied head is
    ``tok_emb.weight``, also when wrapped by LoRA) is stored once, under its first name.
    A quantized model stores its packed tensors, and its config the quantization settings
    and each quantized layer's ``(out_features, in_features)``."""
    config = model.cfg.to_dict()
    entry = quantization_entry(model)
    if entry is not None:
        config[QUANTIZATION_KEY] = entry
    return write_checkpoint(directory, stored_once(model.state_dict()), config)


def stored_once(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A file stores bytes, not aliases: names of the very same tensor (same memory, shape
    # and strides) are dropped after the first; distinct views of one buffer are kept.
    first: dict[tuple, str] = {}
    kept = {}
    for name, tensor in state.items():
        key = (tensor.device, tensor.dtype, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
               tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and not tensor.is_meta and key in first:
            continue
        first.setdefault(key, name)
        kept[name] = tensor
    return kept
