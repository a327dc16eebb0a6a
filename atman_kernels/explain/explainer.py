"""AtMan explanations of transformers models (``ATMAN.md`` sections 3-5).

For every explained position j the explainer runs the model with the attention *to* j
suppressed (in every layer and head, or in ``layers``) and records how much the
cross-entropy of the target rises: score_j = sum_t (CE_t suppressed - CE_t unsuppressed),
positive = j supports the target. Variants go through the model as the batch, many per
forward; each carries its own factors through :func:`atman_kernels.suppression` and the
"atman" attention implementation of :mod:`atman_kernels.hf`.

Supported models (any transformers model whose attention goes through the attention
interface):

- causal LMs (``*ForCausalLM``, ``*LMHeadModel``): teacher forcing on prompt + target[:-1];
  logits are computed at the target positions only; exact prefix reuse (below);
- sequence classifiers (``*ForSequenceClassification``): the CE of one class; special tokens
  ([CLS], [SEP], ... as the tokenizer knows them) are not explained (they stay unsuppressed);
- image classifiers (``*ForImageClassification`` with ViT-style patch embeddings): the patch
  tokens are explained (not [CLS] or a distillation token); the result has the patch grid.

Exact prefix reuse (causal LMs): a variant whose earliest suppressed position is p leaves every
hidden state before p unchanged, so the unsuppressed sequence runs once with a KV cache and each
chunk of variants (sorted by p) recomputes only positions >= the chunk's smallest p on top of the
cached prefix, expanded over the chunk. The scores equal a full recompute up to rounding.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..ops import BACKENDS
from ..ops._checks import MODES
from ..suppression import attention_backend, suppression
from .batching import (
    auto_chunk_size,
    available_memory,
    bytes_per_variant,
    run_chunked,
)
from .conceptual import (
    check_factor,
    check_threshold,
    cosine_similarity_matrix,
    first_changed_position,
    suppression_factors,
)
from .explanation import POSTPROCESS, Explanation, combine_scores

log = logging.getLogger(__name__)

SUPPORTED_KINDS = (
    "causal LMs (*ForCausalLM, *LMHeadModel), sequence classifiers "
    "(*ForSequenceClassification), ViT-style image classifiers (*ForImageClassification)"
)
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


def model_kind(model: Any) -> str:
    """"causal_lm", "classifier" or "image" for a supported transformers model, else TypeError."""
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal_lm"
    if name.endswith("ForSequenceClassification"):
        return "classifier"
    if name.endswith("ForImageClassification"):
        return "image"
    raise TypeError(f"unsupported model class {name}: AtManExplainer supports {SUPPORTED_KINDS}")


class AtManExplainer:
    """Explain predictions of a transformers model with AtMan.

    Args:
        model: a supported transformers model (see :func:`model_kind`); any attention
            implementation: it is switched to "atman" during :meth:`explain` and restored.
        tokenizer: needed for string inputs/targets and for readable token strings.
        factor: suppression factor c (finite, >= 0; 0.1 keeps 10% of the score above the row
            minimum in paper mode).
        conceptual_threshold: kappa in [0, 1] for conceptual suppression, None = off.
        mode: "paper" or "log" (see :func:`atman_kernels.suppressed_attention`).
        batch_size: variants per forward, or "auto" (from ``max_memory``).
        max_memory: bytes the variants may use; default a safe share of the free memory.
        prefix_reuse: causal LMs: reuse the cached unsuppressed prefix (exact).
        progress: show a tqdm progress bar.
        layers: layer indices to suppress (None = all layers).
        postprocess: "none", "abs" or "square", applied to each target token's row before the
            sum (``per_target`` stays raw).
        normalize: min-max scale the scores to [0, 1].
        backend: the op backend of the attention ("auto", "cpp", "triton", "reference"; see
            :func:`atman_kernels.suppressed_attention`); "reference" gives the plain PyTorch
            numbers to check against.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        factor: float = 0.1,
        conceptual_threshold: float | None = 0.7,
        mode: str = "paper",
        batch_size: int | str = "auto",
        max_memory: int | None = None,
        prefix_reuse: bool = True,
        progress: bool = True,
        layers: Sequence[int] | None = None,
        postprocess: str = "none",
        normalize: bool = False,
        backend: str = "auto",
    ) -> None:
        self.kind = model_kind(model)
        self.model = model
        self.tokenizer = tokenizer
        self.factor = check_factor(factor)
        self.conceptual_threshold = check_threshold(conceptual_threshold)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        if batch_size != "auto" and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be 'auto' or an int >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        if max_memory is not None and (
            isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 1
        ):
            raise ValueError(f"max_memory must be None or a number of bytes >= 1, got "
                             f"{max_memory!r}")
        self.max_memory = max_memory
        self.prefix_reuse = bool(prefix_reuse)
        self.progress = bool(progress)
        if layers is not None:
            layers = [int(i) for i in layers]
        self.layers = layers
        if postprocess not in POSTPROCESS:
            raise ValueError(f"postprocess must be one of {POSTPROCESS}, got {postprocess!r}")
        self.postprocess = postprocess
        self.normalize = bool(normalize)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.last_stats: dict[str, Any] = {}

    # ------------------------------------------------------------------------ public entry
    def explain(self, inputs: Any, target: Any) -> Explanation:
        """Explain why the model predicts ``target`` for ``inputs``.

        Causal LM: ``inputs`` the prompt (str, or token ids: list / [N] / [1, N] tensor),
        ``target`` the continuation (str or ids). Classifier: ``inputs`` a str, ids or a
        tokenizer output; ``target`` a class index or label name (``config.label2id``). Image:
        ``inputs`` pixel values [1, 3, H, W] / [3, H, W] or a dict with "pixel_values";
        ``target`` a class index or label name.
        """
        from ..hf import atman_attention

        model = self.model
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            with atman_attention(model), attention_backend(self.backend), torch.inference_mode():
                if self.kind == "causal_lm":
                    expl = self._explain_causal(inputs, target)
                elif self.kind == "classifier":
                    expl = self._explain_classifier(inputs, target)
                else:
                    expl = self._explain_image(inputs, target)
        finally:
            model.train(was_training)
        # tensors made under inference_mode refuse in-place updates later: hand out plain ones
        for name in ("scores", "per_target", "baseline_loss", "image"):
            value = getattr(expl, name)
            if isinstance(value, torch.Tensor):
                setattr(expl, name, value.clone())
        seconds = time.perf_counter() - start
        expl.settings["seconds"] = seconds
        self.last_stats["seconds"] = seconds
        return expl

    __call__ = explain

    # ------------------------------------------------------------------------------ helpers
    @property
    def _device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def _settings(self, **extra: Any) -> dict[str, Any]:
        settings = {
            "factor": self.factor,
            "conceptual_threshold": self.conceptual_threshold,
            "mode": self.mode,
            "backend": self.backend,
            "postprocess": self.postprocess,
            "normalize": self.normalize,
            "layers": self.layers,
            "model": type(self.model).__name__,
        }
        settings.update(extra)
        return settings

    def _token_ids(self, value: Any, name: str, *, add_special_tokens: bool) -> list[int]:
        """Token ids of a string (through the tokenizer) or of ids given directly."""
        if isinstance(value, str):
            if value == "":
                raise ValueError(f"{name} is empty: give a non-empty string or token ids")
            if self.tokenizer is None:
                raise ValueError(
                    f"{name} is a string but no tokenizer was given: pass "
                    "AtManExplainer(model, tokenizer) or token ids"
                )
            ids = self.tokenizer(value, add_special_tokens=add_special_tokens)["input_ids"]
            if len(ids) == 0:
                raise ValueError(f"{name} {value!r} tokenises to no tokens")
            return [int(i) for i in ids]
        if hasattr(value, "keys") and "input_ids" in value:
            value = value["input_ids"]
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                raise TypeError(f"{name} token ids must be an integer tensor, got {value.dtype}")
            if value.dim() == 2 and value.shape[0] == 1:
                value = value[0]
            if value.dim() != 1:
                raise ValueError(f"{name} token ids must have shape [N] or [1, N], got "
                                 f"{tuple(value.shape)}")
            value = value.tolist()
        if isinstance(value, (list, tuple)):
            if len(value) == 1 and isinstance(value[0], (list, tuple)):
                value = value[0]
            if len(value) == 0:
                raise ValueError(f"{name} is empty: give at least one token")
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
                raise TypeError(f"{name} token ids must be ints")
            vocab = self._vocab_size()
            bad = [i for i in value if i < 0 or (vocab is not None and i >= vocab)]
            if bad:
                raise ValueError(f"{name} token ids must lie in [0, {vocab}) (the model's "
                                 f"vocabulary), got {bad[:5]}")
            return [int(i) for i in value]
        raise TypeError(
            f"{name} must be a string or token ids (list of ints / tensor), got "
            f"{type(value).__name__}"
        )

    def _vocab_size(self) -> int | None:
        emb = self.model.get_input_embeddings() if self.kind != "image" else None
        return getattr(emb, "num_embeddings", None)

    def _token_strings(self, ids: Sequence[int]) -> list[str]:
        if self.tokenizer is None:
            return [str(int(i)) for i in ids]
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def _chunk_size(self, n_variants: int, len_q: int, len_k: int, n_logits: int,
                    reuse: bool) -> int:
        if self.batch_size != "auto":
            return min(int(self.batch_size), max(1, n_variants))
        budget = self.max_memory if self.max_memory is not None else available_memory(
            self._device)
        dtype = next(self.model.parameters()).dtype
        per = bytes_per_variant(self.model.config, len_q=len_q, len_k=len_k,
                                n_logits=n_logits, dtype=dtype)
        chunk = auto_chunk_size(n_variants, per, budget)
        if self._device.type == "cpu":
            chunk = max(1, min(chunk, CPU_TOKENS_PER_FORWARD // max(1, len_q)))
        if reuse:
            spread = max(MIN_CHUNK_WITH_REUSE, math.ceil(n_variants / CHUNKS_WITH_REUSE))
            chunk = min(chunk, spread)
        return chunk

    def _progress_bar(self, total: int):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="AtMan", unit="variant", disable=not self.progress,
                    leave=False)

    def _factors(self, seq_len: int, explained: list[int], embeddings: torch.Tensor | None
                 ) -> torch.Tensor:
        """Factors [V, seq_len] (float32, on the model's device), one variant per position."""
        similarity = None
        if self.conceptual_threshold is not None and embeddings is not None:
            similarity = cosine_similarity_matrix(embeddings.float().cpu())
        factors = suppression_factors(
            seq_len, explained, self.factor, similarity=similarity,
            threshold=self.conceptual_threshold, eligible=explained,
        )
        return factors.to(device=self._device, dtype=torch.float32)

    def _finish(self, per_target: torch.Tensor, **fields: Any) -> Explanation:
        per_target = per_target.detach().float().cpu()
        scores = combine_scores(per_target, self.postprocess, self.normalize)
        return Explanation(scores=scores, per_target=per_target, **fields)

    # -------------------------------------------------------------------------- causal LM
    def _lm_logits(self, ids: torch.Tensor, past: Any, keep: int, want_cache: bool
                   ) -> tuple[torch.Tensor, Any]:
        """Logits [B, keep, V] of the last ``keep`` positions, and the cache."""
        model = self.model
        use_cache = want_cache or past is not None
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            out = model(input_ids=ids, past_key_values=past, use_cache=use_cache,
                        logits_to_keep=keep)
            return out.logits[:, -keep:], getattr(out, "past_key_values", None)
        decoder = model.get_decoder()
        out = decoder(input_ids=ids, past_key_values=past, use_cache=use_cache)
        hidden = out.last_hidden_state[:, -keep:]
        return model.get_output_embeddings()(hidden), getattr(out, "past_key_values", None)

    @staticmethod
    def _cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """(keys, values) [1, Hkv, N, D] of every layer of a DynamicCache-like cache."""
        if cache is None:
            return None
        if hasattr(cache, "self_attention_cache"):
            cache = cache.self_attention_cache
        layers = getattr(cache, "layers", None)
        if not layers:
            return None
        out = []
        for layer in layers:
            if getattr(layer, "is_sliding", False) or getattr(layer, "keys", None) is None:
                return None
            out.append((layer.keys, layer.values))
        return out

    def _prefix_cache(self, kv: list[tuple[torch.Tensor, torch.Tensor]], p: int, batch: int):
        """A DynamicCache holding the first ``p`` positions of ``kv``, expanded to ``batch``."""
        from transformers import DynamicCache

        data = [
            (k[:, :, :p].expand(batch, -1, -1, -1), v[:, :, :p].expand(batch, -1, -1, -1))
            for k, v in kv
        ]
        return DynamicCache(data)

    def _explain_causal(self, inputs: Any, target: Any) -> Explanation:
        prompt_ids = self._token_ids(inputs, "prompt", add_special_tokens=True)
        target_ids = self._token_ids(target, "target", add_special_tokens=False)
        device = self._device
        n_prompt, n_target = len(prompt_ids), len(target_ids)
        seq = prompt_ids + target_ids[:-1]
        n = len(seq)
        ids = torch.tensor(seq, dtype=torch.long, device=device)[None]
        tgt = torch.tensor(target_ids, dtype=torch.long, device=device)
        explained = list(range(n))
        embeddings = None
        if self.conceptual_threshold is not None:
            embeddings = self.model.get_input_embeddings()(ids)[0]
        factors = self._factors(n, explained, embeddings)
        first = first_changed_position(factors.cpu()).clamp(max=n - 1)

        with suppression(torch.ones(1, n, device=device), self.mode, self.layers):
            base_logits, cache = self._lm_logits(ids, None, n_target, self.prefix_reuse)
        base_ce = _cross_entropy(base_logits[0], tgt)  # [T]
        kv = self._cache_tensors(cache) if self.prefix_reuse else None
        reuse = kv is not None
        if self.prefix_reuse and not reuse:
            log.warning("prefix reuse is off: the model's cache is not a plain DynamicCache")
        if not reuse:
            first = torch.zeros_like(first)
        del cache

        order = torch.argsort(first, stable=True).tolist()
        chunk = self._chunk_size(len(order), n, n, n_target, reuse)
        stats = {"forwards": 1, "token_forwards": n}

        def run(chunk_idx: Sequence[int]) -> torch.Tensor:
            idx = torch.as_tensor(list(chunk_idx), dtype=torch.long)
            batch = idx.numel()
            p = int(first[idx].min())
            keep = n - max(n_prompt - 1, p)  # target positions this chunk recomputes
            past = self._prefix_cache(kv, p, batch) if (reuse and p > 0) else None
            with suppression(factors[idx.to(device)], self.mode, self.layers):
                logits, _ = self._lm_logits(ids[:, p:].expand(batch, -1), past, keep, False)
            ce = base_ce.expand(batch, n_target).clone()
            ce[:, n_target - keep:] = _cross_entropy(logits, tgt[n_target - keep:])
            stats["forwards"] += 1
            stats["token_forwards"] += batch * (n - p)
            return ce - base_ce

        with self._progress_bar(len(order)) as bar:
            rise = run_chunked(order, chunk, run, on_done=bar.update)
        per_variant = torch.empty_like(rise)
        per_variant[torch.as_tensor(order)] = rise
        self.last_stats = dict(stats, chunk_size=chunk, prefix_reuse=reuse, variants=n)
        return self._finish(
            per_variant.T.contiguous(),
            tokens=self._token_strings(seq),
            target_tokens=self._token_strings(target_ids),
            kind="causal_lm",
            positions=explained,
            token_ids=seq,
            baseline_loss=base_ce.float().cpu(),
            settings=self._settings(
                prefix_reuse=reuse, batch_size=chunk, forwards=stats["forwards"],
                prompt_tokens=n_prompt, target=self.tokenizer.decode(target_ids)
                if self.tokenizer is not None else target_ids,
            ),
        )

    # ------------------------------------------------------------------------- classifier
    def _class_index(self, target: Any) -> int:
        config = self.model.config
        n_labels = int(getattr(config, "num_labels", 0) or 0)
        if isinstance(target, str):
            label2id = getattr(config, "label2id", None) or {}
            if target not in label2id:
                raise ValueError(f"target label {target!r} is not one of the model's labels "
                                 f"{sorted(label2id)}")
            return int(label2id[target])
        if isinstance(target, torch.Tensor) and target.numel() == 1:
            target = int(target.item())
        if isinstance(target, bool) or not isinstance(target, int):
            raise TypeError(f"target must be a class index or label name, got "
                            f"{type(target).__name__}")
        if not 0 <= target < n_labels:
            raise ValueError(f"target class {target} is out of range [0, {n_labels})")
        return target

    def _label(self, index: int) -> str:
        id2label = getattr(self.model.config, "id2label", None) or {}
        return str(id2label.get(index, index))

    def _run_classifier(self, model_inputs: dict[str, torch.Tensor], seq_len: int,
                        explained: list[int], embeddings: torch.Tensor | None, cls: int,
                        extra_fields: dict[str, Any]) -> Explanation:
        device = self._device
        factors = self._factors(seq_len, explained, embeddings)
        with suppression(torch.ones(1, seq_len, device=device), self.mode, self.layers):
            base_logits = self.model(**model_inputs).logits  # [1, C]
        target = torch.tensor([cls], device=device)
        base_ce = _cross_entropy(base_logits, target)  # [1]
        chunk = self._chunk_size(len(explained), seq_len, seq_len, 1, False)

        def run(chunk_idx: Sequence[int]) -> torch.Tensor:
            idx = torch.as_tensor(list(chunk_idx), dtype=torch.long, device=device)
            batch = idx.numel()
            batched = {k: v.expand(batch, *v.shape[1:]) for k, v in model_inputs.items()}
            with suppression(factors[idx], self.mode, self.layers):
                logits = self.model(**batched).logits  # [B, C]
            return (_cross_entropy(logits, target.expand(batch)) - base_ce)[:, None]

        with self._progress_bar(len(explained)) as bar:
            rise = run_chunked(list(range(len(explained))), chunk, run, on_done=bar.update)
        self.last_stats = {"forwards": 1 + math.ceil(len(explained) / chunk),
                           "chunk_size": chunk, "variants": len(explained)}
        extra_fields["settings"].update(batch_size=chunk, target=self._label(cls),
                                        target_index=cls)
        return self._finish(rise.T.contiguous(), target_tokens=[self._label(cls)],
                            baseline_loss=base_ce.float().cpu(), positions=explained,
                            **extra_fields)

    def _explain_classifier(self, inputs: Any, target: Any) -> Explanation:
        cls = self._class_index(target)
        extras: dict[str, torch.Tensor] = {}
        if hasattr(inputs, "keys") and "input_ids" in inputs:
            for key in ("token_type_ids",):
                if key in inputs and inputs[key] is not None:
                    extras[key] = torch.as_tensor(inputs[key]).reshape(1, -1)
        ids_list = self._token_ids(inputs, "inputs", add_special_tokens=True)
        if isinstance(inputs, str) and self.tokenizer is not None:
            enc = self.tokenizer(inputs, add_special_tokens=True)
            if "token_type_ids" in enc:
                extras["token_type_ids"] = torch.tensor(enc["token_type_ids"])[None]
        device = self._device
        ids = torch.tensor(ids_list, dtype=torch.long, device=device)[None]
        special = set()
        if self.tokenizer is not None:
            special = {int(i) for i in getattr(self.tokenizer, "all_special_ids", [])}
        explained = [i for i, t in enumerate(ids_list) if t not in special]
        if not explained:
            raise ValueError("inputs hold only special tokens: nothing to explain")
        embeddings = None
        if self.conceptual_threshold is not None:
            embeddings = self.model.get_input_embeddings()(ids)[0]
        model_inputs = {"input_ids": ids, **{k: v.to(device) for k, v in extras.items()}}
        tokens = self._token_strings(ids_list)
        fields = {
            "tokens": [tokens[i] for i in explained],
            "kind": "classifier",
            "token_ids": [ids_list[i] for i in explained],
            "settings": self._settings(),
        }
        return self._run_classifier(model_inputs, len(ids_list), explained, embeddings, cls,
                                    fields)

    # ------------------------------------------------------------------------------ image
    def _explain_image(self, inputs: Any, target: Any) -> Explanation:
        cls = self._class_index(target)
        pixels = inputs["pixel_values"] if hasattr(inputs, "keys") else inputs
        if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point():
            raise TypeError("image inputs must be a float tensor of pixel values [1, 3, H, W] "
                            "or a dict with 'pixel_values'")
        if pixels.dim() == 3:
            pixels = pixels[None]
        if pixels.dim() != 4 or pixels.shape[0] != 1:
            raise ValueError(f"pixel values must have shape [1, C, H, W] or [C, H, W], got "
                             f"{tuple(pixels.shape)}")
        param = next(self.model.parameters())
        pixels = pixels.to(device=param.device, dtype=param.dtype)
        embeddings_module = getattr(self.model.base_model, "embeddings", None)
        patch_module = getattr(embeddings_module, "patch_embeddings", None)
        if patch_module is None:
            raise TypeError(f"unsupported model class {type(self.model).__name__}: image models "
                            "need ViT-style base_model.embeddings.patch_embeddings")
        patches = patch_module(pixels)  # [1, n_patches, hidden]
        seq_len = embeddings_module(pixels).shape[1]
        n_patches = patches.shape[1]
        n_prefix = seq_len - n_patches
        patch = getattr(self.model.config, "patch_size", None)
        if isinstance(patch, (tuple, list)):
            grid = (pixels.shape[-2] // patch[0], pixels.shape[-1] // patch[1])
        elif patch:
            grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
        else:
            grid = (1, n_patches)
        if grid[0] * grid[1] != n_patches or n_prefix < 0:
            grid = (1, n_patches)
        explained = list(range(n_prefix, seq_len))
        embeddings = None
        if self.conceptual_threshold is not None:
            embeddings = torch.zeros(seq_len, patches.shape[-1], device=patches.device,
                                     dtype=patches.dtype)
            embeddings[n_prefix:] = patches[0]
        fields = {
            "tokens": [f"patch({i // grid[1]},{i % grid[1]})" for i in range(n_patches)],
            "kind": "image",
            "token_ids": None,
            "patch_grid": grid,
            "image": pixels[0].detach().float().cpu(),
            "settings": self._settings(),
        }
        return self._run_classifier({"pixel_values": pixels}, seq_len, explained, embeddings,
                                    cls, fields)


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] in fp32: logits [..., V], target [...] -> [...]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    target = target.expand(logp.shape[:-1])
    return -logp.gather(-1, target[..., None])[..., 0]
