"""Model cost on CPU: IVPT against the bare timm backbone in the same run (issue: core model).

    python bench/bench_model.py [--config full|tiny|both] [--repeats 3] [--json OUT]

Torch threads = 2, fp32, batch 1, random weights. Timings: all modes in one process, one warm-up each, then
`--repeats` rounds in a shuffled order (median reported), so machine load and drift affect every mode alike. Peak RSS
growth: each mode in a fresh process (two steps after building the model). FLOPs: torch.utils.flop_counter, a
noise-free measure of what the prototype machinery adds (matmuls, convolutions and attention are counted).
Modes: bare backbone forward (no grad); bare forward + backward to the trainable input-side tensors (cls/reg/pos);
IVPT inference forward (no grad); IVPT full training step (clean pass, warped pass, all losses, backward, Adam step).
"""

import argparse
import json
import platform
import random
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "full": dict(image_size=518, num_labels=200),
    "tiny": dict(
        image_size=224, n_pro="6,5,4", num_labels=20,
        backbone_kwargs={"embed_dim": 96, "depth": 4, "num_heads": 3, "patch_size": 16},
    ),
}
MODES = ("bare_forward", "bare_forward_backward", "ivpt_inference", "ivpt_train_step")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(config_json: str):
    import torch

    from ivpt import IvptConfig, IvptForImageClassification

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = IvptConfig(**json.loads(config_json))
    model = IvptForImageClassification(config)
    images = torch.randn(1, 3, config.image_size, config.image_size)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    backbone = model.ivpt.backbone

    def step(mode: str) -> None:
        if mode == "bare_forward":
            with torch.no_grad():
                backbone.forward_features(images)
        elif mode == "bare_forward_backward":
            backbone.forward_features(images).float().mean().backward()
        elif mode == "ivpt_inference":
            model.eval()
            with torch.no_grad():
                model(images)
        else:
            model.train()
            optimizer.zero_grad(set_to_none=True)
            model(images, labels=torch.tensor([1])).loss.backward()
            optimizer.step()

    return step


def run_timing(config_json: str, repeats: int) -> dict:
    """All modes in one process, shuffled each round (so drift and load hit every mode alike); median seconds."""
    step = build(config_json)
    for mode in MODES:
        step(mode)  # warm-up
    times = {mode: [] for mode in MODES}
    for round_index in range(repeats):  # a new mode order each round: no mode always follows the training step
        for mode in random.Random(round_index).sample(MODES, len(MODES)):
            start = time.perf_counter()
            step(mode)
            times[mode].append(time.perf_counter() - start)
    return {mode: statistics.median(values) for mode, values in times.items()}


def run_flops(config_json: str) -> dict:
    """FLOPs of every mode (torch.utils.flop_counter): a noise-free view of what the prototype machinery adds."""
    from torch.utils.flop_counter import FlopCounterMode

    step = build(config_json)
    flops = {}
    for mode in MODES:
        counter = FlopCounterMode(display=False)
        with counter:
            step(mode)
        flops[mode] = counter.get_total_flops()
    return flops


def run_memory(config_json: str, mode: str) -> float:
    """Peak RSS growth (MiB) of one mode in a fresh process: after building the model, two steps."""
    step = build(config_json)
    before = peak_rss_mib()
    step(mode)
    step(mode)
    return peak_rss_mib() - before


def child(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(config_kwargs: dict, repeats: int) -> dict:
    """Timings of every mode (one process, shuffled rounds) and the peak RSS growth of each (one process each)."""
    config_json = json.dumps(config_kwargs)
    seconds = child("timing", config_json, str(repeats))
    flops = child("flops", config_json, "-")
    rows = {mode: {"seconds": seconds[mode], "gflops": flops[mode] / 1e9,
                   "peak_rss_growth_mib": child("memory", config_json, mode)} for mode in MODES}
    bare_train = rows["bare_forward_backward"]["seconds"] + rows["bare_forward"]["seconds"]
    bare_train_flops = flops["bare_forward_backward"] + flops["bare_forward"]
    return {
        "rows": rows,
        "inference_ratio": rows["ivpt_inference"]["seconds"] / rows["bare_forward"]["seconds"],
        "train_ratio": rows["ivpt_train_step"]["seconds"] / bare_train,
        "inference_flop_ratio": flops["ivpt_inference"] / flops["bare_forward"],
        "train_flop_ratio": flops["ivpt_train_step"] / bare_train_flops,
    }


def markdown(results: dict) -> str:
    lines = [
        "| config | bare fwd (s) | bare fwd+bwd (s) | IVPT inference (s) | IVPT train step (s) | inference / bare fwd "
        "| train / (bare fwd+bwd + bare fwd) | FLOP ratio inference / train | train-step peak RSS growth (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        rows = result["rows"]
        lines.append(
            f"| {name} | {rows['bare_forward']['seconds']:.3f} | {rows['bare_forward_backward']['seconds']:.3f} "
            f"| {rows['ivpt_inference']['seconds']:.3f} | {rows['ivpt_train_step']['seconds']:.3f} "
            f"| {result['inference_ratio']:.3f} | {result['train_ratio']:.3f} "
            f"| {result['inference_flop_ratio']:.3f} / {result['train_flop_ratio']:.3f} "
            f"| {rows['ivpt_train_step']['peak_rss_growth_mib']:.0f} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("full", "tiny", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, config_json, value = args.child
        runners = {"timing": lambda: run_timing(config_json, int(value)), "flops": lambda: run_flops(config_json),
                   "memory": lambda: run_memory(config_json, value)}
        result = runners[kind]()
        print(json.dumps(result))
        return
    names = ("tiny", "full") if args.config == "both" else (args.config,)
    results = {name: measure(CONFIGS[name], args.repeats) for name in names}
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": platform.processor() or platform.machine(), "results": results,
                       "markdown": markdown(results)}, handle, indent=2)


if __name__ == "__main__":
    main()
