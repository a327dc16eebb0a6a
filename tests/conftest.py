"""Test session set-up.

No machine of this project has a GPU: the Triton kernel runs under its interpreter, which reads
TRITON_INTERPRET when triton is imported, so it is set here before any test module can import
triton. On a CUDA machine the variable is left alone and the kernel runs for real.

Tests marked ``needs_cpp`` need the built C++ extension (``atman_kernels._C``). Without it they
are skipped with the import error as the reason, except under CI (``CI=true``, as ``.ci/run``
is run): there a missing extension means the build broke, and each such test fails.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "needs_cpp: needs the C++ extension; skipped without it, a failure when CI=true",
    )


def cpp_extension_gate(error: str | None, env: Mapping[str, str] = os.environ) -> None:
    """Return when the C++ extension is loaded (``error`` None). Without it: fail when
    ``env["CI"]`` is "true" (CI must test the kernel it built), else skip naming ``error``."""
    if error is None:
        return
    if env.get("CI") == "true":
        pytest.fail(f"CI=true and the C++ extension is missing (a skip would hide it): {error}",
                    pytrace=False)  # fmt: skip
    pytest.skip(f"C++ extension not built: {error}")


@pytest.hookimpl(tryfirst=True)  # before skipif marks that read the missing extension's ISAs
def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_cpp") is not None:
        from atman_kernels.ops import cpp_backend

        cpp_extension_gate(cpp_backend.extension_error())
