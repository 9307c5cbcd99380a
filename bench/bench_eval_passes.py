"""Evaluation cost in backbone passes: how many times `evaluate_interpretability(..., metrics all)` runs the backbone
per test image, against the minimum its protocols need.

    python bench/bench_eval_passes.py [--json OUT]

Counting, not timing (so it is exact on any machine): a forward hook on the backbone's patch embedding sees every pass
and its batch; a tiny model on a generated CUB folder (3 test, 6 train images) is enough. Each pass's input is kept, so
passes fed equal inputs are found by comparing them: those could share one backbone pass (passes whose inputs differ
only by ImageNet normalisation share the decoding, resizing and cropping, not the pass). Variants: the published
protocol (parts metrics on unnormalised inputs),
`normalise_parts_input` (parts metrics on normalised inputs, as the demo reports), and `keep_examples` (the demo's
consistency figures).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from ivpt import IvptConfig, IvptForImageClassification
from ivpt.data import generate_cub
from ivpt.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ivpt.evaluation import EvaluationSettings, evaluate_interpretability

TINY = dict(image_size=64, n_pro="6,5,4", num_labels=3,
            backbone_kwargs={"embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 8})
VARIANTS = {
    "published protocol": (dict(), False),
    "normalise_parts_input": (dict(normalise_parts_input=True), False),
    "normalise_parts_input + keep_examples (demo)": (dict(normalise_parts_input=True), True),
}


def record_passes(model) -> list[torch.Tensor]:
    """Every backbone pass's input images (a hook on the patch embedding: one call per pass and batch)."""
    passes = []
    model.ivpt.backbone.patch_embed.register_forward_hook(lambda module, args, output: passes.append(args[0].clone()))
    return passes


def denormalised(images: torch.Tensor) -> torch.Tensor:
    return images * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]


def groups_of_equal(passes: list[torch.Tensor], same) -> list[list[int]]:
    """Groups of pass indices whose inputs `same(a, b)` says are equal."""
    groups, seen = [], set()
    for i, first in enumerate(passes):
        if i in seen:
            continue
        group = [i] + [j for j in range(i + 1, len(passes))
                       if j not in seen and passes[j].shape == first.shape and same(first, passes[j])]
        seen.update(group)
        groups.append(group)
    return groups


def equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-5)


def equal_up_to_normalisation(a: torch.Tensor, b: torch.Tensor) -> bool:
    return any(equal(x, y) for x in (a, denormalised(a)) for y in (b, denormalised(b)))


def count(root: Path, cache: Path, settings_kwargs: dict, keep_examples: bool, test_images: int) -> dict:
    torch.manual_seed(0)
    model = IvptForImageClassification(IvptConfig(**TINY)).eval()
    passes = record_passes(model)
    settings = EvaluationSettings(batch_size=64, **settings_kwargs)
    evaluate_interpretability(model, str(root), ["all"], settings, device="cpu", cache_dir=str(cache),
                              keep_examples=keep_examples)
    test_passes = [p for p in passes if len(p) == test_images]
    train_passes = len(passes) - len(test_passes)
    groups = groups_of_equal(test_passes, equal)
    images = groups_of_equal(test_passes, equal_up_to_normalisation)
    return {"test_passes_per_image": len(test_passes), "train_passes_per_image": train_passes,
            "distinct_inputs_per_test_image": len(groups),
            "shareable": [g for g in groups if len(g) > 1],
            "same_image_other_normalisation": [g for g in images if len(g) > 1 and g not in groups]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp())
    # 3 classes x 3 images: 3 test and 6 train images, so a pass's batch size tells its split (batch_size > images)
    root = generate_cub(work / "cub", classes=3, images_per_class=3, size=96, seed=0)
    test_images = 3
    results = {name: count(root, work / "cache", kwargs, keep, test_images)
               for name, (kwargs, keep) in VARIANTS.items()}
    order = "accuracy, consistency, stability, parts (NMI/ARI, KPR test side, fg IoU)"
    lines = ["| variant | backbone passes per test image | per train image (KPR fit) | distinct model inputs per "
             "test image (the minimum) | passes with equal inputs (could share one pass) | same image, other "
             "normalisation (preprocessing shareable, pass not) |", "|---|---|---|---|---|---|"]
    as_text = lambda groups: "; ".join("+".join(f"#{i + 1}" for i in g) for g in groups) or "none"  # noqa: E731
    for name, r in results.items():
        lines.append(f"| {name} | {r['test_passes_per_image']} | {r['train_passes_per_image']} "
                     f"| {r['distinct_inputs_per_test_image']} | {as_text(r['shareable'])} "
                     f"| {as_text(r['same_image_other_normalisation'])} |")
    lines.append("")
    for name, r in results.items():
        saved = r["test_passes_per_image"] - r["distinct_inputs_per_test_image"]
        lines.append(f"- {name}: {r['test_passes_per_image']} backbone passes per test image where "
                     f"{r['distinct_inputs_per_test_image']} would do" + (
                         f" (sharing saves {saved}, {100 * saved / r['test_passes_per_image']:.0f} % of the "
                         "test-side evaluation's backbone time)" if saved else " (nothing to share)"))
    lines += ["", f"Passes are numbered in the order they run ({order}; with keep_examples a second consistency "
              "pass for the figures' part logits follows the first). Counted with a hook on the backbone's patch "
              "embedding; equal inputs found by comparing them. Default config: accuracy without routing noise (as "
              "the interpretability passes), so equal inputs give equal outputs."]
    markdown = "\n".join(lines)
    print(markdown)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "markdown": markdown}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
