"""Did a forward reach every decoder layer: the decoder's layers, and the calls counted.

:func:`decoder_attention_modules` finds the self-attention modules of each decoder layer
(interface-routed ones and attention computed by hand); :func:`count_attention_calls` counts
the calls that reach the "atman" attention; :func:`check_layers_routed` compares the two after
a forward, so a model whose decoder attention bypasses the interface is refused instead of
explained as zeros.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator

import torch
from transformers import PreTrainedModel

from ._tags import _is_cross_attention, _layer_index
from .routing import _routes_through_interface


class AttentionCallCounts:
    """Calls the "atman" attention received inside :func:`count_attention_calls`, per module.

    ``calls(module)``: every call; ``suppressed_calls(module)``: calls in which suppression
    factors were applied (a suppression active and covering the module's layer).
    """

    def __init__(self) -> None:
        self._calls: dict[torch.nn.Module, int] = {}
        self._suppressed: dict[torch.nn.Module, int] = {}

    def _record(self, module: torch.nn.Module, suppressed: bool) -> None:
        self._calls[module] = self._calls.get(module, 0) + 1
        if suppressed:
            self._suppressed[module] = self._suppressed.get(module, 0) + 1

    def calls(self, module: torch.nn.Module) -> int:
        """Calls of ``module`` through "atman"."""
        return self._calls.get(module, 0)

    def suppressed_calls(self, module: torch.nn.Module) -> int:
        """Calls of ``module`` through "atman" with factors applied."""
        return self._suppressed.get(module, 0)

    @property
    def total(self) -> int:
        """All calls recorded."""
        return sum(self._calls.values())

    def modules(self) -> list[torch.nn.Module]:
        """The modules that made at least one call, in first-call order."""
        return list(self._calls)

    def __repr__(self) -> str:
        return (
            f"AttentionCallCounts(modules={len(self._calls)}, calls={self.total}, "
            f"suppressed={sum(self._suppressed.values())})"
        )


_COUNTERS: contextvars.ContextVar[tuple[AttentionCallCounts, ...]] = contextvars.ContextVar(
    "atman_attention_counters", default=()
)


@contextlib.contextmanager
def count_attention_calls() -> Iterator[AttentionCallCounts]:
    """Count, per attention module, the calls that reach the "atman" attention in the block.

    Nests (each active counter sees every call). Use with :func:`check_layers_routed`::

        with count_attention_calls() as counts:
            model(**inputs)
        check_layers_routed(model, counts)
    """
    counts = AttentionCallCounts()
    token = _COUNTERS.set(_COUNTERS.get() + (counts,))
    try:
        yield counts
    finally:
        _COUNTERS.reset(token)


def _record_call(module: torch.nn.Module, suppressed: bool) -> None:
    for counts in _COUNTERS.get():
        counts._record(module, suppressed)


def _walk(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, torch.nn.Module]]:
    """(qualified name, module, nearest PreTrainedModel at or above it), depth first."""
    stack: list[tuple[str, torch.nn.Module, torch.nn.Module]] = [("", model, model)]
    while stack:
        name, module, owner = stack.pop()
        if isinstance(module, PreTrainedModel):
            owner = module
        yield name, module, owner
        children = list(module.named_children())
        for child_name, child in reversed(children):
            stack.append((f"{name}.{child_name}" if name else child_name, child, owner))


def _cross_by_name(name: str) -> bool:
    low = name.lower()
    return "cross" in low or "encoder_attn" in low or "encdecattention" in low


def _looks_like_attention(module: torch.nn.Module) -> bool:
    name = type(module).__name__
    return "Attention" in name or "Attn" in name


def _layer_attention(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of one decoder layer that suppression must reach.

    Interface-routed modules, plus the innermost modules named like an attention
    (``*Attention*`` / ``*Attn*``) that neither contain nor sit inside a routed one (an attention
    computed by hand: AtMan cannot reach it). Cross-attention is left out (its keys are
    another sequence).
    """
    found = [
        (name, m)
        for name, m in layer.named_modules()
        if name
        and not isinstance(m, PreTrainedModel)
        and not _cross_by_name(name)
        and not _is_cross_attention(m)
    ]
    routed = [(name, m) for name, m in found if _routes_through_interface(type(m))]

    def related_to_routed(name: str) -> bool:  # inside a routed module, or around one
        return any(
            name == r or name.startswith(r + ".") or r.startswith(name + ".") for r, _ in routed
        )

    named = [
        (name, m) for name, m in found if _looks_like_attention(m) and not related_to_routed(name)
    ]
    innermost = [
        m for name, m in named if not any(other.startswith(name + ".") for other, _ in named)
    ]
    return [m for _, m in routed] + innermost


def _decoder_root(model: torch.nn.Module) -> torch.nn.Module:
    """``model.get_decoder()`` where that is a sub-model holding layers, else ``model``.

    transformers' ``get_decoder`` returns the ``decoder`` attribute when there is one, which is
    the LM head's projection in some models (ModernBERT-decoder: an ``nn.Linear``): a module
    without any ``nn.ModuleList`` is no decoder, and the model itself is searched instead.
    """
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            root = get_decoder()
        except Exception:  # noqa: BLE001  (a few models raise: then the model is the root)
            root = None
        if isinstance(root, torch.nn.Module) and any(
            isinstance(m, torch.nn.ModuleList) for m in root.modules()
        ):
            return root
    return model


def _same_model_configs(root: torch.nn.Module) -> tuple[object, ...]:
    """The configs that make a nested ``PreTrainedModel`` part of ``root``'s own stack: the
    root's config and its text config. Llama 4's and Mllama's ``*ForCausalLM`` hold a
    ``*TextModel`` with the same config; DINOv2's encoder is itself a ``PreTrainedModel``.
    A vision or audio tower has a config of its own and stays out."""
    config = getattr(root, "config", None)
    if config is None:
        return ()
    configs = [config]
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        try:
            configs.append(get_text_config())
        except Exception:  # noqa: BLE001  (a config that cannot say: the root's own only)
            pass
    return tuple(configs)


def decoder_attention_modules(model: torch.nn.Module) -> list[list[torch.nn.Module]]:
    """Per decoder layer of ``model``, the self-attention modules AtMan suppresses.

    The decoder is ``model.get_decoder()`` (the language model of a multimodal model, the
    decoder stack of an encoder-decoder, the model itself for Llama or BERT; the model when
    that is no module holding layers, as ModernBERT-decoder's LM-head ``decoder``). Its layers
    are its ``nn.ModuleList`` of ``config.num_hidden_layers`` blocks that hold attention,
    searched in the decoder and in nested pretrained sub-models sharing its config or text
    config (Llama 4's ``*TextModel``, DINOv2's encoder), not in those with a config of their
    own (a vision tower); without one of that length, the longest such list. Per layer see
    :func:`_layer_attention`: interface-routed modules and attention modules computed by hand
    (which :func:`check_layers_routed` then reports).
    A layer without attention (a state-space layer of a hybrid model) gives an empty list.

    Returns:
        ``result[i]`` = the modules of decoder layer ``i``; ``[]`` when no layer list is found.
    """
    root = _decoder_root(model)
    configs = _same_model_configs(root)
    candidates = [
        m
        for _, m, owner in _walk(root)
        if (owner is root or any(getattr(owner, "config", None) is c for c in configs))
        and isinstance(m, torch.nn.ModuleList)
        and len(m) > 0
    ]
    per_list = [[_layer_attention(layer) for layer in lst] for lst in candidates]
    with_attention = [
        (lst, mods) for lst, mods in zip(candidates, per_list, strict=True) if any(mods)
    ]
    if not with_attention:
        return []
    config = getattr(root, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None)
    for lst, mods in with_attention:
        if len(lst) == n_layers:
            return mods
    return max(with_attention, key=lambda pair: len(pair[0]))[1]


def check_layers_routed(
    model: torch.nn.Module,
    counts: AttentionCallCounts,
    layers: Iterable[int] | None = None,
    *,
    suppressed: bool = False,
) -> None:
    """Raise unless every decoder layer in ``layers`` had its attention go through "atman".

    Call it after a forward run inside :func:`count_attention_calls`. A model whose decoder
    attention bypasses the interface (git: only its vision tower routes) would otherwise
    return explanations of all zeros.

    Args:
        model: the model that ran.
        counts: what :func:`count_attention_calls` recorded during the forward.
        layers: decoder layer indices the explanation suppresses (0 .. L-1); None = every
            layer that has attention. With explicit indices each listed layer must have
            attention, and the layer index the "atman" attention reads from each module
            (``layer_idx``) must equal its position, or ``layers=`` would hit other modules.
        suppressed: also require that factors were applied in those calls (a forward under
            an active suppression).

    Raises:
        ValueError: a layer index out of range, or a listed layer without attention.
        NotImplementedError: a layer whose attention never reached "atman" (the message
            names the model, the layers and the module classes), or a layer-index mismatch.
    """
    name = type(model).__name__
    per_layer = decoder_attention_modules(model)
    if not per_layer:
        raise NotImplementedError(
            f"{name}: no decoder layers with attention were found (model.get_decoder() has "
            "no nn.ModuleList of attention blocks), so it cannot be checked that suppression "
            "reaches every layer; this model is not supported"
        )
    n = len(per_layer)
    if layers is None:
        chosen = [i for i in range(n) if per_layer[i]]
        explicit = False
    else:
        chosen = list(layers)
        explicit = True
        bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int)
               or not 0 <= i < n]
        if bad:
            raise ValueError(
                f"layers must be decoder layer indices in 0..{n - 1} ({name} has {n} "
                f"decoder layers), got {bad}"
            )
        empty = [i for i in chosen if not per_layer[i]]
        if empty:
            raise ValueError(
                f"{name}: decoder layer(s) {empty} have no attention module (state-space or "
                "other non-attention layers), so suppressing them does nothing"
            )
    missing: dict[int, list[str]] = {}
    for i in chosen:
        for m in per_layer[i]:
            got = counts.suppressed_calls(m) if suppressed else counts.calls(m)
            if got == 0:
                missing.setdefault(i, []).append(type(m).__name__)
    if missing:
        classes = sorted({c for cs in missing.values() for c in cs})
        what = "with suppression factors applied" if suppressed else "at all"
        raise NotImplementedError(
            f"{name}: the attention of decoder layer(s) {_ranges(missing)} "
            f"({', '.join(classes)}) never went through the 'atman' attention {what}, so "
            "suppressing them changes nothing and the explanation would be silently wrong "
            "(this model computes that attention outside transformers' attention interface)"
        )
    if explicit:
        wrong = [
            (i, _layer_index(m))
            for i in chosen
            for m in per_layer[i]
            if _layer_index(m) != i
        ]
        if wrong:
            raise NotImplementedError(
                f"{name}: decoder layer(s) {[i for i, _ in wrong]} report layer indices "
                f"{[j for _, j in wrong]} to the suppression (layer_idx), so layers= would "
                "suppress other modules than the ones asked for; use layers=None"
            )


def _ranges(indices: Iterable[int]) -> str:
    """'0-3, 5' for [0, 1, 2, 3, 5]."""
    out: list[list[int]] = []
    for i in sorted(indices):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)
