"""The faithfulness benchmark's peers, run from their own released packages.

``.venv-peers/bin/python benchmarks/_faith_peers.py JOB.json`` (the environment of
:mod:`_peers_env`: transformers 4.52.4, ``context-cite`` 0.0.4, ``lxt`` 2.1): one process per
(method, length), the same job and result lines as :mod:`_faith_methods`.

- ``contextcite-<K>``: ``context_cite.ContextCiter(model, tokenizer, context, query,
  num_ablations=K, partitioner=...)`` with its defaults otherwise (keep probability 0.5, its
  LASSO solver, its prompt template under the chat template). The sources are the benchmark's
  (a ``BaseContextPartitioner`` whose ``get_context`` is :func:`_faith_common.ablate`, the
  rule of ContextCite's own partitioner), and the response is the model's answer the other
  methods explain, given the way ContextCite's maintainers document for a response made
  elsewhere (``citer._cache["output"] = prompt + response``, MadryLab/context-cite issue #4).
  The worker checks that ContextCite's prompt and response token ids equal the benchmark's.
  Scores: ``get_attributions()`` over the whole response.
- ``attnlrp``: ``lxt.efficient.monkey_patch(transformers.models.llama.modeling_llama)`` before
  the model loads; relevance = (input embeddings x their gradient).sum(-1) of the summed
  log-probability of the answer (teacher forcing), one forward and one backward; token
  relevances summed per source.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _faith_common import ablate, read_job  # noqa: E402
from _faith_worker import run_documents  # noqa: E402

PEER_METHODS = ["contextcite-32", "contextcite-64", "attnlrp"]


def load(model_dir: str, method: str):
    import transformers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    if method == "attnlrp":
        from lxt.efficient import monkey_patch

        monkey_patch(transformers.models.llama.modeling_llama)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                 local_files_only=True).eval()
    # the copy was saved by transformers 5 (tokenizer class "TokenizersBackend", unknown to
    # 4.52): its tokenizer.json and config load as the fast tokenizer they are
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir, local_files_only=True)
    return model, tok


def contextcite_runner(model: Any, tok: Any, k: int):
    import numpy as np
    from context_cite import ContextCiter
    from context_cite.context_partitioner import BaseContextPartitioner

    class Sentences(BaseContextPartitioner):
        """The benchmark's sentence sources (character ranges of the context)."""

        def __init__(self, context: str, sources: list[list[int]]) -> None:
            super().__init__(context)
            self.ranges = sources

        @property
        def num_sources(self) -> int:
            return len(self.ranges)

        def split_context(self) -> None:  # the sources are given
            return None

        def get_source(self, index: int) -> str:
            a, b = self.ranges[index]
            return self.context[a:b]

        def get_context(self, mask: Any = None) -> str:
            keep = [True] * self.num_sources if mask is None else [bool(x) for x in mask]
            return ablate(self.context, self.ranges, keep)

    def run(doc):
        citer = ContextCiter(model, tok, doc["context"], doc["query"], num_ablations=k,
                             partitioner=Sentences(doc["context"], doc["sources"]),
                             prompt_template=doc["template"])
        ids, prompt = citer._get_prompt_ids(return_prompt=True)
        if list(ids) != doc["prompt_ids"]:
            raise RuntimeError(f"ContextCite's prompt ids differ from the benchmark's in "
                               f"{doc['doc']}")
        citer._cache["output"] = prompt + doc["response"]
        if list(citer._response_ids) != doc["response_ids"]:
            raise RuntimeError(f"ContextCite re-tokenises the response differently in "
                               f"{doc['doc']}")
        scores = citer.get_attributions(verbose=False)
        return [float(x) for x in np.asarray(scores)], k
    return run


def attnlrp_runner(model: Any):
    model.requires_grad_(False)
    embed = model.get_input_embeddings()

    def run(doc):
        ids = torch.tensor([doc["prompt_ids"] + doc["response_ids"][:-1]])
        tgt = torch.tensor(doc["response_ids"])
        x = embed(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=x, use_cache=False).logits[0, -len(tgt):]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, tgt[:, None]).sum()
        logp.backward()
        rel = (x * x.grad).sum(-1)[0].detach()
        return [float(rel[pos].sum()) for pos in doc["positions"]], 1
    return run


def main(job_path: str) -> None:
    job = read_job(job_path)
    torch.set_num_threads(int(job["threads"]))
    torch.manual_seed(0)
    method = job["method"]
    if method not in PEER_METHODS:
        raise ValueError(f"method must be one of {PEER_METHODS}, got {method!r}")
    model, tok = load(job["model_dir"], method)
    if method == "attnlrp":
        run = attnlrp_runner(model)
    else:
        run = contextcite_runner(model, tok, int(method.split("-")[1]))
    run_documents(job, run)


if __name__ == "__main__":
    main(sys.argv[1])
