"""Keras 3 models in and out.

`from_keras` turns a Keras Sequential model, or a functional model whose forks are joined by `Add`
(residual blocks) or `Concatenate` (Inception blocks), into a `torch.nn.Sequential` of standard layers
that computes the same function on the same inputs (channels-last images, as Keras takes them); a fork
becomes a `Sum` or a `Cat` of one Sequential per branch. Every technique then applies to it, and its file rebuilds without user code. `to_keras` writes
the compressed weights back into a copy of the Keras model, with smaller layers where channel pruning
removed units or filters. Weights are read with `get_weights()` and written with `set_weights()`, so no
Keras backend is assumed (tested on torch).

Layouts: a Dense kernel is (in, out), a Conv kernel (k..., in, out), a DepthwiseConv2D kernel
(kh, kw, in, multiplier); torch wants (out, in, k...). A SeparableConv2D becomes two torch convolutions,
depthwise then 1x1. Padding "same" becomes torch's symmetric padding where that gives the same windows
(always at stride 1 with odd kernels; with strides, where the windows start at the same places; pooling
keeps its last windows with `ceil_mode`). An Embedding's (L, D) output and the LSTM / GRU / SimpleRNN
layers (`Recurrent`, around torch's own) follow the same channels-first layout as sequences. The images
are permuted to channels-first once, at the input; a Flatten after convolutions keeps torch's (C, H, W)
order and the next Dense's kernel rows are permuted from Keras's (H, W, C) order instead, so the torch
model stays a plain conv -> flatten -> Linear chain that structured pruning can trace. A final softmax is left out (the torch model returns
logits, which distillation and cross-entropy want; the argmax is the same) and `to_keras` keeps it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .batches import array_inputs, class_targets
from .errors import ModelpressError
from .runtime import Int8Linear, register_runtime_module


@register_runtime_module
class Permute(nn.Module):
    """x.permute(*dims): a Keras model's channels-last input made channels-first for torch's layers, copied
    to torch's default strides (one channel included, which `contiguous()` leaves channels-last strided):
    channels-last strides would take oneDNN's channels-last convolutions all the way down, and their
    backward crashes the process for a 1x1 stride-2 Conv2d (torch 2.13 CPU)."""

    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        self.dims = tuple(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims).clone(memory_format=torch.contiguous_format)


@register_runtime_module
class Sum(nn.Sequential):
    """Runs every branch (a child Sequential; an empty one passes the input through) on the same input and
    adds the results: a Keras `Add` that joins the branches of a fork, as in a residual block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = list(self)
        out = branches[0](x)
        for branch in branches[1:]:
            out = out + branch(x)
        return out


@register_runtime_module
class Cat(nn.Sequential):
    """Runs every branch on the same input and concatenates the results along the channels (dim 1): a
    Keras `Concatenate` that joins the branches of a fork, as in an Inception block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self], dim=1)


@register_runtime_module
class Recurrent(nn.Module):
    """A Keras LSTM, GRU or SimpleRNN (or a Bidirectional one, its two directions' outputs concatenated) on
    the channels-first sequences (B, C, L) the other layers here pass: the final state (B, units), or with
    `return_sequences` every step's output (B, units, L)."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, bias: bool = True,
                 return_sequences: bool = False, bidirectional: bool = False):
        super().__init__()
        if mode not in _RNNS:
            raise ModelpressError(f"Recurrent: mode {str(mode)[:20]!r} is not one of {sorted(_RNNS)}")
        self.mode, self.input_size, self.hidden_size, self.bias = mode, input_size, hidden_size, bias
        self.return_sequences, self.bidirectional = return_sequences, bidirectional
        self.rnn = _RNNS[mode](input_size, hidden_size, bias=bias, batch_first=True, bidirectional=bidirectional)

    @property
    def directions(self) -> tuple[str, ...]:
        """The suffixes of torch's parameter names per direction, forward first: weight_ih_l0, ..._l0_reverse."""
        return ("_l0", "_l0_reverse")[:1 + self.bidirectional]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, state = self.rnn(x.transpose(1, 2))
        if self.return_sequences:
            return out.transpose(1, 2)
        h = state[0] if isinstance(state, tuple) else state  # an LSTM's (h, c); (directions, B, units)
        return torch.cat(tuple(h[-2:] if self.bidirectional else h[-1:]), dim=1)


_RNNS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "SimpleRNN": nn.RNN}
_JOINS = {"Add": Sum, "Concatenate": Cat}
_ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU,
                "silu": nn.SiLU, "swish": nn.SiLU, "elu": nn.ELU, "hard_swish": nn.Hardswish,
                "leaky_relu": lambda: nn.LeakyReLU(0.2)}  # Keras's default slope, not torch's 0.01
SUPPORTED = ("InputLayer", "Dense", "Conv1D", "Conv2D", "DepthwiseConv2D", "SeparableConv2D", "MaxPooling1D",
             "MaxPooling2D", "AveragePooling1D", "AveragePooling2D", "GlobalAveragePooling1D", "GlobalAveragePooling2D",
             "GlobalMaxPooling1D", "GlobalMaxPooling2D", "Flatten", "Dropout", "Activation", "ReLU", "Softmax",
             "BatchNormalization", "ZeroPadding1D", "ZeroPadding2D", "Embedding", "Bidirectional", *_JOINS,
             *_RNNS)


@dataclass
class _Link:
    """One Keras layer with weights and the torch module that holds them."""

    keras_name: str
    kind: str                      # dense, conv, depthwise, bn, embedding, or LSTM / GRU / SimpleRNN
    path: str                      # the torch module's name in the converted model ("3", or "5.1.0" in a branch)
    flat_from: tuple[int, ...] = ()  # a Dense after Flatten: the (C, H, W) its rows come from
    part: tuple[int, int | None] = (0, None)  # the Keras layer's weights this module holds: get_weights()[a:b]


@dataclass
class _Builder:
    """One Sequential being built (the model, or one branch of a fork)."""

    layers: list[nn.Module] = field(default_factory=list)
    links: list[_Link] = field(default_factory=list)  # shared by the model and all its branches
    shape: tuple[int, ...] = ()    # one sample's shape in torch's layout (channels first)
    flat_from: tuple[int, ...] = ()
    prefix: str = ""               # the path of this Sequential in the model, with a trailing dot

    def add(self, m: nn.Module) -> str:
        self.layers.append(m)
        return f"{self.prefix}{len(self.layers) - 1}"

    def branch(self, j: int) -> _Builder:
        """A builder for branch j of the Sum or Cat that will be added next."""
        return _Builder(links=self.links, shape=self.shape, flat_from=self.flat_from,
                        prefix=f"{self.prefix}{len(self.layers)}.{j}.")


def is_keras(model: Any) -> bool:
    """True for a Keras 3 model (on any backend)."""
    return any(c.__module__.startswith("keras.") and c.__name__ == "Model" for c in type(model).__mro__)


class _Graph:
    """A functional Keras model's wiring: which layers take each tensor, and what each layer takes and gives."""

    def __init__(self, model):
        self.model, self.users, self._reach = model, {}, {}
        for layer in model.layers:
            if len(getattr(layer, "_inbound_nodes", [])) != 1:
                raise ModelpressError(f"Keras model '{model.name}': layer '{layer.name}' is called "
                                      f"{len(getattr(layer, '_inbound_nodes', []))} times; layers shared between "
                                      "calls (or nested models) do not convert")
            for t in self.ins(layer):
                self.users.setdefault(id(t), []).append(layer)

    @staticmethod
    def ins(layer) -> list:
        return list(layer._inbound_nodes[0].input_tensors)

    @staticmethod
    def out(layer):
        outs = layer._inbound_nodes[0].output_tensors
        if len(outs) != 1:
            raise ModelpressError(f"Keras layer '{layer.name}' has {len(outs)} outputs; one converts")
        return outs[0]

    def reach(self, layer) -> frozenset:
        """The layers downstream of `layer`, itself included."""
        if id(layer) not in self._reach:
            below = [self.reach(u) for u in self.users.get(id(self.out(layer)), [])]
            self._reach[id(layer)] = frozenset([id(layer)]).union(*below)
        return self._reach[id(layer)]

    def meeting(self, users: list):
        """The first layer every one of `users` leads to: where the branches of a fork join."""
        common = frozenset.intersection(*(self.reach(u) for u in users))
        for layer in self.model.layers:
            if id(layer) in common and self.reach(layer) >= common:
                return layer
        raise ModelpressError(f"Keras model '{self.model.name}': the branches that start at layers "
                              f"{[u.name for u in users]} never join; models with several outputs do not convert")


def torch_form(model: Any) -> Any:
    """`from_keras(model)` for a Keras model (its torch form carries the Keras config, so that every file
    made from it loads back as Keras); any other model as it is."""
    return from_keras(model) if is_keras(model) else model


def from_keras(model) -> nn.Sequential:
    """A torch.nn.Sequential computing what the Keras `model` computes (logits where it ends in a softmax),
    taking the same channels-last inputs. Raises ModelpressError naming the first layer that has no exact
    torch equivalent."""
    b = _build(model)
    torch_model = nn.Sequential(*b.layers)
    torch_model.keras_links = b.links  # for to_keras; not a parameter, not saved
    torch_model.keras_config = model.to_json()  # compress records it, so that load gives Keras back
    with torch.no_grad():
        for link in b.links:
            _load(torch_model.get_submodule(link.path), link,
                  model.get_layer(link.keras_name).get_weights()[slice(*link.part)])
    return torch_model.eval()


def _build(model) -> _Builder:
    """The torch layers (weights not set) and their links to the Keras layers."""
    if not is_keras(model):
        raise ModelpressError(f"from_keras needs a Keras 3 model; got {type(model).__name__}")
    if type(model).__name__ not in ("Sequential", "Functional"):
        raise ModelpressError(f"Keras model '{model.name}' is a subclass ({type(model).__name__}) whose call() wires "
                              "its layers in Python code, which does not convert; build the same layers as a "
                              "Sequential or functional model (keras.Model(inputs, outputs)) and copy the weights")
    if not model.built or not getattr(model, "inputs", None):
        raise ModelpressError(f"Keras model '{model.name}' has no known input shape; build it with keras.Input(...) "
                              "as its first layer, or call it once on a batch")
    b = _Builder(shape=tuple(int(d) for d in model.inputs[0].shape[1:]))
    if len(model.inputs) != 1 or len(model.outputs) != 1 or not 1 <= len(b.shape) <= 3:
        raise ModelpressError(f"Keras model '{model.name}': inputs {[tuple(i.shape) for i in model.inputs]}, "
                              f"{len(model.outputs)} outputs; one input of a vector, a sequence (L, C) or an image "
                              "(H, W, C) and one output convert")
    if len(b.shape) in (2, 3):  # (L, C) or (H, W, C): channels first for torch
        b.add(Permute((0, len(b.shape)) + tuple(range(1, len(b.shape)))))
        b.shape = (b.shape[-1],) + b.shape[:-1]
    if type(model).__name__ == "Sequential":
        layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
        for i, layer in enumerate(layers):
            _convert(b, layer, last=i == len(layers) - 1)
    else:
        g = _Graph(model)
        end = _walk(b, g, model.inputs[0])
        if end is not model.outputs[0]:
            raise ModelpressError(f"Keras model '{model.name}': the layers after the input do not lead to its "
                                  "output alone")
    return b


def _walk(b: _Builder, g: _Graph, t, stop=None):
    """Convert the layers that follow tensor `t` into `b`, until a tensor that only `stop` takes (the join
    of the branch being built) or the model's output; returns that tensor. A fork becomes a Sum (joined by
    an Add) or a Cat (joined by a Concatenate) of one Sequential per branch, in the join's input order."""
    while True:
        users = g.users.get(id(t), [])
        if not users or users == [stop]:
            return t
        if len(users) == 1 and type(users[0]).__name__ not in _JOINS:
            layer = users[0]
            _convert(b, layer, last=g.out(layer) is g.model.outputs[0])
            t = g.out(layer)
            continue
        join = g.meeting(users)
        kind = type(join).__name__
        if kind not in _JOINS or any(u is not join and type(u).__name__ in _JOINS for u in users):
            raise ModelpressError(f"Keras layer '{join.name}' ({kind}) joins branches that do not all start at one "
                                  "tensor; only forks joined by an Add or a Concatenate convert")
        subs = []
        for x in g.ins(join):  # the branch that ends in each input of the join, in order
            firsts = [u for u in users if u is not join and id(x._keras_history[0]) in g.reach(u)]
            if len(firsts) != (x is not t):
                raise ModelpressError(f"Keras layer '{join.name}' ({kind}): its inputs are not the branches of one "
                                      "fork, one each")
            sub = b.branch(len(subs))
            if firsts:  # else: the fork's tensor itself is an input (an identity shortcut)
                _convert(sub, firsts[0], last=False)
                if _walk(sub, g, g.out(firsts[0]), stop=join) is not x:
                    raise ModelpressError(f"Keras layer '{firsts[0].name}': its branch does not lead to "
                                          f"'{join.name}' alone")
            subs.append(sub)
        if len(subs) != len(users) or any(s.flat_from != subs[0].flat_from for s in subs):
            raise ModelpressError(f"Keras layer '{join.name}' ({kind}): its inputs are not the branches of one fork")
        b.add(_join(kind, join, subs))
        b.shape, b.flat_from = (sum(s.shape[0] for s in subs),) + subs[0].shape[1:] if kind == "Concatenate" \
            else subs[0].shape, subs[0].flat_from
        t = g.out(join)


def _join(kind: str, join, subs: list[_Builder]) -> nn.Module:
    shapes = [s.shape for s in subs]
    if kind == "Add" and len(set(shapes)) != 1:
        raise ModelpressError(f"Keras layer '{join.name}' (Add): its inputs' shapes differ: {shapes}")
    if kind == "Concatenate":
        axis = join.get_config()["axis"]
        if axis not in (-1, len(shapes[0])) or len({s[1:] for s in shapes}) != 1 or subs[0].flat_from:
            raise ModelpressError(f"Keras layer '{join.name}' (Concatenate): only along the channels (axis -1) of "
                                  f"inputs of one size, not after a Flatten; got axis {axis}, shapes {shapes}")
    return _JOINS[kind](*(nn.Sequential(*s.layers) for s in subs))


def _same(n: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TensorFlow's padding 'same' on a length-n axis: the output length ceil(n / s) and the padding
    before the first window (half the total, rounded down; the rest goes after)."""
    out = -(-n // s)
    return out, max((out - 1) * s + (k - 1) * d + 1 - n, 0) // 2


def _padding(cfg: dict, shape: tuple[int, ...], kernel: tuple[int, ...], where: str) -> tuple[int, ...]:
    """Symmetric torch padding that gives the same windows as the Keras padding: the windows start at the
    same places, so they match wherever torch gives as many of them (its extra padding after the input is
    never used, or is -inf / left out of the average for pooling)."""
    if cfg["padding"] == "valid":
        return (0,) * len(kernel)
    dilation = tuple(cfg.get("dilation_rate", (1,) * len(kernel)))
    pads = []
    for n, k, s, d in zip(shape[1:], kernel, cfg["strides"], dilation):
        out, before = _same(n, k, s, d)
        torch_out = (n + 2 * before - (k - 1) * d - 1) // s + 1
        if cfg["padding"] != "same" or (torch_out != out and "pool_size" not in cfg) or 2 * before > k:
            raise ModelpressError(f"Keras layer '{where}': padding '{cfg['padding']}' with strides {cfg['strides']}"
                                  f" and kernel {kernel} on input {shape[1:]} has no exact torch equivalent; use "
                                  "padding 'valid', or 'same' with an odd kernel, or a ZeroPadding layer")
        pads.append(before)
    return tuple(pads)


def _activation(b: _Builder, name: str | None, where: str, last: bool) -> None:
    if name in (None, "linear"):
        return
    if name == "softmax":
        if not last:
            raise ModelpressError(f"Keras layer '{where}': softmax is supported only as the model's last step")
        return  # left out: logits out; to_keras keeps it
    if name not in _ACTIVATIONS:
        raise ModelpressError(f"Keras layer '{where}': activation '{name}' is not supported "
                              f"(supported: {', '.join(sorted(_ACTIVATIONS))}, softmax last)")
    b.add(_ACTIVATIONS[name]())


def _check_channels_last(cfg: dict, where: str) -> None:
    if cfg.get("data_format", "channels_last") != "channels_last":
        raise ModelpressError(f"Keras layer '{where}': data_format '{cfg['data_format']}' is not supported; "
                              "build the model channels_last (Keras's default)")


def _convert(b: _Builder, layer, last: bool) -> None:
    kind, cfg, name = type(layer).__name__, layer.get_config(), layer.name
    if kind not in SUPPORTED:
        raise ModelpressError(f"Keras layer '{name}' ({kind}) is not supported yet; supported: {', '.join(SUPPORTED)}")
    spatial = len(b.shape) - 1
    if kind in ("Conv1D", "Conv2D", "DepthwiseConv2D", "SeparableConv2D", "MaxPooling1D", "MaxPooling2D",
                "AveragePooling1D",
                "AveragePooling2D", "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalMaxPooling1D",
                "GlobalMaxPooling2D", "Flatten"):
        _check_channels_last(cfg, name)
    if kind == "Dense":
        if len(b.shape) != 1:
            raise ModelpressError(f"Keras layer '{name}': Dense on a {len(b.shape) + 1}-d tensor is not supported; "
                                  "Flatten or pool first")
        path = b.add(nn.Linear(b.shape[0], cfg["units"], bias=cfg["use_bias"]))
        b.links.append(_Link(name, "dense", path, b.flat_from))
        b.shape, b.flat_from = (cfg["units"],), ()
        _activation(b, cfg.get("activation"), name, last)
    elif kind in ("Conv1D", "Conv2D", "DepthwiseConv2D", "SeparableConv2D"):
        k = tuple(cfg["kernel_size"])
        if spatial != len(k):
            raise ModelpressError(f"Keras layer '{name}': a {len(k)}-d convolution on input of shape {b.shape}")
        depthwise = kind in ("DepthwiseConv2D", "SeparableConv2D")
        separable = kind == "SeparableConv2D"  # depthwise (no bias), then a 1x1 conv to `filters`
        cin = b.shape[0]
        cout = cin * cfg["depth_multiplier"] if depthwise else cfg["filters"]
        groups = cin if depthwise else cfg.get("groups", 1)
        conv = (nn.Conv1d if spatial == 1 else nn.Conv2d)(cin, cout, k, stride=tuple(cfg["strides"]),
                                                          padding=_padding(cfg, b.shape, k, name),
                                                          dilation=tuple(cfg["dilation_rate"]), groups=groups,
                                                          bias=cfg["use_bias"] and not separable)
        path = b.add(conv)
        b.links.append(_Link(name, "depthwise" if depthwise else "conv", path,
                             part=(0, 1) if separable else (0, None)))
        b.shape = _out_shape(conv, b.shape)
        if separable:
            point = nn.Conv2d(cout, cfg["filters"], 1, bias=cfg["use_bias"])
            b.links.append(_Link(name, "conv", b.add(point), part=(1, None)))
            b.shape = (cfg["filters"],) + b.shape[1:]
        _activation(b, cfg.get("activation"), name, last)
    elif kind.startswith(("MaxPooling", "AveragePooling")):
        k, strides, same = tuple(cfg["pool_size"]), tuple(cfg["strides"]), cfg["padding"] == "same"
        pads = _padding(cfg, b.shape, k, name)
        # 'same': the last windows run past the input; ceil_mode keeps them, over the values that are there
        extra = {"ceil_mode": True, **({} if kind[:3] == "Max" else {"count_include_pad": False})} if same else {}
        pool = {("Max", 2): nn.MaxPool2d, ("Max", 1): nn.MaxPool1d, ("Ave", 2): nn.AvgPool2d,
                ("Ave", 1): nn.AvgPool1d}[(kind[:3], len(k))](k, strides, pads, **extra)
        b.add(pool)
        want = tuple(_same(n, kk, st, 1)[0] if same else (n - kk) // st + 1
                     for n, kk, st in zip(b.shape[1:], k, strides))
        b.shape = _out_shape(pool, b.shape)
        if b.shape[1:] != want:
            raise ModelpressError(f"Keras layer '{name}': pooling {k} with strides {strides} and padding "
                                  f"'{cfg['padding']}' gives {want}, torch's {b.shape[1:]}; not supported")
    elif kind.startswith(("GlobalAveragePooling", "GlobalMaxPooling")):
        if cfg.get("keepdims"):
            raise ModelpressError(f"Keras layer '{name}': keepdims=True is not supported")
        b.add({("Ave", True): nn.AdaptiveAvgPool2d, ("Ave", False): nn.AdaptiveAvgPool1d,
               ("Max", True): nn.AdaptiveMaxPool2d, ("Max", False): nn.AdaptiveMaxPool1d}[(kind[6:9],
                                                                                           kind.endswith("2D"))](1))
        b.add(nn.Flatten())
        b.shape = (b.shape[0],)
    elif kind == "Flatten":
        if len(b.shape) > 1:
            b.flat_from = b.shape
        b.add(nn.Flatten())
        b.shape = (math.prod(b.shape),)
    elif kind == "Dropout":
        b.add(nn.Dropout(cfg["rate"]))
    elif kind in ("Activation", "ReLU", "Softmax"):
        act = cfg.get("activation", "relu" if kind == "ReLU" else "softmax")
        if kind == "ReLU" and (cfg.get("max_value") not in (None, 6.0) or cfg.get("negative_slope")
                               or cfg.get("threshold")):
            raise ModelpressError(f"Keras layer '{name}': ReLU with negative_slope / threshold is not supported")
        _activation(b, "relu6" if kind == "ReLU" and cfg.get("max_value") == 6.0 else act, name, last)
    elif kind == "BatchNormalization":
        axis = cfg["axis"][0] if isinstance(cfg["axis"], (list, tuple)) else cfg["axis"]
        if b.flat_from:  # its features would be in Keras's (H, W, C) order, torch's are (C, H, W)
            raise ModelpressError(f"Keras layer '{name}': BatchNormalization between Flatten and Dense is not "
                                  "supported")
        if axis not in (-1, len(b.shape)) or not (cfg["center"] and cfg["scale"]):
            raise ModelpressError(f"Keras layer '{name}': BatchNormalization over axis {axis} or without center / "
                                  "scale is not supported")
        bn = (nn.BatchNorm1d if len(b.shape) < 3 else nn.BatchNorm2d)(b.shape[0], eps=cfg["epsilon"],
                                                                      momentum=1 - cfg["momentum"])
        b.links.append(_Link(name, "bn", b.add(bn)))
    elif kind.startswith("ZeroPadding"):
        _check_channels_last(cfg, name)
        pad = cfg["padding"]  # ((top, bottom), (left, right)) or (left, right)
        pairs = [tuple(p) for p in pad] if isinstance(pad[0], (list, tuple)) else [tuple(pad)]
        if len(pairs) != spatial:
            raise ModelpressError(f"Keras layer '{name}': {kind} on input of shape {b.shape}")
        b.add((nn.ZeroPad2d if spatial == 2 else nn.ZeroPad1d)(tuple(v for p in reversed(pairs) for v in p)))
        b.shape = (b.shape[0],) + tuple(n + sum(p) for n, p in zip(b.shape[1:], pairs))
    elif kind == "Embedding":
        if len(b.shape) != 1 or cfg.get("mask_zero"):
            raise ModelpressError(f"Keras layer '{name}': Embedding takes the model's (L,) integer input here, "
                                  "without mask_zero (masks change what later layers compute)")
        b.links.append(_Link(name, "embedding", b.add(nn.Embedding(cfg["input_dim"], cfg["output_dim"]))))
        b.add(Permute((0, 2, 1)))  # (B, L, D) -> channels first, as for an input sequence
        b.shape = (cfg["output_dim"], b.shape[0])
    elif kind in _RNNS or kind == "Bidirectional":
        both = kind == "Bidirectional"
        if both:
            kind, cfg = _bidirectional(cfg, name)
        _check_recurrent(kind, cfg, name, b.shape)
        path = b.add(Recurrent(kind, b.shape[0], cfg["units"], cfg["use_bias"], cfg["return_sequences"], both))
        b.links.append(_Link(name, kind, path))
        units = cfg["units"] * (1 + both)
        b.shape = (units, b.shape[1]) if cfg["return_sequences"] else (units,)
    elif kind in _JOINS:  # reached only where its inputs are not the branches of one fork
        raise ModelpressError(f"Keras layer '{name}' ({kind}) does not join the branches of one fork; only forks "
                              "(one tensor into branches that an Add or a Concatenate joins) convert")


def _bidirectional(cfg: dict, name: str) -> tuple[str, dict]:
    """(kind, config) of a Bidirectional layer's forward layer, if torch's bidirectional RNN computes it:
    outputs concatenated, and a backward layer that is the forward one reading backwards."""
    inner, back = cfg.get("layer") or {}, cfg.get("backward_layer") or {}
    kind, fwd = inner.get("class_name"), dict(inner.get("config") or {})
    settings = lambda c: {k: v for k, v in c.items() if k not in ("name", "go_backwards")}  # noqa: E731
    other = bool(back) and (back.get("class_name") != kind or settings(back.get("config") or {}) != settings(fwd))
    if kind not in _RNNS or cfg.get("merge_mode") != "concat" or other:
        raise ModelpressError(f"Keras layer '{name}' (Bidirectional): a {kind} with merge_mode "
                              f"'{cfg.get('merge_mode')}'{' and another backward layer' * other}; "
                              f"only {', '.join(_RNNS)} with merge_mode 'concat', both directions alike, convert")
    return kind, fwd


def _check_recurrent(kind: str, cfg: dict, name: str, shape: tuple[int, ...]) -> None:
    """The settings under which torch's LSTM / GRU / RNN compute what the Keras layer computes."""
    problems = [f"input of shape {shape} (a sequence (L, C) is needed)"] * (len(shape) != 2)
    problems += [f"{k}={cfg.get(k)}" for k in ("go_backwards", "stateful", "return_state") if cfg.get(k)]
    problems += [f"activation {cfg.get('activation')}"] * (cfg.get("activation") != "tanh")
    if kind != "SimpleRNN" and cfg.get("recurrent_activation") != "sigmoid":
        problems.append(f"recurrent_activation {cfg.get('recurrent_activation')}")
    if kind == "GRU" and not cfg.get("reset_after", True):
        problems.append("reset_after=False")
    if problems:
        raise ModelpressError(f"Keras layer '{name}' ({kind}): {', '.join(problems)} has no torch equivalent; "
                              f"supported: tanh / sigmoid activations, forward, stateless, one output")


def _out_shape(layer: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    with torch.device("meta"):
        return tuple(layer(torch.empty(1, *shape, device="meta")).shape[1:])


def _load(m: nn.Module, link: _Link, weights: list[np.ndarray]) -> None:
    """Keras weights into the torch module `m`, in torch's layout."""
    t = [torch.from_numpy(np.asarray(w, dtype=np.float32)) for w in weights]
    if link.kind == "bn":
        for attr, v in zip(("weight", "bias", "running_mean", "running_var"), t):
            getattr(m, attr).copy_(v)
        return
    if link.kind == "embedding":
        m.weight.copy_(t[0])
        return
    if link.kind in _RNNS:  # per direction: kernel (in, G * units), recurrent kernel (units, G * units), bias
        rnn, order = m.rnn, _gate_order(link.kind, m.hidden_size, t[0].shape[1] // m.hidden_size)
        n = len(t) // (1 + m.bidirectional)
        for suffix, (ih, hh, *b) in zip(m.directions, (t[i:i + n] for i in range(0, len(t), n))):
            getattr(rnn, f"weight_ih{suffix}").copy_(ih[:, order].T)
            getattr(rnn, f"weight_hh{suffix}").copy_(hh[:, order].T)
            if b:  # a GRU's (2, 3 * units): the input and the recurrent biases; else one bias
                bias = b[0] if b[0].dim() == 2 else torch.stack([b[0], torch.zeros_like(b[0])])
                getattr(rnn, f"bias_ih{suffix}").copy_(bias[0][order])
                getattr(rnn, f"bias_hh{suffix}").copy_(bias[1][order])
        return
    kernel = t[0]
    if link.kind == "dense":
        if link.flat_from:  # rows in Keras's (H, W, C) order -> torch's (C, H, W)
            c, *hw = link.flat_from
            kernel = kernel.reshape(*hw, c, -1).permute(len(hw), *range(len(hw)), len(hw) + 1).reshape(
                kernel.shape)
        w = kernel.T
    elif link.kind == "depthwise":  # (kh, kw, in, mult) -> (in * mult, 1, kh, kw)
        w = kernel.reshape(*kernel.shape[:2], -1).permute(2, 0, 1).unsqueeze(1)
    else:  # (k..., in, out) -> (out, in, k...)
        n = kernel.dim()
        w = kernel.permute(n - 1, n - 2, *range(n - 2))
    m.weight.copy_(w.contiguous())
    if len(t) > 1:
        m.bias.copy_(t[1])


def _gate_order(kind: str, units: int, gates: int) -> torch.Tensor:
    """The columns of a Keras recurrent kernel in torch's gate order: the same for LSTM (i, f, c/g, o) and
    SimpleRNN; a Keras GRU's (z, r, h) become torch's (r, z, n). The permutation is its own inverse."""
    blocks = [1, 0, 2] if kind == "GRU" else range(gates)
    return torch.cat([torch.arange(g * units, (g + 1) * units) for g in blocks])


def _keras_weights(m: nn.Module, link: _Link) -> list[np.ndarray]:
    """The torch module's weights in Keras's layout (the inverse of `_load`). An Int8Linear gives its
    int8-grid weights in float: Keras computes with them, its activations stay float."""
    if isinstance(m, Recurrent):
        return _recurrent_weights(m)
    if type(m) is nn.Embedding:
        return [m.weight.detach().float().cpu().numpy()]
    if isinstance(m, Int8Linear):
        d = {"weight": m.dequantized().float(), **({"bias": m.bias.detach().float()} if m.bias is not None else {})}
    elif isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)):
        d = {k: v.detach().float().cpu() for k, v in m.state_dict().items()}
    else:
        raise ModelpressError(f"Keras layer '{link.keras_name}' became a {type(m).__name__}, which Keras has no "
                              "layer for; write back a weight-only recipe (prune, cluster, quantize without "
                              "activations: int8), or a model loaded with modelpress.load(..., packed=False)")
    if link.kind == "bn":
        return [d[k].numpy() for k in ("weight", "bias", "running_mean", "running_var")]
    w = d["weight"]
    if link.kind == "dense":
        kernel = w.T
        if link.flat_from:  # channels may have been pruned since: C from the rows left
            hw = link.flat_from[1:]
            c = kernel.shape[0] // math.prod(hw)
            kernel = kernel.reshape(c, *hw, -1).permute(*range(1, len(hw) + 1), 0, len(hw) + 1).reshape(kernel.shape)
    elif link.kind == "depthwise":  # (in * mult, 1, kh, kw) -> (kh, kw, in, mult)
        cin = m.groups
        kernel = w[:, 0].permute(1, 2, 0).reshape(*w.shape[2:], cin, -1)
    else:
        n = w.dim()
        kernel = w.permute(*range(2, n), 1, 0)
    out = [kernel.contiguous().numpy()]
    if "bias" in d:
        out.append(d["bias"].numpy())
    return out


def _recurrent_weights(m: Recurrent) -> list[np.ndarray]:
    rnn = m.rnn
    order = _gate_order(m.mode, m.hidden_size, rnn.weight_ih_l0.shape[0] // m.hidden_size)
    w = lambda name: getattr(rnn, name).detach().float().cpu()[order]  # noqa: E731
    out = []
    for suffix in m.directions:
        out += [w(f"weight_ih{suffix}").T, w(f"weight_hh{suffix}").T]
        if m.bias:  # a GRU keeps both biases, (2, 3 * units); the others one, their sum
            b_ih, b_hh = w(f"bias_ih{suffix}"), w(f"bias_hh{suffix}")
            out.append(torch.stack([b_ih, b_hh]) if m.mode == "GRU" else b_ih + b_hh)
    return [t.contiguous().numpy() for t in out]


def to_keras(model: nn.Module, like):
    """A copy of the Keras model `like` holding `model`'s weights, where `model` came from
    `from_keras(like)` and was compressed (its layers may be smaller: units and filters follow them)."""
    if is_keras(model):
        raise ModelpressError("to_keras: the model is a Keras model already (modelpress.load gives one for a file "
                              "made from Keras); pass the torch form")
    links = getattr(model, "keras_links", None)
    if links is None:  # e.g. a model loaded from a file: the links follow from `like` alone
        links = _build(like).links
    try:
        modules = [model.get_submodule(link.path) for link in links]
    except AttributeError:
        raise ModelpressError("to_keras needs the torch model from_keras made (or its compressed copy); got "
                              f"{type(model).__name__}") from None
    sizes = {link.keras_name: m.weight.shape[0] for link, m in zip(links, modules) if link.kind in ("dense", "conv")}
    config = like.get_config()
    for layer_cfg in config["layers"]:
        layer_cfg.pop("build_config", None)  # input sizes recorded at build; pruning may have changed them
        c = layer_cfg["config"]
        if c.get("name") in sizes:
            c["units" if "units" in c else "filters"] = int(sizes[c["name"]])
    copy = type(like).from_config(config)
    if not copy.built:
        copy.build((None,) + tuple(int(d) for d in like.inputs[0].shape[1:]))
    weights: dict[str, list[np.ndarray]] = {}
    for link, m in zip(links, modules):  # in order: a SeparableConv2D's depthwise part, then its pointwise part
        weights.setdefault(link.keras_name, []).extend(_keras_weights(m, link))
    for name, w in weights.items():
        copy.get_layer(name).set_weights(w)
    unknown = [layer.name for layer in copy.layers if layer.weights and layer.name not in weights]
    if unknown:
        raise ModelpressError(f"to_keras: Keras layer '{unknown[0]}' has weights modelpress does not know")
    return copy


_KERAS_CLASSES = set(SUPPORTED) | {"Sequential", "Functional", "Model"}


def keras_from_json(text: str):
    """The Keras model a file's recorded config describes (weights not set), built only from the layer
    classes `from_keras` converts and in Keras's safe mode (no Lambda code, no custom objects)."""
    import json

    try:
        config = json.loads(text)
        layers = config["config"]["layers"]
        names = [config["class_name"]] + [layer["class_name"] for layer in layers] + \
            [layer["config"][k]["class_name"] for layer in layers if layer["class_name"] == "Bidirectional"
             for k in ("layer", "backward_layer") if layer["config"].get(k)]  # the layers it wraps
    except (ValueError, TypeError, KeyError) as e:
        raise ModelpressError(f"the file's Keras config is not a Keras model config ({type(e).__name__})") from None
    bad = sorted({str(n)[:80] for n in names} - _KERAS_CLASSES)
    if bad:
        raise ModelpressError(f"the file's Keras config names layer classes modelpress does not rebuild: {bad}")
    try:
        import keras
    except ImportError as e:
        raise ModelpressError(f"the file was made from a Keras model; giving one back needs Keras 3 ({e}); or "
                              "load the torch form with keras=False") from None

    with keras.saving.custom_object_scope({}):
        return keras.models.model_from_json(text)


def array_batches(x, y=None, batch_size: int = 32, *, shuffle: bool = True, seed: int = 0) -> Iterable:
    """NumPy arrays, as Keras's `fit` takes them, as torch batches: with targets a DataLoader of
    (inputs, targets) reshuffled every epoch as `fit` does (one-hot targets become class indices);
    inputs alone a list of input batches, in order (calibration data). Integer inputs (token ids for an
    Embedding) stay integers, others become float32."""
    x = array_inputs(x)
    if y is None:
        return list(x.split(batch_size))
    y = class_targets(y)
    if len(y) != len(x):
        raise ModelpressError(f"array_batches: {len(x)} inputs but {len(y)} targets")
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))
