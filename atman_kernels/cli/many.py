"""Many explanations: ``atman explain --input data.jsonl --output out.jsonl`` (the lines
read and checked, then :meth:`AtManExplainer.explain_many` with one progress bar, resumable).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from . import loading
from .args import (
    INPUT_FORMAT,
    UsageError,
    _check_chat,
    _check_outputs,
    _max_new_tokens,
    _unit_flags,
)
from .explainer import _explainer, _model_kind, _model_name, _setup, _target_for

# the keys of an --input line (= explain.many.EXAMPLE_KEYS without the API's "inputs")
INPUT_KEYS = ("id", "prompt", "target", "contrast", "spans", "context")
KIND_WORDS = {"image": "an image classifier", "zero_shot": "a zero-shot image-text model",
              "image_text": "a vision-language model"}


def _check_many_flags(args: argparse.Namespace) -> None:
    """--input and --output come together, and without the flags of a single prompt."""
    if args.input is None:
        raise UsageError("--output needs --input JSONL (the examples to explain); for one "
                         "prompt write the explanation with --json PATH")
    if args.output is None:
        raise UsageError("--input needs --output JSONL (the file the explanations are "
                         "appended to)")
    clashes = [
        ("--prompt", args.prompt is not None, "--input takes each prompt from its lines"),
        ("--prompt-file", args.prompt_file is not None,
         "--input takes each prompt from its lines"),
        ("--target", args.target is not None, 'give each example\'s "target" in its line'),
        ("--contrast", args.contrast is not None,
         'give each example\'s "contrast" in its line'),
        ("--spans", args.spans is not None, 'give each example\'s "spans" in its line'),
        ("--context-file", args.context_file is not None,
         'give each example\'s document as "context" in its line'),
        ("--cite", args.cite is not None, "citations are read from each explanation "
                                          "(Explanation.citations) after read_many"),
        ("--html", args.html is not None, "the explanations go to --output (render one with "
                                          "atman_kernels.explain.many.read_many and to_html)"),
        ("--png", args.png is not None, "the explanations go to --output (render one with "
                                        "atman_kernels.explain.many.read_many and save_png)"),
        ("--json", args.json is not None, "the explanations go to --output as JSON Lines"),
        ("--image", bool(args.image), "--input explains text prompts only"),
        ("--image-region", args.image_region is not None,
         "--input explains text prompts only"),
        ("--labels", bool(args.labels), "--input explains text prompts only"),
    ]
    for flag, given, why in clashes:
        if given:
            raise UsageError(f"--input and {flag} cannot be used together: {why}")
    try:
        same = args.input.resolve() == args.output.resolve()
    except OSError:
        same = False
    if same:
        raise UsageError(f"--output {args.output} is the --input file: give another file")


def _input_target(value: Any, key: str, where: str) -> Any:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if not isinstance(value, str):
        raise UsageError(f'{where}: "{key}" must be a string (or a class index), got '
                         f"{json.dumps(value)}")
    if value == "":
        raise UsageError(f'{where}: "{key}" is empty')
    return value


def _input_spans(value: Any, where: str) -> list[tuple[int, int]]:
    ok = isinstance(value, list) and value and all(
        isinstance(pair, list) and len(pair) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in pair) for pair in value)
    if not ok:
        raise UsageError(f'{where}: "spans" must be a list of [start, end] character ranges '
                         f"like [[0, 40], [41, 90]], got {json.dumps(value)}")
    return [(a, b) for a, b in value]


def read_examples(path: Path) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The examples of an --input file (:data:`INPUT_FORMAT`), each checked, and the line
    number of each id; a bad line raises :class:`UsageError` naming the line."""
    source = f"--input {path}"
    if path.is_dir():
        raise UsageError(f"{source} is a folder: give a JSON Lines file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from exc
    examples: list[dict[str, Any]] = []
    lines: dict[str, int] = {}
    for number, raw in enumerate(data.splitlines(), start=1):
        where = f"{source} line {number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{where} is not UTF-8 text (byte {exc.start})") from exc
        if not text.strip():
            continue
        try:
            item = json.loads(text)
        except ValueError as exc:
            reason = getattr(exc, "msg", str(exc))
            column = getattr(exc, "colno", None)
            at = f" at column {column}" if column else ""
            raise UsageError(f"{where} is not valid JSON ({reason}{at})") from exc
        if not isinstance(item, dict):
            raise UsageError(f'{where}: expected a JSON object like {{"prompt": "...", '
                             f'"target": "..."}}, got {type(item).__name__}')
        unknown = sorted(set(item) - set(INPUT_KEYS))
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} (a line "
                             f"holds {', '.join(INPUT_KEYS)})")
        if "prompt" not in item:
            raise UsageError(f'{where}: no "prompt" (the text to explain)')
        prompt = item["prompt"]
        if not isinstance(prompt, str) or prompt == "":
            raise UsageError(f'{where}: "prompt" must be a non-empty string, got '
                             f"{json.dumps(prompt)[:40]}")
        ident = item.get("id", number)
        if isinstance(ident, bool) or not isinstance(ident, (str, int)) or ident == "":
            raise UsageError(f'{where}: "id" must be a non-empty string or an integer, got '
                             f"{json.dumps(ident)}")
        if str(ident) in lines:
            raise UsageError(f"{where}: id {str(ident)!r} repeats line {lines[str(ident)]} "
                             "(ids must be unique)")
        lines[str(ident)] = number
        example = {"id": str(ident), "prompt": prompt,
                   "target": _input_target(item.get("target"), "target", where)}
        if item.get("contrast") is not None:
            example["contrast"] = _input_target(item["contrast"], "contrast", where)
        if item.get("spans") is not None:
            example["spans"] = _input_spans(item["spans"], where)
        if item.get("context") is not None:
            if item.get("spans") is not None:
                raise UsageError(f'{where}: "context" and "spans" cannot be combined: the '
                                 "document's units are cut at --granularity/--delimiter")
            if not isinstance(item["context"], str) or not item["context"].strip():
                raise UsageError(f'{where}: "context" must be a non-empty string (the '
                                 f"document), got {json.dumps(item['context'])[:40]}")
            example["context"] = item["context"]
        examples.append(example)
    if not examples:
        raise UsageError(f"{source} holds no examples ({INPUT_FORMAT})")
    return examples, lines


def run_explain_many(args: argparse.Namespace) -> int:
    """``--input JSONL --output JSONL``: every example explained with one progress bar,
    appended to --output as it finishes; the ids --output already holds are skipped."""
    from ..explain.distributed import check_parts, place_from_env
    from ..explain.many import ExampleError, OutputLocked, check_output_unlocked, finished_ids

    _check_many_flags(args)
    delimiter = _unit_flags(args)
    examples, lines = read_examples(args.input)
    if args.granularity != "token" or delimiter is not None:
        with_spans = [e["id"] for e in examples if "spans" in e]
        if with_spans:
            flag = "--delimiter" if delimiter is not None else "--granularity"
            raise UsageError(f"--input line {lines[with_spans[0]]} has \"spans\", which "
                             f"cannot be used with {flag}: give one way to cut the prompt into "
                             "units")
    check_tokenizer = _check_chat(args)
    _check_outputs(args)  # a folder or an unwritable --output, before it is read
    try:
        place = place_from_env()
        check_parts(args.output, place)  # parts this run cannot continue: before the model
    except ValueError as exc:
        raise UsageError(f"--output: {exc}") from exc
    try:
        check_output_unlocked(args.output)  # another run on it: refused before the model loads
        done = finished_ids(args.output, repair=False)
    except OutputLocked as exc:
        raise UsageError(f"--output {exc}") from exc
    except ValueError as exc:
        raise UsageError(f"--output {exc}: choose another --output file") from exc
    except OSError as exc:
        raise UsageError(f"cannot read --output {args.output}: {exc.strerror or exc}") from exc
    if all(e["id"] in done for e in examples):
        if not args.quiet:
            print(f"AtMan: all {len(examples)} examples of {args.input} are in {args.output} "
                  "already; nothing to explain")
        return 0
    if place.distributed and args.threads is None:
        # torchrun: the machine's cores shared among the processes on it
        local = int(os.environ.get("LOCAL_WORLD_SIZE", place.world))
        args.threads = max(1, (os.cpu_count() or 1) // max(1, local))
    _setup(args)
    archs = getattr(loading.folder_config(args.model), "architectures", None) or []
    early_kind = loading.class_kind(archs[0] if archs else None)
    if early_kind not in (None, "causal_lm", "classifier"):
        raise UsageError(f"--input explains text prompts, and {archs[0]} is "
                         f"{KIND_WORDS[early_kind]}")
    model, tokenizer = loading.load_model(args.model, args.dtype, check_tokenizer=check_tokenizer)
    kind = _model_kind(model)
    if kind not in ("causal_lm", "classifier"):
        raise UsageError(f"--input explains text prompts, and {type(model).__name__} is a "
                         f"{kind.replace('_', ' ')} model")
    for example in examples:
        where = f"--input {args.input} line {lines[example['id']]}"
        for key in ("target", "contrast"):
            value = example.get(key)
            if isinstance(value, str):
                example[key] = _target_for(kind, value)
            elif isinstance(value, int) and kind == "causal_lm":
                raise UsageError(f'{where}: "{key}" must be a string for a causal LM (the '
                                 f"continuation), got {value}")
        if example["target"] is None and kind != "causal_lm":
            raise UsageError(f'{where}: no "target": a classifier needs the label name or '
                             "class index to explain on every line")
    skipped = sum(e["id"] in done for e in examples)
    explainer = _explainer(args, model, tokenizer)
    if not args.quiet:
        print(f"AtMan: {len(examples)} examples from {args.input} [{_model_name(model)}, "
              f"{args.granularity if delimiter is None else 'delimited'} units"
              f"{', chat template' if args.chat else ''}]"
              + (f"; {skipped} already in {args.output}, skipped" if skipped else ""))
    start = time.perf_counter()
    try:
        results = explainer.explain_many(
            examples, output=args.output, resume=True, progress=not args.quiet,
            granularity=args.granularity, delimiter=delimiter,
            max_new_tokens=_max_new_tokens(args), chat=args.chat, design=args.design,
            budget=args.budget, **({"template": args.template.replace("\\n", "\n")}
                                   if args.template is not None else {}))
    except OutputLocked as exc:  # another run took the lock since the check above
        raise UsageError(f"--output {exc}") from exc
    except ExampleError as exc:
        before = len(finished_ids(args.output, repair=False)) if args.output.exists() else 0
        raise UsageError(f"--input {args.input} line {lines[exc.ident]} (id {exc.ident!r}): "
                         f"{exc.cause} ({before} explanations are in {args.output}: fix the "
                         "line and run again to resume)") from exc
    seconds = time.perf_counter() - start
    if not args.quiet:
        each = f", {seconds / len(results):.2f} s each" if results else ""
        where = (f"rank {place.rank} of {place.world}: " if place.distributed else "")
        print(f"{where}explained {len(results)} examples in {seconds:.1f} s{each}; wrote "
              f"jsonl: {args.output}")
    return 0

