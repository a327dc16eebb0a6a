"""Memory and time of an AtMan explanation against backprop and ablation attribution (CPU).

The paper's Fig. 5 claim, measured on this package: AtMan explains at forward-pass memory
where gradient methods keep activations for backward. CPU, fp32, ``torch.set_num_threads``
pinned (2 by default), one fresh process per (model, method, prompt length) row so peaks
never mix (:func:`_harness.run_isolated`).

Methods (all explain the summed log-probability of the same target tokens, teacher-forced,
over every position of prompt + target[:-1]):

- ``forward``: the yardstick: the stock model (its default attention, sdpa) on the batch AtMan
  runs per chunk, [B, N], inference mode, logits at the target positions only, default KV cache
  on (what ``model(ids)`` does); ``forward-nocache``: the same with ``use_cache=False``;
- ``atman``: :class:`atman_kernels.AtManExplainer` (fused op through the "atman" attention,
  exact prefix reuse, conceptual suppression 0.7, paper mode), ``batch_size=B`` variants per
  forward;
- ``atman-reference``: the same explainer with the attention op forced onto the plain PyTorch
  reference backend (``backend="reference"``: eager, materialised [B, H, N, N] scores);
- ``ig-10`` / ``ig-50``: Captum LayerIntegratedGradients on the input embeddings, n_steps 10
  (the paper's setting) and 50, ``internal_batch_size=B`` (the same sequences per forward as
  AtMan's chunk);
- ``ixg``: input x gradient of the embeddings (Captum LayerGradientXActivation), batch 1;
- ``feature-ablation``: Captum LLMAttribution(FeatureAblation) + TextTokenInput: one forward
  per prompt token (plus the unperturbed one), one at a time, full logits;
- ``chefer``: attention x gradient in Chefer's style (eager attention, probabilities retained).

Image-text rows (``llava-1b-random``: a random LLaVA with a CLIP-L/14 tower at 336 pixels,
576 image tokens, and the ``llama-1b-random`` language model; ``llava-tiny`` for tests): one
picture and a question through the model's processor, the length fixed by the picture. Methods
``forward`` / ``forward-nocache`` (vision tower included), ``atman`` (every image and text token
a variant), ``atman-region4`` (``image_region=4``: 4 x 4 patches per variant) and ``ig-10``
(Captum IntegratedGradients over the merged input embeddings: the vision tower runs once
without gradients, the path goes through the language model, where AtMan suppresses).

Gradient methods run with the model's parameters frozen (``requires_grad_(False)``): autograd
then keeps only what the input gradient needs, the most favourable setting for them.

Figures per row: ``peak_mib`` = peak RSS of the process above its RSS after the model was
loaded, the inputs built and a 16-token warm-up run (``VmHWM`` after ``clear_refs``, the OS's
accounting); ``measured_s`` = wall time of one complete explanation (only where the method ran
to the end); ``est_s`` = the time of a complete explanation extrapolated from a partial run
(``est_how`` says how), never mixed with measured times.

Partial runs. A full AtMan explanation of N tokens costs about N/2 full forwards (prefix reuse);
on 2 CPU cores that is hours for long prompts and the 1B model. Above ``--full-upto`` tokens a
method stops at the forward call after its steady peak was reached (AtMan: the unsuppressed
forward and 2 chunks, the second chunk holding a KV cache over the whole sequence for every
variant; IG: its 2 preliminary forwards and 1 internal batch with its backward; feature
ablation: 3 forwards); status ``partial``. A row that runs past the memory budget (an
address-space limit set in the row's process, ``--mem-budget-gib`` above the loaded model) is
``oom``; a process killed by the OS is ``failed: killed (out of memory?)``.

Usage::

    python benchmarks/bench_memory.py                      # default sweep (~25 min, 2 cores)
    python benchmarks/bench_memory.py --models smollm2-135m --lengths 128 256 --methods atman ig-10
    python benchmarks/bench_memory.py --plot               # redraw PNG + MEMORY.md from the CSV
    python benchmarks/bench_memory.py --models llava-1b-random --threads 1 \
        --full-image-text forward forward-nocache atman-region4 --timeout 2700 \
        --csv benchmarks/results/memory_image_text_cpu.csv   # image-text rows (~20 min)

Rows of a run replace the rows with the same (model, method, n) in the CSV; the others stay.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _harness import machine_stamp, peak_rss, reset_peak_rss, run_isolated, write_csv  # noqa: E402
from _timing import Stopwatch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["forward", "forward-nocache", "atman", "atman-region4", "atman-reference", "ig-10",
           "ig-50", "ixg", "feature-ablation", "chefer"]
MODELS = ["smollm2-135m", "llama-1b-random", "tiny", "llava-1b-random", "llava-tiny"]
# Vision-language models (a prompt with one picture) and the methods that run on them.
IMAGE_TEXT_MODELS = ("llava-1b-random", "llava-tiny")
IMAGE_TEXT_METHODS = ["forward", "forward-nocache", "atman", "atman-region4", "ig-10"]
TEXT_METHODS = [m for m in METHODS if m != "atman-region4"]
# Forward calls a partial run makes before it stops (the steady peak is reached by then).
PARTIAL_CALLS = {"atman": 3, "atman-reference": 3, "ig-10": 3, "ig-50": 3,
                 "feature-ablation": 3}
# The same for the vision-language rows: AtMan as for text (the unsuppressed forward with the
# vision tower, then 2 chunks); IG over the merged embeddings has no preliminary layer
# evaluations, so 1 internal batch with its backward (the steady peak) and the stop.
IMAGE_TEXT_PARTIAL_CALLS = {"atman": 3, "atman-region4": 3, "ig-10": 1}
IMAGE_TEXT_PROMPT = "USER: <image>\nWhich city is shown in this picture? ASSISTANT:"
TARGET_TEXT = " Paris"
PASSAGE = (
    "Paris is the capital and largest city of France. It lies on the Seine river in the north "
    "of the country, at the heart of the Ile-de-France region. The city is known for its "
    "museums and monuments: the Louvre, the Eiffel Tower, Notre-Dame and the Arc de Triomphe "
    "draw millions of visitors every year. Paris is also a centre of finance, diplomacy, "
    "commerce, fashion and science, and it hosts the headquarters of many international "
    "organisations. Its public transport network, the Metro, opened in 1900. "
)
QUESTION = "Question: which city is the capital of France? Answer:"


class BudgetReached(Exception):
    """Raised by :class:`CallBudget` to stop a partial run."""


class CallBudget:
    """Counts the forward calls of ``model`` and the tokens they process; stops after ``limit``.

    Wraps the instance's ``forward`` (so calls through ``model(...)`` and direct
    ``model.forward(...)`` calls, as Captum's LLMAttribution makes, both count; the signature
    stays visible to ``inspect``). ``times[i]`` is the perf_counter time at which call i
    started; ``tokens[i]`` its batch x length. The call after the ``limit``-th raises
    :class:`BudgetReached` (no limit: None). :meth:`remove` restores the model.
    """

    def __init__(self, model: torch.nn.Module, limit: int | None) -> None:
        self.limit = limit
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.end = 0.0
        self._model = model
        original = model.forward

        @functools.wraps(original)
        def counted(*args, **kwargs):
            if self.limit is not None and len(self.times) >= self.limit:
                self.end = time.perf_counter()
                raise BudgetReached
            x = kwargs.get("input_ids")
            if x is None:
                x = kwargs.get("inputs_embeds")
            if x is None and args:
                x = args[0]
            self.tokens.append(int(x.shape[0] * x.shape[1]) if x is not None else 0)
            self.times.append(time.perf_counter())
            return original(*args, **kwargs)

        model.forward = counted

    def durations(self) -> list[float]:
        """Wall time of each call up to the next call (the last one up to the stop)."""
        ends = self.times[1:] + [self.end or time.perf_counter()]
        return [e - s for s, e in zip(self.times, ends, strict=True)]

    def remove(self) -> None:
        if "forward" in vars(self._model):
            del self._model.forward


# ----------------------------------------------------------------------------- models, inputs
def tiny_tokenizer():
    """A word-level tokenizer over the benchmark passage (offline; for tests and the tiny model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set((PASSAGE + " " + QUESTION + TARGET_TEXT).split()))
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                   pad_token="[PAD]")


def random_llama(config, seed: int = 0):
    """A LlamaForCausalLM with random weights, built on the meta device and filled in place
    (normal(0, 0.02) for matrices, 1 for norms): seconds instead of minutes for ~1B params."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    # buffers computed in __init__ (rotary frequencies) were left empty by to_empty
    model.model.rotary_emb = LlamaRotaryEmbedding(config)
    return model.eval()


def load_model(name: str):
    """(model, tokenizer) in fp32 on CPU, default attention ("sdpa")."""
    from transformers import LlamaConfig

    if name == "smollm2-135m":
        from atman_kernels.models import load_smollm2

        model, tokenizer = load_smollm2(dtype=torch.float32)
        return model.eval(), tokenizer
    if name == "llama-1b-random":
        from transformers import AutoTokenizer

        from atman_kernels.models import default_cache_dir, load_smollm2

        if not (default_cache_dir() / "tokenizer.json").is_file():
            load_smollm2()  # converts the GGUF once into the cache
        # SmolLM2's tokenizer (vocab 49152), so Captum's text input works on this model too
        tokenizer = AutoTokenizer.from_pretrained(default_cache_dir(), local_files_only=True)
        config = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                             num_key_value_heads=8, intermediate_size=5632,
                             vocab_size=len(tokenizer), max_position_embeddings=4096,
                             tie_word_embeddings=False)
        config._attn_implementation = "sdpa"
        return random_llama(config), tokenizer
    if name == "tiny":
        tokenizer = tiny_tokenizer()
        config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64,
                             vocab_size=len(tokenizer), max_position_embeddings=4096,
                             tie_word_embeddings=False)
        config._attn_implementation = "sdpa"
        return random_llama(config), tokenizer
    if name in IMAGE_TEXT_MODELS:
        return random_llava(name), image_text_processor(name)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


# ------------------------------------------------------------------- vision-language models
def image_text_processor(name: str):
    """A LlavaProcessor (CLIP image processor + a tokenizer with an ``<image>`` token), offline.

    ``llava-1b-random``: SmolLM2's tokenizer (as for ``llama-1b-random``, so the language model
    is that row's Llama), CLIP-L/14 at 336 pixels: 24 x 24 = 576 image tokens per picture.
    ``llava-tiny``: the passage's word-level tokenizer, 112 pixels: 8 x 8 image tokens.
    """
    from transformers import CLIPImageProcessor, LlavaProcessor

    if name == "llava-1b-random":
        from transformers import AutoTokenizer

        from atman_kernels.models import default_cache_dir, load_smollm2

        if not (default_cache_dir() / "tokenizer.json").is_file():
            load_smollm2()  # converts the GGUF once into the cache
        tokenizer = AutoTokenizer.from_pretrained(default_cache_dir(), local_files_only=True)
        side = 336
    elif name == "llava-tiny":
        tokenizer, side = tiny_tokenizer(), 112
    else:
        raise ValueError(f"image-text model must be one of {IMAGE_TEXT_MODELS}, got {name!r}")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessor(size={"shortest_edge": side},
                                crop_size={"height": side, "width": side})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)


def random_llava(name: str, seed: int = 0):
    """A LlavaForConditionalGeneration with random weights, built on the meta device.

    ``llava-1b-random``: a CLIP-L/14 vision tower (24 layers, hidden 1024, 16 heads, 336
    pixels, patch 14: 576 image tokens), LLaVA-1.5's 2-layer MLP projector, and the
    ``llama-1b-random`` language model (hidden 2048, 16 layers, 32 heads / 8 KV heads,
    intermediate 5632, SmolLM2's 49152-token vocabulary + ``<image>``); 1.2B parameters.
    Matrices normal(0, 0.02), norm weights 1, biases 0.
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    tokenizer = image_text_processor(name).tokenizer
    if name == "llava-1b-random":
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14,
                                  projection_dim=768)
        text = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, intermediate_size=5632,
                           vocab_size=len(tokenizer), max_position_embeddings=4096,
                           tie_word_embeddings=False)
    else:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, image_size=112, patch_size=14,
                                  projection_dim=32)
        text = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64,
                           vocab_size=len(tokenizer), max_position_embeddings=4096,
                           tie_word_embeddings=False)
    grid = vision.image_size // vision.patch_size
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=grid * grid)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() > 1 or pname.endswith("class_embedding"):
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(0.0 if pname.endswith("bias") else 1.0)
        # buffers computed in __init__ were left empty by to_empty
        for bname, buf in model.named_buffers():
            if bname.endswith("position_ids"):  # CLIP's [1, patches + 1] position ids
                buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    model.model.language_model.rotary_emb = LlamaRotaryEmbedding(config.text_config)
    model.set_attn_implementation("sdpa")
    return model.eval()


def test_picture(height: int = 480, width: int = 640):
    """A deterministic [H, W, 3] uint8 picture (colour gradients and noise)."""
    import numpy as np

    ys, xs = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(0).integers(0, 40, (height, width, 3))
    rgb = np.stack([xs * 255 // width, ys * 255 // height, (xs + ys) * 255 // (width + height)],
                   axis=-1)
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


def build_image_text_case(processor) -> dict[str, Any]:
    """The one picture and question of the image-text rows, through the processor."""
    inputs = dict(processor(text=IMAGE_TEXT_PROMPT, images=[test_picture()],
                            return_tensors="pt"))
    inputs.pop("attention_mask", None)
    ids = inputs["input_ids"][0].tolist()
    target = processor.tokenizer.encode(TARGET_TEXT, add_special_tokens=False)
    return {"inputs": inputs, "prompt_ids": ids, "target_ids": target, "image_text": True,
            "image_tokens": sum(t == processor.tokenizer.convert_tokens_to_ids("<image>")
                                for t in ids),
            "seq": ids + target[:-1], "target_text": TARGET_TEXT}


def merged_embeddings(model, inputs: dict[str, Any], ids: torch.Tensor) -> torch.Tensor:
    """[1, N, H] what LLaVA's language model receives: the token embeddings of ``ids`` with
    the projected image features in place of the image tokens (vision tower run once)."""
    config = model.config
    features = model.get_image_features(
        pixel_values=inputs["pixel_values"], vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy).pooler_output
    embeds = model.get_input_embeddings()(ids).clone()
    mask = ids == config.image_token_id
    embeds[mask] = torch.cat(list(features)).to(embeds.dtype)
    return embeds


def image_text_integrated_gradients(model, inputs: dict[str, Any], ids: torch.Tensor,
                                    target_ids: torch.Tensor, *, n_steps: int,
                                    internal_batch_size: int, baseline_id: int) -> torch.Tensor:
    """Captum IntegratedGradients over LLaVA's merged input embeddings: scores [N].

    The vision tower and projector run once without gradients; the path goes from the
    embedding of ``baseline_id`` at every position (image positions too) to the merged
    embeddings, through the language model only (as AtMan's suppression acts in the language
    model only), n_steps forwards + backwards in internal batches.
    """
    from _baselines import target_log_prob_fn
    from captum.attr import IntegratedGradients

    with torch.no_grad():
        embeds = merged_embeddings(model, inputs, ids)
        base = model.get_input_embeddings().weight[baseline_id].expand_as(embeds).clone()
    ig = IntegratedGradients(target_log_prob_fn(model, target_ids))
    attr = ig.attribute(embeds, baselines=base, n_steps=n_steps,
                        internal_batch_size=internal_batch_size)
    return attr.sum(-1)[0].detach()


def make_image_text_runner(method: str, model, processor, case: dict, batch: int
                           ) -> tuple[Callable[[], Any], Callable[[CallBudget], int] | None, str]:
    """:func:`make_runner` for the vision-language rows (inputs: the processor's output)."""
    inputs = case["inputs"]
    ids = torch.tensor(case["seq"])[None]
    target = torch.tensor(case["target_ids"])
    n_target = len(case["target_ids"])
    if method in ("forward", "forward-nocache"):
        use_cache = method == "forward"
        batched = {"input_ids": ids.expand(batch, -1),
                   "pixel_values": inputs["pixel_values"].expand(batch, -1, -1, -1)}

        def run():
            with torch.inference_mode():
                return model(**batched, use_cache=use_cache, logits_to_keep=n_target).logits

        return run, None, f"batch {batch}, use_cache={use_cache}, vision tower included"
    if method in ("atman", "atman-region4"):
        from atman_kernels.explain import AtManExplainer

        region = 4 if method == "atman-region4" else None
        explainer = AtManExplainer(model, processor, batch_size=batch, progress=False)
        store: dict = {}

        def run():
            with capture_first_positions(store):
                expl = explainer.explain(inputs, case["target_ids"], image_region=region)
            store["units"] = len(expl.spans)
            return expl.scores

        def total(budget: CallBudget) -> int:
            return len(atman_plan_tokens(store["first"], len(case["seq"]), batch))

        run.store = store
        what = "image_region=4: 4 x 4 patches per variant" if region else "every token a variant"
        return run, total, f"{batch} variants per forward, prefix reuse, {what}"
    if method.startswith("ig-"):
        steps = int(method.split("-")[1])
        tok = processor.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0

        def run():
            return image_text_integrated_gradients(model, inputs, ids, target, n_steps=steps,
                                                   internal_batch_size=batch, baseline_id=pad)

        run.store = {}

        def total(budget: CallBudget) -> int:
            return -(-steps // batch)  # the internal batches, each a forward + backward

        return run, total, (f"IntegratedGradients over the merged embeddings, n_steps={steps}, "
                            f"internal_batch_size={batch}")
    raise ValueError(f"method must be one of {IMAGE_TEXT_METHODS} for an image-text model, "
                     f"got {method!r}")


def build_case(tokenizer, n: int) -> dict[str, Any]:
    """A prompt of about ``n`` tokens (the passage repeated, then the question) and the target.

    The prompt text is decoded from its ids and re-encoded, so the string Captum's
    TextTokenInput sees and the ids the other methods see are the same tokens.
    """
    question = tokenizer.encode(QUESTION, add_special_tokens=False)
    passage = tokenizer.encode(PASSAGE, add_special_tokens=False)
    body: list[int] = []
    while len(body) < n + 16:
        body += passage
    # decoding and re-encoding can merge tokens at the cut: lengthen the body until it fits
    keep = max(0, n - len(question))
    for _ in range(16):
        text = tokenizer.decode(body[:keep] + question)
        ids = tokenizer.encode(text)  # what TextTokenInput will see (special tokens included)
        if len(ids) >= n or keep >= len(body):
            break
        keep += n - len(ids)
    target = tokenizer.encode(TARGET_TEXT, add_special_tokens=False)
    return {"prompt_ids": ids, "target_ids": target, "prompt_text": text,
            "target_text": TARGET_TEXT, "seq": ids + target[:-1]}


# ----------------------------------------------------------------------------- method runners
@contextlib.contextmanager
def capture_first_positions(store: dict) -> Iterator[None]:
    """Record the explainer's earliest-suppressed-position vector (for the time estimate)."""
    import atman_kernels.explain.engine as ex

    original = ex.first_changed_position

    def wrapped(factors):
        out = original(factors)
        store["first"] = out.clone()
        return out

    ex.first_changed_position = wrapped
    try:
        yield
    finally:
        ex.first_changed_position = original


def atman_plan_tokens(first: torch.Tensor, n: int, chunk: int) -> list[int]:
    """Token-forwards of every call of a full AtMan explanation with prefix reuse: the
    unsuppressed forward (n) then each chunk of variants sorted by earliest position p,
    recomputing (n - min p) positions for each of its variants (the explainer's schedule)."""
    first = first.clamp(max=n - 1)
    order = torch.argsort(first, stable=True)
    tokens = [n]
    for s in range(0, len(order), chunk):
        idx = order[s : s + chunk]
        tokens.append(len(idx) * (n - int(first[idx].min())))
    return tokens


def make_runner(method: str, model, tokenizer, case: dict, batch: int
                ) -> tuple[Callable[[], Any], Callable[[CallBudget], int] | None, str]:
    """(run, total_calls(budget) for the time estimate, note). ``run()`` explains once."""
    from _baselines import (
        attention_x_gradient,
        feature_ablation,
        input_x_gradient,
        integrated_gradients,
    )

    ids = torch.tensor(case["seq"])[None]
    target = torch.tensor(case["target_ids"])
    n_target = len(case["target_ids"])
    if method in ("forward", "forward-nocache"):
        use_cache = method == "forward"

        def run():
            with torch.inference_mode():
                return model(input_ids=ids.expand(batch, -1), use_cache=use_cache,
                             logits_to_keep=n_target).logits

        return run, None, f"batch {batch}, use_cache={use_cache}"
    if method in ("atman", "atman-reference"):
        from atman_kernels.explain import AtManExplainer

        backend = "reference" if method == "atman-reference" else "auto"
        explainer = AtManExplainer(model, tokenizer, batch_size=batch, progress=False,
                                   backend=backend)
        store: dict = {}

        def run():
            with capture_first_positions(store):
                return explainer.explain(case["prompt_ids"], case["target_ids"]).scores

        def total(budget: CallBudget) -> int:
            return len(atman_plan_tokens(store["first"], len(case["seq"]), batch))

        run.store = store
        return run, total, f"{batch} variants per forward, prefix reuse"
    if method.startswith("ig-"):
        steps = int(method.split("-")[1])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        def run():
            return integrated_gradients(model, ids, target, n_steps=steps,
                                        internal_batch_size=batch, baseline_id=pad)

        run.store = {}

        def total(budget: CallBudget) -> int:
            return 2 + -(-steps // batch)  # 2 layer evaluations + the internal batches

        return run, total, f"n_steps={steps}, internal_batch_size={batch}"
    if method == "ixg":
        return (lambda: input_x_gradient(model, ids, target)), None, "batch 1"
    if method == "feature-ablation":
        def run():
            return feature_ablation(model, tokenizer, case["prompt_text"], case["target_text"])

        def total(budget: CallBudget) -> int:
            return 1 + len(case["prompt_ids"])

        return run, total, "1 forward per prompt token + 1, one at a time, full logits"
    if method == "chefer":
        model.set_attn_implementation("eager")
        return (lambda: attention_x_gradient(model, ids, target)), None, "eager attention"
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def estimate_seconds(method: str, run, budget: CallBudget, total_calls: int, elapsed: float,
                     case: dict, batch: int) -> tuple[float, str]:
    """Full-explanation time extrapolated from a partial run, and how."""
    d = budget.durations()
    done = len(d)
    if method.startswith("atman"):
        plan = atman_plan_tokens(run.store["first"], len(case["seq"]), batch)
        measured = sum(budget.tokens[1:done])
        rate = sum(d[1:done]) / max(1, measured)
        rest = sum(plan[done:])
        return elapsed + rate * rest, (
            f"measured {done} of {len(plan)} forwards; the rest at the measured seconds per "
            "token-forward of the measured chunks")
    if method.startswith("ig-") and case.get("image_text"):
        run.store = {"ig_prelim_s": elapsed - sum(d), "ig_batch_s": d[-1]}
        return elapsed + d[-1] * (total_calls - done), (
            f"measured {done} of {total_calls} internal batches (forward + backward) after the "
            "vision tower; the rest at the measured internal batch's time")
    if method.startswith("ig-"):
        run.store = {"ig_prelim_s": sum(d[:-1]), "ig_batch_s": d[-1]}
        return elapsed + d[-1] * (total_calls - done), (
            f"measured {done} of {total_calls} forward calls (2 layer evaluations + 1 internal "
            "batch with backward); the rest at the measured internal batch's time")
    unit = sum(d[1:]) / max(1, done - 1)
    return elapsed + unit * (total_calls - done), (
        f"measured {done} of {total_calls} forwards; the rest at their mean time")


def _num(seconds: float) -> str:
    """Seconds for the CSV: 4 significant digits, no exponent."""
    return f"{seconds:.0f}" if seconds >= 1000 else f"{seconds:.4g}"


def _oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or any(
        s in text for s in ("out of memory", "can't allocate", "cannot allocate",
                            "failed to allocate", "std::bad_alloc"))


def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmSize not in /proc/self/status")


def measure_one(row: dict, *, mem_cap: bool = True) -> dict:
    """Measure one (model, method, n) row in this process. Returns the row with results."""
    torch.set_num_threads(int(row["threads"]))
    torch.manual_seed(0)
    method, n, batch = row["method"], int(row["n"]), int(row["batch"])
    model, tokenizer = load_model(row["model"])
    model.requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    out = {**row, "params_m": f"{params / 1e6:.0f}"}
    image_text = row["model"] in IMAGE_TEXT_MODELS
    if image_text:
        # The picture fixes the length (its image tokens), so the warm-up runs the measured
        # case itself, up to its first forward call (vision tower included).
        make, partial_calls = make_image_text_runner, IMAGE_TEXT_PARTIAL_CALLS
        warm_case = build_image_text_case(tokenizer)
        warm_calls = 1
    else:
        # Warm-up on a short prompt through the same code path (library loading, lazy init).
        make, partial_calls = make_runner, PARTIAL_CALLS
        warm_case = build_case(tokenizer, 16)
        warm_calls = PARTIAL_CALLS.get(method)
    warm, _, _ = make(method, model, tokenizer, warm_case, batch)
    budget = CallBudget(model, warm_calls)
    with contextlib.suppress(BudgetReached):
        warm()
    budget.remove()

    case = build_image_text_case(tokenizer) if image_text else build_case(tokenizer, n)
    if image_text and len(case["prompt_ids"]) != n:
        raise ValueError(f"row n={n} but the image-text prompt has {len(case['prompt_ids'])} "
                         "tokens")
    run, total_fn, note = make(method, model, tokenizer, case, batch)
    full = bool(row.get("full"))
    budget = CallBudget(model, None if full else partial_calls.get(method))
    out.update(seq_len=len(case["seq"]), n_target=len(case["target_ids"]), note=note)
    if image_text:
        out["image_tokens"] = case["image_tokens"]
    del warm, warm_case
    gc.collect()
    if mem_cap and row.get("mem_budget_gib"):
        cap = _vm_size() + int(float(row["mem_budget_gib"]) * 2**30)
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY
                                                else min(cap, hard), hard))
    load0 = os.getloadavg()[0]
    base = reset_peak_rss()
    status = "ok"
    with Stopwatch() as sw:
        try:
            run()
        except BudgetReached:
            status = "partial"
        except Exception as exc:  # noqa: BLE001 - an out-of-memory row is a result, not a crash
            if not _oom(exc):
                raise
            status = f"oom (over the {row.get('mem_budget_gib')} GiB budget)"
    elapsed = sw.seconds
    peak = peak_rss() - base
    budget.remove()
    out.update(status=status, peak_mib=f"{peak / 2**20:.1f}", calls=len(budget.times),
               loadavg=f"{(load0 + os.getloadavg()[0]) / 2:.1f}")
    if "first" in getattr(run, "store", {}):  # AtMan: one earliest position per variant
        out["units"] = int(run.store["first"].numel())
    if status == "ok":
        out["measured_s"] = _num(elapsed)
    elif status == "partial":
        total = total_fn(budget)
        est, how = estimate_seconds(method, run, budget, total, elapsed, case, batch)
        out.update(est_s=_num(est), est_how=how, calls_total=total)
        out.update({k: f"{v:.2f}" for k, v in getattr(run, "store", {}).items()
                    if k.startswith("ig_")})
    return out


def ig_from_partial(ig_row: dict, n_steps: int, batch: int) -> dict:
    """A partial IG row for ``n_steps`` from another IG row's partial run.

    Up to the stop (2 layer evaluations + 1 internal batch with backward) the runs of any
    n_steps >= batch are the same computation, so the peak is the same; the estimate uses the
    measured internal batch time for ceil(n_steps / batch) batches.
    """
    total = 2 + -(-n_steps // batch)
    est = float(ig_row["ig_prelim_s"]) + float(ig_row["ig_batch_s"]) * (total - 2)
    keep = ("model", "n", "batch", "threads", "full", "mem_budget_gib", "params_m", "seq_len",
            "n_target", "status", "peak_mib", "calls", "loadavg", "ig_prelim_s", "ig_batch_s")
    return {**{k: ig_row[k] for k in keep if k in ig_row}, "method": f"ig-{n_steps}",
            "note": f"n_steps={n_steps}, internal_batch_size={batch}; peak from the "
                    f"{ig_row['method']} run (identical up to its stop)",
            "est_s": _num(est), "calls_total": total,
            "est_how": "2 layer evaluations + the measured internal batch time x "
                       f"{total - 2} batches (from the {ig_row['method']} partial run)"}


# ----------------------------------------------------------------------------- sweep, output
def _key(r: dict) -> tuple[str, str, int]:
    return (r["model"], r["method"], int(r["n"]))


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """Rows of ``old`` whose key is not in ``new``, then ``new``; sorted by model, n, method."""
    keys = {_key(r) for r in new}
    rows = [r for r in old if _key(r) not in keys] + new
    order = {m: i for i, m in enumerate(METHODS)}
    mod = {m: i for i, m in enumerate(MODELS)}
    return sorted(rows, key=lambda r: (mod.get(r["model"], 9), int(r["n"]),
                                       order.get(r["method"], 99)))


def _f(r: dict, key: str) -> float | None:
    try:
        return float(r.get(key) or "nan") if r.get(key) not in (None, "") else None
    except ValueError:
        return None


def plot(rows: list[dict], png: Path) -> None:
    """Fig. 5 style: per model, peak memory and seconds per explanation vs prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(METHODS)}
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.2 * len(models)), squeeze=False)
    for row_axes, model in zip(axes, models, strict=True):
        sel = [r for r in rows if r["model"] == model]
        lengths = sorted({int(r["n"]) for r in sel})
        oom_marks = []
        for method in METHODS:
            mr = [r for r in sel if r["method"] == method]
            c = colors[method]
            mem = [(int(r["n"]), _f(r, "peak_mib")) for r in mr
                   if r["status"] in ("ok", "partial") and _f(r, "peak_mib") is not None]
            if mem:
                row_axes[0].plot(*zip(*mem, strict=True), "o-", color=c, label=method)
            oom_marks += [(int(r["n"]), c) for r in mr
                          if r["status"].startswith(("oom", "failed", "timeout"))]
            if method == "forward-nocache":
                continue  # the time panel shows one yardstick
            label = "forward of one batch (yardstick)" if method == "forward" else method
            meas = [(int(r["n"]), _f(r, "measured_s")) for r in mr if _f(r, "measured_s")]
            est = [(int(r["n"]), _f(r, "est_s")) for r in mr if _f(r, "est_s")]
            if meas:
                row_axes[1].plot(*zip(*meas, strict=True), "o-", color=c, label=label)
            if est:
                pts = sorted(meas[-1:] + est)
                row_axes[1].plot(*zip(*pts, strict=True), "o--", mfc="none", color=c,
                                 label=None if meas else f"{label} (est.)")
        if oom_marks:
            top = row_axes[0].get_ylim()[1]
            for x, c in oom_marks:
                row_axes[0].plot([x], [top], "x", color=c, ms=10, mew=2)
        params = sel[0].get("params_m", "?")
        row_axes[0].set_ylabel("peak RSS above the loaded model [MiB]")
        row_axes[1].set_ylabel("seconds per explanation (dashed: estimated)")
        for ax, what in zip(row_axes, ["memory", "time"], strict=True):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(FixedLocator(lengths))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([str(n) for n in lengths])
            ax.set_xlabel("prompt length [tokens]")
            ax.set_title(f"{model} ({params}M params, batch {sel[0].get('batch')}): {what}",
                         fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    stamp = rows[0] if rows else {}
    fig.suptitle(f"AtMan vs attribution baselines, fp32 CPU ({stamp.get('device', '')}, "
                 f"{stamp.get('threads', '?')} threads, {stamp.get('date', '')}); "
                 "x at the top of a memory panel: out of memory", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "llama-1b-random"],
                    choices=MODELS)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--lengths-1b", type=int, nargs="+", default=[128, 256, 512],
                    help="lengths for llama-1b-random (default: not 1024, for time)")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--batch", type=int, default=4,
                    help="AtMan variants per forward = forward yardstick batch = IG "
                         "internal_batch_size")
    ap.add_argument("--batch-1b", type=int, default=1,
                    help="--batch for llama-1b-random and llava-1b-random")
    ap.add_argument("--full-upto", type=int, default=128,
                    help="run complete explanations up to this prompt length ...")
    ap.add_argument("--full-models", nargs="*", default=["smollm2-135m", "tiny"],
                    help="... on these models; partial runs elsewhere")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-budget-gib", type=float, default=12.0,
                    help="address space a row may add above the loaded model (out of memory "
                         "beyond it)")
    ap.add_argument("--full-image-text", nargs="*", default=["forward", "forward-nocache"],
                    help="methods run to the end on the image-text models (llava-*); the "
                         "others stop early (partial); its prompt length is fixed by the "
                         "picture (576 image tokens + the question on llava-1b-random)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per row")
    ap.add_argument("--csv", type=Path, default=RESULTS / "memory_cpu.csv",
                    help="the CSV; its PNG beside it, and its table in MEMORY.md for the "
                         "default CSV, else in a .md file beside the CSV")
    ap.add_argument("--plot", action="store_true", help="only redraw PNG and MEMORY.md")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one))), flush=True)
        return
    png = args.csv.with_suffix(".png")
    md = (args.csv.parent / "MEMORY.md" if args.csv.name == "memory_cpu.csv"
          else args.csv.with_suffix(".md"))
    rows = read_csv(args.csv)
    if not args.plot:
        stamp = machine_stamp()
        stamp["threads"] = str(args.threads)
        new: list[dict] = []
        for model in args.models:
            image_text = model in IMAGE_TEXT_MODELS
            if image_text:  # the picture fixes the length
                lengths = [len(build_image_text_case(image_text_processor(model))["prompt_ids"])]
            else:
                lengths = args.lengths_1b if model == "llama-1b-random" else args.lengths
            methods = [m for m in args.methods
                       if m in (IMAGE_TEXT_METHODS if image_text else TEXT_METHODS)]
            for n in lengths:
                for method in methods:
                    full = (method in args.full_image_text if image_text
                            else n <= args.full_upto and model in args.full_models)
                    batch = (args.batch_1b if model in ("llama-1b-random", "llava-1b-random")
                             else args.batch)
                    row = {"model": model, "method": method, "n": n, "batch": batch,
                           "threads": args.threads, "full": int(full),
                           "mem_budget_gib": args.mem_budget_gib}
                    row_clock = Stopwatch()
                    ig10 = next((r for r in new if _key(r) == (model, "ig-10", n)), None)
                    if (method == "ig-50" and not full and ig10 is not None
                            and ig10.get("status") == "partial" and batch <= 10):
                        res = ig_from_partial(ig10, 50, batch)
                    else:
                        res = run_isolated(Path(__file__), row, timeout=args.timeout)
                    res.update(stamp)
                    res["row_wall_s"] = f"{row_clock.seconds:.0f}"
                    new.append(res)
                    print(f"{model:16s} n={n:5d} {method:17s} {res['status'][:40]:40s} "
                          f"{res.get('peak_mib', ''):>9s} MiB  "
                          f"{res.get('measured_s') or ('~' + res.get('est_s', '')):>9s} s",
                          flush=True)
                    rows = merge_rows(read_csv(args.csv), new)
                    write_csv(args.csv, rows)
    plot(rows, png)
    write_report(md, markdown_report(rows))
    print(f"wrote {args.csv}, {png} and {md}")


TABLE_BEGIN, TABLE_END = "<!-- bench_memory table -->", "<!-- /bench_memory table -->"


def write_report(md: Path, table: str) -> None:
    """Put ``table`` between the markers of ``md`` (hand-written text around them stays)."""
    block = f"{TABLE_BEGIN}\n{table}{TABLE_END}"
    text = md.read_text() if md.exists() else f"# Memory and time\n\n{TABLE_BEGIN}\n{TABLE_END}\n"
    if TABLE_BEGIN in text and TABLE_END in text:
        head, rest = text.split(TABLE_BEGIN, 1)
        text = head + block + rest.split(TABLE_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    md.write_text(text)


def _secs(text: str) -> str:
    x = float(text)
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def markdown_report(rows: list[dict]) -> str:
    """The table and ratio lines for MEMORY.md (the reading is written by hand below it)."""
    lines = []
    for model in [m for m in MODELS if any(r["model"] == m for r in rows)]:
        sel = [r for r in rows if r["model"] == model]
        lengths = sorted({int(r["n"]) for r in sel})
        lines += [f"### {model} ({sel[0].get('params_m', '?')}M parameters, fp32, "
                  f"batch {sel[0].get('batch')})", "",
                  "Peak RSS above the loaded model, MiB (status) / seconds per explanation "
                  "(measured; `~` = estimated from a partial run)", "",
                  "| method | " + " | ".join(f"N={n}" for n in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for method in METHODS:
            cells = []
            for n in lengths:
                r = next((r for r in sel if r["method"] == method and int(r["n"]) == n), None)
                if r is None:
                    cells.append("not run")
                    continue
                st = r["status"]
                if st not in ("ok", "partial"):
                    short = "not run" if st.startswith("not run") else st  # why: in the CSV
                    cells.append(short.replace("|", "/"))
                    continue
                t = (_secs(r["measured_s"]) if r.get("measured_s")
                     else "~" + _secs(r.get("est_s", "nan")))
                cells.append(f"{float(r['peak_mib']):.0f} / {t} s"
                             + (" (partial)" if st == "partial" else ""))
            if any(c != "not run" for c in cells):
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
        regions = any(r["method"] == "atman-region4" for r in sel)
        lines.append("| N | atman / forward | atman / forward-nocache | atman / ig-10 | "
                     + ("atman-region4 / forward | atman-region4 / ig-10 |" if regions
                        else "atman-reference / forward |"))
        lines.append("|---|---|---|---|---|" + ("---|" if regions else ""))
        for n in lengths:
            get = {r["method"]: _f(r, "peak_mib") for r in sel if int(r["n"]) == n
                   and r["status"] in ("ok", "partial")}

            def ratio(a: str, b: str, get: dict = get) -> str:
                x, y = get.get(a), get.get(b)
                return f"{x / y:.2f}" if x is not None and y else "-"

            last = (f"{ratio('atman-region4', 'forward')} | {ratio('atman-region4', 'ig-10')}"
                    if regions else ratio('atman-reference', 'forward'))
            lines.append(f"| {n} | {ratio('atman', 'forward')} | "
                         f"{ratio('atman', 'forward-nocache')} | {ratio('atman', 'ig-10')} | "
                         f"{last} |")
        lines.append("")
    stamp = rows[0] if rows else {}
    where = stamp.get("machine") or stamp.get("device", "?")
    lines.append(f"Machine: {where}, {stamp.get('threads', '?')} threads, "
                 f"torch {stamp.get('torch', '?')}, {stamp.get('date', '?')}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
