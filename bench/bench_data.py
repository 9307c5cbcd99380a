"""Data pipeline throughput on one CPU core.

Measures, on a generated synthetic CUB:
  * synthetic generator speed (images/s at 224 px, JPEG + PNG mask written);
  * builder preparation speed of `load_cub` (images/s) for ``full`` and ``cropped``, and output
    images/s for ``cropped_augmented`` (30 outputs per training image);
  * on-the-fly docs/method.md#training-augmentation train transform at 518 px on CUB-sized (500 × 375) images, per core, without
    and with JPEG decoding; the docs/method.md#training-augmentation evaluation transform for comparison.

Usage::

    python bench/bench_data.py [--classes 20 --images-per-class 30] [--json OUT]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ivpt.data import eval_transform, generate_cub, load_cub, train_transform  # noqa: E402
from ivpt.data.synthetic import class_attributes, render_bird  # noqa: E402


def _timed(function, *args, **kwargs) -> tuple[dict, object]:
    """Wall-clock and CPU seconds of one call (CPU time is robust to other load on the machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}, result


def _rates(times: dict, count: int) -> dict:
    return {**times, "count": count, "per_s": count / times["seconds"], "per_cpu_s": count / times["cpu_seconds"]}


def bench_generator(work: Path, classes: int, images_per_class: int) -> dict:
    times, root = _timed(generate_cub, work / "gen", classes=classes, images_per_class=images_per_class, size=224)
    return {**_rates(times, classes * images_per_class), "root": str(root)}


def bench_builder(root: Path, work: Path, config: str, **kwargs) -> dict:
    cache = work / f"cache_{config}"
    times, dataset = _timed(load_cub, root, config, cache_dir=cache, **kwargs)
    rows = sum(split.num_rows for split in dataset.values())
    shutil.rmtree(cache, ignore_errors=True)
    return _rates(times, rows)


def _cub_sized_images(count: int) -> list[bytes]:
    """JPEG bytes of 500 × 375 synthetic images (the typical CUB resolution)."""
    attributes = class_attributes(10, seed=0)
    out = []
    for index in range(count):
        bird = render_bird(attributes[index % 10], 500, np.random.default_rng([1, index]))
        buffer = io.BytesIO()
        bird.image.crop((0, 62, 500, 437)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def bench_transform(transform, jpegs: list[bytes], decode: bool, repeats: int = 2) -> dict:
    from PIL import Image

    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in jpegs]
    transform(decoded[0])  # warm-up

    def run() -> None:
        for _ in range(repeats):
            for data, image in zip(jpegs, decoded):
                if decode:
                    image = Image.open(io.BytesIO(data)).convert("RGB")
                transform(image)

    times, _ = _timed(run)
    return _rates(times, repeats * len(jpegs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--images-per-class", type=int, default=30)
    parser.add_argument("--augmented-classes", type=int, default=5, help="classes of the cropped_augmented run")
    parser.add_argument("--transform-images", type=int, default=40)
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    datasets.disable_progress_bars()

    results: dict = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},  # fmt: skip
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gen = bench_generator(work, args.classes, args.images_per_class)
        results["generator_224px"] = {k: v for k, v in gen.items() if k != "root"}
        root = Path(gen["root"])
        results["builder_full"] = bench_builder(root, work, "full")
        results["builder_cropped"] = bench_builder(root, work, "cropped")
        small = generate_cub(work / "small", classes=args.augmented_classes, images_per_class=4, size=224)
        results["builder_cropped_augmented"] = bench_builder(small, work, "cropped_augmented")

    jpegs = _cub_sized_images(args.transform_images)
    results["train_transform_518px"] = bench_transform(train_transform(518), jpegs, decode=False)
    results["train_transform_518px_with_jpeg_decode"] = bench_transform(train_transform(518), jpegs, decode=True)
    results["eval_transform_518px"] = bench_transform(eval_transform(518), jpegs, decode=False)

    for name, figures in results.items():
        if name == "machine":
            continue
        print(
            f"{name:40s} {figures['per_s']:7.1f} images/s wall, {figures['per_cpu_s']:7.1f} images per CPU-s "
            f"({figures['count']} images, {figures['seconds']:.2f} s)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
