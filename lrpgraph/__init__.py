"""lrpgraph: layer-wise relevance propagation for any torch.fx-traceable PyTorch model.

The public face: :func:`explain`, :class:`Explainer` and its :class:`Explanation`, rule
registration (:func:`register_rule`) and presets (:class:`Composite`, :func:`get_composite`).
"""
from . import memory  # noqa: F401  (retain_freed_memory)
from . import presets as _presets  # noqa: F401  (registers the built-in presets)
from . import attention as _attention  # noqa: F401  (registers the SDPA-to-explicit-attention pass)
from . import stacks as _stacks  # noqa: F401  (registers the stack-then-reduce pass)
from .rules import transformer as _transformer_rules  # noqa: F401  (registers the transformer rules)
from .rules import activations, arithmetic, normalization, pooling, routing  # noqa: F401,E401  (op families)
from .checks import NonFiniteError
from .explainer import Explainer, Explanation, explain
from .passes import register_pass
from .record import NoRuleError
from .registry import Composite, RuleTable, composite_names, get_composite, register_composite, register_rule, unregister_rule
from .report import ConservationReport, NodeBalance
from .rule import NodeContext, Rule
from .trace import LRPTraceError
from .walk import RuleError

__version__ = "0.1.0"

__all__ = [
    "explain", "Explainer", "Explanation", "register_rule", "unregister_rule", "register_pass",
    "Composite", "RuleTable", "get_composite", "register_composite", "composite_names",
    "ConservationReport", "NodeBalance", "NodeContext", "Rule", "LRPTraceError", "NoRuleError",
    "RuleError", "NonFiniteError", "__version__",
]
