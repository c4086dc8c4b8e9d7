import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.errors import FormatError, ModelMismatch, ModelpressError

RECIPE = """
stages:
  - prune: {sparsity: 0.8, schedule: agp, steps: 3, epochs: 3}
  - cluster: {bits: 4}
  - finetune: {epochs: 1}
"""


@pytest.fixture
def result(mlp, toy_data):
    return mp.compress(mlp, RECIPE, train_data=toy_data, eval_fn=lambda m: 1.0)


def test_save_load_is_bitwise_and_report_bytes_are_the_file(result, toy_data, tmp_path):
    path = tmp_path / "m.mpz"
    size = result.save(path)
    assert size == path.stat().st_size == result.report.final.bytes
    loaded = mp.load(path)
    x = next(iter(toy_data))[0]
    assert torch.equal(loaded(x), result.model(x))
    for (k, a), b in zip(result.model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    w = result.model[0].weight
    assert int((w == 0).sum()) >= 0.7 * w.numel()  # sparsity kept through the final fine-tuning


def test_original_model_is_untouched(mlp, toy_data):
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    mp.compress(mlp, RECIPE, train_data=toy_data)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


def test_label_free_recovery_distills_from_the_original(mlp, toy_data):
    inputs_only = [x for x, _ in toy_data]
    x = torch.cat(inputs_only)
    prune_only = {"stages": [{"prune": {"sparsity": 0.7}}]}
    recovered = {"stages": [{"prune": {"sparsity": 0.7}}, {"finetune": {"epochs": 15, "lr": 1e-3}}]}
    agree = {}
    for name, recipe in [("pruned", prune_only), ("recovered", recovered)]:
        res = mp.compress(mlp, recipe, train_data=inputs_only)
        agree[name] = float((res.model(x).argmax(1) == mlp(x).argmax(1)).float().mean())
    assert agree["recovered"] > agree["pruned"] + 0.05, agree


def test_recovery_training_keeps_batchnorm_statistics(toy_data):
    model = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)).eval()
    model[1].running_mean.normal_()
    shifted = [x * 3 + 5 for x, _ in toy_data]  # batch statistics far from the running ones
    res = mp.compress(model, {"stages": [{"prune": {"sparsity": 0.5}}, {"distill": {"epochs": 2, "lr": 1e-2}}]},
                      train_data=shifted)
    bn = res.model[1]
    assert torch.equal(bn.running_mean, model[1].running_mean) and torch.equal(bn.running_var, model[1].running_var)
    assert int(bn.num_batches_tracked) == 0
    assert not torch.equal(bn.weight, model[1].weight)  # its scale and shift still train
    assert not bn.training


def test_custom_module_needs_a_skeleton(toy_data, tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(20, 32), nn.Linear(32, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    res = mp.compress(Net(), RECIPE, train_data=toy_data)
    path = tmp_path / "net.mpz"
    res.save(path)
    with pytest.raises(ModelMismatch, match="skeleton"):
        mp.load(path)
    x = next(iter(toy_data))[0]
    assert torch.equal(mp.load(path, model=Net())(x), res.model(x))
    with pytest.raises(ModelMismatch, match="does not match"):
        mp.load(path, model=nn.Sequential(nn.Linear(20, 4)))


def test_every_single_bit_flip_is_refused_fast(result, tmp_path):
    path = tmp_path / "m.mpz"
    result.save(path)
    raw = path.read_bytes()
    assert len(raw) < 6000
    t = time.perf_counter()
    for i in range(len(raw)):
        for bit in range(8):
            bad = bytearray(raw)
            bad[i] ^= 1 << bit
            with pytest.raises(FormatError):
                mp.load(bytes(bad))
    assert (time.perf_counter() - t) / (8 * len(raw)) < 0.01  # per damaged file


def test_truncated_and_foreign_files_are_refused(result, tmp_path):
    path = tmp_path / "m.mpz"
    result.save(path)
    raw = path.read_bytes()
    for n in range(0, len(raw), 7):
        with pytest.raises(FormatError):
            mp.load(raw[:n])
    (tmp_path / "x.pt").write_bytes(b"PK\x03\x04" + os.urandom(100))
    with pytest.raises(FormatError, match="not a modelpress"):
        mp.load(tmp_path / "x.pt")


@pytest.mark.slow
def test_sigkill_during_save_leaves_the_previous_file_loadable(tmp_path):
    target = tmp_path / "big.mpz"
    script = f"""
import torch, modelpress as mp
from modelpress.state import CompressionState
from modelpress.format import mpz
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(1500, 1500))
mpz.save({str(target)!r}, m, CompressionState())
print("ready", flush=True)
while True:
    with torch.no_grad():
        m[0].weight.add_(1.0)
    mpz.save({str(target)!r}, m, CompressionState())
"""
    torch.manual_seed(0)
    first = torch.nn.Linear(1500, 1500).weight.detach()  # what the child saves first, then +1 per save
    for i in range(6):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.05 + 0.07 * i)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        model = mp.load(target)
        assert model[0].weight.shape == (1500, 1500)
        added = model[0].weight.detach() - first  # one consistent save: the same whole number everywhere
        k = round(float(added[0, 0]))
        assert k >= 0 and float((added - k).abs().max()) < 1e-3


def test_bad_arguments_give_clear_errors(mlp, toy_data):
    with pytest.raises(mp.RecipeError, match="Unknown preset"):
        mp.Recipe.preset("nope")
    with pytest.raises(ModelpressError, match="needs train_data"):
        mp.compress(mlp, RECIPE)
    with pytest.raises(ModelpressError, match="nn.Module"):
        mp.compress("model", RECIPE, train_data=toy_data)
    with pytest.raises(ModelpressError, match="empty"):
        mp.compress(mlp, RECIPE, train_data=[])
    with pytest.raises(mp.RecipeError, match="does not exist"):
        mp.compress(mlp, "missing.yaml", train_data=toy_data)
    x = next(iter(toy_data))[0]
    for scripted in (torch.jit.script(mlp), torch.jit.trace(mlp, x)):
        with pytest.raises(ModelpressError, match="TorchScript module .* Pass the nn.Module it was made from"):
            mp.compress(scripted, "int8", calib_data=[x])


def test_macs_count_linear_conv_and_int8_layers():
    from modelpress.measure import macs
    from modelpress.runtime import Int8Linear

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, groups=1), torch.nn.Conv2d(8, 8, 3, groups=8),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))
    x = torch.randn(2, 3, 6, 6)
    expected = 2 * (8 * 36 * 27 + 8 * 16 * 9 + 10 * 128)
    assert macs(net, x) == expected
    w = torch.randint(-127, 128, (10, 128)).float()
    net[3] = Int8Linear.from_codes(w, torch.ones(10), None)
    assert macs(net, x) == expected


def test_int8_on_a_model_without_linear_layers_stores_int8_convolutions(tmp_path, caplog):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    x = torch.randn(16, 3, 12, 12)
    with caplog.at_level("WARNING"):
        result = mp.compress(net, "int8", calib_data=[x])
    assert "the model has none" in caplog.text
    w = result.model[2].weight.detach()
    assert max(len(torch.unique(channel)) for channel in w) <= 255  # a per-channel int8 grid (of 288 weights each)
    fp32 = sum(p.numel() * 4 for p in net.parameters())
    assert result.save(tmp_path / "c.mpz") < fp32 / 3
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(result.model(x), net(x)).min() > 0.99
