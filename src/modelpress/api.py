"""The front door: compress() a model with a recipe, save the result, load() it back."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from torch import nn

from .batches import check_batches, reusable
from .context import RunContext
from .errors import ModelpressError, RecipeError
from .format import mpz
from .keras_model import keras_from_json, to_keras, torch_form
from .pipeline import check_weights, float_copy, run_pipeline
from .recipe import Recipe
from .report import Report, StageRow
from .state import CompressionState


@dataclass
class CompressionResult:
    """The compressed model (runnable, weights exactly as the file holds them), its report, the file's
    manifest and streams as the report measured them, and save()."""

    model: nn.Module
    report: Report
    state: CompressionState
    recipe: Recipe
    manifest: dict = field(repr=False, default_factory=dict)
    streams: dict[str, bytes] = field(repr=False, default_factory=dict)

    def save(self, path: str | os.PathLike) -> int:
        """Write the .mpz atomically: exactly the bytes the report's last row measured (the model as
        compress() returned it). Returns the file's size in bytes."""
        if not self.manifest:
            raise ModelpressError("this result holds no encoded file; build it with compress()")
        return mpz.write(path, self.manifest, self.streams)

    def layers(self) -> list[dict]:
        """Per tensor of the file: kind, shape, bytes, sparsity and bits."""
        return mpz.describe(self.manifest, self.streams)


def file_meta(recipe: Recipe, example: dict | None = None, keras_json: str | None = None) -> dict:
    """What a file records besides the tensors: the recipe that made it, the model's input (shape
    for a batch of 1, dtype) when it is one tensor, so that `export` needs no input shape, and the
    config of the Keras model it came from, so that `load` can give a Keras model back."""
    return {"recipe": recipe.to_dict(), **({"input": example} if example else {}),
            **({"keras": keras_json} if keras_json else {})}


def as_recipe(recipe: Recipe | str | Path | dict, model: nn.Module | None = None) -> Recipe:
    """A Recipe from a Recipe, a preset name (in its form for `model`), a YAML path or text, or a
    parsed mapping."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, Path)):
        from .presets import PRESETS

        if isinstance(recipe, str) and recipe in PRESETS:
            return Recipe.preset(recipe, model)
        if isinstance(recipe, str) and recipe.strip() and not any(c in recipe for c in ":\n{[") \
                and not recipe.endswith((".yaml", ".yml", ".json")) and not Path(recipe).exists():
            raise RecipeError(f"Unknown preset {recipe!r}. Available presets: {sorted(PRESETS)}; "
                              "or give a YAML file or YAML text.")
        return Recipe.from_yaml(recipe)
    raise RecipeError(f"recipe must be a Recipe, a preset name, a YAML path or text. Got {type(recipe).__name__}.")


def compress(model: nn.Module, recipe: Recipe | str | Path | dict, *, train_data: Iterable | None = None,
             calib_data: Iterable | None = None, val_data: Iterable | None = None,
             eval_fn: Callable[[nn.Module], float | dict] | None = None, loss_fn: Callable | None = None,
             progress: Callable[[str, float], None] | None = None,
             on_stage: Callable[[StageRow], None] | None = None) -> CompressionResult:
    """Compress a copy of `model` with `recipe`.

    train_data: iterable of `(inputs, targets)` batches (cross-entropy, or `loss_fn(outputs, targets)`)
        or of input-only batches (label-free self-distillation from the uncompressed model).
    calib_data: model-input batches for calibration-based techniques (GPTQ, per-layer bits); when
        not given, the inputs of train_data are used. A one-shot iterator (a generator) given as either
        is read into a list first, as each may be read several times.
    val_data: batches like train_data's that the original model did not train on (Keras's
        `validation_data`): `sparsity: auto` stops on them. Without it, a tenth of train_data is held out
        of recovery training, which the original did see: a model that memorized its training set loses
        that tenth as it shrinks, so the stop comes early.
    eval_fn: `eval_fn(model) -> float | dict`, measured before and after every stage.
    progress: called as `progress(label, fraction_done)` during long steps.
    on_stage: called with each report row as soon as it is measured.
    """
    model = torch_form(model)  # a Keras model's: to_keras(result.model, model) gives Keras back
    keras_json = getattr(model, "keras_config", None)  # a Keras model's, or one from_keras made
    if not isinstance(model, nn.Module):
        raise ModelpressError(f"model must be a torch.nn.Module or a Keras 3 model. Got {type(model).__name__} "
                              "instead.")
    check_weights(model)
    recipe = as_recipe(recipe, model)
    train_data, calib_data = reusable(train_data, "train_data"), reusable(calib_data, "calib_data")
    val_data = reusable(val_data, "val_data")
    teacher = float_copy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    example = check_batches(teacher, train_data, "train_data")
    example = check_batches(teacher, calib_data, "calib_data") or example
    check_batches(teacher, val_data, "val_data")
    run = RunContext(train_data=train_data, val_data=val_data, teacher=teacher, loss_fn=loss_fn, progress=progress,
                     calib_data=calib_data if calib_data is not None else train_data)
    out = run_pipeline(model, recipe, run, eval_fn=eval_fn, on_stage=on_stage,
                       meta=file_meta(recipe, example, keras_json))
    return CompressionResult(model=out.model, report=out.report, state=out.state, recipe=recipe,
                             manifest=out.manifest, streams=out.streams)


def load(path: str | os.PathLike | bytes, model: nn.Module | None = None, *, max_bytes: int | None = None,
         packed: bool = True, keras: bool | None = None):
    """A runnable model from a .mpz file. Pass a skeleton `model` of the original class when the file's
    architecture is not made only of standard torch.nn layers; its weights are replaced.

    With `packed` (the default) Linear and Embedding weights stored on a 2-8 bit grid stay packed in
    memory (`runtime.PackedLinear` / `PackedEmbedding`), so the loaded model holds about what the file
    does; `packed=False` gives plain fp32 layers. For speed on this CPU, pass the model to `accelerate`.

    Every file is treated as hostile: nothing in it runs code or reaches the network, and it may decode to
    at most `max_bytes` (default: 1024x the bytes of its streams, about its size, and at least 16 MiB);
    raise it for a trusted file that expands more.

    A file made from a Keras model loads as a Keras model (its recorded config rebuilt in Keras's safe
    mode, from the layer classes `from_keras` converts) when Keras is installed; `keras=False` gives the
    torch form instead, `keras=True` insists on Keras."""
    manifest, streams, size = mpz.read(path)
    keras_json = (manifest.get("meta") or {}).get("keras") if model is None and keras is not False else None
    if keras and not keras_json:
        raise ModelpressError("load(..., keras=True): the file was not made from a Keras model"
                              + (" (or a skeleton was given)" if model is not None else ""))
    if isinstance(keras_json, str) and (keras or importlib.util.find_spec("keras") is not None):
        net = mpz.from_parts(manifest, streams, size, max_bytes=max_bytes, packed=False)
        return to_keras(net, keras_from_json(keras_json))
    return mpz.from_parts(manifest, streams, size, model=model, max_bytes=max_bytes, packed=packed)
