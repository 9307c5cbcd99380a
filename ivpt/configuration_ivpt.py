"""IVPT model configuration (docs/method.md#notation, docs/method.md#learnable-tensors, docs/method.md#routing-noise-at-evaluation, docs/method.md#objective, docs/method.md#outputs).

Ships to the Hub with the model: imports only torch, timm and transformers.
"""

from dataclasses import field, fields
import difflib
from functools import lru_cache
import json
import warnings

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from transformers import PreTrainedConfig


@lru_cache(maxsize=32)
def _backbone_geometry(backbone: str, backbone_kwargs_json: str, image_size: int) -> dict:
    """Builds the timm backbone on the meta device (no memory, no weights) and reads its geometry."""
    kwargs = json.loads(backbone_kwargs_json)
    if not timm.is_model(backbone):
        raise ValueError(f"`backbone`: expected a timm model name, got {backbone!r}")
    try:
        with torch.device("meta"):
            model = timm.create_model(backbone, pretrained=False, num_classes=0, img_size=image_size, **kwargs)
    except TypeError as error:
        with torch.device("meta"):
            model = timm.create_model(backbone, pretrained=False)
        if isinstance(model, VisionTransformer):
            raise ValueError(f"`backbone_kwargs`: timm rejected {kwargs} for {backbone!r}: {error}") from error
    except (AssertionError, ValueError, RuntimeError, ZeroDivisionError) as error:  # timm's geometry checks
        raise ValueError(f"`backbone_kwargs`: timm rejected {kwargs} for {backbone!r}: {error}") from error
    if not isinstance(model, VisionTransformer) or model.cls_token is None:
        raise ValueError(
            f"`backbone`: expected a timm VisionTransformer with a class token, got {type(model).__name__} "
            f"for {backbone!r}"
        )
    return {
        "patch_size": model.patch_embed.patch_size[0],
        "depth": len(model.blocks),
        "hidden_size": model.embed_dim,
        "num_prefix_tokens": model.num_prefix_tokens,
    }


class IvptConfig(PreTrainedConfig):
    r"""
    Configuration of an IVPT model: a frozen timm ViT with cross-layer part prototypes whose region features become
    interpretable prompts of the last blocks (docs/method.md#forward-pass). Defaults reproduce the official release recipe
    (DINOv2 ViT-B/14 with 4 registers at 518 px, `n_pro = 17,14,11,8,5`), except `sample_routing_noise_in_eval`.

    Args:
        backbone (`str`, *optional*, defaults to `"vit_base_patch14_reg4_dinov2.lvd142m"`):
            timm model name of the ViT backbone. The model is always built with random weights; load pretrained
            weights with [`IvptForImageClassification.from_backbone`].
        backbone_kwargs (`dict`, *optional*):
            Extra keyword arguments for `timm.create_model` (e.g. `{"embed_dim": 64, "depth": 4, "num_heads": 2}` for
            a tiny test model).
        image_size (`int`, *optional*, defaults to 518):
            Side of the square input; must be a multiple of the backbone's patch size.
        n_pro (`list[int]` or `str`, *optional*, defaults to `[17, 14, 11, 8, 5]`):
            Prototype count per stage, each including one background prototype (the last index). Stage `s <
            len(n_pro) - 1` is attached to block `depth - len(n_pro) + 1 + s`; the last stage reads the output of the
            last block and defines the `K = n_pro[-1] - 1` parts that are classified. Also accepts `"17,14,11,8,5"`.
        freeze_backbone (`bool`, *optional*, defaults to `True`):
            Freeze every backbone tensor except `cls_token`, `reg_token` and `pos_embed` (docs/method.md#parameter-groups; the final LayerNorm is
            frozen too).
        freeze_prompt_norm_affine (`bool`, *optional*, defaults to `True`):
            Keep the affine parameters of the joint (K, D) prompt LayerNorm frozen at identity, as the release does by
            accident of its parameter-group matcher (docs/method.md#quirks [prompt norm frozen]).
        prototype_init_std (`float`, *optional*, defaults to 0.05):
            Standard deviation of the normal initialisation of the prototype vectors (docs/method.md#learnable-tensors).
        gumbel_routing (`bool`, *optional*, defaults to `True`):
            Add Gumbel(0, 1) noise to the routing logits before the softmax (docs/method.md#routing-to-the-final-parts, release recipe).
        routing_tau (`float`, *optional*, defaults to 1.0):
            Softmax temperature of the routing.
        routing_hard (`bool`, *optional*, defaults to `False`):
            Straight-through one-hot routing (forward one-hot, backward soft).
        sample_routing_noise_in_eval (`bool`, *optional*, defaults to `False`):
            Also draw the Gumbel routing noise in eval mode. The release does (docs/method.md#routing-noise-at-evaluation, its classification accuracy is
            stochastic); the default here is the documented deterministic deviation. Set `True` for paper parity of
            the classification evaluation.
        interpretation_stage_index (`int`, *optional*, defaults to -3):
            Index into the stage maps of the map returned as `interpretation_maps` and evaluated by the
            interpretability metrics (release: `maps[-3]`, docs/method.md#outputs).
        map_eps (`float`, *optional*, defaults to 1e-6):
            Constant added before re-normalising the returned assignment maps (docs/method.md#prototype-assignment-maps, "eps" maps).
        classification_loss_weight (`float`, *optional*, defaults to 1.0): weight of the cross-entropy (docs/method.md#classification-loss).
        consistency_loss_weight (`float`, *optional*, defaults to 1.0): weight of the cross-layer KL (docs/method.md#consistency-loss).
        presence_loss_weight (`float`, *optional*, defaults to 1.0): weight of the presence loss (docs/method.md#presence-loss).
        orthogonality_loss_weight (`float`, *optional*, defaults to 1.0): weight of the orthogonality loss (docs/method.md#orthogonality-loss).
        equivariance_loss_weight (`float`, *optional*, defaults to 1.0): weight of the equivariance loss (docs/method.md#equivariance-loss).
        total_variation_loss_weight (`float`, *optional*, defaults to 1.0): weight of the total variation (docs/method.md#total-variation-loss).
        enforced_presence_loss_weight (`float`, *optional*, defaults to 1.0): weight of the background presence (docs/method.md#enforced-presence-loss).
        entropy_loss_weight (`float`, *optional*, defaults to 1.0): weight of the pixel-wise entropy (docs/method.md#entropy-loss).
        equivariance_max_rotation (`float`, *optional*, defaults to 90.0):
            Rotation of the equivariance warp is drawn from U(-x, x) degrees.
        equivariance_max_translation (`float`, *optional*, defaults to 0.11):
            Translation of the equivariance warp is drawn from U(-x, x) times the image side, rounded to pixels.
        equivariance_scale_range (`list[float]`, *optional*, defaults to `[0.8, 1.4]`):
            Scale of the equivariance warp is drawn from U(low, high).

    Every field is checked when the configuration is built: a bad value raises a `ValueError` naming the field
    (negative loss weights, `num_labels < 1`, `map_eps <= 0`, `num_heads` not dividing `embed_dim`, ...). A key that is
    no field (a typo such as `num_lables`) is kept, as transformers does, with a `UserWarning` naming the closest field.

    Example:

    ```python
    >>> from ivpt import IvptConfig, IvptForImageClassification
    >>> config = IvptConfig(num_labels=200)  # the paper setup
    >>> tiny = IvptConfig(backbone_kwargs={"embed_dim": 64, "depth": 4, "num_heads": 2}, image_size=56, n_pro="5,4,3")
    >>> model = IvptForImageClassification(tiny)
    ```"""

    model_type = "ivpt"
    # Map and feature outputs are large; the Trainer keeps only the logits when it gathers predictions.
    keys_to_ignore_at_inference = [
        "part_logits", "part_features", "interpretation_maps", "assignment_maps", "projected_maps",
        "routing_weights", "loss_terms",
    ]

    backbone: str = "vit_base_patch14_reg4_dinov2.lvd142m"
    backbone_kwargs: dict | None = None
    image_size: int = 518
    n_pro: list[int] | str = field(default_factory=lambda: [17, 14, 11, 8, 5])
    freeze_backbone: bool = True
    freeze_prompt_norm_affine: bool = True
    prototype_init_std: float = 0.05
    gumbel_routing: bool = True
    routing_tau: float = 1.0
    routing_hard: bool = False
    sample_routing_noise_in_eval: bool = False
    interpretation_stage_index: int = -3
    map_eps: float = 1e-6
    classification_loss_weight: float = 1.0
    consistency_loss_weight: float = 1.0
    presence_loss_weight: float = 1.0
    orthogonality_loss_weight: float = 1.0
    equivariance_loss_weight: float = 1.0
    total_variation_loss_weight: float = 1.0
    enforced_presence_loss_weight: float = 1.0
    entropy_loss_weight: float = 1.0
    equivariance_max_rotation: float = 90.0
    equivariance_max_translation: float = 0.11
    equivariance_scale_range: list[float] = field(default_factory=lambda: [0.8, 1.4])

    def __post_init__(self, **kwargs):
        if self.id2label is None:
            kwargs.setdefault("num_labels", 200)  # CUB-200-2011
        _warn_unknown_keys(kwargs)
        num_labels = kwargs.get("num_labels")
        if num_labels is not None and (not isinstance(num_labels, int) or num_labels < 1):
            raise ValueError(f"`num_labels`: expected at least 1 class, got {num_labels!r}")
        if not isinstance(self.backbone_kwargs, (dict, type(None))):
            raise ValueError(f"`backbone_kwargs`: expected a dict, got {type(self.backbone_kwargs).__name__}")
        self.backbone_kwargs = dict(self.backbone_kwargs or {})
        self.n_pro = _parse_n_pro(self.n_pro)
        try:
            self.equivariance_scale_range = [float(x) for x in self.equivariance_scale_range]
        except (TypeError, ValueError):
            raise ValueError(
                f"`equivariance_scale_range`: expected [low, high] numbers, got {self.equivariance_scale_range!r}"
            ) from None
        super().__post_init__(**kwargs)
        self._validate()

    def _validate(self):
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size <= 0:
            raise ValueError(f"`image_size`: expected a positive int, got {self.image_size!r}")
        if self.num_labels < 1:
            raise ValueError(f"`num_labels`: expected at least 1 class, got {self.num_labels}")
        for name in _NON_NEGATIVE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"`{name}`: expected a number >= 0, got {value!r}")
        for name in _POSITIVE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"`{name}`: expected a number > 0, got {value!r}")
        _check_heads(self.backbone_kwargs)
        geometry = self.backbone_geometry
        if self.image_size % geometry["patch_size"]:
            raise ValueError(
                f"`image_size`: expected a multiple of the backbone patch size {geometry['patch_size']}, "
                f"got {self.image_size}"
            )
        if self.num_prompted_blocks > geometry["depth"]:
            raise ValueError(
                f"`n_pro`: {len(self.n_pro)} stages need {self.num_prompted_blocks} prompted blocks, but the backbone "
                f"has {geometry['depth']} blocks"
            )
        if self.grid_size < 4:
            raise ValueError(
                f"`image_size`: the patch grid must be at least 4x4 for the presence losses, got "
                f"{self.grid_size}x{self.grid_size}"
            )
        if not -len(self.n_pro) <= self.interpretation_stage_index < len(self.n_pro):
            raise ValueError(
                f"`interpretation_stage_index`: expected an index into {len(self.n_pro)} stages, got "
                f"{self.interpretation_stage_index}"
            )
        low, high = self.equivariance_scale_range if len(self.equivariance_scale_range) == 2 else (0, -1)
        if not 0 < low <= high:
            raise ValueError(
                f"`equivariance_scale_range`: expected [low, high] with 0 < low <= high, got "
                f"{self.equivariance_scale_range}"
            )

    @property
    def backbone_geometry(self) -> dict:
        """`patch_size`, `depth`, `hidden_size` and `num_prefix_tokens` of the backbone (cached, meta device)."""
        kwargs_json = json.dumps(self.backbone_kwargs, sort_keys=True)
        return _backbone_geometry(self.backbone, kwargs_json, self.image_size)

    @property
    def num_parts(self) -> int:
        """K: the foreground parts of the last stage, classified and used as prompts."""
        return self.n_pro[-1] - 1

    @property
    def num_prompted_blocks(self) -> int:
        """S: the stages that prompt a block (all but the last)."""
        return len(self.n_pro) - 1

    @property
    def grid_size(self) -> int:
        return self.image_size // self.backbone_geometry["patch_size"]


# Loss weights, warp ranges and the initialisation scale may be 0 (switches a term off) but never negative; the
# temperature and the map epsilon must be strictly positive.
_NON_NEGATIVE_FIELDS = (
    "classification_loss_weight", "consistency_loss_weight", "presence_loss_weight", "orthogonality_loss_weight",
    "equivariance_loss_weight", "total_variation_loss_weight", "enforced_presence_loss_weight", "entropy_loss_weight",
    "equivariance_max_rotation", "equivariance_max_translation", "prototype_init_std",
)
_POSITIVE_FIELDS = ("routing_tau", "map_eps")

# Keys `PreTrainedConfig` itself consumes or that every saved config.json carries.
_BASE_KEYS = {
    "num_labels", "auto_map", "model_type", "transformers_version", "name_or_path", "torch_dtype", "_commit_hash",
    "output_attentions", "attn_implementation", "experts_implementation", "per_layer_config", "rope_scaling",
    "rope_theta", "_attn_implementation_internal", "_experts_implementation_internal",
}


def _warn_unknown_keys(kwargs: dict) -> None:
    """A key that is no field of `IvptConfig` (a typo such as `num_lables`) is kept, as transformers does, but warned
    about with the closest field names."""
    from transformers import GenerationConfig

    own = {item.name for item in fields(IvptConfig)} | {"num_labels"}
    known = own | _BASE_KEYS | set(GenerationConfig._get_default_generation_params())
    for key in sorted(set(kwargs) - known):
        close = difflib.get_close_matches(key, sorted(own), n=2)
        hint = f"; did you mean {' or '.join(repr(name) for name in close)}?" if close else ""
        warnings.warn(f"IvptConfig: unknown key {key!r} is not a field of the configuration and does nothing{hint}",
                      UserWarning, stacklevel=4)


def _check_heads(backbone_kwargs: dict) -> None:
    embed_dim, num_heads = backbone_kwargs.get("embed_dim"), backbone_kwargs.get("num_heads")
    if embed_dim is None or num_heads is None:
        return
    if not isinstance(num_heads, int) or num_heads < 1 or not isinstance(embed_dim, int) or embed_dim % num_heads:
        raise ValueError(
            f"`backbone_kwargs`: num_heads ({num_heads!r}) must be a positive int dividing embed_dim ({embed_dim!r})"
        )


def _parse_n_pro(n_pro) -> list[int]:
    if isinstance(n_pro, str):
        try:
            n_pro = [int(item) for item in n_pro.split(",")]
        except ValueError:
            raise ValueError(f"`n_pro`: expected comma-separated integers such as '17,14,11,8,5', got {n_pro!r}")
    if not isinstance(n_pro, (list, tuple)):
        raise ValueError(f"`n_pro`: expected a list of ints or a string such as '17,14,11,8,5', got {n_pro!r}")
    n_pro = list(n_pro)
    if len(n_pro) < 2 or any(not isinstance(count, int) or isinstance(count, bool) or count < 2 for count in n_pro):
        raise ValueError(
            f"`n_pro`: expected at least 2 stages of at least 2 prototypes each (one is background), got {n_pro}"
        )
    return n_pro


__all__ = ["IvptConfig"]
