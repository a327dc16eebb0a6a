"""Ahead-of-time compile of the Triton kernel for sm_80 and sm_90, checked from the SASS.

No GPU is needed: ``triton_backend.compile_kernel`` compiles exactly what the launcher would
launch (same constexprs, same config table), and the cubin is read back with ``cuobjdump``
from the triton wheel (sm_86 is checked too, for its smaller shared memory). For every head
dim bucket, dtype and mode the tests demand tensor-core MMA instructions (HMMA on sm_80/86;
HGMMA or HMMA on sm_90, with the TF32 / BF16 variant the dtype implies), no register spill
(STACK and LOCAL 0, no LDL/STL), and shared memory within the architecture's limit.

Triton's interpreter (``TRITON_INTERPRET=1``, set for the CPU tests) replaces the language
builtins, which breaks ``triton.compile``; the compiles therefore run in subprocesses (one per
architecture, in parallel) with the variable removed. Each subprocess is this file run as a
script; it prints one JSON line per config.

Default: every (head dim, dtype) per architecture in the heaviest variant (paper mode, causal,
factors, padding mask), plus log mode and plain attention for a few head dims. Set
``ATMAN_AOT_FULL=1`` for the full matrix (both modes x causal on/off x mask on/off).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest

ARCHS = (80, 90, 86)
# sm_86 (also standing for sm_89: 99 KB of shared memory) only checks the head dims whose
# tiles come near that limit, unless the full matrix is asked for.
ARCH_HEAD_DIMS = {80: (16, 32, 40, 64, 80, 128, 256), 90: (16, 32, 40, 64, 80, 128, 256),
                  86: (128, 256)}  # fmt: skip
HEAD_DIMS = (16, 32, 40, 64, 80, 128, 256)
DTYPES = ("float16", "bfloat16", "float32")
# Largest dynamic shared memory per block (bytes): sm_80 163 KB, sm_90 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 86: 99 * 1024}
# The MMA mnemonic each dtype must produce: tensor-core HMMA/HGMMA with this type suffix.
MMA_KIND = {"float16": r"\.F32(\s|$)", "bfloat16": r"\.F32\.BF16", "float32": r"\.F32\.TF32"}
FULL = os.environ.get("ATMAN_AOT_FULL", "") not in ("", "0")


def configs(arch: int) -> list[dict]:
    """The (head_dim, dtype, mode, causal, has_factors, has_mask) configs compiled for arch."""
    out = []
    heavy = dict(mode="paper", causal=True, has_factors=True, has_mask=True)
    head_dims = HEAD_DIMS if FULL else ARCH_HEAD_DIMS[arch]
    for hd, dt in itertools.product(head_dims, DTYPES):
        out.append(dict(arch=arch, head_dim=hd, dtype=dt, **heavy))
    if FULL:
        for hd, dt, mode, causal, mask in itertools.product(
            HEAD_DIMS, DTYPES, ("paper", "log"), (True, False), (True, False)
        ):
            cfg = dict(arch=arch, head_dim=hd, dtype=dt, mode=mode, causal=causal,
                       has_factors=True, has_mask=mask)  # fmt: skip
            if cfg not in out:
                out.append(cfg)
        for hd, dt in itertools.product(HEAD_DIMS, DTYPES):
            out.append(dict(arch=arch, head_dim=hd, dtype=dt, mode="paper", causal=False,
                            has_factors=False, has_mask=False))  # fmt: skip
    elif arch in (80, 90):
        for hd in (64, 128):
            out.append(dict(arch=arch, head_dim=hd, dtype="float16", mode="log", causal=True,
                            has_factors=True, has_mask=False))  # fmt: skip
            out.append(dict(arch=arch, head_dim=hd, dtype="bfloat16", mode="paper", causal=False,
                            has_factors=False, has_mask=False))  # fmt: skip
    return out


def config_id(cfg: dict) -> str:
    factors = cfg["mode"] if cfg["has_factors"] else "plain"
    flags = ("-causal" if cfg["causal"] else "") + ("-mask" if cfg["has_mask"] else "")
    return f"sm{cfg['arch']}-d{cfg['head_dim']}-{cfg['dtype']}-{factors}{flags}"


# --------------------------------------------------------------------------- subprocess side
def _inspect(cfg: dict, bindir: str) -> dict:
    """Compile one config; return its resources and SASS facts."""
    import torch

    from atman_kernels.ops import triton_backend

    args = dict(cfg, dtype=getattr(torch, cfg["dtype"]))
    start = time.perf_counter()
    compiled = triton_backend.compile_kernel(**args)
    seconds = time.perf_counter() - start
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(compiled.asm["cubin"])
    try:
        usage = _tool(bindir, "--dump-resource-usage", fh.name)
        sass = _tool(bindir, "-sass", fh.name)
    finally:
        os.unlink(fh.name)
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"no resource usage line in cuobjdump output:\n{usage}")
    regs, stack, static_shared, local = (int(x) for x in found.groups())
    mma = re.findall(r"\b(H?G?MMA\.[\w.]+)", sass)
    return dict(
        cfg,
        seconds=round(seconds, 2),
        regs=regs,
        stack=stack,
        local=local,
        shared=int(compiled.metadata.shared) + static_shared,
        mma=sorted(set(mma)),
        n_mma=len(mma),
        n_local_ops=len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        config=vars(triton_backend.kernel_config(cfg["head_dim"], args["dtype"], cfg["arch"])),
    )


def _tool(bindir: str, *args: str) -> str:
    done = subprocess.run(
        [os.path.join(bindir, "cuobjdump"), *args], capture_output=True, text=True, check=True
    )
    return done.stdout


def _main(arch: int) -> None:
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for cfg in configs(arch):
        print(json.dumps(_inspect(cfg, bindir)), flush=True)


# ------------------------------------------------------------------------------- test side
@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    """Compile every config (one subprocess per architecture, in parallel) once per module."""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a triton 3.9 warning
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(arch)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for arch in ARCHS
    ]
    results: dict[str, dict] = {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=1200)
        assert proc.returncode == 0, f"ahead-of-time compile failed:\n{stderr[-4000:]}"
        for line in stdout.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                results[config_id(row)] = row
    return results


ALL_CONFIGS = [cfg for arch in ARCHS for cfg in configs(arch)]


@pytest.mark.slow
@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=config_id)
def test_uses_tensor_cores_without_spills(cfg, compiled):
    row = compiled[config_id(cfg)]
    where = f"{config_id(cfg)} {row['config']}"
    mma_ops = ("HMMA",) if cfg["arch"] < 90 else ("HGMMA", "HMMA")
    kind = re.compile(MMA_KIND[cfg["dtype"]])
    tensor_core = [op for op in row["mma"] if op.split(".")[0] in mma_ops and kind.search(op + " ")]
    assert tensor_core, f"{where}: no {mma_ops} {MMA_KIND[cfg['dtype']]} in SASS: {row['mma']}"
    assert row["stack"] == 0 and row["local"] == 0, (
        f"{where}: register spill (STACK {row['stack']}, LOCAL {row['local']}, {row['regs']} regs)"
    )
    assert row["n_local_ops"] == 0, f"{where}: {row['n_local_ops']} LDL/STL instructions"
    assert row["shared"] <= SHARED_LIMIT[cfg["arch"]], (
        f"{where}: {row['shared']} bytes of shared memory > {SHARED_LIMIT[cfg['arch']]}"
    )


@pytest.mark.slow
def test_every_head_dim_and_dtype_compiled_per_arch(compiled):
    for arch, hd, dt in itertools.product((80, 90), HEAD_DIMS, DTYPES):
        assert any(
            r["arch"] == arch and r["head_dim"] == hd and r["dtype"] == dt
            for r in compiled.values()
        ), f"sm_{arch} d{hd} {dt} was not compiled"
    assert {r["mode"] for r in compiled.values() if r["has_factors"]} == {"paper", "log"}


if __name__ == "__main__":
    _main(int(sys.argv[1]))
