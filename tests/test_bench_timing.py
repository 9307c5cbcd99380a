"""The benchmark timing method (bench/timing.py): flagging of disturbed repetitions, the stopping rule, the
impossible-ratio failure, all with fake counters (no real timing)."""

import math
import sys
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


def test_short_calls_are_repeated_to_a_minimum_repetition_time():
    machine = FakeMachine()
    calls = {"short": 0, "long": 0}

    def mode(name, seconds):
        def run():
            calls[name] += 1
            machine.work(seconds)()
        return run

    result = timing.time_modes({"short": mode("short", 0.3), "long": mode("long", 2.0)}, min_rounds=3, max_rounds=3,
                               min_repetition_s=1.0, monitor=machine.monitor(), clock=lambda: machine.now,
                               before_each=lambda: None)
    assert calls == {"short": 1 + 3 * 4, "long": 1 + 3 * 1}  # warm-up, then ceil(1.0 / 0.3) = 4 calls per repetition
    assert result["short"].min == pytest.approx(0.3) and result["short"].to_json()["calls_per_repetition"] == 4
    assert "each repetition >= 1 s" in result.rule
    # the flag threshold applies to the whole repetition: 0.048 s foreign over 4 x 0.3 s is under 0.03 + 2 % of 1.2 s
    repetition = machine.monitor().run(machine.work(0.3, foreign=0.012), calls=4)
    assert not repetition.flagged and repetition.foreign_cpu_s == pytest.approx(0.048)


def test_a_ratio_close_to_one_keeps_the_rounds_going():
    machine = FakeMachine()
    guards = {"ivpt / bare": (("ivpt",), ("bare",))}
    close = timing.time_modes({"bare": machine.work(1.0), "ivpt": machine.work(1.005)}, min_rounds=3, max_rounds=7,
                              guards=guards, monitor=machine.monitor(), before_each=lambda: None, warmup=False)
    assert close.rounds == 7 and "ivpt / bare within 2% of 1, so all rounds run" in close.stop_reason
    assert "ivpt / bare >= 1.02" in close.rule
    clear = timing.time_modes({"bare": machine.work(1.0), "ivpt": machine.work(1.05)}, min_rounds=3, max_rounds=7,
                              guards=guards, monitor=machine.monitor(), before_each=lambda: None, warmup=False)
    assert clear.rounds == 3 and clear.stop_reason == "min stable"
    assert timing.guarded_ratios({"train": (("t",), ("a", "b"))}, {"t": 3.0, "a": 1.0, "b": 2.0}) == {"train": 1.0}
    with pytest.raises(ValueError, match="not timed: \\['nope'\\]"):
        timing.time_modes({"bare": machine.work(1.0)}, guards={"x": (("nope",), ("bare",))})


def test_paired_round_ratios_use_rounds_where_every_mode_involved_was_clean():
    modes = {"ivpt": {"all_s": [2.1, 2.2, 9.0, 2.0], "flagged_each": [False, False, True, False]},
             "bare": {"all_s": [2.0, 2.0, 2.0, 2.0], "flagged_each": [False, False, False, False]},
             "bwd": {"all_s": [4.0, 5.0, 4.0, 4.0], "flagged_each": [False, True, False, False]}}
    assert timing.paired_round_ratios(modes, ("ivpt",), ("bare",)) == pytest.approx([1.05, 1.1, 1.0])
    assert timing.paired_round_ratios(modes, ("ivpt",), ("bwd", "bare")) == pytest.approx([2.1 / 6, 2.0 / 6])
    machine = FakeMachine()
    monitor = machine.monitor()
    result = timing.time_modes({"ivpt": machine.work(1.0), "bare": machine.work(1.0, foreign=0.5)}, min_rounds=2,
                               max_rounds=2, monitor=monitor, clock=lambda: machine.now, before_each=lambda: None)
    modes = result.to_json()["modes"]
    assert modes["bare"]["flagged_each"] == [True, True] and timing.paired_round_ratios(modes, ("ivpt",), ("bare",)) == []


def test_a_ratio_below_one_runs_extra_rounds_until_the_floor_is_reached():
    machine = FakeMachine()
    guards = {"ivpt / bare": (("ivpt",), ("bare",))}
    kwargs = dict(guards=guards, monitor=machine.monitor(), before_each=lambda: None, warmup=False)
    # a ratio that stays below 1: the rounds go on to impossible_max_rounds, and the reason says so
    stuck = timing.time_modes({"bare": machine.work(1.0), "ivpt": machine.work(0.99)}, min_rounds=2, max_rounds=3,
                              impossible_max_rounds=5, **kwargs)
    assert stuck.rounds == 5 and "ivpt / bare < 1, and impossible_max_rounds (5) too" in stuck.stop_reason
    assert "(5 while a guarded ratio is < 1)" in stuck.rule
    calls = {"bare": 0}

    def bare():  # the first 4 calls run at 0.995 (not yet at the floor), later ones at the floor 0.98
        calls["bare"] += 1
        machine.work(0.995 if calls["bare"] <= 4 else 0.98)()

    # ivpt 0.99 over bare 0.995 is below 1 at max_rounds (3); the 5th round brings the bare min to its floor
    recovering = timing.time_modes({"bare": bare, "ivpt": machine.work(0.99)}, min_rounds=2, max_rounds=3, **kwargs)
    assert recovering.rounds == 5 and recovering["bare"].min == pytest.approx(0.98)
    assert "2 more rounds until every guarded ratio was >= 1" in recovering.stop_reason
    with pytest.raises(ValueError, match="impossible_max_rounds \\(2\\) >= max_rounds \\(3\\)"):
        timing.time_modes({"bare": machine.work(1.0)}, max_rounds=3, impossible_max_rounds=2)
