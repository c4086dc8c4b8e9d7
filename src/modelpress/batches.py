"""Batches as users give them: `(inputs, targets)` pairs or inputs alone, where inputs are a tensor,
a tuple of positional inputs or a dict of keyword inputs. Shared by the techniques, the pipeline,
compare and export; depends on nothing of modelpress but its errors."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, Iterable

import torch
from torch import nn

from .errors import ModelpressError

log = logging.getLogger(__name__)


def split_batch(batch: Any) -> tuple[Any, Any | None]:
    """(inputs, targets) pairs -> both; anything else -> (inputs, None)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        return batch[0], None
    return batch, None


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call a model on a batch's inputs: a dict is passed as keywords, a tuple as positionals."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def logits_of(output: Any) -> torch.Tensor:
    """The main output tensor of a model: the tensor itself, `.logits`, or the first element."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        if hasattr(output, key):
            return getattr(output, key)
        if isinstance(output, dict) and key in output:
            return output[key]
    if isinstance(output, (tuple, list)) and output:
        return logits_of(output[0])
    raise ModelpressError(f"cannot find an output tensor in a model output of type {type(output).__name__}")


HOLD_OUT_EVERY = 10  # every 10th sample (or batch) is held out


def hold_out(data: Iterable) -> tuple[Iterable, Iterable | None]:
    """(batches to train on, batches held out to measure on): every 10th sample of a DataLoader over a
    map-style dataset with plain batching (the same samples on every pass, shuffled or not), or every
    10th batch of a list or tuple (every 10th sample where it has fewer than 10 batches of tensors);
    `(data, None)` for anything else or for data too small to split."""
    from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, Subset

    if isinstance(data, DataLoader) and hasattr(data.dataset, "__len__") and hasattr(data.dataset, "__getitem__") \
            and type(data.sampler) in (RandomSampler, SequentialSampler) and data.batch_size is not None \
            and len(data.dataset) >= 2 * HOLD_OUT_EVERY:
        n = len(data.dataset)
        held = list(range(HOLD_OUT_EVERY - 1, n, HOLD_OUT_EVERY))
        fit = [i for i in range(n) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1]

        def loader(idx: list[int], shuffle: bool) -> DataLoader:
            return DataLoader(Subset(data.dataset, idx), batch_size=data.batch_size, shuffle=shuffle,
                              collate_fn=data.collate_fn, drop_last=data.drop_last, generator=data.generator,
                              num_workers=data.num_workers)
        return loader(fit, isinstance(data.sampler, RandomSampler)), loader(held, False)
    if isinstance(data, (list, tuple)) and len(data) >= HOLD_OUT_EVERY:
        held_at = set(range(HOLD_OUT_EVERY - 1, len(data), HOLD_OUT_EVERY))
        return [b for i, b in enumerate(data) if i not in held_at], [data[i] for i in sorted(held_at)]
    sizes = [_samples(b) for b in data] if isinstance(data, (list, tuple)) else [None]
    if None in sizes or sum(sizes) < 2 * HOLD_OUT_EVERY:
        return data, None
    fit, held, start = [], [], 0
    for b, n in zip(data, sizes):
        out = torch.arange(start, start + n) % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
        fit.append(_rows(b, ~out))
        if out.any():
            held.append(_rows(b, out))
        start += n
    return fit, held


def _samples(batch: Any) -> int | None:
    """The number of samples in a tensor batch, or in a tuple / list of tensors of one length; else None."""
    parts = [batch] if isinstance(batch, torch.Tensor) else list(batch) if isinstance(batch, (tuple, list)) else []
    lengths = {len(t) if isinstance(t, torch.Tensor) and t.dim() else None for t in parts}
    return lengths.pop() if len(lengths) == 1 and None not in lengths else None


def _rows(batch: Any, keep: torch.Tensor) -> Any:
    return batch[keep] if isinstance(batch, torch.Tensor) else type(batch)(t[keep] for t in batch)


def summary(x: Any) -> str:
    """A short type and shape summary of a batch: "Tensor float32 [64, 20]", "(Tensor ..., int)"."""
    if isinstance(x, torch.Tensor):
        return f"Tensor {str(x.dtype).removeprefix('torch.')} {list(x.shape)}"
    if isinstance(x, dict):
        items = [f"{k}: {summary(v)}" for k, v in list(x.items())[:6]]
        return "{" + ", ".join(items + ["..."] * (len(x) > 6)) + "}"
    if isinstance(x, (tuple, list)):
        items = [summary(v) for v in x[:6]] + ["..."] * (len(x) > 6)
        return ("(%s)" if isinstance(x, tuple) else "[%s]") % ", ".join(items)
    return type(x).__name__


def array_inputs(x: Any) -> torch.Tensor:
    """An array of model inputs (NumPy, or anything `np.asarray` takes) as a tensor: integers (token ids)
    as int64, the rest as float32."""
    import numpy as np

    x = np.asarray(x)
    return torch.as_tensor(x.astype(np.int64 if np.issubdtype(x.dtype, np.integer) else np.float32))


def class_targets(y: Any) -> torch.Tensor:
    """Class targets as Keras users hold them (integers, or one-hot / probability rows) as int64 indices."""
    import numpy as np

    y = torch.as_tensor(np.asarray(y))
    if y.dim() == 2 and y.shape[1] > 1:
        y = y.argmax(1)
    return y.reshape(len(y)).long()


class KerasSequenceBatches:
    """A `keras.utils.PyDataset` (item i: batch i, as inputs or (inputs, targets[, sample weights]) in
    NumPy) read as torch batches, with `on_epoch_end()` between passes, as Keras's `fit` calls it after
    each epoch (a pass may stop early: training counts steps). Sample weights are not used."""

    def __init__(self, dataset: Any):
        self.dataset, self.passes = dataset, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator:
        if self.passes:
            self.dataset.on_epoch_end()
        self.passes += 1
        for i in range(len(self.dataset)):
            item = self.dataset[i]
            if isinstance(item, (tuple, list)) and len(item) in (2, 3):
                yield array_inputs(item[0]), class_targets(item[1])
            else:
                yield array_inputs(item[0] if isinstance(item, (tuple, list)) else item)


def _is_keras_dataset(data: Any) -> bool:
    return any(c.__name__ in ("PyDataset", "Sequence") and c.__module__.startswith("keras")
               for c in type(data).__mro__)


def reusable(data: Iterable | None, name: str) -> Iterable | None:
    """`data` in a form that can be read more than once: a one-shot iterator (a generator, a `map`,
    `iter(...)`) is read into a list, once; a Keras PyDataset is read batch by batch
    (`KerasSequenceBatches`). A clear error for what is not an iterable of batches."""
    if data is None:
        return None
    if _is_keras_dataset(data):
        return KerasSequenceBatches(data)
    if isinstance(data, (torch.Tensor, dict)) or not (hasattr(data, "__iter__") or hasattr(data, "__getitem__")):
        raise ModelpressError(f"{name} must be an iterable of batches (a list, a DataLoader, a generator), not "
                              f"one {type(data).__name__}; to pass a single batch, wrap it in a list: {name}=[batch]")
    if isinstance(data, Iterator):
        data = list(data)
        log.info("%s is a one-shot iterator: read its %d batches into a list, to use them more than once",
                 name, len(data))
    return data


@contextlib.contextmanager
def generators_kept(*datas: Iterable | None) -> Iterator[None]:
    """Within the block, draw from the random generators of `datas` (a shuffling DataLoader's, or its
    sampler's) freely: each is put back as it was when the block ends, so that what comes after (the next
    recipe of a sweep, here or in another process) sees the same order of batches."""
    gens = {g for data in datas if data is not None
            for g in (getattr(data, "generator", None), getattr(getattr(data, "sampler", None), "generator", None))
            if isinstance(g, torch.Generator)}
    states = [(g, g.get_state()) for g in gens]
    try:
        yield
    finally:
        for g, state in states:
            g.set_state(state)


@torch.no_grad()
def check_batches(model: nn.Module, data: Iterable | None, name: str) -> dict | None:
    """Call `model` on the inputs of the first batch of `data`: a clear error now if it can't take them.
    Random states are left as they were (a shuffling DataLoader draws from its generator, or torch's),
    so that the check changes no result. Returns the input's shape (batch of 1) and dtype when it is one
    tensor, for the file to record (export traces with it)."""
    if data is None:
        return None
    with generators_kept(data), torch.random.fork_rng(devices=[]):
        batch = next(iter(data), None)
        if batch is not None:  # empty: the stage that needs the data says so
            _call_first(model, batch, name)
    x = split_batch(batch)[0] if batch is not None else None
    if isinstance(x, torch.Tensor) and x.dim() >= 1:
        return {"shape": [1, *x.shape[1:]], "dtype": str(x.dtype).removeprefix("torch.")}
    return None


def _call_first(model: nn.Module, batch: Any, name: str) -> None:
    inputs, _ = split_batch(batch)
    try:
        call_model(model, inputs)
    except Exception as e:
        raise ModelpressError(
            f"{name} batch 0: the model could not be called on its inputs ({summary(inputs)}): "
            f"{type(e).__name__}: {e}. Batches must be (inputs, targets) pairs or model inputs: a tensor, a "
            "tuple of positional inputs or a dict of keyword inputs, exactly what the model's forward takes") from e
