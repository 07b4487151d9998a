"""Calibrate a trained model to a new site: its threshold chosen on the site's own labelled sample, and optionally
its BatchNorm statistics re-estimated on the site's images (AdaBN), with an honest estimate of what to expect.

Usage: `python main.py calibrate --checkpoint runs/X/best.pt --data SITE_DIR [--adapt-bn [DIR ...]]`.
The expected sensitivity and specificity come from out-of-bag bootstrap: the threshold is chosen on each
resample of the site's patients and scored on the patients left out, so the intervals carry the
threshold's own uncertainty as well as the sample's.

Without labels (`--unlabelled DIR ...`) the threshold comes from the distribution of the model's scores on the
site's films: see ValidationShapes and docs/calibration.md. Only the films' pixels are read there.
"""
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import data
import evaluate
from lib import runs
from lib.cache import ImageCache, file_hash, load_images
from lib.infer import Predictor, reestimate_batchnorm

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


def adapt_to_site(predictor: Predictor, images: np.ndarray, args) -> int:
    """With --adapt-bn, AdaBN on the site's `images` plus the unlabelled folders the flag names; returns how many
    images the statistics came from (0 without the flag)."""
    if args.adapt_bn is None:
        return 0
    extra = unlabelled_images(args.adapt_bn, images.shape[-1], show=not args.quiet) if args.adapt_bn else images[:0]
    adapt_batchnorm(predictor, np.concatenate([images, extra]))
    return len(images) + len(extra)


def expected_rates(y_true, y_prob, patients, policy: str, resamples: int = RESAMPLES, *, seed: int = 0) -> dict:
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
    adapted = adapt_to_site(predictor, images, args)
    threshold, cause_threshold, prob = site_thresholds(predictor, ds, policy)
    expected = expected_rates(y, prob, patients, policy, seed=args.seed)
    metrics = {"before": before, "after": evaluate.score(y, prob, patients, threshold, seed=args.seed),
               "expected": expected,
               "calibration": {"source": {"path": str(args.checkpoint), "sha256": runs.file_sha256(args.checkpoint)},
                               "site": {"folder": args.data, "images": len(y), "patients": len(set(patients)),
                                        "normal": int((y == 0).sum()), "pneumonia": int((y == 1).sum())},
                               "unlabelled": list(args.adapt_bn or []), "adapt_bn": args.adapt_bn is not None,
                               "adapt_bn_images": adapted,
                               "policy": policy, "warning": warning, "shortfall": shortfall(policy, expected)}}
    return Site(metrics=metrics, predictor=predictor, threshold=threshold, cause_threshold=cause_threshold, prob=prob)


# ---------------------------------------------------------------- without labels: the site's score distribution
LOGIT_LIMIT = 9.0  # |logit| beyond this (P under 1.2e-4 or over 0.99988) is treated as censored: its exact value
# is rounding (predictions.csv keeps 6 decimals) and says nothing the threshold needs
MIN_FILMS = 50  # fewer films than this do not identify a two-class mixture
MIN_PER_CLASS = 15  # nor do fewer than this many films estimated in the rarer class
SITE_RESAMPLES = 200
GRID = np.linspace(-40.0, 40.0, 8001)  # validation logits' space, where the class densities are tabulated


def site_logits(prob) -> np.ndarray:
    """P(pneumonia) as a logit within +-LOGIT_LIMIT: the scale both distribution models work on."""
    p = np.clip(np.asarray(prob, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.clip(np.log(p) - np.log1p(-p), -LOGIT_LIMIT, LOGIT_LIMIT)


def upper_quantile(values, share: float) -> float:
    """The highest v with at least `share` of `values` >= v: where a sensitivity of `share` is kept."""
    ordered = np.sort(np.asarray(values))[::-1]
    return float(ordered[max(int(np.ceil(share * len(ordered))) - 1, 0)])


def mixing_weight(ratio, low: float = 1e-4, high: float = 1 - 1e-4) -> float:
    """The pneumonia share pi in [low, high] that maximises sum(log(pi r + 1 - pi)) for the films' likelihood
    ratios r = p(z | pneumonia) / p(z | normal).

    The sum is concave in pi, so its slope falls through zero once: Newton's steps inside a shrinking bracket
    find it in a few vectorised steps, where EM on the weight alone crawls (hundreds of steps when the classes
    overlap, which made the demo's calibration take a minute)."""
    d = np.minimum(np.asarray(ratio, np.float64), 1e300) - 1

    def slope(p):
        return float(np.sum(d / (1 + p * d)))

    if slope(low) <= 0:
        return low
    if slope(high) >= 0:
        return high
    p = 0.5
    for _ in range(100):
        g = d / (1 + p * d)
        s = float(g.sum())
        if s > 0:
            low = p
        else:
            high = p
        step = p + s / float((g * g).sum())  # Newton: the second derivative is -sum(g^2)
        new = step if low < step < high else (low + high) / 2
        if abs(new - p) < 1e-10:
            return new
        p = new
    return p


@dataclass
class Fit:
    """A two-class model of a site's logits: the pneumonia share, and the parameters of the class densities."""

    prevalence: float
    params: tuple


class ValidationShapes:
    """The site's logits as the validation split's, class by class, moved by one affine map z = a v + b that the
    site's films choose, mixed at the site's own prevalence (three parameters: prevalence, a, b).

    Why this model: a new site's films move the whole score scale (exposure, framing and processing act on
    every film), while the shape of each class's scores is the model's own, and the validation split measured it
    on hundreds of films of each class. Fitting the shapes' offset, not the shapes themselves, keeps the rarer
    class's few films from deciding where it lies. The threshold is the validation one carried through the map, so
    the target sensitivity is the validation's by construction."""

    name = "validation shapes"

    def __init__(self, val_logits, val_labels, target: float):
        val_logits, val_labels = np.asarray(val_logits, np.float64), np.asarray(val_labels).astype(int)
        self.classes = [val_logits[val_labels == k] for k in (0, 1)]
        self.target = target
        self.anchor = upper_quantile(self.classes[1], target)  # the validation threshold on the logit
        self.log_density, self.survival = [], []
        for v in self.classes:
            bandwidth = max(1.06 * v.std() * len(v) ** -0.2, 0.05)  # Silverman's rule
            density = np.zeros_like(GRID)
            for chunk in np.array_split(v, max(1, len(v) // 256)):  # grid x films in chunks: memory bounded
                density += np.exp(-0.5 * ((GRID[:, None] - chunk[None, :]) / bandwidth) ** 2).sum(1)
            density /= density.sum() * (GRID[1] - GRID[0])
            self.log_density.append(np.log(density + 1e-300))
            self.survival.append(1 - np.cumsum(density) * (GRID[1] - GRID[0]))

    def _class_likelihoods(self, z: np.ndarray, a: float, b: float) -> np.ndarray:
        """2 x N likelihood of each film under each class; a censored film gets its tail's probability."""
        v = (z - b) / a
        top, bottom = (LOGIT_LIMIT - b) / a, (-LOGIT_LIMIT - b) / a
        out = np.empty((2, len(z)))
        for k in (0, 1):
            out[k] = np.exp(np.interp(v, GRID, self.log_density[k], left=-700, right=-700)) / a
            out[k, z >= LOGIT_LIMIT] = np.interp(top, GRID, self.survival[k], left=1.0, right=0.0)
            out[k, z <= -LOGIT_LIMIT] = 1 - np.interp(bottom, GRID, self.survival[k], left=1.0, right=0.0)
        return np.maximum(out, 1e-300)

    def fit(self, z: np.ndarray, start: Fit | None = None) -> Fit:
        """Maximum likelihood over (prevalence, a, b): EM for the prevalence inside a search over the map."""
        from scipy.optimize import minimize

        def loss(x):
            a, b = np.exp(x[0]), x[1]
            lik = self._class_likelihoods(z, a, b)
            pi = mixing_weight(lik[1] / lik[0])
            return -np.log(pi * lik[1] + (1 - pi) * lik[0]).sum()

        starts = [np.array([np.log(start.params[0]), start.params[1]])] if start else \
            [np.array([0.0, b]) for b in (-2.0, 0.0, 2.0)]
        best = min((minimize(loss, x0, method="Nelder-Mead", options={"xatol": 1e-3, "fatol": 1e-4})
                    for x0 in starts), key=lambda r: r.fun)
        a, b = float(np.exp(best.x[0])), float(best.x[1])
        lik = self._class_likelihoods(z, a, b)
        return Fit(mixing_weight(lik[1] / lik[0]), (a, b))

    def threshold(self, fit: Fit) -> float:
        a, b = fit.params
        return a * self.anchor + b

    def rates(self, fit: Fit, t: float) -> tuple[float, float]:
        """Sensitivity and specificity the fitted model implies at the logit threshold `t`."""
        a, b = fit.params
        return float(np.mean(a * self.classes[1] + b >= t)), float(np.mean(a * self.classes[0] + b < t))


def distribution_refusal(n: int, prevalence: float) -> str | None:
    """Why a site's scores do not identify two classes (one sentence), or None."""
    advice = "label a sample of the site's films and run calibrate with --data instead"
    if n < MIN_FILMS:
        return f"{n} usable films are too few to tell two classes apart without labels (at least {MIN_FILMS}); {advice}"
    rare = min(prevalence, 1 - prevalence) * n
    if rare < MIN_PER_CLASS:
        which = "pneumonia" if prevalence < 0.5 else "normal"
        return (f"the films' scores hold about {rare:.0f} {which} films (estimated prevalence {prevalence:.2f}), too "
                f"few to place a threshold without labels (at least {MIN_PER_CLASS}); {advice}")
    return None


def unlabelled_threshold(z: np.ndarray, model, resamples: int = SITE_RESAMPLES, seed: int = 0) -> dict:
    """The site's threshold from its films' logits `z` alone under `model`, with what the model expects there.

    The expected sensitivity, specificity and prevalence carry 95% intervals from a bootstrap of the films: each
    resample is fitted again and its model scores the threshold chosen on all the films. A refusal is a dict with
    "refused" (one sentence) and the prevalence estimate."""
    z = np.sort(np.asarray(z, np.float64))  # the films' order (their names') must not change a resample
    fit = model.fit(z) if len(z) >= MIN_FILMS else Fit(float("nan"), ())
    refused = distribution_refusal(len(z), fit.prevalence)
    if refused:
        return {"refused": refused, "prevalence": fit.prevalence, "films": len(z), "model": model.name}
    t = model.threshold(fit)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        again = model.fit(z[rng.integers(0, len(z), len(z))], start=fit)
        draws.append([again.prevalence, *model.rates(again, t)])
    lo, hi = evaluate.interval95(np.array(draws))
    sens, spec = model.rates(fit, t)
    names = ("prevalence", "sensitivity", "specificity")
    return {"model": model.name, "films": len(z), "threshold": float(1 / (1 + np.exp(-t))), "threshold_logit": t,
            "prevalence": fit.prevalence, "sensitivity": sens, "specificity": spec,
            "ci95": {k: [float(a), float(b)] for k, a, b in zip(names, lo, hi)}, "resamples": resamples,
            "method": "bootstrap of the films: each resample refitted, scored at the threshold chosen on all"}


def short_hashes(hashes) -> list[str]:
    """The first 16 hex digits (64 bits) of content hashes: enough to recognise a film, at a fraction of the size."""
    return [h[:16] for h in hashes]


def validation_scores(ckpt: dict, checkpoint: str) -> tuple[np.ndarray, np.ndarray]:
    """The validation split's P(pneumonia) and labels: from best.pt, or, for a checkpoint made before it kept them,
    from the predictions_val.csv of its run folder."""
    if ckpt.get("validation"):
        return np.asarray(ckpt["validation"]["prob"]), np.asarray(ckpt["validation"]["label"])
    beside = Path(checkpoint).parent / "predictions_val.csv"
    if beside.exists():
        rows = [r for r in runs.read_csv(beside) if r["probability"]]
        return np.array([float(r["probability"]) for r in rows]), np.array([r["label"] == "PNEUMONIA" for r in rows],
                                                                            int)
    raise CalibrationError(f"'{checkpoint}' keeps no validation scores (it predates unlabelled calibration and its "
                           f"run's predictions_val.csv is not beside it): calibrate with a labelled sample (--data)")


@dataclass
class SiteFilms:
    """A site's unlabelled films as read for calibration: every file with its checks, and the films used."""

    rows: evaluate.Predictions  # every file found, scored at the source threshold, with its flags (predict's rows)
    images: np.ndarray  # the used films, decoded
    used: np.ndarray  # indices into rows of the films the threshold is fitted on
    left_out: dict[str, int]  # reason -> films


def site_films(folders: list[str], scorer: evaluate.Scorer, seen: list[str] | None, show: bool = True) -> SiteFilms:
    """The films below `folders` by predict's rules, their names and folders never read for anything but opening
    them. Left out and counted: films the model was trained or validated on (by content hash: their scores are
    the training's, not the site's), a second copy of a film, unreadable files and films flagged as unlike the
    training films (a threshold is no answer for them)."""
    files, skipped = data.list_files(folders)
    known, hashes, kept = set(seen or ()), set(), []
    left = {"training or validation films": 0, "repeated films": 0, "unreadable": 0, "unlike the training films": 0}
    for path in files:
        try:
            h = file_hash(path)
        except OSError:
            kept.append(path)  # the decoder says why it cannot be read
            continue
        if h[:16] in known:
            left["training or validation films"] += 1
        elif h in hashes:
            left["repeated films"] += 1
        else:
            hashes.add(h)
            kept.append(path)
    decoded = scorer.predictor.decode(kept, show=show)
    images, errors, _ = decoded
    good = [i for i, e in enumerate(errors) if e is None]
    scored = scorer.assess(torch.from_numpy(images[good]).unsqueeze(1), show=show) if good else \
        (np.zeros(0), None, None)
    rows = evaluate.file_predictions(scorer, kept, decoded, scored, skipped)
    used = np.array([i for i in good if not rows.flags[i]], dtype=int)
    left["unreadable"] = len(kept) - len(good)
    left["unlike the training films"] = len(good) - len(used)
    return SiteFilms(rows, images[used], used, left)


def sensitivity_target(policy: str) -> float:
    """The sensitivity a `sens=X` policy keeps; without labels no other policy has a meaning on the site."""
    if not policy.startswith("sens="):
        raise CalibrationError(f"without labels a threshold can only keep a sensitivity target, not '{policy}': pass "
                               f"--threshold sens=X, or calibrate with a labelled sample (--data)")
    return float(policy[5:])


def fit_unlabelled(args, ckpt: dict, films: SiteFilms, load: Callable[[], Predictor]) -> Site:
    """The site-adapted predictor (AdaBN with --adapt-bn, on the films used) and the threshold its scores of the
    site's films choose, with the figures the distribution model expects; refusals raise CalibrationError."""
    policy = args.threshold or ckpt.get("threshold_policy", "sens=0.95")
    val_prob, val_y = validation_scores(ckpt, args.checkpoint)
    model = ValidationShapes(site_logits(val_prob), val_y, sensitivity_target(policy))
    predictor = load()
    adapted = adapt_to_site(predictor, films.images, args)
    prob = predictor.predict(torch.from_numpy(films.images).unsqueeze(1))[0] if args.adapt_bn is not None else \
        films.rows.prob[films.used]  # the adapted model's scores, or the source's as site_films scored them
    found = unlabelled_threshold(site_logits(prob), model, seed=args.seed)
    if "refused" in found:
        raise CalibrationError(found["refused"])
    threshold = found["threshold"]
    calibration = {
        "kind": "unlabelled", "source": {"path": str(args.checkpoint), "sha256": runs.file_sha256(args.checkpoint)},
        "site": {"folders": list(args.unlabelled), "films": len(films.rows.paths), "used": len(films.used),
                 "left_out": films.left_out},
        "policy": policy, "adapt_bn": args.adapt_bn is not None, "adapt_bn_images": adapted,
        "unlabelled": list(args.adapt_bn or []), "threshold_before": float(ckpt["threshold"]),
        "called_pneumonia": {"before": float(np.mean(films.rows.prob[films.used] >= ckpt["threshold"])),
                             "after": float(np.mean(prob >= threshold))},
        "warning": None, "shortfall": None,
        # a cause model's bacterial-vs-viral threshold stays the source's: no score model here chooses it unlabelled
        "cause_threshold_kept": ckpt.get("cause_threshold") if ckpt.get("config", {}).get("task") == "cause" else None}
    return Site(metrics={"calibration": calibration, "expected": found}, predictor=predictor, threshold=threshold,
                cause_threshold=None, prob=prob)
