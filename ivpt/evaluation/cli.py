r"""Evaluate an IVPT checkpoint on a part-annotated dataset and write a report (`ivpt-evaluate`, the same command
as `python evaluate_interpretability.py` in a checkout).

    ivpt-evaluate --model_name_or_path DIR_OR_HUB_ID --data_dir CUB_DIR \
        --metrics all --output_dir OUT [--batch_size 8 --device cpu --seed 0 --max_images N --figures all]
    ivpt-evaluate --model_name_or_path DIR --dataset_name NAME_OR_FOLDER --output_dir OUT

`--data_dir` reads CUB-200-2011 (folder or archive). `--dataset_name` reads anything `ivpt.data.load_any_dataset`
accepts: a Hub id, a Hub-style parquet folder, a `save_to_disk` folder, an imagefolder, or an official NABirds /
Flowers-102 / PartImageNet / CUB layout. Metrics whose columns the dataset lacks are skipped (listed in the report).

Writes OUT/metrics.json (numbers, skipped metrics, protocol constants, model and data fingerprints), OUT/report.md
and OUT/figures/ (`--figures`: consistency figures, the hierarchical prototype gallery, both or none). Runs in one
process or under `accelerate launch` (each image evaluated once, on CPU as on GPU; results gathered on the main
process). Bad arguments stop with a one-line error before any work; `main(argv)` raises `EvaluationError` instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import REGISTRY, EvaluationError, EvaluationSettings, check_device, parse_metrics

FIGURES = ("all", "consistency", "hierarchy", "none")


class _Parser(argparse.ArgumentParser):
    """Raises `EvaluationError` instead of printing usage and exiting, so that `main` can be called in-process."""

    def error(self, message):
        raise EvaluationError(message)


def build_parser() -> argparse.ArgumentParser:
    defaults = EvaluationSettings()
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="checkpoint folder or Hub id")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_dir", help="CUB_200_2011 folder or CUB_200_2011.tgz")
    source.add_argument("--dataset_name", help="Hub id or local folder (parquet, save_to_disk, imagefolder, "
                                               "official NABirds / Flowers-102 / PartImageNet / CUB layout)")
    parser.add_argument("--dataset_config_name", default=None, help="config of --dataset_name")
    parser.add_argument("--test_split", default="test", help="evaluated split of --dataset_name")
    parser.add_argument("--train_split", default="train", help="split the keypoint regression is fitted on")
    parser.add_argument("--image_column", default="image", help="image column of --dataset_name")
    parser.add_argument("--label_column", default="label", help="label column of --dataset_name")
    parser.add_argument("--metrics", default="all", help="'all' or a comma list of: " + "; ".join(
        f"{name} ({metric.description}, needs {', '.join(metric.columns)})" for name, metric in REGISTRY.items()))
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
    parser.add_argument("--device", default=None, help="default: this process's accelerator device, else cpu")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the stability noise")
    parser.add_argument("--max_images", type=int, default=None, help="evaluate the first N images of each split")
    parser.add_argument("--stage_index", type=int, default=None, help="evaluated stage (default: the config's)")
    parser.add_argument("--half_size", type=int, default=defaults.half_size)
    parser.add_argument("--mask_threshold", type=float, default=defaults.mask_threshold)
    parser.add_argument("--normalise_parts_input", action="store_true",
                        help="ImageNet-normalise the NMI/ARI/KPR/FG-IoU inputs (the published protocol does not)")
    parser.add_argument("--routing_noise", choices=("config", "on", "off"), default="config",
                        help="Gumbel routing noise for the accuracy (the release's test script: on)")
    parser.add_argument("--cache_dir", default=None, help="datasets cache")
    parser.add_argument("--figures", choices=FIGURES, default="all",
                        help="figures to draw: consistency figures, the hierarchical prototype gallery, both, none")
    parser.add_argument("--num_figure_images", type=int, default=4,
                        help="test images drawn in the hierarchy gallery (the first N of the evaluated split)")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="load a checkpoint that is not an IVPT model through its own code (off: only IVPT "
                             "checkpoints, loaded with this project's classes)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses and checks every argument that can be checked without loading anything."""
    args = build_parser().parse_args(argv)
    args.metrics = parse_metrics(args.metrics)
    settings(args).check()
    if args.device is not None:
        check_device(args.device)
    if args.num_figure_images < 1:
        raise EvaluationError(f"--num_figure_images: expected >= 1, got {args.num_figure_images}")
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise EvaluationError(f"--output_dir: {args.output_dir} exists and is not a directory")
    if args.data_dir is not None and not Path(args.data_dir).exists():
        raise EvaluationError(f"--data_dir: {args.data_dir} does not exist")
    return args


def settings(args: argparse.Namespace) -> EvaluationSettings:
    return EvaluationSettings(
        stage_index=args.stage_index, batch_size=args.batch_size, seed=args.seed, max_images=args.max_images,
        half_size=args.half_size, mask_threshold=args.mask_threshold,
        normalise_parts_input=args.normalise_parts_input,
        sample_routing_noise={"config": None, "on": True, "off": False}[args.routing_noise],
    )


def load_config(name_or_path: str, trust_remote_code: bool = False, stage_index: Optional[int] = None):
    """The config of `name_or_path`, checked before any weights are loaded: an IVPT checkpoint (other model types
    only with `trust_remote_code`) in which `stage_index` exists."""
    from transformers import AutoConfig, PretrainedConfig

    from ivpt import IvptConfig
    from ivpt.modeling_ivpt import _looks_like_local_path

    if not Path(name_or_path).exists() and _looks_like_local_path(name_or_path):
        raise EvaluationError(f"--model_name_or_path: cannot read a model config from {name_or_path!r}: "
                              "no such directory")
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(name_or_path)
    except (OSError, ValueError) as error:
        raise EvaluationError(f"--model_name_or_path: cannot read a model config from {name_or_path!r} ({error})") \
            from error
    model_type = config_dict.get("model_type")
    if model_type != IvptConfig.model_type:
        if not trust_remote_code:
            raise EvaluationError(f"--model_name_or_path: {name_or_path!r} is a {model_type!r} model, not an IVPT "
                                  "checkpoint; pass --trust_remote_code to load it through its own code (its "
                                  f"config.json has model_type {model_type!r}, not {IvptConfig.model_type!r})")
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=True)
    config = IvptConfig.from_pretrained(name_or_path)
    EvaluationSettings(stage_index=stage_index).check(len(config.n_pro))
    return config


def load_model(name_or_path: str, config, trust_remote_code: bool = False):
    """IVPT checkpoints load with the project's class; other model types (only with `trust_remote_code`) through
    their own code."""
    from transformers import AutoModelForImageClassification

    from ivpt import IvptConfig, IvptForImageClassification

    if isinstance(config, IvptConfig):
        return IvptForImageClassification.from_pretrained(name_or_path, config=config)
    return AutoModelForImageClassification.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def load_data(args: argparse.Namespace, box_crops: bool):
    """`EvaluationData` for `--data_dir` (CUB) or `--dataset_name`, plus the data fingerprint. A source that cannot be
    found or read raises `EvaluationError` naming the argument; malformed official files raise the builders' errors
    naming the file and line."""
    from ivpt.data.loading import DatasetSourceError
    from ivpt.evaluation import SchemaError

    flag = "--data_dir" if args.data_dir is not None else "--dataset_name"
    try:
        return _load_data(args, box_crops)
    except (FileNotFoundError, DatasetSourceError, SchemaError) as error:
        raise EvaluationError(f"{flag}: {error}") from error


def _load_data(args: argparse.Namespace, box_crops: bool):
    from ivpt.data.cub import resolve_sources, source_fingerprint
    from ivpt.data.loading import dataset_source_kind, load_any_dataset
    from ivpt.evaluation import from_cub, from_dataset_dict

    if args.data_dir is not None:
        return (from_cub(args.data_dir, args.cache_dir, box_crops=box_crops),
                source_fingerprint(resolve_sources(args.data_dir)))
    if dataset_source_kind(args.dataset_name) == "cub":
        return (from_cub(args.dataset_name, args.cache_dir, box_crops=box_crops),
                source_fingerprint(resolve_sources(args.dataset_name)))
    splits = load_any_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)
    data = from_dataset_dict(splits, args.test_split, args.train_split, name=str(args.dataset_name),
                             image_column=args.image_column, label_column=args.label_column)
    return data, data.test._fingerprint


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Runs the evaluation; returns the result dict. Bad input raises `EvaluationError` (or the data loaders'
    `DatasetSourceError` / `SchemaError` / `CubFormatError`) before any evaluation work."""
    args = parse_args(argv)
    from accelerate import PartialState

    from ivpt.evaluation import (
        check_labels,
        evaluate_dataset,
        evaluation_device,
        report_rows,
        save_consistency_examples,
    )
    from ivpt.report import markdown_table, parts_input_note, write_atomic

    device = evaluation_device(args.device)  # CPU launches shard too (a gloo group; see evaluation_device)
    state = PartialState()
    config = load_config(args.model_name_or_path, args.trust_remote_code, args.stage_index)
    want_consistency_figures = args.figures in ("all", "consistency")
    data, data_fingerprint = load_data(args, box_crops=want_consistency_figures
                                       or bool({"consistency", "stability"} & set(args.metrics)))
    check_labels(config, data)
    model = load_model(args.model_name_or_path, config, args.trust_remote_code)
    result = evaluate_dataset(model, data, args.metrics, settings(args), device=device,
                              keep_examples=want_consistency_figures and "keypoints" in data.columns
                              and "bbox" in data.columns)
    examples = result.pop("examples", None)
    result["model"] = str(args.model_name_or_path)
    result["data_fingerprint"] = data_fingerprint
    figures = []
    if args.figures in ("all", "hierarchy"):
        from ivpt.visualization import save_hierarchy_gallery

        if state.is_main_process:
            figures += save_hierarchy_gallery(model, data.test, Path(args.output_dir) / "figures" / "hierarchy",
                                              num_images=args.num_figure_images, device=device)
    if state.is_main_process:
        out = Path(args.output_dir)
        write_atomic(out / "metrics.json", json.dumps(result, indent=2, default=str))
        skipped = "".join(f"- `{name}` skipped: {reason}.\n" for name, reason in result["skipped"].items())
        table = markdown_table({"this model": result["metrics"]}, published=data.published or {},
                               rows=report_rows(args.metrics))
        notes = [parts_input_note(result["metrics"]["parts_input"])] if "parts_input" in result["metrics"] else []
        write_atomic(out / "report.md", f"# IVPT evaluation of {args.model_name_or_path}\n\nData: {data.name}.\n\n"
                     + table + "\n" + "".join(f"\n{n}\n" for n in notes) + (f"\n{skipped}" if skipped else ""))
        if examples:
            save_consistency_examples(model, examples, out / "figures", settings(args).canvas)
        print(json.dumps(result["metrics"], indent=2))
        for name, reason in result["skipped"].items():
            print(f"skipped {name}: {reason}")
        print(f"wrote {out / 'metrics.json'} and {out / 'report.md'}")
    return result


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: bad input prints one line `evaluate_interpretability.py: error: ...` and returns 2.
    (The prefix is the checkout script's name for both commands, as the tests and docs quote it.)"""
    from ivpt.data.cub import CubFormatError
    from ivpt.data.loading import DatasetSourceError
    from ivpt.data.official import LayoutFormatError
    from ivpt.evaluation import SchemaError

    try:
        main(argv)
    except (EvaluationError, SchemaError, DatasetSourceError, CubFormatError, LayoutFormatError,
            FileNotFoundError) as error:
        print(f"evaluate_interpretability.py: error: {error}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


def console_entry() -> None:
    """`ivpt-evaluate` (setup.cfg console script)."""
    sys.exit(cli())


if __name__ == "__main__":
    console_entry()
