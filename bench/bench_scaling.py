"""Scaling of the IVPT training step on CPU with image size and number of prototypes, against the bare backbone in
the same run (ViT-B/14 reg4, random weights, batch 1, 2 threads, fp32).

    python bench/bench_scaling.py [--image_sizes 224,392] [--n_pro 5,4/9,7,5/17,14,11,8,5/33,27,21,15,9,5] [--json OUT]

Every point runs bench/bench_model.py's measurement in its own subprocess: the training step and its bare
side timed as a lockstep pair on bench/timing.py (two threads taking turns three times a transformer block, so the
machine's swings fall on both; a round is two calls, each side once on each thread; median ratio over the rounds with
its 95 % interval; disturbed rounds flagged and excluded; a ratio below 1 fails the run), peak RSS growth of the
training modes in fresh processes, FLOPs.
`time overhead` = IVPT training step / (bare forward+backward + bare forward) - 1: what the prototype machinery adds
on top of the two backbone passes a training step cannot avoid; `FLOP overhead` is the same ratio in counted FLOPs.
518 px is the `model` section (bench_model.py).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import child, interval_cell, measure, pair_cell  # noqa: E402


def row(label: str, result: dict) -> str:
    train = result["timing"]["pairs"]["train"]
    memory = result["peak_rss_growth_mib"]
    return (f"| {label} | {pair_cell(train, 'denominator')} | {pair_cell(train, 'numerator')} "
            f"| {100 * (result['ratios']['train'] - 1):+.1f} % {interval_cell(train)} "
            f"| {100 * (result['flop_ratios']['train'] - 1):+.2f} % "
            f"| {memory['bare_forward_backward']:.0f} | {memory['ivpt_train_step']:.0f} "
            f"| {train['clean']}/{train['flagged']} | {result['timing']['rounds']} |")


def point(label: str, config: dict, args) -> dict:
    flops = child("flops", json.dumps(config))
    return measure(label, 1, args.max_rounds, args.max_seconds, True, flops, config_kwargs=config)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_sizes", default="224,392")
    parser.add_argument("--n_pro", default="5,4/9,7,5/17,14,11,8,5/33,27,21,15,9,5", help="'/'-separated, at 224 px")
    parser.add_argument("--max_rounds", type=int, default=10)
    parser.add_argument("--max_seconds", type=float, default=120, help="cap on the timed rounds of one point")
    parser.add_argument("--json")
    args = parser.parse_args()
    header = ("| {} | bare fwd+bwd + fwd (s a round) | IVPT train step (s a round) "
              "| time overhead [95 % interval of the ratio] "
              "| FLOP overhead | bare fwd+bwd peak RSS growth (MiB) | IVPT step peak RSS growth (MiB) "
              "| clean/flagged rounds | rounds |\n|---|---|---|---|---|---|---|---|---|")
    results = {"image_size": {}, "n_pro": {}}
    lines = ["Image size (n_pro 17,14,11,8,5):", "", header.format("image size")]
    for size in [int(s) for s in args.image_sizes.split(",") if s]:
        results["image_size"][size] = point(f"{size} px", {"image_size": size, "num_labels": 200}, args)
        lines.append(row(str(size), results["image_size"][size]))
        print(lines[-1], flush=True)
    lines += ["", "Prototypes (224 px):", "", header.format("n_pro")]
    for n_pro in [n for n in args.n_pro.split("/") if n]:
        config = {"image_size": 224, "n_pro": n_pro, "num_labels": 200, "interpretation_stage_index": 0}
        results["n_pro"][n_pro] = point(f"n_pro {n_pro}", config, args)
        lines.append(row(n_pro, results["n_pro"][n_pro]))
        print(lines[-1], flush=True)
    any_result = next(iter(results["image_size"].values()), None) or next(iter(results["n_pro"].values()))
    lines += ["", "Lockstep pairs (`bench/bench_model.py`, `bench/timing.py` point 6): time overhead = median over the "
              "clean rounds of IVPT step / bare side - 1; times: both sides of the round whose ratio is that median "
              "(slower in lockstep than alone). " + any_result["timing"]["rule"] + "."]
    failures = [failure for group in results.values() for result in group.values()
                for failure in result.get("failures", [])]
    lines += [f"**Run failed (sanity rule):** {failure}" for failure in failures]
    markdown = "\n".join(lines)
    print(markdown)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "markdown": markdown}, indent=2, default=str))
    if failures:
        sys.exit(f"{len(failures)} ratio check(s) failed: the figures above are not publishable, see the explanation")


if __name__ == "__main__":
    main()
