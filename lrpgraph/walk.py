"""The backward interpreter: walks the graph in reverse topological order and applies rules.

Relevance is kept per fx node and summed where a node fans out to several users. A node is
processed once every user has delivered (fx graphs are topologically sorted, so reversed node
order guarantees it), its rule is called, the conservation statistics are taken, and its
relevance and recorded activations are freed.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, fx

from .record import NoRuleError, Plan, Recording, no_rule_message
from .report import NodeBalance, balance, relevance_stats, stats
from .rule import (SAMPLE_ROWS, Absorbed, NodeContext, Relevance, Rule, Scratch, Split, describe_target,
                   unit_l1, unbroadcast)
from .samples import batch_to_front


class RuleError(RuntimeError):
    """A rule failed or returned relevance of the wrong form; the message names the node."""


def _add(a: Relevance, b: Relevance) -> Relevance:
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a + b
    if isinstance(a, list) and isinstance(b, list):
        n = max(len(a), len(b))
        a = a + [None] * (n - len(a))
        b = b + [None] * (n - len(b))
        return [_add(x, y) for x, y in zip(a, b)]
    raise RuleError("cannot sum a tensor relevance with a tuple relevance at a fan-out")


def _context(plan: Plan, rec: Recording, node: fx.Node, rule: Rule, report: bool = True,
             scratch: Optional[Scratch] = None, axes: Optional[Dict[fx.Node, Any]] = None) -> NodeContext:
    vals, shapes = rec.values, rec.shapes
    get = lambda n: vals.get(n)  # noqa: E731
    slots = plan.slots[node]
    return NodeContext(
        name=node.name, op=node.op, target=node.target, module=plan.modules.get(node),
        args=fx.node.map_arg(node.args, get), kwargs=fx.node.map_arg(node.kwargs, get),
        inputs=[vals.get(s) for s in slots], input_shapes=[shapes.get(s) for s in slots],
        output=vals.get(node), output_shape=shapes.get(node), batch_size=rec.batch_size,
        is_parameter=[s.op == "get_attr" or s not in plan.live for s in slots], options=plan.options.get(node, {}),
        report=report, scratch=scratch, module_path=node.meta.get("lrp_module"),
        node=node, plan=plan, rec=rec,
        input_axes=[axes.get(s) for s in slots] if axes else [None] * len(slots),
        output_axis=axes.get(node) if axes else None,
    )


def walk(plan: Plan, rec: Recording, start_node: fx.Node, start: Tensor,
         report: bool = True, keep: Optional[set] = None, scratch: Optional[Scratch] = None,
         axes: Optional[Dict[fx.Node, Any]] = None) -> Dict[str, Any]:
    """Propagate ``start`` (``(K, *start_node_shape)``) from ``start_node`` to the inputs.

    Returns ``{"inputs": [relevance per placeholder], "balance": [NodeBalance], "absorbed":
    {node name: relevance}, "kept": {node name: relevance}, "edges": [edge figures]}``. With
    ``report``, every delivery of relevance from a node to one of its input slots is an edge
    ``(user, input, slot, sent, delivered)``: ``sent`` the (sum, pos, neg) per (pass, sample) of
    what the rule sent (sign streams added, before any renormalisation), ``delivered`` the signed
    sum that was added to the input's relevance (after renormalisation); see :mod:`lrpgraph.graph`. ``keep`` names nodes whose
    incoming relevance is returned as well (latent relevance, debugging). ``scratch`` holds the
    rules' temporary buffers (a new one if not given; an Explainer passes its own, kept between calls).
    ``axes``: the batch axis of every node's value (:func:`~lrpgraph.record.batch_axes`), which the
    report uses to sum per sample; without it the report guesses by size.
    """
    B = rec.batch_size
    rel: Dict[fx.Node, Relevance] = {start_node: start}
    delivered: Dict[fx.Node, Tensor] = {}  # positive mass delivered as separate streams
    fan: Dict[fx.Node, Any] = {}  # (signed sum, mass) of what the users delivered: checks the fan-out sum
    rows: List[NodeBalance] = []
    kept: Dict[str, Relevance] = {}
    absorbed: Dict[str, Relevance] = {}
    edges: List[tuple] = []  # (user, input, slot, sent stats, delivered sum) when reporting
    placeholders = set(plan.placeholders)
    scratch = scratch if scratch is not None else Scratch()  # the rules' temporaries, node to node
    axes = axes or {}
    for node in reversed(plan.nodes):
        r = rel.pop(node, None)
        if r is None:
            rec.values.pop(node, None)
            continue
        if keep is not None and node.name in keep:
            kept[node.name] = r
        if node in placeholders:
            rel[node] = r  # collected below
            if report:  # an input's own row: the fan-out sum into it is checked like any other
                rows.append(balance(node.name, "input", "input", r, [r], B, axis=axes.get(node),
                                    out_axes=[axes.get(node)], delivered=fan.pop(node, None)))
            continue
        rule = plan.rules.get(node)
        if rule is None and node in plan.live and node.op != "get_attr":
            raise NoRuleError(no_rule_message(node, plan.modules.get(node), plan.preset))
        if rule is None:  # a parameter, buffer or constant: it absorbs relevance by design
            what = "a parameter" if node.op == "get_attr" else "a constant (independent of the input)"
            if report:
                rows.append(balance(node.name, node.op, "absorbed", r, None, B,
                                    note=f"absorbed by {what}", axis=axes.get(node), delivered=fan.pop(node, None)))
            absorbed[node.name] = r
            continue
        scratch.step()
        ctx = _context(plan, rec, node, rule, report, scratch, axes)
        r = _in_node_dtype(r, ctx)
        # hand the relevance over when nothing else refers to it (not the report, not `keep`, not
        # another node: 2 = this frame's name + getrefcount's argument), so rules may reuse it
        ctx.owns_relevance = (not report and isinstance(r, Tensor) and r._base is None
                              and not (keep is not None and node.name in keep) and sys.getrefcount(r) == 2)
        if getattr(rule, "per_sample", False):
            _check_batch_first(ctx, rule)
        slots = plan.slots[node]
        per_sample = _sample_rows(node, slots, rec, axes, B)
        token = SAMPLE_ROWS.set(per_sample)  # the rules' sums per sample, not per window
        try:
            out = list(rule(ctx, r))
        except RuleError:
            raise
        except Exception as exc:
            raise RuleError(f"rule {rule.name} failed at {ctx.describe()}: "
                            f"{type(exc).__name__}: {exc}") from exc
        finally:
            SAMPLE_ROWS.reset(token)
        extra = out.pop() if len(out) == len(slots) + 1 and isinstance(out[-1], Absorbed) else None
        if len(out) != len(slots):
            raise RuleError(f"rule {rule.name} at {ctx.describe()} returned {len(out)} relevance "
                            f"entries for {len(slots)} input slot(s)")
        raw, out = out, [_fit(o, ctx, i, rule) for i, o in enumerate(out)]
        if report:
            # an operand broadcast in the forward pass (a bias over windows, a gate over tokens) is
            # measured before its copies' relevance is summed: signs that cancel in that sum are
            # cancellation at the operand (its `cancel` column), not mass lost by this rule
            broad = [_broadcast(a, o, ctx) for a, o in zip(raw, out)]
            sent_out = [a if b else o for a, o, b in zip(raw, out, broad)]
            rows.append(balance(node.name, describe_target(node.op, node.target, ctx.module),
                                rule.name, r, sent_out + ([extra.relevance] if extra is not None else []), B,
                                delivered_pos=delivered.pop(node, None),
                                note="renormalised to unit mass after this row" if rule.renormalise else "",
                                axis=axes.get(node), out_axes=[axes.get(node) if b else axes.get(s)
                                                               for s, b in zip(slots, broad)] + [axes.get(node)],
                                delivered=fan.pop(node, None), value=ctx.output))
        if extra is not None:  # a constant inside the op: its own by-design row, after the node's
            absorbed[f"{node.name}.constant"] = extra.relevance
            if report:
                rows.append(balance(f"{node.name}.constant", "constant", "absorbed", extra.relevance, None, B,
                                    note=f"absorbed by {extra.what}", axis=axes.get(node)))
        for j, (s, o) in enumerate(zip(slots, out)):
            if o is None:
                continue
            if report and isinstance(o, (Tensor, Split)):
                pos = raw[j] if broad[j] else o
                pos = pos.pos if isinstance(pos, Split) else pos
                if pos is not None:
                    ax = axes.get(node) if broad[j] else axes.get(s)
                    delivered[s] = delivered.get(s, 0) + stats(pos, B, _plain(ax))[1]
            if isinstance(o, Split):
                o = o.total()
            sent = relevance_stats(o, B, axes.get(s)) if report else None
            if rule.renormalise and isinstance(o, Tensor):
                token = SAMPLE_ROWS.set(per_sample)  # unit mass per sample, too
                a = axes.get(s)  # per sample also where the batch is not the first axis
                o = batch_to_front(unit_l1(batch_to_front(o, a)), a, back=True)
                SAMPLE_ROWS.reset(token)
            if sent is not None:
                st = sent if not rule.renormalise else relevance_stats(o, B, axes.get(s))
                edges.append((node.name, s.name, j, sent, st[0]))
                got = (st[0], st[1] - st[2])  # what this user delivered: signed sum and mass
                old = fan.get(s)
                fan[s] = got if old is None else (old[0] + got[0], old[1] + got[1])
            rel[s] = _add(rel.get(s), o)
        rec.values.pop(node, None)
        out = raw = o = pos = r = None  # drop this node's references, so the next nodes own their relevance
    inputs = [rel.pop(p, None) for p in plan.placeholders]
    return {"inputs": inputs, "balance": rows, "absorbed": absorbed, "kept": kept, "edges": edges}


def _check_batch_first(ctx: NodeContext, rule: Rule) -> None:
    """A conserving rule sums each sample's relevance over all axes but the batch's, which it
    takes to be the first: where the output or an activation input has its batch on another axis
    (a sequence-first ``(N, B, C)`` layout) it would conserve per position instead, mixing the
    samples of a batch without a sign. Refuse such a node, naming it."""
    seen = [("output", ctx.output_axis, ctx.output)]
    seen += [(f"input {i}", a, v) for i, (a, v, c) in enumerate(zip(ctx.input_axes, ctx.inputs, ctx.is_parameter))
             if not c]
    for what, axis, value in seen:
        if isinstance(axis, int) and axis > 0 and isinstance(value, Tensor):
            raise RuleError(
                f"rule {rule.name} at {ctx.describe()}: its {what} {tuple(value.shape)} has the batch on "
                f"axis {axis}, not first (a sequence-first layout such as (N, B, C)). This rule conserves "
                "relevance per sample and takes the batch to be the first axis, so it would mix the "
                "samples of a batch here. Put the batch first in the model (batch_first=True for "
                "nn.MultiheadAttention and nn.TransformerEncoderLayer), or use abslrp-renorm or a classic "
                "preset (lrp-epsilon), which handle this layout")


def _in_node_dtype(r: Any, ctx: NodeContext) -> Any:
    """``r`` in the dtype of the node's output: after a cast in the model (LiteMLA's ``q.float()``
    in a float64 model) each rule works in the dtype of the values it combines with ``r``."""
    out = ctx.output
    if isinstance(r, Tensor) and isinstance(out, Tensor) and out.is_floating_point() and r.dtype != out.dtype:
        return r.to(out.dtype)
    return r


def _plain(axis: Any) -> Optional[int]:
    return axis if isinstance(axis, int) else None


def _sample_rows(node: fx.Node, slots: List[fx.Node], rec: Recording, axes: Dict[fx.Node, Any],
                 batch: int) -> Optional[Dict[int, int]]:
    """``{rows: rows per sample}`` for the tensors of ``node`` whose dim 0 is the batch merged with
    windows or tokens, batch-major (see :data:`lrpgraph.rule.SAMPLE_ROWS`); ``None`` if there are
    none. A size that some other tensor of the node has on a dim 0 that is not its batch is left out."""
    rows: Dict[int, int] = {}
    other = set()
    for n in (node, *slots):
        shp = rec.shapes.get(n)
        if not isinstance(shp, torch.Size) or len(shp) == 0:
            continue
        if axes.get(n) == 0 and shp[0] > batch and shp[0] % batch == 0:
            rows[int(shp[0])] = int(shp[0]) // batch
        elif axes.get(n) != 0:
            other.add(int(shp[0]))
    return {r: m for r, m in rows.items() if r not in other} or None


def _broadcast(raw: Relevance, fitted: Relevance, ctx: NodeContext) -> bool:
    """Whether ``_fit`` summed ``raw`` (shaped like the node's output) down to a broadcast operand."""
    if raw is None or raw is fitted or not isinstance(raw, (Tensor, Split)):
        return False
    t = raw if isinstance(raw, Tensor) else (raw.pos if raw.pos is not None else raw.neg)
    f = fitted if isinstance(fitted, Tensor) else (fitted.pos if fitted.pos is not None else fitted.neg)
    out = ctx.output_shape
    return (t is not None and f is not None and isinstance(out, torch.Size) and tuple(t.shape[1:]) == tuple(out)
            and t.numel() != f.numel())


def _fit(o: Relevance, ctx: NodeContext, i: int, rule: Rule) -> Relevance:
    """Check a rule's output for slot ``i`` against the slot's shape; sum broadcast operands."""
    if o is None:
        return None
    shape = ctx.input_shapes[i]
    if shape is None:
        return None  # a non-tensor slot (size, dim) receives nothing
    if isinstance(o, list):
        return o
    if isinstance(o, Split):
        return o.map(lambda t: _fit(t, ctx, i, rule))
    if not isinstance(o, Tensor):
        raise RuleError(f"rule {rule.name} at {ctx.describe()} returned {type(o).__name__} for input {i}")
    want = tuple(shape)
    if tuple(o.shape[1:]) == want:
        return o
    if ctx.is_parameter[i] or (len(want) > 0 and want[0] == 1):
        return unbroadcast(o, want, ctx.batch_size)
    try:
        return unbroadcast(o, want, ctx.batch_size).reshape((o.shape[0],) + want)
    except RuntimeError:
        raise RuleError(f"rule {rule.name} at {ctx.describe()} returned relevance of shape "
                        f"{tuple(o.shape)} for input {i} of shape {want} (expected (K, *{want}))")
