"""Calibrate a trained model to a new site: its threshold chosen on the site's own labelled sample, and optionally
its BatchNorm statistics re-estimated on the site's images (AdaBN), with an honest estimate of what to expect.

Usage: `python main.py calibrate --checkpoint runs/X/best.pt --data SITE_DIR [--adapt-bn [DIR ...]]`.
The expected sensitivity and specificity come from out-of-bag bootstrap: the threshold is chosen on each
resample of the site's patients and scored on the patients left out, so the intervals carry the
threshold's own uncertainty as well as the sample's.
"""
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import data
import evaluate
import runs
from cache import ImageCache, load_images
from infer import Predictor, reestimate_batchnorm

SMALL_SAMPLE = 50  # images per class: below this a promised sensitivity rests on too few pneumonias
RESAMPLES = 500
BN_BATCH = 32  # images per batch when re-estimating BatchNorm statistics: training's batch size


class CalibrationError(ValueError):
    """A site sample that cannot calibrate anything; the message says why, in one sentence."""


def site_sample(folder: str, store: ImageCache, show: bool = True) -> data.Dataset:
    """The site's labelled images (NORMAL/ and PNEUMONIA/ at any depth, the training rules); none, or one class
    only, is refused in one sentence (data.DataError), and a small sample warns."""
    try:
        ds = data.decode_found(data.find_labelled(folder), store, progress=show)
    except data.NoImagesFound:
        raise CalibrationError(f"no images in NORMAL/ or PNEUMONIA/ folders under '{folder}': calibration needs a "
                               f"labelled sample of the site's films") from None
    counts = np.bincount(ds.labels.astype(int), minlength=2)
    if counts.min() < SMALL_SAMPLE:
        warnings.warn(f"the site sample has {counts[0]} NORMAL and {counts[1]} PNEUMONIA images; under {SMALL_SAMPLE} "
                      f"per class the promised sensitivity and specificity are loose (see their intervals)",
                      stacklevel=2)
    return ds


def unlabelled_images(folders: list[str], size: int, show: bool = True) -> np.ndarray:
    """The readable images of unlabelled folders (predict's file rules), for AdaBN only."""
    files, _ = data.list_files(folders)
    images, errors = load_images(files, size, ImageCache(None, size), show=show)
    return images[[e is None for e in errors]]


def adapt_batchnorm(predictor: Predictor, images: np.ndarray, every_layer: bool = False) -> None:
    """AdaBN: every member's BatchNorm statistics in the blocks it names `adaptable` (or in every layer) re-estimated
    on the site's images, as the model sees them (the plain centre view, no augmentation), a training-sized batch at
    a time; labels unused.

    Only the early blocks by default: from a 20%-pneumonia sample, adapting every layer cost a third of the
    specificity, adapting the early ones cost little (benchmarks/site_calibration.py)."""
    batches = [torch.from_numpy(images[i:i + BN_BATCH]).unsqueeze(1) for i in range(0, len(images), BN_BATCH)]
    for member in predictor.members:
        within = None if every_layer else [getattr(member, name) for name in member.adaptable]
        reestimate_batchnorm(member, (predictor.model_input(b) for b in batches if len(b) > 1), within)
        member.eval()


def expected_rates(y_true, y_prob, patients, policy: str, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """What the site should expect at a threshold chosen by `policy` on a sample like this one.

    For each bootstrap resample of the patients the threshold is chosen on the resample and applied to
    the patients it left out; the mean over resamples is the estimate and the 2.5th-97.5th percentiles
    the interval. Resamples whose in-bag or left-out part lacks a class are skipped.
    """
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob)
    weights, codes = evaluate.patient_resamples(patients, resamples, seed)
    draws = []
    for w in weights:
        counts = w[codes]
        inbag, out = np.repeat(np.arange(len(y_true)), counts), counts == 0
        if len(np.unique(y_true[inbag])) < 2 or len(np.unique(y_true[out])) < 2:
            continue
        threshold = evaluate.choose_threshold(y_true[inbag], y_prob[inbag], policy)
        m = evaluate.binary_metrics(y_true[out], y_prob[out], threshold)
        draws.append([m["sensitivity"], m["specificity"], m["accuracy"], threshold])
    draws = np.array(draws)
    lo, hi = evaluate.interval95(draws)
    names = ("sensitivity", "specificity", "accuracy", "threshold")
    return {**{k: float(v) for k, v in zip(names, draws.mean(0))},
            "ci95": {k: [float(a), float(b)] for k, a, b in zip(names, lo, hi)}, "resamples": int(len(draws)),
            "method": "out-of-bag bootstrap of patients: threshold chosen in-bag, scored on the patients left out"}


def shortfall(policy: str, expected: dict) -> str | None:
    """A sentence when `sens=X` is expected to give the site's new films less than X: the threshold is the strictest
    that reaches X on this sample, so new films fall short about half the time; a higher target buys a margin."""
    if not policy.startswith("sens="):
        return None
    asked, got = float(policy[5:]), expected["sensitivity"]
    if got >= asked:
        return None
    return (f"expected sensitivity on new films {got:.3f} is below the {asked:.2f} asked for (the threshold is the "
            f"strictest reaching {asked:.2f} on this sample); for a margin, calibrate with a higher target, for "
            f"example --threshold sens={min(1.0, asked + 0.02):.2f}, and read its expected column")


def site_thresholds(predictor: Predictor, ds: data.Dataset, policy: str) -> tuple[float, float | None, np.ndarray]:
    """The threshold `policy` chooses on the whole site sample, the bacterial-vs-viral threshold of a cause model
    (Youden, where the file names tell both causes), and the site's P(pneumonia)."""
    prob, classes = predictor.predict(torch.from_numpy(np.asarray(ds.images)).unsqueeze(1))
    threshold = evaluate.choose_threshold(ds.labels.astype(int), prob, policy)
    cause = None
    if classes is not None and evaluate.has_both_causes(ds.causes):
        pneumonia = ds.causes > 0
        share = evaluate.bacterial_share(classes[pneumonia])
        cause = evaluate.choose_threshold(ds.causes[pneumonia] == 1, share, "youden")
    return threshold, cause, prob


@dataclass
class Site:
    """A site calibration: the figures before and after, the adapted predictor and its thresholds."""

    metrics: dict  # metrics.json: before, after, expected, and the calibration block
    predictor: Predictor
    threshold: float
    cause_threshold: float | None
    prob: np.ndarray  # P(pneumonia) of the site's images, after


def fit_site(args, ckpt: dict, ds: data.Dataset, load: Callable[[], Predictor], warning: str | None) -> Site:
    """The figures before, the site-adapted predictor (AdaBN with --adapt-bn), its thresholds and the figures after,
    with the expected rates. `args` are calibrate's flags; `load` gives a fresh predictor of the checkpoint."""
    images, y, patients = np.asarray(ds.images), ds.labels.astype(int), ds.patients
    before = evaluate.score(y, load().predict(torch.from_numpy(images).unsqueeze(1))[0], patients, ckpt["threshold"],
                            seed=args.seed)
    policy = args.threshold or ckpt.get("threshold_policy", "sens=0.95")
    predictor = load()
    adapt_images = images
    if args.adapt_bn is not None:
        extra = unlabelled_images(args.adapt_bn, images.shape[-1], show=not args.quiet) if args.adapt_bn else images[:0]
        adapt_images = np.concatenate([images, extra])
        adapt_batchnorm(predictor, adapt_images)
    threshold, cause_threshold, prob = site_thresholds(predictor, ds, policy)
    expected = expected_rates(y, prob, patients, policy, seed=args.seed)
    metrics = {"before": before, "after": evaluate.score(y, prob, patients, threshold, seed=args.seed),
               "expected": expected,
               "calibration": {"source": {"path": str(args.checkpoint), "sha256": runs.file_sha256(args.checkpoint)},
                               "site": {"folder": args.data, "images": len(y), "patients": len(set(patients)),
                                        "normal": int((y == 0).sum()), "pneumonia": int((y == 1).sum())},
                               "unlabelled": list(args.adapt_bn or []), "adapt_bn": args.adapt_bn is not None,
                               "adapt_bn_images": int(len(adapt_images)) if args.adapt_bn is not None else 0,
                               "policy": policy, "warning": warning, "shortfall": shortfall(policy, expected)}}
    return Site(metrics=metrics, predictor=predictor, threshold=threshold, cause_threshold=cause_threshold, prob=prob)
