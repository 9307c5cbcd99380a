"""Where the time of IVPT goes beyond its backbone: torch.profiler on the four modes of bench_model.py.

    python bench/profile_model.py [--config full|tiny] [--batch 1] [--top 12] [--json OUT]

For IVPT inference vs the bare forward, and the IVPT training step vs bare forward+backward + bare forward: per
operator, the self CPU time of IVPT minus that of the bare modes (one profiled repetition each, after a warm-up),
largest differences first. The difference is what the prototype machinery (and the second, warped pass) adds; the
profiler's own overhead applies to both sides alike. A table of times, not a timing benchmark: read it with the
model section's ratios.
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import CONFIGS, build  # noqa: E402


def self_cpu_by_op(function) -> tuple[Counter, float]:
    """Self CPU microseconds per operator name, and the total, of one call of `function`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        function()
    times = Counter()
    for event in profiler.key_averages():
        times[event.key] += event.self_cpu_time_total
    return times, sum(times.values())


def difference_table(ivpt: Counter, bare: Counter, top: int) -> list[dict]:
    keys = set(ivpt) | set(bare)
    rows = [{"op": k, "ivpt_ms": ivpt[k] / 1e3, "bare_ms": bare[k] / 1e3, "extra_ms": (ivpt[k] - bare[k]) / 1e3}
            for k in keys]
    return sorted(rows, key=lambda r: -r["extra_ms"])[:top]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="full", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json")
    args = parser.parse_args()
    _, modes = build(CONFIGS[args.config], args.batch)
    for function in modes.values():
        function()  # warm-up
    profiles = {name: self_cpu_by_op(function) for name, function in modes.items()}
    bare_train = profiles["bare_forward_backward"][0] + profiles["bare_forward"][0]
    comparisons = {
        "inference": (profiles["ivpt_inference"], (profiles["bare_forward"][0], profiles["bare_forward"][1])),
        "train step": (profiles["ivpt_train_step"], (bare_train, sum(bare_train.values()))),
    }
    lines, result = [], {}
    for label, ((ivpt, ivpt_total), (bare, bare_total)) in comparisons.items():
        rows = difference_table(ivpt, bare, args.top)
        result[label] = {"ivpt_total_ms": ivpt_total / 1e3, "bare_total_ms": bare_total / 1e3, "rows": rows}
        lines += [f"{label}: IVPT {ivpt_total / 1e3:.0f} ms vs bare {bare_total / 1e3:.0f} ms of self CPU time under "
                  f"the profiler ({args.config}, batch {args.batch}); the operators that add most:", "",
                  "| operator | IVPT (ms) | bare (ms) | extra (ms) |", "|---|---|---|---|"]
        lines += [f"| `{r['op']}` | {r['ivpt_ms']:.1f} | {r['bare_ms']:.1f} | {r['extra_ms']:+.1f} |" for r in rows]
        lines.append("")
    markdown = "\n".join(lines)
    print(markdown)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": result, "markdown": markdown}, indent=2))


if __name__ == "__main__":
    main()
