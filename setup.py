"""Builds the C++ CPU extension ``atman_kernels._C``; metadata lives in pyproject.toml.

    pip install --no-build-isolation -e .      # or: python setup.py build_ext --inplace

Environment:
- ``ATMAN_SKIP_CPP_BUILD=1``: build nothing; the package still works (the ``auto`` backend
  falls back to the PyTorch reference on CPU, and says why).
- ``ATMAN_PORTABLE_BUILD=1``: leave out ``-march=native``. By default the extension is tuned for
  the CPU it is built on, which is the CPU it runs on (it is built in place, never shipped).
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _extension_args() -> dict:
    if _flag("ATMAN_SKIP_CPP_BUILD"):
        return {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = sorted(
        str(p.relative_to(ROOT))
        for folder in ("csrc", "python_bindings")
        for p in (ROOT / folder).glob("*.cpp")
    )
    compile_args = ["-O3", "-fopenmp", "-Wno-psabi"]
    if not _flag("ATMAN_PORTABLE_BUILD"):
        compile_args.append("-march=native")
    extension = CppExtension(
        name="atman_kernels._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args=compile_args,
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**_extension_args())
