"""`load_any_dataset`: Hub-style parquet folders, save_to_disk folders, imagefolders, official layouts, and errors."""

from __future__ import annotations


import datasets
import numpy as np
import pytest
from PIL import Image

from ivpt.data.loading import DatasetSourceError, dataset_source_kind, load_any_dataset

from fixtures_data import synthetic_root  # noqa: F401

NAMES = ["cat", "dog", "eel"]


def _tiny_dict() -> datasets.DatasetDict:
    rng = np.random.default_rng(0)

    def split(count, offset):
        images = [Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)) for _ in range(count)]
        return datasets.Dataset.from_dict(
            {"img": images, "fine_label": [(i + offset) % 3 for i in range(count)]},
            features=datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=NAMES)}),
        )

    return datasets.DatasetDict({"train": split(5, 0), "test": split(4, 1)})


@pytest.fixture(scope="module")
def tiny():
    return _tiny_dict()


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory, tiny):
    """The layout `push_to_hub` writes: data/<split>-00000-of-00001.parquet."""
    root = tmp_path_factory.mktemp("parquet_ds")
    for name, split in tiny.items():
        split.to_parquet(str(root / "data" / f"{name}-00000-of-00001.parquet"))
    return root


def _assert_same(loaded: datasets.DatasetDict, tiny: datasets.DatasetDict):
    assert sorted(loaded) == ["test", "train"]
    for name in tiny:
        assert loaded[name].features["fine_label"].names == NAMES
        assert isinstance(loaded[name].features["img"], datasets.Image)
        assert loaded[name]["fine_label"] == tiny[name]["fine_label"]
        assert np.array_equal(np.asarray(loaded[name][0]["img"]), np.asarray(tiny[name][0]["img"]))


def test_hub_style_parquet_folder(parquet_dir, tiny, tmp_path):
    assert dataset_source_kind(parquet_dir) == "folder"
    _assert_same(load_any_dataset(parquet_dir, cache_dir=tmp_path), tiny)
    assert len(load_any_dataset(str(parquet_dir), split="test", cache_dir=tmp_path)) == 4


def test_save_to_disk_dict_and_single_dataset(tmp_path, tiny):
    tiny.save_to_disk(str(tmp_path / "dict"))
    assert dataset_source_kind(tmp_path / "dict") == "save_to_disk"
    _assert_same(load_any_dataset(tmp_path / "dict"), tiny)
    tiny["test"].save_to_disk(str(tmp_path / "single"))
    single = load_any_dataset(tmp_path / "single")
    assert list(single) == ["train"] and single["train"]["fine_label"] == tiny["test"]["fine_label"]
    with pytest.raises(DatasetSourceError, match="no configs"):
        load_any_dataset(tmp_path / "dict", config_name="x")


def test_imagefolder(tmp_path):
    rng = np.random.default_rng(1)
    for split, count in (("train", 2), ("test", 1)):
        for name in ("ant", "bee"):
            folder = tmp_path / "imgs" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    loaded = load_any_dataset(tmp_path / "imgs", cache_dir=tmp_path / "cache")
    assert sorted(loaded) == ["test", "train"] and len(loaded["train"]) == 4
    assert loaded["train"].features["label"].names == ["ant", "bee"]


def test_official_cub_layout(synthetic_root, tmp_path):  # noqa: F811
    assert dataset_source_kind(synthetic_root) == "cub"
    loaded = load_any_dataset(synthetic_root, cache_dir=tmp_path)
    assert sorted(loaded) == ["test", "train"] and len(loaded["train"]) == 12
    assert "keypoints" in loaded["train"].column_names


def test_errors_name_the_source(tmp_path, parquet_dir):
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        load_any_dataset(tmp_path / "no_such_folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetSourceError, match="empty: no data files"):
        load_any_dataset(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetSourceError, match="file.txt: is a file"):
        load_any_dataset(tmp_path / "file.txt")
    with pytest.raises(DatasetSourceError, match="no split 'validation'.*'test', 'train'"):
        load_any_dataset(parquet_dir, split="validation", cache_dir=tmp_path)
    with pytest.raises(DatasetSourceError, match="nobody/no-such-dataset: cannot load it as a Hub dataset id"):
        load_any_dataset("nobody/no-such-dataset", cache_dir=tmp_path)
    with pytest.raises(DatasetSourceError, match="empty"):
        load_any_dataset("")
