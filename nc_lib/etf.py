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

from .validation import check_float_dtype, check_int


def _centering(C: int, dtype: torch.dtype) -> Tensor:
    return torch.eye(C, dtype=dtype) - torch.full((C, C), 1.0 / C, dtype=dtype)


def etf_gram(C: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The normalised Gram target (I - 11^T/C)/sqrt(C-1), of unit Frobenius norm (Zhu et al. 2021)."""
    C = check_int("C", C, 2)
    return _centering(C, check_float_dtype("dtype", dtype)) / math.sqrt(C - 1)


def simplex_etf(C: int, d: int | None = None, *, rotate: bool = False, seed: int = 0,
                dtype: torch.dtype | str = torch.float64) -> Tensor:
    """C unit vectors in R^d forming a simplex ETF, as the rows of a (C x d) matrix.

    Rows = columns of sqrt(C/(C-1)) P (I - 11^T/C). Without ``rotate`` P is the canonical
    embedding (identity in the first C coordinates); with ``rotate`` P is a random orthonormal
    d x C matrix drawn from ``seed`` (an integer). ``d`` defaults to C; d = C-1 is allowed. ``dtype`` is a
    floating-point torch dtype or its name ("float32").
    """
    C = check_int("C", C)
    if C < 2:
        raise ValueError(f"A simplex ETF needs at least C=2 classes; got C={C}.")
    d = C if d is None else check_int("d", d)
    seed = check_int("seed", seed, -2 ** 63, 2 ** 64 - 1)  # the range torch.Generator.manual_seed takes
    dtype = check_float_dtype("dtype", dtype)
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


def _off_diagonal_cosines(gram: Tensor) -> Tensor:
    """cos(v_c, v_c') for c != c' from the Gram V V^T."""
    n = torch.diagonal(gram).clamp_min(0).sqrt()
    cos = gram / (n[:, None] * n[None, :])
    C = gram.shape[0]
    return cos[~torch.eye(C, dtype=torch.bool, device=gram.device)]


def gram_measurements(gram: Tensor) -> dict[str, float]:
    """The four ETF measurements of C vectors from their Gram G = V V^T (C x C), so that one O(C^2 d)
    product serves all: equinorm, equiangularity, maximal angle (Papyan 2020, Figs. 2-4) and the Gram
    distance to the ETF (Zhu 2021's NC2). See the functions of the same names for the formulas."""
    G = gram.to(torch.float64)
    C = G.shape[0]
    norms = torch.diagonal(G).clamp_min(0).sqrt()
    cos = _off_diagonal_cosines(G)
    return {
        "equinorm": float(norms.std(correction=0) / norms.mean()),
        "equiangularity": float(cos.std(correction=0)),
        "max_angle": float((cos + 1.0 / (C - 1)).abs().mean()),
        "etf_distance": float((G / G.norm() - etf_gram(C, dtype=G.dtype).to(G.device)).norm()),
    }


def equiangularity(vectors: Tensor) -> float:
    """std over pairs c != c' of cos(v_c, v_c') (Papyan 2020, Fig. 3). 0 for an ETF."""
    v = _as_rows(vectors)
    return gram_measurements(v @ v.T)["equiangularity"]


def maximal_angle(vectors: Tensor) -> float:
    """mean over pairs c != c' of |cos(v_c, v_c') + 1/(C-1)| (Papyan 2020, Fig. 4). 0 for an ETF."""
    v = _as_rows(vectors)
    return gram_measurements(v @ v.T)["max_angle"]


def gram_distance_to_etf(vectors: Tensor) -> float:
    """|| V V^T/||V V^T||_F - (I - 11^T/C)/sqrt(C-1) ||_F (Zhu et al. 2021's NC2). 0 for an ETF."""
    v = _as_rows(vectors)
    return gram_measurements(v @ v.T)["etf_distance"]
