"""PyTorch IVPT: Interpretable Visual Prompt Tuning with cross-layer part prototypes.

Spec: docs/method.md#forward-pass (forward), docs/method.md#outputs (outputs), docs/method.md#objective (objective), docs/method.md#equivalent-forms (the faster equivalent forms used
here). Ships to the Hub: imports only torch, timm, transformers and the package's shipped files (relative).
"""

from dataclasses import dataclass
import json
import os
import warnings

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_ivpt import IvptConfig
from .losses import ivpt_objective, sample_equivariance_warp, unwarp_source_index, unwarp_stage_maps, warp_images


@dataclass
class IvptModelOutput(ModelOutput):
    """
    Args:
        part_features (`torch.FloatTensor` of shape `(batch_size, hidden_size, num_parts + 1)`):
            Modulated features of the final parts, background column last (docs/method.md#final-parts-and-classification).
        interpretation_maps (`torch.FloatTensor` of shape `(batch_size, num_prototypes, height, width)`):
            Assignment maps of the stage `config.interpretation_stage_index`, evaluated by the interpretability metrics.
        assignment_maps (`tuple(torch.FloatTensor)`):
            One map per stage, `(batch_size, n_pro[s], height, width)`, summing to 1 over prototypes (docs/method.md#prototype-assignment-maps "eps").
        projected_maps (`tuple(torch.FloatTensor)`):
            Intermediate stage maps routed onto the final parts, `(batch_size, num_parts + 1, height * width)`, then the
            final map flattened (docs/method.md#projected-maps).
        routing_weights (`tuple(torch.FloatTensor)`):
            Soft assignment of each intermediate foreground prototype to the final parts, `(batch_size, n_pro[s] - 1,
            num_parts)` (docs/method.md#routing-to-the-final-parts).
    """

    part_features: torch.FloatTensor | None = None
    interpretation_maps: torch.FloatTensor | None = None
    assignment_maps: tuple[torch.FloatTensor, ...] | None = None
    projected_maps: tuple[torch.FloatTensor, ...] | None = None
    routing_weights: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class IvptImageClassifierOutput(ModelOutput):
    """
    Fields in the order of every transformers classifier output: `loss`, `logits` first (so `outputs[0]`,
    `to_tuple()` and `return_dict=False` behave as usual), then the IVPT outputs.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
            In training mode the full IVPT objective of docs/method.md#objective (second, warped pass included); in eval mode the
            cross-entropy.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Mean of `part_logits` over the parts.
        part_logits (`torch.FloatTensor` of shape `(batch_size, num_labels, num_parts)`):
            Class scores of each foreground part.
        part_features, interpretation_maps, assignment_maps, projected_maps, routing_weights:
            As in [`IvptModelOutput`].
        loss_terms (`dict[str, torch.FloatTensor]`, *optional*, returned when `labels` is given):
            The unweighted loss terms (`ivpt.losses.LOSS_TERMS` in training mode, `classification` in eval mode).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    part_logits: torch.FloatTensor | None = None
    part_features: torch.FloatTensor | None = None
    interpretation_maps: torch.FloatTensor | None = None
    assignment_maps: tuple[torch.FloatTensor, ...] | None = None
    projected_maps: tuple[torch.FloatTensor, ...] | None = None
    routing_weights: tuple[torch.FloatTensor, ...] | None = None
    loss_terms: dict[str, torch.FloatTensor] | None = None


class CheckpointError(OSError):
    """A checkpoint that cannot be loaded as it is; the message names the path or file."""


def _looks_like_local_path(path: str) -> bool:
    """Absolute, relative to `.`/`~`, or deeper than a Hub `namespace/name` id."""
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or "\\" in path


def _check_checkpoint_path(path: str, subfolder: str, config_given: bool) -> None:
    """Errors naming the path for local checkpoints that cannot load; Hub ids pass through."""
    if os.path.isfile(path):
        raise CheckpointError(f"{path!r} is a file; expected a checkpoint directory (config.json, model.safetensors) "
                              "or a Hub model id")
    if not os.path.isdir(path):
        if _looks_like_local_path(path):
            raise CheckpointError(f"{path!r}: no such directory")
        return
    path = os.path.join(path, subfolder) if subfolder else path
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r}: no such directory (`subfolder` {subfolder!r})")
    config_file = os.path.join(path, "config.json")
    if not config_given:
        if not os.path.isfile(config_file):
            raise CheckpointError(f"{path!r}: no config.json; not a saved IVPT checkpoint")
        try:
            with open(config_file, encoding="utf-8") as handle:
                model_type = json.load(handle).get("model_type")
        except (OSError, ValueError, AttributeError) as error:
            raise CheckpointError(f"{config_file}: not a readable JSON object ({error})") from error
        if model_type != IvptConfig.model_type:
            raise CheckpointError(f"{config_file}: a {model_type!r} model, not {IvptConfig.model_type!r}")
    from safetensors import safe_open

    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            file = os.path.join(path, name)
            try:
                with safe_open(file, framework="pt"):
                    pass
            except Exception as error:  # safetensors raises its own SafetensorError (or OSError)
                size = os.path.getsize(file)
                raise CheckpointError(
                    f"{file}: corrupt or truncated safetensors file ({size} bytes): {error}"
                ) from error


def check_pixel_values(pixel_values: torch.Tensor, config: IvptConfig, in_channels: int, weight_dtype: torch.dtype,
                       training: bool) -> None:
    """Raises a `ValueError` naming the expected `(batch_size, in_channels, image_size, image_size)` floating-point
    input before any work; non-finite values raise in training and warn in eval.

    Cost: the shape and dtype checks read metadata only; the finite check is one float32 sum over the input (a tenth of
    the time of `isfinite(x).all()`, which writes a mask first) and one host sync per forward (skipped while
    `torch.compile` traces, where it would break the graph).
    """
    size = config.image_size
    expected = f"(batch_size, {in_channels}, {size}, {size})"
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"`pixel_values`: expected a tensor of shape {expected}, got {type(pixel_values).__name__}")
    shape = tuple(pixel_values.shape)
    if pixel_values.ndim != 4 or shape[0] < 1 or shape[1:] != (in_channels, size, size):
        hint = " (add a batch dimension with `pixel_values[None]`)" if shape == (in_channels, size, size) else ""
        raise ValueError(f"`pixel_values`: expected shape {expected}, got {shape}{hint}")
    dtype = pixel_values.dtype
    if not dtype.is_floating_point or dtype == torch.float64:
        raise ValueError(
            f"`pixel_values`: expected normalised float32/float16/bfloat16 images (the image processor's output), got "
            f"{dtype}"
        )
    if dtype != weight_dtype and not torch.is_autocast_enabled(pixel_values.device.type):
        raise ValueError(f"`pixel_values`: dtype {dtype} differs from the model's {weight_dtype}; cast the input with "
                         f"`.to({weight_dtype})` or run under autocast")
    if torch.compiler.is_compiling() or bool(torch.isfinite(pixel_values.sum(dtype=torch.float32))):
        return  # one read of the input, no temporary: a NaN or infinity makes the sum non-finite
    if bool(torch.isfinite(pixel_values).all()):
        return  # finite values whose sum overflowed
    message = "`pixel_values`: the input holds NaN or infinite values"
    if training:
        raise ValueError(message)
    warnings.warn(f"{message}; the outputs of these images are NaN", RuntimeWarning, stacklevel=3)


def check_labels(labels: torch.Tensor, batch_size: int, num_labels: int) -> None:
    """Raises a `ValueError` naming the expected `(batch_size,)` class indices in `[0, num_labels)`.

    Cost: one reduction over the labels and one host sync (skipped while `torch.compile` traces).
    """
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"`labels`: expected a tensor of shape ({batch_size},), got {type(labels).__name__}")
    if tuple(labels.shape) != (batch_size,):
        raise ValueError(f"`labels`: expected shape (batch_size,) = ({batch_size},), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"`labels`: expected integer class indices, got {labels.dtype}")
    if torch.compiler.is_compiling():
        return
    if bool(((labels < 0) | (labels >= num_labels)).any()):
        bad = sorted({int(label) for label in labels[(labels < 0) | (labels >= num_labels)].tolist()})
        raise ValueError(f"`labels`: expected class indices in [0, num_labels) = [0, {num_labels}), got {bad}")


@torch.compiler.disable  # a host-side transfer (pinning is not traceable)
def send_without_waiting(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without a host sync: copied from pinned memory on CUDA, where a copy from pageable
    memory blocks the host until the queued device work has run."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def full_precision(device: torch.device):
    """Disables autocast: distances, softmax and pooling of the maps stay in float32 (docs/method.md#equivalent-forms)."""
    return torch.autocast(device_type=device.type, enabled=False)


def prototype_logits(features: torch.Tensor, prototypes: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
    """Negative squared distances plus positional bias, up to a per-patch constant (docs/method.md#prototype-assignment-maps
    steps 2–3, expanded form of docs/method.md#equivalent-forms): 2·z·q − ‖q‖² + bias, without −‖z‖².

    The softmax over prototypes cancels a term that is the same for every prototype of a patch, so the maps are the
    same; leaving it out saves a pass over the `(B, N, D)` features per stage and the cancellation of ‖z‖² ≈ D.
    features `(B, N, D)`, prototypes `(P, D)`, position_bias `(P, N)` -> `(B, P, N)`.
    """
    # (B, N, P). bmm reads `features`, a strided view of the LayerNorm'd tokens, where it is; matmul would fold B·N
    # and, as the prototypes require grad, copy the view to do so (and keep the copy for the backward).
    dots = torch.bmm(features, prototypes.T.expand(features.shape[0], -1, -1))
    return (2 * dots - prototypes.pow(2).sum(-1)).transpose(1, 2) + position_bias


def hard_pool(maps: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard-assignment pooling (docs/method.md#hard-assignment-pooling) as one batched matmul (docs/method.md#equivalent-forms).

    Each pixel contributes to its arg-max prototype only, weighted by its probability.
    maps `(B, P, N)`, features `(B, N, D)` -> region features `(B, P, D)` (zero for an empty prototype) and
    counts `(B, P)` (summed probabilities, 0 iff no pixel picks the prototype).
    """
    winners = torch.zeros_like(maps).scatter_(1, maps.argmax(1, keepdim=True), 1.0)
    weights = maps * winners
    counts = weights.sum(-1)
    region_features = (weights @ features) / torch.where(counts == 0, 1.0, counts)[..., None]
    return region_features, counts


def renormalise_with_eps(maps: torch.Tensor, eps: float) -> torch.Tensor:
    """The "eps" maps of docs/method.md#prototype-assignment-maps, derived from the raw ones instead of recomputed (docs/method.md#equivalent-forms)."""
    maps = maps + eps
    return maps / maps.sum(1, keepdim=True)


class IvptPrototypeStage(nn.Module):
    """Prototypes and positional bias of one stage: tokens -> assignment maps (docs/method.md#prototype-assignment-maps)."""

    def __init__(self, config: IvptConfig, num_prototypes: int):
        super().__init__()
        hidden_size = config.backbone_geometry["hidden_size"]
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, hidden_size))
        self.position_bias = nn.Parameter(torch.zeros(num_prototypes, config.grid_size, config.grid_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features `(B, N, D)` (LayerNorm'd patch tokens, float32) -> raw maps `(B, P, N)`, softmax over P."""
        with full_precision(features.device):
            return prototype_logits(features, self.prototypes.float(), self.position_bias.float().flatten(1)).softmax(1)


class IvptPromptStage(IvptPrototypeStage):
    """An intermediate stage: also routes its foreground prototypes to the final parts (docs/method.md#routing-to-the-final-parts) and turns their region
    features into `num_parts` prompt tokens for its block (docs/method.md#interpretable-prompts)."""

    def __init__(self, config: IvptConfig, num_prototypes: int):
        super().__init__(config, num_prototypes)
        hidden_size, num_parts = config.backbone_geometry["hidden_size"], config.num_parts
        self.routing_head = nn.Linear(hidden_size, num_parts)
        self.prompt_norm = nn.LayerNorm((num_parts, hidden_size), eps=1e-5)
        self.prompt_projection = nn.Linear(hidden_size, hidden_size)
        self.num_parts, self.tau, self.hard = num_parts, config.routing_tau, config.routing_hard

    def draw_noise(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Exp(1) samples `(B, F, K)` for the Gumbel noise of `route` (the draw of torch.nn.functional.gumbel_softmax)."""
        num_foreground = self.prototypes.shape[0] - 1
        return torch.empty(batch_size, num_foreground, self.num_parts, device=device,
                           dtype=self.routing_head.weight.dtype).exponential_()

    def route(self, region_features: torch.Tensor, counts: torch.Tensor,
              exponential_noise: torch.Tensor | None) -> torch.Tensor:
        """Foreground region features `(B, F, D)` and counts `(B, F)` -> routing weights `(B, F, K)`, rows sum to 1.

        Gumbel-softmax with Gumbel(0, 1) = -log(`exponential_noise`) (from `draw_noise`) when given, plain softmax
        otherwise; empty prototypes get the uniform row 1/K.
        """
        logits = self.routing_head(region_features)
        if exponential_noise is not None:
            logits = logits - exponential_noise.log()
        weights = (logits / self.tau).softmax(-1)
        if self.hard:  # straight-through
            one_hot = torch.zeros_like(weights).scatter_(-1, weights.argmax(-1, keepdim=True), 1.0)
            weights = one_hot - weights.detach() + weights
        return torch.where(counts[..., None] == 0, 1.0 / self.num_parts, weights)

    def prompts(self, region_features: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        """Routing-weighted mean of the foreground region features, normalised jointly over (K, D), projected.

        region_features `(B, F, D)`, routing_weights `(B, F, K)` (detached by the caller) -> prompts `(B, K, D)`.
        """
        raw_prompts = torch.einsum("bjk,bjd->bkd", routing_weights, region_features)
        totals = routing_weights.sum(1)[..., None]  # (B, K, 1); 0 only when hard routing leaves a part unpicked
        raw_prompts = raw_prompts / torch.where(totals == 0, 1.0, totals)
        return self.prompt_projection(self.prompt_norm(raw_prompts))


def project_maps(maps: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
    """Route a stage's raw maps `(B, P, N)` onto the final parts -> `(B, K + 1, N)`, background kept (docs/method.md#projected-maps)."""
    foreground = torch.einsum("bjk,bjn->bkn", routing_weights, maps[:, :-1])
    return torch.cat([foreground, maps[:, -1:]], dim=1)


class IvptPreTrainedModel(PreTrainedModel):
    config_class = IvptConfig
    base_model_prefix = "ivpt"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block", "IvptPrototypeStage", "IvptPromptStage"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained` with checked inputs, then the docs/method.md#parameter-groups freezing again: transformers 5 re-wraps
        every loaded tensor as a Parameter with `requires_grad=True`, which would silently unfreeze the backbone.

        Raises:
            CheckpointError: a local path that does not exist or is a file, a folder without `config.json`, a
                truncated, corrupt or empty `*.safetensors` file (named), or a checkpoint that lacks weights of this
                model (e.g. the classifier: it would otherwise be initialised at random with a mere warning).
        """
        path = pretrained_model_name_or_path
        if isinstance(path, (str, os.PathLike)):
            _check_checkpoint_path(os.fspath(path), kwargs.get("subfolder") or "", kwargs.get("config") is not None)
        wants_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        except OSError as error:
            if isinstance(path, (str, os.PathLike)) and not os.path.isdir(path):
                raise CheckpointError(f"{os.fspath(path)!r}: no such directory, and no Hub model of that id could be "
                                      f"loaded ({error})") from error
            raise
        except RuntimeError as error:
            if "ignore_mismatched_sizes" not in str(error):
                raise
            raise CheckpointError(
                f"{os.fspath(path) if isinstance(path, (str, os.PathLike)) else path!r}: weight shapes differ from the "
                "ones its configuration (config.json) defines; see the load report above"
            ) from error
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise CheckpointError(
                f"{os.fspath(path) if isinstance(path, (str, os.PathLike)) else path!r}: the checkpoint lacks "
                f"{len(missing)} weight(s) of {cls.__name__}, e.g. {missing[:3]}; they would be initialised at random"
            )
        for module in model.modules():
            if isinstance(module, IvptModel):
                module._freeze()
        return (model, info) if wants_info else model

    def save_pretrained(self, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; the saved `auto_map` also maps `AutoModel` to `IvptModel`, so that a
        classifier checkpoint loads with `AutoModel` (trust_remote_code) where ivpt is not installed."""
        if getattr(type(self), "_auto_class", None) is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoModel", f"{IvptModel.__module__.rsplit('.', 1)[-1]}.IvptModel")
            self.config.auto_map = auto_map
        return super().save_pretrained(*args, **kwargs)

    @classmethod
    def from_backbone(cls, backbone: str = IvptConfig.backbone, backbone_weights: str | None = None, **config_kwargs):
        """A new IVPT model whose backbone carries pretrained timm weights.

        The weights come from timm's pretrained config of `backbone` (the Hub) or, with `backbone_weights`, from a
        local `.safetensors`/`.pth` file through the same timm code path (`pretrained_cfg_overlay=dict(file=...)`),
        so checkpoints of DINOv2 work offline. They are copied after `post_init`, which never touches the backbone.
        `config_kwargs` go to [`IvptConfig`].
        """
        overlay = None
        if backbone_weights is not None:
            if not os.path.isfile(backbone_weights):
                raise FileNotFoundError(f"`backbone_weights`: no such file {backbone_weights!r}")
            overlay = dict(file=os.fspath(backbone_weights))
        config = IvptConfig(backbone=backbone, **config_kwargs)
        try:
            pretrained = timm.create_model(
                backbone, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0, img_size=config.image_size,
                **config.backbone_kwargs,
            )
        except Exception as error:  # safetensors, torch.load and timm raise many types
            if backbone_weights is None:
                raise
            raise CheckpointError(
                f"`backbone_weights`: {backbone_weights}: cannot load as {backbone!r} weights "
                f"({type(error).__name__}: {error})"
            ) from error
        model = cls(config)
        base = getattr(model, cls.base_model_prefix, model)
        base.backbone.load_state_dict(pretrained.state_dict())
        return model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The initialisation of docs/method.md#learnable-tensors for the IVPT tensors; the timm backbone keeps its own (or loaded) weights."""
        if isinstance(module, IvptPrototypeStage):
            init.normal_(module.prototypes, std=self.config.prototype_init_std)
            init.zeros_(module.position_bias)
        if isinstance(module, IvptPromptStage):
            _default_linear_init(module.routing_head)
            init.ones_(module.prompt_norm.weight)
            init.zeros_(module.prompt_norm.bias)
            init.trunc_normal_(module.prompt_projection.weight, std=0.02)
            init.zeros_(module.prompt_projection.bias)
        elif isinstance(module, IvptModel):
            init.ones_(module.modulation.weight)
            init.zeros_(module.modulation.bias)
        elif isinstance(module, IvptForImageClassification):
            init.trunc_normal_(module.classifier.weight, std=0.02)


def _default_linear_init(linear: nn.Linear) -> None:
    """PyTorch's own `nn.Linear` initialisation, through the flag-aware `transformers.initialization` helpers."""
    init.kaiming_uniform_(linear.weight, a=5**0.5)
    bound = 1 / linear.in_features**0.5
    init.uniform_(linear.bias, -bound, bound)


class IvptModel(IvptPreTrainedModel):
    """Frozen timm ViT + cross-layer prototype stages (docs/method.md#forward-pass). Returns part features and maps, no class scores."""

    def __init__(self, config: IvptConfig):
        super().__init__(config)
        self.backbone = timm.create_model(
            config.backbone, pretrained=False, num_classes=0, img_size=config.image_size, **config.backbone_kwargs
        )
        hidden_size = self.backbone.embed_dim
        self.stages = nn.ModuleList(
            [IvptPromptStage(config, count) for count in config.n_pro[:-1]]
            + [IvptPrototypeStage(config, config.n_pro[-1])]
        )
        self.modulation = nn.LayerNorm((hidden_size, config.num_parts + 1), eps=1e-5)
        self.grid_size = config.grid_size  # read once: the config property runs json.dumps, a torch.compile graph break
        self.gradient_checkpointing = False
        self._freeze()
        self.post_init()

    def _freeze(self) -> None:
        """docs/method.md#parameter-groups: backbone frozen except cls/reg/pos (final norm frozen too); prompt LayerNorm affine frozen (docs/method.md#quirks [prompt norm frozen])."""
        if self.config.freeze_backbone:
            trainable = {"cls_token", "reg_token", "pos_embed"}
            for name, parameter in self.backbone.named_parameters():
                parameter.requires_grad_(name in trainable)
        if self.config.freeze_prompt_norm_affine:
            for stage in self.stages[:-1]:
                stage.prompt_norm.requires_grad_(False)

    def _run_block(self, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block.__call__, tokens)
        return block(tokens)

    def _patch_features(self, tokens: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Final-LayerNorm'd patch tokens in float32, `(B, N, D)`, from `tokens` `(B, T, D)` whose first `num_tokens`
        (T0) rows are the class, register and patch tokens; the rows after them (a block's prompt outputs) are
        dropped. The LayerNorm runs on all T rows: on the T0 rows alone it would first copy them out of the block's
        output (a strided slice), and on CPU every (B, T, D) copy at batch 8 is a fresh mapping of ~34 MB, page
        faults included. The result is a strided view; the matmuls that read it do not copy it."""
        return self.backbone.norm(tokens)[:, self.backbone.num_prefix_tokens : num_tokens].float()

    def _norm_saves_its_input(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.backbone.norm.parameters())

    def _with_prompts(self, tokens: torch.Tensor, prompts: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """The next prompted block's input `(B, T0 + K, D)`: the first T0 rows of `tokens`, then `prompts` `(B, K, D)`.

        After a prompted block, `tokens` already has K rows after the T0 (its prompt outputs, dropped): the new
        prompts are written over them in place instead of concatenating a new (B, T0 + K, D) tensor (the same values
        and gradients; the block's residual sum does not save its output). Not when a trainable final LayerNorm has
        saved these tokens for its backward (`freeze_backbone=False`): autograd forbids changing them then.
        """
        if tokens.shape[1] == num_tokens or self._norm_saves_its_input():
            return torch.cat([tokens[:, :num_tokens], prompts], dim=1)
        tokens[:, num_tokens:] = prompts
        return tokens

    def _routing_noise(self, batch_size: int, device: torch.device, sample_noise: bool) -> list[torch.Tensor | None]:
        """Per intermediate stage, in stage order, the Exp(1) draws of its Gumbel routing noise (`None`s without)."""
        return [stage.draw_noise(batch_size, device) if sample_noise else None for stage in self.stages[:-1]]

    def _encode(self, pixel_values: torch.Tensor, routing_noise: list[torch.Tensor | None]):
        """The block loop of docs/method.md#forward-pass: returns the final patch features `(B, N, D)` (with gradients to the
        tokens), per-stage patch features (detached) and raw maps, the routing weights and projected maps of the
        intermediate stages. `routing_noise`: from `_routing_noise` (one entry per intermediate stage).

        The final patch features are computed once: the last stage's maps read them detached and the part pooling
        reads them with gradients, so autograd keeps one `(B, N, D)` float32 copy instead of two (and the final
        LayerNorm runs once)."""
        backbone = self.backbone
        tokens = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(pixel_values))))
        num_tokens = tokens.shape[1]  # T0 = 1 + registers + patches
        first_prompted = len(backbone.blocks) - self.config.num_prompted_blocks
        for block in backbone.blocks[:first_prompted]:
            tokens = self._run_block(block, tokens)

        stage_features, raw_maps, routing_weights, projected_maps = [], [], [], []
        for stage, block, noise in zip(self.stages[:-1], backbone.blocks[first_prompted:], routing_noise):
            features = self._patch_features(tokens.detach(), num_tokens)
            maps = stage(features)  # (B, P, N)
            with full_precision(tokens.device):
                region_features, counts = hard_pool(maps.detach(), features)
                routing = stage.route(region_features[:, :-1], counts[:, :-1], noise)
                prompts = stage.prompts(region_features[:, :-1], routing.detach())
                projected_maps.append(project_maps(maps, routing))
            # tokens: (B, T0 + K, D) from here on, the last K rows the block's prompt outputs
            tokens = self._run_block(block, self._with_prompts(tokens, prompts.to(tokens.dtype), num_tokens))
            stage_features.append(features)
            raw_maps.append(maps)
            routing_weights.append(routing)

        final_features = self._patch_features(tokens, num_tokens)
        features = final_features.detach()
        stage_features.append(features)
        raw_maps.append(self.stages[-1](features))
        return final_features, stage_features, raw_maps, routing_weights, projected_maps

    def _to_grid(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.unflatten(-1, (self.grid_size, self.grid_size))

    def _sample_noise(self, sample_routing_noise: bool | None) -> bool:
        if sample_routing_noise is not None:
            return sample_routing_noise
        return self.config.gumbel_routing and (self.training or self.config.sample_routing_noise_in_eval)

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """[`check_pixel_values`] against this model's patch embedding and mode."""
        patch_projection = self.backbone.patch_embed.proj
        check_pixel_values(
            pixel_values, self.config, patch_projection.in_channels, patch_projection.weight.dtype, self.training
        )

    @can_return_tuple
    def forward(self, pixel_values: torch.Tensor, sample_routing_noise: bool | None = None,
                routing_noise: list[torch.Tensor | None] | None = None, **kwargs) -> IvptModelOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
            Normalised images.
        sample_routing_noise (`bool`, *optional*):
            Draw Gumbel noise in the routing; defaults to `config.gumbel_routing` in training mode and to
            `config.gumbel_routing and config.sample_routing_noise_in_eval` in eval mode.
        routing_noise (`list`, *optional*):
            Noise drawn beforehand, one entry per intermediate stage (`IvptPromptStage.draw_noise`, or `None` for no
            noise); replaces the draw of `sample_routing_noise`. The training objective draws it before running its
            warped pass, so that the random draws keep their order when that pass runs first.
        """
        self.check_pixel_values(pixel_values)
        if routing_noise is None:
            routing_noise = self._routing_noise(pixel_values.shape[0], pixel_values.device,
                                                self._sample_noise(sample_routing_noise))
        final_features, _, raw_maps, routing_weights, projected_maps = self._encode(pixel_values, routing_noise)
        eps_maps = [renormalise_with_eps(maps, self.config.map_eps) for maps in raw_maps]
        with full_precision(final_features.device):
            part_features, _ = hard_pool(eps_maps[-1], final_features)  # (B, K+1, D)
            part_features = self.modulation(part_features.transpose(1, 2))  # (B, D, K+1)
        assignment_maps = tuple(self._to_grid(maps) for maps in eps_maps)
        return IvptModelOutput(
            part_features=part_features,
            interpretation_maps=assignment_maps[self.config.interpretation_stage_index],
            assignment_maps=assignment_maps,
            projected_maps=(*projected_maps, eps_maps[-1]),
            routing_weights=tuple(routing_weights),
        )

    def assignment_maps_only(self, pixel_values: torch.Tensor, sample_routing_noise: bool | None = None):
        """Stage maps with gradients to the prototypes and biases only, the rest run without autograd (docs/method.md#equivalent-forms).

        This is the second (equivariance) pass: the maps are computed from detached tokens, so running the blocks
        under `no_grad` and recomputing only distances and softmax gives the same gradients for far less memory.
        """
        noise = self._routing_noise(pixel_values.shape[0], pixel_values.device, self._sample_noise(sample_routing_noise))
        with torch.no_grad():
            stage_features = self._encode(pixel_values, noise)[1]
        return tuple(
            self._to_grid(renormalise_with_eps(stage(features), self.config.map_eps))
            for stage, features in zip(self.stages, stage_features)
        )


class IvptForImageClassification(IvptPreTrainedModel):
    """IVPT with its shared per-part linear classifier (docs/method.md#final-parts-and-classification); logits are the mean of the part scores."""

    def __init__(self, config: IvptConfig):
        super().__init__(config)
        self.ivpt = IvptModel(config)
        self.classifier = nn.Linear(self.ivpt.backbone.embed_dim, config.num_labels, bias=False)
        self.post_init()

    def loss_weights(self) -> dict[str, float]:
        config = self.config
        return {
            "classification": config.classification_loss_weight,
            "consistency": config.consistency_loss_weight,
            "presence": config.presence_loss_weight,
            "orthogonality": config.orthogonality_loss_weight,
            "equivariance": config.equivariance_loss_weight,
            "total_variation": config.total_variation_loss_weight,
            "enforced_presence": config.enforced_presence_loss_weight,
            "entropy": config.entropy_loss_weight,
        }

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        sample_routing_noise: bool | None = None,
        **kwargs,
    ) -> IvptImageClassifierOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
            Normalised images.
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices. In training mode the loss is the full IVPT objective (a second forward pass on a warped copy
            of the batch included); in eval mode the cross-entropy.
        sample_routing_noise (`bool`, *optional*):
            See [`IvptModel.forward`].
        """
        if labels is not None and isinstance(pixel_values, torch.Tensor) and pixel_values.ndim == 4:
            # Checked before the pixels (in `self.ivpt`): both host syncs then wait for the same queued work.
            check_labels(labels, pixel_values.shape[0], self.config.num_labels)
        noise = unwarp_index = warped_maps = None
        if labels is not None and self.training:
            noise, unwarp_index, warped_maps = self._warped_pass(pixel_values, sample_routing_noise)
        outputs = self.ivpt(pixel_values, sample_routing_noise=sample_routing_noise, routing_noise=noise,
                            return_dict=True)
        with full_precision(pixel_values.device):  # float32 scores under autocast: near ties keep their order
            part_scores = self.classifier(outputs.part_features[:, :, :-1].transpose(1, 2))  # (B, K, C)
            part_logits = part_scores.transpose(1, 2)  # (B, C, K)
            logits = part_logits.mean(-1)
        loss = loss_terms = None
        if labels is not None:
            if self.training:
                loss, loss_terms = self._training_objective(labels, logits, outputs, unwarp_index, warped_maps)
            else:
                loss = F.cross_entropy(logits.float(), labels)
                loss_terms = {"classification": loss}
        return IvptImageClassifierOutput(
            loss=loss, logits=logits, part_logits=part_logits, loss_terms=loss_terms, **outputs
        )

    def _warped_pass(self, pixel_values, sample_routing_noise):
        """The equivariance pass of the training objective, run BEFORE the first pass: its transient buffers then
        never sit on top of the first pass's activations kept for backward (the training step's peak memory). The
        random draws keep the order of running it second: the first pass's routing noise (returned, for it), the
        warp, the warped pass's noise. Returns that noise, the warp's un-warp index on the device (sent now, without
        waiting) and the warped pass's stage maps."""
        config, ivpt = self.config, self.ivpt
        ivpt.check_pixel_values(pixel_values)  # before any work (checked again, cheaply, by the first pass)
        noise = ivpt._routing_noise(pixel_values.shape[0], pixel_values.device,
                                    ivpt._sample_noise(sample_routing_noise))
        warp = sample_equivariance_warp(
            config.image_size, config.equivariance_max_rotation, config.equivariance_max_translation,
            config.equivariance_scale_range,
        )
        source_index = send_without_waiting(
            unwarp_source_index(warp, ivpt.grid_size, ivpt.grid_size, config.image_size), pixel_values.device
        )
        return noise, source_index, ivpt.assignment_maps_only(warp_images(pixel_values, warp), sample_routing_noise)

    def _training_objective(self, labels, logits, outputs, unwarp_index, warped_maps):
        with full_precision(logits.device):
            return ivpt_objective(
                logits.float(),
                labels,
                outputs.part_features,
                outputs.assignment_maps,
                outputs.projected_maps,
                unwarp_stage_maps(warped_maps, unwarp_index),
                self.loss_weights(),
            )


__all__ = ["CheckpointError", "IvptPreTrainedModel", "IvptModel", "IvptForImageClassification", "IvptModelOutput",
           "IvptImageClassifierOutput"]
