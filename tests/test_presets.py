"""The deep-compression preset on classifiers it was not tuned on (scikit-learn's 8x8 digits)."""
import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress import data


def _mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))


# min_ratio: the CNN meets the 20x (55x). The 17k-parameter MLP stops at 66% sparsity, 13.2x, without
# loss on the test digits: two steps in a row past it lost more on its held-out tenth (143 digits) than half a
# point and the noise of 143 digits explain (with the stop lifted, the test digits lost 3 points at 95%
# sparsity), so `sparsity: auto` trades ratio for accuracy there; asserted at what it does so a regression shows.
@pytest.mark.parametrize("make,image,min_ratio", [(_mlp, False, 12.0), (_cnn, True, 20.0)], ids=["mlp", "cnn"])
def test_deep_compression_preset_on_digits(make, image, min_ratio, tmp_path):
    torch.manual_seed(0)
    split = data.digits(image=image)
    model = data.train_classifier(make(), split, epochs=40)
    base = data.accuracy(model, split.x_test, split.y_test)
    result = mp.compress(model, "deep-compression", train_data=split.loader(64))
    size = result.save(tmp_path / "d.mpz")
    fp32 = 4 * sum(p.numel() for p in model.parameters())
    acc = data.accuracy(mp.load(tmp_path / "d.mpz"), split.x_test, split.y_test)
    assert fp32 / size >= min_ratio, f"only {fp32 / size:.1f}x"
    assert base - acc <= 1.0, f"accuracy {base:.2f} -> {acc:.2f}"


@pytest.mark.parametrize("make,image", [(_mlp, False), (_cnn, True)], ids=["mlp", "cnn"])
def test_factorization_with_fine_tuning_on_digits(make, image, tmp_path):
    torch.manual_seed(0)
    split = data.digits(image=image)
    model = data.train_classifier(make(), split, epochs=40)
    base = data.accuracy(model, split.x_test, split.y_test)
    recipe = {"stages": [{"factorize": {"rank_ratio": 0.1}}, {"finetune": {"epochs": 30, "lr": 1e-3}}]}
    result = mp.compress(model, recipe, train_data=split.loader(64))
    result.save(tmp_path / "f.mpz")
    loaded = mp.load(tmp_path / "f.mpz")
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in loaded.parameters())
    acc = data.accuracy(loaded, split.x_test, split.y_test)
    assert before / after >= 3.0, f"only {before / after:.2f}x fewer parameters"
    assert base - acc <= 1.0, f"accuracy {base:.2f} -> {acc:.2f}"
