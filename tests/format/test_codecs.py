import pytest
import torch

from modelpress.errors import CorruptStream
from modelpress.format.codecs import decode_tensor, encode_tensor
from modelpress.state import ParamState
from modelpress.techniques.quantize import quantize_tensor, symmetric_scale


def roundtrip(name, t, st):
    entry, streams = encode_tensor(name, t, st)
    return decode_tensor(name, entry, streams), entry, streams


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.bool, torch.uint8])
def test_raw_roundtrip_is_exact(dtype):
    t = (torch.randn(3, 5) * 10).to(dtype)
    out, entry, _ = roundtrip("x", t, None)
    assert entry["kind"] == "raw" and out.dtype == dtype and torch.equal(out, t)


def test_codebook_with_mask_roundtrip_is_exact_and_small():
    mask = torch.rand(300, 784) < 0.03
    cb = torch.linspace(-1, 1, 16).half().float()
    codes = torch.randint(0, 16, (300, 784))
    w = cb[codes] * mask
    st = ParamState(mask=mask, codebook=cb, codes=codes, bits=4)
    out, entry, streams = roundtrip("fc.weight", w, st)
    assert torch.equal(out, w) and entry["masked"]
    n = int(mask.sum())
    # mask at ~iid entropy + 4 bits per kept weight + the table
    from modelpress.format.entropy import mask_entropy_bits
    bound = (mask_entropy_bits(mask.numpy()) * 1.01 + 4 * n) / 8 + 32 + 16
    assert sum(map(len, streams.values())) <= bound


def test_quantized_roundtrip_is_exact_per_channel():
    w0 = torch.randn(64, 32, 3, 3)
    s = symmetric_scale(w0, 4)
    q = quantize_tensor(w0, s, 4)
    w = q.float() * s.reshape(-1, 1, 1, 1)
    out, entry, _ = roundtrip("conv.weight", w, ParamState(codes=q, scale=s, bits=4))
    assert entry["kind"] == "q" and not entry["masked"] and torch.equal(out, w)


def test_sparse_float_roundtrip():
    mask = torch.rand(50, 40) < 0.1
    w = torch.randn(50, 40) * mask
    out, entry, _ = roundtrip("w", w, ParamState(mask=mask))
    assert entry["kind"] == "sp" and torch.equal(out, w)


def test_bad_entries_are_refused():
    entry, streams = encode_tensor("w", torch.randn(4, 4), None)
    with pytest.raises(CorruptStream, match="elements"):
        decode_tensor("w", {**entry, "shape": [2 ** 20, 2 ** 20]}, streams)
    with pytest.raises(CorruptStream, match="bytes where"):
        decode_tensor("w", {**entry, "shape": [4, 5]}, streams)
    with pytest.raises(CorruptStream, match="dtype"):
        decode_tensor("w", {**entry, "dtype": "object"}, streams)
    with pytest.raises(CorruptStream, match="missing"):
        decode_tensor("w", entry, {})
    with pytest.raises(CorruptStream, match="kind"):
        decode_tensor("w", {**entry, "kind": "pickle"}, streams)


def test_codebook_code_out_of_range_is_refused():
    cb = torch.tensor([0.5, 1.0])
    codes = torch.tensor([0, 1, 1, 0])
    entry, streams = encode_tensor("w", cb[codes], ParamState(codebook=cb, codes=codes, bits=1))
    with pytest.raises(CorruptStream, match="codebook"):
        decode_tensor("w", {**entry, "k": 1}, {**streams, "w/table": streams["w/table"][:2]})


@pytest.mark.parametrize("density", [0.02, 0.5, 0.9])
def test_codebook_roundtrip_keeps_pruned_zeros_whichever_layout_wins(density):
    mask = torch.rand(8, 12) < density
    cb = torch.tensor([-0.75, 0.25, 0.5, 1.5])
    codes = torch.randint(0, 4, (8, 12))
    w = cb[codes] * mask
    out, entry, _ = roundtrip("w", w, ParamState(mask=mask, codebook=cb, codes=codes, bits=2))
    assert torch.equal(out == 0, ~mask) and torch.equal(out, w)


@pytest.mark.parametrize("density", [0.02, 0.5, 0.9])
def test_quantized_roundtrip_with_mask(density):
    mask = torch.rand(16, 10) < density
    w0 = torch.randn(16, 10) * mask
    s = symmetric_scale(w0, 3)
    q = quantize_tensor(w0, s, 3)
    w = q.float() * s[:, None] * mask
    out, _, _ = roundtrip("w", w, ParamState(mask=mask, codes=q, scale=s, bits=3))
    assert torch.equal(out, w)


def test_int8_tensor_is_entropy_coded_exactly_below_its_raw_size():
    t = torch.round(torch.randn(256, 128) * 20).clamp(-127, 127).to(torch.int8)
    out, entry, streams = roundtrip("w", t, None)
    assert entry["kind"] == "ent" and out.dtype == torch.int8 and torch.equal(out, t)
    assert sum(map(len, streams.values())) < 0.9 * t.numel()  # ~6.3 bits of entropy per value


def test_group_quantized_roundtrip_is_exact_with_a_short_last_group():
    from modelpress.techniques.quantize import group_scale

    w0 = torch.randn(16, 100)
    s = group_scale(w0, 4, 32)
    assert s.shape == (16, 4)  # 100 inputs: groups of 32, 32, 32, 4
    q = quantize_tensor(w0, s, 4, 32)
    from modelpress.state import broadcast_scale
    w = q.float() * broadcast_scale(s, w0, 32)
    out, entry, _ = roundtrip("w", w, ParamState(codes=q, scale=s, bits=4, group=32))
    assert entry["group"] == 32 and entry["nscale"] == 64 and torch.equal(out, w)
    entry["nscale"] = 16  # a per-channel count under a group layout is refused
    with pytest.raises(CorruptStream, match="scales"):
        decode_tensor("w", entry, roundtrip("w", w, ParamState(codes=q, scale=s, bits=4, group=32))[2])


def test_damaged_integer_entry_is_refused():
    t = torch.round(torch.randn(64, 64) * 20).to(torch.int8)
    entry, streams = encode_tensor("w", t, None)
    with pytest.raises(CorruptStream, match="min"):
        decode_tensor("w", {**entry, "min": -1000}, streams)
    with pytest.raises(CorruptStream, match="outside"):
        decode_tensor("w", {**entry, "min": 100}, streams)


def test_many_scales_are_coded_in_byte_planes_exactly():
    from modelpress.state import broadcast_scale
    from modelpress.techniques.quantize import group_scale

    w0 = torch.randn(64, 512)
    s = group_scale(w0, 4, 32)  # 1,024 scales of 8 significant bits
    q = quantize_tensor(w0, s, 4, 32)
    w = q.float() * broadcast_scale(s, w0, 32)
    out, entry, streams = roundtrip("w", w, ParamState(codes=q, scale=s, bits=4, group=32))
    assert entry["scale_planes"] and "w/scale" not in streams and torch.equal(out, w)
    assert len(streams["w/scale_hi"]) + len(streams["w/scale_lo"]) < 0.75 * 2 * s.numel()
    del streams["w/scale_lo"]  # damaged bytes are caught by the container's per-stream CRC
    with pytest.raises(CorruptStream, match="missing"):
        decode_tensor("w", entry, streams)
