"""The benchmark timing method (bench/timing.py): flagging of disturbed repetitions, the stopping rule, the
impossible-ratio failure and lockstep pairs, all with fake counters and clocks (no real timing)."""

import itertools
import math
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import timing  # noqa: E402


class FakeMachine:
    """A fake clock, /proc/stat busy and steal counters, own-CPU counter and kernel-thread counters; `work(seconds,
    foreign, kernel, steal)` advances them as one repetition that took `seconds` of wall time, used `seconds` of own
    CPU, let other processes use `foreign` and kernel thread pid 78 `kernel` CPU seconds, and lost `steal` CPU seconds
    to the hypervisor."""

    def __init__(self):
        self.now = self.busy = self.own = self.steal = 0.0
        self.kernel = {2: 0.0, 78: 0.0}
        self.listings = 0

    def work(self, seconds: float, foreign: float = 0.0, kernel: float = 0.0, steal: float = 0.0):
        def run():
            self.steal += steal
            self.now += seconds
            self.own += seconds
            self.busy += seconds + foreign + kernel
            self.kernel[78] += kernel

        return run

    def list_kernel_threads(self):
        self.listings += 1
        return sorted(self.kernel)

    def monitor(self):
        return timing.ProcStatMonitor(read_busy=lambda: self.busy, read_own=lambda: self.own, clock=lambda: self.now,
                                      read_steal=lambda: self.steal,
                                      list_kernel_threads=self.list_kernel_threads,
                                      read_kernel=lambda pids: sum(self.kernel[pid] for pid in pids))


def test_flagging_uses_foreign_cpu_against_the_stated_threshold():
    machine = FakeMachine()
    monitor = machine.monitor()
    quiet = monitor.run(machine.work(2.0, foreign=0.05))  # threshold 0.03 + 0.02 * 2 = 0.07
    busy = monitor.run(machine.work(2.0, foreign=0.08))
    assert quiet.seconds == pytest.approx(2.0) and quiet.foreign_cpu_s == pytest.approx(0.05) and not quiet.flagged
    assert busy.flagged and busy.foreign_cpu_s == pytest.approx(0.08)
    assert monitor.threshold(2.0) == pytest.approx(timing.FLAG_ABSOLUTE_S + timing.FLAG_FRACTION * 2.0)


def test_kernel_threads_cpu_is_reported_apart_and_not_flagged():
    machine = FakeMachine()
    monitor = machine.monitor()
    kdamond = monitor.run(machine.work(2.0, foreign=0.05, kernel=0.5))  # e.g. kdamond working on our own memory
    assert not kdamond.flagged and kdamond.foreign_cpu_s == pytest.approx(0.05)
    assert kdamond.kernel_thread_cpu_s == pytest.approx(0.5)
    both = monitor.run(machine.work(2.0, foreign=0.08, kernel=0.5))  # another process still flags it
    assert both.flagged and both.foreign_cpu_s == pytest.approx(0.08)
    result = timing.time_modes({"a": machine.work(1.0, kernel=0.3), "b": machine.work(1.0)}, min_rounds=3,
                               max_rounds=3, monitor=monitor, before_each=lambda: None, warmup=False)
    assert result.clean_flagged() == (6, 0) and machine.listings == 1 + 3  # first run, then once per round
    assert result["a"].to_json()["kernel_thread_cpu_s"] == pytest.approx([0.3] * 3)
    assert "kernel threads not counted" in result.summary()


def _write_stat(proc, pid: int, name: str, ppid: int, flags: int, utime: int, stime: int):
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    (proc / str(pid)).mkdir()
    (proc / str(pid) / "stat").write_text(
        f"{pid} ({name}) S {ppid} 0 0 0 -1 {flags} 0 0 0 0 {utime} {stime} 0 0 20 0 1 0 5 0 0\n")


def test_kernel_threads_are_found_by_flag_or_parent_and_their_cpu_summed(tmp_path):
    _write_stat(tmp_path, 2, "kthreadd", 0, 0x00208040, 1, 1)
    _write_stat(tmp_path, 78, "kdamond.0", 2, 0x00208040, 300, 200)
    _write_stat(tmp_path, 90, "odd (name) x", 2, 0, 7, 3)  # child of kthreadd without the flag; spaces in the name
    _write_stat(tmp_path, 1234, "python", 1, 0x00400000, 9999, 9999)  # a user process
    (tmp_path / "self").mkdir()
    assert timing.kernel_thread_pids(str(tmp_path)) == [2, 78, 90]
    ticks = __import__("os").sysconf("SC_CLK_TCK")
    assert timing.threads_cpu_seconds([78, 90, 4242], str(tmp_path)) == pytest.approx(510 / ticks)  # 4242 exited
    real = timing.kernel_thread_pids()
    assert 2 in real and timing.threads_cpu_seconds(real) >= 0


def test_proc_stat_readers_sum_busy_fields_and_read_steal_apart(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 10 50 9999 777 5 3 7 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    ticks = __import__("os").sysconf("SC_CLK_TCK")
    assert timing.machine_busy_seconds(str(stat)) == pytest.approx((100 + 10 + 50 + 5 + 3) / ticks)
    assert timing.machine_steal_seconds(str(stat)) == pytest.approx(7 / ticks)
    stat.write_text("intr 1 2 3\n")
    for reader in (timing.machine_busy_seconds, timing.machine_steal_seconds):
        with pytest.raises(ValueError, match="aggregate `cpu` line"):
            reader(str(stat))
    assert timing.machine_busy_seconds() > 0 and timing.machine_steal_seconds() >= 0  # the real /proc/stat parses


def test_steady_hypervisor_steal_is_allowed_and_bursts_are_flagged():
    machine = FakeMachine()
    monitor = machine.monitor()
    steady = monitor.run(machine.work(20.0, foreign=0.1, steal=0.8))  # 4 % of one core: below 0.03 + 5 % of 20 s
    burst = monitor.run(machine.work(20.0, foreign=0.1, steal=1.2))
    assert not steady.flagged and steady.steal_cpu_s == pytest.approx(0.8) and steady.foreign_cpu_s == pytest.approx(0.1)
    assert burst.flagged and burst.foreign_cpu_s == pytest.approx(0.1)  # steal is not foreign CPU
    assert monitor.steal_threshold(20.0) == pytest.approx(timing.FLAG_ABSOLUTE_S + timing.STEAL_FRACTION * 20.0)
    result = timing.TimingResult({"a": timing.ModeTiming("a", [steady, burst])}, 1, "test", "rule")
    assert result.steal_fraction() == pytest.approx(2.0 / 40.0)
    assert "hypervisor stole" in result.summary() and "5.0% of one core" in result.summary()
    assert result.to_json()["modes"]["a"]["steal_cpu_s"] == [pytest.approx(0.8), pytest.approx(1.2)]


def test_flagged_repetitions_are_excluded_and_counted():
    machine = FakeMachine()
    # mode "a" takes 1.0 s but is disturbed (and slowed to 3 s) in every 2nd call; "b" is always clean at 2.0 s
    calls = {"a": 0}

    def mode_a():
        calls["a"] += 1
        (machine.work(3.0, foreign=1.0) if calls["a"] % 2 == 0 else machine.work(1.0))()

    result = timing.time_modes({"a": mode_a, "b": machine.work(2.0)}, min_rounds=4, max_rounds=4,
                               monitor=machine.monitor(), before_each=lambda: None, warmup=False)
    assert result.rounds == 4
    assert result["a"].flagged == 2 and result["a"].clean == [1.0, 1.0] and result["a"].counts() == "2/2"
    assert result["a"].min == 1.0 and result["a"].median == 1.0  # the 3 s runs are not in any statistic
    assert result.clean_flagged() == (6, 2)
    assert "6 clean / 2 flagged" in result.summary()


def test_stopping_rule_waits_for_a_stable_min():
    history = [{"a": 10.0}, {"a": 9.0}, {"a": 8.95}, {"a": 8.94}]
    assert not timing.min_is_stable(history[:2], patience=2, tolerance=0.01)  # too few rounds to judge
    assert not timing.min_is_stable(history[:3], patience=2, tolerance=0.01)  # 10 -> 8.95 is > 1 %
    assert timing.min_is_stable(history, patience=2, tolerance=0.01)  # 9.0 -> 8.94 is < 1 %
    assert not timing.min_is_stable([{"a": math.nan}, {"a": 1.0}, {"a": 1.0}], patience=2, tolerance=0.01)


def test_time_modes_stops_when_stable_and_at_the_cap():
    machine = FakeMachine()
    steady = timing.time_modes({"a": machine.work(1.0), "b": machine.work(2.0)}, min_rounds=3, max_rounds=10,
                               monitor=machine.monitor(), before_each=lambda: None, warmup=False)
    assert steady.rounds == 3 and steady.stop_reason == "min stable"

    durations = iter([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])  # keeps improving by > 1 %: never stable

    def improving():
        machine.work(next(durations))()

    capped = timing.time_modes({"a": improving}, min_rounds=2, max_rounds=5, monitor=machine.monitor(),
                               before_each=lambda: None, warmup=False)
    assert capped.rounds == 5 and "max_rounds (5)" in capped.stop_reason and capped["a"].min == 1.0

    always_flagged = timing.time_modes({"a": machine.work(1.0, foreign=1.0)}, min_rounds=2, max_rounds=3,
                                       monitor=machine.monitor(), before_each=lambda: None, warmup=False)
    assert always_flagged.rounds == 3 and always_flagged["a"].counts() == "0/3" and math.isnan(always_flagged["a"].min)
    with pytest.raises(ValueError, match="min_rounds"):
        timing.time_modes({"a": machine.work(1.0)}, min_rounds=4, max_rounds=2)


def test_modes_are_interleaved_in_shuffled_order_each_round():
    order = []
    machine = FakeMachine()
    modes = {name: (lambda name=name: (order.append(name), machine.work(1.0)())) for name in "abcd"}
    collections = []
    timing.time_modes(modes, min_rounds=6, max_rounds=6, patience=100, monitor=machine.monitor(),
                      before_each=lambda: collections.append(1), warmup=False)
    assert len(collections) == 24  # the untimed hook (garbage collection by default) before every repetition
    rounds = [tuple(order[i:i + 4]) for i in range(0, 24, 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)  # every mode once per round
    assert len(set(rounds)) > 1  # not the same order every round


def test_impossible_ratio_fails_the_run_with_an_explanation():
    assert timing.require_not_faster("IVPT inference / bare forward", 1.02) == 1.02
    with pytest.raises(timing.ImpossibleRatioError, match=r"0\.800 < 1: IVPT runs its whole backbone"):
        timing.require_not_faster("IVPT inference / bare forward", 0.8)
    with pytest.raises(timing.ImpossibleRatioError, match="no clean repetitions"):
        timing.require_not_faster("IVPT inference / bare forward", math.nan)


class Steps:
    """Side callables for a `Lockstep`: each step advances a shared fake clock by its side's step time, logs itself
    and hits a switch point."""

    def __init__(self):
        self.now, self.log = 0.0, []

    def side(self, lockstep, name: str, step_s: float, steps: int, fail_at: int | None = None):
        def run():
            for step in range(steps):
                if step == fail_at:
                    raise RuntimeError(f"{name} failed")
                self.now += step_s
                self.log.append(f"{name}{step}")
                lockstep.switch()

        return run


def test_lockstep_sides_take_turns_and_each_is_timed_by_its_own_turns():
    steps = Steps()
    lockstep = timing.Lockstep(clock=lambda: steps.now)
    seconds = lockstep.run(steps.side(lockstep, "a", 1.0, 3), steps.side(lockstep, "b", 2.0, 3))
    assert steps.log == ["a0", "b0", "a1", "b1", "a2", "b2"] and seconds == (3.0, 6.0)
    # a side with fewer switch points finishes; the other runs on alone (its switches no longer hand over)
    steps.log.clear()
    seconds = lockstep.run(steps.side(lockstep, "a", 1.0, 1), steps.side(lockstep, "b", 2.0, 4))
    assert steps.log == ["a0", "b0", "b1", "b2", "b3"] and seconds == (1.0, 8.0)
    lockstep.switch()  # outside a run: a no-op, no deadlock
    with pytest.raises(RuntimeError, match="b failed"):
        lockstep.run(steps.side(lockstep, "a", 1.0, 5), steps.side(lockstep, "b", 1.0, 5, fail_at=2))
    # the same two threads serve every call (each keeps its OpenMP team and allocator arena); close() ends them
    served = []
    for _ in range(2):
        lockstep.run(lambda: served.append(threading.get_ident()), lambda: served.append(threading.get_ident()))
    assert served[:2] == served[2:] and served[0] != served[1]
    threads = list(lockstep._threads)
    lockstep.close()
    assert not any(thread.is_alive() for thread in threads)
    with timing.Lockstep(clock=lambda: steps.now) as again:  # a closed Lockstep is not needed again: a new one runs
        assert again.run(steps.side(again, "a", 1.0, 2), steps.side(again, "b", 1.0, 2)) == (2.0, 2.0)


def test_switch_points_hand_over_in_forward_and_backward_and_leave_results_unchanged():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)])
    inputs = torch.randn(2, 4, requires_grad=True)
    layers(inputs).square().sum().backward()
    expected = inputs.grad.clone()
    inputs.grad = None
    lockstep = timing.Lockstep()
    handles = lockstep.add_switch_points(layers)
    order = []

    def train():
        layers(inputs).square().sum().backward()
        order.append("train done")

    def infer():
        with torch.no_grad():
            for layer in layers:
                layer(torch.zeros(1, 4))
                order.append("infer layer")

    lockstep.run(train, infer)
    # 3 forward and 2 backward switch points on the training side (the first layer's input is a leaf), 3 on the
    # inference side: the inference side's layers ran between the training side's forward layers, not after its
    # backward
    assert order.index("train done") == 3 and lockstep.switches >= 5
    assert torch.equal(inputs.grad, expected)
    for handle in handles:
        handle.remove()
    before, order[:] = lockstep.switches, []
    lockstep.run(train, infer)  # no switch points left: the first side runs to its end before the second starts
    assert lockstep.switches == before and order == ["train done"] + ["infer layer"] * 3


def test_median_interval_uses_binomial_order_statistics():
    values = [1.0 + i / 100 for i in (5, 0, 9, 1, 8, 2, 7, 3, 6, 4)]  # 1.00 .. 1.09 shuffled
    # n = 10: P(Bin(10, 1/2) <= 1) = 11/1024 <= 2.5 % < P(<= 2) = 56/1024, so x(2) and x(9)
    assert timing.median_interval(values) == pytest.approx((1.01, 1.08))
    assert timing.median_interval(values[:5]) == pytest.approx((1.0, 1.09))  # below 6 values: the whole range
    assert timing.median_interval([1.5]) == (1.5, 1.5)
    assert all(math.isnan(v) for v in timing.median_interval([]))


def test_time_lockstep_puts_each_side_once_on_each_thread_a_round_so_a_slow_thread_cancels():
    """The starting thread runs 10 % slower here: one call's ratio is off by 10 % either way, the round's ratio (each
    side's two calls summed) is exact, and `thread_factor` reports the slowdown. A disturbed call flags its round."""
    machine = FakeMachine()
    started = []

    def side(name, seconds, foreign_in_call=None):
        calls = {"n": 0}

        def run():
            calls["n"] += 1
            thread = threading.current_thread().name
            started.append((name, thread))
            slow = 1.1 if thread == "lockstep-0" else 1.0
            machine.work(seconds * slow, foreign=0.5 if calls["n"] == foreign_in_call else 0.0)()

        return run

    lockstep = timing.Lockstep(clock=lambda: machine.now)
    pairs = {"ivpt / bare": (side("bare", 1.0), side("ivpt", 1.02, foreign_in_call=3))}
    timings, rounds, reason, rule = timing.time_lockstep(pairs, lockstep, min_rounds=3, max_rounds=10,
                                                         monitor=machine.monitor(), before_each=lambda: None,
                                                         clock=lambda: machine.now)
    pair = timings["ivpt / bare"]
    # round 1: bare on the starting thread first, then ivpt; round 2 the other way round
    assert started[:8] == [("bare", "lockstep-0"), ("ivpt", "lockstep-1"), ("ivpt", "lockstep-0"),
                           ("bare", "lockstep-1"), ("ivpt", "lockstep-0"), ("bare", "lockstep-1"),
                           ("bare", "lockstep-0"), ("ivpt", "lockstep-1")]
    assert pair.numerator_thread[:4] == [1, 0, 0, 1]
    calls = [numerator / denominator for denominator, numerator in pair.sides]
    assert calls[0] == pytest.approx(1.02 / 1.1) and calls[1] == pytest.approx(1.02 * 1.1)
    assert [r.flagged for r in pair.repetitions][:4] == [False, False, True, False]  # ivpt's 3rd call was disturbed
    assert rounds == 7 and reason == "every interval narrow"  # 6 clean rounds are needed for a 95 % interval
    assert pair.ratios == pytest.approx([1.02] * 6) and pair.ratio == pytest.approx(1.02)
    assert pair.thread_factor() == pytest.approx(1.1)
    report = pair.to_json()
    assert report["clean"] == 6 and report["flagged"] == 1 and report["flagged_each"][:3] == [False, True, False]
    assert report["denominator_s"][0] == pytest.approx(2.1) and report["numerator_s"][0] == pytest.approx(2.142)
    assert len(report["calls"]["numerator_s"]) == 14 and report["thread_factor"] == pytest.approx(1.1)
    assert "within 1% of it; at most 10 rounds" in rule
    # a wide interval runs to max_rounds; a time cap stops earlier
    levels = itertools.cycle([1.0, 1.1, 1.2])
    noisy = {"x": (machine.work(1.0), lambda: machine.work(next(levels))())}
    _, rounds, reason, _ = timing.time_lockstep(noisy, lockstep, min_rounds=3, max_rounds=8, monitor=machine.monitor(),
                                                before_each=lambda: None, clock=lambda: machine.now)
    assert rounds == 8 and reason == "max_rounds (8) reached"
    _, rounds, reason, _ = timing.time_lockstep(noisy, lockstep, min_rounds=3, max_rounds=8, max_seconds=9,
                                                monitor=machine.monitor(), before_each=lambda: None,
                                                clock=lambda: machine.now)
    assert rounds == 3 and reason == "time cap (9 s) reached"
    lockstep.close()
