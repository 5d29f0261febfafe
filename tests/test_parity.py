"""lrpgraph against the authors' absLRP code: maps stored as fixtures by benchmarks/parity.

Each fixture holds the reference's input relevance for a small deterministic-weight model (ViT,
DeiT-style ViT, ResNet with BasicBlock and Bottleneck, VGG-style CNN; weights and inputs rebuilt
from benchmarks/parity/models.py), made with the paper-era code (preset ``abslrp``) or the current
code (preset ``abslrp-renorm``) in float64. The DistilBERT classifier (paper era only, one sequence
padded) is compared at the embeddings' output, where the reference's map is. See
benchmarks/parity/README.md for how they were made.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PARITY = os.path.join(HERE, "..", "benchmarks", "parity")


def _load_parity():
    spec = importlib.util.spec_from_file_location("lrpgraph_parity", os.path.join(PARITY, "parity.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


parity = _load_parity()
FIXTURES = parity.fixtures()


def test_every_model_and_era_has_a_fixture():
    names = {os.path.basename(p) for p in FIXTURES}
    for model in parity.models.SPECS:
        for era in parity.models.ERAS.get(model, ("paper", "current")):
            assert f"{model}-{era}.pt" in names


@pytest.mark.parametrize("path", FIXTURES, ids=[os.path.basename(p)[:-3] for p in FIXTURES])
def test_matches_the_authors_code(path):
    torch.manual_seed(0)
    f = parity.load(path)
    preset = parity.PRESET[f["era"]]
    ours = parity.explain(f, preset)
    assert ours.shape == f["relevance"].shape and torch.isfinite(ours).all()
    cos, diff = parity.agreement(ours, f["relevance"])
    assert cos >= 0.999 and diff <= 1e-3, f"{preset}: cosine {cos:.6f}, max abs diff {diff:.2e}"
    # the fast path (no report) gives the same map
    fast = parity.explain(f, preset, report=False)
    torch.testing.assert_close(fast, ours, rtol=1e-7, atol=1e-9)
