"""Tests of the docs/method.md#consistency / docs/method.md#stability consistency and stability metrics (ivpt.metrics.consistency)."""

import math

import numpy as np
import pytest
import torch

from ivpt.metrics import (
    consistency_score,
    part_hits,
    part_points_on_canvas,
    perturb_normalised_images,
    prototype_regions,
    stability_score,
)
from ivpt.metrics.consistency import near_constant_maps


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CANVAS = 224
HALF = 36


# ----------------------------------------------------------------------------------------------
# literal (loop) formulations of the spec
# ----------------------------------------------------------------------------------------------


def literal_points(keypoints, boxes, canvas=CANVAS):
    """docs/method.md#consistency step 2 / docs/method.md#box-cropping with Python ints and floats, one keypoint at a time."""
    points, visible = [], []
    for image_keypoints, (x, y, w, h) in zip(keypoints.tolist(), boxes.tolist()):
        x1, y1 = int(str(x).split(".")[0]), int(str(y).split(".")[0])  # crop.py: cut at the '.'
        x2, y2 = x1 + int(str(w).split(".")[0]), y1 + int(str(h).split(".")[0])
        image_points, image_visible = [], []
        for kx, ky, v in image_keypoints:
            if v == 1:
                rx = (int(kx) - x1) / (x2 - x1)
                ry = (int(ky) - y1) / (y2 - y1)
                image_points.append([int(canvas * rx), int(canvas * ry)])
            else:
                image_points.append([0, 0])
            image_visible.append(v == 1)
        points.append(image_points)
        visible.append(image_visible)
    return torch.tensor(points), torch.tensor(visible)


def opencv_cubic_matrix(source, target):
    """Row-interpolation matrix of OpenCV INTER_CUBIC (a = -0.75, half-pixel, replicated border)."""
    a = -0.75
    matrix = np.zeros((target, source))
    scale = source / target
    for d in range(target):
        fx = (d + 0.5) * scale - 0.5
        sx = math.floor(fx)
        t = fx - sx
        c0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
        c1 = ((a + 2) * t - (a + 3)) * t * t + 1
        c2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
        c3 = 1 - c0 - c1 - c2
        for offset, weight in zip((-1, 0, 1, 2), (c0, c1, c2, c3)):
            matrix[d, min(max(sx + offset, 0), source - 1)] += weight
    return matrix


def opencv_cubic_resize(array, size):
    return opencv_cubic_matrix(array.shape[0], size) @ array @ opencv_cubic_matrix(array.shape[1], size).T


def literal_regions(maps, canvas=CANVAS, half_size=HALF):
    """docs/method.md#consistency step 3 per image and prototype with the NumPy OpenCV-style resize and np.where."""
    regions = []
    for image_maps in maps.double().numpy():
        image_regions = []
        for prototype_map in image_maps[:-1]:
            upsampled = opencv_cubic_resize(prototype_map, canvas)
            rows, columns = np.where(upsampled == upsampled.max())
            r, c = int(rows[0]), int(columns[0])
            image_regions.append(
                [max(0, r - half_size), min(canvas, r + half_size), max(0, c - half_size), min(canvas, c + half_size)]
            )
        regions.append(image_regions)
    return torch.tensor(regions)


def literal_hits(regions, points, visible):
    num_images, num_prototypes, _ = regions.shape
    num_parts = points.shape[1]
    hits = torch.zeros(num_images, num_prototypes, num_parts, dtype=torch.bool)
    for i in range(num_images):
        for j in range(num_prototypes):
            row_low, row_high, column_low, column_high = regions[i, j].tolist()
            for part in range(num_parts):
                column, row = points[i, part].tolist()
                if visible[i, part] and row_low <= row <= row_high and column_low <= column <= column_high:
                    hits[i, j, part] = True
    return hits


def literal_consistency(hits, visible, labels, num_classes, threshold=0.8):
    consistent = 0
    for c in range(num_classes):
        members = [i for i in range(len(labels)) if labels[i] == c]
        for j in range(hits.shape[1]):
            frequencies = []
            for part in range(hits.shape[2]):
                hit_sum = sum(int(hits[i, j, part]) for i in members)
                visible_sum = sum(int(visible[i, part]) for i in members)
                frequencies.append(hit_sum / max(1, visible_sum))
            consistent += max(frequencies) >= threshold
    return 100.0 * consistent / (num_classes * hits.shape[1])


def literal_stability(hits_clean, hits_noisy, labels, num_classes):
    total = 0.0
    for c in range(num_classes):
        members = [i for i in range(len(labels)) if labels[i] == c]
        for j in range(hits_clean.shape[1]):
            same = [bool(torch.equal(hits_clean[i, j], hits_noisy[i, j])) for i in members]
            total += sum(same) / len(same) if same else 0.0
    return 100.0 * total / (num_classes * hits_clean.shape[1])


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def random_annotations(generator, num_images, num_parts=15):
    boxes = torch.stack(
        [
            torch.rand(num_images, generator=generator, dtype=torch.float64) * 100,
            torch.rand(num_images, generator=generator, dtype=torch.float64) * 100,
            20 + torch.rand(num_images, generator=generator, dtype=torch.float64) * 300,
            20 + torch.rand(num_images, generator=generator, dtype=torch.float64) * 300,
        ],
        dim=1,
    )
    # keypoints mostly inside the box, some slightly outside (negative relative coordinates)
    relative = torch.rand(num_images, num_parts, 2, generator=generator, dtype=torch.float64) * 1.2 - 0.1
    xy = boxes[:, None, :2] + relative * boxes[:, None, 2:]
    visible = (torch.rand(num_images, num_parts, generator=generator) < 0.7).double()
    xy = xy.clamp(min=0) * visible[..., None]  # invisible parts are stored as (0, 0, 0) in CUB
    return torch.cat([xy, visible[..., None]], dim=-1), boxes


def canvas_maps_peaked_at(peaks, num_prototypes):
    """(N, P + 1, canvas, canvas) maps whose foreground channel j peaks at peaks[i][j] = (row, col)."""
    maps = torch.full((len(peaks), num_prototypes + 1, CANVAS, CANVAS), 0.01)
    for i, image_peaks in enumerate(peaks):
        for j, (row, column) in enumerate(image_peaks):
            maps[i, j, row, column] = 1.0
    return maps


# ----------------------------------------------------------------------------------------------
# part points
# ----------------------------------------------------------------------------------------------


def test_part_points_hand_computed():
    keypoints = torch.tensor([[[30.7, 50.2, 1.0], [5.0, 21.0, 1.0], [99.0, 99.0, 0.0], [109.9, 69.9, 1.0]]])
    boxes = torch.tensor([[10.9, 20.5, 100.8, 50.9]], dtype=torch.float64)
    points, visible = part_points_on_canvas(keypoints.double(), boxes)
    # integer box: x1 = 10, y1 = 20, x2 = 110, y2 = 70
    # (30, 50): rx = 20/100 -> int(44.8) = 44, ry = 30/50 -> int(134.4) = 134
    # (5, 21): rx = -0.05 -> int(-11.2) = -11 (truncation toward zero), ry = 1/50 -> int(4.48) = 4
    # (109, 69): rx = 0.99 -> int(221.76) = 221, ry = 0.98 -> int(219.52) = 219
    assert points.tolist() == [[[44, 134], [-11, 4], [0, 0], [221, 219]]]
    assert visible.tolist() == [[True, True, False, True]]


@pytest.mark.parametrize("device", DEVICES)
def test_part_points_against_literal_loop(device):
    keypoints, boxes = random_annotations(torch.Generator().manual_seed(0), 50)
    expected_points, expected_visible = literal_points(keypoints, boxes)
    points, visible = part_points_on_canvas(keypoints.to(device), boxes.to(device))
    assert torch.equal(visible.cpu(), expected_visible)
    assert torch.equal(points.cpu(), expected_points)


def test_part_points_accept_the_dataset_row_layouts():
    keypoints, boxes = random_annotations(torch.Generator().manual_seed(1), 6)
    part_ids = torch.arange(1, 16, dtype=torch.float64).expand(6, 15)[..., None]
    image_index = torch.arange(6, dtype=torch.float64)[:, None]
    expected = part_points_on_canvas(keypoints, boxes)
    result = part_points_on_canvas(torch.cat([part_ids, keypoints], -1), torch.cat([image_index, boxes], -1))
    assert all(torch.equal(a, b) for a, b in zip(result, expected))


def test_part_points_rejects_bad_shapes():
    with pytest.raises(ValueError, match="`keypoints`"):
        part_points_on_canvas(torch.zeros(2, 15, 2), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="`boxes`"):
        part_points_on_canvas(torch.zeros(2, 15, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="`keypoints` and `boxes`"):
        part_points_on_canvas(torch.zeros(2, 15, 3), torch.zeros(3, 4))


# ----------------------------------------------------------------------------------------------
# prototype regions
# ----------------------------------------------------------------------------------------------


def test_regions_hand_computed_clipping():
    # canvas-sized maps: bicubic resizing to the same size is the identity, so the peak is exact
    peaks = [[(0, 0), (223, 223), (100, 150), (10, 200), (40, 36)]]
    regions = prototype_regions(canvas_maps_peaked_at(peaks, 5))
    assert regions.tolist() == [
        [
            [0, 36, 0, 36],  # clipped at 0
            [187, 224, 187, 224],  # clipped at the canvas size (224, not 223), as the reference
            [64, 136, 114, 186],
            [0, 46, 164, 224],
            [4, 76, 0, 72],
        ]
    ]


def test_regions_first_peak_in_row_major_order_on_ties():
    maps = torch.zeros(1, 2, CANVAS, CANVAS)
    maps[0, 0, 50, 200] = 1.0
    maps[0, 0, 50, 100] = 1.0  # same row, earlier column: first in row-major order
    maps[0, 0, 120, 10] = 1.0
    assert prototype_regions(maps).tolist() == [[[14, 86, 64, 136]]]


def test_regions_drop_background_channel():
    maps = torch.rand(3, 11, 37, 37, generator=torch.Generator().manual_seed(0))
    assert prototype_regions(maps).shape == (3, 10, 4)
    with pytest.raises(ValueError, match="`maps`"):
        prototype_regions(torch.rand(3, 37, 37))


def test_bicubic_matches_opencv_inter_cubic_formula():
    maps = torch.rand(2, 3, 37, 37, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    upsampled = torch.nn.functional.interpolate(maps, size=(CANVAS, CANVAS), mode="bicubic", align_corners=False)
    for i in range(2):
        for j in range(3):
            expected = opencv_cubic_resize(maps[i, j].numpy(), CANVAS)
            np.testing.assert_allclose(upsampled[i, j].numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_regions_against_literal_loop(device):
    generator = torch.Generator().manual_seed(2)
    maps = torch.softmax(3 * torch.randn(4, 6, 37, 37, generator=generator, dtype=torch.float64), dim=1)
    regions = prototype_regions(maps.to(device))
    assert torch.equal(regions.cpu(), literal_regions(maps))
    # float32 maps (as produced by the model) give the same regions on these inputs
    assert torch.equal(prototype_regions(maps.float().to(device)).cpu(), literal_regions(maps))


def test_delta_on_grid_peaks_at_the_nearest_canvas_pixel():
    maps = torch.zeros(1, 2, 37, 37)
    maps[0, 0, 20, 15] = 1.0  # far enough from the edges that no bound is clipped
    row_low, row_high, column_low, column_high = prototype_regions(maps)[0, 0].tolist()
    row, column = row_low + HALF, column_low + HALF
    # grid cell centre i maps to canvas coordinate (i + 0.5) * 224 / 37 - 0.5
    assert abs(row - ((20 + 0.5) * CANVAS / 37 - 0.5)) <= 0.5
    assert abs(column - ((15 + 0.5) * CANVAS / 37 - 0.5)) <= 0.5
    assert (row_high, column_high) == (row + HALF, column + HALF)


def absent_prototype_map(size=37, floor=9.99989e-7):
    """The eps floor of an absent prototype: constant in float32 (values of ~1e-6, variations far below an ulp)."""
    return torch.full((size, size), floor, dtype=torch.float32)


def test_constant_map_peak_is_a_tie_not_kernel_rounding():
    """An exactly constant map is tied everywhere: its peak is the canvas origin, whatever the dtype or the float32
    bicubic rounding says (float32 upsampling puts its arg-max at some rounding-decided pixel)."""
    maps = torch.zeros(2, 3, 37, 37)
    maps[:, 0] = absent_prototype_map()
    maps[:, 1] = 0.25
    maps[:, 2] = 1 - maps[:, 0] - maps[:, 1]
    float32_peak = torch.nn.functional.interpolate(maps[:, :1], size=(CANVAS, CANVAS), mode="bicubic").flatten(1)
    assert float32_peak.argmax(-1)[0].item() != 0  # the failure mode this guards against
    for dtype in (torch.float32, torch.float64):
        assert prototype_regions(maps.to(dtype)).tolist() == [[[0, HALF, 0, HALF]] * 2] * 2
    assert near_constant_maps(maps).tolist() == [[True, True]] * 2


def test_near_constant_map_keeps_its_one_ulp_peak():
    """Structure at the float32 rounding level decides the region (float64 upsampling), not the kernel's rounding."""
    prototype = absent_prototype_map()
    prototype[20, 10] = torch.nextafter(prototype[20, 10], torch.tensor(1.0))  # one ulp higher
    maps = torch.stack([prototype, 1 - prototype])[None]
    row_low, _, column_low, _ = prototype_regions(maps)[0, 0].tolist()
    assert abs(row_low + HALF - ((20 + 0.5) * CANVAS / 37 - 0.5)) <= 0.5
    assert abs(column_low + HALF - ((10 + 0.5) * CANVAS / 37 - 0.5)) <= 0.5
    assert prototype_regions(maps).tolist() == literal_regions(maps).tolist()
    float32 = torch.nn.functional.interpolate(maps[:, :1], size=(CANVAS, CANVAS), mode="bicubic").flatten(1)
    assert float32.argmax(-1).item() // CANVAS != row_low + HALF  # float32 rounding would move it elsewhere
    assert near_constant_maps(maps).tolist() == [[True]]


def test_tied_maxima_resolve_to_the_first_in_row_major_order():
    """Two equal peaks, mirrored so their canvas maxima tie exactly in exact arithmetic: the upper-left one wins,
    the same for the map and its offset copy, where a plain float64 upsampling lets rounding pick the right one."""
    prototype = torch.zeros(37, 37, dtype=torch.float64)
    prototype[10, 8] = prototype[10, 28] = 0.75  # columns 8 and 28 mirror each other about the centre column 18
    plain = torch.nn.functional.interpolate((prototype + 0.5)[None, None], size=(CANVAS, CANVAS), mode="bicubic")
    assert plain.flatten().argmax().item() % CANVAS > CANVAS // 2  # the failure mode this guards against
    for offset in (0.0, 0.5):
        maps = torch.stack([prototype + offset, 1 - prototype - offset])[None]
        row_low, _, column_low, _ = prototype_regions(maps)[0, 0].tolist()
        assert abs(column_low + HALF - ((8 + 0.5) * CANVAS / 37 - 0.5)) <= 0.5
        assert abs(row_low + HALF - ((10 + 0.5) * CANVAS / 37 - 0.5)) <= 0.5
    assert near_constant_maps(maps).tolist() == [[False]]


def test_near_constant_count_on_model_like_maps():
    """Softmax maps where one prototype is absent: its eps-renormalised map is flagged, the others are not."""
    logits = torch.randn(3, 5, 37, 37, generator=torch.Generator().manual_seed(0))
    logits[:, 2] = -200.0  # prototype 2 absent from every image
    maps = logits.softmax(1) + 1e-6
    maps = maps / maps.sum(1, keepdim=True)
    flags = near_constant_maps(maps)
    assert flags[:, 2].all() and int(flags.sum()) == 3


# ----------------------------------------------------------------------------------------------
# hits
# ----------------------------------------------------------------------------------------------


def test_hits_inclusive_bounds_hand_computed():
    regions = torch.tensor([[[10, 20, 30, 40]]])
    points = torch.tensor([[[30, 10], [40, 20], [29, 15], [41, 15], [35, 9], [35, 21], [35, 15]]])
    visible = torch.tensor([[True, True, True, True, True, True, False]])
    hits = part_hits(regions, points, visible)
    # corners are inside (inclusive); one off on either axis is outside; invisible never hits
    assert hits.tolist() == [[[True, True, False, False, False, False, False]]]


@pytest.mark.parametrize("device", DEVICES)
def test_hits_against_literal_loop(device):
    generator = torch.Generator().manual_seed(3)
    low = torch.randint(-10, CANVAS, (20, 10, 2), generator=generator)
    regions = torch.stack([low[..., 0], low[..., 0] + 72, low[..., 1], low[..., 1] + 72], dim=-1)
    points = torch.randint(-20, CANVAS + 20, (20, 15, 2), generator=generator)
    visible = torch.rand(20, 15, generator=generator) < 0.7
    hits = part_hits(regions.to(device), points.to(device), visible.to(device))
    assert torch.equal(hits.cpu(), literal_hits(regions, points, visible))


# ----------------------------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_consistency_and_stability_against_literal_loop(device):
    generator = torch.Generator().manual_seed(4)
    num_classes = 7  # class 6 has no images
    labels = torch.randint(0, 6, (60,), generator=generator)
    visible = torch.rand(60, 15, generator=generator) < 0.6
    # hits strongly correlated within a class so that both outcomes of the 0.8 test occur
    class_pattern = torch.rand(num_classes, 5, 15, generator=generator) < 0.5
    noise = torch.rand(60, 5, 15, generator=generator) < 0.1
    hits = (class_pattern[labels] ^ noise) & visible[:, None, :]
    hits_noisy = hits ^ ((torch.rand(60, 5, 15, generator=generator) < 0.02) & visible[:, None, :])
    expected_consistency = literal_consistency(hits, visible, labels, num_classes)
    expected_stability = literal_stability(hits, hits_noisy, labels, num_classes)
    assert 0 < expected_consistency < 100 and 0 < expected_stability < 100
    to = dict(device=device)
    # labels may stay on the CPU while the hits live on the device
    assert consistency_score(hits.to(**to), visible.to(**to), labels, num_classes) == pytest.approx(
        expected_consistency, abs=1e-9
    )
    assert stability_score(hits.to(**to), hits_noisy.to(**to), labels, num_classes) == pytest.approx(
        expected_stability, abs=1e-9
    )


def test_consistency_threshold_is_inclusive():
    # 4 of 5 images hit the only visible part: frequency exactly 0.8 -> consistent
    hits = torch.tensor([True, True, True, True, False]).reshape(5, 1, 1)
    visible = torch.ones(5, 1, dtype=torch.bool)
    labels = torch.zeros(5, dtype=torch.long)
    assert consistency_score(hits, visible, labels, num_classes=1) == 100.0
    assert consistency_score(hits, visible, labels, num_classes=1, threshold=0.81) == 0.0


def test_empty_classes_count_in_the_denominator():
    hits = torch.ones(4, 2, 3, dtype=torch.bool)
    visible = torch.ones(4, 3, dtype=torch.bool)
    labels = torch.tensor([0, 0, 1, 1])
    assert consistency_score(hits, visible, labels, num_classes=2) == 100.0
    assert consistency_score(hits, visible, labels, num_classes=4) == 50.0  # classes 2 and 3 are empty
    assert stability_score(hits, hits, labels, num_classes=4) == 50.0


def end_to_end_annotations(num_classes=4, per_class=5, num_parts=15):
    """Images whose parts are all visible and lie in the top-left area of the canvas (< 100 px)."""
    generator = torch.Generator().manual_seed(5)
    num_images = num_classes * per_class
    boxes = torch.tensor([[12.0, 7.0, 448.0, 224.0]], dtype=torch.float64).repeat(num_images, 1)
    relative = 0.05 + 0.35 * torch.rand(num_images, num_parts, 2, generator=generator, dtype=torch.float64)
    xy = boxes[:, None, :2] + relative * boxes[:, None, 2:]
    keypoints = torch.cat([xy, torch.ones(num_images, num_parts, 1, dtype=torch.float64)], dim=-1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return keypoints, boxes, labels


@pytest.mark.parametrize("grid", ["canvas", "37x37"])
def test_consistency_100_when_each_prototype_peaks_at_a_visible_part(grid):
    keypoints, boxes, labels = end_to_end_annotations()
    points, visible = part_points_on_canvas(keypoints, boxes)
    num_prototypes = 10
    if grid == "canvas":
        peaks = [[tuple(points[i, j].flip(0).tolist()) for j in range(num_prototypes)] for i in range(len(labels))]
        maps = canvas_maps_peaked_at(peaks, num_prototypes)
    else:  # peak on the 37x37 cell containing the part point; the upsampled peak is within a cell
        maps = torch.full((len(labels), num_prototypes + 1, 37, 37), 0.01)
        for i in range(len(labels)):
            for j in range(num_prototypes):
                column, row = points[i, j].tolist()
                maps[i, j, row * 37 // CANVAS, column * 37 // CANVAS] = 1.0

    def toy_model(pixel_values):  # image-dependent positive rescaling of the fixed maps
        return maps * pixel_values.exp().mean(dim=(1, 2, 3))[:, None, None, None]

    pixel_values = torch.randn(len(labels), 3, 8, 8, generator=torch.Generator().manual_seed(1))
    hits = part_hits(prototype_regions(toy_model(pixel_values)), points, visible)
    assert consistency_score(hits, visible, labels, num_classes=4) == 100.0

    # noise-free perturbation: std 0 leaves the images, hence the maps and the hits, unchanged
    perturbed = perturb_normalised_images(pixel_values, torch.Generator().manual_seed(0), std=0.0)
    assert torch.equal(perturbed, pixel_values)
    hits_noisy = part_hits(prototype_regions(toy_model(perturbed)), points, visible)
    assert stability_score(hits, hits_noisy, labels, num_classes=4) == 100.0


def test_consistency_0_when_peaks_are_outside_every_part():
    keypoints, boxes, labels = end_to_end_annotations()
    points, visible = part_points_on_canvas(keypoints, boxes)
    assert int(points.max()) < CANVAS - 1 - 2 * HALF - 10  # all points far from the bottom-right
    peaks = [[(223, 223), (223, 200), (200, 223), (210, 210)]] * len(labels)
    hits = part_hits(prototype_regions(canvas_maps_peaked_at(peaks, 4)), points, visible)
    assert not hits.any()
    assert consistency_score(hits, visible, labels, num_classes=4) == 0.0
    assert stability_score(hits, hits, labels, num_classes=4) == 100.0


# ----------------------------------------------------------------------------------------------
# stability noise
# ----------------------------------------------------------------------------------------------


def test_perturbation_is_seeded_clipped_and_keeps_dtype():
    pixel_values = torch.zeros(4, 3, 64, 64, dtype=torch.float64)
    first = perturb_normalised_images(pixel_values, torch.Generator().manual_seed(7))
    second = perturb_normalised_images(pixel_values, torch.Generator().manual_seed(7))
    other = perturb_normalised_images(pixel_values, torch.Generator().manual_seed(8))
    assert torch.equal(first, second) and not torch.equal(first, other)
    assert first.dtype == torch.float64 and first.shape == pixel_values.shape
    assert float(first.abs().max()) <= 0.25
    assert float((first.abs() == 0.25).double().mean()) == pytest.approx(0.2113, abs=0.01)  # P(|N(0,.2)| > .25)
    assert float(first.std()) == pytest.approx(0.2 * 0.8, abs=0.03)  # clipped normal is narrower
    with pytest.raises(ValueError, match="`pixel_values`"):
        perturb_normalised_images(torch.zeros(3, 8, 8), torch.Generator())
