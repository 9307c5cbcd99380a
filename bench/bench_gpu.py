"""Throughput and peak memory of IVPT on one GPU (run through bench/gpu.sh), or on CPU with `--device cpu --tiny`.

The paper recipe's model (ViT-B/14 reg4 at 518 px, n_pro 17,14,11,8,5, 200 classes; random weights) or the tiny test
config. Rows, at each `--batch`:
  * training step (clean pass, warped pass, all losses, backward, Adam step): fp32, bf16 autocast, bf16 + torch.compile
    (the compiled rows at the first batch size only: compiling is the slow part);
  * inference (no grad): fp32, bf16, bf16 + torch.compile;
  * the bare backbone (forward; forward + backward to its trainable input tokens), fp32 and bf16, for reference.
Each row: `--warmup` steps, then `--steps` timed steps (synchronised), images/s from the median step, peak memory
(`torch.cuda.max_memory_allocated`, reset per row). Then the data pipeline: JPEG decode + the training transform at the
model's image size on CUB-sized (500x375) images, images per CPU-second on one core, against the training images/s
measured above (the cores the loader needs to keep the GPU busy). Writes `--json` and the same path with `.md`.
"""

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ivpt import IvptConfig, IvptForImageClassification  # noqa: E402

TINY = dict(image_size=64, n_pro="6,5,4", num_labels=7,
            backbone_kwargs={"embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 8})
PAPER = dict(image_size=518, n_pro="17,14,11,8,5", num_labels=200)
# (mode, dtype, compiled)
ROWS = [("ivpt_train", "fp32", False), ("ivpt_train", "bf16", False), ("ivpt_train", "bf16", True),
        ("ivpt_inference", "fp32", False), ("ivpt_inference", "bf16", False), ("ivpt_inference", "bf16", True),
        ("bare_train", "fp32", False), ("bare_train", "bf16", False),
        ("bare_inference", "fp32", False), ("bare_inference", "bf16", False)]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model, runner, mode: str, batch: int, dtype: str, device):
    """One callable step of `mode`; `runner` is the model itself or its compiled wrapper."""
    config = model.config
    generator = torch.Generator().manual_seed(batch)
    images = torch.randn(batch, 3, config.image_size, config.image_size, generator=generator).to(device)
    labels = torch.randint(0, config.num_labels, (batch,), generator=generator).to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    backbone = model.ivpt.backbone

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            if mode == "bare_inference":
                with torch.no_grad():
                    backbone.forward_features(images)
            elif mode == "bare_train":
                backbone.forward_features(images).float().mean().backward()
            elif mode == "ivpt_inference":
                model.eval()
                with torch.no_grad():
                    runner(images)
            else:
                model.train()
                optimizer.zero_grad(set_to_none=True)
                runner(images, labels=labels).loss.backward()
                optimizer.step()

    return step


def measure(model, runner, mode, batch, dtype, compiled, device, warmup: int, steps: int) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = make_step(model, runner, mode, batch, dtype, device)
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"mode": mode, "dtype": dtype, "compiled": compiled, "batch": batch, "images_per_s": batch / seconds,
            "seconds_per_step": seconds, "warmup_s": warmup_s, "peak_memory_mib": peak}


def data_pipeline(image_size: int, count: int) -> dict:
    """JPEG decode + training transform on CUB-sized images: images per CPU-second on one core (1 torch thread)."""
    from cub_sized_images import cub_sized_jpegs
    from PIL import Image

    from ivpt.data import train_transform

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        jpegs = cub_sized_jpegs(count)
        transform = train_transform(image_size)
        transform(Image.open(io.BytesIO(jpegs[0])).convert("RGB"))  # warm-up
        cpu = time.process_time()
        for data in jpegs:
            transform(Image.open(io.BytesIO(data)).convert("RGB"))
        cpu = time.process_time() - cpu
    finally:
        torch.set_num_threads(threads)
    return {"images": count, "cpu_seconds": cpu, "images_per_cpu_s": count / cpu, "cpu_cores": os.cpu_count()}


def markdown(info: dict) -> str:
    lines = [f"Device: {info['device']}; {info['config']}; torch {info['torch']}; fp32 matmul precision "
             f"`{info['float32_matmul_precision']}`.", "",
             "| mode | dtype | torch.compile | batch | images/s | step (ms) | peak memory (MiB) | first steps (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in info["rows"]:
        memory = "–" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"
        lines.append(f"| {r['mode']} | {r['dtype']} | {'yes' if r['compiled'] else 'no'} | {r['batch']} "
                     f"| {r['images_per_s']:.1f} | {1000 * r['seconds_per_step']:.1f} | {memory} "
                     f"| {r['warmup_s']:.1f} |")
    data = info["data_pipeline"]
    lines += ["", f"Data pipeline (JPEG decode + training transform at {info['image_size']} px, 1 core): "
              f"{data['images_per_cpu_s']:.1f} images per CPU-second; this machine has {data['cpu_cores']} cores."]
    for r in info["rows"]:
        if r["mode"] == "ivpt_train":
            cores = r["images_per_s"] / data["images_per_cpu_s"]
            lines.append(f"- training {r['dtype']}{' + compile' if r['compiled'] else ''} at batch {r['batch']} "
                         f"consumes {r['images_per_s']:.1f} images/s = {cores:.2f} loader cores")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny config (a CPU check of the script)")
    parser.add_argument("--batch", default="16,4", help="batch sizes; the compiled rows use the first")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per row (compilation happens here)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--compile_backend", default="inductor", help="torch.compile backend of the compiled rows")
    parser.add_argument("--data_images", type=int, default=64, help="images of the data-pipeline measurement")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (use --device cpu --tiny to check the script)")
    batches = [int(b) for b in args.batch.split(",")]
    torch.manual_seed(0)
    config = IvptConfig(**(TINY if args.tiny else PAPER))
    model = IvptForImageClassification(config).to(device)
    compiled = torch.compile(model, backend=args.compile_backend)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "config": "tiny test config" if args.tiny else
            "paper recipe model (ViT-B/14 reg4, 518 px, n_pro 17,14,11,8,5, 200 classes)",
            "image_size": config.image_size, "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "compile_backend": args.compile_backend, "rows": []}
    print(json.dumps({k: v for k, v in info.items() if k != "rows"}), flush=True)
    for batch in batches:
        for mode, dtype, use_compile in ROWS:
            if use_compile and batch != batches[0]:
                continue
            try:
                row = measure(model, compiled if use_compile else model, mode, batch, dtype, use_compile, device,
                              args.warmup, args.steps)
            except torch.OutOfMemoryError:
                row = {"mode": mode, "dtype": dtype, "compiled": use_compile, "batch": batch, "error": "out of memory"}
                torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                continue
            print(json.dumps(row), flush=True)
            info["rows"].append(row)
    info["data_pipeline"] = data_pipeline(config.image_size, args.data_images)
    print(json.dumps(info["data_pipeline"]), flush=True)
    text = markdown(info)
    info["markdown"] = text
    out = Path(args.json)
    temporary = out.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(info, indent=2))
    temporary.replace(out)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
