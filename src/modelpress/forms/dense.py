"""Dense: the tensor as it is (`raw`), or an int8/uint8/int16 tensor (a runtime layer's int8 weight) as
entropy-coded symbols (`ent`) where that is smaller. Nothing constrains its training."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import CorruptStream
from ..format.codecs import ENT_DTYPES, decoding, from_bytes, int_field, stream
from ..format.entropy import decode_symbols, encode_symbols
from ..state import ParamState, register_form


class Dense:
    name = "dense"
    file_kinds = ("raw", "ent")

    def encode(self, key: str, t: torch.Tensor, st: ParamState | None, entry: dict) -> tuple[dict, dict[str, bytes]]:
        raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).contiguous().numpy().tobytes()  # numpy: no bf16
        if t.dtype in ENT_DTYPES and t.numel() >= 64:
            lo = int(t.min())
            coded = encode_symbols((t.to(torch.int64) - lo).flatten().numpy())
            if len(coded) < len(raw):
                return {**entry, "kind": "ent", "min": lo}, {f"{key}/codes": coded}
        return {**entry, "kind": "raw"}, {f"{key}/data": raw}

    def decode(self, name: str, entry: dict, streams: dict[str, bytes], key: str, shape: tuple[int, ...],
               dtype: torch.dtype, numel: int) -> torch.Tensor:
        if entry["kind"] == "raw":
            return from_bytes(name, stream(streams, f"{key}/data"), dtype, numel).reshape(shape)
        info = torch.iinfo(dtype) if dtype in ENT_DTYPES else None
        if info is None:
            raise CorruptStream(f"tensor {name!r}: kind 'ent' needs an integer dtype of at most 16 bits")
        lo = int_field(name, entry, "min", info.min, info.max)
        with decoding(name, "codes do not decode"):
            symbols = decode_symbols(stream(streams, f"{key}/codes"), numel).astype(np.int64)
        values = torch.from_numpy(symbols) + lo
        if numel and int(values.max()) > info.max:
            raise CorruptStream(f"tensor {name!r}: a value is outside the range of {entry.get('dtype')}")
        return values.to(dtype).reshape(shape)

    def parametrize(self, st: ParamState, weight: torch.Tensor) -> nn.Module | None:
        return None

    def learned(self, st: ParamState, module: nn.Module, attr: str) -> None:
        pass


register_form(Dense())
