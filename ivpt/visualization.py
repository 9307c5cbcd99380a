"""Visualisations of IVPT part prototypes (docs/method.md#visualisation, with the docs/method.md#quirks [hierarchy threshold 0.1] and docs/method.md#quirks [hierarchy figure crashes] fixes).

Three families of pictures, all drawn on the CPU from tensors on any device:

* docs/method.md#part-overlays per-stage part segmentation overlays ([`save_part_overlays`]) and the per-prototype crop mosaics that feed the
  gallery ([`save_prototype_mosaics`]);
* docs/method.md#hierarchy the hierarchical prototype view: the relation of every intermediate prototype to the final parts
  ([`relation_matrices`], [`prototype_parents`]), the on-disk gallery ([`build_prototype_gallery`]) and the multi-row
  figure, one row per stage and one column per final part ([`hierarchy_figure`], [`save_hierarchy_figures`]);
* docs/method.md#consistency-figures the consistency-evaluation figures ([`save_consistency_figures`]).

Stages are named like the release, `Layer_<blocks already applied>` ([`stage_names`], computed from the config, docs/method.md#notation).
The single-image explanation ([`explain`], [`Explanation`]) and the pipeline route
([`IvptImageClassificationPipeline`]) live in `ivpt/explanation.py` and are re-exported here.

Images are composed with numpy + Pillow (exact pixel sizes); only the multi-row figure is a matplotlib `Figure`, built
without `pyplot` (no backend or global state involved). Every PNG is written atomically (temporary file + rename).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
import importlib
import math
import os
from pathlib import Path
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw, ImageFont
import torch
import torch.nn.functional as F
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = [
    "stage_names",
    "denormalise",
    "categorical_palette",
    "grid_shape",
    "label_maps",
    "save_part_overlays",
    "prototype_crops",
    "tile_mosaic",
    "save_prototype_mosaics",
    "empty_prototype_mask",
    "relation_matrices",
    "prototype_parents",
    "build_prototype_gallery",
    "hierarchy_cells",
    "hierarchy_figure",
    "save_hierarchy_figures",
    "save_hierarchy_gallery",
    "save_consistency_figures",
    "Explanation",
    "explain",
    "IvptImageClassificationPipeline",
]

_EXPLAIN_NAMES = ("Explanation", "explain", "IvptImageClassificationPipeline")


def __getattr__(name: str):
    # Lazy re-export from `ivpt/explanation.py`, which itself imports this module (no import cycle at load time).
    if name in _EXPLAIN_NAMES:
        return getattr(importlib.import_module(f"{__package__}.explanation"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------------------------


def stage_names(config) -> list[str]:
    """Names of the `S + 1` stages, `Layer_<depth - S + s>` (docs/method.md#notation: "Layer_8 … Layer_12" for ViT-B, S = 4).

    The number is the count of backbone blocks already applied when the stage map is computed; the depth is read from
    the config (docs/method.md#quirks [hierarchy figure crashes]: not hard-coded to 12).

    Args:
        config ([`IvptConfig`]): the model configuration (`backbone_geometry["depth"]`, `num_prompted_blocks`).
    """
    depth = config.backbone_geometry["depth"]
    num_prompted = config.num_prompted_blocks
    return [f"Layer_{depth - num_prompted + s}" for s in range(num_prompted + 1)]


def denormalise(
    pixel_values: torch.Tensor,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> torch.Tensor:
    """Undo the image processor's normalisation.

    Args:
        pixel_values (`torch.Tensor` of shape `(batch_size, 3, height, width)` or `(3, height, width)`): normalised
            images, any device.
        mean, std (`Sequence[float]` of length 3): the processor's `image_mean` / `image_std` (ImageNet by default).

    Returns:
        `torch.FloatTensor` of the same shape, on the CPU, clamped to [0, 1].
    """
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim not in (3, 4) or pixel_values.shape[-3] != 3:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"Expected `pixel_values` of shape (batch_size, 3, height, width), got {shape}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"Expected `mean` and `std` with 3 values, got {list(mean)} and {list(std)}")
    values = pixel_values.detach().float().cpu()
    mean_ = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_ = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (values * std_ + mean_).clamp(0.0, 1.0)


@lru_cache(maxsize=None)
def _base_palette() -> np.ndarray:
    # No glasbey package: a fixed 60-colour categorical list from matplotlib's qualitative maps. tab20's saturated
    # colours first, then its light twins, then tab20b / tab20c in strides of 4 so that neighbouring indices differ in
    # hue rather than in shade.
    from matplotlib import colormaps

    tab20 = colormaps["tab20"].colors
    tab20b = colormaps["tab20b"].colors
    tab20c = colormaps["tab20c"].colors
    order4 = [i + j for j in range(4) for i in range(0, 20, 4)]
    colours = [tab20[i] for i in range(0, 20, 2)] + [tab20[i] for i in range(1, 20, 2)]
    colours += [tab20b[i] for i in order4] + [tab20c[i] for i in order4]
    return np.asarray(colours, dtype=np.float32)[:, :3]


def categorical_palette(num_colours: int) -> np.ndarray:
    """`(num_colours, 3)` float RGB in [0, 1]: a fixed list of 60 distinct colours, repeated cyclically beyond 60."""
    base = _base_palette()
    return base[np.arange(num_colours) % len(base)]


def grid_shape(num_images: int) -> tuple[int, int]:
    """`(rows, cols)` of the overlay grid: the two largest complementary factors, cols <= rows (4 -> 2x2, 6 -> 3x2)."""
    if num_images < 1:
        raise ValueError(f"Expected `num_images` >= 1, got {num_images}")
    cols = max(d for d in range(1, math.isqrt(num_images) + 1) if num_images % d == 0)
    return num_images // cols, cols


def _check_maps(maps: torch.Tensor, name: str, batch_size: int | None = None) -> None:
    if not isinstance(maps, torch.Tensor) or maps.ndim != 4:
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"Expected `{name}` of shape (batch_size, num_prototypes, height, width), got {shape}")
    if batch_size is not None and maps.shape[0] != batch_size:
        raise ValueError(f"Expected `{name}` with batch size {batch_size} (as the images), got {tuple(maps.shape)}")


def _check_images(images: torch.Tensor, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"Expected `{name}` of shape (batch_size, 3, height, width) in [0, 1], got {shape}")


def _as_stage_tuple(assignment_maps) -> tuple[torch.Tensor, ...]:
    return (assignment_maps,) if isinstance(assignment_maps, torch.Tensor) else tuple(assignment_maps)


def label_maps(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Per-pixel arg-max prototype after bilinear upsampling (`align_corners=True`, as the release, docs/method.md#part-overlays).

    Args:
        maps (`torch.Tensor` of shape `(batch_size, num_prototypes, height, width)`): one stage's assignment maps.
        size (`int` or `(height, width)`): output size.

    Returns:
        `torch.LongTensor` of shape `(batch_size, *size)` on the CPU; the background is label `num_prototypes - 1`.
    """
    _check_maps(maps, "maps")
    size = (size, size) if isinstance(size, int) else tuple(size)
    upsampled = F.interpolate(maps.detach().float().cpu(), size=size, mode="bilinear", align_corners=True)
    return upsampled.argmax(dim=1)


def _resize_images(images: torch.Tensor, size: int) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, size, size, 3) float32 numpy in [0, 1]."""
    images = images.detach().float().cpu()
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return images.clamp(0.0, 1.0).permute(0, 2, 3, 1).numpy()


def _blend(image: np.ndarray, labels: np.ndarray, colours: np.ndarray, alpha: float, mask: np.ndarray) -> np.ndarray:
    """Blend `colours[labels]` into `image` (H, W, 3) where `mask` is true."""
    out = image.copy()
    out[mask] = (1.0 - alpha) * image[mask] + alpha * colours[labels[mask]]
    return out


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8))


@lru_cache(maxsize=8)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _atomic_save(picture, path: str | os.PathLike) -> Path:
    """Write a PIL image or a matplotlib figure as PNG through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(handle)
    try:
        if isinstance(picture, Image.Image):
            picture.save(temporary, format="PNG")
        else:
            picture.savefig(temporary, format="png")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------------------------------------------------------
# docs/method.md#part-overlays Per-stage overlays and crop mosaics
# ------------------------------------------------------------------------------------------------------------------


def _overlay_tile(
    image: np.ndarray, labels: np.ndarray, background: int, alpha: float, colours: np.ndarray | None = None
) -> Image.Image:
    """One image with its label map blended (background transparent) and each label's index at its centroid."""
    colours = categorical_palette(background + 1) if colours is None else colours
    tile = _to_pil(_blend(image, labels, colours, alpha, labels != background))
    draw = ImageDraw.Draw(tile)
    font = _font(max(8, image.shape[0] // 20))
    for label in np.unique(labels):
        if label == background:
            continue
        rows, cols = np.nonzero(labels == label)
        draw.text(
            (float(cols.mean()), float(rows.mean())), str(int(label)), fill="white", font=font, anchor="mm",
            stroke_width=1, stroke_fill="black",
        )
    return tile


def save_part_overlays(
    images: torch.Tensor,
    assignment_maps: Sequence[torch.Tensor] | torch.Tensor,
    out_path: str | os.PathLike,
    size: int = 256,
    names: Sequence[str] | None = None,
    alpha: float = 0.5,
    mosaic_dir: str | os.PathLike | None = None,
    mosaic_name: str = "mosaic",
) -> list[Path]:
    """Per-stage part segmentation overlays of one batch (docs/method.md#part-overlays).

    Each image is resized to `size × size`; each stage map is bilinearly upsampled (`align_corners=True`) and
    arg-maxed; the label map is blended at `alpha` with a categorical palette, the background (last index) left
    transparent, and each foreground label's index is printed at its centroid. The images are tiled in a
    `rows × cols` grid ([`grid_shape`]: the two largest factors of the batch size).

    Args:
        images (`torch.Tensor` of shape `(batch_size, 3, height, width)`): images in [0, 1] (see [`denormalise`]).
        assignment_maps (sequence of `torch.Tensor` of shape `(batch_size, n_pro[s], h, w)`): the model's
            `assignment_maps` (one tensor is accepted as a single stage).
        out_path (`str` or `os.PathLike`): file-name prefix; stage `s` is written to `<out_path>_<names[s]>.png`
            (folders are created), e.g. `results_vis/0_10_cub` -> `results_vis/0_10_cub_Layer_8.png`.
        size (`int`, defaults to 256): side of each image tile in pixels.
        names (`Sequence[str]`, *optional*): one name per stage, normally [`stage_names`]`(config)`; defaults to
            `stage0`, `stage1`, ...
        alpha (`float`, defaults to 0.5): opacity of the colours.
        mosaic_dir (`str` or `os.PathLike`, *optional*): when given, also write the per-prototype crop mosaics of
            every stage `s` to `<mosaic_dir>/<s>/<prototype>/<mosaic_name>.png` ([`save_prototype_mosaics`]), the raw
            material of [`build_prototype_gallery`].
        mosaic_name (`str`, defaults to `"mosaic"`): file stem of the mosaics (the release uses `<epoch>_<iter>`).

    Returns:
        The written overlay paths, one per stage; each PNG is `(cols * size) × (rows * size)` pixels.
    """
    _check_images(images)
    stages = _as_stage_tuple(assignment_maps)
    names = list(names) if names is not None else [f"stage{s}" for s in range(len(stages))]
    if len(names) != len(stages):
        raise ValueError(f"Expected `names` with one entry per stage ({len(stages)}), got {len(names)}")
    resized = _resize_images(images, size)
    rows, cols = grid_shape(len(resized))
    written = []
    for s, (maps, name) in enumerate(zip(stages, names)):
        _check_maps(maps, f"assignment_maps[{s}]", len(resized))
        labels = label_maps(maps, size).numpy()
        background = maps.shape[1] - 1
        canvas = Image.new("RGB", (cols * size, rows * size))
        for b in range(len(resized)):
            tile = _overlay_tile(resized[b], labels[b], background, alpha)
            canvas.paste(tile, ((b % cols) * size, (b // cols) * size))
        written.append(_atomic_save(canvas, f"{os.fspath(out_path)}_{name}.png"))
        if mosaic_dir is not None:
            save_prototype_mosaics(resized, labels, Path(mosaic_dir) / str(s), background, name=mosaic_name)
    return written


def prototype_crops(
    images: np.ndarray, labels: np.ndarray, label: int, tile: int = 64, min_side: int = 3
) -> list[np.ndarray]:
    """Crops of the bounding box of `label`'s pixels in every image that contains it (docs/method.md#part-overlays).

    Args:
        images (`np.ndarray` of shape `(batch_size, height, width, 3)`): float images in [0, 1].
        labels (`np.ndarray` of shape `(batch_size, height, width)`): arg-max label maps at the images' size.
        label (`int`): the prototype index.
        tile (`int`, defaults to 64): side of each resized crop.
        min_side (`int`, defaults to 3): boxes thinner than this are widened (centred, inside the image).

    Returns:
        A list of `(tile, tile, 3)` uint8 arrays, in batch order.
    """
    crops = []
    for image, label_map in zip(images, labels):
        rows, cols = np.nonzero(label_map == label)
        if rows.size == 0:
            continue
        r0, r1 = _widen(rows.min(), rows.max() + 1, label_map.shape[0], min_side)
        c0, c1 = _widen(cols.min(), cols.max() + 1, label_map.shape[1], min_side)
        crop = _to_pil(image[r0:r1, c0:c1]).resize((tile, tile), Image.BILINEAR)
        crops.append(np.asarray(crop))
    return crops


def _widen(low: int, high: int, extent: int, min_side: int) -> tuple[int, int]:
    """Widen the half-open interval `[low, high)` to at least `min_side` (centred, kept inside `[0, extent)`)."""
    side = min(min_side, extent)
    if high - low >= side:
        return int(low), int(high)
    low = min(max(0, (low + high) // 2 - side // 2), extent - side)
    return int(low), int(low + side)


def tile_mosaic(crops: Sequence[np.ndarray], tile: int = 64) -> np.ndarray:
    """Square mosaic of the first `⌊√n⌋²` crops (row-major); a black `tile × tile` image if there are none.

    Returns:
        `np.ndarray` of shape `(m * tile, m * tile, 3)`, uint8, with `m = max(1, ⌊√n⌋)`.
    """
    side = math.isqrt(len(crops))
    if side == 0:
        return np.zeros((tile, tile, 3), dtype=np.uint8)
    mosaic = np.zeros((side * tile, side * tile, 3), dtype=np.uint8)
    for i, crop in enumerate(crops[: side * side]):
        r, c = divmod(i, side)
        mosaic[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = crop
    return mosaic


def save_prototype_mosaics(
    images: np.ndarray,
    labels: np.ndarray,
    out_dir: str | os.PathLike,
    background: int,
    name: str = "mosaic",
    tile: int = 64,
) -> dict[int, Path]:
    """Write one crop mosaic per foreground prototype present in the batch (docs/method.md#part-overlays).

    Fixes docs/method.md#quirks [hierarchy figure crashes]: every foreground label present is drawn, the highest one included (the release loops over
    `0..max_label-1`). Prototypes absent from the batch get no folder.

    Args:
        images (`np.ndarray` of shape `(batch_size, height, width, 3)`): float images in [0, 1].
        labels (`np.ndarray` of shape `(batch_size, height, width)`): arg-max label maps (see [`label_maps`]).
        out_dir (`str` or `os.PathLike`): the stage folder; prototype `j` goes to `<out_dir>/<j>/<name>.png`.
        background (`int`): the background label (the stage's last index), never drawn.
        name (`str`, defaults to `"mosaic"`): file stem.
        tile (`int`, defaults to 64): side of each crop.

    Returns:
        `{prototype: path}` for the mosaics written.
    """
    written = {}
    for label in np.unique(labels):
        if label == background:
            continue
        mosaic = tile_mosaic(prototype_crops(images, labels, int(label), tile=tile), tile=tile)
        written[int(label)] = _atomic_save(Image.fromarray(mosaic), Path(out_dir) / str(int(label)) / f"{name}.png")
    return written


# ------------------------------------------------------------------------------------------------------------------
# docs/method.md#hierarchy Hierarchy: relation matrices, gallery, multi-row figure
# ------------------------------------------------------------------------------------------------------------------


def empty_prototype_mask(routing_weights: torch.Tensor) -> torch.Tensor:
    """Which routing rows belong to empty prototypes (no pixel picked them in that image).

    The model overwrites those rows with exactly `1.0 / K` (docs/method.md#routing-to-the-final-parts step 4); the comparison is made in the
    tensor's own dtype, so it holds for float32 and bfloat16 outputs alike (fixes docs/method.md#quirks [hierarchy threshold 0.1], which compared with 0.1).

    Args:
        routing_weights (`torch.Tensor` of shape `(batch_size, num_foreground_prototypes, num_parts)`).

    Returns:
        `torch.BoolTensor` of shape `(batch_size, num_foreground_prototypes)`.
    """
    if not isinstance(routing_weights, torch.Tensor) or routing_weights.ndim != 3:
        shape = tuple(routing_weights.shape) if isinstance(routing_weights, torch.Tensor) else type(routing_weights)
        raise ValueError(
            f"Expected `routing_weights` of shape (batch_size, num_foreground_prototypes, num_parts), got {shape}"
        )
    return (routing_weights == 1.0 / routing_weights.shape[-1]).all(dim=-1)


def _renormalise_rows(matrix: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(matrix / matrix.sum(dim=-1, keepdim=True), nan=0.0)


def relation_matrices(routing_batches: Iterable[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Prototype -> final-part relation of every intermediate stage over a dataset (docs/method.md#hierarchy step 1).

    For each batch and stage, the routing matrices `G_s` are averaged over the images in which the prototype is not
    empty ([`empty_prototype_mask`]; docs/method.md#quirks [hierarchy threshold 0.1] fix), rows are renormalised to sum to 1 (a prototype empty in the whole
    batch gives a zero row), and these per-batch matrices are averaged over all batches, as the release does.

    Args:
        routing_batches (iterable of sequences of `torch.Tensor`): per batch, the model's `routing_weights`, a tuple of
            `S` tensors of shape `(batch_size, n_pro[s] - 1, num_parts)`. Consumed once (a generator is fine).

    Returns:
        `S` float32 CPU tensors of shape `(n_pro[s] - 1, num_parts)`; each row sums to 1, or to less when the
        prototype was missing from some batches (0 if it never appeared).
    """
    sums: list[torch.Tensor] | None = None
    num_batches = 0
    for i, routing in enumerate(routing_batches):
        routing = _as_stage_tuple(routing)
        if sums is None:
            sums = [torch.zeros(g.shape[1:], dtype=torch.float64) for g in routing]
        if len(routing) != len(sums) or any(g.ndim != 3 or g.shape[1:] != t.shape for g, t in zip(routing, sums)):
            raise ValueError(
                f"`routing_batches[{i}]`: expected {len(sums)} tensors of shapes (batch_size, *) with * = "
                f"{[tuple(t.shape) for t in sums]}, got {[tuple(g.shape) for g in routing]}"
            )
        for total, weights in zip(sums, routing):
            present = ~empty_prototype_mask(weights.detach())
            weights = weights.detach().to(device="cpu", dtype=torch.float64)
            present = present.cpu()
            mean = (weights * present[..., None]).sum(0) / present.sum(0)[:, None]
            total += _renormalise_rows(torch.nan_to_num(mean, nan=0.0))
        num_batches += 1
    if sums is None:
        raise ValueError("`routing_batches`: expected at least one batch of routing weights, got none")
    return [(total / num_batches).float() for total in sums]


def prototype_parents(
    relations: Sequence[torch.Tensor], threshold: float = 0.5
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Parent part of every intermediate prototype (docs/method.md#hierarchy step 2).

    Args:
        relations (sequence of `torch.Tensor` of shape `(n_pro[s] - 1, num_parts)`): from [`relation_matrices`], or one
            image's routing weights.
        threshold (`float`, defaults to 0.5): a prototype keeps its parent only if its strength is strictly greater.

    Returns:
        Per stage `(parents, strengths)`: `parents` int64 of shape `(n_pro[s] - 1,)` with `argmax_k`, or -1 when the
        strength is not above `threshold`; `strengths` float32 with `max_k`.
    """
    result = []
    for s, relation in enumerate(relations):
        if not isinstance(relation, torch.Tensor) or relation.ndim != 2:
            raise ValueError(f"Expected `relations[{s}]` of shape (num_foreground_prototypes, num_parts)")
        strengths, parents = relation.detach().float().cpu().max(dim=-1)
        result.append((torch.where(strengths > threshold, parents, -1), strengths))
    return result


def _move_contents(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        os.replace(item, target / item.name)
    source.rmdir()


def build_prototype_gallery(
    mosaic_dir: str | os.PathLike,
    gallery_dir: str | os.PathLike,
    parents: Sequence[tuple[torch.Tensor, torch.Tensor]],
    names: Sequence[str],
    num_parts: int,
    remove_mosaic_dir: bool = True,
) -> list[Path]:
    """Re-organise the crop mosaics into the hierarchical gallery (docs/method.md#hierarchy step 3).

    `<mosaic_dir>/<s>/<j>/` (from [`save_part_overlays`] with `mosaic_dir`) becomes
    `<gallery_dir>/Proto_<parent>/<names[s]>/<j>_<strength:.2f>/` for every intermediate prototype with a parent, and
    the final stage's `<mosaic_dir>/<S>/<k>/` becomes `<gallery_dir>/Proto_<k>/<names[S]>/<k>_1.00/`. Prototypes that
    never appeared in a visualised batch have no mosaic folder and are simply absent (docs/method.md#quirks [hierarchy figure crashes] fix: no crash).
    Re-running into an existing gallery merges the files.

    Args:
        mosaic_dir (`str` or `os.PathLike`): the mosaic root (`middle/` in the release).
        gallery_dir (`str` or `os.PathLike`): the gallery root (`final/` in the release).
        parents (sequence of `(parents, strengths)`): from [`prototype_parents`], one pair per intermediate stage.
        names (`Sequence[str]`): the `S + 1` stage names ([`stage_names`]).
        num_parts (`int`): K; final-stage folders `0..K-1` are moved (the background is discarded).
        remove_mosaic_dir (`bool`, defaults to `True`): delete `mosaic_dir` afterwards (unmatched prototypes go with
            it), as the release does.

    Returns:
        The gallery folders created, sorted.
    """
    mosaic_dir, gallery_dir = Path(mosaic_dir), Path(gallery_dir)
    if len(names) != len(parents) + 1:
        raise ValueError(f"Expected `names` with {len(parents) + 1} entries (one per stage), got {len(names)}")
    created = []
    for s, (stage_parents, strengths) in enumerate(parents):
        for j, (parent, strength) in enumerate(zip(stage_parents.tolist(), strengths.tolist())):
            source = mosaic_dir / str(s) / str(j)
            if parent < 0 or not source.is_dir():
                continue
            target = gallery_dir / f"Proto_{parent}" / names[s] / f"{j}_{strength:.2f}"
            _move_contents(source, target)
            created.append(target)
    final = len(parents)
    for k in range(num_parts):
        source = mosaic_dir / str(final) / str(k)
        if source.is_dir():
            target = gallery_dir / f"Proto_{k}" / names[final] / f"{k}_1.00"
            _move_contents(source, target)
            created.append(target)
    if remove_mosaic_dir and mosaic_dir.exists():
        shutil.rmtree(mosaic_dir)
    return sorted(created)


def _parent_array(stage_parents) -> np.ndarray:
    if isinstance(stage_parents, tuple):  # a (parents, strengths) pair from prototype_parents
        stage_parents = stage_parents[0]
    if isinstance(stage_parents, torch.Tensor):
        stage_parents = stage_parents.detach().cpu().numpy()
    return np.asarray(stage_parents, dtype=np.int64)


def hierarchy_cells(
    labels: Sequence[np.ndarray], parents: Sequence, num_parts: int
) -> list[list[np.ndarray]]:
    """Masks of the multi-row figure: `cells[s][k]` marks the pixels drawn in row `s`, column `k` (docs/method.md#hierarchy step 4).

    In a row `s < S` these are the pixels whose arg-max prototype `j` is a foreground prototype with parent `k`; in the
    last row, the pixels whose arg-max is final part `k`.

    Args:
        labels (sequence of `S + 1` `np.ndarray` of shape `(height, width)`): one image's arg-max label maps.
        parents (sequence of `S` parent arrays `(n_pro[s] - 1,)`, -1 = no parent, or `(parents, strengths)` pairs).
        num_parts (`int`): K.

    Returns:
        `S + 1` lists of `K` boolean `(height, width)` arrays.
    """
    if len(labels) != len(parents) + 1:
        raise ValueError(f"Expected `labels` with {len(parents) + 1} stages (`parents` + 1), got {len(labels)}")
    cells = []
    for label_map, stage_parents in zip(labels, parents):
        stage_parents = _parent_array(stage_parents)
        lookup = np.append(stage_parents, -1)  # background (and any label beyond) -> no parent
        pixel_parents = lookup[np.minimum(label_map, len(stage_parents))]
        cells.append([pixel_parents == k for k in range(num_parts)])
    cells.append([labels[-1] == k for k in range(num_parts)])
    return cells


def _wrapped(text: str, width_px: float, fontsize: float) -> list[str]:
    """`text` wrapped to lines that fit `width_px` pixels at `fontsize` points and 100 dpi (DejaVu Sans averages
    under 0.62 em per character)."""
    import textwrap

    characters = max(3, int(width_px / (0.62 * fontsize * 100 / 72)))
    return textwrap.wrap(text, characters, break_long_words=True, break_on_hyphens=False) or [""]


def _line_px(fontsize: float) -> float:
    return 1.25 * fontsize * 100 / 72


def hierarchy_figure(
    image: np.ndarray,
    labels: Sequence[np.ndarray],
    parents: Sequence,
    names: Sequence[str],
    num_parts: int,
    alpha: float = 0.5,
    cell_size: int = 128,
    title: str | None = None,
    column_titles: Sequence[str] | None = None,
    show_input: bool = False,
    fontsize: float = 8.0,
):
    """The multi-row hierarchy figure of one image (docs/method.md#hierarchy step 4), K columns instead of a fixed 10.

    Row `s` (named `names[s]`) and column `k` show the image with the pixels of [`hierarchy_cells`] coloured by their
    prototype index (categorical palette, alpha `alpha`); other pixels are left as the plain image. Column headers sit
    in a band above the cells and row names in a band to their left, both wrapped to the cell size, so no text covers
    an image or is clipped, whatever the cell size or the length of the names.

    Args:
        image (`np.ndarray` of shape `(height, width, 3)`): float image in [0, 1].
        labels (sequence of `S + 1` `np.ndarray` of shape `(height, width)`): arg-max label maps at the image size.
        parents: `S` parent arrays (see [`hierarchy_cells`]).
        names (`Sequence[str]`): the `S + 1` stage names, used as row labels.
        num_parts (`int`): K, the number of columns.
        alpha (`float`, defaults to 0.5): colour opacity.
        cell_size (`int`, defaults to 128): pixels per cell at the figure's 100 dpi.
        title (`str`, *optional*): figure title (wrapped to the figure width).
        column_titles (`Sequence[str]`, *optional*): K column titles, default `part <k>`.
        show_input (`bool`, defaults to `False`): add a first column with the plain input image in the first row.
        fontsize (`float`, defaults to 8): text size in points.

    Returns:
        A `matplotlib.figure.Figure` (no `pyplot` state) of `left + (K [+1]) * cell_size` by
        `top + (S + 1) * cell_size` pixels, where `left` and `top` are the row-name and header (+ title) bands.
    """
    from matplotlib.figure import Figure

    if len(names) != len(labels):
        raise ValueError(f"Expected `names` with {len(labels)} entries (one per stage), got {len(names)}")
    cells = hierarchy_cells(labels, parents, num_parts)
    column_titles = list(column_titles) if column_titles is not None else [f"part {k}" for k in range(num_parts)]
    if len(column_titles) != num_parts:
        raise ValueError(f"Expected `column_titles` with {num_parts} entries, got {len(column_titles)}")
    offset = int(show_input)
    rows, cols = len(labels), num_parts + offset
    gap, margin = 2, 4
    headers = (["input"] if show_input else []) + column_titles
    header_lines = [_wrapped(text, cell_size - 2 * margin, fontsize) for text in headers]
    row_lines = [_wrapped(str(name), cell_size - 2 * margin, fontsize) for name in names]
    line = _line_px(fontsize)
    header_px = int(np.ceil(max(len(lines) for lines in header_lines) * line + 2 * margin))
    left_px = int(np.ceil(max(len(lines) for lines in row_lines) * line + 2 * margin))
    width_px = left_px + cols * cell_size
    title_lines = _wrapped(title, width_px - 2 * margin, fontsize + 2) if title else []
    title_px = int(np.ceil(len(title_lines) * _line_px(fontsize + 2) + 2 * margin)) if title else 0
    height_px = title_px + header_px + rows * cell_size
    figure = Figure(figsize=(width_px / 100, height_px / 100), dpi=100)

    def place(x: float, y: float, w: float, h: float):  # pixel box (x from the left, y from the top) -> axes
        return figure.add_axes((x / width_px, 1 - (y + h) / height_px, w / width_px, h / height_px))

    top = title_px + header_px
    for s, label_map in enumerate(labels):
        colours = categorical_palette(int(label_map.max()) + 1)
        for column in range(cols):
            if column < offset and s > 0:
                continue
            axis = place(left_px + column * cell_size + gap / 2, top + s * cell_size + gap / 2, cell_size - gap,
                         cell_size - gap)
            axis.set_axis_off()
            if column < offset:
                axis.imshow(image)
            else:
                k = column - offset
                axis.imshow(_blend(image, label_map, colours, alpha, cells[s][k]))
        figure.text(left_px / 2 / width_px, 1 - (top + (s + 0.5) * cell_size) / height_px, "\n".join(row_lines[s]),
                    rotation=90, ha="center", va="center", fontsize=fontsize, multialignment="center")
    for column, lines in enumerate(header_lines):
        figure.text((left_px + (column + 0.5) * cell_size) / width_px, 1 - (title_px + header_px / 2) / height_px,
                    "\n".join(lines), ha="center", va="center", fontsize=fontsize, multialignment="center")
    if title:
        figure.text(0.5, 1 - title_px / 2 / height_px, "\n".join(title_lines), ha="center", va="center",
                    fontsize=fontsize + 2, multialignment="center")
    return figure


def save_hierarchy_figures(
    images: torch.Tensor,
    assignment_maps: Sequence[torch.Tensor],
    parents: Sequence,
    out_path: str | os.PathLike,
    names: Sequence[str],
    size: int = 256,
    cell_size: int = 128,
    titles: Sequence[str] | None = None,
    show_input: bool = False,
) -> list[Path]:
    """Write the multi-row hierarchy figure of every image of a batch (docs/method.md#hierarchy step 4).

    Args:
        images (`torch.Tensor` of shape `(batch_size, 3, height, width)`): images in [0, 1].
        assignment_maps (sequence of `S + 1` `torch.Tensor` of shape `(batch_size, n_pro[s], h, w)`).
        parents: `S` `(parents, strengths)` pairs from [`prototype_parents`] (dataset-level relation).
        out_path (`str` or `os.PathLike`): file-name prefix; image `b` goes to `<out_path>_<b>.png`.
        names (`Sequence[str]`): the `S + 1` stage names.
        size (`int`, defaults to 256): resolution at which maps are arg-maxed and images drawn.
        cell_size (`int`, defaults to 128): pixels per figure cell.
        titles (`Sequence[str]`, *optional*): one figure title per image.
        show_input (`bool`, defaults to `False`): add the plain input image as a first column.

    Returns:
        The written paths, one per image; each PNG is `K [+1]` cells wide and `S + 1` cells high plus the header and
        row-name bands of [`hierarchy_figure`].
    """
    _check_images(images)
    stages = _as_stage_tuple(assignment_maps)
    resized = _resize_images(images, size)
    for s, maps in enumerate(stages):
        _check_maps(maps, f"assignment_maps[{s}]", len(resized))
    num_parts = stages[-1].shape[1] - 1
    labels = [label_maps(maps, size).numpy() for maps in stages]
    written = []
    for b in range(len(resized)):
        figure = hierarchy_figure(
            resized[b], [stage[b] for stage in labels], parents, names, num_parts, cell_size=cell_size,
            title=titles[b] if titles is not None else None, show_input=show_input,
        )
        written.append(_atomic_save(figure, f"{os.fspath(out_path)}_{b}.png"))
    return written


def save_hierarchy_gallery(
    model,
    dataset,
    out_dir: str | os.PathLike,
    num_images: int = 4,
    device: str | torch.device = "cpu",
    threshold: float = 0.5,
    cell_size: int = 128,
) -> list[Path]:
    """The hierarchical prototype gallery of the paper for the first `num_images` rows of a dataset, in one call.

    The images (column `image`, labels from `label` when present) are preprocessed like the classification
    evaluation, the prototype -> part relation is averaged over them ([`relation_matrices`]), every intermediate
    prototype gets its parent part ([`prototype_parents`], strength above `threshold`), and one multi-row figure per
    image is written to `<out_dir>/hierarchy_<i>.png`, with the input image, the true and predicted class as title
    and the predicted class's part scores as column headers.

    Returns:
        The written paths.
    """
    from .data.transforms import eval_transform

    if num_images < 1:
        raise ValueError(f"Expected `num_images` >= 1, got {num_images}")
    rows = [dataset[i] for i in range(min(num_images, len(dataset)))]
    if not rows:
        raise ValueError("Expected a dataset with at least one row, got an empty one")
    transform = eval_transform(model.config.image_size)
    pixel_values = torch.stack([transform(row["image"].convert("RGB")) for row in rows])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(pixel_values.to(device))
    finally:
        model.train(was_training)
    parents = prototype_parents(relation_matrices([outputs.routing_weights]), threshold=threshold)
    id2label = model.config.id2label or {}
    label_feature = getattr(dataset, "features", {}).get("label")
    true_names = getattr(label_feature, "names", None)
    predicted = outputs.logits.argmax(-1).tolist()
    scores = outputs.part_logits.float().cpu()
    out_dir = Path(out_dir)
    written = []
    for i, row in enumerate(rows):
        truth = ""
        if row.get("label") is not None:
            truth = f"true: {true_names[row['label']] if true_names else id2label.get(int(row['label']), row['label'])} · "
        title = f"{truth}predicted: {id2label.get(predicted[i], predicted[i])}"
        column_titles = [f"part {k}: {v:.2f}" for k, v in enumerate(scores[i, predicted[i]].tolist())]
        labels = [label_maps(maps[i : i + 1].float().cpu(), model.config.image_size).numpy()[0]
                  for maps in outputs.assignment_maps]
        image = denormalise(pixel_values[i : i + 1])[0].clamp(0, 1).permute(1, 2, 0).numpy()
        figure = hierarchy_figure(image, labels, parents, stage_names(model.config), len(column_titles),
                                  cell_size=cell_size, title=title, column_titles=column_titles, show_input=True)
        written.append(_atomic_save(figure, out_dir / f"hierarchy_{i}.png"))
    return written


# ------------------------------------------------------------------------------------------------------------------
# docs/method.md#consistency-figures Consistency-evaluation figures
# ------------------------------------------------------------------------------------------------------------------


def _canvas_images(images: torch.Tensor, canvas: int) -> np.ndarray:
    """(N, 3, canvas, canvas) float in [0, 1] or uint8 -> (N, canvas, canvas, 3) float in [0, 1]."""
    _check_images(images)
    if images.shape[-2:] != (canvas, canvas):
        raise ValueError(f"Expected `images` of size {canvas}x{canvas} (the canvas), got {tuple(images.shape)}")
    images = images.detach().cpu()
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return images.clamp(0.0, 1.0).permute(0, 2, 3, 1).numpy()


def _ranked_colours(scores: np.ndarray | None, num_foreground: int) -> np.ndarray:
    """Colour of each foreground label: a light-to-dark red ramp ranked by `scores` (release: `Reds(0.2 .. 1)`)."""
    from matplotlib import colormaps

    if scores is None:
        ranks = np.arange(num_foreground)
        count = num_foreground
    else:
        order = np.argsort(scores, kind="stable")
        ranks_of_scores = np.empty_like(order)
        ranks_of_scores[order] = np.arange(len(scores))
        ranks = ranks_of_scores[np.arange(num_foreground) % len(scores)]
        count = len(scores)
    ramp = colormaps["Reds"](np.linspace(0.2, 1.0, max(count, 1)))[:, :3]
    return np.concatenate([ramp[ranks], np.zeros((1, 3))]).astype(np.float32)  # background row unused


def _blank(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), "white")


def save_consistency_figures(
    images: torch.Tensor,
    maps: torch.Tensor,
    regions: torch.Tensor,
    points: torch.Tensor,
    visible: torch.Tensor,
    labels: torch.Tensor,
    out_dir: str | os.PathLike,
    part_scores: torch.Tensor | None = None,
    classes: Sequence[int] | None = None,
    images_per_class: int = 6,
    image_step: int = 2,
    prefix: str = "cub",
) -> list[Path]:
    """Figures of the consistency evaluation (docs/method.md#consistency-figures).

    For every drawn class `c`, the images of that class (in the given order) at positions `0, image_step, …` are used,
    at most `images_per_class` of them (release: positions 0, 2, …, 10):

    * `<out_dir>/results_all/<prefix>_c<c>.png`: each image with the arg-max of its (bilinearly upsampled,
      `align_corners=True`) map blended at alpha 0.6, the background (last channel) transparent, foreground colours
      ranked by the per-part class scores (a light-to-dark red ramp, highest score darkest, as the release) and each
      label's index at its centroid; two images per row.
    * `<out_dir>/results_single_proto/<prefix>_p<j>_c<c>.png` for each foreground prototype `j`: per image, the canvas
      crop with prototype `j`'s region rectangle (red) and the visible ground-truth part points (coloured by part id,
      1-based id printed), and next to it the bicubic-upsampled map of `j` (values clipped to [0, 1], jet colour map)
      blended at alpha 0.6; two images (four panels) per row.

    Classes without images are skipped. Every panel is `canvas × canvas` pixels, `canvas` being the image size.

    Args:
        images (`torch.Tensor` of shape `(num_images, 3, canvas, canvas)`): the cropped test images resized to the
            canvas (224 in the protocol), float in [0, 1] or uint8.
        maps (`torch.Tensor` of shape `(num_images, num_prototypes, h, w)`): the evaluated maps (`interpretation_maps`).
        regions (`torch.Tensor` of shape `(num_images, num_prototypes - 1, 4)`): `(row_lo, row_hi, col_lo, col_hi)` per
            foreground prototype (`ivpt.metrics.consistency.prototype_regions`).
        points (`torch.Tensor` of shape `(num_images, num_gt_parts, 2)`): `(col, row)` canvas points
            (`part_points_on_canvas`).
        visible (`torch.Tensor` of shape `(num_images, num_gt_parts)`): point visibility.
        labels (`torch.Tensor` of shape `(num_images,)`): class index of every image.
        out_dir (`str` or `os.PathLike`): output root.
        part_scores (`torch.Tensor` of shape `(num_images, num_classes, num_scores)`, *optional*): the model's
            `part_logits`; the scores of class `c` rank the colours. With fewer scores than foreground prototypes (the
            K part scores against the evaluated stage's prototypes, as in the release) prototype `j` takes the rank of
            score `j mod num_scores`. Default: colours by prototype index.
        classes (`Sequence[int]`, *optional*): the classes to draw; default every 20th class index present
            (0, 20, 40, …) like the release. Pass e.g. `range(num_classes)` for a tiny dataset.
        images_per_class (`int`, defaults to 6), image_step (`int`, defaults to 2): image selection within a class.
        prefix (`str`, defaults to `"cub"`): file-name prefix (the release's dataset name).

    Returns:
        The written paths: per drawn class, the `results_all` figure then one figure per foreground prototype.
    """
    canvas = images.shape[-1] if isinstance(images, torch.Tensor) else 0
    pictures = _canvas_images(images, canvas)
    num_images = len(pictures)
    _check_maps(maps, "maps", num_images)
    num_foreground = maps.shape[1] - 1
    expected = {
        "regions": (regions, (num_images, num_foreground, 4)),
        "points": (points, (num_images, None, 2)),
        "visible": (visible, (num_images, points.shape[1] if isinstance(points, torch.Tensor) else None)),
        "labels": (labels, (num_images,)),
    }
    for name, (tensor, shape) in expected.items():
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != len(shape) or any(
            size is not None and tensor.shape[d] != size for d, size in enumerate(shape)
        ):
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"Expected `{name}` of shape {tuple('*' if v is None else v for v in shape)}, got {got}")
    if part_scores is not None and (part_scores.ndim != 3 or part_scores.shape[0] != num_images):
        raise ValueError(f"Expected `part_scores` of shape ({num_images}, num_classes, num_scores), got "
                         f"{tuple(part_scores.shape)}")
    if images_per_class < 1 or image_step < 1:
        raise ValueError(f"Expected `images_per_class` and `image_step` >= 1, got {images_per_class}, {image_step}")

    labels = labels.detach().cpu().numpy()
    regions = regions.detach().cpu().numpy()
    points = points.detach().cpu().numpy()
    visible = visible.detach().cpu().numpy().astype(bool)
    scores = part_scores.detach().float().cpu().numpy() if part_scores is not None else None
    argmax_labels = label_maps(maps, canvas).numpy()
    heat = F.interpolate(maps[:, :-1].detach().float().cpu(), size=(canvas, canvas), mode="bicubic",
                         align_corners=False).clamp(0.0, 1.0).numpy()
    from matplotlib import colormaps

    jet = colormaps["jet"]
    point_colours = categorical_palette(points.shape[1])
    if classes is None:
        classes = range(0, int(labels.max()) + 1 if num_images else 0, 20)

    out_dir = Path(out_dir)
    rows = math.ceil(images_per_class / 2)
    font = _font(max(8, canvas // 20))
    written = []
    for c in classes:
        members = np.nonzero(labels == c)[0][::image_step][:images_per_class]
        if members.size == 0:
            continue
        sheet = _blank(2 * canvas, rows * canvas)
        for slot, i in enumerate(members):
            colours = _ranked_colours(scores[i, c] if scores is not None else None, num_foreground)
            tile = _overlay_tile(pictures[i], argmax_labels[i], num_foreground, 0.6, colours)
            sheet.paste(tile, ((slot % 2) * canvas, (slot // 2) * canvas))
        written.append(_atomic_save(sheet, out_dir / "results_all" / f"{prefix}_c{c}.png"))
        for j in range(num_foreground):
            sheet = _blank(4 * canvas, rows * canvas)
            for slot, i in enumerate(members):
                crop = _to_pil(pictures[i])
                draw = ImageDraw.Draw(crop)
                row_lo, row_hi, col_lo, col_hi = (int(v) for v in regions[i, j])
                draw.rectangle((col_lo, row_lo, min(col_hi, canvas - 1), min(row_hi, canvas - 1)), outline="red",
                               width=2)
                for part in np.nonzero(visible[i])[0]:
                    x, y = (int(v) for v in points[i, part])
                    fill = tuple(int(255 * v) for v in point_colours[part])
                    draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=fill, outline="black")
                    draw.text((x, y - 6), str(int(part) + 1), fill="black", font=font, anchor="mb")
                overlay = 0.4 * pictures[i] + 0.6 * jet(heat[i, j])[..., :3]
                left = (slot % 2) * 2 * canvas
                sheet.paste(crop, (left, (slot // 2) * canvas))
                sheet.paste(_to_pil(overlay), (left + canvas, (slot // 2) * canvas))
            written.append(_atomic_save(sheet, out_dir / "results_single_proto" / f"{prefix}_p{j}_c{c}.png"))
    return written
