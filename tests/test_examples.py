"""examples/explain_dataset.py runs for real: 2 processes (torchrun, gloo) on a tiny model."""

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

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the capital of france is paris and the capital of italy is rome while berlin lies in "
         "germany on a river called spree").split()
ITEMS = [
    {"prompt": "the capital of france is", "target": "paris"},
    {"prompt": "the capital of italy is", "target": "rome"},
    {"prompt": "berlin lies in", "target": "germany"},
    {"prompt": "berlin lies on a river called", "target": "spree"},
    {"prompt": "the capital of germany is", "target": "berlin"},
]


def tiny_model_dir(path: Path) -> Path:
    """A random 2-layer Llama and a word-level tokenizer saved with save_pretrained."""
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(sorted(set(WORDS)))}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                        pad_token="[PAD]")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, vocab_size=len(vocab))
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_explain_dataset_two_processes_match_single_process(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "model")
    src = tmp_path / "items.jsonl"
    src.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    out = tmp_path / "results.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "examples" / "explain_dataset.py"), "--input", str(src), "--output",
         str(out), "--model", str(model_dir), "--batch-size", "4", "--threads", "1"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "rank 0/2" in proc.stdout and "rank 1/2" in proc.stdout, proc.stdout
    assert not list(tmp_path.glob("results.jsonl.rank*")), "rank shards were not merged away"

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(len(ITEMS)))
    assert all("error" not in r for r in records), records

    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    explainer = AtManExplainer(model, tokenizer, batch_size=4, progress=False)
    for item, record in zip(ITEMS, records, strict=True):
        assert record["prompt"] == item["prompt"] and record["target"] == item["target"]
        expected = explainer.explain(item["prompt"], item["target"])
        got = record["explanation"]
        assert got["tokens"] == expected.tokens
        torch.testing.assert_close(torch.tensor(got["scores"], dtype=torch.float64),
                                   expected.scores.double(),
                                   rtol=1e-5, atol=1e-7)


def test_read_items_rejects_a_line_without_target(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from explain_dataset import read_items
    finally:
        sys.path.remove(str(ROOT / "examples"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected an object with string"):
        read_items(bad)
