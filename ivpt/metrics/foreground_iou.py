"""Foreground / background IoU (docs/method.md#foreground-iou, with the docs/method.md#quirks [foreground IoU background index] fix).

Streaming use::

    counts = torch.zeros(4, dtype=torch.long)
    for maps, masks in loader:
        counts += foreground_iou_counts(maps, masks).cpu()
    scores = foreground_iou_from_counts(counts)

Intersections and unions are summed over all images before dividing, like a torchmetrics
`BinaryJaccardIndex` updated batch after batch (the reference), not a mean of per-image IoUs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ._checks import check_same_leading, check_shape


def resize_mask_like_image(mask: Image.Image, image_size: int) -> torch.Tensor:
    """A segmentation mask brought onto the evaluated image: shorter side to `image_size`, centre crop.

    The PIL mask is resized exactly like the PIL image (same call, same output size) but with PIL's nearest
    resampling, then centre-cropped with the image's offsets. Resizing the mask as a tensor instead (torch's legacy
    "nearest", which samples at the top-left of each output pixel rather than its centre) moves a few percent of
    the pixels of a blocky mask across the block edges.

    Args:
        mask (`PIL.Image.Image`): grey-level mask of the original image (any mode; converted to "L").
        image_size (`int`): side of the square evaluated image.

    Returns:
        `torch.Tensor` of shape `(image_size, image_size)`, uint8.
    """
    if not isinstance(mask, Image.Image):
        raise TypeError(f"Expected `mask` to be a PIL image, got {type(mask).__name__}")
    resized = TF.resize(mask.convert("L"), image_size, interpolation=InterpolationMode.NEAREST)
    return TF.center_crop(TF.pil_to_tensor(resized), [image_size, image_size])[0]


def foreground_iou_counts(
    maps: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5, max_value: float | None = None
) -> torch.Tensor:
    """Intersection and union pixel counts of one batch (docs/method.md#foreground-iou).

    The maps are upsampled to the mask size (bilinear, `align_corners=True`, as the reference);
    a pixel is predicted foreground when its argmax channel is not the *last* channel (the
    evaluated map's own background, the docs/method.md#quirks [foreground IoU background index] fix; the reference used the final stage's index 4).
    The ground truth is `mask >= threshold · max_value`: the CUB segmentations are soft grey-level
    PNGs and the reference defines no threshold, so by default a pixel is foreground when its grey
    level is at least 50 % of the maximum grey level (≥ 127.5, i.e. ≥ 128 for uint8 masks).

    Args:
        maps (`torch.Tensor` of shape `(num_images, num_prototypes, height, width)`): assignment
            maps of the evaluated stage, background last.
        masks (`torch.Tensor` of shape `(num_images, mask_height, mask_width)`): grey-level
            segmentation masks (a `(num_images, 1, mask_height, mask_width)` tensor is accepted).
        threshold (`float`, defaults to 0.5): binarisation threshold as a fraction of `max_value`.
        max_value (`float`, *optional*): maximum grey level; defaults to the dtype's maximum for
            integer masks (255 for uint8) and 1.0 for floating or bool masks.

    Returns:
        `torch.Tensor` of shape `(4,)`, int64, on the device of `maps`:
        `(foreground_intersection, foreground_union, background_intersection, background_union)`.
    """
    check_shape(maps, "maps", ("num_images", "num_prototypes", "height", "width"))
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    check_shape(masks, "masks", ("num_images", "mask_height", "mask_width"))
    check_same_leading("maps", maps, "masks", masks)
    if max_value is None:
        integer = not masks.dtype.is_floating_point and masks.dtype != torch.bool
        max_value = float(torch.iinfo(masks.dtype).max) if integer else 1.0
    masks = masks.to(maps.device)
    target = masks.to(torch.float64) >= threshold * max_value
    upsampled = F.interpolate(maps, size=masks.shape[-2:], mode="bilinear", align_corners=True)
    predicted = upsampled.argmax(dim=1) != maps.shape[1] - 1
    return torch.stack(
        [
            (predicted & target).sum(),
            (predicted | target).sum(),
            (~predicted & ~target).sum(),
            (~predicted | ~target).sum(),
        ]
    )


def foreground_iou_from_counts(counts: torch.Tensor) -> dict[str, float]:
    """Finalise summed `foreground_iou_counts` into IoUs in percent.

    An empty union gives 0 (torchmetrics' zero-division convention).

    Args:
        counts (`torch.Tensor` of shape `(4,)`): summed counts.

    Returns:
        `dict[str, float]` with keys `"foreground_iou"` and `"background_iou"`.
    """
    check_shape(counts, "counts", (4,))
    values = [int(v) for v in counts.tolist()]

    def ratio(intersection: int, union: int) -> float:
        return 100.0 * intersection / union if union > 0 else 0.0

    return {"foreground_iou": ratio(values[0], values[1]), "background_iou": ratio(values[2], values[3])}


def foreground_iou(
    maps: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5, max_value: float | None = None
) -> dict[str, float]:
    """Foreground and background IoU in percent of one set of images (docs/method.md#foreground-iou).

    Equal to `foreground_iou_from_counts(foreground_iou_counts(...))`; see those functions.
    """
    return foreground_iou_from_counts(foreground_iou_counts(maps, masks, threshold, max_value))
