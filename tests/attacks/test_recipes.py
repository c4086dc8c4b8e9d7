"""Hostile and careless recipe files against Recipe.from_yaml / from_dict and the CLI: each must be refused
with a RecipeError that names what is wrong, in bounded time and memory, with a message of bounded size."""
from __future__ import annotations

import os
import random
import resource
import subprocess
import sys
import time

import pytest

from modelpress import safe_yaml
from modelpress.errors import RecipeError
from modelpress.presets import ATTENTION_PRESETS, PRESETS, TRANSFORMER_PRESETS
from modelpress.recipe import Recipe

MAX_SECONDS = 2        # the bound is 1 s; this catches hangs on a busy machine
MAX_MESSAGE = 10_000   # characters: no message echoes a whole value back
GOOD = "stages: [{finetune: {epochs: 3}}]\n"


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    """A few hundred bytes of YAML that expand to width**levels strings."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nstages: *a{levels - 1}\n"


def python_laughs(levels: int = 9, width: int = 9) -> list:
    """The same expansion built in Python, shared by reference."""
    value: list = ["lol"] * width
    for _ in range(levels - 1):
        value = [value] * width
    return value


def refused(phrase: str, fn, *args) -> str:
    """fn(*args) raises a RecipeError containing `phrase`, quickly and with a short message."""
    t = time.perf_counter()
    with pytest.raises(RecipeError) as e:
        fn(*args)
    seconds = time.perf_counter() - t
    message = str(e.value)
    assert phrase in message, message[:MAX_MESSAGE]
    assert seconds < MAX_SECONDS, (seconds, message[:200])
    assert len(message) < MAX_MESSAGE, message[:MAX_MESSAGE]
    return message


# 1. alias bombs, and values echoed back in messages

@pytest.mark.parametrize("form", ["file", "text", "python"])
def test_alias_bomb_is_refused_quickly(form, tmp_path):
    text = billion_laughs()
    assert len(text) < 600
    if form == "file":
        (tmp_path / "bomb.yaml").write_text(text)
        refused("more than 10,000 values", Recipe.from_yaml, tmp_path / "bomb.yaml")
    elif form == "text":
        refused("more than 10,000 values", Recipe.from_yaml, text)
    else:  # a mapping built in Python: no parser to bound it, but its messages stay short
        refused("Stage 1 must be a mapping", Recipe.from_dict, {"stages": python_laughs()})
        refused("'epochs' of stage 1 (finetune)", Recipe.from_dict,
                {"stages": [{"finetune": {"epochs": python_laughs()}}]})


@pytest.mark.parametrize("text, phrase", [
    ("a: &a [*a]\nstages: *a", "repeats forever"),
    ("a: &a {b: *a}\nstages: [*a]", "repeats forever"),
    ("a: &a " + "x" * 100_000 + "\nstages: [" + ", ".join(["*a"] * 20) + "]", "characters of text"),
    ("stages: [" + ", ".join(["x"] * 20_000) + "]", "more than 10,000 values"),
])
def test_recursive_and_text_bombs_are_refused(text, phrase):
    refused(phrase, Recipe.from_yaml, text)


@pytest.mark.parametrize("text", [
    "stages: [{prune: {sparsity: 0.5, granularity: " + "x" * 100_000 + "}}]",
    "stages: [{finetune: {epochs: [" + ", ".join(["1"] * 5000) + "]}}]",
    "stages: [" + "y" * 100_000 + "]",
    "stages: [{finetune: {epochs: 1}}]\nexclude: [" + ", ".join(["[a]"] * 2000) + "]",
    "stages: [{finetune: {epochs: 1}}]\n" + "".join(f"k{i}{'z' * 300}: 1\n" for i in range(1000)),
])
def test_messages_cut_the_values_they_echo(text):
    message = refused("Invalid recipe", Recipe.from_yaml, text)
    assert "..." in message


@pytest.mark.parametrize("stage", [{"y" * 100_000: {}}, {"prune": {"y" * 100_000: 1, "sparsity": 0.5}},
                                   {"prune": {"sparsity": "s" * 100_000}}])
def test_messages_cut_long_names(stage):
    message = refused("Invalid recipe", Recipe.from_dict, {"stages": [stage]})
    assert "..." in message


# 2. size

def test_a_huge_file_is_refused_by_its_size(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:
        f.truncate(300 << 20)  # sparse: 300 MB by stat, nothing on disk
    refused("is 314,572,800 bytes; the cap is 1,048,576 bytes (1 MiB)", Recipe.from_yaml, path)
    refused("is 314,572,800 bytes", Recipe.from_yaml, str(path))


def test_huge_text_is_refused_by_its_length():
    text = GOOD + "# " + "x" * (2 << 20) + "\n"
    refused("characters long; the cap is 1,048,576 (1 MiB)", Recipe.from_yaml, text)


def test_a_file_just_under_the_cap_is_read(tmp_path):
    path = tmp_path / "commented.yaml"
    path.write_text("# " + "x" * ((1 << 20) - 100) + "\n" + GOOD)
    t = time.perf_counter()
    assert Recipe.from_yaml(path).stages[0].epochs == 3
    assert time.perf_counter() - t < MAX_SECONDS


CHILD = r'''
import resource, sys, time
from modelpress.errors import RecipeError
from modelpress.recipe import Recipe

# a hard cap: imports done, 200 MB of headroom for the parse
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize() + (200 << 20)
resource.setrlimit(resource.RLIMIT_AS, (vm, vm))
t = time.perf_counter()
try:
    Recipe.from_yaml(sys.argv[1])
except RecipeError as e:
    print(f"RecipeError in {time.perf_counter() - t:.3f} s: {e}")
'''


@pytest.mark.parametrize("name", ["bomb", "huge"])
def test_bomb_and_huge_file_stay_within_200_mb_in_a_child(name, tmp_path):
    path = tmp_path / f"{name}.yaml"
    if name == "bomb":
        path.write_text(billion_laughs())
    else:
        with open(path, "wb") as f:
            f.truncate(300 << 20)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("RecipeError in "), (proc.returncode, proc.stdout[:500],
                                                                                  proc.stderr[-2000:])
    assert float(proc.stdout.split()[2]) < MAX_SECONDS, proc.stdout[:300]


def _cap_memory():  # a hard cap for a child: an escape fails it, never the machine running the tests
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def test_the_cli_reports_a_bomb_as_an_error_without_a_traceback(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    proc = subprocess.run([sys.executable, "-m", "modelpress.cli", "compress", "torch.nn:Identity", "--recipe",
                           str(path), "-o", str(tmp_path / "out.mpz")], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, env={**os.environ, "COLUMNS": "200"},
                          preexec_fn=_cap_memory)
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "error:" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr, (proc.stdout, proc.stderr)
    assert "more than 10,000 values" in " ".join(proc.stdout.split())
    assert len(proc.stdout) < MAX_MESSAGE and not (tmp_path / "out.mpz").exists()


# 3. deep nesting

@pytest.mark.parametrize("text", [
    "[" * 5000 + "]" * 5000,
    "{a: " * 5000 + "1" + "}" * 5000,
    "- " * 5000 + "x",
    "".join("  " * i + "-\n" for i in range(500)),
    "stages: [{finetune: {epochs: " + "[" * 5000 + "]" * 5000 + "}}]",
])
def test_deep_nesting_is_refused(text):
    refused("nested too deeply: the cap is 64 levels", Recipe.from_yaml, text)


def test_yaml_recursion_cannot_escape(monkeypatch):
    monkeypatch.setattr(safe_yaml, "MAX_DEPTH", 10**9)  # as if the bound were missing
    refused("nested too deeply", Recipe.from_yaml, "[" * 5000 + "]" * 5000)


def test_deep_python_values_give_short_messages():
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    refused("Stage 1 must be a mapping", Recipe.from_dict, {"stages": deep})
    refused("'exclude' must be a list", Recipe.from_dict, {"stages": [{"finetune": {"epochs": 1}}], "exclude": deep})


# 4. binary files, and documents that are not a mapping

@pytest.mark.parametrize("content", [
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01" + bytes(64),
    random.Random(0).randbytes(4096),
    GOOD.encode("utf-16"),
])
def test_a_binary_file_is_not_utf8_text(content, tmp_path):
    path = tmp_path / "image.yaml"
    path.write_bytes(content)
    refused("is not UTF-8 text", Recipe.from_yaml, path)


@pytest.mark.parametrize("text, phrase", [
    ("", "Got NoneType"),
    ("- prune\n- cluster\n", "Got list"),
    ("just words", "Got str"),
    ("3", "Got int"),
    ("stages: [{finetune: {epochs: 1}}]\n---\nstages: []\n", "not valid YAML"),
    ("stages: !!python/object/apply:os.system [echo pwned]", "not valid YAML"),
    ("stages: \x00", "not valid YAML"),
    ("stages: [{cluster: {bits: " + "9" * 5000 + "}}]", "cannot be read"),
    ("stages: [{finetune: {epochs: 2024-02-30}}]", "cannot be read"),
])
def test_a_document_that_is_not_a_recipe_mapping(text, phrase, tmp_path):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    refused(phrase, Recipe.from_yaml, path)
    if text:
        refused(phrase, Recipe.from_yaml, text)


# 5. directories, special and unreadable files

def test_a_directory_is_named_a_directory(tmp_path):
    (tmp_path / "x.yaml").mkdir()
    refused("is a directory, not a file", Recipe.from_yaml, tmp_path / "x.yaml")
    refused("is a directory, not a file", Recipe.from_yaml, str(tmp_path / "x.yaml"))
    refused("is a directory, not a file", Recipe.from_yaml, str(tmp_path))
    refused("does not exist", Recipe.from_yaml, tmp_path / "missing.yaml")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_a_named_pipe_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.yaml")
    refused("is not a regular file", Recipe.from_yaml, tmp_path / "pipe.yaml")


def test_an_unreadable_file_names_the_os_error(tmp_path, monkeypatch):
    path = tmp_path / "secret.yaml"
    path.write_text(GOOD)
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: fail the open as it fails for a user
        def no_permission(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))
        monkeypatch.setattr(safe_yaml, "open", no_permission, raising=False)
    refused("cannot be read: PermissionError: Permission denied", Recipe.from_yaml, path)


# 6. numbers: finite, bounded, and not true / false

@pytest.mark.parametrize("stage, phrase", [
    ("finetune: {epochs: .inf}", "'epochs' of stage 1 (finetune) must be a finite number. Got inf instead."),
    ("finetune: {epochs: 1e12}", "'epochs' of stage 1 (finetune) must be <= 1000. Got '1e12' instead."),
    ("finetune: {epochs: 1.0e+12}", "'epochs' of stage 1 (finetune) must be <= 1000. Got 1000000000000.0 instead."),
    ("finetune: {epochs: .nan}", "must be a finite number. Got nan"),
    ("finetune: {epochs: 1, lr: .nan}", "'lr' of stage 1 (finetune) must be a finite number"),
    ("prune: {sparsity: 0.5, epochs: 1001}", "'epochs' of stage 1 (prune) must be <= 1000"),
    ("prune: {sparsity: .nan}", "'sparsity' of stage 1 (prune) must be a float in [0, 1)"),
    ("prune: {sparsity: auto, tolerance: -.inf}", "'tolerance' of stage 1 (prune) must be a finite number"),
    ("prune: {sparsity: 0.5, steps: .inf}", "'steps' of stage 1 (prune)"),
    ("distill: {epochs: 1, temperature: 1000}", "'temperature' of stage 1 (distill) must be <= 100"),
    ("distill: {epochs: .inf}", "'epochs' of stage 1 (distill) must be a finite number"),
    ("factorize: {rank: 2097152}", "'rank' of stage 1 (factorize) must be <= 1048576"),
    ("factorize: {energy: 0.9, min_rank: 1000000000}", "'min_rank' of stage 1 (factorize) must be <= 1048576"),
    ("quantize: {bits: 4, budget_mb: .inf}", "'budget_mb' of stage 1 (quantize) must be a finite number"),
    ("quantize: {bits: 4, budget_mb: 1.0e+8}", "'budget_mb' of stage 1 (quantize) must be <= 10000000"),
    ("quantize: {bits: 4, avg_bits: .nan}", "'avg_bits' of stage 1 (quantize) must be a finite number"),
    ("cluster: {bits: true}", "'bits' of stage 1 (cluster) must be a number, not true or false. Got True"),
    ("quantize: {bits: 4, group_size: yes}", "'group_size' of stage 1 (quantize) must be a number, not true"),
    ("finetune: {epochs: on}", "'epochs' of stage 1 (finetune) must be a number, not true or false"),
    ("factorize: {rank: true}", "'rank' of stage 1 (factorize) must be a number, not true or false"),
])
def test_numbers_are_finite_bounded_and_not_booleans(stage, phrase):
    refused(phrase, Recipe.from_yaml, f"stages: [{{{stage}}}]")


def test_honest_numbers_still_pass():
    r = Recipe.from_yaml("stages: [{cluster: {bits: 3.0}}, {finetune: {epochs: 1000, lr: 0.5}}, "
                         "{distill: {epochs: 2, temperature: 100}}, {factorize: {rank: 1048576}}, "
                         "{quantize: {bits: 4, budget_mb: 1.0e7}}, {prune: {sparsity: 0, granularity: channel, refit: false}}]")
    assert r.stages[0].bits == 3 and r.stages[1].epochs == 1000.0 and r.stages[5].refit is False
    assert Recipe.from_yaml(r.to_yaml()) == r
    for text in [*PRESETS.values(), *TRANSFORMER_PRESETS.values(), *ATTENTION_PRESETS.values()]:
        assert Recipe.from_yaml(Recipe.from_yaml(text).to_yaml()) == Recipe.from_yaml(text)


def test_a_long_list_of_problems_is_cut():
    message = refused("... and 4,980 more problems.", Recipe.from_dict, {"stages": [{"frobnicate": {}}] * 5000})
    assert message.count("unknown technique") == 20
