"""How many SmolLM2 input embeddings have a near twin: the fact behind the default
``conceptual_threshold=None`` (README, "The default").

Conceptual suppression also lowers every unit whose layer-0 input embedding has cosine >= kappa
with the suppressed one. This measures, for SmolLM2-135M-Instruct, a few token pairs and the
share of a seeded sample of 4,000 vocabulary tokens that have another token at cosine >= 0.7.

Usage: ``python benchmarks/embedding_similarity.py`` (writes
``benchmarks/results/embedding_similarity.csv``).
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
from pathlib import Path

import torch
from _harness import machine

OUT = Path(__file__).resolve().parent / "results" / "embedding_similarity.csv"
PAIRS = [(",", "."), (" a", " the"), (" museum", " museums")]


def main() -> None:
    from atman_kernels.models import load_smollm2

    model, tok = load_smollm2()
    emb = model.get_input_embeddings().weight.detach().double()
    unit = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-8)
    rows = []
    for a, b in PAIRS:
        ia, ib = (tok.encode(x, add_special_tokens=False) for x in (a, b))
        assert len(ia) == len(ib) == 1, (a, b)
        rows.append({"what": f"cosine {a!r} {b!r}", "value": float(unit[ia[0]] @ unit[ib[0]])})
    idx = torch.randperm(emb.shape[0], generator=torch.Generator().manual_seed(0))[:4000]
    sim = unit[idx] @ unit.T
    sim[torch.arange(idx.numel()), idx] = -1.0  # not the token itself
    rows.append({"what": "share of 4000 sampled tokens with another token at cosine >= 0.7",
                 "value": float((sim.max(dim=1).values >= 0.7).double().mean())})
    stamp = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "model": "SmolLM2-135M-Instruct", "machine": machine(),
             "threads": torch.get_num_threads(), "loadavg_1m": f"{os.getloadavg()[0]:.1f}"}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["what", "value", *stamp])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **stamp})
    for row in rows:
        print(f"{row['value']:.3f}  {row['what']}")


if __name__ == "__main__":
    main()
