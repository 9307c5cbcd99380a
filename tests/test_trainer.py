"""IvptTrainer and train_ivpt.py: parameter groups (docs/method.md#parameter-groups/docs/method.md#optimizer-and-schedule), StepLR (docs/method.md#optimizer-and-schedule), a short CPU training run with every
loss term logged and a reloadable checkpoint, exact resume, and the bad-input errors of the CLI."""

import json
import math
import os
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

from conftest import TINY_BACKBONE_KWARGS, load_in_fresh_process, tiny_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from ivpt import IvptForImageClassification  # noqa: E402
from ivpt.image_processing import make_image_processor  # noqa: E402
from ivpt.losses import LOSS_TERMS  # noqa: E402
from ivpt.training.trainer import (  # noqa: E402
    PARAMETER_GROUPS,
    EpochStepDecay,
    IvptTrainer,
    IvptTrainingArguments,
    ivpt_parameter_groups,
    normalised_weight_decay,
    parameter_group_members,
)
from ivpt.training.data import (  # noqa: E402
    AugmentationEpochCallback,
    DataError,
    SampleSeededTransform,
    build_transforms,
    prepare_splits,
)

REG_BACKBONE_KWARGS = {**TINY_BACKBONE_KWARGS, "reg_tokens": 2, "no_embed_class": True}
TINY_FLAGS = [
    "--backbone_kwargs", json.dumps(TINY_BACKBONE_KWARGS), "--image_size", "64", "--n_pro", "6,5,4",
    "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true", "--random_backbone", "true",
]


def random_images(count, seed, size=(72, 80)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)]


def image_dataset(count, num_labels=7, seed=0):
    """`count` random RGB images (72×80) with labels cycling over `num_labels` ClassLabel classes."""
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{i}" for i in range(num_labels)])}
    )
    return datasets.Dataset.from_dict(
        {"image": random_images(count, seed), "label": [i % num_labels for i in range(count)]}, features=features
    )


def training_set(count, seed=0, augmentation="cub_original"):
    data = prepare_splits(datasets.DatasetDict({"train": image_dataset(count, seed=seed)}), "test data", "train", None)
    train, _ = build_transforms(64, augmentation)
    transform = SampleSeededTransform(train, seed=42)
    return data.splits["train"].with_transform(transform), transform


def training_args(output_dir, **overrides):
    kwargs = dict(
        output_dir=str(output_dir), use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no",
        per_device_train_batch_size=4, logging_steps=1, dataloader_num_workers=0, seed=42,
    )
    kwargs.update(overrides)
    return IvptTrainingArguments(**kwargs)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return IvptForImageClassification(tiny_config(**overrides))


# ---------------------------------------------------------------------------------------------------------------
# Parameter groups (docs/method.md#parameter-groups, docs/method.md#optimizer-and-schedule)
# ---------------------------------------------------------------------------------------------------------------


def test_parameter_groups_match_spec():
    model = tiny_model(backbone_kwargs=REG_BACKBONE_KWARGS)
    members = parameter_group_members(model)
    assert list(members) == list(PARAMETER_GROUPS)
    assert members["finer"]["frozen"] == members["modulation"]["frozen"] == members["scratch"]["frozen"] == []
    assert members["backbone_decay"]["trainable"] == members["backbone_no_decay"]["trainable"] == []
    assert sorted(members["finer"]["trainable"]) == sorted(
        ["ivpt.backbone.cls_token", "ivpt.backbone.reg_token", "ivpt.backbone.pos_embed"]
        + [f"ivpt.stages.{s}.{name}" for s in range(3) for name in ("prototypes", "position_bias")]
    )
    assert sorted(members["modulation"]["trainable"]) == sorted(
        ["ivpt.modulation.weight", "ivpt.modulation.bias"]
        + [f"ivpt.stages.{s}.{m}.{p}" for s in range(2) for m in ("routing_head", "prompt_projection")
           for p in ("weight", "bias")]
    )
    assert members["scratch"]["trainable"] == ["classifier.weight"]
    # Frozen: the whole backbone except cls/reg/pos (final norm included, docs/method.md#quirks [final norm frozen]) and the prompt LayerNorm (docs/method.md#quirks [prompt norm frozen]), which
    # lands in the backbone-with-decay group because its (K, D) affine is 2-D.
    decay, no_decay = members["backbone_decay"]["frozen"], members["backbone_no_decay"]["frozen"]
    prompt_norm = [f"ivpt.stages.{s}.prompt_norm.{p}" for s in range(2) for p in ("weight", "bias")]
    assert set(prompt_norm) <= set(decay)
    assert {"ivpt.backbone.norm.weight", "ivpt.backbone.norm.bias", "ivpt.backbone.patch_embed.proj.bias"} <= set(
        no_decay
    )
    assert "ivpt.backbone.patch_embed.proj.weight" in decay
    backbone = {f"ivpt.backbone.{n}" for n, _ in model.ivpt.backbone.named_parameters()}
    tokens = {"ivpt.backbone.cls_token", "ivpt.backbone.reg_token", "ivpt.backbone.pos_embed"}
    assert set(decay) | set(no_decay) == (backbone - tokens) | set(prompt_norm)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == set(decay) | set(no_decay)

    groups = ivpt_parameter_groups(model, 1e-6, 2e2, 1e4, 1e4)
    assert [g["name"] for g in groups] == list(PARAMETER_GROUPS)
    assert [g["lr"] for g in groups] == pytest.approx([1e-6, 1e-6, 2e-4, 1e-2, 1e-2])
    assert all(g["weight_decay"] == 0 for g in groups)
    assert groups[0]["params"] == groups[1]["params"] == []  # frozen tensors are not handed to the optimizer


def test_unfrozen_prompt_norm_joins_modulation_group():
    model = tiny_model(freeze_prompt_norm_affine=False)
    members = parameter_group_members(model)
    assert "ivpt.stages.0.prompt_norm.weight" in members["modulation"]["trainable"]


def test_trainer_optimizer_groups_and_normalised_weight_decay(tmp_path):
    train, _ = training_set(40)
    model = tiny_model()
    args = training_args(tmp_path, weight_decay=0.1, num_train_epochs=2, per_device_train_batch_size=4)
    trainer = IvptTrainer(model=model, args=args, train_dataset=train)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.Adam) and not isinstance(optimizer, torch.optim.AdamW)
    wd = 0.1 * math.sqrt(1 / (10 * 2))  # I = floor(40 / 4), E = 2
    assert normalised_weight_decay(0.1, 40, 4, 2) == pytest.approx(wd)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert by_name["scratch"]["weight_decay"] == pytest.approx(wd)
    assert by_name["backbone_decay"]["weight_decay"] == pytest.approx(wd)
    assert by_name["finer"]["weight_decay"] == by_name["modulation"]["weight_decay"] == 0
    assert by_name["finer"]["lr"] == pytest.approx(2e-4)
    handed = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert handed == {id(p) for p in model.parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------------------------
# StepLR (docs/method.md#optimizer-and-schedule)
# ---------------------------------------------------------------------------------------------------------------


def expected_factor(epoch):  # 1-based epoch, docs/method.md#optimizer-and-schedule
    return 0.5 ** ((epoch - 1) // 4)


def test_epoch_step_decay_25_epochs():
    decay = EpochStepDecay(steps_per_epoch=374)
    factors = [decay(epoch * 374 + offset) for epoch in range(25) for offset in (0, 373)]
    expected = [expected_factor(e) for e in range(1, 26) for _ in (0, 1)]
    assert factors == expected
    assert expected_factor(25) == 0.015625 and expected_factor(5) == 0.5 and expected_factor(21) == 0.03125


@pytest.mark.parametrize("accumulation", [1, 2, 3])
def test_trainer_step_lr_per_epoch(tmp_path, accumulation):
    """10 images, batch 2 → 5 batches per epoch → ceil(5 / accumulation) optimizer updates per epoch (the Trainer's
    count, its last update of an epoch taking the remainder batches); the lr of every group follows docs/method.md#optimizer-and-schedule."""
    train, _ = training_set(10)
    args = training_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
                         num_train_epochs=25)
    trainer = IvptTrainer(model=tiny_model(), args=args, train_dataset=train)
    _, per_epoch, *_, max_steps = trainer.set_initial_training_values(args, trainer.get_train_dataloader())
    assert per_epoch == math.ceil(5 / accumulation) and max_steps == 25 * per_epoch
    trainer.create_optimizer_and_scheduler(max_steps)
    base = [g["lr"] for g in trainer.optimizer.param_groups]
    for step in range(max_steps):
        epoch = step // per_epoch + 1
        lrs = [g["lr"] for g in trainer.optimizer.param_groups]
        assert lrs == pytest.approx([b * expected_factor(epoch) for b in base]), (step, epoch)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()


# ---------------------------------------------------------------------------------------------------------------
# Training run, logging, checkpoint reload
# ---------------------------------------------------------------------------------------------------------------


def test_short_training_run_logs_every_term_and_reloads(tmp_path):
    train, transform = training_set(16)
    model = tiny_model()
    args = training_args(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=4, logging_steps=2)
    trainer = IvptTrainer(model=model, args=args, train_dataset=train, callbacks=[AugmentationEpochCallback(transform)])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert math.isfinite(entry["loss"])
        for term in LOSS_TERMS:
            assert math.isfinite(entry[f"loss_{term}"]), term
        assert entry["learning_rate_finer"] == pytest.approx(2e-4)
        assert entry["learning_rate_scratch"] == pytest.approx(1e-2)
    # The weighted sum of the logged terms is the logged total (all weights 1; both averaged over the same batches).
    assert sum(logs[-1][f"loss_{t}"] for t in LOSS_TERMS) == pytest.approx(logs[-1]["loss"], rel=1e-4)

    checkpoint = tmp_path / "run" / "checkpoint-4"
    for name in ("model.safetensors", "config.json", "modeling_ivpt.py", "configuration_ivpt.py", "losses.py",
                 "preprocessor_config.json", "README.md", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        assert (checkpoint / name).is_file(), name
    reloaded = IvptForImageClassification.from_pretrained(checkpoint).eval()
    assert {n for n, p in reloaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(pixels).logits, reloaded(pixels).logits)


def test_augmentation_epoch_reaches_persistent_workers():
    """The epoch set in the main process reaches a persistent loader worker: its batches equal the in-process ones
    for epoch 0 and epoch 1, and the two epochs differ."""
    train, transform = training_set(8)

    def epochs(**loader_kwargs):
        loader = torch.utils.data.DataLoader(train, batch_size=4, **loader_kwargs)
        batches = []
        for epoch in range(2):
            transform.epoch = epoch
            batches.append(torch.cat([batch["pixel_values"] for batch in loader]))
        return batches

    in_process = epochs(num_workers=0)
    in_worker = epochs(num_workers=1, persistent_workers=True)
    assert not torch.equal(in_process[0], in_process[1])
    for expected, actual in zip(in_process, in_worker):
        assert torch.equal(expected, actual)


def test_sample_seeding_leaves_the_global_rng_alone():
    train, _ = training_set(4)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = train[:4]["pixel_values"]
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(a, b) for a, b in zip(first, train[:4]["pixel_values"]))


# ---------------------------------------------------------------------------------------------------------------
# Mixed precision: clipping after unscaling (docs/method.md#quirks [AMP clipping])
# ---------------------------------------------------------------------------------------------------------------


class _GradientNormSpy(TrainerCallback):
    """Records the L2 norm of the gradients the optimizer is about to apply (after clipping)."""

    def __init__(self):
        self.norms = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad.float().flatten() for p in model.parameters() if p.grad is not None]
        self.norms.append(float(torch.cat(grads).norm()))


def _clipping_run(tmp_path, name, **precision):
    torch.manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 64, 64), "labels": i % 7} for i in range(12)]
    spy = _GradientNormSpy()
    args = training_args(tmp_path / name, max_steps=3, learning_rate=1e-3, **precision)
    trainer = IvptTrainer(model=tiny_model(), args=args, train_dataset=data, callbacks=[spy])
    return trainer, spy


@pytest.fixture(scope="module")
def fp32_clipping(tmp_path_factory):
    """The fp32 run both mixed-precision runs are compared with: (logged gradient norms, applied gradient norms)."""
    reference, spy = _clipping_run(tmp_path_factory.mktemp("clipping"), "fp32")
    reference.train()
    logged = [entry["grad_norm"] for entry in reference.state.log_history if "grad_norm" in entry]
    return logged, spy.norms


def test_fp32_gradients_are_clipped_to_max_grad_norm(fp32_clipping):
    logged, applied_norms = fp32_clipping
    assert len(logged) == len(applied_norms) == 3 and logged[0] > 2.0
    for raw, applied in zip(logged, applied_norms):
        assert applied == pytest.approx(min(raw, 2.0), rel=1e-3)


def test_fp16_gradients_are_clipped_after_unscaling(tmp_path, fp32_clipping):
    """The CUDA fp16 path (autocast + GradScaler) on CPU: accelerate makes no scaler on CPU, so one is put where it
    would be on a GPU. The applied gradients have norm exactly `max_grad_norm` in unscaled units (clipping the
    scaled gradients, docs/method.md#quirks [AMP clipping], would leave norm 2 / scale), and the logged norm is the unscaled one (≈ the fp32 run's)."""
    expected, _ = fp32_clipping
    trainer, spy = _clipping_run(tmp_path, "fp16", fp16=True)
    scale = 2.0**10
    trainer.accelerator.native_amp = True
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
    trainer.train()
    assert trainer.accelerator.scaler.get_scale() == scale  # no overflow: every step was applied
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(spy.norms) == len(logged) == 3
    assert logged[0] == pytest.approx(expected[0], rel=0.05) and logged[0] > 2.0
    for raw, applied in zip(logged, spy.norms):
        assert applied == pytest.approx(min(raw, 2.0), rel=1e-3)


def test_bf16_autocast_clips_to_max_grad_norm(tmp_path, fp32_clipping):
    expected, _ = fp32_clipping
    trainer, spy = _clipping_run(tmp_path, "bf16", bf16=True)
    trainer.train()
    assert trainer.accelerator.native_amp and trainer.accelerator.mixed_precision == "bf16"
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert logged[0] == pytest.approx(expected[0], rel=0.1) and logged[0] > 2.0
    for raw, applied in zip(logged, spy.norms):
        assert applied == pytest.approx(min(raw, 2.0), rel=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------------


class _Killed(Exception):
    pass


def _kill_after(step):
    from transformers import TrainerCallback

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise _Killed(step)

    return KillAfterSave()


def _resume_run(output_dir, kill_at=None, resume=None):
    train, transform = training_set(12, seed=3)
    args = training_args(
        output_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4, save_strategy="steps",
        save_steps=2, lr_decay_epochs=1, learning_rate=1e-5, logging_steps=1,
    )
    callbacks = [AugmentationEpochCallback(transform)] + ([_kill_after(kill_at)] if kill_at else [])
    trainer = IvptTrainer(model=tiny_model(seed=1), args=args, train_dataset=train, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    """12 images, batch 2, accumulation 2 → 3 updates per epoch; lr halves every epoch; random augmentation, Gumbel
    routing and warps on. Killed right after the (mid-epoch) checkpoint of update 2 and resumed from it (updates 3 and 4:
    the end of epoch 1, then epoch 2), the run ends with the same weights, optimizer step count and lr as the
    uninterrupted one."""
    full = _resume_run(tmp_path / "full")
    with pytest.raises(_Killed):
        _resume_run(tmp_path / "killed", kill_at=2)
    checkpoint = tmp_path / "killed" / "checkpoint-2"
    assert checkpoint.is_dir()
    resumed = _resume_run(tmp_path / "killed", resume=str(checkpoint))
    assert resumed.state.global_step == full.state.global_step == 4
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [g["lr"] for g in full.optimizer.param_groups] == [g["lr"] for g in resumed.optimizer.param_groups]
    assert full.optimizer.param_groups[2]["lr"] == pytest.approx(1e-5 * 2e2 * 0.5)  # epoch 2


# ---------------------------------------------------------------------------------------------------------------
# train_ivpt.py
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    for split, per_class in (("train", 2), ("test", 1)):
        for label in range(7):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index, image in enumerate(random_images(per_class, seed=label * 10 + len(split))):
                image.save(folder / f"{index}.png")
    return root


def test_cli_persistent_loader_worker_trains_like_in_process(image_folder, tmp_path):
    """Two epochs (14 images, batch 7) with one persistent loader worker end with the weights of the in-process run:
    the per-epoch augmentation seed reaches the worker. (The model's own noise is switched off: a persistent loader
    draws its base seed from the global RNG once, an in-process one at every epoch, which shifts the Gumbel/warp
    draws.)"""
    import ivpt.training as train_ivpt

    flags = [
        "--dataset_name", str(image_folder), *TINY_FLAGS, "--max_steps", "4", "--per_device_train_batch_size", "7",
        "--learning_rate", "1e-5", "--save_strategy", "no", "--test_split", "", "--seed", "3",
        "--gumbel_routing", "false", "--equivariance_loss_weight", "0",
    ]
    strategy = torch.multiprocessing.get_sharing_strategy()
    try:
        train_ivpt.main([*flags, "--output_dir", str(tmp_path / "in_process")])
        train_ivpt.main([*flags, "--output_dir", str(tmp_path / "worker"), "--dataloader_num_workers", "1",
                         "--dataloader_persistent_workers", "true"])
        assert torch.multiprocessing.get_sharing_strategy() == "file_system"
    finally:
        torch.multiprocessing.set_sharing_strategy(strategy)
    in_process = IvptForImageClassification.from_pretrained(tmp_path / "in_process").state_dict()
    worker = IvptForImageClassification.from_pretrained(tmp_path / "worker").state_dict()
    assert in_process.keys() == worker.keys()
    for name, value in in_process.items():
        torch.testing.assert_close(worker[name], value, rtol=0, atol=0, msg=name)


class FakeHub:
    """Stands in for `huggingface_hub.HfApi` (no network here): `upload_folder` copies what a real upload would send
    (same ignore-pattern filter) into `root/<repo_id>/` and records each commit's file list."""

    def __init__(self, root):
        self.root, self.commits = root, []

    def create_repo(self, repo_id, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, path_in_repo=None, commit_message=None, run_as_future=False,
                      ignore_patterns=None, **kwargs):
        import shutil
        from concurrent.futures import Future

        from huggingface_hub.utils import filter_repo_objects

        files = [os.path.relpath(os.path.join(d, f), folder_path) for d, _, fs in os.walk(folder_path) for f in fs]
        files = sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        target = self.root / repo_id / (path_in_repo or "")
        for name in files:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(os.path.join(folder_path, name), target / name)
        self.commits.append((commit_message, path_in_repo, files))
        if not run_as_future:
            return commit_message
        done = Future()
        done.set_result(commit_message)
        return done


def test_push_to_hub_carries_code_files_in_every_push(image_folder, tmp_path, monkeypatch):
    import transformers.trainer

    import ivpt.training as train_ivpt

    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    output = tmp_path / "run"
    train_ivpt.main([
        "--dataset_name", str(image_folder), *TINY_FLAGS, "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--save_strategy", "steps", "--save_steps", "1", "--output_dir", str(output), "--push_to_hub", "true",
        "--hub_model_id", "someone/tiny-ivpt",
    ])
    model_pushes = [files for _, path_in_repo, files in hub.commits if path_in_repo is None]
    assert [message for message, path, _ in hub.commits if path is None] == [
        "Training in progress, step 1", "Training in progress, step 2", "End of training"
    ]
    for files in model_pushes:
        for name in ("model.safetensors", "config.json", "configuration_ivpt.py", "modeling_ivpt.py", "losses.py",
                     "preprocessor_config.json", "README.md"):
            assert name in files, (name, files)
        assert not any(name.startswith("checkpoint-") for name in files)
    assert "eval_results.json" in model_pushes[-1]

    repo = tmp_path / "hub" / "someone" / "tiny-ivpt"
    card = (repo / "README.md").read_text()
    assert "final_test_top1_micro" in card and "## Training recipe" in card  # the IVPT card, not the stock one
    # The pushed repo works from the Hub alone: fresh process, `ivpt` not importable, same logits as the local run.
    pixels = np.random.default_rng(0).integers(0, 255, (72, 80, 3), dtype=np.uint8)
    pushed = load_in_fresh_process(repo, pixels, tmp_path)
    assert pushed["module"].startswith("transformers_modules")
    local = IvptForImageClassification.from_pretrained(output).eval()
    with torch.no_grad():
        logits = local(**make_image_processor(64)(Image.fromarray(pixels), return_tensors="pt")).logits[0]
    torch.testing.assert_close(torch.tensor(pushed["logits"]), logits, rtol=1e-5, atol=1e-6)


def _main(argv):
    import ivpt.training as train_ivpt

    return train_ivpt.main(argv)


def test_unknown_recipe_key(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("learning_rat: 1.0e-6\nnum_train_epochs: 1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*learning_rat"):
        _main([str(recipe), "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_unknown_command_line_flag(tmp_path):
    with pytest.raises(ValueError, match="--learning_rat"):
        _main(["--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--learning_rat", "1"])


def test_missing_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data_dir.*nowhere"):
        _main(["--data_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out"), *TINY_FLAGS])
    assert not (tmp_path / "out").exists()


def test_dataset_without_needed_column(image_folder, tmp_path):
    with pytest.raises(DataError, match="missing column.*fine_label"):
        _main(["--dataset_name", str(image_folder), "--label_column", "fine_label",
               "--output_dir", str(tmp_path / "out"), *TINY_FLAGS])
    assert not (tmp_path / "out").exists()


def test_labels_out_of_range(image_folder, tmp_path):
    with pytest.raises(DataError, match="declares 7 classes"):
        _main(["--dataset_name", str(image_folder), "--num_labels", "3", "--output_dir", str(tmp_path / "out"),
               *TINY_FLAGS])
    plain = datasets.Dataset.from_dict({"image": random_images(3, 0), "label": [0, 4, 9]}).cast_column(
        "image", datasets.Image()
    )
    with pytest.raises(DataError, match="split 'train': label 9 of row 2 is out of range \\[0, 5\\)"):
        prepare_splits(datasets.DatasetDict({"train": plain}), "dataset 'x'", "train", None, num_labels=5)
    assert not (tmp_path / "out").exists()


def test_eval_needs_named_split(image_folder, tmp_path):
    with pytest.raises(ValueError, match="--eval_split"):
        _main(["--dataset_name", str(image_folder), "--eval_strategy", "steps", "--output_dir", str(tmp_path / "o"),
               *TINY_FLAGS])


def test_release_recipe_parses_to_section_4_values():
    import ivpt.training as train_ivpt

    model_args, data_args, args, _ = train_ivpt.parse_arguments(
        [os.path.join(REPO_ROOT, "configs", "cub_ivpt.yaml"), "--num_train_epochs", "1", "--data_dir", "/x"]
    )
    assert model_args.n_pro == "17,14,11,8,5" and model_args.image_size == 518 and model_args.gumbel_routing
    assert args.num_train_epochs == 1  # the command line overrides the recipe
    assert (args.per_device_train_batch_size, args.learning_rate, args.max_grad_norm) == (4, 1e-6, 2.0)
    assert (args.finer_lr_factor, args.modulation_lr_factor, args.scratch_lr_factor) == (2e2, 1e4, 1e4)
    assert (args.lr_decay_epochs, args.lr_decay_rate, args.weight_decay, args.optimizer_type) == (4, 0.5, 0, "adam")
    assert data_args.data_dir == "/x" and data_args.eval_split is None and not args.remove_unused_columns
    weights = [getattr(model_args, f"{term}_loss_weight") for term in LOSS_TERMS]
    assert weights == [1.0] * len(LOSS_TERMS)


def test_best_model_on_named_split(image_folder, tmp_path):
    """Periodic evaluation on a named split (a validation fraction of train), best model selected there and loaded
    at the end; eval_results.json has the full test evaluation of the final weights (and of the best, if other)."""
    output = tmp_path / "best"
    results = _main([
        "--dataset_name", str(image_folder), "--output_dir", str(output), *TINY_FLAGS, "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--validation_fraction", "0.5", "--eval_split", "validation",
        "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
        "--metric_for_best_model", "top1_micro", "--load_best_model_at_end", "true",
    ])
    assert results["final"]["global_step"] == 2 and results["final"]["test_num_samples"] == 7
    state = json.loads((output / "trainer_state.json").read_text())
    evals = [entry for entry in state["log_history"] if "eval_top1_micro" in entry]
    assert len(evals) == 2 and all(entry["eval_num_samples"] == 7 for entry in evals)
    if "best" in results:
        assert results["best"]["checkpoint"].endswith("checkpoint-1")
        assert results["best"]["test_num_samples"] == 7
