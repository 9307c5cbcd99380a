"""evaluate_interpretability.py bad input: every case stops before any work with one line naming the argument.

`main(argv)` is called in-process (it raises `EvaluationError`); `cli(argv)` is the command-line entry (one line on
stderr, exit status 2). Nothing is written to `--output_dir` in any case.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ivpt import IvptForImageClassification
from ivpt.evaluation import EvaluationError

from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("evaluate_interpretability", REPO / "evaluate_interpretability.py")
cli_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli_module)

NAMES = ["ant", "bee", "cat", "dog"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    torch.manual_seed(0)
    IvptForImageClassification(tiny_config(num_labels=4)).save_pretrained(root / "ivpt4")  # default LABEL_i names
    IvptForImageClassification(tiny_config(num_labels=7)).save_pretrained(root / "ivpt7")
    shuffled = tiny_config(num_labels=4, id2label=dict(enumerate(["bee", "ant", "cat", "dog"])))
    IvptForImageClassification(shuffled).save_pretrained(root / "ivpt_shuffled")
    from transformers import ViTConfig, ViTForImageClassification

    ViTForImageClassification(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                        intermediate_size=8, image_size=16, patch_size=8)).save_pretrained(root / "vit")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(4)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    data = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 3]}, features=features)
    datasets.DatasetDict({"test": data}).save_to_disk(str(root / "data"))
    (root / "a_file").write_text("x")
    return root


def argv(files, *extra, model="ivpt4", out="out"):
    return ["--model_name_or_path", str(files / model), "--dataset_name", str(files / "data"), "--output_dir",
            str(files / out), "--device", "cpu", "--metrics", "accuracy", "--figures", "none", *extra]


CASES = [
    (("--batch_size", "0"), {}, "--batch_size: expected >= 1, got 0"),
    (("--batch_size", "-3"), {}, "--batch_size"),
    (("--max_images", "0"), {}, "--max_images: expected >= 1"),
    (("--max_images", "-2"), {}, "--max_images"),
    (("--stage_index", "3"), {}, r"--stage_index: the model has 3 stages, so expected an index in \[-3, 2\], got 3"),
    (("--stage_index", "-4"), {}, "--stage_index"),
    (("--num_figure_images", "0"), {}, "--num_figure_images"),
    (("--mask_threshold", "1.5"), {}, "--mask_threshold"),
    (("--half_size", "-1"), {}, "--half_size: expected >= 0, got -1"),
    (("--device", "tpu9"), {}, "--device: 'tpu9' is not a torch device"),
    (("--device", "cuda:7"), {}, "--device: 'cuda:7'"),
    (("--metrics", "accuracy,bogus"), {}, "--metrics: expected 'all' or a comma list"),
    (("--batch_size", "two"), {}, "--batch_size: invalid int value"),
    ((), {"out": "a_file"}, "--output_dir: .*a_file exists and is not a directory"),
    ((), {"model": "missing_model"}, "--model_name_or_path: cannot read a model config from .*missing_model': no such "
                                     "directory$"),
    ((), {"model": "vit"}, "'vit' model, not an IVPT checkpoint; pass --trust_remote_code .*model_type 'vit', not "
                           "'ivpt'"),
    ((), {"model": "ivpt7"}, "the dataset has 4 classes, the model 7"),
    ((), {"model": "ivpt_shuffled"}, "class names are in another order than the dataset's .*index 0: model 'bee'"),
]


@pytest.mark.parametrize("extra, kwargs, message", CASES, ids=[c[2][:40] for c in CASES])
def test_main_raises_before_any_work(files, extra, kwargs, message):
    with pytest.raises(EvaluationError, match=message):
        cli_module.main(argv(files, *extra, **kwargs))
    assert not (files / "out").exists()


def test_both_or_no_data_source(files):
    with pytest.raises(EvaluationError, match="--data_dir: not allowed with argument --dataset_name"):
        cli_module.main(argv(files, "--data_dir", str(files / "data")))
    with pytest.raises(EvaluationError, match="one of the arguments --data_dir --dataset_name is required"):
        cli_module.main(["--model_name_or_path", str(files / "ivpt4"), "--output_dir", str(files / "out")])
    with pytest.raises(EvaluationError, match="--data_dir: .*missing does not exist"):
        cli_module.main(["--model_name_or_path", str(files / "ivpt4"), "--data_dir", str(files / "missing"),
                         "--output_dir", str(files / "out")])


def test_bad_data_sources_name_the_argument(files):
    base = ["--model_name_or_path", str(files / "ivpt4"), "--output_dir", str(files / "out"), "--metrics", "accuracy"]
    with pytest.raises(EvaluationError, match="--dataset_name: .*no_such_folder: no such dataset folder"):
        cli_module.main([*base, "--dataset_name", str(files / "no_such_folder")])
    with pytest.raises(EvaluationError, match="--dataset_name: .*no split 'validation' to evaluate"):
        cli_module.main([*base, "--dataset_name", str(files / "data"), "--test_split", "validation"])
    with pytest.raises(EvaluationError, match="--dataset_name: .*no column 'img'"):
        cli_module.main([*base, "--dataset_name", str(files / "data"), "--image_column", "img"])
    with pytest.raises(EvaluationError, match="--data_dir: .*no CUB-200-2011 data found"):
        cli_module.main([*base, "--data_dir", str(files)])
    assert not (files / "out").exists()


def test_cli_prints_one_line_and_exits_2(files, capsys):
    assert cli_module.cli(argv(files, "--batch_size", "0")) == 2
    err = capsys.readouterr().err
    assert err == "evaluate_interpretability.py: error: --batch_size: expected >= 1, got 0\n"
    assert cli_module.cli(argv(files, model="ivpt7")) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (files / "out").exists()


def test_good_input_runs_and_trust_remote_code_defaults_off(files, tmp_path):
    args = cli_module.parse_args(argv(files))
    assert args.trust_remote_code is False
    assert cli_module.parse_args(argv(files, "--half_size", "0")).half_size == 0  # a region of the peak pixel alone
    result = cli_module.main(argv(files, out=str(tmp_path / "ok")))
    assert result["metrics"]["accuracy"]["num_images"] == 4
    assert result["skipped"] == {}  # only accuracy requested
    result = cli_module.main(argv(files, "--metrics", "all", out=str(tmp_path / "all")))
    assert set(result["metrics"]) == {"accuracy"}
    assert result["skipped"] == {
        "consistency": "the evaluated split has no bbox / keypoints column",
        "stability": "the evaluated split has no bbox / keypoints column",
        "nmi_ari": "the evaluated split has no keypoints column",
        "kpr": "the evaluated split has no bbox / keypoints column",
        "fg_iou": "the evaluated split has no mask column",
        "part_nmi_ari": "the evaluated split has no part_mask column",
    }
    assert (tmp_path / "ok" / "metrics.json").is_file()
