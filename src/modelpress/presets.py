"""Named recipes. Each is plain YAML so users can copy one and edit it."""

DEEP_COMPRESSION = """\
# Deep Compression (Han et al. 2016), pushed further: gradual pruning (AGP, Taylor importance) with
# recovery by distillation from the original, stopping before the step that loses clearly more than
# half a point of accuracy (of top-1 agreement without labels) on validation data, or else on a tenth
# of train_data held out from training (sparsity: auto, at most 95%); 4-bit weight sharing with
# distilled centroid fine-tuning; context-adaptive entropy coding in the file.
stages:
  - prune: {sparsity: auto, max_sparsity: 0.95, tolerance: 0.5, criterion: taylor, scope: global,
            steps: 12, epochs: 72, lr: 1.0e-3, distill: true}
  - distill: {epochs: 4, lr: 3.0e-4}
  - cluster: {bits: 4}
  - distill: {epochs: 12, lr: 1.0e-3}
"""

INT8 = """\
# int8 weights (per output channel, GPTQ from calibration data) and int8 activations (per token,
# quantized at run time): Linear layers run as int8 x int8 products on the CPU's fastest integer
# kernel; embedding tables are stored as int8 too. No training.
stages:
  - quantize: {bits: 8, activations: int8, method: gptq}
"""

W4 = """\
# 4-bit weight-only, groups of 64 inputs, GPTQ error compensation from calibration data; the most
# sensitive layers (measured) get more bits, 4.4 bits per weight on average. Embedding tables too.
stages:
  - quantize: {bits: 4, group_size: 64, method: gptq, avg_bits: 4.4}
"""

W3 = """\
# 3-bit weight-only, groups of 64, GPTQ; measured-sensitive layers get more bits (3.4 on average).
stages:
  - quantize: {bits: 3, group_size: 64, method: gptq, avg_bits: 3.4}
"""

FAST = """\
# Faster models: 60% of the prunable channels (conv filters, Linear neurons) go, ranked over the whole
# network by what each contributes to the next layer's output on calibration data, and the layers
# really shrink (each Linear that loses inputs is refitted to its calibration outputs); then
# label-free distillation from the original recovers accuracy.
stages:
  - prune: {granularity: channel, sparsity: 0.6, criterion: activation, scope: global}
  - distill: {epochs: 10, lr: 1.0e-3}
"""

FAST_ATTENTION = """\
# Faster models with attention layers that block removal cannot shorten (no transformers config counts
# their layers): 40% of the attention heads and FFN neurons go, ranked by what they contribute to the
# next layer's output on calibration data; the output projections are refitted by least squares; then
# distillation from the original (last and intermediate hidden states, dropout off).
stages:
  - prune: {granularity: channel, sparsity: 0.4, criterion: activation, scope: global}
  - distill: {epochs: 3, lr: 1.5e-4, hidden: true}
"""

FAST_TRANSFORMER = """\
# Faster transformers (what `fast` means for a transformers model of 2 or more layers): the layer whose
# removal changes the outputs least on calibration data goes, and distillation from the original (last
# and intermediate hidden states, dropout off) recovers; the removal is undone unless the outputs keep a
# mean cosine of 0.98 to the original's on held-out text (val_data, else a tenth of train_data); then int8
# weights and activations as in `int8`. Fast with modelpress.accelerate. On all-MiniLM-L6-v2 a removal
# holding 0.96-0.98 on held-out Python docs held 0.94 on the King James Bible, against 0.997 for int8
# alone (benchmarks/fast_domains.py); pruning heads and FFN neurons instead lost more still.
stages:
  - prune: {granularity: block, blocks: 1, epochs: 2, lr: 1.5e-4, min_fidelity: 0.98}
  - quantize: {bits: 8, activations: int8, method: gptq}
"""

# presets whose form differs for a transformers model (layers counted by its config) and for other
# models with attention layers
TRANSFORMER_PRESETS: dict[str, str] = {"fast": FAST_TRANSFORMER}
ATTENTION_PRESETS: dict[str, str] = {"fast": FAST_ATTENTION}

PRESETS: dict[str, str] = {
    "deep-compression": DEEP_COMPRESSION,
    "int8": INT8,
    "w4": W4,
    "w3": W3,
    "fast": FAST,
}


def has_attention(model) -> bool:
    """True for a model with attention layers (a transformers model, or any module class named *Attention*)."""
    return any("Attention" in type(m).__name__ for m in model.modules())
