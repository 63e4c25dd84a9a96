"""The one place that knows which model families exist.

Adding a family (Gemma, Phi, ...) means one folder beside ``gpt2/`` and ``llama/`` with a
:class:`~minigpt.models.base.Family` record, and one line in :data:`FAMILIES`; nothing else in
minigpt asks which family a model is (``docs/architecture.md`` has the recipe).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from torch import nn

from minigpt.models.base import Family
from minigpt.models.gpt2.family import GPT2
from minigpt.models.llama.family import LLAMA

# In the order a config.json is tried: Llama's model_type is checked before GPT-2's looser test.
FAMILIES: tuple[Family, ...] = (LLAMA, GPT2)


def known_names() -> list[str]:
    """Every published checkpoint minigpt fetches by name, all families."""
    return [name for family in FAMILIES for name in family.hub_names]


def did_you_mean(text: str, names: list[str]) -> str:
    """``"did you mean 'gpt2-small'? "`` for the name of ``names`` closest to a mistyped ``text``, or ""."""
    close = difflib.get_close_matches(text, names, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def known_presets() -> list[str]:
    """Every preset that gives random weights, all families."""
    return [name for family in FAMILIES for name in family.presets]


def family_of_name(name: str) -> Family | None:
    """The family publishing the checkpoint ``name`` (``gpt2-small``, ``smollm2-135m`` ...), or None."""
    return next((family for family in FAMILIES if name in family.hub_names), None)


def family_of_preset(preset: str) -> Family | None:
    """The family whose preset ``preset`` is (``tiny``, ``smollm2-135m`` ...), or None."""
    return next((family for family in FAMILIES if preset in family.presets), None)


def family_of_config(config: Mapping[str, Any], source: str) -> Family:
    """The family a ``config.json`` dict describes; ``source`` names the file in the error."""
    # First match wins, so the stricter tests come first in FAMILIES.
    for family in FAMILIES:
        if family.recognises(config):
            return family
    raise ValueError(f"{source} describes no model family minigpt knows ({', '.join(f.name for f in FAMILIES)}): "
                     f"its model_type is {config.get('model_type')!r}")


def family_of(model: nn.Module) -> Family:
    """The family of a model (a compiled or LoRA-wrapped model included: its class is unchanged)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper keeps the model here
    for family in FAMILIES:
        # By class, not by config: a LoRA-wrapped or quantized model keeps its class, only its layers change.
        if isinstance(model, family.model_class):
            return family
    raise TypeError(f"{type(model).__name__} is not a model of a known family "
                    f"({', '.join(f.model_class.__name__ for f in FAMILIES)})")
