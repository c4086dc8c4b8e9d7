"""Quantization-aware training of weights and inputs, exported to static int8 runtime layers."""
import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.errors import ModelpressError
from modelpress.techniques.qat import QATConfig, StaticInt8Conv2d, StaticInt8Linear, calibrate_inputs, targets
from modelpress.context import RunContext


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, groups=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 2 * 2, 4))


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, :4].mean((1, 2)) > 0).long()
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]


def test_the_recipe_parses_and_refuses_bad_values():
    r = mp.Recipe.from_yaml("stages: [{qat: {epochs: 1, ranges: calibrated}}]")
    assert isinstance(r.stages[0], QATConfig) and r.stages[0].ranges == "calibrated"
    for bad, field in [("{epochs: -1}", "epochs"), ("{epochs: 1, bits: 4}", "bits"), ("{epochs: 1, ranges: minmax}",
                                                                                      "ranges"), ("{}", "epochs")]:
        with pytest.raises(mp.RecipeError, match=field):
            mp.Recipe.from_yaml(f"stages: [{{qat: {bad}}}]")


def test_layers_become_static_int8_and_the_file_round_trips(images, tmp_path):
    model = cnn()
    result = mp.compress(model, {"stages": [{"qat": {"epochs": 1, "lr": 1e-3}}]}, train_data=images)
    q = result.model
    assert [type(m) for m in (q[0], q[3], q[6])] == [StaticInt8Conv2d, StaticInt8Conv2d, StaticInt8Linear]
    assert all(m.weight.dtype == torch.int8 and int(m.weight.abs().max()) <= 127 for m in (q[0], q[3], q[6]))
    assert not any(m._forward_pre_hooks for m in q.modules())  # the fake-quant hooks are gone
    assert not any(n.endswith("input_quant.scale") for n in q.state_dict())
    path = tmp_path / "qat.mpz"
    result.save(path)
    x = images[0][0]
    assert torch.equal(mp.load(path)(x), q(x))


def test_the_runtime_layer_computes_the_fake_quantized_product(images):
    model = cnn()
    result = mp.compress(model, {"stages": [{"qat": {"epochs": 0}}]}, train_data=images)
    lin = result.model[6]
    x = torch.randn(5, 32) * 3
    s = lin.input_scale
    xq = torch.round(x / s).clamp(-127, 127) * s
    w = lin.weight.float() * lin.weight_scale[:, None]
    assert torch.allclose(lin(x), xq @ w.T + lin.bias, rtol=1e-5, atol=1e-5)
    assert torch.equal(lin(x), lin(xq))  # inputs already on the grid are represented exactly


def test_learned_ranges_move_and_calibrated_ones_do_not(images):
    model = cnn()
    run = RunContext(train_data=images)
    start = calibrate_inputs(model, targets(model), run, batches=4)
    learned = mp.compress(model, {"stages": [{"qat": {"epochs": 3, "lr": 1e-2}}]}, train_data=images)
    fixed = mp.compress(model, {"stages": [{"qat": {"epochs": 3, "lr": 1e-2, "ranges": "calibrated"}}]},
                        train_data=images)
    names = {"0": learned.model[0], "3": learned.model[3], "6": learned.model[6]}
    assert any(abs(float(m.input_scale) - start[n]) > 1e-6 * start[n] for n, m in names.items())
    assert [float(fixed.model[i].input_scale) for i in (0, 3, 6)] == [start[n] for n in ("0", "3", "6")]


def test_calibrated_scale_has_the_least_rounding_error_among_its_clips():
    layer = nn.Linear(4, 2)
    model = nn.Sequential(layer)
    x = torch.randn(256, 4)
    x[0, 0] = 50.0  # one outlier: clipping it gives a finer grid for everything else
    scale = calibrate_inputs(model, {"0": layer}, RunContext(calib_data=[x]), batches=1)["0"]
    assert scale < 50.0 / 127  # the outlier is clipped


def test_nothing_to_quantize_and_already_quantized_are_clear_errors(images):
    with pytest.raises(ModelpressError, match="no Linear or Conv2d"):
        mp.compress(cnn(), {"stages": [{"qat": {"epochs": 1}}], "exclude": ["*"]}, train_data=images)
    with pytest.raises(ModelpressError, match="already quantized"):
        mp.compress(cnn(), {"stages": [{"quantize": {"bits": 8}}, {"qat": {"epochs": 1}}]}, train_data=images)
