"""Throughput and memory of lrpgraph presets against a plain input gradient, in one run.

For each preset, the time of one explained batch (trace excluded: an Explainer is built once)
divided by the time of a plain forward plus input-gradient backward of the same model and batch
(weights frozen). Calls are interleaved round by round and the median is taken, so a noisy
shared machine affects both sides alike. "x gradient" is the ratio of the medians; "paired" is the
median of the per-round ratios (each call against the gradient of its own round), with their
range: the steadier figure where the machine's speed drifts during a run. Peak memory: CUDA's
max_memory_allocated on a GPU; on the CPU the process's peak resident set (VmHWM, reset before
each measurement). Page faults: the process's minor page faults during one call (median), i.e.
fresh memory touched for the first time.

``--allocator`` (CPU): ``default`` leaves glibc's malloc as it is; ``retain`` calls
:func:`lrpgraph.memory.retain_freed_memory` first, so that freed memory is reused instead of being
page-faulted back in (it applies to every method of the run, the gradient too); ``both`` (the
default) runs the benchmark once with each, in two child processes, and prints both tables.

    python benchmarks/bench_cnn.py --model resnet50 --batch 8 --size 224
    python benchmarks/bench_cnn.py --model vgg16 --presets abslrp lrp-epsilon --device cuda
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from tv_compat import import_timm  # noqa: E402

import lrpgraph  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing: Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn``: the device synchronised around it, the peak memory counter
    reset before it."""
    _sync(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def gradient_call(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Plain forward + backward to the input, weights frozen: the baseline."""
    def run() -> torch.Tensor:
        xi = x.detach().requires_grad_(True)
        out = model(xi)
        out.gather(1, out.argmax(1, keepdim=True)).sum().backward()
        return xi.grad
    return run


def paired_ratios(times: Sequence[float], base: Sequence[float]) -> tuple:
    """(lowest, median, highest) of the per-round ratios ``times[i] / base[i]``.

    On a shared machine whose speed drifts over seconds, a ratio of two calls made back to back
    varies less than the ratio of two medians taken over the whole run."""
    r = sorted(t / b for t, b in zip(times, base))
    return r[0], statistics.median(r), r[-1]


def parser(model: str = "resnet50", presets: Sequence[str] = ("abslrp", "abslrp-renorm", "lrp-epsilon"),
           doc: str = __doc__) -> argparse.ArgumentParser:
    """The command line of this benchmark (``bench_vit.py`` uses it with ViT defaults)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=model, help="timm model name (random weights)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--presets", nargs="+", default=list(presets))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--report", action="store_true", help="also collect the conservation report")
    p.add_argument("--allocator", choices=("default", "retain", "both"), default="both",
                   help="CPU: glibc malloc as it is, with lrpgraph.memory.retain_freed_memory(), or both")
    p.add_argument("--quick", action="store_true",
                   help="a tiny run of the same code (a small model of the family, batch 1, one round, "
                        "default allocator); tests/test_docs.py runs the documented commands this way")
    return p


def quick(a: argparse.Namespace) -> argparse.Namespace:
    """Shrink parsed arguments for ``--quick`` (in place; returns them)."""
    if a.quick:
        vit = a.model.startswith(("vit", "deit"))
        a.model = "vit_tiny_patch16_224" if vit else "resnet18"
        a.batch, a.repeats, a.allocator = 1, 1, "default"
        a.size = 64
    return a


def run_allocators(script: str, argv: Sequence[str]) -> int:
    """``--allocator both``: the benchmark once per allocator setting, each in its own process
    (the setting is process-wide and cannot be undone)."""
    rc = 0
    for setting in ("default", "retain"):
        print(f"--- allocator: {setting}", flush=True)
        rc |= subprocess.call([sys.executable, script, *argv, "--allocator", setting])
    return rc


def main(argv: Optional[List[str]] = None, p: Optional[argparse.ArgumentParser] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = quick((p or parser()).parse_args(argv))
    if a.allocator == "both" and a.device == "cpu":
        return run_allocators(os.path.abspath(__file__), argv)
    if a.allocator == "retain":
        lrpgraph.memory.retain_freed_memory()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    timm = import_timm()
    torch.manual_seed(0)
    kw = {"img_size": a.size} if a.quick and a.model.startswith("vit") else {}  # a tiny ViT input
    model = timm.create_model(a.model, pretrained=False, num_classes=1000, **kw).eval().to(device)
    for q in model.parameters():
        q.requires_grad_(False)
    x = torch.randn(a.batch, 3, a.size, a.size, device=device)

    calls: Dict[str, Callable[[], object]] = {"gradient": gradient_call(model, x)}
    for name in a.presets:
        ex = lrpgraph.Explainer(model, rules=name)
        calls[name] = (lambda ex=ex: ex(x, report=a.report).relevance)
    times: Dict[str, List[float]] = {k: [] for k in calls}
    faults: Dict[str, List[int]] = {k: [] for k in calls}
    peaks: Dict[str, float] = {}
    for rnd in range(a.repeats + 1):  # round 0 warms up
        for name, fn in calls.items():
            f0 = _minor_faults()
            dt = timed(fn, device)
            if rnd > 0:
                times[name].append(dt)
                faults[name].append(_minor_faults() - f0)
                peaks[name] = max(peaks.get(name, 0.0), _peak_mb(device))
    base = statistics.median(times["gradient"])
    print(f"model {a.model}, batch {a.batch}, {a.size}x{a.size}, device {device}, threads {a.threads}, "
          f"torch {torch.__version__}, allocator {a.allocator}, median of {a.repeats} interleaved rounds")
    print(f"{'method':<18} {'s/batch':>9} {'x gradient':>11} {'paired':>7} {'range':>11} {'peak MB':>9} "
          f"{'page faults':>12}")
    for name in calls:
        med = statistics.median(times[name])
        lo, mid, hi = paired_ratios(times[name], times["gradient"])
        print(f"{name:<18} {med:>9.3f} {med / base:>11.2f} {mid:>7.2f} {f'{lo:.2f}-{hi:.2f}':>11} "
              f"{peaks.get(name, float('nan')):>9.0f} {int(statistics.median(faults[name])):>12}")
    print("every round (s):", "; ".join(f"{k} " + " ".join(f"{t:.2f}" for t in v) for k, v in times.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
