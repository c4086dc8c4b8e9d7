"""Sweeps on Ray (compare / auto with executor="ray"): the same table as the local run for the same seed, a
worker that dies becomes its row's error while the others complete, and clear errors for a missing Ray or
an unknown executor. One local 2-CPU Ray serves the whole module."""
import contextlib
import logging
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import modelpress as mp

ray = pytest.importorskip("ray")

DRIVER = os.getpid()  # captured here, in the test process: a task runs in another one


def _problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 20, generator=g)
    return x, (x @ torch.randn(20, 4, generator=g)).argmax(1)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))


def accuracy_and_logits(model: torch.nn.Module) -> dict[str, float]:
    """Accuracy (%) and the sum of the logits: the second changes with any weight of the result."""
    x, y = _problem()
    out = model(x)
    return {"acc": float((out.argmax(1) == y).float().mean() * 100), "logits": float(out.sum())}


def dies_on_the_factorized_one(model: torch.nn.Module) -> dict[str, float]:
    """A metric whose process dies (as a crash in native code would) on the one result with under 500
    weights (parameters and buffers: int8 layers hold theirs as buffers), the factorized one, and only in a
    worker."""
    if os.getpid() != DRIVER and sum(t.numel() for t in [*model.parameters(), *model.buffers()]) < 500:
        os._exit(1)
    return accuracy_and_logits(model)


RECIPES = ["int8", "w4", "w3", "fast",
           {"stages": [{"prune": {"sparsity": 0.8}}, {"cluster": {"bits": 4}}, {"finetune": {"epochs": 2}}]},
           {"stages": [{"factorize": {"rank": 2, "min_rank": 1}}, {"finetune": {"epochs": 1}}]}]
FAILING = ["nope",                                                            # fails to parse (in the driver)
           {"stages": [{"prune": {"granularity": "block", "blocks": 1}}]}]    # fails in compress (in the task)


@contextlib.contextmanager
def one_thread():
    """torch on one thread, as in each task (one CPU each): training on more threads may sum in another order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def _by_value():
    """This module's functions (the metrics) go to the workers by value: the module is not importable there."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs for the module; compare uses it (and leaves it running) instead of its own."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture
def data():
    """Shuffled by its own generator (as `data.Split.loader` is): each recipe must get the same batches, here
    whatever ran before it, on Ray from the copy the task was given."""
    x, y = _problem()
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_compare_starts_a_local_ray_for_the_run_and_shuts_it_down(data):
    assert not ray.is_initialized()  # runs before the module's Ray is started (the first test to use it is next)
    c = mp.compare(_model(), ["w4"], train_data=data, eval_fn=accuracy_and_logits, repeats=2, executor="ray")
    assert not ray.is_initialized()
    with one_thread():
        local = mp.compare(_model(), ["w4"], train_data=data, eval_fn=accuracy_and_logits, repeats=2)
    assert c.rows[1].error is None and (c.rows[1].bytes, c.rows[1].metrics) == (local.rows[1].bytes,
                                                                                local.rows[1].metrics)


@pytest.mark.slow
def test_compare_on_ray_gives_the_local_table(local_ray, data, tmp_path):
    kw = dict(train_data=data, eval_fn=accuracy_and_logits, repeats=2, keep_results=True)
    with one_thread():
        here = mp.compare(_model(), RECIPES + FAILING, out_dir=tmp_path / "here", **kw)
    there = mp.compare(_model(), RECIPES + FAILING, out_dir=tmp_path / "ray", executor="ray", **kw)
    assert ray.is_initialized()  # the fixture's Ray was used, not one started and shut down by compare
    assert [r.name for r in there.rows] == [r.name for r in here.rows] and len(here.rows) == 9
    assert [r.error is None for r in here.rows] == [True] * 7 + [False] * 2
    for a, b in zip(here.rows, there.rows):
        assert (b.bytes, b.params, b.macs, b.layers, b.recipe, b.error) == (a.bytes, a.params, a.macs, a.layers,
                                                                          a.recipe, a.error), a.name
        assert b.metrics.keys() == a.metrics.keys() and all(abs(b.metrics[k] - a.metrics[k]) <= 1e-6
                                                            for k in a.metrics), a.name
        assert (b.latency_ms is None) == (a.latency_ms is None) and (b.latency_ms or 1) > 0
    assert here.rows[7].error.startswith("Unknown preset 'nope'")
    assert here.rows[8].error.startswith("block removal found no block to drop")
    for a in here.rows[1:7]:  # the same files, and the same models timed (classes and outputs)
        b = there.rows[here.rows.index(a)]
        assert b.artifact == str(tmp_path / "ray" / os.path.basename(a.artifact))
        assert open(b.artifact, "rb").read() == open(a.artifact, "rb").read()
        m, n = here.results[a.name].model, there.results[a.name].model
        assert [type(x).__name__ for x in m.modules()] == [type(x).__name__ for x in n.modules()]
        assert torch.equal(m(_problem()[0]), n(_problem()[0]))
        kept = there.results[a.name]
        assert kept.save(tmp_path / "again.mpz") == a.bytes and kept.recipe == here.results[a.name].recipe
        assert [(s.stage, s.bytes) for s in kept.report.rows] == [(s.stage, s.bytes)
                                                                 for s in here.results[a.name].report.rows]
    assert here.rows[8].bytes is None and sorted(os.listdir(tmp_path / "ray")) == sorted(os.listdir(tmp_path / "here"))


@pytest.mark.slow
def test_a_worker_that_dies_leaves_one_error_row_and_the_others_complete(local_ray, data):
    c = mp.compare(_model(), ["w4", "fast", RECIPES[5], "int8"], train_data=data, eval_fn=dies_on_the_factorized_one,
                   repeats=2, executor="ray")
    errors = {r.name: r.error for r in c.rows if r.error}
    assert list(errors) == ["factorize+finetune"]
    assert errors["factorize+finetune"].startswith("the Ray worker running this recipe died before it finished "
                                                   "(WorkerCrashedError)")
    crashed = c.rows[3]
    assert crashed.bytes is None and crashed.latency_ms is None and crashed.recipe == mp.Recipe.from_dict(
        RECIPES[5]).to_dict()
    for r in (c.rows[1], c.rows[2], c.rows[4]):
        assert r.bytes > 0 and r.latency_ms > 0 and r.metrics["acc"] > 0 and r.params > 0
    assert c.front("bytes")  # the table still ranks the rows that completed


@pytest.mark.slow
def test_auto_on_ray_makes_the_local_choice(local_ray):
    x, y = _problem()
    data = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)  # shuffled by torch's seeded generator
    kw = dict(max_mb=0.002, train_data=data, eval_fn=accuracy_and_logits, keep=2, repeats=2)
    with one_thread():
        here = mp.auto(_model(), **kw)
    there = mp.auto(_model(), executor="ray", **kw)
    assert len(here.proxies) > 10 and len(there.proxies) == len(here.proxies)
    for a, b in zip(here.proxies, there.proxies):
        assert (b.name, b.bytes, b.metrics, b.error) == (a.name, a.bytes, a.metrics, a.error)
    assert [(r.name, r.bytes, r.metrics) for r in there.tried.rows] == [(r.name, r.bytes, r.metrics)
                                                                        for r in here.tried.rows]
    assert there.met == here.met and there.message.split(":")[0] == here.message.split(":")[0]
    assert there.save(os.devnull) == here.save(os.devnull) <= 2000


def test_ray_missing_says_how_to_install_it(monkeypatch, data):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    for run in (lambda: mp.compare(_model(), ["w4"], train_data=data, executor="ray"),
                lambda: mp.auto(_model(), max_mb=0.01, train_data=data, executor="ray")):
        with pytest.raises(mp.ModelpressError, match=r'needs Ray.*pip install "modelpress\[ray\]"'):
            run()
    out = subprocess.run([sys.executable, "-c", "import sys, modelpress; print(sorted(m for m in sys.modules "
                          "if m == 'ray' or m.startswith('ray.')))"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # importing modelpress imports no part of Ray


def test_an_unknown_executor_is_refused(data):
    for run in (lambda: mp.compare(_model(), ["w4"], train_data=data, executor="dask"),
                lambda: mp.auto(_model(), max_mb=0.01, train_data=data, executor="threads")):
        with pytest.raises(mp.ModelpressError, match=r"unknown executor '(dask|threads)': use executor='local'"):
            run()


@pytest.mark.slow
def test_a_result_that_cannot_be_loaded_here_keeps_what_its_task_measured(local_ray, data, monkeypatch):
    def refuse(blob, *args, **kw):
        raise mp.ModelpressError("no skeleton fits")
    monkeypatch.setattr(sys.modules["modelpress.compare"], "load", refuse)  # the package exports compare, a function
    c = mp.compare(_model(), ["w4"], train_data=data, eval_fn=accuracy_and_logits, repeats=2, executor="ray")
    row = c.rows[1]
    assert row.error == "the file the Ray task wrote could not be loaded here, to time it: no skeleton fits"
    assert row.bytes > 0 and row.metrics["acc"] > 0 and row.latency_ms is None and c.rows[0].latency_ms > 0
