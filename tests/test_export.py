"""The torch.export tracer: fallback from fx, parity with the fx path, module paths, batch reuse, errors.

Small float64 models; the export path must give the fx path's relevance (both run the same rules on
the same ops, so agreement is to float rounding) and conserve where the fx path conserves.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpgraph
from lrpgraph import Explainer
from lrpgraph.canonize import ConvBN
from lrpgraph.export import ExportTraceError
from test_engine import Branchy, randomise_bn  # Branchy: a branch on values (neither tracer)

DT = torch.float64
PRESETS = ["abslrp", "abslrp-renorm", "lrp-epsilon"]


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 5))


class ShapeCheck(nn.Module):
    """timm's ConvMlp pattern: a branch on the input's spatial size, which fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc1 = nn.Conv2d(6, 8, 3)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.features(x)
        if x.shape[-1] < 3:
            x = F.adaptive_avg_pool2d(x, 3)
        x = self.act(self.fc1(x))
        return self.head(x.mean((2, 3)))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def assert_conserved(e, tol=1e-5):
    rep = e.conservation()
    assert len(rep) > 0 and not rep.leaks(tol), "\n" + rep.table(tol)


def assert_same(a: torch.Tensor, b: torch.Tensor):
    scale = float(b.abs().max())
    assert scale > 0
    assert float((a - b).abs().max()) <= 1e-10 * scale


def test_auto_falls_back_to_export_where_fx_cannot_trace():
    model = ShapeCheck().eval().to(DT)
    x = torch.randn(2, 3, 4, 4, dtype=DT)
    with pytest.raises(lrpgraph.LRPTraceError):
        Explainer(model, tracer="fx")
    ex = Explainer(model, "abslrp")
    assert ex.tracer == "export"
    e = ex(x, target=[1, 2])
    assert_conserved(e)
    assert e.relevance.shape == x.shape
    with torch.no_grad():
        assert torch.equal(e.logits, model(x))
    # the same as asking for export directly, and as the one-call form
    assert_same(Explainer(model, "abslrp", tracer="export")(x, target=[1, 2]).relevance, e.relevance)
    assert_same(lrpgraph.explain(model, x, target=[1, 2]), e.relevance)


def test_timm_vgg11_explains_through_auto(timm):
    model = timm.create_model("vgg11", pretrained=False, num_classes=10, mlp_ratio=1 / 128).eval().to(DT)
    before = snapshot(model)
    x = torch.randn(2, 3, 32, 32, dtype=DT)
    ex = Explainer(model, "abslrp")
    e = ex(x)
    assert ex.tracer == "export"
    assert_conserved(e)
    assert torch.isfinite(e.relevance).all() and float(e.relevance.abs().sum()) > 0
    after = snapshot(model)
    assert after[1] == before[1] and all(torch.equal(after[0][k], v) for k, v in before[0].items())
    # the rules see the model's own modules: the ConvMlp's convs are single nodes with module rules
    names = {r[0] for r in ex.coverage()}
    assert {"pre_logits_fc1", "pre_logits_fc2", "features_0"} <= names


def _models(timm):
    resnet = randomise_bn(timm.create_model("resnet18", pretrained=False, num_classes=6)).eval().to(DT)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
                            num_classes=6).eval().to(DT)
    return {"cnn": (randomise_bn(small_cnn()).eval().to(DT), (2, 3, 8, 8)),
            "resnet": (resnet, (2, 3, 16, 16)), "vit": (vit, (2, 3, 32, 32))}


@pytest.mark.parametrize("preset", PRESETS)
def test_export_path_equals_fx_path(timm, preset):
    for name, (model, shape) in _models(timm).items():
        x = torch.randn(*shape, dtype=DT)
        ef = Explainer(model, preset, tracer="fx")(x, target=[0, 3])
        ee = Explainer(model, preset, tracer="export")(x, target=[0, 3])
        assert_same(ee.relevance, ef.relevance)
        assert torch.equal(ee.logits, ef.logits)
        rf, re_ = ef.conservation(), ee.conservation()
        if preset == "abslrp" and name != "vit":  # (the ViT's LayerNorm leak is issue 9's rules part)
            assert_conserved(ee)
        # every leak of the export path is one of the fx path (same rules on the same ops)
        assert len(re_.leaks(1e-5)) == len(rf.leaks(1e-5)), name


def test_classic_presets_fold_batchnorm_on_the_export_graph(timm):
    model = randomise_bn(small_cnn()).eval().to(DT)
    ex = Explainer(model, "lrp-epsilon", tracer="export")
    ex(torch.randn(2, 3, 8, 8, dtype=DT))
    mods = [m for m in ex.graph_module.modules() if isinstance(m, ConvBN)]
    assert len(mods) == 1 and mods[0].layer is model[0] and mods[0].bn is model[1]


class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cumsum(self.proj(x), dim=-1)  # an op with no rule


class Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(4, 4), Mixer())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.blocks(x))


def test_names_are_module_paths_and_a_missing_rule_names_op_and_module(timm):
    with pytest.raises(lrpgraph.NoRuleError) as err:
        Explainer(Deep().eval(), tracer="export")(torch.randn(2, 4))
    msg = str(err.value)
    assert "aten.cumsum.default" in msg and "module `blocks.1` (" in msg and "Mixer" in msg
    assert "register_rule(torch.ops.aten.cumsum.default)" in msg
    # report rows of a ViT are named after module paths, not ATen op counters
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval().to(DT)
    e = Explainer(vit, "abslrp", tracer="export")(torch.randn(1, 3, 32, 32, dtype=DT))
    names = [r.name for r in e.conservation()]
    assert "blocks_1_attn_qkv" in names and "blocks_0_mlp_fc2" in names
    assert any(n.startswith("blocks_1_attn_matmul") for n in names)
    assert not any(n.startswith("aten") for n in names)


def test_rule_registered_for_an_aten_op_is_used():
    def cumsum_back(ctx, relevance):  # exact for the ones-lower-triangular map on positive inputs
        return [relevance]

    lrpgraph.register_rule(torch.ops.aten.cumsum, saves=())(cumsum_back)
    try:
        e = Explainer(Deep().eval().to(DT), "lrp-epsilon", tracer="export")(torch.randn(2, 4, dtype=DT))
        assert any(r.rule == "cumsum_back" for r in e.conservation())
    finally:
        lrpgraph.unregister_rule(torch.ops.aten.cumsum)


def test_a_batch_size_change_reuses_the_export(timm):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1,
                              num_classes=5).eval().to(DT)
    ex = Explainer(model, "abslrp", tracer="export")
    fx_ex = Explainer(model, "abslrp", tracer="fx")
    for b in (2, 3, 1, 2):
        x = torch.randn(b, 3, 32, 32, dtype=DT)
        assert_same(ex(x).relevance, fx_ex(x).relevance)
    assert ex._exports.exports == 1


def test_errors_name_both_tracers_and_what_to_do():
    ex = Explainer(Branchy().eval())
    with pytest.raises(RuntimeError, match="call it once"):
        ex.coverage()
    with pytest.raises(ExportTraceError) as err:
        ex(torch.randn(2, 4))
    msg = str(err.value)
    assert "torch.fx: cannot trace module `gate`" in msg and "torch.export failed" in msg
    with pytest.raises(ExportTraceError, match="torch.export failed"):
        Explainer(Branchy().eval(), tracer="export")(torch.randn(2, 4))
    with pytest.raises(ValueError, match="tracer must be"):
        Explainer(Branchy().eval(), tracer="jit")
    with pytest.raises(ValueError, match="concrete_args apply to the fx tracer only"):
        Explainer(Branchy().eval(), tracer="export", concrete_args={"x": 1})
    # a model that writes to its buffers in forward is refused, not modified
    counter = Counting().eval()
    with pytest.raises(ExportTraceError, match="writes to"):
        Explainer(counter, tracer="export")(torch.randn(2, 4))
    assert int(counter.calls) == 0


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


class OpZoo(nn.Module):
    """Many op families in functional and method form, each lifted by its own ATen adapter."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, ids):
        x = F.embedding(ids, self.emb.weight)                      # (B, N, 8), weight/ids swapped in ATen
        x = F.leaky_relu(self.conv(x.transpose(1, 2)), 0.2).permute(0, 2, 1)
        a, b = x.chunk(2, dim=-1)
        x = torch.cat([torch.sigmoid(a) * 2.0, torch.tanh(b)], dim=-1) + F.silu(x)
        q = self.fc(x).unsqueeze(1)                                 # (B, 1, N, 8)
        s = torch.einsum("bhnd,bhmd->bhnm", q, q) / 4.0
        s = s.masked_fill(ids[:, None, None, :] == 0, float("-inf"))
        x = torch.bmm(torch.softmax(s, dim=-1).squeeze(1), x)      # (B, N, 8)
        x = torch.stack([x[:, 0], x[:, 1:].mean(1)], dim=1).flatten(1)
        x = F.avg_pool1d(x.unsqueeze(1), 2).squeeze(1)
        return self.out(F.gelu(x.view(x.shape[0], -1), approximate="tanh"))


@pytest.mark.parametrize("preset", ["abslrp", "lrp-epsilon"])
def test_every_lifted_op_family_matches_the_fx_path(preset):
    model = OpZoo().eval().to(DT)
    ids = torch.randint(1, 10, (3, 6))
    ids[1, 4:] = 0
    ee = Explainer(model, preset, tracer="export")
    e_exp = ee(ids, target=[0, 1, 2])
    ef = Explainer(model, preset, tracer="fx")
    assert_same(e_exp.relevance, ef(ids, target=[0, 1, 2]).relevance)
    # the only op without a rule on either path is the mask's comparison (it gets no relevance)
    assert [str(n.target) for n in ee.plan.missing] == ["aten.eq.Scalar"]
    assert [n.target.__name__ for n in ef.plan.missing] == ["eq"]


class _GroupNormFn(nn.Module):
    """F.group_norm called in a forward (as timm's GroupNormAct does): no module rule to collapse
    to; and a max reduction (aten.amax)."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 5)
        self.weight, self.bias = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4))

    def forward(self, x):
        h = torch.nn.functional.group_norm(self.conv(x), 2, self.weight, self.bias, 1e-5)
        return self.head(torch.relu(h).mean((2, 3)) + torch.amax(h, (2, 3)))


@pytest.mark.parametrize("preset", ["abslrp", "lrp-epsilon"])
def test_functional_group_norm_and_amax_are_lifted_on_the_export_graph(preset):
    model = _GroupNormFn().eval().to(DT)
    x = torch.randn(2, 3, 6, 6, dtype=DT)
    ef = Explainer(model, preset, tracer="fx")(x, target=[0, 3])
    ee = Explainer(model, preset, tracer="export")(x, target=[0, 3])
    assert_same(ee.relevance, ef.relevance)
    assert "aten" not in " ".join(r.op for r in ee.conservation())  # the torch-level rules served them


class _RmsNormFn(nn.Module):
    """F.rms_norm with a weight (timm's RmsNorm) and nn.RMSNorm without: aten.rms_norm on export;
    clamps by buffers (timm's Gemma4ClippableLinear: aten.clamp.Tensor) and by a number."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.norm = nn.Linear(6, 6), nn.Linear(6, 4), nn.RMSNorm(6, elementwise_affine=False)
        self.weight = nn.Parameter(torch.randn(6))
        self.register_buffer("lo", torch.tensor(-0.5))
        self.register_buffer("hi", torch.tensor(0.8))

    def forward(self, x):
        h = torch.nn.functional.rms_norm(torch.clamp(self.l1(x), self.lo, self.hi), (6,), self.weight, 1e-6)
        return self.l2(self.norm(x + torch.relu(h)).clamp(max=1.0)).mean(1)


@pytest.mark.parametrize("preset", ["abslrp", "abslrp-renorm", "lrp-epsilon"])
def test_rms_norm_and_clamp_are_lifted_on_the_export_graph(preset):
    model = _RmsNormFn().eval().to(DT)
    x = torch.randn(2, 5, 6, dtype=DT)
    ef = Explainer(model, preset, tracer="fx")(x, target=[0, 3])
    ee = Explainer(model, preset, tracer="export")(x, target=[0, 3])
    assert_same(ee.relevance, ef.relevance)
    assert "aten" not in " ".join(r.op for r in ee.conservation())
