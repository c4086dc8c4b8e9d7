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


@pytest.mark.parametrize("nbits,op,bound", [(False, "MatMulInteger", 0.9999), (True, "MatMulNBits", 0.999)])
def test_int8_transformer_exports_as_integer_matmuls(tmp_path, nbits, op, bound):
    from test_transformers import batches, bert

    result = mp.compress(bert(), "int8", calib_data=batches())
    path = to_onnx(result.model, tmp_path / "m.onnx", nbits=nbits)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    layers = sum(type(m).__name__ == "Int8Linear" for m in result.model.modules())
    assert layers > 1 and ops.count(op) == layers - 1  # each int8 layer but the pooler (not on the output path)
    x = batches(1, seq=10)[0]  # another sequence length than the traced one: dynamic axes
    x["token_type_ids"] = torch.zeros_like(x["input_ids"])
    got = session(path).run(None, {k: v.numpy() for k, v in x.items()})[0]
    with torch.no_grad():
        want = result.model(**x).last_hidden_state.numpy()
    assert got.shape == want.shape
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() > bound  # MatMulNBits quantizes activations per block of inputs, ours per token


def test_plain_model_exports_with_an_input_shape(tmp_path):
    from modelpress.data import lenet5

    model = lenet5().eval()
    path = to_onnx(model, tmp_path / "lenet.onnx", input_shape=(1, 1, 28, 28))
    x = torch.randn(5, 1, 28, 28)
    got = session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(got, model(x).numpy(), atol=1e-5)


@pytest.mark.parametrize("bits,group", [(4, 64), (3, 64), (6, 32), (4, None)])
def test_a_loaded_models_packed_layers_export_as_matmulnbits_with_the_files_codes(tmp_path, bits, group):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(200, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)).eval()
    q = {"bits": bits, "method": "rtn"} | ({"group_size": group} if group else {})
    result = mp.compress(model, {"stages": [{"quantize": q}]}, calib_data=[torch.randn(8, 200)])
    result.save(tmp_path / "m.mpz")
    loaded = mp.load(tmp_path / "m.mpz")  # PackedLinear: torch's int4 kernel at batch 1 where bf16 is native
    x = torch.randn(3, 200)
    with torch.no_grad():
        want = result.model(x).numpy()  # the file's weights in fp32
    for nbits in (True, False):
        path = to_onnx(loaded, tmp_path / f"m{nbits}.onnx", input_shape=(1, 200), nbits=nbits)
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert ("MatMulNBits" in ops) == nbits
        got = session(path).run(None, {"input": x.numpy()})[0]
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < (2e-2 if nbits else 1e-6)  # int8 activations per block / the float weights exactly


def test_the_cli_exports_with_the_input_recorded_at_compress_time(tmp_path):
    from typer.testing import CliRunner

    from modelpress.cli import app
    from modelpress.data import lenet_300_100

    torch.manual_seed(0)
    x = torch.randn(8, 784)
    result = mp.compress(lenet_300_100().eval(), "int8", calib_data=[x])
    assert result.manifest["meta"]["input"] == {"shape": [1, 784], "dtype": "float32"}
    result.save(tmp_path / "m.mpz")
    out = CliRunner().invoke(app, ["export", str(tmp_path / "m.mpz"), "--onnx", str(tmp_path / "m.onnx")])
    assert out.exit_code == 0, out.output
    got = session(tmp_path / "m.onnx").run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = mp.load(tmp_path / "m.mpz")(x).numpy()
    # the graph quantizes every layer's inputs per token; eager layers this small multiply in fp32
    assert np.linalg.norm(got - want) < 2e-2 * np.linalg.norm(want)


def test_without_a_recorded_input_the_error_suggests_the_models_own_shape():
    from modelpress.data import lenet_300_100
    from modelpress.errors import ModelpressError

    with pytest.raises(ModelpressError, match=r"--input-shape 1,784$"):
        to_onnx(lenet_300_100(), "never.onnx")
