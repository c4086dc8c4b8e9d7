"""GPTQ (Frantar et al., 2022): quantize a Linear or convolution weight one input column at a time and
spread each column's rounding error over the columns not yet quantized, in proportion to the inverse
Hessian H = 2 X^T X of the layer's calibration inputs (a convolution's inputs are its receptive fields,
and a grouped convolution has one Hessian per group). The same grid as round-to-nearest (symmetric, per
channel or per group, float16-exact scales), so the result stores and runs the same way; only the
codes are chosen to keep the layer's outputs, not its weights, close."""
from __future__ import annotations

import torch

from .grid import row_scale

ROWS = 8192  # output rows solved at once (an LM head's 32k-150k rows in steps)


def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int | None, *, mask: torch.Tensor | None = None,
         block: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int32 like w, scales (out,) or (out, groups)) for a weight whose flattened inputs have the
    Hessian `hessian`: (in, in), or (G, k, k) for a grouped convolution whose G groups of output
    channels each see their own k inputs (a depthwise convolution: one group per channel)."""

    if hessian.dim() == 2 and w.shape[0] > ROWS:  # rows are solved independently: a few at a time bound the memory
        parts = [gptq(w[i:i + ROWS], hessian, bits, group, mask=None if mask is None else mask[i:i + ROWS],
                      block=block, damp=damp) for i in range(0, w.shape[0], ROWS)]
        return torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])
    qmax = 2 ** (bits - 1) - 1
    H = hessian.detach().double()
    H = H.unsqueeze(0) if H.dim() == 2 else H
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
    H = H.clone()  # the caller's Hessian is left as it was; only the diagonal changes (damping)
    H.diagonal(dim1=-2, dim2=-1).copy_(diag + damp * diag.mean(-1)[:, None])
    L = _cholesky(H)
    del H  # each step frees the one before: an MLP's 10k-input Hessian is 0.8 GB in float64
    Hinv = torch.cholesky_inverse(L)
    del L
    U = torch.linalg.cholesky(Hinv, upper=True)
    del Hinv
    Hinv = U.float()
    del U
    if group is not None:
        block = max(group, block // group * group)  # groups never straddle two blocks
        scale = torch.empty(n_groups, rows, -(-cols // group))
    else:
        scale = row_scale(W.reshape(out, cols), bits).reshape(n_groups, rows)
    Q = torch.zeros_like(W)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        W1, Hinv1 = W[:, :, b0:b1].clone(), Hinv[:, b0:b1, b0:b1]
        Err1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            col = b0 + i
            if group is not None and col % group == 0:
                chunk = W1[:, :, i:i + group]
                scale[:, :, col // group] = row_scale(chunk.reshape(out, -1), bits).reshape(n_groups, rows)
            s = scale[:, :, col // group] if group is not None else scale
            q = torch.round(W1[:, :, i] / s).clamp(-qmax, qmax)
            if M is not None:
                q = q * M[:, :, col]
            Q[:, :, col] = q
            err = (W1[:, :, i] - q * s) / Hinv1[:, i, i].unsqueeze(1)
            W1[:, :, i:] -= err.unsqueeze(2) * Hinv1[:, i, i:].unsqueeze(1)
            Err1[:, :, i] = err
        W[:, :, b1:] -= Err1 @ Hinv[:, b0:b1, b1:]
    return Q.reshape(w.shape).to(torch.int32), scale.reshape(out, -1) if group is not None else scale.reshape(out)


def _cholesky(H: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factors of H (a batch of matrices), adding more damping to the diagonal if H is
    not positive definite."""
    mean = H.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None]
    for extra in (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        if extra:
            damped = H.clone()
            damped.diagonal(dim1=-2, dim2=-1).add_(extra * mean)
        L, info = torch.linalg.cholesky_ex(damped if extra else H)
        if int(info.abs().max()) == 0:
            return L
    raise ValueError("the calibration Hessian is not positive definite even after damping")
