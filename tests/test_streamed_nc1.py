"""Within-class variability Tr(Sigma_W Sigma_B^+)/C streamed through the second pass (issue 16, section 4):
no p x p scatter in the first pass, the centred features projected on the final between-class subspace in the
second, equal to the in-memory measure_collapse."""
import pytest
import torch

from nc_lib import metrics
from nc_lib.features import measure
from nc_lib.models import build_model


def problem(C=5, p=40, counts=(30, 17, 44, 25, 9), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    y = y[torch.randperm(len(y), generator=g)]
    H = (3 * torch.randn(C, p, generator=g, dtype=torch.float64))[y] + torch.randn(len(y), p, generator=g,
                                                                                    dtype=torch.float64)
    W = torch.randn(C, p, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    return H.to(dtype), y, W, b


def two_pass(H, y, C, W=None, b=None, batch=23, keep_scatter=False):
    acc = metrics.CollapseAccumulator(C, keep_scatter=keep_scatter)
    for s in range(0, len(y), batch):
        acc.update(H[s:s + batch], y[s:s + batch])
    out = acc.result(W, b)
    sp = acc.sample_pass(W, b, within_class=True)
    for s in range(0, len(y), batch):
        sp.update(H[s:s + batch], y[s:s + batch])
    out.update(sp.result())
    return out, acc


@pytest.mark.parametrize("convention", ["class_means", "samples"])
def test_second_pass_equals_in_memory_in_float64(convention):
    H, y, W, b = problem()
    C = 5
    ref = metrics.measure_collapse(H, y, C, W, b, mean_convention=convention)
    acc = metrics.CollapseAccumulator(C, keep_scatter=False, mean_convention=convention)
    for s in range(0, len(y), 23):
        acc.update(H[s:s + 23], y[s:s + 23])
    got = acc.result(W, b)
    assert "within_class_variability" not in got  # no scatter, no one-pass NC1
    sp = acc.sample_pass(W, b, within_class=True)
    for s in range(0, len(y), 23):
        sp.update(H[s:s + 23], y[s:s + 23])
    got.update(sp.result())
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-10, abs=1e-13), key
    # and the one-pass scatter agrees with both
    one_pass = metrics.CollapseAccumulator(C, mean_convention=convention)
    one_pass.update(H, y)
    assert one_pass.result()["within_class_variability"] == pytest.approx(ref["within_class_variability"], rel=1e-10)


def test_second_pass_is_accurate_at_collapse_in_float32():
    # tiny spread around large means: the shared product (h - mu_G).Mdot_c - (mu_y - mu_G).Mdot_c would cancel
    # in float32; the deviations from the class shifts do not
    g = torch.Generator().manual_seed(0)
    C, p, n = 6, 32, 200
    y = torch.arange(C).repeat(n)
    means = 100 * torch.randn(C, p, generator=g, dtype=torch.float64) + 500
    H64 = (means[y] + 1e-4 * torch.randn(len(y), p, generator=g, dtype=torch.float64)).float().double()
    exact = metrics.measure_collapse(H64, y, C)["within_class_variability"]  # float64, on the same inputs
    got = two_pass(H64.float(), y, C, batch=64)[0]["within_class_variability"]
    # h - k_y is exact in float32 here (Sterbenz: both within a factor 2), the projection rounds at ~1e-7
    assert got == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("scale", [2.0 ** 70, 1e-30])
def test_second_pass_is_invariant_under_feature_scale(scale):
    H, y, W, b = problem(dtype=torch.float32)
    ref = two_pass(H, y, 5)[0]["within_class_variability"]
    assert two_pass(H * scale, y, 5)[0]["within_class_variability"] == pytest.approx(ref, rel=1e-4)


def test_without_scatter_the_one_pass_quantities_say_so():
    H, y, W, b = problem()
    acc = metrics.CollapseAccumulator(5, keep_scatter=False)
    acc.update(H, y)
    assert acc.scatter is None
    with pytest.raises(ValueError, match="keep_scatter"):
        acc.within_class_scatter_projected(torch.ones(2, H.shape[1], dtype=torch.float64))
    with pytest.raises(ValueError, match="keep_scatter"):
        metrics.CollapseAccumulator(5, keep_scatter="no")
    with pytest.raises(ValueError, match="within_class"):
        metrics.SampleAccumulator(acc.means, acc.global_mean, shift=acc.shift)
    with pytest.raises(ValueError, match="shift"):
        metrics.SampleAccumulator(acc.means, acc.global_mean, within_class=True, shift=acc.shift[:2])


def test_a_shift_that_float32_cannot_hold_still_centres_on_the_class_mean():
    # after a merge across ranks the shift is the float64 class mean; the offsets use the shift as cast
    H, y, W, b = problem(dtype=torch.float32)
    ref = metrics.measure_collapse(H.double(), y, 5)["within_class_variability"]
    acc = metrics.CollapseAccumulator(5, keep_scatter=False)
    acc.update(H, y)
    sp = metrics.SampleAccumulator(acc.means, acc.global_mean, within_class=True, shift=acc.means + 1e-3 / 3)
    sp.update(H, y)
    assert sp.result()["within_class_variability"] == pytest.approx(ref, rel=1e-5)


def test_engine_measure_takes_nc1_from_the_second_pass():
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=4, input_shape=(6,), hidden=16, depth=2).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(90, 6, generator=g, dtype=torch.float64)
    y = torch.arange(90) % 4
    loader = [(x[s:s + 32], y[s:s + 32]) for s in range(0, 90, 32)]
    dev = torch.device("cpu")
    one, acc_one = measure(model, loader, None, 4, dev)
    two, acc_two = measure(model, loader, None, 4, dev, train_sample_pass=True)
    assert acc_one.scatter is not None and acc_two.scatter is None
    assert two["within_class_variability"] == pytest.approx(one["within_class_variability"], rel=1e-10)
    model.eval()
    with torch.no_grad():
        feats = model.features(x)
    W, b_ = model.head.classifier()
    ref = metrics.measure_collapse(feats, y, 4, W, b_)
    for key in ("within_class_variability", "ncc_mismatch", "average_cosine_margin", "self_duality"):
        assert two[key] == pytest.approx(ref[key], rel=1e-10, abs=1e-13), key
