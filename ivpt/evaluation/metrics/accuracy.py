"""Top-1 / top-5 classification accuracy (micro and macro) on the full images."""

import torch

from ... import metrics
from . import EvaluationMetric


def collect(outputs):
    return {"logits": list(outputs.logits), "labels": list(outputs["labels"])}


def reduce(records, fit_records, context):
    logits, labels = torch.stack(records["logits"]), torch.stack(records["labels"])
    top_k = tuple(k for k in (1, 5) if k <= logits.shape[1])
    return {"accuracy": {**metrics.classification_accuracies(logits, labels, top_k=top_k),
                         "routing_noise": context.accuracy_routing_noise, "num_images": len(labels)}}


METRIC = EvaluationMetric(
    name="accuracy", columns=("image", "label"), pass_name="classification", collect=collect, reduce=reduce,
    report_rows=(("top1_micro", "top-1 accuracy (micro) %", "↑"), ("top1_macro", "top-1 accuracy (macro) %", "↑"),
                 ("top5_micro", "top-5 accuracy (micro) %", "↑")),
    description="classification accuracy",
)
