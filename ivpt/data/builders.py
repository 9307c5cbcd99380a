"""Registry of the official dataset layouts our `datasets` builders read.

Each entry says how to recognise the layout in a folder (or archive) and which loader builds it. `load_any_dataset`
uses `detect_layout` so that ``--dataset_name PATH`` works for every layout; a new builder is one new entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

__all__ = ["LAYOUTS", "Layout", "detect_layout"]


@dataclass(frozen=True)
class Layout:
    """An official file layout: `detect(path)` is true when `path` holds it; `load(path, config, cache_dir, **kw)`."""

    name: str
    detect: Callable[[Path], bool]
    load: Callable


def _cub_detect(path: Path) -> bool:
    from .cub import resolve_sources

    try:
        resolve_sources(path, segmentations=False)
        return True
    except FileNotFoundError:
        return False


def _cub_load(path, config=None, cache_dir=None, **kwargs):
    from .cub import load_cub

    return load_cub(path, config or "full", cache_dir=cache_dir, **kwargs)


def _lazy(module: str, name: str) -> Callable:
    """`ivpt.data.<module>.<name>`, imported on first call."""

    def call(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(f".{module}", __package__), name)(*args, **kwargs)

    return call


# Order matters: NABirds has CUB's images.txt and parts/part_locs.txt too, and is told apart by hierarchy.txt.
LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("nabirds", _lazy("nabirds", "is_layout"), _lazy("nabirds", "load_nabirds")),
        Layout("cub", _cub_detect, _cub_load),
        Layout("flowers102", _lazy("flowers", "is_layout"), _lazy("flowers", "load_flowers102")),
        Layout("partimagenet", _lazy("partimagenet", "is_layout"), _lazy("partimagenet", "load_partimagenet")),
    )
}


def detect_layout(path: Path) -> Optional[tuple[str, Callable]]:
    """(name, loader) of the first registered layout found in folder `path`, else None."""
    for layout in LAYOUTS.values():
        if layout.detect(Path(path)):
            return layout.name, layout.load
    return None
