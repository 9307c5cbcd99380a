"""Supervised pre-training of a small timm ViT on a CUB-layout dataset: the offline stand-in for DINOv2.

The demo has no Hub, so it makes its own frozen backbone: a small `vit_base_patch14_reg4_dinov2`-family ViT trained
on synthetic birds whose classes differ from the IVPT run's, saved as a plain timm `.safetensors` file. IVPT then
loads it through `IvptForImageClassification.from_backbone(..., backbone_weights=FILE)`, the same path a user takes
with an offline copy of DINOv2.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from .data import IMAGENET_MEAN, IMAGENET_STD, load_cub


def pretraining_transform(image_size: int) -> v2.Compose:
    """Light augmentation for pre-training (not the IVPT recipe): random resized crop, flip, ImageNet normalisation."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.5, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD)),
    ])


def pretrain_backbone(
    data_dir: str | Path,
    out_file: str | Path,
    backbone: str,
    backbone_kwargs: dict,
    image_size: int,
    epochs: int = 10,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    seed: int = 0,
    cache_dir: str | None = None,
    log=print,
) -> dict:
    """Trains `backbone` (plus a linear head) on the train and test images of `data_dir`; saves the backbone only.

    Returns a summary: final training accuracy (%), number of images, seconds.
    """
    torch.manual_seed(seed)
    dataset = load_cub(data_dir, "full", cache_dir=cache_dir, segmentations=False)
    images = torch.utils.data.ConcatDataset([dataset["train"], dataset["test"]])
    num_classes = dataset["train"].features["label"].num_classes
    transform = pretraining_transform(image_size)

    def collate(rows):
        return (torch.stack([transform(r["image"].convert("RGB")) for r in rows]),
                torch.tensor([r["label"] for r in rows]))

    loader = DataLoader(images, batch_size=batch_size, shuffle=True, collate_fn=collate, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    model = timm.create_model(backbone, pretrained=False, num_classes=num_classes, img_size=image_size,
                              **backbone_kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.05)
    total_steps = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, len(loader))) * 0.5 * (1 + math.cos(math.pi * step / total_steps))
    )
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        correct = seen = 0
        for pixel_values, labels in loader:
            logits = model(pixel_values)
            loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            correct += (logits.argmax(-1) == labels).sum().item()
            seen += len(labels)
        log(f"  pre-training epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, train accuracy {100 * correct / seen:.1f}%")
    model.reset_classifier(0)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    temporary = out_file.with_name(f".{out_file.name}.tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, temporary)
    temporary.replace(out_file)
    return {"train_accuracy": 100 * correct / max(1, seen), "num_images": len(images),
            "num_classes": num_classes, "seconds": time.perf_counter() - start}
