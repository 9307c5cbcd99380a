"""The training commands of README.md and docs/training.md, run as a user runs them (subprocesses, tiny overrides):
every documented command works, and a run killed with SIGKILL (after a checkpoint, or in the middle of a save; 1
process, and 2 CPU processes under `accelerate launch`) and resumed with `latest` ends bit-identical to an
uninterrupted one. Slow by nature (each process imports torch): few, tiny runs."""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_BACKBONE_KWARGS
from fixtures_data import SMALL

from ivpt.data.synthetic import generate_cub

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = "/data/CUB_200_2011.tgz"
WEIGHTS = "/weights/vit_base_patch14_reg4_dinov2.safetensors"
HUB_ID = "timm/vit_base_patch14_reg4_dinov2.lvd142m"

ACCELERATE = (f"accelerate launch --config_file accelerate_config.yaml train_ivpt.py configs/cub_ivpt.yaml "
              f"--data_dir {DATA} --backbone_weights {WEIGHTS} --output_dir runs/cub_ivpt")
ONE_GPU = f"python train_ivpt.py configs/cub_ivpt_1gpu.yaml --data_dir {DATA} --backbone_weights {WEIGHTS}"
FROM_HUB = f"python train_ivpt.py configs/cub_ivpt_1gpu.yaml --data_dir {DATA} --output_dir runs/cub_ivpt_hub"
RESUME = f"{ONE_GPU} --resume_from_checkpoint latest"
EVALUATE = (f"python train_ivpt.py --do_train false --model_name_or_path runs/cub_ivpt_1gpu --data_dir {DATA} "
            "--output_dir runs/cub_ivpt_1gpu/test")
DOCUMENTED = {"README.md": {ACCELERATE, ONE_GPU}, "docs/training.md": {ACCELERATE, ONE_GPU, FROM_HUB, RESUME, EVALUATE}}

TINY = ["--backbone_kwargs", json.dumps(TINY_BACKBONE_KWARGS), "--image_size", "64", "--n_pro", "6,5,4",
        "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1", "--dataloader_num_workers", "0",
        "--dataloader_persistent_workers", "false", "--use_cpu", "true", "--disable_tqdm", "true"]

# Imported at start-up by every `train_ivpt.py` process of the kill runs: SIGKILLs the process after the checkpoint
# of update N is complete ("after_save:N"), or in the middle of writing it, weights written and the optimizer state
# begun ("during_save:N").
KILL_HOOK = textwrap.dedent("""
    import os, signal, sys
    mode = os.environ.get("IVPT_TEST_KILL")
    if mode and sys.argv and sys.argv[0].endswith("train_ivpt.py"):
        from ivpt.training.trainer import IvptTrainer
        when, step = mode.split(":")
        step = int(step)
        if when == "after_save":
            original = IvptTrainer._save_checkpoint
            def _save_checkpoint(self, model, trial):
                original(self, model, trial)
                if self.state.global_step == step:
                    os.kill(os.getpid(), signal.SIGKILL)
            IvptTrainer._save_checkpoint = _save_checkpoint
        else:
            original = IvptTrainer._save_optimizer_and_scheduler
            def _save_optimizer_and_scheduler(self, output_dir):
                if self.state.global_step == step:
                    open(os.path.join(output_dir, "optimizer.pt"), "wb").close()
                    os.kill(os.getpid(), signal.SIGKILL)
                original(self, output_dir)
            IvptTrainer._save_optimizer_and_scheduler = _save_optimizer_and_scheduler
""")


def documented_commands(relative: str) -> set[str]:
    """The training commands in the fenced bash blocks of a doc file (continuation lines joined)."""
    text = (REPO_ROOT / relative).read_text()
    commands = set()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(line.split())
            if line and not line.startswith("#") and ("train_ivpt.py" in line or "ivpt-train" in line):
                commands.add(line)
    return commands


@pytest.mark.parametrize("relative", sorted(DOCUMENTED))
def test_every_documented_training_command_is_run_here(relative):
    assert documented_commands(relative) == DOCUMENTED[relative]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A user's working directory: the repository's recipes and script, CUB as a .tgz, a tiny timm weight file (also
    in a Hub cache, as timm would have downloaded it), and the kill hook."""
    root = tmp_path_factory.mktemp("user")
    for name in ("configs", "train_ivpt.py", "accelerate_config.yaml"):
        (root / name).symlink_to(REPO_ROOT / name)
    data = generate_cub(root / "data", tgz=True, **SMALL)
    import timm

    torch.manual_seed(0)
    backbone = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=64,
                                 **TINY_BACKBONE_KWARGS)
    weights = root / "tiny_backbone.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, weights)
    snapshot = root / "hub" / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(weights, snapshot / "model.safetensors")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    hooks = root / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILL_HOOK)
    return {"root": root, "data": str(data), "weights": str(weights), "hub": str(root / "hub"), "hooks": str(hooks)}


def run(workspace, command, extra=(), kill=None, expect_ok=True):
    argv = shlex.split(command.replace(DATA, workspace["data"]).replace(WEIGHTS, workspace["weights"]))
    if argv[0] == "python":
        argv[0] = sys.executable
    else:  # accelerate launch: 2 CPU processes (the recipe's 4 GPUs are not here)
        port = _free_port()
        argv[:2] = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu",
                    "--num_processes", "2", "--main_process_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_CACHE": workspace["hub"], "HF_DATASETS_CACHE": str(workspace["root"] / "datasets_cache"),
           "PYTHONPATH": os.pathsep.join([workspace["hooks"], str(REPO_ROOT)])}
    env.pop("IVPT_TEST_KILL", None)
    if kill:
        env["IVPT_TEST_KILL"] = kill
    result = subprocess.run([*argv, *extra], cwd=workspace["root"], env=env, capture_output=True, text=True,
                            timeout=600)
    if expect_ok:
        assert result.returncode == 0, f"{argv}\n{result.stdout[-2000:]}\n{result.stderr[-5000:]}"
    else:
        assert result.returncode != 0, f"{argv} was expected to be killed"
    return result


def _free_port():
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def weights_of(folder):
    return load_file(Path(folder) / "model.safetensors")


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_one_process_commands_and_resume_after_kill(workspace):
    root = workspace["root"]
    # The documented one-GPU command, uninterrupted (the reference), with TensorBoard logging as in the recipe.
    run(workspace, ONE_GPU, TINY)
    reference = root / "runs" / "cub_ivpt_1gpu"
    results = json.loads((reference / "eval_results.json").read_text())
    assert results["final"]["global_step"] == 3
    assert results["final"]["test_num_samples"] == results["test_split_size"] == 12
    assert any(name.startswith("events.out.tfevents") for _, _, files in os.walk(reference / "runs") for name in files)

    # Killed right after checkpoint-2 is complete, then the documented resume command.
    killed = ["--output_dir", "runs/killed"]
    run(workspace, ONE_GPU, [*TINY, *killed], kill="after_save:2", expect_ok=False)
    assert not (root / "runs" / "killed" / "model.safetensors").exists()  # no result-looking weights
    resumed = run(workspace, RESUME, [*TINY, *killed])
    assert_bit_identical(weights_of(reference), weights_of(root / "runs" / "killed"))
    resumed_results = json.loads((root / "runs" / "killed" / "eval_results.json").read_text())
    assert resumed_results["final"]["test_top1_micro"] == results["final"]["test_top1_micro"]
    assert "skipping incomplete" not in resumed.stderr

    # The documented evaluation-only command: the same numbers as after training.
    run(workspace, EVALUATE)
    evaluated = json.loads((reference / "test" / "eval_results.json").read_text())
    for key in ("test_loss", "test_top1_micro", "test_top1_macro", "test_num_samples"):
        assert evaluated["final"][key] == pytest.approx(results["final"][key], rel=1e-6), key

    # The documented command without --backbone_weights: timm's pretrained weights of --backbone (here from the local
    # Hub cache, offline), loaded into the frozen backbone.
    run(workspace, FROM_HUB, [*TINY, "--max_steps", "1"])
    trained = weights_of(root / "runs" / "cub_ivpt_hub")
    pretrained = load_file(workspace["weights"])
    assert torch.equal(trained["ivpt.backbone.blocks.0.attn.qkv.weight"], pretrained["blocks.0.attn.qkv.weight"])


def test_two_processes_resume_after_kill_during_save(workspace):
    root = workspace["root"]
    run(workspace, ACCELERATE, TINY)
    reference = root / "runs" / "cub_ivpt"
    results = json.loads((reference / "eval_results.json").read_text())
    assert results["final"]["test_num_samples"] == results["test_split_size"] == 12  # drop_last: training only
    killed = ["--output_dir", "runs/killed_ddp"]
    run(workspace, ACCELERATE, [*TINY, *killed], kill="during_save:2", expect_ok=False)
    assert not (root / "runs" / "killed_ddp" / "checkpoint-2" / "trainer_state.json").exists()
    resumed = run(workspace, ACCELERATE, [*TINY, *killed, "--resume_from_checkpoint", "latest"])
    assert "checkpoint-2" in resumed.stderr and "skipping incomplete" in resumed.stderr
    assert_bit_identical(weights_of(reference), weights_of(root / "runs" / "killed_ddp"))
