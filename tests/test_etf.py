import math

import pytest
import torch

from nc_lib import etf


@pytest.mark.parametrize("C,d", [(2, 1), (3, 2), (3, 3), (4, 4), (10, 9), (10, 64)])
@pytest.mark.parametrize("rotate", [False, True])
def test_simplex_etf_is_an_etf(C, d, rotate):
    E = etf.simplex_etf(C, d, rotate=rotate, seed=3)
    assert E.shape == (C, d)
    G = E @ E.T
    expected = torch.full((C, C), -1.0 / (C - 1), dtype=torch.float64)
    expected.fill_diagonal_(1.0)
    assert torch.allclose(G, expected, atol=1e-12)
    assert etf.equinorm(E) < 1e-12
    assert etf.equiangularity(E) < 1e-12
    assert etf.maximal_angle(E) < 1e-12
    assert etf.gram_distance_to_etf(E) < 1e-12


def test_formula_of_reference():
    # sqrt(C/(C-1)) P (I - 11^T/C) with P the canonical embedding: rows are its columns
    C = 5
    M = math.sqrt(C / (C - 1)) * (torch.eye(C, dtype=torch.float64) - 1.0 / C)
    assert torch.allclose(etf.simplex_etf(C), M.T)


def test_rotation_is_seeded():
    a = etf.simplex_etf(4, 7, rotate=True, seed=1)
    assert torch.equal(a, etf.simplex_etf(4, 7, rotate=True, seed=1))
    assert not torch.allclose(a, etf.simplex_etf(4, 7, rotate=True, seed=2))


def test_gram_target_has_unit_norm():
    for C in (2, 3, 10):
        assert abs(float(etf.etf_gram(C).norm()) - 1) < 1e-12


def test_checks_on_hand_computed_vectors():
    V = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]], dtype=torch.float64)
    norms = torch.tensor([1.0, 2.0, 1.0])
    assert etf.equinorm(V) == pytest.approx(float(norms.std(correction=0) / norms.mean()))
    # cosines: (0,1)=0, (0,2)=-1, (1,2)=0 ; each pair counted twice
    cos = torch.tensor([0.0, -1.0, 0.0])
    assert etf.equiangularity(V) == pytest.approx(float(cos.std(correction=0)))
    assert etf.maximal_angle(V) == pytest.approx(float((cos + 0.5).abs().mean()))


@pytest.mark.parametrize("kwargs,match", [(dict(C=1), "at least C=2"), (dict(C=0), "at least C=2"),
                                          (dict(C=5, d=3), "d >= C-1=4")])
def test_impossible_etf_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        etf.simplex_etf(**kwargs)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, "int32", "float", "bogus", 3])
def test_a_non_float_dtype_is_refused(dtype):
    with pytest.raises(ValueError, match=r"dtype=.* is not a floating-point dtype; choose one of \['torch.float16'"):
        etf.simplex_etf(4, dtype=dtype)


@pytest.mark.parametrize("name,dtype", [("float32", torch.float32), ("torch.float64", torch.float64),
                                        ("bfloat16", torch.bfloat16)])
def test_a_dtype_may_be_named(name, dtype):
    E = etf.simplex_etf(4, 6, rotate=True, seed=2, dtype=name)
    assert E.dtype == dtype
    assert torch.equal(E, etf.simplex_etf(4, 6, rotate=True, seed=2, dtype=dtype))


@pytest.mark.parametrize("kwargs,match", [(dict(seed=1.5), "seed must be an integer, got 1.5"),
                                          (dict(seed="0"), "seed must be an integer"),
                                          (dict(seed=2 ** 64), "seed must be <= "),
                                          (dict(d=4.0), "d must be an integer")])
def test_bad_seed_or_dimension_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        etf.simplex_etf(3, rotate=True, **kwargs)
