"""Where two folders of films differ at the layout probe's 12x12, and whether a third differs the same way.

Usage: `python benchmarks/layout_diff.py A B [C] [--every N]`
For the shortcut audit (docs/generalisation.md): A against B is, for example, the test folder's early-period
normals against the training normals, and C the training pneumonias. It prints the probe model's
cross-validated AUC for A against B (on standardised thumbnails, as the probe sees them, and on raw grey
levels), the mean standardised thumbnail of A minus B, of C minus B, and the correlation of the two maps:
what the probe could learn from C that also marks A. A diagnostic only: nothing here feeds a product decision.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shortcut  # noqa: E402
from data import list_files, patient_id  # noqa: E402
from images import decode_image  # noqa: E402


def films(folder: Path, every: int) -> tuple[np.ndarray, list[str]]:
    """Every `every`-th film of `folder` (sorted), decoded straight to the probe's side, and its patient."""
    paths = sorted(list_files([str(folder)])[0])[::every]
    if not paths:
        sys.exit(f"{folder}: no images")
    return np.stack([decode_image(p, shortcut.SIDE) for p in paths]), [patient_id(p) for p in paths]


def separability(a: np.ndarray, b: np.ndarray, patients: list[str]) -> float:
    """Cross-validated AUC (folds by patient, as the probe's own) of the probe's model telling rows of `a` from
    rows of `b`; `patients` for the rows of both, in that order."""
    x, y = np.concatenate([a, b]), np.r_[np.ones(len(a), int), np.zeros(len(b), int)]
    return float(roc_auc_score(y, shortcut.out_of_fold(x, y, patients)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", type=Path, nargs="+", metavar="FOLDER", help="A B [C]")
    p.add_argument("--every", type=int, default=1, help="use every N-th film of B and C (sorted), for speed")
    args = p.parse_args(argv)
    if len(args.folders) not in (2, 3):
        p.error("give two or three folders")
    loaded = [films(f, 1 if i == 0 else args.every) for i, f in enumerate(args.folders)]
    sets = [s for s, _ in loaded]
    small = [shortcut.thumbnails(s) for s in sets]  # standardised, as the probe sees them
    a, b, patients = sets[0], sets[1], loaded[0][1] + loaded[1][1]
    print(f"A {len(a)} films, B {len(b)} films: probe-model AUC A vs B "
          f"{separability(small[0], small[1], patients):.3f} (standardised), "
          f"{separability(a.reshape(len(a), -1) / 255.0, b.reshape(len(b), -1) / 255.0, patients):.3f} (raw grey)")
    np.set_printoptions(precision=1, suppress=True, linewidth=150)
    maps = [t.mean(0) - small[1].mean(0) for t in small[::2]]
    print("mean standardised thumbnail, A minus B (rows top to bottom):\n", maps[0].reshape(shortcut.SIDE, -1))
    if len(maps) == 2:
        print("C minus B:\n", maps[1].reshape(shortcut.SIDE, -1))
        print(f"correlation of the two maps: {np.corrcoef(*maps)[0, 1]:.3f}")


if __name__ == "__main__":
    main()
