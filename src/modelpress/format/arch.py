"""A JSON description of a model built only from standard `torch.nn` layers, so a file can rebuild
the model without the user's code. Only classes on an allow-list are ever instantiated, with
JSON-typed constructor arguments, on the meta device (no memory is allocated before the weights
are checked). Any other model is described as None, and load() then needs a skeleton."""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..errors import CorruptStream

_ALLOWED = {cls.__name__: cls for cls in (
    nn.Sequential, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d,
    nn.LayerNorm, nn.GroupNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
    nn.Hardswish, nn.ELU, nn.Softmax, nn.LogSoftmax, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Unflatten, nn.Dropout,
    nn.Dropout2d, nn.Identity, nn.Embedding,
)}
_SKIP_ARGS = {"self", "device", "dtype", "args", "kwargs", "_weight", "_freeze"}
_MAX_DEPTH = 64


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (tuple, list)):
        items = [_jsonable(x) for x in v]
        return None if any(x is _NO for x in items) else {"tuple": items}
    return _NO  # tensors and other objects cannot be constructor arguments in a file


_NO = object()


def _ctor_args(m: nn.Module) -> dict | None:
    args = {}
    for name, p in inspect.signature(type(m).__init__).parameters.items():
        if name in _SKIP_ARGS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name == "bias" and not isinstance(getattr(m, "bias", None), bool):
            if (getattr(m, "bias", None) is not None) != p.default:
                args[name] = getattr(m, "bias", None) is not None
            continue
        if not hasattr(m, name):
            if p.default is inspect.Parameter.empty:
                return None
            continue
        v = _jsonable(getattr(m, name))
        if v is _NO:
            return None
        if p.default is inspect.Parameter.empty or v != _jsonable(p.default):  # defaults are implied
            args[name] = v
    return args


def describe(model: nn.Module) -> dict | None:
    """The model as a JSON tree, or None if it is not built only from allow-listed torch.nn layers."""
    def node(m: nn.Module) -> dict | None:
        cls = type(m).__name__
        if _ALLOWED.get(cls) is not type(m):
            return None
        if isinstance(m, nn.Sequential):
            kids = [node(c) for c in m]
            return None if any(k is None for k in kids) else {"t": cls, "c": kids}
        if len(list(m.children())):
            return None
        args = _ctor_args(m)
        return None if args is None else {"t": cls, "a": args}

    spec = node(model)
    if spec is None:
        return None
    try:  # trust the description only if it rebuilds the same parameter and buffer shapes
        rebuilt = build(spec)
    except Exception:
        return None
    return spec if _shapes(rebuilt) == _shapes(model) else None


def _shapes(m: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _from_json(v: Any) -> Any:
    if isinstance(v, dict):
        if set(v) != {"tuple"} or not isinstance(v["tuple"], list):
            raise CorruptStream(f"architecture: bad argument value {v!r}")
        return tuple(_from_json(x) for x in v["tuple"])
    if isinstance(v, list):
        raise CorruptStream("architecture: bad argument value (list)")
    return v


def build(spec: Any, depth: int = 0) -> nn.Module:
    """Instantiate a description on the meta device; raises CorruptStream on anything unexpected."""
    if depth > _MAX_DEPTH or not isinstance(spec, dict) or not isinstance(spec.get("t"), str):
        raise CorruptStream("architecture: malformed layer description")
    cls = _ALLOWED.get(spec["t"])
    if cls is None:
        raise CorruptStream(f"architecture: layer type {spec['t']!r} is not allowed")
    if cls is nn.Sequential:
        kids = spec.get("c")
        if not isinstance(kids, list):
            raise CorruptStream("architecture: Sequential without a list of children")
        return nn.Sequential(*[build(k, depth + 1) for k in kids])
    args = spec.get("a")
    if not isinstance(args, dict):
        raise CorruptStream(f"architecture: {spec['t']} without arguments")
    kwargs = {str(k): _from_json(v) for k, v in args.items()}
    try:
        with torch.device("meta"):
            return cls(**kwargs)
    except Exception as e:  # bad arguments in a damaged or crafted file
        raise CorruptStream(f"architecture: cannot build {spec['t']}({kwargs}): {e}") from None
