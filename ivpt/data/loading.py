"""Load a dataset by name or path, whatever form it comes in.

`load_any_dataset(name_or_path)` accepts:

* a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (it holds ``dataset_dict.json``, or
  ``state.json`` + ``dataset_info.json``) -> `datasets.load_from_disk`;
* a folder (or the official archive) in one of the official layouts our builders read (CUB-200-2011, NABirds,
  Oxford Flowers-102, PartImageNet; see `ivpt.data.builders`) -> that builder;
* any other local folder -> `datasets.load_dataset(folder)`, which picks the packaged loader from the files it finds:
  a Hub-style parquet folder (``data/train-00000-of-00001.parquet`` ..., optionally with a README.md ``configs``
  block), csv / json / arrow files, or an imagefolder (``<split>/<class>/<image>``);
* anything else -> `datasets.load_dataset(name, config_name)`: a Hub id (served from the local cache when offline).

Failures raise `DatasetSourceError` (a `ValueError`) or `FileNotFoundError`, naming the path or id and saying which
form was tried, instead of the loader's internal error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import datasets

__all__ = ["DatasetSourceError", "dataset_source_kind", "is_save_to_disk_folder", "load_any_dataset"]

_DATA_SUFFIXES = (".parquet", ".arrow", ".csv", ".tsv", ".json", ".jsonl", ".txt")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class DatasetSourceError(ValueError):
    """A dataset name or path cannot be loaded; the message names it and the form that was tried."""


def is_save_to_disk_folder(path: Path) -> bool:
    """True for the output of `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / datasets.config.DATASETDICT_JSON_FILENAME).is_file() or (
        (path / datasets.config.DATASET_STATE_JSON_FILENAME).is_file()
        and (path / datasets.config.DATASET_INFO_FILENAME).is_file()
    )


def _layout_builder(path: Path) -> Optional[tuple[str, Callable]]:
    """(layout name, loader) of the official layout found in `path`, if any (lazy: the builders import only here)."""
    try:
        from .builders import detect_layout
    except ImportError:  # pragma: no cover - the builders registry is optional for this module
        return None
    return detect_layout(path)


def dataset_source_kind(name_or_path: str | os.PathLike) -> str:
    """How `load_any_dataset` would load `name_or_path`: ``"save_to_disk"``, a layout name (``"cub"``, ...),
    ``"folder"`` (parquet / csv / json / imagefolder, decided by `datasets`) or ``"hub"``."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if is_save_to_disk_folder(path):
            return "save_to_disk"
        layout = _layout_builder(path)
        return layout[0] if layout else "folder"
    if path.is_file():
        layout = _layout_builder(path) if path.name.endswith((".tgz", ".tar.gz", ".tar")) else None
        return layout[0] if layout else "file"
    return "hub"


def _check_folder_has_data(path: Path) -> None:
    suffixes = {p.suffix.lower() for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")}
    if not suffixes & set(_DATA_SUFFIXES + _IMAGE_SUFFIXES):
        raise DatasetSourceError(
            f"{path}: no data files found (expected a save_to_disk folder, parquet / csv / json / arrow files, "
            f"or an imagefolder of images); found suffixes {sorted(suffixes) or 'none'}"
        )


def load_any_dataset(
    name_or_path: str | os.PathLike,
    config_name: Optional[str] = None,
    split: Optional[str] = None,
    cache_dir: Optional[str | os.PathLike] = None,
    **builder_kwargs,
) -> datasets.DatasetDict | datasets.Dataset:
    """Loads a dataset from a Hub id, a local data folder, a `save_to_disk` folder or an official layout.

    Args:
        name_or_path (`str` or `os.PathLike`): Hub id (``"owner/name"``) or local folder (see the module docstring).
        config_name (`str`, *optional*): the dataset config (Hub datasets with several configs; the builder config,
            e.g. ``"cropped"``, for an official layout).
        split (`str`, *optional*): return this split as a `Dataset` instead of the whole `DatasetDict`.
        cache_dir (`str`, *optional*): `datasets` cache folder.
        builder_kwargs: passed to the layout builder's loader (official layouts only).

    Returns:
        `datasets.DatasetDict` (or `datasets.Dataset` when `split` is given).

    Raises:
        FileNotFoundError: `name_or_path` looks like a local path (absolute, or starting with ``.`` or ``~``) but does
            not exist.
        DatasetSourceError: the source cannot be loaded, `split` is unknown, or `name_or_path` is a plain file.
    """
    text = os.fspath(name_or_path)
    if not text:
        raise DatasetSourceError("dataset name or path is empty")
    path = Path(text).expanduser()
    kind = dataset_source_kind(path)
    if kind == "file":
        raise DatasetSourceError(
            f"{text}: is a file; expected a folder (save_to_disk output, parquet / imagefolder data, an official "
            f"layout) or a Hub dataset id"
        )
    if kind == "hub" and (path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1):
        raise FileNotFoundError(f"{text}: no such dataset folder")
    cache = None if cache_dir is None else str(cache_dir)
    if kind not in ("save_to_disk", "folder", "hub"):  # an official layout: its builder's errors name the file
        _, loader = _layout_builder(path)
        return _select(loader(path, config=config_name, cache_dir=cache, **builder_kwargs), split, text)
    try:
        if kind == "save_to_disk":
            if config_name is not None:
                raise DatasetSourceError(f"{text}: a save_to_disk folder has no configs, got config {config_name!r}")
            loaded = datasets.load_from_disk(str(path))
        elif kind == "folder":
            _check_folder_has_data(path)
            loaded = datasets.load_dataset(str(path), config_name, cache_dir=cache)
        else:
            loaded = datasets.load_dataset(text, config_name, cache_dir=cache)
    except (DatasetSourceError, FileNotFoundError):
        raise
    except Exception as error:  # `datasets` raises many types (DatasetNotFoundError, ValueError, OSError, ...)
        form = {"save_to_disk": "a save_to_disk folder", "folder": "a local data folder",
                "hub": "a Hub dataset id (offline: from the local cache only)"}[kind]
        raise DatasetSourceError(f"{text}: cannot load it as {form}: {type(error).__name__}: {error}") from error
    return _select(loaded, split, text)


def _select(loaded, split: Optional[str], text: str):
    """The whole `DatasetDict` (a single saved `Dataset` becomes split "train"), or the split `split`."""
    if isinstance(loaded, datasets.Dataset) and split is None:
        loaded = datasets.DatasetDict({"train": loaded})  # a saved single Dataset: one split named train
    if split is not None:
        if isinstance(loaded, datasets.Dataset):
            return loaded
        if split not in loaded:
            raise DatasetSourceError(f"{text}: no split {split!r}; available: {sorted(loaded)}")
        return loaded[split]
    return loaded
