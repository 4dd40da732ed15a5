"""Issue 13: a run store that survives damage, faults injected at each write, one writer per run, TrainConfig
validated at construction, the UFM interrupted between steps, and the cluster command line's errors."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nc_lib import runs as R
from nc_lib.config import TrainConfig
from nc_lib.runs import LOCK_NAME, RunFileError, RunLockedError, load_run, run_dir
from nc_lib.train import train

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _tmp_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("NC_DATA_DIR", str(tmp_path / "data"))


def _cfg(**kw) -> TrainConfig:
    base = dict(dataset="digits", model="mlp", width=0.05, per_class=10, test_per_class=5, epochs=4, lr=0.05,
                batch_size=40, milestones=(3,), device="cpu", snapshot_per_class=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The metrics.jsonl of an uninterrupted run of _cfg()."""
    mp = pytest.MonkeyPatch()
    mp.setenv("NC_RUNS_DIR", str(tmp_path_factory.mktemp("ref")))
    mp.setenv("NC_DATA_DIR", str(tmp_path_factory.mktemp("data")))
    try:
        return (train(_cfg(), progress=False).path / "metrics.jsonl").read_text()
    finally:
        mp.undo()


# ---------------------------------------------------------------- metrics.jsonl
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_running_run_with_a_damaged_last_line_resumes_with_nothing_lost(damage, reference):
    cfg = _cfg()
    part = train(cfg, progress=False, stop_after_epochs=3)
    f = part.path / "metrics.jsonl"
    text = f.read_text()
    f.write_text(text[:-40] if damage == "truncated" else text + "{not json\n")
    with pytest.warns(RuntimeWarning, match="metrics.jsonl"):
        run = train(cfg, progress=False)
    assert run.finished and f.read_text() == reference


def test_finished_run_with_a_garbage_line_is_rewritten_clean(reference):
    cfg = _cfg()
    path = train(cfg, progress=False).path
    (path / "metrics.jsonl").write_text(reference + "garbage\n")
    with pytest.warns(RuntimeWarning, match="damaged line"):
        assert [r["epoch"] for r in load_run(cfg).history] == [1, 2, 3, 4]
    assert (path / "metrics.jsonl").read_text() == reference


def test_finished_run_with_a_truncated_record_is_a_clear_error():
    cfg = _cfg()
    path = train(cfg, progress=False).path
    f = path / "metrics.jsonl"
    f.write_text(f.read_text()[:-30])
    with pytest.raises(RunFileError, match=r"metrics\.jsonl.*epochs \[4\].*retrain=True"):
        train(cfg, progress=False)


def test_finished_run_whose_metrics_were_deleted_is_not_silently_empty():
    cfg = _cfg()
    path = train(cfg, progress=False).path
    (path / "metrics.jsonl").unlink()
    with pytest.raises(RunFileError, match=r"epochs \[1, 2, 3, 4\].*does not exist.*retrain=True"):
        train(cfg, progress=False)
    assert train(cfg, progress=False, retrain=True).history[-1]["epoch"] == 4


def test_running_run_whose_early_record_is_lost_is_a_clear_error():
    cfg = _cfg()
    path = train(cfg, progress=False, stop_after_epochs=3).path
    f = path / "metrics.jsonl"
    lines = f.read_text().splitlines(keepends=True)
    f.write_text("xx\n" + "".join(lines[1:]))  # epoch 1's record is gone
    with pytest.raises(RunFileError, match=r"epochs \[1\].*delete this run's checkpoint"):
        train(cfg, progress=False)


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("damage", [b"", b"garbage" * 10, "truncate"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(damage, reference):
    cfg = _cfg()
    path = train(cfg, progress=False, stop_after_epochs=3).path
    newest = path / "checkpoints" / "epoch_0003.pt"
    assert (path / "checkpoints" / "epoch_0002.pt").exists()  # the previous one is kept while training
    newest.write_bytes(newest.read_bytes()[:200] if damage == "truncate" else damage)
    with pytest.warns(RuntimeWarning, match="epoch_0003.pt is damaged"):
        run = train(cfg, progress=False)
    assert run.finished and (path / "metrics.jsonl").read_text() == reference
    assert [f.name for f in (path / "checkpoints").iterdir()] == ["epoch_0004.pt"]


def test_damaged_checkpoint_without_fallback_names_the_file_and_what_to_do():
    cfg = _cfg()
    path = train(cfg, progress=False, stop_after_epochs=1).path
    ckpt = path / "checkpoints" / "epoch_0001.pt"
    ckpt.write_bytes(b"")
    with pytest.raises(RunFileError, match=r"epoch_0001\.pt is damaged.*delete this run's checkpoint.*epoch 0"):
        train(cfg, progress=False)
    ckpt.unlink()
    assert train(cfg, progress=False).finished


def test_finished_run_with_a_damaged_checkpoint_model_names_the_file():
    cfg = _cfg()
    run = train(cfg, progress=False)
    (run.path / "checkpoints" / "epoch_0004.pt").write_bytes(b"junk")
    with pytest.raises(RunFileError, match=r"epoch_0004\.pt is damaged.*retrain=True"):
        run.model()


# ---------------------------------------------------------------- snapshots, config.json, temporaries
def test_zero_length_snapshot_is_a_clear_error_not_an_eoferror():
    cfg = _cfg()
    path = train(cfg, progress=False, stop_after_epochs=3).path
    snap = path / "snapshots" / "epoch_0002.pt"
    snap.write_bytes(b"")
    with pytest.raises(RunFileError, match=r"snapshot .*epoch_0002\.pt is damaged.*delete it"):
        train(cfg, progress=False)
    snap.unlink()
    run = train(cfg, progress=False)
    assert [s["epoch"] for s in run.snapshots()] == [1, 3, 4]
    (path / "snapshots" / "epoch_0003.pt").write_bytes(b"")
    with pytest.raises(RunFileError, match=r"epoch_0003\.pt is damaged"):
        run.snapshots()


def test_finished_run_missing_config_json_gets_it_rewritten():
    cfg = _cfg()
    path = train(cfg, progress=False).path
    (path / "config.json").unlink()
    assert load_run(cfg).finished
    assert TrainConfig.from_dict(json.loads((path / "config.json").read_text())) == cfg


def test_stale_temporaries_are_removed_on_resume_and_finish():
    cfg = _cfg()
    path = train(cfg, progress=False, stop_after_epochs=2).path
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [path / "checkpoints" / f"epoch_0003.pt.tmp{dead.pid}", path / f"metrics.jsonl.tmp{dead.pid}"]
    for f in stale:
        f.write_bytes(b"half")
    train(cfg, progress=False)
    assert not [p for p in path.rglob("*") if ".tmp" in p.name]


# ---------------------------------------------------------------- faults injected at each write
def _count_writes(monkeypatch) -> list[str]:
    names: list[str] = []
    real = R.atomic_write_with if hasattr(R, "atomic_write_with") else None
    import nc_lib.atomic_io as A

    orig = A.atomic_write_with

    def counting(path, write, **kw):
        names.append(Path(path).name)
        return orig(path, write, **kw)

    monkeypatch.setattr(A, "atomic_write_with", counting)
    del real
    return names


def test_a_fault_at_any_write_resumes_to_the_uninterrupted_run(monkeypatch, tmp_path, reference):
    import nc_lib.atomic_io as A

    cfg = _cfg()
    names = _count_writes(monkeypatch)
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "count"))
    train(cfg, progress=False)
    n_writes = len(names)
    monkeypatch.undo()
    assert {"metrics.jsonl", "timings.jsonl", "done.json", "epoch_0004.pt", "config.json"} <= set(names)
    orig = A.atomic_write_with
    for k in range(n_writes):
        monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / f"fault{k}"))
        calls = {"n": 0}

        def faulty(path, write, **kw):
            calls["n"] += 1
            if calls["n"] == k + 1:  # the write fails half way: part of the temporary written, then an error
                def half(tmp):
                    write(tmp)
                    with open(tmp, "r+b") as f:
                        f.truncate(max(0, os.path.getsize(tmp) // 2))
                    raise OSError("injected fault: disk full")
                return orig(path, half, **kw)
            return orig(path, write, **kw)

        monkeypatch.setattr(A, "atomic_write_with", faulty)
        with pytest.raises(OSError, match="injected fault"):
            train(cfg, progress=False)
        monkeypatch.setattr(A, "atomic_write_with", orig)
        run = train(cfg, progress=False)
        assert run.finished and (run.path / "metrics.jsonl").read_text() == reference, f"fault at write {k}: {names[k]}"
        assert not [p for p in run.path.rglob("*") if ".tmp" in p.name]


# ---------------------------------------------------------------- one writer per run
_TRAIN_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from nc_lib.config import TrainConfig
from nc_lib.train import train
cfg = TrainConfig.from_dict(__import__("json").loads(sys.argv[1]))
train(cfg, progress=False)
"""


def test_two_processes_on_one_run(tmp_path):
    # long enough that the first process is still training whatever the machine's speed (it is killed below)
    cfg = _cfg(epochs=100_000, per_class=20, measure_epochs=(1, 100_000))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-c", _TRAIN_SCRIPT, json.dumps(cfg.to_dict())], env=env)
    try:
        lock = run_dir(cfg) / LOCK_NAME
        deadline = time.time() + 60
        while not (lock.exists() and (run_dir(cfg) / "checkpoints").exists()):
            assert time.time() < deadline and first.poll() is None, "the first process never took the lock"
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT, json.dumps(cfg.to_dict())], env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        assert f"being trained by process {first.pid} on host {socket.gethostname()}" in second.stderr
        with pytest.raises(RunLockedError, match=f"process {first.pid}"):
            train(cfg, progress=False)
    finally:
        first.kill()
        first.wait()
    # the holder is dead now: its lock is taken over, the run resumes and finishes
    assert (run_dir(cfg) / LOCK_NAME).exists()
    from nc_lib.cluster import grid_status

    row = grid_status([cfg])[0]
    assert row["state"] == "partial" and row["stale_lock"]
    assert train(cfg.replace(), progress=False, stop_after_epochs=2).history[0]["epoch"] == 1
    assert not (run_dir(cfg) / LOCK_NAME).exists()


def test_a_bad_run_leaves_no_orphan_directory(monkeypatch):
    import nc_lib.train as T

    cfg = _cfg()

    def broken(*a, **k):
        raise ValueError("no such data")

    monkeypatch.setattr(T, "load_run_data", broken)
    with pytest.raises(ValueError, match="no such data"):
        train(cfg, progress=False)
    assert not run_dir(cfg).exists()


# ---------------------------------------------------------------- TrainConfig at construction
@pytest.mark.parametrize("kw, match", [
    (dict(width=0), "width must be > 0"),
    (dict(width=-1.0), "width must be > 0"),
    (dict(per_class=0), "per_class must be >= 1"),
    (dict(test_per_class=0), "test_per_class must be >= 1"),
    (dict(head="bogus"), r"head='bogus' is not valid; choose one of \[.*'linear'"),
    (dict(feature_dim=0), "feature_dim must be >= 1"),
    (dict(model_kwargs={"depht": 2}), r"unknown option\(s\) \['depht'\] for model='mlp'; valid options"),
    (dict(model="resnet18", model_kwargs={"hidden": 3}), r"unknown option\(s\) \['hidden'\] for model='resnet18'"),
    (dict(eval_batch_size=0), "eval_batch_size must be >= 1"),
    (dict(momentum=2.0), r"momentum must be in \[0, 1\)"),
    (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
    (dict(momentum=-0.1), "momentum must be >= 0"),
    (dict(lbfgs_history=0), "lbfgs_history must be >= 1"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(batch_size=1), "batch_size=1 is not valid with model='mlp'.*batch norm"),
    (dict(model="resnet18", batch_size=1), "batch_size=1 is not valid with model='resnet18'"),
])
def test_bad_config_is_refused_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)
    assert not run_dir(_cfg()).parent.exists()


def test_batch_size_one_without_batch_norm_is_fine():
    assert _cfg(batch_size=1, model_kwargs={"batch_norm": False}).batch_size == 1


def test_ufm_lambda_w_overflow_names_lambda_w_not_lr():
    from nc_lib.ufm import UFMConfig, train_ufm

    cfg = UFMConfig(num_classes=3, feature_dim=4, n_per_class=2, lambda_W=1e30, lr=0.1)
    with pytest.raises(FloatingPointError, match="lambda_W") as err:
        train_ufm(cfg, steps=3, progress=False)
    assert "lower lr" not in str(err.value)


# ---------------------------------------------------------------- UFM interrupt between steps
@pytest.mark.parametrize("optimizer, extra", [("sgd", dict(momentum=0.9, batch_size=4)), ("adam", {}), ("gd", {})])
def test_ufm_sigint_at_random_times_resumes_to_the_uninterrupted_run(optimizer, extra):
    import random

    from nc_lib.ufm import UFMConfig, train_ufm

    cfg = UFMConfig(num_classes=4, feature_dim=6, n_per_class=5, optimizer=optimizer,
                    lr=0.01 if optimizer == "adam" else 0.1, **extra)
    steps = 1500
    full = train_ufm(cfg, steps=steps, measure_every=500, progress=False)
    rng = random.Random(0)
    # outside train_ufm's own handler (before it is set, after it is restored) a SIGINT is absorbed here
    outer = signal.signal(signal.SIGINT, lambda *a: None)
    try:
        _interrupt_trials(cfg, full, steps, rng, optimizer)
    finally:
        signal.signal(signal.SIGINT, outer)


def _interrupt_trials(cfg, full, steps, rng, optimizer):
    from nc_lib.ufm import train_ufm

    total = 0
    for trial in range(3):
        h = train_ufm(cfg, steps=0, measure_every=500, progress=False)
        interrupts = 0
        while h.step < steps:
            signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.003, 0.03))
            old = signal.signal(signal.SIGALRM, lambda *a: os.kill(os.getpid(), signal.SIGINT))
            try:
                h = train_ufm(history=h, steps=steps - h.step, measure_every=500, progress=False)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)
            interrupts += h.stopped_early
        total += interrupts
        for a, b in zip(full.model.parameters(), h.model.parameters()):
            assert torch.equal(a, b), f"{optimizer} trial {trial}: parameters differ after {interrupts} interrupts"
    assert total > 0, "no interrupt landed inside train_ufm"


# ---------------------------------------------------------------- the command lines
def _cli(*args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def test_cluster_bogus_scale_is_one_line_listing_the_scales():
    out = _cli("-m", "nc_lib.cluster", "status", "--paper", "papyan2020", "--scale", "bogus")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "scale='bogus'" in out.stderr and "'quick'" in out.stderr


def test_cluster_submit_without_slurm_says_so(tmp_path):
    out = _cli("-m", "nc_lib.cluster", "submit", "--paper", "papyan2020", env_extra={"PATH": str(tmp_path)})
    assert out.returncode == 2 and "SLURM is not available" in out.stderr and "--cluster local" in out.stderr


def test_run_local_honours_parallelism_and_shows_progress(tmp_path):
    import io

    from nc_lib.cluster import run_local

    grid = {"a": _cfg(epochs=1), "b": _cfg(epochs=1, lr=0.02)}
    buf = io.StringIO()
    assert run_local(grid, runs_dir=tmp_path / "store", parallelism=1, in_process=True, out=buf) == 0
    text = buf.getvalue()
    assert "training 2 runs on this machine, 1 at a time" in text and "[1/2]" in text and "[2/2]" in text
    buf = io.StringIO()
    run_local(grid, runs_dir=tmp_path / "store", parallelism=1, in_process=True, out=buf)
    assert "training 0 runs" in buf.getvalue() and "2 finished runs skipped" in buf.getvalue()


def test_figures_build_pointing_at_a_file_is_a_clear_error(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    out = _cli("-m", "nc_lib.figures", "--build", str(f), "--only", "00_simplex_etf")
    assert out.returncode == 2 and "is a file, not a folder" in out.stderr and "Traceback" not in out.stderr
