"""Part consistency: how often each class's prototype region covers one ground-truth part (box crops)."""

import torch

from ... import metrics
from . import EvaluationMetric


def collect(outputs):
    return {"hits": list(outputs.hits), "visible": list(outputs.points_visible[1]), "labels": list(outputs["labels"]),
            "near_constant": outputs.near_constant}


def reduce(records, fit_records, context):
    labels = torch.stack(records["labels"])
    score = metrics.consistency_score(torch.stack(records["hits"]), torch.stack(records["visible"]), labels,
                                      context.num_classes, context.settings.part_threshold)
    hits = records["hits"]
    # maps whose peak is a tie (docs/method.md#consistency), out of images x foreground prototypes
    return {"consistency": score, "consistency_num_images": len(labels),
            "near_constant_maps": int(sum(records["near_constant"])),
            "consistency_num_maps": int(len(hits) * (hits[0].shape[0] if hits else 0))}


METRIC = EvaluationMetric(
    name="consistency", columns=("image", "label", "bbox", "keypoints"), pass_name="box_crop", collect=collect,
    reduce=reduce, report_rows=(("consistency", "consistency %", "↑"),),
    description="part consistency on box crops",
)
