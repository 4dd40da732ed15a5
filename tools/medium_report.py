"""Write docs/results/<paper>_medium.md for Papyan et al. 2020, Zhu et al. 2021 or Markou et al. 2024 from the
medium runs in the store.

Usage: NC_RUNS_DIR=runs python tools/medium_report.py --paper papyan2020|zhu2021|markou2024 [--out docs/results]

Nothing is trained: every run (Papyan), experiment (Zhu) or real-data entry (Markou) of the paper's medium grid
whose runs have all finished enters the report, with its figures as PNGs beside it; the others are listed as not
run. Papyan: per network the onset of the terminal phase, NC1 and test accuracy at the onset and at the end,
fig2, fig6, fig7 and table 1, and ``papyan2020.fidelity_failures(results, "medium")`` (also as
papyan2020_medium.json).
Zhu: per run the final train and test accuracy and NC1 at the first and the last measured epoch; fig6 and
fig6_resnet50 add the measured gap of the paper's claim (``zhu2021.fixed_gap_note``). Markou: tables 1 and 2
(train and test top-1 at epochs 50 and 200, median [min, max] over seeds) and NC1 at the same epochs.
The section "What it shows" at the end of a committed report is written by hand from these numbers; rewriting
the report keeps it as it is (update it to the new numbers).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import statistics
import subprocess
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from nc_lib.atomic_io import atomic_write_bytes
from nc_lib.figures import write_png
from nc_lib.papers import markou2024, papyan2020, zhu2021
from nc_lib.runs import is_finished, load_run, read_jsonl, run_dir


#: the heading of the hand-written section; a rewritten report keeps it and everything after it
HAND_WRITTEN = "## What it shows"


def _train_minutes(result: Any) -> float:
    return sum(r.get("measure_s", 0) + r.get("train_s_since_last", 0)
               for r in read_jsonl(result.path / "timings.jsonl")) / 60


def _png(fig: Any, path: Path) -> None:
    if not write_png(fig, path):
        raise SystemExit("PNG export needs a Chromium: run `make setup`.")


def papyan_report(out: Path) -> list[str]:
    grid = papyan2020.grid("medium")
    finished = {key: load_run(c) for key, c in grid.items() if is_finished(c)}
    if not finished:
        raise SystemExit("no finished medium run in the run store: run `make figures SCALE=medium ONLY=03_terminal_phase`")
    pngs = {}
    for fig_id in ("fig2", "fig6", "fig7"):
        pngs[fig_id] = f"papyan2020_medium_{fig_id}.png"
        _png(papyan2020.figure(finished, fig_id), out / pngs[fig_id])
    rows = papyan2020.table1(finished)
    cols = ["network", "tpt_onset_epoch", "test_accuracy_at_zero_train_error", "last_epoch", "test_accuracy_at_last_epoch"]
    pct = lambda v: "—" if v is None else format(v, ".2%") if isinstance(v, float) else v
    table = go.Figure(go.Table(header=dict(values=["network", "TPT onset", "test acc. at onset", "last epoch",
                                                   "test acc. at end"]),
                               cells=dict(values=[[pct(r[c]) for r in rows] for c in cols])))
    table.update_layout(title="papyan2020_table1 at medium scale (Fashion-MNIST)", width=800, height=300)
    pngs["table1"] = "papyan2020_medium_table1.png"
    _png(table, out / pngs["table1"])
    report = papyan2020.terminal_phase_report(finished)
    fails = papyan2020.fidelity_failures(finished, "medium")
    fmt = lambda v, f: "—" if v is None else format(v, f)
    L = ["# Papyan et al. 2020 at the medium scale (Fashion-MNIST, 2 CPU cores)", "",
         "Trained with `make figures SCALE=medium ONLY=03_terminal_phase`.", "", papyan2020.scale_note("medium"), "",
         "| network | TPT onset (epoch) | NC1 at onset | NC1 at end | NC1 fell | test acc. at onset | test acc. at end | "
         "train + measure time |", "|---|---|---|---|---|---|---|---|"]
    for r in report:
        res = finished[(r["dataset"], r["network"])]
        L.append(f"| {papyan2020.network_label(r['network'])} | {fmt(r['tpt_onset'], 'd')} | {fmt(r['nc1_at_onset'], '.3g')} | "
                 f"{r['nc1_at_end']:.3g} | {fmt(r['nc1_fall'], '.3g')}x | {fmt(r['test_accuracy_at_onset'], '.2%')} | "
                 f"{r['test_accuracy_at_end']:.2%} | {_train_minutes(res):.0f} min |")
    for key, c in grid.items():
        if key not in finished:
            recs = read_jsonl(run_dir(c) / "metrics.jsonl") if (run_dir(c) / "metrics.jsonl").exists() else []
            L.append(f"| {papyan2020.network_label(key[1])} | not finished (stopped at epoch "
                     f"{recs[-1]['epoch'] if recs else 0} of {c.epochs}) | | | | | | |")
    L += ["", "Table 1 (test accuracy at the first epoch of zero training error and at the last epoch):", "",
          "| network | onset | test acc. at onset | last epoch | test acc. at end |", "|---|---|---|---|---|"]
    L += [f"| {r['network']} | {r['tpt_onset_epoch']} | {pct(r['test_accuracy_at_zero_train_error'])} | "
          f"{r['last_epoch']} | {pct(r['test_accuracy_at_last_epoch'])} |" for r in rows]
    L += ["", "Figures: " + ", ".join(f"[{k}]({v})" for k, v in pngs.items()) + ".", "",
          "## Against the paper (`papyan2020.fidelity_failures(results, \"medium\")`)", ""]
    L += [f"- {f}" for f in fails] if fails else ["- every check passes: zero training error in the first half, NC1 "
                                                  "falling at least 100x over the terminal phase, and the NC2-NC4 "
                                                  "measurements ending below their onset values."]
    atomic_write_bytes(out / "papyan2020_medium.json", json.dumps({"report": report, "failures": fails, "table1": rows},
                                                                  indent=1) + "\n")
    return L + [""]


def zhu_report(out: Path) -> list[str]:
    zg = importlib.import_module("nc_lib.papers.zhu2021.grid")
    grid = zhu2021.grid("medium")
    builders = {"fig3": zhu2021.figure_fig3, "fig3_mnist": zhu2021.figure_fig3, "fig4": zhu2021.figure_fig4,
                "fig5": zhu2021.figure_fig5, "fig6": zhu2021.figure_fig6, "fig6_resnet50": zhu2021.figure_fig6}
    L = ["# Zhu et al. 2021 at the medium scale (Fashion-MNIST, 2 CPU cores)", ""]
    not_run = []
    for exp, configs in grid.items():
        if not all(is_finished(c) for c in configs.values()):
            done = sum(is_finished(c) for c in configs.values())
            not_run.append(f"{exp} ({done} of {len(configs)} runs finished)")
            continue
        results = {label: load_run(c) for label, c in configs.items()}
        name = f"zhu2021_medium_{exp}.png"
        _png(builders[exp](results), out / name)
        L += [f"## {exp}", "", zhu2021.note(exp, "medium"), "",
              "| run | final train acc. | final test acc. | NC1 first measured | NC1 at end | time |",
              "|---|---|---|---|---|---|"]
        for label, res in results.items():
            h = res.history
            L.append(f"| {label} | {h[-1]['train_accuracy']:.2%} | {h[-1]['test_accuracy']:.2%} | "
                     f"{h[0]['within_class_variability']:.3g} (epoch {h[0]['epoch']}) | "
                     f"{h[-1]['within_class_variability']:.3g} | {_train_minutes(res):.0f} min |")
        if exp.startswith("fig6"):
            L += ["", zhu2021.fixed_gap_note(results)]
        L += ["", f"Figure: [{name}]({name})", ""]
    if not_run:
        L += ["## Not run", "", "- " + "\n- ".join(not_run), ""]
    L.insert(2, f"Sizes: {zg.MEDIUM_PER_CLASS} images per class ({zg.MEDIUM_RL_PER_CLASS} with random labels), widths "
                f"x{zg.MEDIUM_WIDTH:g} (ResNet50 x{zg.MEDIUM_RESNET50_WIDTH:g}), measured every "
                f"{zg.MEDIUM_MEASURE_EVERY} epochs; each section's note lists what differs from the paper.\n")
    return L


def markou_report(out: Path) -> list[str]:
    entries = markou2024.real_grid("medium")
    configs = markou2024.grid("medium")
    L = ["# Markou et al. 2024 at the medium scale (Fashion-MNIST real-data grid, 2 CPU cores)", ""]
    not_run, done = [], {}
    for key, entry in entries.items():
        runs = configs[key]
        # the seeds finished for every method (a grid cut short still reports the seeds it completed)
        seeds = tuple(s for s in entry["seeds"] if all(is_finished(runs[f"{m} seed {s}"]) for m in entry["methods"]))
        if not seeds:
            not_run.append(f"{key} ({sum(is_finished(c) for c in runs.values())} of {len(runs)} runs finished)")
            continue
        entry = {**entry, "seeds": seeds}
        done[key] = markou2024.run_real(entry)  # every one of these runs finished: this loads (and measures the PCM)
        used = [c for label, c in runs.items() if int(label.rsplit(" ", 1)[1]) in seeds]
        minutes = sum(_train_minutes(load_run(c)) for c in used)
        name = f"markou2024_medium_{key}.png"
        _png(markou2024.figure_panels(done[key], extra_keys=("accuracy", "accuracy_test"), x_title="epoch",
                                      title=f"{entry['stands_for']} — Fashion-MNIST stand-in, medium"), out / name)
        L += [f"## {key}", "", markou2024.real_note(entry), "",
              f"Seeds {', '.join(map(str, seeds))} of the grid's {len(configs[key]) // len(entry['methods'])}: "
              f"{len(used)} runs, {minutes:.0f} min of training and measurement. Figure: [{name}]({name})", ""]
        ep = entry["report_epochs"]
        L += [f"| method | train top-1 @ {ep[0]} | train top-1 @ {ep[1]} | test top-1 @ {ep[0]} | test top-1 @ {ep[1]} | "
              f"NC1 @ {ep[0]} | NC1 @ {ep[1]} |", "|---|---|---|---|---|---|---|"]
        train = {r["method"]: r for r in markou2024.accuracy_table({key: done[key]}, entries, "accuracy")}
        test = {r["method"]: r for r in markou2024.accuracy_table({key: done[key]}, entries, "accuracy_test")}
        for m, seeds in done[key].items():
            label = markou2024.LABELS[m]
            nc1 = [statistics.median(min(s["records"], key=lambda r: abs(r["step"] - e))["within_class_variability"]
                                     for s in seeds) for e in ep]
            L.append(f"| {label} | {train[label][f'epoch {ep[0]}']} | {train[label][f'epoch {ep[1]}']} | "
                     f"{test[label][f'epoch {ep[0]}']} | {test[label][f'epoch {ep[1]}']} | {nc1[0]:.3g} | {nc1[1]:.3g} |")
        L.append("")
    if not_run:
        L += ["## Not run", "", "- " + "\n- ".join(not_run), ""]
    return L


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paper", required=True, choices=("papyan2020", "zhu2021", "markou2024"))
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    out = Path(args.out)
    L = {"papyan2020": papyan_report, "zhu2021": zhu_report, "markou2024": markou_report}[args.paper](out)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    L.insert(1, f"\nMade on {datetime.date.today()} (commit {commit}) with `python tools/medium_report.py --paper "
                f"{args.paper}` from the medium runs in the run store"
                + ("." if args.paper == "papyan2020" else "; top-1 in %, median [min, max] over seeds."))
    path = out / f"{args.paper}_medium.md"
    text = "\n".join(L) + "\n"
    hand = path.read_text().partition(HAND_WRITTEN)[2] if path.exists() else ""
    if hand:  # the hand-written section of the committed report stays (check it against the new numbers)
        text += "\n" + HAND_WRITTEN + hand
    atomic_write_bytes(path, text)  # a killed rewrite leaves the committed report whole
    print(text)


if __name__ == "__main__":
    main()
