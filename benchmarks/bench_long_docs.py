"""Long documents: AtMan at sentence granularity against Captum's sentence ablation (CPU).

Issue 15, item 4. A seed-fixed document of about N model tokens (distinct sentences about
people, their cities and jobs; one evidence sentence says where a person grew up), then the
question and an answer stem that repeats the evidence's words ("Answer: <person> grew up
in"); the target is the city (one token). The evidence only matters where the model uses it,
so each length takes the first document seed from ``--seed`` on whose answer is the model's
top-1 next token (:func:`answered_seed`, in the parent process; ``doc_seed``, ``p_target``
and ``answered`` in every row; SmolLM2-135M does not answer the bare "Answer:" at these
lengths: p(target) ~ 1e-7). Per (method, N), one fresh
process (:func:`_harness.run_isolated`), ``torch.set_num_threads`` pinned (2 by default):

- ``forward``: the memory yardstick: one plain forward of prompt + target[:-1], batch 1,
  inference mode, stock attention (sdpa), default KV cache on, logits at the target only;
- ``atman``: ``AtManExplainer(model, tok, progress=False).explain(prompt, target,
  granularity="sentence")`` (exact prefix reuse on, ``batch_size="auto"``: the call a user
  makes); ``atman-b1``: the same with ``batch_size=1`` (one variant per forward, as every
  other method here runs one sequence per forward);
- ``feature-ablation``: Captum ``FeatureAblation`` over the input ids with a feature mask
  grouping each sentence's tokens (the same sentences as AtMan's units, from
  :func:`atman_kernels.explain.prompt_spans`), baseline token id 0, one perturbation per
  forward: one full forward per sentence plus the unperturbed one;
- ``ig-10``: Captum LayerIntegratedGradients on the input embeddings, n_steps 10,
  ``internal_batch_size=1``, token scores summed per sentence.

Every method explains the summed log-probability of the target (teacher forcing, logits at the
target positions only; :func:`_baselines.target_log_prob_fn`). Figures per row: ``seconds`` =
wall time of one complete explanation; ``peak_mib`` = peak RSS above the RSS after the model
was loaded, the inputs built and the method run once on a 32-token document (``VmHWM``, as
bench_memory); ``cpu_s`` = CPU seconds of the process over the same call (all threads; on a
shared machine less swayed by other work than wall time);
``evidence_rank`` = rank of the evidence sentence among the document's sentences (the question
and ``Answer:`` units excluded) by the method's score (higher = more important; 1 = top-1);
``loadavg_1m`` before and after the row.

Usage::

    python benchmarks/bench_long_docs.py --lengths 512 1024 2048 --stop-at 23:50
    python benchmarks/bench_long_docs.py --plot     # redraw the PNG from the CSV

Rows replace the rows with the same (method, n) in the CSV. A length is not started after
``--stop-at`` (UTC, HH:MM); its rows are written as ``not run (deadline)``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _baselines import integrated_gradients, target_log_prob_fn  # noqa: E402
from _harness import machine_stamp, peak_rss, reset_peak_rss, run_isolated, write_csv  # noqa: E402
from _timing import Stopwatch  # noqa: E402
from bench_memory import random_llama  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["forward", "atman", "atman-b1", "ig-10", "feature-ablation"]
# joint designs within a budget of variants (issue "designs"): atman-<design>-<budget>
DESIGN_METHODS = ["atman-hierarchical-24", "atman-hierarchical-48", "atman-sampled-32",
                  "atman-sampled-64"]
MODELS = ["smollm2-135m", "tiny"]

PEOPLE = ["Anna", "Boris", "Clara", "David", "Elena", "Felix", "Greta", "Hugo", "Ines", "Jonas",
          "Karin", "Lukas", "Maria", "Nils", "Olga", "Paul", "Rosa", "Simon", "Tara", "Viktor"]
CITIES = ["Lisbon", "Vienna", "Oslo", "Madrid", "Prague", "Dublin", "Munich", "Boston", "Toronto",
          "Milan", "Zurich", "Seattle", "Denver", "Lyon", "Geneva", "Chicago", "Sydney"]
JOBS = ["a teacher", "a baker", "an engineer", "a nurse", "a painter", "a pilot", "a lawyer",
        "a farmer", "a chemist", "a librarian", "a carpenter", "a journalist"]
HOBBIES = ["chess", "sailing", "gardening", "the violin", "cycling", "pottery", "hiking",
           "astronomy", "photography", "cooking"]
FILLERS = [
    "{p} works as {j} in {c}.",
    "{p} spends most weekends on {h}.",
    "Last summer {p} visited {c} with two old friends.",
    "{p} has a small apartment near the old market of {c}.",
    "Every morning {p} takes the early train to {c}.",
    "{p} once wrote a short book about {h}.",
    "The neighbours of {p} say that {p} is {j} by training.",
    "In the winter {p} usually travels to {c}.",
]
EVIDENCE = "{p} grew up in {c}."
ANSWER_CITY = "Hamburg"  # never used by a filler sentence, so only the evidence names it
QUESTION = "\nQuestion: In which city did {p} grow up?\nAnswer: {p} grew up in"


# ----------------------------------------------------------------------------- documents
def document_sentences(n_sentences: int, seed: int = 0) -> tuple[list[str], int, str]:
    """(sentences, index of the evidence sentence, person asked about), seed-fixed.

    Distinct filler sentences (person, template, city, job, hobby drawn without repeats until
    the pool runs out) and one evidence sentence "<person> grew up in Hamburg." at a random
    position in the middle 80% of the document.
    """
    if isinstance(n_sentences, bool) or not isinstance(n_sentences, int) or n_sentences < 2:
        raise ValueError(f"n_sentences must be an int >= 2, got {n_sentences!r}")
    rng = random.Random(seed)
    person = rng.choice(PEOPLE)
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n_sentences - 1:
        s = rng.choice(FILLERS).format(p=rng.choice(PEOPLE), c=rng.choice(CITIES),
                                       j=rng.choice(JOBS), h=rng.choice(HOBBIES))
        if s not in seen or len(seen) > 4000:
            seen.add(s)
            out.append(s)
    lo, hi = int(0.1 * n_sentences), max(int(0.1 * n_sentences) + 1, int(0.9 * n_sentences))
    at = rng.randrange(lo, hi)
    out.insert(at, EVIDENCE.format(p=person, c=ANSWER_CITY))
    return out, at, person


def build_document(tokenizer, n_tokens: int, seed: int = 0) -> dict[str, Any]:
    """A prompt of at least ``n_tokens`` tokens (document + question), its target, the evidence.

    Returns prompt, target (" Hamburg"), the evidence sentence's character range in the prompt,
    and the token count of the prompt.
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 16:
        raise ValueError(f"n_tokens must be an int >= 16, got {n_tokens!r}")
    n_sent = max(2, n_tokens // 12)
    while True:
        sentences, at, person = document_sentences(n_sent, seed)
        body = " ".join(sentences)
        prompt = body + QUESTION.format(p=person)
        n = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if n >= n_tokens:
            break
        n_sent += max(1, (n_tokens - n) // 12)
    start = body.index(sentences[at])
    return {"prompt": prompt, "target": " " + ANSWER_CITY, "n_tokens": n,
            "evidence": (start, start + len(sentences[at])), "doc_end": len(body)}


def answered_seed(model, tokenizer, n_tokens: int, seed: int = 0, tries: int = 20
                  ) -> tuple[int, float, bool]:
    """(document seed, p(target's first token), answered): the first seed in
    ``seed .. seed + tries - 1`` whose document the model answers (the target's first token
    is its top-1 next token after the prompt), else ``seed`` with answered False."""
    first = None
    for s in range(seed, seed + tries):
        doc = build_document(tokenizer, n_tokens, seed=s)
        ids, _, target = sentence_units(tokenizer, doc)
        with torch.inference_mode():
            logits = model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
        p = float(torch.softmax(logits.float(), -1)[target[0]])
        if int(logits.argmax()) == target[0]:
            return s, p, True
        if first is None:
            first = p
    return seed, float(first), False


def sentence_units(tokenizer, doc: dict[str, Any]) -> tuple[list[int], list, list[int]]:
    """(prompt ids, sentence spans as AtMan builds them, target ids)."""
    from atman_kernels.explain import prompt_spans

    enc = tokenizer(doc["prompt"], add_special_tokens=True, return_offsets_mapping=True)
    spans = prompt_spans(doc["prompt"], [tuple(o) for o in enc["offset_mapping"]],
                         granularity="sentence")
    target = tokenizer(doc["target"], add_special_tokens=False)["input_ids"]
    return list(enc["input_ids"]), spans, list(target)


def evidence_rank(scores: list[float], spans: list, doc: dict[str, Any]) -> tuple[int, int]:
    """(rank of the evidence unit among the document's units, that number of units).

    The document's units are those starting before the question; rank 1 = highest score; ties
    count against the evidence (rank = 1 + number of units scoring at least as high).
    """
    if len(scores) != len(spans):
        raise ValueError(f"scores has {len(scores)} entries for {len(spans)} spans")
    a, b = doc["evidence"]
    doc_idx = [i for i, s in enumerate(spans) if s.start is not None and s.start < doc["doc_end"]]
    hits = [i for i in doc_idx if spans[i].start <= a < spans[i].end or a <= spans[i].start < b]
    if len(hits) != 1:
        raise RuntimeError(f"the evidence sentence {a}:{b} is in {len(hits)} units, expected 1")
    ev = scores[hits[0]]
    return 1 + sum(1 for i in doc_idx if i != hits[0] and scores[i] >= ev), len(doc_idx)


# ----------------------------------------------------------------------------- one row
def load(model_name: str):
    if model_name == "smollm2-135m":
        from atman_kernels.models import load_smollm2

        model, tok = load_smollm2(dtype=torch.float32)
        return model.eval(), tok
    if model_name == "tiny":
        from transformers import LlamaConfig

        tok = tiny_tokenizer()
        config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64,
                             vocab_size=len(tok), max_position_embeddings=8192,
                             tie_word_embeddings=False)
        config._attn_implementation = "sdpa"
        return random_llama(config), tok
    raise ValueError(f"model must be one of {MODELS}, got {model_name!r}")


def tiny_tokenizer():
    """A word-level tokenizer over the generator's words (offline; tests and the tiny model)."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = " ".join(PEOPLE + CITIES + JOBS + HOBBIES + FILLERS + [EVIDENCE, ANSWER_CITY,
                                                                    QUESTION])
    words = sorted(set(re.findall(r"\w+|[^\w\s]", text)))
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                   pad_token="[PAD]")


def per_sentence(token_scores: torch.Tensor, spans: list) -> list[float]:
    return [float(token_scores[list(s.positions)].sum()) for s in spans]


def make_runner(method: str, model, tok, doc: dict[str, Any]):
    """A no-argument callable running one complete explanation; it returns per-unit scores
    (None for ``forward``), in the order of :func:`sentence_units`' spans."""
    prompt_ids, spans, target_ids = sentence_units(tok, doc)
    ids = torch.tensor([prompt_ids + target_ids[:-1]])
    tgt = torch.tensor(target_ids)
    if method == "forward":
        def run():
            with torch.inference_mode():
                model(ids, logits_to_keep=len(target_ids))
        return run
    if method in ("atman", "atman-b1"):
        from atman_kernels import AtManExplainer

        explainer = AtManExplainer(model, tok, progress=False,
                                   batch_size="auto" if method == "atman" else 1)

        def run():
            ex = explainer.explain(doc["prompt"], doc["target"], granularity="sentence",
                                   design="single")
            units = [s for s in ex.spans if s.source == "prompt"]
            if [s.positions for s in units] != [s.positions for s in spans]:
                raise RuntimeError("AtMan's sentence units differ from the benchmark's spans")
            return [float(x) for x in ex.scores[:len(units)]]
        run.explainer = explainer  # its last_stats go into the row
        return run
    if method in DESIGN_METHODS:
        from atman_kernels import AtManExplainer

        _, design, budget = method.split("-")
        explainer = AtManExplainer(model, tok, progress=False)

        def run():
            ex = explainer.explain(doc["prompt"], doc["target"], granularity="sentence",
                                   design=design, budget=int(budget))
            # a sentence inside a group the design did not refine has no score: it ranks
            # below every scored one (ties count against the evidence)
            score_of = {s.positions: float(v) for s, v in zip(ex.spans, ex.scores, strict=True)}
            return [score_of.get(s.positions, -math.inf) for s in spans]
        run.explainer = explainer
        return run
    if method == "feature-ablation":
        from captum.attr import FeatureAblation

        mask = torch.full_like(ids, len(spans))  # tokens in no unit: one extra group
        for i, s in enumerate(spans):
            mask[0, list(s.positions)] = i
        # renumber 0..k-1 (Captum wants contiguous group ids)
        _, mask = torch.unique(mask, return_inverse=True)
        fa = FeatureAblation(target_log_prob_fn(model, tgt))

        def run():
            with torch.no_grad():
                attr = fa.attribute(ids, baselines=0, feature_mask=mask,
                                    perturbations_per_eval=1)
            return [float(attr[0, s.positions[0]]) for s in spans]
        return run
    if method == "ig-10":
        def run():
            scores = integrated_gradients(model, ids, tgt, n_steps=10, internal_batch_size=1)
            return per_sentence(scores, spans)
        return run
    raise ValueError(f"method must be one of {METHODS + DESIGN_METHODS}, got {method!r}")


def measure_one(row: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(int(row["threads"]))
    torch.manual_seed(0)
    model, tok = load(row["model"])
    if row["method"] == "ig-10":
        model.requires_grad_(False)
    doc = build_document(tok, int(row["n"]), seed=int(row.get("doc_seed", row.get("seed", 0))))
    _, spans, _ = sentence_units(tok, doc)
    import captum.attr  # noqa: F401  (imported before the baseline RSS, for every method)
    # warm-up: the same method once on a short document (extension loads, first-call costs)
    make_runner(row["method"], model, tok, build_document(tok, 32, seed=1))()
    run = make_runner(row["method"], model, tok, doc)
    out = {**row, "n_tokens": doc["n_tokens"], "n_units": len(spans),
           "load_before": f"{os.getloadavg()[0]:.1f}"}
    base = reset_peak_rss()
    with Stopwatch() as sw:
        scores = run()
    out["seconds"] = f"{sw.seconds:.3f}"
    # CPU seconds of the process (every thread): less swayed by other work than wall time
    out["cpu_s"] = f"{sw.cpu_seconds:.3f}"
    out["peak_mib"] = f"{(peak_rss() - base) / 2**20:.0f}"
    out["load_after"] = f"{os.getloadavg()[0]:.1f}"
    stats = getattr(getattr(run, "explainer", None), "last_stats", {})
    for key in ("forwards", "token_forwards", "chunk_size", "prefix_reuse"):
        if key in stats:
            out[f"atman_{key}"] = stats[key]
    if scores is not None:
        rank, n_doc = evidence_rank(scores, spans, doc)
        out.update(evidence_rank=rank, top1=int(rank == 1), n_doc_sentences=n_doc)
    out["status"] = "ok"
    return out


# ----------------------------------------------------------------------------- sweep, plot
def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    key = lambda r: (r.get("model"), r["method"], str(r["n"]))  # noqa: E731
    fresh = {key(r) for r in new}
    return [r for r in old if key(r) not in fresh] + new


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in METHODS + DESIGN_METHODS:
        sel = sorted((r for r in ok if r["method"] == method), key=lambda r: int(r["n"]))
        if not sel:
            continue
        n = [int(r["n_tokens"]) for r in sel]
        ax_t.plot(n, [float(r["seconds"]) for r in sel], "o-", label=method)
        ax_m.plot(n, [float(r["peak_mib"]) for r in sel], "o-", label=method)
    for ax, what in ((ax_t, "seconds per explanation"), (ax_m, "peak RSS above model, MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    if ok:
        ax_t.legend()
    stamp = ok[0] if ok else {}
    fig.suptitle(f"Sentence-level explanations of long documents, {stamp.get('model', '')}, "
                 f"CPU {stamp.get('threads', '?')} threads, load "
                 f"{min((float(r['load_before']) for r in ok), default=0):.0f}-"
                 f"{max((float(r['load_after']) for r in ok), default=0):.0f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def stop_time(text: str | None) -> float | None:
    """--stop-at HH:MM (UTC, today) as an epoch time; None without a deadline."""
    if text is None:
        return None
    try:
        hh, mm = (int(x) for x in text.split(":"))
        now = _dt.datetime.now(_dt.timezone.utc)
        return now.replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()
    except ValueError:
        raise ValueError(f"--stop-at must be HH:MM (UTC), got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2-135m", choices=MODELS)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS + DESIGN_METHODS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per row")
    ap.add_argument("--stop-at", help="UTC HH:MM after which no new length is started")
    ap.add_argument("--end-by", help="UTC HH:MM by which every row must end (a row's "
                    "timeout shrinks to it; a row cut there is recorded as a timeout)")
    ap.add_argument("--csv", type=Path, default=RESULTS / "long_docs_cpu.csv")
    ap.add_argument("--plot", action="store_true", help="only redraw the PNG from the CSV")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one))), flush=True)
        return
    bad = [n for n in args.lengths if n < 16]
    if bad:
        raise SystemExit(f"--lengths must be >= 16 tokens, got {bad}")
    deadline, end_by = stop_time(args.stop_at), stop_time(args.end_by)
    png = args.csv.with_suffix(".png")
    if not args.plot:
        new: list[dict] = []
        torch.set_num_threads(args.threads)
        model, tok = load(args.model)
        for n in sorted(args.lengths):
            late = deadline is not None and time.time() >= deadline
            late = late or (end_by is not None and time.time() >= end_by - 30)
            doc_seed, p_target, answered = (args.seed, "", "") if late else answered_seed(
                model, tok, n, args.seed)
            for method in args.methods:
                row = {"model": args.model, "method": method, "n": n, "threads": args.threads,
                       "seed": args.seed, "doc_seed": doc_seed,
                       "p_target": p_target if p_target == "" else f"{p_target:.4g}",
                       "answered": answered}
                if late:
                    res = {**row, "status": "not run (deadline)"}
                else:
                    timeout = args.timeout if end_by is None else max(
                        1.0, min(args.timeout, end_by - time.time()))
                    res = run_isolated(Path(__file__), row, timeout=timeout)
                    res.update({k: v for k, v in machine_stamp().items()
                                if k not in ("threads", "loadavg_1m")})
                new.append(res)
                print(f"n={n:5d} {method:17s} {res['status'][:40]:40s} "
                      f"{res.get('seconds', ''):>8s} s {res.get('peak_mib', ''):>6s} MiB "
                      f"rank {res.get('evidence_rank', '-')} "
                      f"load {res.get('load_before', '')}/{res.get('load_after', '')}",
                      flush=True)
                write_csv(args.csv, merge_rows(read_csv(args.csv), new))
    plot(read_csv(args.csv), png)
    print(f"wrote {args.csv} and {png}")


if __name__ == "__main__":
    main()
