"""AtMan attention for Hugging Face transformers (5.x) models, without editing model code.

Importing this module registers an attention implementation named ``"atman"`` with
transformers' ``AttentionInterface`` and a mask function of the same name with its
``AttentionMaskInterface`` (without the mask registration the causal mask silently arrives as
None). Any model whose attention routes through the interface can then use it::

    import atman_kernels
    from atman_kernels.hf import atman_attention

    with atman_attention(model), atman_kernels.suppression(factors, mode="paper"):
        logits = model(input_ids.expand(len(factors), -1)).logits

Where the suppression factors come from, first match wins:

1. forward keyword arguments ``atman_factors=`` ([B, N] tensor), ``atman_mode=`` and
   ``atman_layers=``, for models that pass ``**kwargs`` down to their attention (Llama, Qwen2,
   Mistral, GPT-2, BERT, ViT in transformers 5.23);
2. the :func:`atman_kernels.suppression` context.

Without factors the layer is plain attention and matches the ``"sdpa"`` implementation.

Masks. The registered mask function is transformers' own ``sdpa_mask``, so the attention
receives either None (plain causal or full attention, with sdpa's conventions) or a boolean
[B, 1, Nq, Nk] mask. The attention recognises the structure "bottom-right causal over the first
L keys, and key padding" (one check per mask tensor, shared by all layers of a forward) and runs
the fused :func:`atman_kernels.suppressed_attention`. Any other mask (sliding windows, packed
sequences, per-head masks, additive float masks, a ``position_bias``) runs an exact
materialised fallback (:mod:`atman_kernels._materialised`): slower, never wrong.

Layer indices (for ``layers=``): ``module.layer_idx`` where the model sets it (Llama, Qwen2,
Mistral, GPT-2, BERT). Models without it (ViT, CLIP) get ``module._atman_layer_idx`` assigned
by :func:`assign_layer_indices` (called by :func:`atman_attention`): the position of the module
among the model's interface-routed attention modules in ``model.modules()`` order.

Soft-capping and sinks. ``softcap=`` (Gemma 2, VaultGemma, T5Gemma; also accepted under the
config's name ``attn_logit_softcapping=``) caps the scaled scores to c * tanh(s / c) before the
mask and the suppression; ``s_aux=`` (GPT-OSS, Granite SWA, MiMo-V2-Flash, DeepSeek-V4) or
``sinks=`` adds per-head sink logits to the softmax denominator, never suppressed. Both go to
the fused op; sinks with one logit per head *and row* ([B, H, Nq, 1], Inkling 2) go to the
materialised fallback. Soft-capping together with a ``position_bias`` is refused (no model
does it, and where the bias would go relative to the cap is not defined).

Keys are matched to factors by absolute position: with a KV cache the key tensor covers
positions 0 .. Nk-1 and the queries are the last Nq positions, so factors given for the whole
sequence keep working when only a suffix is fed (docs/semantics.md, exact prefix reuse).

Windowed attention (Swin: batch = images x windows, keys = one window's tokens) cannot be
matched by position: a :func:`atman_kernels.suppression.key_layouts` context gives such a
module a :class:`atman_kernels.suppression.KeyLayout`, the factor column of every key of every
window (the factors then index whatever the caller's positions are, e.g. regions of an image)
and optionally the keys each window's queries may see, so that an additive mask's large
negative entries (Swin's shifted windows add -100) are excluded as a mask, not scored.

Exact or refused. Every call is checked before any work, and a refusal names the model (once
:func:`atman_attention` ran; else the module class and ``model_type``) and the argument:

- a keyword argument that is not None must be implemented here (``position_bias``,
  ``sliding_window`` when the mask encodes it, the ``atman_*`` ones) or listed in
  :data:`HARMLESS_ATTENTION_KWARGS` with the reason; :data:`REFUSED_ATTENTION_KWARGS` says why
  the known others (sparse ``indices``, flash varlen) are refused, and any unknown one is
  refused as well;
- a decoder's self-attention that declares ``is_causal=False`` while the mask function skipped
  the causal mask (bigbird_pegasus: future tokens would leak);
- a module that appends compressed summaries of token blocks to its keys (a ``compressor``,
  DeepSeek-V4): no factor reaches a token's share of a summary;
- a model class without ``_supports_attention_backend = True`` (and not of a family in
  :data:`VERIFIED_ATTENTION_ROUTING`, hybrids whose attention was read by hand):
  :func:`atman_attention` refuses it at once; a sub-model without it (an audio tower) at its
  first call.
  transformers 5.24 itself never reads the flag for a registered implementation
  (``get_correct_attn_implementation`` only checks that the name is registered;
  ``PreTrainedModel.is_backend_compatible()`` is called nowhere), and the attention function
  receives the module, not the model. So ``from_pretrained(..., attn_implementation="atman")``
  and ``set_attn_implementation("atman")`` cannot refuse such a model without patching
  transformers; instead the first call of its attention refuses it when no model class in
  the module's source file declares the flag.

A model whose decoder attention never calls the interface (git's text layers, bloom) never
reaches any of these checks: :func:`count_attention_calls` and :func:`check_layers_routed`
catch it after a forward (the explainer runs them after its first forward), with
:func:`decoder_attention_modules` listing what must be reached.

Layout, each module importing only those above it in this list: :mod:`._tags` (the attributes
set on modules and masks), :mod:`.masks` (the mask function and mask plans), :mod:`.factors`
(the factors of a call's keys, key layouts), :mod:`.guards` (the per-call refusals),
:mod:`.routing` (which models and modules may use "atman"), :mod:`.layers` (decoder layers and
call counting), :mod:`.attention` (the attention function, registered on import),
:mod:`.switch` (:func:`atman_attention`).
"""

from __future__ import annotations

from ._tags import ATTN_IMPLEMENTATION
from .attention import atman_attention_forward
from .guards import HARMLESS_ATTENTION_KWARGS, REFUSED_ATTENTION_KWARGS, WINDOWED_ATTENTION
from .layers import (
    AttentionCallCounts,
    check_layers_routed,
    count_attention_calls,
    decoder_attention_modules,
)
from .masks import atman_mask
from .routing import VERIFIED_ATTENTION_ROUTING, check_supported, interface_attention_modules
from .switch import assign_layer_indices, atman_attention

__all__ = [
    "ATTN_IMPLEMENTATION",
    "HARMLESS_ATTENTION_KWARGS",
    "REFUSED_ATTENTION_KWARGS",
    "VERIFIED_ATTENTION_ROUTING",
    "WINDOWED_ATTENTION",
    "AttentionCallCounts",
    "assign_layer_indices",
    "atman_attention",
    "atman_attention_forward",
    "atman_mask",
    "check_layers_routed",
    "check_supported",
    "count_attention_calls",
    "decoder_attention_modules",
    "interface_attention_modules",
]
