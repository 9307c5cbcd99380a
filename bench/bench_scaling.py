"""Scaling of the IVPT training step on CPU: image size (224/392/518) and number of prototypes, against the bare
backbone in the same run (ViT-B/14 reg4, random weights, batch 1, 2 threads; each point in its own subprocess).

    python bench/bench_scaling.py [--repeats 2] [--json OUT]

`time overhead` = IVPT training step / (bare forward+backward + bare forward) − 1: the share the prototype machinery
adds on top of the two backbone passes a training step cannot avoid (docs/method.md#equivalent-forms); `FLOP overhead` is the same ratio in
counted FLOPs (torch.utils.flop_counter), free of the timing noise of a shared machine.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import measure  # noqa: E402

IMAGE_SIZES = (224, 392, 518)
N_PRO = ("5,4", "9,7,5", "17,14,11,8,5", "33,27,21,15,9,5")


def row(label: str, result: dict) -> str:
    rows = result["rows"]
    bare = rows["bare_forward_backward"]["seconds"] + rows["bare_forward"]["seconds"]
    flop_overhead = f"{100 * (result['train_flop_ratio'] - 1):+.2f}%" if "train_flop_ratio" in result else "–"
    return (f"| {label} | {bare:.2f} | {rows['ivpt_train_step']['seconds']:.2f} | {100 * (result['train_ratio'] - 1):+.1f}% "
            f"| {flop_overhead} "
            f"| {rows['bare_forward_backward']['peak_rss_growth_mib']:.0f} | {rows['ivpt_train_step']['peak_rss_growth_mib']:.0f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    header = ("| {} | bare fwd+bwd + fwd (s) | IVPT train step (s) | time overhead | FLOP overhead "
              "| bare fwd+bwd peak RSS growth (MiB) | IVPT step peak RSS growth (MiB) |\n|---|---|---|---|---|---|---|")
    results = {"image_size": {}, "n_pro": {}}
    lines = ["Image size (n_pro 17,14,11,8,5):", "", header.format("image size")]
    for size in IMAGE_SIZES:
        results["image_size"][size] = measure({"image_size": size, "num_labels": 200}, args.repeats)
        lines.append(row(str(size), results["image_size"][size]))
        print(lines[-1], flush=True)
    lines += ["", "Prototypes (224 px):", "", header.format("n_pro")]
    for n_pro in N_PRO:
        config = {"image_size": 224, "n_pro": n_pro, "num_labels": 200, "interpretation_stage_index": 0}
        results["n_pro"][n_pro] = measure(config, args.repeats)
        lines.append(row(n_pro, results["n_pro"][n_pro]))
        print(lines[-1], flush=True)
    markdown = "\n".join(lines)
    print(markdown)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "markdown": markdown}, indent=2, default=str))


if __name__ == "__main__":
    main()
