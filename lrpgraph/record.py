"""The forward pass that keeps only what the rules need.

A :class:`Plan` is compiled once per traced graph and preset: the rule of every node, its input
slots, which values must be kept for the backward walk, and when every other value can be
freed. :func:`record` then runs the graph node by node under ``torch.no_grad()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set

import torch
from torch import Tensor, fx, nn

from .rule import Rule, describe_target


class NoRuleError(LookupError):
    """A node of the graph has no rule in the chosen preset."""


def slots_of(node: fx.Node) -> List[fx.Node]:
    """Every occurrence of an fx node in the flattened args and kwargs, in order."""
    out: List[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) or n)
    return out


@dataclass
class Plan:
    """A traced graph prepared for recording and walking."""

    gm: fx.GraphModule
    nodes: List[fx.Node]
    rules: Dict[fx.Node, Rule]
    slots: Dict[fx.Node, List[fx.Node]]
    keep: Set[fx.Node]
    free_after: Dict[fx.Node, List[fx.Node]]
    modules: Dict[fx.Node, nn.Module]
    options: Dict[fx.Node, dict]
    placeholders: List[fx.Node]
    output_node: fx.Node
    # nodes on some path from a placeholder to the output (others get no relevance)
    live: Set[fx.Node] = field(default_factory=set)
    missing: List[fx.Node] = field(default_factory=list)
    preset: str = ""


def compile_plan(gm: fx.GraphModule, composite) -> Plan:
    """Assign rules and find what to keep and when to free.

    Nodes without a rule are listed in ``Plan.missing``; the walker raises :class:`NoRuleError`
    (naming the node, the op and how to register a rule) when relevance reaches one.
    """
    nodes = list(gm.graph.nodes)
    assigned = composite.assign(gm)
    modules = {n: gm.get_submodule(n.target) for n in nodes if n.op == "call_module"}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    output_node = next(n for n in nodes if n.op == "output")

    # nodes that depend on an input: only those can carry relevance that matters
    # (a tensor's shape is not data: `x.size(0)`, `x.shape`, `x.dtype` start no dependence, so a
    # position embedding sliced to the sequence length or a class token expanded to the batch is a
    # constant that absorbs relevance by design)
    depends: Set[fx.Node] = set(placeholders)
    for n in nodes:
        if _is_shape_query(n):
            continue
        if any(i in depends for i in n.all_input_nodes):
            depends.add(n)
    reaches: Set[fx.Node] = {output_node}
    for n in reversed(nodes):
        if any(u in reaches for u in n.users):
            reaches.add(n)
    live = depends & reaches

    rules: Dict[fx.Node, Rule] = {}
    missing: List[fx.Node] = []
    for n in nodes:
        if n.op not in ("call_module", "call_function", "call_method"):
            continue
        if n not in live:
            continue  # constant sub-graphs (e.g. a size computation) need no rule
        rule = assigned.get(n)
        if rule is None:
            missing.append(n)  # an error only if relevance reaches it (sizes and dims never do)
        else:
            rules[n] = rule

    slots = {n: slots_of(n) for n in nodes}
    keep: Set[fx.Node] = set()
    for n, rule in rules.items():
        if "output" in rule.saves:
            keep.add(n)
        if "inputs" in rule.saves:
            keep.update(slots[n])
    # non-tensor values (sizes, dims) are cheap and rules read them from ctx.args
    last_use: Dict[fx.Node, fx.Node] = {}
    for n in nodes:
        for i in n.all_input_nodes:
            last_use[i] = n
    free_after: Dict[fx.Node, List[fx.Node]] = {}
    for v, n in last_use.items():
        free_after.setdefault(n, []).append(v)
    options = {n: composite.options_for(n) for n in rules}
    return Plan(gm=gm, nodes=nodes, rules=rules, slots=slots, keep=keep, free_after=free_after,
                modules=modules, options=options, placeholders=placeholders,
                output_node=output_node, live=live, missing=missing, preset=composite.name)


_SHAPE_METHODS = ("size", "dim", "numel", "ndimension", "nelement")
_SHAPE_ATTRS = ("shape", "ndim", "dtype", "device", "is_cuda")


def _is_shape_query(n: fx.Node) -> bool:
    """Whether ``n`` reads only a tensor's metadata (shape, dtype, device), not its values."""
    if n.op == "call_method":
        return n.target in _SHAPE_METHODS
    if n.op == "call_function":
        if n.target is getattr:
            return len(n.args) > 1 and n.args[1] in _SHAPE_ATTRS
        return n.target in (torch.numel,)
    return False


def no_rule_message(node: fx.Node, module: Optional[nn.Module], preset: str) -> str:
    what = describe_target(node.op, node.target, module)
    where = f" (module `{node.target}`)" if node.op == "call_module" else ""
    if node.op != "call_module" and node.meta.get("lrp_module"):  # the export tracer knows the module
        where = " in module `{}` ({})".format(*node.meta["lrp_module"])
    if node.op == "call_module":
        key = type(module).__qualname__
    elif node.op == "call_method":
        key = repr(node.target)
    else:
        key = f"torch.ops.{what}" if isinstance(node.target, torch._ops.OpOverload) else what
    return (f"no rule for `{what}` at node `{node.name}`{where} in preset {preset!r}; register one "
            f"with @lrpgraph.register_rule({key}) (see lrpgraph.rules for examples), or assign one "
            f"with a Composite override")


@dataclass
class Recording:
    """Values kept by :func:`record`: ``values[node]`` for kept nodes and all non-tensors,
    ``shapes[node]`` for every tensor (a tuple of shapes for tuple outputs)."""

    values: Dict[fx.Node, Any]
    shapes: Dict[fx.Node, Any]
    output: Any
    batch_size: int


def _shape_of(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.shape
    if isinstance(v, (tuple, list)) and any(isinstance(e, Tensor) for e in v):
        return tuple(_shape_of(e) for e in v)
    return None


def _is_tensorish(v: Any) -> bool:
    return isinstance(v, Tensor) or (isinstance(v, (tuple, list)) and any(isinstance(e, Tensor) for e in v))


def record(plan: Plan, inputs: List[Any], observe: Optional[Callable[[fx.Node, Any, Dict[fx.Node, Any]], None]] = None
           ) -> Recording:
    """Run the graph once on ``inputs`` (one per placeholder), keeping what the rules need.
    ``observe(node, value, env)``, if given, is called after every computed node, before anything
    is freed (forward diagnostics such as :mod:`lrpgraph.residuals` read values there)."""
    missing = plan.placeholders[len(inputs):]
    if missing and all(p.args for p in missing):  # trailing inputs with defaults (timm: attn_mask=None)
        inputs = list(inputs) + [p.args[0] for p in missing]
    if len(inputs) != len(plan.placeholders):
        names = ", ".join(p.target for p in plan.placeholders)
        raise ValueError(f"the traced model takes {len(plan.placeholders)} input(s) ({names}); got {len(inputs)}")
    gm = plan.gm
    env: Dict[fx.Node, Any] = {}
    values: Dict[fx.Node, Any] = {}
    shapes: Dict[fx.Node, Any] = {}
    it = iter(inputs)
    out = None
    batch = inputs[0].shape[0] if isinstance(inputs[0], Tensor) and inputs[0].dim() > 0 else 1
    load = lambda a: fx.node.map_arg(a, lambda n: env[n])  # noqa: E731
    with torch.no_grad():
        for node in plan.nodes:
            op = node.op
            if op == "placeholder":
                val = next(it)
            elif op == "get_attr":
                val = _fetch_attr(gm, node.target)
            elif op == "output":
                out = load(node.args[0])
                break
            else:
                try:
                    val = _run(plan, node, env)
                except Exception as exc:
                    what = describe_target(node.op, node.target, plan.modules.get(node))
                    mod = node.meta.get("lrp_module")
                    where = f" in module `{mod[0]}`" if mod else ""
                    raise RuntimeError(f"node `{node.name}` ({what}){where} failed: {type(exc).__name__}: {exc}") from exc
            env[node] = val
            if observe is not None:
                observe(node, val, env)
            shp = _shape_of(val)
            if shp is not None:
                shapes[node] = shp
            if node in plan.keep or not _is_tensorish(val):
                values[node] = val
            for dead in plan.free_after.get(node, ()):
                env.pop(dead, None)
    return Recording(values=values, shapes=shapes, output=out, batch_size=batch)


def _run(plan: Plan, node: fx.Node, env: Dict[fx.Node, Any]) -> Any:
    load = lambda a: fx.node.map_arg(a, lambda n: env[n])  # noqa: E731
    args, kwargs = load(node.args), load(node.kwargs)
    if node.op == "call_module":
        mod = plan.modules[node]
        if getattr(mod, "inplace", False) and args and isinstance(args[0], Tensor):
            args = (args[0].clone(),) + tuple(args[1:])  # never overwrite a recorded value
        return mod(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    return getattr(args[0], node.target)(*args[1:], **kwargs)  # call_method


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def batch_axes(plan: Plan, inputs: List[Any], rec: Recording) -> Optional[Dict[fx.Node, Any]]:
    """For every tensor node: the axis of its value that holds the batch (``None`` if none), a
    tuple of such for tuple values. An axis where the batch is merged with another one, batch-major
    (size ``B * m``), counts as the batch axis too. ``None`` when the probe cannot run (the report then guesses).

    Why: the conservation report sums relevance per sample, and a guess by size fails wherever
    another axis has the batch's size (timm's qkv tensor ``(3, B, H, N, d)`` at batch 3). The
    probe re-runs the graph on fake tensors (no memory, no compute) with a batch size that no
    recorded axis has; the axes that follow it are the batch axes.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    batch = rec.batch_size
    sizes = set()
    for shp in rec.shapes.values():
        for s in _flat_shapes(shp):
            sizes.update(int(d) for d in s)
    probe = batch + 1
    while probe in sizes:
        probe += 1
    env: Dict[fx.Node, Any] = {}
    it = iter(inputs)
    try:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        mode.cache_enabled = False  # its cache is class-level: inputs of many shapes would grow it forever
        with torch.no_grad(), mode:
            for node in plan.nodes:
                if node.op == "placeholder":
                    v = next(it, None)
                    if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch:
                        v = torch.empty((probe,) + tuple(v.shape[1:]), dtype=v.dtype, device=v.device)
                    env[node] = v
                elif node.op == "get_attr":
                    env[node] = _fetch_attr(plan.gm, node.target)
                elif node.op == "output":
                    break
                else:
                    env[node] = _run(plan, node, env)
    except Exception:  # data-dependent shapes, ops without fake support: fall back to the guess
        return None

    def axis(real, fake) -> Any:
        if real is None or fake is None:
            return None
        if _multi(real):  # a tuple value, possibly nested (an LSTM's (out, (h, c)))
            return tuple(axis(r, f) for r, f in zip(real, fake)) if _multi(fake) else None
        hits = [d for d, (r, f) in enumerate(zip(real, fake)) if r == batch and f == probe]
        if not hits:  # the batch merged with another axis, batch-major (windows of a Swin, B * N rows)
            hits = [d for d, (r, f) in enumerate(zip(real, fake))
                    if r != f and r % batch == 0 and f % probe == 0 and r // batch == f // probe]
        return hits[0] if len(hits) == 1 else None

    out: Dict[fx.Node, Any] = {}
    for node, shp in rec.shapes.items():
        fake = _shape_of(env.get(node))
        if fake is not None:
            out[node] = axis(shp, fake)
    return out


def _flat_shapes(shape: Any):
    """Every tensor shape in a recorded shape (nested tuples of shapes for tuple values)."""
    if _multi(shape):
        for s in shape:
            yield from _flat_shapes(s)
    elif shape is not None:
        yield shape


def _multi(shape: Any) -> bool:
    """A recorded shape of a tuple value (a tuple of shapes), not a tensor's ``torch.Size``."""
    return isinstance(shape, tuple) and not isinstance(shape, torch.Size)
