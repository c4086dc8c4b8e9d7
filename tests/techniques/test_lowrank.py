import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.errors import ModelpressError
from modelpress.runtime import LowRankLinear, TuckerConv2d
from modelpress.state import CompressionState
from modelpress.techniques.lowrank import choose_rank, factorize, factorize_conv, factorize_linear


def test_full_rank_factors_reproduce_the_layer():
    lin = nn.Linear(40, 30)
    low = factorize_linear(lin, rank=10)
    assert low is not None and low.first.weight.shape == (10, 40) and low.second.weight.shape == (30, 10)
    # a rank-10 weight is reproduced exactly by a rank-10 factorization
    with torch.no_grad():
        lin.weight.copy_(torch.randn(30, 10) @ torch.randn(10, 40))
    low = factorize_linear(lin, rank=10)
    x = torch.randn(8, 40)
    assert torch.allclose(low(x), lin(x), atol=1e-4)
    assert factorize_linear(lin, rank=20) is None  # 20 x (40 + 30) > 40 x 30: no saving, left alone


def test_rank_rules():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert choose_rank(s, energy=0.7) == 1 and choose_rank(s, energy=0.9) == 2 and choose_rank(s, energy=1.0) == 4
    assert choose_rank(s, rank_ratio=0.5) == 2 and choose_rank(s, rank=9) == 4
    assert choose_rank(s, rank_ratio=0.25, min_rank=3) == 3


def test_tucker_conv_keeps_shape_and_is_exact_at_full_rank():
    conv = nn.Conv2d(8, 16, 3, padding=1, stride=2)
    full = factorize_conv(conv, rank_ratio=1.0)
    assert full is None  # full ranks cost more than the original
    with torch.no_grad():  # a weight of channel ranks (4, 3): Tucker-2 at those ranks is exact
        conv.weight.copy_(torch.einsum("or,rskl,is->oikl", torch.randn(16, 4), torch.randn(4, 3, 3, 3),
                                       torch.randn(8, 3)))
    t = factorize_conv(conv, energy=1.0 - 1e-9)
    assert isinstance(t, TuckerConv2d) and (t.rank_out, t.rank_in) == (4, 3)
    x = torch.randn(2, 8, 9, 9)
    assert torch.allclose(t(x), conv(x), atol=1e-4)


def test_factorized_model_saves_and_loads_without_code(tmp_path, mlp, toy_data):
    result = mp.compress(mlp, {"stages": [{"factorize": {"rank": 4, "min_rank": 1}}]})
    assert isinstance(result.model[0], LowRankLinear)  # 20x64 -> 4x(20+64)
    path = tmp_path / "m.mpz"
    result.save(path)
    loaded = mp.load(path)
    x = torch.randn(5, 20)
    assert torch.equal(loaded(x), result.model(x))
    assert result.report.rows[-1].params < result.report.rows[0].params


def test_factorize_after_pruning_is_refused(mlp):
    state = CompressionState()
    state.get("0.weight").mask = torch.ones(64, 20, dtype=torch.bool)
    with pytest.raises(ModelpressError, match="before those stages"):
        factorize(mlp, state, rank=2)
