"""The causal-LM front end: a prompt (text, ids or a chat message) and a given or generated
target, plain (:class:`..tasks.CausalLMTask`) or against a foil continuation
(:class:`..tasks.ContrastiveLMTask`)."""

from __future__ import annotations

from typing import Any

import torch

from ..tasks import CausalLMTask, ContrastiveLMTask
from ..units import Span, token_spans
from .base import FrontEnd, Precheck, Prepared, answer_unit_options, unit_settings
from .image_text import CAUSAL_IMAGE_TEXT_FAMILIES, IMAGE_TEXT_FAMILIES

# parts of model-input names that carry another modality (images, video, audio features)
_MEDIA_KEY_PARTS = ("pixel", "image", "video", "audio", "input_features", "input_values")


# Multimodal causal LMs whose inputs with images are refused, and why.
_GEMMA4_IMAGES = (
    "is explained as a causal LM on text only: with images, its language model takes "
    "per-layer inputs computed from the token ids besides the merged embeddings (the variants "
    "cannot be run on the recorded embeddings alone) and its vision encoder pools a number of "
    "soft tokens per image that depends on the picture (no fixed grid of cells); image tokens "
    "also attend to each other bidirectionally")
IMAGES_REFUSED = {
    "Gemma4ForConditionalGeneration": _GEMMA4_IMAGES,
    "Gemma4UnifiedForConditionalGeneration": _GEMMA4_IMAGES,
}


class CausalFrontEnd(FrontEnd):
    """Causal LMs (``*ForCausalLM``, ``*LMHeadModel``); those of
    :data:`.image_text.CAUSAL_IMAGE_TEXT_FAMILIES` (Gemma 3) with images go to the
    vision-language front end."""

    prefix_reuse: bool
    conceptual_threshold: float | None

    def _prepare_causal(self, inputs: Any, target: Any, max_new_tokens: int,
                        unit_args: dict[str, Any], contrast: Any = None,
                        image_region: int | None = None, precheck: Precheck | None = None
                        ) -> Prepared:
        name = type(self.model).__name__
        if (isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], str)) or (
                hasattr(inputs, "keys") and "pixel_values" in inputs):
            if name in CAUSAL_IMAGE_TEXT_FAMILIES:
                return self._causal_with_images(inputs, target, max_new_tokens, unit_args,
                                                contrast, image_region, precheck)
            what = IMAGES_REFUSED.get(name) or (
                "is explained as a causal LM on text only: AtMan's image-token layout is not "
                "implemented for its family" if name.endswith("ForConditionalGeneration")
                else "is a text-only model")
            families = sorted([*IMAGE_TEXT_FAMILIES, *CAUSAL_IMAGE_TEXT_FAMILIES])
            raise ValueError(
                f"inputs hold images, but {name} {what}; pass the prompt as text or token "
                f"ids, or use a vision-language model of {', '.join(families)}")
        if image_region is not None:
            raise ValueError(f"image_region={image_region!r} needs inputs with images (the "
                             "processor's output or (text, images)); these inputs are text")
        media = sorted(k for k in (inputs.keys() if hasattr(inputs, "keys") else ())
                       if any(w in str(k) for w in _MEDIA_KEY_PARTS))
        if media:
            raise ValueError(
                f"inputs hold {media}, which the causal-LM path does not feed to "
                f"{type(self.model).__name__} (it explains the text tokens alone); pass the "
                "prompt as text or token ids")
        prompt_ids, units, prompt_text, _ = self._prompt_units(inputs, "prompt", unit_args)
        self._check_length(len(prompt_ids) + (1 if target is None else 0))
        foil_ids = None
        if contrast is not None:
            foil_ids = self._token_ids(contrast, "contrast", add_special_tokens=False)
        generated = target is None
        coarse = (unit_args["granularity"] != "token" or unit_args["delimiter"] is not None
                  or unit_args["spans"] is not None or unit_args.get("context") is not None)
        if generated:
            if precheck is not None:
                # the answer's tokens (but its last) become units only token by token
                with_target = not coarse and foil_ids is None and max_new_tokens >= 2
                precheck(answer_unit_options(units, len(prompt_ids), with_target),
                         prompt_text, False)
            target_ids = self._generate(prompt_ids, max_new_tokens)
        else:
            target_ids = self._token_ids(target, "target", add_special_tokens=False)
        seq = prompt_ids + target_ids[:-1]
        n_prompt, n = len(prompt_ids), len(seq)
        self._check_length(n)
        if foil_ids is not None:
            self._check_length(n_prompt + len(foil_ids) - 1)
            return self._contrastive_causal(prompt_ids, target_ids, foil_ids, units,
                                            prompt_text, generated, unit_args)
        if not coarse:
            units = units + token_spans(self._token_strings(target_ids[:-1]),
                                        list(range(n_prompt, n)), source="target")
        if not units:
            raise ValueError("the prompt holds only special tokens: nothing to explain "
                             "(special_tokens=True explains them)")
        device = self._device
        ids = torch.tensor(seq, dtype=torch.long, device=device)
        reuse, recurrent = self._reuse_and_note()
        task = CausalLMTask(self.model, ids, n_prompt,
                            torch.tensor(target_ids, dtype=torch.long, device=device),
                            reuse=reuse)
        target_text = (self.tokenizer.decode(target_ids) if self.tokenizer is not None
                       else target_ids)
        return Prepared(
            task=task, units=units, input_ids=ids, embed=True,
            fields={"target_tokens": self._token_strings(target_ids), "kind": "causal_lm",
                    "token_ids": seq, "prompt": prompt_text},
            settings={"prompt_tokens": n_prompt, "target": target_text, **unit_settings(unit_args),
                      "target_ids": target_ids, "generated": generated,
                      **({"max_new_tokens": max_new_tokens} if generated else {}),
                      **recurrent},
        )

    def _causal_with_images(self, inputs: Any, target: Any, max_new_tokens: int,
                            unit_args: dict[str, Any], contrast: Any,
                            image_region: int | None, precheck: Precheck | None = None
                            ) -> Prepared:
        """A causal LM that takes images (Gemma 3), given images: the vision-language front
        end (image regions and text as units), with its refusals."""
        name = type(self.model).__name__
        if contrast is not None:
            raise ValueError(f"contrast= is not implemented for {name} with images yet; "
                             "explain the target alone")
        if self.conceptual_threshold is not None:
            raise ValueError(f"conceptual_threshold is not supported for {name} with images "
                             "(image tokens have no input embedding of their own before the "
                             "vision tower runs); use conceptual_threshold=None")
        if unit_args["chat"]:
            raise ValueError(f"chat=True applies the chat template to a text prompt; for {name} "
                             "with images pass the processor's output of the rendered prompt")
        return self._prepare_image_text(inputs, target, max_new_tokens, unit_args,
                                        image_region, precheck)

    def _reuse_and_note(self) -> tuple[bool, dict[str, str]]:
        """Whether to try prefix reuse, and the settings note of a model with recurrent state.

        A model class with ``_is_stateful`` (transformers' flag for state-space and
        linear-attention hybrids: Falcon-H1, Jamba, Nemotron-H, Qwen3-Next, ...) keeps in its
        cache the recurrent state after the *last* position only; the state after a shorter
        prefix, which a variant would continue from, is not there. Such a model runs every
        variant over the whole sequence (exact, no reuse), and ``settings["recurrent_state"]``
        says so. A cache of another unusual structure is found at the baseline forward (the
        task turns reuse off itself).
        """
        if not getattr(type(self.model), "_is_stateful", False):
            return self.prefix_reuse, {}
        note = (
            f"{type(self.model).__name__} keeps recurrent state (state-space or "
            "linear-attention layers): its cache holds the state after the last position "
            "only, so prefix reuse is impossible and every variant ran the whole sequence; "
            "suppression acts in the softmax-attention layers, the recurrent layers carry "
            "every token unsuppressed")
        return False, {"recurrent_state": note}

    def _contrastive_causal(self, prompt_ids: list[int], target_ids: list[int],
                            foil_ids: list[int], units: list[Span], prompt_text: str | None,
                            generated: bool, unit_args: dict[str, Any]) -> Prepared:
        if not units:
            raise ValueError("the prompt holds only special tokens: nothing to explain "
                             "(special_tokens=True explains them)")
        device = self._device
        ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)
        reuse, recurrent = self._reuse_and_note()
        task = ContrastiveLMTask(
            self.model, ids, torch.tensor(target_ids, dtype=torch.long, device=device),
            torch.tensor(foil_ids, dtype=torch.long, device=device), reuse=reuse)
        decode = self.tokenizer.decode if self.tokenizer is not None else (lambda x: x)
        return Prepared(
            task=task, units=units, input_ids=ids, embed=True, contrast_rows=len(foil_ids),
            fields={"target_tokens": self._token_strings(target_ids), "kind": "causal_lm",
                    "token_ids": prompt_ids, "prompt": prompt_text,
                    "contrast_tokens": self._token_strings(foil_ids)},
            settings={"prompt_tokens": len(prompt_ids), "target": decode(target_ids),
                      "target_ids": target_ids, "generated": generated,
                      "contrast": decode(foil_ids), "contrast_ids": foil_ids,
                      **unit_settings(unit_args), **recurrent},
        )
