"""MSE loss and class-imbalanced training sets in the engine: they resume bit-identically, keep old hashes,
and the imbalanced set has the asked-for counts (test set balanced)."""
from __future__ import annotations

import pytest
import torch

from nc_lib.config import TrainConfig, load_run_data
from nc_lib.data import imbalanced_counts
from nc_lib.train import train, training_loss

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _tmp_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("NC_DATA_DIR", str(tmp_path / "data"))


def _cfg(**kw) -> TrainConfig:
    base = dict(dataset="digits", model="resnet18", width=0.0625, per_class=20, epochs=4, lr=0.05, batch_size=50,
                milestones=(3,), measure_epochs=(1, 2, 4), augment=True, device="cpu", snapshot_per_class=0)
    base.update(kw)
    return TrainConfig(**base)


def test_new_fields_keep_existing_hashes():
    base = _cfg()
    same = _cfg(loss="ce", class_counts=None, imbalance_ratio=1.0, imbalance_profile="step")
    assert base.config_hash() == same.config_hash()
    for other in (_cfg(loss="mse"), _cfg(imbalance_ratio=4), _cfg(per_class=None, class_counts=[5] * 10)):
        assert other.config_hash() != base.config_hash()
    assert _cfg(imbalance_ratio=4).config_hash() != _cfg(imbalance_ratio=4, imbalance_profile="exp").config_hash()


def test_mse_is_papyans_one_hot_squared_loss():
    z, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    onehot = torch.nn.functional.one_hot(y, 4).float()
    assert training_loss("mse")(z, y) == pytest.approx(float(((z - onehot) ** 2).mean()))
    assert training_loss("ce")(z, y) == pytest.approx(float(torch.nn.functional.cross_entropy(z, y)))


@pytest.mark.parametrize("kw", [dict(loss="mse"), dict(imbalance_ratio=4.0, imbalance_profile="exp"),
                                dict(per_class=None, class_counts=(20, 20, 20, 20, 20, 5, 5, 5, 5, 5), loss="mse")])
def test_mse_and_imbalanced_runs_resume_bit_identically(tmp_path, monkeypatch, kw):
    cfg = _cfg(**kw)
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "a"))
    full = train(cfg, progress=False)
    expected = (full.path / "metrics.jsonl").read_text()
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "b"))
    part = train(cfg, progress=False, stop_after_epochs=3)
    assert not part.finished
    resumed = train(cfg, progress=False)
    assert resumed.finished and (resumed.path / "metrics.jsonl").read_text() == expected
    final = resumed.final
    assert all(k in final for k in ("within_class_variability", "self_duality", "test_error"))


def test_imbalanced_counts_and_balanced_test_set():
    assert imbalanced_counts(100, 4, 10, "step") == [100, 100, 10, 10]
    assert imbalanced_counts(100, 3, 100, "exp") == [100, 10, 1]
    cfg = _cfg(imbalance_ratio=4.0, imbalance_profile="step", test_per_class=10)
    tr, te = load_run_data(cfg)
    assert torch.bincount(tr.targets, minlength=10).tolist() == [20] * 5 + [5] * 5
    assert torch.bincount(te.targets, minlength=10).tolist() == [10] * 10
    tr, _ = load_run_data(_cfg(per_class=None, class_counts=[3, 4, 5, 6, 7, 8, 9, 10, 11, 12]))
    assert torch.bincount(tr.targets, minlength=10).tolist() == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]


def test_bad_loss_and_imbalance_raise():
    with pytest.raises(ValueError, match="loss"):
        _cfg(loss="hinge")
    with pytest.raises(ValueError, match="imbalance_ratio"):
        _cfg(imbalance_ratio=0.5)
    with pytest.raises(ValueError, match="imbalance_profile"):
        _cfg(imbalance_ratio=2, imbalance_profile="linear")
    with pytest.raises(ValueError, match="not both"):
        _cfg(class_counts=[5] * 10)
    with pytest.raises(ValueError, match="needs per_class"):
        _cfg(per_class=None, imbalance_ratio=3)
    with pytest.raises(ValueError, match="one per class"):
        load_run_data(_cfg(per_class=None, class_counts=[5, 5]))
