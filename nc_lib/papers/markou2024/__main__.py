"""The command line of Markou et al. (2024)'s reproduction: ``python -m nc_lib.papers.markou2024 ufm ...``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from ...atomic_io import atomic_write_bytes
from .grid import METHODS, SCALES, ufm_grid
from .runs import run_ufm_grid, ufm_summary


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nc_lib.papers.markou2024 ufm --scale paper --device cuda [--only ufm1000] [--json out.json]``:
    train (or load from the run store) the UFM grid of a scale and print the summary table; the notebook
    then draws the figures from the finished runs in seconds."""
    p = argparse.ArgumentParser(prog="python -m nc_lib.papers.markou2024", description=main.__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("ufm", help="train the UFM grid (Figs. 2-3 and the appendix UFM panels)")
    u.add_argument("--scale", choices=SCALES, default="quick")
    u.add_argument("--device", default=None, help="cpu (default), cuda or auto")
    u.add_argument("--only", nargs="*", default=None, help="settings to run (ufm10 ufm100 ufm200 ufm1000)")
    u.add_argument("--methods", nargs="*", default=None, help=f"heads to run (of {', '.join(METHODS)})")
    u.add_argument("--json", default=None, help="also write the summary rows to this JSON file")
    a = p.parse_args(argv)
    grid = ufm_grid(a.scale)
    results = run_ufm_grid(grid, names=a.only, device=a.device, methods=a.methods)
    rows = ufm_summary(results)
    cols = list(rows[0])
    print("\t".join(cols))
    for r in rows:
        print("\t".join(str(r[c]) for c in cols))
    if a.json:
        atomic_write_bytes(Path(a.json), json.dumps({"scale": a.scale, "settings": {n: grid[n].to_dict() for n in results},
                                                      "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
