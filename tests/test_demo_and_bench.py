"""The offline demo pipeline on a miniature recipe (caching included) and the GPU benchmark script's CPU mode."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ivpt.demo import COLOUR_PROBE

REPO = Path(__file__).resolve().parents[1]


def miniature_recipe(folder: Path, **demo) -> Path:
    recipe = yaml.safe_load((REPO / "ivpt" / "recipes" / "demo.yaml").read_text())
    recipe["demo"].update(demo)
    recipe["demo"].update(classes=3, images_per_class=4, data_image_size=64, pretrain_classes=3,
                          pretrain_images_per_class=4, pretrain_epochs=1, pretrain_batch_size=4)
    recipe.update(backbone_kwargs={"embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 8}, image_size=64,
                  n_pro=[6, 5, 4], num_train_epochs=1, per_device_train_batch_size=2, logging_steps=1)
    (folder / "mini.yaml").write_text(yaml.safe_dump(recipe))
    return folder / "mini.yaml"


def test_build_backbone_command_writes_the_file_the_demo_then_uses(tmp_path, monkeypatch):
    """`python -m ivpt.demo --build_backbone` on the miniature recipe naming a backbone_file, then the demo's choice of
    backbone: the built file while its stamp matches the recipe, a backbone pre-trained in place once it does not."""
    from ivpt import demo as demo_module

    recipe_path = miniature_recipe(tmp_path, backbone_file="demo_backbone.safetensors")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    command = [sys.executable, "-m", "ivpt.demo", "--build_backbone", "--recipe", str(recipe_path),
               "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    built = tmp_path / "demo_backbone.safetensors"
    assert "wrote demo_backbone.safetensors" in result.stdout and not list(tmp_path.glob(".*.tmp"))
    assert not (tmp_path / "out" / "ivpt").exists()  # it stops after the backbone
    demo, recipe = demo_module.load_recipe(recipe_path)
    assert demo_module.file_stamp(built) == demo_module.stamp_of(**demo_module.pretrain_settings(demo, recipe))
    assert demo_module.make_backbone(tmp_path / "out", demo, recipe, recipe_path) == built
    built_elsewhere = []
    monkeypatch.setattr(demo_module, "build_backbone",
                        lambda out, settings, target: built_elsewhere.append(settings) or {})
    demo["pretrain_epochs"] = 2  # the file no longer matches the recipe
    weights = demo_module.make_backbone(tmp_path / "out", demo, recipe, recipe_path)
    assert weights == tmp_path / "out" / "backbone" / "backbone.safetensors" and built_elsewhere[0]["epochs"] == 2


def test_demo_recipe_errors_name_the_file_and_keys(tmp_path):
    from ivpt.demo import load_recipe

    recipe = yaml.safe_load((REPO / "ivpt" / "recipes" / "demo.yaml").read_text())
    del recipe["demo"]["pretrain_dense_objective"]
    recipe["demo"]["pretrain_steps"] = 3
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match=r"bad.yaml: the demo section has unknown keys \['pretrain_steps'\] and "
                                         r"lacks \['pretrain_dense_objective'\]"):
        load_recipe(tmp_path / "bad.yaml")


def test_demo_pipeline_on_a_miniature_recipe(tmp_path):
    miniature_recipe(tmp_path)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    command = [sys.executable, "-m", "ivpt.demo", "--recipe", str(tmp_path / "mini.yaml"),
               "--output_dir", str(tmp_path / "out")]
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    report = tmp_path / "out" / "report"
    results = json.loads((report / "metrics.json").read_text())
    assert set(results) == {"trained", "before IVPT training", "chance", "acceptance", "backbone_probe", "part_ceiling"}
    checks = results["acceptance"]["checks"]
    assert set(checks) == {"top1_micro", "consistency", "nmi", "ari"}
    for key, check in checks.items():
        assert check["met"] == (check["value"] >= check["threshold"]), key
    assert results["acceptance"]["all_met"] == all(check["met"] for check in checks.values())
    assert set(results["acceptance"]["unnormalised_input"]) == {"nmi", "ari"}
    probe = results["backbone_probe"]
    assert probe["num_clusters"] == 6 and set(probe) == {"after 2 blocks", "after 4 blocks", COLOUR_PROBE,
                                                         "num_clusters"}
    assert probe[COLOUR_PROBE]["num_keypoints"] == probe["after 4 blocks"]["num_keypoints"] > 0
    for name in ("trained", "before IVPT training"):
        assert {"accuracy", "consistency", "stability", "nmi", "ari", "kpr", "foreground_iou"} <= set(
            results[name]["metrics"]), name
    assert (tmp_path / "out" / "backbone" / "backbone.safetensors").exists()
    assert (tmp_path / "out" / "ivpt" / "model.safetensors").exists()
    text = (report / "report.md").read_text()
    assert "acceptance thresholds" in text and "unnormalised input" in first.stdout
    ceiling = results["part_ceiling"]
    assert ceiling["grid"] == 8 and ceiling["num_parts"] == 7 and ceiling["num_keypoints"] > 0  # 64 px, patch 8
    assert ceiling["nmi"] > results["trained"]["metrics"]["nmi"]
    assert (f"the 7 drawn parts labelled perfectly at this 8 x 8 patch grid (each patch takes the part covering most of "
            f"it): NMI {ceiling['nmi']:.1f}, ARI {ceiling['ari']:.1f}") in text
    from ivpt import IvptConfig
    from ivpt.demo import load_recipe, part_ceiling

    demo, _ = load_recipe(tmp_path / "mini.yaml")
    data_root, config = tmp_path / "out" / "data" / "ivpt_cub" / "CUB_200_2011", IvptConfig.from_pretrained(tmp_path / "out" / "ivpt")
    with pytest.raises(ValueError, match=r"\.jpg: its keypoints differ from the bird the demo settings draw; the data in "
                                         r"CUB_200_2011 was generated with other settings"):
        part_ceiling(data_root, demo | {"seed": demo["seed"] + 1}, config, tmp_path / "out" / "cache")
    colour = probe[COLOUR_PROBE]
    assert f"k-means on the {COLOUR_PROBE} (the colour baseline): NMI {colour['nmi']:.1f}, ARI {colour['ari']:.1f}" in text
    # both parts-metric input variants, each named (the main table: normalised; the published protocol: not)
    assert "| parts-metric input | ImageNet-normalised | ImageNet-normalised | – |" in text
    assert "| parts-metric input | unnormalised | unnormalised |" in text
    for name in ("trained", "before IVPT training"):
        assert results[name]["metrics"]["parts_input"] == "ImageNet-normalised"
        unnormalised = results[name]["unnormalised_parts_input"]["metrics"]
        assert unnormalised["parts_input"] == "unnormalised" and {"nmi", "ari", "kpr"} <= set(unnormalised)
        assert 0 <= results[name]["metrics"]["near_constant_maps"] <= results[name]["metrics"]["consistency_num_maps"]
    assert (report / "figures" / "explanation.png").exists() and list((report / "figures").rglob("parts_*.png"))
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "pre-training" not in second.stdout and "training IVPT" not in second.stdout  # every step cached


def test_gpu_benchmark_script_cpu_mode(tmp_path):
    # The GPU image has torch, timm and transformers but neither datasets nor gradio: shadow them so the script
    # fails here if it ever imports them.
    missing = tmp_path / "missing_packages"
    for name in ("datasets", "gradio"):
        (missing / name).mkdir(parents=True)
        (missing / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU image')\n")
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, PYTHONPATH=str(missing))
    result = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), "--device", "cpu", "--tiny", "--batch", "2", "--warmup", "1",
         "--steps", "1", "--compile_backend", "eager", "--data_images", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", info["date"])  # the section is dated when measured, not when written
    assert {(r["mode"], r["dtype"], r["compiled"]) for r in info["rows"]} == {
        ("ivpt_train", "fp32", False), ("ivpt_train", "bf16", False), ("ivpt_train", "bf16", True),
        ("ivpt_inference", "fp32", False), ("ivpt_inference", "bf16", False), ("ivpt_inference", "bf16", True),
        ("bare_train", "fp32", False), ("bare_train", "bf16", False),
        ("bare_inference", "fp32", False), ("bare_inference", "bf16", False)}
    assert all(r["images_per_s"] > 0 and r["batch"] == 2 for r in info["rows"])
    assert info["data_pipeline"]["images_per_cpu_s"] > 0 and info["compile_backend"] == "eager"
    markdown = (tmp_path / "gpu_bench.md").read_text()
    assert "loader cores" in markdown and "| ivpt_train | bf16 | yes | 2 |" in markdown


def test_trainer_benchmark_runs_every_pipeline(tmp_path):
    out = tmp_path / "trainer.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_trainer.py"), "--images_per_run", "8", "--batch_sizes", "4",
         "--warmup", "1", "--rounds", "1", "--output_dir", str(tmp_path / "runs"), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [row["pipeline"] for row in report["rows"]] == [
        "trainer_tensors", "trainer_images_in_process", "trainer_images"]
    for row in report["rows"]:
        (run,) = row["runs"]  # one round: one run per pipeline, clean or flagged (disturbed by other processes)
        assert run["trainer"] > 0 and run["bare"] > 0 and 0 <= run["fetch_ms"] < run["step_ms"]
        assert (row["clean"], row["flagged"]) == ((0, 1) if run["flagged"] else (1, 0))
        assert len(row["overhead_per_run"]) == row["clean"]  # the statistics use the clean runs only
    assert report["markdown"].count("\n| Trainer") == 3 and "clean/flagged runs" in report["markdown"]
