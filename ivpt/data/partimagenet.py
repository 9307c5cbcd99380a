"""PartImageNet (He et al., 2022) as a `datasets` builder: part label maps, foreground masks and part centroids.

Official layout (folder, or an archive holding it)::

    annotations/train.json, val.json, test.json    COCO: images, annotations (part polygons), categories (parts)
    images/train/[<wnid>/]<wnid>_<n>.JPEG           (likewise val/, test/)

Configs:

* ``official`` (default): splits ``train`` / ``validation`` / ``test`` from train.json / val.json / test.json;
* ``ood``: PDiscoFormer's out-of-distribution protocol, splits ``train`` / ``test`` from the train_train.json /
  train_test.json that its ``prepare_partimagenet_ood.py`` writes into annotations/ (images under images/train/).

As in PDiscoFormer's loader: annotations with zero area or ``iscrowd`` are ignored, a 4-number polygon is read as its
annotation box, images without a usable annotation are dropped, the per-pixel part is the arg-max of the per-part
coverage counts (overlaps go to the part covered most often, ties to the lowest category id) and pixels covered by no
part are background. Polygons are filled with PIL (PDiscoFormer uses pycocotools; edge pixels can differ). Labels
are the ImageNet synsets (wnid, the file-name prefix) sorted by wnid (PDiscoFormer sorts by the classes' English
names). Features::

    image        Image()                          RGB
    label        ClassLabel(wnids)
    image_id     int32                            COCO image id
    file_name    string
    supercategory string                          the parts' supercategory (Quadruped, Bird, ...)
    part_mask    Image() "L"                      0 background, c + 1 part category c (pixel NMI / ARI)
    mask         Image() "L"                      foreground = any part, 0 / 255 (foreground IoU)
    keypoints    List({part_id, x, y, visible})   one per part category: centroid of its pixels (+ 0.5, pixel
                                                  centres), visible when the part has pixels (keypoint metrics)
    bbox         List(float32, 4)                 tight box around the foreground pixels [x, y, w, h]

The derived keypoints and box are our addition (PDiscoFormer evaluates PartImageNet with the pixel NMI / ARI only):
they make the keypoint-based metrics (keypoint NMI / ARI, keypoint regression, consistency) computable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional

import datasets
import numpy as np
from datasets.builder import Key
from PIL import Image, ImageDraw

from . import official
from .official import LayoutFormatError

CONFIG_NAMES = ("official", "ood")
_SPLIT_FILES = {
    "official": (("train", "train.json", "train"), ("validation", "val.json", "val"), ("test", "test.json", "test")),
    "ood": (("train", "train_train.json", "train"), ("test", "train_test.json", "train")),
}


def _load_coco(path: Path) -> dict:
    if not path.is_file():
        raise LayoutFormatError(f"{path}: file not found (expected by the PartImageNet layout)")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LayoutFormatError(f"{path}: not valid JSON ({error})") from error
    for key in ("images", "annotations", "categories"):
        if not isinstance(content.get(key), list):
            raise LayoutFormatError(f"{path}: expected a COCO file with a list {key!r}")
    return content


def rasterise_parts(annotations: list[dict], categories: list[int], height: int, width: int, where: str) -> np.ndarray:
    """`(height, width)` uint8 part label map: 0 background, index + 1 of the part category covering the pixel most
    often (ties to the lowest category id)."""
    index_of = {c: i for i, c in enumerate(categories)}
    counts = np.zeros((len(categories), height, width), dtype=np.int32)
    for annotation in annotations:
        if annotation.get("area", 0) == 0 or annotation.get("iscrowd", 0) == 1:
            continue
        category = annotation.get("category_id")
        if category not in index_of:
            raise LayoutFormatError(f"{where}: annotation {annotation.get('id')} has unknown category {category}")
        segmentation = annotation.get("segmentation")
        if not isinstance(segmentation, list):
            raise LayoutFormatError(f"{where}: annotation {annotation.get('id')}: expected polygon segmentation")
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for polygon in segmentation:
            if len(polygon) == 4:  # a degenerate polygon: its annotation box, as PDiscoFormer
                x, y, w, h = annotation["bbox"]
                polygon = [x, y, x, y + h, x + w, y + h, x + w, y]
            if len(polygon) < 6 or len(polygon) % 2:
                raise LayoutFormatError(f"{where}: annotation {annotation.get('id')} has a polygon of "
                                        f"{len(polygon)} numbers")
            draw.polygon([float(v) for v in polygon], fill=1)
        counts[index_of[category]] += np.asarray(canvas, dtype=np.int32)
    labels = counts.argmax(0) + 1
    labels[counts.max(0) == 0] = 0
    return labels.astype(np.uint8)


def part_centroids(part_labels: np.ndarray, num_parts: int) -> list[dict]:
    """One keypoint per part: the mean pixel centre of its pixels, visible when it has any."""
    keypoints = []
    for k in range(num_parts):
        rows, columns = np.nonzero(part_labels == k + 1)
        if len(rows):
            keypoints.append({"part_id": k, "x": float(columns.mean() + 0.5), "y": float(rows.mean() + 0.5),
                              "visible": 1})
        else:
            keypoints.append({"part_id": k, "x": 0.0, "y": 0.0, "visible": 0})
    return keypoints


def resolve_source(data_dir: str | Path) -> Path:
    """The PartImageNet folder (holding annotations/ and images/), a folder containing it, or an archive."""
    path = Path(data_dir).expanduser().resolve()
    if official.is_archive(path):
        return path
    for candidate in (path, path / "PartImageNet"):
        if (candidate / "annotations").is_dir() and (candidate / "images").is_dir() and (
                any((candidate / "annotations").glob("*.json"))):
            return candidate
    archive = official.find_archive(path, ("PartImageNet", "PartImageNet_OOD"))
    if archive is None:
        raise FileNotFoundError(f"{path}: no PartImageNet data found (expected annotations/*.json and images/, here or "
                                "in PartImageNet/)")
    return archive


is_layout = official.finds_layout(resolve_source)


class PartImageNetConfig(official.SourceConfig):
    """`official.SourceConfig` of this builder."""


class PartImageNet(datasets.GeneratorBasedBuilder):
    """PartImageNet builder (see the module docstring); prefer `load_partimagenet`."""

    CONFIG_NAMES = CONFIG_NAMES
    BUILDER_CONFIG_CLASS = PartImageNetConfig
    BUILDER_CONFIGS = [PartImageNetConfig(name=name) for name in CONFIG_NAMES]
    DEFAULT_CONFIG_NAME = "official"

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(description="PartImageNet (He et al., 2022); see ivpt/data/partimagenet.py.",
                                    homepage="https://github.com/TACJu/PartImageNet")

    def _download_and_prepare(self, dl_manager, verification_mode, **kwargs) -> None:
        source = Path(self.config.source)
        with official.unpacked([source] if official.is_archive(source) else [], self._cache_dir_root) as tmp:
            if official.is_archive(source):
                found = sorted((p.parent for p in tmp.rglob("annotations") if p.is_dir()), key=lambda p: len(p.parts))
                if not found:
                    raise LayoutFormatError(f"{source}: no annotations/ folder inside")
                source = found[0]
            self._root = source
            super()._download_and_prepare(dl_manager, verification_mode, **kwargs)

    def _split_generators(self, dl_manager) -> list[datasets.SplitGenerator]:
        splits = [(name, _load_coco(self._root / "annotations" / file), folder, file)
                  for name, file, folder in _SPLIT_FILES[self.config.name]]
        categories = sorted({c["id"]: c for _, coco, _, _ in splits for c in coco["categories"]}.values(),
                            key=lambda c: c["id"])
        wnids = sorted({Path(image["file_name"]).name.split("_")[0] for _, coco, _, _ in splits
                        for image in coco["images"]})
        self.info.features = datasets.Features({
            "image": datasets.Image(), "label": datasets.ClassLabel(names=wnids),
            "image_id": datasets.Value("int32"), "file_name": datasets.Value("string"),
            "supercategory": datasets.Value("string"), "part_mask": datasets.Image(), "mask": datasets.Image(),
            "keypoints": datasets.List(official.KEYPOINT_FEATURE, length=len(categories)),
            "bbox": datasets.List(datasets.Value("float32"), length=4),
        })
        common = {"categories": categories, "label_of": {w: i for i, w in enumerate(wnids)}}
        return [datasets.SplitGenerator(name=name, gen_kwargs={"coco": coco, "folder": folder, "file": file, **common})
                for name, coco, folder, file in splits]

    def _image_path(self, folder: str, file_name: str) -> Path:
        base = self._root / "images" / folder
        for candidate in (base / file_name, base / Path(file_name).name.split("_")[0] / Path(file_name).name):
            if candidate.is_file():
                return candidate
        return base / file_name  # read_rgb names it in the error

    def _generate_examples(self, coco, folder, file, categories, label_of) -> Iterator[tuple[Key, dict]]:
        where = str(self._root / "annotations" / file)
        by_image: dict[Any, list[dict]] = {}
        for annotation in coco["annotations"]:
            by_image.setdefault(annotation.get("image_id"), []).append(annotation)
        category_ids = [c["id"] for c in categories]
        supercategory = {c["id"]: c.get("supercategory", "") for c in categories}
        for image_info in coco["images"]:
            usable = [a for a in by_image.get(image_info["id"], []) if a.get("area", 0) > 0 and not a.get("iscrowd")]
            if not usable:
                continue  # as PDiscoFormer: images without a part annotation are not used
            path = self._image_path(folder, image_info["file_name"])
            image, decoded = official.image_value(path, f"{file} image id {image_info['id']}")
            width, height = decoded.size
            if (image_info.get("width", width), image_info.get("height", height)) != (width, height):
                raise LayoutFormatError(f"{where}: image id {image_info['id']} is declared "
                                        f"{image_info.get('width')}x{image_info.get('height')}, the file {path} is "
                                        f"{width}x{height}")
            parts = rasterise_parts(usable, category_ids, height, width, f"{where}, image id {image_info['id']}")
            foreground = parts > 0
            rows, columns = np.nonzero(foreground)
            bbox = ([float(columns.min()), float(rows.min()), float(columns.max() - columns.min() + 1),
                     float(rows.max() - rows.min() + 1)] if len(rows) else [0.0, 0.0, float(width), float(height)])
            yield Key(0, int(image_info["id"])), {
                "image": image, "label": label_of[Path(image_info["file_name"]).name.split("_")[0]],
                "image_id": int(image_info["id"]), "file_name": image_info["file_name"],
                "supercategory": supercategory[usable[0]["category_id"]],
                "part_mask": {"path": None, "bytes": official.encode(Image.fromarray(parts, mode="L"))},
                "mask": {"path": None, "bytes": official.encode(
                    Image.fromarray((foreground * 255).astype(np.uint8), mode="L"))},
                "keypoints": part_centroids(parts, len(category_ids)), "bbox": bbox,
            }


def load_partimagenet(data_dir: str | Path, config: Optional[str] = None, cache_dir=None) -> datasets.DatasetDict:
    """Builds (once) and loads PartImageNet (``official`` or ``ood`` config, see the module docstring).

    Raises:
        LayoutFormatError: malformed sources (the message names the file and image).
        FileNotFoundError: no PartImageNet data under `data_dir`.
    """
    source = resolve_source(data_dir)
    return official.build(PartImageNet, [source], config or "official", cache_dir, "partimagenet.py",
                          source=str(source))
