#!/usr/bin/env python
"""Training throughput of `IvptTrainer` vs the model's bare training step in a plain loop (same process, same run).

    python bench/bench_trainer.py [--images_per_run 480] [--batch_sizes 4,8] [--workers 1] [--rounds 5] [--json OUT]

On the tiny test configuration (4-block, 32-wide ViT at 64 px, n_pro 6,5,4, 7 classes), on CPU unless
`--device cuda`, three kinds of Trainer run are compared with the bare step:

* bare step: a pre-made batch → forward with labels (full objective) → backward → clip 2.0 → Adam step → zero grads,
  on a second, identical model with its own optimizer;
* `trainer_tensors`: `IvptTrainer` on pre-made tensors (Trainer, scheduler, logging every 10 steps);
* `trainer_images_in_process`: `IvptTrainer` on PIL images with the docs/method.md#training-augmentation augmentation applied on the fly (the real
  pipeline), decoded and augmented in the training process (`dataloader_num_workers 0`);
* `trainer_images`: the same with `--workers` persistent loader workers (the recipes' setting: loading overlaps the
  step; with `--threads 1` on a 2-core machine the worker has the second core).

The speed of a shared machine drifts by up to 2x within seconds, so the comparison is paired step by step: after
every Trainer step a callback runs and times one bare step. The Trainer's time is the wall time between two step
ends minus the bare step inside it (it includes data loading, the Trainer's bookkeeping and logging); the bare time
is the sum of the bare steps. Overhead = `1 - trainer rate / bare rate`.
The time the Trainer spends fetching batches (`get_batch_samples`: decoding and augmenting in process, or receiving
a batch from a worker) is reported separately.

The runs follow bench/timing.py: the three kinds run interleaved, `--rounds` rounds in a new shuffled order each; a
run during which other processes used the CPU (its loader workers are this process's children and count as its
own) is flagged and left out; each row gives the median over its clean runs and its clean/flagged count (the
"all runs" column lists the clean runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import datasets
import numpy as np
import torch
from PIL import Image
from transformers import TrainerCallback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import timing  # noqa: E402

from ivpt import IvptConfig, IvptForImageClassification  # noqa: E402
from ivpt.training.trainer import IvptTrainer, IvptTrainingArguments, ivpt_parameter_groups  # noqa: E402
from ivpt.training.data import INDEX_COLUMN, SampleSeededTransform, build_transforms  # noqa: E402

TINY = dict(
    backbone_kwargs={"embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 8}, image_size=64, n_pro="6,5,4",
    num_labels=7,
)


def tiny_model(seed: int = 0) -> IvptForImageClassification:
    torch.manual_seed(seed)
    return IvptForImageClassification(IvptConfig(**TINY))


class BareStep:
    """The model's training step in a plain loop, one step per call, on pre-made batches."""

    def __init__(self, batch_size: int, device: str):
        self.model = tiny_model().to(device).train()
        self.optimizer = torch.optim.Adam(ivpt_parameter_groups(self.model, 1e-6))
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        generator = torch.Generator().manual_seed(0)
        self.batches = [
            (torch.randn(batch_size, 3, 64, 64, generator=generator).to(device),
             torch.randint(0, 7, (batch_size,), generator=generator).to(device))
            for _ in range(8)
        ]
        self.device, self.step = device, 0

    def __call__(self) -> None:
        pixels, labels = self.batches[self.step % len(self.batches)]
        self.model(pixel_values=pixels, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, 2.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.step += 1


class PairedClock(TrainerCallback):
    """At the ends of steps `warmup` .. `last - 1`: runs and times one bare step; the wall time from the end of that
    bare step to the next step end is booked to the Trainer."""

    def __init__(self, bare_step: BareStep, warmup: int, last: int):
        self.bare_step, self.warmup, self.last = bare_step, warmup, last
        self.trainer_seconds = self.bare_seconds = 0.0
        self.mark: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if args.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self.mark is not None:
            self.trainer_seconds += now - self.mark
        self.mark = None
        if self.warmup <= state.global_step < self.last:
            self.bare_step()
            self.mark = time.perf_counter()
            self.bare_seconds += self.mark - now


class _FetchTimedTrainer(IvptTrainer):
    """Books the time spent fetching batches (`get_batch_samples`) inside the paired interval to `clock`."""

    def __init__(self, *args, clock: PairedClock, **kwargs):
        super().__init__(*args, callbacks=[clock], **kwargs)
        self.clock, self.fetch_seconds = clock, 0.0

    def get_batch_samples(self, *args, **kwargs):
        start = time.perf_counter()
        batches = super().get_batch_samples(*args, **kwargs)
        if self.clock.mark is not None:
            self.fetch_seconds += time.perf_counter() - start
        return batches


def bench_paired(
    dataset, steps: int, warmup: int, batch_size: int, device: str, output_dir: str, workers: int
) -> dict[str, float]:
    """Trainer and bare images per second over `steps` paired steps, and the Trainer's batch-fetch ms per step."""
    args = IvptTrainingArguments(
        output_dir=output_dir, max_steps=warmup + steps, per_device_train_batch_size=batch_size, logging_steps=10,
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=device == "cpu", dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0, seed=0,
    )
    clock = PairedClock(BareStep(batch_size, device), warmup, warmup + steps)
    trainer = _FetchTimedTrainer(model=tiny_model(), args=args, train_dataset=dataset, clock=clock)
    trainer.train()
    return {
        "trainer": steps * batch_size / clock.trainer_seconds,
        "bare": steps * batch_size / clock.bare_seconds,
        "fetch_ms": 1000 * trainer.fetch_seconds / steps,
        "step_ms": 1000 * clock.trainer_seconds / steps,
    }


DESCRIPTIONS = {
    "trainer_tensors": "Trainer on in-memory tensors",
    "trainer_images_in_process": (
        "Trainer, 72×80 PNG images decoded + docs/method.md#training-augmentation augmentation in the training process (0 workers)"
    ),
    "trainer_images": "Trainer, same decoding + augmentation in {workers} persistent loader worker(s)",
}


def render_markdown(result: dict) -> str:
    lines = [
        f"Tiny test config, {result['torch_threads']} torch thread(s), {result['device']}; each row: median over the "
        f"clean ones of {result['rounds']} runs of {result['images_per_run']} images, every Trainer step followed by "
        f"one bare step (paired, so the machine's drift cancels); tensor sharing `{result['sharing_strategy']}`.",
        "",
        "| pipeline | batch | Trainer images/s | bare step images/s | Trainer step (ms) | of which fetching the batch "
        "(ms) | overhead vs bare (median) | overhead, clean runs | clean/flagged runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {DESCRIPTIONS[row['pipeline']].format(workers=result['loader_workers'])} | {row['batch_size']} | "
            f"{row['trainer_images_per_s']:.1f} | {row['bare_images_per_s']:.1f} | {row['trainer_step_ms']:.1f} | "
            f"{row['batch_fetch_ms']:.2f} | {100 * row['overhead_median']:+.1f} % | "
            + (", ".join(f"{100 * value:+.1f}" for value in sorted(row["overhead_per_run"])) + " %"
               if row["overhead_per_run"] else "– (no clean run)") + " | "
            f"{row['clean']}/{row['flagged']} |"
        )
    lines += ["", f"Runs timed with `bench/timing.py`: {result['summary']}."]
    return "\n".join(lines)


def summarise(pipeline: str, batch_size: int, runs: list[dict[str, float]], flagged: list[bool]) -> dict:
    """Medians over the clean runs (`flagged[i]`: run i was disturbed by other processes); NaN when none is clean."""
    clean = [run for run, disturbed in zip(runs, flagged) if not disturbed]

    def median(values: list[float], digits: int) -> float:
        return round(statistics.median(values), digits) if values else float("nan")

    overheads = [round(1 - run["trainer"] / run["bare"], 4) for run in clean]
    return {
        "pipeline": pipeline, "batch_size": batch_size,
        **{key: median([run[field] for run in clean], 2) for key, field in (
            ("trainer_images_per_s", "trainer"), ("bare_images_per_s", "bare"), ("trainer_step_ms", "step_ms"),
            ("batch_fetch_ms", "fetch_ms"))},
        "overhead_median": median(overheads, 4), "overhead_per_run": overheads,
        "clean": len(clean), "flagged": sum(flagged),
        "runs": [{**run, "flagged": disturbed} for run, disturbed in zip(runs, flagged)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images_per_run", type=int, default=480, help="timed images per run (steps = this / batch)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch_sizes", default="4,8", help="comma-separated per-step batch sizes (4: the recipe)")
    parser.add_argument("--workers", type=int, default=1, help="persistent loader workers of `trainer_images`")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least noise on CPU)")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each kind, interleaved (bench/timing.py); the median of the clean ones is kept")
    parser.add_argument("--output_dir", default="/tmp/ivpt_bench_trainer")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--sharing_strategy", default="file_system", choices=["file_descriptor", "file_system"],
                        help="torch.multiprocessing tensor sharing strategy (train_ivpt.py uses file_system)")
    args = parser.parse_args()
    torch.multiprocessing.set_sharing_strategy(args.sharing_strategy)

    count = 1024  # no epoch boundary inside the timed steps (a CUB epoch has ~1500 steps)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(count, 3, 64, 64, generator=generator)
    tensors = [{"pixel_values": pixels[i], "labels": i % 7} for i in range(count)]  # in memory, no decoding
    rng = np.random.default_rng(0)
    images = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)) for _ in range(count)],
         "label": [i % 7 for i in range(count)], INDEX_COLUMN: list(range(count))},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64"),
                                    INDEX_COLUMN: datasets.Value("int64")}),
    )
    train_transform, _ = build_transforms(64, "cub_original")
    images = images.with_transform(SampleSeededTransform(train_transform, seed=0))

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    datasets_by_kind = {
        "trainer_tensors": (tensors, 0), "trainer_images_in_process": (images, 0), "trainer_images": (images, args.workers)
    }
    rows, summaries = [], []
    for batch_size in [int(size) for size in args.batch_sizes.split(",")]:
        steps = args.images_per_run // batch_size
        measured: dict[str, list[dict[str, float]]] = {key: [] for key in datasets_by_kind}

        def run(key: str, steps: int = steps, batch_size: int = batch_size, measured=measured) -> None:
            dataset, workers = datasets_by_kind[key]
            measured[key].append(
                bench_paired(dataset, steps, args.warmup, batch_size, args.device, args.output_dir, workers))

        timed = timing.time_modes({key: (lambda key=key: run(key)) for key in datasets_by_kind},
                                  min_rounds=args.rounds, max_rounds=args.rounds, warmup=False, seed=batch_size)
        rows += [summarise(key, batch_size, runs, [r.flagged for r in timed[key].repetitions])
                 for key, runs in measured.items()]
        summaries.append(f"batch {batch_size}: {timed.summary()}")

    result = {
        "config": "tiny (4 blocks, width 32, 64 px, n_pro 6,5,4), full objective",
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "loader_workers": args.workers,
        "sharing_strategy": torch.multiprocessing.get_sharing_strategy(),
        "images_per_run": args.images_per_run,
        "rounds": args.rounds,
        "rows": rows,
        "summary": "; ".join(summaries),
    }
    result["markdown"] = render_markdown(result)
    print(json.dumps(result, indent=2))
    if args.json:
        temporary = f"{args.json}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
        os.replace(temporary, args.json)


if __name__ == "__main__":
    main()
