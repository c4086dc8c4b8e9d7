"""Measurements beside the file size: the machine, compute (multiply-accumulates) and latency."""
from __future__ import annotations

import platform
import time
from typing import Callable

import torch


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), or what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """CPU, torch's CPU capability and thread count in one line, for benchmark headers."""
    return (f"CPU: {cpu_name()}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}; "
            f"{torch.get_num_threads()} threads")


@torch.no_grad()
def macs(model: torch.nn.Module, *inputs, **kw_inputs) -> int:
    """Multiply-accumulates of the Conv and Linear layers for one forward pass on these inputs
    (the layers that dominate; elementwise work and attention products are not counted)."""
    from .runtime import Int8Linear

    linear = (torch.nn.Linear, Int8Linear)
    convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    total = 0

    def hook(m, args, out):
        nonlocal total
        o = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(m, linear):
            total += o.numel() * m.in_features
        elif isinstance(m, convs):
            per_out = (m.in_channels // m.groups) * int(torch.tensor(m.kernel_size).prod())
            total += o.numel() * per_out

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, linear + convs)]
    try:
        model(*inputs, **kw_inputs)
    finally:
        for h in handles:
            h.remove()
    return total


@torch.no_grad()
def latencies(runs: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 3) -> dict[str, list[float]]:
    """Milliseconds per call of each run (e.g. a model on fixed inputs), timed round by round (one call
    of each per round) so that a slow phase of a shared machine hits every run alike."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t) * 1e3)
    return times


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters, and the integer weights runtime layers hold as buffers."""
    return list(model.parameters()) + [b for b in model.buffers() if b.dtype == torch.int8]
