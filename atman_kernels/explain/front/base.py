"""What every front end shares: the text inputs (ids, tokenisation, units of a prompt, a chat
message), the length check, greedy generation, and :class:`Prepared`, what a front end hands
the engine.

A front end turns a user's inputs and target into a :class:`Prepared`: the task (how a
variant's forward is run and scored, :mod:`..tasks`), the units (:mod:`..units`) and the
Explanation's fields. :class:`FrontEnd` is the base of the per-kind front ends, mixed into
:class:`atman_kernels.explain.AtManExplainer`, which owns ``model``, ``tokenizer``, ``kind`` and
the settings they read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..units import GRANULARITIES, Span, prompt_spans, token_spans


@dataclass
class Prepared:
    """What a front end hands the engine: the task, the units, the Explanation's fields and
    settings, and what conceptual suppression compares (the layer-0 input embeddings, or the
    input ids to embed)."""

    task: Any
    units: list[Span]
    fields: dict[str, Any]
    settings: dict[str, Any]
    input_ids: torch.Tensor | None = None
    embed: bool = False
    embeddings: torch.Tensor | None = None
    contrast_rows: int = 0  # the last rows of the task's targets are the foil's


# Called by a front end before it generates an answer: (the unit lists the answer can give,
# the prompt text their offsets index, whether the input holds pictures) -> None, or
# ValueError where the explanation's design and budget fit none of them.
Precheck = Callable[[list[list[Span]], "str | None", bool], None]


def answer_unit_options(units: list[Span], n_prompt: int, with_target: bool
                        ) -> list[list[Span]]:
    """The unit lists a generated answer can give: ``units`` alone (an answer of one token,
    or one whose tokens are not units) and, ``with_target``, ``units`` and target-token
    units. Designs see target-token units only as one group however many there are (one
    group per source, :mod:`..hierarchy`), and a single-unit design needs more budget the
    more there are: one placeholder unit stands for them (the least a longer answer adds)."""
    options = [list(units)]
    if with_target:
        options.append(list(units) + token_spans([""], [n_prompt], source="target"))
    return options


class FrontEnd:
    """Text-input helpers of every front end (attributes set by the explainer)."""

    model: Any
    tokenizer: Any
    kind: str

    @property
    def _device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def _token_ids(self, value: Any, name: str, *, add_special_tokens: bool) -> list[int]:
        """Token ids of a string (through the tokenizer) or of ids given directly."""
        if isinstance(value, str):
            return self._encode(value, name, add_special_tokens=add_special_tokens)["input_ids"]
        if hasattr(value, "keys") and "input_ids" in value:
            value = value["input_ids"]
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                raise TypeError(f"{name} token ids must be an integer tensor, got {value.dtype}")
            if value.dim() == 2 and value.shape[0] == 1:
                value = value[0]
            if value.dim() != 1:
                raise ValueError(f"{name} token ids must have shape [N] or [1, N], got "
                                 f"{tuple(value.shape)}")
            value = value.tolist()
        if isinstance(value, (list, tuple)):
            if len(value) == 1 and isinstance(value[0], (list, tuple)):
                value = value[0]
            if len(value) == 0:
                raise ValueError(f"{name} is empty: give at least one token")
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
                raise TypeError(f"{name} token ids must be ints")
            vocab = self._vocab_size()
            bad = [i for i in value if i < 0 or (vocab is not None and i >= vocab)]
            if bad:
                raise ValueError(f"{name} token ids must lie in [0, {vocab}) (the model's "
                                 f"vocabulary), got {bad[:5]}")
            return [int(i) for i in value]
        raise TypeError(
            f"{name} must be a string or token ids (list of ints / tensor), got "
            f"{type(value).__name__}"
        )

    def _encode(self, text: str, name: str, *, add_special_tokens: bool) -> dict[str, Any]:
        """Tokenise ``text``: input_ids, special_tokens_mask and (fast tokenizers) offsets."""
        if text == "":
            raise ValueError(f"{name} is empty: give a non-empty string or token ids")
        check_text(text, name)
        if self.tokenizer is None:
            raise ValueError(
                f"{name} is a string but no tokenizer was given: pass "
                "AtManExplainer(model, tokenizer) or token ids"
            )
        offsets = bool(getattr(self.tokenizer, "is_fast", False))
        enc = self.tokenizer(text, add_special_tokens=add_special_tokens,
                             return_special_tokens_mask=True, return_offsets_mapping=offsets)
        ids = [int(i) for i in enc["input_ids"]]
        if len(ids) == 0:
            raise ValueError(f"{name} {text!r} tokenises to no tokens")
        out = {"input_ids": ids, "special": [bool(x) for x in enc["special_tokens_mask"]],
               "offsets": [tuple(o) for o in enc["offset_mapping"]] if offsets else None}
        if "token_type_ids" in enc:
            out["token_type_ids"] = list(enc["token_type_ids"])
        return out

    def _vocab_size(self) -> int | None:
        if self.kind == "image":
            return None
        try:
            emb = self.model.get_input_embeddings()
        except (NotImplementedError, AttributeError):  # a model without a token embedding
            return None
        return getattr(emb, "num_embeddings", None)

    def _token_strings(self, ids: Sequence[int]) -> list[str]:
        if self.tokenizer is None:
            return [str(int(i)) for i in ids]
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def _special_ids(self) -> set[int]:
        if self.tokenizer is None:
            return set()
        return {int(i) for i in getattr(self.tokenizer, "all_special_ids", [])}

    def _prompt_units(self, prompt: Any, name: str, unit_args: dict[str, Any]
                      ) -> tuple[list[int], list[Span], str | None, dict[str, Any]]:
        """(token ids, units, prompt text or None, encoding extras) of a text or id prompt."""
        granularity, delimiter, spans = (unit_args["granularity"], unit_args["delimiter"],
                                         unit_args["spans"])
        coarse = granularity != "token" or delimiter is not None or spans is not None
        region = None
        if unit_args.get("context") is not None:
            prompt, region = compose_context(prompt, unit_args["context"],
                                             unit_args.get("template"))
        if unit_args.get("chat"):
            return self._chat_units(prompt, name, unit_args, region)
        if isinstance(prompt, str):
            enc = self._encode(prompt, name, add_special_tokens=True)
            ids = enc["input_ids"]
            # special: added by the tokenizer (BOS), or written in the text (chat markers)
            special = set() if unit_args["special_tokens"] else self._special_ids()
            eligible = [i for i, sp in enumerate(enc["special"])
                        if unit_args["special_tokens"] or not (sp or ids[i] in special)]
            if enc["offsets"] is None:
                if coarse:
                    raise ValueError(
                        f"granularity {granularity!r}, delimiter and spans need character "
                        f"offsets, which {type(self.tokenizer).__name__} (a slow tokenizer) "
                        "does not give: load the fast tokenizer (use_fast=True)")
                units = token_spans([self._token_strings([ids[i]])[0] for i in eligible],
                                    eligible)
            else:
                units = prompt_spans(prompt, enc["offsets"], granularity=granularity,
                                     delimiter=delimiter, spans=spans, eligible=eligible,
                                     region=region)
            return ids, units, prompt, enc
        if coarse:
            raise ValueError(
                f"granularity {granularity!r}, delimiter and spans need a text prompt (a "
                f"string) to find words, sentences or character ranges in; {name} was given "
                "as token ids")
        ids = self._token_ids(prompt, name, add_special_tokens=True)
        special = set() if unit_args["special_tokens"] else self._special_ids()
        eligible = [i for i, t in enumerate(ids) if t not in special]
        return ids, token_spans(self._token_strings([ids[i] for i in eligible]), eligible), \
            None, {}

    def _chat_units(self, message: Any, name: str, unit_args: dict[str, Any],
                    region: tuple[int, int] | None = None
                    ) -> tuple[list[int], list[Span], str, dict[str, Any]]:
        """The chat template applied to the user's ``message``; units inside the message
        (inside ``region`` of the message when given: a context)."""
        if not isinstance(message, str):
            raise ValueError(f"chat=True takes the user's message as a string, got {name} as "
                             f"{type(message).__name__}")
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("chat=True needs a tokenizer with a chat template "
                             "(tokenizer.chat_template is not set)")
        if message == "":
            raise ValueError(f"{name} is empty: give the user's message")
        check_text(message, name)
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                                  tokenize=False, add_generation_prompt=True)
        start = text.find(message)
        if start < 0:
            raise ValueError("the chat template changed the user's message (it is not found "
                             "verbatim in the rendered prompt), so its characters cannot be "
                             "located; pass the rendered prompt with spans= instead")
        end = start + len(message)
        enc = self._encode(text, name, add_special_tokens=False)
        if enc["offsets"] is None:
            raise ValueError("chat=True needs character offsets (a fast tokenizer)")
        specials = self._special_ids()
        eligible = [i for i, ((a, b), special) in enumerate(zip(enc["offsets"], enc["special"],
                                                                strict=True))
                    if a < end and b > start and b > a and not special
                    and enc["input_ids"][i] not in specials]
        spans = unit_args["spans"]
        if spans is not None:
            bad = [sp for sp in spans if not (0 <= sp[0] and sp[1] <= len(message))]
            if bad:
                raise ValueError(f"spans {bad} lie outside the user's message "
                                 f"(0..{len(message)} characters)")
            spans = [(a + start, b + start) for a, b in spans]
        elif unit_args["granularity"] != "token" or unit_args["delimiter"] is not None:
            # coarse units cut the message, never the template around it
            units = prompt_spans(message, [(max(a, start) - start, min(b, end) - start)
                                           for a, b in (enc["offsets"][i] for i in eligible)],
                                 granularity=unit_args["granularity"],
                                 delimiter=unit_args["delimiter"],
                                 position_offset=0, region=region)
            units = [Span(u.text, u.start + start, u.end + start,
                          tuple(eligible[p] for p in u.positions)) for u in units]
            return enc["input_ids"], units, text, enc
        units = prompt_spans(text, enc["offsets"], granularity="token", spans=spans,
                             eligible=eligible,
                             region=None if region is None else (region[0] + start,
                                                                 region[1] + start))
        return enc["input_ids"], units, text, enc

    def _check_length(self, n: int) -> None:
        config = self.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        limit = None
        for attr in ("max_position_embeddings", "n_positions"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 0:
                limit = value
                break
        if limit is not None and n > limit:
            raise ValueError(f"the input has {n} tokens, more than the model's "
                             f"{limit} positions (config max_position_embeddings)")

    def _generate(self, prompt_ids: list[int], max_new_tokens: int,
                  extra: dict[str, Any] | None = None) -> list[int]:
        """The model's greedy continuation of ``prompt_ids``, without the EOS that ends it."""
        from transformers import GenerationConfig

        model = self.model
        base = getattr(model, "generation_config", None)
        eos = getattr(base, "eos_token_id", None)
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        eos_ids = set() if eos is None else ({int(eos)} if isinstance(eos, int)
                                               else {int(e) for e in eos})
        pad = getattr(base, "pad_token_id", None)
        if pad is None:
            pad = next(iter(sorted(eos_ids)), 0)
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  eos_token_id=sorted(eos_ids) or None, pad_token_id=pad)
        ids = torch.tensor([prompt_ids], device=self._device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=config, **(extra or {}))
        new = [int(t) for t in out[0, len(prompt_ids):].tolist()]
        for i, t in enumerate(new):
            if t in eos_ids:
                new = new[:i]
                break
        if not new:
            raise ValueError("the model's greedy continuation starts with EOS: there is no "
                             "generated answer to explain; give a target")
        return new


CONTEXT_TEMPLATE = "Context: {context}\n\nQuery: {question}"


def compose_context(question: Any, context: Any, template: str | None
                    ) -> tuple[str, tuple[int, int]]:
    """The prompt of a context given apart from its question, and the context's character
    range in it: ``template`` (default :data:`CONTEXT_TEMPLATE`, ContextCite's) with
    ``{context}`` and ``{question}`` replaced (each exactly once; no other braces are read,
    so a document may hold any)."""
    template = CONTEXT_TEMPLATE if template is None else template
    if not isinstance(context, str) or not context.strip():
        raise ValueError(f"context must be a non-empty string (the document whose units are "
                         f"explained), got {context!r}")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"with context=, the prompt is the question: a non-empty string, got "
                         f"{question!r}")
    if not isinstance(template, str) or template.count("{context}") != 1 or template.count(
            "{question}") != 1:
        raise ValueError(f"template must be a string holding '{{context}}' and '{{question}}' "
                         f"once each, got {template!r}")
    check_text(context, "context")
    head, tail = template.split("{context}")
    if "{question}" in head:
        before, after = head.split("{question}")
        head = before + question + after
    else:
        tail = tail.replace("{question}", question)
    return head + context + tail, (len(head), len(head) + len(context))


def unit_settings(unit_args: dict[str, Any]) -> dict[str, Any]:
    """How the prompt was cut into units, for ``Explanation.settings``."""
    extra: dict[str, Any] = {}
    if unit_args.get("context") is not None:
        extra = {"context_chars": len(unit_args["context"]),
                 "template": unit_args.get("template") or CONTEXT_TEMPLATE}
    return {**_cut_settings(unit_args), **extra}


def _cut_settings(unit_args: dict[str, Any]) -> dict[str, Any]:
    if unit_args["spans"] is not None:
        return {"granularity": "spans"}
    if unit_args["delimiter"] is not None:
        return {"granularity": "delimiter", "delimiter": unit_args["delimiter"]}
    return {"granularity": unit_args["granularity"]}


def check_text(text: str, name: str) -> None:
    """Refuse a string that is not valid Unicode text: a lone surrogate (e.g. "\\ud800", left
    by a bad decode) cannot be encoded as UTF-8, and tokenizers fail on it with a TypeError
    far from the cause."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{name} holds a lone surrogate {text[exc.start]!r} at character {exc.start} "
            "(half of a UTF-16 pair, not a character), which no tokenizer can encode; fix the "
            "text's decoding (e.g. bytes.decode('utf-8', errors='replace'))") from None


def check_unit_arguments(granularity: Any, delimiter: Any, spans: Any) -> None:
    """Cheap checks of the unit arguments, before any work (prompt_spans checks the rest)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r} "
                         "(for a custom delimiter pass delimiter=..., e.g. delimiter='###')")
    if delimiter is not None and (not isinstance(delimiter, str) or delimiter == ""):
        raise ValueError(f"delimiter must be a non-empty string or None, got {delimiter!r}")
    if delimiter is not None:
        check_text(delimiter, "delimiter")
    given = [name for name, on in (("granularity", granularity != "token"),
                                   ("delimiter", delimiter is not None),
                                   ("spans", spans is not None)) if on]
    if len(given) > 1:
        raise ValueError(f"give one way to cut the prompt into units, got {' and '.join(given)}")
