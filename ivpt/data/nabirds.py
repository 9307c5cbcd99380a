"""NABirds (Van Horn et al., 2015) as a `datasets` builder, from the official layout (folder or ``nabirds.tar.gz``).

Official layout (the ``nabirds/`` folder of the download)::

    images.txt              <image uuid> <class folder>/<file>.jpg
    image_class_labels.txt  <image uuid> <class id>
    train_test_split.txt    <image uuid> <1 train | 0 test>
    bounding_boxes.txt      <image uuid> <x> <y> <width> <height>
    classes.txt             <class id> <class name>        (every node of the taxonomy, 1011 ids)
    hierarchy.txt           <child class id> <parent class id>
    parts/parts.txt         <part id> <part name>          (11 parts, ids from 0)
    parts/part_locs.txt     <image uuid> <part id> <x> <y> <visible>
    images/<class folder>/<file>.jpg

Labels follow PDiscoFormer's loader: the class ids used by images (the 555 leaves of the taxonomy) sorted ascending
and numbered 0..554; label names come from classes.txt. Features (one config, ``full``)::

    image       Image()                           RGB (RGB JPEGs stored byte-for-byte)
    label       ClassLabel(555 leaf names)
    class_id    int32                             the class id of image_class_labels.txt
    ancestors   List(string)                      hierarchy.txt parents of the class, nearest first, up to the root
    image_id    int32                             line of images.txt (seeds the stability noise)
    image_uuid  string                            the official image id
    file_name   string                            path under images/
    bbox        List(float32, 4)                  [x, y, w, h]
    keypoints   List({part_id, x, y, visible}, 11)

Splits ``train`` / ``test`` from train_test_split.txt. Every line is validated (errors name the file and the line).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import datasets
from datasets.builder import Key

from . import official
from .official import LayoutFormatError

CONFIG_NAMES = ("full",)
_ARCHIVE_STEMS = ("nabirds",)


@dataclass(frozen=True)
class NabirdsRecord:
    image_id: int  # images.txt line
    uuid: str
    file_name: str
    class_id: int
    is_train: bool
    bbox: tuple[float, float, float, float]
    keypoints: tuple[tuple[int, float, float, int], ...]


def read_hierarchy(root: Path) -> dict[int, int]:
    """hierarchy.txt as {child class id: parent class id}; cycles are errors."""
    path = root / "hierarchy.txt"
    parents: dict[int, int] = {}
    for number, line in official.lines(path):
        child, parent = (official.integer(path, number, t, w) for t, w in zip(official.fields(path, number, line, 2),
                                                                           ("the child id", "the parent id")))
        if child in parents:
            raise LayoutFormatError(f"{path}, line {number}: class {child} already has a parent")
        parents[child] = parent
    for start in parents:
        seen, node = {start}, start
        while node in parents:
            node = parents[node]
            if node in seen:
                raise LayoutFormatError(f"{path}: the hierarchy has a cycle through class {start}")
            seen.add(node)
    return parents


def read_annotations(root: Path) -> tuple[list[NabirdsRecord], dict[int, str], list[str], dict[int, int]]:
    """(records in images.txt order, class names by id, part names, hierarchy) of a NABirds folder."""
    classes_path = root / "classes.txt"
    class_names = {official.integer(classes_path, n, k, "the class id"): v[0]
                   for k, (n, v) in official.id_table(classes_path, 2, last_is_text=True).items()}
    parts_path = root / "parts" / "parts.txt"
    parts = {official.integer(parts_path, n, k, "the part id"): v[0]
             for k, (n, v) in official.id_table(parts_path, 2, last_is_text=True).items()}
    part_ids = sorted(parts)
    images_path = root / "images.txt"
    images = official.id_table(images_path, 2, last_is_text=True)
    tables = {}
    for name, count in (("image_class_labels.txt", 2), ("train_test_split.txt", 2), ("bounding_boxes.txt", 5)):
        tables[name] = official.id_table(root / name, count)
        for uuid, (number, _) in tables[name].items():
            if uuid not in images:
                raise LayoutFormatError(f"{root / name}, line {number}: image id {uuid} is not in images.txt")
    locs_path = root / "parts" / "part_locs.txt"
    keypoints: dict[str, dict[int, tuple[int, float, float, int]]] = {}
    for number, line in official.lines(locs_path):
        uuid, part_text, x_text, y_text, visible_text = official.fields(locs_path, number, line, 5)
        if uuid not in images:
            raise LayoutFormatError(f"{locs_path}, line {number}: image id {uuid} is not in images.txt")
        part_id = official.integer(locs_path, number, part_text, "the part id")
        if part_id not in parts:
            raise LayoutFormatError(f"{locs_path}, line {number}: part id {part_id} is not in parts/parts.txt")
        visible = official.integer(locs_path, number, visible_text, "visible")
        if visible not in (0, 1):
            raise LayoutFormatError(f"{locs_path}, line {number}: visible must be 0 or 1, got {visible}")
        keypoints.setdefault(uuid, {})[part_id] = (
            part_id, official.number_(locs_path, number, x_text, "x"), official.number_(locs_path, number, y_text, "y"),
            visible)
    records = []
    for uuid, (line, (file_name,)) in images.items():
        for name in tables:
            if uuid not in tables[name]:
                raise LayoutFormatError(f"{images_path}, line {line}: image id {uuid} is missing from {name}")
        label_line, (class_text,) = tables["image_class_labels.txt"][uuid]
        class_id = official.integer(root / "image_class_labels.txt", label_line, class_text, "the class id")
        if class_id not in class_names:
            raise LayoutFormatError(f"{root / 'image_class_labels.txt'}, line {label_line}: class id {class_id} is "
                                    "not in classes.txt")
        split_line, (train_text,) = tables["train_test_split.txt"][uuid]
        is_train = official.integer(root / "train_test_split.txt", split_line, train_text, "is_train")
        if is_train not in (0, 1):
            raise LayoutFormatError(f"{root / 'train_test_split.txt'}, line {split_line}: is_train must be 0 or 1")
        box_line, box_text = tables["bounding_boxes.txt"][uuid]
        bbox = tuple(official.number_(root / "bounding_boxes.txt", box_line, t, w)
                     for t, w in zip(box_text, ("x", "y", "width", "height")))
        if bbox[2] <= 0 or bbox[3] <= 0:
            raise LayoutFormatError(f"{root / 'bounding_boxes.txt'}, line {box_line}: box width and height must "
                                    f"be > 0, got {box_text}")
        found = keypoints.get(uuid, {})
        missing = [p for p in part_ids if p not in found]
        if missing:
            raise LayoutFormatError(f"{locs_path}: image id {uuid} (images.txt line {line}) has no row for part "
                                    f"id(s) {missing}")
        records.append(NabirdsRecord(line, uuid, file_name, class_id, bool(is_train), bbox,  # type: ignore[arg-type]
                                     tuple(found[p] for p in part_ids)))
    return records, class_names, [parts[p] for p in part_ids], read_hierarchy(root)


def resolve_source(data_dir: str | Path) -> Path:
    """The nabirds folder (holding images.txt), a folder containing it or ``nabirds.tar.gz``, or the archive."""
    path = Path(data_dir).expanduser().resolve()
    if official.is_archive(path):
        return path
    for candidate in (path, path / "nabirds"):
        if (candidate / "images.txt").is_file() and (candidate / "hierarchy.txt").is_file():
            return candidate
    archive = official.find_archive(path, _ARCHIVE_STEMS)
    if archive is None:
        raise FileNotFoundError(f"{path}: no NABirds data found (expected images.txt + hierarchy.txt, nabirds/ or "
                                "nabirds.tar.gz)")
    return archive


is_layout = official.finds_layout(resolve_source)


class NabirdsConfig(official.SourceConfig):
    """`official.SourceConfig` of this builder."""


class Nabirds(datasets.GeneratorBasedBuilder):
    """NABirds builder (see the module docstring); prefer `load_nabirds`."""

    CONFIG_NAMES = CONFIG_NAMES
    BUILDER_CONFIG_CLASS = NabirdsConfig
    BUILDER_CONFIGS = [NabirdsConfig(name=name) for name in CONFIG_NAMES]
    DEFAULT_CONFIG_NAME = "full"

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(description="NABirds (Van Horn et al., 2015); see ivpt/data/nabirds.py.",
                                    homepage="https://dl.allaboutbirds.org/nabirds")

    def _download_and_prepare(self, dl_manager, verification_mode, **kwargs) -> None:
        source = Path(self.config.source)
        with official.unpacked([source] if official.is_archive(source) else [], self._cache_dir_root) as tmp:
            self._root = official.locate(tmp, "hierarchy.txt", source) if official.is_archive(source) else source
            super()._download_and_prepare(dl_manager, verification_mode, **kwargs)

    def _split_generators(self, dl_manager) -> list[datasets.SplitGenerator]:
        records, class_names, part_names, hierarchy = read_annotations(self._root)
        leaf_ids = sorted({r.class_id for r in records})
        self.info.features = datasets.Features({
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=[class_names[c] for c in leaf_ids]),
            "class_id": datasets.Value("int32"),
            "ancestors": datasets.List(datasets.Value("string")),
            "image_id": datasets.Value("int32"),
            "image_uuid": datasets.Value("string"),
            "file_name": datasets.Value("string"),
            "bbox": datasets.List(datasets.Value("float32"), length=4),
            "keypoints": datasets.List(official.KEYPOINT_FEATURE, length=len(part_names)),
        })
        common = {"label_of": {c: i for i, c in enumerate(leaf_ids)}, "class_names": class_names,
                  "hierarchy": hierarchy}
        return [datasets.SplitGenerator(name=name, gen_kwargs={"records": [r for r in records if r.is_train == train],
                                                               **common})
                for name, train in (("train", True), ("test", False))]

    def _generate_examples(self, records, label_of, class_names, hierarchy) -> Iterator[tuple[Key, dict]]:
        for record in records:
            ancestors, node = [], record.class_id
            while node in hierarchy:
                node = hierarchy[node]
                ancestors.append(class_names.get(node, str(node)))
            image, _ = official.image_value(self._root / "images" / record.file_name,
                                            f"images.txt line {record.image_id}")
            yield Key(0, record.image_id), {
                "image": image, "label": label_of[record.class_id], "class_id": record.class_id,
                "ancestors": ancestors, "image_id": record.image_id, "image_uuid": record.uuid,
                "file_name": record.file_name, "bbox": list(record.bbox),
                "keypoints": [{"part_id": p, "x": x, "y": y, "visible": v} for p, x, y, v in record.keypoints],
            }


def load_nabirds(data_dir: str | Path, config: Optional[str] = None, cache_dir=None) -> datasets.DatasetDict:
    """Builds (once) and loads NABirds from a folder or ``nabirds.tar.gz``: splits ``train`` and ``test``.

    Raises:
        LayoutFormatError: malformed sources (the message names the file and line).
        FileNotFoundError: no NABirds data under `data_dir`.
    """
    source = resolve_source(data_dir)
    return official.build(Nabirds, [source], config or "full", cache_dir, "nabirds.py", source=str(source))
