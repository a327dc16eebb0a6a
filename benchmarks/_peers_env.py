"""The peers' own environment: ContextCite and AttnLRP (LXT) from their released packages.

LXT 2.1 imports names that transformers 5 removed, so the peers cannot run in the project's
venv (and the project's transformers is never downgraded). :func:`ensure_peers_env` makes a
virtual environment of its own (``.venv-peers/`` beside ``.venv/``, git-ignored) with:

- ``torch==2.13.0`` (the CPU wheel on this machine's disk; the same torch as the project's, so
  both sides time the same kernels) held by a constraints file while the rest installs;
- ``transformers==4.52.4`` (LXT 2.1's range), ``context-cite==0.0.4`` with its dependencies;
- ``lxt==2.1`` with ``--no-deps``: its declared dependencies (bitsandbytes, open_clip_torch,
  zennit, a torchvision matching a newer torch) serve models this benchmark does not explain;
  what its ``lxt.efficient`` imports for a Llama is torch, transformers and matplotlib, plus
  ``torchvision.models.vision_transformer`` at import time, served by a stub package of three
  names (``nn`` re-exported from torch) that says so in its docstring;
- the offline SmolLM2 package is not needed there: the worker loads the converted copy the
  project already made (:func:`atman_kernels.models.default_cache_dir`) by path.

A stamp file records the recipe; a changed recipe rebuilds the environment.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS_VENV = ROOT / ".venv-peers"
RECIPE = {
    "torch": "torch==2.13.0",
    "packages": ["transformers==4.52.4", "context-cite==0.0.4", "matplotlib"],
    "no_deps": ["lxt==2.1"],
}
_STUB = '''"""Stub torchvision for LXT's imports (made by atman_kernels' benchmarks/_peers_env.py).

``lxt.efficient.models.vit_torch`` patches ``torchvision.models.vision_transformer.nn.*`` at
import; no torchvision model is used by the text benchmark, so only ``nn`` is provided."""
'''


def _python(env: Path) -> Path:
    return env / "bin" / "python"


def ensure_peers_env(env: Path = PEERS_VENV, *, quiet: bool = True) -> Path:
    """Make (once) and return the peers' python; raise with pip's message if it cannot."""
    stamp = env / ".atman-peers-recipe"
    want = repr(RECIPE) + "\n"
    if stamp.is_file() and stamp.read_text() == want and _python(env).is_file():
        return _python(env)
    print(f"[peers] making {env} (ContextCite, LXT; a few minutes, once)", file=sys.stderr)
    venv.EnvBuilder(with_pip=True, clear=True).create(env)
    py = str(_python(env))
    q = ["-q"] if quiet else []
    constraints = env / "constraints.txt"
    constraints.write_text(RECIPE["torch"] + "\n")

    def pip(*args: str) -> None:
        subprocess.run([py, "-m", "pip", "install", *q, "--disable-pip-version-check", *args],
                       check=True)

    pip(RECIPE["torch"])
    pip("-c", str(constraints), *RECIPE["packages"])
    pip("-c", str(constraints), "--no-deps", *RECIPE["no_deps"])
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    stub = Path(site) / "torchvision"
    if not stub.exists():  # nothing installed a real one (lxt came without its dependencies)
        (stub / "models").mkdir(parents=True, exist_ok=True)
        (stub / "__init__.py").write_text(_STUB)
        (stub / "models" / "__init__.py").write_text(_STUB)
        (stub / "models" / "vision_transformer.py").write_text(_STUB + "from torch import nn\n")
    subprocess.run([py, "-c", "import context_cite, lxt.efficient, transformers, torch; "
                    "assert transformers.__version__.startswith('4.52'), transformers.__version__; "
                    "assert torch.__version__.startswith('2.13'), torch.__version__"],
                   check=True)
    stamp.write_text(want)
    return _python(env)


if __name__ == "__main__":
    print(ensure_peers_env(quiet=False))
