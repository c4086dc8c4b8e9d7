"""16-bit weights: Linear16 and Embedding16 store bf16 or fp16 (half the bytes of fp32). Linear16
multiplies in 16 bits where the CPU does so natively (bf16: AMX or AVX512_BF16; fp16: AMX-FP16),
accumulating in fp32, with fp32 inputs, bias and outputs; elsewhere it widens its weight to fp32 once
and computes in fp32, so it is never slower than the fp32 layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..capabilities import native
from .layouts import cached_layout

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Linear16(nn.Module):
    """A drop-in nn.Linear with a 16-bit weight (`precision`: "bf16" or "fp16") and an fp32 bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, precision: str = "bf16") -> None:
        super().__init__()
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {sorted(DTYPES)}, not {precision!r}")
        self.in_features, self.out_features, self.precision = in_features, out_features, precision
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=DTYPES[precision]))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"precision={self.precision}, native={native(self.precision)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # a training stage after this one: fp32 products, gradients to the 16-bit weight
            return F.linear(x.float(), self.weight.float(), self.bias).to(x.dtype)
        if x.dtype == self.weight.dtype:  # a 16-bit model (accelerate): one op, bias and activation fusable
            bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
            return F.linear(x, self.weight, bias)
        if native(self.precision):
            y = F.linear(x.to(self.weight.dtype), self.weight).float()
            return (y if self.bias is None else y.add_(self.bias)).to(x.dtype)
        widened = cached_layout(self, "fp32", lambda: self.weight.detach().float(), self.weight)
        return F.linear(x.float(), widened, self.bias).to(x.dtype)


class Embedding16(nn.Module):
    """A drop-in nn.Embedding with a 16-bit table (`precision`), rows widened to fp32 as they are gathered."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int = -1, precision: str = "bf16") -> None:
        super().__init__()
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {sorted(DTYPES)}, not {precision!r}")
        self.num_embeddings, self.embedding_dim, self.precision = num_embeddings, embedding_dim, precision
        self.padding_idx = padding_idx  # -1: none (an int, so that files describe it like any argument)
        self.weight = nn.Parameter(torch.zeros(num_embeddings, embedding_dim, dtype=DTYPES[precision]))
        self.compute_dtype = torch.float32  # what it returns; runtime.accelerate sets the model's

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, precision={self.precision}"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = None if self.padding_idx < 0 else self.padding_idx  # its row gets no gradient, as in nn.Embedding
        return F.embedding(ids, self.weight, pad).to(self.compute_dtype)
