"""The attribution methods compared by ``eval_quality.py``, on one causal-LM item each.

Every method explains the same prediction: ``target_ids`` after ``prompt_ids``, teacher forced
(the model reads prompt + target[:-1]); gradient and ablation methods use the summed log-probability
of the target tokens (``_baselines.target_log_prob_fn``). Each returns scores [n_prompt] over the
prompt tokens, higher = more support for the target; the evaluation then restricts them to the
candidate tokens (context / tweet).

- ``atman_*``: :class:`atman_kernels.AtManExplainer` (paper or log mode, factor 0.1, conceptual
  suppression at kappa 0.7 or off); its scores over the prompt positions.
- ``ig``: Captum LayerIntegratedGradients on the embedding layer, n_steps=10, baseline = every
  token replaced by token 0 (``<|endoftext|>``, SmolLM2's unk), summed over the embedding dim.
- ``ixg``: input x gradient of the embeddings (Captum LayerGradientXActivation), summed.
- ``feature_ablation``: Captum FeatureAblation on the token ids, one token at a time replaced by
  token 0: score = log p(target) - log p(target | token ablated).
- ``attention``: last layer's attention probabilities, mean over heads, the row(s) of the
  target-predicting position(s) (for a one-token target: the last position), averaged.
- ``rollout``: attention rollout (Abnar & Zuidema 2020): per layer the head mean A, then
  (A + I) / 2 (rows sum to 1 again), multiplied through the layers bottom-up; the same rows.
- ``chefer``: attention x gradient relevance (Chefer et al. 2021) from ``_baselines``.
- ``random``: uniform noise from a per-item seed.

Document task (``DOC_METHODS``): each method scores the *sentences* of a document prompt
[n_sentences]. ``atman_sentence`` runs one AtMan variant per sentence (the explainer's
``spans=``); ``atman_token_sum`` one variant per document token, summed per sentence; ``_cs`` =
conceptual suppression at kappa 0.7 (for a sentence: the union of its tokens'); ``ig_sum``,
``ixg_sum``, ``chefer_sum`` sum the token baselines above per sentence; ``random`` draws one
number per sentence. Every method uses the same sentence units (the tokens overlapping each
sentence's character range).

Contrast task (``CONTRAST_METHODS``, issue 12): the sentences scored for "why the fact rather
than the foil". ``atman_contrast``: one AtMan variant per sentence with ``contrast=`` the foil
(score = rise of CE(fact) minus rise of CE(foil)); ``atman_fact``: the same on the fact alone;
``ixg_contrast`` / ``ig_contrast``: input x gradient / integrated gradients (``IG_STEPS``
steps, baseline token ``ABLATION_ID``) of log p(fact) - log p(foil) (each summed over its
tokens) on the prompt's embeddings, summed per sentence; ``ixg_fact``: the token IxG of the fact
alone, summed per sentence; ``random``: one number per sentence.

Attention methods switch the model to transformers' "eager" attention for their forward and
restore the previous implementation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import _baselines
import torch

IG_STEPS = 10
ABLATION_ID = 0  # SmolLM2's <|endoftext|> (its unk token): IG baseline and ablation value


@contextlib.contextmanager
def eager_attention(model: Any) -> Iterator[Any]:
    """Run ``model`` with transformers' "eager" attention (which returns probabilities)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def _sequence(prompt_ids: list[int], target_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([prompt_ids + target_ids[:-1]], dtype=torch.long)
    return ids, torch.tensor(target_ids, dtype=torch.long)


def atman_method(mode: str, conceptual: bool, sink: str = "explain"
                 ) -> Callable[..., torch.Tensor]:
    """An AtMan method with the given mode and conceptual suppression on (kappa 0.7) or off;
    ``sink="keep"``: the first position neither suppressed nor explained (its score 0)."""

    def run(model: Any, tokenizer: Any, prompt_ids: list[int], target_ids: list[int],
            seed: int) -> torch.Tensor:
        from atman_kernels import AtManExplainer

        explainer = AtManExplainer(model, tokenizer, factor=0.1, mode=mode,
                                   conceptual_threshold=0.7 if conceptual else None,
                                   progress=False, sink=sink)
        expl = explainer.explain(list(prompt_ids), list(target_ids), design="single")
        scores = torch.zeros(len(prompt_ids))
        for span, score in zip(expl.spans, expl.scores.tolist(), strict=True):
            if span.positions[0] < len(prompt_ids):
                scores[span.positions[0]] = score
        return scores

    return run


def ig(model: Any, tokenizer: Any, prompt_ids: list[int], target_ids: list[int],
       seed: int) -> torch.Tensor:
    """Layer integrated gradients on the embeddings -> [n_prompt]."""
    ids, tgt = _sequence(prompt_ids, target_ids)
    scores = _baselines.integrated_gradients(model, ids, tgt, n_steps=IG_STEPS,
                                             internal_batch_size=IG_STEPS,
                                             baseline_id=ABLATION_ID)
    return scores[: len(prompt_ids)].float()


def ixg(model: Any, tokenizer: Any, prompt_ids: list[int], target_ids: list[int],
        seed: int) -> torch.Tensor:
    """Input x gradient of the embeddings -> [n_prompt]."""
    ids, tgt = _sequence(prompt_ids, target_ids)
    return _baselines.input_x_gradient(model, ids, tgt)[: len(prompt_ids)].float()


def feature_ablation(model: Any, tokenizer: Any, prompt_ids: list[int], target_ids: list[int],
                     seed: int, *, per_eval: int = 16) -> torch.Tensor:
    """Captum FeatureAblation over the prompt tokens (one at a time, -> token 0) -> [n_prompt]."""
    from captum.attr import FeatureAblation

    ids, tgt = _sequence(prompt_ids, target_ids)
    n_prompt = len(prompt_ids)
    # one feature per prompt token; the teacher-forced target tokens form one more feature
    # whose attribution is dropped
    mask = torch.arange(ids.shape[1]).clamp(max=n_prompt)[None]
    forward = _baselines.target_log_prob_fn(model, tgt)
    with torch.no_grad():
        attr = FeatureAblation(forward).attribute(ids, baselines=ABLATION_ID, feature_mask=mask,
                                                  perturbations_per_eval=per_eval)
    return attr[0, :n_prompt].float()


def _attention_maps(model: Any, prompt_ids: list[int], target_ids: list[int]
                    ) -> tuple[tuple[torch.Tensor, ...], int]:
    ids, _ = _sequence(prompt_ids, target_ids)
    with eager_attention(model), torch.no_grad():
        out = model(input_ids=ids, output_attentions=True, use_cache=False, logits_to_keep=1)
    if not out.attentions or out.attentions[0] is None:
        raise RuntimeError("the model returned no attention probabilities")
    return out.attentions, len(target_ids)


def attention(model: Any, tokenizer: Any, prompt_ids: list[int], target_ids: list[int],
              seed: int) -> torch.Tensor:
    """Raw last-layer attention (head mean) of the target-predicting rows -> [n_prompt]."""
    maps, n_target = _attention_maps(model, prompt_ids, target_ids)
    last = maps[-1][0].float().mean(0)  # [N, N]
    return last[-n_target:].mean(0)[: len(prompt_ids)]


def rollout_matrix(maps: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout: maps per layer [1, H, N, N] (bottom first) -> [N, N]."""
    n = maps[0].shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    rolled = eye
    for attn in maps:
        a = attn[0].double().mean(0)
        a = (a + eye) / 2
        a = a / a.sum(-1, keepdim=True)
        rolled = a @ rolled
    return rolled


def rollout(model: Any, tokenizer: Any, prompt_ids: list[int], target_ids: list[int],
            seed: int) -> torch.Tensor:
    """Attention rollout, the target-predicting rows -> [n_prompt]."""
    maps, n_target = _attention_maps(model, prompt_ids, target_ids)
    return rollout_matrix(maps)[-n_target:].mean(0)[: len(prompt_ids)].float()


def chefer(model: Any, tokenizer: Any, prompt_ids: list[int], target_ids: list[int],
           seed: int) -> torch.Tensor:
    """Chefer et al. attention x gradient relevance -> [n_prompt]."""
    ids, tgt = _sequence(prompt_ids, target_ids)
    with eager_attention(model):
        scores = _baselines.attention_x_gradient(model, ids, tgt)
    return scores[: len(prompt_ids)].float()


def random_scores(model: Any, tokenizer: Any, prompt_ids: list[int], target_ids: list[int],
                  seed: int) -> torch.Tensor:
    """Uniform noise [n_prompt] from ``seed``."""
    return torch.rand(len(prompt_ids), generator=torch.Generator().manual_seed(int(seed)))


METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "atman_paper": atman_method("paper", conceptual=False),
    "atman_paper_sink": atman_method("paper", conceptual=False, sink="keep"),
    "atman_paper_cs": atman_method("paper", conceptual=True),
    "atman_log": atman_method("log", conceptual=False),
    "atman_log_cs": atman_method("log", conceptual=True),
    "ig": ig,
    "ixg": ixg,
    "feature_ablation": feature_ablation,
    "attention": attention,
    "rollout": rollout,
    "chefer": chefer,
    "random": random_scores,
}


# ------------------------------------------------------------------ document task (sentences)
# A document method scores the sentences of a document prompt -> [n_sentences]. Arguments:
# the prompt text and its token ids (the tokenizer's, special tokens included), the target ids,
# the sentences' character ranges in the prompt and their token positions (the tokens
# overlapping each range: the same units for every method), and a seed.
def atman_sentence_method(conceptual: bool, sink: str = "explain"
                          ) -> Callable[..., torch.Tensor]:
    """AtMan with one variant per sentence (``spans=`` the sentences; paper mode, factor 0.1),
    conceptual suppression off or at kappa 0.7 (the union of the sentence's tokens');
    ``sink="keep"``: the first position is never suppressed."""

    def run(model: Any, tokenizer: Any, prompt: str, prompt_ids: list[int],
            target_ids: list[int], spans: list[tuple[int, int]], positions: list[list[int]],
            seed: int) -> torch.Tensor:
        from atman_kernels import AtManExplainer

        explainer = AtManExplainer(model, tokenizer, factor=0.1, mode="paper",
                                   conceptual_threshold=0.7 if conceptual else None,
                                   progress=False, sink=sink)
        expl = explainer.explain(prompt, list(target_ids), spans=list(spans), design="single")
        _check_units(expl, prompt_ids, [[q for q in p if sink == "explain" or q != 0]
                                        for p in positions])
        return expl.scores.float()

    return run


def atman_token_method(conceptual: bool) -> Callable[..., torch.Tensor]:
    """AtMan with one variant per *document* token (``spans=`` each token's character range, so
    the same tokens as the sentence method are explained and may be conceptually suppressed),
    paper mode, factor 0.1, conceptual off or kappa 0.7; token scores summed per sentence."""

    def run(model: Any, tokenizer: Any, prompt: str, prompt_ids: list[int],
            target_ids: list[int], spans: list[tuple[int, int]], positions: list[list[int]],
            seed: int) -> torch.Tensor:
        from atman_kernels import AtManExplainer

        offsets = tokenizer(prompt, add_special_tokens=True,
                            return_offsets_mapping=True)["offset_mapping"]
        tokens = [p for sentence in positions for p in sentence]
        token_ranges = [tuple(offsets[p]) for p in tokens]
        explainer = AtManExplainer(model, tokenizer, factor=0.1, mode="paper",
                                   conceptual_threshold=0.7 if conceptual else None,
                                   progress=False)
        expl = explainer.explain(prompt, list(target_ids), spans=token_ranges)
        _check_units(expl, prompt_ids, [[p] for p in tokens])
        per_token = torch.zeros(len(prompt_ids), dtype=torch.float64)
        per_token[torch.tensor(tokens)] = expl.scores.double()
        return sum_per_sentence(per_token, positions)

    return run


def _check_units(expl: Any, prompt_ids: list[int], expected: list[list[int]]) -> None:
    """The explainer tokenised the prompt as the evaluation did and built the expected units."""
    if list(expl.token_ids[: len(prompt_ids)]) != list(prompt_ids):
        raise RuntimeError("the explainer tokenised the prompt differently from the evaluation")
    got = [list(s.positions) for s in expl.spans]
    if got != expected:
        raise RuntimeError(f"the explainer's units {got} differ from the sentence units "
                           f"{expected}")


def sum_per_sentence(scores: torch.Tensor, positions: list[list[int]]) -> torch.Tensor:
    """Token scores [n_prompt] -> their sum over each sentence's token positions [n_sentences]."""
    return torch.stack([scores.double()[torch.tensor(p)].sum() for p in positions]).float()


def token_method_per_sentence(name: str) -> Callable[..., torch.Tensor]:
    """A token method of :data:`METHODS` (scores over the prompt tokens) summed per sentence."""

    def run(model: Any, tokenizer: Any, prompt: str, prompt_ids: list[int],
            target_ids: list[int], spans: list[tuple[int, int]], positions: list[list[int]],
            seed: int) -> torch.Tensor:
        scores = METHODS[name](model, tokenizer, prompt_ids, target_ids, seed)
        return sum_per_sentence(scores, positions)

    return run


def random_sentences(model: Any, tokenizer: Any, prompt: str, prompt_ids: list[int],
                     target_ids: list[int], spans: list[tuple[int, int]],
                     positions: list[list[int]], seed: int) -> torch.Tensor:
    """Uniform noise per sentence [n_sentences] from ``seed``."""
    return torch.rand(len(positions), generator=torch.Generator().manual_seed(int(seed)))


DOC_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "atman_sentence": atman_sentence_method(conceptual=False),
    "atman_sentence_cs": atman_sentence_method(conceptual=True),
    "atman_sentence_sink": atman_sentence_method(conceptual=False, sink="keep"),
    "atman_token_sum": atman_token_method(conceptual=False),
    "atman_token_sum_cs": atman_token_method(conceptual=True),
    "ig_sum": token_method_per_sentence("ig"),
    "ixg_sum": token_method_per_sentence("ixg"),
    "chefer_sum": token_method_per_sentence("chefer"),
    "random": random_sentences,
}


# --------------------------------------------------------- contrast task (fact against foil)
# A contrast method scores the sentences of a document prompt for "why the fact rather than the
# foil" -> [n_sentences]. Arguments as for the document methods, with the foil's ids after the
# fact's (``fact_ids``, ``foil_ids``: the two continuations, each any length).
def atman_contrast_method(contrastive: bool) -> Callable[..., torch.Tensor]:
    """AtMan with one variant per sentence (``spans=``; paper mode, factor 0.1, no conceptual
    suppression): ``contrast=`` the foil (the rise of CE(fact) minus the rise of CE(foil)), or
    the fact alone (the rise of CE(fact))."""

    def run(model: Any, tokenizer: Any, prompt: str, prompt_ids: list[int],
            fact_ids: list[int], foil_ids: list[int], spans: list[tuple[int, int]],
            positions: list[list[int]], seed: int) -> torch.Tensor:
        from atman_kernels import AtManExplainer

        explainer = AtManExplainer(model, tokenizer, factor=0.1, mode="paper",
                                   conceptual_threshold=None, progress=False)
        contrast = list(foil_ids) if contrastive else None
        expl = explainer.explain(prompt, list(fact_ids), spans=list(spans), contrast=contrast)
        _check_units(expl, prompt_ids, [list(p) for p in positions])
        return expl.scores.float()

    return run


def contrast_gradient_method(kind: str) -> Callable[..., torch.Tensor]:
    """IxG or IG (``IG_STEPS`` steps, baseline token ``ABLATION_ID``) of log p(fact) -
    log p(foil) on the prompt's embeddings, summed over the embedding dimension and then over
    each sentence's tokens."""

    def run(model: Any, tokenizer: Any, prompt: str, prompt_ids: list[int],
            fact_ids: list[int], foil_ids: list[int], spans: list[tuple[int, int]],
            positions: list[list[int]], seed: int) -> torch.Tensor:
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
        fact = torch.tensor(list(fact_ids), dtype=torch.long)
        foil = torch.tensor(list(foil_ids), dtype=torch.long)
        if kind == "ixg":
            scores = _baselines.contrastive_input_x_gradient(model, ids, fact, foil)
        else:
            scores = _baselines.contrastive_integrated_gradients(
                model, ids, fact, foil, n_steps=IG_STEPS, internal_batch_size=IG_STEPS,
                baseline_id=ABLATION_ID)
        return sum_per_sentence(scores, positions)

    return run


def fact_token_method(name: str) -> Callable[..., torch.Tensor]:
    """A token method of :data:`METHODS` on the fact alone (the foil unused), summed per
    sentence."""
    per_sentence = token_method_per_sentence(name)

    def run(model: Any, tokenizer: Any, prompt: str, prompt_ids: list[int],
            fact_ids: list[int], foil_ids: list[int], spans: list[tuple[int, int]],
            positions: list[list[int]], seed: int) -> torch.Tensor:
        return per_sentence(model, tokenizer, prompt, prompt_ids, fact_ids, spans, positions,
                            seed)

    return run


def random_contrast(model: Any, tokenizer: Any, prompt: str, prompt_ids: list[int],
                    fact_ids: list[int], foil_ids: list[int], spans: list[tuple[int, int]],
                    positions: list[list[int]], seed: int) -> torch.Tensor:
    """Uniform noise per sentence [n_sentences] from ``seed``."""
    return torch.rand(len(positions), generator=torch.Generator().manual_seed(int(seed)))


CONTRAST_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "atman_contrast": atman_contrast_method(contrastive=True),
    "atman_fact": atman_contrast_method(contrastive=False),
    "ixg_contrast": contrast_gradient_method("ixg"),
    "ig_contrast": contrast_gradient_method("ig"),
    "ixg_fact": fact_token_method("ixg"),
    "random": random_contrast,
}
