"""Timing that survives a shared machine: the one method every benchmark of `bench/` uses.

The method, in full:

1. **Interleaved rounds in one process.** Every mode (e.g. "bare forward", "IVPT inference") runs once for warm-up,
   then round after round, each round running every mode once in a new shuffled order (seeded). Load and drift of the
   machine therefore hit every mode alike, and no mode always follows the same other mode.
2. **Each repetition is checked for foreign CPU use.** Around every repetition the busy CPU time of the whole machine
   (`/proc/stat`: user + nice + system + irq + softirq, summed over all cores) and this process's own CPU time
   (`os.times()`: user + system, all threads, plus the children that ended and were waited for meanwhile, such as
   data-loader workers joined at the end of a run) are read. *Foreign CPU* = busy delta - own delta: what other processes
   took while we were timing. A repetition is **flagged** when
   `foreign > FLAG_ABSOLUTE_S + FLAG_FRACTION * wall seconds` (0.03 s + 2 % of one core over the repetition; the
   absolute part covers the 10 ms tick of both counters and the kernel's own housekeeping).
   **Kernel threads are not foreign**: the CPU time of the kernel's own threads (processes with the `PF_KTHREAD` flag,
   0x00200000 in field 9 of `/proc/<pid>/stat`, or children of `kthreadd`, pid 2) is read around every repetition too
   and subtracted, and reported apart (`kernel_thread_cpu_s`). They mostly work for us (e.g. `kdamond`, memory
   management, runs while our own multi-GiB working set is touched), and `/proc/stat` cannot tell them from another
   process; a benchmark disturbed by heavy kernel work shows it in that column. The list of kernel threads is read
   once per round (about 60 threads, ~2 ms); one that starts within a round is counted as foreign until the next.
   **Hypervisor steal has its own allowance**: `steal` (field 8 of the `cpu` line: time the hypervisor gave our
   virtual CPUs' turns to other guests) is read apart (`steal_cpu_s`), and a repetition is flagged when it exceeds
   `FLAG_ABSOLUTE_S + STEAL_FRACTION * wall seconds` (5 % of one core). On the shared VM these benchmarks run on,
   a steady steal of about 2 % of one core never stops; it stretches every mode alike, and the interleaving of
   point 1 cancels it in the ratios, whereas counting it as foreign CPU flagged every repetition longer than ~15 s.
   Bursts above the allowance are still flagged, and each table states the steal measured.
   Flagged repetitions are excluded from every statistic and counted; tables state `clean/flagged` counts.
   Both counters tick every 10 ms, so repetitions much shorter than ~0.5 s are judged coarsely (a 20 ms repetition
   cannot exceed the absolute allowance); the goal rows (ViT-B/14 at 518 px) take seconds per repetition.
3. **Statistics**: min and median over the clean repetitions. Ratios use the min (the least disturbed run is the best
   estimate of the cost on an idle machine); the median is reported next to it.
4. **Stopping rule**: after at least `min_rounds` rounds, stop as soon as every mode has >= `min_clean` clean
   repetitions and no mode's min fell by more than `tolerance` (1 %) over the last `patience` (2) rounds; otherwise
   stop at `max_rounds` or when `max_seconds` is spent (the result then says so: `stop_reason`).
   **Ratios close to 1** (`guards`, e.g. IVPT inference / bare forward): while a guarded ratio of mins is below
   `1 + guard_margin` (2 %), a stable min is not enough: the rounds go on to `max_rounds` (or the time cap). A true
   ratio of 1.002 (what the prototype heads add at 224 px) is otherwise published as 0.99 whenever one mode's min
   is not yet at its floor; more rounds bring every min down to it. **A ratio still below 1 at `max_rounds`** proves
   that one min has not reached its floor yet, so the rounds go on past `max_rounds`, up to `impossible_max_rounds`
   (default twice `max_rounds`, still within the time cap), until every guarded ratio is >= 1; only then is a ratio
   below 1 reported as a failure (point 5).
   **Short calls** (`min_repetition_s`): a repetition runs the mode's callable as many times as needed to last at
   least `min_repetition_s` (the count is fixed per mode from the warm-up call's time), and reports the time per
   call. A 0.3 s forward then is timed over ~1 s, which averages out short disturbances too small to be flagged
   and keeps the 10 ms ticks of the flag counters small against the repetition.
5. **Sanity rule**: a model that runs its whole backbone plus heads cannot be faster than that backbone.
   `require_not_faster` raises `ImpossibleRatioError` (failing the run, with an explanation) when such a ratio is < 1.

`ProcStatMonitor` takes its two readers as arguments, so the flagging logic is tested with fake counters.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

FLAG_ABSOLUTE_S = 0.03
FLAG_FRACTION = 0.02
STEAL_FRACTION = 0.05
BUSY_FIELDS = (0, 1, 2, 5, 6)  # user, nice, system, irq, softirq (idle = 3, iowait = 4 are not busy)
STEAL_FIELD = 7  # steal: read apart, with its own allowance (module docstring, point 2)


def _cpu_line(path: str) -> list[int]:
    """The tick counters of the aggregate `cpu` line (the first line) of /proc/stat."""
    with open(path) as handle:
        fields = handle.readline().split()
    if fields[0] != "cpu":
        raise ValueError(f"{path}: first line is not the aggregate `cpu` line")
    return [int(value) for value in fields[1:]]


def machine_busy_seconds(path: str = "/proc/stat") -> float:
    """Busy CPU seconds of the whole machine since boot, summed over all cores, steal not included."""
    values = _cpu_line(path)
    return sum(values[i] for i in BUSY_FIELDS if i < len(values)) / os.sysconf("SC_CLK_TCK")


def machine_steal_seconds(path: str = "/proc/stat") -> float:
    """CPU seconds the hypervisor has stolen from this machine's virtual CPUs since boot, summed over all cores."""
    values = _cpu_line(path)
    return (values[STEAL_FIELD] if STEAL_FIELD < len(values) else 0) / os.sysconf("SC_CLK_TCK")


PF_KTHREAD = 0x00200000  # `flags` (field 9 of /proc/<pid>/stat) of a kernel thread
KTHREADD_PID = 2


def _stat_fields(text: str) -> list[str]:
    """Fields 3.. of a /proc/<pid>/stat line (the command name, field 2, may hold spaces and parentheses)."""
    return text[text.rindex(")") + 2 :].split()


def kernel_thread_pids(proc: str = "/proc") -> list[int]:
    """Pids of the kernel's own threads: `PF_KTHREAD` in their flags, or `kthreadd` (pid 2) and its children."""
    pids = []
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/stat") as handle:
                fields = _stat_fields(handle.read())
        except (OSError, ValueError):  # exited meanwhile
            continue
        pid, parent, flags = int(entry), int(fields[1]), int(fields[6])  # fields 1 (pid), 4 (ppid), 9 (flags)
        if flags & PF_KTHREAD or pid == KTHREADD_PID or parent == KTHREADD_PID:
            pids.append(pid)
    return sorted(pids)


def threads_cpu_seconds(pids: list[int], proc: str = "/proc") -> float:
    """User + system CPU seconds (fields 14 and 15 of /proc/<pid>/stat) of `pids`; exited ones count 0."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"{proc}/{pid}/stat") as handle:
                fields = _stat_fields(handle.read())
        except (OSError, ValueError):
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads) and of its children that have ended and been
    waited for (e.g. data-loader workers joined at the end of a Trainer run)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


@dataclass
class Repetition:
    seconds: float  # per call of the mode's callable
    foreign_cpu_s: float  # other processes' CPU seconds during the repetition (kernel threads excluded)
    flagged: bool
    kernel_thread_cpu_s: float = 0.0  # the kernel's own threads' CPU seconds, not counted as foreign
    calls: int = 1  # calls of the mode's callable in this repetition
    steal_cpu_s: float = 0.0  # CPU seconds the hypervisor stole meanwhile (own allowance, see the module docstring)


@dataclass
class ProcStatMonitor:
    """Times a callable and flags the run when other processes used the CPU meanwhile (see the module docstring).

    `list_kernel_threads` runs once per round (`new_round`), `read_kernel(pids)` around every repetition."""

    read_busy: Callable[[], float] = machine_busy_seconds
    read_own: Callable[[], float] = own_cpu_seconds
    read_steal: Callable[[], float] = machine_steal_seconds
    steal_fraction: float = STEAL_FRACTION
    clock: Callable[[], float] = time.perf_counter
    absolute_s: float = FLAG_ABSOLUTE_S
    fraction: float = FLAG_FRACTION
    list_kernel_threads: Callable[[], list[int]] = kernel_thread_pids
    read_kernel: Callable[[list[int]], float] = threads_cpu_seconds
    kernel_pids: list[int] | None = None

    def threshold(self, seconds: float) -> float:
        return self.absolute_s + self.fraction * seconds

    def steal_threshold(self, seconds: float) -> float:
        return self.absolute_s + self.steal_fraction * seconds

    def new_round(self) -> None:
        """Re-reads the list of kernel threads (cached for the round)."""
        self.kernel_pids = self.list_kernel_threads()

    def run(self, function: Callable[[], object], calls: int = 1) -> Repetition:
        """One repetition: `calls` calls of `function`, timed and flagged together; `seconds` is per call."""
        if self.kernel_pids is None:
            self.new_round()
        kernel, steal = self.read_kernel(self.kernel_pids), self.read_steal()
        busy, own, start = self.read_busy(), self.read_own(), self.clock()
        for _ in range(calls):
            function()
        seconds = self.clock() - start
        busy, own = self.read_busy() - busy, self.read_own() - own
        kernel, steal = self.read_kernel(self.kernel_pids) - kernel, self.read_steal() - steal
        foreign = busy - own - kernel
        flagged = foreign > self.threshold(seconds) or steal > self.steal_threshold(seconds)
        return Repetition(seconds / calls, foreign, flagged, kernel, calls, steal)


@dataclass
class ModeTiming:
    name: str
    repetitions: list[Repetition] = field(default_factory=list)

    @property
    def clean(self) -> list[float]:
        return [r.seconds for r in self.repetitions if not r.flagged]

    @property
    def flagged(self) -> int:
        return sum(r.flagged for r in self.repetitions)

    @property
    def min(self) -> float:
        return min(self.clean) if self.clean else float("nan")

    @property
    def median(self) -> float:
        return statistics.median(self.clean) if self.clean else float("nan")

    def counts(self) -> str:
        """`clean/flagged`, as printed in every table."""
        return f"{len(self.clean)}/{self.flagged}"

    def to_json(self) -> dict:
        return {"min_s": self.min, "median_s": self.median, "clean": len(self.clean), "flagged": self.flagged,
                "all_s": [r.seconds for r in self.repetitions],
                "flagged_each": [r.flagged for r in self.repetitions],
                "foreign_cpu_s": [r.foreign_cpu_s for r in self.repetitions],
                "kernel_thread_cpu_s": [r.kernel_thread_cpu_s for r in self.repetitions],
                "steal_cpu_s": [r.steal_cpu_s for r in self.repetitions],
                "calls_per_repetition": self.repetitions[0].calls if self.repetitions else 0}


@dataclass
class TimingResult:
    modes: dict[str, ModeTiming]
    rounds: int
    stop_reason: str
    rule: str

    def __getitem__(self, name: str) -> ModeTiming:
        return self.modes[name]

    def clean_flagged(self) -> tuple[int, int]:
        """Total clean and flagged repetitions over all modes."""
        return (sum(len(m.clean) for m in self.modes.values()), sum(m.flagged for m in self.modes.values()))

    def steal_fraction(self) -> float:
        """Stolen CPU seconds per wall second (one core = 1) over all repetitions."""
        repetitions = [r for m in self.modes.values() for r in m.repetitions]
        wall = sum(r.seconds * r.calls for r in repetitions)
        return sum(r.steal_cpu_s for r in repetitions) / wall if wall else 0.0

    def summary(self) -> str:
        """One line for under a table: rounds, clean/flagged counts, why it stopped, the flag rule, steal."""
        clean, flagged = self.clean_flagged()
        return (f"{self.rounds} interleaved rounds; {clean} clean / {flagged} flagged repetitions "
                f"(flagged = other processes used > {FLAG_ABSOLUTE_S} s + {FLAG_FRACTION:.0%} of the repetition's "
                f"wall time in CPU, kernel threads not counted, or the hypervisor stole > {FLAG_ABSOLUTE_S} s + "
                f"{STEAL_FRACTION:.0%}; excluded; steal over the run {self.steal_fraction():.1%} of one core); "
                f"stopped: {self.stop_reason}; statistic: min over clean repetitions")

    def to_json(self) -> dict:
        return {"rounds": self.rounds, "stop_reason": self.stop_reason, "rule": self.rule,
                "modes": {name: mode.to_json() for name, mode in self.modes.items()}}


def min_is_stable(history: list[dict[str, float]], patience: int, tolerance: float) -> bool:
    """True when no mode's min fell by more than `tolerance` (relative) over the last `patience` rounds.

    `history[i]` maps mode -> min over clean repetitions after round i (NaN while a mode has none).
    """
    if len(history) <= patience:
        return False
    before, now = history[-1 - patience], history[-1]
    for name, current in now.items():
        previous = before[name]
        if previous != previous or current != current:  # NaN: no clean repetition yet
            return False
        if current < previous * (1 - tolerance):
            return False
    return True


def guarded_ratios(guards: dict[str, tuple[tuple[str, ...], tuple[str, ...]]],
                   mins: dict[str, float]) -> dict[str, float]:
    """Each guard `label: (numerator modes, denominator modes)` -> sum of the numerator mins / sum of the denominator
    mins (NaN while a mode has no clean repetition)."""
    return {label: sum(mins[n] for n in numerator) / sum(mins[d] for d in denominator)
            for label, (numerator, denominator) in guards.items()}


def paired_round_ratios(modes: dict, numerator: tuple[str, ...], denominator: tuple[str, ...]) -> list[float]:
    """Per-round ratios sum(numerator times) / sum(denominator times) over the rounds in which every mode involved
    was clean (`modes`: `TimingResult.to_json()["modes"]`; repetition i of every mode ran in round i). The modes of
    one round ran back to back, so slow drift of the machine cancels in each ratio; their median is a second estimate
    beside the ratio of mins."""
    names = (*numerator, *denominator)
    rounds = min(len(modes[name]["all_s"]) for name in names)
    return [sum(modes[n]["all_s"][i] for n in numerator) / sum(modes[d]["all_s"][i] for d in denominator)
            for i in range(rounds) if not any(modes[name]["flagged_each"][i] for name in names)]


def calls_for(seconds: float, min_repetition_s: float) -> int:
    """Calls per repetition so that a repetition of calls taking `seconds` each lasts >= `min_repetition_s`."""
    return max(1, math.ceil(min_repetition_s / seconds)) if seconds > 0 else 1


def time_modes(
    modes: dict[str, Callable[[], object]],
    *,
    min_rounds: int = 3,
    max_rounds: int = 15,
    min_clean: int = 2,
    patience: int = 2,
    tolerance: float = 0.01,
    max_seconds: float | None = None,
    warmup: bool = True,
    min_repetition_s: float = 0.0,
    guards: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] | None = None,
    guard_margin: float = 0.02,
    impossible_max_rounds: int | None = None,
    seed: int = 0,
    monitor: ProcStatMonitor | None = None,
    before_each: Callable[[], object] = gc.collect,
    clock: Callable[[], float] = time.perf_counter,
    log: Callable[[str], None] | None = None,
) -> TimingResult:
    """Times every mode with the method of this module; returns per-mode repetitions, the rounds run and why it
    stopped. `max_seconds` caps the wall time spent in rounds (a round already begun is finished); `before_each` runs
    untimed before every repetition (default: a garbage collection, so none falls inside a timing).
    `min_repetition_s` (needs `warmup`), `guards`/`guard_margin` and `impossible_max_rounds`: see the module
    docstring, point 4."""
    if min_rounds < 1 or max_rounds < min_rounds:
        raise ValueError(f"need 1 <= min_rounds ({min_rounds}) <= max_rounds ({max_rounds})")
    impossible_max_rounds = 2 * max_rounds if impossible_max_rounds is None else impossible_max_rounds
    if impossible_max_rounds < max_rounds:
        raise ValueError(f"need impossible_max_rounds ({impossible_max_rounds}) >= max_rounds ({max_rounds})")
    guards = guards or {}
    unknown = sorted({m for numerator, denominator in guards.values() for m in (*numerator, *denominator)} - set(modes))
    if unknown:
        raise ValueError(f"guards name modes that are not timed: {unknown}")
    monitor = monitor or ProcStatMonitor()
    timings = {name: ModeTiming(name) for name in modes}
    rule = (f"stop after >= {min_rounds} rounds once every mode has >= {min_clean} clean repetitions and no mode's "
            f"min fell by > {tolerance:.0%} over the last {patience} rounds"
            + (f" and {', '.join(guards)} >= {1 + guard_margin:.2f} (else on to the last round)" if guards else "")
            + f"; at most {max_rounds} rounds"
            + (f" ({impossible_max_rounds} while a guarded ratio is < 1)" if guards and impossible_max_rounds > max_rounds
               else "")
            + (f" or {max_seconds:.0f} s" if max_seconds else "")
            + (f"; each repetition >= {min_repetition_s:g} s (several calls at small sizes)"
               if min_repetition_s else ""))
    calls = dict.fromkeys(modes, 1)
    if warmup:
        for name, function in modes.items():
            start = clock()
            function()
            calls[name] = calls_for(clock() - start, min_repetition_s)
    history: list[dict[str, float]] = []
    started = clock()
    stop_reason = f"max_rounds ({max_rounds}) reached before the min was stable"
    rounds = 0
    for rounds in range(1, impossible_max_rounds + 1):
        monitor.new_round()
        for name in random.Random(seed * 1000 + rounds).sample(list(modes), len(modes)):
            before_each()
            timings[name].repetitions.append(monitor.run(modes[name], calls[name]))
        history.append({name: timing.min for name, timing in timings.items()})
        ratios = guarded_ratios(guards, history[-1])
        near_one = [label for label, ratio in ratios.items() if not ratio >= 1 + guard_margin]  # NaN: near one
        below_one = [label for label, ratio in ratios.items() if ratio < 1]
        if log:
            log(f"round {rounds}: " + ", ".join(f"{n} {t.repetitions[-1].seconds:.3f}s"
                                                f"{' (flagged)' if t.repetitions[-1].flagged else ''}"
                                                for n, t in timings.items()))
        enough_clean = all(len(t.clean) >= min_clean for t in timings.values())
        stable = rounds >= min_rounds and enough_clean and min_is_stable(history, patience, tolerance)
        if stable and not near_one:
            stop_reason = "min stable"
            break
        stop_reason = f"max_rounds ({max_rounds}) reached " + (
            f"(min stable, but {', '.join(near_one)} within {guard_margin:.0%} of 1, so all rounds run)" if stable
            else "before the min was stable")
        if rounds > max_rounds:  # extra rounds, only while a guarded ratio is below 1
            stop_reason = (f"max_rounds ({max_rounds}) reached with {', '.join(below_one)} < 1, and "
                           f"impossible_max_rounds ({impossible_max_rounds}) too" if below_one else
                           f"max_rounds ({max_rounds}) reached with a guarded ratio < 1; {rounds - max_rounds} more "
                           "rounds until every guarded ratio was >= 1")
        if rounds >= max_rounds and not below_one:
            break
        if max_seconds is not None and clock() - started > max_seconds:
            stop_reason = f"time cap ({max_seconds:.0f} s) reached" + ("" if enough_clean else
                                                                       f", fewer than {min_clean} clean repetitions")
            break
    return TimingResult(timings, rounds, stop_reason, rule)


class ImpossibleRatioError(RuntimeError):
    """A measured ratio that cannot be true (a superset of work timed faster than its subset)."""


def require_not_faster(label: str, ratio: float, details: str = "") -> float:
    """Fails the run when `ratio` (IVPT / its own backbone, by construction >= 1) is below 1; returns it otherwise.
    `details` (e.g. `TimingResult.summary()`) goes into the message."""
    details = f" ({details})" if details else ""
    if ratio != ratio:
        raise ImpossibleRatioError(f"{label}: no clean repetitions to form the ratio{details}. Every repetition was "
                                   f"disturbed by other processes: re-run on a quiet machine.")
    if ratio < 1.0:
        raise ImpossibleRatioError(
            f"{label} = {ratio:.3f} < 1: IVPT runs its whole backbone plus the prototype heads, so it cannot take "
            f"less time than that backbone alone. The measurement is noise (another process used the CPU in a way the "
            f"/proc/stat check did not catch, or too few clean repetitions){details}. Re-run on a quiet machine or "
            f"with more rounds; the run fails rather than publish this number."
        )
    return ratio


def publish(markdown: str, results, failures: list[str], json_path: str | None) -> None:
    """The end of a benchmark script: prints `markdown` with a line per failed sanity check, writes `{"results",
    "markdown"}` to `json_path` when given, then exits non-zero if a check failed (the figures are kept for the
    record, marked as not publishable)."""
    if failures:
        markdown += "\n\n" + "\n".join(f"**Run failed (sanity rule):** {failure}" for failure in failures)
    print(markdown)
    if json_path:
        Path(json_path).write_text(json.dumps({"results": results, "markdown": markdown}, indent=2))
    if failures:
        sys.exit(f"{len(failures)} ratio check(s) failed: the figures above are not publishable, see the explanation")
