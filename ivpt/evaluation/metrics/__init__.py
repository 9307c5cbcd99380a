"""The evaluation metrics, registered in one place.

Each metric is one module defining `METRIC`, an `EvaluationMetric` that states the schema columns it needs, the pass
that feeds it (`ivpt.evaluation.passes`), what it records per batch and how it reduces the gathered records. Adding a
metric is one new module plus its line in `_MODULES`; the CLI's `--metrics`, the skip lines of the report and the
report table follow from the registry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["EvaluationMetric", "REGISTRY"]


@dataclass(frozen=True)
class EvaluationMetric:
    """One evaluation metric.

    Args:
        name: the `--metrics` name.
        columns: schema columns the evaluated split must provide (`ivpt.evaluation.schema`).
        pass_name: the pass whose `PassOutputs` feed `collect` (`"classification"`, `"box_crop"`, `"parts"`).
        collect: `outputs -> {key: list}` per batch of the evaluated split; lists are concatenated over batches and
            processes.
        reduce: `(records, fit_records, context) -> {result key: value}`; `fit_records` are the train-split records
            when `fit_on_train`, else None.
        fit_on_train: also run `collect` over the train split (the metric is skipped when there is none).
        report_rows: `(result key, label, better)` rows of the Markdown report.
        description: one line for `--help`.
    """

    name: str
    columns: tuple[str, ...]
    pass_name: str
    collect: Callable
    reduce: Callable
    fit_on_train: bool = False
    report_rows: tuple[tuple[str, str, str], ...] = field(default=())
    description: str = ""

    def missing_columns(self, columns) -> list[str]:
        return [c for c in self.columns if c not in columns]


_MODULES = ("accuracy", "consistency", "stability", "nmi_ari", "kpr", "fg_iou", "part_nmi_ari")

REGISTRY: dict[str, EvaluationMetric] = {}
for _module in _MODULES:
    _metric = importlib.import_module(f".{_module}", __name__).METRIC
    REGISTRY[_metric.name] = _metric

