"""Part stability: whether each prototype's part hits survive seeded Gaussian noise on the box crops."""

import torch

from ... import metrics
from . import EvaluationMetric


def collect(outputs):
    return {"hits": list(outputs.hits), "noisy_hits": list(outputs.noisy_hits), "labels": list(outputs["labels"])}


def reduce(records, fit_records, context):
    labels = torch.stack(records["labels"])
    return {"stability": metrics.stability_score(torch.stack(records["hits"]), torch.stack(records["noisy_hits"]),
                                                 labels, context.num_classes)}


METRIC = EvaluationMetric(
    name="stability", columns=("image", "label", "bbox", "keypoints"), pass_name="box_crop", collect=collect,
    reduce=reduce, report_rows=(("stability", "stability %", "↑"),),
    description="part stability under input noise",
)
