"""Shared fixtures and helpers of the data tests (tests/test_data_*.py).

Import the fixtures you use into the test module (``from fixtures_data import synthetic_root``):
pytest only discovers fixtures from conftest.py automatically.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ivpt.data.synthetic import generate_cub

# Tiny synthetic CUB: 4 classes × 6 images at 96 px (12 train / 12 test).
SMALL = dict(classes=4, images_per_class=6, size=96, seed=0)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Read-only synthetic CUB_200_2011 folder (copy it before modifying: see `cub_copy`)."""
    return generate_cub(tmp_path_factory.mktemp("synthetic_dir"), **SMALL)


@pytest.fixture(scope="session")
def synthetic_tgz(tmp_path_factory) -> Path:
    """The same data as `synthetic_root`, as CUB_200_2011.tgz + segmentations.tgz."""
    return generate_cub(tmp_path_factory.mktemp("synthetic_tgz"), tgz=True, **SMALL)


@pytest.fixture
def cub_copy(synthetic_root, tmp_path) -> Path:
    """A private, modifiable copy of the synthetic CUB folder."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "CUB_200_2011"))


def parse_text_tables(root: Path) -> dict:
    """Direct, minimal parse of the CUB text files (independent of ivpt.data.cub)."""

    def table(name: str) -> list[list[str]]:
        return [line.split() for line in (root / name).read_text().splitlines() if line.strip()]

    images = {int(i): path for i, path in table("images.txt")}
    labels = {int(i): int(c) - 1 for i, c in table("image_class_labels.txt")}
    train = {int(i): t == "1" for i, t in table("train_test_split.txt")}
    boxes = {int(i): [float(v) for v in rest] for i, *rest in table("bounding_boxes.txt")}
    keypoints: dict[int, list[list[float]]] = {}
    for image_id, part_id, x, y, visible in table("parts/part_locs.txt"):
        keypoints.setdefault(int(image_id), []).append([int(part_id), float(x), float(y), int(visible)])
    classes = [line.split(maxsplit=1)[1] for line in (root / "classes.txt").read_text().splitlines() if line.strip()]
    return {"images": images, "labels": labels, "train": train, "boxes": boxes, "keypoints": keypoints, "classes": classes}


def rewrite_line(path: Path, line_number: int, new_text: str) -> None:
    """Replaces 1-based line `line_number` of a text file."""
    lines = path.read_text().splitlines()
    lines[line_number - 1] = new_text
    path.write_text("\n".join(lines) + "\n")


def delete_line(path: Path, line_number: int) -> None:
    lines = path.read_text().splitlines()
    del lines[line_number - 1]
    path.write_text("\n".join(lines) + "\n")


def image_path(root: Path, image_id: int) -> Path:
    for line in (root / "images.txt").read_text().splitlines():
        index, relative = line.split(maxsplit=1)
        if int(index) == image_id:
            return root / "images" / relative
    raise KeyError(image_id)
