"""Keypoint regression error, KPR (docs/method.md#keypoint-regression, PDiscoFormer protocol).

Per batch, `part_centroid_features` turns the maps into box-normalised part centroids and
`box_normalised_keypoints` normalises the ground-truth keypoints the same way; concatenate them
over the fit (train) and evaluation (test) sets and call `keypoint_regression_error` once.

Every image counts, in both sets: the release's loaders drop the last partial batch (`drop_last=True`; its fit set
is also shuffled first, so which training images are dropped is random), so its numbers rest on slightly fewer
images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.linear_model import LinearRegression
from sklearn.preprocessing import StandardScaler

from ._checks import box_xywh, check_same_leading, check_shape, keypoint_xyv, pair


def part_centroid_features(
    maps: torch.Tensor, boxes: torch.Tensor, image_size: int | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-normalised soft centroids and activity of the foreground parts (docs/method.md#keypoint-regression).

    For every foreground channel A_j (all channels but the last): `active_j = max A_j > 0.5`;
    centroid `row_j = Σ h·A_j / Σ A_j`, `col_j = Σ w·A_j / Σ A_j` with 0-based grid indices,
    converted to pixels by `× image_size / grid_size` (top-left convention: no half-cell offset);
    then `col' = (col − box_x) / box_width`, `row' = (row − box_y) / box_height`. Computed in
    float64. A channel with zero total mass gives NaN coordinates (it is inactive, and inactive
    parts are zeroed after standardisation).

    Args:
        maps (`torch.Tensor` of shape `(num_images, num_prototypes, height, width)`): assignment
            maps of the evaluated stage, background last.
        boxes (`torch.Tensor` of shape `(num_images, 4)`): `(x, y, width, height)` of the
            bounding box in input-image pixels (after the docs/method.md#part-annotated-items resize / center crop / clamp);
            `(num_images, 5)` rows `(image_index, x, y, width, height)` (docs/method.md#part-annotated-items) are accepted.
        image_size (`int` or `(height, width)`): input image size (518).

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`:
        - features of shape `(num_images, num_prototypes - 1, 2)`, float64, `(col', row')`;
        - active of shape `(num_images, num_prototypes - 1)`, bool.
    """
    check_shape(maps, "maps", ("num_images", "num_prototypes", "height", "width"))
    boxes = box_xywh(boxes)
    check_same_leading("maps", maps, "boxes", boxes)
    if maps.shape[1] < 2:
        raise ValueError(f"Expected `maps` with at least 2 channels (foreground + background), got {maps.shape[1]}")
    image_height, image_width = pair(image_size, "image_size")
    foreground = maps[:, :-1].to(torch.float64)
    grid_height, grid_width = foreground.shape[-2:]
    mass = foreground.sum(dim=(-2, -1))
    rows = torch.arange(grid_height, device=maps.device, dtype=torch.float64)
    columns = torch.arange(grid_width, device=maps.device, dtype=torch.float64)
    row = (foreground.sum(dim=-1) * rows).sum(dim=-1) / mass * (image_height / grid_height)
    column = (foreground.sum(dim=-2) * columns).sum(dim=-1) / mass * (image_width / grid_width)
    boxes = boxes.to(device=maps.device, dtype=torch.float64)
    features = torch.stack(
        [(column - boxes[:, 0, None]) / boxes[:, 2, None], (row - boxes[:, 1, None]) / boxes[:, 3, None]], dim=-1
    )
    active = foreground.amax(dim=(-2, -1)) > 0.5
    return features, active


def box_normalised_keypoints(keypoints: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Ground-truth keypoints normalised by the box like the centroids (docs/method.md#keypoint-regression).

    Args:
        keypoints (`torch.Tensor` of shape `(num_images, num_keypoints, 3)`): `(x, y, visible)` in
            input-image pixels (`(..., 4)` rows `(part_id, x, y, visible)` are accepted).
        boxes (`torch.Tensor` of shape `(num_images, 4)`): `(x, y, width, height)`, same pixels
            (`(num_images, 5)` rows `(image_index, x, y, width, height)` are accepted).

    Returns:
        `torch.Tensor` of shape `(num_images, num_keypoints, 3)`, float64:
        `((x − box_x) / box_width, (y − box_y) / box_height, visible)`.
    """
    keypoints, boxes = keypoint_xyv(keypoints), box_xywh(boxes)
    check_same_leading("keypoints", keypoints, "boxes", boxes)
    keypoints = keypoints.to(torch.float64)
    boxes = boxes.to(device=keypoints.device, dtype=torch.float64)
    x = (keypoints[..., 0] - boxes[:, 0, None]) / boxes[:, 2, None]
    y = (keypoints[..., 1] - boxes[:, 1, None]) / boxes[:, 3, None]
    return torch.stack([x, y, keypoints[..., 2]], dim=-1)


def keypoint_regression_error(
    fit_features: torch.Tensor,
    fit_active: torch.Tensor,
    fit_keypoints: torch.Tensor,
    eval_features: torch.Tensor,
    eval_active: torch.Tensor,
    eval_keypoints: torch.Tensor,
) -> float:
    """KPR in percent of the box size (docs/method.md#keypoint-regression steps 1–6; lower is better).

    For every keypoint l independently, on the fit and eval images where l is visible
    (`visible > 0.5`): fit a `StandardScaler` on the fit features and one on the fit targets
    `(x', y')`; standardise the features and set those of inactive parts (both coordinates) to 0;
    fit `LinearRegression(fit_intercept=False)` on the standardised targets; predict the eval
    images the same way and inverse-transform with the target scaler; `e_l` = mean Euclidean
    distance to the true `(x', y')`, `n_l` = number of eval images. KPR = 100 · Σ e_l n_l / Σ n_l.
    Keypoints with no visible eval image are skipped. Float64 throughout (NumPy / scikit-learn).

    Args:
        fit_features (`torch.Tensor` of shape `(num_fit_images, num_parts, 2)`): from
            `part_centroid_features` on the fit (train) set.
        fit_active (`torch.Tensor` of shape `(num_fit_images, num_parts)`): bool part activity.
        fit_keypoints (`torch.Tensor` of shape `(num_fit_images, num_keypoints, 3)`): from
            `box_normalised_keypoints`, `(x', y', visible)`.
        eval_features (`torch.Tensor` of shape `(num_eval_images, num_parts, 2)`): test set.
        eval_active (`torch.Tensor` of shape `(num_eval_images, num_parts)`): test set.
        eval_keypoints (`torch.Tensor` of shape `(num_eval_images, num_keypoints, 3)`): test set.

    Returns:
        `float` (≥ 0).
    """
    check_shape(fit_features, "fit_features", ("num_fit_images", "num_parts", 2))
    num_parts = fit_features.shape[1]
    check_shape(fit_active, "fit_active", (fit_features.shape[0], num_parts))
    check_shape(fit_keypoints, "fit_keypoints", (fit_features.shape[0], "num_keypoints", 3))
    num_keypoints = fit_keypoints.shape[1]
    check_shape(eval_features, "eval_features", ("num_eval_images", num_parts, 2))
    check_shape(eval_active, "eval_active", (eval_features.shape[0], num_parts))
    check_shape(eval_keypoints, "eval_keypoints", (eval_features.shape[0], num_keypoints, 3))

    fit_x, fit_inactive = _design(fit_features, fit_active)
    eval_x, eval_inactive = _design(eval_features, eval_active)
    fit_y = fit_keypoints.detach().cpu().to(torch.float64).numpy()
    eval_y = eval_keypoints.detach().cpu().to(torch.float64).numpy()

    total_error, total_count = 0.0, 0
    for keypoint in range(num_keypoints):
        eval_rows = eval_y[:, keypoint, 2] > 0.5
        if not eval_rows.any():
            continue
        fit_rows = fit_y[:, keypoint, 2] > 0.5
        if not fit_rows.any():
            raise ValueError(f"Keypoint {keypoint} is visible in `eval_keypoints` but in no image of `fit_keypoints`")
        feature_scaler = StandardScaler().fit(fit_x[fit_rows])
        target_scaler = StandardScaler().fit(fit_y[fit_rows, keypoint, :2])
        design = np.where(fit_inactive[fit_rows], 0.0, feature_scaler.transform(fit_x[fit_rows]))
        regression = LinearRegression(fit_intercept=False).fit(
            design, target_scaler.transform(fit_y[fit_rows, keypoint, :2])
        )
        eval_design = np.where(eval_inactive[eval_rows], 0.0, feature_scaler.transform(eval_x[eval_rows]))
        predicted = target_scaler.inverse_transform(regression.predict(eval_design))
        distance = np.linalg.norm(predicted - eval_y[eval_rows, keypoint, :2], axis=1)
        total_error += float(distance.sum())
        total_count += int(eval_rows.sum())
    if total_count == 0:
        raise ValueError("Expected at least one visible keypoint in `eval_keypoints`, got none")
    return 100.0 * total_error / total_count


def _design(features: torch.Tensor, active: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Flatten (N, J, 2) features to (N, 2J) float64 and the matching (N, 2J) inactive mask."""
    x = features.detach().cpu().to(torch.float64).reshape(features.shape[0], -1).numpy()
    inactive = (~active.detach().cpu().bool()).repeat_interleave(2, dim=1).numpy()
    return x, inactive
