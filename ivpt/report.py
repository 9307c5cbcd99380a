"""Evaluation reports: metrics.json and a Markdown table next to the published numbers (atomic writes)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .paper_numbers import PUBLISHED

# (key in the flat metrics dict, label, better)
ROWS = (
    ("top1_micro", "top-1 accuracy (micro) %", "↑"),
    ("top1_macro", "top-1 accuracy (macro) %", "↑"),
    ("top5_micro", "top-5 accuracy (micro) %", "↑"),
    ("consistency", "consistency %", "↑"),
    ("stability", "stability %", "↑"),
    ("nmi", "NMI %", "↑"),
    ("ari", "ARI %", "↑"),
    ("kpr", "keypoint regression error % of box", "↓"),
    ("foreground_iou", "foreground IoU %", "↑"),
    ("background_iou", "background IoU %", "↑"),
)
# How the NMI / ARI / KPR / foreground-IoU images were fed to the model (`EvaluationSettings.normalise_parts_input`).
# The published part-discovery protocol feeds unnormalised [0, 1] images although training normalises
# (docs/method.md#quirks); every report names the variant its numbers come from.
PARTS_INPUT_VARIANTS = {False: "unnormalised", True: "ImageNet-normalised"}


def parts_input_variant(normalise_parts_input: bool) -> str:
    """The name of a parts-metric input variant, as written into metrics.json (`parts_input`) and report.md."""
    return PARTS_INPUT_VARIANTS[bool(normalise_parts_input)]


def parts_input_note(variant: str) -> str:
    """One report sentence naming the input variant of the parts metrics."""
    protocol = "the published protocol" if variant == PARTS_INPUT_VARIANTS[False] else "not the published protocol"
    return (f"NMI, ARI, keypoint regression and foreground IoU: **{variant}** input images ({protocol}; "
            "see docs/method.md#parts-metric-input).")


def write_atomic(path: str | Path, text: str) -> Path:
    """Writes `text` to a temporary file next to `path`, then renames it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def flatten_metrics(metrics: dict) -> dict[str, float]:
    """`{"accuracy": {"top1_micro": ..}, "nmi": ..}` -> one level of numbers."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update({k: v for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = value
    return flat


def markdown_table(columns: dict[str, dict], published: dict[str, dict] = PUBLISHED, rows=ROWS) -> str:
    """One row per metric of `rows` ((key, label, better) triples); our columns (name -> metrics), then the published
    columns ("–" where not reported).

    A last row names each column's `parts_input` variant (see `parts_input_variant`) when any column records one; "–"
    for columns without one (no parts metrics, or reference values such as chance levels).
    """
    variants = [values.get("parts_input") for values in columns.values()]
    columns = {name: flatten_metrics(values) for name, values in columns.items()}
    headers = ["metric", *columns, *published]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for key, label, better in rows:
        cells = [columns[name].get(key) for name in columns] + [published[name].get(key) for name in published]
        if all(cell is None for cell in cells[: len(columns)]):
            continue
        lines.append(f"| {label} {better} | " + " | ".join("–" if c is None else f"{c:.2f}" for c in cells) + " |")
    if any(variants):
        cells = [variant or "–" for variant in variants] + ["–"] * len(published)
        lines.append("| parts-metric input | " + " | ".join(cells) + " |")
    return "\n".join(lines)
