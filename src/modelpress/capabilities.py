"""What this CPU computes natively, read once at import from torch: the runtime picks its kernels by
these flags (never by timing), and benchmarks print them. Plain constants, so that code compiled by
torch.compile reads them without tracing into torch.cpu."""
from __future__ import annotations

import torch


def _flag(name: str) -> bool:
    return bool(getattr(torch.cpu, name, lambda: False)())


# amx (int8/bf16 tiles), avx512_bf16, amx_fp16, vnni (AVX512-VNNI or AVX-VNNI), avx512, avx2
FLAGS: dict[str, bool] = {
    "amx": _flag("_is_amx_tile_supported"), "avx512_bf16": _flag("_is_avx512_bf16_supported"),
    "amx_fp16": _flag("_is_amx_fp16_supported"), "vnni": _flag("_is_vnni_supported"),
    "avx512": _flag("_is_avx512_supported"), "avx2": _flag("_is_avx2_supported")}
NATIVE_BF16 = FLAGS["amx"] or FLAGS["avx512_bf16"]  # elsewhere bf16 is emulated and slower than fp32


def native_bf16() -> bool:
    """bf16 products in hardware (AMX or AVX512_BF16)."""
    return NATIVE_BF16


def native(precision: str) -> bool:
    """True where this CPU multiplies in `precision` ("bf16" or "fp16") natively."""
    return NATIVE_BF16 if precision == "bf16" else FLAGS["amx_fp16"]

