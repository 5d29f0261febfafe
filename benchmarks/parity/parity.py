"""lrpgraph against the parity fixtures: the maps, and the agreement measures the test asserts.

    python benchmarks/parity/parity.py            # one line per fixture and preset
"""
from __future__ import annotations

import glob
import os
import sys
from typing import Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))

import models  # noqa: E402

#: which lrpgraph preset reproduces which code era
PRESET = {"paper": "abslrp", "current": "abslrp-renorm"}


def fixtures() -> List[str]:
    return sorted(glob.glob(os.path.join(HERE, "fixtures", "*.pt")))


def load(path: str) -> Dict:
    """A fixture with its model and inputs rebuilt (checked against the stored input sum)."""
    from tv_compat import import_timm
    f = torch.load(path)
    f["model_obj"] = models.build(f["model"], import_timm(), f["seed"])
    f["x"] = models.inputs(f["seed"])
    if abs(float(f["x"].sum()) - f["x_sum"]) > 1e-9:
        raise RuntimeError(f"{path}: the inputs rebuilt here differ from the fixture's")
    return f


def explain(f: Dict, preset: str) -> torch.Tensor:
    import lrpgraph
    e = lrpgraph.Explainer(f["model_obj"], rules=preset)(f["x"], target=f["target"])
    return e.relevance


def agreement(ours: torch.Tensor, ref: torch.Tensor):
    """(worst cosine, worst max abs difference) over samples, maps scaled to max-abs 1 each."""
    a, b = ours.flatten(1).double(), ref.flatten(1).double()
    a = a / a.abs().amax(1, keepdim=True)
    b = b / b.abs().amax(1, keepdim=True)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return float(cos.min()), float((a - b).abs().amax())


def main() -> None:
    for path in fixtures():
        f = load(path)
        cos, diff = agreement(explain(f, PRESET[f["era"]]), f["relevance"])
        print(f"{os.path.basename(path):32s} {PRESET[f['era']]:14s} cosine {cos:.6f}  max abs diff {diff:.2e}")


if __name__ == "__main__":
    main()
