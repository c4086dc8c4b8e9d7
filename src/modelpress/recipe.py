"""Recipes: an ordered list of stage configs plus what to keep out, validated as a whole.

Each stage is a frozen pydantic config registered under its YAML key; the config classes are the
single source of truth and YAML is only their serialisation. Every problem in a recipe is listed
at once, naming the stage, the field and the bad value.

Recipe files may be careless or hostile: text is capped at 1 MiB, YAML aliases and nesting are
bounded while parsing, and every numeric field is finite and bounded, so each failure is a quick
RecipeError.
"""
from __future__ import annotations

import reprlib
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from .errors import RecipeError
from .safe_yaml import MAX_BYTES, cut, load_yaml, read_recipe_file

MAX_PROBLEMS = 20     # listed in one message

STAGES: dict[str, type["StageConfig"]] = {}


def register_stage(cls: type["StageConfig"]) -> type["StageConfig"]:
    """Class decorator: make a config usable as a recipe stage under `cls.key`."""
    STAGES[cls.key] = cls
    return cls


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    key: ClassVar[str] = ""
    exclude: tuple[str, ...] = ()  # extra layer-name patterns kept out of this stage only

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        """true / false are not 1 / 0 where a number is expected."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(v, bool) and {int, float} & {annotation, *typing.get_args(annotation)}:
            raise ValueError("must be a number, not true or false")
        return v


@register_stage
class PruneConfig(StageConfig):
    """Pruning to `sparsity`: of single weights (granularity: element, with recovery training spread
    over the schedule), or of whole channels, neurons and attention heads, so layers shrink (channel:
    all of them; filter or neuron: conv filters and Linear neurons; head: attention heads). With
    `refit`, a Linear that loses inputs is refitted to its calibration outputs."""

    key: ClassVar[str] = "prune"
    sparsity: Union[float, Literal["auto"]]
    max_sparsity: float = Field(default=0.99, gt=0.0, lt=1.0)  # for sparsity: auto
    tolerance: float = Field(default=1.5, gt=0.0, le=100.0)    # points of top-1 agreement, for auto
    granularity: Literal["element", "channel", "filter", "neuron", "head"] = "element"
    criterion: Literal["magnitude", "taylor", "l1", "l2", "bn_scale", "activation"] = "magnitude"
    scope: Literal["global", "layer"] = "global"
    schedule: Literal["oneshot", "agp"] = "oneshot"
    steps: int = Field(default=10, ge=1, le=1000)
    epochs: float = Field(default=0.0, ge=0.0, le=1000)
    lr: float = Field(default=1e-3, gt=0.0, lt=1.0)
    refit: bool = True  # structured only

    @field_validator("sparsity", mode="before")
    @classmethod
    def _sparsity(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1):
            return v
        raise ValueError("must be a float in [0, 1) or 'auto'")

    @model_validator(mode="after")
    def _structured(self) -> "PruneConfig":
        if self.granularity == "element" and self.criterion in ("l1", "l2", "bn_scale", "activation"):
            raise ValueError(f"criterion {self.criterion!r} ranks whole channels; with granularity: element use "
                             "'magnitude' or 'taylor'")
        if self.granularity != "element" and self.sparsity == "auto":
            raise ValueError("sparsity: auto is for granularity: element; give structured pruning a number")
        return self


@register_stage
class ClusterConfig(StageConfig):
    """Weight sharing: per-layer k-means codebook of 2**bits values."""

    key: ClassVar[str] = "cluster"
    bits: int = Field(ge=1, le=8)
    include_bias: bool = True


@register_stage
class QuantizeConfig(StageConfig):
    """Uniform symmetric weight quantization (per output channel, or per group of `group_size` inputs),
    round-to-nearest or GPTQ; `activations: int8` runs 8-bit Linear layers as int8 x int8 products."""

    key: ClassVar[str] = "quantize"
    bits: int = Field(ge=2, le=8)
    group_size: Optional[int] = Field(default=None, ge=8, le=65536)
    method: Literal["rtn", "gptq"] = "rtn"
    activations: Literal["none", "int8"] = "none"
    embeddings: bool = True
    per_channel: bool = True
    include_bias: bool = False
    avg_bits: Optional[float] = Field(default=None, gt=0.0, le=8.0)    # per-layer bits: mean code bits per weight
    budget_mb: Optional[float] = Field(default=None, gt=0.0, le=10**7)  # per-layer bits: file size budget

    @model_validator(mode="after")
    def _consistent(self) -> "QuantizeConfig":
        if self.activations == "int8" and (self.bits != 8 or self.group_size is not None or not self.per_channel):
            raise ValueError("activations: int8 needs bits: 8, per_channel: true and no group_size "
                             f"(got bits={self.bits}, group_size={self.group_size}, per_channel={self.per_channel})")
        if self.avg_bits is not None and self.avg_bits < self.bits:
            raise ValueError(f"avg_bits ({self.avg_bits}) must be at least bits ({self.bits}): "
                             "'bits' is the lowest width any layer gets")
        if (self.avg_bits is not None or self.budget_mb is not None) and self.activations == "int8":
            raise ValueError("per-layer bits (avg_bits / budget_mb) are for weight-only quantization; "
                             "drop them or use activations: none")
        return self


@register_stage
class FactorizeConfig(StageConfig):
    """Low-rank factorization of Linear (SVD) and Conv2d (Tucker-2) layers; give exactly one of
    `rank`, `rank_ratio` (of each layer's full rank) or `energy` (share of squared singular values)."""

    key: ClassVar[str] = "factorize"
    rank: Optional[int] = Field(default=None, ge=1, le=2**20)
    rank_ratio: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    energy: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    min_rank: int = Field(default=8, ge=1, le=2**20)  # no layer goes below this rank

    @model_validator(mode="after")
    def _one_rule(self) -> "FactorizeConfig":
        given = [k for k in ("rank", "rank_ratio", "energy") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of rank, rank_ratio or energy (got {given or 'none'})")
        return self


@register_stage
class DistillConfig(StageConfig):
    """Recovery by distillation from the uncompressed model: label-free (targets are ignored), with
    softened logits at `temperature`, and with `hidden` the outputs of shared blocks matched too."""

    key: ClassVar[str] = "distill"
    epochs: float = Field(gt=0.0, le=1000)
    lr: float = Field(default=1e-4, gt=0.0, lt=1.0)
    temperature: float = Field(default=2.0, gt=0.0, le=100.0)
    hidden: bool = False


@register_stage
class FinetuneConfig(StageConfig):
    """Recovery training under the current masks / codebooks / grids (distillation if data has no labels)."""

    key: ClassVar[str] = "finetune"
    epochs: float = Field(gt=0.0, le=1000)
    lr: float = Field(default=1e-4, gt=0.0, lt=1.0)


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
        """A named recipe; see `PRESETS`. Given the model, a preset with a transformer form
        (`TRANSFORMER_PRESETS`) takes it when the model has attention layers."""
        from .presets import PRESETS, TRANSFORMER_PRESETS, has_attention

        if name not in PRESETS:
            raise RecipeError(f"Unknown preset {name!r}. Available presets: {sorted(PRESETS)}.")
        if name in TRANSFORMER_PRESETS and model is not None and has_attention(model):
            return cls.from_yaml(TRANSFORMER_PRESETS[name])
        return cls.from_yaml(PRESETS[name])


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
        return STAGES[key].model_validate(settings), []
    except ValidationError as e:
        return None, [_describe(i, key, err) for err in e.errors()]


def _describe(i: int, key: str, err: dict) -> str:
    field = cut(".".join(str(x) for x in err["loc"])) or "settings"
    if err["type"] == "extra_forbidden":
        allowed = sorted(f for f in STAGES[key].model_fields)
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
