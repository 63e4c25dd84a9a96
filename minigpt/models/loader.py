"""The one door to every model: ``load(spec)`` for a name, a directory, a run or a preset.

The one idea: what a model *is* follows from its ``spec``, and from nothing else.

- a published name (``gpt2-small``, ``smollm2-135m-instruct`` ...): found locally or downloaded
  by its family, then read as a directory;
- a directory (a Hugging Face checkpoint, or a minigpt run): its ``config.json`` names the family;
- a ``.pth`` state dict (the book's format), with ``cfg=``;
- a preset (``tiny``, or ``random:gpt2-small`` where the preset is also a published name):
  random weights of that shape.

Then, in this order: ``dtype`` converts the weights, ``quantize`` replaces the block linears
layer by layer (the float weights are still the file's pages, so there is never a second float
copy in memory), ``adapter`` adds a saved LoRA adapter, and the model moves to ``device``.

    model = load("smollm2-135m", quantize="nf4")     # (batch, tokens) ids -> (batch, tokens, vocab)
    tokenizer = load_tokenizer("smollm2-135m")
    template = chat_template_of("smollm2-135m-instruct")   # Jinja text, or None

Every family's model class also gets ``Model.from_pretrained(spec, **options)`` (this
function) and ``model.save_pretrained(directory)`` here, where the families are known.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minigpt.io.weight_files import CONFIG_FILE, read_config_json
from minigpt.lora.files import load_lora
from minigpt.models.base import CausalLM, Family
from minigpt.models.registry import (
    FAMILIES,
    did_you_mean,
    family_of,
    family_of_config,
    family_of_name,
    family_of_preset,
    known_names,
    known_presets,
)
from minigpt.quantization.checkpoint import quantize_loaded
from minigpt.quantization.schemes import check_scheme

RANDOM = "random:"  # spec prefix: random weights of a preset that is also a published name
STATE_DICT_SUFFIXES = (".pth", ".pt")


@dataclass(frozen=True)
class Source:
    """What a spec names: a family, and the local directory of its weights or the preset of random ones."""

    family: Family
    directory: Path | None = None
    preset: str | None = None


def resolve(spec: str | os.PathLike, *, weights_dir: str | os.PathLike | None = None,
            progress: bool = True) -> Source:
    """The family and local directory (downloading a published name) or preset that ``spec`` names.

    A published name always means the published checkpoint: write ``./gpt2-small`` for a
    local directory of that name, and ``random:gpt2-small`` for random weights of its shape.
    """
    text = str(spec)
    # Tried in this order: random:preset, published name, existing directory, bare preset. A
    # published name wins over a local directory of the same name (write ./name for that one).
    if text.startswith(RANDOM):
        preset = text.removeprefix(RANDOM)
        family = family_of_preset(preset)
        if family is None:
            raise ValueError(f"{text!r}: no preset {preset!r}; presets: {', '.join(known_presets())}")
        return Source(family, preset=preset)
    family = family_of_name(text)
    if family is not None:
        return Source(family, directory=family.download(text, weights_dir, progress=progress))
    path = Path(spec)
    if path.is_dir():
        return Source(family_of_config(read_config_json(path), str(path / CONFIG_FILE)), directory=path)
    family = family_of_preset(text)
    if family is not None:
        return Source(family, preset=text)
    check_spec(text)  # not a name, a preset nor a directory: raises with the closest name
    raise ValueError(f"{text!r} is not a model directory: it has no {CONFIG_FILE}")


def check_spec(spec: str | os.PathLike) -> None:
    """Raise unless ``spec`` is a published name, a preset or an existing path, without downloading:
    a path that does not exist is "not found"; another spec gets the closest known name."""
    text = str(spec)
    if text.removeprefix(RANDOM) in known_names() + known_presets() or Path(text).exists():
        return
    # Something that looks like a path gets a path's error, not a list of model names.
    if "/" in text or os.sep in text or text.startswith("."):
        raise FileNotFoundError(f"{text} not found: no such file or directory; give a run or weights directory "
                                "that exists, or a model name")
    hint = did_you_mean(text, known_names() + known_presets())
    published = known_names()
    own_presets = [name for name in known_presets() if name not in published]
    raise ValueError(f"{text!r} is not a model minigpt knows: {hint}give a published name ({', '.join(published)}), "
                     f"a preset for random weights ({', '.join(own_presets)}, or {RANDOM}NAME for a published shape), "
                     f"or a directory with {CONFIG_FILE}")


def load(spec: str | os.PathLike, *, quantize: str | None = None, adapter: str | os.PathLike | None = None,
         device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         weights_dir: str | os.PathLike | None = None, progress: bool = True, cfg: Any = None) -> CausalLM:
    """The model ``spec`` names (see the module docstring), optionally converted to ``dtype``,
    quantized (``"nf4"``, ``"nf4-dq"``, ``"int8"``), with a LoRA ``adapter`` file, on ``device``.

    ``weights_dir`` and ``progress`` go to the download of a published name; ``cfg`` is the
    config of a ``.pth`` state dict, which holds tensors only.
    """
    if quantize is not None:
        check_scheme(quantize)  # before any download
    model = _weights(spec, cfg, weights_dir, progress)
    # The order matters: quantize after dtype (it quantizes the weights as converted), the adapter
    # after quantize (LoRA then wraps the quantized layers: QLoRA), and the move to device last.
    if dtype is not None:
        model.to(dtype)  # floating-point tensors only: a saved quantized model keeps its packed codes
    if quantize is not None:
        quantize_loaded(model, quantize, str(spec))
    if adapter is not None:
        load_lora(model, adapter)
    return model.to(device)


def _weights(spec: str | os.PathLike, cfg: Any, weights_dir: str | os.PathLike | None, progress: bool) -> CausalLM:
    path = Path(spec)
    if path.suffix in STATE_DICT_SUFFIXES and path.is_file():
        # A bare state dict has no config.json to name its family; only a family with load_file
        # reads one, and today that is GPT-2 alone (the book's .pth format).
        readers = [family for family in FAMILIES if family.load_file is not None]
        return readers[0].load_file(path, cfg)
    # A name or a directory brings its own config.json; a cfg= given as well would be ignored
    # silently, so it is refused.
    if cfg is not None:
        raise ValueError(f"cfg= is only for {'/'.join(STATE_DICT_SUFFIXES)} state dicts; {spec} brings its own "
                         f"{CONFIG_FILE}")
    source = resolve(spec, weights_dir=weights_dir, progress=progress)
    # A preset: random weights, built and initialised in memory.
    if source.directory is None:
        return source.family.build(source.preset)
    return source.family.load_directory(source.directory)


def load_tokenizer(spec: str | os.PathLike, *, weights_dir: str | os.PathLike | None = None,
                   progress: bool = True) -> Any:
    """The tokenizer the model ``spec`` was trained with: GPT-2's encoding for GPT-2, a Llama-family
    directory's own ``tokenizer.json`` (an error where it has none). Either has ``encode(text,
    allowed_special=...)``, ``decode(ids)``, ``decode_bytes(ids)``, ``eot_token`` and ``n_vocab``."""
    source = _text_source(spec, weights_dir, progress)
    return source.family.tokenizer(source.directory)


def chat_template_of(spec: str | os.PathLike, *, weights_dir: str | os.PathLike | None = None,
                     progress: bool = True) -> str | None:
    """The Jinja chat template the model ``spec`` ships (``tokenizer_config.json`` or
    ``chat_template.jinja``), or None: GPT-2, base models and random weights have none."""
    source = _text_source(spec, weights_dir, progress)
    return source.family.chat_template(source.directory)


def _text_source(spec: str | os.PathLike, weights_dir: str | os.PathLike | None, progress: bool) -> Source:
    """:func:`resolve`, except that a published name whose family reads no tokenizer files (GPT-2's
    encoding ships with minigpt) is not downloaded just for its text."""
    family = family_of_name(str(spec))
    if family is not None and not family.tokenizer_files:
        return Source(family)
    return resolve(spec, weights_dir=weights_dir, progress=progress)


def save_pretrained(model: CausalLM, directory: str | os.PathLike) -> Path:
    """Write ``model`` in the format ``load`` reads back, each file atomically."""
    return family_of(model).save_pretrained(model, directory)


def _from_pretrained(cls: type, spec: str | os.PathLike, **options: Any) -> CausalLM:
    """``GPTModel.from_pretrained(spec, **options)``: :func:`load`, checked to be of that class."""
    model = load(spec, **options)
    # Otherwise GPTModel.from_pretrained on a Llama checkpoint would quietly return a LlamaModel.
    if not isinstance(model, cls):
        raise TypeError(f"{spec} holds a {type(model).__name__}, not a {cls.__name__}: use minigpt.models.load")
    return model


# The familiar methods, installed here where the families are known (a family's model module
# cannot import this loader, which imports it): one delegate each, no second loader.
for _family in FAMILIES:
    _family.model_class.from_pretrained = classmethod(_from_pretrained)
    _family.model_class.save_pretrained = _family.save_pretrained
