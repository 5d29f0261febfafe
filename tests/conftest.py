"""Shared fixtures. timm models are created with random weights (nothing is downloaded)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tv_compat import import_timm  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def timm():
    """The timm module (torchvision made importable first)."""
    return import_timm()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
