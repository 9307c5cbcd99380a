"""The evaluation dataset schema: the columns a part-annotated `datasets.Dataset` provides.

| column       | feature                                               | meaning                                          |
|--------------|-------------------------------------------------------|--------------------------------------------------|
| `image`      | `Image()`                                             | the full image (converted to RGB when read)      |
| `label`      | `ClassLabel` or integer                               | class index, in the model's label order          |
| `bbox`       | `List(float32, 4)`                                    | object box `[x, y, width, height]`, pixels       |
| `keypoints`  | `List({part_id, x, y, visible})`, same length per row | part keypoints, pixels; hidden ones `visible=0`  |
| `mask`       | `Image()` (grey levels)                               | foreground mask; foreground = grey ≥ threshold   |
| `part_mask`  | `Image()` (mode "L")                                  | part label map: 0 background, k part k (1-based) |
| `image_id`   | integer                                               | seeds the stability noise (default: row index)   |

Only `image` and `label` are required; every other column is optional and a metric runs when the columns it
declares are present (a column whose values are all null counts as absent). `EvaluationData` bundles the evaluated
split with the optional train split (the keypoint-regression fit) and an optional pre-cropped view of the evaluated
split for the consistency protocol (`box_crops`: the CUB adapter supplies the builder's ``cropped`` config, whose
crops are stored as JPEG quality 95 like the release's; without it the crops are cut in memory from `bbox`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import datasets

REQUIRED_COLUMNS = ("image", "label")
OPTIONAL_COLUMNS = ("bbox", "keypoints", "mask", "part_mask", "image_id")
SCHEMA_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS


class SchemaError(ValueError):
    """A dataset does not follow the evaluation schema; the message names the dataset, split and column."""


def present_columns(dataset: datasets.Dataset) -> frozenset[str]:
    """Schema columns of `dataset` that hold at least one non-null value (counted on its Arrow table, so on the
    whole underlying table for a `select`ed dataset)."""
    present = set()
    for column in SCHEMA_COLUMNS:
        if column in dataset.column_names and dataset.data.column(column).null_count < len(dataset):
            present.add(column)
    return frozenset(present)


def _feature_error(name: str, column: str, feature, expected: str) -> SchemaError:
    return SchemaError(f"{name}: column {column!r} must be {expected}, got {feature}")


def check_schema(dataset: datasets.Dataset, name: str = "dataset") -> frozenset[str]:
    """Checks the column types of `dataset` against the schema; returns the present schema columns.

    Raises:
        SchemaError: a required column is missing, or a schema column has the wrong feature type.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise SchemaError(f"{name}: missing required column(s) {missing}; available: {dataset.column_names} "
                          "(rename them with Dataset.rename_column)")
    features = dataset.features
    for column in ("image", "mask", "part_mask"):
        if column in features and not isinstance(features[column], datasets.Image):
            raise _feature_error(name, column, features[column], "an Image feature")
    label = features["label"]
    if not isinstance(label, datasets.ClassLabel) and not (
        isinstance(label, datasets.Value) and label.dtype.startswith(("int", "uint"))
    ):
        raise _feature_error(name, "label", label, "a ClassLabel or an integer Value")
    if "keypoints" in features:
        inner = getattr(features["keypoints"], "feature", None)
        if not isinstance(inner, dict) or set(inner) != {"part_id", "x", "y", "visible"}:
            raise _feature_error(name, "keypoints", features["keypoints"], "a List of {part_id, x, y, visible}")
    if "bbox" in features:
        inner = getattr(features["bbox"], "feature", None)
        if not isinstance(inner, datasets.Value):
            raise _feature_error(name, "bbox", features["bbox"], "a List of 4 numbers [x, y, w, h]")
    return present_columns(dataset)


def label_names(dataset: datasets.Dataset) -> Optional[list[str]]:
    """The ClassLabel names of `dataset`'s label column, or None for plain integer labels."""
    feature = dataset.features["label"]
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


@dataclass
class EvaluationData:
    """What an evaluation reads: the evaluated split (schema columns), and optional extras.

    Args:
        test: the evaluated split.
        train: the split the keypoint regression is fitted on (`kpr` is skipped without it).
        box_crops: the evaluated split already cropped to its boxes, rows aligned with `test`, with `crop_box`
            `[x1, y1, x2, y2]` and keypoints in crop coordinates (the CUB builder's ``cropped`` config).
        name: how reports name the data.
        published: published numbers to print next to ours (`{"method": {"metric": value}}`); CUB only.
    """

    test: datasets.Dataset
    train: Optional[datasets.Dataset] = None
    box_crops: Optional[datasets.Dataset] = None
    name: str = "dataset"
    published: Optional[dict] = None

    def __post_init__(self):
        self.columns = check_schema(self.test, f"{self.name} (evaluated split)")
        if self.train is not None:
            check_schema(self.train, f"{self.name} (train split)")
        if self.box_crops is not None and len(self.box_crops) != len(self.test):
            raise SchemaError(f"{self.name}: box_crops has {len(self.box_crops)} rows, the evaluated split "
                              f"{len(self.test)}")

    def limited(self, max_images: Optional[int]) -> "EvaluationData":
        """The first `max_images` rows of every split (all rows for None)."""
        if not max_images:
            return self
        take = lambda ds: None if ds is None else ds.select(range(min(len(ds), max_images)))  # noqa: E731
        limited = EvaluationData(take(self.test), take(self.train), take(self.box_crops), self.name, self.published)
        limited.columns = self.columns  # the full split's columns: a selection's Arrow table is the full table
        return limited


def from_dataset_dict(
    splits: datasets.DatasetDict | datasets.Dataset,
    test_split: str = "test",
    train_split: Optional[str] = "train",
    name: str = "dataset",
    image_column: str = "image",
    label_column: str = "label",
) -> EvaluationData:
    """`EvaluationData` from a loaded `DatasetDict` (e.g. `ivpt.data.load_any_dataset(...)`) or one `Dataset`."""
    if isinstance(splits, datasets.Dataset):
        splits = datasets.DatasetDict({test_split: splits})
    if test_split not in splits:
        raise SchemaError(f"{name}: no split {test_split!r} to evaluate; available: {sorted(splits)}")

    def renamed(ds):
        for column, target in ((image_column, "image"), (label_column, "label")):
            if column != target:
                if column not in ds.column_names:
                    raise SchemaError(f"{name}: no column {column!r}; available: {ds.column_names}")
                ds = ds.rename_column(column, target)
        return ds

    train = renamed(splits[train_split]) if train_split and train_split in splits else None
    return EvaluationData(renamed(splits[test_split]), train, name=name)


def from_cub(data_dir: str, cache_dir: Optional[str] = None, box_crops: bool = True) -> EvaluationData:
    """CUB-200-2011 as `EvaluationData`: the builder's ``full`` test split, its train split, and the ``cropped``
    test split for the consistency protocol (built only when `box_crops`)."""
    from ..data import load_cub
    from ..paper_numbers import PUBLISHED

    full = load_cub(data_dir, "full", cache_dir=cache_dir)
    cropped = load_cub(data_dir, "cropped", cache_dir=cache_dir, segmentations=False)["test"] if box_crops else None
    return EvaluationData(full["test"], full["train"], cropped, name="CUB-200-2011", published=PUBLISHED)


__all__ = [
    "EvaluationData",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "SCHEMA_COLUMNS",
    "SchemaError",
    "check_schema",
    "from_cub",
    "from_dataset_dict",
    "label_names",
    "present_columns",
]
