"""The built-in presets: ``abslrp``, ``abslrp-renorm`` and the classic LRP baselines.

Each preset is a :class:`~lrpgraph.registry.Composite` built fresh by a factory, so users can
``derive`` from one without touching the shared definition. Extra op tables (for example the
transformer rules) are merged in with :func:`extend_preset`.
"""
from __future__ import annotations

import operator
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrpgraph.rules import abslrp as A
from lrpgraph.rules import classic as C
from lrpgraph.rules.abslrp_routing import absolute_routing
from lrpgraph.rules.structural import PassThrough, structural_table

from .canonize import ConvBN, LinearBN
from .registry import LAYER_TYPES, Composite, RuleTable, Start, register_composite

CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                   F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
AFFINE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
AFFINE_FUNCTIONS = (F.linear, F.conv1d, F.conv2d, F.conv3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
POOL_FUNCTIONS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                  F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.mean, "mean")
MAXPOOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d)

# element-wise activations: (module types, functions and method names)
ACTIVATIONS: Dict[str, tuple] = {
    "relu": (nn.ReLU, F.relu, torch.relu, "relu"),
    "leaky_relu": (nn.LeakyReLU, F.leaky_relu),
    "gelu": (nn.GELU, F.gelu),
    "silu": (nn.SiLU, F.silu),
    "sigmoid": (nn.Sigmoid, torch.sigmoid, F.sigmoid, "sigmoid"),
    "tanh": (nn.Tanh, torch.tanh, F.tanh, "tanh"),
}
SCALES = (operator.mul, torch.mul, "mul", operator.truediv, torch.div, "div")

#: extra tables merged into a preset by name (filled by :func:`extend_preset`)
_EXTENSIONS: Dict[str, List[Callable[[], dict]]] = {}


def extend_preset(name: str, table: Callable[[], dict]) -> None:
    """Merge ``table()`` (``{key: rule}``) into preset ``name`` each time it is built
    (``"*"`` for every preset). Used by rule modules that add op coverage."""
    _EXTENSIONS.setdefault(name, []).append(table)


def _with_extensions(name: str, entries: dict) -> RuleTable:
    t = RuleTable(structural_table())
    t.update(RuleTable(entries))
    for key in ("*", name):
        for fn in _EXTENSIONS.get(key, []):
            t.update(RuleTable(fn()))
    return t


# --------------------------------------------------------------------------------------------
# output initialisation


def _one_hot(logits: Tensor, target: Tensor) -> Tensor:
    """``(T, B, C)`` one-hot of ``target`` ``(B, T)``."""
    B, C = logits.shape
    oh = torch.zeros((target.shape[1], B, C), dtype=logits.dtype, device=logits.device)
    oh.scatter_(2, target.T.unsqueeze(-1), 1.0)
    return oh


def _check_classes(logits: Tensor, contrastive: bool) -> int:
    C = logits.shape[1]
    if contrastive and C < 2:
        raise ValueError("contrastive explanations need at least 2 outputs; this model has 1: "
                         "pass contrastive=False")
    return C


def _signed_init(logits, target, contrastive):
    C = _check_classes(logits, contrastive)
    oh = _one_hot(logits, target)
    return oh - (1 - oh) / (C - 1) if contrastive else oh


def _two_pass_init(logits, target, contrastive):
    C = _check_classes(logits, contrastive)
    oh = _one_hot(logits, target)
    return torch.cat([oh, (1 - oh) / (C - 1)]) if contrastive else oh


def _two_pass_finish(r, T, contrastive):
    return r[:T] - r[T:] if contrastive else r


def _value_init(logits, target, contrastive):
    C = _check_classes(logits, contrastive)
    oh = _one_hot(logits, target)
    start = oh * logits
    if contrastive:
        start = start - (1 - oh) * logits / (C - 1)
    return start


_identity_finish = lambda r, T, contrastive: r  # noqa: E731

#: +1 on the target, -1/(C-1) on every other class, one signed pass (spec 1.4)
SIGNED = Start("signed", _signed_init, _identity_finish)
#: target pass minus the pass with 1/(C-1) on the others, stacked in one walk (spec 1.2)
TWO_PASS = Start("two-pass", _two_pass_init, _two_pass_finish)
#: classic LRP: the target logit's value (minus the mean of the others when contrastive)
VALUE = Start("value", _value_init, _identity_finish)


# --------------------------------------------------------------------------------------------
# absLRP


def abslrp_table(variant: str) -> dict:
    """The absLRP op table for ``variant`` ``"paper"`` or ``"head"``."""
    affine = A.AbsAffine(variant)
    t: dict = {}
    for k in AFFINE_MODULES + AFFINE_FUNCTIONS + CONV_TRANSPOSES + POOL_MODULES + POOL_FUNCTIONS:
        t[k] = affine
    for k in BATCHNORMS:
        t[k] = A.AbsBatchNormTwoStage(variant) if variant == "paper" else affine
    for k in MAXPOOLS:
        t[k] = A.AbsMaxPool(variant)
    for label, keys in ACTIVATIONS.items():
        f, df = A.ELEMENTWISE[label]
        rule = A.AbsElementwise(f, df, variant, label=label)
        for k in keys:
            t[k] = rule
    # nn.Flatten gets the identity-like rule of the reference (positive entries only)
    t[nn.Flatten] = A.AbsElementwise(lambda x: x, torch.ones_like, variant, label="identity")
    t[operator.add] = A.AbsAdd(variant)
    for k in SCALES:
        t[k] = A.AbsScale(variant)
    return t


def _abslrp() -> Composite:
    table = absolute_routing(_with_extensions("abslrp", abslrp_table("paper")), "paper")
    return Composite("abslrp", table, SIGNED,
                     description="absLRP, paper-era formulation: sign-split relevance, positive and "
                                 "negative mass conserved at every node (spec 1.3/1.4)")


def _abslrp_renorm() -> Composite:
    table = absolute_routing(_with_extensions("abslrp-renorm", abslrp_table("head")), "head")
    return Composite("abslrp-renorm", table, TWO_PASS,
                     description="absLRP as in the authors' current code: unit mass after every "
                                 "node, fixed split at residuals (spec 1.1/1.2)")


# --------------------------------------------------------------------------------------------
# classic


def classic_table(dense, conv=None, epsilon: float = 1e-6) -> dict:
    """A classic table: ``dense`` for Linear, ``conv`` (default: ``dense``) for convolutions (and
    for them with a folded BatchNorm), epsilon z-rules for BatchNorm that could not be folded,
    pools and additions, pass-through activations."""
    conv = conv or dense
    eps_rule = C.Epsilon(epsilon)
    t: dict = {nn.Linear: dense, F.linear: dense, LinearBN: dense}
    for k in (nn.Conv1d, nn.Conv2d, nn.Conv3d, F.conv1d, F.conv2d, F.conv3d, ConvBN) + CONV_TRANSPOSES:
        t[k] = conv
    for k in BATCHNORMS + POOL_MODULES + POOL_FUNCTIONS:
        t[k] = eps_rule
    wta = C.WinnerTakesAll()
    for k in MAXPOOLS:
        t[k] = wta
    passthrough = PassThrough()
    for keys in ACTIVATIONS.values():
        for k in keys:
            t[k] = passthrough
    t[nn.Flatten] = passthrough
    t[operator.add] = C.AddEpsilon(epsilon)
    for k in SCALES:
        t[k] = passthrough
    return t


def _classic(name: str, dense, conv=None, epsilon: float = 1e-6, first=None, desc: str = ""):
    def factory() -> Composite:
        return Composite(name, _with_extensions(name, classic_table(dense, conv, epsilon)), VALUE,
                         first_layer=first, description=desc, canonize=True,
                         first_layer_types=LAYER_TYPES + (ConvBN, LinearBN))
    return factory


register_composite("abslrp", _abslrp)
register_composite("abslrp-renorm", _abslrp_renorm)
register_composite("lrp-0", _classic("lrp-0", C.Epsilon(0.0), epsilon=0.0,
                                     desc="LRP-0 (z-rule) everywhere"))
register_composite("lrp-epsilon", _classic("lrp-epsilon", C.Epsilon(1e-6),
                                           desc="LRP-epsilon (1e-6, Zennit's default) everywhere"))
register_composite("lrp-gamma", _classic("lrp-gamma", C.Gamma(0.25),
                                         desc="LRP-gamma (0.25) on Linear and Conv"))
register_composite("lrp-alpha1beta0", _classic("lrp-alpha1beta0", C.ZPlus(),
                                               desc="LRP-alpha1beta0 (z+) on Linear and Conv"))
register_composite("lrp-alpha2beta1", _classic("lrp-alpha2beta1", C.AlphaBeta(2.0, 1.0),
                                               desc="LRP-alpha2beta1 on Linear and Conv"))
register_composite("epsilon-plus-flat", _classic("epsilon-plus-flat", C.Epsilon(1e-6), conv=C.ZPlus(),
                                                 first=C.Flat(),
                                                 desc="flat first layer, z+ convolutions, epsilon dense"))
register_composite("epsilon-gamma-box", _classic("epsilon-gamma-box", C.Epsilon(1e-6), conv=C.Gamma(0.25),
                                                 first=C.ZBox(),
                                                 desc="z-box first layer (per-sample input bounds "
                                                      "unless given), gamma convolutions, epsilon dense"))
