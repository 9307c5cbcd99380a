"""Evaluation passes: one preprocessing protocol + model forward over a split, shared by the metrics that need it.

| pass             | images                            | preprocessing                                             |
|------------------|-----------------------------------|-----------------------------------------------------------|
| `classification` | full images                       | resize short side + centre crop + ImageNet normalisation  |
| `box_crop`       | images cropped to the object box  | warp to image_size² + ImageNet normalisation (stability   |
|                  |                                   | adds N(0, 0.2²) noise clipped to ±0.25, seeded per image) |
| `parts`          | full images                       | short side + centre crop, not normalised unless           |
|                  |                                   | `normalise_parts_input`; masks: PIL nearest               |

A pass yields `PassOutputs` per batch: the preprocessed batch plus model outputs computed on first use (so the noisy
forward of the stability metric runs only when that metric is requested). Each pass also declares its model input
(`Pass.model_input`: the images, their preprocessing and the routing setting); passes declaring the same input over the
same split run together, batch by batch, and share one backbone pass per batch (`SharedForward`): with
`normalise_parts_input` and deterministic accuracy routing the classification and parts passes feed the model the
same tensors, so `--metrics all` runs one backbone pass per distinct model input and no more. Work is split across processes with
`accelerate` (`split_between_processes`: contiguous shards, no padding, on CPU as on GPU) and each metric's per-batch
records are gathered once, in rank order, so no image is counted twice and the merged records are in split order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Hashable, Iterator, Optional

import datasets
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from .. import metrics
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, consistency_transform, eval_transform, parts_eval_preprocess


@dataclass
class PassContext:
    """What every pass and metric reads: the model, the protocol settings and derived constants."""

    model: torch.nn.Module
    settings: "object"  # EvaluationSettings
    device: torch.device
    stage_index: int
    num_classes: int
    columns: frozenset  # schema columns present in the evaluated split

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, sample_routing_noise: bool = False):
        return self.model(pixel_values.to(self.device), sample_routing_noise=sample_routing_noise)

    def stage_maps(self, outputs) -> torch.Tensor:
        """Assignment maps of the evaluated stage, `(batch, num_prototypes, height, width)` float."""
        return outputs.assignment_maps[self.stage_index].float()

    def maps(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.stage_maps(self.forward(pixel_values))

    @property
    def accuracy_routing_noise(self) -> bool:
        noise = self.settings.sample_routing_noise
        if noise is None:
            config = self.model.config
            noise = config.gumbel_routing and config.sample_routing_noise_in_eval
        return bool(noise)


def _keypoint_rows(keypoints) -> torch.Tensor:
    """`datasets` keypoint dicts -> `(num_parts, 4)` float64 `[part_id, x, y, visible]`."""
    if not keypoints:
        return torch.zeros(0, 4, dtype=torch.float64)
    return torch.tensor([[k["part_id"], k["x"], k["y"], k["visible"]] for k in keypoints], dtype=torch.float64)


def integer_crop_box(bbox) -> tuple[int, int, int, int]:
    """The consistency protocol's integer box of `[x, y, w, h]`: (⌊x⌋, ⌊y⌋, ⌊x⌋ + ⌊w⌋, ⌊y⌋ + ⌊h⌋)."""
    x1, y1 = math.floor(bbox[0]), math.floor(bbox[1])
    return x1, y1, x1 + math.floor(bbox[2]), y1 + math.floor(bbox[3])


# ---------------------------------------------------------------------------------------------------------------------
# Outputs (lazy)
# ---------------------------------------------------------------------------------------------------------------------


class SharedForward:
    """The deterministic model output of one batch, shared by the passes that declare the same model input.

    The first pass to ask runs the model; the others reuse its output when their `pixel_values` are equal (they are,
    by their declaration; a pass whose tensors differ gets its own forward, so sharing never changes a number).
    Forwards with routing noise are random draws and are never shared.
    """

    def __init__(self, context: PassContext):
        self.context = context
        self._input: Optional[torch.Tensor] = None
        self._output = None

    def __call__(self, pixel_values: torch.Tensor, sample_routing_noise: bool = False):
        if sample_routing_noise:
            return self.context.forward(pixel_values, True)
        if self._input is None or not (self._input.shape == pixel_values.shape
                                       and torch.equal(self._input, pixel_values)):
            self._input, self._output = pixel_values, self.context.forward(pixel_values)
        return self._output


class PassOutputs:
    """One preprocessed batch (`batch[key]`: stacked tensors or lists) and the model outputs computed on demand."""

    def __init__(self, batch: dict, context: PassContext, shared: Optional[SharedForward] = None):
        self.batch, self.context = batch, context
        self.shared = shared if shared is not None else SharedForward(context)

    def __getitem__(self, key):
        return self.batch[key]

    def forward(self, sample_routing_noise: bool = False):
        """The model output on this batch's `pixel_values` (shared with the passes of the same model input)."""
        return self.shared(self.batch["pixel_values"], sample_routing_noise)


class ClassificationOutputs(PassOutputs):
    @cached_property
    def logits(self) -> torch.Tensor:  # (batch, num_classes) float, CPU
        return self.forward(self.context.accuracy_routing_noise).logits.float().cpu()


class BoxCropOutputs(PassOutputs):
    @cached_property
    def points_visible(self) -> tuple[torch.Tensor, torch.Tensor]:  # (batch, parts, 2) canvas points, (batch, parts)
        return metrics.part_points_on_canvas(self.batch["keypoints"], self.batch["boxes"], self.context.settings.canvas)

    @cached_property
    def maps(self) -> torch.Tensor:
        return self.context.stage_maps(self.forward())

    def _hits(self, maps: torch.Tensor, regions: Optional[torch.Tensor] = None) -> torch.Tensor:
        settings = self.context.settings
        if regions is None:
            regions = metrics.prototype_regions(maps, settings.canvas, settings.half_size)
        points, visible = self.points_visible
        return metrics.part_hits(regions, points.to(regions.device), visible.to(regions.device)).cpu()

    @cached_property
    def regions(self) -> torch.Tensor:  # (batch, foreground prototypes, 4)
        settings = self.context.settings
        return metrics.prototype_regions(self.maps, settings.canvas, settings.half_size)

    @cached_property
    def hits(self) -> torch.Tensor:  # (batch, foreground prototypes, parts) bool
        return self._hits(self.maps, self.regions)

    @cached_property
    def near_constant(self) -> list[int]:  # per image: maps whose peak is a tie (an absent prototype)
        return metrics.near_constant_maps(self.maps).sum(1).tolist()

    @cached_property
    def noisy_maps(self) -> torch.Tensor:
        settings = self.context.settings
        noisy = torch.stack([
            metrics.perturb_normalised_images(
                image[None], torch.Generator().manual_seed(settings.seed + int(seed)), std=settings.noise_std,
                clip=settings.noise_clip)[0]
            for image, seed in zip(self.batch["pixel_values"], self.batch["noise_seed"])
        ])
        return self.context.maps(noisy)

    @cached_property
    def noisy_hits(self) -> torch.Tensor:
        return self._hits(self.noisy_maps)

    @cached_property
    def noisy_near_constant(self) -> list[int]:
        return metrics.near_constant_maps(self.noisy_maps).sum(1).tolist()

    @cached_property
    def part_logits(self) -> torch.Tensor:
        return self.forward().part_logits.float().cpu()


class PartsOutputs(PassOutputs):
    @cached_property
    def maps(self) -> torch.Tensor:
        return self.context.stage_maps(self.forward())


# ---------------------------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------------------------


def _classification_preprocess(context: PassContext, source: datasets.Dataset) -> Callable:
    transform = eval_transform(context.image_size)
    return lambda row, index: {"pixel_values": transform(row["image"].convert("RGB")),
                               "labels": torch.tensor(int(row["label"]))}


def _noise_seed(row: dict, index: int) -> int:
    image_id = row.get("image_id")
    return int(image_id) if isinstance(image_id, int) else index


def _box_crop_preprocess(context: PassContext, source: datasets.Dataset) -> Callable:
    """Rows of the evaluated split (cut in memory to the integer box) or of a pre-cropped view (`crop_box` column,
    keypoints in crop coordinates, moved back here)."""
    transform = consistency_transform(context.image_size)
    precropped = "crop_box" in source.column_names

    def preprocess(row, index):
        keypoints = _keypoint_rows(row["keypoints"])
        if precropped:
            x1, y1, x2, y2 = row["crop_box"]
            keypoints[:, 1] += max(x1, 0)  # crop coordinates -> original coordinates (the crop origin is clamped)
            keypoints[:, 2] += max(y1, 0)
            image = row["image"].convert("RGB")
        else:
            x1, y1, x2, y2 = integer_crop_box(row["bbox"])
            full = row["image"].convert("RGB")
            box = (max(x1, 0), max(y1, 0), min(x2, full.width), min(y2, full.height))
            if box[2] <= box[0] or box[3] <= box[1]:
                raise ValueError(f"row {index}: box {row['bbox']} does not overlap the {full.width}x{full.height} image")
            image = full.crop(box)
        return {"pixel_values": transform(image), "keypoints": keypoints,
                "boxes": torch.tensor([x1, y1, x2 - x1, y2 - y1], dtype=torch.float64),
                "labels": torch.tensor(int(row["label"])), "noise_seed": _noise_seed(row, index)}

    return preprocess


def _resized_label_map(image, size: int) -> torch.Tensor:
    """A mask image -> `(size, size)` uint8, resized like the PIL image (PIL nearest) and centre-cropped."""
    return metrics.resize_mask_like_image(image, size)


def _parts_preprocess(context: PassContext, source: datasets.Dataset) -> Callable:
    size = context.image_size
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    columns = context.columns

    def preprocess(row, index):
        image = row["image"]
        keypoints = row["keypoints"] if "keypoints" in columns else []
        bbox = row["bbox"] if "bbox" in columns else [0.0, 0.0, float(image.width), float(image.height)]
        item = parts_eval_preprocess(image, keypoints if keypoints else torch.zeros(1, 4), bbox, size)
        if context.settings.normalise_parts_input:
            item["pixel_values"] = (item["pixel_values"] - mean) / std
        for column in ("mask", "part_mask"):
            if column in columns:
                if row[column] is None:
                    raise ValueError(f"row {index}: {column} is missing (null) while other rows have one")
                item[column] = _resized_label_map(row[column], size)
        return item

    return preprocess


# What a pass feeds the model, as (images, geometry, normalised, routing noise): passes with equal keys over the same
# split feed equal tensors and share their backbone pass.
def _classification_input(context: PassContext) -> Hashable:
    return ("full image", "short side + centre crop", True, context.accuracy_routing_noise)


def _box_crop_input(context: PassContext) -> Hashable:
    return ("object box", "warp", True, False)


def _parts_input(context: PassContext) -> Hashable:
    return ("full image", "short side + centre crop", context.settings.normalise_parts_input, False)


@dataclass(frozen=True)
class Pass:
    """An evaluation pass: how rows are preprocessed, the model input that preprocessing gives (a hashable key:
    passes with equal keys share backbone passes), and the outputs class its metrics read."""

    name: str
    preprocess: Callable[[PassContext, datasets.Dataset], Callable]
    model_input: Callable[[PassContext], Hashable]
    outputs: type


PASSES = {
    p.name: p
    for p in (
        Pass("classification", _classification_preprocess, _classification_input, ClassificationOutputs),
        Pass("box_crop", _box_crop_preprocess, _box_crop_input, BoxCropOutputs),
        Pass("parts", _parts_preprocess, _parts_input, PartsOutputs),
    )
}


def group_by_model_input(pass_names, context: PassContext, splits: dict[str, datasets.Dataset]) -> list[list[str]]:
    """`pass_names` grouped by (declared model input, split they run over: `splits[name]`), groups in order of first
    appearance; the passes of a group can run together on one backbone pass per batch."""
    groups: dict[Hashable, list[str]] = {}
    for name in pass_names:
        key = (PASSES[name].model_input(context), id(splits[name]))  # the same split object
        groups.setdefault(key, []).append(name)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------------------------------
# Sharded iteration and gathering
# ---------------------------------------------------------------------------------------------------------------------


def shard_indices(num_rows: int) -> list[int]:
    """This process's contiguous share of `range(num_rows)` (all of it in a single process)."""
    with PartialState().split_between_processes(list(range(num_rows))) as indices:
        return list(indices)


def _collate(rows: list[dict], chunk: list[int]) -> dict:
    batch = {k: torch.stack([r[k] for r in rows]) if torch.is_tensor(rows[0][k]) else [r[k] for r in rows]
             for k in rows[0]}
    batch["row_index"] = list(chunk)
    return batch


def iterate(passes: list[Pass], context: PassContext, split: datasets.Dataset,
            description: str) -> Iterator[dict[str, PassOutputs]]:
    """Preprocessed, collated batches of this process's shard: `{pass name: pass.outputs}` per batch, the outputs of
    one batch sharing one `SharedForward` (give `passes` of one model input, `group_by_model_input`)."""
    state = PartialState()
    preprocess = {p.name: p.preprocess(context, split) for p in passes}
    indices = shard_indices(len(split))
    size = context.settings.batch_size
    chunks = [indices[i : i + size] for i in range(0, len(indices), size)]
    for chunk in tqdm(chunks, desc=description, disable=not state.is_local_main_process):
        rows = [split[i] for i in chunk]
        shared = SharedForward(context)
        yield {p.name: p.outputs(_collate([preprocess[p.name](row, i) for row, i in zip(rows, chunk)], chunk),
                                 context, shared)
               for p in passes}


def gather_records(local: dict[str, list]) -> dict[str, list]:
    """Concatenates per-process record lists on every process (rank order = split order)."""
    if PartialState().num_processes == 1:
        return local
    return {key: gather_object(values) for key, values in local.items()}


__all__ = ["PASSES", "Pass", "PassContext", "PassOutputs", "SharedForward", "gather_records", "group_by_model_input",
           "integer_crop_box", "iterate", "shard_indices"]
