"""Argument checks shared by the ``lrpgraph`` commands: every bad argument is one line on stderr
and exit status 2, found before any work starts (never a traceback, never after a long run)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``prog: error: ...``), without the usage
    block; ``-h`` still prints the full help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def one_line(message: object) -> str:
    """A message folded into one line (the ``fix:`` hints of lrpgraph's errors included)."""
    return " ".join(str(message).split())


def fail(prog: str, message: object) -> NoReturn:
    """Print ``prog: error: message`` on one line and exit with status 2."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(2)


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def nonneg_float(text: str) -> float:
    """An ``argparse`` type: a finite number >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v >= 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def device(text: str) -> str:
    """An ``argparse`` type: a torch device that exists on this machine."""
    try:
        d = torch.device(text)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(f"unknown device {text!r} ({exc}); use cpu or cuda[:N]") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r}: CUDA is not available here; use cpu")
    if d.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device {text!r}: only cpu and cuda are supported")
    return text


def writable_dir(prog: str, path: str) -> Path:
    """Create ``path`` (a folder) if needed and check that a file can be written there, or fail."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        fail(prog, f"--out {path}: exists and is not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".lrpgraph-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        fail(prog, f"--out {path}: cannot write there ({exc.strerror or exc})")
    if not os.access(p, os.W_OK):
        fail(prog, f"--out {path}: cannot write there")
    return p
