"""Knowing when an input is not a frontal pediatric chest film: out-of-distribution checks in front of the model
and on what it sees.

Usage: `detector = ood.fit(predictor, train_images, train_labels, val_images)` at training time (stored in
best.pt as `detector.state()`); `ood.Detector.from_state(ckpt["ood"]).check(images, features)` when scoring.

- Model-free checks on the decoded image: near-constant images, and contrast, histogram entropy and
  edge density outside the range of every training film (widened by a margin). A colour check on the
  file itself lives in images.py (`colourfulness`), since the decoded image is already grey.
- The Mahalanobis distance of the model's penultimate features (block3 pooled) to the training films'
  class means under a shared, shrunk covariance (Lee et al. 2018; Ledoit-Wolf shrinkage); for an
  ensemble, the mean of the members' distances. Its threshold flags 0.5% of the validation films.
- Orientation: a logistic regression on 16 x 16 thumbnails, fitted on training films turned by 0, 90,
  180 and 270 degrees and mirrored (the rotation is a free label), flags a film that looks turned.
Flagged images are still scored; the user decides (`predict --strict` leaves them out).
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from sklearn.linear_model import LogisticRegression

from lib.images import COLOUR_MODES, colourfulness, describe, input_checks
from lib.infer import Predictor

# the distance threshold flags this share of the validation films: half of the 1% a user would tolerate, since the
# orientation and image checks add their own false alarms
VALIDATION_FALSE_ALARMS = 0.005
STAT_NAMES = ("contrast", "entropy", "edges")
STAT_MARGIN = 0.25  # of each statistic's training range, added on both sides before an image is flagged
NEAR_CONSTANT = 0.02  # contrast (grey-level sd in [0, 1] units) below which an image is blank
ORIENTATION_SAMPLE = 600  # training films turned four ways, and mirrored, to fit the orientation check
ORIENTATION_FALSE_ALARMS = 0.005  # the orientation check flags this share of the upright validation films
TURNED = {1: "on its side?", 2: "upside down?", 3: "on its side?"}
# the kinds of flag, as each reason starts (counted in metrics.json and the terminal)
KINDS = ("colour picture", "blank or near-constant image", "contrast", "entropy", "edges",
         "not like the training films",
         "upside down", "on its side", "not a frontal view", "not a chest image", "mean grey level")


def image_statistics(images: np.ndarray) -> np.ndarray:
    """Per uint8 image (N x S x S, every second pixel read): contrast (sd), entropy of a 32-bin histogram (bits) and
    edge density (mean absolute difference of neighbouring pixels), all on [0, 1] grey levels."""
    grey = np.asarray(images)[:, ::2, ::2]
    x = grey.astype(np.float32) / 255.0
    flat = x.reshape(len(x), -1)
    bins = (grey.reshape(len(x), -1) >> 3).astype(np.int32) + 32 * np.arange(len(x), dtype=np.int32)[:, None]
    counts = np.bincount(bins.ravel(), minlength=32 * len(x)).reshape(len(x), 32) / flat.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(counts > 0, counts * np.log2(counts), 0.0), 1)
    edges = (np.abs(np.diff(x, axis=1)).mean((1, 2)) + np.abs(np.diff(x, axis=2)).mean((1, 2))) / 2
    return np.stack([flat.std(1), entropy, edges], 1)


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray) -> dict:
    """Class means and the precision matrix of the shared within-class covariance, shrunk (Ledoit-Wolf)."""
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(0) for c in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    return {"means": means, "precision": precision}


def mahalanobis(features: np.ndarray, fitted: dict) -> np.ndarray:
    """Each row's distance to the nearest class mean."""
    diffs = features[:, None, :] - fitted["means"][None]
    squared = np.einsum("nkd,de,nke->nk", diffs, fitted["precision"], diffs)
    return np.sqrt(np.maximum(squared.min(1), 0.0))


@dataclass
class Detector:
    """What the checks need, in plain arrays: one Mahalanobis fit per member, the thresholds and ranges."""

    members: list[dict]  # per member: class means (C x D) and precision (D x D); none after calibrate --adapt-bn
    threshold: float  # of the mean distance
    stat_low: np.ndarray
    stat_high: np.ndarray
    orientation: dict  # coef (4 x 256 thumbnail pixels), intercept (4), and the probability of "turned" that flags
    validation_false_alarms: float  # the share of validation films the distance flags

    def distance(self, features: torch.Tensor) -> np.ndarray:
        """The mean over members of each image's Mahalanobis distance (features: K x N x D)."""
        return np.mean([mahalanobis(f.numpy().astype(np.float64), m) for f, m in zip(features, self.members)], 0)

    def turned(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The most likely quarter turn of each uint8 image (0: upright) and the probability that it is turned."""
        return turn_probabilities(thumbnails(images), self.orientation)

    def check(self, images: np.ndarray, features: torch.Tensor | None) -> tuple[np.ndarray, list[list[str]]]:
        """Per image its distance (NaN without features) and the reasons it is flagged, in words."""
        stats = image_statistics(images)
        turn, p_turned = self.turned(images)
        reasons: list[list[str]] = [[] for _ in range(len(images))]
        for i, row in enumerate(stats):
            if row[0] < NEAR_CONSTANT:
                reasons[i].append("blank or near-constant image")
                continue
            for name, v, lo, hi in zip(STAT_NAMES, row, self.stat_low, self.stat_high):
                if not lo <= v <= hi:
                    reasons[i].append(f"{name} {v:.2f} unlike the training films' [{lo:.2f}, {hi:.2f}]")
            if turn[i] and p_turned[i] > self.orientation["flag_above"]:
                reasons[i].append(TURNED[int(turn[i])])
        if features is None or not self.members:  # no features, or a site-adapted model (calibrate --adapt-bn)
            return np.full(len(images), np.nan), reasons
        distance = self.distance(features)
        for i in np.flatnonzero(distance > self.threshold):
            reasons[i].append(f"not like the training films: distance {distance[i]:.1f} > {self.threshold:.1f}")
        return distance, reasons

    def state(self) -> dict:
        """Plain types for best.pt (loaded with weights_only)."""
        return {"members": [{k: torch.from_numpy(v) for k, v in m.items()} for m in self.members],
                "threshold": float(self.threshold), "stat_low": self.stat_low.tolist(),
                "stat_high": self.stat_high.tolist(),
                "orientation": {"coef": torch.from_numpy(self.orientation["coef"]),
                                "intercept": torch.from_numpy(self.orientation["intercept"]),
                                "flag_above": float(self.orientation["flag_above"])},
                "validation_false_alarms": float(self.validation_false_alarms)}

    @classmethod
    def from_state(cls, state: dict) -> "Detector":
        """Rebuild from `state()`."""
        o = state["orientation"]
        return cls([{k: v.numpy() for k, v in m.items()} for m in state["members"]], state["threshold"],
                   np.array(state["stat_low"]), np.array(state["stat_high"]),
                   {"coef": o["coef"].numpy(), "intercept": o["intercept"].numpy(), "flag_above": o["flag_above"]},
                   state["validation_false_alarms"])


def turned_views(images: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """Every image turned by 0, 90, 180 and 270 degrees, each also mirrored left to right, with the number of
    quarter turns as its label: a mirrored film is still upright, and one flipped top to bottom is a mirrored
    film turned by 180 degrees."""
    both = torch.cat([images, torch.flip(images, dims=(-1,))])
    return torch.cat([torch.rot90(both, k, dims=(-2, -1)) for k in range(4)]), np.repeat(np.arange(4), len(both))


def thumbnails(images: np.ndarray, side: int = 16) -> np.ndarray:
    """Each uint8 image (N x S x S, every second pixel read) averaged down to side x side, flattened, on [0, 1]."""
    x = np.asarray(images)[:, ::2, ::2].astype(np.float32)
    n, s = len(x), x.shape[-1] // side * side
    return x[:, :s, :s].reshape(n, side, s // side, side, s // side).mean((2, 4)).reshape(n, -1) / 255.0


def turn_probabilities(thumbs: np.ndarray, orientation: dict) -> tuple[np.ndarray, np.ndarray]:
    """The orientation check's most likely quarter turn, and the probability of any turn, per thumbnail."""
    logits = thumbs.astype(np.float64) @ orientation["coef"].T + orientation["intercept"]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return p.argmax(1), 1.0 - p[:, 0]


def fit(predictor: Predictor, train_images, train_labels: np.ndarray, val_images, seed: int = 0) -> Detector:
    """Fit every check on the training split, and the distance's threshold on the validation split."""
    _, train_features = predictor.logits_and_features(train_images)
    members = [fit_mahalanobis(f.numpy().astype(np.float64), np.asarray(train_labels)) for f in train_features]
    stats = np.concatenate([image_statistics(chunk) for chunk in _chunks(train_images, 4096)])
    low, high = stats.min(0), stats.max(0)
    margin = STAT_MARGIN * (high - low)
    _, val_features = predictor.logits_and_features(val_images)
    detector = Detector(members, math.inf, low - margin, high + margin, {}, VALIDATION_FALSE_ALARMS)
    val_distance = detector.distance(val_features)
    detector.threshold = float(np.quantile(val_distance, 1 - VALIDATION_FALSE_ALARMS))
    detector.validation_false_alarms = float((val_distance > detector.threshold).mean())
    detector.orientation = fit_orientation(train_images, val_images, seed)
    return detector


def _chunks(images, n: int = 1024):
    """The N x 1 x S x S rows of a split as N x S x S uint8 arrays, n at a time: never the whole split in memory."""
    for start in range(0, len(images), n):
        yield np.asarray(images[start:start + n])[:, 0]


def fit_orientation(train_images, val_images, seed: int) -> dict:
    """A four-way logistic regression on thumbnails of turned (and mirrored) training films; it flags a film whose
    probability of being turned exceeds what ORIENTATION_FALSE_ALARMS of the upright validation films reach."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(train_images), min(ORIENTATION_SAMPLE, len(train_images)), replace=False))
    turned, labels = turned_views(torch.as_tensor(np.asarray(train_images[pick])))
    head = LogisticRegression(max_iter=3000).fit(thumbnails(turned.numpy()[:, 0]), labels)
    orientation = {"coef": head.coef_, "intercept": head.intercept_}
    p_turned = np.concatenate([turn_probabilities(thumbnails(chunk), orientation)[1] for chunk in _chunks(val_images)])
    orientation["flag_above"] = float(max(0.5, np.quantile(p_turned, 1 - ORIENTATION_FALSE_ALARMS)))
    return orientation


COLOUR_LIMIT = 0.05  # colourfulness above which a file is a colour picture; radiographs, even stored as RGB, are ~0


def kind_of(reason: str) -> str:
    """The kind of a flag's reason, for counting."""
    return next((k for k in KINDS if reason.startswith(k)), reason)


def file_colour(path: str, facts: dict) -> float:
    """The file's colourfulness (0 for a file stored grey, which its header says), 0 where it cannot be read (its
    decode error is reported instead)."""
    if facts.get("mode") not in COLOUR_MODES:
        return 0.0
    try:
        return colourfulness(path)
    except Exception:  # an unreadable or odd file: the decoder says why
        return 0.0


def inspect(paths: list[str], images, features: torch.Tensor | None, prep, detector: "Detector | None",
            *, colours: np.ndarray | None = None) -> tuple[np.ndarray, list[list[str]], list[list[str]]]:
    """Every check on decoded images (N x S x S uint8, read a chunk at a time) and their files: per image its
    distance (NaN without a detector), its notes, and its flags (the reasons it is unlike the training films).
    `colours`: each file's colourfulness, measured while decoding (NaN, or None: measured here)."""
    distance, notes, flags = np.full(len(paths), np.nan), [], []
    for start in range(0, len(paths), 1024):
        chunk = np.asarray(images[start:start + 1024])
        part = features[:, start:start + 1024] if features is not None else None
        if detector is not None:
            distance[start:start + len(chunk)], reasons = detector.check(chunk, part)
        else:
            reasons = [[] for _ in chunk]
        for i, image in enumerate(chunk):
            path = paths[start + i]
            facts = describe(path)
            note, flag = input_checks(path, image, prep, facts)
            known = colours[start + i] if colours is not None else np.nan
            colour = known if known == known else file_colour(path, facts)
            if colour > COLOUR_LIMIT:
                flag.insert(0, f"colour picture, not a radiograph (colourfulness {colour:.2f})")
            notes.append(note)
            flags.append(flag + reasons[i])
    return distance, notes, flags
