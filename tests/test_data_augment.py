"""Offline augmentation (docs/method.md#offline-augmentation): keypoints and masks follow the image; the augmented config."""

import random

import datasets
import numpy as np
import pytest
from PIL import Image

from ivpt.data import load_cub
from ivpt.data.augment import AUGMENTATIONS, augment_sample, augmentation_rng, offline_augmentations
from ivpt.data.synthetic import CUB_PART_NAMES, class_attributes, generate_cub, render_bird
from ivpt.data.transforms import from_tv_sample, to_tv_sample


def _cropped_bird(index: int, size: int = 128):
    """A rendered bird cropped to its box, as the cropped config stores it, with its part map."""
    bird = render_bird(class_attributes(5, seed=0)[index % 5], size, np.random.default_rng([11, index]))
    x, y, w, h = bird.bbox
    keypoints = [
        (part_id, kx - x, ky - y, int(v)) if v else (part_id, 0.0, 0.0, 0)
        for part_id, (kx, ky, v) in enumerate(bird.keypoints, start=1)
    ]
    crop = (x, y, x + w, y + h)
    return bird.image.crop(crop), bird.part_map.crop(crop), keypoints, [0.0, 0.0, float(w), float(h)]


def _labels_at(part_map: np.ndarray, keypoints) -> list:
    return [part_map[int(round(y)), int(round(x))] if v else None for _, x, y, v in keypoints]


def _near(part_map: np.ndarray, x: float, y: float, radius: int = 1) -> set:
    xi, yi = int(round(x)), int(round(y))
    window = part_map[max(yi - radius, 0) : yi + radius + 1, max(xi - radius, 0) : xi + radius + 1]
    return set(np.unique(window).tolist())


@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
def test_keypoints_stay_on_their_part(augmentation):
    """The generator knows which drawn part each keypoint sits on; after the augmentation (part map
    transformed like a mask, nearest) the moved keypoint must still be on that part."""
    checked = 0
    for index in range(4):
        image, part_map, keypoints, bbox = _cropped_bird(index)
        expected = _labels_at(np.asarray(part_map), keypoints)
        for pass_index in range(6):
            sample, rows = to_tv_sample(image, keypoints, bbox)
            sample["mask"] = part_map
            sample, flipped = augment_sample(sample, augmentation, augmentation_rng(0, index, augmentation, pass_index))
            moved_map = np.asarray(sample.pop("mask"))
            out = from_tv_sample(sample, rows)
            assert sample["image"].size == image.size and moved_map.shape[::-1] == image.size
            for name, row, label in zip(CUB_PART_NAMES, out["keypoints"].tolist(), expected):
                if label is None:
                    assert row[3] == 0 and row[1:3] == [0.0, 0.0], name  # hidden stays hidden at (0, 0)
                elif row[3]:
                    assert label in _near(moved_map, row[1], row[2]), (name, augmentation, pass_index, flipped)
                    checked += 1
    assert checked > 4 * 6 * 10  # most keypoints stay inside the image


def test_flip_happens_about_half_the_time():
    flips = []
    image, part_map, keypoints, bbox = _cropped_bird(0, size=64)
    for pass_index in range(40):
        sample, _ = to_tv_sample(image, keypoints, bbox)
        _, flipped = augment_sample(sample, "skew", augmentation_rng(3, 1, "skew", pass_index))
        flips.append(flipped)
    assert 8 < sum(flips) < 32


def test_angles_follow_augmentor_ranges():
    # rotation: integers in [-15, 15]; shear: integers in [-10, 11] (Augmentor's +1 quirk)
    from ivpt.data.augment import _augmentor_angle

    angles = {_augmentor_angle(random.Random(i), 15, 15) for i in range(400)}
    assert angles <= set(range(-15, 16)) and {-15, 0, 15} <= angles


def test_offline_augmentations_count_and_determinism():
    image, part_map, keypoints, bbox = _cropped_bird(2, size=64)
    first = list(offline_augmentations(image, keypoints, bbox, part_map, seed=5, image_id=3, passes=2))
    again = list(offline_augmentations(image, keypoints, bbox, part_map, seed=5, image_id=3, passes=2))
    other = list(offline_augmentations(image, keypoints, bbox, part_map, seed=6, image_id=3, passes=2))
    assert len(first) == 3 * 2
    assert [o["augmentation"] for o in first] == ["rotate", "rotate", "skew", "skew", "shear", "shear"]
    for a, b in zip(first, again):
        assert a["image"].tobytes() == b["image"].tobytes() and a["flipped"] == b["flipped"]
    assert any(a["image"].tobytes() != b["image"].tobytes() for a, b in zip(first, other))


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return generate_cub(tmp_path_factory.mktemp("tiny"), classes=2, images_per_class=2, size=80, seed=3)


def test_cropped_augmented_config(tiny_root, tmp_path):
    dataset = load_cub(tiny_root, "cropped_augmented", cache_dir=tmp_path)
    cropped = load_cub(tiny_root, "cropped", cache_dir=tmp_path)
    assert set(dataset) == {"train"}
    train = dataset["train"]
    assert train.num_rows == 30 * cropped["train"].num_rows
    assert train.features["augmentation"].names == list(AUGMENTATIONS)
    sizes = {r["image_id"]: r["image"].size for r in cropped["train"]}
    counts = {}
    for row in train:
        counts[row["image_id"]] = counts.get(row["image_id"], 0) + 1
        assert row["image"].size == sizes[row["image_id"]] and row["image"].mode == "RGB"
        mask = np.asarray(row["mask"])
        for kp in row["keypoints"]:
            if kp["visible"]:
                assert 255 in _near(mask, kp["x"], kp["y"], radius=2), row["file_name"]  # 2 px: thin legs at 80 px
    assert set(counts.values()) == {30}
    assert len(set(train["file_name"])) == train.num_rows


def test_cropped_augmented_is_deterministic(tiny_root, tmp_path):
    a = load_cub(tiny_root, "cropped_augmented", cache_dir=tmp_path / "a", augmentation_passes=1)["train"]
    b = load_cub(tiny_root, "cropped_augmented", cache_dir=tmp_path / "b", augmentation_passes=1)["train"]
    c = load_cub(tiny_root, "cropped_augmented", cache_dir=tmp_path / "a", augmentation_passes=1, seed=1)["train"]
    raw = lambda d: d.cast_column("image", datasets.Image(decode=False))["image"]  # noqa: E731
    assert a.num_rows == 3 * 2
    assert raw(a) == raw(b)
    assert raw(a) != raw(c)


def test_mask_of_augmented_output_is_binary(tiny_root, tmp_path):
    row = load_cub(tiny_root, "cropped_augmented", cache_dir=tmp_path, augmentation_passes=1)["train"][1]
    assert set(np.unique(np.asarray(row["mask"]))) <= {0, 255}
    assert isinstance(row["image"], Image.Image)
