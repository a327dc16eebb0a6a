"""The variant engine: factor rows -> chunked forwards with prefix reuse -> float64 CE rises.

Every explanation, whatever the model or the unit (token, word, sentence, span, image patch),
is the same loop, and this module is its only copy:

1. a *task* (:class:`Task`: a front end in :mod:`.tasks` built the model inputs and the
   targets) runs the unsuppressed baseline once and returns the cross-entropy of each target
   row, in float64;
2. the variants (one row of factors over the input positions each) are sorted by their
   earliest suppressed position and cut into chunks;
3. each chunk runs as one batched forward under :func:`atman_kernels.suppression`; a task that
   supports prefix reuse recomputes only the positions from the chunk's earliest suppressed
   position on (every earlier hidden state is unchanged, docs/semantics.md, exact prefix reuse);
4. the result is the rise of every target row's cross-entropy for every variant, [V, T].

Chunks that run out of memory are split and retried (:func:`.batching.run_chunked`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..suppression import suppression
from .batching import run_chunked
from .conceptual import first_changed_position


class Task(Protocol):
    """What the engine needs from a front end.

    Attributes:
        seq_len: number of input positions the factor rows index (N).
        n_targets: number of target rows T (target tokens; 1 for a class).
        reuse: whether :meth:`run` accepts ``start`` > 0 (exact prefix reuse); a task may
            turn it off in :meth:`baseline` (e.g. when the model's cache cannot be reused).
        forwards, token_forwards: model forwards the task ran so far, and the query tokens
            they held (batch x length), for the explanation's settings.
        reuse_off: optional: why :meth:`baseline` turned ``reuse`` off (for settings).
        attention_shape: optional (queries, keys) of the largest attention call per variant
            when it is not (N, N) (Swin: a stage's tokens, one window's keys), for the
            memory estimate of the chunk size.
    """

    seq_len: int
    n_targets: int
    reuse: bool
    forwards: int
    token_forwards: int

    def baseline(self) -> torch.Tensor:
        """[T] float64 cross-entropy of each target row without suppression (called once,
        first, under factors 1)."""

    def run(self, batch: int, start: int) -> torch.Tensor:
        """[batch, T] float64 cross-entropy under the active suppression of ``batch`` variants;
        positions before ``start`` are unchanged by every variant of the batch."""


@dataclass
class EngineResult:
    """The rises [V, T] (float64; variant order as given), the baseline [T] and the counts."""

    rise: torch.Tensor
    baseline: torch.Tensor
    forwards: int
    token_forwards: int
    chunk_size: int
    prefix_reuse: bool


def run_variants(
    task: Task,
    factors: torch.Tensor,
    *,
    mode: str,
    layers: Sequence[int] | None,
    chunk_size: Callable[[bool], int],
    on_done: Callable[[int], None] | None = None,
    guard: Callable[[], AbstractContextManager[Any]] | None = None,
) -> EngineResult:
    """Run every variant of ``factors`` [V, N] through ``task`` and return the CE rises.

    Args:
        task: the front end (see :class:`Task`).
        factors: [V, N] suppression factors, one row per variant, on the model's device.
        mode: "paper" or "log".
        layers: the suppressed layers (None = all).
        chunk_size: variants per forward, given whether prefix reuse is on.
        on_done: called with the number of variants each finished chunk held.
        guard: a context manager factory wrapped around the baseline forward, e.g. one that
            counts the attention calls and raises if the suppression cannot reach every
            suppressed layer (so no explanation of a model that ignores it is returned).
    """
    n_variants, n = factors.shape
    if n != task.seq_len:
        raise ValueError(f"factors cover {n} positions, the task's input has {task.seq_len}")
    with guard() if guard is not None else nullcontext(), suppression(
        torch.ones(1, n, device=factors.device), mode, layers
    ):
        base = task.baseline().to(torch.float64)
    reuse = bool(task.reuse)
    first = first_changed_position(factors.cpu()).clamp(max=n - 1)
    if not reuse:
        first = torch.zeros_like(first)
    order = torch.argsort(first, stable=True).tolist()
    chunk = max(1, min(int(chunk_size(reuse)), max(1, n_variants)))

    def run(chunk_idx: Sequence[int]) -> torch.Tensor:
        idx = torch.as_tensor(list(chunk_idx), dtype=torch.long)
        start = int(first[idx].min())
        with suppression(factors[idx.to(factors.device)], mode, layers):
            ce = task.run(idx.numel(), start).to(torch.float64)
        return ce - base

    rise_sorted = run_chunked(order, chunk, run, on_done=on_done)
    rise = torch.empty_like(rise_sorted)
    rise[torch.as_tensor(order, dtype=torch.long)] = rise_sorted
    return EngineResult(rise=rise, baseline=base, forwards=task.forwards,
                        token_forwards=task.token_forwards, chunk_size=chunk,
                        prefix_reuse=reuse)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] in float64: logits [..., V], target [...] -> [...].

    The score is a difference of two cross-entropies, so it is taken in float64 (only the
    target positions' logits reach here, so this is cheap).
    """
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    target = target.expand(logp.shape[:-1])
    return -logp.gather(-1, target[..., None])[..., 0]
