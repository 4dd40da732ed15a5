"""Solution to notebook 00, exercise 2: C unit vectors pushed apart stop at cosine -1/(C-1)."""
import torch


def largest_cosine_after_spreading(C: int = 5, d: int = 8, steps: int = 400, seed: int = 0) -> float:
    """Gradient descent on a soft maximum of the pairwise cosines of C unit vectors."""
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(C, d, generator=g, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([V], lr=0.05)
    mask = ~torch.eye(C, dtype=torch.bool)
    for _ in range(steps):
        U = V / V.norm(dim=1, keepdim=True)
        cos = (U @ U.T)[mask]
        loss = torch.logsumexp(40 * cos, 0) / 40
        opt.zero_grad()
        loss.backward()
        opt.step()
    U = V / V.norm(dim=1, keepdim=True)
    return float((U @ U.T)[mask].max().detach())


if __name__ == "__main__":
    for C in (3, 5, 8):
        print(C, largest_cosine_after_spreading(C), -1 / (C - 1))
