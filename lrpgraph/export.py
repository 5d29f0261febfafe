"""The ``torch.export`` tracer: models that ``torch.fx`` cannot trace, as the same kind of graph.

``torch.fx`` traces symbolically and fails on data-dependent control flow (a shape check such as
``if x.shape[-1] < k`` in timm's ``ConvMlp``, Hugging Face's argument checks). ``torch.export``
traces with real (fake) tensors, so it follows such code, and records an ATen graph. lrpgraph turns
that graph back into the form its rules, passes and report know:

1. export with the batch dim dynamic where the model allows (``Dim.AUTO``; a model that fixes its
   batch size is exported static), as the training IR, which keeps high-level ops such as
   ``linear``, ``conv2d``, ``layer_norm`` and ``scaled_dot_product_attention`` (in-place ops are
   lifted to their out-of-place twins, as the ``fx`` path's passes do; functionalising with
   ``run_decompositions`` measured 2x the export's own time on a small BERT);
2. the ops of every module that has a rule (the modules ``torch.fx`` would keep as leaves: Conv,
   Linear, BatchNorm, LayerNorm, activations, pools...) are collapsed back into one ``call_module``
   node that calls the model's own module, found by the module path in the node's
   ``nn_module_stack``; so BatchNorm folding, ``by_type`` and ``first_layer`` overrides and
   module rules work as on the ``fx`` path;
3. every other ATen op is lifted to its torch-level twin (:mod:`lrpgraph.aten`), so it gets the
   same rule as on the ``fx`` path;
4. nodes are named after their module path (``blocks_3_attn_matmul``, ``features_0``), and
   ``node.meta["lrp_module"]`` keeps the dotted path and type for error messages;
5. the rebuilt graph is run once on the example input and must reproduce the model's output.

The graph shares the model's parameters and modules; the model is never modified.
"""
from __future__ import annotations

import operator
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, fx, nn

from . import aten as A
from .hop import WrapperError, inline_wrappers
from .passes import normalise
from .trace import TRACE_LOCK, LRPTraceError

_ASSERTS = ("_assert", "sym_constrain_range")


class ExportTraceError(LRPTraceError):
    """``torch.export`` could not capture the model, or its graph could not be rebuilt."""


def export_graph(model: nn.Module, inputs: List[Any], has_rule: Callable[[nn.Module], bool],
                 leaf_modules: Iterable[Any] = (), dims: Tuple[int, ...] = (0,)) -> Tuple[fx.GraphModule, bool]:
    """Export ``model`` on ``inputs`` and rebuild the graph for lrpgraph (see module doc).

    ``dims``: the dims exported as dynamic where the model allows (``Dim.AUTO``): dim 0 of every
    input with the first input's batch size; further dims (a text model's sequence length) of the
    inputs that share the first input's size there. Returns ``(graph_module, dynamic)``;
    ``dynamic`` says whether the batch dim stayed symbolic (then the graph serves any batch
    size). Raises :class:`ExportTraceError`.
    """
    bad = [type(v).__name__ for v in inputs if not isinstance(v, Tensor)]
    if bad:
        raise ExportTraceError(f"the export tracer takes tensor inputs only; got {', '.join(bad)} "
                               "(pass tensors, or give further arguments defaults in the model)")
    args = tuple(inputs)
    ref = inputs[0].shape
    dyn = tuple({d: torch.export.Dim.AUTO for d in dims if d < min(v.dim(), len(ref)) and v.shape[d] == ref[d]}
                or None for v in inputs)
    try:
        with torch.no_grad(), TRACE_LOCK.tracing():  # one trace at a time in the process
            ep = torch.export.export(model, args, dynamic_shapes=dyn, strict=False)
    except Exception as exc:
        raise ExportTraceError(f"torch.export failed: {type(exc).__name__}: {_short(exc)}") from exc
    src = ep.module()
    try:
        inline_wrappers(src)  # context-manager regions (autocast off, grad mode): their ops in line
    except WrapperError as exc:
        raise ExportTraceError(str(exc)) from exc
    written = _written_state(src)
    if written:
        raise ExportTraceError(f"the model's forward writes to {', '.join(written)}; lrpgraph never "
                               "modifies the model or its inputs: explain a copy whose forward does not")
    gm = rebuild(src, model, has_rule, leaf_modules)
    _verify(gm, model, args)
    dynamic = any(isinstance(p.meta.get("val"), Tensor) and p.meta["val"].dim() > 0
                  and isinstance(p.meta["val"].shape[0], torch.SymInt)
                  for p in gm.graph.nodes if p.op == "placeholder")
    return gm, dynamic


def _written_state(gm: fx.GraphModule) -> List[str]:
    """Parameters, buffers and inputs that an in-place op of the graph writes to (directly or
    through a view): running the model would change them."""
    root: Dict[fx.Node, str] = {}
    out: List[str] = []
    for n in gm.graph.nodes:
        if n.op in ("get_attr", "placeholder"):
            root[n] = str(n.target)
            continue
        schema = getattr(n.target, "_schema", None)
        if schema is None:
            continue
        for i, arg in enumerate(schema.arguments):
            info = arg.alias_info
            if info is None or i >= len(n.args) or not isinstance(n.args[i], fx.Node) or n.args[i] not in root:
                continue
            if info.is_write:
                out.append(root[n.args[i]])
            elif not arg.kwarg_only:  # a view of a parameter, buffer or input
                root[n] = root[n.args[i]]
    return sorted(set(out))


def _short(exc: Exception, lines: int = 12) -> str:
    text = str(exc).strip().splitlines()
    return "\n".join(text[:lines]) + ("\n  ..." if len(text) > lines else "")


def module_of(node: fx.Node) -> Optional[Tuple[str, str]]:
    """``(dotted path, type name)`` of the innermost module that ran ``node`` (``None`` at the top)."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, typ in reversed(list(stack.values())):
        if path and not path.startswith("_"):
            return path, (typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ)))
    return None


def _is_leaf(m: nn.Module, path: str, has_rule, names: set, types: tuple) -> bool:
    if path in names or (types and isinstance(m, types)):
        return True
    if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    return has_rule(m)


def _leaf_keys(nodes: List[fx.Node], model: nn.Module, has_rule, leaf_modules) -> Dict[fx.Node, tuple]:
    """For each node run inside a leaf module (outermost module with a rule): ``(call key, path)``."""
    names = {m for m in leaf_modules if isinstance(m, str)}
    types = tuple(m for m in leaf_modules if isinstance(m, type))
    memo: Dict[str, bool] = {}
    out: Dict[fx.Node, tuple] = {}
    for n in nodes:
        if n.op != "call_function":
            continue
        for key, (path, _) in (n.meta.get("nn_module_stack") or {}).items():
            if not path or path.startswith("_"):
                continue
            if path not in memo:
                try:
                    memo[path] = _is_leaf(model.get_submodule(path), path, has_rule, names, types)
                except AttributeError:
                    memo[path] = False
            if memo[path]:
                out[n] = (key, path)
                break
    return out


def _is_tensor_node(n: Any) -> bool:
    return isinstance(n, fx.Node) and isinstance(n.meta.get("val"), Tensor)


def _collapsible(nodes: List[fx.Node], keys: Dict[fx.Node, tuple]) -> Dict[fx.Node, tuple]:
    """``{output node of a leaf call: (input node, path, members)}`` for leaf calls with one tensor
    input and one output (the others, e.g. tuple outputs, stay lifted op by op)."""
    groups: Dict[tuple, List[fx.Node]] = OrderedDict()
    for n in nodes:
        if n in keys:
            groups.setdefault(keys[n], []).append(n)
    out: Dict[fx.Node, tuple] = {}
    for (key, path), members in groups.items():
        mset = set(members)
        ins = list(OrderedDict.fromkeys(i for m in members for i in m.all_input_nodes
                                        if i not in mset and i.op != "get_attr" and _is_tensor_node(i)))
        outs = [m for m in members if any(u not in mset for u in m.users)]
        if len(ins) == 1 and len(outs) == 1 and _is_tensor_node(outs[0]):
            out[outs[0]] = (ins[0], path, mset)
    return out


def rebuild(src: fx.GraphModule, model: nn.Module, has_rule: Callable[[nn.Module], bool],
            leaf_modules: Iterable[Any] = ()) -> fx.GraphModule:
    """lrpgraph's graph from an exported ``src`` (``ExportedProgram.module()``); see module doc."""
    src.graph.eliminate_dead_code()
    nodes = list(src.graph.nodes)
    collapse = _collapsible(nodes, _leaf_keys(nodes, model, has_rule, leaf_modules))
    inside = set().union(*(c[2] for c in collapse.values())) if collapse else set()
    g = fx.Graph()
    env: Dict[fx.Node, Any] = {}
    first_of: set = set()  # lifted nodes that return element 0 of the ATen op's tuple
    root: Dict[str, Any] = {}
    out_node = None
    for n in nodes:
        if n.op == "placeholder":
            env[n] = g.placeholder(n.name)
            env[n].meta["val"] = n.meta.get("val")
        elif n.op == "get_attr":
            target = f"_attrs.{n.name}"
            root[target] = _fetch(src, n.target)
            env[n] = g.get_attr(target)
            env[n].meta["lrp_source"] = n.target
            env[n].meta["val"] = n.meta.get("val")
        elif n.op == "call_module":
            continue  # export's input guards (`_guards_fn`): the trace is keyed on the signature instead
        elif n.op == "output":
            out_node = n
        elif n in collapse:
            x, path, _ = collapse[n]
            root[path] = model.get_submodule(path)
            env[n] = g.create_node("call_module", path, (env[x],), {}, name=path.replace(".", "_"))
            _meta(env[n], n, (path, type(root[path]).__qualname__))
        elif n in inside:
            continue
        elif _is_assert(n):
            continue
        else:
            env[n] = _lift_node(g, n, env, first_of)
    flat = fx.node.map_arg(out_node.args[0], lambda a: env[a])
    spec = getattr(src, "_out_spec", None)
    g.output(_structure(list(flat), spec) if spec is not None else flat)
    gm = fx.GraphModule(root, g, class_name=f"{type(model).__name__}ExportLRPGraph")
    own = {id(m) for m in model.modules()}
    for m in gm.modules():  # the containers GraphModule created (never the model's own modules)
        if id(m) not in own:
            m.training = False
    gm.graph.lint()
    return gm


def _lift_node(g: fx.Graph, n: fx.Node, env: Dict[fx.Node, Any], first_of: set) -> Any:
    args = fx.node.map_arg(n.args, lambda a: env[a])
    kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
    if n.target is operator.getitem and isinstance(n.args[0], fx.Node) and env[n.args[0]] in first_of:
        if n.args[1] != 0:
            raise ExportTraceError(f"node `{n.name}`: output {n.args[1]} of {n.args[0].target} is used; "
                                   "only the main output is supported")
        return env[n.args[0]]

    def rank(i: int) -> int:
        v = n.args[i].meta.get("val") if isinstance(n.args[i], fx.Node) else None
        return v.dim() if isinstance(v, Tensor) else 0

    lifted = A.lift(n, args, kwargs, rank) if isinstance(n.target, torch._ops.OpOverload) else None
    op, target = (lifted[0], lifted[1]) if lifted else ("call_function", n.target)
    if lifted:
        args, kwargs = lifted[2], lifted[3]
    where = module_of(n)
    base = A.short_name(n.target)
    name = f"{where[0].replace('.', '_')}_{base}" if where else base
    new = g.create_node(op, target, tuple(args), dict(kwargs), name=name)
    _meta(new, n, where)
    if lifted and A.packet_of(n.target) in A.FIRST_OF_TUPLE:
        first_of.add(new)
    return new


def _meta(new: fx.Node, old: fx.Node, where: Optional[Tuple[str, str]]) -> None:
    for k in ("nn_module_stack", "stack_trace", "val"):
        if k in old.meta:
            new.meta[k] = old.meta[k]
    new.meta["lrp_aten"] = str(old.target)
    if where is not None:
        new.meta["lrp_module"] = where


def inherit_module_paths(gm: fx.GraphModule) -> None:
    """Give the nodes that graph passes inserted (explicit attention's matmuls and softmax) the
    module path of the node they compute from, in their name and ``meta["lrp_module"]``."""
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method"):
            continue
        path = n.meta.get("lrp_module")
        if path is None and "lrp_aten" in n.meta:
            continue  # an op of the model's top-level forward: no module
        if path is None:
            src = next((i for i in n.all_input_nodes if "lrp_module" in i.meta), None)
            if src is None:
                continue
            path = n.meta["lrp_module"] = src.meta["lrp_module"]
        prefix = path[0].replace(".", "_") + "_"
        if not n.name.startswith(prefix):
            n._rename(prefix + n.name)
    gm.recompile()


def _is_assert(n: fx.Node) -> bool:
    name = getattr(A.packet_of(n.target), "__name__", "") or getattr(n.target, "__name__", "")
    return not n.users and any(name.split(".")[-1].startswith(p) for p in _ASSERTS)


def _structure(flat: List[Any], spec) -> Any:
    """The output of the exported model as lrpgraph's graph returns it: a node for one tensor, a
    tuple for tuples and lists, a plain dict for dicts and model-output objects (their keys)."""
    it = iter(flat)

    def build(s):
        if s.is_leaf():
            return next(it)
        kids = [build(c) for c in s.children_specs]
        ctx = s.context
        if isinstance(ctx, (list, tuple)) and len(ctx) == len(kids) and all(isinstance(k, str) for k in ctx):
            return dict(zip(ctx, kids))
        return tuple(kids)

    return build(spec)


def _fetch(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _leaves(v: Any) -> List[Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(v) if isinstance(t, Tensor)]


def _verify(gm: fx.GraphModule, model: nn.Module, args: tuple) -> None:
    """The rebuilt graph must reproduce the model's output on the example input."""
    with torch.no_grad():
        want, got = _leaves(model(*args)), _leaves(gm(*args))
    if len(want) != len(got):
        raise ExportTraceError(f"the exported graph returns {len(got)} tensors, the model {len(want)}")
    for i, (w, o) in enumerate(zip(want, got)):
        if w.shape != o.shape or not w.is_floating_point():
            if w.shape != o.shape or not torch.equal(w, o):
                raise ExportTraceError(f"output {i} of the exported graph differs from the model's")
            continue
        tol = 1e-9 if w.dtype == torch.float64 else 1e-3
        err = float((w - o).abs().max()) if w.numel() else 0.0
        scale = float(w.abs().max()) if w.numel() else 0.0
        if not err <= tol * (1.0 + scale):
            raise ExportTraceError(f"output {i} of the exported graph differs from the model's by {err:.3g} "
                                   f"(scale {scale:.3g}); please report this model, and use tracer='fx' "
                                   "with leaf_modules meanwhile")


class ExportTraces:
    """The export traces of one Explainer, the most recent ``limit`` of them. A trace serves every
    input that has its dtypes, devices and ranks and its sizes in the dims the export kept static:
    a change of batch size (or of a token sequence's length) reuses it where the model allows.

    ``prepare(gm)`` turns a rebuilt graph into what the Explainer runs (passes, plan); ``fx_error``
    is the ``torch.fx`` failure that sent the model here, named again if export fails too.
    """

    def __init__(self, model: nn.Module, has_rule: Callable[[nn.Module], bool], leaf_modules: Iterable[Any],
                 prepare: Callable[[fx.GraphModule], Any], fx_error: Optional[Exception] = None, limit: int = 8):
        self.model, self.has_rule, self.leaf_modules = model, has_rule, tuple(leaf_modules)
        self.prepare, self.fx_error, self.limit = prepare, fx_error, limit
        self._cache: List[Tuple[list, Any]] = []  # (pattern per input, prepared trace), newest last
        self.exports = 0  # how many times the model was exported

    @staticmethod
    def _pattern(gm: fx.GraphModule) -> list:
        """Per input: (sizes with ``None`` for dynamic dims, dtype, device) of the exported graph."""
        out = []
        for p in gm.graph.nodes:
            if p.op != "placeholder":
                continue
            v = p.meta.get("val")
            out.append(None if not isinstance(v, Tensor) else
                       (tuple(None if isinstance(d, torch.SymInt) else int(d) for d in v.shape), v.dtype, v.device))
        return out

    @staticmethod
    def _matches(pattern: list, inputs: List[Any]) -> bool:
        if len(pattern) != len(inputs):
            return False
        for pat, v in zip(pattern, inputs):
            if pat is None or not isinstance(v, Tensor):
                return False
            sizes, dtype, device = pat
            if v.dtype != dtype or v.device.type != device.type or v.dim() != len(sizes):
                return False
            if any(s is not None and s != d for s, d in zip(sizes, v.shape)):
                return False
        return True

    def get(self, inputs: List[Any]) -> Any:
        """The prepared trace for ``inputs``, exporting the model when no cached trace serves them."""
        for i, (pattern, entry) in enumerate(self._cache):
            if self._matches(pattern, inputs):
                self._cache.append(self._cache.pop(i))
                return entry
        x = inputs[0]
        # token ids (B, N): the sequence length may stay dynamic too
        dims = (0, 1) if isinstance(x, Tensor) and x.dim() == 2 and not x.is_floating_point() else (0,)
        try:
            gm, _ = export_graph(self.model, inputs, self.has_rule, self.leaf_modules, dims=dims)
        except ExportTraceError as exc:
            if self.fx_error is None:
                raise
            raise ExportTraceError(f"cannot trace the model with torch.fx nor with torch.export.\n"
                                   f"torch.fx: {self.fx_error}\ntorch.export: {exc}") from exc
        self.exports += 1
        pattern = self._pattern(gm)
        gm = normalise(gm)  # the passes first, so that the nodes they insert get module paths too
        inherit_module_paths(gm)
        entry = self.prepare(gm)
        self._cache.append((pattern, entry))
        del self._cache[:-self.limit]
        return entry
