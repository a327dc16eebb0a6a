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


class CausalFrontEnd(FrontEnd):
    """Causal LMs (``*ForCausalLM``, ``*LMHeadModel``)."""

    prefix_reuse: bool

    def _prepare_causal(self, inputs: Any, target: Any, max_new_tokens: int,
                        unit_args: dict[str, Any], contrast: Any = None) -> Prepared:
        if (isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], str)) or (
                hasattr(inputs, "keys") and "pixel_values" in inputs):
            raise ValueError(
                f"inputs hold images, but {type(self.model).__name__} is a text-only model; "
                f"images need a vision-language model ({', '.join(IMAGE_TEXT_FAMILIES)})")
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
        task = CausalLMTask(self.model, ids, n_prompt,
                            torch.tensor(target_ids, dtype=torch.long, device=device),
                            reuse=self.prefix_reuse)
        target_text = (self.tokenizer.decode(target_ids) if self.tokenizer is not None
                       else target_ids)
        return Prepared(
            task=task, units=units, input_ids=ids, embed=True,
            fields={"target_tokens": self._token_strings(target_ids), "kind": "causal_lm",
                    "token_ids": seq, "prompt": prompt_text},
            settings={"prompt_tokens": n_prompt, "target": target_text, **unit_settings(unit_args),
                      "target_ids": target_ids, "generated": generated,
                      **({"max_new_tokens": max_new_tokens} if generated else {})},
        )

    def _contrastive_causal(self, prompt_ids: list[int], target_ids: list[int],
                            foil_ids: list[int], units: list[Span], prompt_text: str | None,
                            generated: bool, unit_args: dict[str, Any]) -> Prepared:
        if not units:
            raise ValueError("the prompt holds only special tokens: nothing to explain "
                             "(special_tokens=True explains them)")
        device = self._device
        ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)
        task = ContrastiveLMTask(
            self.model, ids, torch.tensor(target_ids, dtype=torch.long, device=device),
            torch.tensor(foil_ids, dtype=torch.long, device=device), reuse=self.prefix_reuse)
        decode = self.tokenizer.decode if self.tokenizer is not None else (lambda x: x)
        return Prepared(
            task=task, units=units, input_ids=ids, embed=True, contrast_rows=len(foil_ids),
            fields={"target_tokens": self._token_strings(target_ids), "kind": "causal_lm",
                    "token_ids": prompt_ids, "prompt": prompt_text,
                    "contrast_tokens": self._token_strings(foil_ids)},
            settings={"prompt_tokens": len(prompt_ids), "target": decode(target_ids),
                      "target_ids": target_ids, "generated": generated,
                      "contrast": decode(foil_ids), "contrast_ids": foil_ids,
                      **unit_settings(unit_args)},
        )
