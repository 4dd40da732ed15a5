"""The collapse measurements against closed forms, hand-computed cases and naive references."""
import math

import pytest
import torch

from nc_lib import etf, metrics


def naive_within_class(H, y, C):
    """Papyan's definition written out: per-sample loop and a p x p pseudo-inverse."""
    mu = torch.stack([H[y == c].mean(0) for c in range(C)])
    mu_G = mu.mean(0)
    Sw = sum(torch.outer(H[i] - mu[y[i]], H[i] - mu[y[i]]) for i in range(len(y))) / len(y)
    Sb = (mu - mu_G).T @ (mu - mu_G) / C
    return float(torch.trace(Sw @ torch.linalg.pinv(Sb))) / C


def random_problem(C=4, p=9, counts=(7, 3, 12, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    y = y[torch.randperm(len(y), generator=g)]
    centres = 3 * torch.randn(C, p, generator=g, dtype=torch.float64)
    H = centres[y] + torch.randn(len(y), p, generator=g, dtype=torch.float64)
    W = torch.randn(C, p, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    return H, y, W, b


def test_exact_etf_with_zero_spread_is_fully_collapsed():
    C, p, n = 5, 12, 4
    E = etf.simplex_etf(C, p, rotate=True, seed=0)
    y = torch.arange(C).repeat(n)
    H = 2.0 * E[y] + 0.7  # every feature on its mean; means an ETF around a global offset
    W = 3.0 * E
    b = -(W @ torch.full((p,), 0.7, dtype=torch.float64))
    m = metrics.measure_collapse(H, y, C, W, b)
    for key in ("within_class_variability", "equinorm_means", "equinorm_classifiers", "max_angle_means",
                "max_angle_classifiers", "equiangularity_means", "self_duality", "classifier_etf_distance",
                "means_etf_distance", "classifier_means_alignment", "bias_offset_norm", "wh_equinorm",
                "ncc_mismatch"):
        assert abs(m[key]) < 1e-10, key
    assert m["accuracy"] == 1.0
    # cosine margin of an exact ETF: 1 - (-1/(C-1))
    assert m["average_cosine_margin"] == pytest.approx(1 + 1 / (C - 1))


def test_hand_computed_case():
    # class 0: (1,1), (3,1) -> mu0 = (2,1); class 1: (-2,-1), (-2,-3) -> mu1 = (-2,-2); mu_G = (0,-0.5)
    H = torch.tensor([[1.0, 1.0], [3.0, 1.0], [-2.0, -1.0], [-2.0, -3.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    m = metrics.measure_collapse(H, y, 2, W)
    # Sigma_W = I/2, Sigma_B = v v^T with v = (2, 1.5): Tr(Sigma_W Sigma_B^+) = 0.5/|v|^2 = 0.08, /C = 0.04
    assert m["within_class_variability"] == pytest.approx(0.04, rel=1e-12)
    assert m["equinorm_classifiers"] == pytest.approx(1 / 3, rel=1e-12)  # norms 1 and 2
    assert m["max_angle_classifiers"] == pytest.approx(1.0)  # cos = 0, target -1
    assert m["equinorm_means"] == pytest.approx(0.0, abs=1e-12)
    Wn = W / W.norm()
    Md = torch.tensor([[2.0, 1.5], [-2.0, -1.5]], dtype=torch.float64)
    assert m["self_duality"] == pytest.approx(float(((Wn - Md / Md.norm()) ** 2).sum()))
    # logits W h: (1,2)->1, (3,2)->0, (-2,-2)->0 (tie, first), (-2,-6)->0 ; NCC: 0, 0, 1, 1
    assert m["accuracy"] == pytest.approx(1 / 4)
    assert m["ncc_mismatch"] == pytest.approx(3 / 4)
    assert m["ncc_accuracy"] == 1.0
    assert m["bias_offset_norm"] == pytest.approx(float((W @ torch.tensor([0.0, -0.5], dtype=torch.float64)).norm()))


def test_random_features_match_naive_definitions():
    H, y, W, b = random_problem()
    C = 4
    m = metrics.measure_collapse(H, y, C, W, b)
    assert m["within_class_variability"] == pytest.approx(naive_within_class(H, y, C), rel=1e-10)
    mu = torch.stack([H[y == c].mean(0) for c in range(C)])
    pred = (H @ W.T + b).argmax(1)
    ncc = torch.cdist(H, mu).argmin(1)
    assert m["ncc_mismatch"] == pytest.approx(float((pred != ncc).double().mean()))
    assert m["accuracy"] == pytest.approx(float((pred == y).double().mean()))
    Wc = W - W.mean(0)
    cos = torch.nn.functional.normalize(H - mu.mean(0), dim=1) @ torch.nn.functional.normalize(Wc, dim=1).T
    own = cos[torch.arange(len(y)), y]
    cos[torch.arange(len(y)), y] = -2
    margins = own - cos.max(1).values
    assert m["average_cosine_margin"] == pytest.approx(float(margins.mean()), rel=1e-12)
    assert torch.allclose(metrics.cosine_margins(H, y, W, mu.mean(0)), margins, atol=1e-12)
    Mdot = mu - mu.mean(0)
    A = W @ Mdot.T
    target = (torch.eye(C, dtype=torch.float64) - 1 / C) / (C - 1) ** 0.5
    assert m["classifier_means_alignment"] == pytest.approx(float((A / A.norm() - target).norm()))
    G = W @ W.T
    assert m["classifier_etf_distance"] == pytest.approx(float((G / G.norm() - target).norm()))
    assert m["bias_offset_norm"] == pytest.approx(float((W @ mu.mean(0) + b).norm()))
    assert m["wh_equinorm"] == pytest.approx(abs(etf.equinorm(Mdot) - etf.equinorm(W)))


def test_papyan_colab_convention_is_C_times_ours():
    H, y, _, _ = random_problem()
    C = 4
    mu = torch.stack([H[y == c].mean(0) for c in range(C)])
    Sw = (H - mu[y]).T @ (H - mu[y]) / len(y)
    Sb = (mu - mu.mean(0)).T @ (mu - mu.mean(0)) / C
    colab = float(torch.trace(Sw @ torch.linalg.pinv(Sb)))  # Papyan's Colab: no /C
    ours = metrics.measure_collapse(H, y, C)["within_class_variability"]
    assert colab == pytest.approx(C * ours, rel=1e-10)


@pytest.mark.parametrize("batch", [1, 5, 13, 1000])
def test_streaming_equals_in_memory(batch):
    H, y, W, b = random_problem(counts=(20, 3, 41, 9), seed=1)
    H_test, y_test, _, _ = random_problem(counts=(5, 5, 5, 5), seed=2)
    full = metrics.measure_collapse(H, y, 4, W, b, H_test, y_test)
    acc = metrics.CollapseAccumulator(4)
    for s in range(0, len(y), batch):
        acc.update(H[s:s + batch], y[s:s + batch])
    streamed = acc.result(W, b)
    train_pass = acc.sample_pass(W, b)
    test_pass = acc.sample_pass(W, b)
    for s in range(0, len(y), batch):
        train_pass.update(H[s:s + batch], y[s:s + batch])
    test_pass.update(H_test, y_test)
    streamed.update(train_pass.result())
    streamed.update(test_pass.result("_test"))
    assert set(streamed) == set(full)
    for k in full:
        assert streamed[k] == pytest.approx(full[k], rel=1e-10, abs=1e-12), k


def test_unbalanced_classes_use_the_mean_of_class_means():
    H, y, _, _ = random_problem(counts=(50, 2, 9, 3), seed=4)
    m = metrics.measure_collapse(H, y, 4)
    assert m["within_class_variability"] == pytest.approx(naive_within_class(H, y, 4), rel=1e-10)
    means, counts = metrics.class_means(H, y, 4)
    assert counts.tolist() == [50, 2, 9, 3]
    sample_mean = metrics.global_mean(means, counts, "samples")
    assert torch.allclose(sample_mean, H.mean(0))
    assert not torch.allclose(sample_mean, metrics.global_mean(means, counts))


def test_streaming_is_accurate_at_collapse_in_float32():
    # tiny spread around large means: E[hh^T] - mu mu^T would cancel catastrophically in float32
    g = torch.Generator().manual_seed(0)
    C, p, n = 6, 32, 200
    y = torch.arange(C).repeat(n)
    means = 100 * torch.randn(C, p, generator=g, dtype=torch.float64) + 500
    H64 = means[y] + 1e-3 * torch.randn(len(y), p, generator=g, dtype=torch.float64)
    exact = metrics.measure_collapse(H64, y, C)["within_class_variability"]
    acc = metrics.CollapseAccumulator(C)
    H32 = H64.float()
    for s in range(0, len(y), 64):
        acc.update(H32[s:s + 64], y[s:s + 64])
    assert acc.result()["within_class_variability"] == pytest.approx(exact, rel=0.05)
    assert metrics.measure_collapse(H32, y, C)["within_class_variability"] == pytest.approx(exact, rel=0.05)


def test_bad_inputs_name_the_problem():
    H, y, W, b = random_problem()
    bad = H.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        metrics.measure_collapse(bad, y, 4)
    bad[3, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        metrics.CollapseAccumulator(4).update(bad, y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=4\)"):
        metrics.measure_collapse(H, torch.where(y == 0, 4, y), 4)
    with pytest.raises(ValueError, match=r"labels must lie in"):
        metrics.measure_collapse(H, y - 1, 4)
    with pytest.raises(ValueError, match=r"class\(es\) \[4\] have no samples"):
        metrics.measure_collapse(H, y, 5)
    acc = metrics.CollapseAccumulator(5)
    acc.update(H, y)
    with pytest.raises(ValueError, match="no samples"):
        acc.result()
    with pytest.raises(ValueError, match=r"W must have shape \(num_classes, feature_dim\) = \(4, 9\)"):
        metrics.measure_collapse(H, y, 4, W[:, :5])
    with pytest.raises(ValueError, match=r"b must have shape \(4,\)"):
        metrics.measure_collapse(H, y, 4, W, b[:3])
    with pytest.raises(ValueError, match="length 27"):
        metrics.measure_collapse(H, y[:-2], 4)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        metrics.measure_collapse(H, y, 1)
    with pytest.raises(ValueError, match="earlier batches had 9"):
        acc.update(H[:, :4], y)


def test_paper_names_point_at_real_keys():
    H, y, W, b = random_problem()
    m = metrics.measure_collapse(H, y, 4, W, b, H, y)
    means, _ = metrics.class_means(H, y, 4)
    m.update(metrics.nearest_etf_distances(W, means - means.mean(0)))
    for paper, names in metrics.PAPER_NAMES.items():
        for label, key in names.items():
            assert key in m, (paper, label)


def test_within_class_variability_alone_matches_the_full_set():
    H, y, W, b = random_problem(seed=7)
    assert metrics.within_class_variability(H, y, 4) == pytest.approx(
        metrics.measure_collapse(H, y, 4, W, b)["within_class_variability"], rel=1e-12)


def test_nearest_etf_distances():
    C, p = 5, 8
    E = etf.simplex_etf(C, p, rotate=True, seed=2)
    d = metrics.nearest_etf_distances(3.0 * E, 0.5 * E)
    assert all(v < 1e-6 for v in d.values())
    H, y, W, b = random_problem(C=4, p=9, counts=(5, 5, 5, 5))
    means, counts = metrics.class_means(H, y, 4)
    Mdot = means - means.mean(0)
    d = metrics.nearest_etf_distances(W, Mdot, squared=True)
    assert 0 < d["classifier_nearest_etf_distance"] <= 2 and 0 < d["means_nearest_etf_distance"] <= 2
    # rotating both by the same orthogonal map leaves every distance unchanged
    Q, _ = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    d2 = metrics.nearest_etf_distances(W @ Q, Mdot @ Q, squared=True)
    for k in d:
        assert d2[k] == pytest.approx(d[k], abs=1e-10)


# --------------------------------------------------------------------------- numeric edges (issue 13)
def float32_problem(C=4, p=16, n=50, seed=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(C).repeat(n)
    H = (3 * torch.randn(C, p, generator=g))[y] + torch.randn(len(y), p, generator=g)
    H_test = H[torch.randperm(len(y), generator=g)] + 0.5 * torch.randn(len(y), p, generator=g)
    W = torch.randn(C, p, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    return H, y, H_test, W, b


def streamed(H, y, H_test, y_test, C, W, b, batch=37):
    acc = metrics.CollapseAccumulator(C)
    for s in range(0, len(y), batch):
        acc.update(H[s:s + batch], y[s:s + batch])
    out = acc.result(W, b)
    train_pass, test_pass = acc.sample_pass(W, b), acc.sample_pass(W, b)
    train_pass.update(H, y)
    test_pass.update(H_test, y_test)
    out.update(train_pass.result())
    out.update(test_pass.result("_test"))
    return out


@pytest.mark.parametrize("scale", [1e19, 1e-25, 2.0 ** 64, 2.0 ** -84, 1e36, 1e-36])
def test_float32_features_of_extreme_magnitude_measure_as_at_magnitude_one(scale):
    # every measurement is invariant under h -> a h (b -> a b), except NC4 which scales by a
    H, y, H_test, W, b = float32_problem()
    C = 4
    ref = metrics.measure_collapse(H, y, C, W, b, H_test, y)
    Hs, Hs_test = H * scale, H_test * scale  # float32: rounded to 24 bits unless scale is a power of two
    assert torch.isfinite(Hs).all() and (Hs != 0).all()
    for name, got in (("in memory", metrics.measure_collapse(Hs, y, C, W, b * scale, Hs_test, y)),
                      ("streaming", streamed(Hs, y, Hs_test, y, C, W, b * scale))):
        for key, value in ref.items():
            expected = value * scale if key == "bias_offset_norm" else value
            assert got[key] == pytest.approx(expected, rel=1e-4, abs=1e-6), (name, key)
    assert metrics.within_class_variability(Hs, y, C) == pytest.approx(ref["within_class_variability"], rel=1e-4)
    mu_G = metrics.class_means(H, y, C)[0].mean(0)
    assert torch.allclose(metrics.cosine_margins(Hs, y, W, mu_G * scale), metrics.cosine_margins(H, y, W, mu_G),
                          rtol=1e-4, atol=1e-5)


def test_features_beyond_what_float32_can_multiply_are_refused():
    H, y, H_test, W, b = float32_problem()
    acc = metrics.CollapseAccumulator(4)
    acc.update(H[:100], y[:100])
    with pytest.raises(ValueError, match=r"too wide a range for torch.float32 .* pass them as float64"):
        acc.update(H[100:] * 1e20, y[100:])  # 1e20 times the first samples: the squares overflow float32
    acc = metrics.CollapseAccumulator(4)
    acc.update(H, y)
    test_pass = acc.sample_pass(W, b)
    with pytest.raises(ValueError, match=r"too wide a range for torch.float32"):
        test_pass.update(H_test * 1e20, y)  # test features 1e20 times the training means
    # the same in float64 is measured
    acc = metrics.CollapseAccumulator(4)
    acc.update(H[:100].double(), y[:100])
    acc.update(H[100:].double() * 1e20, y[100:])
    assert math.isfinite(acc.result()["within_class_variability"])


@pytest.mark.parametrize("features", [torch.zeros(200, 16), torch.full((200, 16), 0.1, dtype=torch.float64),
                                      torch.full((200, 16), -3e30)])
def test_zero_or_identical_features_are_refused(features):
    y = torch.arange(4).repeat(50)
    match = "all class means are equal"
    with pytest.raises(ValueError, match=match):
        metrics.measure_collapse(features, y, 4)
    with pytest.raises(ValueError, match=match):
        metrics.within_class_variability(features, y, 4)
    acc = metrics.CollapseAccumulator(4)
    for s in range(0, 200, 64):
        acc.update(features[s:s + 64], y[s:s + 64])
    with pytest.raises(ValueError, match=match):
        acc.result()
    with pytest.raises(ValueError, match=match):
        acc.sample_pass()


def test_nan_or_inf_in_the_classifier_is_refused():
    H, y, W, b = random_problem()
    acc = metrics.CollapseAccumulator(4)
    acc.update(H, y)
    for bad_value in (float("nan"), float("inf")):
        bad_b = b.clone()
        bad_b[1] = bad_value
        bad_W = W.clone()
        bad_W[2, 3] = bad_value
        for fn in (lambda W_, b_: metrics.measure_collapse(H, y, 4, W_, b_), acc.result, acc.sample_pass):
            with pytest.raises(ValueError, match="b contains NaN or Inf"):
                fn(W, bad_b)
            with pytest.raises(ValueError, match="W contains NaN or Inf"):
                fn(bad_W, b)


def test_accumulator_takes_numpy_arrays_like_measure_collapse():
    H, y, W, b = random_problem()
    acc = metrics.CollapseAccumulator(4)
    acc.update(H.numpy(), y.numpy())
    sample_pass = acc.sample_pass(W.numpy(), b.numpy())
    sample_pass.update(H.numpy(), y.numpy())
    got = {**acc.result(W.numpy(), b.numpy()), **sample_pass.result()}
    want = metrics.measure_collapse(H.numpy(), y.numpy(), 4, W.numpy(), b.numpy())
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-10, abs=1e-12), key


def test_cosine_margins_name_a_wrongly_shaped_argument():
    H, y, W, b = random_problem()  # p = 9, C = 4
    mu_G = H.mean(0)
    with pytest.raises(ValueError, match=r"W must have shape \(num_classes, feature_dim\) = \(C >= 2, 9\).*\(4, 5\)"):
        metrics.cosine_margins(H, y, W[:, :5], mu_G)
    with pytest.raises(ValueError, match=r"W must have shape .*\(9,\)"):
        metrics.cosine_margins(H, y, W[0], mu_G)
    with pytest.raises(ValueError, match=r"global_mean must have shape \(feature_dim,\) = \(9,\).*\(5,\)"):
        metrics.cosine_margins(H, y, W, mu_G[:5])
    with pytest.raises(ValueError, match=r"global_mean must have shape .*\(1, 9\)"):
        metrics.cosine_margins(H, y, W, mu_G[None])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=3\)"):
        metrics.cosine_margins(H, y, W[:3], mu_G)


def test_test_labels_and_test_features_come_together():
    H, y, W, b = random_problem()
    with pytest.raises(ValueError, match="test_labels were given without test_features"):
        metrics.measure_collapse(H, y, 4, W, b, test_labels=y)
    with pytest.raises(ValueError, match="test_features were given without test_labels"):
        metrics.measure_collapse(H, y, 4, W, b, test_features=H)
