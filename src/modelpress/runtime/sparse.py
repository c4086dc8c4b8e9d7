"""Very sparse Linear layers run as sparse products: SparseLinear holds a pruned weight's nonzeros in
CSR form (values, their columns, row offsets) and multiplies through torch's sparse kernel.

Where it pays, as `benchmarks/runtime.py --only sparse` measured it (random masks, 2 threads, Xeon
with AMX, torch 2.13): at 3% density a 768x3072 layer runs 1.72x faster than dense at batch 1 and 4.53x
at 64, a 2048x8192 one 2.91x and 6.73x; at 10% density it is slower at batch 1 (0.89-0.92x) and faster
at 64 (2.5-2.7x); at 30% it is no faster; a 784x300 layer is slower at batch 1 whatever the density.
So the rule, applied when a model is loaded: a Linear of a million weights or more with at most 5% of
them nonzero.
It also holds less: 12 bytes a nonzero against 4 bytes a weight.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import surgery
from .layouts import cached_layout

MIN_WEIGHTS = 1 << 20
MAX_DENSITY = 0.05


class SparseLinear(nn.Module):
    """A drop-in nn.Linear whose weight is kept and multiplied in CSR form."""

    def __init__(self, in_features: int, out_features: int, nnz: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("crow", torch.zeros(out_features + 1, dtype=torch.int64))
        self.register_buffer("col", torch.zeros(nnz, dtype=torch.int64))
        self.register_buffer("values", torch.zeros(nnz))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, m: nn.Linear) -> "SparseLinear":
        csr = m.weight.detach().float().to_sparse_csr()
        new = cls(m.in_features, m.out_features, int(csr.values().numel()), m.bias is not None)
        new.crow, new.col, new.values = csr.crow_indices().clone(), csr.col_indices().clone(), csr.values().clone()
        if m.bias is not None:
            new.bias = nn.Parameter(m.bias.detach().float().clone(), requires_grad=m.bias.requires_grad)
        return new

    def extra_repr(self) -> str:
        density = self.values.numel() / max(1, self.in_features * self.out_features)
        return f"in_features={self.in_features}, out_features={self.out_features}, density={density:.3f}"

    def dense_weight(self) -> torch.Tensor:
        return self._csr().to_dense()

    def _csr(self) -> torch.Tensor:
        return cached_layout(self, "csr", lambda: torch.sparse_csr_tensor(
            self.crow, self.col, self.values, (self.out_features, self.in_features)), self.crow, self.col, self.values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
            y = torch.nn.functional.linear(x2, self.dense_weight(), self.bias)  # graph paths take the dense form
        elif self.bias is None:
            y = torch.sparse.mm(self._csr(), x2.t()).t()
        else:
            y = torch.addmm(self.bias.unsqueeze(1), self._csr(), x2.t()).t()
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def sparsify(model: nn.Module) -> int:
    """Replace each nn.Linear of at least MIN_WEIGHTS weights, at most MAX_DENSITY of them nonzero, by a
    SparseLinear; returns how many. Weights shared with another layer stay dense."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    done, fixed = 0, surgery.fixed_layers(model)
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and name and name not in fixed and m.weight.numel() >= MIN_WEIGHTS \
                and counts.get(id(m.weight), 0) == 1:
            if int(torch.count_nonzero(m.weight)) <= MAX_DENSITY * m.weight.numel():
                surgery.replace(model, name, SparseLinear.from_linear(m))
                done += 1
    return done
