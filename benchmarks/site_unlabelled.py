"""Unlabelled site calibration judged on half A by the rule in docs/calibration.md ("The rule, fixed before half
A was scored"): the validation threshold against each model of the site's score distribution, cross-fit,
transductive and under prevalence stress, over the seeds of finished default runs; and, as a ceiling rather than a
method, the best threshold for sensitivity 0.97 chosen with half A's labels, with the healthy films still above it.

Usage: `python benchmarks/site_unlabelled.py RUN [RUN ...]` (e.g. the seedN/ folders of
`benchmarks/generalisation.py --seeds 5 --only default`); with `--cause`, runs of `--task cause`, whose
bacterial-vs-viral threshold is also fitted without labels ("A cause model without labels" in the docs).
Each run's validation scores come from its predictions_val.csv and half A's from its external/*/predictions.csv:
the model as trained scored them, so the methods see exactly what `calibrate --unlabelled` sees, the scores of the
films, and nothing re-runs the network. Half A's labels, causes and file names are read here only to split it by
child, to draw the stress samples, to score and to name the healthy films above the ceiling.
"""
import argparse
import statistics
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app import calibrate  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
from lib import runs  # noqa: E402
from generalisation import mean_sd, read_predictions  # noqa: E402  (beside this script)

PREVALENCES = (0.05, 0.10, 0.30, 0.60, 0.90)
DRAWS, DRAW_SIZE = 20, 100
TARGET = 0.95  # the default checkpoint's policy, sens=0.95
GOAL = 0.97  # the goal: specificity 0.97 at sensitivity 0.97
CAUSE_SHARES, CAUSE_DRAW = (0.20, 0.50, 0.80, 0.95), 60  # bacterial shares of the cause stress draws, and their size
NOT_MODELS = ("truth", "ceiling", "cause")  # the keys of a run's result that are not a threshold's rows
CAUSE_SLACK = 0.02  # a cause stress draw passes if its balanced accuracy is at most this far below the kept one's


class GaussianMixture:
    """The site's logits as two Gaussians (five parameters), the higher one pneumonia; the threshold keeps the
    target share of the higher component above it. The plain recipe: no knowledge of the model's own shapes."""

    name = "two Gaussians"  # the plain recipe, compared by the rule and not adopted (docs/calibration.md)

    def __init__(self, target: float):
        self.target = target

    def fit(self, z: np.ndarray, start: calibrate.Fit | None = None) -> calibrate.Fit:
        """Maximum likelihood by EM, from the lower and upper halves of the scores (or from `start`)."""
        if start is not None:
            pi, mu, sd = start.prevalence, np.array(start.params[:2]), np.array(start.params[2:])
        else:
            low = z <= np.median(z)
            pi, mu, sd = 0.5, np.array([z[low].mean(), z[~low].mean()]), np.full(2, z.std() / 2 + 1e-3)
        for _ in range(500):
            density = np.exp(-0.5 * ((z - mu[:, None]) / sd[:, None]) ** 2) / sd[:, None]
            weights = np.array([1 - pi, pi])[:, None] * density
            resp = weights / np.maximum(weights.sum(0), 1e-300)
            mass = resp.sum(1) + 1e-9
            new_mu = (resp * z).sum(1) / mass
            sd = np.sqrt((resp * (z - new_mu[:, None]) ** 2).sum(1) / mass + 1e-3)  # a floor, like sklearn's reg_covar
            new_pi = float(mass[1] / mass.sum())
            converged = abs(new_pi - pi) < 1e-7 and np.abs(new_mu - mu).max() < 1e-6
            pi, mu = new_pi, new_mu
            if converged:
                break
        order = np.argsort(mu)
        return calibrate.Fit(float([1 - pi, pi][order[1]]), (*mu[order], *sd[order]))

    def threshold(self, fit: calibrate.Fit) -> float:
        from scipy.stats import norm
        _, mu1, _, sd1 = fit.params
        return float(mu1 + sd1 * norm.ppf(1 - self.target))

    def rates(self, fit: calibrate.Fit, t: float) -> tuple[float, float]:
        from scipy.stats import norm
        mu0, mu1, sd0, sd1 = fit.params
        return float(norm.sf(t, mu1, sd1)), float(norm.cdf(t, mu0, sd0))


class ClassShapes(calibrate.ValidationShapes):
    """The validation shapes with a map of its own for each class (five parameters: prevalence, a0, b0, a1, b1),
    started from the shared map; the threshold is the validation one through the pneumonia class's map. Tried
    because half A's pneumonias sit further above its normals than one map allows; not adopted (docs)."""

    name = "class shapes"

    def _likelihoods(self, z: np.ndarray, maps) -> np.ndarray:
        return np.stack([self._class_likelihoods(z, a, b)[k] for k, (a, b) in enumerate(maps)])

    def fit(self, z: np.ndarray, start: calibrate.Fit | None = None) -> calibrate.Fit:
        from scipy.optimize import minimize

        def maps(x):
            return (np.exp(x[0]), x[1]), (np.exp(x[2]), x[3])

        def loss(x):
            lik = self._likelihoods(z, maps(x))
            pi = calibrate.mixing_weight(lik[1] / lik[0])
            return -np.log(pi * lik[1] + (1 - pi) * lik[0]).sum()

        a0, b0, a1, b1 = start.params if start else 2 * super().fit(z).params
        best = minimize(loss, np.array([np.log(a0), b0, np.log(a1), b1]), method="Nelder-Mead",
                        options={"xatol": 1e-3, "fatol": 1e-4, "maxiter": 2000})
        lik = self._likelihoods(z, maps(best.x))
        return calibrate.Fit(calibrate.mixing_weight(lik[1] / lik[0]), sum(maps(best.x), ()))

    def threshold(self, fit: calibrate.Fit) -> float:
        return fit.params[2] * self.anchor + fit.params[3]

    def rates(self, fit: calibrate.Fit, t: float) -> tuple[float, float]:
        a0, b0, a1, b1 = fit.params
        return float(np.mean(a1 * self.classes[1] + b1 >= t)), float(np.mean(a0 * self.classes[0] + b0 < t))


class SiteWeighted(calibrate.ValidationShapes):
    """The validation shapes' threshold, with its expected rates read from the site's own films, each weighted by
    the fitted mixture's P(pneumonia | z), not from the validation films: tried for the promise's coverage; not
    adopted (docs)."""

    name = "shapes, site-weighted rates"

    def fit(self, z: np.ndarray, start: calibrate.Fit | None = None) -> calibrate.Fit:
        fit = super().fit(z, start)
        fit.z = z  # the films it was fitted to, which its rates read
        return fit

    def rates(self, fit: calibrate.Fit, t: float) -> tuple[float, float]:
        lik = self._class_likelihoods(fit.z, *fit.params)
        weight = fit.prevalence * lik[1] / (fit.prevalence * lik[1] + (1 - fit.prevalence) * lik[0])
        above = fit.z >= t
        return float((weight * above).sum() / weight.sum()), float(((1 - weight) * ~above).sum() / (1 - weight).sum())


class CauseShapes(calibrate.ValidationShapes):
    """The validation shapes on the bacterial-vs-viral logit, log P(bacterial)/P(viral): the validation split's
    bacterial and viral cases moved by one map, mixed at the site's bacterial share; the threshold is the validation
    Youden threshold carried through the map, which is Youden's on the fitted site distribution (an increasing map
    of both classes leaves sensitivity + specificity unchanged)."""

    name = "cause shapes"

    def __init__(self, val_share, val_bacterial):
        super().__init__(calibrate.site_logits(val_share), val_bacterial, target=0.5)
        self.anchor = float(calibrate.site_logits([evaluate.choose_threshold(val_bacterial, val_share, "youden")])[0])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", help="finished default runs scored with --external half A")
    p.add_argument("--draws", type=int, default=DRAWS, help="stress draws per prevalence")
    p.add_argument("--resamples", type=int, default=calibrate.SITE_RESAMPLES, help="bootstrap resamples per fit")
    p.add_argument("--jobs", type=int, default=2, help="runs scored at once, one process each")
    p.add_argument("--models", nargs="+", help="the distribution models to compare, by name (None: every one)")
    p.add_argument("--cause", action="store_true",
                   help="runs of --task cause: also fit their bacterial-vs-viral threshold without labels")
    return p.parse_args(argv)


def models(val_prob, val_y) -> dict:
    """name -> a fresh distribution model of this run (the product's models, at the default target)."""
    z = calibrate.site_logits(val_prob)
    return {"validation shapes": calibrate.ValidationShapes(z, val_y, TARGET),
            "two Gaussians": GaussianMixture(TARGET), "class shapes": ClassShapes(z, val_y, TARGET),
            "shapes, site-weighted rates": SiteWeighted(z, val_y, TARGET)}


def rates(y, prob, threshold) -> dict:
    m = evaluate.binary_metrics(y, prob, threshold)
    return {k: m[k] for k in ("sensitivity", "specificity", "accuracy", "auc")}


def first_half(patients: np.ndarray) -> np.ndarray:
    """The films of a random half of the children (seed 0): the rule's cross-fit split of half A."""
    kids = np.unique(patients)
    return np.isin(patients, np.random.default_rng(0).permutation(kids)[:len(kids) // 2])


def cross_fit_calls(fit, scores, patients) -> tuple[np.ndarray, float] | dict:
    """The cross-fit's calls: each patient-disjoint half's `scores` at the threshold `fit(fit_on)` chose on the other
    half, with the mean of the two fits' prevalence estimates; or the first refusal, as {"refused": ...}."""
    first = first_half(patients)
    calls, prevalence = np.zeros(len(scores)), []
    for fit_on in (first, ~first):
        r = fit(fit_on)
        if "refused" in r:
            return {"refused": r["refused"]}
        calls[~fit_on] = scores[~fit_on] >= r["threshold"]
        prevalence.append(r["prevalence"])
    return calls, float(np.mean(prevalence))


def cross_fit(model, y, prob, patients, resamples: int) -> tuple[dict, float]:
    """Each patient-disjoint half's calls at the threshold fitted on the other half's scores; all calls scored."""
    got = cross_fit_calls(lambda fit_on: calibrate.unlabelled_threshold(calibrate.site_logits(prob[fit_on]), model,
                                                                         resamples), prob, patients)
    if isinstance(got, dict):
        return got, float("nan")
    calls, prevalence = got
    m = evaluate.binary_metrics(y, calls, 0.5)
    return {k: m[k] for k in ("sensitivity", "specificity", "accuracy")} | {"auc": rates(y, prob, 0.5)["auc"]}, \
        prevalence


def draws_at_shares(positive: np.ndarray, negative: np.ndarray, shares, size: int, draws: int, seed: int):
    """(share, indices) for `draws` random draws of `size` films, each with that share of `positive` films and the
    rest `negative` (masks; without replacement within a draw)."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(positive), np.flatnonzero(negative)
    for share in shares:
        k = round(size * share)
        for _ in range(draws):
            yield share, np.r_[rng.choice(pos, k, replace=False), rng.choice(neg, size - k, replace=False)]


def stress_rows(model, scores, picks, truth_at, passes, resamples: int) -> list[dict]:
    """One row per draw of `picks` ((share, indices) pairs): the draw's scores fitted alone by `model`, and the
    truth at its threshold (`truth_at(threshold)`, on the whole set). A refused draw passes; another passes when
    `passes(truth, covered)` says so, `covered` telling whether the promised sensitivity interval holds the truth."""
    out = []
    for share, picked in picks:
        r = calibrate.unlabelled_threshold(calibrate.site_logits(scores[picked]), model, resamples)
        row = {"share": share, "refused": "refused" in r, "prevalence": r["prevalence"], "passes": True}
        if not row["refused"]:
            truth = truth_at(r["threshold"])
            lo, hi = r["ci95"]["sensitivity"]
            covered = bool(lo <= truth["sensitivity"] <= hi)
            row |= truth | {"covered": covered, "passes": passes(truth, covered)}
        out.append(row)
    return out


def stress(model, y, prob, *, draws: int, resamples: int, seed: int) -> list[dict]:
    """Draws of DRAW_SIZE films at each prevalence, each calibrated alone and scored on the whole set; a draw
    passes with sensitivity at least 0.90 inside the interval it promised."""
    return stress_rows(model, prob, draws_at_shares(y == 1, y == 0, PREVALENCES, DRAW_SIZE, draws, seed),
                       lambda t: rates(y, prob, t), lambda truth, covered: truth["sensitivity"] >= 0.90 and covered,
                       resamples)


def one_run(run: Path, args) -> dict:
    """Every row of the rule for one run: {method: {"transductive": ..., "cross-fit": ..., "stress": [...]}}."""
    val_y, val_prob, _ = read_predictions(run / "predictions_val.csv")
    y, prob, paths = read_predictions(next((run / "external").glob("*/predictions.csv")))
    patients = np.array([data.patient_id(p) for p in paths])
    own = rates(y, prob, evaluate.choose_threshold(val_y, val_prob, f"sens={TARGET}")) | {"prevalence": float("nan")}
    result = {"validation threshold": {"transductive": own, "cross-fit": dict(own)}}  # it needs no fit
    built = models(val_prob, val_y)
    for k, (name, model) in enumerate(built.items()):
        if args.models and name not in args.models:
            continue
        start = time.perf_counter()
        r = calibrate.unlabelled_threshold(calibrate.site_logits(prob), model, args.resamples)
        wall = time.perf_counter() - start
        trans = {"refused": r["refused"]} if "refused" in r else rates(y, prob, r["threshold"])
        crossed, prevalence = cross_fit(model, y, prob, patients, args.resamples)
        result[name] = {"transductive": trans | {"prevalence": r["prevalence"], "wall": wall},
                        "cross-fit": crossed | {"prevalence": prevalence},
                        "stress": stress(model, y, prob, draws=args.draws, resamples=args.resamples, seed=1 + k)}
    result["truth"] = {"prevalence": float(y.mean())}
    result["ceiling"] = ceiling(y, prob, [Path(p).name for p in paths])
    if args.cause:
        result["cause"] = cause_rows(run, prob, patients, built["validation shapes"], args)
    return result


def ceiling(y, prob, names: list[str]) -> dict:
    """Half A's rates at the highest threshold that keeps GOAL of its pneumonias, chosen with its labels: not a
    method but the most any threshold could give on this model's ranking of half A; and the healthy films still
    above it, each with the share of half A's pneumonias it outscores."""
    t = calibrate.upper_quantile(prob[y == 1], GOAL)
    above = {n: float(np.mean(prob[y == 1] < p)) for n, label, p in zip(names, y, prob) if label == 0 and p >= t}
    return rates(y, prob, t) | {"healthy above": above}


def films_above(ceilings: list[dict]) -> str:
    """One line: the healthy films above the ceiling's threshold, each with in how many of the runs' `ceilings` it is
    there and the range of the share of half A's pneumonias it outscores there; the most frequent first."""
    shares = defaultdict(list)  # film -> the share of pneumonias it outscores, in each run where it is above
    for c in ceilings:
        for name, share in c["healthy above"].items():
            shares[name].append(share)
    often = sorted(shares.items(), key=lambda item: -len(item[1]))
    return (f"healthy films above the ceiling's threshold: in how many of the {len(ceilings)} runs (the share of half "
            f"A's pneumonias each outscores there): "
            + ", ".join(f"{name} {len(s)} ({min(s):.2f}-{max(s):.2f})" for name, s in often))


def read_causes(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Each film's cause (0 normal, 1 bacterial, 2 viral; from its Kaggle name, read here only to score and to
    draw) and its bacterial share P(bacterial) / (P(bacterial) + P(viral)), from a cause run's predictions CSV."""
    rows = runs.read_csv(path)
    if rows and "p_bacterial" not in rows[0]:
        sys.exit(f"{path} holds no cause scores: --cause takes runs of --task cause")
    cause = np.array([data.cause_of(r["path"], int(r["label"] == "PNEUMONIA")) for r in rows])
    classes = np.array([[float(r[k]) for k in ("p_normal", "p_bacterial", "p_viral")] for r in rows])
    return cause, evaluate.bacterial_share(classes)


def cause_rates(cause, share, threshold) -> dict:
    """Bacterial vs viral among the true pneumonias (Kermany et al.'s protocol; bacterial positive)."""
    pneumonia = cause > 0
    m = evaluate.binary_metrics((cause[pneumonia] == 1).astype(int), share[pneumonia], threshold)
    return {k: m[k] for k in ("sensitivity", "specificity", "accuracy", "auc")} | \
        {"balanced": (m["sensitivity"] + m["specificity"]) / 2}


def cause_threshold(shapes, cause_model, prob, share, fit_on, resamples: int) -> dict:
    """The cause threshold fitted without labels on the films of `fit_on` called pneumonia at their own unlabelled
    pneumonia threshold (the validation shapes'), as `calibrate --unlabelled` would fit it."""
    r = calibrate.unlabelled_threshold(calibrate.site_logits(prob[fit_on]), shapes, resamples)
    if "refused" in r:
        return r
    called = fit_on & (prob >= r["threshold"])
    return calibrate.unlabelled_threshold(calibrate.site_logits(share[called]), cause_model, resamples)


def cause_cross_fit(shapes, cause_model, prob, cause, share, patients, resamples: int) -> dict:
    """Each half's bacterial-vs-viral calls at the cause threshold fitted on the other half's films; all of the
    set's true pneumonias scored together."""
    got = cross_fit_calls(lambda fit_on: cause_threshold(shapes, cause_model, prob, share, fit_on, resamples), share,
                          patients)
    if isinstance(got, dict):
        return got
    calls, prevalence = got
    return cause_rates(cause, calls, 0.5) | {"auc": cause_rates(cause, share, 0.5)["auc"], "prevalence": prevalence}


def cause_stress(cause_model, cause, share, kept: dict, *, draws: int, resamples: int, seed: int) -> list[dict]:
    """Draws of CAUSE_DRAW true pneumonias at each bacterial share, each fitted alone and scored on all of them; a
    draw passes with a balanced accuracy at most CAUSE_SLACK below the kept threshold's."""
    return stress_rows(cause_model, share,
                       draws_at_shares(cause == 1, cause == 2, CAUSE_SHARES, CAUSE_DRAW, draws, seed),
                       lambda t: cause_rates(cause, share, t),
                       lambda truth, covered: truth["balanced"] >= kept["balanced"] - CAUSE_SLACK, resamples)


def cause_rows(run: Path, prob, patients, shapes, args) -> dict:
    """The rows of "A cause model without labels" for one cause run: the kept threshold, and the cause shapes
    cross-fit, transductive and under cause-share stress."""
    val_cause, val_share = read_causes(run / "predictions_val.csv")
    cause, share = read_causes(next((run / "external").glob("*/predictions.csv")))
    pneumonia = val_cause > 0
    model = CauseShapes(val_share[pneumonia], (val_cause[pneumonia] == 1).astype(int))
    # the checkpoint's own cause threshold, chosen again from its validation CSV (the same to 4 decimals in all 5 runs)
    kept = cause_rates(cause, share, evaluate.choose_threshold(val_cause[pneumonia] == 1, val_share[pneumonia],
                                                               "youden"))
    every = np.ones(len(cause), bool)
    trans = cause_threshold(shapes, model, prob, share, every, args.resamples)
    return {"kept": kept,
            "cross-fit": cause_cross_fit(shapes, model, prob, cause, share, patients, args.resamples),
            "transductive": ({"refused": trans["refused"]} if "refused" in trans else
                             cause_rates(cause, share, trans["threshold"])) | {"prevalence": trans["prevalence"]},
            "stress": cause_stress(model, cause, share, kept, draws=args.draws, resamples=args.resamples, seed=11)}


def summarise_cause(results: list[dict]) -> None:
    """The bacterial-vs-viral table over the seeds, and the cause-share stress."""
    print("\nbacterial vs viral among half A's true pneumonias (Kermany et al.'s protocol)")
    print("| cause threshold | setting | sensitivity (bacterial) | specificity (viral) | accuracy | balanced | AUC | "
          "bacterial share estimate |")
    print("|---|---|---|---|---|---|---|---|")
    for label, key in (("kept (as trained)", "kept"), ("cause shapes", "cross-fit"), ("cause shapes", "transductive")):
        rows = [r["cause"][key] for r in results]
        refused = sum("refused" in row for row in rows)
        cells = [mean_sd([row.get(k, float("nan")) for row in rows])
                 for k in ("sensitivity", "specificity", "accuracy", "balanced", "auc", "prevalence")]
        print(f"| {label} | {key if key != 'kept' else '-'}{f' ({refused} refused)' if refused else ''} | "
              + " | ".join(cells) + " |")
    print(f"\ncause-share stress: draws of {CAUSE_DRAW} pneumonias, each scored on all of half A's "
          f"(passes: refused, or balanced accuracy at most {CAUSE_SLACK} below the kept threshold's)")
    print_stress({"cause shapes": [r["cause"]["stress"] for r in results]}, CAUSE_SHARES)


def print_stress(by_model: dict[str, list[list[dict]]], shares) -> None:
    """One row per model and share: refusals, passes, coverage, and the worst and mean rates of the draws kept."""
    print("| model | share | refused | passes | covered | worst sensitivity | worst specificity | "
          "mean sensitivity | mean specificity |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, per_run in by_model.items():
        for share in shares:
            rows = [row for run_rows in per_run for row in run_rows if row["share"] == share]
            kept = [row for row in rows if not row["refused"]]
            worst = min(kept, key=lambda row: row["sensitivity"]) if kept else None
            print(f"| {name} | {share:.2f} | {sum(r['refused'] for r in rows)}/{len(rows)} | "
                  f"{sum(r['passes'] for r in rows)}/{len(rows)} | {sum(r['covered'] for r in kept)}/{len(kept)} | "
                  + (f"{worst['sensitivity']:.3f} | {min(r['specificity'] for r in kept):.3f} | "
                     f"{statistics.mean(r['sensitivity'] for r in kept):.3f} | "
                     f"{statistics.mean(r['specificity'] for r in kept):.3f} |" if kept else "- | - | - | - |"))


def summarise(results: list[dict]) -> None:
    print(f"\n{len(results)} runs; half A's true prevalence {results[0]['truth']['prevalence']:.3f}")
    print("| threshold | setting | sensitivity | specificity | accuracy | AUC | prevalence estimate |")
    print("|---|---|---|---|---|---|---|")
    names = [name for name in results[0] if name not in NOT_MODELS]
    for name in names:
        for setting in ("cross-fit", "transductive"):
            rows = [r[name][setting] for r in results]
            refused = sum("refused" in row for row in rows)
            cells = [mean_sd([row.get(k, float("nan")) for row in rows])
                     for k in ("sensitivity", "specificity", "accuracy", "auc", "prevalence")]
            print(f"| {name} | {setting}{f' ({refused} refused)' if refused else ''} | " + " | ".join(cells) + " |")
    cells = [mean_sd([r["ceiling"][k] for r in results]) for k in ("sensitivity", "specificity", "accuracy", "auc")]
    print(f"| best threshold for sensitivity {GOAL}, half A's labels seen (a ceiling) | - | " + " | ".join(cells)
          + " | - |")
    print(films_above([r["ceiling"] for r in results]))
    print("\nprevalence stress: draws of 100 films, each scored on all of half A (every seed's draws pooled); "
          "share: of pneumonia")
    print_stress({name: [r[name]["stress"] for r in results] for name in names if "stress" in results[0][name]},
                 PREVALENCES)
    walls = [r[n]["transductive"]["wall"] for r in results for n in names if "stress" in r[n]]
    print(f"\nfit + bootstrap on all of half A: {statistics.median(walls):.1f} s median")


def main(argv=None) -> int:
    args = parse_args(argv)
    for run in args.runs if args.cause else ():
        read_causes(Path(run) / "predictions_val.csv")  # a run of another task stops here, before any fitting
    with ProcessPoolExecutor(args.jobs) as pool:  # each run's rows are independent of the others'
        results = list(pool.map(partial(one_run, args=args), map(Path, args.runs)))
    summarise(results)
    if args.cause:
        summarise_cause(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
