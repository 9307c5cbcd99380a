#!/usr/bin/env python
"""Training throughput of `IvptTrainer` vs the model's bare training step in a plain loop (same process, same model).

    python bench/bench_trainer.py [--steps 30] [--warmup 5] [--batch_size 8] [--json OUT]

Three measurements on the tiny test configuration (4-block, 32-wide ViT at 64 px, n_pro 6,5,4, 7 classes), all on
CPU unless `--device cuda`:

* `bare`: pre-made batches → forward with labels (full objective) → backward → clip 2.0 → Adam step → zero grads;
* `trainer_tensors`: `IvptTrainer` on the same pre-made tensors (Trainer, scheduler, logging every 10 steps);
* `trainer_images`: `IvptTrainer` on PIL images with the §4.5 augmentation applied on the fly (the real pipeline).

Throughput is images per second between the end of the warm-up steps and the last step, both per wall-clock second
and per CPU second of this process (the latter is robust to other jobs on a shared machine); the best of `--rounds`
interleaved rounds is kept. The overhead of the Trainer is `1 - trainer / bare`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import datasets
import numpy as np
import torch
from PIL import Image
from transformers import TrainerCallback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ivpt import IvptConfig, IvptForImageClassification  # noqa: E402
from ivpt.trainer import IvptTrainer, IvptTrainingArguments, ivpt_parameter_groups  # noqa: E402
from ivpt.training_data import INDEX_COLUMN, SampleSeededTransform, build_transforms  # noqa: E402

TINY = dict(
    backbone_kwargs={"embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 8}, image_size=64, n_pro="6,5,4",
    num_labels=7,
)


def tiny_model(seed: int = 0) -> IvptForImageClassification:
    torch.manual_seed(seed)
    return IvptForImageClassification(IvptConfig(**TINY))


def _now() -> tuple[float, float]:
    """(wall, process CPU) seconds: CPU time is robust to other jobs sharing the machine, wall time is not."""
    return time.perf_counter(), time.process_time()


class _Clock(TrainerCallback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self.start = _now()
        self.end = _now()


def _rates(images: int, start, end) -> tuple[float, float]:
    return images / (end[0] - start[0]), images / (end[1] - start[1])


def bench_bare(steps: int, warmup: int, batch_size: int, device: str) -> tuple[float, float]:
    model = tiny_model().to(device).train()
    optimizer = torch.optim.Adam(ivpt_parameter_groups(model, 1e-6))
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(batch_size, 3, 64, 64, generator=generator), torch.randint(0, 7, (batch_size,), generator=generator))
        for _ in range(8)
    ]
    parameters = [p for p in model.parameters() if p.requires_grad]
    start = None
    for step in range(steps + warmup):
        if step == warmup:
            start = _now()
        pixels, labels = batches[step % len(batches)]
        loss = model(pixel_values=pixels.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 2.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
    return _rates(steps * batch_size, start, _now())


def bench_trainer(
    dataset, steps: int, warmup: int, batch_size: int, device: str, output_dir: str, workers: int
) -> tuple[float, float]:
    args = IvptTrainingArguments(
        output_dir=output_dir, max_steps=steps + warmup, per_device_train_batch_size=batch_size, logging_steps=10,
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=device == "cpu", dataloader_num_workers=workers,
        seed=0,
    )
    clock = _Clock(warmup)
    trainer = IvptTrainer(model=tiny_model(), args=args, train_dataset=dataset, callbacks=[clock])
    trainer.train()
    return _rates(steps * batch_size, clock.start, clock.end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0, help="dataloader workers of the image pipeline")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least noise on CPU)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the best is kept")
    parser.add_argument("--output_dir", default="/tmp/ivpt_bench_trainer")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    count = 64
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
    runs = {
        "bare": lambda: bench_bare(args.steps, args.warmup, args.batch_size, args.device),
        "trainer_tensors": lambda: bench_trainer(
            tensors, args.steps, args.warmup, args.batch_size, args.device, args.output_dir, 0
        ),
        "trainer_images": lambda: bench_trainer(
            images, args.steps, args.warmup, args.batch_size, args.device, args.output_dir, args.workers
        ),
    }
    # Interleaved rounds share the machine's load fairly; the best round of each kind is kept.
    wall = {key: 0.0 for key in runs}
    cpu = {key: 0.0 for key in runs}
    for _ in range(args.rounds):
        for key, run in runs.items():
            wall_rate, cpu_rate = run()
            wall[key], cpu[key] = max(wall[key], wall_rate), max(cpu[key], cpu_rate)

    result = {
        "config": "tiny (4 blocks, width 32, 64 px, n_pro 6,5,4), full objective",
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "rounds": args.rounds,
        "images_per_second_wall": {key: round(value, 2) for key, value in wall.items()},
        "images_per_cpu_second": {key: round(value, 2) for key, value in cpu.items()},
        "trainer_overhead_wall": {key: round(1 - wall[key] / wall["bare"], 4) for key in runs if key != "bare"},
        "trainer_overhead_cpu": {key: round(1 - cpu[key] / cpu["bare"], 4) for key in runs if key != "bare"},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        temporary = f"{args.json}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
        os.replace(temporary, args.json)


if __name__ == "__main__":
    main()
