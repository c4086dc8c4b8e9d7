"""The one interface a technique plugs in through: a frozen config class registered under its YAML
key, and one handler registered for that class.

    @register_stage
    class MyConfig(StageConfig):
        key: ClassVar[str] = "mytechnique"
        strength: float = Field(gt=0, le=1)

    @handles(MyConfig)
    def apply(model, state, cfg: MyConfig, run: RunContext) -> None: ...

Several configs may share a key (`prune` is element, N:M, channel or block pruning): each variant
names the settings that select it in `route` (`{"granularity": ("block",)}`, or `...` for "present"),
and the one with an empty `route` is the default.
"""
from __future__ import annotations

import typing
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from torch import nn

from .errors import ModelpressError

STAGES: dict[str, list[type["StageConfig"]]] = {}
Handler = Callable[[nn.Module, Any, Any, Any], None]   # (model, CompressionState, config, RunContext)
HANDLERS: dict[type, Handler] = {}


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    key: ClassVar[str] = ""
    route: ClassVar[dict[str, Any]] = {}   # settings that select this variant of `key`
    trains: ClassVar[bool] = False         # a pure training stage (fine-tuning, distillation)
    exclude: tuple[str, ...] = ()          # extra layer-name patterns kept out of this stage only

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        """true / false are not 1 / 0 where a number is expected."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(v, bool) and {int, float} & {annotation, *typing.get_args(annotation)}:
            raise ValueError("must be a number, not true or false")
        return v

    def without_training(self) -> "StageConfig | None":
        """The stage's cheap form for screening candidates (auto): no training; None drops the stage."""
        return None if self.trains else self


def register_stage(cls: type[StageConfig]) -> type[StageConfig]:
    """Class decorator: make a config usable as a recipe stage under `cls.key`."""
    variants = STAGES.setdefault(cls.key, [])
    if not cls.route and any(not v.route for v in variants if v is not cls):
        raise ValueError(f"stage {cls.key!r} already has a default config; give {cls.__name__} a route")
    if cls not in variants:
        variants.append(cls)
    return cls


def handles(config_type: type[StageConfig]) -> Callable[[Handler], Handler]:
    """Register the function that applies stages of `config_type`."""
    def deco(fn: Handler) -> Handler:
        HANDLERS[config_type] = fn
        return fn
    return deco


def handler_for(cfg: StageConfig) -> Handler:
    handler = HANDLERS.get(type(cfg))
    if handler is None:
        raise ModelpressError(f"stage {cfg.key!r} ({type(cfg).__name__}) has no registered handler; register one "
                              f"with @modelpress.stage.handles({type(cfg).__name__})")
    return handler


class RouteError(ValueError):
    """Settings that select no variant of a stage, or two: `field` (None for a combination) and a phrase."""

    def __init__(self, field: str | None, phrase: str):
        super().__init__(phrase)
        self.field, self.phrase = field, phrase


def variant_for(key: str, settings: dict) -> type[StageConfig]:
    """The config class of `key` that `settings` select; RouteError if none or two do."""
    variants = STAGES[key]
    chosen = [c for c in variants if c.route and all(_selects(settings, f, v) for f, v in c.route.items())]
    if len(chosen) > 1:
        fields = sorted({f for c in chosen for f in c.route})
        raise RouteError(None, f"can't combine the settings {fields} in one stage")
    if chosen:
        return chosen[0]
    for c in variants:
        for f, allowed in c.route.items():
            if f in settings and allowed is not ...:
                values = routed_values(key, f)
                if not any(settings[f] == v and type(settings[f]) is type(v) for v in values):
                    raise RouteError(f, f"must be one of {values}")
    defaults = [c for c in variants if not c.route]
    if not defaults:
        raise RouteError(None, f"needs one of the settings {sorted({f for c in variants for f in c.route})}")
    return defaults[0]


def routed_values(key: str, name: str) -> list:
    """Every value of setting `name` that some variant of `key` accepts."""
    values: list = []
    for c in STAGES[key]:
        allowed = c.route.get(name)
        if allowed is None and name in c.model_fields:
            allowed = typing.get_args(c.model_fields[name].annotation)
        values += [v for v in (allowed if isinstance(allowed, tuple) else ()) if v not in values]
    return values


def _selects(settings: dict, name: str, allowed: Any) -> bool:
    if name not in settings:
        return False
    return allowed is ... or settings[name] in allowed
