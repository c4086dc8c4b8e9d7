"""A seeded fuzz run: checksum-repaired mutations of real artifacts through load, a forward pass and
inspect raise nothing but modelpress errors (benchmarks/fuzz.py runs 100,000 in worker processes)."""
from __future__ import annotations

import importlib.util
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("fuzz", Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)

CASES = 3000


@pytest.fixture(scope="module")
def arts():
    return fuzz.artifacts()


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # mutated shapes with a 0
def test_mutations_raise_only_modelpress_errors(arts):
    names = sorted(arts)
    outcomes, crashes = Counter(), []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(CASES):
            manifest, streams, example = arts[names[i % len(names)]]
            try:
                data = fuzz.file_bytes(*fuzz.mutate(random.Random(i), manifest, streams))
            except (ValueError, TypeError, RecursionError):  # the writer refuses what JSON can't hold
                outcomes["unwritable"] += 1
                continue
            out = fuzz.run_one(data, example)
            outcomes[out.split(":")[0].split(" ")[0]] += 1
            if out.startswith("crash"):
                crashes.append((i, names[i % len(names)], out))
    finally:
        torch.set_num_threads(threads)
    assert not crashes, crashes[:5]
    # the mutations must reach the decoders: most files are refused, some load unharmed
    assert outcomes["refused"] > CASES // 2 and outcomes["loaded"] > CASES // 20, outcomes
