#!/usr/bin/env python
r"""Evaluate an IVPT checkpoint on a part-annotated dataset: the same command as the installed `ivpt-evaluate`
(`ivpt.evaluation.cli`).

    python evaluate_interpretability.py --model_name_or_path DIR_OR_HUB_ID --data_dir CUB_DIR \
        --metrics all --output_dir OUT [--batch_size 8 --device cpu --seed 0 --max_images N --figures all]
    python evaluate_interpretability.py --model_name_or_path DIR --dataset_name NAME_OR_FOLDER --output_dir OUT

`python evaluate_interpretability.py --help` lists the arguments; docs/datasets.md explains the metrics and datasets.
"""

import sys

from ivpt.evaluation.cli import build_parser, cli, main, parse_args  # noqa: F401  (main/parse_args: in-process use)

if __name__ == "__main__":
    sys.exit(cli())
