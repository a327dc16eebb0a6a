"""One data set over several processes: `atman explain --input/--output` under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from atman_kernels.explain import AtManExplainer
from atman_kernels.explain.distributed import (
    Place,
    check_parts,
    merge,
    part_path,
    parts_of,
    place_from_env,
    share,
)

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the capital of france is paris and the capital of italy is rome while berlin lies in "
         "germany on a river called spree").split()
ITEMS = [
    {"id": "fr", "prompt": "the capital of france is", "target": "paris"},
    {"id": "it", "prompt": "the capital of italy is", "target": "rome"},
    {"id": "de", "prompt": "berlin lies in", "target": "germany"},
    {"id": "river", "prompt": "berlin lies on a river called", "target": "spree"},
    {"id": "cap", "prompt": "the capital of germany is", "target": "berlin"},
]


def test_place_from_env_reads_torchruns_variables_and_refuses_bad_ones():
    assert place_from_env({}) == Place(0, 1, 0)
    assert place_from_env({"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1"}) == Place(1, 3, 1)
    assert place_from_env({"RANK": "0", "WORLD_SIZE": "2"}).distributed
    for env, match in (({"RANK": "2", "WORLD_SIZE": "2"}, "RANK must be in 0..WORLD_SIZE-1"),
                       ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK must be an integer"),
                       ({"WORLD_SIZE": "2"}, "RANK is not set"),
                       ({"RANK": "0", "WORLD_SIZE": "0"}, "RANK must be in")):
        with pytest.raises(ValueError, match=match):
            place_from_env(env)


def test_shares_cover_every_example_once_and_do_not_depend_on_anything_else():
    for n in range(13):
        for world in range(1, 6):
            shares = [share(n, Place(r, world)) for r in range(world)]
            flat = sorted(i for s in shares for i in s)
            assert flat == list(range(n))
            for r, s in enumerate(shares):  # brute force: position i goes to rank i % world
                assert s == [i for i in range(n) if i % world == r]


def _line(ident: str, value: float) -> str:
    return json.dumps({"id": ident, "explanation": {"v": value}}) + "\n"


def test_merge_writes_input_order_and_refuses_incomplete_or_doubled_parts(tmp_path):
    out = tmp_path / "out.jsonl"
    ids = ["a", "b", "c", "d", "e"]
    place = Place(0, 2)
    # rank 0 has a, c, e (written out of order by a resume); rank 1 has b, d
    part_path(out, Place(0, 2)).write_text(_line("e", 5) + _line("a", 1) + _line("c", 3))
    part_path(out, Place(1, 2)).write_text(_line("d", 4))
    with pytest.raises(RuntimeError, match="1 example.* in no part .*first: 'b'"):
        merge(out, ids, place)
    assert len(parts_of(out)) == 2 and not out.exists()  # nothing removed, nothing written
    with open(part_path(out, Place(1, 2)), "a") as fh:
        fh.write(_line("b", 2) + _line("c", 9))
    with pytest.raises(RuntimeError, match="id 'c' is in both"):
        merge(out, ids, place)
    part_path(out, Place(1, 2)).write_text(_line("d", 4) + _line("b", 2) + '{"id": "x", "ex')
    assert merge(out, ids, place) == 5
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ids
    assert [json.loads(x)["explanation"]["v"] for x in out.read_text().splitlines()] == [
        1, 2, 3, 4, 5]
    assert parts_of(out) == []


def test_the_merge_under_the_output_lock_keeps_the_merged_file(tmp_path):
    """The lock creates an empty output and removes it on exit if it stayed empty; a merged
    file renamed over it while the lock is held must survive (it once did not)."""
    from atman_kernels.explain.many import output_lock

    out = tmp_path / "out.jsonl"
    part_path(out, Place(0, 2)).write_text(_line("a", 1))
    part_path(out, Place(1, 2)).write_text(_line("b", 2))
    assert merge(out, ["a", "b"], Place(0, 2), lock=output_lock) == 2
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["a", "b"]
    with output_lock(tmp_path / "empty.jsonl"):
        pass
    assert not (tmp_path / "empty.jsonl").exists()  # an empty file it made is still removed


def test_parts_of_another_world_or_a_single_process_are_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    check_parts(out, Place(0, 2))  # nothing there: fine
    part_path(out, Place(1, 3)).write_text("")
    (tmp_path / "out.jsonl.part-x-of-3").write_text("")  # not a part name: ignored
    with pytest.raises(ValueError, match="another number of processes than this one's 2"):
        check_parts(out, Place(0, 2))
    check_parts(out, Place(2, 3))  # the same world size resumes
    with pytest.raises(ValueError, match="unfinished run over several processes"):
        check_parts(out, Place())


def test_the_cli_refuses_leftover_parts_before_loading_the_model(tmp_path, capsys):
    from atman_kernels.cli import main

    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps(ITEMS[0]) + "\n")
    out = tmp_path / "out.jsonl"
    part_path(out, Place(0, 2)).write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(["explain", "--model", str(tmp_path / "no-such-model"), "--input", str(data),
              "--output", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unfinished run over several processes" in err and "part-0-of-2" in err


def tiny_model_dir(path: Path) -> Path:
    """A random 2-layer Llama and a word-level tokenizer saved with save_pretrained."""
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(sorted(set(WORDS)))}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                        pad_token="[PAD]")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, vocab_size=len(vocab),
                         bos_token_id=None, eos_token_id=None, pad_token_id=1)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "-m", "atman_kernels.cli", "explain",
                           *args], capture_output=True, text=True, timeout=300, env=env)


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_ranks_give_the_single_process_output_and_resume_per_rank(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "model")
    src = tmp_path / "items.jsonl"
    src.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    out = tmp_path / "out.jsonl"
    common = ["--input", str(src), "--model", str(model_dir), "--threads", "1",
              "--granularity", "word", "--quiet"]
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    explainer = AtManExplainer(model, tokenizer, progress=False)
    alone = explainer.explain_many(ITEMS, granularity="word")  # the single-process result

    # rank 1 crashed earlier after its first example ("it"): its part holds that line
    first = {"id": "it", "explanation": alone[1][1].to_dict()}
    part_path(out, Place(1, 2)).write_text(json.dumps(first) + "\n")
    proc = _torchrun(2, *common, "--output", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert parts_of(out) == [], "the parts were not merged away"
    records = _records(out)
    assert [r["id"] for r in records] == [item["id"] for item in ITEMS]  # input order
    for (ident, expected), record in zip(alone, records, strict=True):
        assert record["id"] == ident
        assert record["explanation"]["tokens"] == expected.tokens
        torch.testing.assert_close(torch.tensor(record["explanation"]["scores"]).double(),
                                   expected.scores.double(), rtol=1e-5, atol=1e-7)

    # run again on the complete output: nothing explained, nothing duplicated
    again = _torchrun(2, *common, "--output", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert _records(out) == records


@pytest.mark.slow
def test_the_python_api_under_two_ranks(tmp_path):
    """explain_many itself (not the CLI) under torchrun: each rank's own results returned, one
    merged file."""
    model_dir = tiny_model_dir(tmp_path / "model")
    out = tmp_path / "out.jsonl"
    script = tmp_path / "run.py"
    script.write_text(
        "import json, sys\n"
        "from transformers import LlamaForCausalLM, PreTrainedTokenizerFast\n"
        "from atman_kernels.explain import AtManExplainer\n"
        f"items = {ITEMS!r}\n"
        f"m = LlamaForCausalLM.from_pretrained({str(model_dir)!r}).eval()\n"
        f"t = PreTrainedTokenizerFast.from_pretrained({str(model_dir)!r})\n"
        "res = AtManExplainer(m, t, progress=False).explain_many(items, "
        f"output={str(out)!r})\n"
        "import os\n"
        f"open(os.path.join({str(tmp_path)!r}, 'mine-' + os.environ['RANK']), 'w').write("
        "json.dumps([i for i, _ in res]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # each rank's own share, written by the rank itself (two ranks' stdout lines interleave)
    mine = sorted(json.loads((tmp_path / f"mine-{r}").read_text()) for r in range(2))
    assert mine == [["fr", "de", "cap"], ["it", "river"]]
    assert [r["id"] for r in _records(out)] == [item["id"] for item in ITEMS]
