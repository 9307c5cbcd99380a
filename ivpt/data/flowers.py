"""Oxford Flowers-102 (Nilsback & Zisserman, 2008) with its foreground segmentations, as a `datasets` builder.

Official files (as downloaded, in one folder; torchvision keeps them in ``flowers-102/``)::

    102flowers.tgz  or  jpg/image_00001.jpg ...      the 8189 images
    imagelabels.mat                                  `labels`: 1 x 8189 class ids (1..102)
    setid.mat                                        `trnid`, `valid`, `tstid`: 1-based image numbers
    102segmentations.tgz  or  segmim/segmim_00001.jpg ...   colour-coded segmentations (optional)

Splits are the official ones: ``train`` (trnid), ``validation`` (valid), ``test`` (tstid). Labels are the class ids
minus one (torchvision's and PDiscoFormer's numbering), named by the class id. The foreground mask follows
PDiscoFormer's reading of the segmentations: a pixel is background where blue / (green + red + 1e-6) > 100 (the
segmentation paints the background pure blue), the rest is foreground, then a 5 x 5 median filter smooths masks that
have both values (PIL's median filter, which replicates the border pixels like OpenCV's `medianBlur` that PDiscoFormer
uses).
Features (one config, ``full``)::

    image     Image()             RGB
    label     ClassLabel          class id - 1
    image_id  int32               the image number (image_<number>.jpg)
    file_name string              jpg/image_<number>.jpg
    mask      Image() or None     foreground mask ("L", 0 / 255); None without segmentations
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

import datasets
import numpy as np
from datasets.builder import Key
from PIL import Image, ImageFilter

from . import official
from .official import LayoutFormatError

CONFIG_NAMES = ("full",)
SPLITS = (("train", "trnid"), ("validation", "valid"), ("test", "tstid"))


def foreground_mask(segmentation: Image.Image) -> Image.Image:
    """PDiscoFormer's foreground mask of a Flowers-102 segmentation image ("L", 0 background / 255 foreground)."""
    rgb = np.asarray(segmentation.convert("RGB"), dtype=np.float64)
    background = rgb[..., 2] / (rgb[..., 1] + rgb[..., 0] + 1e-6) > 100
    mask = Image.fromarray(np.where(background, 0, 255).astype(np.uint8), mode="L")
    if background.any() and not background.all():
        mask = mask.filter(ImageFilter.MedianFilter(5))
    return mask


def _load_mat(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    from scipy.io import loadmat

    if not path.is_file():
        raise LayoutFormatError(f"{path}: file not found (expected by the Flowers-102 layout)")
    try:
        content = loadmat(str(path))
    except Exception as error:  # scipy raises several types for bad files
        raise LayoutFormatError(f"{path}: cannot read the .mat file ({type(error).__name__}: {error})") from error
    missing = [k for k in keys if k not in content]
    if missing:
        raise LayoutFormatError(f"{path}: no variable(s) {missing}; found {sorted(k for k in content if k[0] != '_')}")
    return {k: np.asarray(content[k]).astype(np.int64).ravel() for k in keys}


def resolve_sources(data_dir: str | Path) -> dict[str, Path]:
    """{"root": folder with the .mat files, "images": jpg/ or 102flowers.tgz, "segmentations": segmim/ or
    102segmentations.tgz (absent when not found)}."""
    path = Path(data_dir).expanduser().resolve()
    root = next((p for p in (path, path / "flowers-102") if (p / "imagelabels.mat").is_file()), None)
    if root is None:
        raise FileNotFoundError(f"{path}: no Oxford Flowers-102 data found (expected imagelabels.mat, setid.mat and "
                                "jpg/ or 102flowers.tgz, here or in flowers-102/)")
    sources = {"root": root}
    images = root / "jpg" if (root / "jpg").is_dir() else official.find_archive(root, ("102flowers",))
    if images is None:
        raise FileNotFoundError(f"{root}: no jpg/ folder or 102flowers.tgz")
    sources["images"] = images
    segmentations = root / "segmim" if (root / "segmim").is_dir() else official.find_archive(root, ("102segmentations",))
    if segmentations is not None:
        sources["segmentations"] = segmentations
    return sources


is_layout = official.finds_layout(resolve_sources)


class FlowersConfig(datasets.BuilderConfig):
    def __init__(self, sources: Optional[dict] = None, **kwargs: Any) -> None:
        kwargs.setdefault("version", datasets.Version("1.0.0"))
        super().__init__(**kwargs)
        self.sources = sources or {}


class Flowers102(datasets.GeneratorBasedBuilder):
    """Oxford Flowers-102 builder with segmentation masks (see the module docstring); prefer `load_flowers102`."""

    CONFIG_NAMES = CONFIG_NAMES
    BUILDER_CONFIG_CLASS = FlowersConfig
    BUILDER_CONFIGS = [FlowersConfig(name=name) for name in CONFIG_NAMES]
    DEFAULT_CONFIG_NAME = "full"

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(description="Oxford Flowers-102 with segmentations; see ivpt/data/flowers.py.",
                                    homepage="https://www.robots.ox.ac.uk/~vgg/data/flowers/102/")

    def _download_and_prepare(self, dl_manager, verification_mode, **kwargs) -> None:
        sources = {k: Path(v) for k, v in self.config.sources.items()}
        archives = [p for k, p in sources.items() if k != "root" and official.is_archive(p)]
        with official.unpacked(archives, self._cache_dir_root) as tmp:
            self._images = sources["images"]
            if official.is_archive(self._images):
                self._images = self._first_folder(tmp, "jpg", self._images)
            self._segmentations = sources.get("segmentations")
            if self._segmentations is not None and official.is_archive(self._segmentations):
                self._segmentations = self._first_folder(tmp, "segmim", self._segmentations)
            self._root = sources["root"]
            super()._download_and_prepare(dl_manager, verification_mode, **kwargs)

    @staticmethod
    def _first_folder(tmp: Path, name: str, archive: Path) -> Path:
        found = sorted((p for p in tmp.rglob(name) if p.is_dir()), key=lambda p: len(p.parts))
        if not found:
            raise LayoutFormatError(f"{archive}: no {name}/ folder inside")
        return found[0]

    def _split_generators(self, dl_manager) -> list[datasets.SplitGenerator]:
        labels = _load_mat(self._root / "imagelabels.mat", ("labels",))["labels"]
        split_ids = _load_mat(self._root / "setid.mat", tuple(key for _, key in SPLITS))
        class_ids = sorted(set(labels.tolist()))
        self.info.features = datasets.Features({
            "image": datasets.Image(), "label": datasets.ClassLabel(names=[str(c) for c in class_ids]),
            "image_id": datasets.Value("int32"), "file_name": datasets.Value("string"), "mask": datasets.Image(),
        })
        label_of = {c: i for i, c in enumerate(class_ids)}
        generators = []
        for name, key in SPLITS:
            ids = split_ids[key].tolist()
            bad = [i for i in ids if not 1 <= i <= len(labels)]
            if bad:
                raise LayoutFormatError(f"{self._root / 'setid.mat'}: {key} holds image number {bad[0]}, outside "
                                        f"1..{len(labels)} (the images of imagelabels.mat)")
            generators.append(datasets.SplitGenerator(name=name, gen_kwargs={
                "items": [(i, label_of[int(labels[i - 1])]) for i in ids]}))
        return generators

    def _generate_examples(self, items) -> Iterator[tuple[Key, dict]]:
        for number, label in items:
            image, decoded = official.image_value(self._images / f"image_{number:05d}.jpg", "setid.mat")
            mask = None
            if self._segmentations is not None:
                path = self._segmentations / f"segmim_{number:05d}.jpg"
                segmentation, _, _ = official.read_rgb(path)
                if segmentation.size != decoded.size:
                    raise LayoutFormatError(f"{path}: segmentation size {segmentation.size} differs from the image's "
                                            f"{decoded.size}")
                mask = {"path": None, "bytes": official.encode(foreground_mask(segmentation))}
            yield Key(0, number), {"image": image, "label": label, "image_id": number,
                                   "file_name": f"jpg/image_{number:05d}.jpg", "mask": mask}


def load_flowers102(data_dir: str | Path, config: Optional[str] = None, cache_dir=None) -> datasets.DatasetDict:
    """Builds (once) and loads Oxford Flowers-102: splits ``train``, ``validation``, ``test`` with masks.

    Raises:
        LayoutFormatError: malformed sources (the message names the file).
        FileNotFoundError: no Flowers-102 data under `data_dir`.
    """
    sources = resolve_sources(data_dir)
    return official.build(Flowers102, list(sources.values()), config or "full", cache_dir, "flowers.py",
                          sources={k: str(v) for k, v in sources.items()})
