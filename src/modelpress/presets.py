"""Named recipes. Each is plain YAML so users can copy one and edit it."""

DEEP_COMPRESSION = """\
# Deep Compression (Han et al. 2016), pushed further: gradual pruning (AGP, Taylor importance) with
# recovery training, stopping where the model stops agreeing with the original on the training data
# (sparsity: auto, at most 96%); 3-bit weight sharing with centroid fine-tuning; context-adaptive
# entropy coding in the file.
stages:
  - prune: {sparsity: auto, max_sparsity: 0.96, tolerance: 1.5, criterion: taylor, scope: global,
            steps: 12, epochs: 12, lr: 1.0e-3}
  - finetune: {epochs: 4, lr: 3.0e-4}
  - cluster: {bits: 3}
  - finetune: {epochs: 4, lr: 3.0e-4}
"""

PRESETS: dict[str, str] = {
    "deep-compression": DEEP_COMPRESSION,
}
