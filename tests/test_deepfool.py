"""Tests of nc_lib.deepfool: exact on an affine classifier, batched = one at a time, bounded iterations."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nc_lib.deepfool import deepfool, robustness


def _linear(C: int = 5, D: int = 8, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(D, C).double()
    return lin


def _closed_form(lin: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimal distance to the decision boundary of an affine classifier, and its unit direction."""
    W, b = lin.weight.detach(), lin.bias.detach()
    f = x @ W.T + b
    k0 = f.argmax(1)
    dists, dirs = [], []
    for i in range(len(x)):
        best = (float("inf"), None)
        for k in range(W.shape[0]):
            if k == k0[i]:
                continue
            w = W[k] - W[k0[i]]
            d = float((f[i, k0[i]] - f[i, k]) / w.norm())
            if d < best[0]:
                best = (d, w / w.norm())
        dists.append(best[0])
        dirs.append(best[1])
    return torch.tensor(dists, dtype=x.dtype), torch.stack(dirs)


def test_deepfool_is_exact_on_a_linear_classifier():
    lin = _linear()
    x = torch.randn(16, 8, dtype=torch.float64)
    res = deepfool(lin, x, overshoot=0.02)
    d, u = _closed_form(lin, x)
    norms = res.perturbation.norm(dim=1)
    assert torch.allclose(norms, 1.02 * (d + 1e-4), rtol=1e-9, atol=1e-9)
    assert torch.allclose(res.perturbation / norms[:, None], u, atol=1e-9)
    assert res.iterations.tolist() == [1] * 16  # one step for an affine classifier
    assert res.fooled.all()
    # minimal: 99% of the way to the boundary, the label is unchanged
    with torch.no_grad():
        inside = lin(x + 0.99 * d[:, None] * u).argmax(1)
    assert torch.equal(inside, res.original_label)
    assert torch.allclose(res.relative_norm(x), norms / x.norm(dim=1))


def test_batched_equals_one_at_a_time_and_iterations_are_bounded():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 4)).double()
    net.train()
    x = torch.randn(10, 6, dtype=torch.float64)
    net(torch.randn(64, 6, dtype=torch.float64))  # give batch norm running statistics
    batched = deepfool(net, x)
    assert net.training  # restored
    for i in range(len(x)):
        single = deepfool(net, x[i:i + 1])
        assert torch.allclose(single.perturbation, batched.perturbation[i:i + 1], atol=1e-10)
    assert batched.fooled.all()
    capped = deepfool(net, x, max_iter=1)
    assert int(capped.iterations.max()) <= 1
    assert 0 < robustness(net, x, batch_size=4) < 10


def test_candidate_classes_and_errors():
    lin = _linear(C=30, D=12, seed=2)
    x = torch.randn(5, 12, dtype=torch.float64)
    res = deepfool(lin, x, candidates=30)
    d, _ = _closed_form(lin, x)
    assert torch.allclose(res.perturbation.norm(dim=1), 1.02 * (d + 1e-4), rtol=1e-9)
    with pytest.raises(ValueError, match="max_iter"):
        deepfool(lin, x, max_iter=0)
    with pytest.raises(ValueError, match="overshoot"):
        deepfool(lin, x, overshoot=-1)
