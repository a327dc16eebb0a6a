"""What one prompt and ``--input`` share around the model: the settings applied before it
loads, its kind, the explainer the flags ask for, targets read for a model kind, and the
name printed for the model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .args import UsageError, _check_backend, _check_outputs


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
    from ..explain.explainer import model_kind

    try:
        return model_kind(model)
    except TypeError as exc:
        raise UsageError(str(exc)) from exc


def _explainer(args: argparse.Namespace, model: Any, tokenizer: Any) -> Any:
    from ..explain import AtManExplainer

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


def _target_for(kind: str, text: str) -> Any:
    if kind in ("classifier", "image") and text.strip().lstrip("-").isdigit():
        return int(text)
    return text


def _model_name(model: Any) -> str:
    """The model's own name (its folder or hub id) where known, else its class."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return Path(name).name or type(model).__name__ if name else type(model).__name__

