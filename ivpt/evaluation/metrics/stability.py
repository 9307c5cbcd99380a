"""Part stability: whether each prototype's part hits survive seeded Gaussian noise on the box crops."""

import torch

from ... import metrics
from . import EvaluationMetric


def collect(outputs):
    return {"hits": list(outputs.hits), "noisy_hits": list(outputs.noisy_hits), "labels": list(outputs["labels"]),
            "noisy_near_constant": outputs.noisy_near_constant}


def reduce(records, fit_records, context):
    labels = torch.stack(records["labels"])
    return {"stability": metrics.stability_score(torch.stack(records["hits"]), torch.stack(records["noisy_hits"]),
                                                 labels, context.num_classes),
            "near_constant_maps_perturbed": int(sum(records["noisy_near_constant"]))}


METRIC = EvaluationMetric(
    name="stability", columns=("image", "label", "bbox", "keypoints"), pass_name="box_crop", collect=collect,
    reduce=reduce, report_rows=(("stability", "stability %", "↑"),),
    description="part stability under input noise",
)
