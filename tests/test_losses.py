"""Loss terms of docs/method.md#objective against literal (loop) formulations; warps of docs/method.md#equivariance-loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from ivpt.losses import (
    EquivarianceWarp,
    consistency_loss,
    enforced_presence_loss,
    equivariance_loss,
    orthogonality_loss,
    pixel_entropy_loss,
    presence_loss,
    radial_border_mask,
    sample_equivariance_warp,
    total_variation_loss,
    unwarp_maps,
    unwarp_source_index,
    unwarp_stage_maps,
    warp_images,
)


def random_maps(batch=2, prototypes=5, size=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, prototypes, size, size, generator=g, dtype=dtype).mul(3).softmax(1)


def test_total_variation_literal():
    maps = random_maps()
    b, p, h, w = maps.shape
    total = 0.0
    for i in range(b):
        for j in range(p):
            for y in range(h):
                for x in range(w):
                    if y + 1 < h:
                        total += abs(maps[i, j, y + 1, x] - maps[i, j, y, x])
                    if x + 1 < w:
                        total += abs(maps[i, j, y, x + 1] - maps[i, j, y, x])
    torch.testing.assert_close(total_variation_loss(maps), total / (b * h * w))


def test_presence_literal():
    maps = random_maps(batch=3)
    b, p, h, w = maps.shape
    strongest = []
    for j in range(p - 1):  # foreground only
        best = max(
            maps[i, j, y : y + 3, x : x + 3].mean() for i in range(b) for y in range(h - 2) for x in range(w - 2)
        )
        strongest.append(best)
    torch.testing.assert_close(presence_loss(maps), 1 - torch.stack(strongest).mean())


def test_enforced_presence_literal():
    maps = random_maps(batch=3)
    b, p, h, w = maps.shape
    n = h - 2
    mask = torch.tensor([[((x / (n - 1) * 2 - 1) ** 2 + (y / (n - 1) * 2 - 1) ** 2) for x in range(n)]
                         for y in range(n)], dtype=torch.float64)
    mask = mask / mask.max()
    torch.testing.assert_close(radial_border_mask(n, n, ).double(), mask)
    assert radial_border_mask(n, n)[n // 2, n // 2] == 0 and radial_border_mask(n, n)[0, 0] == 1
    losses = []
    for i in range(b):
        pooled = torch.stack([torch.stack([maps[i, -1, y : y + 3, x : x + 3].mean() for x in range(n)])
                              for y in range(n)])
        losses.append(-torch.log((pooled * mask).max()))
    torch.testing.assert_close(enforced_presence_loss(maps), torch.stack(losses).mean())


def test_enforced_presence_clamps_log_like_bce():
    maps = torch.zeros(2, 3, 6, 6)
    maps[:, 0] = 1  # background never present: −ln 0 clamped to 100
    assert enforced_presence_loss(maps).item() == pytest.approx(100.0)


def test_entropy_literal():
    maps = random_maps()
    clamped = maps.clamp(1e-6, 1)
    p = clamped / clamped.sum(1, keepdim=True)
    expected = torch.stack([
        -sum(p[i, j, y, x] * math.log(p[i, j, y, x]) for j in range(maps.shape[1]))
        for i in range(2) for y in range(7) for x in range(7)
    ]).mean()
    torch.testing.assert_close(pixel_entropy_loss(maps).double(), expected.double(), rtol=1e-6, atol=1e-6)


def test_orthogonality_literal():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 16, 4, generator=g, dtype=torch.float64)
    total = 0.0
    for i in range(2):
        for a in range(4):
            for b in range(4):
                cos = features[i, :, a] @ features[i, :, b] / (features[i, :, a].norm() * features[i, :, b].norm())
                total += (cos - float(a == b)) ** 2
    torch.testing.assert_close(orthogonality_loss(features), total / (2 * 4 * 4))
    orthonormal = torch.eye(16, dtype=torch.float64)[None, :, :4].repeat(2, 1, 1)
    assert orthogonality_loss(orthonormal).item() == pytest.approx(0.0)


def test_consistency_literal_and_zero_on_identical_maps():
    target = random_maps(seed=1).flatten(2)
    projected = random_maps(seed=2).flatten(2)
    eps = 1e-10
    expected = torch.stack([
        sum((target[i, k, n] + eps) * torch.log((target[i, k, n] + eps) / (projected[i, k, n] + eps))
            for k in range(5))
        for i in range(2) for n in range(49)
    ]).mean()
    torch.testing.assert_close(consistency_loss(projected, target), expected)
    assert consistency_loss(target, target).item() == pytest.approx(0.0, abs=1e-12)


def test_equivariance_literal_foreground_only():
    maps, restored = random_maps(seed=3), random_maps(seed=4)
    restored[:, -1] = 0  # background channel is ignored
    cosines = [F.cosine_similarity(maps[i, j].flatten(), restored[i, j].flatten(), dim=0)
               for i in range(2) for j in range(4)]
    torch.testing.assert_close(equivariance_loss(maps, restored), 1 - torch.stack(cosines).mean())
    assert equivariance_loss(maps, maps).item() == pytest.approx(0.0, abs=1e-12)


def test_warp_sampling_ranges_and_determinism():
    warps = [sample_equivariance_warp(518, generator=torch.Generator().manual_seed(i)) for i in range(200)]
    assert all(-90 <= w.angle <= 90 and 0.8 <= w.scale <= 1.4 for w in warps)
    assert all(isinstance(t, int) and abs(t) <= 57 for w in warps for t in w.translation)  # 0.11·518 = 56.98
    assert max(abs(w.angle) for w in warps) > 80 and max(abs(w.translation[0]) for w in warps) > 45
    again = sample_equivariance_warp(518, generator=torch.Generator().manual_seed(7))
    assert again == warps[7]


def test_unwarp_inverts_warp_on_maps():
    """A map warped like an image (nearest) and un-warped returns to itself away from the borders."""
    size = 64
    maps = torch.zeros(1, 2, size, size)
    maps[0, 0, 24:40, 20:36] = 1.0
    maps[0, 1] = 1 - maps[0, 0]
    for warp in (EquivarianceWarp(30.0, (6, -4), 1.2), EquivarianceWarp(-75.0, (-5, 3), 0.9)):
        warped = warp_images(maps, warp)
        restored = unwarp_maps(warped, warp, image_size=size)
        inner = (slice(None), 0, slice(16, 48), slice(16, 48))
        assert (restored[inner] - maps[inner]).abs().mean() < 0.05


@pytest.mark.parametrize("warp", [
    EquivarianceWarp(-63.4, (11, -7), 1.27), EquivarianceWarp(8.0, (-2, 5), 0.83),
    EquivarianceWarp(90.0, (7, -21), 1.0),  # shifts of exactly half a cell (7 px = 0.5 cell at 518 px / 37 cells)
    *(sample_equivariance_warp(518, generator=torch.Generator().manual_seed(seed)) for seed in range(5)),
])
def test_unwarp_stage_maps_equals_one_unwarp_maps_call_per_stage(warp):
    """The training objective's un-warp (one gather with `unwarp_source_index` on the concatenated stages) gives
    exactly the values of torchvision's affine calls in `unwarp_maps`, stage by stage, and the same gradients up to
    the order in which a cell that several cells read sums them."""
    generator = torch.Generator().manual_seed(3)
    stage_maps = [torch.rand(2, parts, 37, 37, generator=generator).softmax(1).requires_grad_()
                  for parts in (17, 14, 11, 8, 5)]
    gathered = unwarp_stage_maps(stage_maps, unwarp_source_index(warp, 37, 37, image_size=518))
    expected = [unwarp_maps(maps, warp, image_size=518) for maps in stage_maps]
    assert [m.shape for m in gathered] == [m.shape for m in stage_maps]
    for restored, reference in zip(gathered, expected):
        assert torch.equal(restored, reference) and reference.abs().sum() > 0
    upstream = [torch.randn(m.shape, generator=generator) for m in stage_maps]
    gathered_grads = torch.autograd.grad(gather_sum(gathered, upstream), stage_maps)
    expected_grads = torch.autograd.grad(gather_sum(expected, upstream), stage_maps)
    for got, want in zip(gathered_grads, expected_grads):  # a cell read several times sums in another order
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert want.abs().sum() > 0


def gather_sum(maps, weights):
    return sum((m * w).sum() for m, w in zip(maps, weights))


def test_unwarp_source_index_names_sources_and_fill():
    """A non-square grid: every entry is a cell of the warped map or the fill index n = H·W; a pure translation by
    whole cells moves the index by whole cells and fills what enters from outside."""
    index = unwarp_source_index(EquivarianceWarp(30.0, (5, -3), 1.1), 12, 20, image_size=80)
    assert index.shape == (240,) and index.dtype == torch.int64 and index.min() >= 0 and index.max() == 240
    shift = unwarp_source_index(EquivarianceWarp(0.0, (8, 0), 1.0), 4, 4, image_size=16).view(4, 4)
    assert shift[:, :2].tolist() == [[2, 3], [6, 7], [10, 11], [14, 15]]  # reads 2 cells to the right
    assert (shift[:, 2:] == 16).all()  # beyond the right border: the fill


def test_unwarp_scales_translation_to_map_resolution():
    """A pure translation of t image pixels moves an 8x8 map of a 64 px image by t·8/64 cells."""
    maps = torch.zeros(1, 1, 8, 8)
    maps[0, 0, 3, 3] = 1
    restored = unwarp_maps(maps, EquivarianceWarp(0.0, (16, 8), 1.0), image_size=64)
    assert restored[0, 0, 2, 1] == 1 and restored.sum() == 1  # moved back by (2, 1) cells (x, y)


@pytest.mark.parametrize(
    "warp",
    [EquivarianceWarp(37.5, (0, 0), 1.0), EquivarianceWarp(0.0, (7, -5), 1.0), EquivarianceWarp(0.0, (0, 0), 1.3),
     EquivarianceWarp(-81.2, (-6, 4), 0.85), EquivarianceWarp(12.0, (3, 9), 1.37)],
)
def test_warp_images_is_torchvision_affine_without_fill(warp):
    """Bit-equal to the release's call (no `fill` argument), border pixels included; an explicit fill=0 differs."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    expected = TF.affine(images, warp.angle, list(warp.translation), warp.scale, shear=[0, 0],
                         interpolation=InterpolationMode.BILINEAR)
    warped = warp_images(images, warp)
    assert torch.equal(warped, expected)
    border = torch.ones(48, 48, dtype=torch.bool)
    border[2:-2, 2:-2] = False
    assert torch.equal(warped[..., border], expected[..., border])  # the edges, spelled out
    if warp.angle or warp.scale != 1:  # some footprints cross the border at fractional positions
        with_fill = TF.affine(images, warp.angle, list(warp.translation), warp.scale, shear=[0, 0],
                              interpolation=InterpolationMode.BILINEAR, fill=0.0)
        assert not torch.equal(warped, with_fill)
