"""Solutions to notebook 06 (your own network): features by hand, pair cosines, the depth where classes separate."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations

import torch
from torch import nn

from nc_lib import measure_model
from nc_lib.metrics import measure_collapse


def exercise1_by_hand(model: nn.Module, loader: Iterable) -> dict[str, float]:
    """Exercise 1: NC1 = Tr(Sigma_W Sigma_B^+)/C (Papyan et al. 2020) of the input of the model's last
    ``nn.Linear``, caught with a forward pre-hook and measured in memory with ``measure_collapse``,
    beside what ``measure_model`` streams. The two agree to round-off."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    feats, labels = [], []
    handle = last.register_forward_pre_hook(lambda _m, inputs: feats.append(inputs[0].detach().flatten(1)))
    model.eval()
    try:
        with torch.no_grad():
            for x, y in loader:
                model(x)
                labels.append(y)
    finally:
        handle.remove()
    H, Y = torch.cat(feats).double(), torch.cat(labels)
    by_hand = measure_collapse(H, Y, last.out_features, W=last.weight.detach().double(),
                               b=last.bias.detach().double())
    streamed = measure_model(model, loader, progress=False)
    return {"NC1 by hand": float(by_hand["within_class_variability"]),
            "NC1 measure_model": float(streamed["within_class_variability"]),
            "self-duality by hand": float(by_hand["self_duality"]),
            "self-duality measure_model": float(streamed["self_duality"])}


def pair_cosines(W: torch.Tensor, minority: Sequence[int]) -> dict[str, list[float]]:
    """Exercise 2: the cosines cos(w_c, w_c') of every pair of classifier rows (W is C x d), grouped as
    majority-majority, majority-minority and minority-minority pairs. A simplex ETF has
    -1/(C-1) for every pair; minority collapse (Fang et al. 2021) pushes the minority pairs toward +1."""
    Wn = torch.nn.functional.normalize(W.detach().double(), dim=1)
    G = Wn @ Wn.T
    small = set(int(c) for c in minority)
    out: dict[str, list[float]] = {"majority-majority": [], "majority-minority": [], "minority-minority": []}
    for i, j in combinations(range(W.shape[0]), 2):
        kind = {0: "majority-majority", 1: "majority-minority", 2: "minority-minority"}[(i in small) + (j in small)]
        out[kind].append(float(G[i, j]))
    return out


def exercise3_first_separating_layer(layers: Mapping[str, Mapping[str, float]], threshold: float = 0.9,
                                     key: str = "ncc_accuracy") -> str | None:
    """Exercise 3: the first layer (in depth order) whose nearest-class-centre accuracy reaches ``threshold``,
    i.e. the first depth at which the class means alone classify the training set; None if no layer does."""
    return next((name for name, d in layers.items() if d.get(key, float("-inf")) >= threshold), None)


if __name__ == "__main__":
    from nc_lib.etf import simplex_etf

    print({k: sum(v) / len(v) for k, v in pair_cosines(simplex_etf(10, 12), range(5, 10)).items()})
