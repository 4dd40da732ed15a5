"""Solution to notebook 05, exercise 3: how much of the features' gradient goes through the nearest-ETF node."""
import torch
import torch.nn.functional as F

from nc_lib.heads import ImplicitETFHead


def node_gradient_share(C: int = 10, d: int = 64, n: int = 20, warm_steps: int = 50, seed: int = 0) -> float:
    """||dL/dH (with node) - dL/dH (node detached)|| / ||dL/dH (node detached)|| after ``warm_steps`` steps.

    Both heads see the same features and the same tracker state, so the difference is exactly the
    gradient that flows through the node (Hbar -> U* -> W)."""
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(C * n, d, generator=g, dtype=torch.float64)
    y = torch.arange(C).repeat_interleave(n)
    grads = []
    for through in (True, False):
        head = ImplicitETFHead(d, C, backprop_through_node=through).double()
        with torch.no_grad():  # warm the running means up as training would
            for _ in range(warm_steps):
                head(H, y)
        Hp = H.clone().requires_grad_(True)
        F.cross_entropy(head(Hp, y), y).backward()
        grads.append(Hp.grad)
    return float((grads[0] - grads[1]).norm() / grads[1].norm())


if __name__ == "__main__":
    for t in (1, 10, 100):
        print(t, node_gradient_share(warm_steps=t))
