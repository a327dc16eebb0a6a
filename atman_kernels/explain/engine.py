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

A design that chooses its next rows from the rises of the previous ones (hierarchical
refinement) runs several rounds on one :class:`VariantRunner`: the baseline (and the cached
prefix it leaves) is computed once, each :meth:`VariantRunner.run` runs one round of rows.
:func:`run_variants` is the one-round case.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..suppression import suppression
from .batching import run_chunked
from .factors import first_changed_position


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


class VariantRunner:
    """Runs rounds of factor rows through one task: the baseline once, then any number of
    :meth:`run` calls (each sorted by earliest suppressed position and chunked).

    Args: as :func:`run_variants` (``factors`` come per round).
    """

    def __init__(
        self,
        task: Task,
        *,
        mode: str,
        layers: Sequence[int] | None,
        chunk_size: Callable[[bool], int],
        device: torch.device | str = "cpu",
        on_done: Callable[[int], None] | None = None,
        guard: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.task, self.mode, self.layers = task, mode, layers
        self.chunk_size, self.on_done, self.guard = chunk_size, on_done, guard
        self.device = torch.device(device)
        self.baseline: torch.Tensor | None = None
        self.variants = 0  # rows run so far (all rounds)
        self.rounds = 0
        self.chunk = 1

    def start(self) -> torch.Tensor:
        """Run the unsuppressed baseline (under ``guard``) and return its [T] float64 CE."""
        if self.baseline is None:
            n = self.task.seq_len
            with self.guard() if self.guard is not None else nullcontext(), suppression(
                torch.ones(1, n, device=self.device), self.mode, self.layers
            ):
                self.baseline = self.task.baseline().to(torch.float64)
        return self.baseline

    @property
    def reuse(self) -> bool:
        return bool(self.task.reuse)

    def run(self, factors: torch.Tensor) -> torch.Tensor:
        """[V, T] float64 CE rises of the rows of ``factors`` [V, N] (order as given)."""
        base = self.start()
        n_variants, n = factors.shape
        if n != self.task.seq_len:
            raise ValueError(f"factors cover {n} positions, the task's input has "
                             f"{self.task.seq_len}")
        if n_variants == 0:
            return torch.zeros(0, base.shape[0], dtype=torch.float64)
        reuse = self.reuse
        first = first_changed_position(factors.cpu()).clamp(max=n - 1)
        if not reuse:
            first = torch.zeros_like(first)
        order = torch.argsort(first, stable=True).tolist()
        chunk = max(1, min(int(self.chunk_size(reuse)), max(1, n_variants)))
        self.chunk = max(self.chunk, chunk)

        def run(chunk_idx: Sequence[int]) -> torch.Tensor:
            idx = torch.as_tensor(list(chunk_idx), dtype=torch.long)
            start = int(first[idx].min())
            with suppression(factors[idx.to(factors.device)], self.mode, self.layers):
                ce = self.task.run(idx.numel(), start).to(torch.float64)
            return ce - base

        rise_sorted = run_chunked(order, chunk, run, on_done=self.on_done)
        rise = torch.empty_like(rise_sorted)
        rise[torch.as_tensor(order, dtype=torch.long)] = rise_sorted
        self.variants += n_variants
        self.rounds += 1
        return rise

    def result(self, rise: torch.Tensor) -> EngineResult:
        """An :class:`EngineResult` of ``rise`` with this runner's counts."""
        return EngineResult(rise=rise, baseline=self.start(), forwards=self.task.forwards,
                            token_forwards=self.task.token_forwards, chunk_size=self.chunk,
                            prefix_reuse=self.reuse)


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
    if factors.shape[1] != task.seq_len:
        raise ValueError(f"factors cover {factors.shape[1]} positions, the task's input has "
                         f"{task.seq_len}")
    runner = VariantRunner(task, mode=mode, layers=layers, chunk_size=chunk_size,
                           device=factors.device, on_done=on_done, guard=guard)
    return runner.result(runner.run(factors))


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] in float64: logits [..., V], target [...] -> [...].

    The score is a difference of two cross-entropies, so it is taken in float64 (only the
    target positions' logits reach here, so this is cheap).
    """
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    target = target.expand(logp.shape[:-1])
    return -logp.gather(-1, target[..., None])[..., 0]
