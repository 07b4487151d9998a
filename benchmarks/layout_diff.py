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
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shortcut  # noqa: E402
from data import list_files  # noqa: E402
from images import decode_image  # noqa: E402


def films(folder: Path, every: int) -> np.ndarray:
    """Every `every`-th film of `folder` (sorted), decoded straight to the probe's side."""
    paths = sorted(list_files([str(folder)])[0])[::every]
    if not paths:
        sys.exit(f"{folder}: no images")
    return np.stack([decode_image(p, shortcut.SIDE) for p in paths])


def separability(a: np.ndarray, b: np.ndarray) -> float:
    """Cross-validated AUC of the probe's model telling rows of `a` from rows of `b`."""
    x, y = np.concatenate([a, b]), np.r_[np.ones(len(a)), np.zeros(len(b))]
    p = cross_val_predict(LogisticRegression(max_iter=5000), x, y, cv=StratifiedKFold(5, shuffle=True, random_state=0),
                          method="predict_proba")[:, 1]
    return float(roc_auc_score(y, p))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", type=Path, nargs="+", metavar="FOLDER", help="A B [C]")
    p.add_argument("--every", type=int, default=1, help="use every N-th film of B and C (sorted), for speed")
    args = p.parse_args(argv)
    if len(args.folders) not in (2, 3):
        p.error("give two or three folders")
    sets = [films(f, 1 if i == 0 else args.every) for i, f in enumerate(args.folders)]
    a, b = sets[0], sets[1]
    print(f"A {len(a)} films, B {len(b)} films: probe-model AUC A vs B "
          f"{separability(shortcut.thumbnails(a), shortcut.thumbnails(b)):.3f} (standardised), "
          f"{separability(a.reshape(len(a), -1) / 255.0, b.reshape(len(b), -1) / 255.0):.3f} (raw grey)")
    np.set_printoptions(precision=1, suppress=True, linewidth=150)
    base = shortcut.thumbnails(b).mean(0)
    maps = [shortcut.thumbnails(s).mean(0) - base for s in sets[::2]]
    print("mean standardised thumbnail, A minus B (rows top to bottom):\n", maps[0].reshape(shortcut.SIDE, -1))
    if len(maps) == 2:
        print("C minus B:\n", maps[1].reshape(shortcut.SIDE, -1))
        print(f"correlation of the two maps: {np.corrcoef(*maps)[0, 1]:.3f}")


if __name__ == "__main__":
    main()
