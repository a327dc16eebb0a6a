"""The prefix cache of exact prefix reuse (:class:`atman_kernels.explain.tasks.PrefixBuffer`).

Chunks of variants run on top of one preallocated buffer per layer that holds the
unsuppressed keys and values; each chunk writes its own states in place and the next one
restores only what it needs. These tests run chunks in orders the engine never uses (a lower
start after a higher one, batch sizes that grow and shrink) and compare every chunk with the
independent brute force (one full eager forward per variant), so a position left holding a
previous chunk's suppressed states would show.
"""

from __future__ import annotations

import pytest
import torch
from _brute import _brute_causal_rows, _close, tiny_gpt2, tiny_llama

from atman_kernels.explain.tasks import CausalLMTask, PrefixBuffer
from atman_kernels.hf import atman_attention
from atman_kernels.suppression import suppression

N_PROMPT, N_TARGET = 14, 3
# (batch, start) in an order that exercises every restore case: ascending starts, a start
# lower than the previous one, a repeated start, a smaller then a larger batch than the first
CHUNKS = [(3, 2), (3, 7), (1, 11), (2, 4), (3, 12), (2, 1), (3, 9)]
# single-variant chunks first: the buffer adopts the baseline's cache and recomputes what a
# chunk overwrote (ascending, lower and repeated starts), then a larger batch makes it whole
CHUNKS_ONE_FIRST = [(1, 2), (1, 7), (1, 5), (1, 7), (1, 11), (3, 4), (1, 12), (2, 9)]


def _rows(batch: int, start: int, n: int, seed: int) -> torch.Tensor:
    """[batch, n] factor rows whose earliest suppressed position is ``start``."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.ones(batch, n)
    rows[:, start] = 0.1
    for b in range(batch):  # a second suppressed position after start, different per row
        later = int(torch.randint(start, n, (1,), generator=gen))
        rows[b, later] = float(torch.rand(1, generator=gen)) * 0.5
    return rows


@pytest.mark.parametrize("chunks", [CHUNKS, CHUNKS_ONE_FIRST], ids=["copies", "recompute"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["paper", "log"])
def test_chunks_on_the_prefix_buffer_match_the_brute_force(make, mode, chunks):
    model = make(seed=3)
    gen = torch.Generator().manual_seed(5)
    seq = torch.randint(1, 61, (N_PROMPT + N_TARGET,), generator=gen)
    ids, target = seq[:-1], seq[N_PROMPT:]
    n = int(ids.numel())
    task = CausalLMTask(model, ids, N_PROMPT, target, reuse=True)
    with torch.inference_mode(), atman_attention(model):
        with suppression(torch.ones(1, n), mode):
            base = task.baseline()
        assert task.reuse, "the tiny model's cache should allow prefix reuse"
        got = []
        for i, (batch, start) in enumerate(chunks):
            rows = _rows(batch, start, n, seed=i)
            with suppression(rows, mode):
                got.append((rows, task.run(batch, start) - base))
    for rows, rise in got:
        want = _brute_causal_rows(model, ids.tolist(), N_PROMPT, target.tolist(), rows,
                                  mode=mode)  # [T, batch]
        _close(rise, want.T)


def test_the_buffer_is_allocated_once_and_written_in_place():
    model = tiny_llama(seed=1)
    ids = torch.randint(1, 61, (12,), generator=torch.Generator().manual_seed(0))
    task = CausalLMTask(model, ids, 9, torch.tensor([5, 6, 7, 8]), reuse=True)  # 9 + 4 - 1
    with torch.inference_mode(), atman_attention(model):
        with suppression(torch.ones(1, 12), "paper"):
            task.baseline()
        with suppression(_rows(3, 2, 12, seed=0), "paper"):
            task.run(3, 2)
        buffer = task._prefix
        pointers = [layer.key_buffer.data_ptr() for layer in buffer.layers]
        cache = buffer.cache
        for batch, start in [(3, 5), (2, 8), (1, 3)]:
            with suppression(_rows(batch, start, 12, seed=start), "paper"):
                task.run(batch, start)
            assert task._prefix is buffer and buffer.cache is cache
            assert [layer.key_buffer.data_ptr() for layer in buffer.layers] == pointers
            # the views the last forward read cover the whole sequence, contiguously
            for layer in buffer.layers:
                assert layer.keys.shape[0] == batch and layer.keys.shape[-2] == 12
                assert layer.keys.is_contiguous() and layer.values.is_contiguous()


def test_rows_below_the_start_hold_the_unsuppressed_states():
    kv = [(torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4)) for _ in range(2)]
    buffer = PrefixBuffer(kv)
    cache, first = buffer.for_chunk(3, 6)
    assert first == 6 and not buffer.recomputes
    for layer in cache.layers:  # a forward of 4 new positions, as the model would write them
        layer.update(torch.full((3, 2, 4, 4), 7.0), torch.full((3, 2, 4, 4), 7.0))
    # rows 0-1 get positions 6-7 back; then row 2 needs 6-8 and rows 0-1 need 8
    for batch, start in [(2, 8), (3, 9)]:
        buffer.for_chunk(batch, start)
        for (k, v), layer in zip(kv, buffer.layers, strict=True):
            assert torch.equal(layer.keys, k[:, :, :start].expand(batch, -1, -1, -1))
            assert torch.equal(layer.values, v[:, :, :start].expand(batch, -1, -1, -1))
            assert layer.get_seq_length() == start


def test_prefix_buffer_refuses_what_does_not_fit():
    kv = [(torch.zeros(1, 2, 10, 4), torch.zeros(1, 2, 10, 4))]
    buffer = PrefixBuffer(kv)
    with pytest.raises(ValueError, match="start must be in 1..10, got 0"):
        buffer.for_chunk(1, 0)
    cache, _ = buffer.for_chunk(2, 7)
    with pytest.raises(RuntimeError, match="do not fit after 7 positions"):
        cache.layers[0].update(torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4, 4))
    with pytest.raises(RuntimeError, match="new states of batch 1"):
        cache.layers[0].update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))


def test_single_variant_chunks_adopt_the_baseline_cache_and_recompute_overwritten_positions():
    model = tiny_llama(seed=2)
    ids = torch.randint(1, 61, (12,), generator=torch.Generator().manual_seed(1))
    task = CausalLMTask(model, ids, 9, torch.tensor([5, 6, 7, 8]), reuse=True)
    with torch.inference_mode(), atman_attention(model):
        with suppression(torch.ones(1, 12), "log"):
            task.baseline()
        baseline_keys = [k.data_ptr() for k, _ in task._kv]
        tokens = task.token_forwards
        with suppression(_rows(1, 3, 12, seed=0), "log"):
            task.run(1, 3)
        buffer = task._prefix
        assert buffer.recomputes and task._kv is None and buffer.kv is None
        # no second copy of the cache: the buffer is the baseline forward's own tensors
        assert [layer.key_buffer.data_ptr() for layer in buffer.layers] == baseline_keys
        assert task.token_forwards == tokens + 9  # positions 3..11
        with suppression(_rows(1, 8, 12, seed=1), "log"):
            task.run(1, 8)
        assert task.forwards == 3  # no extra forward: the chunk itself starts earlier
        assert task.token_forwards == tokens + 9 + 9  # 3..7 recomputed unsuppressed, 8..11


def test_prefix_buffer_in_recompute_mode_starts_chunks_where_rows_stop_being_clean():
    kv = [(torch.randn(1, 2, 10, 3), torch.randn(1, 2, 10, 3)) for _ in range(2)]
    want = [(k.clone(), v.clone()) for k, v in kv]

    def forward(cache, batch, first, start):
        """What a chunk's forward writes: unsuppressed states below start, others after."""
        for layer, (k, _) in zip(cache.layers, want, strict=True):
            new_k = torch.cat([k[:, :, first:start].expand(batch, -1, -1, -1),
                               torch.full((batch, 2, 10 - start, 3), -1.0)], dim=2)
            layer.update(new_k, new_k.clone())

    buffer = PrefixBuffer(kv)
    cache, first = buffer.for_chunk(1, 6)
    assert buffer.recomputes and first == 6 and buffer.kv is None
    assert buffer.layers[0].key_buffer is kv[0][0]  # adopted, not copied
    forward(cache, 1, first, 6)
    for start, expect in [(4, 4), (8, 4), (8, 8), (9, 8)]:  # lower, higher, repeated
        cache, first = buffer.for_chunk(1, start)
        assert first == expect
        assert [layer.get_seq_length() for layer in cache.layers] == [first, first]
        forward(cache, 1, first, start)
    cache, first = buffer.for_chunk(3, 9)  # grows: every row copied from row 0's clean part
    assert first == 9 and buffer.recomputes and buffer.clean == [9, 9, 9]
    for (k, _), layer in zip(want, buffer.layers, strict=True):
        assert torch.equal(layer.keys, k[:, :, :9].expand(3, -1, -1, -1))
    forward(cache, 3, first, 9)
    _, first = buffer.for_chunk(2, 9)
    assert first == 9
