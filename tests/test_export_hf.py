"""HF export in compressed-tensors' pack-quantized layout: read back by transformers' own loader."""
import json

import pytest
import torch

import modelpress as mp
from modelpress.errors import ModelpressError
from modelpress.export_hf import pack_int32, to_hf

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")


def _llama(tied: bool):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg).eval()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 256, (4, 16), generator=g)} for _ in range(3)]


def test_packing_is_compressed_tensors_packing():
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    g = torch.Generator().manual_seed(0)
    for bits in range(1, 9):
        for cols in (1, 31, 77, 128):
            codes = torch.randint(-(1 << bits - 1), 1 << bits - 1, (5, cols), generator=g).to(torch.int8)
            packed = pack_int32(codes, bits)
            assert packed.shape == (5, -(-cols * bits // 32))
            assert torch.equal(unpack_from_int32(packed, bits, codes.shape), codes), (bits, cols)


@pytest.mark.parametrize("tied,yaml", [
    (True, "{bits: 4, group_size: 16, method: gptq, avg_bits: 4.4, sensitivity: layer}"),
    (False, "{bits: 3, method: rtn}"),
    (False, "{bits: 4, group_size: 32, method: gptq, embeddings: false}"),
])
def test_transformers_loads_the_same_model(tmp_path, tied, yaml):
    recipe = mp.Recipe.from_yaml(f"stages:\n  - quantize: {yaml}\n")
    result = mp.compress(_llama(tied), recipe, calib_data=_batches())
    result.save(tmp_path / "m.mpz")
    ours = mp.load(tmp_path / "m.mpz")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")  # a user's file beside: kept
    to_hf(ours, tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == "{}"
    q = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    widths = {g["weights"]["num_bits"] for g in q["config_groups"].values()}
    targets = [t for g in q["config_groups"].values() for t in g["targets"]]
    packed = [n for n, m in ours.named_modules() if type(m).__name__ == "PackedLinear"]
    assert len(targets) == len(packed) >= 14 and q["format"] == "pack-quantized"
    if "avg_bits" in yaml:
        assert len(widths) > 1  # per-layer bits kept, one config group per width
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = _batches()[0]
    with torch.no_grad():
        a, b = ours(**ids).logits, theirs(**ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()


def test_export_refuses_what_it_cannot_write(tmp_path, monkeypatch):
    with pytest.raises(ModelpressError, match="Hugging Face model"):
        to_hf(torch.nn.Sequential(torch.nn.Linear(4, 4)), tmp_path / "x")
    with pytest.raises(ModelpressError, match="no quantized Linear"):
        to_hf(_llama(False), tmp_path / "x")
    result = mp.compress(_llama(False), "stages:\n  - quantize: {bits: 4, group_size: 16, method: rtn}\n")
    result.save(tmp_path / "m.mpz")
    model = mp.load(tmp_path / "m.mpz")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelpressError, match="already holds other weights"):
        to_hf(model, tmp_path / "other")
    to_hf(model, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        to_hf(model, tmp_path / "hf")
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before  # nothing half-written


def test_cli_exports_a_folder_transformers_loads(tmp_path):
    from typer.testing import CliRunner

    from modelpress.cli import app

    result = mp.compress(_llama(True), "stages:\n  - quantize: {bits: 4, group_size: 32, method: rtn}\n")
    result.save(tmp_path / "m.mpz")
    out = CliRunner().invoke(app, ["export", str(tmp_path / "m.mpz"), "--hf", str(tmp_path / "hf")])
    assert out.exit_code == 0, out.output
    size = (tmp_path / "hf" / "model.safetensors").stat().st_size
    assert f"{size:,} bytes" in out.output
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = _batches()[0]
    with torch.no_grad():
        assert torch.allclose(mp.load(tmp_path / "m.mpz")(**ids).logits, theirs(**ids).logits, atol=1e-5, rtol=0)
