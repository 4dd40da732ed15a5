"""Markou et al. (2024)'s runs: train (or load from the run store) the UFM grid and the real-data runs.

UFM runs are cached under ``runs_dir()/markou2024/`` (a finished run is loaded, not retrained, whatever
device made it); real-data runs live in the engine's run store (:mod:`nc_lib.runs`).
"""
from __future__ import annotations

import hashlib
import json
import statistics
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...atomic_io import atomic_torch_save
from ...config import load_run_data
from ...data import make_loader
from ...metrics import cosine_margins
from ...paths import runs_dir
from ...train import train
from ...ufm import train_ufm
from ...validation import check_choice, check_int
from .grid import METHODS, PAPER, TAU, UFMSetting, train_config, ufm_config

RECORD_KEYS = ("step", "loss", "accuracy", "within_class_variability", "classifier_means_alignment", "wh_equinorm",
               "average_cosine_margin")


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_ufm(setting: UFMSetting, method: str, seed: int, *, cache: bool = True,
            device: str | torch.device | None = None, progress: bool = False) -> dict[str, Any]:
    """Train one UFM with one head through :func:`nc_lib.ufm.train_ufm`: full-batch GD + momentum on H
    (and on learned head parameters), the config of :func:`ufm_config`.

    objective = (1/N) sum_i CE(head(h_i), y_i) + lambda_H/2 ||H||^2 + lambda_W/2 ||W, b||^2 (learned heads);
    the cosine head's rows are renormalised after each step. Measured at every iteration up to
    ``measure_every``, then every ``measure_every`` iterations. Returns ``{"records": [...], "pcm": sorted
    per-sample cosine margins at the end, "method", "seed", "setting", "device"}``; cached under
    ``runs_dir()/markou2024/`` (a finished run is loaded, not retrained, whatever device made it).
    ``device``: None (CPU), "auto" or "cuda" for the paper scale.
    """
    check_choice("method", method, METHODS)
    check_int("seed", seed, 0)
    key = {"setting": setting.to_dict(), "method": method, "seed": seed, "v": 3}
    path = runs_dir() / PAPER / f"ufm-{setting.name}-{method}-s{seed}-{_hash(key)}.pt"
    if cache and path.exists():
        return torch.load(path, weights_only=False)
    # every iteration measured over the first measure_every (Fig. 3's early rise, the same for every head),
    # then every measure_every
    dense = min(setting.measure_every, setting.iterations)
    history = train_ufm(ufm_config(setting, method, seed), steps=dense, measure_every=1, progress=progress,
                        device=device)
    history = train_ufm(None, steps=setting.iterations - dense, measure_every=setting.measure_every,
                        history=history, progress=progress)
    records = [{k: r[k] for k in RECORD_KEYS} for r in history.records]
    cfg = history.config
    with torch.no_grad():
        H = history.model.H.detach()
        feats = H if cfg.measurement_tau is None else cfg.measurement_tau * F.normalize(H, dim=1)
        W, _ = history.model.classifier()
        pcm = torch.sort(cosine_margins(feats, history.labels, W, feats.mean(0))).values.cpu().numpy()
    out = {"records": records, "pcm": pcm, "method": method, "seed": seed, "setting": setting.to_dict(),
           "device": str(history.device), "seconds": history.elapsed}
    if cache:
        atomic_torch_save(path, out)
    return out


def run_ufm_grid(grid: dict[str, UFMSetting], *, names: Sequence[str] | None = None, progress: bool = True,
                 device: str | torch.device | None = None,
                 methods: Sequence[str] | None = None) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``results[setting][method] = [run per seed]`` for the settings ``names`` (default all) and of each
    the ``methods`` it has (default all of them)."""
    if methods is not None:
        for m in methods:
            check_choice("methods", m, METHODS)
    names = list(grid) if names is None else list(names)
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name in names:
        s = grid[check_choice("names", name, list(grid))]
        out[name] = {}
        for m in s.methods:
            if methods is not None and m not in methods:
                continue
            t0 = time.perf_counter()
            out[name][m] = [run_ufm(s, m, seed, device=device) for seed in s.seeds]
            if progress:
                print(f"{name} {m}: {len(s.seeds)} seed(s), {time.perf_counter() - t0:.1f}s, final acc "
                      f"{statistics.median(r['records'][-1]['accuracy'] for r in out[name][m]):.3f}")
    return out


def run_real(entry: dict[str, Any], *, methods: Sequence[str] | None = None, progress: bool = False,
             pcm: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Train (or load) every method x seed of one real-data entry. Returns ``{method: [run per seed]}``, each
    run ``{"records": history with "step" = epoch, "loss" = train loss, "accuracy" = train top-1,
    "accuracy_test", ...; "pcm": sorted per-sample cosine margins of the final model on the training set}``."""
    out: dict[str, list[dict[str, Any]]] = {}
    for m in (methods or entry["methods"]):
        runs = []
        for seed in entry["seeds"]:
            res = train(train_config(entry, m, seed), progress=progress)
            recs = []
            for r in res.history:
                rec = dict(r)
                rec.update(step=r["epoch"], loss=r["train_loss"], accuracy=r["train_accuracy"],
                           accuracy_test=r["test_accuracy"])
                recs.append(rec)
            run = {"records": recs, "method": m, "seed": seed}
            if pcm:
                run["pcm"] = _final_pcm(res, entry, m)
            runs.append(run)
        out[m] = runs
    return out


def _final_pcm(result: Any, entry: dict[str, Any], method: str) -> np.ndarray:
    """Sorted per-sample cosine margins of the trained model on its (un-augmented) training set."""
    train_set, _ = load_run_data(result.config, augment=False)
    model = result.model()
    model.eval()
    feats, ys = [], []
    with torch.no_grad():
        for x, y in make_loader(train_set, 512):
            feats.append(model.features(x).double())
            ys.append(y)
    h, y = torch.cat(feats), torch.cat(ys)
    if method != "standard_nonorm":
        h = TAU * F.normalize(h, dim=1)
    W, _ = model.head.classifier()
    return torch.sort(cosine_margins(h, y, W.double(), h.mean(0))).values.numpy()


def ufm_summary(results: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """One row per (setting, method): median [min, max] over seeds of the final accuracy (%), NC1, NC3 and
    average cosine margin, the first step with 100% accuracy (median) and the median seconds per run."""
    rows = []
    for name, by_method in results.items():
        for method, runs in by_method.items():
            last = [r["records"][-1] for r in runs]
            first_full = [next((rec["step"] for rec in r["records"] if rec["accuracy"] >= 1.0), None) for r in runs]
            reached = [s for s in first_full if s is not None]
            def spread(key: str, scale: float = 1.0) -> str:
                v = [scale * rec[key] for rec in last]
                return f"{statistics.median(v):.4g} [{min(v):.4g}, {max(v):.4g}]"

            rows.append({"setting": name, "method": method, "seeds": len(runs), "accuracy_pct": spread("accuracy", 100),
                         **{k: spread(k) for k in ("within_class_variability", "classifier_means_alignment",
                                                   "average_cosine_margin")},
                         "step_100pct": statistics.median(reached) if len(reached) == len(runs) else None,
                         "seconds": statistics.median(r.get("seconds", float("nan")) for r in runs),
                         "device": runs[0].get("device", "cpu")})
    return rows
