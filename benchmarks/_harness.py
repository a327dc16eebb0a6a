"""Shared benchmark plumbing: one fresh process per measured row, so peaks never mix.

Peak memory is the operating system's accounting of the process (``VmHWM`` in
``/proc/self/status``), reset just before the measured call with ``/proc/self/clear_refs``.
"""

from __future__ import annotations

import csv
import ctypes
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from _timing import measure


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the process's peak RSS to its current RSS; return the current RSS in bytes.

    Freed heap memory is first handed back to the OS (``malloc_trim``), so that a measured call
    cannot hide its allocations in pages an earlier step freed but the process kept.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """Peak RSS in bytes since the last :func:`reset_peak_rss`."""
    return _status_kib("VmHWM") * 1024


def time_call(fn: Callable[[], object], *, warmup: int = 1, min_reps: int = 3,
              max_seconds: float = 20.0) -> tuple[float, int, int]:
    """(median seconds, repetitions, peak bytes above the RSS before the first call).

    :func:`_timing.measure`: ``warmup`` untimed calls, then at least ``min_reps`` timed ones,
    more up to 25 while under 2 s, none started past ``max_seconds``. The peak covers the
    warm-up calls too (the OS's high-water mark only grows)."""
    base = reset_peak_rss()
    timing = measure(fn, warmup=warmup, repeats=min_reps, min_seconds=2.0,
                     max_repeats=max(25, min_reps), max_seconds=max_seconds)
    return timing.median, timing.repeats, peak_rss() - base


def cpu_model() -> str:
    """The CPU's model name as the OS reports it (``model name`` in ``/proc/cpuinfo``; where
    there is none, ``platform.processor()`` or else the architecture)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    """torch's name for the current CUDA device, or None without one."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def cpu_isa() -> str:
    """The vector instruction set torch's CPU kernels dispatch to here (``AVX512``, ``AVX2``,
    ``DEFAULT``, ...): hosts of one CPU model name differ in it, and CPU timings with them."""
    return torch.backends.cpu.get_cpu_capability()


def machine() -> str:
    """The machine a row ran on, read now:
    ``"<CPU model> (<torch's CPU ISA>), <n> cores, <GPU name or no GPU>"``."""
    return f"{cpu_model()} ({cpu_isa()}), {os.cpu_count()} cores, {gpu_name() or 'no GPU'}"


def machine_stamp() -> dict[str, str]:
    """What every benchmark row records about where and when it ran, all read at the call:
    ``machine`` (:func:`machine`), ``device`` (the GPU's name, else ``CPU <model>``), torch's
    thread count, torch's version, the UTC date and the 1-minute load average."""
    gpu = gpu_name()
    return {
        "machine": machine(),
        "device": gpu or f"CPU {cpu_model()}",
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        # Other work on the machine skews CPU timings: the 1-minute load average says how much.
        "loadavg_1m": f"{os.getloadavg()[0]:.1f}",
    }


def run_isolated(script: Path, row: dict, timeout: float = 900.0) -> dict:
    """Run ``script --one JSON`` in a fresh interpreter; it prints one JSON result line."""
    cmd = [sys.executable, str(script), "--one", json.dumps(row)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        return {**row, "status": f"timeout after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else (
            proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {**row, "status": f"failed: {why}"}
    return json.loads(lines[-1])


def write_csv(path: Path, rows: list[dict]) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
