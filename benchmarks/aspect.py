"""The stored films' aspect ratios (width / height) per class and per file-name series, from their headers.

Usage: `python benchmarks/aspect.py DIR` where DIR holds NORMAL/ and PNEUMONIA/ (for example a Kaggle train folder
at its own aspect ratios, not a squashed re-encode). Every film is resized to a square before the network sees
it, so an aspect ratio that differs by class becomes a difference in the chest's proportions, a cue beside the
lungs' texture (docs/generalisation.md, the shortcut audit). It prints the median and the 10th and 90th
percentiles per group, and the AUC of the aspect ratio alone as a pneumonia score. A diagnostic only: nothing here
feeds a product decision.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import list_files  # noqa: E402
from labels import CLASSES, SERIES_PATTERN  # noqa: E402
from shortcut import aspect_ratios, groups_of  # noqa: E402


def ratios(folder: Path) -> tuple[np.ndarray, list[str]]:
    """Width / height of every film below `folder` with a size in its header, and each film's series."""
    paths = sorted(list_files([str(folder)])[0])
    r = aspect_ratios(paths)
    known = np.isfinite(r)
    if not known.all():
        print(f"  {folder}: {int((~known).sum())} files without a readable size left out")
    return r[known], groups_of([p for p, k in zip(paths, known) if k], SERIES_PATTERN)["series"]


def line(name: str, r: np.ndarray) -> str:
    low, mid, high = np.quantile(r, [0.1, 0.5, 0.9])
    return f"  {name:12s} {len(r):5d} films  width/height median {mid:.3f}  (10th-90th percentile {low:.3f}-{high:.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a folder with NORMAL/ and PNEUMONIA/ below it")
    args = ap.parse_args()
    values, labels = [], []
    for label, cls in enumerate(CLASSES):
        r, series = ratios(args.folder / cls)
        if not len(r):
            sys.exit(f"{args.folder / cls}: no images")
        print(line(cls, r))
        for name in sorted(set(series)):
            print("  " + line(name, r[np.array(series) == name]))
        values.append(r)
        labels.append(np.full(len(r), label))
    auc = roc_auc_score(np.concatenate(labels), np.concatenate(values))
    print(f"AUC of width/height alone as a pneumonia score: {auc:.3f}")


if __name__ == "__main__":
    main()
