"""Image classifiers beyond ViT: CLIP / MetaCLIP 2 / SigLIP / SigLIP 2 vision towers and DeiT
with a distillation head, explained exactly (against the independent brute force of
``_brute.py``: one full forward per patch, the suppression formulas in a float64 attention of
their own), and the refusals and bad inputs that must fail before any work."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from _brute import _close, brute_classifier_units, unit_scale_

from atman_kernels.explain import AtManExplainer

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=16, patch_size=4)
TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=50, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
            pad_token_id=1)
LABELS = dict(num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})


def _clip_like(family, vision=None):
    vision = {**VISION, **(vision or {})}
    cfg = getattr(T, f"{family}Config")(text_config=TEXT, vision_config=vision, **LABELS)
    torch.manual_seed(0)
    return unit_scale_(getattr(T, f"{family}ForImageClassification")(cfg))


def _siglip2():
    vision = {**VISION, "num_patches": 16}
    vision.pop("image_size")
    cfg = T.Siglip2Config(text_config=TEXT, vision_config=vision, **LABELS)
    torch.manual_seed(0)
    return unit_scale_(T.Siglip2ForImageClassification(cfg))


def _pixels(shape=(1, 3, 16, 16), seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _check_against_brute(model, inputs, model_inputs, seq_len, positions, grid, cls=1):
    expl = AtManExplainer(model, progress=False, batch_size=5).explain(inputs, cls)
    assert list(expl.positions) == positions
    assert expl.patch_grid == grid
    expected = brute_classifier_units(model, model_inputs, seq_len, [[p] for p in positions],
                                      cls)
    _close(expl.per_target, expected)
    return expl


@pytest.mark.parametrize(("family", "vision", "first"), [
    ("CLIP", None, 1),  # a class token first
    ("MetaClip2", None, 1),
    ("Siglip", None, 0),  # no class token: every position is a patch
    ("Siglip", {"vision_use_head": False}, 0),
])
def test_clip_style_classifier_matches_brute_force(family, vision, first):
    model = _clip_like(family, vision)
    pixels = _pixels()
    _check_against_brute(model, pixels, {"pixel_values": pixels}, first + 16,
                         list(range(first, first + 16)), (4, 4))


def test_siglip2_classifier_with_padding_patches_matches_brute_force():
    """Pre-patchified pixels: a 3 x 4 image in 16 patch slots, the last 4 padding (masked
    keys, neither explained nor suppressed); units are the 12 real patches, row-major."""
    model = _siglip2()
    pixels = _pixels((1, 16, 48))
    mask = torch.tensor([[1] * 12 + [0] * 4])
    shapes = torch.tensor([[3, 4]])
    inputs = {"pixel_values": pixels, "pixel_attention_mask": mask, "spatial_shapes": shapes}
    expl = _check_against_brute(model, inputs, inputs, 16, list(range(12)), (3, 4))
    # the picture shown is the 3 x 4 patches put back in place ([C, 3p, 4p])
    assert tuple(expl.image.shape) == (3, 12, 16)
    assert torch.equal(expl.image[:, 4:8, 8:12],
                       pixels[0, 6].reshape(4, 4, 3).permute(2, 0, 1))


def test_deit_with_teacher_explains_the_averaged_heads():
    """DeiTForImageClassificationWithTeacher's logits are the mean of the class-token and
    distillation-token heads; the target class is read from them, and both prefix tokens stay
    unsuppressed (the patches start at position 2)."""
    cfg = T.DeiTConfig(**VISION, **LABELS)
    torch.manual_seed(0)
    model = unit_scale_(T.DeiTForImageClassificationWithTeacher(cfg))
    pixels = _pixels()
    _check_against_brute(model, pixels, {"pixel_values": pixels}, 18, list(range(2, 18)), (4, 4))


def test_layers_count_the_vision_towers_layers():
    """CLIP's classifier config holds a text config too: layers= is checked against the vision
    tower's depth (3 here), not the text tower's (2)."""
    model = _clip_like("CLIP", {"num_hidden_layers": 3})
    AtManExplainer(model, layers=[2])
    with pytest.raises(ValueError, match="has 3 layers"):
        AtManExplainer(model, layers=[3])


def _forward_counter(model):
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize(("inputs", "error", "match"), [
    (_pixels((1, 3, 32, 32)), ValueError, "32x32.*16x16"),  # not the position embeddings' size
    (_pixels((2, 3, 16, 16)), ValueError, r"\[1, C, H, W\]"),
    (_pixels((1, 1, 16, 16)), ValueError, "1 channels"),
    ({"pixel_values": _pixels(), "spatial_shapes": torch.tensor([[4, 4]])}, ValueError,
     "SigLIP 2 inputs"),
    ({"pixel_values": _pixels(), "labels": 1}, ValueError, "labels"),
    (torch.zeros(1, 3, 16, 16, dtype=torch.long), TypeError, "float tensor"),
])
def test_bad_pixels_fail_before_any_forward(inputs, error, match):
    model = _clip_like("Siglip")
    calls = _forward_counter(model.vision_model.encoder)
    with pytest.raises(error, match=match):
        AtManExplainer(model, progress=False).explain(inputs, 1)
    assert not calls


@pytest.mark.parametrize(("inputs", "match"), [
    ({"pixel_values": _pixels((1, 16, 48))}, "spatial_shapes"),
    ({"pixel_values": _pixels((1, 16, 48)), "spatial_shapes": torch.tensor([[5, 4]])},
     "does not fit"),
    ({"pixel_values": _pixels((1, 16, 48)), "spatial_shapes": torch.tensor([[3, 4]]),
      "pixel_attention_mask": torch.tensor([[0] * 4 + [1] * 12])}, "padding last"),
    ({"pixel_values": _pixels((1, 16, 40)), "spatial_shapes": torch.tensor([[3, 4]])},
     r"\[1, P, 48\]"),
])
def test_bad_siglip2_pixels_fail_before_any_forward(inputs, match):
    model = _siglip2()
    calls = _forward_counter(model.vision_model.encoder)
    with pytest.raises(ValueError, match=match):
        AtManExplainer(model, progress=False).explain(inputs, 1)
    assert not calls


def test_conceptual_suppression_compares_the_patch_embeddings():
    """CLIP: conceptual suppression compares the patch convolution's outputs (no class token,
    no position term), as the brute force's own loop over cosine similarities does."""
    from _brute import brute_classifier

    model = _clip_like("CLIP")
    pixels = _pixels()
    expl = AtManExplainer(model, progress=False, conceptual_threshold=0.3).explain(pixels, 1)
    with torch.no_grad():
        patches = model.vision_model.embeddings.patch_embedding(pixels).flatten(2)[0].T
    emb = torch.cat([torch.zeros(1, patches.shape[1]), patches])
    expected = brute_classifier(model, {"pixel_values": pixels}, range(1, 17), 17, 1,
                                kappa=0.3, emb=emb)
    plain = brute_classifier(model, {"pixel_values": pixels}, range(1, 17), 17, 1)
    assert float((expected - plain).abs().max()) > 1e-3  # some patches are similar enough
    _close(expl.per_target, expected)
