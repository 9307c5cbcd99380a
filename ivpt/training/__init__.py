"""The IVPT training workflow: `IvptTrainer` (the recipe on top of `transformers.Trainer`), its arguments, the data
plumbing, and `train` / `main`, which `ivpt-train` and `train_ivpt.py` run.

    from ivpt.training import main
    results = main(["configs/cub_ivpt.yaml", "--data_dir", "CUB_200_2011.tgz", "--backbone_weights", "w.safetensors"])
"""

from .arguments import (
    HONOURED_TRAINING_ARGUMENTS,
    REFUSED_TRAINING_ARGUMENTS,
    DataArguments,
    ModelArguments,
    parse_arguments,
)
from .data import DataError
from .errors import MissingPathError, TrainingError
from .run import cli, main, train
from .trainer import (
    PARAMETER_GROUPS,
    EpochStepDecay,
    IvptTrainer,
    IvptTrainingArguments,
    compute_classification_metrics,
    ivpt_parameter_groups,
    normalised_weight_decay,
    parameter_group_members,
    render_model_card,
)

__all__ = [
    "DataArguments",
    "DataError",
    "EpochStepDecay",
    "HONOURED_TRAINING_ARGUMENTS",
    "IvptTrainer",
    "IvptTrainingArguments",
    "MissingPathError",
    "ModelArguments",
    "PARAMETER_GROUPS",
    "REFUSED_TRAINING_ARGUMENTS",
    "TrainingError",
    "cli",
    "compute_classification_metrics",
    "ivpt_parameter_groups",
    "main",
    "normalised_weight_decay",
    "parameter_group_members",
    "parse_arguments",
    "render_model_card",
    "train",
]
