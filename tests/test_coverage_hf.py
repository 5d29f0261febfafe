"""benchmarks/coverage_hf.py: a Hugging Face architecture from a random config, explained through
the automatic tracer, and the table it writes."""
from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import coverage_hf  # noqa: E402


def test_distilbert_row_explained_and_conserved(tmp_path):
    row = coverage_hf.run_one("distilbert", ["abslrp", "lrp-epsilon"])
    assert row["input"] == "8 token ids"
    a = row["abslrp"]
    assert a["tracer"] == "export" and a["explained"] and a["conserved"], a
    assert a["worst"] < 1e-10
    assert row["lrp-epsilon"]["explained"]
    coverage_hf.write([row, {"model": "swin", "class": "X", "error": "boom"}], str(tmp_path), "CMD")
    md = (tmp_path / "coverage_hf.md").read_text()
    assert "| `abslrp` explained and conserved | 1 / 2 |" in md
    assert "| swin | X |" in md and "boom" in md and "CMD" in md
