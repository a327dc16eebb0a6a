"""Faithfulness against time: AtMan's designs beside ContextCite and AttnLRP (issue "designs").

Documents (:mod:`_faith_docs`): templated pages with a known evidence sentence and real prose
(Debian's licence texts), each with SmolLM2-135M-Instruct's own greedy answer, at 512, 1024,
2048 and 4096 prompt tokens; the sources are the context's sentences, the same for every
method; the prompt is ContextCite's template under the chat template (:mod:`_faith_common`).

Methods, one fresh process per (method, length), threads pinned (2), each explaining the
summed log-probability of the same answer:

- this package (:mod:`_faith_methods`): ``atman-auto`` (the default call), ``atman-single``,
  ``atman-hierarchical-24/48``, ``atman-sampled-32/64``; Captum's ``ig-10`` and
  ``feature-ablation``; ``forward`` (one plain forward: the time and memory yardstick);
- the peers from their released packages in their own environment (:mod:`_peers_env`,
  :mod:`_faith_peers`): ``contextcite-32/64`` (``context-cite`` 0.0.4) and ``attnlrp``
  (``lxt`` 2.1 on transformers 4.52.4).

Metrics (ContextCite's, computed here for every method alike, by re-tokenised removal):
``f(mask)`` = log p(answer | prompt whose context keeps the mask's sources);
``top{k}_drop`` = f(all) - f(without the method's top-k sources), k = 1, 3, 5 (higher = more
faithful); ``lds`` = Spearman correlation, over ``--lds-masks`` held-out random masks (keep
probability 0.5, seeds no method sees), between the method's linear prediction (the sum of
the kept sources' scores) and f(mask); ``evidence_rank`` (templated documents) = the evidence
sentence's rank by score (1 = top; ties count against it). Per row also ``seconds`` (wall),
``cpu_s``, ``peak_mib`` (peak RSS above the RSS before the call), ``forwards``, the load
average before and after, the machine.

Usage::

    python benchmarks/bench_faithfulness.py --stop-at 14:10          # run what is missing
    python benchmarks/bench_faithfulness.py --lengths 512 --docs 512=8 --methods atman-auto
    python benchmarks/bench_faithfulness.py --plot                   # CSVs and plot again

Everything resumes: documents are built once per length (``results/faithfulness/docs-N.json``,
a run asking for more documents extends the file), each method appends one line per document
to ``results/faithfulness/runs.jsonl`` and skips what is there, removal outputs are cached in
``eval.jsonl``. A (method, length) is not started after ``--stop-at`` (UTC HH:MM). Outputs:
``results/faithfulness_cpu.csv`` (one row per method, length, document),
``results/faithfulness_summary_cpu.csv`` (means per method and length) and
``results/faithfulness_cpu.png``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _faith_common import (  # noqa: E402
    DOCS_PER_LENGTH,
    ablate,
    prompt_ids,
    random_masks,
    top_k_keep,
)
from _faith_methods import PROJECT_METHODS  # noqa: E402
from _faith_peers import PEER_METHODS  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = RESULTS / "faithfulness"
# the order methods run in: the default and the peers it is judged against first, so that a
# run cut by its deadline has the comparisons that matter most
METHODS = ["forward", "atman-auto", "contextcite-64", "attnlrp", "contextcite-32",
           "atman-hierarchical-24", "atman-hierarchical-48", "atman-sampled-32",
           "atman-single", "ig-10", "feature-ablation", "atman-sampled-64"]
DEFAULT_DOCS = DOCS_PER_LENGTH
KS = (1, 3, 5)
LDS_SEED = 7_000  # held-out masks: seeds far from ContextCite's (ablation index 0..K-1)
assert sorted(METHODS) == sorted(PROJECT_METHODS + PEER_METHODS)


# ----------------------------------------------------------------------------- documents
def docs_for(model: Any, tok: Any, length: int, n: int, work: Path) -> list[dict[str, Any]]:
    """The first ``n`` documents of ``length`` tokens, built once and kept in ``work``."""
    from _faith_docs import build_docs

    path = work / f"docs-{length}.json"
    docs = json.loads(path.read_text()) if path.is_file() else []
    def save(built: list[dict[str, Any]]) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(built))
        os.replace(tmp, path)

    if len(docs) < n:
        docs = build_docs(model, tok, length, n, have=docs, on_doc=save)
    return docs[:n]


def warmup_doc(model: Any, tok: Any, work: Path) -> dict[str, Any]:
    return docs_for(model, tok, 96, 1, work)[0]


# ----------------------------------------------------------------------------- methods
def run_method(method: str, length: int, docs: list[dict[str, Any]], warm: dict[str, Any],
               args: argparse.Namespace, work: Path) -> str:
    """Run one (method, length) in a fresh process; return its status."""
    job = {"method": method, "threads": args.threads, "model": args.model, "docs": docs,
           "warmup": warm, "results": str(work / "runs.jsonl")}
    if method in PEER_METHODS:
        from _peers_env import ensure_peers_env

        from atman_kernels.models import default_cache_dir

        python, script = str(ensure_peers_env()), HERE / "_faith_peers.py"
        job["model_dir"] = str(default_cache_dir())
    else:
        python, script = sys.executable, HERE / "_faith_methods.py"
    job_path = work / f"job-{method}-{length}.json"
    job_path.write_text(json.dumps(job))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run([python, str(script), str(job_path)], env=env, capture_output=True,
                          text=True)
    job_path.unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"failed: {tail}"
    return "ok"


def read_runs(path: Path) -> dict[tuple[str, int, str], dict[str, Any]]:
    out: dict[tuple[str, int, str], dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[(r["method"], int(r["length"]), r["doc"])] = r
    return out


# ----------------------------------------------------------------------------- metrics
class Outputs:
    """f(mask) = log p(answer | context with the mask's sources), cached on disk."""

    def __init__(self, model: Any, tok: Any, path: Path) -> None:
        self.model, self.tok, self.path = model, tok, path
        self.cache: dict[tuple[str, str], float] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    self.cache[(r["doc"], r["mask"])] = r["f"]

    def __call__(self, doc: dict[str, Any], keep: list[bool]) -> float:
        key = (doc["doc"], "".join("1" if k else "0" for k in keep))
        if key not in self.cache:
            self.cache[key] = log_prob(self.model, self.tok, doc, keep)
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"doc": key[0], "mask": key[1], "f": self.cache[key]})
                         + "\n")
        return self.cache[key]


def log_prob(model: Any, tok: Any, doc: dict[str, Any], keep: list[bool]) -> float:
    """log p(answer) after the prompt whose context keeps the sources ``keep`` marks."""
    context = ablate(doc["context"], doc["sources"], keep)
    ids = prompt_ids(tok, context, doc["query"], doc["template"]) if any(keep) else (
        prompt_ids(tok, "", doc["query"], doc["template"]))
    answer = doc["response_ids"]
    x = torch.tensor([ids + answer[:-1]])
    with torch.inference_mode():
        logits = model(x, use_cache=False, logits_to_keep=len(answer)).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    return float(logp.gather(-1, torch.tensor(answer)[:, None]).sum())


def evidence_rank(scores: list[float], evidence: int) -> int:
    """1 + the number of other sources scoring at least as high (ties count against it)."""
    return 1 + sum(1 for i, s in enumerate(scores) if i != evidence and s >= scores[evidence])


def lds(scores: list[float], masks: list[list[bool]], outputs: list[float]) -> float:
    """Spearman between the linear prediction (sum of kept scores) and the real outputs."""
    from atman_kernels.explain.estimate import spearman

    pred = torch.tensor([sum(s for s, k in zip(scores, m, strict=True) if k) for m in masks])
    return spearman(pred, torch.tensor(outputs))


def evaluate(doc: dict[str, Any], run: dict[str, Any], f: Outputs, n_masks: int
             ) -> dict[str, Any]:
    """The metrics of one method's scores on one document."""
    scores = run["scores"]
    n = doc["n_sources"]
    full = f(doc, [True] * n)
    row: dict[str, Any] = {}
    for k in KS:
        row[f"top{k}_drop"] = full - f(doc, top_k_keep(scores, min(k, n)))
    masks = random_masks(n, n_masks, LDS_SEED + int(doc["length"]))
    row["lds"] = lds(scores, masks, [f(doc, m) for m in masks])
    if doc.get("evidence") is not None:
        row["evidence_rank"] = evidence_rank(scores, doc["evidence"])
    return row


# ----------------------------------------------------------------------------- tables
ROW_FIELDS = ["method", "length", "doc", "kind", "n_tokens", "n_sources", "top1_drop",
              "top3_drop", "top5_drop", "lds", "evidence_rank", "seconds", "cpu_s",
              "peak_mib", "forwards", "load_before", "load_after", "machine", "threads", "env",
              "date"]


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Means per (method, length); memory also as a multiple of the plain forward's."""
    out = []
    keys = sorted({(r["method"], int(r["length"])) for r in rows},
                  key=lambda k: (k[1], METHODS.index(k[0]) if k[0] in METHODS else 99))
    fwd_mem = {int(r["length"]): [] for r in rows}
    for r in rows:
        if r["method"] == "forward":
            fwd_mem[int(r["length"])].append(float(r["peak_mib"]))

    def mean(vals: list[Any]) -> str:
        v = [float(x) for x in vals if x not in ("", None) and not math.isnan(float(x))]
        return f"{statistics.fmean(v):.3f}" if v else ""

    for method, length in keys:
        rs = [r for r in rows if r["method"] == method and int(r["length"]) == length]
        ranks = [int(r["evidence_rank"]) for r in rs if r.get("evidence_rank") not in ("", None)]
        s = {"method": method, "length": length, "docs": len(rs),
             "templated": len(ranks), "seconds": mean([r["seconds"] for r in rs]),
             "cpu_s": mean([r["cpu_s"] for r in rs]),
             "peak_mib": mean([r["peak_mib"] for r in rs]),
             "forwards": mean([r["forwards"] for r in rs])}
        fm = fwd_mem.get(length) or []
        s["memory_x_forward"] = (f"{float(s['peak_mib']) / statistics.fmean(fm):.2f}"
                                 if fm and s["peak_mib"] and statistics.fmean(fm) > 0 else "")
        if method != "forward":
            for key in ("top1_drop", "top3_drop", "top5_drop", "lds"):
                s[key] = mean([r[key] for r in rs])
            s["evidence_top1"] = f"{sum(x == 1 for x in ranks) / len(ranks):.2f}" if ranks else ""
            s["evidence_rank"] = mean(ranks)
        s["load_max"] = max(max(float(r["load_before"]), float(r["load_after"])) for r in rs)
        s["machine"] = " + ".join(sorted({r["machine"] for r in rs}))  # two: not comparable
        out.append(s)
    return out


def write_rows(path: Path, rows: list[dict[str, Any]], fields: list[str] | None = None) -> None:
    fields = fields or list(dict.fromkeys(k for r in rows for k in r))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def panel_means(rows: list[dict[str, Any]], length: int
                ) -> tuple[dict[str, dict[str, Any]], int]:
    """Mean seconds and top-3 drop of each method at ``length`` over the documents every such
    method ran on one host (points of a panel must compare: same documents, same speed), and
    how many documents that is."""
    by: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for r in rows:
        if (int(r["length"]) == length and r["method"] != "forward"
                and r.get("top3_drop") not in ("", None)):
            by.setdefault(r["method"], {})[(r["doc"], r["machine"])] = r
    if not by:
        return {}, 0
    common = set.intersection(*(set(v) for v in by.values()))
    out = {}
    for method, runs in by.items():
        picked = [runs[k] for k in sorted(common)]
        if picked:
            out[method] = {
                "seconds": statistics.fmean(float(r["seconds"]) for r in picked),
                "top3_drop": statistics.fmean(float(r["top3_drop"]) for r in picked),
                "machine": picked[0]["machine"]}
    return out, len(common)


def plot(rows_in: list[dict[str, Any]], png: Path) -> None:
    """Top-3 removal drop against seconds per document: a curve per design over its budgets,
    the other methods as points, one panel per length, each over the documents all its
    methods ran on one host (:func:`panel_means`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({int(r["length"]) for r in rows_in if r["method"] != "forward"})
    if not lengths:
        return
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.6 * len(lengths), 4.2), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        rows, n = panel_means(rows_in, length)
        for design, colour in (("hierarchical", "tab:blue"), ("sampled", "tab:green")):
            pts = sorted((float(r["seconds"]), float(r["top3_drop"]), m)
                         for m, r in rows.items() if m.startswith(f"atman-{design}-"))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colour,
                        label=f"AtMan {design} (budgets)")
                for x, y, m in pts:
                    ax.annotate(m.split("-")[-1], (x, y), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        marks = {"atman-auto": ("*", "tab:red", "AtMan default (auto)"),
                 "atman-single": ("s", "tab:purple", "AtMan single"),
                 "contextcite-32": ("^", "tab:orange", "ContextCite-32"),
                 "contextcite-64": ("v", "tab:orange", "ContextCite-64"),
                 "attnlrp": ("D", "black", "AttnLRP"),
                 "ig-10": ("x", "tab:gray", "IG-10"),
                 "feature-ablation": ("P", "tab:brown", "FeatureAblation")}
        for m, (marker, colour, label) in marks.items():
            if m in rows:
                ax.scatter(float(rows[m]["seconds"]), float(rows[m]["top3_drop"]),
                           marker=marker, color=colour, s=70 if m == "atman-auto" else 40,
                           label=label, zorder=3)
        cpu = " + ".join(sorted({re.sub(r", \d+ cores.*$", "", r["machine"]).replace("(R)", "")
                                 for r in rows.values()}))
        ax.set_xscale("log")
        ax.set_title(f"{length} tokens ({n} documents every method ran)\n{cpu}", fontsize=9)
        ax.set_xlabel("seconds per document (2 threads, log)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-3 removal drop (nats; higher = more faithful)")
    handles: dict[str, Any] = {}  # every method of any panel, once
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles),
               fontsize=8, frameon=False)
    fig.suptitle("SmolLM2-135M, sentences of the context; a panel: means over the documents "
                 "all its methods ran on one host (times compare within a panel only; the "
                 "tables give every document)", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def parse_docs(items: list[str] | None, lengths: list[int]) -> dict[int, int]:
    counts = {n: DEFAULT_DOCS.get(n, 5) for n in lengths}
    for item in items or []:
        try:
            n, k = item.split("=")
            counts[int(n)] = int(k)
        except ValueError:
            raise SystemExit(f"--docs takes LENGTH=COUNT items, got {item!r}") from None
    return counts


def deadline(text: str | None) -> _dt.datetime | None:
    if text is None:
        return None
    h, m = (int(x) for x in text.split(":"))
    now = _dt.datetime.now(_dt.timezone.utc)
    at = now.replace(hour=h, minute=m, second=0, microsecond=0)
    return at if at > now else at + _dt.timedelta(days=1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=sorted(DEFAULT_DOCS))
    ap.add_argument("--docs", nargs="+", help="LENGTH=COUNT (defaults: 512=20 1024=20 "
                    "2048=5 4096=5)")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "tiny"])
    ap.add_argument("--lds-masks", type=int, default=32)
    ap.add_argument("--stop-at", help="UTC HH:MM: start no (method, length) after it")
    ap.add_argument("--plot", action="store_true", help="only evaluate what has run, "
                    "write the CSVs and the plot")
    ap.add_argument("--prepare", action="store_true", help="only build the documents and "
                    "the outputs of the held-out masks (nothing timed: may share the machine)")
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    counts = parse_docs(args.docs, args.lengths)
    stop = deadline(args.stop_at)
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    from _faith_methods import load

    model, tok = load(args.model)
    # --plot only evaluates what has run: it builds no document
    all_docs = {} if args.plot else {n: docs_for(model, tok, n, counts[n], args.work)
                                     for n in args.lengths}
    f = Outputs(model, tok, args.work / "eval.jsonl")
    if args.prepare:
        for n in args.lengths:
            for doc in all_docs[n]:
                f(doc, [True] * doc["n_sources"])
                for m in random_masks(doc["n_sources"], args.lds_masks, LDS_SEED + n):
                    f(doc, m)
            print(f"[faith] {n}: {len(all_docs[n])} documents and their held-out masks ready",
                  flush=True)
        warmup_doc(model, tok, args.work)
        return
    if not args.plot:
        warm = warmup_doc(model, tok, args.work)
        for n in args.lengths:
            for method in [m for m in METHODS if m in args.methods]:
                done = read_runs(args.work / "runs.jsonl")
                todo = [d for d in all_docs[n] if (method, n, d["doc"]) not in done]
                if not todo:
                    continue
                if stop is not None and _dt.datetime.now(_dt.timezone.utc) >= stop:
                    print(f"[faith] {method} at {n}: not started (deadline)", flush=True)
                    continue
                print(f"[faith] {method} at {n}: {len(todo)} documents", flush=True)
                status = run_method(method, n, todo, warm, args, args.work)
                print(f"[faith] {method} at {n}: {status}", flush=True)
    # evaluate every (method, length, document) that has run, at every length built so far
    runs = read_runs(args.work / "runs.jsonl")
    rows = []
    docs_by_id = {d["doc"]: d for path in sorted(args.work.glob("docs-*.json"))
                  for d in json.loads(path.read_text())}
    for (_method, _n, doc_id), run in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        doc = docs_by_id.get(doc_id)
        if doc is None:
            continue
        row = {k: run.get(k, "") for k in ROW_FIELDS}
        row.update(kind=doc["kind"], n_sources=doc["n_sources"])
        if run.get("scores") is not None:
            row.update(evaluate(doc, run, f, args.lds_masks))
        rows.append(row)
    if not rows:
        print("[faith] nothing has run yet")
        return
    for r in rows:
        for k in ("top1_drop", "top3_drop", "top5_drop", "lds"):
            if isinstance(r.get(k), float):
                r[k] = f"{r[k]:.4f}"
    write_rows(args.out / "faithfulness_cpu.csv", rows, ROW_FIELDS)
    summary = summarise(rows)
    write_rows(args.out / "faithfulness_summary_cpu.csv", summary)
    plot(rows, args.out / "faithfulness_cpu.png")
    print(f"[faith] {len(rows)} rows -> {args.out / 'faithfulness_cpu.csv'}")


if __name__ == "__main__":
    main()
