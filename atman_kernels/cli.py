"""Command line: ``atman explain --prompt "..." --target "..."``.

Explains why a model produces ``--target`` after ``--prompt`` (causal LMs; without
``--target`` the model's own greedy continuation) or why it assigns the label ``--target`` to
``--prompt`` (sequence classifiers), per token, word, sentence, paragraph, delimited piece or
chosen character span, prints the coloured prompt and the top units, and writes HTML / PNG /
JSON on request. Vision-language models (LLaVA, Idefics3 / SmolVLM folders) take pictures with
``--image PATH`` (once per image placeholder in the prompt, in order) and explain the image
patches (or ``--image-region K``: K x K patches per unit) with the prompt's text.

Pictures alone: an image classifier folder (``*ForImageClassification``: ViT, DeiT, BEiT,
DINOv2, CLIP / SigLIP towers) explains why it gives the class ``--target`` (a label name or
class index; ``--contrast`` a foil class) to one ``--image``; a zero-shot image-text folder
(CLIPModel, MetaClip2Model, SiglipModel, Siglip2Model) explains why it picks the candidate
``--target`` among the label texts given with ``--labels`` (repeated, at least two). Neither
takes a prompt: the picture goes through the folder's own image processor, and its patches are
the units. Without ``--model`` the bundled SmolLM2-135M-Instruct is used
(:func:`atman_kernels.models.load_smollm2`). Nothing is downloaded: models load from local
folders or GGUF files only.

Many examples: ``atman explain --input data.jsonl --output out.jsonl`` explains every line of a
JSON Lines file (:data:`INPUT_FORMAT`) with one progress bar
(:meth:`AtManExplainer.explain_many`), appending each finished explanation to ``--output`` as
``{"id": ..., "explanation": {...}}``; a rerun with the same ``--output`` skips the ids it
already holds. Chat models: ``--chat`` applies the tokenizer's chat template to the prompt (the
user's message) and explains the message only.

Bad input (empty prompt or target, a target that tokenises to nothing, an unsupported model
class, an unreadable model path, an unreadable picture, pictures for a text-only model, a
prompt without the image placeholders, a target that is not one of the model's labels or of the
--labels, a bad --input line, flags that do not go together)
exits with status 2 and a one-line message, before the model's weights load where it can be
known by then, and before any output is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
GRANULARITY_CHOICES = ("token", "word", "sentence", "paragraph")  # = explain.units.GRANULARITIES
# the keys of an --input line (= explain.many.EXAMPLE_KEYS without the API's "inputs")
INPUT_KEYS = ("id", "prompt", "target", "contrast", "spans")
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
        from .ops import cpp_backend

        reason = cpp_backend.unavailable_reason() if hasattr(
            cpp_backend, "unavailable_reason") else None
        if reason:
            raise UsageError(f"--backend cpp: {reason}")


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
    p.add_argument("--prompt", default=None,
                   help="the input text (causal LM: the prompt; classifier: the text to "
                        "classify); '-' reads it from standard input; not for image "
                        "classifiers and zero-shot models (their input is the --image)")
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


# --------------------------------------------------------------------------- model loading
def folder_config(path: str | None) -> Any:
    """The config of a local model folder, read without loading weights; None for the bundled
    model (``path`` None) and for a .gguf file."""
    if path is None:
        return None
    from transformers import AutoConfig

    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"cannot read model path {path!r}: no such file or folder")
    if p.is_file():
        return None
    try:
        return AutoConfig.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"cannot read model path {path!r}: {exc}") from exc


def model_class_name(path: str) -> str | None:
    """The model class a local folder's config names (``architectures[0]``), read without
    loading weights; None for a .gguf file or a config without architectures."""
    archs = getattr(folder_config(path), "architectures", None) or []
    return archs[0] if archs else None


def class_kind(name: str | None) -> str | None:
    """What the explainer makes of a model class, by its name alone (before any weights
    load): "causal_lm", "classifier", "image", "image_text" or "zero_shot"; None when no
    class is named; an unsupported class raises :class:`UsageError` naming it."""
    if name is None:
        return None
    from .explain.explainer import kind_of_class_name

    try:
        return kind_of_class_name(name)
    except TypeError as exc:
        raise UsageError(str(exc)) from exc


def load_processor(path: str, what: str = "a vision-language model folder") -> Any:
    """A model folder's processor (``AutoProcessor``, local files only) with an image
    processor; ``what`` names the folder's kind in the error."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(Path(path).expanduser()),
                                                  local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot read the processor of {path!r}: {exc}") from exc
    if not hasattr(processor, "image_processor"):
        raise UsageError(f"{path!r} holds no image processor (preprocessor_config.json): "
                         f"{what} needs the processor saved with it "
                         "(processor.save_pretrained)")
    return processor


def load_image_processor(path: str) -> Any:
    """An image classifier folder's image processor (``AutoProcessor``, local files only:
    the image processor itself, or a processor's ``image_processor``)."""
    from transformers import AutoProcessor
    from transformers.image_processing_base import ImageProcessingMixin

    missing = (f"{path!r} holds no image processor (preprocessor_config.json): an image "
               "classifier folder needs the image processor saved with it "
               "(image_processor.save_pretrained), which turns the picture into the model's "
               "pixel values")
    try:
        processor = AutoProcessor.from_pretrained(str(Path(path).expanduser()),
                                                  local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{missing} ({exc})") from exc
    image_processor = getattr(processor, "image_processor", processor)
    if not isinstance(image_processor, ImageProcessingMixin):
        raise UsageError(missing)
    return image_processor


def read_images(paths: list[Path]) -> list[Any]:
    """The pictures at ``paths`` as RGB PIL images (read fully, so a bad file fails here)."""
    from PIL import Image

    pictures = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
                pictures.append(im.convert("RGB"))
        except FileNotFoundError:
            raise UsageError(f"cannot read --image {path}: no such file") from None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise UsageError(f"cannot read --image {path}: {exc}") from exc
    return pictures


def load_model(path: str | None, dtype_name: str = "float32", *,
               processor: Any = None, check_tokenizer: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a folder, a .gguf file, or the bundled SmolLM2 (``None``).

    ``processor``: a vision-language model's processor, already loaded: returned in place of
    the tokenizer. ``check_tokenizer``: called with the tokenizer before the model's weights
    load (for the bundled model: after), to refuse it early (raises :class:`UsageError`).
    """
    import torch

    dtype = getattr(torch, dtype_name)
    check = check_tokenizer or (lambda tokenizer: None)
    if path is None:
        from .models import load_smollm2

        model, tokenizer = load_smollm2(dtype=dtype)
        check(tokenizer)
        return model, tokenizer
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"cannot read model path {path!r}: no such file or folder")
    try:
        if p.is_file():
            if p.suffix.lower() != ".gguf":
                raise UsageError(f"model path {path!r} is a file but not a .gguf file; give a "
                                 "model folder or a .gguf file")
            kw = {"gguf_file": p.name, "local_files_only": True}
            tokenizer = AutoTokenizer.from_pretrained(str(p.parent), **kw)
            check(tokenizer)
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), dtype=dtype, **kw)
            return model, tokenizer
        config = AutoConfig.from_pretrained(str(p), local_files_only=True)
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if cls is None:
            cls = AutoModelForCausalLM
        tokenizer = processor
        if processor is None:
            tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            check(tokenizer)
        model = cls.from_pretrained(str(p), dtype=dtype, local_files_only=True)
        return model, tokenizer
    except UsageError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"cannot read model path {path!r}: {exc}") from exc


def _target_for(kind: str, text: str) -> Any:
    if kind in ("classifier", "image") and text.strip().lstrip("-").isdigit():
        return int(text)
    return text


def _read_prompt(args: argparse.Namespace) -> str:
    """The prompt from --prompt, standard input (--prompt -) or --prompt-file, checked."""
    if (args.prompt is None) == (args.prompt_file is None):
        raise UsageError("give the input text with exactly one of --prompt TEXT, --prompt - "
                         "(standard input) or --prompt-file PATH, or many examples with "
                         "--input JSONL --output JSONL")
    if args.prompt_file is not None:
        source = f"--prompt-file {args.prompt_file}"
        try:
            text = args.prompt_file.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from exc
    elif args.prompt == "-":
        source, text = "--prompt - (standard input)", sys.stdin.buffer.read()
    else:
        source, text = "--prompt", args.prompt
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{source} is not UTF-8 text (byte {exc.start}): save it as "
                             "UTF-8") from exc
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in text):
        raise UsageError(f"{source} holds bytes that are not UTF-8 text (lone surrogates)")
    if text == "":
        raise UsageError(f"{source} is empty: give the text to explain")
    return text


def _model_name(model: Any) -> str:
    """The model's own name (its folder or hub id) where known, else its class."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return Path(name).name or type(model).__name__ if name else type(model).__name__


def _short(text: str, limit: int = 40) -> str:
    """One line of at most ``limit`` characters (long sentences are cut in the middle)."""
    text = " ".join(text.split())
    half = limit // 2 - 2
    return text if len(text) <= limit else text[:half] + " .. " + text[-half:]


def _image_inputs(args: argparse.Namespace) -> tuple[list[Any], Any]:
    """(pictures, processor) for --image, checked before the model's weights load: the
    pictures readable, the model folder a vision-language model's with its processor, one
    image placeholder in the prompt per picture. ([], None) without --image."""
    from .explain.explainer import IMAGE_TEXT_FAMILIES

    if not args.image:
        if args.image_region is not None:
            raise UsageError("--image-region needs --image (a picture for a vision-language "
                             "model)")
        return [], None
    families = (f"a vision-language model ({', '.join(sorted(IMAGE_TEXT_FAMILIES))}), an "
                "image classifier (*ForImageClassification) or a zero-shot image-text model "
                f"({', '.join(_zero_shot_families())})")
    if args.model is None:
        raise UsageError(f"--image needs {families} folder given with --model; the bundled "
                         "SmolLM2 is a text-only model")
    images = read_images(args.image)
    name = model_class_name(args.model)
    if name not in IMAGE_TEXT_FAMILIES:
        what = f"{name} is a text-only model" if name else "it names no model class"
        raise UsageError(f"--image needs {families}, but --model {args.model}: {what}")
    processor = load_processor(args.model)
    placeholder = getattr(processor, "image_token", None) or "<image>"
    found = args.prompt.count(placeholder)
    if found != len(images):
        raise UsageError(f"the prompt holds {found} image placeholder(s) {placeholder!r} but "
                         f"{len(images)} --image were given: put {placeholder} where each "
                         f"picture goes, e.g. --prompt '{placeholder} What is this?'")
    return images, processor


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
    return delimiter


def _setup(args: argparse.Namespace) -> None:
    """Checks and settings shared by one prompt and --input: backend, output files, quiet
    logs, threads (all before the model loads)."""
    import torch

    _check_backend(args.backend)
    _check_outputs(args)
    if args.quiet:  # third-party logs and bars too ("Loading weights", warnings)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if args.threads is not None:
        torch.set_num_threads(args.threads)


def _model_kind(model: Any) -> str:
    from .explain.explainer import model_kind

    try:
        return model_kind(model)
    except TypeError as exc:
        raise UsageError(str(exc)) from exc


def _explainer(args: argparse.Namespace, model: Any, tokenizer: Any) -> Any:
    from .explain import AtManExplainer

    max_memory = None if args.max_memory_mb is None else args.max_memory_mb * 2**20
    try:
        return AtManExplainer(
            model, tokenizer, factor=args.factor,
            conceptual_threshold=args.conceptual_threshold, mode=args.mode,
            batch_size=args.batch_size, max_memory=max_memory,
            prefix_reuse=not args.no_prefix_reuse, progress=not args.quiet, layers=args.layers,
            postprocess=args.postprocess, normalize=args.normalize, backend=args.backend,
        )
    except (TypeError, ValueError) as exc:  # e.g. --layers outside the model
        raise UsageError(str(exc)) from exc


# ----------------------------------------------------------------------------------- main
def run_explain(args: argparse.Namespace) -> int:
    from .explain import save_png, to_html, to_terminal
    from .explain.render import headline

    if args.input is not None or args.output is not None:
        return run_explain_many(args)
    config = folder_config(args.model)
    archs = getattr(config, "architectures", None) or []
    early_kind = class_kind(archs[0] if archs else None)
    if early_kind in PICTURE_KINDS:
        model, processor, inputs, target, contrast = _prepare_picture(args, early_kind, config)
        options: dict[str, Any] = {}
    else:
        model, processor, inputs, target, contrast, options = _prepare_prompt(args)
    explainer = _explainer(args, model, processor)
    start = time.perf_counter()
    try:
        expl = explainer.explain(inputs, target, contrast=contrast, **options)
    except (ValueError, NotImplementedError) as exc:  # bad input / model, named by the callee
        raise UsageError(str(exc)) from exc
    seconds = time.perf_counter() - start
    if args.json is not None:
        expl.to_json(args.json)
    if args.html is not None:
        to_html(expl, args.html)
    if args.png is not None:
        save_png(expl, args.png)
    if not args.quiet:
        color = not args.no_color and sys.stdout.isatty() and "NO_COLOR" not in os.environ
        made = " (generated)" if expl.settings.get("generated") else ""
        print(f"AtMan: {headline(expl)}{made} [{_model_name(model)}, "
              f"{len(expl.spans)} {expl.settings.get('granularity', 'token')} units, "
              f"{expl.settings.get('forwards')} forwards, {seconds:.2f} s]")
        candidates = expl.settings.get("candidates")
        if candidates:  # a zero-shot explanation: the labels the softmax ran over
            print("candidates: " + ", ".join(map(repr, candidates)))
        print(to_terminal(expl, color=color))
        score = ("rise of the target's cross-entropy minus the foil's, in nats; positive = "
                 "supports the target over the foil" if expl.contrast is not None else
                 "rise of the target's cross-entropy in nats; positive = supports the target")
        print(f"top {min(args.top, len(expl.spans))} units (score = {score}):")
        for rank, (_, span, score) in enumerate(expl.top(args.top), start=1):
            if span.start is not None:
                where = f"chars {span.start}-{span.end}"
            elif span.box is not None:
                where = "box {:.0f},{:.0f}-{:.0f},{:.0f}".format(*span.box)
            else:
                where = f"{span.source} position {span.positions[0]}"
            print(f"  {rank:2d}. {_short(span.text)!r:<32} {where:<18} {score:+.5f}")
        for label, path in (("json", args.json), ("html", args.html), ("png", args.png)):
            if path is not None:
                print(f"wrote {label}: {path}")
    return 0


def _prepare_prompt(args: argparse.Namespace) -> tuple[Any, ...]:
    """A text prompt (causal LM, sequence classifier, or vision-language model with --image),
    checked, and the model loaded: (model, tokenizer or processor, inputs, target, contrast,
    explain options)."""
    if args.labels:
        what = (f"--model {args.model} is not one" if args.model is not None
                else "the bundled SmolLM2 is a text-only model")
        raise UsageError(f"--labels needs a zero-shot image-text model folder "
                         f"({', '.join(_zero_shot_families())}): {what}; for an image "
                         "classifier give the class with --target alone")
    args.prompt = _read_prompt(args)
    if args.target == "":
        raise UsageError("--target is empty: give the continuation or label to explain, or "
                         "leave --target out to explain the generated continuation")
    delimiter = _unit_flags(args)
    check_tokenizer = _check_chat(args)
    _setup(args)
    images, processor = _image_inputs(args)
    model, tokenizer = load_model(args.model, args.dtype, processor=processor,
                                  check_tokenizer=check_tokenizer)
    kind = _model_kind(model)
    if kind == "image_text" and not images:
        raise UsageError(f"{type(model).__name__} is a vision-language model: give the "
                         "picture(s) with --image PATH")
    if args.target is None and kind not in ("causal_lm", "image_text"):
        raise UsageError(f"--target is required for a {kind.replace('_', ' ')} model: give the "
                         "label name or class index to explain")
    target = None if args.target is None else _target_for(kind, args.target)
    contrast = None if args.contrast is None else _target_for(kind, args.contrast)
    inputs = (args.prompt, images) if images else args.prompt
    options = {"granularity": args.granularity, "delimiter": delimiter, "spans": args.spans,
               "max_new_tokens": _max_new_tokens(args), "image_region": args.image_region,
               "chat": args.chat}
    return model, tokenizer, inputs, target, contrast, options


# ------------------------------------------------------- image classifiers, zero-shot models
PICTURE_KINDS = ("image", "zero_shot")
KIND_WORDS = {"image": "an image classifier", "zero_shot": "a zero-shot image-text model",
              "image_text": "a vision-language model"}


def _zero_shot_families() -> list[str]:
    from .explain.front.zero_shot import ZERO_SHOT_FAMILIES

    return list(ZERO_SHOT_FAMILIES)


def _max_new_tokens(args: argparse.Namespace) -> int:
    return 20 if args.max_new_tokens is None else args.max_new_tokens


def _check_picture_flags(args: argparse.Namespace, kind: str, name: str) -> None:
    """The flags an image classifier / a zero-shot model takes: one --image, no prompt, no
    text units; --labels for zero-shot models only (all before the model loads)."""
    what = (f"{name} is an image classifier" if kind == "image"
            else f"{name} is a zero-shot image-text model")
    no_text = ("its input is the picture alone" if kind == "image"
               else "its texts are the candidate --labels")
    clashes = [
        ("--prompt", args.prompt is not None, no_text),
        ("--prompt-file", args.prompt_file is not None, no_text),
        ("--chat", args.chat, "there is no text prompt to put in a chat template"),
        ("--granularity " + args.granularity, args.granularity != "token",
         "its units are the image's patches"),
        ("--delimiter", args.delimiter is not None, "its units are the image's patches"),
        ("--spans", args.spans is not None, "its units are the image's patches"),
        ("--image-region", args.image_region is not None,
         "its units are the image's patches, one each (--image-region groups the patches of "
         "a vision-language model)"),
        ("--max-new-tokens", args.max_new_tokens is not None, "nothing is generated"),
    ]
    if kind == "image":
        families = ", ".join(_zero_shot_families())
        clashes.append(("--labels", bool(args.labels),
                        "the classes are the model's own labels (config id2label); --labels "
                        f"gives the candidates of a zero-shot model ({families})"))
    for flag, given, why in clashes:
        if given:
            raise UsageError(f"{what}: {flag} cannot be used ({why})")
    if not args.image:
        raise UsageError(f"{what}: give the picture to explain with --image PATH")
    if len(args.image) > 1:
        raise UsageError(f"{what}, which explains one picture at a time: give --image once "
                         f"(got {len(args.image)})")
    if args.target is None or args.target == "":
        need = ("the label name or class index to explain" if kind == "image"
                else "one of the --labels, the candidate to explain")
        raise UsageError(f"{what}: --target is {'empty' if args.target == '' else 'required'}"
                         f": give {need}")
    if args.contrast == "":
        raise UsageError("--contrast is empty: give the foil to explain against, or leave "
                         "--contrast out")


def _class_target(config: Any, text: str, flag: str) -> int | str:
    """--target / --contrast of an image classifier: a label name of the config's label2id or
    a class index below num_labels (checked before the weights load)."""
    value = _target_for("image", text)
    label2id = getattr(config, "label2id", None) or {}
    n_labels = int(getattr(config, "num_labels", 0) or 0)
    labels = sorted(label2id, key=lambda k: label2id[k])
    shown = ", ".join(map(repr, labels[:20])) + (", ..." if len(labels) > 20 else "")
    if isinstance(value, int):
        if not 0 <= value < n_labels:
            raise UsageError(f"{flag} class {value} is out of range: the model has {n_labels} "
                             f"classes (0 to {n_labels - 1})")
        return value
    if value not in label2id:
        raise UsageError(f"{flag} {value!r} is not one of the model's labels ({shown}); give a "
                         "label name or a class index")
    return int(label2id[value])


def _candidate_labels(args: argparse.Namespace, name: str) -> list[str]:
    """The --labels of a zero-shot model, checked: at least two, none empty, all different,
    the --target (and --contrast) among them."""
    labels = args.labels or []
    example = ("--labels 'a photo of a cat' --labels 'a photo of a dog' --target "
               "'a photo of a cat'")
    if len(labels) < 2:
        raise UsageError(f"{name} is a zero-shot image-text model: give at least two candidate "
                         f"label texts, one --labels each (got {len(labels)}), e.g. {example}")
    empty = [i for i, label in enumerate(labels, start=1) if not label.strip()]
    if empty:
        raise UsageError(f"--labels number {empty[0]} is empty: give each candidate's text")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise UsageError(f"--labels {repeated[0]!r} is given twice: give each candidate once")
    for flag, value in (("--target", args.target), ("--contrast", args.contrast)):
        if value is not None and value not in labels:
            raise UsageError(f"{flag} {value!r} is not one of the --labels "
                             f"({', '.join(map(repr, labels))}): give one of them, as written")
    return list(labels)


def _prepare_picture(args: argparse.Namespace, kind: str, config: Any) -> tuple[Any, ...]:
    """One picture for an image classifier or a zero-shot image-text model, checked, and the
    model loaded: (model, processor for the explainer, inputs, target, contrast)."""
    name = config.architectures[0]
    _check_picture_flags(args, kind, name)
    if kind == "image":
        target = _class_target(config, args.target, "--target")
        contrast = None if args.contrast is None else _class_target(config, args.contrast,
                                                                     "--contrast")
    else:
        labels = _candidate_labels(args, name)
        target, contrast = args.target, args.contrast
    if contrast is not None and contrast == target:
        raise UsageError(f"--contrast {args.contrast!r} is the --target itself: give another "
                         "class as the foil")
    _setup(args)
    (picture,) = read_images(args.image)
    if kind == "zero_shot":
        processor = load_processor(args.model, "a zero-shot image-text model folder")
        if getattr(processor, "tokenizer", None) is None:
            raise UsageError(f"{args.model!r} holds no tokenizer: a zero-shot model folder "
                             "needs its processor (image processor and tokenizer) saved with "
                             "it, to read the --labels")
        model, _ = load_model(args.model, args.dtype, processor=processor)
        return model, processor, (picture, labels), target, contrast
    image_processor = load_image_processor(args.model)
    try:
        out = image_processor(images=picture, return_tensors="pt")
    except (ValueError, TypeError, OSError) as exc:
        raise UsageError(f"cannot prepare --image {args.image[0]} with the image processor of "
                         f"{args.model!r}: {exc}") from exc
    from .explain.front.classify import PIXEL_KEYS

    pixels = {k: out[k] for k in PIXEL_KEYS if out.get(k) is not None}
    model, _ = load_model(args.model, args.dtype, processor=image_processor)
    return model, None, pixels, target, contrast


# ------------------------------------------------------------------------ --input / --output
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
        examples.append(example)
    if not examples:
        raise UsageError(f"{source} holds no examples ({INPUT_FORMAT})")
    return examples, lines


def run_explain_many(args: argparse.Namespace) -> int:
    """``--input JSONL --output JSONL``: every example explained with one progress bar,
    appended to --output as it finishes; the ids --output already holds are skipped."""
    from .explain.many import ExampleError, finished_ids

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
        done = finished_ids(args.output, repair=False)
    except ValueError as exc:
        raise UsageError(f"--output {exc}: choose another --output file") from exc
    except OSError as exc:
        raise UsageError(f"cannot read --output {args.output}: {exc.strerror or exc}") from exc
    if all(e["id"] in done for e in examples):
        if not args.quiet:
            print(f"AtMan: all {len(examples)} examples of {args.input} are in {args.output} "
                  "already; nothing to explain")
        return 0
    _setup(args)
    archs = getattr(folder_config(args.model), "architectures", None) or []
    early_kind = class_kind(archs[0] if archs else None)
    if early_kind not in (None, "causal_lm", "classifier"):
        raise UsageError(f"--input explains text prompts, and {archs[0]} is "
                         f"{KIND_WORDS[early_kind]}")
    model, tokenizer = load_model(args.model, args.dtype, check_tokenizer=check_tokenizer)
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
            max_new_tokens=_max_new_tokens(args), chat=args.chat)
    except ExampleError as exc:
        before = len(finished_ids(args.output, repair=False)) if args.output.exists() else 0
        raise UsageError(f"--input {args.input} line {lines[exc.ident]} (id {exc.ident!r}): "
                         f"{exc.cause} ({before} explanations are in {args.output}: fix the "
                         "line and run again to resume)") from exc
    seconds = time.perf_counter() - start
    if not args.quiet:
        each = f", {seconds / len(results):.2f} s each" if results else ""
        print(f"explained {len(results)} examples in {seconds:.1f} s{each}; wrote jsonl: "
              f"{args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``atman`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "explain":
            return run_explain(args)
    except UsageError as exc:
        if getattr(args, "debug", False):
            raise
        parser.exit(2, f"atman: error: {exc}\n")
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
