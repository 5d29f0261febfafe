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

from . import Explainer, composite_names, debugger, get_composite
from .cliargs import Parser, fail, nonneg_float, one_line, positive_int, writable_dir

ZOO = ("vgg", "resnet", "vit")
BUNDLED = 512  # bundled Fashion-MNIST test images


def _progress(total: int, desc: str):
    """A tqdm bar on stderr that shows only when the work takes more than a second (none
    without tqdm, which the ``image`` extra installs)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, delay=1.0, leave=False, file=sys.stderr)


def _check_model(spec: str) -> None:
    """Fail with one line on an unknown model name, before any work."""
    if spec in ZOO:
        return
    if spec.startswith("timm:") and spec[5:]:
        timm = _timm(spec)
        if not timm.is_model(spec[5:]):
            fail("lrpgraph", f"--model {spec}: timm has no model {spec[5:]!r} (see timm.list_models())")
        return
    fail("lrpgraph", f"--model {spec}: unknown model; use one of {', '.join(ZOO)} or timm:NAME")


def _timm(spec: str):
    try:
        from .timmzoo import import_timm
        return import_timm()
    except Exception as exc:  # ImportError, or another torchvision load error
        fail("lrpgraph", f"--model {spec} needs timm (pip install -c constraints.txt -e '.[zoo]'): {exc}")


def _load_model(spec: str, size: int, n: int = 2) -> Tuple[nn.Module, Optional[Tensor], Optional[Tensor]]:
    """A bundled model (``vgg``, ``resnet``, ``vit``) with bundled images, or ``timm:NAME``
    (random weights, ``n`` random inputs of ``size``; needs the ``zoo`` extra)."""
    if spec in ZOO:
        from . import zoo
        return zoo.load(spec), None, None
    if spec.startswith("timm:"):
        timm = _timm(spec)
        torch.manual_seed(0)
        model = timm.create_model(spec[5:], pretrained=False, num_classes=10).eval()
        return model, torch.randn(n, 3, size, size), None
    raise SystemExit(f"unknown model {spec!r}: use one of {', '.join(ZOO)} or timm:NAME")


def cmd_explain(a: argparse.Namespace) -> int:
    from . import zoo
    from .image import save_grid

    out = writable_dir("lrpgraph explain", a.out)  # before the work, not after it
    model = zoo.load(a.model)
    x, y = zoo.load_samples(a.n)
    ex = Explainer(model, rules=a.rules)
    target = y if a.target == "label" else None
    bar, rel, logits, first = _progress(len(y), "explaining"), [], [], None
    for i in range(0, len(y), 32):  # chunks, so the bar moves and memory stays flat
        e = ex(x[i:i + 32], target=None if target is None else target[i:i + 32], contrastive=not a.no_contrastive)
        rel.append(e.relevance)
        logits.append(e.logits)
        first = e if first is None else first
        if bar is not None:
            bar.update(len(e.logits))
    if bar is not None:
        bar.close()
    relevance, pred = torch.cat(rel), torch.cat(logits).argmax(1)
    titles = [f"{zoo.CLASSES[int(t)]} (pred {zoo.CLASSES[int(p)]})" for t, p in zip(y, pred)]
    png = save_grid(out / "heatmap.png", zoo.unnormalise(x), relevance, titles=titles, scale=a.scale,
                    title=f"{a.model}, {a.rules}: input | relevance")
    rep = first.conservation()  # the first chunk's report (the table shows its first sample)
    (out / "conservation.txt").write_text(
        f"Conservation report of bundled test image 0 ({zoo.CLASSES[int(y[0])]}), model {a.model}, preset "
        f"{a.rules!r}: values of that sample, first relevance pass; rel.err is the worst over the first "
        f"{len(first.logits)} image(s) and all passes (each of those images and passes: conservation.csv).\n\n"
        + rep.table(a.tol) + "\n")
    (out / "conservation.csv").write_text(rep.to_csv())
    acc = float((pred == y).float().mean())
    print(f"explained {len(y)} Fashion-MNIST test images with the bundled {a.model} model "
          f"(accuracy on them {acc:.0%}), preset {a.rules!r}, target: {a.target}")
    print(f"heatmap:      {png}")
    print(f"conservation: {out / 'conservation.txt'} (and .csv); {len(rep)} nodes, worst relative "
          f"error {rep.max_rel_error():.2e}, {len(rep.leaks(a.tol))} leaking beyond {a.tol:g}")
    return 0


def cmd_debug(a: argparse.Namespace) -> int:
    _check_model(a.model)
    if a.sample >= a.n:
        fail("lrpgraph debug", f"--sample {a.sample} is out of range for --n {a.n} sample(s) (0..{a.n - 1})")
    bar = _progress(3, "debug")
    model, x, _ = _load_model(a.model, a.size, a.n)
    if x is None:
        from . import zoo
        x, _ = zoo.load_samples(a.n)
    if a.double:
        model, x = model.double(), x.double()
    _step(bar)
    ex = Explainer(model, rules=a.rules, zero_bias=a.zero_bias)
    _step(bar)
    e = ex(x, contrastive=not a.no_contrastive, heads=bool(a.heads))
    _step(bar, close=True)
    rep = e.conservation()
    print(rep.table(a.tol, sample=a.sample))
    leaks = rep.leaks(a.tol)
    if leaks:
        print("\nleaking nodes: " + ", ".join(f"{r.name} ({r.rule}, {r.worst(rep.masses):.1e})" for r in leaks))
    debugger.run(a, e, title=f"{a.model}, preset {a.rules}" + (", zero bias" if a.zero_bias else ""))
    return 1 if (leaks and a.strict) else 0


def _step(bar, close: bool = False) -> None:
    if bar is not None:
        bar.update(1)
        if close:
            bar.close()


def cmd_coverage(a: argparse.Namespace) -> int:
    _check_model(a.model)
    bar = _progress(2, "tracing")
    model, _, _ = _load_model(a.model, 32)
    _step(bar)
    rows = Explainer(model, rules=a.rules).coverage()
    _step(bar, close=True)
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
    p = Parser(prog="lrpgraph", description="Layer-wise relevance propagation for "
               "torch.fx-traceable PyTorch models (absLRP and classic LRP).")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    rules_help = "rule preset (lrpgraph presets lists them)"

    e = sub.add_parser("explain", help="explain bundled images with a bundled trained model; write the "
                                       "heatmap PNG and the conservation report")
    e.add_argument("--model", default="vgg", choices=ZOO, help="bundled trained model (default vgg)")
    e.add_argument("--rules", default="abslrp", choices=composite_names(), metavar="PRESET", help=rules_help)
    e.add_argument("--n", type=positive_int, default=8, help=f"number of bundled test images, 1..{BUNDLED}")
    e.add_argument("--target", default="label", choices=("label", "predicted"),
                   help="explain the true label (default) or the predicted class")
    e.add_argument("--no-contrastive", action="store_true", help="explain the target alone")
    e.add_argument("--out", default="out", help="output folder (created; default out)")
    e.add_argument("--scale", type=positive_int, default=4, help="upscaling of the 32x32 images in the PNG")
    e.add_argument("--tol", type=nonneg_float, default=1e-5, help="relative error marked as a leak")
    e.set_defaults(fn=cmd_explain)

    d = sub.add_parser("debug", help="print the per-node conservation table and mark leaking nodes")
    d.add_argument("--model", default="vgg", help="vgg, resnet, vit or timm:NAME (random weights)")
    d.add_argument("--rules", default="abslrp", choices=composite_names(), metavar="PRESET", help=rules_help)
    d.add_argument("--n", type=positive_int, default=2,
                   help=f"number of samples: bundled test images (1..{BUNDLED}) or random timm inputs")
    d.add_argument("--size", type=positive_int, default=64, help="input size for timm models")
    d.add_argument("--sample", type=int, default=0, help="which sample's values to show (0..n-1)")
    d.add_argument("--tol", type=nonneg_float, default=1e-5, help="relative error marked as a leak")
    d.add_argument("--double", action="store_true", help="run in float64")
    d.add_argument("--no-contrastive", action="store_true", help="explain the predicted class alone")
    d.add_argument("--strict", action="store_true", help="exit with status 1 when a node leaks")
    debugger.add_arguments(d)
    d.set_defaults(fn=cmd_debug)

    c = sub.add_parser("coverage", help="list the rule every op gets (MISSING where none)")
    c.add_argument("--model", default="vgg", help="vgg, resnet, vit or timm:NAME")
    c.add_argument("--rules", default="abslrp", choices=composite_names(), metavar="PRESET", help=rules_help)
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
    if getattr(a, "n", None) is not None and a.n > BUNDLED and not (a.cmd == "debug" and a.model.startswith("timm:")):
        fail(f"lrpgraph {a.cmd}", f"--n {a.n}: only {BUNDLED} test images are bundled")
    if getattr(a, "sample", 0) < 0:
        fail(f"lrpgraph {a.cmd}", f"--sample {a.sample} must be >= 0")
    try:
        return a.fn(a)
    except (ValueError, TypeError, RuntimeError, ImportError, FileNotFoundError) as exc:
        # lrpgraph's errors (NoRuleError, RuleError, LRPTraceError, non-finite relevance...) and
        # the model's: one line, the cause and the fix, never a traceback
        print(f"lrpgraph {a.cmd}: error: {type(exc).__name__}: {one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
