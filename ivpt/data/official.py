"""Shared plumbing of the builders for official dataset layouts (NABirds, Flowers-102, PartImageNet).

* text tables parsed with errors naming the file and the line (`LayoutFormatError`);
* sources given as a folder or as the official archives (unpacked safely into a temporary folder next to the cache);
* images fully decoded at build time (truncated or missing files are errors naming the file);
* a cache keyed on every source file (size + mtime), the builders' source code and the config, so changed data or
  code never serve stale Arrow files. `datasets` writes into a temporary folder and renames it at the end, so a
  failure leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import datasets
from PIL import Image, ImageFile

ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar")


class LayoutFormatError(ValueError):
    """A source file of an official layout is missing or malformed; the message names the file (and line)."""


def lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, stripped line) of a text file, blank lines skipped."""
    if not path.is_file():
        raise LayoutFormatError(f"{path}: file not found (expected by the official layout)")
    with path.open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if line:
                yield number, line


def fields(path: Path, number: int, line: str, count: int, last_is_text: bool = False) -> list[str]:
    parts = line.split(maxsplit=count - 1) if last_is_text else line.split()
    if len(parts) != count:
        raise LayoutFormatError(f"{path}, line {number}: expected {count} fields, got {len(parts)}: {line!r}")
    return parts


def integer(path: Path, number: int, text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise LayoutFormatError(f"{path}, line {number}: {what} must be an integer, got {text!r}") from None


def number_(path: Path, number: int, text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LayoutFormatError(f"{path}, line {number}: {what} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise LayoutFormatError(f"{path}, line {number}: {what} must be finite, got {text!r}")
    return value


def id_table(path: Path, count: int, last_is_text: bool = False) -> dict[str, tuple[int, list[str]]]:
    """First column (kept as text) -> (line number, remaining fields); duplicate ids are errors."""
    table: dict[str, tuple[int, list[str]]] = {}
    for number, line in lines(path):
        parts = fields(path, number, line, count, last_is_text)
        if parts[0] in table:
            raise LayoutFormatError(f"{path}, line {number}: id {parts[0]} already defined on line {table[parts[0]][0]}")
        table[parts[0]] = (number, parts[1:])
    return table


def read_rgb(path: Path, where: str = "") -> tuple[Image.Image, bytes, bool]:
    """Fully decoded RGB image, its original bytes, and whether it had to be converted (not an RGB JPEG)."""
    label = f"{path}{f' ({where})' if where else ''}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LayoutFormatError(f"{label}: image file not found") from None
    previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            fmt, mode = image.format, image.mode
            rgb = image.convert("RGB") if mode != "RGB" else image.copy()
    except Exception as error:  # PIL raises several types
        raise LayoutFormatError(f"{label}: cannot decode image ({type(error).__name__}: {error})") from error
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    return rgb, data, not (fmt == "JPEG" and mode == "RGB")


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def image_value(path: Path, where: str = "") -> tuple[dict, Image.Image]:
    """`datasets.Image` value (RGB JPEGs byte-for-byte, anything else re-encoded losslessly as PNG) and the image."""
    image, data, converted = read_rgb(path, where)
    return {"path": path.name, "bytes": encode(image) if converted else data}, image


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES)


def find_archive(folder: Path, stems: Sequence[str]) -> Optional[Path]:
    for stem in stems:
        for suffix in ARCHIVE_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return None


def safe_extract(archive: Path, destination: Path) -> None:
    """Extracts regular files and folders only (no links, no absolute or parent paths)."""
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(destination, filter="data")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise LayoutFormatError(f"{archive}: cannot read the archive ({error})") from error


@contextlib.contextmanager
def unpacked(archives: Sequence[Path], directory: Optional[str]) -> Iterator[Path]:
    """A temporary folder holding the extracted `archives` (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="tmp_ivpt_extract_", dir=directory) as tmp:
        for archive in archives:
            safe_extract(archive, Path(tmp))
        yield Path(tmp)


def locate(directory: Path, marker: str, source: Path) -> Path:
    """The shallowest folder under `directory` containing `marker` (a relative path)."""
    candidates = sorted((p for p in directory.rglob(Path(marker).name) if p.as_posix().endswith(marker)),
                        key=lambda p: len(p.parts))
    if not candidates:
        raise LayoutFormatError(f"{source}: no {marker} inside")
    return Path(str(candidates[0])[: -len(marker)]).resolve()


def _source_files(paths: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for path in paths:
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            out.extend(p for p in path.rglob("*") if p.is_file())
    return sorted(set(out))


def fingerprint(paths: Sequence[Path], code_files: Sequence[str], params: dict) -> str:
    """Cache key: every source file's path, size and mtime, the builders' code and the config parameters."""
    digest = hashlib.sha256(repr(sorted(params.items())).encode())
    for name in ("official.py", *code_files):
        digest.update((Path(__file__).parent / name).read_bytes())
    for path in _source_files(paths):
        stat = path.stat()
        digest.update(f"{path.as_posix()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("IVPT_CACHE", Path(datasets.config.HF_DATASETS_CACHE) / "ivpt"))


def build(builder_class, source_paths: Sequence[Path], config: str, cache_dir, code_file: str,
          **config_kwargs) -> datasets.DatasetDict:
    """Builds (once, cached on the sources) and loads `builder_class` in `config`."""
    if config not in builder_class.CONFIG_NAMES:
        raise ValueError(f"Expected config in {builder_class.CONFIG_NAMES}, got {config!r}")
    params = {"config": config, **{k: str(v) for k, v in config_kwargs.items()}}
    builder = builder_class(
        cache_dir=str(Path(cache_dir) if cache_dir is not None else default_cache_dir()), config_name=config,
        hash=fingerprint(source_paths, (code_file,), params), **config_kwargs,
    )
    try:
        builder.download_and_prepare()
    except datasets.exceptions.DatasetGenerationError as error:
        if isinstance(error.__cause__, LayoutFormatError):
            raise LayoutFormatError(str(error.__cause__)) from error
        raise
    return builder.as_dataset()


KEYPOINT_FEATURE = {"part_id": datasets.Value("int32"), "x": datasets.Value("float32"), "y": datasets.Value("float32"),
                    "visible": datasets.Value("int32")}


def finds_layout(resolve: Callable[[Path], Any]) -> Callable[[Path], bool]:
    """A builder's `is_layout`: whether its `resolve` function finds the data at a path (`FileNotFoundError`: no)."""

    def is_layout(path: Path) -> bool:
        try:
            resolve(path)
            return True
        except FileNotFoundError:
            return False

    return is_layout


class SourceConfig(datasets.BuilderConfig):
    """A builder config carrying its resolved data source: the dataset's folder or its official archive."""

    def __init__(self, source: Optional[str] = None, **kwargs: Any) -> None:
        kwargs.setdefault("version", datasets.Version("1.0.0"))
        super().__init__(**kwargs)
        self.source = source
