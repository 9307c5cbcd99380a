"""Transforms of docs/method.md#training-augmentation (train / test), docs/method.md#part-annotated-items (parts evaluation) and docs/method.md#consistency (consistency)."""

import numpy as np
import pytest
import torch
from fixtures_data import synthetic_root  # noqa: F401
from PIL import Image

from ivpt.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    apply_transform,
    batch_transform,
    consistency_transform,
    load_cub,
    parts_eval_preprocess,
    eval_transform,
    train_transform,
)
from ivpt.data.synthetic import class_attributes, render_bird
from ivpt.data.transforms import keypoint_rows


def _example(index: int, size: int = 96) -> tuple[dict, np.ndarray]:
    """A rendered bird as a dataset-like example whose mask is the part map; plus the labels
    under its keypoints."""
    bird = render_bird(class_attributes(4, seed=0)[index % 4], size, np.random.default_rng([5, index]))
    rows = [
        {"part_id": i + 1, "x": float(x), "y": float(y), "visible": int(v)} for i, (x, y, v) in enumerate(bird.keypoints)
    ]
    part_map = np.asarray(bird.part_map)
    # label under each visible keypoint (-1: hidden); a point on a thin part's edge may read 0
    labels = np.array([part_map[int(round(r["y"])), int(round(r["x"]))] if r["visible"] else -1 for r in rows])
    example = {"image": bird.image, "keypoints": rows, "bbox": list(bird.bbox), "mask": bird.part_map, "label": 2}
    return example, labels


def _window(part_map: torch.Tensor, x: float, y: float, radius: int) -> torch.Tensor:
    xi, yi = int(round(x)), int(round(y))
    return part_map[max(yi - radius, 0) : yi + radius + 1, max(xi - radius, 0) : xi + radius + 1]


def _on_label(part_map: torch.Tensor, x: float, y: float, label: int, radius: int = 1) -> bool:
    return bool((_window(part_map, x, y, radius) == label).any())


def test_train_transform_moves_annotations_with_the_image():
    torch.manual_seed(0)
    transform = train_transform(image_size=112)
    checked = 0
    for index in range(12):
        example, labels = _example(index)
        out = apply_transform(transform, example)
        assert out["pixel_values"].shape == (3, 112, 112) and out["pixel_values"].dtype == torch.float32
        assert out["mask"].shape == (112, 112) and out["labels"] == 2
        for row, label in zip(out["keypoints"].tolist(), labels):
            part_id, x, y, visible = row
            if label == -1:  # hidden in the source: stays hidden at (0, 0)
                assert visible == 0 and x == y == 0
            elif visible:
                assert 0 <= x < 112 and 0 <= y < 112
                if label == 0:  # source point on a part edge: must stay next to the bird
                    assert bool((_window(out["mask"], x, y, 2) > 0).any()), (index, part_id)
                else:
                    assert _on_label(out["mask"], x, y, int(label)), (index, part_id)
                checked += 1
            else:  # moved off the canvas by the affine / crop
                assert x == y == 0
    assert checked > 50


def test_train_transform_normalises_like_the_reference():
    image = Image.new("RGB", (150, 100), (255, 0, 128))
    torch.manual_seed(1)
    pixels = train_transform(image_size=64)(image)
    assert pixels.shape == (3, 64, 64)
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    # every pixel is either the image colour or the black fill of the affine
    black = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
    flat = pixels.reshape(3, -1).T
    is_colour = torch.isclose(flat, expected, atol=2e-2).all(dim=1)
    is_black = torch.isclose(flat, black, atol=1e-4).all(dim=1)
    assert bool((is_colour | is_black).all())


def test_eval_transform_is_resize_and_centre_crop():
    example, _ = _example(1, size=96)
    example["image"] = example["image"].resize((150, 100))  # non-square: 100 → 64, 150 → 96
    example["mask"] = example["mask"].resize((150, 100), Image.NEAREST)
    rows = keypoint_rows(example["keypoints"])
    rows[:, 1:3] *= torch.tensor([150 / 96, 100 / 96])
    example["keypoints"] = rows
    out = apply_transform(eval_transform(image_size=64), example)
    assert out["pixel_values"].shape == (3, 64, 64)
    left = round((96 - 64) / 2)  # resized width 96, centre crop offset 16
    for (part_id, x, y, visible), original in zip(out["keypoints"].tolist(), rows.tolist()):
        expected_x, expected_y = original[1] * 64 / 100 - left, original[2] * 64 / 100
        if original[3] and 0 <= expected_x < 64:
            assert visible == 1
            assert (x, y) == pytest.approx((expected_x, expected_y), abs=1e-3)


def test_consistency_transform_warps_to_square():
    image = Image.new("RGB", (90, 30), (10, 20, 30))
    pixels = consistency_transform(image_size=48)(image)
    assert pixels.shape == (3, 48, 48)
    expected = (torch.tensor([10, 20, 30]) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(pixels[:, 10, 10], expected.float(), atol=1e-3, rtol=0)


def test_parts_eval_preprocess_hand_computed():
    # 200 × 100 image, S = 50: factor 0.5 → resized 100 × 50 → left = round(25) = 25, top = 0.
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    keypoints = [[1, 120.0, 40.0, 1], [2, 20.0, 10.0, 1], [3, 0.0, 0.0, 0], [4, 199.0, 99.0, 1]]
    bbox = [100.0, 20.0, 60.0, 40.0]
    original = [list(k) for k in keypoints]
    out = parts_eval_preprocess(image, keypoints, bbox, image_size=50)
    assert out["pixel_values"].shape == (3, 50, 50)
    assert float(out["pixel_values"].max()) == pytest.approx(1.0)  # no mean / std normalisation
    expected = torch.tensor(
        [
            [1, 35.0, 20.0, 1],  # 120·0.5 − 25, 40·0.5
            [2, 0.0, 5.0, 0],  # 20·0.5 − 25 = −15 → invisible, clamped to 0
            [3, 0.0, 0.0, 0],  # hidden: untouched
            [4, 50.0, 49.5, 0],  # 199·0.5 − 25 = 74.5 > 50 → invisible, clamped
        ]
    )
    torch.testing.assert_close(out["keypoints"], expected)
    torch.testing.assert_close(out["bbox"], torch.tensor([25.0, 10.0, 30.0, 20.0]))
    assert keypoints == original  # inputs are not modified (docs/method.md#quirks [in-place annotations])


def test_parts_eval_preprocess_truncates_long_side_but_scales_by_factor():
    image = Image.new("RGB", (500, 375))
    out = parts_eval_preprocess(image, [[1, 500.0, 0.0, 1]], [0, 0, 1, 1], image_size=518)
    factor = 518 / 375
    new_width = int(500 * factor)  # 690 (truncated); the exact factor gives 690.67
    left = round((new_width - 518) / 2)
    assert out["keypoints"][0, 1].item() == pytest.approx(min(500 * factor - left, 518), abs=1e-3)


def test_with_transform_on_loaded_dataset(synthetic_root, tmp_path):
    dataset = load_cub(synthetic_root, "full", cache_dir=tmp_path)
    train = dataset["train"].with_transform(batch_transform(train_transform(image_size=64)))
    batch = train[:3]
    assert len(batch["pixel_values"]) == 3 and batch["pixel_values"][0].shape == (3, 64, 64)
    assert batch["keypoints"][0].shape == (15, 4) and batch["labels"] == dataset["train"]["label"][:3]
    loader = torch.utils.data.DataLoader(
        dataset["test"].with_transform(batch_transform(eval_transform(image_size=64))).select_columns(
            ["image", "label"]
        ),
        batch_size=4,
        collate_fn=lambda rows: torch.stack([r["pixel_values"] for r in rows]),
    )
    assert next(iter(loader)).shape == (4, 3, 64, 64)


def test_grayscale_input_is_converted():
    out = apply_transform(eval_transform(image_size=32), {"image": Image.new("L", (40, 40), 128)})
    assert out["pixel_values"].shape == (3, 32, 32)


def test_uint8_to_float_divides_by_255_like_to_tensor():
    """Every grey level maps to level / 255 exactly (the release's ToTensor), not level · (1/255)."""
    from torchvision.transforms import v2

    from ivpt.data import transforms as transforms_module

    levels = np.arange(256, dtype=np.uint8)
    image = Image.fromarray(np.stack([np.tile(levels, (16, 1))] * 3, axis=-1))  # 16 x 256, column c has level c
    reference = torch.arange(256, dtype=torch.float32) / 255
    assert not torch.equal(reference, torch.arange(256, dtype=torch.float32) * (1 / 255))  # the two do differ
    unit = v2.Compose(transforms_module._to_unit_float())(image)
    assert unit.dtype == torch.float32 and torch.equal(unit[0, 0], reference) and torch.equal(unit[2, 7], reference)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None], torch.tensor(IMAGENET_STD)[:, None]
    normalised = v2.Compose(transforms_module._to_normalised_tensor(IMAGENET_MEAN, IMAGENET_STD))(image)
    assert torch.equal(normalised[:, 0], (reference[None] - mean) / std)
    # parts input: the shorter side is already 16, so no resampling; the centre crop keeps columns 120..135
    parts = parts_eval_preprocess(image, np.zeros((15, 4)), [0, 0, 1, 1], image_size=16)["pixel_values"]
    assert torch.equal(parts[:, 3], reference[120:136].expand(3, 16))
