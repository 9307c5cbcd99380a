"""Where a GPU training step of IVPT spends its time: device busy time against wall time, kernel launches, host syncs.

    python bench/profile_gpu.py --json $OUT/profile_gpu.json                      # on the GPU machine
    python bench/profile_gpu.py --device cpu --tiny --batch 2 --json out.json     # CPU check of the script

For each batch size and mode (IVPT training step, bare backbone forward+backward, and both inference forwards) at
the given dtype: a few warm-up steps, then `--steps` steps under torch.profiler. Per step it reports the wall time,
the summed time of the device kernels (busy time), the number of kernel launches and of host-device syncs, and the
operators with the most self CPU and self device time. Wall time well above busy time means the GPU waits for the
host (launch overhead or syncs), which more batch, CUDA graphs or torch.compile can hide; busy time close to wall
means the kernels themselves are the cost.
"""

import argparse
import datetime
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import PAPER, TINY, make_step, synchronize  # noqa: E402

from ivpt import IvptConfig, IvptForImageClassification  # noqa: E402

MODES = ("ivpt_train", "bare_train", "ivpt_inference", "bare_inference")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def is_copy_or_sync(name: str) -> bool:
    """A CUDA runtime call that copies between host and device or waits for the device."""
    return name in SYNC_CALLS or name.startswith("cudaMemcpy")


def profile_mode(model, mode: str, batch: int, dtype: str, device, warmup: int, steps: int, top: int) -> dict:
    """Wall and device-busy milliseconds per step, launches and syncs per step, top operators, of `steps` steps."""
    step = make_step(model, model, mode, batch, dtype, device)
    for _ in range(warmup):
        step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        wall = (time.perf_counter() - start) / steps
    cpu_by_op, device_by_op, calls = Counter(), Counter(), Counter()
    for event in profiler.key_averages():
        cpu_by_op[event.key] += event.self_cpu_time_total / steps / 1000
        device_by_op[event.key] += getattr(event, "self_device_time_total", 0) / steps / 1000
        calls[event.key] += event.count / steps
    kernels = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {
        "mode": mode, "dtype": dtype, "batch": batch, "wall_ms": 1000 * wall,
        "device_busy_ms": sum(e.device_time_total for e in kernels) / steps / 1000,
        "device_self_ms_all_ops": sum(device_by_op.values()),  # cross-check: kernels counted under their ops too
        "kernel_launches": len(kernels) / steps,
        "host_copies_and_syncs": sum(count for name, count in calls.items() if is_copy_or_sync(name)),
        "top_cpu_ms": [[name, round(ms, 2)] for name, ms in cpu_by_op.most_common(top)],
        "top_device_ms": [[name, round(ms, 2)] for name, ms in device_by_op.most_common(top) if ms > 0],
    }


def sync_sites(model, batch: int, dtype: str, device) -> list[list]:
    """Host-device copies and syncs of one IVPT training step, counted by the innermost project frame that made them."""
    step = make_step(model, model, "ivpt_train", batch, dtype, device)
    step()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as profiler:
        step()
        synchronize(device)
    sites = Counter()
    for event in profiler.events():
        if is_copy_or_sync(event.name):
            node = event  # runtime calls carry no Python stack: take the nearest enclosing operator's
            while node is not None and not node.stack:
                node = node.cpu_parent
            frames = [frame for frame in (node.stack if node else []) if "ivpt/" in frame or "bench/" in frame]
            operator = event.cpu_parent.name if event.cpu_parent is not None else "?"
            sites[f"{event.name} in {operator} from {frames[0] if frames else 'outside the project'}"] += 1
    return [[site, count] for site, count in sites.most_common()]


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| mode | dtype | batch | wall per step (ms) | device busy (ms) | busy / wall "
             "| kernel launches "
             "| syncs + memcpys |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['dtype']} | {r['batch']} | {r['wall_ms']:.1f} | {r['device_busy_ms']:.1f} "
                     f"| {r['device_busy_ms'] / r['wall_ms']:.2f} | {r['kernel_launches']:.0f} "
                     f"| {r['host_copies_and_syncs']:.0f} |")
    for r in rows:
        if r["mode"] == "ivpt_train":
            lines += ["", f"IVPT training step, {r['dtype']}, batch {r['batch']}: most self device time (ms/step): "
                      + ", ".join(f"`{name}` {ms}" for name, ms in r["top_device_ms"][:8]),
                      "most self CPU time (ms/step): " + ", ".join(f"`{n}` {ms}" for n, ms in r["top_cpu_ms"][:8])]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny config (a CPU check of the script)")
    parser.add_argument("--batch", default="4,16")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (use --device cpu --tiny to check the script)")
    torch.manual_seed(0)
    model = IvptForImageClassification(IvptConfig(**(TINY if args.tiny else PAPER))).to(device)
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        for mode in MODES:
            rows.append(profile_mode(model, mode, batch, args.dtype, device, args.warmup, args.steps, args.top))
            print(json.dumps(rows[-1]), flush=True)
    sites = sync_sites(model, int(args.batch.split(",")[0]), args.dtype, device)
    print(json.dumps(sites), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    text = markdown(rows, f"Profile on {name}, torch {torch.__version__}, {'tiny' if args.tiny else 'paper'} model, "
                          f"{args.steps} profiled steps after {args.warmup} warm-up steps.")
    text += ("\n\nHost-device copies and syncs of one IVPT training step, by operator and (where the profiler "
             "records a Python stack) project line: ") + (
        ", ".join(f"{site} ({count})" for site, count in sites) or "none")
    out = Path(args.json)
    temporary = out.with_suffix(".json.tmp")
    temporary.write_text(json.dumps({"device": name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                                     "rows": rows, "sync_sites": sites, "markdown": text}, indent=2))
    temporary.replace(out)
    print(text)


if __name__ == "__main__":
    main()
