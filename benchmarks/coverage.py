"""Coverage sweep: one representative per timm model family, explained with each preset.

For every family (a module of ``timm.models``) the smallest variant by parameter count is built
with random weights in float64 and explained at batch 2, 64x64 where the model accepts it (else its
default input size; twice the size, 56 and 112 are tried first). Each model runs in its own process with a
time limit. Recorded per preset:
traced (by ``torch.fx``, or by the Explainer's fallback tracer where one exists), explained
(finite relevance, no error), and for ``abslrp`` conserved (every node within 1e-5 relative on the
signed total and on the positive and negative masses, by-design rows excluded), the worst error and
the failure with the op or module it names.

Writes ``docs/coverage.md`` (table and headline figures), ``docs/coverage.json`` and
``docs/coverage.csv``::

    OMP_NUM_THREADS=1 python benchmarks/coverage.py                     # the whole zoo (long)
    OMP_NUM_THREADS=1 python benchmarks/coverage.py --families vgg resnet --out /tmp/cov
    OMP_NUM_THREADS=1 python benchmarks/coverage.py --models vgg16 convnext_tiny --jobs 2

``--families`` / ``--models`` run a subset; with ``--out`` the files go elsewhere (the default
``docs/`` is merged with earlier rows, so a subset run updates those rows only).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PRESETS = ("abslrp", "abslrp-renorm", "lrp-epsilon")
#: named models the issue asks about, run beside the family representatives
NAMED = ("vgg16", "efficientnet_b0", "mobilenetv3_small_100", "swin_tiny_patch4_window7_224",
         "convnext_tiny", "regnety_002", "densenet121", "inception_v3", "levit_128s")
TOL = 1e-5
MODELS_CACHE = os.path.join(HERE, "coverage_models.json")


def _timm():
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tv_compat import import_timm
    return import_timm()


# --------------------------------------------------------------------------------------------
# choosing the representatives


def representatives() -> Dict[str, str]:
    """``{family: smallest model}`` (parameters counted on the meta device; cached in a JSON file
    beside this script so that every run measures the same models)."""
    if os.path.exists(MODELS_CACHE):
        with open(MODELS_CACHE) as f:
            return json.load(f)
    import torch
    timm = _timm()
    out = {}
    for fam in timm.list_modules():
        best = None
        for name in timm.list_models(module=fam):
            try:
                with torch.device("meta"):
                    m = timm.create_model(name, pretrained=False)
                n = sum(p.numel() for p in m.parameters())
            except Exception:
                continue
            if best is None or n < best[0]:
                best = (n, name)
        if best is not None:
            out[fam] = best[1]
    with open(MODELS_CACHE, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    return out


def _representatives_cached() -> Dict[str, str]:
    if os.path.exists(MODELS_CACHE):
        with open(MODELS_CACHE) as f:
            return json.load(f)
    return {}


# --------------------------------------------------------------------------------------------
# one model (child process)


def _short_error(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (msg[0] if msg else type(exc).__name__)[:300]


def _names_op(msg: str) -> str:
    """The op or module a failure names: ``node `x` (torch.roll)`` gives ``torch.roll``."""
    m = re.search(r"node `[^`]*` \(([^)]*)\)", msg)
    if m:
        return m.group(1)
    m = re.search(r"no rule for ([\w.]+)", msg)
    return m.group(1) if m else ""


def wake(model) -> int:
    """Give every all-zero weight of ``model`` small seeded random values; the count changed.

    timm initialises some weights to zero (classifier heads of Hiera, gMLP, Sequencer; the last
    norm of a residual branch). A zero weight makes its output 0 for every input, so no relevance
    reaches what lies behind it and the sweep would test nothing there: a model with an unsupported
    op behind a zero head would count as explained. Biases stay as they are."""
    import torch
    g = torch.Generator().manual_seed(0)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and not name.endswith("bias") and p.numel() and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02 + (1.0 if p.dim() == 1 else 0.0))
                n += 1
    return n


def _build(name: str, size: int):
    import torch
    timm = _timm()
    # the requested size, then twice it (Inception needs 75 px), then sizes that patch sizes of 7 and
    # 14 divide (56, 112), before the model's default size (which can be large: 546 px)
    tries = [(kw, s) for s in (size, 2 * size, 56, 112) for kw in ({"img_size": s}, {})]
    last = None
    for kwargs, s in tries:
        try:
            model = timm.create_model(name, pretrained=False, **kwargs).eval().double()
            wake(model)
        except Exception as exc:  # noqa: BLE001 - the model does not take img_size
            last = exc
            continue
        x = torch.randn(2, 3, s, s, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                model(x)
            return model, x
        except Exception as exc:  # noqa: BLE001 - the model does not accept this size
            last = exc
    model = timm.create_model(name, pretrained=False).eval().double()
    wake(model)
    s = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(2, *s, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"the model does not run at {size}px ({last}) nor at {tuple(s)}: {exc}") from exc
    return model, x


def explain_row(model, x, preset: str, **call) -> dict:
    """Explain ``x`` with one preset: traced/explained/conserved, the worst error, the named
    losses, the worst leak or the error and the op it names (``call``: Explainer call arguments)."""
    import torch
    import lrpgraph
    r: dict = {}
    t0 = time.perf_counter()
    try:
        ex = lrpgraph.Explainer(model, rules=preset, output=call.pop("output", None))
        r["tracer"] = str(getattr(ex, "tracer", None) or "fx")
        r["traced"] = True
        e = ex(x, **call)
        rel = e.relevance
        if not bool(torch.isfinite(rel).all()):
            raise FloatingPointError("non-finite input relevance")
        r["explained"] = True
        rep = e.conservation()
        r["worst"] = rep.max_rel_error()
        leaks = rep.leaks(TOL)
        r["conserved"] = not leaks
        losses = rep.losses(TOL)
        if losses:  # a sign stream with no carrier: named, not a leak
            f = rep.noise_floor()
            w = max(losses, key=lambda b: b.lost_share(f))
            r["loss"] = f"{len(losses)} node(s), worst {w.name} ({w.op}): {w.lost_share(f):.1e}"
        if leaks:
            w = max(leaks, key=lambda b: b.worst(rep.masses, rep.noise_floor()))
            r["leak"] = f"{w.name} ({w.op}, {w.rule}): {w.worst(rep.masses, rep.noise_floor()):.2e}"
            r["n_leaks"] = len(leaks)
    except Exception as exc:  # noqa: BLE001
        r.setdefault("traced", False)
        r["explained"] = False
        r["error"] = _short_error(exc)
        r["names"] = _names_op(str(exc))
    r["seconds"] = round(time.perf_counter() - t0, 1)
    return r


def run_one(name: str, size: int, presets) -> dict:
    """Explain one model with each preset; a JSON-able row."""
    import torch
    from lrpgraph.registry import get_composite
    from lrpgraph.trace import trace
    torch.manual_seed(0)
    row: dict = {"model": name}
    try:
        model, x = _build(name, size)
    except Exception as exc:  # noqa: BLE001
        row["error"] = _short_error(exc)
        return row
    row["input"] = "x".join(str(s) for s in x.shape[1:])
    try:
        trace(model, get_composite("abslrp").has_rule)
        row["fx"] = True
    except Exception as exc:  # noqa: BLE001
        row["fx"] = False
        row["fx_error"] = _short_error(exc)
    for p in presets:
        row[p] = explain_row(model, x, p)
    return row


# --------------------------------------------------------------------------------------------
# driver


def _child(name: str, size: int, presets, timeout: float) -> dict:
    return run_worker([os.path.abspath(__file__), "--worker", name, "--size", str(size), "--presets", *presets],
                      timeout, {"model": name})


def run_worker(args: List[str], timeout: float, row: dict) -> dict:
    """Run ``python ARGS`` (a worker printing its row as one JSON line) under a time limit: its row,
    or ``row`` with the error (time limit, or the last line of its stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(row, error=f"time limit ({timeout:.0f} s)")
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(row, error=f"process exited {p.returncode}: {tail[:300]}")


def _pct(n: int, d: int) -> str:
    return f"{n} / {d} ({100 * n / d:.0f}%)" if d else "0 / 0"


def headline(rows: List[dict]) -> List[tuple]:
    fams = [r for r in rows if r.get("family") and r["family"] != "(named)"]
    d = len(fams)
    ok = lambda r, p, k: bool(r.get(p, {}).get(k))  # noqa: E731
    lines = [("traced by torch.fx", sum(bool(r.get("fx")) for r in fams))]
    lines.append(("traced (any tracer)", sum(ok(r, "abslrp", "traced") for r in fams)))
    for p in PRESETS:
        lines.append((f"`{p}` explained", sum(ok(r, p, "explained") for r in fams)))
    lines.append(("`abslrp` explained and conserved (1e-5, every node)",
                  sum(ok(r, "abslrp", "explained") and ok(r, "abslrp", "conserved") for r in fams)))
    return [(k, _pct(v, d)) for k, v in lines]


def _cell(r: dict, p: str) -> str:
    c = r.get(p)
    if not c:
        return "-"
    if not c.get("explained"):
        return "error"
    if p == "abslrp":
        return "yes" if c.get("conserved") else "leak"
    return "yes"


def _failure(r: dict) -> str:
    if r.get("error"):
        return r["error"]
    for p in PRESETS:
        c = r.get(p) or {}
        if c.get("error"):
            return f"{p}: {c['error']}"
    c = r.get("abslrp") or {}
    return f"abslrp leak at {c['leak']}" if c.get("leak") else ""


def write(rows: List[dict], out: str, command: str) -> None:
    os.makedirs(out, exist_ok=True)
    rows = sorted(rows, key=lambda r: (r.get("family") == "(named)", r.get("family", ""), r["model"]))
    tmp = os.path.join(out, "coverage.json.tmp")
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmp, os.path.join(out, "coverage.json"))  # never a half-written file
    with open(os.path.join(out, "coverage.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["family", "model", "input", "fx", "tracer"] +
                   [f"{p}_{k}" for p in PRESETS for k in ("explained", "conserved", "worst")] + ["failure"])
        for r in rows:
            cells = []
            for p in PRESETS:
                c = r.get(p) or {}
                cells += [int(bool(c.get("explained"))), int(bool(c.get("conserved"))),
                          "" if c.get("worst") is None else f"{c['worst']:.3g}"]
            w.writerow([r.get("family", ""), r["model"], r.get("input", ""), int(bool(r.get("fx"))),
                        (r.get("abslrp") or {}).get("tracer", "")] + cells + [_failure(r)])
    md = ["# Coverage of the timm model zoo", "",
          "One representative (the smallest variant by parameter count) of each timm 1.0.31 model "
          "family, random weights (timm's initialisation, except that weights it sets to all zeros, such as "
          "some classifier heads and the last norm of residual branches, get small random values: a zero "
          "weight would pass no relevance and hide what lies behind it), float64, batch 2, 64x64 where the model accepts it (else 128x128, 56x56 or 112x112, "
          "else its default size); each model in its own process. *Conserved*: every node of the `abslrp` "
          "report within 1e-5 relative error on the signed total and on the positive and negative "
          "masses (rows that absorb relevance by design excluded). *worst*: the largest relative "
          "error of any node under `abslrp`.", "",
          "Reproduce (the whole zoo takes long on a small machine; `--families` runs a subset):", "",
          "```text", command, "```", "", "## Headline", "", "| | families |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in headline(rows)]
    n_fam = len(_representatives_cached())
    measured = len([r for r in rows if r.get("family") not in (None, "(named)")])
    if measured < n_fam:
        md += ["", f"Measured so far: {measured} of the {n_fam} families (the percentages are of those); "
               "the families without a row were not run."]
    md += ["", "## Reading the table", "",
           "* *fx*: `torch.fx` traced the model. A model that fx cannot trace fails under every preset.",
           "* *abslrp*: `yes` = explained and conserved at every node; `leak` = explained, some node off "
           "by more than 1e-5 (the failure column names the worst); `error` = not explained.",
           "* *named loss*: `abslrp` splits relevance into a positive and a negative stream and rescales "
           "each to its incoming mass. A stream can only be rescaled if it reaches some input with a "
           "non-zero contribution; where it does not (say positive relevance arrives only at entries "
           "whose contribution `2 z+` is 0, or a LayerNorm whose only carriers lie below the mean), "
           "that stream's mass is lost by the method's definition. The report names such a row "
           "`LOSS` with the lost share (`ConservationReport.losses()`) and does not count it as a leak; "
           "the other stream is still checked.",
           "* *abslrp-renorm*, *lrp-epsilon*: explained (finite relevance, no error). Their "
           "conservation is not a goal (unit-mass renormalisation, epsilon absorption).",
           "* The representative of each family is fixed in `benchmarks/coverage_models.json`.",
           "* Hugging Face architectures (BERT, DistilBERT, MiniLM, ViT, DeiT, DINOv2, Swin): "
           "[coverage_hf.md](coverage_hf.md) (`benchmarks/coverage_hf.py`)."]
    md += ["", "## Per model", "",
           "| family | model | input | fx | abslrp | worst | named loss (abslrp) | abslrp-renorm | lrp-epsilon | failure |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r.get("abslrp") or {}
        worst = "" if c.get("worst") is None else f"{c['worst']:.1e}"
        fail = _failure(r).replace("|", "\\|").replace("\n", " ")
        md.append(f"| {r.get('family', '')} | {r['model']} | {r.get('input', '')} | "
                  f"{'yes' if r.get('fx') else 'no'} | {_cell(r, 'abslrp')} | {worst} | {c.get('loss', '')} | "
                  f"{_cell(r, 'abslrp-renorm')} | {_cell(r, 'lrp-epsilon')} | {fail} |")
    with open(os.path.join(out, "coverage.md"), "w") as f:
        f.write("\n".join(md) + "\n")


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="*", help="timm module names (default: all)")
    ap.add_argument("--models", nargs="*", help="extra model names to run (default: the named list)")
    ap.add_argument("--no-named", action="store_true", help="skip the named models")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per model")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--render", metavar="COMMAND", help="only rewrite the table from the JSON in --out, "
                                                          "quoting COMMAND as the sweep's command")
    a = ap.parse_args(argv)
    if a.render:
        for k, v in headline(_save([], a.out, a.render)):
            print(f"{k}: {v}")
        return
    if a.worker:
        print(json.dumps(run_one(a.worker, a.size, a.presets)), flush=True)
        return
    reps = representatives()
    fams = a.families if a.families is not None else sorted(reps)
    todo = [(f, reps[f]) for f in fams if f in reps]
    named = list(a.models or []) if a.no_named or a.families is not None else list(a.models or NAMED)
    # a named model that represents its family is measured once, in its family's row
    todo += [("(named)", m) for m in named if m not in reps.values()]
    done = 0
    rows: List[dict] = []
    cmd = "OMP_NUM_THREADS=1 python benchmarks/coverage.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def job(item):
        nonlocal done
        fam, name = item
        row = _child(name, a.size, a.presets, a.timeout)
        row["family"] = fam
        done += 1
        rows.append(row)
        _save(rows, a.out, cmd.strip())  # after every model, so a stopped sweep keeps its rows
        c = row.get("abslrp") or {}
        print(f"[{done}/{len(todo)}] {fam:28s} {name:40s} abslrp={_cell(row, 'abslrp'):5s} "
              f"worst={c.get('worst', float('nan')):.1e} {_failure(row)[:120]}", flush=True)
        return row

    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        list(pool.map(job, todo))
    for k, v in headline(_save(rows, a.out, cmd.strip())):
        print(f"{k}: {v}")


_SAVE_LOCK = threading.Lock()


def _save(rows: List[dict], out: str, command: str) -> List[dict]:
    """Merge ``rows`` into the files in ``out`` (a subset run replaces its own rows only)."""
    with _SAVE_LOCK:  # --jobs N: one writer at a time
        path = os.path.join(out, "coverage.json")
        merged: Dict[tuple, dict] = {}
        if os.path.exists(path):
            with open(path) as f:
                merged = {(r.get("family"), r["model"]): r for r in json.load(f)}
        merged.update({(r["family"], r["model"]): r for r in list(rows)})
        write(list(merged.values()), out, command)
        return list(merged.values())


if __name__ == "__main__":
    main()
