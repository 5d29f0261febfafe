"""``lrpgraph evaluate``: run metrics x methods x models on bundled images and write a Markdown
table, a CSV and a plot.

Example::

    lrpgraph evaluate --models vgg resnet vit --methods all --metrics gae abpc --n 256 --out out/evaluate

Models come from ``lrpgraph.zoo.load(name)`` and images from ``lrpgraph.zoo.load_samples(n)``.
Every score is reported as its mean with a percentile-bootstrap confidence interval over mosaics
(GAE) or images (ABPC, SRG); with ``--seeds`` GAE is run once per seed and averaged. A method that fails on a model (e.g. a preset without rules for one of its ops) is reported as n/a
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
from .perturbation import ABPC, SRG
from .stats import mean_over_seeds, summarize

GAE_COLS = ["gae", "gae_median", "local_consistency", "faithfulness", "robustness", "contrastiveness"]
ABPC_COLS = ["abpc", "morf_auc", "lerf_auc"]
SRG_COLS = ["srg", "srg_morf_auc", "srg_lerf_auc"]
CI_COLS = ["gae", "abpc", "srg"]                 # shown with their interval in the Markdown table
SHORT = {"gae": "GAE", "gae_median": "GAE med", "local_consistency": "LC", "faithfulness": "F", "robustness": "Rb",
         "contrastiveness": "C", "abpc": "ABPC", "morf_auc": "MoRF AUC", "lerf_auc": "LeRF AUC",
         "gae_s": "GAE s", "abpc_s": "ABPC s", "srg": "SRG", "srg_morf_auc": "SRG MoRF AUC",
         "srg_lerf_auc": "SRG LeRF AUC", "srg_s": "SRG s", "gae_seeds": "GAE per seed"}


def build_parser() -> argparse.ArgumentParser:
    from ..cliargs import Parser, device, positive_int

    p = Parser(prog="lrpgraph evaluate", description=" ".join(__doc__.split("\n\n")[0].replace("``", "").split()),
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vgg", "resnet", "vit"], help="bundled trained models")
    p.add_argument("--methods", nargs="+", default=["all"],
                   help=f"attribution methods, or 'all' (= {' '.join(method_names())}), "
                        f"'presets', 'baselines'; aliases: {', '.join(sorted(ALIASES))}")
    p.add_argument("--metrics", nargs="+", default=["gae", "abpc"], choices=["gae", "abpc", "srg"], help="metrics to compute")
    p.add_argument("--n", type=positive_int, default=256,
                   help="number of bundled images, 4..512 (GAE: rounded down to a multiple of 4)")
    p.add_argument("--out", default=os.path.join("out", "evaluate"), help="output folder (created)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per chunk (multiple of 4)")
    p.add_argument("--seed", type=int, default=0, help="seeds GAE's positive sampling, SmoothGrad and random")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="GAE seeds to average over (default: --seed only); each draws other positives")
    p.add_argument("--ci-level", type=float, default=0.95, help="confidence level of the bootstrap intervals")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples per interval")
    p.add_argument("--gae-steps", type=int, default=10, help="GAE masking steps T")
    p.add_argument("--abpc-unit", default="pixel", choices=["element", "pixel", "patch"],
                   help="what ABPC perturbs at a time")
    p.add_argument("--abpc-patch", type=positive_int, default=4, help="patch size for --abpc-unit patch")
    p.add_argument("--abpc-steps", type=positive_int, default=10, help="ABPC perturbation steps (0%% point included)")
    p.add_argument("--abpc-baseline", default="0", help="a number, 'mean' or 'black'")
    p.add_argument("--abpc-score", default="logit", choices=["logit", "probability"],
                   help="the model score that the ABPC curves follow")
    p.add_argument("--srg-patch", type=int, default=4,
                   help="SRG patch size (4: an 8x8 grid on the 32x32 bundled images)")
    p.add_argument("--srg-steps", type=int, default=100, help="SRG perturbation steps (capped at the patch count)")
    p.add_argument("--srg-baseline", default="dataset-mean",
                   help="SRG fill: 'dataset-mean' (per-channel mean over the --n images) or a number")
    p.add_argument("--ig-steps", type=positive_int, default=16,
                   help="integrated gradients: interpolation steps (small: GAE explains 5 inputs per image)")
    p.add_argument("--sg-n", type=positive_int, default=8, help="SmoothGrad: noisy samples (small, as --ig-steps)")
    p.add_argument("--device", default=None, type=device, help="torch device (default cuda if available, else cpu)")
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


def _number(v: str):
    """A CLI value as a float when it is one, else the string."""
    try:
        return float(v)
    except ValueError:
        return v


def _put(row: Dict[str, object], summary) -> None:
    """Means and interval bounds (``<score>_lo``, ``<score>_hi``) into a table row."""
    for k, iv in summary.items():
        row[k], row[f"{k}_lo"], row[f"{k}_hi"] = iv.mean, iv.low, iv.high


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
        plans, plan_s, xg, yg = {}, 0.0, x, y
        seeds = args.seeds or [args.seed]
        if "gae" in args.metrics:
            n4 = len(x) - len(x) % 4
            xg, yg = x[:n4], y[:n4]
            gae = GAE(num_masking_steps=args.gae_steps, seed=args.seed, batch_size=args.batch_size,
                      progress=not args.quiet)
            t0 = time.perf_counter()
            for sd in seeds:                      # one plan (positives, trajectories) per seed
                gae.seed = sd
                plans[sd] = gae.prepare(model, xg, yg)
            plan_s = time.perf_counter() - t0
        curves = {}
        if "abpc" in args.metrics:
            curves["abpc"] = ABPC(unit=args.abpc_unit, patch_size=args.abpc_patch, baseline=_number(args.abpc_baseline),
                                  steps=args.abpc_steps, score=args.abpc_score, batch_size=max(256, args.batch_size),
                                  progress=not args.quiet)
        if "srg" in args.metrics:
            curves["srg"] = SRG(patch_size=args.srg_patch, steps=args.srg_steps, baseline=_number(args.srg_baseline),
                                batch_size=max(256, args.batch_size), progress=not args.quiet)
        ci = dict(level=args.ci_level, n_boot=args.n_boot, seed=0)
        for meth in methods:
            row: Dict[str, object] = {"model": mname, "method": meth, "accuracy": acc, "n": len(x),
                                      "gae_trajectories_s": plan_s, "seeds": " ".join(map(str, seeds)), "note": ""}
            store = samples.setdefault(mname, {}).setdefault(meth, {})
            if plans:
                t0 = time.perf_counter()
                try:
                    runs = [gae.evaluate(model, xg, yg, {meth: _method(meth, args)}, plan=pl)[meth]
                            for pl in plans.values()]
                    avg = mean_over_seeds(runs)       # per mosaic, averaged over the seeds
                    _put(row, summarize(avg, **ci))
                    row["gae_median"] = float(avg["gae"].median())
                    row["gae_seeds"] = " / ".join(f"{float(r.gae.mean()):.3f}" for r in runs)
                    store.update({k: v.cpu() for k, v in avg.items()})
                    if len(runs) > 1:
                        store["gae_per_seed"] = torch.stack([r.gae for r in runs]).cpu()
                except Exception as exc:  # report and go on: one preset may lack a rule
                    row["note"] = _reason(exc)
                row["gae_s"] = time.perf_counter() - t0
            for key, metric in curves.items():
                if row["note"]:
                    break
                t0 = time.perf_counter()
                try:
                    r = metric(model, x, pred, explain=_method(meth, args))
                    row.update(r.aggregate())
                    _put(row, summarize(r, **ci))
                    store[key] = getattr(r, key).cpu()
                except Exception as exc:
                    row["note"] = _reason(exc)
                row[f"{key}_s"] = time.perf_counter() - t0
            status = row["note"] or " ".join(f"{SHORT[k]}={row[k]:.3f}" for k in CI_COLS if k in row)
            print(f"[{mname}] {meth}: {status}", file=sys.stderr)
            rows.append(row)
    return rows


def _fmt(v) -> str:
    if v is None or v == "":
        return "n/a"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def _cell(r: Dict[str, object], c: str) -> str:
    """``mean [low, high]`` for the scores shown with their interval, else the mean."""
    s = _fmt(r.get(c))
    if c in CI_COLS and f"{c}_lo" in r:
        s += f" [{r[f'{c}_lo']:.3f}, {r[f'{c}_hi']:.3f}]"
    return s


def _metric_cols(metrics: Sequence[str]) -> List[str]:
    return ((GAE_COLS if "gae" in metrics else []) + (ABPC_COLS if "abpc" in metrics else [])
            + (SRG_COLS if "srg" in metrics else []))


def write_markdown(rows, args, path: str, argv: Sequence[str], total_s: float) -> None:
    cols = _metric_cols(args.metrics)
    if "gae" in args.metrics and len(args.seeds or []) > 1:
        cols.insert(1, "gae_seeds")
    tcols = [c for c in ("gae_s", "abpc_s", "srg_s") if any(c in r for r in rows)]
    level = f"{100 * args.ci_level:g} %"
    lines = ["# lrpgraph evaluate", "",
             f"Command: `lrpgraph evaluate {' '.join(shlex.quote(a) for a in argv)}`  ",
             f"N = {rows[0]['n'] if rows else args.n} images, GAE seeds {' '.join(map(str, args.seeds or [args.seed]))}, "
             f"GAE T = {args.gae_steps}, ABPC: unit {args.abpc_unit}, {args.abpc_steps} steps, baseline "
             f"{args.abpc_baseline}, score {args.abpc_score}; SRG: patch {args.srg_patch}, {args.srg_steps} steps, "
             f"fill {args.srg_baseline}, logit; target = predicted class. Intervals: {level} percentile "
             f"bootstrap ({args.n_boot} resamples) over mosaics (GAE, seed-averaged) or images. "
             f"Total time {total_s:.1f} s.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mr = [r for r in rows if r["model"] == model]
        extra = f", GAE trajectories {mr[0]['gae_trajectories_s']:.1f} s" if "gae" in args.metrics else ""
        lines += [f"## {model} (accuracy {mr[0]['accuracy']:.3f}{extra})", ""]
        best = {}
        for c in cols:
            vals = [r[c] for r in mr if c in r and isinstance(r[c], float)]
            if len(set(vals)) > 1:          # no bold when every method ties
                best[c] = min(vals) if c.endswith("morf_auc") else max(vals)
        hdr = ["method"] + [SHORT[c] for c in cols] + [SHORT[c] for c in tcols] + ["note"]
        lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        for r in mr:
            cells = [r["method"]]
            for c in cols:
                s = _cell(r, c)
                cells.append(f"**{s}**" if c in r and best.get(c) is not None and r[c] == best[c] else s)
            cells += [_fmt(r.get(c)) if c in r else "" for c in tcols]
            cells.append(str(r["note"]).replace("|", "/"))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"GAE (mean over mosaics [{level} interval]), GAE med (median), LC, F, Rb, C, ABPC, SRG, "
                 "LeRF AUCs: higher is better; MoRF AUCs: lower is better; best mean in bold (a method whose "
                 "interval overlaps the best one's is not shown to be worse). Per-sample scores and all "
                 "interval bounds: evaluation_samples.pt, evaluation.csv.")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_csv(rows, path: str) -> None:
    scores = GAE_COLS + ABPC_COLS + SRG_COLS
    keys = (["model", "method", "n", "accuracy", "seeds"] + [k for c in scores for k in (c, f"{c}_lo", f"{c}_hi")]
            + ["gae_seeds", "gae_s", "abpc_s", "srg_s", "gae_trajectories_s", "note"])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in keys
                        if k in r or not k.endswith(("_lo", "_hi"))})


def write_plot(rows, args, path: str) -> Optional[str]:
    """Grouped bars with their confidence intervals (one panel per metric, one group per model).
    Returns a note if skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    metrics = [m for m in CI_COLS if m in args.metrics]
    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 + 0.5 * len(methods) * len(models) / 2, 4), squeeze=False)
    w = 0.8 / max(1, len(methods))
    cmap = plt.get_cmap("tab20")
    for ax, metric in zip(axes[0], metrics):
        for j, meth in enumerate(methods):
            rs = [next((r for r in rows if r["model"] == m and r["method"] == meth), {}) for m in models]
            vals = [r.get(metric, float("nan")) for r in rs]
            err = [[v - r.get(f"{metric}_lo", v) for v, r in zip(vals, rs)],
                   [r.get(f"{metric}_hi", v) - v for v, r in zip(vals, rs)]]
            ax.bar([i + j * w for i in range(len(models))], vals, width=w, label=meth, color=cmap(j % 20),
                   yerr=err, error_kw={"elinewidth": 0.6, "capsize": 1})
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
    from ..cliargs import fail, writable_dir

    parser = build_parser()
    args = parser.parse_args(argv)
    known = getattr(_load_zoo(), "MODELS", None)
    unknown = [m for m in args.models if known is not None and m not in known]
    if unknown:
        parser.error(f"--models: unknown model(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    if args.gae_steps < 2:
        parser.error(f"--gae-steps must be at least 2, got {args.gae_steps}")
    if args.n > 512:
        parser.error(f"--n {args.n}: only 512 test images are bundled")
    if args.abpc_baseline not in ("mean", "black"):
        try:
            float(args.abpc_baseline)
        except ValueError:
            parser.error(f"--abpc-baseline {args.abpc_baseline!r}: give a number, 'mean' or 'black'")
    if args.batch_size < 4 or args.batch_size % 4:
        print("lrpgraph evaluate: --batch-size must be a positive multiple of 4", file=sys.stderr)
        return 2
    bad = [f"{name} {v}" for name, v, ok in [("--ci-level", args.ci_level, 0 < args.ci_level < 1),
                                              ("--n-boot", args.n_boot, args.n_boot >= 1),
                                              ("--srg-patch", args.srg_patch, args.srg_patch >= 1),
                                              ("--srg-steps", args.srg_steps, args.srg_steps >= 1)] if not ok]
    if bad:
        print(f"lrpgraph evaluate: {', '.join(bad)} out of range (--ci-level in (0, 1), the others >= 1)",
              file=sys.stderr)
        return 2
    if args.n < 4:
        print("lrpgraph evaluate: --n must be at least 4 (one GAE mosaic)", file=sys.stderr)
        return 2
    writable_dir("lrpgraph evaluate", args.out)  # before the run, not after it
    try:
        _expand_methods(args.methods)
    except SystemExit as exc:
        fail("lrpgraph evaluate", str(exc).replace("lrpgraph evaluate: ", ""))
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
