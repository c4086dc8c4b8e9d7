import copy
import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from modelpress.batches import hold_out
from modelpress.state import CompressionState
from modelpress.context import RunContext
from modelpress.techniques.finetune import Lost, points_lost, train
from modelpress.techniques.prune import agp_schedule, masks_from_scores, prune


def test_agp_schedule_is_cubic_and_ends_at_target():
    s = agp_schedule(0.9, 4)
    assert s[-1] == 0.9
    assert all(a < b for a, b in zip(s, s[1:]))
    assert abs(s[0] - 0.9 * (1 - (3 / 4) ** 3)) < 1e-12


def test_layer_scope_hits_exact_sparsity_per_layer():
    scores = {"a": torch.rand(30, 40), "b": torch.rand(7, 9)}
    masks = masks_from_scores(scores, 0.75, "layer", {})
    assert int((~masks["a"]).sum()) == 900
    assert int((~masks["b"]).sum()) == round(0.75 * 63)


def test_global_scope_keeps_the_largest_overall():
    scores = {"a": torch.full((10,), 1.0), "b": torch.full((10,), 2.0)}
    masks = masks_from_scores(scores, 0.5, "global", {})
    # b's weights outrank a's; a keeps only its floor: a quarter of the overall keep fraction
    assert int(masks["a"].sum()) == 2 and masks["b"].sum() == 8


def test_global_budget_is_exact_with_many_layers():
    scores = {"a": torch.rand(100, 50) * 0.01, "b": torch.rand(300, 20), "c": torch.rand(10, 10) * 5}
    masks = masks_from_scores(scores, 0.9, "global", {})
    assert sum(int(m.sum()) for m in masks.values()) == 11100 - round(0.9 * 11100)
    assert int(masks["a"].sum()) == 125  # floor: ceil(0.25 * 0.1 * 5000)
    assert int(masks["c"].sum()) > int(masks["b"].sum()) / 300 * 10  # c outranks b per weight


def test_pruned_weights_stay_pruned_in_later_steps():
    old = {"a": torch.tensor([True, False, True, True])}
    masks = masks_from_scores({"a": torch.tensor([1.0, 9.0, 2.0, 3.0])}, 0.5, "layer", old)
    assert masks["a"].tolist() == [False, False, True, True]


def test_agp_with_finetuning_reaches_sparsity_and_keeps_it(mlp, toy_data):
    state = CompressionState()
    ctx = RunContext(train_data=toy_data)
    prune(mlp, state, sparsity=0.8, schedule="agp", steps=4, epochs=2, run=ctx)
    w = [mlp[0].weight, mlp[2].weight]
    total = sum(p.numel() for p in w)
    zeros = sum(int((p == 0).sum()) for p in w)
    assert zeros == round(0.8 * total)
    before = [p.detach().clone() for p in w]
    train(mlp, state, ctx, epochs=2, lr=1e-2)  # masks fixed during later fine-tuning
    for p, b in zip(w, before):
        assert torch.equal(p == 0, b == 0)
        assert not torch.equal(p, b)  # the kept weights did train


def test_taylor_criterion_prunes_weights_of_a_dead_input(toy_data):
    model = nn.Sequential(nn.Linear(20, 8))
    batches = [(torch.cat([x[:, :19], torch.zeros(len(x), 1)], 1), y) for x, y in toy_data]
    with torch.no_grad():
        model[0].weight[:, 19] = 5.0  # large, but its input is always zero
    state = CompressionState()
    prune(model, state, sparsity=0.25, criterion="taylor", scope="layer", run=RunContext(train_data=batches))
    assert not state.params["0.weight"].mask[:, 19].any()


def test_hold_out_keeps_every_tenth_sample_of_a_loader_apart_on_every_pass():
    x, y = torch.arange(100.0).unsqueeze(1), torch.zeros(100, dtype=torch.long)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    fit, held = hold_out(loader)

    def seen(data):
        return sorted(int(v) for xb, _ in data for v in xb[:, 0])
    assert seen(held) == seen(held) == list(range(9, 100, 10))
    assert seen(fit) == sorted(set(range(100)) - set(range(9, 100, 10)))
    assert fit.batch_size == 8 and isinstance(fit.sampler, RandomSampler)  # still shuffled, as given
    batches = [(x[i:i + 5], y[i:i + 5]) for i in range(0, 100, 5)]
    fit, held = hold_out(batches)
    assert len(fit) == 18 and [float(b[0][0, 0]) for b in held] == [45.0, 95.0]
    fit, held = hold_out(batches[:9])  # too few batches to spare one: every 10th sample of each
    assert [len(b[0]) for b in fit] == [5, 4, 5, 4, 5, 4, 5, 4, 5] and [len(b[1]) for b in held] == [1] * 4
    assert torch.cat([b[0] for b in held])[:, 0].tolist() == [9.0, 19.0, 29.0, 39.0]
    assert hold_out(batches[:3]) == (batches[:3], None)  # 15 samples: too few to split

    class Stream:
        def __iter__(self):
            return iter(batches)
    stream = Stream()
    assert hold_out(stream) == (stream, None)


def test_points_lost_is_accuracy_with_labels_and_agreement_without():
    teacher, student = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        teacher.weight.copy_(torch.eye(2))
        student.weight.copy_(torch.eye(2).flip(0))  # always the other class
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 0, 1])  # the teacher gets 3 of 4 right, the student 1
    # per sample, teacher right minus student right: 1, 1, -1, 1; mean 0.5; the standard error counts one
    # more change each way: mean square (3 + 1 + 2) / (4 + 2), standard error sqrt((1 - 0.5 ** 2) / 4)
    assert points_lost(student, teacher, [(x, y)]) == pytest.approx(Lost(50.0, 100 * 0.75 ** 0.5 / 2, "accuracy", 4))
    # 4 of 4 decisions changed; the standard error from (4 + 1) / (4 + 2) of them
    assert points_lost(student, teacher, [x]) == pytest.approx(Lost(100.0, 100 * (5 / 36 / 4) ** 0.5,
                                                                     "top-1 agreement", 4))
    # nothing changed: no loss, yet not certainty (from one change each way in 4 + 2 samples)
    assert points_lost(teacher, teacher, [(x, y)]) == pytest.approx(Lost(0.0, 100 * (2 / 6 / 4) ** 0.5, "accuracy", 4))
    assert points_lost(teacher, teacher, [x]) == pytest.approx(Lost(0.0, 100 * (5 / 36 / 4) ** 0.5,
                                                                     "top-1 agreement", 4))


def test_sparsity_auto_stops_where_held_out_data_says(mlp, toy_data, caplog):
    train(mlp, CompressionState(), RunContext(train_data=toy_data), epochs=20, lr=1e-2)
    teacher = copy.deepcopy(mlp).eval()
    reached = {}
    for tolerance in (1e-6, 100.0):
        model = copy.deepcopy(mlp)
        with caplog.at_level(logging.INFO, logger="modelpress"):
            reached[tolerance] = prune(model, CompressionState(), sparsity="auto", max_sparsity=0.98, steps=4,
                                       epochs=1, tolerance=tolerance,
                                       run=RunContext(train_data=toy_data, teacher=teacher))
    assert reached[100.0] == 0.98
    assert reached[1e-6] < 0.98  # some step lost accuracy on the held-out tenth
    assert "accuracy" in caplog.text and "samples of held-out data" in caplog.text


def test_sparsity_auto_measures_on_val_data_and_trains_on_all_of_train_data(mlp, toy_data, monkeypatch):
    from modelpress.techniques import stopping
    val = [(torch.randn(32, 20), torch.randint(0, 4, (32,)))]
    seen, trained = [], []
    monkeypatch.setattr(stopping, "points_lost",
                        lambda model, teacher, data: seen.append(data) or Lost(0.0, 0.0, "accuracy", 32))
    monkeypatch.setattr(stopping, "train", lambda model, state, run, **k: trained.append(run.train_data))
    reached = prune(mlp, CompressionState(), sparsity="auto", max_sparsity=0.9, steps=3, epochs=1,
                    run=RunContext(train_data=toy_data, val_data=val, teacher=mlp))
    assert reached == 0.9 and len(seen) == 3 and all(d is val for d in seen)
    assert all(d is toy_data for d in trained)  # nothing held out of training


def test_sparsity_auto_forgives_one_step_past_tolerance_but_not_two(mlp, toy_data, monkeypatch):
    from modelpress.techniques import stopping
    script = iter([0.0, 2.0, 0.5, 2.0, 3.0, 0.0])  # points lost after each step; tolerance 1
    monkeypatch.setattr(stopping, "points_lost", lambda *a, **k: Lost(next(script), 0.5, "accuracy", 400))
    state = CompressionState()
    reached = prune(mlp, state, sparsity="auto", max_sparsity=0.9, steps=6, run=RunContext(train_data=toy_data,
                                                                                          teacher=mlp), tolerance=1.0)
    targets = agp_schedule(0.9, 6)
    assert reached == targets[2]  # step 2's miss (2 - 0.5 > 1) was forgiven; steps 4 and 5 in a row ended it
    kept = sum(int(st.mask.sum()) for st in state.params.values())
    total = sum(st.mask.numel() for st in state.params.values())
    assert abs(1 - kept / total - targets[2]) < 0.01  # the masks are step 3's again


def test_sparsity_auto_warns_where_one_held_out_sample_outweighs_the_tolerance(mlp, toy_data, monkeypatch, caplog):
    from modelpress.techniques import stopping
    for samples, warned in ((143, True), (400, False)):  # one sample: 0.70 points, then 0.25; tolerance 0.5
        caplog.clear()
        monkeypatch.setattr(stopping, "points_lost", lambda *a, **k: Lost(0.0, 0.5, "accuracy", samples))
        with caplog.at_level(logging.WARNING, logger="modelpress"):
            prune(copy.deepcopy(mlp), CompressionState(), sparsity="auto", max_sparsity=0.9, steps=2, tolerance=0.5,
                  run=RunContext(train_data=toy_data, teacher=mlp))
        assert ("one of the 143 held-out samples is 0.70 points" in caplog.text) is warned


def test_sparsity_auto_goes_on_through_a_loss_within_its_standard_error(mlp, toy_data, monkeypatch):
    from modelpress.techniques import stopping
    script = iter([Lost(1.4, 0.5, "accuracy", 400), Lost(1.5, 0.6, "accuracy", 400),  # within 1 + noise
                   Lost(1.6, 0.5, "accuracy", 10_000), Lost(1.6, 0.1, "accuracy", 10_000)])  # clearly past
    monkeypatch.setattr(stopping, "points_lost", lambda *a, **k: next(script))
    reached = prune(mlp, CompressionState(), sparsity="auto", max_sparsity=0.9, steps=4, tolerance=1.0,
                    run=RunContext(train_data=toy_data, teacher=mlp))
    assert reached == agp_schedule(0.9, 4)[1]  # steps 3 and 4 were past it by more than their noise
