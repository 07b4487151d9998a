"""The shortcut audit: a probe that sees the film's layout but not the lungs' texture, and the rates per group.

Usage: `probe = fit_probe(train_images, labels, patients)` on the training split only (stored in best.pt);
`audit(y_true, y_prob, threshold, probe.score(images), groups_of(paths, pattern))` per scored set.
A logistic regression on 12x12 thumbnails of the stored film, each standardised by its own mean and sd, sees
the framing, collimation and markers; at that size it cannot see the texture of a pneumonia. When it tells
the classes apart, the training data carry the label in their layout, and a model may have learned that
instead (Zech et al. 2018; DeGrave et al. 2021). The audit says how much the model agrees with the probe, and
what the model's specificity is among the healthy children the probe calls pneumonia: who pays for it.
"""
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict

from lib.augment import LAYOUT_SIDE as SIDE  # thumbnail side: the layout survives, a pneumonia's texture does not

from lib.images import DICOM_SUFFIXES, age_in_years, describe, header

# DICOM header fields that make groups, and what the audit calls them
HEADER_GROUPS = {"manufacturer": "manufacturer", "station": "station", "view": "view", "sex": "sex"}
AGE_BANDS = ((0, 1, "under 1"), (1, 6, "1-5"), (6, 18, "6-17"), (18, 200, "18 or older"))


def thumbnails(images, chunk: int = 2048) -> np.ndarray:
    """N x SIDE*SIDE: each uint8 film (N x S x S or N x 1 x S x S, any indexable rows) averaged down to
    SIDE x SIDE and standardised by its own mean and sd; read a chunk at a time.

    Not ood.thumbnails: that one crops the film to a multiple of its side first (11 of 71 pixels at 12), which
    cuts off the right and bottom edges, the framing this probe is about."""
    parts = [np.zeros((0, SIDE * SIDE))]
    for start in range(0, len(images), chunk):
        batch = np.asarray(images[start:start + chunk])
        x = torch.from_numpy(batch.reshape(len(batch), 1, *batch.shape[-2:])).float()
        parts.append(F.adaptive_avg_pool2d(x, SIDE).flatten(1).double().numpy())
    small = np.concatenate(parts)
    return (small - small.mean(1, keepdims=True)) / np.maximum(small.std(1, keepdims=True), 1e-6)


@dataclass
class Probe:
    """The fitted layout probe: P(pneumonia) from a thumbnail alone."""

    coef: np.ndarray  # SIDE*SIDE weights
    intercept: float
    train_cv_auc: float  # 5-fold cross-validated AUC on the training split, folds by patient

    def score(self, images) -> np.ndarray:
        """P(pneumonia) by layout alone, per uint8 film."""
        return 1 / (1 + np.exp(-(thumbnails(images) @ self.coef + self.intercept)))

    def state(self) -> dict:
        """Plain types for best.pt (loaded with weights_only)."""
        return {"side": SIDE, "coef": torch.from_numpy(self.coef), "intercept": float(self.intercept),
                "train_cv_auc": float(self.train_cv_auc)}

    @classmethod
    def from_state(cls, state: dict) -> "Probe":
        """Rebuild from `state()`."""
        return cls(state["coef"].numpy(), state["intercept"], state["train_cv_auc"])


def out_of_fold(x: np.ndarray, y: np.ndarray, patients: list[str]) -> np.ndarray:
    """The probe head's probability of class 1 (pneumonia) for each row of `x`, from the folds (by patient) that
    left it out."""
    folds = min(5, len(set(patients)))
    with warnings.catch_warnings():  # a tiny demo split may leave a fold with one class
        warnings.simplefilter("ignore")
        return cross_val_predict(LogisticRegression(C=1.0, max_iter=5000), x, y, cv=GroupKFold(folds),
                                 groups=patients, method="predict_proba")[:, 1]


def fit_probe(images, labels: np.ndarray, patients: list[str]) -> Probe:
    """The probe, fitted on the training split's films (and nothing else), with its cross-validated AUC there."""
    x, y = thumbnails(images), np.asarray(labels).astype(int)
    cross = out_of_fold(x, y, patients)
    head = LogisticRegression(C=1.0, max_iter=5000).fit(x, y)
    return Probe(head.coef_[0].astype(np.float64), float(head.intercept_[0]), float(roc_auc_score(y, cross)))


def wilson(k: int, n: int) -> dict:
    """k of n as a rate with its Wilson 95% interval (None where n is 0)."""
    if n == 0:
        return {"rate": None, "ci95": [None, None], "k": 0, "n": 0}
    p, z = k / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"rate": p, "ci95": [float(centre - half), float(centre + half)], "k": int(k), "n": int(n)}


def age_band(text: str) -> str | None:
    """A PatientAge as one of AGE_BANDS, or None when the header has none."""
    years = age_in_years(text)
    return None if years is None else next(name for low, high, name in AGE_BANDS if low <= years < high)


def groups_of(paths: list[str], pattern: str) -> dict[str, list[str]]:
    """Each film's group under every grouping that applies: `series`, the first group of `pattern` matched on the
    file name ("other" where it does not match), and for DICOM files the header's manufacturer, station, view,
    sex and age band ("unknown" where a DICOM leaves a field empty). Groupings no film has are left out."""
    rule = re.compile(pattern)
    found = {"series": [(rule.match(Path(p).name) or [None, "other"])[1] or "other" for p in paths]}
    dicoms = [Path(p).suffix.lower() in DICOM_SUFFIXES for p in paths]
    if any(dicoms):
        facts = [header(p) if is_dicom else {} for p, is_dicom in zip(paths, dicoms)]
        for key, name in HEADER_GROUPS.items():
            found[name] = [(f.get(key) or "unknown") if d else "not DICOM" for f, d in zip(facts, dicoms)]
        found["age"] = [(age_band(f.get("age", "")) or "unknown") if d else "not DICOM" for f, d in zip(facts, dicoms)]
    return found


def group_rates(y_true: np.ndarray, called: np.ndarray, groups: dict[str, list[str]]) -> dict:
    """Per grouping and group: how many normals and pneumonias, and the specificity and sensitivity among them."""
    table = {}
    for grouping, values in groups.items():
        values = np.asarray(values)
        table[grouping] = {}
        for group in sorted(set(values)):
            g = values == group
            neg, pos = g & (y_true == 0), g & (y_true == 1)
            table[grouping][group] = {"specificity": wilson(int((~called & neg).sum()), int(neg.sum())),
                                      "sensitivity": wilson(int((called & pos).sum()), int(pos.sum()))}
    return table


def aspect_ratios(paths: list[str]) -> np.ndarray:
    """Width / height of each file's image, from its header alone; NaN where the header gives no size."""
    def ratio(path: str) -> float:
        try:
            facts = describe(path)
            return facts["width"] / facts["height"]
        except Exception:  # a file that decoded once but whose header reads no size now: left out, not a crash
            return float("nan")
    return np.array([ratio(p) for p in paths], dtype=float)


def aspect_audit(y_true: np.ndarray, ratios: np.ndarray) -> dict:
    """Whether the films' aspect ratio alone tells the classes apart: its AUC as a pneumonia score, and the median
    per class. Every film is resized to a square before the network sees it, so an aspect ratio that differs by
    class becomes a difference in the chest's proportions, a cue beside the lungs. `auc` is None where it cannot
    be told: one class only, or every film of the same aspect ratio (a re-encode squashed them, for example)."""
    known = np.isfinite(ratios)
    r, y = ratios[known], y_true[known]
    block = {"films": int(known.sum()),
             "median_normal": float(np.median(r[y == 0])) if (y == 0).any() else None,
             "median_pneumonia": float(np.median(r[y != 0])) if (y != 0).any() else None}
    varies = len(r) > 0 and np.ptp(r) > 1e-3
    block["auc"] = float(roc_auc_score(y != 0, r)) if varies and len(set(y != 0)) == 2 else None
    block["same_for_all"] = not varies
    return block


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Rank correlation, or None for fewer than 3 films or a constant score."""
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b)[0])


def audit(y_true, y_prob, threshold: float, layout: np.ndarray | None, groups: dict[str, list[str]],
          *, ratios: np.ndarray | None = None) -> dict:
    """One scored set's shortcut block: the probe's AUC, how the model's scores follow it among the normals and
    among the pneumonias, the model's specificity among the normals the probe calls pneumonia and among the
    rest, the rates per group, and what the films' aspect ratios (`ratios`, width / height per film) say.
    `layout` is the probe's score per film (None: the checkpoint has no probe)."""
    y_true, y_prob = np.asarray(y_true).astype(int), np.asarray(y_prob)
    called = y_prob >= threshold
    block = {"groups": group_rates(y_true, called, groups)}
    if ratios is not None:
        block["aspect"] = aspect_audit(y_true, np.asarray(ratios, dtype=float))
    if layout is None:
        return {"probe": False, **block}
    normal, flagged = y_true == 0, layout >= 0.5
    both = len(set(y_true)) == 2

    def specificity(among):
        return wilson(int((~called & normal & among).sum()), int((normal & among).sum()))
    return {"probe": True, "probe_auc": float(roc_auc_score(y_true, layout)) if both else None,
            "spearman_negatives": _spearman(y_prob[normal], layout[normal]),
            "spearman_positives": _spearman(y_prob[~normal], layout[~normal]),
            "specificity_probe_positive": specificity(flagged), "specificity_probe_negative": specificity(~flagged),
            **block}
