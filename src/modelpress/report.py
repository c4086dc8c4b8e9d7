"""Per-stage measurements and their rendering as a plain table or a rich one."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class StageRow:
    """The model after one stage: exact artifact bytes, ratio to fp32 parameter bytes, and metrics."""

    stage: str
    bytes: int
    ratio: float
    params: int
    sparsity: float          # fraction of zero weights among all parameters
    bits_per_param: float    # stored bits per parameter, whole file counted
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Report:
    rows: list[StageRow] = field(default_factory=list)
    fp32_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def columns(self) -> list[str]:
        metric_names = sorted({k for r in self.rows for k in r.metrics})
        return ["stage", "bytes", "ratio", "sparsity", "bits/param", *metric_names, "seconds"]

    def table_rows(self) -> list[list[str]]:
        metric_names = self.columns()[5:-1]
        out = []
        for r in self.rows:
            out.append([r.stage, f"{r.bytes:,}", f"{r.ratio:.1f}x", f"{100 * r.sparsity:.1f}%",
                        f"{r.bits_per_param:.2f}",
                        *[fmt_metric(r.metrics.get(m)) for m in metric_names], f"{r.seconds:.1f}"])
        return out

    def __str__(self) -> str:
        header, rows = self.columns(), self.table_rows()
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                       for i, (c, w) in enumerate(zip(cells, widths)))
        return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows), *self.notes])

    def to_rich(self, title: str | None = None):
        from rich.table import Table

        table = Table(title=title)
        for i, h in enumerate(self.columns()):
            table.add_column(h, justify="left" if i == 0 else "right")
        for r in self.table_rows():
            table.add_row(*r)
        return table

    def to_dict(self) -> dict:
        return {"fp32_bytes": self.fp32_bytes, "rows": [asdict(r) for r in self.rows], "notes": self.notes}

    @property
    def final(self) -> StageRow:
        return self.rows[-1]


def fmt_metric(v: float | None) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if abs(v) <= 1 else f"{v:.2f}"  # cosines need the digits that accuracies don't
