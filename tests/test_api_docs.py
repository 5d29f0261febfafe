"""The API page is generated from the docstrings and up to date; public calls document every argument."""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import lrpgraph

ROOT = Path(__file__).resolve().parents[1]


def test_api_page_is_up_to_date():
    r = subprocess.run([sys.executable, "tools/make_api_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + "\n(regenerate with: python tools/make_api_docs.py)"


@pytest.mark.parametrize("fn", [lrpgraph.explain, lrpgraph.Explainer.__init__, lrpgraph.Explainer.__call__],
                         ids=["explain", "Explainer", "Explainer.__call__"])
def test_every_argument_is_documented(fn):
    doc = inspect.getdoc(fn if fn is not lrpgraph.Explainer.__init__ else lrpgraph.Explainer) or ""
    for name in inspect.signature(fn).parameters:
        if name != "self":
            assert f"{name}:" in doc, f"{fn.__qualname__}: argument {name!r} is not documented"
