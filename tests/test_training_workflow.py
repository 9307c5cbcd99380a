"""The training workflow (`ivpt.training`) in-process: every TrainingArguments flag honoured or refused, generated
model arguments, bad input before any work, evaluation that counts every sample, evaluation-only runs, complete
checkpoints for `latest`, label matching, cards without secrets or local paths, and the transformers conventions of
the model outputs."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_BACKBONE_KWARGS, tiny_config

import ivpt  # noqa: E402
from ivpt import IvptConfig, IvptForImageClassification  # noqa: E402
from ivpt.training import (  # noqa: E402
    HONOURED_TRAINING_ARGUMENTS,
    REFUSED_TRAINING_ARGUMENTS,
    IvptTrainingArguments,
    TrainingError,
    main,
    parse_arguments,
)
from ivpt.training.arguments import config_field_names  # noqa: E402
from ivpt.training.run import check_launch, latest_complete_checkpoint, match_labels  # noqa: E402

TINY = ["--backbone_kwargs", json.dumps(TINY_BACKBONE_KWARGS), "--image_size", "64", "--n_pro", "6,5,4",
        "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true", "--random_backbone", "true"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """imagefolder with 7 classes: 14 train images, 7 test images."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 2), ("test", 1)):
        for label in range(7):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(per_class):
                Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return root


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------


def test_every_training_argument_is_honoured_or_refused():
    names = {item.name for item in dataclasses.fields(IvptTrainingArguments) if item.init}
    unclassified = names - set(HONOURED_TRAINING_ARGUMENTS) - set(REFUSED_TRAINING_ARGUMENTS)
    assert not unclassified, f"TrainingArguments fields neither honoured nor refused: {sorted(unclassified)}"
    assert not set(HONOURED_TRAINING_ARGUMENTS) & set(REFUSED_TRAINING_ARGUMENTS)
    assert not (set(HONOURED_TRAINING_ARGUMENTS) | set(REFUSED_TRAINING_ARGUMENTS)) - names  # no stale entries


REFUSED_EXAMPLES = {
    "optim": "sgd", "optim_args": "momentum=0.9", "optim_target_modules": "classifier",
    "label_smoothing_factor": "0.1", "average_tokens_across_devices": "false", "activation_checkpointing": "true",
    "activation_checkpointing_kwargs": '{"a": 1}', "use_liger_kernel": "true", "liger_kernel_config": '{"a": 1}',
    "use_cache": "true", "neftune_noise_alpha": "5", "prediction_loss_only": "true",
    "eval_do_concat_batches": "false", "eval_use_gather_object": "true", "include_for_metrics": "inputs",
    "batch_eval_metrics": "true", "remove_unused_columns": "true", "label_names": "labels",
    "train_sampling_strategy": "sequential", "length_column_name": "size", "fsdp": "full_shard",
    "fsdp_config": '{"a": 1}', "deepspeed": "ds.json", "parallelism_config": '{"a": 1}', "do_eval": "true",
    "do_predict": "true",
}


def test_refused_examples_cover_the_list():
    assert set(REFUSED_EXAMPLES) == set(REFUSED_TRAINING_ARGUMENTS)


@pytest.mark.parametrize("flag", sorted(REFUSED_EXAMPLES))
def test_refused_flag_stops_naming_it(flag, tmp_path):
    with pytest.raises(TrainingError, match=f"--{flag}"):
        parse_arguments(["--output_dir", str(tmp_path / "out"), f"--{flag}", REFUSED_EXAMPLES[flag]])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value", [("lr_scheduler_type", "cosine"), ("warmup_steps", "10"),
                                        ("lr_scheduler_kwargs", '{"a": 1}')])
def test_schedule_flags_need_the_trainer_schedule(flag, value, tmp_path):
    with pytest.raises(TrainingError, match=f"--{flag}.*--epoch_step_schedule false"):
        parse_arguments(["--output_dir", str(tmp_path), f"--{flag}", value])
    if flag == "warmup_steps":  # honoured with the Trainer's schedule: the lr ramps up from 0 over 10 updates
        from ivpt.training import IvptTrainer

        _, _, args, _ = parse_arguments(["--output_dir", str(tmp_path), f"--{flag}", value,
                                         "--epoch_step_schedule", "false", "--use_cpu", "true"])
        data = [{"pixel_values": torch.randn(3, 64, 64), "labels": 0}] * 8
        trainer = IvptTrainer(model=IvptForImageClassification(tiny_config()), args=args, train_dataset=data)
        trainer.create_optimizer_and_scheduler(100)
        factors = [trainer.lr_scheduler.lr_lambdas[0](step) for step in (0, 5, 10)]
        assert factors == pytest.approx([0.0, 0.5, 1.0])


def test_every_config_field_is_a_flag_with_its_default_and_documentation(tmp_path):
    model_args, _, _, _ = parse_arguments(["--output_dir", str(tmp_path)])
    fields = config_field_names()
    assert len(fields) == 24 and {"routing_tau", "entropy_loss_weight", "equivariance_scale_range"} <= set(fields)
    config = IvptConfig(**model_args.config_kwargs())
    reference = IvptConfig()
    for name in fields:
        assert getattr(config, name) == getattr(reference, name), name
    helps = {item.name: item.metadata.get("help", "") for item in dataclasses.fields(type(model_args))}
    assert "temperature" in helps["routing_tau"].lower() and helps["entropy_loss_weight"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("routing_tau: 0.5\nequivariance_scale_range: [0.9, 1.1]\nn_pro: [6, 5, 4]\n")
    model_args, _, _, given = parse_arguments([str(recipe), "--output_dir", str(tmp_path), "--entropy_loss_weight",
                                               "0.25", "--no_gumbel_routing"])
    kwargs = model_args.config_kwargs()
    assert (kwargs["routing_tau"], kwargs["equivariance_scale_range"], kwargs["n_pro"]) == (0.5, [0.9, 1.1], "6,5,4")
    assert kwargs["entropy_loss_weight"] == 0.25 and kwargs["gumbel_routing"] is False
    assert given["gumbel_routing"] is False and given["routing_tau"] == 0.5


@pytest.mark.parametrize("argv,message", [
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
    (["--dataloader_persistent_workers", "true"], "--dataloader_num_workers"),
    (["--learning_rat", "1"], "--learning_rat"),
    (["--backbone_kwargs", "[1]"], "--backbone_kwargs"),
    (["--image_size", "60"], "image_size"),
])
def test_bad_flags_stop_before_any_work(argv, message, tmp_path, image_folder):
    output = tmp_path / "out"
    with pytest.raises(TrainingError, match=re.escape(message)):
        main(["--dataset_name", str(image_folder), "--output_dir", str(output), *TINY, *argv])
    assert not output.exists()


def test_output_dir_that_is_a_file(tmp_path, image_folder):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    with pytest.raises(TrainingError, match="--output_dir.*is a file"):
        main(["--dataset_name", str(image_folder), "--output_dir", str(target), *TINY])
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("line,key", [("learning_rate: [1.0e-6, 2.0e-6]\n", "learning_rate"),
                                      ("num_train_epochs: {a: 1}\n", "num_train_epochs")])
def test_recipe_list_for_a_single_valued_key(line, key, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(line)
    with pytest.raises(TrainingError, match=rf"bad\.yaml.*{key}.*single value"):
        main([str(recipe), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_offline_backbone_without_weights_names_both_options(tmp_path, image_folder, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    flags = TINY[:-2]  # without --random_backbone true
    assert "--random_backbone" not in flags
    with pytest.raises(TrainingError, match="--backbone_weights FILE.*--random_backbone true"):
        main(["--dataset_name", str(image_folder), "--output_dir", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


def test_multi_process_launch_without_distributed_setup_stops(monkeypatch, tmp_path):
    _, _, args, _ = parse_arguments(["--output_dir", str(tmp_path), "--use_cpu", "true"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert args.world_size == 1
    with pytest.raises(TrainingError, match="--use_cpu true"):
        check_launch(args)
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_launch(args)


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(image_folder, tmp_path_factory):
    """2 updates with drop_last on an odd test split (7 images, evaluation batch 4); a Hub token and absolute paths
    on the command line."""
    output = tmp_path_factory.mktemp("run") / "out"
    results = main([
        "--dataset_name", str(image_folder), "--output_dir", str(output), *TINY, "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--dataloader_drop_last", "true",
        "--save_strategy", "steps", "--save_steps", "1", "--hub_token", "hf_SECRETtoken123",
    ])
    return output, results


def test_evaluation_counts_every_sample_despite_drop_last(trained):
    output, results = trained
    assert results["test_split_size"] == results["final"]["test_num_samples"] == 7
    assert json.loads((output / "eval_results.json").read_text()) == json.loads(json.dumps(results))


def test_evaluation_only_run_gives_the_same_numbers(trained, image_folder, tmp_path):
    output, results = trained
    evaluated = main(["--do_train", "false", "--model_name_or_path", str(output), "--dataset_name",
                      str(image_folder), "--output_dir", str(tmp_path / "eval"), "--use_cpu", "true",
                      "--report_to", "none", "--disable_tqdm", "true"])
    saved = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert saved == json.loads(json.dumps(evaluated))
    for key in ("test_top1_micro", "test_top5_micro", "test_top1_macro", "test_loss", "test_num_samples"):
        assert evaluated["final"][key] == pytest.approx(results["final"][key], rel=1e-6), key
    assert sorted(os.listdir(tmp_path / "eval")) == ["eval_results.json"]


def test_nothing_secret_or_local_is_written(trained, image_folder):
    output, _ = trained
    local = str(image_folder)
    for folder, _, files in os.walk(output):
        for name in files:
            path = os.path.join(folder, name)
            data = open(path, "rb").read()
            assert b"hf_SECRETtoken123" not in data, path
            if name.endswith((".json", ".md")):
                assert local.encode() not in data, path
            assert os.stat(path).st_mode & 0o044 == 0o044, (path, oct(os.stat(path).st_mode))
    card = (output / "README.md").read_text()
    assert "hub_token" not in card and os.path.basename(local) in card
    args = torch.load(output / "training_args.bin", weights_only=False)
    assert args.hub_token is None


def test_no_untrained_weights_after_a_crash(image_folder, tmp_path, monkeypatch):
    from ivpt.training.trainer import IvptTrainer

    def crash(self, *args, **kwargs):
        raise RuntimeError("crash in the first step")

    monkeypatch.setattr(IvptTrainer, "training_step", crash)
    with pytest.raises(RuntimeError, match="crash in the first step"):
        main(["--dataset_name", str(image_folder), "--output_dir", str(tmp_path / "out"), *TINY, "--max_steps", "2"])
    leftovers = os.listdir(tmp_path / "out") if (tmp_path / "out").exists() else []
    assert not [name for name in leftovers if name.endswith((".safetensors", ".json", ".md"))], leftovers


def test_latest_skips_incomplete_checkpoints(trained, tmp_path):
    import shutil

    output, _ = trained
    run = tmp_path / "run"
    for name in ("checkpoint-1", "checkpoint-2"):
        shutil.copytree(output / name, run / name)
    assert latest_complete_checkpoint(str(run)) == (str(run / "checkpoint-2"), [])
    (run / "checkpoint-2" / "optimizer.pt").write_bytes(b"")  # a kill while writing the optimizer state
    (run / "checkpoint-3").mkdir()  # a kill right after creating the folder
    shutil.copytree(output / "checkpoint-2", run / "checkpoint-4")
    (run / "checkpoint-4" / "trainer_state.json").write_text('{"global_st')  # truncated by a full disk
    assert latest_complete_checkpoint(str(run)) == (
        str(run / "checkpoint-1"), ["checkpoint-4", "checkpoint-3", "checkpoint-2"]
    )


def test_resume_latest_from_the_command_line(trained, image_folder, tmp_path):
    """A checkpoint written by the workflow passes the configuration check (base-config fields such as
    `architectures`, `dtype` or the `id2label` key type are not compared)."""
    import shutil

    output, _ = trained
    run = tmp_path / "run"
    shutil.copytree(output / "checkpoint-1", run / "checkpoint-1")
    results = main(["--dataset_name", str(image_folder), "--output_dir", str(run), *TINY, "--max_steps", "2",
                    "--per_device_train_batch_size", "4", "--resume_from_checkpoint", "latest"])
    assert results["final"]["global_step"] == 2


# ---------------------------------------------------------------------------------------------------------------
# Labels of a saved model
# ---------------------------------------------------------------------------------------------------------------


def _labelled_model(names):
    torch.manual_seed(0)
    return IvptForImageClassification(tiny_config(num_labels=len(names), id2label=dict(enumerate(names)),
                                                  label2id={n: i for i, n in enumerate(names)}))


def test_saved_model_classifier_is_matched_by_label_name():
    model = _labelled_model(["crow", "gull", "wren"]).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(pixels).logits
    matched = match_labels(model, ["wren", "crow", "gull"], "model")
    with torch.no_grad():
        after = matched(pixels).logits
    torch.testing.assert_close(after, before[:, [2, 0, 1]])
    assert matched.config.id2label == {0: "wren", 1: "crow", 2: "gull"}
    with pytest.raises(TrainingError, match="names differ.*robin"):
        match_labels(_labelled_model(["crow", "gull", "wren"]), ["crow", "gull", "robin"], "model")


# ---------------------------------------------------------------------------------------------------------------
# transformers conventions
# ---------------------------------------------------------------------------------------------------------------


def test_outputs_start_with_loss_and_logits(model):
    pixels, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    model.eval()
    with torch.no_grad():
        outputs = model(pixels, labels=labels)
        as_tuple = model(pixels, labels=labels, return_dict=False)
        no_labels = model(pixels, return_dict=False)
    assert list(outputs.keys())[:2] == ["loss", "logits"]
    assert torch.equal(outputs[0], outputs.loss) and torch.equal(outputs.to_tuple()[1], outputs.logits)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], outputs.loss)
    assert torch.equal(as_tuple[1], outputs.logits) and torch.equal(no_labels[0], outputs.logits)


def test_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+", ivpt.__version__)
    assert ivpt.IvptTrainer is ivpt.training.IvptTrainer


def test_auto_model_loads_a_classifier_checkpoint_without_ivpt(model, tmp_path):
    model.save_pretrained(tmp_path / "checkpoint")
    auto_map = json.loads((tmp_path / "checkpoint" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_ivpt.IvptModel"
    assert auto_map["AutoModelForImageClassification"] == "modeling_ivpt.IvptForImageClassification"
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent("""
        import sys
        sys.modules["ivpt"] = None
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        torch.manual_seed(0)
        with torch.no_grad():
            features = model(torch.randn(1, 3, 64, 64)).part_features
        print(type(model).__name__, float(features.sum()))
    """))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run([sys.executable, "-I", str(script), str(tmp_path / "checkpoint")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    name, total = result.stdout.split()[-2:]
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model.ivpt.eval()(torch.randn(1, 3, 64, 64)).part_features.sum()
    assert name == "IvptModel" and float(total) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("name", ["cub_ivpt.yaml", "cub_ivpt_1gpu.yaml"])
def test_shipped_recipes_hold_only_what_differs_from_the_defaults(name, tmp_path):
    """The defaults live in IvptConfig / IvptTrainingArguments / DataArguments only: a recipe that repeated one would
    be a second place to keep in sync."""
    from ivpt.training.arguments import read_recipe

    recipe = read_recipe(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", name))
    defaults = parse_arguments(["--output_dir", str(tmp_path)])[:3]
    for key, value in recipe.items():
        default = next(getattr(objects, key) for objects in defaults if hasattr(objects, key))
        default = getattr(default, "value", default)
        if key == "output_dir":
            continue
        assert value != default and [value] != default, (name, key, value)
