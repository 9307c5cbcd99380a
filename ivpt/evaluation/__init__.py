"""Evaluation of IVPT models on any part-annotated `datasets.Dataset` (see `schema` for the columns).

* `schema` — the evaluation dataset schema, `EvaluationData`, the CUB adapter `from_cub`;
* `metrics` — the metric registry (one module per metric, each stating the columns it needs);
* `passes` — the preprocessing protocols and sharded, gathered iteration;
* `core` — `evaluate_dataset` (skips metrics whose columns are absent) and `evaluate_interpretability` (CUB).
"""

from .core import (
    METRICS,
    EvaluationError,
    EvaluationSettings,
    chance_levels,
    check_device,
    check_labels,
    evaluate_dataset,
    evaluate_interpretability,
    evaluation_device,
    model_fingerprint,
    parse_metrics,
    plan_metrics,
    report_rows,
    save_consistency_examples,
)
from .metrics import REGISTRY, EvaluationMetric
from .schema import EvaluationData, SchemaError, check_schema, from_cub, from_dataset_dict

__all__ = [
    "METRICS",
    "REGISTRY",
    "EvaluationData",
    "EvaluationError",
    "EvaluationMetric",
    "EvaluationSettings",
    "SchemaError",
    "chance_levels",
    "check_device",
    "check_labels",
    "check_schema",
    "evaluate_dataset",
    "evaluate_interpretability",
    "evaluation_device",
    "from_cub",
    "from_dataset_dict",
    "model_fingerprint",
    "parse_metrics",
    "plan_metrics",
    "report_rows",
    "save_consistency_examples",
]
