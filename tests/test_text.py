"""Built-in text for language models and the vocabulary noise that widens distillation beyond it."""
import pytest
import torch

import modelpress as mp
from modelpress import data
from test_transformers import bert, word_tokenizer

transformers = pytest.importorskip("transformers")


def test_builtin_text_mixes_pydoc_topics_and_docstrings_in_a_fixed_order():
    topics, docs = data.text_paragraphs(), data.docstring_paragraphs()
    assert len(docs) > 500 and len(set(docs)) == len(docs) and min(map(len, docs)) > 80
    assert not set(docs) & set(topics)
    text = data.builtin_text()
    assert text == data.builtin_text() and sorted(text) == sorted(topics + docs)
    head = set(text[:200])
    assert head & set(topics) and head & set(docs)  # any slice holds both


def test_vocabulary_noise_swaps_the_asked_share_of_words_for_whole_vocabulary_words():
    tok = word_tokenizer(["##ing", "a", "9", "apple", "river", "stone", "cloud", "zebra"])
    texts = [" ".join(f"w{i}x{j}" for j in range(50)) for i in range(40)]  # 2,000 words, none in the vocabulary
    noisy = data.vocabulary_noise(texts, tok, share=0.3, seed=1)
    assert [len(t.split()) for t in noisy] == [50] * 40
    swapped = [n for t, m in zip(texts, noisy) for w, n in zip(t.split(), m.split()) if w != n]
    assert 0.26 < len(swapped) / 2000 < 0.34
    assert set(swapped) == {"apple", "river", "stone", "cloud", "zebra"}  # no subword pieces, digits, 1 letter
    assert noisy == data.vocabulary_noise(texts, tok, share=0.3, seed=1) != data.vocabulary_noise(texts, tok, 0.3, 2)
    assert data.vocabulary_noise(texts, tok, share=0.0) == texts


def test_vocabulary_noise_needs_whole_words():
    with pytest.raises(mp.ModelpressError, match="no whole alphabetic words"):
        data.vocabulary_noise(["some text"], word_tokenizer(["##ing", "1", "b"]))


def test_fast_on_a_transformers_model_drops_a_layer_then_runs_int8():
    model = bert()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(5, 200, (4, 12), generator=g),
                "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(3)]
    result = mp.compress(model, "fast", train_data=batches, calib_data=batches)
    out = result.model
    assert len(out.encoder.layer) == out.config.num_hidden_layers == 1
    assert type(out.encoder.layer[0].attention.self.query).__name__ == "Int8Linear"


def test_next_token_fidelity_is_perplexity_and_agreement_on_real_tokens():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    batch = {"input_ids": ids, "attention_mask": mask}
    fn = data.next_token_fidelity(model, [batch])
    got = fn(model)
    with torch.no_grad():  # transformers' own loss: mean cross-entropy over the shifted, unmasked labels
        loss = model(**batch, labels=ids.masked_fill(mask == 0, -100)).loss
    assert got["agree"] == 1.0 and got["ppl"] == pytest.approx(float(torch.exp(loss)), rel=1e-5)
    other = transformers.LlamaForCausalLM(config).eval()  # different random weights
    worse = fn(other)
    assert 0.0 <= worse["agree"] < 0.5 and worse["ppl"] > 0
