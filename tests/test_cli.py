import torch
from typer.testing import CliRunner

import modelpress as mp
from modelpress.cli import app

runner = CliRunner()


def test_inspect_shows_every_tensor_and_the_total(mlp, toy_data, tmp_path):
    res = mp.compress(mlp, {"stages": [{"prune": {"sparsity": 0.9}}, {"cluster": {"bits": 3}}]})
    path = tmp_path / "m.mpz"
    size = res.save(path)
    out = runner.invoke(app, ["inspect", str(path)], terminal_width=200)
    assert out.exit_code == 0, out.output
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        assert name in out.output
    assert f"{size:,} bytes in all" in " ".join(out.output.split())


def test_inspect_refuses_a_damaged_file(tmp_path):
    bad = tmp_path / "bad.mpz"
    bad.write_bytes(b"\x89MPZ\x01garbage")
    out = runner.invoke(app, ["inspect", str(bad)])
    assert out.exit_code != 0 and isinstance(out.exception, mp.FormatError)


def test_demo_writes_a_loadable_artifact(tmp_path):
    path = tmp_path / "demo.mpz"
    recipe = tmp_path / "quick.yaml"
    recipe.write_text("stages:\n  - prune: {sparsity: 0.9}\n  - cluster: {bits: 4}\n")
    out = runner.invoke(app, ["demo", "--out", str(path), "--recipe", str(recipe), "--epochs", "2"],
                        terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "outputs bitwise identical: True" in " ".join(out.output.split())
    model = mp.load(path)
    assert model(torch.zeros(1, 784)).shape == (1, 10)
