"""Vision-language models (issue: image-text explanations) on small random LLaVA and Idefics3.

Scores are checked against an independent brute force: one full forward of the whole model
(vision tower included) per unit, the suppression applied in the language model only through
the plain eager attention of tests/_brute.py, float64 cross-entropy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _brute import (
    _brute_causal_rows,
    _close,
    _unit_rows,
    check_image_units,
    idefics3_layout,
    llava_layout,
    qwen2_vl_layout,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

import atman_kernels.hf  # noqa: F401  (registers "atman")
from atman_kernels.explain import AtManExplainer, Explanation
from atman_kernels.explain.vision import image_views, region_cells
from atman_kernels.suppression import suppression

MARKERS = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
SPECIAL = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
WORDS = ["[UNK]", "<pad>", "<s>", "</s>", "what", "is", "this", "a", "dog", "cat", "?",
         "picture", "of"] + SPECIAL + MARKERS
IMAGE_ID = WORDS.index("<image>")
PROMPT = "<image> what is this ?"
TARGET = [WORDS.index("a"), WORDS.index("dog"), WORDS.index("?")]


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL + MARKERS})
    return fast


def _text_config(seed_vocab=64):
    return LlamaConfig(vocab_size=seed_vocab, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128, initializer_range=0.2)


def tiny_llava(seed=0):
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, image_size=32, patch_size=8,
                              projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=_text_config(), image_token_id=IMAGE_ID,
                      vision_feature_layer=-1, vision_feature_select_strategy="default",
                      image_seq_length=16)
    model = LlavaForConditionalGeneration(cfg).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                           crop_size={"height": 32, "width": 32}),
        tokenizer=_tokenizer(), patch_size=8, vision_feature_select_strategy="default",
        image_token="<image>", num_additional_image_tokens=1)
    return model, processor


def tiny_idefics3(seed=0):
    torch.manual_seed(seed)
    vision = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
    text = _text_config().to_dict()
    cfg = Idefics3Config(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                         scale_factor=2)
    model = Idefics3ForConditionalGeneration(cfg).eval()
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(size={"longest_edge": 64},
                                               max_image_size={"longest_edge": 32}),
        tokenizer=_tokenizer(), image_seq_len=4)
    return model, processor


def _picture(h=50, w=80, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _inputs(processor, picture):
    images = [[picture]] if isinstance(processor, Idefics3Processor) else [picture]
    return dict(processor(text=PROMPT, images=images, return_tensors="pt"))


def brute_vlm(model, inputs, target, units, mode="paper", c=0.1):
    """[T, V] CE rises: one full forward (vision tower included) per unit, the language model
    on the test's own eager attention, the vision tower on sdpa."""
    seq = inputs["input_ids"][0].tolist() + target[:-1]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    return _brute_causal_rows(model, seq, inputs["input_ids"].shape[1], target,
                              _unit_rows(len(seq), units, c), mode,
                              inputs={"input_ids": torch.tensor([seq]), **extra},
                              switch=model.get_decoder())


# --------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("make", [tiny_llava, tiny_idefics3], ids=["llava", "idefics3"])
@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("region", [None, 2])
def test_image_and_text_units_equal_brute_force(make, mode, region):
    model, processor = make()
    inputs = _inputs(processor, _picture())
    ex = AtManExplainer(model, processor, mode=mode, progress=False, batch_size=5)
    expl = ex.explain(inputs, TARGET, image_region=region)
    assert expl.kind == "image_text"
    assert {s.source for s in expl.spans} == {"prompt", "image", "target"}
    image_units = [s for s in expl.spans if s.source == "image"]
    assert all(s.image == 0 for s in image_units)
    units, verify = check_image_units(expl, _layout(processor, inputs), region)
    expected = brute_vlm(model, inputs, TARGET, units, mode)
    _close(expl.per_target, expected)
    verify()
    assert expl.settings["forwards"] == 1 + -(-len(expl.spans) // 5)


def _layout(processor, inputs):
    """Each view's {(row, col): position}, read from the processor's input_ids (tests/_brute.py,
    independent of the explainer's maps)."""
    ids = inputs["input_ids"][0].tolist()
    if isinstance(processor, Idefics3Processor):
        return idefics3_layout(ids, IMAGE_ID, processor.tokenizer.convert_ids_to_tokens)
    return llava_layout(ids, IMAGE_ID)


def test_prefix_reuse_equals_full_recompute_across_image_tokens():
    model, processor = tiny_idefics3(1)
    inputs = _inputs(processor, _picture())
    a = AtManExplainer(model, processor, progress=False, batch_size=4).explain(inputs, TARGET)
    b = AtManExplainer(model, processor, progress=False, batch_size=4,
                       prefix_reuse=False).explain(inputs, TARGET)
    assert a.settings["prefix_reuse"] and not b.settings["prefix_reuse"]
    _close(a.per_target, b.per_target, rel=1e-5)
    assert a.settings["token_forwards"] < b.settings["token_forwards"]


# --------------------------------------------------------------------- vision tower, scoping
def test_vision_tower_runs_once_unsuppressed_and_implementations_are_restored():
    model, processor = tiny_llava(2)
    inputs = _inputs(processor, _picture())
    tower = model.model.vision_tower
    outputs = []
    hook = tower.register_forward_hook(lambda m, a, out: outputs.append(
        out.last_hidden_state.detach().clone()))
    try:
        AtManExplainer(model, processor, progress=False).explain(inputs, TARGET)
    finally:
        hook.remove()
    assert len(outputs) == 1  # the baseline only: variants reuse its merged embeddings
    plain = tower(inputs["pixel_values"]).last_hidden_state
    torch.testing.assert_close(outputs[0], plain, rtol=0, atol=1e-6)
    # under the explainer's scoping and an active suppression, the tower is unchanged
    with atman_kernels.hf.atman_attention(model, only=model.get_decoder()), suppression(
            torch.full((1, 20), 0.1)), torch.no_grad():
        assert model.config.vision_config._attn_implementation != "atman"
        assert model.config.text_config._attn_implementation == "atman"
        torch.testing.assert_close(tower(inputs["pixel_values"]).last_hidden_state, plain)
    assert model.config.text_config._attn_implementation != "atman"


def test_implementations_restored_after_an_error():
    model, processor = tiny_llava(3)
    before = (model.config.text_config._attn_implementation,
              model.config.vision_config._attn_implementation)
    inputs = _inputs(processor, _picture())
    with pytest.raises(ValueError, match="vocabulary"):
        AtManExplainer(model, processor, progress=False).explain(inputs, [999])
    assert (model.config.text_config._attn_implementation,
            model.config.vision_config._attn_implementation) == before


# ------------------------------------------------------------------------------- the maps
def test_idefics3_tiles_are_assembled_row_major_and_the_global_view_is_apart():
    g = 2  # 2x2 tokens per tile, 2x2 tiles
    ids = [1]
    positions = {}
    for r in range(2):
        for c in range(2):
            ids += [50, 100 + 10 * r + c]
            positions[(r, c)] = list(range(len(ids), len(ids) + g * g))
            ids += [IMAGE_ID] * (g * g)
    ids += [50, 200]
    global_positions = list(range(len(ids), len(ids) + g * g))
    ids += [IMAGE_ID] * (g * g) + [50, 7]
    names = {100 + 10 * r + c: f"<row_{r + 1}_col_{c + 1}>" for r in range(2) for c in range(2)}
    views = image_views("idefics3", ids, IMAGE_ID, lambda t: names.get(t, "<global-img>"))
    whole, glob = views
    assert (whole.view, whole.grid, glob.view, glob.grid) == ("whole", (4, 4), "global", (2, 2))
    for (r, c), pos in positions.items():
        for k, p in enumerate(pos):  # token k of tile (r, c) is block (k // g, k % g)
            assert whole.positions[(r * g + k // g) * 4 + c * g + k % g] == p
    assert glob.positions == global_positions


def test_a_suppressed_patch_lands_on_its_cell():
    """Suppressing exactly the tokens of one cell changes the explanation's map at that cell
    only (the map of units is checked against positions, not assumed)."""
    model, processor = tiny_llava(4)
    inputs = _inputs(processor, _picture())
    expl = AtManExplainer(model, processor, progress=False).explain(inputs, TARGET)
    image_pos = [i for i, t in enumerate(inputs["input_ids"][0].tolist()) if t == IMAGE_ID]
    smap = expl.score_map(image=0)
    for cell in (0, 5, 15):  # LLaVA: token k of the run is patch (k // 4, k % 4)
        unit = next(i for i, s in enumerate(expl.spans) if s.positions == (image_pos[cell],))
        assert float(smap[cell // 4, cell % 4]) == float(expl.scores[unit])


def test_boxes_are_in_the_original_picture_through_resize_and_crop():
    model, processor = tiny_llava(5)
    picture = _picture(50, 80)
    expl = AtManExplainer(model, processor, progress=False).explain((PROMPT, [picture]),
                                                                    TARGET)
    boxes = {s.text: s.box for s in expl.spans if s.source == "image"}
    # CLIP: shortest edge 50 -> 32 (x0.64, width 80 -> 51), centre crop 32 (left 9 or 10):
    # patch (0, 0) = processed x 9..17, y 0..8 -> original x ~14..27, y 0..12.5
    x0, y0, x1, y1 = boxes["image 0 whole (0,0)"]
    assert abs(x0 - 9.5 / 0.64) < 2 and abs(x1 - 17.5 / 0.64) < 2
    assert y0 < 0.5 and abs(y1 - 8 / 0.64) < 1.5  # within interpolation at the edge
    assert all(0 <= b[0] < b[2] <= 80 and 0 <= b[1] < b[3] <= 50 for b in boxes.values())
    tiled = AtManExplainer(*tiny_idefics3(5), progress=False).explain(
        (PROMPT, [picture]), TARGET)
    views = {(v["image"], v["view"]) for v in tiled.image_views}
    assert views == {(0, "whole"), (0, "global")}
    assert tiled.score_map(0).shape == (4, 4) and tiled.score_map(0, "global").shape == (2, 2)
    tile_boxes = [s.box for s in tiled.spans if s.source == "image" and "whole" in s.text]
    # the 4x4 whole-view cells tile the picture: together they cover it
    assert min(b[0] for b in tile_boxes) < 0.5 and max(b[2] for b in tile_boxes) > 79.5
    assert min(b[1] for b in tile_boxes) < 0.5 and max(b[3] for b in tile_boxes) > 49.5
    back = Explanation.from_json(tiled.to_json())
    assert back.image_views == tiled.image_views and back.spans == tiled.spans
    assert torch.equal(back.score_map(0, "global"), tiled.score_map(0, "global"))


def test_regions_are_k_by_k_with_a_ragged_edge():
    assert region_cells((4, 4), 2) == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13],
                                       [10, 11, 14, 15]]
    ragged = region_cells((3, 3), 2)
    assert [len(r) for r in ragged] == [4, 2, 2, 1]
    assert sorted(c for r in ragged for c in r) == list(range(9))


def test_generated_target_with_images():
    model, processor = tiny_llava(6)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 1
    inputs = _inputs(processor, _picture())
    expl = AtManExplainer(model, processor, progress=False).explain(inputs, None,
                                                                    max_new_tokens=3)
    greedy = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=1)
    assert expl.settings["target_ids"] == greedy[0, inputs["input_ids"].shape[1]:].tolist()


# --------------------------------------------------------------------------------- errors
def test_bad_image_text_inputs_are_refused_before_any_work():
    model, processor = tiny_llava(7)
    ex = AtManExplainer(model, processor, progress=False)
    inputs = _inputs(processor, _picture())
    no_image = dict(processor(text="what is this ?", return_tensors="pt"))
    with pytest.raises(ValueError, match="no image token"):
        ex.explain({**no_image, "pixel_values": inputs["pixel_values"]}, TARGET)
    with pytest.raises(ValueError, match="no pixel_values"):
        ex.explain({"input_ids": inputs["input_ids"]}, TARGET)
    with pytest.raises(ValueError, match="image_region must be an int >= 1"):
        ex.explain(inputs, TARGET, image_region=0)
    with pytest.raises(ValueError, match="padding"):
        ex.explain({**inputs, "attention_mask": torch.tensor([[0] + [1] * 19])}, TARGET)
    with pytest.raises(ValueError, match="conceptual_threshold is not supported"):
        AtManExplainer(model, processor, conceptual_threshold=0.7)
    text_only = LlamaForCausalLM(_text_config()).eval()
    with pytest.raises(ValueError, match="LlamaForCausalLM is a text-only model"):
        AtManExplainer(text_only, processor.tokenizer, progress=False).explain(
            (PROMPT, [_picture()]), TARGET)
    with pytest.raises(ValueError, match="image_region must be an int >= 1 for a "
                                         "vision-language model"):
        AtManExplainer(text_only, progress=False).explain([1, 2], [3], image_region=2)


def test_unsupported_vision_language_classes_are_refused_by_name():
    from atman_kernels.explain import model_kind

    class PaliGemmaForConditionalGeneration:
        pass

    with pytest.raises(TypeError, match="unsupported model class PaliGemma"):
        model_kind(PaliGemmaForConditionalGeneration())


def tiny_qwen2_vl(seed=0):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    text = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256, "initializer_range": 0.2,
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}}
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "in_channels": 3, "initializer_range": 0.2}
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_ID,
                        vision_start_token_id=2, vision_end_token_id=3)
    return Qwen2VLForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("region", [None, 2])
def test_qwen2_vl_multimodal_rotary_positions_equal_brute_force(mode, region):
    """Qwen2-VL: 3-D rotary positions computed inside the model from the image grid; a
    non-square merged grid (2 x 4 tokens) maps row-major; prefix reuse equals recompute."""
    model = tiny_qwen2_vl()
    grid = torch.tensor([[1, 4, 8]])  # 4 x 8 patches, merged 2 x 2 -> 2 x 4 image tokens
    ids = torch.tensor([[5, 2] + [IMAGE_ID] * 8 + [3, 6, 7, 10]])
    inputs = {"input_ids": ids, "pixel_values": torch.randn(32, 3 * 2 * 14 * 14),
              "image_grid_thw": grid, "mm_token_type_ids": (ids == IMAGE_ID).long()}
    expl = AtManExplainer(model, progress=False, mode=mode, batch_size=4).explain(
        inputs, TARGET, image_region=region)
    assert expl.score_map(0).shape == (2, 4)
    units, verify = check_image_units(
        expl, qwen2_vl_layout(ids[0].tolist(), IMAGE_ID, grid.tolist(), merge=2), region)
    full = {**inputs, "mm_token_type_ids": torch.nn.functional.pad(
        inputs["mm_token_type_ids"], (0, len(TARGET) - 1))}
    expected = brute_vlm(model, full, TARGET, units, mode)
    _close(expl.per_target, expected)
    verify()
    full_recompute = AtManExplainer(model, progress=False, mode=mode, batch_size=4,
                                    prefix_reuse=False).explain(inputs, TARGET,
                                                                image_region=region)
    _close(full_recompute.per_target, expected)
