"""Measure the effect of every difference between lrpgraph's GAE and the authors' reference code.

Each difference is switched back to the reference's behaviour on its own (by patching one building
block of ``lrpgraph.evaluate.gae``), on the same images, mosaics and seed, and the change in the
mean scores is printed. Also: how much one seed and the batch of the trajectory passes move GAE.

    OMP_NUM_THREADS=1 python benchmarks/gae_deviations.py --model vgg --n 64
    OMP_NUM_THREADS=1 python benchmarks/gae_deviations.py --quick      # 16 images, one method

The reference behaviours emulated here (from the authors' public ``abslrp_gae/gae/gae.py``):
the masked count ``int(float32(t / T) * D)``, ``topk`` selection on float32 scores, methods that
return ``map / (max|map| + 1e-9)`` before GAE's ``relu / (max + 1e-9)``, and a score map whose
centre is only the 2x2 square.
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Dict, Iterator

import torch
from torch import nn

import lrpgraph.evaluate.gae as gae_mod
from lrpgraph import zoo
from lrpgraph.evaluate import GAE, get_method
from lrpgraph.evaluate.stats import bootstrap_ci

FIELDS = ["gae", "local_consistency", "faithfulness", "robustness", "contrastiveness"]


def ref_count(t: int, T: int, D: int) -> int:
    """The reference's masked count: a float32 linspace value times D, truncated."""
    return int(torch.linspace(1 / T, 1, T)[t - 1] * D)


def ref_select(r: torch.Tensor, k: int, descending: bool) -> torch.Tensor:
    """The reference's selection: ``topk`` on float32 scores (tie order left to the kernel)."""
    return r.float().topk(k, dim=1, largest=descending).indices


def ref_score_map(probs, labels, q, H, W):
    """The reference's score map: only the 2x2 centre square set to +1."""
    m = _score_map(probs, labels, q, H, W)
    v = m[:, :, [0, 0, H - 1, H - 1], [0, W - 1, 0, W - 1]]        # the four quadrant values
    v = v.view(-1, 1, 2, 1, 2, 1).expand(-1, 1, 2, H // 2, 2, W // 2).reshape(-1, 1, H, W).clone()
    v[:, :, H // 2 - 1:H // 2 + 1, W // 2 - 1:W // 2 + 1] = 1
    return v


_score_map = gae_mod.score_map


def abs_max_first(fn):
    """A method as the reference's wrappers return it: divided by its absolute maximum + 1e-9."""
    def wrapped(model, x, t):
        a = fn(model, x, t)
        return a / (a.flatten(1).abs().amax(1).view(-1, *([1] * (a.dim() - 1))) + 1e-9)
    return wrapped


@contextlib.contextmanager
def patched(name: str, value) -> Iterator[None]:
    old = getattr(gae_mod, name)
    setattr(gae_mod, name, value)
    try:
        yield
    finally:
        setattr(gae_mod, name, old)


class PerSample(nn.Module):
    """The model run one sample at a time (batch 1 everywhere)."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        return torch.cat([self.m(x[i:i + 1]) for i in range(x.shape[0])])


def scores(model, x, y, method: str, seed: int = 0, wrap=None, **kw) -> Dict[str, torch.Tensor]:
    fn = get_method(method)
    fn = wrap(fn) if wrap else fn
    r = GAE(seed=seed, progress=False, **kw)(model, x, y, explain=fn)
    return {f: getattr(r, f) for f in FIELDS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vgg")
    p.add_argument("--n", type=int, default=64, help="images (multiple of 4)")
    p.add_argument("--methods", nargs="+", default=["gradient-x-input", "abslrp"])
    p.add_argument("--seeds", type=int, default=5, help="seeds for the spread over seeds")
    p.add_argument("--quick", action="store_true", help="16 images, gradient-x-input, 2 seeds")
    a = p.parse_args()
    if a.quick:
        a.n, a.methods, a.seeds = 16, ["gradient-x-input"], 2
    model = zoo.load(a.model).eval()
    x, y = zoo.load_samples(a.n)
    D = x[0].numel()
    off = [(t, gae_mod.masked_count(t, 10, D), ref_count(t, 10, D)) for t in range(1, 10)
           if gae_mod.masked_count(t, 10, D) != ref_count(t, 10, D)]
    print(f"model {a.model}, {a.n} images ({a.n // 4} mosaics), D = {D}; T = 10 steps where the reference "
          f"masks another count (step, ours, reference): {off}")
    for meth in a.methods:
        base = scores(model, x, y, meth)
        print(f"\n[{meth}] lrpgraph: " + ", ".join(f"{f} {float(base[f].mean()):.4f}" for f in FIELDS))
        variants = {
            "reference masking schedule": (lambda: patched("masked_count", ref_count), None),
            "reference topk selection (float32)": (lambda: patched("select_masked", ref_select), None),
            "reference normalisation (abs max first)": (contextlib.nullcontext, abs_max_first),
            "reference centre square": (lambda: patched("score_map", ref_score_map), None),
        }
        for name, (ctx, wrap) in variants.items():
            with ctx():
                v = scores(model, x, y, meth, wrap=wrap)
            d = {f: float((v[f].mean() - base[f].mean()).abs()) for f in FIELDS}
            worst = max(float((v[f] - base[f]).abs().max()) for f in FIELDS)
            print(f"  {name:42s} change of the means: " + ", ".join(f"{f} {d[f]:.2g}" for f in FIELDS)
                  + f"; largest change of one mosaic's score {worst:.2g}")
        per_seed = [float(scores(model, x, y, meth, seed=s)["gae"].mean()) for s in range(a.seeds)]
        lo, hi = bootstrap_ci(base["gae"])
        print(f"  mean GAE per seed 0..{a.seeds - 1}: " + ", ".join(f"{g:.3f}" for g in per_seed)
              + f"; seed 0 bootstrap 95 % interval over mosaics [{lo:.3f}, {hi:.3f}]")
    plans = [GAE(progress=False).prepare(m, x, y) for m in (PerSample(model), model)]
    diff = sum(not (torch.equal(plans[0].morf_inputs[i], plans[1].morf_inputs[i])
                    and torch.equal(plans[0].lerf_inputs[i], plans[1].lerf_inputs[i])) for i in range(len(plans[0])))
    print(f"\ntrajectory passes at batch 1 vs plan_batch_size 32: {diff} of {len(plans[0])} mosaics' "
          "trajectories differ (float rounding of the gradient flips near-ties)")


if __name__ == "__main__":
    main()
