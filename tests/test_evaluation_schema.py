"""The evaluation schema and the metric registry: type checks, skipped metrics, and a metric added as one entry."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ivpt import IvptForImageClassification
from ivpt.evaluation import (
    REGISTRY,
    EvaluationData,
    EvaluationError,
    EvaluationMetric,
    EvaluationSettings,
    SchemaError,
    evaluate_dataset,
    parse_metrics,
    report_rows,
)

from conftest import tiny_config


def _images(count, size=40, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def masked():
    """6 images with labels and foreground masks only (no box, no keypoints)."""
    masks = [Image.fromarray(np.tile((np.arange(40) > 20).astype(np.uint8) * 255, (40, 1))) for _ in range(6)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("abc")),
                                  "mask": datasets.Image()})
    return datasets.Dataset.from_dict({"image": _images(6), "label": [0, 1, 2] * 2, "mask": masks}, features=features)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return IvptForImageClassification(tiny_config(num_labels=3))


def test_schema_types_are_checked_with_the_column_named():
    images = _images(2)
    with pytest.raises(SchemaError, match=r"missing required column\(s\) \['label'\]"):
        EvaluationData(datasets.Dataset.from_dict({"image": images}, features=datasets.Features(
            {"image": datasets.Image()})), name="x")
    bad_mask = datasets.Dataset.from_dict({"image": images, "label": [0, 1], "mask": ["m", "n"]}).cast_column(
        "image", datasets.Image())
    with pytest.raises(SchemaError, match="x \\(evaluated split\\): column 'mask' must be an Image feature"):
        EvaluationData(bad_mask, name="x")
    bad_label = datasets.Dataset.from_dict({"image": images, "label": ["a", "b"]}).cast_column(
        "image", datasets.Image())
    with pytest.raises(SchemaError, match="column 'label' must be a ClassLabel or an integer Value"):
        EvaluationData(bad_label, name="x")
    bad_keypoints = datasets.Dataset.from_dict({"image": images, "label": [0, 1], "keypoints": [[1.0], [2.0]]})
    with pytest.raises(SchemaError, match="column 'keypoints' must be a List of \\{part_id, x, y, visible\\}"):
        EvaluationData(bad_keypoints.cast_column("image", datasets.Image()), name="x")


def test_all_null_column_counts_as_absent(masked, model):
    no_masks = masked.map(lambda row: {"mask": None})
    result = evaluate_dataset(model, EvaluationData(no_masks), "accuracy,fg_iou", EvaluationSettings(batch_size=4),
                              device="cpu")
    assert result["skipped"] == {"fg_iou": "the evaluated split has no mask column"}
    assert result["metrics"]["accuracy"]["num_images"] == 6


def test_a_metric_is_one_registry_entry(masked, model, monkeypatch):
    """A new metric: one `EvaluationMetric` (its module's METRIC) in the registry; --metrics, the run, the skip
    logic and the report rows follow without touching anything else."""

    def collect(outputs):  # per image: the mean of the evaluated stage's background channel
        return {"background": list(outputs.maps[:, -1].mean(dim=(-2, -1)).cpu())}

    def reduce(records, fit_records, context):
        return {"mean_background": float(torch.stack(records["background"]).mean() * 100)}

    extra = EvaluationMetric(name="background_share", columns=("image",), pass_name="parts", collect=collect,
                             reduce=reduce, report_rows=(("mean_background", "background share %", "↓"),))
    needs_boxes = EvaluationMetric(name="box_thing", columns=("image", "bbox"), pass_name="parts", collect=collect,
                                   reduce=reduce)
    monkeypatch.setitem(REGISTRY, extra.name, extra)
    monkeypatch.setitem(REGISTRY, needs_boxes.name, needs_boxes)
    assert parse_metrics("all")[-2:] == ["background_share", "box_thing"]
    result = evaluate_dataset(model, EvaluationData(masked), "fg_iou,background_share,box_thing",
                              EvaluationSettings(batch_size=4), device="cpu")
    assert result["skipped"] == {"box_thing": "the evaluated split has no bbox column"}
    assert 0 <= result["metrics"]["mean_background"] <= 100 and "foreground_iou" in result["metrics"]
    assert result["processes"] == {"parts": [6]}  # both metrics share one pass over the images
    assert report_rows("background_share") == (("mean_background", "background share %", "↓"),)


def test_unknown_metric_is_an_evaluation_error():
    with pytest.raises(EvaluationError, match="--metrics: expected 'all' or a comma list of accuracy, "):
        parse_metrics("accuracy,nope")
