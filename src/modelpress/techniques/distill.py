"""Knowledge distillation: the compressed student learns the uncompressed teacher's outputs (the
losses are in `losses.py`, shared with every training stage).

Label-free, so any `train_data` of inputs works (targets in the batches are ignored). Class scores
(a plain tensor or `.logits`) are matched by Hinton's softened KL; other outputs (an encoder's
`last_hidden_state`) by mean squared error relative to the teacher's mean square. With `hidden`,
the outputs of the blocks that both models have, under the same name and of the same shape (the
children of the root and of every ModuleList: a Sequential's layers, a transformer's blocks), are
matched too."""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from torch import nn

from ..context import RunContext
from ..stage import StageConfig, handles, register_stage
from ..state import CompressionState
from .finetune import train
from .losses import Objective


@register_stage
class DistillConfig(StageConfig):
    """Recovery by distillation from the uncompressed model: label-free (targets are ignored), with
    softened logits at `temperature`, and with `hidden` the outputs of shared blocks matched too."""

    key: ClassVar[str] = "distill"
    trains: ClassVar[bool] = True
    epochs: float = Field(gt=0.0, le=1000)
    lr: float = Field(default=1e-4, gt=0.0, lt=1.0)
    temperature: float = Field(default=2.0, gt=0.0, le=100.0)
    hidden: bool = False


@handles(DistillConfig)
def _apply(model: nn.Module, state: CompressionState, cfg: DistillConfig, run: RunContext) -> None:
    train(model, state, run, epochs=cfg.epochs, lr=cfg.lr, label="distill",
          objective=Objective(distill=True, hidden=cfg.hidden, temperature=cfg.temperature,
                              renamed=tuple(state.renamed.items())))
