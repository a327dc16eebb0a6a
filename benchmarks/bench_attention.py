"""Speed and memory of the fused op against the attention a user would otherwise assemble.

CPU sweep (the default): fp32, causal, B=16 variants, Hq=9, Hkv=3 (SmolLM2's heads), D=64,
N in 256..4096, AtMan's common case of single-token suppression (factor 0.1, one key per
variant). Each (method, N) runs in a fresh process (peak RSS never mixes) with the thread count
pinned; every method's output is checked against the reference op on two variants before it is
timed. Rows:

- ``cpp paper`` / ``cpp log``: this package's C++ kernel;
- ``reference paper``: the plain PyTorch reference (materialised scores; skipped where its
  B*H*N^2 score matrix alone would pass the memory budget, and recorded as such);
- ``sdpa (no suppression)``: torch SDPA, causal, GQA: the floor;
- ``sdpa + float mask (log)``: SDPA with an additive [B, 1, N, N] mask of log f and -inf;
- ``flex score_mod (log)``: compiled FlexAttention, ``score + logf[b, kv_idx]``;
- ``row-min + sdpa D+1 (paper)``: row minima (query-chunked QK^T) then SDPA over the augmented
  head dim, q' = [q, m/scale], k' = [f k, 1 - f] (docs/semantics.md, equivalent forms).

Instruction-set level: the C++ kernel runs the level ``ATEN_CPU_CAPABILITY`` names (as ATen's
own kernels, SDPA among them, do), else the best the CPU has. ``--isa avx2 avx512`` measures each
level in turn: every cell's process gets ``ATEN_CPU_CAPABILITY=<level>`` and, so that MKL's
GEMMs (used by SDPA and the kernel alike) also run what such a host would run,
``MKL_ENABLE_INSTRUCTIONS`` (AVX2 / AVX512). Every CSV row records the kernel's level
(``isa``), ATen's (``aten_isa``) and the 1-minute load average (``--paired``: the median and
the maximum over the rounds, ``loadavg_1m`` / ``loadavg_1m_max``).

``--paired``: the kernel against SDPA, fairly under a shared machine's load: one process per
(level, N) times cpp paper, cpp log and SDPA interleaved, round after round (median of >= 3
rounds; fewer rounds at large N), and records each one's ratio to SDPA's median; fp16 and bf16
inputs of the kernel are timed in the same rounds at ``--dtype-lengths`` (ratio to fp32).
Writes ``attention_cpu_isa.{csv,png}``. Default lengths 512..8192.

On a CUDA machine ``--gpu`` times the Triton kernel against SDPA and FlexAttention in fp16.

Usage: ``python benchmarks/bench_attention.py [--lengths 256 512 ...] [--threads 2] [--isa
avx2 avx512] [--paired] [--gpu]``; ``--plot`` redraws the PNG from the CSV.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
# measure the checkout this script lives in (its atman_kernels and built extension), not
# whatever copy the environment has installed
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from _harness import (  # noqa: E402
    machine_stamp,
    peak_rss,
    reset_peak_rss,
    run_isolated,
    time_call,
    write_csv,
)
from _timing import Stopwatch, interleaved  # noqa: E402

from atman_kernels import suppressed_attention  # noqa: E402
from atman_kernels.ops import cpp_backend  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
B, HQ, HKV, D = 16, 9, 3, 64
METHODS_CPU = [
    "cpp paper",
    "cpp log",
    "reference paper",
    "sdpa (no suppression)",
    "sdpa + float mask (log)",
    "flex score_mod (log)",
    "row-min + sdpa D+1 (paper)",
]
METHODS_GPU = ["triton paper", "triton log", "sdpa (no suppression)", "flex score_mod (log)"]
REFERENCE_BUDGET = 8 * 2**30  # bytes of scores the reference may materialise
PAIRED_METHODS = ["cpp paper", "cpp log", "sdpa (no suppression)"]
MKL_LEVEL = {"avx2": "AVX2", "avx512": "AVX512"}  # MKL_ENABLE_INSTRUCTIONS per level


def isa_env(level: str | None) -> dict[str, str]:
    """Environment that makes a fresh process run instruction-set level ``level``."""
    if level is None:
        return {}
    env = {"ATEN_CPU_CAPABILITY": level}
    if level in MKL_LEVEL:
        env["MKL_ENABLE_INSTRUCTIONS"] = MKL_LEVEL[level]
    return env


def isa_columns() -> dict[str, str]:
    """The levels this process runs: the kernel's and ATen's."""
    try:
        mine = cpp_backend.isa()
    except RuntimeError:
        mine = "not built"
    return {"isa": mine, "aten_isa": torch.backends.cpu.get_cpu_capability().lower(),
            "mkl_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS", "")}


def make_case(n: int, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(n)
    q = torch.randn(B, HQ, n, D, generator=g).to(device, dtype)
    k = torch.randn(B, HKV, n, D, generator=g).to(device, dtype)
    v = torch.randn(B, HKV, n, D, generator=g).to(device, dtype)
    factors = torch.ones(B, n)
    factors[torch.arange(B), torch.arange(B) * (n // B)] = 0.1
    return q, k, v, factors.to(device)


def row_min_sdpa(q, k, v, factors, scale):
    """Paper mode from stock ops: exact row minima, then SDPA over head dim D + 1."""
    n = q.shape[2]
    group = q.shape[1] // k.shape[1]
    kx = k.repeat_interleave(group, 1)
    mins = torch.empty(q.shape[:3] + (1,), dtype=q.dtype, device=q.device)
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    for s in range(0, n, 256):
        scores = torch.matmul(q[:, :, s : s + 256], kx.transpose(-1, -2)) * scale
        scores.masked_fill_(future[s : s + 256], float("inf"))
        mins[:, :, s : s + 256] = scores.amin(-1, keepdim=True)
    f = factors[:, None, :, None].to(q.dtype)
    q_aug = torch.cat([q, mins / scale], dim=-1)
    k_aug = torch.cat([f * kx, (1 - f).expand(-1, kx.shape[1], -1, -1)], dim=-1)
    vx = v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q_aug, k_aug, vx, is_causal=True, scale=scale)


def make_method(name: str, q, k, v, factors):
    scale = D**-0.5
    n = q.shape[2]
    if name.startswith(("cpp", "triton", "reference")):
        backend, mode = name.split()
        return lambda: suppressed_attention(q, k, v, factors, causal=True, mode=mode,
                                            backend=backend)
    if name == "sdpa (no suppression)":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if name == "sdpa + float mask (log)":
        def sdpa_mask():
            causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            bias = torch.where(causal, torch.log(factors)[:, None, None, :].to(q.dtype),
                               float("-inf"))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
        return sdpa_mask
    if name == "flex score_mod (log)":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        logf = torch.log(factors).to(q.dtype)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + logf[b, kv_idx]

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        block_mask = create_block_mask(causal, None, None, n, n, device=str(q.device))
        compiled = torch.compile(flex_attention, dynamic=False)
        return lambda: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                enable_gqa=True)
    if name == "row-min + sdpa D+1 (paper)":
        return lambda: row_min_sdpa(q, k, v, factors, scale)
    raise ValueError(name)


def check(name: str, out, q, k, v, factors) -> float:
    """Max abs difference against the reference op on the first two variants."""
    mode = "log" if "log" in name else "paper"
    if name == "sdpa (no suppression)":
        factors = torch.ones_like(factors)
    ref = suppressed_attention(q[:2], k[:2], v[:2], factors[:2], causal=True, mode=mode,
                               backend="reference")
    return (out[:2].float() - ref.float()).abs().max().item()


def measure_one(row: dict) -> dict:
    torch.set_num_threads(row["threads"])
    n, name = row["n"], row["method"]
    dtype = getattr(torch, row["dtype"])
    if name.startswith("reference") and B * HQ * n * n * 4 > REFERENCE_BUDGET:
        need = B * HQ * n * n * 4 / 2**30
        return {**row, **isa_columns(), "status": f"not run: scores alone need {need:.1f} GiB"}
    row = {**row, **isa_columns()}
    q, k, v, factors = make_case(n, dtype, row["device"])
    fn = make_method(name, q, k, v, factors)

    with torch.inference_mode():
        with Stopwatch() as first_call:
            out = fn()
        first = first_call.seconds
        err = check(name, out, q, k, v, factors)
        tol = 1e-3 if dtype == torch.float32 else 2e-2
        if not err <= tol:
            return {**row, "status": f"wrong: max error {err:.2e} > {tol}"}
        del out
        seconds, reps, peak = time_call(fn)
    return {**row, "status": "ok", "median_s": f"{seconds:.6f}", "reps": reps,
            "peak_mib": f"{peak / 2**20:.1f}", "first_call_s": f"{first:.3f}",
            "max_err": f"{err:.2e}"}


def rounds_for(n: int) -> int:
    """Interleaved rounds per length: >= 3 (the median), more where a round is short."""
    return 9 if n <= 1024 else 5 if n <= 2048 else 3


def measure_paired(row: dict) -> list[dict]:
    """cpp paper, cpp log and SDPA (plus cpp at other dtypes) timed interleaved, round by round.

    Every method's output is checked against the reference op first; its peak RSS above the
    inputs is taken on its first (warm-up) call. Returns one row per method and dtype.
    """
    torch.set_num_threads(row["threads"])
    n = row["n"]
    dtypes = row["dtypes"]
    cases = {dt: make_case(n, getattr(torch, dt), "cpu") for dt in dtypes}
    entries = []  # (method, dtype, fn)
    for method in PAIRED_METHODS:
        entries.append((method, "float32", make_method(method, *cases["float32"])))
    for dt in dtypes:
        if dt != "float32":
            for method in ("cpp paper", "cpp log"):
                entries.append((method, dt, make_method(method, *cases[dt])))
    stats = {}
    with torch.inference_mode():
        for method, dt, fn in entries:
            base = reset_peak_rss()
            with Stopwatch() as first_call:
                out = fn()
            first = first_call.seconds
            peak = peak_rss() - base
            err = check(method, out, *cases[dt])
            tol = 1e-3 if dt == "float32" else 2e-2
            status = "ok" if err <= tol else f"wrong: max error {err:.2e} > {tol}"
            stats[method, dt] = {"status": status, "first_call_s": f"{first:.3f}",
                                 "max_err": f"{err:.2e}", "peak_mib": f"{peak / 2**20:.1f}"}
            del out
        timings = interleaved({(method, dt): fn for method, dt, fn in entries},
                              rounds=rounds_for(n))
    loads = list(next(iter(timings.values())).loads[:-1])  # before each round
    rounds = {key: list(t.times) for key, t in timings.items()}
    medians = {key: statistics.median(times) for key, times in rounds.items()}
    sdpa = medians["sdpa (no suppression)", "float32"]
    rows = []
    for (method, dt), st in stats.items():
        median = medians[method, dt]
        fp32 = medians.get((method, "float32")) if dt != "float32" else None
        rows.append({
            **{k: v for k, v in row.items() if k not in ("dtypes", "one_paired")},
            "method": method, "dtype": dt, **isa_columns(), **st,
            "median_s": f"{median:.6f}", "reps": len(rounds[method, dt]),
            "ratio_to_sdpa": f"{median / sdpa:.3f}",
            "ratio_to_fp32": f"{median / fp32:.3f}" if fp32 else "",
            "round_s": " ".join(f"{t:.4f}" for t in rounds[method, dt]),
            "loadavg_1m": f"{statistics.median(loads):.1f}",
            "loadavg_1m_max": f"{max(loads):.1f}",
        })
    return rows


def plot_paired(csv_path: Path, png_path: Path) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in csv.DictReader(open(csv_path))
            if r["status"] == "ok" and r["dtype"] == "float32"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"avx512": "-", "avx2": "--", "default": ":"}
    for isa in dict.fromkeys(r["isa"] for r in rows):
        for method in PAIRED_METHODS:
            sel = [r for r in rows if r["method"] == method and r["isa"] == isa]
            if not sel:
                continue
            ns = [int(r["n"]) for r in sel]
            label = f"{method} [{isa}]"
            axes[0].plot(ns, [float(r["median_s"]) * 1e3 for r in sel], "o" + styles.get(isa, "-"),
                         label=label)
            if method != "sdpa (no suppression)":
                axes[1].plot(ns, [float(r["ratio_to_sdpa"]) for r in sel],
                             "o" + styles.get(isa, "-"), label=label)
    axes[1].axhline(1.1, color="red", lw=0.8, label="target 1.1x")
    axes[1].axhline(1.0, color="gray", lw=0.5)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("median time per call [ms]")
    axes[1].set_ylabel("time / SDPA's time (same level, interleaved)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length N")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    stamp = rows[0] if rows else {}
    loads = sorted(float(r["loadavg_1m"]) for r in rows) or [0.0]
    fig.suptitle(f"C++ op vs SDPA per ISA level, causal fp32, B={B} Hq={HQ} Hkv={HKV} D={D}; "
                 f"{stamp.get('device', '')}, {stamp.get('threads', '?')} threads, "
                 f"load {loads[0]:.1f}-{loads[-1]:.1f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


def plot(csv_path: Path, png_path: Path) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in csv.DictReader(open(csv_path)) if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        ns = [int(r["n"]) for r in sel]
        axes[0].plot(ns, [float(r["median_s"]) * 1e3 for r in sel], "o-", label=method)
        axes[1].plot(ns, [max(float(r["peak_mib"]), 0.1) for r in sel], "o-", label=method)
    stamp = rows[0] if rows else {}
    labels = ["median time per call [ms]", "peak RSS above inputs [MiB]"]
    for ax, label in zip(axes, labels, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"suppressed attention, causal fp32, B={B} Hq={HQ} Hkv={HKV} D={D}; "
                 f"{stamp.get('device', '')}, {stamp.get('threads', '?')} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="default: 256..4096; with --paired 512..8192")
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--isa", nargs="+", default=None, choices=["default", "avx2", "avx512"],
                    help="instruction-set levels to measure (ATEN_CPU_CAPABILITY per process); "
                    "default: the best this CPU runs")
    ap.add_argument("--paired", action="store_true",
                    help="cpp vs SDPA interleaved per (level, N) -> attention_cpu_isa.csv")
    ap.add_argument("--dtype-lengths", type=int, nargs="*", default=[1024, 4096],
                    help="--paired: lengths at which fp16 / bf16 inputs are timed too")
    ap.add_argument("--gpu", action="store_true", help="time the Triton kernel on CUDA (fp16)")
    ap.add_argument("--plot", action="store_true", help="only redraw the PNG from the CSV")
    args = ap.parse_args()
    if args.one:
        row = json.loads(args.one)
        if row.get("one_paired"):
            print(json.dumps({"paired_rows": measure_paired(row)}), flush=True)
        else:
            print(json.dumps(measure_one(row)), flush=True)
        return
    tag = "gpu" if args.gpu else "cpu_isa" if args.paired else "cpu"
    csv_path, png_path = RESULTS / f"attention_{tag}.csv", RESULTS / f"attention_{tag}.png"
    draw = plot_paired if args.paired else plot
    if not args.plot:
        if args.gpu and not torch.cuda.is_available():
            sys.exit("--gpu needs a CUDA device")
        torch.set_num_threads(args.threads)
        lengths = args.lengths or ([512, 1024, 2048, 4096, 8192] if args.paired
                                   else [256, 512, 1024, 2048, 4096])
        levels = args.isa or [None]
        rows = []
        for n in lengths:
            for level in levels:
                env_before = dict(os.environ)
                os.environ.update(isa_env(level))
                try:
                    rows += measure_cells(args, n)
                finally:
                    os.environ.clear()
                    os.environ.update(env_before)
                write_csv(csv_path, rows)
    draw(csv_path, png_path)
    print(f"wrote {csv_path} and {png_path}")


def measure_cells(args, n: int) -> list[dict]:
    """The cells of one length at the level the environment names, each in a fresh process."""
    base = {"n": n, "batch": B, "heads_q": HQ, "heads_kv": HKV, "head_dim": D,
            "device": "cuda" if args.gpu else "cpu", "threads": args.threads}
    if args.paired:
        dtypes = ["float32"] + (["bfloat16", "float16"] if n in args.dtype_lengths else [])
        row = {**base, "method": "paired", "dtype": "float32", "dtypes": dtypes,
               "one_paired": True}
        res = run_isolated(Path(__file__), row, timeout=3600)
        results = res.get("paired_rows", [res])
    else:
        methods = args.methods or (METHODS_GPU if args.gpu else METHODS_CPU)
        results = []
        for method in methods:
            row = {**base, "method": method, "dtype": "float16" if args.gpu else "float32"}
            results.append(run_isolated(Path(__file__), row))
    stamp = machine_stamp()
    out = []
    for res in results:
        res.update({k: v for k, v in stamp.items() if k not in ("threads", "loadavg_1m")
                    or k not in res})
        out.append(res)
        print(f"N={n:5d} {res.get('isa', '?'):7s} {res['method']:24s} {res['dtype']:9s} "
              f"{res['status'][:40]:8s} {res.get('median_s', ''):>10s} s  "
              f"x{res.get('ratio_to_sdpa', '')} sdpa  load {res.get('loadavg_1m', '')}",
              flush=True)
    return out


if __name__ == "__main__":
    main()
