"""The training workflow as a function: `train(...)` / `main(argv)`; `ivpt-train` and `train_ivpt.py` call `cli()`.

    ivpt-train configs/cub_ivpt.yaml --data_dir /data/CUB_200_2011.tgz --backbone_weights dinov2.safetensors

Order of work: (1) checks that touch nothing (flags, paths, the checkpoint to resume, the output folder); (2) the data,
validated; (3) the model (pretrained backbone from the Hub or a local file, or a saved IVPT model with its classifier
matched to the dataset's labels by name), checked against the checkpoint to resume; (4) training; (5) the final model
saved to `--output_dir` (each file written atomically) and evaluated on the full test split (`eval_results.json`).
With `--do_train false` the run evaluates `--model_name_or_path` on the test split instead (steps 1-3, then 5).
Every problem before step 4 raises `TrainingError` naming the flag, file or value, and nothing is written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from typing import Any

import torch
import transformers
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..configuration_ivpt import IvptConfig
from ..image_processing import make_image_processor
from ..modeling_ivpt import IvptForImageClassification, _looks_like_local_path
from .arguments import DataArguments, ModelArguments, config_field_names, parse_arguments
from .data import (
    AugmentationEpochCallback, SampleSeededTransform, build_transforms, check_data_source, load_raw_dataset,
    prepare_splits,
)
from .errors import MissingPathError, TrainingError
from .trainer import IvptTrainer, IvptTrainingArguments, write_text_atomic

logger = logging.getLogger("ivpt.training")

LATEST = ("latest", "True", "true")
# IVPT fields that define the architecture or the loaded tensors: a saved model given with `--model_name_or_path`
# keeps them (a different value on the command line is an error); the other fields (loss weights, routing) apply.
ARCHITECTURE_FIELDS = ("backbone", "backbone_kwargs", "image_size", "n_pro", "freeze_backbone",
                       "freeze_prompt_norm_affine", "prototype_init_std")
_SECRET_KEY = re.compile(r"token|password|secret|api_?key|credential", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------------------------
# 1. Checks that touch nothing
# ----------------------------------------------------------------------------------------------------------------


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args: IvptTrainingArguments,
                    given: dict[str, Any]) -> None:
    """Everything that can be checked before touching data or the output directory."""
    sources = [flag for flag in ("backbone_weights", "model_name_or_path") if getattr(model_args, flag)]
    sources += ["random_backbone"] if model_args.random_backbone else []
    if len(sources) > 1:
        raise TrainingError(f"Give at most one of `--backbone_weights`, `--random_backbone`, `--model_name_or_path`; "
                            f"got {', '.join('--' + flag for flag in sources)}")
    if model_args.backbone_weights and not os.path.isfile(model_args.backbone_weights):
        raise MissingPathError(f"`--backbone_weights`: no such file {model_args.backbone_weights!r}")
    if data_args.data_dir is not None and not os.path.exists(data_args.data_dir):
        raise MissingPathError(f"`--data_dir`: no such file or directory {data_args.data_dir!r}")
    check_data_source(data_args.data_dir, data_args.dataset_name)
    source = model_args.model_name_or_path
    if source and not os.path.isdir(source) and (os.path.exists(source) or _looks_like_local_path(source)):
        problem = "is a file, not a directory" if os.path.exists(source) else "no such directory"
        raise MissingPathError(f"`--model_name_or_path` {source!r}: {problem} (expected a saved model folder or a "
                               "Hub model id)")
    if not training_args.do_train:
        if not model_args.model_name_or_path:
            raise TrainingError("`--do_train false` evaluates a saved model: give it with `--model_name_or_path`")
        if training_args.resume_from_checkpoint:
            raise TrainingError("`--do_train false` does not train: drop `--resume_from_checkpoint` (evaluate a "
                                "checkpoint folder with `--model_name_or_path`)")
        if not data_args.test_split:
            raise TrainingError("`--do_train false` evaluates on `--test_split`, which is empty")
    evaluates = getattr(training_args.eval_strategy, "value", training_args.eval_strategy) != "no"
    if (evaluates or training_args.load_best_model_at_end) and not data_args.eval_split:
        raise TrainingError(
            "Periodic evaluation / best-model selection needs the split named explicitly with `--eval_split` "
            "(e.g. `--validation_fraction 0.1 --eval_split validation`); it never defaults to the test split"
        )
    if data_args.validation_fraction and data_args.eval_split not in (None, "validation"):
        logger.warning("`--validation_fraction` creates split 'validation', but `--eval_split` is %r",
                       data_args.eval_split)
    resume = training_args.resume_from_checkpoint
    if resume and resume not in LATEST and not os.path.isdir(resume):
        raise MissingPathError(f"`--resume_from_checkpoint`: no such checkpoint directory {resume!r}")
    check_launch(training_args)
    if model_args.model_name_or_path:
        return
    try:  # the model arguments, validated by the config itself
        config = IvptConfig(**model_args.config_kwargs())
    except (ValueError, TypeError) as error:
        raise TrainingError(f"Model arguments: {error}") from None
    if not model_args.backbone_weights and not model_args.random_backbone:
        check_pretrained_backbone_reachable(config.backbone)


def check_launch(training_args: IvptTrainingArguments) -> None:
    """A multi-process launch that did not set up distributed training would run independent copies of the whole
    training into the same folder: on a machine without GPU that happens without `--use_cpu true`."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size == 1:
        raise TrainingError(
            f"The launcher started {launched} processes, but they are not set up as one distributed run (no GPU "
            "here and `--use_cpu` is not set), so each would train on its own: add `--use_cpu true` for "
            "distributed training on CPU, or launch a single process"
        )


def check_pretrained_backbone_reachable(backbone: str) -> None:
    """Offline, timm can only load `backbone`'s pretrained weights from the local Hub cache: if they are not there,
    stop now, naming the two ways out."""
    import huggingface_hub
    import timm

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        return
    pretrained = timm.models.get_pretrained_cfg(backbone)
    hub_id = getattr(pretrained, "hf_hub_id", None) if pretrained is not None else None
    if hub_id:
        for filename in ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"):
            if isinstance(huggingface_hub.try_to_load_from_cache(hub_id, filename), str):
                return
    raise TrainingError(
        f"`--backbone {backbone}`: its pretrained weights are not in the local cache and the Hub is offline "
        "(HF_HUB_OFFLINE): give a local timm weight file with `--backbone_weights FILE`, or pass "
        "`--random_backbone true` for a randomly initialised backbone (tests only)"
    )


def is_complete_checkpoint(folder: str, world_size: int = 1) -> bool:
    """A checkpoint the Trainer finished writing: it writes `trainer_state.json` last, after the weights, the
    optimizer, the scheduler and the RNG state of every process (a kill or a full disk leaves one of them missing,
    empty or truncated)."""

    def non_empty(name):
        return os.path.isfile(os.path.join(folder, name)) and os.path.getsize(os.path.join(folder, name)) > 0

    try:
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as handle:
            json.load(handle)
    except (OSError, ValueError):
        return False
    if not (non_empty("config.json") and non_empty("model.safetensors")):
        return False
    if os.path.exists(os.path.join(folder, "optimizer.pt")):  # absent only with --save_only_model
        rng = ["rng_state.pth"] if world_size == 1 else [f"rng_state_{rank}.pth" for rank in range(world_size)]
        return all(non_empty(name) for name in ["optimizer.pt", "scheduler.pt", *rng])
    return True


def latest_complete_checkpoint(output_dir: str, world_size: int = 1) -> tuple[str | None, list[str]]:
    """(newest complete `checkpoint-N` folder of `output_dir` or None, the newer incomplete ones skipped)."""
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    steps = sorted(
        (int(match.group(1)), name) for name in os.listdir(output_dir)
        if (match := pattern.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    ) if os.path.isdir(output_dir) else []
    skipped = []
    for _, name in reversed(steps):
        folder = os.path.join(output_dir, name)
        if is_complete_checkpoint(folder, world_size):
            return folder, skipped
        skipped.append(name)
    return None, skipped


def resolve_resume(training_args: IvptTrainingArguments) -> str | None:
    """The checkpoint to resume from: a directory, or the newest complete one of `output_dir` for `latest`."""
    resume = training_args.resume_from_checkpoint
    if not resume:
        return None
    world_size = training_args.world_size
    if resume in LATEST:
        last, skipped = latest_complete_checkpoint(training_args.output_dir, world_size)
        if skipped:
            logger.warning("`--resume_from_checkpoint latest`: skipping incomplete checkpoint(s) %s", skipped)
        if last is None:
            raise MissingPathError(
                f"`--resume_from_checkpoint {resume}`: no complete checkpoint-* folder in `--output_dir` "
                f"{training_args.output_dir!r}" + (f" (incomplete: {skipped})" if skipped else "")
            )
        return last
    if not is_complete_checkpoint(resume, world_size):
        raise TrainingError(f"`--resume_from_checkpoint`: {resume!r} is incomplete (no trainer_state.json, or missing "
                            "or empty weights, optimizer, scheduler or RNG files)")
    return resume


def check_output_dir(training_args: IvptTrainingArguments, resume: str | None) -> None:
    output_dir = training_args.output_dir
    if resume or training_args.overwrite_output_dir or not os.path.isdir(output_dir):
        return
    has_checkpoint = any(re.match(rf"^{PREFIX_CHECKPOINT_DIR}-\d+$", name) for name in os.listdir(output_dir))
    if has_checkpoint or os.path.isfile(os.path.join(output_dir, "eval_results.json")):
        raise TrainingError(
            f"`--output_dir` {output_dir!r} already holds a training run; resume it with `--resume_from_checkpoint "
            "latest`, choose another directory, or pass `--overwrite_output_dir true`"
        )


def check_checkpoint_config(checkpoint: str, config: IvptConfig) -> None:
    """Refuses to resume from a checkpoint whose model differs from the one requested: compares the IVPT fields of
    the config and the number of labels (not the bookkeeping fields of `PretrainedConfig`)."""
    path = os.path.join(checkpoint, "config.json")
    if not os.path.isfile(path):
        raise MissingPathError(f"`--resume_from_checkpoint`: {checkpoint!r} has no config.json")
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)
    if saved.get("model_type") != IvptConfig.model_type:
        raise TrainingError(f"`--resume_from_checkpoint`: {path} is a {saved.get('model_type')!r} model, not 'ivpt'")
    try:
        saved_config = IvptConfig.from_dict(saved)
    except (ValueError, TypeError) as error:
        raise TrainingError(f"`--resume_from_checkpoint`: {path}: {error}") from None
    differences = [
        f"{name}: checkpoint {getattr(saved_config, name)!r} vs requested {getattr(config, name)!r}"
        for name in [*config_field_names(), "num_labels"]
        if getattr(saved_config, name) != getattr(config, name)
    ]
    if differences:
        raise TrainingError(
            f"`--resume_from_checkpoint`: {checkpoint!r} was trained with another model configuration: "
            + "; ".join(differences)
        )


# ----------------------------------------------------------------------------------------------------------------
# 3. The model
# ----------------------------------------------------------------------------------------------------------------


def build_model(model_args: ModelArguments, label_names: list[str], given: dict[str, Any]) -> IvptForImageClassification:
    """A saved IVPT model (`--model_name_or_path`, labels matched by name), or a new one on a pretrained backbone
    (`--backbone` from the Hub, `--backbone_weights` from a file) or, with `--random_backbone`, a random one."""
    labels = {"id2label": dict(enumerate(label_names)), "label2id": {name: i for i, name in enumerate(label_names)}}
    if model_args.model_name_or_path:
        return load_saved_model(model_args, label_names, given)
    kwargs = {**model_args.config_kwargs(), **labels}
    if model_args.random_backbone:
        logger.warning("--random_backbone: the frozen backbone is randomly initialised (only useful for tests)")
        return IvptForImageClassification(IvptConfig(**kwargs))
    backbone = kwargs.pop("backbone")
    try:
        return IvptForImageClassification.from_backbone(backbone, backbone_weights=model_args.backbone_weights,
                                                        **kwargs)
    except (OSError, RuntimeError, ValueError) as error:
        source = (f"`--backbone_weights {model_args.backbone_weights}`" if model_args.backbone_weights
                  else f"`--backbone {backbone}` (timm's pretrained weights from the Hub)")
        raise TrainingError(
            f"Cannot load the backbone weights of {source}: {error}. Give a local timm weight file of this "
            "architecture with `--backbone_weights FILE`, or `--random_backbone true` (tests only)"
        ) from None


def load_saved_model(model_args: ModelArguments, label_names: list[str], given: dict[str, Any]):
    """`--model_name_or_path`: the saved model with the IVPT fields given on the command line applied (those of
    `ARCHITECTURE_FIELDS` must equal the saved ones) and its classifier matched to the dataset's labels by name."""
    source = model_args.model_name_or_path
    try:
        config = IvptConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise TrainingError(f"`--model_name_or_path`: cannot load an IVPT config from {source!r}: {error}") from None
    requested = model_args.config_kwargs()
    overrides = {name: requested[name] for name in config_field_names() if name in given}
    conflicts = []
    for name, value in overrides.items():
        if name in ARCHITECTURE_FIELDS:
            wanted = getattr(IvptConfig(**{**_ivpt_fields(config), name: value}), name)  # normalised (e.g. n_pro)
            if wanted != getattr(config, name):
                conflicts.append(f"{name}: saved {getattr(config, name)!r}, requested {wanted!r}")
    if conflicts:
        raise TrainingError(f"`--model_name_or_path`: {source!r} is another architecture than the flags ask for: "
                            + "; ".join(conflicts))
    model = IvptForImageClassification.from_pretrained(source)
    for name, value in overrides.items():
        if name not in ARCHITECTURE_FIELDS:
            setattr(model.config, name, value)
    return match_labels(model, label_names, f"`--model_name_or_path` {source!r}")


def _ivpt_fields(config: IvptConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config_field_names()}


def match_labels(model: IvptForImageClassification, label_names: list[str], source: str):
    """Makes class `i` of the model the dataset's class `i`: nothing to do when the label names agree; the same names
    in another order permute the classifier rows; anything else is an error (never wrong label names)."""
    saved = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if saved == list(label_names):
        return model
    if sorted(saved) != sorted(label_names) or len(set(saved)) != len(saved):
        missing = sorted(set(label_names) - set(saved))[:5]
        extra = sorted(set(saved) - set(label_names))[:5]
        raise TrainingError(
            f"{source} was trained on {len(saved)} classes, the dataset has {len(label_names)} and their names differ "
            f"(dataset only: {missing}, model only: {extra}); start a new model on this dataset from a backbone "
            "(`--backbone_weights`) instead"
        )
    order = [saved.index(name) for name in label_names]
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight[order].clone())  # (classes, hidden): rows are classes
    model.config.id2label = dict(enumerate(label_names))
    model.config.label2id = {name: i for i, name in enumerate(label_names)}
    logger.info("%s: classifier rows reordered to the dataset's label order", source)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


def card_recipe(given: dict[str, Any], source: str) -> dict[str, Any]:
    """The recipe printed in model cards: no secrets (keys like `hub_token` are dropped), and local paths reduced to
    their last component."""
    recipe = {"source": source}
    for key, value in given.items():
        if _SECRET_KEY.search(key):
            continue
        if isinstance(value, str) and (os.path.isabs(value) or os.path.exists(value)):
            value = os.path.basename(os.path.normpath(value))
        recipe[key] = value
    return recipe


def save_final_model(trainer: IvptTrainer, output_dir: str) -> None:
    """`save_model` into a temporary folder of `output_dir`, then each file renamed into place: a crash never leaves a
    half-written model where the result is expected."""
    temporary = os.path.join(output_dir, ".final-model.tmp")
    if trainer.args.should_save and os.path.isdir(temporary):
        shutil.rmtree(temporary)
    trainer.save_model(temporary, _internal_call=True)
    if trainer.args.should_save:
        for name in sorted(os.listdir(temporary)):
            os.replace(os.path.join(temporary, name), os.path.join(output_dir, name))
        os.rmdir(temporary)
    trainer.accelerator.wait_for_everyone()


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
        results["best"] = {"checkpoint": os.path.basename(best_checkpoint), "metric": trainer.args.metric_for_best_model,
                           "selected_on": "eval_split", "score": state.best_metric, **best}
    return results


def write_results(trainer: IvptTrainer, output_dir: str, results: dict[str, Any]) -> None:
    if not trainer.args.should_save:
        return
    os.makedirs(output_dir, exist_ok=True)
    write_text_atomic(os.path.join(output_dir, "eval_results.json"), json.dumps(results, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# The workflow
# ----------------------------------------------------------------------------------------------------------------


def train(model_args: ModelArguments, data_args: DataArguments, training_args: IvptTrainingArguments,
          given: dict[str, Any] | None = None) -> dict[str, Any]:
    """Runs the workflow of the module docstring; returns what it writes to `eval_results.json` (or `{}` without a
    test split). `given` holds the flags set explicitly (recipe and command line): they go into the model card."""
    given = dict(given or {})
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    logger.setLevel(training_args.get_process_log_level())

    # 1. Checks that touch nothing.
    check_arguments(model_args, data_args, training_args, given)
    resume = resolve_resume(training_args)
    if training_args.do_train:
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
    model = build_model(model_args, data.label_names, given)
    if resume:
        check_checkpoint_config(resume, model.config)
    image_size = model.config.image_size
    train_transform, test_transform = build_transforms(image_size, data_args.augmentation)
    seeded_train = SampleSeededTransform(train_transform, seed=training_args.seed)
    seeded_test = SampleSeededTransform(test_transform, seed=None)
    if training_args.dataloader_num_workers > 0:
        # Workers hand batches over as shared-memory files instead of file descriptors passed through a socket to the
        # worker: receiving a batch takes 1.7 ms instead of 2.4 ms on a 2-vCPU VM (bench/bench_trainer.py).
        torch.multiprocessing.set_sharing_strategy("file_system")
    test_dataset = data.splits["test"].with_transform(seeded_test) if "test" in data.splits else None
    eval_dataset = data.splits["eval"].with_transform(seeded_test) if "eval" in data.splits else None

    trainer = IvptTrainer(
        model=model,
        args=training_args,
        train_dataset=data.splits["train"].with_transform(seeded_train) if training_args.do_train else None,
        eval_dataset=eval_dataset,
        processing_class=make_image_processor(image_size),
        callbacks=[AugmentationEpochCallback(seeded_train)],
        recipe=card_recipe(given, data.source),
        final_eval_dataset=test_dataset if training_args.load_best_model_at_end else None,
    )
    output_dir = training_args.output_dir

    if not training_args.do_train:  # evaluation only
        metrics = trainer.evaluate(test_dataset, metric_key_prefix="test")
        results = {"test_split_size": len(test_dataset),
                   "model": os.path.basename(os.path.normpath(model_args.model_name_or_path)), "final": metrics}
        write_results(trainer, output_dir, results)
        return results

    # 4. Training (checkpoints as the Trainer writes them; nothing in `output_dir` itself before the end).
    train_result = trainer.train(resume_from_checkpoint=resume)

    # 5. The final model, its test evaluation and card.
    os.makedirs(output_dir, exist_ok=True)
    save_final_model(trainer, output_dir)  # no push yet: the final push follows the evaluation
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()
    results: dict[str, Any] = {}
    if test_dataset is not None:
        results = evaluate_final_and_best(trainer, test_dataset)
        write_results(trainer, output_dir, results)
        if trainer.args.should_save:
            card_metrics = {f"final_{k}": v for k, v in results["final"].items() if isinstance(v, (int, float))}
            if "best" in results:
                card_metrics.update({f"best_{k}": v for k, v in results["best"].items() if isinstance(v, (int, float))})
            trainer.card_metrics = card_metrics  # also what a final `push_to_hub` puts in the card
            trainer.write_model_card(output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="End of training")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parses `argv` (an optional recipe file, then flags) and runs `train`. Raises `TrainingError` on bad input."""
    model_args, data_args, training_args, given = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return train(model_args, data_args, training_args, given)


def cli(argv: list[str] | None = None) -> None:
    """Console entry point (`ivpt-train`, `train_ivpt.py`): a `TrainingError` is printed, exit status 2."""
    try:
        main(argv)
    except TrainingError as error:
        print(f"ivpt-train: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        # Under `accelerate launch`, leave the process group before the interpreter exits: left to exit-time
        # teardown, gloo's threads can abort a rank ("terminate called without an active exception", exit -6)
        # after all work is done.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


__all__ = ["card_recipe", "cli", "latest_complete_checkpoint", "main", "match_labels", "train"]
