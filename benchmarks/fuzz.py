"""Fuzzing the loader with checksum-repaired mutations of real artifacts.

Four artifacts are made here (seeded): an MLP pruned and weight-shared (masks and codebooks), the same
MLP at 4 bits in groups, a tiny BERT at int8 (int8 runtime layers, a transformers architecture), LeNet-5
with half its channels pruned, and an MLP factorized to low rank. Each mutation edits the manifest
(a value anywhere replaced by an odd one, a key dropped or added) and/or the streams (bit flips, byte
overwrites, truncation, growth, swaps, constant streams), and the file is rebuilt with the writer so
every checksum is valid and the mutation reaches the decoders. Each file then goes through `load`, a
forward pass of what loaded, and `describe_file` (inspect).

Outcomes: loaded (the mutation was harmless), refused (a ModelpressError), forward (it loaded, but the
architecture it now describes, e.g. another stride, does not run on the example input: reported, not a
loader failure), and the failures: crash
(any other exception), slow (over 1 s), memory (over 200 MB above the worker's start), abort (the
worker process died). Workers run with a 1 GiB address-space cap above their start and the network
blocked; a failure prints its case so it can be replayed with --replay SEED.

With --crafted it instead runs the crafted files of tests/attacks/test_files.py (one per class of
attack) through load and inspect in a child process and prints each one's error, time and peak memory.

Run: python benchmarks/fuzz.py [--cases 100000] [--workers 2] [--seed 0] [--crafted]
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "attacks"))
from hostile import cap_address_space, file_bytes, peak_mb_since, reset_peak  # noqa: E402

import modelpress as mp  # noqa: E402
from modelpress.errors import ModelpressError  # noqa: E402
from modelpress.format import mpz  # noqa: E402

ODD = [0, -1, 1, 2, 3, 7, 8, 16, 255, 256, 2 ** 16, 2 ** 31, 2 ** 40, 2 ** 63 - 1, -2 ** 63, 0.5, -0.0, 1e308, True,
       False, None, "", "x", "f32", "f16", "f64", "i8", "u8", "i64", "bool", "raw", "sp", "cb", "q", "ent", "alias",
       "weight", "Linear", "Sequential", "Int8Linear", "BertModel", "__init__", [], {}, [0], [1, 1], [2 ** 20, 2 ** 20],
       [[1]], {"tuple": [1]}, {"a": 1}]
SHORT_STREAMS = [b"", b"\x00", b"\x01", b"\x02", b"\x1f", b"\x1f\xff\xff", b"\x21", b"\x28\xff", b"\x40\x00",
                 b"\x40\xff\xff\xff", b"\x48\x01\x02\x03", b"\x60" + bytes(8), b"\xff" * 16]


def artifacts() -> dict[str, tuple[dict, dict, object]]:
    """name -> (manifest, streams, example input) of the artifacts mutated."""
    import transformers

    torch.manual_seed(0)
    out = {}
    x = torch.randn(64, 20)
    mlp = lambda: nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))  # noqa: E731
    recipes = {
        "mlp-masks-codebooks": {"stages": [{"prune": {"sparsity": 0.8}}, {"cluster": {"bits": 3}}]},
        "mlp-w4-groups": {"stages": [{"quantize": {"bits": 4, "group_size": 8}}], "exclude": []},
        "mlp-factorized": {"stages": [{"factorize": {"rank_ratio": 0.25, "min_rank": 2}}]},
    }
    for name, recipe in recipes.items():
        result = mp.compress(mlp(), recipe, calib_data=[x])
        out[name] = (*mpz.encode_model(result.model, result.state, {}), x[:4])
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16)
    bert = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 60, (4, 8))
    result = mp.compress(bert, "int8", calib_data=[{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    out["bert-int8"] = (*mpz.encode_model(result.model, result.state, {}), {"input_ids": ids[:2]})
    from modelpress.data import lenet5

    image = torch.randn(32, 1, 28, 28)
    result = mp.compress(lenet5(), {"stages": [{"prune": {"sparsity": 0.5, "granularity": "channel",
                                                          "criterion": "l1"}}]}, calib_data=[image])
    out["lenet5-channels"] = (*mpz.encode_model(result.model, result.state, {}), image[:2])
    return out


def _paths(node, path=()):
    """Every (path, value) in a JSON tree."""
    yield path, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield from _paths(v, path + (k,))


def _set(root, path, value):
    node = root
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


def mutate(rng: random.Random, manifest: dict, streams: dict[str, bytes]) -> tuple[dict, dict[str, bytes]]:
    """One to three random edits of a copy of (manifest, streams)."""
    manifest, streams = copy.deepcopy(manifest), dict(streams)
    for _ in range(rng.choice((1, 1, 2, 3))):
        op = rng.random()
        paths = [p for p, _ in _paths(manifest) if p]
        if op < 0.35:                                           # a value replaced
            path = rng.choice(paths)
            value = rng.choice(ODD) if rng.random() < 0.8 else copy.deepcopy(rng.choice(list(_paths(manifest)))[1])
            _set(manifest, path, copy.deepcopy(value))
        elif op < 0.45:                                         # an int nudged
            ints = [p for p, v in _paths(manifest) if p and type(v) is int]
            if ints:
                path = rng.choice(ints)
                node = manifest
                for k in path[:-1]:
                    node = node[k]
                node[path[-1]] += rng.choice((-2, -1, 1, 2, 7, 1000))
        elif op < 0.52:                                         # a key dropped or added
            dicts = [p for p, v in _paths(manifest) if isinstance(v, dict) and v]
            node = manifest
            for k in rng.choice(dicts) if dicts else ():
                node = node[k]
            if rng.random() < 0.5 and node:
                del node[rng.choice(list(node))]
            else:
                node[rng.choice(["masked", "group", "scale_planes", "k", "bits", "min", "of", "x"])] = rng.choice(ODD)
        elif streams:                                           # a stream edited
            key = rng.choice(sorted(streams))
            data = bytearray(streams[key])
            kind = rng.random()
            if kind < 0.3 and data:
                for _ in range(rng.randint(1, 4)):
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            elif kind < 0.45 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif kind < 0.6:
                data = data[:rng.randrange(len(data) + 1)]
            elif kind < 0.7:
                data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
            elif kind < 0.8:
                data = bytearray(streams[rng.choice(sorted(streams))])
            elif kind < 0.95:
                data = bytearray(rng.choice(SHORT_STREAMS))
            else:
                del streams[key]
                continue
            streams[key] = bytes(data)
    return manifest, streams


def _forward(model, example) -> None:
    with torch.no_grad():
        model(**example) if isinstance(example, dict) else model(example)


def run_one(data: bytes, example) -> str:
    """'loaded', 'refused', 'forward: ...' (loaded, but the model it describes does not run on the
    example: a valid file of another architecture) or 'crash in load|inspect: ...'."""
    outcome = "loaded"
    for step in ("load", "inspect"):
        try:
            if step == "load":
                model = mpz.load(data)
            else:
                mpz.describe_file(data)
        except ModelpressError:
            outcome = "refused"
            continue
        except Exception as e:  # noqa: BLE001 - the point is to find these
            return f"crash in {step}: {type(e).__module__}.{type(e).__name__}: {str(e)[:200]}"
        if step == "load":
            try:
                _forward(model, example)
            except Exception as e:  # noqa: BLE001
                outcome = f"forward: {type(e).__name__}: {str(e)[:200]}"
    return outcome


def worker(start: int, stop: int, seed: int) -> None:
    """Run cases [start, stop) and print one JSON line each (a 'begin' line first, so a death is located)."""
    import socket

    def no_network(*_a, **_k):
        raise OSError("network blocked by the fuzzer")

    socket.socket.connect = socket.create_connection = socket.getaddrinfo = no_network
    arts = artifacts()
    names = sorted(arts)
    cap_address_space()
    for i in range(start, stop):
        rng = random.Random(seed * 1_000_003 + i)
        name = names[i % len(names)]
        manifest, streams, example = arts[name]
        try:
            data = file_bytes(*mutate(rng, manifest, streams))
        except (ValueError, TypeError, RecursionError):
            print(json.dumps({"i": i, "art": name, "outcome": "unwritable"}), flush=True)
            continue
        print(json.dumps({"i": i, "begin": True}), flush=True)
        base = reset_peak()
        t = time.perf_counter()
        outcome = run_one(data, example)
        seconds = time.perf_counter() - t
        peak = peak_mb_since(base)
        print(json.dumps({"i": i, "art": name, "outcome": outcome, "s": round(seconds, 4),
                          "mb": round(peak, 1)}), flush=True)


def drive(cases: int, workers: int, seed: int) -> dict:
    """Run `cases` cases over `workers` processes, restarting a worker past a case that killed it."""
    spans = [[cases * w // workers, cases * (w + 1) // workers] for w in range(workers)]
    stats: dict = {"loaded": 0, "refused": 0, "unwritable": 0, "crash": [], "forward": [], "slow": [], "memory": [],
                   "abort": [],
                   "max_s": 0.0, "max_mb": 0.0, "per_artifact": {}}
    procs = {}

    def start(w):
        lo, hi = spans[w]
        procs[w] = subprocess.Popen([sys.executable, __file__, "--worker", str(lo), str(hi), "--seed", str(seed)],
                                    stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)

    for w in range(workers):
        start(w)
    done = 0
    t0 = time.time()
    while procs:
        for w, p in list(procs.items()):
            line = p.stdout.readline()
            if not line:
                p.wait()
                if spans[w][0] < spans[w][1]:  # died inside case spans[w][0]
                    stats["abort"].append({"i": spans[w][0], "exit": p.returncode})
                    spans[w][0] += 1
                    start(w)
                else:
                    del procs[w]
                continue
            r = json.loads(line)
            if r.get("begin"):
                continue
            spans[w][0] = r["i"] + 1
            done += 1
            kind = r["outcome"].split(":")[0].split(" ")[0]
            art = stats["per_artifact"].setdefault(r["art"], {"loaded": 0, "refused": 0, "unwritable": 0, "forward": 0,
                                                              "crash": 0})
            art[kind] += 1
            if kind in ("crash", "forward"):
                stats[kind].append(r)
            else:
                stats[kind] += 1
            if r.get("s", 0) > 1.0:
                stats["slow"].append(r)
            if r.get("mb", 0) > 200:
                stats["memory"].append(r)
            stats["max_s"] = max(stats["max_s"], r.get("s", 0))
            stats["max_mb"] = max(stats["max_mb"], r.get("mb", 0))
            if done % 5000 == 0:
                print(f"  {done:,} cases in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    stats["seconds"] = time.time() - t0
    return stats


def crafted() -> None:
    """The table of tests/attacks' crafted files: error, seconds and peak MB for load and inspect."""
    import tempfile

    from hostile import run_cases, write_cases
    from test_files import CRAFTED

    with tempfile.TemporaryDirectory() as folder:
        results = run_cases(write_cases(Path(folder), {name: make() for name, make in CRAFTED.items()}))
    print(f"{'crafted file':<30}{'load: error':<22}{'s':>7}{'MB':>7}   {'inspect: error':<22}{'s':>7}{'MB':>7}")
    for name in CRAFTED:
        cells = [results[f"{name}/{op}"] for op in ("load", "inspect")]
        print(f"{name:<30}" + "   ".join(f"{str(r['error'] or 'accepted'):<22}{r['seconds']:>7.3f}{r['peak_mb']:>7.1f}"
                                         for r in cells))
    escaped = [k for k, r in results.items() if r["error"] and not r["modelpress"] or r["events"]]
    print(f"{len(results)} runs: slowest {max(r['seconds'] for r in results.values()):.3f} s, largest peak "
          f"{max(r['peak_mb'] for r in results.values()):.1f} MB above the start, non-modelpress errors, network "
          f"or prompts: {len(escaped)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--replay", type=int, help="run case I in this process and show its traceback")
    ap.add_argument("--crafted", action="store_true", help="the crafted files of tests/attacks instead")
    args = ap.parse_args()
    if args.crafted:
        crafted()
        return
    torch.set_num_threads(1)
    if args.worker:
        worker(*args.worker, seed=args.seed)
        return
    if args.replay is not None:
        arts = artifacts()
        name = sorted(arts)[args.replay % len(arts)]
        manifest, streams, example = arts[name]
        data = file_bytes(*mutate(random.Random(args.seed * 1_000_003 + args.replay), manifest, streams))
        _forward(mpz.load(data), example)
        mpz.describe_file(data)
        print(f"case {args.replay} ({name}) loaded and inspected")
        return
    s = drive(args.cases, args.workers, args.seed)
    print(f"{args.cases:,} checksum-repaired mutations, seed {args.seed}, {args.workers} workers, "
          f"{s['seconds']:.0f} s")
    print(f"{'artifact':<22}{'loaded':>9}{'refused':>9}{'unwritable':>11}{'forward':>9}{'crash':>7}")
    for name, c in sorted(s["per_artifact"].items()):
        print(f"{name:<22}{c['loaded']:>9,}{c['refused']:>9,}{c['unwritable']:>11,}{c['forward']:>9,}{c['crash']:>7,}")
    print(f"crashes {len(s['crash'])}, aborts {len(s['abort'])}, slow (>1 s) {len(s['slow'])}, "
          f"over 200 MB {len(s['memory'])}; slowest case {s['max_s']:.3f} s, largest peak {s['max_mb']:.1f} MB")
    print(f"loaded but did not run on the example (a valid file of another architecture): {len(s['forward'])}")
    for kind in ("crash", "abort", "slow", "memory", "forward"):
        for r in s[kind][:10]:
            print(f"  {kind}: {r}")


if __name__ == "__main__":
    main()
