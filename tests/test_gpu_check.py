"""``benchmarks/gpu_check.py`` kept honest without a GPU: the plan it runs, failure rows, and a
tiny CPU run of the sweep and the explanation (Triton interpreted) through the CSV and plot."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

CASE = dict(dtype="float32", head_dim=16, batch=2, heads=2, len=24, causal=True, budget_s=0.0,
            min_reps=1, warmup=1)  # fmt: skip


def test_dry_run_plan_installs_without_deps_and_runs_the_triton_tests(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["install"].startswith("ATMAN_SKIP_CPP_BUILD=1 ")
    assert "pip install --no-deps --no-build-isolation -e ." in plan["install"]
    assert plan["tests"].endswith("pytest -q -rs tests/test_triton.py")
    assert list(plan["sweep"]["batches"]) == [16, 64]
    assert min(plan["sweep"]["lengths"]) == 512 and max(plan["sweep"]["lengths"]) == 16384
    assert set(plan["sweep"]["dtypes"]) == {"float16", "bfloat16"}
    assert plan["explain"]["tokens"] == 2048


def test_visible_pairs_counts_the_causal_triangle():
    assert gpu_check.visible_pairs(4, 4) == 10
    assert gpu_check.visible_pairs(2, 5) == 4 + 5  # bottom-right aligned: rows see 4 and 5 keys
    assert gpu_check.visible_pairs(5, 2) == 1 + 2  # rows 0..2 see nothing


def _raising(err: BaseException):
    def make(*args, **kwargs):
        def fn():
            raise err

        return fn

    return make


def test_out_of_memory_becomes_a_row_not_a_crash():
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory")
    row = gpu_check.measure_cell("triton log", CASE, "cpu", make=_raising(oom))
    assert row["status"] == "oom" and row["median_ms"] == ""
    row = gpu_check.measure_cell("triton log", CASE, "cpu", make=_raising(ValueError("bad")))
    assert row["status"].startswith("error: ValueError: bad")


def test_reference_too_large_is_skipped_with_the_reason():
    row = gpu_check.measure_cell("reference paper", dict(CASE, reference_limit=100), "cpu")
    assert row["status"].startswith("skipped: scores need")


def test_wrong_output_is_caught_before_timing():
    def make(name, q, k, v, factors, device):
        return lambda: torch.zeros_like(q) + 1.0

    row = gpu_check.measure_cell("triton log", CASE, "cpu", make=make)
    assert row["status"].startswith("wrong"), row
    assert row["checked_against"] == "reference" and row["median_ms"] == ""


def test_reference_method_is_checked_and_timed_on_cpu():
    row = gpu_check.measure_cell("reference paper", CASE, "cpu")
    assert row["status"] == "ok" and row["median_ms"] > 0 and row["tflops"] >= 0


@pytest.mark.slow
def test_cpu_smoke_run_writes_csv_plot_and_summary(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out",
           str(tmp_path), "--lengths", "40", "--budget-s", "0"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "attention_cpu_smoke.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == list(gpu_check.METHODS)
    for row in rows:
        assert row["status"] == "ok", row
        assert float(row["median_ms"]) > 0 and row["tflops"] != ""
        if row["method"] != "reference paper":
            assert row["checked_against"] == "reference"
            assert float(row["max_abs_diff"]) < 1e-4, row
    assert (tmp_path / "attention_cpu_smoke.png").stat().st_size > 1000
    with open(tmp_path / "explain_cpu_smoke.csv") as fh:
        explain = list(csv.DictReader(fh))
    assert [r["what"] for r in explain] == ["plain forward (batch 1)", "atman explain (batch 1)",
                                            "atman explain (batch 4)"]  # fmt: skip
    assert all(r["status"] == "ok" for r in explain)
    summary = json.loads((tmp_path / "gpu_check_summary_cpu_smoke.json").read_text())
    assert summary["failed"] is False and set(summary["steps"]) == {"sweep", "explain"}
