"""The faithfulness benchmark's pieces against brute forces written here (tiny random Llama over
SmolLM2's tokenizer and chat template), so that its figures mean what its docs say."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("captum", reason="captum (bench extra) runs the attribution baselines")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _faith_common as fc  # noqa: E402
import _faith_docs as fd  # noqa: E402
import _faith_methods as fm  # noqa: E402
import bench_faithfulness as bf  # noqa: E402

CONTEXT = ("Anna grew up in Hamburg. Boris works as a baker in Oslo.\n\nClara visited "
           "Lisbon last summer.  She liked it. David is a pilot.")
QUERY = "In which city did Anna grow up?"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return fm.tiny_model()


def make_doc(tok, context=CONTEXT, answer=" Anna grew up in Hamburg.", evidence=0):
    sources = fd.sentence_sources(context)
    return {"doc": "t-0", "kind": "templated", "length": 0, "context": context, "query": QUERY,
            "template": fc.TEMPLATE, "prompt_ids": fc.prompt_ids(tok, context, QUERY),
            "response_ids": tok.encode(answer, add_special_tokens=False), "response": answer,
            "sources": sources, "n_sources": len(sources), "evidence": evidence,
            "positions": fd.source_positions(tok, context, QUERY, sources)}


def test_ablate_matches_contextcites_rule_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randrange(1, 7)
        seps = ["".join(rng.choice(" \n.") for _ in range(rng.randrange(0, 3))) for _ in range(n)]
        parts = [f"S{i}" + "x" * rng.randrange(0, 3) for i in range(n)]
        context, sources = "", []
        for sep, part in zip(seps, parts, strict=True):
            context += sep
            sources.append([len(context), len(context) + len(part)])
            context += part
        keep = [rng.random() < 0.5 for _ in range(n)]
        # ContextCite's partitioner: kept parts, each after its own separator but the first
        kept = [(seps[i], parts[i]) for i in range(n) if keep[i]]
        want = "".join((s if j else "") + p for j, (s, p) in enumerate(kept))
        assert fc.ablate(context, sources, keep) == want
    with pytest.raises(ValueError, match="keep has 1 entries for 2 sources"):
        fc.ablate("ab", [[0, 1], [1, 2]], [True])


def test_top_k_keep_breaks_ties_by_position_and_masks_extend():
    assert fc.top_k_keep([1.0, 3.0, 3.0, 2.0], 2) == [True, False, False, True]
    assert fc.top_k_keep([0.0, 0.0, 0.0], 1) == [False, True, True]
    a, b = fc.random_masks(9, 4, seed=3), fc.random_masks(9, 10, seed=3)
    assert b[:4] == a and fc.random_masks(9, 4, seed=4) != a
    frac = sum(map(sum, fc.random_masks(50, 40, seed=1))) / 2000
    assert 0.4 < frac < 0.6


def test_sources_are_the_explainers_sentence_units(tiny):
    from atman_kernels import AtManExplainer

    model, tok = tiny
    doc = make_doc(tok)
    texts = [CONTEXT[a:b] for a, b in doc["sources"]]
    assert texts == ["Anna grew up in Hamburg.", "Boris works as a baker in Oslo.",
                     "Clara visited Lisbon last summer.", "She liked it.", "David is a pilot."]
    expl = AtManExplainer(model, tok, progress=False).explain(
        QUERY, doc["response_ids"], context=CONTEXT, chat=True, granularity="sentence",
        design="single", budget=10)
    assert [list(s.positions) for s in expl.spans if s.source == "prompt"] == doc["positions"]
    # every token overlapping a sentence is that sentence's, and only whitespace between
    # two sentences (the paragraph break) joins the next one
    chat = fc.chat_prompt(tok, CONTEXT, QUERY)
    enc = tok(chat, add_special_tokens=False, return_offsets_mapping=True)
    base = chat.index(CONTEXT)
    for p, (s, e) in enumerate(enc["offset_mapping"]):
        owners = [i for i, pos in enumerate(doc["positions"]) if p in pos]
        hits = [i for i, (a, b) in enumerate(doc["sources"]) if s < base + b and e > base + a]
        if hits:
            assert owners == hits, p
        elif owners:
            assert not chat[s:e].strip() and s >= base + doc["sources"][owners[0] - 1][1], p


def test_log_prob_and_metrics_against_a_brute_force(tiny, tmp_path):
    model, tok = tiny
    doc = make_doc(tok)
    answer = doc["response_ids"]

    def brute(keep):  # every position's full softmax, no logits_to_keep, no cache
        kept = [CONTEXT[a:b] for (a, b), k in zip(doc["sources"], keep, strict=True) if k]
        # the separators of this context are single spaces or a paragraph break
        ctx = ""
        for i, ((a, b), k) in enumerate(zip(doc["sources"], keep, strict=True)):
            if k:
                ctx += (CONTEXT[doc["sources"][i - 1][1]:a] if ctx else "") + CONTEXT[a:b]
        assert ctx.count("Anna") == int(keep[0]) and len(kept) == sum(keep)
        ids = tok.encode(tok.apply_chat_template(
            [{"role": "user", "content": f"Context: {ctx}\n\nQuery: {QUERY}"}],
            tokenize=False, add_generation_prompt=True), add_special_tokens=False)
        x = torch.tensor([ids + answer])
        with torch.no_grad():
            logp = torch.log_softmax(model(x).logits[0].double(), -1)
        return sum(float(logp[len(ids) - 1 + t, answer[t]]) for t in range(len(answer)))

    f = bf.Outputs(model, tok, tmp_path / "eval.jsonl")
    full = [True] * doc["n_sources"]
    assert f(doc, full) == pytest.approx(brute(full), abs=1e-3)
    scores = [0.5, -1.0, 2.0, 0.1, 2.0]
    row = bf.evaluate(doc, {"scores": scores}, f, n_masks=12)
    # top-1: source 2 (ties go to the earlier); top-3: 2, 4, 0
    assert row["top1_drop"] == pytest.approx(
        brute(full) - brute([True, True, False, True, True]), abs=1e-3)
    assert row["top3_drop"] == pytest.approx(
        brute(full) - brute([False, True, False, True, False]), abs=1e-3)
    assert row["top5_drop"] == pytest.approx(brute(full) - brute([False] * 5), abs=1e-3)
    assert row["evidence_rank"] == 3  # the evidence (source 0, 0.5) is below two 2.0s
    masks = fc.random_masks(5, 12, bf.LDS_SEED + doc["length"])
    pred = [sum(s for s, k in zip(scores, m, strict=True) if k) for m in masks]
    outs = [brute(m) for m in masks]

    def ranks(v):
        return [sum(x < y for x in v) + 0.5 * (sum(x == y for x in v) - 1) + 1 for y in v]

    ra, rb = ranks(pred), ranks(outs)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((a - ma) * (b - mb) for a, b in zip(ra, rb, strict=True))
    den = (sum((a - ma) ** 2 for a in ra) * sum((b - mb) ** 2 for b in rb)) ** 0.5
    assert row["lds"] == pytest.approx(cov / den, abs=1e-9)
    # the cache is on disk: a new reader computes nothing
    g = bf.Outputs(None, None, tmp_path / "eval.jsonl")
    assert g(doc, full) == f(doc, full)


def test_evidence_rank_counts_ties_against_the_evidence():
    assert bf.evidence_rank([1.0, 3.0, 2.0], 1) == 1
    assert bf.evidence_rank([3.0, 3.0, 2.0], 1) == 2
    assert bf.evidence_rank([0.0, 0.0, 0.0], 2) == 3


def test_hierarchical_sources_take_their_groups_exact_score(tiny):
    from atman_kernels import AtManExplainer

    model, tok = tiny
    context = " ".join(f"Person {i} lives in town {i}." for i in range(20))
    doc = make_doc(tok, context=context, answer=" Person 3.", evidence=None)
    expl = AtManExplainer(model, tok, progress=False).explain(
        QUERY, doc["response_ids"], context=context, chat=True, granularity="sentence",
        design="hierarchical", budget=6)
    scores = fm._design_scores(expl, doc)
    units = [(set(s.positions), float(v)) for s, v in zip(expl.spans, expl.scores, strict=True)]
    assert len(units) < doc["n_sources"]  # some groups were left unrefined
    for pos, score in zip(doc["positions"], scores, strict=True):
        (want,) = [v for p, v in units if set(pos) <= p]
        assert score == want


@pytest.mark.parametrize("method", ["forward", "atman-single", "atman-sampled-32",
                                    "feature-ablation", "ig-10"])
def test_worker_appends_one_line_per_document_and_resumes(tiny, tmp_path, method):
    model, tok = tiny
    doc = make_doc(tok)
    doc2 = {**make_doc(tok, answer=" Hamburg."), "doc": "t-1"}
    job = {"method": method, "threads": 1, "model": "tiny", "docs": [doc, doc2],
           "warmup": doc, "results": str(tmp_path / "runs.jsonl")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    fm.main(str(tmp_path / "job.json"))
    fm.main(str(tmp_path / "job.json"))  # resumed: nothing left to do
    lines = [json.loads(x) for x in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [r["doc"] for r in lines] == ["t-0", "t-1"]
    for r in lines:
        assert r["seconds"] > 0 and r["forwards"] >= 1 and r["machine"]
        if method == "forward":
            assert r["scores"] is None
        else:
            assert len(r["scores"]) == doc["n_sources"]
    if method == "atman-single":
        # the paper's score of a sentence: the summed rise of the answer tokens' cross-entropy
        # when attention to the sentence's tokens is suppressed, one full forward each
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _brute import brute_causal_units

        answer = doc["response_ids"]
        rises = brute_causal_units(model, doc["prompt_ids"] + answer[:-1],
                                   len(doc["prompt_ids"]), answer, doc["positions"])
        assert lines[0]["scores"] == pytest.approx(rises.sum(0).tolist(), abs=1e-4)


def test_summary_and_plot(tmp_path):
    rows = []
    for m, sec in (("forward", 1.0), ("atman-auto", 5.0), ("contextcite-64", 20.0),
                   ("atman-hierarchical-24", 3.0), ("atman-hierarchical-48", 4.0)):
        for d in range(2):
            rows.append({"method": m, "length": 512, "doc": f"d{d}", "seconds": sec,
                         "cpu_s": sec, "peak_mib": 100.0 if m == "forward" else 110.0,
                         "forwards": 3, "load_before": "0.5", "load_after": "0.7",
                         "machine": "M", "top1_drop": d + 1.0, "top3_drop": 2.0,
                         "top5_drop": 3.0, "lds": 0.5, "evidence_rank": 1 if d else 3})
    s = {r["method"]: r for r in bf.summarise(rows)}
    assert s["atman-auto"]["top1_drop"] == "1.500" and s["atman-auto"]["evidence_top1"] == "0.50"
    assert s["atman-auto"]["memory_x_forward"] == "1.10" and s["forward"]["docs"] == 2
    bf.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_a_panel_averages_only_documents_every_method_ran_on_one_host():
    def row(m, doc, sec, top3, machine="M"):
        return {"method": m, "length": 512, "doc": doc, "seconds": sec, "top3_drop": top3,
                "machine": machine}
    rows = [row("atman-auto", "d0", 10, 6), row("atman-auto", "d1", 20, 4),
            row("atman-auto", "d2", 1000, 99),                  # the peer did not run d2
            row("attnlrp", "d0", 1, 5), row("attnlrp", "d1", 3, 5, machine="N"),  # other host
            row("forward", "d0", 0.5, "")]
    means, n = bf.panel_means(rows, 512)
    assert n == 1 and set(means) == {"atman-auto", "attnlrp"}
    assert means["atman-auto"]["seconds"] == 10 and means["atman-auto"]["top3_drop"] == 6
    assert means["attnlrp"]["seconds"] == 1
    assert bf.panel_means(rows, 1024) == ({}, 0)


def test_an_answer_whose_text_tokenises_otherwise_is_not_used(tiny):
    _, tok = tiny
    ids = fc.prompt_ids(tok, CONTEXT, QUERY)
    canonical = tok.encode(" Hamburg.", add_special_tokens=False)
    assert fd.round_trips(tok, ids, canonical)
    split = tok.encode(" Ham", add_special_tokens=False) + tok.encode("burg.",
                                                                     add_special_tokens=False)
    assert tok.decode(split) == " Hamburg." and split != canonical
    assert not fd.round_trips(tok, ids, split)


def test_docs_fall_back_to_prose_once_templated_pages_run_out(monkeypatch):
    """Planted generators: templated pages answer only below seed 3. The slot where they run
    out and every later one take prose, the failed seeds are recorded, and extending the file
    later tries no templated seed again; documents built before are kept as they were."""
    calls = []

    def templated(model, tok, length, seed, tries):
        calls.append((seed, tries))
        s = next((s for s in range(seed, seed + tries) if s < 3), None)
        return None if s is None else {"doc": f"templated-{s}", "kind": "templated", "seed": s}

    def prose(model, tok, length, index):
        return None if index % 2 else {"doc": f"prose-{index}", "kind": "prose", "window": index}

    monkeypatch.setattr(fd, "templated_doc", templated)
    monkeypatch.setattr(fd, "prose_doc", prose)
    docs = fd.build_docs(None, None, 64, 6, tries=5)
    assert [d["doc"] for d in docs] == ["templated-0", "prose-0", "templated-1", "prose-2",
                                        "templated-2", "prose-4"]
    more = fd.build_docs(None, None, 64, 9, have=docs, tries=5)
    assert more[:6] == docs
    assert [d["doc"] for d in more[6:]] == ["prose-6", "prose-8", "prose-10"]
    assert more[6]["templated_failed"] == [3, 7] and "templated_failed" not in more[7]
    assert calls == [(0, 5), (1, 5), (2, 5), (3, 5)]
    calls.clear()
    again = fd.build_docs(None, None, 64, 10, have=more, tries=5)
    assert calls == [] and again[9]["doc"] == "prose-12"
