"""Solutions to the exercises of notebook 01 (the unconstrained features model).

Each function answers one exercise and returns the numbers the answer rests on; tests run them.
"""
from __future__ import annotations

import torch

from nc_lib import ufm, ufm_theory
from nc_lib.ufm import UFMConfig, train_ufm

BASE = dict(num_classes=5, n_per_class=10, feature_dim=16, optimizer="lbfgs", dtype="float64", init_scale=0.5, seed=0)


def exercise1_free_bias(steps: int = 150) -> dict[str, float]:
    """lambda_b = 0: the bias is free, but CE is unchanged by adding a constant to every logit, so the learned b is
    (up to the solver's tolerance) constant across classes and the other NC metrics match the lambda_b > 0 run."""
    out = {}
    for lb in (0.0, 5e-4):
        h = train_ufm(UFMConfig(**BASE, lambda_b=lb), steps, steps, progress=False)
        b = h.parameters()["b"]
        out[f"bias_spread(lambda_b={lb:g})"] = float(b.std())
        out[f"NC2(lambda_b={lb:g})"] = h.last["classifier_etf_distance"]
    return out


def exercise2_minority_collapse(steps: int = 200) -> dict[str, float]:
    """Unbalanced classes (3 classes of 40, 2 of 4): the centred means are no longer an ETF (NC2 of the means is far
    from 0), their norms differ between majority and minority classes, and the two minority classifier rows move
    closer together than the ETF's cosine -1/(C-1) (the start of minority collapse, Fang et al. 2021)."""
    counts = [40] * 3 + [4] * 2
    h = train_ufm(UFMConfig(**{**BASE, "n_per_class": counts}), steps, steps, progress=False)
    H, labels = h.parameters()["H"], ufm.ufm_labels(counts)
    means = torch.stack([H[labels == c].mean(0) for c in range(len(counts))])
    norms = (means - means.mean(0)).norm(dim=1)
    W = h.parameters()["W"]
    minority_cos = float(torch.nn.functional.cosine_similarity(W[3], W[4], dim=0))
    return {"majority_mean_norm": float(norms[:3].mean()), "minority_mean_norm": float(norms[3:].mean()),
            "NC2_means": h.last["means_etf_distance"], "minority_rows_cosine": minority_cos,
            "etf_cosine": -1 / (len(counts) - 1)}


def exercise3_trivial_minimum(steps: int = 150) -> dict[str, float]:
    """With C sqrt(n lambda_W lambda_H) >= 1 the theorem's global minimiser is W = H = 0 (f* = log C); training goes
    there too."""
    C, n, lam = 5, 10, 0.2  # C sqrt(n) lam = 5 * 3.16 * 0.2 = 3.2 >= 1
    gm = ufm_theory.ufm_global_minimum(C, n, 16, lam, lam, 5e-4)
    h = train_ufm(UFMConfig(**{**BASE, "lambda_W": lam, "lambda_H": lam}), steps, steps, progress=False)
    return {"theorem_trivial": float(gm.trivial), "theorem_objective": gm.objective, "trained_objective": h.last["objective"],
            "trained_norm_W": h.last["norm_W"], "trained_norm_H": h.last["norm_H"]}


def exercise4_same_end_point(steps: int = 1500) -> dict[str, float]:
    """Minibatch SGD and Adam reach the same objective as the theorem (to a looser tolerance: no line search)."""
    cfg = dict(num_classes=4, n_per_class=10, feature_dim=8, seed=0)
    f_star = ufm_theory.ufm_optimal_objective(4, 10, 5e-4, 5e-4)
    out = {"theorem": f_star}
    for opt, extra in (("sgd", dict(batch_size=10, lr=1.0, momentum=0.9)), ("adam", dict(lr=0.01))):
        h = train_ufm(UFMConfig(**cfg, optimizer=opt, **extra), steps, steps, progress=False)
        out[opt] = h.last["objective"]
    return out


if __name__ == "__main__":
    for fn in (exercise1_free_bias, exercise2_minority_collapse, exercise3_trivial_minimum, exercise4_same_end_point):
        print(fn.__name__, fn())
