#!/usr/bin/env python
"""Train an IVPT part-prototype classifier with `IvptTrainer` (spec: ALGORITHM.md §4, §5.2, §6.1).

    python train_ivpt.py configs/cub_ivpt.yaml --data_dir /data/CUB_200_2011.tgz --output_dir runs/cub
    accelerate launch --config_file accelerate_config.yaml train_ivpt.py configs/cub_ivpt.yaml --data_dir ...

The optional first argument is a recipe file (YAML or JSON) whose keys are the flags below; flags given on the command
line override it. Every key is checked: an unknown recipe key, a missing data directory, a split or column that does
not exist, a label out of range or a checkpoint of another model configuration stops the run with an error naming the
culprit, before anything is written to `--output_dir`.

After training: the final model (HF format: safetensors, config, code files, image processor, model card) is saved to
`--output_dir`; the final model, and the best one when a best checkpoint was selected on `--eval_split` and differs
from it, are evaluated on the full `--test_split`, and the results are written to `<output_dir>/eval_results.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import HfArgumentParser
from transformers.trainer_utils import get_last_checkpoint

from ivpt import IvptConfig, IvptForImageClassification
from ivpt.image_processing import make_image_processor
from ivpt.trainer import IvptTrainer, IvptTrainingArguments, write_text_atomic
from ivpt.training_data import (
    AugmentationEpochCallback,
    SampleSeededTransform,
    build_transforms,
    load_raw_dataset,
    prepare_splits,
)

logger = logging.getLogger("train_ivpt")


class RecipeError(ValueError):
    """A recipe file or command line that cannot be used; the message names the file, key or flag."""


@dataclass
class ModelArguments:
    """The model: backbone, geometry, prototypes and objective (fields of `IvptConfig`)."""

    backbone: str = field(
        default=IvptConfig.backbone, metadata={"help": "timm ViT name (e.g. vit_base_patch14_reg4_dinov2.lvd142m)."}
    )
    backbone_kwargs: str | None = field(
        default=None, metadata={"help": "JSON dict of extra timm.create_model arguments (a dict in a recipe file)."}
    )
    backbone_weights: str | None = field(
        default=None,
        metadata={"help": "Local .safetensors/.pth file with the timm backbone weights. Without it (and without "
                          "--model_name_or_path) the backbone is random: only useful for tests."},
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start from a saved IVPT model (a directory or Hub id) instead of a backbone."}
    )
    image_size: int = field(default=518, metadata={"help": "Input side (multiple of the patch size)."})
    n_pro: str = field(default="17,14,11,8,5", metadata={"help": "Prototypes per stage, background included."})
    num_labels: int | None = field(
        default=None, metadata={"help": "Number of classes; defaults to the dataset's class count."}
    )
    gumbel_routing: bool = field(default=True, metadata={"help": "Gumbel noise in the routing (§1.6)."})
    sample_routing_noise_in_eval: bool = field(
        default=False, metadata={"help": "Also sample the routing noise at evaluation (release parity, §1.14)."}
    )
    freeze_prompt_norm_affine: bool = field(
        default=True, metadata={"help": "Keep the prompt LayerNorm affine frozen at identity (§8 Q1)."}
    )
    classification_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the cross-entropy."})
    consistency_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the cross-layer KL."})
    presence_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the presence loss."})
    orthogonality_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the orthogonality loss."})
    equivariance_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the equivariance loss."})
    total_variation_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the total variation."})
    enforced_presence_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the background presence."})
    entropy_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the pixel-wise entropy."})

    def config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `IvptConfig` (everything but the weight sources)."""
        kwargs = {
            item.name: getattr(self, item.name)
            for item in dataclasses.fields(self)
            if item.name not in ("backbone_weights", "model_name_or_path", "num_labels")
        }
        if self.backbone_kwargs:
            try:
                kwargs["backbone_kwargs"] = json.loads(self.backbone_kwargs)
            except json.JSONDecodeError as error:
                raise RecipeError(f"`--backbone_kwargs`: expected a JSON object, got {self.backbone_kwargs!r}: {error}")
            if not isinstance(kwargs["backbone_kwargs"], dict):
                raise RecipeError(f"`--backbone_kwargs`: expected a JSON object, got {self.backbone_kwargs!r}")
        else:
            kwargs["backbone_kwargs"] = {}
        return kwargs


@dataclass
class DataArguments:
    """Where the images come from and which splits play which role."""

    data_dir: str | None = field(
        default=None, metadata={"help": "CUB-200-2011 folder, its parent, or CUB_200_2011.tgz (the ivpt.data builder)."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "A `datasets` image-classification dataset id, or an imagefolder directory."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name for --dataset_name."})
    cub_config: str = field(default="full", metadata={"help": "CUB builder config (§5.2: 'full' for training)."})
    dataset_cache_dir: str | None = field(default=None, metadata={"help": "Cache folder of the datasets."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    test_split: str | None = field(
        default="test", metadata={"help": "Split of the final full evaluation (eval_results.json); empty to skip."}
    )
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Split for periodic evaluation and best-model selection. Must be named explicitly; the "
                          "full split is always used (never rotating test shards, §8 Q13)."},
    )
    validation_fraction: float = field(
        default=0.0, metadata={"help": "Carve a stratified 'validation' split of this fraction out of the train split."}
    )
    image_column: str = field(default="image", metadata={"help": "Image column of the dataset."})
    label_column: str = field(default="label", metadata={"help": "Integer label column of the dataset."})
    augmentation: str = field(
        default="cub_original", metadata={"help": "'cub_original' (§4.5) or 'none' (train on the test transform)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the train split (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate eval/test splits (debugging)."})


ARGUMENT_CLASSES = (ModelArguments, DataArguments, IvptTrainingArguments)
RECIPE_SUFFIXES = (".yaml", ".yml", ".json")


def _recipe_keys() -> dict[str, dataclasses.Field]:
    keys = {}
    for cls in ARGUMENT_CLASSES:
        for item in dataclasses.fields(cls):
            if item.init:
                keys[item.name] = item
    return keys


def read_recipe(path: str) -> dict[str, Any]:
    """Reads a YAML or JSON recipe; rejects unknown keys (naming the file and the keys)."""
    if not os.path.isfile(path):
        raise RecipeError(f"Recipe file {path!r} does not exist")
    with open(path, encoding="utf-8") as handle:
        if path.endswith(".json"):
            try:
                recipe = json.load(handle)
            except json.JSONDecodeError as error:
                raise RecipeError(f"Recipe file {path!r}: invalid JSON: {error}") from error
        else:
            import yaml

            try:
                recipe = yaml.safe_load(handle)
            except yaml.YAMLError as error:
                raise RecipeError(f"Recipe file {path!r}: invalid YAML: {error}") from error
    recipe = recipe or {}
    if not isinstance(recipe, dict):
        raise RecipeError(f"Recipe file {path!r}: expected a mapping of flags to values, got {type(recipe).__name__}")
    known = _recipe_keys()
    unknown = sorted(key for key in recipe if key not in known)
    if unknown:
        raise RecipeError(f"Recipe file {path!r}: unknown key(s) {unknown}; run `train_ivpt.py --help` for the flags")
    return recipe


def _recipe_to_argv(recipe: dict[str, Any]) -> list[str]:
    argv = []
    for key, value in recipe.items():
        if value is None:
            continue
        if isinstance(value, dict):
            value = json.dumps(value)
        if key == "n_pro" and isinstance(value, (list, tuple)):
            value = ",".join(str(item) for item in value)
        if isinstance(value, (list, tuple)):
            argv += [f"--{key}", *[str(item) for item in value]]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def parse_arguments(argv: list[str] | None = None):
    """(model_args, data_args, training_args, recipe) from an optional recipe file plus command-line overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe: dict[str, Any] = {}
    if argv and argv[0].endswith(RECIPE_SUFFIXES) and not argv[0].startswith("-"):
        recipe = read_recipe(argv.pop(0))
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    parser.allow_abbrev = False  # a misspelt flag must fail, not match a longer one by prefix
    model_args, data_args, training_args, remaining = parser.parse_args_into_dataclasses(
        args=_recipe_to_argv(recipe) + argv, return_remaining_strings=True
    )
    if remaining:
        raise RecipeError(f"Unknown command-line argument(s) {remaining}; run `train_ivpt.py --help` for the flags")
    overrides = {key: value for key, value in _argv_keys(argv).items()}
    effective = {**recipe, **overrides}
    return model_args, data_args, training_args, effective


def _argv_keys(argv: list[str]) -> dict[str, Any]:
    keys, current = {}, None
    for token in argv:
        if token.startswith("--"):
            current = token[2:].split("=", 1)[0]
            keys[current] = token.split("=", 1)[1] if "=" in token else True
        elif current is not None:
            keys[current] = token if keys[current] is True else f"{keys[current]} {token}"
    return keys


# ----------------------------------------------------------------------------------------------------------------


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args: IvptTrainingArguments):
    """Everything that can be checked before touching data or the output directory."""
    if training_args.remove_unused_columns:
        raise RecipeError("`--remove_unused_columns`: must be False (images are transformed on the fly)")
    if model_args.backbone_weights and not os.path.isfile(model_args.backbone_weights):
        raise FileNotFoundError(f"`--backbone_weights`: no such file {model_args.backbone_weights!r}")
    if model_args.backbone_weights and model_args.model_name_or_path:
        raise RecipeError("Give at most one of `--backbone_weights` and `--model_name_or_path`")
    if data_args.data_dir is not None and not os.path.exists(data_args.data_dir):
        raise FileNotFoundError(f"`--data_dir`: no such file or directory {data_args.data_dir!r}")
    evaluates = getattr(training_args.eval_strategy, "value", training_args.eval_strategy) != "no"
    if (evaluates or training_args.load_best_model_at_end) and not data_args.eval_split:
        raise RecipeError(
            "Periodic evaluation / best-model selection needs the split named explicitly with `--eval_split` "
            "(e.g. `--validation_fraction 0.1 --eval_split validation`); it never defaults to the test split (§8 Q13)"
        )
    if data_args.validation_fraction and data_args.eval_split not in (None, "validation"):
        logger.warning("`--validation_fraction` creates split 'validation', but `--eval_split` is %r",
                       data_args.eval_split)
    resume = training_args.resume_from_checkpoint
    if resume and resume not in ("True", "true", "latest") and not os.path.isdir(resume):
        raise FileNotFoundError(f"`--resume_from_checkpoint`: no such checkpoint directory {resume!r}")


def resolve_resume(training_args: IvptTrainingArguments) -> str | None:
    """The checkpoint to resume from: a directory, or the latest one in `output_dir` for `True` / `latest`."""
    resume = training_args.resume_from_checkpoint
    if not resume:
        return None
    if resume in ("True", "true", "latest"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise FileNotFoundError(
                f"`--resume_from_checkpoint {resume}`: no checkpoint-* folder in `--output_dir` "
                f"{training_args.output_dir!r}"
            )
        return last
    return resume


def check_output_dir(training_args: IvptTrainingArguments, resume: str | None) -> None:
    output_dir = training_args.output_dir
    if resume or training_args.overwrite_output_dir or not os.path.isdir(output_dir):
        return
    if get_last_checkpoint(output_dir) is not None or os.path.isfile(os.path.join(output_dir, "eval_results.json")):
        raise RecipeError(
            f"`--output_dir` {output_dir!r} already holds a training run; resume it with `--resume_from_checkpoint "
            "latest`, choose another directory, or pass `--overwrite_output_dir`"
        )


def check_checkpoint_config(checkpoint: str, config: IvptConfig) -> None:
    """Refuses to resume from a checkpoint whose model configuration differs from the one requested."""
    path = os.path.join(checkpoint, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`--resume_from_checkpoint`: {checkpoint!r} has no config.json")
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)
    if saved.get("model_type") != IvptConfig.model_type:
        raise RecipeError(f"`--resume_from_checkpoint`: {path} is a {saved.get('model_type')!r} model, not 'ivpt'")
    requested = config.to_dict()
    fields = [item.name for item in dataclasses.fields(IvptConfig) if item.name in requested] + ["num_labels"]
    saved_labels = len(saved.get("id2label", {})) or saved.get("num_labels")
    differences = []
    for name in fields:
        ours = config.num_labels if name == "num_labels" else requested.get(name)
        theirs = saved_labels if name == "num_labels" else saved.get(name)
        if name == "n_pro" and isinstance(theirs, str):
            theirs = [int(item) for item in theirs.split(",")]
        if theirs is not None and _normalise(ours) != _normalise(theirs):
            differences.append(f"{name}: checkpoint {theirs!r} vs requested {ours!r}")
    if differences:
        raise RecipeError(
            f"`--resume_from_checkpoint`: {checkpoint!r} was trained with another model configuration: "
            + "; ".join(differences)
        )


def _normalise(value):
    if isinstance(value, (list, tuple)):
        return [_normalise(item) for item in value]
    if isinstance(value, dict):
        return {key: _normalise(item) for key, item in sorted(value.items())}
    return value


def build_model(model_args: ModelArguments, label_names: list[str]) -> IvptForImageClassification:
    labels = {"id2label": dict(enumerate(label_names)), "label2id": {name: i for i, name in enumerate(label_names)}}
    if model_args.model_name_or_path:
        model = IvptForImageClassification.from_pretrained(model_args.model_name_or_path)
        if model.config.num_labels != len(label_names):
            raise RecipeError(
                f"`--model_name_or_path`: {model_args.model_name_or_path!r} has {model.config.num_labels} classes, "
                f"the dataset {len(label_names)}"
            )
        return model
    kwargs = {**model_args.config_kwargs(), **labels}
    if model_args.backbone_weights:
        return IvptForImageClassification.from_backbone(backbone_weights=model_args.backbone_weights, **kwargs)
    logger.warning("No --backbone_weights: the backbone is randomly initialised (only useful for tests)")
    return IvptForImageClassification(IvptConfig(**kwargs))


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, training_args, recipe = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    logger.setLevel(training_args.get_process_log_level())

    # 1. Checks that touch nothing.
    check_arguments(model_args, data_args, training_args)
    resume = resolve_resume(training_args)
    check_output_dir(training_args, resume)

    # 2. Data, validated.
    raw, source = load_raw_dataset(
        data_args.data_dir, data_args.dataset_name, data_args.dataset_config_name, data_args.cub_config,
        data_args.dataset_cache_dir,
    )
    data = prepare_splits(
        raw, source, data_args.train_split, data_args.test_split or None, data_args.eval_split,
        data_args.image_column, data_args.label_column, data_args.validation_fraction, training_args.seed,
        model_args.num_labels, data_args.max_train_samples, data_args.max_eval_samples,
    )

    # 3. Model, checked against the checkpoint to resume; its new modules are initialised from `--seed`.
    transformers.set_seed(training_args.seed)
    model = build_model(model_args, data.label_names)
    if resume:
        check_checkpoint_config(resume, model.config)
    image_size = model.config.image_size

    train_transform, test_transform = build_transforms(image_size, data_args.augmentation)
    seeded_train = SampleSeededTransform(train_transform, seed=training_args.seed)
    seeded_test = SampleSeededTransform(test_transform, seed=None)
    train_dataset = data.splits["train"].with_transform(seeded_train)
    if training_args.dataloader_num_workers > 0:
        # Workers hand batches over as shared-memory files instead of file descriptors passed through a socket to the
        # worker: receiving a batch takes 1.7 ms instead of 2.4 ms on a 2-vCPU VM (bench/bench_trainer.py).
        torch.multiprocessing.set_sharing_strategy("file_system")
    test_dataset = data.splits["test"].with_transform(seeded_test) if "test" in data.splits else None
    eval_dataset = data.splits["eval"].with_transform(seeded_test) if "eval" in data.splits else None

    trainer = IvptTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=make_image_processor(image_size),
        callbacks=[AugmentationEpochCallback(seeded_train)],
        recipe={"source": data.source, **recipe},
        final_eval_dataset=test_dataset if training_args.load_best_model_at_end else None,
    )

    # 4. The output directory gets the code files, config and processor before the first step, so that every Hub
    #    push (which copies only weights and config from checkpoints) carries the remote code.
    if not resume:
        trainer.save_model(training_args.output_dir, _internal_call=True)

    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(_internal_call=True)  # no push yet: the final push follows the evaluation
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()

    results: dict[str, Any] = {}
    if test_dataset is not None:
        results = evaluate_final_and_best(trainer, test_dataset)
        if trainer.args.should_save:
            write_text_atomic(
                os.path.join(training_args.output_dir, "eval_results.json"), json.dumps(results, indent=2) + "\n"
            )
            card_metrics = {f"final_{k}": v for k, v in results["final"].items() if isinstance(v, (int, float))}
            if "best" in results:
                card_metrics.update({f"best_{k}": v for k, v in results["best"].items() if isinstance(v, (int, float))})
            trainer.card_metrics = card_metrics  # also what a final `push_to_hub` puts in the card
            trainer.write_model_card(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="End of training")
    return results


def evaluate_final_and_best(trainer: IvptTrainer, test_dataset) -> dict[str, Any]:
    """Full test-split evaluation of the final model and, when a different best checkpoint was selected, of it."""
    state = trainer.state
    final_step = state.global_step
    best_checkpoint = state.best_model_checkpoint
    best_is_final = best_checkpoint is None or os.path.basename(best_checkpoint) == f"checkpoint-{final_step}"
    results: dict[str, Any] = {"test_split_size": len(test_dataset)}
    loaded_best = trainer.args.load_best_model_at_end and best_checkpoint is not None
    if loaded_best:
        final = trainer.final_metrics or {}
    else:
        final = trainer.evaluate(test_dataset, metric_key_prefix="test")
    results["final"] = {"global_step": final_step, **final}
    if not best_is_final:
        if loaded_best:
            best = trainer.evaluate(test_dataset, metric_key_prefix="test")
        else:
            best_model = IvptForImageClassification.from_pretrained(best_checkpoint)
            evaluator = IvptTrainer(
                model=best_model, args=trainer.args, data_collator=trainer.data_collator,
                compute_metrics=trainer.compute_metrics,
            )
            best = evaluator.evaluate(test_dataset, metric_key_prefix="test")
        results["best"] = {"checkpoint": best_checkpoint, "metric": trainer.args.metric_for_best_model,
                           "selected_on": "eval_split", "score": state.best_metric, **best}
    return results


if __name__ == "__main__":
    main()
