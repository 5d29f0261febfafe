"""Kept for the tests and benchmarks that import it: the loader lives in :mod:`lrpgraph.timmzoo`
(explicitly imported; ``import lrpgraph`` never touches torchvision)."""
from lrpgraph.timmzoo import ensure_torchvision, import_timm  # noqa: F401
