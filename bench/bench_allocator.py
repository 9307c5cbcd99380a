"""Page faults in CPU inference at batch 8, and the glibc settings that remove them (ViT-B/14 reg4 at 518 px, fp32).

    python bench/bench_allocator.py [--config full|tiny] [--batch 8] [--processes 2] [--rounds 2] [--json OUT]

glibc's malloc serves each allocation above its mmap threshold with a fresh `mmap` and unmaps it on free. The
threshold rises as such blocks are freed, but to 32 MiB at most, and at 518 px and batch 8 most of a ViT-B's
activations are larger (the MLP's hidden activations: 8 x 1374 x 3072 floats, 135 MB): every forward pass maps them
again, and the kernel faults in and zeroes every page. `MALLOC_MMAP_MAX_=0` (no mmap: large blocks come from the
heap) with a high `MALLOC_TRIM_THRESHOLD_` (freed heap is kept, not returned) reuses the pages instead; the price is
that the process keeps its peak memory mapped.

Both are read when a process starts, so each setting runs in processes of its own (`--processes` per setting; which
setting runs first alternates). In each, the bare backbone forward and IVPT inference (bench/bench_model.py's modes)
are timed as a lockstep pair (bench/timing.py, point 6: two threads that take turns three times a block, a round
being two calls with each side once on each thread), after one untimed call with each side on each thread, so that
both threads' allocator state has settled. Page faults per call of each side: getrusage(RUSAGE_THREAD) on the
side's own thread (a side runs only on its thread, and the other side waits meanwhile); the pages its OpenMP worker
thread faults in are not counted (at 2 threads about as many again: session 11 counted the whole process around a
main-thread call, 2.02 million per bare forward, against 1.01 million on the side's thread in session 14).
The sides run on threads other than the main one: there the second setting halved the faults counted (session 14),
whereas in session 11's main-thread run it removed them (2.02 million -> 0 per bare forward), likely because glibc
serves other threads from arenas of their own, made of mmap'd heaps that it unmaps as they empty. The ratio IVPT /
bare is the median over all clean rounds of a setting; a setting where it is below 1 fails the run (bench/timing.py).
A setting's speed-up: the ratio of the other setting's fastest clean round of that side to its own (processes differ,
so these two are not lockstep figures).
"""

import argparse
import json
import os
import resource
import statistics
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


def counting_faults(function, faults: list[int]):
    """`function`, appending the minor page faults of the calling thread during each call to `faults`."""

    def counted():
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        function()
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

    return counted


def child_run(config: str, batch: int, rounds: int) -> dict:
    """In a process started with one setting's environment: the lockstep pair (bare forward, IVPT inference) for
    `rounds` rounds, and each side's page faults per call."""
    from bench_model import CONFIGS, build, switch_modules

    model, modes = build(CONFIGS[config], batch)
    faults = {name: [] for name in MODES}
    bare, ivpt = (counting_faults(modes[name], faults[name]) for name in MODES)
    with timing.Lockstep() as lockstep:
        lockstep.add_switch_points(switch_modules(model.ivpt.backbone, modes["bare_forward"].backbone))
        lockstep.run(bare, ivpt), lockstep.run(ivpt, bare)  # warm-up: each side once on each thread
        for counts in faults.values():
            counts.clear()
        timings, *_ = timing.time_lockstep({"inference": (bare, ivpt)}, lockstep, min_rounds=rounds,
                                           max_rounds=rounds)
    return {"environment": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
            "pair": timings["inference"].to_json(), "faults": faults}


def process_rounds(out: dict) -> list[tuple[float, float, bool]]:
    """(bare seconds, IVPT seconds, flagged) of each lockstep round of one child process's output."""
    pair = out["pair"]
    return list(zip(pair["denominator_s"], pair["numerator_s"], pair["flagged_each"]))


def setting_environment(setting: str) -> dict:
    """This process's environment with the setting's glibc variables, and no other `MALLOC_` variable."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **SETTINGS[setting]}


def run(config: str, batch: int, processes: int, rounds: int) -> dict:
    """Per setting: the `processes` children's outputs, in the order they ran."""
    results = {setting: {"environment": None, "processes": []} for setting in SETTINGS}
    for index in range(processes):
        for setting in (list(SETTINGS) if index % 2 == 0 else list(reversed(SETTINGS))):
            command = [sys.executable, __file__, "--child", config, str(batch), str(rounds)]
            completed = subprocess.run(command, env=setting_environment(setting), stdout=subprocess.PIPE, text=True,
                                       check=True)
            out = json.loads(completed.stdout.strip().splitlines()[-1])
            results[setting]["environment"] = out.pop("environment")
            results[setting]["processes"].append(out)
            print(f"process {index + 1}, {setting}: rounds (IVPT s / bare s) " + ", ".join(
                f"{n:.3f} / {d:.3f}{' (flagged)' if f else ''}" for d, n, f in process_rounds(out)), flush=True)
    return results


def summary(result: dict) -> dict:
    """A setting's rounds pooled over its processes: median ratio and interval, fastest clean round of each side,
    clean/flagged counts, median faults per call of each side."""
    rounds = [r for out in result["processes"] for r in process_rounds(out)]
    clean = [(d, n) for d, n, flagged in rounds if not flagged]
    ratios = [n / d for d, n in clean]
    faults = {name: [x for out in result["processes"] for x in out["faults"][name]] for name in MODES}
    nan = float("nan")
    return {"ratio": statistics.median(ratios) if ratios else nan, "interval": timing.median_interval(ratios),
            "bare_s": min((d for d, _ in clean), default=nan), "ivpt_s": min((n for _, n in clean), default=nan),
            "clean": len(clean), "flagged": len(rounds) - len(clean),
            "faults": {name: statistics.median(counts) if counts else nan for name, counts in faults.items()}}


def markdown(results: dict, config: str, batch: int) -> tuple[str, list[str]]:
    lines = [f"{config}, batch {batch}, fp32, 2 threads:", "",
             "| glibc setting | bare fwd (s, fastest round) | IVPT inference (s, fastest round) | IVPT / bare "
             "[95 % interval] | minor page faults per call (bare / IVPT) | clean/flagged rounds |",
             "|---|---|---|---|---|---|"]
    failures, summaries = [], {setting: summary(result) for setting, result in results.items()}
    for setting, s in summaries.items():
        low, high = s["interval"]
        span = " (range: < 6 rounds)" if s["clean"] < 6 else ""
        try:
            timing.require_not_faster(f"{setting}: IVPT inference / bare forward (median of the lockstep rounds)",
                                      s["ratio"], f"{s['clean']} clean / {s['flagged']} flagged rounds")
        except timing.ImpossibleRatioError as error:
            failures.append(str(error))
        lines.append(f"| `{setting}` | {s['bare_s']:.3f} | {s['ivpt_s']:.3f} | {s['ratio']:.3f} "
                     f"[{low:.3f}, {high:.3f}]{span} | {s['faults']['bare_forward']:.0f} / "
                     f"{s['faults']['ivpt_inference']:.0f} | {s['clean']}/{s['flagged']} |")
    default, tuned = summaries.values()
    lines += ["", f"Speed-up of the second setting: bare forward {default['bare_s'] / tuned['bare_s']:.2f}x, IVPT "
              f"inference {default['ivpt_s'] / tuned['ivpt_s']:.2f}x (fastest clean rounds, separate processes). "
              "A round: two lockstep calls of the pair, each side once on each thread; times are a round's two "
              "calls of a side. Ratio: median over the setting's clean rounds of IVPT / bare seconds, 95 % interval "
              "of that median; faults: median per call, counted on the side's own thread (not on its OpenMP "
              "worker thread, which faults in about as many pages again at 2 threads)."]
    return "\n".join(lines), failures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="full", choices=["full", "tiny"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--processes", type=int, default=2, help="processes per setting")
    parser.add_argument("--rounds", type=int, default=2, help="lockstep rounds per process")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        config, batch, rounds = args.child
        print(json.dumps(child_run(config, int(batch), int(rounds))))
        return
    results = run(args.config, args.batch, args.processes, args.rounds)
    text, failures = markdown(results, args.config, args.batch)
    timing.publish(text, results, failures, args.json)


if __name__ == "__main__":
    main()
