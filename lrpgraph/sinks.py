"""Named sinks: where the relevance that did not reach the input went.

Every node that received relevance keeps ``in_sum - delivered`` of it, where ``delivered`` is what it
added to its inputs' relevance. That amount is split into

* the rule's own loss, ``in_sum - out_sum`` (the report's error, measured before any
  normalisation), named by what the node is: ``bias`` (a layer with a non-zero bias; any stabiliser
  at that node is included), ``epsilon`` (a Linear, convolution or BatchNorm without bias: only the
  stabiliser can absorb), ``rule`` (another op whose rule does not conserve);
* ``renormalisation``: ``out_sum - delivered`` at a rule that rescales its output to unit mass
  (``abslrp-renorm``). The report measures a node before normalisation; this entry is what the
  rescaling then added or removed, so the books close exactly;
* ``sign flip``: ``out_sum - delivered`` at a rule that conserves each sign stream's mass but lets
  part of a stream change sign (the ``abslrp`` preset's LayerNorm and softmax use their
  coefficients with their sign, as the paper-era code does): the report counts each stream by its
  mass, and this entry is the change of the signed total that the flip caused;
* relevance absorbed by design (the report's ``by design`` rows): ``position embedding`` (a
  parameter added to the tokens), ``token`` (a class or register token joined to the sequence),
  ``bias`` (a parameter vector added), ``parameter`` or ``constant``;
* ``other input``: relevance that reached a further placeholder (a mask, token ids).

Because each node's incoming relevance is the sum of what its users delivered, these add up:
``start relevance = input relevance + sum of all sinks`` per pass and sample (:func:`books`).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from torch import fx, nn

_SHAPE_OPS = {"expand", "expand_as", "reshape", "view", "repeat", "flatten", "permute", "transpose", "unsqueeze",
              "squeeze", "contiguous", "getitem", "to", "type_as", "clone", "float", "half", "broadcast_to"}
_JOIN_OPS = {"cat", "stack", "concat", "concatenate"}
_ADD_OPS = {"add", "iadd", "radd"}


@dataclass
class Sink:
    """Relevance one node kept, of one kind, per pass and sample ``(K, B)`` (float64)."""

    node: str
    kind: str
    value: np.ndarray


def _name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _has_bias(plan, node: fx.Node) -> Tuple[bool, bool]:
    """(weighted, non-zero bias) for a node's module or functional call."""
    m = plan.modules.get(node)
    if m is not None:
        weight = getattr(m, "weight", None)  # a weight matrix or kernel (not LayerNorm's scale vector)
        w = isinstance(weight, torch.Tensor) and weight.dim() >= 2
        b = getattr(m, "bias", None)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):  # effective bias: beta - mean * scale
            mean = m.running_mean if m.running_mean is not None else torch.zeros(1)
            scale = (m.weight if m.weight is not None else 1) / torch.sqrt(m.running_var + m.eps) \
                if m.running_var is not None else 1
            eff = (b if b is not None else 0) - mean * scale
            return True, bool(torch.as_tensor(eff).abs().sum() > 0)
        return w, isinstance(b, torch.Tensor) and bool(b.detach().abs().sum() > 0)
    if node.op == "call_function" and _name(node) in ("linear", "conv1d", "conv2d", "conv3d"):
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return True, b is not None
    return False, False


def _absorbed_kind(node: fx.Node, shape: Any) -> str:
    """Follow a constant through shape ops to the op that uses it: joined to the sequence (a token),
    added (a position embedding, or a bias when it is a vector), or anything else."""
    cur, seen = node, 0
    while seen < 16:
        users = list(cur.users)
        if len(users) != 1:
            break
        u = users[0]
        name = _name(u)
        if name in _SHAPE_OPS:
            cur, seen = u, seen + 1
            continue
        if name in _JOIN_OPS:
            return "token"
        if name in _ADD_OPS or u.target is operator.add:
            dims = [int(d) for d in (shape or ()) if int(d) > 1]
            return "position embedding" if len(dims) >= 2 else "bias"
        break
    return "parameter" if node.op == "get_attr" else "constant"


def node_sinks(e: Any) -> Dict[str, Tuple[np.ndarray, str]]:
    """``{node: (total sink (K, B), kinds joined by "+")}`` for every node that kept relevance."""
    out: Dict[str, Tuple[np.ndarray, str]] = {}
    for s in sinks(e):
        if s.node in out:
            v, k = out[s.node]
            out[s.node] = (v + s.value, k + "+" + s.kind)
        else:
            out[s.node] = (s.value, s.kind)
    return out


def sinks(e: Any) -> List[Sink]:
    """Every named sink of an explanation (explained with ``report=True``), in backward order."""
    plan = e._plan
    if plan is None:
        raise ValueError("named sinks need the report: explain with report=True")
    by_name = {n.name: n for n in plan.nodes}
    delivered: Dict[str, np.ndarray] = {}
    for user, _inp, _slot, _sent, got in e._edges:
        g = got.detach().to("cpu").double().numpy()
        delivered[user] = delivered.get(user, 0) + g
    out: List[Sink] = []
    for r in e._rows:
        node = by_name.get(r.name)
        if node is None or node.op == "placeholder":  # an input's row checks its fan-out sum only
            continue
        i, o = r.in_sum.double().numpy(), r.out_sum.double().numpy()
        if r.by_design:
            out.append(Sink(r.name, _absorbed_kind(node, e._shapes.get(r.name)), i))
            continue
        weighted, bias = _has_bias(plan, node)
        out.append(Sink(r.name, "bias" if bias else ("epsilon" if weighted else "rule"), i - o))
        rule = plan.rules.get(node)
        rest = o - delivered.get(r.name, np.zeros_like(o))
        if rule is not None and rule.renormalise:
            out.append(Sink(r.name, "renormalisation", rest))
        elif np.abs(rest).max(initial=0.0) > 1e-12 * max(1.0, float(np.abs(o).max(initial=0.0))):
            # a stream measured by its mass but delivered with some entries of the other sign
            # (the paper-era LayerNorm and softmax coefficients): each mass is kept, the signed total is not
            out.append(Sink(r.name, "sign flip", rest))
    for p in plan.placeholders[1:]:
        got = [g for _u, v, _s, _x, g in e._edges if v == p.name]
        if got:
            out.append(Sink(p.name, "other input", sum(t.detach().to("cpu").double().numpy() for t in got)))
    return out


def by_kind(e: Any) -> Dict[str, np.ndarray]:
    """The sinks summed per kind, ``(K, B)`` each, plus ``"total"``."""
    out: Dict[str, np.ndarray] = {}
    for s in sinks(e):
        out[s.kind] = out.get(s.kind, 0) + s.value
    out["total"] = sum(out.values()) if out else np.zeros(1)
    return out


def books(e: Any) -> Dict[str, np.ndarray]:
    """``start``, ``input`` and ``sinks`` per pass and sample ``(K, B)``: the start relevance, what
    reached the (first) input and the named sinks; ``start == input + sinks`` up to rounding."""
    start = e._rows[0].in_sum.double().numpy()
    first = e._plan.placeholders[0].name
    inp = np.zeros_like(start)
    for _u, v, _s, _x, g in e._edges:
        if v == first:
            inp = inp + g.detach().to("cpu").double().numpy()
    return {"start": start, "input": inp, "sinks": by_kind(e)["total"] if e._rows else np.zeros_like(start)}


def sink_table(e: Any, sample: int = 0, top: int = 8) -> str:
    """The sinks per kind for one sample (pass 0), with the start and input relevance, and the
    ``top`` nodes that kept the most (by absolute value)."""
    b = books(e)
    kinds = by_kind(e)
    lines = [f"{'start relevance':<26}{b['start'][0, sample]: .6g}", f"{'input relevance':<26}{b['input'][0, sample]: .6g}"]
    for k, v in sorted(kinds.items(), key=lambda kv: kv[0] == "total"):
        lines.append(f"{'sink ' + k:<26}{v[0, sample]: .6g}")
    gap = b["start"][0, sample] - b["input"][0, sample] - b["sinks"][0, sample]
    lines.append(f"start - input - sinks = {gap:.3g}")
    per = sorted(sinks(e), key=lambda s: -abs(float(s.value[0, sample])))[:top]
    if per:
        lines.append(f"\nlargest sinks (sample {sample}, pass 0):")
        w = max(len(s.node) for s in per)
        lines += [f"  {s.node:<{w}}  {s.kind:<18} {s.value[0, sample]: .6g}" for s in per]
    return "\n".join(lines)


def zero_bias_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every bias zero: each parameter named ``bias`` or ``*_bias``
    (Linear, Conv, LayerNorm, BatchNorm's shift, q/v biases) and BatchNorm's running mean, so that
    normalisation layers add no constant either. The model itself is not modified."""
    import copy

    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias" or leaf.endswith("_bias"):
                p.zero_()
        for m in clone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.zero_()
    return clone
