"""Classification accuracy (docs/method.md#classification-accuracy).

The reference evaluates torchmetrics `MulticlassAccuracy(num_classes=200, top_k=k, average=...)`
for k in (1, 5) and average in ("micro", "macro"), ×100:

* micro: fraction of images whose label is among the k highest logits;
* macro: mean over classes of the per-class top-k recall (fraction of the images *of that class*
  whose label is among their k highest logits).

Which classes enter the macro mean: those with `tp + fp + fn > 0`, the rule of torchmetrics 1.2.1 (the release's
version) for every k. A class absent from `labels` whose index is among the k highest logits of some image (a false
positive) therefore counts, with recall 0; a class neither present nor predicted is left out. (Later torchmetrics
versions use `tp + fn > 0`, i.e. "present in the labels", for `top_k > 1`.) Whenever every class occurs in the
labels (the full CUB test set) the two rules agree and the macro accuracy is the mean per-class recall.

Ties: top-1 uses `argmax` (first maximal logit, as torchmetrics); top-k uses `torch.topk` (as
torchmetrics' `select_topk`), whose order among exactly tied logits is implementation-defined.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import check_labels, check_same_leading, check_shape


def top_k_correct(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Whether each image's label is among its `k` highest logits.

    Args:
        logits (`torch.Tensor` of shape `(num_images, num_classes)`): class scores.
        labels (`torch.Tensor` of shape `(num_images,)`): integer labels in `[0, num_classes)`.
        k (`int`): number of top predictions that count.

    Returns:
        `torch.Tensor` of shape `(num_images,)`, dtype bool, on the device of `logits`.
    """
    check_shape(logits, "logits", ("num_images", "num_classes"))
    check_labels(labels, logits.shape[1])
    check_same_leading("logits", logits, "labels", labels)
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"Expected `k` in [1, {logits.shape[1]}] (num_classes), got {k}")
    labels = labels.to(logits.device)
    if k == 1:
        return logits.argmax(dim=1) == labels
    top = logits.topk(k, dim=1).indices
    return (top == labels[:, None]).any(dim=1)


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1, average: str = "micro") -> float:
    """Top-k accuracy in percent (docs/method.md#classification-accuracy, torchmetrics `MulticlassAccuracy` semantics).

    Args:
        logits (`torch.Tensor` of shape `(num_images, num_classes)`): class scores.
        labels (`torch.Tensor` of shape `(num_images,)`): integer labels in `[0, num_classes)`.
        k (`int`, defaults to 1): number of top predictions that count.
        average (`str`, defaults to `"micro"`): `"micro"` (over images) or `"macro"` (mean of the per-class top-k
            recall over the classes that occur in `labels` or among the top-k predictions; see the module docstring).

    Returns:
        `float` in [0, 100].
    """
    if average not in ("micro", "macro"):
        raise ValueError(f"Expected `average` in ('micro', 'macro'), got {average!r}")
    correct = top_k_correct(logits, labels, k)
    if correct.numel() == 0:
        raise ValueError("Expected at least one image in `logits`, got 0")
    if average == "micro":
        return 100.0 * correct.double().mean().item()
    num_classes = logits.shape[1]
    labels = labels.to(logits.device)
    totals = torch.bincount(labels, minlength=num_classes)  # tp + fn per class
    hits = torch.bincount(labels[correct], minlength=num_classes)  # tp
    predicted = logits.argmax(1, keepdim=True) if k == 1 else logits.topk(k, dim=1).indices
    predicted_counts = torch.zeros(num_classes, dtype=torch.long, device=logits.device)
    predicted_counts.scatter_add_(0, predicted.flatten(), torch.ones_like(predicted.flatten()))  # tp + fp
    counted = (totals + predicted_counts) > 0  # tp + fp + fn > 0
    recall = hits.double() / totals.clamp(min=1).double()  # 0 for a predicted but absent class
    return 100.0 * recall[counted].mean().item()


def classification_accuracies(
    logits: torch.Tensor, labels: torch.Tensor, top_k: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """The docs/method.md#classification-accuracy accuracies: micro and macro top-k for every k in `top_k`, in percent.

    Args:
        logits (`torch.Tensor` of shape `(num_images, num_classes)`): class scores.
        labels (`torch.Tensor` of shape `(num_images,)`): integer labels in `[0, num_classes)`.
        top_k (`Sequence[int]`, defaults to `(1, 5)`): the k values.

    Returns:
        `dict[str, float]` with keys `"top{k}_micro"` and `"top{k}_macro"`, e.g. `"top1_micro"`,
        `"top1_macro"`, `"top5_micro"`, `"top5_macro"`.
    """
    results = {}
    for k in top_k:
        for average in ("micro", "macro"):
            results[f"top{k}_{average}"] = top_k_accuracy(logits, labels, k=k, average=average)
    return results
