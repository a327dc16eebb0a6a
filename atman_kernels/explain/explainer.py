"""AtMan explanations of transformers models (``docs/semantics.md``).

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

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..ops import BACKENDS
from ..ops._checks import MODES
from ..suppression import attention_backend
from .batching import ChunkPolicy
from .conceptual import check_factor, check_threshold, cosine_similarity_matrix, unit_factors
from .engine import EngineResult, run_variants
from .explanation import POSTPROCESS, Explanation, combine_scores
from .tasks import CausalLMTask, ClassificationTask, ContrastiveLMTask, VisionLanguageTask
from .units import GRANULARITIES, Span, prompt_spans, token_spans

log = logging.getLogger(__name__)

# Vision-language models whose image-token layout is known (explain/vision.py), by class name.
IMAGE_TEXT_FAMILIES = {
    "LlavaForConditionalGeneration": "llava",
    "Idefics3ForConditionalGeneration": "idefics3",
    "SmolVLMForConditionalGeneration": "idefics3",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_vl",
}
SUPPORTED_KINDS = (
    "causal LMs (*ForCausalLM, *LMHeadModel), sequence classifiers "
    "(*ForSequenceClassification), ViT-style image classifiers (*ForImageClassification), "
    f"vision-language models ({', '.join(sorted(IMAGE_TEXT_FAMILIES))})"
)
# Vision-language models refused with a reason of their own (none at present).
IMAGE_TEXT_REFUSED: dict[str, str] = {}


def model_kind(model: Any) -> str:
    """"causal_lm", "classifier", "image" or "image_text" for a supported transformers model,
    else TypeError naming the class."""
    name = type(model).__name__
    if name in IMAGE_TEXT_FAMILIES:
        return "image_text"
    if name in IMAGE_TEXT_REFUSED:
        raise TypeError(f"unsupported model class {name}: {IMAGE_TEXT_REFUSED[name]}")
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
        tokenizer: needed for string inputs/targets, for units coarser than a token and for
            readable token strings.
        factor: suppression factor c (finite, >= 0; 0.1 keeps 10% of the score above the row
            minimum in paper mode).
        conceptual_threshold: kappa in [0, 1] for conceptual suppression, None = off (the
            default: on the project's quality evaluation conceptual suppression lowered text
            evidence retrieval, see the README). For a unit of several tokens, conceptual
            suppression is the union of its tokens' (:func:`.conceptual.unit_factors`).
        mode: "paper" or "log" (see :func:`atman_kernels.suppressed_attention`).
        batch_size: variants per forward, or "auto" (from ``max_memory``).
        max_memory: bytes the variants may use; default a safe share of the free memory.
        prefix_reuse: causal LMs: reuse the cached unsuppressed prefix (exact).
        progress: show a tqdm progress bar.
        layers: layer indices to suppress (None = all layers); each must be a layer of the
            model (negative indices count from the end, as in Python).
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
        conceptual_threshold: float | None = None,
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
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise TypeError(
                f"unsupported model class {type(model).__name__}: an encoder-decoder model's "
                "decoder attends to the encoder's positions (cross-attention, or self and "
                "cross keys merged in one call), which per-position suppression of one "
                "sequence does not cover exactly")
        self.model = model
        # a vision-language model takes its processor here (its tokenizer reads the text)
        self.processor = tokenizer if hasattr(tokenizer, "image_processor") else None
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer) if self.processor else (
            tokenizer)
        self.factor = check_factor(factor)
        self.conceptual_threshold = check_threshold(conceptual_threshold)
        if self.kind == "image_text" and self.conceptual_threshold is not None:
            raise ValueError("conceptual_threshold is not supported for vision-language models "
                             "(image tokens have no input embedding of their own before the "
                             "vision tower runs); use conceptual_threshold=None")
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
        self.layers = _check_layers(layers, _num_layers(model))
        if postprocess not in POSTPROCESS:
            raise ValueError(f"postprocess must be one of {POSTPROCESS}, got {postprocess!r}")
        self.postprocess = postprocess
        self.normalize = bool(normalize)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.last_stats: dict[str, Any] = {}

    # ------------------------------------------------------------------------ public entry
    def explain(
        self,
        inputs: Any,
        target: Any = None,
        *,
        granularity: str = "token",
        delimiter: str | None = None,
        spans: Sequence[tuple[int, int]] | None = None,
        max_new_tokens: int = 20,
        special_tokens: bool = False,
        image_region: int | None = None,
        contrast: Any = None,
        chat: bool = False,
    ) -> Explanation:
        """Explain why the model predicts ``target`` for ``inputs``.

        Causal LM: ``inputs`` the prompt (str, or token ids: list / [N] / [1, N] tensor),
        ``target`` the continuation (str or ids), or None to explain the model's own greedy
        continuation (``model.generate``, no sampling, at most ``max_new_tokens`` tokens,
        stopping at EOS; the EOS itself is not part of the target). Classifier: ``inputs`` a
        str, ids or a tokenizer output; ``target`` a class index or label name
        (``config.label2id``). Image: ``inputs`` pixel values [1, 3, H, W] / [3, H, W] or a
        dict with "pixel_values"; ``target`` a class index or label name.

        Units (one variant each, all their tokens suppressed together), for text prompts:

        - ``granularity``: "token" (default), "word", "sentence" or "paragraph"
          (:mod:`.units`); coarser units need a string prompt and a tokenizer with character
          offsets (a fast tokenizer);
        - ``delimiter``: a custom delimiter string (e.g. "###" or "\n"): one unit per piece;
        - ``spans``: explicit (start, end) character ranges of the prompt; a unit suppresses
          every token overlapping its range; tokens outside every span are neither explained
          nor suppressed (e.g. explain only the document of a RAG prompt).

        At token granularity a causal LM's target tokens but the last are explained too (as
        units with ``source == "target"``); coarser units cover the prompt only. Special
        tokens (BOS, [CLS], chat markers) are neither explained nor suppressed unless
        ``special_tokens=True``.

        Vision-language models (LLaVA, Idefics3 / SmolVLM): ``inputs`` is the processor's
        output (``input_ids``, ``pixel_values``, ...) or ``(text, images)`` with the processor
        given as ``AtManExplainer(model, processor)``; the target as for causal LMs. Every
        image token and every text token of the prompt is a unit (text coarser with
        ``granularity``/``delimiter``/``spans`` over the decoded prompt); ``image_region=k``
        suppresses k x k patches of each image view as one unit (the last row/column of
        regions is smaller where k does not divide the grid). Suppression acts in the language
        model only; the vision tower keeps its own attention. ``score_map(image=i)`` gives
        each image's grid; with ``(text, images)`` every image unit's ``box`` is its rectangle
        in the original picture.

        Contrastive ("why the target rather than the foil"): ``contrast`` is a foil
        continuation (str or ids, any length) for causal LMs, a foil class (index or label) for
        classifiers. A unit's score is then the rise of the target's cross-entropy minus the
        rise of the foil's under the same suppression: how much suppressing the unit narrows
        the target-over-foil margin (positive = the unit supports the target over the foil).
        Both per-token matrices are kept (``per_target``, ``contrast_per_target``); the
        units are the prompt's (a causal LM's target tokens are not explained). Target and
        foil share the prompt's forward and each variant's factors: the foil costs only its
        own tokens.

        Chat models: ``chat=True`` takes ``inputs`` as the user's message, applies the
        tokenizer's chat template (with the generation prompt) and explains the user's message
        only: the template's tokens (system prompt, role markers) are neither explained nor
        suppressed; ``spans`` then count characters from the start of the message.
        """
        from ..hf import atman_attention, check_supported

        _check_unit_arguments(granularity, delimiter, spans)
        # a model "atman" cannot reach is refused before any input is prepared
        check_supported(self.model.get_decoder() if self.kind == "image_text" else self.model)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or (
            max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if target is None and self.kind not in ("causal_lm", "image_text"):
            raise ValueError(f"target=None (explain the generated answer) needs a causal LM; "
                             f"give the class to explain for this {self.kind} model")
        if contrast is not None and self.kind == "image_text":
            raise ValueError("contrast= is not implemented for vision-language models yet; "
                             "explain the target alone")
        if image_region is not None and (
            isinstance(image_region, bool) or not isinstance(image_region, int)
            or image_region < 1 or self.kind != "image_text"
        ):
            raise ValueError(f"image_region must be an int >= 1 for a vision-language model, got "
                             f"{image_region!r} for a {self.kind} model")
        model = self.model
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        unit_args = {"granularity": granularity, "delimiter": delimiter, "spans": spans,
                     "special_tokens": bool(special_tokens), "chat": bool(chat)}
        if chat and self.kind not in ("causal_lm", "classifier"):
            raise ValueError(f"chat=True applies a tokenizer's chat template to a text prompt; "
                             f"not for a {self.kind} model")
        try:
            with torch.inference_mode():
                if self.kind == "causal_lm":
                    prepared = self._prepare_causal(inputs, target, max_new_tokens, unit_args,
                                                    contrast)
                elif self.kind == "classifier":
                    prepared = self._prepare_classifier(inputs, target, unit_args, contrast)
                elif self.kind == "image_text":
                    prepared = self._prepare_image_text(inputs, target, max_new_tokens,
                                                        unit_args, image_region)
                else:
                    prepared = self._prepare_image(inputs, target, unit_args, contrast)
                only = model.get_decoder() if self.kind == "image_text" else None
                with atman_attention(model, only=only), attention_backend(self.backend):
                    result = self._run(prepared)
        finally:
            model.train(was_training)
        expl = self._finish(result, prepared)
        seconds = time.perf_counter() - start
        expl.settings["seconds"] = seconds
        self.last_stats["seconds"] = seconds
        return expl

    __call__ = explain

    def explain_many(self, examples: Any, *, output: Any = None, resume: bool = True,
                     progress: bool | None = None, **explain_kwargs: Any
                     ) -> list[tuple[str, Explanation]]:
        """Explain every example of an iterable, with one progress bar.

        Args:
            examples: dicts with "prompt" and "target" (optional "id", "contrast", "spans")
                or (prompt, target) pairs; an example's id is its "id" or its index.
            output: a JSON Lines file: each finished example is appended as
                ``{"id", "explanation"}`` and synced to disk before the next starts, so a
                crash loses at most the example in flight.
            resume: skip the ids ``output`` already holds (False: refuse an existing file).
            progress: show the bar (default: the explainer's ``progress``).
            explain_kwargs: arguments of :meth:`explain` for every example (granularity, ...).

        Returns:
            (id, Explanation) of every example explained by this call (not the skipped ones;
            :func:`atman_kernels.explain.many.read_many` reads a whole output file).
        """
        from .many import explain_many

        return explain_many(self, examples, output=output, resume=resume, progress=progress,
                            **explain_kwargs)

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
            return self._encode(value, name, add_special_tokens=add_special_tokens)["input_ids"]
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

    def _encode(self, text: str, name: str, *, add_special_tokens: bool) -> dict[str, Any]:
        """Tokenise ``text``: input_ids, special_tokens_mask and (fast tokenizers) offsets."""
        if text == "":
            raise ValueError(f"{name} is empty: give a non-empty string or token ids")
        if self.tokenizer is None:
            raise ValueError(
                f"{name} is a string but no tokenizer was given: pass "
                "AtManExplainer(model, tokenizer) or token ids"
            )
        offsets = bool(getattr(self.tokenizer, "is_fast", False))
        enc = self.tokenizer(text, add_special_tokens=add_special_tokens,
                             return_special_tokens_mask=True, return_offsets_mapping=offsets)
        ids = [int(i) for i in enc["input_ids"]]
        if len(ids) == 0:
            raise ValueError(f"{name} {text!r} tokenises to no tokens")
        out = {"input_ids": ids, "special": [bool(x) for x in enc["special_tokens_mask"]],
               "offsets": [tuple(o) for o in enc["offset_mapping"]] if offsets else None}
        if "token_type_ids" in enc:
            out["token_type_ids"] = list(enc["token_type_ids"])
        return out

    def _vocab_size(self) -> int | None:
        if self.kind == "image":
            return None
        try:
            emb = self.model.get_input_embeddings()
        except (NotImplementedError, AttributeError):  # a model without a token embedding
            return None
        return getattr(emb, "num_embeddings", None)

    def _token_strings(self, ids: Sequence[int]) -> list[str]:
        if self.tokenizer is None:
            return [str(int(i)) for i in ids]
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def _special_ids(self) -> set[int]:
        if self.tokenizer is None:
            return set()
        return {int(i) for i in getattr(self.tokenizer, "all_special_ids", [])}

    def _prompt_units(self, prompt: Any, name: str, unit_args: dict[str, Any]
                      ) -> tuple[list[int], list[Span], str | None, dict[str, Any]]:
        """(token ids, units, prompt text or None, encoding extras) of a text or id prompt."""
        granularity, delimiter, spans = (unit_args["granularity"], unit_args["delimiter"],
                                         unit_args["spans"])
        coarse = granularity != "token" or delimiter is not None or spans is not None
        if unit_args.get("chat"):
            return self._chat_units(prompt, name, unit_args)
        if isinstance(prompt, str):
            enc = self._encode(prompt, name, add_special_tokens=True)
            ids = enc["input_ids"]
            # special: added by the tokenizer (BOS), or written in the text (chat markers)
            special = set() if unit_args["special_tokens"] else self._special_ids()
            eligible = [i for i, sp in enumerate(enc["special"])
                        if unit_args["special_tokens"] or not (sp or ids[i] in special)]
            if enc["offsets"] is None:
                if coarse:
                    raise ValueError(
                        f"granularity {granularity!r}, delimiter and spans need character "
                        f"offsets, which {type(self.tokenizer).__name__} (a slow tokenizer) "
                        "does not give: load the fast tokenizer (use_fast=True)")
                units = token_spans([self._token_strings([ids[i]])[0] for i in eligible],
                                    eligible)
            else:
                units = prompt_spans(prompt, enc["offsets"], granularity=granularity,
                                     delimiter=delimiter, spans=spans, eligible=eligible)
            return ids, units, prompt, enc
        if coarse:
            raise ValueError(
                f"granularity {granularity!r}, delimiter and spans need a text prompt (a "
                f"string) to find words, sentences or character ranges in; {name} was given "
                "as token ids")
        ids = self._token_ids(prompt, name, add_special_tokens=True)
        special = set() if unit_args["special_tokens"] else self._special_ids()
        eligible = [i for i, t in enumerate(ids) if t not in special]
        return ids, token_spans(self._token_strings([ids[i] for i in eligible]), eligible), \
            None, {}

    def _chat_units(self, message: Any, name: str, unit_args: dict[str, Any]
                    ) -> tuple[list[int], list[Span], str, dict[str, Any]]:
        """The chat template applied to the user's ``message``; units inside the message."""
        if not isinstance(message, str):
            raise ValueError(f"chat=True takes the user's message as a string, got {name} as "
                             f"{type(message).__name__}")
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("chat=True needs a tokenizer with a chat template "
                             "(tokenizer.chat_template is not set)")
        if message == "":
            raise ValueError(f"{name} is empty: give the user's message")
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                                  tokenize=False, add_generation_prompt=True)
        start = text.find(message)
        if start < 0:
            raise ValueError("the chat template changed the user's message (it is not found "
                             "verbatim in the rendered prompt), so its characters cannot be "
                             "located; pass the rendered prompt with spans= instead")
        end = start + len(message)
        enc = self._encode(text, name, add_special_tokens=False)
        if enc["offsets"] is None:
            raise ValueError("chat=True needs character offsets (a fast tokenizer)")
        specials = self._special_ids()
        eligible = [i for i, ((a, b), special) in enumerate(zip(enc["offsets"], enc["special"],
                                                                strict=True))
                    if a < end and b > start and b > a and not special
                    and enc["input_ids"][i] not in specials]
        spans = unit_args["spans"]
        if spans is not None:
            bad = [sp for sp in spans if not (0 <= sp[0] and sp[1] <= len(message))]
            if bad:
                raise ValueError(f"spans {bad} lie outside the user's message "
                                 f"(0..{len(message)} characters)")
            spans = [(a + start, b + start) for a, b in spans]
        elif unit_args["granularity"] != "token" or unit_args["delimiter"] is not None:
            # coarse units cut the message, never the template around it
            units = prompt_spans(message, [(max(a, start) - start, min(b, end) - start)
                                           for a, b in (enc["offsets"][i] for i in eligible)],
                                 granularity=unit_args["granularity"],
                                 delimiter=unit_args["delimiter"],
                                 position_offset=0)
            units = [Span(u.text, u.start + start, u.end + start,
                          tuple(eligible[p] for p in u.positions)) for u in units]
            return enc["input_ids"], units, text, enc
        units = prompt_spans(text, enc["offsets"], granularity="token", spans=spans,
                             eligible=eligible)
        return enc["input_ids"], units, text, enc

    def _check_length(self, n: int) -> None:
        config = self.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        limit = None
        for attr in ("max_position_embeddings", "n_positions"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 0:
                limit = value
                break
        if limit is not None and n > limit:
            raise ValueError(f"the input has {n} tokens, more than the model's "
                             f"{limit} positions (config max_position_embeddings)")

    def _generate(self, prompt_ids: list[int], max_new_tokens: int,
                  extra: dict[str, Any] | None = None) -> list[int]:
        """The model's greedy continuation of ``prompt_ids``, without the EOS that ends it."""
        from transformers import GenerationConfig

        model = self.model
        base = getattr(model, "generation_config", None)
        eos = getattr(base, "eos_token_id", None)
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        eos_ids = set() if eos is None else ({int(eos)} if isinstance(eos, int)
                                               else {int(e) for e in eos})
        pad = getattr(base, "pad_token_id", None)
        if pad is None:
            pad = next(iter(sorted(eos_ids)), 0)
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  eos_token_id=sorted(eos_ids) or None, pad_token_id=pad)
        ids = torch.tensor([prompt_ids], device=self._device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=config, **(extra or {}))
        new = [int(t) for t in out[0, len(prompt_ids):].tolist()]
        for i, t in enumerate(new):
            if t in eos_ids:
                new = new[:i]
                break
        if not new:
            raise ValueError("the model's greedy continuation starts with EOS: there is no "
                             "generated answer to explain; give a target")
        return new

    # -------------------------------------------------------------------------- front ends
    def _prepare_causal(self, inputs: Any, target: Any, max_new_tokens: int,
                        unit_args: dict[str, Any], contrast: Any = None) -> _Prepared:
        if (isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], str)) or (
                hasattr(inputs, "keys") and "pixel_values" in inputs):
            raise ValueError(
                f"inputs hold images, but {type(self.model).__name__} is a text-only model; "
                f"images need a vision-language model ({', '.join(IMAGE_TEXT_FAMILIES)})")
        prompt_ids, units, prompt_text, _ = self._prompt_units(inputs, "prompt", unit_args)
        self._check_length(len(prompt_ids) + (1 if target is None else 0))
        foil_ids = None
        if contrast is not None:
            foil_ids = self._token_ids(contrast, "contrast", add_special_tokens=False)
        generated = target is None
        if generated:
            target_ids = self._generate(prompt_ids, max_new_tokens)
        else:
            target_ids = self._token_ids(target, "target", add_special_tokens=False)
        seq = prompt_ids + target_ids[:-1]
        n_prompt, n = len(prompt_ids), len(seq)
        self._check_length(n)
        if foil_ids is not None:
            self._check_length(n_prompt + len(foil_ids) - 1)
            return self._contrastive_causal(prompt_ids, target_ids, foil_ids, units,
                                            prompt_text, generated, unit_args)
        coarse = (unit_args["granularity"] != "token" or unit_args["delimiter"] is not None
                  or unit_args["spans"] is not None)
        if not coarse:
            units = units + token_spans(self._token_strings(target_ids[:-1]),
                                        list(range(n_prompt, n)), source="target")
        if not units:
            raise ValueError("the prompt holds only special tokens: nothing to explain "
                             "(special_tokens=True explains them)")
        device = self._device
        ids = torch.tensor(seq, dtype=torch.long, device=device)
        task = CausalLMTask(self.model, ids, n_prompt,
                            torch.tensor(target_ids, dtype=torch.long, device=device),
                            reuse=self.prefix_reuse)
        target_text = (self.tokenizer.decode(target_ids) if self.tokenizer is not None
                       else target_ids)
        return _Prepared(
            task=task, units=units, input_ids=ids, embed=True,
            fields={"target_tokens": self._token_strings(target_ids), "kind": "causal_lm",
                    "token_ids": seq, "prompt": prompt_text},
            settings={"prompt_tokens": n_prompt, "target": target_text, **_unit_settings(unit_args),
                      "target_ids": target_ids, "generated": generated,
                      **({"max_new_tokens": max_new_tokens} if generated else {})},
        )

    def _contrastive_causal(self, prompt_ids: list[int], target_ids: list[int],
                            foil_ids: list[int], units: list[Span], prompt_text: str | None,
                            generated: bool, unit_args: dict[str, Any]) -> _Prepared:
        if not units:
            raise ValueError("the prompt holds only special tokens: nothing to explain "
                             "(special_tokens=True explains them)")
        device = self._device
        ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)
        task = ContrastiveLMTask(
            self.model, ids, torch.tensor(target_ids, dtype=torch.long, device=device),
            torch.tensor(foil_ids, dtype=torch.long, device=device), reuse=self.prefix_reuse)
        decode = self.tokenizer.decode if self.tokenizer is not None else (lambda x: x)
        return _Prepared(
            task=task, units=units, input_ids=ids, embed=True, contrast_rows=len(foil_ids),
            fields={"target_tokens": self._token_strings(target_ids), "kind": "causal_lm",
                    "token_ids": prompt_ids, "prompt": prompt_text,
                    "contrast_tokens": self._token_strings(foil_ids)},
            settings={"prompt_tokens": len(prompt_ids), "target": decode(target_ids),
                      "target_ids": target_ids, "generated": generated,
                      "contrast": decode(foil_ids), "contrast_ids": foil_ids,
                      **_unit_settings(unit_args)},
        )

    def _class_index(self, target: Any, name: str = "target") -> int:
        config = self.model.config
        n_labels = int(getattr(config, "num_labels", 0) or 0)
        if isinstance(target, str):
            label2id = getattr(config, "label2id", None) or {}
            if target not in label2id:
                raise ValueError(f"{name} label {target!r} is not one of the model's labels "
                                 f"{sorted(label2id)}")
            return int(label2id[target])
        if isinstance(target, torch.Tensor) and target.numel() == 1:
            target = int(target.item())
        if isinstance(target, bool) or not isinstance(target, int):
            raise TypeError(f"{name} must be a class index or label name, got "
                            f"{type(target).__name__}")
        if not 0 <= target < n_labels:
            raise ValueError(f"{name} class {target} is out of range [0, {n_labels})")
        return target

    def _label(self, index: int) -> str:
        id2label = getattr(self.model.config, "id2label", None) or {}
        return str(id2label.get(index, index))

    def _classes(self, target: Any, contrast: Any) -> tuple[list[int], dict[str, Any],
                                                           dict[str, Any]]:
        """(class rows, Explanation fields, settings) of a target class and a foil class."""
        cls = self._class_index(target)
        labels, fields = [cls], {"target_tokens": [self._label(cls)]}
        settings = {"target": self._label(cls), "target_index": cls}
        if contrast is not None:
            foil = self._class_index(contrast, "contrast")
            labels.append(foil)
            fields["contrast_tokens"] = [self._label(foil)]
            settings.update(contrast=self._label(foil), contrast_index=foil)
        return labels, fields, settings

    def _prepare_classifier(self, inputs: Any, target: Any, unit_args: dict[str, Any],
                            contrast: Any = None) -> _Prepared:
        labels, class_fields, class_settings = self._classes(target, contrast)
        ids_list, units, prompt_text, enc = self._prompt_units(inputs, "inputs", unit_args)
        if not units:
            raise ValueError("inputs hold only special tokens: nothing to explain")
        self._check_length(len(ids_list))
        device = self._device
        ids = torch.tensor(ids_list, dtype=torch.long, device=device)
        model_inputs = {"input_ids": ids[None]}
        types = enc.get("token_type_ids")
        if types is None and hasattr(inputs, "keys") and inputs.get("token_type_ids") is not None:
            types = torch.as_tensor(inputs["token_type_ids"]).reshape(-1).tolist()
        if types is not None:
            model_inputs["token_type_ids"] = torch.tensor(types, device=device)[None]
        task = ClassificationTask(self.model, model_inputs, len(ids_list), labels)
        return _Prepared(
            task=task, units=units, input_ids=ids, embed=True, contrast_rows=len(labels) - 1,
            fields={"kind": "classifier", "token_ids": ids_list, "prompt": prompt_text,
                    **class_fields},
            settings={**class_settings, **_unit_settings(unit_args)},
        )

    def _prepare_image(self, inputs: Any, target: Any, unit_args: dict[str, Any],
                       contrast: Any = None) -> _Prepared:
        labels, class_fields, class_settings = self._classes(target, contrast)
        if (unit_args["granularity"] != "token" or unit_args["delimiter"] is not None
                or unit_args["spans"] is not None):
            raise ValueError("image classifiers explain patches: granularity, delimiter and "
                             "spans apply to text prompts only")
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
        embedded = embeddings_module(pixels)
        if not isinstance(patches, torch.Tensor) or not isinstance(embedded, torch.Tensor):
            raise TypeError(
                f"unsupported model class {type(self.model).__name__}: its patch embedding "
                "returns more than the patch sequence (hierarchical vision models such as "
                "Swin attend within shifting windows, whose keys are not the image's patch "
                "sequence the factors index)")
        seq_len = embedded.shape[1]
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
        embeddings = None
        if self.conceptual_threshold is not None:
            embeddings = torch.zeros(seq_len, patches.shape[-1], device=patches.device,
                                     dtype=patches.dtype)
            embeddings[n_prefix:] = patches[0]
        units = token_spans([f"patch({i // grid[1]},{i % grid[1]})" for i in range(n_patches)],
                            list(range(n_prefix, seq_len)), source="image")
        task = ClassificationTask(self.model, {"pixel_values": pixels}, seq_len, labels)
        return _Prepared(
            task=task, units=units, embeddings=embeddings, contrast_rows=len(labels) - 1,
            settings={**class_settings, "granularity": "patch"},
            fields={"kind": "image", "token_ids": None, "patch_grid": grid,
                    "image": pixels[0].detach().float().cpu(), **class_fields},
        )

    def _image_text_inputs(self, inputs: Any) -> tuple[dict[str, Any], list[Any] | None]:
        """(processor output, the pictures or None) of ``inputs``."""
        images = None
        if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], str):
            if self.processor is None:
                raise ValueError("inputs=(text, images) needs the model's processor: "
                                 "AtManExplainer(model, processor)")
            text, images = inputs
            images = list(images) if isinstance(images, (list, tuple)) else [images]
            if not images:
                raise ValueError("inputs=(text, images) holds no image")
            inputs = self.processor(text=text, images=images, return_tensors="pt")
        if not hasattr(inputs, "keys") or "input_ids" not in inputs:
            raise TypeError("a vision-language model takes its processor's output (a dict with "
                            "input_ids and pixel_values) or (text, images) with the processor")
        data = dict(inputs.items())
        mask = data.pop("attention_mask", None)
        if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
            raise ValueError("inputs carry padding (attention_mask has zeros): explain one "
                             "unpadded example at a time")
        return data, images

    def _prepare_image_text(self, inputs: Any, target: Any, max_new_tokens: int,
                            unit_args: dict[str, Any], image_region: int | None) -> _Prepared:
        from .vision import image_views, picture_size, probe_boxes, region_cells

        data, images = self._image_text_inputs(inputs)
        prompt_ids = self._token_ids(data.pop("input_ids"), "input_ids",
                                     add_special_tokens=False)
        device, dtype = self._device, next(self.model.parameters()).dtype
        extra = {k: (v.to(device=device, dtype=dtype) if torch.is_tensor(v)
                     and v.is_floating_point() else v.to(device) if torch.is_tensor(v) else v)
                 for k, v in data.items() if v is not None}
        config = self.model.config
        image_token = getattr(config, "image_token_id", None)
        if image_token is None:
            image_token = getattr(config, "image_token_index", None)
        family = IMAGE_TEXT_FAMILIES[type(self.model).__name__]
        grids = None
        if family == "qwen2_vl" and extra.get("image_grid_thw") is not None:
            merge = int(getattr(config.vision_config, "spatial_merge_size", 2))
            thw = extra["image_grid_thw"].tolist()
            if any(int(t) != 1 for t, _, _ in thw):
                raise NotImplementedError("image_grid_thw with more than one temporal patch "
                                          "(video) is not supported")
            grids = [(int(h) // merge, int(w) // merge) for _, h, w in thw]
        views = image_views(family, prompt_ids, int(image_token),
                            lambda t: self._token_strings([t])[0], grids)
        if "pixel_values" in extra and not views:
            raise ValueError("pixel_values are given but the prompt has no image token "
                             f"(id {image_token}): put the processor's image placeholder in "
                             "the text")
        if views and "pixel_values" not in extra:
            raise ValueError("the prompt has image tokens but no pixel_values were given")
        if images is not None:
            n_images = 1 + max(v.image for v in views) if views else 0
            if n_images != len(images):
                raise ValueError(f"the prompt has {n_images} images' tokens, {len(images)} "
                                 "images were given")
            for i, picture in enumerate(images):
                if family == "qwen2_vl":  # flattened patches, not frames: no boxes yet
                    break
                probe_boxes(self.processor.image_processor, picture_size(picture),
                            [v for v in views if v.image == i])
        # text units over the decoded prompt (image runs shown as a placeholder)
        image_positions = {p for v in views for p in v.positions}
        special = set() if unit_args["special_tokens"] else self._special_ids()
        pieces, offsets, cursor = [], [], 0
        for i, t in enumerate(prompt_ids):
            piece = "" if i in image_positions else self._token_strings([t])[0]
            pieces.append(piece)
            offsets.append((cursor, cursor + len(piece)))
            cursor += len(piece)
        text = "".join(pieces)
        eligible = [i for i, t in enumerate(prompt_ids)
                    if i not in image_positions and t not in special and offsets[i][0] <
                    offsets[i][1]]
        units = prompt_spans(text, offsets, granularity=unit_args["granularity"],
                             delimiter=unit_args["delimiter"], spans=unit_args["spans"],
                             eligible=eligible) if eligible else []
        # image units: one per cell, or per k x k region, of every view
        k = image_region or 1
        image_units: list[tuple[Span, dict[str, Any], list[int]]] = []
        for view in views:
            for cells in region_cells(view.grid, k):
                rows = sorted({c // view.grid[1] for c in cells})
                cols = sorted({c % view.grid[1] for c in cells})
                where = (f"({rows[0]},{cols[0]})" if len(cells) == 1 else
                         f"rows {rows[0]}-{rows[-1]} cols {cols[0]}-{cols[-1]}")
                box = None
                if view.boxes is not None:
                    bs = [view.boxes[c] for c in cells]
                    box = (min(b[0] for b in bs), min(b[1] for b in bs),
                           max(b[2] for b in bs), max(b[3] for b in bs))
                span = Span(f"image {view.image} {view.view} {where}", None, None,
                            tuple(sorted(view.positions[c] for c in cells)), source="image",
                            image=view.image, box=box)
                image_units.append((span, {"image": view.image, "view": view.view}, cells))
        generated = target is None
        if generated:
            target_ids = self._generate(prompt_ids, max_new_tokens, extra)
        else:
            target_ids = self._token_ids(target, "target", add_special_tokens=False)
        seq = prompt_ids + target_ids[:-1]
        n_prompt, n = len(prompt_ids), len(seq)
        self._check_length(n)
        # per-token inputs of the prompt (e.g. Qwen2-VL's mm_token_type_ids) cover the target
        # tokens too: they are text (0)
        extra = {k: torch.nn.functional.pad(v, (0, n - n_prompt))
                 if torch.is_tensor(v) and v.dim() == 2 and v.shape == (1, n_prompt)
                 and not v.is_floating_point() else v for k, v in extra.items()}
        coarse = (unit_args["granularity"] != "token" or unit_args["delimiter"] is not None
                  or unit_args["spans"] is not None)
        all_units = units + [u for u, _, _ in image_units]
        if not coarse:
            all_units += token_spans(self._token_strings(target_ids[:-1]),
                                     list(range(n_prompt, n)), source="target")
        all_units.sort(key=lambda u: u.positions[0])
        index = {id(u): i for i, u in enumerate(all_units)}
        maps: dict[tuple[int, str], dict[str, Any]] = {}
        for view in views:
            maps[(view.image, view.view)] = {"image": view.image, "view": view.view,
                                             "grid": list(view.grid),
                                             "cells": [0] * (view.grid[0] * view.grid[1])}
        for span, key, cells in image_units:
            for c in cells:
                maps[(key["image"], key["view"])]["cells"][c] = index[id(span)]
        ids = torch.tensor(seq, dtype=torch.long, device=device)
        task = VisionLanguageTask(self.model, ids, n_prompt,
                                  torch.tensor(target_ids, dtype=torch.long, device=device),
                                  reuse=self.prefix_reuse, extra=extra,
                                  language_model=self.model.get_decoder())
        pictures = None if images is None else [_as_rgb_array(im) for im in images]
        return _Prepared(
            task=task, units=all_units,
            fields={"target_tokens": self._token_strings(target_ids), "kind": "image_text",
                    "token_ids": seq, "prompt": text, "image_views": list(maps.values()),
                    "images": pictures},
            settings={"prompt_tokens": n_prompt,
                      "target": (self.tokenizer.decode(target_ids) if self.tokenizer is not None
                                 else target_ids),
                      "target_ids": target_ids, "generated": generated,
                      "image_region": image_region, **_unit_settings(unit_args)},
        )

    # ------------------------------------------------------------------------------ engine
    def _run(self, prepared: _Prepared) -> EngineResult:
        task, units = prepared.task, prepared.units
        n = task.seq_len
        unit_positions = [list(u.positions) for u in units]
        similarity = None
        if self.conceptual_threshold is not None:
            embeddings = prepared.embeddings
            if embeddings is None and prepared.embed and prepared.input_ids is not None:
                embeddings = self.model.get_input_embeddings()(prepared.input_ids)
            if embeddings is not None:
                similarity = cosine_similarity_matrix(embeddings.float().cpu())
        eligible = sorted({p for u in unit_positions for p in u})
        factors = unit_factors(n, unit_positions, self.factor, similarity=similarity,
                               threshold=self.conceptual_threshold, eligible=eligible)
        factors = factors.to(device=self._device, dtype=torch.float32)
        policy = ChunkPolicy(self.batch_size, self.max_memory, self._device,
                             next(self.model.parameters()).dtype, self.model.config)

        def chunk_size(reuse: bool) -> int:
            return policy.size(len(units), len_q=n, len_k=n, n_logits=task.n_targets,
                               reuse=reuse)

        from tqdm.auto import tqdm

        with tqdm(total=len(units), desc="AtMan", unit="variant", disable=not self.progress,
                  leave=False) as bar:
            result = run_variants(
                task, factors, mode=self.mode, layers=self.layers, chunk_size=chunk_size,
                on_done=bar.update, guard=lambda: _routing_guard(self.model, self.layers),
            )
        self.last_stats = _stats(result, len(units))
        return result

    def _finish(self, result: EngineResult, prepared: _Prepared) -> Explanation:
        rows = result.rise.T.contiguous().detach().cpu()  # [T (+ F), n]
        n_target = rows.shape[0] - prepared.contrast_rows
        per_target, foil = rows[:n_target], rows[n_target:]
        baseline = result.baseline.detach().cpu()
        contrast_fields = {}
        if prepared.contrast_rows:
            contrast_fields = {"contrast_per_target": foil.clone(),
                               "contrast_baseline_loss": baseline[n_target:].clone()}
        scores = combine_scores(per_target, self.postprocess, self.normalize,
                                contrast=foil if prepared.contrast_rows else None)
        settings = self._settings(
            **prepared.settings, prefix_reuse=result.prefix_reuse, batch_size=result.chunk_size,
            forwards=result.forwards, token_forwards=result.token_forwards,
            units=len(prepared.units),
        )
        # tensors made under inference_mode refuse in-place updates later: hand out plain ones
        # (cloned here, outside inference_mode)
        fields = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                  for k, v in prepared.fields.items()}
        return Explanation(tokens=[], scores=scores.clone(), per_target=per_target.clone(),
                           baseline_loss=baseline[:n_target].clone(), spans=prepared.units,
                           settings=settings, **contrast_fields, **fields)


@dataclass
class _Prepared:
    """What a front end hands the engine: the task, the units, the Explanation's fields and
    settings, and what conceptual suppression compares (the layer-0 input embeddings, or the
    input ids to embed)."""

    task: Any
    units: list[Span]
    fields: dict[str, Any]
    settings: dict[str, Any]
    input_ids: torch.Tensor | None = None
    embed: bool = False
    embeddings: torch.Tensor | None = None
    contrast_rows: int = 0  # the last rows of the task's targets are the foil's


def _unit_settings(unit_args: dict[str, Any]) -> dict[str, Any]:
    """How the prompt was cut into units, for ``Explanation.settings``."""
    if unit_args["spans"] is not None:
        return {"granularity": "spans"}
    if unit_args["delimiter"] is not None:
        return {"granularity": "delimiter", "delimiter": unit_args["delimiter"]}
    return {"granularity": unit_args["granularity"]}


@contextmanager
def _routing_guard(model: Any, layers: list[int] | None) -> Iterator[None]:
    """Count the baseline forward's attention calls; refuse a model whose suppressed layers'
    attention never reached "atman" (it would explain as all zeros)."""
    from ..hf import check_layers_routed, count_attention_calls

    with count_attention_calls() as counts:
        yield
    check_layers_routed(model, counts, layers=layers, suppressed=True)


def _stats(result: EngineResult, n_units: int) -> dict[str, Any]:
    return {"forwards": result.forwards, "token_forwards": result.token_forwards,
            "chunk_size": result.chunk_size, "prefix_reuse": result.prefix_reuse,
            "variants": n_units}


def _as_rgb_array(image: Any) -> Any:
    """A picture as an [H, W, 3] uint8 array, for rendering."""
    import numpy as np

    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"))
    arr = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype != np.uint8:
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 if hi <= 1.0 and lo >= 0.0 else 1.0
        arr = np.clip(arr * scale, 0, 255).astype(np.uint8)
    return arr


def _num_layers(model: Any) -> int | None:
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_layers(layers: Sequence[int] | None, n_layers: int | None) -> list[int] | None:
    """Layer indices as non-negative ints, each a layer of the model (negative from the end)."""
    if layers is None:
        return None
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a list of layer indices or None, got "
                        f"{type(layers).__name__}")
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"layers must hold ints, got {i!r}")
        if n_layers is not None:
            if not -n_layers <= i < n_layers:
                raise ValueError(f"layers: {i} is not a layer of this model, which has "
                                 f"{n_layers} layers (valid: 0..{n_layers - 1} or negative)")
            i %= n_layers
        out.append(i)
    if not out:
        raise ValueError("layers is empty: give at least one layer index, or None for all")
    return sorted(set(out))


def _check_unit_arguments(granularity: Any, delimiter: Any, spans: Any) -> None:
    """Cheap checks of the unit arguments, before any work (prompt_spans checks the rest)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r} "
                         "(for a custom delimiter pass delimiter=..., e.g. delimiter='###')")
    if delimiter is not None and (not isinstance(delimiter, str) or delimiter == ""):
        raise ValueError(f"delimiter must be a non-empty string or None, got {delimiter!r}")
    given = [name for name, on in (("granularity", granularity != "token"),
                                   ("delimiter", delimiter is not None),
                                   ("spans", spans is not None)) if on]
    if len(given) > 1:
        raise ValueError(f"give one way to cut the prompt into units, got {' and '.join(given)}")
