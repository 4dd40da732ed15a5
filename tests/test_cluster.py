"""Grids on a cluster through submitit (tested with its local executor), the run lock, the dry run."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("submitit")

from nc_lib import cluster  # noqa: E402
from nc_lib.cluster import (DistributedRunJob, RunJob, RunLock, dry_run, grid_status, make_executor,  # noqa: E402
                            submit_grid)
from nc_lib.config import TrainConfig  # noqa: E402
from nc_lib.runs import is_finished, load_run, run_dir  # noqa: E402

MLP = {"hidden": 32, "depth": 2}


def tiny(lr: float, epochs: int = 2, **kw) -> TrainConfig:
    base = dict(dataset="digits", model="mlp", model_kwargs=MLP, per_class=20, test_per_class=10, epochs=epochs,
                lr=lr, batch_size=64, snapshot_per_class=2, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("NC_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("NC_FIGURES_DIR", str(tmp_path / "figures"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path / "runs"


def test_grid_on_local_executor_finishes_then_skips(store, tmp_path):
    grid = {"a": tiny(0.05, 1), "b": tiny(0.02, 2), "dup": tiny(0.05, 1)}
    ex = make_executor(tmp_path / "logs", cluster="local", timeout_min=10)
    sub = submit_grid(grid, ex, runs_dir=store)
    assert len(sub.jobs) == 2 and not sub.skipped  # the duplicate is one run, one job
    results = sub.results()
    assert sorted(r["status"] for r in results) == ["trained"] * 2
    for c in sub.submitted:
        assert is_finished(c)
        run = load_run(c)
        assert run.path.parent == store and run.history[-1]["epoch"] == c.epochs
        assert not (run.path / cluster.LOCK_NAME).exists()
    # a second submission finds every run finished and submits nothing
    again = submit_grid(grid, ex, runs_dir=store)
    assert again.jobs == [] and len(again.skipped) == 2
    assert {r["state"] for r in grid_status(grid, runs_dir=store)} == {"finished"}
    # a job given a finished run does not retrain it
    assert RunJob(store)(grid["a"].to_dict())["status"] == "finished"


def test_preempted_job_requeues_and_resumes_from_checkpoint(store, tmp_path):
    cfg = tiny(0.02, epochs=20, per_class=None, test_per_class=None, batch_size=32, measure_epochs=(1, 19))
    ex = make_executor(tmp_path / "logs", cluster="local", timeout_min=10)
    job = ex.submit(RunJob(store), cfg.to_dict())
    path = store / run_dir(cfg).name
    first = path / "snapshots" / "epoch_0001.pt"
    deadline = time.time() + 120
    while not (path / "checkpoints" / "epoch_0001.pt").exists():
        assert time.time() < deadline and job.state not in ("FINISHED", "FAILED"), "the job never checkpointed"
        time.sleep(0.02)
    stamp = first.stat().st_mtime_ns
    # the preemption signal SLURM sends to the job's tasks (SIGUSR2); submitit's local controller
    # does not forward it, so it goes to the task process itself, as SLURM's would
    ctrl = job._process.pid
    children = Path(f"/proc/{ctrl}/task/{ctrl}/children").read_text().split()
    assert children, "the local job has no task process"
    for pid in children:
        os.kill(int(pid), signal.SIGUSR2)
    result = job.result()
    assert result["status"] == "trained" and is_finished(cfg)
    log = Path(job.paths.stderr).read_text() + Path(job.paths.stdout).read_text()
    assert "preempted" in log and "Requeued" in log, log[-2000:]
    # resumed, not restarted: epoch 1's files were not rewritten, and the history is whole
    assert first.stat().st_mtime_ns == stamp
    assert [r["epoch"] for r in load_run(cfg).history] == [1, 19, 20]
    assert not (path / cluster.LOCK_NAME).exists()


def test_checkpoint_returns_a_resubmission_of_the_same_run(store):
    cfg = tiny(0.05, epochs=2)
    job = RunJob(store, stop_after_epochs=1)
    assert job(cfg.to_dict())["status"] == "stopped"
    delayed = job.checkpoint(cfg.to_dict())
    assert isinstance(delayed.function, RunJob) and delayed.args == (cfg.to_dict(),)
    delayed.function.stop_after_epochs = None
    stamp = (run_dir(cfg) / "snapshots" / "epoch_0001.pt").stat().st_mtime_ns
    assert delayed.result()["status"] == "trained"
    assert (run_dir(cfg) / "snapshots" / "epoch_0001.pt").stat().st_mtime_ns == stamp


def test_lock_excludes_a_second_holder_and_a_taken_run_is_not_trained(store):
    cfg = tiny(0.05, epochs=1)
    path = run_dir(cfg)
    a = RunLock(path, job_id="111")
    assert a.acquire()
    b = RunLock(path, job_id="222")
    assert not b.acquire()
    with pytest.raises(RuntimeError, match="taken"):
        with RunLock(path, job_id="333"):
            pass
    out = RunJob(store)(cfg.to_dict())
    assert out["status"] == "taken" and out["holder"]["job_id"] == "111"
    assert not (path / "checkpoints").exists()
    b.release()  # not the holder: must leave a's lock in place
    assert (path / cluster.LOCK_NAME).exists()
    a.release()
    assert not (path / cluster.LOCK_NAME).exists()
    assert b.acquire()
    b.release()


def _write_lock(path: Path, **rec) -> None:
    path.mkdir(parents=True, exist_ok=True)
    base = {"job_id": "9", "host": socket.gethostname(), "pid": os.getpid(), "token": "t0", "time": 0}
    base.update(rec)
    (path / cluster.LOCK_NAME).write_text(json.dumps(base))


def test_stale_locks_are_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # the holder's process is gone (same host)
    _write_lock(tmp_path / "r1", pid=dead.pid)
    lk = RunLock(tmp_path / "r1", job_id="1")
    assert lk.acquire() and json.loads((tmp_path / "r1" / cluster.LOCK_NAME).read_text())["job_id"] == "1"
    lk.release()
    # a live holder elsewhere whose heartbeat stopped long ago
    _write_lock(tmp_path / "r2", host="elsewhere", pid=1)
    old = time.time() - 7200
    os.utime(tmp_path / "r2" / cluster.LOCK_NAME, (old, old))
    assert RunLock(tmp_path / "r2", job_id="1", stale_after_s=3600).acquire()
    # ... but not one with a fresh heartbeat
    _write_lock(tmp_path / "r3", host="elsewhere", pid=1)
    assert not RunLock(tmp_path / "r3", job_id="1", stale_after_s=3600).acquire()
    # the same scheduler job, requeued: its own old lock
    _write_lock(tmp_path / "r4", host="elsewhere", pid=1, job_id="77_3")
    assert RunLock(tmp_path / "r4", job_id="77_3").acquire()
    # a live process on this host keeps its lock
    _write_lock(tmp_path / "r5", pid=os.getppid(), job_id="x")
    assert not RunLock(tmp_path / "r5", job_id="y").acquire()


def test_heartbeat_refreshes_the_lock(tmp_path):
    lk = RunLock(tmp_path / "r", job_id="1", heartbeat_s=0.05)
    assert lk.acquire()
    old = time.time() - 1000
    os.utime(lk.file, (old, old))
    time.sleep(0.3)
    assert time.time() - lk.file.stat().st_mtime < 100
    lk.release()


def _race(path: str, i: int, start: float, q) -> None:
    while time.time() < start:
        time.sleep(0.001)
    lk = RunLock(path, job_id=f"job{i}")
    got = lk.acquire()
    q.put(got)
    if got:
        time.sleep(0.5)  # hold it while the others try
        lk.release()


def test_only_one_of_racing_processes_gets_the_lock(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    start = time.time() + 0.5
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "r"), i, start, q)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    got = [q.get(timeout=5) for _ in procs]
    assert sum(got) == 1


def test_dry_run_lists_and_prices_a_tiny_grid(store, capsys):
    grid = {"mlp-digits": tiny(0.05, epochs=3), "mlp-cifar": TrainConfig(
        dataset="cifar10", model="mlp", model_kwargs=MLP, epochs=10, measure_epochs=(1, 5), device="cpu")}
    done = tiny(0.05, epochs=1)
    RunJob(store)(done.to_dict())
    grid["done"] = done
    grid["again"] = grid["mlp-digits"].replace()  # the same run under a second key: trained once, priced once
    rows = dry_run(grid, steps=2)
    out = capsys.readouterr().out
    assert [r["key"] for r in rows] == ["mlp-digits", "mlp-cifar", "done", "again"]
    by = {r["key"]: r for r in rows}
    assert by["mlp-cifar"]["n_train"] == 50000 and by["mlp-digits"]["n_train"] == 200  # no CIFAR download needed
    assert by["mlp-cifar"]["measurements"] == 3 and by["mlp-digits"]["measurements"] == 3
    for k in ("mlp-digits", "mlp-cifar"):
        r = by[k]
        assert r["status"] == "todo" and r["epoch_s"] > 0 and r["measure_s"] > 0
        assert r["hours"] == pytest.approx((r["epochs"] * r["epoch_s"] + r["measurements"] * r["measure_s"]) / 3600)
    assert by["done"]["status"] == "finished" and by["done"]["hours"] == 0.0
    assert by["again"]["status"] == "same as mlp-digits" and by["again"]["hours"] == 0.0
    assert "mlp-cifar" in out and "4 runs (2 to train, 1 listed twice)" in out and "CPU hours" in out


def test_dry_run_command_line(monkeypatch, store, capsys, tmp_path):
    calls = []

    def fake_grid(paper, scale):
        calls.append((paper, scale))
        return {("digits", "mlp"): tiny(0.05, epochs=2)}

    monkeypatch.setattr(cluster, "paper_grid", fake_grid)
    assert cluster.main(["dry-run", "--paper", "papyan2020", "--scale", "paper", "--steps", "1",
                         "--json", str(tmp_path / "rows.json")]) == 0
    assert calls == [("papyan2020", "paper")]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert len(rows) == 1 and rows[0]["hours"] > 0
    assert "1 runs (1 to train)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cluster.main(["dry-run", "--paper", "nope"])


def test_bad_inputs_name_the_parameter(tmp_path):
    with pytest.raises(ValueError, match="cluster"):
        make_executor(tmp_path, cluster="pbs")
    with pytest.raises(ValueError, match="paper"):
        cluster.paper_grid("lecun1998", "quick")
    with pytest.raises(ValueError, match="configs"):
        dry_run([])
    with pytest.raises(ValueError, match="config"):
        RunJob()(42)


# ----------------------------------------------------------------------------------------------
# One run over several tasks of a job (DistributedRunJob); two-task jobs are in tests/test_distributed.py
# ----------------------------------------------------------------------------------------------
def test_distributed_job_in_one_process_trains_skips_and_leaves_a_taken_run(store, tmp_path):
    """Outside a submitit job DistributedRunJob is one rank of one: it trains the one-GPU job's run, skips it
    once finished, and leaves a run locked by another job alone."""
    cfg, locked = tiny(0.05, epochs=2), tiny(0.02, epochs=1)
    holder = RunLock(run_dir(locked), job_id="other")
    assert holder.acquire()
    try:
        assert DistributedRunJob(store)(locked.to_dict())["status"] == "taken"
    finally:
        holder.release()
    assert not (run_dir(locked) / "checkpoints").exists()
    out = DistributedRunJob(store, threads=1)(cfg.to_dict())
    assert (out["status"], out["rank"], out["world_size"]) == ("trained", 0, 1)
    assert out["final"] == RunJob(tmp_path / "one_gpu")(cfg.to_dict())["final"]
    again = DistributedRunJob(store)(cfg.to_dict())
    assert (again["status"], again["final"]) == ("finished", out["final"])
    # preempted: the same kind of job, with the same settings, is resubmitted
    job = DistributedRunJob(store, backend="gloo", stop_after_epochs=1)
    delayed = job.checkpoint(cfg.to_dict())
    assert type(delayed.function) is DistributedRunJob and delayed.function is not job
    assert (delayed.function.backend, delayed.function.stop_after_epochs, delayed.args) == ("gloo", 1, (cfg.to_dict(),))


def test_command_line_submits_a_data_parallel_run_to_slurm(store, tmp_path, monkeypatch, capsys):
    """``submit --tasks-per-node 4``: one SLURM job per run, 4 tasks (and GPUs) per node started by srun, each
    running a DistributedRunJob; the scheduler's commands are stand-ins here."""
    from submitit.core.utils import DelayedSubmission

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", "exit 0"), ("sbatch", 'echo "Submitted batch job 4242"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(cluster, "paper_grid", lambda paper, scale: {"run": tiny(0.05)})
    logs = tmp_path / "logs"
    assert cluster.main(["submit", "--paper", "papyan2020", "--tasks-per-node", "4", "--backend", "nccl",
                         "--partition", "gpu", "--folder", str(logs), "--runs-dir", str(store)]) == 0
    assert "submitted 1 jobs" in capsys.readouterr().out
    script = (logs / "4242_submission.sh").read_text()
    for line in ("--ntasks-per-node=4", "--gpus-per-node=4", "--nodes=1", "--partition=gpu", "--signal=USR2@"):
        assert line in script, script
    assert "\nsrun " in script
    delayed = DelayedSubmission.load(logs / "4242_submitted.pkl")
    assert type(delayed.function) is DistributedRunJob and delayed.function.backend == "nccl"
    assert delayed.function.runs_dir == str(store) and delayed.args == (tiny(0.05).to_dict(),)
    ex = make_executor(tmp_path / "logs2", cluster="slurm", tasks_per_node=4, nodes=2)
    assert cluster._tasks_per_job(ex) == 8


def test_bad_multi_task_settings_name_the_parameter(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="tasks_per_node must be >= 1"):
        make_executor(tmp_path, cluster="local", tasks_per_node=0)
    with pytest.raises(ValueError, match="tasks_per_node=2 needs one process per task.*'slurm' or 'local'"):
        make_executor(tmp_path, cluster="debug", tasks_per_node=2)
    with pytest.raises(ValueError, match="nodes=2 needs cluster='slurm'"):
        make_executor(tmp_path, cluster="local", nodes=2)
    with pytest.raises(ValueError, match=r"backend='mpi' is not valid; choose one of \['gloo', 'nccl'\]"):
        DistributedRunJob(backend="mpi")
    two_tasks = make_executor(tmp_path / "logs", cluster="local", tasks_per_node=2)
    with pytest.raises(ValueError, match="2 tasks per job; pass distributed=True"):
        submit_grid([tiny(0.05)], two_tasks, runs_dir=tmp_path / "runs")
    with pytest.raises(ValueError, match="distributed=True needs job to be a DistributedRunJob"):
        submit_grid([tiny(0.05)], two_tasks, runs_dir=tmp_path / "runs", job=RunJob(), distributed=True)
    assert not list((tmp_path / "logs").glob("*.pkl"))  # nothing was submitted
    monkeypatch.setattr(cluster, "paper_grid", lambda paper, scale: {"run": tiny(0.05)})
    for args, message in ((["--cluster", "local", "--tasks-per-node", "0"], "--tasks-per-node must be >= 1"),
                          (["--cluster", "local", "--backend", "mpi"],
                           "--backend='mpi' is not valid; choose one of ['gloo', 'nccl']"),
                          (["--cluster", "debug", "--tasks-per-node", "2"], "--tasks-per-node=2 needs one process"),
                          (["--cluster", "local", "--nodes", "2"], "--nodes=2 needs SLURM")):
        assert cluster.main(["submit", "--paper", "papyan2020", "--runs-dir", str(tmp_path / "runs"), *args]) == 2
        assert message in capsys.readouterr().err
