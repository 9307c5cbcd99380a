#!/usr/bin/env python
"""Train an IVPT part-prototype classifier: the same command as the installed `ivpt-train` (`ivpt.training.run`).

    python train_ivpt.py configs/cub_ivpt.yaml --data_dir /data/CUB_200_2011.tgz --backbone_weights dinov2.safetensors
    accelerate launch --config_file accelerate_config.yaml train_ivpt.py configs/cub_ivpt.yaml --data_dir ...

`python train_ivpt.py --help` lists the flags; docs/training.md explains the workflow.
"""

from ivpt.training.run import cli

if __name__ == "__main__":
    cli()
