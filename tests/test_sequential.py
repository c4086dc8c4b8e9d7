"""Block-by-block compression of a decoder folder writes the very file whole-model compression writes."""
import json
import re

import pytest
import torch

import modelpress as mp
from modelpress.errors import ModelpressError
from modelpress.sequential import Checkpoint, compress_sequential

transformers = pytest.importorskip("transformers")


def _folder(tmp_path, tied: bool, layers: int = 3, bias: bool = False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied, attention_bias=bias)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def _batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(3):
        ids = torch.randint(0, 256, (4, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 11:] = 0  # one padded row: the mask reaches the blocks as in the whole model
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.mark.parametrize("tied,yaml,bias", [
    (True, "{bits: 4, group_size: 16, method: gptq, avg_bits: 4.4, sensitivity: layer}", False),
    (False, "{bits: 4, group_size: 16, method: gptq, avg_bits: 4.4, sensitivity: layer}", False),
    (False, "{bits: 3, method: rtn}", False),
    (False, "{bits: 4, group_size: 32, method: gptq, budget_mb: 0.1, sensitivity: layer}", False),
    (False, "{bits: 4, group_size: 16, method: gptq}", True),  # q/k/v/o biases: bias correction block by block
])
def test_sequential_file_is_the_whole_model_file(tmp_path, tied, yaml, bias):
    folder = _folder(tmp_path, tied, bias=bias)
    recipe = mp.Recipe.from_yaml(f"stages:\n  - quantize: {yaml}\n")
    whole = mp.compress(transformers.LlamaForCausalLM.from_pretrained(folder).eval(), recipe, calib_data=_batches())
    n = whole.save(tmp_path / "whole.mpz")
    out = compress_sequential(folder, recipe, _batches(), tmp_path / "seq.mpz", meta=whole.manifest["meta"])
    assert out.bytes == n == (tmp_path / "seq.mpz").stat().st_size
    assert (tmp_path / "seq.mpz").read_bytes() == (tmp_path / "whole.mpz").read_bytes()
    assert [s.block for s in out.steps if s.stage == "quantize"] == [0, 1, 2]
    mixed = "avg_bits" in yaml or "budget_mb" in yaml
    assert len(out.steps) == (8 if mixed else 4)  # a sensitivity pass first for per-layer bits
    if "avg_bits" in yaml:
        assert sorted(set(out.widths.values())) != [4]  # some layers got more bits
    loaded = mp.load(tmp_path / "seq.mpz")
    ids = _batches()[0]
    with torch.no_grad():
        assert torch.equal(loaded(**ids).logits, mp.load(tmp_path / "whole.mpz")(**ids).logits)


def test_sequential_refuses_what_it_cannot_do(tmp_path):
    folder = _folder(tmp_path, False, layers=1)
    for yaml, words in [("- prune: {sparsity: 0.5}", "one weight-only 'quantize' stage"),
                        ("- quantize: {bits: 8, activations: int8}", "activations: none"),
                        ("- quantize: {bits: 4, avg_bits: 4.5}", "sensitivity: layer")]:
        with pytest.raises(ModelpressError, match=words):
            compress_sequential(folder, mp.Recipe.from_yaml(f"stages:\n  {yaml}\n"), _batches(), tmp_path / "x.mpz")
    with pytest.raises(ModelpressError, match="input_ids"):
        compress_sequential(folder, mp.Recipe.from_yaml("stages:\n  - quantize: {bits: 4}\n"), [torch.zeros(2, 4)],
                            tmp_path / "x.mpz")
    assert not (tmp_path / "x.mpz").exists()


def test_checkpoint_refuses_damaged_safetensors(tmp_path):
    folder = _folder(tmp_path, False, layers=1)
    shard = folder / "model.safetensors"
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    ckpt = Checkpoint(folder)
    name = "model.norm.weight"
    assert torch.equal(ckpt.read([name])[name], torch.ones(64))
    shard.write_bytes(data[:-4])  # truncated: the last tensor points past the end
    with pytest.raises(ModelpressError, match="outside the file"):
        Checkpoint(folder)
    header = json.loads(data[8:8 + n])
    header[name]["shape"] = [10**6]  # claims more bytes than its offsets hold
    raw = json.dumps(header).encode()
    shard.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(ModelpressError, match="model.norm.weight"):
        Checkpoint(folder)
    shard.write_bytes((2**40).to_bytes(8, "little") + data[8:])
    with pytest.raises(ModelpressError, match="not a safetensors file"):
        Checkpoint(folder)
    with pytest.raises(ModelpressError, match="no tensor 'nope'"):
        ckpt.read(["nope"])


def test_cli_compresses_a_folder_too_big_for_memory_block_by_block(tmp_path, monkeypatch):
    from test_transformers import word_tokenizer
    from typer.testing import CliRunner

    from modelpress import cli

    folder = _folder(tmp_path, False, layers=2)
    word_tokenizer(list("abcdefghijklmnopqrstuvwxyz") + ["the", "of", "and", "def", "class"]).save_pretrained(folder)
    weights = (folder / "model.safetensors").stat().st_size
    monkeypatch.setattr(cli, "available_memory", lambda: 6 * weights)  # 7x the weights would not fit
    assert cli._too_big(folder)
    out = CliRunner().invoke(cli.app, ["compress", str(folder), "--recipe", "w4", "-o", str(tmp_path / "s.mpz")],
                             terminal_width=200)
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert "sensitivity: layer" in text and "block by block" in text
    assert f"({(tmp_path / 's.mpz').stat().st_size:,} bytes" in text
    loaded = mp.load(tmp_path / "s.mpz")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    from modelpress.format import mpz

    recorded = mpz.read(tmp_path / "s.mpz")[0]["meta"]["recipe"]  # the recipe that ran, as the file records it
    assert recorded["stages"][0]["quantize"]["sensitivity"] == "layer"
    monkeypatch.setattr(cli, "available_memory", lambda: 8 * weights)
    assert not cli._too_big(folder)
    out = CliRunner().invoke(cli.app, ["compress", str(tmp_path / "s.mpz"), "--recipe", "w4", "--sequential",
                                       "-o", str(tmp_path / "t.mpz")], terminal_width=200)
    assert out.exit_code == 2 and "is for a Hugging Face decoder folder" in re.sub(r"[\s│]+", " ", out.output)
