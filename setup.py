"""Builds the C++ CPU extension ``atman_kernels._C``; metadata lives in pyproject.toml.

    pip install --no-build-isolation -e .      # or: python setup.py build_ext --inplace

(``--no-build-isolation``: build against the torch already installed; an isolated build would
pull a CUDA torch from the index.)

One build runs on every CPU of its architecture. The inner kernel
(``csrc/attention_kernel_impl.h``) is compiled once per instruction-set level, each copy with its
own flags, into a static library of its own (``csrc/isa/attention_kernel_<level>.cpp``):

- ``default``: the compiler's baseline for the target (x86-64: SSE2; any other architecture);
- ``avx2``: ``-march=x86-64-v3`` (AVX2, FMA, BMI2, F16C), x86-64 only;
- ``avx512``: ``-march=x86-64-v4`` (AVX-512 F/BW/DQ/VL/CD), x86-64 only.

At run time the library takes the best level the CPU supports (CPUID), or the one
``ATEN_CPU_CAPABILITY`` names (``default``, ``avx2``, ``avx512``, as ATen's own kernels do;
lowered to what the CPU supports): ``atman_kernels.ops.cpp_backend.isa()`` says which. The rest
of the library is built for the baseline: nothing is tuned to the build host, so a build can be
shared (a virtualenv, a container image, a wheel). No ``-march=native`` anywhere.

Environment:

- ``ATMAN_SKIP_CPP_BUILD=1``: build nothing; the package still works (the ``auto`` backend
  falls back to the PyTorch reference on CPU, and says why).
- ``ATMAN_PORTABLE_BUILD=1``: build only the ``default`` level (no AVX2 / AVX-512 code at all;
  slower). For a compiler that rejects the x86-64-v3/v4 flags, or results that must not depend
  on the CPU. Non-x86 architectures always build this way.
"""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_clib import build_clib

ROOT = Path(__file__).resolve().parent
KERNEL_HEADERS = ["csrc/attention_kernel.h", "csrc/attention_kernel_impl.h"]

# level -> (flags, fallback flags for compilers without the x86-64-vN names)
ISA_FLAGS = {
    "default": ([], []),
    "avx2": (["-march=x86-64-v3"], ["-mavx2", "-mfma", "-mbmi", "-mbmi2", "-mf16c"]),
    "avx512": (
        ["-march=x86-64-v4", "-mprefer-vector-width=512"],
        ["-mavx2", "-mfma", "-mbmi", "-mbmi2", "-mf16c", "-mavx512f", "-mavx512bw",
         "-mavx512dq", "-mavx512vl", "-mavx512cd"],
    ),
}
COMMON_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wno-psabi"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _levels() -> list[str]:
    x86_64 = platform.machine().lower() in ("x86_64", "amd64")
    if not x86_64 or _flag("ATMAN_PORTABLE_BUILD"):
        return ["default"]
    return ["default", "avx2", "avx512"]


class BuildIsaLibraries(build_clib):
    """build_clib that falls back to plain -m flags where -march=x86-64-vN is unknown."""

    def build_libraries(self, libraries) -> None:
        for _, info in libraries:
            fallback = info.pop("cflags_fallback", None)
            if fallback is not None and not self._accepts(info["cflags"]):
                info["cflags"] = COMMON_FLAGS + fallback
        super().build_libraries(libraries)

    def _accepts(self, flags: list[str]) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "probe.cpp"
            src.write_text("int probe() { return 0; }\n")
            try:
                self.compiler.compile([str(src)], output_dir=tmp, extra_postargs=flags)
            except Exception:  # CompileError: this compiler does not know the flag
                return False
        return True


def _build_args() -> dict:
    if _flag("ATMAN_SKIP_CPP_BUILD"):
        return {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    class BuildExt(BuildExtension):
        """build_ext that first builds the per-level kernel libraries it links."""

        def run(self) -> None:
            if self.distribution.has_c_libraries():
                self.run_command("build_clib")
            super().run()

    levels = _levels()
    macros = [("ATMAN_HAVE_X86_ISA_PATHS", None)] if "avx2" in levels else []
    libraries = []
    for level in levels:
        flags, fallback = ISA_FLAGS[level]
        info = {
            "sources": [f"csrc/isa/attention_kernel_{level}.cpp"],
            "include_dirs": ["csrc"],
            "macros": macros,
            "cflags": COMMON_FLAGS + flags,
            "obj_deps": {"": KERNEL_HEADERS},
        }
        if flags:
            info["cflags_fallback"] = fallback
        libraries.append((f"atman_isa_{level}", info))
    sources = sorted(
        str(p.relative_to(ROOT))
        for folder in ("csrc", "python_bindings")
        for p in (ROOT / folder).glob("*.cpp")
    )
    extension = CppExtension(
        name="atman_kernels._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        define_macros=macros,
        extra_compile_args=["-O3", "-fopenmp", "-Wno-psabi"],
        extra_link_args=["-fopenmp"],
        # relink when a kernel library changes (they are linked, not compiled, here)
        depends=KERNEL_HEADERS + [lib[1]["sources"][0] for lib in libraries],
    )
    return {
        "libraries": libraries,
        "ext_modules": [extension],
        "cmdclass": {"build_ext": BuildExt, "build_clib": BuildIsaLibraries},
    }


setup(**_build_args())
