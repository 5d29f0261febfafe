"""Regenerate the comparison tables of docs/evaluation.md: every method on the three bundled models
with GAE (mean over seeds 0, 1, 2), ABPC and SRG, each with its bootstrap 95 % interval.

    OMP_NUM_THREADS=2 python benchmarks/evaluation_tables.py                 # full: 256 images, results/<model>/
    OMP_NUM_THREADS=1 python benchmarks/evaluation_tables.py --quick         # smoke run: 16 images, 3 methods

Each model is one ``lrpgraph evaluate`` run (same arguments as the command line) writing
``evaluation.{md,csv,png}`` and ``evaluation_samples.pt`` into ``<out>/<model>/``; the wall time of
each run is printed and written into ``<out>/timing.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import List

from lrpgraph.evaluate.cli import main as evaluate

FULL = ["--methods", "all", "--metrics", "gae", "abpc", "srg", "--n", "256", "--seeds", "0", "1", "2",
        "--abpc-baseline", "black", "--srg-patch", "4", "--srg-steps", "100"]
QUICK = ["--methods", "abslrp", "gradient-x-input", "random", "--metrics", "gae", "abpc", "srg", "--n", "16",
         "--seeds", "0", "1", "--gae-steps", "4", "--abpc-baseline", "black", "--srg-patch", "8",
         "--srg-steps", "16", "--n-boot", "500", "--no-plot"]


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vgg", "resnet", "vit"])
    p.add_argument("--out", default=None, help="output folder (default results/, or a temporary one with --quick)")
    p.add_argument("--quick", action="store_true", help="16 images, 3 methods, small steps: checks the pipeline")
    a, extra = p.parse_known_args(argv)
    out = a.out or (tempfile.mkdtemp(prefix="lrpgraph-tables-") if a.quick else "results")
    times = []
    for m in a.models:
        args = (QUICK if a.quick else FULL) + ["--models", m, "--out", os.path.join(out, m), "--quiet"] + extra
        t0 = time.perf_counter()
        rc = evaluate(args)
        dt = time.perf_counter() - t0
        if rc:
            return rc
        times.append((m, dt))
        print(f"{m}: {dt:.1f} s", file=sys.stderr)
    with open(os.path.join(out, "timing.md"), "w") as f:
        f.write(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n\n| model | wall s |\n|---|---|\n")
        f.writelines(f"| {m} | {dt:.1f} |\n" for m, dt in times)
    print(f"tables in {out}/<model>/evaluation.md, timing in {out}/timing.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
