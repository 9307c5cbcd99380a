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
   estimate of the cost on an idle machine); the median is reported next to it. For ratios within a few % of 1 on a
   machine whose speed swings, mins of separate repetitions are not enough: see point 6.
4. **Stopping rule**: after at least `min_rounds` rounds, stop as soon as every mode has >= `min_clean` clean
   repetitions and no mode's min fell by more than `tolerance` (1 %) over the last `patience` (2) rounds; otherwise
   stop at `max_rounds` or when `max_seconds` is spent (the result then says so: `stop_reason`).
5. **Sanity rule**: a model that runs its whole backbone plus heads cannot be faster than that backbone.
   `require_not_faster` raises `ImpossibleRatioError` (failing the run, with an explanation) when such a ratio is < 1.
6. **Lockstep pairs** (`Lockstep`, `time_lockstep`), for ratios close to 1 on a machine whose speed swings: the two
   sides of a ratio (e.g. the bare forward and IVPT inference) run in two threads that take turns at switch points
   (e.g. before parts of every transformer block, and after the gradient of their inputs in a backward), so the
   machine's slowdowns longer than a turn fall on both sides alike; each side's time is the sum of its turns. On the
   shared 2-core VM of session 12, where 0.1-s matrix products on each core varied by +-15 % even when averaged over
   5 s, independently on the two cores, the per-call ratio of the batch-1 inference pair varied with a standard
   deviation of 3 % in lockstep against 12 % for the same two calls run one after the other.
   **Balanced rounds.** The same two threads serve every call (`Lockstep`), and a round makes two calls of a pair, each
   side once on each thread (which call comes first alternates from round to round). The ratio of a round is numerator
   seconds / denominator seconds, each summed over its two calls: a lasting factor that slows one thread multiplies both
   sums alike and cancels. The statistic is the median of the round ratios, with its distribution-free 95 % interval
   (`median_interval`); an A/A pair (the same callable on both sides) shows the method's own bias, and
   `PairTiming.thread_factor` the factor that cancelled. Why: in session 12 every call made two new threads and the
   ratio was taken per call; three A/A processes gave medians of 0.986, 0.987 and 1.014, the last with an interval of
   [1.002, 1.023], excluding 1 and the other two: an offset of either sign, lasting for a whole process, between two
   identical callables. New threads get their glibc arena and OpenMP team anew, and the order in which they ended can
   hand the same state to the same callable call after call. With persistent threads and balanced rounds, three A/A
   processes at batch 1 (518 px, 10 rounds each, session 13) gave 0.998 [0.990, 1.025], 0.991 [0.977, 1.025] and 1.006
   [0.990, 1.020], and thread factors of 1.017, 1.009 and 1.010: the starting thread ran 1-2 % slower in every process,
   a bias each call carried and each round cancelled.
   **Turns a third of a block** (session 14; the callers' switch points, `bench_model.switch_modules`). With one
   switch point per block, a batch-8 turn at 518 px lasted 1.7 s (forward) to 3.4 s (backward), and a slowdown shorter
   than a turn fell on one side: batch-8 rounds spread about twice as widely as batch-1 rounds, and the batch-8
   training pair's median fell below 1 in three processes (0.993, 0.994, and 0.995 after three rounds) though IVPT
   adds to that step. With turns before each block's attention, MLP and MLP output layer, session 14's model run gave
   seven batch-8 training rounds of 1.005-1.027 and a batch-1 A/A check of 1.000 [0.994, 1.005].
   Each side runs somewhat slower than alone (the other side's turn evicts caches, and each thread has its own OpenMP
   team), which is why absolute times come from the lockstep calls only as a record, not as the cost on an idle machine.

`ProcStatMonitor` takes its two readers as arguments, so the flagging logic is tested with fake counters.
"""

from __future__ import annotations

import gc
import json
import math
import os
import queue
import random
import statistics
import sys
import threading
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
    seconds: float
    foreign_cpu_s: float  # other processes' CPU seconds during the repetition (kernel threads excluded)
    flagged: bool
    kernel_thread_cpu_s: float = 0.0  # the kernel's own threads' CPU seconds, not counted as foreign
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

    def run(self, function: Callable[[], object]) -> Repetition:
        """One repetition: one call of `function`, timed and flagged."""
        if self.kernel_pids is None:
            self.new_round()
        kernel, steal = self.read_kernel(self.kernel_pids), self.read_steal()
        busy, own, start = self.read_busy(), self.read_own(), self.clock()
        function()
        seconds = self.clock() - start
        busy, own = self.read_busy() - busy, self.read_own() - own
        kernel, steal = self.read_kernel(self.kernel_pids) - kernel, self.read_steal() - steal
        foreign = busy - own - kernel
        flagged = foreign > self.threshold(seconds) or steal > self.steal_threshold(seconds)
        return Repetition(seconds, foreign, flagged, kernel, steal)


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
                "steal_cpu_s": [r.steal_cpu_s for r in self.repetitions]}


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
        wall = sum(r.seconds for r in repetitions)
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


def round_limits(min_rounds: int, max_rounds: int, max_seconds: float | None) -> str:
    """Checks 1 <= min_rounds <= max_rounds; returns the end of a stopping rule's text."""
    if min_rounds < 1 or max_rounds < min_rounds:
        raise ValueError(f"need 1 <= min_rounds ({min_rounds}) <= max_rounds ({max_rounds})")
    return f"at most {max_rounds} rounds" + (f" or {max_seconds:.0f} s" if max_seconds else "")


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
    seed: int = 0,
    monitor: ProcStatMonitor | None = None,
    before_each: Callable[[], object] = gc.collect,
    clock: Callable[[], float] = time.perf_counter,
    log: Callable[[str], None] | None = None,
) -> TimingResult:
    """Times every mode with the method of this module; returns per-mode repetitions, the rounds run and why it
    stopped. `max_seconds` caps the wall time spent in rounds (a round already begun is finished); `before_each` runs
    untimed before every repetition (default: a garbage collection, so none falls inside a timing)."""
    rule = (f"stop after >= {min_rounds} rounds once every mode has >= {min_clean} clean repetitions and no mode's "
            f"min fell by > {tolerance:.0%} over the last {patience} rounds; "
            + round_limits(min_rounds, max_rounds, max_seconds))
    monitor = monitor or ProcStatMonitor()
    timings = {name: ModeTiming(name) for name in modes}
    if warmup:
        for function in modes.values():
            function()
    history: list[dict[str, float]] = []
    started = clock()
    stop_reason = f"max_rounds ({max_rounds}) reached before the min was stable"
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        monitor.new_round()
        for name in random.Random(seed * 1000 + rounds).sample(list(modes), len(modes)):
            before_each()
            timings[name].repetitions.append(monitor.run(modes[name]))
        history.append({name: timing.min for name, timing in timings.items()})
        if log:
            log(f"round {rounds}: " + ", ".join(f"{n} {t.repetitions[-1].seconds:.3f}s"
                                                f"{' (flagged)' if t.repetitions[-1].flagged else ''}"
                                                for n, t in timings.items()))
        enough_clean = all(len(t.clean) >= min_clean for t in timings.values())
        if rounds >= min_rounds and enough_clean and min_is_stable(history, patience, tolerance):
            stop_reason = "min stable"
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


# --- Lockstep pairs (module docstring, point 6) ----------------------------------------------------------------------


class Lockstep:
    """Runs two callables in two threads that take turns: at every switch point (`switch()`, called from hooks that
    `add_switch_points` puts on modules) the running side stops its clock and hands the CPU to the other side, which
    runs to its own next switch point. Only one side runs at a time; each side's time is the sum of its own turns.
    A side whose switch points are used up runs on alone; one that raises stops the run (re-raised by `run`).

    The two threads are started once and serve every `run` (side 0 always on the first thread, which starts): each
    keeps its own OpenMP team and glibc arena from call to call. With threads made anew for each call, an arena
    followed whichever callable had run last into the next call, giving one callable of a pair a lasting offset of
    its own (module docstring, point 6); a thread's lasting offset cancels in `time_lockstep`'s balanced rounds."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self._turn_changed = threading.Condition()
        self._local = threading.local()
        self._turn, self._done, self._elapsed = 0, [True, True], [0.0, 0.0]
        self._jobs = (queue.SimpleQueue(), queue.SimpleQueue())
        self._finished: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self.switches = 0

    def _take_turn(self, side: int) -> None:
        with self._turn_changed:
            self._turn_changed.wait_for(lambda: self._turn == side or self._done[1 - side])
        self._local.started = self.clock()

    def _hand_over(self, side: int, finished: bool = False) -> None:
        self._elapsed[side] += self.clock() - self._local.started
        with self._turn_changed:
            self._done[side] = self._done[side] or finished
            self._turn = 1 - side
            self._turn_changed.notify_all()

    def switch(self) -> None:
        """A switch point: hands over to the other side (no-op outside `run`, or when the other side has finished)."""
        side = getattr(self._local, "side", None)
        if side is None or self._done[1 - side]:
            return
        self.switches += 1
        self._hand_over(side)
        self._take_turn(side)

    def _serve(self, side: int) -> None:
        """A side's thread: runs each callable put in its queue, until it gets None."""
        while (function := self._jobs[side].get()) is not None:
            self._local.side, error = side, None
            self._take_turn(side)
            try:
                function()
            except BaseException as raised:  # noqa: BLE001 - re-raised in the calling thread
                error = raised
            finally:
                self._local.side = None
                self._hand_over(side, finished=True)
                self._finished.put(error)

    def run(self, first: Callable[[], object], second: Callable[[], object]) -> tuple[float, float]:
        """Runs `first` (it starts, on the first thread) and `second` in lockstep; returns each one's seconds."""
        if not self._threads:
            self._threads = [threading.Thread(target=self._serve, args=(side,), name=f"lockstep-{side}", daemon=True)
                             for side in (0, 1)]
            for thread in self._threads:
                thread.start()
        self._turn, self._done, self._elapsed = 0, [False, False], [0.0, 0.0]
        for side, function in enumerate((first, second)):
            self._jobs[side].put(function)
        errors = [error for error in (self._finished.get(), self._finished.get()) if error is not None]
        if errors:
            raise errors[0]
        return self._elapsed[0], self._elapsed[1]

    def close(self) -> None:
        """Ends the two threads (a later `run` starts new ones)."""
        for jobs in self._jobs:
            jobs.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []

    def __enter__(self) -> "Lockstep":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_switch_points(self, modules) -> list:
        """A switch point before each of `modules` runs forward and, when its input is computed by autograd (not a
        leaf), after the gradient of that input is computed (a tensor hook: no autograd node is added, so in-place
        writes on the module's output are unaffected). Returns the forward hooks' handles (`.remove()` them)."""

        def before_forward(module, args):
            inputs = args[0] if args else None
            # only on a non-leaf input: its hook goes with the graph, whereas one on a leaf would stay for every later
            # backward
            if getattr(inputs, "grad_fn", None) is not None and getattr(self._local, "side", None) is not None:
                inputs.register_hook(lambda grad: self.switch())
            self.switch()

        return [module.register_forward_pre_hook(before_forward) for module in modules]


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: the order statistics x(k), x(n+1-k) with k the largest
    index such that P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2. Below 6 values no such k exists at 95 %: the
    interval is then the whole range (stated as such by the caller)."""
    ordered, n = sorted(values), len(values)
    if not n:
        return float("nan"), float("nan")
    tail, k, below = (1 - confidence) / 2, 0, 0.0
    while k < n // 2 and below + math.comb(n, k) / 2**n <= tail:
        below += math.comb(n, k) / 2**n
        k += 1
    k = max(k, 1)
    return ordered[k - 1], ordered[n - k]


@dataclass
class PairTiming:
    """The lockstep calls of one pair, two per round: `sides[i]` = (denominator seconds, numerator seconds) of call i,
    `numerator_thread[i]` = the thread (0 starts) the numerator ran on. The two calls of a round put each side on
    each thread once."""

    name: str
    sides: list[tuple[float, float]] = field(default_factory=list)
    numerator_thread: list[int] = field(default_factory=list)
    repetitions: list[Repetition] = field(default_factory=list)  # the flag check of each call (both sides)

    def round_sides(self) -> list[tuple[tuple[float, float], bool]]:
        """((denominator seconds, numerator seconds) summed over the round's two calls, flagged) of every complete
        round; a round is flagged when either call is."""
        return [((self.sides[i][0] + self.sides[i + 1][0], self.sides[i][1] + self.sides[i + 1][1]),
                 self.repetitions[i].flagged or self.repetitions[i + 1].flagged)
                for i in range(0, len(self.sides) - 1, 2)]

    @property
    def ratios(self) -> list[float]:
        """numerator / denominator seconds of every clean round (each side's two calls summed): a factor that slows
        one thread multiplies both sides' sums alike (one call each on it), so it cancels."""
        return [numerator / denominator for (denominator, numerator), flagged in self.round_sides() if not flagged]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios) if self.ratios else float("nan")

    def interval(self) -> tuple[float, float]:
        return median_interval(self.ratios)

    def thread_factor(self) -> float:
        """Median over the clean rounds of sqrt(call ratio with the numerator on thread 0 / with it on thread 1): how
        much slower the starting thread ran than the other (1: alike), the lasting offset the rounds cancel."""
        factors = []
        for i in range(0, len(self.sides) - 1, 2):
            calls = [(self.numerator_thread[j], self.sides[j][1] / self.sides[j][0]) for j in (i, i + 1)
                     if not self.repetitions[j].flagged]
            if len(calls) == 2:
                on = dict(calls)
                factors.append(math.sqrt(on[0] / on[1]))
        return statistics.median(factors) if factors else float("nan")

    def to_json(self) -> dict:
        low, high = self.interval()
        rounds = self.round_sides()
        return {"ratio": self.ratio, "interval_95": [low, high], "ratios": self.ratios,
                "clean": len(self.ratios), "flagged": sum(flagged for _, flagged in rounds),
                "thread_factor": self.thread_factor(),
                "denominator_s": [s[0] for s, _ in rounds], "numerator_s": [s[1] for s, _ in rounds],
                "flagged_each": [flagged for _, flagged in rounds],
                "calls": {"denominator_s": [s[0] for s in self.sides], "numerator_s": [s[1] for s in self.sides],
                          "numerator_thread": self.numerator_thread,
                          "flagged": [r.flagged for r in self.repetitions],
                          "foreign_cpu_s": [r.foreign_cpu_s for r in self.repetitions],
                          "steal_cpu_s": [r.steal_cpu_s for r in self.repetitions]}}


def time_lockstep(
    pairs: dict[str, tuple[Callable[[], object], Callable[[], object]]],
    lockstep: Lockstep,
    *,
    min_rounds: int = 5,
    max_rounds: int = 16,
    half_width: float = 0.01,
    max_seconds: float | None = None,
    seed: int = 0,
    monitor: ProcStatMonitor | None = None,
    before_each: Callable[[], object] = gc.collect,
    clock: Callable[[], float] = time.perf_counter,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, PairTiming], int, str, str]:
    """Times each pair `name: (denominator, numerator)` in lockstep (module docstring, point 6): per round, pairs in
    a shuffled order, two calls each, one with the numerator on the starting thread and one with the denominator
    there (which comes first alternates from round to round); each call is flag-checked as a whole. Stops after
    >= `min_rounds` rounds once every pair's 95 % interval of the median ratio is within `half_width` of it, else at
    `max_rounds` or when `max_seconds` is spent. Returns (pairs, rounds, stop reason, rule)."""
    rule = (f"stop after >= {min_rounds} rounds once every ratio's 95 % interval of the median is within "
            f"{half_width:.0%} of it; " + round_limits(min_rounds, max_rounds, max_seconds))
    monitor = monitor or ProcStatMonitor()
    timings = {name: PairTiming(name) for name in pairs}
    started, rounds, stop_reason = clock(), 0, f"max_rounds ({max_rounds}) reached"

    def narrow(pair: PairTiming) -> bool:
        low, high = pair.interval()
        return len(pair.ratios) >= 6 and high - pair.ratio <= half_width and pair.ratio - low <= half_width

    def call(pair: PairTiming, denominator, numerator, numerator_thread: int) -> None:
        sides: list[tuple[float, float]] = []
        before_each()
        on_threads = (numerator, denominator) if numerator_thread == 0 else (denominator, numerator)
        pair.repetitions.append(monitor.run(lambda: sides.append(lockstep.run(*on_threads))))
        thread_0, thread_1 = sides[0]
        pair.sides.append((thread_1, thread_0) if numerator_thread == 0 else (thread_0, thread_1))
        pair.numerator_thread.append(numerator_thread)

    for rounds in range(1, max_rounds + 1):
        monitor.new_round()
        for name in random.Random(seed * 1000 + rounds).sample(list(pairs), len(pairs)):
            for numerator_thread in ((1, 0) if rounds % 2 else (0, 1)):
                call(timings[name], *pairs[name], numerator_thread)
        if log:
            last = {name: t.round_sides()[-1] for name, t in timings.items()}  # ((denominator, numerator), flagged)
            log(f"round {rounds}: " + ", ".join(
                f"{name} {sides[1]:.3f}s / {sides[0]:.3f}s{' (flagged)' if flagged else ''}"
                for name, (sides, flagged) in last.items()))
        if rounds >= min_rounds and all(narrow(t) for t in timings.values()):
            stop_reason = "every interval narrow"
            break
        if max_seconds is not None and clock() - started > max_seconds:
            stop_reason = f"time cap ({max_seconds:.0f} s) reached"
            break
    return timings, rounds, stop_reason, rule
