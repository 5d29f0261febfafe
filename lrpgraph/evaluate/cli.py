"""``lrpgraph evaluate``: run metrics x methods x models on bundled images and write a Markdown
table, a CSV and a plot.

Example::

    lrpgraph evaluate --models vgg resnet vit --methods all --metrics gae abpc --n 256 --out results/

Models come from ``lrpgraph.zoo.load(name)`` and images from ``lrpgraph.zoo.load_samples(n)``. A
method that fails on a model (e.g. a preset without rules for one of its ops) is reported as n/a
with the reason; the run goes on.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import shlex
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .gae import GAE
from .methods import ALIASES, get_method, method_names
from .perturbation import ABPC

GAE_COLS = ["gae", "gae_median", "local_consistency", "faithfulness", "robustness", "contrastiveness"]
ABPC_COLS = ["abpc", "morf_auc", "lerf_auc"]
SHORT = {"gae": "GAE", "gae_median": "GAE med", "local_consistency": "LC", "faithfulness": "F", "robustness": "Rb",
         "contrastiveness": "C", "abpc": "ABPC", "morf_auc": "MoRF AUC", "lerf_auc": "LeRF AUC",
         "gae_s": "GAE s", "abpc_s": "ABPC s"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lrpgraph evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vgg", "resnet", "vit"], help="zoo model names")
    p.add_argument("--methods", nargs="+", default=["all"],
                   help=f"attribution methods, or 'all' (= {' '.join(method_names())}), "
                        f"'presets', 'baselines'; aliases: {', '.join(sorted(ALIASES))}")
    p.add_argument("--metrics", nargs="+", default=["gae", "abpc"], choices=["gae", "abpc"])
    p.add_argument("--n", type=int, default=256, help="number of bundled images (GAE: rounded down to a multiple of 4)")
    p.add_argument("--out", default="results", help="output folder")
    p.add_argument("--batch-size", type=int, default=32, help="images per chunk (multiple of 4)")
    p.add_argument("--seed", type=int, default=0, help="seeds GAE's positive sampling, SmoothGrad and random")
    p.add_argument("--gae-steps", type=int, default=10, help="GAE masking steps T")
    p.add_argument("--abpc-unit", default="pixel", choices=["element", "pixel", "patch"])
    p.add_argument("--abpc-patch", type=int, default=4, help="patch size for --abpc-unit patch")
    p.add_argument("--abpc-steps", type=int, default=10, help="ABPC perturbation steps (0%% point included)")
    p.add_argument("--abpc-baseline", default="0", help="a number, 'mean' or 'black'")
    p.add_argument("--abpc-score", default="logit", choices=["logit", "probability"])
    p.add_argument("--ig-steps", type=int, default=16,
                   help="integrated gradients: interpolation steps (small: GAE explains 5 inputs per image)")
    p.add_argument("--sg-n", type=int, default=8, help="SmoothGrad: noisy samples (small, as --ig-steps)")
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--attributions", default=None, metavar="DIR",
                   help="score the maps stored by `lrpgraph dataset` in DIR (bundled data, zoo model, --targets "
                        "predicted) instead of computing maps; --models and --methods are ignored, GAE is skipped")
    return p


def _expand_methods(names: Sequence[str]) -> List[str]:
    presets = [m for m in method_names() if get_method(m).__class__.__name__ == "LRPMethod"]
    baselines = [m for m in method_names() if m not in presets]
    out: List[str] = []
    for n in names:
        group = {"all": presets + baselines, "presets": presets, "baselines": baselines}.get(n)
        for m in group or [ALIASES.get(n, n)]:
            if m not in out:
                out.append(m)
    unknown = [m for m in out if m not in method_names()]
    if unknown:
        raise SystemExit(f"lrpgraph evaluate: unknown method(s) {unknown}; choose from {method_names()}")
    return out


def _method(name: str, args) -> object:
    if getattr(args, "attributions", None):   # stored maps, looked up by sample
        from ..dataset_maps import precomputed
        return precomputed(args.attributions)
    kw = {}
    if name == "integrated-gradients":
        kw = {"steps": args.ig_steps}
    elif name == "smoothgrad":
        kw = {"n": args.sg_n, "seed": args.seed}
    elif name == "random":
        kw = {"seed": args.seed}
    return get_method(name, **kw)


def _reason(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    msg = f"{type(exc).__name__}: {msg}"
    return msg if len(msg) <= 160 else msg[:157] + "..."


def _load_zoo():
    try:
        from lrpgraph import zoo  # type: ignore
    except ImportError as exc:
        raise SystemExit(f"lrpgraph evaluate: lrpgraph.zoo is not available ({exc}); the trained "
                         "models and bundled images come from it")
    return zoo


def _samples(zoo, n: int, device) -> Tuple[Tensor, Tensor]:
    s = zoo.load_samples(n)
    if isinstance(s, dict):
        x, y = s.get("x", s.get("images")), s.get("y", s.get("labels"))
    else:
        x, y = s[0], s[1]
    return x[:n].to(device).float(), torch.as_tensor(y[:n]).to(device).long()


def run(args, samples: Optional[dict] = None) -> List[Dict[str, object]]:
    """Evaluate; returns one row per (model, method). Per-sample scores go into ``samples``
    (``{model: {method: {score: tensor}}}``) when a dict is given."""
    samples = {} if samples is None else samples
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    zoo = _load_zoo()
    methods = _expand_methods(args.methods)
    x, y = _samples(zoo, args.n, device)
    if args.attributions:   # stored maps: one model, one method, looked up by sample
        from ..dataset import DatasetError, read_manifest
        try:
            cfg = read_manifest(args.attributions)["config"]
        except DatasetError as exc:
            raise SystemExit(f"lrpgraph evaluate: --attributions: {exc}")
        if cfg["model"] not in ("vgg", "resnet", "vit"):
            raise SystemExit(f"lrpgraph evaluate: --attributions: the maps are of model {cfg['model']!r}; "
                             "evaluate scores the bundled models (vgg, resnet, vit)")
        if "gae" in args.metrics:   # GAE explains mosaics built from the images: not stored
            if args.metrics == ["gae"]:
                raise SystemExit("lrpgraph evaluate: --attributions: GAE explains mosaics built from the "
                                 "images, which a dataset run does not hold; use --metrics abpc")
            args.metrics = [m for m in args.metrics if m != "gae"]
        args.models, methods = [cfg["model"]], [f"{cfg['preset']} (precomputed)"]
    rows: List[Dict[str, object]] = []
    for mname in args.models:
        model = zoo.load(mname)
        model = model.eval().to(device)
        with torch.no_grad():
            pred = torch.cat([model(x[i:i + args.batch_size]) for i in range(0, len(x), args.batch_size)]).argmax(1)
        acc = float((pred == y).float().mean())
        print(f"[{mname}] {len(x)} images, accuracy {acc:.3f}; methods: {', '.join(methods)}", file=sys.stderr)
        plan, plan_s, xg, yg = None, 0.0, x, y
        if "gae" in args.metrics:
            n4 = len(x) - len(x) % 4
            xg, yg = x[:n4], y[:n4]
            gae = GAE(num_masking_steps=args.gae_steps, seed=args.seed, batch_size=args.batch_size,
                      progress=not args.quiet)
            t0 = time.perf_counter()
            plan = gae.prepare(model, xg, yg)
            plan_s = time.perf_counter() - t0
        if "abpc" in args.metrics:
            base = args.abpc_baseline
            try:
                base = float(base)
            except ValueError:
                pass
            abpc = ABPC(unit=args.abpc_unit, patch_size=args.abpc_patch, baseline=base,
                        steps=args.abpc_steps, score=args.abpc_score, batch_size=max(256, args.batch_size),
                        progress=not args.quiet)
        for meth in methods:
            row: Dict[str, object] = {"model": mname, "method": meth, "accuracy": acc, "n": len(x),
                                      "gae_trajectories_s": plan_s, "note": ""}
            if plan is not None:
                t0 = time.perf_counter()
                try:
                    r = gae.evaluate(model, xg, yg, {meth: _method(meth, args)}, plan=plan)[meth]
                    row.update(r.aggregate())
                    row["gae_median"] = float(r.gae.median())
                    samples.setdefault(mname, {})[meth] = {k: v.cpu() for k, v in r.per_sample().items()}
                except Exception as exc:  # report and go on: one preset may lack a rule
                    row["note"] = _reason(exc)
                row["gae_s"] = time.perf_counter() - t0
            if "abpc" in args.metrics and not (row["note"] and plan is not None):
                t0 = time.perf_counter()
                try:
                    r = abpc(model, x, pred, explain=_method(meth, args))
                    row.update(r.aggregate())
                    samples.setdefault(mname, {}).setdefault(meth, {})["abpc"] = r.abpc.cpu()
                except Exception as exc:
                    row["note"] = _reason(exc)
                row["abpc_s"] = time.perf_counter() - t0
            status = row["note"] or " ".join(f"{SHORT[k]}={row[k]:.3f}" for k in GAE_COLS[:1] + ABPC_COLS[:1] if k in row)
            print(f"[{mname}] {meth}: {status}", file=sys.stderr)
            rows.append(row)
    return rows


def _fmt(v) -> str:
    if v is None or v == "":
        return "n/a"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def write_markdown(rows, args, path: str, argv: Sequence[str], total_s: float) -> None:
    cols = [c for c in (GAE_COLS if "gae" in args.metrics else []) + (ABPC_COLS if "abpc" in args.metrics else [])]
    tcols = [c for c in ("gae_s", "abpc_s") if any(c in r for r in rows)]
    lines = ["# lrpgraph evaluate", "",
             f"Command: `lrpgraph evaluate {' '.join(shlex.quote(a) for a in argv)}`  ",
             f"N = {rows[0]['n'] if rows else args.n} images, seed {args.seed}, GAE T = {args.gae_steps}, "
             f"ABPC: unit {args.abpc_unit}, {args.abpc_steps} steps, baseline {args.abpc_baseline}, "
             f"score {args.abpc_score}, target = predicted class. Total time {total_s:.1f} s.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mr = [r for r in rows if r["model"] == model]
        extra = f", GAE trajectories {mr[0]['gae_trajectories_s']:.1f} s" if "gae" in args.metrics else ""
        lines += [f"## {model} (accuracy {mr[0]['accuracy']:.3f}{extra})", ""]
        best = {}
        for c in cols:
            vals = [r[c] for r in mr if c in r]
            if len(set(vals)) > 1:          # no bold when every method ties
                best[c] = min(vals) if c == "morf_auc" else max(vals)
        hdr = ["method"] + [SHORT[c] for c in cols] + [SHORT[c] for c in tcols] + ["note"]
        lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        for r in mr:
            cells = [r["method"]]
            for c in cols:
                s = _fmt(r.get(c))
                cells.append(f"**{s}**" if c in r and best.get(c) is not None and r[c] == best[c] else s)
            cells += [_fmt(r.get(c)) if c in r else "" for c in tcols]
            cells.append(str(r["note"]).replace("|", "/"))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("GAE (mean over mosaics), GAE med (median), LC, F, Rb, C, ABPC, LeRF AUC: higher is better; "
                 "MoRF AUC: lower is better; best in bold. Per-sample scores: evaluation_samples.pt.")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_csv(rows, path: str) -> None:
    keys = ["model", "method", "n", "accuracy"] + GAE_COLS + ABPC_COLS + ["gae_s", "abpc_s", "gae_trajectories_s", "note"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in keys})


def write_plot(rows, args, path: str) -> Optional[str]:
    """Grouped bars (one panel per metric, one group per model). Returns a note if skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    metrics = [m for m in ("gae", "abpc") if m in args.metrics]
    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 + 0.5 * len(methods) * len(models) / 2, 4), squeeze=False)
    w = 0.8 / max(1, len(methods))
    cmap = plt.get_cmap("tab20")
    for ax, metric in zip(axes[0], metrics):
        for j, meth in enumerate(methods):
            vals = [next((r.get(metric, float("nan")) for r in rows if r["model"] == m and r["method"] == meth), float("nan"))
                    for m in models]
            ax.bar([i + j * w for i in range(len(models))], vals, width=w, label=meth, color=cmap(j % 20))
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(models))], models)
        ax.set_title(SHORT[metric] + " (higher is better)")
    axes[0][-1].legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``lrpgraph evaluate`` (``argv`` without the program name; a leading
    ``"evaluate"`` is accepted). Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["evaluate"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    if args.batch_size < 4 or args.batch_size % 4:
        print("lrpgraph evaluate: --batch-size must be a positive multiple of 4", file=sys.stderr)
        return 2
    if args.n < 4:
        print("lrpgraph evaluate: --n must be at least 4 (one GAE mosaic)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        samples: dict = {}
        rows = run(args, samples)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    total = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    md, cs, png = (os.path.join(args.out, f"evaluation.{e}") for e in ("md", "csv", "png"))
    write_markdown(rows, args, md, argv, total)
    write_csv(rows, cs)
    torch.save(samples, os.path.join(args.out, "evaluation_samples.pt"))
    note = None if args.no_plot else write_plot(rows, args, png)
    print(f"wrote {md}, {cs}" + ("" if args.no_plot or note else f", {png}") + f" in {total:.1f} s")
    if note:
        print(note)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
