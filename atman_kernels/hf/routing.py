"""Which models and modules may use "atman": interface routing and the backend flag.

A module routes through transformers' attention interface when its ``forward`` calls
``ALL_ATTENTION_FUNCTIONS`` (:func:`interface_attention_modules`); a model class may use
"atman" when it sets ``_supports_attention_backend = True`` or belongs to a family of
:data:`VERIFIED_ATTENTION_ROUTING` (read by hand). :func:`check_supported` refuses a model
before any work; :func:`_backend_refusal` says per call why a module's model may not.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from types import MappingProxyType

import torch
from transformers import PreTrainedModel

from ._tags import _REFUSAL_ATTR

# Model classes that do not set _supports_attention_backend but whose every softmax attention
# was read in transformers 5.24's modeling file and calls the attention interface with the
# standard arguments (q, k, v, the mask from the mask function, dropout, scaling, **kwargs of
# the decoder layer): plain decoders and encoders that never set the flag, and
# hybrids whose other layers are state-space or linear-attention mixers
# (they hold no softmax attention to suppress; AtMan suppresses the attention layers only, as
# in LFM2). Each entry is the family's PreTrainedModel base class name (matched in the MRO,
# within transformers.models) and what was checked. The per-call argument checks and the
# routed-layer count (check_layers_routed) still run for them; tests/test_zoo.py compares each
# with a brute force. Their caches hold recurrent state, so the explainer runs them without
# prefix reuse (settings["prefix_reuse"] is False).
VERIFIED_ATTENTION_ROUTING: Mapping[str, str] = MappingProxyType(
    {
        "FalconH1PreTrainedModel": "Falcon-H1: FalconH1Attention (keys scaled by "
        "key_multiplier before the call) beside a Mamba-2 mixer in every layer",
        "JambaPreTrainedModel": "Jamba: JambaAttention layers between Mamba layers",
        "NemotronHPreTrainedModel": "Nemotron-H: NemotronHAttention layers between Mamba-2 "
        "and MLP layers",
        "Qwen3NextPreTrainedModel": "Qwen3-Next: gated Qwen3NextAttention (output gate "
        "after the call) between gated-delta-net layers",
        "KimiLinearPreTrainedModel": "Kimi Linear: multi-head latent attention layers "
        "between KimiDeltaAttention (linear attention) layers",
        "Qwen3_5PreTrainedModel": "Qwen3.5: gated Qwen3_5Attention (as Qwen3-Next) between "
        "gated-delta-net layers; its vision tower's varlen calls stay refused per call",
        "Qwen3_5MoePreTrainedModel": "Qwen3.5-MoE: as Qwen3.5",
        "LaraMiniPreTrainedModel": "Lara mini: LaraMiniAttention (sliding_window= as the "
        "mask encodes it) between recurrent layers",
        "OlmoHybridPreTrainedModel": "OLMo hybrid: OlmoHybridAttention (q/k norms, RoPE or "
        "none) layers between gated-delta-net layers",
        # plain softmax attention that calls the interface as Llama does, the flag unset
        "StableLmPreTrainedModel": "StableLM: StableLmAttention (partial rotary, optional "
        "per-head q/k layer norms before the call), causal mask from create_causal_mask",
        "BioGptPreTrainedModel": "BioGPT: BioGptAttention, is_causal=True, causal mask from "
        "create_causal_mask",
        # decoder-only *ForCausalLM of encoder-decoder families: the decoder layer's self
        # attention is causal; its cross-attention runs only with encoder states (the explainer
        # never passes them; a non-causal call is refused per call)
        "BartPreTrainedModel": "BART: BartAttention self-attention, is_causal=True",
        "MBartPreTrainedModel": "mBART: as BART",
        "MarianPreTrainedModel": "Marian: as BART",
        "PegasusPreTrainedModel": "Pegasus: as BART",
        "PLBartPreTrainedModel": "PLBart: as BART",
        "BlenderbotPreTrainedModel": "Blenderbot: as BART",
        "BlenderbotSmallPreTrainedModel": "Blenderbot small: as BART",
        "WhisperPreTrainedModel": "Whisper: WhisperAttention decoder self-attention, as BART",
        # BERT-style encoders with extra position inputs (boxes, XPaths)
        "LayoutLMPreTrainedModel": "LayoutLM: BERT self-attention with the extended mask",
        "MarkupLMPreTrainedModel": "MarkupLM: BERT self-attention with the extended mask",
    }
)


def _declares_attention_backend(cls: type) -> bool:
    """Whether model class ``cls`` sets ``_supports_attention_backend`` or belongs to a family
    of :data:`VERIFIED_ATTENTION_ROUTING`."""
    if getattr(cls, "_supports_attention_backend", False):
        return True
    return any(
        c.__name__ in VERIFIED_ATTENTION_ROUTING and c.__module__.startswith("transformers.")
        for c in getattr(cls, "__mro__", ())
    )


_FILE_MODEL_CLASSES: dict[str, tuple[type, ...]] = {}


def _backend_refusal(module: torch.nn.Module) -> str | None:
    """Why the model owning ``module`` may not use "atman", or None.

    atman_attention() records it per module (from the owning model class). For a model set
    to "atman" some other way (``from_pretrained(attn_implementation="atman")``,
    ``set_attn_implementation``) the model class is not known at the call: the model classes
    defined in the module's own source file decide, refusing when none of them declares
    ``_supports_attention_backend``.
    """
    if hasattr(module, _REFUSAL_ATTR):
        return getattr(module, _REFUSAL_ATTR)
    file = type(module).__module__
    classes = _FILE_MODEL_CLASSES.get(file)
    if classes is None:
        classes = tuple(
            c
            for c in vars(sys.modules.get(file, object())).values()
            if isinstance(c, type) and issubclass(c, PreTrainedModel) and c.__module__ == file
        )
        _FILE_MODEL_CLASSES[file] = classes
    if not classes or any(_declares_attention_backend(c) for c in classes):
        return None
    names = ", ".join(sorted(c.__name__ for c in classes)[:3])
    return _unsupported_backend_message(
        f"none of the model classes of {file} ({names}, ...) sets"
    )


def _unsupported_backend_message(subject: str) -> str:
    """``subject`` ends with its verb: "GitForCausalLM does not set"."""
    return (
        f"{subject} _supports_attention_backend = True, i.e. transformers does not "
        "promise that its attention goes through the attention interface with the standard "
        "arguments (models like git and bigbird_pegasus route only part of it, or call it "
        "non-causally), so 'atman' could return silently wrong explanations; a model class "
        "of your own that routes every attention through the interface can declare "
        "_supports_attention_backend = True"
    )


_ROUTES_CACHE: dict[type, bool] = {}


def _routes_through_interface(cls: type) -> bool:
    """Whether ``cls.forward`` calls transformers' attention interface (source inspection)."""
    if cls not in _ROUTES_CACHE:
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            src = ""
        _ROUTES_CACHE[cls] = "ALL_ATTENTION_FUNCTIONS" in src
    return _ROUTES_CACHE[cls]


def interface_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of ``model`` that call transformers' attention interface,
    in ``model.modules()`` order."""
    return [
        m
        for m in model.modules()
        if not isinstance(m, PreTrainedModel) and _routes_through_interface(type(m))
    ]


def check_supported(model: torch.nn.Module) -> None:
    """Raise (naming the model and the reason) unless "atman" can be switched into ``model``:
    what :func:`atman_attention` checks first, for callers that want the refusal before any
    other work."""
    _check_supported(model)


def _check_supported(model: torch.nn.Module) -> None:
    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"atman_attention needs a transformers PreTrainedModel, got {name}; for torch "
            "models built on torch.nn.MultiheadAttention use "
            "atman_kernels.nn.swap_multihead_attention(model)"
        )
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and not type(m)._can_set_attn_implementation():
            raise NotImplementedError(
                f"{type(m).__name__} does not route its attention through transformers' "
                "AttentionInterface, so the 'atman' attention cannot be switched in; use a model "
                "class that does (most transformers>=5 models), or for torch.nn."
                "MultiheadAttention-based code atman_kernels.nn.swap_multihead_attention(model)"
            )
    if not interface_attention_modules(model):
        raise NotImplementedError(
            f"{name} has no attention module that calls transformers' AttentionInterface "
            "(ALL_ATTENTION_FUNCTIONS), so suppression would silently do nothing; use a model "
            "class that routes through it, or for torch.nn.MultiheadAttention-based code "
            "atman_kernels.nn.swap_multihead_attention(model)"
        )
    if not _declares_attention_backend(type(model)):
        raise NotImplementedError(_unsupported_backend_message(f"{name} does not set"))
