"""How a node finds its rule: rule tables keyed by module type, function and method name, and
composites that assign rules per node by name pattern, by type and for the first layer.

A rule table maps keys to rules:

* a module type (``nn.Conv2d``) matches ``call_module`` nodes of that type, and of subclasses
  that do not override ``forward`` (a subclass with its own forward computes something else);
* a function (``torch.flatten``, ``operator.add``) matches ``call_function`` nodes;
* a string (``"view"``) matches ``call_method`` nodes of that tensor method.

A :class:`Composite` is a named preset: a base table plus ordered overrides, and the way the
relevance at the model output is initialised (:class:`Start`). Presets are registered by name
(``abslrp``, ``lrp-epsilon``, ...) so that the API and the CLI can take a string.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from torch import Tensor, fx, nn

from .canonize import FusedBN
from .rule import FunctionRule, Rule

Key = Union[type, Callable, str]


def _forward_of(t: type):
    return t.__dict__.get("forward")


class RuleTable:
    """Rules keyed by module type, function object or method name."""

    def __init__(self, entries: Optional[Dict[Key, Rule]] = None):
        self.modules: Dict[type, Rule] = {}
        self.functions: Dict[Any, Rule] = {}
        self.methods: Dict[str, Rule] = {}
        for k, r in (entries or {}).items():
            self.add(k, r)

    def add(self, key: Key, rule: Rule) -> None:
        """Register ``rule`` under ``key`` (a module type, a function, or a method name)."""
        if not isinstance(rule, Rule):
            raise TypeError(f"expected a lrpgraph Rule for {key!r}, got {type(rule).__name__}")
        if isinstance(key, type):
            if not issubclass(key, nn.Module):
                raise TypeError(f"module keys must be nn.Module subclasses, got {key!r}")
            self.modules[key] = rule
        elif isinstance(key, str):
            self.methods[key] = rule
        elif callable(key):
            self.functions[key] = rule
        else:
            raise TypeError(f"a rule key is a module type, a function or a method name, got {key!r}")

    def update(self, other: "RuleTable") -> "RuleTable":
        """Add every entry of ``other`` (its entries win). Returns ``self``."""
        self.modules.update(other.modules)
        self.functions.update(other.functions)
        self.methods.update(other.methods)
        return self

    def copy(self) -> "RuleTable":
        return RuleTable().update(self)

    def module_rule(self, module: nn.Module) -> Optional[Rule]:
        """The rule for a module: its exact type, else the nearest base class whose ``forward``
        the subclass does not override."""
        t = type(module)
        if t in self.modules:
            return self.modules[t]
        own_forward = None
        for base in t.__mro__:
            fwd = _forward_of(base)
            if fwd is not None and own_forward is None:
                own_forward = (base, fwd)
            if base in self.modules:
                # usable only if the forward that runs is the base's forward
                if own_forward is not None and own_forward[0] is base:
                    return self.modules[base]
                if own_forward is None:
                    return self.modules[base]
                return None
        return None

    def lookup(self, op: str, target: Any, module: Optional[nn.Module]) -> Optional[Rule]:
        if op == "call_module":
            return self.module_rule(module)
        if op == "call_function":
            try:
                rule = self.functions.get(target)
            except TypeError:  # unhashable target
                return None
            packet = getattr(target, "overloadpacket", None)  # an ATen overload: its packet's rule
            return self.functions.get(packet) if rule is None and packet is not None else rule
        if op == "call_method":
            return self.methods.get(target)
        return None

    def __len__(self) -> int:
        return len(self.modules) + len(self.functions) + len(self.methods)


# --------------------------------------------------------------------------------------------
# user rules


_USER_RULES: Dict[str, RuleTable] = {"*": RuleTable()}


def register_rule(key: Key, rule: Optional[Rule] = None, *, presets: Optional[Iterable[str]] = None,
                  saves: Sequence[str] = ("inputs", "output"), exact: bool = False):
    """Register a rule for a module type, function or tensor-method name.

    Use as a call, ``register_rule(torch.roll, MyRule())``, or as a decorator on a rule class or
    a plain function ``fn(ctx, relevance) -> sequence``::

        @lrpgraph.register_rule(torch.roll, saves=())
        def roll_rule(ctx, relevance):
            shifts, dims = ctx.args[1], ctx.args[2]
            ...

    ``presets`` limits the rule to those preset names; by default it serves every preset (user
    rules take precedence over the built-in tables but not over a composite's own overrides).
    """
    names = list(presets) if presets is not None else ["*"]

    def _register(obj):
        if isinstance(obj, Rule):
            r = obj
        elif isinstance(obj, type) and issubclass(obj, Rule):
            r = obj()
        elif callable(obj):
            r = FunctionRule(obj, saves=saves, exact=exact)
        else:
            raise TypeError(f"cannot register {obj!r} as a rule")
        for n in names:
            _USER_RULES.setdefault(n, RuleTable()).add(key, r)
        return obj

    if rule is not None:
        _register(rule)
        return rule
    return _register


def unregister_rule(key: Key, presets: Optional[Iterable[str]] = None) -> None:
    """Remove a user rule registered with :func:`register_rule`."""
    for n in (list(presets) if presets is not None else list(_USER_RULES)):
        t = _USER_RULES.get(n)
        if t is None:
            continue
        for d in (t.modules, t.functions, t.methods):
            d.pop(key, None)


def user_rules(preset: str) -> RuleTable:
    """The user rules that apply to ``preset`` (global ones, then preset-specific ones)."""
    t = _USER_RULES["*"].copy()
    if preset in _USER_RULES and preset != "*":
        t.update(_USER_RULES[preset])
    return t


# --------------------------------------------------------------------------------------------
# output initialisation


@dataclass
class Start:
    """How relevance is initialised at the model output and combined at the input.

    ``init(logits, target, contrastive)`` returns the initial relevance ``(K, B, C)`` for
    ``target`` shaped ``(B, T)``; ``finish(relevance)`` maps the input relevance ``(K, B, ...)``
    back to ``(T, B, ...)``.
    """

    name: str
    init: Callable[[Tensor, Tensor, bool], Tensor]
    finish: Callable[[Tensor, int, bool], Tensor]


# --------------------------------------------------------------------------------------------
# composites


LAYER_TYPES: Tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class Composite:
    """A named assignment of rules to nodes.

    Precedence, highest first: ``by_name`` patterns (fnmatch on the module qualname or the fx node
    name), ``first_layer`` (the weighted layer closest to the input), ``by_type``, user rules
    registered with :func:`register_rule`, the base ``table``.

    Args:
        name: preset name shown in reports.
        table: the base rule table.
        start: output initialisation.
        by_type: ``{module type: rule}`` overrides.
        by_name: ``[(pattern, rule)]`` overrides, first match wins.
        first_layer: rule for the first weighted layer (types in ``first_layer_types``).
        options: ``{pattern: dict}`` per-node options passed to rules in ``ctx.options``.
        canonize: fold each BatchNorm into the Conv/Linear before it (see :mod:`lrpgraph.canonize`).
    """

    name: str
    table: RuleTable
    start: Start
    by_type: Dict[type, Rule] = field(default_factory=dict)
    by_name: List[Tuple[str, Rule]] = field(default_factory=list)
    first_layer: Optional[Rule] = None
    first_layer_types: Tuple[type, ...] = LAYER_TYPES
    options: Dict[str, dict] = field(default_factory=dict)
    description: str = ""
    #: fold BatchNorm into the preceding Conv/Linear before assigning rules (classic presets)
    canonize: bool = False

    def derive(self, name: Optional[str] = None, *, by_type: Optional[Dict[type, Rule]] = None,
               by_name: Optional[List[Tuple[str, Rule]]] = None,
               first_layer: Optional[Rule] = None, options: Optional[Dict[str, dict]] = None,
               table: Optional[Dict[Key, Rule]] = None) -> "Composite":
        """A copy with extra overrides (the originals are not changed)."""
        t = self.table.copy()
        if table:
            t.update(RuleTable(table))
        return Composite(
            name=name or f"{self.name}+custom", table=t, start=self.start,
            by_type={**self.by_type, **(by_type or {})},
            by_name=list(by_name or []) + list(self.by_name),
            first_layer=first_layer if first_layer is not None else self.first_layer,
            first_layer_types=self.first_layer_types,
            options={**self.options, **(options or {})}, description=self.description,
            canonize=self.canonize,
        )

    def has_rule(self, module: nn.Module) -> bool:
        """Whether some rule of this composite would serve ``module`` (the tracer's leaf test)."""
        if any(isinstance(module, t) for t in self.by_type):
            return True
        if user_rules(self.name).module_rule(module) is not None:
            return True
        return self.table.module_rule(module) is not None

    def assign(self, gm: fx.GraphModule) -> Dict[fx.Node, Optional[Rule]]:
        """The rule of every computing node of ``gm`` (``None`` where none is found)."""
        users = user_rules(self.name)
        first = self._first_layer_node(gm) if self.first_layer is not None else None
        out: Dict[fx.Node, Optional[Rule]] = {}
        for node in gm.graph.nodes:
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            out[node] = self._rule_for(node, module, node is first, users)
        return out

    def options_for(self, node: fx.Node) -> dict:
        opts: dict = dict(node.meta.get("lrpgraph_options", {}))  # facts found by graph passes
        label = node.meta.get("source_target", node.target) if node.op == "call_module" else node.name
        for pattern, o in self.options.items():
            if fnmatch.fnmatchcase(str(label), pattern) or fnmatch.fnmatchcase(node.name, pattern):
                opts.update(o)
        return opts

    def _rule_for(self, node: fx.Node, module: Optional[nn.Module], is_first: bool,
                  users: RuleTable) -> Optional[Rule]:
        label = node.meta.get("source_target", node.target) if node.op == "call_module" else node.name
        for pattern, rule in self.by_name:
            if fnmatch.fnmatchcase(str(label), pattern) or fnmatch.fnmatchcase(node.name, pattern):
                return rule
        if is_first:
            return self.first_layer
        if module is not None:
            # a layer with a folded BatchNorm (classic presets) still matches its own type
            layer = module.layer if isinstance(module, FusedBN) else None
            for t, rule in self.by_type.items():
                if isinstance(module, t) or (layer is not None and isinstance(layer, t)):
                    return rule
        r = users.lookup(node.op, node.target, module)
        if r is not None:
            return r
        return self.table.lookup(node.op, node.target, module)

    def _first_layer_node(self, gm: fx.GraphModule) -> Optional[fx.Node]:
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                       self.first_layer_types):
                return node
        return None


_COMPOSITES: Dict[str, Callable[[], Composite]] = {}


def register_composite(name: str, factory: Callable[[], Composite]) -> None:
    """Register a preset by name; ``factory()`` builds a fresh :class:`Composite`."""
    _COMPOSITES[name] = factory


def composite_names() -> List[str]:
    """The names of the registered presets."""
    return sorted(_COMPOSITES)


def get_composite(rules: Union[str, Composite]) -> Composite:
    """Resolve a preset name (or pass a :class:`Composite` through)."""
    if isinstance(rules, Composite):
        return rules
    if not isinstance(rules, str):
        raise TypeError(f"rules must be a preset name or a Composite, got {type(rules).__name__}")
    if rules not in _COMPOSITES:
        raise ValueError(f"unknown rules preset {rules!r}; choose one of {', '.join(composite_names())}")
    return _COMPOSITES[rules]()
