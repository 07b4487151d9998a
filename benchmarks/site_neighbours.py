"""Label spreading over the site's own films, judged on half A by the rule in docs/calibration.md ("The site's own
neighbours"): the model's confident calls on one half of half A's children (the self-training quantiles) spread over
a nearest-neighbour graph of that half's pooled features, the other half scored by its nearest fitting films, then
swapped; and transductive, spread and scored over all of half A. A ranking test: AUC and the ceiling (the best
threshold for sensitivity 0.97, half A's labels seen) against the model's own scores, before any threshold.

Usage: `python benchmarks/site_neighbours.py RUN [RUN ...]` (the seedN/ folders of
`benchmarks/generalisation.py --seeds 5 --only default`, scored with `--external` half A).
Half A's labels and names are read here only to split it by child and to score; the seeds of the spreading come
from the films' pixels through the run's own model.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.semi_supervised import LabelSpreading

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import evaluate  # noqa: E402
from lib import infer, runs  # noqa: E402
from generalisation import mean_sd, read_predictions  # noqa: E402  (beside this script)
from site_selftrain import pseudo_labels  # noqa: E402
from site_unlabelled import ceiling, first_half  # noqa: E402

SCORES = ("model", "neighbours", "blend")
SETTINGS = ("cross-fit", "transductive")
AUC_BAR, SPEC_BAR = 0.996, 0.97  # the rule's ranking test


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finished default runs scored with --external half A")
    return p.parse_args(argv)


def site_features(run: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Half A's labels, patients, the run's P(pneumonia) and its pooled features (unit length) from the pixels."""
    y, _, paths = read_predictions(next((run / "external").glob("*/predictions.csv")))
    model = infer.load_predictor(runs.read_checkpoint(run / "best.pt"), torch.device("cpu"))
    images = torch.from_numpy(model.decode(paths, show=False)[0])[:, None]
    logits, features = model.logits_and_features(images)
    features = features.mean(0).numpy()  # one member: its own features
    prob = infer.probabilities(logits)[0]
    return y, np.array([data.patient_id(p) for p in paths]), prob, features / np.linalg.norm(features, axis=1,
                                                                                            keepdims=True)


def spread(features: np.ndarray, prob: np.ndarray, fit_on: np.ndarray) -> np.ndarray:
    """Every film's spread P(pneumonia): seeded by the quantile calls on the `fit_on` films, spread over their graph
    (scikit-learn's defaults), the other films scored through their nearest fitting films."""
    labels = np.full(fit_on.sum(), -1)
    taken, called = pseudo_labels(prob[fit_on])
    labels[taken] = called
    spreading = LabelSpreading(kernel="knn").fit(features[fit_on], labels)
    out = np.empty(len(prob))
    out[fit_on] = spreading.label_distributions_[:, 1]
    if (~fit_on).any():
        out[~fit_on] = spreading.predict_proba(features[~fit_on])[:, 1]
    return out


def scored(y, patients, prob, features, setting: str) -> dict:
    """{score: {auc, ceiling rates}}: AUC the mean of the scored halves' (cross-fit), ceiling over all films."""
    first = first_half(patients)
    every = np.ones(len(y), bool)
    folds = [(first, ~first), (~first, first)] if setting == "cross-fit" else [(every, every)]
    scores = {name: np.zeros(len(y)) for name in SCORES}
    aucs = {name: [] for name in SCORES}
    for fit_on, score_on in folds:
        neighbours = spread(features, prob, fit_on)
        for name, s in (("model", prob), ("neighbours", neighbours), ("blend", (prob + neighbours) / 2)):
            scores[name][score_on] = s[score_on]
            aucs[name].append(evaluate.binary_metrics(y[score_on], s[score_on], 0.5)["auc"])
    return {name: {"auc": float(np.mean(aucs[name])), "ceiling": ceiling(y, scores[name])} for name in SCORES}


def main(argv=None) -> int:
    args = parse_args(argv)
    results = []
    for run in args.runs:
        start = time.perf_counter()
        y, patients, prob, features = site_features(run)
        results.append({s: scored(y, patients, prob, features, s) for s in SETTINGS})
        print(f"{run}: {time.perf_counter() - start:.0f} s; cross-fit AUC " + ", ".join(
            f"{n} {results[-1]['cross-fit'][n]['auc']:.4f}" for n in SCORES), flush=True)
    print(f"\n{len(results)} runs on half A; the bar: cross-fit AUC >= {AUC_BAR}, above the model's own in 4 of 5 "
          f"seeds, ceiling specificity >= {SPEC_BAR}")
    print("| score | setting | AUC | seeds above the model's AUC | ceiling sensitivity | ceiling specificity |\n"
          "|---|---|---|---|---|---|")
    for setting in SETTINGS:
        for name in SCORES:
            rows = [r[setting][name] for r in results]
            above = sum(row["auc"] > r[setting]["model"]["auc"] for row, r in zip(rows, results))
            print(f"| {name} | {setting} | {mean_sd([r['auc'] for r in rows])} | "
                  f"{'-' if name == 'model' else above} | "
                  + " | ".join(mean_sd([r["ceiling"][k] for r in rows]) for k in ("sensitivity", "specificity"))
                  + " |")
    for name in SCORES[1:]:
        print(f"{name}: ceiling specificity per seed " + ", ".join(
            f"{r['cross-fit'][name]['ceiling']['specificity']:.3f}" for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
