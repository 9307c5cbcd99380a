"""The command line and recipe files of `ivpt-train` / `train_ivpt.py`.

* `ModelArguments` is generated from the fields of `IvptConfig`: every field is a flag (and a recipe key) with the
  config's default and the config docstring's description as help, so the model arguments and their defaults live in
  one place. A few extra flags choose where the weights come from (`--backbone_weights`, `--random_backbone`,
  `--model_name_or_path`) and how many labels there are (`--num_labels`).
* `DataArguments` names the data source, the splits and the columns.
* `IvptTrainingArguments` (`ivpt.training.trainer`) holds the optimisation recipe. Every `TrainingArguments` field is
  listed in `HONOURED_TRAINING_ARGUMENTS` or in `REFUSED_TRAINING_ARGUMENTS`; a refused flag set to a non-default
  value stops the run with an error naming it (a test walks the fields, so a new transformers release cannot add a
  silently ignored flag).
* `parse_arguments` reads an optional recipe file (YAML or JSON, keys = flags) and the command line (which overrides
  the recipe), checks every value against its field, and returns the three argument objects.

Every problem raises `TrainingError` (a `ValueError`) naming the file, recipe key or flag, before any work is done.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from transformers import HfArgumentParser

from ..configuration_ivpt import IvptConfig
from .errors import MissingPathError, TrainingError
from .trainer import IvptTrainingArguments


# ----------------------------------------------------------------------------------------------------------------
# Model arguments, generated from IvptConfig
# ----------------------------------------------------------------------------------------------------------------


def config_field_names() -> list[str]:
    """The IVPT fields of `IvptConfig` (its own annotated fields, not those of `PreTrainedConfig`), in order."""
    return [name for name in IvptConfig.__annotations__ if name in IvptConfig.__dataclass_fields__]


def config_field_help() -> dict[str, str]:
    """Per field of `IvptConfig`, the description of its `Args:` entry in the class docstring (one line)."""
    helps: dict[str, str] = {}
    current = None
    for line in (IvptConfig.__doc__ or "").splitlines():
        entry = re.match(r"^\s{8}(\w+) \(`[^)]*\)?[^:]*:\s*(.*)$", line)
        if entry and entry.group(1) in IvptConfig.__dataclass_fields__:
            current = entry.group(1)
            helps[current] = entry.group(2).strip()
        elif current and re.match(r"^\s{12}\S", line):
            helps[current] = f"{helps[current]} {line.strip()}".strip()
        elif line.strip() and not line.startswith(" " * 12):
            current = None
    return helps


def _config_default(name: str) -> Any:
    item = IvptConfig.__dataclass_fields__[name]
    if item.default is not dataclasses.MISSING:
        return item.default
    return item.default_factory()


# Flags whose command-line form differs from the config value: a JSON object, and comma-separated counts.
_JSON_FIELDS = {"backbone_kwargs"}
_COMMA_LIST_FIELDS = {"n_pro"}


def _model_argument_field(name: str, help_text: str) -> tuple[str, Any, dataclasses.Field]:
    default = _config_default(name)
    if name in _JSON_FIELDS:
        return name, str | None, field(default=None, metadata={"help": f"{help_text} (JSON object; a mapping in a "
                                                                        "recipe file)"})
    if name in _COMMA_LIST_FIELDS:
        return name, str, field(default=",".join(str(v) for v in default),
                                metadata={"help": f"{help_text} (comma-separated; a list in a recipe file)"})
    if isinstance(default, list):
        return name, list[type(default[0])], field(default_factory=lambda value=default: list(value),
                                                    metadata={"help": help_text})
    return name, type(default), field(default=default, metadata={"help": help_text})


class _ModelArgumentsMethods:
    def config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `IvptConfig` (every IVPT field; the label count comes from the data)."""
        kwargs = {name: getattr(self, name) for name in config_field_names()}
        kwargs["backbone_kwargs"] = _parse_json_object("backbone_kwargs", self.backbone_kwargs)
        return kwargs


_WEIGHT_SOURCE_FIELDS = [
    ("backbone_weights", str | None, field(default=None, metadata={"help": (
        "Local .safetensors/.pth file with the timm weights of --backbone (offline). Without it, --backbone's "
        "pretrained weights are fetched by timm from the Hub.")})),
    ("random_backbone", bool, field(default=False, metadata={"help": (
        "Start from a randomly initialised (frozen) backbone instead of pretrained weights: only for tests.")})),
    ("model_name_or_path", str | None, field(default=None, metadata={"help": (
        "Start from a saved IVPT model (a directory or Hub id) instead of a backbone; its IVPT fields are used and "
        "its classifier is matched to the dataset's labels by name.")})),
    ("num_labels", int | None, field(default=None, metadata={"help": (
        "Number of classes; defaults to the dataset's class count.")})),
]

ModelArguments = dataclasses.make_dataclass(
    "ModelArguments",
    [_model_argument_field(name, config_field_help().get(name, "")) for name in config_field_names()]
    + _WEIGHT_SOURCE_FIELDS,
    bases=(_ModelArgumentsMethods,),
    namespace={"__doc__": "The model: every `IvptConfig` field, plus where the weights come from."},
)
ModelArguments.__module__ = __name__


def _parse_json_object(flag: str, text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise TrainingError(f"`--{flag}`: expected a JSON object, got {text!r}: {error}") from None
    if not isinstance(value, dict):
        raise TrainingError(f"`--{flag}`: expected a JSON object, got {text!r}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Data arguments
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DataArguments:
    """Where the images come from and which splits play which role."""

    data_dir: str | None = field(
        default=None, metadata={"help": "CUB-200-2011 folder, its parent, or CUB_200_2011.tgz (the ivpt.data builder)."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "A `datasets` Hub id or a local folder: Hub-style parquet files, a save_to_disk "
                                        "folder, an imagefolder, or an official CUB / NABirds / Flowers-102 / "
                                        "PartImageNet layout (ivpt.data.load_any_dataset)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name for --dataset_name."})
    cub_config: str = field(default="full", metadata={"help": "CUB builder config ('full' for training)."})
    dataset_cache_dir: str | None = field(default=None, metadata={"help": "Cache folder of the datasets."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    test_split: str | None = field(
        default="test", metadata={"help": "Split of the final full evaluation (eval_results.json); empty to skip."}
    )
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Split for periodic evaluation and best-model selection. Must be named explicitly; the "
                          "full split is always used (never rotating test shards)."},
    )
    validation_fraction: float = field(
        default=0.0, metadata={"help": "Carve a stratified 'validation' split of this fraction out of the train split."}
    )
    image_column: str = field(default="image", metadata={"help": "Image column of the dataset."})
    label_column: str = field(default="label", metadata={"help": "Integer label column of the dataset."})
    augmentation: str = field(
        default="cub_original", metadata={"help": "'cub_original' (the release's augmentation) or 'none' (train on the "
                                                  "test transform)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the train split (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate eval/test splits (debugging)."})


ARGUMENT_CLASSES = (ModelArguments, DataArguments, IvptTrainingArguments)
RECIPE_SUFFIXES = (".yaml", ".yml", ".json")

# ----------------------------------------------------------------------------------------------------------------
# TrainingArguments: honoured or refused
# ----------------------------------------------------------------------------------------------------------------

_BY_TRAINER = "by the transformers Trainer"
HONOURED_TRAINING_ARGUMENTS: dict[str, str] = {
    # run shape and optimisation
    "output_dir": "where checkpoints, the final model and eval_results.json go",
    "per_device_train_batch_size": _BY_TRAINER, "per_device_eval_batch_size": _BY_TRAINER,
    "num_train_epochs": _BY_TRAINER, "max_steps": _BY_TRAINER,
    "learning_rate": "base lr of the five IVPT parameter groups",
    "weight_decay": "normalised weight decay of the backbone-decay and classifier groups",
    "adam_beta1": "IVPT Adam/AdamW", "adam_beta2": "IVPT Adam/AdamW", "adam_epsilon": "IVPT Adam/AdamW",
    "lr_scheduler_type": "with --epoch_step_schedule false (refused otherwise)",
    "lr_scheduler_kwargs": "with --epoch_step_schedule false (refused otherwise)",
    "warmup_steps": "with --epoch_step_schedule false (refused otherwise)",
    "gradient_accumulation_steps": _BY_TRAINER, "max_grad_norm": "clipping over the trainable tensors",
    "auto_find_batch_size": _BY_TRAINER,
    # precision and speed
    "bf16": _BY_TRAINER, "fp16": _BY_TRAINER, "bf16_full_eval": _BY_TRAINER, "fp16_full_eval": _BY_TRAINER,
    "tf32": _BY_TRAINER, "torch_compile": _BY_TRAINER, "torch_compile_backend": _BY_TRAINER,
    "torch_compile_mode": _BY_TRAINER, "torch_empty_cache_steps": _BY_TRAINER,
    "gradient_checkpointing": "backbone blocks recomputed in the backward pass",
    "gradient_checkpointing_kwargs": _BY_TRAINER,
    # logging
    "logging_strategy": _BY_TRAINER, "logging_steps": _BY_TRAINER, "logging_first_step": _BY_TRAINER,
    "log_on_each_node": _BY_TRAINER, "logging_nan_inf_filter": _BY_TRAINER, "log_level": _BY_TRAINER,
    "log_level_replica": _BY_TRAINER, "disable_tqdm": _BY_TRAINER, "report_to": _BY_TRAINER, "run_name": _BY_TRAINER,
    "project": "by the trackio logger", "trackio_space_id": "by the trackio logger",
    "trackio_bucket_id": "by the trackio logger", "trackio_static_space_id": "by the trackio logger",
    "include_num_input_tokens_seen": _BY_TRAINER, "skip_memory_metrics": _BY_TRAINER, "debug": _BY_TRAINER,
    # evaluation and checkpoints
    "eval_strategy": "periodic evaluation on --eval_split", "eval_steps": _BY_TRAINER, "eval_delay": _BY_TRAINER,
    "eval_on_start": _BY_TRAINER, "eval_accumulation_steps": _BY_TRAINER,
    "save_strategy": _BY_TRAINER, "save_steps": _BY_TRAINER, "save_on_each_node": _BY_TRAINER,
    "save_total_limit": _BY_TRAINER, "save_only_model": "by the Trainer (such checkpoints cannot be resumed)",
    "enable_jit_checkpoint": _BY_TRAINER, "load_best_model_at_end": "best model selected on --eval_split",
    "metric_for_best_model": _BY_TRAINER, "greater_is_better": _BY_TRAINER,
    "resume_from_checkpoint": "a checkpoint folder, or `latest` (newest complete checkpoint of --output_dir)",
    "ignore_data_skip": _BY_TRAINER, "restore_callback_states_from_checkpoint": _BY_TRAINER,
    "do_train": "false: evaluation-only run of --model_name_or_path on --test_split",
    # hub
    "push_to_hub": "every push carries the code files and the IVPT card", "hub_token": "used, never written",
    "hub_private_repo": _BY_TRAINER, "hub_model_id": _BY_TRAINER, "hub_strategy": _BY_TRAINER,
    "hub_always_push": _BY_TRAINER, "hub_revision": _BY_TRAINER,
    # seeds, devices, data loading
    "seed": "data order, new module initialisation and (seed + process index) objective noise",
    "data_seed": _BY_TRAINER, "full_determinism": _BY_TRAINER, "use_cpu": _BY_TRAINER,
    "accelerator_config": _BY_TRAINER, "local_rank": _BY_TRAINER,
    "dataloader_drop_last": "training batches only: evaluation always counts every sample",
    "dataloader_num_workers": _BY_TRAINER, "dataloader_pin_memory": _BY_TRAINER,
    "dataloader_persistent_workers": "the per-epoch augmentation seed reaches persistent workers",
    "dataloader_prefetch_factor": _BY_TRAINER, "dataloader_multiprocessing_context": _BY_TRAINER,
    "dataloader_in_order": _BY_TRAINER,
    "ddp_find_unused_parameters": _BY_TRAINER, "ddp_bucket_cap_mb": _BY_TRAINER, "ddp_broadcast_buffers": _BY_TRAINER,
    "ddp_static_graph": _BY_TRAINER, "ddp_backend": _BY_TRAINER, "ddp_timeout": _BY_TRAINER,
    # IvptTrainingArguments' own fields
    "finer_lr_factor": "IVPT parameter groups", "modulation_lr_factor": "IVPT parameter groups",
    "scratch_lr_factor": "IVPT parameter groups", "optimizer_type": "IVPT optimizer: adam or adamw",
    "epoch_step_schedule": "IVPT epoch-stepped StepLR", "lr_decay_epochs": "IVPT StepLR",
    "lr_decay_rate": "IVPT StepLR", "per_process_seed": "IVPT seeding",
    "overwrite_output_dir": "train into an --output_dir that already holds a run",
}

REFUSED_TRAINING_ARGUMENTS: dict[str, str] = {
    "optim": "the IVPT optimizer is chosen with --optimizer_type adam|adamw",
    "optim_args": "the IVPT optimizer is chosen with --optimizer_type adam|adamw",
    "optim_target_modules": "the IVPT parameter groups decide what is optimised",
    "label_smoothing_factor": "the objective is the model's own (IVPT cross-entropy without smoothing)",
    "average_tokens_across_devices": "token-count normalisation of language models; the IVPT loss is a batch mean",
    "activation_checkpointing": "the IVPT model does not support activation checkpointing",
    "activation_checkpointing_kwargs": "the IVPT model does not support activation checkpointing",
    "use_liger_kernel": "Liger kernels are for language models",
    "liger_kernel_config": "Liger kernels are for language models",
    "use_cache": "a generation option of language models",
    "neftune_noise_alpha": "noise on token embeddings of language models",
    "prediction_loss_only": "the evaluation computes top-1/top-5 from the logits",
    "eval_do_concat_batches": "the metrics need the concatenated logits",
    "eval_use_gather_object": "the logits are gathered as tensors",
    "include_for_metrics": "the metrics use logits and labels only",
    "batch_eval_metrics": "the metrics are computed over the whole split",
    "remove_unused_columns": "images are transformed on the fly: the columns must stay",
    "label_names": "the label column is chosen with --label_column",
    "train_sampling_strategy": "the data order is the Trainer's seeded random sampler (exact resume)",
    "length_column_name": "no length-grouped sampling for images",
    "fsdp": "not supported with the IVPT parameter groups (the model fits on one device)",
    "fsdp_config": "not supported with the IVPT parameter groups (the model fits on one device)",
    "deepspeed": "not supported with the IVPT parameter groups (the model fits on one device)",
    "parallelism_config": "tensor/context parallelism is not supported by the IVPT model",
    "do_eval": "evaluation is chosen with --eval_split / --eval_strategy and --test_split",
    "do_predict": "the test split is evaluated with --test_split",
}

_SCHEDULE_FLAGS = ("lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps")


def training_argument_default(name: str) -> Any:
    item = IvptTrainingArguments.__dataclass_fields__[name]
    return item.default_factory() if item.default is dataclasses.MISSING else item.default


def _normalise_value(value: Any) -> Any:
    value = getattr(value, "value", value)  # enums
    if isinstance(value, (list, tuple)):
        return [_normalise_value(item) for item in value]
    return value


def check_refused_flags(values: dict[str, Any], given: set[str]) -> None:
    """Stops on a refused `TrainingArguments` flag set to a non-default value, and on schedule flags that the
    epoch-stepped StepLR would ignore."""
    for name, reason in REFUSED_TRAINING_ARGUMENTS.items():
        if name in given and _normalise_value(values[name]) != _normalise_value(training_argument_default(name)):
            raise TrainingError(f"`--{name}` is not supported by IVPT training ({reason}); got {values[name]!r}")
    if values.get("epoch_step_schedule", True):
        for name in _SCHEDULE_FLAGS:
            if name in given and _normalise_value(values[name]) != _normalise_value(training_argument_default(name)):
                raise TrainingError(
                    f"`--{name}` has no effect with the epoch-stepped StepLR of the IVPT recipe; add "
                    f"`--epoch_step_schedule false` to use the Trainer's schedulers and warmup"
                )


# ----------------------------------------------------------------------------------------------------------------
# Recipes and the command line
# ----------------------------------------------------------------------------------------------------------------


def argument_fields() -> dict[str, dataclasses.Field]:
    """Every flag (= recipe key) and its dataclass field."""
    return {item.name: item for cls in ARGUMENT_CLASSES for item in dataclasses.fields(cls) if item.init}


def _accepts_list(name: str) -> bool:
    if name in _COMMA_LIST_FIELDS:
        return True
    for cls in ARGUMENT_CLASSES:
        hint = typing.get_type_hints(cls).get(name)
        if hint is not None:
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            kinds = typing.get_args(hint) if union else (hint,)
            return any(typing.get_origin(kind) is list or kind is list for kind in kinds)
    return False


def read_recipe(path: str) -> dict[str, Any]:
    """Reads a YAML or JSON recipe; rejects unknown keys and values of the wrong shape (naming the file and key)."""
    if not os.path.isfile(path):
        raise MissingPathError(f"Recipe file {path!r} does not exist")
    with open(path, encoding="utf-8") as handle:
        if path.endswith(".json"):
            try:
                recipe = json.load(handle)
            except json.JSONDecodeError as error:
                raise TrainingError(f"Recipe file {path!r}: invalid JSON: {error}") from None
        else:
            import yaml

            try:
                recipe = yaml.safe_load(handle)
            except yaml.YAMLError as error:
                raise TrainingError(f"Recipe file {path!r}: invalid YAML: {error}") from None
    recipe = recipe or {}
    if not isinstance(recipe, dict):
        raise TrainingError(f"Recipe file {path!r}: expected a mapping of flags to values, got {type(recipe).__name__}")
    known = argument_fields()
    unknown = sorted(str(key) for key in recipe if key not in known)
    if unknown:
        raise TrainingError(f"Recipe file {path!r}: unknown key(s) {unknown}; run `ivpt-train --help` for the flags")
    for key, value in recipe.items():
        if isinstance(value, (list, tuple)) and not _accepts_list(key):
            raise TrainingError(f"Recipe file {path!r}: key {key!r} takes a single value, got the list {value!r}")
        if isinstance(value, dict) and key not in _JSON_FIELDS:
            raise TrainingError(f"Recipe file {path!r}: key {key!r} takes a single value, got the mapping {value!r}")
    return recipe


def _recipe_to_argv(recipe: dict[str, Any]) -> list[str]:
    argv = []
    for key, value in recipe.items():
        if value is None:
            continue
        if isinstance(value, dict):
            value = json.dumps(value)
        if key in _COMMA_LIST_FIELDS and isinstance(value, (list, tuple)):
            value = ",".join(str(item) for item in value)
        if isinstance(value, (list, tuple)):
            argv += [f"--{key}", *[str(item) for item in value]]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def _argv_keys(argv: list[str]) -> dict[str, Any]:
    """The flags given on the command line (by field name: `--n-pro` is `n_pro`, `--no_x` is `x: False`), with their
    raw values."""
    fields = argument_fields()
    keys, current = {}, None
    for token in argv:
        if token.startswith("--"):
            current = token[2:].split("=", 1)[0].replace("-", "_")
            value: Any = token.split("=", 1)[1] if "=" in token else True
            if current not in fields and current.startswith("no_") and current[3:] in fields:
                current, value = current[3:], False
            keys[current] = value
        elif current is not None:
            keys[current] = token if keys[current] is True else f"{keys[current]} {token}"
    return keys


class _RaisingParser(HfArgumentParser):
    """`HfArgumentParser` that raises `TrainingError` instead of exiting, so that callers can handle bad flags."""

    def error(self, message):
        raise TrainingError(f"Command line: {message}; run `ivpt-train --help` for the flags")


def build_parser() -> HfArgumentParser:
    parser = _RaisingParser(ARGUMENT_CLASSES, prog="ivpt-train", description=(
        "Train (or, with --do_train false, evaluate) an IVPT classifier. The optional first argument is a recipe "
        "file (YAML/JSON) whose keys are the flags below; flags on the command line override it."))
    parser.allow_abbrev = False  # a misspelt flag must fail, not match a longer one by prefix
    parser.usage = "ivpt-train [RECIPE.yaml] [--flag value ...]"
    return parser


def parse_arguments(argv: list[str] | None = None):
    """(model_args, data_args, training_args, given) from an optional recipe file plus command-line overrides.

    `given` maps every flag set in the recipe or on the command line to its value (command line last)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe: dict[str, Any] = {}
    if argv and argv[0].endswith(RECIPE_SUFFIXES) and not argv[0].startswith("-"):
        recipe = read_recipe(argv.pop(0))
    parser = build_parser()
    if any(token in ("-h", "--help") for token in argv):
        parser.print_help()
        raise SystemExit(0)
    namespace, remaining = parser.parse_known_args(_recipe_to_argv(recipe) + argv)
    if remaining:
        raise TrainingError(f"Unknown command-line argument(s) {remaining}; run `ivpt-train --help` for the flags")
    given = {**recipe, **_argv_keys(argv)}
    values = vars(namespace)
    check_refused_flags(values, set(given))
    check_values(values)
    objects = []
    for cls in ARGUMENT_CLASSES:
        keys = {item.name for item in dataclasses.fields(cls) if item.init}
        try:
            objects.append(cls(**{key: value for key, value in values.items() if key in keys}))
        except (ValueError, TypeError) as error:
            raise TrainingError(f"Training arguments: {error}") from None
    return (*objects, given)


def check_values(values: dict[str, Any]) -> None:
    """Range checks of the flags whose bad values the libraries would only notice mid-run (or never)."""
    positive = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "image_size", "lr_decay_epochs")
    for name in positive:
        if values[name] is not None and values[name] < 1:
            raise TrainingError(f"`--{name}`: expected a positive integer, got {values[name]}")
    if values["max_steps"] <= 0 and values["num_train_epochs"] <= 0 and values["do_train"]:
        raise TrainingError(
            f"`--num_train_epochs`: expected a positive number of epochs (or `--max_steps`), got "
            f"{values['num_train_epochs']}"
        )
    for name in ("learning_rate", "weight_decay", "max_grad_norm", "dataloader_num_workers"):
        if values[name] < 0:
            raise TrainingError(f"`--{name}`: expected a non-negative value, got {values[name]}")
    if values["dataloader_persistent_workers"] and values["dataloader_num_workers"] == 0:
        raise TrainingError("`--dataloader_persistent_workers true` needs `--dataloader_num_workers` > 0")
    if values["num_labels"] is not None and values["num_labels"] < 1:
        raise TrainingError(f"`--num_labels`: expected a positive integer, got {values['num_labels']}")
    output_dir = values["output_dir"]
    if output_dir is None or output_dir == "":
        raise TrainingError("`--output_dir`: required (where checkpoints, the model and eval_results.json go)")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise TrainingError(f"`--output_dir`: {output_dir!r} is a file, not a directory")


__all__ = [
    "ARGUMENT_CLASSES",
    "DataArguments",
    "HONOURED_TRAINING_ARGUMENTS",
    "MissingPathError",
    "ModelArguments",
    "REFUSED_TRAINING_ARGUMENTS",
    "TrainingError",
    "build_parser",
    "config_field_help",
    "config_field_names",
    "parse_arguments",
    "read_recipe",
]
