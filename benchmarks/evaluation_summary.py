"""Summarise the tables of ``benchmarks/evaluation_tables.py`` for docs/evaluation.md: one table per
model with GAE, ABPC and SRG (mean [95 % interval]) and two robustness views of GAE that the mean
hides: the share of mosaics with a positive GAE and the mean without the three largest mosaics.

    python benchmarks/evaluation_summary.py                 # reads results/<model>/
    python benchmarks/evaluation_summary.py --results DIR   # another output folder
"""
from __future__ import annotations

import argparse
import csv
import os
from typing import List

import torch


def _iv(row: dict, k: str) -> str:
    if not row.get(k):
        return "-"  # the metric was not run
    return f"{float(row[k]):.3f} [{float(row[k + '_lo']):.3f}, {float(row[k + '_hi']):.3f}]"


def table(folder: str, model: str) -> List[str]:
    """Markdown lines for one model's folder (``evaluation.csv`` and ``evaluation_samples.pt``)."""
    with open(os.path.join(folder, "evaluation.csv")) as f:
        rows = list(csv.DictReader(f))
    samples = torch.load(os.path.join(folder, "evaluation_samples.pt"), weights_only=False)[model]
    out = ["| method | GAE | GAE > 0 | GAE w/o top 3 | LC | C | ABPC | SRG | seconds |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = samples[r["method"]]["gae"].double()
        top = g.sort(descending=True).values
        secs = sum(float(r.get(k) or 0) for k in ("gae_s", "abpc_s", "srg_s"))
        out.append(f"| {r['method']} | {_iv(r, 'gae')} | {float((g > 0).double().mean()):.2f} | "
                   f"{float(top[3:].mean()) if top.numel() > 3 else float('nan'):.3f} | {float(r['local_consistency']):.3f} | "
                   f"{float(r['contrastiveness']):.3f} | {_iv(r, 'abpc')} | {_iv(r, 'srg')} | {secs:.0f} |")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="results")
    ap.add_argument("--models", nargs="+", default=["vgg", "resnet", "vit"])
    a = ap.parse_args(argv)
    for m in a.models:
        print(f"### {m}\n")
        print("\n".join(table(os.path.join(a.results, m), m)) + "\n")


if __name__ == "__main__":
    main()
