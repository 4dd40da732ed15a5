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


def test_06_solutions():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from nc_lib import measure_model
    from nc_lib.etf import simplex_etf

    m = load("06_your_own_network")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).double()
    X, Y = torch.randn(80, 12, dtype=torch.float64), torch.arange(80) % 4
    loader = DataLoader(TensorDataset(X, Y), batch_size=32)
    by_hand = m.exercise1_by_hand(model, loader)
    assert by_hand["NC1 by hand"] == pytest.approx(by_hand["NC1 measure_model"], rel=1e-9)
    assert by_hand["self-duality by hand"] == pytest.approx(by_hand["self-duality measure_model"], rel=1e-9)
    etf = simplex_etf(6, 8, rotate=True)
    cos = m.pair_cosines(etf, [3, 4, 5])
    assert [len(cos[k]) for k in ("majority-majority", "majority-minority", "minority-minority")] == [3, 9, 3]
    assert all(c == pytest.approx(-1 / 5, abs=1e-12) for v in cos.values() for c in v)
    crowded = etf.clone()
    crowded[4:] = crowded[3]  # the minority rows merged into one direction
    assert m.pair_cosines(crowded, [3, 4, 5])["minority-minority"] == pytest.approx([1.0] * 3)
    layers = {"a": {"ncc_accuracy": 0.5}, "b": {"ncc_accuracy": 0.95}, "c": {"ncc_accuracy": 0.99}}
    assert m.exercise3_first_separating_layer(layers, 0.9) == "b"
    assert m.exercise3_first_separating_layer(layers, 1.01) is None
    depth = measure_model(model, loader, layers="all", classifier=None, progress=False).layers
    first = m.exercise3_first_separating_layer(depth, 0.0)
    assert first == next(iter(depth))
