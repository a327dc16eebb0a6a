"""Coarse-to-fine trees over the explained units, for the hierarchical design.

:func:`build_hierarchy` groups the finest units (the explainer's units: tokens, words,
sentences, ...) into coarser ones: the text's own structure first (words, sentences,
paragraphs of the prompt, as :mod:`.units` cuts them), then *blocks* of consecutive units
wherever a level would hold more than ``max_children`` members (a page of 48 sentences without
paragraph breaks becomes 6 blocks of 8). Units without text of their own (a causal LM's target
tokens, image cells, token-id prompts) form one group per source and are blocked the same way.

Every group is a :class:`~.units.Span` over the union of its members' positions, so suppressing
it is one AtMan variant (its exact score). A group with one member is not made: the member
stands in its place; a top level of one group (the whole prompt) is replaced by its members.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .units import Span, _split_paragraphs, split_sentences

# the text levels coarser than each granularity, finest first
_TEXT_LEVELS = ("word", "sentence", "paragraph")
_RANK = {"token": 0, "word": 1, "sentence": 2, "spans": 2, "delimiter": 2, "paragraph": 3}
_WORD = re.compile(r"\S+")


@dataclass
class Group:
    """A node of the tree: a span over the finest units ``units`` (indices into the
    explainer's units), at ``level``, refined by ``children`` (indices into the tree)."""

    span: Span
    level: str
    units: tuple[int, ...]
    children: list[int] = field(default_factory=list)


@dataclass
class Hierarchy:
    """The groups (:class:`Group`), the indices of the top level, in input order."""

    groups: list[Group]
    top: list[int]

    def depth(self) -> int:
        def d(k: int) -> int:
            kids = self.groups[k].children
            return 1 + (max(d(c) for c in kids) if kids else 0)
        return max((d(k) for k in self.top), default=0)


def finest_level(granularity: str, span: Span) -> str:
    """The level name of a finest unit: its granularity for prompt text, else what it is."""
    if span.source == "image":
        return "image"
    if span.source == "target":
        return "target token"
    return granularity


def build_hierarchy(units: Sequence[Span], prompt: str | None, granularity: str, *,
                    max_children: int = 8) -> Hierarchy:
    """The tree of groups over ``units`` (see the module doc).

    Args:
        units: the explainer's units, in input order (``spans`` of an Explanation).
        prompt: the prompt text their character ranges index (None: no text levels).
        granularity: how the units were cut ("token", "word", "sentence", "paragraph",
            "spans", "delimiter").
        max_children: the most members a group (or the top level) may hold before they are
            cut into blocks (>= 2).
    """
    if isinstance(max_children, bool) or not isinstance(max_children, int) or max_children < 2:
        raise ValueError(f"max_children must be an int >= 2, got {max_children!r}")
    groups = [Group(span=u, level=finest_level(granularity, u), units=(i,))
              for i, u in enumerate(units)]
    text_units = [i for i, u in enumerate(units)
                  if u.source == "prompt" and u.start is not None and prompt is not None]
    others: dict[tuple[str, int | None], list[int]] = {}
    for i, u in enumerate(units):
        if i not in set(text_units):
            others.setdefault((u.source, u.image), []).append(i)

    tops: list[int] = []
    if text_units:
        current = list(text_units)
        rank = _RANK.get(granularity, 2)
        for level in _TEXT_LEVELS:
            if _RANK[level] <= rank:
                continue
            current = _group_by_ranges(groups, current, _ranges(prompt, level), level, prompt)
        tops.extend(current)
    for (source, _image), members in others.items():
        if len(members) == 1:
            tops.append(members[0])
            continue
        level = "image" if source == "image" else ("target" if source == "target" else
                                                    "prompt")
        tops.append(_new_group(groups, members, level, prompt))
    tops.sort(key=lambda k: groups[k].span.positions[0])
    while len(tops) == 1 and groups[tops[0]].children:  # one group of everything tells nothing
        tops = list(groups[tops[0]].children)
    # blocks wherever a level holds too many members, the top level included
    for k in list(range(len(groups))):
        if len(groups[k].children) > max_children:
            groups[k].children = _blocks(groups, groups[k].children, max_children, prompt)
    if len(tops) > max_children:
        tops = _blocks(groups, tops, max_children, prompt)
    return Hierarchy(groups=groups, top=tops)


def _ranges(prompt: str, level: str) -> list[tuple[int, int]]:
    if level == "word":
        return [m.span() for m in _WORD.finditer(prompt)]
    if level == "sentence":
        return split_sentences(prompt)
    return _split_paragraphs(prompt)


def _group_by_ranges(groups: list[Group], members: list[int], ranges: list[tuple[int, int]],
                     level: str, prompt: str | None) -> list[int]:
    """Members grouped by the range holding their first character (consecutive members
    only); a range with one member keeps the member itself."""
    out: list[int] = []
    run: list[int] = []
    run_range: int | None = None

    def close() -> None:
        if not run:
            return
        out.append(run[0] if len(run) == 1 else _new_group(groups, list(run), level, prompt))

    for k in members:
        start = groups[k].span.start
        which = next((r for r, (a, b) in enumerate(ranges) if a <= start < b), None)
        if which is None or which != run_range:
            close()
            run, run_range = [], which
        run.append(k)
    close()
    return out


def _blocks(groups: list[Group], members: list[int], max_children: int,
            prompt: str | None) -> list[int]:
    """``members`` cut into balanced blocks of consecutive members, recursively until at
    most ``max_children`` remain."""
    while len(members) > max_children:
        n_blocks = math.ceil(len(members) / max_children)
        size = math.ceil(len(members) / n_blocks)
        cut = [members[i:i + size] for i in range(0, len(members), size)]
        members = [c[0] if len(c) == 1 else _new_group(groups, c, "block", prompt) for c in cut]
    return members


def _new_group(groups: list[Group], children: list[int], level: str,
               prompt: str | None) -> int:
    spans = [groups[c].span for c in children]
    positions = tuple(sorted({p for s in spans for p in s.positions}))
    units = tuple(sorted({u for c in children for u in groups[c].units}))
    if prompt is not None and all(s.start is not None for s in spans):
        start, end = min(s.start for s in spans), max(s.end for s in spans)
        text = prompt[start:end]
    else:
        start = end = None
        text = "".join(s.text for s in spans)
    first = spans[0]
    same_image = all(s.image == first.image for s in spans)
    span = Span(text, start, end, positions,
                source=first.source if all(s.source == first.source for s in spans) else
                "prompt", image=first.image if same_image else None)
    groups.append(Group(span=span, level=level, units=units, children=list(children)))
    return len(groups) - 1
