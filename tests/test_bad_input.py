"""The bad-input matrix: data, configs, checkpoints, the training CLI, the evaluation CLI and the model's forward.

Every case feeds one bad input and is classified as

* clear: the exception is the project's (or a documented library one: argparse's exit status 2, the `OSError` of
  transformers for a folder without weights), its message names the culprit (file and line, field, flag, argument),
  or, for the few inputs that are only suspicious, a warning names it;
* unclear: another exception type, or a message that does not name the culprit;
* silent: accepted without error or warning;
* partial: something was left in the output or cache folder the case watches.

Each case asserts "clear". The per-surface counts of the four classes are printed at the end of the module (terminal
summary line `bad-input matrix`, through the file `$IVPT_BAD_INPUT_SUMMARY`, which conftest.py points to a
temporary file unless it is set). Cases that
other branches fix carry `xfail(strict=False)` with the branch in the reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import datasets
import pytest
import torch
from conftest import TINY_BACKBONE_KWARGS, tiny_config
from fixtures_data import delete_line, image_path, rewrite_line
from safetensors.torch import load_file, save_file

from ivpt import CheckpointError, IvptConfig, IvptForImageClassification, IvptModel
from ivpt.data import CubFormatError, generate_cub, load_cub
from ivpt.data.cub import export_image_folders
from ivpt.data.cub import main as cub_main
from ivpt.image_processing import make_image_processor

REPO = Path(__file__).resolve().parents[1]
SURFACES = ("data", "config", "checkpoint", "train_cli", "evaluate_cli", "forward")
OUTCOMES = ("clear", "unclear", "silent", "partial")
H13 = "fixed on branch h13 (evaluation CLI errors)"
NUM_CLASSES = 3


@dataclass(frozen=True)
class Case:
    surface: str
    name: str
    run: Callable  # run(ctx): feeds the bad input
    errors: tuple  # accepted exception types; () when a warning is the expected answer
    culprits: tuple = ()  # strings, or ctx -> str, that the message must contain
    warning: type | None = None
    watched: tuple = ()  # ctx attributes naming folders that must be left as they were: "out_root", "cache"
    xfail: str | None = None
    setup: Callable | None = None  # setup(ctx): prepares the watched folders before their snapshot


CASES: list[Case] = []


def case(surface, name, errors, *culprits, warning=None, watched=(), xfail=None, setup=None):
    """Registers the decorated `run(ctx)` as a case."""
    assert surface in SURFACES

    def register(run):
        CASES.append(Case(surface, name, run, errors, culprits, warning, watched, xfail, setup))
        return run

    return register


# ---------------------------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------------------------


class CommandFailed(Exception):
    """A command exited with an error status and no traceback (the message is its stderr)."""


class CommandTraceback(Exception):
    """A command exited with a traceback: not a clean error."""


def _snapshot(ctx, watched) -> dict:
    state = {}
    for attribute in watched:
        root = Path(getattr(ctx, attribute))
        for path in sorted(root.rglob("*")) if root.exists() else []:
            stat = path.lstat()
            state[(attribute, path.relative_to(root).as_posix())] = (path.is_dir(), stat.st_size, stat.st_mtime_ns)
    return state


def classify(case: Case, ctx) -> tuple[str, str]:
    """(outcome, detail) of running `case` in `ctx`."""
    if case.setup is not None:
        case.setup(ctx)
    before = _snapshot(ctx, case.watched)
    stderr = io.StringIO()
    raised = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with contextlib.redirect_stderr(stderr):
                case.run(ctx)
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # SystemExit included: argparse answers with status 2
            raised = error
    after = _snapshot(ctx, case.watched)
    changed = sorted(f"{a}/{p}" for (a, p) in set(after) | set(before) if after.get((a, p)) != before.get((a, p)))
    culprits = [c(ctx) if callable(c) else c for c in case.culprits]
    if raised is None or (isinstance(raised, SystemExit) and raised.code in (0, None)):
        messages = [str(w.message) for w in caught if case.warning and issubclass(w.category, case.warning)]
        if not changed and any(all(c in m for c in culprits) for m in messages):
            return "clear", ""
        return "silent", f"no error, wrote {changed[:5]}; warnings: {[str(w.message)[:200] for w in caught][:3]}"
    if changed:
        return "partial", f"left behind: {changed[:5]} (raised {type(raised).__name__}: {str(raised)[:300]})"
    text = f"{raised}\n{stderr.getvalue()}" if isinstance(raised, SystemExit) else str(raised)
    if isinstance(raised, case.errors) and all(c in text for c in culprits):
        return "clear", ""
    return "unclear", f"{type(raised).__name__}: {text[:600]!r}; expected {case.errors} naming {culprits}"


# ---------------------------------------------------------------------------------------------------------------------
# Shared fixtures (module scope: built once)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_input")
    cub = generate_cub(base / "data", classes=NUM_CLASSES, images_per_class=2, size=48, seed=0)
    cub_cache = base / "cub_cache"
    load_cub(cub, "full", cache_dir=cub_cache)
    torch.manual_seed(0)
    model = IvptForImageClassification(tiny_config(num_labels=NUM_CLASSES)).eval()
    checkpoint = base / "checkpoint"
    model.save_pretrained(checkpoint)
    make_image_processor(64).save_pretrained(checkpoint)
    return SimpleNamespace(base=base, cub=cub, cub_cache=cub_cache, model=model, checkpoint=checkpoint)


@pytest.fixture(scope="module")
def summary():
    results = {surface: {} for surface in SURFACES}
    yield results
    counts = {s: {o: sum(r == o for r in results[s].values()) for o in OUTCOMES} for s in SURFACES}
    total = {o: sum(counts[s][o] for s in SURFACES) for o in OUTCOMES}
    lines = ["bad-input matrix (cases run: " + str(sum(total.values())) + ")",
             f"{'surface':<14}" + "".join(f"{o:>9}" for o in OUTCOMES)]
    for surface in (*SURFACES, "total"):
        row = total if surface == "total" else counts[surface]
        lines.append(f"{surface:<14}" + "".join(f"{row[o]:>9}" for o in OUTCOMES))
    not_clear = [f"  {s}-{n}: {r}" for s in SURFACES for n, r in results[s].items() if r != "clear"]
    lines += ["not clear:", *not_clear] if not_clear else []
    # Written to a file, not to the terminal: under pytest-xdist (`make test` runs one per core) a worker has no
    # terminal; conftest.py's pytest_terminal_summary prints the lines in the main process.
    if os.environ.get("IVPT_BAD_INPUT_SUMMARY") and sum(total.values()):
        Path(os.environ["IVPT_BAD_INPUT_SUMMARY"]).write_text(
            json.dumps({"counts": counts, "results": results, "lines": lines}))


@pytest.fixture
def ctx(env, tmp_path):
    (tmp_path / "outputs").mkdir()
    (tmp_path / "cache").mkdir()
    (tmp_path / "work").mkdir()
    return SimpleNamespace(
        env=env, work=tmp_path / "work", out_root=tmp_path / "outputs", out=tmp_path / "outputs" / "run",
        cache=tmp_path / "cache",
    )


def cub_copy(ctx) -> Path:
    return Path(shutil.copytree(ctx.env.cub, ctx.work / "CUB_200_2011"))


def checkpoint_copy(ctx) -> Path:
    return Path(shutil.copytree(ctx.env.checkpoint, ctx.work / "checkpoint"))


_SCRIPTS: dict[str, object] = {}


def script_main(name: str) -> Callable:
    """`main` of a command-line script at the repository root, imported in-process once."""
    if name not in _SCRIPTS:
        spec = importlib.util.spec_from_file_location(f"_bad_input_{name}", REPO / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        _SCRIPTS[name] = module
    module = _SCRIPTS[name]
    if not hasattr(module, "main") and name == "train_ivpt":  # a thin script around the library's workflow
        from ivpt.training import main

        return main
    return module.main


def run_command(*args: str, cwd=REPO) -> None:
    """Runs a command as a user does; a clean failure raises `CommandFailed` with its stderr."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode == 0:
        return
    if "Traceback" in result.stderr:
        raise CommandTraceback(f"exit status {result.returncode}: {result.stderr[-1500:]}")
    raise CommandFailed(f"exit status {result.returncode}: {result.stderr.strip()}")


# ---------------------------------------------------------------------------------------------------------------------
# Data: annotation files, images, sources, exports (load_cub with a fresh cache that must stay empty)
# ---------------------------------------------------------------------------------------------------------------------

DATA_WATCHED = ("cache",)


def _mutated_load(mutate, config="full", **kwargs):
    def run(ctx):
        root = cub_copy(ctx)
        mutate(root)
        load_cub(root, config, cache_dir=ctx.cache, **kwargs)

    return run


def _line_case(name, file, line, text, *culprits, config="full"):
    def mutate(root):
        rewrite_line(root / file, line, text)

    case("data", name, (CubFormatError,), *culprits, watched=DATA_WATCHED)(_mutated_load(mutate, config))


def _bytes_case(name, file, line, *culprits):
    def mutate(root):
        lines = (root / file).read_bytes().splitlines()
        lines[line - 1] = lines[line - 1] + b" \xff\xfe caf\xe9"
        (root / file).write_bytes(b"\n".join(lines) + b"\n")

    case("data", name, (CubFormatError,), *culprits, watched=DATA_WATCHED)(_mutated_load(mutate))


for _file in ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt",
              "parts/part_locs.txt", "parts/parts.txt"):
    _bytes_case(f"non_utf8_{Path(_file).stem}", _file, 2, f"{Path(_file).name}, line 2", "UTF-8")

_line_case("images_one_field", "images.txt", 2, "2", "images.txt, line 2", "expected 2 fields")
_line_case("images_id_not_int", "images.txt", 2, "two 001.A/x.jpg", "images.txt, line 2", "integer")
_line_case("images_duplicate_id", "images.txt", 2, "1 001.A/x.jpg", "images.txt, line 2", "already defined")
_line_case("images_parent_part", "images.txt", 2, "2 ../../../escape.jpg", "images.txt, line 2", "'..'")
_line_case("images_parent_inside", "images.txt", 2, "2 001.A/../../x.jpg", "images.txt, line 2", "'..'")
_line_case("images_absolute", "images.txt", 2, "2 /etc/passwd", "images.txt, line 2", "relative path")
_line_case("images_drive", "images.txt", 2, "2 C:/x.jpg", "images.txt, line 2", "relative path")
_line_case("images_backslash", "images.txt", 2, "2 001.A\\x.jpg", "images.txt, line 2", "backslash")
_line_case("images_empty_part", "images.txt", 2, "2 001.A//x.jpg", "images.txt, line 2", "relative path")
_line_case("classes_id_not_int", "classes.txt", 1, "one 001.A", "classes.txt, line 1", "integer")
_line_case("classes_one_field", "classes.txt", 1, "1", "classes.txt, line 1", "expected 2 fields")
_line_case("classes_duplicate_id", "classes.txt", 2, "1 002.B", "classes.txt, line 2", "already defined")
_line_case("labels_unknown_class", "image_class_labels.txt", 2, "2 99", "image_class_labels.txt, line 2", "99")
_line_case("labels_not_int", "image_class_labels.txt", 2, "2 bird", "image_class_labels.txt, line 2", "integer")
_line_case("labels_unknown_image", "image_class_labels.txt", 2, "77 1", "image_class_labels.txt, line 2", "77")
_line_case("labels_three_fields", "image_class_labels.txt", 2, "2 1 1", "image_class_labels.txt, line 2", "fields")
_line_case("split_is_train_2", "train_test_split.txt", 2, "2 2", "train_test_split.txt, line 2", "0 or 1")
_line_case("split_not_int", "train_test_split.txt", 2, "2 yes", "train_test_split.txt, line 2", "integer")
_line_case("boxes_zero_width", "bounding_boxes.txt", 2, "2 1 1 0 5", "bounding_boxes.txt, line 2", "width")
_line_case("boxes_nan", "bounding_boxes.txt", 2, "2 1 nan 5 5", "bounding_boxes.txt, line 2", "finite")
_line_case("boxes_four_fields", "bounding_boxes.txt", 2, "2 1 1 5", "bounding_boxes.txt, line 2", "5 fields")
_line_case("boxes_text", "bounding_boxes.txt", 2, "2 1 one 5 5", "bounding_boxes.txt, line 2", "number")
_line_case("locs_visible_2", "parts/part_locs.txt", 2, "1 2 3.0 3.0 2", "part_locs.txt, line 2", "0 or 1")
_line_case("locs_unknown_part", "parts/part_locs.txt", 2, "1 99 3.0 3.0 1", "part_locs.txt, line 2", "part id 99")
_line_case("locs_unknown_image", "parts/part_locs.txt", 2, "99 2 3.0 3.0 1", "part_locs.txt, line 2", "image id 99")
_line_case("locs_duplicate", "parts/part_locs.txt", 2, "1 1 3.0 3.0 1", "part_locs.txt, line 2", "already given")
_line_case("locs_inf", "parts/part_locs.txt", 2, "1 2 inf 3.0 1", "part_locs.txt, line 2", "finite")
_line_case("locs_four_fields", "parts/part_locs.txt", 2, "1 2 3.0 1", "part_locs.txt, line 2", "5 fields")
_line_case("box_outside_image_cropped", "bounding_boxes.txt", 1, "1 500 500 10 10", "bounding_boxes.txt",
           "does not overlap", config="cropped")


@case("data", "locs_missing_part_row", (CubFormatError,), "part_locs.txt", "image id 1", watched=DATA_WATCHED)
def _(ctx):
    _mutated_load(lambda root: delete_line(root / "parts" / "part_locs.txt", 1))(ctx)


@case("data", "labels_missing_image", (CubFormatError,), "image_class_labels.txt", "missing", watched=DATA_WATCHED)
def _(ctx):
    _mutated_load(lambda root: delete_line(root / "image_class_labels.txt", 1))(ctx)


def _all_split(value):
    def mutate(root):
        lines = (root / "train_test_split.txt").read_text().split()
        ids = lines[0::2]
        (root / "train_test_split.txt").write_text("".join(f"{i} {value}\n" for i in ids))

    return mutate


case("data", "empty_test_split", (CubFormatError,), "train_test_split.txt", "'test'", watched=DATA_WATCHED)(
    _mutated_load(_all_split(1)))
case("data", "empty_train_split", (CubFormatError,), "train_test_split.txt", "'train'", watched=DATA_WATCHED)(
    _mutated_load(_all_split(0)))
case("data", "empty_train_split_augmented", (CubFormatError,), "train_test_split.txt", "'train'",
     watched=DATA_WATCHED)(_mutated_load(_all_split(0), "cropped_augmented", augmentation_passes=1))
case("data", "missing_parts_txt", (CubFormatError,), "parts.txt", "not found", watched=DATA_WATCHED)(
    _mutated_load(lambda root: (root / "parts" / "parts.txt").unlink()))
case("data", "missing_boxes", (CubFormatError,), "bounding_boxes.txt", "not found", watched=DATA_WATCHED)(
    _mutated_load(lambda root: (root / "bounding_boxes.txt").unlink()))
case("data", "annotation_is_folder", (CubFormatError,), "train_test_split.txt", watched=DATA_WATCHED)(
    _mutated_load(lambda root: ((root / "train_test_split.txt").unlink(), (root / "train_test_split.txt").mkdir())))


def _image_case(name, mutate_image, *culprits, config="full"):
    def mutate(root):
        mutate_image(image_path(root, 2))

    case("data", name, (CubFormatError,), *culprits, watched=DATA_WATCHED)(_mutated_load(mutate, config))


def _make_folder(path: Path):
    path.unlink()
    path.mkdir()


def _make_link_loop(path: Path):
    path.unlink()
    os.symlink(path.name, path)  # a link to itself: unreadable even for root


_image_case("image_missing", lambda p: p.unlink(), "images.txt line 2", "not found")
_image_case("image_is_folder", _make_folder, "images.txt line 2", "cannot read")
_image_case("image_unreadable_link_loop", _make_link_loop, "images.txt line 2", "cannot read")
_image_case("image_truncated", lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
            "images.txt line 2", "cannot decode")
_image_case("image_zero_bytes", lambda p: p.write_bytes(b""), "images.txt line 2", "cannot decode")
_image_case("image_is_text", lambda p: p.write_text("not an image"), "images.txt line 2", "cannot decode")
_image_case("image_is_folder_cropped", _make_folder, "images.txt line 2", "cannot read", config="cropped")


def _mask_of(root: Path, image_id: int) -> Path:
    relative = image_path(root, image_id).relative_to(root / "images")
    return root / "segmentations" / relative.with_suffix(".png")


@case("data", "mask_wrong_size", (CubFormatError,), "segmentations", "size", watched=DATA_WATCHED)
def _(ctx):
    from PIL import Image

    def mutate(root):
        Image.new("L", (5, 5)).save(_mask_of(root, 2))

    _mutated_load(mutate)(ctx)


case("data", "mask_corrupt", (CubFormatError,), "segmentations", "cannot decode", watched=DATA_WATCHED)(
    _mutated_load(lambda root: _mask_of(root, 2).write_bytes(b"garbage")))


@case("data", "data_dir_missing", (FileNotFoundError,), "nowhere", watched=DATA_WATCHED)
def _(ctx):
    load_cub(ctx.work / "nowhere", cache_dir=ctx.cache)


@case("data", "data_dir_empty", (FileNotFoundError,), "empty", "no CUB-200-2011 data", watched=DATA_WATCHED)
def _(ctx):
    (ctx.work / "empty").mkdir()
    load_cub(ctx.work / "empty", cache_dir=ctx.cache)


@case("data", "data_dir_text_file", (FileNotFoundError,), "notes.txt", watched=DATA_WATCHED)
def _(ctx):
    (ctx.work / "notes.txt").write_text("hello")
    load_cub(ctx.work / "notes.txt", cache_dir=ctx.cache)


@case("data", "archive_corrupt", (CubFormatError,), "CUB_200_2011.tgz", "cannot read the archive",
      watched=DATA_WATCHED)
def _(ctx):
    (ctx.work / "CUB_200_2011.tgz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    load_cub(ctx.work / "CUB_200_2011.tgz", cache_dir=ctx.cache, segmentations=False)


@case("data", "archive_without_images_txt", (CubFormatError,), "CUB_200_2011.tgz", "no images.txt",
      watched=DATA_WATCHED)
def _(ctx):
    import tarfile

    (ctx.work / "readme.md").write_text("nothing")
    with tarfile.open(ctx.work / "CUB_200_2011.tgz", "w:gz") as tar:
        tar.add(ctx.work / "readme.md", arcname="CUB_200_2011/readme.md")
    load_cub(ctx.work / "CUB_200_2011.tgz", cache_dir=ctx.cache, segmentations=False)


@case("data", "segmentations_missing", (FileNotFoundError,), "no_masks", "segmentations", watched=DATA_WATCHED)
def _(ctx):
    load_cub(ctx.env.cub, cache_dir=ctx.cache, segmentations=ctx.work / "no_masks")


@case("data", "config_name_unknown", (ValueError,), "'croped'", watched=DATA_WATCHED)
def _(ctx):
    load_cub(ctx.env.cub, "croped", cache_dir=ctx.cache)


@case("data", "augmentation_passes_zero", (ValueError,), "augmentation_passes", watched=DATA_WATCHED)
def _(ctx):
    load_cub(ctx.env.cub, "cropped_augmented", cache_dir=ctx.cache, augmentation_passes=0)


def _dataset_with_names(names):
    features = datasets.Features({"image": datasets.Image(), "file_name": datasets.Value("string")})
    from PIL import Image

    images = [Image.new("RGB", (4, 4)) for _ in names]
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"image": images, "file_name": names},
                                                                    features=features)})


for _name, _bad in (("export_parent_escape", "../../../escaped.jpg"), ("export_absolute", "/tmp/escaped.jpg"),
                    ("export_parent_after_good", "001.A/../../../escaped.jpg")):
    @case("data", _name, (CubFormatError,), repr(_bad), "outside the export folder", watched=("out_root",))
    def _(ctx, _bad=_bad):
        export_image_folders(_dataset_with_names(["001.A/fine.jpg", _bad]), "full", ctx.out)


@case("data", "export_to_a_file", (NotADirectoryError,), "taken", "exists and is not a folder")
def _(ctx):
    (ctx.work / "taken").write_text("keep me")
    export_image_folders(_dataset_with_names(["001.A/fine.jpg"]), "full", ctx.work / "taken")


@case("data", "cub_cli_export_to_a_file", (SystemExit,), "--export", "not a folder", watched=("cache",))
def _(ctx):
    (ctx.work / "file").write_text("x")
    cub_main(["--data_dir", str(ctx.env.cub), "--cache_dir", str(ctx.cache), "--export", str(ctx.work / "file")])


@case("data", "cub_cli_bad_annotation", (SystemExit,), "images.txt, line 2", watched=("cache",))
def _(ctx):
    root = cub_copy(ctx)
    rewrite_line(root / "images.txt", 2, "2 ../x.jpg")
    cub_main(["--data_dir", str(root), "--cache_dir", str(ctx.cache)])


# ---------------------------------------------------------------------------------------------------------------------
# Configs: IvptConfig fields, config.json files
# ---------------------------------------------------------------------------------------------------------------------

LOSS_WEIGHTS = ("classification", "consistency", "presence", "orthogonality", "equivariance", "total_variation",
                "enforced_presence", "entropy")


def _config_case(name, field, value, *extra):
    case("config", name, (ValueError,), f"`{field}`", *extra)(lambda ctx: tiny_config(**{field: value}))


for _weight in LOSS_WEIGHTS:
    _config_case(f"negative_{_weight}_weight", f"{_weight}_loss_weight", -0.5, ">= 0")
_config_case("nan_entropy_weight", "entropy_loss_weight", float("nan"), ">= 0")
_config_case("string_presence_weight", "presence_loss_weight", "1.0", ">= 0")
_config_case("num_labels_zero", "num_labels", 0, "at least 1")
_config_case("num_labels_negative", "num_labels", -3, "at least 1")
_config_case("map_eps_zero", "map_eps", 0.0, "> 0")
_config_case("map_eps_negative", "map_eps", -1e-6, "> 0")
_config_case("routing_tau_zero", "routing_tau", 0.0, "> 0")
_config_case("prototype_init_std_negative", "prototype_init_std", -0.1, ">= 0")
_config_case("max_rotation_negative", "equivariance_max_rotation", -10.0, ">= 0")
_config_case("max_translation_negative", "equivariance_max_translation", -0.1, ">= 0")
_config_case("scale_range_reversed", "equivariance_scale_range", [1.4, 0.8], "low <= high")
_config_case("scale_range_one_value", "equivariance_scale_range", [0.8], "[low, high]")
_config_case("scale_range_negative", "equivariance_scale_range", [-1.0, 1.0], "0 < low")
_config_case("scale_range_text", "equivariance_scale_range", "wide", "[low, high]")
_config_case("n_pro_text", "n_pro", "a,b,c", "comma-separated")
_config_case("n_pro_one_stage", "n_pro", [5], "at least 2 stages")
_config_case("n_pro_one_prototype", "n_pro", [5, 1], "at least 2 prototypes")
_config_case("n_pro_int", "n_pro", 5, "list of ints")
_config_case("n_pro_too_many_stages", "n_pro", "9,8,7,6,5,4", "prompted blocks")
_config_case("image_size_zero", "image_size", 0, "positive int")
_config_case("image_size_not_patch_multiple", "image_size", 60, "multiple of the backbone patch size 8")
_config_case("image_size_grid_too_small", "image_size", 24, "at least 4x4")
_config_case("image_size_text", "image_size", "64", "positive int")
_config_case("stage_index_too_high", "interpretation_stage_index", 3, "index into 3 stages")
_config_case("stage_index_too_low", "interpretation_stage_index", -4, "index into 3 stages")
_config_case("heads_not_dividing", "backbone_kwargs", {**TINY_BACKBONE_KWARGS, "num_heads": 3}, "num_heads (3)")
_config_case("patch_size_zero", "backbone_kwargs", {**TINY_BACKBONE_KWARGS, "patch_size": 0}, "timm rejected")
_config_case("backbone_kwargs_unknown", "backbone_kwargs", {**TINY_BACKBONE_KWARGS, "bogus": 1}, "bogus")
_config_case("backbone_kwargs_text", "backbone_kwargs", "depth=4", "expected a dict")
_config_case("backbone_not_timm", "backbone", "no_such_vit", "no_such_vit")
_config_case("backbone_not_a_vit", "backbone", "resnet18", "VisionTransformer")


@case("config", "unknown_key_typo", (), "'num_lables'", "'num_labels'", warning=UserWarning)
def _(ctx):
    tiny_config(num_lables=3)


@case("config", "unknown_key_in_config_json", (), "'entropy_weight'", warning=UserWarning)
def _(ctx):
    tiny_config().save_pretrained(ctx.work)
    data = json.loads((ctx.work / "config.json").read_text())
    data["entropy_weight"] = 0.0
    (ctx.work / "config.json").write_text(json.dumps(data))
    IvptConfig.from_pretrained(ctx.work)


@case("config", "config_json_negative_weight", (ValueError,), "`presence_loss_weight`")
def _(ctx):
    tiny_config().save_pretrained(ctx.work)
    data = json.loads((ctx.work / "config.json").read_text())
    data["presence_loss_weight"] = -1
    (ctx.work / "config.json").write_text(json.dumps(data))
    IvptConfig.from_pretrained(ctx.work)


@case("config", "config_json_not_json", (OSError,), "config.json")
def _(ctx):
    (ctx.work / "config.json").write_text("{not json")
    IvptConfig.from_pretrained(ctx.work)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def _checkpoint_case(name, mutate, *culprits, errors=(CheckpointError,), cls=IvptForImageClassification):
    @case("checkpoint", name, errors, *culprits)
    def run(ctx):
        path = checkpoint_copy(ctx)
        mutate(path)
        cls.from_pretrained(path)


def _truncate(fraction):
    def mutate(path):
        file = path / "model.safetensors"
        file.write_bytes(file.read_bytes()[: int(file.stat().st_size * fraction)])

    return mutate


def _drop_weights(*prefixes):
    def mutate(path):
        weights = load_file(path / "model.safetensors")
        kept = {k: v for k, v in weights.items() if not k.startswith(prefixes)}
        save_file(kept, path / "model.safetensors", metadata={"format": "pt"})

    return mutate


def _edit_config(**changes):
    def mutate(path):
        data = json.loads((path / "config.json").read_text())
        data.update(changes)
        (path / "config.json").write_text(json.dumps(data))

    return mutate


_checkpoint_case("safetensors_zero_bytes", _truncate(0), "model.safetensors", "corrupt or truncated")
_checkpoint_case("safetensors_header_only", _truncate(0.001), "model.safetensors", "corrupt or truncated")
_checkpoint_case("safetensors_half", _truncate(0.5), "model.safetensors", "corrupt or truncated")
_checkpoint_case("safetensors_last_bytes_cut", _truncate(0.9999), "model.safetensors", "corrupt or truncated")
_checkpoint_case("safetensors_garbage", lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 4096),
                 "model.safetensors", "corrupt or truncated")
_checkpoint_case("safetensors_is_text", lambda p: (p / "model.safetensors").write_text("version https://git-lfs"),
                 "model.safetensors", "corrupt or truncated")
_checkpoint_case("missing_classifier", _drop_weights("classifier."), "classifier.weight", "lacks")
_checkpoint_case("missing_prototypes", _drop_weights("ivpt.stages.0.prototypes"), "prototypes", "lacks")
_checkpoint_case("missing_backbone", _drop_weights("ivpt.backbone."), "ivpt.backbone", "lacks")
_checkpoint_case("no_weights_file", lambda p: (p / "model.safetensors").unlink(), "model.safetensors",
                 errors=(OSError,))
_checkpoint_case("no_config_json", lambda p: (p / "config.json").unlink(), "no config.json")
_checkpoint_case("config_json_not_json", lambda p: (p / "config.json").write_text("{oops"), "config.json",
                 errors=(OSError,))
_checkpoint_case("config_json_a_list", lambda p: (p / "config.json").write_text("[1, 2]"), "config.json")
_checkpoint_case("other_model_type", _edit_config(model_type="bert"), "'bert'", "config.json")
_checkpoint_case("config_json_bad_field", _edit_config(map_eps=-1.0), "`map_eps`", errors=(ValueError,))
_checkpoint_case("weights_of_another_shape", _edit_config(n_pro=[7, 5, 4]), "config.json", "shapes differ")
_checkpoint_case("weights_of_other_width", _edit_config(backbone_kwargs={**TINY_BACKBONE_KWARGS, "embed_dim": 64}),
                 "config.json", "shapes differ")


@case("checkpoint", "path_missing_absolute", (CheckpointError,), "no such directory", "nowhere")
def _(ctx):
    IvptForImageClassification.from_pretrained(str(ctx.work / "runs" / "nowhere"))


@case("checkpoint", "path_missing_relative", (CheckpointError,), "no such directory", "./runs/nowhere")
def _(ctx):
    IvptForImageClassification.from_pretrained("./runs/nowhere")


@case("checkpoint", "path_missing_hub_like", (CheckpointError,), "no such directory", "'runs/nowhere'")
def _(ctx):
    IvptForImageClassification.from_pretrained("runs/nowhere")


@case("checkpoint", "path_is_a_file", (CheckpointError,), "is a file", "model.safetensors")
def _(ctx):
    IvptForImageClassification.from_pretrained(str(ctx.env.checkpoint / "model.safetensors"))


@case("checkpoint", "base_model_missing_weights", (CheckpointError,), "lacks", "IvptModel")
def _(ctx):
    path = checkpoint_copy(ctx)
    _drop_weights("ivpt.modulation")(path)
    IvptModel.from_pretrained(path)


@case("checkpoint", "backbone_weights_missing", (FileNotFoundError,), "backbone_weights", "nothing.safetensors")
def _(ctx):
    IvptForImageClassification.from_backbone(
        "vit_small_patch16_224", backbone_weights=str(ctx.work / "nothing.safetensors"), num_labels=3)


@case("checkpoint", "backbone_weights_corrupt", (CheckpointError,), "backbone_weights", "broken.safetensors")
def _(ctx):
    (ctx.work / "broken.safetensors").write_bytes(b"\x00" * 64)
    IvptForImageClassification.from_backbone(
        "vit_tiny_patch16_224", backbone_weights=str(ctx.work / "broken.safetensors"), num_labels=3, image_size=64,
        n_pro="6,5,4")


# ---------------------------------------------------------------------------------------------------------------------
# Model forward
# ---------------------------------------------------------------------------------------------------------------------

EXPECTED_SHAPE = "(batch_size, 3, 64, 64)"


def _forward_case(name, make_inputs, *culprits, errors=(ValueError,), training=False, warning=None, base=False):
    @case("forward", name, errors, *culprits, warning=warning)
    def run(ctx):
        model = ctx.env.model.ivpt if base else ctx.env.model
        model.train(training)
        try:
            with torch.set_grad_enabled(training):
                model(**make_inputs())
        finally:
            model.eval()


def _pixels(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _nan_pixels(value=float("nan")):
    pixels = _pixels(2, 3, 64, 64)
    pixels[1, 0, 5, 5] = value
    return pixels


_forward_case("size_too_small", lambda: {"pixel_values": _pixels(2, 3, 32, 32)}, EXPECTED_SHAPE, "(2, 3, 32, 32)")
_forward_case("size_too_large", lambda: {"pixel_values": _pixels(2, 3, 96, 96)}, EXPECTED_SHAPE)
_forward_case("size_not_square", lambda: {"pixel_values": _pixels(2, 3, 64, 48)}, EXPECTED_SHAPE)
_forward_case("one_channel", lambda: {"pixel_values": _pixels(2, 1, 64, 64)}, EXPECTED_SHAPE)
_forward_case("four_channels", lambda: {"pixel_values": _pixels(2, 4, 64, 64)}, EXPECTED_SHAPE)
_forward_case("channels_last_layout", lambda: {"pixel_values": _pixels(2, 64, 64, 3)}, EXPECTED_SHAPE)
_forward_case("three_dimensional", lambda: {"pixel_values": _pixels(3, 64, 64)}, EXPECTED_SHAPE, "batch dimension")
_forward_case("five_dimensional", lambda: {"pixel_values": _pixels(1, 2, 3, 64, 64)}, EXPECTED_SHAPE)
_forward_case("two_dimensional", lambda: {"pixel_values": _pixels(64, 64)}, EXPECTED_SHAPE)
_forward_case("empty_batch", lambda: {"pixel_values": _pixels(0, 3, 64, 64)}, EXPECTED_SHAPE)
_forward_case("uint8", lambda: {"pixel_values": torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)},
              "pixel_values", "torch.uint8")
_forward_case("float64", lambda: {"pixel_values": _pixels(2, 3, 64, 64, dtype=torch.float64)},
              "pixel_values", "torch.float64")
_forward_case("int64", lambda: {"pixel_values": _pixels(2, 3, 64, 64, dtype=torch.int64)}, "pixel_values", "int64")
_forward_case("bool", lambda: {"pixel_values": _pixels(2, 3, 64, 64) > 0}, "pixel_values", "torch.bool")
_forward_case("float16_without_autocast", lambda: {"pixel_values": _pixels(2, 3, 64, 64, dtype=torch.float16)},
              "pixel_values", "torch.float16", "autocast")
_forward_case("numpy_array", lambda: {"pixel_values": _pixels(2, 3, 64, 64).numpy()}, "pixel_values", "ndarray")
_forward_case("nested_list", lambda: {"pixel_values": _pixels(1, 3, 64, 64).tolist()}, "pixel_values", "list")
_forward_case("base_model_wrong_size", lambda: {"pixel_values": _pixels(2, 3, 56, 56)}, EXPECTED_SHAPE, base=True)
_forward_case("label_too_high", lambda: {"pixel_values": _pixels(2, 3, 64, 64), "labels": torch.tensor([0, 3])},
              "labels", "[0, 3)", "[3]")
_forward_case("label_negative", lambda: {"pixel_values": _pixels(2, 3, 64, 64), "labels": torch.tensor([-1, 0])},
              "labels", "[0, 3)", "[-1]")
_forward_case("label_too_high_training",
              lambda: {"pixel_values": _pixels(2, 3, 64, 64), "labels": torch.tensor([0, 200])},
              "labels", "[0, 3)", training=True)
_forward_case("labels_other_batch", lambda: {"pixel_values": _pixels(2, 3, 64, 64), "labels": torch.tensor([0, 1, 2])},
              "labels", "(2,)", "(3,)")
_forward_case("labels_column", lambda: {"pixel_values": _pixels(2, 3, 64, 64), "labels": torch.tensor([[0], [1]])},
              "labels", "(2,)", "(2, 1)")
_forward_case("labels_one_hot", lambda: {"pixel_values": _pixels(2, 3, 64, 64), "labels": torch.eye(3)[:2]},
              "labels", "(2,)", "(2, 3)")
_forward_case("labels_float", lambda: {"pixel_values": _pixels(2, 3, 64, 64), "labels": torch.tensor([0.0, 1.0])},
              "labels", "integer", "float32")
_forward_case("labels_bool", lambda: {"pixel_values": _pixels(2, 3, 64, 64), "labels": torch.tensor([True, False])},
              "labels", "integer", "torch.bool")
_forward_case("labels_list", lambda: {"pixel_values": _pixels(2, 3, 64, 64), "labels": [0, 1]}, "labels", "list")
_forward_case("labels_scalar", lambda: {"pixel_values": _pixels(1, 3, 64, 64), "labels": torch.tensor(1)},
              "labels", "(1,)", "()")
_forward_case("nan_in_training", lambda: {"pixel_values": _nan_pixels(), "labels": torch.tensor([0, 1])},
              "pixel_values", "NaN", training=True)
_forward_case("inf_in_training", lambda: {"pixel_values": _nan_pixels(float("inf")), "labels": torch.tensor([0, 1])},
              "pixel_values", "infinite", training=True)
_forward_case("nan_in_eval", lambda: {"pixel_values": _nan_pixels()}, "pixel_values", "NaN", errors=(),
              warning=RuntimeWarning)
_forward_case("inf_in_eval_with_labels", lambda: {"pixel_values": _nan_pixels(-float("inf")),
                                                  "labels": torch.tensor([0, 1])},
              "pixel_values", "infinite", errors=(), warning=RuntimeWarning)


# ---------------------------------------------------------------------------------------------------------------------
# Training CLI (in-process `main(argv)`; a few as a subprocess). Nothing may appear in the output folder.
# ---------------------------------------------------------------------------------------------------------------------

TRAIN_TINY = [
    "--backbone_kwargs", json.dumps(TINY_BACKBONE_KWARGS), "--image_size", "64", "--n_pro", "6,5,4",
    "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no",
    "--num_train_epochs", "1", "--per_device_train_batch_size", "2", "--augmentation", "none",
]
TRAIN_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, OSError, SystemExit)


def _train_argv(ctx, *flags, data=True):
    argv = [*TRAIN_TINY, "--output_dir", str(ctx.out)]
    if not {"--backbone_weights", "--model_name_or_path"} & set(flags):
        argv += ["--random_backbone", "true"]  # offline: no pretrained backbone weights to load
    if data:
        argv += ["--data_dir", str(ctx.env.cub), "--dataset_cache_dir", str(ctx.env.cub_cache)]
    return argv + list(flags)


def _train_case(name, flags, *culprits, xfail=None, data=True, watched=("out_root",), recipe=None):
    @case("train_cli", name, TRAIN_ERRORS, *culprits, watched=watched, xfail=xfail)
    def run(ctx):
        argv = _train_argv(ctx, *flags(ctx) if callable(flags) else flags, data=data)
        if recipe is not None:
            path = ctx.work / recipe[0]
            path.write_text(recipe[1])
            argv = [str(path), *argv]
        script_main("train_ivpt")(argv)


_train_case("unknown_flag", ["--learning_rat", "1e-3"], "--learning_rat")
_train_case("flag_value_not_a_number", ["--learning_rate", "fast"], "--learning_rate", "fast")
_train_case("batch_size_zero", ["--per_device_train_batch_size", "0"], "per_device_train_batch_size")
_train_case("batch_size_negative", ["--per_device_train_batch_size", "-2"], "per_device_train_batch_size")
_train_case("eval_batch_size_zero", ["--per_device_eval_batch_size", "0"], "per_device_eval_batch_size")
_train_case("data_dir_missing", ["--data_dir", "/nonexistent/cub"], "--data_dir", "/nonexistent/cub", data=False)
_train_case("no_data_source", [], "--data_dir", "--dataset_name", data=False)
_train_case("both_data_sources", lambda c: ["--data_dir", str(c.env.cub), "--dataset_name", str(c.env.cub)],
            "--data_dir", "--dataset_name", data=False)
_train_case("backbone_kwargs_not_json", ["--backbone_kwargs", "{depth: 4"], "--backbone_kwargs")
_train_case("backbone_kwargs_a_list", ["--backbone_kwargs", "[4, 32]"], "--backbone_kwargs")
_train_case("backbone_weights_missing", ["--backbone_weights", "/nonexistent/w.safetensors"], "--backbone_weights")
_train_case("both_weight_sources", lambda c: ["--backbone_weights", str(c.env.checkpoint / "model.safetensors"),
                                              "--model_name_or_path", str(c.env.checkpoint)],
            "--backbone_weights", "--model_name_or_path")
_train_case("eval_without_named_split", ["--eval_strategy", "epoch"], "--eval_split")
_train_case("eval_split_unknown", ["--eval_split", "dev"], "--eval_split", "'dev'")
_train_case("train_split_unknown", ["--train_split", "training"], "--train_split", "'training'")
_train_case("label_column_unknown", ["--label_column", "species"], "species")
_train_case("num_labels_too_small", ["--num_labels", "2"], "num_labels")
_train_case("validation_fraction_above_one", ["--validation_fraction", "1.5"], "--validation_fraction")
_train_case("n_pro_text", ["--n_pro", "six,five"], "n_pro")
_train_case("image_size_not_patch_multiple", ["--image_size", "60"], "image_size")
_train_case("negative_loss_weight", ["--entropy_loss_weight", "-1"], "entropy_loss_weight")
_train_case("remove_unused_columns", ["--remove_unused_columns", "true"], "--remove_unused_columns")
_train_case("resume_missing_checkpoint", ["--resume_from_checkpoint", "/nonexistent/checkpoint-9"],
            "--resume_from_checkpoint")
_train_case("resume_latest_without_checkpoint", ["--resume_from_checkpoint", "latest"], "--resume_from_checkpoint")
_train_case("model_name_or_path_missing", ["--model_name_or_path", "/nonexistent/model"], "/nonexistent/model",
            "no such directory")
_train_case("cub_config_unknown", ["--cub_config", "crop"], "'crop'")
_train_case("augmentation_unknown", ["--augmentation", "heavy"], "augmentation", "heavy")
_train_case("unknown_recipe_key", [], "recipe.yaml", "learning_rat", recipe=("recipe.yaml", "learning_rat: 0.1\n"))
_train_case("recipe_invalid_yaml", [], "recipe.yaml", "invalid YAML", recipe=("recipe.yaml", "a: [1, 2\n"))
_train_case("recipe_not_a_mapping", [], "recipe.yaml", "mapping", recipe=("recipe.yaml", "- 1\n- 2\n"))
_train_case("recipe_invalid_json", [], "recipe.json", "invalid JSON", recipe=("recipe.json", "{\"a\": }"))
_train_case("recipe_list_for_scalar", [], "learning_rate", recipe=("recipe.yaml", "learning_rate: [0.1, 0.2]\n"))


@case("train_cli", "recipe_file_missing", TRAIN_ERRORS, "missing.yaml", watched=("out_root",))
def _(ctx):
    script_main("train_ivpt")([str(ctx.work / "missing.yaml"), *_train_argv(ctx)])




def _output_dir_is_a_file(ctx):
    ctx.out.write_text("a file where the results should go")


@case("train_cli", "output_dir_is_a_file", TRAIN_ERRORS, "--output_dir", watched=("out_root",),
      setup=_output_dir_is_a_file)
def _(ctx):
    script_main("train_ivpt")(_train_argv(ctx))


@case("train_cli", "bad_cub_annotation", TRAIN_ERRORS, "images.txt, line 2", watched=("out_root", "cache"))
def _(ctx):
    root = cub_copy(ctx)
    rewrite_line(root / "images.txt", 2, "2 ../../x.jpg")
    script_main("train_ivpt")([*TRAIN_TINY, "--random_backbone", "true", "--output_dir", str(ctx.out),
                               "--data_dir", str(root), "--dataset_cache_dir", str(ctx.cache)])


@case("train_cli", "corrupt_model_checkpoint", TRAIN_ERRORS, "model.safetensors", watched=("out_root",))
def _(ctx):
    path = checkpoint_copy(ctx)
    _truncate(0.5)(path)
    script_main("train_ivpt")(_train_argv(ctx, "--model_name_or_path", str(path)))


@case("train_cli", "subprocess_batch_size_zero", (CommandFailed,), "per_device_train_batch_size",
      watched=("out_root",))
def _(ctx):
    run_command("train_ivpt.py", *_train_argv(ctx, "--per_device_train_batch_size", "0"))


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation CLI (in-process `main(argv)`; a few as a subprocess)
# ---------------------------------------------------------------------------------------------------------------------

EVAL_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, OSError, SystemExit)


def _eval_argv(ctx, *flags, model=None):
    return ["--model_name_or_path", str(model or ctx.env.checkpoint), "--data_dir", str(ctx.env.cub),
            "--output_dir", str(ctx.out), "--cache_dir", str(ctx.env.cub_cache), "--device", "cpu",
            "--metrics", "accuracy", "--figures", "none", *flags]


def _eval_case(name, flags, *culprits, xfail=None, watched=("out_root",)):
    @case("evaluate_cli", name, EVAL_ERRORS, *culprits, watched=watched, xfail=xfail)
    def run(ctx):
        script_main("evaluate_interpretability")(_eval_argv(ctx, *flags(ctx) if callable(flags) else flags))


_eval_case("batch_size_zero", ["--batch_size", "0"], "--batch_size")
_eval_case("batch_size_negative", ["--batch_size", "-4"], "--batch_size")
_eval_case("max_images_zero", ["--max_images", "0"], "--max_images")
_eval_case("max_images_negative", ["--max_images", "-1"], "--max_images")
_eval_case("stage_index_too_high", ["--stage_index", "5"], "--stage_index")
_eval_case("stage_index_too_low", ["--stage_index", "-9"], "--stage_index")
_eval_case("metrics_unknown", ["--metrics", "accuracy,bogus"], "--metrics", "bogus")
_eval_case("metrics_empty", ["--metrics", ","], "--metrics")
_eval_case("routing_noise_unknown", ["--routing_noise", "maybe"], "--routing_noise", "maybe")
_eval_case("batch_size_not_int", ["--batch_size", "eight"], "--batch_size", "eight")
_eval_case("data_dir_missing", ["--data_dir", "/nonexistent/cub"], "--data_dir", "/nonexistent/cub")
_eval_case("model_missing", ["--model_name_or_path", "/nonexistent/model"], "/nonexistent/model",
           "no such directory")
_eval_case("device_unknown", ["--device", "tpu9"], "--device", "tpu9")
_eval_case("device_absent", ["--device", "cuda:7"], "--device", "cuda:7")
_eval_case("half_size_negative", ["--half_size", "-1", "--metrics", "consistency"], "--half_size", "-1")
_eval_case("mask_threshold_above_one", ["--mask_threshold", "1.5", "--metrics", "fg_iou"], "--mask_threshold")


@case("evaluate_cli", "data_dir_empty", EVAL_ERRORS, "no CUB-200-2011 data", watched=("out_root",))
def _(ctx):
    script_main("evaluate_interpretability")(_eval_argv(ctx, "--data_dir", str(ctx.work)))


@case("evaluate_cli", "output_dir_is_a_file", EVAL_ERRORS, "--output_dir", watched=("out_root",),
      setup=_output_dir_is_a_file)
def _(ctx):
    script_main("evaluate_interpretability")(_eval_argv(ctx))


@case("evaluate_cli", "classes_differ_from_data", EVAL_ERRORS, "classes", watched=("out_root",))
def _(ctx):
    torch.manual_seed(0)
    IvptForImageClassification(tiny_config(num_labels=NUM_CLASSES + 4)).save_pretrained(ctx.work / "other")
    make_image_processor(64).save_pretrained(ctx.work / "other")
    script_main("evaluate_interpretability")(_eval_argv(ctx, model=ctx.work / "other"))


@case("evaluate_cli", "corrupt_model_checkpoint", EVAL_ERRORS, "model.safetensors", watched=("out_root",))
def _(ctx):
    path = checkpoint_copy(ctx)
    _truncate(0.5)(path)
    script_main("evaluate_interpretability")(_eval_argv(ctx, model=path))


@case("evaluate_cli", "model_of_another_type", EVAL_ERRORS, "model_type", watched=("out_root",))
def _(ctx):
    path = checkpoint_copy(ctx)
    _edit_config(model_type="vit")(path)
    script_main("evaluate_interpretability")(_eval_argv(ctx, model=path))


@case("evaluate_cli", "bad_cub_annotation", EVAL_ERRORS, "images.txt, line 2", watched=("out_root", "cache"))
def _(ctx):
    root = cub_copy(ctx)
    rewrite_line(root / "images.txt", 2, "2 /etc/passwd")
    argv = _eval_argv(ctx, "--data_dir", str(root), "--cache_dir", str(ctx.cache))
    script_main("evaluate_interpretability")(argv)


@case("evaluate_cli", "subprocess_metrics_unknown", (CommandFailed,), "--metrics", watched=("out_root",))
def _(ctx):
    run_command("evaluate_interpretability.py", *_eval_argv(ctx, "--metrics", "bogus"))




# ---------------------------------------------------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------------------------------------------------


def _param(c: Case):
    marks = [pytest.mark.xfail(strict=False, reason=c.xfail)] if c.xfail else []
    return pytest.param(c, id=f"{c.surface}-{c.name}", marks=marks)


@pytest.mark.parametrize("bad", [_param(c) for c in CASES])
def test_bad_input(bad: Case, ctx, summary):
    outcome, detail = classify(bad, ctx)
    summary[bad.surface][bad.name] = outcome
    assert outcome == "clear", detail


def test_matrix_covers_every_surface():
    names = [(c.surface, c.name) for c in CASES]
    assert len(names) == len(set(names)), "case names must be unique per surface"
    assert len(CASES) >= 150
    for surface in SURFACES:
        assert sum(c.surface == surface for c in CASES) >= 10, surface


# ---------------------------------------------------------------------------------------------------------------------
# Cache keys: an edit that keeps size and mtime is never served stale
# ---------------------------------------------------------------------------------------------------------------------


def test_label_edit_keeping_size_and_mtime_is_not_served_stale(env, tmp_path):
    root = Path(shutil.copytree(env.cub, tmp_path / "CUB_200_2011"))
    cache = tmp_path / "cache"
    before = load_cub(root, cache_dir=cache)["train"]
    first_id, first_label = before[0]["image_id"], before[0]["label"]
    labels = root / "image_class_labels.txt"
    stat = labels.stat()
    lines = labels.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if int(line.split()[0]) == first_id)
    new_label = (first_label + 1) % NUM_CLASSES  # a one-digit class id: same file size
    lines[index] = f"{first_id} {new_label + 1}"
    labels.write_text("\n".join(lines) + "\n")
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # what `cp -p` / `rsync -a` / tar would keep
    assert labels.stat().st_size == stat.st_size and labels.stat().st_mtime_ns == stat.st_mtime_ns
    after = load_cub(root, cache_dir=cache)["train"]
    assert after[0]["image_id"] == first_id and after[0]["label"] == new_label


def test_failed_build_leaves_the_cache_as_it_was(env, tmp_path):
    cache = Path(shutil.copytree(env.cub_cache, tmp_path / "cache"))
    before = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*"))
    root = Path(shutil.copytree(env.cub, tmp_path / "CUB_200_2011"))
    image_path(root, 1).write_bytes(b"")
    with pytest.raises(CubFormatError, match="images.txt line 1"):
        load_cub(root, cache_dir=cache)
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*")) == before


def test_finite_check_has_no_false_positive_when_the_sum_overflows(env):
    from ivpt.modeling_ivpt import check_pixel_values

    huge = torch.full((2, 3, 64, 64), 3e38)  # finite, but the float32 sum overflows to inf
    assert not torch.isfinite(huge.sum(dtype=torch.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_pixel_values(huge, env.model.config, 3, torch.float32, training=True)
        check_pixel_values(torch.randn(2, 3, 64, 64), env.model.config, 3, torch.float32, training=False)
    huge[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        check_pixel_values(huge, env.model.config, 3, torch.float32, training=True)
