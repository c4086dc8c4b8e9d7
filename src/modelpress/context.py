"""What one compress() call hands every stage: the data, the teacher, the user's loss, a progress
hook and the recipe-wide exclusions. Stage options travel in the stage's own config, never here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from torch import nn

from .errors import ModelpressError


@dataclass(frozen=True)
class RunContext:
    train_data: Iterable | None = None
    calib_data: Iterable | None = None   # model-input batches; compress() falls back to train_data's inputs
    val_data: Iterable | None = None     # batches the original did not train on, for stopping decisions
    teacher: nn.Module | None = None     # the uncompressed model, frozen
    loss_fn: Callable | None = None
    progress: Callable[[str, float], None] | None = None
    exclude: tuple[str, ...] = ()        # layer-name patterns every stage leaves alone

    def excluded(self, cfg: Any) -> tuple[str, ...]:
        """The recipe's exclusions plus the stage's own."""
        return tuple(self.exclude) + tuple(getattr(cfg, "exclude", ()))

    def require_train_data(self, what: str) -> Iterable:
        if self.train_data is None:
            raise ModelpressError(
                f"{what} needs train_data: pass an iterable of (inputs, targets) or input-only batches "
                "to compress(..., train_data=...), or remove the training from the recipe")
        return self.train_data

    def report(self, label: str, fraction: float) -> None:
        if self.progress is not None:
            self.progress(label, fraction)
