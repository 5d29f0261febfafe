"""The rule registry's rules, installed as ``lrpgraph.rules``.

* :mod:`lrpgraph.rules.abslrp`: absLRP, both formulations (paper-era conserving, current code).
* :mod:`lrpgraph.rules.classic`: LRP-0, epsilon, gamma, alpha-beta, z+, flat, w-square, z-box.
* :mod:`lrpgraph.rules.structural`: shape ops that route relevance exactly.
* :mod:`lrpgraph.rules.activations`: ReLU6, hardsigmoid, hardswish, mish, negation, ``x ** p``; gates (sigmoid).
* :mod:`lrpgraph.rules.statistics`: which operand of a product or division is a statistic of the
  other (an RMS norm's ``rsqrt(mean(x ** 2))``): a constant gate.
* :mod:`lrpgraph.rules.arithmetic`: subtraction.
* :mod:`lrpgraph.rules.normalization`: ``F.batch_norm``, GroupNorm.
* :mod:`lrpgraph.rules.pooling`: average pools with any divisor, sums, ``F.fold``, max reductions, resampling.
* :mod:`lrpgraph.rules.routing`: padding, roll, flip, unfold, repeats: exact routing of copied values.
* :mod:`lrpgraph.rules.affine`: the weighted ops (Linear, Conv, BatchNorm, pools) as forward and
  explicit transpose, shared by every rule family.

The op-family modules add their entries to the presets when ``lrpgraph`` is imported.

A rule is a callable ``rule(ctx, relevance) -> one relevance per input slot``; see
:mod:`lrpgraph.rule` for the contract.
"""
from .abslrp import AbsAdd, AbsAffine, AbsBatchNormTwoStage, AbsElementwise, AbsLRP, AbsMaxPool, AbsScale
from .classic import AddEpsilon, AlphaBeta, Epsilon, Flat, Gamma, WinnerTakesAll, WSquare, ZBox, ZPlus
from .structural import (Cat, Expand, GetItem, NoRelevance, PassThrough, Permute, Reshape, Split_, Stack,
                         Structural, Transpose, Unbind)

__all__ = [
    "AbsAdd", "AbsAffine", "AbsBatchNormTwoStage", "AbsElementwise", "AbsLRP", "AbsMaxPool", "AbsScale",
    "AddEpsilon", "AlphaBeta", "Epsilon", "Flat", "Gamma", "WinnerTakesAll", "WSquare", "ZBox", "ZPlus",
    "Cat", "Expand", "GetItem", "NoRelevance", "PassThrough", "Permute", "Reshape", "Split_", "Stack",
    "Structural", "Transpose", "Unbind",
]
