"""The shared timing helper (benchmarks/_timing.py) against a fake clock, and the tracked
pytest-benchmark suite (benchmarks/suite) collecting the cases it promises.

The fake clock advances only when the timed function runs (by the duration it is told to
take), so every timed interval is known exactly: a miscount of warm-up or timed calls, a wrong
median or a call timed twice shows as a wrong number.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _timing  # noqa: E402


class FakeClock:
    """Time that moves only when a planned call runs; counts the calls."""

    def __init__(self, durations: list[float], cpu_share: float = 0.5) -> None:
        self.now = 100.0
        self.cpu = 10.0
        self.durations = list(durations)
        self.cpu_share = cpu_share
        self.calls = 0
        self.load_reads = 0

    def clock(self) -> float:
        return self.now

    def cpu_clock(self) -> float:
        return self.cpu

    def load(self) -> float:
        self.load_reads += 1
        return float(self.load_reads)

    def fn(self) -> int:
        took = self.durations[self.calls]
        self.calls += 1
        self.now += took
        self.cpu += took * self.cpu_share
        return self.calls

    def kw(self) -> dict:
        return {"clock": self.clock, "cpu_clock": self.cpu_clock, "load": self.load}


def test_measure_counts_warmup_and_repeats_and_takes_the_median():
    fake = FakeClock([9.0, 8.0, 3.0, 1.0, 7.0, 2.0])
    t = _timing.measure(fake.fn, warmup=2, repeats=4, **fake.kw())
    assert fake.calls == 6  # two warm-up calls, four timed
    assert t.warmup == 2 and t.repeats == 4
    assert t.times == (3.0, 1.0, 7.0, 2.0)  # the warm-up calls' 9 s and 8 s are not timed
    assert t.median == statistics.median([3.0, 1.0, 7.0, 2.0]) == 2.5
    assert t.min == 1.0
    assert t.cpu_times == (1.5, 0.5, 3.5, 1.0) and t.cpu_median == 1.25
    assert t.loads == (1.0, 2.0, 3.0, 4.0, 5.0)  # before the first timed call, after each
    assert t.result == 6  # the last call's return value


def test_measure_odd_count_median_is_the_middle_call():
    fake = FakeClock([5.0, 0.5, 0.125, 0.375])  # exact in binary
    t = _timing.measure(fake.fn, warmup=1, repeats=3, **fake.kw())
    assert t.times == (0.5, 0.125, 0.375) and t.median == 0.375


def test_measure_runs_on_to_the_time_floor_and_stops_at_the_cap():
    fake = FakeClock([0.0] + [0.5] * 30)
    t = _timing.measure(fake.fn, warmup=1, repeats=2, min_seconds=2.0, max_repeats=25,
                        **fake.kw())
    assert t.repeats == 4  # 4 x 0.5 s reaches the 2 s floor
    fake = FakeClock([0.0] + [0.01] * 40)
    t = _timing.measure(fake.fn, warmup=1, repeats=2, min_seconds=2.0, max_repeats=25,
                        **fake.kw())
    assert t.repeats == 25  # the floor is never reached: max_repeats stops it
    fake = FakeClock([3.0, 3.0, 3.0, 3.0])
    t = _timing.measure(fake.fn, warmup=0, repeats=4, max_seconds=5.0, **fake.kw())
    assert t.repeats == 2  # past 5 s after the second call: no third starts


def test_interleaved_times_each_callable_once_per_round():
    order: list[str] = []
    fake = FakeClock([])
    plan = {"a": 1.0, "b": 10.0}

    def make(name):
        def fn():
            order.append(name)
            fake.now += plan[name]
            plan[name] += 1.0
            return name
        return fn

    out = _timing.interleaved({"a": make("a"), "b": make("b")}, rounds=3, warmup=1,
                              **fake.kw())
    assert order == ["a", "b"] * 4  # one warm-up round, three timed rounds, interleaved
    assert out["a"].times == (2.0, 3.0, 4.0) and out["b"].times == (11.0, 12.0, 13.0)
    assert out["a"].median == 3.0 and out["b"].min == 11.0
    assert out["a"].loads == out["b"].loads == (1.0, 2.0, 3.0, 4.0)
    assert out["b"].result is None  # values are dropped, none held while another runs


def test_measure_holds_no_earlier_value_during_a_call():
    import weakref

    class Out:
        pass

    alive: list[weakref.ref] = []
    seen_alive = []

    def fn():
        seen_alive.append(sum(r() is not None for r in alive))
        out = Out()
        alive.append(weakref.ref(out))
        return out

    t = _timing.measure(fn, warmup=1, repeats=3)
    assert seen_alive == [0, 0, 0, 0] and isinstance(t.result, Out)


def test_stopwatch_reads_live_then_freezes():
    fake = FakeClock([4.0, 6.0])
    with _timing.Stopwatch(**fake.kw()) as sw:
        assert sw.load_before == 1.0 and sw.load_after is None and sw.running
        fake.fn()
        assert sw.seconds == 4.0
        fake.fn()
    assert not sw.running and sw.seconds == 10.0 and sw.cpu_seconds == 5.0
    fake.now += 100.0
    assert sw.seconds == 10.0 and sw.load_after == 2.0
    with pytest.raises(KeyError), _timing.Stopwatch(**fake.kw()) as failing:
        fake.now += 1.5
        raise KeyError("a failing run is still timed")
    assert failing.seconds == 1.5


def test_pin_threads_reads_argument_then_env_then_default(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(_timing.THREADS_ENV, "3")
        assert _timing.pin_threads() == 3 and torch.get_num_threads() == 3
        assert _timing.pin_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv(_timing.THREADS_ENV)
        assert _timing.pin_threads() == _timing.DEFAULT_THREADS == 2
        monkeypatch.setenv(_timing.THREADS_ENV, "two")
        with pytest.raises(ValueError, match="ATMAN_BENCH_THREADS must be an integer >= 1"):
            _timing.pin_threads()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kwargs, match", [
    ({"warmup": -1}, "warmup must be an integer >= 0"),
    ({"repeats": 0}, "repeats must be an integer >= 1"),
    ({"repeats": 3, "max_repeats": 2}, "max_repeats must be an integer >= 3"),
    ({"max_seconds": 0}, "max_seconds must be None or > 0"),
    ({"min_seconds": -1.0}, "min_seconds must be >= 0"),
])  # fmt: skip
def test_measure_refuses_bad_counts_before_calling(kwargs, match):
    fake = FakeClock([1.0] * 10)
    with pytest.raises(ValueError, match=match):
        _timing.measure(fake.fn, **kwargs, **fake.kw())
    assert fake.calls == 0


def test_harness_time_call_goes_through_measure(monkeypatch):
    """time_call keeps its contract (median, repetitions, peak) on top of measure."""
    import _harness

    seen = {}

    def fake_measure(fn, **kw):
        seen.update(kw)
        return _timing.Timing((3.0, 1.0, 2.0), (0.0,) * 3, (0.0,) * 4, kw["warmup"])

    monkeypatch.setattr(_harness, "measure", fake_measure)
    median, reps, peak = _harness.time_call(lambda: None, warmup=2, min_reps=3)
    assert (median, reps) == (2.0, 3) and peak >= 0
    assert seen == {"warmup": 2, "repeats": 3, "min_seconds": 2.0, "max_repeats": 25,
                    "max_seconds": 20.0}


EXPECTED_IDS = [
    "test_op[small-cpp-paper-causal]",
    "test_op[small-cpp-log-full]",
    "test_op[small-reference-paper-causal]",
    "test_op[small-sdpa-causal]",
    "test_op[medium-cpp-log-causal]",
    "test_op[medium-sdpa-full]",
    "test_op[medium-triton-paper-causal]",
    "test_explain[token-reuse]",
    "test_explain[token-recompute]",
    "test_explain[sentence-reuse]",
    "test_explain[sentence-recompute]",
]


def test_the_tracked_suite_collects_its_cases():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "benchmarks/suite"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    ids = {line.split("::")[-1] for line in done.stdout.splitlines() if "::" in line}
    missing = [i for i in EXPECTED_IDS if i not in ids]
    assert not missing, out
    # every backend's every mode at both sizes, SDPA beside them, four explainer cases
    assert len([i for i in ids if i.startswith("test_op[")]) == 2 * (3 * 2 * 2 + 2)
    assert len([i for i in ids if i.startswith("test_explain[")]) == 4


def test_the_default_test_run_does_not_collect_the_suite():
    """``pytest -q`` from the root collects testpaths only: the suite is run explicitly."""
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^testpaths = \["tests"\]$', text, re.M), "testpaths changed"
