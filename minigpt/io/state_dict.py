"""Comparing a state dict with the tensors a model expects.

A checkpoint is a dict of named tensors; before its tensors are put into a model, every
name the model needs must be there, nothing else may be, and each shape must match.
:func:`tensor_mismatches` says, in one list, everything that is wrong, so that an error
message can name each offending tensor at once instead of the first one only.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def tensor_mismatches(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, torch.Tensor]) -> list[str]:
    """What is wrong with ``found`` against the ``expected`` name -> shape table: missing,
    unexpected and wrongly shaped tensors, each named (empty when everything fits).

    ``expected`` maps a name to a shape such as ``(50257, 768)``; ``found`` maps a name to
    a tensor (only its ``.shape`` is read, so tensors on the ``meta`` device work too).
    """
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
