"""Throughput and peak memory of IVPT on an accelerator (run through bench/gpu.sh), or on CPU with --tiny.

For ViT-B/14 reg4 at 518 px with random weights (or the tiny config): images/s and peak memory of
(i) inference and (ii) the full training step (clean pass, warped pass, all losses, backward, Adam step), in fp32
and bf16 autocast, at batch 16 and at the largest power-of-two batch that fits, plus the bare backbone
(forward; forward + backward to the trainable input tokens) in the same run. Writes JSON.
"""

import argparse
import json
import platform
import time

import torch

from ivpt import IvptConfig, IvptForImageClassification

TINY = dict(image_size=64, n_pro="6,5,4", num_labels=7,
            backbone_kwargs={"embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 8})


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def make_step(model, mode: str, batch: int, dtype, device):
    config = model.config
    images = torch.randn(batch, 3, config.image_size, config.image_size, device=device)
    labels = torch.randint(0, config.num_labels, (batch,), device=device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    backbone = model.ivpt.backbone
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step():
        with autocast:
            if mode == "bare_inference":
                with torch.no_grad():
                    backbone.forward_features(images)
            elif mode == "bare_train":
                backbone.forward_features(images).float().mean().backward()
            elif mode == "ivpt_inference":
                with torch.no_grad():
                    model.eval()(images)
            else:
                model.train()
                optimizer.zero_grad(set_to_none=True)
                model(images, labels=labels).loss.backward()
                optimizer.step()

    return step


def measure(model, mode, batch, dtype, device, repeats) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = make_step(model, mode, batch, dtype, device)
    step()  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    return {"mode": mode, "dtype": dtype, "batch": batch, "images_per_s": batch / seconds,
            "seconds_per_step": seconds, "peak_memory_mib": peak_memory_mib(device)}


def largest_batch(model, mode, dtype, device, start: int, limit: int) -> int:
    """Doubles the batch from `start` until out of memory (or `limit`)."""
    batch, best = start, start
    while batch <= limit:
        try:
            make_step(model, mode, batch, dtype, device)()
            synchronize(device)
            best = batch
            batch *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny config (CPU check of the script)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max_batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = IvptConfig(**TINY) if args.tiny else IvptConfig(num_labels=200)
    model = IvptForImageClassification(config).to(device)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "config": "tiny" if args.tiny else "ViT-B/14 reg4 @ 518", "rows": []}
    print(json.dumps({k: v for k, v in info.items() if k != "rows"}), flush=True)
    for dtype in ("fp32", "bf16"):
        for mode in ("bare_inference", "ivpt_inference", "bare_train", "ivpt_train"):
            largest = largest_batch(model, mode, dtype, device, args.batch, args.max_batch)
            for batch in sorted({args.batch, largest}):
                row = measure(model, mode, batch, dtype, device, args.repeats)
                print(json.dumps(row), flush=True)
                info["rows"].append(row)
    with open(args.json, "w") as handle:
        json.dump(info, handle, indent=2)


if __name__ == "__main__":
    main()
