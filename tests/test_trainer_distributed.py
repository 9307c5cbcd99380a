"""Two-process CPU data parallelism with `accelerate launch --multi_gpu --num_processes 2 --cpu` (gloo).

The objective of the recipe has batch statistics (presence: max over the device batch; one equivariance warp per
device batch; Gumbel noise drawn per process), so a 2 × 4 run and a 1 × 8 run are *different* objectives (docs/method.md#device-batch-semantics).
To make the comparison meaningful the runs here use a configuration whose objective is a plain mean of per-sample
terms: `gumbel_routing=False`, `presence_loss_weight=0`, `equivariance_loss_weight=0` (every other term — cross
entropy, consistency KL, total variation (normalised by B·H·W), orthogonality, enforced presence, entropy — is a mean
over the batch). Each optimizer step covers the whole 8-image training set, so the sample order cannot matter either.
The DDP-averaged gradient of two halves then equals the gradient of the full batch, and the weights after 3 steps must
agree up to float reassociation.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HELPER = textwrap.dedent(
    '''
    import json, os, sys
    sys.path.insert(0, {tests!r})
    sys.path.insert(0, {repo!r})
    import datasets, numpy as np, torch
    from transformers import TrainerCallback
    from conftest import tiny_config
    from ivpt import IvptForImageClassification
    from ivpt.training.trainer import IvptTrainer, IvptTrainingArguments

    def tensors(count, seed):
        generator = torch.Generator().manual_seed(seed)
        return {{"pixel_values": torch.randn(count, 3, 64, 64, generator=generator).numpy(),
                 "labels": [i % 7 for i in range(count)]}}

    train = datasets.Dataset.from_dict(tensors(8, 0)).with_format("torch")
    test = datasets.Dataset.from_dict(tensors(7, 1)).with_format("torch")  # odd: the sampler pads one rank

    class Record(TrainerCallback):
        steps = 0
        def on_step_end(self, args, state, control, **kwargs):
            Record.steps += 1

    class CountingTrainer(IvptTrainer):
        writes = 0
        def _save(self, output_dir=None, state_dict=None):
            if self.args.should_save:
                CountingTrainer.writes += 1
            super()._save(output_dir, state_dict)

    def run(output_dir, batch_size):
        """Trains 3 steps on 8 fixed images (`batch_size` per process), evaluates 7, writes report_<rank>.json."""
        torch.manual_seed(0)
        model = IvptForImageClassification(tiny_config(
            gumbel_routing=False, presence_loss_weight=0.0, equivariance_loss_weight=0.0))
        args = IvptTrainingArguments(
            output_dir=output_dir, use_cpu=True, report_to="none", disable_tqdm=True, per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=2, max_steps=3, save_strategy="steps", save_steps=3, logging_steps=1,
            learning_rate=1e-6, seed=42, dataloader_num_workers=0)
        trainer = CountingTrainer(model=model, args=args, train_dataset=train, callbacks=[Record()])
        trainer.train()
        metrics = trainer.evaluate(test, metric_key_prefix="test")
        rank = args.process_index
        report = {{"rank": rank, "world_size": args.world_size, "steps": Record.steps, "writes": CountingTrainer.writes,
                   "metrics": metrics, "logs": trainer.state.log_history}}
        with open(os.path.join(output_dir, f"report_{{rank}}.json"), "w") as handle:
            json.dump(report, handle)

    if __name__ == "__main__":
        run(sys.argv[1], int(sys.argv[2]))
    '''
)


def _run(command, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
                    reason="accelerate CLI not installed next to the interpreter")
def test_two_process_cpu_ddp_equals_single_process(tmp_path):
    helper = tmp_path / "ddp_helper.py"
    helper.write_text(HELPER.format(tests=os.path.join(REPO_ROOT, "tests"), repo=REPO_ROOT))
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    single, double = tmp_path / "single", tmp_path / "ddp"
    # The single-process reference runs in this process (saves one interpreter start-up on a busy machine).
    spec = importlib.util.spec_from_file_location("ddp_helper", helper)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.run(str(single), 8)
    _run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
          str(helper), str(double), "4"], cwd=tmp_path)

    reports = [json.loads((double / f"report_{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert [r["steps"] for r in reports] == [3, 3]  # both ranks step
    assert [r["writes"] for r in reports] == [1, 0]  # the checkpoint is written once, by rank 0
    assert sorted(p.name for p in double.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3"]
    checkpoint = double / "checkpoint-3"
    assert (checkpoint / "model.safetensors").is_file()
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()

    # Evaluation counts each of the 7 test images once, although the distributed sampler pads rank 1.
    assert reports[0]["metrics"]["test_num_samples"] == 7
    single_report = json.loads((single / "report_0.json").read_text())
    assert single_report["metrics"]["test_num_samples"] == 7

    # Every loss term is logged, averaged over ranks; the logged totals match the single-process run.
    ddp_logs = [entry for entry in reports[0]["logs"] if "loss" in entry]
    single_logs = [entry for entry in single_report["logs"] if "loss" in entry]
    assert len(ddp_logs) == len(single_logs) == 3
    for ddp_entry, single_entry in zip(ddp_logs, single_logs):
        assert ddp_entry["loss_classification"] == pytest.approx(single_entry["loss_classification"], rel=1e-4)
        assert ddp_entry["loss"] == pytest.approx(single_entry["loss"], rel=1e-4)

    reference = load_file(single / "checkpoint-3" / "model.safetensors")
    result = load_file(checkpoint / "model.safetensors")
    assert reference.keys() == result.keys()
    for name in reference:
        torch.testing.assert_close(result[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)
    # ... and training did move the weights.
    sys.path.insert(0, REPO_ROOT)
    from conftest import tiny_config
    from ivpt import IvptForImageClassification

    torch.manual_seed(0)
    initial = IvptForImageClassification(
        tiny_config(gumbel_routing=False, presence_loss_weight=0.0, equivariance_loss_weight=0.0)
    ).state_dict()
    assert not torch.allclose(initial["classifier.weight"], result["classifier.weight"])
