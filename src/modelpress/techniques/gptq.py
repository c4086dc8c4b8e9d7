"""GPTQ (Frantar et al., 2022): quantize a Linear or convolution weight one input column at a time and
spread each column's rounding error over the columns not yet quantized, in proportion to the inverse
Hessian H = 2 X^T X of the layer's calibration inputs (a convolution's inputs are its receptive fields,
and a grouped convolution has one Hessian per group). The same grid as round-to-nearest (`grid.py`: per
channel or per group, float16-exact scales), so the result stores and runs the same way; only the
codes are chosen to keep the layer's outputs, not its weights, close. With `act_order` the columns are solved
by decreasing Hessian diagonal (the inputs carrying most energy first, while most columns remain to absorb
their error) and group scales are fixed from the original weight; `quantize_param` picks it by weight kind."""
from __future__ import annotations

import torch

from ..state import code_range
from .grid import group_scale, row_chunks, row_scale

ROWS = 8192  # output rows solved at once (an LM head's 32k-150k rows in steps)


def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int | None, *, mask: torch.Tensor | None = None,
         block: int = 128, damp: float = 0.01, overwrite: bool = False,
         act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int32 like w, scales (out,) or (out, groups)) for a weight whose flattened inputs have the
    Hessian `hessian`: (in, in), or (G, k, k) for a grouped convolution whose G groups of output
    channels each see their own k inputs (a depthwise convolution: one group per channel). With
    `overwrite`, a float64 `hessian` is factored in its own memory (it holds garbage afterwards): no
    copy of it, which for an MLP's down projection is a quarter of a gigabyte."""

    if hessian.dim() == 2 and w.shape[0] > ROWS:  # rows are solved independently: a few at a time bound the memory
        codes, scales = torch.empty(w.shape, dtype=torch.int32), None
        for i in range(0, w.shape[0], ROWS):
            codes[i:i + ROWS], s = gptq(w[i:i + ROWS], hessian, bits, group, block=block, damp=damp,
                                        mask=None if mask is None else mask[i:i + ROWS], act_order=act_order)
            scales = s.new_empty(w.shape[0], *s.shape[1:]) if scales is None else scales
            scales[i:i + ROWS] = s
        return codes, scales
    lo, hi = code_range(bits)
    own = overwrite and hessian.dtype == torch.float64 and hessian.is_contiguous()
    H = (hessian.detach() if own else hessian.detach().to(torch.float64, copy=True)).view(-1, *hessian.shape[-2:])
    n_groups, cols = H.shape[0], H.shape[-1]
    out = w.shape[0]
    rows = out // n_groups
    W = w.detach().float().reshape(n_groups, rows, cols).clone()
    M = mask.reshape(n_groups, rows, cols).to(W.dtype) if mask is not None else None
    if M is not None:
        W = W * M
    diag = H.diagonal(dim1=-2, dim2=-1)
    diag = diag + (diag == 0).to(H.dtype)  # inputs never active in calibration: rounded to nearest, not
    #                                        zeroed, as other data may reach them
    H.diagonal(dim1=-2, dim2=-1).copy_(diag + damp * diag.mean(-1)[:, None])
    if group is not None and act_order:  # static: from the original weight, as columns are solved out of order
        scale = group_scale(W.reshape(out, cols), bits, group).reshape(n_groups, rows, -1)
    elif group is not None:  # each group's from its columns as updated when it is reached
        scale = torch.empty(n_groups, rows, -(-cols // group))
    else:
        scale = row_scale(W.reshape(out, cols), bits).reshape(n_groups, rows)
    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)  # (G, cols)
        _permute_(H, perm)
        W = W.gather(2, perm[:, None, :].expand(-1, rows, -1))
        M = None if M is None else M.gather(2, perm[:, None, :].expand(-1, rows, -1))
    _cholesky(H)  # each step in H's own memory: an MLP's 10k-input Hessian is 0.8 GB in float64
    torch.cholesky_inverse(H, out=H)
    torch.linalg.cholesky(H, upper=True, out=H)
    Hinv = H.float()
    del H
    if group is not None and perm is None:
        block = max(group, block // group * group)  # groups never straddle two blocks
    Q = torch.zeros_like(W)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        W1, Hinv1 = W[:, :, b0:b1].clone(), Hinv[:, b0:b1, b0:b1]
        Err1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            col = b0 + i
            if group is None:
                s = scale
            elif perm is not None:
                s = scale.gather(2, (perm[:, col] // group)[:, None, None].expand(-1, rows, 1))[..., 0]
            else:
                if col % group == 0:
                    chunk = W1[:, :, i:i + group]
                    scale[:, :, col // group] = row_scale(chunk.reshape(out, -1), bits).reshape(n_groups, rows)
                s = scale[:, :, col // group]
            q = torch.round(W1[:, :, i] / s).clamp(lo, hi)
            if M is not None:
                q = q * M[:, :, col]
            Q[:, :, col] = q
            err = (W1[:, :, i] - q * s) / Hinv1[:, i, i].unsqueeze(1)
            W1[:, :, i:] -= err.unsqueeze(2) * Hinv1[:, i, i:].unsqueeze(1)
            Err1[:, :, i] = err
        W[:, :, b1:] -= Err1 @ Hinv[:, b0:b1, b1:]
    if perm is not None:
        Q = Q.gather(2, torch.argsort(perm, dim=-1)[:, None, :].expand(-1, rows, -1))
    return Q.reshape(w.shape).to(torch.int32), scale.reshape(out, -1) if group is not None else scale.reshape(out)


def _permute_(H: torch.Tensor, perm: torch.Tensor) -> None:
    """H[g] <- H[g][perm[g]][:, perm[g]] for each matrix of the batch H (G, k, k). One matrix is permuted
    in place (an MLP's Hessian is too big for a second copy): its rows cycle by cycle, then its columns a
    band of rows at a time; a batch (a grouped convolution's small Hessians) through one gathered copy."""
    if H.shape[0] > 1:
        idx = perm[:, :, None].expand_as(H)
        H.copy_(H.gather(1, idx).gather(2, idx.transpose(1, 2)))
        return
    A, order = H[0], perm[0].tolist()
    seen = [False] * len(order)
    for start, first in enumerate(order):
        if seen[start] or first == start:
            continue
        held, i = A[start].clone(), start
        while True:  # new row i = old row order[i], along the cycle
            seen[i] = True
            j = order[i]
            if j == start:
                A[i] = held
                break
            A[i] = A[j]
            i = j
    for r in row_chunks(A):
        A[r] = A[r].index_select(1, perm[0])


def _cholesky(H: torch.Tensor) -> None:
    """H (a batch of matrices) replaced by its lower Cholesky factors, with more damping on the diagonal
    if H is not positive definite."""
    diag = H.diagonal(dim1=-2, dim2=-1)
    first = diag.clone()
    mean = first.mean(-1)[:, None]
    for extra in (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        if extra:
            diag.copy_(first + extra * mean)
        L, info = torch.linalg.cholesky_ex(H)
        if int(info.abs().max()) == 0:
            H.copy_(L)
            return
    raise ValueError("the calibration Hessian is not positive definite even after damping")
