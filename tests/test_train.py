"""Tests of nc_lib.train: resume = uninterrupted, run store, measurements, optimisers, presets."""
from __future__ import annotations

import json
import math

import pytest
import torch

from nc_lib import train as T
from nc_lib.config import (PAPYAN_EPOCHS, PAPYAN_LRS, TrainConfig, papyan_measure_epochs, papyan_preset,
                           resolve_device)
from nc_lib.data import load_train_test
from nc_lib.metrics import measure_collapse
from nc_lib.runs import load_run, run_dir, run_history
from nc_lib.train import lr_sweep, train

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _tmp_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("NC_DATA_DIR", str(tmp_path / "data"))


def _mlp(**kw) -> TrainConfig:
    base = dict(dataset="digits", model="mlp", width=0.1, per_class=40, epochs=3, lr=0.05, batch_size=50,
                milestones=(2,), device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_resume_reproduces_an_uninterrupted_run(tmp_path, monkeypatch):
    """Kill after 3 epochs (last checkpoint at 2), resume; metrics.jsonl is byte-identical.
    Augmentation and a conv net with batch norm make every RNG state matter."""
    cfg = TrainConfig(dataset="digits", model="resnet18", width=0.0625, per_class=20, epochs=5, lr=0.05,
                      batch_size=50, milestones=(3,), measure_epochs=(1, 2, 4), augment=True,
                      feature_decay=1e-3, device="cpu")
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "a"))
    full = train(cfg, progress=False)
    expected = (full.path / "metrics.jsonl").read_text()
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "b"))
    part = train(cfg, progress=False, stop_after_epochs=3)
    assert not part.finished and [r["epoch"] for r in part.history] == [1, 2]
    # the previous checkpoint stays while the run trains (a damaged newest one falls back to it)
    assert sorted(f.name for f in (part.path / "checkpoints").iterdir()) == ["epoch_0001.pt", "epoch_0002.pt"]
    assert not (part.path / "done.json").exists()
    resumed = train(cfg, progress=False)
    assert resumed.finished
    assert (resumed.path / "metrics.jsonl").read_text() == expected
    assert [r["epoch"] for r in resumed.history] == [1, 2, 4, 5]


def test_finished_run_is_loaded_not_retrained(monkeypatch):
    cfg = _mlp()
    first = train(cfg, progress=False)
    mtime = (first.path / "metrics.jsonl").stat().st_mtime_ns

    def fail(*a, **k):
        raise AssertionError("a finished run must not be rebuilt")

    monkeypatch.setattr(T, "build_run_model", fail)
    again = train(cfg, progress=False)
    assert again.finished and again.history == first.history
    assert (first.path / "metrics.jsonl").stat().st_mtime_ns == mtime
    assert load_run(cfg).history == first.history == run_history(cfg)
    monkeypatch.undo()
    model = again.model()
    assert model.feature_dim == 51


def test_run_directory_contents_and_atomic_writes():
    cfg = _mlp(measure_epochs=(1,), snapshot_per_class=3)
    run = train(cfg, progress=False)
    names = {p.name for p in run.path.iterdir()}
    assert {"config.json", "env.json", "metrics.jsonl", "timings.jsonl", "checkpoints", "snapshots", "done.json"} <= names
    assert not [p for p in run.path.rglob("*") if ".tmp" in p.name]
    assert TrainConfig.from_dict(json.loads((run.path / "config.json").read_text())) == cfg
    assert run.path == run_dir(cfg) and run.path.name.endswith(cfg.config_hash())
    ckpt = torch.load(run.path / "checkpoints" / "epoch_0003.pt", weights_only=False)
    assert {"epoch", "model", "optimizer", "scheduler", "rng"} <= set(ckpt) and ckpt["epoch"] == 3
    snaps = run.snapshots()
    assert [s["epoch"] for s in snaps] == [1, 3]
    assert snaps[0]["means"].shape == (10, 51) and snaps[0]["W"].shape == (10, 51)
    assert snaps[0]["features"].shape == (30, 51) and torch.bincount(snaps[0]["labels"]).tolist() == [3] * 10
    assert torch.equal(snaps[0]["labels"], snaps[1]["labels"])  # the same fixed sample every time
    env = json.loads((run.path / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"


def test_config_hash():
    a = _mlp()
    assert a.config_hash() == _mlp().config_hash()
    assert a.config_hash() != _mlp(lr=0.051).config_hash()
    assert a.config_hash() != _mlp(feature_decay=1e-4).config_hash()
    assert a.config_hash() == _mlp(keep_all_checkpoints=True, eval_batch_size=7).config_hash()


def test_streamed_measurements_equal_in_memory_ones():
    """The hook-streamed accumulator gives the numbers of measure_collapse on stored features."""
    cfg = _mlp(epochs=2, measure_epochs=(2,), train_sample_pass=True)
    run = train(cfg, progress=False)
    rec = run.final
    model = run.model()
    tr, te = load_train_test("digits", per_class=40)
    with torch.no_grad():
        xs, ys = tr.get_batch(torch.arange(len(tr)))
        xt, yt = te.get_batch(torch.arange(len(te)))
        H, Ht = model.features(xs), model.features(xt)
        W, b = model.head.classifier()
        ref = measure_collapse(H, ys, 10, W, b, Ht, yt)
        logits = model(xs)
    for key in ("within_class_variability", "equinorm_means", "self_duality", "classifier_etf_distance",
                "ncc_mismatch", "ncc_mismatch_test", "accuracy_test", "average_cosine_margin_test"):
        assert math.isclose(rec[key], ref[key], rel_tol=1e-4, abs_tol=1e-6), key
    assert math.isclose(rec["train_accuracy"], float((logits.argmax(1) == ys).double().mean()), abs_tol=1e-12)
    assert math.isclose(rec["train_loss"], float(torch.nn.functional.cross_entropy(logits, ys)), rel_tol=1e-5)
    assert rec["test_error"] == pytest.approx(1 - rec["test_accuracy"])


def test_collapse_happens_on_digits():
    """A small MLP on digits reaches zero training error and its within-class variability falls."""
    cfg = _mlp(per_class=None, epochs=30, lr=0.1, batch_size=128, milestones=(20,), width=0.25,
               measure_epochs=(1, 30), snapshot_per_class=0)
    run = train(cfg, progress=False)
    first, last = run.history[0], run.history[-1]
    assert last["train_error"] == 0.0
    assert last["within_class_variability"] < 0.5 * first["within_class_variability"]
    assert run.terminal_phase_onset() == 30


def test_feature_decay_shrinks_raw_features():
    norms = {}
    for lam in (0.0, 0.5):
        run = train(_mlp(feature_decay=lam, epochs=4, measure_epochs=(4,)), progress=False)
        model = run.model()
        tr, _ = load_train_test("digits", per_class=40)
        with torch.no_grad():
            norms[lam] = float(model.features(tr.get_batch(torch.arange(len(tr)))[0]).norm(dim=1).mean())
    assert norms[0.5] < 0.7 * norms[0.0]


@pytest.mark.parametrize("opt,head", [("adam", "linear"), ("lbfgs", "fixed_etf"), ("sgd", "fixed_etf_centre"),
                                      ("sgd", "implicit_etf"), ("sgd", "cosine")])
def test_optimisers_and_heads(opt, head):
    cfg = _mlp(optimizer=opt, head=head, lr=1e-2 if opt == "adam" else 0.1, epochs=2, batch_size=200,
               schedule="step", step_size=1)
    run = train(cfg, progress=False)
    assert run.finished and math.isfinite(run.final["train_loss"])
    assert run.final["lr"] == pytest.approx(cfg.lr * 0.1)  # epoch 2 ran at the stepped lr
    assert run.final["train_accuracy"] > 0.3
    if head == "cosine":  # rows renormalised after every step
        W, _ = run.model().head.classifier()
        assert torch.allclose(W.norm(dim=1), torch.ones(10), atol=1e-5)


def test_on_measure_callback_and_mnist1d():
    seen = []
    cfg = TrainConfig(dataset="mnist1d", model="mlp", width=0.1, per_class=30, epochs=2, lr=0.05, batch_size=64,
                      device="cpu", test_per_class=20)
    train(cfg, progress=True, on_measure=seen.append)  # tqdm.auto bar on stderr
    assert [r["epoch"] for r in seen] == [1, 2]
    callback = T.live_plot()  # outside a notebook: a silent callback
    callback(seen[-1])


def test_papyan_schedule_and_preset():
    assert len(PAPYAN_EPOCHS) == 50 and papyan_measure_epochs(350) == PAPYAN_EPOCHS
    short = papyan_measure_epochs(35)
    assert short[0] == 1 and short[-1] == 35 and list(short) == sorted(set(short))
    cfg = papyan_preset("cifar10", "resnet18", epochs=350)
    assert (cfg.optimizer, cfg.momentum, cfg.weight_decay, cfg.batch_size) == ("sgd", 0.9, 5e-4, 128)
    assert cfg.milestones == (116, 233) and cfg.gamma == 0.1 and cfg.measure_epochs == PAPYAN_EPOCHS
    assert papyan_preset("imagenet", "resnet50", epochs=300).weight_decay == 1e-4
    assert len(PAPYAN_LRS) == 25 and PAPYAN_LRS[0] == pytest.approx(1e-4) and PAPYAN_LRS[-1] == pytest.approx(0.25)
    assert papyan_preset("digits", "mlp", epochs=12, lr=0.1).measurement_epochs()[-1] == 12


def test_lr_sweep_picks_the_lowest_final_test_error():
    out = lr_sweep(_mlp(epochs=2), lrs=(1e-4, 0.1), progress=False)
    errors = {r["lr"]: r["test_error"] for r in out["results"]}
    assert out["best_lr"] == min(errors, key=errors.get)
    assert out["best_config"].lr == out["best_lr"]


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="cosine")
    with pytest.raises(ValueError, match="resnet18"):
        TrainConfig(model="resnet19")
    with pytest.raises(ValueError, match="cifar10"):
        TrainConfig(dataset="cifar")
    with pytest.raises(ValueError, match="measure_epochs"):
        TrainConfig(epochs=5, measure_epochs=(6,))
    with pytest.raises(FileNotFoundError, match="train"):
        load_run(_mlp(lr=0.0123))
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")


# Paper-scale architectures, one epoch each on torchvision FakeData (tiny on purpose): full width, the
# channel count of the dataset each network is used on in Papyan's grid, 10 classes, 10 images; spatial
# size reduced to 8x8 where the architecture allows (every CIFAR-stem net), 32x32 for ImageNet-stem nets.
PAPER_SCALE = [("vgg11", (1, 28, 28), {}), ("vgg13", (3, 8, 8), {}), ("vgg19", (3, 8, 8), {}),
               ("resnet18", (3, 8, 8), {}), ("resnet50", (3, 32, 32), {"stem": "imagenet"}),
               ("resnet152", (3, 8, 8), {}), ("densenet40", (1, 8, 8), {}),
               ("densenet201", (3, 32, 32), {}), ("densenet250", (3, 8, 8), {})]


@pytest.mark.parametrize("name,shape,kw", PAPER_SCALE, ids=[p[0] for p in PAPER_SCALE])
def test_paper_scale_architecture_one_epoch_on_fakedata(name, shape, kw):
    cfg = papyan_preset("fake", name, epochs=1, lr=0.01, batch_size=10, device="cpu",
                        dataset_kwargs={"image_size": shape, "size": 10}, model_kwargs=kw,
                        snapshot_per_class=1, eval_batch_size=10)
    run = train(cfg, progress=False)
    assert run.finished and run.final["epoch"] == 1
    assert math.isfinite(run.final["train_loss_running"])
    assert "within_class_variability" in run.final and "ncc_mismatch_test" in run.final


def test_hashes_of_existing_configurations_are_unchanged():
    """New fields (stratified_batches, agd_gain) leave the hash of configurations written before them alone."""
    assert TrainConfig().config_hash() == "9b8916fe6105"
    assert papyan_preset("cifar10", "resnet18", epochs=350).config_hash() == "6ffc06c5be9a"
    assert "stratified_batches" in TrainConfig().to_dict()  # still written to config.json
    assert TrainConfig(stratified_batches=True).config_hash() != TrainConfig().config_hash()
    old = {k: v for k, v in TrainConfig().to_dict().items() if k not in ("stratified_batches", "agd_gain")}
    assert TrainConfig.from_dict(old) == TrainConfig()  # a config.json from before them loads


def _record_batches(monkeypatch) -> list[list[torch.Tensor]]:
    """Spy on the engine's training loader: the labels of every batch, per epoch."""
    seen: list[list[torch.Tensor]] = []
    real = T.train_epoch

    def spy(model, loader, *a, **k):
        epoch_batches: list[torch.Tensor] = []
        seen.append(epoch_batches)

        class Recorder:
            def __iter__(self):
                for x, y in loader:
                    epoch_batches.append(y.clone())
                    yield x, y

        return real(model, Recorder(), *a, **k)

    monkeypatch.setattr(T, "train_epoch", spy)
    return seen


def test_stratified_batches_hold_every_class_and_are_seeded(tmp_path, monkeypatch):
    seen = _record_batches(monkeypatch)
    cfg = _mlp(stratified_batches=True, batch_size=32, epochs=2, snapshot_per_class=0)  # 400 samples, 13 batches
    run = train(cfg, progress=False)
    assert run.finished and len(seen) == 2
    for epoch in seen:
        assert len(epoch) == 13 and sum(len(y) for y in epoch) == 400
        for y in epoch:
            assert set(y.tolist()) == set(range(10)) and 30 <= len(y) <= 31
    assert not all(torch.equal(a, b) for a, b in zip(seen[0], seen[1]))  # a new draw per epoch
    # the same seed gives the same batches; another seed others
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "again"))
    train(cfg, progress=False)
    assert all(torch.equal(a, b) for e in (0, 1) for a, b in zip(seen[e], seen[2 + e]))
    train(cfg.replace(seed=1), progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(seen[0], seen[4]))
    # C > batch_size: every batch holds distinct classes
    train(_mlp(stratified_batches=True, batch_size=8, epochs=1, snapshot_per_class=0), progress=False)
    assert all(len(set(y.tolist())) == len(y) for y in seen[-1])


def test_stratified_run_resumes_with_the_same_batches(tmp_path, monkeypatch):
    seen = _record_batches(monkeypatch)
    cfg = _mlp(stratified_batches=True, batch_size=32, epochs=4, measure_epochs=(1, 2, 4), snapshot_per_class=0)
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "a"))
    full = train(cfg, progress=False)
    expected = (full.path / "metrics.jsonl").read_text()
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "b"))
    train(cfg, progress=False, stop_after_epochs=3)  # epochs 1-3 run, checkpoint at 2
    resumed = train(cfg, progress=False)  # epochs 3 and 4 again
    assert (resumed.path / "metrics.jsonl").read_text() == expected
    assert len(seen) == 4 + 3 + 2
    for e_full, e_resumed in ((2, 7), (3, 8)):
        assert all(torch.equal(a, b) for a, b in zip(seen[e_full], seen[e_resumed]))


def test_stratified_loader_inputs():
    from nc_lib.data import make_loader, set_loader_epoch

    tr, _ = load_train_test("digits", per_class=20)
    loader = make_loader(tr, 50, seed=3, stratified=True)
    set_loader_epoch(loader, 5)
    first = [y.clone() for _, y in loader]
    set_loader_epoch(loader, 5)
    assert all(torch.equal(a, b) for a, b in zip(first, [y for _, y in loader]))
    with pytest.raises(ValueError, match="drop_last"):
        make_loader(tr, 50, stratified=True, drop_last=True)
    with pytest.raises(ValueError, match="stratified_batches"):
        TrainConfig(stratified_batches="yes")


def test_names_moved_out_of_train_still_import_with_a_deprecation_warning():
    from nc_lib import features, runs

    with pytest.warns(DeprecationWarning, match="nc_lib.features.measure"):
        from nc_lib.train import measure
    assert measure is features.measure
    with pytest.warns(DeprecationWarning, match="nc_lib.config.papyan_preset"):
        assert T.papyan_preset is papyan_preset
    with pytest.warns(DeprecationWarning, match="nc_lib.runs.run_history"):
        assert T.run_history is runs.run_history
    with pytest.raises(AttributeError):
        T.no_such_name


# ---------------------------------------------------------------------------------------------- precise batch norm
def test_recalibrate_batch_norm_gives_the_batches_average_statistics():
    """Running mean / variance <- the average over the batches of each batch's mean and unbiased variance;
    momentum and mode restored; modules other than batch norm stay in eval mode (dropout off)."""
    from nc_lib.features import recalibrate_batch_norm

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 4)
    bn = torch.nn.BatchNorm1d(4)
    model = torch.nn.Sequential(lin, torch.nn.Dropout(0.9), bn).train()
    xs = [torch.randn(5, 3), torch.randn(7, 3)]
    loader = [(x, torch.zeros(len(x), dtype=torch.long)) for x in xs]
    assert recalibrate_batch_norm(model, loader, torch.device("cpu")) == 1
    with torch.no_grad():
        z = [lin(x) for x in xs]  # no dropout: the recalibration pass ran it in eval mode
    mean = (z[0].mean(0) + z[1].mean(0)) / 2
    var = (z[0].var(0, unbiased=True) + z[1].var(0, unbiased=True)) / 2
    assert torch.allclose(bn.running_mean, mean, atol=1e-6) and torch.allclose(bn.running_var, var, atol=1e-6)
    assert bn.momentum == 0.1 and model.training and bn.training
    assert recalibrate_batch_norm(torch.nn.Linear(2, 2), loader, torch.device("cpu")) == 0


def test_precise_bn_leaves_training_alone_and_resumes_bit_identically(tmp_path, monkeypatch):
    """precise_bn changes what eval mode measures, not the weights: the same running losses and parameters as
    without it, other batch-norm statistics, and a killed run resumes to the same bytes."""
    cfg = TrainConfig(dataset="digits", model="resnet18", width=0.0625, per_class=20, epochs=4, lr=0.05,
                      batch_size=50, milestones=(3,), measure_epochs=(1, 2, 4), device="cpu", precise_bn=True)
    assert cfg.config_hash() != cfg.replace(precise_bn=False).config_hash()
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "a"))
    precise, plain = train(cfg, progress=False), train(cfg.replace(precise_bn=False), progress=False)
    assert [r["train_loss_running"] for r in precise.history] == [r["train_loss_running"] for r in plain.history]
    assert precise.final["train_accuracy"] != plain.final["train_accuracy"] or \
        precise.final["within_class_variability"] != plain.final["within_class_variability"]
    a, b = precise.model().state_dict(), plain.model().state_dict()
    params = {n for n, _ in precise.model().named_parameters()}
    assert all(torch.equal(a[n], b[n]) for n in params)
    assert any(not torch.equal(a[n], b[n]) for n in a if n.endswith("running_mean"))
    expected = (precise.path / "metrics.jsonl").read_text()
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "b"))
    train(cfg, progress=False, stop_after_epochs=3)
    assert (train(cfg, progress=False).path / "metrics.jsonl").read_text() == expected
    with pytest.raises(ValueError, match="precise_bn"):
        TrainConfig(precise_bn="yes")
