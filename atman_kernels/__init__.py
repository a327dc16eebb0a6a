"""atman_kernels: fast AtMan explanations of transformer predictions.

``suppressed_attention`` is the fused op every other layer calls.
"""

from .ops import BackendUnavailable, suppressed_attention

__version__ = "0.1.0"

__all__ = ["BackendUnavailable", "suppressed_attention", "__version__"]
