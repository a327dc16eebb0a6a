"""The causal-LM front end: a prompt (text, ids or a chat message) and a given or generated
target, plain (:class:`..tasks.CausalLMTask`) or against a foil continuation
(:class:`..tasks.ContrastiveLMTask`)."""

from __future__ import annotations

from typing import Any

import torch

from ..tasks import CausalLMTask, ContrastiveLMTask
from ..units import Span, token_spans
from .base import FrontEnd, Prepared, unit_settings
from .image_text import IMAGE_TEXT_FAMILIES

# parts of model-input names that carry another modality (images, video, audio features)
_MEDIA_KEY_PARTS = ("pixel", "image", "video", "audio", "input_features", "input_values")


class CausalFrontEnd(FrontEnd):
    """Causal LMs (``*ForCausalLM``, ``*LMHeadModel``)."""

    prefix_reuse: bool

    def _prepare_causal(self, inputs: Any, target: Any, max_new_tokens: int,
                        unit_args: dict[str, Any], contrast: Any = None) -> Prepared:
        if (isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], str)) or (
                hasattr(inputs, "keys") and "pixel_values" in inputs):
            name = type(self.model).__name__
            what = ("is explained as a causal LM on text only: AtMan's image-token layout "
                    "is not implemented for its family (Gemma 3 and 4 also let image tokens "
                    "attend to each other bidirectionally)"
                    if name.endswith("ForConditionalGeneration") else "is a text-only model")
            raise ValueError(
                f"inputs hold images, but {name} {what}; pass the prompt as text or token "
                f"ids, or use a vision-language model of "
                f"{', '.join(sorted(IMAGE_TEXT_FAMILIES))}")
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
        if generated:
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
        coarse = (unit_args["granularity"] != "token" or unit_args["delimiter"] is not None
                  or unit_args["spans"] is not None)
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
