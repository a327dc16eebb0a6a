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

On a CUDA machine ``--gpu`` times the Triton kernel against SDPA and FlexAttention in fp16.

Usage: ``python benchmarks/bench_attention.py [--lengths 256 512 ...] [--threads 2] [--gpu]``;
``--plot`` redraws the PNG from the CSV.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine_stamp, run_isolated, time_call, write_csv  # noqa: E402

from atman_kernels import suppressed_attention  # noqa: E402

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
        return {**row, "status": f"not run: scores alone need {need:.1f} GiB"}
    q, k, v, factors = make_case(n, dtype, row["device"])
    fn = make_method(name, q, k, v, factors)
    import time

    t0 = time.perf_counter()
    with torch.inference_mode():
        out = fn()
        first = time.perf_counter() - t0
        err = check(name, out, q, k, v, factors)
        tol = 1e-3 if dtype == torch.float32 else 2e-2
        if not err <= tol:
            return {**row, "status": f"wrong: max error {err:.2e} > {tol}"}
        del out
        seconds, reps, peak = time_call(fn)
    return {**row, "status": "ok", "median_s": f"{seconds:.6f}", "reps": reps,
            "peak_mib": f"{peak / 2**20:.1f}", "first_call_s": f"{first:.3f}",
            "max_err": f"{err:.2e}"}


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
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gpu", action="store_true", help="time the Triton kernel on CUDA (fp16)")
    ap.add_argument("--plot", action="store_true", help="only redraw the PNG from the CSV")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one))), flush=True)
        return
    tag = "gpu" if args.gpu else "cpu"
    csv_path, png_path = RESULTS / f"attention_{tag}.csv", RESULTS / f"attention_{tag}.png"
    if not args.plot:
        if args.gpu and not torch.cuda.is_available():
            sys.exit("--gpu needs a CUDA device")
        torch.set_num_threads(args.threads)
        methods = args.methods or (METHODS_GPU if args.gpu else METHODS_CPU)
        rows = []
        for n in args.lengths:
            for method in methods:
                row = {"method": method, "n": n, "batch": B, "heads_q": HQ, "heads_kv": HKV,
                       "head_dim": D, "dtype": "float16" if args.gpu else "float32",
                       "device": "cuda" if args.gpu else "cpu", "threads": args.threads}
                res = run_isolated(Path(__file__), row)
                stamp = machine_stamp()
                res.update({k: v for k, v in stamp.items() if k != "threads"})
                rows.append(res)
                print(f"N={n:5d} {method:28s} {res['status']:8s} "
                      f"{res.get('median_s', ''):>10s} s  {res.get('peak_mib', ''):>9s} MiB",
                      flush=True)
                write_csv(csv_path, rows)
    plot(csv_path, png_path)
    print(f"wrote {csv_path} and {png_path}")


if __name__ == "__main__":
    main()
