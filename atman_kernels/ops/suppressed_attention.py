"""The public op: validate once, pick a backend, run it.

Backends (each in its own module, each taking the same validated call):

- ``reference``: plain PyTorch with materialised scores (:mod:`.reference`), any float dtype;
- ``triton``: the fused GPU kernel (:mod:`.triton_backend`); on CPU tensors it runs under
  ``TRITON_INTERPRET=1``;
- ``cpp``: the fused, tiled C++ CPU kernel (:mod:`.cpp_backend`), when the extension is built.
"""

from __future__ import annotations

import torch

from . import cpp_backend, triton_backend
from ._checks import check_call
from .reference import reference_attention

BACKENDS = ("auto", "reference", "triton", "cpp")


class BackendUnavailable(RuntimeError):
    """A named backend cannot take this call; the message says which and why."""


def choose_backend(q: torch.Tensor, call) -> tuple[str, str | None]:
    """Backend that ``auto`` picks for a validated call, and why a faster one was passed over.

    Returns ``(name, reason)``; ``reason`` is None when the first choice fits.
    """
    if q.is_cuda:
        reason = triton_backend.unsupported_reason(q, call)
        if reason is None:
            return "triton", None
        return "reference", f"triton: {reason}"
    reason = cpp_backend.unsupported_reason(q, call)
    if reason is None:
        return "cpp", None
    return "reference", f"cpp: {reason}"


def _interpreter_refusal(q: torch.Tensor) -> str | None:
    """Why Triton's CPU interpreter must not take this call, or None.

    bfloat16 under ``TRITON_INTERPRET=1`` returns wrong numbers without raising (see
    docs/settings.md, backends; measured again in tests/test_op_api.py), so the dispatch refuses it.
    """
    if q.dtype == torch.bfloat16 and triton_backend._interpreter_on():
        return (
            "bfloat16 under the Triton interpreter (TRITON_INTERPRET=1) gives wrong results; "
            "use float16 or float32 there, or backend='cpp' / 'reference' for bfloat16"
        )
    return None


def suppressed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    factors: torch.Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    mode: str = "paper",
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with a per-variant suppression factor on every key, all variants in one call.

    Args:
        q: [Bq, Hq, Nq, D] queries.
        k, v: [Bk, Hkv, Nk, D] keys and values; Hq must be a multiple of Hkv (GQA, MQA).
        factors: [B, Nk] suppression factor of every key for every variant (finite, >= 0,
            1 = untouched, 0 = suppressed fully, > 1 amplifies). The batch B of the call is
            ``factors.shape[0]`` (``max(Bq, Bk)`` when None); Bq and Bk are each 1 (shared by
            every variant, never copied) or B. None = plain attention.
        causal: mask future keys, bottom-right aligned: query row i sits at absolute position
            Nk - Nq + i (a KV cache, a suffix-only recompute).
        scale: score scale, default 1 / sqrt(D).
        mode: ``"paper"``: s' = m + f (s - m) with m the row minimum over visible keys;
            ``"log"``: s' = s + log f.
        key_padding_mask: [B or 1, Nk] bool, True = a real key. Padded keys are never attended
            and never count for the row minimum. A row with no visible key gives zeros.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cpp"``.
        softcap: attention logit soft-capping c > 0 (Gemma 2's ``attn_logit_softcapping``):
            every scaled score becomes c * tanh(s / c) before the mask and the suppression
            (paper mode's row minimum is the minimum of the capped scores). None = no cap.
        sinks: [Hq] per-head sink logits (GPT-OSS's ``sinks``): each joins its head's softmax
            denominator as one more column whose value row is zero; never suppressed and no
            part of the row minimum. None = no sinks.

    Returns:
        [B, Hq, Nq, D] in q's dtype; accumulation is fp32 (fp64 for float64 inputs).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    call = check_call(
        q, k, v, factors, causal, scale, mode, key_padding_mask, softcap=softcap, sinks=sinks
    )
    if backend == "auto":
        backend, _ = choose_backend(q, call)
    if backend == "reference":
        return reference_attention(q, k, v, factors, key_padding_mask, call, sinks=sinks)
    module = triton_backend if backend == "triton" else cpp_backend
    reason = module.unsupported_reason(q, call)
    if reason is None and backend == "triton":
        reason = _interpreter_refusal(q)
    if reason is not None:
        raise BackendUnavailable(f"backend={backend!r} cannot run this call: {reason}")
    return module.run(q, k, v, factors, key_padding_mask, call, sinks=sinks)
