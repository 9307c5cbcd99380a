"""Training-time data plumbing of the training workflow (`ivpt.training.run`) and `IvptTrainer`.

* `load_raw_dataset` / `prepare_splits` — CUB through the `ivpt.data` builder (`data_dir`) or anything
  `ivpt.data.load_any_dataset` reads (`dataset_name`, `load_dataset_by_name`: Hub ids, parquet / save_to_disk /
  imagefolder folders, the official layouts), validated: splits exist, the image and label columns exist, labels lie
  in `[0, num_labels)`;
* `SampleSeededTransform` — the docs/method.md#training-augmentation transforms applied on the fly (`Dataset.with_transform`), where every random
  augmentation draws from a generator seeded by `(seed, epoch, sample index)`. The augmentation of a sample therefore
  does not depend on the process that loads it, the number of loader workers, or where a resumed run restarts, which
  makes resuming exact and multi-process runs equal to single-process ones (the release draws from per-rank global
  seeds; the distribution of augmentations is the same);
* `AugmentationEpochCallback` — tells the transform which epoch is starting.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import datasets
import numpy as np
import torch
from PIL import Image
from transformers import TrainerCallback

from .errors import MissingPathError, TrainingError

INDEX_COLUMN = "__sample_index__"


class DataError(TrainingError):
    """Bad training data: the message names the dataset, split, column or value at fault."""


@dataclass
class ImageClassificationData:
    """Validated splits with columns `image` and `label` (plus the index column), and the label names."""

    splits: datasets.DatasetDict
    label_names: list[str]
    source: str

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def check_data_source(data_dir: str | None, dataset_name: str | None) -> None:
    """Exactly one data source, and a `--data_dir` that exists (checked before any work)."""
    if (data_dir is None) == (dataset_name is None):
        raise DataError("Expected exactly one of `--data_dir` (CUB layout) and `--dataset_name`, got "
                        f"data_dir={data_dir!r}, dataset_name={dataset_name!r}")
    if data_dir is not None and not os.path.exists(data_dir):
        raise DataError(f"`--data_dir`: no such file or directory {data_dir!r}")


def load_raw_dataset(
    data_dir: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    cub_config: str = "full",
    cache_dir: str | None = None,
) -> tuple[datasets.DatasetDict, str]:
    """Loads the data source without validating it; returns the `DatasetDict` and a description naming the source
    (by its name, never by an absolute local path: the description goes into model cards)."""
    check_data_source(data_dir, dataset_name)
    if data_dir is not None:
        from ..data import load_cub

        return load_cub(data_dir, config=cub_config, cache_dir=cache_dir), f"CUB {_name_of(data_dir)!r}"
    return load_dataset_by_name(dataset_name, dataset_config_name, cache_dir)


def load_dataset_by_name(
    name: str, config_name: str | None = None, cache_dir: str | None = None
) -> tuple[datasets.DatasetDict, str]:
    """`--dataset_name`: anything `ivpt.data.load_any_dataset` accepts (a Hub id, a Hub-style parquet folder, a
    `save_to_disk` folder, an imagefolder or csv/json folder, an official CUB / NABirds / Flowers-102 / PartImageNet
    layout), as a `DatasetDict` with named splits, and a description naming it. The one place where the training
    workflow loads a dataset by name; every failure is a `DataError` naming `--dataset_name`."""
    from ..data.cub import CubFormatError
    from ..data.loading import DatasetSourceError, dataset_source_kind, load_any_dataset
    from ..data.official import LayoutFormatError

    try:
        kind = dataset_source_kind(name)
        loaded = load_any_dataset(name, config_name, cache_dir=cache_dir)
    except FileNotFoundError as error:
        raise MissingPathError(f"`--dataset_name`: {error}") from error
    except (DatasetSourceError, CubFormatError, LayoutFormatError) as error:
        raise DataError(f"`--dataset_name`: {error}") from error
    if kind == "hub":
        return loaded, f"dataset {name!r}"
    form = {"save_to_disk": "save_to_disk folder", "folder": "data folder"}.get(kind, f"{kind} layout")
    return loaded, f"{form} {_name_of(name)!r}"


def _name_of(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def prepare_splits(
    raw: datasets.DatasetDict,
    source: str,
    train_split: str,
    test_split: str | None,
    eval_split: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    validation_fraction: float = 0.0,
    seed: int = 42,
    num_labels: int | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> ImageClassificationData:
    """Selects, checks and normalises the splits used for training.

    Returns splits named `train`, `test` (when `test_split` is given) and `eval` (when `eval_split` is given, or
    `validation_fraction > 0`, which carves a stratified `validation` split out of the training split with `seed`;
    `eval_split="validation"` then selects it). Only the image and label columns are kept, renamed to `image` and
    `label`, plus an index column for the seeded augmentation.
    """
    if validation_fraction:
        if not 0 < validation_fraction < 1:
            raise DataError(f"`--validation_fraction`: expected a fraction in (0, 1), got {validation_fraction}")
        if "validation" in raw:
            raise DataError(f"`--validation_fraction`: {source} already has a 'validation' split")
        if train_split not in raw:
            raise DataError(f"`--train_split`: {source} has no split {train_split!r}; available: {sorted(raw)}")
        stratify = label_column if isinstance(raw[train_split].features.get(label_column), datasets.ClassLabel) else None
        parts = raw[train_split].train_test_split(test_size=validation_fraction, seed=seed, stratify_by_column=stratify)
        raw = datasets.DatasetDict({**raw, train_split: parts["train"], "validation": parts["test"]})

    wanted = {"train": ("--train_split", train_split)}
    if test_split:
        wanted["test"] = ("--test_split", test_split)
    if eval_split:
        wanted["eval"] = ("--eval_split", eval_split)
    splits = {}
    for role, (flag, name) in wanted.items():
        if name not in raw:
            raise DataError(f"`{flag}`: {source} has no split {name!r}; available: {sorted(raw)}")
        dataset = raw[name]
        missing = [column for column in (image_column, label_column) if column not in dataset.column_names]
        if missing:
            raise DataError(
                f"{source}, split {name!r}: missing column(s) {missing} (set `--image_column` / `--label_column`); "
                f"available: {dataset.column_names}"
            )
        if not isinstance(dataset.features[image_column], datasets.Image):
            raise DataError(
                f"{source}, split {name!r}: column {image_column!r} must be an Image feature, got "
                f"{dataset.features[image_column]}"
            )
        dataset = dataset.select_columns([image_column, label_column])
        if image_column != "image":
            dataset = dataset.rename_column(image_column, "image")
        if label_column != "label":
            dataset = dataset.rename_column(label_column, "label")
        limit = max_train_samples if role == "train" else max_eval_samples
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        if len(dataset) == 0:
            raise DataError(f"{source}, split {name!r}: no examples")
        splits[role] = dataset.add_column(INDEX_COLUMN, list(range(len(dataset))))

    label_feature = splits["train"].features["label"]
    if isinstance(label_feature, datasets.ClassLabel):
        label_names = list(label_feature.names)
    else:
        label_names = [str(index) for index in range(max(int(max(d["label"])) for d in splits.values()) + 1)]
    if num_labels is not None:
        if isinstance(label_feature, datasets.ClassLabel) and num_labels != len(label_names):
            raise DataError(
                f"`--num_labels`: {source} declares {len(label_names)} classes, got num_labels={num_labels}"
            )
        label_names = label_names[:num_labels] + [str(i) for i in range(len(label_names), num_labels)]
    for role, dataset in splits.items():
        labels = np.asarray(dataset["label"])
        bad = np.flatnonzero((labels < 0) | (labels >= len(label_names)))
        if bad.size:
            raise DataError(
                f"{source}, split {wanted[role][1]!r}: label {int(labels[bad[0]])} of row {int(bad[0])} is out of "
                f"range [0, {len(label_names)}) ({bad.size} bad rows)"
            )
    return ImageClassificationData(datasets.DatasetDict(splits), label_names, source)


class SampleSeededTransform:
    """Batched `with_transform` function: image → `pixel_values`, label → `labels`.

    With `seed` set, each sample is transformed under a torch RNG seeded by `(seed, epoch, sample index)` (forked, so
    the global RNG is untouched); with `seed=None` the transform draws from the global RNG like a plain pipeline.
    Set `epoch` before each epoch starts (`AugmentationEpochCallback`). It lives in a shared-memory tensor, so that
    loader workers, persistent ones included, see the value set in the main process (the Trainer sets it before it
    asks the loader for the epoch's first batch).
    """

    def __init__(self, transform: Callable, seed: int | None = None):
        self.transform = transform
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.fill_(int(value))

    def _sample_seed(self, index: int) -> int:
        return int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1, dtype=np.uint64)[0])

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        images, labels = batch["image"], batch["label"]
        indices = batch.get(INDEX_COLUMN, [None] * len(images))
        images = [image.convert("RGB") if isinstance(image, Image.Image) and image.mode != "RGB" else image
                  for image in images]
        if self.seed is None or any(index is None for index in indices):
            pixel_values = [self.transform(image) for image in images]
        else:
            # The v2 transforms draw from the CPU default generator. It is saved once per batch and reseeded per
            # sample with `default_generator.manual_seed`, not `torch.manual_seed`, which would also reseed every
            # accelerator's generator (the model's Gumbel noise) and costs ~0.1 ms per call.
            with torch.random.fork_rng(devices=[]):
                pixel_values = []
                for image, index in zip(images, indices):
                    torch.default_generator.manual_seed(self._sample_seed(int(index)))
                    pixel_values.append(self.transform(image))
        return {"pixel_values": [pixel.as_subclass(torch.Tensor) for pixel in pixel_values], "labels": list(labels)}


class AugmentationEpochCallback(TrainerCallback):
    """Sets `transform.epoch` to the epoch that starts (floor of the Trainer's fractional epoch, so a run resumed
    mid-epoch keeps that epoch's augmentations)."""

    def __init__(self, transform: SampleSeededTransform):
        self.transform = transform

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.transform.epoch = math.floor((state.epoch or 0.0) + 1e-9)


def build_transforms(image_size: int, augmentation: str = "cub_original"):
    """(train, test) torchvision v2 pipelines of docs/method.md#training-augmentation; `augmentation="none"` trains on the test pipeline."""
    from ..data.transforms import eval_transform, train_transform

    if augmentation not in ("cub_original", "none"):
        raise DataError(f"`--augmentation`: expected 'cub_original' or 'none', got {augmentation!r}")
    test = eval_transform(image_size)
    return (train_transform(image_size) if augmentation == "cub_original" else test), test


__all__ = [
    "AugmentationEpochCallback",
    "DataError",
    "ImageClassificationData",
    "INDEX_COLUMN",
    "SampleSeededTransform",
    "build_transforms",
    "load_dataset_by_name",
    "load_raw_dataset",
    "prepare_splits",
]
