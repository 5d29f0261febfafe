"""Test, example and benchmark set-up only (never imported by the library).

The registry's ``torchvision==0.28.0`` wheel is a CUDA build; beside the CPU ``torch==2.13.0``
its compiled ops fail to load and ``import torchvision`` raises ``operator torchvision::nms does
not exist``. timm imports torchvision, so on such a machine we define the two missing op
schemas first; the pure-Python parts of torchvision (and all of timm) then work. Where
torchvision imports cleanly (a CUDA machine, a matching CPU build) nothing is changed.
"""
from __future__ import annotations

import sys

_LIB = None


def ensure_torchvision() -> str:
    """Make ``import torchvision`` work; returns ``"native"`` or ``"shim"``."""
    global _LIB
    try:
        import torchvision  # noqa: F401
        return "native" if _LIB is None else "shim"
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
    import torch

    for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[name]
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401

    return "shim"


def import_timm():
    """Import timm after :func:`ensure_torchvision`."""
    ensure_torchvision()
    import timm

    return timm
