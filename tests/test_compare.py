"""Side-by-side comparison: the CLI's table, results.json and HTML page (checked in a real headless
browser), failures reported per recipe, and the Pareto fronts."""
import json
import shutil
import textwrap

import pytest
from typer.testing import CliRunner

from modelpress.cli import app
from modelpress.compare import Comparison, Row, compare

runner = CliRunner()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def digits_model(tmp_path, monkeypatch):
    """'digits_cnn:model', importable: a small CNN trained on scikit-learn's digits."""
    (tmp_path / "digits_cnn.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from modelpress import data

        def model():
            torch.manual_seed(0)
            net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 16, 32), nn.ReLU(), nn.Linear(32, 10))
            return data.train_classifier(net, data.digits(image=True), epochs=8)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "digits_cnn:model"


@pytest.mark.slow
def test_compare_writes_the_table_json_and_a_page_a_browser_opens_cleanly(digits_model, tmp_path):
    (tmp_path / "lowrank.yaml").write_text("stages:\n  - factorize: {rank_ratio: 0.5}\n  - finetune: {epochs: 2}\n")
    (tmp_path / "shared.yaml").write_text("stages:\n  - prune: {sparsity: 0.8}\n  - cluster: {bits: 4}\n")
    (tmp_path / "broken.yaml").write_text("stages:\n  - prune: {sparsity: 2}\n")
    recipes = ["int8", "w4", "fast", str(tmp_path / "lowrank.yaml"), str(tmp_path / "shared.yaml"), "nope",
               str(tmp_path / "broken.yaml")]
    out_dir = tmp_path / "report"
    res = runner.invoke(app, ["compare", digits_model, "--recipes", *recipes, "--data", "digits-image",
                              "-o", str(out_dir), "--repeats", "3"], terminal_width=250)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "2 recipe(s) failed: nope, broken" in text

    results = json.loads((out_dir / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == ["original (fp32)", "int8", "w4", "fast", "lowrank", "shared", "nope", "broken"]
    good = [r for r in results["rows"] if r["error"] is None]
    assert len(good) == 6 and "must be a float" in rows["broken"]["error"]
    assert rows["nope"]["error"].startswith("Unknown preset 'nope'. Available presets:")
    for r in good[1:]:
        assert (out_dir / f"{r['name']}.mpz").stat().st_size == r["bytes"]
        assert r["latency_ms"] > 0 and 0 <= r["metrics"]["acc"] <= 100 and r["layers"]
    assert rows["fast"]["macs"] < rows["original (fp32)"]["macs"]  # channels really went
    assert rows["w4"]["bytes"] < rows["int8"]["bytes"] < rows["original (fp32)"]["bytes"]
    assert results["pareto"]["bytes"] and results["metric"] == "acc"

    if CHROMIUM is None:
        pytest.skip("no chromium: install Debian's chromium to run the browser half of this test")
    screenshot = _load_screenshot()
    png = tmp_path / "report.png"
    errors = screenshot(out_dir / "report.html", png, browser=CHROMIUM)
    assert errors == []
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = b.new_page()
        page.goto((out_dir / "report.html").resolve().as_uri())
        assert page.locator("tr.result").count() == 8          # one row per recipe, and the original
        assert page.locator("tr.result td.error:not(:empty)").count() == 2
        for plot in ("bytes", "latency_ms"):                    # one point per result that has one
            assert page.locator(f"#plot-{plot} g[id^='{plot}-point-']").count() == 6
        assert page.locator("details").count() == 5            # per-layer breakdown of each artifact
        b.close()


def test_a_metric_that_fails_on_one_result_leaves_the_others(mlp, toy_data):
    def picky(model):
        if sum(p.numel() for p in model.parameters()) < 1000:
            raise RuntimeError("this metric needs the full model")
        return 1.0

    c = compare(mlp, ["w4", {"stages": [{"factorize": {"rank": 2, "min_rank": 1}}]}], train_data=toy_data,
                eval_fn=picky, repeats=2)
    assert [r.name for r in c.rows] == ["original (fp32)", "w4", "factorize"]
    assert c.rows[1].error is None and c.rows[1].metrics == {"metric": 1.0}
    assert "metric" in c.rows[2].error and "needs the full model" in c.rows[2].error
    assert c.rows[2].bytes and c.rows[2].layers  # what was measured before the failure is kept


def test_default_metric_is_agreement_with_the_original(mlp, toy_data):
    c = compare(mlp, ["int8"], train_data=toy_data, repeats=2)
    assert c.metric == "agreement" and c.rows[0].metrics["agreement"] == 100.0
    assert 90.0 <= c.rows[1].metrics["agreement"] <= 100.0


def test_pareto_fronts():
    rows = [Row("a", bytes=100, latency_ms=5.0, metrics={"m": 0.9}),
            Row("b", bytes=50, latency_ms=6.0, metrics={"m": 0.8}),
            Row("c", bytes=60, latency_ms=7.0, metrics={"m": 0.7}), Row("d", error="failed")]
    c = Comparison(rows, "m", "cpu", "x")
    assert c.front("bytes") == ["a", "b"] and c.front("latency_ms") == ["a"]


def _load_screenshot():
    """benchmarks/screenshot.py's function (the benchmarks folder is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "screenshot.py"
    spec = importlib.util.spec_from_file_location("screenshot", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.screenshot


def test_the_default_metric_is_measured_on_batches_held_out_of_training_and_calibration(caplog):
    import torch
    from modelpress.compare import held_out_metric
    net = torch.nn.Linear(4, 3)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(20)]
    metric, train, calib, where = held_out_metric(net, batches, batches)  # the same list for both
    assert train is calib and len(train) == 18 and all(b is not batches[9] and b is not batches[19] for b in train)
    assert where == "16 samples held out of train_data" and metric(net) == {"agreement": 100.0}
    metric, train, calib, where = held_out_metric(net, None, batches)
    assert train is None and len(calib) == 18 and where == "16 samples held out of calib_data"
    metric, train, calib, where = held_out_metric(net, batches[:4], None)  # too few batches: every 10th sample
    assert len(train) == 4 and sum(len(b[0]) for b in train) == 29 and where == "3 samples held out of train_data"
    few = batches[:2]
    metric, train, calib, where = held_out_metric(net, few, None)
    assert train is few and where == "calibration/training batches (none could be held out)"
    assert "pass eval_fn" in caplog.text


def test_compare_trains_the_candidates_without_the_held_out_batches(monkeypatch):
    import torch
    import sys
    cmp = sys.modules["modelpress.compare"]  # the package exports the function under the same name
    seen = []
    real = cmp.compress
    monkeypatch.setattr(cmp, "compress", lambda model, recipe, train_data=None, **k: (
        seen.append(len(train_data)), real(model, recipe, train_data=train_data, **k))[1])
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(20)]
    c = compare(torch.nn.Linear(4, 3), [{"stages": [{"finetune": {"epochs": 1}}]}], train_data=batches, repeats=1)
    assert seen == [18] and c.measured_on == "16 samples held out of train_data"
    assert c.to_dict()["measured_on"] == c.measured_on and c.rows[1].error is None


def test_a_recipe_gets_the_same_batches_whatever_ran_before_it():
    """A DataLoader shuffled by its own generator is put back after each recipe, and after compare's own
    draws (the example, the held-out batches): the same recipe twice gives the same row, and the same as
    alone in a second compare on the same loader (as on Ray, where each task gets the data as it was)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(1)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    tune = {"stages": [{"prune": {"sparsity": 0.5}}, {"finetune": {"epochs": 2}}]}
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    twice = compare(net, [tune, tune], train_data=loader, repeats=1)  # the default metric: held-out batches
    once = compare(net, [tune], train_data=loader, repeats=1)
    assert twice.rows[1].metrics == twice.rows[2].metrics == once.rows[1].metrics
    assert twice.rows[1].bytes == twice.rows[2].bytes == once.rows[1].bytes
    logits = lambda m: float(m(x).sum())  # noqa: E731  (agreement may not move; this does)
    a, b = (compare(net, [tune], train_data=loader, eval_fn=logits, repeats=1) for _ in range(2))
    assert a.rows[1].metrics == b.rows[1].metrics != a.rows[0].metrics
