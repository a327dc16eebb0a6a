"""One command for a CUDA machine: install, run the CUDA tests, sweep, explain (``make gpu-check``).

For a machine that already has torch (CUDA build), triton, transformers and pytest, and no
network. Steps, each recorded in ``<out>/gpu_check_summary.json``; a failing step does not
stop the later ones, and the exit code is non-zero if any failed:

1. ``install``: ``pip install --no-deps --no-build-isolation -e .`` with
   ``ATMAN_SKIP_CPP_BUILD=1`` (the C++ extension is the CPU backend: irrelevant here).
2. ``tests``: ``pytest -rs tests/test_triton.py``: on CUDA it runs the compiled kernel against
   the float64 reference (fp16, bf16, fp32; both modes; GQA/MQA; odd lengths; padding; causal
   with Nq < Nk; whole and diagonal tiles; shared and per-variant q/k) and the tests that
   skip without CUDA (the drop-in and the explainer on small random Llama / GPT-2 on cuda).
3. ``sweep``: Triton paper / log against SDPA's flash backend (no suppression: the floor),
   compiled FlexAttention with log mode as a score_mod, and the reference op; B in {16, 64},
   N 512..16384, D in {64, 128} (H = 2048 / D heads), fp16 and bf16, causal, single-token
   suppression (one key per variant at 0.1), q/k/v per variant. Every cell is checked
   against another method before it is timed, timed with CUDA events (warm-up, then the
   median of repeats, synchronised), and its peak device memory above the inputs read from
   ``torch.cuda.max_memory_allocated``. A cell that runs out of memory, or that the
   reference cannot hold (its scores alone), becomes a row with its status, never a crash.
   -> ``benchmarks/results/attention_gpu.csv`` and ``.png``, stamped with the GPU's name.
4. ``explain``: a random-weight 1.1B Llama (TinyLlama-1.1B's shape: hidden 2048, 22 layers,
   32 query / 4 kv heads, vocab 32000; bf16), a 2048-token random prompt: peak device memory
   and time of a plain forward against an AtMan explanation (token granularity) at several
   variant batch sizes.
   -> ``benchmarks/results/explain_gpu.csv``.

TFLOP/s counts 4 * D flops per visible (query, key) pair (QK^T and PV), the convention of
flash-attention's benchmarks, for every method alike: paper mode's extra QK^T pass for the
row minima is work it does on top, not counted.

``--cpu-smoke`` runs steps 3 and 4 at tiny sizes on the CPU (the Triton kernel under
``TRITON_INTERPRET=1``, eager FlexAttention, SDPA's default backend), so the CSV, plot and
failure paths are exercised by ``tests/test_gpu_check.py`` on machines without a GPU; its rows
say ``cpu-smoke`` and are no measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HIDDEN = 2048  # heads = HIDDEN // head_dim, as in a 1-2B model
SUPPRESSED_FACTOR = 0.1
METHODS = ("triton paper", "triton log", "sdpa flash (no suppression)",
           "flex score_mod (log)", "reference paper")  # fmt: skip
GPU_SIZES = dict(batches=(16, 64), lengths=(512, 1024, 2048, 4096, 8192, 16384),
                 head_dims=(64, 128), dtypes=("float16", "bfloat16"))  # fmt: skip
SMOKE_SIZES = dict(batches=(2,), lengths=(40, 70), head_dims=(16,), dtypes=("float32",))
# The reference materialises B x H x N x N fp32 scores (and as much again for the weights).
REFERENCE_LIMIT_BYTES = 24 * 2**30


def install_command() -> tuple[list[str], dict[str, str]]:
    """The editable install without dependencies or build isolation, no C++ build."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."]
    return cmd, {"ATMAN_SKIP_CPP_BUILD": "1"}


def test_command() -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_triton.py"]


def _run_step(cmd: list[str], extra_env: dict[str, str] | None = None) -> dict:
    env = dict(os.environ, **(extra_env or {}))
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    tail = (done.stdout + done.stderr)[-4000:]
    print(tail, flush=True)
    return dict(command=" ".join(cmd), returncode=done.returncode,
                seconds=round(time.perf_counter() - start, 1), output_tail=tail)  # fmt: skip


# ----------------------------------------------------------------------------- measuring
def stamp(device: str) -> dict[str, str]:
    from _harness import cpu_model, gpu_name, machine_stamp

    name = gpu_name() if device == "cuda" else f"CPU {cpu_model()}"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {**machine_stamp(), "device": name, "triton": triton_version}


def is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def time_median(fn: Callable[[], object], device: str, *, warmup: int = 2,
                min_reps: int = 5, budget_s: float = 1.0) -> tuple[float, int]:  # fmt: skip
    """(median seconds, repeats): CUDA events around every call on cuda (synchronised before
    reading), perf_counter with nothing asynchronous on the CPU."""
    import torch

    for _ in range(warmup):
        fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < min_reps or (spent < budget_s and len(times) < 100):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            seconds = time.perf_counter() - t0
        times.append(seconds)
        spent += seconds
    times.sort()
    return times[len(times) // 2], len(times)


def visible_pairs(len_q: int, len_k: int) -> int:
    """(query, key) pairs a causal, bottom-right aligned row set sees."""
    off = len_k - len_q
    return sum(max(0, min(len_k, i + off + 1)) for i in range(len_q))


def make_case(batch: int, heads: int, n: int, head_dim: int, dtype, device: str, seed: int = 0):
    """Per-variant q, k, v [B, H, N, D] and single-token factors [B, N] (one key at 0.1)."""
    import torch

    # Drawn on the device itself: at B=64, N=16384 each tensor holds 2^31 numbers.
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, heads, n, head_dim)
    q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    factors = torch.ones(batch, n, device=device)
    where = torch.randint(0, n, (batch,), generator=g, device=device)
    factors[torch.arange(batch, device=device), where] = SUPPRESSED_FACTOR
    return q, k, v, factors


def make_method(name: str, q, k, v, factors, device: str) -> Callable[[], object]:
    import torch
    import torch.nn.functional as F

    from atman_kernels import suppressed_attention

    if name.startswith(("triton", "reference")):
        backend, mode = name.split()
        return lambda: suppressed_attention(q, k, v, factors, causal=True, mode=mode,
                                            backend=backend)  # fmt: skip
    if name == "sdpa flash (no suppression)":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.FLASH_ATTENTION] if device == "cuda" else [SDPBackend.MATH]

        def sdpa():
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return sdpa
    if name == "flex score_mod (log)":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        log_f = torch.log(factors).to(torch.float32)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + log_f[b, kv_idx]

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        n = q.shape[2]
        block_mask = create_block_mask(causal, None, None, n, n, device=str(q.device))
        # Compiled on cuda (what a user would run); eager on the CPU smoke run (no compiler).
        flex = torch.compile(flex_attention, dynamic=False) if device == "cuda" else flex_attention
        return lambda: flex(q, k, v, score_mod=score_mod, block_mask=block_mask)
    raise ValueError(f"unknown method {name!r}")


def _max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def measure_cell(name: str, case: dict, device: str, make: Callable = make_method) -> dict:
    """Check and time one method on one case; every failure becomes the row's status."""
    import torch

    batch, heads, n, hd = case["batch"], case["heads"], case["len"], case["head_dim"]
    dtype = getattr(torch, case["dtype"])
    row = dict(case, method=name, status="ok", median_ms="", reps="", tflops="",
               peak_extra_mib="", checked_against="", max_abs_diff="")  # fmt: skip
    pairs = visible_pairs(n, n)
    if name.startswith("reference"):
        need = 2 * batch * heads * n * n * 4
        if need > case.get("reference_limit", REFERENCE_LIMIT_BYTES):
            row["status"] = f"skipped: scores need {need / 2**30:.0f} GiB"
            return row
    try:
        if device == "cuda":
            torch.cuda.empty_cache()
        q, k, v, factors = make_case(batch, heads, n, hd, dtype, device, seed=n + hd)
        fn = make(name, q, k, v, factors, device)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
            row["peak_extra_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        check = _check(name, out, q, k, v, factors, device, case)
        row.update(check)
        if check.get("status", "ok") != "ok":
            return row
        del out
        seconds, reps = time_median(fn, device, budget_s=case.get("budget_s", 1.0),
                                    warmup=case.get("warmup", 2),
                                    min_reps=case.get("min_reps", 5))
        row.update(median_ms=round(seconds * 1e3, 4), reps=reps,
                   tflops=round(4 * hd * pairs * batch * heads / seconds / 1e12, 2))  # fmt: skip
    except Exception as err:  # noqa: BLE001 - every failure is recorded, the sweep goes on
        row["status"] = "oom" if is_oom(err) else f"error: {type(err).__name__}: {err}"[:300]
        if not is_oom(err):
            traceback.print_exc()
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def _check(name, out, q, k, v, factors, device, case) -> dict:
    """Compare one method's output with an independent one before timing it.

    Triton against the reference op where the reference fits, else the log-mode kernel
    against FlexAttention (same function, independent code) and paper mode against log mode
    run on its own input with factors 1 (both must equal plain attention then: checks the
    row-minimum path at sizes the reference cannot hold). SDPA and Flex against the reference
    or Triton. Tolerance: 2e-2 absolute (unit-variance values, fp16/bf16 outputs)."""
    import torch

    from atman_kernels import suppressed_attention

    small = 2 * q.shape[0] * q.shape[1] * q.shape[2] ** 2 * 4 <= case.get(
        "reference_limit", REFERENCE_LIMIT_BYTES
    )
    if name.startswith("reference"):
        return dict(checked_against="-", max_abs_diff="")
    mode = "log" if "log" in name else "paper"
    suppress = factors if "no suppression" not in name else None
    if small:
        ref = suppressed_attention(q, k, v, suppress, causal=True, mode=mode, backend="reference")
        against = "reference"
    elif name == "triton paper":
        ones = torch.ones_like(factors)
        out = suppressed_attention(q, k, v, ones, causal=True, mode="paper", backend="triton")
        ref = suppressed_attention(q, k, v, None, causal=True, backend="triton")
        against = "triton, factors 1 vs none"
    elif name == "flex score_mod (log)" or name.startswith("sdpa"):
        ref = suppressed_attention(q, k, v, suppress, causal=True, mode="log", backend="triton")
        against = "triton log"
    else:  # triton log at a size the reference cannot hold
        ref = make_method("flex score_mod (log)", q, k, v, factors, device)()
        against = "flex score_mod (log)"
    diff = _max_diff(out, ref)
    status = "ok" if diff <= 2e-2 and bool(torch.isfinite(out).all()) else f"wrong: {diff:.3g}"
    return dict(checked_against=against, max_abs_diff=f"{diff:.2e}", status=status)


def sweep(device: str, sizes: dict, methods: tuple[str, ...], out_csv: Path,
          out_png: Path, budget_s: float = 1.0, reference_limit: int = REFERENCE_LIMIT_BYTES,
          make: Callable = make_method, min_reps: int = 5) -> list[dict]:  # fmt: skip
    import itertools

    info = stamp(device)
    rows = []
    for dtype, hd, batch, n in itertools.product(
        sizes["dtypes"], sizes["head_dims"], sizes["batches"], sizes["lengths"]
    ):
        heads = max(1, HIDDEN // hd) if device == "cuda" else 2
        knobs = dict(budget_s=budget_s, reference_limit=reference_limit, min_reps=min_reps,
                     warmup=min(2, min_reps))  # fmt: skip
        case = dict(dtype=dtype, head_dim=hd, batch=batch, heads=heads, len=n, causal=True,
                    **knobs)  # fmt: skip
        for name in methods:
            row = measure_cell(name, case, device, make=make)
            for key in knobs:
                row.pop(key, None)
            rows.append({**info, **row})
            print(f"{dtype} D={hd} B={batch} N={n} {name:28s} {row['status']:8s} "
                  f"{row['median_ms']} ms {row['tflops']} TFLOP/s", flush=True)  # fmt: skip
            write_csv(out_csv, rows)  # after every row: a crash keeps what was measured
    plot(rows, out_png, title=f"{info['device']} ({info['date']})")
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    fields: list[str] = []
    for r in rows:
        fields += [key for key in r if key not in fields]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: Path, title: str) -> bool:
    """Time against N per method, one panel per (dtype, D, B). False if matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot written", flush=True)
        return False
    panels = sorted({(r["dtype"], r["head_dim"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (dtype, hd, batch) in zip(axes[0], panels, strict=True):
        for name in dict.fromkeys(r["method"] for r in rows):
            key = (dtype, hd, batch, name)
            pts = [(r["len"], r["median_ms"]) for r in rows
                   if (r["dtype"], r["head_dim"], r["batch"], r["method"]) == key
                   and r["status"] == "ok"]  # fmt: skip
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="N (tokens)", ylabel="median ms",
               title=f"{dtype} D={hd} B={batch}")  # fmt: skip
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"suppressed attention, causal: {title}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------- explain
def explain_memory(device: str, tokens: int, batch_sizes: tuple[int, ...], out_csv: Path,
                   tiny: bool = False) -> list[dict]:  # fmt: skip
    """Peak memory and time: plain forward against AtMan explanations of one prompt."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from atman_kernels.explain import AtManExplainer

    if tiny:
        config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=tokens + 8)  # fmt: skip
        dtype = torch.float32
    else:
        config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                             num_hidden_layers=22, num_attention_heads=32,
                             num_key_value_heads=4, max_position_embeddings=tokens + 8)  # fmt: skip
        dtype = torch.bfloat16
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (tokens,), generator=g).tolist()
    target = torch.randint(0, config.vocab_size, (4,), generator=g).tolist()
    info = stamp(device)
    rows = []

    def measure(label: str, fn: Callable[[], object], **extra) -> None:
        row = dict(info, what=label, params_m=round(params / 1e6), tokens=tokens, status="ok",
                   seconds="", peak_extra_mib="", **extra)  # fmt: skip
        try:
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
                row["peak_extra_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20)
            row["seconds"] = round(time.perf_counter() - t0, 3)
        except Exception as err:  # noqa: BLE001 - recorded, the next row still runs
            row["status"] = "oom" if is_oom(err) else f"error: {type(err).__name__}: {err}"[:300]
        rows.append(row)
        print(row, flush=True)
        write_csv(out_csv, rows)

    def forward():
        with torch.inference_mode():
            model(torch.tensor([ids + target[:-1]], device=device))

    measure("plain forward (batch 1)", forward)
    for batch in batch_sizes:
        explainer = AtManExplainer(model, conceptual_threshold=None, batch_size=batch,
                                   progress=False)  # fmt: skip
        measure(f"atman explain (batch {batch})", lambda e=explainer: e.explain(ids, target),
                batch_size=batch)  # fmt: skip
    plain = rows[0]["peak_extra_mib"]
    for row in rows[1:]:
        if plain and row["peak_extra_mib"] != "":
            row["memory_vs_plain_forward"] = round(row["peak_extra_mib"] / plain, 2)
    write_csv(out_csv, rows)
    return rows


# ---------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny sizes on the CPU (Triton interpreted): exercises the code "
                             "paths, measures nothing")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["install", "tests", "sweep", "explain"])  # fmt: skip
    parser.add_argument("--lengths", type=int, nargs="*", help="override N values")
    parser.add_argument("--batches", type=int, nargs="*", help="override B values")
    parser.add_argument("--head-dims", type=int, nargs="*", help="override D values")
    parser.add_argument("--dtypes", nargs="*", help="override dtypes (float16 bfloat16 ...)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--budget-s", type=float, default=1.0, help="timing seconds per cell")
    parser.add_argument("--explain-tokens", type=int, default=2048)
    parser.add_argument("--explain-batches", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        # Before anything imports triton: the kernel runs in the interpreter on CPU tensors.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        skip = set(args.skip) | {"install", "tests"}
        sizes = dict(SMOKE_SIZES)
    else:
        skip = set(args.skip)
        sizes = dict(GPU_SIZES)
    for key in ("lengths", "batches", "head_dims", "dtypes"):
        if getattr(args, key):
            sizes[key] = tuple(getattr(args, key))
    install, install_env = install_command()
    plan = {
        "install": " ".join(f"{k}={v}" for k, v in install_env.items()) + " " + " ".join(install),
        "tests": " ".join(test_command()),
        "sweep": sizes,
        "explain": dict(tokens=args.explain_tokens, batches=args.explain_batches),
        "skip": sorted(skip),
        "out": str(args.out),
    }
    print(json.dumps(plan, indent=1, default=str), flush=True)
    if args.dry_run:
        return 0

    import torch

    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or use --cpu-smoke", file=sys.stderr)
        return 2
    summary: dict = {"plan": plan, "steps": {}}
    failed = False
    if "install" not in skip:
        summary["steps"]["install"] = _run_step(install, install_env)
        failed |= summary["steps"]["install"]["returncode"] != 0
    if "tests" not in skip:
        summary["steps"]["tests"] = _run_step(test_command())
        failed |= summary["steps"]["tests"]["returncode"] != 0
    suffix = "_cpu_smoke" if args.cpu_smoke else "_gpu"
    if "sweep" not in skip:
        rows = sweep(device, sizes, tuple(args.methods), args.out / f"attention{suffix}.csv",
                     args.out / f"attention{suffix}.png", budget_s=args.budget_s,
                     min_reps=1 if args.cpu_smoke else 5)  # fmt: skip
        bad = [r for r in rows if r["status"].startswith(("wrong", "error"))]
        summary["steps"]["sweep"] = dict(rows=len(rows), wrong_or_error=len(bad))
        failed |= bool(bad)
    if "explain" not in skip:
        tokens = 16 if args.cpu_smoke else args.explain_tokens
        batches = (1, 4) if args.cpu_smoke else tuple(args.explain_batches)
        rows = explain_memory(device, tokens, batches, args.out / f"explain{suffix}.csv",
                              tiny=args.cpu_smoke)  # fmt: skip
        bad = [r for r in rows if r["status"] != "ok"]
        summary["steps"]["explain"] = dict(rows=len(rows), failed=len(bad))
        failed |= bool(bad)
    summary["failed"] = failed
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu_check_summary{suffix}.json").write_text(json.dumps(summary, indent=1))
    print("FAILED" if failed else "gpu-check passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
