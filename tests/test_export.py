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
