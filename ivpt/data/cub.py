"""CUB-200-2011 as a `datasets` builder (docs/method.md#data-protocol), plus the `load_cub` loader and an export CLI.

`datasets` 5 no longer runs loading scripts, so the builder is a `GeneratorBasedBuilder` subclass
shipped in the package (`Cub200`) and `load_cub` drives it. Sources: the official layout
(docs/method.md#cub-layout) as a folder, or the ``CUB_200_2011.tgz`` download itself; masks come from an optional
``segmentations/`` folder or ``segmentations.tgz`` (inside the root or next to it).

Configs:

* ``full`` (default) — the original images. Splits ``train`` / ``test`` (train_test_split.txt).
* ``cropped`` — images cropped to the box with the integer arithmetic of docs/method.md#box-cropping
  (x1 = ⌊x⌋, y1 = ⌊y⌋, x2 = x1 + ⌊w⌋, y2 = y1 + ⌊h⌋, the text cut at the decimal point), encoded
  as JPEG quality 95 (the reference writes its crops with OpenCV at that quality); keypoints, box
  and mask moved into crop coordinates. Keypoints are only shifted (a visible keypoint outside
  the crop keeps its flag and out-of-crop coordinates), so docs/method.md#consistency can be computed exactly.
* ``cropped_augmented`` — split ``train`` only: the offline augmentation of docs/method.md#offline-augmentation (rotate / skew /
  shear, each + h-flip p = 0.5, 10 passes → 30 images per training image), see
  `ivpt.data.augment`; deterministic given ``seed``.

Features (all configs)::

    image      Image()                       RGB
    label      ClassLabel(names=classes.txt)  0 .. C−1 (class_id − 1 for CUB's contiguous ids)
    image_id   int32                         images.txt id (source image id for augmented rows)
    file_name  string                        "<class_dir>/<file>.jpg" as in images.txt
    bbox       List(float32, 4)              [x, y, w, h]
    keypoints  List({part_id: int32, x: float32, y: float32, visible: int32}, num_parts)
    mask       Image() or None               segmentation ("L"), None without segmentations
    cropped*:  crop_box  List(int32, 4)      docs/method.md#box-cropping box [x1, y1, x2, y2] in original coordinates
    augmented: augmentation ClassLabel(rotate/skew/shear), augmentation_pass int32, flipped bool

Robustness: every annotation line is validated (field count, numbers, ids known to every file,
15 parts per image, 0/1 visibility); errors are `CubFormatError`s naming the file and the line.
Images are fully decoded at build time: missing or truncated files raise a `CubFormatError`
naming the image and its images.txt line; grayscale, CMYK, palette or PNG-content files are
converted to RGB (logged at INFO and re-encoded losslessly as PNG; true RGB JPEGs are stored
byte-for-byte). A box extending beyond the image is clamped for cropping (logged WARNING); a
visible keypoint outside the image is kept and logged. `datasets` writes into a temporary
``*.incomplete`` folder and renames it at the end, so a failure leaves nothing half-written.

Command line (export of the image folders written by the reference scripts)::

    python -m ivpt.data.cub --data_dir DATA --config cropped --export OUT
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import math
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import datasets
from datasets.builder import Key
from PIL import Image, ImageFile

logger = logging.getLogger(__name__)

__all__ = [
    "BUILDER_VERSION",
    "CONFIG_NAMES",
    "CubFormatError",
    "CubRecord",
    "CubAnnotations",
    "CubSources",
    "Cub200",
    "Cub200Config",
    "crop_box_from_text",
    "read_annotations",
    "resolve_sources",
    "source_fingerprint",
    "load_cub",
    "export_image_folders",
]

BUILDER_VERSION = "1.0.0"
CONFIG_NAMES = ("full", "cropped", "cropped_augmented")
CROP_JPEG_QUALITY = 95
_ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar")
_CODE_FILES = ("cub.py", "augment.py", "transforms.py")  # their source is part of the cache key


class CubFormatError(ValueError):
    """A CUB source file is missing or malformed; the message names the file and the line."""


# --------------------------------------------------------------------------------------------
# Annotation parsing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CubRecord:
    """Annotations of one image (coordinates in original-image pixels)."""

    image_id: int
    file_name: str
    line: int  # line of images.txt
    class_id: int  # as in image_class_labels.txt (1-based for CUB)
    label: int  # 0-based index into the sorted class ids of classes.txt
    is_train: bool
    bbox: tuple[float, float, float, float]  # x, y, w, h
    crop_box: tuple[int, int, int, int]  # docs/method.md#box-cropping: x1, y1, x2, y2
    keypoints: tuple[tuple[int, float, float, int], ...]  # (part_id, x, y, visible), parts.txt order


@dataclass
class CubAnnotations:
    """All text annotations of a CUB root, validated and joined on image id."""

    root: Path
    class_names: list[str]
    part_names: list[str]
    records: list[CubRecord] = field(default_factory=list)  # images.txt order

    def split(self, train: bool) -> list[CubRecord]:
        return [r for r in self.records if r.is_train == train]


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yields (1-based line number, stripped line), skipping blank lines."""
    if not path.is_file():
        raise CubFormatError(f"{path}: file not found (expected by the CUB-200-2011 layout)")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CubFormatError(f"{path}: cannot read the file ({error.strerror or error})") from error
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise CubFormatError(
                f"{path}, line {number}: not UTF-8 text (byte {raw[error.start]:#04x} at column {error.start + 1})"
            ) from None
        if line:
            yield number, line


def _fields(path: Path, number: int, line: str, count: int, last_is_text: bool = False) -> list[str]:
    parts = line.split(maxsplit=count - 1) if last_is_text else line.split()
    if len(parts) != count:
        raise CubFormatError(f"{path}, line {number}: expected {count} fields, got {len(parts)}: {line!r}")
    return parts


def _int(path: Path, number: int, text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CubFormatError(f"{path}, line {number}: {what} must be an integer, got {text!r}") from None


def _float(path: Path, number: int, text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CubFormatError(f"{path}, line {number}: {what} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise CubFormatError(f"{path}, line {number}: {what} must be finite, got {text!r}")
    return value


def _read_id_table(path: Path, count: int, last_is_text: bool = False) -> dict[int, tuple[int, list[str]]]:
    """Maps the first-column id to (line number, remaining fields); duplicate ids are errors."""
    table: dict[int, tuple[int, list[str]]] = {}
    for number, line in _lines(path):
        parts = _fields(path, number, line, count, last_is_text)
        key = _int(path, number, parts[0], "the id")
        if key in table:
            raise CubFormatError(f"{path}, line {number}: id {key} already defined on line {table[key][0]}")
        table[key] = (number, parts[1:])
    return table


def _truncate_text(text: str) -> int:
    """Integer part of a decimal string, by cutting at the decimal point (docs/method.md#box-cropping, docs/method.md#quirks [box truncation])."""
    if re.fullmatch(r"[+-]?\d+(\.\d*)?", text):
        return int(text.split(".")[0])
    return math.trunc(float(text))  # exponent notation etc.: same result for ordinary values


def crop_box_from_text(x: str, y: str, w: str, h: str) -> tuple[int, int, int, int]:
    """docs/method.md#box-cropping integer crop box from the bounding_boxes.txt fields: (x1, y1, x1 + ⌊w⌋, y1 + ⌊h⌋)."""
    x1, y1 = _truncate_text(x), _truncate_text(y)
    return x1, y1, x1 + _truncate_text(w), y1 + _truncate_text(h)


def _check_same_ids(reference: dict, reference_path: Path, other: dict, other_path: Path) -> None:
    for image_id, (number, _) in other.items():
        if image_id not in reference:
            raise CubFormatError(f"{other_path}, line {number}: image id {image_id} is not in {reference_path.name}")
    for image_id, (number, _) in reference.items():
        if image_id not in other:
            raise CubFormatError(
                f"{reference_path}, line {number}: image id {image_id} is missing from {other_path.name}"
            )


def _check_relative_name(path: Path, number: int, name: str) -> None:
    """An images.txt name is a relative path inside images/: no absolute path, drive, `..` part or backslash."""
    parts = name.split("/")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name) or "\\" in name or ".." in parts or "" in parts:
        raise CubFormatError(
            f"{path}, line {number}: image name {name!r} must be a relative path inside images/ "
            "(no absolute path, '..' part, backslash or empty part)"
        )


def read_annotations(root: str | Path) -> CubAnnotations:
    """Parses and cross-checks the text files of a CUB_200_2011 folder (docs/method.md#cub-layout).

    Raises:
        CubFormatError: naming the file and line of the first problem found.
    """
    root = Path(root)
    classes_path = root / "classes.txt"
    classes = _read_id_table(classes_path, 2, last_is_text=True)
    class_ids = sorted(classes)
    label_of = {class_id: index for index, class_id in enumerate(class_ids)}
    class_names = [classes[class_id][1][0] for class_id in class_ids]

    parts_path = root / "parts" / "parts.txt"
    parts = _read_id_table(parts_path, 2, last_is_text=True)
    part_ids = sorted(parts)
    part_names = [parts[part_id][1][0] for part_id in part_ids]

    images_path = root / "images.txt"
    images = _read_id_table(images_path, 2, last_is_text=True)
    labels_path = root / "image_class_labels.txt"
    labels = _read_id_table(labels_path, 2)
    split_path = root / "train_test_split.txt"
    split = _read_id_table(split_path, 2)
    boxes_path = root / "bounding_boxes.txt"
    boxes = _read_id_table(boxes_path, 5)
    for path, table in ((labels_path, labels), (split_path, split), (boxes_path, boxes)):
        _check_same_ids(images, images_path, table, path)

    locs_path = root / "parts" / "part_locs.txt"
    keypoints: dict[int, dict[int, tuple[int, tuple[int, float, float, int]]]] = {}
    for number, line in _lines(locs_path):
        image_text, part_text, x_text, y_text, vis_text = _fields(locs_path, number, line, 5)
        image_id = _int(locs_path, number, image_text, "the image id")
        part_id = _int(locs_path, number, part_text, "the part id")
        if image_id not in images:
            raise CubFormatError(f"{locs_path}, line {number}: image id {image_id} is not in images.txt")
        if part_id not in parts:
            raise CubFormatError(f"{locs_path}, line {number}: part id {part_id} is not in parts/parts.txt")
        visible = _int(locs_path, number, vis_text, "visible")
        if visible not in (0, 1):
            raise CubFormatError(f"{locs_path}, line {number}: visible must be 0 or 1, got {visible}")
        x, y = _float(locs_path, number, x_text, "x"), _float(locs_path, number, y_text, "y")
        per_image = keypoints.setdefault(image_id, {})
        if part_id in per_image:
            raise CubFormatError(
                f"{locs_path}, line {number}: part {part_id} of image {image_id} already given on line "
                f"{per_image[part_id][0]}"
            )
        per_image[part_id] = (number, (part_id, x, y, visible))

    annotations = CubAnnotations(root=root, class_names=class_names, part_names=part_names)
    for image_id, (line, (file_name,)) in images.items():
        _check_relative_name(images_path, line, file_name)
        label_line, (class_text,) = labels[image_id]
        class_id = _int(labels_path, label_line, class_text, "the class id")
        if class_id not in label_of:
            raise CubFormatError(f"{labels_path}, line {label_line}: class id {class_id} is not in classes.txt")
        split_line, (train_text,) = split[image_id]
        is_train = _int(split_path, split_line, train_text, "is_train")
        if is_train not in (0, 1):
            raise CubFormatError(f"{split_path}, line {split_line}: is_train must be 0 or 1, got {is_train}")
        box_line, box_text = boxes[image_id]
        bbox = tuple(_float(boxes_path, box_line, t, n) for t, n in zip(box_text, ("x", "y", "width", "height")))
        if bbox[2] <= 0 or bbox[3] <= 0:
            raise CubFormatError(f"{boxes_path}, line {box_line}: box width and height must be > 0, got {box_text}")
        per_image = keypoints.get(image_id, {})
        missing = [p for p in part_ids if p not in per_image]
        if missing:
            raise CubFormatError(
                f"{locs_path}: image id {image_id} (images.txt line {line}) has no row for part id(s) {missing}"
            )
        annotations.records.append(
            CubRecord(
                image_id=image_id,
                file_name=file_name,
                line=line,
                class_id=class_id,
                label=label_of[class_id],
                is_train=bool(is_train),
                bbox=bbox,  # type: ignore[arg-type]
                crop_box=crop_box_from_text(*box_text),
                keypoints=tuple(per_image[p][1] for p in part_ids),
            )
        )
    return annotations


# --------------------------------------------------------------------------------------------
# Sources (folder or archive) and cache key
# --------------------------------------------------------------------------------------------


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.endswith(_ARCHIVE_SUFFIXES)


@dataclass(frozen=True)
class CubSources:
    """Where the data lives: a root folder or an archive, plus optional segmentations."""

    root: Optional[Path] = None  # folder holding images.txt
    archive: Optional[Path] = None  # CUB_200_2011.tgz (when `root` is None)
    segmentations: Optional[Path] = None  # folder or archive

    def files(self) -> list[Path]:
        """Every source file (archives, or all files of the folders)."""
        out: list[Path] = []
        for path in (self.root, self.archive, self.segmentations):
            if path is None:
                continue
            if path.is_file():
                out.append(path)
            else:
                out.extend(p for p in path.rglob("*") if p.is_file())
        return sorted(set(out))


def _find_segmentations(candidates: Sequence[Path]) -> Optional[Path]:
    for directory in candidates:
        if (directory / "segmentations").is_dir():
            return directory / "segmentations"
        for suffix in _ARCHIVE_SUFFIXES:
            if (directory / f"segmentations{suffix}").is_file():
                return directory / f"segmentations{suffix}"
    return None


def resolve_sources(data_dir: str | Path, segmentations: Optional[str | Path | bool] = None) -> CubSources:
    """Finds the CUB sources under `data_dir`.

    Args:
        data_dir: the CUB_200_2011 folder (holding images.txt), a folder containing it or
            ``CUB_200_2011.tgz``, or the archive itself.
        segmentations: a ``segmentations`` folder or archive; None to look for one inside the root
            and next to it; False to ignore masks.
    """
    path = Path(data_dir).expanduser().resolve()
    root = archive = None
    if _is_archive(path):
        archive = path
    elif (path / "images.txt").is_file():
        root = path
    elif (path / "CUB_200_2011" / "images.txt").is_file():
        root = path / "CUB_200_2011"
    else:
        archive = next((path / f"CUB_200_2011{s}" for s in _ARCHIVE_SUFFIXES if (path / f"CUB_200_2011{s}").is_file()), None)
    if root is None and archive is None:
        raise FileNotFoundError(
            f"{path}: no CUB-200-2011 data found (expected images.txt, CUB_200_2011/images.txt or CUB_200_2011.tgz)"
        )
    if segmentations is False:
        seg = None
    elif segmentations is not None and segmentations is not True:
        seg = Path(segmentations).expanduser().resolve()
        if not seg.exists():
            raise FileNotFoundError(f"{seg}: segmentations not found")
    else:
        base = root if root is not None else archive.parent  # type: ignore[union-attr]
        seg = _find_segmentations([base, base.parent] if root is not None else [base])
    return CubSources(root=root, archive=archive, segmentations=seg)


def _code_hash() -> str:
    digest = hashlib.sha256()
    for name in _CODE_FILES:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()


def source_fingerprint(sources: CubSources, params: Optional[dict] = None, content_hash: bool = False) -> str:
    """Cache key: the builder version, the builder's source code, the config parameters and every source file.

    Annotation files (``*.txt``, small) always enter with their content (sha256), so an edited label is never
    served stale even when the edit keeps size and modification time (``cp -p``, ``rsync -a``, a re-extracted
    tar). Images, masks and archives enter with their path, size, mtime and ctime (the inode change time, which
    no copy tool can carry over: a re-extracted or re-copied file gets a new key), or their content hash with
    `content_hash`."""
    digest = hashlib.sha256(f"{BUILDER_VERSION}|{_code_hash()}|{sorted((params or {}).items())}".encode())
    for path in sources.files():
        stat = path.stat()
        digest.update(f"{path.name}|{path.as_posix()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        if content_hash or path.suffix == ".txt":
            with path.open("rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
        else:
            digest.update(f"|{stat.st_ctime_ns}".encode())
    return digest.hexdigest()[:16]


def _safe_extract(archive: Path, destination: Path) -> None:
    """Extracts regular files and folders only (no links, no absolute or parent paths)."""
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(destination, filter="data")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise CubFormatError(f"{archive}: cannot read the archive ({error})") from error


def _locate_root(directory: Path, archive: Path) -> Path:
    candidates = sorted(directory.rglob("images.txt"), key=lambda p: len(p.parts))
    if not candidates:
        raise CubFormatError(f"{archive}: no images.txt inside the archive")
    return candidates[0].parent


def _locate_segmentations(directory: Path) -> Path:
    """The ``segmentations`` folder inside an extracted archive (or the extraction folder itself)."""
    found = sorted((p for p in directory.rglob("segmentations") if p.is_dir()), key=lambda p: len(p.parts))
    return found[0] if found else directory


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _read_rgb(path: Path, record: CubRecord, images_txt: Path) -> tuple[Image.Image, bytes, bool]:
    """Reads and fully decodes one image.

    Returns ``(image, data, converted)``: the RGB image, its original bytes, and whether it had to
    be converted (not an RGB JPEG).
    """
    where = f"{path} (images.txt line {record.line}, image id {record.image_id})"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CubFormatError(f"{where}: image file not found") from None
    except OSError as error:  # a folder, a link loop, no permission...
        raise CubFormatError(f"{where}: cannot read the image file ({error.strerror or error})") from None
    previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False  # never accept truncation
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # full decode: truncated files raise here
            fmt, mode = image.format, image.mode
            rgb = image.convert("RGB") if mode != "RGB" else image.copy()
    except Exception as error:  # PIL raises several types (OSError, SyntaxError, ValueError...)
        raise CubFormatError(f"{where}: cannot decode image ({type(error).__name__}: {error})") from error
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    converted = not (fmt == "JPEG" and mode == "RGB")
    if converted:
        logger.info("%s: %s %s image converted to RGB", where, fmt, mode)
    return rgb, data, converted


def _read_mask(path: Path, size: tuple[int, int], record: CubRecord) -> Optional[Image.Image]:
    if not path.is_file():
        logger.warning("%s: no segmentation for image id %d; mask set to None", path, record.image_id)
        return None
    try:
        with Image.open(path) as mask:
            mask.load()
            mask = mask.convert("L") if mask.mode != "L" else mask.copy()
    except Exception as error:
        raise CubFormatError(f"{path}: cannot decode segmentation ({type(error).__name__}: {error})") from error
    if mask.size != size:
        raise CubFormatError(f"{path}: segmentation size {mask.size} differs from image size {size}")
    return mask


def _encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _check_keypoints(record: CubRecord, size: tuple[int, int], locs: Path) -> None:
    width, height = size
    for part_id, x, y, visible in record.keypoints:
        if visible and not (0 <= x <= width and 0 <= y <= height):
            logger.warning(
                "%s: visible part %d of image id %d at (%.1f, %.1f) is outside the %dx%d image; kept as is",
                locs, part_id, record.image_id, x, y, width, height,
            )  # fmt: skip


def _clamped_crop_box(record: CubRecord, size: tuple[int, int], boxes_txt: Path) -> tuple[int, int, int, int]:
    """The docs/method.md#box-cropping box clamped to the image (the reference's array slicing clamps the same way)."""
    width, height = size
    x1, y1, x2, y2 = record.crop_box
    clamped = (max(x1, 0), max(y1, 0), min(x2, width), min(y2, height))
    if clamped != record.crop_box:
        logger.warning(
            "%s: box of image id %d %s extends beyond the %dx%d image; crop clamped to %s",
            boxes_txt, record.image_id, record.crop_box, width, height, clamped,
        )  # fmt: skip
    if clamped[2] <= clamped[0] or clamped[3] <= clamped[1]:
        raise CubFormatError(
            f"{boxes_txt}: box of image id {record.image_id} {record.crop_box} does not overlap the "
            f"{width}x{height} image"
        )
    return clamped


def _keypoint_dicts(keypoints: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
    return [
        {"part_id": int(part_id), "x": float(x), "y": float(y), "visible": int(visible)}
        for part_id, x, y, visible in keypoints
    ]


# --------------------------------------------------------------------------------------------
# The builder
# --------------------------------------------------------------------------------------------


class Cub200Config(datasets.BuilderConfig):
    """Config of `Cub200`.

    Args:
        segmentations: path of a ``segmentations`` folder / archive; None to auto-detect; False to
            ignore masks.
        seed: seed of the offline augmentation (``cropped_augmented``).
        augmentation_passes: passes per augmentation pipeline (10 in docs/method.md#offline-augmentation).
    """

    def __init__(
        self,
        segmentations: Optional[str | bool] = None,
        seed: int = 0,
        augmentation_passes: int = 10,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("version", datasets.Version(BUILDER_VERSION))
        super().__init__(**kwargs)
        if self.name not in CONFIG_NAMES:
            raise ValueError(f"Expected config name in {CONFIG_NAMES}, got {self.name!r}")
        if augmentation_passes < 1:
            raise ValueError(f"Expected augmentation_passes >= 1, got {augmentation_passes}")
        self.segmentations = segmentations
        self.seed = seed
        self.augmentation_passes = augmentation_passes


class Cub200(datasets.GeneratorBasedBuilder):
    """CUB-200-2011 builder (configs ``full``, ``cropped``, ``cropped_augmented``; see module doc).

    Pass the source with ``data_dir``. Prefer `load_cub`, which also keys the cache on the sources.
    """

    BUILDER_CONFIG_CLASS = Cub200Config
    BUILDER_CONFIGS = [Cub200Config(name=name) for name in CONFIG_NAMES]
    DEFAULT_CONFIG_NAME = "full"

    def _info(self) -> datasets.DatasetInfo:
        # Class and part names are only known once the sources are read: `_split_generators`
        # completes the features (as `datasets`' folder builders do).
        return datasets.DatasetInfo(
            description="CUB-200-2011 (Wah et al., 2011) as used by IVPT; see ivpt/data/cub.py.",
            homepage="https://www.vision.caltech.edu/datasets/cub_200_2011/",
        )

    def _features(self, annotations: CubAnnotations) -> datasets.Features:
        features = {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=annotations.class_names),
            "image_id": datasets.Value("int32"),
            "file_name": datasets.Value("string"),
            "bbox": datasets.List(datasets.Value("float32"), length=4),
            "keypoints": datasets.List(
                {
                    "part_id": datasets.Value("int32"),
                    "x": datasets.Value("float32"),
                    "y": datasets.Value("float32"),
                    "visible": datasets.Value("int32"),
                },
                length=len(annotations.part_names),
            ),
            "mask": datasets.Image(),
        }
        if self.config.name != "full":
            features["crop_box"] = datasets.List(datasets.Value("int32"), length=4)
        if self.config.name == "cropped_augmented":
            from .augment import AUGMENTATIONS

            features["augmentation"] = datasets.ClassLabel(names=list(AUGMENTATIONS))
            features["augmentation_pass"] = datasets.Value("int32")
            features["flipped"] = datasets.Value("bool")
        return datasets.Features(features)

    def _download_and_prepare(self, dl_manager: Any, verification_mode: Any, **prepare_split_kwargs: Any) -> None:
        if not self.config.data_dir:
            raise ValueError("Cub200 needs data_dir= (a CUB_200_2011 folder or CUB_200_2011.tgz)")
        sources = resolve_sources(self.config.data_dir, self.config.segmentations)
        # Archives are unpacked once into a temporary folder next to the cache (removed at the end),
        # so that examples come out in images.txt order whatever the member order of the archive.
        with tempfile.TemporaryDirectory(prefix="tmp_cub_extract_", dir=self._cache_dir_root) as tmp:
            root, seg = sources.root, sources.segmentations
            if sources.archive is not None:
                _safe_extract(sources.archive, Path(tmp) / "main")
                root = _locate_root(Path(tmp) / "main", sources.archive)
                if seg is None and self.config.segmentations is not False:
                    inner = root / "segmentations"
                    seg = inner if inner.is_dir() else None
            if seg is not None and seg.is_file():
                _safe_extract(seg, Path(tmp) / "masks")
                seg = _locate_segmentations(Path(tmp) / "masks")
            self._resolved = (root, seg)
            super()._download_and_prepare(dl_manager, verification_mode, **prepare_split_kwargs)

    def _split_generators(self, dl_manager: Any) -> list[datasets.SplitGenerator]:
        root, seg = self._resolved
        annotations = read_annotations(root)
        self.info.features = self._features(annotations)
        common = {"root": str(root), "segmentations": str(seg) if seg is not None else None}
        splits = [("train", True)] if self.config.name == "cropped_augmented" else [("train", True), ("test", False)]
        for name, is_train in splits:
            if not annotations.split(is_train):
                raise CubFormatError(
                    f"{root / 'train_test_split.txt'}: no image has is_train={int(is_train)}, so split {name!r} would "
                    "be empty"
                )
        return [
            datasets.SplitGenerator(name=name, gen_kwargs={"records": annotations.split(is_train), **common})
            for name, is_train in splits
        ]

    def _generate_examples(
        self, records: list[CubRecord], root: str, segmentations: Optional[str]
    ) -> Iterator[tuple[Key, dict[str, Any]]]:
        root_path = Path(root)
        for record in records:
            for index, example in enumerate(self._examples(record, root_path, segmentations)):
                yield Key(0, record.image_id * 1000 + index), example

    def _examples(self, record: CubRecord, root: Path, segmentations: Optional[str]) -> Iterator[dict[str, Any]]:
        """The example(s) of one source image for the current config."""
        image, data, converted = _read_rgb(root / "images" / record.file_name, record, root / "images.txt")
        mask = None
        if segmentations is not None:
            mask = _read_mask(Path(segmentations) / Path(record.file_name).with_suffix(".png"), image.size, record)
        _check_keypoints(record, image.size, root / "parts" / "part_locs.txt")
        base = {"label": record.label, "image_id": record.image_id, "file_name": record.file_name}
        if self.config.name == "full":
            stored = _encode(image, "PNG") if converted else data  # RGB JPEGs byte-for-byte
            yield {
                **base,
                "image": {"path": record.file_name, "bytes": stored},
                "bbox": list(record.bbox),
                "keypoints": _keypoint_dicts(record.keypoints),
                "mask": _mask_value(mask),
            }
            return
        crop, crop_mask, keypoints, bbox = _crop_record(record, image, mask, root / "bounding_boxes.txt")
        base["crop_box"] = list(record.crop_box)
        if self.config.name == "cropped":
            yield {
                **base,
                "image": {"path": record.file_name, "bytes": _encode(crop, "JPEG", quality=CROP_JPEG_QUALITY)},
                "bbox": bbox,
                "keypoints": _keypoint_dicts(keypoints),
                "mask": _mask_value(crop_mask),
            }
            return
        yield from self._augmented_examples(base, crop, crop_mask, keypoints, bbox)

    def _augmented_examples(
        self, base: dict[str, Any], crop: Image.Image, crop_mask: Optional[Image.Image], keypoints: list, bbox: list
    ) -> Iterator[dict[str, Any]]:
        """The 3 × passes docs/method.md#offline-augmentation outputs of one cropped training image."""
        from .augment import AUGMENTATIONS, offline_augmentations

        # The reference augments the re-encoded JPEG crops: decode ours the same way.
        crop = Image.open(io.BytesIO(_encode(crop, "JPEG", quality=CROP_JPEG_QUALITY))).convert("RGB")
        stem = Path(base["file_name"])
        outputs = offline_augmentations(
            crop, keypoints, bbox, crop_mask, self.config.seed, base["image_id"], self.config.augmentation_passes
        )
        for out in outputs:
            name = f"{stem.parent.as_posix()}/{stem.stem}_{out['augmentation']}_{out['augmentation_pass']:02d}.jpg"
            yield {
                **base,
                "file_name": name,
                "image": {"path": name, "bytes": _encode(out["image"], "JPEG", quality=CROP_JPEG_QUALITY)},
                "bbox": out["bbox"].tolist(),
                "keypoints": _keypoint_dicts(out["keypoints"].tolist()),
                "mask": _mask_value(out["mask"]),
                "augmentation": AUGMENTATIONS.index(out["augmentation"]),
                "augmentation_pass": out["augmentation_pass"],
                "flipped": out["flipped"],
            }


def _mask_value(mask: Optional[Image.Image]) -> Optional[dict[str, Any]]:
    """`datasets.Image` value of a mask (lossless PNG), or None."""
    return None if mask is None else {"path": None, "bytes": _encode(mask, "PNG")}


def _crop_record(
    record: CubRecord, image: Image.Image, mask: Optional[Image.Image], boxes_txt: Path
) -> tuple[Image.Image, Optional[Image.Image], list, list]:
    """docs/method.md#box-cropping crop of the image and mask; keypoints and box moved into crop coordinates.

    Coordinates are relative to the crop origin (the docs/method.md#box-cropping corner x1, y1, clamped to the image).
    Hidden keypoints keep (0, 0); visible ones are only shifted (they may fall outside the crop).
    """
    left, top, right, bottom = _clamped_crop_box(record, image.size, boxes_txt)
    crop = image.crop((left, top, right, bottom))
    crop_mask = mask.crop((left, top, right, bottom)) if mask is not None else None
    keypoints = [(p, x - left, y - top, v) if v else (p, x, y, v) for p, x, y, v in record.keypoints]
    bbox = [record.bbox[0] - left, record.bbox[1] - top, record.bbox[2], record.bbox[3]]
    return crop, crop_mask, keypoints, bbox


# --------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------


def _default_cache_dir() -> Path:
    return Path(os.environ.get("IVPT_CACHE", Path(datasets.config.HF_DATASETS_CACHE) / "ivpt"))


def load_cub(
    data_dir: str | Path,
    config: str = "full",
    cache_dir: Optional[str | Path] = None,
    segmentations: Optional[str | Path | bool] = None,
    seed: int = 0,
    augmentation_passes: int = 10,
    num_proc: Optional[int] = None,
    content_hash: bool = False,
) -> datasets.DatasetDict:
    """Builds (once) and loads CUB-200-2011 as a `DatasetDict` (splits ``train`` and ``test``;
    ``train`` only for ``cropped_augmented``).

    Args:
        data_dir: CUB_200_2011 folder, a folder containing it or ``CUB_200_2011.tgz``, or the archive.
        config: ``"full"``, ``"cropped"`` or ``"cropped_augmented"`` (see module docstring).
        cache_dir: where the Arrow files go (default ``$IVPT_CACHE`` or ``<HF datasets cache>/ivpt``).
        segmentations: masks folder / archive; None to auto-detect; False for no masks.
        seed: seed of the offline augmentation.
        augmentation_passes: passes per augmentation pipeline (docs/method.md#offline-augmentation: 10).
        num_proc: processes used to build.
        content_hash: also key the images and archives on their contents (sha256) instead of size,
            mtime and ctime (annotation files are always keyed on their contents).

    The cache folder is keyed on every source file (see `source_fingerprint`), the builder
    version and source code, and the arguments above, so changed data or code never serve stale
    data. A failed build leaves nothing in the cache. Old builds are never pruned automatically
    (two data folders may share one cache): each build is one folder
    ``<cache_dir>/cub/<config>-*/<version>/<key>``; delete the ones you no longer need.
    Works offline (``HF_DATASETS_OFFLINE=1``).

    Raises:
        CubFormatError: malformed or inconsistent sources (message names the file and line).
        FileNotFoundError: no CUB data under `data_dir`.
    """
    if config not in CONFIG_NAMES:
        raise ValueError(f"Expected config in {CONFIG_NAMES}, got {config!r}")
    if not isinstance(augmentation_passes, int) or augmentation_passes < 1:
        raise ValueError(f"Expected augmentation_passes >= 1, got {augmentation_passes!r}")
    sources = resolve_sources(data_dir, segmentations)
    params = {"config": config, "seed": seed, "passes": augmentation_passes, "masks": sources.segmentations is not None}
    fingerprint = source_fingerprint(sources, params, content_hash=content_hash)
    builder = Cub200(
        cache_dir=str(Path(cache_dir) if cache_dir is not None else _default_cache_dir()),
        config_name=config,
        data_dir=str(sources.archive or sources.root),
        hash=fingerprint,
        segmentations=str(sources.segmentations) if sources.segmentations is not None else False,
        seed=seed,
        augmentation_passes=augmentation_passes,
    )
    try:
        builder.download_and_prepare(num_proc=num_proc)
        return builder.as_dataset()
    except BaseException as error:
        _discard_failed_build(builder)
        cause = error.__cause__
        if isinstance(error, datasets.exceptions.DatasetGenerationError) and isinstance(cause, CubFormatError):
            raise CubFormatError(str(cause)) from error
        raise


def _discard_failed_build(builder: Cub200) -> None:
    """Removes what a failed build left in the cache: its folder (normally already gone), its lock files and the
    folders that are empty without them, so that the cache holds no trace of it."""
    build_dir = Path(builder._cache_dir)  # <cache>/cub/<config>-<config hash>/<version>/<source hash>
    cache_root = Path(builder._cache_dir_root)
    shutil.rmtree(build_dir, ignore_errors=True)
    leftovers = [*build_dir.parent.glob(f"{build_dir.name}.*"), *build_dir.parent.glob(f"{build_dir.name}_*")]
    leftovers += cache_root.glob(f"*{build_dir.name}.lock")
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    for parent in build_dir.parents:
        if parent == cache_root or cache_root not in parent.parents:
            break
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break


# --------------------------------------------------------------------------------------------
# Export and command line
# --------------------------------------------------------------------------------------------


def export_image_folders(dataset: datasets.DatasetDict, config: str, out_dir: str | Path, root: Optional[Path] = None) -> Path:
    """Writes the image folders of the reference scripts from a loaded dataset.

    * ``cropped`` → ``<out>/train_cropped/<class_dir>/<file>`` and ``<out>/test_cropped/...``
      (docs/method.md#box-cropping), plus copies of images.txt, image_class_labels.txt, train_test_split.txt when `root`
      (the CUB folder) is given;
    * ``cropped_augmented`` → ``<out>/train_cropped_augmented/<class_dir>/<file>`` (docs/method.md#offline-augmentation);
    * ``full`` → ``<out>/train/<class_dir>/<file>`` and ``<out>/test/...``.
    Image bytes are written as stored (no re-encoding). Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--export: {out_dir} exists and is not a folder")
    folder = {"cropped": "{split}_cropped", "cropped_augmented": "{split}_cropped_augmented", "full": "{split}"}[config]
    inside = out_dir.resolve()
    names = {split: ds.select_columns(["file_name"])["file_name"] for split, ds in dataset.items()}
    for split, file_names in names.items():  # every target checked before anything is written
        for name in file_names:
            resolved = (out_dir / folder.format(split=split) / name).resolve()
            if inside not in resolved.parents:
                raise CubFormatError(f"--export: file_name {name!r} of split {split!r} would be written to {resolved}, "
                                     f"outside the export folder {inside}")
    for split, ds in dataset.items():
        ds = ds.cast_column("image", datasets.Image(decode=False)).select_columns(["image", "file_name"])
        target = out_dir / folder.format(split=split)
        for row in ds:
            path = target / row["file_name"]
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            partial.write_bytes(row["image"]["bytes"])
            partial.replace(path)
    if root is not None and config == "cropped":
        for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt"):
            shutil.copyfile(root / name, out_dir / name)
    return out_dir


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Build CUB-200-2011 with the datasets builder; optionally export image folders.")
    parser.add_argument("--data_dir", required=True, help="CUB_200_2011 folder, its parent, or CUB_200_2011.tgz")
    parser.add_argument("--config", default="full", choices=CONFIG_NAMES)
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--segmentations", default=None, help="segmentations folder or archive (default: auto)")
    parser.add_argument("--no_segmentations", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_proc", type=int, default=None)
    parser.add_argument("--export", default=None, help="write the image folders of the reference scripts here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    segmentations = False if args.no_segmentations else args.segmentations
    try:
        _build_and_export(args, segmentations)
    except (CubFormatError, FileNotFoundError, NotADirectoryError) as error:
        parser.error(str(error))  # one line and exit status 2, no traceback


def _build_and_export(args: argparse.Namespace, segmentations: Optional[str | bool]) -> None:
    if args.export and Path(args.export).exists() and not Path(args.export).is_dir():
        raise NotADirectoryError(f"--export: {args.export} exists and is not a folder")
    dataset = load_cub(args.data_dir, args.config, args.cache_dir, segmentations, args.seed, num_proc=args.num_proc)
    print(dataset)
    if args.export:
        sources = resolve_sources(args.data_dir, segmentations)
        root = sources.root
        if root is None:  # archive: copy the split files from a temporary extraction
            with tempfile.TemporaryDirectory() as tmp:
                _safe_extract(sources.archive, Path(tmp))  # type: ignore[arg-type]
                print(export_image_folders(dataset, args.config, args.export, _locate_root(Path(tmp), sources.archive)))
        else:
            print(export_image_folders(dataset, args.config, args.export, root))


if __name__ == "__main__":
    main()
