"""No silent wrong results: each test here failed before its fix (issue 10, items 1-10)."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import fx, nn

import lrpgraph
from lrpgraph import Explainer, NoRuleError
from lrpgraph.checks import NonFiniteError


class Tuple(nn.Module):
    """A Linear, a tuple-valued op read through `.values` (or `[0]`), and a head."""

    def __init__(self, pick):
        super().__init__()
        # no biases, so LRP-0 conserves at every node and the check below sees the routed op alone
        self.a, self.b, self.pick = nn.Linear(6, 6, bias=False), nn.Linear(3, 3, bias=False), pick

    def forward(self, x):
        return self.b(self.pick(self.a(x)))


PICKS = {
    "sort.values": lambda h: torch.sort(h, dim=1).values[:, :3],
    "sort[0]": lambda h: torch.sort(h, dim=1)[0][:, :3],
    "topk.values": lambda h: torch.topk(h, 3, dim=1).values,
    "max.values": lambda h: torch.max(h.reshape(-1, 3, 2), 2).values,
    "method max.values": lambda h: h.reshape(-1, 3, 2).max(2).values,
}


@pytest.mark.parametrize("pick", sorted(PICKS))
def test_tuple_field_values_is_never_silently_zero(pick):
    """item 1: `.values` of a tuple-valued op gave an all-zero map; now it routes like `[0]`: the
    op's rule is used, or its missing rule is an error."""
    model = Tuple(PICKS[pick]).eval()
    x = torch.randn(2, 6)
    try:
        e = Explainer(model, rules="lrp-0")(x)
    except NoRuleError as exc:
        assert "no rule for" in str(exc)
        return
    assert e.relevance.abs().sum() > 0  # a rule exists (another branch may add one): it must be used
    assert e.conservation().max_rel_error() < 1e-4


def _nan_model():
    """A model whose rule output turns NaN at one node (a user rule dividing 0 by 0)."""

    class Roll(nn.Module):
        def forward(self, x):
            return torch.roll(x, 1, dims=1)

    return nn.Sequential(nn.Linear(4, 4), Roll(), nn.ReLU(), nn.Linear(4, 3)).eval()


@pytest.fixture
def nan_rule():
    @lrpgraph.register_rule(torch.roll, saves=())
    def nan_roll(ctx, relevance):
        return [torch.roll(relevance, -1, dims=2) * float("nan")]

    yield
    lrpgraph.unregister_rule(torch.roll)


@pytest.mark.parametrize("report", [True, False])
def test_nonfinite_relevance_is_an_error_naming_the_first_node(nan_rule, report):
    """item 2: a NaN relevance passed silently; now it is an error naming the node, with and
    without the report."""
    with pytest.raises(NonFiniteError, match="first at node `roll`") as info:
        Explainer(_nan_model(), rules="lrp-epsilon")(torch.randn(2, 4), report=report)
    assert info.value.node == "roll"
    assert info.value.report is not None
    assert info.value.report["roll"].worst() == float("inf")


def test_report_flags_nan_rows_as_leaks():
    """item 2: `leaks()`, `max_rel_error()` and the LEAK mark compared `err > tol`, False for NaN."""
    from lrpgraph.report import ConservationReport, balance

    nan = torch.full((1, 2, 3), float("nan"))
    ok = torch.ones(1, 2, 3)
    rep = ConservationReport([balance("good", "op", "r", ok, [ok], 2), balance("bad", "op", "r", ok, [nan], 2)])
    assert [r.name for r in rep.leaks()] == ["bad"]
    assert rep.max_rel_error() == float("inf")
    assert "LEAK non-finite" in rep.table()


def test_debug_strict_fails_on_nan(nan_rule, capsys, monkeypatch):
    """item 2: `debug --strict` passed an all-NaN map."""
    from lrpgraph import cli

    monkeypatch.setattr(cli, "_load_model", lambda spec, size, n=2: (_nan_model(), torch.randn(2, 4), None))
    assert cli.main(["debug", "--model", "vgg", "--rules", "lrp-epsilon", "--strict"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "roll" in err[0]


def test_nonfinite_input_names_the_sample():
    """item 9: NaN in x gave NaN relevance and target argmax(NaN) = 0 for that sample."""
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    x = torch.randn(5, 4)
    x[3, 1] = float("nan")
    x[1, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"sample\(s\) 1, 3 "):
        Explainer(model)(x)


def test_float16_is_refused_clearly():
    """item 3: float16 on the CPU gave 100 % NaN relevance and no error."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).eval().half()
    with pytest.raises(TypeError, match="float16 is not supported"):
        Explainer(model)(torch.randn(2, 4).half())
    e = Explainer(model.bfloat16())(torch.randn(2, 4).bfloat16())  # bfloat16 still works
    assert e.relevance.dtype == torch.bfloat16 and torch.isfinite(e.relevance).all()


class FanOut(nn.Module):
    """x -> a -> (b, c) -> cat -> head: node `a` fans out to two users."""

    def __init__(self):
        super().__init__()
        lin = lambda i, o: nn.Linear(i, o, bias=False)  # noqa: E731  (LRP-0 then conserves exactly)
        self.a, self.b, self.c, self.head = lin(4, 4), lin(4, 3), lin(4, 3), lin(6, 3)

    def forward(self, x):
        h = self.a(x)
        return self.head(torch.cat([self.b(h), self.c(h)], 1))


@pytest.mark.parametrize("preset", ["abslrp", "lrp-0"])
def test_broken_fanout_sum_shows_as_a_leak(monkeypatch, preset):
    """item 4: the report measured each rule before the fan-out sum, so a sum that dropped a
    user's relevance looked like cancellation, never a leak."""
    from lrpgraph import walk

    x = torch.randn(2, 4)
    model = FanOut().eval()
    assert not Explainer(model, rules=preset)(x).conservation().leaks()
    monkeypatch.setattr(walk, "_add", lambda a, b: b if a is None else a)  # drop later deliveries
    leaks = [r.name for r in Explainer(model, rules=preset)(x).conservation().leaks()]
    assert "a" in leaks


def test_fanout_into_the_input_is_checked(monkeypatch):
    """item 4: an input used twice (x + relu(x)) gets its own row, so its fan-out sum is checked."""
    from lrpgraph import walk

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 3, bias=False)

        def forward(self, x):
            return self.head(x + torch.relu(x))

    rep = Explainer(M().eval(), rules="lrp-0")(torch.randn(2, 4)).conservation()
    assert rep["x"].rule == "input" and not rep.leaks()
    monkeypatch.setattr(walk, "_add", lambda a, b: b if a is None else a)
    assert "x" in [r.name for r in Explainer(M().eval(), rules="lrp-0")(torch.randn(2, 4)).conservation().leaks()]


def test_users_graph_module_is_never_modified():
    """item 5: Explainer(gm) rewrote the user's graph (BatchNorm folded away); recompile failed."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).eval()
    gm = fx.symbolic_trace(model)
    before = gm.code
    x = torch.randn(2, 1, 4, 4)
    Explainer(gm, rules="lrp-epsilon")(x)  # folds BatchNorm into the convolution (its own copy)
    assert gm.code == before
    gm.recompile()
    torch.testing.assert_close(gm(x), model(x))


def test_hooks_on_the_root_module_are_refused():
    """item 6: hooks on the root were ignored, so the explained logits differed from model(x)."""
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    model.register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(ValueError, match="forward hooks"):
        Explainer(model)
    inner = nn.Sequential(nn.Sequential(nn.Linear(4, 4)), nn.Linear(4, 3)).eval()
    ex = Explainer(inner)
    h = inner[0].register_forward_pre_hook(lambda m, i: (i[0] * 0,))  # a traced-through container
    with pytest.raises(ValueError, match=r"module `0`"):
        ex(torch.randn(2, 4))
    h.remove()
    inner[1].register_forward_hook(lambda m, i, o: None)  # a leaf: its hook runs, nothing to refuse
    ex(torch.randn(2, 4))


def test_tracing_in_threads_is_serialised():
    """item 7: Explainers built in several threads at once broke every later model(x)."""

    def make(i):
        torch.manual_seed(i)
        return nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(30)], nn.Linear(8, 3)).eval()

    models = [make(i) for i in range(8)]
    x = torch.randn(2, 8)
    ref = [m(x) for m in models]
    errors: list = []
    start = threading.Barrier(len(models))

    def work(m, r):
        start.wait()
        try:
            for _ in range(4):
                e = Explainer(m, rules="lrp-0")(x, report=False)
                torch.testing.assert_close(e.logits, r)
        except Exception as exc:  # noqa: BLE001  (collected and asserted below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(m, r)) for m, r in zip(models, ref)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for m, r in zip(models, ref):  # plain forwards still work afterwards
        torch.testing.assert_close(m(x), r)


def test_report_probe_does_not_grow_the_fake_tensor_cache():
    """item 8: the batch-axis probe filled torch's class-level FakeTensorMode cache (text inputs of
    many lengths: memory without bound)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    ex = Explainer(model)
    ex(torch.randn(2, 4))
    before = len(FakeTensorMode.cache)
    for n in range(1, 41):  # 40 new input signatures
        ex(torch.randn(n, 4))
    assert len(FakeTensorMode.cache) - before <= 5


@pytest.mark.parametrize("target, match", [
    (torch.zeros(2, 0, dtype=torch.long), "no targets"),
    ("cat", "class indices"),
    (2 ** 70, "out of range"),
    ([2 ** 70, 1], r"class indices in \[0, 3\)"),
])
def test_bad_targets_get_clear_errors(target, match):
    """item 10: a (B, 0) target, a string and 2**70 crashed inside torch."""
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    with pytest.raises(ValueError, match=match):
        Explainer(model)(torch.randn(2, 4), target=target)


def test_perturbation_batch_size_must_be_positive():
    """item 10: ABPC(batch_size=0) was accepted (and failed later)."""
    from lrpgraph.evaluate import ABPC, MoRF

    for cls in (ABPC, MoRF):
        with pytest.raises(ValueError, match="batch_size"):
            cls(batch_size=0)
