"""Write docs/api.md, the API reference, from the public docstrings.

    python tools/make_api_docs.py            # rewrite docs/api.md
    python tools/make_api_docs.py --check    # exit 1 if docs/api.md is out of date

tests/test_api_docs.py runs the check, so a changed docstring fails the suite until the page is
regenerated.
"""
from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"

# (module, names or None for its __all__): what a user imports
SECTIONS = [
    ("lrpgraph", None),
    ("lrpgraph.text", ["trace_hf", "similarity_graph", "token_table"]),
    ("lrpgraph.timmzoo", None),
    ("lrpgraph.memory", ["retain_freed_memory"]),
    ("lrpgraph.zoo", ["load", "load_samples", "preprocess", "unnormalise"]),
    ("lrpgraph.image", ["heatmap", "save_grid"]),
    ("lrpgraph.evaluate", None),
]


def _md(doc: str) -> str:
    """Docstring (reST-ish) to Markdown: ``code`` -> `code`, :role:`x` -> `x`, literal blocks fenced as text."""
    doc = inspect.cleandoc(doc or "")
    doc = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", doc)
    doc = doc.replace("``", "`")
    lines, out, i = doc.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::") and i + 1 < len(lines):
            out.append(line.rstrip()[:-1])
            block = []
            i += 1
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("    ")):
                block.append(lines[i][4:])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            while block and not block[0].strip():
                block.pop(0)
            out += ["", "```text", *block, "```", ""]
            continue
        out.append(line)
        i += 1
    return "\n".join(out).strip()


def _signature(obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    return re.sub(r" at 0x[0-9a-f]+", "", sig)


def _entry(qual: str, obj, level: int = 3) -> List[str]:
    kind = "class" if inspect.isclass(obj) else "function"
    out = [f"{'#' * level} `{qual}{_signature(obj)}`", "", f"*{kind}*", "", _md(obj.__doc__ or "(no docstring)"), ""]
    if inspect.isclass(obj):
        for name, member in vars(obj).items():
            if name.startswith("_") and name != "__call__":
                continue
            if isinstance(member, property):
                doc = member.__doc__
                if doc:
                    out += [f"* `{name}` (property): {_md(doc).splitlines()[0]}"]
                continue
            if inspect.isfunction(member) and member.__doc__:
                out += ["", f"#### `{qual}.{name}{_signature(member)}`", "", _md(member.__doc__), ""]
    return out


def render() -> str:
    out = ["# API reference", "",
           "Generated from the docstrings by `python tools/make_api_docs.py` (do not edit by hand;",
           "`tests/test_api_docs.py` fails when this page is out of date).", ""]
    for modname, names in SECTIONS:
        mod = importlib.import_module(modname)
        names = names if names is not None else list(getattr(mod, "__all__", []))
        out += [f"## `{modname}`", "", _md(mod.__doc__ or "").split("\n\n")[0], ""]
        for name in names:
            obj = getattr(mod, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                out += _entry(f"{modname}.{name}", obj)
    return "\n".join(out).rstrip() + "\n"


def main(argv: List[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python tools/make_api_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
