"""The fused suppressed-attention op and its backends."""

from .suppressed_attention import (
    BACKENDS,
    BackendUnavailable,
    choose_backend,
    suppressed_attention,
)

__all__ = ["BACKENDS", "BackendUnavailable", "choose_backend", "suppressed_attention"]
