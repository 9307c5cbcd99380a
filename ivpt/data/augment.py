"""Offline augmentation of the cropped CUB training images (docs/method.md#offline-augmentation), with torchvision v2.

The reference runs three Augmentor pipelines (rotate, skew, shear), each followed by a horizontal
flip with p = 0.5, and calls each pipeline 10 times over every cropped training image: 30 outputs
per source image. This module reproduces the parameter sampling and geometry of those Augmentor
operations with torchvision v2 functionals, so that keypoints (`KeyPoints`), boxes
(`BoundingBoxes`) and masks (`Mask`, nearest interpolation) move with the image. Images are
resampled bicubically, as Augmentor does. Each output has its own seeded random stream
(`augmentation_rng`), so results do not depend on processing order or sharding.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Iterator, Optional

from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .transforms import from_tv_sample, to_tv_sample

__all__ = [
    "AUGMENTATIONS",
    "NUM_PASSES",
    "augmentation_rng",
    "rotate_with_inner_crop",
    "skew",
    "shear",
    "augment_sample",
    "offline_augmentations",
]

AUGMENTATIONS: tuple[str, ...] = ("rotate", "skew", "shear")
NUM_PASSES = 10  # Augmentor `process()` calls per pipeline (docs/method.md#offline-augmentation)

# image (PIL RGB), optional mask (PIL "L"), keypoints (`KeyPoints`), boxes (`BoundingBoxes`)
Sample = dict[str, Any]


def _map(sample: Sample, function: Callable, **kwargs: Any) -> Sample:
    """Applies one v2 functional to every entry (each dispatches on its type).

    The mask is kept as a PIL "L" image and resampled with nearest interpolation: PIL's kernels
    are exact for labels and much faster on CPU than the grid-sample path of `tv_tensors.Mask`.
    """
    out = {}
    for key, value in sample.items():
        if key == "mask" and "interpolation" in kwargs:
            out[key] = function(value, **{**kwargs, "interpolation": InterpolationMode.NEAREST})
        else:
            out[key] = function(value, **kwargs)
    return out


def _size(sample: Sample) -> tuple[int, int]:
    """(width, height) of the sample's PIL image."""
    return sample["image"].size


def _crop_and_resize(sample: Sample, left: int, top: int, right: int, bottom: int, size: tuple[int, int]) -> Sample:
    """Crops the box [left, right) × [top, bottom) and resizes back to `size` = (width, height)."""
    width, height = size
    sample = _map(sample, F.crop, top=top, left=left, height=bottom - top, width=right - left)
    return _map(sample, F.resize, size=[height, width], interpolation=InterpolationMode.BICUBIC, antialias=True)


def _augmentor_angle(rng: random.Random, max_left: int, max_right: int) -> int:
    """Augmentor's integer angle draw: pick a side, then an integer in [−max_left, 0] or [0, max_right]."""
    left, right = rng.randint(-abs(max_left), 0), rng.randint(0, abs(max_right))
    return left if rng.randint(0, 1) == 0 else right


def rotate_with_inner_crop(sample: Sample, rng: random.Random, max_angle: int = 15) -> Sample:
    """Augmentor ``rotate(probability=1, max_left_rotation=15, max_right_rotation=15)``.

    Rotates by an integer angle (counter-clockwise, canvas expanded), crops Augmentor's "largest
    inner rectangle" and resizes back to the input size.
    """
    angle = _augmentor_angle(rng, max_angle, max_angle)
    width, height = _size(sample)
    sample = _map(sample, F.rotate, angle=float(angle), interpolation=InterpolationMode.BICUBIC, expand=True)
    big_w, big_h = _size(sample)
    ratio = math.sin(math.radians(abs(angle))) / math.sin(math.radians(90 - abs(angle)))
    inset_x = ratio * (big_h - big_w * ratio)
    # Augmentor writes `E / 1 - ratio²` (operator precedence; meant E / (1 - ratio²)); kept for parity.
    inset_x = inset_x / 1 - ratio**2
    inset_y = ratio * (big_w - inset_x)
    left, top = int(round(inset_x)), int(round(inset_y))
    right, bottom = int(round(big_w - inset_x)), int(round(big_h - inset_y))
    left, top, right, bottom = max(left, 0), max(top, 0), min(right, big_w), min(bottom, big_h)
    if right <= left or bottom <= top:  # degenerate for extreme aspect ratios: keep the whole canvas
        left, top, right, bottom = 0, 0, big_w, big_h
    return _crop_and_resize(sample, left, top, right, bottom, (width, height))


def skew(sample: Sample, rng: random.Random, magnitude: float = 0.2) -> Sample:
    """Augmentor ``skew(probability=1, magnitude=0.2)`` (skew type "RANDOM"): a perspective warp
    that moves one or two corners by up to ⌈magnitude · max(W, H)⌉ pixels, same output size."""
    width, height = _size(sample)
    amount = rng.randint(1, int(math.ceil(max(width, height) * magnitude)))
    kind = rng.choice(["TILT", "TILT_LEFT_RIGHT", "TILT_TOP_BOTTOM", "CORNER"])
    w, h, a = width, height, amount
    corners = [[0, 0], [w, 0], [w, h], [0, h]]  # top-left, top-right, bottom-right, bottom-left
    if kind == "CORNER":
        direction = rng.randint(0, 7)
        moved = [list(c) for c in corners]
        corner, axis = divmod(direction, 2)
        # Augmentor's 8 corner moves: per corner (in order), along x then y, outwards.
        delta = {0: (-a, -a), 1: (a, -a), 2: (a, a), 3: (-a, a)}[corner]
        moved[corner][axis] += delta[axis]
    else:
        direction = {"TILT": lambda: rng.randint(0, 3), "TILT_LEFT_RIGHT": lambda: rng.randint(0, 1)}.get(
            kind, lambda: rng.randint(2, 3)
        )()
        moved = {
            0: [[0, -a], [w, 0], [w, h], [0, h + a]],  # left tilt
            1: [[0, 0], [w, -a], [w, h + a], [0, h]],  # right tilt
            2: [[-a, 0], [w + a, 0], [w, h], [0, h]],  # forward tilt
            3: [[0, 0], [w, 0], [w + a, h], [-a, h]],  # backward tilt
        }[direction]
    return _map(sample, F.perspective, startpoints=corners, endpoints=moved, interpolation=InterpolationMode.BICUBIC)


def shear(sample: Sample, rng: random.Random, max_left: int = 10, max_right: int = 10) -> Sample:
    """Augmentor ``shear(probability=1, max_shear_left=10, max_shear_right=10)``.

    Integer angle drawn as in Augmentor (``int(U(−max_left − 1, max_right + 1))``, then +1 unless
    it is −1), random axis; the image is sheared, the region Augmentor keeps (the input size minus
    the shear shift along the axis) is cropped and resized back to the input size.
    Derivation: Augmentor's PIL transform plus crop equals x′ = x − tan(φ)·y + b on the input
    canvas with b = 0 for φ > 0 and b = −|shift| otherwise, followed by the crop [0, W − |shift|).
    """
    width, height = _size(sample)
    angle = int(rng.uniform(-abs(max_left) - 1, abs(max_right) + 1))
    if angle != -1:
        angle += 1
    axis = rng.choice(["x", "y"])
    phi = math.tan(math.radians(angle))
    if axis == "x":
        shift = phi * height
        shift = math.ceil(shift) if shift > 0 else math.floor(shift)
        offset = 0.0 if angle > 0 else -abs(shift)
        sample = _map(
            sample, F.affine, angle=0.0, translate=[offset, 0.0], scale=1.0, shear=[float(angle), 0.0],
            interpolation=InterpolationMode.BICUBIC, center=[0.0, 0.0],
        )  # fmt: skip
        keep = width - int(round(abs(shift)))
        return _crop_and_resize(sample, 0, 0, max(keep, 1), height, (width, height))
    shift = phi * width
    offset = 0.0 if angle > 0 else -abs(shift)
    sample = _map(
        sample, F.affine, angle=0.0, translate=[0.0, offset], scale=1.0, shear=[0.0, float(angle)],
        interpolation=InterpolationMode.BICUBIC, center=[0.0, 0.0],
    )  # fmt: skip
    keep = height - int(round(abs(shift)))
    return _crop_and_resize(sample, 0, 0, width, max(keep, 1), (width, height))


_OPERATIONS: dict[str, Callable[[Sample, random.Random], Sample]] = {
    "rotate": rotate_with_inner_crop,
    "skew": skew,
    "shear": shear,
}


def augmentation_rng(seed: int, image_id: int, augmentation: str, pass_index: int) -> random.Random:
    """Independent, reproducible random stream of one output image."""
    return random.Random(f"ivpt-cub-augment:{seed}:{image_id}:{augmentation}:{pass_index}")


def augment_sample(sample: Sample, augmentation: str, rng: random.Random) -> tuple[Sample, bool]:
    """One pipeline of docs/method.md#offline-augmentation: the operation, then a horizontal flip with p = 0.5.

    Returns the transformed sample and whether it was flipped.
    """
    sample = _OPERATIONS[augmentation](sample, rng)
    flipped = rng.random() < 0.5
    if flipped:
        sample = _map(sample, F.horizontal_flip)
    return sample, flipped


def offline_augmentations(
    image: Image.Image,
    keypoints: Any,
    bbox: Any,
    mask: Optional[Image.Image],
    seed: int,
    image_id: int,
    passes: int = NUM_PASSES,
) -> Iterator[dict[str, Any]]:
    """All docs/method.md#offline-augmentation outputs of one cropped training image: 3 pipelines × `passes`.

    Yields dicts with ``image`` (PIL RGB), ``keypoints`` (num_parts, 4) rows (visible points moved
    off the canvas become hidden), ``bbox`` (4,) ``[x, y, w, h]`` (the transformed source box,
    clamped to the canvas), ``mask`` ("L" PIL image or None), ``augmentation`` (name),
    ``augmentation_pass`` (int) and ``flipped`` (bool).
    """
    for augmentation in AUGMENTATIONS:
        for pass_index in range(passes):
            sample, rows = to_tv_sample(image, keypoints, bbox)
            if mask is not None:
                sample["mask"] = mask
            rng = augmentation_rng(seed, image_id, augmentation, pass_index)
            sample, flipped = augment_sample(sample, augmentation, rng)
            out_mask = sample.pop("mask", None)
            out = from_tv_sample(sample, rows)
            out["mask"] = out_mask
            out.update(augmentation=augmentation, augmentation_pass=pass_index, flipped=flipped)
            yield out
