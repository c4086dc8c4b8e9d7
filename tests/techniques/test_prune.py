import torch
from torch import nn

from modelpress.state import CompressionState
from modelpress.context import RunContext
from modelpress.techniques.finetune import train
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
