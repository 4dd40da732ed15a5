"""DeepFool, the smallest perturbation that changes a network's decision: Papyan et al. (2020)'s robustness measure.

DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, CVPR 2016), multi-class and batched, for Papyan,
Han & Donoho 2020's robustness figure (Fig. 8: the average ||r(x)||_2 / ||x||_2 over 100 test images).

At the current point x_i, with k0 the original label and f the logits, linearise every boundary
k != k0:  w_k = grad f_k(x_i) - grad f_k0(x_i),  f'_k = f_k(x_i) - f_k0(x_i);  take the closest,
l = argmin_k |f'_k| / ||w_k||, and step onto it:

    r_i = (|f'_l| / ||w_l|| + 1e-4) w_l / ||w_l||,   r = sum_i r_i,   x_{i+1} = x_0 + (1 + overshoot) r,

until the label changes or ``max_iter`` steps are taken. The returned perturbation is
(1 + overshoot) r (overshoot 0.02 as in the paper and the authors' code). For an affine classifier
one step reaches the exact minimal perturbation: min_k |f_k - f_k0| / ||w_k - w_k0|| along w_l - w_k0.
As in the authors' code, only the ``candidates`` classes of largest initial logit are considered
(all of them when C <= candidates).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .validation import check_int, check_nonnegative


@dataclass
class DeepFoolResult:
    """Per sample: ``perturbation`` (same shape as x, overshoot included), ``x_adv = x + perturbation``,
    ``iterations``, ``original_label``, ``adversarial_label`` and ``fooled`` (label changed)."""

    perturbation: Tensor
    x_adv: Tensor
    iterations: Tensor
    original_label: Tensor
    adversarial_label: Tensor
    fooled: Tensor

    def relative_norm(self, x: Tensor) -> Tensor:
        """||r(x)||_2 / ||x||_2 per sample (Papyan's robustness measure)."""
        return self.perturbation.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1).clamp_min(1e-12)


def deepfool(model: nn.Module, x: Tensor, *, overshoot: float = 0.02, max_iter: int = 50,
             candidates: int = 10) -> DeepFoolResult:
    """Batched multi-class DeepFool on ``model`` (put in eval mode for the attack, restored after).

    ``x`` is a batch (B x ...); every sample is attacked independently (in eval mode, batch norm
    does not mix samples, so one backward pass of the summed logits gives every per-sample gradient).
    """
    overshoot = check_nonnegative("overshoot", overshoot)
    max_iter = check_int("max_iter", max_iter, 1)
    candidates = check_int("candidates", candidates, 2)
    was_training = model.training
    model.eval()
    try:
        x0 = x.detach()
        B = x0.shape[0]
        with torch.no_grad():
            logits0 = model(x0)
        C = logits0.shape[1]
        k = min(candidates, C)
        order = logits0.argsort(dim=1, descending=True)[:, :k]  # column 0: the original label
        label0 = order[:, 0]
        r_tot = torch.zeros_like(x0)
        iterations = torch.zeros(B, dtype=torch.long, device=x0.device)
        active = torch.ones(B, dtype=torch.bool, device=x0.device)
        current = label0.clone()
        rows = torch.arange(B, device=x0.device)
        for _ in range(max_iter):
            if not bool(active.any()):
                break
            xi = (x0 + (1 + overshoot) * r_tot).requires_grad_(True)
            logits = model(xi)
            current = logits.detach().argmax(1)
            active = active & (current == label0)
            if not bool(active.any()):
                break
            cand_logits = logits[rows[:, None], order]  # B x k
            grads = []
            for j in range(k):
                g, = torch.autograd.grad(cand_logits[:, j].sum(), xi, retain_graph=j < k - 1)
                grads.append(g)
            G = torch.stack(grads, 1)  # B x k x ...
            w = (G[:, 1:] - G[:, :1]).flatten(2)  # B x (k-1) x D
            f = (cand_logits[:, 1:] - cand_logits[:, :1]).detach()  # B x (k-1)
            wn = w.norm(dim=2).clamp_min(1e-12)
            pert = f.abs() / wn
            l = pert.argmin(1)
            w_l = w[rows, l]  # B x D
            step = ((pert[rows, l] + 1e-4) / wn[rows, l])[:, None] * w_l
            step = step * active[:, None].to(step.dtype)
            r_tot = r_tot + step.view_as(x0)
            iterations += active.long()
        perturbation = (1 + overshoot) * r_tot
        x_adv = x0 + perturbation
        with torch.no_grad():
            adv_label = model(x_adv).argmax(1)
        return DeepFoolResult(perturbation.detach(), x_adv.detach(), iterations, label0, adv_label, adv_label != label0)
    finally:
        model.train(was_training)


def robustness(model: nn.Module, x: Tensor, *, overshoot: float = 0.02, max_iter: int = 50,
               batch_size: int = 100) -> float:
    """Papyan's robustness: mean over samples of ||r(x)||_2 / ||x||_2 with DeepFool's perturbation r."""
    ratios = []
    for s in range(0, x.shape[0], batch_size):
        xb = x[s:s + batch_size]
        ratios.append(deepfool(model, xb, overshoot=overshoot, max_iter=max_iter).relative_norm(xb))
    return float(torch.cat(ratios).mean())
