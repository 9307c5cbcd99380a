"""`IvptTrainer`: the IVPT training recipe on top of `transformers.Trainer` (docs/method.md#device-batch-semantics, docs/method.md#optimisation-recipe, docs/method.md#classification-accuracy, docs/method.md#outputs).

What the subclass adds to the stock Trainer:

* the five parameter groups of docs/method.md#parameter-groups / docs/method.md#optimizer-and-schedule (`ivpt_parameter_groups`): backbone with / without weight decay (frozen
  under the recipe), "finer" (class / register / position tokens, prototypes, position biases), "modulation" (part
  LayerNorm, prompt projections, routing heads) and "scratch" (the classifier), each with its own learning-rate factor;
  the normalised weight decay `wd · sqrt(1 / (I · E))` on the backbone-with-decay and scratch groups; Adam (coupled L2)
  by default. Frozen tensors are not handed to the optimizer (the release hands them over; they never get a gradient,
  so nothing changes);
* the epoch-stepped StepLR of docs/method.md#optimizer-and-schedule (`EpochStepDecay`): a `LambdaLR` over optimizer updates that derives the 0-based
  epoch from the update index and the Trainer's own updates-per-epoch count, so it is exact under gradient accumulation
  and resumes exactly through the Trainer's scheduler state;
* every term of the objective (`IvptImageClassifierOutput.loss_terms`, unweighted) logged as `loss_<term>` next to the
  total `loss`, averaged over the micro-batches since the last log and across processes, so the terms reach the
  console, TensorBoard and W&B through `report_to`; the learning rate of every trainable group as
  `learning_rate_<group>`;
* per-process seeds `seed + process_index` for the stochastic parts of the objective (warp, Gumbel noise), as the
  release does (docs/method.md#training-step, docs/method.md#quirks [rank seeds]); the data order stays shared through accelerate's seedable sampler;
* checkpoints that are complete Hub repositories: weights, config, the model's code files, the image processor and a
  generated model card (`README.md`) with the recipe and the latest metrics; every Hub push carries the code files.

Gradient clipping is the Trainer's `max_grad_norm` (2.0 here): the Trainer clips through
`accelerator.clip_grad_norm_`, which unscales fp16 gradients before measuring them, so docs/method.md#quirks [AMP clipping] does not arise.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import EvalPrediction, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..image_processing import make_image_processor
from ..metrics import classification_accuracies
from ..modeling_ivpt import IvptForImageClassification

PARAMETER_GROUPS = ("backbone_decay", "backbone_no_decay", "finer", "modulation", "scratch")
"""Names of the five optimizer groups, in the order of docs/method.md#parameter-groups."""

_BACKBONE_TOKENS = ("cls_token", "reg_token", "pos_embed")


@dataclass
class IvptTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the IVPT recipe's defaults (docs/method.md#optimisation-recipe) and its extra knobs.

    Defaults that differ from `TrainingArguments`: `learning_rate` 1e-6 (the *base* lr of docs/method.md#optimizer-and-schedule), `max_grad_norm` 2.0,
    `num_train_epochs` 25, `per_device_train_batch_size` 4, `weight_decay` 0, `remove_unused_columns` False (the images
    are transformed on the fly), `logging_steps` 50, `save_strategy` "epoch", `report_to` "none".
    """

    learning_rate: float = field(
        default=1e-6, metadata={"help": "Base learning rate (docs/method.md#optimizer-and-schedule); each group multiplies it by its factor."}
    )
    max_grad_norm: float = field(default=2.0, metadata={"help": "Global L2 gradient clipping norm (docs/method.md#training-step)."})
    num_train_epochs: float = field(default=25.0, metadata={"help": "Training epochs (docs/method.md#training-step)."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Images per device batch (docs/method.md#device-batch-semantics)."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Images per device evaluation batch."})
    weight_decay: float = field(
        default=0.0, metadata={"help": "Base weight decay of the normalised formula of docs/method.md#optimizer-and-schedule (recipe: 0)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the images are transformed on the fly (`with_transform`)."}
    )
    logging_steps: float = field(default=50, metadata={"help": "Log every X optimizer updates."})
    save_strategy: str = field(default="epoch", metadata={"help": "Checkpoint strategy: 'no', 'steps' or 'epoch'."})
    report_to: None | str | list[str] = field(
        default="none", metadata={"help": "Loggers: 'tensorboard', 'wandb', 'all' or 'none'."}
    )
    finer_lr_factor: float = field(
        default=2e2, metadata={"help": "lr factor of cls/reg/pos tokens, prototypes and position biases (docs/method.md#optimizer-and-schedule)."}
    )
    modulation_lr_factor: float = field(
        default=1e4, metadata={"help": "lr factor of the part LayerNorm, prompt projections and routing heads (docs/method.md#optimizer-and-schedule)."}
    )
    scratch_lr_factor: float = field(default=1e4, metadata={"help": "lr factor of the classifier (docs/method.md#optimizer-and-schedule)."})
    optimizer_type: str = field(
        default="adam",
        metadata={"help": "'adam' (coupled L2 weight decay, the release) or 'adamw' (decoupled).", "choices": ["adam", "adamw"]},
    )
    epoch_step_schedule: bool = field(
        default=True,
        metadata={"help": "Use the epoch-stepped StepLR of docs/method.md#optimizer-and-schedule; False uses `lr_scheduler_type` instead."},
    )
    lr_decay_epochs: int = field(default=4, metadata={"help": "StepLR period in epochs (docs/method.md#optimizer-and-schedule)."})
    lr_decay_rate: float = field(default=0.5, metadata={"help": "StepLR factor per period (docs/method.md#optimizer-and-schedule)."})
    per_process_seed: bool = field(
        default=True,
        metadata={"help": "Seed each process with `seed + process_index` at the start of training (docs/method.md#training-step, docs/method.md#quirks [rank seeds])."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow training into an `output_dir` that already holds checkpoints without resuming."},
    )
    do_train: bool = field(
        default=True,
        metadata={"help": "False: evaluation-only run of `--model_name_or_path` on `--test_split` (eval_results.json)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.optimizer_type not in ("adam", "adamw"):
            raise ValueError(f"`optimizer_type`: expected 'adam' or 'adamw', got {self.optimizer_type!r}")
        if self.lr_decay_epochs < 1:
            raise ValueError(f"`lr_decay_epochs`: expected a positive number of epochs, got {self.lr_decay_epochs}")
        if not 0 < self.lr_decay_rate <= 1:
            raise ValueError(f"`lr_decay_rate`: expected a factor in (0, 1], got {self.lr_decay_rate}")

    # The Trainer pickles its arguments into every checkpoint (`training_args.bin`) and pushes that file: the pickled
    # form never carries the Hub token. Copies made in the process keep it (it is needed for the pushes).
    def __getstate__(self):
        state = dict(self.__dict__)
        state["hub_token"] = None
        return state

    def __copy__(self):
        copied = object.__new__(type(self))
        copied.__dict__.update(self.__dict__)
        return copied

    def __deepcopy__(self, memo):
        import copy

        copied = object.__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update({key: copy.deepcopy(value, memo) for key, value in self.__dict__.items()})
        return copied


# ----------------------------------------------------------------------------------------------------------------
# Parameter groups (docs/method.md#parameter-groups, docs/method.md#optimizer-and-schedule)
# ----------------------------------------------------------------------------------------------------------------


def _group_of(model: IvptForImageClassification) -> dict[str, str]:
    """Maps every parameter name of `model` to one of `PARAMETER_GROUPS`, by the module it belongs to (docs/method.md#parameter-groups).

    backbone: `cls_token`, `reg_token`, `pos_embed` → finer; everything else → backbone_decay (ndim > 1) or
    backbone_no_decay (ndim == 1). Stages: prototypes and position biases → finer; routing heads and prompt projections
    → modulation; the joint prompt LayerNorm → backbone_decay where it lands in the release (frozen there, docs/method.md#quirks [prompt norm frozen]), or
    modulation when `freeze_prompt_norm_affine=False` makes it trainable. Part LayerNorm (`modulation`) → modulation;
    classifier → scratch.
    """
    groups: dict[str, str] = {}
    base = model.ivpt
    for name, parameter in base.backbone.named_parameters():
        if name in _BACKBONE_TOKENS:
            group = "finer"
        else:
            group = "backbone_decay" if parameter.ndim > 1 else "backbone_no_decay"
        groups[f"ivpt.backbone.{name}"] = group
    for index, stage in enumerate(base.stages):
        prefix = f"ivpt.stages.{index}"
        for name, _ in stage.named_parameters():
            module = name.split(".")[0]
            if module in ("prototypes", "position_bias"):
                group = "finer"
            elif module in ("routing_head", "prompt_projection"):
                group = "modulation"
            elif module == "prompt_norm":
                group = "modulation" if not model.config.freeze_prompt_norm_affine else "backbone_decay"
            else:
                raise ValueError(f"No docs/method.md#parameter-groups parameter group for {prefix}.{name}; extend `ivpt.training.trainer._group_of`")
            groups[f"{prefix}.{name}"] = group
    for name, _ in base.modulation.named_parameters():
        groups[f"ivpt.modulation.{name}"] = "modulation"
    for name, _ in model.classifier.named_parameters():
        groups[f"classifier.{name}"] = "scratch"
    unassigned = [name for name, _ in model.named_parameters() if name not in groups]
    if unassigned:
        raise ValueError(f"No docs/method.md#parameter-groups parameter group for {unassigned}; extend `ivpt.training.trainer._group_of`")
    return groups


def normalised_weight_decay(weight_decay: float, num_train_examples: int, total_batch_size: int, epochs: int) -> float:
    """docs/method.md#optimizer-and-schedule: `weight_decay · sqrt(1 / (I · E))` with `I = floor(num_train_examples / total_batch_size)`."""
    if weight_decay == 0:
        return 0.0
    iterations = num_train_examples // total_batch_size
    if iterations * epochs <= 0:
        raise ValueError(
            f"Normalised weight decay needs at least one update: {num_train_examples} examples, effective batch "
            f"{total_batch_size}, {epochs} epochs"
        )
    return weight_decay * math.sqrt(1.0 / (iterations * epochs))


def ivpt_parameter_groups(
    model: IvptForImageClassification,
    learning_rate: float,
    finer_lr_factor: float = 2e2,
    modulation_lr_factor: float = 1e4,
    scratch_lr_factor: float = 1e4,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """The five optimizer groups of docs/method.md#parameter-groups / docs/method.md#optimizer-and-schedule, in that order, each a dict with `name`, `params` (trainable tensors
    only), `param_names`-free `lr` and `weight_decay`. `weight_decay` is the already-normalised value; it applies to
    `backbone_decay` and `scratch` only. A group whose tensors are all frozen is kept with an empty `params` list so
    that group indices and names are stable."""
    factors = {
        "backbone_decay": 1.0,
        "backbone_no_decay": 1.0,
        "finer": finer_lr_factor,
        "modulation": modulation_lr_factor,
        "scratch": scratch_lr_factor,
    }
    decays = {name: (weight_decay if name in ("backbone_decay", "scratch") else 0.0) for name in PARAMETER_GROUPS}
    assignment = _group_of(model)
    groups = {
        name: {"name": name, "params": [], "lr": learning_rate * factors[name], "weight_decay": decays[name]}
        for name in PARAMETER_GROUPS
    }
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups[assignment[name]]["params"].append(parameter)
    return [groups[name] for name in PARAMETER_GROUPS]


def parameter_group_members(model: IvptForImageClassification) -> dict[str, dict[str, list[str]]]:
    """For reports and tests: per group, the names of its trainable and of its frozen tensors."""
    members = {name: {"trainable": [], "frozen": []} for name in PARAMETER_GROUPS}
    assignment = _group_of(model)
    for name, parameter in model.named_parameters():
        members[assignment[name]]["trainable" if parameter.requires_grad else "frozen"].append(name)
    return members


# ----------------------------------------------------------------------------------------------------------------
# Schedule (docs/method.md#optimizer-and-schedule)
# ----------------------------------------------------------------------------------------------------------------


class EpochStepDecay:
    """lr factor of optimizer update `step` (0-based): `decay_rate ** floor(epoch / decay_epochs)` with the 0-based
    epoch `floor(step / steps_per_epoch)`, i.e. epochs 1–4 ×1, 5–8 ×0.5, ... for the recipe (docs/method.md#optimizer-and-schedule).

    A callable object (not a lambda) so that `LambdaLR.state_dict` stores its fields with the checkpoint.
    """

    def __init__(self, steps_per_epoch: int, decay_epochs: int = 4, decay_rate: float = 0.5):
        if steps_per_epoch < 1:
            raise ValueError(f"`steps_per_epoch`: expected a positive number of updates, got {steps_per_epoch}")
        self.steps_per_epoch = int(steps_per_epoch)
        self.decay_epochs = int(decay_epochs)
        self.decay_rate = float(decay_rate)

    def __call__(self, step: int) -> float:
        epoch = step // self.steps_per_epoch
        return self.decay_rate ** (epoch // self.decay_epochs)


# ----------------------------------------------------------------------------------------------------------------
# Metrics (docs/method.md#classification-accuracy)
# ----------------------------------------------------------------------------------------------------------------


def compute_classification_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
    """Top-1 / top-5, micro and macro, in percent (docs/method.md#classification-accuracy), plus `num_samples`, for `Trainer(compute_metrics=...)`.

    The Trainer gathers predictions with `accelerator.gather_for_metrics`, which drops the samples that the
    distributed sampler repeats to even out the last batch, so each image counts exactly once.
    """
    logits = eval_prediction.predictions
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    logits = torch.as_tensor(np.asarray(logits)).float()
    labels = torch.as_tensor(np.asarray(eval_prediction.label_ids)).long()
    top_k = [k for k in (1, 5) if k <= logits.shape[1]]
    metrics = classification_accuracies(logits, labels, top_k=top_k)
    metrics["num_samples"] = int(labels.numel())
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------------------------


def render_model_card(config, recipe: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> str:
    """A Hub model card (`README.md`) describing an IVPT checkpoint, its training recipe and its metrics."""
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-classification",
        "tags:",
        "- ivpt",
        "- part-prototypes",
        "- interpretability",
        "- custom_code",
        "---",
        "",
        "# IVPT: interpretable visual prompt tuning with part prototypes",
        "",
        f"Backbone `{config.backbone}` at {config.image_size} px, prototypes per stage `{config.n_pro}` "
        f"({config.num_parts} parts), {config.num_labels} classes. Trained with `ivpt.IvptTrainer` "
        "(Interpretable Visual Prompt Tuning, arXiv 2503.06084).",
        "",
        "```python",
        "from transformers import AutoImageProcessor, AutoModelForImageClassification",
        "model = AutoModelForImageClassification.from_pretrained(REPO, trust_remote_code=True)",
        "processor = AutoImageProcessor.from_pretrained(REPO)",
        "```",
        "",
    ]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [
            f"| {key} | {_format(value)} |" for key, value in sorted(metrics.items())
            if not any(noise in key for noise in ("runtime", "per_second"))
        ]
        lines.append("")
    if recipe:
        lines += ["## Training recipe", "", "```json", json.dumps(recipe, indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)


def _format(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_text_atomic(path: str, text: str) -> None:
    """Writes `text` to `path` (mode 0644) through a temporary file and a rename."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------


class _PerProcessSeed(TrainerCallback):
    """Re-seeds `random`, numpy and torch with `seed + process_index` when training starts (after the Trainer's own
    `set_seed`; a resumed run then restores each process's saved RNG state on top)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if getattr(args, "per_process_seed", False):
            seed = args.seed + args.process_index
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)


class IvptTrainer(Trainer):
    """`transformers.Trainer` with the IVPT recipe (see the module docstring).

    Use with [`IvptTrainingArguments`] (plain `TrainingArguments` work too: the recipe's lr factors, schedule and
    seeding then take their defaults) and an [`IvptForImageClassification`]. `compute_metrics` defaults to
    [`compute_classification_metrics`] and `processing_class` to the model's image processor. Extra keyword arguments:

    Args:
        recipe (`dict`, *optional*):
            The recipe to print in the generated model cards (e.g. the parsed command line).
        final_eval_dataset (`Dataset`, *optional*):
            With `load_best_model_at_end`, the final weights are evaluated on it (prefix `test`) before the best ones
            are loaded; the result is kept in `final_metrics`.
    """

    # The model returns a per-batch mean; the Trainer divides it by the accumulation steps itself.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, recipe: dict[str, Any] | None = None, final_eval_dataset=None, **kwargs):
        kwargs.setdefault("compute_metrics", compute_classification_metrics)
        model = kwargs.get("model", args[0] if args else None)
        if kwargs.get("processing_class") is None and model is not None:
            kwargs["processing_class"] = make_image_processor(model.config.image_size)  # saved with every checkpoint
        super().__init__(*args, **kwargs)
        # The forward takes **kwargs, but does not normalise by `num_items_in_batch`.
        self.model_accepts_loss_kwargs = False
        self.recipe = dict(recipe or {})
        self.final_eval_dataset = final_eval_dataset
        self.final_metrics: dict[str, float] | None = None
        self.card_metrics: dict[str, Any] = {}
        self._num_update_steps_per_epoch: int | None = None
        self._loss_term_sums: dict[str, torch.Tensor] = {}
        self._loss_term_count = 0
        self._trainable_parameters = self._trainable_owner = self._num_parameters = None
        self.add_callback(_PerProcessSeed())

    def _arg(self, name: str, default: Any) -> Any:
        return getattr(self.args, name, default)

    # ---- optimizer and schedule -------------------------------------------------------------------------------

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        self._num_update_steps_per_epoch = values[1]
        self._num_train_epochs = values[0]
        return values

    def num_update_steps_per_epoch(self) -> int:
        """Optimizer updates per epoch, as the Trainer counts them: `ceil(len(train_dataloader) / accumulation)`."""
        if self._num_update_steps_per_epoch is None:
            batches = len(self.get_train_dataloader())
            accumulation = self.args.gradient_accumulation_steps
            self._num_update_steps_per_epoch = max(math.ceil(batches / accumulation), 1)
        return self._num_update_steps_per_epoch

    def _training_epochs(self) -> int:
        if self.args.max_steps > 0:
            return math.ceil(self.args.max_steps / self.num_update_steps_per_epoch())
        return math.ceil(self.args.num_train_epochs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """Adam (or AdamW) over the five docs/method.md#parameter-groups groups with the docs/method.md#optimizer-and-schedule learning rates and normalised weight decay."""
        if self.optimizer is not None:
            return self.optimizer
        if self.optimizer_cls_and_kwargs is not None:
            return super().create_optimizer(model)
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not isinstance(unwrapped, IvptForImageClassification):
            raise TypeError(f"IvptTrainer: expected an IvptForImageClassification, got {type(unwrapped).__name__}")
        weight_decay = 0.0
        if self.args.weight_decay:
            weight_decay = normalised_weight_decay(
                self.args.weight_decay,
                len(self.train_dataset),
                self.get_total_train_batch_size(self.args),
                self._training_epochs(),
            )
        groups = ivpt_parameter_groups(
            unwrapped,
            self.args.learning_rate,
            finer_lr_factor=self._arg("finer_lr_factor", 2e2),
            modulation_lr_factor=self._arg("modulation_lr_factor", 1e4),
            scratch_lr_factor=self._arg("scratch_lr_factor", 1e4),
            weight_decay=weight_decay,
        )
        optimizer_cls = torch.optim.AdamW if self._arg("optimizer_type", "adam") == "adamw" else torch.optim.Adam
        self.optimizer = optimizer_cls(
            groups, lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
        )
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """The epoch-stepped StepLR of docs/method.md#optimizer-and-schedule (same factor for every group), unless `epoch_step_schedule=False`."""
        if self.lr_scheduler is None and self._arg("epoch_step_schedule", True):
            optimizer = optimizer if optimizer is not None else self.optimizer
            decay = EpochStepDecay(
                self.num_update_steps_per_epoch(), self._arg("lr_decay_epochs", 4), self._arg("lr_decay_rate", 0.5)
            )
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
            self._created_lr_scheduler = True
        return super().create_scheduler(num_training_steps, optimizer)

    # ---- loss and logging -------------------------------------------------------------------------------------

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch=None):
        """The model's own objective (`outputs.loss`); its unweighted terms are accumulated for logging."""
        outputs = model(**inputs)
        if outputs.loss is None:
            raise ValueError(f"IvptTrainer: the model returned no loss; the batch needs `labels`, got {sorted(inputs)}")
        if model.training and outputs.loss_terms:
            for name, value in outputs.loss_terms.items():
                value = value.detach().float()
                total = self._loss_term_sums.get(name)
                self._loss_term_sums[name] = value if total is None else total + value
            self._loss_term_count += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds `loss_<term>` (mean over the micro-batches since the last training log, then over processes) and the
        learning rate of every trainable group to training logs (those that carry the running `loss`)."""
        if "loss" in logs:
            if self._loss_term_sums:
                names = sorted(self._loss_term_sums)
                means = torch.stack([self._loss_term_sums[name] for name in names]) / max(self._loss_term_count, 1)
                means = self.accelerator.reduce(means.to(self.args.device), reduction="mean")
                logs.update({f"loss_{name}": value for name, value in zip(names, means.tolist())})
            self._loss_term_sums, self._loss_term_count = {}, 0
            if self.optimizer is not None:
                for group in self.optimizer.param_groups:
                    if group.get("name") and group["params"]:
                        logs[f"learning_rate_{group['name']}"] = float(group["lr"])
        super().log(logs, start_time)
        if any(key.startswith("eval_") for key in logs):
            self.card_metrics.update({key: value for key, value in logs.items() if key.startswith("eval_")})

    # ---- data ---------------------------------------------------------------------------------------------------

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False,
                        dataloader_key=None):
        """`dataloader_drop_last` applies to training batches only: evaluation counts every sample."""
        if is_training or not self.args.dataloader_drop_last:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)
        self.args.dataloader_drop_last = False
        try:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)
        finally:
            self.args.dataloader_drop_last = True

    # ---- per-step bookkeeping, made cheap ---------------------------------------------------------------------

    def _clip_grad_norm(self, model):
        """Clips over the trainable tensors only (the frozen backbone has no gradients, so the norm is the same),
        through `accelerator.clip_grad_norm_`, which unscales fp16 gradients first (docs/method.md#quirks [AMP clipping])."""
        if self._trainable_parameters is None or self._trainable_owner is not model:
            self._trainable_parameters = [p for p in model.parameters() if p.requires_grad]
            self._trainable_owner = model
        if self._has_mixed_mesh_grads(model) or self.is_deepspeed_enabled:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(self._trainable_parameters, self.args.max_grad_norm)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's `6 · input elements · parameters` estimate with the parameter count cached (the stock one
        walks every parameter at each micro-batch)."""
        if self._num_parameters is None:
            self._num_parameters = self.accelerator.unwrap_model(self.model).num_parameters(exclude_embeddings=True)
        pixel_values = inputs.get("pixel_values")
        return 6 * (pixel_values.numel() if pixel_values is not None else 0) * self._num_parameters

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """`save_pretrained` (weights, config, code files), the image processor, and a generated model card."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            self.write_model_card(output_dir)
            for name in os.listdir(output_dir):  # safetensors writes 0600 files: make the saved model readable
                path = os.path.join(output_dir, name)
                if os.path.isfile(path):
                    os.chmod(path, 0o644)

    def write_model_card(self, output_dir: str, metrics: dict[str, Any] | None = None) -> None:
        """Writes `README.md` (recipe + `metrics`, or the latest evaluation metrics) into `output_dir`."""
        config = self.accelerator.unwrap_model(self.model).config
        card = render_model_card(config, self.recipe, metrics if metrics is not None else self.card_metrics)
        write_text_atomic(os.path.join(output_dir, "README.md"), card)

    def create_model_card(self, **kwargs) -> None:
        """`push_to_hub` calls this before the final upload: write the IVPT card (recipe and `card_metrics`) instead of
        the stock `TrainingSummary` card, which would replace it. The stock card's arguments (tags, dataset, ...) are
        not used."""
        if self.is_world_process_zero():
            self.write_model_card(self.args.output_dir)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """The stock push copies only config and weights into `output_dir`: also copy the code files and the model
        card, so every push carries the remote code."""
        if self.is_world_process_zero():
            for name in os.listdir(checkpoint_folder):
                if name.endswith(".py") or name == "README.md":
                    shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(self.args.output_dir, name))
        super()._push_from_checkpoint(checkpoint_folder)

    def _load_best_model(self) -> None:
        if self.final_eval_dataset is not None:
            self.final_metrics = self.evaluate(self.final_eval_dataset, metric_key_prefix="test")
        super()._load_best_model()


def last_checkpoint_step(checkpoint_dir: str) -> int | None:
    """The global step encoded in a `checkpoint-<step>` folder name, or None."""
    name = os.path.basename(os.path.normpath(checkpoint_dir))
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    return int(name[len(prefix):]) if name.startswith(prefix) and name[len(prefix):].isdigit() else None


__all__ = [
    "PARAMETER_GROUPS",
    "EpochStepDecay",
    "IvptTrainer",
    "IvptTrainingArguments",
    "compute_classification_metrics",
    "ivpt_parameter_groups",
    "normalised_weight_decay",
    "parameter_group_members",
    "render_model_card",
]
