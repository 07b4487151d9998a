"""Refit a finished run's linear head with the layout probe's groups balanced (deep feature reweighting), and score it.

Usage: `python benchmarks/last_layer.py RUN_DIR [RUN_DIR ...] [--set official_test_a_224sq]`

A network's penultimate features may hold the lungs' evidence even where its last layer leans on the framing
(Kirichenko et al. 2022, "Last layer re-training is sufficient for robustness to spurious correlations"). This
keeps every run's trunk and refits only its linear head, on the training split's features (the evaluation view,
no augmentation; fp32), as an L2-regularised logistic regression on standardised features (C = 1, not tuned).
Two weightings, fixed before any external set was scored with them:

- **balanced groups** (the test): four groups, class x the layout probe's out-of-fold call (its score >= 0.5),
  each carrying the same total weight. In the training split nearly every normal looks normal to the probe and
  nearly every pneumonia looks like one; balanced, the few normals framed like pneumonias (and the pneumonias
  framed like normals) weigh as much as the rest, so the framing no longer predicts the label.
- **balanced classes** (the control): the two classes carry the same total weight, the probe unused. It tells the
  effect of the groups from that of refitting a head without augmentation.

The threshold is then chosen on the validation split with the new head (`sens=0.95`, the product's policy), and
the test split and `--set` (an --external folder of the run) are scored at it. Printed per run, with the set's
false positives by name, and as mean +- sd over runs, beside the run's own head rescored the same way (fp32, so it
can differ from the run's bf16 figures by a film). "probe rho": the Spearman correlation, among the set's normals,
of the model's and the probe's scores (the probe fitted on the run's whole training split). A diagnostic: the
product does not refit heads.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import runs  # noqa: E402
import shortcut  # noqa: E402
from evaluate import binary_metrics, choose_threshold  # noqa: E402
from generalisation import mean_sd  # noqa: E402
from infer import load_predictor, probabilities  # noqa: E402
from labels import CLASSES  # noqa: E402

POLICY = "sens=0.95"
HEADS = ("own head", "balanced classes", "balanced groups")


def group_weights(groups: np.ndarray) -> np.ndarray:
    """Per film, a weight that gives every group present the same total weight; the weights average 1."""
    present, index, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return len(groups) / (len(present) * counts[index])


def refit(features: np.ndarray, labels: np.ndarray, weights: np.ndarray):
    """A linear head on standardised features; returns the function that scores features with it."""
    scaler = StandardScaler().fit(features)
    head = LogisticRegression(C=1.0, max_iter=5000).fit(scaler.transform(features), labels, sample_weight=weights)
    return lambda f: head.predict_proba(scaler.transform(f))[:, 1]


def rates(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """AUC, sensitivity and specificity at `threshold`, under the short names this benchmark prints."""
    m = binary_metrics(y, p, threshold)
    return {"auc": m["auc"], "sens": m["sensitivity"], "spec": m["specificity"]}


def score_run(run: Path, set_name: str) -> dict[str, dict]:
    """Per head: the validation threshold and the test split's and the set's rates, and the set's probe rho."""
    ckpt = runs.read_checkpoint(run / "best.pt")
    predictor = load_predictor(ckpt, torch.device("cpu"))
    split = runs.read_csv(run / "split.csv")
    external = [r for r in runs.read_csv(run / "external" / set_name / "predictions.csv")
                if r["label"] and r["probability"]]
    sets = {name: [r for r in split if r["split"] == name] for name in ("train", "val", "test")}
    sets["set"] = external
    images, features, labels, own = {}, {}, {}, {}
    for name, rows in sets.items():
        images[name], errors, _ = predictor.decode([r["path"] for r in rows], show=False)
        if any(errors):
            raise SystemExit(f"{run}: {sum(e is not None for e in errors)} {name} files could not be read")
        logits, feats = predictor.logits_and_features(torch.from_numpy(images[name][:, None]))
        features[name] = feats[0].numpy().astype(np.float64)
        labels[name] = np.array([CLASSES.index(r["label"]) for r in rows])
        own[name] = probabilities(logits)[0]  # P(pneumonia) from the run's own head
    train_patients = [r["patient"] for r in sets["train"]]
    probe = shortcut.fit_probe(images["train"], labels["train"], train_patients)
    layout = probe.score(images["set"])
    groups = labels["train"] * 2 + (probe.out_of_fold >= 0.5)
    scorers = {"balanced classes": refit(features["train"], labels["train"], group_weights(labels["train"])),
               "balanced groups": refit(features["train"], labels["train"], group_weights(groups))}
    counts = {int(g): int((groups == g).sum()) for g in np.unique(groups)}
    out = {"groups": counts}
    for head in HEADS:
        probs = {name: own[name] if head == "own head" else scorers[head](features[name])
                 for name in ("val", "test", "set")}
        threshold = choose_threshold(labels["val"], probs["val"], POLICY)
        normal = labels["set"] == 0
        false = normal & (probs["set"] >= threshold)
        out[head] = {"threshold": threshold, "test": rates(labels["test"], probs["test"], threshold),
                     "set": rates(labels["set"], probs["set"], threshold),
                     "rho": float(spearmanr(probs["set"][normal], layout[normal])[0]),
                     "false_positives": [Path(r["path"]).stem for r, f in zip(sets["set"], false) if f]}
    return out


def line(head: str, rows: list[dict]) -> str:
    cols = {"threshold": [r[head]["threshold"] for r in rows], "rho": [r[head]["rho"] for r in rows]}
    for part in ("test", "set"):
        for k in ("auc", "sens", "spec"):
            cols[f"{part} {k}"] = [r[head][part][k] for r in rows]
    return f"{head:17s} " + "  ".join(f"{k} {mean_sd(v)}" for k, v in cols.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run folders (best.pt, split.csv, external/SET)")
    ap.add_argument("--set", default="official_test_a_224sq", help="the --external folder's name to score")
    args = ap.parse_args()
    rows = []
    for run in args.runs:
        rows.append(score_run(run, args.set))
        r = rows[-1]
        print(f"{run}: training groups (class*2 + probe call) {r['groups']}")
        for head in HEADS:
            h = r[head]
            print(f"  {head:17s} threshold {h['threshold']:.3f}; test AUC {h['test']['auc']:.3f} spec "
                  f"{h['test']['spec']:.3f}; {args.set} AUC {h['set']['auc']:.3f} sens {h['set']['sens']:.3f} "
                  f"spec {h['set']['spec']:.3f} probe rho {h['rho']:.3f}", flush=True)
            print(f"    {args.set}'s false positives: {' '.join(h['false_positives'])}")
    print(f"\nover {len(rows)} runs ('set' is {args.set}):")
    for head in HEADS:
        print(line(head, rows))


if __name__ == "__main__":
    main()
