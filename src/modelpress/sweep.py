"""Where a sweep's recipes run (`compare` and `auto`): one after the other in this process
(executor="local", the default), or each as a Ray task (executor="ray"), on a local Ray started for the
run or on an existing cluster. Ray is optional (`pip install "modelpress[ray]"`) and imported only here,
only when asked for.

On Ray, the model and the data go into the object store once and every task gets them by reference; a
task runs one recipe on one CPU (torch's threads set to the CPUs Ray gave it) and is never retried. Its
results are bitwise those of a local run on as many torch threads: training on 2 threads sums in another
order than on 1 (LeNet-5's `fast` preset: a file 3 bytes apart, the mean logit 3e-5 apart). A task
that raises, or whose worker dies (a crash in native code, an exit, the OS killing it for memory),
becomes a `Failed` with a message saying so, and the other tasks go on."""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .errors import ModelpressError

EXECUTORS = ("local", "ray")
CPUS_PER_TASK = 1


@dataclass
class Failed:
    """A task that did not return: why, in a sentence that names what happened."""

    error: str


def check_executor(executor: str) -> None:
    """A clear error for an executor name other than "local" or "ray", or for "ray" without Ray installed:
    raised before any work starts."""
    if executor not in EXECUTORS:
        raise ModelpressError(f"unknown executor {executor!r}: use executor='local' (this process, one recipe after "
                              "the other) or executor='ray' (one Ray task per recipe)")
    if executor == "ray":
        import_ray()


def import_ray() -> Any:
    """The `ray` module, or a ModelpressError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ModelpressError(f"executor='ray' needs Ray, which could not be imported ({e}): "
                              'pip install "modelpress[ray]"') from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[Any]:
    """Ray, connected for the block: the connection already open if there is one; else `address` (an
    existing cluster, e.g. "ray://head:10001" or "auto"); else a local Ray on this machine's CPUs, without
    the dashboard, shut down when the block ends."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level=logging.WARNING)
    except Exception as e:
        where = f"connect to the Ray cluster at {address!r}" if address else "start a local Ray"
        raise ModelpressError(f"could not {where}: {type(e).__name__}: {e}") from e
    try:
        yield ray
    finally:
        ray.shutdown()


def on_ray(fn: Callable[..., Any], jobs: list[dict], shared: dict[str, Any],
           done: Callable[[int, int], None] | None = None) -> list[Any]:
    """`fn(**shared, **job)` for every job, each as a Ray task, in a connected Ray (`ray_session`). The
    values of `shared` (the model, the data, eval_fn) are put in the object store once and passed by
    reference. Returns what each task returned, or a `Failed`, in the order of `jobs`; `done(i, finished)`
    is called as each finishes (job `i`, the `finished`-th to finish)."""
    ray = import_ray()
    refs = {k: ray.put(v) for k, v in shared.items()}
    task = ray.remote(max_retries=0, num_cpus=CPUS_PER_TASK)(_in_worker)
    pending = {task.remote(fn, job, **refs): i for i, job in enumerate(jobs)}
    out: list[Any] = [None] * len(jobs)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        try:
            out[i] = ray.get(ready[0])
        except Exception as e:  # the task raised past fn, its worker died, or Ray lost it
            out[i] = Failed(ray_failure(e))
        if done:
            done(i, len(jobs) - len(pending))
    return out


def _in_worker(fn: Callable[..., Any], job: dict, **shared: Any) -> Any:
    """A task's body: torch's threads set to the CPUs Ray gave this task, then `fn`."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", CPUS_PER_TASK)
    torch.set_num_threads(max(1, int(cpus)))
    return fn(**shared, **job)


def ray_failure(e: BaseException) -> str:
    """What a Ray error means for the task, in a sentence."""
    from ray import exceptions as rx

    name = type(e).__name__
    first = (str(e).strip().splitlines() or [""])[0][:300]
    if isinstance(e, rx.OutOfMemoryError):
        return f"Ray killed the worker running this recipe for lack of memory ({name}): {first}"
    if isinstance(e, (rx.WorkerCrashedError, rx.NodeDiedError, rx.LocalRayletDiedError)):
        return (f"the Ray worker running this recipe died before it finished ({name}): a crash in native code, "
                "an exit (os._exit, sys.exit), or the OS killing it (out of memory?); the task is not retried")
    if isinstance(e, rx.RayTaskError) and isinstance(e.cause, BaseException):
        name, first = type(e.cause).__name__, (str(e.cause).strip().splitlines() or [""])[0][:300]
        text = f"the Ray task running this recipe raised {name}: {first}"
    else:
        text = f"the Ray task running this recipe failed ({name}): {first}"
    if "No module named" in first:
        text += (" (what a task is given must be importable on the workers: modelpress, the model's classes, "
                 "eval_fn; or defined in the script run as __main__)")
    return text
