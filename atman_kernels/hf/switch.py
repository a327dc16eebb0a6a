"""Switching a model to "atman": :func:`atman_attention` and what it records on the modules.

Checks the model first (:func:`.routing.check_supported`), gives layer indices where the model
has none (:func:`assign_layer_indices`), tags every interface-routed module (where it sits,
whether its model class may use "atman", cross-attention, causal decoder) and restores every
config's attention implementation on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ._tags import (
    _CROSS_ATTR,
    _DECODER_ATTR,
    _LAYER_ATTR,
    _REFUSAL_ATTR,
    _WHERE_ATTR,
    ATTN_IMPLEMENTATION,
)
from .layers import _cross_by_name, _walk, decoder_attention_modules
from .routing import (
    _check_supported,
    _declares_attention_backend,
    _routes_through_interface,
    _unsupported_backend_message,
    interface_attention_modules,
)


def assign_layer_indices(model: torch.nn.Module) -> int:
    """Give every interface-routed attention module without a ``layer_idx`` the attribute
    ``_atman_layer_idx`` = its position among those modules. Returns the number of modules."""
    modules = interface_attention_modules(model)
    for i, m in enumerate(modules):
        if getattr(m, "layer_idx", None) is None:
            setattr(m, _LAYER_ATTR, i)
    return len(modules)


def _configs_of(model: PreTrainedModel) -> list:
    """Every config (and sub-config) whose ``_attn_implementation`` a switch may change."""
    seen: dict[int, object] = {}
    stack = [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while stack:
        cfg = stack.pop()
        if id(cfg) in seen:
            continue
        seen[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, key, None)
            if sub is not None:
                stack.append(sub)
    return list(seen.values())


def _is_causal_lm(model: torch.nn.Module) -> bool:
    name = type(model).__name__
    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or name.endswith(
        "ForCausalLM"
    )


def _tag_modules(model: PreTrainedModel, decoder_of: PreTrainedModel | None = None) -> None:
    """Record on every interface-routed module what its attention calls need to know: where it
    sits (errors name the model), whether its owning model class may use "atman", whether it
    is cross-attention (by its path), and whether it is a causal LM's decoder self-attention
    (``decoder_of``: the causal language model of a composite model, e.g. a VLM's)."""
    top = type(model).__name__
    decoder = set()
    if decoder_of is not None or _is_causal_lm(model):
        # get_decoder() of a composite model is its language model's decoder
        decoder = {id(m) for layer in decoder_attention_modules(model) for m in layer}
    for name, m, owner in _walk(model):
        if isinstance(m, PreTrainedModel) or not _routes_through_interface(type(m)):
            continue
        setattr(m, _WHERE_ATTR, f"{top} ({name}: {type(m).__name__})")
        refusal = None
        if not _declares_attention_backend(type(owner)):
            refusal = _unsupported_backend_message(f"{type(owner).__name__} does not set")
        setattr(m, _REFUSAL_ATTR, refusal)
        setattr(m, _CROSS_ATTR, _cross_by_name(name))
        setattr(m, _DECODER_ATTR, top if id(m) in decoder else None)


@contextlib.contextmanager
def atman_attention(
    model: PreTrainedModel, *, only: PreTrainedModel | None = None
) -> Iterator[PreTrainedModel]:
    """Switch ``model`` (and its sub-models) to the "atman" attention inside the block.

    Restores every config's previous attention implementation on exit, also on error.
    Assigns layer indices where the model has none (:func:`assign_layer_indices`).

    Args:
        model: the model.
        only: switch only this sub-model (and its own sub-models), e.g. the language model of
            a vision-language model, whose vision tower keeps its attention implementation
            (suppression factors index the language model's sequence, not the patches of one
            image).

    Raises:
        TypeError: ``model`` is not a transformers ``PreTrainedModel``, or ``only`` is not one
            of its sub-models.
        NotImplementedError: the model's attention does not route through the interface, or
            its class does not set ``_supports_attention_backend = True``.
    """
    target = model if only is None else only
    if only is not None and not (
        isinstance(only, PreTrainedModel) and any(m is only for m in model.modules())
    ):
        raise TypeError(f"only= must be a PreTrainedModel inside {type(model).__name__}, got "
                        f"{type(only).__name__}")
    _check_supported(target)
    assign_layer_indices(target)
    _tag_modules(model, decoder_of=None if only is None else only)
    configs = _configs_of(target)
    previous = [(cfg, cfg._attn_implementation_internal) for cfg in configs]
    try:
        target.set_attn_implementation(ATTN_IMPLEMENTATION)
        for m in target.modules():
            if (
                isinstance(m, PreTrainedModel)
                and m.config._attn_implementation != ATTN_IMPLEMENTATION
            ):
                raise RuntimeError(
                    f"could not switch {type(m).__name__} to the 'atman' attention "
                    f"(it stayed {m.config._attn_implementation!r})"
                )
        yield model
    finally:
        for cfg, impl in previous:
            cfg._attn_implementation_internal = impl
