"""absLRP on timm ViT-B/16 against a plain forward + input-gradient backward (issue 3).

The measurement is ``bench_cnn.py``'s (interleaved rounds in one run, medians, peak memory) with
ViT defaults: ``vit_base_patch16_224``, batch 8, preset ``abslrp``, random weights, float32, eval
mode, timm's fused attention as shipped (lrpgraph rewrites it into explicit nodes). The absLRP
time is the whole explanation, the recorded forward included (``report=False``, traced once).
It also checks that the rewritten graph gives the model's logits.

    OMP_NUM_THREADS=2 python benchmarks/bench_vit.py                # both allocator settings
    OMP_NUM_THREADS=2 python benchmarks/bench_vit.py --allocator default --repeats 5
    OMP_NUM_THREADS=2 python benchmarks/bench_vit.py --all-configs  # + trace/run every real config once
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import bench_cnn  # noqa: E402
from tv_compat import import_timm  # noqa: E402  (benchmark set-up only)

import lrpgraph  # noqa: E402

CONFIGS = [
    ("vit_tiny_patch16_224", {}),
    ("vit_small_patch16_224", {}),
    ("deit_small_patch16_224", {}),
    ("vit_base_patch16_224", {}),
    ("vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False, "fc_norm": True}),
]


def sdpa_parity(name: str) -> float:
    """Max |logits of the rewritten graph - logits of the model| on two random images."""
    torch.manual_seed(0)
    model = import_timm().create_model(name, pretrained=False).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        return (lrpgraph.Explainer(model).graph_module(x) - model(x)).abs().max().item()


def all_configs() -> None:
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


def main() -> int:
    p = bench_cnn.parser(model="vit_base_patch16_224", presets=("abslrp",), doc=__doc__)
    p.add_argument("--all-configs", action="store_true", help="also trace and explain every real config once")
    argv = sys.argv[1:]
    a = bench_cnn.quick(p.parse_args(argv))
    if a.allocator == "both" and a.device == "cpu":
        return bench_cnn.run_allocators(os.path.abspath(__file__), argv)
    rc = bench_cnn.main(argv, p)
    print(f"rewritten-SDPA logits vs model ({a.model}): max |diff| {sdpa_parity(a.model):.1e}")
    if a.all_configs:
        all_configs()
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
