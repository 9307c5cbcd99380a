"""Data pipeline throughput on one CPU core.

Measures, on a generated synthetic CUB:
  * synthetic generator speed (images/s at 224 px, JPEG + PNG mask written);
  * builder preparation speed of `load_cub` (images/s) for ``full`` and ``cropped``, and output
    images/s for ``cropped_augmented`` (30 outputs per training image);
  * on-the-fly docs/method.md#training-augmentation train transform at 518 px on CUB-sized (500 × 375) images, per core, without
    and with JPEG decoding; the docs/method.md#training-augmentation evaluation transform for comparison.

Every figure is timed with bench/timing.py: the jobs above run interleaved round by round in one process,
repetitions during which other processes used the CPU are flagged and excluded, images/s come from the min over
clean repetitions (median next to it), rounds go on until the min is stable; the table states clean/flagged counts.

Usage::

    python bench/bench_data.py [--classes 20 --images-per-class 30] [--max_rounds 6] [--json OUT]
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
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import datasets  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402
from ivpt.data import eval_transform, generate_cub, load_cub, train_transform  # noqa: E402
from cub_sized_images import cub_sized_jpegs  # noqa: E402


def transform_job(transform, jpegs: list[bytes], decode: bool):
    """One pass of `transform` over the images (decoding the JPEG bytes first when `decode`)."""
    from PIL import Image

    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in jpegs]

    def run() -> None:
        for data, image in zip(jpegs, decoded):
            if decode:
                image = Image.open(io.BytesIO(data)).convert("RGB")
            transform(image)

    return run


def builder_job(root: Path, work: Path, config: str):
    """`load_cub(root, config)` into a fresh cache (removed after): preparation of every split."""
    def run() -> None:
        cache = work / f"cache_{config}"
        load_cub(root, config, cache_dir=cache)
        shutil.rmtree(cache, ignore_errors=True)

    return run


def generator_job(work: Path, classes: int, images_per_class: int):
    """`generate_cub` at 224 px into a fresh folder (removed after)."""
    def run() -> None:
        root = generate_cub(work / "gen", classes=classes, images_per_class=images_per_class, size=224)
        shutil.rmtree(root, ignore_errors=True)

    return run


def count_rows(root: Path, work: Path, config: str) -> int:
    cache = work / f"count_{config}"
    rows = sum(split.num_rows for split in load_cub(root, config, cache_dir=cache).values())
    shutil.rmtree(cache, ignore_errors=True)
    return rows


def render_markdown(results: dict) -> str:
    lines = ["| job | images per run | images/s (min time) | images/s (median time) | seconds per run (min) "
             "| clean/flagged |", "|---|---|---|---|---|---|"]
    for name, row in results["jobs"].items():
        lines.append(f"| {DESCRIPTIONS[name]} | {row['count']} | {row['per_s']:.1f} | {row['per_s_median']:.1f} "
                     f"| {row['min_s']:.3f} | {row['clean']}/{row['flagged']} |")
    lines += ["", f"One process, {results['machine']['torch_threads']} torch thread, OMP_NUM_THREADS=1. "
              + results["summary"] + ". Rule: " + results["rule"] + "."]
    return "\n".join(lines)


DESCRIPTIONS = {
    "generator_224px": "synthetic CUB generator, 224 px (JPEG + PNG mask written)",
    "builder_full": "`load_cub` preparation, `full`",
    "builder_cropped": "`load_cub` preparation, `cropped`",
    "builder_cropped_augmented": "`load_cub` preparation, `cropped_augmented` (output rows)",
    "train_transform_518px": "train transform at 518 px, CUB-sized (500 × 375) images",
    "train_transform_518px_with_jpeg_decode": "the same with JPEG decoding",
    "eval_transform_518px": "evaluation transform at 518 px",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--images-per-class", type=int, default=30)
    parser.add_argument("--augmented-classes", type=int, default=5, help="classes of the cropped_augmented run")
    parser.add_argument("--transform-images", type=int, default=40)
    parser.add_argument("--max_rounds", type=int, default=6)
    parser.add_argument("--max_seconds", type=float, default=180, help="cap on the timed rounds")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    datasets.disable_progress_bars()

    results: dict = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},  # fmt: skip
    }
    jpegs = cub_sized_jpegs(args.transform_images)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = generate_cub(work / "source", classes=args.classes, images_per_class=args.images_per_class, size=224)
        small = generate_cub(work / "small", classes=args.augmented_classes, images_per_class=4, size=224)
        jobs = {
            "generator_224px": (generator_job(work, args.classes, args.images_per_class),
                                args.classes * args.images_per_class),
            "builder_full": (builder_job(root, work, "full"), count_rows(root, work, "full")),
            "builder_cropped": (builder_job(root, work, "cropped"), count_rows(root, work, "cropped")),
            "builder_cropped_augmented": (builder_job(small, work, "cropped_augmented"),
                                          count_rows(small, work, "cropped_augmented")),
            "train_transform_518px": (transform_job(train_transform(518), jpegs, decode=False), len(jpegs)),
            "train_transform_518px_with_jpeg_decode": (transform_job(train_transform(518), jpegs, decode=True),
                                                       len(jpegs)),
            "eval_transform_518px": (transform_job(eval_transform(518), jpegs, decode=False), len(jpegs)),
        }
        result = timing.time_modes({name: job for name, (job, _) in jobs.items()}, min_rounds=min(3, args.max_rounds),
                                   max_rounds=args.max_rounds, max_seconds=args.max_seconds,
                                   log=lambda line: print(line, file=sys.stderr, flush=True))
    results["jobs"] = {
        name: {"count": count, "per_s": count / result[name].min, "per_s_median": count / result[name].median,
               **result[name].to_json()}
        for name, (_, count) in jobs.items()
    }
    results.update(summary=result.summary(), rule=result.rule, rounds=result.rounds, stop_reason=result.stop_reason)
    results["markdown"] = render_markdown(results)
    print(results["markdown"])
    if args.json:
        temporary = f"{args.json}.tmp"
        Path(temporary).write_text(json.dumps(results, indent=2))
        os.replace(temporary, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
