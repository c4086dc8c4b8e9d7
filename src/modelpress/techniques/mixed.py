"""Per-layer bit-widths under a size budget, from measured sensitivity.

Each target tensor is quantized alone to the base bit-width (round to nearest) and either the change of
the model's output on a few calibration batches is measured (KL divergence of class probabilities for a
classifier, relative squared error otherwise), or, with no forward pass at all, the change of that
layer's own output, from its calibration Hessian (what a model compressed one block at a time allows).
One more bit roughly quarters a tensor's
quantization error, so the expected gain of raising a tensor from b to b+1 bits is taken as
0.75 x sensitivity x 4^-(b - base); bits are handed out greedily by gain per stored bit until
the budget is spent."""
from __future__ import annotations

import heapq
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..batches import call_model, logits_of, split_batch
from ..errors import ModelpressError
from .grid import row_chunks

MAX_BITS = 8


@torch.no_grad()
def sensitivities(model: nn.Module, params: dict[str, nn.Parameter],
                  quantize_fn: Callable[[str, torch.Tensor], torch.Tensor],
                  batches: list, progress: Callable[[str, float], None] | None = None) -> dict[str, float]:
    """How much the model's output changes when only that tensor is quantized: for class scores (a
    [batch, classes] output), the KL divergence of the class probabilities from the original's, which
    weighs the classes that decide the top-1; for other outputs, the squared error relative to the
    output's mean square."""
    model.eval()
    inputs = [split_batch(b)[0] for b in batches]
    refs = [logits_of(call_model(model, x)).float() for x in inputs]
    bad = [i for i, r in enumerate(refs) if not bool(torch.isfinite(r).all())]
    if bad:
        raise ModelpressError(f"per-layer bits: the model's outputs on calib_data batch(es) {bad[:5]} hold NaN or "
                              "Inf, so no sensitivity can be measured; check those batches for NaN or Inf")
    classes = refs[0].dim() == 2 and refs[0].shape[-1] >= 2
    if classes:
        refs = [r.log_softmax(-1) for r in refs]
        change = lambda out, ref: float(F.kl_div(out.log_softmax(-1), ref, log_target=True,  # noqa: E731
                                                 reduction="batchmean"))
    else:
        power = sum(float((r ** 2).mean()) for r in refs) / len(refs) or 1.0
        change = lambda out, ref: float(((out - ref) ** 2).mean()) / power  # noqa: E731
    out = {}
    for i, (name, p) in enumerate(params.items()):
        saved = p.detach().clone()
        p.copy_(quantize_fn(name, saved))
        err = sum(change(logits_of(call_model(model, x)).float(), r) for x, r in zip(inputs, refs))
        p.copy_(saved)
        out[name] = err / len(refs)
        if progress is not None:
            progress("sensitivity", (i + 1) / len(params))
    return out


@torch.no_grad()
def layer_errors(params: dict[str, nn.Parameter], hessians: dict[str, torch.Tensor],
                 quantize_fn: Callable[[str, torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """Each tensor's own output error when it alone is quantized, relative to its output's power:
    tr(dW H dW^T) / tr(W H W^T) with the layer's input Hessian H ((in, in), or (groups, k, k) for a
    grouped convolution); for a tensor without one (an embedding table), |dW|^2 / |W|^2."""
    out = {}
    for name, p in params.items():
        H = hessians.get(name)
        if H is not None:
            H = H.double() if H.dim() == 3 else H.double()[None]
        num = den = 0.0
        w = p.detach()
        rows = [w[r] for r in row_chunks(w)] if p.dim() > 1 and (H is None or H.shape[0] == 1) else [w]
        for w in rows:  # rows are independent (per-row or per-group grids): a few at a time bounds the memory
            d = w.double() - quantize_fn(name, w).double()
            w = w.double()
            if H is None:
                num, den = num + float((d * d).sum()), den + float((w * w).sum())
            else:
                d, w = d.reshape(H.shape[0], -1, H.shape[-1]), w.reshape(H.shape[0], -1, H.shape[-1])
                num, den = num + float(((d @ H) * d).sum()), den + float(((w @ H) * w).sum())
        out[name] = num / den if den > 0 else 0.0
    return out


def allocate(sizes: dict[str, int], sens: dict[str, float], base: int, budget_bits: float) -> dict[str, int]:
    """Bits per tensor: `base` everywhere, raised where it buys the most error per bit, within budget."""
    bits = dict.fromkeys(sizes, base)
    spent = sum(n * base for n in sizes.values())
    heap = [(-sens[k] * 0.75 / max(1, n), k) for k, n in sizes.items() if base < MAX_BITS]
    heapq.heapify(heap)
    while heap:
        gain, k = heapq.heappop(heap)
        if spent + sizes[k] > budget_bits:
            continue  # too big for what is left; a smaller tensor may still fit
        bits[k] += 1
        spent += sizes[k]
        if bits[k] < MAX_BITS:
            heapq.heappush(heap, (gain / 4, k))
    return bits
