"""The exercise solutions that live beside the notebooks keep working and keep their answers."""
import importlib.util
import math
from pathlib import Path

import pytest

SOLUTIONS = Path(__file__).resolve().parent.parent / "notebooks" / "solutions"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, SOLUTIONS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_00_largest_cosine_stops_at_the_etf_value():
    m = load("00_simplex_etf")
    for C in (3, 5):
        assert m.largest_cosine_after_spreading(C, steps=300) == pytest.approx(-1 / (C - 1), abs=1e-3)


def test_01_solutions():
    m = load("01_unconstrained_features")
    free = m.exercise1_free_bias()
    assert free["bias_spread(lambda_b=0)"] < 1e-4
    minority = m.exercise2_minority_collapse()
    assert minority["NC2_means"] > 0.1 and minority["minority_rows_cosine"] > minority["etf_cosine"]
    trivial = m.exercise3_trivial_minimum()
    assert trivial["theorem_trivial"] == 1.0 and trivial["theorem_objective"] == pytest.approx(math.log(5))
    assert trivial["trained_objective"] == pytest.approx(math.log(5), rel=1e-6) and trivial["trained_norm_W"] < 1e-4
    same = m.exercise4_same_end_point()
    for opt in ("sgd", "adam"):
        assert same[opt] == pytest.approx(same["theorem"], rel=1e-2)


def test_02_solutions():
    m = load("02_ufm_landscape")
    counts = m.exercise1_power_vs_lanczos()
    assert counts["lanczos_hvps"] < counts["power_hvps"]
    merged = m.exercise2_merged_classes()
    assert merged["gradient_norm"] < 1e-6 and merged["least_eigenvalue"] < 0
    assert merged["objective"] > merged["global_objective"]
    low = m.exercise3_five_in_three()
    assert low["NC1"] < 1e-4 and low["NC2_means"] > 0.1
