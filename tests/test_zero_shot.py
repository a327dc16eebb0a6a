"""Zero-shot image-text models (CLIPModel, MetaClip2Model, SiglipModel, Siglip2Model): the
target is one of several candidate label texts; the score is the rise of its cross-entropy
under the softmax over the model's ``logits_per_image``; the patches are suppressed in the
vision tower only.

The brute force is independent of the explainer: the model's own forward (text and vision
towers, its own logit formula) once per patch, with the vision tower's attention replaced by
the float64 suppression formulas of ``_brute.py`` and the text tower left as it is.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers as T
from _brute import BRUTE, _close, unit_scale_

from atman_kernels.explain import AtManExplainer
from atman_kernels.explain.render import headline, save_png, to_html
from atman_kernels.suppression import suppression

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=16, patch_size=4)
TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=50, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
            pad_token_id=1)
FAMILIES = ("CLIP", "MetaClip2", "Siglip", "Siglip2")


def _reinit(model, seed=0):
    """Unit-scale weights and a logit scale of 10 (sharp, but not saturated, softmax)."""
    unit_scale_(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
    return model


def _model(family):
    vision = dict(VISION)
    if family == "Siglip2":
        vision.pop("image_size")
        vision["num_patches"] = 16
    torch.manual_seed(0)
    cfg = getattr(T, f"{family}Config")(text_config=TEXT, vision_config=vision)
    return _reinit(getattr(T, f"{family}Model")(cfg))


def _image(family):
    gen = torch.Generator().manual_seed(1)
    if family == "Siglip2":  # a 3 x 4 patch image in 16 slots, padding last
        return {"pixel_values": torch.randn(1, 16, 48, generator=gen),
                "pixel_attention_mask": torch.tensor([[1] * 12 + [0] * 4]),
                "spatial_shapes": torch.tensor([[3, 4]])}
    return {"pixel_values": torch.randn(1, 3, 16, 16, generator=gen)}


def _candidates(k=3, length=6):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(2, 50, (k, length), generator=gen)
    ids[:, -1] = 1  # EOS last (CLIP pools at the EOS)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def brute_zero_shot(model, image, candidates, positions, label):
    """[len(positions)] rise of -log softmax(logits_per_image)[label], one full forward of the
    model per suppressed patch (factor 0.1 at that key of the vision tower's attention)."""
    tower = model.vision_model
    previous = tower.config._attn_implementation
    tower.set_attn_implementation(BRUTE)
    n = image["pixel_values"].shape[1] if image["pixel_values"].dim() == 3 else None
    try:
        with torch.no_grad():
            def ce(factors):
                with suppression(factors[None], "paper"):
                    logits = model(**candidates, **image).logits_per_image[0].double()
                return -torch.log_softmax(logits, -1)[label]

            seq = n or (positions[-1] + 1)
            base = ce(torch.ones(seq))
            rises = []
            for p in positions:
                f = torch.ones(seq)
                f[p] = 0.1
                rises.append(ce(f) - base)
    finally:
        tower.set_attn_implementation(previous)
    return torch.stack(rises)


POSITIONS = {"CLIP": list(range(1, 17)), "MetaClip2": list(range(1, 17)),
             "Siglip": list(range(16)), "Siglip2": list(range(12))}


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_shot_matches_brute_force(family):
    model = _model(family)
    image, cands = _image(family), _candidates()
    text_calls = []
    model.text_model.register_forward_pre_hook(lambda *a: text_calls.append(1))
    expl = AtManExplainer(model, progress=False, batch_size=5).explain(
        (image, cands), target=2, contrast=0)
    assert len(text_calls) == 1  # the text tower ran once, for all variants
    assert list(expl.positions) == POSITIONS[family]
    assert expl.kind == "image" and expl.settings["task"] == "zero_shot"
    assert expl.settings["zero_shot_score"].startswith("softmax")
    target = brute_zero_shot(model, image, cands, POSITIONS[family], 2)
    foil = brute_zero_shot(model, image, cands, POSITIONS[family], 0)
    _close(expl.per_target[0], target)
    _close(expl.contrast_per_target[0], foil)
    _close(expl.scores, target - foil)
    # the baseline is the model's own probability of the target among the candidates
    with torch.no_grad():
        p = model(**cands, **image).logits_per_image[0].double().softmax(-1)
    assert abs(float(expl.baseline_loss[0]) + math.log(float(p[2]))) < 1e-5


def test_zero_shot_renders_as_an_image_heatmap(tmp_path):
    model = _model("CLIP")
    expl = AtManExplainer(model, progress=False).explain((_image("CLIP"), _candidates()), 1)
    assert expl.patch_grid == (4, 4) and expl.target == "1"
    html = to_html(expl)
    assert '<table class="grid">' in html and html.count("<td style=") == 16
    w, h = save_png(expl, tmp_path / "zs.png")
    assert min(w, h) >= 224


class _WordTokenizer:
    """A whitespace tokenizer over a fixed vocabulary (no tokenizer files are available
    offline); pads with id 1 and ends every text with EOS (1)."""

    vocab = {w: i + 2 for i, w in enumerate("a photo of cat dog bird car".split())}

    def __call__(self, texts, padding=False, max_length=None, return_tensors=None, **_):
        rows = [[self.vocab[w] for w in t.split()] + [1] for t in texts]
        width = max_length if padding == "max_length" else max(len(r) for r in rows)
        ids = torch.tensor([r + [1] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family", ["CLIP", "Siglip"])
def test_label_texts_go_through_the_tokenizer(family):
    """Candidate texts are tokenised (SigLIP padded to its maximum length without a mask, as
    it was trained: its text tower pools the last position); the target is a candidate's
    text, the label shown."""
    model = _model(family)
    image = _image(family)
    names = ["a photo of a cat", "a photo of a dog", "a car"]
    tok = _WordTokenizer()
    expl = AtManExplainer(model, tok, progress=False).explain((image, names),
                                                              target="a photo of a dog")
    assert expl.target == "a photo of a dog" and expl.settings["candidates"] == names
    # the titles (terminal, HTML, PNG) name the candidates the target was chosen among
    assert "among 'a photo of a cat', 'a photo of a dog', 'a car'" in headline(expl)
    if family == "Siglip":
        enc = {"input_ids": tok(names, padding="max_length", max_length=16)["input_ids"]}
    else:
        enc = tok(names, padding=True)
    with torch.no_grad():
        p = model(**enc, **image).logits_per_image[0].double().softmax(-1)
    assert abs(float(expl.baseline_loss[0]) + math.log(float(p[1]))) < 1e-5


@pytest.mark.parametrize(("inputs", "target", "error", "match"), [
    ("image", "a cat", TypeError, r"inputs=\(image, candidates\)"),
    (("IMG", ["a cat", "a dog"]), "a bird", ValueError, "not one of the candidates"),
    (("IMG", []), 0, ValueError, "at least two"),
    (("IMG", ["a cat"]), 0, ValueError, "at least two"),
    (("IMG", ["a cat", "a cat"]), 0, ValueError, "repeat"),
    (("IMG", ["a cat", " "]), 0, ValueError, "empty label"),
    (("IMG", "a cat"), 0, TypeError, "list of label texts"),
    (("IMG", ["a cat", "a dog"]), 2, ValueError, "out of range"),
    (("IMG", ["a cat", "a dog"]), 1.0, TypeError, "candidate label text or its index"),
    ((torch.randn(1, 3, 8, 8), ["a cat", "a dog"]), 0, ValueError, "8x8.*16x16"),
    ((torch.randn(1, 3, 16), ["a cat", "a dog"]), 0, ValueError, r"\[1, C, H, W\]"),
    (("IMG", {"input_ids": torch.tensor([[2, 99, 1], [3, 4, 1]])}), 0, ValueError,
     r"\[0, 50\)"),
    (("IMG", {"input_ids": torch.ones(2, 17, dtype=torch.long)}), 0, ValueError,
     "16 positions"),
])
def test_bad_input_fails_before_any_forward(inputs, target, error, match):
    model = _model("CLIP")
    calls = []
    for tower in (model.vision_model.encoder, model.text_model):
        tower.register_forward_pre_hook(lambda *a: calls.append(1))
    if isinstance(inputs, tuple) and isinstance(inputs[0], str):
        inputs = (_image("CLIP"), inputs[1])
    with pytest.raises(error, match=match):
        AtManExplainer(model, _WordTokenizer(), progress=False).explain(inputs, target)
    assert not calls


def test_contrast_must_be_another_candidate():
    model = _model("CLIP")
    with pytest.raises(ValueError, match="the target itself"):
        AtManExplainer(model, progress=False).explain((_image("CLIP"), _candidates()), 1,
                                                      contrast=1)


def test_candidate_texts_without_a_tokenizer_are_refused():
    model = _model("CLIP")
    with pytest.raises(ValueError, match="processor or tokenizer"):
        AtManExplainer(model, progress=False).explain((_image("CLIP"), ["a cat", "a dog"]), 0)


def test_a_picture_goes_through_the_processors_image_processor():
    """With a processor (image_processor + tokenizer), a PIL picture and label texts work."""
    from types import SimpleNamespace

    from PIL import Image

    image_processor = T.CLIPImageProcessor(size={"shortest_edge": 16},
                                           crop_size={"height": 16, "width": 16})
    processor = SimpleNamespace(image_processor=image_processor, tokenizer=_WordTokenizer())
    picture = Image.fromarray(
        (torch.rand(24, 20, 3, generator=torch.Generator().manual_seed(3)) * 255)
        .to(torch.uint8).numpy())
    model = _model("CLIP")
    names = ["a cat", "a dog"]
    expl = AtManExplainer(model, processor, progress=False).explain((picture, names), "a dog")
    pixels = image_processor(images=picture, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        p = model(**_WordTokenizer()(names, padding=True), pixel_values=pixels
                  ).logits_per_image[0].double().softmax(-1)
    assert abs(float(expl.baseline_loss[0]) + math.log(float(p[1]))) < 1e-5
    assert expl.patch_grid == (4, 4)
