"""Backprop and perturbation attribution baselines for a causal LM target (benchmarks only).

Every function explains the same thing as :class:`atman_kernels.AtManExplainer` on a causal LM:
the summed log-probability of the target tokens under teacher forcing, over every position of
``ids`` = prompt + target[:-1]. Captum is a benchmark dependency; the package never imports it.

- :func:`integrated_gradients`: Captum ``LayerIntegratedGradients`` on the input embedding layer
  (baseline: every token replaced by ``baseline_id``);
- :func:`input_x_gradient`: Captum ``LayerGradientXActivation`` on the input embedding layer
  (input x gradient of the embeddings);
- :func:`feature_ablation`: Captum ``LLMAttribution(FeatureAblation)`` with ``TextTokenInput``:
  one forward per prompt token plus one unperturbed, one at a time, full logits (what a Captum
  user runs); ``forward_in_tokens=False`` (one forward per perturbation, not one per target
  token);
- :func:`attention_x_gradient`: Chefer et al. 2021 ("Generic attention-model explainability"):
  per layer A_bar = mean over heads of relu(dL/dA * A), R <- R + A_bar @ R from R = I, scores =
  the rows of the target-predicting positions summed. Needs an eager attention that returns its
  probabilities (``output_attentions=True``); the [B, H, N, N] probabilities of every layer are
  kept for backward.

- :func:`contrastive_input_x_gradient`, :func:`contrastive_integrated_gradients`: the same
  two methods (Captum ``InputXGradient`` / ``IntegratedGradients`` on the prompt's embeddings)
  for log p(fact) - log p(foil) (:func:`contrast_log_prob_fn`); scores over the prompt only.

All return a 1-D float tensor of scores over the N positions of ``ids``. Scores are summed over
the embedding dimension where the method attributes to embeddings.
"""

from __future__ import annotations

import torch


def target_log_prob_fn(model: torch.nn.Module, target_ids: torch.Tensor):
    """forward(input_ids [b, N] or inputs_embeds [b, N, H]) -> [b] summed target log-prob.

    Teacher forcing: the last ``T = len(target_ids)`` positions predict the target tokens; only
    those positions' logits are computed (``logits_to_keep``), as the AtMan explainer does.
    """
    n_target = int(target_ids.numel())

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        key = "inputs_embeds" if inputs.is_floating_point() else "input_ids"
        logits = model(**{key: inputs}, use_cache=False, logits_to_keep=n_target).logits
        logp = torch.log_softmax(logits[:, -n_target:].float(), dim=-1)
        tgt = target_ids.to(logp.device).expand(logp.shape[0], n_target)
        return logp.gather(-1, tgt[..., None]).sum(dim=(1, 2))

    return forward


def integrated_gradients(model: torch.nn.Module, ids: torch.Tensor, target_ids: torch.Tensor, *,
                         n_steps: int, internal_batch_size: int,
                         baseline_id: int = 0) -> torch.Tensor:
    """Captum LayerIntegratedGradients on the input embeddings: ids [1, N] -> scores [N]."""
    from captum.attr import LayerIntegratedGradients

    lig = LayerIntegratedGradients(target_log_prob_fn(model, target_ids),
                                   model.get_input_embeddings())
    attr = lig.attribute(ids, baselines=torch.full_like(ids, baseline_id), n_steps=n_steps,
                         internal_batch_size=internal_batch_size)
    return attr.sum(-1)[0].detach()


def input_x_gradient(model: torch.nn.Module, ids: torch.Tensor,
                     target_ids: torch.Tensor) -> torch.Tensor:
    """Captum LayerGradientXActivation on the input embeddings: ids [1, N] -> scores [N]."""
    from captum.attr import LayerGradientXActivation

    lgxa = LayerGradientXActivation(target_log_prob_fn(model, target_ids),
                                    model.get_input_embeddings())
    return lgxa.attribute(ids).sum(-1)[0].detach()


def feature_ablation(model: torch.nn.Module, tokenizer, prompt: str, target: str) -> torch.Tensor:
    """Captum LLMAttribution(FeatureAblation) over the prompt's tokens -> scores [N_prompt]."""
    from captum.attr import FeatureAblation, LLMAttribution, TextTokenInput

    llm_attr = LLMAttribution(FeatureAblation(model), tokenizer)
    result = llm_attr.attribute(TextTokenInput(prompt, tokenizer), target=target,
                                forward_in_tokens=False)
    return torch.as_tensor(result.seq_attr).detach().float()


def attention_x_gradient(model: torch.nn.Module, ids: torch.Tensor,
                         target_ids: torch.Tensor) -> torch.Tensor:
    """Chefer-style relevance from attention x gradient: ids [1, N] -> scores [N].

    The model must run an eager attention (``attn_implementation="eager"``) so that
    ``output_attentions=True`` returns the probabilities [1, H, N, N] of every layer.
    """
    n, n_target = ids.shape[1], int(target_ids.numel())
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, use_cache=False, output_attentions=True,
                logits_to_keep=n_target)
    if not out.attentions or out.attentions[0] is None:
        raise RuntimeError("the model returned no attention probabilities: load it with "
                           "attn_implementation='eager'")
    logp = torch.log_softmax(out.logits[0, -n_target:].float(), dim=-1)
    loss = logp.gather(-1, target_ids.to(logp.device)[:, None]).sum()
    grads = torch.autograd.grad(loss, out.attentions)
    relevance = torch.eye(n, dtype=torch.float32)
    with torch.no_grad():
        for attn, grad in zip(out.attentions, grads, strict=True):
            cam = (grad[0].float() * attn[0].float()).clamp(min=0).mean(0)  # [N, N]
            relevance = relevance + cam @ relevance
    return relevance[n - n_target:].sum(0)


# ------------------------------------------------------------- contrastive (fact against foil)
def contrast_log_prob_fn(model: torch.nn.Module, fact_ids: torch.Tensor,
                         foil_ids: torch.Tensor):
    """forward(prompt embeddings [b, n, H]) -> [b] log p(fact) - log p(foil), each summed over
    its tokens under teacher forcing (the continuation's embeddings but the last are appended
    to the prompt's; they are constants, not attributed). When both continuations are one
    token, one forward reads both from the last position's logits."""
    fact_ids, foil_ids = fact_ids.reshape(-1), foil_ids.reshape(-1)
    if fact_ids.numel() == 0 or foil_ids.numel() == 0:
        raise ValueError("fact_ids and foil_ids must each hold at least one token")
    embed = model.get_input_embeddings()

    def summed(prompt_embeds: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        n_target = int(tgt.numel())
        tail = embed(tgt[:-1].to(prompt_embeds.device))[None].to(prompt_embeds.dtype)
        embeds = torch.cat([prompt_embeds, tail.expand(prompt_embeds.shape[0], -1, -1)], dim=1)
        logits = model(inputs_embeds=embeds, use_cache=False, logits_to_keep=n_target).logits
        logp = torch.log_softmax(logits[:, -n_target:].float(), dim=-1)
        index = tgt.to(logp.device).expand(logp.shape[0], n_target)[..., None]
        return logp.gather(-1, index).sum(dim=(1, 2))

    def forward(prompt_embeds: torch.Tensor) -> torch.Tensor:
        if fact_ids.numel() == 1 and foil_ids.numel() == 1:
            logits = model(inputs_embeds=prompt_embeds, use_cache=False, logits_to_keep=1).logits
            logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
            return logp[:, int(fact_ids)] - logp[:, int(foil_ids)]
        return summed(prompt_embeds, fact_ids) - summed(prompt_embeds, foil_ids)

    return forward


def contrastive_input_x_gradient(model: torch.nn.Module, prompt_ids: torch.Tensor,
                                 fact_ids: torch.Tensor, foil_ids: torch.Tensor) -> torch.Tensor:
    """Captum InputXGradient of log p(fact) - log p(foil) on the prompt's embeddings:
    prompt_ids [1, n] -> scores [n] (summed over the embedding dimension)."""
    from captum.attr import InputXGradient

    embeds = model.get_input_embeddings()(prompt_ids).detach()
    attr = InputXGradient(contrast_log_prob_fn(model, fact_ids, foil_ids)).attribute(embeds)
    return attr.sum(-1)[0].detach()


def contrastive_integrated_gradients(model: torch.nn.Module, prompt_ids: torch.Tensor,
                                     fact_ids: torch.Tensor, foil_ids: torch.Tensor, *,
                                     n_steps: int, internal_batch_size: int,
                                     baseline_id: int = 0) -> torch.Tensor:
    """Captum IntegratedGradients of log p(fact) - log p(foil) on the prompt's embeddings, from
    the embeddings of ``baseline_id`` at every prompt position: prompt_ids [1, n] -> scores [n].

    The same path as :func:`integrated_gradients` (Captum's default Gauss-Legendre steps) over
    the prompt; the teacher-forced continuation tokens stay fixed instead of being interpolated
    (which changes nothing for one-token continuations)."""
    from captum.attr import IntegratedGradients

    embed = model.get_input_embeddings()
    embeds = embed(prompt_ids).detach()
    baseline = embed(torch.full_like(prompt_ids, baseline_id)).detach()
    ig = IntegratedGradients(contrast_log_prob_fn(model, fact_ids, foil_ids))
    attr = ig.attribute(embeds, baselines=baseline, n_steps=n_steps,
                        internal_batch_size=internal_batch_size)
    return attr.sum(-1)[0].detach()
