"""The one timing helper of the benchmark scripts: warm-up, repeats, median / min, pinned
threads and the load average beside every measurement.

- :func:`measure`: ``warmup`` untimed calls, then timed calls (``repeats`` of them, or more
  until a time floor, never past a time cap) -> a :class:`Timing` (wall and process-CPU
  seconds of each call, the 1-minute load average before the first timed call and after each,
  the last call's return value);
- :func:`interleaved`: several callables timed round after round (one call of each per round),
  so that a change of the machine's load hits all of them alike -> one :class:`Timing` each;
- :class:`Stopwatch`: one wall-clock (and CPU) measurement of a whole run, read while it runs
  or frozen at :meth:`Stopwatch.stop` / the end of a ``with`` block;
- :func:`pin_threads`: torch's thread count from an argument, else an environment variable,
  else a default.

Every clock is an argument (``clock``, ``cpu_clock``, ``load``) so that tests can drive the
helper with a fake clock; the defaults are ``time.perf_counter``, ``time.process_time`` and
:func:`load_average`.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

Clock = Callable[[], float]
THREADS_ENV = "ATMAN_BENCH_THREADS"
DEFAULT_THREADS = 2


def load_average() -> float:
    """The machine's 1-minute load average (``os.getloadavg()[0]``)."""
    return os.getloadavg()[0]


def pin_threads(threads: int | None = None, *, env: str = THREADS_ENV,
                default: int = DEFAULT_THREADS) -> int:
    """Set ``torch.set_num_threads`` and return the count: ``threads`` when given, else the
    integer in environment variable ``env``, else ``default``. A count below 1 (or an ``env``
    value that is no integer) is refused before torch is touched."""
    source = "threads"
    if threads is None:
        raw = os.environ.get(env)
        if raw is None or raw.strip() == "":
            threads, source = default, "default"
        else:
            source = env
            try:
                threads = int(raw)
            except ValueError:
                raise ValueError(f"{env} must be an integer >= 1, got {raw!r}") from None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"{source} must be an integer >= 1, got {threads!r}")
    import torch

    torch.set_num_threads(threads)
    return threads


@dataclass(frozen=True)
class Timing:
    """What :func:`measure` saw. ``times`` / ``cpu_times``: wall / process-CPU seconds of each
    timed call, in order; ``loads``: the 1-minute load average before the first timed call,
    then after each (``len(times) + 1`` values); ``warmup``: untimed calls made first;
    ``result``: the last call's return value (:func:`measure`; None from
    :func:`interleaved`)."""

    times: tuple[float, ...]
    cpu_times: tuple[float, ...]
    loads: tuple[float, ...]
    warmup: int
    result: Any = None

    @property
    def repeats(self) -> int:
        return len(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_times)

    @property
    def load_median(self) -> float:
        return statistics.median(self.loads)

    @property
    def load_max(self) -> float:
        return max(self.loads)


def _check_count(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def measure(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3,
            min_seconds: float = 0.0, max_repeats: int | None = None,
            max_seconds: float | None = None, clock: Clock = time.perf_counter,
            cpu_clock: Clock = time.process_time, load: Clock = load_average) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then time it.

    Timed calls: at least ``repeats``; more while fewer than ``min_seconds`` have passed since
    the first timed call began (up to ``max_repeats``, default ``repeats``); none started once
    ``max_seconds`` have passed (None: no cap; the first timed call always runs). Only the last
    call's value is kept (``Timing.result``): a call's value is dropped before the next call
    starts, so no earlier output is alive during a timed call (peak-memory readings around
    ``measure`` see one call's memory)."""
    _check_count("warmup", warmup, 0)
    _check_count("repeats", repeats, 1)
    if max_repeats is None:
        max_repeats = repeats
    _check_count("max_repeats", max_repeats, repeats)
    if min_seconds < 0:
        raise ValueError(f"min_seconds must be >= 0, got {min_seconds!r}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be None or > 0, got {max_seconds!r}")
    for _ in range(warmup):
        fn()
    times: list[float] = []
    cpu_times: list[float] = []
    loads = [load()]
    result = None
    start = clock()
    while len(times) < repeats or (clock() - start < min_seconds and len(times) < max_repeats):
        result = None  # the previous call's value is not held while the next one runs
        wall0, cpu0 = clock(), cpu_clock()
        result = fn()
        wall1, cpu1 = clock(), cpu_clock()
        times.append(wall1 - wall0)
        cpu_times.append(cpu1 - cpu0)
        loads.append(load())
        if max_seconds is not None and wall1 - start > max_seconds:
            break
    return Timing(tuple(times), tuple(cpu_times), tuple(loads), warmup, result)


def interleaved(fns: Mapping[Hashable, Callable[[], Any]], *, rounds: int, warmup: int = 0,
                clock: Clock = time.perf_counter, cpu_clock: Clock = time.process_time,
                load: Clock = load_average) -> dict[Hashable, Timing]:
    """Time every callable of ``fns`` once per round, in the mapping's order, ``rounds``
    rounds (after ``warmup`` untimed rounds). Each :class:`Timing`'s ``loads`` holds the load
    average before every round and after the last (shared by all callables); its ``result``
    is None (every call's value is dropped at once, so no output is held while another
    callable runs)."""
    _check_count("rounds", rounds, 1)
    _check_count("warmup", warmup, 0)
    if not fns:
        raise ValueError("fns must hold at least one callable")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[Hashable, list[float]] = {key: [] for key in fns}
    cpu_times: dict[Hashable, list[float]] = {key: [] for key in fns}
    loads = []
    for _ in range(rounds):
        loads.append(load())
        for key, fn in fns.items():
            wall0, cpu0 = clock(), cpu_clock()
            fn()  # its value is dropped: no output is held while the others run
            wall1, cpu1 = clock(), cpu_clock()
            times[key].append(wall1 - wall0)
            cpu_times[key].append(cpu1 - cpu0)
    loads.append(load())
    return {key: Timing(tuple(times[key]), tuple(cpu_times[key]), tuple(loads), warmup)
            for key in fns}


class Stopwatch:
    """Wall and process-CPU seconds of one run, with the load average at its two ends.

    Starts when made; ``seconds`` / ``cpu_seconds`` read the time so far until :meth:`stop`
    (or the end of a ``with`` block, an exception included) freezes them. ``load_before`` is
    read before the clocks start, ``load_after`` after they stop (None while running)."""

    def __init__(self, *, clock: Clock = time.perf_counter,
                 cpu_clock: Clock = time.process_time, load: Clock = load_average) -> None:
        self._clock, self._cpu_clock, self._load = clock, cpu_clock, load
        self.load_before = load()
        self.load_after: float | None = None
        self._cpu0 = cpu_clock()
        self._wall0 = clock()
        self._wall1: float | None = None
        self._cpu1: float | None = None

    @property
    def seconds(self) -> float:
        return (self._clock() if self._wall1 is None else self._wall1) - self._wall0

    @property
    def cpu_seconds(self) -> float:
        return (self._cpu_clock() if self._cpu1 is None else self._cpu1) - self._cpu0

    @property
    def running(self) -> bool:
        return self._wall1 is None

    def stop(self) -> Stopwatch:
        """Freeze the times (a second call changes nothing); returns self."""
        if self._wall1 is None:
            self._wall1 = self._clock()
            self._cpu1 = self._cpu_clock()
            self.load_after = self._load()
        return self

    def __enter__(self) -> Stopwatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
