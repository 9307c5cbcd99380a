"""Synthetic NABirds, Oxford Flowers-102 and PartImageNet sources in the exact official file layouts.

Every image shows a class-coloured object (an ellipse body and a round head) on a noisy background; the annotations
(keypoints, boxes, segmentations, part polygons) describe that object, so metrics computed on them are meaningful.
"""

from __future__ import annotations

import json
import tarfile
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

NABIRDS_PARTS = ["bill", "crown", "nape", "left eye", "right eye", "belly", "breast", "back", "tail", "left wing",
                 "right wing"]
PIN_PARTS = [(0, "Quadruped Head", "Quadruped"), (1, "Quadruped Body", "Quadruped"), (2, "Quadruped Foot", "Quadruped"),
             (3, "Quadruped Tail", "Quadruped")]
COLOURS = [(200, 40, 40), (40, 160, 60), (50, 70, 200), (220, 180, 30), (150, 60, 170)]


def _scene(rng, size: int, label: int):
    """Image and geometry: body ellipse box, head circle centre/radius, tail point (all pixels)."""
    pixels = rng.normal(110, 25, (size, size, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    cx, cy = size * rng.uniform(0.4, 0.6), size * rng.uniform(0.45, 0.6)
    bw, bh = size * 0.3, size * 0.18
    body = (cx - bw, cy - bh, cx + bw, cy + bh)
    head = (cx - bw * 0.9, cy - bh * 1.6)
    radius = size * 0.1
    draw.ellipse(body, fill=COLOURS[label % len(COLOURS)])
    draw.ellipse((head[0] - radius, head[1] - radius, head[0] + radius, head[1] + radius), fill=(230, 230, 230))
    tail = (cx + bw * 1.1, cy)
    draw.polygon([(cx + bw * 0.8, cy - 4), tail, (cx + bw * 0.8, cy + 4)], fill=(20, 20, 20))
    return image, {"body": body, "head": head, "radius": radius, "tail": tail}


def _tgz(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


# ---------------------------------------------------------------------------------------------------------------------
# NABirds
# ---------------------------------------------------------------------------------------------------------------------

# taxonomy: 0 Birds <- 1 Perching Birds <- 100 Sparrows <- leaves 295, 296; 0 <- 200 Ducks <- leaf 297
NABIRDS_CLASSES = {0: "Birds", 1: "Perching Birds", 100: "Sparrows", 200: "Ducks", 295: "Song Sparrow",
                   296: "Fox Sparrow (Red)", 297: "Mallard (Female/Juvenile)"}
NABIRDS_HIERARCHY = {1: 0, 100: 1, 200: 0, 295: 100, 296: 100, 297: 200}


def generate_nabirds(out: Path, images_per_class: int = 4, size: int = 72, seed: int = 0, tgz: bool = False) -> Path:
    """`out/nabirds/` (or `out/nabirds.tar.gz`) with 3 leaf classes; every other image of a class is a test image."""
    rng = np.random.default_rng(seed)
    root = Path(out) / "nabirds"
    (root / "parts").mkdir(parents=True)
    rows = {name: [] for name in ("images", "labels", "split", "boxes", "locs", "sizes")}
    leaves = [295, 296, 297]
    for label, class_id in enumerate(leaves):
        for i in range(images_per_class):
            image_uuid = str(uuid.UUID(int=int(rng.integers(0, 2**62)) * 7919 + label * 1000 + i))
            relative = f"{class_id:04d}/{image_uuid.replace('-', '')}.jpg"
            image, geo = _scene(rng, size, label)
            (root / "images" / f"{class_id:04d}").mkdir(parents=True, exist_ok=True)
            image.save(root / "images" / relative, quality=95)
            x0, y0 = int(geo["body"][0]) - 2, int(geo["head"][1] - geo["radius"]) - 2
            x1, y1 = int(geo["tail"][0]) + 2, int(geo["body"][3]) + 2
            rows["images"].append(f"{image_uuid} {relative}")
            rows["labels"].append(f"{image_uuid} {class_id}")
            rows["split"].append(f"{image_uuid} {int(i % 2 == 0)}")
            rows["boxes"].append(f"{image_uuid} {x0} {y0} {x1 - x0} {y1 - y0}")
            rows["sizes"].append(f"{image_uuid} {size} {size}")
            cx, cy = (geo["body"][0] + geo["body"][2]) / 2, (geo["body"][1] + geo["body"][3]) / 2
            points = {0: (geo["head"][0] - geo["radius"], geo["head"][1]), 1: (geo["head"][0], geo["head"][1] - 5),
                      5: (cx, cy + 4), 6: (cx - 8, cy), 7: (cx, cy - 5), 8: geo["tail"]}
            for part in range(len(NABIRDS_PARTS)):
                if part in points:
                    rows["locs"].append(f"{image_uuid} {part} {int(points[part][0])} {int(points[part][1])} 1")
                else:
                    rows["locs"].append(f"{image_uuid} {part} 0 0 0")
    files = {"images.txt": rows["images"], "image_class_labels.txt": rows["labels"],
             "train_test_split.txt": rows["split"], "bounding_boxes.txt": rows["boxes"], "sizes.txt": rows["sizes"],
             "classes.txt": [f"{k} {v}" for k, v in NABIRDS_CLASSES.items()],
             "hierarchy.txt": [f"{k} {v}" for k, v in NABIRDS_HIERARCHY.items()],
             "parts/parts.txt": [f"{i} {name}" for i, name in enumerate(NABIRDS_PARTS)],
             "parts/part_locs.txt": rows["locs"]}
    for name, lines in files.items():
        (root / name).write_text("\n".join(lines) + "\n")
    if tgz:
        archive = _tgz(root, Path(out) / "nabirds.tar.gz")
        import shutil

        shutil.rmtree(root)
        return archive
    return root


# ---------------------------------------------------------------------------------------------------------------------
# Oxford Flowers-102
# ---------------------------------------------------------------------------------------------------------------------


def generate_flowers(out: Path, classes: int = 3, per_split: int = 1, size: int = 64, seed: int = 0,
                     tgz: bool = False) -> Path:
    """`out/flowers-102/` with jpg/ (or 102flowers.tgz), imagelabels.mat, setid.mat and segmim/ (or
    102segmentations.tgz); `per_split` images per class in each of trnid / valid / tstid."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    root = Path(out) / "flowers-102"
    (root / "jpg").mkdir(parents=True)
    (root / "segmim").mkdir()
    labels, split_ids = [], {"trnid": [], "valid": [], "tstid": []}
    number = 0
    for split in ("trnid", "valid", "tstid"):
        for label in range(classes):
            for _ in range(per_split):
                number += 1
                image, geo = _scene(rng, size, label)
                image.save(root / "jpg" / f"image_{number:05d}.jpg", quality=95)
                segmentation = Image.new("RGB", (size, size), (0, 0, 254))  # the official pure-blue background
                ImageDraw.Draw(segmentation).ellipse(geo["body"], fill=(250, 30, 30))
                segmentation.save(root / "segmim" / f"segmim_{number:05d}.jpg", quality=95)
                labels.append(label + 1)
                split_ids[split].append(number)
    savemat(root / "imagelabels.mat", {"labels": np.asarray([labels], dtype=np.uint8)})
    savemat(root / "setid.mat", {k: np.asarray([v], dtype=np.uint16) for k, v in split_ids.items()})
    if tgz:
        import shutil

        for folder, archive in (("jpg", "102flowers.tgz"), ("segmim", "102segmentations.tgz")):
            _tgz(root / folder, root / archive)
            shutil.rmtree(root / folder)
    return root


# ---------------------------------------------------------------------------------------------------------------------
# PartImageNet
# ---------------------------------------------------------------------------------------------------------------------

PIN_WNIDS = ["n02085620", "n02123045", "n02129604"]


def _polygon_of_box(box) -> list[float]:
    x0, y0, x1, y1 = box
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def generate_partimagenet(out: Path, images_per_split: int = 4, size: int = 64, seed: int = 0,
                          ood: bool = True, tgz: bool = False) -> Path:
    """`out/PartImageNet/` with annotations/{train,val,test}.json (COCO part polygons) and
    images/{train,val,test}/<wnid>/<wnid>_<n>.JPEG; with `ood`, also PDiscoFormer's train_train.json / train_test.json
    (a split of the train images). One image per split has an extra overlapping part and one no annotation."""
    rng = np.random.default_rng(seed)
    root = Path(out) / "PartImageNet"
    (root / "annotations").mkdir(parents=True)
    categories = [{"id": i, "name": n, "supercategory": s} for i, n, s in PIN_PARTS]
    next_annotation = 0
    documents = {}
    for split in ("train", "val", "test"):
        images, annotations = [], []
        for i in range(images_per_split):
            label = i % len(PIN_WNIDS)
            wnid = PIN_WNIDS[label]
            file_name = f"{wnid}_{1000 + i}.JPEG"
            image, geo = _scene(rng, size, label)
            folder = root / "images" / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / file_name, format="JPEG", quality=95)
            image_id = len(images)
            images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
            if i == images_per_split - 1:
                continue  # no annotation: dropped by the builder, as by PDiscoFormer
            hx, hy, r = geo["head"][0], geo["head"][1], geo["radius"]
            body = geo["body"]
            parts = [(0, [hx - r, hy - r, hx + r, hy - r, hx + r, hy + r, hx - r, hy + r]),
                     (1, _polygon_of_box(body)),
                     (3, [body[2] - 3, (body[1] + body[3]) / 2 - 4, geo["tail"][0], geo["tail"][1],
                          body[2] - 3, (body[1] + body[3]) / 2 + 4])]
            if i == 0:
                parts.append((2, [body[0] + 2, body[3] - 3, body[0] + 6, body[3] + 6]))  # 4 numbers: its bbox
            for category, polygon in parts:
                xs, ys = polygon[0::2], polygon[1::2]
                bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
                if len(polygon) == 4:
                    bbox = [polygon[0], polygon[1], polygon[2] - polygon[0], polygon[3] - polygon[1]]
                annotations.append({"id": next_annotation, "image_id": image_id, "category_id": category,
                                    "segmentation": [polygon], "area": float(bbox[2] * bbox[3]), "bbox": bbox,
                                    "iscrowd": 0})
                next_annotation += 1
        documents[split] = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"{split}.json").write_text(json.dumps(documents[split]))
    if ood:  # PDiscoFormer's prepare_partimagenet_ood.py output: train images split in two, ids renumbered
        train = documents["train"]
        for name, keep in (("train_train.json", lambda k: k % 2 == 0), ("train_test.json", lambda k: k % 2 == 1)):
            chosen = [im for im in train["images"] if keep(im["id"])]
            new_id = {im["id"]: n for n, im in enumerate(chosen)}
            doc = {"images": [{**im, "id": new_id[im["id"]],
                               "file_name": f"{im['file_name'].split('_')[0]}/{im['file_name']}"} for im in chosen],
                   "annotations": [{**a, "image_id": new_id[a["image_id"]]} for a in train["annotations"]
                                   if a["image_id"] in new_id],
                   "categories": categories}
            (root / "annotations" / name).write_text(json.dumps(doc))
    if tgz:
        import shutil

        archive = _tgz(root, Path(out) / "PartImageNet.tar.gz")
        shutil.rmtree(root)
        return archive
    return root
