"""The README's Python examples run as written: each in order, in the same folder (a later one reads the
files an earlier one wrote), given `modelpress as mp` and the names a user brings (`model`, `loader`,
`accuracy`, `MyNet`, `x`, `folder`, `llama_folder`, `batches`, `fidelity`, `my.yaml`, `keras_model`, `x_train`,
`y_train`): here a digits MLP trained by the test, the same layers as a Keras model, and small random BERT and
LLaMA folders (model and WordPiece tokenizer) written by it."""
import os
import re
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress import data

README = Path(__file__).parents[1] / "README.md"


class MyNet(nn.Sequential):
    """A user's own class, of the same layers as the plain model below."""

    def __init__(self):
        super().__init__(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def python_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_has_python_examples():
    assert len(python_examples()) >= 4


def bert_folder(path: Path) -> Path:
    """A 2-layer BERT of width 64 with a WordPiece tokenizer over the built-in text's commonest words."""
    transformers = pytest.importorskip("transformers")
    from collections import Counter
    words = Counter(w for t in data.text_paragraphs()[:300] for w in re.findall(r"[a-z]+", t.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(w for w, _ in words.most_common(400))]
    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=128)
    transformers.BertModel(config).save_pretrained(path)
    return path


def llama_folder(path: Path, bert: Path) -> Path:
    """A 2-block LLaMA of width 64 with the BERT folder's tokenizer (token ids and attention mask only)."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.BertTokenizerFast(vocab_file=str(bert / "vocab.txt"),
                                         model_input_names=["input_ids", "attention_mask"])
    tok.save_pretrained(path)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.slow
def test_every_python_example_in_the_readme_runs(tmp_path, monkeypatch):
    path = bert_folder(tmp_path / "bert")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    split = data.digits()
    model = data.train_classifier(nn.Sequential(*MyNet()), split, epochs=5)
    (tmp_path / "my.yaml").write_text("stages:\n  - prune: {sparsity: 0.5}\n  - quantize: {bits: 8}\n")
    batches = [x for x, _ in split.loader(64)][:4]
    reference = model

    def fidelity(m):
        return {"cos": float(torch.cosine_similarity(m(split.x_test), reference(split.x_test)).mean())}

    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    keras_model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, activation="relu"),
                                    keras.layers.Dense(10, activation="softmax")])
    names = {"mp": mp, "model": model, "keras_model": keras_model, "x_train": split.x_train.numpy(),
             "y_train": split.y_train.numpy(), "loader": split.loader(64), "MyNet": MyNet, "x": split.x_test[:64],
             "accuracy": lambda m: {"acc": data.accuracy(m, split.x_test, split.y_test)},
             "folder": path, "llama_folder": llama_folder(tmp_path / "llama", path), "batches": batches,
             "fidelity": fidelity}
    for i, code in enumerate(python_examples()):
        try:
            exec(compile(code, f"README.md python example {i + 1}", "exec"), dict(names))
        except Exception as e:
            raise AssertionError(f"README python example {i + 1} failed: {type(e).__name__}: {e}\n{code}") from e
    assert (tmp_path / "model.mpz").exists() and (tmp_path / "minilm.mpz").exists()
    assert (tmp_path / "best.mpz").exists() and (tmp_path / "report" / "report.html").exists()
    assert (tmp_path / "small.keras").exists() and (tmp_path / "llama-w4.mpz").exists()


def cli_examples() -> list[str]:
    """The `modelpress ...` lines of the README's bash blocks, without their comments."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    return [line.split("  #")[0].strip() for b in blocks for line in b.splitlines() if line.startswith("modelpress ")]


@pytest.mark.slow
def test_every_cli_example_in_the_readme_runs(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from modelpress.cli import app
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lowrank.yaml").write_text("stages:\n  - factorize: {rank_ratio: 0.25}\n  - finetune: {epochs: 2}\n")
    lines = cli_examples()
    assert [line.split()[1] for line in lines] == ["demo", "compare", "auto"]
    for line in lines:
        result = CliRunner().invoke(app, shlex.split(line)[1:])
        assert result.exit_code == 0, f"{line}\n{result.output}\n{result.exception!r}"
    assert (tmp_path / "report" / "report.html").exists() and (tmp_path / "best.mpz").exists()
