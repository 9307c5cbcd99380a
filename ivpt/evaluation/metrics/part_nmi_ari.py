"""Pixel-wise NMI / ARI between the predicted part map and a ground-truth part label map (PartImageNet protocol).

Every pixel of the centre-cropped input counts: its predicted label is the argmax over all channels of the maps
upsampled bilinearly to the input size (background included), its ground-truth label the part label map's value
(0 = background). Per batch only the contingency table (ground truth x prediction counts) is kept, so the score over
the whole split needs no per-pixel storage and merges exactly across processes.
"""

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import comb

from . import EvaluationMetric

MAX_PART_LABELS = 256  # part label maps are 8-bit images


def contingency(maps: torch.Tensor, part_labels: torch.Tensor) -> torch.Tensor:
    """`(MAX_PART_LABELS, num_prototypes)` int64 counts of (ground-truth label, predicted part) over all pixels.

    Args:
        maps: `(batch, num_prototypes, height, width)` assignment maps.
        part_labels: `(batch, size, size)` integer label maps (input resolution).
    """
    upsampled = F.interpolate(maps, size=part_labels.shape[-2:], mode="bilinear", align_corners=False)
    predicted = upsampled.argmax(dim=1).flatten().cpu()
    truth = part_labels.flatten().long().cpu()
    index = truth * maps.shape[1] + predicted
    return torch.bincount(index, minlength=MAX_PART_LABELS * maps.shape[1]).view(MAX_PART_LABELS, maps.shape[1])


def nmi_ari_from_contingency(table: np.ndarray) -> dict[str, float]:
    """NMI (arithmetic normalisation, as scikit-learn's default) and ARI, in percent, from a contingency table."""
    table = np.asarray(table, dtype=np.float64)
    table = table[table.sum(1) > 0][:, table.sum(0) > 0]
    total = table.sum()
    rows, cols = table.sum(1), table.sum(0)
    nonzero = table > 0
    mutual = (table[nonzero] / total * np.log(table[nonzero] * total / np.outer(rows, cols)[nonzero])).sum()
    entropy = lambda p: -(p / total * np.log(p / total)).sum()  # noqa: E731
    h_true, h_pred = entropy(rows), entropy(cols)
    if h_true == 0 and h_pred == 0:
        nmi = 1.0
    else:
        nmi = mutual / max((h_true + h_pred) / 2, np.finfo(np.float64).eps)
    pairs, pairs_rows, pairs_cols = comb(table, 2).sum(), comb(rows, 2).sum(), comb(cols, 2).sum()
    expected = pairs_rows * pairs_cols / comb(total, 2)
    maximum = (pairs_rows + pairs_cols) / 2
    ari = 1.0 if maximum == expected else (pairs - expected) / (maximum - expected)
    return {"nmi": float(nmi * 100), "ari": float(ari * 100)}


def collect(outputs):
    return {"contingency": [contingency(outputs.maps, outputs["part_mask"].to(outputs.maps.device))]}


def reduce(records, fit_records, context):
    table = torch.stack(records["contingency"]).sum(0)
    scores = nmi_ari_from_contingency(table.numpy())
    return {"pixel_nmi": scores["nmi"], "pixel_ari": scores["ari"], "pixel_nmi_ari_num_pixels": int(table.sum())}


METRIC = EvaluationMetric(
    name="part_nmi_ari", columns=("image", "part_mask"), pass_name="parts", collect=collect, reduce=reduce,
    report_rows=(("pixel_nmi", "pixel NMI % (part masks)", "↑"), ("pixel_ari", "pixel ARI % (part masks)", "↑")),
    description="pixel-wise NMI / ARI against part label maps",
)
