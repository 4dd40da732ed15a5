"""CollapseMonitor: its records equal the engine's for the same run; the Lightning callback runs."""
from __future__ import annotations

import pytest
import torch

from nc_lib.config import TrainConfig, build_run_model, load_run_data, resolve_device
from nc_lib.data import make_loader, set_loader_epoch, without_augmentation
from nc_lib.monitor import CollapseMonitor, lightning_callback
from nc_lib.train import _make_optimizer, _make_scheduler, train, train_epoch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _tmp_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("NC_DATA_DIR", str(tmp_path / "data"))


def test_monitor_records_equal_the_engines():
    cfg = TrainConfig(dataset="digits", model="mlp", width=0.1, per_class=30, epochs=3, lr=0.05, batch_size=50,
                      milestones=(2,), device="cpu", measure_epochs=(1, 3), train_sample_pass=True,
                      snapshot_per_class=0)
    run = train(cfg, progress=False)
    # the same run by hand: same seed, data, model, optimiser; the monitor measures
    device = resolve_device("cpu")
    tr, te = load_run_data(cfg)
    torch.manual_seed(cfg.seed)
    import random

    import numpy as np

    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_run_model(cfg, device, {"num_classes": tr.num_classes, "input_shape": list(tr.input_shape)})
    opt = _make_optimizer(cfg, model)
    sched = _make_scheduler(cfg, opt)
    loader = make_loader(tr, cfg.batch_size, shuffle=True, seed=cfg.seed)
    mon = CollapseMonitor(model, make_loader(without_augmentation(tr), 512), test_loader=make_loader(te, 512),
                          epochs=[1, 3], total_epochs=3)
    for epoch in range(1, 4):
        set_loader_epoch(loader, epoch)
        train_epoch(model, loader, opt, sched, cfg, device, epoch)
        mon.epoch_end(epoch)
    assert [r["epoch"] for r in mon.history] == [r["epoch"] for r in run.history] == [1, 3]
    for mine, engine in zip(mon.history, run.history):
        keys = [k for k in mine if k in engine and k != "epoch"]
        assert "within_class_variability" in keys and "ncc_mismatch_test" in keys and "train_loss" in keys
        for k in keys:
            assert mine[k] == pytest.approx(engine[k], rel=1e-6, abs=1e-9), k
    fig = mon.figure(["within_class_variability"])
    assert len(fig.data) >= 1


def test_papyan_epochs_and_every():
    m = torch.nn.Linear(2, 2)
    mon = CollapseMonitor(m, [], papyan=True, total_epochs=35)
    assert [e for e in range(1, 36) if mon.should_measure(e)][:3] == [1, 2, 3] and mon.should_measure(35)
    mon = CollapseMonitor(m, [], every=4, total_epochs=10)
    assert [e for e in range(1, 11) if mon.should_measure(e)] == [4, 8, 10]
    with pytest.raises(ValueError, match="total_epochs"):
        CollapseMonitor(m, [], papyan=True)
    with pytest.raises(ValueError, match="every"):
        CollapseMonitor(m, [], every=0)


def test_lightning_trainer_runs_one_epoch_with_the_callback():
    L = pytest.importorskip("lightning.pytorch")
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(60, 5, generator=g), torch.arange(60) % 3
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=20)

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, i):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Tiny()
    mon = CollapseMonitor(model, data, every=1)
    trainer = L.Trainer(max_epochs=1, callbacks=[lightning_callback(mon)], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, data)
    assert [r["epoch"] for r in mon.history] == [1]
    assert mon.history[0]["within_class_variability"] > 0 and "self_duality" in mon.history[0]
    assert model.training  # the monitor restores train mode
