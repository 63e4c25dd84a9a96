"""Runtime: device choice, precision (float32 by default on every CPU, whatever its
instruction set), autocast, torch.compile with an eager fallback, and capturing/restoring
every random generator."""

import random
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.model import GPTModel
from minigpt.runtime import runtime
from minigpt.runtime.runtime import (
    PRECISIONS,
    CompiledModel,
    autocast,
    compile_model,
    compile_with_loss,
    default_precision,
    grad_scaler,
    has_fast_bfloat16,
    no_fast_bfloat16_reason,
    resolve_precision,
    rng_state,
    select_device,
    set_rng_state,
)

CPU = torch.device("cpu")


@pytest.fixture
def cpu_with_bfloat16(monkeypatch):
    """Pretend the CPU computes bfloat16 natively (AVX-512-BF16 and AMX), measured 1.5x faster."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(runtime, "bfloat16_speedup", lambda rows: 1.5)


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


def test_auto_stays_float32_where_bfloat16_is_emulated_and_says_why(cpu_without_bfloat16):
    assert not has_fast_bfloat16(CPU)
    assert resolve_precision("auto", CPU) == "float32"
    assert "neither AVX-512-BF16 nor AMX" in no_fast_bfloat16_reason(CPU)
    with pytest.warns(UserWarning, match="neither AVX-512-BF16 nor AMX"):
        resolve_precision("bfloat16", CPU)


@pytest.mark.parametrize("avx512_bf16, amx", [(True, False), (False, True)])
def test_either_avx512_bf16_or_amx_makes_bfloat16_native(monkeypatch, avx512_bf16, amx):
    monkeypatch.setattr(runtime, "bfloat16_speedup", lambda rows: 1.5)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert no_fast_bfloat16_reason(CPU) is None
    assert resolve_precision("auto", CPU) == "bfloat16"


def test_native_bfloat16_measured_slower_than_float32_stays_float32(cpu_with_bfloat16, monkeypatch):
    """AMX or AVX512-BF16 alone is no proof: where the measured table says bfloat16's products are
    slower here (batch-1 decoding on some CPUs), auto keeps float32 and says why."""
    asked = []
    monkeypatch.setattr(runtime, "bfloat16_speedup", lambda rows: asked.append(rows) or 0.8)
    assert not has_fast_bfloat16(CPU, rows=1)
    assert resolve_precision("auto", CPU) == "float32"
    assert "measured 1.25x slower than its float32 ones" in no_fast_bfloat16_reason(CPU, rows=1)
    assert asked[0] == 1 and asked[1] > 1  # decoding asks about one row, training about many


def test_auto_picks_bfloat16_where_the_cpu_has_it(cpu_with_bfloat16):
    assert has_fast_bfloat16(CPU)
    assert resolve_precision("auto", CPU) == "bfloat16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native: no warning
        assert resolve_precision("bfloat16", CPU) == "bfloat16"


@pytest.mark.parametrize("native", [True, False])
def test_the_default_precision_on_a_cpu_is_float32_whatever_its_instruction_set(monkeypatch, native):
    monkeypatch.setattr(runtime, "bfloat16_speedup", lambda rows: 1.5)
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


# ---------------------------------------------------------------------------- compiling


def _tiny_model() -> GPTModel:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=32, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)
    return GPTModel(cfg).eval()


def _broken_backend(graph_module, example_inputs):
    raise RuntimeError("no C++ compiler found\n(a long traceback follows)")


def test_a_compiled_model_computes_what_the_model_does_and_is_the_model_otherwise(one_thread):
    model = _tiny_model()
    ids = torch.randint(0, 32, (2, 8))
    compiled = compile_model(model, backend="eager")  # TorchDynamo's tracing without code generation
    assert isinstance(compiled, CompiledModel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it compiled: no fallback warning
        torch.testing.assert_close(compiled(ids), model(ids))
    assert not compiled.fell_back
    assert compiled.cfg is model.cfg and compiled.reset_kv_cache == model.reset_kv_cache
    assert list(compiled.parameters()) == list(model.parameters())
    assert not compiled.training  # as the model was
    compiled.train()
    assert model.training
    with pytest.raises(AttributeError, match="no_such_thing"):
        compiled.no_such_thing  # noqa: B018


def test_a_compiler_failure_falls_back_to_the_eager_model_with_one_warning(one_thread):
    model = _tiny_model()
    ids = torch.randint(0, 32, (2, 8))
    compiled = compile_model(model, backend=_broken_backend)
    with pytest.warns(UserWarning, match="torch.compile failed") as caught:
        torch.testing.assert_close(compiled(ids), model(ids))
    assert len(caught) == 1 and "running the model eagerly" in str(caught[0].message)
    assert "\n" not in str(caught[0].message)  # one line
    assert compiled.fell_back
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later calls stay eager, silently
        torch.testing.assert_close(compiled(ids[:1]), model(ids[:1]))


def test_a_model_error_is_not_taken_for_a_compiler_failure(one_thread):
    from torch._dynamo.exc import TorchDynamoException

    compiled = compile_model(_tiny_model(), backend="eager")
    with pytest.raises((ValueError, IndexError)) as caught:  # id 99 is outside the vocabulary of 32
        compiled(torch.tensor([[1, 2, 99]]))
    assert not isinstance(caught.value, TorchDynamoException)
    assert not compiled.fell_back  # raised as it is, and the next call is compiled again


def test_compile_refused_at_once_gives_the_model_back_with_a_warning(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python version")

    monkeypatch.setattr(torch, "compile", refuse)
    model = _tiny_model()
    with pytest.warns(UserWarning, match="torch.compile failed .RuntimeError: torch.compile is not supported"):
        assert compile_model(model) is model


def _loss(model, batch):
    ids, targets = batch
    return torch.nn.functional.cross_entropy(model(ids).flatten(0, 1).float(), targets.flatten())


def test_a_model_compiled_with_its_loss_gives_the_same_loss_and_gradients(one_thread):
    eager, compiled_model = _tiny_model(), _tiny_model()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randint(0, 32, (2, 8), generator=g), torch.randint(0, 32, (2, 8), generator=g))
    loss_of = compile_with_loss(compiled_model, _loss, backend="eager")
    assert isinstance(loss_of, CompiledModel) and not loss_of.fell_back
    expected, got = _loss(eager, batch), loss_of(batch)
    expected.backward(), got.backward()
    torch.testing.assert_close(got, expected)
    for a, b in zip(eager.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad)


def test_a_distributed_model_is_compiled_alone_and_its_loss_runs_eagerly():
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        model = DistributedDataParallel(_tiny_model())
        loss_of = compile_with_loss(model, _loss, backend="eager")
        assert isinstance(loss_of, partial) and loss_of.func is _loss
        assert isinstance(loss_of.args[0], CompiledModel) and loss_of.args[0].eager is model
    finally:
        torch.distributed.destroy_process_group()
