"""The one script to run when a GPU is lent: CPU/GPU agreement, then throughput and memory.

1. Agreement: every preset on each ``--agree-models`` model, explained in float64 on the CPU and
   on ``--device``; the maps must agree to 1e-6 relative, live on the device, and the ``abslrp``
   conservation report must show no leak.
2. Throughput: images/s and peak memory of ``abslrp`` against a plain input gradient (forward plus
   backward to the input, weights frozen) for each ``--models`` model, batch size and dtype; the
   two calls alternate round by round and the median round counts. Then the same with
   ``torch.compile``: the gradient on the compiled model, and ``abslrp`` with the whole
   Explainer call compiled (the interpreter is plain tensor maths without hooks, so dynamo can
   trace it; where it breaks the graph or fails, the row says so and gives the first error).
   ``--budget-s`` bounds this part: configurations past it are listed as skipped.

Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the process's peak resident
set, which only grows (so CPU peaks are an upper bound, not per call).

    python benchmarks/check_cuda.py                  # on a GPU: under 10 minutes; exits 1 on a failure
    python benchmarks/check_cuda.py --device cpu --quick     # tiny models: a smoke test of the script
"""
from __future__ import annotations

import argparse
import copy
import os
import signal
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))
from bench_cnn import _peak_mb, gradient_call, timed  # noqa: E402

import lrpgraph  # noqa: E402
from lrpgraph import zoo  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def tiny() -> torch.nn.Module:
    """A tiny CNN for the CPU smoke run (convolution, ReLU, residual-free, pooling, linear)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 10)).eval()


def build(spec: str, size: int) -> torch.nn.Module:
    """``tiny``, a bundled zoo model (``vgg``, ``resnet``, ``vit``; 32x32) or ``timm:NAME``
    (random weights; ViTs built for ``size``)."""
    if spec == "tiny":
        return tiny()
    if spec in zoo.MODELS:
        return zoo.load(spec)
    from tv_compat import import_timm

    timm = import_timm()
    torch.manual_seed(0)
    kw = {"img_size": size} if "vit" in spec else {}
    return timm.create_model(spec[5:], pretrained=False, **kw).eval()


def input_size(spec: str, size: int) -> int:
    return {"tiny": 8}.get(spec, zoo.IMAGE_SIZE if spec in zoo.MODELS else size)


def agreement(spec: str, device: torch.device, presets: Sequence[str], size: int, batch: int = 2) -> int:
    """Failures of one model: CPU float64 maps against ``device`` float64 maps, every preset."""
    model = build(spec, size).double()
    s = input_size(spec, size)
    torch.manual_seed(1)
    x = torch.randn(batch, 3, s, s, dtype=torch.float64)
    model_dev = copy.deepcopy(model).to(device)
    failures = 0
    for preset in presets:
        try:
            cpu = lrpgraph.Explainer(model, preset)(x)
            dev = lrpgraph.Explainer(model_dev, preset)(x.to(device))
        except lrpgraph.NoRuleError as exc:
            print(f"  {spec:<28} {preset:<18} skipped: {str(exc).splitlines()[0][:80]}")
            continue
        on_dev = dev.relevance.device.type == device.type
        err = float((dev.relevance.cpu() - cpu.relevance).abs().max() / cpu.relevance.abs().max().clamp(min=1e-30))
        leaks = len(dev.conservation().leaks(1e-5)) if preset == "abslrp" else 0
        ok = on_dev and err < 1e-6 and leaks == 0
        failures += not ok
        print(f"  {spec:<28} {preset:<18} max rel diff {err:.1e}  on {device.type} {on_dev}  leaks {leaks}  "
              f"{'ok' if ok else 'FAIL'}", flush=True)
    return failures


def _first_line(exc: BaseException) -> str:
    msg = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {msg}"[:90]


def measure(calls: Dict[str, Callable[[], object]], device: torch.device, repeats: int,
            warmup: int = 1) -> Dict[str, tuple]:
    """Median seconds and peak MB per call after ``warmup`` rounds (compiled calls need more:
    dynamo recompiles until its limits are hit); the first call's time is returned too."""
    times: Dict[str, List[float]] = {k: [] for k in calls}
    first: Dict[str, float] = {}
    peaks: Dict[str, float] = {}
    for rnd in range(repeats + warmup):
        for name, fn in calls.items():
            dt = timed(fn, device)
            if rnd == 0:
                first[name] = dt
            if rnd >= warmup:
                times[name].append(dt)
            peaks[name] = max(peaks.get(name, 0.0), _peak_mb(device))
    return {k: (statistics.median(times[k]), peaks[k], first[k]) for k in calls}


def bench_one(spec: str, model: torch.nn.Module, batch: int, dtype: str, device: torch.device, repeats: int,
              size: int, compiled: bool, backend: str, compile_methods: Sequence[str] = ("gradient", "abslrp")) -> List[dict]:
    """Rows for gradient and abslrp on one model, batch and dtype (eager or torch.compile)."""
    m = copy.deepcopy(model).to(device, DTYPES[dtype])
    for q in m.parameters():
        q.requires_grad_(False)
    s = input_size(spec, size)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, s, s, device=device, dtype=DTYPES[dtype])
    ex = lrpgraph.Explainer(m, rules="abslrp")
    lrp = lambda: ex(x, report=False).relevance  # noqa: E731
    grad = gradient_call(m, x)
    calls = {"gradient": grad, "abslrp": lrp}
    if compiled:
        torch._dynamo.reset()
        calls = {"gradient": gradient_call(torch.compile(m, backend=backend), x),
                 "abslrp": torch.compile(lrp, backend=backend)}
        calls = {k: v for k, v in calls.items() if k in compile_methods}
    base = dict(model=spec, batch=batch, dtype=dtype, compiled=backend if compiled else "no")
    rows = []
    try:
        res = measure(calls, device, repeats, warmup=3 if compiled else 1)
        note = "" if compiled or bool(torch.isfinite(lrp()).all()) else "NON-FINITE map"
        if "abslrp" in res and compiled:   # the compiled map must equal the eager one (up to rounding)
            ref, got = lrp().float(), calls["abslrp"]().float()
            note = f"max rel diff to eager {float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30)):.1e}"
        for name, (sec, peak, first) in res.items():
            rows.append(dict(base, method=name, ips=batch / sec, ratio=sec / res["gradient"][0] if "gradient" in res else None, peak=peak,
                             first=first, note=note if name == "abslrp" else ""))
    except torch.cuda.OutOfMemoryError:
        rows.append(dict(base, method="/".join(calls), note="out of memory"))
    except Exception as exc:   # a compile failure is a result: report it, go on
        rows.append(dict(base, method="/".join(calls), note=_first_line(exc)))
    del ex, m, x
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _timeout(signum, frame) -> None:
    raise TimeoutError("stopped at --budget-s")


def table(rows: List[dict], device: torch.device) -> str:
    mem = "peak MB (max allocated)" if device.type == "cuda" else "peak MB (process RSS)"
    out = [f"| model | batch | dtype | torch.compile | method | images/s | x gradient time | {mem} | first call s | note |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ips" in r:
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
            out.append(f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['compiled']} | {r['method']} | {r['ips']:.1f} "
                       f"| {ratio} | {r['peak']:.0f} | {r['first']:.2f} | {r['note']} |")
        else:
            out.append(f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['compiled']} | {r['method']} | | | | | {r['note']} |")
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for a CPU smoke run: tiny model, batches 1 2, one round, eager compile backend")
    p.add_argument("--agree-models", nargs="+", default=["vgg", "resnet", "vit", "timm:resnet50",
                                                         "timm:vit_base_patch16_224"])
    p.add_argument("--agree-size", type=int, default=64, help="input side of the timm models in the agreement check")
    p.add_argument("--models", nargs="+", default=["timm:resnet50", "timm:vit_base_patch16_224"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    p.add_argument("--compile-batches", nargs="*", type=int, default=[8], help="batches also run under torch.compile")
    p.add_argument("--compile-dtypes", nargs="*", default=["float32"], choices=sorted(DTYPES))
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--compile-methods", nargs="*", default=["gradient", "abslrp"], choices=["gradient", "abslrp"],
                   help="what runs under torch.compile (abslrp: the whole Explainer call)")
    p.add_argument("--budget-s", type=float, default=360.0,
                   help="time for the throughput part: a configuration still running then is stopped, the rest "
                        "are skipped, and both are listed (compiled runs come last)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", default=None, help="also write the table (Markdown) to this file")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parser().parse_args(argv)
    if a.quick:
        a.agree_models, a.models, a.batches, a.repeats = ["tiny"], ["tiny"], [1, 2], 1
        a.compile_batches, a.compile_dtypes, a.compile_backend = [2], ["float32"], "eager"
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (use --device cpu --quick for a smoke run)")
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}, lrpgraph {lrpgraph.__version__}", flush=True)
    print("== agreement: CPU float64 vs device float64, every preset")
    presets = lrpgraph.composite_names()
    failures = sum(agreement(spec, device, presets, a.agree_size) for spec in a.agree_models)
    print(f"{failures} failure(s) in {time.perf_counter() - t_start:.0f} s", flush=True)

    print("== throughput: abslrp vs input gradient")
    t_bench = time.perf_counter()
    rows: List[dict] = []
    both = ("gradient", "abslrp")
    jobs = [(spec, b, dt, False, both) for spec in a.models for dt in a.dtypes for b in a.batches]
    # compiled runs last, each method on its own (so that a slow abslrp compile cannot cost the
    # compiled gradients), the gradients first
    jobs += [(spec, b, dt, True, (meth,)) for meth in both if meth in a.compile_methods
             for spec in a.models for dt in a.compile_dtypes for b in a.compile_batches]
    models: Dict[str, torch.nn.Module] = {}
    for spec, b, dt, comp, meths in jobs:
        tag = dict(model=spec, batch=b, dtype=dt, compiled=a.compile_backend if comp else "no", method="/".join(meths))
        if time.perf_counter() - t_bench > a.budget_s:
            rows.append(dict(tag, note=f"skipped: past --budget-s {a.budget_s:g}"))
            continue
        if spec not in models:
            models = {spec: build(spec, a.size)}       # one model in memory at a time
        left = a.budget_s - (time.perf_counter() - t_bench)
        if hasattr(signal, "SIGALRM"):               # a compile that runs on is stopped at the budget
            signal.signal(signal.SIGALRM, _timeout)
            signal.alarm(max(1, int(left)))
        try:
            new = bench_one(spec, models[spec], b, dt, device, a.repeats, a.size, comp, a.compile_backend, meths)
        finally:
            if hasattr(signal, "SIGALRM"):
                signal.alarm(0)
        for r in new:
            print("  " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
                  flush=True)
        for r in new:     # a compiled abslrp row: its ratio against the compiled gradient's row
            g = [q for q in rows if q.get("ips") and q["method"] == "gradient" and
                 all(q[k] == r[k] for k in ("model", "batch", "dtype", "compiled"))]
            if r.get("ratio", 0) is None and g:
                r["ratio"] = g[0]["ips"] / r["ips"]
        rows += new
    md = table(rows, device)
    print(md)
    print(f"total {time.perf_counter() - t_start:.0f} s; {failures} agreement failure(s)")
    if a.out:
        with open(a.out, "w") as f:
            f.write(md + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
