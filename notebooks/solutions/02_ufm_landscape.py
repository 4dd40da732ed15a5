"""Solutions to the exercises of notebook 02 (the UFM landscape)."""
from __future__ import annotations

import torch

from nc_lib import ufm, ufm_theory
from nc_lib.ufm import UFMConfig, train_ufm


def exercise1_power_vs_lanczos(C: int = 4, n: int = 5, d: int = 6) -> dict[str, float]:
    """Hessian-vector products needed for 6 correct digits of the least eigenvalue at the origin saddle."""
    s = ufm_theory.origin_saddle(C, n, d, 5e-4, 5e-4, 5e-4)
    hvp = lambda v: s.objective.hvp(s.theta, v)  # noqa: E731
    target = s.analytic_min_eigenvalue
    out = {"analytic": target}
    dim = s.objective.dim
    for name, run in (("lanczos", lambda k: ufm_theory.lanczos_smallest(hvp, dim, iterations=k)[0]),
                      ("power", lambda k: ufm_theory.power_iteration_smallest(hvp, dim, shift=1.0, iterations=k)[0])):
        k = 2
        while abs(run(k) - target) > 1e-6 * abs(target) and k < 4096:
            k *= 2
        out[f"{name}_hvps"] = k
    return out


def exercise2_merged_classes(C: int = 4, n: int = 5, d: int = 6, steps: int = 300) -> dict[str, float]:
    """Merge classes 0 and 1: their classifier rows, biases and features are tied equal. Minimising the full objective
    over that symmetric subspace gives a critical point of the full problem (by symmetry the gradient has no component
    out of the subspace). Its Hessian has a negative eigenvalue: a strict saddle, above the global minimum."""
    lam = 5e-4
    labels = ufm.ufm_labels([n] * C)
    obj = ufm_theory.UFMObjective(labels, C, d, loss="ce", lambda_W=lam, lambda_H=lam, lambda_b=lam)
    g = torch.Generator().manual_seed(0)
    Wr = (0.5 * torch.randn(C - 1, d, generator=g, dtype=torch.float64)).requires_grad_()
    br = torch.zeros(C - 1, dtype=torch.float64, requires_grad=True)
    Hr = (0.5 * torch.randn(C - 1, n, d, generator=g, dtype=torch.float64)).requires_grad_()

    def expand() -> torch.Tensor:
        W = torch.cat([Wr[:1], Wr])  # rows 0 and 1 equal
        b = torch.cat([br[:1], br])
        Hc = torch.cat([Hr[:1], Hr])  # class 1's features equal class 0's, sample by sample
        return obj.pack(W, Hc.reshape(C * n, d), b)

    opt = torch.optim.LBFGS([Wr, br, Hr], lr=1, max_iter=steps, history_size=50, tolerance_grad=1e-14,
                            tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = obj(expand())
        f.backward()
        return f

    opt.step(closure)
    theta = expand().detach()
    lam_min = ufm_theory.lanczos_smallest(lambda v: obj.hvp(theta, v), obj.dim, iterations=80)[0]
    return {"gradient_norm": float(obj.gradient(theta).norm()), "least_eigenvalue": lam_min,
            "objective": float(obj(theta)), "global_objective": ufm_theory.ufm_optimal_objective(C, n, lam, lam)}


def exercise3_five_in_three(steps: int = 400) -> dict[str, float]:
    """C = 5 in d = 3 (< C-1 = 4): the means collapse (NC1 -> 0) but cannot form an ETF (NC2 stays away from 0)."""
    h = train_ufm(UFMConfig(num_classes=5, n_per_class=10, feature_dim=3, optimizer="lbfgs", dtype="float64",
                            init_scale=0.5, seed=0), steps, steps, progress=False)
    return {"NC1": h.last["within_class_variability"], "NC2_means": h.last["means_etf_distance"]}


if __name__ == "__main__":
    for fn in (exercise1_power_vs_lanczos, exercise2_merged_classes, exercise3_five_in_three):
        print(fn.__name__, fn())
