"""Does keeping the attention sink out of the units explain better? (issue "designs", item 5)

Bare factual prompts whose first token is a content word or an article ("The capital of France
is" -> " Paris"), SmolLM2-135M-Instruct, token units. For each prompt and each setting
(``sink="explain"``: position 0 is a unit like any other; ``sink="keep"``: it is never
suppressed nor explained) the explanation's top-k tokens (k = 1, 2) are *removed* from the
prompt (re-tokenised, as ContextCite's removal metric does) and the drop of log p(target) is
measured (higher = the method found tokens the prediction rests on). Only prompts whose target
is the model's greedy next token are kept.

Usage::

    python benchmarks/bench_sink.py --out benchmarks/results/sink_cpu.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _harness import machine_stamp  # noqa: E402
from _timing import Stopwatch  # noqa: E402

PROMPTS = [
    ("The capital of France is", " Paris"), ("The capital of Italy is", " Rome"),
    ("The capital of Japan is", " Tokyo"), ("The capital of Spain is", " Madrid"),
    ("The capital of Germany is", " Berlin"), ("Paris is the capital of", " France"),
    ("Tokyo is the capital of", " Japan"), ("Water is made of hydrogen and", " oxygen"),
    ("The opposite of hot is", " cold"), ("The sun rises in the", " east"),
    ("A week has seven", " days"), ("The color of the sky is", " blue"),
    ("Cats and dogs are", " animals"), ("One plus one equals", " two"),
    ("The largest ocean is the", " Pacific"), ("Ice is frozen", " water"),
    ("Bees make", " honey"), ("Shakespeare wrote Romeo and", " Juliet"),
    ("The first month of the year is", " January"), ("Snow is cold and", " white"),
]


def logp(model, tokenizer, prompt: str, target: str) -> float:
    ids = tokenizer(prompt)["input_ids"]
    tgt = tokenizer(target, add_special_tokens=False)["input_ids"]
    seq = torch.tensor([ids + tgt[:-1]])
    with torch.inference_mode():
        logits = model(seq).logits[0, len(ids) - 1:].double().log_softmax(-1)
    return float(logits[torch.arange(len(tgt)), torch.tensor(tgt)].sum())


def removed(prompt: str, spans: list) -> str:
    keep, at = [], 0
    for s in sorted(spans, key=lambda s: s.start):
        keep.append(prompt[at:s.start])
        at = s.end
    keep.append(prompt[at:])
    return " ".join("".join(keep).split())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "results" / "sink_cpu.csv")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from atman_kernels import AtManExplainer
    from atman_kernels.models import load_smollm2

    model, tokenizer = load_smollm2()
    rows, load0, whole_run = [], os.getloadavg()[0], Stopwatch()
    for prompt, target in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        with torch.inference_mode():
            top = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if top != tokenizer(target, add_special_tokens=False)["input_ids"][0]:
            continue
        base = logp(model, tokenizer, prompt, target)
        for sink in ("explain", "keep"):
            ex = AtManExplainer(model, tokenizer, progress=False, sink=sink)
            expl = ex.explain(prompt, target, design="single")
            prompt_units = [(i, s) for i, s in enumerate(expl.spans) if s.source == "prompt"]
            ranked = sorted(prompt_units, key=lambda t: -float(expl.scores[t[0]]))
            row = {"prompt": prompt, "target": target, "sink": sink,
                   "top1": ranked[0][1].text}
            for k in (1, 2):
                text = removed(prompt, [s for _, s in ranked[:k]])
                row[f"drop_top{k}"] = base - logp(model, tokenizer, text, target) if text else ""
            rows.append(row)
    stamp = {**machine_stamp(), "threads": args.threads, "load_avg_1m_start": load0,
             "load_avg_1m_end": os.getloadavg()[0],
             "wall_s": round(whole_run.seconds, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*rows[0], *stamp])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **stamp})
    print("| sink | prompts | top-1 drop | top-2 drop | top-1 is position 0 |")
    print("|---|---|---|---|---|")
    for sink in ("explain", "keep"):
        mine = [r for r in rows if r["sink"] == sink]
        firsts = sum(r["prompt"].startswith(r["top1"]) for r in mine)
        d1 = statistics.mean(float(r["drop_top1"]) for r in mine)
        d2 = statistics.mean(float(r["drop_top2"]) for r in mine if r["drop_top2"] != "")
        print(f"| {sink} | {len(mine)} | {d1:.2f} | {d2:.2f} | {firsts} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
