"""lrpgraph against the parity fixtures: the maps, and the agreement measures the test asserts.

    python benchmarks/parity/parity.py            # one line per fixture and preset
    python benchmarks/parity/parity.py --quick    # the first fixture of each code era only
"""
from __future__ import annotations

import argparse
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
    """A fixture with its model and inputs rebuilt (checked against the stored input sum; for
    DistilBERT, against the stored token ids and mask, and the reference's logits)."""
    from tv_compat import import_timm
    f = torch.load(path)
    f["model_obj"] = models.build(f["model"], import_timm(), f["seed"])
    if f["model"] == "distilbert":
        ids, mask = models.token_inputs(f["seed"])
        if not (torch.equal(ids, f["ids"]) and torch.equal(mask, f["mask"])):
            raise RuntimeError(f"{path}: the token inputs rebuilt here differ from the fixture's")
        f["x"], f["extra"] = ids, [mask]
        with torch.no_grad():
            logits = f["model_obj"](input_ids=ids, attention_mask=mask).logits
        if not torch.allclose(logits, f["logits"], rtol=0, atol=1e-10):
            raise RuntimeError(f"{path}: the model rebuilt here differs from the reference's (logits)")
        return f
    f["x"], f["extra"] = models.inputs(f["seed"]), []
    if abs(float(f["x"].sum()) - f["x_sum"]) > 1e-9:
        raise RuntimeError(f"{path}: the inputs rebuilt here differ from the fixture's")
    return f


def explain(f: Dict, preset: str, report: bool = True) -> torch.Tensor:
    """lrpgraph's input relevance for the fixture's inputs and targets. For DistilBERT: the
    relevance of the embeddings' output ``(B, N, dim)`` (where the reference's map is), read with
    ``keep=`` from the node of the embeddings module's last op (its Dropout, a pass-through)."""
    import lrpgraph
    if f["model"] != "distilbert":
        return lrpgraph.Explainer(f["model_obj"], rules=preset)(f["x"], target=f["target"], report=report).relevance
    from lrpgraph.text import trace_hf
    gm = trace_hf(f["model_obj"], ["input_ids", "attention_mask"])
    node = [n.name for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("distilbert.embeddings.")][-1]
    e = lrpgraph.Explainer(gm, rules=preset, output="logits")(f["x"], target=f["target"], extra_inputs=f["extra"],
                                                            report=report, keep=[node])
    latent = e.latent[node]
    if latent.shape[0] != 1:
        raise RuntimeError(f"expected one relevance pass with {preset!r}, got {latent.shape[0]}")
    return latent[0]


def agreement(ours: torch.Tensor, ref: torch.Tensor):
    """(worst cosine, worst max abs difference) over samples, maps scaled to max-abs 1 each."""
    a, b = ours.flatten(1).double(), ref.flatten(1).double()
    a = a / a.abs().amax(1, keepdim=True)
    b = b / b.abs().amax(1, keepdim=True)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return float(cos.min()), float((a - b).abs().amax())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="the first fixture of each code era only (tests/test_parity.py checks them all)")
    a = p.parse_args()
    paths = fixtures()
    if a.quick:  # the era from the stored dict, so that skipped fixtures' models are never rebuilt
        first: Dict[str, str] = {}
        for path in paths:
            first.setdefault(torch.load(path)["era"], path)
        paths = [path for path in paths if path in first.values()]
    for path in paths:
        f = load(path)
        ours = explain(f, PRESET[f["era"]])
        cos, diff = agreement(ours, f["relevance"])
        print(f"{os.path.basename(path):32s} {PRESET[f['era']]:14s} cosine {cos:.6f}  max abs diff {diff:.2e}")
        if "relevance_as_is" in f:  # the reference without the harness's deliberate deviation
            cos, diff = agreement(ours, f["relevance_as_is"])
            print(f"{'  (wrapper as it is)':32s} {'':14s} cosine {cos:.6f}  max abs diff {diff:.2e}")


if __name__ == "__main__":
    main()
