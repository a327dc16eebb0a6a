"""Explained units: which token positions one AtMan variant suppresses together.

A :class:`Span` is one explained unit: its text, its character range in the prompt string (when
there is one) and the token positions of the model input it covers. :func:`prompt_spans` builds
the units of a text prompt from a fast tokenizer's character offsets, at token, word, sentence or
paragraph granularity, at a custom delimiter, or from explicit character ranges;
:func:`token_spans` builds one unit per token where there is no text to cut (token-id prompts,
target tokens).

Rules for the automatic granularities (word, sentence, paragraph, delimiter): the units are
disjoint character ranges holding every non-whitespace character of the text; each eligible token
joins the unit holding its first non-whitespace character. A token made only of whitespace (or
with an empty range) joins the unit holding its first character, else the following unit, else
(at the end of the text) the last one. Units that no eligible token joins are dropped, so the
units partition the eligible tokens. Explicit ``spans`` do not partition: a unit holds every
eligible token that overlaps its range, so a token cut by two spans is in both.

Character offsets are Python ``str`` indices (code points), as fast tokenizers return them with
``return_offsets_mapping=True``. Sentences come from ``sentencex`` (Wikimedia's rule-based
splitter: abbreviation lists per language, no model, no download), located in the text in order
so the offsets hold whatever whitespace sentencex keeps or drops.
"""

from __future__ import annotations

import bisect
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

__all__ = [
    "GRANULARITIES",
    "SOURCES",
    "Span",
    "prompt_spans",
    "split_sentences",
    "token_spans",
]

GRANULARITIES = ("token", "word", "sentence", "paragraph")
SOURCES = ("prompt", "target", "image")

_WORD = re.compile(r"\S+")
_BLANK_LINE = re.compile(r"\n\s*\n")


def _index(value: Any, what: str) -> int:
    """``value`` as an int (Python or numpy/torch integer, not bool), else a TypeError."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}") from None


@dataclass(frozen=True)
class Span:
    """One explained unit.

    Attributes:
        text: the unit's text (for prompt spans ``prompt[start:end]``).
        start, end: character range in the prompt string; both None where the unit has no text
            of its own (token-id prompts, target tokens).
        positions: token positions in the model input, strictly increasing, non-empty.
        source: ``"prompt"``, ``"target"`` or ``"image"`` (one of :data:`SOURCES`).
        image: for image units of a vision-language prompt, the index of the image.
        box: for image units, (x0, y0, x1, y1) in the original picture's pixels, when the
            picture was given (None otherwise).
    """

    text: str
    start: int | None
    end: int | None
    positions: tuple[int, ...]
    source: str = "prompt"
    image: int | None = None
    box: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"Span.text must be a str, got {type(self.text).__name__}")
        if (self.start is None) != (self.end is None):
            raise ValueError(
                f"Span.start and Span.end must both be ints or both None, "
                f"got start={self.start!r}, end={self.end!r}"
            )
        if self.start is not None:
            start = _index(self.start, "Span.start")
            end = _index(self.end, "Span.end")
            if not 0 <= start <= end:
                raise ValueError(f"Span needs 0 <= start <= end, got start={start}, end={end}")
            object.__setattr__(self, "start", start)
            object.__setattr__(self, "end", end)
        if isinstance(self.positions, (str, bytes)) or not isinstance(self.positions, Sequence):
            raise TypeError(
                f"Span.positions must be a sequence of ints, got {type(self.positions).__name__}"
            )
        positions = tuple(_index(p, "Span.positions[i]") for p in self.positions)
        if not positions:
            raise ValueError("Span.positions must not be empty")
        if positions[0] < 0 or any(b <= a for a, b in pairwise(positions)):
            raise ValueError(
                f"Span.positions must be non-negative and strictly increasing, got {positions}"
            )
        object.__setattr__(self, "positions", positions)
        if self.source not in SOURCES:
            raise ValueError(f"Span.source must be one of {SOURCES}, got {self.source!r}")
        if self.image is not None:
            object.__setattr__(self, "image", _index(self.image, "Span.image"))
        if self.box is not None:
            box = tuple(float(v) for v in self.box)
            if len(box) != 4 or not (box[0] <= box[2] and box[1] <= box[3]):
                raise ValueError(f"Span.box must be (x0, y0, x1, y1) with x0 <= x1 and "
                                 f"y0 <= y1, got {self.box!r}")
            object.__setattr__(self, "box", box)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``positions`` as a list)."""
        return {
            "text": self.text,
            "start": self.start,
            "end": self.end,
            "positions": list(self.positions),
            "source": self.source,
            **({"image": self.image} if self.image is not None else {}),
            **({"box": list(self.box)} if self.box is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Span:
        """Inverse of :meth:`to_dict` (``source`` defaults to ``"prompt"``)."""
        if not isinstance(d, dict):
            raise TypeError(f"Span.from_dict needs a dict, got {type(d).__name__}")
        missing = [k for k in ("text", "start", "end", "positions") if k not in d]
        if missing:
            raise ValueError(f"Span.from_dict: missing keys {missing} in {sorted(d)}")
        return cls(
            text=d["text"],
            start=d["start"],
            end=d["end"],
            positions=tuple(d["positions"]),
            source=d.get("source", "prompt"),
            image=d.get("image"),
            box=None if d.get("box") is None else tuple(d["box"]),
        )


def token_spans(
    token_texts: Sequence[str], positions: Sequence[int], source: str = "prompt"
) -> list[Span]:
    """One span per token, without character offsets (token-id prompts, target tokens).

    Args:
        token_texts: display text of each token.
        positions: the token's position in the model input, one per text.
        source: ``"prompt"``, ``"target"`` or ``"image"`` (one of :data:`SOURCES`).
    """
    if isinstance(token_texts, str):
        raise TypeError("token_texts must be a sequence of str (one per token), got one str")
    texts = list(token_texts)
    pos = [_index(p, f"positions[{i}]") for i, p in enumerate(positions)]
    if len(texts) != len(pos):
        raise ValueError(
            f"token_texts and positions must have the same length, got {len(texts)} and {len(pos)}"
        )
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"token_texts[{i}] must be a str, got {type(t).__name__}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    return [Span(t, None, None, (p,), source) for t, p in zip(texts, pos, strict=True)]


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    """[start, end) without its leading and trailing whitespace (empty: start == end)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _end_of(text: str, piece: str, cursor: int) -> int | None:
    """End (exclusive) of ``piece`` in ``text`` at ``cursor``, whitespace ignored on both sides.

    Matches the non-whitespace characters of ``piece`` one by one against those of ``text`` from
    ``cursor``, so whitespace that the splitter dropped, collapsed or kept does not matter.
    None when the characters differ.
    """
    i = cursor
    n = len(text)
    for ch in piece:
        if ch.isspace():
            continue
        while i < n and text[i].isspace():
            i += 1
        if i == n or text[i] != ch:
            return None
        i += 1
    return i


def split_sentences(text: str, language: str = "en") -> list[tuple[int, int]]:
    """Character ranges of the sentences of ``text`` (sentencex), trimmed of whitespace.

    Every non-whitespace character of ``text`` lies in exactly one range; ranges are sorted and
    disjoint. A line break always ends a sentence. Each sentence sentencex returns is located
    in the text after the previous one; a sentence that cannot be located (a splitter that
    rewrote characters) is merged into the next one, and the last range runs to the end of
    the text.

    Args:
        text: the text to split.
        language: ISO 639 code for sentencex's abbreviation rules (unknown codes fall back to
            its generic rules).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not isinstance(language, str) or not language:
        raise ValueError(
            f"language must be a non-empty ISO 639 code such as 'en', got {language!r}"
        )
    try:
        import sentencex
    except ImportError as err:
        raise ModuleNotFoundError(
            "sentence granularity needs the sentencex package: pip install sentencex"
        ) from err

    ends: list[int] = []
    cursor = 0
    for sentence in sentencex.segment(language, text):
        if not sentence.strip():
            continue
        end = _end_of(text, sentence, cursor)
        if end is None:  # rewritten characters: look for it further on, else merge it onward
            found = text.find(sentence.strip(), cursor)
            end = None if found < 0 else found + len(sentence.strip())
        if end is not None:
            ends.append(end)
            cursor = end
    if not ends or ends[-1] < len(text):
        ends.append(len(text))
    # a line break ends a sentence too (lists, headings, lines without a full stop), which
    # sentencex alone does not split at
    ends = sorted(set(ends) | {m.end() for m in re.finditer(r"\n", text)})
    ranges = []
    start = 0
    for end in ends:
        a, b = _trim(text, start, end)
        if a < b:
            ranges.append((a, b))
        start = end
    return ranges


def _split_paragraphs(text: str) -> list[tuple[int, int]]:
    pieces, start = [], 0
    for m in _BLANK_LINE.finditer(text):
        pieces.append((start, m.start()))
        start = m.end()
    pieces.append((start, len(text)))
    return [r for r in (_trim(text, a, b) for a, b in pieces) if r[0] < r[1]]


def _split_at(text: str, delimiter: str) -> list[tuple[int, int]]:
    pieces, start = [], 0
    while True:
        found = text.find(delimiter, start)
        if found < 0:
            break
        pieces.append((start, found + len(delimiter)))
        start = found + len(delimiter)
    pieces.append((start, len(text)))
    return [r for r in (_trim(text, a, b) for a, b in pieces) if r[0] < r[1]]


def _check_offsets(text: str, offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    if isinstance(offsets, (str, bytes)) or not hasattr(offsets, "__iter__"):
        raise TypeError(
            f"offsets must be a sequence of (start, end) character ranges, "
            f"got {type(offsets).__name__}"
        )
    checked = []
    for i, pair in enumerate(offsets):
        try:
            a, b = pair
        except (TypeError, ValueError):
            raise TypeError(f"offsets[{i}] must be a (start, end) pair, got {pair!r}") from None
        a, b = _index(a, f"offsets[{i}][0]"), _index(b, f"offsets[{i}][1]")
        if not 0 <= a <= b <= len(text):
            raise ValueError(
                f"offsets[{i}] = ({a}, {b}) is not a range of the text (length {len(text)}): "
                f"offsets must be the character offsets of this text's tokens"
            )
        checked.append((a, b))
    return checked


def _check_eligible(eligible: Sequence[int] | None, offsets: list[tuple[int, int]]) -> list[int]:
    if eligible is None:
        chosen = [i for i, (a, b) in enumerate(offsets) if b > a]
        if not chosen:
            raise ValueError(
                "offsets: no token has a non-empty character range (a slow tokenizer, or "
                "token ids without text?); span granularities need a fast tokenizer's "
                "return_offsets_mapping=True"
            )
        return chosen
    if isinstance(eligible, (str, bytes)) or not hasattr(eligible, "__iter__"):
        raise TypeError(f"eligible must be a sequence of token indices, got {type(eligible)}")
    chosen = [_index(i, f"eligible[{k}]") for k, i in enumerate(eligible)]
    bad = [i for i in chosen if not 0 <= i < len(offsets)]
    if bad:
        raise ValueError(
            f"eligible holds token indices {bad[:5]} outside 0..{len(offsets) - 1} "
            f"(len(offsets) = {len(offsets)}): indices count the tokens of offsets from 0"
        )
    if len(set(chosen)) != len(chosen):
        raise ValueError("eligible must not repeat a token index")
    if not chosen:
        raise ValueError("eligible is empty: no token may be explained")
    return sorted(chosen)


def _check_spans(spans: Sequence[tuple[int, int]], n_chars: int) -> list[tuple[int, int]]:
    if isinstance(spans, (str, bytes)) or not hasattr(spans, "__iter__"):
        raise TypeError(f"spans must be a sequence of (start, end) character ranges, got {spans!r}")
    checked = []
    for k, pair in enumerate(spans):
        try:
            a, b = pair
        except (TypeError, ValueError):
            raise TypeError(f"spans[{k}] must be a (start, end) pair, got {pair!r}") from None
        a, b = _index(a, f"spans[{k}][0]"), _index(b, f"spans[{k}][1]")
        if b <= a:
            raise ValueError(f"spans[{k}] = ({a}, {b}) is empty: end must be greater than start")
        if a < 0 or b > n_chars:
            raise ValueError(
                f"spans[{k}] = ({a}, {b}) is out of range: the prompt has {n_chars} characters "
                f"(0 <= start < end <= {n_chars})"
            )
        checked.append((a, b))
    if not checked:
        raise ValueError("spans is empty: give at least one (start, end) character range")
    ordered = sorted(checked)
    for (a0, b0), (a1, b1) in pairwise(ordered):
        if a1 < b0:
            raise ValueError(f"spans ({a0}, {b0}) and ({a1}, {b1}) overlap; spans must be disjoint")
    return ordered


def _anchor(text: str, a: int, b: int) -> int:
    """The character that decides a token's unit: its first non-whitespace one, else its start."""
    for i in range(a, b):
        if not text[i].isspace():
            return i
    return a


def prompt_spans(
    text: str,
    offsets: Sequence[tuple[int, int]],
    *,
    granularity: str = "token",
    delimiter: str | None = None,
    spans: Sequence[tuple[int, int]] | None = None,
    eligible: Sequence[int] | None = None,
    position_offset: int = 0,
    language: str = "en",
    region: tuple[int, int] | None = None,
) -> list[Span]:
    """The explained units of a text prompt, sorted by position.

    Args:
        text: the prompt string the offsets index.
        offsets: (start, end) character range of each prompt token in ``text`` (a fast
            tokenizer's ``offset_mapping``; special tokens have empty ranges).
        granularity: ``"token"``, ``"word"`` (maximal runs of non-whitespace), ``"sentence"``
            (:func:`split_sentences`) or ``"paragraph"`` (split at blank lines); ``"delimiter"``
            only together with ``delimiter``.
        delimiter: split the text after each occurrence of this non-empty string (the
            delimiter ends the piece before it); pieces are trimmed, empty ones dropped.
        spans: explicit (start, end) character ranges, one unit each (sorted by start), holding
            every eligible token that overlaps it; only with granularity ``"token"``.
        eligible: indices into ``offsets`` of the tokens that may be in a unit (default: every
            token with a non-empty range); the others (BOS, chat markers) are in none.
        position_offset: model-input position of token 0 of ``offsets``.
        language: sentencex language code for ``"sentence"``.
        region: a (start, end) character range of ``text``: only ``text[start:end]`` is cut
            into units (a context given apart from the question), and only tokens whose first
            non-whitespace character lies in it are in a unit.

    Raises:
        TypeError / ValueError: bad arguments, before any work (the message names the argument).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be the prompt str, got {type(text).__name__}")
    if not text:
        raise ValueError("text is empty: span granularities need the prompt's text")
    if not isinstance(granularity, str):
        raise TypeError(f"granularity must be a str, got {type(granularity).__name__}")
    if delimiter is not None:
        if not isinstance(delimiter, str):
            raise TypeError(f"delimiter must be a str, got {type(delimiter).__name__}")
        if not delimiter:
            raise ValueError("delimiter must be a non-empty string, got ''")
        if granularity not in ("token", "delimiter"):
            raise ValueError(
                f"delimiter={delimiter!r} cannot be combined with granularity={granularity!r}; "
                f"leave granularity at its default (or 'delimiter')"
            )
        granularity = "delimiter"
    elif granularity == "delimiter":
        raise ValueError("granularity='delimiter' needs delimiter=<non-empty string>")
    elif granularity not in GRANULARITIES:
        raise ValueError(
            f"granularity must be one of {GRANULARITIES}, got {granularity!r}; "
            f"to split at a custom string pass delimiter=..."
        )
    if spans is not None and granularity != "token":
        what = (
            f"delimiter={delimiter!r}" if delimiter is not None else f"granularity={granularity!r}"
        )
        raise ValueError(f"spans cannot be combined with {what}: explicit spans are the units")
    position_offset = _index(position_offset, "position_offset")
    if position_offset < 0:
        raise ValueError(f"position_offset must be >= 0, got {position_offset}")
    if not isinstance(language, str) or not language:
        raise ValueError(
            f"language must be a non-empty ISO 639 code such as 'en', got {language!r}"
        )
    ranges = _check_offsets(text, offsets)
    tokens = _check_eligible(eligible, ranges)
    if region is not None:
        ra, rb = _check_spans([region], len(text))[0] if not isinstance(region, (str, bytes)) \
            and len(region) == 2 else (None, None)
        if ra is None:
            raise TypeError(f"region must be a (start, end) character range, got {region!r}")
        if spans is not None:
            raise ValueError("region and spans cannot be combined: spans are the units")
        tokens = [i for i in tokens if ra <= _anchor(text, *ranges[i]) < rb]
        if not tokens:
            raise ValueError(f"region ({ra}, {rb}) holds no eligible token")
        if granularity != "token":
            inner = _cut(text[ra:rb], granularity, delimiter, language)
            return _assign(text, ranges, tokens, [(a + ra, b + ra) for a, b in inner],
                           position_offset)
    if spans is not None:
        return _explicit_units(
            text, ranges, tokens, _check_spans(spans, len(text)), position_offset
        )

    if granularity == "token":
        return [
            Span(text[ranges[i][0] : ranges[i][1]], *ranges[i], (position_offset + i,))
            for i in tokens
        ]
    return _assign(text, ranges, tokens, _cut(text, granularity, delimiter, language),
                   position_offset)


def _cut(text: str, granularity: str, delimiter: str | None, language: str
         ) -> list[tuple[int, int]]:
    """The sorted disjoint character ranges of ``text`` at a coarse granularity."""
    if granularity == "word":
        return [m.span() for m in _WORD.finditer(text)]
    if granularity == "sentence":
        return split_sentences(text, language)
    if granularity == "paragraph":
        return _split_paragraphs(text)
    return _split_at(text, delimiter)


def _assign(
    text: str,
    ranges: list[tuple[int, int]],
    tokens: list[int],
    units: list[tuple[int, int]],
    position_offset: int,
) -> list[Span]:
    """Each token to exactly one of the sorted disjoint ``units`` (rules in the module doc)."""
    if not units:
        raise ValueError("text has only whitespace: it has no word, sentence or piece to explain")
    starts = [a for a, _ in units]
    members: list[list[int]] = [[] for _ in units]
    for i in tokens:
        c = _anchor(text, *ranges[i])
        u = bisect.bisect_right(starts, c) - 1  # last unit starting at or before c
        if u < 0 or c >= units[u][1]:  # between units: the following one, else the last
            u = min(u + 1, len(units) - 1)
        members[u].append(position_offset + i)
    return [
        Span(text[a:b], a, b, tuple(pos)) for (a, b), pos in zip(units, members, strict=True) if pos
    ]


def _explicit_units(
    text: str,
    ranges: list[tuple[int, int]],
    tokens: list[int],
    spans: list[tuple[int, int]],
    position_offset: int,
) -> list[Span]:
    out = []
    for a, b in spans:
        pos = tuple(position_offset + i for i in tokens if ranges[i][0] < b and a < ranges[i][1])
        if not pos:
            raise ValueError(
                f"spans ({a}, {b}) = {text[a:b]!r} covers no eligible token: every token "
                f"overlapping it is excluded (special tokens) or there is none"
            )
        out.append((a, b, pos))
    return [Span(text[a:b], a, b, pos) for a, b, pos in out]
