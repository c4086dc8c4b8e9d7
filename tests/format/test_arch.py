import pytest
import torch
from torch import nn

from modelpress.data import lenet5, lenet_300_100
from modelpress.errors import CorruptStream, UnsafeArchitecture
from modelpress.format.arch import build, describe


@pytest.mark.parametrize("make", [lenet5, lenet_300_100])
def test_describe_build_gives_same_structure(make):
    m = make()
    rebuilt = build(describe(m))
    assert str(rebuilt) == str(m)
    assert all(t.is_meta for t in rebuilt.state_dict().values())


def test_custom_classes_are_not_described():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x)

    assert describe(Net()) is None
    assert describe(nn.Sequential(Net())) is None


def test_build_refuses_unknown_types_and_bad_args():
    with pytest.raises(CorruptStream, match="not allowed"):
        build({"t": "os.system", "a": {}})
    with pytest.raises(UnsafeArchitecture, match="Linear.in_features is 'x', not of the type it takes"):
        build({"t": "Linear", "a": {"in_features": "x", "out_features": 2}})
    with pytest.raises(CorruptStream, match="cannot build"):
        build({"t": "Linear", "a": {"in_features": 2}})
    deep = {"t": "Sequential", "c": []}
    for _ in range(100):
        deep = {"t": "Sequential", "c": [deep]}
    with pytest.raises(CorruptStream):
        build(deep)


def test_huge_layer_is_built_on_meta_without_allocating():
    m = build({"t": "Linear", "a": {"in_features": 10 ** 6, "out_features": 10 ** 6}})
    assert m.weight.is_meta and m.weight.shape == (10 ** 6, 10 ** 6)
    assert torch.Size([10 ** 6]) == m.bias.shape
