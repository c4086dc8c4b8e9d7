"""auto: the most accurate recipe that meets a budget, found by screening cheaply first."""
import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress import data


@pytest.fixture(scope="module")
def digits_mlp():
    torch.manual_seed(0)
    split = data.digits(image=False)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    return data.train_classifier(net, split, epochs=30), split


@pytest.mark.slow
def test_auto_meets_a_ratio_within_the_drop(digits_mlp, tmp_path):
    model, split = digits_mlp
    acc = lambda m: {"acc": data.accuracy(m, split.x_test, split.y_test)}  # noqa: E731
    base = acc(model)["acc"]
    result = mp.auto(model, min_ratio=20, max_drop=1.5, train_data=split.loader(64), eval_fn=acc,
                     example=split.x_test[:256], keep=2, repeats=3)
    assert result.met, result.message
    size = result.save(tmp_path / "a.mpz")
    fp32 = 4 * sum(p.numel() for p in model.parameters())
    assert fp32 / size >= 20
    assert base - data.accuracy(mp.load(tmp_path / "a.mpz"), split.x_test, split.y_test) <= 1.5
    assert len(result.proxies) > 10 and len(result.tried.rows) == 3  # many screened, two run in full
    assert result.message.startswith("met the budget")


def test_auto_is_deterministic_and_says_when_the_budget_cannot_be_met(digits_mlp):
    model, split = digits_mlp
    calib = [x for x, _ in split.loader(64)][:4]
    runs = [mp.auto(model, max_mb=0.035, calib_data=calib, keep=1, repeats=2) for _ in range(2)]
    assert runs[0].met and runs[0].tried.rows[1].name == runs[1].tried.rows[1].name
    assert runs[0].tried.rows[1].bytes == runs[1].tried.rows[1].bytes <= 35_000
    hopeless = mp.auto(model, max_mb=0.001, calib_data=calib, keep=1, repeats=2)
    assert not hopeless.met and hopeless.message.startswith("no candidate met the budget")
    closest = min((r for r in hopeless.proxies if r.bytes), key=lambda r: r.bytes)
    assert hopeless.tried.rows[1].name == closest.name  # the smallest file it could find
    assert runs[0].message.endswith("agreement measured on 25 samples held out of calib_data")  # of 4 batches
    from modelpress.compare import held_out_metric
    assert held_out_metric(model, None, [calib[0][:15]])[3] == "calibration/training batches (none could be held out)"


def test_auto_needs_a_budget(mlp, toy_data):
    with pytest.raises(mp.ModelpressError, match="needs a budget"):
        mp.auto(mlp, train_data=toy_data)


def test_candidates_that_come_out_the_same_are_run_once(digits_mlp):
    model, split = digits_mlp
    calib = [x for x, _ in split.loader(64)][:4]
    result = mp.auto(model, max_mb=0.03, calib_data=calib, keep=3, repeats=2)
    screened = {r.name: r for r in result.proxies}
    full = [screened[r.name] for r in result.tried.rows[1:]]
    assert len(full) >= 3
    for i, a in enumerate(full):  # (3-bit and 2-bit bases sized to this budget came out 1 byte apart)
        for b in full[i + 1:]:
            assert a.metrics != b.metrics or abs(a.bytes - b.bytes) > 0.01 * b.bytes, (a.name, b.name)
    assert all("MB" not in r.name for r in result.proxies)  # names say what a recipe does, not a size it misses


def test_auto_is_never_worse_than_the_best_preset_that_fits(digits_mlp):
    model, split = digits_mlp
    calib = [x for x, _ in split.loader(64)][:4]
    acc = lambda m: {"acc": data.accuracy(m, split.x_test, split.y_test)}  # noqa: E731
    result = mp.auto(model, max_mb=0.05, calib_data=calib, eval_fn=acc, keep=1, repeats=2)
    rows = {r.name: r for r in result.tried.rows[1:]}
    presets = [r for name, r in rows.items() if name.startswith("preset ")]
    assert len(presets) == 1 and presets[0].bytes <= 50_000  # the best preset that fits, whatever keep says
    assert len(rows) == 1 + (result.tried.rows[1].name != presets[0].name)  # keep=1, plus the preset if not it
    chosen = data.accuracy(result.model, split.x_test, split.y_test)
    assert chosen >= presets[0].metrics["acc"] and result.met
