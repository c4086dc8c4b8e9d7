"""Very sparse Linear layers kept and multiplied in CSR form."""
import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.runtime.sparse import SparseLinear, sparsify


def sparse_linear(n=1024, density=0.03, bias=True, seed=0):
    torch.manual_seed(seed)
    m = nn.Linear(n, n, bias=bias).eval()
    with torch.no_grad():
        m.weight.mul_(torch.rand(n, n) < density)
    return m


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1024), (64, 1024), (2, 5, 1024)])
def test_the_sparse_product_is_the_dense_layers(bias, shape):
    dense = sparse_linear(bias=bias)
    sparse = SparseLinear.from_linear(dense)
    assert sparse.values.numel() == int(torch.count_nonzero(dense.weight))
    assert torch.equal(sparse.dense_weight(), dense.weight)
    x = torch.randn(*shape)
    with torch.no_grad():
        y, want = sparse(x), dense(x)
    assert y.shape == want.shape
    assert torch.allclose(y, want, atol=1e-5, rtol=1e-5)  # the same sums in another order


def test_only_big_very_sparse_layers_are_replaced():
    model = nn.Sequential(sparse_linear(density=0.03), sparse_linear(density=0.2), sparse_linear(n=256, density=0.01))
    assert sparsify(model) == 1
    assert [type(m).__name__ for m in model] == ["SparseLinear", "Linear", "Linear"]


def test_a_pruned_file_loads_sparse_and_exports_dense(tmp_path):
    from modelpress.export import to_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)).eval()
    result = mp.compress(model, {"stages": [{"prune": {"sparsity": 0.97}}]}, calib_data=[torch.randn(8, 1024)])
    result.save(tmp_path / "p.mpz")
    loaded = mp.load(tmp_path / "p.mpz")
    assert isinstance(loaded[0], SparseLinear) and isinstance(loaded[2], nn.Linear)
    assert isinstance(mp.load(tmp_path / "p.mpz", packed=False)[0], nn.Linear)
    x = torch.randn(4, 1024)
    with torch.no_grad():
        assert torch.allclose(loaded(x), result.model(x), atol=1e-5)
    ort = pytest.importorskip("onnxruntime")
    path = to_onnx(loaded, tmp_path / "p.onnx", input_shape=(1, 1024))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), result.model(x).detach(), atol=1e-4)
