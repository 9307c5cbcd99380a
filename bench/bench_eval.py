"""Evaluation throughput per metric (images/s) on CPU: tiny config and ViT-B/14 reg4 at 518 (random weights).

    python bench/bench_eval.py [--classes 4] [--images_per_class 2] [--max_rounds 3] [--json OUT]

Each metric runs alone through `ivpt.evaluation.evaluate_interpretability` on a generated CUB folder (dataset caches
built first, outside the timings). Timings on bench/timing.py: the metrics of one config are the modes, interleaved
round by round (at least 2 rounds), runs disturbed by other processes flagged and excluded, min over clean runs.
The consistency+stability row counts its two inference passes (clean and noisy) per image; backbone passes per image
of every metric: bench_eval_passes.py.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from ivpt import IvptConfig, IvptForImageClassification
from ivpt.data import generate_cub
from ivpt.evaluation import EvaluationSettings, evaluate_interpretability

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402

CONFIGS = {
    "tiny (64 px)": dict(image_size=64, n_pro="6,5,4", backbone_kwargs={"embed_dim": 32, "depth": 4, "num_heads": 2,
                                                                         "patch_size": 8}),
    "ViT-B/14 reg4 (518 px)": dict(image_size=518),
}
METRIC_SETS = {"accuracy": ["accuracy"], "consistency+stability": ["consistency", "stability"],
               "nmi_ari": ["nmi_ari"], "kpr (fit on train + test)": ["kpr"], "fg_iou": ["fg_iou"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images_per_class", type=int, default=2)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--max_rounds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp())
    root = generate_cub(work / "cub", classes=args.classes, images_per_class=args.images_per_class, size=256, seed=0)
    test_images = args.classes * args.images_per_class // 2
    lines = ["| config | metric | images | seconds (min) | images/s | clean/flagged |", "|---|---|---|---|---|---|"]
    results = []
    summaries = []
    for name, kwargs in CONFIGS.items():
        torch.manual_seed(0)
        model = IvptForImageClassification(IvptConfig(num_labels=args.classes, **kwargs))
        # build the dataset caches once, outside the timings
        evaluate_interpretability(model, str(root), ["nmi_ari"], EvaluationSettings(max_images=1), device="cpu",
                                  cache_dir=str(work / "cache"))
        evaluate_interpretability(model, str(root), ["consistency"], EvaluationSettings(max_images=1),
                                  device="cpu", cache_dir=str(work / "cache"))
        modes = {label: (lambda names=names, model=model: evaluate_interpretability(
            model, str(root), names, EvaluationSettings(batch_size=4), device="cpu", cache_dir=str(work / "cache")))
            for label, names in METRIC_SETS.items()}
        result = timing.time_modes(modes, min_rounds=2, max_rounds=args.max_rounds, warmup=False,
                                   log=lambda line: print(line, file=sys.stderr, flush=True))
        summaries.append(f"{name}: {result.summary()}")
        for label in METRIC_SETS:
            seconds = result[label].min
            images = test_images * (2 if label.startswith("kpr") else 1)
            results.append({"config": name, "metric": label, "images": images, "seconds": seconds,
                            "median_seconds": result[label].median, "clean": len(result[label].clean),
                            "flagged": result[label].flagged})
            lines.append(f"| {name} | {label} | {images} | {seconds:.2f} | {images / seconds:.2f} "
                         f"| {result[label].counts()} |")
            print(lines[-1], flush=True)
    lines += [""] + [f"- {summary}" for summary in summaries]
    markdown = "\n".join(lines)
    print(markdown)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "markdown": markdown}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
