"""The loop both faithfulness workers share (:mod:`_faith_methods` in the project's
environment, :mod:`_faith_peers` in the peers'): every document of the job not yet in the
results file, one at a time, timed by :class:`_timing.Stopwatch`, peak RSS from
:mod:`_harness`, one synced result line each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from _faith_common import append_result, done_keys
from _harness import machine_stamp, peak_rss, reset_peak_rss
from _timing import Stopwatch

Run = Callable[[dict[str, Any]], tuple[list[float] | None, int]]


def run_documents(job: dict[str, Any], run: Run) -> int:
    """Warm ``run`` up on the job's warm-up document, then run every missing document;
    returns the number run. ``run(doc)`` -> (scores per source or None, forwards)."""
    import transformers

    run(job["warmup"])
    done = done_keys(job["results"])
    n = 0
    for doc in job["docs"]:
        if (job["method"], int(doc["length"]), doc["doc"]) in done:
            continue
        stamp = machine_stamp()
        base = reset_peak_rss()
        with Stopwatch() as watch:
            scores, forwards = run(doc)
        append_result(job["results"], {
            "method": job["method"], "length": int(doc["length"]), "doc": doc["doc"],
            "scores": scores, "seconds": round(watch.seconds, 3),
            "cpu_s": round(watch.cpu_seconds, 3),
            "peak_mib": round((peak_rss() - base) / 2**20, 1), "forwards": forwards,
            "n_tokens": len(doc["prompt_ids"]) + len(doc["response_ids"]),
            "load_before": f"{watch.load_before:.1f}", "load_after": f"{watch.load_after:.1f}",
            "machine": stamp["machine"], "threads": stamp["threads"], "date": stamp["date"],
            "env": f"torch {torch.__version__}, transformers {transformers.__version__}"})
        n += 1
    return n
