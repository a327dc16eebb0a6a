"""Seconds per AtMan explanation of SmolLM2-135M on CPU: prefix reuse vs full recompute vs
one variant per forward.

Setup: SmolLM2-135M-Instruct (fp32, converted from the bundled GGUF), CPU,
``torch.set_num_threads(2)`` (pinned: the project's machines have 2 cores), prompts of exactly
32/64/128/256 tokens cut from a fixed text, the target = the next 3 tokens of that text,
default explainer settings (paper mode, factor 0.1, conceptual threshold 0.7).

Methods:
- ``prefix_reuse``: the default explainer (cached unsuppressed prefix, batch size "auto");
- ``full_recompute``: every variant recomputes the whole sequence (batch size "auto");
- ``full_recompute_same_chunk``: full recompute with the chunk size the prefix-reuse run used
  (isolates the gain of the reuse from the effect of the batch size);
- ``one_per_forward``: full recompute with batch_size=1, the naive loop.

Before timing, every method's scores are checked against ``full_recompute`` (max difference
relative to the largest score). Each (size, method) is timed ``--repeats`` times after one
warm-up explanation; the median is reported. Results: a CSV stamped with device, versions and
date, and a PNG plot (``benchmarks/results/explain_cpu.{csv,png}``).

Conceptual suppression limits what prefix reuse can save: suppressing token j also lowers
earlier tokens similar to j (a repeated " the"), so the variant must be recomputed from the
earliest of them. On this text the ideal fraction of token-forwards kept is 0.67 (128 tokens)
with kappa = 0.7, against 0.50 with single-token suppression (``--conceptual-threshold none``).

Granularity (``--granularity-doc``, issue 10): a museum text of four paragraphs (about 300
SmolLM2 tokens) and the question "In which city did the director grow up?" with the answer
opening "The director grew up in", target " Hamburg" (SmolLM2's own greedy answer), explained at
token granularity (one variant per prompt token) and at sentence granularity (one variant per
sentence, all its tokens suppressed); paper mode, factor 0.1, conceptual suppression off,
prefix reuse on. Per granularity: median seconds of ``--repeats`` runs (after one warm-up
explanation), model forwards, token-forwards, units, the 1-minute load average before and after,
and the rank of the evidence sentence ("Weiss grew up in Hamburg, ...") among the prompt's
sentences (token scores summed per sentence at token granularity). Writes
``benchmarks/results/explain_granularity.csv``.

Floor (``--floor``, issue 15): a causal LM's explanation must run its token-forwards (the query
tokens of all its forwards, baseline included) at the throughput of a plain batched forward of
the same model. Per prompt length (``--floor-sizes``, documents of
``bench_long_docs.build_document``: filler sentences and one evidence sentence, target
" Hamburg") and granularity (token: one variant per position but the last; sentence: one per
sentence of the prompt), paper mode, factor 0.1, conceptual suppression off, prefix reuse on,
the explainer's automatic chunk size for the whole explanation:

    floor ratio = token-forwards x (seconds per token of a plain forward) / seconds of the run

where the plain forward is ``model(input_ids [chunk, N], logits_to_keep=T)`` with the model's
own attention (sdpa), no suppression, no cache, timed right before and right after every run
(the mean of the two), so both parts of the ratio see the same load; the ratio of process CPU
times is reported beside it. The run is the explainer's engine (:func:`run_variants` on a
:class:`CausalLMTask` under the "atman" attention, what ``AtManExplainer.explain`` runs after
building the units). A token-granularity explanation of N tokens needs about N^2/2
token-forwards (hours at 2048 on 2 cores), so above ``--floor-variants`` variants the run holds
only whole chunks of the full explanation's sorted variants, evenly spread over it: every timed
chunk is one the full explanation runs, with its start and length. Writes
``benchmarks/results/explain_cpu_floor.{csv,png}`` (``--out`` to change). Note that at a fixed
length an explanation's query tokens see more keys on average than a plain forward's (2N/3
against N/2 at token granularity), which costs attention time the plain forward does not
spend.

Run: ``python benchmarks/bench_explain.py`` (several minutes; ``--sizes 32,64`` for a quick
look; ``--naive-max 128`` skips the naive loop above 128 tokens; ``--threads 1`` on a machine
whose cores are busy with other work, where 2 threads oversubscribe them; ``--append`` adds
the rows of a second run, e.g. with ``--conceptual-threshold none``, to the CSV).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import statistics
from pathlib import Path

import torch
from _harness import machine
from _timing import Stopwatch, measure

TEXT = (
    "The history of Paris spans more than two thousand years. The city grew from a small "
    "settlement of the Parisii tribe on an island in the Seine into the capital of France, "
    "and over the centuries it became a centre of trade, learning, art and politics. In the "
    "Middle Ages the university drew scholars from all over Europe, and the great cathedral "
    "of Notre-Dame rose on the island where the city began. Kings built palaces along the "
    "river, and the Louvre, first a fortress, became a royal residence and later one of the "
    "largest museums in the world. During the nineteenth century the prefect Haussmann "
    "rebuilt much of the centre, cutting wide boulevards through crowded medieval streets, "
    "laying out parks and squares, and giving the city the uniform stone facades that "
    "visitors still admire today. The Eiffel Tower, built for the world fair of 1889, was "
    "meant to stand for only twenty years, yet it became the symbol of the city. In the "
    "twentieth century Paris survived two world wars, welcomed artists and writers from many "
    "countries, and grew into a metropolis of more than ten million people. Its museums, "
    "cafes, markets and theatres attract millions of visitors every year, and its river "
    "banks are listed as a world heritage site. Today the city faces new questions about "
    "housing, transport and climate, and its mayors have turned roads along the Seine into "
    "parks, added cycle lanes across the centre and planted trees in many squares, hoping "
    "to keep the old city pleasant to live in for the people who call it home."
)
DOCUMENT = (
    "The Harbour Museum of Modern Art opened in 1998 in a former grain warehouse on the river. "
    "Its collection began with a gift of two hundred paintings from a local shipping family, "
    "and today it holds more than four thousand works, from early photographs to large video "
    "installations. The building was renovated in 2015, when a glass roof was added over the "
    "central hall.\n\n"
    "The museum is led by its director, Clara Weiss. Weiss grew up in Hamburg, where her father"
    " repaired ships in the old port. She studied art history in Munich and wrote her doctoral "
    "thesis on the painters of the northern coast. Before she came to the museum, she worked "
    "for ten years as a curator in Vienna, where she organised exhibitions on photography and "
    "design.\n\n"
    "The chief curator, Jonas Berg, was born in Oslo and studied in Copenhagen. He joined the "
    "museum in 2009 and is responsible for the collection of contemporary painting. The head of"
    " education, Maria Lopez, came from Madrid; she designed the school programme, which brings"
    " more than twenty thousand children to the galleries every year.\n\n"
    "Each year the museum shows four large exhibitions and several smaller ones. In spring it "
    "usually presents young artists from the region, and in autumn it borrows works from "
    "partner museums in Amsterdam, Zurich and Prague. The museum shop and the cafe on the roof "
    "terrace are open every day except Monday, and admission is free on the first Sunday of "
    "every month."
)
QUESTION = "\n\nQuestion: In which city did the director grow up?\nAnswer: The director grew up in"
ANSWER = " Hamburg"
EVIDENCE = "Weiss grew up in Hamburg"
METHODS = ("prefix_reuse", "full_recompute", "full_recompute_same_chunk", "one_per_forward")
RESULTS = Path(__file__).resolve().parent / "results"


def _explainer(model, tokenizer, method: str, same_chunk: int = 1, kappa: float | None = 0.7):
    from atman_kernels.explain import AtManExplainer

    kw = {"progress": False, "conceptual_threshold": kappa}
    if method == "prefix_reuse":
        return AtManExplainer(model, tokenizer, prefix_reuse=True, **kw)
    if method == "full_recompute":
        return AtManExplainer(model, tokenizer, prefix_reuse=False, **kw)
    if method == "full_recompute_same_chunk":
        return AtManExplainer(model, tokenizer, prefix_reuse=False, batch_size=same_chunk, **kw)
    return AtManExplainer(model, tokenizer, prefix_reuse=False, batch_size=1, **kw)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    peak = float(b.abs().max())
    return float((a - b).abs().max()) / peak if peak > 0 else float((a - b).abs().max())


def evidence_rank(expl, sentences, evidence: int) -> int:
    """1-based rank of sentence ``evidence`` among ``sentences`` (Spans of the prompt) by the
    summed scores of ``expl``'s units inside each sentence (ties count against it)."""
    totals = []
    for sentence in sentences:
        inside = set(sentence.positions)
        totals.append(sum(float(score) for unit, score in zip(expl.spans, expl.scores,
                                                              strict=True)
                          if unit.source == "prompt" and set(unit.positions) <= inside))
    return 1 + sum(1 for i, v in enumerate(totals) if i != evidence and v >= totals[evidence])


def granularity_benchmark(args: argparse.Namespace) -> None:
    """Token vs sentence granularity on the museum document (see the module docstring)."""
    torch.set_num_threads(args.threads)
    import transformers

    from atman_kernels.explain import AtManExplainer
    from atman_kernels.models import load_smollm2

    model, tokenizer = load_smollm2(dtype=torch.float32)
    prompt = DOCUMENT + QUESTION
    target = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    n_prompt = len(tokenizer(prompt)["input_ids"])
    if n_prompt < 300:
        raise SystemExit(f"the document prompt has {n_prompt} tokens, the benchmark needs >= 300")
    with torch.no_grad():
        ids = torch.tensor([tokenizer(prompt)["input_ids"] + target[:-1]])
        predicted = model(input_ids=ids).logits[0, -len(target):].argmax(-1).tolist()
    if predicted != target:
        raise SystemExit(f"SmolLM2 does not answer {ANSWER!r} here (greedy: "
                         f"{tokenizer.decode(predicted)!r})")
    explainer = AtManExplainer(model, tokenizer, conceptual_threshold=None, progress=False)
    explainer.explain("Anna grew up in Hamburg. Mark grew up in Oslo.", target,
                      granularity="sentence")  # warm-up
    runs = {}
    for granularity in ("sentence", "token"):
        repeats = args.token_repeats if granularity == "token" and args.token_repeats else (
            args.repeats)
        timing = measure(lambda g=granularity: explainer.explain(prompt, target, granularity=g),
                         warmup=0, repeats=repeats)  # warmed up once above
        # loads: before the first run, then after each
        expl, times, loads = timing.result, list(timing.times), list(timing.loads)
        runs[granularity] = (expl, times, loads)
        print(f"{granularity:8s} {statistics.median(times):8.2f} s  runs "
              f"{[round(t, 2) for t in times]}  forwards {expl.settings['forwards']}  "
              f"token-forwards {expl.settings['token_forwards']}  units {len(expl.spans)}  "
              f"load {loads}", flush=True)
    sentences = runs["sentence"][0].spans
    evidence = [i for i, s in enumerate(sentences) if EVIDENCE in s.text]
    if len(evidence) != 1:
        raise SystemExit(f"expected one sentence holding {EVIDENCE!r}, found {len(evidence)}")
    stamp = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
             "machine": machine(), "threads": args.threads, "torch": torch.__version__,
             "transformers": transformers.__version__, "model": "SmolLM2-135M-Instruct fp32",
             "mode": "paper", "factor": 0.1, "conceptual_threshold": "none",
             "prefix_reuse": True, "prompt_tokens": n_prompt, "target": ANSWER,
             "n_sentences": len(sentences)}
    token_seconds = statistics.median(runs["token"][1])
    rows = []
    for granularity in ("token", "sentence"):
        expl, times, loads = runs[granularity]
        seconds = statistics.median(times)
        rows.append({**stamp, "granularity": granularity, "units": len(expl.spans),
                     "seconds": round(seconds, 3), "runs": len(times),
                     "seconds_runs": " ".join(f"{t:.2f}" for t in times),
                     "speedup_vs_token": round(token_seconds / seconds, 2),
                     "forwards": expl.settings["forwards"],
                     "token_forwards": expl.settings["token_forwards"],
                     "batch_size": expl.settings["batch_size"],
                     "evidence_rank": evidence_rank(expl, sentences, evidence[0]),
                     "load_avg_1m_before": round(loads[0], 2),
                     "load_avg_1m_after": round(loads[-1], 2)})
        print(f"{granularity}: evidence sentence rank {rows[-1]['evidence_rank']} of "
              f"{len(sentences)}; speed-up vs token {rows[-1]['speedup_vs_token']}x")
    out = args.out if args.out != RESULTS / "explain_cpu.csv" else (
        RESULTS / "explain_granularity.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


def _floor_units(tokenizer, doc: dict, granularity: str) -> tuple[list[int], list[int],
                                                                   list[list[int]]]:
    """(prompt ids, target ids, the positions of each unit) as the explainer builds them."""
    from bench_long_docs import sentence_units

    prompt_ids, sentences, target_ids = sentence_units(tokenizer, doc)
    if granularity == "sentence":
        return prompt_ids, target_ids, [list(s.positions) for s in sentences]
    special = set(tokenizer.all_special_ids)
    ids = prompt_ids + target_ids[:-1]
    return prompt_ids, target_ids, [[i] for i in range(len(ids) - 1) if ids[i] not in special]


def _timed_chunks(starts: list[int], chunk: int, limit: int) -> list[int]:
    """Variant indices of whole chunks (in the engine's order: sorted by start, stable) evenly
    spread over the explanation, about ``limit`` variants (all of them when ``limit`` is 0
    or not below their number)."""
    order = sorted(range(len(starts)), key=lambda i: starts[i])
    chunks = [order[i:i + chunk] for i in range(0, len(order), chunk)]
    if limit <= 0 or len(order) <= limit:
        return order
    take = max(1, min(len(chunks), round(limit / chunk)))
    if take == 1:
        picked = [len(chunks) // 2]
    else:
        picked = sorted({round(i * (len(chunks) - 1) / (take - 1)) for i in range(take)})
    return [v for c in picked for v in chunks[c]]


def _plain_per_token(model, batch: torch.Tensor, n_logits: int) -> tuple[float, float]:
    """(wall, CPU) seconds per token of one plain forward of ``batch`` [B, N]."""
    with Stopwatch() as sw:
        model(input_ids=batch, use_cache=False, logits_to_keep=n_logits)
    return sw.seconds / batch.numel(), sw.cpu_seconds / batch.numel()


def floor_benchmark(args: argparse.Namespace) -> None:
    """The floor ratio per length and granularity (see the module docstring)."""
    torch.set_num_threads(args.threads)
    import transformers
    from bench_long_docs import build_document

    from atman_kernels.explain.batching import ChunkPolicy
    from atman_kernels.explain.conceptual import unit_factors
    from atman_kernels.explain.engine import run_variants
    from atman_kernels.explain.tasks import CausalLMTask
    from atman_kernels.hf import atman_attention
    from atman_kernels.models import load_smollm2

    model, tokenizer = load_smollm2(dtype=torch.float32)
    model.eval()
    sizes = [int(s) for s in args.floor_sizes.split(",")]
    granularities = args.granularities.split(",")
    bad = [g for g in granularities if g not in ("token", "sentence")]
    if bad:
        raise SystemExit(f"--granularities takes token and/or sentence, got {bad}")
    stamp = {"machine": machine(), "threads": args.threads, "torch": torch.__version__,
             "transformers": transformers.__version__, "model": "SmolLM2-135M-Instruct fp32",
             "mode": "paper", "factor": 0.1, "conceptual_threshold": "none",
             "plain_forward": f"{model.config._attn_implementation}, no cache"}
    old, rows = [], []
    if args.append and args.out.exists():  # the rows of earlier runs, read once
        with open(args.out, newline="") as fh:
            old = list(csv.DictReader(fh))
    for n_tokens in sizes:
        doc = build_document(tokenizer, n_tokens)
        for granularity in granularities:
            prompt_ids, target_ids, units = _floor_units(tokenizer, doc, granularity)
            ids = torch.tensor(prompt_ids + target_ids[:-1])
            n, t = int(ids.numel()), len(target_ids)
            policy = ChunkPolicy("auto", None, torch.device("cpu"), torch.float32,
                                 model.config)
            chunk = policy.size(len(units), len_q=n, len_k=n, n_logits=t, reuse=True)
            picked = _timed_chunks([u[0] for u in units], chunk, args.floor_variants)
            factors = unit_factors(n, [units[i] for i in picked], 0.1).to(torch.float32)
            batch = ids[None].expand(chunk, -1)
            load, ratios, cpu_ratios, runs, plains = [os.getloadavg()[0]], [], [], [], []

            with torch.inference_mode():
                _plain_per_token(model, batch, t)  # warm-up at this shape
                for _ in range(args.repeats):
                    before = _plain_per_token(model, batch, t)
                    task = CausalLMTask(model, ids, len(prompt_ids), torch.tensor(target_ids),
                                        reuse=True)
                    with Stopwatch() as sw, atman_attention(model):
                        result = run_variants(task, factors, mode="paper", layers=None,
                                              chunk_size=lambda reuse, c=chunk: c)
                    wall, cpu = sw.seconds, sw.cpu_seconds
                    after = _plain_per_token(model, batch, t)
                    per_wall, per_cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
                    ratios.append(result.token_forwards * per_wall / wall)
                    cpu_ratios.append(result.token_forwards * per_cpu / cpu)
                    runs.append(wall)
                    plains.append(per_wall)
                    load.append(os.getloadavg()[0])
            row = {**stamp, "date": dt.datetime.now(dt.timezone.utc).isoformat(
                       timespec="seconds"),
                   "granularity": granularity, "prompt_tokens": len(prompt_ids),
                   "seq_len": n, "target_tokens": t, "units": len(units),
                   "variants_timed": len(picked), "chunk_size": chunk,
                   "forwards": result.forwards, "token_forwards": result.token_forwards,
                   "seconds": round(statistics.median(runs), 3),
                   "plain_ms_per_token": round(statistics.median(plains) * 1e3, 4),
                   "floor_ratio": round(statistics.median(ratios), 3),
                   "floor_ratio_runs": " ".join(f"{r:.3f}" for r in ratios),
                   "floor_ratio_cpu": round(statistics.median(cpu_ratios), 3),
                   "repeats": len(runs), "load_avg_1m_before": round(load[0], 2),
                   "load_avg_1m_after": round(load[-1], 2),
                   "load_avg_1m_max": round(max(load), 2)}
            rows.append(row)
            print(f"{n:5d} tokens {granularity:8s} ratio {row['floor_ratio']:.3f} "
                  f"(cpu {row['floor_ratio_cpu']:.3f}, runs {row['floor_ratio_runs']})  "
                  f"{row['seconds']:.1f} s  {len(picked)}/{len(units)} variants, chunk "
                  f"{chunk}, token-forwards {result.token_forwards}  load {load}", flush=True)
            _write_floor(old + rows, args.out)
    _plot_floor(rows, args.out.with_suffix(".png"))


def _write_floor(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[-1]))
        writer.writeheader()
        writer.writerows(rows)


def _plot_floor(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for granularity in ("token", "sentence"):
        pts = sorted((int(r["seq_len"]), float(r["floor_ratio"])) for r in rows
                     if r["granularity"] == granularity)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{granularity} granularity")
    ax.axhline(0.9, color="grey", linestyle="--", label="target 0.9")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens (prompt + target[:-1])")
    ax.set_ylabel("floor ratio (plain-forward time of its token-forwards / its time)")
    loads = [float(r["load_avg_1m_max"]) for r in rows]
    ax.set_title(f"AtMan explanation vs plain forward, SmolLM2-135M fp32, {rows[0]['machine']}, "
                 f"{rows[0]['threads']} threads\nload average up to {max(loads):.1f}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32,64,128,256", help="prompt lengths in tokens")
    parser.add_argument("--target-tokens", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per cell (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--naive-max", type=int, default=256,
                        help="largest prompt for the one_per_forward loop")
    parser.add_argument("--conceptual-threshold", default="0.7",
                        help="kappa for conceptual suppression, or 'none' (single tokens)")
    parser.add_argument("--append", action="store_true",
                        help="add the rows to an existing CSV instead of replacing it")
    parser.add_argument("--out", type=Path, default=RESULTS / "explain_cpu.csv",
                        help="CSV to write (with --granularity-doc the default is "
                             "explain_granularity.csv)")
    parser.add_argument("--granularity-doc", action="store_true",
                        help="token vs sentence granularity on a ~300-token document "
                             "(conceptual off); --repeats runs each (median)")
    parser.add_argument("--token-repeats", type=int, default=None,
                        help="--granularity-doc: timed runs at token granularity (default "
                             "--repeats; the token run is the long one)")
    parser.add_argument("--floor", action="store_true",
                        help="the floor ratio (explanation vs plain forward throughput) per "
                             "length and granularity; see the module docstring")
    parser.add_argument("--floor-sizes", default="128,512,1024,2048,4096",
                        help="--floor: prompt lengths in tokens")
    parser.add_argument("--granularities", default="token,sentence",
                        help="--floor: token and/or sentence")
    parser.add_argument("--floor-variants", type=int, default=64,
                        help="--floor: time about this many variants (whole chunks spread over "
                             "the explanation); 0 = all")
    args = parser.parse_args(argv)
    if args.floor_variants < 0:
        parser.error(f"--floor-variants must be >= 0, got {args.floor_variants}")
    if args.token_repeats is not None and args.token_repeats < 1:
        parser.error(f"--token-repeats must be >= 1, got {args.token_repeats}")
    if args.repeats < 1 or args.threads < 1:
        parser.error(f"--repeats and --threads must be >= 1, got {args.repeats}, "
                     f"{args.threads}")
    if args.granularity_doc:
        granularity_benchmark(args)
        return
    if args.floor:
        if args.out == RESULTS / "explain_cpu.csv":
            args.out = RESULTS / "explain_cpu_floor.csv"
        floor_benchmark(args)
        return
    kappa = None if args.conceptual_threshold.lower() == "none" else float(
        args.conceptual_threshold)

    torch.set_num_threads(args.threads)
    import transformers

    from atman_kernels.models import load_smollm2

    model, tokenizer = load_smollm2(dtype=torch.float32)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    sizes = [int(s) for s in args.sizes.split(",")]
    if max(sizes) + args.target_tokens > len(ids):
        raise SystemExit(f"the text has only {len(ids)} tokens")
    stamp = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{machine()}, {args.threads} threads",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "conceptual_threshold": "none" if kappa is None else kappa,
    }
    # warm-up (lazy initialisation, allocator)
    _explainer(model, tokenizer, "prefix_reuse").explain(ids[:16], ids[16:18])

    rows = []
    for n in sizes:
        prompt, target = ids[:n], ids[n : n + args.target_tokens]
        reference = None
        same_chunk = 1
        for method in ("full_recompute", "prefix_reuse", "full_recompute_same_chunk",
                       "one_per_forward"):
            if method == "one_per_forward" and n > args.naive_max:
                rows.append({**stamp, "prompt_tokens": n, "method": method, "seconds": "",
                             "note": f"skipped: above --naive-max {args.naive_max}"})
                continue
            ex = _explainer(model, tokenizer, method, same_chunk, kappa)
            # warmed up once above, before the first size
            timing = measure(lambda ex=ex, p=prompt, t=target: ex.explain(p, t), warmup=0,
                             repeats=args.repeats)
            expl, times = timing.result, list(timing.times)
            if reference is None:
                reference = expl.per_target
            diff = _rel_diff(expl.per_target, reference)
            if diff > 1e-4:
                raise SystemExit(f"{method} at {n} tokens differs from full recompute: "
                                 f"relative max difference {diff:.2e}")
            row = {**stamp, "prompt_tokens": n, "target_tokens": len(target), "method": method,
                   "seconds": round(statistics.median(times), 3),
                   "forwards": ex.last_stats["forwards"],
                   "token_forwards": ex.last_stats["token_forwards"],
                   "chunk_size": ex.last_stats["chunk_size"],
                   "rel_diff_vs_full": f"{diff:.2e}", "note": ""}
            rows.append(row)
            if method == "prefix_reuse":
                same_chunk = ex.last_stats["chunk_size"]
            print(f"{n:4d} tokens  {method:16s} {row['seconds']:8.2f} s  "
                  f"forwards {row['forwards']:4d}  token-forwards {row['token_forwards']:6d}  "
                  f"chunk {row['chunk_size']:3d}  rel diff {diff:.1e}", flush=True)
        full = next(r for r in rows if r["prompt_tokens"] == n and r["method"] == "full_recompute")
        same = [r for r in rows if r["prompt_tokens"] == n
                and r["method"] == "full_recompute_same_chunk" and r.get("seconds")]
        for r in rows:
            if r["prompt_tokens"] == n and r.get("seconds"):
                r["speedup_vs_full"] = round(full["seconds"] / r["seconds"], 2)
                if same:
                    r["speedup_vs_same_chunk"] = round(same[0]["seconds"] / r["seconds"], 2)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["date", "device", "torch", "transformers", "load_avg_1min",
              "conceptual_threshold", "prompt_tokens", "target_tokens", "method", "seconds",
              "speedup_vs_full", "speedup_vs_same_chunk", "forwards", "token_forwards",
              "chunk_size", "rel_diff_vs_full", "note"]
    if args.append and args.out.exists():
        with open(args.out, newline="") as fh:
            old = list(csv.DictReader(fh))
        for r in old:
            r.setdefault("conceptual_threshold", "0.7")
            if not r.get("conceptual_threshold"):
                r["conceptual_threshold"] = "0.7"
        rows = old + rows
    with open(args.out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")
    _plot(rows, args.out.with_suffix(".png"), stamp)


def _plot(rows: list[dict], path: Path, stamp: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    kappas = sorted({str(r.get("conceptual_threshold") or "0.7") for r in rows})
    for kappa in kappas:
        for method in METHODS:
            pts = sorted((int(r["prompt_tokens"]), float(r["seconds"])) for r in rows
                         if r["method"] == method and r.get("seconds")
                         and str(r.get("conceptual_threshold") or "0.7") == kappa)
            if pts:
                style = "-" if kappa != "none" else "--"
                ax.plot(*zip(*pts, strict=True), style, marker="o",
                        label=f"{method} (kappa {kappa})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("seconds per explanation")
    ax.set_title(f"AtMan, SmolLM2-135M fp32, {stamp['device']}\n"
                 f"torch {stamp['torch']}, {stamp['date'][:10]}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
