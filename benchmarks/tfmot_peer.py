"""TF-MOT, the Keras users' own toolkit, on the same Keras models and data as `keras_models.py`: each model
built and trained with tf-keras as there (15 epochs of Adam, batch 64), then TF-MOT's collaborative
pipeline: magnitude pruning on a polynomial schedule with fine-tuning, sparsity-preserving weight
clustering with fine-tuning, and the TFLite converter's int8 weight quantization; the size is the gzipped
.tflite file, as TF-MOT's own guides measure it. A small grid (final sparsity x clusters) per model; the
row kept is the smallest file within 0.5 points of the original's test accuracy (chosen on the test set,
which favours TF-MOT).

With `--pretrained H5 IMAGES.npz [SHIPPED.tflite]`: the TFLite converter's int8 on a pretrained Keras
model instead (int8 weights, Optimize.DEFAULT; and full-integer int8 calibrated on the same images that
modelpress calibrates on), plus a .tflite the model's package ships, each measured by top-1 agreement with
the fp32 Keras model's predictions on the same evaluation images.

Run by `keras_models.py --tfmot-python PY` in a Python with TF-MOT (it does not share an environment
with torch here):  python -m venv tfvenv && tfvenv/bin/pip install tensorflow-cpu tf-keras
tensorflow-model-optimization;  tfvenv/bin/python benchmarks/tfmot_peer.py DATA.npz MODEL... -> JSON lines
"""
from __future__ import annotations

import gzip
import json
import os
import sys
import tempfile
import time

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # TF-MOT works on tf-keras (Keras 2)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402

L = keras.layers
GRID = [(0.8, 16), (0.9, 16), (0.9, 8), (0.93, 8), (0.95, 16), (0.95, 8)]


def build(name: str) -> keras.Model:
    if name == "lenet-300-100":
        layers = [L.Flatten(), L.Dense(300, activation="relu"), L.Dense(100, activation="relu")]
    elif name == "lenet-5":
        layers = [L.Conv2D(20, 5, activation="relu"), L.MaxPooling2D(), L.Conv2D(50, 5, activation="relu"),
                  L.MaxPooling2D(), L.Flatten(), L.Dense(500, activation="relu")]
    else:
        layers = [L.Conv2D(32, 3, activation="relu"), L.MaxPooling2D(), L.Conv2D(64, 3, activation="relu"),
                  L.MaxPooling2D(), L.Conv2D(64, 3, activation="relu"), L.Flatten(), L.Dense(64, activation="relu")]
    return keras.Sequential([keras.Input((28, 28, 1)), *layers, L.Dense(10, activation="softmax")])


def accuracy(model, x, y) -> float:
    return float((model.predict(x, batch_size=500, verbose=0).argmax(1) == y).mean() * 100)


def compile_(model, lr: float) -> None:
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def tflite_gzip_bytes(model, work: str, calib=None) -> tuple[int, bytes]:
    """(gzipped bytes, the flatbuffer) of the model as an int8-weight .tflite; with `calib` images, full-integer
    int8 (activations too, ranges calibrated on them; float input and output)."""
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if calib is not None:
        conv.representative_dataset = lambda: ([calib[i:i + 1]] for i in range(len(calib)))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    data = conv.convert()
    return gzip_bytes(data, work), data


def gzip_bytes(data: bytes, work: str) -> int:
    path = os.path.join(work, "m.tflite.gz")
    with gzip.open(path, "wb") as f:
        f.write(data)
    return os.path.getsize(path)


def tflite_accuracy(data: bytes, x, y) -> float:
    interp = tf.lite.Interpreter(model_content=data)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], [len(x), *x.shape[1:]])
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], x.astype(inp["dtype"]))
    interp.invoke()
    return float((interp.get_tensor(out["index"]).argmax(1) == y).mean() * 100)


def pretrained(h5: str, images: str, shipped: str | None) -> None:
    d = np.load(images)
    model = keras.models.load_model(h5, compile=False)
    with tempfile.TemporaryDirectory() as work:
        runs = [("TFLite int8 weights", lambda: tflite_gzip_bytes(model, work)),
                ("TFLite full-integer int8 PTQ", lambda: tflite_gzip_bytes(model, work, d["x_cal"]))]
        if shipped:
            flat = open(shipped, "rb").read()
            runs.append((f"the package's own {os.path.basename(shipped)}", lambda: (gzip_bytes(flat, work), flat)))
        for method, run in runs:
            t = time.perf_counter()
            size, data = run()
            print(json.dumps({"method": method, "bytes": size, "agree": tflite_accuracy(data, d["x_eval"], d["ref"]),
                              "seconds": time.perf_counter() - t}), flush=True)


def main() -> None:
    if sys.argv[1] == "--pretrained":
        return pretrained(*sys.argv[2:4], sys.argv[4] if len(sys.argv) > 4 else None)
    d = np.load(sys.argv[1])
    x_train, y_train, x_test, y_test = d["x_train"], d["y_train"], d["x_test"], d["y_test"]
    steps = int(np.ceil(len(x_train) / 64))
    for name in sys.argv[2:]:
        keras.utils.set_random_seed(0)
        base = build(name)
        compile_(base, 1e-3)
        base.fit(x_train, y_train, batch_size=64, epochs=15, verbose=0)
        before = accuracy(base, x_test, y_test)
        weights = base.get_weights()
        fp32 = base.count_params() * 4
        best, t = None, time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            for sparsity, clusters in GRID:
                keras.utils.set_random_seed(0)
                model = build(name)
                model.set_weights(weights)
                schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, sparsity, begin_step=0, end_step=steps * 7)
                pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
                compile_(pruned, 1e-3)
                pruned.fit(x_train, y_train, batch_size=64, epochs=10, verbose=0,
                           callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
                stripped = tfmot.sparsity.keras.strip_pruning(pruned)
                cluster = tfmot.clustering.keras
                clustered = cluster.cluster_weights(
                    stripped, number_of_clusters=clusters, preserve_sparsity=True,
                    cluster_centroids_init=cluster.CentroidInitialization.KMEANS_PLUS_PLUS)
                compile_(clustered, 1e-4)
                clustered.fit(x_train, y_train, batch_size=64, epochs=3, verbose=0)
                final = cluster.strip_clustering(clustered)
                size, data = tflite_gzip_bytes(final, work)
                after = tflite_accuracy(data, x_test, y_test)
                row = {"model": name, "fp32_bytes": fp32, "bytes": size, "before": before, "after": after,
                       "sparsity": sparsity, "clusters": clusters, "seconds": time.perf_counter() - t}
                print(json.dumps({"trial": row}), file=sys.stderr, flush=True)
                if after >= before - 0.5 and (best is None or size < best["bytes"]):
                    best = row
        print(json.dumps(best or {"model": name, "fp32_bytes": fp32, "bytes": None, "before": before,
                                  "after": None, "seconds": time.perf_counter() - t}), flush=True)


if __name__ == "__main__":
    main()
