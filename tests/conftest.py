"""Shared fixtures. timm models are created with random weights (nothing is downloaded)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tv_compat import import_timm  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Under pytest-xdist (``-n N``) the workers share the cores: each takes its share of torch's
# threads, so N workers do not oversubscribe the machine (OpenMP threads that spin-wait on a core
# another worker holds are much slower than fewer threads).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="session")
def timm():
    """The timm module (torchvision made importable first)."""
    return import_timm()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
