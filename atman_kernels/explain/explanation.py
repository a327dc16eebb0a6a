"""The result of an AtMan explanation and its (de)serialisation.

An :class:`Explanation` holds one score per *explained unit* (a :class:`~.units.Span`: a token,
word, sentence, paragraph or chosen character range of the prompt, a target token but the last,
or an image patch), the raw per-target-token matrix the score is summed from, and the settings
that produced it. ``to_dict``/``from_dict`` and ``to_json``/``from_json`` round-trip everything
but the optional picture (``image``), which is kept only for rendering.

Designs that suppress units jointly (:mod:`.design`) keep every level they scored in
:attr:`Explanation.tree` (a list of :class:`Node`, each with its parent), and a surrogate fit
says so in :attr:`Explanation.estimate`; :meth:`Explanation.citations` reads each answer
sentence's top units from the per-target rows. These are the fields the renderers and the
page read: they are defined here and nowhere else.

Rendering (HTML, PNG, terminal) lives in :mod:`.render`, which reads an Explanation; this module
does not import it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .units import Span, split_sentences, token_spans

KINDS = ("causal_lm", "classifier", "image", "image_text")
# 1: tokens and positions only (non-finite numbers written as null); 2: spans, prompt, image
# views, contrast, non-finite numbers as "NaN" / "Infinity" / "-Infinity"; 3: the tree of
# levels a joint design scored, the estimate of a surrogate fit
FORMAT_VERSION = 3
POSTPROCESS = ("none", "abs", "square")


def ensure_parent(path: str | Path) -> Path:
    """``path`` as a Path, its folder created if missing (``out/x.html`` on a fresh clone)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def combine_scores(per_target: torch.Tensor, postprocess: str, normalize: bool,
                   contrast: torch.Tensor | None = None) -> torch.Tensor:
    """Scores [n] from the raw per-target matrix [T, n].

    ``postprocess`` is applied to each target token's row before the rows are summed
    ("square" squares each target token's map and sums, as the paper's image evaluation does;
    for one target token this equals squaring the sum). ``normalize`` then min-max scales the
    result to [0, 1] (all zeros when every score is equal).

    Contrastive (``contrast`` [F, n], the foil's rises): the score is the target's summed rise
    minus the foil's, and ``postprocess`` applies to that difference (a sign of a single row
    means nothing there).
    """
    if postprocess not in POSTPROCESS:
        raise ValueError(f"postprocess must be one of {POSTPROCESS}, got {postprocess!r}")
    rows = per_target.to(torch.float64)
    if contrast is not None:
        rows = (rows.sum(dim=0) - contrast.to(torch.float64).sum(dim=0))[None]
    if postprocess == "abs":
        rows = rows.abs()
    elif postprocess == "square":
        rows = rows.square()
    scores = rows.sum(dim=0)
    if normalize and scores.numel() > 0:
        lo, hi = scores.min(), scores.max()
        scores = (scores - lo) / (hi - lo) if hi > lo else torch.zeros_like(scores)
    return scores.to(per_target.dtype)


@dataclass(frozen=True)
class Node:
    """One unit that a design scored, at one level of a coarse-to-fine tree.

    Attributes:
        span: the unit (its ``positions`` are every token suppressed together for its score).
        level: what the unit is: "paragraph", "block" (consecutive units grouped where the text
            has no coarser structure), "sentence", "word", "token", "target", "image", ...
        parent: index in :attr:`Explanation.tree` of the node it refines, None at the top.
        rise: [T] raw rise of each target token's cross-entropy when the unit is suppressed
            (exact: one variant suppressing exactly this unit).
        contrast_rise: [F] the foil's rises (contrastive explanations), else None.
        score: the combined score of ``rise`` (``postprocess`` of the settings, never
            normalised), the number the design ranked the node by.
        refined: whether the node's children were scored (they are the nodes whose parent is
            this one); an unrefined node's children have no scores, made up or otherwise.
    """

    span: Span
    level: str
    parent: int | None
    rise: tuple[float, ...]
    score: float
    refined: bool = False
    contrast_rise: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.span, Span):
            raise TypeError(f"Node.span must be a Span, got {type(self.span).__name__}")
        if not isinstance(self.level, str) or not self.level:
            raise ValueError(f"Node.level must be a non-empty str, got {self.level!r}")
        if self.parent is not None and (isinstance(self.parent, bool) or not isinstance(
                self.parent, int) or self.parent < 0):
            raise ValueError(f"Node.parent must be None or an index >= 0, got {self.parent!r}")
        object.__setattr__(self, "rise", tuple(float(x) for x in self.rise))
        if self.contrast_rise is not None:
            object.__setattr__(self, "contrast_rise",
                               tuple(float(x) for x in self.contrast_rise))
        object.__setattr__(self, "score", float(self.score))
        object.__setattr__(self, "refined", bool(self.refined))

    def to_dict(self) -> dict[str, Any]:
        return {"span": self.span.to_dict(), "level": self.level, "parent": self.parent,
                "rise": _floats(torch.tensor(self.rise, dtype=torch.float64)),
                "score": _floats(torch.tensor([self.score], dtype=torch.float64))[0],
                "refined": self.refined,
                "contrast_rise": None if self.contrast_rise is None else _floats(
                    torch.tensor(self.contrast_rise, dtype=torch.float64))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Node:
        contrast = d.get("contrast_rise")
        return cls(span=Span.from_dict(d["span"]), level=d["level"], parent=d.get("parent"),
                   rise=tuple(_tensor(d["rise"]).reshape(-1).tolist()),
                   score=float(_tensor([d["score"]])[0]), refined=bool(d.get("refined")),
                   contrast_rise=None if contrast is None else tuple(
                       _tensor(contrast).reshape(-1).tolist()))


@dataclass(frozen=True)
class Citation:
    """The top units behind one piece of the answer (a sentence, or a chosen range).

    Attributes:
        text: the answer characters cited, ``answer[start:end]``.
        start, end: their range in :attr:`Explanation.answer` (the target tokens joined).
        targets: indices of the target tokens overlapping the range (rows of ``per_target``).
        units: (index into ``spans``, score) of the top units, best first: a unit's score is
            the sum of its ``per_target`` entries over ``targets`` (the rise of those tokens'
            cross-entropy), or their surrogate coefficients for a surrogate estimate.
    """

    text: str
    start: int
    end: int
    targets: tuple[int, ...]
    units: tuple[tuple[int, float], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "start": self.start, "end": self.end,
                "targets": list(self.targets),
                "units": [{"index": i, "score": s} for i, s in self.units]}


@dataclass
class Explanation:
    """Scores of the explained units for one prediction.

    Attributes:
        tokens: display text of each explained unit (``n`` entries; the span texts).
        scores: [n] combined score (after ``postprocess``/``normalize`` from ``settings``);
            positive = suppressing the unit raises the target's cross-entropy, i.e. the unit
            supports the target. Unit: nats (a sum over target tokens of CE rises).
        per_target: [T, n] raw rise of each target token's cross-entropy when the unit is
            suppressed (T = number of target tokens; 1 for classifiers and images).
        target_tokens: display string of each target token (T entries).
        kind: "causal_lm", "classifier" or "image".
        spans: one :class:`~.units.Span` per unit (text, character range in ``prompt``, token
            positions in the model input, source), aligned with ``scores``; built from
            ``tokens`` and ``positions`` (one position per unit) when not given.
        positions: the first token position of each unit in the model input (derived from
            ``spans`` when they are given).
        token_ids: the model input's token ids (``spans[i].positions`` index into them; None
            for images).
        prompt: the prompt text the spans' character ranges refer to (None for token-id
            prompts and images).
        baseline_loss: [T] cross-entropy of each target token without suppression.
        patch_grid: (rows, cols) of the patch grid for images, row-major over ``scores``.
        settings: how the explanation was made (factor, threshold, mode, granularity, ...).
        image_views: image-text explanations: one dict per grid of image tokens, {"image": i,
            "view": "whole" | "global", "grid": [rows, cols], "cells": [rows * cols] index of
            the unit (into ``spans``/``scores``) covering each cell, row-major}; see
            :meth:`score_map`.
        contrast_tokens: contrastive explanations: the foil's tokens (or its class label).
        contrast_per_target: [F, n] raw rise of each foil token's cross-entropy per unit
            (``scores`` = the target's summed rise minus the foil's).
        contrast_baseline_loss: [F] cross-entropy of each foil token without suppression.
        tree: the levels a joint design scored (:class:`Node` list, parents before their
            children); empty for a flat explanation (design "single" or "sampled"). The units
            of ``spans`` are then the tree's unrefined nodes in input order (the finest scores
            the design reached; see :meth:`leaf_nodes`), each with its exact AtMan score.
        estimate: None when every score is an exact AtMan rise (one variant suppressing
            exactly the unit); else a dict saying the scores are estimates, how they were
            made and how well the estimator fits ("method", e.g. "lasso", and its fit quality,
            e.g. "lds": Spearman correlation of predicted and measured rises on held-out
            masks).
        image: optional [3, H, W] picture for rendering; not serialised.
        images: image-text explanations: the prompt's pictures ([H, W, 3] uint8 arrays) for
            rendering, when given; not serialised.
    """

    tokens: list[str]
    scores: torch.Tensor
    per_target: torch.Tensor
    target_tokens: list[str]
    kind: str
    positions: list[int] = field(default_factory=list)
    token_ids: list[int] | None = None
    baseline_loss: torch.Tensor | None = None
    patch_grid: tuple[int, int] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    spans: list[Span] = field(default_factory=list)
    prompt: str | None = None
    image_views: list[dict[str, Any]] = field(default_factory=list)
    contrast_tokens: list[str] | None = None
    contrast_per_target: torch.Tensor | None = None
    contrast_baseline_loss: torch.Tensor | None = None
    tree: list[Node] = field(default_factory=list)
    estimate: dict[str, Any] | None = None
    image: torch.Tensor | None = field(default=None, repr=False, compare=False)
    images: list[Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.spans:
            self.spans = list(self.spans)
            if not self.tokens:
                self.tokens = [s.text for s in self.spans]
            if not self.positions:
                self.positions = [s.positions[0] for s in self.spans]
        n = len(self.tokens)
        if self.scores.dim() != 1 or self.scores.shape[0] != n:
            raise ValueError(f"scores must have shape [{n}] (one per unit), got "
                             f"{tuple(self.scores.shape)}")
        if self.per_target.dim() != 2 or self.per_target.shape[1] != n:
            raise ValueError(f"per_target must have shape [T, {n}], got "
                             f"{tuple(self.per_target.shape)}")
        if self.per_target.shape[0] != len(self.target_tokens):
            raise ValueError("per_target must have one row per target token")
        if not self.positions:
            self.positions = list(range(n))
        if not self.spans:
            self.spans = token_spans(self.tokens, self.positions)
        if len(self.spans) != n or len(self.positions) != n:
            raise ValueError(f"spans and positions must have one entry per unit ({n}), got "
                             f"{len(self.spans)} and {len(self.positions)}")
        if [s.text for s in self.spans] != list(self.tokens) or [
            s.positions[0] for s in self.spans
        ] != list(self.positions):
            raise ValueError("tokens and positions must be the spans' texts and first positions")
        if self.patch_grid is not None:
            self.patch_grid = (int(self.patch_grid[0]), int(self.patch_grid[1]))
            if self.patch_grid[0] * self.patch_grid[1] != n:
                raise ValueError(f"patch_grid {self.patch_grid} does not hold {n} patches")
        if (self.contrast_per_target is None) != (self.contrast_tokens is None):
            raise ValueError("contrast_tokens and contrast_per_target come together")
        if self.contrast_per_target is not None and (
            self.contrast_per_target.dim() != 2
            or tuple(self.contrast_per_target.shape) != (len(self.contrast_tokens), n)
        ):
            raise ValueError(f"contrast_per_target must have shape "
                             f"[{len(self.contrast_tokens)}, {n}], got "
                             f"{tuple(self.contrast_per_target.shape)}")
        self.tree = list(self.tree)
        for k, node in enumerate(self.tree):
            if not isinstance(node, Node):
                raise TypeError(f"tree[{k}] must be a Node, got {type(node).__name__}")
            if node.parent is not None and not node.parent < k:
                raise ValueError(f"tree[{k}].parent = {node.parent}: a parent comes before "
                                 "its children in the tree")
            if node.parent is not None and not self.tree[node.parent].refined:
                raise ValueError(f"tree[{k}] refines tree[{node.parent}], which is not marked "
                                 "refined")
            if len(node.rise) != len(self.target_tokens):
                raise ValueError(f"tree[{k}].rise must have one entry per target token "
                                 f"({len(self.target_tokens)}), got {len(node.rise)}")
        if self.tree and len(self.leaf_nodes()) != n:
            raise ValueError(f"the tree has {len(self.leaf_nodes())} unrefined nodes; spans "
                             f"must be exactly those ({n} given)")
        if self.estimate is not None and not (isinstance(self.estimate, dict)
                                              and "method" in self.estimate):
            raise ValueError("estimate must be None (exact scores) or a dict with 'method'")
        for view in self.image_views:
            rows, cols = view["grid"]
            cells = view["cells"]
            if len(cells) != rows * cols or any(not 0 <= c < n for c in cells):
                raise ValueError(f"image view {view.get('image')}/{view.get('view')} must map "
                                 f"its {rows}x{cols} cells to units in [0, {n})")

    # ----------------------------------------------------------------------------------------
    @property
    def contrast(self) -> str | None:
        """The foil as one string (contrastive explanations), else None."""
        if self.contrast_tokens is None:
            return None
        text = self.settings.get("contrast")
        return text if isinstance(text, str) else "".join(self.contrast_tokens)

    @property
    def base_margin(self) -> float | None:
        """log p(target) - log p(foil) without suppression, in nats (contrastive only)."""
        if self.contrast_baseline_loss is None or self.baseline_loss is None:
            return None
        return float(self.contrast_baseline_loss.double().sum()
                     - self.baseline_loss.double().sum())

    @property
    def target(self) -> str:
        """The target as one string (``settings["target"]`` if set, else the tokens joined)."""
        text = self.settings.get("target")
        return text if isinstance(text, str) else "".join(self.target_tokens)

    @property
    def is_estimate(self) -> bool:
        """Whether the scores are estimates (a surrogate fit, :attr:`estimate`) rather than
        exact AtMan rises."""
        return self.estimate is not None

    @property
    def levels(self) -> list[str]:
        """The levels of :attr:`tree`, coarsest first (empty for a flat explanation)."""
        seen: list[str] = []
        for node in self.tree:
            if node.level not in seen:
                seen.append(node.level)
        return seen

    def leaf_nodes(self) -> list[int]:
        """Indices in :attr:`tree` of the unrefined nodes, in input order: ``spans[i]`` is
        ``tree[leaf_nodes()[i]].span`` (empty for a flat explanation)."""
        leaves = [k for k, node in enumerate(self.tree) if not node.refined]
        return sorted(leaves, key=lambda k: (self.tree[k].span.positions[0], k))

    def children(self, node: int | None) -> list[int]:
        """Indices in :attr:`tree` of the nodes refining ``node`` (None: the top level)."""
        return [k for k, n in enumerate(self.tree) if n.parent == node]

    @property
    def answer(self) -> str:
        """The target tokens joined: the text :meth:`citations` ranges count characters of."""
        return "".join(self.target_tokens)

    def target_offsets(self) -> list[tuple[int, int]]:
        """(start, end) of each target token in :attr:`answer`."""
        out, at = [], 0
        for token in self.target_tokens:
            out.append((at, at + len(token)))
            at += len(token)
        return out

    def cite(self, start: int | None = None, end: int | None = None, k: int = 3
             ) -> Citation:
        """The ``k`` units that the answer characters [start, end) rest on most.

        From the per-target rows of the same run (no forward): a unit's score for the range
        is the sum of its ``per_target`` entries over the target tokens overlapping the range
        (ContextCite's ``get_attributions(start, end)``, on AtMan's rises). Only units of the
        prompt or an image are cited (a causal LM's own target tokens are not). Default range:
        the whole answer.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        answer = self.answer
        start = 0 if start is None else start
        end = len(answer) if end is None else end
        for name, value in (("start", start), ("end", end)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int (a character index), got {value!r}")
        if not 0 <= start < end <= len(answer):
            raise ValueError(f"cite needs 0 <= start < end <= {len(answer)} (characters of the "
                             f"answer {answer!r}), got start={start}, end={end}")
        rows = tuple(t for t, (a, b) in enumerate(self.target_offsets())
                     if a < end and start < b)
        if not rows:
            raise ValueError(f"answer characters [{start}, {end}) hold no target token")
        citable = [i for i, s in enumerate(self.spans) if s.source != "target"]
        if not citable:
            raise ValueError("this explanation has no prompt or image unit to cite")
        summed = self.per_target.to(torch.float64)[list(rows)].sum(dim=0)
        order = sorted(citable, key=lambda i: (-float(summed[i]), i))[:k]
        return Citation(text=answer[start:end], start=start, end=end, targets=rows,
                        units=tuple((i, float(summed[i])) for i in order))

    def citations(self, k: int = 3) -> list[Citation]:
        """One :class:`Citation` per sentence of the answer (sentencex, as for the prompt's
        sentence units), each with its top ``k`` units."""
        answer = self.answer
        if not answer.strip():
            raise ValueError("the answer is empty: nothing to cite")
        return [self.cite(a, b, k) for a, b in split_sentences(answer)]

    def top(self, k: int = 5) -> list[tuple[int, Span, float]]:
        """The ``k`` highest-scoring units as (index into ``spans``, span, score)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an int >= 0, got {k!r}")
        order = torch.argsort(self.scores, descending=True, stable=True)[:k]
        return [(int(i), self.spans[int(i)], float(self.scores[int(i)])) for i in order]

    def score_map(self, image: int | None = None, view: str = "whole") -> torch.Tensor:
        """Scores as a [rows, cols] grid, row-major in patch order.

        Image classifiers: the patch grid (``image`` must be None or 0). Image-text
        explanations: the grid of image ``image`` (default 0): ``view="whole"`` the picture
        (for tiling models the tiles assembled), ``"global"`` a tiling model's global view.
        With ``image_region`` every cell of a region carries the region's score.
        """
        if self.patch_grid is not None:
            if image not in (None, 0) or view != "whole":
                raise ValueError("an image classifier explanation has one image and one view")
            return self.scores.reshape(self.patch_grid)
        image = 0 if image is None else image
        for v in self.image_views:
            if v["image"] == image and v["view"] == view:
                cells = torch.as_tensor(v["cells"], dtype=torch.long)
                return self.scores[cells].reshape(int(v["grid"][0]), int(v["grid"][1]))
        have = sorted({(v["image"], v["view"]) for v in self.image_views})
        if not have:
            raise ValueError("score_map needs an image: this explanation has none")
        raise ValueError(f"no image view ({image}, {view!r}); this explanation has {have}")

    # ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists, strings and numbers only); the pictures are left out.

        ``format_version`` is :data:`FORMAT_VERSION`; :meth:`from_dict` reads every earlier
        version too.
        """
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "tokens": list(self.tokens),
            "token_ids": None if self.token_ids is None else [int(i) for i in self.token_ids],
            "positions": [int(p) for p in self.positions],
            "spans": [s.to_dict() for s in self.spans],
            "prompt": self.prompt,
            "scores": _floats(self.scores),
            "per_target": [_floats(row) for row in self.per_target],
            "target_tokens": list(self.target_tokens),
            "baseline_loss": None if self.baseline_loss is None else _floats(self.baseline_loss),
            "patch_grid": None if self.patch_grid is None else list(self.patch_grid),
            "image_views": _jsonable(self.image_views),
            "contrast_tokens": self.contrast_tokens,
            "contrast_per_target": None if self.contrast_per_target is None else [
                _floats(row) for row in self.contrast_per_target],
            "contrast_baseline_loss": None if self.contrast_baseline_loss is None else _floats(
                self.contrast_baseline_loss),
            "tree": [node.to_dict() for node in self.tree],
            "estimate": None if self.estimate is None else _jsonable(self.estimate),
            "settings": _jsonable(self.settings),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Explanation:
        """Inverse of :meth:`to_dict` (float64 tensors, so the numbers round-trip exactly).

        Dicts written before spans existed (no ``spans`` key) load with one token span per
        position; before format 3 there is no tree (flat) and no estimate (exact scores).
        """
        missing = {"kind", "tokens", "scores", "per_target", "target_tokens"} - set(data)
        if missing:
            raise ValueError(f"explanation dict lacks the keys {sorted(missing)}")
        version = data.get("format_version", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"explanation format_version {version!r} is newer than this "
                             f"package reads ({FORMAT_VERSION}): upgrade atman_kernels")
        n = len(data["tokens"])
        per_target = _tensor(data["per_target"]).reshape(-1, n)
        baseline = data.get("baseline_loss")
        grid = data.get("patch_grid")
        return cls(
            tokens=list(data["tokens"]),
            scores=_tensor(data["scores"]).reshape(n),
            per_target=per_target,
            target_tokens=list(data["target_tokens"]),
            kind=data["kind"],
            positions=list(data.get("positions") or []),
            token_ids=None if data.get("token_ids") is None else list(data["token_ids"]),
            baseline_loss=None if baseline is None else _tensor(baseline),
            patch_grid=None if grid is None else (int(grid[0]), int(grid[1])),
            settings=dict(data.get("settings") or {}),
            spans=[Span.from_dict(d) for d in data.get("spans") or []],
            prompt=data.get("prompt"),
            image_views=list(data.get("image_views") or []),
            contrast_tokens=data.get("contrast_tokens"),
            contrast_per_target=None if data.get("contrast_per_target") is None else _tensor(
                data["contrast_per_target"]).reshape(-1, n),
            contrast_baseline_loss=None if data.get("contrast_baseline_loss") is None else
            _tensor(data["contrast_baseline_loss"]),
            tree=[Node.from_dict(d) for d in data.get("tree") or []],
            estimate=data.get("estimate"),
        )

    def to_json(self, path: str | Path | None = None, *, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict`; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, allow_nan=False)
        if path is not None:
            ensure_parent(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Explanation:
        """Read an explanation from JSON text or from a file holding it."""
        if isinstance(text_or_path, Path) or not str(text_or_path).lstrip().startswith("{"):
            text = Path(text_or_path).read_text(encoding="utf-8")
        else:
            text = str(text_or_path)
        return cls.from_dict(json.loads(text))


_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _floats(t: torch.Tensor) -> list[float | str]:
    """Numbers for JSON: non-finite values as the strings "NaN", "Infinity", "-Infinity"
    (JSON has no literal for them)."""
    out: list[float | str] = []
    for x in t.detach().to(torch.float64).cpu().reshape(-1).tolist():
        if math.isfinite(x):
            out.append(x)
        else:
            out.append("NaN" if x != x else ("Infinity" if x > 0 else "-Infinity"))
    return out


def _tensor(values: Any) -> torch.Tensor:
    """Inverse of :func:`_floats` (nested lists); None (format 1's non-finite) reads as NaN."""
    def number(x: Any) -> Any:
        if isinstance(x, list):
            return [number(v) for v in x]
        if x is None:
            return math.nan
        if isinstance(x, str):
            if x not in _NON_FINITE:
                raise ValueError(f"not a number in an explanation: {x!r}")
            return _NON_FINITE[x]
        return x

    return torch.tensor(number(values), dtype=torch.float64)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [_jsonable(v) for v in items]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return _floats(torch.tensor([value]))[0]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
