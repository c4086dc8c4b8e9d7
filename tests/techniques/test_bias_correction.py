"""Bias correction after GPTQ: the mean of each corrected layer's outputs on the calibration data is the
float model's again, through a bias or through the BatchNorm that reads a bias-free convolution."""
import torch
from torch import nn

import modelpress as mp
from modelpress.state import CompressionState
from modelpress.techniques.bias_correction import batchnorm_readers
from modelpress.techniques.quantize import quantize


class ConvBN(nn.Module):
    """A bias-free conv read by a BatchNorm, and a Linear with a bias; `inplace` puts an in-place ReLU
    between the conv and its BatchNorm, which then must not be corrected (it no longer reads the
    conv's output as it came out)."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = self.bn(torch.relu_(y) if self.inplace else y)
        return self.fc(torch.relu(y).mean((2, 3)))


def _model(inplace: bool = False) -> ConvBN:
    torch.manual_seed(0)
    m = ConvBN(inplace)
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(4, 3, 16, 16, generator=g) + 0.5 for _ in range(3)]  # 256 positions: no subsampling


def _means(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean BatchNorm output per channel and mean logits over the batches."""
    out: dict[str, list] = {"bn": [], "fc": []}
    hooks = [model.bn.register_forward_hook(lambda m, a, o: out["bn"].append(o.double().mean((0, 2, 3)))),
             model.fc.register_forward_hook(lambda m, a, o: out["fc"].append(o.double().mean(0)))]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return {k: torch.stack(v).mean(0) for k, v in out.items()}


def _quantized(correct: bool, inplace: bool = False) -> ConvBN:
    m = _model(inplace)
    quantize(m, CompressionState(), bits=3, method="gptq", calib_data=_batches(), bias_correction=correct)
    return m


def test_corrected_layers_keep_their_mean_outputs():
    ref = _means(_model(), _batches())
    plain = _means(_quantized(False), _batches())
    fixed = _means(_quantized(True), _batches())
    assert (plain["bn"] - ref["bn"]).abs().max() > 1e-3  # 3-bit rounding moves the means
    assert (fixed["bn"] - ref["bn"]).abs().max() < 1e-5  # exactly back: BatchNorm is affine in its input
    m = _quantized(True)
    assert m.conv.bias is None  # the shift went into the BatchNorm's running mean, no new parameter
    assert not torch.equal(m.bn.running_mean, _model().bn.running_mean)
    # the Linear's inputs moved with the conv's rounding, so only its own shift is undone: closer, not exact
    assert (fixed["fc"] - ref["fc"]).abs().max() < (plain["fc"] - ref["fc"]).abs().max()


def test_a_batchnorm_after_an_in_place_op_is_not_a_reader():
    m = _model(inplace=True)
    assert batchnorm_readers(m, {"conv": m.conv}, _batches()[0]) == {}
    plain = _model()
    assert batchnorm_readers(plain, {"conv": plain.conv}, _batches()[0]) == {"conv": [plain.bn]}
    q = _quantized(True, inplace=True)
    assert torch.equal(q.bn.running_mean, _model(inplace=True).bn.running_mean)  # nowhere to put it: left


def test_corrected_model_round_trips_into_its_class(tmp_path):
    recipe = "stages:\n  - quantize: {bits: 4, method: gptq}\n"
    result = mp.compress(_model(), recipe, calib_data=_batches())
    result.save(tmp_path / "m.mpz")
    loaded = mp.load(tmp_path / "m.mpz", model=ConvBN())
    x = _batches()[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
    assert torch.equal(loaded.bn.running_mean, result.model.bn.running_mean)
