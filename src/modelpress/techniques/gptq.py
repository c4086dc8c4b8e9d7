"""GPTQ (Frantar et al., 2022): quantize a Linear weight one input column at a time and spread each
column's rounding error over the columns not yet quantized, in proportion to the inverse Hessian
H = 2 X^T X of the layer's calibration inputs. The same grid as round-to-nearest (symmetric, per
channel or per group, float16-exact scales), so the result stores and runs the same way; only the
codes are chosen to keep the layer's outputs, not its weights, close."""
from __future__ import annotations

import torch

from .grid import row_scale


def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int | None, *, mask: torch.Tensor | None = None,
         block: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int32 like w, scales (out,) or (out, groups)) for a 2-D weight and its (in, in) Hessian."""

    qmax = 2 ** (bits - 1) - 1
    W = w.detach().float().clone()
    out, cols = W.shape
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if mask is not None:
        W = W * mask
    H += damp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    Hinv = _upper_inverse_cholesky(H).float()
    if group is not None:
        block = max(group, block // group * group)  # groups never straddle two blocks
        scale = torch.empty(out, -(-cols // group))
    else:
        scale = row_scale(W, bits)
    Q = torch.zeros_like(W)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        W1, Hinv1 = W[:, b0:b1].clone(), Hinv[b0:b1, b0:b1]
        Err1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            col = b0 + i
            if group is not None and col % group == 0:
                scale[:, col // group] = row_scale(W1[:, i:i + group], bits)
            s = scale[:, col // group] if group is not None else scale
            q = torch.round(W1[:, i] / s).clamp(-qmax, qmax)
            if mask is not None:
                q = q * mask[:, col]
            Q[:, col] = q
            err = (W1[:, i] - q * s) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]
    return Q.to(torch.int32), scale


def _upper_inverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of H^-1, adding more damping if H is not positive definite."""
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    mean = float(torch.diag(H).mean())
    for extra in (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        L, info = torch.linalg.cholesky_ex(H + extra * mean * eye)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    raise ValueError("the calibration Hessian is not positive definite even after damping")
