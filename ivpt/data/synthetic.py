"""Synthetic CUB-200-2011: procedurally drawn "birds" written in the exact CUB layout.

The generator is the offline default dataset of the project and the fixture of the data tests.
Every image shows one bird (body, head, beak, eye, wing, tail, legs) over a textured, desaturated
background, placed with a random position, scale, rotation and horizontal flip. The class is a
combination of *large, coloured part attributes* (body colour, head colour, wing colour, wing
pattern, tail shape; the tail has the wing colour), chosen so that any two classes differ in at
least two (usually three) parts: classification needs the parts, not the background.

The output follows the official layout (docs/method.md#cub-layout)::

    <out>/CUB_200_2011/
        images/<NNN.Class_name>/<Class_name>_<NNNN>_<id>.jpg
        images.txt  classes.txt  image_class_labels.txt  train_test_split.txt  bounding_boxes.txt
        parts/parts.txt  parts/part_locs.txt          (CUB's 15 part names, 1-based part ids)
        segmentations/<NNN.Class_name>/<file>.png     (exact binary masks, 0 / 255)

or, with ``tgz=True``, the two official downloads ``CUB_200_2011.tgz`` (everything but the masks)
and ``segmentations.tgz``. Keypoints are the true part locations in pixel-index coordinates
(pixel ``(i, j)`` has its centre at ``x = i, y = j``), with CUB's convention for hidden parts
(``x = y = 0, visible = 0``): the far eye and the far wing are hidden in the side view. Boxes are
the tight box of the mask (``x, y, w, h`` with ``w = x_max - x_min + 1``).

Everything is deterministic given the seed (each image has its own random stream, so the result
does not depend on generation order).

Command line::

    python -m ivpt.data.synthetic --out DIR --classes 20 --images-per-class 30 --size 224 --seed 0 [--tgz]
"""

from __future__ import annotations

import argparse
import colorsys
import functools
import io
import itertools
import math
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CUB_PART_NAMES",
    "PART_MAP_LABELS",
    "ClassAttributes",
    "RenderedBird",
    "class_attributes",
    "render_bird",
    "rerender_bird",
    "generate_cub",
]

# The 15 CUB part names, in the order of the official parts/parts.txt (part id = index + 1).
CUB_PART_NAMES: tuple[str, ...] = (
    "back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing",
    "nape", "right eye", "right leg", "right wing", "tail", "throat",
)  # fmt: skip

_MASK_LUT = [0] + [255] * 255  # part label → binary mask value

# Values of the per-pixel part map returned by `render_bird` (0 = background).
PART_MAP_LABELS: dict[str, int] = {"body": 1, "head": 2, "beak": 3, "eye": 4, "wing": 5, "tail": 6, "leg": 7}

_COLOURS: dict[str, tuple[int, int, int]] = {
    "Red": (215, 35, 35),
    "Orange": (245, 135, 20),
    "Yellow": (240, 215, 30),
    "Green": (35, 165, 55),
    "Cyan": (30, 200, 215),
    "Blue": (35, 70, 215),
    "Purple": (145, 45, 195),
    "Pink": (245, 115, 185),
    "White": (245, 245, 240),
    "Black": (22, 22, 22),
}
_BODY_COLOURS = ("Red", "Orange", "Yellow", "Green", "Cyan", "Blue", "Purple", "Pink")
_HEAD_COLOURS = tuple(_COLOURS)
_WING_COLOURS = tuple(_COLOURS)
_WING_PATTERNS = ("plain", "barred", "spotted", "tipped")
_TAIL_SHAPES = ("Fan", "Spike", "Fork")

# Canonical bird (facing +x, image y axis pointing down, unit = bird length L).
_BODY = dict(centre=(0.0, 0.0), axes=(0.30, 0.17), angle=-10.0)
_HEAD = dict(centre=(0.30, -0.17), radius=0.12)
_EYE = dict(centre=(0.35, -0.185), radius=0.030)
_WING = dict(centre=(-0.06, -0.01), axes=(0.22, 0.085), angle=-12.0)
_TAILS = {
    "Fan": [(-0.24, -0.04), (-0.50, -0.12), (-0.53, 0.11), (-0.24, 0.07)],
    "Spike": [(-0.24, -0.05), (-0.57, 0.015), (-0.24, 0.08)],
    "Fork": [(-0.24, -0.04), (-0.55, -0.10), (-0.45, 0.015), (-0.55, 0.13), (-0.24, 0.07)],
}
_LEGS = {"near": ((0.03, 0.10), (0.01, 0.35)), "far": ((-0.07, 0.10), (-0.09, 0.35))}
# Canonical keypoints, for the side the viewer sees ("near" = the bird's right side when it faces
# +x). "left eye"/"left wing" are the far side and hidden in this view.
_KEYPOINTS = {
    "back": (0.0, -0.14),
    "beak": None,  # centroid of the drawn beak (depends on its length)
    "belly": (-0.02, 0.12),
    "breast": (0.17, 0.05),
    "crown": (0.29, -0.25),
    "forehead": (0.33, -0.25),
    "nape": (0.21, -0.20),
    "near eye": _EYE["centre"],
    "near leg": (0.02, 0.27),
    "far leg": (-0.08, 0.27),
    "near wing": _WING["centre"],
    "tail": (-0.38, 0.02),
    "throat": (0.25, -0.01),
}


@dataclass(frozen=True)
class ClassAttributes:
    """Part attributes that define one synthetic class."""

    body: str
    head: str
    wing: str
    pattern: str
    tail: str

    @property
    def name(self) -> str:
        """Folder-safe class name, e.g. ``Red_Blue_capped_Black_barred_Forktail``."""
        return f"{self.body}_{self.head}_capped_{self.wing}_{self.pattern}_{self.tail}tail"


@dataclass
class RenderedBird:
    """One rendered sample.

    Attributes:
        image: RGB image (size, size).
        part_map: "L" image, per-pixel part label (`PART_MAP_LABELS`, 0 = background).
        keypoints: (15, 3) float array of ``[x, y, visible]`` in CUB part order; hidden parts are
            ``[0, 0, 0]``.
        bbox: ``(x, y, w, h)`` tight box of the bird mask (integers).
    """

    image: Image.Image
    part_map: Image.Image
    keypoints: np.ndarray
    bbox: tuple[int, int, int, int]

    @property
    def mask(self) -> Image.Image:
        """Binary bird mask, "L" mode with values 0 / 255."""
        return self.part_map.point(_MASK_LUT)


def _min_hamming(candidate: tuple, chosen: Sequence[tuple]) -> int:
    return min((sum(a != b for a, b in zip(candidate, other)) for other in chosen), default=len(candidate))


def class_attributes(num_classes: int, seed: int = 0) -> list[ClassAttributes]:
    """Draws `num_classes` distinct attribute tuples.

    Greedy selection over a seeded random permutation of the attribute grid, keeping pairwise
    Hamming distance ≥ 3 (two classes differ in at least three parts) and relaxing to 2 when the
    grid does not hold enough such classes.
    """
    grid = list(itertools.product(_BODY_COLOURS, _HEAD_COLOURS, _WING_COLOURS, _WING_PATTERNS, _TAIL_SHAPES))
    if not 1 <= num_classes <= len(grid):
        raise ValueError(f"Expected 1 <= classes <= {len(grid)}, got {num_classes}")
    order = np.random.default_rng([seed, 0xC1A55]).permutation(len(grid))
    for min_distance in (3, 2, 1):
        chosen: list[tuple] = []
        for index in order:
            if _min_hamming(grid[index], chosen) >= min_distance:
                chosen.append(grid[index])
                if len(chosen) == num_classes:
                    return [ClassAttributes(*attrs) for attrs in chosen]
    raise AssertionError("unreachable: min_distance 1 always succeeds")


def _ellipse(centre: tuple[float, float], axes: tuple[float, float], angle: float, n: int = 28) -> np.ndarray:
    """(n, 2) polygon of a rotated ellipse (angle in degrees, image axes)."""
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    x, y = axes[0] * np.cos(t), axes[1] * np.sin(t)
    return np.stack([centre[0] + c * x - s * y, centre[1] + s * x + c * y], axis=1)


def _ellipse_point(u: float, v: float, spec: dict) -> tuple[float, float]:
    """Point at normalised ellipse coordinates (u, v) ∈ [-1, 1]² of `spec` (centre/axes/angle)."""
    c, s = math.cos(math.radians(spec["angle"])), math.sin(math.radians(spec["angle"]))
    x, y = u * spec["axes"][0], v * spec["axes"][1]
    return spec["centre"][0] + c * x - s * y, spec["centre"][1] + s * x + c * y


def _wing_pattern_polygons(pattern: str) -> list[np.ndarray]:
    """Canonical polygons of the wing pattern (drawn in the contrast colour, inside the wing)."""
    if pattern == "barred":
        polygons = []
        for u in (-0.55, -0.1, 0.35):
            half = 0.13  # bar half-width, in units of the major axis
            corners = [(u - half, -1.0), (u + half, -1.0), (u + half, 1.0), (u - half, 1.0)]
            # Shrink the bar ends so they stay inside the ellipse.
            clipped = [(cu, cv * 0.85 * math.sqrt(max(0.0, 1.0 - (abs(u) + half) ** 2))) for cu, cv in corners]
            polygons.append(np.array([_ellipse_point(cu, cv, _WING) for cu, cv in clipped]))
        return polygons
    if pattern == "spotted":
        return [
            _ellipse(_ellipse_point(u, v, _WING), (0.028, 0.028), 0.0, n=12)
            for u, v in ((-0.55, -0.35), (-0.55, 0.35), (0.0, -0.4), (0.0, 0.4), (0.5, 0.0))
        ]
    if pattern == "tipped":
        t = np.linspace(math.pi * 0.62, math.pi * 1.38, 14)
        half = [(math.cos(a), math.sin(a) * 0.97) for a in t]
        return [np.array([_ellipse_point(u, v, _WING) for u, v in half])]
    return []


@functools.lru_cache(maxsize=None)
def _canonical_shapes(pattern: str) -> dict[str, np.ndarray]:
    """Constant canonical polygons (computed once per wing pattern)."""
    return {
        "body": _ellipse(_BODY["centre"], _BODY["axes"], _BODY["angle"], n=36),
        "wing": _ellipse(_WING["centre"], _WING["axes"], _WING["angle"], n=32),
        "pattern": _wing_pattern_polygons(pattern),
        "head": _ellipse(_HEAD["centre"], (_HEAD["radius"],) * 2, 0.0, n=28),
        "eye": _ellipse(_EYE["centre"], (_EYE["radius"],) * 2, 0.0, n=14),
        "pupil": _ellipse(_EYE["centre"], (_EYE["radius"] * 0.6,) * 2, 0.0, n=10),
    }


_TRANSPOSES = (None, *Image.Transpose)  # identity + the 7 flips / rotations by multiples of 90°


def _background(rng: np.random.Generator, size: int, texture: Image.Image) -> Image.Image:
    """Textured, desaturated background: a random window of the shared luminance `texture`
    (blotches + grain, see `_texture`) tinted with a random low-saturation colour, plus faint twigs.
    Only luminance varies inside an image, so the background stays less salient than the bird."""
    hue, sat, val = rng.uniform(0, 1), rng.uniform(0.08, 0.25), rng.uniform(0.35, 0.72)
    base = np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255.0
    left, top = (int(v) for v in rng.integers(0, texture.width - size + 1, size=2))
    window = texture.crop((left, top, left + size, top + size))
    transpose = _TRANSPOSES[int(rng.integers(0, len(_TRANSPOSES)))]
    if transpose is not None:
        window = window.transpose(transpose)
    ramp = np.arange(256, dtype=np.float64) - 128.0
    luts = [np.clip(c + ramp * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8).tolist() for c in base]
    image = Image.merge("RGB", [window.point(lut) for lut in luts])
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 5))):
        shade = tuple(int(c) for c in np.clip(base * rng.uniform(0.7, 1.2), 0, 255))
        x0, y0 = rng.uniform(-0.2, 1.2, size=2) * size
        angle = rng.uniform(0, math.pi)
        length = rng.uniform(0.4, 1.0) * size
        x1, y1 = x0 + length * math.cos(angle), y0 + length * math.sin(angle)
        draw.line([(x0, y0), (x1, y1)], fill=shade, width=max(1, int(size * rng.uniform(0.006, 0.02))))
    return image


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: float = 14.0) -> tuple[int, int, int]:
    return tuple(int(c) for c in np.clip(np.asarray(rgb) + rng.normal(0.0, amount, 3), 0, 255))


def _darker(rgb: tuple[int, int, int], factor: float = 0.6) -> tuple[int, int, int]:
    return tuple(int(c * factor) for c in rgb)


def _contrast(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with `rgb`."""
    return (20, 20, 20) if sum(rgb) > 300 else (245, 245, 240)


def render_bird(
    attributes: ClassAttributes, size: int, rng: np.random.Generator, texture: Optional[Image.Image] = None
) -> RenderedBird:
    """Draws one bird of class `attributes` on a (size, size) canvas.

    Args:
        attributes: the class attributes.
        size: side of the square image in pixels.
        rng: random stream for pose, colours and background.
        texture: background texture shared by a run (see `_texture`); drawn from `rng` if None.

    Returns:
        A `RenderedBird` (image, part map, keypoints (15, 3), tight box).
    """
    if texture is None:
        texture = _texture(size, rng)
    image = _background(rng, size, texture)
    part_map = Image.new("L", (size, size), 0)

    # Pose: scale (bird length in pixels), rotation, flip, translation chosen to keep the bird inside.
    length = size * rng.uniform(0.55, 0.8)
    angle = math.radians(rng.uniform(-25.0, 25.0))
    flip = bool(rng.integers(0, 2))
    sx = -length if flip else length
    c, s = math.cos(angle), math.sin(angle)
    linear = np.array([[c * sx, -s * length], [s * sx, c * length]])  # (2, 2): canonical → pixels

    beak_length = rng.uniform(0.09, 0.15)
    beak = np.array([(0.40, -0.205), (0.40 + beak_length, -0.165 + rng.uniform(-0.01, 0.02)), (0.40, -0.125)])
    tail = np.array(_TAILS[attributes.tail])
    shapes = dict(
        _canonical_shapes(attributes.pattern),
        far_leg=np.array(_LEGS["far"]),
        near_leg=np.array(_LEGS["near"]),
        tail=tail,
        beak=beak,
    )
    keypoints = dict(_KEYPOINTS, beak=tuple(beak.mean(axis=0)))

    # Extent of the bird after the linear part of the pose → translation range.
    all_points = np.concatenate([shapes[k] for k in ("far_leg", "near_leg", "tail", "body", "head", "beak")])
    projected = all_points @ linear.T
    low, high = projected.min(axis=0), projected.max(axis=0)
    margin = 2.0
    offset = np.array(
        [rng.uniform(margin - low[i], max(margin - low[i], size - 1 - margin - high[i])) for i in range(2)]
    )

    def to_pixels(points: np.ndarray) -> list[float]:
        """Flat [x0, y0, x1, y1, ...] pixel coordinates (the form PIL's draw calls accept)."""
        return (np.asarray(points) @ linear.T + offset).ravel().tolist()

    draw = ImageDraw.Draw(image)
    draw_map = ImageDraw.Draw(part_map)
    colours = {
        "body": _jitter(_COLOURS[attributes.body], rng),
        "head": _jitter(_COLOURS[attributes.head], rng),
        "wing": _jitter(_COLOURS[attributes.wing], rng),
        "beak": _jitter((70, 60, 50) if rng.uniform() < 0.5 else (225, 170, 60), rng, 10.0),
        "leg": _jitter((95, 75, 60), rng, 10.0),
    }
    leg_width = max(3, int(round(0.045 * length)))
    for name in ("far_leg", "near_leg"):
        leg = to_pixels(shapes[name])
        colour = _darker(colours["leg"], 0.75) if name == "far_leg" else colours["leg"]
        draw.line(leg, fill=colour, width=leg_width)
        draw_map.line(leg, fill=PART_MAP_LABELS["leg"], width=leg_width)
        foot = to_pixels([(shapes[name][1][0] - 0.05, shapes[name][1][1]), (shapes[name][1][0] + 0.05, shapes[name][1][1])])
        draw.line(foot, fill=colour, width=leg_width)
        draw_map.line(foot, fill=PART_MAP_LABELS["leg"], width=leg_width)

    def fill(points: np.ndarray, colour: tuple[int, int, int], label: int, outline: bool = True) -> None:
        polygon = to_pixels(points)
        draw.polygon(polygon, fill=colour, outline=_darker(colour) if outline else None)
        draw_map.polygon(polygon, fill=label, outline=label)

    fill(shapes["tail"], _darker(colours["wing"], 0.9), PART_MAP_LABELS["tail"])
    fill(shapes["body"], colours["body"], PART_MAP_LABELS["body"])
    fill(shapes["wing"], colours["wing"], PART_MAP_LABELS["wing"])
    for polygon in shapes["pattern"]:
        fill(polygon, _contrast(colours["wing"]), PART_MAP_LABELS["wing"], outline=False)
    fill(shapes["head"], colours["head"], PART_MAP_LABELS["head"])
    fill(shapes["beak"], colours["beak"], PART_MAP_LABELS["beak"])
    fill(shapes["eye"], (250, 250, 250), PART_MAP_LABELS["eye"], outline=False)
    fill(shapes["pupil"], (10, 10, 10), PART_MAP_LABELS["eye"], outline=False)

    # Keypoints in CUB part order; the side the viewer sees depends on the flip.
    near, far = ("left", "right") if flip else ("right", "left")
    rows = []
    for part in CUB_PART_NAMES:
        side, _, kind = part.partition(" ")
        if kind:  # "left eye", "right wing", ...
            key = f"{'near' if side == near else 'far'} {kind}"
            if key not in keypoints:  # far eye / far wing: hidden in the side view
                rows.append((0.0, 0.0, 0.0))
                continue
        else:
            key = part
        x, y = to_pixels(np.array([keypoints[key]]))
        rows.append((x, y, 1.0))
    keypoints_array = np.array(rows, dtype=np.float64)

    mask = np.asarray(part_map) > 0
    cols, rows_ = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    bbox = (int(cols[0]), int(rows_[0]), int(cols[-1] - cols[0] + 1), int(rows_[-1] - rows_[0] + 1))
    return RenderedBird(image=image, part_map=part_map, keypoints=keypoints_array, bbox=bbox)


def _texture(size: int, rng: np.random.Generator) -> Image.Image:
    """(2·size, 2·size) "L" luminance texture centred on 128: smooth blotches (about ±22) plus
    fine grain (about ±9), shared by all images of a run (each uses a random window of it)."""
    coarse = np.clip(128.0 + rng.normal(0.0, 22.0, size=(10, 10)), 0, 255).astype(np.uint8)
    blotches = np.asarray(Image.fromarray(coarse).resize((2 * size, 2 * size), Image.BICUBIC), dtype=np.float64)
    grain = rng.normal(0.0, 9.0, size=(2 * size, 2 * size))
    grain = 0.5 * grain + 0.25 * (np.roll(grain, 1, axis=0) + np.roll(grain, 1, axis=1))  # slight blur
    return Image.fromarray(np.clip(blotches + grain, 0, 255).astype(np.uint8))


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@functools.lru_cache(maxsize=4)
def _layout_texture(size: int, seed: int) -> Image.Image:
    """The background texture of a dataset (`_texture`), cached: `rerender_bird` draws many birds of one dataset.
    Read-only for its users (`_background` crops it)."""
    return _texture(size, np.random.default_rng([seed, 0x7E57]))


def rerender_bird(image_id: int, classes: int, images_per_class: int, size: int, seed: int) -> RenderedBird:
    """The bird of image `image_id` (1-based, as in images.txt) of the dataset `generate_cub` writes with these
    arguments, drawn again: the same image, and its per-pixel part map (`PART_MAP_LABELS`), which the dataset does
    not store (it stores the binary mask only)."""
    if not 1 <= image_id <= classes * images_per_class:
        raise ValueError(
            f"image_id {image_id} is not in 1 .. {classes * images_per_class} (classes x images_per_class)")
    class_index, index = divmod(image_id - 1, images_per_class)
    attributes = class_attributes(classes, seed)[class_index]
    return render_bird(attributes, size, np.random.default_rng([seed, class_index, index]),
                       _layout_texture(size, seed))


def _write_layout(root: Path, classes: int, images_per_class: int, size: int, seed: int, jpeg_quality: int) -> None:
    attributes = class_attributes(classes, seed)
    texture = _layout_texture(size, seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "parts").mkdir(exist_ok=True)
    (root / "segmentations").mkdir(exist_ok=True)
    images_txt, labels_txt, split_txt, boxes_txt, part_locs_txt = [], [], [], [], []
    image_id = 0
    for class_index, attrs in enumerate(attributes):
        class_dir = f"{class_index + 1:03d}.{attrs.name}"
        (root / "images" / class_dir).mkdir(exist_ok=True)
        (root / "segmentations" / class_dir).mkdir(exist_ok=True)
        split_rng = np.random.default_rng([seed, 0x5B117, class_index])
        is_train = np.zeros(images_per_class, dtype=bool)
        is_train[split_rng.permutation(images_per_class)[: (images_per_class + 1) // 2]] = True
        for index in range(images_per_class):
            image_id += 1
            bird = render_bird(attrs, size, np.random.default_rng([seed, class_index, index]), texture)
            stem = f"{attrs.name}_{index + 1:04d}_{image_id}"
            relative = f"{class_dir}/{stem}.jpg"
            (root / "images" / relative).write_bytes(_encode(bird.image, "JPEG", quality=jpeg_quality))
            (root / "segmentations" / class_dir / f"{stem}.png").write_bytes(_encode(bird.mask, "PNG", compress_level=1))
            images_txt.append(f"{image_id} {relative}")
            labels_txt.append(f"{image_id} {class_index + 1}")
            split_txt.append(f"{image_id} {int(is_train[index])}")
            boxes_txt.append(f"{image_id} " + " ".join(f"{v:.1f}" for v in bird.bbox))
            for part_id, (x, y, visible) in enumerate(bird.keypoints, start=1):
                part_locs_txt.append(f"{image_id} {part_id} {x:.1f} {y:.1f} {int(visible)}")

    def write(name: str, lines: list[str]) -> None:
        (root / name).write_text("\n".join(lines) + "\n")

    write("images.txt", images_txt)
    write("classes.txt", [f"{i + 1} {i + 1:03d}.{a.name}" for i, a in enumerate(attributes)])
    write("image_class_labels.txt", labels_txt)
    write("train_test_split.txt", split_txt)
    write("bounding_boxes.txt", boxes_txt)
    write("parts/parts.txt", [f"{i + 1} {name}" for i, name in enumerate(CUB_PART_NAMES)])
    write("parts/part_locs.txt", part_locs_txt)


def _add_tree(tar: tarfile.TarFile, directory: Path, arcname: str) -> None:
    """Adds `directory` as `arcname` with sorted members and fixed metadata (reproducible archives)."""
    for path in [directory, *sorted(directory.rglob("*"))]:
        relative = path.relative_to(directory).as_posix()
        info = tar.gettarinfo(str(path), arcname=arcname if relative == "." else f"{arcname}/{relative}")
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        if path.is_file():
            with path.open("rb") as handle:
                tar.addfile(info, handle)
        else:
            tar.addfile(info)


def _write_tgz(archive: Path, directory: Path, arcname: str) -> None:
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, "w:gz", compresslevel=1) as tar:
        _add_tree(tar, directory, arcname)
    partial.replace(archive)


def generate_cub(
    out_dir: str | Path,
    classes: int = 20,
    images_per_class: int = 30,
    size: int = 224,
    seed: int = 0,
    tgz: bool = False,
    jpeg_quality: int = 90,
) -> Path:
    """Writes a synthetic CUB-200-2011 dataset.

    Args:
        out_dir: output folder (created).
        classes: number of classes (1 .. 3200).
        images_per_class: images per class; half (rounded up) go to the train split.
        size: side of the square images in pixels.
        seed: random seed (same seed → same files).
        tgz: write the official downloads ``CUB_200_2011.tgz`` and ``segmentations.tgz`` instead
            of the unpacked folder.
        jpeg_quality: JPEG quality of the images.

    Returns:
        ``out_dir/CUB_200_2011`` (a folder), or ``out_dir/CUB_200_2011.tgz`` when `tgz` is set.
    """
    if images_per_class < 1:
        raise ValueError(f"Expected images_per_class >= 1, got {images_per_class}")
    if size < 32:
        raise ValueError(f"Expected size >= 32, got {size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not tgz:
        root = out_dir / "CUB_200_2011"
        if root.exists():
            shutil.rmtree(root)
        staging = Path(tempfile.mkdtemp(prefix=".CUB_200_2011.", dir=out_dir))
        try:
            _write_layout(staging, classes, images_per_class, size, seed, jpeg_quality)
            staging.rename(root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return root
    with tempfile.TemporaryDirectory(prefix=".synthetic_cub.", dir=out_dir) as tmp:
        root = Path(tmp) / "CUB_200_2011"
        _write_layout(root, classes, images_per_class, size, seed, jpeg_quality)
        segmentations = Path(tmp) / "segmentations"
        (root / "segmentations").rename(segmentations)
        _write_tgz(out_dir / "segmentations.tgz", segmentations, "segmentations")
        _write_tgz(out_dir / "CUB_200_2011.tgz", root, "CUB_200_2011")
    return out_dir / "CUB_200_2011.tgz"


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--images-per-class", type=int, default=30)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tgz", action="store_true", help="write CUB_200_2011.tgz + segmentations.tgz")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = generate_cub(args.out, args.classes, args.images_per_class, args.size, args.seed, args.tgz, args.jpeg_quality)
    elapsed = time.perf_counter() - start
    count = args.classes * args.images_per_class
    print(f"wrote {count} images to {path} in {elapsed:.1f} s ({count / elapsed:.0f} images/s)")


if __name__ == "__main__":
    main()
