"""ONNX export: onnxruntime runs the graph and agrees with the PyTorch model it came from."""
import numpy as np
import pytest
import torch

import modelpress as mp
from modelpress.export import to_onnx

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
transformers = pytest.importorskip("transformers")


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_int8_transformer_exports_as_integer_matmuls(tmp_path):
    from test_transformers import batches, bert

    result = mp.compress(bert(), "int8", calib_data=batches())
    path = to_onnx(result.model, tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "MatMulInteger" in ops
    x = batches(1, seq=10)[0]  # another sequence length than the traced one: dynamic axes
    x["token_type_ids"] = torch.zeros_like(x["input_ids"])
    got = session(path).run(None, {k: v.numpy() for k, v in x.items()})[0]
    with torch.no_grad():
        want = result.model(**x).last_hidden_state.numpy()
    assert got.shape == want.shape
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() > 0.9999


def test_plain_model_exports_with_an_input_shape(tmp_path):
    from modelpress.data import lenet5

    model = lenet5().eval()
    path = to_onnx(model, tmp_path / "lenet.onnx", input_shape=(1, 1, 28, 28))
    x = torch.randn(5, 1, 28, 28)
    got = session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(got, model(x).numpy(), atol=1e-5)


def test_a_loaded_model_with_packed_low_bit_layers_exports_their_float_weights(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)).eval()
    result = mp.compress(model, {"stages": [{"quantize": {"bits": 4, "group_size": 64, "method": "rtn"}}]},
                         calib_data=[torch.randn(8, 256)])
    result.save(tmp_path / "m.mpz")
    loaded = mp.load(tmp_path / "m.mpz")  # PackedLinear: torch's int4 kernel at batch 1 where bf16 is native
    path = to_onnx(loaded, tmp_path / "m.onnx", input_shape=(1, 256))
    x = torch.randn(3, 256)
    got = session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = result.model(x).numpy()  # the file's weights in fp32
    assert np.abs(got - want).max() < 1e-4
