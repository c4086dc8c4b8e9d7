import copy
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.context import RunContext
from modelpress.errors import CorruptStream, ModelpressError, RecipeError
from modelpress.format import mpz
from modelpress.format.codecs import MASK_CODERS, mask_2d
from modelpress.format.entropy import encode_mask, encode_symbols
from modelpress.state import CompressionState
from modelpress.techniques.nm import NMPruneConfig, decode_nm, encode_nm, nm_mask, prune_nm
from modelpress.techniques.prune import PruneConfig
from modelpress.techniques.quantize import QuantizeConfig

NM_2_4 = "stages: [{prune: {pattern: '2:4'}}]"


def _groups(t: torch.Tensor, m: int) -> torch.Tensor:
    """Kept entries per group of m along each row of the (out, rest) view."""
    rows, cols = mask_2d(tuple(t.shape))
    return (t != 0).reshape(rows, cols // m, m).sum(-1)


def _nm_mask_np(rows: int, cols: int, n: int, m: int, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return nm_mask(torch.rand(rows, cols, generator=g), n, m).numpy()


# ---------------------------------------------------------------- the mask

@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_every_group_keeps_exactly_n_of_the_largest(n, m):
    model = nn.Sequential(nn.Conv2d(4, 8, 2), nn.Flatten(), nn.Linear(8 * 7 * 7, 16))  # rows of 16 and 392
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = CompressionState()
    assert prune_nm(model, state, n=n, m=m) == 2
    for name in ("0.weight", "2.weight"):
        w, mask = model.get_parameter(name).detach(), state.params[name].mask
        assert (_groups(mask, m) == n).all()
        assert int(mask.sum()) * m == w.numel() * n
        assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))  # pruned weights are zero
        assert torch.equal(w[mask], before[name][mask])                # kept weights untouched
        rows, cols = mask_2d(tuple(w.shape))
        a = before[name].abs().reshape(rows, cols // m, m)
        k = mask.reshape(a.shape)
        kept_min = a.masked_fill(~k, math.inf).amin(-1)
        pruned_max = a.masked_fill(k, -math.inf).amax(-1)
        assert (kept_min >= pruned_max).all()  # the n largest |w| of each group are the ones kept


def test_ties_go_to_the_lower_position():
    mask = nm_mask(torch.zeros(2, 8), 2, 4)
    assert mask.tolist() == [[True, True, False, False] * 2] * 2


def test_weights_pruned_before_stay_pruned():
    scores = torch.tensor([[9.0, 1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 8.0]])
    old = torch.tensor([[False, True, True, True, False, False, False, True]])
    mask = nm_mask(scores, 2, 4, old)
    # group 1: the 9 was pruned before, so 2 and 3 are kept; group 2 has one live weight and keeps only it
    assert mask.tolist() == [[False, False, True, True, False, False, False, True]]

    model = nn.Sequential(nn.Linear(8, 4))
    state = CompressionState()
    old = torch.rand(4, 8) > 0.6
    state.get("0.weight").mask = old.clone()
    with torch.no_grad():
        model[0].weight.mul_(old)
    prune_nm(model, state, n=2, m=4)
    new = state.params["0.weight"].mask
    assert not (new & ~old).any()
    assert (_groups(new, 4) == _groups(old, 4).clamp(max=2)).all()


def test_a_layer_whose_rows_do_not_split_into_groups_stays_dense_and_is_named(caplog):
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))
    dense = model[0].weight.detach().clone()
    state = CompressionState()
    with caplog.at_level(logging.WARNING, logger="modelpress"):
        assert prune_nm(model, state, n=2, m=4) == 1
    assert "'0'" in caplog.text and "rows of 10 weights, not a multiple of 4" in caplog.text
    assert "'2'" not in caplog.text
    assert "0.weight" not in state.params and torch.equal(model[0].weight, dense)
    assert int((model[2].weight == 0).sum()) == 16


def test_nothing_to_prune_is_an_error():
    with pytest.raises(ModelpressError, match="multiple of 4"):
        prune_nm(nn.Sequential(nn.Linear(10, 3)), CompressionState(), n=2, m=4)
    with pytest.raises(ModelpressError, match="exclude"):
        prune_nm(nn.Sequential(nn.Linear(8, 3)), CompressionState(), n=2, m=4, exclude=("0",))
    with pytest.raises(ValueError, match="got 4:2; the pattern must be 'N:M' with 1 <= N < M <= 16"):
        prune_nm(nn.Sequential(nn.Linear(8, 3)), CompressionState(), n=4, m=2)


def test_prune_after_quantize_is_refused(mlp):
    state = CompressionState()
    state.get("0.weight").scale = torch.ones(1)
    with pytest.raises(ModelpressError, match="before quantize"):
        prune_nm(mlp, state, n=2, m=4)


def test_taylor_prunes_the_weights_of_a_dead_input(toy_data):
    model = nn.Sequential(nn.Linear(20, 8))
    batches = [(torch.cat([x[:, :19], torch.zeros(len(x), 1)], 1), y) for x, y in toy_data]
    with torch.no_grad():
        model[0].weight[:, 19] = 5.0  # the largest weights, but their input is always zero
    by_magnitude, state = copy.deepcopy(model), CompressionState()
    prune_nm(model, state, n=2, m=4, criterion="taylor", run=RunContext(train_data=batches))
    assert not state.params["0.weight"].mask[:, 19].any()
    state = CompressionState()
    prune_nm(by_magnitude, state, n=2, m=4)
    assert state.params["0.weight"].mask[:, 19].all()  # magnitude keeps them


def test_fine_tuning_keeps_the_mask_and_trains_the_rest(mlp, toy_data):
    untrained = copy.deepcopy(mlp)
    prune_nm(untrained, CompressionState(), n=2, m=4)
    prune_nm(mlp, CompressionState(), n=2, m=4, epochs=1, lr=1e-2, run=RunContext(train_data=toy_data))
    for p, b in zip((mlp[0].weight, mlp[2].weight), (untrained[0].weight, untrained[2].weight)):
        assert torch.equal(p == 0, b == 0)  # the same weights pruned, and still zero after training
        assert not torch.equal(p, b)        # the kept ones trained


# ---------------------------------------------------------------- recipes

def test_recipe_selects_the_nm_variant():
    stage = mp.Recipe.from_yaml(NM_2_4).stages[0]
    assert isinstance(stage, NMPruneConfig) and (stage.n, stage.m) == (2, 4)
    assert stage.criterion == "magnitude" and stage.epochs == 0.0 and stage.lr == 1e-3
    assert isinstance(mp.Recipe.from_yaml("stages: [{prune: {sparsity: 0.5}}]").stages[0], PruneConfig)


@pytest.mark.parametrize("bad", ["'4:2'", "'2-4'", "'0:4'", "'2:40'", "'4:4'", "'a:b'", "'2:4:8'", "''", "[2, 4]"])
def test_bad_patterns_are_refused_naming_the_field(bad):
    with pytest.raises(RecipeError) as e:
        mp.Recipe.from_yaml(f"stages: [{{prune: {{pattern: {bad}}}}}]")
    assert "The 'pattern' of stage 1 (prune) must be 'N:M' with 1 <= N < M <= 16, e.g. '2:4'" in str(e.value)


def test_an_unquoted_pattern_gets_a_hint():
    with pytest.raises(RecipeError, match="unquoted 2:4 as the number 124; write pattern: '2:4'"):
        mp.Recipe.from_yaml("stages: [{prune: {pattern: 2:4}}]")


def test_nm_does_not_combine_with_other_prune_settings():
    with pytest.raises(RecipeError, match=r"can't combine the settings \['granularity', 'pattern'\]"):
        mp.Recipe.from_yaml("stages: [{prune: {pattern: '2:4', granularity: channel}}]")
    with pytest.raises(RecipeError, match="unknown field 'sparsity'"):
        mp.Recipe.from_yaml("stages: [{prune: {pattern: '2:4', sparsity: 0.5}}]")


def test_recipe_round_trip():
    settings = {"pattern": "4:8", "criterion": "taylor", "epochs": 1.0}
    recipe = mp.Recipe.from_dict({"stages": [{"prune": settings}]})
    assert recipe.to_dict() == {"stages": [{"prune": settings}]}
    assert mp.Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert recipe.stages[0].without_training() == NMPruneConfig(pattern="4:8")
    assert NMPruneConfig(pattern=" 2 : 4 ").pattern == "2:4"


# ---------------------------------------------------------------- stored form

@pytest.mark.parametrize("n,m,cols", [(2, 4, 64), (1, 4, 32), (4, 8, 48), (1, 2, 10), (3, 16, 32), (7, 15, 30)])
def test_masks_round_trip_exactly(n, m, cols):
    mask = _nm_mask_np(9, cols, n, m)
    data = encode_nm(mask)
    assert data[0] == (n - 1) << 4 | (m - 1)
    back = decode_nm(data, mask.shape)
    assert back.dtype == np.bool_ and np.array_equal(back, mask)


def test_the_finest_grouping_is_stored():
    mask = _nm_mask_np(4, 16, 2, 4)          # 2:4, so also 4:8 and 8:16
    assert encode_nm(mask)[0] == 0x13
    assert encode_nm(np.tile([True, False], (3, 8)))[0] == 0x01  # 1:2


def test_masks_without_the_structure_are_left_to_other_coders():
    rng = np.random.default_rng(0)
    assert encode_nm(rng.random((16, 64)) < 0.5) is None
    assert encode_nm(np.ones((4, 8), bool)) is None and encode_nm(np.zeros((4, 8), bool)) is None
    uneven = _nm_mask_np(4, 16, 2, 4)
    uneven[3, :4] = [True, False, False, False]  # one group of 1:4
    assert encode_nm(uneven) is None
    assert encode_nm(np.tile([True, False, False], (2, 17))[:, :17]) is None  # 17 columns: no M divides them
    assert encode_nm(np.zeros((0, 8), bool)) is None


def test_a_2_4_mask_costs_its_entropy():
    mask = _nm_mask_np(256, 1024, 2, 4)
    data = encode_nm(mask)
    ideal = 256 * 1024 * math.log2(6) / 4 / 8  # 21,176 bytes
    assert len(data) <= 1.02 * ideal + 8
    assert len(encode_mask(mask)) > 1.5 * ideal  # the adaptive bit coder: about 1 bit per weight


def test_decode_refuses_inconsistent_streams():
    mask = _nm_mask_np(8, 16, 2, 4)
    data = encode_nm(mask)
    for bad, match in [(b"", "too short"), (data[:1], "too short"),
                       (bytes([0x33]) + data[1:], "declares 4:4; N must be below M"),
                       (bytes([0xF0]) + data[1:], "declares 16:1; N must be below M"),
                       (bytes([0x14]) + data[1:], "groups of 5, which do not divide rows of 16"),
                       (bytes([0x13]) + encode_symbols(np.r_[np.zeros(31), 6]), "index 6 is outside the 6 patterns"),
                       (bytes([0x13]) + encode_symbols(np.arange(16) % 6), "do not decode"),  # 16 groups for 32
                       (data[:-1], "do not decode"), (data + b"\x01", "do not decode")]:
        with pytest.raises(ValueError, match=match):
            decode_nm(bad, (8, 16))


# ---------------------------------------------------------------- end to end

def _nm_entries(result) -> dict[str, dict]:
    return {k: e for k, e in result.manifest["tensors"].items() if e.get("mask_coder") == "nm"}


def test_compress_save_load_is_bitwise(mlp, toy_data, tmp_path):
    recipe = "stages: [{prune: {pattern: '2:4', epochs: 1}}]"
    result = mp.compress(mlp, recipe, train_data=toy_data)
    assert set(_nm_entries(result)) == {"0.weight", "2.weight"}
    assert result.report.rows[-1].sparsity == pytest.approx(0.5 * (1280 + 256) / (1280 + 64 + 256 + 4))
    path = tmp_path / "nm.mpz"
    result.save(path)
    loaded = mp.load(path)
    x = torch.randn(32, 20)
    assert torch.equal(loaded(x), result.model(x))
    assert (_groups(loaded[0].weight, 4) == 2).all() and (_groups(loaded[2].weight, 4) == 2).all()


def test_2_4_then_8_bit_quantization_is_bitwise(mlp, toy_data, tmp_path):
    recipe = "stages: [{prune: {pattern: '2:4'}}, {quantize: {bits: 8}}]"
    result = mp.compress(mlp, recipe, train_data=toy_data)
    assert isinstance(result.recipe.stages[1], QuantizeConfig)
    entry = result.manifest["tensors"]["0.weight"]
    assert entry["kind"] == "q" and entry["masked"] is True and entry["mask_coder"] == "nm"
    result.save(tmp_path / "q.mpz")
    loaded = mp.load(tmp_path / "q.mpz")
    x = torch.randn(32, 20)
    assert torch.equal(loaded(x), result.model(x))
    assert (_groups(loaded[0].weight, 4) <= 2).all()


def test_a_damaged_nm_stream_is_refused_on_load(mlp, tmp_path):
    result = mp.compress(mlp, NM_2_4)
    index = sorted(result.manifest["tensors"]).index("0.weight")
    key = f"{index}/mask"
    good = result.streams[key]
    path = tmp_path / "bad.mpz"
    for bad in [bytes([0x33]) + good[1:], bytes([0x12]) + good[1:], good[:1], good[:len(good) // 2],
                good + b"\x00\x01", bytes([0x13]) + encode_symbols(np.full(320, 7))]:
        mpz.write(path, result.manifest, {**result.streams, key: bad})  # valid checksums: only the stream is bad
        with pytest.raises(CorruptStream, match="'0.weight'"):
            mp.load(path)
    refused = 0
    for i in range(len(good)):  # any flipped byte: refused, or a (different) 2:4 mask; never another error
        flipped = bytearray(good)
        flipped[i] ^= 0x5A
        try:
            mask = MASK_CODERS["nm"].decode(bytes(flipped), (64, 20))
        except ValueError:
            refused += 1
            continue
        assert (mask.reshape(64, 5, 4).sum(-1) == 2).all()
    assert refused >= len(good) // 2
