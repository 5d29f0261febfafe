"""benchmarks/check_cuda.py, the script run when a GPU is lent, runs end to end on the CPU
(tiny model, small sizes) so that it cannot rot."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_check_cuda_runs_on_cpu(tmp_path):
    out = tmp_path / "table.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "check_cuda.py"), "--device", "cpu", "--quick",
           "--compile-methods", "gradient", "--out", str(out)]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "0 failure(s)" in r.stdout and r.stdout.count(" ok") == 9       # every preset agrees
    rows = [line for line in out.read_text().splitlines() if line.startswith("| tiny")]
    # eager: 2 batches x 2 dtypes x (gradient, abslrp); compiled: the gradient at batch 2
    assert len(rows) == 9 and all("NON-FINITE" not in r and "Error" not in r for r in rows)
    assert sum("| eager | gradient |" in r for r in rows) == 1
