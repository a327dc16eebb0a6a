"""The classifier front ends: sequence classifiers (a text, ids or a tokenizer output) and
image classifiers (pixel values; the patch tokens are the units), for a target class and an
optional foil class (:class:`..tasks.ClassificationTask`).

Image models whose patch sequence is found (:func:`image_units`): ViT-style
``embeddings.patch_embeddings`` (ViT, DeiT, BEiT, ...), CLIP-style ``embeddings.patch_embedding``
convolutions in a ``vision_model`` tower (CLIP, MetaCLIP 2: a class token first; SigLIP: none),
and SigLIP 2's pre-patchified pixels (``pixel_values`` [1, P, C*p*p] with
``pixel_attention_mask`` and ``spatial_shapes``; padding patches are neither explained nor
suppressed). Swin (shifted-window attention over stages): the final stage's cells are the
units (:mod:`.swin`). The zero-shot front end (:mod:`.zero_shot`) reads images the same way."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..tasks import ClassificationTask
from ..units import Span, token_spans
from .base import FrontEnd, Prepared, unit_settings
from .swin import WindowedClassificationTask, swin_stages, swin_units


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

    def _vision_root(self) -> Any:
        """The sub-model suppression is switched into for image models (a CLIP-style
        ``vision_model`` tower), or None for the whole model."""
        return vision_tower(self.model)

    def _prepare_image(self, inputs: Any, target: Any, unit_args: dict[str, Any],
                       contrast: Any = None) -> Prepared:
        labels, class_fields, class_settings = self._classes(target, contrast)
        check_patch_units(unit_args, "image classifiers")
        if swin_stages(self.model) is not None:
            return self._prepare_swin(inputs, labels, class_fields, class_settings)
        image = image_units(self.model, inputs, conceptual=self.conceptual_threshold is not None)
        task = ClassificationTask(self.model, image.model_inputs, image.seq_len, labels)
        return Prepared(
            task=task, units=image.units, embeddings=image.embeddings,
            contrast_rows=len(labels) - 1,
            settings={**class_settings, "granularity": "patch"},
            fields={"kind": "image", "token_ids": None, "patch_grid": image.grid,
                    "image": image.picture, **class_fields},
        )

    def _prepare_swin(self, inputs: Any, labels: list[int], class_fields: dict[str, Any],
                      class_settings: dict[str, Any]) -> Prepared:
        """Swin: the units are the final stage's cells (:mod:`.swin`)."""
        name = type(self.model).__name__
        if self.conceptual_threshold is not None:
            raise ValueError(
                f"conceptual suppression is not defined for {name}: its units are final-stage "
                "cells, which have no layer-0 embedding to compare; use "
                "conceptual_threshold=None")
        if getattr(self, "layers", None) is not None:
            raise ValueError(
                f"layers= is not supported for {name}: its attention modules are the blocks "
                "of its stages, which layer indices do not name one to one; use layers=None")
        pixels = _pixel_values(self.model, inputs)
        config = self.model.base_model.config
        size = getattr(config, "image_size", None)
        size = (size, size) if isinstance(size, int) else size
        if (getattr(config, "use_absolute_embeddings", False)
                and isinstance(size, (tuple, list)) and tuple(pixels.shape[-2:]) != tuple(size)):
            raise ValueError(
                f"pixel values are {pixels.shape[-2]}x{pixels.shape[-1]}, {name}'s absolute "
                f"position embeddings are for {size[0]}x{size[1]} images (config image_size): "
                "resize the image to that size (interpolated position embeddings are not "
                "supported)")
        param = next(self.model.parameters())
        pixels = pixels.to(device=param.device, dtype=param.dtype)
        image = swin_units(self.model, pixels)
        task = WindowedClassificationTask(self.model, image.model_inputs, len(image.units),
                                          labels, layouts=image.layouts)
        return Prepared(
            task=task, units=image.units, contrast_rows=len(labels) - 1,
            settings={**class_settings, "granularity": "cell",
                      "cell_pixels": list(image.cell_pixels)},
            fields={"kind": "image", "token_ids": None, "patch_grid": image.grid,
                    "image": image.picture, **class_fields},
        )


def _pixel_values(model: Any, inputs: Any) -> torch.Tensor:
    """Pixel values [1, C, H, W] of an image classifier that takes only ``pixel_values``."""
    name = type(model).__name__
    data = dict(inputs.items()) if hasattr(inputs, "keys") else {"pixel_values": inputs}
    extra = sorted(str(k) for k in data if k != "pixel_values")
    if extra:
        raise ValueError(f"{name} takes only 'pixel_values' as image input, got also {extra}")
    return _one_picture(_float_pixels(data), name, getattr(model.config, "num_channels", None))


def _float_pixels(data: dict[str, Any]) -> torch.Tensor:
    """``data["pixel_values"]``, refused unless a float tensor."""
    pixels = data.get("pixel_values")
    if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point():
        raise TypeError("image inputs must be a float tensor of pixel values [1, 3, H, W] "
                        "or a dict with 'pixel_values'")
    return pixels


def _one_picture(pixels: torch.Tensor, name: str, channels: Any) -> torch.Tensor:
    """Pixel values [1, C, H, W] (a [C, H, W] picture gets its batch dimension), refused
    for another batch or rank, or another number of channels than ``channels``."""
    if pixels.dim() == 3:
        pixels = pixels[None]
    if pixels.dim() != 4 or pixels.shape[0] != 1:
        raise ValueError(f"pixel values must have shape [1, C, H, W] or [C, H, W], got "
                         f"{tuple(pixels.shape)}")
    if isinstance(channels, int) and pixels.shape[1] != channels:
        raise ValueError(f"pixel values have {pixels.shape[1]} channels, {name} takes "
                         f"{channels} ([1, C, H, W])")
    return pixels


# Image classifiers refused by class name, with the reason (raised when the explainer is built).
# None at present: Swin is explained per final-stage cell (.swin); Swinv2, DonutSwin and
# MaskFormerSwin compute their attention by hand (no attention interface) and are refused by
# atman_kernels.hf.check_supported, naming the class.
IMAGE_REFUSED: dict[str, str] = {}


def vision_tower(model: Any) -> Any:
    """``model.vision_model`` when it is a transformers sub-model (CLIP, SigLIP, MetaCLIP 2),
    else None (ViT-style classifiers: the model itself is the tower)."""
    from transformers import PreTrainedModel

    tower = getattr(model, "vision_model", None)
    return tower if isinstance(tower, PreTrainedModel) else None


def check_patch_units(unit_args: dict[str, Any], what: str) -> None:
    if (unit_args["granularity"] != "token" or unit_args["delimiter"] is not None
            or unit_args["spans"] is not None):
        raise ValueError(f"{what} explain patches: granularity, delimiter and spans apply to "
                         "text prompts only")


@dataclass
class ImageUnits:
    """An image's model inputs (batch 1), its patch units and grid, and what is shown."""

    model_inputs: dict[str, torch.Tensor]
    units: list[Span]
    grid: tuple[int, int]
    seq_len: int
    embeddings: torch.Tensor | None  # [seq_len, D] patch embeddings (conceptual suppression)
    picture: torch.Tensor  # [C, H, W] float, for rendering


PIXEL_KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


def image_units(model: Any, inputs: Any, *, conceptual: bool) -> ImageUnits:
    """The patch units of one image for ``model`` (an image classifier or the vision side of a
    CLIP-style model).

    ``inputs``: pixel values [1, C, H, W] / [C, H, W], or a dict with "pixel_values" (SigLIP 2:
    also "pixel_attention_mask" [1, P] and "spatial_shapes" [1, 2]). The image must have the
    size the model's position embeddings were made for (``image_size`` of its vision config;
    the model's image processor resizes to it): interpolated position embeddings are not used.
    """
    name = type(model).__name__
    data = dict(inputs.items()) if hasattr(inputs, "keys") else {"pixel_values": inputs}
    extra = sorted(str(k) for k in data if k not in PIXEL_KEYS)
    if extra:
        raise ValueError(f"image inputs take {PIXEL_KEYS[0]!r} (SigLIP 2 also "
                         f"{PIXEL_KEYS[1]!r}, {PIXEL_KEYS[2]!r}), got also {extra}")
    pixels = _float_pixels(data)
    tower = vision_tower(model)
    root = tower if tower is not None else model.base_model
    config = root.config
    embeddings_module = getattr(root, "embeddings", None)
    param = next(model.parameters())
    vit_patches = getattr(embeddings_module, "patch_embeddings", None)
    conv = getattr(embeddings_module, "patch_embedding", None)
    if isinstance(conv, torch.nn.Linear):  # SigLIP 2: pixels already cut into patches
        return _patchified_units(model, data, conv, embeddings_module, param, conceptual)
    if data.get("pixel_attention_mask") is not None or data.get("spatial_shapes") is not None:
        raise ValueError(f"{name} takes only 'pixel_values' (pixel_attention_mask and "
                         "spatial_shapes are SigLIP 2 inputs)")
    pixels = _one_picture(pixels, name, getattr(config, "num_channels", None))
    size = getattr(config, "image_size", None)
    if isinstance(size, int):
        size = (size, size)
    if isinstance(size, (tuple, list)) and tuple(pixels.shape[-2:]) != tuple(size):
        raise ValueError(
            f"pixel values are {pixels.shape[-2]}x{pixels.shape[-1]}, {name}'s position "
            f"embeddings are for {size[0]}x{size[1]} images (config image_size): resize the "
            "image to that size (the model's image processor does); interpolated position "
            "embeddings are not supported")
    pixels = pixels.to(device=param.device, dtype=param.dtype)
    if isinstance(vit_patches, torch.nn.Module):
        patches = vit_patches(pixels)  # [1, n_patches, hidden]
        if not isinstance(patches, torch.Tensor):
            raise TypeError(
                f"unsupported model class {name}: its patch embedding returns more than the "
                "patch sequence (hierarchical vision models attend within windows whose keys "
                "are not the image's patch sequence the factors index)")
        n_patches = patches.shape[1]
        patch = getattr(config, "patch_size", None)
        if isinstance(patch, (tuple, list)):
            grid = (pixels.shape[-2] // patch[0], pixels.shape[-1] // patch[1])
        elif patch:
            grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
        else:
            grid = (1, n_patches)
        if grid[0] * grid[1] != n_patches:
            grid = (1, n_patches)
        patches = patches[0]
    elif isinstance(conv, torch.nn.Conv2d):
        maps = conv(pixels)  # [1, hidden, rows, cols]
        grid = (int(maps.shape[-2]), int(maps.shape[-1]))
        patches = maps.flatten(2).transpose(1, 2)[0]
        n_patches = patches.shape[0]
    else:
        raise TypeError(f"unsupported model class {name}: image models need ViT-style "
                        "embeddings.patch_embeddings or a CLIP-style vision_model whose "
                        "embeddings have a patch_embedding convolution")
    embedded = embeddings_module(pixels)
    if not isinstance(embedded, torch.Tensor) or embedded.dim() != 3:
        raise TypeError(f"unsupported model class {name}: its embeddings return more than "
                        "the token sequence")
    seq_len = int(embedded.shape[1])
    n_prefix = seq_len - n_patches  # class / distillation tokens before the patches
    if n_prefix < 0:
        raise TypeError(f"unsupported model class {name}: its embeddings hold fewer tokens "
                        f"({seq_len}) than patches ({n_patches})")
    embeddings = None
    if conceptual:
        embeddings = torch.zeros(seq_len, patches.shape[-1], device=patches.device,
                                 dtype=patches.dtype)
        embeddings[n_prefix:] = patches
    return ImageUnits(
        model_inputs={"pixel_values": pixels}, units=_patch_spans(grid, n_prefix),
        grid=grid, seq_len=seq_len, embeddings=embeddings,
        picture=pixels[0].detach().float().cpu())


def _patch_spans(grid: tuple[int, int], first: int) -> list[Span]:
    n = grid[0] * grid[1]
    return token_spans([f"patch({i // grid[1]},{i % grid[1]})" for i in range(n)],
                       list(range(first, first + n)), source="image")


def _patchified_units(model: Any, data: dict[str, Any], linear: torch.nn.Linear,
                      embeddings_module: Any, param: torch.Tensor, conceptual: bool
                      ) -> ImageUnits:
    """SigLIP 2: pixel values [1, P, p*p*C] already cut into patches (row-major over the
    image's ``spatial_shapes`` grid, then padding patches where ``pixel_attention_mask`` is 0)."""
    name = type(model).__name__
    pixels, mask, shapes = (data.get(k) for k in PIXEL_KEYS)
    if pixels.dim() == 2:
        pixels = pixels[None]
    if pixels.dim() != 3 or pixels.shape[0] != 1 or pixels.shape[-1] != linear.in_features:
        raise ValueError(f"{name} takes pixel values [1, P, {linear.in_features}] (patches of "
                         f"C*p*p values), got {tuple(pixels.shape)}")
    n = pixels.shape[1]
    if not isinstance(shapes, torch.Tensor) or shapes.numel() != 2:
        raise ValueError(f"{name} takes pre-patchified pixel values with 'spatial_shapes' "
                         "[1, 2] (patch rows and columns) and 'pixel_attention_mask' [1, P]: "
                         "its image processor's output")
    rows, cols = (int(v) for v in shapes.reshape(-1).tolist())
    if rows < 1 or cols < 1 or rows * cols > n:
        raise ValueError(f"spatial_shapes {rows}x{cols} does not fit the {n} patches given")
    if mask is None:
        mask = torch.ones(1, n, dtype=torch.long)
    mask = torch.as_tensor(mask).reshape(1, -1)
    expected = torch.zeros(n, dtype=torch.bool)
    expected[:rows * cols] = True
    if mask.shape[1] != n or not torch.equal(mask[0].bool().cpu(), expected):
        raise ValueError(f"pixel_attention_mask must mark the first {rows}x{cols} = "
                         f"{rows * cols} of the {n} patches (the image's, row-major) and no "
                         "other (padding last), as the image processor makes it")
    device = param.device
    pixels = pixels.to(device=device, dtype=param.dtype)
    inputs = {"pixel_values": pixels, "pixel_attention_mask": mask.to(device),
              "spatial_shapes": torch.tensor([[rows, cols]], dtype=torch.long, device=device)}
    embedded = embeddings_module(pixels, inputs["spatial_shapes"])
    if not isinstance(embedded, torch.Tensor) or embedded.shape[1] != n:
        raise TypeError(f"unsupported model class {name}: its embeddings do not return one "
                        "token per patch")
    embeddings = None
    if conceptual:
        embeddings = linear(pixels)[0].clone()
        embeddings[rows * cols:] = 0
    patch = int(embeddings_module.patch_size)
    c = linear.in_features // (patch * patch)
    picture = (pixels[0, :rows * cols].detach().float().cpu()
               .reshape(rows, cols, patch, patch, c).permute(4, 0, 2, 1, 3)
               .reshape(c, rows * patch, cols * patch))
    return ImageUnits(model_inputs=inputs, units=_patch_spans((rows, cols), 0),
                      grid=(rows, cols), seq_len=n, embeddings=embeddings, picture=picture)


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
