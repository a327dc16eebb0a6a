"""Reading what ``--model`` and ``--image`` name: a folder's config and model class, the
model and its tokenizer or processor, pictures. Every failure is a :class:`UsageError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .args import UsageError


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
    from ..explain.explainer import kind_of_class_name

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
        from ..models import load_smollm2

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

