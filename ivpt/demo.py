"""`make demo`: the whole IVPT workflow offline, on synthetic birds, with its quality measured.

    python -m ivpt.demo [--output_dir demo_output] [--recipe ivpt/recipes/demo.yaml]
    python -m ivpt.demo --build_backbone      # pre-train the backbone once into the recipe's backbone_file

1. data: a synthetic CUB-200-2011 folder for IVPT (`ivpt.data.synthetic`);
2. backbone: a small DINOv2-family ViT pre-trained on another synthetic set, with a different class table (other
   attribute combinations), like real pre-training on other data (class labels plus a label-free dense objective,
   `ivpt.pretrain`), as a timm .safetensors file. A recipe may name a `backbone_file` (next to it) built once by
   `--build_backbone`, with the stamp of its pre-training settings in its header; the demo uses it while that stamp
   matches the recipe, and otherwise pre-trains here;
3. IVPT: `ivpt.training.main` (what `ivpt-train` / `train_ivpt.py` run) with the recipe, the backbone frozen and
   loaded from that file via `--backbone_weights` (the path a user takes with an offline DINOv2 copy);
4. evaluation: every metric of docs/method.md#evaluation-protocols for the trained model, the same model before IVPT
   training and chance;
5. report: `<output_dir>/report/` with metrics.json (with the acceptance thresholds and a k-means part probe of the
   backbone), report.md and figures.

Every step is cached under `<output_dir>` with a stamp of its inputs, so a second run only redoes what changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import yaml

# Shipped inside the package (package data), so an installed ivpt runs the demo without a checkout.
DEFAULT_RECIPE = Path(__file__).resolve().parent / "recipes" / "demo.yaml"
# Keys of the recipe's `demo:` section (the rest of the file is an `ivpt-train` recipe).
DEMO_KEYS = {"classes", "images_per_class", "data_image_size", "seed", "pretrain_classes",
             "pretrain_images_per_class", "pretrain_epochs", "pretrain_batch_size", "pretrain_learning_rate",
             "pretrain_dense_objective", "pretrain_dense_weight", "backbone_file"}
# Header key of a backbone file built by the demo: the stamp of its pre-training settings.
BACKBONE_STAMP_KEY = "ivpt_demo_backbone_stamp"
# The demo's quality bar on its test split (metrics.json "acceptance"): accuracy %, consistency %, NMI / ARI %
# (normalised input).
THRESHOLDS = {"top1_micro": 80.0, "consistency": 60.0, "nmi": 40.0, "ari": 25.0}


def log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def stamp_of(**inputs) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached(folder: Path, stamp: str) -> bool:
    marker = folder / ".demo_stamp"
    return marker.exists() and marker.read_text() == stamp


def mark(folder: Path, stamp: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".demo_stamp").write_text(stamp)


def load_recipe(path: Path) -> tuple[dict, dict]:
    """(demo settings, train_ivpt recipe) from the YAML file."""
    recipe = yaml.safe_load(path.read_text())
    demo = recipe.pop("demo", {})
    unknown, missing = set(demo) - DEMO_KEYS, DEMO_KEYS - {"backbone_file"} - set(demo)
    if unknown or missing:
        raise ValueError(f"{path.name}: the demo section has unknown keys {sorted(unknown)} and lacks {sorted(missing)}")
    return demo, recipe


def make_synthetic_cub(folder: Path, classes: int, images_per_class: int, size: int, seed: int) -> Path:
    from .data import generate_cub

    stamp = stamp_of(classes=classes, per_class=images_per_class, size=size, seed=seed)
    if not cached(folder, stamp):
        log(f"generating {folder.name}: {classes} classes x {images_per_class} images (seed {seed})")
        generate_cub(folder, classes, images_per_class, size, seed)
        mark(folder, stamp)
    return folder / "CUB_200_2011"


def pretrain_settings(demo: dict, recipe: dict) -> dict:
    """Everything the demo's backbone depends on: the pre-training set and the `ivpt.pretrain` arguments."""
    return dict(
        data=dict(classes=demo["pretrain_classes"], images_per_class=demo["pretrain_images_per_class"],
                  size=demo["data_image_size"], seed=demo["seed"] + 1),
        backbone=recipe["backbone"], backbone_kwargs=recipe["backbone_kwargs"], image_size=recipe["image_size"],
        epochs=demo["pretrain_epochs"], batch_size=demo["pretrain_batch_size"],
        learning_rate=demo["pretrain_learning_rate"], dense_objective=demo["pretrain_dense_objective"],
        dense_weight=demo["pretrain_dense_weight"], seed=demo["seed"],
    )


def build_backbone(out: Path, settings: dict, target: Path) -> dict:
    """Pre-trains the backbone of `settings` into `target` (its stamp in the file's header); returns the summary."""
    from .pretrain import pretrain_backbone

    kwargs = dict(settings)
    data = kwargs.pop("data")
    pretrain_root = make_synthetic_cub(out / "data" / "pretrain_cub", data["classes"], data["images_per_class"],
                                       data["size"], data["seed"])
    log(f"pre-training the backbone ({settings['backbone']} {settings['backbone_kwargs']}) on "
        f"{data['classes']} x {data['images_per_class']} synthetic images, {settings['epochs']} epochs")
    metadata = {BACKBONE_STAMP_KEY: stamp_of(**settings), "ivpt_demo_pretrain_settings": json.dumps(settings)}
    return pretrain_backbone(pretrain_root, target, cache_dir=str(out / "cache"), log=log, metadata=metadata,
                             **kwargs)


def file_stamp(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as weights:
        return (weights.metadata() or {}).get(BACKBONE_STAMP_KEY)


def make_backbone(out: Path, demo: dict, recipe: dict, recipe_path: Path) -> Path:
    """The recipe's backbone_file when it was built from the recipe's settings; otherwise one pre-trained here."""
    settings = pretrain_settings(demo, recipe)
    stamp = stamp_of(**settings)
    prebuilt = recipe_path.parent / demo["backbone_file"] if demo.get("backbone_file") else None
    if prebuilt is not None and prebuilt.exists():
        if file_stamp(prebuilt) == stamp:
            log(f"backbone: {prebuilt.name}, built for this recipe (rebuild: python -m ivpt.demo --build_backbone)")
            return prebuilt
        log(f"{prebuilt.name} was built from other pre-training settings than {recipe_path.name}'s: pre-training here")
    folder = out / "backbone"
    weights = folder / "backbone.safetensors"
    if not cached(folder, stamp):
        summary = build_backbone(out, settings, weights)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
        mark(folder, stamp)
    return weights


def train(out: Path, data_root: Path, weights: Path, recipe: dict) -> Path:
    from .training import main as train_main

    folder = out / "ivpt"
    recipe_path = out / "train_recipe.yaml"  # the recipe without its `demo:` section
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    argv = [str(recipe_path), "--data_dir", str(data_root), "--backbone_weights", str(weights), "--output_dir",
            str(folder), "--overwrite_output_dir", "true", "--dataset_cache_dir", str(out / "cache")]
    stamp = stamp_of(recipe=recipe, weights=weights.stat().st_mtime_ns, command=argv)
    if not cached(folder, stamp):
        log("training IVPT: ivpt-train " + " ".join(argv))
        train_main(argv)
        mark(folder, stamp)
    return folder


def untrained_model(checkpoint: Path, weights: Path):
    """The trained model's architecture with the pre-trained backbone and fresh IVPT tensors (seeded)."""
    from . import IvptConfig, IvptForImageClassification

    config = IvptConfig.from_pretrained(checkpoint)
    kwargs = {k: v for k, v in config.to_dict().items() if k in IvptConfig.__dataclass_fields__}
    kwargs.pop("backbone")
    torch.manual_seed(0)
    return IvptForImageClassification.from_backbone(config.backbone, backbone_weights=str(weights), **kwargs)


def evaluate(out: Path, checkpoint: Path, weights: Path, data_root: Path, demo: dict) -> dict:
    from transformers import AutoModelForImageClassification

    from .evaluation import EvaluationSettings, chance_levels, evaluate_interpretability

    folder = out / "report"
    # The demo's tiny backbone only knows normalised inputs, so the main table's part metrics use the normalised
    # variant; the published protocol's unnormalised input (evaluate_interpretability.py's default) is reported too,
    # in its own table (docs/method.md#parts-metric-input).
    settings = EvaluationSettings(batch_size=16, normalise_parts_input=True)
    published_input = dataclasses.replace(settings, normalise_parts_input=False)
    stamp = stamp_of(checkpoint=(checkpoint / "model.safetensors").stat().st_mtime_ns, data=str(data_root),
                     settings=settings, variants=2, thresholds=THRESHOLDS,
                     probes=(COLOUR_PROBE, "part_ceiling"))
    results_file = folder / "metrics.json"
    if cached(folder, stamp) and results_file.exists():
        return json.loads(results_file.read_text())
    trained = AutoModelForImageClassification.from_pretrained(checkpoint)
    results = {}
    for name, model in (("trained", trained), ("before IVPT training", untrained_model(checkpoint, weights))):
        log(f"evaluating the {name} model")
        result = evaluate_interpretability(model, str(data_root), settings=settings, device="cpu",
                                           cache_dir=str(out / "cache"), keep_examples=name == "trained")
        if name == "trained":
            write_figures(trained, result.pop("examples"), folder / "figures", data_root)
        log(f"evaluating the {name} model's part metrics on unnormalised input (the published protocol)")
        result["unnormalised_parts_input"] = evaluate_interpretability(
            model, str(data_root), ["nmi_ari", "kpr", "fg_iou"], settings=published_input, device="cpu",
            cache_dir=str(out / "cache"))
        results[name] = result
    results["chance"] = {"metrics": chance_levels(trained.config.num_labels)}
    results["acceptance"] = acceptance(results["trained"]["metrics"],
                                       results["trained"]["unnormalised_parts_input"]["metrics"])
    results["backbone_probe"] = backbone_probe(weights, trained.config, data_root, out / "cache")
    results["part_ceiling"] = part_ceiling(data_root, demo, trained.config, out / "cache")
    write_report(folder, results)
    mark(folder, stamp)
    return results


def acceptance(metrics: dict, unnormalised_parts: dict) -> dict:
    """The demo's quality bar: each value of `THRESHOLDS` with its measured value and whether it is met."""
    from .report import flatten_metrics

    values, unnormalised_parts = flatten_metrics(metrics), flatten_metrics(unnormalised_parts)
    checks = {key: {"value": values.get(key), "threshold": bar, "met": values.get(key, -math.inf) >= bar}
              for key, bar in THRESHOLDS.items()}
    return {"checks": checks, "all_met": all(check["met"] for check in checks.values()),
            "unnormalised_input": {"nmi": unnormalised_parts["nmi"], "ari": unnormalised_parts["ari"]}}


COLOUR_PROBE = "raw patch pixels, no backbone"


def backbone_probe(weights: Path, config, data_root: Path, cache_dir: Path) -> dict:
    """k-means part probe of the frozen backbone (`ivpt.pretrain.kmeans_part_probe`) at the interpreted stage's
    block and at the output, with as many clusters as the interpreted stage has prototypes, and the same probe on
    the raw patch pixels (`colour_part_probe`, key `COLOUR_PROBE`): the colour baseline the backbone must beat."""
    from .data import load_cub
    from .pretrain import colour_part_probe, kmeans_part_probe, load_backbone_file

    backbone = load_backbone_file(config.backbone, weights, config.image_size, **config.backbone_kwargs)
    test = load_cub(data_root, "full", cache_dir=str(cache_dir))["test"]
    depth, stages = len(backbone.blocks), len(config.n_pro)
    stage = config.interpretation_stage_index % stages
    block = depth - (stages - 1) + stage  # blocks before the interpreted stage
    clusters = config.n_pro[stage]
    probes = {f"after {b} blocks": kmeans_part_probe(backbone, test, config.image_size, clusters, b)
              for b in sorted({block, depth})}
    patch_size = backbone.patch_embed.patch_size[0]
    return probes | {COLOUR_PROBE: colour_part_probe(test, config.image_size, patch_size, clusters),
                     "num_clusters": clusters}


def part_ceiling(data_root: Path, demo: dict, config, cache_dir: Path) -> dict:
    """NMI / ARI of the drawn parts labelled perfectly at the model's patch grid
    (`ivpt.pretrain.perfect_labelling_scores`) on the demo test split: the generator draws every test bird again with
    its part map (`rerender_bird`; body, head, beak, eye, wing, tail, leg) and each patch takes the drawn part covering
    most of it. The reference to read the part bars against: what naming the drawn parts exactly scores at this grid
    (soft maps or other splits of the bird may score somewhat differently)."""
    import numpy as np
    from PIL import Image

    from .data import load_cub
    from .data.synthetic import PART_MAP_LABELS, rerender_bird
    from .data.transforms import keypoint_rows, parts_eval_preprocess
    from .pretrain import perfect_labelling_scores

    part_maps, keypoints = [], []
    for row in load_cub(data_root, "full", cache_dir=str(cache_dir))["test"]:
        bird = rerender_bird(row["image_id"], demo["classes"], demo["images_per_class"], demo["data_image_size"],
                             demo["seed"])
        if not np.allclose(bird.keypoints[:, :2], keypoint_rows(row["keypoints"])[:, 1:3].numpy(), atol=0.06):
            raise ValueError(f"{row['file_name']}: its keypoints differ from the bird the demo settings draw; the data "
                             f"in {data_root.name} was generated with other settings")
        item = parts_eval_preprocess(row["image"], row["keypoints"], row["bbox"], config.image_size)
        keypoints.append(item["keypoints"])
        size = (config.image_size, config.image_size)  # the synthetic images are square: no centre crop
        part_maps.append(torch.as_tensor(np.array(bird.part_map.resize(size, Image.NEAREST)), dtype=torch.long))
    return perfect_labelling_scores(torch.stack(part_maps), torch.stack(keypoints), config.image_size,
                                    config.grid_size, len(PART_MAP_LABELS) + 1)


def write_figures(model, examples: list[dict], folder: Path, data_root: Path) -> None:
    """Consistency figures, per-stage part overlays of a few test images, and one explain() figure."""
    from PIL import Image

    from . import explain
    from .evaluation import save_consistency_examples
    from .image_processing import make_image_processor
    from .visualization import denormalise, save_part_overlays, stage_names

    save_consistency_examples(model, examples, folder / "consistency", canvas=224)
    images = torch.stack([e["image"] for e in examples[:8]])
    with torch.no_grad():
        maps = model.eval()(images).assignment_maps
    save_part_overlays(denormalise(images), maps, folder / "parts", names=stage_names(model.config))
    image_path = sorted((data_root / "images").rglob("*.jpg"))[0]
    explanation = explain(model, make_image_processor(model.config.image_size), Image.open(image_path))
    explanation.save(folder / "explanation.png")


def write_report(folder: Path, results: dict) -> None:
    from .report import flatten_metrics, markdown_table, parts_input_note, write_atomic

    names = ("trained", "before IVPT training", "chance")
    columns = {name: results[name]["metrics"] for name in names}
    trained, before, chance = (flatten_metrics(results[k]["metrics"]) for k in names)
    gate, probe, ceiling = results["acceptance"], results["backbone_probe"], results["part_ceiling"]
    verdict = [
        f"- test accuracy {trained['top1_micro']:.1f}% vs chance {chance['top1_micro']:.1f}% "
        f"({trained['top1_micro'] / chance['top1_micro']:.1f}x)",
        f"- NMI {trained['nmi']:.1f} vs {before['nmi']:.1f} before IVPT training; "
        f"ARI {trained['ari']:.1f} vs {before['ari']:.1f} ({results['trained']['metrics']['parts_input']} input); "
        f"with unnormalised input (published protocol): "
        f"NMI {gate['unnormalised_input']['nmi']:.1f}, ARI {gate['unnormalised_input']['ari']:.1f}",
        *(f"- backbone k-means probe ({probe['num_clusters']} clusters) {where}: NMI {p['nmi']:.1f}, ARI {p['ari']:.1f}"
          for where, p in probe.items() if where not in ("num_clusters", COLOUR_PROBE)),
        f"- the same k-means on the {COLOUR_PROBE} (the colour baseline): NMI {probe[COLOUR_PROBE]['nmi']:.1f}, "
        f"ARI {probe[COLOUR_PROBE]['ari']:.1f}",
        f"- the {ceiling['num_parts']} drawn parts labelled perfectly at this {ceiling['grid']} x {ceiling['grid']} "
        f"patch grid (each patch takes the part covering most of it): "
        f"NMI {ceiling['nmi']:.1f}, ARI {ceiling['ari']:.1f}",
        "",
        f"Demo acceptance thresholds ({'all met' if gate['all_met'] else 'NOT all met'}):",
        "",
        *(f"- {key} {check['value']:.1f} >= {check['threshold']}: {'met' if check['met'] else 'NOT met'}"
          for key, check in gate["checks"].items()),
    ]
    unnormalised = {name: result["unnormalised_parts_input"]["metrics"] for name, result in results.items()
                    if "unnormalised_parts_input" in result}
    text = ("# IVPT demo report (synthetic CUB, tiny pre-trained ViT)\n\n" + markdown_table(columns) + "\n\n"
            + parts_input_note(results["trained"]["metrics"]["parts_input"]) + "\n\n" + "\n".join(verdict)
            + "\n\n## Part metrics with the published protocol's input\n\n" + markdown_table(unnormalised, {})
            + "\n\n" + parts_input_note(next(iter(unnormalised.values()))["parts_input"])
            + "\n\nFigures: `figures/` (consistency, per-stage parts, explanation.png).\n")
    write_atomic(folder / "report.md", text)
    write_atomic(folder / "metrics.json", json.dumps(results, indent=2, default=str))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE))
    parser.add_argument("--build_backbone", action="store_true",
                        help="pre-train the backbone into the recipe's backbone_file (make backbone) and stop")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    start = time.perf_counter()
    out = Path(args.output_dir).resolve()
    recipe_path = Path(args.recipe).resolve()
    demo, recipe = load_recipe(recipe_path)
    if args.build_backbone:
        if not demo.get("backbone_file"):
            parser.error(f"--build_backbone: {recipe_path.name} names no backbone_file in its demo section")
        target = recipe_path.parent / demo["backbone_file"]
        summary = build_backbone(out, pretrain_settings(demo, recipe), target)
        log(f"wrote {target.name} in {summary['seconds']:.0f} s (train accuracy {summary['train_accuracy']:.1f}%)")
        return summary
    data_root = make_synthetic_cub(out / "data" / "ivpt_cub", demo["classes"], demo["images_per_class"],
                                   demo["data_image_size"], demo["seed"])
    weights = make_backbone(out, demo, recipe, recipe_path)
    checkpoint = train(out, data_root, weights, recipe)
    results = evaluate(out, checkpoint, weights, data_root, demo)
    report = out / "report"
    print((report / "report.md").read_text())
    log(f"done in {time.perf_counter() - start:.0f} s")
    log(f"data:        {data_root}")
    log(f"backbone:    {weights}")
    log(f"checkpoint:  {checkpoint}  (AutoModelForImageClassification.from_pretrained(..., trust_remote_code=True))")
    log(f"report:      {report / 'report.md'}, {report / 'metrics.json'}, {report / 'figures'}")
    return results


if __name__ == "__main__":
    main()
