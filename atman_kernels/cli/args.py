"""The ``atman`` command line parsed and checked: the parser, its value types, and the checks
of flags that need no model (output files, backend, unit flags, --chat).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
GRANULARITY_CHOICES = ("token", "word", "sentence", "paragraph")  # = explain.units.GRANULARITIES
INPUT_FORMAT = (
    'one JSON object per line: {"id": "q1", "prompt": "The capital of France is", '
    '"target": " Paris", "contrast": " Lyon", "spans": [[4, 11]]}; only "prompt" is required '
    '(a non-empty string); "id" (a string or an integer, unique) defaults to the line number; '
    '"target" / "contrast" as --target / --contrast (a string, or a class index for a '
    'classifier; no "target": the generated continuation, causal LMs only); "spans" as --spans, '
    'a list of [start, end] character ranges; blank lines are skipped')


class UsageError(Exception):
    """A problem with the command line or its inputs: reported without a traceback."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the flag and what was expected) and a
    pointer to --help, exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _threshold(text: str) -> float | None:
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number in [0, 1] or 'none', got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'none', got {text!r}")
    return value


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return "auto"
    return _int_at_least(1, "'auto' or an integer >= 1")(text)


def _factor(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (value >= 0.0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _int_at_least(minimum: int, expected: str | None = None):
    """An argparse type: an integer >= ``minimum`` (the error names what was expected)."""
    expected = expected or f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1)

_count = _int_at_least(0)


def _spans(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        start, sep, end = part.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            out.append((int(start), int(end)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected character ranges START:END[,START:END...] like 0:40,41:90, got "
                f"{text!r}") from None
    return out


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices like 0,1,5, got {text!r}") from None


def _explain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", "--question", dest="prompt", default=None,
                   help="the input text (causal LM: the prompt; classifier: the text to "
                        "classify; with --context-file: the question); '-' reads it from "
                        "standard input; not for image classifiers and zero-shot models "
                        "(their input is the --image)")
    p.add_argument("--prompt-file", type=Path, default=None,
                   help="read the input text from this UTF-8 file instead of --prompt")
    p.add_argument("--input", type=Path, default=None, metavar="JSONL",
                   help="explain many examples instead of --prompt: a UTF-8 JSON Lines file, "
                        + INPUT_FORMAT.replace("%", "%%") + "; needs --output")
    p.add_argument("--output", type=Path, default=None, metavar="JSONL",
                   help="with --input: the JSON Lines file each finished explanation is "
                        'appended to, as {"id": ..., "explanation": ...} (read it back with '
                        "atman_kernels.explain.many.read_many); a rerun with the same "
                        "--output skips the ids it already holds (resume after a crash)")
    p.add_argument("--context-file", type=Path, default=None, metavar="PATH",
                   help="a document given apart from the question (--prompt/--question): "
                        "the prompt is --template filled in, and only the document is cut "
                        "into units (--granularity) and suppressed")
    p.add_argument("--template", default=None,
                   help="with --context-file: the prompt around the document, holding "
                        "{context} and {question} once each (default 'Context: "
                        "{context}\\n\\nQuery: {question}'; '\\n' is a line break)")
    p.add_argument("--design", choices=("auto", "single", "hierarchical", "sampled"),
                   default="auto",
                   help="which units each variant suppresses together: single (one variant "
                        "per unit, the paper's exact scores), hierarchical (coarse units "
                        "first, the best refined best-first within --budget; exact scores), "
                        "sampled (random joint suppressions and a sparse linear surrogate: "
                        "estimated scores, with the fit's quality); auto (default): single "
                        "when the units fit in the budget, else hierarchical")
    p.add_argument("--budget", type=_positive_int, default=None, metavar="N",
                   help="the most suppressed forwards (variants) the explanation may run "
                        "(default 48)")
    p.add_argument("--cite", type=_positive_int, default=None, metavar="K",
                   help="print each sentence of the answer with the K context units it rests "
                        "on most (from the per-token rows of the same run)")
    p.add_argument("--chat", action="store_true",
                   help="apply the tokenizer's chat template to the prompt (the user's "
                        "message) and explain the message only: the template's tokens "
                        "(system prompt, role markers) are neither explained nor suppressed; "
                        "--spans then count characters from the start of the message")
    p.add_argument("--target", default=None,
                   help="causal LM: the continuation to explain (e.g. ' Paris'); left out: the "
                        "model's own greedy continuation is generated and explained; "
                        "classifier (text or image): a label name or class index (required); "
                        "zero-shot model: one of the --labels (required)")
    p.add_argument("--contrast", default=None,
                   help="explain why --target rather than this foil: a continuation (causal "
                        "LM), a label name / class index (classifier) or another of the "
                        "--labels (zero-shot model); a unit's score is then the rise of the "
                        "target's cross-entropy minus the foil's")
    p.add_argument("--labels", "--label", dest="labels", action="append", default=None,
                   metavar="TEXT",
                   help="zero-shot image-text model (CLIPModel, MetaClip2Model, SiglipModel, "
                        "Siglip2Model): one candidate label text, e.g. 'a photo of a cat'; "
                        "repeat the flag for each candidate (at least two, all different); "
                        "--target and --contrast name one of them")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="without --target: the most tokens to generate (default 20; stops at "
                        "EOS)")
    p.add_argument("--granularity", choices=GRANULARITY_CHOICES, default="token",
                   help="explained unit of the prompt: one variant per token (default), word, "
                        "sentence or paragraph (all its tokens suppressed together)")
    p.add_argument("--delimiter", default=None,
                   help="explain the prompt in pieces cut at this string (e.g. '###'; '\n' "
                        "is a line break)")
    p.add_argument("--spans", type=_spans, default=None,
                   help="explain only these character ranges of the prompt, one unit each: "
                        "START:END[,START:END...] (end exclusive); other tokens are neither "
                        "explained nor suppressed")
    p.add_argument("--model", default=None,
                   help="a local model folder (from_pretrained) or a .gguf file; default: the "
                        "bundled SmolLM2-135M-Instruct")
    p.add_argument("--image", type=Path, action="append", default=None, metavar="PATH",
                   help="a picture (read with Pillow) for a vision-language model folder "
                        "(LLaVA, Idefics3, SmolVLM, Qwen2-VL): repeat for several pictures, one "
                        "per image placeholder (e.g. <image>) in the prompt, in order; for an "
                        "image classifier or a zero-shot model folder: the one picture to "
                        "explain, given once, no --prompt")
    p.add_argument("--image-region", type=_positive_int, default=None, metavar="K",
                   help="with --image and a vision-language model: explain K x K image "
                        "patches as one unit (e.g. 4: a 24 x 24 grid in 36 units); default: "
                        "every patch")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype to run the model in (default float32)")
    p.add_argument("--mode", choices=("paper", "log"), default="paper",
                   help="suppression formula: 'paper' (min-shifted multiplicative, default) or "
                        "'log' (adds log factor to the score)")
    p.add_argument("--backend", choices=("auto", "cpp", "triton", "reference"), default="auto",
                   help="attention op backend: 'auto' (C++ on CPU, Triton on CUDA, default), or "
                        "one by name; 'reference' is the plain PyTorch op, for checking")
    p.add_argument("--factor", type=_factor, default=0.1,
                   help="suppression factor c, finite and >= 0 (default 0.1)")
    p.add_argument("--conceptual-threshold", type=_threshold, default=None,
                   help="cosine threshold kappa in [0, 1] for conceptual suppression (also "
                        "lower the units whose input embedding is similar), or 'none' (the "
                        "default: on the package's quality evaluation it lowered evidence "
                        "retrieval, see the README)")
    p.add_argument("--batch-size", type=_batch_size, default="auto",
                   help="variants per forward: 'auto' (from free memory, default) or an integer")
    p.add_argument("--max-memory-mb", type=_positive_int, default=None,
                   help="memory budget in MiB for --batch-size auto (default: a safe share of "
                        "the free memory)")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="recompute every variant in full instead of reusing the cached "
                        "unsuppressed prefix (same scores, slower; for checking)")
    p.add_argument("--layers", type=_layers, default=None,
                   help="comma-separated layer indices to suppress (default: all layers)")
    p.add_argument("--postprocess", choices=("none", "abs", "square"), default="none",
                   help="applied to each target token's scores before summing (default none)")
    p.add_argument("--normalize", action="store_true",
                   help="min-max scale the scores to [0, 1]")
    p.add_argument("--top", type=_count, default=5,
                   help="how many top units to list (default 5; 0 lists none)")
    p.add_argument("--html", type=Path, default=None, help="write a self-contained HTML page")
    p.add_argument("--png", type=Path, default=None, help="write a PNG heatmap")
    p.add_argument("--json", type=Path, default=None,
                   help="write the explanation as JSON (Explanation.from_json reads it back)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-color", action="store_true",
                   help="print scores as text instead of ANSI colours")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no printed explanation (files are still written)")
    p.add_argument("--debug", action="store_true",
                   help="show full tracebacks instead of one-line errors")


def build_parser() -> argparse.ArgumentParser:
    """The ``atman`` argument parser (sub-command ``explain``)."""
    explain_parser = _Parser(
        prog="atman explain", add_help=False,
        description="Explain a prediction with AtMan (attention suppression).")
    _explain_arguments(explain_parser)
    parser = _Parser(
        prog="atman",
        description="AtMan explanations of transformer predictions (atman_kernels).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="options of 'atman explain':\n\n" + explain_parser.format_help()
        + "\nexamples:\n  atman explain --prompt 'The capital of France is' --target ' Paris' "
          "--html paris.html\n"
          "  atman explain --model path/to/vit --image cat.jpg --target 'tabby cat'\n"
          "  atman explain --model path/to/clip --image cat.jpg --labels 'a photo of a cat' "
          "--labels 'a photo of a dog' --target 'a photo of a cat'",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    exp = sub.add_parser("explain", help="explain why the model predicts --target",
                         description=explain_parser.description)
    _explain_arguments(exp)
    return parser


# --------------------------------------------------- flag checks (before any model loads)
def _check_outputs(args: argparse.Namespace) -> None:
    """Every output file can be written, checked before any work (nothing is left behind)."""
    import tempfile

    for flag, path in (("--html", args.html), ("--png", args.png), ("--json", args.json),
                       ("--output", args.output)):
        if path is None:
            continue
        if path.is_dir():
            raise UsageError(f"{flag} {path} is a folder: give a file path")
        if path.exists() and not os.access(path, os.W_OK):
            raise UsageError(f"{flag} {path}: the file is not writable")
        parent = path.parent
        existing = parent
        while not existing.exists():
            existing = existing.parent
        try:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".atman-probe-"):
                pass
        except OSError as exc:
            raise UsageError(f"{flag} {path}: cannot write in {existing} "
                             f"({exc.strerror or exc})") from exc


def _check_backend(name: str) -> None:
    """--backend names a backend this machine can run (before the model loads)."""
    import torch

    if name == "triton" and not torch.cuda.is_available() and os.environ.get(
            "TRITON_INTERPRET") != "1":
        raise UsageError("--backend triton needs a CUDA GPU, and this machine has none; use "
                         "--backend auto (the C++ kernel on CPU) or --backend cpp")
    if name == "cpp":
        from ..ops import cpp_backend

        reason = cpp_backend.unavailable_reason() if hasattr(
            cpp_backend, "unavailable_reason") else None
        if reason:
            raise UsageError(f"--backend cpp: {reason}")


def _unit_flags(args: argparse.Namespace) -> str | None:
    """The delimiter (line breaks and tabs read), after the unit flags are checked."""
    delimiter = None
    if args.delimiter is not None:
        if args.delimiter == "":
            raise UsageError("--delimiter is empty: give the string to cut the prompt at")
        delimiter = args.delimiter.replace("\\n", "\n").replace("\\t", "\t")
    given = [flag for flag, on in (("--granularity " + args.granularity,
                                    args.granularity != "token"),
                                   ("--delimiter", delimiter is not None),
                                   ("--spans", args.spans is not None)) if on]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} are exclusive: give one way to cut the prompt "
                         "into units")
    if getattr(args, "template", None) is not None and getattr(args, "context_file",
                                                              None) is None:
        raise UsageError("--template fills in a document: give --context-file too")
    if getattr(args, "context_file", None) is not None and args.spans is not None:
        raise UsageError("--context-file and --spans are exclusive: the document's units are "
                         "cut at --granularity/--delimiter")
    return delimiter


def _check_chat(args: argparse.Namespace):
    """With --chat: a check of the tokenizer (it must have a chat template), run before the
    model's weights load; None without --chat."""
    if not args.chat:
        return None
    if args.image:
        raise UsageError("--chat applies a text chat template to the prompt; it cannot be used "
                         "with --image (give the vision-language model's prompt in full)")
    where = "the bundled SmolLM2" if args.model is None else repr(args.model)

    def check(tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"--chat needs a tokenizer with a chat template, and the tokenizer "
                             f"of {where} has none: leave out --chat and give the prompt in "
                             "full")

    return check


def _max_new_tokens(args: argparse.Namespace) -> int:
    return 20 if args.max_new_tokens is None else args.max_new_tokens

