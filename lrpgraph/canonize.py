"""Canonisation for the classic LRP presets: BatchNorm folded into the layer before it.

Classic rules (epsilon, gamma, alpha-beta) applied to a BatchNorm node on its own divide by the
BN output, which is near zero wherever the shift cancels the scaled input: relevance explodes
(measured on the bundled VGG: |R| grows from about 10 to 10^4 through three BN nodes). Zennit
therefore merges BN into the preceding convolution; this pass does the same on lrpgraph's own
graph. The user's model is never touched: a :class:`ConvBN` / :class:`LinearBN` module *refers* to
the original layer and BN and computes the folded weight ``W * g/sigma`` and bias
``(b - mu) * g/sigma + beta`` on every call, so later ``.to(device)`` or ``.double()`` calls on
the model still apply. absLRP keeps BatchNorm as its own node (spec 2.3), so its presets do not
canonise.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

_BN = nn.modules.batchnorm._BatchNorm


class FusedBN(nn.Module):
    """A layer followed by an eval-mode BatchNorm, as one affine layer (weights computed on use)."""

    def __init__(self, layer: nn.Module, bn: _BN):
        super().__init__()
        # plain attributes, not submodules: the fused module owns no parameters of its own
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "bn", bn)

    def _scale_shift(self) -> Tuple[Tensor, Tensor]:
        bn = self.bn
        if bn.training or bn.running_var is None:
            raise RuntimeError("BatchNorm folding needs an eval-mode BatchNorm with running statistics")
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        return scale, shift

    @property
    def weight(self) -> Tensor:
        scale, _ = self._scale_shift()
        w = self.layer.weight
        return w * scale.reshape((-1,) + (1,) * (w.dim() - 1))

    @property
    def bias(self) -> Tensor:
        scale, shift = self._scale_shift()
        b = self.layer.bias
        return shift if b is None else b * scale + shift


class ConvBN(FusedBN):
    """``Conv{1,2,3}d`` followed by BatchNorm, folded."""

    def __getattr__(self, name):
        if name in ("stride", "padding", "dilation", "groups", "padding_mode"):
            return getattr(self.layer, name)
        return super().__getattr__(name)

    def forward(self, x: Tensor) -> Tensor:
        conv = self.layer
        fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[conv.weight.dim() - 2]
        return fn(x, self.weight, self.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class LinearBN(FusedBN):
    """``Linear`` followed by BatchNorm1d, folded."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def fold_batchnorm(gm: fx.GraphModule) -> int:
    """Fold every BatchNorm whose input is a Conv/Linear node used by that BN alone. Returns the
    number of folds. Only ``gm``'s graph and its own new submodules change."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), _BN):
            continue
        if len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
            continue
        prev = node.args[0]
        if prev.op != "call_module" or len(prev.users) != 1:
            continue
        layer = gm.get_submodule(prev.target)
        bn = gm.get_submodule(node.target)
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and layer.padding_mode == "zeros":
            fused: nn.Module = ConvBN(layer, bn)
        elif isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
            fused = LinearBN(layer, bn)
        else:
            continue
        name = f"{prev.target}__bnfold".replace(".", "_")
        gm.add_submodule(name, fused)
        prev.meta["source_target"] = prev.target  # composites still match the original qualname
        prev.target = name
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
