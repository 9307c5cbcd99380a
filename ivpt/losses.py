"""The IVPT training objective as pure functions (docs/method.md#objective).

Maps are `(batch_size, num_prototypes, height, width)` with the background prototype last, and sum to 1 over the
prototype axis. Every function is a plain tensor-in, tensor-out formula so it can be tested against the literal
definition and reused outside the model.

This file ships to the Hub next to `modeling_ivpt.py` (the model's training forward calls `ivpt_objective`): it
imports only torch and torchvision (a dependency of timm).
"""

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2 import InterpolationMode

LOSS_TERMS = (
    "classification", "consistency", "presence", "orthogonality", "equivariance", "total_variation",
    "enforced_presence", "entropy",
)


def consistency_loss(projected_map: torch.Tensor, target_map: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """KL(target ‖ projected) per pixel, summed over parts, averaged over pixels and batch (docs/method.md#consistency-loss).

    Both maps are `(batch_size, num_parts + 1, num_pixels)`; the caller detaches the target.
    """
    target = target_map + eps
    return (target * (target / (projected_map + eps)).log()).sum(1).mean()


def total_variation_loss(maps: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation summed over channels and both axes, divided by B·H·W (docs/method.md#total-variation-loss)."""
    batch_size, _, height, width = maps.shape
    vertical = (maps[:, :, 1:] - maps[:, :, :-1]).abs().sum()
    horizontal = (maps[:, :, :, 1:] - maps[:, :, :, :-1]).abs().sum()
    return (vertical + horizontal) / (batch_size * height * width)


def presence_loss(maps: torch.Tensor) -> torch.Tensor:
    """1 − mean over foreground prototypes of their strongest 3×3-pooled response in the batch (docs/method.md#presence-loss)."""
    pooled = F.avg_pool2d(maps[:, :-1], kernel_size=3, stride=1)  # (B, P-1, H-2, W-2)
    return 1 - pooled.amax(dim=(0, 2, 3)).mean()


def orthogonality_loss(part_features: torch.Tensor) -> torch.Tensor:
    """Mean squared deviation of the parts' cosine Gram matrix from identity (docs/method.md#orthogonality-loss).

    `part_features` is `(batch_size, hidden_size, num_parts + 1)` (background column included).
    """
    unit = F.normalize(part_features, dim=1, eps=1e-12)
    gram = unit.transpose(1, 2) @ unit  # (B, K+1, K+1)
    identity = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    return ((gram - identity) ** 2).mean()


def radial_border_mask(height: int, width: int, device=None) -> torch.Tensor:
    """`(height, width)` mask, 0 at the centre and 1 in the corners: (gx² + gy²) / max with g ∈ [−1, 1] (docs/method.md#enforced-presence-loss)."""
    rows = torch.linspace(-1, 1, height, device=device)
    cols = torch.linspace(-1, 1, width, device=device)
    radius = rows[:, None] ** 2 + cols[None, :] ** 2
    return radius / radius.max()


def enforced_presence_loss(maps: torch.Tensor) -> torch.Tensor:
    """Background must dominate somewhere near the border of every image: mean_b −ln max(mask·pooled_bg) (docs/method.md#enforced-presence-loss)."""
    pooled_background = F.avg_pool2d(maps[:, -1:], kernel_size=3, stride=1)[:, 0]  # (B, H-2, W-2)
    mask = radial_border_mask(*pooled_background.shape[-2:], device=maps.device).to(maps.dtype)
    strongest = (pooled_background * mask).amax(dim=(1, 2))
    return F.binary_cross_entropy(strongest, torch.ones_like(strongest))  # BCE clamps ln at −100 like the release


def pixel_entropy_loss(maps: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel Shannon entropy over prototypes, after clamping to [1e-6, 1] and re-normalising (docs/method.md#entropy-loss)."""
    probabilities = maps.float().clamp(1e-6, 1)
    probabilities = probabilities / probabilities.sum(1, keepdim=True)
    return -(probabilities * probabilities.log()).sum(1).mean()


def equivariance_loss(maps: torch.Tensor, restored_maps: torch.Tensor) -> torch.Tensor:
    """1 − mean cosine similarity of each foreground map with the un-warped map of the warped image (docs/method.md#equivariance-loss)."""
    return 1 - F.cosine_similarity(maps[:, :-1].flatten(2), restored_maps[:, :-1].flatten(2), dim=-1, eps=1e-8).mean()


@dataclass(frozen=True)
class EquivarianceWarp:
    """One similarity transform shared by a device batch: rotation (degrees), integer translation (pixels), scale."""

    angle: float
    translation: tuple[int, int]
    scale: float


def sample_equivariance_warp(
    image_size: int,
    max_rotation: float = 90.0,
    max_translation: float = 0.11,
    scale_range: Sequence[float] = (0.8, 1.4),
    generator: torch.Generator | None = None,
) -> EquivarianceWarp:
    """Draws θ ~ U(−max_rotation, max_rotation), t ~ round(U(−m, m)) with m = max_translation·size, σ ~ U(range) (docs/method.md#equivariance-loss)."""
    uniform = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    max_shift = max_translation * image_size
    low, high = scale_range
    return EquivarianceWarp(
        angle=(2 * uniform[0] - 1) * max_rotation,
        translation=(round((2 * uniform[1] - 1) * max_shift), round((2 * uniform[2] - 1) * max_shift)),
        scale=low + uniform[3] * (high - low),
    )


def warp_images(pixel_values: torch.Tensor, warp: EquivarianceWarp) -> torch.Tensor:
    """Forward warp of normalised images: bilinear, about the centre, torchvision's default fill (docs/method.md#equivariance-loss).

    No `fill` argument, as the release: the bilinear kernel reads zeros (the mean colour after normalisation) outside
    the image. An explicit `fill=0` is not the same: torchvision then re-blends every pixel whose bilinear footprint
    crosses the border with the fill colour by its in-image fraction.
    """
    return TF.affine(
        pixel_values, angle=warp.angle, translate=list(warp.translation), scale=warp.scale, shear=[0.0, 0.0],
        interpolation=InterpolationMode.BILINEAR,
    )


def unwarp_maps(maps: torch.Tensor, warp: EquivarianceWarp, image_size: int) -> torch.Tensor:
    """Inverse warp of maps of the warped image back to the original frame: untranslate, then unrotate-unscale.

    Nearest interpolation and zero fill, as torchvision's defaults in the release (docs/method.md#equivariance-loss, docs/method.md#quirks [inverse map warp]).
    """
    shift = [-t * maps.shape[-1] / image_size for t in warp.translation]
    maps = TF.affine(maps, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0])
    return TF.affine(maps, angle=-warp.angle, translate=[0.0, 0.0], scale=1 / warp.scale, shear=[0.0, 0.0])


@torch.compiler.disable  # host-side preparation from Python floats: nothing for a compiled graph to capture
def unwarp_source_index(warp: EquivarianceWarp, height: int, width: int, image_size: int) -> torch.Tensor:
    """`(height · width,)` int64, on the CPU: for each cell of an un-warped `height` × `width` map, the flat index of
    the warped map's cell that `unwarp_maps` copies into it, or `height · width` where it writes the zero fill.

    Both affine calls of `unwarp_maps` interpolate nearest, so they only move cells: applied to a float32 image of
    cell numbers 1..n (exact in float32, and the float32 grid of float32 maps), they give each output cell the number
    of its source, 0 for the fill.
    """
    cells = height * width
    numbers = torch.arange(1, cells + 1, dtype=torch.float32).view(1, 1, height, width)
    source = unwarp_maps(numbers, warp, image_size).flatten().long() - 1  # -1: the fill
    return torch.where(source < 0, cells, source)


def unwarp_stage_maps(stage_maps: Sequence[torch.Tensor], source_index: torch.Tensor) -> list[torch.Tensor]:
    """`unwarp_maps` of every stage's float32 maps `(B, P_s, H, W)`, as one gather on their concatenation with the
    `unwarp_source_index` of the warp (on the maps' device).

    The same values as one `unwarp_maps` call per stage, and gradients equal up to float summation order
    (docs/method.md#equivalent-forms), without its device work and host syncs: on a GPU each torchvision affine call
    makes two blocking host-to-device copies (its matrix and grid scale), and in the middle of the training step the
    host then waits for the whole first pass.
    """
    sizes = [maps.shape[1] for maps in stage_maps]
    maps = torch.cat(list(stage_maps), dim=1)  # (B, ΣP_s, H, W)
    padded = F.pad(maps.flatten(2), (0, 1))  # (B, ΣP_s, H·W + 1): the last cell is the zero fill
    return list(padded.index_select(2, source_index).view_as(maps).split(sizes, dim=1))


def ivpt_objective(
    logits: torch.Tensor,
    labels: torch.Tensor,
    part_features: torch.Tensor,
    assignment_maps: Sequence[torch.Tensor],
    projected_maps: Sequence[torch.Tensor],
    restored_maps: Sequence[torch.Tensor],
    weights: dict[str, float],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total IVPT loss of docs/method.md#objective and its unweighted terms.

    Per-stage terms (presence, equivariance, total variation, enforced presence, entropy) are averaged over all
    stages; consistency over the intermediate stages against the detached final projected map.
    `restored_maps` are the stage maps of the warped image, un-warped (see `unwarp_maps`, `unwarp_stage_maps`).
    `weights` maps each name of `LOSS_TERMS` to its weight.
    """

    def over_stages(loss_fn, *map_lists):
        return torch.stack([loss_fn(*maps) for maps in zip(*map_lists)]).mean()

    target = projected_maps[-1].detach()
    terms = {
        "classification": F.cross_entropy(logits, labels),
        "consistency": torch.stack([consistency_loss(projected, target) for projected in projected_maps[:-1]]).mean(),
        "presence": over_stages(presence_loss, assignment_maps),
        "orthogonality": orthogonality_loss(part_features),
        "equivariance": over_stages(equivariance_loss, assignment_maps, restored_maps),
        "total_variation": over_stages(total_variation_loss, assignment_maps),
        "enforced_presence": over_stages(enforced_presence_loss, assignment_maps),
        "entropy": over_stages(pixel_entropy_loss, assignment_maps),
    }
    loss = sum(weights[name] * value for name, value in terms.items())
    return loss, terms
