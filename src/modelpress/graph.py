"""Which layers share a channel dimension, traced with torch.export, so that structured pruning removes
the same channel indices everywhere they appear.

The trace runs over the exported ATen graph and follows each tensor's channel axis (dim 1 of a conv
activation, the last dim of a Linear's) as a list of segments, each a run of channels of one *group*
(the output channels of one Conv or Linear, later merged with others by residual additions, gated
products or attention). Concatenation appends segments; flattening spreads each channel over the
positions that follow it; a reshape that splits the channel axis into (heads, head_dim) makes the
axis count *blocks* of head_dim channels, so attention heads are pruned whole, with q, k and v
coupled through the attention product and the output projection consuming the merged heads.
BatchNorm, LayerNorm and depthwise convs are coupled to their input's group; elementwise ops,
pooling, transposes and reductions over other axes carry the axis along.
Wherever the trace can't tell what an op does to the channel axis, the groups reaching it are frozen
(never pruned), and the op and its layer are named in `ChannelGraph.notes`. Groups that reach the
model's output are frozen too, so the output shape never changes."""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .errors import ModelpressError


@dataclass(frozen=True)
class Seg:
    group: int
    length: int   # channels
    inner: int = 1  # features per channel after a flatten


class Layout(tuple):
    """The segments of a tensor's channel axis, which axis that is (non-negative), and how many
    channels one index along it stands for (`block`: head_dim after a head split, else 1)."""

    def __new__(cls, segs, axis: int, block: int = 1):
        obj = super().__new__(cls, segs)
        obj.axis, obj.block = axis, block
        return obj

    def moved(self, axis: int) -> Layout:
        return Layout(self, axis, self.block)


@dataclass
class Group:
    size: int
    producers: list[str] = field(default_factory=list)   # Conv / Linear whose output channels these are
    coupled: list[str] = field(default_factory=list)     # BatchNorm, LayerNorm, depthwise conv on these channels
    frozen: bool = False
    block: int = 1   # channels are removed in whole blocks of this many (attention heads)
    why: list[str] = field(default_factory=list)   # what froze it ("output", or an op the trace can't follow)


@dataclass
class ChannelGraph:
    groups: dict[int, Group]
    consumers: dict[str, Layout]   # Conv / Linear -> the layout of its input channels
    notes: list[str] = field(default_factory=list)


def trace(model: nn.Module, example: Any) -> ChannelGraph:
    """The channel groups of `model`, traced on `example` inputs (a tensor, a tuple of tensors, or a
    dict of keyword tensors such as a tokenizer's batch)."""
    args, kwargs = ((), dict(example)) if isinstance(example, dict) else \
        (example if isinstance(example, tuple) else (example,), {})
    training = model.training
    model.eval()
    try:
        exported = torch.export.export(_TensorOutputs(model), args, kwargs, strict=False)
    except Exception as e:
        raise ModelpressError(f"structured pruning could not trace the model with torch.export ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200]}); it was left unchanged") from None
    finally:
        model.train(training)
    sig = exported.graph_signature
    owners = {k: v.removeprefix("model.") for k, v in {**sig.inputs_to_parameters, **sig.inputs_to_buffers}.items()}
    return _Tracer(model, exported.graph_module.graph, owners).run()


class _TensorOutputs(nn.Module):
    """The model with its output reduced to the tensors in it (dicts, tuples and lists opened), so that
    outputs export cannot represent (a transformers KV cache) don't stop the trace."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs) -> list[torch.Tensor]:
        return _tensors(self.model(*args, **kwargs))


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for v in value for t in _tensors(v)] if isinstance(value, (list, tuple)) else []


_UNARY = {"relu", "relu_", "relu6", "gelu", "gelu_", "silu", "silu_", "sigmoid", "tanh", "hardtanh", "hardswish",
          "hardsigmoid", "leaky_relu", "elu", "mish", "dropout", "feature_dropout", "clone", "contiguous", "alias",
          "to", "_to_copy", "detach", "neg", "abs", "exp", "sqrt", "rsqrt", "erf", "lift_fresh_copy",
          "hardtanh_"}
_POOLS = {"max_pool2d": 2, "avg_pool2d": 2, "adaptive_avg_pool2d": 2, "adaptive_max_pool2d": 2,
          "max_pool1d": 1, "avg_pool1d": 1, "adaptive_avg_pool1d": 1, "adaptive_max_pool1d": 1}
_ELEMENTWISE = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "rsub", "maximum", "minimum", "pow",
                "clamp", "clamp_min", "clamp_max"}  # tensor operands must broadcast along the channel axis
_BATCH_NORMS = {"batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
                "native_batch_norm"}
_IGNORED = {"_assert_tensor_metadata", "sym_size", "sym_numel", "_assert_scalar", "size", "dim"}
_RESHAPES = {"view", "reshape", "_unsafe_view", "flatten", "unflatten"}


class _Unknown(Exception):
    pass


class _Tracer:
    def __init__(self, model: nn.Module, graph: fx.Graph, owners: dict[str, str]):
        self.model, self.graph, self.owners = model, graph, owners
        self.parent: dict[int, int] = {}
        self.groups: dict[int, Group] = {}
        self.consumers: dict[str, Layout] = {}

    # -- groups ------------------------------------------------------------------------------------
    def new_group(self, size: int, producer: str, axis: int, frozen: bool = False) -> Layout:
        gid = len(self.parent)
        self.parent[gid] = gid
        self.groups[gid] = Group(size, [producer], frozen=frozen)
        return Layout((Seg(gid, size),), axis)

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def group(self, seg: Seg) -> Group:
        return self.groups[self.find(seg.group)]

    def union(self, a: Layout, b: Layout) -> bool:
        if a.axis != b.axis or a.block != b.block or \
                [(s.length, s.inner) for s in a] != [(s.length, s.inner) for s in b]:
            return False
        for x, y in zip(a, b):
            rx, ry = self.find(x.group), self.find(y.group)
            if rx != ry:
                self.parent[ry] = rx
                gx, gy = self.groups[rx], self.groups.pop(ry)
                gx.producers += gy.producers
                gx.coupled += gy.coupled
                gx.frozen |= gy.frozen
                gx.why += gy.why
                gx.block = math.lcm(gx.block, gy.block)
        return True

    def freeze(self, layout: Layout | None, why: str) -> None:
        for s in layout or ():
            self.group(s).frozen = True
            self.group(s).why.append(why)

    # -- the walk ----------------------------------------------------------------------------------
    def run(self) -> ChannelGraph:
        env: dict[fx.Node, Any] = {}
        for node in self.graph.nodes:
            ins = [la for a in node.all_input_nodes for la in _layouts(env.get(a))]
            try:
                env[node] = self.visit(node, env)
            except _Unknown as e:
                for layout in ins:
                    self.freeze(layout, f"{_layer(node)}: {e}")
                env[node] = None
        groups = {}
        for gid in list(self.groups):
            root = self.find(gid)
            groups[root] = self.groups[root]
        consumers = {k: Layout(tuple(Seg(self.find(s.group), s.length, s.inner) for s in v), v.axis, v.block)
                     for k, v in self.consumers.items()}
        # worth telling: the ops that froze channels the model's output does not pin anyway
        notes = dict.fromkeys(w for g in groups.values() if "output" not in g.why for w in g.why if w != "embedding")
        return ChannelGraph(groups, consumers, list(notes))

    def owner(self, node: Any) -> str | None:
        """The module that owns a parameter or buffer input, e.g. 'encoder.layer.0.attention.self.query'."""
        if isinstance(node, fx.Node) and node.op == "placeholder" and node.name in self.owners:
            return self.owners[node.name].rpartition(".")[0]
        return None

    def visit(self, node: fx.Node, env: dict) -> Any:
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            for a in node.all_input_nodes:
                for la in _layouts(env.get(a)):
                    self.freeze(la, "output")
            return None
        if node.target is operator.getitem:
            value = env.get(node.args[0])
            return value[node.args[1]] if isinstance(value, list) else None
        op = _opname(node.target)
        layouts = [la for a in node.all_input_nodes for la in _layouts(env.get(a))]
        src = env.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        src = src if isinstance(src, Layout) else None
        shape = _shape(node)
        if op == "linear":
            return self.linear(node, src, shape)
        if op in ("conv2d", "conv1d"):
            return self.conv(node, src)
        if op == "embedding":
            name = self.owner(node.args[0])
            layout = self.new_group(_shape(node.args[0])[1], name or "embedding", len(shape) - 1)
            self.freeze(layout, "embedding")  # its columns are not output channels; not pruned
            return layout
        if not layouts or op in _IGNORED:
            return None
        if src is not None and src.block > 1 and op in {"layer_norm"} | _BATCH_NORMS:
            raise _Unknown(f"aten.{op} over split attention heads")
        if op in _BATCH_NORMS:
            return self.norm(node, src, 1, node.args[3] if node.args[1] is None else node.args[1], multi=op != "batch_norm")
        if op == "layer_norm":
            if len(node.args[1]) != 1:
                raise _Unknown("aten.layer_norm over more than the channel axis")
            return self.norm(node, src, len(shape) - 1, node.args[2] if len(node.args) > 2 else None)
        if op in _UNARY and src is not None:
            return src
        if op in _POOLS and src is not None:
            if src.axis >= len(_shape(node.args[0])) - _POOLS[op]:
                raise _Unknown(f"aten.{op} pools over the channel axis")
            return [src, None] if op.startswith("adaptive_max") else src  # (values, indices)
        if op in ("constant_pad_nd", "pad") and src is not None:  # pads the last len(pad) / 2 axes
            if src.axis >= len(shape) - len(node.args[1]) // 2:
                raise _Unknown(f"aten.{op} pads the channel axis")
            return src
        if op in ("softmax", "_softmax", "log_softmax", "_log_softmax"):
            if src is None or node.args[1] % len(shape) == src.axis:
                raise _Unknown(f"aten.{op} over the channel axis")
            return src
        if op in _ELEMENTWISE:
            return self.elementwise(node, env, shape)
        if op == "cat":
            return self.concat(node, env, shape)
        if op in _RESHAPES:
            return self.reshape(src, _shape(node.args[0]), shape)
        if op in ("transpose", "t", "permute", "unsqueeze", "squeeze", "select", "slice", "expand", "mean", "sum",
                  "amax"):
            return self.move_axis(op, node, src, shape)
        if op in ("matmul", "bmm"):
            return self.matmul(node, env)
        if op == "scaled_dot_product_attention":
            return self.attention(node, env)
        raise _Unknown(f"the operation aten.{op} is not followed; the channels reaching it are kept")

    # -- layers ------------------------------------------------------------------------------------
    def module(self, node: fx.Node, types: tuple) -> tuple[str, nn.Module]:
        name = self.owner(node)
        m = self.model.get_submodule(name) if name is not None else None
        if not isinstance(m, types) or self.owners[node.name] != f"{name}.weight":
            raise _Unknown(f"a weight that is not a {types[0].__name__} layer's own is not followed")
        return name, m

    def linear(self, node: fx.Node, src: Layout | None, shape) -> Layout:
        name, m = self.module(node.args[1], (nn.Linear,))
        if name in self.consumers or any(name in g.producers for g in self.groups.values()):
            raise _Unknown(f"{name} is called more than once")
        if src is not None:
            if src.axis != len(shape) - 1 or src.block != 1:
                raise _Unknown(f"{name}: Linear does not act on the traced channel axis")
            self.consumers[name] = src
        return self.new_group(m.out_features, name, len(shape) - 1)

    def conv(self, node: fx.Node, src: Layout | None) -> Layout:
        name, m = self.module(node.args[1], (nn.Conv2d, nn.Conv1d))
        if src is not None and (src.axis != 1 or src.block != 1):
            raise _Unknown(f"{name}: convolution does not act on the traced channel axis")
        if name in self.consumers or any(name in g.producers or name in g.coupled for g in self.groups.values()):
            raise _Unknown(f"{name} is called more than once")
        depthwise = m.groups == m.in_channels == m.out_channels and m.groups > 1
        if depthwise and src is not None:
            if len(src) != 1 or src[0].inner != 1:
                raise _Unknown(f"{name}: depthwise convolution over a mixed channel axis")
            self.group(src[0]).coupled.append(name)
            return src
        if m.groups != 1:
            raise _Unknown(f"{name}: grouped convolution (groups={m.groups}) is not pruned")
        if src is not None:
            self.consumers[name] = src
        return self.new_group(m.out_channels, name, 1)

    def norm(self, node: fx.Node, src: Layout | None, axis: int, param: Any, multi: bool = False) -> Any:
        if src is None or src.axis != axis or len(src) != 1 or src[0].inner != 1:
            raise _Unknown(f"aten.{_opname(node.target)} over a mixed or untraced channel axis")
        name = self.owner(param)
        if name is not None:
            self.group(src[0]).coupled.append(name)
        return [src, None, None] if multi else src

    # -- tensor ops --------------------------------------------------------------------------------
    def elementwise(self, node: fx.Node, env: dict, shape) -> Layout:
        rank = len(shape)
        traced = [(a, env[a]) for a in node.all_input_nodes if isinstance(env.get(a), Layout)]
        aligned = [la.moved(la.axis + rank - len(_shape(a))) for a, la in traced]
        axis = aligned[0].axis
        for a in node.all_input_nodes:
            other = _shape(a)
            if isinstance(env.get(a), Layout) or not other:
                continue
            pos = axis - (rank - len(other))
            if pos >= 0 and other[pos] != 1:  # e.g. x * self.scale: a per-channel tensor pruning would not shrink
                raise _Unknown(f"aten.{_opname(node.target)} with a tensor that has no traced channel axis")
        for la in aligned[1:]:
            if not self.union(aligned[0], la):
                raise _Unknown(f"aten.{_opname(node.target)} of tensors with different channel layouts")
        return aligned[0]

    def concat(self, node: fx.Node, env: dict, shape) -> Layout:
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % len(shape)
        layouts = [env.get(t) for t in node.args[0] if _shape(t) is None or math.prod(_shape(t))]  # not empty
        if not all(isinstance(la, Layout) for la in layouts) or len({la.axis for la in layouts}) != 1:
            raise _Unknown(f"aten.cat along dim {dim} of traced and untraced tensors")
        if dim != layouts[0].axis:  # along another axis: the channels must line up
            for la in layouts[1:]:
                if not self.union(layouts[0], la):
                    raise _Unknown(f"aten.cat along dim {dim} of tensors with different channel layouts")
            return layouts[0]
        if any(la.block != 1 for la in layouts):
            raise _Unknown("aten.cat of split attention heads")
        return Layout([s for la in layouts for s in la], dim)

    def reshape(self, src: Layout | None, before, after) -> Layout:
        """Keep, flatten, split into (heads, head_dim) or merge back the channel axis; else unknown."""
        if src is None:
            raise _Unknown("aten.reshape of an untraced tensor")
        a = src.axis
        size, pre, post = before[a], math.prod(before[:a]), math.prod(before[a + 1:])
        plain = src.block == 1 and all(s.inner == 1 for s in src)
        for k in range(len(after)):
            if math.prod(after[:k]) != pre:
                continue
            if after[k] == size and math.prod(after[k + 1:]) == post:
                return src.moved(k)
            if k == len(after) - 1 and after[k] == size * post and src.block == 1:
                return Layout([Seg(s.group, s.length, s.inner * post) for s in src], k)
            if k + 1 < len(after) and after[k] * after[k + 1] == size and math.prod(after[k + 2:]) == post \
                    and plain and all(s.length % after[k + 1] == 0 for s in src):
                d = after[k + 1]
                for s in src:
                    self.group(s).block = math.lcm(self.group(s).block, d)
                return Layout(src, k, d)
            if src.block > 1 and a + 1 < len(before) and before[a + 1] == src.block and \
                    after[k] == size * src.block and math.prod(after[k + 1:]) == math.prod(before[a + 2:]):
                return Layout(src, k, 1)
        raise _Unknown(f"aten.reshape from {list(before)} to {list(after)}")

    def move_axis(self, op: str, node: fx.Node, src: Layout | None, shape) -> Layout:
        if src is None:
            raise _Unknown(f"aten.{op} of an untraced tensor")
        before = _shape(node.args[0])
        rank, a, args = len(before), src.axis, node.args[1:]
        if op in ("transpose", "t"):
            d0, d1 = (args[0] % rank, args[1] % rank) if args else (0, 1)
            return src.moved(d1 if a == d0 else d0 if a == d1 else a)
        if op == "permute":
            return src.moved([d % rank for d in args[0]].index(a))
        if op == "unsqueeze":
            d = args[0] % (rank + 1)
            return src.moved(a + (d <= a))
        if op in ("select", "slice", "expand", "squeeze", "mean", "sum", "amax"):
            if tuple(shape) == tuple(before):
                return src
            if op == "expand":  # new leading dims, or size-1 dims broadcast; the channel axis unchanged
                axis = a + len(shape) - rank
                if shape[axis] != before[a]:
                    raise _Unknown("aten.expand of the channel axis")
                return src.moved(axis)
            dims = args[0] if args else None
            dims = None if dims is None else [d % rank for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
            if op == "squeeze" and dims is None:
                dims = [i for i, n in enumerate(before) if n == 1]
            if not dims or a in dims:
                raise _Unknown(f"aten.{op} over the channel axis")
            keep = op == "slice" or op in ("mean", "sum", "amax") and \
                bool(args[1] if len(args) > 1 else node.kwargs.get("keepdim", False))
            return src if keep else src.moved(a - sum(d < a for d in dims))
        raise _Unknown(f"aten.{op}")

    def matmul(self, node: fx.Node, env: dict) -> Layout:
        """Batched products (attention scores, attention-weighted values): a traced batch axis must be
        the same in both operands and carries through; a traced row axis of the left operand too."""
        (x, y), rank = node.args[:2], len(_shape(node))
        lx, ly = env.get(x), env.get(y)
        lx, ly = (lx if isinstance(lx, Layout) else None), (ly if isinstance(ly, Layout) else None)
        batch = [la.moved(la.axis + rank - len(_shape(n))) for n, la in ((x, lx), (y, ly)) if la is not None]
        if all(la.axis < rank - 2 for la in batch) and len(batch) == 2 and self.union(*batch):
            return batch[0]
        if lx is not None and ly is None and lx.axis == len(_shape(x)) - 2:
            return lx.moved(rank - 2)
        raise _Unknown(f"aten.{_opname(node.target)} contracts or mixes the channel axis")

    def attention(self, node: fx.Node, env: dict) -> Layout:
        q, k, v = (env.get(a) for a in node.args[:3])
        if not all(isinstance(la, Layout) for la in (q, k, v)):
            raise _Unknown("attention over traced and untraced heads")
        rank = len(_shape(node))
        if any(la.axis >= rank - 2 for la in (q, k, v)) or not (self.union(q, k) and self.union(q, v)):
            raise _Unknown("attention whose q, k, v heads do not line up (grouped-query attention?)")
        return v


def _opname(target: Any) -> str:
    name = getattr(target, "__name__", str(target))   # 'linear.default'
    return name.split(".")[0]


def _layouts(value: Any) -> list[Layout]:
    if isinstance(value, Layout):
        return [value]
    return [v for v in value if isinstance(v, Layout)] if isinstance(value, list) else []


def _layer(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0].removeprefix("model") if stack else ""
    return path.removeprefix(".") or "the model"


def _shape(node: Any):
    val = getattr(node, "meta", {}).get("val")
    return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else None
