"""Low-bit weights kept packed in memory: exact storage, each multiply path against the fp32 layer."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelpress as mp
from modelpress.capabilities import native_bf16
from modelpress.runtime.packed import PackedEmbedding, PackedLinear, dequantize, pack, unpack


def codes(rows, cols, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    qmax = 2 ** (bits - 1) - 1
    return torch.randint(-qmax, qmax + 1, (rows, cols), generator=g)


def layer(in_f, out_f, bits, group, seed=0):
    q = codes(out_f, in_f, bits, seed)
    scale = torch.rand(out_f, -(-in_f // group)) + 0.1 if group else torch.rand(out_f) + 0.1
    m = PackedLinear(in_f, out_f, True, bits, group).set_codes(q, scale / 64)
    m.bias.data = torch.randn(out_f)
    return m.eval()


def rel_err(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("cols", [7, 64])
def test_pack_round_trips_and_takes_half_a_byte_up_to_4_bits(bits, cols):
    q = codes(5, cols, bits)
    p = pack(q, bits)
    assert torch.equal(unpack(p, bits, cols).long(), q)
    assert p.numel() == 5 * (-(-cols // 2) if bits <= 4 else cols)


def test_small_layers_compute_exactly_the_dequantized_fp32_layer():
    m = layer(200, 96, 4, 64)  # 200 is no multiple of the group: the last group is short
    w = dequantize(codes(96, 200, 4), m.scale, 64, torch.float32)
    assert torch.equal(m.dequantized(), w)
    with torch.no_grad():
        for rows in (1, 64):
            x = torch.randn(rows, 200)
            assert torch.equal(m(x), F.linear(x, w, m.bias))
            assert torch.equal(m(x), F.linear(x, w, m.bias))  # again, through the kept fp32 weight


@pytest.mark.parametrize("bits,group,rows,kernel", [(4, 64, 1, "int4"), (3, 128, 8, "int4"), (8, 0, 1, "int8"),
                                                    (4, 64, 256, "unpack")])
def test_big_layers_agree_with_fp32_on_every_path(bits, group, rows, kernel):
    m = layer(1024, 1024, bits, group)
    assert m.kernel(rows) == kernel  # on every CPU: the weight-only kernels read bf16 inputs
    x = torch.randn(rows, 1024)
    with torch.no_grad():
        y = m(x)
    assert rel_err(y, F.linear(x, m.dequantized(), m.bias)) < (1e-2 if native_bf16() or kernel != "unpack" else 1e-6)


def test_embedding_gathers_exact_rows_and_refuses_bad_ids():
    q, scale = codes(50, 16, 8), torch.rand(50) + 0.1
    e = PackedEmbedding(50, 16, -1, 8, 0).set_codes(q, scale)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    assert torch.equal(e(ids), F.embedding(ids, q.float() * scale[:, None]))
    with pytest.raises(IndexError, match="out of bounds"):
        e(torch.tensor([50]))


def test_load_keeps_low_bit_layers_packed(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(100, 64), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    recipe = {"stages": [{"quantize": {"bits": 4, "group_size": 32, "method": "rtn", "embeddings": True}}]}
    result = mp.compress(model, recipe, calib_data=[torch.randint(0, 100, (8, 5))])
    path = tmp_path / "m.mpz"
    result.save(path)
    loaded = mp.load(path)
    assert [type(m).__name__ for m in loaded] == ["PackedEmbedding", "PackedLinear", "ReLU", "PackedLinear"]
    assert loaded[1].codes.dtype == torch.uint8 and loaded[1].codes.numel() == 128 * 64 // 2
    ids = torch.randint(0, 100, (4, 5))
    with torch.no_grad():
        assert torch.equal(loaded(ids), result.model(ids))
        assert torch.equal(mp.load(path, packed=False)(ids), result.model(ids))
    assert isinstance(mp.load(path, packed=False)[1], nn.Linear)


class UserNet(nn.Module):
    """A user's own class: loaded into a skeleton, its low-bit layers still come back packed."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 256), nn.GELU())
        self.head = nn.Linear(256, 8)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return self.head(self.body(x)) * self.scale


def test_a_skeleton_of_the_users_class_gets_packed_layers(tmp_path):
    torch.manual_seed(0)
    model = UserNet().eval()
    result = mp.compress(model, {"stages": [{"quantize": {"bits": 3, "group_size": 64, "method": "gptq"}}]},
                         calib_data=[torch.randn(16, 64) for _ in range(2)])
    path = tmp_path / "u.mpz"
    result.save(path)
    loaded = mp.load(path, model=UserNet())
    assert isinstance(loaded.body[0], PackedLinear) and isinstance(loaded.head, PackedLinear)
    assert loaded.head.planes and loaded.head.bits == 3 and loaded.head.group == 64  # kept as 4-bit planes
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
