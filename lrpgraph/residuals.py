"""Residual diagnostics: forward cancellation ``C`` and backward amplification ``A`` at every
addition of two activations (the two ratios of the ResLRP analysis of transformers).

* ``C = sum(|z_in| + |z_up|) / sum(|z_out|)`` per sample, from the recorded forward pass: how much
  the two summands cancel (1 = none; large = the output is a small difference of large terms).
* ``A = sum(|R_in| + |R_up|) / sum(|R_out|)`` per pass and sample, from the backward walk: how much
  absolute relevance the addition's rule sends to its two summands for the relevance it got
  (1 = no amplification; ``R`` with the sign streams added, before any renormalisation).

``C`` is measured while :func:`lrpgraph.record.record` runs (an ``observe`` callback), ``A`` from the
walk's edge figures. An addition qualifies when both summands depend on the input (a position
embedding added to the tokens is a constant, not a residual).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, fx

from .record import Plan

_ADDS = (operator.add, operator.iadd, torch.add, Tensor.add)


def residual_nodes(plan: Plan) -> List[fx.Node]:
    """The additions of two activations (both summands live tensors), in forward order."""
    out = []
    for n in plan.nodes:
        is_add = (n.op == "call_function" and n.target in _ADDS) or (n.op == "call_method" and n.target == "add")
        slots = plan.slots.get(n, [])
        if is_add and n in plan.live and len(slots) == 2 and all(
                s in plan.live and s.op != "get_attr" for s in slots) and slots[0] is not slots[1]:
            out.append(n)
    return out


def _per_sample_abs(t: Any, batch: int) -> Tensor:
    """sum |t| per sample ``(B,)`` in float64 (batch on dim 0; a broadcast operand without a batch
    dim contributes its total to every sample)."""
    if not isinstance(t, Tensor):
        return torch.full((batch,), abs(float(t)), dtype=torch.float64)
    a = t.detach()  # L1 norms: one pass, no |t| temporary (3x faster than abs().sum() on large maps)
    if a.dim() > 0 and a.shape[0] == batch:
        return torch.linalg.vector_norm(a.reshape(batch, -1), 1, dim=1, dtype=torch.float64).cpu()
    return torch.linalg.vector_norm(a, 1, dtype=torch.float64).cpu().expand(batch).clone()


class ForwardSums:
    """An ``observe`` callback for :func:`~lrpgraph.record.record`: ``sums[name]`` is a ``(3, B)``
    float64 tensor of sum|z_in|, sum|z_up| and sum|z_out| per sample at every residual addition."""

    def __init__(self, plan: Plan, batch: int):
        self.plan = plan
        self.batch = batch
        self.nodes = set(residual_nodes(plan))
        self.sums: Dict[str, Tensor] = {}

    def __call__(self, node: fx.Node, value: Any, env: Dict[fx.Node, Any]) -> None:
        if node not in self.nodes:
            return
        a, b = (env[s] for s in self.plan.slots[node])
        self.sums[node.name] = torch.stack([_per_sample_abs(a, self.batch), _per_sample_abs(b, self.batch),
                                            _per_sample_abs(value, self.batch)])


@dataclass
class Residual:
    """One addition of two activations: ``C`` per sample ``(B,)``, ``A`` per pass and sample
    ``(K, B)`` (``None`` where no relevance reached the node)."""

    name: str
    block: str
    inputs: Sequence[str]
    C: Tensor
    A: Optional[Tensor]


def residuals(e: Any) -> List[Residual]:
    """The residual ratios of an :class:`~lrpgraph.explainer.Explanation` (explained with
    ``report=True``), in forward order."""
    from .graph import block_of, module_paths

    if e._plan is None:
        raise ValueError("residual ratios need the report: explain with report=True")
    paths = module_paths(e._plan.nodes)
    rows = {r.name: r for r in e._rows}
    sent_abs: Dict[str, Tensor] = {}
    for user, _inp, _slot, sent, _got in e._edges:
        if user in e._forward:
            m = (sent[1] - sent[2]).detach().to("cpu", torch.float64)
            sent_abs[user] = sent_abs.get(user, 0) + m
    out = []
    for n in e._plan.nodes:
        if n.name not in e._forward:
            continue
        s = e._forward[n.name]
        C = (s[0] + s[1]) / s[2].clamp(min=1e-300)
        A = None
        r = rows.get(n.name)
        if r is not None and n.name in sent_abs:
            A = sent_abs[n.name] / (r.in_pos - r.in_neg).clamp(min=1e-300)
        out.append(Residual(n.name, block_of(paths[n]) or "", [s_.name for s_ in e._plan.slots[n]], C, A))
    return out


def residual_table(res: Sequence[Residual], sample: int = 0) -> str:
    """A fixed-width text table of C and A (first pass) for one sample."""
    head = ("node", "block", "inputs", "C (forward)", "A (backward)")
    lines = [(r.name, r.block, "+".join(r.inputs), f"{float(r.C[sample]):.4g}",
              "-" if r.A is None else f"{float(r.A[0, sample]):.4g}") for r in res]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(l) for l in lines] +
                     ["", f"{len(res)} residual additions; C = sum(|z_in|+|z_up|)/sum(|z_out|), "
                          f"A = sum(|R_in|+|R_up|)/sum(|R_out|) (sample {sample}, pass 0)"])


def plot_residuals(res: Union[Sequence[Residual], Dict[str, Sequence[Residual]]], path: str, title: str = "",
                   sample: int = 0) -> str:
    """A PNG of A per residual addition (one line per preset when given ``{label: residuals}``)
    and of C (the forward ratio, the same for every preset), labelled by block along the x axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = dict(res) if isinstance(res, dict) else {"A": res}
    first = list(next(iter(series.values())))
    xs = list(range(len(first)))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.32 * len(first) + 2), 3.4), dpi=110)
    for i, (label, rs) in enumerate(series.items()):
        ys = [float(r.A[0, sample]) if r.A is not None else float("nan") for r in rs]
        name = "A (backward amplification)" if label == "A" else f"A, {label}"
        ax.plot(xs, ys, "o-", color=("#c0392b", "#e67e22", "#8e44ad", "#16a085")[i % 4], label=name)
    ax.plot(xs, [float(r.C[sample]) for r in first], "s--", color="#2c3e50", alpha=0.7, label="C (forward cancellation)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(xs)
    ax.set_xticklabels([r.block or r.name for r in first], rotation=70, fontsize=7)
    ax.set_ylabel("ratio")
    ax.set_title(title or "residual additions", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
