"""Statistics of layer inputs on calibration data, gathered with forward hooks in one pass.

`calib_data` is an iterable of model-input batches: a tensor, a tuple of positional inputs, or a
dict of keyword inputs (a tokenizer's output), exactly what `model(...)` takes."""
from __future__ import annotations

import logging
import math
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..batches import call_model, split_batch
from ..errors import ModelpressError

log = logging.getLogger(__name__)

_HOW = ("pass compress(..., calib_data=batches) where each batch is what the model's forward takes: a tensor, "
        "a tuple of positional inputs, or a dict of keyword inputs such as a tokenizer's output")


def calibration_batches(calib_data: Iterable | None, what: str) -> list:
    """The calibration batches as a list; a clear error if there are none."""
    if calib_data is None:
        raise ModelpressError(f"{what} needs calibration data; {_HOW}")
    if isinstance(calib_data, (torch.Tensor, dict)):
        raise ModelpressError(f"{what}: calib_data must be an iterable of batches, not one "
                              f"{type(calib_data).__name__}; wrap it in a list: calib_data=[batch]")
    batches = list(calib_data)
    if not batches:
        raise ModelpressError(f"{what}: calib_data is empty; {_HOW}")
    return batches


MAX_POSITIONS = 1024  # output positions per image a convolution's Hessian takes (evenly spaced)
HESSIAN_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)  # the layers whose input rows `_input_rows` reads


def hessian_shape(module: nn.Module) -> tuple[int, int]:
    """(groups, inputs per group) of the Hessian GPTQ uses for a Linear, Conv1d or Conv2d."""
    if isinstance(module, nn.Linear):
        return 1, module.in_features
    return module.groups, module.weight[0].numel()


def _input_rows(module: nn.Module, x: torch.Tensor) -> Iterator[torch.Tensor]:
    """A layer's input as blocks of (groups, rows, inputs per group): the rows its weight multiplies. A
    Linear's come in one block; a convolution's one image at a time (its receptive fields are about
    kernel-size times its input), each row one output position's receptive field, at most MAX_POSITIONS
    per image."""
    if isinstance(module, nn.Linear):
        yield x.reshape(1, -1, x.shape[-1])
        return
    two_d = isinstance(module, nn.Conv2d)
    x = x.unsqueeze(0) if x.dim() == (3 if two_d else 2) else x  # an unbatched input: a batch of one
    x = x if two_d else x.unsqueeze(-2)  # a Conv1d as a Conv2d of height 1
    as_2d = (lambda v, one: tuple(v)) if two_d else (lambda v, one: (one, v[0]))
    padding = module.padding
    if module.padding_mode != "zeros" or isinstance(padding, str):
        pad = module._reversed_padding_repeated_twice
        x = F.pad(x, pad if two_d else (*pad, 0, 0), mode="constant" if module.padding_mode == "zeros"
                  else module.padding_mode)
        padding = (0, 0)
    groups, per_group = hessian_shape(module)
    for image in x.split(1):
        cols = F.unfold(image, as_2d(module.kernel_size, 1), dilation=as_2d(module.dilation, 1),
                        padding=as_2d(padding, 0), stride=as_2d(module.stride, 1))  # (1, in * kernel, positions)
        cols = cols[0, :, ::max(1, -(-cols.shape[2] // MAX_POSITIONS))]
        yield cols.reshape(groups, per_group, -1).transpose(1, 2)


@torch.no_grad()
def collect_hessians(model: nn.Module, layers: dict[str, nn.Module], calib_data: Iterable | None,
                     progress: Callable[[str, float], None] | None = None,
                     means: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """H = 2/n X^T X of each layer's inputs over the calibration batches, keyed like `layers`: (in, in)
    for a Linear, (groups, k, k) for a Conv1d/Conv2d whose groups each see k inputs; `means`, if given,
    is filled with each layer's mean input row (groups, k) from the same pass."""
    batches = calibration_batches(calib_data, "method: gptq")

    def feed() -> None:
        was_training = model.training
        model.eval()
        try:
            for i, batch in enumerate(batches):
                inputs, _ = split_batch(batch)
                try:
                    call_model(model, inputs)
                except Exception as e:
                    raise ModelpressError(f"calib_data batch {i + 1} could not be passed to the model "
                                          f"({type(e).__name__}: {e}); {_HOW}") from None
                if progress is not None:
                    progress("calibrate", (i + 1) / len(batches))
        finally:
            model.train(was_training)

    return hessians_while(layers, feed, means)


def all_finite(t: torch.Tensor) -> bool:
    """Whether `t` holds no NaN or Inf, without `isfinite`'s temporaries (1.4x the size of a float64
    Hessian): a sum is NaN or Inf when any entry is; only then, or on overflow, are entries checked."""
    t = t.detach()
    if math.isfinite(float(t.sum())):
        return True
    flat = t.reshape(-1)
    step = 1 << 22
    return all(bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.numel(), step))


@torch.no_grad()
def hessians_while(layers: dict[str, nn.Module], feed: Callable[[], object],
                   means: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The input Hessians of `layers` (as `collect_hessians`) over whatever `feed()` passes through them,
    and their mean input rows into `means` if given."""
    shapes = {name: hessian_shape(m) for name, m in layers.items()}
    sums = {name: torch.zeros(g, k, k, dtype=torch.float64) for name, (g, k) in shapes.items()}
    row_sums = {name: torch.zeros(g, k, dtype=torch.float64) for name, (g, k) in shapes.items()} if means is not None \
        else {}
    counts = dict.fromkeys(layers, 0)

    def hook(name: str):
        def fn(module, args, output):
            for rows in _input_rows(module, args[0].detach()):
                rows = rows.double()
                sums[name].baddbmm_(rows.transpose(1, 2), rows)
                if means is not None:
                    row_sums[name] += rows.sum(1)
                counts[name] += rows.shape[1]
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    try:
        feed()
    finally:
        for h in handles:
            h.remove()
    bad = [name for name, h in sums.items() if not all_finite(h)]
    if bad:
        raise ModelpressError(f"calib_data gives non-finite inputs (NaN or Inf) to {len(bad)} layer(s): "
                              f"{', '.join(bad[:5])}; check the calibration batches (and the model's outputs "
                              "on them) for NaN or Inf")
    unseen = [name for name, n in counts.items() if n == 0]
    if unseen:
        log.warning("no calibration input reached %d layer(s) (%s); they are rounded to nearest instead",
                    len(unseen), ", ".join(unseen[:5]))
    out = {}
    for name, n in counts.items():  # 2/n X^T X in place, each sum let go as it is done: no second copy of them all
        h = sums.pop(name)
        if n > 0:
            out[name] = (h[0] if isinstance(layers[name], nn.Linear) else h).mul_(2).div_(n)
            if means is not None:
                means[name] = row_sums.pop(name).div_(n)
    return out
