"""The faithfulness benchmark's documents, each with the model's own answer.

Two kinds, both cut into sentences by the package's splitter (the sources every method is
scored on):

- ``templated``: bench_long_docs' generator (people, cities, jobs; same-name distractors) with
  one evidence sentence "<person> grew up in Hamburg." (no other sentence names Hamburg) and
  the query "In which city did <person> grow up?". A seed is used only where the model's own
  greedy answer names Hamburg (``answered`` seeds; the seeds tried are recorded), so the
  evidence rank measures what the answer rests on.
- either kind: only where the answer's tokens are what the tokenizer makes of the prompt and
  answer text again (:func:`round_trips`), so that ContextCite, which tokenises the text,
  explains the very tokens the other methods are given.
- ``prose``: text no one in this project wrote: the licence texts Debian ships in
  ``/usr/share/common-licenses`` (GPL, LGPL, GFDL, MPL, Apache, Artistic, CC0), hard-wrapped
  lines joined, paragraphs kept; windows of whole paragraphs from several starting
  paragraphs; one of three questions about the text; the answer is the model's own greedy
  answer cut after its first sentence.

Every document is padded to at least the requested number of prompt tokens (the chat-
templated prompt, :func:`_faith_common.prompt_ids`). Nothing is downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from _faith_common import TEMPLATE, chat_prompt, check_sources, prompt_ids

LICENCES = Path("/usr/share/common-licenses")
PROSE_FILES = ["GPL-3", "LGPL-2.1", "MPL-1.1", "LGPL-2", "GFDL-1.3", "GFDL-1.2", "GPL-2",
               "MPL-2.0", "GPL-1", "Apache-2.0", "LGPL-3", "Artistic", "CC0-1.0"]
PROSE_QUERIES = [
    "What does this text require of someone who distributes the work? Answer in one sentence.",
    "What is the main point of this text? Answer in one sentence.",
    "What rights does this text give to the reader? Answer in one sentence.",
]
TEMPLATED_QUERY = "In which city did {p} grow up?"


def paragraphs(path: Path) -> list[str]:
    """The file's paragraphs (blank-line separated), each with its wrapped lines joined."""
    text = path.read_text(encoding="utf-8", errors="replace")
    out = []
    for block in re.split(r"\n\s*\n", text):
        joined = " ".join(line.strip() for line in block.splitlines() if line.strip())
        if len(joined) >= 20:
            out.append(joined)
    return out


def sentence_sources(context: str) -> list[list[int]]:
    from atman_kernels.explain.units import split_sentences

    sources = [[a, b] for a, b in split_sentences(context)]
    check_sources(context, sources)
    return sources


def source_positions(tokenizer: Any, context: str, query: str, sources: list[list[int]],
                     template: str = TEMPLATE) -> list[list[int]]:
    """For each source, the positions of the prompt tokens whose characters overlap it."""
    chat = chat_prompt(tokenizer, context, query, template)
    message = template.format(context=context, query=query)
    head = template.split("{context}")[0]
    head = head.replace("{query}", query)
    base = chat.index(message) + len(head)
    enc = tokenizer(chat, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != prompt_ids(tokenizer, context, query, template):
        raise RuntimeError("the tokenizer's offsets encoding differs from its plain encoding")
    out: list[list[int]] = [[] for _ in sources]
    owner: dict[int, int] = {}
    for pos, (s, e) in enumerate(enc["offset_mapping"]):
        inside = any(base + a <= s and e <= base + b for a, b in sources)
        if e > s and not chat[s:e].strip() and base <= s and e <= base + len(context) and (
                not inside):
            # whitespace between two sources (a paragraph break) goes with the next source
            nxt = [i for i, (a, _) in enumerate(sources) if base + a >= e]
            if nxt:
                owner[pos] = nxt[0]
                out[nxt[0]].append(pos)
            continue
        for i, (a, b) in enumerate(sources):
            if s < base + b and e > base + a and e > s:
                if pos in owner:
                    raise RuntimeError(f"token {pos} overlaps sources {owner[pos]} and {i}")
                owner[pos] = i
                out[i].append(pos)
    if any(not p for p in out):
        raise RuntimeError("a source holds no token")
    return out


def generate_answer(model: Any, ids: list[int], max_new_tokens: int, eos: int | None,
                    tokenizer: Any, first_sentence: bool) -> list[int]:
    """The model's greedy answer ids (EOS dropped; cut after the first sentence if asked)."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=eos)[0, len(ids):].tolist()
    if eos is not None and eos in out:
        out = out[:out.index(eos)]
    if first_sentence:
        for i in range(len(out)):
            text = tokenizer.decode(out[:i + 1])
            if re.search(r"[.!?](\s|$)", text.strip() + " ") or "\n" in text:
                out = out[:i + 1]
                break
    while out and not tokenizer.decode(out[-1:]).strip(" ") and "\n" in tokenizer.decode(
            out[-1:]):
        out = out[:-1]  # a trailing newline is not part of the answer
    return out


def round_trips(tokenizer: Any, ids: list[int], answer: list[int]) -> bool:
    """Whether the answer's tokens are what the tokenizer makes of prompt + answer text: a
    method that re-tokenises the text (ContextCite) then explains the same tokens as one
    that takes the ids. A generated answer whose text tokenises otherwise is not used."""
    text = tokenizer.decode(ids + answer)
    again = tokenizer.encode(text, add_special_tokens=False)
    return again == ids + answer


def _finish(tokenizer: Any, doc: dict[str, Any]) -> dict[str, Any]:
    doc["sources"] = sentence_sources(doc["context"])
    doc["positions"] = source_positions(tokenizer, doc["context"], doc["query"], doc["sources"])
    doc["n_sources"] = len(doc["sources"])
    return doc


def templated_doc(model: Any, tokenizer: Any, length: int, seed: int, tries: int = 12
                  ) -> dict[str, Any] | None:
    """The first answered templated document from ``seed`` on (None if none of ``tries``)."""
    from bench_long_docs import ANSWER_CITY, EVIDENCE, document_sentences

    for s in range(seed, seed + tries):
        n_sent = max(4, length // 12)
        while True:
            sentences, at, person = document_sentences(n_sent, s)
            context = " ".join(sentences)
            query = TEMPLATED_QUERY.format(p=person)
            ids = prompt_ids(tokenizer, context, query)
            if len(ids) >= length:
                break
            n_sent += max(1, (length - len(ids)) // 12)
        answer = generate_answer(model, ids, 16, tokenizer.eos_token_id, tokenizer, True)
        text = tokenizer.decode(answer)
        if ANSWER_CITY not in text or not round_trips(tokenizer, ids, answer):
            continue
        doc = _finish(tokenizer, {"doc": f"templated-{length}-{s}", "kind": "templated",
                                  "length": length, "context": context, "query": query,
                                  "template": TEMPLATE, "prompt_ids": ids,
                                  "response_ids": answer, "response": text, "seed": s,
                                  "seeds_tried": s - seed + 1})
        ev = EVIDENCE.format(p=person, c=ANSWER_CITY)
        a = context.index(ev)
        hits = [i for i, (x, y) in enumerate(doc["sources"]) if x <= a < y]
        if len(hits) != 1 or context[doc["sources"][hits[0]][0]:doc["sources"][hits[0]][1]
                                     ] != ev:
            raise RuntimeError(f"the evidence sentence is not one source in {doc['doc']}")
        doc["evidence"] = hits[0]
        return doc
    return None


def prose_doc(model: Any, tokenizer: Any, length: int, index: int) -> dict[str, Any] | None:
    """The ``index``-th prose window at ``length`` tokens (None where that text is too short).

    Window ``index`` reads file ``PROSE_FILES[index % len]`` from paragraph
    ``3 * (index // len)`` on (later windows of the same licence start later)."""
    name = PROSE_FILES[index % len(PROSE_FILES)]
    start = 3 * (index // len(PROSE_FILES))
    paras = paragraphs(LICENCES / name)[start:]
    query = PROSE_QUERIES[index % len(PROSE_QUERIES)]
    taken: list[str] = []
    for p in paras:
        taken.append(p)
        context = "\n\n".join(taken)
        ids = prompt_ids(tokenizer, context, query)
        if len(ids) >= length:
            break
    else:
        return None
    answer = generate_answer(model, ids, 40, tokenizer.eos_token_id, tokenizer, True)
    if not tokenizer.decode(answer).strip() or not round_trips(tokenizer, ids, answer):
        return None
    return _finish(tokenizer, {"doc": f"prose-{length}-{name}-{start}", "kind": "prose",
                               "length": length, "context": context, "query": query,
                               "template": TEMPLATE, "prompt_ids": ids, "response_ids": answer,
                               "response": tokenizer.decode(answer), "evidence": None,
                               "window": index, "file": str(LICENCES / name)})


def build_docs(model: Any, tokenizer: Any, length: int, n_docs: int,
               have: list[dict[str, Any]] | None = None, on_doc: Any = None,
               tries: int = 60) -> list[dict[str, Any]]:
    """``n_docs`` documents of ``length`` tokens: templated and prose alternating (templated
    first), seeds and windows in a fixed order, so that asking for more extends ``have`` (the
    documents built before); ``on_doc(docs)`` is called after each new one (to save it).

    Where no seed of the ``tries`` after the last templated page gives an answered page (the
    model stops naming the evidence's city at long lengths), that slot and every later one at
    this length take prose; the prose document records the seeds that failed
    (``templated_failed``), so that extending the file later neither retries them nor goes
    back to templated pages."""
    docs: list[dict[str, Any]] = list(have or [])
    seeds = [d["seed"] for d in docs if d["kind"] == "templated"]
    failed = [d["templated_failed"] for d in docs if d.get("templated_failed")]
    windows = [d["window"] for d in docs if d["kind"] == "prose"]
    seed = max(seeds) + 1 if seeds else 0
    window = max(windows) + 1 if windows else 0
    while len(docs) < n_docs:
        d, gave_up = None, None
        if len(docs) % 2 == 0 and not failed:
            d = templated_doc(model, tokenizer, length, seed, tries=tries)
            if d is not None:
                seed = d["seed"] + 1
            else:
                gave_up = failed = [seed, seed + tries - 1]
        if d is None and (len(docs) % 2 == 1 or failed):
            while d is None and window < 10 * len(PROSE_FILES):
                d = prose_doc(model, tokenizer, length, window)
                window += 1
            if d is not None and gave_up:
                d["templated_failed"] = gave_up
        if d is None:
            kind = "templated" if len(docs) % 2 == 0 and not failed else "prose"
            raise RuntimeError(f"no more {kind} documents of {length} tokens after {len(docs)}")
        docs.append(d)
        if on_doc is not None:
            on_doc(docs)
    return docs
