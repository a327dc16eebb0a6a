"""Benchmark rows record the machine they ran on, read at run time (benchmarks/_harness.py).

The helper must return the OS's CPU model, torch's GPU name, thread count and load average;
no benchmark script may write a machine as a constant (the check is run on a planted constant
and on the scripts as they were before the helper, and must fail there).
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import _harness  # noqa: E402


def _os_cpu_model() -> str:
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    pytest.skip("/proc/cpuinfo has no model name line")


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux's /proc/cpuinfo")
def test_cpu_model_is_the_one_the_os_reports():
    model = _os_cpu_model()
    assert model and _harness.cpu_model() == model
    stamp = _harness.machine_stamp()
    isa = torch.backends.cpu.get_cpu_capability()
    assert stamp["machine"].startswith(f"{model} ({isa}), {os.cpu_count()} cores, ")
    if not torch.cuda.is_available():
        assert stamp["machine"].endswith(", no GPU") and stamp["device"] == f"CPU {model}"
    else:
        assert stamp["device"] == torch.cuda.get_device_name()


def test_stamp_reads_gpu_threads_and_load_at_the_call(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Planted GPU 80GB")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    monkeypatch.setattr(os, "getloadavg", lambda: (4.5, 1.0, 1.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 96)
    monkeypatch.setattr(_harness, "cpu_model", lambda: "Planted CPU 9000")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "PLANTED_ISA")
    stamp = _harness.machine_stamp()
    assert stamp["machine"] == "Planted CPU 9000 (PLANTED_ISA), 96 cores, Planted GPU 80GB"
    assert stamp["device"] == "Planted GPU 80GB"
    assert stamp["threads"] == "7" and stamp["loadavg_1m"] == "4.5"


# Words that name hardware: a script writing one in a string is writing a machine by hand.
HARDWARE_WORDS = ("epyc", "xeon", "ryzen", "intel", "amd ", "nvidia", "geforce", "h100", "a100",
                  "no gpu", "-core")  # fmt: skip
MACHINE_KEYS = {"machine", "cpu", "gpu", "host"}


def machine_constants(source: str) -> list[str]:
    """Where ``source`` (a benchmark script) writes a machine by hand: a string (outside
    docstrings) naming hardware, a constant as the value of a machine-like dict key or of a
    MACHINE-like name, or platform.machine() / platform.processor() (the OS's architecture,
    not the CPU model: _harness.cpu_model reads that)."""
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docstrings):  # fmt: skip
            words = [w for w in HARDWARE_WORDS if w in node.value.lower()]
            if words:
                found.append(f"line {node.lineno}: string {node.value!r} names {words}")
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if (isinstance(key, ast.Constant) and key.value in MACHINE_KEYS
                        and isinstance(value, ast.Constant)):  # fmt: skip
                    found.append(f"line {node.lineno}: {key.value!r}: {value.value!r}")
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name) and any(
                        k in target.id.lower() for k in ("machine", "device", "hardware")):
                    found.append(f"line {node.lineno}: {target.id} = {node.value.value!r}")
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == "platform"
                and node.attr in ("machine", "processor")):  # fmt: skip
            found.append(f"line {node.lineno}: platform.{node.attr}()")
    return found


def test_no_benchmark_script_writes_a_machine_constant():
    scripts = sorted(p for p in BENCH.glob("*.py") if p.name != "_harness.py")
    assert len(scripts) >= 10
    found = {p.name: machine_constants(p.read_text()) for p in scripts}
    assert not {k: v for k, v in found.items() if v}, found


@pytest.mark.parametrize("planted", [
    'MACHINE = "2-core AMD EPYC, no GPU"\n',
    'row = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU"}\n',
    'stamp = {"model": "m", "machine": platform.processor() or "cpu"}\n',
    'name = f"CPU {platform.machine()}"\n',
    'row = {"gpu": "none"}\n',
])  # fmt: skip
def test_machine_constant_check_fails_on_the_old_scripts_lines(planted):
    """The lines the scripts held before the helper (bench_explain, bench_many,
    embedding_similarity, gpu_check), planted in a script: each is found."""
    source = f'"""A benchmark; runs on a 2-core AMD EPYC (docstrings may say so)."""\n{planted}'
    assert machine_constants(source)
    assert not machine_constants('"""Ran on a 2-core AMD EPYC, no GPU."""\nx = 1\n')
