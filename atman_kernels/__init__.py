"""atman_kernels: fast AtMan explanations of transformer predictions.

``suppressed_attention`` is the fused op every other layer calls. Every name here loads on
first use (torch, transformers), so ``atman --help`` and ``import atman_kernels`` are quick.
"""

import importlib

# Eager, and torch-free at import: the submodule `suppression` must be loaded here so that the
# function of the same name stays bound to `atman_kernels.suppression`.
from .suppression import attention_backend, current_backend, current_suppression, suppression

__version__ = "0.1.0"

__all__ = [
    "AtManExplainer",
    "BackendUnavailable",
    "Explanation",
    "attention_backend",
    "current_backend",
    "current_suppression",
    "suppressed_attention",
    "suppression",
    "__version__",
]

# Submodules that load on first use: `atman_kernels.hf` imports transformers.
_LAZY_SUBMODULES = ("hf", "nn", "models", "ops", "explain")

# Public names and the submodule each comes from.
_LAZY_ATTRIBUTES = {
    "BackendUnavailable": "ops",
    "suppressed_attention": "ops",
    "AtManExplainer": "explain",
    "Explanation": "explain",
}


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_ATTRIBUTES:
        return getattr(importlib.import_module(f".{_LAZY_ATTRIBUTES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_LAZY_SUBMODULES))
