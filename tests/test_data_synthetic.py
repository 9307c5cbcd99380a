"""Synthetic CUB generator: layout, determinism, exact annotations."""

import tarfile

import numpy as np
import pytest
from fixtures_data import SMALL, parse_text_tables, synthetic_root, synthetic_tgz  # noqa: F401
from PIL import Image

from ivpt.data.synthetic import (
    CUB_PART_NAMES,
    PART_MAP_LABELS,
    class_attributes,
    generate_cub,
    main,
    render_bird,
    rerender_bird,
)

# Drawn part expected under each keypoint (None: somewhere on the bird; body-region points sit
# on the body, the wing or the head depending on the pose).
EXPECTED_PART = {
    "beak": "beak", "left eye": "eye", "right eye": "eye", "left leg": "leg", "right leg": "leg",
    "left wing": "wing", "right wing": "wing", "tail": "tail", "crown": "head", "forehead": "head",
}  # fmt: skip


def test_layout_and_counts(synthetic_root):
    root = synthetic_root
    for name in ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt",
                 "bounding_boxes.txt", "parts/parts.txt", "parts/part_locs.txt"):  # fmt: skip
        assert (root / name).is_file(), name
    tables = parse_text_tables(root)
    total = SMALL["classes"] * SMALL["images_per_class"]
    assert sorted(tables["images"]) == list(range(1, total + 1))
    assert len(tables["classes"]) == SMALL["classes"]
    parts = [line.split(maxsplit=1)[1] for line in (root / "parts/parts.txt").read_text().splitlines()]
    assert parts == list(CUB_PART_NAMES)
    for image_id, relative in tables["images"].items():
        class_dir = relative.split("/")[0]
        assert class_dir == tables["classes"][tables["labels"][image_id]]
        assert (root / "images" / relative).is_file()
        mask = root / "segmentations" / relative.replace(".jpg", ".png")
        assert mask.is_file()
        assert len(tables["keypoints"][image_id]) == 15
    # about half train, half test per class
    for label in range(SMALL["classes"]):
        flags = [tables["train"][i] for i in tables["images"] if tables["labels"][i] == label]
        assert sum(flags) == (len(flags) + 1) // 2


def test_boxes_and_masks_are_exact(synthetic_root):
    tables = parse_text_tables(synthetic_root)
    for image_id, relative in list(tables["images"].items())[:8]:
        mask = np.asarray(Image.open(synthetic_root / "segmentations" / relative.replace(".jpg", ".png")))
        assert set(np.unique(mask)) <= {0, 255}
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        expected = [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
        assert tables["boxes"][image_id] == [float(v) for v in expected]
        image = Image.open(synthetic_root / "images" / relative)
        assert image.mode == "RGB" and image.size == (SMALL["size"], SMALL["size"])


def test_rerender_bird_draws_the_written_image_again_with_its_part_map(synthetic_root):
    tables = parse_text_tables(synthetic_root)
    for image_id in (1, 7, 24):  # first, a middle class's first image, last
        bird = rerender_bird(image_id, **SMALL)
        relative = tables["images"][image_id]
        mask = np.asarray(Image.open(synthetic_root / "segmentations" / relative.replace(".jpg", ".png")))
        assert np.array_equal(np.asarray(bird.mask), mask)  # the same pixels, and the part map under them
        assert set(np.unique(np.asarray(bird.part_map))) <= {0, *PART_MAP_LABELS.values()}
        assert tables["boxes"][image_id] == [float(v) for v in bird.bbox]
        written = np.array([row[1:3] for row in tables["keypoints"][image_id]], dtype=float)
        assert np.allclose(written, np.round(bird.keypoints[:, :2], 1))
    with pytest.raises(ValueError, match=r"image_id 25 is not in 1 \.\. 24"):
        rerender_bird(25, **SMALL)


@pytest.mark.parametrize("index", range(12))
def test_keypoints_lie_on_their_part(index):
    attributes = class_attributes(5, seed=0)
    bird = render_bird(attributes[index % 5], 128, np.random.default_rng([7, index]))
    part_map = np.asarray(bird.part_map)
    hidden = 0
    for name, (x, y, visible) in zip(CUB_PART_NAMES, bird.keypoints):
        if not visible:
            assert x == 0 and y == 0
            hidden += 1
            continue
        label = part_map[int(round(y)), int(round(x))]
        assert label != 0, name
        if name in EXPECTED_PART:
            assert label == PART_MAP_LABELS[EXPECTED_PART[name]], name
    assert hidden == 2  # the far eye and the far wing
    eyes = {n: v for n, (_, _, v) in zip(CUB_PART_NAMES, bird.keypoints) if n.endswith("eye")}
    assert sorted(eyes.values()) == [0.0, 1.0]


def test_classes_differ_in_several_parts():
    attributes = class_attributes(20, seed=0)
    assert len({a.name for a in attributes}) == 20
    tuples = [(a.body, a.head, a.wing, a.pattern, a.tail) for a in attributes]
    for i in range(20):
        for j in range(i + 1, 20):
            assert sum(a != b for a, b in zip(tuples[i], tuples[j])) >= 3


def test_deterministic_by_seed(tmp_path, synthetic_root):
    again = generate_cub(tmp_path / "again", **SMALL)
    for name in ("images.txt", "bounding_boxes.txt", "parts/part_locs.txt", "train_test_split.txt"):
        assert (again / name).read_bytes() == (synthetic_root / name).read_bytes()
    first = sorted((synthetic_root / "images").rglob("*.jpg"))[3]
    assert (again / first.relative_to(synthetic_root)).read_bytes() == first.read_bytes()
    other = generate_cub(tmp_path / "other", **{**SMALL, "seed": 1})
    assert (other / "parts/part_locs.txt").read_bytes() != (synthetic_root / "parts/part_locs.txt").read_bytes()


def test_tgz_holds_the_official_downloads(synthetic_tgz):
    assert synthetic_tgz.name == "CUB_200_2011.tgz"
    with tarfile.open(synthetic_tgz) as tar:
        names = tar.getnames()
    assert "CUB_200_2011/images.txt" in names and not any("segmentations" in n for n in names)
    with tarfile.open(synthetic_tgz.parent / "segmentations.tgz") as tar:
        assert all(n.startswith("segmentations") for n in tar.getnames())


def test_command_line(tmp_path, capsys):
    main(["--out", str(tmp_path), "--classes", "2", "--images-per-class", "2", "--size", "64"])
    assert "wrote 4 images" in capsys.readouterr().out
    assert len(list((tmp_path / "CUB_200_2011" / "images").rglob("*.jpg"))) == 4


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="classes"):
        generate_cub(tmp_path, classes=0)
    with pytest.raises(ValueError, match="images_per_class"):
        generate_cub(tmp_path, images_per_class=0)
