"""evaluate_interpretability.py end to end on a generated CUB dataset with a tiny model."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ivpt import IvptForImageClassification
from ivpt.data import generate_cub
from ivpt.evaluation import EvaluationSettings, evaluate_interpretability, parse_metrics
from ivpt.image_processing import make_image_processor
from ivpt.report import flatten_metrics, markdown_table

from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cub_dir(tmp_path_factory):
    return generate_cub(tmp_path_factory.mktemp("cub"), classes=4, images_per_class=6, size=96, seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = IvptForImageClassification(tiny_config(num_labels=4))
    path = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(path)
    make_image_processor(64).save_pretrained(path)
    return path


def test_parse_metrics():
    assert parse_metrics("all") == ["accuracy", "consistency", "stability", "nmi_ari", "kpr", "fg_iou", "part_nmi_ari"]
    assert parse_metrics("nmi_ari, kpr") == ["nmi_ari", "kpr"]
    with pytest.raises(ValueError, match="--metrics"):
        parse_metrics("accuracy,bogus")


def test_cli_every_metric(tmp_path, cub_dir, checkpoint):
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, str(REPO / "evaluate_interpretability.py"), "--model_name_or_path", str(checkpoint),
         "--data_dir", str(cub_dir), "--metrics", "all", "--output_dir", str(out), "--batch_size", "5",
         "--cache_dir", str(tmp_path / "cache"), "--device", "cpu"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    values = metrics["metrics"]
    for key in ("consistency", "stability", "nmi", "ari", "kpr", "foreground_iou", "background_iou"):
        assert math.isfinite(values[key]), key
    assert 0 <= values["consistency"] <= 100 and 0 <= values["stability"] <= 100
    assert values["accuracy"]["num_images"] == 12 and values["consistency_num_images"] == 12
    assert metrics["protocol"]["half_size"] == 36 and metrics["protocol"]["stage_index"] == -3
    assert values["parts_input"] == "unnormalised" and metrics["protocol"]["normalise_parts_input"] is False
    assert values["consistency_num_maps"] == 12 * 5  # 12 images x 5 foreground prototypes of stage -3 (n_pro 6,5,4)
    assert 0 <= values["near_constant_maps"] <= 60 and 0 <= values["near_constant_maps_perturbed"] <= 60
    assert len(metrics["model_fingerprint"]) == 16 and len(metrics["data_fingerprint"]) == 16
    report = (out / "report.md").read_text()
    assert "consistency" in report and "75.30" in report  # next to the published IVPT number
    assert "| parts-metric input | unnormalised | – | – |" in report and "**unnormalised** input" in report
    assert list((out / "figures" / "results_all").glob("*.png"))
    assert sorted(p.name for p in (out / "figures" / "hierarchy").glob("*.png")) == [f"hierarchy_{i}.png" for i in range(4)]
    assert metrics["skipped"] == {"part_nmi_ari": "the evaluated split has no part_mask column"}
    assert "`part_nmi_ari` skipped: the evaluated split has no part_mask column" in report


def test_stability_is_seeded_and_noise_free_stability_is_100(tmp_path, cub_dir):
    torch.manual_seed(0)
    model = IvptForImageClassification(tiny_config(num_labels=4))
    cache = str(tmp_path / "cache")
    run = lambda **kw: evaluate_interpretability(  # noqa: E731
        model, str(cub_dir), ["consistency", "stability"], EvaluationSettings(batch_size=6, **kw), device="cpu",
        cache_dir=cache)["metrics"]
    first, second = run(seed=3), run(seed=3)
    assert first == second
    assert run(noise_std=0.0)["stability"] == 100.0


def test_report_table_places_published_numbers():
    table = markdown_table({"trained": {"consistency": 50.0, "accuracy": {"top1_micro": 80.0}}})
    assert "| consistency % ↑ | 50.00 | 75.30 | – |" in table
    assert "| top-1 accuracy (micro) % ↑ | 80.00 | 90.80 | 88.72 |" in table
    assert "parts-metric input" not in table  # no parts metrics, no variant row


def test_report_table_names_the_parts_input_variant():
    table = markdown_table({"a": {"nmi": 10.0, "parts_input": "unnormalised"},
                            "b": {"nmi": 20.0, "parts_input": "ImageNet-normalised"}, "c": {"consistency": 1.0},
                            "d": {"nmi": 5.0}}, published={})
    assert "| parts-metric input | unnormalised | ImageNet-normalised | – | – |" in table
    assert "parts-metric input" not in markdown_table({"a": {"nmi": 10.0}}, published={})  # nothing recorded


@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
                    reason="accelerate CLI not installed next to the interpreter")
def test_two_cpu_processes_each_evaluate_half_and_merge_to_the_single_process_numbers(tmp_path, cub_dir, checkpoint):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (a gloo group): each process evaluates 6 of the 12 test
    images in every pass (and 6 of the 12 train images of the KPR fit), and the merged metrics equal the 1-process
    run's."""
    common = ["--model_name_or_path", str(checkpoint), "--data_dir", str(cub_dir), "--metrics", "all",
              "--batch_size", "4", "--cache_dir", str(tmp_path / "cache"), "--figures", "none", "--device", "cpu"]
    script = str(REPO / "evaluate_interpretability.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, script, *common, "--output_dir", str(tmp_path / "one")],
                            capture_output=True, text=True, timeout=600, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    double = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
         "no", "--dynamo_backend", "no", "--main_process_port", "29531", script, *common,
         "--output_dir", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert one["processes"] == {"classification": [12], "box_crop": [12], "parts": [12]}
    assert two["processes"] == {"classification": [6, 6], "box_crop": [6, 6], "parts": [6, 6]}
    assert two["metrics"]["accuracy"]["num_images"] == 12 and two["metrics"]["consistency_num_images"] == 12
    assert flatten_metrics(two["metrics"]) == pytest.approx(flatten_metrics(one["metrics"]))
    assert set(flatten_metrics(one["metrics"])) >= {"consistency", "stability", "nmi", "ari", "kpr", "foreground_iou"}
