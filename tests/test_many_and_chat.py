"""Many examples at once (explain_many, resumable JSON Lines) and chat prompts (chat=True)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _brute import brute_causal_units, tiny_llama
from test_granularity import TARGET, TEXT, VOCAB, tok  # noqa: F401  (tok: a fixture)

import atman_kernels.hf  # noqa: F401  (registers "atman")
from atman_kernels.explain import AtManExplainer
from atman_kernels.explain.many import read_many

EXAMPLES = [{"id": f"ex{i}", "prompt": [3 + i, 17, 42, 5, 9], "target": [7, 19]}
            for i in range(5)]


class Crash(RuntimeError):
    pass


def _crashing(examples, after):
    for i, ex in enumerate(examples):
        if i == after:
            raise Crash("simulated crash")
        yield ex


def test_explain_many_equals_a_loop_and_streams_json_lines(tmp_path):
    ex = AtManExplainer(tiny_llama(), progress=False)
    out = tmp_path / "out.jsonl"
    results = ex.explain_many(EXAMPLES, output=out)
    assert [i for i, _ in results] == [e["id"] for e in EXAMPLES]
    for (ident, expl), example in zip(results, EXAMPLES, strict=True):
        alone = ex.explain(example["prompt"], example["target"])
        assert torch.equal(expl.per_target, alone.per_target), ident
    back = list(read_many(out))
    assert [i for i, _ in back] == [e["id"] for e in EXAMPLES]
    assert torch.equal(back[2][1].per_target, results[2][1].per_target)
    pairs = ex.explain_many([(e["prompt"], e["target"]) for e in EXAMPLES[:2]])
    assert [i for i, _ in pairs] == ["0", "1"]


def test_explain_many_resumes_after_a_crash_without_losing_or_repeating(tmp_path):
    ex = AtManExplainer(tiny_llama(1), progress=False)
    out = tmp_path / "out.jsonl"
    with pytest.raises(Crash):
        ex.explain_many(_crashing(EXAMPLES, after=3), output=out)
    assert [i for i, _ in read_many(out)] == ["ex0", "ex1", "ex2"]
    with open(out, "a", encoding="utf-8") as fh:  # a line cut short by a crash mid-write
        fh.write('{"id": "ex3", "explanation": {"kind": "caus')
    rerun = ex.explain_many(EXAMPLES, output=out)
    assert [i for i, _ in rerun] == ["ex3", "ex4"]  # only what was missing
    ids = [i for i, _ in read_many(out)]
    assert ids == ["ex0", "ex1", "ex2", "ex3", "ex4"]  # nothing lost, nothing twice
    assert ex.explain_many(EXAMPLES, output=out) == []


def test_explain_many_checks_its_input(tmp_path):
    ex = AtManExplainer(tiny_llama(), progress=False)
    with pytest.raises(ValueError, match="appears twice"):
        ex.explain_many([EXAMPLES[0], EXAMPLES[0]])
    with pytest.raises(ValueError, match="unknown keys"):
        ex.explain_many([{**EXAMPLES[0], "answer": 3}])
    with pytest.raises(TypeError, match="must be a dict"):
        ex.explain_many([[1, 2, 3]])
    out = tmp_path / "o.jsonl"
    out.write_text(json.dumps({"id": "x", "explanation": {}}) + "\n")
    with pytest.raises(FileExistsError, match="resume=True"):
        ex.explain_many(EXAMPLES, output=out, resume=False)


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n"
                 "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture()
def chat_tok(tok):  # noqa: F811
    chat = copy.deepcopy(tok)
    chat.chat_template = CHAT_TEMPLATE
    return chat


def test_chat_explains_the_users_message_only(chat_tok):
    model = tiny_llama(2, vocab=VOCAB, positions=128)
    ex = AtManExplainer(model, chat_tok, progress=False, batch_size=3)
    expl = ex.explain(TEXT, TARGET, chat=True, granularity="sentence")
    rendered = chat_tok.apply_chat_template([{"role": "user", "content": TEXT}],
                                            tokenize=False, add_generation_prompt=True)
    start = rendered.index(TEXT)
    assert expl.prompt == rendered
    assert [(s.start - start, s.end - start) for s in expl.spans] == [
        (0, 26), (27, 75), (76, 101)]  # the message's sentences, nothing of the template
    enc = chat_tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"])
              if a < start + len(TEXT) and b > start and b > a]
    assert sorted(p for s in expl.spans for p in s.positions) == inside
    target = chat_tok(TARGET, add_special_tokens=False)["input_ids"]
    expected = brute_causal_units(model, enc["input_ids"] + target[:-1], len(enc["input_ids"]),
                                  target, [list(s.positions) for s in expl.spans])
    peak = float(expected.abs().max())
    assert float((expl.per_target - expected).abs().max()) <= 1e-4 * peak
    tokens = ex.explain(TEXT, TARGET, chat=True)
    assert all(start <= s.start and s.end <= start + len(TEXT)
               for s in tokens.spans if s.source == "prompt")
    spans = ex.explain(TEXT, TARGET, chat=True, spans=[(0, 10)])
    assert spans.spans[0].start == start


def test_chat_errors(tok):  # noqa: F811
    ex = AtManExplainer(tiny_llama(vocab=VOCAB), tok, progress=False)
    with pytest.raises(ValueError, match="chat template"):
        ex.explain(TEXT, TARGET, chat=True)
    with pytest.raises(ValueError, match="as a string"):
        ex.explain([1, 2, 3], TARGET, chat=True)


def test_explain_many_names_the_refused_example_and_keeps_the_ones_before(tmp_path):
    from atman_kernels.explain.many import ExampleError

    ex = AtManExplainer(tiny_llama(), progress=False)
    out = tmp_path / "o.jsonl"
    bad = {"id": "bad", "prompt": EXAMPLES[1]["prompt"], "target": EXAMPLES[1]["target"],
           "spans": [(0, 3)]}  # spans need a text prompt, not token ids
    with pytest.raises(ExampleError, match="example 'bad': ") as info:
        ex.explain_many([EXAMPLES[0], bad, EXAMPLES[2]], output=out)
    assert info.value.ident == "bad" and isinstance(info.value.cause, ValueError)
    assert [i for i, _ in read_many(out)] == ["ex0"]


def test_an_output_that_is_not_explain_many_records_is_refused_untouched(tmp_path):
    from atman_kernels.explain.many import finished_ids

    ex = AtManExplainer(tiny_llama(), progress=False)
    other = tmp_path / "notes.txt"
    other.write_text("a line of someone's notes\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 1 is not an explain_many record"):
        ex.explain_many(EXAMPLES, output=other)
    assert other.read_text(encoding="utf-8") == "a line of someone's notes\n"
    out = tmp_path / "o.jsonl"
    ex.explain_many(EXAMPLES[:1], output=out)
    whole = out.read_bytes()
    out.write_bytes(whole + b'{"id": "ex1", "expl')  # cut short by a crash
    assert finished_ids(out, repair=False) == {"ex0"}
    assert out.read_bytes() == whole + b'{"id": "ex1", "expl'  # only checked
    assert finished_ids(out) == {"ex0"} and out.read_bytes() == whole  # repaired
