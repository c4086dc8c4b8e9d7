"""Low-bit weights that stay low-bit in memory: PackedLinear and PackedEmbedding hold a grid-quantized
weight (integer codes times a scale per output channel or per group of inputs, as the file stores it)
as packed codes, two 4-bit codes a byte for 2-4 bits, one byte for 5-8 bits, and decompress inside the
product, so resident memory tracks the file rather than fp32.

How a PackedLinear multiplies, by rule on its shape and the rows it is given (never by timing):
- few rows (decoding, batch 1), on layers of 65k weights or more: torch's weight-only kernels read the
  codes directly, int4 x bf16 for <= 4 bits in groups of 32-256, int8 x bf16 for 8 bits per channel.
  Memory-bound at batch 1: 2.3-2.7x fp32 on 768x3072 and 2048x8192 layers on a Xeon with AMX; 2.4-4.8x
  (int4) and 1.7-2.7x (int8) on a Xeon with AVX-512 and no native bf16, where up to 128 rows the int4
  kernel stays at 0.4-1.5x fp32 against 0.1-0.4x for unpacking per call, hence FEW_ROWS = 128 there
  (16 with native bf16, as set on the AMX Xeon, where the unpacked product runs in bf16). The int4
  kernel's layout is how the codes are kept (PackedLinear with groups of 32-256: `to_planes`). Not
  measured on an AVX2-only CPU, where the same rule applies;
- layers under a million weights otherwise: a kept fp32 copy (small, and never slower than the fp32 layer);
- otherwise the weight is decompressed for the call, to bf16 where the CPU multiplies bf16 natively,
  else fp32, and multiplied. At 64 rows this is slower than an fp32 layer would be (0.3-0.7x on the
  layers above): the price of keeping the weight packed.
The fp32 paths compute exactly what the dequantized fp32 layer computes; the bf16 ones round inputs and
weights to bf16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..capabilities import native_bf16
from .layouts import cached_layout, keep_small_layer_weight, small_layer_weight

SMALL_WEIGHT = 1 << 20  # weights: below this a layer without 4-bit planes keeps an fp32 copy
FEW_ROWS = 16 if native_bf16() else 128  # rows: at most this many take a weight-only kernel...
TINY_WEIGHT = 1 << 16   # ...on a layer at least this big (below, the kept fp32 weight is faster)
INT4_GROUPS = (32, 64, 128, 256)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes (rows, cols) in [-(2**(bits-1)-1), 2**(bits-1)-1] as bytes: two offset-by-8 4-bit codes
    a byte (even column low) for bits <= 4, else one int8 each."""
    if bits > 4:
        return q.to(torch.int8).contiguous()
    u = (q + 8).to(torch.uint8)
    if u.shape[1] % 2:
        u = F.pad(u, (0, 1), value=8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack(p: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The codes `pack` stored, as int8 (rows, cols)."""
    if bits > 4:
        return p
    both = torch.stack((p & 15, p >> 4), dim=2).reshape(p.shape[0], -1)[:, :cols]
    return both.to(torch.int8) - 8


def to_planes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes (rows, cols) as 4-bit planes in the layout of torch's int4 x bf16 CPU kernel, rows padded
    to a multiple of 64 with code 0: one plane (code + 8) for bits <= 4, else two, q = 16 x (hi - 8) + lo."""
    rows = q.shape[0]
    q = F.pad(q.to(torch.int32), (0, 0, 0, -rows % 64))
    planes = [q + 8] if bits <= 4 else [q & 15, (q >> 4) + 8]  # (floor division by 16: hi in [-8, 7])
    return torch.stack([torch.ops.aten._convert_weight_to_int4pack_for_cpu(p, 1) for p in planes])


def from_planes(planes: torch.Tensor, rows: int) -> torch.Tensor:
    """The signed codes (rows, cols) `to_planes` stored, as int16. The kernel's layout holds, for each block
    of 64 rows and each column, 32 bytes: row j of the block in the low nibble of byte j, row 32 + j in
    the high one."""
    n, rows_pad, half = planes.shape
    v = planes.reshape(n, rows_pad // 64, 2 * half, 32)
    u = torch.cat((v & 15, v >> 4), dim=3).transpose(2, 3).reshape(n, rows_pad, 2 * half)[:, :rows].to(torch.int16)
    return u[0] - 8 if n == 1 else (u[1] - 8) * 16 + u[0]


def dequantize(codes: torch.Tensor, scale: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """codes (rows, cols) times a per-row scale (rows,) or per-group scale (rows, ceil(cols / group))."""
    rows, cols = codes.shape
    if scale.dim() == 1:
        return (codes.to(dtype) * scale.to(dtype).unsqueeze(1)).contiguous()
    full = -(-cols // group) * group
    c = F.pad(codes, (0, full - cols)) if full != cols else codes
    w = c.reshape(rows, -1, group).to(dtype) * scale.to(dtype).unsqueeze(2)
    return w.reshape(rows, full)[:, :cols].contiguous()  # (the layout decides the GEMM kernel, hence the bits)


class _Packed(nn.Module):
    """Codes, scales and the shape they decode to; `dequantized()` is the weight exactly as the file's."""

    def __init__(self, rows: int, cols: int, bits: int, group: int, planes: bool = False) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be 2-8, not {bits}")
        self.rows, self.cols, self.bits, self.group = rows, cols, bits, group  # group 0: per row
        self.planes = planes  # codes in the int4 kernel's layout (PackedLinear), else packed rows
        if planes:
            shape, dtype = (1 if bits <= 4 else 2, rows + -rows % 64, cols // 2), torch.uint8
        else:
            shape, dtype = (rows, -(-cols // 2) if bits <= 4 else cols), torch.uint8 if bits <= 4 else torch.int8
        self.register_buffer("codes", torch.zeros(shape, dtype=dtype))
        self.register_buffer("scale", torch.ones(rows, -(-cols // group)) if group else torch.ones(rows))

    def set_codes(self, q: torch.Tensor, scale: torch.Tensor) -> "_Packed":
        self.codes = to_planes(q, self.bits) if self.planes else pack(q, self.bits)
        self.scale = scale.detach().float().reshape(self.scale.shape).clone()
        return self

    def signed_codes(self) -> torch.Tensor:
        return from_planes(self.codes, self.rows) if self.planes else unpack(self.codes, self.bits, self.cols)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.signed_codes(), self.scale, self.group, dtype)


class PackedLinear(_Packed):
    """A drop-in nn.Linear whose weight stays packed (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4, group: int = 0) -> None:
        super().__init__(out_features, in_features, bits, group,
                         planes=group in INT4_GROUPS and in_features % group == 0)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group={self.group or 'per channel'}")

    def kernel(self, rows: int) -> str:
        """"int4" or "int8" (weight-only kernels), "fp32" (the kept fp32 weight) or "unpack" (per call)."""
        weight = self.in_features * self.out_features
        small = weight < SMALL_WEIGHT
        if rows <= FEW_ROWS and weight >= TINY_WEIGHT:
            if self.planes:
                return "int4"
            if self.bits > 4 and not self.group and self.in_features % 64 == 0:  # (other widths: wrong sums)
                return "int8"
        return "fp32" if small else "unpack"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = small_layer_weight(self, x)  # small layers: one op, as in nn.Linear
        if w is not None:
            return F.linear(x, w, self.bias)
        if torch.compiler.is_compiling():  # weight freezing folds the dequantized weight into a constant
            return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        x2 = x.reshape(-1, self.in_features)
        kernel = self.kernel(x2.shape[0])
        if torch.is_grad_enabled() and kernel in ("int4", "int8"):
            kernel = "unpack"  # a differentiable path
        if kernel == "int4":  # (each op here costs as much as the product itself at batch 1: few of them)
            xb, sz, codes = x2.to(torch.bfloat16), self._scales_and_zeros(), self._buffers["codes"]
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, codes[0], self.group, sz[0])
            if len(codes) == 2:
                y += torch.ops.aten._weight_int4pack_mm_for_cpu(xb, codes[1], self.group, sz[1])
            if y.shape[1] != self.out_features:
                y = y[:, :self.out_features]
            y = self._plus_bias(y)
        elif kernel == "int8":
            y = self._plus_bias(torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.codes, self._bf16_scale()))
        elif kernel == "fp32":
            w = cached_layout(self, "fp32", self.dequantized, self.codes, self.scale)
            if self.kernel(1) == "fp32":  # every row count takes it: the one-op path
                keep_small_layer_weight(self, ("codes", "scale"), w)
            y = F.linear(x2.float(), w, None if self.bias is None else self.bias.float())
        elif native_bf16() and not torch.is_grad_enabled():
            y = self._plus_bias(F.linear(x2.to(torch.bfloat16), self.dequantized(torch.bfloat16)))
        else:
            y = F.linear(x2.float(), self.dequantized(), None if self.bias is None else self.bias.float())
        if x.dim() != 2:
            y = y.reshape(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _plus_bias(self, y: torch.Tensor) -> torch.Tensor:
        """A bf16 product plus the bias, in the bias's dtype (one op)."""
        return y.float() if self.bias is None else torch.add(self.bias, y)

    def _bf16_scale(self) -> torch.Tensor:
        return cached_layout(self, "bf16 scale", lambda: self.scale.to(torch.bfloat16), self.scale)

    def _scales_and_zeros(self) -> torch.Tensor:
        """Per plane, (groups, padded rows, 2) bf16 scale and offset, as the int4 kernel takes them:
        w = (stored - 8) x scale + offset; the low plane of two holds q mod 16, so its offset is 8 x scale."""
        def build() -> torch.Tensor:
            s = F.pad(self.scale, (0, 0, 0, -self.rows % 64)).t()
            zero = torch.zeros_like(s)
            pairs = [(s, zero)] if self.codes.shape[0] == 1 else [(s, 8 * s), (16 * s, zero)]
            return torch.stack([torch.stack(p, dim=2) for p in pairs]).to(torch.bfloat16).contiguous()
        return cached_layout(self, "scales", build, self.scale)


class PackedEmbedding(_Packed):
    """A drop-in nn.Embedding whose table stays packed: rows are decompressed as they are gathered."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int = -1, bits: int = 8,
                 group: int = 0) -> None:
        super().__init__(num_embeddings, embedding_dim, bits, group)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.compute_dtype = torch.float32  # what it returns; runtime.accelerate sets the model's

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group={self.group or 'per row'}"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)  # (an id out of range fails in the indexing below, as in nn.Embedding)
        rows = dequantize(unpack(self.codes[flat], self.bits, self.cols), self.scale[flat], self.group,
                          torch.float32)
        return rows.reshape(*ids.shape, self.embedding_dim).to(self.compute_dtype)


def packable(module: nn.Module) -> bool:
    """An nn.Linear, or an nn.Embedding without max_norm or sparse gradients, that `packed_layer` replaces."""
    if type(module) is nn.Linear:
        return True
    return type(module) is nn.Embedding and module.max_norm is None and not module.sparse \
        and not module.scale_grad_by_freq


def packed_layer(module: nn.Module, grid, bias: torch.Tensor | None) -> nn.Module:
    """The PackedLinear / PackedEmbedding for `module` holding `grid` (a `forms.grid.GridWeight`: codes
    and scales as the file stores them) and `bias`."""
    rows, cols = grid.codes.shape
    scale = grid.scale.float()
    if not grid.group and scale.numel() == 1:  # one scale for the tensor: a row's each
        scale = scale.reshape(1).expand(rows)
    if isinstance(module, nn.Linear):
        new: _Packed = PackedLinear(cols, rows, bias is not None, grid.bits, grid.group)
        if bias is not None:
            new.bias = nn.Parameter(bias, requires_grad=False)
    else:
        pad = -1 if module.padding_idx is None else int(module.padding_idx)
        new = PackedEmbedding(rows, cols, pad, grid.bits, grid.group)
    return new.set_codes(grid.codes, scale)

