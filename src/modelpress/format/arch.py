"""A JSON description of a model, so a file can rebuild it without the user's code.

Two kinds are understood: a tree of standard `torch.nn` layers (and modelpress runtime layers),
and a Hugging Face `transformers` model (its class name and config, plus the layers modelpress
swapped in). Only classes on an allow-list are ever instantiated, with JSON-typed arguments:
torch.nn trees on the meta device (no memory is allocated before the weights are checked),
transformers classes that subclass `PreTrainedModel`, never remote code. Any other model is
described as None, and load() then needs a skeleton."""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
from typing import Any

import torch
from torch import nn

from ..errors import CorruptStream, ModelpressError, UnsafeArchitecture
from ..runtime import RUNTIME_MODULES
from . import guard

log = logging.getLogger(__name__)

_ALLOWED = {cls.__name__: cls for cls in (
    nn.Sequential, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d,
    nn.LayerNorm, nn.GroupNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
    nn.Hardswish, nn.ELU, nn.Softmax, nn.LogSoftmax, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout2d, nn.Identity, nn.Embedding, nn.ZeroPad1d, nn.ZeroPad2d,
)}
# layers that may stand in for a transformers layer (a runtime layer, Conv1D as Linear, or a pruned,
# smaller layer of the same type)
_STANDARD_SWAPS = {"Linear": nn.Linear, "LayerNorm": nn.LayerNorm, "Conv2d": nn.Conv2d, "Conv1d": nn.Conv1d,
                   "BatchNorm2d": nn.BatchNorm2d, "BatchNorm1d": nn.BatchNorm1d}


def _allowed() -> dict[str, type]:
    return _ALLOWED | RUNTIME_MODULES  # read at use: techniques register runtime layers at import


def _swappable() -> dict[str, type]:
    return _STANDARD_SWAPS | RUNTIME_MODULES
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
    """The model as JSON, or None if it is neither a transformers model nor built only from
    allow-listed layers."""
    spec = _describe_hf(model) if _is_hf(model) else _describe_tree(model)
    if spec is None:
        return None
    try:  # trust the description only if it rebuilds the same parameter and buffer shapes
        rebuilt = build(spec, device="meta")
    except Exception as e:  # any failure means the same thing: the file can't rebuild this model alone
        log.warning("the file will not hold the model's architecture (it does not rebuild: %s: %s); load it "
                    "with a skeleton: modelpress.load(path, model=...)", type(e).__name__, str(e)[:200])
        return None
    if _shapes(rebuilt) != _shapes(model):
        log.warning("the file will not hold the model's architecture (it rebuilds with other tensor shapes); "
                    "load it with a skeleton: modelpress.load(path, model=...)")
        return None
    return spec


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _describe_hf(model: nn.Module) -> dict | None:
    """Class and config, plus every layer whose type or shape differs from what the class builds
    (modelpress runtime layers, nn.Linear in place of transformers' Conv1D, layers pruned smaller)."""
    import transformers

    cls = type(model).__name__
    if getattr(transformers, cls, None) is not type(model):
        return None  # a subclass or remote code: not rebuildable from the library alone
    spec = {"hf": {"class": cls, "config": json.loads(model.config.to_json_string())}, "swaps": {}}
    try:
        reference = dict(_build_hf(spec, "meta").named_modules())
    except CorruptStream:
        return None
    for name, m in model.named_modules():
        ref = reference.get(name)
        if ref is not None and type(ref) is type(m) and (len(list(m.children())) or _ctor_args(ref) == _ctor_args(m)) \
                or any(name.startswith(s + ".") for s in spec["swaps"]):
            continue  # unchanged, or a part of a swapped-in layer (its constructor builds it)
        if _swappable().get(type(m).__name__) is not type(m) or (len(list(m.children())) and type(m).__name__
                                                                  not in RUNTIME_MODULES):
            return None
        args = _ctor_args(m)
        if args is None:
            return None
        spec["swaps"][name] = {"t": type(m).__name__, "a": args}
    return spec


def _describe_tree(model: nn.Module) -> dict | None:
    def node(m: nn.Module) -> dict | None:
        cls = type(m).__name__
        if _allowed().get(cls) is not type(m):
            return None
        if isinstance(m, nn.Sequential):
            kids = [node(c) for c in m]
            return None if any(k is None for k in kids) else {"t": cls, "c": kids}
        if len(list(m.children())) and cls not in RUNTIME_MODULES:  # runtime layers build their own parts
            return None
        args = _ctor_args(m)
        return None if args is None else {"t": cls, "a": args}

    return node(model)


def _shapes(m: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _from_json(v: Any) -> Any:
    if isinstance(v, dict):
        if set(v) != {"tuple"} or not isinstance(v["tuple"], list):
            raise CorruptStream(f"architecture: bad argument value {str(v)[:100]}")
        return tuple(_from_json(x) for x in v["tuple"])
    if isinstance(v, list):
        raise CorruptStream("architecture: bad argument value (list)")
    return v


def build(spec: Any, device: str = "meta", max_modules: int | None = None, max_bytes: int | None = None) -> nn.Module:
    """Instantiate a description; raises a FormatError on anything unexpected. It is first built on the meta
    device with its modules and tensors counted against the bounds (see `guard`); torch.nn trees stay there,
    a transformers model is then built on `device` ("cpu" when it will run: its non-persistent buffers are not
    in the file)."""
    is_hf = isinstance(spec, dict) and "hf" in spec
    try:
        with guard.bounded_construction(max_modules, max_bytes):
            model = _build_hf(spec, "meta") if is_hf else _build_tree(spec)
    except RecursionError:
        raise CorruptStream("architecture: nested too deeply") from None
    if is_hf and device != "meta":
        model = _build_hf(spec, device)
    return model


def _build_hf(spec: dict, device: str) -> nn.Module:
    try:
        import transformers
        from transformers import PreTrainedModel
    except ImportError:
        raise CorruptStream("this file holds a Hugging Face model; install transformers to load it") from None
    hf, swaps = spec.get("hf"), spec.get("swaps", {})
    if not isinstance(hf, dict) or not isinstance(hf.get("class"), str) or not isinstance(hf.get("config"), dict) \
            or not isinstance(swaps, dict):
        raise CorruptStream("architecture: malformed transformers description")
    cls = getattr(transformers, hf["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise CorruptStream(f"architecture: {hf['class'][:80]!r} is not a transformers model class")
    guard.check_hf_config(hf["config"])
    no_init = getattr(getattr(transformers.modeling_utils, "init", None), "no_init_weights", contextlib.nullcontext)
    try:
        with guard.offline():
            config = cls.config_class.from_dict(hf["config"])
            guard.check_hf_config(json.loads(config.to_json_string(use_diff=False)))  # with the defaults filled in
            with torch.device(device), no_init():
                model = cls(config)
    except ModelpressError:
        raise
    except Exception as e:
        raise CorruptStream(f"architecture: cannot build {hf['class']} from its config: {str(e)[:300]}") from None
    for name, sub in sorted(swaps.items()):
        owner, child = _swap_target(model, hf["class"], name)
        if not isinstance(sub, dict) or not isinstance(sub.get("t"), str) or sub["t"] not in _swappable():
            raise CorruptStream(f"architecture: layer {name!r} has a replacement that is not allowed")
        setattr(owner, child, _build_tree(sub))  # on meta: the file supplies all its tensors
    return model


def describe_swaps(model: nn.Module) -> dict:
    """The runtime layers (int8, factorized...) of a model whose architecture the file can't hold, by
    name: `load` rebuilds them inside the user's skeleton of the original class."""
    swaps: dict = {}
    for name, m in model.named_modules():
        inside = any(name.startswith(s + ".") for s in swaps)  # a part of a runtime layer already listed
        if not name or inside or RUNTIME_MODULES.get(type(m).__name__) is not type(m) or isinstance(m, nn.Sequential):
            continue  # a container's children are described where they are
        args = _ctor_args(m)
        if args is None:
            log.warning("layer %s (%s) can't be described in the file: a skeleton won't rebuild it", name,
                        type(m).__name__)
            continue
        swaps[name] = {"t": type(m).__name__, "a": args}
    return swaps


def swaps_of(spec: Any) -> dict:
    """The layers a skeleton must take from a stored architecture: a transformers description's swaps, or
    the runtime layers of a torch.nn tree, by name."""
    if not isinstance(spec, dict):
        return {}
    if "hf" in spec:
        swaps = spec.get("swaps")
        return swaps if isinstance(swaps, dict) else {}
    out: dict = {}

    def walk(node: Any, prefix: str, depth: int) -> None:
        if depth > _MAX_DEPTH or not isinstance(node, dict) or not isinstance(node.get("t"), str):
            raise CorruptStream("architecture: malformed layer description")
        if node["t"] == "Sequential" and isinstance(node.get("c"), list):
            for i, child in enumerate(node["c"]):
                walk(child, f"{prefix}.{i}" if prefix else str(i), depth + 1)
        elif node["t"] in RUNTIME_MODULES and prefix:
            out[prefix] = node

    walk(spec, "", 0)
    return out


def apply_swaps(model: nn.Module, swaps: Any, max_modules: int | None = None, max_bytes: int | None = None) -> None:
    """Put the file's layers (runtime layers, or standard layers of other shapes) in place of the
    skeleton's layers of the same names, on the meta device (the file supplies every tensor)."""
    if not isinstance(swaps, dict):
        raise CorruptStream("architecture: malformed layer replacements")
    cls = type(model).__name__
    with guard.bounded_construction(max_modules, max_bytes):
        for name, sub in sorted(swaps.items()):
            owner, child = _swap_target(model, cls, name)
            if not isinstance(sub, dict) or not isinstance(sub.get("t"), str) or sub["t"] not in _swappable():
                raise CorruptStream(f"architecture: layer {name[:200]!r} has a replacement that is not allowed")
            setattr(owner, child, _build_tree(sub))


def _swap_target(model: nn.Module, cls: str, name: str) -> tuple[nn.Module, str]:
    """(parent module, child name) of an existing layer that a swap replaces; never a parameter,
    a buffer or a private attribute."""
    parent, _, child = name.rpartition(".")
    try:
        owner = model.get_submodule(parent) if parent else model
    except AttributeError:
        owner = None
    if owner is None or not isinstance(owner._modules.get(child), nn.Module):
        raise CorruptStream(f"architecture: {cls} has no layer {name[:200]!r} to replace")
    return owner, child


def _build_tree(spec: Any, depth: int = 0) -> nn.Module:
    if depth > _MAX_DEPTH or not isinstance(spec, dict) or not isinstance(spec.get("t"), str):
        raise CorruptStream("architecture: malformed layer description")
    cls = _allowed().get(spec["t"])
    if cls is None:
        raise CorruptStream(f"architecture: layer type {spec['t']!r} is not allowed")
    if issubclass(cls, nn.Sequential):  # nn.Sequential, or a runtime container of branches (keras_model.Sum)
        kids = spec.get("c")
        if not isinstance(kids, list):
            raise CorruptStream(f"architecture: {spec['t']} without a list of children")
        if cls is not nn.Sequential and not kids:  # a container of branches runs at least one
            raise CorruptStream(f"architecture: {spec['t']} without branches")
        seq = cls()
        for k in kids:  # one by one, so the construction bounds stop a huge list early
            seq.append(_build_tree(k, depth + 1))
        return seq
    args = spec.get("a")
    if not isinstance(args, dict):
        raise CorruptStream(f"architecture: {spec['t']} without arguments")
    kwargs = {k: _from_json(v) for k, v in args.items()}
    _check_args(cls, kwargs)
    try:
        with torch.device("meta"):
            return cls(**kwargs)
    except ModelpressError:
        raise
    except Exception as e:  # bad arguments in a damaged or crafted file
        raise CorruptStream(f"architecture: cannot build {spec['t']}({str(kwargs)[:200]}): {str(e)[:200]}") from None


@functools.lru_cache(maxsize=None)
def _parameters(cls: type) -> Any:
    return inspect.signature(cls.__init__).parameters


def _check_args(cls: type, kwargs: dict) -> None:
    """Only named, public constructor arguments (never device or dtype), with bounded JSON values."""
    params = _parameters(cls)
    for k, v in kwargs.items():
        p = params.get(k)
        if p is None or k in _SKIP_ARGS or k.startswith("_") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise UnsafeArchitecture(f"architecture: {cls.__name__} takes no argument {k[:80]!r} from a file")
        guard.check_arg(cls.__name__, k, v, None if p.default is p.empty else p.default)
    guard.check_geometry(cls.__name__, kwargs)
