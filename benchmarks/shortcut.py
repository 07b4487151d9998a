"""The layout shortcut audit of a finished run: a probe that cannot see lung texture, and who pays for it.

Usage: `python benchmarks/shortcut.py RUN_DIR [--groups REGEX]`
For runs made before the audit was part of every run (newer runs carry it in metrics.json, sets[name].shortcut).
The probe of shortcut.py is fitted on the run's training split only (split.csv), on thumbnails decoded straight
from the files; per scored set (validation, the test split, every --external set) it prints the probe's AUC, the
Spearman correlation of the model's and the probe's scores among the negatives and among the positives, the
model's specificity among the normals the probe calls pneumonia and among the rest, and the model's rates per
group (REGEX's first group; for Kaggle names NORMAL2-IM, IM, person), each with a Wilson 95% interval.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import runs  # noqa: E402
import shortcut  # noqa: E402
from images import decode_image  # noqa: E402
from labels import CLASSES, SERIES_PATTERN  # noqa: E402
from report import rate_text, value_text  # noqa: E402


def films(paths: list[str]) -> np.ndarray:
    """Each film decoded straight to SIDE x SIDE (the probe's thumbnail size)."""
    return np.stack([decode_image(p, shortcut.SIDE) for p in paths])


def region_aucs(small: np.ndarray, labels: np.ndarray, patients: list[str]) -> dict[str, float]:
    """The probe's cross-validated AUC on the training split when it sees only the centre 6x6 of the 12x12
    thumbnail (mediastinum and the inner lungs) or only the ring around it (the frame, shoulders, markers and the
    outer lungs): how much of what it reads is layout, and how much low-frequency density inside the chest."""
    x = shortcut.thumbnails(small)
    centre = np.zeros((shortcut.SIDE, shortcut.SIDE), bool)
    quarter = shortcut.SIDE // 4
    centre[quarter:-quarter, quarter:-quarter] = True
    out = {}
    for name, cols in (("centre", centre.ravel()), ("ring", ~centre.ravel())):
        out[name] = float(roc_auc_score(labels, shortcut.out_of_fold(x[:, cols], labels, patients)))
    return out


def scored_sets(run: Path) -> dict[str, Path]:
    """The predictions files of a run: validation, the test split and every external set."""
    sets = {"validation": run / "predictions_val.csv", "test split": run / "predictions.csv"}
    sets.update({p.parent.name: p for p in sorted((run / "external").glob("*/predictions.csv"))})
    return {k: v for k, v in sets.items() if v.exists()}


def audit_set(name: str, rows: list[dict], probe: shortcut.Probe, threshold: float, groups: str) -> None:
    rows = [r for r in rows if r["probability"] and r["label"]]
    paths = [r["path"] for r in rows]
    y = np.array([CLASSES.index(r["label"]) for r in rows])
    model = np.array([float(r["probability"]) for r in rows])
    a = shortcut.audit(y, model, threshold, probe.score(films(paths)), shortcut.groups_of(paths, groups))
    print(f"\n{name}: {len(rows)} films; probe AUC {value_text(a['probe_auc'])}; Spearman(model, probe) among "
          f"negatives {value_text(a['spearman_negatives'])}, positives {value_text(a['spearman_positives'])}")
    print(f"  specificity among normals the probe calls pneumonia: {rate_text(a['specificity_probe_positive'])}")
    print(f"  specificity among normals the probe calls normal: {rate_text(a['specificity_probe_negative'])}")
    for grouping, table in a["groups"].items():
        for group, r in table.items():
            print(f"  {grouping} {group}: specificity {rate_text(r['specificity'])}; "
                  f"sensitivity {rate_text(r['sensitivity'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--groups", default=SERIES_PATTERN, help="file-name pattern whose first group names a group")
    args = parser.parse_args()
    run = Path(args.run)
    train = [r for r in runs.read_csv(run / "split.csv") if r["split"] == "train"]
    labels = np.array([CLASSES.index(r["label"]) for r in train])
    small, patients = films([r["path"] for r in train]), [r["patient"] for r in train]
    probe = shortcut.fit_probe(small, labels, patients)
    regions = region_aucs(small, labels, patients)
    print(f"{run}: probe on {shortcut.SIDE}x{shortcut.SIDE} thumbnails, fitted on {len(train)} training films; "
          f"5-fold cross-validated AUC by patient on the training split {probe.train_cv_auc:.3f} (the centre "
          f"{shortcut.SIDE // 2}x{shortcut.SIDE // 2} alone {regions['centre']:.3f}, the ring around it alone "
          f"{regions['ring']:.3f})")
    threshold = float(runs.read_checkpoint(run / "best.pt")["threshold"])
    for name, path in scored_sets(run).items():
        audit_set(name, runs.read_csv(path), probe, threshold, args.groups)


if __name__ == "__main__":
    main()
