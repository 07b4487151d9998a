"""Score predictions: threshold from validation, metrics with patient-bootstrap intervals, plots.

Usage: `threshold = choose_threshold(y_val, p_val, "youden"); m = score(y, p, patients, threshold)`.
"""
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
matplotlib.rcParams["text.parse_math"] = False  # titles and legends carry file names: "$" is text, not TeX
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.calibration import CalibrationDisplay
from sklearn.metrics import (ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay, average_precision_score,
                             brier_score_loss, confusion_matrix, roc_auc_score, roc_curve)

import data
import gradcam
from lib import ood
from lib import progress
from lib import runs
from lib import shortcut
from lib.cache import ImageCache, TensorRows
from lib.infer import Predictor, probabilities
from lib.labels import CAUSES, CLASS_COLUMNS, CLASSES, SERIES_PATTERN
from lib.runs import write_csv

BOOTSTRAP_RESAMPLES = 2000
CHUNK = 1024  # images scored and checked together: memory is bounded by a chunk, not by the set
METRICS = ("accuracy", "auc", "sensitivity", "specificity", "ppv", "npv")  # the rates at a threshold


def choose_threshold(y_true, y_prob, policy: str) -> float:
    """Decision threshold from validation predictions.

    'youden' maximises sensitivity + specificity - 1; 'sens=0.95' is the highest threshold whose
    sensitivity still reaches 0.95 (the best specificity at that sensitivity); a number is used as is.
    """
    if policy == "youden":
        fpr, tpr, thr = roc_curve(y_true, y_prob)
        return float(min(thr[np.argmax(tpr - fpr)], 1.0))
    if policy.startswith("sens="):
        target = float(policy[5:])
        # every point of the curve: dropping collinear ones would skip the strictest threshold on a run of
        # positives with no negative between them, and pick the run's loosest end instead
        fpr, tpr, thr = roc_curve(y_true, y_prob, drop_intermediate=False)
        return float(min(thr[np.flatnonzero(tpr >= target)[0]], 1.0))
    value = float(policy)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold {value} is not a probability in [0, 1]")
    return value


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def binary_metrics(y_true, y_prob, threshold: float) -> dict:
    """Accuracy, AUC, sensitivity, specificity, PPV, NPV and the confusion counts at `threshold`."""
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob)
    y_pred = (y_prob >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel())
    auc = float(roc_auc_score(y_true, y_prob)) if len(np.unique(y_true)) == 2 else float("nan")
    return {"accuracy": _ratio(tp + tn, len(y_true)), "auc": auc, "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp), "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn),
            "threshold": float(threshold), "tp": tp, "tn": tn, "fp": fp, "fn": fn}


def weighted_auc(y_true, y_prob, weights: np.ndarray) -> np.ndarray:
    """ROC AUC for each row of image weights (R x N), ties counted half: the weighted Mann-Whitney U.

    Equal to `roc_auc_score(..., sample_weight=row)` for every row, without a Python call per row.
    """
    order = np.argsort(y_prob, kind="stable")
    scores, pos = np.asarray(y_prob)[order], np.asarray(y_true)[order] == 1
    starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])  # groups of tied scores
    w = np.asarray(weights, dtype=float)[:, order]
    p = np.add.reduceat(w * pos, starts, axis=1)
    n = np.add.reduceat(w * ~pos, starts, axis=1)
    below = np.cumsum(n, axis=1) - n  # negative weight strictly below each score group
    with np.errstate(invalid="ignore", divide="ignore"):
        return (p * (below + 0.5 * n)).sum(1) / (p.sum(1) * n.sum(1))


def patient_resamples(patients, n_resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap resamples of patients as multiplicities (R x patients), and each image's patient index."""
    codes = np.unique(np.asarray(patients), return_inverse=True)[1]
    n_pat = codes.max() + 1
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, n_pat, n_pat), minlength=n_pat) for _ in range(n_resamples)]), codes


def auc_draws(y_true, y_prob, weights: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The AUC of every resample (patient multiplicities applied as image weights), in chunks to bound memory."""
    return np.concatenate([weighted_auc(y_true, y_prob, chunk[:, codes]) for chunk in np.array_split(weights, 8)])


def interval95(draws: np.ndarray) -> np.ndarray:
    """2.5th and 97.5th percentiles over resamples (axis 0), ignoring NaN draws; NaN where every draw is NaN.

    A rate with no denominator in any resample (NPV with no predicted negatives) has no interval:
    that is reported as NaN, without numpy's all-NaN warning in the user's terminal.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanpercentile(draws, [2.5, 97.5], axis=0)


@dataclass
class Resampled:
    """One scored set under every bootstrap resample: patients drawn with all their images, each resample a vector
    of patient multiplicities applied as image weights. What a figure's `draws` reads."""

    y_true: np.ndarray
    y_prob: np.ndarray
    pos: np.ndarray  # the truth is pneumonia
    pred: np.ndarray  # called pneumonia at the threshold
    weights: np.ndarray  # R x patients
    codes: np.ndarray  # each image's patient

    def total(self, per_image: np.ndarray) -> np.ndarray:
        """A per-image quantity summed in every resample: per patient first, then one matrix product."""
        per_patient = np.bincount(self.codes, weights=per_image, minlength=self.weights.shape[1])
        return self.weights @ per_patient

    def share(self, part: np.ndarray, of: np.ndarray) -> np.ndarray:
        """The images in `part` among those in `of` (boolean masks), in every resample."""
        return self.total(part & of) / self.total(of)


@dataclass(frozen=True)
class Figure:
    """One figure of a scored set, declared once: its key in metrics.json (a set's "rates"), its label, how many
    decimals, its 95% patient-bootstrap interval (`draws`: its value in every resample; None: no interval) and, for
    the model card's front matter, its metric type there (`hub`). The terminal, report.html and MODEL_CARD.md all
    render a set's figures from FIGURES, in this order; a key an older metrics.json lacks shows as a dash."""

    key: str
    label: str
    draws: Callable[[Resampled], np.ndarray] | None = None
    hub: str | None = None
    digits: int = 3


FIGURES = (
    Figure("accuracy", "accuracy", lambda r: r.share(r.pos == r.pred, np.ones_like(r.pos)), "accuracy"),
    Figure("auc", "auc", lambda r: auc_draws(r.y_true, r.y_prob, r.weights, r.codes), "roc_auc"),
    Figure("sensitivity", "sensitivity", lambda r: r.share(r.pred, r.pos), "recall"),
    Figure("specificity", "specificity", lambda r: r.share(~r.pred, ~r.pos), "specificity"),
    Figure("ppv", "ppv", lambda r: r.share(r.pos, r.pred), "precision"),
    Figure("npv", "npv", lambda r: r.share(~r.pos, ~r.pred), "npv"),
    Figure("average_precision", "average precision"),
    Figure("brier", "Brier score", lambda r: r.total((r.y_prob - r.y_true) ** 2) / r.total(np.ones_like(r.y_prob))),
    Figure("ece", "calibration error (ECE)"),
)


def bootstrap_ci(y_true, y_prob, patients, threshold: float, n_resamples: int = BOOTSTRAP_RESAMPLES,
                 *, seed: int = 0) -> dict:
    """95% percentile intervals for every figure that has `draws`, resampling patients (with all their images).

    Images of one child are correlated; resampling images would make the intervals too narrow.
    """
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob)
    weights, codes = patient_resamples(patients, n_resamples, seed)
    r = Resampled(y_true, y_prob, y_true == 1, y_prob >= threshold, weights, codes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {f.key: [float(v) for v in interval95(f.draws(r))] for f in FIGURES if f.draws}


def expected_calibration_error(y_true, y_prob, n_bins: int = 10) -> float:
    """Mean gap between predicted probability and observed frequency over equal-width bins, weighted by count."""
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob)
    bins = np.minimum((y_prob * n_bins).astype(int), n_bins - 1)
    gaps = [abs(y_true[bins == b].mean() - y_prob[bins == b].mean()) * (bins == b).sum()
            for b in range(n_bins) if (bins == b).any()]
    return float(np.sum(gaps) / len(y_true))


def score(y_true, y_prob, patients, threshold: float, n_resamples: int = BOOTSTRAP_RESAMPLES, *, seed: int = 0) -> dict:
    """Every test figure: metrics, their intervals, average precision and calibration."""
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob)
    result = binary_metrics(y_true, y_prob, threshold)
    result["ci95"] = bootstrap_ci(y_true, y_prob, patients, threshold, n_resamples, seed=seed)
    result["bootstrap_resamples"] = n_resamples
    result["average_precision"] = float(average_precision_score(y_true, y_prob))
    result["brier"] = float(brier_score_loss(y_true, y_prob))
    result["ece"] = expected_calibration_error(y_true, y_prob)
    result["images"], result["patients"] = int(len(y_true)), int(len(set(patients)))
    return result



def bacterial_share(classes: np.ndarray) -> np.ndarray:
    """P(bacterial) / (P(bacterial) + P(viral)): the bacterial-vs-viral score of Kermany et al.'s protocol."""
    return classes[:, 1] / np.maximum(classes[:, 1] + classes[:, 2], 1e-12)


def has_both_causes(causes: np.ndarray) -> bool:
    """Whether the file names tell both bacterial and viral cases apart: only then is bacterial vs viral scored."""
    return bool((causes == 1).any() and (causes == 2).any())


def score_cause(causes: np.ndarray, classes: np.ndarray, patients, cause_threshold: float,
                n_resamples: int = BOOTSTRAP_RESAMPLES, *, seed: int = 0) -> dict:
    """The three-class figures: one-vs-rest and macro AUC with patient-bootstrap intervals, the 3x3 confusion
    matrix (argmax), and bacterial vs viral among the pneumonia cases (every `score` figure, bacterial positive).

    Images whose cause is unknown (-1) are left out.
    """
    known = causes >= 0
    causes, classes, patients = causes[known], classes[known], np.asarray(patients)[known]
    weights, codes = patient_resamples(patients, n_resamples, seed)
    draws = np.stack([auc_draws(causes == c, classes[:, c], weights, codes) for c in range(len(CAUSES))])
    aucs = [float(roc_auc_score(causes == c, classes[:, c])) for c in range(len(CAUSES))]

    pneumonia = causes > 0
    intervals = [[float(v) for v in interval95(d)] for d in (*draws, draws.mean(0))]
    return {
        "classes": [c.lower() for c in CAUSES],
        "one_vs_rest_auc": {c.lower(): {"auc": a, "ci95": ci} for c, a, ci in zip(CAUSES, aucs, intervals)},
        "macro_auc": {"auc": float(np.mean(aucs)), "ci95": intervals[-1]},
        "confusion": confusion_matrix(causes, classes.argmax(1), labels=[0, 1, 2]).tolist(),  # rows: true class
        "bacterial_vs_viral": score((causes[pneumonia] == 1).astype(int), bacterial_share(classes[pneumonia]),
                                    patients[pneumonia], cause_threshold, n_resamples, seed=seed),
    }


# ---------------------------------------------------------------- scoring a labelled set
@dataclass
class Scorer:
    """What scoring any set needs besides the set itself: the predictor, its decision thresholds and its
    out-of-distribution detector (None for checkpoints made before it existed)."""

    predictor: Predictor
    threshold: float  # chosen on validation; every set is scored at it
    cam_target: str = "pneumonia"
    seed: int = 0  # of the bootstrap and the randomisation test
    cause_threshold: float = 0.5  # three-class models: on bacterial_share, chosen on validation
    detector: ood.Detector | None = None
    probe: shortcut.Probe | None = None  # the layout probe, fitted on the training split (None: an older checkpoint)
    groups: str = SERIES_PATTERN  # --groups: the file-name rule of the shortcut audit's rates per group
    synthetic: bool = False  # trained with --demo on phantoms: its calls on real films mean nothing

    def assess(self, images, show: bool = False) -> tuple[np.ndarray, np.ndarray | None, torch.Tensor | None]:
        """predict, plus every member's penultimate features, which the detector reads (one forward pass)."""
        logits, features = self.predictor.logits_and_features(images, show)
        return (*probabilities(logits), features)


@dataclass
class Predictions:
    """One row per file of predictions.csv, the one schema of every command (docs/outputs.md).

    `y_true` is the folder label where it is known (-1 where not: predict); `prob` is NaN where the
    file was not scored, and `errors` says why. `flags` are the reasons an image is unlike the training
    films, `notes` what else the model cannot vouch for, `ood` the detector's distance.
    """

    paths: list[str]
    patients: list[str]
    y_true: np.ndarray
    prob: np.ndarray
    notes: list[list[str]]
    flags: list[list[str]]
    errors: list[str]
    ood: np.ndarray
    classes: np.ndarray | None = None  # a cause model's P(normal, bacterial, viral) per row

    def flagged(self) -> np.ndarray:
        return np.array([bool(f) for f in self.flags], dtype=bool)

    @classmethod
    def concat(cls, parts: list["Predictions"]) -> "Predictions":
        """The rows of `parts` (at least one), one after the other."""
        return cls([x for p in parts for x in p.paths], [x for p in parts for x in p.patients],
                   np.concatenate([p.y_true for p in parts]).astype(int), np.concatenate([p.prob for p in parts]),
                   [x for p in parts for x in p.notes], [x for p in parts for x in p.flags],
                   [x for p in parts for x in p.errors], np.concatenate([p.ood for p in parts]),
                   None if parts[0].classes is None else np.concatenate([p.classes for p in parts]))


PREDICTION_COLUMNS = ("path", "patient", "label", "probability", "predicted", "warnings", "error", "flagged",
                      "ood_score")


def call_of(prob: float, threshold: float) -> str:
    """The call at `threshold`; empty for a file that was not scored (NaN)."""
    return "" if prob != prob else CLASSES[int(prob >= threshold)]


def prediction_header(cause_model: bool) -> list[str]:
    """predictions.csv's columns; a cause model adds one probability column per class."""
    return [*PREDICTION_COLUMNS, *(CLASS_COLUMNS if cause_model else [])]


def prediction_rows(p: Predictions, threshold: float):
    """predictions.csv's rows: the truth (empty where unknown), P(pneumonia), the call at `threshold`, warnings
    (flags first), errors, whether the image is flagged and its out-of-distribution distance, then a cause model's
    class probabilities. Error analysis starts here."""
    def number(v, digits=6):
        return f"{v:.{digits}f}" if v == v else ""

    for i in range(len(p.paths)):
        extra = [number(v) for v in p.classes[i]] if p.classes is not None else []
        yield [p.paths[i], p.patients[i], CLASSES[p.y_true[i]] if p.y_true[i] >= 0 else "", number(p.prob[i]),
               call_of(p.prob[i], threshold), "; ".join(p.flags[i] + p.notes[i]),
               p.errors[i], "yes" if p.flags[i] else "", number(p.ood[i], 2), *extra]


def write_predictions(path: Path, p: Predictions, threshold: float) -> None:
    """predictions.csv, written at once (predict writes it as it goes: app/streaming.py)."""
    write_csv(path, prediction_header(p.classes is not None), prediction_rows(p, threshold))


def assess_labelled(predictor: Predictor, detector: "ood.Detector | None", ds: data.Dataset, idx: np.ndarray,
                    show: bool = False) -> Predictions:
    """Score and check the images `idx` of a decoded labelled set, CHUNK at a time: the penultimate features that
    the detector reads live for one chunk only, so memory does not grow with the set (whose images are mapped
    from the decode cache)."""
    parts = []
    bar = progress.track(len(idx), "scoring", "images", show)
    for start in range(0, len(idx), CHUNK):
        part = idx[start:start + CHUNK]
        logits, features = predictor.logits_and_features(TensorRows(ds.images.take(part)))
        prob, classes = probabilities(logits)
        parts.append(labelled_predictions(predictor, detector, ds, part, prob, classes=classes, features=features))
        bar.update(len(part))
    bar.close()
    return Predictions.concat(parts) if parts else \
        labelled_predictions(predictor, detector, ds, idx, np.zeros(0), classes=None, features=None)


def labelled_predictions(predictor: Predictor, detector: "ood.Detector | None", ds: data.Dataset, idx: np.ndarray,
                         y_prob: np.ndarray, *, classes: np.ndarray | None,
                         features: torch.Tensor | None) -> Predictions:
    """The Predictions of the images `idx` of a decoded labelled set, every input check included."""
    paths = [ds.paths[i] for i in idx]
    distance, notes, flags = ood.inspect(paths, ds.images.take(idx), features, predictor.prep, detector)
    return Predictions(paths, [ds.patients[i] for i in idx], ds.labels[idx].astype(int), y_prob, notes, flags,
                       [""] * len(paths), distance, classes)


def file_predictions(scorer: Scorer, files: list[str], decoded: tuple, scored: tuple,
                     skipped: list[tuple[str, str]]) -> Predictions:
    """predict's Predictions: every file given, scored or with the reason it was not, then every file skipped by the
    folder rules. `decoded`: Predictor.decode's images, errors and colours; `scored`: the readable files'
    probabilities, class probabilities and features."""
    images, errors, colours = decoded
    prob, classes, features = scored
    good = [i for i, e in enumerate(errors) if e is None]
    n = len(files) + len(skipped)
    distance, notes, flags = np.full(n, np.nan), [[] for _ in range(n)], [[] for _ in range(n)]
    if good:
        d, some_notes, some_flags = ood.inspect([files[i] for i in good], images[good], features,
                                                scorer.predictor.prep, scorer.detector, colours=colours[good])
        for k, i in enumerate(good):
            distance[i], notes[i], flags[i] = d[k], some_notes[k], some_flags[k]
    full_prob = np.full(n, np.nan)
    full_prob[good] = prob
    full_classes = None
    if scorer.predictor.outputs > 1:  # a cause model: its class columns, empty for a file not scored
        full_classes = np.full((n, scorer.predictor.outputs), np.nan)
        if classes is not None:
            full_classes[good] = classes
    readable = set(good)  # once: a set built per file made this quadratic (minutes at 100,000 files)
    patients = [data.patient_of(files[i]) if i in readable else "" for i in range(len(files))]
    return Predictions(files + [f for f, _ in skipped], patients + [""] * len(skipped),
                       np.full(n, -1), full_prob, notes, flags, [e or "" for e in errors] + [why for _, why in skipped],
                       distance, full_classes)


def flag_summary(p: Predictions) -> dict:
    """How many images the input checks flagged, by kind of reason (the words before any figure)."""
    kinds: dict[str, int] = {}
    for reasons in p.flags:
        for r in reasons:
            kinds[ood.kind_of(r)] = kinds.get(ood.kind_of(r), 0) + 1
    flagged = p.flagged()
    return {"flagged": int(flagged.sum()), "images": len(p.paths), "by_reason": kinds,
            "examples": [[p.paths[i], "; ".join(p.flags[i])] for i in np.flatnonzero(flagged)[:50]]}


def choose_thresholds(predictor: Predictor, detector: "ood.Detector | None", ds: data.Dataset, policy: str,
                      path: Path) -> tuple[float, float, float, dict]:
    """The decision threshold, chosen on the validation split by `policy`, and for a cause model the bacterial vs
    viral one (Youden's, among the pneumonias; else 0.5); the validation predictions go to `path` at them.

    Kept as predictions_val.csv, so another threshold policy can be checked later without retraining.
    Returns (threshold, cause threshold, validation AUC, the validation scores {"prob", "label"}), which best.pt
    keeps for calibrating to a site without labels.
    """
    _, labels, idx = ds.subset("val")
    rows = assess_labelled(predictor, detector, ds, idx)
    y_prob, classes = rows.prob, rows.classes
    threshold, cause_threshold = choose_threshold(labels.numpy().astype(int), y_prob, policy), 0.5
    causes = ds.causes[idx]
    if classes is not None and has_both_causes(causes):
        cause_threshold = choose_threshold(causes[causes > 0] == 1, bacterial_share(classes[causes > 0]), "youden")
    write_predictions(path, rows, threshold)
    scores = {"prob": [float(p) for p in y_prob], "label": [int(v) for v in labels.numpy()]}
    return threshold, cause_threshold, float(roc_auc_score(labels.numpy(), y_prob)), scores


def score_set(scorer: Scorer, ds: data.Dataset, idx: np.ndarray, out: Path, note: str = "",
              *, masks: np.ndarray | None = None, show: bool = True) -> tuple[dict, np.ndarray, np.ndarray]:
    """Predict, score with intervals, draw, explain and list per image the images `idx` of `ds`.

    Returns (the set's block of metrics.json, y_true, y_prob); writes predictions.csv and the plots into `out`.
    The block holds "rates" (the binary figures and intervals), "gradcam", "ood", "shortcut" and, for a cause
    model, "cause" and "cause_gradcam": every figure of one set in one place.
    """
    images = TensorRows(ds.images.take(idx))  # read batch by batch: a large test split is never held whole
    rows = assess_labelled(scorer.predictor, scorer.detector, ds, idx, show)
    y_prob, classes = rows.prob, rows.classes
    y_true = ds.labels[idx].astype(int)
    patients = [ds.patients[i] for i in idx]
    write_predictions(out / "predictions.csv", rows, scorer.threshold)
    metrics = score(y_true, y_prob, patients, scorer.threshold, seed=scorer.seed)
    draw_all(y_true, y_prob, metrics, out, note)
    draw_flagged(rows, images, scorer.predictor.prep, out / "ood_flagged.png", note)
    result = {"rates": metrics, "gradcam": gradcam.explain(scorer, images, y_true, y_prob, out, note=note,
                                                                       masks=masks, show=show),
              "ood": {**flag_summary(rows), "detector": scorer.detector is not None},
              "shortcut": audit_shortcut(scorer, images, y_true, y_prob, [ds.paths[i] for i in idx], out=out,
                                         note=note)}
    causes = ds.causes[idx]
    if classes is not None and has_both_causes(causes):
        result["cause"] = score_cause(causes, classes, patients, scorer.cause_threshold, seed=scorer.seed)
        draw_cause(causes, classes, result["cause"], out, note)
        result["cause_gradcam"] = gradcam.explain_causes(scorer, images, causes, classes, out, note=note)
    return result, y_true, y_prob


def audit_shortcut(scorer: Scorer, images, y_true: np.ndarray, y_prob: np.ndarray, paths: list[str], *, out: Path,
                   note: str = "") -> dict:
    """The set's shortcut block (shortcut.audit), and the Grad-CAM maps of the healthy children the model calls
    pneumonia and the layout probe does too (gradcam_shortcut.png), when there are any."""
    layout = scorer.probe.score(images) if scorer.probe is not None else None
    block = shortcut.audit(y_true, y_prob, scorer.threshold, layout, shortcut.groups_of(paths, scorer.groups),
                           ratios=shortcut.aspect_ratios(paths))
    if layout is not None:
        picks = np.flatnonzero((y_true == 0) & (y_prob >= scorer.threshold) & (layout >= 0.5))
        picks = picks[np.argsort(-y_prob[picks])][:8]  # the most confident first
        block["gradcam_false_positives"] = [Path(paths[i]).name for i in picks]
        if len(picks):
            gradcam.save_picked(scorer, images[torch.as_tensor(picks)], [
                f"{Path(paths[i]).name[:24]} p={y_prob[i]:.2f} probe={layout[i]:.2f}" for i in picks],
                out / "gradcam_shortcut.png", "false positives the layout probe also calls pneumonia" + note)
    return block


def score_externals(scorer: Scorer, folders: list[str], cache: ImageCache, out_root: Path,
                    show: bool = True) -> dict[str, tuple[dict, np.ndarray, np.ndarray]]:
    """Score each labelled folder like the test split, into out_root/external/<folder name>/."""
    results = {}
    for folder in folders:
        name = Path(folder.rstrip("/\\")).name or "external"
        while name in results:
            name += "+"
        out = out_root / "external" / name
        out.mkdir(parents=True)
        ds = data.decode_found(data.find_labelled(folder), cache, progress=show)
        data.write_split_files(out, ds)
        results[name] = score_set(scorer, ds, np.arange(len(ds.paths)), out, note=f", external: {name}", show=show)
    return results


def collect_sets(test: tuple[dict, np.ndarray, np.ndarray], externals: dict, roc_path: Path) -> dict:
    """metrics.json's "sets": the test split's block, then one per external folder (each with the folder its files
    are in), and one ROC plot of every set."""
    sets = {"test split": {"kind": "test", "folder": ".", **test[0]}}  # first: the renderers' primary set
    sets.update({name: {"kind": "external", "folder": f"external/{name}", **r[0]} for name, r in externals.items()})
    if externals:
        curves = {"test split": test[1:], **{name: r[1:] for name, r in externals.items()}}
        plot_roc_sets({name: (*curves[name], sets[name]["rates"]) for name in sets}, roc_path)
    return {"schema": runs.METRICS_SCHEMA, "sets": sets}


# ---------------------------------------------------------------- plots

def _save(fig, path) -> None:
    gradcam.write_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_roc(y_true, y_prob, m: dict, path, note: str = "") -> None:
    """ROC curve with AUC, its interval and the operating point."""
    fig, ax = plt.subplots(figsize=(5, 5))
    lo, hi = m["ci95"]["auc"]
    disp = RocCurveDisplay.from_predictions(y_true, y_prob, ax=ax)
    disp.line_.set_label(f"CNN: AUC {m['auc']:.3f} (95% CI {lo:.3f}-{hi:.3f})")  # replaces sklearn's 2-digit label
    ax.plot(1 - m["specificity"], m["sensitivity"], "o", color="crimson", ms=8,
            label=f"threshold {m['threshold']:.3f}: sens {m['sensitivity']:.3f}, spec {m['specificity']:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_title(f"ROC{note}")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def plot_confusion(m: dict, path, note: str = "") -> None:
    """Confusion matrix with counts and, per true class, the rate."""
    cm = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
    fig, ax = plt.subplots(figsize=(5, 4.4))
    disp = ConfusionMatrixDisplay(cm, display_labels=list(CLASSES)).plot(ax=ax, colorbar=False, cmap="Blues")
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    for (i, j), text in np.ndenumerate(disp.text_):
        text.set_text(f"{cm[i, j]}\n({rates[i, j]:.1%} of true)")
    ax.set_title(f"Confusion matrix at threshold {m['threshold']:.3f}{note}", fontsize=9)
    _save(fig, path)


def plot_pr(y_true, y_prob, m: dict, path, note: str = "") -> None:
    """Precision-recall curve with average precision."""
    fig, ax = plt.subplots(figsize=(5, 5))
    disp = PrecisionRecallDisplay.from_predictions(y_true, y_prob, ax=ax)
    disp.line_.set_label(f"CNN: average precision {m['average_precision']:.3f}")
    ax.plot(m["sensitivity"], m["ppv"], "o", color="crimson", label="operating point")
    ax.set_title(f"Precision-recall{note}")
    ax.legend(loc="lower left", fontsize=8)
    _save(fig, path)


def plot_calibration(y_true, y_prob, m: dict, path, note: str = "") -> None:
    """Reliability diagram with the Brier score and expected calibration error."""
    fig, ax = plt.subplots(figsize=(5, 5))
    CalibrationDisplay.from_predictions(y_true, y_prob, n_bins=10, ax=ax,
                                        name=f"CNN (Brier {m['brier']:.3f}, ECE {m['ece']:.3f})")
    ax.set_title(f"Calibration{note}")
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


def plot_history(history: list[dict], path) -> None:
    """Training and validation loss, and validation AUC, per epoch (a line per ensemble member), kept epochs marked."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for member in sorted({h.get("member", 0) for h in history}):
        rows = [h for h in history if h.get("member", 0) == member]
        name = f"member {member + 1}: " if member or len(history) > len(rows) else ""
        epochs = [h["epoch"] for h in rows]
        line, = ax1.plot(epochs, [h["loss"] for h in rows], "o-", ms=3, label=f"{name}train loss")
        ax1.plot(epochs, [h["val_loss"] for h in rows], "s--", ms=3, color=line.get_color(),
                 label=f"{name}validation loss")
        ax2.plot(epochs, [h["val_auc"] for h in rows], "o-", ms=3, color=line.get_color(),
                 label=f"{name}validation AUC")
        kept = [h["epoch"] for h in rows if h.get("kept")]
        ax2.plot(kept, [h["val_auc"] for h in rows if h.get("kept")], "*", ms=11, color=line.get_color())
    ax2.plot([], [], "*", ms=11, color="grey", label="kept weights")
    for ax in (ax1, ax2):
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_roc_sets(curves: dict[str, tuple], path) -> None:
    """ROC curves of several sets (name -> (y_true, y_prob, metrics)) on one plot, with operating points."""
    fig, ax = plt.subplots(figsize=(5.6, 5.6))
    for name, (y_true, y_prob, m) in curves.items():
        fpr, tpr, _ = roc_curve(y_true, y_prob)
        lo, hi = m["ci95"]["auc"]
        line, = ax.plot(fpr, tpr, label=f"{name}: AUC {m['auc']:.3f} ({lo:.3f}-{hi:.3f})")
        ax.plot(1 - m["specificity"], m["sensitivity"], "o", color=line.get_color(), ms=7)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC: test split and external sets\n(dots: the validation-chosen threshold)", fontsize=10)
    ax.legend(loc="lower right", fontsize=7)
    _save(fig, path)


def draw_cause(causes: np.ndarray, classes: np.ndarray, cause: dict, out_dir: Path, note: str = "") -> None:
    """confusion_cause.png (3x3), roc_cause.png (one vs rest) and roc_bacterial_viral.png (among pneumonias)."""
    known = causes >= 0
    causes, classes = causes[known], classes[known]
    cm = np.array(cause["confusion"])
    fig, ax = plt.subplots(figsize=(5.4, 4.8))
    ConfusionMatrixDisplay(cm, display_labels=list(CAUSES)).plot(ax=ax, colorbar=False, cmap="Blues")
    ax.set_title(f"Three classes, most probable class{note}", fontsize=9)
    _save(fig, out_dir / "confusion_cause.png")
    fig, ax = plt.subplots(figsize=(5.4, 5.4))
    for c, name in enumerate(CAUSES):
        fpr, tpr, _ = roc_curve(causes == c, classes[:, c])
        a = cause["one_vs_rest_auc"][name.lower()]
        ax.plot(fpr, tpr, label=f"{name} vs rest: AUC {a['auc']:.3f} ({a['ci95'][0]:.3f}-{a['ci95'][1]:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"One-vs-rest ROC, macro AUC {cause['macro_auc']['auc']:.3f}{note}", fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    _save(fig, out_dir / "roc_cause.png")
    pneumonia = causes > 0
    plot_roc((causes[pneumonia] == 1).astype(int), bacterial_share(classes[pneumonia]), cause["bacterial_vs_viral"],
             out_dir / "roc_bacterial_viral.png", note + ", bacterial vs viral among pneumonias")


def spread(rows: np.ndarray, most: int) -> np.ndarray:
    """At most `most` of `rows`, evenly spaced from the first to the last: a sample of an archive's flagged files
    that does not stop at its first folder."""
    return rows[np.unique(np.linspace(0, len(rows) - 1, min(most, len(rows))).round().astype(int))] if len(rows) \
        else rows


def draw_flagged(p: Predictions, images, prep, path: Path, note: str = "", *, most: int = 16) -> None:
    """Thumbnails of flagged images (all, or `most` spread over them) with their reasons (ood_flagged.png); nothing
    when none is flagged. `images[rows]`: those rows' images (read again by predict, which keeps none)."""
    picks = spread(np.flatnonzero(p.flagged()), most)
    if not len(picks):
        return
    shown = prep.crop(images[picks]).numpy()[:, 0]
    columns = min(4, len(picks))
    rows = -(-len(picks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(max(2.6 * columns, 5.2), 3.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, i, image in zip(axes.flat, picks, shown):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{Path(p.paths[i]).name}\n{p.flags[i][0]}", fontsize=6)  # wrapped to fit, never cut
    fig.suptitle(f"Flagged as unlike the training films ({p.flagged().sum()} of {len(p.paths)}){note}", fontsize=9)
    _save(fig, path)


def draw_all(y_true, y_prob, m: dict, out_dir, note: str = "") -> list[str]:
    """Write roc.png, confusion_matrix.png, pr.png and calibration.png; return their names."""
    plot_roc(y_true, y_prob, m, out_dir / "roc.png", note)
    plot_confusion(m, out_dir / "confusion_matrix.png", note)
    plot_pr(y_true, y_prob, m, out_dir / "pr.png", note)
    plot_calibration(y_true, y_prob, m, out_dir / "calibration.png", note)
    return ["roc.png", "confusion_matrix.png", "pr.png", "calibration.png"]
