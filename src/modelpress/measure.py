"""Facts about the machine that every measurement should state beside its figures."""
from __future__ import annotations

import platform

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
