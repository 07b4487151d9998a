"""The layout shortcut audit of a finished run: a probe that cannot see lung texture, and who pays for it.

Usage: `python benchmarks/shortcut.py RUN_DIR [--side 12] [--groups REGEX]`
A logistic regression on side x side thumbnails of each film (standardised per image) is fitted on the run's
training split only (split.csv); it sees the framing, collimation and markers, not the texture of the lungs.
Per scored set (validation, the test split, every --external set) it prints the probe's AUC, the Spearman
correlation of the model's and the probe's scores among the negatives and among the positives, the model's
specificity among the normals the probe calls pneumonia and among the rest, and the model's rates per file-name
series (REGEX's first group; for Kaggle names NORMAL2-IM, IM, person), each with a Wilson 95% interval.
"""
import argparse
import re
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import runs  # noqa: E402
from images import decode_image  # noqa: E402
from labels import CLASSES  # noqa: E402

SERIES = r"^(NORMAL2-IM|IM|person)"


def thumbnails(paths: list[str], side: int) -> np.ndarray:
    """Each film as a side x side thumbnail, standardised by its own mean and sd, flattened."""
    x = np.stack([decode_image(p, side).astype(np.float64).ravel() for p in paths])
    return (x - x.mean(1, keepdims=True)) / np.maximum(x.std(1, keepdims=True), 1e-6)


def wilson(k: int, n: int) -> str:
    """k of n with its Wilson 95% interval."""
    if n == 0:
        return "-"
    p, z = k / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"{p:.3f} [{centre - half:.3f}, {centre + half:.3f}] ({k}/{n})"


def scored_sets(run: Path) -> dict[str, Path]:
    """The predictions files of a run: validation, the test split and every external set."""
    sets = {"validation": run / "predictions_val.csv", "test split": run / "predictions.csv"}
    sets.update({p.parent.name: p for p in sorted((run / "external").glob("*/predictions.csv"))})
    return {k: v for k, v in sets.items() if v.exists()}


def audit_set(name: str, rows: list[dict], probe: LogisticRegression, threshold: float, side: int,
              groups: str) -> None:
    rows = [r for r in rows if r["probability"] and r["label"]]
    y = np.array([CLASSES.index(r["label"]) for r in rows])
    model = np.array([float(r["probability"]) for r in rows])
    layout = probe.predict_proba(thumbnails([r["path"] for r in rows], side))[:, 1]
    rho = [spearmanr(model[y == c], layout[y == c])[0] for c in (0, 1)]
    print(f"\n{name}: {len(rows)} films; probe AUC {roc_auc_score(y, layout):.3f}; model AUC "
          f"{roc_auc_score(y, model):.3f}; Spearman(model, probe) among negatives {rho[0]:.3f}, positives {rho[1]:.3f}")
    normal, called = y == 0, model >= threshold
    for label, mask in (("probe calls pneumonia", layout >= 0.5), ("probe calls normal", layout < 0.5)):
        among = normal & mask
        print(f"  specificity among normals the {label}: {wilson(int((~called & among).sum()), int(among.sum()))}")
    series = np.array([(re.match(groups, Path(r["path"]).name) or [None, "other"])[1] for r in rows])
    for group in sorted(set(series)):
        g = series == group
        neg, pos = g & normal, g & ~normal
        print(f"  series {group}: specificity {wilson(int((~called & neg).sum()), int(neg.sum()))}; "
              f"sensitivity {wilson(int((called & pos).sum()), int(pos.sum()))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--side", type=int, default=12, help="thumbnail side in pixels")
    parser.add_argument("--groups", default=SERIES, help="file-name pattern whose first group names a film's series")
    args = parser.parse_args()
    run = Path(args.run)
    split = runs.read_csv(run / "split.csv")
    train = [r for r in split if r["split"] == "train"]
    x, y = thumbnails([r["path"] for r in train], args.side), np.array([CLASSES.index(r["label"]) for r in train])
    patients = [r["patient"] for r in train]
    probe = LogisticRegression(C=1.0, max_iter=5000)
    cross = cross_val_predict(probe, x, y, cv=GroupKFold(5), groups=patients, method="predict_proba")[:, 1]
    probe.fit(x, y)  # the training split only: validation and test never reach it
    print(f"{run}: probe on {args.side}x{args.side} thumbnails, fitted on {len(train)} training films; "
          f"5-fold cross-validated AUC by patient on the training split {roc_auc_score(y, cross):.3f}")
    threshold = float(runs.read_checkpoint(run / "best.pt")["threshold"])
    for name, path in scored_sets(run).items():
        audit_set(name, runs.read_csv(path), probe, threshold, args.side, args.groups)


if __name__ == "__main__":
    main()
