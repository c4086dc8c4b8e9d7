import pytest
import torch
import torch.nn.functional as F

from modelpress.runtime.int8 import Int8Linear, KernelCache, available_kernels, quantize_rows


def make_layer(bias=True):
    w = torch.randn(48, 40)
    s = w.abs().amax(1) / 127
    return Int8Linear.from_codes(torch.round(w / s[:, None]), s, torch.randn(48) if bias else None)


def reference(m, x):
    """The exact product the integer kernels compute: per-token int8 inputs times int8 weights."""
    x2 = x.reshape(-1, x.shape[-1])
    q, sx = quantize_rows(x2)
    y = (q @ m.weight.float().t()) * sx[:, None] * m.weight_scale
    if m.bias is not None:
        y = y + m.bias
    return y.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("kernel", available_kernels())
@pytest.mark.parametrize("bias", [True, False])
def test_every_kernel_computes_the_int8_product(kernel, bias):
    m = make_layer(bias)
    m.kernel = kernel
    x = torch.randn(3, 7, 40)
    with torch.no_grad():
        y = m(x)
    assert y.shape == (3, 7, 48)
    if kernel == "dequant":  # the float fallback: the dequantized weight, unquantized inputs
        assert torch.allclose(y, F.linear(x, m.dequantized(), m.bias), atol=1e-5)
    else:
        assert torch.allclose(y, reference(m, x), rtol=1e-5, atol=1e-4)


def test_per_token_quantization_error_is_within_half_a_step():
    x = torch.randn(64, 40) * torch.logspace(-2, 2, 64)[:, None]  # rows of very different ranges
    q, s = quantize_rows(x)
    assert q.abs().max() <= 127
    assert ((q * s[:, None] - x).abs() <= s[:, None] / 2 * (1 + 1e-5)).all()


def test_automatic_choice_matches_the_reference_and_is_cached():
    m = make_layer()
    m.kernel, m.cache = None, KernelCache()  # a cache of its own: nothing measured yet
    x = torch.randn(100, 40)
    with torch.no_grad():
        y = m(x)
    assert list(m.cache.choices) == [(40, 48, 128)]
    chosen = m.cache.choices[(40, 48, 128)]
    assert chosen in available_kernels()
    expected = F.linear(x, m.dequantized(), m.bias) if chosen == "dequant" else reference(m, x)
    assert torch.allclose(y, expected, rtol=1e-5, atol=1e-4)


def test_gradients_flow_to_inputs_and_bias_when_training():
    m = make_layer()
    x = torch.randn(5, 40, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and m.bias.grad is not None
    assert torch.allclose(m.bias.grad, torch.full((48,), 5.0))
