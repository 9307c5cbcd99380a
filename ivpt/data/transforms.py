"""Image transforms of the IVPT recipe that also move keypoints, boxes and masks.

* `train_transform` — on-the-fly training augmentation (docs/method.md#training-augmentation);
* `eval_transform` — classification evaluation (resize shorter side, centre crop; docs/method.md#training-augmentation);
* `consistency_transform` — consistency / stability protocol (docs/method.md#consistency; the canvas points are
  `ivpt.metrics.part_points_on_canvas`);
* `parts_eval_preprocess` — part-annotated NMI / ARI / KPR items (docs/method.md#part-annotated-items), exact arithmetic.

The first three are torchvision v2 pipelines: they accept a PIL image alone, or a sample dict of
``tv_tensors`` built with `to_tv_sample` (``image``, ``keypoints`` (`KeyPoints`), ``boxes``
(`BoundingBoxes`), ``mask`` (`Mask`)), and transform all of it consistently. `apply_transform`
runs such a pipeline on a `datasets` example (as produced by `ivpt.data.load_cub`) and returns
tensors; `batch_transform` wraps it for `Dataset.with_transform`.

Keypoint rows are ``[part_id, x, y, visible]`` (CUB: 1-based part ids, pixel coordinates,
``x`` = column). Hidden keypoints carry ``x = y = 0`` (CUB convention) and are never moved; a
visible keypoint that a transform moves off the canvas becomes hidden (coordinates zeroed).
Keypoint coordinates follow torchvision's `KeyPoints` arithmetic (continuous coordinates except
the horizontal flip, which maps ``x → W − 1 − x``); the two conventions differ by at most one pixel.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "keypoint_rows",
    "to_tv_sample",
    "from_tv_sample",
    "update_keypoint_rows",
    "train_transform",
    "eval_transform",
    "consistency_transform",
    "apply_transform",
    "batch_transform",
    "parts_eval_preprocess",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def keypoint_rows(keypoints: Any) -> torch.Tensor:
    """Keypoints as a float (num_parts, 4) tensor of rows ``[part_id, x, y, visible]``.

    Accepts the `datasets` form (list of ``{"part_id", "x", "y", "visible"}`` dicts, or the
    dict-of-lists form of batched access), an array / tensor of shape (num_parts, 4).
    """
    if isinstance(keypoints, Mapping):
        keys = ("part_id", "x", "y", "visible")
        return torch.tensor(np.stack([np.asarray(keypoints[k], dtype=np.float64) for k in keys], axis=1)).float()
    if isinstance(keypoints, (list, tuple)) and keypoints and isinstance(keypoints[0], Mapping):
        return torch.tensor([[kp["part_id"], kp["x"], kp["y"], kp["visible"]] for kp in keypoints], dtype=torch.float32)
    rows = torch.as_tensor(np.asarray(keypoints, dtype=np.float32))
    if rows.ndim != 2 or rows.shape[1] != 4:
        raise ValueError(f"Expected keypoints of shape (num_parts, 4), got {tuple(rows.shape)}")
    return rows.clone()


def _image_size(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image or a (..., H, W) tensor."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


def to_tv_sample(
    image: Image.Image | torch.Tensor,
    keypoints: Any = None,
    bbox: Optional[Sequence[float]] = None,
    mask: Optional[Image.Image | np.ndarray | torch.Tensor] = None,
) -> tuple[dict[str, Any], Optional[torch.Tensor]]:
    """Packs one annotated image into a dict of torchvision `tv_tensors`.

    Args:
        image: RGB PIL image (kept as PIL so that v2 uses PIL's resamplers) or (3, H, W) tensor.
        keypoints: anything `keypoint_rows` accepts, or None.
        bbox: ``[x, y, w, h]`` box, or None.
        mask: "L" PIL image / (H, W) array of the segmentation, or None.

    Returns:
        ``(sample, rows)``: ``sample`` has keys ``image`` and, where given, ``keypoints``
        (`KeyPoints` (num_parts, 2)), ``boxes`` (`BoundingBoxes` (1, 4), XYWH) and ``mask``
        (`Mask` (H, W)); ``rows`` is the (num_parts, 4) keypoint table (part ids and visibility,
        needed by `from_tv_sample`), or None.
    """
    canvas = _image_size(image)
    sample: dict[str, Any] = {"image": image}
    rows = None
    if keypoints is not None:
        rows = keypoint_rows(keypoints)
        sample["keypoints"] = tv_tensors.KeyPoints(rows[:, 1:3], canvas_size=canvas)
    if bbox is not None:
        box = torch.as_tensor(np.asarray(bbox, dtype=np.float32)).reshape(1, 4)
        sample["boxes"] = tv_tensors.BoundingBoxes(box, format="XYWH", canvas_size=canvas)
    if mask is not None:
        sample["mask"] = tv_tensors.Mask(torch.as_tensor(np.array(mask, dtype=np.uint8)))
    return sample, rows


def update_keypoint_rows(rows: torch.Tensor, moved_xy: torch.Tensor, canvas_size: tuple[int, int]) -> torch.Tensor:
    """New (num_parts, 4) rows after a transform moved the points to `moved_xy` (num_parts, 2).

    Hidden keypoints stay ``[part_id, 0, 0, 0]``; visible ones that left the canvas
    ``[0, W) × [0, H)`` become hidden.
    """
    height, width = canvas_size
    out = rows.clone()
    out[:, 1:3] = moved_xy.to(out.dtype)
    x, y = out[:, 1], out[:, 2]
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    visible = (rows[:, 3] > 0) & inside
    out[:, 3] = visible.to(out.dtype)
    out[~visible, 1:3] = 0.0
    return out


def from_tv_sample(sample: Mapping[str, Any], rows: Optional[torch.Tensor]) -> dict[str, Any]:
    """Unpacks a transformed `to_tv_sample` dict into plain values.

    Returns a dict with ``image`` (as produced by the pipeline: tensor or PIL) and, where present,
    ``keypoints`` (num_parts, 4) float rows, ``bbox`` (4,) float ``[x, y, w, h]`` and ``mask``
    (H, W) uint8 tensor.
    """
    out: dict[str, Any] = {"image": sample["image"]}
    canvas = _image_size(sample["image"])
    if "keypoints" in sample and rows is not None:
        out["keypoints"] = update_keypoint_rows(rows, sample["keypoints"].as_subclass(torch.Tensor), canvas)
    if "boxes" in sample:
        out["bbox"] = sample["boxes"].as_subclass(torch.Tensor).reshape(4).float()
    if "mask" in sample:
        out["mask"] = sample["mask"].as_subclass(torch.Tensor)
    return out


def _to_unit_float() -> list[v2.Transform]:
    """uint8 image -> float32 in [0, 1] by dividing by 255, as `ToTensor` in the release.

    `v2.ToDtype(scale=True)` multiplies by 1/255 instead, which differs by one ulp for about half of the 256 levels;
    a zero-mean `Normalize` with std 255 is exactly the division. Masks and other non-image inputs pass untouched.
    """
    return [v2.ToImage(), v2.ToDtype(torch.float32), v2.Normalize(mean=[0.0] * 3, std=[255.0] * 3)]


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [*_to_unit_float(), v2.Normalize(mean=list(mean), std=list(std))]


def train_transform(
    image_size: int = 518, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> v2.Compose:
    """docs/method.md#training-augmentation training augmentation (``cub_original``), as a torchvision v2 pipeline.

    1. resize shorter side to `image_size` (bilinear, antialias);  2. horizontal flip p = 0.5;
    3. random affine: rotation U(−90°, 90°), translation up to 20 % (integer pixels),
       scale U(0.8, 1.2), no shear, nearest interpolation, black fill;
    4. random crop `image_size` × `image_size`;  5. to float in [0, 1] and ImageNet normalisation.
    The reference's RandomVerticalFlip(p=0) and ColorJitter() with zero strengths are no-ops and
    are left out (docs/method.md#training-augmentation, docs/method.md#quirks [no-op colour jitter]).
    """
    return v2.Compose(
        [
            v2.Resize(image_size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomAffine(
                degrees=90, translate=(0.2, 0.2), scale=(0.8, 1.2), interpolation=v2.InterpolationMode.NEAREST, fill=0
            ),
            v2.RandomCrop(image_size),
            *_to_normalised_tensor(mean, std),
        ]
    )


def eval_transform(
    image_size: int = 518, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> v2.Compose:
    """docs/method.md#training-augmentation / docs/method.md#classification-accuracy evaluation: resize shorter side → centre crop → [0, 1] → ImageNet normalisation."""
    return v2.Compose(
        [
            v2.Resize(image_size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(image_size),
            *_to_normalised_tensor(mean, std),
        ]
    )



eval_transform.__test__ = False  # type: ignore[attr-defined]  # not a pytest test under any name

def consistency_transform(
    image_size: int = 518, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> v2.Compose:
    """docs/method.md#consistency step 1 (cropped test images): resize to exactly `image_size`² (aspect ratio not kept,
    bilinear) → [0, 1] → ImageNet normalisation."""
    return v2.Compose(
        [
            v2.Resize((image_size, image_size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            *_to_normalised_tensor(mean, std),
        ]
    )


def _as_rgb(image: Any) -> Any:
    if isinstance(image, Image.Image) and image.mode != "RGB":
        return image.convert("RGB")
    return image


def apply_transform(transform: Callable, example: Mapping[str, Any]) -> dict[str, Any]:
    """Runs a v2 pipeline on one `datasets` example, moving its annotations with the image.

    Args:
        transform: e.g. `train_transform()`.
        example: a row of `load_cub(...)` (``image`` PIL, optional ``keypoints``, ``bbox``,
            ``mask``, ``label``, ``image_id``).

    Returns:
        ``pixel_values`` (3, H, W) float tensor, ``labels`` (int) and ``image_id`` when present,
        plus ``keypoints`` (num_parts, 4), ``bbox`` (4,) and ``mask`` (H, W) uint8 when present in
        the example (``mask`` is None when the example's mask is None).
    """
    sample, rows = to_tv_sample(
        _as_rgb(example["image"]), example.get("keypoints"), example.get("bbox"), example.get("mask")
    )
    out = from_tv_sample(transform(sample), rows)
    result: dict[str, Any] = {"pixel_values": out.pop("image")}
    if "label" in example:
        result["labels"] = int(example["label"])
    if "image_id" in example:
        result["image_id"] = int(example["image_id"])
    result.update(out)
    if "mask" in example and example["mask"] is None:
        result["mask"] = None
    return result


def batch_transform(transform: Callable) -> Callable[[dict[str, list]], dict[str, list]]:
    """Wraps `apply_transform` for `Dataset.with_transform` / `set_transform` (batched dict of lists).

    Example:
        >>> train = load_cub(path)["train"].with_transform(batch_transform(train_transform(224)))
    """

    def _apply(batch: dict[str, list]) -> dict[str, list]:
        keys = list(batch)
        size = len(batch[keys[0]])
        results = [apply_transform(transform, {k: batch[k][i] for k in keys}) for i in range(size)]
        return {k: [r[k] for r in results] for k in results[0]} if results else {}

    return _apply


def parts_eval_preprocess(
    image: Image.Image, keypoints: Any, bbox: Sequence[float], image_size: int = 518
) -> dict[str, torch.Tensor]:
    """docs/method.md#part-annotated-items item of the part-annotated dataset (NMI / ARI / KPR), with the reference arithmetic.

    1. factor = image_size / min(H, W); keypoints with visible ≠ 0 and the whole box are scaled
       by it (the exact factor, not the realised pixel ratio — hand-written for that reason);
    2. resize shorter side to `image_size` (bilinear; longer side truncated), to [0, 1],
       **no** mean/std normalisation (docs/method.md#quirks [unnormalised parts input]);
    3. centre crop `image_size`²: top = round((H′ − S)/2), left = round((W′ − S)/2) (torchvision's
       rounding); visible keypoints shifted; any keypoint outside [0, S] on either axis becomes
       invisible; coordinates clamped to [0, S]; box x, y shifted and clamped (w, h unchanged).
    The inputs are copied, never modified (docs/method.md#quirks [in-place annotations]).

    Returns:
        ``pixel_values`` (3, S, S) in [0, 1], ``keypoints`` (num_parts, 4) ``[part_id, x, y,
        visible]``, ``bbox`` (4,) ``[x, y, w, h]``.
    """
    image = _as_rgb(image)
    rows = keypoint_rows(keypoints).double()
    box = torch.as_tensor(np.asarray(bbox, dtype=np.float64)).clone()
    height, width = image.height, image.width
    factor = image_size / min(height, width)
    visible = rows[:, 3] != 0
    rows[visible, 1:3] *= factor
    box *= factor

    resized = F.resize(image, image_size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    new_height, new_width = resized.height, resized.width
    top = int(round((new_height - image_size) / 2.0))
    left = int(round((new_width - image_size) / 2.0))
    pixels = F.to_image(resized).to(torch.float32) / 255  # divided, as the release's ToTensor
    pixels = F.center_crop(pixels, [image_size, image_size])  # same offsets as `top` / `left`

    rows[visible, 1] -= left
    rows[visible, 2] -= top
    outside = (rows[:, 1] < 0) | (rows[:, 1] > image_size) | (rows[:, 2] < 0) | (rows[:, 2] > image_size)
    rows[outside, 3] = 0
    rows[:, 1:3] = rows[:, 1:3].clamp(0, image_size)
    box[0] = (box[0] - left).clamp(0, image_size)
    box[1] = (box[1] - top).clamp(0, image_size)
    return {"pixel_values": pixels.as_subclass(torch.Tensor), "keypoints": rows.float(), "bbox": box.float()}
