"""Recipes: an ordered list of stage configs plus what to keep out, validated as a whole.

Each stage is a frozen pydantic config that its technique registers under its YAML key (`stage.py`);
the config classes are the single source of truth and YAML is only their serialisation. Every problem
in a recipe is listed at once, naming the stage, the field and the bad value.

Recipe files may be careless or hostile: text is capped at 1 MiB, YAML aliases and nesting are
bounded while parsing, and every numeric field is finite and bounded, so each failure is a quick
RecipeError.
"""
from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from . import techniques  # noqa: F401  (registers every technique's stage config)
from .errors import RecipeError
from .safe_yaml import MAX_BYTES, cut, load_yaml, read_recipe_file
from .stage import STAGES, RouteError, StageConfig, variant_for
from .techniques.cluster import ClusterConfig  # noqa: F401  (the configs, for recipes built in Python)
from .techniques.distill import DistillConfig  # noqa: F401
from .techniques.finetune import FinetuneConfig  # noqa: F401
from .techniques.lowrank import FactorizeConfig  # noqa: F401
from .techniques.prune import PruneConfig  # noqa: F401
from .techniques.quantize import QuantizeConfig  # noqa: F401
from .techniques.structured import ChannelPruneConfig  # noqa: F401

MAX_PROBLEMS = 20     # listed in one message


class Recipe(BaseModel):
    """An ordered list of stages and the layer-name patterns every stage leaves alone."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    stages: tuple[StageConfig, ...]
    exclude: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: Any) -> "Recipe":
        """Validate a parsed recipe; raises RecipeError listing every problem."""
        if not isinstance(data, dict):
            raise RecipeError(f"A recipe must be a mapping with a 'stages' list. Got {type(data).__name__} instead.")
        problems, stages = [], []
        unknown = sorted(set(data) - {"stages", "exclude"}, key=str)
        if unknown:
            problems.append(f"Unknown top-level key(s) {_short(unknown)}; expected 'stages' and 'exclude'.")
        raw = data.get("stages")
        if not isinstance(raw, list) or not raw:
            problems.append("'stages' must be a non-empty list of stages, e.g. [{prune: {sparsity: 0.9}}].")
            raw = []
        for i, item in enumerate(raw, 1):
            stage, errs = _parse_stage(i, item)
            problems += errs
            if stage is not None:
                stages.append(stage)
        exclude = data.get("exclude", [])
        if exclude is None:
            exclude = []
        if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
            problems.append(f"'exclude' must be a list of layer-name patterns. Got {_short(exclude)} instead.")
            exclude = []
        if len(problems) > MAX_PROBLEMS:
            problems[MAX_PROBLEMS:] = [f"... and {len(problems) - MAX_PROBLEMS:,} more problems."]
        if problems:
            raise RecipeError("Invalid recipe:\n  - " + "\n  - ".join(problems))
        return cls(stages=tuple(stages), exclude=tuple(exclude))

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> "Recipe":
        """Parse YAML text or a path to a YAML file (at most 1 MiB either way)."""
        text = str(text_or_path)
        if len(text) > MAX_BYTES:
            raise RecipeError(f"The recipe text is {len(text):,} characters long; the cap is {MAX_BYTES:,} "
                              "(1 MiB). A recipe is a few lines of YAML: check what was passed.")
        if isinstance(text_or_path, Path) or text.endswith((".yaml", ".yml", ".json")) or _is_path(text):
            text = read_recipe_file(text)
        return cls.from_dict(load_yaml(text))

    def to_dict(self) -> dict:
        out: dict = {"stages": [{s.key: s.model_dump(mode="json", exclude_defaults=True)} for s in self.stages]}
        if self.exclude:
            out["exclude"] = list(self.exclude)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def preset(cls, name: str, model: Any = None) -> "Recipe":
        """A named recipe; see `PRESETS`. Given the model, the preset's form that fits it: the transformer
        form (`TRANSFORMER_PRESETS`) for a transformers model with attention and 2 or more layers, the
        attention form (`ATTENTION_PRESETS`) for another model with attention layers."""
        from .presets import ATTENTION_PRESETS, PRESETS, TRANSFORMER_PRESETS, has_attention
        from .techniques.blocks import counted_list

        if name not in PRESETS:
            raise RecipeError(f"Unknown preset {name!r}. Available presets: {sorted(PRESETS)}.")
        if model is None or not has_attention(model):
            return cls.from_yaml(PRESETS[name])
        layers = counted_list(model)
        forms = TRANSFORMER_PRESETS if layers and len(model.get_submodule(layers)) > 1 else ATTENTION_PRESETS
        return cls.from_yaml(forms.get(name, PRESETS[name]))


def _is_path(text: str) -> bool:
    """True if `text` names an existing file or folder (a long one-line YAML text is no file name)."""
    if "\n" in text:
        return False
    try:
        return Path(text).exists()
    except (OSError, ValueError):
        return False


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 200
_REPR.maxlevel = 3


def _short(value: Any) -> str:
    """repr(value) in at most about 200 characters, however large the value."""
    try:
        return cut(_REPR.repr(value))
    except Exception:  # e.g. an int too long to print
        return f"<{type(value).__name__}>"


def _parse_stage(i: int, item: Any) -> tuple[StageConfig | None, list[str]]:
    if not isinstance(item, dict) or len(item) != 1:
        return None, [f"Stage {i} must be a mapping with one technique key, e.g. {{prune: {{sparsity: 0.9}}}}. "
                      f"Got {_short(item)} instead."]
    key, settings = next(iter(item.items()))
    if key not in STAGES:
        return None, [f"Stage {i} has unknown technique {_short(key)}. Known techniques: {sorted(STAGES)}."]
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        return None, [f"The settings of stage {i} ({key}) must be a mapping. Got {_short(settings)} instead."]
    try:
        config = variant_for(key, settings)
    except RouteError as e:
        if e.field is None:
            return None, [f"Stage {i} ({key}) {e.phrase}."]
        return None, [f"The {e.field!r} of stage {i} ({key}) {e.phrase}. Got {_short(settings[e.field])} instead."]
    try:
        return config.model_validate(settings), []
    except ValidationError as e:
        return None, [_describe(i, key, config, err) for err in e.errors()]


def _describe(i: int, key: str, config: type[StageConfig], err: dict) -> str:
    field = cut(".".join(str(x) for x in err["loc"])) or "settings"
    if err["type"] == "extra_forbidden":
        allowed = sorted(f for f in config.model_fields)
        return f"Stage {i} ({key}) has unknown field {field!r}. Allowed fields: {allowed}."
    if err["type"] == "missing":
        return f"The {field!r} of stage {i} ({key}) is required."
    return f"The {field!r} of stage {i} ({key}) {_phrase(err)}. Got {_short(err.get('input'))} instead."


def _phrase(err: dict) -> str:
    ctx = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in err.get("ctx", {}).items()}
    bounds = {"greater_than": f"must be > {ctx.get('gt')}", "greater_than_equal": f"must be >= {ctx.get('ge')}",
              "less_than": f"must be < {ctx.get('lt')}", "less_than_equal": f"must be <= {ctx.get('le')}",
              "literal_error": f"must be one of {ctx.get('expected')}", "finite_number": "must be a finite number"}
    if err["type"] == "value_error":
        return str(ctx.get("error", err["msg"]))
    return bounds.get(err["type"], "is invalid: " + err["msg"][0].lower() + err["msg"][1:])
