"""One explanation: ``atman explain --prompt ...`` (causal LM, sequence classifier, chat,
vision-language model with ``--image``) or ``atman explain --image ...`` alone (image
classifier, zero-shot image-text model), printed and written to --json / --html / --png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from . import loading
from .args import UsageError, _check_chat, _max_new_tokens, _unit_flags
from .explainer import _explainer, _model_kind, _model_name, _setup, _target_for

PICTURE_KINDS = ("image", "zero_shot")


def run_explain(args: argparse.Namespace) -> int:
    """One prompt or picture explained: printed (unless --quiet) and written to the --json /
    --html / --png files asked for."""
    from ..explain import save_png, to_html, to_terminal
    from ..explain.render import headline

    config = loading.folder_config(args.model)
    archs = getattr(config, "architectures", None) or []
    early_kind = loading.class_kind(archs[0] if archs else None)
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
        design = expl.settings.get("design", "single")
        print(f"AtMan: {headline(expl)}{made} [{_model_name(model)}, "
              f"{len(expl.spans)} {expl.settings.get('granularity', 'token')} units, "
              f"{design} design, {expl.settings.get('forwards')} forwards, {seconds:.2f} s]")
        if expl.tree:
            print(f"levels: {' > '.join(expl.levels)}; "
                  f"{expl.settings.get('unrefined_groups', 0)} groups not refined within "
                  f"the budget of {expl.settings.get('budget')} (their members have no "
                  "scores of their own)")
        if expl.estimate is not None:
            print(f"scores are surrogate estimates ({expl.estimate['method']} over "
                  f"{expl.estimate.get('masks')} random joint suppressions; held-out fit "
                  f"LDS {expl.estimate.get('lds', float('nan')):.2f})")
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
        if args.cite is not None:
            _print_citations(expl, args.cite)
        for label, path in (("json", args.json), ("html", args.html), ("png", args.png)):
            if path is not None:
                print(f"wrote {label}: {path}")
    return 0


def _read_prompt(args: argparse.Namespace) -> str:
    """The prompt from --prompt, standard input (--prompt -) or --prompt-file, checked."""
    if (args.prompt is None) == (args.prompt_file is None):
        raise UsageError("give the input text with exactly one of --prompt TEXT, --prompt - "
                         "(standard input) or --prompt-file PATH, or many examples with "
                         "--input JSONL --output JSONL")
    if args.prompt_file is not None:
        return _read_text(args.prompt_file, f"--prompt-file {args.prompt_file}")
    if args.prompt == "-":
        return _checked_text(sys.stdin.buffer.read(), "--prompt - (standard input)")
    return _checked_text(args.prompt, "--prompt")


def _read_text(path: Any, source: str) -> str:
    """A UTF-8 text file's contents, checked (non-empty, valid text)."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from exc
    return _checked_text(text, source)


def _checked_text(text: str | bytes, source: str) -> str:
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


def _print_citations(expl: Any, k: int) -> None:
    """Each answer sentence with the ``k`` units it rests on most."""
    try:
        citations = expl.citations(k)
    except ValueError as exc:  # no answer text, nothing to cite
        print(f"citations: {exc}")
        return
    print(f"citations (top {k} units per answer sentence; score = rise of that sentence's "
          "cross-entropy in nats):")
    for c in citations:
        print(f"  {_short(c.text, 60)!r}")
        for i, score in c.units:
            print(f"      {_short(expl.spans[i].text, 56)!r:<60} {score:+.5f}")


def _short(text: str, limit: int = 40) -> str:
    """One line of at most ``limit`` characters (long sentences are cut in the middle)."""
    text = " ".join(text.split())
    half = limit // 2 - 2
    return text if len(text) <= limit else text[:half] + " .. " + text[-half:]


def _image_inputs(args: argparse.Namespace) -> tuple[list[Any], Any]:
    """(pictures, processor) for --image, checked before the model's weights load: the
    pictures readable, the model folder a vision-language model's with its processor, one
    image placeholder in the prompt per picture. ([], None) without --image."""
    from ..explain.explainer import IMAGE_TEXT_FAMILIES
    from ..explain.front.image_text import CAUSAL_IMAGE_TEXT_FAMILIES

    image_text = {**IMAGE_TEXT_FAMILIES, **CAUSAL_IMAGE_TEXT_FAMILIES}

    if not args.image:
        if args.image_region is not None:
            raise UsageError("--image-region needs --image (a picture for a vision-language "
                             "model)")
        return [], None
    families = (f"a vision-language model ({', '.join(sorted(image_text))}), an "
                "image classifier (*ForImageClassification) or a zero-shot image-text model "
                f"({', '.join(_zero_shot_families())})")
    if args.model is None:
        raise UsageError(f"--image needs {families} folder given with --model; the bundled "
                         "SmolLM2 is a text-only model")
    images = loading.read_images(args.image)
    name = loading.model_class_name(args.model)
    if name not in image_text:
        what = f"{name} is a text-only model" if name else "it names no model class"
        raise UsageError(f"--image needs {families}, but --model {args.model}: {what}")
    processor = loading.load_processor(args.model)
    # what a prompt marks a picture with (Gemma 3: the begin-of-image token, which its
    # processor expands into the image's soft tokens)
    placeholder = (getattr(processor, "boi_token", None) or getattr(processor, "image_token", None)
                   or "<image>")
    found = args.prompt.count(placeholder)
    if found != len(images):
        raise UsageError(f"the prompt holds {found} image placeholder(s) {placeholder!r} but "
                         f"{len(images)} --image were given: put {placeholder} where each "
                         f"picture goes, e.g. --prompt '{placeholder} What is this?'")
    return images, processor


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
    model, tokenizer = loading.load_model(args.model, args.dtype, processor=processor,
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
               "chat": args.chat, "design": args.design, "budget": args.budget}
    if args.context_file is not None:
        options["context"] = _read_text(args.context_file, f"--context-file {args.context_file}")
        if args.template is not None:
            options["template"] = args.template.replace("\\n", "\n")
    return model, tokenizer, inputs, target, contrast, options


# ------------------------------------------------------- image classifiers, zero-shot models
def _zero_shot_families() -> list[str]:
    from ..explain.front.zero_shot import ZERO_SHOT_FAMILIES

    return list(ZERO_SHOT_FAMILIES)


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
    (picture,) = loading.read_images(args.image)
    if kind == "zero_shot":
        processor = loading.load_processor(args.model, "a zero-shot image-text model folder")
        if getattr(processor, "tokenizer", None) is None:
            raise UsageError(f"{args.model!r} holds no tokenizer: a zero-shot model folder "
                             "needs its processor (image processor and tokenizer) saved with "
                             "it, to read the --labels")
        model, _ = loading.load_model(args.model, args.dtype, processor=processor)
        return model, processor, (picture, labels), target, contrast
    image_processor = loading.load_image_processor(args.model)
    try:
        out = image_processor(images=picture, return_tensors="pt")
    except (ValueError, TypeError, OSError) as exc:
        raise UsageError(f"cannot prepare --image {args.image[0]} with the image processor of "
                         f"{args.model!r}: {exc}") from exc
    from ..explain.front.classify import PIXEL_KEYS

    pixels = {k: out[k] for k in PIXEL_KEYS if out.get(k) is not None}
    model, _ = loading.load_model(args.model, args.dtype, processor=image_processor)
    return model, None, pixels, target, contrast

