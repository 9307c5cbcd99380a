"""Tests of the docs/method.md#foreground-iou foreground / background IoU (ivpt.metrics.foreground_iou)."""

import pytest
import torch
import torch.nn.functional as F

from ivpt.metrics import foreground_iou, foreground_iou_counts, foreground_iou_from_counts


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def literal_counts(maps, masks, threshold=0.5, max_value=255.0):
    """docs/method.md#foreground-iou pixel by pixel: argmax channel != last -> foreground; mask >= threshold * max -> foreground."""
    counts = [0, 0, 0, 0]
    upsampled = F.interpolate(maps, size=masks.shape[-2:], mode="bilinear", align_corners=True)
    for image_maps, mask in zip(upsampled, masks):
        for row in range(mask.shape[0]):
            for column in range(mask.shape[1]):
                predicted = int(image_maps[:, row, column].argmax()) != maps.shape[1] - 1
                target = float(mask[row, column]) >= threshold * max_value
                counts[0] += predicted and target
                counts[1] += predicted or target
                counts[2] += (not predicted) and (not target)
                counts[3] += (not predicted) or (not target)
    return counts


def perfect_maps(masks, num_prototypes=11):
    """Maps whose argmax is foreground channel 0 exactly where the binarised mask is set."""
    target = (masks.float() >= 127.5).float()
    maps = torch.zeros(masks.shape[0], num_prototypes, *masks.shape[-2:])
    maps[:, 0] = target
    maps[:, -1] = 1 - target
    return maps


def test_perfect_map_gives_100():
    generator = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, 20, 24, generator=generator) * 256).to(torch.uint8)
    assert foreground_iou(perfect_maps(masks), masks) == {"foreground_iou": 100.0, "background_iou": 100.0}


def test_default_binarisation_is_half_of_the_maximum_grey_level():
    masks = torch.tensor([[[127, 128], [0, 255]]], dtype=torch.uint8)
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 1] = 1.0  # foreground everywhere
    # target foreground: 128 and 255 -> fg IoU 2/4, bg IoU 0/2
    assert foreground_iou_counts(maps, masks).tolist() == [2, 4, 0, 2]
    assert foreground_iou(maps, masks) == {"foreground_iou": 50.0, "background_iou": 0.0}
    # float masks in [0, 1] use 1.0 as maximum grey level; max_value overrides the default
    assert foreground_iou_counts(maps, masks.float() / 255).tolist() == [2, 4, 0, 2]
    assert foreground_iou_counts(maps, masks, max_value=100.0).tolist() == [3, 4, 0, 1]
    assert foreground_iou_counts(maps, masks, max_value=300.0).tolist() == [1, 4, 0, 3]


def test_background_is_the_last_channel_of_the_evaluated_map():
    masks = torch.full((1, 4, 4), 255, dtype=torch.uint8)
    maps = torch.zeros(1, 11, 4, 4)
    maps[0, 4] = 1.0  # the reference's hard-coded background index K = 4 is foreground here (docs/method.md#quirks [foreground IoU background index])
    assert foreground_iou(maps, masks)["foreground_iou"] == 100.0


@pytest.mark.parametrize("device", DEVICES)
def test_counts_against_literal_loop_and_streaming(device):
    generator = torch.Generator().manual_seed(1)
    maps = torch.softmax(3 * torch.randn(4, 5, 6, 6, generator=generator), dim=1)
    masks = (torch.rand(4, 17, 13, generator=generator) * 256).to(torch.uint8)
    expected = literal_counts(maps, masks)
    assert foreground_iou_counts(maps.to(device), masks.to(device)).cpu().tolist() == expected
    streamed = sum(foreground_iou_counts(maps[i : i + 1].to(device), masks[i : i + 1]).cpu() for i in range(4))
    assert streamed.tolist() == expected
    scores = foreground_iou_from_counts(streamed)
    assert scores["foreground_iou"] == pytest.approx(100 * expected[0] / expected[1])
    assert scores["background_iou"] == pytest.approx(100 * expected[2] / expected[3])


def test_masks_with_a_channel_axis_and_errors():
    masks = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    maps = torch.zeros(2, 3, 4, 4)
    maps[:, -1] = 1.0
    assert foreground_iou(maps, masks) == {"foreground_iou": 0.0, "background_iou": 100.0}  # empty fg union -> 0
    with pytest.raises(ValueError, match="`masks`"):
        foreground_iou_counts(maps, torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="`maps` and `masks`"):
        foreground_iou_counts(maps, torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="`counts`"):
        foreground_iou_from_counts(torch.zeros(3))


def blocky_mask(height=100, width=141, block=9, seed=0):
    """A mask of 9x9-pixel blocks of random grey levels (every block edge is exposed to a sampling shift)."""
    import numpy as np
    from PIL import Image

    levels = np.random.default_rng(seed).integers(0, 256, size=(height // block + 1, width // block + 1))
    return Image.fromarray(np.kron(levels, np.ones((block, block)))[:height, :width].astype(np.uint8), mode="L")


def test_masks_are_resized_like_the_pil_image():
    """The mask follows the image's resize (same output size, PIL nearest) and centre crop, pixel for pixel."""
    import numpy as np
    from PIL import Image

    from ivpt.data.transforms import parts_eval_preprocess
    from ivpt.metrics import resize_mask_like_image

    mask = blocky_mask()
    size = 128  # upsampling, like CUB's ~500x375 images to 518
    resized = resize_mask_like_image(mask, size)
    assert resized.shape == (size, size) and resized.dtype == torch.uint8
    # PIL by hand: shorter side 100 -> 128, longer side int(128 * 141 / 100) = 180, crop left = round((180 - 128) / 2)
    by_hand = np.asarray(mask.resize((180, 128), Image.NEAREST))[:, 26:26 + size]
    assert torch.equal(resized, torch.from_numpy(by_hand.copy()))
    image = Image.merge("RGB", [mask] * 3)
    pixels = parts_eval_preprocess(image, np.zeros((15, 4)), [0, 0, 1, 1], size)["pixel_values"]
    assert pixels.shape[-2:] == resized.shape  # same geometry as the evaluated image
    # the tensor ("legacy nearest") resize this replaces moves a few percent of the pixels of a blocky mask
    legacy = F.interpolate(torch.from_numpy(np.asarray(mask))[None, None].float(), size=(128, 180), mode="nearest")
    moved = (legacy[0, 0, :, 26:26 + size].to(torch.uint8) != resized).float().mean().item()
    assert 0.02 < moved < 0.2
