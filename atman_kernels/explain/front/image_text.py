"""The vision-language front end (LLaVA, Idefics3 / SmolVLM, Qwen2-VL / Qwen2.5-VL, Gemma 3): the
processor's output or (text, images); every image token (or k x k region) and every text unit
of the prompt is a unit; each image unit's box in the original picture
(:mod:`..vision`); the target given or generated (:class:`..tasks.VisionLanguageTask`)."""

from __future__ import annotations

from typing import Any

import torch

from ..tasks import VisionLanguageTask
from ..units import Span, prompt_spans, token_spans
from .base import FrontEnd, Precheck, Prepared, answer_unit_options, unit_settings

# Vision-language models whose image-token layout is known (explain/vision.py), by class name.
IMAGE_TEXT_FAMILIES = {
    "LlavaForConditionalGeneration": "llava",
    "Idefics3ForConditionalGeneration": "idefics3",
    "SmolVLMForConditionalGeneration": "idefics3",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_vl",
}
# Causal LMs that also take images (transformers lists them among its causal LMs): explained as
# causal LMs on text, and through this front end when the inputs hold images. Gemma 3 puts each
# image in as one run of mm_tokens_per_image soft tokens: the vision tower's patch grid
# average-pooled to a square of cells, flattened row-major (Gemma3MultiModalProjector), i.e.
# the "llava" layout; its image tokens see each other bidirectionally (token_type_ids). Its
# processor's pan-and-scan crops (do_pan_and_scan, off by default) would come as further runs,
# each explained as an image of its own.
CAUSAL_IMAGE_TEXT_FAMILIES = {
    "Gemma3ForConditionalGeneration": "llava",
}
# Models whose image tokens must be marked in a per-token input (1 at image tokens, as their
# processor makes it): the language model's mask makes each image's tokens bidirectional.
_IMAGE_TOKEN_TYPES = {
    "Gemma3ForConditionalGeneration": "token_type_ids",
}


class ImageTextFrontEnd(FrontEnd):
    """Vision-language models of :data:`IMAGE_TEXT_FAMILIES`."""

    processor: Any
    prefix_reuse: bool

    def _image_text_inputs(self, inputs: Any) -> tuple[dict[str, Any], list[Any] | None]:
        """(processor output, the pictures or None) of ``inputs``."""
        images = None
        if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], str):
            if self.processor is None:
                raise ValueError("inputs=(text, images) needs the model's processor: "
                                 "AtManExplainer(model, processor)")
            text, images = inputs
            images = list(images) if isinstance(images, (list, tuple)) else [images]
            if not images:
                raise ValueError("inputs=(text, images) holds no image")
            inputs = self.processor(text=text, images=images, return_tensors="pt")
        if not hasattr(inputs, "keys") or "input_ids" not in inputs:
            raise TypeError("a vision-language model takes its processor's output (a dict with "
                            "input_ids and pixel_values) or (text, images) with the processor")
        data = dict(inputs.items())
        mask = data.pop("attention_mask", None)
        if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
            raise ValueError("inputs carry padding (attention_mask has zeros): explain one "
                             "unpadded example at a time")
        return data, images

    def _prepare_image_text(self, inputs: Any, target: Any, max_new_tokens: int,
                            unit_args: dict[str, Any], image_region: int | None,
                            precheck: Precheck | None = None) -> Prepared:
        from ..vision import image_views, picture_size, probe_boxes, region_cells

        data, images = self._image_text_inputs(inputs)
        prompt_ids = self._token_ids(data.pop("input_ids"), "input_ids",
                                     add_special_tokens=False)
        device, dtype = self._device, next(self.model.parameters()).dtype
        extra = {k: (v.to(device=device, dtype=dtype) if torch.is_tensor(v)
                     and v.is_floating_point() else v.to(device) if torch.is_tensor(v) else v)
                 for k, v in data.items() if v is not None}
        config = self.model.config
        image_token = getattr(config, "image_token_id", None)
        if image_token is None:
            image_token = getattr(config, "image_token_index", None)
        name = type(self.model).__name__
        family = IMAGE_TEXT_FAMILIES.get(name) or CAUSAL_IMAGE_TEXT_FAMILIES[name]
        grids = None
        if family == "qwen2_vl" and extra.get("image_grid_thw") is not None:
            merge = int(getattr(config.vision_config, "spatial_merge_size", 2))
            thw = extra["image_grid_thw"].tolist()
            if any(int(t) != 1 for t, _, _ in thw):
                raise NotImplementedError("image_grid_thw with more than one temporal patch "
                                          "(video) is not supported")
            grids = [(int(h) // merge, int(w) // merge) for _, h, w in thw]
        views = image_views(family, prompt_ids, int(image_token),
                            lambda t: self._token_strings([t])[0], grids)
        if "pixel_values" in extra and not views:
            raise ValueError("pixel_values are given but the prompt has no image token "
                             f"(id {image_token}): put the processor's image placeholder in "
                             "the text")
        if views and "pixel_values" not in extra:
            raise ValueError("the prompt has image tokens but no pixel_values were given")
        if name in _IMAGE_TOKEN_TYPES:
            _check_image_token_types(extra, _IMAGE_TOKEN_TYPES[name], prompt_ids,
                                     int(image_token), name)
        if images is not None:
            n_images = 1 + max(v.image for v in views) if views else 0
            if n_images != len(images):
                raise ValueError(f"the prompt has {n_images} images' tokens, {len(images)} "
                                 "images were given")
            for i, picture in enumerate(images):
                if family == "qwen2_vl":  # flattened patches, not frames: no boxes yet
                    break
                probe_boxes(self.processor.image_processor, picture_size(picture),
                            [v for v in views if v.image == i])
        # text units over the decoded prompt (image runs shown as a placeholder)
        image_positions = {p for v in views for p in v.positions}
        special = set() if unit_args["special_tokens"] else self._special_ids()
        pieces, offsets, cursor = [], [], 0
        for i, t in enumerate(prompt_ids):
            piece = "" if i in image_positions else self._token_strings([t])[0]
            pieces.append(piece)
            offsets.append((cursor, cursor + len(piece)))
            cursor += len(piece)
        text = "".join(pieces)
        eligible = [i for i, t in enumerate(prompt_ids)
                    if i not in image_positions and t not in special and offsets[i][0] <
                    offsets[i][1]]
        units = prompt_spans(text, offsets, granularity=unit_args["granularity"],
                             delimiter=unit_args["delimiter"], spans=unit_args["spans"],
                             eligible=eligible) if eligible else []
        # image units: one per cell, or per k x k region, of every view
        k = image_region or 1
        image_units: list[tuple[Span, dict[str, Any], list[int]]] = []
        for view in views:
            for cells in region_cells(view.grid, k):
                rows = sorted({c // view.grid[1] for c in cells})
                cols = sorted({c % view.grid[1] for c in cells})
                where = (f"({rows[0]},{cols[0]})" if len(cells) == 1 else
                         f"rows {rows[0]}-{rows[-1]} cols {cols[0]}-{cols[-1]}")
                box = None
                if view.boxes is not None:
                    bs = [view.boxes[c] for c in cells]
                    box = (min(b[0] for b in bs), min(b[1] for b in bs),
                           max(b[2] for b in bs), max(b[3] for b in bs))
                span = Span(f"image {view.image} {view.view} {where}", None, None,
                            tuple(sorted(view.positions[c] for c in cells)), source="image",
                            image=view.image, box=box)
                image_units.append((span, {"image": view.image, "view": view.view}, cells))
        generated = target is None
        coarse = (unit_args["granularity"] != "token" or unit_args["delimiter"] is not None
                  or unit_args["spans"] is not None)
        if generated:
            if precheck is not None:
                known = sorted(units + [u for u, _, _ in image_units],
                               key=lambda u: u.positions[0])
                with_target = not coarse and max_new_tokens >= 2
                precheck(answer_unit_options(known, len(prompt_ids), with_target), text,
                         bool(views))
            target_ids = self._generate(prompt_ids, max_new_tokens, extra)
        else:
            target_ids = self._token_ids(target, "target", add_special_tokens=False)
        seq = prompt_ids + target_ids[:-1]
        n_prompt, n = len(prompt_ids), len(seq)
        self._check_length(n)
        # per-token inputs of the prompt (e.g. Qwen2-VL's mm_token_type_ids) cover the target
        # tokens too: they are text (0)
        extra = {k: torch.nn.functional.pad(v, (0, n - n_prompt))
                 if torch.is_tensor(v) and v.dim() == 2 and v.shape == (1, n_prompt)
                 and not v.is_floating_point() else v for k, v in extra.items()}
        all_units = units + [u for u, _, _ in image_units]
        if not coarse:
            all_units += token_spans(self._token_strings(target_ids[:-1]),
                                     list(range(n_prompt, n)), source="target")
        all_units.sort(key=lambda u: u.positions[0])
        index = {id(u): i for i, u in enumerate(all_units)}
        maps: dict[tuple[int, str], dict[str, Any]] = {}
        for view in views:
            maps[(view.image, view.view)] = {"image": view.image, "view": view.view,
                                             "grid": list(view.grid),
                                             "cells": [0] * (view.grid[0] * view.grid[1])}
        for span, key, cells in image_units:
            for c in cells:
                maps[(key["image"], key["view"])]["cells"][c] = index[id(span)]
        ids = torch.tensor(seq, dtype=torch.long, device=device)
        task = VisionLanguageTask(self.model, ids, n_prompt,
                                  torch.tensor(target_ids, dtype=torch.long, device=device),
                                  reuse=self.prefix_reuse, extra=extra,
                                  language_model=self.model.get_decoder())
        pictures = None if images is None else [as_rgb_array(im) for im in images]
        return Prepared(
            task=task, units=all_units,
            fields={"target_tokens": self._token_strings(target_ids), "kind": "image_text",
                    "token_ids": seq, "prompt": text, "image_views": list(maps.values()),
                    "images": pictures},
            settings={"prompt_tokens": n_prompt,
                      "target": (self.tokenizer.decode(target_ids) if self.tokenizer is not None
                                 else target_ids),
                      "target_ids": target_ids, "generated": generated,
                      "image_region": image_region, **unit_settings(unit_args)},
        )


def _check_image_token_types(extra: dict[str, Any], key: str, prompt_ids: list[int],
                             image_token: int, name: str) -> None:
    """``extra[key]`` must mark exactly the image tokens of the prompt (1) and nothing else:
    without it the model's mask would be plain causal over the images (not how it runs)."""
    types = extra.get(key)
    expected = [int(t == image_token) for t in prompt_ids]
    if types is None:
        if not any(expected):
            return
        raise ValueError(f"{name} takes {key} (1 at image tokens, as its processor returns "
                         f"them): its image tokens attend to each other bidirectionally only "
                         f"where {key} marks them; pass the processor's output whole")
    if not torch.is_tensor(types) or tuple(types.shape) != (1, len(prompt_ids)) or (
            types[0].tolist() != expected):
        raise ValueError(f"{key} must be [1, {len(prompt_ids)}] with 1 exactly at the image "
                         f"tokens (id {image_token}) of input_ids, as {name}'s processor makes "
                         "it")


def as_rgb_array(image: Any) -> Any:
    """A picture as an [H, W, 3] uint8 array, for rendering."""
    import numpy as np

    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"))
    arr = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype != np.uint8:
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 if hi <= 1.0 and lo >= 0.0 else 1.0
        arr = np.clip(arr * scale, 0, 255).astype(np.uint8)
    return arr
