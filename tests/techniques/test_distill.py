import copy

import torch
from torch import nn

import modelpress as mp
from modelpress.techniques.losses import Objective, block_names, capture, distill_batch_loss, relative_mse


def test_block_names_are_root_children_and_module_list_items():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

    assert block_names(Net()) == ["embed", "blocks", "blocks.0", "blocks.1"]


def test_identical_student_has_zero_loss_and_a_perturbed_one_does_not(mlp):
    teacher = copy.deepcopy(mlp).eval()
    x = torch.randn(16, 20)
    assert distill_batch_loss(mlp, x, teacher, Objective(hidden=True)).item() < 1e-6
    with torch.no_grad():
        mlp[0].weight.add_(0.1 * torch.randn_like(mlp[0].weight))
    with capture(mlp, ["0", "2"]) as seen:
        mlp(x)
    assert set(seen) == {"0", "2"}
    logits_only = distill_batch_loss(mlp, x, teacher).item()
    with_hidden = distill_batch_loss(mlp, x, teacher, Objective(hidden=True)).item()
    assert 0 < logits_only < with_hidden  # block 0's output differs too


def test_distill_stage_ignores_labels_and_moves_the_student_toward_the_teacher(mlp, toy_data):
    wrong = [(x, torch.zeros_like(y)) for x, y in toy_data]  # labels that would teach class 0 only
    recipe = {"stages": [{"quantize": {"bits": 3}}, {"distill": {"epochs": 3, "lr": 1e-3, "hidden": True}}]}
    agree = lambda m: {"agree": float((m(torch.cat([x for x, _ in wrong])).argmax(1) ==  # noqa: E731
                                       mlp(torch.cat([x for x, _ in wrong])).argmax(1)).float().mean())}
    result = mp.compress(mlp, recipe, train_data=wrong, eval_fn=agree)
    rows = result.report.rows
    assert rows[-1].metrics["agree"] > rows[1].metrics["agree"]  # distilled beats just-quantized
    assert rows[-1].metrics["agree"] > 0.9


def test_padding_does_not_count_in_the_hidden_state_loss():
    teacher = torch.randn(2, 5, 4)
    student = teacher.clone()
    student[0, 3:] += 100.0  # junk at padded positions only
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 3:] = 0
    assert relative_mse(student, teacher, mask).item() == 0.0
    assert relative_mse(student, teacher).item() > 1.0
