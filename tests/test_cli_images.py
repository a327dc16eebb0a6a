"""``atman explain`` on image classifiers (ViT, a CLIP tower) and zero-shot image-text models
(CLIP) end to end: tiny random models saved with their processors to folders, as a user's
model folder would be (nothing downloaded), the CLI's scores against the library's ``explain``
on the same picture, and every misuse one line, exit status 2, before the model loads, with
nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as T
from _brute import unit_scale_
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from atman_kernels.cli import build_parser, main
from atman_kernels.explain import AtManExplainer, Explanation

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=16, patch_size=4)
LABELS = dict(num_labels=3, id2label={0: "tabby cat", 1: "dog", 2: "car"},
              label2id={"tabby cat": 0, "dog": 1, "car": 2})
WORDS = ["[UNK]", "<|endoftext|>", "a", "photo", "of", "cat", "dog", "car", "bird"]
CANDIDATES = ["a photo of a cat", "a photo of a dog", "a car"]


def _tokenizer() -> T.PreTrainedTokenizerFast:
    """A word-level tokenizer that ends every text with <|endoftext|> (CLIP's text tower pools
    at the end-of-text token), built offline."""
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", 1)])
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                     pad_token="<|endoftext|>", eos_token="<|endoftext|>")


def _clip_image_processor():
    return T.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_vit")
    torch.manual_seed(0)
    unit_scale_(T.ViTForImageClassification(T.ViTConfig(**VISION, **LABELS))).save_pretrained(path)
    T.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_classifier_dir(tmp_path_factory):
    """A CLIP-tower image classifier saved with a whole CLIPProcessor (the image processor is
    its ``image_processor``)."""
    path = tmp_path_factory.mktemp("tiny_clip_classifier")
    text = dict(VISION, vocab_size=len(WORDS), max_position_embeddings=16)
    text.pop("image_size"), text.pop("patch_size")
    cfg = T.CLIPConfig(text_config=text, vision_config=VISION, **LABELS)
    torch.manual_seed(0)
    unit_scale_(T.CLIPForImageClassification(cfg), seed=4).save_pretrained(path)
    T.CLIPProcessor(image_processor=_clip_image_processor(),
                    tokenizer=_tokenizer()).save_pretrained(path)
    return path


def _clip_model():
    text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=len(WORDS), max_position_embeddings=16,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    model = unit_scale_(T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=VISION,
                                             projection_dim=16)), seed=5)
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(10.0)))
    return model


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_clip")
    _clip_model().save_pretrained(path)
    T.CLIPProcessor(image_processor=_clip_image_processor(),
                    tokenizer=_tokenizer()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def picture_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pictures") / "cat.png"
    rng = np.random.default_rng(3)
    Image.fromarray((rng.random((30, 24, 3)) * 255).astype("uint8")).save(path)
    return path


def _picture(path):
    with Image.open(path) as im:
        return im.convert("RGB")


def _library(folder, explain_inputs, target, contrast, processor):
    """The library's explanation of the same folder's model (``from_pretrained``), with the
    CLI's batch size; ``processor`` goes to the explainer."""
    config = T.AutoConfig.from_pretrained(folder, local_files_only=True)
    model = getattr(T, config.architectures[0]).from_pretrained(folder, local_files_only=True)
    return AtManExplainer(model, processor, progress=False, batch_size=5).explain(
        explain_inputs, target, contrast=contrast)


# --------------------------------------------------------------------------- image classifiers
@pytest.mark.parametrize(("folder", "target", "contrast", "label", "foil"), [
    ("vit_dir", "dog", None, "dog", None),
    ("vit_dir", "2", "tabby cat", "car", "tabby cat"),  # a class index, a foil label
    ("clip_classifier_dir", "0", None, "tabby cat", None),
])
def test_image_classifier_end_to_end_matches_the_library(request, folder, target, contrast,
                                                         label, foil, picture_file, tmp_path,
                                                         capsys):
    folder = request.getfixturevalue(folder)
    out_json, out_html, out_png = tmp_path / "e.json", tmp_path / "e.html", tmp_path / "e.png"
    argv = ["explain", "--model", str(folder), "--image", str(picture_file), "--target", target,
            "--json", str(out_json), "--html", str(out_html), "--png", str(out_png),
            "--no-color", "--top", "3", "--batch-size", "5"]
    if contrast is not None:
        argv += ["--contrast", contrast]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    headline = f"AtMan: why {label!r}" + ("" if foil is None else f" rather than {foil!r}")
    assert printed.startswith(headline) and folder.name in printed
    assert "16 patch units" in printed and "candidates:" not in printed
    assert ("minus the foil's" in printed) == (foil is not None)  # what the top scores mean
    expl = Explanation.from_json(out_json)
    assert expl.kind == "image" and expl.patch_grid == (4, 4) and expl.target == label
    assert expl.contrast == foil
    top = [line for line in printed.splitlines() if line.startswith(("   1.", "   2.", "   3."))]
    assert len(top) == 3 and all("'patch(" in line and "image position" in line for line in top)
    # the same numbers as the library on the pixels the folder's own image processor makes
    from atman_kernels.cli.loading import load_image_processor

    image_processor = load_image_processor(str(folder))
    pixels = image_processor(images=_picture(picture_file), return_tensors="pt")
    classes = LABELS["label2id"]
    direct = _library(folder, {"pixel_values": pixels["pixel_values"]},
                      int(target) if target.isdigit() else classes[target],
                      None if contrast is None else classes[contrast], None)
    torch.testing.assert_close(expl.scores, direct.scores.double(), rtol=1e-6, atol=1e-9)
    assert float(expl.scores.abs().max()) > 1e-4  # the random model's patches do matter
    assert out_html.read_text().count('<td style=') == 16
    with Image.open(out_png) as img:
        assert img.format == "PNG" and min(img.size) >= 224


# ----------------------------------------------------------------------------- zero-shot
@pytest.mark.parametrize("contrast", [None, "a car"])
def test_zero_shot_end_to_end_matches_the_library(clip_dir, picture_file, tmp_path, capsys,
                                                  contrast):
    out_json, out_html, out_png = tmp_path / "z.json", tmp_path / "z.html", tmp_path / "z.png"
    argv = ["explain", "--model", str(clip_dir), "--image", str(picture_file),
            "--labels", CANDIDATES[0], "--label", CANDIDATES[1], "--labels", CANDIDATES[2],
            "--target", "a photo of a dog", "--json", str(out_json), "--html", str(out_html),
            "--png", str(out_png), "--no-color", "--batch-size", "5"]
    if contrast is not None:
        argv += ["--contrast", contrast]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("AtMan: why 'a photo of a dog'")
    assert "candidates: 'a photo of a cat', 'a photo of a dog', 'a car'" in printed
    assert "16 patch units" in printed
    expl = Explanation.from_json(out_json)
    assert expl.settings["task"] == "zero_shot" and expl.settings["candidates"] == CANDIDATES
    assert expl.target == "a photo of a dog" and expl.contrast == contrast
    from atman_kernels.cli.loading import load_processor

    processor = load_processor(str(clip_dir))
    direct = _library(clip_dir, (_picture(picture_file), CANDIDATES), "a photo of a dog",
                      contrast, processor)
    torch.testing.assert_close(expl.scores, direct.scores.double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(expl.baseline_loss, direct.baseline_loss.double(), rtol=1e-6,
                               atol=1e-9)
    assert float(expl.scores.abs().max()) > 1e-4
    assert out_html.read_text().count('<td style=') == 16
    with Image.open(out_png) as img:
        assert img.format == "PNG"


def test_help_documents_the_labels_flag():
    text = build_parser().format_help()
    assert "--labels TEXT" in text and "zero-shot" in text and "path/to/clip" in text


# ------------------------------------------------------------------------------ misuse
FAILURES = [
    # (folder, argv, message)
    ("vit", ["--target", "dog"], "ViTForImageClassification is an image classifier: give the "
     "picture to explain with --image PATH"),
    ("vit", ["--image", "{picture}", "--image", "{picture}", "--target", "dog"],
     "explains one picture at a time: give --image once (got 2)"),
    ("vit", ["--image", "{picture}"], "--target is required: give the label name or class "
     "index"),
    ("vit", ["--image", "{picture}", "--target", ""], "--target is empty"),
    ("vit", ["--image", "{picture}", "--target", "cow"],
     "--target 'cow' is not one of the model's labels ('tabby cat', 'dog', 'car')"),
    ("vit", ["--image", "{picture}", "--target", "3"],
     "--target class 3 is out of range: the model has 3 classes (0 to 2)"),
    ("vit", ["--image", "{picture}", "--target", "dog", "--contrast", "1"],
     "--contrast '1' is the --target itself"),
    ("vit", ["--image", "{picture}", "--target", "dog", "--contrast", "cow"],
     "--contrast 'cow' is not one of the model's labels"),
    ("vit", ["--image", "{picture}", "--target", "dog", "--prompt", "a cat"],
     "is an image classifier: --prompt cannot be used (its input is the picture alone)"),
    ("vit", ["--image", "{picture}", "--target", "dog", "--prompt-file", "{picture}"],
     "--prompt-file cannot be used"),
    ("vit", ["--image", "{picture}", "--target", "dog", "--image-region", "2"],
     "--image-region cannot be used"),
    ("vit", ["--image", "{picture}", "--target", "dog", "--chat"], "--chat cannot be used"),
    ("vit", ["--image", "{picture}", "--target", "dog", "--granularity", "word"],
     "--granularity word cannot be used (its units are the image's patches)"),
    ("vit", ["--image", "{picture}", "--target", "dog", "--spans", "0:3"],
     "--spans cannot be used"),
    ("vit", ["--image", "{picture}", "--target", "dog", "--delimiter", "#"],
     "--delimiter cannot be used"),
    ("vit", ["--image", "{picture}", "--target", "dog", "--max-new-tokens", "3"],
     "--max-new-tokens cannot be used (nothing is generated)"),
    ("vit", ["--image", "{picture}", "--target", "dog", "--labels", "a", "--labels", "b"],
     "--labels cannot be used (the classes are the model's own labels"),
    ("vit", ["--image", "{missing}", "--target", "dog"], "cannot read --image"),
    ("vit", ["--image", "{not_a_picture}", "--target", "dog"], "cannot read --image"),
    ("vit", ["--image", "{picture}", "--target", "dog", "--json", "/proc/x.json"],
     "--json /proc/x.json: cannot write"),
    ("bare_vit", ["--image", "{picture}", "--target", "dog"],
     "holds no image processor (preprocessor_config.json): an image classifier folder"),
    ("vit", ["--input", "{data}", "--output", "{tmp}/o.jsonl"],
     "--input explains text prompts, and ViTForImageClassification is an image classifier"),
    ("clip", ["--image", "{picture}", "--target", "a car"],
     "CLIPModel is a zero-shot image-text model: give at least two candidate label texts, "
     "one --labels each (got 0)"),
    ("clip", ["--image", "{picture}", "--labels", "a car", "--target", "a car"],
     "(got 1)"),
    ("clip", ["--image", "{picture}", "--labels", "a car", "--labels", "a car",
              "--target", "a car"], "--labels 'a car' is given twice"),
    ("clip", ["--image", "{picture}", "--labels", "a car", "--labels", " ",
              "--target", "a car"], "--labels number 2 is empty"),
    ("clip", ["--image", "{picture}", "--labels", "a car", "--labels", "a dog",
              "--target", "a cat"],
     "--target 'a cat' is not one of the --labels ('a car', 'a dog')"),
    ("clip", ["--image", "{picture}", "--labels", "a car", "--labels", "a dog",
              "--target", "a car", "--contrast", "a bird"],
     "--contrast 'a bird' is not one of the --labels"),
    ("clip", ["--image", "{picture}", "--labels", "a car", "--labels", "a dog",
              "--target", "a car", "--contrast", "a car"], "is the --target itself"),
    ("clip", ["--image", "{picture}", "--labels", "a car", "--labels", "a dog"],
     "--target is required: give one of the --labels"),
    ("clip", ["--labels", "a car", "--labels", "a dog", "--target", "a car"],
     "CLIPModel is a zero-shot image-text model: give the picture to explain with --image"),
    ("clip", ["--image", "{picture}", "--labels", "a car", "--labels", "a dog",
              "--target", "a car", "--prompt", "a car"],
     "--prompt cannot be used (its texts are the candidate --labels)"),
    ("clip", ["--image", "{picture}", "--image", "{picture}", "--labels", "a car",
              "--labels", "a dog", "--target", "a car"], "give --image once (got 2)"),
    (None, ["--prompt", "the capital", "--labels", "a", "--labels", "b"],
     "--labels needs a zero-shot image-text model folder (CLIPModel, MetaClip2Model, "
     "SiglipModel, Siglip2Model): the bundled SmolLM2 is a text-only model"),
    ("text_config", ["--prompt", "the capital", "--labels", "a", "--labels", "b"],
     "--labels needs a zero-shot image-text model folder (CLIPModel, MetaClip2Model, "
     "SiglipModel, Siglip2Model): --model {tmp}/text is not one"),
    ("text_config", ["--prompt", "the capital", "--image", "{picture}", "--target", "a"],
     "--image needs a vision-language model (Gemma3ForConditionalGeneration, "
     "Idefics3ForConditionalGeneration, "),
    ("vit", ["--input", "{data}", "--output", "{tmp}/o.jsonl", "--labels", "a"],
     "--input and --labels cannot be used together"),
]


@pytest.mark.parametrize(("folder", "argv", "message"), FAILURES,
                         ids=[f"{f}-{m[:40]}" for f, _, m in FAILURES])
def test_misuse_is_one_line_exit_2_before_the_model_loads_and_writes_nothing(
        vit_dir, clip_dir, picture_file, tmp_path_factory, monkeypatch, capsys, folder, argv,
        message):
    from atman_kernels.cli import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    tmp = tmp_path_factory.mktemp("run")
    bad = tmp / "notes.png"
    bad.write_text("not a picture")
    data = tmp / "data.jsonl"
    data.write_text('{"prompt": "a cat", "target": "dog"}\n', encoding="utf-8")
    bare = tmp / "bare_vit"  # the model without its image processor
    bare.mkdir()
    (bare / "config.json").write_bytes((vit_dir / "config.json").read_bytes())
    text = tmp / "text"  # a causal LM's config alone: refused before any weights are needed
    cfg = T.LlamaConfig(vocab_size=9, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                        num_attention_heads=2, architectures=["LlamaForCausalLM"])
    cfg.save_pretrained(text)
    before = sorted(tmp.rglob("*"))
    paths = {"picture": picture_file, "missing": tmp / "nope.png", "not_a_picture": bad,
             "data": data, "tmp": tmp}
    folders = {"vit": vit_dir, "bare_vit": bare, "clip": clip_dir, "text_config": text}
    # a row's own --json comes later and wins
    args = ["explain", "--json", str(tmp / "e.json")] if "--input" not in argv else ["explain"]
    if folder is not None:
        args += ["--model", str(folders[folder])]
    args += [a.format(**paths) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message.format(**paths) in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(tmp.rglob("*")) == before  # nothing written


def test_a_grey_scale_picture_is_read_as_rgb(vit_dir, tmp_path):
    """The model takes 3 channels: a one-channel picture is converted to RGB when read."""
    grey = tmp_path / "grey.png"
    Image.fromarray((np.arange(20 * 20) % 255).astype("uint8").reshape(20, 20)).save(grey)
    out = tmp_path / "g.json"
    assert main(["explain", "--model", str(vit_dir), "--image", str(grey), "--target", "car",
                 "--quiet", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["patch_grid"] == [4, 4]
