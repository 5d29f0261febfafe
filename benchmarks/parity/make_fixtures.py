"""Run the authors' absLRP code on the models of ``models.py`` and save parity fixtures.

Run by hand, once per code era, each in its own virtual environment (see README.md here):

    python benchmarks/parity/make_fixtures.py --era current --ref /path/to/current-checkout
    python benchmarks/parity/make_fixtures.py --era paper   --ref /path/to/paper-era-checkout

``--ref`` is the directory that contains the ``abslrp_gae`` (current) or ``ramp_gae`` (paper-era)
package. Each fixture ``fixtures/<model>-<era>.pt`` holds the model name and weight seed (the
weights and inputs are rebuilt from ``models.py``; the inputs' sum is kept as a check), the
explained classes and the reference's input relevance (computed in float64, stored in float32),
one map per input. DistilBERT (paper era only; the current code has no rule set for it) takes token
ids and an attention mask (kept in the fixture) and its map is the relevance of the embeddings'
output ``(N, dim)``, where the paper-era wrapper's backward pass ends. Deliberate deviations of lrpgraph are applied on
the reference side too, so that the fixtures test everything else:

* Dropout is a pure pass-through (the current code gives it the identity-like absLRP rule; the
  paper-era code never explains it, which is already a pass-through);
* the current code's VGG-only max-pool variant (no division by the output) is not used: VGG is
  explained with the plain rule set, as lrpgraph does;
* the paper-era DistilBERT wrapper sums the branches of its fan-outs as its ViT wrapper does
  (see :class:`FanOutSum`); the map of the wrapper as it is is kept too (``relevance_as_is``).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))  # tv_compat: timm beside a CPU torch

import models  # noqa: E402


def start_signed(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """+1 on the target, -1/(C-1) on every other class (lrpgraph's `abslrp` start)."""
    oh = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
    return oh - (1 - oh) / (logits.shape[-1] - 1)


def run_paper(name: str, timm, seed: int, x: torch.Tensor):
    from ramp_gae.ramp import models as ramp
    model = models.build(name, timm, seed)
    kind = models.SPECS[name]["kind"]
    wrap = {"vit": ramp.TimmVisionTransformer, "resnet": ramp.TimmResNet, "vgg": ramp.TimmVGG16}[kind]
    ff = wrap(model).double().eval()
    maps, targets = [], []
    for i in range(x.shape[0]):  # one sample at a time: the position-embedding share couples a batch
        xi = x[i:i + 1].clone().requires_grad_(True)
        o = ff(xi)
        t = o.argmax(-1)
        maps.append(ff.backward_prel(start_signed(o.detach(), t), "intline").detach()[0])
        targets.append(int(t))
    return torch.stack(maps), torch.tensor(targets)


class FanOutSum(str):
    """The rule name ``"intline"``, for which ``"newintline" in rule`` holds too.

    Driven with plain ``"intline"``, the paper-era DistilBERT wrapper rescales each branch of a
    fan-out (shortcut and sub-layer of both residual blocks; value and query/key paths of the
    attention) to the absolute mass it had before summing them; its ViT wrapper, with the same
    rule, sums them as they come. lrpgraph's `abslrp` sums (one rule per op, not per model family),
    so the harness makes the DistilBERT wrapper take its own plain-sum branches (``"newintline"``)
    while every module still sees ``rule == "intline"``.
    """

    def __contains__(self, part: str) -> bool:
        return part == "newintline" or str.__contains__(self, part)


def run_paper_distilbert(seed: int, ids: torch.Tensor, mask: torch.Tensor, rule: str = FanOutSum("intline")):
    """The paper-era DistilBERT wrapper, one sequence at a time; the map is the relevance of the
    embeddings' output (the wrapper detaches it there: its backward pass ends at that tensor).

    The wrapper fills masked scores with ``torch.tensor(torch.finfo(dtype).min)``, a tensor of the
    default dtype: in float64 with a float32 default that is -inf, and its softmax rule then
    multiplies 0 by -inf (NaN). Float64 as the default dtype makes the fill float64's minimum, as it
    is float32's minimum when the wrapper runs in float32."""
    from ramp_gae.ramp import models as ramp
    ff = ramp.RAMPDistilBertForSequenceClassification(models.build("distilbert", None, seed)).double().eval()
    maps, targets, logits = [], [], []
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for i in range(ids.shape[0]):
            o = ff(ids[i:i + 1], mask[i:i + 1])
            t = o.argmax(-1)
            maps.append(ff.backward_prel(start_signed(o.detach(), t), rule).detach()[0])
            targets.append(int(t))
            logits.append(o.detach()[0])
    finally:
        torch.set_default_dtype(default)
    return torch.stack(maps), torch.tensor(targets), torch.stack(logits)


def run_current(name: str, timm, seed: int, x: torch.Tensor):
    from torch import nn
    from abslrp_gae.abslrp.relevancy_methods import AbsLRPRelevancyMethod
    from abslrp_gae.abslrp.rules import models as rules
    from abslrp_gae.abslrp.rules.base import IdentityLRPModuleRule
    model = models.build(name, timm, seed)
    kind = models.SPECS[name]["kind"]
    base = {"vit": rules.VisionTransformerAbsLRPRule, "resnet": rules.ResNetAbsLRPRule,
            "vgg": rules.AbsLRPRule}[kind]  # VGG: not VGGAbsLRPRule (see the module doc)
    table = dict(base.model_fields["module_to_rule_dict"].default)
    table[nn.Dropout] = IdentityLRPModuleRule()  # lrpgraph's Dropout pass-through
    base(module_to_rule_dict=table).apply(model)
    method = AbsLRPRelevancyMethod(model, device="cpu")
    maps, targets = [], []
    for i in range(x.shape[0]):
        xi = x[i:i + 1].clone()
        with torch.no_grad():
            t = model(xi).argmax(-1)
        maps.append(method._generate_relevancy(xi, t).detach()[0])  # before its max-abs scaling
        targets.append(int(t))
    return torch.stack(maps), torch.tensor(targets)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--era", choices=("current", "paper"), required=True)
    ap.add_argument("--ref", required=True, help="directory holding abslrp_gae/ or ramp_gae/")
    ap.add_argument("--models", nargs="*", default=None, help="default: every model with this era")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "fixtures"))
    a = ap.parse_args(argv)
    sys.path.insert(0, os.path.abspath(a.ref))
    from tv_compat import import_timm
    timm = import_timm()
    torch.manual_seed(0)
    os.makedirs(a.out, exist_ok=True)
    names = a.models or [n for n in models.SPECS if a.era in models.ERAS.get(n, ("paper", "current"))]
    for name in names:
        extra = {}
        if models.SPECS[name]["kind"] == "distilbert":
            if a.era != "paper":
                raise SystemExit("distilbert: only the paper-era code has a DistilBERT wrapper")
            import transformers
            x, mask = models.token_inputs(a.seed)
            maps, targets, logits = run_paper_distilbert(a.seed, x, mask)
            as_is = run_paper_distilbert(a.seed, x, mask, "intline")[0]  # the wrapper unchanged, for the record
            extra = {"transformers": transformers.__version__, "ids": x, "mask": mask, "logits": logits,
                     "relevance_as_is": as_is.float()}
        else:
            x = models.inputs(a.seed)
            run = run_paper if a.era == "paper" else run_current
            maps, targets = run(name, timm, a.seed, x)
        path = os.path.join(a.out, f"{name}-{a.era}.pt")
        torch.save({"model": name, "era": a.era, "seed": a.seed, "timm": timm.__version__,
                    "x_sum": float(x.sum()), "target": targets, "relevance": maps.float(), **extra}, path)
        print(f"{path}: targets {targets.tolist()}, map sums {maps.flatten(1).sum(1).tolist()}")


if __name__ == "__main__":
    main()
