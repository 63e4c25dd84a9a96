"""minigpt.runtime.kernels: each product's kernel timed once on this machine, kept on disk, forced by the
environment."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from minigpt.runtime import kernels
from minigpt.runtime.kernels import (
    KERNEL_ENV,
    MAX_TIMED_ROWS,
    KernelTable,
    Product,
    choose,
    kernel_table,
    row_bucket,
    table_path,
)
from minigpt.runtime.linear import Linear

needs_onednn = pytest.mark.skipif(not kernels.HAS_ONEDNN, reason="PyTorch built without oneDNN")


@pytest.fixture
def measuring(monkeypatch):
    """The table decides (nothing forced), with every measurement recorded and answered by ``timings``."""
    monkeypatch.setenv(KERNEL_ENV, "measure")
    measured = []
    timings = {"f_linear": 2.0, "onednn": 1.0}

    def fake_measure(product):
        measured.append(product)
        return dict(timings)

    monkeypatch.setattr(kernels, "measure", fake_measure)
    kernels._TABLES.clear()
    yield measured, timings
    kernels._TABLES.clear()


def test_rows_are_bucketed_to_powers_of_two():
    assert [row_bucket(n) for n in (0, 1, 2, 3, 4, 5, 64, 65, 1024)] == [1, 1, 2, 4, 4, 8, 64, 128, 1024]


def test_a_product_is_named_by_its_key_and_back():
    product = Product("grad_weight", 64, 768, 3072, "bfloat16")
    assert product.key == "grad_weight bfloat16 64x768->3072"
    assert Product.from_key(product.key) == product
    assert product.flops == 2 * 64 * 768 * 3072 and product.weight_bytes == 2 * 768 * 3072
    assert Product("int4", 1, 768, 3072).weight_bytes == 768 * 3072 / 2
    # A product of more rows than are timed is timed at MAX_TIMED_ROWS: its speed counts those FLOPs.
    assert Product("forward", 1024, 768, 3072).flops == 2 * MAX_TIMED_ROWS * 768 * 3072


def test_the_faster_kernel_is_chosen_measured_once_and_read_back_by_the_next_process(measuring):
    measured, timings = measuring
    product = Product("forward", 1, 768, 3072)
    assert choose(product) == "onednn" and choose(product) == "onednn"
    assert measured == [product]  # once: later calls read the table
    saved = json.loads(table_path().read_text())
    assert saved["machine"] == kernels.machine()
    assert saved["seconds"][product.key] == {"f_linear": 2.0, "onednn": 1.0}

    kernels._TABLES.clear()  # a new process: the file answers, nothing is measured again
    timings.update(f_linear=0.5)
    assert choose(product) == "onednn" and measured == [product]
    assert choose(Product("forward", 2, 768, 3072)) == "f_linear"  # a new shape is measured: F.linear won


def test_another_thread_count_or_cpu_measures_again(measuring, monkeypatch):
    measured, _ = measuring
    product = Product("forward", 1, 768, 768)
    choose(product)
    other = {**kernels.machine(), "threads": kernels.machine()["threads"] + 1}
    assert table_path(other) != table_path()
    assert KernelTable(table_path(other), other).seconds == {}
    monkeypatch.setattr(kernels, "cpu_model", lambda: "another CPU")
    kernels._TABLES.clear()
    choose(product)
    assert measured == [product, product]


def test_a_damaged_table_is_measured_again(measuring):
    measured, _ = measuring
    table_path().parent.mkdir(parents=True)
    table_path().write_text("{not json")
    assert choose(Product("forward", 1, 64, 64)) == "onednn" and len(measured) == 1
    assert json.loads(table_path().read_text())["seconds"]  # rewritten whole


@pytest.mark.parametrize("value", ["f_linear", "onednn"])
def test_the_environment_forces_a_kernel_without_measuring(value, monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, value)
    monkeypatch.setattr(kernels, "measure", lambda product: pytest.fail("measured although forced"))
    assert choose(Product("grad_input", 8, 64, 64)) == value
    assert choose(Product("int8", 1, 64, 64)) == "dequantize"  # quantized layers take the reference path


def test_an_unknown_forced_kernel_says_what_to_set(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "mkl")
    with pytest.raises(ValueError, match=r"MINIGPT_LINEAR_KERNEL='mkl' is not a kernel: set it to one of "
                                         r"f_linear, onednn, or to 'measure'"):
        choose(Product("forward", 1, 64, 64))


@needs_onednn
def test_a_real_measurement_times_both_kernels_on_every_product(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "measure")
    for op in kernels.OPS:
        seconds = kernels.measure(Product(op, 4, 64, 32), repeats=(1, 1))
        assert set(seconds) == {"f_linear", "onednn"} and all(0 < s < 1 for s in seconds.values())


@needs_onednn
@pytest.mark.parametrize("kernel", kernels.KERNELS)
def test_each_kernel_computes_the_three_products(kernel):
    g = torch.Generator().manual_seed(0)
    x, weight, grad = (torch.randn(*shape, generator=g) for shape in ((5, 48), (80, 48), (5, 80)))
    for wide in (weight, weight[:16]):  # grad_weight takes the larger of its operands as oneDNN's weight
        torch.testing.assert_close(kernels.grad_weight(kernel, grad[:, :wide.shape[0]], x),
                                   grad[:, :wide.shape[0]].t() @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.forward(kernel, x, weight, None), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.grad_input(kernel, grad, weight), grad @ weight, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_layer_measures_its_products_once_and_keeps_its_gradients(measuring):
    measured, _ = measuring
    layer = Linear(48, 80)
    x = torch.randn(3, 48, requires_grad=True)
    layer(x).sum().backward()
    layer(x).sum().backward()
    assert [p.op for p in measured] == ["forward", "grad_input", "grad_weight"]
    assert [product.key for product, _ in kernel_table().rows()] == [
        "forward float32 4x48->80", "grad_input float32 4x48->80", "grad_weight float32 4x48->80"]


@needs_onednn
@pytest.mark.parametrize("kernel", kernels.KERNELS)
def test_autocast_training_runs_in_bfloat16_with_float32_gradients(kernel, monkeypatch):
    """Under CPU autocast the routed product computes in bfloat16, as F.linear's would, and the
    gradients come back in the parameters' float32, within bfloat16's rounding of F.linear's."""
    monkeypatch.setenv(KERNEL_ENV, kernel)
    layer, plain = Linear(64, 96), torch.nn.Linear(64, 96)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = layer(x), plain(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    out.float().square().sum().backward()
    ref.float().square().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad, rtol=5e-2, atol=5e-2)
