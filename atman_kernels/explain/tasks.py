"""Tasks for the variant engine (:mod:`.engine`): how one kind of model runs its forwards.

- :class:`CausalLMTask`: teacher forcing on prompt + target[:-1], cross-entropy of each target
  token from the logits one position earlier, logits computed at the target positions only,
  exact prefix reuse through the model's KV cache;
- :class:`ClassificationTask`: one forward over fixed model inputs (token ids or pixel values),
  the cross-entropy of one class.

A task only runs forwards: the front ends in :mod:`.explainer` build its inputs and targets.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

import torch

from .engine import cross_entropy

log = logging.getLogger(__name__)


def _cache_argument(model: Any) -> str:
    """The name a model's forward takes its KV cache under.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns and goes in
    5.40); older 5.x releases only know ``past_key_values``.
    """
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(out: Any) -> Any:
    """The cache of a model output, read under its current name (no deprecation warning)."""
    for name in ("cache", "past_key_values"):
        if name in out.keys():
            return out[name]
    return None


def cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """(keys, values) [1, Hkv, N, D] of every layer of a plain full-attention cache, else None.

    None (prefix reuse impossible) for sliding-window layers, layers that keep no keys
    (recurrent state) or caches of another structure.
    """
    if cache is None:
        return None
    if hasattr(cache, "self_attention_cache"):
        cache = cache.self_attention_cache
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if type(cache) is not DynamicCache:
        return None
    out = []
    for layer in layers:
        # exactly a plain full-attention layer: subclasses carry state of their own (the conv
        # and recurrent states of linear-attention hybrids) that a rebuilt prefix would drop
        if type(layer) is not DynamicLayer or getattr(layer, "is_sliding", False) or getattr(
                layer, "keys", None) is None:
            return None
        out.append((layer.keys, layer.values))
    return out


def _cache_of(layers: list[Any]) -> Any:
    """A DynamicCache made of ``layers`` (cache layers built here, not by the cache)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layers = list(layers)
    return cache


def prefix_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], p: int, batch: int) -> Any:
    """A DynamicCache holding the first ``p`` positions of ``kv``, expanded (not copied) to
    ``batch`` variants: the forward's update then writes prefix and new states into one new
    tensor per layer (one copy; :class:`PrefixBuffer` avoids even that where it can)."""
    from transformers.cache_utils import DynamicLayer

    layers = []
    for k, v in kv:
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys = k[:, :, :p].expand(batch, -1, -1, -1)
        layer.values = v[:, :, :p].expand(batch, -1, -1, -1)
        layers.append(layer)
    return _cache_of(layers)


@functools.lru_cache(maxsize=1)
def _buffer_layer_class() -> type:
    """The cache layer of :class:`PrefixBuffer` (a DynamicLayer that writes in place)."""
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """Keys and values [B, H, L, D] in preallocated buffers. ``keys``/``values`` are the
        views [:batch, :, :length] of the cached part; :meth:`update` copies the new states
        into the buffers right after it and widens the views (a DynamicLayer concatenates,
        i.e. copies the whole cache, at every update)."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            super().__init__()
            self.lazy_initialization(keys, values)
            self.key_buffer, self.value_buffer = keys, values

        def show(self, batch: int, length: int) -> None:
            self.keys = self.key_buffer[:batch, :, :length]
            self.values = self.value_buffer[:batch, :, :length]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            batch, have = self.keys.shape[0], self.keys.shape[-2]
            end = have + key_states.shape[-2]
            if key_states.shape[0] != batch or end > self.key_buffer.shape[-2]:
                raise RuntimeError(
                    f"prefix buffer: new states of batch {key_states.shape[0]} and length "
                    f"{key_states.shape[-2]} do not fit after {have} positions of batch {batch} "
                    f"(buffer holds {self.key_buffer.shape[-2]})")
            self.key_buffer[:batch, :, have:end].copy_(key_states)
            self.value_buffer[:batch, :, have:end].copy_(value_states)
            self.show(batch, end)
            return self.keys, self.values

    return BufferLayer


class PrefixBuffer:
    """The unsuppressed sequence's keys and values, served as the prefix cache of every chunk.

    One buffer [B, Hkv, N, D] per layer and per keys/values, allocated once for the largest
    chunk. A chunk gets a cache whose layers show rows [:batch] and positions [:p] of the
    buffers, where p is the first position it must recompute; its forward writes its own
    states for positions p.. in place (no concatenation, and the views over the whole length N
    are contiguous, as the attention wants them). A DynamicCache instead copies the prefix of
    every row into a new tensor in every layer at every chunk.

    A chunk that suppresses nothing before ``start`` leaves positions below ``start`` as the
    unsuppressed forward has them, but an earlier chunk may have overwritten some of them
    (row b is clean only at [0, clean[b])). They come back in one of two ways:

    - **copies** (the first chunk holds several variants): a clean copy of the unsuppressed
      states is kept and [clean[b], start) copied back before the chunk, so p = start. The
      buffers hold B + 1 copies of the sequence's cache.
    - **recompute** (the first chunk holds one variant: long inputs, the usual case on CPU):
      the buffer *is* the unsuppressed forward's cache (adopted, not copied, and no clean copy
      is kept); the chunk starts at p = min(start, clean) instead, and since its factors are 1
      below ``start``, its forward recomputes [p, start) unsuppressed on the way. With chunks
      sorted by start that is about one forward of the sequence over a whole explanation, and
      AtMan's peak memory stays at one copy of the cache, as a plain forward's.

    Args:
        kv: per layer (keys, values) [1, Hkv, N, D] of the unsuppressed forward.
    """

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = kv
        self.length = int(kv[0][0].shape[-2])
        self.layers: list[Any] = []
        self.clean: list[int] = []  # row b holds the unsuppressed states at [0, clean[b])
        self.cache: Any = None

    @property
    def recomputes(self) -> bool:
        """Whether chunks recompute overwritten positions (no clean copy is kept)."""
        return self.kv is None

    def _allocate(self, batch: int) -> None:
        layer_class = _buffer_layer_class()
        if self.kv is not None and not self.layers and batch == 1:
            self.layers = [layer_class(k, v) for k, v in self.kv]  # adopt: recompute mode
            self.kv = None
            self.clean = [self.length]
        else:  # copies of the clean states, or in recompute mode of row 0 (clean at [0, c))
            source = self.kv if self.kv is not None else [
                (layer.key_buffer[:1], layer.value_buffer[:1]) for layer in self.layers]
            clean = self.length if self.kv is not None else min(self.clean)
            self.layers = [layer_class(k.expand(batch, -1, -1, -1).clone(),
                                       v.expand(batch, -1, -1, -1).clone()) for k, v in source]
            self.clean = [clean] * batch
        self.cache = _cache_of(self.layers)

    def for_chunk(self, batch: int, start: int) -> tuple[Any, int]:
        """(cache, p) for a chunk of ``batch`` variants that suppress nothing before
        ``start``: its forward must run positions p.. (p <= start) on top of the cache;
        valid until the next call."""
        if not 0 < start <= self.length:
            raise ValueError(f"start must be in 1..{self.length}, got {start}")
        if batch > len(self.clean):
            self._allocate(batch)
        if self.kv is None:
            first = min(start, *self.clean[:batch])
        else:
            self._restore_copies(batch, start)
            first = start
        for b in range(batch):  # the forward writes first..; [first, start) unsuppressed
            self.clean[b] = start
        for layer in self.layers:
            layer.show(batch, first)
        return self.cache, first

    def _restore_copies(self, batch: int, start: int) -> None:
        """Copy [clean, start) back from the clean copy, one run of rows with the same clean
        at a time."""
        assert self.kv is not None
        row = 0
        while row < batch:
            clean = self.clean[row]
            end = row + 1
            while end < batch and self.clean[end] == clean:
                end += 1
            if clean < start:
                for layer, (k, v) in zip(self.layers, self.kv, strict=True):
                    layer.key_buffer[row:end, :, clean:start].copy_(k[:, :, clean:start])
                    layer.value_buffer[row:end, :, clean:start].copy_(v[:, :, clean:start])
            row = end

    def states(self, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) [batch, Hkv, length, D] of every layer as the last forward left
        them."""
        return [(layer.key_buffer[:batch, :, :length], layer.value_buffer[:batch, :, :length])
                for layer in self.layers]


class CausalLMTask:
    """Teacher-forced causal LM: input = prompt + target[:-1], T = len(target) target rows.

    Args:
        model: a causal LM (``*ForCausalLM`` / ``*LMHeadModel``).
        input_ids: [N] the model input (prompt then target[:-1]).
        n_prompt: number of prompt tokens (the first target token is read at n_prompt - 1).
        target_ids: [T] the target tokens.
        reuse: try exact prefix reuse (turned off, with a log line, when the model's cache is
            not a plain full-attention cache).
    """

    def __init__(self, model: Any, input_ids: torch.Tensor, n_prompt: int,
                 target_ids: torch.Tensor, *, reuse: bool) -> None:
        self.model = model
        self.ids = input_ids[None]
        self.n_prompt = int(n_prompt)
        self.target = target_ids
        self.seq_len = int(input_ids.numel())
        self.n_targets = int(target_ids.numel())
        self.reuse = bool(reuse)
        self._cache_arg = _cache_argument(model)
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._prefix: PrefixBuffer | None = None  # made from _kv at the first reusing chunk
        self._base: torch.Tensor | None = None
        self.forwards = 0  # model forwards run, and the query tokens they held
        self.token_forwards = 0
        self.reuse_off: str | None = None  # why reuse was asked for but turned off

    def _logits(self, inputs: dict[str, Any], past: Any, keep: int, want_cache: bool
                ) -> tuple[torch.Tensor, Any]:
        """Logits [B, keep, V] of the last ``keep`` positions, and the cache."""
        kwargs = {self._cache_arg: past, "use_cache": want_cache or past is not None, **inputs}
        first = next(iter(inputs.values()))
        self.forwards += 1
        self.token_forwards += int(first.shape[0] * first.shape[1])
        if self._keeps_logits:
            out = self.model(logits_to_keep=keep, **kwargs)
            return out.logits[:, -keep:], _output_cache(out)
        out = self.model.get_decoder()(**kwargs)
        hidden = out.last_hidden_state[:, -keep:]
        return self.model.get_output_embeddings()(hidden), _output_cache(out)

    def _baseline_inputs(self) -> dict[str, Any]:
        """The model inputs of the unsuppressed forward over the whole sequence."""
        return {"input_ids": self.ids}

    def _variant_inputs(self, batch: int, start: int) -> dict[str, Any]:
        """The model inputs of ``batch`` variants from position ``start`` on."""
        return {"input_ids": self.ids[:, start:].expand(batch, -1)}

    def baseline(self) -> torch.Tensor:
        logits, cache = self._logits(self._baseline_inputs(), None, self.n_targets, self.reuse)
        if self.reuse:
            self._kv = cache_tensors(cache)
            if self._kv is None:
                self.reuse = False
                self.reuse_off = (f"{type(self.model).__name__}'s cache is not a plain "
                                  "full-attention cache (sliding-window or recurrent layers)")
                log.info("prefix reuse is off: %s", self.reuse_off)
        self._base = cross_entropy(logits[0], self.target)
        return self._base

    def _past(self, batch: int, start: int) -> tuple[Any, int]:
        """(prefix cache, p) of a chunk that suppresses nothing before ``start``: its forward
        runs positions p.. (p <= start, :meth:`PrefixBuffer.for_chunk`); (None, 0) at 0."""
        if start == 0:
            return None, 0
        if self._prefix is None:
            self._prefix = PrefixBuffer(self._kv)
            self._kv = None  # the buffer holds (or adopted) the unsuppressed states
        return self._prefix.for_chunk(batch, start)

    def run(self, batch: int, start: int) -> torch.Tensor:
        assert self._base is not None, "baseline() runs first"
        n, t = self.seq_len, self.n_targets
        keep = n - max(self.n_prompt - 1, start)  # target positions this chunk recomputes
        past, first = self._past(batch, start)
        logits, _ = self._logits(self._variant_inputs(batch, first), past, keep, False)
        ce = self._base.expand(batch, t).clone()
        ce[:, t - keep:] = cross_entropy(logits, self.target[t - keep:])
        return ce


class ContrastiveLMTask(CausalLMTask):
    """Two continuations of one prompt, the target and a foil: T + F target rows.

    The prompt's positions run once per variant (from the chunk's earliest suppressed position
    on, on top of the reused prefix); each continuation then runs only its own tokens on top of
    the prompt's cache (the first token of each is read from the prompt's last position). So
    the foil costs its own suffix tokens and nothing else. The factors cover the prompt's
    positions; the continuations' positions are never suppressed.

    Args:
        model: a causal LM.
        prompt_ids: [P] the prompt.
        target_ids: [T] the target; foil_ids: [F] the foil.
        reuse: exact prefix reuse within the prompt.
    """

    def __init__(self, model: Any, prompt_ids: torch.Tensor, target_ids: torch.Tensor,
                 foil_ids: torch.Tensor, *, reuse: bool) -> None:
        super().__init__(model, prompt_ids, int(prompt_ids.numel()), target_ids, reuse=reuse)
        self.continuations = (target_ids, foil_ids)
        self.n_targets = int(target_ids.numel() + foil_ids.numel())
        self._plain = False  # no reusable cache: each continuation as a whole sequence

    def _prompt_and_continuations(self, batch: int, first: int, past: Any
                                  ) -> tuple[torch.Tensor | None, Any]:
        """([batch, T + F] CE, the prompt's cache tensors) of a forward of the prompt from
        position ``first`` on top of ``past``, or (None, None) when the cache is not a plain
        full-attention cache (the continuations cannot share it)."""
        ids = self.ids[:, first:].expand(batch, -1)
        logits, cache = self._logits({"input_ids": ids}, past, 1, True)
        # the prompt's states: in the prefix buffer when it served the prefix
        kv = self._prefix.states(batch, self.seq_len) if past is not None else cache_tensors(
            cache)
        if kv is None:
            return None, None
        rows = []
        for cont in self.continuations:
            ce = [cross_entropy(logits[:, -1], cont[:1].expand(batch))[:, None]]
            if cont.numel() > 1:
                suffix = cont[None, :-1].expand(batch, -1)
                rest, _ = self._logits({"input_ids": suffix},
                                       prefix_cache(kv, self.seq_len, batch),
                                       int(cont.numel() - 1), False)
                ce.append(cross_entropy(rest, cont[1:]))
            rows.append(torch.cat(ce, dim=1))
        return torch.cat(rows, dim=1), kv

    def _whole_sequences(self, batch: int) -> torch.Tensor:
        rows = []
        for cont in self.continuations:
            ids = torch.cat([self.ids[0], cont[:-1]])[None].expand(batch, -1)
            logits, _ = self._logits({"input_ids": ids}, None, int(cont.numel()), False)
            rows.append(cross_entropy(logits, cont))
        return torch.cat(rows, dim=1)

    def baseline(self) -> torch.Tensor:
        ce, self._kv = self._prompt_and_continuations(1, 0, None)
        if ce is None:
            self.reuse, self._plain = False, True
            self.reuse_off = (f"{type(self.model).__name__}'s cache is not a plain "
                              "full-attention cache (sliding-window or recurrent layers)")
            log.info("prefix reuse is off: %s", self.reuse_off)
            ce = self._whole_sequences(1)
        self._base = ce[0]
        return self._base

    def run(self, batch: int, start: int) -> torch.Tensor:
        if self._plain:
            return self._whole_sequences(batch)
        past, first = self._past(batch, start)
        ce, _ = self._prompt_and_continuations(batch, first, past)
        return ce


class VisionLanguageTask(CausalLMTask):
    """A vision-language model's causal LM over text and image tokens (LLaVA, Idefics3, Gemma 3).

    The baseline runs the whole model once (``extra`` holds ``pixel_values`` and whatever else
    the model takes) and records what its language model received: the input embeddings with
    the image features merged in, the position ids (for models with multimodal rotary
    positions) and, where the model prepared them itself, the attention masks. Every variant
    then feeds the language model slices of those: the vision tower runs once, unsuppressed
    (its sequence is one image's patches, unrelated to the factors), and prefix reuse works
    across image tokens as across text tokens.

    Prepared masks (Gemma 3: a dict of 4D masks per layer type, in which the tokens of one image
    see each other bidirectionally) are handed to every variant forward as they were in the
    baseline: rows from the chunk's start on, expanded over the variants; never rebuilt from
    the embeddings alone, which would give a plain causal mask. Where a row sees a later key
    (an image token sees the rest of its image), suppressing that key changes earlier rows:
    :meth:`run` lowers the chunk's start to the first row any key from the start on can reach,
    through every layer (the start of the image block), so prefix reuse stays exact.

    Args:
        model: the vision-language model.
        input_ids: [N] the prompt (image tokens included) then target[:-1].
        n_prompt, target_ids, reuse: as for :class:`CausalLMTask`.
        extra: the other model inputs of the baseline forward, batch 1.
        language_model: the sub-model whose inputs are recorded.
    """

    def __init__(self, model: Any, input_ids: torch.Tensor, n_prompt: int,
                 target_ids: torch.Tensor, *, reuse: bool, extra: dict[str, Any],
                 language_model: Any) -> None:
        super().__init__(model, input_ids, n_prompt, target_ids, reuse=reuse)
        self.extra = extra
        self.language_model = language_model
        self._recorded: dict[str, Any] = {}
        self._masks: dict[str, torch.Tensor | None] | None = None
        self._first_row: list[int] | None = None  # first changed row of a start, per start

    def _baseline_inputs(self) -> dict[str, Any]:
        return {"input_ids": self.ids, **self.extra}

    def baseline(self) -> torch.Tensor:
        def record(module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
            self._recorded = dict(kwargs)

        handle = self.language_model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            base = super().baseline()
        finally:
            handle.remove()
        embeds = self._recorded.get("inputs_embeds")
        if not isinstance(embeds, torch.Tensor) or embeds.shape[:2] != (1, self.seq_len):
            raise NotImplementedError(
                f"{type(self.model).__name__}: its language model was not called with the "
                "merged input embeddings of the whole sequence, so the variants cannot be run "
                "on the language model alone")
        masks = self._recorded.get("attention_mask")
        if isinstance(masks, dict):
            self._masks = {name: self._check_mask(name, m) for name, m in masks.items()}
            self._first_row = _first_changed_rows(
                [m for m in self._masks.values() if m is not None], self.seq_len)
        return base

    def _check_mask(self, name: str, mask: Any) -> torch.Tensor | None:
        """A prepared mask of the baseline: None (plain causal, skipped by the mask function)
        or a [1, 1 or H, N, N] bool / additive float tensor."""
        n = self.seq_len
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[0] != 1 or (
                tuple(mask.shape[-2:]) != (n, n)):
            raise NotImplementedError(
                f"{type(self.model).__name__}: the language model received a prepared "
                f"{name!r} mask of {type(mask).__name__} "
                f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else ''} instead of a "
                f"[1, heads, {n}, {n}] tensor over the whole sequence, so the variants cannot "
                "be given the baseline's mask")
        if getattr(mask, "_atman_kv_offset", 0):
            raise NotImplementedError(
                f"{type(self.model).__name__}: the baseline's {name!r} mask is offset into a "
                "longer cache, so it cannot be sliced for the variants")
        return mask

    def run(self, batch: int, start: int) -> torch.Tensor:
        if self._first_row is not None and start > 0:
            start = self._first_row[start]
        return super().run(batch, start)

    def _variant_inputs(self, batch: int, start: int) -> dict[str, Any]:
        embeds = self._recorded["inputs_embeds"][:, start:]
        inputs = {"inputs_embeds": embeds.expand(batch, -1, -1)}
        positions = self._recorded.get("position_ids")
        if isinstance(positions, torch.Tensor):  # [..., 1, N]: text or multimodal rotary
            positions = positions[..., start:]
            inputs["position_ids"] = positions.expand(
                *positions.shape[:-2], batch, positions.shape[-1])
        if self._masks is not None:
            inputs["attention_mask"] = {name: self._variant_mask(m, batch, start)
                                        for name, m in self._masks.items()}
        return inputs

    def _variant_mask(self, mask: torch.Tensor | None, batch: int, start: int
                      ) -> torch.Tensor | None:
        """The baseline's mask for rows ``start``.. over all N keys (the cached prefix and the
        recomputed positions), expanded over ``batch`` variants."""
        if mask is None:
            if start == 0:
                return None  # as in the baseline: the attention's own causal default
            # a skipped mask is plain causal; with a cached prefix it must be explicit
            n = self.seq_len
            mask = torch.ones(n, n, dtype=torch.bool, device=self.ids.device).tril()[None, None]
        rows = mask[:, :, start:]
        return rows.expand(batch, *rows.shape[1:])


def _first_changed_rows(masks: list[torch.Tensor], n: int) -> list[int]:
    """For every start s, the first row a variant that suppresses only keys >= s can change.

    Row i sees key p where any mask lets it (True, or an additive value above the dtype's
    minimum). Suppressing keys >= s changes the rows that see them, from
    g(s) = min over p >= s of (first row that sees p) on, in the first layer; those rows'
    states then change the rows that see them in the next layer: the first changed row is the
    fixed point of s -> g(s). A causal mask gives s itself; a bidirectional image block the
    block's start.
    """
    positions = torch.arange(n, device=masks[0].device if masks else None)
    first_seen = positions.clone()  # key p changes row p at the latest (causal, or skipped)
    if masks:
        seen = torch.zeros(n, n, dtype=torch.bool, device=positions.device)
        for m in masks:
            visible = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
            seen |= visible.any(dim=1)[0]
        first_seen = torch.minimum(first_seen, torch.where(
            seen.any(dim=0), seen.int().argmax(dim=0), positions))
    suffix_min = torch.flip(torch.cummin(torch.flip(first_seen, [0]), 0).values, [0]).tolist()
    out = []
    for s in range(n):
        while suffix_min[s] < s:
            s = suffix_min[s]
        out.append(s)
    return out


class ClassificationTask:
    """One forward over fixed inputs; one row per class in ``labels``: its cross-entropy.

    Args:
        model: a classifier whose output has ``logits`` [B, C].
        inputs: model inputs with batch 1 (``input_ids`` / ``pixel_values`` and friends); each
            chunk expands them over its variants.
        seq_len: number of positions the attention sees (the factor rows' length).
        labels: the class indices (the target; with a contrast, the foil class after it).
    """

    reuse = False

    def __init__(self, model: Any, inputs: dict[str, torch.Tensor], seq_len: int,
                 labels: list[int]) -> None:
        self.model = model
        self.inputs = inputs
        self.seq_len = int(seq_len)
        self.n_targets = len(labels)
        device = next(iter(inputs.values())).device
        self.labels = torch.tensor(labels, device=device)
        self.forwards = 0
        self.token_forwards = 0

    def logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, C] the class logits of a batch of inputs."""
        return self.model(**inputs).logits

    def _ce(self, inputs: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
        self.forwards += 1
        self.token_forwards += batch * self.seq_len
        logits = self.logits(inputs)  # [B, C]
        rows = logits[:, None, :].expand(-1, self.n_targets, -1)
        return cross_entropy(rows, self.labels.expand(batch, -1))

    def baseline(self) -> torch.Tensor:
        return self._ce(self.inputs, 1)[0]

    def run(self, batch: int, start: int) -> torch.Tensor:
        batched = {k: v.expand(batch, *v.shape[1:]) for k, v in self.inputs.items()}
        return self._ce(batched, batch)
