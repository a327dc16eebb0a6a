"""Command line: ``atman explain --prompt "..." --target "..."``.

Explains why a model produces ``--target`` after ``--prompt`` (causal LMs) or why it assigns
the label ``--target`` to ``--prompt`` (sequence classifiers), prints the coloured tokens and
the top tokens, and writes HTML / PNG / JSON on request. Without ``--model`` the bundled
SmolLM2-135M-Instruct is used (:func:`atman_kernels.models.load_smollm2`). Nothing is
downloaded: models load from local folders or GGUF files only.

Bad input (empty prompt or target, a target that tokenises to nothing, an unsupported model
class, an unreadable model path) exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


class UsageError(Exception):
    """A problem with the command line or its inputs: reported without a traceback."""


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
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 1, got {text!r}")
    return value


def _factor(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (value >= 0.0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices like 0,1,5, got {text!r}") from None


def _explain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True,
                   help="the input text (causal LM: the prompt; classifier: the text to classify)")
    p.add_argument("--target", required=True,
                   help="causal LM: the continuation to explain (e.g. ' Paris'); classifier: a "
                        "label name or class index")
    p.add_argument("--model", default=None,
                   help="a local model folder (from_pretrained) or a .gguf file; default: the "
                        "bundled SmolLM2-135M-Instruct")
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
    p.add_argument("--conceptual-threshold", type=_threshold, default=0.7,
                   help="cosine threshold kappa in [0, 1] for conceptual suppression, or 'none' "
                        "to suppress single tokens only (default 0.7)")
    p.add_argument("--batch-size", type=_batch_size, default="auto",
                   help="variants per forward: 'auto' (from free memory, default) or an integer")
    p.add_argument("--max-memory-mb", type=int, default=None,
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
    p.add_argument("--top", type=int, default=5, help="how many top tokens to list (default 5)")
    p.add_argument("--html", type=Path, default=None, help="write a self-contained HTML page")
    p.add_argument("--png", type=Path, default=None, help="write a PNG heatmap")
    p.add_argument("--json", type=Path, default=None,
                   help="write the explanation as JSON (Explanation.from_json reads it back)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-color", action="store_true",
                   help="print scores as text instead of ANSI colours")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no printed explanation (files are still written)")
    p.add_argument("--debug", action="store_true",
                   help="show full tracebacks instead of one-line errors")


def build_parser() -> argparse.ArgumentParser:
    """The ``atman`` argument parser (sub-command ``explain``)."""
    explain_parser = argparse.ArgumentParser(
        prog="atman explain", add_help=False,
        description="Explain a prediction with AtMan (attention suppression).")
    _explain_arguments(explain_parser)
    parser = argparse.ArgumentParser(
        prog="atman",
        description="AtMan explanations of transformer predictions (atman_kernels).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="options of 'atman explain':\n\n" + explain_parser.format_help()
        + "\nexample:\n  atman explain --prompt 'The capital of France is' --target ' Paris' "
          "--html paris.html",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    exp = sub.add_parser("explain", help="explain why the model predicts --target",
                         description=explain_parser.description)
    _explain_arguments(exp)
    return parser


# --------------------------------------------------------------------------- model loading
def load_model(path: str | None, dtype_name: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer) from a folder, a .gguf file, or the bundled SmolLM2 (``None``)."""
    import torch

    dtype = getattr(torch, dtype_name)
    if path is None:
        from .models import load_smollm2

        return load_smollm2(dtype=dtype)
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
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), dtype=dtype, **kw)
            return model, tokenizer
        config = AutoConfig.from_pretrained(str(p), local_files_only=True)
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if cls is None:
            cls = AutoModelForCausalLM
        model = cls.from_pretrained(str(p), dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        return model, tokenizer
    except UsageError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"cannot read model path {path!r}: {exc}") from exc


def _target_for(kind: str, text: str) -> Any:
    if kind != "causal_lm" and text.strip().lstrip("-").isdigit():
        return int(text)
    return text


# ----------------------------------------------------------------------------------- main
def run_explain(args: argparse.Namespace) -> int:
    import torch

    from .explain import AtManExplainer
    from .explain.explainer import model_kind

    if args.prompt == "":
        raise UsageError("--prompt is empty: give the text to explain")
    if args.target == "":
        raise UsageError("--target is empty: give the continuation or label to explain")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, args.dtype)
    try:
        kind = model_kind(model)
    except TypeError as exc:
        raise UsageError(str(exc)) from exc
    max_memory = None if args.max_memory_mb is None else args.max_memory_mb * 2**20
    explainer = AtManExplainer(
        model, tokenizer, factor=args.factor, conceptual_threshold=args.conceptual_threshold,
        mode=args.mode, batch_size=args.batch_size, max_memory=max_memory,
        prefix_reuse=not args.no_prefix_reuse, progress=not args.quiet, layers=args.layers,
        postprocess=args.postprocess, normalize=args.normalize, backend=args.backend,
    )
    start = time.perf_counter()
    try:
        expl = explainer.explain(args.prompt, _target_for(kind, args.target))
    except (ValueError, NotImplementedError) as exc:  # bad input / model, named by the callee
        raise UsageError(str(exc)) from exc
    seconds = time.perf_counter() - start
    if args.json is not None:
        expl.to_json(args.json)
    if args.html is not None:
        expl.to_html(args.html)
    if args.png is not None:
        expl.save_png(args.png)
    if not args.quiet:
        color = not args.no_color and sys.stdout.isatty() and "NO_COLOR" not in os.environ
        print(f"AtMan explanation of target {expl.target!r} ({type(model).__name__}, "
              f"{len(expl.tokens)} positions, {seconds:.2f} s)")
        print(expl.to_terminal(color=color))
        print(f"top {min(args.top, len(expl.tokens))} tokens (positive = supports the target):")
        for rank, (idx, tok, score) in enumerate(expl.top(args.top), start=1):
            print(f"  {rank:2d}. {tok!r:<24} position {expl.positions[idx]:4d}  {score:+.5f}")
        for label, path in (("json", args.json), ("html", args.html), ("png", args.png)):
            if path is not None:
                print(f"wrote {label}: {path}")
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
