"""Evaluate an IVPT checkpoint with every metric of ALGORITHM.md §6 and write a report.

    python evaluate_interpretability.py --model_name_or_path DIR_OR_HUB_ID --data_dir CUB_DIR \
        --metrics all --output_dir OUT [--batch_size 8 --device cpu --seed 0 --max_images N]

Writes OUT/metrics.json (numbers, protocol constants, model and data fingerprints), OUT/report.md (a table next to
the published numbers) and OUT/figures/. Runs in one process or under `accelerate launch` (each image is evaluated
once, results gathered on the main process).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoModelForImageClassification

from ivpt.data.cub import resolve_sources, source_fingerprint
from ivpt.evaluation import (
    METRICS,
    EvaluationSettings,
    evaluate_interpretability,
    parse_metrics,
    save_consistency_examples,
)
from ivpt.report import markdown_table, parts_input_note, write_atomic


def parse_args(argv=None) -> argparse.Namespace:
    defaults = EvaluationSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="checkpoint folder or Hub id")
    parser.add_argument("--data_dir", required=True, help="CUB_200_2011 folder or CUB_200_2011.tgz")
    parser.add_argument("--metrics", default="all", help=f"'all' or a comma list of {', '.join(METRICS)}")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
    parser.add_argument("--device", default=None, help="default: this process's accelerator device, else cpu")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the stability noise")
    parser.add_argument("--max_images", type=int, default=None, help="evaluate the first N images of each split")
    parser.add_argument("--stage_index", type=int, default=None, help="evaluated stage (default: the config's)")
    parser.add_argument("--half_size", type=int, default=defaults.half_size)
    parser.add_argument("--mask_threshold", type=float, default=defaults.mask_threshold)
    parser.add_argument("--normalise_parts_input", action="store_true",
                        help="ImageNet-normalise the NMI/ARI/KPR/FG-IoU inputs (the published protocol does not, Q20)")
    parser.add_argument("--routing_noise", choices=("config", "on", "off"), default="config",
                        help="Gumbel routing noise for the accuracy (the release's test script: on, §1.14)")
    parser.add_argument("--cache_dir", default=None, help="datasets cache for the CUB builder")
    parser.add_argument("--no_figures", action="store_true")
    args = parser.parse_args(argv)
    try:
        args.metrics = parse_metrics(args.metrics)
    except ValueError as error:
        parser.error(str(error))
    if not Path(args.data_dir).exists():
        parser.error(f"--data_dir: {args.data_dir} does not exist")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    state = PartialState()
    device = torch.device(args.device) if args.device else state.device
    model = AutoModelForImageClassification.from_pretrained(args.model_name_or_path, trust_remote_code=True)
    settings = EvaluationSettings(
        stage_index=args.stage_index, batch_size=args.batch_size, seed=args.seed, max_images=args.max_images,
        half_size=args.half_size, mask_threshold=args.mask_threshold,
        normalise_parts_input=args.normalise_parts_input,
        sample_routing_noise={"config": None, "on": True, "off": False}[args.routing_noise],
    )
    result = evaluate_interpretability(
        model, args.data_dir, args.metrics, settings, device=device, cache_dir=args.cache_dir,
        keep_examples=not args.no_figures,
    )
    examples = result.pop("examples", None)
    result["model"] = str(args.model_name_or_path)
    result["data_fingerprint"] = source_fingerprint(resolve_sources(args.data_dir))
    if state.is_main_process:
        out = Path(args.output_dir)
        write_atomic(out / "metrics.json", json.dumps(result, indent=2, default=str))
        notes = [parts_input_note(result["metrics"]["parts_input"])] if "parts_input" in result["metrics"] else []
        write_atomic(out / "report.md", f"# IVPT evaluation of {args.model_name_or_path}\n\n"
                     + markdown_table({"this model": result["metrics"]}) + "\n" + "".join(f"\n{n}\n" for n in notes))
        if examples and not args.no_figures:
            save_consistency_examples(model, examples, out / "figures", settings.canvas)
        print(json.dumps(result["metrics"], indent=2))
        print(f"wrote {out / 'metrics.json'} and {out / 'report.md'}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
