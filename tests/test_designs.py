"""Designs (issue "designs"): which units each variant suppresses together, and the scores.

Every factor row a design runs is checked against one full forward with that row (the brute
force of tests/_brute.py); hierarchical scores against the brute force of the joint units
they name; the sampled surrogate against planted sparse coefficients; budgets and bad
arguments refused before any forward.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from _brute import (
    _brute_causal_rows,
    _close,
    brute_causal_units,
    tiny_llama,
    trained_bpe,
    unit_scale_,
)

import atman_kernels.hf  # noqa: F401  (registers "atman")
from atman_kernels.explain import AtManExplainer, Explanation
from atman_kernels.explain.design import (
    DEFAULT_BUDGET,
    Hierarchical,
    Problem,
    Sampled,
    Single,
    choose_design,
)
from atman_kernels.explain.engine import VariantRunner
from atman_kernels.explain.estimate import fit_lasso, spearman
from atman_kernels.explain.front.base import answer_unit_options
from atman_kernels.explain.hierarchy import build_hierarchy
from atman_kernels.explain.units import Span

PARAGRAPHS = [
    ["Anna Berg runs the city museum.", "She was born in Hamburg.", "Her brother lives in Rome.",
     "The museum opened in 1990.", "It holds old maps."],
    ["Tom Berg teaches music.", "He grew up in Paris.", "He plays the violin.",
     "His school is small.", "Anna visits him often."],
]
DOC = "\n\n".join(" ".join(p) for p in PARAGRAPHS)
TARGET = " Hamburg. She"
VOCAB = 300


@pytest.fixture(scope="module")
def tok():
    return trained_bpe([DOC + TARGET] * 20, VOCAB)


@pytest.fixture(scope="module")
def model():
    return unit_scale_(tiny_llama(5, vocab=VOCAB, positions=256), seed=5)


def _explainer(model, tok, **kw):
    return AtManExplainer(model, tok, progress=False, **kw)


def _spy_rows(monkeypatch):
    """Record every factor row the engine runs and the rises it returns."""
    seen = []
    original = VariantRunner.run

    def run(self, factors):
        rise = original(self, factors)
        seen.append((factors.detach().cpu().clone(), rise.clone()))
        return rise

    monkeypatch.setattr(VariantRunner, "run", run)
    return seen


def _brute_of(model, expl, rows, mode="paper"):
    seq = list(expl.token_ids)
    return _brute_causal_rows(model, seq, expl.settings["prompt_tokens"],
                              expl.settings["target_ids"], rows, mode)  # [T, V]


# ------------------------------------------------------------------ every row = a forward
@pytest.mark.parametrize("design", [Single(), Hierarchical(max_children=4), Sampled(seed=3)])
@pytest.mark.parametrize("mode", ["paper", "log"])
def test_every_row_a_design_runs_equals_one_full_forward(model, tok, monkeypatch, design,
                                                         mode):
    seen = _spy_rows(monkeypatch)
    expl = _explainer(model, tok, mode=mode).explain(DOC, TARGET, granularity="sentence",
                                                     design=design, budget=12)
    rows = torch.cat([f for f, _ in seen])
    rises = torch.cat([r for _, r in seen])
    assert 0 < rows.shape[0] <= 12 and expl.settings["variants"] == rows.shape[0]
    assert (rows != 1).any(dim=1).all(), "every row suppresses something"
    _close(rises.T, _brute_of(model, expl, rows, mode))


# ------------------------------------------------------------------------- hierarchical
def test_hierarchy_of_two_paragraphs_is_paragraphs_then_sentences(tok):
    enc = tok(DOC, return_offsets_mapping=True)
    from atman_kernels.explain.units import prompt_spans

    units = prompt_spans(DOC, enc["offset_mapping"], granularity="sentence",
                         eligible=list(range(1, len(enc["input_ids"]))))
    assert [u.text for u in units] == [s for p in PARAGRAPHS for s in p]
    tree = build_hierarchy(units, DOC, "sentence")
    assert [tree.groups[k].level for k in tree.top] == ["paragraph", "paragraph"]
    assert [tree.groups[k].span.text for k in tree.top] == [" ".join(p) for p in PARAGRAPHS]
    assert [list(tree.groups[k].units) for k in tree.top] == [list(range(5)),
                                                              list(range(5, 10))]
    # blocks where a level holds more than max_children
    small = build_hierarchy(units, DOC, "sentence", max_children=2)
    assert len(small.top) <= 2
    for g in small.groups:
        assert len(g.children) <= 2
        if g.children:  # a group's positions are the union of its children's
            assert set(g.span.positions) == {p for c in g.children
                                             for p in small.groups[c].span.positions}


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("mode", ["paper", "log"])
def test_hierarchical_scores_are_exact_scores_of_their_joint_units(model, tok, mode, reuse):
    expl = _explainer(model, tok, mode=mode, prefix_reuse=reuse).explain(
        DOC, TARGET, granularity="sentence", design="hierarchical", budget=7)
    assert expl.levels == ["paragraph", "sentence"]
    top = expl.children(None)
    assert [expl.tree[k].level for k in top] == ["paragraph", "paragraph"]
    refined = [k for k, n in enumerate(expl.tree) if n.refined]
    assert len(refined) == 1 and expl.settings["variants"] == 7
    # best-first: the refined paragraph is the higher-scoring one
    assert refined[0] == max(top, key=lambda k: (expl.tree[k].score, -k))
    brute = brute_causal_units(model, list(expl.token_ids), expl.settings["prompt_tokens"],
                               expl.settings["target_ids"],
                               [n.span.positions for n in expl.tree], mode=mode)
    _close(torch.tensor([n.rise for n in expl.tree], dtype=torch.float64).T, brute)
    # the units are the unrefined nodes in input order: 5 sentences and 1 paragraph
    leaves = expl.leaf_nodes()
    assert [expl.spans[i] for i in range(len(leaves))] == [expl.tree[k].span for k in leaves]
    assert sorted(expl.tree[k].level for k in leaves) == ["paragraph"] + ["sentence"] * 5
    assert torch.allclose(expl.per_target.T, torch.tensor(
        [expl.tree[k].rise for k in leaves], dtype=expl.per_target.dtype))
    assert torch.allclose(expl.scores, expl.per_target.sum(dim=0))
    # every prompt token of the document in exactly one unit
    covered = sorted(p for s in expl.spans for p in s.positions)
    assert covered == list(range(1, expl.settings["prompt_tokens"]))


def test_hierarchical_with_room_for_everything_equals_single(model, tok):
    ex = _explainer(model, tok)
    single = ex.explain(DOC, TARGET, granularity="sentence", design="single")
    full = ex.explain(DOC, TARGET, granularity="sentence", design="hierarchical", budget=12)
    assert full.settings["variants"] == 12 and full.settings["unrefined_groups"] == 0
    assert full.spans == single.spans
    # fp32, the same variants batched differently: 1.4e-6 of the peak measured on an AVX-512
    # host; a wrong unit or row is off by the order of the peak
    _close(full.per_target, single.per_target, rel=1e-5)


def test_best_first_order_replays_on_blocks(model, tok):
    """Each refinement takes the best-scoring group whose children fit in what is left."""
    design = Hierarchical(max_children=3)
    expl = _explainer(model, tok).explain(DOC, TARGET, granularity="sentence", design=design,
                                          budget=9)
    units = _explainer(model, tok).explain(DOC, TARGET, granularity="sentence",
                                           design="single").spans
    tree = build_hierarchy(units, DOC, "sentence", max_children=3)
    by_span = {g.span.positions: len(g.children) for g in tree.groups}
    nodes = expl.tree
    spent = len(expl.children(None))
    # replay: refinements happen in tree order (children appended right after each choice)
    order = [k for k, n in enumerate(nodes) if n.refined]
    order.sort(key=lambda k: min(c for c, n in enumerate(nodes) if n.parent == k))
    for k in order:
        first_child = min(c for c, n in enumerate(nodes) if n.parent == k)
        known = range(first_child)  # nodes scored before this refinement
        refined_before = {j for j in order if j != k and min(
            c for c, n in enumerate(nodes) if n.parent == j) < first_child}
        candidates = [j for j in known if by_span[nodes[j].span.positions] > 0
                      and j not in refined_before
                      and by_span[nodes[j].span.positions] <= 9 - spent]
        assert k == max(candidates, key=lambda j: (nodes[j].score, -nodes[j].span.positions[0]))
        spent += by_span[nodes[k].span.positions]
    assert spent == expl.settings["variants"] <= 9


def test_hierarchical_contrastive_nodes_carry_the_foil(model, tok):
    expl = _explainer(model, tok).explain(DOC, TARGET, granularity="sentence",
                                          design="hierarchical", budget=7, contrast=" Paris.")
    for node in expl.tree:
        assert node.contrast_rise is not None
        assert math.isclose(node.score, sum(node.rise) - sum(node.contrast_rise),
                            rel_tol=1e-9, abs_tol=1e-12)
    assert torch.allclose(expl.scores, expl.per_target.sum(0) - expl.contrast_per_target.sum(0))


# ---------------------------------------------------------------------------- sampled
def test_sampled_recovers_planted_sparse_coefficients():
    """A synthetic task: the rise of a mask is a sparse linear function of its units."""
    n = 30
    planted = torch.zeros(n, dtype=torch.float64)
    planted[[2, 11, 25]] = torch.tensor([1.5, 0.8, -0.6], dtype=torch.float64)
    units = [Span(f"u{i}", None, None, (i,)) for i in range(n)]
    calls = []

    def evaluate(groups):
        calls.append(len(groups))
        return torch.stack([planted[list(g)].sum() for g in groups])[:, None]

    problem = Problem(units=units, prompt=None, granularity="token", evaluate=evaluate,
                      rank=lambda rise: rise.sum(dim=1), budget=64)
    out = Sampled(seed=1, alpha=0.001).run(problem)
    assert sum(calls) == out.settings["variants"] <= 64
    assert torch.allclose(out.rise[:, 0], planted, atol=0.05)
    assert out.estimate["method"] == "lasso" and out.estimate["lds"] > 0.95
    assert out.estimate["r2"] > 0.99


def test_lasso_and_spearman_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(40, 6, generator=gen) < 0.5).double()
    y = x @ torch.tensor([1.0, 0, 0, -2.0, 0, 0.5], dtype=torch.float64)
    fit = fit_lasso(x, y[:, None], alpha=0.0)  # no penalty: least squares
    lstsq = torch.linalg.lstsq(torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], 1),
                               y[:, None]).solution
    assert torch.allclose(fit.coef, lstsq[:6], atol=1e-6)
    a = torch.tensor([1.0, 2.0, 2.0, 5.0, 3.0])
    b = torch.tensor([10.0, 20.0, 30.0, 50.0, 40.0])
    # by hand: ranks of a with ties averaged [0, 1.5, 1.5, 4, 3], of b [0, 1, 2, 4, 3]
    ra = torch.tensor([0, 1.5, 1.5, 4, 3], dtype=torch.float64)
    rb = torch.tensor([0, 1, 2, 4, 3], dtype=torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    assert math.isclose(spearman(a, b), float((ra * rb).sum() / (ra.norm() * rb.norm())))


def test_sampled_is_seeded_and_says_its_scores_are_estimates(model, tok):
    ex = _explainer(model, tok)
    one = ex.explain(DOC, TARGET, granularity="sentence", design=Sampled(seed=4), budget=16)
    two = ex.explain(DOC, TARGET, granularity="sentence", design=Sampled(seed=4), budget=16)
    other = ex.explain(DOC, TARGET, granularity="sentence", design=Sampled(seed=5), budget=16)
    assert torch.equal(one.scores, two.scores) and torch.equal(one.per_target, two.per_target)
    assert not torch.equal(one.scores, other.scores)
    assert one.is_estimate and one.estimate["masks"] == 16 and -1 <= one.estimate["lds"] <= 1
    assert one.settings["design"] == "sampled" and not one.tree
    assert not ex.explain(DOC, TARGET, granularity="sentence", design="single").is_estimate


# ------------------------------------------------------------------- budget and refusals
def _count_forwards(model):
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    return calls, hook


@pytest.mark.parametrize("kwargs, match", [
    ({"design": "single", "budget": 5}, "budget=5 is below the 10 units"),
    ({"design": "hierarchical", "budget": 1}, "budget=1 cannot score the top level"),
    ({"design": "sampled", "budget": 1}, "needs budget >= 2"),
    ({"design": "bogus"}, "design must be one of"),
    ({"budget": 0}, "budget must be None or an int >= 1"),
    ({"budget": True}, "budget must be None or an int >= 1"),
    ({"budget": 2.5}, "budget must be None or an int >= 1"),
])
def test_bad_budgets_and_designs_are_refused_before_any_forward(model, tok, kwargs, match):
    calls, hook = _count_forwards(model)
    try:
        with pytest.raises(ValueError, match=match):
            _explainer(model, tok).explain(DOC, TARGET, granularity="sentence", **kwargs)
    finally:
        hook.remove()
    assert calls == []


@pytest.mark.parametrize("kwargs, match", [
    ({"design": "single", "budget": 5, "granularity": "sentence"},
     "budget=5 is below the 10 units"),
    ({"design": "single", "budget": 5, "granularity": "token"}, "budget=5 is below the"),
    ({"design": "hierarchical", "budget": 1, "granularity": "token"},
     "budget=1 cannot score the top level"),
    ({"design": "sampled", "budget": 1, "granularity": "token"}, "needs budget >= 2"),
])
def test_a_generated_answer_is_not_generated_where_no_answer_fits(model, tok, kwargs, match):
    calls, hook = _count_forwards(model)
    try:
        with pytest.raises(ValueError, match=match) as err:
            _explainer(model, tok).explain(DOC, None, max_new_tokens=4, **kwargs)
    finally:
        hook.remove()
    assert calls == [] and "refused before generating the answer" in str(err.value)


def test_the_check_before_generating_refuses_only_what_every_answer_fails(model, tok):
    """Token by token, the answer's tokens (but its last) are units: a budget that fits the
    prompt's units alone passes the check before generating. Then a one-token answer is
    explained, and a longer one is refused after generating, before any explaining forward."""
    ex = _explainer(model, tok)
    n_prompt_units = len(ex.explain(DOC, " Hamburg", granularity="token", design="single").spans)
    one = ex.explain(DOC, None, max_new_tokens=1, granularity="token", design="single",
                     budget=n_prompt_units)
    assert one.settings["variants"] == n_prompt_units
    with pytest.raises(ValueError, match=f"budget={n_prompt_units} is below the") as err:
        ex.explain(DOC, None, max_new_tokens=4, granularity="token", design="single",
                   budget=n_prompt_units)
    assert "before generating" not in str(err.value)
    # hierarchical: target-token units make one more top-level member, and a top level above
    # max_children is cut into blocks, so an answer's units can shrink the top level: 8
    # paragraphs are 8 top groups alone, 2 blocks with the answer's group
    text = "\n\n".join(f"P{i} one. P{i} two." for i in range(8))
    units = [Span(m.group(), m.start(), m.end(), (k,))
             for k, m in enumerate(re.finditer(r"\S+", text))]
    alone, with_answer = answer_unit_options(units, len(units), True)
    assert len(build_hierarchy(alone, text, "word").top) == 8
    assert len(build_hierarchy(with_answer, text, "word").top) == 2
    ex._precheck("hierarchical", 4, [alone, with_answer], text, "word", False)  # passes
    with pytest.raises(ValueError, match="budget=4 cannot score the top level.*8 groups"):
        ex._precheck("hierarchical", 4, [alone], text, "word", False)
    with pytest.raises(ValueError, match="budget=1 cannot score the top level.*2 groups"):
        ex._precheck("hierarchical", 1, [alone, with_answer], text, "word", False)


@pytest.mark.parametrize("kwargs", [{"keep_prob": 0}, {"keep_prob": 1.0}, {"keep_prob": 1.5},
                                    {"keep_prob": True}, {"seed": 1.5}, {"alpha": -1},
                                    {"folds": 1}])
def test_sampled_arguments_are_checked(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Sampled(**kwargs)


def test_auto_is_single_when_units_fit_the_budget_else_hierarchical(model, tok):
    ex = _explainer(model, tok)
    fits = ex.explain(DOC, TARGET, granularity="sentence")
    assert fits.settings["design"] == "single" and not fits.tree
    tight = ex.explain(DOC, TARGET, granularity="sentence", budget=7)
    assert tight.settings["design"] == "hierarchical" and tight.settings["variants"] <= 7
    text_units = [Span("a", 0, 1, (i,)) for i in range(DEFAULT_BUDGET + 1)]
    assert isinstance(choose_design("auto", text_units, None), Hierarchical)
    image_units = [Span("", None, None, (i,), source="image") for i in range(200)]
    assert isinstance(choose_design("auto", image_units, None), Single)


# ----------------------------------------------------------------------------- citations
def test_citations_sum_the_answer_tokens_rows(model, tok):
    expl = _explainer(model, tok).explain(DOC, TARGET, granularity="sentence", design="single")
    answer = expl.answer
    assert answer == TARGET
    offsets = expl.target_offsets()
    a, b = 0, answer.index(".") + 1  # " Hamburg."
    rows = [t for t, (s, e) in enumerate(offsets) if s < b and a < e]
    cite = expl.cite(a, b, k=3)
    summed = expl.per_target[rows].sum(0)
    expected = sorted(range(len(expl.spans)), key=lambda i: (-float(summed[i]), i))[:3]
    assert cite.targets == tuple(rows) and [i for i, _ in cite.units] == expected
    assert [s for _, s in cite.units] == pytest.approx([float(summed[i]) for i in expected])
    sentences = expl.citations(k=2)
    assert [c.text for c in sentences] == ["Hamburg.", "She"]
    assert sentences[0].units == expl.cite(sentences[0].start, sentences[0].end, 2).units
    with pytest.raises(ValueError, match="start < end"):
        expl.cite(3, 3)
    with pytest.raises(ValueError, match="k must be"):
        expl.cite(k=0)


def test_citations_never_cite_the_answer_itself(model, tok):
    expl = _explainer(model, tok).explain("Anna was born in", TARGET, design="single")
    assert any(s.source == "target" for s in expl.spans)
    cited = {i for c in expl.citations(k=50) for i, _ in c.units}
    assert cited and all(expl.spans[i].source == "prompt" for i in cited)


# ---------------------------------------------------------------------------------- JSON
def test_tree_and_estimate_round_trip_and_old_files_load(model, tok):
    ex = _explainer(model, tok)
    for expl in (ex.explain(DOC, TARGET, granularity="sentence", design="hierarchical",
                            budget=7),
                 ex.explain(DOC, TARGET, granularity="sentence", design="sampled", budget=8)):
        back = Explanation.from_json(expl.to_json())
        assert back.to_dict() == json.loads(expl.to_json())
        assert back.tree == expl.tree and back.estimate == json.loads(
            json.dumps(expl.estimate, allow_nan=True))
    old = ex.explain(DOC, TARGET, granularity="sentence", design="single").to_dict()
    old["format_version"] = 2
    del old["tree"], old["estimate"]
    legacy = Explanation.from_dict(json.loads(json.dumps(old)))
    assert legacy.tree == [] and legacy.estimate is None


def test_a_tree_whose_leaves_are_not_the_spans_is_refused(model, tok):
    expl = _explainer(model, tok).explain(DOC, TARGET, granularity="sentence",
                                          design="hierarchical", budget=7)
    data = expl.to_dict()
    data["tree"] = data["tree"][:2]  # the refined paragraph's children dropped
    with pytest.raises(ValueError, match="unrefined nodes"):
        Explanation.from_dict(data)


# ------------------------------------------------------------- a context given apart
QUESTION = "Where was Anna born?"


def _context_positions(tok, text, ranges, region):
    """Token positions of each character range, computed here from the tokenizer's offsets:
    a token belongs to the range holding its first non-space character (a whitespace-only
    token: its first character, else the following range), if that character lies in the
    context ``region``."""
    enc = tok(text, return_offsets_mapping=True)
    out = [[] for _ in ranges]
    for i, (s, e) in enumerate(enc["offset_mapping"]):
        if e <= s:
            continue
        piece = text[s:e]
        anchor = s + (len(piece) - len(piece.lstrip())) if piece.strip() else s
        if not region[0] <= anchor < region[1]:
            continue
        k = next((k for k, (a, b) in enumerate(ranges) if a <= anchor < b), None)
        if k is None:
            k = next(k for k, (a, _) in enumerate(ranges) if a > anchor)
        out[k].append(i)
    return [tuple(p) for p in out]


def test_context_apart_explains_only_the_context_sentences(model, tok):
    expl = _explainer(model, tok).explain(QUESTION, TARGET, context=DOC, granularity="sentence",
                                          design="single")
    prompt = f"Context: {DOC}\n\nQuery: {QUESTION}"
    assert expl.prompt == prompt
    start = len("Context: ")
    sentences, at = [], start
    for paragraph in PARAGRAPHS:
        for s in paragraph:
            a = prompt.index(s, at)
            sentences.append((a, a + len(s)))
            at = a + len(s)
    assert [(s.start, s.end) for s in expl.spans] == sentences
    positions = _context_positions(tok, prompt, sentences, (start, start + len(DOC)))
    assert [s.positions for s in expl.spans] == positions
    brute = brute_causal_units(model, list(expl.token_ids), expl.settings["prompt_tokens"],
                               expl.settings["target_ids"], positions)
    _close(expl.per_target, brute)
    assert expl.settings["template"] == "Context: {context}\n\nQuery: {question}"


def test_context_with_its_own_template_and_the_chat_template(model, tok):
    template = "{question}\nDocument:\n{context}\nAnswer:"
    expl = _explainer(model, tok).explain(QUESTION, TARGET, context=DOC, template=template,
                                          granularity="sentence", design="single")
    head = f"{QUESTION}\nDocument:\n"
    assert expl.prompt == head + DOC + "\nAnswer:"
    assert min(s.start for s in expl.spans) == len(head)
    assert max(s.end for s in expl.spans) == len(head) + len(DOC)
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    try:
        chat = _explainer(model, tok).explain(QUESTION, TARGET, context=DOC, chat=True,
                                              granularity="sentence", design="single")
    finally:
        tok.chat_template = None
    message = f"Context: {DOC}\n\nQuery: {QUESTION}"
    at = chat.prompt.index(message) + len("Context: ")
    assert [s.text for s in chat.spans] == [s for p in PARAGRAPHS for s in p]
    assert min(s.start for s in chat.spans) == at
    assert max(s.end for s in chat.spans) == at + len(DOC)


@pytest.mark.parametrize("kwargs, match", [
    ({"context": ""}, "context must be a non-empty string"),
    ({"context": DOC, "template": "no slots"}, "template must be a string holding"),
    ({"template": "{context} {question}"}, "give context= too"),
    ({"context": DOC, "spans": [(0, 3)]}, "cannot be combined"),
])
def test_bad_context_arguments_are_refused_before_any_forward(model, tok, kwargs, match):
    calls, hook = _count_forwards(model)
    try:
        with pytest.raises(ValueError, match=match):
            _explainer(model, tok).explain(QUESTION, TARGET, **kwargs)
    finally:
        hook.remove()
    assert calls == []


# ---------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def model_dir(model, tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("designs_llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cli_context_design_budget_and_citations_equal_the_library(model, tok, model_dir,
                                                                     tmp_path, capsys):
    from atman_kernels.cli import main

    doc = tmp_path / "doc.txt"
    doc.write_text(DOC, encoding="utf-8")
    out = tmp_path / "e.json"
    assert main(["explain", "--model", str(model_dir), "--question", QUESTION, "--target",
                 TARGET, "--context-file", str(doc), "--granularity", "sentence",
                 "--design", "hierarchical", "--budget", "7", "--cite", "2", "--no-color",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    cli = Explanation.from_json(out)
    lib = _explainer(model, tok).explain(QUESTION, TARGET, context=DOC, granularity="sentence",
                                         design="hierarchical", budget=7)
    assert cli.spans == lib.spans and cli.tree == lib.tree
    _close(cli.per_target, lib.per_target, rel=1e-6)
    assert "hierarchical design" in printed and "levels: paragraph > sentence" in printed
    assert "citations (top 2 units per answer sentence" in printed
    for c in lib.citations(2):
        assert repr(c.text) in printed


@pytest.mark.parametrize("flags, match", [
    (["--template", "{context} {question}"], "--template fills in a document"),
    (["--budget", "0"], "--budget"),
    (["--design", "best"], "--design"),
])
def test_cli_design_misuse_is_refused(model_dir, flags, match, capsys):
    from atman_kernels.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["explain", "--model", str(model_dir), "--prompt", QUESTION, "--target", TARGET,
              *flags])
    assert exc.value.code != 0
    assert match in capsys.readouterr().err


# ------------------------------------------------------------------------ attention sink
def test_sink_keep_leaves_the_first_position_out_of_every_unit(model, tok):
    ids = tok(DOC)["input_ids"][1:]  # no BOS: position 0 is the document's first token
    target = tok(TARGET)["input_ids"][1:]
    keep = _explainer(model, None, sink="keep").explain(ids, target, design="single")
    assert all(0 not in s.positions for s in keep.spans)
    assert [s.positions for s in keep.spans] == [(p,) for p in range(1, len(ids) + len(target)
                                                                      - 1)]
    brute = brute_causal_units(model, list(keep.token_ids), len(ids), target,
                               [s.positions for s in keep.spans])
    _close(keep.per_target, brute)
    assert keep.settings["sink"] == "keep"
    sentences = _explainer(model, tok, sink="keep").explain(
        DOC, TARGET, granularity="sentence", special_tokens=True, design="single")
    first = sentences.spans[0]
    assert first.text == PARAGRAPHS[0][0] and first.positions[0] == 1  # BOS at 0 left out
    with pytest.raises(ValueError, match="sink must be one of"):
        _explainer(model, tok, sink="drop")


def test_hierarchical_on_a_picture_is_refused_before_any_forward_and_sampled_works():
    from _brute import tiny_vit

    vit = unit_scale_(tiny_vit(1), seed=1)
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    calls, hook = _count_forwards(vit)
    try:
        with pytest.raises(ValueError, match="not built for pictures"):
            AtManExplainer(vit, progress=False).explain(pixels, 1, design="hierarchical")
    finally:
        hook.remove()
    assert calls == []
    expl = AtManExplainer(vit, progress=False).explain(pixels, 1, design="sampled", budget=12)
    assert expl.is_estimate and expl.score_map().shape == (4, 4)


def test_cli_input_lines_take_a_context_and_the_design_flags(model, tok, model_dir, tmp_path):
    from atman_kernels.cli import main
    from atman_kernels.explain.many import read_many

    lines = tmp_path / "in.jsonl"
    lines.write_text(json.dumps({"id": "a", "prompt": QUESTION, "target": TARGET,
                                 "context": DOC}) + "\n" + json.dumps(
        {"id": "b", "prompt": DOC + " Anna was born in", "target": TARGET}) + "\n",
        encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["explain", "--model", str(model_dir), "--input", str(lines), "--output",
                 str(out), "--granularity", "sentence", "--design", "hierarchical",
                 "--budget", "7", "--quiet"]) == 0
    got = dict(read_many(out))
    lib = _explainer(model, tok).explain(QUESTION, TARGET, context=DOC, granularity="sentence",
                                         design="hierarchical", budget=7)
    assert got["a"].spans == lib.spans and got["a"].tree == lib.tree
    assert got["b"].settings["design"] == "hierarchical" and got["b"].settings["variants"] <= 7
    assert got["b"].prompt.startswith(DOC)
