"""CPU time per rule kind of one explanation, as a ratio to a plain input gradient (issue 8).

Process CPU time (not wall time), medians of interleaved rounds, one thread by default, so that a
busy shared machine disturbs the ratios less. Each rule class's ``__call__`` is timed (the outermost
rule call only); "rest" is the recorded forward and the walker.

    OMP_NUM_THREADS=1 python benchmarks/profile_rules.py --model vit_base_patch16_224 --batch 2
    OMP_NUM_THREADS=1 python benchmarks/profile_rules.py --model resnet50 --preset abslrp-renorm
    OMP_NUM_THREADS=1 python benchmarks/profile_rules.py --model vit_base_patch16_224 --batch 8 --aten
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from tv_compat import import_timm  # noqa: E402  (benchmark set-up only)

import lrpgraph  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--preset", default="abslrp")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--aten", action="store_true",
                   help="also one call of each under PyTorch's profiler: the matrix products' share")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = import_timm().create_model(a.model, pretrained=False).eval()
    for q in model.parameters():
        q.requires_grad_(False)
    x = torch.randn(a.batch, 3, a.size, a.size)
    ex = lrpgraph.Explainer(model, rules=a.preset)
    acc: dict = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    depth = [0]

    def timed(cls):
        orig = cls.__call__

        def call(self, ctx, rel):
            if depth[0]:
                return orig(self, ctx, rel)
            depth[0] += 1
            t = time.process_time()
            try:
                return orig(self, ctx, rel)
            finally:
                depth[0] -= 1
                kind = "routing" if "routing" in self.name else self.name.split("(")[0]
                acc[kind] += time.process_time() - t
                calls[kind] += 1
        cls.__call__ = call

    def gradient():
        xi = x.detach().requires_grad_(True)
        out = model(xi)
        out.gather(1, out.argmax(1, keepdim=True)).sum().backward()

    gradient()
    ex(x, report=False)  # warm-up
    done: set = set()
    for rule in set(ex.plan.rules.values()):
        for cls in type(rule).__mro__:
            if "__call__" in cls.__dict__ and cls is not object and cls not in done:
                done.add(cls)
                timed(cls)
    tg, te, per = [], [], []
    for _ in range(a.rounds):
        t = time.process_time()
        gradient()
        tg.append(time.process_time() - t)
        acc.clear()
        calls.clear()
        t = time.process_time()
        ex(x, report=False)
        te.append(time.process_time() - t)
        per.append(dict(acc))
    g, e = statistics.median(tg), statistics.median(te)
    print(f"{a.model}, batch {a.batch}, {a.size}px, {a.preset}, threads {a.threads}, torch {torch.__version__}: "
          f"CPU s gradient {g:.3f}, explanation {e:.3f}, ratio {e / g:.2f} "
          f"(per round: {' '.join(f'{v / u:.2f}' for u, v in zip(tg, te))})")
    kinds = sorted(per[-1], key=lambda k: -statistics.median(d.get(k, 0.0) for d in per))
    total = 0.0
    for k in kinds:
        v = statistics.median(d.get(k, 0.0) for d in per)
        total += v
        print(f"  {k:<32} {v:8.3f} s {v / g:6.2f}x gradient  ({calls[k]} calls)")
    print(f"  {'rest (forward record, walker)':<32} {e - total:8.3f} s {(e - total) / g:6.2f}x gradient")
    if a.aten:
        aten_shares(gradient, lambda: ex(x, report=False))
    return 0


#: the ATen ops of matrix products: Linear layers (mm, addmm) and batched products (bmm)
GEMMS = {"linear (aten::mm, aten::addmm)": ("aten::mm", "aten::addmm"), "batched (aten::bmm)": ("aten::bmm",)}


def aten_shares(gradient: Callable[[], object], explain: Callable[[], object]) -> None:
    """Self CPU time of the matrix products in one call of each, under PyTorch's profiler (which
    slows the many small ops a little), against the whole gradient's."""
    from torch.profiler import ProfilerActivity, profile

    totals = {}
    for name, fn in (("gradient", gradient), ("explanation", explain)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        self_s = {ev.key: ev.self_cpu_time_total / 1e6 for ev in prof.key_averages()}
        totals[name] = (sum(self_s.values()), {k: sum(self_s.get(op, 0.0) for op in ops) for k, ops in GEMMS.items()})
    g = totals["gradient"][0]
    print(f"  profiler, self CPU s: gradient {g:.2f}, explanation {totals['explanation'][0]:.2f}")
    for name, (tot, parts) in totals.items():
        for k, v in parts.items():
            print(f"    {name:<12} {k:<32} {v:7.2f} s {v / g:6.2f}x gradient, {100 * v / tot:4.0f} % of the call")


if __name__ == "__main__":
    raise SystemExit(main())
