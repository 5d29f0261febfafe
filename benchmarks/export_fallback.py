"""Which timm models that torch.fx cannot trace explain through the torch.export fallback.

Each model runs in its own process with a time limit: random weights, float64, batch 2,
``Explainer(model, rules="abslrp")`` (``tracer="auto"``). Prints one markdown row per model::

    .venv/bin/python benchmarks/export_fallback.py vgg16:64 crossvit_tiny_240:240
"""
from __future__ import annotations

import os
import subprocess
import sys

CHILD = r"""
import sys, torch
sys.path.insert(0, "tests")
from tv_compat import import_timm
timm = import_timm()
import lrpgraph
name, size = sys.argv[1], int(sys.argv[2])
kw = {"mlp_ratio": 1 / 128} if name.startswith("vgg") else {}
try:
    model = timm.create_model(name, pretrained=False, num_classes=10, img_size=size, **kw)
except TypeError:
    model = timm.create_model(name, pretrained=False, num_classes=10, **kw)
model = model.eval().double()
fx = "yes"
try:
    lrpgraph.Explainer(model, tracer="fx")
except lrpgraph.LRPTraceError as exc:
    fx = "fails"
row = [name, f"{size} px", fx]
try:
    ex = lrpgraph.Explainer(model, rules="abslrp")
    e = ex(torch.randn(2, 3, size, size, dtype=torch.float64))
    err = e.conservation().max_rel_error()
    row += [ex.tracer, "yes", f"{'yes' if err <= 1e-5 else 'no'} ({err:.1e})", ""]
except Exception as exc:
    msg = str(exc).splitlines()[0][:110].replace("|", "/")
    row += ["?", "no", "", f"{type(exc).__name__}: {msg}"]
print("| " + " | ".join(row) + " |", flush=True)
"""


def main(argv) -> None:
    print("| model | input | fx | tracer | explained | conserved (worst rel. error) | failure |")
    print("|---|---|---|---|---|---|---|")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for spec in argv:
        name, _, size = spec.partition(":")
        try:
            out = subprocess.run([sys.executable, "-c", CHILD, name, size or "64"], capture_output=True,
                                 text=True, timeout=300, env=env)
            rows = [l for l in out.stdout.splitlines() if l.startswith("|")]
            print(rows[-1] if rows else f"| {name} | {size} px | | | no | | crashed: {out.stderr.strip().splitlines()[-1][:110]} |")
        except subprocess.TimeoutExpired:
            print(f"| {name} | {size} px | | | no | | over 300 s |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["vgg16:64"])
