"""Where the time of IVPT goes beyond its backbone: torch.profiler on the four modes of bench_model.py.

    python bench/profile_model.py [--config full|tiny] [--batch 1] [--comparisons inference,train] [--top 12]
                                  [--per_block] [--json OUT]

For IVPT inference vs the bare forward, and the IVPT training step vs bare forward+backward + bare forward: per
operator, the self CPU time of IVPT minus that of the bare modes (one profiled repetition each, after a warm-up),
largest differences first. The difference is what the prototype machinery (and the second, warped pass) adds; the
profiler's own overhead applies to both sides alike. A table of times, not a timing benchmark: read it with the
model section's ratios. `--comparisons inference` profiles (and warms up) only the two inference modes, e.g. at
batch 8, where each training-step mode takes about a minute.

`--per_block`: the wall time of every backbone block (forward hooks, perf_counter) in the bare forward and in IVPT
inference, over interleaved rounds of bench/timing.py (repetitions disturbed by other processes left out; min per
block over the clean ones), and the time outside the blocks (IVPT: patch embedding, the prototype stages, pooling,
heads). The prompted blocks run the patch tokens plus the K prompt tokens; this table shows whether they cost more
than their share of extra tokens.

An IVPT total below the bare one (profiled self CPU time, or the per-block run's total wall time) fails the run with
bench/timing.py's explanation, after the tables are written: IVPT runs that whole backbone, so such a total is noise.
"""

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import CONFIGS, build  # noqa: E402
import timing  # noqa: E402


def self_cpu_by_op(function) -> tuple[Counter, float]:
    """Self CPU microseconds per operator name, and the total, of one call of `function`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        function()
    times = Counter()
    for event in profiler.key_averages():
        times[event.key] += event.self_cpu_time_total
    return times, sum(times.values())


COMPARED_MODES = {"inference": ("ivpt_inference", "bare_forward"),
                  "train": ("ivpt_train_step", "bare_forward_backward", "bare_forward")}


def compared_profiles(profiles: dict, comparison: str) -> tuple[tuple[Counter, float], tuple[Counter, float]]:
    """(IVPT, bare) profiles of a comparison; the bare side of the training step is forward+backward plus forward,
    summed per operator."""
    ivpt_mode, *bare_modes = COMPARED_MODES[comparison]
    bare = sum((profiles[mode][0] for mode in bare_modes), Counter())
    return profiles[ivpt_mode], (bare, sum(bare.values()))


def difference_table(ivpt: Counter, bare: Counter, top: int) -> list[dict]:
    keys = set(ivpt) | set(bare)
    rows = [{"op": k, "ivpt_ms": ivpt[k] / 1e3, "bare_ms": bare[k] / 1e3, "extra_ms": (ivpt[k] - bare[k]) / 1e3}
            for k in keys]
    return sorted(rows, key=lambda r: -r["extra_ms"])[:top]


def outside_blocks_seconds(block_seconds: list[dict[int, float]], repetition_seconds: list[float]) -> float:
    """Min over clean repetitions (one call each) of the repetition's wall time minus its blocks' times; NaN without
    any. Per repetition: the min total minus the sum of per-block mins would mix repetitions and charge the blocks'
    luck to the rest."""
    return min((total - sum(blocks.values()) for blocks, total in zip(block_seconds, repetition_seconds)),
               default=float("nan"))


def per_block_times(blocks, bare_blocks, modes: dict, rounds: int) -> dict:
    """Per mode: per-block wall seconds (min over clean repetitions), the tokens each block ran, and the total.
    `blocks`: IVPT's backbone blocks; `bare_blocks`: those of the bare modes (build() gives them a copy)."""
    current: dict[int, float] = {}
    tokens: dict[int, int] = {}

    def before(index):
        return lambda module, args: current.__setitem__(index, time.perf_counter())

    def after(index):
        def hook(module, args, output):
            current[index] = time.perf_counter() - current[index]
            tokens[index] = output.shape[1]
        return hook

    handles = [h for i, block in [*enumerate(blocks), *enumerate(bare_blocks)]
               for h in (block.register_forward_pre_hook(before(i)), block.register_forward_hook(after(i)))]
    records: dict[str, list[dict]] = {name: [] for name in modes}
    token_counts: dict[str, dict[int, int]] = {}

    def recorded(name):
        def run():
            current.clear()
            modes[name]()
            records[name].append(dict(current))
            token_counts[name] = dict(tokens)
        return run

    for function in modes.values():
        function()  # warm-up, unrecorded
    result = timing.time_modes({name: recorded(name) for name in modes}, min_rounds=rounds, max_rounds=rounds,
                               warmup=False, log=lambda line: print(line, file=sys.stderr, flush=True))
    for handle in handles:
        handle.remove()
    out = {"summary": result.summary()}
    for name in modes:
        clean = [(r, rep) for r, rep in zip(records[name], result[name].repetitions) if not rep.flagged]
        per_block = [min((r[i] for r, _ in clean), default=float("nan")) for i in range(len(blocks))]
        outside = outside_blocks_seconds([r for r, _ in clean], [rep.seconds for _, rep in clean])
        out[name] = {"blocks_s": per_block, "tokens": [token_counts[name][i] for i in range(len(blocks))],
                     "outside_s": outside, "total_s": result[name].min, "clean": len(clean),
                     "flagged": result[name].flagged}
    return out


def per_block_markdown(times: dict, bare: str, ivpt: str) -> list[str]:
    lines = [f"Per block, {ivpt} vs {bare} (wall ms, min over clean repetitions; {times['summary']}):", "",
             "| block | tokens bare / IVPT | bare (ms) | IVPT (ms) | IVPT / bare |", "|---|---|---|---|---|"]
    a, b = times[bare], times[ivpt]
    for i, (x, y) in enumerate(zip(a["blocks_s"], b["blocks_s"])):
        lines.append(f"| {i} | {a['tokens'][i]} / {b['tokens'][i]} | {1e3 * x:.1f} | {1e3 * y:.1f} | {y / x:.3f} |")
    lines.append(f"| outside the blocks (per repetition: its wall time minus its blocks') | | {1e3 * a['outside_s']:.1f} "
                 f"| {1e3 * b['outside_s']:.1f} | {b['outside_s'] / a['outside_s']:.3f} |")
    lines.append(f"| total (min) | | {1e3 * a['total_s']:.1f} | {1e3 * b['total_s']:.1f} "
                 f"| {b['total_s'] / a['total_s']:.3f} |")
    return lines + [""]


def sanity_failures(result: dict) -> list[str]:
    """bench/timing.py's sanity rule on every IVPT / bare total of `result` (profiled self CPU time, per-block wall
    time): IVPT runs its whole backbone, so a total below the backbone's is noise and fails the run."""
    totals = [(f"{label}: profiled self CPU time, IVPT / bare", entry["ivpt_total_ms"] / entry["bare_total_ms"])
              for label, entry in result.items() if label != "per_block"]
    if "per_block" in result:
        times = result["per_block"]
        totals.append(("per-block timing: total wall time (min), IVPT / bare",
                       times["ivpt_inference"]["total_s"] / times["bare_forward"]["total_s"]))
    failures = []
    for label, ratio in totals:
        try:
            timing.require_not_faster(label, ratio)
        except timing.ImpossibleRatioError as error:
            failures.append(str(error))
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="full", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--comparisons", default="inference,train", choices=["inference,train", "inference", "train"],
                        help="which IVPT/bare comparisons to profile")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--per_block", action="store_true", help="also time every block (interleaved rounds)")
    parser.add_argument("--per_block_rounds", type=int, default=6)
    parser.add_argument("--json")
    args = parser.parse_args()
    comparisons = args.comparisons.split(",")
    if args.per_block and "inference" not in comparisons:
        parser.error("--per_block times the inference modes: include inference in --comparisons")
    model, modes = build(CONFIGS[args.config], args.batch)
    modes = {name: function for name, function in modes.items()
             if any(name in COMPARED_MODES[comparison] for comparison in comparisons)}
    for function in modes.values():
        function()  # warm-up
    profiles = {name: self_cpu_by_op(function) for name, function in modes.items()}
    lines, result = [], {}
    for comparison in comparisons:
        label = {"inference": "inference", "train": "train step"}[comparison]
        (ivpt, ivpt_total), (bare, bare_total) = compared_profiles(profiles, comparison)
        rows = difference_table(ivpt, bare, args.top)
        result[label] = {"ivpt_total_ms": ivpt_total / 1e3, "bare_total_ms": bare_total / 1e3, "rows": rows}
        lines += [f"{label}: IVPT {ivpt_total / 1e3:.0f} ms vs bare {bare_total / 1e3:.0f} ms of self CPU time under "
                  f"the profiler ({args.config}, batch {args.batch}); the operators that add most:", "",
                  "| operator | IVPT (ms) | bare (ms) | extra (ms) |", "|---|---|---|---|"]
        lines += [f"| `{r['op']}` | {r['ivpt_ms']:.1f} | {r['bare_ms']:.1f} | {r['extra_ms']:+.1f} |" for r in rows]
        lines.append("")
    if args.per_block:
        inference_modes = {name: modes[name] for name in ("bare_forward", "ivpt_inference")}
        bare_blocks = modes["bare_forward"].backbone.blocks
        result["per_block"] = per_block_times(model.ivpt.backbone.blocks, bare_blocks, inference_modes,
                                              args.per_block_rounds)
        lines += per_block_markdown(result["per_block"], "bare_forward", "ivpt_inference")
    timing.publish("\n".join(lines), result, sanity_failures(result), args.json)


if __name__ == "__main__":
    main()
