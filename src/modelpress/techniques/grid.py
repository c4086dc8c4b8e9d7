"""Uniform grids: per tensor, per output channel or per group of inputs, `bits` bits, zero exactly
representable (so pruned weights stay zero). Below 8 bits all 2^bits codes are used: a scale's sign is
chosen so that a group's largest weight lands on the extra negative code (-8 at 4 bits; a step 8/7 finer
than a symmetric grid's), and the scale is the one, among shrunken copies of that weight, that minimises
the squared error of its group (clipping the rare largest weights is worth the finer grid). 8 bits stay
symmetric, [-127, 127], for the int8 kernels. Scales are float16-exact so the file stores them losslessly.
Shared by round-to-nearest, GPTQ and per-layer bit allocation."""
from __future__ import annotations

import torch

from ..state import broadcast_scale, code_range

_SHRINK = torch.linspace(1.0, 0.5, 11)  # candidate clip ratios of max|w| below 8 bits


def symmetric_scale(w: torch.Tensor, bits: int, per_channel: bool = True) -> torch.Tensor:
    """max|w| / qmax per output channel (or per tensor), float16-representable and never zero."""
    qmax = code_range(bits)[1]
    amax = w.abs().flatten(1).amax(1) if per_channel and w.dim() > 1 else w.abs().max().reshape(1)
    return _f16_scale(amax / qmax)


def _f16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round to 8 significant bits (0.4% steps: no measurable loss) inside float16, so that the
    file's entropy coder stores a scale in about half of float16's 16 bits; the sign is kept, and a zero
    (an all-zero group) becomes 1."""
    mantissa, exponent = torch.frexp(scale)
    scale = torch.ldexp(torch.round(mantissa * 256) / 256, exponent).half().float()
    tiny = torch.finfo(torch.float16).tiny
    size = torch.where(scale != 0, scale.abs(), torch.ones_like(scale)).clamp_min(tiny)
    return torch.where(scale < 0, -size, size)


def row_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """One scale per row of a 2-D tensor: max|w| / 127 at 8 bits; below, signed so that the row's
    largest weight falls on the lowest code, with the clip ratio of least squared error."""
    lo, hi = code_range(bits)
    if bits >= 8:
        return _f16_scale(w.abs().amax(1) / hi)
    extreme = w.gather(1, w.abs().argmax(1, keepdim=True)).squeeze(1)  # signed: the weight of largest magnitude
    cands = _f16_scale((extreme.unsqueeze(0) * _SHRINK.unsqueeze(1)) / lo)  # (ratios, rows)
    best = torch.empty_like(extreme)
    step = max(1, 2 ** 22 // (len(_SHRINK) * max(1, w.shape[1])))  # bounded memory on big tables
    for r in range(0, w.shape[0], step):
        c, x = cands[:, r:r + step].unsqueeze(2), w[r:r + step].unsqueeze(0)
        err = ((torch.round(x / c).clamp(lo, hi) * c - x) ** 2).sum(2)
        best[r:r + step] = c.squeeze(2).gather(0, err.argmin(0, keepdim=True)).squeeze(0)
    return best


def group_scale(w: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """Scales of a weight per output channel (`group` None) or (out, groups) per `group` flattened inputs."""
    w2 = w.detach().flatten(1)
    if group is None:
        return torch.cat([row_scale(w2[r].float(), bits) for r in row_chunks(w2)])
    out, cols = w2.shape
    n = -(-cols // group)
    parts = []
    for r in row_chunks(w2):  # a few rows at a time: no padded copy of a whole embedding table
        padded = torch.nn.functional.pad(w2[r].float(), (0, n * group - cols))  # zero padding never raises a max
        parts.append(row_scale(padded.reshape(-1, group), bits).reshape(-1, n))
    return torch.cat(parts) if parts else torch.empty(0, n)


def row_chunks(w: torch.Tensor, elements: int = 1 << 22) -> list[slice]:
    """Slices of about `elements` entries along dim 0: row-wise work on a large tensor in bounded memory."""
    step = max(1, elements // max(1, w[0].numel())) if w.dim() and len(w) else 1
    return [slice(i, i + step) for i in range(0, len(w), step)]


def quantize_tensor(w: torch.Tensor, scale: torch.Tensor, bits: int, group: int | None = None) -> torch.Tensor:
    """Integer codes of w on the grid `scale`, clamped to the `bits` codes (`code_range`)."""
    (lo, hi), w = code_range(bits), w.detach()
    if w.dim() == 0 or scale.numel() == 1:
        return torch.round(w / broadcast_scale(scale, w, group)).clamp(lo, hi).to(torch.int32)
    out = torch.empty(w.shape, dtype=torch.int32)
    for r in row_chunks(w):  # rows at a time: a 65M-entry table would take three float copies at once
        out[r] = torch.round(w[r] / broadcast_scale(scale[r], w[r], group)).clamp(lo, hi)
    return out
