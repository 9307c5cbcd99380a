"""The benchmark timing method (bench/timing.py): flagging of disturbed repetitions, the stopping rule, the
impossible-ratio failure, all with fake counters (no real timing)."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import timing  # noqa: E402


class FakeMachine:
    """A fake clock, /proc/stat busy counter and own-CPU counter; `work(seconds, foreign)` advances them as one
    repetition that took `seconds` of wall time, used `seconds` of own CPU and let others use `foreign` CPU seconds."""

    def __init__(self):
        self.now = self.busy = self.own = 0.0

    def work(self, seconds: float, foreign: float = 0.0):
        def run():
            self.now += seconds
            self.own += seconds
            self.busy += seconds + foreign

        return run

    def monitor(self):
        return timing.ProcStatMonitor(read_busy=lambda: self.busy, read_own=lambda: self.own, clock=lambda: self.now)


def test_flagging_uses_foreign_cpu_against_the_stated_threshold():
    machine = FakeMachine()
    monitor = machine.monitor()
    quiet = monitor.run(machine.work(2.0, foreign=0.05))  # threshold 0.03 + 0.02 * 2 = 0.07
    busy = monitor.run(machine.work(2.0, foreign=0.08))
    assert quiet.seconds == pytest.approx(2.0) and quiet.foreign_cpu_s == pytest.approx(0.05) and not quiet.flagged
    assert busy.flagged and busy.foreign_cpu_s == pytest.approx(0.08)
    assert monitor.threshold(2.0) == pytest.approx(timing.FLAG_ABSOLUTE_S + timing.FLAG_FRACTION * 2.0)


def test_proc_stat_reader_sums_busy_fields_including_steal(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 10 50 9999 777 5 3 7 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    ticks = __import__("os").sysconf("SC_CLK_TCK")
    assert timing.machine_busy_seconds(str(stat)) == pytest.approx((100 + 10 + 50 + 5 + 3 + 7) / ticks)
    stat.write_text("intr 1 2 3\n")
    with pytest.raises(ValueError, match="aggregate `cpu` line"):
        timing.machine_busy_seconds(str(stat))
    assert timing.machine_busy_seconds() > 0  # the real /proc/stat parses


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
