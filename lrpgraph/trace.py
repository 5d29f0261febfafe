"""Tracing a model into a ``torch.fx`` graph, with a leaf policy driven by the rule registry.

Modules whose type has a rule stay single ``call_module`` nodes; containers (``nn.Sequential``,
timm blocks, user modules) are traced through, so their residual additions and functional ops
become visible nodes. When tracing fails, the error names the innermost module being traced and
says how to make it a leaf.
"""
from __future__ import annotations

import copy
import threading
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from torch import fx, nn


class _TraceLock:
    """Process-wide reader/writer lock around ``torch.fx`` tracing.

    Why: fx patches process-wide state while it traces (``nn.Module.__call__`` and friends). Two
    traces at once can leave the patches half undone (every later ``model(x)`` then fails), and a
    forward that runs during a trace is intercepted by the tracer. Tracing is the writer; lrpgraph's
    own forwards (recording, the batch-axis probe) are readers, so they never overlap a trace but
    run in parallel with each other.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: Optional[int] = None  # thread id of the tracing thread
        self._depth = 0

    @contextmanager
    def tracing(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer != me:  # re-entrant for the tracing thread
                self._cond.wait_for(lambda: self._writer is None and self._readers == 0)
                self._writer = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if self._depth == 0:
                    self._writer = None
                    self._cond.notify_all()

    @contextmanager
    def running(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            mine = self._writer == me  # a forward inside this thread's own trace
            if not mine:
                self._cond.wait_for(lambda: self._writer is None)
                self._readers += 1
        try:
            yield
        finally:
            if not mine:
                with self._cond:
                    self._readers -= 1
                    self._cond.notify_all()


TRACE_LOCK = _TraceLock()


class LRPTraceError(RuntimeError):
    """The model could not be traced by ``torch.fx``."""


class LRPTracer(fx.Tracer):
    """``fx.Tracer`` whose leaves are the modules that have a rule (plus user-named leaves).

    Args:
        has_rule: predicate ``module -> bool`` telling whether a rule exists for a module.
        leaf_modules: qualified names or module types to keep as leaves regardless.
    """

    def __init__(self, has_rule: Callable[[nn.Module], bool],
                 leaf_modules: Iterable[Any] = ()):
        super().__init__()
        self._has_rule = has_rule
        self._leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.module_stack_names: list = []
        self.failed_in: Optional[tuple] = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names:
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        if self._has_rule(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        name = self.path_of_module(m)
        self.module_stack_names.append((name, type(m)))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (name, type(m))
            raise
        finally:
            self.module_stack_names.pop()


def trace(model: nn.Module, has_rule: Callable[[nn.Module], bool],
          leaf_modules: Iterable[Any] = (),
          concrete_args: Optional[Dict[str, Any]] = None) -> fx.GraphModule:
    """Symbolically trace ``model`` with :class:`LRPTracer` into a ``GraphModule``.

    The returned module shares parameters and submodules with ``model``; nothing in ``model`` is
    changed. Raises :class:`LRPTraceError` naming the module that could not be traced.
    """
    if isinstance(model, fx.GraphModule):  # a copy of its graph: the passes rewrite ours, never the user's
        return fx.GraphModule(model, copy.deepcopy(model.graph))
    tracer = LRPTracer(has_rule, leaf_modules)
    saved = _module_state(model)
    try:
        with TRACE_LOCK.tracing():
            graph = tracer.trace(model, concrete_args=concrete_args)
            # built before the model's state is restored: it copies the constants tracing put on the root
            gm = fx.GraphModule(tracer.root, graph, class_name=f"{type(model).__name__}LRPGraph")
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ...
        where = tracer.failed_in
        if where is not None and where[0] != "":
            name, typ = where
            raise LRPTraceError(
                f"cannot trace module `{name}` ({typ.__module__}.{typ.__qualname__}): "
                f"{type(exc).__name__}: {exc}\n"
                f"  fix: keep it as one node with Explainer(model, leaf_modules=['{name}']) and "
                f"register a rule for its type with @lrpgraph.register_rule({typ.__qualname__})"
            ) from exc
        typ = type(model)
        raise LRPTraceError(
            f"cannot trace model {typ.__module__}.{typ.__qualname__}: {type(exc).__name__}: {exc}\n"
            "  fix: data-dependent control flow in the top-level forward cannot be traced; pass "
            "concrete_args for the arguments that drive it, or wrap the model so that its forward "
            "is traceable"
        ) from exc
    finally:
        _restore(saved)
    return gm


_TORCH_STATE = ("_parameters", "_buffers", "_modules")


def _module_state(model: nn.Module) -> List[Tuple[nn.Module, dict, dict]]:
    """Each module's plain attributes, with shallow copies of its dict/list/set attributes.

    Some forwards cache values on the module (timm's LeViT keeps its attention biases in a dict in
    eval mode); under tracing they would cache fx proxies, which breaks the model's next forward
    and the next trace. :func:`_restore` puts every attribute back as it was."""
    out = []
    for m in model.modules():
        attrs = {k: v for k, v in m.__dict__.items() if k not in _TORCH_STATE}
        contents = {k: copy.copy(v) for k, v in attrs.items() if type(v) in (dict, list, set)}
        out.append((m, attrs, contents))
    return out


def _restore(saved: List[Tuple[nn.Module, dict, dict]]) -> None:
    for m, attrs, contents in saved:
        for k in [k for k in m.__dict__ if k not in _TORCH_STATE and k not in attrs]:
            del m.__dict__[k]  # set during tracing
        for k, v in attrs.items():
            m.__dict__[k] = v
            if k in contents:  # the same container object, its content as before
                v.clear()
                (v.update if isinstance(v, (dict, set)) else v.extend)(contents[k])
