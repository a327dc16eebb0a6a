"""Explain a whole JSONL dataset with AtMan, sharded across processes with torch.distributed.

Input: one JSON object per line with "prompt" and "target" (strings). Output: one JSON object
per input line, in input order: {"index", "prompt", "target", "explanation": {...}} where
``explanation`` is :meth:`atman_kernels.explain.Explanation.to_dict` (tokens, scores,
per-target matrix, settings), or {"index", "prompt", "target", "error"} if that item failed.

Each process (rank) takes every ``world_size``-th line, explains it with its own copy of the
model, and writes ``OUTPUT.rank<r>``; rank 0 waits for all ranks and merges the shards into
OUTPUT. The backend is gloo on CPU and nccl with CUDA (one GPU per process,
``cuda:LOCAL_RANK``), so the same command scales from a laptop to several GPUs or nodes::

    # 2 processes on one machine (CPU: gloo)
    torchrun --nproc_per_node=2 examples/explain_dataset.py --input x.jsonl --output y.jsonl

    # 2 nodes x 8 GPUs (run on every node; nccl)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        examples/explain_dataset.py --input x.jsonl --output y.jsonl --model /path/to/model

Without torchrun (no RANK / WORLD_SIZE in the environment) it runs as a single process.
``--model`` is a local transformers folder (``from_pretrained``); the default is the bundled
SmolLM2-135M (offline). Every process loads the whole model; for a model larger than one
device, load it with ``device_map`` instead (see the README's "Scale beyond one machine").
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist


def read_items(path: Path) -> list[dict]:
    """The JSONL items, each checked for string "prompt" and "target"."""
    items = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            item = json.loads(line)
            if not isinstance(item, dict) or not all(
                isinstance(item.get(k), str) for k in ("prompt", "target")
            ):
                raise ValueError(f"{path}:{lineno}: expected an object with string 'prompt' "
                                 f"and 'target', got {line.strip()[:80]!r}")
            items.append(item)
    return items


def load_model(name: str | None, device: torch.device):
    """(model, tokenizer): a local transformers folder, or SmolLM2-135M when ``name`` is None."""
    if name is None:
        from atman_kernels.models import load_smollm2

        model, tokenizer = load_smollm2()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    return model.to(device).eval(), tokenizer


def explain_shard(items: list[tuple[int, dict]], model, tokenizer, args) -> list[dict]:
    from atman_kernels.explain import AtManExplainer

    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    explainer = AtManExplainer(model, tokenizer, factor=args.factor, mode=args.mode,
                               conceptual_threshold=args.conceptual_threshold,
                               batch_size=batch, progress=False)
    results = []
    for index, item in items:
        record = {"index": index, "prompt": item["prompt"], "target": item["target"]}
        try:
            record["explanation"] = explainer.explain(item["prompt"], item["target"]).to_dict()
        except Exception as exc:  # noqa: BLE001 - one bad item must not stop the shard
            record["error"] = f"{type(exc).__name__}: {exc}"
        results.append(record)
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", type=Path, required=True, help="JSONL of {prompt, target}")
    ap.add_argument("--output", type=Path, required=True, help="merged JSONL results")
    ap.add_argument("--model", default=None, help="local model folder (default: SmolLM2-135M)")
    ap.add_argument("--mode", default="paper", choices=["paper", "log"])
    ap.add_argument("--factor", type=float, default=0.1)
    ap.add_argument("--conceptual-threshold", type=float, default=0.7)
    ap.add_argument("--batch-size", default="auto", help="variants per forward, or 'auto'")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads per process (default: cores / processes)")
    args = ap.parse_args(argv)

    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    cuda = torch.cuda.is_available()
    if distributed:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, local_world))
        torch.set_num_threads(threads)

    items = read_items(args.input)
    mine = [(i, item) for i, item in enumerate(items) if i % world == rank]
    model, tokenizer = load_model(args.model, device)
    start = time.perf_counter()
    results = explain_shard(mine, model, tokenizer, args)
    shard = args.output.with_name(f"{args.output.name}.rank{rank}")
    shard.parent.mkdir(parents=True, exist_ok=True)
    with open(shard, "w", encoding="utf-8") as fh:
        for record in results:
            fh.write(json.dumps(record) + "\n")
    print(f"rank {rank}/{world}: {len(results)} items in {time.perf_counter() - start:.1f} s",
          flush=True)

    if distributed:
        dist.barrier()  # every shard is written before rank 0 reads them
    if rank == 0:
        merged = []
        for r in range(world):
            part = args.output.with_name(f"{args.output.name}.rank{r}")
            with open(part, encoding="utf-8") as fh:
                merged += [json.loads(line) for line in fh if line.strip()]
            part.unlink()
        merged.sort(key=lambda rec: rec["index"])
        with open(args.output, "w", encoding="utf-8") as fh:
            for record in merged:
                fh.write(json.dumps(record) + "\n")
        failed = sum("error" in rec for rec in merged)
        print(f"wrote {len(merged)} results ({failed} failed) to {args.output}", flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
