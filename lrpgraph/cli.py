"""The ``lrpgraph`` command: explain | debug | coverage | presets | evaluate | dataset.

``lrpgraph explain`` is the main job: it explains bundled Fashion-MNIST test images with a bundled
trained model and writes the heatmap PNG and the per-node conservation report.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import Explainer, composite_names, get_composite

ZOO = ("vgg", "resnet", "vit")


def _load_model(spec: str, size: int) -> Tuple[nn.Module, Optional[Tensor], Optional[Tensor]]:
    """A bundled model (``vgg``, ``resnet``, ``vit``) with bundled images, or ``timm:NAME``
    (random weights, random input of ``size``; needs the ``zoo`` extra)."""
    if spec in ZOO:
        from . import zoo
        return zoo.load(spec), None, None
    if spec.startswith("timm:"):
        try:
            import timm
        except Exception as exc:  # ImportError, or torchvision's op-loading RuntimeError
            raise SystemExit(f"timm:{spec[5:]} needs timm and a torchvision that imports here "
                             f"(pip install 'lrpgraph[zoo]'; see README on CPU-only torch): {exc}")
        torch.manual_seed(0)
        model = timm.create_model(spec[5:], pretrained=False, num_classes=10).eval()
        return model, torch.randn(2, 3, size, size), None
    raise SystemExit(f"unknown model {spec!r}: use one of {', '.join(ZOO)} or timm:NAME")


def cmd_explain(a: argparse.Namespace) -> int:
    from . import zoo
    from .image import save_grid

    model = zoo.load(a.model)
    x, y = zoo.load_samples(a.n)
    ex = Explainer(model, rules=a.rules)
    target = y if a.target == "label" else None
    e = ex(x, target=target, contrastive=not a.no_contrastive)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pred = e.logits.argmax(1)
    titles = [f"{zoo.CLASSES[int(t)]} (pred {zoo.CLASSES[int(p)]})" for t, p in zip(y, pred)]
    png = save_grid(out / "heatmap.png", zoo.unnormalise(x), e.relevance, titles=titles, scale=a.scale)
    rep = e.conservation()
    (out / "conservation.txt").write_text(rep.table(a.tol) + "\n")
    (out / "conservation.csv").write_text(rep.to_csv())
    acc = float((pred == y).float().mean())
    print(f"explained {len(y)} Fashion-MNIST test images with the bundled {a.model} model "
          f"(accuracy on them {acc:.0%}), preset {a.rules!r}, target: {a.target}")
    print(f"heatmap:      {png}")
    print(f"conservation: {out / 'conservation.txt'} (and .csv); {len(rep)} nodes, worst relative "
          f"error {rep.max_rel_error():.2e}, {len(rep.leaks(a.tol))} leaking beyond {a.tol:g}")
    return 0


def cmd_debug(a: argparse.Namespace) -> int:
    model, x, _ = _load_model(a.model, a.size)
    if x is None:
        from . import zoo
        x, _ = zoo.load_samples(a.n)
    if a.double:
        model, x = model.double(), x.double()
    e = Explainer(model, rules=a.rules)(x, contrastive=not a.no_contrastive)
    rep = e.conservation()
    print(rep.table(a.tol, sample=a.sample))
    leaks = rep.leaks(a.tol)
    if leaks:
        print("\nleaking nodes: " + ", ".join(f"{r.name} ({r.rule}, {r.worst(rep.masses):.1e})" for r in leaks))
    return 1 if (leaks and a.strict) else 0


def cmd_coverage(a: argparse.Namespace) -> int:
    model, _, _ = _load_model(a.model, 32)
    rows = Explainer(model, rules=a.rules).coverage()
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    for name, op, rule in rows:
        print(f"{name:<{w0}}  {op:<{w1}}  {rule}")
    missing = [r for r in rows if r[2] == "MISSING"]
    print(f"\n{len(rows)} ops, {len(missing)} without a rule in preset {a.rules!r}")
    return 1 if missing else 0


def cmd_presets(a: argparse.Namespace) -> int:
    for name in composite_names():
        print(f"{name:<20} {get_composite(name).description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lrpgraph", description="Layer-wise relevance propagation for "
                                "torch.fx-traceable PyTorch models (absLRP and classic LRP).")
    sub = p.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("explain", help="explain bundled images with a bundled trained model; write the "
                                       "heatmap PNG and the conservation report")
    e.add_argument("--model", default="vgg", choices=ZOO)
    e.add_argument("--rules", default="abslrp", choices=composite_names())
    e.add_argument("--n", type=int, default=8, help="number of bundled test images")
    e.add_argument("--target", default="label", choices=("label", "predicted"))
    e.add_argument("--no-contrastive", action="store_true", help="explain the target alone")
    e.add_argument("--out", default="out", help="output folder")
    e.add_argument("--scale", type=int, default=4, help="upscaling of the 32x32 images in the PNG")
    e.add_argument("--tol", type=float, default=1e-5, help="relative error marked as a leak")
    e.set_defaults(fn=cmd_explain)

    d = sub.add_parser("debug", help="print the per-node conservation table and mark leaking nodes")
    d.add_argument("--model", default="vgg", help="vgg | resnet | vit | timm:NAME (random weights)")
    d.add_argument("--rules", default="abslrp", choices=composite_names())
    d.add_argument("--n", type=int, default=2)
    d.add_argument("--size", type=int, default=64, help="input size for timm models")
    d.add_argument("--sample", type=int, default=0, help="which sample's values to show")
    d.add_argument("--tol", type=float, default=1e-5)
    d.add_argument("--double", action="store_true", help="run in float64")
    d.add_argument("--no-contrastive", action="store_true")
    d.add_argument("--strict", action="store_true", help="exit with status 1 when a node leaks")
    d.set_defaults(fn=cmd_debug)

    c = sub.add_parser("coverage", help="list the rule every op gets (MISSING where none)")
    c.add_argument("--model", default="vgg")
    c.add_argument("--rules", default="abslrp", choices=composite_names())
    c.set_defaults(fn=cmd_coverage)

    s = sub.add_parser("presets", help="list the rule presets")
    s.set_defaults(fn=cmd_presets)

    v = sub.add_parser("evaluate", help="GAE / MoRF / LeRF / ABPC comparison (see lrpgraph evaluate -h)",
                       add_help=False)
    v.set_defaults(fn=None)
    sub.add_parser("dataset", help="explain a data set into resumable safetensors shards (torchrun "
                   "for several processes; see lrpgraph dataset -h)", add_help=False)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "evaluate":
        from .evaluate.cli import main as evaluate_main
        return evaluate_main(argv[1:])
    if argv and argv[0] == "dataset":
        from .dataset_cli import main as dataset_main
        return dataset_main(argv[1:])
    a = build_parser().parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    raise SystemExit(main())
