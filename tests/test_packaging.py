"""The top-level ``rules/`` folder is installed as ``lrpgraph.rules`` (wheel and editable installs),
and no bare top-level ``rules`` package is installed."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = (
    "import importlib.util, json, lrpgraph, lrpgraph.rules, lrpgraph.rules.abslrp;"
    "print(json.dumps({'rules': lrpgraph.rules.__file__, 'pkg': lrpgraph.__file__,"
    "'bare': importlib.util.find_spec('rules') is not None}))"
)


def _probe(cwd: Path, env_extra: dict) -> dict:
    import json

    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_installed_package_maps_rules_folder(tmp_path):
    """However lrpgraph is installed here (editable in development), lrpgraph.rules is the
    repository's rules/ folder or the installed lrpgraph/rules, and `import rules` finds nothing."""
    info = _probe(tmp_path, {"PYTHONPATH": ""})
    rules = Path(info["rules"]).resolve()
    assert rules.name == "__init__.py"
    assert rules.parent == ROOT / "rules" or rules.parent == Path(info["pkg"]).resolve().parent / "rules"
    assert info["bare"] is False


def test_wheel_contains_lrpgraph_rules_and_no_top_level_rules(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("lrpgraph-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "lrpgraph/rules/__init__.py" in names and "lrpgraph/rules/abslrp.py" in names
    assert not any(n.startswith("rules/") for n in names), [n for n in names if n.startswith("rules/")]
    assert any(n.endswith("entry_points.txt") for n in names)
    # install it into a plain folder and import from there, away from the repository
    target = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr
    info = _probe(tmp_path, {"PYTHONPATH": str(target)})
    assert Path(info["rules"]).resolve() == (target / "lrpgraph" / "rules" / "__init__.py").resolve()
    assert info["bare"] is False
