"""The simplex equiangular tight frame (ETF) and the checks that say how close vectors are to one.

A simplex ETF of C vectors in R^d (d >= C-1) is, as a d x C matrix of columns,

    M = sqrt(C/(C-1)) P (I_C - 11^T/C),      P (d x C), P^T P = I_C,

(Papyan, Han, Donoho 2020, Definition 1). Its columns have unit norm and every pair has cosine
-1/(C-1), the most negative value C equal-norm vectors can share. For d = C-1, P cannot have C
orthonormal columns; we then use the C-1 orthonormal directions of the centred basis, which
gives the same Gram matrix. This module stores vectors as **rows** (C x d), as a classifier W
does; the columns of the formula above are its rows.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .validation import check_int


def _centering(C: int, dtype: torch.dtype) -> Tensor:
    return torch.eye(C, dtype=dtype) - torch.full((C, C), 1.0 / C, dtype=dtype)


def etf_gram(C: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The normalised Gram target (I - 11^T/C)/sqrt(C-1), of unit Frobenius norm (Zhu et al. 2021)."""
    C = check_int("C", C, 2)
    return _centering(C, dtype) / math.sqrt(C - 1)


def simplex_etf(C: int, d: int | None = None, *, rotate: bool = False, seed: int = 0,
                dtype: torch.dtype = torch.float64) -> Tensor:
    """C unit vectors in R^d forming a simplex ETF, as the rows of a (C x d) matrix.

    Rows = columns of sqrt(C/(C-1)) P (I - 11^T/C). Without ``rotate`` P is the canonical
    embedding (identity in the first C coordinates); with ``rotate`` P is a random orthonormal
    d x C matrix drawn from ``seed``. ``d`` defaults to C; d = C-1 is allowed.
    """
    C = check_int("C", C)
    if C < 2:
        raise ValueError(f"A simplex ETF needs at least C=2 classes; got C={C}.")
    d = C if d is None else d
    if d < C - 1:
        raise ValueError(f"A simplex ETF of C={C} vectors needs dimension d >= C-1={C - 1}; got d={d}.")
    centred = math.sqrt(C / (C - 1)) * _centering(C, torch.float64)  # C x C, rows sum to 0
    if d >= C:
        base = torch.zeros(C, d, dtype=torch.float64)
        base[:, :C] = centred
    else:  # d = C-1: express the rows in an orthonormal basis of the (C-1)-dim centred subspace
        q, _ = torch.linalg.qr(centred.T)  # C x C
        base = centred @ q[:, : C - 1]  # C x (C-1), same Gram
    if rotate:
        g = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))  # Haar-distributed orthogonal matrix
        base = base @ q.T
    return base.to(dtype)


def _as_rows(vectors: Tensor) -> Tensor:
    v = torch.as_tensor(vectors)
    if v.ndim != 2 or v.shape[0] < 2:
        raise ValueError(f"vectors must be a (C x d) matrix with C >= 2 rows; got shape {tuple(v.shape)}.")
    return v.to(torch.float64)


def equinorm(vectors: Tensor, unbiased: bool = False) -> float:
    """Variation of the norms: std_c ||v_c|| / mean_c ||v_c|| (Papyan 2020, Fig. 2). 0 for an ETF.

    Papyan's Colab uses the unbiased std (``unbiased=True``)."""
    n = _as_rows(vectors).norm(dim=1)
    return float(n.std(correction=1 if unbiased else 0) / n.mean())


def _off_diagonal_cosines(vectors: Tensor) -> Tensor:
    v = _as_rows(vectors)
    u = v / v.norm(dim=1, keepdim=True)
    cos = u @ u.T
    C = v.shape[0]
    mask = ~torch.eye(C, dtype=torch.bool)
    return cos[mask]


def equiangularity(vectors: Tensor) -> float:
    """std over pairs c != c' of cos(v_c, v_c') (Papyan 2020, Fig. 3). 0 for an ETF."""
    return float(_off_diagonal_cosines(vectors).std(correction=0))


def maximal_angle(vectors: Tensor) -> float:
    """mean over pairs c != c' of |cos(v_c, v_c') + 1/(C-1)| (Papyan 2020, Fig. 4). 0 for an ETF."""
    C = _as_rows(vectors).shape[0]
    return float((_off_diagonal_cosines(vectors) + 1.0 / (C - 1)).abs().mean())


def gram_distance_to_etf(vectors: Tensor) -> float:
    """|| V V^T/||V V^T||_F - (I - 11^T/C)/sqrt(C-1) ||_F (Zhu et al. 2021's NC2). 0 for an ETF."""
    v = _as_rows(vectors)
    G = v @ v.T
    return float((G / G.norm() - etf_gram(v.shape[0])).norm())
