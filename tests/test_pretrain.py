"""Backbone pre-training of the demo (ivpt/pretrain.py): view geometry, the dense objectives (contrast and
clustering), tiny runs and the k-means part probe."""

import math

import numpy as np
import torch
import torch.nn.functional as F
from fixtures_data import synthetic_root  # noqa: F401  (fixture)
from PIL import Image
from safetensors.torch import load_file

from ivpt.data import load_cub
import pytest
from safetensors import safe_open

from ivpt.pretrain import (TwoViews, colour_part_probe, corresponding_points, dense_clustering_loss,
                           dense_contrastive_loss, kmeans_keypoint_scores, kmeans_part_probe, load_backbone_file,
                           patch_pixels, perfect_labelling_scores, pretrain_backbone, sinkhorn_codes)


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


def test_sinkhorn_codes_are_balanced_soft_assignments():
    torch.manual_seed(0)
    scores = torch.randn(60, 6) * 0.05  # scores on the unit sphere: cosines
    scores[:, 0] += 0.3  # every patch prefers prototype 0
    codes = sinkhorn_codes(scores, epsilon=0.05, iterations=50)
    assert (codes >= 0).all()
    torch.testing.assert_close(codes.sum(1), torch.ones(60))  # one unit of mass per patch
    torch.testing.assert_close(codes.sum(0), torch.full((6,), 10.0), atol=0.05, rtol=0)  # 60 / 6 per prototype
    assert (F.softmax(scores / 0.05, dim=1).sum(0)[0] > 50) and codes.argmax(1).bincount(minlength=6).min() > 0
    few = sinkhorn_codes(scores, epsilon=0.05)  # SwAV's 3 iterations: rows exact, columns close to balanced
    torch.testing.assert_close(few.sum(1), torch.ones(60))
    assert few.sum(0).max() < 2 * 10


def test_dense_clustering_loss_rewards_places_that_keep_their_cluster():
    torch.manual_seed(0)
    grid, prototypes = 4, F.normalize(torch.randn(16, 8), dim=-1)
    features = prototypes[torch.randperm(16)][None].expand(2, -1, -1)  # every place sits on its own prototype
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]]).expand(2, 2, 5)
    same = dense_clustering_loss(features, features, boxes, grid, prototypes)
    shuffled = dense_clustering_loss(features, features[:, torch.randperm(grid * grid)], boxes, grid, prototypes)
    assert same < 1.0 < math.log(16) - 0.5 < shuffled
    flipped = boxes.clone()
    flipped[:, 1, 4] = 1.0  # view b is the mirror image of view a
    mirrored = features.unflatten(1, (grid, grid)).flip(2).flatten(1, 2)
    torch.testing.assert_close(dense_clustering_loss(features, mirrored, flipped, grid, prototypes), same)
    # constant features: all places score alike, so the balanced codes are uniform over the prototypes and the loss
    # is the cross-entropy of the uniform distribution with the (shared) prediction
    constant = F.normalize(torch.ones(2, grid * grid, 8), dim=-1)
    expected = -F.log_softmax(constant[0, 0] @ prototypes.T / 0.1, dim=-1).mean()
    torch.testing.assert_close(dense_clustering_loss(constant, constant, boxes, grid, prototypes), expected)
    features.requires_grad_(True)
    dense_clustering_loss(features, features.detach(), boxes, grid, prototypes).backward()
    assert features.grad.abs().sum() > 0  # the codes carry no gradient; the prediction does


def test_pretrain_backbone_clustering_objective_and_header(synthetic_root, tmp_path):  # noqa: F811
    kwargs = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}
    common = dict(backbone="vit_base_patch14_reg4_dinov2", backbone_kwargs=kwargs, image_size=32, epochs=1,
                  batch_size=4, cache_dir=str(tmp_path / "cache"), log=lambda _: None)
    out = tmp_path / "clustering.safetensors"
    summary = pretrain_backbone(synthetic_root, out, dense_objective="clustering", num_dense_prototypes=5,
                                metadata={"origin": "test"}, **common)
    assert math.isfinite(summary["dense_loss"]) and 0 < summary["dense_loss"] < 2 * math.log(5)
    with safe_open(str(out), "pt") as weights:
        assert weights.metadata()["origin"] == "test"
        assert not any(key.startswith("head") for key in weights.keys())
    with pytest.raises(ValueError, match="dense_objective: 'swav' is not one of"):
        pretrain_backbone(synthetic_root, tmp_path / "never.safetensors", dense_objective="swav", **common)
    assert not (tmp_path / "never.safetensors").exists()


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
    colour = colour_part_probe(test, image_size=32, patch_size=8, num_clusters=3)
    assert colour["num_keypoints"] == probe["num_keypoints"] and 0 <= colour["nmi"] <= 100


def test_patch_pixels_are_the_vit_patches_in_row_major_order():
    pixels = torch.randn(2, 3, 16, 24)
    patches = patch_pixels(pixels, 8)  # (2, 2 * 3, 3 * 64)
    assert patches.shape == (2, 6, 192)
    for n in range(6):
        row, column = divmod(n, 3)
        assert torch.equal(patches[1, n], pixels[1, :, 8 * row:8 * row + 8, 8 * column:8 * column + 8].flatten())


def test_kmeans_keypoint_scores_perfect_and_uninformative_clusters():
    # 3 images, a 2 x 2 grid of 8-pixel patches; keypoint k sits at the centre of patch k in every image
    centres = torch.tensor([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.0, 12.0]])
    keypoints = torch.cat([torch.arange(4.0)[:, None], centres, torch.ones(4, 1)], dim=1).expand(3, 4, 4)
    features = torch.eye(4).expand(3, 4, 4) + 0.01 * torch.randn(3, 4, 4)  # patch n: one-hot of n
    perfect = kmeans_keypoint_scores(features, keypoints, image_size=16, num_clusters=4)
    assert perfect["num_keypoints"] == 12 and perfect["nmi"] == pytest.approx(100) and perfect["ari"] == pytest.approx(100)
    one_cluster = kmeans_keypoint_scores(features, keypoints, image_size=16, num_clusters=1)
    assert one_cluster["nmi"] == pytest.approx(0) and one_cluster["ari"] == pytest.approx(0)
    hidden = keypoints.clone()
    hidden[0, 0, 3] = 0  # an invisible keypoint is not scored
    assert kmeans_keypoint_scores(features, hidden, image_size=16, num_clusters=4)["num_keypoints"] == 11


def test_perfect_labelling_scores_depend_on_the_grid():
    # 16 px images: label 1 on the left half, 2 on the right; keypoint 0 on the left, keypoint 1 on the right
    part_maps = torch.ones(3, 16, 16, dtype=torch.long)
    part_maps[:, :, 8:] = 2
    part_maps[:, :2, :2] = 0  # a little background
    keypoints = torch.tensor([[0.0, 4.0, 6.0, 1.0], [1.0, 12.0, 6.0, 1.0]]).expand(3, 2, 4)
    fine = perfect_labelling_scores(part_maps, keypoints, image_size=16, grid=2, num_labels=3)
    assert fine["nmi"] == pytest.approx(100) and fine["ari"] == pytest.approx(100)
    assert fine["num_keypoints"] == 6 and fine["grid"] == 2 and fine["num_parts"] == 2
    coarse = perfect_labelling_scores(part_maps, keypoints, image_size=16, grid=1, num_labels=3)  # one patch
    assert coarse["nmi"] == pytest.approx(0) and coarse["ari"] == pytest.approx(0)
