"""GGUF export: the file read back by llama.cpp's own gguf package (and run by llama.cpp where installed)."""
import json

import numpy as np
import pytest
import torch

import modelpress as mp
from modelpress.errors import ModelpressError
from modelpress.format import mpz
from modelpress.export_gguf import _permute_rows, encode_blocks, stored_codes, to_gguf
from modelpress.runtime import quantized_weight

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

TEXT = ("The quick brown fox jumps over the lazy dog. Numbers like 12345 and 2026 split into digits; "
        "punctuation, too!  Spaces   and\nnew lines as well.")


def _llama(tied: bool, vocab: int = 256, kind: str = "Llama"):
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{kind}Config")(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    model = getattr(transformers, f"{kind}ForCausalLM")(cfg).eval()
    for name, p in model.named_parameters():
        if name.endswith("bias"):  # Qwen2's q/k/v biases: not zeros, so that a misplaced one shows
            torch.nn.init.normal_(p, std=0.1)
    return model


def _batches(vocab: int = 256):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, vocab, (4, 16), generator=g)} for _ in range(3)]


def _compressed(tmp_path, yaml: str, tied: bool = True, vocab: int = 256, kind: str = "Llama"):
    result = mp.compress(_llama(tied, vocab, kind), mp.Recipe.from_yaml(f"stages:\n  - quantize: {yaml}\n"),
                         calib_data=_batches(vocab))
    result.save(tmp_path / "m.mpz")
    return mp.load(tmp_path / "m.mpz")


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group", [0, 32, 64])
def test_blocks_decode_to_the_codes_times_scales(bits, group):
    from gguf.quants import dequantize

    g = torch.Generator().manual_seed(bits * 100 + group)
    codes = torch.randint(-(1 << bits - 1), 1 << bits - 1, (6, 128), generator=g)
    scale = (torch.rand(6, 128 // group if group else 1, generator=g) + 0.01).half().float()  # float16 values
    data, rounding = encode_blocks(codes, scale, bits, group)
    qtype = gguf.GGMLQuantizationType.Q4_0 if bits <= 4 else gguf.GGMLQuantizationType.Q5_0 if bits == 5 \
        else gguf.GGMLQuantizationType.Q8_0
    assert data.shape == (6, 4 * gguf.GGML_QUANT_SIZES[qtype][1]) and rounding == 0.0
    expect = codes.float() * (scale.repeat_interleave(group, 1) if group else scale)
    assert torch.equal(torch.from_numpy(dequantize(data, qtype).copy()), expect)


def test_scale_rounding_is_reported():
    scale = torch.tensor([[0.1], [1 / 3]])
    _, rounding = encode_blocks(torch.ones(2, 32, dtype=torch.int64), scale, 4, 0)
    assert 0 < rounding < 2 ** -11


@pytest.mark.parametrize("source", ["file", "model"])
@pytest.mark.parametrize("tied,yaml", [
    (True, "{bits: 4, group_size: 32, method: gptq, avg_bits: 4.6, sensitivity: layer}"),  # 4, 5 and 6 bits
    (False, "{bits: 3, group_size: 64, method: rtn}"),  # a quantized embedding and LM head
    (False, "{bits: 8, method: rtn, embeddings: false}"),  # per row
])
def test_weights_read_back_exactly(tmp_path, tied, yaml, source):
    from gguf.quants import dequantize

    ours = _compressed(tmp_path, yaml, tied)
    report = to_gguf(tmp_path / "m.mpz" if source == "file" else ours, tmp_path / "m.gguf")
    assert report.bytes == (tmp_path / "m.gguf").stat().st_size and report.scale_rounding == 0.0
    read = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    coded = stored_codes(*mpz.read(tmp_path / "m.mpz")[:2], ours) if source == "file" else {}
    assert sorted(coded) == (["lm_head", "model.embed_tokens"] if tied and source == "file" else [])  # load: float
    checked = set()
    for name, m in ours.named_modules():
        q = quantized_weight(m, embeddings=True) or coded.get(name)
        w = m.dequantized() if hasattr(m, "dequantized") else getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        key = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if key == "output.weight" and tied:
            assert key not in read  # the embedding serves as the head
            continue
        t = read[key]
        x = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(w.shape)
        heads = 4 if ".attn_q." in key else 2 if ".attn_k." in key else 0
        assert torch.equal(x, _permute_rows(w.detach(), heads) if heads else w.detach()), key
        assert t.tensor_type.name == ("F32" if q is None else "Q4_0" if q[2] <= 4 else "Q5_0" if q[2] == 5
                                      else "Q8_0"), key
        checked.add(key)
    assert len(checked) == len(read) == 2 * 9 + 2 + (not tied)
    if "avg_bits" in yaml:
        assert {"Q4_0", "Q5_0", "Q8_0"} <= set(report.types)


def test_permutation_is_llama_cpps_rotary_order():
    # HF rotates (x[i], x[i + d/2]); llama.cpp rotates (x[2i], x[2i + 1]): row i of a head goes to 2i
    t = torch.arange(16).reshape(16, 1)
    assert _permute_rows(t, 2).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def _byte_level_tokenizer(tmp_path, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from modelpress.data import builtin_text

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 20, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(builtin_text()[:200], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>")
    fast.save_pretrained(tmp_path / "tok")
    return fast


def _sentencepiece_style_tokenizer(tmp_path, vocab: int):
    """A LLaMA-2-style tokenizer.json: BPE over "▁"-joined words with byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    from modelpress.data import builtin_text

    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    alphabet = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab - 20, special_tokens=["<unk>", "<s>", "</s>"] + alphabet)
    tk.train_from_iterator(builtin_text()[:200], trainer)
    fast = transformers.LlamaTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(tmp_path / "tok")
    return fast


def test_sentencepiece_style_vocabulary(tmp_path):
    fast = _sentencepiece_style_tokenizer(tmp_path, 600)
    ours = _compressed(tmp_path, "{bits: 4, group_size: 32, method: rtn}", vocab=600)
    assert to_gguf(ours, tmp_path / "m.gguf", tokenizer=tmp_path / "tok").vocab == "llama"
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "llama" and fields["tokenizer.ggml.add_space_prefix"].contents()
    vocab = fast.get_vocab()
    scores, types = fields["tokenizer.ggml.scores"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert types[vocab["<0x0A>"]] == gguf.TokenType.BYTE and types[vocab["<unk>"]] == gguf.TokenType.UNKNOWN
    assert types[vocab["<s>"]] == gguf.TokenType.CONTROL
    merges = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["model"]["merges"][:3]
    merged = [vocab["".join(m.split(" ") if isinstance(m, str) else m)] for m in merges]
    assert [scores[i] for i in merged] == [-1.0, -2.0, -3.0]  # a merge's result scores minus its rank


def test_byte_level_vocabulary(tmp_path):
    fast = _byte_level_tokenizer(tmp_path, 320)
    ours = _compressed(tmp_path, "{bits: 4, group_size: 32, method: rtn}", vocab=320)
    report = to_gguf(ours, tmp_path / "m.gguf", tokenizer=tmp_path / "tok")
    assert report.vocab == "gpt2"
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    vocab = fast.get_vocab()
    assert len(tokens) == 320 and tokens[:len(vocab)] == sorted(vocab, key=vocab.get)
    assert types[vocab["<|endoftext|>"]] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    assert fields["tokenizer.ggml.bos_token_id"].contents() == vocab["<|endoftext|>"]
    assert len(fields["tokenizer.ggml.merges"].contents()) > 0
    to_gguf(ours, tmp_path / "m2.gguf", tokenizer=fast)  # a tokenizer object: the same file
    assert (tmp_path / "m2.gguf").read_bytes() == (tmp_path / "m.gguf").read_bytes()


@pytest.mark.parametrize("kind,spm", [("Llama", False), ("Qwen2", False), ("Llama", True)])
def test_llama_cpp_runs_it(tmp_path, kind, spm):
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab = 600 if spm else 320  # (the byte fallback's 256 tokens, then merges)
    fast = (_sentencepiece_style_tokenizer if spm else _byte_level_tokenizer)(tmp_path, vocab)
    ours = _compressed(tmp_path, "{bits: 4, group_size: 32, method: gptq}", vocab=vocab, kind=kind)
    to_gguf(ours, tmp_path / "m.gguf", tokenizer=tmp_path / "tok")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    ids = fast(TEXT, add_special_tokens=False)["input_ids"][:60]
    assert llm.tokenize(TEXT.encode(), add_bos=False)[:60] == ids  # llama.cpp splits text as the tokenizer does
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)])
    with torch.no_grad():
        mine = ours(input_ids=torch.tensor([ids])).logits[0].numpy()
    cos = float((theirs * mine).sum() / np.linalg.norm(theirs) / np.linalg.norm(mine))
    assert cos > 0.999  # llama.cpp rounds activations to 8 bits in its Q4_0 products


def test_refusals_and_an_interrupted_write(tmp_path, monkeypatch):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ModelpressError, match="GGUF export writes llama, mistral, qwen2"):
        to_gguf(gpt2, tmp_path / "g.gguf")
    with pytest.raises(ModelpressError, match="multiples of 32"):
        encode_blocks(torch.zeros(2, 48, dtype=torch.int64), torch.ones(2, 3), 4, 16)
    ours = _compressed(tmp_path, "{bits: 4, group_size: 32, method: rtn}")
    (tmp_path / "m.gguf").write_bytes(b"previous")
    with pytest.raises(ModelpressError, match="no tokenizer.json"):
        to_gguf(ours, tmp_path / "m.gguf", tokenizer=tmp_path)
    def full(*args, **kwargs):
        raise OSError("full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    with pytest.raises(OSError, match="full"):
        to_gguf(ours, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == [
        "m.gguf", "m.mpz"]


def test_cli(tmp_path):
    from typer.testing import CliRunner

    from modelpress.cli import app

    _byte_level_tokenizer(tmp_path, 320)
    _compressed(tmp_path, "{bits: 4, group_size: 32, method: rtn}", vocab=320)
    out = CliRunner().invoke(app, ["export", str(tmp_path / "m.mpz"), "--gguf", str(tmp_path / "m.gguf"),
                                   "--tokenizer", str(tmp_path / "tok")])
    assert out.exit_code == 0, out.output
    size = (tmp_path / "m.gguf").stat().st_size
    assert f"({size:,} bytes; tensors: 5 F32, 15 Q4_0; vocabulary: gpt2)" in " ".join(out.output.split())
    out = CliRunner().invoke(app, ["export", str(tmp_path / "m.mpz"), "--gguf", str(tmp_path / "n.gguf")])
    assert out.exit_code == 0 and "no vocabulary" in out.output
    assert gguf.GGUFReader(tmp_path / "n.gguf").fields["tokenizer.ggml.model"].contents() == "no_vocab"
