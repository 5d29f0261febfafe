"""Node-by-node comparison of lrpgraph with the authors' absLRP code, for one fixture sample.

Two steps, because the reference runs in its own virtual environment (see README.md here):

    # 1. in the reference's venv: record, for every module of the reference, its forward output
    #    and the relevance that enters it (one sample)
    python benchmarks/parity/compare_nodes.py dump --era paper --ref DIR --model vit --out /tmp/vit-paper.trace
    # 2. here: match every recorded module to the lrpgraph node with the same value, and print
    #    the relevance on both sides (unit L1 per pass) from the output back, and the first divergence
    python benchmarks/parity/compare_nodes.py compare /tmp/vit-paper.trace

Matching is by value (same shape, equal numbers), so no table of names is needed; modules whose
output is a copy of another's (wrappers, Dropout) match the same node. The reference gets the
deliberate deviations that make_fixtures.py applies (Dropout pass-through, DistilBERT fan-out sums).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))

import models  # noqa: E402


def dump(a) -> None:
    """Run the reference on sample ``a.sample`` and save module outputs and incoming relevance."""
    sys.path.insert(0, os.path.abspath(a.ref))
    import make_fixtures as mf
    from tv_compat import import_timm
    timm = import_timm()
    outputs, relevance, order = {}, {}, []
    kind = models.SPECS[a.model]["kind"]
    model = models.build(a.model, timm, a.seed)
    x = _inputs(a.model, a.seed, a.sample)
    if a.era == "paper":
        from ramp_gae.ramp import models as ramp
        model = {"vit": ramp.TimmVisionTransformer, "resnet": ramp.TimmResNet, "vgg": ramp.TimmVGG16,
                 "distilbert": ramp.RAMPDistilBertForSequenceClassification}[kind](model)
        model = model.double().eval()
        torch.set_default_dtype(torch.float64)  # the DistilBERT mask fill (see make_fixtures.py)
        method = "backward_prel"
    else:
        mf_model = model
        method = "explain"
    mods = dict(model.named_modules())

    def hook(name):
        def fwd(m, args, out):
            if isinstance(out, torch.Tensor):
                outputs[name] = out.detach().clone()
        return fwd

    for name, m in mods.items():
        m.register_forward_hook(hook(name))

    def patch(name, m):
        fn = getattr(m, method)

        def wrapped(prel, *args, **kwargs):
            if isinstance(prel, torch.Tensor):
                relevance.setdefault(name, []).append(prel.detach().clone())
                order.append(name)
            return fn(prel, *args, **kwargs)
        setattr(m, method, wrapped)

    if a.era == "paper":
        for name, m in mods.items():
            if hasattr(m, method):
                patch(name, m)
        o = model(*x) if kind == "distilbert" else model(x.clone().requires_grad_(True))
        t = o.argmax(-1)
        model.backward_prel(mf.start_signed(o.detach(), t), mf.FanOutSum("intline") if kind == "distilbert" else "intline")
    else:
        from torch import nn
        from abslrp_gae.abslrp.relevancy_methods import AbsLRPRelevancyMethod
        from abslrp_gae.abslrp.rules import models as rules
        from abslrp_gae.abslrp.rules.base import IdentityLRPModuleRule
        base = {"vit": rules.VisionTransformerAbsLRPRule, "resnet": rules.ResNetAbsLRPRule,
                "vgg": rules.AbsLRPRule}[kind]
        table = dict(base.model_fields["module_to_rule_dict"].default)
        table[nn.Dropout] = IdentityLRPModuleRule()
        base(module_to_rule_dict=table).apply(mf_model)
        mods = dict(mf_model.named_modules())
        for name, m in mods.items():
            m.register_forward_hook(hook(name))
            if hasattr(m, method):
                patch(name, m)
        with torch.no_grad():
            t = mf_model(x).argmax(-1)
        outputs.clear()
        AbsLRPRelevancyMethod(mf_model, device="cpu")._generate_relevancy(x.clone(), t)
    torch.save({"model": a.model, "era": a.era, "seed": a.seed, "sample": a.sample, "target": t,
                "outputs": outputs, "relevance": relevance, "order": order}, a.out)
    print(f"{a.out}: {len(relevance)} modules with relevance")


def _inputs(name: str, seed: int, sample: int):
    """One sample's input: an image batch ``(1, 3, 32, 32)`` or, for DistilBERT, ``(ids, mask)``."""
    if models.SPECS[name]["kind"] == "distilbert":
        return tuple(t[sample:sample + 1] for t in models.token_inputs(seed))
    return models.inputs(seed)[sample:sample + 1]


def _unit(t: torch.Tensor) -> torch.Tensor:
    t = t.double().flatten()
    return t / (t.abs().sum() + 1e-30)


def compare(a) -> None:
    """Match reference modules to lrpgraph nodes by value and print the relevance side by side."""
    import lrpgraph
    from torch import fx
    from tv_compat import import_timm
    tr = torch.load(a.trace)
    preset = "abslrp" if tr["era"] == "paper" else "abslrp-renorm"
    model = models.build(tr["model"], import_timm(), tr["seed"])
    x = _inputs(tr["model"], tr["seed"], tr["sample"])
    if isinstance(x, tuple):  # token ids and mask: the Hugging Face model, captured by export
        from lrpgraph.text import trace_hf
        model, output, (x, *extra) = trace_hf(model, ["input_ids", "attention_mask"]), "logits", x
    else:
        output, extra = None, []
    ex = lrpgraph.Explainer(model, rules=preset, output=output)
    values = {}

    class Rec(fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            if isinstance(v, torch.Tensor):
                values[n.name] = v.detach()
            return v

    with torch.no_grad():
        Rec(ex.graph_module).run(x, *extra)
    e = ex(x, target=tr["target"], extra_inputs=extra, keep=list(values))
    seen, first = set(), None
    print(f"{'reference module':40s} {'lrpgraph node':28s} pass  cosine   ref[:3] / ours[:3] (unit L1)")
    for name in tr["order"]:
        if name in seen:
            continue
        seen.add(name)
        out = tr["outputs"].get(name)
        if out is None:
            continue
        match = [n for n, v in values.items() if v.shape == out.shape and v.dtype == out.dtype
                 and torch.allclose(v, out, atol=1e-10)
                 and n in e.latent]
        if not match:
            print(f"{name:40s} {'(no node with this value)':28s}")
            continue
        node = match[-1]
        ours = e.latent[node]
        ours = ours.total() if hasattr(ours, "total") else ours
        for k, ref in enumerate(tr["relevance"][name][:ours.shape[0]]):
            r, o = _unit(ref), _unit(ours[k])
            cos = float(torch.dot(r, o) / (r.norm() * o.norm() + 1e-30))
            flag = ""
            if cos < a.threshold and first is None:
                first, flag = (name, node, k), "   <-- first divergence"
            print(f"{name:40s} {node:28s} {k:4d}  {cos:+.5f}  {r[:3].tolist()} / {o[:3].tolist()}{flag}"
                  if a.verbose else f"{name:40s} {node:28s} {k:4d}  {cos:+.5f}{flag}")
    print("first divergence:", first if first else f"none (every matched node has cosine >= {a.threshold})")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("--era", choices=("current", "paper"), required=True)
    d.add_argument("--ref", required=True)
    d.add_argument("--model", choices=list(models.SPECS), required=True)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--sample", type=int, default=0)
    d.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    c.add_argument("trace")
    c.add_argument("--threshold", type=float, default=0.9999)
    c.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    dump(a) if a.cmd == "dump" else compare(a)


if __name__ == "__main__":
    main()
