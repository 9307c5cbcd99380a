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
    return (path / "images.txt").is_file() and (path / "parts" / "part_locs.txt").is_file() or (
        (path / "CUB_200_2011" / "images.txt").is_file()
    ) or any((path / f"CUB_200_2011{s}").is_file() for s in (".tgz", ".tar.gz", ".tar"))


def _cub_load(path, config=None, cache_dir=None, **kwargs):
    from .cub import load_cub

    return load_cub(path, config or "full", cache_dir=cache_dir, **kwargs)


LAYOUTS: dict[str, Layout] = {
    "cub": Layout("cub", _cub_detect, _cub_load),
}


def detect_layout(path: Path) -> Optional[tuple[str, Callable]]:
    """(name, loader) of the first registered layout found in folder `path`, else None."""
    for layout in LAYOUTS.values():
        if layout.detect(Path(path)):
            return layout.name, layout.load
    return None
