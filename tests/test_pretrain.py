"""Backbone pre-training of the demo (ivpt/pretrain.py): view geometry, the dense contrastive loss, a tiny run and the
k-means part probe."""

import math

import numpy as np
import torch
import torch.nn.functional as F
from fixtures_data import synthetic_root  # noqa: F401  (fixture)
from PIL import Image
from safetensors.torch import load_file

from ivpt.data import load_cub
from ivpt.pretrain import (TwoViews, corresponding_points, dense_contrastive_loss, kmeans_part_probe,
                           load_backbone_file, pretrain_backbone)


def test_corresponding_points_follow_crops_and_flips():
    grid = 4
    centres = (torch.arange(grid) + 0.5) / grid * 2 - 1
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]])
    points, inside = corresponding_points(grid, whole, whole)
    assert inside.all()
    torch.testing.assert_close(points[0, :, 0], centres.repeat(grid))  # x varies fastest (row-major patches)
    torch.testing.assert_close(points[0, :, 1], centres.repeat_interleave(grid))
    flipped = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]])
    points, _ = corresponding_points(grid, whole, flipped)
    torch.testing.assert_close(points[0, :, 0], -centres.repeat(grid))
    # the right half of the image, seen by the left-half crop: patch centres of the right half fall outside it
    left_half = torch.tensor([[0.0, 0.0, 0.5, 1.0, 0.0]])
    points, inside = corresponding_points(grid, whole, left_half)
    assert inside.view(grid, grid)[:, :2].all() and not inside.view(grid, grid)[:, 2:].any()
    torch.testing.assert_close(points[0, 0], torch.tensor([0.125 / 0.5 * 2 - 1, centres[0].item()]))


def test_two_views_boxes_describe_the_crops():
    torch.manual_seed(0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    view_a, view_b, boxes = TwoViews(16)(image)
    assert view_a.shape == view_b.shape == (3, 16, 16) and boxes.shape == (2, 5)
    left, top, width, height, flipped = boxes.T
    assert ((left >= 0) & (top >= 0) & (left + width <= 1 + 1e-6) & (top + height <= 1 + 1e-6)).all()
    assert ((width * height >= 0.35 * 0.99) & (width * height <= 1 + 1e-6)).all()
    assert set(flipped.tolist()) <= {0.0, 1.0}


def test_dense_contrastive_loss_rewards_features_that_say_where_a_place_is():
    torch.manual_seed(0)
    grid = 4
    features = F.normalize(torch.randn(2, grid * grid, 8), dim=-1)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]]).expand(2, 2, 5)
    same = dense_contrastive_loss(features, features, boxes, grid)
    shuffled = dense_contrastive_loss(features, features[:, torch.randperm(grid * grid)], boxes, grid)
    assert same < 1.0 < math.log(grid * grid) - 0.5 < shuffled
    # view b is the mirror image of view a: the same features, mirrored, match exactly as well
    flipped = boxes.clone()
    flipped[:, 1, 4] = 1.0
    mirrored = features.unflatten(1, (grid, grid)).flip(2).flatten(1, 2)
    torch.testing.assert_close(dense_contrastive_loss(features, mirrored, flipped, grid), same)
    # constant features carry no place: chance level over the places inside the other view
    constant = F.normalize(torch.ones(2, grid * grid, 8), dim=-1)
    torch.testing.assert_close(dense_contrastive_loss(constant, constant, boxes, grid),
                               torch.tensor(math.log(grid * grid)))
    half = boxes.clone()
    half[:, 1] = torch.tensor([0.0, 0.0, 0.5, 1.0, 0.0])  # view b: the left half
    # a -> b: 8 of a's places lie in b; b -> a: all 16 of b's places lie in a
    torch.testing.assert_close(dense_contrastive_loss(constant, constant, half, grid),
                               torch.tensor((math.log(8) + math.log(16)) / 2))


def test_pretrain_backbone_tiny_run_and_part_probe(synthetic_root, tmp_path):  # noqa: F811
    kwargs = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}
    out = tmp_path / "backbone.safetensors"
    summary = pretrain_backbone(synthetic_root, out, "vit_base_patch14_reg4_dinov2", kwargs, image_size=32, epochs=1,
                                batch_size=4, cache_dir=str(tmp_path / "cache"), log=lambda _: None)
    assert summary["num_images"] == 24 and math.isfinite(summary["dense_loss"])
    weights = load_file(out)
    assert "head.weight" not in weights and "pos_embed" in weights  # the backbone only
    labels_only = pretrain_backbone(synthetic_root, tmp_path / "labels_only.safetensors",
                                    "vit_base_patch14_reg4_dinov2", kwargs, image_size=32, epochs=1, batch_size=4, dense_weight=0.0,
                                    cache_dir=str(tmp_path / "cache"), log=lambda _: None)
    assert labels_only["dense_loss"] is None and math.isfinite(labels_only["class_loss"])
    assert not torch.equal(load_file(tmp_path / "labels_only.safetensors")["blocks.0.attn.qkv.weight"],
                           weights["blocks.0.attn.qkv.weight"])  # same seed, so only the dense term differs
    model = load_backbone_file("vit_base_patch14_reg4_dinov2", out, 32, **kwargs)  # the local file, no download
    test = load_cub(synthetic_root, "full", cache_dir=str(tmp_path / "cache"))["test"]
    probe = kmeans_part_probe(model, test, image_size=32, num_clusters=3, block=1)
    assert probe["block"] == 1 and probe["num_keypoints"] > 12 * 8
    assert 0 <= probe["nmi"] <= 100 and -100 <= probe["ari"] <= 100
