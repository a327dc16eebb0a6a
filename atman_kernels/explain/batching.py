"""How many AtMan variants go through one forward, and recovery from out-of-memory errors.

- :func:`available_memory`: a safe share of the free memory of a device;
- :func:`bytes_per_variant`: the extra memory one more variant in the batch costs (KV cache,
  transient activations, materialised attention scores, logits);
- :func:`auto_chunk_size`: the chunk size that fits a memory budget;
- :class:`ChunkPolicy`: variants per forward for the explainer (a fixed number, or "auto");
- :func:`run_chunked`: runs a function over chunks of items and, when a chunk raises an
  out-of-memory error, splits it in half and retries (and keeps the smaller size afterwards).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")


def is_oom_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (CUDA, CPU allocator or MPS)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, (RuntimeError, MemoryError)):
        text = str(exc).lower()
        return (
            isinstance(exc, MemoryError)
            or "out of memory" in text
            or "can't allocate" in text
            or "cannot allocate" in text
        )
    return False


def available_memory(device: torch.device | str = "cpu", share: float | None = None) -> int:
    """Bytes the explainer may use on ``device``: a share of what is free now.

    CUDA: ``torch.cuda.mem_get_info`` free memory x 0.8. CPU: available memory (psutil if
    installed, else ``MemAvailable`` from /proc/meminfo, else 4 GiB) x 0.5.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * (0.8 if share is None else share))
    free = None
    try:
        import psutil

        free = int(psutil.virtual_memory().available)
    except Exception:  # psutil missing or unusable: read /proc
        try:
            with open("/proc/meminfo", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        free = int(line.split()[1]) * 1024
                        break
        except OSError:
            free = None
    if free is None:
        free = 4 * 2**30
    return int(free * (0.5 if share is None else share))


def _cfg(config: Any, *names: str, default: int) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def _layer_configs(config: Any) -> list[Any] | None:
    """One config per layer of a heterogeneous config (transformers' ``per_layer_config``:
    Gemma 4, dots3), else None.

    Such a config refuses to give a per-layer attribute (``head_dim``, ``num_key_value_heads``,
    ...) globally (``AmbiguousGlobalPerLayerAttributeError``); each layer's view holds the
    layer's own values and every global one.
    """
    if not getattr(config, "is_heterogeneous", False):
        return None
    return list(config.per_layer_config)


def _attention_sizes(config: Any) -> tuple[int, int, int, int, int]:
    """(hidden, heads, kv heads, head dim, MLP intermediate) of one layer's config."""
    hidden = _cfg(config, "hidden_size", "n_embd", "d_model", default=1024)
    heads = _cfg(config, "num_attention_heads", "n_head", default=16)
    kv_heads = _cfg(config, "num_key_value_heads", default=heads)
    head_dim = _cfg(config, "head_dim", default=max(1, hidden // heads))
    inter = _cfg(config, "intermediate_size", "n_inner", default=4 * hidden)
    return hidden, heads, kv_heads, head_dim, inter


def bytes_per_variant(
    config: Any,
    *,
    len_q: int,
    len_k: int,
    n_logits: int,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Estimated memory of one variant in a forward over ``len_q`` queries and ``len_k`` keys.

    Sum of: the KV cache of every layer (one copy per variant: chunks run on the prefix
    buffer, which each forward writes in place, :class:`.tasks.PrefixBuffer`), transient
    activations of one layer (hidden states, MLP intermediate), the
    materialised fp32 attention scores of one layer (the reference backend's [H, Nq, Nk] and
    a few temporaries) and the fp32 logits of ``n_logits`` positions (with log-softmax).

    Heterogeneous configs (per-layer head dims, head counts, ...: ``per_layer_config``) are
    read layer by layer: the KV cache sums each layer's own size, activations and scores take
    the largest layer.
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    elt = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    per_layer = _layer_configs(config)
    if per_layer:
        sizes = [_attention_sizes(c) for c in per_layer]
        first = per_layer[0]
    else:
        layers = _cfg(config, "num_hidden_layers", "n_layer", "num_layers", default=24)
        sizes = [_attention_sizes(config)] * layers
        first = config
    hidden = max(s[0] for s in sizes)
    heads = max(s[1] for s in sizes)
    inter = max(s[4] for s in sizes)
    vocab = _cfg(first, "vocab_size", "num_labels", default=32000)
    kv_cache = sum(2 * kv_heads * head_dim * len_k * elt  # keys and values
                   for _, _, kv_heads, head_dim, _ in sizes)
    activations = len_q * (8 * hidden + 3 * inter) * elt
    scores = 4 * heads * len_q * len_k * 4
    logits = 3 * n_logits * vocab * 4
    return int(kv_cache + activations + scores + logits)


def auto_chunk_size(
    n_variants: int, per_variant: int, budget: int, *, minimum: int = 1
) -> int:
    """Largest chunk (1 .. n_variants) whose ``per_variant`` bytes fit in ``budget``."""
    if n_variants < 1:
        return 1
    fit = budget // max(1, per_variant)
    return int(max(minimum, min(n_variants, fit)))


# A chunk's smallest suppressed position decides how much of the sequence it recomputes; with
# prefix reuse and an automatic chunk size, the variants are spread over about this many chunks
# (K equal chunks of single-token variants cost (K+1)/(2K) of the full-recompute work), but a
# chunk keeps at least MIN_CHUNK_WITH_REUSE variants so that small inputs do not pay the fixed
# cost of many tiny forwards.
CHUNKS_WITH_REUSE = 16
MIN_CHUNK_WITH_REUSE = 4
# On CPU very large batches are slower per token than medium ones (measured on SmolLM2-135M,
# 2 cores: 130 variants x 130 tokens in one forward took 1.5x longer than one variant per
# forward), so "auto" keeps a CPU forward at about this many query tokens.
CPU_TOKENS_PER_FORWARD = 2048


@dataclass(frozen=True)
class ChunkPolicy:
    """How many variants go through one forward.

    ``batch_size`` a fixed number, or "auto": as many as ``max_memory`` bytes hold (default: a
    safe share of the device's free memory, :func:`available_memory`), at most
    ``CPU_TOKENS_PER_FORWARD`` query tokens per forward on CPU, and with prefix reuse spread
    over about ``CHUNKS_WITH_REUSE`` chunks.
    """

    batch_size: int | str
    max_memory: int | None
    device: torch.device
    dtype: torch.dtype
    config: Any

    def size(self, n_variants: int, *, len_q: int, len_k: int, n_logits: int,
             reuse: bool) -> int:
        if self.batch_size != "auto":
            return max(1, min(int(self.batch_size), n_variants))
        budget = self.max_memory if self.max_memory is not None else available_memory(
            self.device)
        per = bytes_per_variant(self.config, len_q=len_q, len_k=len_k, n_logits=n_logits,
                                dtype=self.dtype)
        chunk = auto_chunk_size(n_variants, per, budget)
        if self.device.type == "cpu":
            chunk = max(1, min(chunk, CPU_TOKENS_PER_FORWARD // max(1, len_q)))
        if reuse:
            spread = max(MIN_CHUNK_WITH_REUSE, math.ceil(n_variants / CHUNKS_WITH_REUSE))
            chunk = min(chunk, spread)
        return chunk


def run_chunked(
    items: Sequence[T],
    chunk_size: int,
    fn: Callable[[Sequence[T]], torch.Tensor],
    *,
    on_done: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """``torch.cat([fn(chunk) for chunk in chunks(items)])`` with out-of-memory recovery.

    ``fn`` takes a non-empty slice of ``items`` and returns a tensor whose first dimension is
    the slice length. A chunk that raises an out-of-memory error is split in half and each half
    is retried; later chunks use the reduced size. A single item that still runs out of memory
    re-raises the error. ``on_done(n)`` is called after every ``n`` finished items.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    results: list[torch.Tensor] = []
    size = int(chunk_size)
    start = 0
    while start < len(items):
        chunk = items[start : start + size]
        try:
            out = fn(chunk)
        except Exception as exc:  # noqa: BLE001 - filtered right below
            if not is_oom_error(exc) or len(chunk) == 1:
                raise
            _release_memory()
            size = max(1, len(chunk) // 2)
            log.warning("out of memory with %d variants per forward; retrying with %d",
                        len(chunk), size)
            continue
        if out.shape[0] != len(chunk):
            raise RuntimeError(
                f"chunk function returned {out.shape[0]} rows for {len(chunk)} items"
            )
        results.append(out)
        start += len(chunk)
        if on_done is not None:
            on_done(len(chunk))
    return torch.cat(results) if results else torch.empty(0)


def _release_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
