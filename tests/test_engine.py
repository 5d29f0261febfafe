"""End-to-end properties of the engine: conservation on real architectures, batching, targets,
the model left untouched, and the errors users see."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpgraph
from lrpgraph import Explainer

DT = torch.float64


def randomise_bn(model: nn.Module) -> nn.Module:
    """timm zero-inits the last BN of each block; give every BN non-trivial statistics."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data = torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype) * 0.1
            m.running_mean.data = torch.randn(m.running_mean.shape, generator=g, dtype=m.running_mean.dtype) * 0.1
            m.running_var.data = torch.rand(m.running_var.shape, generator=g, dtype=m.running_var.dtype) + 0.5
    return model


def vgg_style() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10),
    )


def assert_conserved(e: lrpgraph.Explanation, tol: float = 1e-5) -> None:
    rep = e.conservation()
    assert len(rep) > 0
    leaks = rep.leaks(tol)
    assert not leaks, "\n" + rep.table(tol)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_abslrp_conserves_every_node_timm_resnet(timm, name):
    model = randomise_bn(timm.create_model(name, pretrained=False, num_classes=10)).eval().to(DT)
    x = torch.randn(2, 3, 32, 32, dtype=DT)
    e = Explainer(model, "abslrp")(x, target=[3, 7])
    assert_conserved(e)
    rep = e.conservation()
    # positive and negative mass arrive intact at the first conv: P = 1, N = -1 at the head
    head = rep.rows[0]
    assert torch.allclose(head.in_pos, torch.ones_like(head.in_pos))
    assert torch.allclose(head.in_neg, -torch.ones_like(head.in_neg))
    # the signed total is conserved end to end (contrastive start sums to 0)
    assert torch.allclose(e.relevance.sum(dim=(1, 2, 3)), torch.zeros(2, dtype=DT), atol=1e-9)
    # residual additions split by positive contribution: both summands receive relevance
    adds = [r for r in rep if r.op == "operator.add"]
    assert len(adds) == (8 if name == "resnet18" else 16)


def test_abslrp_conserves_vgg_style_sequential():
    model = randomise_bn(vgg_style()).eval().to(DT)
    x = torch.randn(3, 3, 16, 16, dtype=DT)
    e = Explainer(model, "abslrp")(x)
    assert_conserved(e)
    assert e.relevance.shape == x.shape


def test_lrp0_conserves_with_zero_biases():
    model = vgg_style().eval().to(DT)
    for m in model.modules():
        if getattr(m, "bias", None) is not None:
            m.bias.data.zero_()
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.zero_()
    x = torch.randn(2, 3, 16, 16, dtype=DT)
    e = Explainer(model, "lrp-0")(x, target=1, contrastive=False)
    logit = e.logits[:, 1]
    assert torch.allclose(e.relevance.sum(dim=(1, 2, 3)), logit, rtol=1e-8)
    assert_conserved(e, 1e-8)


@pytest.mark.parametrize("preset", ["abslrp", "abslrp-renorm", "lrp-epsilon", "epsilon-plus-flat"])
def test_batched_targets_equal_single_runs(preset):
    model = vgg_style().eval().to(DT)
    x = torch.randn(3, 3, 16, 16, dtype=DT)
    ex = Explainer(model, preset)
    targets = torch.tensor([[0, 5], [2, 2], [9, 1]])
    multi = ex(x, targets).relevance
    assert multi.shape == (3, 2) + x.shape[1:]
    for t in range(2):
        single = ex(x, targets[:, t]).relevance
        torch.testing.assert_close(multi[:, t], single, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("preset", ["abslrp", "abslrp-renorm", "lrp-alpha2beta1"])
def test_batch_equals_per_sample(preset):
    model = randomise_bn(vgg_style()).eval().to(DT)
    x = torch.randn(4, 3, 16, 16, dtype=DT)
    ex = Explainer(model, preset)
    batch = ex(x, [1, 2, 3, 4]).relevance
    for i in range(4):
        one = ex(x[i:i + 1], [i + 1]).relevance
        torch.testing.assert_close(batch[i:i + 1], one, rtol=1e-9, atol=1e-12)


def test_contrastive_starts_match_the_spec():
    model = vgg_style().eval().to(DT)
    x = torch.randn(2, 3, 16, 16, dtype=DT)
    C = 10
    onehot = F.one_hot(torch.tensor([4, 6]), C).to(DT)
    # abslrp: one signed pass with +1 and -1/(C-1) (spec 1.4)
    ex = Explainer(model, "abslrp")
    a = ex(x, [4, 6]).relevance
    b = ex(x, output_relevance=onehot - (1 - onehot) / (C - 1)).relevance
    torch.testing.assert_close(a, b)
    # abslrp-renorm: target pass minus the pass with 1/(C-1) on the others (spec 1.2)
    ex = Explainer(model, "abslrp-renorm")
    a = ex(x, [4, 6]).relevance
    pos = ex(x, output_relevance=onehot).relevance
    neg = ex(x, output_relevance=(1 - onehot) / (C - 1)).relevance
    torch.testing.assert_close(a, pos - neg)
    # each pass reaches the input with unit mass (the first conv renormalises)
    torch.testing.assert_close(pos.abs().sum(dim=(1, 2, 3)), torch.ones(2, dtype=DT))


def test_model_is_not_modified(timm):
    model = randomise_bn(timm.create_model("resnet18", pretrained=False, num_classes=5)).eval()
    for p in model.layer1.parameters():
        p.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    flags = {n: (m.training, type(m)) for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    x = torch.randn(2, 3, 32, 32)
    out_before = model(x)
    for preset in ("abslrp", "abslrp-renorm", "lrp-gamma"):
        lrpgraph.explain(model, x, rules=preset)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert flags == {n: (m.training, type(m)) for n, m in model.named_modules()}
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}
    torch.testing.assert_close(model(x), out_before)


def test_explain_shape_dtype_and_predicted_target():
    model = vgg_style().eval()
    x = torch.randn(2, 3, 16, 16)
    r = lrpgraph.explain(model, x)
    assert r.shape == x.shape and r.dtype == x.dtype and r.device == x.device
    e = Explainer(model)(x)
    assert torch.equal(e.target, e.logits.argmax(1))
    assert e.logits.shape == (2, 10)
    assert e.relevance.requires_grad is False


class InplaceNet(nn.Module):
    """In-place ops the passes must make out-of-place: +=, relu_, F.relu(inplace=True)."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.c1(x)
        z = self.bn(self.c2(F.relu(y, inplace=self.inplace)))
        if self.inplace:
            z += y
            z = z.relu_()
        else:
            z = torch.add(z, y)
            z = z.relu()
        return self.fc(z.mean(dim=(2, 3)))


@pytest.mark.parametrize("preset", ["abslrp", "abslrp-renorm", "lrp-0"])
def test_inplace_ops_give_the_same_explanation(preset):
    a = randomise_bn(InplaceNet(True)).eval().to(DT)
    b = InplaceNet(False).to(DT)
    b.load_state_dict(a.state_dict())
    b.eval()
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    ea = Explainer(a, preset)(x, [0, 1])
    eb = Explainer(b, preset)(x, [0, 1])
    torch.testing.assert_close(ea.relevance, eb.relevance)
    if preset == "abslrp":
        assert_conserved(ea)


# ------------------------------------------------------------------------------------- errors


class Rolling(nn.Module):
    def __init__(self):
        super().__init__()
        self.shift = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        x = torch.roll(self.shift(x), 1, dims=3)
        return self.fc(x.mean(dim=(2, 3)))


class Cumulative(nn.Module):
    """An op no preset has a rule for (a running sum)."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        x = torch.cumsum(self.shift(x), dim=3)
        return self.fc(x.mean(dim=(2, 3)))


def test_missing_rule_names_node_op_and_fix():
    with pytest.raises(lrpgraph.NoRuleError) as err:
        Explainer(Cumulative().eval())(torch.randn(1, 3, 4, 4))
    msg = str(err.value)
    assert "torch.cumsum" in msg and "`cumsum`" in msg and "register_rule" in msg


def test_registered_user_rule_is_used():
    @lrpgraph.register_rule(torch.roll, saves=())
    def roll_back(ctx, relevance):
        shifts, dims = ctx.args[1], ctx.kwargs.get("dims", ctx.args[2] if len(ctx.args) > 2 else None)
        return [torch.roll(relevance, -shifts, dims=dims + 1)]

    try:
        model = Rolling().eval().to(DT)
        e = Explainer(model, "abslrp")(torch.randn(2, 3, 4, 4, dtype=DT))
        assert_conserved(e)
        assert any(r.rule == "roll_back" for r in e.conservation())
    finally:
        lrpgraph.unregister_rule(torch.roll)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.gate(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return x
        return -x


def test_untraceable_model_names_module_and_leaf_fix():
    with pytest.raises(lrpgraph.LRPTraceError) as err:
        Explainer(Branchy().eval(), tracer="fx")
    msg = str(err.value)
    assert "`gate`" in msg and "Gate" in msg and "leaf_modules=['gate']" in msg


def test_leaf_module_without_rule_is_reported():
    with pytest.raises(lrpgraph.NoRuleError) as err:
        Explainer(Branchy().eval(), leaf_modules=["gate"])(torch.randn(1, 4))
    assert "gate" in str(err.value)


def test_wrong_input_shape_target_range_and_training_mode():
    model = vgg_style().eval()
    ex = Explainer(model)
    with pytest.raises(ValueError, match="input of shape"):
        ex(torch.randn(2, 3, 20, 20))
    with pytest.raises(ValueError, match="out of range for 10 classes"):
        ex(torch.randn(2, 3, 16, 16), target=[1, 10])
    with pytest.raises(ValueError, match="entries for a batch of 2"):
        ex(torch.randn(2, 3, 16, 16), target=[1, 2, 3])
    with pytest.raises(ValueError, match="unknown rules preset"):
        Explainer(model, "lrp-nope")
    model.train()
    with pytest.raises(RuntimeError, match=r"model.eval\(\)"):
        ex(torch.randn(2, 3, 16, 16))


def test_composite_overrides_by_name_and_first_layer():
    model = vgg_style().eval().to(DT)
    base = lrpgraph.get_composite("lrp-epsilon")
    comp = base.derive("mine", by_name=[("5", lrpgraph.rules.ZPlus())], first_layer=lrpgraph.rules.Flat())
    e = Explainer(model, comp)(torch.randn(1, 3, 16, 16, dtype=DT))
    rules = {r.name: r.rule for r in e.conservation()}
    assert rules["_0"] == "flat" and rules["_5"] == "z-plus" and rules["_2"].startswith("epsilon")


def test_coverage_lists_every_op():
    ex = Explainer(Cumulative().eval())
    cov = {n: rule for n, _, rule in ex.coverage()}
    assert cov["cumsum"] == "MISSING" and cov["shift"].startswith("abslrp")


@pytest.mark.parametrize("preset", ["lrp-gamma", "lrp-epsilon", "epsilon-plus-flat", "lrp-alpha2beta1"])
def test_classic_presets_fold_batchnorm_like_a_hand_folded_model(preset):
    """Classic presets fold BatchNorm into the conv before it (Zennit's canonisation): the result
    equals explaining a model whose BN was folded by hand, and the user's model is untouched."""
    model = randomise_bn(vgg_style()).eval().to(DT)
    before = copy.deepcopy(model.state_dict())
    conv, bn = model[5], model[6]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded_conv = nn.Conv2d(8, 16, 3, padding=1).to(DT)
    folded_conv.weight.data = conv.weight.data * scale.reshape(-1, 1, 1, 1)
    folded_conv.bias.data = (conv.bias.data - bn.running_mean) * scale + bn.bias.data
    folded = nn.Sequential(*[m if i != 5 else folded_conv for i, m in enumerate(model) if i != 6]).eval()
    x = torch.randn(2, 3, 16, 16, dtype=DT)
    ex = Explainer(model, preset)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ex.plan.modules.values())
    e = ex(x, [1, 2])
    ref = Explainer(folded, preset)(x, [1, 2])
    torch.testing.assert_close(e.logits, model(x))
    torch.testing.assert_close(e.relevance, ref.relevance)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # absLRP keeps BatchNorm as its own node (spec 2.3)
    assert any(isinstance(m, nn.BatchNorm2d) for m in Explainer(model, "abslrp").plan.modules.values())


def test_by_type_override_applies_to_folded_layers():
    model = randomise_bn(vgg_style()).eval().to(DT)
    comp = lrpgraph.get_composite("lrp-epsilon").derive(by_type={nn.Conv2d: lrpgraph.rules.Gamma(0.1)})
    rows = {r.name: r.rule for r in Explainer(model, comp)(torch.randn(1, 3, 16, 16, dtype=DT)).conservation()}
    assert rows["_5"] == "gamma(0.1)" and rows["_0"] == "gamma(0.1)"  # _5 is the conv folded with BN _6


@pytest.mark.parametrize("preset", ["abslrp", "abslrp-renorm"])
def test_fast_paths_without_report_give_the_same_relevance_on_a_resnet(timm, preset):
    """Without a report, absLRP takes one-pass forms (no second sign stream); same numbers."""
    model = randomise_bn(timm.create_model("resnet18", pretrained=False, num_classes=10)).eval().to(DT)
    x = torch.randn(2, 3, 32, 32, dtype=DT)
    ex = Explainer(model, preset)
    torch.testing.assert_close(ex(x, [1, 2], report=False).relevance, ex(x, [1, 2]).relevance,
                               rtol=1e-9, atol=1e-13)
