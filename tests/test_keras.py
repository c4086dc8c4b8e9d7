"""Keras 3 models in and out: the torch form computes what the Keras model computes, compressed weights
go back into Keras (smaller layers too), and what cannot convert says which layer and why."""
import os
import re

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import modelpress as mp  # noqa: E402
from modelpress.errors import ModelpressError  # noqa: E402

keras = pytest.importorskip("keras")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 copy= notes from Keras internals
L = keras.layers


def _cnn():
    keras.utils.set_random_seed(0)
    m = keras.Sequential([
        keras.Input((28, 28, 1)), L.Conv2D(8, 3, activation="relu", padding="same"), L.BatchNormalization(),
        L.DepthwiseConv2D(3, depth_multiplier=2), L.ReLU(), L.MaxPooling2D(), L.Conv2D(16, 3, activation="relu"),
        L.MaxPooling2D(), L.Flatten(), L.Dropout(0.2), L.Dense(32, activation="relu"),
        L.Dense(10, activation="softmax")])
    bn = m.layers[1]
    g, b, mean, var = bn.get_weights()
    bn.set_weights([g * 1.5, b + 0.1, mean + 0.2, var * 2])  # statistics that matter
    return m


def _x(n=64, shape=(28, 28, 1), seed=0):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype("float32")


def _keras_out(m, x):
    return keras.ops.convert_to_numpy(m(x, training=False))


def _torch_probs(t, x):
    with torch.no_grad():
        return torch.softmax(t(torch.from_numpy(x)), 1).numpy()


def test_cnn_converts_to_the_same_function_and_back_exactly():
    m, x = _cnn(), _x()
    t = mp.from_keras(m)
    assert sum(p.numel() for p in t.parameters()) == m.count_params() - 16  # BN's moving mean and variance
    assert np.abs(_torch_probs(t, x) - _keras_out(m, x)).max() < 1e-5
    back = mp.to_keras(t, m)
    assert back is not m
    for a, b in zip(back.get_weights(), m.get_weights()):
        assert np.array_equal(a, b)


def test_conv1d_and_global_pooling_chain():
    keras.utils.set_random_seed(1)
    inp = keras.Input((50, 3))
    h = L.Conv1D(6, 5, activation="leaky_relu")(inp)
    h = L.AveragePooling1D(2)(h)
    h = L.GlobalAveragePooling1D()(h)
    m = keras.Model(inp, L.Dense(4)(h))  # a functional chain, logits out
    x = _x(16, (50, 3))
    t = mp.from_keras(m)
    with torch.no_grad():
        assert np.abs(t(torch.from_numpy(x)).numpy() - _keras_out(m, x)).max() < 1e-5


def test_compressed_weights_go_back_into_keras(tmp_path):
    m, x = _cnn(), _x()
    y = np.random.default_rng(1).integers(0, 10, len(x))
    recipe = {"stages": [{"prune": {"sparsity": 0.75}}, {"cluster": {"bits": 4}}, {"finetune": {"epochs": 1}}]}
    res = mp.compress(m, recipe, train_data=mp.array_batches(x, y, batch_size=16))
    path = tmp_path / "k.mpz"
    res.save(path)
    k = mp.load(path)  # a Keras model, rebuilt from the config the file records
    assert mp.keras_model.is_keras(k) and k.name == m.name
    assert np.abs(_keras_out(k, x) - _torch_probs(res.model, x)).max() < 1e-5
    torch_form = mp.load(path, keras=False, packed=False)
    assert np.array_equal(_torch_probs(torch_form, x), _torch_probs(res.model, x))
    assert all(np.array_equal(a, b) for a, b in zip(mp.to_keras(torch_form, m).get_weights(), k.get_weights()))
    kernel = k.get_layer(m.layers[-2].name).get_weights()[0]
    assert (kernel == 0).mean() >= 0.74 and len(np.unique(kernel)) <= 17  # sparsity and 16 shared values kept


def test_an_int8_file_loads_as_keras_with_its_int8_grid_weights(tmp_path):
    m, x = _cnn(), _x()
    res = mp.compress(m, "int8", calib_data=mp.array_batches(x, batch_size=16))
    res.save(tmp_path / "k.mpz")
    k = mp.load(tmp_path / "k.mpz")
    linear = res.model[-1]
    assert type(linear).__name__ == "Int8Linear"
    kernel = k.layers[-1].get_weights()[0]
    assert np.array_equal(kernel, linear.dequantized().T.numpy())
    agree = (_keras_out(k, x).argmax(1) == _torch_probs(res.model, x).argmax(1)).mean()
    assert agree >= 0.95  # Keras runs the int8-grid weights on float activations


def test_channel_pruning_gives_smaller_keras_layers():
    keras.utils.set_random_seed(2)
    m = keras.Sequential([keras.Input((12, 12, 1)), L.Conv2D(16, 3, activation="relu"), L.MaxPooling2D(),
                          L.Flatten(), L.Dense(32, activation="relu"), L.Dense(5)])
    x = _x(32, (12, 12, 1))
    res = mp.compress(m, {"stages": [{"prune": {"granularity": "channel", "sparsity": 0.5}}]},
                      calib_data=mp.array_batches(x))
    k = mp.to_keras(res.model, m)
    conv, dense = (k.layers[0].get_config()["filters"], k.layers[3].get_config()["units"])
    assert conv < 16 and dense < 32 and conv + dense == 24 and k.layers[4].get_config()["units"] == 5  # half of 48
    with torch.no_grad():
        assert np.abs(_keras_out(k, x) - res.model(torch.from_numpy(x)).numpy()).max() < 1e-5


def test_separable_convolutions_convert_and_prune():
    keras.utils.set_random_seed(5)
    m = keras.Sequential([keras.Input((10, 10, 3)), L.SeparableConv2D(8, 3, depth_multiplier=2, activation="relu",
                                                                      padding="same"),
                          L.SeparableConv2D(12, 3, strides=2, activation="relu"), L.GlobalAveragePooling2D(),
                          L.Dense(4)])
    x = _x(32, (10, 10, 3))
    t = mp.from_keras(m)
    assert [type(layer).__name__ for layer in t if "Conv" in type(layer).__name__] == ["Conv2d"] * 4
    with torch.no_grad():
        assert np.abs(t(torch.from_numpy(x)).numpy() - _keras_out(m, x)).max() < 1e-5
    res = mp.compress(m, {"stages": [{"prune": {"granularity": "channel", "sparsity": 0.4}}]},
                      calib_data=mp.array_batches(x))
    k = mp.to_keras(res.model, m)
    assert sum(layer.get_config()["filters"] for layer in k.layers[:2]) < 20
    with torch.no_grad():
        assert np.abs(_keras_out(k, x) - res.model(torch.from_numpy(x)).numpy()).max() < 1e-5


def _residual(seed=6):
    """A mini-Xception-like functional model: a fork joined by Add (separable convs + 'same' max pooling
    against a 1x1 stride-2 'same' conv), an identity shortcut, and 'same' average pooling on an odd size."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((15, 15, 1))
    h = L.Activation("relu")(L.BatchNormalization()(L.Conv2D(8, 3, use_bias=False)(inp)))  # 13 x 13
    skip = L.BatchNormalization()(L.Conv2D(16, 1, strides=2, padding="same", use_bias=False)(h))
    h = L.SeparableConv2D(16, 3, padding="same", use_bias=False, activation="relu")(h)
    h = L.MaxPooling2D(3, strides=2, padding="same")(L.BatchNormalization()(h))
    h = L.Add()([h, skip])  # 7 x 7
    h = L.Add()([h, L.Conv2D(16, 3, padding="same", activation="relu")(h)])  # identity shortcut
    h = L.AveragePooling2D(3, strides=2, padding="same")(h)  # 4 x 4
    out = L.Activation("softmax")(L.GlobalAveragePooling2D()(L.Conv2D(5, 3, padding="same")(h)))
    return keras.Model(inp, out)


def test_residual_forks_convert_train_and_go_back_into_keras(tmp_path):
    m, x = _residual(), _x(48, (15, 15, 1))
    t = mp.from_keras(m)
    assert [type(layer).__name__ for layer in t].count("Sum") == 2
    assert np.abs(_torch_probs(t, x) - _keras_out(m, x)).max() < 1e-5
    assert all(np.array_equal(a, b) for a, b in zip(mp.to_keras(t, m).get_weights(), m.get_weights()))
    y = np.random.default_rng(1).integers(0, 5, len(x))
    recipe = {"stages": [{"prune": {"sparsity": 0.5}}, {"cluster": {"bits": 4}}, {"finetune": {"epochs": 1}}]}
    res = mp.compress(m, recipe, train_data=mp.array_batches(x, y, batch_size=16))  # backward through the forks
    res.save(tmp_path / "r.mpz")
    k = mp.load(tmp_path / "r.mpz")
    assert type(k).__name__ == "Functional" and [type(layer).__name__ for layer in k.layers].count("Add") == 2
    assert np.abs(_keras_out(k, x) - _torch_probs(res.model, x)).max() < 1e-5
    from modelpress.errors import CorruptStream
    from modelpress.format import mpz

    manifest, streams, _ = mpz.read(tmp_path / "r.mpz")
    sums = [node for node in manifest["arch"]["c"] if node["t"] == "Sum"]
    sums[0]["c"] = []  # a tampered file: a Sum of no branches
    mpz.write(tmp_path / "empty.mpz", manifest, streams)
    with pytest.raises(CorruptStream, match="Sum without branches"):
        mp.load(tmp_path / "empty.mpz", keras=False)


def test_channel_pruning_keeps_residual_channels_aligned():
    m, x = _residual(7), _x(32, (15, 15, 1))
    res = mp.compress(m, {"stages": [{"prune": {"granularity": "channel", "sparsity": 0.4}}]},
                      calib_data=mp.array_batches(x))
    k = mp.to_keras(res.model, m)
    filters = {layer.name: layer.get_config()["filters"] for layer in k.layers if "filters" in layer.get_config()}
    assert sum(filters.values()) < sum(layer.get_config()["filters"] for layer in m.layers
                                       if "filters" in layer.get_config())
    assert list(filters.values())[-1] == 5  # the output stays
    with torch.no_grad():
        assert np.abs(_keras_out(k, x) - torch.softmax(res.model(torch.from_numpy(x)), 1).numpy()).max() < 1e-5


def test_inception_forks_joined_by_concatenate_convert_prune_and_come_back(tmp_path):
    keras.utils.set_random_seed(9)
    inp = keras.Input((12, 12, 3))
    h = L.Conv2D(8, 3, activation="relu")(inp)  # 10 x 10
    pooled = L.Conv2D(4, 1, activation="relu")(L.MaxPooling2D(3, strides=1, padding="same")(h))
    wide = L.Conv2D(6, 3, padding="same", activation="relu")(L.Conv2D(5, 1, activation="relu")(h))
    h = L.Concatenate()([L.Conv2D(4, 1, activation="relu")(h), wide, pooled, h])  # h itself: a shortcut
    h = L.Conv2D(12, 3, strides=2, activation="relu")(h)
    m = keras.Model(inp, L.Dense(5, activation="softmax")(L.GlobalAveragePooling2D()(h)))
    x = _x(40, (12, 12, 3))
    t = mp.from_keras(m)
    assert [type(layer).__name__ for layer in t].count("Cat") == 1 and t[3][3].__class__ is torch.nn.Sequential
    assert np.abs(_torch_probs(t, x) - _keras_out(m, x)).max() < 1e-5
    res = mp.compress(m, {"stages": [{"prune": {"granularity": "channel", "sparsity": 0.4}}]},
                      calib_data=mp.array_batches(x))
    k = mp.to_keras(res.model, m)
    assert sum(layer.get_config().get("filters", 0) for layer in k.layers) < 39
    assert np.abs(_keras_out(k, x) - torch.softmax(res.model(torch.from_numpy(x)), 1).detach().numpy()).max() < 1e-5
    res.save(tmp_path / "i.mpz")
    assert np.abs(_keras_out(mp.load(tmp_path / "i.mpz"), x) - _keras_out(k, x)).max() < 1e-5


def test_zero_padding_and_global_max_pooling_convert_and_prune():
    keras.utils.set_random_seed(11)
    inp = keras.Input((11, 9, 2))
    h = L.Conv2D(8, 3, strides=2, activation="relu")(L.ZeroPadding2D(((1, 2), (0, 3)))(inp))
    h = L.Conv2D(8, 3, activation="relu")(L.ZeroPadding2D(1)(h))
    m = keras.Model(inp, L.Dense(3)(L.GlobalMaxPooling2D()(h)))
    x = _x(20, (11, 9, 2))
    with torch.no_grad():
        assert np.abs(mp.from_keras(m)(torch.from_numpy(x)).numpy() - _keras_out(m, x)).max() < 1e-5
    res = mp.compress(m, {"stages": [{"prune": {"granularity": "channel", "sparsity": 0.4}}]},
                      calib_data=mp.array_batches(x))
    k = mp.to_keras(res.model, m)
    assert sum(layer.get_config().get("filters", 0) for layer in k.layers) < 16  # traced through pad and max pool
    with torch.no_grad():
        assert np.abs(_keras_out(k, x) - res.model(torch.from_numpy(x)).numpy()).max() < 1e-5
    seq = keras.Model(inp1 := keras.Input((10, 3)), L.Dense(2)(L.GlobalMaxPooling1D()(L.Conv1D(4, 3)(
        L.ZeroPadding1D((2, 1))(inp1)))))
    x1 = _x(5, (10, 3))
    with torch.no_grad():
        assert np.abs(mp.from_keras(seq)(torch.from_numpy(x1)).numpy() - _keras_out(seq, x1)).max() < 1e-5


def test_branches_that_do_not_form_forks_are_named():
    inp = keras.Input((8, 8, 2))
    a, b = L.Conv2D(3, 1, name="a")(inp), L.Conv2D(3, 1, name="b")(inp)
    c = L.Conv2D(3, 1, name="c")(a)
    with pytest.raises(ModelpressError, match=r"'late' \(Add\) joins branches that do not all start at one"):
        mp.from_keras(keras.Model(inp, L.Add(name="late")([L.Add(name="early")([a, b]), c])))
    with pytest.raises(ModelpressError, match=r"'cat' \(Concatenate\): only along the channels"):
        mp.from_keras(keras.Model(inp, L.Concatenate(axis=1, name="cat")([a, b])))
    with pytest.raises(ModelpressError, match="2 outputs"):
        mp.from_keras(keras.Model(inp, [a, b]))


@pytest.mark.parametrize("rnn", ["LSTM", "GRU", "SimpleRNN", "BiLSTM", "BiGRU"])
def test_text_models_with_embeddings_and_recurrent_layers_convert_and_compress(rnn, tmp_path):
    keras.utils.set_random_seed(8)
    layer = (lambda *a, **k: L.Bidirectional(getattr(L, rnn[2:])(*a, **k))) if rnn.startswith("Bi") else \
        getattr(L, rnn)
    inp = keras.Input((12,), dtype="int32")
    h = layer(16, return_sequences=True)(L.Embedding(64, 8)(inp))
    h = layer(16)(L.Conv1D(16, 3, activation="relu")(h))
    m = keras.Model(inp, L.Dense(3, activation="softmax")(h))
    rng = np.random.default_rng(0)
    for layer in m.layers:  # nonzero biases, so that their layout is tested too
        layer.set_weights([w + rng.normal(0, 0.1, w.shape).astype(w.dtype) for w in layer.get_weights()])
    x = rng.integers(0, 64, (64, 12)).astype("int32")
    t = mp.from_keras(m)
    with torch.no_grad():
        assert np.abs(torch.softmax(t(torch.from_numpy(x).long()), 1).numpy() - _keras_out(m, x)).max() < 1e-5
    assert all(np.allclose(a, b, atol=1e-7) for a, b in zip(mp.to_keras(t, m).get_weights(), m.get_weights()))
    res = mp.compress(m, {"stages": [{"quantize": {"bits": 4, "group_size": 16}}]}, calib_data=mp.array_batches(x))
    recurrent = t[2].rnn  # Embedding, Permute, then the first recurrent layer
    assert type(recurrent).__name__ == {"SimpleRNN": "RNN"}.get(rnn, rnn.removeprefix("Bi"))
    assert recurrent.bidirectional == rnn.startswith("Bi")
    w = res.model[2].rnn.weight_hh_l0.detach()
    assert max(len(torch.unique(g)) for g in w.reshape(-1, 16)) <= 16  # 4-bit groups in the recurrent kernel
    res.save(tmp_path / "t.mpz")
    k = mp.load(tmp_path / "t.mpz")
    with torch.no_grad():
        assert np.abs(_keras_out(k, x) - torch.softmax(res.model(torch.from_numpy(x).long()), 1).numpy()).max() < 1e-5


def test_what_does_not_convert_is_named():
    m = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(4, 3, name="c"), L.Reshape((36, 4), name="r"),
                          L.LSTM(3, name="rnn")])
    with pytest.raises(ModelpressError, match="'r' \\(Reshape\\) is not supported"):
        mp.from_keras(m)
    strided_same = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(4, 3, strides=2, padding="same", name="s")])
    with pytest.raises(ModelpressError, match="'s': padding 'same' with strides"):
        mp.from_keras(strided_same)
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(3)

        def call(self, x):
            return self.dense(x)
    net = Subclassed()
    net(np.ones((2, 4), "float32"))
    with pytest.raises(ModelpressError, match="is a subclass \\(Subclassed\\) whose call\\(\\)"):
        mp.from_keras(net)
    with pytest.raises(ModelpressError, match="softmax is supported only as the model's last step"):
        mp.from_keras(keras.Sequential([keras.Input((4,)), L.Dense(3, activation="softmax"), L.Dense(2)]))


def test_a_file_naming_other_keras_classes_is_refused(tmp_path):
    import json

    from modelpress.format import mpz

    keras.utils.set_random_seed(3)
    m = keras.Sequential([keras.Input((4,)), L.Dense(3)])
    path = tmp_path / "k.mpz"
    mp.compress(m, {"stages": [{"quantize": {"bits": 8}}]}, calib_data=[torch.randn(8, 4)]).save(path)
    manifest, streams, _ = mpz.read(path)
    config = json.loads(manifest["meta"]["keras"])
    config["config"]["layers"][1]["class_name"] = "Lambda"
    manifest["meta"]["keras"] = json.dumps(config)
    mpz.write(tmp_path / "evil.mpz", manifest, streams)
    with pytest.raises(ModelpressError, match="does not rebuild: \\['Lambda'\\]"):
        mp.load(tmp_path / "evil.mpz")
    assert isinstance(mp.load(tmp_path / "evil.mpz", keras=False), torch.nn.Sequential)
    with pytest.raises(ModelpressError, match="not made from a Keras model"):
        mp.load(tmp_path / "evil.mpz", model=torch.nn.Sequential(torch.nn.Linear(4, 3)), keras=True)


def test_a_file_whose_bidirectional_wraps_another_class_is_refused(tmp_path):
    import json

    from modelpress.format import mpz

    keras.utils.set_random_seed(12)
    m = keras.Sequential([keras.Input((6, 2)), L.Bidirectional(L.GRU(3)), L.Dense(2)])
    mp.compress(m, {"stages": [{"quantize": {"bits": 8}}]}, calib_data=[torch.randn(8, 6, 2)]).save(tmp_path / "b.mpz")
    manifest, streams, _ = mpz.read(tmp_path / "b.mpz")
    config = json.loads(manifest["meta"]["keras"])
    config["config"]["layers"][1]["config"]["backward_layer"]["class_name"] = "Lambda"
    manifest["meta"]["keras"] = json.dumps(config)
    mpz.write(tmp_path / "evil.mpz", manifest, streams)
    with pytest.raises(ModelpressError, match="does not rebuild: \\['Lambda'\\]"):
        mp.load(tmp_path / "evil.mpz")
    assert mp.keras_model.is_keras(mp.load(tmp_path / "b.mpz"))


def test_array_batches_take_one_hot_targets():
    x, y = _x(10, (3,)), np.eye(4)[[0, 1, 2, 3, 0, 1, 2, 3, 0, 1]]
    batches = list(mp.array_batches(x, y, batch_size=4, shuffle=False))
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    assert batches[0][1].tolist() == [0, 1, 2, 3]
    assert sorted(torch.cat([b[1] for b in mp.array_batches(x, y, batch_size=4)]).tolist()) == sorted(y.argmax(1))
    with pytest.raises(ModelpressError, match="10 inputs but 3 targets"):
        mp.array_batches(x, y[:3])


def test_a_keras_pydataset_is_read_batch_by_batch_with_its_epoch_hook():
    class Digits(keras.utils.PyDataset):
        def __init__(self, x, y):
            super().__init__()
            self.x, self.y, self.epochs = x, y, 0

        def __len__(self):
            return len(self.x) // 16

        def __getitem__(self, i):
            return self.x[i * 16:(i + 1) * 16], keras.utils.to_categorical(self.y[i * 16:(i + 1) * 16], 10)

        def on_epoch_end(self):
            self.epochs += 1

    m, x = _cnn(), _x()
    data = Digits(x, np.random.default_rng(1).integers(0, 10, len(x)))
    res = mp.compress(m, {"stages": [{"prune": {"sparsity": 0.5}}, {"finetune": {"epochs": 2}}]}, train_data=data)
    assert data.epochs >= 2  # one per pass that fit would make
    batches = list(mp.batches.KerasSequenceBatches(data))
    assert len(batches) == 4 and batches[0][0].dtype == torch.float32 and batches[0][1].tolist() == list(data.y[:16])
    assert res.report.rows[-1].sparsity > 0.4


@pytest.mark.skipif(__import__("importlib").util.find_spec("jax") is None, reason="needs jax (not in the extras)")
def test_a_model_on_the_jax_backend_compresses_and_comes_back_on_it(tmp_path):
    import subprocess
    import sys

    script = f"""
import os
os.environ["KERAS_BACKEND"] = "jax"
import keras, numpy as np, torch
import modelpress as mp
L = keras.layers
keras.utils.set_random_seed(0)
inp = keras.Input((15, 15, 1))
h = L.Conv2D(8, 3, activation="relu")(inp)
h = L.BatchNormalization()(L.Add()([h, L.Conv2D(8, 3, padding="same")(h)]))
m = keras.Model(inp, L.Dense(4, activation="softmax")(L.GlobalAveragePooling2D()(h)))
x = np.random.default_rng(0).normal(size=(32, 15, 15, 1)).astype("float32")
y = np.random.default_rng(1).integers(0, 4, 32)
res = mp.compress(m, {{"stages": [{{"prune": {{"sparsity": 0.5}}}}, {{"finetune": {{"epochs": 1}}}}]}},
                  train_data=mp.array_batches(x, y, 8))
res.save({str(tmp_path / "j.mpz")!r})
k = mp.load({str(tmp_path / "j.mpz")!r})
with torch.no_grad():
    t = torch.softmax(res.model(torch.from_numpy(x)), 1).numpy()
print(keras.backend.backend(), type(k).__name__, float(np.abs(np.asarray(k.predict(x, verbose=0)) - t).max()))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    backend, kind, diff = out.stdout.split()[-3:]
    assert (backend, kind) == ("jax", "Functional") and float(diff) < 1e-5, out.stderr[-2000:]


def test_cli_compresses_a_keras_file_and_exports_plain_keras(tmp_path):
    import subprocess
    import sys

    from typer.testing import CliRunner

    from modelpress import data
    from modelpress.cli import app

    keras.utils.set_random_seed(4)
    m = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(8, 3, activation="relu"), L.Flatten(),
                          L.Dense(10, activation="softmax")])
    split = data.digits(image=True)
    x, y = split.x_train.permute(0, 2, 3, 1).numpy(), split.y_train.numpy()
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    m.fit(x, y, epochs=3, batch_size=64, verbose=0)
    src, out, small = tmp_path / "digits.keras", tmp_path / "digits.mpz", tmp_path / "small.keras"
    m.save(src)
    runner = CliRunner()
    res = runner.invoke(app, ["compress", str(src), "--recipe", "w4", "--data", "digits-image", "-o", str(out)],
                        terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "acc" in res.output
    res = runner.invoke(app, ["export", str(out), "--keras", str(small)])
    assert res.exit_code == 0, res.output
    np.save(tmp_path / "x.npy", x[:50])
    code = ("import os, sys; os.environ['KERAS_BACKEND'] = 'torch'; import keras, numpy as np; "
            f"m = keras.saving.load_model({str(small)!r}); p = m.predict(np.load({str(tmp_path / 'x.npy')!r}), "
            "verbose=0); assert 'modelpress' not in sys.modules; np.save(sys.argv[1], p)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "p.npy")], check=True, cwd=tmp_path)
    fresh = np.load(tmp_path / "p.npy")
    assert np.abs(fresh - _torch_probs(mp.load(out, keras=False), x[:50])).max() < 1e-5
    assert (fresh.argmax(1) == m.predict(x[:50], verbose=0).argmax(1)).mean() >= 0.9  # w4 keeps the decisions
    res = runner.invoke(app, ["export", str(out)])
    assert res.exit_code != 0 and "give one of --onnx, --keras, --hf or --gguf" in re.sub(r"[\s│]+", " ", res.output)


def test_cli_takes_the_users_own_arrays_from_an_npz_file(tmp_path, caplog):
    import logging

    from typer.testing import CliRunner

    from modelpress.cli import app

    m, x = _cnn(), _x(120)
    y = np.random.default_rng(2).integers(0, 10, len(x))
    m.save(tmp_path / "m.keras")
    np.savez(tmp_path / "d.npz", x_train=x[:80], y_train=y[:80], x_val=x[80:100], y_val=y[80:100],
             x_test=x[100:], y_test=keras.utils.to_categorical(y[100:], 10))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - prune: {sparsity: auto, max_sparsity: 0.5, steps: 2, epochs: 1}\n")
    runner = CliRunner()
    with caplog.at_level(logging.INFO, logger="modelpress"):
        res = runner.invoke(app, ["compress", str(tmp_path / "m.keras"), "--recipe", str(recipe), "--data",
                                  str(tmp_path / "d.npz"), "-o", str(tmp_path / "m.mpz")], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "acc" in res.output and "samples of val_data" in caplog.text  # accuracy on x_test; the stop on x_val
    np.savez(tmp_path / "bad.npz", y_train=y)
    res = runner.invoke(app, ["compress", str(tmp_path / "m.keras"), "--recipe", "int8", "--data",
                              str(tmp_path / "bad.npz"), "-o", str(tmp_path / "b.mpz")], terminal_width=200)
    assert res.exit_code != 0 and "it needs x_train" in res.output


def test_compare_on_a_keras_model_writes_artifacts_that_load_as_keras(tmp_path):
    keras.utils.set_random_seed(10)
    m = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(8, 3, activation="relu"), L.Flatten(),
                          L.Dense(10, activation="softmax")])
    x = _x(100, (8, 8, 1))
    c = mp.compare(m, ["int8"], calib_data=mp.array_batches(x, batch_size=20), out_dir=tmp_path, repeats=1)
    assert [r.name for r in c.rows] == ["original (fp32)", "int8"] and c.rows[1].error is None
    k = mp.load(tmp_path / "int8.mpz")
    assert mp.keras_model.is_keras(k) and k.name == m.name
    assert (_keras_out(k, x).argmax(1) == _keras_out(m, x).argmax(1)).mean() >= 0.95
