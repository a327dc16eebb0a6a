"""The classifier front ends: sequence classifiers (a text, ids or a tokenizer output) and
ViT-style image classifiers (pixel values; the patch tokens are the units), for a target class
and an optional foil class (:class:`..tasks.ClassificationTask`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..tasks import ClassificationTask
from ..units import token_spans
from .base import FrontEnd, Prepared, unit_settings


class ClassifierFrontEnd(FrontEnd):
    """Sequence classifiers and image classifiers."""

    conceptual_threshold: float | None

    def _class_index(self, target: Any, name: str = "target") -> int:
        config = self.model.config
        n_labels = int(getattr(config, "num_labels", 0) or 0)
        if isinstance(target, str):
            label2id = getattr(config, "label2id", None) or {}
            if target not in label2id:
                raise ValueError(f"{name} label {target!r} is not one of the model's labels "
                                 f"{sorted(label2id)}")
            return int(label2id[target])
        if isinstance(target, torch.Tensor) and target.numel() == 1:
            target = int(target.item())
        if isinstance(target, bool) or not isinstance(target, int):
            raise TypeError(f"{name} must be a class index or label name, got "
                            f"{type(target).__name__}")
        if not 0 <= target < n_labels:
            raise ValueError(f"{name} class {target} is out of range [0, {n_labels})")
        return target

    def _label(self, index: int) -> str:
        id2label = getattr(self.model.config, "id2label", None) or {}
        return str(id2label.get(index, index))

    def _classes(self, target: Any, contrast: Any) -> tuple[list[int], dict[str, Any],
                                                           dict[str, Any]]:
        """(class rows, Explanation fields, settings) of a target class and a foil class."""
        cls = self._class_index(target)
        labels, fields = [cls], {"target_tokens": [self._label(cls)]}
        settings = {"target": self._label(cls), "target_index": cls}
        if contrast is not None:
            foil = self._class_index(contrast, "contrast")
            labels.append(foil)
            fields["contrast_tokens"] = [self._label(foil)]
            settings.update(contrast=self._label(foil), contrast_index=foil)
        return labels, fields, settings

    def _prepare_classifier(self, inputs: Any, target: Any, unit_args: dict[str, Any],
                            contrast: Any = None) -> Prepared:
        labels, class_fields, class_settings = self._classes(target, contrast)
        ids_list, units, prompt_text, enc = self._prompt_units(inputs, "inputs", unit_args)
        if not units:
            raise ValueError("inputs hold only special tokens: nothing to explain")
        self._check_length(len(ids_list))
        device = self._device
        ids = torch.tensor(ids_list, dtype=torch.long, device=device)
        model_inputs = {"input_ids": ids[None]}
        types = enc.get("token_type_ids")
        if types is None and hasattr(inputs, "keys") and inputs.get("token_type_ids") is not None:
            types = torch.as_tensor(inputs["token_type_ids"]).reshape(-1).tolist()
        if types is not None:
            model_inputs["token_type_ids"] = torch.tensor(types, device=device)[None]
        pad_settings = {}
        if _pad_token_id(self.model) is None:
            # no pad id: the model pools the last position of a batch of 1 and refuses larger
            # batches. An id absent from the input pools that same position in a batch (the
            # rightmost token that is not padding is the last one), so the variants batch.
            pad = next(i for i in range(len(ids_list) + 1) if i not in set(ids_list))
            task = _UnpaddedClassificationTask(self.model, model_inputs, len(ids_list), labels,
                                               pad_id=pad)
            pad_settings = {"pooled_position": len(ids_list) - 1}
        else:
            task = ClassificationTask(self.model, model_inputs, len(ids_list), labels)
        return Prepared(
            task=task, units=units, input_ids=ids, embed=True, contrast_rows=len(labels) - 1,
            fields={"kind": "classifier", "token_ids": ids_list, "prompt": prompt_text,
                    **class_fields},
            settings={**class_settings, **unit_settings(unit_args), **pad_settings},
        )

    def _prepare_image(self, inputs: Any, target: Any, unit_args: dict[str, Any],
                       contrast: Any = None) -> Prepared:
        labels, class_fields, class_settings = self._classes(target, contrast)
        if (unit_args["granularity"] != "token" or unit_args["delimiter"] is not None
                or unit_args["spans"] is not None):
            raise ValueError("image classifiers explain patches: granularity, delimiter and "
                             "spans apply to text prompts only")
        pixels = inputs["pixel_values"] if hasattr(inputs, "keys") else inputs
        if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point():
            raise TypeError("image inputs must be a float tensor of pixel values [1, 3, H, W] "
                            "or a dict with 'pixel_values'")
        if pixels.dim() == 3:
            pixels = pixels[None]
        if pixels.dim() != 4 or pixels.shape[0] != 1:
            raise ValueError(f"pixel values must have shape [1, C, H, W] or [C, H, W], got "
                             f"{tuple(pixels.shape)}")
        param = next(self.model.parameters())
        pixels = pixels.to(device=param.device, dtype=param.dtype)
        embeddings_module = getattr(self.model.base_model, "embeddings", None)
        patch_module = getattr(embeddings_module, "patch_embeddings", None)
        if patch_module is None:
            raise TypeError(f"unsupported model class {type(self.model).__name__}: image models "
                            "need ViT-style base_model.embeddings.patch_embeddings")
        patches = patch_module(pixels)  # [1, n_patches, hidden]
        embedded = embeddings_module(pixels)
        if not isinstance(patches, torch.Tensor) or not isinstance(embedded, torch.Tensor):
            raise TypeError(
                f"unsupported model class {type(self.model).__name__}: its patch embedding "
                "returns more than the patch sequence (hierarchical vision models such as "
                "Swin attend within shifting windows, whose keys are not the image's patch "
                "sequence the factors index)")
        seq_len = embedded.shape[1]
        n_patches = patches.shape[1]
        n_prefix = seq_len - n_patches
        patch = getattr(self.model.config, "patch_size", None)
        if isinstance(patch, (tuple, list)):
            grid = (pixels.shape[-2] // patch[0], pixels.shape[-1] // patch[1])
        elif patch:
            grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
        else:
            grid = (1, n_patches)
        if grid[0] * grid[1] != n_patches or n_prefix < 0:
            grid = (1, n_patches)
        embeddings = None
        if self.conceptual_threshold is not None:
            embeddings = torch.zeros(seq_len, patches.shape[-1], device=patches.device,
                                     dtype=patches.dtype)
            embeddings[n_prefix:] = patches[0]
        units = token_spans([f"patch({i // grid[1]},{i % grid[1]})" for i in range(n_patches)],
                            list(range(n_prefix, seq_len)), source="image")
        task = ClassificationTask(self.model, {"pixel_values": pixels}, seq_len, labels)
        return Prepared(
            task=task, units=units, embeddings=embeddings, contrast_rows=len(labels) - 1,
            settings={**class_settings, "granularity": "patch"},
            fields={"kind": "image", "token_ids": None, "patch_grid": grid,
                    "image": pixels[0].detach().float().cpu(), **class_fields},
        )


def _text_configs(model: Any) -> list[Any]:
    """The model's config and its text config (one object for most models)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


def _pad_token_id(model: Any) -> int | None:
    """The pad id the classifier's pooling reads (``get_text_config().pad_token_id``)."""
    return getattr(_text_configs(model)[-1], "pad_token_id", None)


@contextmanager
def _pad_id_set(model: Any, pad_id: int) -> Iterator[None]:
    """``pad_token_id`` = ``pad_id`` on the model's config(s) inside the block, restored after
    (also on error)."""
    configs = _text_configs(model)
    previous = [getattr(c, "pad_token_id", None) for c in configs]
    try:
        for c in configs:
            c.pad_token_id = pad_id
        yield
    finally:
        for c, value in zip(configs, previous, strict=True):
            c.pad_token_id = value


class _UnpaddedClassificationTask(ClassificationTask):
    """A classifier without ``pad_token_id`` (Llama, GPT-2 and Qwen classifiers as often
    shipped): transformers pools the last position for one sequence but raises "Cannot handle
    batch sizes > 1" for a batch of variants. Every forward runs with ``pad_token_id`` set to
    ``pad_id``, an id the input does not hold, so the pooling finds no padding and reads the
    last position for every variant, as for the single sequence; the config is restored after
    each forward. The input has no padding (the explainer built it), so nothing else changes.
    """

    def __init__(self, model: Any, inputs: dict[str, torch.Tensor], seq_len: int,
                 labels: list[int], *, pad_id: int) -> None:
        super().__init__(model, inputs, seq_len, labels)
        self.pad_id = int(pad_id)

    def baseline(self) -> torch.Tensor:
        with _pad_id_set(self.model, self.pad_id):
            return super().baseline()

    def run(self, batch: int, start: int) -> torch.Tensor:
        with _pad_id_set(self.model, self.pad_id):
            return super().run(batch, start)
