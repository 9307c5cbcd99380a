"""NMI / ARI between the predicted part at each visible keypoint and the keypoint's identity."""

import torch

from ... import metrics
from . import EvaluationMetric


def collect(outputs):
    keypoints = outputs["keypoints"][..., 1:].double()  # (batch, parts, 3) x, y, visible
    predicted, ground_truth = metrics.keypoint_part_assignments(outputs.maps, keypoints.to(outputs.maps.device),
                                                                outputs.context.image_size)
    return {"predicted": [predicted.cpu()], "ground_truth": [ground_truth.cpu()]}


def reduce(records, fit_records, context):
    predicted, ground_truth = torch.cat(records["predicted"]), torch.cat(records["ground_truth"])
    scores = metrics.nmi_ari(predicted, ground_truth)
    return {"nmi": scores["nmi"], "ari": scores["ari"], "nmi_ari_num_keypoints": int(len(predicted))}


METRIC = EvaluationMetric(
    name="nmi_ari", columns=("image", "keypoints"), pass_name="parts", collect=collect, reduce=reduce,
    report_rows=(("nmi", "NMI %", "↑"), ("ari", "ARI %", "↑")),
    description="NMI / ARI of predicted parts at the ground-truth keypoints",
)
