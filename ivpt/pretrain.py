"""Pre-training of a small timm ViT on a CUB-layout dataset: the offline stand-in for DINOv2.

The demo has no Hub, so it makes its own frozen backbone: a small `vit_base_patch14_reg4_dinov2`-family ViT trained
on synthetic birds whose classes differ from the IVPT run's, saved as a plain timm `.safetensors` file. IVPT then
loads it through `IvptForImageClassification.from_backbone(..., backbone_weights=FILE)`, the same path a user takes
with an offline copy of DINOv2.

Two objectives, summed:

- class labels: cross-entropy of a linear head on the pooled output of one view (colours kept, so the classes,
  which are colour combinations, stay readable);
- a dense objective on two random crops of an image, one of them colour-jittered (hue included), whose geometry is
  known, so every patch of one view has its place in the other (no labels). Two choices (`dense_objective`):
  - `"contrast"`: within the image, every patch must find the *same place of the bird* among all places of the
    other view (dense InfoNCE). Colour cannot tell the places apart, so the features learn where on the bird a
    patch is (its shape and context);
  - `"clustering"`: across the batch, patches are assigned to a small set of learned prototypes with balanced
    Sinkhorn codes (SwAV's swapped prediction, per patch): a patch must predict the code of the same place in the
    other view. The clusters are shared by all images, so a place must look alike in every bird: part information
    that holds across images, which is what the IVPT prototypes need.

`kmeans_part_probe` measures that information in seconds: k-means on the frozen patch features, NMI / ARI of the
keypoints' clusters against the keypoint names; `colour_part_probe` runs the same k-means on the raw patch pixels, the
baseline a backbone must beat to give IVPT more than colour.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.cluster import KMeans
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .data import IMAGENET_MEAN, IMAGENET_STD, load_cub
from .data.transforms import parts_eval_preprocess
from .metrics import keypoint_part_assignments, nmi_ari


class TwoViews:
    """Two random resized crops (+ flips) of one image; the second one colour-jittered.

    Returns `(view_a, view_b, boxes)`: normalised `(3, S, S)` tensors and `(2, 5)` rows `(left, top, width, height,
    flipped)` in fractions of the source image, which map a place of one view to the same place of the other.
    """

    def __init__(self, image_size: int, scale: tuple[float, float] = (0.35, 1.0)):
        self.image_size, self.scale = image_size, scale
        self.jitter = v2.Compose([
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.5)], p=0.9),
            v2.RandomGrayscale(p=0.2),
        ])
        self.normalise = v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))

    def _view(self, image: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        height, width = image.shape[-2:]
        top, left, h, w = v2.RandomResizedCrop.get_params(image, list(self.scale), [3 / 4, 4 / 3])
        view = TF.resized_crop(image, top, left, h, w, [self.image_size] * 2, antialias=True)
        flipped = bool(torch.rand(()) < 0.5)
        if flipped:
            view = TF.horizontal_flip(view)
        return view, [left / width, top / height, w / width, h / height, float(flipped)]

    def __call__(self, image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = TF.to_dtype(TF.to_image(image.convert("RGB")), torch.float32, scale=True)
        view_a, box_a = self._view(image)
        view_b, box_b = self._view(image)
        return self.normalise(view_a), self.normalise(self.jitter(view_b)), torch.tensor([box_a, box_b])


def corresponding_points(grid: int, source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the patch centres of the source views lie in the target views.

    Args:
        grid: patches per side.
        source, target: `(B, 5)` view boxes `(left, top, width, height, flipped)` (fractions of the source image).

    Returns:
        `(points, inside)`: `(B, grid*grid, 2)` `grid_sample` coordinates in [-1, 1] of the target view (x, y), and a
        `(B, grid*grid)` bool mask of the points that fall inside it.
    """
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    v, u = torch.meshgrid(centres, centres, indexing="ij")
    u, v = u.flatten()[None], v.flatten()[None]  # (1, N) in the source view
    u = torch.where(source[:, 4:5] > 0.5, 1 - u, u)
    x = source[:, 0:1] + u * source[:, 2:3]  # (B, N) in the image
    y = source[:, 1:2] + v * source[:, 3:4]
    u_target = (x - target[:, 0:1]) / target[:, 2:3]
    v_target = (y - target[:, 1:2]) / target[:, 3:4]
    u_target = torch.where(target[:, 4:5] > 0.5, 1 - u_target, u_target)
    inside = (u_target >= 0) & (u_target <= 1) & (v_target >= 0) & (v_target <= 1)
    return torch.stack([u_target * 2 - 1, v_target * 2 - 1], dim=-1), inside


class DenseHead(nn.Module):
    """Patch tokens `(B, N, D)` -> L2-normalised projections `(B, N, out)` (an MLP, as in contrastive learning)."""

    def __init__(self, dim: int, hidden: int = 256, out: int = 64):
        super().__init__()
        self.projection = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(tokens), dim=-1)


def views_at_same_places(features_a, features_b, boxes, grid: int):
    """Both directions of a view pair: `(source_features, sampled, inside)` with `sampled` `(B, N, C)` the other
    view's features bilinearly sampled at the places of the source's `N` patches (`boxes` `(B, 2, 5)`, see
    `TwoViews`) and `inside` `(B, N)` the places that lie in the other view."""
    for source_features, target_features, source, target in ((features_a, features_b, boxes[:, 0], boxes[:, 1]),
                                                              (features_b, features_a, boxes[:, 1], boxes[:, 0])):
        points, inside = corresponding_points(grid, source, target)  # (B, N, 2), (B, N)
        target_grid = target_features.transpose(1, 2).unflatten(-1, (grid, grid))  # (B, C, g, g)
        sampled = F.grid_sample(target_grid, points[:, None], mode="bilinear", padding_mode="border",
                                align_corners=False)[:, :, 0].transpose(1, 2)  # (B, N, C)
        yield source_features, sampled, inside


def dense_contrastive_loss(features_a, features_b, boxes, grid: int, temperature: float = 0.2) -> torch.Tensor:
    """Within-image dense InfoNCE between two views, `(B, N, C)` L2-normalised patch projections each.

    Every patch of one view must pick, among the other view's features at the places of *all* its patches, the one
    at its own place (`boxes` `(B, 2, 5)`: the views' crops, see `TwoViews`); places outside the other view are left
    out. The candidates all come from the same image, so the features must say where on the bird (or background) a
    patch is, whatever its colour: part information, without part labels. Symmetric in the two views.
    """
    losses = []
    for source_features, sampled, inside in views_at_same_places(features_a, features_b, boxes, grid):
        logits = source_features @ F.normalize(sampled, dim=-1).transpose(1, 2) / temperature  # (B, N, N)
        logits = logits.masked_fill(~inside[:, None, :], float("-inf"))
        targets = torch.arange(logits.shape[1]).expand(len(logits), -1)
        losses.append(F.cross_entropy(logits[inside], targets[inside]))
    return sum(losses) / 2


@torch.no_grad()
def sinkhorn_codes(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Balanced soft assignments of `(M, C)` prototype scores (Sinkhorn-Knopp, as in SwAV): rows sum to 1 and every
    prototype receives about M / C of the mass, so the codes cannot collapse onto one prototype."""
    codes = torch.exp((scores - scores.max()) / epsilon)  # (M, C)
    codes /= codes.sum()
    for _ in range(iterations):
        codes /= codes.sum(dim=0, keepdim=True) * codes.shape[1]  # each prototype: 1 / C of the mass
        codes /= codes.sum(dim=1, keepdim=True) * codes.shape[0]  # each patch: 1 / M
    return codes * codes.shape[0]


def dense_clustering_loss(features_a, features_b, boxes, grid: int, prototypes: torch.Tensor,
                          temperature: float = 0.1, epsilon: float = 0.05) -> torch.Tensor:
    """Per-patch swapped prediction between two views, `(B, N, C)` L2-normalised patch projections each.

    The other view's features at a patch's place (`boxes` `(B, 2, 5)`, see `TwoViews`; places outside it are left
    out) are given balanced codes over the `(P, C)` L2-normalised `prototypes` (`sinkhorn_codes`, no gradient); the
    patch must predict them with a softmax over its own prototype scores at `temperature`. Symmetric in the views.
    """
    losses = []
    for source_features, sampled, inside in views_at_same_places(features_a, features_b, boxes, grid):
        codes = sinkhorn_codes(F.normalize(sampled[inside], dim=-1) @ prototypes.T, epsilon)  # (M, P)
        log_probabilities = F.log_softmax(source_features[inside] @ prototypes.T / temperature, dim=-1)
        losses.append(-(codes * log_probabilities).sum(-1).mean())
    return sum(losses) / 2


DENSE_OBJECTIVES = ("contrast", "clustering")


def pretrain_backbone(
    data_dir: str | Path,
    out_file: str | Path,
    backbone: str,
    backbone_kwargs: dict,
    image_size: int,
    epochs: int = 10,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    dense_weight: float = 1.0,
    dense_objective: str = "contrast",
    num_dense_prototypes: int = 16,
    seed: int = 0,
    metadata: dict[str, str] | None = None,
    cache_dir: str | None = None,
    log=print,
) -> dict:
    """Trains `backbone` (plus a linear head and a dense head) on the train and test images of `data_dir`, with
    class labels and the dense objective `dense_objective` ("contrast" or "clustering", with `num_dense_prototypes`
    clusters; weight `dense_weight`, 0 = labels only); saves the backbone only, with `metadata` in the file's header.

    Returns a summary: final training accuracy (%), losses, number of images, seconds.
    """
    if dense_objective not in DENSE_OBJECTIVES:
        raise ValueError(f"dense_objective: {dense_objective!r} is not one of {DENSE_OBJECTIVES}")
    torch.manual_seed(seed)
    dataset = load_cub(data_dir, "full", cache_dir=cache_dir, segmentations=False)
    images = torch.utils.data.ConcatDataset([dataset["train"], dataset["test"]])
    num_classes = dataset["train"].features["label"].num_classes
    views = TwoViews(image_size)

    def collate(rows):
        view_a, view_b, boxes = zip(*(views(r["image"]) for r in rows))
        return torch.stack(view_a), torch.stack(view_b), torch.stack(boxes), torch.tensor([r["label"] for r in rows])

    loader = DataLoader(images, batch_size=batch_size, shuffle=True, collate_fn=collate, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    model = timm.create_model(backbone, pretrained=False, num_classes=num_classes, img_size=image_size,
                              **backbone_kwargs)
    dense_head = DenseHead(model.embed_dim)
    grid = image_size // model.patch_embed.patch_size[0]
    parameters = [*model.parameters(), *dense_head.parameters()]
    if dense_objective == "clustering":
        cluster_prototypes = nn.Linear(dense_head.projection[-1].out_features, num_dense_prototypes, bias=False)
        parameters += list(cluster_prototypes.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.05)
    total_steps = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, len(loader))) * 0.5 * (1 + math.cos(math.pi * step / total_steps))
    )
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        correct = seen = 0
        for view_a, view_b, boxes, labels in loader:
            tokens = model.forward_features(torch.cat([view_a, view_b]))  # (2B, T, D)
            logits = model.forward_head(tokens[: len(labels)])
            class_loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
            loss = class_loss
            if dense_weight > 0:
                features_a, features_b = dense_head(tokens[:, model.num_prefix_tokens:]).chunk(2)
                if dense_objective == "clustering":
                    with torch.no_grad():  # the prototypes stay on the unit sphere (SwAV)
                        cluster_prototypes.weight.copy_(F.normalize(cluster_prototypes.weight, dim=1))
                    dense_loss = dense_clustering_loss(features_a, features_b, boxes, grid, cluster_prototypes.weight)
                else:
                    dense_loss = dense_contrastive_loss(features_a, features_b, boxes, grid)
                loss = loss + dense_weight * dense_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            scheduler.step()
            correct += (logits.argmax(-1) == labels).sum().item()
            seen += len(labels)
        dense_text = f", dense loss {dense_loss.item():.3f}" if dense_weight > 0 else ""
        log(f"  pre-training epoch {epoch + 1}/{epochs}: class loss {class_loss.item():.3f}{dense_text}, "
            f"train accuracy {100 * correct / seen:.1f}%")
    model.reset_classifier(0)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    temporary = out_file.with_name(f".{out_file.name}.tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, temporary, metadata=metadata)
    temporary.replace(out_file)
    return {"train_accuracy": 100 * correct / max(1, seen), "class_loss": class_loss.item(),
            "dense_loss": dense_loss.item() if dense_weight > 0 else None, "num_images": len(images),
            "num_classes": num_classes, "seconds": time.perf_counter() - start}


@torch.no_grad()
def load_backbone_file(name: str, weights: str | Path, image_size: int, **backbone_kwargs) -> nn.Module:
    """The timm backbone `name` (no head) with the weights of a local file written by `pretrain_backbone`, loaded
    through timm's own pretrained path (the one `IvptForImageClassification.from_backbone` takes)."""
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)), num_classes=0,
                             img_size=image_size, **backbone_kwargs)


def backbone_patch_features(backbone: torch.nn.Module, pixel_values: torch.Tensor, block: int) -> torch.Tensor:
    """Final-LayerNorm'd patch tokens after `block` blocks of a timm ViT, `(B, N, D)` (what an IVPT stage reads)."""
    tokens = backbone.norm_pre(backbone._pos_embed(backbone.patch_embed(pixel_values)))
    for layer in backbone.blocks[:block]:
        tokens = layer(tokens)
    return backbone.norm(tokens)[:, backbone.num_prefix_tokens:]


def probe_batches(split, image_size: int, normalise: bool = True, batch_size: int = 32):
    """The images of `split` (a CUB-layout `datasets` split with keypoints and boxes) as the parts metric reads them
    (`parts_eval_preprocess`, then ImageNet normalisation if `normalise`): `(pixels (B, 3, S, S), keypoints (B, P, 4))`
    batches."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    for start in range(0, len(split), batch_size):
        rows = split[start:start + batch_size]
        items = [parts_eval_preprocess(image, points, box, image_size)
                 for image, points, box in zip(rows["image"], rows["keypoints"], rows["bbox"])]
        pixels = torch.stack([item["pixel_values"] for item in items])
        yield (pixels - mean) / std if normalise else pixels, torch.stack([item["keypoints"] for item in items])


def kmeans_keypoint_scores(features: torch.Tensor, keypoints: torch.Tensor, image_size: int, num_clusters: int,
                           seed: int = 0) -> dict:
    """k-means (`num_clusters`) on `(B, N, C)` patch vectors (a square grid of N patches per image); every visible
    keypoint (`(B, P, 4)` rows `part_id, x, y, visible`) takes its patch's cluster, scored by NMI / ARI (%) against the
    keypoint names, as the parts metric scores IVPT's maps."""
    grid = int(features.shape[1] ** 0.5)
    clusters = KMeans(num_clusters, n_init=3, random_state=seed).fit_predict(features.flatten(0, 1).numpy())
    labels = torch.as_tensor(clusters, dtype=torch.long).view(len(features), grid, grid)
    return patch_label_scores(labels, num_clusters, keypoints, image_size)


def patch_label_scores(labels: torch.Tensor, num_labels: int, keypoints: torch.Tensor, image_size: int) -> dict:
    """NMI / ARI (%) of one label per patch, `(B, g, g)` in `[0, num_labels)`, scored as IVPT's maps are: the labels
    become one-hot maps, every visible keypoint (`(B, P, 4)` rows `part_id, x, y, visible`) takes its patch's label."""
    maps = F.one_hot(labels, num_labels).permute(0, 3, 1, 2).float()
    predicted, ground_truth = keypoint_part_assignments(maps, keypoints[..., 1:].double(), image_size)
    return nmi_ari(predicted, ground_truth) | {"num_keypoints": len(predicted)}


@torch.no_grad()
def kmeans_part_probe(
    backbone: torch.nn.Module, split, image_size: int, num_clusters: int = 9, block: int | None = None,
    normalise: bool = True, batch_size: int = 32, seed: int = 0,
) -> dict:
    """How much part information a frozen backbone holds, in seconds instead of an IVPT run.

    k-means (`num_clusters`) on the L2-normalised patch features (after `block` blocks; all by default) of the
    images of `split` (a CUB-layout `datasets` split with keypoints and boxes); every visible keypoint takes the
    cluster of its patch, then NMI / ARI (%) against the keypoint names, as the parts metric does with IVPT's maps.
    """
    block = len(backbone.blocks) if block is None else block
    features, keypoints = zip(*((F.normalize(backbone_patch_features(backbone.eval(), pixels, block), dim=-1), points)
                                for pixels, points in probe_batches(split, image_size, normalise, batch_size)))
    return kmeans_keypoint_scores(torch.cat(features), torch.cat(keypoints), image_size, num_clusters, seed) | {
        "block": block}


def colour_part_probe(split, image_size: int, patch_size: int, num_clusters: int = 9, batch_size: int = 32,
                      seed: int = 0) -> dict:
    """The baseline of `kmeans_part_probe` without any backbone: the same k-means and scores on each patch's raw
    (ImageNet-normalised) pixels, `patch_size` x `patch_size` x 3 numbers. A backbone that does not beat it gives IVPT
    no part information beyond colour."""
    features, keypoints = zip(*((patch_pixels(pixels, patch_size), points)
                                for pixels, points in probe_batches(split, image_size, True, batch_size)))
    return kmeans_keypoint_scores(torch.cat(features), torch.cat(keypoints), image_size, num_clusters, seed)


def patch_pixels(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(B, 3, S, S)` images -> `(B, N, 3 * patch_size**2)` flattened non-overlapping patches, row-major like a
    ViT's."""
    return F.unfold(pixels, patch_size, stride=patch_size).transpose(1, 2)


def perfect_labelling_scores(part_maps: torch.Tensor, keypoints: torch.Tensor, image_size: int, grid: int,
                             num_labels: int) -> dict:
    """NMI / ARI (%) of the parts of `part_maps` labelled perfectly at a `grid` x `grid` patch grid: every patch takes
    the part that covers most of it, scored by `patch_label_scores` (background last, as in IVPT's maps).
    `part_maps` `(B, S, S)`: integer part labels in `[0, num_labels)` at the input size `S = image_size`,
    0 = background; `keypoints` `(B, P, 4)` rows `part_id, x, y, visible` in the same pixels. On synthetic birds, whose
    exact part maps the generator knows, this is what naming the drawn parts exactly scores at that grid."""
    shares = F.adaptive_avg_pool2d(F.one_hot(part_maps, num_labels).permute(0, 3, 1, 2).float(), grid)  # (B, L, g, g)
    labels = (shares.argmax(1) - 1) % num_labels  # background (0) last
    return patch_label_scores(labels, num_labels, keypoints, image_size) | {"grid": grid, "num_parts": num_labels - 1}
