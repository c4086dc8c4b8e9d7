"""A loaded model made fast on this CPU with no user code: `accelerate(model)`.

Two steps, each chosen by what the CPU has (capabilities.py), never by timing:
- compute dtype: on CPUs with native bf16 products (AMX, AVX512_BF16) every float weight and activation
  becomes bf16 (LayerNorm and softmax still accumulate in fp32 inside torch's kernels), as torch's own
  `model.to(torch.bfloat16)` does; elsewhere bf16 is emulated and slower, so fp32 stays.
- int8 layers: on CPUs with native bf16 their int8 weights are widened once to bf16 and multiplied in
  bf16, because there per-token activation quantization costs more than the int8 kernel saves
  (all-MiniLM-L6-v2, batch 64 x 128, Xeon with AMX, compiled: 3.6x fp32 with int8 kernels, 4.8x in bf16);
  elsewhere they keep their int8 kernels. `int8="kernel"` or `"bf16"` forces one.
- graph: `torch.compile` (inductor) with weight freezing, so Linear weights are prepacked once for
  oneDNN, elementwise work is fused, and int8 layers become one oneDNN u8 x s8 kernel with their
  activation quantization fused into the ops before them. Packed low-bit layers are dequantized into
  frozen constants: fast, but the compiled model then holds those weights in the compute dtype.
  It compiles on the first call (seconds; again
  for a new input shape) and inductor's on-disk cache makes later processes faster. If compiling fails
  (no C++ compiler, an operation inductor cannot take), the model runs eagerly and a warning says why.

Inputs in float are cast to the compute dtype and float outputs back to fp32, so callers see the model
they had. The result is for inference: it runs under `torch.no_grad()`. `describe()` says what ran.
A compiled call has a fixed cost of 50-100 microseconds (guards, the graph call), and inductor's fp32
products of small layers are no faster than eager ones: a 784-300-100-10 MLP ran 0.24x eager fp32 at batch
1 and 0.72x at batch 64 compiled (Xeon with AVX-512, no native bf16). So by default ("auto") models of
fewer than a million weights are left as they are, eager in fp32; `compile=True` and `dtype="bf16"`
force the steps (a LeNet-5 at batch 64 ran 2.5x compiled in bf16 on an AMX Xeon, 0.6x at batch 1).
"""
from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .. import surgery
from ..capabilities import native_bf16
from .half import Linear16
from .int8 import Int8Linear

log = logging.getLogger(__name__)
SMALL_MODEL = 1 << 20  # weights: "auto" leaves smaller models eager, in fp32


def _register_fakes() -> None:
    """Shape functions inductor needs for oneDNN's int8 weight prepacking, missing from some torch builds."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers the quantize/dequantize ops

    if not torch._C._dispatch_has_kernel_for_dispatch_key("onednn::qlinear_prepack", "Meta"):
        torch.library.register_fake("onednn::qlinear_prepack")(
            lambda weight, x_shape: weight.new_empty(weight.shape[1], weight.shape[0]))


def _room_for_one_more() -> None:
    """Raise dynamo's recompile limit by its default for each model compiled here. The limit counts the
    graphs of one forward function, so every model of one class adds to it (a batch size or a model of
    its own: a graph each), and past it dynamo runs the function eagerly without a word: the 8th
    EfficientNet-Lite0 accelerated in one process ran at fp32 eager speed."""
    config = torch._dynamo.config
    config.recompile_limit += 8
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * config.recompile_limit)


class Accelerated(nn.Module):
    """`model` in its compute dtype, compiled where that works; call it as you would call `model`."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, compile: bool, int8: str) -> None:
        super().__init__()
        self.model, self.dtype, self.int8 = model.eval(), dtype, int8
        self.compiled: Any = None
        self.graph = "eager"
        if compile:
            _register_fakes()
            _room_for_one_more()
            self.compiled, self.graph = torch.compile(model), "inductor (freezing)"

    def describe(self) -> str:
        return f"{self.graph}, {str(self.dtype).removeprefix('torch.')} compute, int8 layers: {self.int8}"

    def _cast(self, tree: Any, dtype: torch.dtype) -> Any:
        if isinstance(tree, torch.Tensor):  # the common case, without the tree walk's cost
            return tree.to(dtype) if tree.is_floating_point() and tree.dtype != dtype else tree
        return pytree.tree_map_only(torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, tree)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs or len(args) != 1:
            args, kwargs = self._cast((args, kwargs), self.dtype)
        else:
            args = (self._cast(args[0], self.dtype),)
        with torch.no_grad():
            if self.compiled is not None:
                config = torch._inductor.config
                frozen, config.freezing = config.freezing, True  # read when dynamo traces: every (re)compile
                try:
                    out = self.compiled(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - any compile failure: run the same model eagerly
                    log.warning("torch.compile failed (%s: %s); running eagerly", type(e).__name__,
                                str(e).strip().splitlines()[0][:200] if str(e).strip() else "")
                    self.compiled, self.graph = None, "eager (compile failed)"
                    out = self.model(*args, **kwargs)
                finally:
                    config.freezing = frozen
            else:
                out = self.model(*args, **kwargs)
        return self._cast(out, torch.float32)


def accelerate(model: nn.Module, *, dtype: Literal["auto", "bf16", "fp32"] = "auto",
               compile: bool | Literal["auto"] = "auto",
               int8: Literal["auto", "kernel", "bf16"] = "auto") -> Accelerated:
    """`model` (changed in place) to run fast for inference on this CPU: in bf16 where the CPU multiplies
    bf16 natively, and through torch.compile, for models of a million weights or more ("auto"; see the
    module docstring)."""
    for arg, value, allowed in (("dtype", dtype, ("auto", "bf16", "fp32")), ("int8", int8, ("auto", "kernel", "bf16")),
                                ("compile", compile, ("auto", True, False))):
        if value not in allowed:
            raise ValueError(f"{arg} must be one of {allowed}, not {value!r}")
    small = sum(t.numel() for t in model.state_dict().values()) < SMALL_MODEL
    use = torch.bfloat16 if dtype == "bf16" or dtype == "auto" and native_bf16() and not small else torch.float32
    compile = not small if compile == "auto" else compile
    if int8 == "auto":
        int8 = "bf16" if use == torch.bfloat16 else "kernel"
    has_int8 = any(type(m) is Int8Linear for m in model.modules())
    if int8 == "bf16":
        _widen_int8(model)
    for m in model.modules():  # float weights only: integer codes and their scales stay as stored
        for name, t in m.named_parameters(recurse=False):
            if t.is_floating_point() and t.dtype != use and not name.endswith("scale"):
                t.data = t.data.to(use)  # the same Parameter: tied weights stay tied
        for name, t in m.named_buffers(recurse=False):
            if t is not None and t.is_floating_point() and t.dtype != use and not name.endswith("scale"):
                # a new tensor, not `.data =`: a loaded buffer can be a view, and a bf16 view of a float32
                # base made torch.compile fail (BatchNorm statistics of every loaded CNN on a bf16 CPU)
                m._buffers[name] = t.to(use)
        if hasattr(m, "compute_dtype"):
            m.compute_dtype = use
    how = "none" if not has_int8 else "int8 kernel" if int8 == "kernel" else \
        "bf16 products of int8 weights"
    return Accelerated(model, use, compile, how)


def _widen_int8(model: nn.Module) -> None:
    """Each Int8Linear (not its subclasses, whose inputs are quantized as trained) becomes a bf16 Linear16
    holding its dequantized weight."""
    for name, m in list(model.named_modules()):
        if type(m) is Int8Linear and name:  # (a bare layer is not replaced: use it as it is)
            new = Linear16(m.in_features, m.out_features, m.bias is not None, "bf16")
            new.weight.data = m.dequantized().to(torch.bfloat16)
            if m.bias is not None:
                new.bias.data = m.bias.detach().float()
            surgery.replace(model, name, new)
