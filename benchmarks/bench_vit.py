"""absLRP on timm ViT-B/16 against a plain forward + input-gradient backward (issue 3).

Both are measured in one run, interleaved (gradient, absLRP, gradient, absLRP, ...), and the
medians are compared. Random weights (nothing is downloaded), float32, eval mode, fused attention
as timm ships it (lrpgraph rewrites it into explicit nodes).

    OMP_NUM_THREADS=2 python benchmarks/bench_vit.py                # ViT-B/16, batch 8, 3 repeats
    OMP_NUM_THREADS=2 python benchmarks/bench_vit.py --all-configs  # + trace/run every real config once

The gradient baseline is what a gradient explanation costs: ``model(x)`` with ``x.requires_grad``
and frozen weights, then ``logits[target].sum().backward()``. The absLRP time is the whole
explanation, the recorded forward included (``Explainer(...)(x, report=False)``, traced once).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from tv_compat import import_timm  # noqa: E402  (benchmark set-up only)

import lrpgraph  # noqa: E402

CONFIGS = [
    ("vit_tiny_patch16_224", {}),
    ("vit_small_patch16_224", {}),
    ("deit_small_patch16_224", {}),
    ("vit_base_patch16_224", {}),
    ("vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False, "fc_norm": True}),
]


def gradient(model, x, target):
    x = x.detach().requires_grad_(True)
    out = model(x)
    out.gather(1, target[:, None]).sum().backward()
    return x.grad


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(name: str, batch: int, repeats: int, preset: str) -> dict:
    timm = import_timm()
    model = timm.create_model(name, pretrained=False).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(batch, 3, 224, 224)
    target = torch.arange(batch) % 1000
    ex = lrpgraph.Explainer(model, rules=preset)
    with torch.no_grad():
        err = (ex.graph_module(x[:2]) - model(x[:2])).abs().max().item()
    gradient(model, x[:1], target[:1])  # warm-up
    ex(x[:1], target[:1], report=False)
    g, a = [], []
    for _ in range(repeats):
        g.append(timed(lambda: gradient(model, x, target)))
        a.append(timed(lambda: ex(x, target, report=False)))
    gm, am = statistics.median(g), statistics.median(a)
    return dict(model=name, batch=batch, preset=preset, grad_s=gm, abslrp_s=am, ratio=am / gm,
                sdpa_parity=err, grad_all=g, abslrp_all=a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--preset", default="abslrp")
    ap.add_argument("--all-configs", action="store_true", help="also trace and explain every real config once")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    r = bench(args.model, args.batch, args.repeats, args.preset)
    print(f"{r['model']} batch {r['batch']} ({r['preset']}): gradient {r['grad_s']:.2f} s, "
          f"explanation {r['abslrp_s']:.2f} s, ratio {r['ratio']:.2f} (median of {args.repeats}); "
          f"rewritten-SDPA logits vs model: max |diff| {r['sdpa_parity']:.1e}")
    print("  all gradient runs:", " ".join(f"{t:.2f}" for t in r["grad_all"]),
          "| all explanation runs:", " ".join(f"{t:.2f}" for t in r["abslrp_all"]))
    if args.all_configs:
        timm = import_timm()
        for name, kw in CONFIGS:
            m = timm.create_model(name, pretrained=False, **kw).eval()
            x = torch.randn(1, 3, 224, 224)
            t = time.perf_counter()
            e = lrpgraph.Explainer(m, rules="abslrp")(x)
            with torch.no_grad():
                err = (e.logits - m(x)).abs().max().item()
            print(f"{name} {kw or ''}: map {tuple(e.relevance.shape)}, worst conservation error "
                  f"{e.conservation().max_rel_error():.1e} (float32), logits vs model {err:.1e}, "
                  f"{time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
