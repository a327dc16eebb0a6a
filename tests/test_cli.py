"""The ``atman`` command line end to end on a tiny random model saved to a folder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from atman_kernels.cli import build_parser, main
from atman_kernels.explain import Explanation

WORDS = ["[UNK]", "[PAD]", "the", "capital", "of", "france", "is", "paris", "a", "city",
         "and", "<b>", "&", "rome"]


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, initializer_range=0.2,
                      bos_token_id=None, eos_token_id=None, pad_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def test_explain_end_to_end_writes_json_html_png(model_dir, tmp_path, capsys):
    out = tmp_path / "not" / "yet"  # output folders are created, as `make explain` needs
    out_json, out_html, out_png = out / "e.json", out / "e.html", out / "e.png"
    code = main(["explain", "--model", str(model_dir), "--prompt", "the capital of france is",
                 "--target", "paris city", "--json", str(out_json), "--html", str(out_html),
                 "--png", str(out_png), "--batch-size", "2", "--no-color", "--top", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "why 'paris city' (p = " in printed and "top 3 units" in printed
    assert model_dir.name in printed  # the model's own name, not its class
    assert "france[" in printed  # --no-color: token[score] for every token
    expl = Explanation.from_json(out_json)
    data = json.loads(out_json.read_text())
    assert expl.tokens == ["the", "capital", "of", "france", "is", "paris"]
    assert expl.target_tokens == ["paris", "city"]
    assert data["settings"]["factor"] == 0.1 and data["settings"]["mode"] == "paper"
    assert len(expl.per_target) == 2 and torch.isfinite(expl.scores).all()
    html = out_html.read_text()
    assert html.startswith("<!DOCTYPE html>") and "france" in html
    with Image.open(out_png) as img:
        assert img.format == "PNG" and img.size[0] == 800


def test_cli_options_reach_the_explainer(model_dir, tmp_path):
    out = tmp_path / "log.json"
    assert main(["explain", "--model", str(model_dir), "--prompt", "the capital of france is",
                 "--target", "paris", "--mode", "log", "--factor", "0.0",
                 "--conceptual-threshold", "none", "--no-prefix-reuse", "--quiet",
                 "--json", str(out)]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["mode"] == "log" and settings["factor"] == 0.0
    assert settings["conceptual_threshold"] is None and settings["prefix_reuse"] is False


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt", "", "--target", "paris"], "--prompt is empty"),
        (["--prompt", "the capital", "--target", ""], "--target is empty"),
        (["--prompt", "the capital", "--target", "   "], "tokenises to no tokens"),
    ],
)
def test_cli_bad_input_exits_2_without_traceback(model_dir, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--model", str(model_dir), "--quiet", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_unreadable_and_unsupported_models(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--model", str(tmp_path / "missing"), "--prompt", "a", "--target", "b"])
    assert exc.value.code == 2 and "cannot read model path" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--model", str(empty), "--prompt", "a", "--target", "b"])
    assert exc.value.code == 2 and "cannot read model path" in capsys.readouterr().err
    bert_dir = tmp_path / "bert"
    cfg = BertConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=16,
                     num_hidden_layers=1, num_attention_heads=2)
    BertModel(cfg).save_pretrained(bert_dir)
    _tokenizer().save_pretrained(bert_dir)
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--model", str(bert_dir), "--prompt", "a", "--target", "b"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "unsupported model class BertModel" in err


def test_help_documents_every_option():
    text = build_parser().format_help()
    for option in ("--prompt", "--target", "--model", "--html", "--png", "--json", "--mode",
                   "--factor", "--conceptual-threshold", "--batch-size", "--no-prefix-reuse",
                   "--quiet", "--layers", "--postprocess", "--normalize", "--image",
                   "--image-region", "--input", "--output", "--chat"):
        assert option in text, option
    run = subprocess.run([sys.executable, "-m", "atman_kernels.cli", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "--conceptual-threshold" in run.stdout


def test_bad_option_values_are_rejected(capsys):
    for bad in (["--factor", "-1"], ["--conceptual-threshold", "2"], ["--batch-size", "0"],
                ["--mode", "x"]):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["explain", "--prompt", "a", "--target", "b", *bad])
        assert exc.value.code == 2
    capsys.readouterr()


# ------------------------------------------------------------------- vision-language models
@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    """A tiny random LLaVA saved with its processor, as a user's model folder would be."""
    from test_image_text import tiny_llava

    path = tmp_path_factory.mktemp("tiny_llava")
    model, processor = tiny_llava(21)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def picture_file(tmp_path_factory):
    import numpy as np

    path = tmp_path_factory.mktemp("pictures") / "street.png"
    rng = np.random.default_rng(3)
    Image.fromarray((rng.random((50, 80, 3)) * 255).astype("uint8")).save(path)
    return path


def test_explain_image_end_to_end(llava_dir, picture_file, tmp_path, capsys):
    from test_image_text import PROMPT, tiny_llava

    from atman_kernels.explain import AtManExplainer

    out_json, out_html, out_png = tmp_path / "e.json", tmp_path / "e.html", tmp_path / "e.png"
    code = main(["explain", "--model", str(llava_dir), "--image", str(picture_file),
                 "--prompt", PROMPT, "--target", "a dog ?", "--image-region", "2",
                 "--json", str(out_json), "--html", str(out_html), "--png", str(out_png),
                 "--no-color", "--top", "3", "--batch-size", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert llava_dir.name in printed  # the model's own name
    assert "image 0, whole view (4 x 4 cells):" in printed
    expl = Explanation.from_json(out_json)
    assert expl.kind == "image_text" and expl.settings["image_region"] == 2
    regions = [s for s in expl.spans if s.source == "image"]
    assert len(regions) == 4 and all(s.box is not None for s in regions)
    # the same numbers as the library on the same model, picture and prompt
    model, processor = tiny_llava(21)
    with Image.open(picture_file) as im:
        picture = im.convert("RGB")
    direct = AtManExplainer(model, processor, progress=False, batch_size=3).explain(
        (PROMPT, [picture]), "a dog ?", image_region=2)
    # same chunks as the CLI's --batch-size 3; float32 attention, so not bit for bit
    torch.testing.assert_close(expl.scores, direct.scores.double(), rtol=1e-4, atol=1e-6)
    assert [s.box for s in regions] == [s.box for s in direct.spans if s.source == "image"]
    assert "box " in printed or all(s.source != "image" for _, s, _ in direct.top(3))
    page = out_html.read_text()
    assert page.count("data:image/png;base64,") == 2  # the picture and its map layer
    with Image.open(out_png) as img:
        assert img.format == "PNG" and img.size[0] == 800


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--image", "{missing}", "--prompt", "<image> what"], "cannot read --image"),
        (["--image", "{not_a_picture}", "--prompt", "<image> what"], "cannot read --image"),
        (["--image", "{picture}", "--prompt", "what is this ?"],
         "holds 0 image placeholder(s) '<image>' but 1 --image"),
        (["--image", "{picture}", "--image", "{picture}", "--prompt", "<image> what"],
         "holds 1 image placeholder(s) '<image>' but 2 --image"),
        (["--image-region", "2", "--prompt", "<image> what"], "--image-region needs --image"),
    ],
)
def test_image_input_errors_exit_2_before_the_model_loads(llava_dir, picture_file, tmp_path,
                                                          monkeypatch, capsys, extra, message):
    from atman_kernels.cli import loading

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(loading, "load_model", no_load)
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    paths = {"missing": tmp_path / "nope.png", "not_a_picture": bad, "picture": picture_file}
    argv = [a.format(**paths) for a in extra]
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--model", str(llava_dir), "--target", "a", "--quiet", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_image_with_a_text_only_model_exits_2_before_loading(model_dir, picture_file,
                                                            monkeypatch, capsys):
    from atman_kernels.cli import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--model", str(model_dir), "--image", str(picture_file),
              "--prompt", "<image> the capital", "--target", "paris"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "--image needs a vision-language model" in err
    assert "LlamaForCausalLM is a text-only model" in err
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--image", str(picture_file), "--prompt", "<image> a", "--target", "b"])
    assert exc.value.code == 2 and "bundled SmolLM2 is a text-only" in capsys.readouterr().err


def test_image_region_below_one_is_rejected(capsys):
    for bad in ("0", "-3", "x"):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["explain", "--prompt", "a", "--image-region", bad])
        assert exc.value.code == 2
        assert "--image-region: expected an integer >= 1" in capsys.readouterr().err


def test_vision_language_model_without_image_exits_2(llava_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--model", str(llava_dir), "--prompt", "<image> what is this ?",
              "--target", "a", "--quiet"])
    assert exc.value.code == 2
    assert "vision-language model: give the picture(s) with --image" in capsys.readouterr().err


def test_image_without_target_explains_the_generated_answer(llava_dir, picture_file, tmp_path):
    from test_image_text import PROMPT

    out = tmp_path / "g.json"
    assert main(["explain", "--model", str(llava_dir), "--image", str(picture_file),
                 "--prompt", PROMPT, "--max-new-tokens", "2", "--quiet",
                 "--json", str(out)]) == 0
    expl = Explanation.from_json(out)
    assert expl.kind == "image_text" and expl.settings["generated"] is True
    assert 1 <= len(expl.target_tokens) <= 2


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads: expected an integer >= 1"),
    (["--max-memory-mb", "0"], "--max-memory-mb: expected an integer >= 1"),
    (["--top", "-3"], "--top: expected an integer >= 0"),
    (["--backend", "triton"], "--backend triton needs a CUDA GPU"),
    (["--html", "/proc/x.html"], "--html /proc/x.html: cannot write"),
    (["--layers", "99"], "layers: 99 is not a layer of this model"),
])
def test_cli_failures_are_one_line_exit_2_and_write_nothing(model_dir, tmp_path, capsys,
                                                             monkeypatch, argv, message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "e.json"
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--model", str(model_dir), "--prompt", "the capital of france is",
              "--target", "paris", "--json", str(out), *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3  # usage + one line
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_module_and_package_import_without_torch():
    """`atman --help` stays quick: neither the CLI nor the package imports torch up front."""
    code = ("import sys, atman_kernels, atman_kernels.cli; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith(('torch', 'transformers')))[:3]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_quiet_prints_nothing(model_dir, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["explain", "--model", str(model_dir), "--prompt", "the capital of france is",
                 "--target", "paris", "--json", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "" and out.exists()


# ------------------------------------------------------------------ --input / --output
LINES = [
    {"id": "a", "prompt": "the capital of france is", "target": "paris city"},
    {"prompt": "rome is a city", "target": "and", "contrast": "paris"},
    {"id": 7, "prompt": "the capital of france is", "target": "paris",
     "spans": [[0, 11], [12, 18]]},
]


def _jsonl(path, items, blank_after_first=True):
    lines = [json.dumps(item) for item in items]
    if blank_after_first:
        lines.insert(1, "")  # blank lines are skipped (and still counted for line numbers)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_input_output_explains_every_line_like_the_library(model_dir, tmp_path, capsys):
    from atman_kernels.cli.loading import load_model
    from atman_kernels.explain import AtManExplainer
    from atman_kernels.explain.many import read_many

    data = _jsonl(tmp_path / "data.jsonl", LINES)
    out = tmp_path / "out" / "res.jsonl"
    assert main(["explain", "--model", str(model_dir), "--input", str(data), "--output",
                 str(out), "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "3 examples from" in printed and "explained 3 examples" in printed
    back = dict(read_many(out))
    assert list(back) == ["a", "3", "7"]  # the line number (3: after a blank line) or "id"
    model, tokenizer = load_model(str(model_dir))
    ex = AtManExplainer(model, tokenizer, progress=False, batch_size=2)
    direct = {
        "a": ex.explain(LINES[0]["prompt"], "paris city"),
        "3": ex.explain(LINES[1]["prompt"], "and", contrast="paris"),
        "7": ex.explain(LINES[2]["prompt"], "paris", spans=[(0, 11), (12, 18)]),
    }
    for ident, expl in direct.items():
        torch.testing.assert_close(back[ident].per_target, expl.per_target.double(),
                                   rtol=1e-6, atol=1e-9)
        assert back[ident].tokens == expl.tokens, ident
    assert back["3"].contrast == "paris" and [s.text for s in back["7"].spans] == [
        "the capital", "of fra"]


def test_input_output_resumes_without_losing_or_repeating(model_dir, tmp_path, capsys):
    from atman_kernels.explain.many import read_many

    data = _jsonl(tmp_path / "data.jsonl", LINES)
    out = tmp_path / "res.jsonl"
    argv = ["explain", "--model", str(model_dir), "--input", str(data), "--output", str(out)]
    assert main([*argv, "--quiet"]) == 0
    full = out.read_text(encoding="utf-8").splitlines(keepends=True)
    # a crash during the third example's write: two whole lines and a cut one
    out.write_text("".join(full[:2]) + full[2][:40], encoding="utf-8")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 already in" in printed and "explained 1 examples" in printed
    assert [i for i, _ in read_many(out)] == ["a", "3", "7"]

    def records(text):  # the records but their timings
        rows = [json.loads(line) for line in text.splitlines()]
        for row in rows:
            row["explanation"]["settings"].pop("seconds")
        return rows

    resumed = out.read_text(encoding="utf-8")
    assert records(resumed) == records("".join(full))  # the same as one whole run
    assert resumed.startswith("".join(full[:2]))  # the finished lines kept as they were
    assert main(argv) == 0  # all done: nothing explained, nothing loaded, nothing added
    assert "nothing to explain" in capsys.readouterr().out
    assert out.read_text(encoding="utf-8") == resumed


def _bad_input(tmp_path, name):
    """--input files for the failure table: (path, line content)."""
    good = json.dumps(LINES[0])
    contents = {
        "bad_json": good + '\n{"prompt": "the capital", "target": \n',
        "no_prompt": good + '\n{"id": 2, "target": "paris"}\n',
        "empty_prompt": good + '\n{"prompt": ""}\n',
        "list_line": good + '\n["the capital", "paris"]\n',
        "unknown_key": good + '\n{"prompt": "a", "answer": "paris"}\n',
        "repeated_id": good + '\n{"id": "a", "prompt": "rome is"}\n',
        "bad_spans": good + '\n{"prompt": "rome is", "spans": [0, 4]}\n',
        "empty_target": good + '\n{"prompt": "rome is", "target": ""}\n',
        "list_target": good + '\n{"prompt": "rome is", "target": ["paris"]}\n',
        "no_examples": "\n\n",
        "spans_line": good + '\n{"prompt": "rome is", "spans": [[0, 4]]}\n',
    }
    path = tmp_path / f"{name}.jsonl"
    if name == "not_utf8":
        path.write_bytes(good.encode() + b'\n{"prompt": "caf\xe9"}\n')
    elif name in contents:
        path.write_text(contents[name], encoding="utf-8")
    elif name == "good":
        _jsonl(path, LINES)
    return path


@pytest.mark.parametrize(("input_name", "argv", "message"), [
    ("missing", [], "cannot read --input {input}: No such file"),
    ("bad_json", [], "--input {input} line 2 is not valid JSON (Expecting value at column"),
    ("no_prompt", [], 'line 2: no "prompt" (the text to explain)'),
    ("empty_prompt", [], 'line 2: "prompt" must be a non-empty string'),
    ("list_line", [], "line 2: expected a JSON object"),
    ("unknown_key", [], "line 2: unknown key(s) 'answer'"),
    ("repeated_id", [], "line 2: id 'a' repeats line 1"),
    ("bad_spans", [], 'line 2: "spans" must be a list of [start, end]'),
    ("empty_target", [], 'line 2: "target" is empty'),
    ("list_target", [], 'line 2: "target" must be a string'),
    ("not_utf8", [], "line 2 is not UTF-8 text"),
    ("no_examples", [], "holds no examples"),
    ("spans_line", ["--granularity", "word"],
     'line 2 has "spans", which cannot be used with --granularity'),
    ("good", ["--prompt", "the capital"], "--input and --prompt cannot be used together"),
    ("good", ["--prompt-file", "{input}"], "--input and --prompt-file cannot be used together"),
    ("good", ["--target", "paris"], "--input and --target cannot be used together"),
    ("good", ["--html", "{tmp}/e.html"], "--input and --html cannot be used together"),
    ("good", ["--png", "{tmp}/e.png"], "--input and --png cannot be used together"),
    ("good", ["--json", "{tmp}/e.json"], "--input and --json cannot be used together"),
    ("good", ["--spans", "0:3"], "--input and --spans cannot be used together"),
    ("good", ["--output", "/proc/x.jsonl"], "--output /proc/x.jsonl: cannot write"),
    ("good", ["--output", "{tmp}"], "is a folder: give a file path"),
    ("good", ["--output", "{input}"], "is the --input file"),
    ("good", ["--output", "{garbage}"], "line 1 is not an explain_many record"),
    (None, ["NO_OUTPUT", "--prompt", "<image> what", "--chat", "--image", "{input}"],
     "--chat applies a text chat template"),
    ("good", ["--granularity", "word", "--delimiter", "###"],
     "--granularity word and --delimiter are exclusive"),
    (None, ["--output", "{tmp}/o.jsonl"], "--output needs --input JSONL"),
    ("good", ["NO_OUTPUT"], "--input needs --output JSONL"),
])
def test_input_failures_are_one_line_exit_2_before_loading_and_write_nothing(
        model_dir, tmp_path, capsys, monkeypatch, input_name, argv, message):
    from atman_kernels.cli import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("not a record\n", encoding="utf-8")
    path = _bad_input(tmp_path, input_name or "good")
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    paths = {"input": path, "tmp": tmp_path, "garbage": garbage}
    args = ["explain", "--model", str(model_dir)]
    if input_name is not None:
        args += ["--input", str(path)]
    if "--output" not in argv and "NO_OUTPUT" not in argv:
        args += ["--output", str(tmp_path / "out.jsonl")]
    args += [a.format(**paths) for a in argv if a != "NO_OUTPUT"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message.format(**paths) in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written


def test_input_target_checks_after_the_model_loads_write_nothing(model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "the capital", "target": 3}\n', encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--model", str(model_dir), "--input", str(data), "--output",
              str(tmp_path / "o.jsonl"), "--quiet"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and 'line 1: "target" must be a string for a causal LM' in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_a_line_refused_by_the_explainer_names_it_and_keeps_the_lines_before(
        model_dir, tmp_path, capsys):
    from atman_kernels.explain.many import read_many

    data = _jsonl(tmp_path / "d.jsonl", [LINES[0], {"id": "b", "prompt": "rome is",
                                                    "target": "   "}, LINES[2]])
    out = tmp_path / "o.jsonl"
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--model", str(model_dir), "--input", str(data), "--output", str(out),
              "--quiet"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"--input {data} line 3 (id 'b'): " in err and "tokenises to no tokens" in err
    assert "1 explanations are in" in err
    assert [i for i, _ in read_many(out)] == ["a"]


# ---------------------------------------------------------------------------------- --chat
CHAT_TEMPLATE = ("{% for m in messages %}<b> {{ m['role'] }} & {{ m['content'] }} & "
                 "{% endfor %}{% if add_generation_prompt %}<b> a & {% endif %}")


@pytest.fixture(scope="module")
def chat_model_dir(model_dir, tmp_path_factory):
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_chat")
    for item in model_dir.iterdir():
        shutil.copy(item, path / item.name)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


def test_chat_explains_only_the_users_message(chat_model_dir, tmp_path):
    from atman_kernels.cli.loading import load_model
    from atman_kernels.explain import AtManExplainer

    message = "the capital of france is"
    out = tmp_path / "c.json"
    assert main(["explain", "--model", str(chat_model_dir), "--prompt", message, "--target",
                 "paris", "--chat", "--quiet", "--json", str(out)]) == 0
    expl = Explanation.from_json(out)
    model, tokenizer = load_model(str(chat_model_dir))
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                             tokenize=False, add_generation_prompt=True)
    assert expl.prompt == rendered and rendered != message
    start = rendered.index(message)
    prompt_units = [s for s in expl.spans if s.source == "prompt"]
    assert [rendered[s.start:s.end] for s in prompt_units] == message.split()
    assert all(start <= s.start and s.end <= start + len(message) for s in prompt_units)
    direct = AtManExplainer(model, tokenizer, progress=False).explain(message, "paris",
                                                                      chat=True)
    torch.testing.assert_close(expl.per_target, direct.per_target.double(), rtol=1e-6,
                               atol=1e-9)
    # --input with --chat: every line's prompt is a user's message
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": message, "target": "paris"}) + "\n")
    many = tmp_path / "m.jsonl"
    assert main(["explain", "--model", str(chat_model_dir), "--input", str(data), "--output",
                 str(many), "--chat", "--quiet"]) == 0
    from atman_kernels.explain.many import read_many

    (_, again), = read_many(many)
    assert again.prompt == rendered
    torch.testing.assert_close(again.per_target, expl.per_target, rtol=1e-6, atol=1e-9)


def test_chat_without_a_chat_template_exits_2_before_the_weights_load(model_dir, tmp_path,
                                                                     monkeypatch, capsys):
    import transformers

    def no_weights(*a, **k):
        raise AssertionError("the weights were loaded before the tokenizer was checked")

    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", no_weights)
    out = tmp_path / "e.json"
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--model", str(model_dir), "--prompt", "the capital", "--target",
              "paris", "--chat", "--json", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--chat needs a tokenizer with a chat template" in err and model_dir.name in err
    assert not out.exists()
