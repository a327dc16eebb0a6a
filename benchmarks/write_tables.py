"""Writes every figure the docs take from a committed CSV, from that CSV, between markers.

A page (README.md, docs/*.md, benchmarks/results/*.md) holds a generated block as

    <!-- table:NAME -->
    ...written by this script...
    <!-- /table -->

where NAME is one of :data:`BLOCKS` (a table, or a short list of the figures derived from the
same CSV: ratios, ranges, counts). ``benchmarks/results/MEMORY.md`` and
``memory_image_text_cpu.md`` keep bench_memory's own ``<!-- bench_memory table -->`` markers;
their text comes from :func:`bench_memory.markdown_report` on their CSV, as that benchmark
writes it.

    python benchmarks/write_tables.py            # rewrite every marked block in place
    python benchmarks/write_tables.py --check    # exit 1 and name each block that differs

Only the text between the markers is touched; an unknown NAME, a missing ``<!-- /table -->``
or a nested marker is an error (nothing is written then).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from _faith_common import DOCS_PER_LENGTH  # stdlib only: the benchmark's document counts

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

BEGIN = re.compile(r"<!-- table:([A-Za-z0-9_-]+) -->\n")
END = "<!-- /table -->"
MEMORY_BEGIN, MEMORY_END = "<!-- bench_memory table -->", "<!-- /bench_memory table -->"
# bench_memory's blocks: page -> the CSV its table is drawn from
MEMORY_PAGES = {"MEMORY.md": "memory_cpu.csv",
                "memory_image_text_cpu.md": "memory_image_text_cpu.csv"}

BLOCKS: dict[str, Callable[[], str]] = {}


def block(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    def register(fn: Callable[[], str]) -> Callable[[], str]:
        BLOCKS[name] = fn
        return fn
    return register


def pages() -> list[Path]:
    """Every page that may hold a generated block."""
    return ([ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
            + sorted(RESULTS.glob("*.md")))


def rows(name: str) -> list[dict[str, str]]:
    with open(RESULTS / name, newline="") as fh:
        return list(csv.DictReader(fh))


def table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def span(values: list[float], fmt: str = ".2f") -> str:
    """'lo-hi' of ``values`` (one value alone when they round alike)."""
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}-{hi}"


def ms(seconds: str | float) -> str:
    return f"{float(seconds) * 1000:.0f} ms"


def ms1(seconds: str | float) -> str:
    return f"{float(seconds) * 1000:.1f} ms"


# --- the op: attention_cpu.csv, attention_cpu_isa.csv ------------------------------------------

ATTENTION_LABELS = {
    "cpp paper": "**cpp paper**", "cpp log": "**cpp log**", "reference paper": "reference paper",
    "sdpa (no suppression)": "SDPA, no suppression (the floor)",
    "sdpa + float mask (log)": "SDPA + float mask (log)",
    "flex score_mod (log)": "compiled FlexAttention score_mod (log)",
    "row-min + sdpa D+1 (paper)": "row minima + SDPA over D+1 (paper)",
}


def _attention() -> tuple[list[int], dict[tuple[str, int], dict[str, str]]]:
    data = rows("attention_cpu.csv")
    lengths = sorted({int(r["n"]) for r in data})
    return lengths, {(r["method"], int(r["n"])): r for r in data}


def _ok_time(cell: dict[str, str] | None) -> float | None:
    return float(cell["median_s"]) if cell and cell["status"] == "ok" else None


@block("attention_cpu")
def attention_cpu() -> str:
    lengths, by = _attention()
    body = []
    for method, label in ATTENTION_LABELS.items():
        cells = []
        for n in lengths:
            r = by.get((method, n))
            if r is None:
                cells.append("not run")
            elif r["status"] != "ok":
                cells.append(r["status"])
            else:
                cells.append(f"{ms(r['median_s'])} / {float(r['peak_mib']):.0f} MiB")
        body.append([label, *cells])
    return table(["method", *(f"N={n}" for n in lengths)], body)


@block("attention_cpu_figures")
def attention_cpu_figures() -> str:
    lengths, by = _attention()

    def t(method: str, n: int) -> float | None:
        return _ok_time(by.get((method, n)))

    sdpa, flex = "sdpa (no suppression)", "flex score_mod (log)"
    ratio = {m: {n: t(m, n) / t(sdpa, n) for n in lengths if t(m, n) and t(sdpa, n)}
             for m in ("cpp paper", "cpp log")}
    log_from = [n for n in lengths if n >= 512]
    out = [f"- At N=1024: cpp paper mode {ratio['cpp paper'][1024]:.2f}x SDPA's time (target: "
           f"within 2.0x) and {t('reference paper', 1024) / t('cpp paper', 1024):.1f}x faster "
           f"than the reference (target: at least 5x); cpp log mode "
           f"{ratio['cpp log'][1024]:.2f}x SDPA (target: within 1.3x).",
           f"- cpp paper mode takes {span(list(ratio['cpp paper'].values()))}x SDPA's time at "
           f"every length; cpp log mode {span([ratio['cpp log'][n] for n in log_from])}x from "
           f"512 on ({ratio['cpp log'][256]:.2f}x at 256)."]
    for mode in ("cpp paper", "cpp log"):
        slower = [n for n in lengths if t(mode, n) and t(flex, n) and t(mode, n) > t(flex, n)]
        if not slower:
            out.append(f"- {mode} is faster than compiled FlexAttention at every length.")
        else:
            which = ", ".join(f"N={n} ({ms1(t(mode, n))} vs {ms1(t(flex, n))})" for n in slower)
            out.append(f"- {mode} is faster than compiled FlexAttention at every length but "
                       f"{which}.")
    composite = [t("row-min + sdpa D+1 (paper)", n) / t("cpp paper", n) for n in lengths]
    out.append(f"- The stock-op composite for paper mode is {span(composite, '.0f')}x slower "
               f"than cpp paper.")
    big = lengths[-1]
    ref_n = max(n for n in lengths if t("reference paper", n))
    out.append(f"- Peak memory of cpp at N={big}: "
               f"{float(by[('cpp paper', big)]['peak_mib']):.0f} MiB (the output alone, 16 x 9 x "
               f"N x 64 floats, is {16 * 9 * big * 64 * 4 / 2**20:.0f} MiB); the reference needs "
               f"{float(by[('reference paper', ref_n)]['peak_mib']) / 1024:.1f} GiB at N={ref_n}, "
               f"the paper-mode composite "
               f"{float(by[('row-min + sdpa D+1 (paper)', big)]['peak_mib']) / 1024:.1f} GiB at "
               f"N={big}.")
    first = lengths[0]
    faster = [m for m in ATTENTION_LABELS if m != "cpp log" and t(m, first)
              and t(m, first) < t("cpp log", first)]
    if faster:
        short = {"cpp paper": "cpp paper", "sdpa (no suppression)": "SDPA",
                 "flex score_mod (log)": "FlexAttention"}
        names = ", ".join(f"{short.get(m, m)} ({ms1(t(m, first))})" for m in faster)
        out.append(f"- Where cpp loses: at N={first} cpp log mode ({ms1(t('cpp log', first))}) "
                   f"trails {names}.")
    loads = [float(r["loadavg_1m"]) for r in by.values()]
    out.append(f"- 1-minute load average during the sweep: {span(loads, '.1f')}.")
    return "\n".join(out) + "\n"


def _isa() -> list[dict[str, str]]:
    return [r for r in rows("attention_cpu_isa.csv") if r["status"] == "ok"]


@block("attention_cpu_isa")
def attention_cpu_isa() -> str:
    data = [r for r in _isa() if r["dtype"] == "float32"]
    lengths = sorted({int(r["n"]) for r in data})
    by = {(r["isa"], r["method"], int(r["n"])): r for r in data}
    body = []
    for level in ("avx512", "avx2"):
        for method, label in (("cpp paper", "**cpp paper**"), ("cpp log", "**cpp log**"),
                              ("sdpa (no suppression)", "SDPA (no suppression)")):
            cells = []
            for n in lengths:
                r = by.get((level, method, n))
                if r is None:
                    cells.append("not run")
                elif method.startswith("cpp"):
                    cells.append(f"{ms(r['median_s'])} (**{float(r['ratio_to_sdpa']):.2f}x**)")
                else:
                    cells.append(ms(r["median_s"]))
            body.append([level, label, *cells])
    return table(["level (ATEN_CPU_CAPABILITY)", "method", *(f"N={n}" for n in lengths)], body)


@block("attention_cpu_isa_figures")
def attention_cpu_isa_figures() -> str:
    data = _isa()
    fp32 = [r for r in data if r["dtype"] == "float32" and r["method"].startswith("cpp")]
    ratios = [float(r["ratio_to_sdpa"]) for r in fp32]
    worst = max(fp32, key=lambda r: float(r["ratio_to_sdpa"]))
    over = [r for r in fp32 if float(r["ratio_to_sdpa"]) > 1.1]
    lengths = sorted({int(r["n"]) for r in fp32})
    verdict = ("**met at every cell**" if not over else
               "**missed** at " + ", ".join(f"{r['method']} N={r['n']} {r['isa']}" for r in over))
    loads = [float(r["loadavg_1m"]) for r in data] + [float(r["loadavg_1m_max"]) for r in data]
    half = [r for r in data if r["dtype"] in ("float16", "bfloat16")]
    out = [f"- Target (issue 15): within 1.1x of SDPA from N={lengths[0]} to {lengths[-1]}, "
           f"both modes, both levels: {verdict} ({span(ratios)}x); the closest cell is "
           f"{worst['method'].split()[1]} mode at {worst['n']} on {worst['isa']} "
           f"({float(worst['ratio_to_sdpa']):.2f}x).",
           f"- Load average during the sweep: {span(loads, '.1f')} (the benchmark's own 2 "
           f"threads included)."]
    for n in sorted({int(r["n"]) for r in half}):
        sel = [r for r in half if int(r["n"]) == n]
        out.append(f"- fp16 / bf16 inputs at N={n}: "
                   f"{span([float(r['ratio_to_fp32']) for r in sel])}x the fp32 inputs' time, "
                   f"{span([float(r['ratio_to_sdpa']) for r in sel])}x SDPA's fp32 time.")
    return "\n".join(out) + "\n"


# --- the explainer: explain_granularity.csv, explain_cpu*.csv, explain_cpu_floor.csv ----------

@block("explain_granularity")
def explain_granularity() -> str:
    data = {r["granularity"]: r for r in rows("explain_granularity.csv")}
    body = []
    for g, label in (("token", "token (scores summed per sentence)"),
                     ("sentence", "**sentence**")):
        r = data[g]
        secs = f"{float(r['seconds']):.1f}"
        if g != "token":
            secs = f"**{secs} ({float(r['speedup_vs_token']):.1f}x faster)**"
        body.append([label, r["units"], r["forwards"], f"{int(r['token_forwards']):,}", secs,
                     f"{r['evidence_rank']} of {r['n_sentences']}"])
    tok, sen = data["token"], data["sentence"]
    fewer = int(tok["token_forwards"]) / int(sen["token_forwards"])
    loads = [float(r[k]) for r in data.values()
             for k in ("load_avg_1m_before", "load_avg_1m_after")]
    speed = float(sen["speedup_vs_token"])
    return (table(["granularity", "units (variants)", "model forwards", "token-forwards",
                   "seconds", "evidence sentence rank"], body)
            + f"\n{tok['prompt_tokens']} prompt tokens ({tok['n_sentences']} sentences), "
              f"{tok['threads']} threads, load average {span(loads, '.1f')}; one run each (not a "
              f"median). Target: sentence granularity at least 5x faster than token granularity "
              f"on a document of 300+ tokens: {'met' if speed >= 5 else '**missed**'} "
              f"({speed:.1f}x; {fewer:.0f}x fewer token-forwards).\n")


def _reuse_table(name: str) -> str:
    data = rows(name)
    keys = list(dict.fromkeys((r["conceptual_threshold"], r["prompt_tokens"]) for r in data))
    body = []
    for kappa, n in keys:
        by = {r["method"]: r for r in data
              if (r["conceptual_threshold"], r["prompt_tokens"]) == (kappa, n)}

        def secs(method: str, by: dict = by) -> str:
            r = by.get(method)
            return f"{float(r['seconds']):.1f}" if r and r["seconds"] else "not run"

        full, reuse = by["full_recompute"], by["prefix_reuse"]
        left = int(reuse["token_forwards"]) / int(full["token_forwards"])
        body.append([n, kappa, by["full_recompute"]["load_avg_1min"], secs("full_recompute"),
                     secs("prefix_reuse"), secs("one_per_forward"),
                     f"{float(reuse['speedup_vs_full']):.2f}x", f"{left:.1%}"])
    diffs = [float(r["rel_diff_vs_full"]) for r in data if r["rel_diff_vs_full"]]
    return (table(["prompt tokens", "conceptual threshold", "load (1 min)", "full recompute",
                   "prefix reuse", "one variant per forward", "reuse speed-up",
                   "token-forwards left with reuse"], body)
            + f"\n{data[0]['device']}; scores equal a full recompute (max relative difference "
              f"{max(diffs):.1e}).\n")


@block("explain_prefix_reuse")
def explain_prefix_reuse() -> str:
    return _reuse_table("explain_cpu.csv")


@block("explain_prefix_reuse_quiet")
def explain_prefix_reuse_quiet() -> str:
    return _reuse_table("explain_cpu_quiet.csv")


@block("explain_prefix_reuse_target")
def explain_prefix_reuse_target() -> str:
    data = [r for name in ("explain_cpu.csv", "explain_cpu_quiet.csv") for r in rows(name)
            if r["method"] == "prefix_reuse" and r["prompt_tokens"] == "128"]
    on = [float(r["speedup_vs_full"]) for r in data if r["conceptual_threshold"] != "none"]
    off = [float(r["speedup_vs_full"]) for r in data if r["conceptual_threshold"] == "none"]
    full = {r["conceptual_threshold"]: r for r in rows("explain_cpu.csv")
            if r["method"] == "full_recompute" and r["prompt_tokens"] == "128"}
    reuse = {r["conceptual_threshold"]: r for r in rows("explain_cpu.csv")
             if r["method"] == "prefix_reuse" and r["prompt_tokens"] == "128"}
    cap = {k: int(full[k]["token_forwards"]) / int(reuse[k]["token_forwards"]) for k in reuse}
    return (f"Target (1.6x at 128 tokens): {'met' if min(off) >= 1.6 else '**not met**'} with "
            f"conceptual suppression off, the default ({span(off)}x); "
            f"{'met' if min(on) >= 1.6 else '**not met**'} with conceptual threshold 0.7 "
            f"({span(on)}x). If time followed token-forwards, prefix reuse could give at most "
            f"{cap['0.7']:.2f}x with threshold 0.7 and {cap['none']:.2f}x without "
            f"(full recompute's token-forwards over prefix reuse's).\n")


@block("explain_floor")
def explain_floor() -> str:
    data = rows("explain_cpu_floor.csv")
    lengths = sorted({int(r["prompt_tokens"]) for r in data})
    by = {(r["granularity"], int(r["prompt_tokens"])): r for r in data}
    body = [[f"{g} granularity", *(f"{float(by[(g, n)]['floor_ratio']):.2f}" for n in lengths)]
            for g in ("token", "sentence")]
    ratios = [float(r["floor_ratio"]) for r in data]
    agree = max(abs(float(r["floor_ratio"]) - float(r["floor_ratio_cpu"])) for r in data)
    loads = [float(r[k]) for r in data for k in ("load_avg_1m_before", "load_avg_1m_max")]
    return (table(["tokens", *map(str, lengths)], body)
            + f"\nTarget (issue 15): >= 0.9 at every length from 128 to 4096 tokens: "
              f"{'met' if min(ratios) >= 0.9 else '**missed**'} ({span(ratios)}; the CPU-time "
              f"ratios in the CSV agree within {agree:.2f}). Load average {span(loads, '.1f')}.\n")


@block("many_cpu")
def many_cpu() -> str:
    by = {r["method"]: r for r in rows("many_cpu.csv")}
    loop, many = by["loop"], by["explain_many_jsonl"]
    loads = [float(r[k]) for r in by.values()
             for k in ("load_avg_1m_before", "load_avg_1m_max")]

    skip = float(by["explain_many_resume_done"]["seconds_median"])

    def runs(r: dict[str, str]) -> str:
        return " and ".join(f"{float(x):.1f}" for x in r["seconds_runs"].split())

    return (f"On {loop['examples']} short SmolLM2 prompts ({loop['threads']} threads, load "
            f"{span(loads, '.1f')}) the median of {many['runs']} runs was "
            f"{float(many['seconds_median']):.1f} s for `explain_many` against "
            f"{float(loop['seconds_median']):.1f} s for a plain loop of `explain` "
            f"({float(many['vs_loop_pct']):+.1f}%; single runs {runs(many)} s against "
            f"{runs(loop)} s: on a loaded machine the spread is larger than the difference). "
            f"The bookkeeping alone (JSON and fsync) costs "
            f"{float(by['bookkeeping_only']['ms_per_example']):.1f} ms per example, and a rerun "
            f"that skips every finished id {skip * 1000:.1f} ms in all.\n")


@block("embedding_similarity")
def embedding_similarity() -> str:
    vals = {r["what"]: float(r["value"]) for r in rows("embedding_similarity.csv")}
    share = next(v for k, v in vals.items() if k.startswith("share of"))
    pairs = [(k.removeprefix("cosine "), v) for k, v in vals.items() if k.startswith("cosine")]
    listed = ", ".join(f"{p.replace(chr(39) + ' ' + chr(39), chr(39) + ' and ' + chr(39))} "
                       f"{v:.2f}" for p, v in pairs)
    return (f"In SmolLM2's input embeddings {share:.0%} of a 4,000-token sample have another "
            f"token at cosine >= 0.7 ({listed}).\n")


# --- memory: memory_cpu.csv, memory_image_text_cpu.csv ------------------------------------------

MEMORY_LABELS = {
    "forward": "plain forward of the same batch", "atman": "**AtMan (this package)**",
    "atman-reference": "AtMan through the reference op", "ig-10": "Captum IG, n_steps=10",
    "ixg": "input x gradient", "chefer": "Chefer-style attention x gradient",
    "feature-ablation": "Captum FeatureAblation",
}


def _memory(model: str) -> dict[tuple[str, int], dict[str, str]]:
    return {(r["method"], int(r["n"])): r for r in rows("memory_cpu.csv")
            if r["model"] == model and r["status"] in ("ok", "partial")}


def _peak(by: dict, method: str, n: int) -> float:
    return float(by[(method, n)]["peak_mib"])


@block("memory_cpu")
def memory_cpu() -> str:
    by = _memory("smollm2-135m")
    lengths = sorted({n for _, n in by})
    batch = next(iter(by.values()))["batch"]
    body = []
    for method, label in MEMORY_LABELS.items():
        if method == "forward":
            label = f"{label} ({batch})"
        body.append([label, *(f"{_peak(by, method, n):.0f}" if (method, n) in by else "not run"
                              for n in lengths)])
    return table(["SmolLM2-135M, peak MiB above model", *(f"N={n}" for n in lengths)], body)


@block("memory_cpu_figures")
def memory_cpu_figures() -> str:
    small, big = _memory("smollm2-135m"), _memory("llama-1b-random")

    def ratio(by: dict, a: str, b: str, n: int) -> float:
        return _peak(by, a, n) / _peak(by, b, n)

    s_len = sorted({n for _, n in small})
    b_len = sorted({n for m, n in big if m == "atman" and ("forward", n) in big})
    tail = [ratio(small, "atman", "forward", n) for n in s_len if n >= 256]
    head = s_len[0]
    big_first = [ratio(big, "atman", "forward", n) for n in b_len[:-1]]
    vs_ig = ratio(small, "atman", "ig-10", s_len[-1])
    out = [f"- At {s_len[-1]} tokens AtMan's peak is **{vs_ig:.2f}x** IG-10's on SmolLM2 and "
           f"**{ratio(big, 'atman', 'ig-10', b_len[-1]):.2f}x** on a random 923M Llama "
           f"(target: at most 0.25x).",
           f"- Against a plain forward of the same batch AtMan is {span(tail)}x from 256 tokens "
           f"on SmolLM2 and {ratio(big, 'atman', 'forward', b_len[-1]):.2f}x on the 923M model at "
           f"{b_len[-1]}; it misses the 1.25x target at {head} tokens on SmolLM2 "
           f"({ratio(small, 'atman', 'forward', head):.2f}x, {_peak(small, 'atman', head):.0f} vs "
           f"{_peak(small, 'forward', head):.0f} MiB) and on the 923M model at batch 1 for "
           f"{b_len[0]}-{b_len[-2]} tokens ({span(big_first)}x: with one variant per chunk AtMan "
           f"holds the prefix cache it reuses plus the chunk's own cache)."]
    measured = {m: float(small[(m, head)]["measured_s"]) for m in
                ("atman", "ig-10", "ixg", "chefer", "feature-ablation")
                if small[(m, head)]["measured_s"]}

    def sec(x: float) -> str:
        return f"{x:.0f} s" if x >= 10 else f"{x:.1f} s"

    est = small[("atman", s_len[-1])]["est_s"]
    out.append(f"- Time at {head} tokens (SmolLM2, measured): "
               + ", ".join(f"{m} {sec(v)}" for m, v in measured.items())
               + f". At {s_len[-1]} tokens one AtMan explanation is an estimated "
                 f"{float(est) / 3600:.1f} h on 1 CPU thread (estimates are marked as such in "
                 f"the CSV, never mixed with measured times).")
    return "\n".join(out) + "\n"


@block("memory_image_text")
def memory_image_text() -> str:
    by = {r["method"]: r for r in rows("memory_image_text_cpu.csv")}
    labels = {"forward": "plain forward (vision tower included)",
              "atman-region4": "**AtMan, `image_region=4`**",
              "atman": "**AtMan, every token**",
              "ig-10": "Captum IG over the merged embeddings, n_steps=10"}
    body = []
    for method, label in labels.items():
        r = by[method]
        if r["measured_s"]:
            t = f"{float(r['measured_s']):.0f} (measured)"
        else:
            t = f"~{float(r['est_s']):.0f} (estimated, partial run)"
        if r.get("units"):
            label += f" ({r['units']} variants)"
        body.append([label, f"{float(r['peak_mib']):.0f}", t])
    first = next(iter(by.values()))

    def ratio(a: str, b: str) -> str:
        return f"{float(by[a]['peak_mib']) / float(by[b]['peak_mib']):.2f}x"

    loads = [float(r["loadavg"]) for r in by.values()]
    return (table([f"random LLaVA ({first['params_m']}M), {first['seq_len']} prompt tokens, "
                   f"batch {first['batch']}", "peak MiB above model", "seconds per explanation"],
                  body)
            + f"\n- Time: every image token as its own unit is an estimated "
              f"{float(by['atman']['est_s']) / float(by['atman-region4']['measured_s']):.0f}x "
              f"the `image_region=4` explanation's measured time.\n"
              f"- AtMan's peak is **{ratio('atman', 'ig-10')}** IG-10's at token level and "
              f"**{ratio('atman-region4', 'ig-10')}** with 4 x 4 regions; against a plain "
              f"forward of the same batch it is {ratio('atman', 'forward')} / "
              f"{ratio('atman-region4', 'forward')} (batch 1: the reused prefix cache plus the "
              f"chunk's own cache, as in the text rows).\n"
              f"- 1-minute load average {span(loads, '.1f')} during the rows (the CSV's "
              f"`loadavg` column), {first['threads']} thread.\n")


# --- long documents: long_docs_cpu.csv --------------------------------------------------------

LONG_METHODS = ("forward", "atman", "atman-b1", "ig-10", "feature-ablation")


def _long() -> tuple[list[int], dict[tuple[str, int], dict[str, str]]]:
    data = [r for r in rows("long_docs_cpu.csv") if r["status"] == "ok"]
    return sorted({int(r["n"]) for r in data}), {(r["method"], int(r["n"])): r for r in data}


@block("long_docs_cpu")
def long_docs_cpu() -> str:
    lengths, by = _long()
    header = ["method"]
    for n in lengths:
        r = next(r for (m, k), r in by.items() if k == n)
        header.append(f"N={n} ({r['n_tokens']} tok, {r['n_units']} units, p(target) "
                      f"{r['p_target']})")
    body = []
    for method in LONG_METHODS:
        cells = []
        for n in lengths:
            r = by.get((method, n))
            if r is None:
                cells.append("-")
                continue
            cell = (f"{float(r['seconds']):.1f} s (cpu {float(r['cpu_s']):.0f} s), "
                    f"{r['peak_mib']} MiB")
            if r["evidence_rank"]:
                cell += f", rank {r['evidence_rank']}/{r['n_doc_sentences']}"
            if r["atman_chunk_size"]:
                cell += f", chunk {r['atman_chunk_size']}"
            cells.append(cell + f" (load {r['load_before']}/{r['load_after']})")
        body.append([method, *cells])
    return table(header, body)


@block("long_docs_designs")
def long_docs_designs() -> str:
    """Joint designs against the exhaustive single-unit design on the long documents."""
    data = [r for r in rows("long_docs_designs_cpu.csv") if r["status"] == "ok"]
    body = []
    for r in sorted(data, key=lambda r: (int(r["n"]), r["method"] != "atman", r["method"])):
        name = "single (exhaustive)" if r["method"] == "atman" else r["method"].removeprefix(
            "atman-").replace("-", ", budget ")
        body.append([f"{r['n_tokens']} tok, {r['n_doc_sentences']} sentences", name,
                     r["atman_forwards"], r["atman_token_forwards"],
                     f"{float(r['seconds']):.1f} s (cpu {float(r['cpu_s']):.0f} s)",
                     f"{r['peak_mib']} MiB", f"{r['evidence_rank']}/{r['n_doc_sentences']}",
                     f"{r['load_before']}/{r['load_after']}", r["machine"]])
    return table(["document", "design", "forwards", "token-forwards", "time", "peak memory",
                  "evidence rank", "load", "machine"], body)


@block("sink_cpu")
def sink_cpu() -> str:
    """Removal drop of the top-k tokens with and without the sink among the units."""
    data = rows("sink_cpu.csv")
    body = []
    for sink in ("explain", "keep"):
        mine = [r for r in data if r["sink"] == sink]
        d1 = sum(float(r["drop_top1"]) for r in mine) / len(mine)
        two = [float(r["drop_top2"]) for r in mine if r["drop_top2"] != ""]
        first = sum(r["prompt"].startswith(r["top1"]) for r in mine)
        body.append([f'`sink="{sink}"`', str(len(mine)), f"{d1:.2f}",
                     f"{sum(two) / len(two):.2f}", f"{first} of {len(mine)}"])
    r = data[0]
    body.append(["machine", r["machine"], f"load {r['load_avg_1m_start']}/"
                 f"{r['load_avg_1m_end']}", f"{r['threads']} threads", ""])
    return table(["setting", "prompts", "top-1 removal drop (nats)",
                  "top-2 removal drop (nats)", "top-1 unit is position 0"], body)


@block("quality_sink")
def quality_sink() -> str:
    """The quality evaluation with and without the sink among the units."""
    body = []
    for r in rows("quality_sink_cpu.csv"):
        if r["task"] == "qa":
            figure = (f"AP {100 * float(r['ap']):.1f}, deletion AUC "
                      f"{100 * float(r['deletion_auc']):.1f}")
        else:
            figure = f"top-1 sentence {100 * float(r['top1']):.1f}%"
        body.append([r["task"], r["method"], r["n_items"], figure,
                     f"{r['load_avg_1m_start']}/{r['load_avg_1m_end']}"])
    return table(["task", "method", "items", "result", "load"], body)


@block("long_docs_cpu_targets")
def long_docs_cpu_targets() -> str:
    lengths, by = _long()

    def r(method: str, n: int, key: str) -> float:
        return float(by[(method, n)][key])

    wall = [r("atman", n, "seconds") / r("feature-ablation", n, "seconds") for n in lengths]
    cpu = [r("atman", n, "cpu_s") / r("feature-ablation", n, "cpu_s") for n in lengths]
    ig = [r("atman", n, "seconds") / r("ig-10", n, "seconds") for n in lengths]

    def per_n(values: list[float], fmt: str = ".2f") -> str:
        return ", ".join(f"{v:{fmt}}x ({n})" for v, n in zip(values, lengths, strict=True))

    one = [(n, "atman-b1" if ("atman-b1", n) in by else "atman") for n in lengths
           if by.get(("atman-b1", n)) or by[("atman", n)]["atman_chunk_size"] == "1"]
    mem = [r(m, n, "peak_mib") / r("forward", n, "peak_mib") for n, m in one]
    ig_mem = [r("ig-10", n, "peak_mib") / r("forward", n, "peak_mib") for n in lengths]
    batched = [n for n in lengths if by[("atman", n)]["atman_chunk_size"] != "1"]
    ranks = {m: [by[(m, n)]["evidence_rank"] for n in lengths]
             for m in ("atman", "feature-ablation", "ig-10")}
    verdict_fa = "**met**" if max(wall) < 1 else "**missed**"
    verdict_ig = "**missed** at every length" if min(ig) > 1 else "met where below 1x"
    out = [f"- *Faster than FeatureAblation at every length*: {verdict_fa}: {per_n(wall)} of "
           f"its wall time (CPU seconds: {', '.join(f'{v:.2f}x' for v in cpu)}).",
           f"- *Faster than IG-10*: {verdict_ig} ({per_n(ig, '.1f')} IG-10's wall time).",
           "- *Memory <= 1.2x a plain forward* with one variant per forward: "
           + ", ".join(f"{v:.2f}x ({n}, `{m}`)" for v, (n, m) in zip(mem, one, strict=True))
           + "; `batch_size=\"auto\"` batches "
           + ", ".join(f"{by[('atman', n)]['atman_chunk_size']} variants at {n} "
                       f"({r('atman', n, 'peak_mib') / r('forward', n, 'peak_mib'):.2f}x)"
                       for n in batched)
           + f". IG-10 uses {span(ig_mem, '.1f')}x.",
           "- *Evidence rank* (1 = the evidence sentence first): AtMan "
           + ", ".join(ranks["atman"]) + "; FeatureAblation " + ", ".join(ranks["feature-ablation"])
           + "; IG-10 " + ", ".join(ranks["ig-10"]) + " (of "
           + ", ".join(by[("atman", n)]["n_doc_sentences"] for n in lengths) + " sentences)."]
    return "\n".join(out) + "\n"


# --- quality: quality_cpu.csv, quality_doc_partial.csv, quality_contrast_cpu*.csv -------------

QUALITY_LABELS = {
    "atman_paper": "**AtMan paper**", "atman_paper_cs": "AtMan paper + conceptual",
    "atman_log": "AtMan log", "atman_log_cs": "AtMan log + conceptual",
    "ig": "Captum IG (n_steps=10)", "ixg": "input x gradient",
    "feature_ablation": "FeatureAblation", "attention": "last-layer attention",
    "rollout": "attention rollout", "chefer": "Chefer attention x gradient", "random": "random",
}


@block("quality_cpu")
def quality_cpu() -> str:
    data = rows("quality_cpu.csv")
    qa = {r["method"]: r for r in data if r["task"] == "qa"}
    se = {r["method"]: r for r in data if r["task"] == "sentiment"}
    cols = [(qa, "ap", max), (qa, "ar", max), (qa, "precision", max), (qa, "deletion_auc", min),
            (qa, "insertion_auc", max), (se, "deletion_auc", min), (se, "insertion_auc", max)]
    best = [pick(float(src[m][key]) for m in QUALITY_LABELS) for src, key, pick in cols]
    body = []
    for method, label in QUALITY_LABELS.items():
        cells = []
        for (src, key, _), top in zip(cols, best, strict=True):
            v = float(src[method][key])
            cells.append(f"**{v * 100:.1f}**" if v == top else f"{v * 100:.1f}")
        cells.append(f"{float(qa[method]['seconds']):.2f}")
        body.append([label, *cells])
    return (table(["method", "AP", "AR", "precision", "QA deletion AUC (lower better)",
                   "QA insertion AUC", "sentiment deletion AUC", "sentiment insertion AUC",
                   "s / QA item"], body)
            + f"\n{qa['atman_paper']['n_kept']} of {qa['atman_paper']['n_generated']} generated "
              f"QA items kept (answered correctly), {se['atman_paper']['n_items']} sentiment "
              f"items; seed {qa['atman_paper']['seed']}, {qa['atman_paper']['threads']} thread.\n")


def _pm(r: dict[str, str], key: str, scale: float = 100.0) -> str:
    if not r.get(key):
        return "-"
    return f"{float(r[key]) * scale:.1f} ± {float(r[key + '_sem']) * scale:.1f}"


@block("quality_cpu_full")
def quality_cpu_full() -> str:
    body = [[r["task"], r["method"], r["n_items"], _pm(r, "ap"), _pm(r, "ar"),
             _pm(r, "precision"), _pm(r, "recall"), _pm(r, "deletion_auc"),
             _pm(r, "insertion_auc"), f"{float(r['seconds']):.2f}"]
            for r in rows("quality_cpu.csv")]
    return table(["task", "method", "items", "AP", "AR", "precision", "recall",
                  "deletion AUC ↓", "insertion AUC ↑", "s/item"], body)


DOC_LABELS = {
    "atman_sentence": "AtMan, sentence units",
    "atman_sentence_cs": "AtMan, sentence units, conceptual 0.7",
    "chefer_sum": "Chefer (attention x gradient), summed per sentence",
    "ixg_sum": "IxG, summed per sentence", "random": "random",
}


@block("quality_doc_partial")
def quality_doc_partial() -> str:
    data = {r["method"]: r for r in rows("quality_doc_partial.csv")}
    first = next(iter(data.values()))
    n = first["n_items"]
    body = [[label, f"{float(data[m]['top1']) * 100:.0f}", f"{float(data[m]['ap']) * 100:.0f}",
             f"{float(data[m]['seconds']):.0f}"] for m, label in DOC_LABELS.items() if m in data]
    items = rows("quality_doc_partial_items.csv")
    return (table([f"method ({n} documents)", "top-1", "sentence AP",
                   "s / item (loaded machine)"], body)
            + f"\n{n} of the {first['n_kept']} kept documents ({first['n_generated']} "
              f"generated) ran before the stop ({first['note']}); 1-minute load average "
              f"{float(first['load_avg_1m_start']):.1f} at the start, "
              f"{float(first['load_avg_1m_end']):.1f} at the end, "
              f"{span([float(r['load_avg_1m']) for r in items], '.1f')} during the items.\n")


PILOT_LABELS = {
    "atman_sentence": "AtMan, sentence units",
    "atman_sentence_cs": "AtMan, sentence units, conceptual 0.7",
    "atman_token_sum": "AtMan token scores summed per sentence",
    "atman_token_sum_cs": "the same, conceptual 0.7",
    "chefer_sum": "Chefer, summed per sentence", "ixg_sum": "IxG, summed per sentence",
    "ig_sum": "IG-10, summed per sentence", "random": "random",
}


@block("quality_doc_pilot")
def quality_doc_pilot() -> str:
    data = {r["method"]: r for r in rows("quality_doc_pilot_items.csv")}
    base = float(data["atman_sentence"]["seconds"])
    body = []
    for m, label in PILOT_LABELS.items():
        r = data[m]
        scores = [float(x) for x in r["scores"].split()]
        gold = int(r["evidence_index"])
        lead = scores[gold] - max(v for i, v in enumerate(scores) if i != gold)
        body.append([label, f"{r['evidence_rank']} of {r['n_sentences']}",
                     f"{lead:+.2f}" if m.startswith("atman") else "-",
                     f"{float(r['seconds']) / base:.1f}x"])
    return table(["method (1 document)", "evidence sentence rank", "lead (nats)",
                  "time / AtMan sentence units"], body)


CONTRAST_LABELS = {
    "atman_contrast": "AtMan, contrastive (`contrast=` the foil)",
    "atman_fact": "AtMan on the fact alone",
    "ixg_contrast": "IxG of log p(fact) - log p(foil)",
    "ig_contrast": "IG-10 of the same",
    "random": "random",
}


def _interval(r: dict[str, str], key: str) -> str:
    return (f"{float(r[key]) * 100:.1f} [{float(r[key + '_lo']) * 100:.1f}, "
            f"{float(r[key + '_hi']) * 100:.1f}]")


@block("quality_contrast")
def quality_contrast() -> str:
    data = {r["method"]: r for r in rows("quality_contrast_cpu.csv")}
    most = max(int(r["n_items"]) for r in data.values())
    body = []
    for m, label in CONTRAST_LABELS.items():
        r = data[m]
        if int(r["n_items"]) < most:
            label += f" (first {r['n_items']} items only)"
        body.append([label, _interval(r, "top1"), _interval(r, "mrr"),
                     f"{float(r['foil_sentence_rank']):.2f}"])
    first = next(iter(data.values()))
    fact = data["atman_fact"]
    items = rows("quality_contrast_cpu_items.csv")

    def foil_counts(method: str) -> tuple[int, int, int]:
        sel = [r for r in items if r["method"] == method]
        last = sum(int(r["foil_sentence_rank"]) == int(r["n_sentences"]) for r in sel)
        negative = sum(float(r["scores"].split()[int(r["foil_index"])]) < 0 for r in sel)
        return last, negative, len(sel)

    c_last, c_neg, c_n = foil_counts("atman_contrast")
    f_last, f_neg, _ = foil_counts("atman_fact")
    return (table([f"method (SmolLM2-135M, {most} documents)", "top-1 gold sentence [95% CI]",
                   "MRR [95% CI]",
                   f"foil's sentence, mean rank of {float(first['n_sentences']):.0f}"], body)
            + f"\n- Top-1, AtMan on the fact alone against contrastive AtMan on the same items: "
              f"{fact['wins_vs_reference']} items for the fact alone, "
              f"{fact['losses_vs_reference']} against (exact McNemar p = "
              f"{float(fact['mcnemar_p']):.2f}).\n"
              f"- Contrastive AtMan ranks the foil's own sentence last on {c_last} of {c_n} items "
              f"(on the fact alone: {f_last}) and scores it negative (supports the foil) on "
              f"{c_neg} (on the fact alone: {f_neg}).\n"
              f"- {first['n_kept']} of {first['n_generated']} generated documents kept (log "
              f"p(fact) > log p(foil)); seed {first['seed']}; 1-minute load average "
              f"{float(first['load_avg_1m_start']):.1f} at the start, "
              f"{float(first['load_avg_1m_end']):.1f} at the end.\n")


@block("quality_contrast_full")
def quality_contrast_full() -> str:
    body = []
    for r in rows("quality_contrast_cpu.csv"):
        paired = ("-" if not r["wins_vs_reference"] else
                  f"{r['wins_vs_reference']} / {r['losses_vs_reference']} "
                  f"(p = {float(r['mcnemar_p']):.2g})")
        body.append([r["method"], r["n_items"], _interval(r, "top1"), _interval(r, "mrr"),
                     f"{float(r['evidence_rank']):.2f}", f"{float(r['foil_sentence_rank']):.2f}",
                     paired, f"{float(r['seconds']):.1f}"])
    n = float(rows("quality_contrast_cpu.csv")[0]["n_sentences"])
    return table(["method", "items", "top-1 gold sentence [95% CI]", "MRR [95% CI]",
                  f"gold rank (of {n:.0f})", "foil sentence rank",
                  "top-1 wins / losses vs atman_contrast (McNemar p)", "s/item"], body)


# --- the zoo: model_zoo.csv ---------------------------------------------------------------------

@block("model_zoo_counts")
def model_zoo_counts() -> str:
    count = Counter((r["kind"], r["status"]) for r in rows("model_zoo.csv"))
    kinds = {"causal_lm": "causal LMs", "classifier": "sequence classifiers",
             "image": "image classifiers"}
    known = ["explained", "refused", "not built", "failing"]
    statuses = known + sorted({s for _, s in count} - set(known))  # a new status gets a column
    unknown = sorted({k for k, _ in count} - set(kinds))
    if unknown:
        raise ValueError(f"model_zoo.csv: kinds {unknown} have no label in write_tables.py")
    body = [[label, *(str(count[(k, s)]) for s in statuses),
             str(sum(count[(k, s)] for s in statuses))] for k, label in kinds.items()]
    body.append(["**all**", *(str(sum(count[(k, s)] for k in kinds)) for s in statuses),
                 str(sum(count.values()))])
    names = {"not built": "not built here"}
    return table(["kind", *(names.get(s, s) for s in statuses), "total"], body)


# --- faithfulness against the peers (bench_faithfulness) ------------------------------------

FAITH_NAMES = {
    "atman-auto": "**AtMan default** (`design=\"auto\"`)", "atman-single": "AtMan single",
    "atman-hierarchical-24": "AtMan hierarchical, budget 24",
    "atman-hierarchical-48": "AtMan hierarchical, budget 48",
    "atman-sampled-32": "AtMan sampled, budget 32", "atman-sampled-64": "AtMan sampled, budget 64",
    "contextcite-32": "ContextCite, 32 ablations", "contextcite-64": "ContextCite, 64 ablations",
    "attnlrp": "AttnLRP (lxt)", "ig-10": "Captum IG-10",
    "feature-ablation": "Captum FeatureAblation",
    "forward": "one plain forward (yardstick)",
}


# the two peers of the targets: (name in the text, method, time limit as a multiple of theirs)
FAITH_PEERS = (("ContextCite-64", "contextcite-64", 0.5), ("AttnLRP", "attnlrp", 2.0))
FAITH_DROPS = (("top1_drop", "top-1"), ("top3_drop", "top-3"), ("top5_drop", "top-5"))
FAITH_VERDICTS = FAITH_DROPS + (("evidence_top1", "evidence top-1"),)


def _cpu_name(machine: str) -> str:
    """A recorded machine stamp without its core and GPU counts: "AMD EPYC (AVX512)"."""
    return re.sub(r", \d+ cores.*$", "", machine).replace("(R)", "")


def _faith() -> dict[tuple[str, int], dict[str, str]]:
    return {(r["method"], int(r["length"])): r for r in rows("faithfulness_summary_cpu.csv")}


def _f(value: str, fmt: str = ".2f") -> str:
    return format(float(value), fmt) if value not in ("", None) else ""


@block("faithfulness")
def faithfulness() -> str:
    """Every method at every length measured: faithfulness, time, memory, forwards."""
    body = []
    for (method, n), r in sorted(_faith().items(), key=lambda kv: kv[0][1]):
        ev = (f"{_f(r['evidence_top1'])} ({r['templated']} pages)"
              if r.get("evidence_top1") else "")
        body.append([str(n), FAITH_NAMES.get(method, method), r["docs"], _f(r.get("top1_drop")),
                     _f(r.get("top3_drop")), _f(r.get("top5_drop")), _f(r.get("lds")), ev,
                     _f(r["seconds"], ".1f"), _f(r["forwards"], ".0f"),
                     _f(r["memory_x_forward"]), str(r["load_max"]),
                     _cpu_name(r["machine"])])
    return table(["tokens", "method", "docs", "top-1 drop", "top-3 drop", "top-5 drop", "LDS",
                  "evidence top-1", "s / doc", "forwards", "memory / forward's", "load max",
                  "CPU (2 cores)"], body)


@block("faithfulness_readme")
def faithfulness_readme() -> str:
    """The README's short table: the default against the two peers at each length."""
    body = []
    for (method, n), r in sorted(_faith().items(), key=lambda kv: kv[0][1]):
        if method not in ("atman-auto", "contextcite-64", "attnlrp"):
            continue
        body.append([str(n), FAITH_NAMES[method], r["docs"], _f(r["top1_drop"]),
                     _f(r["top3_drop"]), _f(r["top5_drop"]), _f(r.get("evidence_top1")),
                     _f(r["seconds"], ".1f")])
    return table(["tokens", "method", "docs", "top-1 drop", "top-3 drop", "top-5 drop",
                  "evidence top-1", "s / doc"], body)


def _faith_docs(method: str, n: int) -> dict[str, dict[str, str]]:
    """Per-document rows of one method at one length (faithfulness_cpu.csv), by document."""
    return {r["doc"]: r for r in rows("faithfulness_cpu.csv")
            if r["method"] == method and int(r["length"]) == n}


def _paired(a: dict[str, dict[str, str]], b: dict[str, dict[str, str]], key: str
            ) -> tuple[float, float, int] | None:
    """Means of ``key`` for two methods over the documents both have a value on (a target
    is judged on the same documents for both sides), and how many there are. Times pair only
    documents both sides ran on the same host: hosts differ in speed."""
    if key == "evidence_top1":
        common = [d for d in a if d in b and a[d]["evidence_rank"] and b[d]["evidence_rank"]]
        pick = (lambda r: float(r["evidence_rank"] == "1"))  # noqa: E731
    else:
        common = [d for d in a if d in b and a[d][key] and b[d][key]]
        pick = (lambda r: float(r[key]))  # noqa: E731
    if key in ("seconds", "cpu_s"):
        common = [d for d in common if a[d].get("machine") == b[d].get("machine")]
    if not common:
        return None
    return (sum(pick(a[d]) for d in common) / len(common),
            sum(pick(b[d]) for d in common) / len(common), len(common))


@block("faithfulness_targets")
def faithfulness_targets() -> str:
    """Issue "designs" item 7: the default against its targets at each length measured, each
    comparison on the documents both sides ran."""
    by = _faith()
    lines = []
    for n in sorted({k[1] for k in by}):
        auto = by.get(("atman-auto", n))
        if auto is None:
            continue
        mine = _faith_docs("atman-auto", n)
        peers = [(name, _faith_docs(m, n)) for name, m, _ in FAITH_PEERS]
        items = []
        for key, label in FAITH_VERDICTS:
            for name, theirs in peers:
                got = _paired(mine, theirs, key)
                if got is None:
                    continue
                a, b, k = got
                verdict = "met" if a > b else ("tied (target: ahead)" if a == b
                                               else f"missed by {b - a:.2f}")
                items.append(f"{label} {a:.2f} vs {name} {b:.2f} ({k} docs): {verdict}")
        for (name, theirs), (_, _, limit) in zip(peers, FAITH_PEERS, strict=True):
            got = _paired(mine, theirs, "seconds")
            if got is not None:
                ratio = got[0] / got[1]
                items.append(f"time {ratio:.2f}x {name}'s ({got[2]} docs; target <= {limit:g}: "
                             f"{'met' if ratio <= limit else 'missed'})")
        if n >= 4096:
            for method, what in (("atman-single", "the exhaustive single design's"),
                                 ("ig-10", "IG-10's")):
                got = _paired(mine, _faith_docs(method, n), "seconds")
                if got is not None:
                    ratio = got[0] / got[1]
                    limit = 0.2 if method == "atman-single" else 1.0
                    items.append(f"time {ratio:.2f}x {what} ({got[2]} docs; target <= "
                                 f"{limit:g}: {'met' if ratio <= limit else 'missed'})")
        if auto.get("memory_x_forward"):
            m = float(auto["memory_x_forward"])
            items.append(f"memory {m:.2f}x a plain forward's (target <= 1.2: "
                         f"{'met' if m <= 1.2 else 'missed'})")
        lines.append(f"- **{n} tokens** ({auto['docs']} documents, {auto['machine']}): "
                     + "; ".join(items) + ".")
    return "\n".join(lines) + "\n"


@block("faithfulness_misses")
def faithfulness_misses() -> str:
    """The README's "where AtMan loses": only the targets the default misses, each figure on
    the documents both sides ran (the per-length detail is ``faithfulness_targets``)."""
    by = _faith()
    lengths = sorted(n for m, n in by if m == "atman-auto")
    mine = {n: _faith_docs("atman-auto", n) for n in lengths}
    lines = []
    for name, method, limit in reversed(FAITH_PEERS):
        ratios = {}
        for n in lengths:
            got = _paired(mine[n], _faith_docs(method, n), "seconds")
            if got is not None:
                ratios[n] = got[0] / got[1]
        missed = [n for n in ratios if ratios[n] > limit]
        if missed:
            lines.append(f"- time: {', '.join(f'{ratios[n]:.2f}x' for n in ratios)} {name}'s at "
                         f"{', '.join(str(n) for n in ratios)} tokens (target <= {limit:g}; "
                         f"missed at {', '.join(str(n) for n in missed)})")
    behind: list[str] = []
    ceiling: dict[str, list[int]] = {}
    for n in lengths:
        for name, method, _ in FAITH_PEERS:
            theirs = _faith_docs(method, n)
            for key, label in FAITH_VERDICTS:
                got = _paired(mine[n], theirs, key)
                if got is None or got[0] > got[1]:
                    continue
                if key == "evidence_top1" and got[0] == got[1] == 1.0:
                    ceiling.setdefault(name, []).append(n)  # a perfect score: no beating it
                elif got[0] == got[1]:
                    behind.append(f"{label} at {n} tokens, tied with {name} ({got[2]} docs)")
                else:
                    behind.append(f"{label} at {n} tokens, behind {name} by "
                                  f"{got[1] - got[0]:.2f} ({got[2]} docs)")
    lines.append("- faithfulness: " + ("; ".join(behind) if behind
                                       else "ahead of both peers on every removal drop"))
    if ceiling:
        lines.append("- evidence top-1: 1.00, tied with " + " and ".join(
            f"{name} at {', '.join(str(n) for n in ns)} tokens" for name, ns in ceiling.items())
                     + " (each of the two found the evidence first on every page: no method can be "
                     "ahead of that)")
    mem = {n: float(by[("atman-auto", n)]["memory_x_forward"]) for n in lengths
           if by[("atman-auto", n)].get("memory_x_forward")}
    over = [n for n in mem if mem[n] > 1.2]
    if over:
        peers = []
        for name, method, _ in reversed(FAITH_PEERS):
            vals = [float(by[(method, n)]["memory_x_forward"]) for n in lengths
                    if (method, n) in by and by[(method, n)].get("memory_x_forward")]
            if vals:
                peers.append(f"{name}'s {span(vals, '.1f')}x")
        lines.append(f"- memory: {', '.join(f'{mem[n]:.2f}x' for n in mem)} a plain forward's "
                     f"at {', '.join(str(n) for n in mem)} tokens (target <= 1.2; missed at "
                     f"{', '.join(str(n) for n in over)}); " + ", ".join(peers))
    return "\n".join(lines) + "\n"


@block("faithfulness_counts")
def faithfulness_counts() -> str:
    """How many documents the default ran at each length against the issue's count, how many
    of them are templated pages, and on which hosts."""
    by = _faith()
    lines = []
    for n in sorted(n for m, n in by if m == "atman-auto"):
        r = by[("atman-auto", n)]
        want, have = DOCS_PER_LENGTH.get(n), int(r["docs"])
        short = ("no target" if want is None else f"target {want}: met" if have >= want
                 else f"target {want}: {want - have} short")
        hosts = " and ".join(_cpu_name(h) for h in r["machine"].split(" + "))
        lines.append(f"- {n} tokens: {r['docs']} documents ({short}), {r['templated']} of them "
                     f"templated pages with a known evidence sentence; {hosts}")
    return "\n".join(lines) + "\n"


@block("faithfulness_alternatives")
def faithfulness_alternatives() -> str:
    """Each other AtMan design against the default, on the documents both ran."""
    lines = []
    for method in ("atman-single", "atman-hierarchical-24", "atman-hierarchical-48",
                   "atman-sampled-32", "atman-sampled-64"):
        items = []
        for n in sorted(n for m, n in _faith() if m == method):
            mine, theirs = _faith_docs(method, n), _faith_docs("atman-auto", n)
            t = _paired(mine, theirs, "seconds")
            if t is None:
                continue
            parts = [f"time {t[0] / t[1]:.2f}x"]
            for key, label in FAITH_DROPS + (("lds", "LDS"),):
                got = _paired(mine, theirs, key)
                if got is not None:
                    parts.append(f"{label} {got[0] - got[1]:+.2f}")
            items.append(f"{n} tokens ({t[2]} docs): " + ", ".join(parts))
        if items:
            lines.append(f"- {FAITH_NAMES[method]} against the default: " + "; ".join(items))
    return "\n".join(lines) + "\n"


# --- the README's headline figures ----------------------------------------------------------------

@block("headline")
def headline() -> str:
    isa = [r for r in _isa() if r["dtype"] == "float32"]
    isa_n = sorted({int(r["n"]) for r in isa})

    def vs_sdpa(method: str) -> str:
        return span([float(r["ratio_to_sdpa"]) for r in isa if r["method"] == method])

    small = _memory("smollm2-135m")
    n_mem = max(n for _, n in small)
    gran = {r["granularity"]: r for r in rows("explain_granularity.csv")}
    lengths, long = _long()
    wall = [float(long[("atman", n)]["seconds"]) / float(long[("feature-ablation", n)]["seconds"])
            for n in lengths]
    first = all(long[("atman", n)]["evidence_rank"] == "1" for n in lengths)
    qa = {r["method"]: r for r in rows("quality_cpu.csv") if r["task"] == "qa"}
    zoo = Counter(r["status"] for r in rows("model_zoo.csv"))
    body = [
        [f"the C++ op against SDPA (CPU, fp32, causal, 16 variants, N={isa_n[0]}-{isa_n[-1]}, "
         "AVX2 and AVX-512)",
         f"paper mode {vs_sdpa('cpp paper')}x, log mode {vs_sdpa('cpp log')}x SDPA's time "
         "(no suppression), no N^2 buffer",
         "[per instruction-set level](docs/benchmarks.md"
         "#the-c-op-against-sdpa-on-each-instruction-set-level)"],
        [f"peak memory of an explanation, SmolLM2, {n_mem} tokens",
         f"{_peak(small, 'atman', n_mem) / _peak(small, 'ig-10', n_mem):.2f}x Captum IG-10's",
         "[memory](docs/benchmarks.md#memory-and-time-against-backprop-attribution)"],
        [f"sentence vs token units, {gran['token']['prompt_tokens']}-token document",
         f"{float(gran['sentence']['speedup_vs_token']):.1f}x faster, same evidence rank",
         "[granularity](docs/benchmarks.md#granularity)"],
        [f"long documents, {lengths[0]}-{lengths[-1]} tokens, sentence units",
         f"{span(wall)}x FeatureAblation's time; evidence sentence "
         + ("first at every length" if first else "not always first"),
         "[long documents](docs/benchmarks.md#long-documents)"],
        [f"evidence retrieval AP, {qa['atman_paper']['n_items']} QA items (SmolLM2)",
         f"AtMan {float(qa['atman_paper']['ap']) * 100:.1f}, Chefer "
         f"{float(qa['chefer']['ap']) * 100:.1f}, IG {float(qa['ig']['ap']) * 100:.1f}, random "
         f"{float(qa['random']['ap']) * 100:.1f}",
         "[quality](docs/benchmarks.md#explanation-quality)"],
        ["transformers architectures (tiny random models, brute-force checked)",
         f"{zoo['explained']} explained, {zoo['refused']} refused by name, "
         f"{zoo['not built']} not built here, {zoo['failing']} failing",
         "[models](docs/models.md#which-hugging-face-models)"],
    ]
    return table(["what", "measured", "details"], body)


# --- rewriting pages ------------------------------------------------------------------------------

def render(text: str, page: str = "page") -> str:
    """``text`` with every marked block regenerated; raises ValueError on a broken marker."""
    out, pos = [], 0
    for m in BEGIN.finditer(text):
        if m.start() < pos:
            raise ValueError(f"{page}: block {m.group(1)!r} starts inside another block")
        name = m.group(1)
        if name not in BLOCKS:
            raise ValueError(f"{page}: unknown block {name!r} (known: {', '.join(BLOCKS)})")
        end = text.find(END, m.end())
        nxt = BEGIN.search(text, m.end())
        if end < 0 or (nxt and nxt.start() < end):
            raise ValueError(f"{page}: block {name!r} has no {END} before the next block")
        out += [text[pos:m.end()], BLOCKS[name]()]
        pos = end
    out.append(text[pos:])
    text = "".join(out)
    if Path(page).name in MEMORY_PAGES and MEMORY_BEGIN in text:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_memory import markdown_report  # imports torch: only for these two pages

        head, rest = text.split(MEMORY_BEGIN, 1)
        if MEMORY_END not in rest:
            raise ValueError(f"{page}: {MEMORY_BEGIN} without {MEMORY_END}")
        report = markdown_report(rows(MEMORY_PAGES[Path(page).name]))
        text = head + MEMORY_BEGIN + "\n" + report + MEMORY_END + rest.split(MEMORY_END, 1)[1]
    return text


def stale_blocks(page: Path) -> list[str]:
    """Names of the blocks of ``page`` whose committed text differs from what the CSV gives."""
    text = page.read_text()
    fresh = render(text, str(page))
    if fresh == text:
        return []

    def blocks(t: str) -> dict[str, str]:
        found = {m.group(1): t[m.end():t.find(END, m.end())] for m in BEGIN.finditer(t)}
        if MEMORY_BEGIN in t:
            found["bench_memory"] = t.split(MEMORY_BEGIN, 1)[1].split(MEMORY_END, 1)[0]
        return found

    old, new = blocks(text), blocks(fresh)
    return [name for name in new if old.get(name) != new[name]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a committed block differs from its CSV")
    args = parser.parse_args(argv)
    stale = []
    for page in pages():
        names = stale_blocks(page)
        rel = page.relative_to(ROOT)
        stale += [f"{rel}: {name}" for name in names]
        if names and not args.check:
            page.write_text(render(page.read_text(), str(page)))
            print(f"wrote {rel} ({', '.join(names)})")
    if args.check and stale:
        print("generated blocks that differ from their CSVs (run python "
              "benchmarks/write_tables.py):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
