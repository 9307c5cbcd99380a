"""Every IVPT evaluation (ALGORITHM.md §6) on a CUB-layout dataset, each with its own protocol's preprocessing.

| metric        | images (§5.2)                   | preprocessing                                             |
|---------------|---------------------------------|-----------------------------------------------------------|
| accuracy      | full test images                | resize short side + centre crop + ImageNet normalisation  |
| consistency,  | box-cropped test images         | warp to image_size² + ImageNet normalisation; stability   |
| stability     |                                 | adds N(0, 0.2²) clipped ±0.25 noise (seeded per image)    |
| nmi_ari, kpr, | full test images (KPR fit: full | short side + centre crop, not normalised (§6.4, Q20)      |
| fg_iou        | train images)                   | unless `normalise_parts_input`; masks: PIL nearest        |

Interpretability metrics run with deterministic routing (no Gumbel noise), as the release's evaluation script; the
accuracy follows `sample_routing_noise` (default: the model config). Work is split across processes with
`accelerate` (`split_between_processes`, no padding) and gathered once, so no sample is counted twice.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from . import metrics
from .data import load_cub
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, consistency_transform, eval_transform, parts_eval_preprocess
from .report import parts_input_variant

METRICS = ("accuracy", "consistency", "stability", "nmi_ari", "kpr", "fg_iou")


@dataclass
class EvaluationSettings:
    """Protocol constants (§6.7) and run options. Defaults are the published protocol."""

    stage_index: int | None = None  # evaluated stage; None = config.interpretation_stage_index
    batch_size: int = 8
    seed: int = 0  # stability noise: image i uses torch.Generator().manual_seed(seed + image_id)
    max_images: int | None = None  # first N images of each split (quick runs)
    canvas: int = 224
    half_size: int = 36
    part_threshold: float = 0.8
    noise_std: float = 0.2
    noise_clip: float = 0.25
    mask_threshold: float = 0.5  # foreground = grey level >= 50 % of the maximum (§6.6 leaves it open)
    normalise_parts_input: bool = False  # Q20: the published NMI/ARI/KPR protocol feeds unnormalised images
    sample_routing_noise: bool | None = None  # accuracy only; None = model config


def parse_metrics(text: str | Sequence[str]) -> list[str]:
    """`"all"` or a comma list of `METRICS` -> list, with a clear error for unknown names."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if names == ["all"]:
        return list(METRICS)
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"--metrics: expected 'all' or a comma list of {', '.join(METRICS)}, got {text!r}")
    return names


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the config and every tensor of the model (identifies the evaluated weights in metrics.json)."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _limit(split, max_images: int | None):
    return split.select(range(min(len(split), max_images))) if max_images else split


def _batches(split, preprocess: Callable, batch_size: int, description: str) -> Iterator[dict]:
    """This process's share of `split`, preprocessed and collated. Tensors are stacked, everything else listed."""
    state = PartialState()
    with state.split_between_processes(list(range(len(split)))) as indices:
        chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        for chunk in tqdm(chunks, desc=description, disable=not state.is_local_main_process):
            rows = [preprocess(split[i]) for i in chunk]
            yield {k: torch.stack([r[k] for r in rows]) if torch.is_tensor(rows[0][k]) else [r[k] for r in rows]
                   for k in rows[0]}


def _gather(local: dict[str, list]) -> dict[str, list]:
    """Concatenates per-process lists of per-image records on every process."""
    if PartialState().num_processes == 1:
        return local
    return {key: gather_object(values) for key, values in local.items()}


def _keypoint_tensor(keypoints) -> torch.Tensor:
    """`datasets` keypoint dicts (or rows) -> `(num_parts, 4)` float64 `[part_id, x, y, visible]`."""
    if isinstance(keypoints[0], dict):
        return torch.tensor([[k["part_id"], k["x"], k["y"], k["visible"]] for k in keypoints], dtype=torch.float64)
    return torch.as_tensor(keypoints, dtype=torch.float64)


class _Runner:
    def __init__(self, model, settings: EvaluationSettings, device):
        self.model, self.settings, self.device = model, settings, device
        config = model.config
        self.stage_index = config.interpretation_stage_index if settings.stage_index is None else settings.stage_index
        self.image_size = config.image_size

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, sample_routing_noise: bool = False):
        return self.model(pixel_values.to(self.device), sample_routing_noise=sample_routing_noise)

    def maps(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.forward(pixel_values).assignment_maps[self.stage_index].float()

    # -- §6.1 ------------------------------------------------------------------------------------------------------
    def accuracy(self, split) -> dict:
        transform = eval_transform(self.image_size)
        noise = self.settings.sample_routing_noise
        if noise is None:
            noise = self.model.config.gumbel_routing and self.model.config.sample_routing_noise_in_eval
        preprocess = lambda row: {"pixel_values": transform(row["image"].convert("RGB")),  # noqa: E731
                                  "labels": torch.tensor(row["label"])}
        local = {"logits": [], "labels": []}
        for batch in _batches(split, preprocess, self.settings.batch_size, "accuracy"):
            local["logits"] += list(self.forward(batch["pixel_values"], noise).logits.float().cpu())
            local["labels"] += list(batch["labels"])
        records = _gather(local)
        logits, labels = torch.stack(records["logits"]), torch.stack(records["labels"])
        top_k = tuple(k for k in (1, 5) if k <= logits.shape[1])
        return {**metrics.classification_accuracies(logits, labels, top_k=top_k),
                "routing_noise": bool(noise), "num_images": len(labels)}

    # -- §6.2, §6.3 ------------------------------------------------------------------------------------------------
    def consistency_stability(self, split, num_classes: int, with_stability: bool, keep_examples: bool = False):
        settings = self.settings
        transform = consistency_transform(self.image_size)

        def preprocess(row):
            x1, y1, x2, y2 = row["crop_box"]
            keypoints = _keypoint_tensor(row["keypoints"])
            keypoints[:, 1] += max(x1, 0)  # crop coordinates -> original coordinates (the crop origin is clamped)
            keypoints[:, 2] += max(y1, 0)
            return {"pixel_values": transform(row["image"].convert("RGB")), "keypoints": keypoints,
                    "boxes": torch.tensor([x1, y1, x2 - x1, y2 - y1], dtype=torch.float64),
                    "labels": torch.tensor(row["label"]), "image_id": torch.tensor(row["image_id"])}

        local = {"hits": [], "noisy_hits": [], "visible": [], "labels": [], "examples": [], "near_constant": [],
                 "noisy_near_constant": []}
        for batch in _batches(split, preprocess, settings.batch_size, "consistency/stability"):
            points, visible = metrics.part_points_on_canvas(batch["keypoints"], batch["boxes"], settings.canvas)
            maps = self.maps(batch["pixel_values"])
            regions = metrics.prototype_regions(maps, settings.canvas, settings.half_size)
            local["near_constant"] += metrics.near_constant_maps(maps).sum(1).tolist()
            hits = metrics.part_hits(regions, points.to(regions.device), visible.to(regions.device))
            local["hits"] += list(hits.cpu())
            local["visible"] += list(visible)
            local["labels"] += list(batch["labels"])
            if with_stability:
                noisy = torch.stack([
                    metrics.perturb_normalised_images(
                        image[None], torch.Generator().manual_seed(settings.seed + int(image_id)),
                        std=settings.noise_std, clip=settings.noise_clip)[0]
                    for image, image_id in zip(batch["pixel_values"], batch["image_id"])
                ])
                noisy_maps = self.maps(noisy)
                noisy_regions = metrics.prototype_regions(noisy_maps, settings.canvas, settings.half_size)
                local["noisy_near_constant"] += metrics.near_constant_maps(noisy_maps).sum(1).tolist()
                local["noisy_hits"] += list(
                    metrics.part_hits(noisy_regions, points.to(regions.device), visible.to(regions.device)).cpu())
            if keep_examples:
                logits = self.forward(batch["pixel_values"]).part_logits.float().cpu()
                local["examples"] += [
                    dict(image=image, maps=m, regions=r, points=p, visible=v, label=int(label), part_logits=pl)
                    for image, m, r, p, v, label, pl in zip(batch["pixel_values"], maps.cpu(), regions.cpu(), points,
                                                             visible, batch["labels"], logits)
                ]
        records = _gather(local)
        hits, visible = torch.stack(records["hits"]), torch.stack(records["visible"])
        labels = torch.stack(records["labels"])
        result = {"consistency": metrics.consistency_score(hits, visible, labels, num_classes,
                                                           settings.part_threshold),
                  "num_images": len(labels),
                  # maps whose peak is a tie (an absent prototype); counted over (image, foreground prototype)
                  "near_constant_maps": int(sum(records["near_constant"])),
                  "num_maps": int(hits.shape[0] * hits.shape[1])}
        if with_stability:
            result["stability"] = metrics.stability_score(hits, torch.stack(records["noisy_hits"]), labels,
                                                          num_classes)
            result["near_constant_maps_perturbed"] = int(sum(records["noisy_near_constant"]))
        return result, records["examples"]

    # -- §6.4, §6.5, §6.6 ------------------------------------------------------------------------------------------
    def parts_pass(self, split, description: str, with_masks: bool) -> dict[str, list]:
        size = self.image_size
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]

        def preprocess(row):
            item = parts_eval_preprocess(row["image"], row["keypoints"], row["bbox"], size)
            if self.settings.normalise_parts_input:
                item["pixel_values"] = (item["pixel_values"] - mean) / std
            if with_masks:
                item["mask"] = metrics.resize_mask_like_image(row["mask"], size)
            return item

        local = {"predicted": [], "ground_truth": [], "features": [], "active": [], "keypoints": [],
                 "fg_counts": []}
        for batch in _batches(split, preprocess, self.settings.batch_size, description):
            maps = self.maps(batch["pixel_values"])
            keypoints = batch["keypoints"][..., 1:].double()  # (x, y, visible)
            predicted, ground_truth = metrics.keypoint_part_assignments(maps, keypoints.to(maps.device), size)
            local["predicted"].append(predicted.cpu())
            local["ground_truth"].append(ground_truth.cpu())
            features, active = metrics.part_centroid_features(maps, batch["bbox"].to(maps.device), size)
            local["features"] += list(features.cpu())
            local["active"] += list(active.cpu())
            local["keypoints"] += list(metrics.box_normalised_keypoints(keypoints, batch["bbox"].double()))
            if with_masks:
                local["fg_counts"].append(metrics.foreground_iou_counts(
                    maps, batch["mask"].to(maps.device), threshold=self.settings.mask_threshold).cpu())
        return _gather(local)


def evaluate_interpretability(
    model,
    data_dir: str,
    metric_names: Sequence[str] = METRICS,
    settings: EvaluationSettings | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | None = None,
    keep_examples: bool = False,
) -> dict:
    """Runs the requested metrics of §6 on the CUB-layout data in `data_dir` and returns a JSON-ready dict.

    With `keep_examples`, `result["examples"]` holds the per-image consistency inputs (normalised image, maps,
    regions, canvas points, label, part logits) for the consistency figures; it is not JSON-ready.
    """
    settings = settings or EvaluationSettings()
    metric_names = parse_metrics(list(metric_names))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    was_training = model.training
    model.eval().to(device)
    runner = _Runner(model, settings, device)
    result: dict = {"metrics": {}, "protocol": asdict(settings) | {"stage_index": runner.stage_index}}
    num_classes = model.config.num_labels
    try:
        if "accuracy" in metric_names:
            full = load_cub(data_dir, "full", cache_dir=cache_dir)
            result["metrics"]["accuracy"] = runner.accuracy(_limit(full["test"], settings.max_images))
        if {"consistency", "stability"} & set(metric_names):
            cropped = load_cub(data_dir, "cropped", cache_dir=cache_dir, segmentations=False)
            scores, examples = runner.consistency_stability(
                _limit(cropped["test"], settings.max_images), num_classes, "stability" in metric_names,
                keep_examples,
            )
            result["metrics"].update({k: v for k, v in scores.items() if k not in ("num_images", "num_maps")})
            result["metrics"]["consistency_num_images"] = scores["num_images"]
            result["metrics"]["consistency_num_maps"] = scores["num_maps"]
            result["examples"] = examples
        if {"nmi_ari", "kpr", "fg_iou"} & set(metric_names):
            result["metrics"].update(_parts_metrics(runner, data_dir, metric_names, settings, cache_dir))
    finally:
        model.train(was_training)
    result["model_fingerprint"] = model_fingerprint(model)
    return result


def _parts_metrics(runner: _Runner, data_dir, metric_names, settings, cache_dir) -> dict:
    with_masks = "fg_iou" in metric_names
    full = load_cub(data_dir, "full", cache_dir=cache_dir)
    test = _limit(full["test"], settings.max_images)
    if with_masks and test[0]["mask"] is None:
        raise FileNotFoundError(f"--metrics fg_iou: no segmentations/ folder or segmentations.tgz under {data_dir}")
    records = runner.parts_pass(test, "parts (test)", with_masks)
    out = {"parts_input": parts_input_variant(settings.normalise_parts_input)}
    if "nmi_ari" in metric_names:
        scores = metrics.nmi_ari(torch.cat(records["predicted"]), torch.cat(records["ground_truth"]))
        out.update(nmi=scores["nmi"], ari=scores["ari"], nmi_ari_num_keypoints=int(sum(map(len, records["predicted"]))))
    if "kpr" in metric_names:
        fit = runner.parts_pass(_limit(full["train"], settings.max_images), "parts (train, KPR fit)", False)
        out["kpr"] = metrics.keypoint_regression_error(
            torch.stack(fit["features"]), torch.stack(fit["active"]), torch.stack(fit["keypoints"]),
            torch.stack(records["features"]), torch.stack(records["active"]), torch.stack(records["keypoints"]),
        )
    if with_masks:
        out.update(metrics.foreground_iou_from_counts(torch.stack(records["fg_counts"]).sum(0)))
    return out


def chance_levels(num_classes: int) -> dict:
    """What a random predictor scores: accuracy 100/C (top-5: 500/C), NMI = ARI = 0."""
    return {"top1_micro": 100 / num_classes, "top5_micro": min(100.0, 500 / num_classes), "nmi": 0.0, "ari": 0.0}


def save_consistency_examples(model, examples: list[dict], out_dir, canvas: int = 224) -> None:
    """Consistency figures (§7.3) from `evaluate_interpretability(..., keep_examples=True)["examples"]`.

    Draws every class when there are at most 20, else every 20th (the release's choice).
    """
    from .visualization import denormalise, save_consistency_figures

    images = denormalise(torch.stack([e["image"] for e in examples]))
    images = torch.nn.functional.interpolate(images, size=(canvas, canvas), mode="bilinear", antialias=True)
    labels = torch.tensor([e["label"] for e in examples])
    num_classes = model.config.num_labels
    save_consistency_figures(
        images.clamp(0, 1), torch.stack([e["maps"] for e in examples]), torch.stack([e["regions"] for e in examples]),
        torch.stack([e["points"] for e in examples]), torch.stack([e["visible"] for e in examples]), labels, out_dir,
        part_scores=torch.stack([e["part_logits"] for e in examples]),
        classes=range(num_classes) if num_classes <= 20 else range(0, num_classes, 20),
    )
