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
already holds, and a second run on an ``--output`` another run is writing is refused at once
(an OS lock on the file, held for the run). Chat models: ``--chat`` applies the tokenizer's
chat template to the prompt (the user's message) and explains the message only.

Bad input (empty prompt or target, a target that tokenises to nothing, an unsupported model
class, an unreadable model path, an unreadable picture, pictures for a text-only model, a
prompt without the image placeholders, a target that is not one of the model's labels or of the
--labels, a bad --input line, flags that do not go together)
exits with status 2 and a one-line message, before the model's weights load where it can be
known by then, and before any output is written.
"""

from __future__ import annotations

from .args import INPUT_FORMAT, UsageError, build_parser
from .many import run_explain_many
from .single import run_explain

__all__ = ["INPUT_FORMAT", "UsageError", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``atman`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "explain":
            if args.input is not None or args.output is not None:
                return run_explain_many(args)
            return run_explain(args)
    except UsageError as exc:
        if getattr(args, "debug", False):
            raise
        parser.exit(2, f"atman: error: {exc}\n")
    parser.error(f"unknown command {args.command!r}")
    return 2

