import copy
import logging

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.errors import ModelpressError
from modelpress.data import TinyResNet
from modelpress.graph import trace
from modelpress.state import CompressionState
from modelpress.context import RunContext
from modelpress.techniques.finetune import Lost, train
from modelpress.techniques.stopping import agp_schedule
from modelpress.techniques.structured import InputStats, compensate, prune_channels


def ResNetish():
    return TinyResNet(in_channels=3)


def data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=g)
    return [(x[i:i + 16], torch.randint(0, 10, (16,), generator=g)) for i in range(0, n, 16)]


def test_trace_groups_coupled_layers():
    g = trace(ResNetish(), torch.randn(2, 3, 8, 8))
    by_producer = {tuple(sorted(v.producers)): v for v in g.groups.values()}
    shared = by_producer[("a.0", "stem.0")]  # the residual add merged them
    assert set(shared.coupled) == {"stem.1", "a.1", "dw.0", "dw.1"} and not shared.frozen
    assert by_producer[("head.5",)].frozen  # the model's output keeps its 10 classes
    assert [(s.length, s.inner) for s in g.consumers["head.3"]] == [(32, 16)]  # flatten: 16 positions each
    assert [s.length for s in g.consumers["head.0"]] == [24, 8]  # the concat's two parts


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "taylor", "activation"])
def test_half_the_channels_go_and_the_model_still_runs(criterion, tmp_path):
    torch.manual_seed(0)
    model = ResNetish().eval()
    for m in model.modules():  # give BatchNorm non-trivial statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.1, 1)
    before = sum(p.numel() for p in model.parameters())
    result = mp.compress(model, {"stages": [{"prune": {"granularity": "channel", "sparsity": 0.5,
                                                       "criterion": criterion}}]}, train_data=data())
    small = result.model
    after = sum(p.numel() for p in small.parameters())
    x = torch.randn(5, 3, 8, 8)
    assert small(x).shape == (5, 10)
    assert after <= 0.7 * before, f"{after} of {before} parameters"
    assert small.stem[0].out_channels == small.a[0].out_channels == small.dw[0].groups < 16
    path = tmp_path / "s.mpz"
    result.save(path)
    loaded = mp.load(path, model=ResNetish())  # a custom class: loads into a skeleton of new shapes
    assert torch.equal(loaded(x), small(x))


def test_an_operation_the_tracer_cannot_follow_keeps_its_channels():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.b(torch.roll(self.a(x), 1, dims=-1))

    model = Odd()
    with pytest.raises(ModelpressError, match="no channels it can remove.*roll"):
        prune_channels(model, CompressionState(), sparsity=0.5, run=RunContext(train_data=[torch.randn(4, 8)]))
    assert model.a.out_features == 8


def test_untraceable_model_gets_a_clear_message():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else x

    with pytest.raises(ModelpressError, match="could not trace"):
        prune_channels(Branchy(), CompressionState(), sparsity=0.5, run=RunContext(train_data=[torch.randn(2, 4)]))


def test_a_per_channel_parameter_keeps_its_channels():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)
            self.gamma = nn.Parameter(torch.ones(8))
            self.c = nn.Linear(4, 6)

        def forward(self, x):
            return self.c(self.b(self.a(x) * self.gamma))

    model = Scaled()
    prune_channels(model, CompressionState(), sparsity=0.5, run=RunContext(train_data=[torch.randn(4, 8)]))
    assert model.a.out_features == 8 and model.b.out_features == 2  # a's channels meet gamma: kept
    assert model(torch.randn(3, 8)).shape == (3, 6)


def test_a_linear_over_the_width_of_a_conv_map_keeps_the_conv_channels():
    class WidthMix(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.mix = nn.Conv2d(1, 6, 3, padding=1), nn.Linear(6, 6)  # 6 channels, width 6
            self.head = nn.Linear(6 * 6 * 6, 3)

        def forward(self, x):
            return self.head(torch.flatten(self.mix(self.conv(x)), 1))

    model = WidthMix()
    with pytest.raises(ModelpressError, match="no channels it can remove"):
        prune_channels(model, CompressionState(), sparsity=0.5, run=RunContext(train_data=[torch.randn(2, 1, 6, 6)]))
    assert model.conv.out_channels == 6


def test_global_average_pooling_by_mean_keeps_the_channel_axis():
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 12, 3), nn.Linear(12, 5)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    model = Pooled()
    prune_channels(model, CompressionState(), sparsity=0.5, run=RunContext(train_data=[torch.randn(2, 3, 8, 8)]))
    assert model.conv.out_channels == model.fc.in_features == 6
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_refit_carries_removed_inputs_that_correlate_with_kept_ones():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4096, 6, generator=g)
    x = torch.cat([base, base[:, :2] * 2 + 0.5 + 0.01 * torch.randn(4096, 2, generator=g)], 1)  # 2 redundant inputs
    layer = nn.Linear(8, 3)
    ref = layer(x).detach()
    stats = InputStats(x.double().pow(2).mean(0), x.double().mean(0), x.double().T @ x.double() / len(x))
    kept = torch.arange(6)
    sliced = layer.weight.detach()[:, kept]
    plain = (x[:, kept] @ sliced.T + layer.bias).detach()
    compensate(layer, kept, stats, damp=1e-6)
    assert layer.in_features == 6 and layer.weight.shape == (3, 6)
    err_plain, err_refit = (plain - ref).pow(2).mean(), (layer(x[:, kept]) - ref).pow(2).mean()
    assert err_refit < 1e-3 * err_plain  # the removed inputs were (almost) linear in the kept ones
    full = nn.Linear(8, 3)
    w = full.weight.detach().clone()
    compensate(full, torch.arange(8), stats, damp=1e-9)  # nothing removed: the same layer
    assert torch.allclose(full.weight, w, atol=1e-4)


def _hidden(model: nn.Sequential) -> int:
    return model[0].out_features


def test_gradual_channel_pruning_with_recovery_reaches_the_asked_share(mlp, toy_data):
    out = prune_channels(mlp, CompressionState(), sparsity=0.5, criterion="l2", epochs=2, steps=3,
                         run=RunContext(train_data=toy_data))
    assert (out["channels_before"], out["channels_after"], out["sparsity"]) == (64, 32, 0.5)
    assert _hidden(mlp) == mlp[2].in_features == 32


def test_channel_sparsity_auto_stops_where_held_out_data_says(mlp, toy_data, caplog):
    train(mlp, CompressionState(), RunContext(train_data=toy_data), epochs=20, lr=1e-2)
    teacher = copy.deepcopy(mlp).eval()
    widths = {}
    for tolerance in (1e-6, 100.0):
        model = copy.deepcopy(mlp)
        with caplog.at_level(logging.INFO, logger="modelpress"):
            out = prune_channels(model, CompressionState(), sparsity="auto", max_sparsity=0.95, steps=4, epochs=1,
                                 tolerance=tolerance, criterion="l2",
                                 run=RunContext(train_data=toy_data, teacher=teacher))
        widths[tolerance] = (_hidden(model), out["channels_after"], out["sparsity"])
    assert widths[100.0] == (4, 4, 0.95)  # int(0.95 * 64) = 60 of 64 neurons gone
    assert widths[1e-6][0] == widths[1e-6][1] > 4 and widths[1e-6][2] < 0.95  # it stopped earlier
    assert "samples of held-out data" in caplog.text


def test_channel_sparsity_auto_restores_the_last_good_step_whole(mlp, toy_data, monkeypatch, tmp_path):
    from modelpress.techniques import stopping
    script = iter([0.0, 2.0, 3.0])  # points lost after each step; tolerance 1
    monkeypatch.setattr(stopping, "points_lost", lambda *a, **k: Lost(next(script), 0.0, "accuracy", 100))
    x = torch.randn(5, 20)
    result = mp.compress(mlp, {"stages": [{"prune": {"granularity": "neuron", "sparsity": "auto", "steps": 3,
                                                     "max_sparsity": 0.9, "tolerance": 1.0, "criterion": "l2"}}]},
                         train_data=toy_data)
    first = 64 - int(agp_schedule(0.9, 3)[0] * 64)
    assert _hidden(result.model) == result.model[2].in_features == first  # step 1's model, shapes and all
    path = tmp_path / "auto.mpz"
    result.save(path)
    loaded = mp.load(path, model=nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4)))
    assert torch.equal(loaded(x), result.model(x))


def test_channel_sparsity_auto_needs_train_data(mlp):
    with pytest.raises(ModelpressError, match="train_data"):
        prune_channels(mlp, CompressionState(), sparsity="auto", run=RunContext(calib_data=[torch.randn(4, 20)]))
