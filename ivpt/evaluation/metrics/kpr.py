"""Keypoint regression error: a linear map from part centroids to keypoints, fitted on train, tested on test."""

import torch

from ... import metrics
from . import EvaluationMetric


def collect(outputs):
    features, active = metrics.part_centroid_features(outputs.maps, outputs["bbox"].to(outputs.maps.device),
                                                      outputs.context.image_size)
    keypoints = outputs["keypoints"][..., 1:].double()
    return {"features": list(features.cpu()), "active": list(active.cpu()),
            "keypoints": list(metrics.box_normalised_keypoints(keypoints, outputs["bbox"].double()))}


def reduce(records, fit_records, context):
    stack = lambda r, k: torch.stack(r[k])  # noqa: E731
    return {"kpr": metrics.keypoint_regression_error(
        stack(fit_records, "features"), stack(fit_records, "active"), stack(fit_records, "keypoints"),
        stack(records, "features"), stack(records, "active"), stack(records, "keypoints"))}


METRIC = EvaluationMetric(
    name="kpr", columns=("image", "bbox", "keypoints"), pass_name="parts", collect=collect, reduce=reduce,
    fit_on_train=True, report_rows=(("kpr", "keypoint regression error % of box", "↓"),),
    description="keypoint regression error (fit on the train split)",
)
