"""Model cost on CPU: IVPT against the bare timm backbone in the same run (issue: core model).

    python bench/bench_model.py [--config full|tiny|both] [--repeats 3] [--json OUT]

Each mode runs in its own subprocess (torch threads = 2, fp32, batch 1, random weights) so that its peak RSS growth
is its own: after building the model, one warm-up iteration, then `--repeats` timed iterations (median reported).
Modes: bare backbone forward (no grad); bare forward + backward to the trainable input-side tensors (cls/reg/pos);
IVPT inference forward (no grad); IVPT full training step (clean pass, warped pass, all losses, backward, Adam step).
"""

import argparse
import json
import platform
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


def run_mode(config_json: str, mode: str, repeats: int) -> dict:
    import torch

    from ivpt import IvptConfig, IvptForImageClassification

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = IvptConfig(**json.loads(config_json))
    model = IvptForImageClassification(config)
    backbone = model.ivpt.backbone
    images = torch.randn(1, 3, config.image_size, config.image_size)
    labels = torch.tensor([1])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step():
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
            model(images, labels=labels).loss.backward()
            optimizer.step()

    rss_before = peak_rss_mib()
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"mode": mode, "seconds": statistics.median(times), "all_seconds": times,
            "peak_rss_growth_mib": peak_rss_mib() - rss_before}


def measure(config_kwargs: dict, repeats: int) -> dict:
    """Runs every mode of one config, each in a fresh subprocess; ratios against the bare backbone."""
    rows = {}
    for mode in MODES:
        out = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(config_kwargs), mode, "--repeats", str(repeats)],
            capture_output=True, text=True, check=True,
        )
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    bare_train = rows["bare_forward_backward"]["seconds"] + rows["bare_forward"]["seconds"]
    return {
        "rows": rows,
        "inference_ratio": rows["ivpt_inference"]["seconds"] / rows["bare_forward"]["seconds"],
        "train_ratio": rows["ivpt_train_step"]["seconds"] / bare_train,
    }


def markdown(results: dict) -> str:
    lines = [
        "| config | bare fwd (s) | bare fwd+bwd (s) | IVPT inference (s) | IVPT train step (s) | inference / bare fwd "
        "| train / (bare fwd+bwd + bare fwd) | train-step peak RSS growth (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        rows = result["rows"]
        lines.append(
            f"| {name} | {rows['bare_forward']['seconds']:.3f} | {rows['bare_forward_backward']['seconds']:.3f} "
            f"| {rows['ivpt_inference']['seconds']:.3f} | {rows['ivpt_train_step']['seconds']:.3f} "
            f"| {result['inference_ratio']:.3f} | {result['train_ratio']:.3f} "
            f"| {rows['ivpt_train_step']['peak_rss_growth_mib']:.0f} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("full", "tiny", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_mode(*args.child, args.repeats)))
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
