"""Files of models the format can't describe whole (user-defined classes) load into a skeleton of the
user's class, with the file's runtime layers (int8, factorized) built in place of the skeleton's."""
import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.errors import CorruptStream, UnsafeArchitecture
from modelpress.format.container import write_container
from modelpress.runtime import Int8Linear, LowRankLinear


class Net(nn.Module):
    """A user's class: not an nn.Sequential, so the file holds no architecture."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(20, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 20, generator=g), torch.randint(0, 4, (64,), generator=g)


@pytest.mark.parametrize("recipe, layer, swapped", [
    ("int8", Int8Linear, {"fc1", "fc2", "head"}),
    ({"stages": [{"factorize": {"rank": 8, "min_rank": 1}}]}, LowRankLinear, {"fc1", "fc2"}),  # head: no saving
])
def test_runtime_layers_of_a_user_class_load_into_its_skeleton(tmp_path, batch, recipe, layer, swapped):
    x, y = batch
    result = mp.compress(Net(), recipe, train_data=[(x, y)])
    assert result.manifest["arch"] is None and set(result.manifest["swaps"]) == swapped
    path = tmp_path / "m.mpz"
    result.save(path)
    loaded = mp.load(path, model=Net())
    assert isinstance(loaded.fc2, layer)
    assert torch.equal(loaded(x), result.model(x))


def test_files_without_runtime_layers_record_no_swaps(batch):
    x, y = batch
    result = mp.compress(Net(), "w4", train_data=[(x, y)])
    assert "swaps" not in result.manifest
    seq = mp.compress(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4)), "int8", train_data=[(x, y)])
    assert seq.manifest["arch"] is not None and "swaps" not in seq.manifest  # the tree already says it


def test_a_skeleton_of_a_sequential_file_gets_its_runtime_layers(tmp_path, batch):
    x, y = batch
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 64), nn.ReLU()), nn.Linear(64, 4))
    result = mp.compress(model, "int8", train_data=[(x, y)])
    path = tmp_path / "seq.mpz"
    result.save(path)
    skeleton = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 64), nn.ReLU()), nn.Linear(64, 4))
    loaded = mp.load(path, model=skeleton)
    assert isinstance(loaded[2][0], Int8Linear) and torch.equal(loaded(x), result.model(x))


@pytest.mark.parametrize("arch", [
    {"t": "Sequential", "c": [{"t": ["Int8Linear"], "a": {}}]},   # a type name that is not a string
    {"t": "Sequential", "c": ["Int8Linear"]},                     # a layer that is not a mapping
])
def test_a_damaged_tree_given_a_skeleton_is_a_format_error(tmp_path, batch, arch):
    x, y = batch
    seq = nn.Sequential(nn.Linear(20, 4))
    result = mp.compress(seq, "int8", train_data=[(x, y)])
    path = tmp_path / "damaged.mpz"
    write_container(path, {**result.manifest, "arch": arch}, result.streams)
    with pytest.raises(mp.FormatError):  # a clean refusal, never a TypeError from inside the loader
        mp.load(path, model=nn.Sequential(nn.Linear(20, 4)))


def test_a_transformers_skeleton_gets_the_description_swaps(tmp_path, tiny_bert):
    model = tiny_bert()
    ids = torch.randint(0, 200, (4, 16))
    result = mp.compress(model, "int8", calib_data=[{"input_ids": ids}])
    path = tmp_path / "bert.mpz"
    result.save(path)
    loaded = mp.load(path, model=tiny_bert())
    assert isinstance(loaded.encoder.layer[0].attention.self.query, Int8Linear)
    assert torch.equal(loaded(input_ids=ids).last_hidden_state, result.model(input_ids=ids).last_hidden_state)


def _with_swaps(tmp_path, batch, swaps):
    x, y = batch
    result = mp.compress(Net(), "int8", train_data=[(x, y)])
    manifest = {**result.manifest, "swaps": swaps}
    path = tmp_path / "crafted.mpz"
    write_container(path, manifest, result.streams)
    return path, result.manifest["swaps"]["fc1"]


@pytest.mark.parametrize("bad", [
    {"nowhere": "FC1"},                       # a layer the skeleton lacks
    {"fc1.weight": "FC1"},                    # a parameter, not a layer
    {"_modules": "FC1"},                      # a private attribute
    {"fc1": {"t": "Module", "a": {}}},        # a type that is not allowed
    {"fc1": {"t": "Int8Linear", "a": {"in_features": 2 ** 41, "out_features": 1}}},  # out-of-bounds args
    ["fc1"],                                  # not a mapping
])
def test_crafted_swaps_are_refused(tmp_path, batch, bad):
    path, good = _with_swaps(tmp_path, batch, None)
    swaps = bad if isinstance(bad, list) else {k: good if v == "FC1" else v for k, v in bad.items()}
    path, _ = _with_swaps(tmp_path, batch, swaps)
    with pytest.raises((CorruptStream, UnsafeArchitecture)):
        mp.load(path, model=Net())
