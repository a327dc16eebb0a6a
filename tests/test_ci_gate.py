"""A missing C++ extension: skipped with the reason locally, a failure under CI=true.

The gate lives in tests/conftest.py (``needs_cpp`` marker, used by test_cpp.py and
test_softcap_sinks.py). The extension is "removed" by planting an import error in
``cpp_backend`` (what it records when ``atman_kernels._C`` cannot be imported).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import cpp_extension_gate

ROOT = Path(__file__).resolve().parents[1]
PLANTED = "planted: atman_kernels._C is not built"


def test_gate_passes_a_built_extension_even_in_ci():
    assert cpp_extension_gate(None, {"CI": "true"}) is None
    assert cpp_extension_gate(None, {}) is None


def test_gate_fails_a_missing_extension_in_ci():
    missing = f"CI=true and the C.. extension is missing.*{PLANTED}"
    with pytest.raises(pytest.fail.Exception, match=missing):
        cpp_extension_gate(PLANTED, {"CI": "true"})


@pytest.mark.parametrize("env", [{}, {"CI": "false"}, {"CI": ""}], ids=["unset", "false", "empty"])
def test_gate_skips_a_missing_extension_outside_ci_with_the_reason(env):
    with pytest.raises(pytest.skip.Exception, match=f"C.. extension not built: {PLANTED}"):
        cpp_extension_gate(PLANTED, env)


def _pytest_without_extension(ci: str | None) -> subprocess.CompletedProcess:
    """pytest on one test of each gated module, in a fresh process whose cpp_backend reports
    the planted import error."""
    code = textwrap.dedent(f"""
        import sys
        import pytest
        from atman_kernels.ops import cpp_backend
        cpp_backend._IMPORT_ERROR = {PLANTED!r}
        sys.exit(pytest.main(["-q", "-rs", "-p", "no:cacheprovider",
                              "tests/test_cpp.py::test_public_api_dispatches_to_cpp",
                              "tests/test_softcap_sinks.py::test_sinks_reach_the_cpp_kernel_through_the_public_op"]))
    """)
    env = {key: val for key, val in os.environ.items() if key != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


@pytest.mark.parametrize("ci", ["true", None], ids=["ci", "local"])
def test_suite_without_the_extension(ci):
    done = _pytest_without_extension(ci)
    out = done.stdout + done.stderr
    if ci == "true":
        assert done.returncode == 1, out
        assert out.count("CI=true and the C++ extension is missing") >= 2, out
        assert PLANTED in out and "2 errors" in out, out
    else:
        assert done.returncode == 0, out
        assert "2 skipped" in out and f"C++ extension not built: {PLANTED}" in out, out
