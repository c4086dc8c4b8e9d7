"""A model and its compression state <-> one .mpz file (see docs/format.md for the bytes)."""
from __future__ import annotations

import ctypes
import os
from collections import Counter
from typing import Any

import torch
from torch import nn

from .. import surgery
from ..errors import CorruptStream, FormatError, ModelMismatch
from ..runtime.packed import packable, packed_layer
from ..runtime.sparse import sparsify
from ..state import FORMS, CompressionState
from . import arch, guard
from .codecs import check_entry, decode_tensor, encode_tensor
from .container import read_container, write_container

FORMAT_NAME = "modelpress"


def encode_model(model: nn.Module, state: CompressionState, meta: dict | None = None
                 ) -> tuple[dict, dict[str, bytes]]:
    """The manifest and streams for every parameter and buffer of `model`."""
    tensors, streams = {}, {}
    sd = model.state_dict()
    owner = _owners(sd, state)
    for i, name in enumerate(sorted(sd)):  # streams are keyed by the index in sorted name order: short
        t = sd[name]
        if owner[name] != name:  # a tied weight: stored once, under the name that carries its state
            tensors[name] = {"kind": "alias", "of": owner[name], "shape": list(t.shape)}
            continue
        entry, s = encode_tensor(name, t.detach().cpu(), state.params.get(name), key=str(i))
        tensors[name] = entry
        streams.update(s)
    spec = arch.describe(model)
    manifest = {"format": FORMAT_NAME, "arch": spec, "tensors": tensors, "meta": meta or {}}
    swaps = arch.describe_swaps(model) if spec is None else None
    if swaps:  # a user's class with runtime layers: load rebuilds them inside the user's skeleton
        manifest["swaps"] = swaps
    return manifest, streams


def decode_state_dict(manifest: dict, streams: dict[str, bytes], as_grid: set[str] = frozenset(),
                      only: set[str] | None = None) -> dict[str, Any]:
    """Every tensor of a manifest (or those named in `only`, aliases not followed), decoded and checked;
    those named in `as_grid` (grid-coded, unmasked) as the form's codes and scales (`forms.grid.GridWeight`)
    instead of a float tensor."""
    entries = _entries(manifest)
    out, aliases = {}, {}
    for i, name in enumerate(sorted(entries)):
        entry = entries[name]
        if only is not None and (name not in only or entry.get("kind") == "alias"):
            continue
        if entry.get("kind") == "alias":
            aliases[name] = entry
            continue
        if name in as_grid:
            grid, _ = FORMS["quant"].decode_grid(name, entry, streams, str(i), *check_entry(name, entry))
            out[name] = grid
            continue
        out[name] = decode_tensor(name, entry, streams, key=str(i))
    for name, entry in aliases.items():
        out[name] = out[_alias_target(name, entry, out)]
    return out


def declared_tensors(manifest: dict, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Every tensor the manifest declares, as a meta tensor of its shape and dtype (nothing is decoded);
    raises LimitExceeded if decoding them all would take more than `max_bytes`."""
    entries = _entries(manifest)
    out, aliases, total = {}, {}, 0
    for name, entry in entries.items():
        if entry.get("kind") == "alias":
            aliases[name] = entry
            continue
        shape, dtype, numel = check_entry(name, entry)
        total += guard.decoded_bytes(numel, dtype.itemsize)
        if max_bytes is not None and total > max_bytes:
            raise guard.over_limit("decoding the tensors", total, max_bytes)
        out[name] = torch.empty(shape, dtype=dtype, device="meta")
    for name, entry in aliases.items():
        out[name] = out[_alias_target(name, entry, out)]
    return out


def _entries(manifest: dict) -> dict[str, dict]:
    tensors = manifest.get("tensors")
    if not isinstance(tensors, dict):
        raise CorruptStream("the manifest has no 'tensors' table")
    for name, entry in tensors.items():
        if not isinstance(entry, dict):
            raise CorruptStream(f"tensor {name[:200]!r}: entry is not a mapping")
    return tensors


def _alias_target(name: str, entry: dict, stored: dict[str, torch.Tensor]) -> str:
    """The stored tensor an alias entry shares, checked to have the alias's shape."""
    of = entry.get("of")
    target = stored.get(of) if isinstance(of, str) else None
    if target is None or entry.get("shape") != list(target.shape):
        raise CorruptStream(f"tensor {name!r}: alias of {str(of)[:200]!r}, which is not a stored tensor of the "
                            "same shape")
    return of


def _owners(sd: dict[str, torch.Tensor], state: CompressionState) -> dict[str, str]:
    """name -> the name that stores its data: itself, or the first of the names sharing its memory
    (preferring one with a compression state)."""
    groups: dict[tuple, list[str]] = {}
    for name in sorted(sd):
        t = sd[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
            if t.numel() else (name,)
        groups.setdefault(key, []).append(name)
    owner = {}
    for names in groups.values():
        head = next((n for n in names if n in state.params), names[0])
        owner.update(dict.fromkeys(names, head))
    return owner


def save(path: str | os.PathLike, model: nn.Module, state: CompressionState, meta: dict | None = None) -> int:
    """Encode and write atomically; returns the file's size in bytes."""
    return write(path, *encode_model(model, state, meta))


def write(path: str | os.PathLike, manifest: dict, streams: dict[str, bytes]) -> int:
    """Write an encoded model atomically; returns the file's size in bytes."""
    return write_container(path, manifest, streams)


def read(source: str | os.PathLike | bytes) -> tuple[dict, dict[str, bytes], int]:
    """Read and check the container, and that it holds a modelpress model: (manifest, streams, the bytes of
    the streams: what the decode limit is measured against)."""
    manifest, streams = read_container(source)
    if manifest.get("format") != FORMAT_NAME:
        raise FormatError(f"the file is a container but not a modelpress model "
                          f"(format={str(manifest.get('format'))[:40]!r})")
    return manifest, streams, sum(len(s) for s in streams.values())


def load(source: str | os.PathLike | bytes, model: nn.Module | None = None, max_bytes: int | None = None,
         packed: bool = True) -> nn.Module:
    """Rebuild the model (from its stored architecture, or into the skeleton `model`, where the file's runtime
    layers and resized layers take the place of the skeleton's) with decoded weights.

    Everything is checked before it is decoded: the declared tensors fit `max_bytes` (default: 1024x the
    bytes of the file's streams, at least 16 MiB), the architecture builds within the same bound and has
    exactly the file's tensor names, shapes and dtypes."""
    return from_parts(*read(source), model=model, max_bytes=max_bytes, packed=packed)


def from_parts(manifest: dict, streams: dict[str, bytes], size: int, model: nn.Module | None = None,
               max_bytes: int | None = None, packed: bool = True) -> nn.Module:
    """`load` of what `read` returned, for a caller that also reads the manifest. `streams` is emptied as
    the weights are built, so that their memory goes back to the OS however many references the caller holds."""
    limit = guard.max_bytes_for(size, max_bytes)
    declared = declared_tensors(manifest, limit)
    if model is None:
        spec = manifest.get("arch")
        if spec is None:
            raise ModelMismatch(
                "this file does not hold an architecture modelpress can rebuild (the model is not made only "
                "of standard torch.nn layers); pass a skeleton: modelpress.load(path, model=MyModel())")
        model = arch.build(spec, device="cpu", max_modules=guard.max_modules_for(len(declared)), max_bytes=limit)
    else:
        swaps = arch.swaps_of(manifest.get("arch")) or manifest.get("swaps")
        if swaps:
            arch.apply_swaps(model, swaps, max_modules=guard.max_modules_for(len(declared)), max_bytes=limit)
        _resize_layers(model, declared)
    _check_against(model, declared)
    keep = _packable(model, manifest) if packed else set()
    state = decode_state_dict(manifest, streams, as_grid=keep)
    for name in keep:  # the layer is replaced by its packed form, holding the codes as stored
        layer = name.removesuffix(".weight")
        bias = state.pop(f"{layer}.bias", None)
        surgery.replace(model, layer, packed_layer(model.get_submodule(layer), state.pop(name), bias))
    missing, unexpected = model.load_state_dict(state, strict=not keep, assign=True)
    layers = {name.removesuffix(".weight") for name in keep}
    missing = [m for m in missing if m.rpartition(".")[0] not in layers]  # the packed layers' own tensors
    if missing or unexpected:
        raise ModelMismatch(f"the file's tensors do not match the model: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
    del state
    streams.clear()
    if packed:
        sparsify(model)
    release_freed_memory()
    return model.eval()


def release_freed_memory() -> None:
    """Hand the memory freed while decoding (the skeleton's fp32 weights, the streams, decode buffers) back
    to the OS. glibc keeps freed blocks of the sizes it has seen for reuse, which left a loaded int8
    MiniLM holding 96 MiB more than its 20 MiB file instead of 31 MiB."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _packable(model: nn.Module, manifest: dict) -> set[str]:
    """The weights load keeps packed: grid-coded at 2-8 bits, unmasked, of an nn.Linear or nn.Embedding
    (`runtime.packed.packable`), and not shared with another tensor."""
    entries = _entries(manifest)
    shared = {e.get("of") for e in entries.values() if e.get("kind") == "alias"}
    out, fixed = set(), surgery.fixed_layers(model)
    for name, entry in entries.items():
        if entry.get("kind") != "q" or entry.get("masked") or name in shared or not name.endswith(".weight"):
            continue
        bits = entry.get("bits")
        layer = name.removesuffix(".weight")
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            continue
        if isinstance(bits, int) and 2 <= bits <= 8 and packable(module) and layer not in fixed:
            out.add(name)
    return out


def _resize_layers(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give a skeleton's standard layers the channel counts stored in the file (a model whose channels
    were pruned loads into a skeleton of its original class)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for name, m in model.named_modules():
        w = shapes.get(f"{name}.weight" if name else "weight")
        if w is not None and getattr(m, "weight", None) is not None and tuple(m.weight.shape) != w:
            surgery.resize_to(m, f"{name}." if name else "", shapes)


def _check_against(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The file's tensors are exactly the model's: the same names, shapes and dtypes."""
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    got = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    both = sorted(set(got) & set(expected))
    wrong = [f"{k}: file has {list(got[k][0])}, model has {list(expected[k][0])}"
             for k in both if got[k][0] != expected[k][0]]
    wrong += [f"{k}: file has {str(got[k][1])[6:]}, model has {str(expected[k][1])[6:]}"
              for k in both if got[k][1] != expected[k][1]]
    if missing or extra or wrong:
        parts = ([f"missing in the file: {missing[:5]}"] if missing else []) + \
                ([f"not in the model: {extra[:5]}"] if extra else []) + wrong[:5]
        raise ModelMismatch("the model does not match the file: " + "; ".join(parts))


def describe_file(source: Any, max_bytes: int | None = None) -> list[dict]:
    """`describe` of a file's tensors, decoded under the same limit as `load`."""
    manifest, streams, size = read(source)
    declared_tensors(manifest, guard.max_bytes_for(size, max_bytes))
    return describe(manifest, streams)


def describe(manifest: dict, streams: dict[str, bytes]) -> list[dict]:
    """Per tensor: kind, shape, bytes, sparsity and bits (stored bits per parameter), for `inspect` and
    compare's per-layer table."""
    state = decode_state_dict(manifest, streams)
    per_key: Counter[str] = Counter()  # stream bytes per tensor index
    for k, v in streams.items():
        per_key[k.rpartition("/")[0]] += len(v)
    rows = []
    for i, name in enumerate(sorted(state)):
        entry, t = manifest["tensors"][name], state[name]
        nbytes, numel = per_key.get(str(i), 0), max(1, t.numel())
        bits = entry["bits"] if entry["kind"] == "q" else (entry["k"] - 1).bit_length() if entry["kind"] == "cb" \
            else None  # both checked by the decoder
        rows.append({"name": name, "kind": entry["kind"], "shape": list(t.shape), "bytes": nbytes,
                     "sparsity": float((t == 0).sum()) / numel, "bits": bits or t.element_size() * 8,
                     "bits_per_param": 8.0 * nbytes / numel})
    return rows
