"""`evaluate_dataset`: every registered metric whose columns a dataset provides; `evaluate_interpretability` for CUB.

Interpretability metrics run with deterministic routing (no Gumbel noise), as the release's evaluation script; the
accuracy follows `sample_routing_noise` (default: the model config). Metrics sharing a pass share its forward passes,
and passes feeding the model the same input share them too (`ivpt.evaluation.passes.group_by_model_input`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from accelerate import PartialState

from ..report import parts_input_variant
from .metrics import REGISTRY
from .passes import PASSES, PassContext, gather_records, group_by_model_input, iterate
from .schema import EvaluationData, label_names

METRICS = tuple(REGISTRY)  # the built-in metrics (parse_metrics reads the registry itself, extensions included)


class EvaluationError(ValueError):
    """Bad evaluation input (arguments, model/data mismatch); the message names the argument or the data."""


@dataclass
class EvaluationSettings:
    """Protocol constants and run options. Defaults are the published protocol."""

    stage_index: Optional[int] = None  # evaluated stage; None = config.interpretation_stage_index
    batch_size: int = 8
    seed: int = 0  # stability noise: image i uses torch.Generator().manual_seed(seed + image_id)
    max_images: Optional[int] = None  # first N images of each split (quick runs)
    canvas: int = 224
    half_size: int = 36  # consistency regions: rows and columns peak ± half_size, inclusive (0: the peak alone)
    part_threshold: float = 0.8
    noise_std: float = 0.2
    noise_clip: float = 0.25
    mask_threshold: float = 0.5  # foreground = grey level >= 50 % of the maximum
    normalise_parts_input: bool = False  # the published NMI/ARI/KPR protocol feeds unnormalised images
    sample_routing_noise: Optional[bool] = None  # accuracy only; None = model config

    def check(self, num_stages: Optional[int] = None) -> None:
        """Raises `EvaluationError` naming the first invalid option."""
        if self.batch_size < 1:
            raise EvaluationError(f"--batch_size: expected >= 1, got {self.batch_size}")
        if self.max_images is not None and self.max_images < 1:
            raise EvaluationError(f"--max_images: expected >= 1 (or unset for all images), got {self.max_images}")
        if self.half_size < 0:
            raise EvaluationError(f"--half_size: expected >= 0, got {self.half_size}")
        if not 0 <= self.mask_threshold <= 1:
            raise EvaluationError(f"--mask_threshold: expected a fraction in [0, 1], got {self.mask_threshold}")
        if num_stages is not None and self.stage_index is not None and not -num_stages <= self.stage_index < num_stages:
            raise EvaluationError(f"--stage_index: the model has {num_stages} stages, so expected an index in "
                                  f"[{-num_stages}, {num_stages - 1}], got {self.stage_index}")


def parse_metrics(text: str | Sequence[str]) -> list[str]:
    """`"all"` or a comma list of registered metric names -> list, with a clear error for unknown names."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if names == ["all"]:
        return list(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown or not names:
        raise EvaluationError(f"--metrics: expected 'all' or a comma list of {', '.join(REGISTRY)}, got {text!r}")
    return names


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the config and every tensor of the model (identifies the evaluated weights in metrics.json)."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _is_default_label(name: str, index: int) -> bool:
    return name in (f"LABEL_{index}", str(index))


def check_labels(model, data: EvaluationData) -> None:
    """The model's classes (`model` may be the model or its config) must be the dataset's, in the same order.

    Raises:
        EvaluationError: different class counts, a label out of the model's range, or label names that differ
            (models with default `LABEL_i` names are only checked on the count).
    """
    config = getattr(model, "config", model)
    num_labels = config.num_labels
    names = label_names(data.test)
    if names is not None and len(names) != num_labels:
        raise EvaluationError(f"{data.name}: the dataset has {len(names)} classes, the model {num_labels}; "
                              "evaluate a model trained on this dataset")
    labels = data.test.data.column("label").to_pylist()
    bad = [v for v in labels if v is None or not 0 <= int(v) < num_labels]
    if bad:
        raise EvaluationError(f"{data.name}: label {bad[0]} is outside the model's {num_labels} classes")
    if names is None:
        return
    model_names = [config.id2label[i] for i in range(num_labels)]
    if all(_is_default_label(n, i) for i, n in enumerate(model_names)):
        return
    if model_names != names:
        where = next(i for i, (a, b) in enumerate(zip(model_names, names)) if a != b)
        order = "in another order" if sorted(model_names) == sorted(names) else "different"
        raise EvaluationError(
            f"{data.name}: the model's class names are {order} than the dataset's (first difference at index "
            f"{where}: model {model_names[where]!r}, dataset {names[where]!r})"
        )


def evaluation_device(device: str | torch.device | None = None) -> torch.device:
    """The device to evaluate on, after setting up this process's `accelerate` state.

    The state is created with `cpu=True` when evaluating on the CPU: without it `accelerate` only forms a process
    group for accelerators, and every process of a CPU launch would evaluate the whole split. With it, the processes
    of `accelerate launch --multi_gpu --num_processes N` (gloo) shard the images on CPU as on GPU.
    """
    if device is not None:
        device = check_device(device)
    cpu = (device is not None and device.type == "cpu") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    return device if device is not None else state.device


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a `torch.device`; `EvaluationError` naming `--device` for a string torch does not know or an
    accelerator this machine does not have."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise EvaluationError(f"--device: {device!r} is not a torch device ('cpu', 'cuda', 'cuda:1', 'mps', ...)") \
            from error
    backend = getattr(torch, parsed.type, None)
    if parsed.type != "cpu" and not (backend is not None and hasattr(backend, "is_available")
                                     and backend.is_available()):
        raise EvaluationError(f"--device: {device!r}: no {parsed.type} device is available on this machine")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise EvaluationError(f"--device: {device!r}: this machine has {torch.cuda.device_count()} cuda device(s)")
    return parsed


def plan_metrics(metric_names: Sequence[str], data: EvaluationData) -> tuple[list[str], dict[str, str]]:
    """(metrics to run, {skipped metric: reason}) for the columns `data` provides."""
    run, skipped = [], {}
    for name in metric_names:
        metric = REGISTRY[name]
        missing = metric.missing_columns(data.columns)
        if missing:
            skipped[name] = f"the evaluated split has no {' / '.join(missing)} column"
        elif metric.fit_on_train and data.train is None:
            skipped[name] = "no train split to fit on"
        elif metric.fit_on_train and metric.missing_columns(data.train.column_names):
            skipped[name] = f"the train split has no {' / '.join(metric.missing_columns(data.train.column_names))} column"
        else:
            run.append(name)
    return run, skipped


def _run_passes(names: dict[str, list[str]], context: PassContext, split, description: str,
                keep_examples: bool = False) -> tuple[dict[str, dict], list, list[int]]:
    """Runs the passes of one model input (`names`: {pass name: its metrics}) together over `split`, one backbone pass
    per batch for all of them; returns the metrics' gathered records, the kept examples (of the `box_crop` pass) and
    the number of images each process evaluated."""
    local = {name: {} for metric_names in names.values() for name in metric_names}
    examples, count = [], 0
    for batch in iterate([PASSES[p] for p in names], context, split, description):
        count += len(next(iter(batch.values()))["row_index"])
        for pass_name, metric_names in names.items():
            for name in metric_names:
                for key, values in REGISTRY[name].collect(batch[pass_name]).items():
                    local[name].setdefault(key, []).extend(values)
        if keep_examples:
            outputs = batch["box_crop"]
            points, visible = outputs.points_visible
            examples += [
                dict(image=image, maps=m, regions=r, points=p, visible=v, label=int(label), part_logits=pl)
                for image, m, r, p, v, label, pl in zip(outputs["pixel_values"], outputs.maps.cpu(),
                                                        outputs.regions.cpu(), points, visible, outputs["labels"],
                                                        outputs.part_logits)
            ]
    gathered = {name: gather_records(records) for name, records in local.items()}
    counts = gather_records({"count": [count]})["count"]
    if keep_examples:
        examples = gather_records({"examples": examples})["examples"]
    return gathered, examples, counts


def evaluate_dataset(
    model,
    data: EvaluationData,
    metric_names: str | Sequence[str] = "all",
    settings: Optional[EvaluationSettings] = None,
    device: str | torch.device | None = None,
    keep_examples: bool = False,
) -> dict:
    """Runs the requested metrics on `data` (any dataset following `ivpt.evaluation.schema`); JSON-ready result.

    Metrics whose columns `data` lacks are not run: `result["skipped"]` says why for each. With `keep_examples`,
    `result["examples"]` holds the per-image consistency inputs (normalised crop, maps, regions, canvas points, label,
    part logits) for the consistency figures; it is not JSON-ready.

    Returns:
        `{"metrics": {...}, "skipped": {name: reason}, "protocol": {...}, "processes": {pass: [images per process]},
        "dataset": name, "model_fingerprint": ...}`.
    """
    settings = settings or EvaluationSettings()
    metric_names = parse_metrics(metric_names)
    config = model.config
    settings.check(len(config.n_pro))
    check_labels(model, data)
    data = data.limited(settings.max_images)
    device = evaluation_device(device)
    stage_index = config.interpretation_stage_index if settings.stage_index is None else settings.stage_index
    run, skipped = plan_metrics(metric_names, data)
    context = PassContext(model, settings, device, stage_index, config.num_labels, data.columns)
    result: dict = {"metrics": {}, "skipped": skipped, "dataset": data.name, "processes": {},
                    "protocol": asdict(settings) | {"stage_index": stage_index}}
    was_training = model.training
    model.eval().to(device)
    try:
        names = {p: [n for n in run if REGISTRY[n].pass_name == p] for p in PASSES}
        want_examples = keep_examples and {"bbox", "keypoints"} <= data.columns
        needed = [p for p in PASSES if names[p] or (want_examples and p == "box_crop")]
        splits = {p: data.box_crops if p == "box_crop" and data.box_crops is not None else data.test for p in needed}
        records, fit_records = {}, {}
        for group in group_by_model_input(needed, context, splits):
            split = splits[group[0]]
            group_records, examples, counts = _run_passes(
                {p: names[p] for p in group}, context, split, "+".join(group), want_examples and "box_crop" in group)
            records |= group_records
            result["processes"] |= {p: counts for p in group}
            if want_examples and "box_crop" in group:
                result["examples"] = examples
            fit = {p: [n for n in names[p] if REGISTRY[n].fit_on_train] for p in group}
            fit = {p: fit_names for p, fit_names in fit.items() if fit_names}
            if fit:
                fit_records |= _run_passes(fit, context, data.train, f"{'+'.join(fit)} (train, fit)")[0]
        for pass_name in needed:  # results in registry-pass order, whatever the grouping
            result["processes"][pass_name] = result["processes"].pop(pass_name)
            for name in names[pass_name]:
                result["metrics"].update(REGISTRY[name].reduce(records[name], fit_records.get(name), context))
            if pass_name == "parts" and names[pass_name]:  # every report names the input variant of the parts metrics
                result["metrics"]["parts_input"] = parts_input_variant(settings.normalise_parts_input)
    finally:
        model.train(was_training)
    result["model_fingerprint"] = model_fingerprint(model)
    return result


def evaluate_interpretability(
    model,
    data_dir: str,
    metric_names: str | Sequence[str] = "all",
    settings: Optional[EvaluationSettings] = None,
    device: str | torch.device | None = None,
    cache_dir: Optional[str] = None,
    keep_examples: bool = False,
) -> dict:
    """`evaluate_dataset` on the CUB-layout data in `data_dir` (folder or archive; `ivpt.evaluation.schema.from_cub`)."""
    from .schema import from_cub

    names = parse_metrics(metric_names)
    box_crops = keep_examples or bool({"consistency", "stability"} & set(names))
    return evaluate_dataset(model, from_cub(data_dir, cache_dir, box_crops=box_crops), names, settings, device,
                            keep_examples)


def report_rows(metric_names: Sequence[str] = "all") -> tuple:
    """The Markdown report rows of the given metrics, in registry order."""
    names = parse_metrics(metric_names)
    return tuple(row for name in REGISTRY if name in names for row in REGISTRY[name].report_rows)


def chance_levels(num_classes: int) -> dict:
    """What a random predictor scores: accuracy 100/C (top-5: 500/C), NMI = ARI = 0."""
    return {"top1_micro": 100 / num_classes, "top5_micro": min(100.0, 500 / num_classes), "nmi": 0.0, "ari": 0.0}


def save_consistency_examples(model, examples: list[dict], out_dir, canvas: int = 224) -> None:
    """Consistency figures from `evaluate_dataset(..., keep_examples=True)["examples"]`.

    Draws every class when there are at most 20, else every 20th (the release's choice).
    """
    from ..visualization import denormalise, save_consistency_figures

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
