"""Contrastive explanations (why the target rather than the foil) against a brute force written
here: one full forward per unit for each continuation, float64 cross-entropy."""

from __future__ import annotations

import json

import pytest
import torch
from _brute import (
    _close,
    brute_causal_units,
    brute_classifier_units,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)
from test_granularity import TEXT, VOCAB, _positions_in, tok  # noqa: F401  (tok: a fixture)

import atman_kernels.hf  # noqa: F401  (registers "atman")
from atman_kernels.cli import main
from atman_kernels.explain import AtManExplainer, Explanation

PROMPT = [3, 17, 42, 5, 17, 9, 30, 11, 8, 25, 17, 4]
TARGET = [7, 19, 2]
FOIL = [23, 40]


def brute_contrast(model, prompt, target, foil, units, mode="paper"):
    """(target rises [T, V], foil rises [F, V]): each continuation on its own full sequence."""
    rise_t = brute_causal_units(model, prompt + target[:-1], len(prompt), target, units,
                                mode=mode)
    rise_f = brute_causal_units(model, prompt + foil[:-1], len(prompt), foil, units, mode=mode)
    return rise_t, rise_f


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama_gqa", "gpt2"])
@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "full"])
def test_causal_contrast_equals_brute_force(make, mode, reuse):
    model = make()
    expl = AtManExplainer(model, mode=mode, prefix_reuse=reuse, progress=False,
                          batch_size=5).explain(PROMPT, TARGET, contrast=FOIL)
    units = [[p] for p in range(len(PROMPT))]  # the prompt's tokens only
    assert [list(s.positions) for s in expl.spans] == units
    rise_t, rise_f = brute_contrast(model, PROMPT, TARGET, FOIL, units, mode)
    _close(expl.per_target, rise_t)
    _close(expl.contrast_per_target, rise_f)
    _close(expl.scores, rise_t.sum(0) - rise_f.sum(0))
    assert expl.contrast_tokens == [str(t) for t in FOIL]
    # the base margin: log p(target) - log p(foil), unsuppressed
    with torch.no_grad():
        logp = lambda cont: torch.log_softmax(model(  # noqa: E731
            torch.tensor([PROMPT + cont[:-1]])).logits[0].double(), -1)[
            torch.arange(len(PROMPT) - 1, len(PROMPT) + len(cont) - 1), torch.tensor(cont)].sum()
        assert abs(expl.base_margin - float(logp(TARGET) - logp(FOIL))) < 1e-4
    # the foil costs its own tokens only: 3 forwards per chunk (prompt, target, foil suffix)
    chunks = -(-len(PROMPT) // 5)
    assert expl.settings["forwards"] == 3 * (1 + chunks)


def test_a_foil_equal_to_the_target_gives_zeros():
    expl = AtManExplainer(tiny_llama(1), progress=False).explain(PROMPT, TARGET,
                                                                 contrast=TARGET)
    assert torch.equal(expl.scores, torch.zeros_like(expl.scores))
    assert expl.base_margin == 0.0


def test_sentence_contrast_and_generated_target(tok):  # noqa: F811
    model = tiny_llama(2, vocab=VOCAB)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 1
    ex = AtManExplainer(model, tok, progress=False, batch_size=2)
    expl = ex.explain(TEXT, " Hamburg.", granularity="sentence", contrast=" Paris.")
    prompt = tok(TEXT)["input_ids"]
    target = tok(" Hamburg.", add_special_tokens=False)["input_ids"]
    foil = tok(" Paris.", add_special_tokens=False)["input_ids"]
    units = _positions_in(tok, TEXT, [(s.start, s.end) for s in expl.spans])
    rise_t, rise_f = brute_contrast(model, prompt, target, foil, units)
    _close(expl.scores, rise_t.sum(0) - rise_f.sum(0))
    generated = ex.explain(TEXT, None, granularity="sentence", contrast=" Paris.",
                           max_new_tokens=2)
    given = ex.explain(TEXT, generated.settings["target_ids"], granularity="sentence",
                       contrast=" Paris.")
    assert torch.equal(generated.scores, given.scores)


def test_classifier_contrast_equals_brute_force():
    model = tiny_bert()
    ids = torch.tensor([[2, 5, 9, 11, 30, 3]])
    expl = AtManExplainer(model, progress=False, batch_size=4).explain(ids, "pos",
                                                                       contrast="neg")
    units = [[p] for p in range(6)]
    rise_pos = brute_classifier_units(model, {"input_ids": ids}, 6, units, 2)
    rise_neg = brute_classifier_units(model, {"input_ids": ids}, 6, units, 0)
    _close(expl.scores, (rise_pos - rise_neg)[0])
    assert expl.contrast == "neg" and expl.settings["contrast_index"] == 0
    assert expl.settings["forwards"] == 1 + 2  # both classes from the same logits


def test_json_round_trips_the_contrast():
    expl = AtManExplainer(tiny_llama(3), progress=False).explain(PROMPT, TARGET, contrast=FOIL)
    back = Explanation.from_json(json.loads(json.dumps(expl.to_json())))
    assert back.contrast_tokens == expl.contrast_tokens
    assert torch.equal(back.contrast_per_target, expl.contrast_per_target)
    assert back.base_margin == pytest.approx(expl.base_margin, abs=1e-12)


@pytest.mark.parametrize("make, contrast, match", [
    (tiny_llama, [], "contrast is empty"),
    (tiny_llama, "", "contrast is empty"),
    (tiny_bert, 7, "contrast class 7 is out of range"),
    (tiny_bert, "maybe", "contrast label 'maybe' is not one of"),
])
def test_bad_contrasts_are_refused_before_any_forward(make, contrast, match):
    model = make()
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    target = "pos" if make is tiny_bert else TARGET
    inputs = [2, 5, 9, 3] if make is tiny_bert else PROMPT
    try:
        with pytest.raises(ValueError, match=match):
            AtManExplainer(model, progress=False).explain(inputs, target, contrast=contrast)
    finally:
        hook.remove()
    assert calls == []


def test_cli_contrast(tmp_path, tok):  # noqa: F811
    path = tmp_path / "model"
    tiny_llama(4, vocab=VOCAB).save_pretrained(path)
    tok.save_pretrained(path)
    out = tmp_path / "e.json"
    assert main(["explain", "--model", str(path), "--prompt", TEXT, "--target", " Hamburg.",
                 "--contrast", " Paris.", "--granularity", "sentence", "--json", str(out),
                 "--quiet"]) == 0
    expl = Explanation.from_json(out)
    assert expl.contrast == " Paris." and expl.contrast_per_target is not None


def test_contrastive_output_says_why_this_rather_than_that(tmp_path):
    from atman_kernels.explain import save_png, to_html

    expl = AtManExplainer(tiny_llama(5), progress=False).explain(PROMPT, TARGET, contrast=FOIL)
    expl.settings.update(target=" Paris", contrast=" Lyon")
    page = to_html(expl)
    assert "why &#x27; Paris&#x27; rather than &#x27; Lyon&#x27;" in page
    assert "supports &#x27; Lyon&#x27;" in page and "supports &#x27; Paris&#x27;" in page
    assert "log-odds over the foil" in page
    w, h = save_png(expl, tmp_path / "c.png")
    assert w == 800 and h > 60
