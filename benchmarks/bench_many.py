"""explain_many against calling explain in a loop, on SmolLM2-135M on CPU.

What explain_many is: a loop over ``explainer.explain``, one example after another, with one
progress bar for the whole run, each result appended to a JSON Lines file (flushed and synced to
disk) and a resume that skips the ids the file already holds. It does not batch different
examples together: within one example the variants already run as a batch of forwards, and two
examples share no prefix to reuse, so putting them in one forward would only pad and mix
lengths. What it buys is bookkeeping, not speed; this script measures what that bookkeeping
costs.

Setup: SmolLM2-135M-Instruct (fp32, the bundled offline copy, :func:`load_smollm2`), CPU,
``torch.set_num_threads(2)``, 16 short factual prompts (4-10 tokens) with a one- or two-token
target each, default explainer settings (paper mode, factor 0.1, no conceptual suppression,
prefix reuse, batch size "auto"), no progress bar.

Methods (each on the same 16 examples):
- ``loop``: ``[explainer.explain(p, t) for p, t in examples]``;
- ``explain_many_jsonl``: ``explainer.explain_many(examples, output=<new file>)``: each
  example appended as a JSON line and fsync'ed as it finishes;
- ``explain_many_resume_done``: ``explain_many`` on an output that already holds every id (a
  rerun after the work is done: reading the file and skipping);
- ``bookkeeping_only``: ``explain_many(examples, output=<new file>)`` with the model's work
  taken out: an explainer whose ``explain`` hands back the already computed explanations, so
  the time is explain_many's own (the loop, the bar, the JSON serialisation, the fsync).

Before timing, explain_many's scores are checked equal (bit for bit) to the loop's; these two
runs are also the warm-up. Then ``--repeats`` rounds of ``loop`` and ``explain_many_jsonl``,
one after the other (interleaved, so that load from other processes falls on both alike), and
``--cheap-repeats`` runs of the two cheap methods. Per method: the median wall seconds and the
median CPU seconds of this process (less sensitive to other processes' load than wall time),
the runs, the difference from the loop's median, and the 1-minute load average before and after
its runs. Writes ``benchmarks/results/many_cpu.csv``. On a loaded machine the loop and
explain_many differ by less than their run-to-run noise; ``bookkeeping_only`` gives the overhead
without that noise.

Run: ``python benchmarks/bench_many.py`` (6 x 16 explanations and the cheap cases; on the
project's 2-core machine, shared and at a load average of 9 to 13, it took 12 minutes wall and 5
minutes CPU; ``--repeats 3`` for a steadier median).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import statistics
import tempfile
from pathlib import Path

import torch
from _harness import machine
from _timing import Stopwatch

EXAMPLES = [
    ("The capital of France is", " Paris"),
    ("The largest planet in the solar system is", " Jupiter"),
    ("Water freezes at a temperature of zero degrees", " Celsius"),
    ("The author of Romeo and Juliet is William", " Shakespeare"),
    ("The chemical symbol for gold is", " Au"),
    ("The first man to walk on the Moon was Neil", " Armstrong"),
    ("The currency of Japan is the", " yen"),
    ("Mount Everest lies on the border of Nepal and", " China"),
    ("The Mona Lisa was painted by Leonardo da", " Vinci"),
    ("The fastest land animal is the", " cheetah"),
    ("The Great Wall was built in", " China"),
    ("Photosynthesis takes place in the leaves of", " plants"),
    ("The longest river in Africa is the", " Nile"),
    ("The theory of relativity was developed by Albert", " Einstein"),
    ("The capital of Italy is", " Rome"),
    ("A week has seven", " days"),
]
METHODS = ("loop", "explain_many_jsonl", "explain_many_resume_done", "bookkeeping_only")
MODEL_METHODS = ("loop", "explain_many_jsonl")
RESULTS = Path(__file__).resolve().parent / "results"


class _Replay:
    """An explainer stand-in whose ``explain`` hands back explanations computed before, in
    order: explain_many's own cost without the model's."""

    def __init__(self, explanations):
        self.explanations, self.progress, self.calls = list(explanations), False, 0

    def explain(self, inputs, target, **kwargs):
        expl = self.explanations[self.calls % len(self.explanations)]
        self.calls += 1
        return expl


def _run(method: str, explainer, examples, folder: Path, done_file: Path, replay: _Replay):
    from atman_kernels.explain.many import explain_many

    def new_file() -> Path:
        out = Path(tempfile.mkstemp(suffix=".jsonl", dir=folder)[1])
        out.unlink()
        return out

    if method == "loop":
        return [explainer.explain(p, t) for p, t in examples]
    if method == "explain_many_jsonl":
        return [e for _, e in explainer.explain_many(examples, output=new_file())]
    if method == "bookkeeping_only":
        return [e for _, e in explain_many(replay, examples, output=new_file())]
    return explainer.explain_many(examples, output=done_file)  # every id there: []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs of the loop and of explain_many (default 2)")
    parser.add_argument("--cheap-repeats", type=int, default=5,
                        help="timed runs of the resume and bookkeeping-only cases (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS / "many_cpu.csv")
    args = parser.parse_args(argv)
    if min(args.repeats, args.cheap_repeats, args.threads) < 1:
        parser.error("--repeats, --cheap-repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    import transformers

    from atman_kernels.explain import AtManExplainer
    from atman_kernels.models import load_smollm2

    model, tokenizer = load_smollm2(dtype=torch.float32)
    explainer = AtManExplainer(model, tokenizer, progress=False)
    prompt_tokens = [len(tokenizer(p)["input_ids"]) for p, _ in EXAMPLES]
    target_tokens = [len(tokenizer(t, add_special_tokens=False)["input_ids"])
                     for _, t in EXAMPLES]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        done_file = folder / "done.jsonl"
        reference = _run("loop", explainer, EXAMPLES, folder, done_file, None)
        many = [e for _, e in explainer.explain_many(EXAMPLES, output=done_file)]
        for a, b in zip(reference, many, strict=True):
            if not torch.equal(a.per_target, b.per_target):
                raise SystemExit("explain_many's scores differ from the loop's")
        replay = _Replay(reference)
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        cpu: dict[str, list[float]] = {m: [] for m in METHODS}
        loads: dict[str, list[float]] = {m: [] for m in METHODS}
        plan = [m for _ in range(args.repeats) for m in MODEL_METHODS]
        plan += [m for _ in range(args.cheap_repeats) for m in METHODS[2:]]
        for method in plan:
            with Stopwatch() as sw:
                _run(method, explainer, EXAMPLES, folder, done_file, replay)
            times[method].append(sw.seconds)
            cpu[method].append(sw.cpu_seconds)
            loads[method] += [sw.load_before, sw.load_after]
    base = statistics.median(times["loop"])
    stamp = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "threads": args.threads, "torch": torch.__version__,
        "transformers": transformers.__version__, "model": "SmolLM2-135M-Instruct fp32",
        "examples": len(EXAMPLES),
        "prompt_tokens_mean": round(statistics.mean(prompt_tokens), 1),
        "target_tokens_mean": round(statistics.mean(target_tokens), 2),
    }
    rows = []
    for method in METHODS:
        median = statistics.median(times[method])
        rows.append({
            **stamp, "method": method, "runs": len(times[method]),
            "seconds_median": round(median, 4),
            "seconds_runs": " ".join(f"{t:.4f}" for t in times[method]),
            "cpu_seconds_median": round(statistics.median(cpu[method]), 4),
            "ms_per_example": round(1000 * median / len(EXAMPLES), 3),
            "vs_loop_pct": round(100 * (median - base) / base, 2),
            "load_avg_1m_before": round(loads[method][0], 2),
            "load_avg_1m_after": round(loads[method][-1], 2),
            "load_avg_1m_max": round(max(loads[method]), 2),
        })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{'method':<26} {'median s':>9} {'cpu s':>8} {'ms/example':>11} {'vs loop':>8} "
          f"{'load 1m':>12}")
    for row in rows:
        print(f"{row['method']:<26} {row['seconds_median']:>9.3f} "
              f"{row['cpu_seconds_median']:>8.3f} {row['ms_per_example']:>11.3f} "
              f"{row['vs_loop_pct']:>+7.1f}% "
              f"{row['load_avg_1m_before']:>5.2f}-{row['load_avg_1m_after']:<5.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
