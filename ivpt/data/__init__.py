"""Data: builders for CUB-200-2011, NABirds, Oxford Flowers-102 and PartImageNet, `load_any_dataset` (Hub ids, parquet
/ save_to_disk / imagefolder folders, official layouts), the synthetic CUB generator and the IVPT transforms.

Names are resolved lazily (PEP 562), so ``python -m ivpt.data.synthetic`` / ``python -m
ivpt.data.cub`` run without importing the other modules (and without runpy warnings).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "cub": ("CONFIG_NAMES", "Cub200", "Cub200Config", "CubFormatError", "crop_box_from_text", "load_cub",
            "read_annotations"),
    "flowers": ("load_flowers102",),
    "loading": ("DatasetSourceError", "dataset_source_kind", "load_any_dataset"),
    "nabirds": ("load_nabirds",),
    "official": ("LayoutFormatError",),
    "partimagenet": ("load_partimagenet",),
    "synthetic": ("CUB_PART_NAMES", "generate_cub"),
    "transforms": ("IMAGENET_MEAN", "IMAGENET_STD", "apply_transform", "batch_transform",
                   "consistency_transform", "eval_transform", "parts_eval_preprocess",
                   "train_transform"),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)

if TYPE_CHECKING:  # pragma: no cover
    from .cub import CONFIG_NAMES, Cub200, Cub200Config, CubFormatError, crop_box_from_text, load_cub, read_annotations
    from .flowers import load_flowers102
    from .loading import DatasetSourceError, dataset_source_kind, load_any_dataset
    from .nabirds import load_nabirds
    from .official import LayoutFormatError
    from .partimagenet import load_partimagenet
    from .synthetic import CUB_PART_NAMES, generate_cub
    from .transforms import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        apply_transform,
        batch_transform,
        consistency_transform,
        eval_transform,
        parts_eval_preprocess,
        train_transform,
    )


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
