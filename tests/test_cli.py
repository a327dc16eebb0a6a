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
    assert "target 'paris city'" in printed and "top 3 units" in printed
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
                   "--quiet", "--layers", "--postprocess", "--normalize"):
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
