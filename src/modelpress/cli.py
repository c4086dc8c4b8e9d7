"""The `modelpress` command: demo, compress, compare, auto, inspect, export."""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import ModelpressError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Make trained PyTorch models smaller and faster, and measure it.")
# in a log (not a terminal, no COLUMNS) rich would wrap tables at 80 columns
console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)
PLAIN_EVERY_S, PLAIN_MIN_GAP_S = 10.0, 1.0  # not on a terminal: progress lines this often, at most once a second


class Live:
    """A rich progress bar fed by the library's progress(label, fraction) callback; where the output is
    not a terminal (a log, a pipe), plain lines instead: on a new step or tenth done (at most one a
    second), and every PLAIN_EVERY_S seconds while progress is reported."""

    def __init__(self) -> None:
        self.bar = Progress(TextColumn("{task.description:<24}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                            TimeElapsedColumn(), console=console, transient=True)
        self.task = None
        self.plain = not console.is_terminal
        self.start = time.perf_counter()
        self.last_time = -float("inf")
        self.last: tuple[str, int] = ("", -1)

    def __enter__(self) -> "Live":
        self.bar.__enter__()
        self.task = self.bar.add_task("starting", total=1.0)
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, label: str, fraction: float) -> None:
        if not self.plain:
            self.bar.update(self.task, description=label, completed=fraction)
            return
        now, tenth = time.perf_counter(), int(fraction * 10)
        gap = now - self.last_time
        if gap >= PLAIN_EVERY_S or (label, tenth) != self.last and gap >= PLAIN_MIN_GAP_S:
            console.print(f"{escape(label)}: {fraction:.0%} ({now - self.start:.0f} s)", highlight=False)
            self.last, self.last_time = (label, tenth), now

    def stage(self, row) -> None:
        from .report import fmt_metric

        metrics = "  ".join(f"{k} {fmt_metric(v)}" for k, v in row.metrics.items())
        self.bar.console.print(f"[green]done[/] {row.stage:<12} {row.bytes:>10,} B  {row.ratio:7.1f}x  {metrics}")


@app.command()
def demo(model: str = typer.Option("lenet-300-100", help="lenet-300-100 or lenet5"),
         out: Path = typer.Option(Path("demo.mpz"), "-o", "--out", help="where to write the artifact"),
         recipe: str = typer.Option("deep-compression", help="preset name or YAML file"),
         epochs: int = typer.Option(0, help="fp32 training epochs (0: 30 for lenet-300-100, 20 for lenet5)"),
         seed: int = typer.Option(0),
         trained: Optional[Path] = typer.Option(None, help="also write the trained fp32 model, uncompressed, "
                                                "here (a model for `compare` and `auto`)")) -> None:
    """Train a LeNet on MNIST-5k (bundled, nothing downloaded), compress it and write the artifact."""
    import torch

    from . import api, data

    torch.manual_seed(seed)
    image = model.lower() in ("lenet5", "lenet-5")
    if not image and model.lower() != "lenet-300-100":
        raise typer.BadParameter(f"unknown demo model {model!r}; use lenet-300-100 or lenet5", param_hint="--model")
    split = data.mnist5k(image=image)
    net = data.lenet5() if image else data.lenet_300_100()
    epochs = epochs or (20 if image else 30)
    t = time.perf_counter()
    with console.status(f"training {model} in fp32 on MNIST-5k (4,000 digits) for {epochs} epochs"):
        data.train_classifier(net, split, epochs=epochs, seed=seed)
    console.print(f"trained {model}: test accuracy {data.accuracy(net, split.x_test, split.y_test):.2f}% "
                  f"in {time.perf_counter() - t:.1f} s")
    if trained is not None:
        from .format import mpz
        from .state import CompressionState

        size = mpz.save(trained, net, CompressionState())
        console.print(f"wrote the trained fp32 model to {trained} ({size:,} bytes)")
    evaluate = lambda m: {"acc": data.accuracy(m, split.x_test, split.y_test)}  # noqa: E731
    with Live() as live:
        result = api.compress(net, recipe, train_data=split.loader(64, seed=seed), eval_fn=evaluate,
                              progress=live, on_stage=live.stage)
    console.print(result.report.to_rich(title=f"{model} on MNIST-5k, recipe {recipe}"))
    size = result.save(out)
    loaded = api.load(out)
    same = torch.equal(loaded(split.x_test), result.model(split.x_test))
    console.print(f"wrote {out} ({size:,} bytes, {result.report.fp32_bytes / size:.1f}x smaller than fp32); "
                  f"reloaded: accuracy {data.accuracy(loaded, split.x_test, split.y_test):.2f}%, "
                  f"outputs bitwise identical: {same}")


def _load_model(spec: str):
    """A model from an .mpz file, a Hugging Face model folder, a Keras file (as its torch form, which
    carries the Keras config into the files made from it), or 'package.module:attr' (a Module or a
    callable returning one)."""
    from torch import nn

    from . import api

    if spec.endswith((".keras", ".h5")):
        from .keras_model import from_keras

        return from_keras(_keras_file(spec))

    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise typer.BadParameter(f"{spec} is a folder without config.json, not a Hugging Face model folder",
                                     param_hint="MODEL")
        try:  # a folder may come from anyone too: never its code, never the network
            from .sequential import hf_class

            return hf_class(Path(spec)).from_pretrained(spec, local_files_only=True, trust_remote_code=False).eval()
        except (OSError, ValueError) as e:
            raise ModelpressError(f"{spec}: cannot load the Hugging Face model in this folder: {e}") from None
    if spec.endswith(".mpz") or Path(spec).is_file():
        if _is_zip(spec):
            raise typer.BadParameter(
                f"{spec} is a TorchScript or torch.save archive, not an .mpz file; modelpress does not open those "
                "(loading one can run code it holds). Name the model's class as 'package.module:attr' (a function "
                "that builds it and loads its weights), or compress it from Python with modelpress.compress",
                param_hint="MODEL")
        return api.load(spec)
    if ":" not in spec:
        raise typer.BadParameter("MODEL must be an .mpz file, a Hugging Face model folder or 'package.module:attr'",
                                 param_hint="MODEL")
    mod_name, attr = spec.split(":", 1)
    obj = getattr(importlib.import_module(mod_name), attr)
    obj = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
    if not isinstance(obj, nn.Module):
        raise typer.BadParameter(f"{spec} is not an nn.Module", param_hint="MODEL")
    return obj


def _keras_file(spec: str):
    """A Keras model file (.keras, or a legacy .h5), read by Keras in its safe mode (no Lambda code, no
    custom objects) on the torch backend unless KERAS_BACKEND says otherwise."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as e:
        raise ModelpressError(f"{spec}: reading a Keras file needs Keras 3: pip install 'modelpress[keras]' "
                              f"({e})") from None
    try:
        return keras.saving.load_model(spec, compile=False, safe_mode=True)
    except Exception as e:  # Keras raises many kinds for a file it cannot read
        raise ModelpressError(f"{spec}: Keras cannot load this file ({type(e).__name__}: {str(e)[:300]})") from None


def _is_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _tokenizer(folder: str):
    """The folder's tokenizer (padding with end-of-text where it has no pad token), or None."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # no tokenizer files: calibration must come another way
        console.print(f"[yellow]no tokenizer in {folder} ({type(e).__name__}); no calibration text[/]")
        return None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:  # decoders often have none: batches pad
        tokenizer.pad_token = tokenizer.eos_token                         # with end-of-text, masked out
    return tokenizer


def _text_data(folder: str, model, texts: list[str], noise: bool = False, unseen: list[str] | None = None) -> dict:
    """calib_data, train_data, val_data and eval_fn from `texts` (paragraphs), for a model folder with a
    tokenizer. Held out, as val_data (where `fast` decides on its block removal) and for eval_fn
    (embedding fidelity for an encoder; next-token agreement and perplexity for a causal LM): up to 128
    paragraphs spread over `unseen`, a domain held out whole, else a fifth of `texts`, at most 64. Up to
    128 of the rest calibrate; all the rest, batched by length, are distilled on, with `noise` beside a
    copy whose words are 30% random vocabulary words (`data.vocabulary_noise`: built-in text is not the
    user's domain)."""
    import torch

    from . import data

    out = {"calib_data": None, "train_data": None, "val_data": None, "eval_fn": None}
    tokenizer = _tokenizer(folder)
    if tokenizer is None:
        return out
    length = min(128, int(getattr(model.config, "max_position_embeddings", 128) or 128),
                 int(getattr(tokenizer, "model_max_length", 128) or 128))
    if unseen:
        held, rest = unseen[::max(1, len(unseen) // 128)][:128], texts
    else:
        n = min(64, max(1, len(texts) // 5))
        held, rest = texts[-n:], texts[:-n]
    out["calib_data"] = data.text_batches(tokenizer, rest[:128], max_length=length)
    held_out = data.text_batches(tokenizer, held, batch_size=32, max_length=length)
    out["train_data"] = data.text_batches(tokenizer, rest + (data.vocabulary_noise(rest, tokenizer) if noise else []),
                                          max_length=length, by_length=True)
    try:
        with torch.no_grad():
            result = model(**held_out[0])
    except Exception:  # the held-out batch does not run: calibrate, but no built-in metric
        return out
    out["val_data"] = held_out
    generates = callable(getattr(model, "can_generate", None)) and model.can_generate()  # not a masked LM
    if generates and getattr(result, "logits", None) is not None and "input_ids" in held_out[0]:
        out["eval_fn"] = data.next_token_fidelity(model, held_out)  # a causal LM (its head kept)
    elif getattr(result, "last_hidden_state", None) is not None:
        out["eval_fn"] = data.embedding_fidelity(model, held_out)
    return out


_MODEL_HELP = "an .mpz file, a Hugging Face model folder, a Keras .keras / .h5 file, or 'package.module:attr'"
_DATA_HELP = ("built-in training data (mnist, mnist-image, digits, digits-image), or an .npz file of your own arrays "
              "in the layout the model takes: x_train [, y_train, x_val, y_val, x_test, y_test]; x_val is where "
              "compress's sparsity: auto stops, x_test where accuracy is measured")
_TEXT_HELP = ("a UTF-8 text file, paragraphs separated by blank lines, to calibrate, distill and measure a "
              "Hugging Face model on (default: English text from Python's own docs and docstrings, with a copy "
              "whose words are partly random vocabulary words)")


def _data_for(model: str, net, data_name: str | None, text: Path | None = None) -> dict:
    """train_data, calib_data, eval_fn and a latency example for MODEL: built-in digits (`--data`),
    or for a Hugging Face folder the paragraphs of `text` (else built-in English text); whatever is
    missing stays None."""
    from . import data

    out = {"train_data": None, "calib_data": None, "val_data": None, "eval_fn": None, "example": None}
    if text is not None and not Path(model).is_dir():
        raise typer.BadParameter("--text is for a Hugging Face model folder (it needs the folder's tokenizer)",
                                 param_hint="--text")
    if Path(model).is_dir() and not data_name:
        texts, unseen = (data.text_file_paragraphs(text), None) if text is not None else data.builtin_domains()
        what = text or "Python's pydoc topics; its docstrings held out to measure on"
        with console.status(f"tokenizing calibration text ({what})"):
            out.update(_text_data(model, net, texts, noise=text is None, unseen=unseen))
        if out["calib_data"]:
            out["example"] = out["calib_data"][0]
    if data_name and data_name.endswith(".npz"):
        return {**out, **_array_data(Path(data_name))}
    if data_name:
        loaders = {"mnist": lambda: data.mnist5k(False), "mnist-image": lambda: data.mnist5k(True),
                   "digits": lambda: data.digits(False), "digits-image": lambda: data.digits(True)}
        if data_name not in loaders:
            raise typer.BadParameter(f"unknown data {data_name!r}; choose from {sorted(loaders)}", param_hint="--data")
        split = loaders[data_name]()
        if split.x_train.dim() == 4 and _channels_last(net):  # a Keras model takes (N, H, W, C) images
            split = dataclasses.replace(split, **{k: getattr(split, k).permute(0, 2, 3, 1).contiguous()
                                                  for k in ("x_train", "x_test")})
        out["train_data"] = split.loader(64)
        out["eval_fn"] = lambda m: {"acc": data.accuracy(m, split.x_test, split.y_test)}
        out["example"] = split.x_test[:256]
    return out


def _array_data(path: Path) -> dict:
    """--data FILE.npz: the user's arrays as train_data (with y_train: labels, else self-distillation),
    val_data (x_val) and an accuracy eval_fn (x_test with y_test). NumPy's loader, without pickles."""
    import numpy as np

    from . import data
    from .batches import array_inputs, class_targets
    from .keras_model import array_batches

    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise typer.BadParameter(f"{path}: not a readable .npz file of arrays ({str(e)[:200]})",
                                 param_hint="--data") from None
    if "x_train" not in arrays or any(f"y_{k}" in arrays and f"x_{k}" not in arrays for k in ("train", "val", "test")):
        raise typer.BadParameter(f"{path} holds {sorted(arrays)[:10]}; it needs x_train, and may hold y_train, "
                                 "x_val, y_val, x_test, y_test (np.savez(path, x_train=..., y_train=...))",
                                 param_hint="--data")
    batches = lambda k, shuffle: array_batches(arrays[f"x_{k}"], arrays.get(f"y_{k}"), 64,  # noqa: E731
                                               shuffle=shuffle) if f"x_{k}" in arrays else None
    out = {"train_data": batches("train", True), "val_data": batches("val", False),
           "example": array_inputs(arrays.get("x_test", arrays["x_train"])[:256])}
    if "y_test" in arrays:
        x, y = array_inputs(arrays["x_test"]), class_targets(arrays["y_test"])
        out["eval_fn"] = lambda m: {"acc": data.accuracy(m, x, y)}
    return out


def _channels_last(net) -> bool:
    """True for a Keras model or its torch form (which starts by permuting channels-last input)."""
    from torch import nn

    from .keras_model import Permute, is_keras

    return is_keras(net) or (isinstance(net, nn.Sequential) and len(net) > 0 and isinstance(net[0], Permute))


@app.command()
def compress(model: str = typer.Argument(..., help=_MODEL_HELP),
             recipe: str = typer.Option(..., "--recipe", "-r", help="preset name or YAML file"),
             out: Path = typer.Option(..., "-o", "--out"),
             data_name: Optional[str] = typer.Option(None, "--data", help=_DATA_HELP),
             text: Optional[Path] = typer.Option(None, "--text", help=_TEXT_HELP),
             sequential: Optional[bool] = typer.Option(
                 None, "--sequential/--whole", help="a Hugging Face decoder folder compressed one block at a time, "
                 "in bounded memory (weight-only quantize recipes: w4, w3); by default when 7x its weights exceed "
                 "the memory available")) -> None:
    """Compress a model with a recipe and write the artifact."""
    from . import api

    if sequential is None:
        sequential = Path(model).is_dir() and _too_big(Path(model))
    if sequential:
        _compress_sequential(model, recipe, out, text)
        return
    net = _load_model(model)
    inputs = _data_for(model, net, data_name, text)
    with Live() as live:
        result = api.compress(net, recipe, train_data=inputs["train_data"], calib_data=inputs["calib_data"],
                              val_data=inputs["val_data"], eval_fn=inputs["eval_fn"], progress=live,
                              on_stage=live.stage)
    console.print(result.report.to_rich())
    console.print(f"wrote {out} ({result.save(out):,} bytes)")


def _too_big(folder: Path) -> bool:
    """Whether compressing the folder's model whole would need more than the memory available: about 7x
    its float32 weights (measured peak of a whole-model w4 run), against MemAvailable or a cgroup's cap."""
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors")) or \
        sum(f.stat().st_size for f in folder.glob("*.bin"))
    dtypes = {"float16": 2, "bfloat16": 2}
    try:
        width = dtypes.get(json.loads((folder / "config.json").read_text()).get("torch_dtype"), 4)
    except (OSError, ValueError, AttributeError):
        width = 4
    return 7 * weights * 4 / width > available_memory()


def available_memory() -> float:
    """Bytes this process may still take: MemAvailable, or less under a cgroup memory cap."""
    avail = float("inf")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         (v1 + "limit_in_bytes", v1 + "usage_in_bytes")):
        try:
            cap = Path(limit).read_text().strip()
            if cap != "max" and int(cap) < 1 << 60:
                avail = min(avail, int(cap) - int(Path(usage).read_text()))
        except (OSError, ValueError):
            continue
    return avail


def _compress_sequential(model: str, recipe: str, out: Path, text: Path | None) -> None:
    """`compress --sequential`: the folder's decoder one block at a time (modelpress.sequential)."""
    from . import api, data
    from .sequential import compress_sequential, quantize_stage

    if not Path(model).is_dir():
        raise typer.BadParameter("--sequential is for a Hugging Face decoder folder (safetensors weights)",
                                 param_hint="--sequential")
    plan = api.as_recipe(recipe)
    cfg = plan.stages[0] if len(plan.stages) == 1 else None
    if getattr(cfg, "sensitivity", None) == "output" and (cfg.avg_bits is not None or cfg.budget_mb is not None):
        plan = plan.model_copy(update={"stages": (cfg.model_copy(update={"sensitivity": "layer"}),)})
        console.print("sequential: per-layer bits from each layer's own output error (sensitivity: layer); the "
                      "whole model, which 'output' quantizes tensor by tensor, is never in memory")
    quantize_stage(plan)  # a clear error before any text is tokenized
    tokenizer = _tokenizer(model)
    if tokenizer is None:
        raise typer.BadParameter(f"{model} has no tokenizer: sequential compression calibrates on text",
                                 param_hint="MODEL")
    texts = data.text_file_paragraphs(text) if text is not None else data.builtin_domains()[0]  # as compress's
    config = json.loads((Path(model) / "config.json").read_text())
    length = min(128, int(config.get("max_position_embeddings") or 128),
                 int(getattr(tokenizer, "model_max_length", 128) or 128))
    calib = data.text_batches(tokenizer, texts[:128], max_length=length)
    with Live() as live:
        result = compress_sequential(model, plan, calib, out, progress=live)
    console.print(f"wrote {out} ({result.bytes:,} bytes, {result.ratio:.1f}x smaller than float32) in "
                  f"{result.seconds:.0f} s, block by block; peak resident memory {result.peak_rss_mb:,.0f} MB")


_RAY_HELP = ('run each recipe as a Ray task, in parallel (pip install "modelpress[ray]"): on a local Ray '
             "started for the run, or on the cluster of --ray-address")
_RAY_ADDRESS_HELP = "the Ray cluster to run on, e.g. ray://head:10001 or auto (implies --ray)"


def _executor(ray: bool, address: Optional[str]) -> dict:
    """compare's and auto's executor arguments from the --ray options."""
    return {"executor": "ray" if ray or address else "local", "ray_address": address}


@app.command(context_settings={"allow_extra_args": True})
def compare(ctx: typer.Context,
            model: str = typer.Argument(..., help=_MODEL_HELP),
            recipes: list[str] = typer.Option(..., "--recipes", help="preset names or YAML files, space-separated"),
            out: Path = typer.Option(..., "-o", "--out", help="folder for the artifacts, results.json and report.html"),
            data_name: Optional[str] = typer.Option(None, "--data", help=_DATA_HELP),
            text: Optional[Path] = typer.Option(None, "--text", help=_TEXT_HELP),
            repeats: int = typer.Option(20, help="timed calls of each model"),
            ray: bool = typer.Option(False, "--ray", help=_RAY_HELP),
            ray_address: Optional[str] = typer.Option(None, "--ray-address", help=_RAY_ADDRESS_HELP)) -> None:
    """Run several recipes from the same model and compare size, speed and the metric side by side."""
    from .compare import compare as run_compare

    recipes = list(recipes) + list(ctx.args)
    net = _load_model(model)
    inputs = _data_for(model, net, data_name, text)
    inputs.pop("val_data")  # compress's stopping data; compare measures every row on eval_fn or held-out data
    if inputs["train_data"] is None and inputs["calib_data"] is None and inputs["example"] is None:
        raise typer.BadParameter("no data to measure the models on: give --data, or a Hugging Face folder with a "
                                 "tokenizer", param_hint="--data")
    with Live() as live:
        comparison = run_compare(net, recipes, out_dir=out, repeats=repeats, progress=live, **inputs,
                                 **_executor(ray, ray_address))
    console.print(comparison.to_rich(title=f"{model}: {len(recipes)} recipes"))
    failed = [r.name for r in comparison.rows if r.error]
    if failed:
        console.print(f"[yellow]{len(failed)} recipe(s) failed: {', '.join(failed)} (their errors are in the table)[/]")
    console.print(f"wrote {out / 'results.json'}, {out / 'report.html'} and the artifacts")


@app.command()
def auto(model: str = typer.Argument(..., help=_MODEL_HELP),
         max_mb: Optional[float] = typer.Option(None, "--max-mb", help="largest file, in MB (10^6 bytes)"),
         max_latency_ms: Optional[float] = typer.Option(None, "--max-latency-ms", help="slowest call on the example batch"),
         min_ratio: Optional[float] = typer.Option(None, "--min-ratio", help="at least this many times smaller than fp32"),
         max_drop: Optional[float] = typer.Option(None, "--max-drop", help="largest loss of the metric, in its units"),
         out: Path = typer.Option(..., "-o", "--out", help="where to write the chosen artifact"),
         report: Optional[Path] = typer.Option(None, "--report", help="folder for the report of the full runs"),
         data_name: Optional[str] = typer.Option(None, "--data", help=_DATA_HELP),
         text: Optional[Path] = typer.Option(None, "--text", help=_TEXT_HELP),
         seed: int = typer.Option(0),
         ray: bool = typer.Option(False, "--ray", help=_RAY_HELP),
         ray_address: Optional[str] = typer.Option(None, "--ray-address", help=_RAY_ADDRESS_HELP)) -> None:
    """Search recipes for the most accurate one that meets a size or latency budget."""
    from .auto import auto as run_auto

    net = _load_model(model)
    inputs = _data_for(model, net, data_name, text)
    inputs.pop("val_data")  # compress's stopping data; auto measures on eval_fn or held-out data
    if inputs["train_data"] is None and inputs["calib_data"] is None:
        raise typer.BadParameter("no data to search with: give --data, or a Hugging Face folder with a tokenizer",
                                 param_hint="--data")
    with Live() as live:
        result = run_auto(net, max_mb=max_mb, max_latency_ms=max_latency_ms, min_ratio=min_ratio, max_drop=max_drop,
                          seed=seed, out_dir=report, progress=live, **inputs, **_executor(ray, ray_address))
    console.print(result.tried.to_rich(title="full runs of the best-ranked candidates that fit"))
    console.print(("[green]" if result.met else "[yellow]") + result.message + "[/]")
    console.print(f"wrote {out} ({result.save(out):,} bytes)")


_MAX_BYTES_HELP = "decode limit in bytes, for a trusted file that expands more than 1024x"


@app.command()
def inspect(path: Path = typer.Argument(..., help="an .mpz file"),
            max_bytes: Optional[int] = typer.Option(None, "--max-bytes", help=_MAX_BYTES_HELP)) -> None:
    """Where every byte of an artifact goes: per tensor kind, shape, bytes, sparsity, bits."""
    from .format.mpz import describe_file

    rows = describe_file(path, max_bytes=max_bytes)
    table = Table(title=escape(str(path)))
    for col in ("tensor", "encoding", "shape", "bytes", "sparsity", "bits", "bits/param"):
        table.add_column(col, justify="left" if col in ("tensor", "encoding") else "right")
    for r in rows:
        table.add_row(escape(r["name"]), escape(r["kind"]), "x".join(map(str, r["shape"])), f"{r['bytes']:,}",
                      f"{100 * r['sparsity']:.1f}%", str(r["bits"]), f"{r['bits_per_param']:.3f}")
    total = path.stat().st_size
    table.add_row("(header: manifest, architecture, checksums)", "", "", f"{total - sum(r['bytes'] for r in rows):,}",
                  "", "", "")
    console.print(table)
    params = sum(_numel(r["shape"]) for r in rows)
    console.print(f"{total:,} bytes in all; {params:,} values; {8 * total / max(1, params):.3f} bits per value")


@app.command()
def export(path: Path = typer.Argument(..., help="an .mpz file"),
           onnx: Optional[Path] = typer.Option(None, "--onnx", help="where to write the ONNX graph"),
           keras: Optional[Path] = typer.Option(None, "--keras", help="where to write a .keras file (for a file "
                                                "made from a Keras model): plain Keras, no modelpress needed"),
           hf: Optional[Path] = typer.Option(None, "--hf", help="a folder to write a Hugging Face model to, in "
                                             "compressed-tensors' pack-quantized layout (transformers' "
                                             "from_pretrained and vLLM load it; other files there are kept)"),
           gguf: Optional[Path] = typer.Option(None, "--gguf", help="where to write a GGUF file for llama.cpp (LLaMA, "
                                               "Mistral and Qwen2 decoder LMs)"),
           tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="with --gguf: the model's Hugging Face "
                                                    "folder, whose tokenizer.json goes into the file"),
           input_shape: Optional[str] = typer.Option(None, help="e.g. 1,784 or 1,1,28,28; by default the input "
                                                    "recorded at compress time, or a transformers config's"),
           nbits: bool = typer.Option(False, "--nbits", help="int8 and low-bit Linear layers as onnxruntime's "
                                      "MatMulNBits, holding the file's codes"),
           max_bytes: Optional[int] = typer.Option(None, "--max-bytes", help=_MAX_BYTES_HELP)) -> None:
    """Write an artifact as an ONNX graph that onnxruntime runs (int8 layers kept int8), as the Keras
    model it was made from, as a quantized Hugging Face folder, or as a GGUF file for llama.cpp."""
    from .export import recorded_input, to_onnx
    from .format import mpz

    if sum(x is not None for x in (onnx, keras, hf, gguf)) != 1:
        raise typer.BadParameter("give one of --onnx, --keras, --hf or --gguf", param_hint="--onnx / --keras / --hf / "
                                 "--gguf")
    if gguf is not None:
        from .export_gguf import to_gguf

        done = to_gguf(path, gguf, tokenizer=tokenizer, max_bytes=max_bytes)
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(done.types.items()))
        console.print(f"wrote {gguf} ({done.bytes:,} bytes; tensors: {kinds}; vocabulary: {done.vocab})")
        if tokenizer is None:
            console.print("[yellow]no --tokenizer: the file holds no vocabulary, and llama.cpp runs it on token ids "
                          "only[/]")
        return
    if hf is not None:
        from . import api
        from .export_hf import to_hf

        to_hf(api.load(path, max_bytes=max_bytes), hf)
        console.print(f"wrote {hf} (config.json, model.safetensors: "
                      f"{(hf / 'model.safetensors').stat().st_size:,} bytes)")
        return
    if keras is not None:
        if keras.suffix != ".keras":
            raise typer.BadParameter(f"{keras} must end in .keras (Keras writes its format by that name)",
                                     param_hint="--keras")
        os.environ.setdefault("KERAS_BACKEND", "torch")
        from . import api

        api.load(path, keras=True, max_bytes=max_bytes).save(keras)
        console.print(f"wrote {keras} ({keras.stat().st_size:,} bytes)")
        return
    manifest, streams, size = mpz.read(path)  # once: the model and the input it recorded
    model = mpz.from_parts(manifest, streams, size, max_bytes=max_bytes)  # (empties streams)
    try:
        shape = tuple(int(d) for d in input_shape.split(",")) if input_shape else None
    except ValueError:
        raise typer.BadParameter(f"{input_shape!r} is not a comma-separated list of ints", param_hint="--input-shape")
    to_onnx(model, onnx, input_shape=shape, nbits=nbits, recorded=recorded_input(manifest.get("meta")))
    console.print(f"wrote {onnx} ({onnx.stat().st_size:,} bytes)")


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main() -> None:
    try:
        app()
    except ModelpressError as e:
        console.print("[red]error:[/]", escape(str(e)))
        raise SystemExit(2) from None
    except OSError as e:  # a missing, unreadable or special file named on the command line
        console.print("[red]error:[/]", escape(f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")))
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
