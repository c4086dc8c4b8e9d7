"""A compressed decoder LM as a GGUF file that llama.cpp runs (LLaMA, Mistral and Qwen2 families).

Quantized layers are written from the file's own codes, nothing re-quantized: llama.cpp's blocks of 32
weights share one float16 scale, so a group of 64 (or 128, or a whole row) becomes 2 (4, cols/32) blocks
with the same scale. Codes of 2-4 bits go out as Q4_0 (code + 8 in a nibble), 5 bits as Q5_0, 6-8 bits as
Q8_0; the only change to the weights is each scale rounded to float16 (`GgufReport.scale_rounding`).
Norms and float layers are written as float32. LLaMA's q and k rows are reordered the way llama.cpp's
rotary embedding expects (its converter does the same); a row's codes and scales move together, so
this is exact. The tokenizer comes from the model's Hugging Face folder (`tokenizer.json`, byte-level BPE
as "gpt2" or SentencePiece-style BPE as "llama", scored by merge rank); without one the file holds no
vocabulary and runs on token ids only. The `gguf` package (llama.cpp's own) writes the file.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ModelpressError
from .format import mpz
from .runtime import Embedding16, Linear16, quantized_weight

log = logging.getLogger(__name__)

BLOCK = 32  # weights per llama.cpp block of Q4_0, Q5_0 and Q8_0
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # config.model_type -> GGUF architecture
# tokenizer.json's pre-tokenizer -> llama.cpp's name for it (`tokenizer.ggml.pre`), for byte-level BPE
_DIGITS_THEN_BYTES = [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = _QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


@dataclass
class GgufReport:
    """What `to_gguf` wrote: the tensors by GGUF type, the vocabulary, and the largest relative change of
    a scale in its rounding to float16 (the only way the GGUF weights differ from the file's)."""

    path: Path
    bytes: int
    types: dict[str, int] = field(default_factory=dict)
    vocab: str = "none"
    scale_rounding: float = 0.0


def _gguf() -> Any:
    """The `gguf` package (llama.cpp's own reader and writer), or an error saying how to install it."""
    try:
        import gguf
    except ImportError as e:
        raise ModelpressError(f'GGUF export needs the gguf package ({e}): pip install "modelpress[hf]"') from None
    return gguf


def _qtype(bits: int) -> Any:
    T = _gguf().GGMLQuantizationType
    return T.Q4_0 if bits <= 4 else T.Q5_0 if bits == 5 else T.Q8_0


def encode_blocks(codes: torch.Tensor, scale: torch.Tensor, bits: int, group: int) -> tuple[np.ndarray, float]:
    """Signed codes (rows, cols) with float32 scales (rows, groups or 1) as llama.cpp's Q4_0 (bits <= 4),
    Q5_0 (5) or Q8_0 (6-8) blocks: (rows, cols/32 * block bytes) uint8, and the largest relative change of
    a nonzero scale in float16."""
    rows, cols = codes.shape
    if cols % BLOCK or (group and group % BLOCK):
        raise ModelpressError(f"a layer of {cols} inputs in groups of {group or cols} cannot be written as GGUF "
                              f"blocks of {BLOCK}: both must be multiples of {BLOCK}")
    nblk = cols // BLOCK
    d = scale.repeat_interleave(group // BLOCK, dim=1) if group else scale[:, :1].expand(rows, nblk)
    d16 = d.to(torch.float16)
    if not torch.isfinite(d16).all():
        raise ModelpressError("a scale exceeds float16's range (65504): GGUF blocks cannot hold it")
    nz = d != 0
    rounding = float(((d16.float() - d).abs()[nz] / d.abs()[nz]).max()) if nz.any() else 0.0
    q = codes.reshape(rows, nblk, BLOCK).to(torch.int32)
    dbytes = d16.contiguous().view(torch.uint8).reshape(rows, nblk, 2)
    if bits <= 4:  # value j in the low nibble of byte j, value 16 + j in its high nibble
        u = (q + 8).to(torch.uint8)
        body = [u[..., :16] | (u[..., 16:] << 4)]
    elif bits == 5:  # low nibbles as in Q4_0; the fifth bits as one little-endian uint32 per block
        u = q + 16
        qs = ((u[..., :16] & 15) | ((u[..., 16:] & 15) << 4)).to(torch.uint8)
        qh = (((u >> 4) & 1).to(torch.int64) << torch.arange(BLOCK)).sum(-1)
        body = [(qh.unsqueeze(-1) >> torch.arange(0, 32, 8)).to(torch.uint8) & 255, qs]
    else:
        body = [q.to(torch.int8).view(torch.uint8)]
    blocks = torch.cat([dbytes, *body], dim=-1)
    return blocks.reshape(rows, -1).numpy(), rounding


def _permute_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """LLaMA's q/k rows from Hugging Face's rotary layout (halves) to llama.cpp's (interleaved pairs)."""
    rows = t.shape[0]
    return t.reshape(heads, 2, rows // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _weight(m: nn.Module) -> torch.Tensor | None:
    """The float weight of a plain or half-precision Linear/Embedding; None for a quantized one."""
    if isinstance(m, (nn.Linear, nn.Embedding, Linear16, Embedding16)):
        return m.weight.detach().float()
    return None


def _tied_head(model: nn.Module) -> nn.Module | None:
    """The LM head, where it holds exactly the input embedding's weights (tied, and kept so)."""
    head, emb = getattr(model, "lm_head", None), model.get_input_embeddings()
    if head is None or emb is None:
        return None
    a, b = quantized_weight(head, embeddings=True), quantized_weight(emb, embeddings=True)
    if a is not None and b is not None:
        same = a[2:] == b[2:] and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    else:
        wa, wb = (_weight(head), _weight(emb)) if a is None and b is None else (None, None)
        same = wa is not None and wb is not None and torch.equal(wa, wb)
    return head if same and getattr(head, "bias", None) is None else None


def _hparams(writer: Any, config: Any, arch: str) -> None:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in (None, "default"):
        raise ModelpressError(f"GGUF export does not yet write rope scaling {kind!r}; this model's rotary "
                              "embedding would differ in llama.cpp")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(theta))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _parts(step: dict | None, key: str) -> list[dict]:
    """The steps of a tokenizer.json normalizer or pre-tokenizer, a Sequence's or the one."""
    step = step or {}
    return step.get(key, []) if step.get("type") == "Sequence" else [step]


def _byte_level_pre(tok: dict) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer ("default" if not one it knows)."""
    parts = _parts(tok.get("pre_tokenizer"), "pretokenizers")
    slim = [{k: p[k] for k in ("type", "individual_digits", "use_regex") if k in p} for p in parts]
    if slim == [{"type": "ByteLevel", "use_regex": True}]:
        return "gpt-2"
    if slim == _DIGITS_THEN_BYTES:
        return "smollm"
    split = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    if split == [_QWEN2_SPLIT]:
        return "qwen2"
    if split == [_LLAMA3_SPLIT]:
        return "llama-bpe"
    log.warning("GGUF export: llama.cpp may not split text before BPE as this tokenizer does (pre-tokenizer "
                "not recognised); token ids given directly are unaffected")
    return "default"


def _space_prefix(tok: dict) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" before the text (llama.cpp's add_space_prefix)."""
    if any(p.get("type") == "Prepend" for p in _parts(tok.get("normalizer"), "normalizers")):
        return True
    return any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
               and p.get("add_prefix_space", True) for p in _parts(tok.get("pre_tokenizer"), "pretokenizers"))


def _vocab(writer: Any, folder: Path, n_vocab: int) -> str:
    """The tokenizer of `folder` in the file's metadata; returns its llama.cpp model name."""
    gguf = _gguf()

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelpressError(f"{folder} has no tokenizer.json: give the model's Hugging Face folder (or a "
                              "tokenizer saved with save_pretrained), or tokenizer=None for a file without one")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ModelpressError(f"GGUF export writes BPE tokenizers; {path} holds a {model.get('type')} one")
    ids = dict(model["vocab"])
    kinds = {}
    for t in tok.get("added_tokens", []):
        ids[t["content"]] = t["id"]
        kinds[t["id"]] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    if sorted(ids.values()) != list(range(len(ids))):
        raise ModelpressError(f"{path}: token ids are not 0..{len(ids) - 1} without gaps")
    by_id = sorted(ids, key=ids.get)
    tokens = [t.encode("utf-8") for t in by_id]
    types = [kinds.get(i, gguf.TokenType.NORMAL) for i in range(len(by_id))]
    if model.get("byte_fallback"):  # SentencePiece-style BPE (LLaMA 1/2, Mistral, TinyLlama): llama.cpp merges
        # the adjacent pair whose join has the highest score, so a merge's result scores minus its rank
        rank: dict[str, int] = {}
        for r, m in enumerate(model.get("merges", [])):
            rank.setdefault("".join(m.split(" ", 1) if isinstance(m, str) else m), r)
        scores = [-1.0 - rank[t] if t in rank else 0.0 for t in by_id]
        for i, t in enumerate(by_id):
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):  # the byte fallback's tokens, even where listed as added
                types[i] = gguf.TokenType.BYTE
        if model.get("unk_token") in ids:
            types[ids[model["unk_token"]]] = gguf.TokenType.UNKNOWN
        kind, pre = "llama", "default"
        writer.add_add_space_prefix(_space_prefix(tok))
    else:  # byte-level BPE (GPT-2 style: SmolLM, Qwen2, LLaMA 3)
        scores = [0.0] * len(by_id)
        kind, pre = "gpt2", _byte_level_pre(tok)
    for i in range(len(tokens), n_vocab):  # embedding rows beyond the tokenizer's (padding): unused tokens
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    if len(tokens) > n_vocab:
        raise ModelpressError(f"the tokenizer has {len(tokens)} tokens but the model's embedding {n_vocab} rows")
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=kind == "gpt2", n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
    return kind


def _tokenizer_folder(tokenizer: Any, stack: list) -> Path:
    if isinstance(tokenizer, (str, os.PathLike)):
        return Path(tokenizer)
    if not hasattr(tokenizer, "save_pretrained"):
        raise ModelpressError("tokenizer must be a folder (the model's Hugging Face folder) or a transformers "
                              f"tokenizer, not {type(tokenizer).__name__}")
    tmp = tempfile.TemporaryDirectory(prefix="modelpress-tok-")
    stack.append(tmp)
    tokenizer.save_pretrained(tmp.name)
    return Path(tmp.name)


def stored_codes(manifest: dict, streams: dict[str, bytes], model: nn.Module) -> dict[str, tuple]:
    """The codes and scales (as `quantized_weight` gives them) of `model`'s float Linears and Embeddings
    whose weights the file (`mpz.read`'s manifest and streams) stores quantized: those `load` makes float
    because they are tied to another."""
    entries = manifest.get("tensors", {})
    owner = {}
    for name, m in model.named_modules():
        entry = entries.get(f"{name}.weight", {})
        key = entry.get("of") if entry.get("kind") == "alias" else f"{name}.weight"
        e = entries.get(key, {})
        if _weight(m) is not None and e.get("kind") == "q" and not e.get("masked") and e.get("bits") in range(2, 9):
            owner[name] = key
    grids = mpz.decode_state_dict(manifest, streams, as_grid=set(owner.values()), only=set(owner.values()))
    out = {}
    for name, key in owner.items():
        g = grids[key]
        rows, scale = g.codes.shape[0], g.scale.float()
        out[name] = (g.codes, scale.reshape(rows, -1) if scale.numel() > 1 else scale.reshape(1, 1).expand(rows, 1),
                     g.bits, g.group)
    return out


def to_gguf(model: nn.Module | str | os.PathLike, path: str | os.PathLike, tokenizer: Any = None,
            max_bytes: int | None = None) -> GgufReport:
    """Write a compressed decoder LM (a LLaMA, Mistral or Qwen2 model) to `path` as GGUF: from its .mpz
    file, or as `modelpress.load` returned it (then a weight tied to another, which load makes float, is
    written as float32; from the file it keeps its codes). `tokenizer`: the model's Hugging Face folder or a
    transformers tokenizer (None: a file with no vocabulary, which llama.cpp runs on token ids). The file
    appears whole or not at all. `max_bytes`: as for `modelpress.load`, when reading a file."""
    gguf = _gguf()

    coded: dict[str, tuple] = {}
    if isinstance(model, (str, os.PathLike)):  # the file read once: the model, then its tied weights' codes
        manifest, streams, size = mpz.read(model)
        model = mpz.from_parts(manifest, dict(streams), size, max_bytes=max_bytes)  # (empties the copy it gets)
        coded = stored_codes(manifest, streams, model)
    config = getattr(model, "config", None)
    arch = ARCHS.get(getattr(config, "model_type", None))
    if arch is None:
        raise ModelpressError(f"GGUF export writes {', '.join(sorted(ARCHS))} decoder LMs; this model is "
                              f"{getattr(config, 'model_type', type(model).__name__)!r}. Export it with --hf or --onnx")
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), config.num_hidden_layers)
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    report = GgufReport(path, 0)
    kept: list = []
    try:
        writer.add_name(getattr(config, "_name_or_path", None) or type(model).__name__)
        _hparams(writer, config, arch)
        if tokenizer is not None:
            report.vocab = _vocab(writer, _tokenizer_folder(tokenizer, kept), config.vocab_size)
        else:
            writer.add_tokenizer_model("no_vocab")
        counts: Counter = Counter()
        skip = _tied_head(model)
        for mname, m in model.named_modules():
            if m is skip:
                continue  # the same weights as the embedding: llama.cpp uses token_embd when output is absent
            q = quantized_weight(m, embeddings=True) or coded.get(mname)
            w = _weight(m) if q is None else None
            tensors: dict[str, Any] = {k: t.detach().float() for k, t in m.named_parameters(recurse=False)}
            if q is not None or w is not None:
                tensors["weight"] = q or w
            elif not tensors and any(True for _ in m.named_buffers(recurse=False)) and not list(m.children()):
                persistent = set(m._buffers) - m._non_persistent_buffers_set
                if persistent:
                    raise ModelpressError(f"{mname} ({type(m).__name__}) has no GGUF form")
            for k, t in tensors.items():
                name = names.get_name(f"{mname}.{k}", try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ModelpressError(f"{mname}.{k} ({type(m).__name__}) has no GGUF tensor in a {arch} model")
                rope = heads if ".attn_q." in name else kv if ".attn_k." in name else 0
                if isinstance(t, tuple):
                    codes, scale, bits, group = t
                    if arch == "llama" and rope:
                        codes, scale = _permute_rows(codes, rope), _permute_rows(scale, rope)
                    data, rounding = encode_blocks(codes, scale, bits, group)
                    report.scale_rounding = max(report.scale_rounding, rounding)
                    writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=_qtype(bits))
                    counts[_qtype(bits).name] += 1
                else:
                    if arch == "llama" and rope:
                        t = _permute_rows(t, rope)
                    writer.add_tensor(name, t.contiguous().numpy())
                    counts["F32"] += 1
        report.types = dict(counts)
        main = max((k for k in counts if k != "F32"), key=counts.get, default="F32")
        writer.add_file_type({"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
                              "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}.get(main, gguf.LlamaFileType.ALL_F32))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
        for k in kept:
            k.cleanup()
    report.bytes = path.stat().st_size
    return report
