"""Gemma 3 with images (issue 13, coverage): a small random Gemma3ForConditionalGeneration
explained through the vision-language front end.

Gemma 3's language model lets the tokens of one image attend to each other bidirectionally
(``token_type_ids`` marks them; the mask is built inside the model). The brute force here runs
the whole model (vision tower included) once per unit on the plain eager attention of
tests/_brute.py, so the model builds its own masks; the explainer runs the variants on the
language model alone with the baseline's recorded masks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _brute import _brute_causal_rows, _close, _unit_rows, block_layout, check_image_units
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    PreTrainedTokenizerFast,
)

import atman_kernels.hf  # noqa: F401  (registers "atman")
from atman_kernels.explain import AtManExplainer
from atman_kernels.explain.tasks import _first_changed_rows
from atman_kernels.suppression import suppression

WORDS = ["[UNK]", "<pad>", "<s>", "</s>", "what", "is", "this", "a", "dog", "cat", "?",
         "<start_of_image>", "<image_soft_token>", "<end_of_image>"]
BOI, IMAGE_ID, EOI = 11, 12, 13
PROMPT = "what <start_of_image> is this ?"
TARGET = [WORDS.index("a"), WORDS.index("dog"), WORDS.index("?")]
SIDE = 4  # 4 x 4 soft tokens per image: a 8 x 8 patch grid average-pooled 2 x 2
SLIDING = ("sliding_attention", "full_attention")
FULL = ("full_attention", "full_attention")


def _processor() -> Gemma3Processor:
    from transformers import Gemma3ImageProcessor

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>", bos_token="<s>",
        eos_token="</s>", extra_special_tokens={"boi_token": "<start_of_image>",
                                                "image_token": "<image_soft_token>",
                                                "eoi_token": "<end_of_image>"})
    return Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}),
                           tokenizer=fast, image_seq_length=SIDE * SIDE)


def tiny_gemma3(layer_types=SLIDING, seed=0) -> Gemma3ForConditionalGeneration:
    """Two text layers (a sliding window of 4 tokens over a 16-token image block, then full
    attention; or full attention only, where the cache allows prefix reuse), one SigLIP layer
    over 8 x 8 patches pooled to 4 x 4 soft tokens."""
    torch.manual_seed(seed)
    cfg = Gemma3Config(
        text_config=dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, sliding_window=4, layer_types=list(layer_types),
                         max_position_embeddings=64, initializer_range=0.2, pad_token_id=1,
                         bos_token_id=2, eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, image_size=32, patch_size=4),
        mm_tokens_per_image=SIDE * SIDE, image_token_index=IMAGE_ID, boi_token_index=BOI,
        eoi_token_index=EOI, initializer_range=0.2)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # transformers initialises the projection to zeros: all images alike
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.5)
    return model


def _picture(h=50, w=80, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _inputs(processor=None):
    processor = processor or _processor()
    return dict(processor(text=PROMPT, images=[_picture()], return_tensors="pt"))


def _full_sequence(inputs, target):
    """input_ids and token_type_ids of prompt + target[:-1], the rest of the inputs as given."""
    ids = torch.tensor([inputs["input_ids"][0].tolist() + target[:-1]])
    types = torch.nn.functional.pad(inputs["token_type_ids"], (0, len(target) - 1))
    return {"input_ids": ids, "pixel_values": inputs["pixel_values"], "token_type_ids": types}


def brute_gemma3(model, inputs, target, units, mode="paper", c=0.1, token_types=True):
    """[T, V] CE rises: one full forward of the whole model per unit (vision tower included,
    the model building its own masks), the language model on the test's eager attention.
    ``token_types=False`` drops token_type_ids: the image blocks are then causal."""
    full = _full_sequence(inputs, target)
    if not token_types:
        del full["token_type_ids"]
    seq = full["input_ids"][0].tolist()
    return _brute_causal_rows(model, seq, inputs["input_ids"].shape[1], target,
                              _unit_rows(len(seq), units, c), mode, inputs=full,
                              switch=model.get_decoder())


def _image_block(inputs):
    ids = inputs["input_ids"][0].tolist()
    pos = [i for i, t in enumerate(ids) if t == IMAGE_ID]
    assert pos == list(range(pos[0], pos[0] + SIDE * SIDE))
    return pos[0], pos[-1]


# --------------------------------------------------------------------------------- parity
def test_factors_one_equal_the_models_own_eager_logits():
    """Under the explainer's scoping ("atman" in the language model only, the vision tower on
    its own attention) and factors 1, the logits are the eager model's; the explanation's
    baseline is the eager model's cross-entropy."""
    model, inputs = tiny_gemma3(), _inputs()
    full = _full_sequence(inputs, TARGET)
    n, n_prompt = full["input_ids"].shape[1], inputs["input_ids"].shape[1]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(**full).logits
    with atman_kernels.hf.atman_attention(model, only=model.get_decoder()), suppression(
            torch.ones(1, n)), torch.no_grad():
        assert model.config.vision_config._attn_implementation == "eager"
        atman = model(**full).logits
    torch.testing.assert_close(atman, eager, rtol=1e-5, atol=1e-5)
    expl = AtManExplainer(model, progress=False).explain(inputs, TARGET)
    logp = torch.log_softmax(eager[0].double(), -1)
    ce = -logp[torch.arange(n_prompt - 1, n), torch.tensor(TARGET)]
    torch.testing.assert_close(expl.baseline_loss, ce, rtol=1e-5, atol=1e-6)
    assert model.config.text_config._attn_implementation == "eager"


@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("layer_types", [SLIDING, FULL], ids=["sliding", "full"])
@pytest.mark.parametrize("region", [None, 2])
def test_image_and_text_units_equal_brute_force(mode, layer_types, region):
    model, processor = tiny_gemma3(layer_types), _processor()
    inputs = _inputs(processor)
    expl = AtManExplainer(model, processor, mode=mode, progress=False, batch_size=3).explain(
        inputs, TARGET, image_region=region)
    assert expl.kind == "image_text"
    assert {s.source for s in expl.spans} == {"prompt", "image", "target"}
    n_cells = SIDE * SIDE if region is None else (SIDE // region) ** 2
    assert sum(s.source == "image" for s in expl.spans) == n_cells
    assert expl.score_map(0).shape == (SIDE, SIDE)
    # units from the processor's soft-token block (tests/_brute.py), not the explainer's
    units, verify = check_image_units(
        expl, block_layout(inputs["input_ids"][0].tolist(), BOI, EOI, IMAGE_ID), region)
    expected = brute_gemma3(model, inputs, TARGET, units, mode)
    _close(expl.per_target, expected)
    verify()
    # a plain cache (full attention only) reuses the prefix; sliding layers turn it off
    assert expl.settings["prefix_reuse"] is (layer_types == FULL)
    if layer_types == SLIDING:  # asked for (the default) but impossible: the reason is given
        assert "sliding-window" in expl.settings["prefix_reuse_off"]
    else:
        assert "prefix_reuse_off" not in expl.settings


def test_the_bidirectional_image_block_matters_here():
    """The check above could not tell a causal image block apart unless the two differ on this
    model: they do (by far more than the tolerance), and the explainer equals the
    bidirectional one."""
    model, inputs = tiny_gemma3(FULL), _inputs()
    expl = AtManExplainer(model, progress=False, batch_size=4).explain(inputs, TARGET)
    units = [list(s.positions) for s in expl.spans]
    bidirectional = brute_gemma3(model, inputs, TARGET, units)
    causal = brute_gemma3(model, inputs, TARGET, units, token_types=False)
    assert float((bidirectional - causal).abs().max()) > 1e-2
    _close(expl.per_target, bidirectional)


# ------------------------------------------------------------------------- masks and reuse
@pytest.mark.parametrize("layer_types", [SLIDING, FULL], ids=["sliding", "full"])
def test_variant_forwards_get_the_baseline_bidirectional_masks(layer_types):
    """Every forward of the language model (baseline and variants) receives prepared masks in
    which the first image token sees the last one (bidirectional within the image, never a
    plain causal mask rebuilt from the embeddings), the rows of the variant's positions,
    expanded over its variants; the sliding-window mask keeps its window outside the image."""
    model, inputs = tiny_gemma3(layer_types), _inputs()
    a, b = _image_block(inputs)
    n = inputs["input_ids"].shape[1] + len(TARGET) - 1
    calls = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((kwargs["inputs_embeds"].shape,
                                              kwargs["attention_mask"])), with_kwargs=True)
    try:
        AtManExplainer(model, progress=False, batch_size=3).explain(inputs, TARGET)
    finally:
        hook.remove()
    assert len(calls) > 2
    for (batch, length, _), masks in calls:
        assert isinstance(masks, dict) and set(masks) >= set(layer_types)
        start = n - length
        for kind in set(layer_types):
            mask = masks[kind]
            assert mask.dtype == torch.bool and mask.shape == (batch, 1, length, n)
            if start <= a:  # the image block's rows are in this forward
                assert bool(mask[:, 0, a - start, b].all())  # first image token sees the last
            assert not bool(mask[:, 0, :, n - 1][:, : length - 1].any())  # causal elsewhere
        if "sliding_attention" in masks and start == 0:
            last = masks["sliding_attention"][0, 0, n - 1]
            assert last.tolist() == [k > n - 1 - 4 for k in range(n)]  # window of 4


def test_prefix_reuse_recomputes_image_variants_from_the_block_start():
    """Suppressing an image token changes earlier rows of its image: with prefix reuse (full
    attention only) every variant's forward starts at or before its first changed row, so no
    forward starts inside the image block; the scores equal a full recompute."""
    model, inputs = tiny_gemma3(FULL), _inputs()
    a, b = _image_block(inputs)
    n = inputs["input_ids"].shape[1] + len(TARGET) - 1
    lengths = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]),
        with_kwargs=True)
    try:
        reused = AtManExplainer(model, progress=False, batch_size=1).explain(inputs, TARGET)
    finally:
        hook.remove()
    starts = {n - length for length in lengths[1:]}
    assert reused.settings["prefix_reuse"]
    assert a in starts and not starts & set(range(a + 1, b + 1))
    assert max(starts) > b  # text after the image still reuses its prefix
    full = AtManExplainer(model, progress=False, batch_size=1, prefix_reuse=False).explain(
        inputs, TARGET)
    _close(reused.per_target, full.per_target)
    assert reused.settings["token_forwards"] < full.settings["token_forwards"]


def test_first_changed_rows_follow_visibility_through_layers():
    n = 8
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    block = causal.clone()
    block[2:5, 2:5] = True  # positions 2..4 see each other
    assert _first_changed_rows([causal[None, None]], n) == list(range(n))
    assert _first_changed_rows([block[None, None]], n) == [0, 1, 2, 2, 2, 5, 6, 7]
    # an additive float mask: the dtype's minimum hides a key
    additive = torch.zeros(n, n).masked_fill(~block, torch.finfo(torch.float32).min)
    assert _first_changed_rows([additive[None, None]], n) == [0, 1, 2, 2, 2, 5, 6, 7]
    # chained: key 6 reaches row 4 in one layer, row 4 reaches row 1 in the next
    chained = causal.clone()
    chained[4, 6] = True
    chained[1, 4] = True
    assert _first_changed_rows([chained[None, None]], n)[6] == 1


# ---------------------------------------------------------------------- inputs and refusals
def test_pictures_map_to_cells_and_a_generated_target():
    model, processor = tiny_gemma3(), _processor()
    expl = AtManExplainer(model, processor, progress=False).explain((PROMPT, [_picture()]),
                                                                    TARGET)
    boxes = {s.text: s.box for s in expl.spans if s.source == "image"}
    # Gemma 3 resizes 80 x 50 to 32 x 32 (no crop): cell (r, c) is a 20 x 12.5 rectangle
    x0, y0, x1, y1 = boxes["image 0 whole (1,2)"]
    assert abs(x0 - 40) < 1.5 and abs(x1 - 60) < 1.5 and abs(y0 - 12.5) < 1.5 and (
        abs(y1 - 25) < 1.5)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 1
    inputs = _inputs(processor)
    generated = AtManExplainer(model, processor, progress=False).explain(inputs, None,
                                                                         max_new_tokens=3)
    greedy = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=1)
    assert generated.settings["target_ids"] == greedy[0, inputs["input_ids"].shape[1]:].tolist()


def test_text_only_gemma3_stays_a_causal_lm_and_bad_image_inputs_are_refused():
    model, processor = tiny_gemma3(), _processor()
    inputs = _inputs(processor)
    ex = AtManExplainer(model, processor, progress=False)
    assert ex.kind == "causal_lm"
    assert ex.explain([4, 5, 6, 10], TARGET).kind == "causal_lm"
    with pytest.raises(ValueError, match="takes token_type_ids"):
        ex.explain({k: v for k, v in inputs.items() if k != "token_type_ids"}, TARGET)
    with pytest.raises(ValueError, match="token_type_ids must be"):
        ex.explain({**inputs, "token_type_ids": torch.zeros_like(inputs["token_type_ids"])},
                   TARGET)
    with pytest.raises(ValueError, match="contrast= is not implemented for Gemma3"):
        ex.explain(inputs, TARGET, contrast=[9])
    with pytest.raises(ValueError, match="image_region=2 needs inputs with images"):
        ex.explain([4, 5, 6, 10], TARGET, image_region=2)
    with pytest.raises(ValueError, match="conceptual_threshold is not supported for Gemma3"):
        AtManExplainer(model, processor, progress=False,
                       conceptual_threshold=0.7).explain(inputs, TARGET)


def test_gemma4_with_images_is_refused_by_name_with_the_reason():
    pytest.importorskip("transformers.models.gemma4", reason="Gemma 4 is newer than this "
                        "transformers")
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    torch.manual_seed(0)
    cfg = Gemma4Config(
        text_config=dict(vocab_size=64, vocab_size_per_layer_input=64,
                         hidden_size_per_layer_input=8, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, global_head_dim=8, max_position_embeddings=64,
                         layer_types=["full_attention"] * 2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=4, head_dim=8),
        audio_config=None)
    model = Gemma4ForConditionalGeneration(cfg).eval()
    ex = AtManExplainer(model, progress=False)
    with pytest.raises(ValueError, match="Gemma4ForConditionalGeneration is explained as a "
                                         "causal LM on text only: with images, its language "
                                         "model takes per-layer inputs"):
        ex.explain({"input_ids": torch.tensor([[5, 6, 7]]),
                    "pixel_values": torch.zeros(1, 3, 16, 16)}, [8])


# ----------------------------------------------------------------------------------- CLI
def test_cli_explains_gemma3_with_an_image_as_the_library_does(tmp_path, capsys):
    """`atman explain --model <Gemma 3 folder> --image PICTURE` with the begin-of-image token as
    the prompt's placeholder: the library's numbers on the same model, picture and prompt."""
    from PIL import Image

    from atman_kernels.cli import main
    from atman_kernels.explain import Explanation

    model, processor = tiny_gemma3(FULL, seed=4), _processor()
    model.save_pretrained(tmp_path / "gemma3")
    processor.save_pretrained(tmp_path / "gemma3")
    Image.fromarray(_picture()).save(tmp_path / "picture.png")
    out = tmp_path / "e.json"
    code = main(["explain", "--model", str(tmp_path / "gemma3"), "--image",
                 str(tmp_path / "picture.png"), "--prompt", PROMPT, "--target", "a dog ?",
                 "--image-region", "2", "--batch-size", "3", "--json", str(out), "--quiet",
                 "--no-color"])
    assert code == 0, capsys.readouterr()
    expl = Explanation.from_json(out)
    assert expl.kind == "image_text" and sum(s.source == "image" for s in expl.spans) == 4
    with Image.open(tmp_path / "picture.png") as im:
        again = im.convert("RGB")
    direct = AtManExplainer(model, processor, progress=False, batch_size=3).explain(
        (PROMPT, [again]), "a dog ?", image_region=2)
    torch.testing.assert_close(expl.scores, direct.scores.double(), rtol=1e-4, atol=1e-6)
    # a prompt without the placeholder is a usage error naming it, before the model loads
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--model", str(tmp_path / "gemma3"), "--image",
              str(tmp_path / "picture.png"), "--prompt", "what is this ?", "--target", "a"])
    assert exc.value.code == 2 and "'<start_of_image>'" in capsys.readouterr().err
