"""The faithfulness benchmark's methods that run in the project's environment.

``python benchmarks/_faith_methods.py JOB.json``: one process per (method, length); it loads
the model once, runs the method once on the job's warm-up document, then on every document of
the job not yet in the results file, appending one JSON line each (scores per source, wall and
CPU seconds, peak RSS above the RSS before the call, forwards).

Methods (every one explains the summed log-probability of the model's own answer given the
same chat prompt; scores are per source, higher = the answer rests on it more):

- ``forward``: the yardstick: one plain forward of prompt + answer (no scores);
- ``atman-single``: AtMan, one variant per sentence (the paper's exact scores);
- ``atman-auto``: the package's default call, ``explain(query, answer, context=...,
  chat=True, granularity="sentence")`` (design "auto", the default budget);
- ``atman-hierarchical-<B>``, ``atman-sampled-<B>``: the joint designs within B variants. A
  sentence inside a group the hierarchical design did not refine has no score of its own: it
  takes its group's exact joint score, so the group's sentences rank together where the group
  ranks (ties in document order, :func:`_faith_common.top_k_keep`);
- ``ig-10``: Captum LayerIntegratedGradients on the input embeddings, 10 steps, token scores
  summed per source;
- ``feature-ablation``: Captum FeatureAblation over the input ids, one group per source,
  baseline token id 0, one perturbation per forward.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _faith_common import read_job  # noqa: E402
from _faith_worker import run_documents  # noqa: E402

PROJECT_METHODS = ["forward", "atman-single", "atman-auto", "atman-hierarchical-24",
                   "atman-hierarchical-48", "atman-sampled-32", "atman-sampled-64", "ig-10",
                   "feature-ablation"]


def load(model_name: str):
    if model_name == "smollm2-135m":
        from atman_kernels.models import load_smollm2

        model, tok = load_smollm2(dtype=torch.float32)
        return model.eval(), tok
    if model_name == "tiny":
        return tiny_model()
    raise ValueError(f"model must be smollm2-135m or tiny, got {model_name!r}")


def tiny_model():
    """A 2-layer random Llama over SmolLM2's tokenizer (its chat template too): the tests'."""
    from bench_memory import random_llama
    from transformers import LlamaConfig

    from atman_kernels.models import load_smollm2

    _, tok = load_smollm2(dtype=torch.float32)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, vocab_size=len(tok),
                         max_position_embeddings=8192, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    return random_llama(config), tok


def _sequence(doc: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([doc["prompt_ids"] + doc["response_ids"][:-1]])
    return ids, torch.tensor(doc["response_ids"])


def _design_scores(expl: Any, doc: dict[str, Any]) -> list[float]:
    """Per-source scores from an AtMan explanation whose units are the doc's sources or
    groups of them. A source inside an unrefined group takes the group's exact joint score
    (the design did not look inside: its sentences rank with their group); every source must
    be in exactly one of the explanation's units."""
    prompt = [(s, float(v)) for s, v in zip(expl.spans, expl.scores, strict=True)
              if s.source == "prompt"]
    out = [math.nan] * len(doc["positions"])
    for i, pos in enumerate(doc["positions"]):
        hits = [v for s, v in prompt if set(pos) <= set(s.positions)]
        if len(hits) != 1:
            raise RuntimeError(f"source {i} of {doc['doc']} lies in {len(hits)} units of the "
                               f"explanation, expected 1")
        out[i] = hits[0]
    return out


def runner(method: str, model: Any, tok: Any):
    """method -> run(doc) -> (scores or None, forwards)."""
    if method == "forward":
        def run(doc):
            ids, tgt = _sequence(doc)
            with torch.inference_mode():
                model(ids, logits_to_keep=len(tgt))
            return None, 1
        return run
    if method.startswith("atman-"):
        from atman_kernels import AtManExplainer

        explainer = AtManExplainer(model, tok, progress=False)
        kind = method.split("-")
        design = kind[1]
        budget = int(kind[2]) if len(kind) > 2 else None

        def run(doc):
            kwargs: dict[str, Any] = {}
            if design == "single":
                kwargs = {"design": "single", "budget": max(1, doc["n_sources"])}
            elif design != "auto":
                kwargs = {"design": design, "budget": budget}
            expl = explainer.explain(doc["query"], doc["response_ids"], context=doc["context"],
                                     template=doc["template"].replace("{query}", "{question}"),
                                     chat=True,
                                     granularity="sentence", **kwargs)
            leaves = [s for s in expl.spans if s.source == "prompt"]
            if design == "single" and [list(s.positions) for s in leaves] != doc["positions"]:
                raise RuntimeError(f"AtMan's sentence units differ from the benchmark's "
                                   f"sources in {doc['doc']}")
            return _design_scores(expl, doc), int(expl.settings.get("forwards", 0))
        return run
    if method == "feature-ablation":
        from _baselines import target_log_prob_fn
        from captum.attr import FeatureAblation

        def run(doc):
            ids, tgt = _sequence(doc)
            mask = torch.full_like(ids, len(doc["positions"]))
            for i, pos in enumerate(doc["positions"]):
                mask[0, pos] = i
            _, mask = torch.unique(mask, return_inverse=True)
            fa = FeatureAblation(target_log_prob_fn(model, tgt))
            with torch.no_grad():
                attr = fa.attribute(ids, baselines=0, feature_mask=mask,
                                    perturbations_per_eval=1)
            return [float(attr[0, pos[0]]) for pos in doc["positions"]], \
                int(mask.max()) + 2
        return run
    if method == "ig-10":
        from _baselines import integrated_gradients

        def run(doc):
            ids, tgt = _sequence(doc)
            scores = integrated_gradients(model, ids, tgt, n_steps=10, internal_batch_size=1)
            return [float(scores[pos].sum()) for pos in doc["positions"]], 10
        return run
    raise ValueError(f"method must be one of {PROJECT_METHODS}, got {method!r}")


def main(job_path: str) -> None:
    job = read_job(job_path)
    torch.set_num_threads(int(job["threads"]))
    torch.manual_seed(0)
    model, tok = load(job["model"])
    if job["method"] == "ig-10":
        model.requires_grad_(False)
    import captum.attr  # noqa: F401  (imported before the baseline RSS, for every method)
    run_documents(job, runner(job["method"], model, tok))


if __name__ == "__main__":
    main(sys.argv[1])
