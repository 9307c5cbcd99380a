"""NMI and ARI between predicted parts and ground-truth keypoints (docs/method.md#nmi-and-ari, PDiscoFormer protocol).

Per batch, `keypoint_part_assignments` gives one (predicted part, keypoint index) pair per visible
keypoint; concatenate them over the test set and call `nmi_ari` once.

Every image counts: the release's loader drops the last partial batch (`drop_last=True`; with its batch of 8, two
CUB test images), so its numbers cover slightly fewer keypoints. Batch sizes dividing the test set (1 or 2 for CUB's
5,794 images) make the two identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score
from sklearn.metrics import normalized_mutual_info_score

from ._checks import check_same_leading, check_shape, keypoint_xyv, pair


def keypoint_part_assignments(
    maps: torch.Tensor, keypoints: torch.Tensor, image_size: int | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted part label and ground-truth keypoint index of every visible keypoint (docs/method.md#nmi-and-ari).

    The maps are upsampled to the image size (bilinear, `align_corners=False`) and all channels are
    sampled at every keypoint with nearest-neighbour `grid_sample` (normalised coordinates
    `x / width · 2 − 1`, `y / height · 2 − 1`, `align_corners=False`, zero padding); the predicted
    label is the argmax over *all* channels (background included; first channel on ties, so a
    keypoint that samples outside the image, e.g. x = 518 rounding to column 518, gets label 0 as in
    the reference). The ground-truth label is the keypoint's index along `num_keypoints`. One
    `grid_sample` call serves the whole batch; the full upsampling is kept (rather than sampling the
    bilinear interpolant at the points) so that values are bitwise those of the reference.

    Args:
        maps (`torch.Tensor` of shape `(num_images, num_prototypes, height, width)`): assignment
            maps of the evaluated stage (background last).
        keypoints (`torch.Tensor` of shape `(num_images, num_keypoints, 3)`): `(x, y, visible)` in
            pixels of the (center-cropped) input image; a keypoint is used if `visible > 0.5`.
            `(num_images, num_keypoints, 4)` rows `(part_id, x, y, visible)` (docs/method.md#part-annotated-items) are accepted.
        image_size (`int` or `(height, width)`): input image size (518).

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`: `(predicted, ground_truth)`, both int64 of shape
        `(num_visible_keypoints,)`, in image-major then keypoint order, on the device of `maps`.
    """
    check_shape(maps, "maps", ("num_images", "num_prototypes", "height", "width"))
    keypoints = keypoint_xyv(keypoints)
    check_same_leading("maps", maps, "keypoints", keypoints)
    height, width = pair(image_size, "image_size")
    if not maps.dtype.is_floating_point:
        raise ValueError(f"Expected `maps` to be a floating tensor, got dtype {maps.dtype}")
    keypoints = keypoints.to(maps.device)
    upsampled = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
    coordinates = keypoints[..., :2].to(maps.dtype)
    grid = torch.stack([coordinates[..., 0] / width * 2 - 1, coordinates[..., 1] / height * 2 - 1], dim=-1)
    sampled = F.grid_sample(upsampled, grid[:, None], mode="nearest", align_corners=False)  # (N, P, 1, K)
    predicted = sampled[:, :, 0].argmax(dim=1)  # (N, K)
    visible = keypoints[..., 2] > 0.5
    ground_truth = torch.arange(keypoints.shape[1], device=maps.device).expand_as(predicted)
    return predicted[visible], ground_truth[visible]


def nmi_ari(predicted: torch.Tensor | np.ndarray, ground_truth: torch.Tensor | np.ndarray) -> dict[str, float]:
    """NMI and ARI in percent (docs/method.md#nmi-and-ari).

    scikit-learn `normalized_mutual_info_score(ground_truth, predicted)` (arithmetic normalisation)
    and `adjusted_rand_score(ground_truth, predicted)`, both × 100, over all visible keypoints of
    the test set.

    Args:
        predicted (`torch.Tensor` or `np.ndarray` of shape `(num_keypoints,)`): predicted labels.
        ground_truth (`torch.Tensor` or `np.ndarray` of shape `(num_keypoints,)`): keypoint indices.

    Returns:
        `dict[str, float]` with keys `"nmi"` and `"ari"`.
    """
    predicted = _to_numpy_labels(predicted, "predicted")
    ground_truth = _to_numpy_labels(ground_truth, "ground_truth")
    if predicted.shape != ground_truth.shape:
        raise ValueError(
            "Expected `predicted` and `ground_truth` of the same shape, "
            f"got {predicted.shape} and {ground_truth.shape}"
        )
    if predicted.size == 0:
        raise ValueError("Expected at least one keypoint in `predicted`, got 0")
    return {
        "nmi": 100.0 * float(normalized_mutual_info_score(ground_truth, predicted)),
        "ari": 100.0 * float(adjusted_rand_score(ground_truth, predicted)),
    }


def _to_numpy_labels(labels: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"Expected `{name}` of shape (num_keypoints,), got {labels.shape}")
    return labels
