"""Checkpoint files, whatever the model family: a checkpoint is a ``config.json`` and a dict of
named tensors in ``model.safetensors`` (or shards listed in an index).

The one idea: loading never holds two copies of the weights. :func:`read_safetensors` opens a
file with ``safetensors``' own loader, which maps it into memory privately: the tensors *are*
the file's pages, read from disk when first used, and writing to one (training) copies only the
touched pages, never the file. A model is built on the ``meta`` device (:func:`on_meta`: shapes,
no memory) and each family's loader assigns the file's tensors as its parameters.

Writing goes through :func:`write_checkpoint`, each file atomically; :func:`stored_once` drops
the second name of a tensor that appears twice (a tied head).
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
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from minigpt.io.files import atomic_write, write_json
from minigpt.io.state_dict import tensor_mismatches

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SHARD_INDEX_FILE = "model.safetensors.index.json"  # transformers splits large checkpoints


def read_config_json(directory: Path) -> dict[str, Any]:
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}; is it a weights directory?")
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's ``model.safetensors``, or of the shards its index lists (memory-mapped)."""
    if (directory / WEIGHTS_FILE).is_file():
        return read_safetensors(directory / WEIGHTS_FILE)
    if (directory / SHARD_INDEX_FILE).is_file():
        shards = set(json.loads((directory / SHARD_INDEX_FILE).read_text(encoding="utf-8"))["weight_map"].values())
        return {k: v for shard in sorted(shards) for k, v in read_safetensors(directory / shard).items()}
    raise FileNotFoundError(f"{directory} has no {WEIGHTS_FILE}")


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


def dtype_problems(found: Mapping[str, torch.Tensor]) -> list[str]:
    dtypes = Counter(t.dtype for t in found.values())
    if len(dtypes) <= 1:
        return []
    usual = dtypes.most_common(1)[0][0]  # a model of mixed precisions would fail (or silently upcast) later
    odd = sorted(f"{k} ({t.dtype})" for k, t in found.items() if t.dtype != usual)
    return [f"tensors whose dtype differs from the others' {usual}: {odd}"]


def check_tensors(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, torch.Tensor],
                   source: str, cfg: Any) -> None:
    """Every missing, unexpected or misshapen tensor, and any of another dtype, in one error naming ``source``."""
    problems = tensor_mismatches(expected, found)
    problems += dtype_problems(found)
    if problems:
        raise ValueError(f"{source} does not match its config ({cfg}): " + ", ".join(problems))


def write_checkpoint(directory: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                     config: Mapping[str, Any]) -> Path:
    """Write ``model.safetensors`` (``tensors``, moved to the CPU) and ``config.json`` into
    ``directory``, each atomically: a crash leaves the old file or none, never half of one."""
    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json(directory / CONFIG_FILE, dict(config))
    return directory


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
