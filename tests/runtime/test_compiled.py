"""modelpress.accelerate: the same model in its compute dtype, compiled, for inference."""
import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.capabilities import native_bf16
from modelpress.runtime import int8 as int8_runtime
from modelpress.runtime.half import Linear16
from modelpress.runtime.int8 import Int8Linear


def int8_mlp():
    torch.manual_seed(0)
    layers = []
    for i, o in ((256, 1024), (1024, 256)):
        w = torch.randn(o, i) / i ** 0.5
        s = w.abs().amax(1) / 127
        layers += [Int8Linear.from_codes(torch.round(w / s[:, None]), s, torch.randn(o) * 0.1), nn.GELU()]
    return nn.Sequential(nn.LayerNorm(256), *layers[:-1]).eval()


def cos(a, b):
    return float(nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0))


def test_eager_fp32_with_int8_kernels_is_the_model_itself():
    model, x = int8_mlp(), torch.randn(64, 256)
    with torch.no_grad():
        expected = model(x)
    fast = mp.accelerate(model, dtype="fp32", int8="kernel", compile=False)
    assert fast.describe() == "eager, float32 compute, int8 layers: int8 kernel"
    assert torch.equal(fast(x), expected)


def test_bf16_widens_int8_layers_and_casts_inputs_and_outputs():
    model, x = int8_mlp(), torch.randn(64, 256)
    with torch.no_grad():
        reference = nn.functional.linear(nn.functional.layer_norm(x, (256,)), model[1].dequantized(), model[1].bias)
    fast = mp.accelerate(model, dtype="bf16", int8="bf16", compile=False)
    assert isinstance(fast.model[1], Linear16) and fast.model[1].weight.dtype == torch.bfloat16
    assert fast.model[0].weight.dtype == torch.bfloat16
    y = fast(x)
    assert y.dtype == torch.float32 and y.shape == (64, 256)
    with torch.no_grad():
        first = fast.model[1](fast.model[0](x.bfloat16())).float()
    assert cos(first, reference) > 0.999  # bf16 products of the int8 weights: the int8 layer's function


@pytest.mark.skipif(not int8_runtime.ONEDNN, reason="no oneDNN int8 kernel in this torch build")
def test_compiled_int8_kernels_agree_with_eager():
    model, x = int8_mlp(), torch.randn(512, 256)
    with torch.no_grad():
        eager = model(x)
    fast = mp.accelerate(model, dtype="fp32", int8="kernel", compile=True)
    y = fast(x)
    assert fast.graph == "inductor (freezing)"
    tol = 1e-2 if native_bf16() else 1e-4  # the kernel writes bf16 where bf16 is native
    assert float((y - eager).norm() / eager.norm()) < tol
    assert torch.equal(fast(x), y)  # compiled once, same answer again


def test_auto_leaves_a_small_model_eager_in_fp32():
    """Under a million weights compiling and bf16 cost more than they save (runtime/compiled.py)."""
    model, x = int8_mlp(), torch.randn(4, 256)
    with torch.no_grad():
        expected = model(x)
    fast = mp.accelerate(model)
    assert fast.describe() == "eager, float32 compute, int8 layers: int8 kernel"
    assert isinstance(fast.model[1], Int8Linear) and torch.equal(fast(x), expected)


def test_compiled_small_int8_layers_at_few_rows_multiply_the_dequantized_weight():
    model, x = int8_mlp(), torch.randn(4, 256)  # 4 x 256 x 1024: the "dequant" rule of runtime/int8.py
    with torch.no_grad():
        eager = model(x)
    y = mp.accelerate(model, dtype="fp32", int8="kernel", compile=True)(x)
    assert float((y - eager).norm() / eager.norm()) < 1e-5  # the same fp32 product: float rounding only


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="dtype must be one of"):
        mp.accelerate(int8_mlp(), dtype="int4")
    with pytest.raises(ValueError, match="int8 must be one of"):
        mp.accelerate(int8_mlp(), int8="fast")
    with pytest.raises(ValueError, match="compile must be one of"):
        mp.accelerate(int8_mlp(), compile="yes")


@pytest.mark.skipif(not int8_runtime.ONEDNN, reason="no oneDNN int8 kernel in this torch build")
def test_the_fp32_output_int8_path_of_cpus_without_native_bf16(monkeypatch):
    """The path an AVX2-only CPU takes (fp32 compute, the int8 kernel writing fp32), forced here."""
    monkeypatch.setattr(int8_runtime, "native_bf16", lambda: False)
    model, x = int8_mlp(), torch.randn(512, 256)
    model[1].kernel = model[3].kernel = "onednn"
    with torch.no_grad():
        eager = model(x)
        model[1].kernel = model[3].kernel = None
        reference = nn.Sequential(model[0], nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256)).eval()
        for i in (1, 3):
            reference[i].weight.data, reference[i].bias.data = model[i].dequantized(), model[i].bias.detach()
        assert float((eager - reference(x)).norm() / reference(x).norm()) < 2e-2  # activation rounding only
    fast = mp.accelerate(model, dtype="fp32", int8="kernel", compile=True)
    y = fast(x)
    assert fast.graph == "inductor (freezing)"
    assert float((y - eager).norm() / eager.norm()) < 1e-4  # both write fp32: float rounding only


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Linear(16, 64)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_bf16_gives_loaded_buffers_their_own_storage_and_the_model_compiles(tmp_path):
    """A loaded buffer can be a view of a float32 base; cast with `.data =` it stayed one, and torch.compile
    refused the model (every loaded CNN's BatchNorm statistics on a CPU with native bf16)."""
    torch.manual_seed(0)
    path = tmp_path / "c.mpz"
    mp.compress(ConvNet().eval(), {"stages": [{"quantize": {"bits": 4, "group_size": 16}}]}).save(path)
    loaded = mp.load(path, model=ConvNet())
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        expected = loaded(x)
    fast = mp.accelerate(loaded, dtype="bf16", compile=True)
    tensors = list(loaded.parameters()) + list(loaded.buffers())
    assert all(t._base is None or t._base.dtype == t.dtype for t in tensors)
    assert loaded.bn.running_mean.dtype == torch.bfloat16
    y = fast(x)
    assert fast.graph == "inductor (freezing)"  # compiled, not "eager (compile failed)"
    assert cos(y, expected) > 0.999


def test_each_accelerated_model_gets_its_own_room_under_dynamos_recompile_limit(monkeypatch):
    """Dynamo's recompile limit counts graphs per forward function, across models of one class; past it
    the function runs eagerly without a word. With the limit at 1, two models of one class still compile."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    torch._dynamo.reset()
    x = torch.randn(2, 16)
    before = counters["stats"]["unique_graphs"]
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
        fast = mp.accelerate(model, dtype="fp32", compile=True)
        with torch.no_grad():
            assert torch.allclose(fast(x), model(x), atol=1e-5)
    assert counters["stats"]["unique_graphs"] - before == 2  # one graph each: the second was not left eager
