"""Careless but honest inputs to compress() and compare(): each gets a ModelpressError that names what
was wrong and what was expected, quickly, or is handled correctly."""
from __future__ import annotations

import itertools
import logging
import tempfile

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress import stage
from modelpress.compare import compare
from modelpress.errors import ModelpressError
from modelpress.recipe import ClusterConfig
from modelpress.state import CompressionState
from modelpress.context import RunContext
from modelpress.techniques.finetune import train

FINETUNE = {"stages": [{"finetune": {"epochs": 2, "lr": 1e-3}}]}
ONE_SHOT = {
    "generator": lambda batches: (b for b in batches),
    "map": lambda batches: map(tuple, batches),
    "itertools": lambda batches: itertools.chain(batches),
    "iter": lambda batches: iter(batches),
}


# 1. one-shot iterators

@pytest.mark.parametrize("kind", ONE_SHOT)
def test_one_shot_train_data_trains_like_a_list(mlp, toy_data, kind, caplog):
    batches = [tuple(b) for b in toy_data]
    torch.manual_seed(1)
    with caplog.at_level(logging.INFO, logger="modelpress"):
        once = mp.compress(mlp, FINETUNE, train_data=ONE_SHOT[kind](batches)).model
    torch.manual_seed(1)
    listed = mp.compress(mlp, FINETUNE, train_data=batches).model
    assert torch.equal(once[0].weight, listed[0].weight) and not torch.equal(once[0].weight, mlp[0].weight)
    assert "one-shot iterator" in caplog.text


@pytest.mark.parametrize("kind", ONE_SHOT)
def test_one_shot_calib_data_and_compare(mlp, toy_data, kind):
    batches = [tuple(b) for b in toy_data]
    gptq = {"stages": [{"quantize": {"bits": 4, "method": "gptq"}}]}
    torch.manual_seed(1)
    once = mp.compress(mlp, gptq, calib_data=ONE_SHOT[kind](batches)).model
    torch.manual_seed(1)
    assert torch.equal(once[0].weight, mp.compress(mlp, gptq, calib_data=batches).model[0].weight)
    c = compare(mlp, ["int8", "w4"], train_data=ONE_SHOT[kind](batches), repeats=1)
    assert [r.error for r in c.rows] == [None] * 3 and c.rows[1].metrics["agreement"] > 90


def test_a_pass_that_gives_no_batch_is_an_error_not_a_hang(mlp, toy_data):
    ctx = RunContext(train_data=(b for b in toy_data))  # bypasses compress(): the count uses it up
    with pytest.raises(ModelpressError, match="finetune: a pass over train_data gave no batch.*one-shot iterator"):
        train(mlp, CompressionState(), ctx, epochs=1, lr=1e-3)


# 2. NaN and Inf

@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("stage", [{"cluster": {"bits": 4}}, {"quantize": {"bits": 4}},
                                   {"quantize": {"bits": 8, "method": "gptq"}}])
def test_non_finite_weights_are_named_before_compressing(mlp, toy_data, value, stage):
    with torch.no_grad():
        mlp[2].weight[1, :3] = value
    with pytest.raises(ModelpressError, match=r"non-finite values in 1 tensor\(s\): 2\.weight \(3 (NaN|Inf)\)"):
        mp.compress(mlp, {"stages": [stage]}, train_data=toy_data)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_calibration_inputs_are_named(mlp, toy_data, value):
    x, _ = next(iter(toy_data))
    x[3, 2] = value
    with pytest.raises(ModelpressError, match=r"calib_data gives non-finite inputs \(NaN or Inf\) to 2 layer\(s\): "
                                              r"0\.weight, 2\.weight"):
        mp.compress(mlp, {"stages": [{"quantize": {"bits": 8, "method": "gptq"}}]}, calib_data=[x])


def test_non_finite_calibration_outputs_stop_per_layer_bits(mlp, toy_data):
    x, _ = next(iter(toy_data))
    x[3, 2] = float("nan")
    with pytest.raises(ModelpressError, match=r"per-layer bits: the model's outputs on calib_data batch\(es\) \[0\] "
                                              r"hold NaN or Inf"):
        mp.compress(mlp, {"stages": [{"quantize": {"bits": 4, "avg_bits": 5.0}}]}, calib_data=[x])


def test_a_stage_that_produces_nan_names_itself_and_the_layer(mlp, monkeypatch):
    def broken(model, state, cfg, run):
        with torch.no_grad():
            model[2].weight[0, 0] = float("nan")

    monkeypatch.setitem(stage.HANDLERS, ClusterConfig, broken)
    with pytest.raises(ModelpressError, match=r"stage 1 \(cluster\) produced non-finite values.*2\.weight \(1 NaN\)"):
        mp.compress(mlp, {"stages": [{"cluster": {"bits": 4}}]})


def test_a_non_finite_loss_names_the_stage_and_batch(mlp, toy_data):
    batches = [tuple(b) for b in toy_data]
    batches[3] = (batches[3][0] * float("nan"), batches[3][1])
    with pytest.raises(ModelpressError, match="finetune: the loss became nan on train_data batch 3"):
        mp.compress(mlp, FINETUNE, train_data=batches)


# 3. wrong shapes, wrong targets, a meta model, a wrong eval_fn

@pytest.mark.parametrize("which", ["train_data", "calib_data"])
def test_batches_the_model_cannot_take(mlp, which):
    batches = [(torch.randn(8, 19), torch.zeros(8, dtype=torch.long))]
    with pytest.raises(ModelpressError, match=rf"{which} batch 0: the model could not be called on its inputs "
                                              r"\(Tensor float32 \[8, 19\]\): RuntimeError: mat1") as e:
        mp.compress(mlp, FINETUNE if which == "train_data" else "int8", **{which: batches})
    assert isinstance(e.value.__cause__, RuntimeError)


@pytest.mark.parametrize("targets", [lambda y: y.float(), lambda y: y.float()[:, None],
                                     lambda y: torch.randn(len(y), 4), lambda y: y + 4])
def test_targets_cross_entropy_cannot_use(mlp, toy_data, targets):
    x, y = next(iter(toy_data))
    with pytest.raises(ModelpressError, match=r"cross-entropy, the default loss, can't use train_data's targets "
                                              r"\(Tensor .*\).*integer class indices \(0 to 3\).*loss_fn="):
        mp.compress(mlp, FINETUNE, train_data=[(x, targets(y))])


def test_soft_labels_and_a_loss_fn_are_fine(mlp, toy_data):
    x, y = next(iter(toy_data))
    mp.compress(mlp, FINETUNE, train_data=[(x, nn.functional.one_hot(y, 4).float())])
    mp.compress(mlp, FINETUNE, train_data=[(x, torch.randn(len(y), 4))], loss_fn=nn.functional.mse_loss)


def test_a_model_on_the_meta_device(toy_data):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(20, 4))
    with pytest.raises(ModelpressError, match=r"weights are on the meta device \(not loaded\): 0\.weight, 0\.bias; "
                                              "load real weights first"):
        mp.compress(model, "int8", train_data=toy_data)


@pytest.mark.parametrize("result, what", [("0.93", "a str"), (None, "a NoneType"), ([0.9], "a list"),
                                          ({"acc": "high"}, "a dict whose 'acc' is a str")])
def test_eval_fn_must_return_numbers(mlp, result, what):
    with pytest.raises(ModelpressError, match=f"eval_fn returned {what} .*real number"):
        mp.compress(mlp, "int8", eval_fn=lambda m: result)


def test_eval_fn_numbers_of_any_kind(mlp):
    rows = mp.compress(mlp, {"stages": [{"quantize": {"bits": 8}}]},
                       eval_fn=lambda m: {"a": torch.tensor(0.5), "b": 1, "c": float("nan")}).report.rows
    metrics = rows[-1].metrics
    assert metrics["a"] == 0.5 and metrics["b"] == 1.0 and metrics["c"] != metrics["c"]  # NaN is reported as is


# 4. compare leaves nothing behind without out_dir

def test_compare_without_out_dir_leaves_no_files(mlp, toy_data, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    c = compare(mlp, ["int8", "w4"], train_data=toy_data, repeats=1)
    assert list(tmp_path.iterdir()) == []
    assert all(r.error is None and r.bytes and r.layers and r.artifact is None for r in c.rows[1:])
    c = compare(mlp, ["int8"], train_data=toy_data, repeats=1, out_dir=tmp_path / "out")
    assert (tmp_path / "out" / "int8.mpz").exists() and c.rows[1].artifact == str(tmp_path / "out" / "int8.mpz")


def test_a_later_batch_of_another_form_is_named(mlp, toy_data):
    batches = list(toy_data)
    batches[2] = (batches[2][0][:, :7], batches[2][1])
    with pytest.raises(ModelpressError, match=r"finetune: train_data batch 2 \(\(Tensor float32 \[64, 7\], Tensor int64 "
                                              r"\[64\]\)\) failed: RuntimeError"):
        mp.compress(mlp, {"stages": [{"finetune": {"epochs": 1}}]}, train_data=batches)
