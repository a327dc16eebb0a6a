"""Explaining at the granularity people read (issue: words, sentences, paragraphs, spans) and
explaining the generated answer.

Units are checked against positions the test computes itself from the tokenizer's offsets, and
scores against the independent brute force of tests/_brute.py (one full forward per unit with
all its tokens suppressed), with and without prefix reuse, in both modes.
"""

from __future__ import annotations

import json

import pytest
import torch
from _brute import (
    _close,
    brute_causal_units,
    brute_classifier_units,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    trained_bpe,
)
from transformers import PreTrainedTokenizerFast

import atman_kernels.hf  # noqa: F401  (registers "atman")
from atman_kernels.cli import main
from atman_kernels.explain import AtManExplainer, Explanation

VOCAB = 300
TEXT = ("The museum opened in 1990. Its director, Dr. Anna Berg, grew up in Hamburg.\n"
        "She studied art in Paris.")
TARGET = " Hamburg."
# the sentences of TEXT, by hand (sentencex must keep "Dr." inside the second one)
SENTENCES = [(0, 26), (27, 75), (76, 101)]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer with a BOS, trained here (offline, fast)."""
    return trained_bpe([TEXT + TARGET, "The collection holds 3.5 thousand works."] * 20, VOCAB)


def _enc(tok, text):
    return tok(text, return_offsets_mapping=True, return_special_tokens_mask=True)


def _positions_in(tok, text, ranges, overlap=False):
    """Token positions per character range: tokens whose first non-space character lies in
    the range (``overlap``: tokens overlapping it), BOS never."""
    enc = _enc(tok, text)
    out = []
    for a, b in ranges:
        unit = []
        for i, ((s, e), special) in enumerate(zip(enc["offset_mapping"],
                                                  enc["special_tokens_mask"], strict=True)):
            if special or s == e:
                continue
            if overlap:
                if s < b and e > a:
                    unit.append(i)
                continue
            first = s + len(text[s:e]) - len(text[s:e].lstrip())
            if a <= first < b or (first == e and a <= s < b):
                unit.append(i)
        out.append(unit)
    return out


# ------------------------------------------------------------------------------ causal LMs
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama_gqa", "gpt2"])
@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "full"])
def test_sentence_scores_equal_brute_force(tok, make, mode, reuse):
    model = make(vocab=VOCAB)
    expl = AtManExplainer(model, tok, mode=mode, prefix_reuse=reuse, progress=False,
                          batch_size=2).explain(TEXT, TARGET, granularity="sentence")
    units = _positions_in(tok, TEXT, SENTENCES)
    assert [s.positions for s in expl.spans] == [tuple(u) for u in units]
    assert [(s.start, s.end) for s in expl.spans] == SENTENCES
    assert expl.tokens == [TEXT[a:b] for a, b in SENTENCES]
    assert expl.per_target.shape == (len(tok(TARGET, add_special_tokens=False)["input_ids"]), 3)
    prompt_ids = _enc(tok, TEXT)["input_ids"]
    target_ids = tok(TARGET, add_special_tokens=False)["input_ids"]
    expected = brute_causal_units(model, prompt_ids + target_ids[:-1], len(prompt_ids),
                                  target_ids, units, mode=mode)
    _close(expl.per_target, expected, rel=1e-5)
    assert expl.settings["granularity"] == "sentence"
    assert expl.settings["prefix_reuse"] is reuse
    # forwards = the baseline + one per chunk of 2 variants
    assert expl.settings["forwards"] == 1 + 2


def test_explicit_spans_explain_only_those_ranges(tok):
    model = tiny_llama(1, vocab=VOCAB)
    # "Its director, Dr. Anna", "Berg, g" and "ed art i" (both cut tokens)
    ranges = [(27, 49), (50, 57), (85, 93)]
    expl = AtManExplainer(model, tok, progress=False, batch_size=4).explain(
        TEXT, TARGET, spans=ranges)
    units = _positions_in(tok, TEXT, ranges, overlap=True)
    assert [s.positions for s in expl.spans] == [tuple(u) for u in units]
    assert [(s.start, s.end) for s in expl.spans] == ranges
    prompt_ids = _enc(tok, TEXT)["input_ids"]
    target_ids = tok(TARGET, add_special_tokens=False)["input_ids"]
    expected = brute_causal_units(model, prompt_ids + target_ids[:-1], len(prompt_ids),
                                  target_ids, units)
    _close(expl.per_target, expected, rel=1e-5)
    # only the spans are variants: tokens outside them are never suppressed
    assert expl.settings["units"] == 3


def test_delimiter_word_and_paragraph_units(tok):
    model = tiny_llama(2, vocab=VOCAB)
    ex = AtManExplainer(model, tok, progress=False)
    lines = ex.explain(TEXT, TARGET, delimiter="\n")
    assert lines.tokens == TEXT.split("\n")
    assert lines.settings["granularity"] == "delimiter"
    words = ex.explain(TEXT, TARGET, granularity="word")
    assert words.tokens == TEXT.split()
    paragraphs = ex.explain("First part here.\n\nSecond part.", TARGET, granularity="paragraph")
    assert paragraphs.tokens == ["First part here.", "Second part."]
    # every non-special prompt token belongs to exactly one word
    covered = sorted(p for s in words.spans for p in s.positions)
    assert covered == list(range(1, len(_enc(tok, TEXT)["input_ids"])))


def test_token_granularity_has_one_span_per_token_and_target_tokens(tok):
    model = tiny_llama(3, vocab=VOCAB)
    expl = AtManExplainer(model, tok, progress=False).explain(TEXT, TARGET, design="single")
    enc = _enc(tok, TEXT)
    n_prompt = len(enc["input_ids"])
    n_target = len(tok(TARGET, add_special_tokens=False)["input_ids"])
    prompt_units = [s for s in expl.spans if s.source == "prompt"]
    target_units = [s for s in expl.spans if s.source == "target"]
    assert [s.positions for s in prompt_units] == [(i,) for i in range(1, n_prompt)]  # no BOS
    assert [s.positions for s in target_units] == [
        (i,) for i in range(n_prompt, n_prompt + n_target - 1)]
    assert all(TEXT[s.start:s.end] == s.text for s in prompt_units)
    with_bos = AtManExplainer(model, tok, progress=False).explain(TEXT, TARGET,
                                                                  special_tokens=True,
                                                                  design="single")
    assert with_bos.spans[0].positions == (0,) and len(with_bos.spans) == len(expl.spans) + 1


def test_json_round_trips_spans_and_prompt(tok):
    expl = AtManExplainer(tiny_llama(vocab=VOCAB), tok, progress=False).explain(
        TEXT, TARGET, granularity="sentence")
    back = Explanation.from_json(expl.to_json())
    assert back.spans == expl.spans and back.prompt == TEXT
    assert torch.equal(back.per_target, expl.per_target)
    old = expl.to_dict()
    del old["spans"], old["prompt"]  # a file written before spans existed
    legacy = Explanation.from_dict(json.loads(json.dumps(old)))
    assert [s.positions[0] for s in legacy.spans] == expl.positions


def test_sentence_granularity_needs_few_forwards(tok):
    model = tiny_llama(4, vocab=VOCAB)
    ex = AtManExplainer(model, tok, progress=False, batch_size=1)
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        sent = ex.explain(TEXT, TARGET, granularity="sentence")
        n_sent = len(calls)
        calls.clear()
        tokens = ex.explain(TEXT, TARGET, design="single")
    finally:
        hook.remove()
    assert sent.settings["forwards"] == n_sent == 1 + 3
    assert tokens.settings["forwards"] == len(calls) == 1 + len(tokens.spans)


# ------------------------------------------------------------------------------ classifier
def test_classifier_sentence_units_equal_brute_force(tok):
    model = tiny_bert(vocab=VOCAB)
    expl = AtManExplainer(model, tok, progress=False, batch_size=2).explain(
        TEXT, "pos", granularity="sentence")
    units = _positions_in(tok, TEXT, SENTENCES)
    assert [s.positions for s in expl.spans] == [tuple(u) for u in units]
    ids = torch.tensor([_enc(tok, TEXT)["input_ids"]])
    expected = brute_classifier_units(model, {"input_ids": ids}, ids.shape[1], units, 2)
    _close(expl.per_target, expected, rel=1e-5)


# ------------------------------------------------------------------------- generated target
def test_target_none_explains_the_greedy_continuation(tok):
    model = tiny_llama(5, vocab=VOCAB)
    model.generation_config.eos_token_id = None  # random weights: run the full length
    model.generation_config.pad_token_id = 1
    ex = AtManExplainer(model, tok, progress=False, batch_size=3)
    expl = ex.explain(TEXT, None, granularity="sentence", max_new_tokens=4)
    ids = torch.tensor([_enc(tok, TEXT)["input_ids"]])
    greedy = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                            max_new_tokens=4, do_sample=False, pad_token_id=1)[0, ids.shape[1]:]
    assert expl.settings["generated"] is True
    assert expl.settings["target_ids"] == greedy.tolist()
    assert expl.target == tok.decode(greedy)
    given = ex.explain(TEXT, greedy.tolist(), granularity="sentence")
    assert torch.equal(given.per_target, expl.per_target)


def test_generation_stops_at_eos_and_drops_it(tok):
    model = tiny_llama(6, vocab=VOCAB)
    ids = torch.tensor([_enc(tok, TEXT)["input_ids"]])
    free = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                          do_sample=False, pad_token_id=1)[0, ids.shape[1]:].tolist()
    model.generation_config.eos_token_id = free[2]  # the third generated token ends it
    model.generation_config.pad_token_id = 1
    expl = AtManExplainer(model, tok, progress=False).explain(TEXT, None, max_new_tokens=5)
    assert expl.settings["target_ids"] == free[: free.index(free[2])]


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, match", [
    ({"granularity": "words"}, "delimiter="),
    ({"granularity": "sentence", "spans": [(0, 5)]}, "one way"),
    ({"delimiter": ""}, "delimiter must be a non-empty"),
    ({"spans": [(5, 3)]}, "span"),
    ({"spans": [(0, 10), (5, 20)]}, "overlap"),
    ({"spans": [(0, 1000)]}, "span"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_unit_arguments_fail_before_any_forward(tok, kwargs, match):
    model = tiny_llama(vocab=VOCAB)
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=match):
            AtManExplainer(model, tok, progress=False).explain(TEXT, TARGET, **kwargs)
    finally:
        hook.remove()
    assert calls == []


def test_units_need_a_text_prompt_and_classifiers_need_a_target(tok):
    model = tiny_llama(vocab=VOCAB)
    with pytest.raises(ValueError, match="text prompt"):
        AtManExplainer(model, tok, progress=False).explain([0, 5, 6, 7], [8],
                                                           granularity="sentence")
    with pytest.raises(ValueError, match="needs a causal LM"):
        AtManExplainer(tiny_bert(vocab=VOCAB), tok, progress=False).explain(TEXT, None)


def test_layers_out_of_range_are_refused():
    with pytest.raises(ValueError, match="not a layer of this model, which has 2 layers"):
        AtManExplainer(tiny_llama(), layers=[99])
    with pytest.raises(ValueError, match="not a layer"):
        AtManExplainer(tiny_llama(), layers=[-3])
    assert AtManExplainer(tiny_llama(), layers=[-1]).layers == [1]


def test_prompt_longer_than_the_model_positions_is_refused():
    with pytest.raises(ValueError, match="64 positions"):
        AtManExplainer(tiny_gpt2(), progress=False).explain([1] * 70, [2])


# ----------------------------------------------------------------------------------- numerics
def test_float64_model_scores_carry_float64_precision(tok):
    model = tiny_llama(7, vocab=VOCAB).double()
    expl = AtManExplainer(model, tok, progress=False, backend="reference").explain(
        TEXT, TARGET, granularity="sentence")
    units = _positions_in(tok, TEXT, SENTENCES)
    prompt_ids = _enc(tok, TEXT)["input_ids"]
    target_ids = tok(TARGET, add_special_tokens=False)["input_ids"]
    expected = brute_causal_units(model, prompt_ids + target_ids[:-1], len(prompt_ids),
                                  target_ids, units)
    _close(expl.per_target, expected, rel=1e-9)


# -------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_bpe_llama")
    model = tiny_llama(8, vocab=VOCAB)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 1
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cli_sentence_granularity_and_generated_target(model_dir, tmp_path, capsys):
    out = tmp_path / "e.json"
    code = main(["explain", "--model", str(model_dir), "--prompt", TEXT, "--granularity",
                 "sentence", "--max-new-tokens", "3", "--json", str(out), "--quiet"])
    assert code == 0
    expl = Explanation.from_json(out)
    assert expl.settings["generated"] is True and len(expl.settings["target_ids"]) == 3
    assert expl.tokens == [TEXT[a:b] for a, b in SENTENCES]
    code = main(["explain", "--model", str(model_dir), "--prompt", TEXT, "--target", TARGET,
                 "--spans", "0:26,76:101", "--no-color", "--top", "2"])
    printed = capsys.readouterr().out
    assert code == 0 and "2 spans units" in printed and "chars 0-26" in printed
    code = main(["explain", "--model", str(model_dir), "--prompt", TEXT, "--target", TARGET,
                 "--delimiter", "\\n", "--json", str(out), "--quiet"])
    assert code == 0 and Explanation.from_json(out).tokens == TEXT.split("\n")


@pytest.mark.parametrize("argv, message", [
    (["--spans", "0-5"], "START:END"),
    (["--max-new-tokens", "0"], "integer >= 1"),
    (["--granularity", "words"], "invalid choice"),
])
def test_cli_rejects_bad_unit_flags(model_dir, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--model", str(model_dir), "--prompt", TEXT, *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_cli_reads_the_prompt_from_a_file_or_standard_input(model_dir, tmp_path, monkeypatch):
    import io

    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "e.json"
    assert main(["explain", "--model", str(model_dir), "--prompt-file", str(doc), "--target",
                 TARGET, "--granularity", "sentence", "--json", str(out), "--quiet"]) == 0
    assert Explanation.from_json(out).prompt == TEXT
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(TEXT.encode("utf-8"))))
    assert main(["explain", "--model", str(model_dir), "--prompt", "-", "--target", TARGET,
                 "--json", str(out), "--quiet"]) == 0
    assert Explanation.from_json(out).prompt == TEXT


@pytest.mark.parametrize("make_args, message", [
    (lambda p: ["--target", "x"], "exactly one of --prompt"),
    (lambda p: ["--prompt", "a", "--prompt-file", str(p), "--target", "x"], "exactly one"),
    (lambda p: ["--prompt-file", str(p.parent / "missing.txt"), "--target", "x"],
     "cannot read --prompt-file"),
    (lambda p: ["--prompt-file", str(p), "--target", "x"], "not UTF-8"),
])
def test_cli_prompt_source_errors(model_dir, tmp_path, capsys, make_args, message):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--model", str(model_dir), *make_args(bad)])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_special_tokens_written_in_the_prompt_are_not_explained(tok):
    model = tiny_llama(9, vocab=VOCAB)
    text = "</s> " + TEXT  # a special token typed into the text (e.g. a chat marker)
    expl = AtManExplainer(model, tok, progress=False).explain(text, TARGET)
    ids = tok(text)["input_ids"]
    marked = [i for i, t in enumerate(ids) if t in tok.all_special_ids]
    assert len(marked) == 2  # BOS added by the tokenizer and the typed </s>
    assert not {p for s in expl.spans for p in s.positions} & set(marked)
