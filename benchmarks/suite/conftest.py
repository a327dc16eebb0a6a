"""Set-up of the tracked pytest-benchmark suite (``make bench-save`` / ``bench-compare`` /
``bench-check``; docs/benchmarks.md, tracked timings).

torch's thread count is pinned for the session from ``ATMAN_BENCH_THREADS`` (default 2,
:func:`_timing.pin_threads`); every case's ``extra_info`` records that count, the machine
stamp (:func:`_harness.machine_stamp`: machine, device, torch, date, 1-minute load average at
the case's start) and the load average at its end (``loadavg_1m_after``), so a saved run says
where it ran and how busy the machine was.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # _harness, _timing
# time the checkout this suite lives in (its atman_kernels and built extension)
sys.path.insert(1, str(HERE.parents[1]))

import _harness  # noqa: E402
import _timing  # noqa: E402


@pytest.fixture(scope="session")
def threads() -> int:
    """torch's thread count for the whole suite, pinned once."""
    return _timing.pin_threads()


@pytest.fixture(autouse=True)
def _stamp(request: pytest.FixtureRequest, threads: int):
    """Every benchmarked case records its threads, machine and load in ``extra_info``."""
    if "benchmark" not in request.fixturenames:
        yield
        return
    benchmark = request.getfixturevalue("benchmark")
    benchmark.extra_info.update(_harness.machine_stamp())
    benchmark.extra_info["threads"] = threads
    yield
    benchmark.extra_info["loadavg_1m_after"] = f"{_timing.load_average():.1f}"
