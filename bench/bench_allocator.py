"""Page faults in CPU inference at batch 8, and the glibc settings that remove them (ViT-B/14 reg4 at 518 px, fp32).

    python bench/bench_allocator.py [--config full|tiny] [--batch 8] [--rounds 2] [--repetitions 2] [--json OUT]

glibc's malloc serves each allocation above its mmap threshold with a fresh `mmap` and unmaps it on free. The
threshold rises as such blocks are freed, but to 32 MiB at most, and at 518 px and batch 8 most of a ViT-B's
activations are larger (the MLP's hidden activations: 8 x 1374 x 3072 floats, 135 MB): every forward pass maps them
again, and the kernel faults in and zeroes every page. `MALLOC_MMAP_MAX_=0` (no mmap: large blocks come from the
heap) with a high `MALLOC_TRIM_THRESHOLD_` (freed heap is kept, not returned) reuses the pages instead; the price is
that the process keeps its peak memory mapped.

Both are read when a process starts, so each setting runs in processes of its own: per round one process per
setting (which runs first alternates), each timing the bare backbone forward and IVPT inference
(bench/bench_model.py's modes) interleaved after one warm-up call of each, with bench/timing.py's flagging of
repetitions during which other processes used the CPU. Min over clean repetitions; minor page faults per call from
getrusage. A setting where IVPT inference is faster than its own backbone fails the run (bench/timing.py).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402

SETTINGS = {
    "glibc default": {},
    "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2**40": {"MALLOC_MMAP_MAX_": "0",
                                                        "MALLOC_TRIM_THRESHOLD_": str(2**40)},
}
MODES = ("bare_forward", "ivpt_inference")


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def child_run(config: str, batch: int, repetitions: int) -> dict:
    """In a process started with one setting's environment: per mode, each repetition's seconds, flag, faults."""
    from bench_model import CONFIGS, build

    modes = build(CONFIGS[config], batch)[1]
    for name in MODES:
        modes[name]()  # warm-up: glibc's dynamic threshold settles on the sizes it has freed
    monitor, out = timing.ProcStatMonitor(), {name: [] for name in MODES}
    for _ in range(repetitions):
        monitor.new_round()
        for name in MODES:
            faults = minor_faults()
            repetition = monitor.run(modes[name])
            out[name].append({"seconds": repetition.seconds, "flagged": repetition.flagged,
                              "faults": minor_faults() - faults})
    return {"environment": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}, "modes": out}


def setting_environment(setting: str) -> dict:
    """This process's environment with the setting's glibc variables, and no other `MALLOC_` variable."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **SETTINGS[setting]}


def run(config: str, batch: int, rounds: int, repetitions: int) -> dict:
    results = {setting: {"environment": None, "modes": {name: [] for name in MODES}} for setting in SETTINGS}
    for index in range(rounds):
        for setting in (list(SETTINGS) if index % 2 == 0 else list(reversed(SETTINGS))):
            command = [sys.executable, __file__, "--child", config, str(batch), str(repetitions)]
            completed = subprocess.run(command, env=setting_environment(setting), stdout=subprocess.PIPE, text=True,
                                       check=True)
            out = json.loads(completed.stdout.strip().splitlines()[-1])
            results[setting]["environment"] = out["environment"]
            for name in MODES:
                results[setting]["modes"][name] += out["modes"][name]
            print(f"round {index + 1}, {setting}: " + ", ".join(
                f"{name} {[round(r['seconds'], 3) for r in out['modes'][name]]} s" for name in MODES), flush=True)
    return results


def summary(repetitions: list[dict]) -> dict:
    clean = [r for r in repetitions if not r["flagged"]]
    faults = sorted(r["faults"] for r in repetitions)
    return {"min_s": min((r["seconds"] for r in clean), default=float("nan")), "clean": len(clean),
            "flagged": len(repetitions) - len(clean), "median_faults": faults[len(faults) // 2]}


def markdown(results: dict, config: str, batch: int) -> tuple[str, list[str]]:
    lines = [f"{config}, batch {batch}, fp32, 2 threads:", "",
             "| glibc setting | bare fwd (s) | IVPT inference (s) | IVPT / bare | minor page faults per call (bare / "
             "IVPT) | clean/flagged (bare, IVPT) |", "|---|---|---|---|---|---|"]
    failures, mins = [], {}
    for setting, result in results.items():
        bare, ivpt = (summary(result["modes"][name]) for name in MODES)
        ratio = ivpt["min_s"] / bare["min_s"]
        mins[setting] = (bare["min_s"], ivpt["min_s"])
        try:
            timing.require_not_faster(f"{setting}: IVPT inference / bare forward", ratio)
        except timing.ImpossibleRatioError as error:
            failures.append(str(error))
        lines.append(f"| `{setting}` | {bare['min_s']:.3f} | {ivpt['min_s']:.3f} | {ratio:.3f} "
                     f"| {bare['median_faults']} / {ivpt['median_faults']} "
                     f"| {bare['clean']}/{bare['flagged']}, {ivpt['clean']}/{ivpt['flagged']} |")
    (default_bare, default_ivpt), (tuned_bare, tuned_ivpt) = mins.values()
    lines += ["", f"Speed-up of the second setting: bare forward {default_bare / tuned_bare:.2f}x, IVPT inference "
              f"{default_ivpt / tuned_ivpt:.2f}x. Times: min over clean repetitions; faults: median per call."]
    return "\n".join(lines), failures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="full", choices=["full", "tiny"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="processes per setting")
    parser.add_argument("--repetitions", type=int, default=2, help="timed repetitions of each mode per process")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        config, batch, repetitions = args.child
        print(json.dumps(child_run(config, int(batch), int(repetitions))))
        return
    results = run(args.config, args.batch, args.rounds, args.repetitions)
    text, failures = markdown(results, args.config, args.batch)
    timing.publish(text, results, failures, args.json)


if __name__ == "__main__":
    main()
