"""timm for examples, the command line and benchmarks: :func:`import_timm` (explicitly called;
``import lrpgraph`` never imports this module, torchvision or timm).

Why this exists: timm imports torchvision. The registry's ``torchvision==0.28.0`` wheel (the
only one that matches ``torch==2.13.0``) is a CUDA build; beside the CPU build of torch its
compiled ops fail to load and ``import torchvision`` raises ``operator torchvision::nms does not
exist``. Where that happens, :func:`ensure_torchvision` defines the two missing op schemas
(``nms``, ``qnms``) first; the pure-Python parts of torchvision (models, transforms) and all of
timm then work, but ``torchvision.ops.nms`` itself does not (lrpgraph never calls it). Where
torchvision imports cleanly (a CUDA machine, a matching CPU build) nothing is changed.

Example::

    from lrpgraph.timmzoo import import_timm
    timm = import_timm()
    model = timm.create_model("resnet18", pretrained=False).eval()
"""
from __future__ import annotations

import sys
from types import ModuleType

__all__ = ["ensure_torchvision", "import_timm"]

_LIB = None  # the schema library, kept alive once defined


def ensure_torchvision() -> str:
    """Make ``import torchvision`` work; returns ``"native"`` (it imported as it is) or
    ``"shim"`` (the two op schemas had to be defined first). Other import errors propagate."""
    global _LIB
    try:
        import torchvision  # noqa: F401
        return "native" if _LIB is None else "shim"
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
    import torch

    for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[name]  # the half-imported package
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401

    return "shim"


def import_timm() -> ModuleType:
    """Import and return timm, after :func:`ensure_torchvision` (needs ``lrpgraph[zoo]``)."""
    ensure_torchvision()
    import timm

    return timm
