"""Tests of nc_lib.ufm: the model, the trainer, resume, the theorem, the landscape tools."""
from __future__ import annotations

import math

import pytest
import torch

from nc_lib import ufm, ufm_theory
from nc_lib.etf import gram_distance_to_etf
from nc_lib.heads import Head, LinearHead
from nc_lib.ufm import UFMConfig, UFMHistory, start_ufm, train_ufm, ufm_objective
from nc_lib.ufm_theory import (UFMObjective, lanczos_smallest, origin_saddle, planar_angles, power_iteration_smallest,
                               theorem_objective_1d, theorem_rho_closed_form, ufm_global_minimum, ufm_optimal_objective)

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems: one torch thread avoids waiting on a core shared with other work."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


SMALL = dict(num_classes=4, n_per_class=6, feature_dim=8, dtype="float64", init_scale=0.5)


def small(**kw) -> UFMConfig:
    return UFMConfig(**{**SMALL, **kw})


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kw, words", [
    (dict(loss="hinge"), ["loss", "ce", "mse"]),
    (dict(optimizer="rmsprop"), ["optimizer", "gd", "sgd", "adam", "lbfgs"]),
    (dict(head="cosine"), ["head", "linear", "fixed_etf"]),
    (dict(dtype="float16"), ["dtype", "float32", "float64"]),
    (dict(n_per_class=[3, 4]), ["n_per_class", "num_classes=4"]),
    (dict(num_classes=1), ["num_classes"]),
    (dict(lambda_W=-1.0), ["lambda_W"]),
    (dict(lr=0.0), ["lr"]),
    (dict(batch_size=8), ["batch_size", "sgd", "adam"]),
    (dict(momentum=0.9, optimizer="adam"), ["momentum"]),
    (dict(head="fixed_etf", feature_dim=3), ["feature_dim", "num_classes"]),
])
def test_bad_config_names_parameter_and_choices(kw, words):
    with pytest.raises(ValueError) as err:
        small(**kw).validate()
    for w in words:
        assert w in str(err.value)


def test_unknown_dict_field_and_bad_steps():
    with pytest.raises(ValueError, match="unknown UFM config field"):
        ufm.as_config({"num_class": 3})
    with pytest.raises(ValueError, match="steps"):
        train_ufm(small(), steps=-1, progress=False)
    with pytest.raises(ValueError, match="measure_every"):
        train_ufm(small(), steps=2, measure_every=0, progress=False)


def test_divergence_is_reported_with_lr():
    with pytest.raises(FloatingPointError, match="lr"):
        train_ufm(small(loss="mse", lr=50.0, dtype="float32"), steps=60, measure_every=5, progress=False)


# --------------------------------------------------------------------------- model and records
def test_objective_matches_formula_and_records():
    cfg = small(lambda_W=1e-2, lambda_H=2e-2, lambda_b=3e-2)
    h = train_ufm(cfg, steps=10, measure_every=5, progress=False)
    assert [r["step"] for r in h.records] == [0, 5, 10]
    assert len(h.snapshots) == 3
    p = h.parameters()
    f = ufm_objective(p["W"], p["H"], p["b"], h.labels, lambda_W=1e-2, lambda_H=2e-2, lambda_b=3e-2)
    assert h.last["objective"] == pytest.approx(float(f), rel=1e-12)
    for key in ufm.RECORD_KEYS + ("within_class_variability", "classifier_etf_distance", "classifier_means_alignment",
                                  "bias_offset_norm", "self_duality", "ncc_mismatch", "equinorm_means"):
        assert key in h.last, key
    snap = h.snapshots[-1]
    assert snap["means"].shape == (4, 8) and snap["W"].shape == (4, 8)
    assert snap["features"].shape == (4 * 6, 8)  # snapshot_features_per_class=10 > 6: all features
    assert torch.allclose(snap["means"], p["H"].reshape(4, 6, 8).mean(1))


def test_unbalanced_counts_and_labels():
    cfg = small(n_per_class=[2, 5, 3, 7])
    h = train_ufm(cfg, steps=5, measure_every=5, progress=False)
    assert torch.bincount(h.labels).tolist() == [2, 5, 3, 7]
    assert h.model.H.shape == (17, 8)
    with pytest.raises(ValueError, match="balanced|d >= C-1|n"):
        ufm_global_minimum(4, 0, 8, 1e-3, 1e-3)


def test_deterministic_for_a_seed():
    a = train_ufm(small(optimizer="sgd", batch_size=5), steps=30, measure_every=10, progress=False)
    b = train_ufm(small(optimizer="sgd", batch_size=5), steps=30, measure_every=10, progress=False)
    c = train_ufm(small(optimizer="sgd", batch_size=5, seed=1), steps=30, measure_every=10, progress=False)
    assert torch.equal(a.model.H, b.model.H)
    assert a.records[-1]["objective"] == b.records[-1]["objective"]
    assert not torch.equal(a.model.H, c.model.H)


def _strip_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


@pytest.mark.parametrize("opt", ["gd", "sgd", "adam", "lbfgs"])
def test_resume_gives_identical_results(opt, tmp_path):
    kw = dict(optimizer=opt, batch_size=7 if opt in ("sgd", "adam") else None,
              momentum=0.5 if opt == "sgd" else 0.0, lr=0.5 if opt == "sgd" else None)
    straight = train_ufm(small(**kw), steps=40, measure_every=10, progress=False)
    part = train_ufm(small(**kw), steps=20, measure_every=10, progress=False)
    resumed = train_ufm(None, steps=20, measure_every=10, history=part, progress=False)
    assert resumed.step == 40
    for name, p in straight.model.state_dict().items():
        assert torch.equal(p, resumed.model.state_dict()[name]), name
    assert _strip_time(straight.records) == _strip_time(resumed.records)
    # and through a file
    part2 = train_ufm(small(**kw), steps=20, measure_every=10, progress=False)
    part2.save(tmp_path / "run.pt")
    loaded = UFMHistory.load(tmp_path / "run.pt")
    train_ufm(None, steps=20, measure_every=10, history=loaded, progress=False)
    assert torch.equal(loaded.model.H, straight.model.H)
    assert _strip_time(loaded.records) == _strip_time(straight.records)


def test_resume_rejects_other_config_and_stop_when():
    h = train_ufm(small(), steps=10, measure_every=5, progress=False)
    with pytest.raises(ValueError, match="config differs"):
        train_ufm(small(seed=3), steps=5, history=h, progress=False)
    h = train_ufm(small(), steps=100, measure_every=5, progress=False, stop_when=lambda hist: hist.step >= 15)
    assert h.stopped_early and h.step == 15
    train_ufm(None, steps=5, measure_every=5, history=h, progress=False)
    assert h.step == 20 and not h.stopped_early


def test_fast_gd_path_matches_autograd():
    for loss in ("ce", "mse"):
        fast = train_ufm(small(loss=loss, lr=0.5), steps=50, measure_every=25, progress=False)
        slow = start_ufm(small(loss=loss, lr=0.5), fast_path=False)
        assert fast.uses_fast_path and not slow.uses_fast_path
        train_ufm(None, steps=50, measure_every=25, history=slow, progress=False)
        assert torch.allclose(fast.model.H, slow.model.H, rtol=1e-10, atol=1e-12)
        assert torch.allclose(fast.model.head.linear.weight, slow.model.head.linear.weight, rtol=1e-10, atol=1e-12)


def test_pluggable_heads():
    fixed = train_ufm(small(head="fixed_etf"), steps=200, measure_every=100, progress=False)
    assert fixed.last["classifier_etf_distance"] < 1e-6  # the fixed head is an ETF and stays one
    assert fixed.records[-1]["objective"] < fixed.records[0]["objective"]

    def no_bias_head(d: int, C: int) -> LinearHead:
        return LinearHead(d, C, bias=False)

    h = train_ufm(small(head=no_bias_head), steps=20, measure_every=10, progress=False)
    assert h.last["norm_b"] == 0.0 and h.parameters()["b"] is None

    class TemperatureHead(Head):
        """A head the trainer has never seen: logits = t * W h, t and W learned."""

        def __init__(self, d: int, C: int) -> None:
            super().__init__()
            self.num_classes, self.feature_dim = C, d
            self.weight = torch.nn.Parameter(0.1 * torch.randn(C, d))
            self.temperature = torch.nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.temperature * x @ self.weight.T

        def classifier(self):
            return (self.temperature * self.weight).detach(), None

    for opt in ("gd", "adam", "lbfgs"):
        h = train_ufm(small(head=TemperatureHead, optimizer=opt, lr=0.5 if opt == "gd" else None), steps=60, measure_every=30, progress=False)
        assert not h.uses_fast_path
        assert h.records[-1]["objective"] < h.records[0]["objective"]
        # both head parameters are decayed with lambda_W (neither is named "bias")
        assert [n for n, _, _ in h.model.param_groups()] == ["H", "W"]


def test_mse_and_adam_decrease_objective():
    for kw in (dict(loss="mse"), dict(optimizer="adam"), dict(optimizer="sgd", batch_size=6, lr=0.5)):
        h = train_ufm(small(**kw), steps=100, measure_every=50, progress=False)
        assert h.records[-1]["objective"] < 0.8 * h.records[0]["objective"], kw


# --------------------------------------------------------------------------- the theorem
@pytest.mark.parametrize("C, n, lw, lh", [(3, 10, 1e-2, 1e-2), (10, 100, 5e-4, 5e-4), (6, 5, 1e-3, 5e-3), (100, 3, 1e-4, 2e-4)])
def test_numeric_rho_matches_closed_form(C, n, lw, lh):
    rho = ufm_theory._solve_rho(C, n, lw, lh)
    assert rho == pytest.approx(theorem_rho_closed_form(C, n, lw, lh), rel=1e-13)
    # the 1-D function really is minimised there
    g = theorem_objective_1d(rho, C, n, lw, lh)
    assert g <= theorem_objective_1d(rho * (1 + 1e-6), C, n, lw, lh)
    assert g <= theorem_objective_1d(rho * (1 - 1e-6), C, n, lw, lh)


@pytest.mark.parametrize("C, n, d, lw, lh, lb", [(3, 10, 2, 1e-2, 1e-2, 1e-2), (5, 4, 7, 1e-3, 5e-3, 0.0),
                                                 (10, 20, 12, 5e-4, 5e-4, 5e-4)])
def test_global_minimum_satisfies_first_order_conditions(C, n, d, lw, lh, lb):
    gm = ufm_global_minimum(C, n, d, lw, lh, lb, rotate=True, seed=1)
    obj = UFMObjective(gm.labels, C, d, lambda_W=lw, lambda_H=lh, lambda_b=lb)
    theta = obj.pack(gm.W, gm.H, gm.b)
    assert float(obj(theta)) == pytest.approx(gm.objective, rel=1e-13)
    assert float(obj.gradient(theta).norm()) < 1e-12
    assert gram_distance_to_etf(gm.W) < 1e-12
    assert torch.allclose(gm.W.norm(dim=1), torch.full((C,), gm.classifier_norm, dtype=torch.float64))
    assert torch.allclose(gm.H.norm(dim=1), torch.full((C * n,), gm.feature_norm, dtype=torch.float64))
    assert ufm_optimal_objective(C, n, lw, lh) == pytest.approx(gm.objective, rel=1e-15)


def test_trivial_regime_and_low_dimension():
    gm = ufm_global_minimum(4, 10, 5, 1.0, 1.0)  # C sqrt(n lw lh) >= 1
    assert gm.trivial and gm.objective == pytest.approx(math.log(4))
    with pytest.raises(ValueError, match="d >= C-1"):
        ufm_global_minimum(5, 3, 2, 1e-3, 1e-3)


@pytest.mark.parametrize("C, n, d, lw, lh, lb", [(3, 10, 2, 1e-2, 1e-2, 1e-2), (4, 8, 8, 5e-3, 1e-2, 0.0),
                                                 (5, 6, 4, 1e-3, 5e-3, 1e-3), (10, 10, 20, 5e-4, 5e-4, 5e-4)])
def test_training_reaches_theorem(C, n, d, lw, lh, lb):
    cfg = UFMConfig(num_classes=C, n_per_class=n, feature_dim=d, lambda_W=lw, lambda_H=lh, lambda_b=lb,
                    optimizer="lbfgs", dtype="float64", init_scale=0.5)
    h = train_ufm(cfg, steps=300, measure_every=100, progress=False)
    f_star = ufm_optimal_objective(C, n, lw, lh)
    assert abs(h.last["objective"] - f_star) / f_star < 1e-4
    assert gram_distance_to_etf(h.parameters()["W"]) < 1e-3
    assert h.last["within_class_variability"] < 1e-6


def test_gd_float64_reaches_theorem():
    cfg = UFMConfig(num_classes=3, n_per_class=10, feature_dim=5, lambda_W=1e-2, lambda_H=1e-2, lambda_b=1e-2,
                    dtype="float64", lr=1.0, init_scale=0.5)
    h = train_ufm(cfg, steps=3000, measure_every=1000, progress=False)
    f_star = ufm_optimal_objective(3, 10, 1e-2, 1e-2)
    assert abs(h.last["objective"] - f_star) / f_star < 1e-6
    gm = ufm_global_minimum(3, 10, 5, 1e-2, 1e-2, 1e-2)
    W = h.parameters()["W"]
    assert torch.allclose(W.norm(dim=1), torch.full((3,), gm.classifier_norm, dtype=torch.float64), rtol=1e-4)
    # self-duality with the theorem's scale: h_{c,i} = sqrt(lambda_W/(lambda_H n)) w_c
    H = h.parameters()["H"].reshape(3, 10, 5)
    assert torch.allclose(H, gm.feature_scale * W[:, None, :].expand(3, 10, 5), atol=1e-4)


def test_low_dimension_gives_regular_polygon():
    cfg = UFMConfig(num_classes=5, n_per_class=10, feature_dim=2, optimizer="lbfgs", dtype="float64",
                    lambda_W=1e-3, lambda_H=1e-3, lambda_b=1e-3, init_scale=0.5)
    h = train_ufm(cfg, steps=400, measure_every=200, progress=False)
    gaps = planar_angles(h.parameters()["W"])
    assert torch.allclose(gaps, torch.full((5,), 2 * math.pi / 5, dtype=torch.float64), atol=2e-2)
    assert h.last["within_class_variability"] < 1e-6
    with pytest.raises(ValueError, match="C x 2"):
        planar_angles(torch.zeros(3, 3))


# --------------------------------------------------------------------------- the landscape
def test_origin_is_strict_saddle_and_lanczos_finds_it():
    s = origin_saddle(4, 10, 6, 1e-3, 1e-3)
    assert s.gradient_norm < 1e-14
    assert s.value == pytest.approx(math.log(4))
    assert s.analytic_min_eigenvalue < 0
    hvp = lambda v: s.objective.hvp(s.theta, v)  # noqa: E731
    lam, v, _ = lanczos_smallest(hvp, s.objective.dim, iterations=80)
    assert lam == pytest.approx(s.analytic_min_eigenvalue, rel=1e-8)
    assert float((hvp(v) - lam * v).norm()) < 1e-8
    lam_p, _ = power_iteration_smallest(hvp, s.objective.dim, shift=1.0, iterations=150)
    assert lam_p == pytest.approx(lam, rel=1e-5)
    # f decreases quadratically along v: f(eps v) - f(0) = lam eps^2 / 2 + O(eps^4)
    eps = 1e-2
    assert float(s.objective(eps * v)) - s.value == pytest.approx(0.5 * lam * eps ** 2, rel=1e-3)
    # escaping along v reaches the global minimum
    W, H, b = s.objective.unpack(1e-3 * v)
    cfg = UFMConfig(num_classes=4, n_per_class=10, feature_dim=6, lambda_W=1e-3, lambda_H=1e-3, lambda_b=1e-3,
                    dtype="float64", lr=10.0)
    h = start_ufm(cfg, W=W, H=H, b=b)
    train_ufm(None, steps=600, measure_every=300, history=h, progress=False)
    assert h.last["objective"] == pytest.approx(ufm_optimal_objective(4, 10, 1e-3, 1e-3), rel=1e-6)
    # while the origin itself does not move under gradient descent
    still = start_ufm(cfg, W=W * 0, H=H * 0, b=b * 0)
    train_ufm(None, steps=50, measure_every=50, history=still, progress=False)
    assert still.last["objective"] == pytest.approx(math.log(4), rel=1e-12)
    # at the origin there are no class means to measure collapse against: undefined (NaN), never a number
    assert math.isnan(still.last["within_class_variability"]) and math.isnan(still.last["classifier_etf_distance"])


def test_origin_is_minimum_when_regularisation_dominates():
    s = origin_saddle(4, 10, 6, 0.2, 0.2)  # C sqrt(n lw lh) > 1
    lam, _, _ = lanczos_smallest(lambda v: s.objective.hvp(s.theta, v), s.objective.dim, iterations=60)
    assert s.wh_block_min_eigenvalue > 5e-4 and s.analytic_min_eigenvalue == 5e-4  # lambda_b, along b = 1
    assert lam == pytest.approx(s.analytic_min_eigenvalue, rel=1e-8)


def test_lanczos_on_a_known_matrix():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 30, generator=g, dtype=torch.float64)
    A = A + A.T
    lam, v, evals = lanczos_smallest(lambda x: A @ x, 30, iterations=30)
    assert lam == pytest.approx(float(torch.linalg.eigvalsh(A)[0]), rel=1e-10)


def test_markou_heads_plug_into_the_ufm_unchanged():
    """The implicit ETF head (reads labels while training) and the cosine head (rows renormalised after
    each step) train in the ordinary UFM trainer, and the implicit head's classifier is an ETF."""
    from nc_lib.etf import gram_distance_to_etf
    from nc_lib.heads import CosineHead, ImplicitETFHead

    cfg = dict(num_classes=4, n_per_class=8, feature_dim=8, seed=0)
    h = train_ufm(UFMConfig(**cfg, optimizer="gd", lr=0.5, head=lambda d, C: ImplicitETFHead(d, C)), 60, 20,
                  progress=False)
    assert gram_distance_to_etf(h.model.head.classifier()[0]) < 1e-6
    assert h.last["accuracy"] == 1.0
    h = train_ufm(UFMConfig(**cfg, optimizer="adam", lr=0.05, head=lambda d, C: CosineHead(d, C)), 60, 20,
                  progress=False)
    rows = h.model.head.classifier()[0].norm(dim=1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)


def test_theory_moved_out_of_ufm_still_imports_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="nc_lib.ufm_theory.ufm_global_minimum"):
        from nc_lib.ufm import ufm_global_minimum as old
    assert old is ufm_global_minimum
    with pytest.raises(AttributeError):
        ufm.no_such_name
