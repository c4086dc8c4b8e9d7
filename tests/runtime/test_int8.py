import pytest
import torch
import torch.nn.functional as F

from modelpress.capabilities import native_bf16
from modelpress.runtime import int8
from modelpress.runtime.int8 import KERNELS, Int8Linear, plan, quantize_rows


def make_layer(bias=True, in_f=40, out_f=48):
    w = torch.randn(out_f, in_f)
    s = w.abs().amax(1) / 127
    return Int8Linear.from_codes(torch.round(w / s[:, None]), s, torch.randn(out_f) if bias else None)


def reference(m, x):
    """The exact product every kernel computes: per-token int8 inputs times int8 weights, in float64."""
    x2 = x.reshape(-1, x.shape[-1])
    q, sx = quantize_rows(x2)
    y = (q.double() @ m.weight.double().t()) * sx[:, None].double() * m.weight_scale.double()
    if m.bias is not None:
        y = y + m.bias.double()
    return y.reshape(*x.shape[:-1], -1).float()


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


# oneDNN writes bf16 on CPUs with native bf16: each output rounded to 8 significant bits
ONEDNN_TOL = 4e-3 if native_bf16() else 1e-5


@pytest.mark.skipif(not int8.ONEDNN, reason="no oneDNN int8 kernel in this torch build")
@pytest.mark.parametrize("bias", [True, False])
def test_the_integer_kernel_computes_the_int8_product(bias):
    m = make_layer(bias)
    m.kernel = "onednn"
    x = torch.randn(3, 7, 40)
    with torch.no_grad():
        y = m(x)
    assert y.shape == (3, 7, 48)
    assert rel_err(y, reference(m, x)) < ONEDNN_TOL


@pytest.mark.parametrize("bias", [True, False])
def test_the_dequant_kernel_is_the_dequantized_fp32_layer(bias):
    m = make_layer(bias)
    m.kernel = "dequant"
    x = torch.randn(3, 7, 40)
    with torch.no_grad():
        assert torch.equal(m(x), F.linear(x, m.dequantized(), m.bias))


def test_kernels_differ_only_by_the_inputs_rounding_to_int8():
    m = make_layer(in_f=512, out_f=384)
    x = torch.randn(64, 512)
    out = {}
    with torch.no_grad():
        for kernel in KERNELS if int8.ONEDNN else ["dequant"]:
            m.kernel = kernel
            out[kernel] = m(x)
    for y in out.values():
        assert rel_err(y, out["dequant"]) < 1e-2


def test_plan_is_a_rule_on_shape_and_rows():
    small, big = (300, 100), (1024, 1024)
    assert plan(*small, 1) == "dequant"                     # the integer kernel's fixed cost does not pay
    assert plan(*small, 1 << 20) == ("onednn" if int8.ONEDNN else "dequant")
    assert plan(*big, 1) == ("onednn" if int8.ONEDNN else "dequant")  # batch 1: memory-bound, 4x less to read
    assert [plan(*small, 64) for _ in range(3)] == ["dequant"] * 3


def test_per_token_quantization_error_is_within_half_a_step():
    x = torch.randn(64, 40) * torch.logspace(-2, 2, 64)[:, None]  # rows of very different ranges
    q, s = quantize_rows(x)
    assert q.abs().max() <= 127
    assert ((q * s[:, None] - x).abs() <= s[:, None] / 2 * (1 + 1e-5)).all()


def test_bf16_inputs_give_bf16_outputs():
    m = make_layer()
    x = torch.randn(5, 40)
    with torch.no_grad():
        y = m(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), F.linear(x.bfloat16().float(), m.dequantized(), m.bias)) < 1e-2


def test_gradients_flow_to_inputs_and_bias_when_training():
    m = make_layer()
    x = torch.randn(5, 40, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and m.bias.grad is not None
    assert torch.allclose(m.bias.grad, torch.full((48,), 5.0))


def test_a_layer_that_ran_copies_without_its_cached_layouts():
    import copy

    m = make_layer(in_f=512, out_f=384)
    m.kernel = "onednn" if int8.ONEDNN else "dequant"
    x = torch.randn(64, 512)
    with torch.no_grad():
        y = m(x)  # builds the kernel's weight layout (oneDNN's prepacked tensor cannot be deep-copied)
        twin = copy.deepcopy(m)
        assert "_layouts" in m.__dict__ and not twin.__dict__["_layouts"]
        assert torch.equal(twin(x), y)
