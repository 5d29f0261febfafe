"""Check that lrpgraph runs unchanged on CUDA and agrees with the CPU (run where a GPU is lent).

For each bundled zoo model and a timm ResNet50, every preset is explained on the CPU and on the
GPU in float64; the maps must agree to 1e-6 relative, the output must live on the GPU, and the
absLRP conservation report must show no leak. Then the ResNet50 benchmark runs on the GPU.

    python benchmarks/check_cuda.py            # exits 1 on any failure, 2 if no GPU is present
"""
from __future__ import annotations

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from tv_compat import import_timm  # noqa: E402

import lrpgraph  # noqa: E402
from lrpgraph import zoo  # noqa: E402


def compare(name: str, model: torch.nn.Module, x: torch.Tensor, presets) -> int:
    failures = 0
    gpu = torch.device("cuda")
    model = model.double()
    x = x.double()
    model_gpu = copy.deepcopy(model).to(gpu)
    for preset in presets:
        try:
            cpu = lrpgraph.Explainer(model, preset)(x)
            cuda = lrpgraph.Explainer(model_gpu, preset)(x.to(gpu))
        except lrpgraph.NoRuleError as exc:
            print(f"  {name:<10} {preset:<18} skipped: {exc}")
            continue
        ok_dev = cuda.relevance.device.type == "cuda"
        err = float((cuda.relevance.cpu() - cpu.relevance).abs().max() / cpu.relevance.abs().max().clamp(min=1e-30))
        leaks = len(cuda.conservation().leaks(1e-5)) if preset == "abslrp" else 0
        ok = ok_dev and err < 1e-6 and leaks == 0
        failures += not ok
        print(f"  {name:<10} {preset:<18} max rel diff {err:.1e}  on cuda {ok_dev}  leaks {leaks}  "
              f"{'ok' if ok else 'FAIL'}")
    return failures


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    presets = lrpgraph.composite_names()
    failures = 0
    x, _ = zoo.load_samples(8)
    for name in ("vgg", "resnet", "vit"):
        failures += compare(name, zoo.load(name), x, presets)
    timm = import_timm()
    torch.manual_seed(0)
    r50 = timm.create_model("resnet50", pretrained=False, num_classes=10).eval()
    failures += compare("resnet50", r50, torch.randn(2, 3, 64, 64), ["abslrp", "abslrp-renorm", "lrp-epsilon"])
    print(f"{failures} failure(s)")
    from bench_cnn import main as bench

    bench(["--model", "resnet50", "--batch", "8", "--size", "224", "--device", "cuda", "--repeats", "5"])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    raise SystemExit(main())
