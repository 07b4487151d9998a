"""How much of a set's missing specificity is the threshold's transfer, and how much the ranking.

Usage: `python benchmarks/operating_point.py RUN_DIR [RUN_DIR ...] [--set NAME] [--sensitivity 0.97]`
For each finished run it reads the threshold the run chose on validation (metrics.json) and one scored set's
predictions (`--set`: an --external folder's name, or "test split"), and prints the set's sensitivity and
specificity at that threshold beside the highest specificity any threshold reaches on the set while keeping
`--sensitivity` there. That second threshold is chosen on the set itself, which the product never does: it is
the ceiling the model's ranking allows, not a figure to report. A diagnostic only.
"""
import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Labels (True: PNEUMONIA) and probabilities of a predictions.csv, leaving out rows without either."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["probability"] and r["label"]]
    return np.array([r["label"] == "PNEUMONIA" for r in rows]), np.array([float(r["probability"]) for r in rows])


def hindsight_specificity(y: np.ndarray, p: np.ndarray, sensitivity: float) -> float:
    """The highest specificity of any threshold (called pneumonia at p >= threshold) whose sensitivity on these
    films is at least `sensitivity`: the threshold is the score of the lowest pneumonia it still has to call."""
    positives = np.sort(p[y])
    threshold = positives[int(np.floor((1 - sensitivity) * len(positives) + 1e-9))]
    return float((p[~y] < threshold).mean())


def run_line(run: Path, name: str, sensitivity: float) -> tuple[float, float, float, float]:
    """(validation threshold, sensitivity and specificity at it, hindsight specificity) of one run's set."""
    threshold = json.loads((run / "metrics.json").read_text())["validation"]["threshold"]
    path = run / "predictions.csv" if name == "test split" else run / "external" / name / "predictions.csv"
    y, p = read_predictions(path)
    called = p >= threshold
    return threshold, float(called[y].mean()), float((~called[~y]).mean()), hindsight_specificity(y, p, sensitivity)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run folders (each with metrics.json)")
    ap.add_argument("--set", default="official_test_a_224sq", help="an --external folder's name, or 'test split'")
    ap.add_argument("--sensitivity", type=float, default=0.97, help="the sensitivity the hindsight threshold keeps")
    args = ap.parse_args()
    rows = []
    for run in args.runs:
        try:
            rows.append(run_line(run, args.set, args.sensitivity))
        except (OSError, KeyError, ValueError) as err:
            sys.exit(f"{run}: cannot read its threshold or the predictions of '{args.set}' ({err})")
        t, sens, spec, best = rows[-1]
        print(f"{run}: validation threshold {t:.3f}: sensitivity {sens:.3f}, specificity {spec:.3f}; "
              f"best specificity at sensitivity >= {args.sensitivity:g} in hindsight {best:.3f}")
    if len(rows) > 1:
        cols = np.array(rows)
        sd = cols.std(0, ddof=1)
        print(f"mean over {len(rows)} runs: specificity at the validation threshold "
              f"{cols[:, 2].mean():.3f}±{sd[2]:.3f}, in hindsight {cols[:, 3].mean():.3f}±{sd[3]:.3f} "
              f"(thresholds {cols[:, 0].min():.2f}-{cols[:, 0].max():.2f})")


if __name__ == "__main__":
    main()
