"""Write docs/results/papyan2020_medium.md from the medium-scale runs found in the run store.

Usage: NC_RUNS_DIR=runs python tools/papyan_medium_report.py [--out docs/results]
Every finished medium run of papyan2020.grid("medium") enters the report; a run that is not finished is
listed as such (the report says how far it got). The figures fig2, fig6, fig7 and table 1 are drawn from the
finished runs with the kit's builders and written as PNGs beside the report. The section "What it shows" at
the end of the committed report is written by hand from these numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess

import plotly.graph_objects as go
from pathlib import Path

from nc_lib.figures import write_png
from nc_lib.papers import papyan2020
from nc_lib.runs import read_jsonl, run_dir
from nc_lib.runs import load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    out = Path(args.out)
    grid = papyan2020.grid("medium")
    finished, partial = {}, {}
    for key, cfg in grid.items():
        try:
            finished[key] = load_run(cfg)
        except FileNotFoundError:
            recs = read_jsonl(run_dir(cfg) / "metrics.jsonl") if (run_dir(cfg) / "metrics.jsonl").exists() else []
            partial[key] = recs[-1]["epoch"] if recs else 0
    if not finished:
        raise SystemExit("no finished medium run in the run store: run `make figures SCALE=medium ONLY=03_terminal_phase`")
    pngs = {}
    for fig_id in ("fig2", "fig6", "fig7"):
        name = f"papyan2020_medium_{fig_id}.png"
        if not write_png(papyan2020.figure(finished, fig_id), out / name):
            raise SystemExit("PNG export needs a Chromium: run `make setup`.")
        pngs[fig_id] = name
    rows = papyan2020.table1(finished)
    cols = ["network", "tpt_onset_epoch", "test_accuracy_at_zero_train_error", "last_epoch", "test_accuracy_at_last_epoch"]
    cells = [[r[c] if not isinstance(r[c], float) else f"{r[c]:.2%}" for r in rows] for c in cols]
    table = go.Figure(go.Table(header=dict(values=["network", "TPT onset", "test acc. at onset", "last epoch",
                                                   "test acc. at end"]), cells=dict(values=cells)))
    table.update_layout(title="papyan2020_table1 at medium scale (Fashion-MNIST)", width=800, height=300)
    if not write_png(table, out / "papyan2020_medium_table1.png"):
        raise SystemExit("PNG export needs a Chromium: run `make setup`.")
    pngs["table1"] = "papyan2020_medium_table1.png"
    report = papyan2020.terminal_phase_report(finished)
    fails = papyan2020.fidelity_failures(finished, "medium")
    sec = {}
    for key, res in finished.items():
        t = read_jsonl(res.path / "timings.jsonl")
        sec[key] = sum(r.get("measure_s", 0) + r.get("train_s_since_last", 0) for r in t)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    L = [f"# Papyan et al. 2020 at the medium scale (Fashion-MNIST, 2 CPU cores)", "",
         f"Made on {datetime.date.today()} with `make figures SCALE=medium ONLY=03_terminal_phase` (commit {commit}) and "
         "`python tools/papyan_medium_report.py`, on the 2-core development machine, sharing it with other work.", "",
         papyan2020.scale_note("medium"), "",
         "| network | TPT onset (epoch) | NC1 at onset | NC1 at end | NC1 fell | test acc. at onset | test acc. at end | "
         "train + measure time |", "|---|---|---|---|---|---|---|---|"]
    for r in report:
        key = (r["dataset"], r["network"])
        fmt = lambda v, f: "—" if v is None else format(v, f)
        L.append(f"| {papyan2020.network_label(r['network'])} | {fmt(r['tpt_onset'], 'd')} | {fmt(r['nc1_at_onset'], '.3g')} | "
                 f"{r['nc1_at_end']:.3g} | {fmt(r['nc1_fall'], '.3g')}x | {fmt(r['test_accuracy_at_onset'], '.2%')} | "
                 f"{r['test_accuracy_at_end']:.2%} | {sec[key] / 60:.0f} min |")
    for key, ep in partial.items():
        L.append(f"| {papyan2020.network_label(key[1])} | not finished (stopped at epoch {ep} of 350) | | | | | | |")
    L += ["", "Table 1 (test accuracy at the first epoch of zero training error and at the last epoch):", "",
          "| network | onset | test acc. at onset | last epoch | test acc. at end |", "|---|---|---|---|---|"]
    for r in rows:
        a = r["test_accuracy_at_zero_train_error"]
        L.append(f"| {r['network']} | {r['tpt_onset_epoch']} | {'—' if a is None else format(a, '.2%')} | {r['last_epoch']} | "
                 f"{r['test_accuracy_at_last_epoch']:.2%} |")
    L += ["", "Figures: " + ", ".join(f"[{k}]({v})" for k, v in pngs.items()) + ".", "",
          "## Against the paper (`papyan2020.fidelity_failures(results, \"medium\")`)", ""]
    L += [f"- {f}" for f in fails] if fails else ["- every check passes: zero training error in the first half, NC1 "
                                                  "falling at least 100x over the terminal phase, and the NC2-NC4 "
                                                  "measurements ending below their onset values."]
    (out / "papyan2020_medium.md").write_text("\n".join(L) + "\n")
    (out / "papyan2020_medium.json").write_text(json.dumps({"report": report, "failures": fails, "table1": rows,
                                                            "unfinished": {f"{k[0]}/{k[1]}": v for k, v in partial.items()}},
                                                           indent=1) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    main()
