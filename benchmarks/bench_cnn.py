"""Throughput and memory of lrpgraph presets against a plain input gradient, in one run.

For each preset, the time of one explained batch (trace excluded: an Explainer is built once)
divided by the time of a plain forward plus input-gradient backward of the same model and batch
(weights frozen). Calls are interleaved round by round and the median is taken, so a noisy
shared machine affects both sides alike. Peak memory: CUDA's max_memory_allocated on a GPU; on
the CPU the process's peak resident set (VmHWM, reset before each measurement).

    python benchmarks/bench_cnn.py --model resnet50 --batch 8 --size 224
    python benchmarks/bench_cnn.py --model vgg16 --presets abslrp lrp-epsilon --device cuda
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

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


def gradient_call(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Plain forward + backward to the input, weights frozen: the baseline."""
    def run() -> torch.Tensor:
        xi = x.detach().requires_grad_(True)
        out = model(xi)
        out.gather(1, out.argmax(1, keepdim=True)).sum().backward()
        return xi.grad
    return run


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", help="timm model name (random weights)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--presets", nargs="+", default=["abslrp", "abslrp-renorm", "lrp-epsilon"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--report", action="store_true", help="also collect the conservation report")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    timm = import_timm()
    torch.manual_seed(0)
    model = timm.create_model(a.model, pretrained=False, num_classes=1000).eval().to(device)
    for q in model.parameters():
        q.requires_grad_(False)
    x = torch.randn(a.batch, 3, a.size, a.size, device=device)

    calls: Dict[str, Callable[[], object]] = {"gradient": gradient_call(model, x)}
    for name in a.presets:
        ex = lrpgraph.Explainer(model, rules=name)
        calls[name] = (lambda ex=ex: ex(x, report=a.report).relevance)
    times: Dict[str, List[float]] = {k: [] for k in calls}
    peaks: Dict[str, float] = {}
    for rnd in range(a.repeats + 1):  # round 0 warms up
        for name, fn in calls.items():
            _sync(device)
            _reset_peak(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            dt = time.perf_counter() - t0
            if rnd > 0:
                times[name].append(dt)
                peaks[name] = max(peaks.get(name, 0.0), _peak_mb(device))
    base = statistics.median(times["gradient"])
    print(f"model {a.model}, batch {a.batch}, {a.size}x{a.size}, device {device}, threads {a.threads}, "
          f"torch {torch.__version__}, median of {a.repeats} interleaved rounds")
    print(f"{'method':<18} {'s/batch':>9} {'x gradient':>11} {'peak MB':>9}")
    for name in calls:
        med = statistics.median(times[name])
        print(f"{name:<18} {med:>9.3f} {med / base:>11.2f} {peaks.get(name, float('nan')):>9.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
