"""Foreground / background IoU between the non-background parts and the foreground mask."""

import torch

from ... import metrics
from . import EvaluationMetric


def collect(outputs):
    counts = metrics.foreground_iou_counts(outputs.maps, outputs["mask"].to(outputs.maps.device),
                                           threshold=outputs.context.settings.mask_threshold)
    return {"counts": [counts.cpu()]}


def reduce(records, fit_records, context):
    return metrics.foreground_iou_from_counts(torch.stack(records["counts"]).sum(0))


METRIC = EvaluationMetric(
    name="fg_iou", columns=("image", "mask"), pass_name="parts", collect=collect, reduce=reduce,
    report_rows=(("foreground_iou", "foreground IoU %", "↑"), ("background_iou", "background IoU %", "↑")),
    description="foreground / background IoU against the foreground mask",
)
