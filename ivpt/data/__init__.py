"""Data: CUB-200-2011 builder and loader, synthetic CUB generator, IVPT transforms (spec §4.5, §5, §6)."""

from .cub import CONFIG_NAMES, Cub200, Cub200Config, CubFormatError, crop_box_from_text, load_cub, read_annotations
from .synthetic import CUB_PART_NAMES, generate_cub
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    apply_transform,
    batch_transform,
    consistency_part_points,
    consistency_transform,
    eval_transform,
    parts_eval_preprocess,
    test_transform,
    train_transform,
)

__all__ = [
    "CONFIG_NAMES",
    "CUB_PART_NAMES",
    "Cub200",
    "Cub200Config",
    "CubFormatError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "apply_transform",
    "batch_transform",
    "consistency_part_points",
    "consistency_transform",
    "crop_box_from_text",
    "eval_transform",
    "generate_cub",
    "load_cub",
    "parts_eval_preprocess",
    "read_annotations",
    "test_transform",
    "train_transform",
]
