"""LoRA, low-rank adaptation (book appendix E): fine-tune a few million numbers, not all of them.

The one idea: keep a pretrained weight ``W`` (out x in) frozen and learn its change
as the product of two thin matrices, ``delta_W = scaling * (A @ B).T`` with
``A: (in, r)`` and ``B: (r, out)``, ``r`` much smaller than ``in`` and ``out``::

    y = x @ W.T + scaling * (x @ A @ B)        scaling = alpha / r

A Linear(768, 768) has 589,824 weights; its rank-16 update has 16 * (768 + 768) = 24,576.
``B`` starts at zero, so a freshly adapted model computes exactly what the base model
computes, and training moves it away from there only as far as the data asks.

Workflow::

    report = apply_lora(model, rank=16, alpha=16)   # wrap linears, freeze the rest
    print(report)                                    # trainable vs total parameters
    ...train as usual (only the LoRA tensors get gradients)...
    with lora_disabled(model): ...                   # the base model again, no copy (DPO's reference)
    save_lora(model, "adapter.safetensors")          # a few MB: only A and B
    load_lora(fresh_base_model, "adapter.safetensors")
    merge_lora(model)                                # fold into W: plain nn.Linear again

QLoRA (Dettmers et al. 2023) is the same on a base quantized by ``quantize_model``: its
``Linear4bit`` / ``Linear8bit`` layers stay frozen, the adapters train in the compute dtype.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from minigpt.io.files import atomic_write
from minigpt.io.state_dict import tensor_mismatches
from minigpt.lora.targets import DEFAULT_TARGETS, LINEAR_LAYERS, match_targets
from minigpt.quantization.layers import QUANTIZED_LAYERS, dequantize_model, is_quantized

logger = logging.getLogger(__name__)

_METADATA_KEY = "minigpt_lora"


class LoRALayer(nn.Module):
    """The low-rank update alone: ``(..., in_dim) -> (..., out_dim)`` as ``scaling * (x @ A @ B)``.

    ``A: (in_dim, rank)`` is initialised like ``nn.Linear(in_dim, rank)`` (Kaiming-uniform,
    a=sqrt(5)); ``B: (rank, out_dim)`` is zero, so the layer outputs zeros until trained.
    ``scaling = alpha / rank`` keeps the update's size roughly independent of the rank,
    so a good learning rate for one rank works for another.
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_settings(rank, alpha)
        # alpha / r: a higher rank sums more rank-1 terms, and the smaller scaling keeps the update's
        # size roughly the same, so alpha and the learning rate need not be retuned with r.
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.A = nn.Parameter(torch.empty(in_dim, rank, device=device, dtype=dtype))
        # B = 0: x @ A @ B is 0 at first, so training starts at the base model exactly; A random so
        # B's gradient (A^T x^T dy) is not zero too.
        self.B = nn.Parameter(torch.zeros(rank, out_dim, device=device, dtype=dtype))
        # Initialise the transposed view, shape (rank, in_dim) like nn.Linear(in_dim, rank).weight,
        # so the fan-in is in_dim (bound 1/sqrt(in_dim)). The book calls this on A itself,
        # which takes fan-in = rank and draws much larger values.
        nn.init.kaiming_uniform_(self.A.T, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) @ (in, r) is cheap; the (in, out) product A @ B is never formed.
        return self.scaling * (x @ self.A @ self.B)

    def delta_weight(self) -> torch.Tensor:
        """The update in ``nn.Linear.weight`` layout: ``(out_dim, in_dim)``."""
        return self.scaling * (self.A @ self.B).T

    def extra_repr(self) -> str:
        return f"in_dim={self.A.shape[0]}, out_dim={self.B.shape[1]}, rank={self.rank}, alpha={self.alpha}"


class LinearWithLoRA(nn.Module):
    """A frozen-able ``nn.Linear`` (or quantized linear) plus a trainable low-rank update:
    ``linear(x) + lora(dropout(x))``, the update in the layer's (compute) dtype.

    ``(..., in_features) -> (..., out_features)``. The wrapped layer stays available as
    ``.linear`` (its weight may be shared, e.g. a head tied to the token embedding);
    LoRA dropout zeroes inputs of the update only, never of the frozen path. With
    ``enabled`` False (see :func:`lora_disabled`) the layer is its frozen base alone.
    """

    def __init__(self, linear: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        _check_settings(rank, alpha, dropout)
        self.linear = linear
        quantized = isinstance(linear, QUANTIZED_LAYERS)  # its tensors are buffers, its dtype the compute one
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha,
                              device=linear.device if quantized else linear.weight.device,
                              dtype=linear.compute_dtype if quantized else linear.weight.dtype)
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        # Base path on x itself, update on dropout(x): LoRA dropout never touches the frozen path.
        return out + self.lora(self.dropout(x).to(self.lora.A.dtype)).to(out.dtype) if self.enabled else out

    # Read like an nn.Linear's, so code that asks a layer for its sizes works on either.
    in_features = property(lambda self: self.linear.in_features)
    out_features = property(lambda self: self.linear.out_features)


@dataclass(frozen=True)
class LoRAReport:
    """What :func:`apply_lora` did: which layers it wrapped and how many parameters now train."""

    rank: int
    alpha: float
    dropout: float
    modules: tuple[str, ...]  # dotted names of the wrapped nn.Linear layers
    trainable: int            # the LoRA A and B tensors
    total: int                # every parameter of the model, LoRA included, shared ones once

    fraction = property(lambda self: self.trainable / self.total)  # the share that trains

    def __str__(self) -> str:
        return (f"LoRA rank={self.rank} alpha={self.alpha:g} on {len(self.modules)} linear layers: "
                f"{self.trainable:,} trainable of {self.total:,} parameters ({100 * self.fraction:.2f}%)")


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    target_modules: Sequence[str] | None = None,
    dropout: float = 0.0,
) -> LoRAReport:
    """Wrap the chosen ``nn.Linear`` layers of ``model`` (quantized ones too: QLoRA) in
    :class:`LinearWithLoRA`, in place, and freeze every other parameter.

    ``target_modules`` are patterns on the dotted module names printed by
    ``model.named_modules()`` (e.g. ``trf_blocks.3.att.W_query``, ``"att.*"``; see
    :mod:`minigpt.lora.targets`). The default, :data:`DEFAULT_TARGETS`, is every linear of
    the transformer blocks plus ``out_head``. Each pattern must match one linear at least.

    A head tied to the token embedding keeps sharing it (frozen); the update is added
    to the head only. Returns a :class:`LoRAReport` (also logged at INFO level).
    """
    _check_settings(rank, alpha, dropout)
    if isinstance(target_modules, str):
        raise TypeError(f"target_modules must be a list of patterns, e.g. [{target_modules!r}], not a string")
    if _lora_layers(model):
        raise ValueError("model already has LoRA layers; call merge_lora(model) first, or build a fresh model")
    patterns = DEFAULT_TARGETS if target_modules is None else tuple(target_modules)
    return _wrap(model, match_targets(model, patterns), rank, alpha, dropout)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight, ``W += scaling * (A @ B).T``, and put
    the plain ``nn.Linear`` back in place of each :class:`LinearWithLoRA`.

    The merged model computes the same outputs (up to float rounding) with no extra
    cost per token, and saves with ``save_pretrained`` like any base model. A quantized
    model (QLoRA) is dequantized first, every quantized linear to an ``nn.Linear`` in its
    compute dtype: adding a float update to 4-bit codes would round most of it away.

    A head whose weight is shared with the token embedding is *untied*: it gets its own
    merged copy, since adding the update to the shared matrix would change the
    embedding too. ``model.cfg.tie_weights`` is then set to False so the head is saved.
    Parameters keep the ``requires_grad`` that :func:`apply_lora` gave them (frozen).
    Returns ``model``.
    """
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to merge; was apply_lora or load_lora called on it?")
    if is_quantized(model):  # the wrappers stay; their base layers become nn.Linear, frozen as they were
        quantized = [name for name, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)]
        dequantize_model(model)
        for name in quantized:
            model.get_submodule(name).requires_grad_(False)
    shared = _shared_parameter_ids(model)
    untied = []
    for name, wrapper in layers.items():
        linear = wrapper.linear
        with torch.no_grad():
            delta = wrapper.lora.delta_weight().to(linear.weight.dtype)
            if id(linear.weight) in shared:
                # A new tensor: add_ on a shared weight would change the token embedding as well.
                linear.weight = nn.Parameter(linear.weight + delta, requires_grad=linear.weight.requires_grad)
                untied.append(name)
            else:
                # In place: W += scaling * (A @ B).T, and the wrapper disappears below.
                linear.weight.add_(delta)
        _set_submodule(model, name, linear)
    if untied:
        logger.info("merge_lora: untied %s from the weights it shared, to merge its update", untied)
        cfg = getattr(model, "cfg", None)
        if dataclasses.is_dataclass(cfg) and getattr(cfg, "tie_weights", False):
            # A copy, not an edit: other models may hold the same config object.
            model.cfg = dataclasses.replace(cfg, tie_weights=False)
    return model


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the ``with`` body with every LoRA update switched off: the model computes exactly
    what its frozen base computes, with no second copy in memory (DPO's reference model).
    The previous state comes back afterwards, also when the body raises; nesting is fine."""
    layers = list(_lora_layers(model).values())
    if not layers:
        raise ValueError("model has no LoRA layers to switch off; call apply_lora or load_lora first, "
                         "or use a separate, frozen copy of the model")
    before = [layer.enabled for layer in layers]
    for layer in layers:
        # Flags, not removal: the adapters stay in memory and come back unchanged.
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, before, strict=True):
            layer.enabled = enabled


def save_lora(model: nn.Module, path: str | os.PathLike, include: Sequence[str] = ()) -> None:
    """Write only the adapter: each LoRA layer's ``A`` and ``B`` and the settings used
    (rank, alpha, dropout, wrapped module names) as one safetensors file, atomically.

    The base weights are not stored, so the adapter must be loaded onto the same base
    model. A part that is *not* in the base checkpoint, such as a freshly initialised
    classification head, must be saved too: name it in ``include`` (e.g.
    ``include=["out_head"]``) and its full weights are stored and restored with the adapter.
    """
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to save; call apply_lora(model, ...) first")
    some = next(iter(layers.values()))
    modules = dict(model.named_modules())
    unknown = [name for name in include if name not in modules]
    if unknown:
        raise ValueError(f"include names {unknown} are not modules of the model")
    containing = [name for name in include for layer in layers if layer.startswith(name + ".")]
    if containing:
        raise ValueError(f"include names {sorted(set(containing))} contain LoRA layers; include is for parts "
                         "outside them, such as a new head (a LoRA layer itself may be named)")
    state = {f"{name}.lora.{key}": t for name, w in layers.items() for key, t in w.lora.state_dict().items()}
    state |= {f"{name}.{key}": t for name in include for key, t in _base(modules[name]).state_dict().items()}
    # safetensors refuses tensors that share memory (a tied head); copies never do.
    state = {key: tensor.detach().to("cpu", copy=True).contiguous() for key, tensor in state.items()}
    settings = {"rank": some.lora.rank, "alpha": some.lora.alpha, "dropout": some.dropout.p,
                "target_modules": list(layers), "include": list(include)}
    metadata = {"format": "pt", _METADATA_KEY: json.dumps(settings)}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def load_lora(model: nn.Module, path: str | os.PathLike) -> LoRAReport:
    """Load an adapter written by :func:`save_lora` into ``model``.

    On a base model (no LoRA yet) the saved rank, alpha, dropout and target modules are
    applied first, as :func:`apply_lora` would; on a model that already has LoRA layers
    they must be the same. Every tensor's name and shape is checked before the model is
    touched, and a mismatch names each offending tensor. Returns the :class:`LoRAReport`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA adapter file at {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if _METADATA_KEY not in metadata:
        raise ValueError(f"{path} has no LoRA settings in its metadata; was it written by save_lora?")
    settings = json.loads(metadata[_METADATA_KEY])
    rank, alpha, dropout = settings["rank"], settings["alpha"], settings["dropout"]
    names, include = settings["target_modules"], settings["include"]
    existing = _lora_layers(model)
    if existing:
        _check_same_lora(existing, names, rank, alpha, path)
    _check_adapter_tensors(model, state, names, include, rank, path)
    report = _report(model, existing) if existing else _wrap(model, names, rank, alpha, dropout)
    targets = {**dict(model.named_buffers()), **dict(model.named_parameters(remove_duplicate=False))}
    with torch.no_grad():
        for key, tensor in state.items():
            # copy_ moves the tensor to the parameter's device and dtype.
            targets[_stored_to_model_key(key, names, include)].copy_(tensor)
    return report


# --- helpers -------------------------------------------------------------------------------


def _check_settings(rank: int, alpha: float, dropout: float = 0.0) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def _lora_layers(model: nn.Module) -> dict[str, LinearWithLoRA]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearWithLoRA)}


def _base(module: nn.Module | None) -> nn.Module | None:
    """The frozen layer itself: a wrapped layer's base tensors live under its ``.linear``."""
    return module.linear if isinstance(module, LinearWithLoRA) else module


def _wrap(model: nn.Module, names: Sequence[str], rank: int, alpha: float, dropout: float) -> LoRAReport:
    """Freeze ``model``, replace each named linear by a LinearWithLoRA, and report."""
    # Freeze everything first; the LoRA layers created below are trainable (new parameters are).
    model.requires_grad_(False)
    for name in names:
        _set_submodule(model, name, LinearWithLoRA(model.get_submodule(name), rank, alpha, dropout))
    report = _report(model, _lora_layers(model))
    logger.info("%s", report)
    return report


def _report(model: nn.Module, layers: dict[str, LinearWithLoRA]) -> LoRAReport:
    some = next(iter(layers.values()))
    return LoRAReport(
        rank=some.lora.rank, alpha=some.lora.alpha, dropout=some.dropout.p, modules=tuple(layers),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total=sum(p.numel() for p in model.parameters()),  # parameters() lists a shared one once
    )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters registered under more than one name (tied weights)."""
    counts = Counter(id(param) for _, param in model.named_parameters(remove_duplicate=False))
    return {key for key, count in counts.items() if count > 1}


def _check_same_lora(existing: dict[str, LinearWithLoRA], names: Sequence[str], rank: int, alpha: float,
                     path: Path) -> None:
    some = next(iter(existing.values()))
    if sorted(existing) != sorted(names) or some.lora.rank != rank or some.lora.alpha != alpha:
        raise ValueError(f"{path} holds a rank-{rank} alpha-{alpha} adapter for {len(names)} layers, but the model "
                         f"already has rank-{some.lora.rank} alpha-{some.lora.alpha} LoRA on {len(existing)} "
                         "layers; load it onto a base model without LoRA")


def _stored_to_model_key(key: str, names: Sequence[str], include: Sequence[str]) -> str:
    """The model's state-dict name of a stored tensor: an included wrapped layer's base
    tensors are stored as ``out_head.weight`` but live at ``out_head.linear.weight``."""
    for name in include:
        if name in names and key.startswith(name + ".") and not key.startswith(name + ".lora."):
            return f"{name}.linear.{key[len(name) + 1:]}"
    return key


def _check_adapter_tensors(model: nn.Module, state: dict[str, torch.Tensor], names: Sequence[str],
                           include: Sequence[str], rank: int, path: Path) -> None:
    """Compare the file's tensors with what ``model`` (with or without LoRA) would expect."""
    modules = dict(model.named_modules())
    expected: dict[str, tuple[int, ...]] = {}
    problems = []
    for name in names:
        base = _base(modules.get(name))
        if not isinstance(base, LINEAR_LAYERS):
            problems.append(f"the model has no linear layer named {name!r}")
            continue
        expected[f"{name}.lora.A"] = (base.in_features, rank)
        expected[f"{name}.lora.B"] = (rank, base.out_features)
    for name in include:
        base = _base(modules.get(name))
        if base is None:
            problems.append(f"the model has no module named {name!r}")
            continue
        for key, tensor in base.state_dict().items():
            expected[f"{name}.{key}"] = tuple(tensor.shape)
    problems += tensor_mismatches(expected, state)
    if problems:
        raise ValueError(f"adapter {path} does not fit this model: " + ", ".join(problems))
