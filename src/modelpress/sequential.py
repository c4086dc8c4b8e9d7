"""Compress a Hugging Face decoder folder one transformer block at a time, for models larger than memory.

Only the block being worked on is in memory as float weights, with the calibration activations that
flow through it (the "sequential onloading" of llm-compressor and GPTQModel); the rest of the model is
a skeleton on the meta device, and each block's streams go to a spool file as soon as they are coded.
Each block's Hessians come from the float outputs of the float blocks before it, exactly as one pass of
`collect_hessians` over the whole model gives them, so the file is the one `compress` would write with
the same recipe, bit for bit, when the model fits. Weight-only `quantize` stages (RTN or GPTQ, fixed or
per-layer bits with `sensitivity: layer`) run this way; per-layer bits take two passes over the blocks:
sensitivities first, then the quantization.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import resource
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .batches import call_model, split_batch
from .errors import ModelpressError
from .format import arch
from .format.codecs import encode_tensor
from .format.container import StreamSpool, write_container
from .format.mpz import FORMAT_NAME, release_freed_memory
from .recipe import Recipe
from .state import ParamState, split_name
from .techniques.bias_correction import correct, output_shift
from .techniques.calibrate import calibration_batches, hessians_while
from .techniques.mixed import allocate, layer_errors
from .techniques.quantize import (QuantizeConfig, bit_budget, dequantized, hessian_layers, quant_targets,
                                  quantize_param, rounder)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BlockStep:
    """One block's pass: which pass, seconds, and the process's resident memory after it (MB)."""

    block: int
    stage: str
    seconds: float
    rss_mb: float


@dataclasses.dataclass
class SequentialResult:
    path: str
    bytes: int
    fp32_bytes: int
    seconds: float
    peak_rss_mb: float
    widths: dict[str, int]
    steps: list[BlockStep]

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / self.bytes


def rss_mb() -> float:
    """The process's resident memory now, MB (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError):
        return 0.0


def peak_rss_mb() -> float:
    """The process's peak resident memory, MB: Linux's VmHWM (this program's own, since it started), else
    ru_maxrss, which on Linux also keeps the peak of the parent's memory a forked child shared before exec."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1e3  # kB
    except (OSError, ValueError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KiB on Linux


def quantize_stage(recipe: Recipe) -> QuantizeConfig:
    """The recipe's one weight-only quantize stage; a clear error for anything sequential cannot run."""
    stages = recipe.stages
    if len(stages) != 1 or not isinstance(stages[0], QuantizeConfig):
        raise ModelpressError("sequential compression runs a recipe of one weight-only 'quantize' stage (e.g. the "
                              f"w4, w3 presets); this one has {[s.key for s in stages]}. Drop --sequential for "
                              "other recipes (the model must then fit in memory)")
    cfg = stages[0]
    if cfg.activations != "none":
        raise ModelpressError("sequential compression quantizes weights only: use activations: none (int8 "
                              "activations are not yet done block by block)")
    if (cfg.avg_bits is not None or cfg.budget_mb is not None) and cfg.sensitivity != "layer":
        raise ModelpressError("sequential compression with per-layer bits needs 'sensitivity: layer' in the quantize "
                              "stage: 'output' quantizes each tensor in the whole model, which is never in memory")
    return cfg


def hf_class(folder: Path):
    """The transformers class a model folder's config names (`architectures`, e.g. LlamaForCausalLM, so
    that a decoder keeps its LM head), if transformers has it; else AutoModel."""
    import transformers
    from transformers import AutoModel

    try:
        names = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        names = []
    cls = getattr(transformers, names[0], None) if names and isinstance(names[0], str) else None
    return cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else AutoModel


def skeleton(folder: str | os.PathLike) -> nn.Module:
    """The model the folder's config names (its `architectures` class), on the meta device: no memory."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    cls = hf_class(Path(folder))
    with torch.device("meta"):
        model = cls._from_config(config, dtype=torch.float32) if hasattr(cls, "_from_config") \
            else cls.from_config(config, dtype=torch.float32)
    return model.eval()


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own cap on the JSON header


class Checkpoint:
    """The folder's safetensors tensors by name, each read alone from its shard into its own memory as
    float32: no shard is mapped, so a 4 GB shard costs no 4 GB of address space (`ulimit -v` counts
    mappings). Headers are checked as safetensors' spec bounds them before anything is read."""

    def __init__(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            raise ModelpressError(f"{folder}: no safetensors weights (model.safetensors or shards); sequential "
                                  "compression reads them tensor by tensor")
        self.where: dict[str, tuple[Path, torch.dtype, list[int], int, int]] = {}
        for shard in shards:
            for name, info in _header(shard).items():
                if name in self.where:
                    raise ModelpressError(f"{shard}: tensor {name!r} is also in {self.where[name][0].name}")
                self.where[name] = (shard, *info)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.where]
        if missing:
            raise ModelpressError(f"the checkpoint has no tensor {missing[0]!r} ({len(missing)} missing) that the "
                                  "config's model class holds; is the folder complete?")
        out: dict[str, torch.Tensor] = {}
        for n in names:
            shard, dtype, shape, begin, end = self.where[n]
            buf = bytearray(end - begin)
            with open(shard, "rb") as f:
                f.seek(begin)
                if f.readinto(buf) != len(buf):
                    raise ModelpressError(f"{shard}: tensor {n!r} is cut short; the file is truncated")
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            out[n] = t.reshape(shape).float()
        return out


def _header(path: Path) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """name -> (dtype, shape, first byte, end byte) in the file, each checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(_ST_MAX_HEADER, size - 8):
            raise ModelpressError(f"{path}: not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ModelpressError(f"{path}: the safetensors header is not JSON ({e})") from None
    out = {}
    for name, info in (header.items() if isinstance(header, dict) else []):
        if name == "__metadata__":
            continue
        ok = isinstance(info, dict) and info.get("dtype") in _ST_DTYPES and isinstance(info.get("shape"), list) \
            and all(isinstance(d, int) and d >= 0 for d in info["shape"]) \
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2 \
            and all(isinstance(o, int) for o in info["data_offsets"])
        if ok:
            dtype, (begin, end) = _ST_DTYPES[info["dtype"]], info["data_offsets"]
            numel = 1
            for d in info["shape"]:
                numel *= d
            ok = 0 <= begin <= end and 8 + n + end <= size and end - begin == numel * dtype.itemsize
        if not ok:
            raise ModelpressError(f"{path}: the safetensors entry for {str(name)[:200]!r} is malformed or points "
                                  "outside the file")
        out[name] = (dtype, info["shape"], 8 + n + begin, 8 + n + end)
    if not isinstance(header, dict):
        raise ModelpressError(f"{path}: the safetensors header is not a JSON object")
    return out


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated blocks: its largest ModuleList of modules of one class."""
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1:
            size = sum(p.numel() for p in m.parameters())
            if best is None or size > best[2]:
                best = (name, m, size)
    if best is None:
        raise ModelpressError(f"{type(model).__name__} has no list of repeated blocks to compress one at a time")
    return best[0], best[1]


def materialize(model: nn.Module, prefixes: list[str], ckpt: Checkpoint, tied: dict[str, str]) -> None:
    """Give the meta tensors under the submodules `prefixes` their checkpoint values (float32), tied
    parameters one shared tensor, non-persistent buffers (e.g. rotary frequencies) their owner's own
    initial values."""
    todo: list[tuple[nn.Module, str, str, bool]] = []
    for prefix in prefixes:
        for mod_name, m in model.get_submodule(prefix).named_modules(prefix=prefix):
            for attr, t in [*m._parameters.items(), *m._buffers.items()]:
                if t is not None and t.is_meta:
                    todo.append((m, attr, f"{mod_name}.{attr}", attr in m._parameters))
    values = ckpt.read(sorted({tied.get(n, n) for m, attr, n, is_p in todo
                               if is_p or attr not in m._non_persistent_buffers_set}))
    shared: dict[str, nn.Parameter] = {}
    for m, attr, name, is_param in todo:
        src = tied.get(name, name)
        if is_param:
            if src not in shared:
                shared[src] = nn.Parameter(values[src], requires_grad=False)
            m._parameters[attr] = shared[src]
        elif attr in m._non_persistent_buffers_set:
            m._buffers[attr] = _fresh_buffer(m, attr, model.config)
        else:
            m._buffers[attr] = values[src]


def _fresh_buffer(m: nn.Module, attr: str, config: Any) -> torch.Tensor:
    try:
        with torch.device("cpu"):
            fresh = type(m)(config=config)
        return getattr(fresh, attr).float() if getattr(fresh, attr).is_floating_point() else getattr(fresh, attr)
    except Exception as e:
        raise ModelpressError(f"the buffer {attr!r} of {type(m).__name__} is not in the checkpoint and cannot be "
                              f"rebuilt from the config ({type(e).__name__}: {e}); compress without --sequential"
                              ) from None


def release(module: nn.Module) -> None:
    """Send a materialized part back to the meta device (its memory goes)."""
    module.to_empty(device="meta")
    gc.collect()
    release_freed_memory()


class _Stop(Exception):
    pass


class _Stand(nn.Module):
    """Stands in for block 0 to catch its inputs, or for every block to replay the last one's outputs."""

    def __init__(self, inner: nn.Module, replay: list | None = None) -> None:
        super().__init__()
        self.inner, self.replay, self.calls, self.at = inner, replay, [], 0

    def __getattr__(self, name: str):  # models read attributes of their layers (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, *args, **kwargs):
        if self.replay is None:
            self.calls.append((args, {k: None if k in _CACHES else v for k, v in kwargs.items()}))
            raise _Stop
        return self.replay[self.at]


_CACHES = ("cache", "past_key_values", "past_key_value")  # per-batch K/V caches: not kept between blocks


def _run_model(model: nn.Module, batches: list, on_batch: Callable[[int], None] | None = None) -> None:
    for i, batch in enumerate(batches):
        if on_batch is not None:
            on_batch(i)
        try:
            call_model(model, split_batch(batch)[0])
        except _Stop:
            pass


def catch_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list) -> list[tuple[tuple, dict]]:
    """(args, kwargs) block 0 receives for each calibration batch."""
    first = blocks[0]
    blocks[0] = stand = _Stand(first)
    try:
        _run_model(model, batches)
    finally:
        blocks[0] = first
    return stand.calls


def _hidden(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _next_call(call: tuple[tuple, dict], output: Any) -> tuple[tuple, dict]:
    args, kwargs = call
    if args:
        return (_hidden(output), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": _hidden(output)}


@dataclasses.dataclass
class _Model:
    """The skeleton and where its weights are: what each pass over the blocks needs."""

    model: nn.Module
    ckpt: Checkpoint
    tied: dict[str, str]
    blocks_name: str
    blocks: nn.ModuleList
    params: dict[str, nn.Parameter]  # the quantization targets, in quant_targets' order (meta tensors)

    def names(self, prefixes: list[str]) -> list[str]:
        return [n for n in self.params if any(n.startswith(p + ".") for p in prefixes)]

    def tensor(self, name: str) -> torch.Tensor:
        mod, _, attr = name.rpartition(".")
        return getattr(self.model.get_submodule(mod) if mod else self.model, attr)

    def drop(self, name: str) -> None:
        """Send one materialized parameter back to the meta device."""
        mod, _, attr = name.rpartition(".")
        m = self.model.get_submodule(mod) if mod else self.model
        if m._parameters.get(attr) is not None:
            m._parameters[attr] = nn.Parameter(torch.empty_like(m._parameters[attr], device="meta"), False)


# (module prefixes, targets, their Hessians, their mean input rows)
Work = Callable[[list[str], list[str], dict[str, torch.Tensor], dict[str, torch.Tensor]], None]


@torch.no_grad()
def compress_sequential(folder: str | os.PathLike, recipe: Recipe, calib_data: Iterable, path: str | os.PathLike,
                        *, meta: dict | None = None, progress: Callable[[str, float], None] | None = None
                        ) -> SequentialResult:
    """Compress the decoder in `folder` with `recipe` (one weight-only quantize stage) to `path`, holding one
    block of float weights at a time; returns sizes, per-block times and resident memory. `meta` is what
    the file records besides the tensors (default: the recipe)."""
    t0 = time.perf_counter()
    cfg = quantize_stage(recipe)
    batches = calibration_batches(calib_data, "sequential compression")
    if not all(isinstance(split_batch(b)[0], dict) and "input_ids" in split_batch(b)[0] for b in batches):
        raise ModelpressError("sequential compression takes calibration batches of token ids: dicts with "
                              "'input_ids' (a tokenizer's output)")
    model = skeleton(folder)
    ckpt = Checkpoint(folder)
    blocks_name, blocks = decoder_blocks(model)
    params = quant_targets(model, tuple(recipe.exclude), bias=cfg.include_bias, embeddings=cfg.embeddings)
    run = _Model(model, ckpt, _tied(model, ckpt.where), blocks_name, blocks, params)
    spec = arch.describe(model)
    shapes = {n: list(t.shape) for n, t in model.state_dict().items()}
    index = {name: i for i, name in enumerate(sorted(shapes))}
    owner = _prefer_targets({n: run.tied.get(n, n) for n in shapes}, params)
    fp32 = 4 * sum(p.numel() for p in model.parameters())
    steps: list[BlockStep] = []
    widths = dict.fromkeys(params, cfg.bits)
    if cfg.avg_bits is not None or cfg.budget_mb is not None:
        budget = bit_budget(model, params, cfg.bits, cfg.group_size, cfg.avg_bits, cfg.budget_mb)
        rtn = rounder(cfg.bits, cfg.group_size)
        sens: dict[str, float] = {}

        def measure(prefixes: list[str], names: list[str], hess: dict[str, torch.Tensor], means: dict) -> None:
            for n in names:  # each Hessian let go once used
                sens.update(layer_errors({n: run.tensor(n)}, {n: hess.pop(n)} if n in hess else {}, rtn))

        _passes(run, batches, measure, steps, "sensitivity", progress)
        widths = allocate({k: p.numel() for k, p in params.items()}, sens, cfg.bits, budget)
    spool = StreamSpool(os.path.dirname(os.path.abspath(path)) or None)
    tensors: dict[str, dict] = {}
    keys: dict[str, list[str]] = {}

    def encode(name: str) -> None:
        if owner[name] != name:
            tensors[name] = {"kind": "alias", "of": owner[name], "shape": shapes[name]}
            return
        st = state.pop(name, None)
        entry, streams = encode_tensor(name, run.tensor(name).detach(), st, key=str(index[name]))
        tensors[name], keys[name] = entry, list(streams)
        for k, v in streams.items():
            spool.add(k, v)

    state: dict[str, ParamState] = {}

    def solve(prefixes: list[str], names: list[str], hess: dict[str, torch.Tensor],
              means: dict[str, torch.Tensor]) -> None:
        for n in names:  # each target quantized, coded and let go before the next
            state[n] = ParamState()
            h = hess.pop(n, None) if cfg.method == "gptq" else None
            quantize_param(run.tensor(n), state[n], widths[n], cfg.group_size, h, cfg.per_channel, write_back=False,
                           act_order=cfg.act_order)
            if h is not None and cfg.bias_correction and n in means:  # as `quantize` does (no BatchNorm in an LM)
                layer = split_name(n)[0]
                shift = output_shift(run.tensor(n), dequantized(state[n], run.tensor(n)), means.pop(n))
                correct(model.get_submodule(layer), shift, [], f"{layer}.bias" not in params)
            run.drop(n)  # codes and scales say it all now: the float weight goes before the coding
            encode(n)
        for n in sorted(shapes):
            if n not in tensors and any(n.startswith(p + ".") for p in prefixes):
                encode(n)

    try:
        _passes(run, batches, solve, steps, "quantize", progress)
        left = [n for n in shapes if n not in tensors]
        if left:
            raise ModelpressError(f"sequential compression left {len(left)} tensor(s) unwritten: {left[:5]}")
        spool.order = [k for n in sorted(keys) for k in keys[n]]
        manifest = {"format": FORMAT_NAME, "arch": spec, "tensors": {n: tensors[n] for n in sorted(tensors)},
                    "meta": meta if meta is not None else {"recipe": recipe.to_dict()}}
        nbytes = write_container(path, manifest, spool)
    finally:
        spool.close()
    return SequentialResult(str(path), nbytes, fp32, time.perf_counter() - t0, peak_rss_mb(), widths, steps)


def _passes(run: _Model, batches: list, work: Work, steps: list[BlockStep], stage: str,
            progress: Callable[[str, float], None] | None) -> None:
    """One pass over the blocks, then the rest of the model: each block materialized, its target layers'
    Hessians gathered as the calibration activations go through it in float, `work(...)` called, and the
    block let go; then the layers after the blocks (final norm, LM head) fed the last block's outputs, and
    last the input embedding, alone."""
    model, blocks = run.model, run.blocks
    rest = outside(model, run.blocks_name)
    embedding = _module_name(model, model.get_input_embeddings())
    materialize(model, rest, run.ckpt, run.tied)
    calls = catch_inputs(model, blocks, batches)
    for p in rest:
        release(model.get_submodule(p))
    last: list = []
    for i, block in enumerate(blocks):
        t = time.perf_counter()
        prefix = f"{run.blocks_name}.{i}"
        materialize(model, [prefix], run.ckpt, run.tied)
        names = run.names([prefix])
        outputs: list = []

        def feed() -> None:
            for args, kwargs in calls:
                outputs.append(block(*args, **kwargs))

        means: dict[str, torch.Tensor] = {}
        hess = hessians_while(hessian_layers(model, {n: run.tensor(n) for n in names}), feed, means)
        calls, last = [_next_call(c, o) for c, o in zip(calls, outputs)], outputs
        work([prefix], names, hess, means)
        del hess, means
        release(block)
        _step(steps, i, stage, t, len(blocks), progress)
    t = time.perf_counter()
    tail = [p for p in rest if p != embedding]
    materialize(model, tail, run.ckpt, run.tied)
    names = run.names(tail)
    stands = [_Stand(b, last) for b in blocks]
    saved = list(blocks)
    for j, s in enumerate(stands):
        blocks[j] = s
    hidden = model.config.hidden_size
    tail_batches = []  # the embedding is not run: its output is replaced by the blocks' anyway
    for b in batches:
        x = dict(split_batch(b)[0])
        ids = x.pop("input_ids")
        tail_batches.append({**x, "inputs_embeds": torch.zeros(*ids.shape, hidden)})

    def at(j: int) -> None:
        for s in stands:
            s.at = j

    try:
        means = {}
        hess = hessians_while(hessian_layers(model, {n: run.tensor(n) for n in names}), lambda: _run_model(
            model, tail_batches, at), means)
    finally:
        for j, b in enumerate(saved):
            blocks[j] = b
    work(tail, names, hess, means)
    for p in tail:
        release(model.get_submodule(p))
    if embedding in rest:
        materialize(model, [embedding], run.ckpt, run.tied)
        work([embedding], run.names([embedding]), {}, {})
        release(model.get_submodule(embedding))
    _step(steps, len(blocks), stage + " (outside the blocks)", t, len(blocks), None)


def _step(steps: list[BlockStep], i: int, stage: str, t: float, n: int,
          progress: Callable[[str, float], None] | None) -> None:
    steps.append(BlockStep(i, stage, time.perf_counter() - t, rss_mb()))
    log.info("%s: block %d/%d in %.1f s, %.0f MB resident", stage, i + 1, n, steps[-1].seconds, steps[-1].rss_mb)
    if progress is not None:
        progress(f"{stage}, block by block", min(1.0, (i + 1) / n))


def outside(model: nn.Module, blocks_name: str) -> list[str]:
    """The submodules beside the blocks and their ancestors: embeddings, final norm, LM head, rotary tables."""
    parts = blocks_name.split(".")
    out = []
    for depth in range(len(parts)):
        holder = model.get_submodule(".".join(parts[:depth]))
        for name, t in [*holder._parameters.items(), *holder._buffers.items()]:
            if t is not None and t.is_meta:
                raise ModelpressError(f"{type(holder).__name__} holds tensor {name!r} beside the blocks; not supported "
                                      "sequentially")
        out += [".".join(parts[:depth] + [c]) for c, _ in holder.named_children() if c != parts[depth]]
    return out


def _tied(model: nn.Module, stored: Iterable[str]) -> dict[str, str]:
    """name -> the name the checkpoint stores it under, for tied parameters (the first such, sorted)."""
    groups: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    stored = set(stored)
    return {n: next((k for k in sorted(ns) if k in stored), sorted(ns)[0])
            for ns in groups.values() if len(ns) > 1 for n in ns}


def _prefer_targets(owner: dict[str, str], params: dict) -> dict[str, str]:
    """As the file's writer does: a tied group is stored under the name that carries a quantization state."""
    groups: dict[str, list[str]] = {}
    for n, o in owner.items():
        groups.setdefault(o, []).append(n)
    out = {}
    for names in groups.values():
        names = sorted(names)
        head = next((n for n in names if n in params), names[0])
        out.update(dict.fromkeys(names, head))
    return out


def _module_name(model: nn.Module, part: nn.Module) -> str:
    return "" if part is model else next(n for n, m in model.named_modules() if m is part)

