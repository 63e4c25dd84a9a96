"""Runtime: device choice, precision (float32 by default on every CPU, whatever its
instruction set), autocast, and capturing/restoring every random generator."""

import random
import warnings

import numpy as np
import pytest
import torch

from minigpt.runtime import (
    PRECISIONS,
    autocast,
    default_precision,
    grad_scaler,
    has_fast_bfloat16,
    resolve_precision,
    rng_state,
    select_device,
    set_rng_state,
)

CPU = torch.device("cpu")


@pytest.fixture
def cpu_with_bfloat16(monkeypatch):
    """Pretend the CPU computes bfloat16 natively (AVX-512-BF16 and AMX)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)


@pytest.fixture
def cpu_without_bfloat16(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


def test_select_device():
    assert select_device("cpu") == CPU
    if not torch.cuda.is_available():
        assert select_device() in (CPU, torch.device("mps"))
        with pytest.raises(ValueError, match="no CUDA"):
            select_device("cuda")


def test_precision_choices(cpu_without_bfloat16):
    assert PRECISIONS == ("auto", "float32", "bfloat16", "float16")
    assert resolve_precision("float32", CPU) == "float32"
    assert resolve_precision("auto", CPU) == "float32"
    with pytest.warns(UserWarning, match="emulated"):
        assert resolve_precision("bfloat16", CPU) == "bfloat16"  # asked for explicitly: granted, with a warning
    with pytest.raises(ValueError, match="CUDA"):
        resolve_precision("float16", CPU)
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("float8", CPU)


def test_auto_picks_bfloat16_where_the_cpu_has_it(cpu_with_bfloat16):
    assert has_fast_bfloat16(CPU)
    assert resolve_precision("auto", CPU) == "bfloat16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native: no warning
        assert resolve_precision("bfloat16", CPU) == "bfloat16"


@pytest.mark.parametrize("native", [True, False])
def test_the_default_precision_on_a_cpu_is_float32_whatever_its_instruction_set(monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
    assert has_fast_bfloat16(CPU) is native
    assert default_precision(CPU) == default_precision("cpu") == "float32"


def test_autocast_runs_matrix_products_in_the_chosen_precision():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast(CPU, "float32"):
        assert (a @ b).dtype == torch.float32
    with autocast(CPU, "bfloat16"):
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32  # only inside


def test_the_loss_scaler_is_on_for_float16_only():
    assert not grad_scaler(CPU, "float32").is_enabled()
    assert not grad_scaler(CPU, "bfloat16").is_enabled()


def test_rng_state_restores_every_generator():
    state = rng_state(CPU)
    first = (torch.rand(3), random.random(), np.random.rand(), np.random.randn())
    set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand(), np.random.randn())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
    # Only tensors and plain values: safe to read back with weights_only=True.
    assert all(isinstance(v, (torch.Tensor, tuple, dict)) for v in state.values())
