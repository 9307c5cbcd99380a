"""`evaluate` wrapper of the IVPT classification accuracies (docs/method.md#classification-accuracy).

Load offline with `evaluate.load(ivpt.metrics.evaluate_module_path("ivpt_accuracy"))`.
The computation is `ivpt.metrics.classification_accuracies`.
"""

import datasets
import evaluate
import numpy as np
import torch

from ivpt.metrics import classification_accuracies


_DESCRIPTION = """
Top-k accuracy of a classifier, micro (over images) and macro (mean of the per-class top-k recall
over the classes that occur in the references or among the top-k predictions), in percent, like
torchmetrics 1.2.1 MulticlassAccuracy as used by the IVPT release. Predictions are the class scores (logits).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): class scores, one row of length num_classes per image.
    references (`list` of `int`): labels in [0, num_classes).
    top_k (`list` of `int`, defaults to [1, 5]): the k values.
Returns:
    `dict` with keys "top{k}_micro" and "top{k}_macro" for every k, values in [0, 100].
Examples:
    >>> metric = evaluate.load(ivpt.metrics.evaluate_module_path("ivpt_accuracy"))
    >>> metric.compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[1, 1], top_k=[1])
    {'top1_micro': 50.0, 'top1_macro': 25.0}
"""

_CITATION = """
@inproceedings{ivpt,
  title={Exploring Interpretability for Visual Prompt Tuning with Cross-layer Concepts},
  booktitle={ICLR},
  year={2026}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class IvptAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, top_k=(1, 5)):
        logits = torch.as_tensor(np.asarray(predictions, dtype=np.float32))
        labels = torch.as_tensor(np.asarray(references, dtype=np.int64))
        return classification_accuracies(logits, labels, top_k=tuple(int(k) for k in top_k))
