"""Which layers share a channel dimension, traced with torch.fx, so that structured pruning removes the
same channel indices everywhere they appear.

The trace follows each tensor's channel axis (dim 1 of a conv activation, the last dim of a Linear's)
as a list of segments, each a run of channels of one *group* (the output channels of one Conv2d or
Linear, later merged with others by residual additions). Concatenation appends segments; flattening
spreads each channel over the spatial positions that follow it; BatchNorm, LayerNorm and depthwise
convs are coupled to their input's group; elementwise ops and pooling pass the axis through.
Wherever the trace can't tell what an op does to the channel axis, the groups reaching it are frozen
(never pruned), and the op is named in `ChannelGraph.notes`. Groups that reach the model's output are
frozen too, so the output shape never changes."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import ModelpressError


@dataclass(frozen=True)
class Seg:
    group: int
    length: int   # channels
    inner: int = 1  # features per channel after a flatten


class Layout(tuple):
    """The segments of a tensor's channel axis, and which axis that is (non-negative)."""

    def __new__(cls, segs, axis: int):
        obj = super().__new__(cls, segs)
        obj.axis = axis
        return obj

_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.ELU,
                 nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_PASS_FUNCS = {F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.hardswish, F.elu, torch.relu, torch.sigmoid,
               torch.tanh, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, torch.nn.functional.sigmoid}
_PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "relu_", "float"}
_ELEMENTWISE = {operator.add, operator.iadd, operator.sub, operator.mul, torch.add, torch.sub, torch.mul}


@dataclass
class Group:
    size: int
    producers: list[str] = field(default_factory=list)   # Conv2d / Linear whose output channels these are
    coupled: list[str] = field(default_factory=list)     # BatchNorm, LayerNorm, depthwise conv on these channels
    frozen: bool = False


@dataclass
class ChannelGraph:
    groups: dict[int, Group]
    consumers: dict[str, Layout]   # Conv2d / Linear -> the layout of its input channels
    notes: list[str] = field(default_factory=list)


def trace(model: nn.Module, example: Any) -> ChannelGraph:
    """The channel groups of `model`, traced on `example` inputs (a tensor or a tuple of tensors)."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:
        raise ModelpressError(f"structured pruning could not trace the model with torch.fx ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); it was left unchanged") from None
    args = example if isinstance(example, tuple) else (example,)
    with torch.no_grad():
        ShapeProp(gm).propagate(*args)
    return _Tracer(gm).run()


class _Tracer:
    def __init__(self, gm: fx.GraphModule):
        self.gm, self.parent, self.groups, self.consumers, self.notes = gm, {}, {}, {}, []

    def new_group(self, size: int, producer: str, axis: int) -> Layout:
        gid = len(self.parent)
        self.parent[gid] = gid
        self.groups[gid] = Group(size, [producer])
        return Layout((Seg(gid, size),), axis)

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: Layout, b: Layout) -> bool:
        if a.axis != b.axis or [(s.length, s.inner) for s in a] != [(s.length, s.inner) for s in b]:
            return False
        for x, y in zip(a, b):
            rx, ry = self.find(x.group), self.find(y.group)
            if rx != ry:
                self.parent[ry] = rx
                gx, gy = self.groups[rx], self.groups.pop(ry)
                gx.producers += gy.producers
                gx.coupled += gy.coupled
                gx.frozen |= gy.frozen
        return True

    def freeze(self, layout: Layout | None, why: str | None = None) -> None:
        if layout:
            for s in layout:
                self.groups[self.find(s.group)].frozen = True
            if why:
                self.notes.append(why)

    def run(self) -> ChannelGraph:
        env: dict[fx.Node, Layout | None] = {}
        for node in self.gm.graph.nodes:
            ins = [env.get(a) for a in node.all_input_nodes]
            try:
                env[node] = self.visit(node, env)
            except _Unknown as e:
                for layout in ins:
                    self.freeze(layout)
                if any(ins):
                    self.notes.append(str(e))
                env[node] = None
        groups = {}
        for gid in list(self.groups):
            root = self.find(gid)
            groups[root] = self.groups[root]
        consumers = {k: tuple(Seg(self.find(s.group), s.length, s.inner) for s in v) for k, v in self.consumers.items()}
        return ChannelGraph(groups, consumers, self.notes)

    def visit(self, node: fx.Node, env: dict) -> Layout | None:
        shape = _shape(node)
        if node.op == "placeholder" or node.op == "get_attr":
            return None
        if node.op == "output":
            for a in node.all_input_nodes:
                self.freeze(env.get(a))
            return None
        src = env.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if node.op == "call_module":
            return self.module(node, self.gm.get_submodule(node.target), src, shape)
        fn = node.target
        if node.op == "call_method" and fn in _PASS_METHODS or fn in _PASS_FUNCS:
            return src
        if fn in _ELEMENTWISE or node.op == "call_method" and fn in ("add", "sub", "mul", "add_", "mul_"):
            layouts = [env.get(a) for a in node.all_input_nodes if env.get(a) is not None]
            others = [a for a in node.all_input_nodes if env.get(a) is None and _numel(_shape(a)) > 1]
            if layouts and others:  # e.g. x * self.scale: a tensor the pruning would not shrink
                raise _Unknown(f"{node.name}: {getattr(fn, '__name__', fn)} with a tensor that has no traced "
                               "channel axis")
            if len(layouts) == 2 and not self.union(*layouts):
                raise _Unknown(f"{node.name}: {fn} of tensors with different channel layouts")
            return layouts[0] if layouts else None
        if fn in (torch.cat, torch.concat):
            return self.concat(node, env, shape)
        if fn is torch.flatten or node.op == "call_method" and fn in ("flatten", "view", "reshape"):
            return self.flatten(node, src, shape)
        if node.op == "call_method" and fn in ("size", "dim") or fn is getattr:
            return None
        if node.op == "call_method" and fn == "mean":
            return self.reduce(node, src, shape)
        if src is None and not any(env.get(a) for a in node.all_input_nodes):
            return None
        raise _Unknown(f"{node.name}: the operation {getattr(fn, '__name__', fn)!r} is not followed; "
                       "the channels reaching it are kept")

    def module(self, node: fx.Node, m: nn.Module, src: Layout | None, shape) -> Layout | None:
        name = node.target
        rank = len(shape) if shape is not None else 2
        if src is not None:  # the traced axis must be the one this layer works on
            axis = None if isinstance(m, _PASS_MODULES + (nn.Flatten,)) else \
                (rank - 1 if isinstance(m, (nn.Linear, nn.LayerNorm)) else 1)
            if axis is not None and src.axis != axis:
                raise _Unknown(f"{name}: {type(m).__name__} does not act on the traced channel axis")
        if isinstance(m, nn.Conv2d):
            depthwise = m.groups == m.in_channels == m.out_channels and m.groups > 1
            if depthwise and src is not None:
                if len(src) != 1 or src[0].inner != 1:
                    raise _Unknown(f"{name}: depthwise convolution over a mixed channel axis")
                self.groups[self.find(src[0].group)].coupled.append(name)
                return src
            if m.groups != 1:
                raise _Unknown(f"{name}: grouped convolution (groups={m.groups}) is not pruned")
            if src is not None:
                self.consumers[name] = src
            return self.new_group(m.out_channels, name, 1)
        if isinstance(m, nn.Linear):
            if src is not None:
                self.consumers[name] = src
            return self.new_group(m.out_features, name, rank - 1)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if src is None or len(src) != 1 or src[0].inner != 1:
                raise _Unknown(f"{name}: BatchNorm over a mixed channel axis")
            self.groups[self.find(src[0].group)].coupled.append(name)
            return src
        if isinstance(m, nn.LayerNorm):
            if src is None or len(src) != 1 or len(m.normalized_shape) != 1:
                raise _Unknown(f"{name}: LayerNorm over more than the channel axis")
            self.groups[self.find(src[0].group)].coupled.append(name)
            return src
        if isinstance(m, _PASS_MODULES):
            return src
        if isinstance(m, nn.Flatten):
            return self.flatten(node, src, shape) if m.start_dim == 1 and m.end_dim == -1 else None
        raise _Unknown(f"{name}: layer type {type(m).__name__} is not followed; the channels reaching it are kept")

    def concat(self, node: fx.Node, env: dict, shape) -> Layout | None:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        layouts = [env.get(t) for t in tensors]
        if shape is not None and all(la is not None for la in layouts) and \
                len({la.axis for la in layouts}) == 1 and dim % len(shape) == layouts[0].axis:
            return Layout([s for la in layouts for s in la], layouts[0].axis)
        raise _Unknown(f"{node.name}: concatenation along dim {dim}")

    def flatten(self, node: fx.Node, src: Layout | None, shape) -> Layout | None:
        before = _shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if src is None or before is None or shape is None:
            return src
        if len(before) == 2 and tuple(shape) == tuple(before):
            return src
        if len(shape) == 2 and len(before) >= 3 and shape[0] == before[0] and src.axis == 1:
            inner = 1
            for d in before[2:]:
                inner *= d
            return Layout([Seg(s.group, s.length, s.inner * inner) for s in src], 1)
        raise _Unknown(f"{node.name}: reshape from {list(before)} to {list(shape)}")

    def reduce(self, node: fx.Node, src: Layout | None, shape) -> Layout | None:
        before = _shape(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        if src is not None and before is not None and dims:
            dims = {d % len(before) for d in dims}
            keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
            if src.axis not in dims and 0 not in dims:
                return Layout(src, src.axis if keep else src.axis - sum(d < src.axis for d in dims))
        raise _Unknown(f"{node.name}: mean over dims {dims}")


class _Unknown(Exception):
    pass


def _numel(shape) -> int:
    n = 1
    for d in shape or ():
        n *= d
    return n if shape else 0


def _shape(node: Any):
    meta = getattr(node, "meta", {}).get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
