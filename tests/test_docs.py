"""Every fenced code block of README.md and docs/*.md runs as written, so a doc cannot rot.

The convention (no registration: a new block or a new docs page is picked up by itself):

* ```` ```python ````: a complete standalone script, run in a subprocess (cwd: a temporary folder);
* ```` ```bash ````: commands run from the repository root after the README's set-up, with
  ``.venv/bin`` meaning this interpreter's environment. ``--out PATH`` is redirected into a
  temporary folder (the suite never writes into the repository), and so is that path where a
  later command of the block reads it. A block that would take
  minutes runs in its quick form: ``--n N`` is capped at 4, and a ``benchmarks/`` script that
  offers ``--quick`` gets it (the same code on a tiny model). ``benchmarks/check_cuda.py``
  needs a GPU; without one it must exit with its documented status 2;
* ```` ```text ````: output samples and layouts, not run. An untagged block is an error.

The README's two set-up commands create a virtual environment and pip-install into it, which
cannot run inside the suite: their set-up parts (``python3 -m venv``, ``pip install``) are
covered by CI, whose ``.ci/run`` is the README's test command verbatim (checked below), and
the main-job command differs from it only in the extra (checked below); the rest of each
command runs here (``lrpgraph explain``), except the suite itself (``pytest``).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.S | re.M)
TIMEOUT = 300
QUICK_N = 4  # --n is capped at this (the evaluator's smallest unit is one mosaic of 4 images)


def blocks() -> List[Tuple[str, int, str, str]]:
    """``(file, line, language, code)`` of every fenced block in README.md and docs/*.md."""
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            out.append((str(path.relative_to(ROOT)), line, m.group(1).strip(), m.group(2)))
    return out


BLOCKS = blocks()


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _commands(code: str) -> List[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    cmds = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            cmds.append(line)
    return cmds


def _is_setup(segment: str) -> bool:
    s = segment.strip()
    return s.startswith("python3 -m venv") or " pip install" in f" {s}" or "/pip install" in s


def _has_quick(script: str, cache: dict = {}) -> bool:  # noqa: B006  (a per-process cache)
    if script not in cache:
        try:
            h = subprocess.run([sys.executable, script, "-h"], cwd=ROOT, capture_output=True, text=True,
                               timeout=120, env=_env()).stdout
        except subprocess.TimeoutExpired:
            h = ""
        cache[script] = "--quick" in h
    return cache[script]


def quick_form(segment: str, tmp: Path, outs: Optional[set] = None) -> str:
    """The segment as the suite runs it (see the module docstring). ``outs`` collects the paths
    that ``--out`` redirected, so a later command of the block that reads them reads the copy."""
    outs = set() if outs is None else outs
    words = shlex.split(segment, comments=True)
    out: List[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w.startswith(".venv/bin/"):
            w = str(BIN / w[len(".venv/bin/"):])
        if w == "--out" and i + 1 < len(words):
            outs.add(words[i + 1].rstrip("/"))
            out += [w, str(tmp / words[i + 1])]
            i += 2
            continue
        if any(w == o or w.startswith(o + "/") for o in outs):  # written by an earlier command
            w = str(tmp / w)
        if w == "--n" and i + 1 < len(words) and words[i + 1].isdigit():
            out += [w, str(min(int(words[i + 1]), QUICK_N))]
            i += 2
            continue
        out.append(w)
        i += 1
    scripts = [w for w in out if w.startswith("benchmarks/") and w.endswith(".py")]
    if scripts and _has_quick(scripts[0]) and "--quick" not in out:
        out.append("--quick")
    return " ".join(shlex.quote(w) if "=" not in w or w.startswith("-") else w for w in out)


def _run(cmd: List[str] | str, cwd: Path, shell: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, shell=shell, capture_output=True, text=True, timeout=TIMEOUT,
                          env=_env(), executable="/bin/bash" if shell else None)


@pytest.mark.parametrize("where,line,lang,code", BLOCKS, ids=[f"{b[0]}:{b[1]}:{b[2] or 'untagged'}" for b in BLOCKS])
def test_doc_block_runs_as_written(where, line, lang, code, tmp_path):
    if lang == "text":
        return  # an output sample or a layout: nothing to run
    assert lang in ("python", "bash"), (f"{where}:{line}: tag the block python (a complete script), bash "
                                        f"(commands from the repository root) or text (not run), not {lang!r}")
    if lang == "python":
        script = tmp_path / "block.py"
        script.write_text(code)
        r = _run([sys.executable, str(script)], cwd=tmp_path)
        assert r.returncode == 0, f"{where}:{line} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
        return
    outs: set = set()
    for cmd in _commands(code):
        segments = [s for s in cmd.split("&&") if not _is_setup(s) and "pytest" not in s]
        for seg in segments:
            run = quick_form(seg, tmp_path, outs)
            r = _run(run, cwd=ROOT, shell=True)
            want = 2 if "check_cuda.py" in run and not _cuda() else 0  # 2: documented "no GPU"
            assert r.returncode == want, (f"{where}:{line}: `{seg.strip()}` (run as `{run}`) exited "
                                          f"{r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _readme_setup() -> Tuple[str, str]:
    cmds = [c for _, _, lang, code in BLOCKS[:4] if lang == "bash" for c in _commands(code)]
    main = next(c for c in cmds if "lrpgraph explain" in c)
    test = next(c for c in cmds if "pytest" in c)
    return main, test


def test_readme_test_command_is_what_ci_runs():
    _, test = _readme_setup()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci, "the README's test set-up command must be the one .ci/run runs verbatim"


def test_readme_main_command_installs_a_subset_of_what_ci_installs():
    main, test = _readme_setup()
    setup_main = [s.strip() for s in main.split("&&") if _is_setup(s)]
    setup_test = [s.strip() for s in test.split("&&") if _is_setup(s)]
    assert [s.replace('".[image]"', '".[dev]"') for s in setup_main] == setup_test
    dev = re.search(r"^dev = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert re.search(r"lrpgraph\[[^]]*\bimage\b", dev), "the dev extra must include the image extra"


def test_quick_form_rewrites():
    tmp = Path("/t")
    assert quick_form("lrpgraph explain --out out --n 256  # note", tmp) == "lrpgraph explain --out /t/out --n 4"
    assert quick_form(".venv/bin/lrpgraph presets", tmp) == f"{BIN / 'lrpgraph'} presets"
