"""NABirds, Oxford Flowers-102 and PartImageNet builders on synthetic sources in the official layouts: every config
(folder and archive) loads, the contents match the annotation files, and each dataset trains a tiny model and feeds
every applicable metric end to end (a parquet folder and a save_to_disk folder too)."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import median_filter

from ivpt import IvptForImageClassification
from ivpt.data.loading import dataset_source_kind, load_any_dataset
from ivpt.data.official import LayoutFormatError
from ivpt.evaluation import EvaluationSettings, evaluate_dataset, from_dataset_dict
from ivpt.training.trainer import IvptTrainer, IvptTrainingArguments
from ivpt.training.data import SampleSeededTransform, build_transforms, prepare_splits

from conftest import tiny_config
from fixtures_layouts import (
    NABIRDS_CLASSES,
    NABIRDS_PARTS,
    PIN_WNIDS,
    generate_flowers,
    generate_nabirds,
    generate_partimagenet,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("layout_cache")


@pytest.fixture(scope="module")
def nabirds_dir(tmp_path_factory):
    return generate_nabirds(tmp_path_factory.mktemp("nabirds"))


@pytest.fixture(scope="module")
def flowers_dir(tmp_path_factory):
    return generate_flowers(tmp_path_factory.mktemp("flowers"))


@pytest.fixture(scope="module")
def pin_dir(tmp_path_factory):
    return generate_partimagenet(tmp_path_factory.mktemp("pin"))


def _same_rows(a: datasets.Dataset, b: datasets.Dataset, skip=("image",)):
    assert a.column_names == b.column_names and len(a) == len(b)
    columns = [c for c in a.column_names if c not in skip]
    assert a.select_columns(columns).to_list() == b.select_columns(columns).to_list()
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a["image"], b["image"]))


# ---------------------------------------------------------------------------------------------------------------------
# Contents
# ---------------------------------------------------------------------------------------------------------------------


def test_nabirds_matches_the_annotation_files(nabirds_dir, cache, tmp_path):
    assert dataset_source_kind(nabirds_dir.parent) == "nabirds"  # told apart from CUB by hierarchy.txt
    loaded = load_any_dataset(nabirds_dir.parent, cache_dir=cache)
    assert {k: len(v) for k, v in loaded.items()} == {"train": 6, "test": 6}
    test = loaded["test"]
    assert test.features["label"].names == [NABIRDS_CLASSES[c] for c in (295, 296, 297)]  # leaves, by class id
    assert len(test.features["keypoints"].feature) == 4 or test.features["keypoints"].length == len(NABIRDS_PARTS)
    lines = dict(line.split(maxsplit=1) for line in (nabirds_dir / "images.txt").read_text().splitlines())
    boxes = {u: [float(v) for v in rest.split()] for u, rest in
             (line.split(maxsplit=1) for line in (nabirds_dir / "bounding_boxes.txt").read_text().splitlines())}
    locs = {}
    for line in (nabirds_dir / "parts" / "part_locs.txt").read_text().splitlines():
        u, p, x, y, v = line.split()
        locs.setdefault(u, []).append([int(p), float(x), float(y), int(v)])
    for row in test:
        assert lines[row["image_uuid"]] == row["file_name"]
        assert row["bbox"] == boxes[row["image_uuid"]]
        assert [[k["part_id"], k["x"], k["y"], k["visible"]] for k in row["keypoints"]] == locs[row["image_uuid"]]
        assert test.features["label"].int2str(row["label"]) == NABIRDS_CLASSES[row["class_id"]]
    first = test[0]
    assert first["ancestors"] == (["Sparrows", "Perching Birds", "Birds"] if first["class_id"] != 297
                                  else ["Ducks", "Birds"])
    archive = generate_nabirds(tmp_path, tgz=True)
    from_archive = load_any_dataset(archive, cache_dir=cache)
    for split in loaded:
        _same_rows(from_archive[split], loaded[split])


def test_nabirds_errors_name_the_file_and_line(nabirds_dir, tmp_path, cache):
    import shutil

    broken = shutil.copytree(nabirds_dir, tmp_path / "nabirds")
    lines = (broken / "bounding_boxes.txt").read_text().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0] + " wide"
    (broken / "bounding_boxes.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(LayoutFormatError, match=r"bounding_boxes.txt, line 3: height must be a number"):
        load_any_dataset(broken, cache_dir=cache)
    (broken / "hierarchy.txt").write_text("1 0\n0 1\n")
    (broken / "bounding_boxes.txt").write_text((nabirds_dir / "bounding_boxes.txt").read_text())
    with pytest.raises(LayoutFormatError, match="hierarchy.txt: the hierarchy has a cycle"):
        load_any_dataset(broken, cache_dir=cache)


def test_flowers_official_splits_and_masks(flowers_dir, cache, tmp_path):
    assert dataset_source_kind(flowers_dir) == "flowers102"
    loaded = load_any_dataset(flowers_dir.parent, cache_dir=cache)
    assert {k: len(v) for k, v in loaded.items()} == {"train": 3, "validation": 3, "test": 3}
    assert loaded["train"]["image_id"] == [1, 2, 3] and loaded["test"]["image_id"] == [7, 8, 9]
    assert loaded["test"]["label"] == [0, 1, 2] and loaded["test"].features["label"].names == ["1", "2", "3"]
    mask = np.asarray(loaded["test"][0]["mask"])
    segmentation = np.asarray(Image.open(flowers_dir / "segmim" / "segmim_00007.jpg").convert("RGB")).astype(float)
    raw = ~(segmentation[..., 2] / (segmentation[..., 1] + segmentation[..., 0] + 1e-6) > 100)
    # PDiscoFormer: 5 x 5 median blur with replicated borders (OpenCV's medianBlur) = scipy's mode "nearest"
    expected = median_filter(raw.astype(np.uint8), size=5, mode="nearest").astype(bool)
    assert set(np.unique(mask)) == {0, 255} and 0.1 < raw.mean() < 0.9
    assert np.array_equal(mask > 0, expected)
    archive = generate_flowers(tmp_path, tgz=True)
    assert not (archive / "jpg").exists()
    from_archive = load_any_dataset(archive, cache_dir=cache)
    for split in loaded:
        _same_rows(from_archive[split], loaded[split], skip=("image", "mask"))


def test_partimagenet_part_masks_centroids_and_both_configs(pin_dir, cache, tmp_path):
    assert dataset_source_kind(pin_dir.parent) == "partimagenet"
    official = load_any_dataset(pin_dir.parent, cache_dir=cache)
    assert {k: len(v) for k, v in official.items()} == {"train": 3, "validation": 3, "test": 3}  # 1 of 4 dropped
    assert official["test"].features["label"].names == sorted(PIN_WNIDS)
    row = official["test"][0]
    parts = np.asarray(row["part_mask"])
    assert set(np.unique(parts)) == {0, 1, 2, 3, 4}  # background, head, body, foot (4-number polygon), tail
    assert np.array_equal(np.asarray(row["mask"]) > 0, parts > 0)
    for keypoint in row["keypoints"]:
        rows, columns = np.nonzero(parts == keypoint["part_id"] + 1)
        assert keypoint["visible"] == 1
        assert keypoint["x"] == pytest.approx(columns.mean() + 0.5) and keypoint["y"] == pytest.approx(rows.mean() + 0.5)
    assert official["test"][1]["keypoints"][2]["visible"] == 0  # no foot annotation
    rows, columns = np.nonzero(parts)
    assert row["bbox"] == [columns.min(), rows.min(), columns.max() - columns.min() + 1, rows.max() - rows.min() + 1]
    ood = load_any_dataset(pin_dir, "ood", cache_dir=cache)
    assert {k: len(v) for k, v in ood.items()} == {"train": 2, "test": 1}
    archive = generate_partimagenet(tmp_path, tgz=True)
    for config, reference in ((None, official), ("ood", ood)):
        from_archive = load_any_dataset(archive.parent, config, cache_dir=cache)
        for split in reference:
            _same_rows(from_archive[split], reference[split])


def test_partimagenet_overlaps_follow_the_coverage_count():
    from ivpt.data.partimagenet import rasterise_parts

    square = lambda x0, y0, x1, y1: [x0, y0, x1, y0, x1, y1, x0, y1]  # noqa: E731
    annotations = [
        {"id": 0, "category_id": 7, "segmentation": [square(0, 0, 5, 5)], "area": 25, "iscrowd": 0},
        {"id": 1, "category_id": 3, "segmentation": [square(3, 3, 8, 8)], "area": 25, "iscrowd": 0},
        {"id": 2, "category_id": 7, "segmentation": [square(4, 4, 6, 6)], "area": 4, "iscrowd": 0},
        {"id": 3, "category_id": 3, "segmentation": [square(0, 8, 9, 9)], "area": 0, "iscrowd": 0},  # ignored
    ]
    labels = rasterise_parts(annotations, [3, 7], 10, 10, "test")
    assert labels[1, 1] == 2 and labels[7, 7] == 1 and labels[9, 9] == 0
    assert labels[3, 3] == 1  # covered once by each: tie -> lowest category id (3 -> label 1)
    assert labels[4, 4] == 2  # covered twice by 7, once by 3
    assert labels[8, 0] == 0  # the zero-area annotation is ignored


def test_pixel_nmi_ari_from_contingency_matches_scikit_learn():
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from ivpt.evaluation.metrics.part_nmi_ari import contingency, nmi_ari_from_contingency

    torch.manual_seed(0)
    maps = torch.rand(3, 5, 4, 4)
    truth = torch.randint(0, 4, (3, 16, 16)).to(torch.uint8)
    table = contingency(maps, truth)
    predicted = torch.nn.functional.interpolate(maps, size=(16, 16), mode="bilinear").argmax(1).flatten().numpy()
    scores = nmi_ari_from_contingency(table.numpy())
    assert scores["nmi"] == pytest.approx(100 * normalized_mutual_info_score(truth.flatten().numpy(), predicted))
    assert scores["ari"] == pytest.approx(100 * adjusted_rand_score(truth.flatten().numpy(), predicted))
    assert nmi_ari_from_contingency(np.diag([5, 7]))["ari"] == pytest.approx(100.0)


# ---------------------------------------------------------------------------------------------------------------------
# End to end: training and every applicable metric
# ---------------------------------------------------------------------------------------------------------------------

EXPECTED = {
    "nabirds": ({"accuracy", "consistency", "stability", "nmi", "ari", "kpr"}, {"fg_iou", "part_nmi_ari"}),
    "flowers102": ({"accuracy", "foreground_iou", "background_iou"},
                   {"consistency", "stability", "nmi_ari", "kpr", "part_nmi_ari"}),
    "partimagenet": ({"accuracy", "consistency", "stability", "nmi", "ari", "kpr", "foreground_iou", "pixel_nmi",
                      "pixel_ari"}, set()),
}


def train_and_evaluate(splits: datasets.DatasetDict, tmp_path, source: str) -> dict:
    """Two optimizer steps of a tiny model on the train split through `IvptTrainer`, then every metric on test."""
    data = prepare_splits(splits, source, "train", "test")
    train_tf, _ = build_transforms(64)
    train = data.splits["train"].with_transform(SampleSeededTransform(train_tf, seed=42))
    torch.manual_seed(0)
    model = IvptForImageClassification(tiny_config(num_labels=data.num_labels,
                                                   id2label=dict(enumerate(data.label_names))))
    args = IvptTrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", disable_tqdm=True,
                                 save_strategy="no", per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                                 dataloader_num_workers=0, seed=42)
    trainer = IvptTrainer(model=model, args=args, train_dataset=train)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    return evaluate_dataset(model, from_dataset_dict(splits, name=source), "all", EvaluationSettings(batch_size=4),
                            device="cpu")


@pytest.mark.parametrize("layout, config", [("nabirds", None), ("flowers102", None), ("partimagenet", None),
                                            ("partimagenet", "ood")])
def test_each_layout_and_config_trains_and_feeds_every_applicable_metric(layout, config, nabirds_dir, flowers_dir,
                                                                          pin_dir, cache, tmp_path):
    folder = {"nabirds": nabirds_dir, "flowers102": flowers_dir, "partimagenet": pin_dir}[layout]
    splits = load_any_dataset(folder, config, cache_dir=cache)
    result = train_and_evaluate(splits, tmp_path, layout)
    present, skipped = EXPECTED[layout]
    flat = {k for k, v in result["metrics"].items() if not k.endswith("num_images")} | set(result["metrics"])
    assert present <= flat, present - flat
    assert set(result["skipped"]) == skipped
    for key in present - {"accuracy"}:
        assert math.isfinite(result["metrics"][key]), key
    assert result["metrics"]["accuracy"]["num_images"] == len(splits["test"])


def test_parquet_and_save_to_disk_folders_train_and_evaluate_like_the_builder(nabirds_dir, cache, tmp_path):
    built = load_any_dataset(nabirds_dir, cache_dir=cache)
    built.save_to_disk(str(tmp_path / "saved"))
    for name, split in built.items():
        split.to_parquet(str(tmp_path / "parquet" / "data" / f"{name}-00000-of-00001.parquet"))
    results = {}
    for source in ("saved", "parquet"):
        splits = load_any_dataset(tmp_path / source, cache_dir=tmp_path / "cache")
        assert splits["test"].features == built["test"].features
        results[source] = train_and_evaluate(splits, tmp_path / source, source)["metrics"]
    assert results["saved"] == results["parquet"]  # same rows, same seed: the same trained model and numbers
    assert {"consistency", "nmi", "kpr"} <= set(results["saved"])


def test_docs_command_evaluates_partimagenet_ood_with_every_metric_and_figures(pin_dir, tmp_path):
    """The command of docs/datasets.md, as a user runs it (tiny model, synthetic PartImageNet)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    torch.manual_seed(0)
    IvptForImageClassification(tiny_config(num_labels=3)).save_pretrained(tmp_path / "pin_model")
    out = tmp_path / "eval"
    command = [sys.executable, str(Path(__file__).resolve().parents[1] / "evaluate_interpretability.py"),
               "--model_name_or_path", str(tmp_path / "pin_model"), "--dataset_name", str(pin_dir),
               "--dataset_config_name", "ood", "--metrics", "all", "--output_dir", str(out),
               "--cache_dir", str(tmp_path / "cache"), "--device", "cpu", "--num_figure_images", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped"] == {} and metrics["processes"]["parts"] == [1]
    assert {"pixel_nmi", "pixel_ari", "kpr", "consistency", "foreground_iou"} <= set(metrics["metrics"])
    report = (out / "report.md").read_text()
    assert "pixel NMI % (part masks)" in report and "75.30" not in report  # no CUB paper numbers for PartImageNet
    assert [p.name for p in (out / "figures" / "hierarchy").iterdir()] == ["hierarchy_0.png"]
