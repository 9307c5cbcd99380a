"""`evaluate` wrapper of the IVPT NMI / ARI part metrics (docs/method.md#nmi-and-ari).

Load offline with `evaluate.load(ivpt.metrics.evaluate_module_path("ivpt_nmi_ari"))`.
Predictions and references are per visible keypoint, e.g. from
`ivpt.metrics.keypoint_part_assignments`; the computation is `ivpt.metrics.nmi_ari`.
"""

import datasets
import evaluate
import numpy as np

from ivpt.metrics import nmi_ari


_DESCRIPTION = """
Normalized mutual information (arithmetic normalisation) and adjusted Rand index, in percent,
between the predicted part of every visible ground-truth keypoint and the keypoint index
(scikit-learn, PDiscoFormer / IVPT protocol, spec section 6.4).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted part label of every visible keypoint.
    references (`list` of `int`): keypoint index (ground-truth part) of every visible keypoint.
Returns:
    `dict` with keys "nmi" and "ari", in percent.
Examples:
    >>> metric = evaluate.load(ivpt.metrics.evaluate_module_path("ivpt_nmi_ari"))
    >>> metric.compute(predictions=[0, 0, 1, 1], references=[3, 3, 5, 5])
    {'nmi': 100.0, 'ari': 100.0}
"""

_CITATION = """
@inproceedings{ivpt,
  title={Exploring Interpretability for Visual Prompt Tuning with Cross-layer Concepts},
  booktitle={ICLR},
  year={2026}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class IvptNmiAri(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references):
        return nmi_ari(np.asarray(predictions, dtype=np.int64), np.asarray(references, dtype=np.int64))
