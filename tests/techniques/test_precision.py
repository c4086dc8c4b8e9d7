"""Low-precision compute: 16-bit Linear weights, 16-bit products where the CPU has them."""
import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.errors import ModelpressError
from modelpress.runtime import half
from modelpress.runtime.half import Linear16
from modelpress.techniques.precision import PrecisionConfig


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 8)).eval()


def compress(model, settings=None, **kw):
    return mp.compress(model, {"stages": [{"precision": settings or {}}]}, calib_data=[torch.randn(4, 64)], **kw)


def test_the_recipe_parses_and_refuses_other_dtypes():
    r = mp.Recipe.from_yaml("stages: [{precision: {dtype: fp16}}]")
    assert isinstance(r.stages[0], PrecisionConfig) and r.stages[0].dtype == "fp16"
    with pytest.raises(mp.RecipeError, match="dtype"):
        mp.Recipe.from_yaml("stages: [{precision: {dtype: int4}}]")


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_weights_halve_and_the_file_round_trips(tmp_path, dtype, torch_dtype):
    model = mlp()
    result = compress(model, {"dtype": dtype})
    layers = [m for m in result.model.modules() if isinstance(m, Linear16)]
    assert len(layers) == 2 and all(m.weight.dtype == torch_dtype for m in layers)
    assert torch.equal(layers[0].weight, model[0].weight.detach().to(torch_dtype))
    fp32, file = result.report.rows[0].bytes, result.report.rows[-1].bytes
    assert fp32 // 2 < file <= fp32 // 2 + 1024  # half the weights' bytes (biases stay fp32) plus the header
    path = tmp_path / "m.mpz"
    result.save(path)
    x = torch.randn(32, 64)
    loaded = mp.load(path)
    assert torch.equal(loaded(x), result.model(x))
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(loaded(x), model(x))
    assert float(cos.min()) > 0.999


def test_both_paths_compute_the_same_product_up_to_16_bit_rounding(monkeypatch):
    result = compress(mlp())
    x = torch.randn(16, 64)
    with torch.no_grad():
        native = result.model(x)
        monkeypatch.setattr(half, "native", lambda p: False)  # the fp32 path, as on a CPU without bf16
        widened = result.model(x)
        w, b = result.model[0].weight.float(), result.model[0].bias
    assert torch.allclose(result.model[0](x), x @ w.T + b, atol=1e-5)  # fp32 from the 16-bit weight, exactly
    assert torch.allclose(native, widened, rtol=2e-2, atol=2e-2)


def test_compressed_layers_and_shared_weights_stay_and_are_named(caplog):
    model = mlp()
    result = mp.compress(model, {"stages": [{"prune": {"sparsity": 0.5, "exclude": ["2"]}}, {"precision": {}}]},
                         calib_data=[torch.randn(4, 64)])
    assert isinstance(result.model[0], nn.Linear) and isinstance(result.model[2], Linear16)
    assert "stay as they are" in caplog.text and "0" in caplog.text
    with pytest.raises(ModelpressError, match="no Linear layer or embedding"):
        compress(mlp(), {"exclude": ["*"]})


def test_a_training_stage_after_it_trains_the_16_bit_weights():
    model = mlp()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 64, generator=g), torch.randint(0, 8, (16,), generator=g)) for _ in range(4)]
    result = mp.compress(model, {"stages": [{"precision": {}}, {"finetune": {"epochs": 2, "lr": 1e-2}}]},
                         train_data=data)
    assert result.model[0].weight.dtype == torch.bfloat16
    assert not torch.equal(result.model[0].weight, model[0].weight.detach().bfloat16())


def test_a_transformer_gets_16_bit_embeddings_too_and_rebuilds_from_its_file(tmp_path, tiny_bert):
    from modelpress.runtime.half import Embedding16

    model = tiny_bert()
    ids = torch.randint(0, 200, (4, 16))
    result = mp.compress(model, {"stages": [{"precision": {}}]}, calib_data=[{"input_ids": ids}])
    emb = result.model.embeddings.word_embeddings
    assert isinstance(emb, Embedding16) and emb.padding_idx == 0 and emb.weight.dtype == torch.bfloat16
    assert result.report.rows[-1].bytes < 0.55 * result.report.rows[0].bytes
    path = tmp_path / "bert.mpz"
    result.save(path)
    with torch.no_grad():
        out = mp.load(path)(input_ids=ids).last_hidden_state
        assert torch.equal(out, result.model(input_ids=ids).last_hidden_state)
        cos = torch.nn.functional.cosine_similarity(out.flatten(1), model(input_ids=ids).last_hidden_state.flatten(1))
    assert float(cos.min()) > 0.999
    kept = mp.compress(model, {"stages": [{"precision": {"embeddings": False}}]}, calib_data=[{"input_ids": ids}])
    assert type(kept.model.embeddings.word_embeddings) is nn.Embedding
