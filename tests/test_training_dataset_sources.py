"""`--dataset_name` takes the folders `datasets` writes, with renamed columns (`--image_column` / `--label_column`):
a Hub-style parquet folder through the real `train_ivpt.py` command (one subprocess), a `save_to_disk` folder through
`ivpt.training.main`; each trained checkpoint is then evaluated with every applicable metric by
`evaluate_interpretability.py` on the same folder. Same rows and seed: the two runs give the same model and numbers.
Bad sources stop with an error naming `--dataset_name` before anything is written."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures_layouts import generate_nabirds
from safetensors.torch import load_file

from conftest import TINY_BACKBONE_KWARGS

from ivpt.data.loading import load_any_dataset
from ivpt.training import TrainingError, main

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["--image_column", "photo", "--label_column", "species"]
TINY = ["--backbone_kwargs", json.dumps(TINY_BACKBONE_KWARGS), "--image_size", "64", "--n_pro", "6,5,4",
        "--random_backbone", "true", "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true",
        "--save_strategy", "no", "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--dataloader_num_workers", "0", "--seed", "0", *COLUMNS]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Synthetic NABirds (3 classes, 6 train / 6 test images, boxes and keypoints) with the image and label columns
    renamed, as a Hub-style parquet folder (`data/<split>-00000-of-00001.parquet`) and a save_to_disk folder."""
    root = tmp_path_factory.mktemp("sources")
    built = load_any_dataset(generate_nabirds(root / "raw"), cache_dir=root / "cache")
    renamed = built.rename_columns({"image": "photo", "label": "species"})
    renamed.save_to_disk(str(root / "saved"))
    for name, split in renamed.items():
        split.to_parquet(str(root / "parquet" / "data" / f"{name}-00000-of-00001.parquet"))
    return root


def evaluate(model_dir: Path, dataset: Path, out: Path, cache: Path) -> dict:
    """`evaluate_interpretability.py`'s `main`, in-process, with every metric."""
    spec = importlib.util.spec_from_file_location("_evaluate_cli", REPO / "evaluate_interpretability.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(["--model_name_or_path", str(model_dir), "--dataset_name", str(dataset), *COLUMNS,
                        "--output_dir", str(out), "--cache_dir", str(cache), "--device", "cpu", "--metrics", "all",
                        "--figures", "none"])


def test_parquet_and_save_to_disk_folders_train_and_evaluate(sources, tmp_path):
    parquet_run, saved_run = tmp_path / "parquet_run", tmp_path / "saved_run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "train_ivpt.py"), "--dataset_name", str(sources / "parquet"),
               "--output_dir", str(parquet_run), *TINY]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    torch.set_num_threads(1)  # the subprocess's thread count: the same float reductions
    in_process = main(["--dataset_name", str(sources / "saved"), "--output_dir", str(saved_run), *TINY])

    trained = {run: json.loads((run / "eval_results.json").read_text()) for run in (parquet_run, saved_run)}
    assert trained[saved_run] == in_process
    for results in trained.values():
        assert results["test_split_size"] == 6 and results["final"]["global_step"] == 2
    config = json.loads((parquet_run / "config.json").read_text())
    assert list(config["id2label"].values()) == ["Song Sparrow", "Fox Sparrow (Red)", "Mallard (Female/Juvenile)"]
    card = (parquet_run / "README.md").read_text()
    assert "data folder 'parquet'" in card and str(sources) not in card  # named, no local path
    assert "save_to_disk folder 'saved'" in (saved_run / "README.md").read_text()
    weights = [load_file(run / "model.safetensors") for run in (parquet_run, saved_run)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:  # same rows, same seed: the same trained model
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-5, atol=1e-6, msg=name)

    evaluated = {name: evaluate(run, sources / name, tmp_path / f"eval_{name}", tmp_path / "cache")
                 for name, run in (("parquet", parquet_run), ("saved", saved_run))}
    for name, result in evaluated.items():
        metrics = result["metrics"]
        assert {"accuracy", "consistency", "stability", "nmi", "ari", "kpr"} <= set(metrics), (name, set(metrics))
        assert set(result["skipped"]) == {"fg_iou", "part_nmi_ari"}, result["skipped"]  # no masks in NABirds
        assert metrics["accuracy"]["num_images"] == 6 and metrics["consistency_num_images"] == 6
        assert all(math.isfinite(metrics[key]) for key in ("consistency", "stability", "nmi", "ari", "kpr"))
        assert (tmp_path / f"eval_{name}" / "report.md").is_file()
    assert flat(evaluated["parquet"]["metrics"]) == pytest.approx(flat(evaluated["saved"]["metrics"]), rel=1e-4,
                                                                  abs=1e-4)


def flat(metrics: dict) -> dict:
    """{name: number} of a metrics dict (nested dicts flattened with '/')."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": float(v) for k, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


@pytest.mark.parametrize("source, message", [
    ("missing", r"`--dataset_name`: .*missing: no such dataset folder"),
    ("a_file.txt", r"`--dataset_name`: .*a_file.txt: is a file"),
    ("empty", r"`--dataset_name`: .*empty: no data files found"),
    ("parquet", r"data folder 'parquet', split 'train': missing column\(s\) \['image', 'label'\] \(set "
                r"`--image_column`"),
])
def test_bad_sources_name_the_flag_before_anything_is_written(sources, tmp_path, source, message):
    (tmp_path / "a_file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    folder = sources / source if source == "parquet" else tmp_path / source
    argv = ["--dataset_name", str(folder), "--output_dir", str(tmp_path / "out"), *TINY]
    if source == "parquet":  # the default column names, which this folder renamed
        argv = argv[:-len(COLUMNS)]
    with pytest.raises(TrainingError, match=message):
        main(argv)
    assert not (tmp_path / "out").exists()
