"""Hugging Face models end to end: compress, save, load without the user's code, same outputs."""
import pytest
import torch

import modelpress as mp
from modelpress.errors import CorruptStream
from modelpress.format import arch
from modelpress.graph import trace
from modelpress.runtime import Int8Linear

transformers = pytest.importorskip("transformers")


def bert():
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def word_tokenizer(words):
    """A BERT WordPiece tokenizer over `words` after the 5 special tokens (transformers 5 ignores a
    vocab_file argument: the vocabulary goes in as a dict)."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    return transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})


def llama():
    cfg = transformers.LlamaConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
    return transformers.LlamaModel(cfg).eval()


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=200, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2Model(cfg).eval()


def batches(n=4, seq=12):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 200, (4, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[0, seq // 2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min().item()


@pytest.mark.parametrize("make", [bert, llama, gpt2])
@pytest.mark.parametrize("preset", ["int8", "w4"])
def test_preset_round_trips_through_a_file_without_user_code(make, preset, tmp_path):
    model = make()
    result = mp.compress(model, preset, calib_data=batches())
    path = tmp_path / "m.mpz"
    size = result.save(path)
    assert size == path.stat().st_size == result.report.rows[-1].bytes
    loaded = mp.load(path)
    assert type(loaded) is type(model)
    x = batches(1)[0]
    with torch.no_grad():
        ref, ours, back = model(**x), result.model(**x), loaded(**x)
    assert type(back) is type(ref)  # same output class
    assert torch.equal(back.last_hidden_state, ours.last_hidden_state)
    assert cosine(back.last_hidden_state, ref.last_hidden_state) > (0.99 if preset == "int8" else 0.9)
    linears = sum(isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D" for m in model.modules())
    if preset == "int8":
        assert sum(isinstance(m, Int8Linear) for m in loaded.modules()) == linears
        assert size < 0.3 * result.report.fp32_bytes
    else:
        assert size < 0.2 * result.report.fp32_bytes


def test_hf_architecture_allows_only_transformers_model_classes():
    spec = arch.describe(bert())
    assert spec["hf"]["class"] == "BertModel" and spec["swaps"] == {}
    for bad in ("os", "AutoTokenizer", "BertConfig", "__builtins__"):
        with pytest.raises(CorruptStream, match="not a transformers model class"):
            arch.build({**spec, "hf": {**spec["hf"], "class": bad}})
    with pytest.raises(CorruptStream, match="not allowed"):
        arch.build({**spec, "swaps": {"pooler.dense": {"t": "Sequential", "c": []}}})
    with pytest.raises(CorruptStream, match="no layer"):
        arch.build({**spec, "swaps": {"nope.dense": {"t": "Int8Linear", "a": {"in_features": 1, "out_features": 1}}}})


@pytest.mark.parametrize("preset", ["int8", "w4"])
def test_tied_embeddings_are_stored_once(preset, tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=2000, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    result = mp.compress(model, preset, calib_data=batches())
    size = result.save(tmp_path / "m.mpz")
    table = 2000 * 64  # the tied table's values: stored once, at most 8 bits each plus scales
    assert size < 1.3 * table + 0.25 * result.report.fp32_bytes
    loaded = mp.load(tmp_path / "m.mpz")
    x = batches(1)[0]
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, result.model(**x).logits)


def test_factorized_encoder_recovers_by_hidden_state_distillation(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():  # weights of low effective rank plus noise, as trained layers tend to have
        for m in model.encoder.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.out_features, 4) @ torch.randn(4, m.in_features) * 0.3
                               + 0.02 * torch.randn_like(m.weight))
    x = batches(1)[0]
    with torch.no_grad():
        ref = model(**x).last_hidden_state

    def fidelity(m):
        return {"cos": cosine(m(**x).last_hidden_state, ref)}

    recipe = {"stages": [{"factorize": {"rank": 2, "min_rank": 1}},
                         {"distill": {"epochs": 20, "lr": 1e-3, "hidden": True}}]}
    result = mp.compress(model, recipe, train_data=batches(8), eval_fn=fidelity)
    fact, dist = result.report.rows[1].metrics["cos"], result.report.rows[2].metrics["cos"]
    assert fact < 0.98 and dist > fact + 0.01, (fact, dist)
    result.save(tmp_path / "f.mpz")
    with torch.no_grad():
        assert torch.equal(mp.load(tmp_path / "f.mpz")(**x).last_hidden_state, result.model(**x).last_hidden_state)


def test_bert_loses_whole_heads_and_ffn_neurons_and_loads_without_user_code(tmp_path):
    torch.manual_seed(0)
    model = bert()
    result = mp.compress(model, {"stages": [{"prune": {"granularity": "channel", "sparsity": 0.5,
                                                       "criterion": "activation"}}]}, calib_data=batches())
    small = result.model
    for layer in small.encoder.layer:
        att = layer.attention
        heads = att.self.query.out_features
        assert heads == att.self.key.out_features == att.self.value.out_features == att.output.dense.in_features
        assert heads % 16 == 0 and 0 < heads < 64  # whole heads of 16 channels
        assert layer.intermediate.dense.out_features == layer.output.dense.in_features < 128
    assert sum(p.numel() for p in small.parameters()) < 0.85 * sum(p.numel() for p in model.parameters())
    x = batches(1)[0]
    with torch.no_grad():
        out = small(**x).last_hidden_state
    assert out.shape == model(**x).last_hidden_state.shape  # the hidden size, the model's output, is kept
    path = tmp_path / "p.mpz"
    result.save(path)
    loaded = mp.load(path)  # rebuilt from config plus the resized layers, no user code
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(**x).last_hidden_state, out)


def test_head_granularity_keeps_the_ffn_and_grouped_query_attention_is_left_alone():
    layers = mp.compress(bert(), {"stages": [{"prune": {"granularity": "head", "sparsity": 0.5, "scope": "layer"}}]},
                         calib_data=batches()).model.encoder.layer
    assert [layer.attention.self.query.out_features for layer in layers] == [32, 32]  # 2 of 4 heads
    assert [layer.intermediate.dense.out_features for layer in layers] == [128, 128]
    model = llama()  # 4 query heads share 2 key/value heads: not pruned, and said why
    result = mp.compress(model, {"stages": [{"prune": {"granularity": "channel", "sparsity": 0.5,
                                                       "scope": "layer"}}]}, calib_data=batches())
    assert all(layer.self_attn.q_proj.out_features == 64 for layer in result.model.layers)
    notes = trace(model, {k: v[:2] for k, v in batches(1)[0].items()}).notes
    assert any(n.startswith("layers.0.self_attn: ") for n in notes)  # names the layer it could not follow
    mlp = result.model.layers[0].mlp
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 64


def test_fast_takes_the_form_that_fits_the_model():
    fast = mp.Recipe.preset("fast", bert()).to_dict()["stages"]  # a transformers model: a layer goes (checked), int8
    assert fast[0]["prune"] == {"granularity": "block", "blocks": 1, "epochs": 2.0, "min_fidelity": 0.98}
    assert fast[1]["quantize"]["bits"] == 8 and fast[1]["quantize"]["activations"] == "int8"
    one_layer = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                               num_attention_heads=4, intermediate_size=64))
    encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2,
                                          enable_nested_tensor=False)
    for model in (one_layer, encoder):  # attention, but no layer block removal could drop: heads and neurons
        stages = mp.Recipe.preset("fast", model).to_dict()["stages"]
        assert stages[0]["prune"]["sparsity"] == 0.4 and stages[0]["prune"]["granularity"] == "channel"
    assert mp.Recipe.preset("fast", torch.nn.Linear(2, 2)).to_dict()["stages"][0]["prune"]["sparsity"] == 0.6


def test_a_model_transformers_loaded_from_gguf_compresses_and_other_quantizers_are_refused(tmp_path):
    """A GGUF file's weights load dequantized into float tensors but transformers marks the model quantized
    (and its config names the .gguf file) and refuses .float(); another quantizer's model has no float
    weights to compress."""
    cfg = transformers.LlamaConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.is_quantized, model.quantization_method = True, transformers.utils.quantization_config.QuantizationMethod.GGUF
    model.config.quantization_config = transformers.utils.quantization_config.GgufConfig(gguf_file="model.Q4_1.gguf")
    with pytest.raises(ValueError, match="not supported for quantized model"):
        model.float()  # what compress used to call on the teacher's copy
    data = [b["input_ids"] for b in batches()]
    result = mp.compress(model, "int8", calib_data=data)
    result.save(tmp_path / "m.mpz")  # the file's config names no .gguf file (the guard refuses one that does)
    with torch.no_grad():
        ref, out = model(data[0]).logits, mp.load(tmp_path / "m.mpz")(data[0]).logits
    assert torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.99
    assert model.config.quantization_config is not None  # the user's model is left as it was
    model.quantization_method = transformers.utils.quantization_config.QuantizationMethod.BITS_AND_BYTES
    with pytest.raises(mp.ModelpressError, match=r"loaded quantized by transformers \(bitsandbytes\)"):
        mp.compress(model, "int8", calib_data=data)
