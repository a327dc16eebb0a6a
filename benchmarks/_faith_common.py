"""What every method of the faithfulness benchmark shares, in both environments.

Imported by the project's side (``bench_faithfulness.py``, ``_faith_methods.py``) and by the
peers' worker (``_faith_peers.py``, run in ``.venv-peers`` with transformers 4.52): so it
imports nothing of ``atman_kernels``, only the standard library (and, inside functions, the
tokenizer it is handed).

The one definition of a document's prompt and of its ablations lives here, so that the
methods and the metrics cannot disagree about them:

- the prompt is ContextCite's: ``template.format(context=..., query=...)`` as the user's
  message of the tokenizer's chat template with the generation prompt, tokenised without
  special tokens (``ContextCiter._get_prompt_ids``);
- a source is a sentence of the context, a (start, end) character range; an ablated context
  keeps the chosen sources in order, each after the text that separated it from the source
  before it in the document (the first kept one without its separator), and drops the rest:
  the rule of ContextCite's ``SimpleContextPartitioner.get_context``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TEMPLATE = "Context: {context}\n\nQuery: {query}"
# documents per prompt length the benchmark is to have (its default counts and the docs' target)
DOCS_PER_LENGTH = {512: 20, 1024: 20, 2048: 5, 4096: 5}


def check_sources(context: str, sources: Sequence[Sequence[int]]) -> None:
    """Sources are sorted, disjoint, non-empty character ranges inside ``context``."""
    last = 0
    for i, (a, b) in enumerate(sources):
        if not (last <= a < b <= len(context)):
            raise ValueError(f"source {i} = ({a}, {b}) is not a sorted, disjoint, non-empty "
                             f"range of the {len(context)}-character context")
        last = b


def ablate(context: str, sources: Sequence[Sequence[int]], keep: Sequence[bool]) -> str:
    """The context with the sources whose ``keep`` is False removed (module docstring)."""
    if len(keep) != len(sources):
        raise ValueError(f"keep has {len(keep)} entries for {len(sources)} sources")
    out: list[str] = []
    prev_end = 0
    for (a, b), k in zip(sources, keep, strict=True):
        if k:
            if out:
                out.append(context[prev_end:a])
            out.append(context[a:b])
        prev_end = b
    return "".join(out)


def chat_prompt(tokenizer: Any, context: str, query: str, template: str = TEMPLATE) -> str:
    """The prompt string: the filled-in template as the user's chat message."""
    message = template.format(context=context, query=query)
    return tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                         tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer: Any, context: str, query: str, template: str = TEMPLATE) -> list[int]:
    """The prompt's token ids (no special tokens added: the chat template holds them)."""
    return list(tokenizer.encode(chat_prompt(tokenizer, context, query, template),
                                 add_special_tokens=False))


def random_masks(n_sources: int, n_masks: int, seed: int, keep_prob: float = 0.5
                 ) -> list[list[bool]]:
    """``n_masks`` keep-masks over the sources, each source kept with ``keep_prob``; mask j
    from ``random.Random(seed * 1_000_003 + j)``, so a run with more masks extends one with
    fewer (the held-out masks of the LDS; the methods never see them)."""
    out = []
    for j in range(n_masks):
        rng = random.Random(seed * 1_000_003 + j)
        out.append([rng.random() < keep_prob for _ in range(n_sources)])
    return out


def top_k_keep(scores: Sequence[float], k: int) -> list[bool]:
    """Keep-mask removing the ``k`` highest-scoring sources (ties: the earlier source first,
    so every method's tie-break is the same)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    drop = set(order[:k])
    return [i not in drop for i in range(len(scores))]


# ----------------------------------------------------------------------------- job files
def read_job(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def done_keys(path: str | Path) -> set[tuple[str, int, str]]:
    """(method, length, doc id) of every result line already in a results file."""
    keys = set()
    p = Path(path)
    if p.is_file():
        for line in p.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                keys.add((r["method"], int(r["length"]), r["doc"]))
    return keys


def append_result(path: str | Path, row: dict[str, Any]) -> None:
    """Append one result line and sync it: a killed run loses at most the document in flight."""
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
