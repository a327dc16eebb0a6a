"""Which suppression factors the attention of a running model applies.

The state lives in a ``contextvars.ContextVar`` so that model code needs no edits: the
integration layers (:mod:`atman_kernels.hf`, :mod:`atman_kernels.nn`) read it on every
attention call. Factors are indexed by *absolute* key position, so factors given for the full
sequence keep working when the model is fed only a suffix on top of a KV cache.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ._constants import MODES

if TYPE_CHECKING:  # torch loads on first use: importing the package stays quick
    import torch


@dataclass(frozen=True)
class Suppression:
    """Factors [B, N] over absolute key positions, the mode, and the layers they apply to."""

    factors: torch.Tensor
    mode: str = "paper"
    layers: frozenset[int] | None = None

    def applies_to(self, layer_idx: int | None) -> bool:
        """Whether layer ``layer_idx`` is suppressed (all layers when ``layers`` is None)."""
        if self.layers is None:
            return True
        if layer_idx is None:
            raise ValueError(
                "a layer subset was given but this attention module does not know its layer "
                "index (no `layer_idx` attribute); use layers=None for this model"
            )
        return layer_idx in self.layers

    def factors_for_keys(self, len_k: int, key_offset: int = 0) -> torch.Tensor:
        """Factors [B, len_k] for keys at absolute positions key_offset .. key_offset+len_k-1.

        Positions past the end of ``factors`` are untouched (factor 1).
        """
        f = self.factors
        n = f.shape[1]
        stop = key_offset + len_k
        if key_offset == 0 and stop == n:
            return f
        out = f.new_ones(f.shape[0], len_k)
        hi = min(stop, n)
        if hi > key_offset:
            out[:, : hi - key_offset] = f[:, key_offset:hi]
        return out


_ACTIVE: contextvars.ContextVar[Suppression | None] = contextvars.ContextVar(
    "atman_suppression", default=None
)


def make_suppression(
    factors: torch.Tensor,
    mode: str = "paper",
    layers: Iterable[int] | None = None,
    *,
    prefix: str = "",
    check_values: bool = True,
) -> Suppression:
    """A validated :class:`Suppression`; errors name the argument as ``prefix + name``.

    ``check_values=False`` skips the data checks (finite, >= 0), for callers whose factors reach
    :func:`atman_kernels.suppressed_attention`, which checks them anyway.
    """
    import torch

    if not isinstance(factors, torch.Tensor) or factors.dim() != 2:
        raise ValueError(
            f"{prefix}factors must be a tensor of shape [variants, sequence length], got "
            f"{getattr(factors, 'shape', type(factors).__name__)}"
        )
    if not factors.is_floating_point():
        raise TypeError(f"{prefix}factors must be a floating tensor, got {factors.dtype}")
    if check_values and (not bool(torch.isfinite(factors).all()) or bool((factors < 0).any())):
        raise ValueError(f"{prefix}factors must be finite and >= 0 (1 = untouched)")
    if mode not in MODES:
        raise ValueError(f"{prefix}mode must be one of {MODES}, got {mode!r}")
    layer_set = None if layers is None else frozenset(int(i) for i in layers)
    return Suppression(factors, mode, layer_set)


def current_suppression() -> Suppression | None:
    """The suppression in force in this context, or None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def suppression(
    factors: torch.Tensor, mode: str = "paper", layers: Iterable[int] | None = None
) -> Iterator[Suppression]:
    """Apply ``factors`` [B, N] (variants x absolute key positions) inside the block.

    Every attention call routed through ``atman_kernels`` (the "atman" transformers attention,
    :class:`atman_kernels.nn.MultiheadAttention`) suppresses keys with these factors; the batch
    of the model's input must be B (or 1, broadcast over the variants).
    """
    state = make_suppression(factors, mode, layers)
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)


@dataclass(frozen=True)
class KeyLayout:
    """How one attention module's calls lay out the positions the factors index, for models
    that attend within groups of tokens (windows) batched as inputs x groups.

    The call's batch is ``inputs x G`` (input-major: row ``b * G + g`` is group ``g`` of input
    ``b``); key ``k`` of group ``g`` is factor column ``positions[g, k]`` (-1: no column, factor
    1, e.g. padding). ``visible`` [G, Nq, Nk] bool (optional): the keys each query of group
    ``g`` may see; the additive attention mask the model passes is then a score bias only
    where visible, and the other keys are excluded (not part of the softmax nor of paper
    mode's row minimum), where the model itself would add a large negative number.
    """

    positions: torch.Tensor
    visible: torch.Tensor | None = None


_LAYOUTS: contextvars.ContextVar[Mapping[Any, KeyLayout]] = contextvars.ContextVar(
    "atman_key_layouts", default=MappingProxyType({})
)


def current_key_layout(module: Any) -> KeyLayout | None:
    """The :class:`KeyLayout` of attention module ``module`` in this context, or None."""
    return _LAYOUTS.get().get(module)


@contextlib.contextmanager
def key_layouts(layouts: Mapping[Any, KeyLayout]) -> Iterator[Mapping[Any, KeyLayout]]:
    """Give the attention modules in ``layouts`` their :class:`KeyLayout` inside the block
    (read by the "atman" transformers attention for each call of those modules)."""
    import torch

    for module, layout in layouts.items():
        pos, vis = layout.positions, layout.visible
        if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.is_floating_point():
            raise ValueError(f"KeyLayout.positions of {type(module).__name__} must be an "
                             f"integer tensor [groups, keys], got "
                             f"{getattr(pos, 'shape', type(pos).__name__)}")
        if vis is not None and (not isinstance(vis, torch.Tensor) or vis.dtype != torch.bool
                                or vis.dim() != 3 or vis.shape[0] != pos.shape[0]
                                or vis.shape[2] != pos.shape[1]):
            raise ValueError(f"KeyLayout.visible of {type(module).__name__} must be a bool "
                             f"tensor [{pos.shape[0]}, queries, {pos.shape[1]}], got "
                             f"{getattr(vis, 'shape', type(vis).__name__)}")
    token = _LAYOUTS.set(MappingProxyType({**_LAYOUTS.get(), **layouts}))
    try:
        yield layouts
    finally:
        _LAYOUTS.reset(token)


_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar("atman_backend", default="auto")


def current_backend() -> str:
    """The op backend the integration layers ask for in this context ("auto" by default)."""
    return _BACKEND.get()


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[str]:
    """Run every attention call of the integration layers on op backend ``name`` in the block.

    ``name`` is one of ``atman_kernels.ops.BACKENDS``: e.g. ``"reference"`` to check a model's
    numbers against the plain PyTorch op, or to measure what the fused kernels save.
    """
    from .ops import BACKENDS

    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = _BACKEND.set(name)
    try:
        yield name
    finally:
        _BACKEND.reset(token)
