"""Evaluation metrics of IVPT (docs/method.md#evaluation-protocols): pure, device-agnostic functions over tensors.

* docs/method.md#classification-accuracy classification: `top_k_correct`, `top_k_accuracy`, `classification_accuracies`
* docs/method.md#consistency / docs/method.md#stability consistency and stability: `part_points_on_canvas`, `prototype_regions`,
  `near_constant_maps`, `part_hits`, `consistency_score`, `stability_score`, `perturb_normalised_images`
* docs/method.md#nmi-and-ari NMI / ARI: `keypoint_part_assignments`, `nmi_ari`
* docs/method.md#keypoint-regression keypoint regression: `part_centroid_features`, `box_normalised_keypoints`,
  `keypoint_regression_error`
* docs/method.md#foreground-iou foreground IoU: `resize_mask_like_image`, `foreground_iou_counts`, `foreground_iou_from_counts`,
  `foreground_iou`

All functions taking `maps` expect the evaluated stage's assignment maps of shape
`(num_images, num_prototypes, height, width)` whose last channel is the background.
Thin `evaluate` wrappers live in `evaluate_modules/`; load them with
`evaluate.load(evaluate_module_path("ivpt_accuracy"))`.
"""

from __future__ import annotations

from pathlib import Path

from .classification import classification_accuracies, top_k_accuracy, top_k_correct
from .consistency import (
    consistency_score,
    near_constant_maps,
    part_hits,
    part_points_on_canvas,
    perturb_normalised_images,
    prototype_regions,
    stability_score,
)
from .foreground_iou import foreground_iou, foreground_iou_counts, foreground_iou_from_counts, resize_mask_like_image
from .keypoint_regression import box_normalised_keypoints, keypoint_regression_error, part_centroid_features
from .nmi_ari import keypoint_part_assignments, nmi_ari


EVALUATE_MODULES = ("ivpt_accuracy", "ivpt_nmi_ari")


def evaluate_module_path(name: str) -> str:
    """Local path of one of our `evaluate` metric modules, for `evaluate.load(path)`.

    Args:
        name (`str`): one of `EVALUATE_MODULES` (`"ivpt_accuracy"`, `"ivpt_nmi_ari"`).

    Returns:
        `str`: the module's directory.
    """
    if name not in EVALUATE_MODULES:
        raise ValueError(f"Expected `name` in {EVALUATE_MODULES}, got {name!r}")
    return str(Path(__file__).resolve().parent / "evaluate_modules" / name)


__all__ = [
    "EVALUATE_MODULES",
    "box_normalised_keypoints",
    "classification_accuracies",
    "consistency_score",
    "evaluate_module_path",
    "foreground_iou",
    "foreground_iou_counts",
    "foreground_iou_from_counts",
    "keypoint_part_assignments",
    "keypoint_regression_error",
    "near_constant_maps",
    "nmi_ari",
    "part_centroid_features",
    "part_hits",
    "part_points_on_canvas",
    "perturb_normalised_images",
    "prototype_regions",
    "resize_mask_like_image",
    "stability_score",
    "top_k_accuracy",
    "top_k_correct",
]
