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
- image classifiers (``*ForImageClassification`` with ViT-style patch embeddings or a CLIP /
  SigLIP vision tower, ``*ForImageClassificationWithTeacher``): the patch tokens are explained
  (not [CLS] or a distillation token); the result has the patch grid;
- zero-shot image-text models (CLIP, MetaCLIP 2, SigLIP, SigLIP 2): one of several candidate
  label texts for an image; the patches are explained, in the vision tower only.

Exact prefix reuse (causal LMs): a variant whose earliest suppressed position is p leaves every
hidden state before p unchanged, so the unsuppressed sequence runs once with a KV cache and each
chunk of variants (sorted by p) recomputes only positions >= the chunk's smallest p on top of the
cached prefix, expanded over the chunk. The scores equal a full recompute up to rounding.

Data flows one way: a front end per kind of model (:mod:`.front`) turns the inputs into a task
and its units; :func:`.conceptual.unit_factors` makes one factor row per unit; the engine
(:mod:`.engine`) runs the rows in chunks; :meth:`AtManExplainer._finish` builds the
:class:`.explanation.Explanation` that the renderers (:mod:`.render`) read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..ops import BACKENDS
from ..ops._checks import MODES
from ..suppression import attention_backend
from .batching import ChunkPolicy
from .conceptual import check_factor, check_threshold, cosine_similarity_matrix, unit_factors
from .design import Outcome, Problem, check_budget, check_design, choose_design
from .engine import EngineResult, VariantRunner
from .explanation import POSTPROCESS, Explanation, Node, combine_scores
from .factors import group_factors
from .front.base import Prepared, check_unit_arguments, compose_context, unit_settings
from .front.causal import CausalFrontEnd
from .front.classify import IMAGE_REFUSED, ClassifierFrontEnd
from .front.image_text import CAUSAL_IMAGE_TEXT_FAMILIES, IMAGE_TEXT_FAMILIES, ImageTextFrontEnd
from .front.zero_shot import ZERO_SHOT_FAMILIES, ZeroShotFrontEnd

log = logging.getLogger(__name__)

SUPPORTED_KINDS = (
    "causal LMs (*ForCausalLM, *LMHeadModel), sequence classifiers "
    "(*ForSequenceClassification), image classifiers (*ForImageClassification: ViT-style "
    "and Swin), "
    f"vision-language models "
    f"({', '.join(sorted([*IMAGE_TEXT_FAMILIES, *CAUSAL_IMAGE_TEXT_FAMILIES]))}), zero-shot "
    f"image-text models ({', '.join(sorted(ZERO_SHOT_FAMILIES))})"
)
SINKS = ("keep", "explain")
# Vision-language models refused with a reason of their own (none at present).
IMAGE_TEXT_REFUSED: dict[str, str] = {}


def model_kind(model: Any) -> str:
    """The kind of ``model`` (:func:`kind_of_class_name` of its class), else TypeError."""
    return kind_of_class_name(type(model).__name__)


def kind_of_class_name(name: str) -> str:
    """"causal_lm", "classifier", "image", "image_text" or "zero_shot" for a supported
    transformers model class (by its name: no weights needed), else TypeError naming it.

    A multimodal class that transformers lists among its causal LMs
    (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``: ``Gemma3ForConditionalGeneration``, Gemma 4, ...)
    and that is not an image-text family here is a causal LM on text: its text path is the
    language model's. Inputs with images go to the vision-language front end for the classes
    of :data:`.front.image_text.CAUSAL_IMAGE_TEXT_FAMILIES` (Gemma 3) and are refused with the
    reason for the others (Gemma 4: :data:`.front.causal.IMAGES_REFUSED`).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if name in IMAGE_TEXT_FAMILIES:
        return "image_text"
    if name in ZERO_SHOT_FAMILIES:
        return "zero_shot"
    if name in IMAGE_REFUSED:
        raise TypeError(f"unsupported model class {name}: {IMAGE_REFUSED[name]}")
    if name in IMAGE_TEXT_REFUSED:
        raise TypeError(f"unsupported model class {name}: {IMAGE_TEXT_REFUSED[name]}")
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal_lm"
    causal_lms = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    if any(name == n or (isinstance(n, (list, tuple)) and name in n) for n in causal_lms):
        return "causal_lm"
    if name.endswith("ForSequenceClassification"):
        return "classifier"
    if name.endswith(("ForImageClassification", "ForImageClassificationWithTeacher")):
        return "image"
    raise TypeError(f"unsupported model class {name}: AtManExplainer supports {SUPPORTED_KINDS}")


class AtManExplainer(CausalFrontEnd, ClassifierFrontEnd, ImageTextFrontEnd, ZeroShotFrontEnd):
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
        sink: causal LMs and vision-language models: "keep" leaves the input's first position
            (the model's attention sink, when it is not a special token already left out)
            out of every unit: never suppressed, never explained (a unit holding only it is
            dropped, a longer unit keeps its text but not that token); "explain" treats it as
            any other token.
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
        sink: str = "explain",
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
        self.layers = _check_layers(layers, _num_layers(self._suppressed_root()))
        if postprocess not in POSTPROCESS:
            raise ValueError(f"postprocess must be one of {POSTPROCESS}, got {postprocess!r}")
        self.postprocess = postprocess
        self.normalize = bool(normalize)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        if sink not in SINKS:
            raise ValueError(f"sink must be one of {SINKS}, got {sink!r}")
        self.sink = sink
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
        design: Any = "auto",
        budget: int | None = None,
        context: str | None = None,
        template: str | None = None,
    ) -> Explanation:
        """Explain why the model predicts ``target`` for ``inputs``.

        Causal LM: ``inputs`` the prompt (str, or token ids: list / [N] / [1, N] tensor),
        ``target`` the continuation (str or ids), or None to explain the model's own greedy
        continuation (``model.generate``, no sampling, at most ``max_new_tokens`` tokens,
        stopping at EOS; the EOS itself is not part of the target). Classifier: ``inputs`` a
        str, ids or a tokenizer output; ``target`` a class index or label name
        (``config.label2id``). Image: ``inputs`` pixel values [1, 3, H, W] / [3, H, W] or a
        dict with "pixel_values" (SigLIP 2: its image processor's output, pre-patchified
        ``pixel_values`` [1, P, C*p*p] with ``pixel_attention_mask`` and ``spatial_shapes``),
        at the model's ``image_size``; ``target`` a class index or label name.

        Zero-shot image-text models (CLIP, MetaCLIP 2, SigLIP, SigLIP 2): ``inputs`` is
        ``(image, candidates)``: the image as for image classifiers, or a picture (PIL image,
        [H, W, 3] array) with the processor given as ``AtManExplainer(model, processor)``; the
        candidates a list of at least two distinct label texts (tokenised with the processor,
        SigLIP padded to its maximum length as it was trained) or a tokenizer output with
        ``input_ids`` [K, L]. ``target`` (and ``contrast``) is a candidate's text or index.
        The score is the rise of the target's cross-entropy under the softmax over the
        candidates' ``logits_per_image`` (SigLIP too: ``settings["zero_shot_score"]``); the
        patches are the units, suppressed in the vision tower only (SigLIP's attention-pooling
        head, a torch MultiheadAttention readout, is not suppressed); the text tower runs once.
        The Explanation has kind "image" (patch grid, heatmap) with
        ``settings["task"] == "zero_shot"`` and the candidates in ``settings["candidates"]``.

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
        in the original picture. ``Gemma3ForConditionalGeneration`` (a causal LM on text) goes
        this way when the inputs hold images (with ``token_type_ids``, as its processor gives
        them): its pooled soft tokens are the cells; the variants get the baseline's masks, in
        which each image's tokens see each other.

        Contrastive ("why the target rather than the foil"): ``contrast`` is a foil
        continuation (str or ids, any length) for causal LMs, a foil class (index or label) for
        classifiers, another candidate for zero-shot models. A unit's score is then the rise
        of the target's cross-entropy minus the rise of the foil's under the same
        suppression: how much suppressing the unit narrows the target-over-foil margin
        (positive = the unit supports the target over the foil).
        Both per-token matrices are kept (``per_target``, ``contrast_per_target``); the
        units are the prompt's (a causal LM's target tokens are not explained). Target and
        foil share the prompt's forward and each variant's factors: the foil costs only its
        own tokens.

        Chat models: ``chat=True`` takes ``inputs`` as the user's message, applies the
        tokenizer's chat template (with the generation prompt) and explains the user's message
        only: the template's tokens (system prompt, role markers) are neither explained nor
        suppressed; ``spans`` then count characters from the start of the message.

        A context given apart from the question (retrieval-augmented prompts): ``inputs`` is
        the question, ``context`` the document; the prompt is ``template`` (default
        "Context: {context}\n\nQuery: {question}", ContextCite's) filled in, under the chat
        template with ``chat=True``; only the context is cut into units (at ``granularity``)
        and suppressed, so the question and the template's words are never explained.
        Causal LMs and text classifiers.

        Designs (:mod:`.design`): which units each variant suppresses together.
        ``design="single"`` is the paper's (one variant per unit, exact scores);
        ``"hierarchical"`` scores coarse units (paragraphs, or blocks of consecutive units)
        jointly and refines the best ones best-first within ``budget``, every score the exact
        score of its unit (``Explanation.tree`` keeps every level; unrefined groups are units
        of their own); ``"sampled"`` (or ``Sampled(keep_prob, seed, alpha)``) fits a sparse
        linear surrogate to ``budget`` random joint suppressions, so the scores are estimates
        and ``Explanation.estimate`` says so with the fit's quality. ``"auto"`` (default) is
        ``single`` when the units fit in the budget, else ``hierarchical`` for text.
        ``budget``: the most suppressed variants (forwards of the input, the baseline not
        counted) the explanation may run (None: :data:`.design.DEFAULT_BUDGET`). A design
        that cannot work within it is refused before any forward; with ``target=None``,
        before the answer is generated where no answer could fit.
        ``settings`` records the design, the budget and the variants spent.
        """
        from ..hf import atman_attention, check_supported

        check_unit_arguments(granularity, delimiter, spans)
        if context is not None or template is not None:
            if self.kind not in ("causal_lm", "classifier"):
                raise ValueError(f"context= explains a text context given apart from its "
                                 f"question; not for a {self.kind} model")
            if context is None:
                raise ValueError("template= fills in a context: give context= too")
            if spans is not None:
                raise ValueError("context= and spans= cannot be combined: the context's units "
                                 "are cut at granularity=/delimiter=")
            compose_context(inputs, context, template)
        design = check_design(design)
        budget = check_budget(budget)
        # a model "atman" cannot reach is refused before any input is prepared
        check_supported(self._suppressed_root())
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
            or image_region < 1 or not self._takes_images()
        ):
            raise ValueError(f"image_region must be an int >= 1 for a vision-language model, got "
                             f"{image_region!r} for a {self.kind} model")
        model = self.model
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        unit_args = {"granularity": granularity, "delimiter": delimiter, "spans": spans,
                     "special_tokens": bool(special_tokens), "chat": bool(chat),
                     "context": context, "template": template}
        if chat and self.kind not in ("causal_lm", "classifier"):
            raise ValueError(f"chat=True applies a tokenizer's chat template to a text prompt; "
                             f"not for a {self.kind} model")
        try:
            with torch.inference_mode():
                # a generated answer is refused before it is generated where no answer fits
                def precheck(options: list[list[Any]], prompt: str | None,
                             pictures: bool) -> None:
                    self._precheck(design, budget, options, prompt,
                                   unit_settings(unit_args)["granularity"], pictures)

                if self.kind == "causal_lm":
                    prepared = self._prepare_causal(inputs, target, max_new_tokens, unit_args,
                                                    contrast, image_region, precheck)
                elif self.kind == "classifier":
                    prepared = self._prepare_classifier(inputs, target, unit_args, contrast)
                elif self.kind == "image_text":
                    prepared = self._prepare_image_text(inputs, target, max_new_tokens,
                                                        unit_args, image_region, precheck)
                elif self.kind == "zero_shot":
                    prepared = self._prepare_zero_shot(inputs, target, unit_args, contrast)
                else:
                    prepared = self._prepare_image(inputs, target, unit_args, contrast)
                root = self._suppressed_root()
                only = None if root is model else root
                if self.sink == "keep" and self.kind in ("causal_lm", "image_text"):
                    prepared.units = _without_first_position(prepared.units)
                chosen = _fit_design(design, budget, prepared.units,
                                     prepared.fields.get("prompt"),
                                     prepared.settings.get("granularity", "token"),
                                     _has_pictures(prepared))
                with atman_attention(model, only=only), attention_backend(self.backend):
                    result, outcome = self._run(prepared, chosen, budget)
        finally:
            model.train(was_training)
        expl = self._finish(result, prepared, outcome)
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
    def _takes_images(self) -> bool:
        """A vision-language model, or a causal LM that also takes images (Gemma 3)."""
        return self.kind == "image_text" or (
            self.kind == "causal_lm" and type(self.model).__name__ in CAUSAL_IMAGE_TEXT_FAMILIES)

    def _suppressed_root(self) -> Any:
        """The (sub-)model "atman" is switched into: a vision-language model's language model
        (also of a causal LM that takes images: its vision tower keeps its own attention), a
        CLIP-style model's vision tower, else the model."""
        if self._takes_images():
            return self.model.get_decoder()
        if self.kind == "zero_shot":
            return self._zero_shot_tower()
        if self.kind == "image":
            return self._vision_root() or self.model
        return self.model

    def _guarded_root(self) -> Any:
        """The model whose layers the routing guard checks (a vision tower where only it is
        suppressed)."""
        return self._suppressed_root() if self.kind in ("image", "zero_shot") else self.model

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
            "sink": self.sink,
        }
        settings.update(extra)
        return settings

    def _precheck(self, design: Any, budget: int | None, options: list[list[Any]],
                  prompt: str | None, granularity: str, pictures: bool) -> None:
        """Before generating an answer: refuse the design and budget where they fit none of
        the unit lists ``options`` the answer can give (the front end lists them: without
        target-token units, and with them where the answer is explained token by token;
        designs depend only on whether there are any, see :func:`_fit_design`)."""
        errors = []
        for units in options:
            if self.sink == "keep" and self.kind in ("causal_lm", "image_text"):
                units = _without_first_position(units)
            try:
                _fit_design(design, budget, units, prompt, granularity, pictures)
                return
            except ValueError as e:
                errors.append(e)
        raise ValueError(f"{errors[-1]} (refused before generating the answer: it fits no "
                         "answer the model can generate)")

    # ------------------------------------------------------------------------------ engine
    def _run(self, prepared: Prepared, design: Any, budget: int | None
             ) -> tuple[EngineResult, Outcome]:
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
        unit_rows = unit_factors(n, unit_positions, self.factor, similarity=similarity,
                                 threshold=self.conceptual_threshold, eligible=eligible)
        policy = ChunkPolicy(self.batch_size, self.max_memory, self._device,
                             next(self.model.parameters()).dtype, self.model.config)

        # a task whose attention is not over its n factor columns says what it is (Swin:
        # windows of the first stage's tokens)
        len_q, len_k = getattr(task, "attention_shape", None) or (n, n)
        expected = len(units) if budget is None else min(budget, len(units))

        def chunk_size(reuse: bool) -> int:
            return policy.size(expected, len_q=len_q, len_k=len_k, n_logits=task.n_targets,
                               reuse=reuse)

        from tqdm.auto import tqdm

        contrast_rows = prepared.contrast_rows

        def rank(rise: torch.Tensor) -> torch.Tensor:
            rows = rise.T  # [R, G]
            t = rows.shape[0] - contrast_rows
            return combine_scores(rows[:t], self.postprocess, False,
                                  contrast=rows[t:] if contrast_rows else None)

        with tqdm(total=expected, desc="AtMan", unit="variant", disable=not self.progress,
                  leave=False) as bar:
            runner = VariantRunner(
                task, mode=self.mode, layers=self.layers, chunk_size=chunk_size,
                device=self._device, on_done=bar.update,
                guard=lambda: _routing_guard(self._guarded_root(), self.layers))

            def evaluate(groups: Any) -> torch.Tensor:
                rows = group_factors(unit_rows, groups)
                return runner.run(rows.to(device=self._device, dtype=torch.float32))

            problem = Problem(units=list(units), prompt=prepared.fields.get("prompt"),
                              granularity=prepared.settings.get("granularity", "token"),
                              evaluate=evaluate, rank=rank, budget=budget)
            outcome = design.run(problem)
        result = runner.result(outcome.rise)
        self.last_stats = _stats(result, runner.variants)
        return result, outcome

    def _finish(self, result: EngineResult, prepared: Prepared, outcome: Outcome
                ) -> Explanation:
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
            units=len(prepared.units), **outcome.settings,
        )
        if getattr(prepared.task, "reuse_off", None):  # asked for, impossible for this cache
            settings["prefix_reuse_off"] = prepared.task.reuse_off
        tree = []
        for entry in outcome.tree:
            row = entry.rise.detach().cpu().to(torch.float64)
            own, foil_row = row[:n_target], row[n_target:]
            score = combine_scores(own[:, None], self.postprocess, False,
                                   contrast=foil_row[:, None] if prepared.contrast_rows
                                   else None)
            tree.append(Node(span=entry.span, level=entry.level, parent=entry.parent,
                             rise=tuple(own.tolist()), score=float(score[0]),
                             refined=entry.refined,
                             contrast_rise=tuple(foil_row.tolist()) if prepared.contrast_rows
                             else None))
        # tensors made under inference_mode refuse in-place updates later: hand out plain ones
        # (cloned here, outside inference_mode)
        fields = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                  for k, v in prepared.fields.items()}
        return Explanation(tokens=[], scores=scores.clone(), per_target=per_target.clone(),
                           baseline_loss=baseline[:n_target].clone(), spans=outcome.spans,
                           settings=settings, tree=tree, estimate=outcome.estimate,
                           **contrast_fields, **fields)


def _has_pictures(prepared: Prepared) -> bool:
    return (prepared.fields.get("patch_grid") is not None
            or bool(prepared.fields.get("image_views")))


def _fit_design(design: Any, budget: int | None, units: list[Any], prompt: str | None,
                granularity: str, pictures: bool) -> Any:
    """The design to run on ``units`` (``choose_design``), refused before any forward where
    it cannot explain them within ``budget`` (the design's own ``check``) or where an
    explanation's fields cannot hold its units: a picture's map needs one score per cell,
    which a coarse-to-fine design leaves out where it does not refine."""
    from .design import Hierarchical

    chosen = choose_design(design, units, budget)
    if isinstance(chosen, Hierarchical) and pictures:
        raise ValueError("design 'hierarchical' is not built for pictures yet: a score map "
                         "needs a score for every cell, and unrefined regions have none; use "
                         "design='single' (exact) or 'sampled' (estimated)")
    chosen.check(units, prompt, granularity, budget)
    return chosen


def _without_first_position(units: list[Any]) -> list[Any]:
    """The units without input position 0 (see ``sink="keep"``)."""
    from .units import Span

    out = []
    for u in units:
        if u.positions[0] != 0:
            out.append(u)
        elif len(u.positions) > 1:
            out.append(Span(u.text, u.start, u.end, u.positions[1:], u.source, u.image, u.box))
    if not out:
        raise ValueError("with sink='keep' the input's first position is not explained, and "
                         "it is the only unit: nothing is left to explain (sink='explain')")
    return out


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
