"""atman_kernels: fast AtMan explanations of transformer predictions.

``suppressed_attention`` is the fused op every other layer calls.
"""

import importlib

from .ops import BackendUnavailable, suppressed_attention
from .suppression import attention_backend, current_backend, current_suppression, suppression

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "attention_backend",
    "current_backend",
    "current_suppression",
    "suppressed_attention",
    "suppression",
    "__version__",
]

# Integration layers load on first use: `atman_kernels.hf` imports transformers.
_LAZY_SUBMODULES = ("hf", "nn", "models")


# The explainer loads on first use too (it imports transformers through `hf`).
_LAZY_ATTRIBUTES = {"AtManExplainer": "explain", "Explanation": "explain"}


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_ATTRIBUTES:
        return getattr(importlib.import_module(f".{_LAZY_ATTRIBUTES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
