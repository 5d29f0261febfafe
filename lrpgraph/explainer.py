"""The public face: :class:`Explainer` traces once and explains batches; :func:`explain` is the
one-call form. Data flows one way: trace -> passes -> plan -> record -> walk -> report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor, fx, nn

from .canonize import fold_batchnorm
from .checks import NonFiniteError, check_hooks, check_input, check_logits, first_nonfinite, nonfinite_error
from .passes import normalise
from .heads import attention_nodes, collect, head_keep
from .record import NoRuleError, batch_axes, compile_plan, record
from .residuals import ForwardSums
from .registry import Composite, get_composite
from .report import ConservationReport, NodeBalance
from .rule import Scratch, describe_target
from .export import ExportTraces
from .trace import TRACE_LOCK, LRPTraceError, trace
from .walk import walk

TargetLike = Union[None, int, Sequence[int], Tensor]


@dataclass
class Explanation:
    """The result of one explained batch.

    Attributes:
        relevance: input relevance shaped like ``x`` (``(B, *x.shape[1:])``), or
            ``(B, T, *x.shape[1:])`` when ``T`` targets per sample were given as a ``(B, T)`` target.
        logits: the model output ``(B, C)``.
        target: the explained class per sample, ``(B,)`` or ``(B, T)``.
        preset: name of the rule preset.
        latent: relevance at the nodes named in ``keep`` (``(K, ...)``, K = relevance passes).
        absorbed: relevance absorbed by parameters and constants, per node name.
        heads: relevance per attention head and of each attention map, with ``heads=True``
            (:mod:`lrpgraph.heads`).

    With the report (the default), ``graph()``, ``residuals()`` and ``sinks()`` give the
    conservation debugger's views (:mod:`lrpgraph.graph`, :mod:`lrpgraph.residuals`, :mod:`lrpgraph.sinks`).
    """

    relevance: Tensor
    logits: Tensor
    target: Tensor
    preset: str
    latent: Dict[str, Any] = field(default_factory=dict)
    absorbed: Dict[str, Any] = field(default_factory=dict)
    _rows: List[NodeBalance] = field(default_factory=list, repr=False)
    sign_split: bool = False
    heads: Dict[str, Any] = field(default_factory=dict)
    # debugger data (report=True): walk edges, the plan, shapes and residual forward sums by node name
    _edges: List[tuple] = field(default_factory=list, repr=False)
    _plan: Any = field(default=None, repr=False)
    _shapes: Dict[str, Any] = field(default_factory=dict, repr=False)
    _forward: Dict[str, Tensor] = field(default_factory=dict, repr=False)

    def conservation(self) -> ConservationReport:
        """Per-node relevance in and out, before any normalisation (see :mod:`lrpgraph.report`)."""
        return ConservationReport(list(self._rows), preset=self.preset, masses=self.sign_split,
                                  residuals=self.residuals() if self._plan is not None else [])

    def graph(self, tol: float = 1e-5, level: int = 1):
        """The conservation debugger as a ``networkx.DiGraph`` (see :mod:`lrpgraph.graph`)."""
        from .graph import build
        return build(self, tol=tol, level=level)

    def residuals(self) -> list:
        """Forward cancellation C and backward amplification A at every residual addition
        (see :mod:`lrpgraph.residuals`)."""
        from .residuals import residuals
        return residuals(self)

    def sinks(self) -> Dict[str, Any]:
        """Relevance kept by named sinks, per kind (``(K, B)`` arrays and ``"total"``; see
        :mod:`lrpgraph.sinks`)."""
        from .sinks import by_kind
        return by_kind(self)


class Explainer:
    """Trace ``model`` once and explain batches with a rule preset.

    Args:
        model: any module that ``torch.fx`` or ``torch.export`` can trace, in eval mode. It is never
            modified: the traced graph shares its parameters, and every rewrite happens on
            lrpgraph's own copy of the graph.
        rules: a preset name (``"abslrp"``, ``"abslrp-renorm"``, ``"lrp-0"``, ``"lrp-epsilon"``,
            ``"lrp-gamma"``, ``"lrp-alpha1beta0"``, ``"lrp-alpha2beta1"``, ``"epsilon-plus-flat"``,
            ``"epsilon-gamma-box"``) or a :class:`~lrpgraph.registry.Composite`.
        leaf_modules: module qualnames or types to keep as single nodes (they need a rule).
        concrete_args: passed to ``torch.fx`` for arguments that drive control flow.
        output: which model output holds the logits when the model returns a tuple/list (an index)
            or a dict (a key); default the first element, or ``"logits"`` for dicts.
        zero_bias: explain as if every bias were zero (layers' biases, BatchNorm's shift and
            running mean): the standard check of a rule's conservation. Works on a copy; the
            model is not modified (see :func:`lrpgraph.sinks.zero_bias_copy`).
        tracer: ``"fx"`` (symbolic tracing, once, here), ``"export"`` (``torch.export`` on the
            first batch; the batch size, and the length of token ids, stay dynamic where the model
            allows, else a new input shape is exported again; see :mod:`lrpgraph.export`) or ``"auto"`` (the default: fx, and export where fx
            cannot trace the model, e.g. data-dependent control flow).

    Example::

        ex = lrpgraph.Explainer(model, rules="abslrp")
        e = ex(images, target=labels)
        heat = e.relevance.sum(1)            # (B, H, W)
        print(e.conservation().table())

    An Explainer keeps scratch buffers for its rules between calls (about one block's temporaries;
    330 MB for ViT-B/16 at batch 8), so that a second call does not page-fault them in again.
    ``del`` it to free them. It is not thread-safe: use one Explainer per thread.
    """

    def __init__(self, model: nn.Module, rules: Union[str, Composite] = "abslrp", *,
                 leaf_modules: Iterable[Any] = (), concrete_args: Optional[Dict[str, Any]] = None,
                 output: Union[int, str, None] = None, zero_bias: bool = False,
                 tracer: str = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if tracer not in ("auto", "fx", "export"):
            raise ValueError(f"tracer must be 'auto', 'fx' or 'export', got {tracer!r}")
        if tracer == "export" and concrete_args:
            raise ValueError("concrete_args apply to the fx tracer only; torch.export follows the "
                             "model's control flow on the example batch itself")
        self.model = model
        self.composite = get_composite(rules)
        self.zero_bias = zero_bias
        if zero_bias:
            from .sinks import zero_bias_copy
            model = zero_bias_copy(model)
        self._output = output
        # the rules' temporary buffers, kept between calls: a second call reuses the memory
        # instead of page-faulting it in again (about one block's temporaries stay allocated)
        self._scratch = Scratch()
        self._axes: dict = {}  # input signature -> batch axis per node (for the report)
        self.graph_module: Optional[fx.GraphModule] = None
        self.plan = None
        self._start_node: Optional[fx.Node] = None
        self._exports: Optional[ExportTraces] = None
        fx_error = None
        if tracer != "export":
            try:
                gm = trace(model, self.composite.has_rule, leaf_modules, concrete_args)
            except LRPTraceError as exc:
                if tracer == "fx":
                    raise
                fx_error = exc
            else:
                self.graph_module, self.plan, self._start_node, self._axes = self._prepare(gm)
                check_hooks(self.model, self._leaves())
        if self.plan is None:  # traced per input signature, on the first batch of each
            self._exports = ExportTraces(model, self.composite.has_rule, leaf_modules, self._prepare, fx_error)

    @property
    def tracer(self) -> str:
        """Which tracer serves this Explainer: ``"fx"`` or ``"export"``."""
        return "fx" if self._exports is None else "export"

    def _prepare(self, gm: fx.GraphModule) -> tuple:
        """Passes, BatchNorm folding and the plan of a traced graph: (graph, plan, logits node, axes)."""
        gm = normalise(gm)
        if self.composite.canonize:
            fold_batchnorm(gm)
        plan = compile_plan(gm, self.composite)
        start = self._output_node(plan, self._output)
        plan.keep.add(start)  # the logits are always kept
        return gm, plan, start, {}

    def _leaves(self) -> set:
        """Qualnames of the modules that run as single graph nodes (their hooks run as usual)."""
        return {n.target for n in self.graph_module.graph.nodes if n.op == "call_module"}

    @property
    def preset(self) -> str:
        return self.composite.name

    def _output_node(self, plan, output) -> fx.Node:
        res = plan.output_node.args[0]
        if isinstance(res, fx.Node):
            if output not in (None, 0):
                raise ValueError(f"the model returns a single tensor; output={output!r} does not apply")
            return res
        if isinstance(res, (tuple, list)):
            i = 0 if output is None else output
            if not isinstance(i, int) or not -len(res) <= i < len(res):
                raise ValueError(f"output={output!r}: the model returns {len(res)} values; give an index")
            node = res[i]
        elif isinstance(res, dict):
            key = output if output is not None else ("logits" if "logits" in res else None)
            if key not in res:
                raise ValueError(f"the model returns a dict with keys {sorted(res)}; say which holds "
                                 f"the logits with Explainer(..., output=KEY)")
            node = res[key]
        else:
            raise ValueError(f"unsupported model output structure {type(res).__name__}")
        if not isinstance(node, fx.Node):
            raise ValueError(f"the selected model output ({output!r}) is not a traced tensor")
        return node

    def coverage(self) -> List[tuple]:
        """``(node, op, rule name or "MISSING")`` for every computing node of the traced graph, in
        forward order: which rule each op gets under this preset, before anything is run (with the
        export tracer: of the graph of the last explained batch)."""
        if self.plan is None:
            raise RuntimeError("this Explainer uses torch.export, which traces on the first batch: "
                               "call it once on an input before asking for coverage()")
        rows = []
        for n in self.plan.nodes:
            if n.op not in ("call_module", "call_function", "call_method"):
                continue
            what = describe_target(n.op, n.target, self.plan.modules.get(n))
            rule = self.plan.rules.get(n)
            rows.append((n.name, what, rule.name if rule is not None else
                         ("MISSING" if n in self.plan.live else "constant")))
        return rows

    def __call__(self, x: Tensor, target: TargetLike = None, *, contrastive: bool = True,
                 output_relevance: Optional[Tensor] = None, extra_inputs: Sequence[Any] = (),
                 report: bool = True, keep: Optional[Iterable[str]] = None, heads: bool = False) -> Explanation:
        """Explain a batch.

        Args:
            x: the input batch ``(B, ...)``; dim 0 is the batch.
            target: class per sample (an int for all, a sequence or ``(B,)`` tensor, or ``(B, T)``
                for T targets per sample in one batched pass); ``None`` explains the predicted class.
            contrastive: the preset's contrastive start (absLRP: target against all other classes).
            output_relevance: start from this relevance at the output instead (``(B, *out)`` or
                ``(K, B, *out)``); ``target`` and ``contrastive`` are then ignored.
            extra_inputs: values for further placeholders of the traced model (masks, ids).
            report: collect the conservation statistics (cheap; off for the fastest runs).
            keep: node names whose incoming relevance is returned in ``Explanation.latent``.
            heads: collect relevance per attention head in ``Explanation.heads`` (:mod:`lrpgraph.heads`).
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[0] < 1:
            raise ValueError(f"x must have a batch dimension with at least one sample, got shape {tuple(x.shape)}")
        _check_eval(self.model)
        if self._exports is not None:  # the export trace of this input signature (made on first sight)
            self.graph_module, self.plan, self._start_node, self._axes = self._exports.get([x, *extra_inputs])
        check_hooks(self.model, self._leaves())
        check_input(x)
        fwd = ForwardSums(self.plan, x.shape[0]) if report else None  # residual ratio C
        try:
            with TRACE_LOCK.running():  # never while fx patches process-wide state for a trace
                rec = record(self.plan, [x, *extra_inputs], observe=fwd)
        except (NoRuleError, ValueError):
            raise
        except Exception as exc:
            raise ValueError(self._forward_error(x, exc)) from exc
        logits = _value_at(rec, self._start_node)
        check_logits(logits)
        if output_relevance is not None:
            start = output_relevance.to(logits.dtype)
            if start.shape == logits.shape:
                start = start.unsqueeze(0)
            if tuple(start.shape[1:]) != tuple(logits.shape):
                raise ValueError(f"output_relevance has shape {tuple(output_relevance.shape)}; the output "
                                 f"is {tuple(logits.shape)} (give (B, ...) or (K, B, ...))")
            tgt = torch.empty(0, dtype=torch.long)
            finish, T, multi = (lambda r, T, c: r), start.shape[0], start.shape[0] > 1
        else:
            if logits.dim() != 2:
                raise ValueError(f"the model output has shape {tuple(logits.shape)}; class targets need "
                                 "(B, C) logits. Pass output_relevance=... to start from any output")
            tgt, multi = _targets(target, logits)
            T = tgt.shape[1]
            start = self.composite.start.init(logits, tgt, contrastive)
            finish = self.composite.start.finish
        with torch.no_grad():  # explicit tensor maths only: no autograd graph is built
            with TRACE_LOCK.running():
                # the batch axes: the report sums per sample, and rules conserve per sample where
                # the batch is merged with windows (probed once per input signature)
                axes = self._batch_axes([x, *extra_inputs], rec)
            keep_set = set(keep) if keep is not None else None
            attn = attention_nodes(self.plan, rec.shapes) if heads else []
            if attn:
                keep_set = (keep_set or set()) | head_keep(attn)
            shapes = {n.name: s for n, s in rec.shapes.items()} if report else {}
            res = walk(self.plan, rec, self._start_node, start, report=report, scratch=self._scratch, axes=axes,
                       keep=keep_set)
        bad = first_nonfinite(res["balance"]) if report else None
        if bad is not None:
            raise nonfinite_error(bad, ConservationReport(res["balance"], preset=self.preset,
                                                          masses=self.composite.start.name == "signed"))
        kept = res["kept"]
        head_figs = collect(kept, attn) if attn else {}
        if attn:
            kept = {k: v for k, v in kept.items() if keep is not None and k in set(keep)}
        r_in = res["inputs"][0]
        if r_in is None:
            r_in = torch.zeros((start.shape[0],) + tuple(x.shape), dtype=logits.dtype, device=x.device)
        rel = finish(r_in, T, contrastive)
        out_dtype = x.dtype if x.is_floating_point() else rel.dtype
        if not bool(torch.isfinite(rel).all()):
            if not report:  # explain again with the report, which names the first non-finite node
                self(x, target, contrastive=contrastive, output_relevance=output_relevance,
                     extra_inputs=extra_inputs, report=True)
            raise NonFiniteError("the input relevance holds NaN or Inf; the explanation would be wrong")
        rel = rel.to(out_dtype)
        rel = rel.movedim(0, 1) if multi else rel[0]
        if output_relevance is None and not multi:
            tgt = tgt[:, 0]
        return Explanation(relevance=rel, logits=logits, target=tgt, preset=self.preset,
                           latent=kept, absorbed=res["absorbed"], _rows=res["balance"],
                           sign_split=self.composite.start.name == "signed", heads=head_figs,
                           _edges=res.get("edges", []), _plan=self.plan if report else None, _shapes=shapes,
                           _forward=fwd.sums if fwd is not None else {})

    def _batch_axes(self, inputs: List[Any], rec) -> Optional[dict]:
        """The batch axis of every node for the report, probed once per input signature."""
        sig = tuple((tuple(v.shape), v.dtype, v.device) if isinstance(v, Tensor) else type(v) for v in inputs)
        if sig not in self._axes:
            if len(self._axes) >= 16:  # bounded: text inputs come in many lengths
                del self._axes[next(iter(self._axes))]
            self._axes[sig] = batch_axes(self.plan, inputs, rec)
        return self._axes[sig]

    def _forward_error(self, x: Tensor, exc: Exception) -> str:
        return (f"the model's forward failed on an input of shape {tuple(x.shape)}, dtype {x.dtype}, "
                f"device {x.device}: {exc}\n  fix: check the input's shape, dtype and device against "
                "what the model expects")


def _value_at(rec, node: fx.Node) -> Tensor:
    v = rec.values.get(node)
    if v is None:
        raise RuntimeError("internal: the output node's value was not recorded")
    return v


def _check_eval(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if m.training:
            what = f"module `{name}` ({type(m).__qualname__})" if name else f"the model ({type(model).__qualname__})"
            raise RuntimeError(f"{what} is in training mode; call model.eval() before explaining "
                               "(lrpgraph never changes the model's mode)")


def _targets(target: TargetLike, logits: Tensor):
    """Normalise ``target`` to a ``(B, T)`` long tensor; returns (tensor, multi-target?)."""
    B, C = logits.shape
    if target is None:
        t = logits.argmax(dim=1, keepdim=True)
        return t, False
    if isinstance(target, bool) or isinstance(target, (str, bytes)):
        raise ValueError(f"target must hold integer class indices (an int, a sequence or a tensor), got {target!r}")
    if isinstance(target, int):
        if not 0 <= target < C:
            raise ValueError(f"target {target} is out of range for {C} classes")
        t = torch.full((B, 1), target, dtype=torch.long, device=logits.device)
        multi = False
    else:
        try:
            t = torch.as_tensor(target, device=logits.device)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise ValueError(f"target must hold integer class indices in [0, {C}), got {target!r}: {exc}") from exc
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"target must hold integer class indices, got dtype {t.dtype}")
        t = t.long()
        if t.dim() == 0:
            t = t.expand(B)
        if t.dim() == 1:
            if t.shape[0] != B:
                raise ValueError(f"target has {t.shape[0]} entries for a batch of {B}")
            t, multi = t.unsqueeze(1), False
        elif t.dim() == 2:
            if t.shape[0] != B:
                raise ValueError(f"target has shape {tuple(t.shape)}; expected (B={B}, T)")
            if t.shape[1] == 0:
                raise ValueError(f"target has shape {tuple(t.shape)}: no targets to explain (give T >= 1)")
            multi = True
        else:
            raise ValueError(f"target must be an int, (B,) or (B, T); got shape {tuple(t.shape)}")
    bad = (t < 0) | (t >= C)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"target {int(t[bad][0])} is out of range for {C} classes (sample {i})")
    return t, multi


def explain(model: nn.Module, x: Tensor, target: TargetLike = None, rules: Union[str, Composite] = "abslrp",
            contrastive: bool = True, tracer: str = "auto") -> Tensor:
    """Explain ``model`` on ``x``: relevance shaped like ``x`` (``(B, T, ...)`` for ``(B, T)`` targets),
    on ``x``'s device and dtype. Traces the model on every call; use :class:`Explainer` to reuse
    the trace, to get the logits and targets, or to read the conservation report.

    Args:
        model: an ``nn.Module`` in eval mode that ``torch.fx`` or ``torch.export`` can trace; it is
            never modified.
        x: the input batch ``(B, ...)``, dim 0 the batch; float32, float64 or bfloat16 (float16
            is refused), finite (a NaN or Inf sample is an error naming it).
        target: the class to explain per sample: ``None`` (the predicted class), an int for all
            samples, a sequence or ``(B,)`` tensor, or a ``(B, T)`` tensor for ``T`` targets per
            sample in one batched pass.
        rules: a preset name (``lrpgraph presets`` lists them; default ``"abslrp"``) or a
            :class:`~lrpgraph.registry.Composite`.
        contrastive: start from the target against the other classes (absLRP: +1 on the target,
            -1/(C-1) elsewhere; classic presets subtract the other logits' mean); ``False``
            explains the target logit alone.
        tracer: ``"auto"`` (fx, and ``torch.export`` where fx cannot trace the model), ``"fx"`` or
            ``"export"`` (see :class:`Explainer`).

    Returns:
        The input relevance, a tensor like ``x`` (``(B, T, *x.shape[1:])`` for ``(B, T)`` targets).

    Raises:
        NoRuleError: an op of the model has no rule in the preset (the node is named).
        NonFiniteError: NaN or Inf in ``x``, the logits or the relevance (the first node is named).
        LRPTraceError: the model cannot be traced (the module is named, with the fix).
    """
    return Explainer(model, rules=rules, tracer=tracer)(x, target, contrastive=contrastive, report=False).relevance
