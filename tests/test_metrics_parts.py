"""Tests of the docs/method.md#nmi-and-ari NMI/ARI and docs/method.md#keypoint-regression keypoint-regression metrics."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score
from sklearn.metrics import normalized_mutual_info_score

from ivpt.metrics import (
    box_normalised_keypoints,
    keypoint_part_assignments,
    keypoint_regression_error,
    nmi_ari,
    part_centroid_features,
)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IMAGE_SIZE = 518


# ----------------------------------------------------------------------------------------------
# NMI / ARI
# ----------------------------------------------------------------------------------------------


def test_nmi_ari_equal_scikit_learn_on_random_labels():
    rng = np.random.default_rng(0)
    predicted = rng.integers(0, 11, size=500)
    ground_truth = rng.integers(0, 15, size=500)
    result = nmi_ari(torch.from_numpy(predicted), ground_truth)
    assert result["nmi"] == pytest.approx(100 * normalized_mutual_info_score(ground_truth, predicted), abs=1e-12)
    assert result["ari"] == pytest.approx(100 * adjusted_rand_score(ground_truth, predicted), abs=1e-12)


def test_nmi_ari_perfect_up_to_relabelling():
    ground_truth = torch.arange(15).repeat(7)
    assert nmi_ari((ground_truth * 2 + 1) % 15, ground_truth) == {"nmi": pytest.approx(100.0), "ari": 100.0}


def test_nmi_ari_errors():
    with pytest.raises(ValueError, match="`predicted` and `ground_truth`"):
        nmi_ari(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="`predicted`"):
        nmi_ari(np.zeros((3, 1)), np.zeros(3))


def random_keypoints(generator, num_images, num_keypoints=15, size=IMAGE_SIZE):
    xy = torch.rand(num_images, num_keypoints, 2, generator=generator) * size
    visible = (torch.rand(num_images, num_keypoints, generator=generator) < 0.7).float()
    return torch.cat([xy * visible[..., None], visible[..., None]], dim=-1)


def literal_assignments(maps, keypoints, size=IMAGE_SIZE):
    """docs/method.md#nmi-and-ari one image and one keypoint at a time (a single-point grid_sample per keypoint)."""
    predicted, ground_truth = [], []
    for image_maps, image_keypoints in zip(maps, keypoints):
        upsampled = F.interpolate(image_maps[None], size=(size, size), mode="bilinear", align_corners=False)
        for index, (x, y, visible) in enumerate(image_keypoints.tolist()):
            if visible > 0.5:
                grid = torch.tensor([[[[x / size * 2 - 1, y / size * 2 - 1]]]], dtype=maps.dtype)
                values = F.grid_sample(upsampled, grid, mode="nearest", align_corners=False)[0, :, 0, 0]
                predicted.append(int(values.argmax()))
                ground_truth.append(index)
    return torch.tensor(predicted), torch.tensor(ground_truth)


@pytest.mark.parametrize("device", DEVICES)
def test_keypoint_assignments_against_literal_per_keypoint_reference(device):
    generator = torch.Generator().manual_seed(1)
    maps = torch.softmax(2 * torch.randn(3, 11, 37, 37, generator=generator), dim=1)
    keypoints = random_keypoints(generator, 3)
    predicted, ground_truth = keypoint_part_assignments(maps.to(device), keypoints.to(device), IMAGE_SIZE)
    expected_predicted, expected_ground_truth = literal_assignments(maps, keypoints)
    assert torch.equal(ground_truth.cpu(), expected_ground_truth)
    assert torch.equal(predicted.cpu(), expected_predicted)
    assert len(set(expected_predicted.tolist())) > 3  # a non-trivial labelling


def test_keypoint_assignments_sample_the_nearest_upsampled_pixel():
    # independent formulation: pixel index = round-half-even(x - 0.5), value of the upsampled map
    generator = torch.Generator().manual_seed(2)
    maps = torch.rand(2, 5, 37, 37, generator=generator, dtype=torch.float64)
    keypoints = random_keypoints(generator, 2)
    upsampled = F.interpolate(maps, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    expected = []
    for i in range(2):
        for x, y, visible in keypoints[i].tolist():
            if visible > 0.5:
                column, row = int(np.rint(x - 0.5)), int(np.rint(y - 0.5))
                expected.append(int(upsampled[i, :, row, column].argmax()))
    predicted, _ = keypoint_part_assignments(maps, keypoints, IMAGE_SIZE)
    assert predicted.tolist() == expected


def test_keypoint_on_the_far_border_samples_padding_and_gets_label_0():
    maps = torch.zeros(1, 3, 37, 37)
    maps[0, 2] = 1.0  # background wins everywhere inside the image
    keypoints = torch.tensor([[[IMAGE_SIZE, 100.0, 1.0], [517.0, 100.0, 1.0], [0.0, 0.0, 1.0], [5.0, 5.0, 0.0]]])
    predicted, ground_truth = keypoint_part_assignments(maps, keypoints, IMAGE_SIZE)
    # x = 518 -> pixel 517.5 rounds (half to even) to 518, outside: zero padding, argmax = 0
    assert predicted.tolist() == [0, 2, 2]
    assert ground_truth.tolist() == [0, 1, 2]


def test_keypoint_assignments_errors():
    with pytest.raises(ValueError, match="`keypoints`"):
        keypoint_part_assignments(torch.rand(2, 3, 4, 4), torch.rand(2, 15, 2), IMAGE_SIZE)
    with pytest.raises(ValueError, match="`maps` and `keypoints`"):
        keypoint_part_assignments(torch.rand(2, 3, 4, 4), torch.rand(3, 15, 3), IMAGE_SIZE)


# ----------------------------------------------------------------------------------------------
# KPR
# ----------------------------------------------------------------------------------------------


def literal_centroids(maps, boxes, size=IMAGE_SIZE):
    features, active = [], []
    for image_maps, (bx, by, bw, bh) in zip(maps.double(), boxes.tolist()):
        image_features, image_active = [], []
        for part_map in image_maps[:-1]:
            grid = part_map.shape[0]
            total = row_sum = column_sum = 0.0
            for h in range(grid):
                for w in range(grid):
                    value = float(part_map[h, w])
                    total += value
                    row_sum += h * value
                    column_sum += w * value
            row, column = row_sum / total * size / grid, column_sum / total * size / grid
            image_features.append([(column - bx) / bw, (row - by) / bh])
            image_active.append(float(part_map.max()) > 0.5)
        features.append(image_features)
        active.append(image_active)
    return torch.tensor(features, dtype=torch.float64), torch.tensor(active)


def literal_kpr(fit_features, fit_active, fit_keypoints, eval_features, eval_active, eval_keypoints):
    """docs/method.md#keypoint-regression with explicit standardisation (ddof 0, unit scale for constant features) and lstsq."""

    def design(features, active):
        x = features.reshape(len(features), -1).numpy().copy()
        return x, np.repeat(~active.numpy(), 2, axis=1)

    fit_x, fit_inactive = design(fit_features, fit_active)
    eval_x, eval_inactive = design(eval_features, eval_active)
    errors, counts = [], []
    for keypoint in range(fit_keypoints.shape[1]):
        fit_rows = fit_keypoints[:, keypoint, 2].numpy() > 0.5
        eval_rows = eval_keypoints[:, keypoint, 2].numpy() > 0.5
        if not eval_rows.any():
            continue
        mean, std = fit_x[fit_rows].mean(0), fit_x[fit_rows].std(0)
        std[std == 0] = 1
        target = fit_keypoints[fit_rows, keypoint, :2].numpy()
        target_mean, target_std = target.mean(0), target.std(0)
        a = (fit_x[fit_rows] - mean) / std
        a[fit_inactive[fit_rows]] = 0
        coefficients = np.linalg.lstsq(a, (target - target_mean) / target_std, rcond=None)[0]
        b = (eval_x[eval_rows] - mean) / std
        b[eval_inactive[eval_rows]] = 0
        predicted = b @ coefficients * target_std + target_mean
        truth = eval_keypoints[eval_rows, keypoint, :2].numpy()
        distances = [np.sqrt(((p - t) ** 2).sum()) for p, t in zip(predicted, truth)]
        errors.append(np.mean(distances))
        counts.append(len(distances))
    return 100 * sum(e * n for e, n in zip(errors, counts)) / sum(counts)


def random_boxes(generator, num_images):
    xy = torch.rand(num_images, 2, generator=generator) * 150
    wh = 150 + torch.rand(num_images, 2, generator=generator) * 200
    return torch.cat([xy, wh], dim=1)


@pytest.mark.parametrize("device", DEVICES)
def test_centroid_features_against_literal_loop(device):
    generator = torch.Generator().manual_seed(3)
    scale = torch.tensor([1.0, 0.45, 0.9, 0.3, 1.0, 1.0])[:, None, None]  # channels 1 and 3 inactive
    maps = torch.rand(3, 6, 9, 9, generator=generator) * scale
    boxes = random_boxes(generator, 3)
    features, active = part_centroid_features(maps.to(device), boxes.to(device), IMAGE_SIZE)
    expected_features, expected_active = literal_centroids(maps, boxes)
    assert features.shape == (3, 5, 2) and features.dtype == torch.float64
    torch.testing.assert_close(features.cpu(), expected_features, rtol=1e-12, atol=1e-12)
    assert torch.equal(active.cpu(), expected_active)
    assert 0 < int(expected_active.sum()) < expected_active.numel()


def test_centroid_of_a_delta_uses_the_top_left_convention():
    maps = torch.zeros(1, 2, 37, 37)
    maps[0, 0, 3, 10] = 1.0
    maps[0, 1] = 1.0 - maps[0, 0]
    boxes = torch.tensor([[0.0, 0.0, 518.0, 518.0]])
    features, active = part_centroid_features(maps, boxes, IMAGE_SIZE)
    assert features[0, 0].tolist() == pytest.approx([10 * 14 / 518, 3 * 14 / 518])
    assert active.tolist() == [[True]]


def test_box_normalised_keypoints():
    keypoints = torch.tensor([[[110.0, 70.0, 1.0], [0.0, 0.0, 0.0]]])
    boxes = torch.tensor([[10.0, 20.0, 200.0, 100.0]])
    assert box_normalised_keypoints(keypoints, boxes).tolist() == [[[0.5, 0.5, 1.0], [-0.05, -0.2, 0.0]]]


def delta_maps(generator, num_images, num_parts, grid=37):
    """Maps with one-hot foreground deltas (active, centroid = the delta) and background elsewhere."""
    maps = torch.zeros(num_images, num_parts + 1, grid, grid)
    cells = torch.randint(0, grid, (num_images, num_parts, 2), generator=generator)
    for i in range(num_images):
        for j in range(num_parts):
            maps[i, j, cells[i, j, 0], cells[i, j, 1]] = 1.0
    maps[:, -1] = 1.0 - maps[:, :-1].sum(1).clamp(max=1)
    return maps


def test_kpr_is_zero_when_keypoints_are_an_affine_function_of_the_centroids():
    generator = torch.Generator().manual_seed(4)
    num_parts, num_keypoints = 4, 15
    splits = {}
    weights = torch.randn(2 * num_parts, 2 * num_keypoints, generator=generator, dtype=torch.float64)
    offset = torch.randn(2 * num_keypoints, generator=generator, dtype=torch.float64)
    for name, num_images in (("fit", 60), ("eval", 25)):
        maps = delta_maps(generator, num_images, num_parts)
        boxes = random_boxes(generator, num_images)
        features, active = part_centroid_features(maps, boxes, IMAGE_SIZE)
        assert active.all()
        targets = (features.reshape(num_images, -1) @ weights + offset).reshape(num_images, num_keypoints, 2)
        # back to pixels, then through the same box normalisation the evaluation uses
        pixels = targets * boxes[:, None, 2:].double() + boxes[:, None, :2].double()
        visible = (torch.rand(num_images, num_keypoints, 1, generator=generator) < 0.8).double()
        keypoints = box_normalised_keypoints(torch.cat([pixels, visible], dim=-1), boxes)
        splits[name] = (features, active, keypoints)
    assert keypoint_regression_error(*splits["fit"], *splits["eval"]) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_kpr_against_literal_formulation(device):
    generator = torch.Generator().manual_seed(5)
    num_parts, num_keypoints = 5, 6
    splits = {}
    for name, num_images in (("fit", 40), ("eval", 20)):
        features = torch.rand(num_images, num_parts, 2, generator=generator, dtype=torch.float64)
        active = torch.rand(num_images, num_parts, generator=generator) < 0.8
        keypoints = torch.rand(num_images, num_keypoints, 3, generator=generator, dtype=torch.float64)
        keypoints[..., 2] = (keypoints[..., 2] < 0.7).double()
        splits[name] = (features, active, keypoints)
    splits["eval"][2][:, 3, 2] = 0  # keypoint 3 never visible in eval: skipped
    expected = literal_kpr(*splits["fit"], *splits["eval"])
    on_device = [t.to(device) for t in (*splits["fit"], *splits["eval"])]
    assert keypoint_regression_error(*on_device) == pytest.approx(expected, rel=1e-9)
    assert expected > 1  # random targets are not predictable


def test_kpr_errors():
    features, active = torch.rand(4, 3, 2), torch.ones(4, 3, dtype=torch.bool)
    keypoints = torch.ones(4, 15, 3)
    with pytest.raises(ValueError, match="`eval_features`"):
        keypoint_regression_error(features, active, keypoints, torch.rand(4, 2, 2), active, keypoints)
    with pytest.raises(ValueError, match="`fit_keypoints`"):
        keypoint_regression_error(features, active, keypoints[:3], features, active, keypoints)
    hidden = keypoints.clone()
    hidden[:, 0, 2] = 0
    with pytest.raises(ValueError, match="Keypoint 0"):
        keypoint_regression_error(features, active, hidden, features, active, keypoints)
