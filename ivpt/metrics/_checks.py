"""Argument checks shared by the metric functions (errors name the argument at fault)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_shape(tensor: torch.Tensor, name: str, shape: Sequence[str | int]) -> None:
    """Check `tensor` against a shape description.

    Entries of `shape` are either an `int` (the size must match) or a `str` (a named, free size).
    Raises `ValueError` naming `name` and the expected shape on mismatch.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, got {type(tensor).__name__}")
    description = "(" + ", ".join(str(size) for size in shape) + ")"
    if tensor.ndim != len(shape) or any(
        isinstance(size, int) and tensor.shape[dim] != size for dim, size in enumerate(shape)
    ):
        raise ValueError(f"Expected `{name}` of shape {description}, got {tuple(tensor.shape)}")


def check_same_leading(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, dims: int = 1) -> None:
    """Check that the first `dims` sizes of two tensors agree."""
    if a.shape[:dims] != b.shape[:dims]:
        raise ValueError(
            f"Expected `{name_a}` and `{name_b}` to agree on their first {dims} dimension(s), "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_labels(labels: torch.Tensor, num_classes: int, name: str = "labels") -> None:
    """Check a 1-D integer label tensor with values in [0, num_classes)."""
    check_shape(labels, name, ("num_images",))
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"Expected `{name}` to be an integer tensor, got dtype {labels.dtype}")
    if num_classes < 1:
        raise ValueError(f"Expected `num_classes` >= 1, got {num_classes}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"Expected `{name}` in [0, {num_classes}), got values in [{int(labels.min())}, {int(labels.max())}]"
        )


def pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    """`(height, width)` from an int (square) or a pair of ints."""
    if isinstance(size, int):
        height = width = size
    else:
        if len(size) != 2:
            raise ValueError(f"Expected `{name}` to be an int or (height, width), got {size!r}")
        height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise ValueError(f"Expected `{name}` to be positive, got {size!r}")
    return height, width


def keypoint_xyv(keypoints: torch.Tensor, name: str = "keypoints") -> torch.Tensor:
    """`(x, y, visible)` columns of a keypoint table.

    Accepts `(num_images, num_parts, 3)` rows `(x, y, visible)` or `(num_images, num_parts, 4)`
    rows `(part_id, x, y, visible)` as the docs/method.md#part-annotated-items dataset returns them (the part id column is
    dropped; rows must already be in part-id order).
    """
    check_shape(keypoints, name, ("num_images", "num_parts", "3|4"))
    if keypoints.shape[-1] == 4:
        return keypoints[..., 1:]
    if keypoints.shape[-1] != 3:
        raise ValueError(
            f"Expected `{name}` of shape (num_images, num_parts, 3) rows (x, y, visible) or "
            f"(num_images, num_parts, 4) rows (part_id, x, y, visible), got {tuple(keypoints.shape)}"
        )
    return keypoints


def box_xywh(boxes: torch.Tensor, name: str = "boxes") -> torch.Tensor:
    """`(x, y, width, height)` columns of a box table.

    Accepts `(num_images, 4)` rows `(x, y, width, height)` or `(num_images, 5)` rows
    `(image_index, x, y, width, height)` as the docs/method.md#part-annotated-items dataset returns them.
    """
    check_shape(boxes, name, ("num_images", "4|5"))
    if boxes.shape[-1] == 5:
        return boxes[:, 1:]
    if boxes.shape[-1] != 4:
        raise ValueError(
            f"Expected `{name}` of shape (num_images, 4) rows (x, y, width, height) or (num_images, 5) rows "
            f"(image_index, x, y, width, height), got {tuple(boxes.shape)}"
        )
    return boxes
