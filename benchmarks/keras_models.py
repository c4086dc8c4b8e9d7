"""Keras models trained by Keras's own `fit` on MNIST-5k, compressed by modelpress's `deep-compression`
through `modelpress.from_keras`, written back with `modelpress.to_keras`, and measured by Keras: test
accuracy before and after, and the .mpz file against the fp32 weights. The models: the Keras LeNet-300-100,
the Keras LeNet-5 and the classic Keras MNIST CNN (Conv2D 32 -> pool -> Conv2D 64 -> pool -> Conv2D 64 ->
Dense 64 -> Dense 10).

    pip install -e ".[data,keras]"; KERAS_BACKEND=torch python benchmarks/keras_models.py [--models lenet-300-100]

With `--tfmot-python PY` (a Python with tensorflow-cpu, tf-keras and tensorflow-model-optimization: TF and
torch do not share an environment here), TF-MOT's prune + cluster + int8 TFLite pipeline runs on the same
models and data in the same run (`tfmot_peer.py`: tf-keras trains its own copy the same way).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import modelpress as mp  # noqa: E402
from modelpress.data import mnist5k  # noqa: E402
from modelpress.measure import machine_line  # noqa: E402

L = keras.layers


def lenet_300_100() -> keras.Model:
    return keras.Sequential([keras.Input((28, 28, 1)), L.Flatten(), L.Dense(300, activation="relu"),
                             L.Dense(100, activation="relu"), L.Dense(10, activation="softmax")])


def lenet5() -> keras.Model:
    return keras.Sequential([keras.Input((28, 28, 1)), L.Conv2D(20, 5, activation="relu"), L.MaxPooling2D(),
                             L.Conv2D(50, 5, activation="relu"), L.MaxPooling2D(), L.Flatten(),
                             L.Dense(500, activation="relu"), L.Dense(10, activation="softmax")])


def mnist_cnn() -> keras.Model:
    return keras.Sequential([keras.Input((28, 28, 1)), L.Conv2D(32, 3, activation="relu"), L.MaxPooling2D(),
                             L.Conv2D(64, 3, activation="relu"), L.MaxPooling2D(),
                             L.Conv2D(64, 3, activation="relu"), L.Flatten(), L.Dense(64, activation="relu"),
                             L.Dense(10, activation="softmax")])


MODELS = {"lenet-300-100": lenet_300_100, "lenet-5": lenet5, "mnist-cnn": mnist_cnn}


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    return float((model.predict(x, batch_size=500, verbose=0).argmax(1) == y).mean() * 100)


def tfmot(python: str, models: str, arrays: tuple) -> dict:
    """tfmot_peer.py's best row per model, run in `python` on the same arrays."""
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "mnist5k.npz")
        np.savez(path, **dict(zip(("x_train", "y_train", "x_test", "y_test"), arrays)))
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tfmot_peer.py")
        out = subprocess.run([python, script, path, *models.split(",")], check=True, capture_output=True, text=True,
                             cwd=work).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {r["model"]: r for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--epochs", type=int, default=15, help="Keras training epochs")
    ap.add_argument("--recipe", default="deep-compression")
    ap.add_argument("--tfmot-python", help="a Python with TF-MOT, to run tfmot_peer.py beside")
    args = ap.parse_args()
    data = mnist5k(image=True)
    x_train, x_test = (d.permute(0, 2, 3, 1).numpy() for d in (data.x_train, data.x_test))  # channels last
    y_train, y_test = data.y_train.numpy(), data.y_test.numpy()
    print(f"MNIST-5k ({len(x_train)} train, {len(x_test)} test); keras {keras.__version__} on "
          f"{keras.backend.backend()}; {machine_line()}")
    rows = []
    for name in args.models.split(","):
        keras.utils.set_random_seed(0)
        model = MODELS[name]()
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        model.fit(x_train, y_train, batch_size=64, epochs=args.epochs, verbose=0)
        before = accuracy(model, x_test, y_test)
        t = time.perf_counter()
        result = mp.compress(model, args.recipe, train_data=mp.array_batches(x_train, y_train, batch_size=64))
        seconds = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as work:
            size = result.save(os.path.join(work, "m.mpz"))
            back = mp.load(os.path.join(work, "m.mpz"))  # a Keras model, from the config the file records
        after = accuracy(back, x_test, y_test)
        fp32 = model.count_params() * 4
        rows.append((name, fp32, size, before, after, seconds))
        print(f"{name}: {fp32 / size:.1f}x, {before:.2f} -> {after:.2f} ({seconds:.0f} s)", flush=True)
    peers = tfmot(args.tfmot_python, args.models, (x_train, y_train, x_test, y_test)) if args.tfmot_python else {}
    print("\n| Keras model | method | fp32 bytes | bytes | ratio | test acc | after | delta | s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, fp32, size, before, after, seconds in rows:
        print(f"| {name} | modelpress {args.recipe} (.mpz) | {fp32:,} | {size:,} | {fp32 / size:.1f}x | {before:.2f} | "
              f"{after:.2f} | {after - before:+.2f} | {seconds:.0f} |")
        p = peers.get(name)
        if p and p["bytes"]:
            print(f"| {name} | TF-MOT prune {p['sparsity']:.0%} + {p['clusters']} clusters + int8 (.tflite.gz) | "
                  f"{p['fp32_bytes']:,} | {p['bytes']:,} | {p['fp32_bytes'] / p['bytes']:.1f}x | {p['before']:.2f} | "
                  f"{p['after']:.2f} | {p['after'] - p['before']:+.2f} | {p['seconds']:.0f} |")
        elif p:
            print(f"| {name} | TF-MOT: no setting within 0.5 points | | | | {p['before']:.2f} | | | |")
    print("accuracy: modelpress rows measured by Keras on the Keras model modelpress.load rebuilt from the .mpz file; "
          "TF-MOT rows by the TFLite interpreter on the .tflite file, against tf-keras's own training of the model")


if __name__ == "__main__":
    main()
