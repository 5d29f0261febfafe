"""Relevance per attention head, on request (``Explainer(...)(x, heads=True)``).

An attention node is a softmax with a 4-D output ``(B, H, N, M)`` (the attention map, after
:mod:`lrpgraph.attention` made fused attention explicit) whose user multiplies it with the values
(``(B, H, N, d)``). For each one, :attr:`Explanation.heads` holds, keyed by the softmax node:

* ``"map"``: the relevance of the attention map, ``(K, B, H, N, M)``;
* ``"per_head"``: the relevance that flowed through each head's output ``attn @ v``, summed over
  tokens and channels, ``(K, B, H)``;
* ``"output"``: the name of that matmul node.

They are collected like ``keep=`` latents: the walk keeps these nodes' incoming relevance.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from torch import Tensor, fx

from .record import Plan


def _is_softmax(n: fx.Node) -> bool:
    t = n.target
    return (n.op == "call_method" and t == "softmax") or (
        n.op == "call_function" and getattr(t, "__name__", "") == "softmax")


def attention_nodes(plan: Plan, shapes: Dict[fx.Node, Any]) -> List[Tuple[fx.Node, Optional[fx.Node]]]:
    """``(softmax node, attn @ v node or None)`` for every attention map in the graph."""
    out = []
    for n in plan.nodes:
        is_sm = _is_softmax(n) or (n.op == "call_module" and type(plan.modules.get(n)).__name__ == "Softmax")
        shp = shapes.get(n)
        if not is_sm or n not in plan.live or shp is None or len(shp) != 4:
            continue
        av = next((u for u in n.users if getattr(u.target, "__name__", u.target) in ("matmul", "bmm", "einsum")
                   and u in plan.live and len(shapes.get(u) or ()) == 4), None)
        out.append((n, av))
    return out


def collect(kept: Dict[str, Any], nodes: List[Tuple[fx.Node, Optional[fx.Node]]]) -> Dict[str, Dict[str, Any]]:
    """The per-head figures from the kept relevance."""
    out: Dict[str, Dict[str, Any]] = {}
    for sm, av in nodes:
        m = kept.get(sm.name)
        entry: Dict[str, Any] = {"map": m, "output": av.name if av is not None else None, "per_head": None}
        r = kept.get(av.name) if av is not None else None
        if isinstance(r, Tensor) and r.dim() == 5:
            entry["per_head"] = r.sum(dim=(3, 4))
        out[sm.name] = entry
    return out


def plot_heads(heads: Dict[str, Any], path: str, sample: int = 0, k: int = 0, layers: Optional[List[str]] = None,
               max_tokens: int = 64) -> str:
    """A grid PNG: one row per attention node, one column per head, each cell the attention map's
    relevance (queries x keys, first ``max_tokens``; red positive, blue negative), titled with the
    head's relevance. Returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = layers or [n for n, v in heads.items() if isinstance(v.get("map"), Tensor)]
    if not names:
        raise ValueError("no attention maps were kept: explain with heads=True on a model with attention")
    H = heads[names[0]]["map"].shape[2]
    fig, axes = plt.subplots(len(names), H, figsize=(1.3 * H, 1.4 * len(names)), dpi=100, squeeze=False)
    for i, name in enumerate(names):
        m = heads[name]["map"][k, sample].detach().float().cpu()
        ph = heads[name]["per_head"]
        for h in range(H):
            ax = axes[i][h]
            a = m[h, :max_tokens, :max_tokens]
            lim = float(a.abs().max()) or 1.0
            ax.imshow(a.numpy(), cmap="bwr", vmin=-lim, vmax=lim)
            ax.set_xticks([])
            ax.set_yticks([])
            title = f"h{h}" + (f" {float(ph[k, sample, h]):+.2g}" if ph is not None else "")
            ax.set_title(title, fontsize=6)
            if h == 0:
                ax.set_ylabel(name, fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def head_keep(nodes: List[Tuple[fx.Node, Optional[fx.Node]]]) -> set:
    """Node names whose relevance the walk must keep for :func:`collect`."""
    out = set()
    for sm, av in nodes:
        out.add(sm.name)
        if av is not None:
            out.add(av.name)
    return out
