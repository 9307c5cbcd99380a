"""Consistency and stability scores (docs/method.md#consistency, docs/method.md#stability; Huang et al., ICCV 2023, as adapted by IVPT).

Pipeline (one call per batch for the first three steps, then one score over the test set)::

    points, visible = part_points_on_canvas(keypoints, boxes)        # docs/method.md#consistency step 2
    regions = prototype_regions(maps)                                 # docs/method.md#consistency step 3
    hits = part_hits(regions, points, visible)                        # docs/method.md#consistency step 3
    consistency = consistency_score(hits, visible, labels, num_classes)   # docs/method.md#consistency step 4
    stability = stability_score(hits, hits_noisy, labels, num_classes)   # docs/method.md#stability

`maps` are the evaluated stage's assignment maps, background last (at the defaults output #1:
11 channels, 10 foreground prototypes); the background channel is never scored.

Classes without test images: both scores divide by `num_classes × num_foreground_prototypes`
always (the reference divides by 200 × 10). A (class, prototype) pair of an empty class has all
part frequencies 0, so it counts as *inconsistent*, and its stability counts as 0. When scoring a
subset of the classes, remap the labels to `0..num_present_classes-1` and pass that count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import box_xywh, check_labels, check_same_leading, check_shape, keypoint_xyv


def part_points_on_canvas(
    keypoints: torch.Tensor, boxes: torch.Tensor, canvas: int = 224
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth part points on the fixed consistency canvas (docs/method.md#consistency step 2, docs/method.md#box-cropping).

    The box is made integer exactly as `utils/crop.py` does (x1 = ⌊x⌋, y1 = ⌊y⌋,
    x2 = x1 + ⌊w⌋, y2 = y1 + ⌊h⌋), the keypoint coordinates are truncated to int, and the point is
    `(int(canvas · (x − x1) / (x2 − x1)), int(canvas · (y − y1) / (y2 − y1)))` with Python's `int`
    (truncation toward zero), computed in float64 like the reference's Python floats. Points are
    not clipped to the canvas (a keypoint outside the box falls outside it and is hit by no
    region).

    Args:
        keypoints (`torch.Tensor` of shape `(num_images, num_parts, 3)`): CUB `part_locs.txt` rows
            `(x, y, visible)` in original-image pixels, ordered by part id (index = part_id − 1);
            `(num_images, num_parts, 4)` rows `(part_id, x, y, visible)` are accepted too. The
            truncations act on the stored numbers: float32 is exact enough for CUB's one-decimal
            annotations, float64 is safest.
        boxes (`torch.Tensor` of shape `(num_images, 4)`): CUB `bounding_boxes.txt` rows
            `(x, y, width, height)` in original-image pixels (`(num_images, 5)` rows
            `(image_index, x, y, width, height)` are accepted too).
        canvas (`int`, defaults to 224): canvas side length (hard-coded 224 in the reference).

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`:
        - points of shape `(num_images, num_parts, 2)`, int64, `(column, row)` on the canvas; 0 for
          invisible parts;
        - visible of shape `(num_images, num_parts)`, bool, `visible == 1`.
    """
    keypoints, boxes = keypoint_xyv(keypoints), box_xywh(boxes)
    check_same_leading("keypoints", keypoints, "boxes", boxes)
    keypoints = keypoints.to(torch.float64)
    boxes = boxes.to(device=keypoints.device, dtype=torch.float64)
    x1, y1 = boxes[:, 0].floor(), boxes[:, 1].floor()
    box_width, box_height = boxes[:, 2].floor(), boxes[:, 3].floor()
    if bool((box_width < 1).any() | (box_height < 1).any()):
        raise ValueError("Expected `boxes` with integer width and height >= 1 (columns 2 and 3), got a smaller one")
    visible = keypoints[..., 2] == 1
    x, y = keypoints[..., 0].trunc(), keypoints[..., 1].trunc()
    relative_x = (x - x1[:, None]) / box_width[:, None]
    relative_y = (y - y1[:, None]) / box_height[:, None]
    points = torch.stack([(canvas * relative_x).trunc(), (canvas * relative_y).trunc()], dim=-1).long()
    points = points.masked_fill(~visible[..., None], 0)
    return points, visible


# A map whose range is below this fraction of its magnitude is "near-constant": float32 rounding of a bicubic kernel
# (~1e-6 relative) could move its arg-max anywhere, so its region depends on how the upsampling is computed. That
# happens for a prototype absent from the image (every value is the eps floor of the map). Reported, not dropped.
NEAR_CONSTANT_RELATIVE_RANGE = 1e-5
# Canvas values closer to the maximum than this fraction of the map's range are ties (first in row-major order wins),
# so float64 rounding of the kernel (~1e-15 relative) never decides between exactly tied canvas pixels.
PEAK_TIE_RELATIVE_TOLERANCE = 1e-9


def near_constant_maps(maps: torch.Tensor) -> torch.Tensor:
    """Which foreground maps are near-constant (their peak is a tie, not a location).

    Args:
        maps (`torch.Tensor` of shape `(num_images, num_prototypes, height, width)`): assignment maps of the
            evaluated stage, background last; the background channel is dropped.

    Returns:
        `torch.Tensor` of shape `(num_images, num_prototypes - 1)`, bool: `max - min <= 1e-5 · max |value|`.
    """
    check_shape(maps, "maps", ("num_images", "num_prototypes", "height", "width"))
    foreground = maps[:, :-1].flatten(2).to(torch.float64)
    value_range = foreground.amax(-1) - foreground.amin(-1)
    return value_range <= NEAR_CONSTANT_RELATIVE_RANGE * foreground.abs().amax(-1)


def prototype_regions(maps: torch.Tensor, canvas: int = 224, half_size: int = 36) -> torch.Tensor:
    """Square regions around each foreground prototype's peak on the canvas (see `docs/method.md`, consistency).

    Each map is upsampled to `canvas × canvas` with bicubic interpolation (`F.interpolate(mode="bicubic",
    align_corners=False)`: the Keys kernel with a = −0.75, half-pixel centres and replicated borders, the kernel of
    OpenCV `INTER_CUBIC` used by the release) **in float64, after subtracting the map's minimum**. The peak `(r, c)`
    is the first maximum in row-major order, where canvas values within `1e-9 × (max − min)` of the maximum count as
    tied. So the region is decided by the map's values, never by kernel rounding:

    * a map with structure only at the float32 rounding level (a prototype absent from the image, see
      `near_constant_maps`) keeps its true peak; float32 upsampling would place it by rounding noise;
    * an exactly constant map is a tie everywhere, so its peak is the canvas origin (exact arithmetic);
    * exactly tied maxima resolve to the first in row-major order.

    The region is rows `[max(0, r − h), min(canvas, r + h)]` and columns `[max(0, c − h), min(canvas, c + h)]`,
    bounds inclusive (note `canvas`, not `canvas − 1`, as the upper clip, as in the release).

    Args:
        maps (`torch.Tensor` of shape `(num_images, num_prototypes, height, width)`): assignment
            maps of the evaluated stage, background last; the background channel is dropped.
        canvas (`int`, defaults to 224): canvas side length.
        half_size (`int`, defaults to 36): region half size `h` (the release's evaluation script passes 36).

    Returns:
        `torch.Tensor` of shape `(num_images, num_prototypes - 1, 4)`, int64:
        `(row_low, row_high, column_low, column_high)`, all inclusive.
    """
    check_shape(maps, "maps", ("num_images", "num_prototypes", "height", "width"))
    if maps.shape[1] < 2:
        raise ValueError(f"Expected `maps` with at least 2 channels (foreground + background), got {maps.shape[1]}")
    foreground = maps[:, :-1].to(torch.float64)
    low = foreground.amin(dim=(-2, -1), keepdim=True)
    value_range = foreground.amax(dim=(-2, -1)) - low[..., 0, 0]  # (N, J)
    upsampled = F.interpolate(foreground - low, size=(canvas, canvas), mode="bicubic", align_corners=False)
    upsampled = upsampled.flatten(2)  # (N, J, canvas²)
    tolerance = PEAK_TIE_RELATIVE_TOLERANCE * value_range[..., None]
    is_peak = upsampled >= upsampled.amax(-1, keepdim=True) - tolerance
    peak = is_peak.to(torch.uint8).argmax(dim=-1)  # first tied maximum in row-major order
    row, column = peak // canvas, peak % canvas
    return torch.stack(
        [
            (row - half_size).clamp(min=0),
            (row + half_size).clamp(max=canvas),
            (column - half_size).clamp(min=0),
            (column + half_size).clamp(max=canvas),
        ],
        dim=-1,
    )


def part_hits(regions: torch.Tensor, points: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Which visible part points fall inside each prototype region (docs/method.md#consistency step 3).

    Args:
        regions (`torch.Tensor` of shape `(num_images, num_foreground_prototypes, 4)`): output of
            `prototype_regions`, `(row_low, row_high, column_low, column_high)` inclusive.
        points (`torch.Tensor` of shape `(num_images, num_parts, 2)`): `(column, row)` canvas
            points from `part_points_on_canvas`.
        visible (`torch.Tensor` of shape `(num_images, num_parts)`): part visibility (bool).

    Returns:
        `torch.Tensor` of shape `(num_images, num_foreground_prototypes, num_parts)`, bool.
    """
    check_shape(regions, "regions", ("num_images", "num_foreground_prototypes", 4))
    check_shape(points, "points", ("num_images", "num_parts", 2))
    check_shape(visible, "visible", ("num_images", points.shape[1]))
    check_same_leading("regions", regions, "points", points)
    check_same_leading("points", points, "visible", visible)
    points = points.to(regions.device)
    column, row = points[:, None, :, 0], points[:, None, :, 1]
    row_low, row_high, column_low, column_high = (regions[..., i, None] for i in range(4))
    inside = (row_low <= row) & (row <= row_high) & (column_low <= column) & (column <= column_high)
    return inside & visible.to(device=regions.device, dtype=torch.bool)[:, None, :]


def _class_sums(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class sums over images of `values` (num_images, ...) → (num_classes, ...), float64, exact."""
    one_hot = F.one_hot(labels.to(values.device).long(), num_classes).to(torch.float64)
    return (one_hot.T @ values.reshape(values.shape[0], -1).to(torch.float64)).reshape(num_classes, *values.shape[1:])


def consistency_score(
    hits: torch.Tensor,
    visible: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    threshold: float = 0.8,
) -> float:
    """Consistency score in percent (docs/method.md#consistency step 4).

    For every class c and foreground prototype j, over the test images of class c:
    `freq[part] = Σ_i hits[i, j, part] / max(1, Σ_i visible[i, part])`; the pair is consistent if
    `max_part freq ≥ threshold`. Score = 100 × (consistent pairs) / (num_classes × num_prototypes)
    (empty classes count as inconsistent, see the module docstring).

    Args:
        hits (`torch.Tensor` of shape `(num_images, num_foreground_prototypes, num_parts)`): bool,
            from `part_hits`, for all test images.
        visible (`torch.Tensor` of shape `(num_images, num_parts)`): part visibility (bool).
        labels (`torch.Tensor` of shape `(num_images,)`): class indices in `[0, num_classes)`.
        num_classes (`int`): number of classes (200 for CUB).
        threshold (`float`, defaults to 0.8): part frequency threshold.

    Returns:
        `float` in [0, 100].
    """
    check_shape(hits, "hits", ("num_images", "num_foreground_prototypes", "num_parts"))
    check_shape(visible, "visible", (hits.shape[0], hits.shape[2]))
    check_labels(labels, num_classes)
    check_same_leading("hits", hits, "labels", labels)
    hit_counts = _class_sums(hits, labels, num_classes)  # (C, J, K)
    visible_counts = _class_sums(visible.to(hits.device), labels, num_classes)  # (C, K)
    frequency = hit_counts / visible_counts.clamp(min=1)[:, None, :]
    consistent = frequency.amax(dim=-1) >= threshold
    return 100.0 * consistent.sum().item() / consistent.numel()


def stability_score(
    hits_clean: torch.Tensor, hits_noisy: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> float:
    """Stability score in percent (docs/method.md#stability).

    For every class c and foreground prototype j: the fraction of the class-c test images whose
    part-hit vector (over all parts) is identical in the clean and the perturbed run. Score =
    100 × mean over the num_classes × num_prototypes pairs (empty classes count 0, see the module
    docstring).

    Args:
        hits_clean (`torch.Tensor` of shape `(num_images, num_foreground_prototypes, num_parts)`):
            bool hits of the clean run.
        hits_noisy (`torch.Tensor` of shape `(num_images, num_foreground_prototypes, num_parts)`):
            bool hits of the run on `perturb_normalised_images` inputs, same image order.
        labels (`torch.Tensor` of shape `(num_images,)`): class indices in `[0, num_classes)`.
        num_classes (`int`): number of classes (200 for CUB).

    Returns:
        `float` in [0, 100].
    """
    check_shape(hits_clean, "hits_clean", ("num_images", "num_foreground_prototypes", "num_parts"))
    check_shape(hits_noisy, "hits_noisy", tuple(hits_clean.shape))
    check_labels(labels, num_classes)
    check_same_leading("hits_clean", hits_clean, "labels", labels)
    identical = (hits_clean == hits_noisy.to(hits_clean.device)).all(dim=-1)  # (N, J)
    identical_counts = _class_sums(identical, labels, num_classes)  # (C, J)
    image_counts = _class_sums(torch.ones(labels.shape[0], device=identical.device), labels, num_classes)  # (C,)
    fraction = identical_counts / image_counts.clamp(min=1)[:, None]
    return 100.0 * fraction.sum().item() / fraction.numel()


def perturb_normalised_images(
    pixel_values: torch.Tensor,
    generator: torch.Generator | None = None,
    std: float = 0.2,
    clip: float = 0.25,
) -> torch.Tensor:
    """Stability noise (docs/method.md#stability): add `clamp(N(0, std²), −clip, clip)` per element.

    Applied to the already ImageNet-normalised input. The reference draws fresh unseeded noise per
    batch; pass a seeded `generator` (and report its seed) for reproducible scores. The noise is
    drawn in float32 on the generator's device and then moved to `pixel_values`' device and dtype,
    so a CPU generator gives the same noise whatever device the images live on.

    Args:
        pixel_values (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            normalised images.
        generator (`torch.Generator`, *optional*): random source; the global RNG when `None`.
        std (`float`, defaults to 0.2): noise standard deviation.
        clip (`float`, defaults to 0.25): noise is clipped to `[−clip, clip]`.

    Returns:
        `torch.Tensor` with the shape, dtype and device of `pixel_values`.
    """
    check_shape(pixel_values, "pixel_values", ("batch_size", "num_channels", "height", "width"))
    device = generator.device if generator is not None else pixel_values.device
    noise = torch.randn(pixel_values.shape, generator=generator, device=device, dtype=torch.float32)
    noise = (noise * std).clamp(-clip, clip)
    return pixel_values + noise.to(device=pixel_values.device, dtype=pixel_values.dtype)
