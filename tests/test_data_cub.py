"""CUB builder and loader: parity with the text files, docs/method.md#box-cropping crops, archives, cache, robustness."""

import io
import logging
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
from fixtures_data import (  # noqa: F401
    SMALL,
    cub_copy,
    delete_line,
    image_path,
    parse_text_tables,
    rewrite_line,
    synthetic_root,
    synthetic_tgz,
)
from PIL import Image

from ivpt.data import CubFormatError, crop_box_from_text, load_cub
from ivpt.data.cub import main, read_annotations, resolve_sources


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cub_cache")


@pytest.fixture(scope="module")
def full(synthetic_root, cache):
    return load_cub(synthetic_root, "full", cache_dir=cache)


@pytest.fixture(scope="module")
def cropped(synthetic_root, cache):
    return load_cub(synthetic_root, "cropped", cache_dir=cache)


def _raw(dataset: datasets.Dataset) -> list[dict]:
    """Rows with undecoded images / masks (bytes), for exact comparisons."""
    for column in ("image", "mask"):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset.to_list()


# ---------------------------------------------------------------------------------------------
# Parity with the text files
# ---------------------------------------------------------------------------------------------


def test_full_matches_direct_parse(full, synthetic_root):
    tables = parse_text_tables(synthetic_root)
    assert set(full) == {"train", "test"}
    assert full["train"].features["label"].names == tables["classes"]
    for split, is_train in (("train", True), ("test", False)):
        expected_ids = [i for i in sorted(tables["images"]) if tables["train"][i] == is_train]
        rows = full[split].remove_columns(["image", "mask"]).to_list()
        assert [r["image_id"] for r in rows] == expected_ids
        for row in rows:
            image_id = row["image_id"]
            assert row["label"] == tables["labels"][image_id]
            assert row["file_name"] == tables["images"][image_id]
            assert row["bbox"] == tables["boxes"][image_id]
            keypoints = [[k["part_id"], k["x"], k["y"], k["visible"]] for k in row["keypoints"]]
            np.testing.assert_allclose(keypoints, tables["keypoints"][image_id], atol=1e-4)


def test_full_stores_original_bytes_and_masks(full, synthetic_root):
    rows = _raw(full["test"].select(range(3)))
    for row in rows:
        assert row["image"]["bytes"] == (synthetic_root / "images" / row["file_name"]).read_bytes()
        mask_file = synthetic_root / "segmentations" / row["file_name"].replace(".jpg", ".png")
        expected = np.asarray(Image.open(mask_file))
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(row["mask"]["bytes"]))), expected)
    example = full["train"][0]
    assert example["image"].mode == "RGB" and example["mask"].mode == "L"


# ---------------------------------------------------------------------------------------------
# docs/method.md#box-cropping crop arithmetic
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, expected",
    [
        (("60.0", "27.9", "325.5", "304.99"), (60, 27, 385, 331)),
        (("12", "7", "1.5", "3"), (12, 7, 13, 10)),
        (("0.99", "0.5", "10.999", "20.0"), (0, 0, 10, 20)),
        (("59.99999999999999999", "1.0", "2.0", "3.0"), (59, 1, 61, 4)),  # text cut, not float rounding
        (("-3.7", "4.2", "10.0", "10.0"), (-3, 4, 7, 14)),  # cutting the text truncates towards 0
    ],
)
def test_crop_box_from_text(fields, expected):
    assert crop_box_from_text(*fields) == expected


def test_cropped_uses_the_integer_box(cub_copy, tmp_path):
    # Fractional boxes: crop must use x1 = ⌊x⌋, y1 = ⌊y⌋, x2 = x1 + ⌊w⌋, y2 = y1 + ⌊h⌋.
    rewrite_line(cub_copy / "bounding_boxes.txt", 1, "1 10.7 20.2 30.9 40.99")
    rewrite_line(cub_copy / "bounding_boxes.txt", 2, "2 0.5 1.5 50.5 60.5")
    full = load_cub(cub_copy, "full", cache_dir=tmp_path / "cache")
    crop = load_cub(cub_copy, "cropped", cache_dir=tmp_path / "cache")
    for image_id, box in ((1, (10, 20, 40, 60)), (2, (0, 1, 50, 61))):
        f, c = _row(full, image_id), _row(crop, image_id)
        x1, y1, x2, y2 = box
        assert c["crop_box"] == list(box)
        assert c["image"].size == (x2 - x1, y2 - y1)
        # masks are lossless: the crop is exactly the slice [y1:y2, x1:x2]
        np.testing.assert_array_equal(np.asarray(c["mask"]), np.asarray(f["mask"])[y1:y2, x1:x2])
        # the image is re-encoded (JPEG q95): close to the slice
        difference = np.abs(np.asarray(c["image"], float) - np.asarray(f["image"], float)[y1:y2, x1:x2])
        assert difference.mean() < 4.0
        expected_box = [f["bbox"][0] - x1, f["bbox"][1] - y1, f["bbox"][2], f["bbox"][3]]
        assert c["bbox"] == pytest.approx(expected_box, abs=1e-4)
        for kf, kc in zip(f["keypoints"], c["keypoints"]):
            assert kc["visible"] == kf["visible"]
            if kf["visible"]:
                assert (kc["x"], kc["y"]) == pytest.approx((kf["x"] - x1, kf["y"] - y1), abs=1e-4)
            else:  # hidden keypoints (visible=0, x=y=0) are not moved
                assert (kc["x"], kc["y"]) == (0.0, 0.0)


def test_cropped_keypoints_on_mask(cropped):
    for row in cropped["test"].select(range(6)):
        mask = np.asarray(row["mask"])
        assert row["image"].size == (mask.shape[1], mask.shape[0])
        for kp in row["keypoints"]:
            if kp["visible"]:
                x, y = int(round(kp["x"])), int(round(kp["y"]))
                assert mask[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2].max() == 255


# ---------------------------------------------------------------------------------------------
# Archives and cache
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["full", "cropped"])
def test_tgz_and_directory_are_identical(synthetic_root, synthetic_tgz, cache, config):
    from_dir = load_cub(synthetic_root, config, cache_dir=cache)
    from_tgz = load_cub(synthetic_tgz, config, cache_dir=cache)
    assert from_dir["train"].features == from_tgz["train"].features
    for split in ("train", "test"):
        assert _raw(from_dir[split]) == _raw(from_tgz[split])
    assert not any(p.name.startswith("tmp_cub_extract") for p in cache.iterdir())  # extraction cleaned up


def test_parent_folder_and_archive_folder_resolve(synthetic_root, synthetic_tgz):
    assert resolve_sources(synthetic_root.parent).root == synthetic_root.resolve()
    sources = resolve_sources(synthetic_tgz.parent)
    assert sources.archive == synthetic_tgz.resolve()
    assert sources.segmentations.name == "segmentations.tgz"
    assert resolve_sources(synthetic_root, segmentations=False).segmentations is None


def test_without_segmentations_mask_is_none(synthetic_root, tmp_path):
    dataset = load_cub(synthetic_root, "full", cache_dir=tmp_path, segmentations=False)
    assert dataset["train"][0]["mask"] is None


def test_cache_is_reused_and_invalidated(cub_copy, tmp_path):
    cache = tmp_path / "cache"
    first = load_cub(cub_copy, "full", cache_dir=cache)
    again = load_cub(cub_copy, "full", cache_dir=cache)
    assert again["train"].cache_files == first["train"].cache_files  # served from cache
    # change one source file (a box): a new cache entry with the new value
    line = (cub_copy / "bounding_boxes.txt").read_text().splitlines()[0]
    rewrite_line(cub_copy / "bounding_boxes.txt", 1, line.split()[0] + " 1.0 2.0 30.0 40.0")
    changed = load_cub(cub_copy, "full", cache_dir=cache)
    assert changed["train"].cache_files != first["train"].cache_files
    row = changed["train"][0] if changed["train"][0]["image_id"] == 1 else changed["test"][0]
    assert row["image_id"] == 1 and row["bbox"] == [1.0, 2.0, 30.0, 40.0]
    # an image rewritten with the same size but a new mtime also invalidates
    path = image_path(cub_copy, 5)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = load_cub(cub_copy, "full", cache_dir=cache)
    assert touched["train"].cache_files != changed["train"].cache_files


# ---------------------------------------------------------------------------------------------
# Robustness
# ---------------------------------------------------------------------------------------------


def _replace_image(root: Path, image_id: int, image: Image.Image, fmt: str) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    image_path(root, image_id).write_bytes(buffer.getvalue())  # keeps the .jpg name


def _row(dataset: datasets.DatasetDict, image_id: int) -> dict:
    for split in dataset.values():
        for row in split:
            if row["image_id"] == image_id:
                return row
    raise KeyError(image_id)


def test_grayscale_cmyk_png_content_become_rgb(cub_copy, tmp_path, caplog):
    source = Image.open(image_path(cub_copy, 1)).convert("RGB")
    _replace_image(cub_copy, 1, source.convert("L"), "JPEG")
    _replace_image(cub_copy, 2, source.convert("CMYK"), "JPEG")
    _replace_image(cub_copy, 3, source, "PNG")
    with caplog.at_level(logging.INFO, logger="ivpt.data.cub"):
        dataset = load_cub(cub_copy, "full", cache_dir=tmp_path)
    for image_id in (1, 2, 3):
        image = _row(dataset, image_id)["image"]
        assert image.mode == "RGB" and image.size == source.size
    assert "converted to RGB" in caplog.text
    png = np.asarray(_row(dataset, 3)["image"], dtype=float)
    assert np.abs(png - np.asarray(source, dtype=float)).max() == 0  # lossless for PNG content
    cropped = load_cub(cub_copy, "cropped", cache_dir=tmp_path)
    assert _row(cropped, 2)["image"].mode == "RGB"


def _assert_clean_cache(cache: Path) -> None:
    """No prepared dataset and no half-written folder left behind by a failed build."""
    leftovers = [p for p in cache.rglob("*") if p.name.endswith(".incomplete") or p.name == "dataset_info.json"]
    assert leftovers == []
    assert not any(p.name.startswith("tmp_cub_extract") for p in cache.iterdir())


def test_missing_image_names_file_and_line(cub_copy, tmp_path):
    path = image_path(cub_copy, 7)
    path.unlink()
    with pytest.raises(CubFormatError, match=rf"{path.name}.*images.txt line 7.*not found"):
        load_cub(cub_copy, "full", cache_dir=tmp_path)
    _assert_clean_cache(tmp_path)


def test_truncated_jpeg_fails_cleanly_then_recovers(cub_copy, tmp_path):
    path = image_path(cub_copy, 9)
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    with pytest.raises(CubFormatError, match=rf"{path.name}.*images.txt line 9.*cannot decode"):
        load_cub(cub_copy, "full", cache_dir=tmp_path)
    _assert_clean_cache(tmp_path)
    path.write_bytes(original)
    assert load_cub(cub_copy, "full", cache_dir=tmp_path)["train"].num_rows == 12


@pytest.mark.parametrize(
    "file, line, text, message",
    [
        ("bounding_boxes.txt", 3, "3 1.0 2.0 3.0", r"bounding_boxes.txt, line 3: expected 5 fields, got 4"),
        ("bounding_boxes.txt", 4, "4 1.0 two 3.0 4.0", r"bounding_boxes.txt, line 4: y must be a number"),
        ("image_class_labels.txt", 2, "2 x", r"image_class_labels.txt, line 2: the class id must be an integer"),
        ("image_class_labels.txt", 2, "2 99", r"image_class_labels.txt, line 2: class id 99 is not in classes.txt"),
        ("train_test_split.txt", 5, "5 2", r"train_test_split.txt, line 5: is_train must be 0 or 1"),
        ("parts/part_locs.txt", 16, "2 1 3.0 4.0 7", r"part_locs.txt, line 16: visible must be 0 or 1"),
        ("parts/part_locs.txt", 17, "2 2 3.0", r"part_locs.txt, line 17: expected 5 fields, got 3"),
        ("images.txt", 6, "6", r"images.txt, line 6: expected 2 fields, got 1"),
        ("images.txt", 6, "5 foo.jpg", r"images.txt, line 6: id 5 already defined on line 5"),
        ("bounding_boxes.txt", 8, "99 1.0 2.0 3.0 4.0", r"bounding_boxes.txt, line 8: image id 99 is not in images.txt"),
        ("bounding_boxes.txt", 8, "8 1.0 2.0 0.0 4.0", r"bounding_boxes.txt, line 8: box width and height must be > 0"),
    ],
)
def test_malformed_lines(cub_copy, tmp_path, file, line, text, message):
    rewrite_line(cub_copy / file, line, text)
    with pytest.raises(CubFormatError, match=message):
        read_annotations(cub_copy)
    with pytest.raises(CubFormatError, match=message):
        load_cub(cub_copy, "full", cache_dir=tmp_path)
    _assert_clean_cache(tmp_path)


def test_id_missing_from_one_file(cub_copy):
    delete_line(cub_copy / "train_test_split.txt", 10)
    with pytest.raises(CubFormatError, match=r"images.txt, line 10: image id 10 is missing from train_test_split.txt"):
        read_annotations(cub_copy)


def test_missing_part_row(cub_copy):
    delete_line(cub_copy / "parts/part_locs.txt", 20)  # image 2, part 5
    with pytest.raises(CubFormatError, match=r"part_locs.txt: image id 2 .* no row for part id\(s\) \[5\]"):
        read_annotations(cub_copy)


def test_missing_annotation_file(cub_copy):
    (cub_copy / "bounding_boxes.txt").unlink()
    with pytest.raises(CubFormatError, match="bounding_boxes.txt: file not found"):
        read_annotations(cub_copy)


def test_box_partly_outside_is_clamped_and_logged(cub_copy, tmp_path, caplog):
    size = SMALL["size"]
    rewrite_line(cub_copy / "bounding_boxes.txt", 1, f"1 50.0 40.0 {size}.0 20.0")  # x2 = 50 + 96 > 96
    with caplog.at_level(logging.WARNING, logger="ivpt.data.cub"):
        cropped = load_cub(cub_copy, "cropped", cache_dir=tmp_path)
    row = _row(cropped, 1)
    assert row["crop_box"] == [50, 40, 50 + size, 60]
    assert row["image"].size == (size - 50, 20)
    assert "extends beyond" in caplog.text and "bounding_boxes.txt" in caplog.text


def test_hidden_keypoints_kept_as_is(cub_copy, tmp_path):
    tables = parse_text_tables(cub_copy)
    hidden = [(i, kp) for i, rows in tables["keypoints"].items() for kp in rows if kp[3] == 0]
    assert hidden and all(kp[1] == kp[2] == 0.0 for _, kp in hidden)  # CUB convention in the source
    cropped = load_cub(cub_copy, "cropped", cache_dir=tmp_path)
    for split in cropped.values():
        for row in split.select_columns(["keypoints"]):
            for kp in row["keypoints"]:
                if not kp["visible"]:
                    assert (kp["x"], kp["y"]) == (0.0, 0.0)


def test_visible_keypoint_outside_image_is_logged(cub_copy, tmp_path, caplog):
    rewrite_line(cub_copy / "parts/part_locs.txt", 1, "1 1 500.0 3.0 1")
    with caplog.at_level(logging.WARNING, logger="ivpt.data.cub"):
        dataset = load_cub(cub_copy, "full", cache_dir=tmp_path)
    assert "outside the" in caplog.text
    assert _row(dataset, 1)["keypoints"][0]["x"] == 500.0


def test_unknown_config():
    with pytest.raises(ValueError, match="Expected config"):
        load_cub(".", "nope")


def test_no_data_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CUB-200-2011 data"):
        load_cub(tmp_path)


# ---------------------------------------------------------------------------------------------
# Export command line
# ---------------------------------------------------------------------------------------------


def test_export_cropped_folders(synthetic_root, cache, tmp_path, cropped, capsys):
    out = tmp_path / "cub200_cropped"
    main(["--data_dir", str(synthetic_root), "--config", "cropped", "--cache_dir", str(cache), "--export", str(out)])
    tables = parse_text_tables(synthetic_root)
    train_files = sorted(p.relative_to(out / "train_cropped").as_posix() for p in (out / "train_cropped").rglob("*.jpg"))
    assert train_files == sorted(tables["images"][i] for i in tables["images"] if tables["train"][i])
    assert len(list((out / "test_cropped").rglob("*.jpg"))) == 12
    for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt"):
        assert (out / name).read_bytes() == (synthetic_root / name).read_bytes()
    first = cropped["train"][0]
    exported = Image.open(out / "train_cropped" / first["file_name"])
    assert exported.size == first["image"].size
