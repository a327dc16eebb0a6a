"""The zero-shot front end: CLIP-style image-text models (CLIP, MetaCLIP 2, SigLIP, SigLIP 2)
choosing one of a list of candidate label texts for an image.

The target is one candidate (its text, or its index in the list); the score of a unit is the
rise of the target's cross-entropy under the softmax over the candidates' ``logits_per_image``
(the model's own image-text logits: cosine similarity times ``exp(logit_scale)``, plus
SigLIP's ``logit_bias``, which the softmax cancels). The image's patches are the units;
suppression acts in the vision tower only. The text tower runs once, unsuppressed, before the
variants (a candidate's text embedding does not depend on the image), and every variant runs
only the vision tower (:class:`ZeroShotTask`).

SigLIP was trained with a sigmoid loss (each image-text pair a yes/no), yet the score here is
the softmax over the candidates for every family: the softmax is the zero-shot classifier (its
argmax is the prediction, as with CLIP), a unit then scores by how much it supports the target
*over the other candidates* (a unit that raises every candidate's logit alike scores 0, where
-log sigmoid would count it as support), the numbers mean the same for every family, and
``contrast=`` is the difference of two rises on one softmax. ``settings["zero_shot_score"]``
names it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..tasks import ClassificationTask
from .base import FrontEnd, Prepared
from .classify import check_patch_units, image_units, vision_tower

# Image-text models explained as zero-shot classifiers, by class name.
ZERO_SHOT_FAMILIES = {
    "CLIPModel": "clip",
    "MetaClip2Model": "clip",
    "SiglipModel": "siglip",
    "Siglip2Model": "siglip",
}
ZERO_SHOT_SCORE = "softmax over the candidates' logits_per_image"


class ZeroShotTask(ClassificationTask):
    """Zero-shot classification of one image among K candidate texts, for the engine.

    The text embeddings are fixed (computed once); each forward runs the vision tower over the
    variants (``model.get_image_features``) and forms the model's logits per image [B, K].

    Args:
        model: a model of :data:`ZERO_SHOT_FAMILIES`.
        image_inputs: the vision inputs, batch 1 (``pixel_values``; SigLIP 2 also
            ``pixel_attention_mask`` and ``spatial_shapes``).
        seq_len: the vision tower's sequence length (the factor rows' length).
        text_embeds: [K, D] the candidates' L2-normalised text embeddings.
        labels: candidate indices: the target, then the foil if any.
    """

    def __init__(self, model: Any, image_inputs: dict[str, torch.Tensor], seq_len: int,
                 text_embeds: torch.Tensor, labels: list[int]) -> None:
        super().__init__(model, image_inputs, seq_len, labels)
        self.text_embeds = text_embeds
        self.labels = self.labels.to(text_embeds.device)

    def logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, K] the model's image-text logits for a batch of image inputs."""
        image = _pooled(self.model.get_image_features(**inputs))
        image = image / image.norm(p=2, dim=-1, keepdim=True)
        logits = (self.text_embeds @ image.t().to(self.text_embeds.device)) * (
            self.model.logit_scale.exp())
        bias = getattr(self.model, "logit_bias", None)
        if bias is not None:
            logits = logits + bias
        return logits.t()


def _pooled(out: Any) -> torch.Tensor:
    """The projected embedding of ``get_text_features`` / ``get_image_features`` (a tensor in
    older transformers, an output with ``pooler_output`` in 5.x)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ZeroShotFrontEnd(FrontEnd):
    """CLIP-style models of :data:`ZERO_SHOT_FAMILIES`."""

    processor: Any
    conceptual_threshold: float | None

    def _prepare_zero_shot(self, inputs: Any, target: Any, unit_args: dict[str, Any],
                           contrast: Any = None) -> Prepared:
        check_patch_units(unit_args, "zero-shot image-text models")
        if unit_args["special_tokens"] or unit_args["chat"]:
            raise ValueError("special_tokens and chat apply to text prompts, not to a "
                             "zero-shot model's image")
        if not (isinstance(inputs, (tuple, list)) and len(inputs) == 2):
            raise TypeError("a zero-shot image-text model takes inputs=(image, candidates): "
                            "the image (pixel values, a dict with 'pixel_values', or a picture "
                            "with the processor given) and the candidate labels (a list of "
                            f"texts, or a tokenizer output [K, L]); got {type(inputs).__name__}")
        image, candidates = inputs
        names, text_inputs = self._candidate_inputs(candidates)
        labels = [self._candidate_index(target, names, "target")]
        fields: dict[str, Any] = {"target_tokens": [names[labels[0]]]}
        settings: dict[str, Any] = {"target": names[labels[0]], "target_index": labels[0]}
        if contrast is not None:
            foil = self._candidate_index(contrast, names, "contrast")
            if foil == labels[0]:
                raise ValueError(f"contrast {names[foil]!r} is the target itself: give another "
                                 "candidate as the foil")
            labels.append(foil)
            fields["contrast_tokens"] = [names[foil]]
            settings.update(contrast=names[foil], contrast_index=foil)
        image = self._zero_shot_pixels(image)
        units = image_units(self.model, image, conceptual=self.conceptual_threshold is not None)
        text = _pooled(self.model.get_text_features(**text_inputs))
        text = text / text.norm(p=2, dim=-1, keepdim=True)
        task = ZeroShotTask(self.model, units.model_inputs, units.seq_len, text, labels)
        return Prepared(
            task=task, units=units.units, embeddings=units.embeddings,
            contrast_rows=len(labels) - 1,
            settings={**settings, "granularity": "patch", "task": "zero_shot",
                      "candidates": names, "zero_shot_score": ZERO_SHOT_SCORE},
            fields={"kind": "image", "token_ids": None, "patch_grid": units.grid,
                    "image": units.picture, **fields},
        )

    # ------------------------------------------------------------------------- inputs
    def _candidate_inputs(self, candidates: Any) -> tuple[list[str], dict[str, torch.Tensor]]:
        """(candidate names, text-tower inputs [K, L]) of the candidate labels."""
        device = self._device
        text_config = self.model.config.text_config
        limit = getattr(text_config, "max_position_embeddings", None)
        if hasattr(candidates, "keys"):
            if "input_ids" not in candidates:
                raise ValueError("candidates given as a tokenizer output need 'input_ids' "
                                 "[K, L]")
            ids = torch.as_tensor(candidates["input_ids"])
            if ids.dim() != 2 or ids.is_floating_point():
                raise ValueError(f"candidates' input_ids must be integer ids [K, L], got "
                                 f"{tuple(ids.shape)} {ids.dtype}")
            out = {"input_ids": ids}
            if candidates.get("attention_mask") is not None:
                mask = torch.as_tensor(candidates["attention_mask"])
                if mask.shape != ids.shape:
                    raise ValueError(f"candidates' attention_mask {tuple(mask.shape)} must "
                                     f"match input_ids {tuple(ids.shape)}")
                out["attention_mask"] = mask
            names = [str(i) for i in range(ids.shape[0])]
        else:
            if isinstance(candidates, str) or not isinstance(candidates, Sequence) or not all(
                    isinstance(c, str) for c in candidates):
                raise TypeError("candidates must be a list of label texts (or a tokenizer "
                                f"output [K, L]), got {type(candidates).__name__}")
            names = list(candidates)
            bad = [c for c in names if not c.strip()]
            if bad:
                raise ValueError(f"candidates hold empty label texts: {bad}")
            repeated = sorted({c for c in names if names.count(c) > 1})
            if repeated:
                raise ValueError(f"candidates repeat {repeated}: each label once")
            if len(names) >= 2:
                out = self._tokenize_candidates(names, limit)
        if len(names) < 2:
            raise ValueError(f"candidates hold {len(names)} label(s): give at least two (the "
                             "softmax over a single candidate is 1 whatever the image)")
        ids = out["input_ids"]
        vocab = getattr(text_config, "vocab_size", None)
        if int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab):
            raise ValueError(f"candidates' token ids must lie in [0, {vocab}) (the text "
                             "tower's vocabulary)")
        if limit is not None and ids.shape[1] > limit:
            raise ValueError(f"candidate texts take {ids.shape[1]} tokens, more than the text "
                             f"tower's {limit} positions: shorten them")
        return names, {k: v.to(device) for k, v in out.items()}

    def _tokenize_candidates(self, names: list[str], limit: int | None
                             ) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise ValueError("candidate label texts need the model's processor or tokenizer: "
                             "AtManExplainer(model, processor), or give the candidates "
                             "tokenized ([K, L] input_ids)")
        if ZERO_SHOT_FAMILIES[type(self.model).__name__] == "siglip" and limit is not None:
            # SigLIP's text tower pools the last position and was trained on texts padded to
            # the maximum length (no attention mask)
            enc = self.tokenizer(names, padding="max_length", max_length=limit,
                                 return_tensors="pt")
            return {"input_ids": enc["input_ids"]}
        enc = self.tokenizer(names, padding=True, return_tensors="pt")
        out = {"input_ids": enc["input_ids"]}
        if enc.get("attention_mask") is not None:
            out["attention_mask"] = enc["attention_mask"]
        return out

    @staticmethod
    def _candidate_index(value: Any, names: list[str], name: str) -> int:
        if isinstance(value, str):
            if value not in names:
                raise ValueError(f"{name} {value!r} is not one of the candidates {names}")
            return names.index(value)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = int(value.item())
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be a candidate label text or its index, got "
                            f"{type(value).__name__}")
        if not 0 <= value < len(names):
            raise ValueError(f"{name} index {value} is out of range: there are {len(names)} "
                             "candidates")
        return value

    def _zero_shot_pixels(self, image: Any) -> Any:
        """Pixel values (or a dict of vision inputs) of ``image``; a picture (PIL image or
        [H, W, C] array) goes through the processor's image processor."""
        if isinstance(image, torch.Tensor) or hasattr(image, "keys"):
            return image
        if self.processor is None:
            raise TypeError(f"the image must be pixel values or a dict with 'pixel_values' "
                            f"(got {type(image).__name__}); for a picture give the processor: "
                            "AtManExplainer(model, processor)")
        out = self.processor.image_processor(images=image, return_tensors="pt")
        return {k: v for k, v in out.items() if k in ("pixel_values", "pixel_attention_mask",
                                                      "spatial_shapes")}

    def _zero_shot_tower(self) -> Any:
        tower = vision_tower(self.model)
        if tower is None:
            raise TypeError(f"unsupported model class {type(self.model).__name__}: a "
                            "zero-shot model needs a vision_model tower")
        return tower
