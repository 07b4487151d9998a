"""Learning a site from its unlabelled films, judged on half A by the rules in docs/calibration.md ("Self-training
on the site's films", "Domain-adversarial fine-tuning", "Consistency and importance-weighted adversarial
fine-tuning"): each finished default run fine-tuned with one half of half A's films, scored on the other half, then
swapped; beside a control fine-tuned for as long on its training split alone. Methods: quantile pseudo-labels
(self-training); a domain critic through gradient reversal on the pooled features (adversarial, DANN), with its
training films weighted by the estimated class ratio (importance-weighted, IWDAN); a mean teacher's consistency
between two views of every site film (consistency); a new network trained from the run's seed by its whole recipe with
the pseudo-labelled films added (retrained: "Retraining from the start"); a new network trained so with the
importance-weighted critic from the first epoch (retrained importance-weighted: "Importance-weighted adversarial
training from the first epoch", a one-seed pilot), and so with the mean teacher (retrained consistency: "A mean
teacher from the first epoch", a one-seed pilot). With `--setting transductive` each method is fitted once on all of
half A's films and scored on all of them (the rule's transductive setting). Beside each method's rows, the ceiling:
the most any threshold could give on its scores of half A, chosen with half A's labels, and the healthy films above it.

Usage: `python benchmarks/site_selftrain.py RUN [RUN ...] [--methods ...] [--setting ...] [--out DIR]` (the seedN/
folders of `benchmarks/generalisation.py --seeds 5 --only default`). Each run's results are written as they finish
(OUT/<run>.json, OUT/<run>.transductive.json; a method already there is read, not fitted again), then the table over
all runs is printed.
Half A's labels and names are read here only to split it by child and to score; the pseudo-labels come from the
films' pixels through the run's own model.
"""
import argparse
import copy
import csv
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app import calibrate  # noqa: E402
from app.settings import default_cache_dir  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
from lib import infer, runs, shortcut  # noqa: E402
from model import build, memory_format, place  # noqa: E402
import train  # noqa: E402
from generalisation import layout_probe, mean_sd, read_predictions, thumbnails  # noqa: E402  (beside this script)
from site_unlabelled import GOAL, TARGET, ceiling, films_above, first_half  # noqa: E402

LOW, HIGH = 0.20, 0.40  # of a half's films by the model's own score: the lowest taken as normal, the highest pneumonia
CPU = torch.device("cpu")
FINE_TUNING = ("control", "self-training", "adversarial", "importance-weighted", "consistency")
RETRAINING = ("retrained", "retrained importance-weighted", "retrained consistency")  # a run's training each: asked for
METHODS = (*FINE_TUNING, *RETRAINING)
SETTINGS = ("cross-fit", "transductive")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finished default runs scored with --external half A")
    p.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning peak learning rate")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(FINE_TUNING),
                   help="what to fit")
    p.add_argument("--setting", choices=SETTINGS, default="cross-fit",
                   help="fitted on one half of half A and scored on the other (then swapped), or fitted and scored "
                        "on all of it")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "site_selftrain")
    return p.parse_args(argv)


def splits(run: Path, config: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The run's own training and validation films (uint8 N x 1 x S x S, float labels), as its split.csv has them."""
    root = str(run / "demo_data") if config.get("demo") else config["data"]  # a --demo run keeps its phantoms
    ds = data.load_dataset(root, config["image_size"], config["split"], config["seed"],
                           None if config.get("demo") else default_cache_dir(), progress=False)
    with open(run / "split.csv", newline="") as f:
        written = {row["path"]: row["split"] for row in csv.DictReader(f)}
    assert all(written[p] == s for p, s in zip(ds.paths, ds.split)), f"{run}: not the split the run trained on"
    out = {}
    for name in ("train", "val"):
        images, labels, _ = ds.subset(name)
        out[name] = (images.to(CPU), labels)
    return out


def pseudo_labels(prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and labels of the films taken: the lowest LOW share of scores normal, the highest HIGH pneumonia."""
    order = np.argsort(prob, kind="stable")
    low, high = order[:round(LOW * len(prob))], order[len(prob) - round(HIGH * len(prob)):]
    return np.r_[low, high], np.r_[np.zeros(len(low)), np.ones(len(high))]


def starting_point(ckpt: dict, config: dict, args, fresh: bool) -> tuple[infer.Predictor, nn.Module, int, float]:
    """The run's predictor, the network to train, and its epochs and peak learning rate: the run's kept network for
    args.epochs at args.lr, or with `fresh` a new one drawn as train_members draws it (seeded, then built) for the
    run's own epochs and rate. The global stream is seeded either way, so what is drawn next (a critic's initial
    weights) does not depend on what ran before in this process."""
    predictor = infer.load_predictor(ckpt, CPU)
    if fresh:
        train.set_seed(config["seed"])
        return predictor, place(build(ckpt["model_config"]), CPU).train(), config["epochs"], config["lr"]
    model = predictor.members[0].train()
    train.set_seed(config["seed"])
    return predictor, model, args.epochs, args.lr


def fine_tune(ckpt: dict, sets: dict, config: dict, args, extra=None, fresh: bool = False) -> infer.Predictor:
    """The run's model trained on for args.epochs by its own recipe, on its training split plus `extra` films; with
    `fresh`, a new network from the run's seed trained by the run's whole recipe (its epochs and learning rate)."""
    predictor, model, epochs, lr = starting_point(ckpt, config, args, fresh)
    images, labels = sets["train"]
    if extra is not None:
        images, labels = torch.cat([images, extra[0]]), torch.cat([labels, extra[1]])
    cfg = train.TrainConfig(epochs=epochs, batch_size=config["batch_size"], lr=lr,
                            pos_weight=config["pos_weight"], patience=0, label_smoothing=config["label_smoothing"],
                            momentum=tuple(config["momentum"]), weight_decay=config["weight_decay"],
                            warmup=config["warmup"], keep="last", swa_epochs=config["swa_epochs"], task="pneumonia",
                            seed=config["seed"], progress=False)
    with tempfile.TemporaryDirectory() as scratch:  # fit's history.csv and last.pt
        train.fit(model, (images, labels), sets["val"], predictor.prep, cfg, run_dir=Path(scratch))
    return infer.Predictor([model.eval()], predictor.prep, CPU)


class Reverse(torch.autograd.Function):
    """The identity forward; the gradient times -weight backward (gradient reversal, Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.weight * grad, None


class Critic(nn.Module):
    """DANN's domain critic on the pooled features (Ganin & Lempitsky 2015), each training film's loss weighted by
    its class (IWDAN, Tachet des Combes et al. 2020: the ratio of site to training prevalence; 1, 1 for DANN)."""

    def __init__(self, model: nn.Module, class_weight: tuple[float, float] = (1.0, 1.0)):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(model.head[-1].in_features, 64), nn.ReLU(), nn.Linear(64, 1))
        self.class_weight = torch.tensor(class_weight)

    def loss(self, _logits, features: torch.Tensor, labels: torch.Tensor, done: float, _site_view) -> torch.Tensor:
        """Training films first, then as many site films; the features' gradient reversed by DANN's ramp."""
        n = len(labels)
        weight = 2 / (1 + math.exp(-10 * done)) - 1  # DANN's ramp: the critic's pull grows from 0 to 1
        is_site = torch.cat([torch.zeros(n), torch.ones(n)])
        films = torch.cat([self.class_weight[labels.long()], torch.ones(n)])
        return F.binary_cross_entropy_with_logits(self.net(Reverse.apply(features, weight)).squeeze(1), is_site,
                                                  weight=films)

    def after_step(self, model: nn.Module) -> None:
        pass

    def scored(self, model: nn.Module) -> nn.Module:
        return model


class Teacher(nn.Module):
    """Mean teacher (Tarvainen & Valpola 2017): the student's weights averaged over the steps; the student's
    P(pneumonia) on one view of each site film is pulled towards the teacher's on another view."""
    DECAY, WEIGHT = 0.99, 10.0

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def loss(self, logits: torch.Tensor, _features, labels: torch.Tensor, done: float, site_view) -> torch.Tensor:
        with torch.no_grad():
            target = torch.sigmoid(self.model(site_view()))
        ramp = math.exp(-5 * (1 - done) ** 2)  # mean teacher's sigmoid ramp-up
        return self.WEIGHT * ramp * F.mse_loss(torch.sigmoid(logits[len(labels):]), target)

    def after_step(self, model: nn.Module) -> None:
        with torch.no_grad():
            for mine, theirs in zip(self.model.parameters(), model.parameters()):
                mine.lerp_(theirs, 1 - self.DECAY)
            for mine, theirs in zip(self.model.buffers(), model.buffers()):
                mine.copy_(theirs)

    def scored(self, model: nn.Module) -> nn.Module:
        return self.model


def site_fine_tune(ckpt: dict, sets: dict, config: dict, args, site: torch.Tensor, make_term,
                   fresh: bool = False) -> infer.Predictor:
    """The run's model trained on for args.epochs by its recipe on its training split, plus a term on the site's
    films (`make_term(model)`: a Critic or a Teacher): each step a training batch and as many site films drawn at
    random, augmented alike, through one forward pass; the task loss on the training films only. With `fresh`, a
    new network from the run's seed trained so from the first epoch, for the run's own epochs and learning rate."""
    predictor, model, epochs, lr = starting_point(ckpt, config, args, fresh)
    term = make_term(model)
    images, labels = sets["train"]
    size = config["batch_size"]
    steps = math.ceil(len(images) / size)
    optimizer, scheduler = train.make_optimizer(nn.ModuleList([model, term]), lr, epochs, steps,
                                                momentum=tuple(config["momentum"]),
                                                weight_decay=config["weight_decay"], warmup=config["warmup"])
    task_loss = train.smoothed_bce(config["pos_weight"], config["label_smoothing"], CPU)  # as fine_tune's fit
    layout = memory_format(CPU)
    generator = train.set_seed(config["seed"])
    for epoch in range(epochs):
        for k, idx in enumerate(train.batches(len(images), size, generator)):
            done = (epoch * steps + k) / (epochs * steps)
            drawn = site[torch.randint(len(site), (len(idx),), generator=generator)]
            x = predictor.prep.train(torch.cat([images[idx], drawn]), generator)
            logits, features = model.forward_features(x.contiguous(memory_format=layout))
            loss = task_loss(logits[:len(idx)], labels[idx]) + term.loss(
                logits, features, labels[idx], done,
                lambda: predictor.prep.train(drawn, generator).contiguous(memory_format=layout))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            term.after_step(model)
    return infer.Predictor([term.scored(model).eval()], predictor.prep, CPU)


def class_weight(own_site: np.ndarray, own_val: np.ndarray, sets: dict) -> tuple[float, float]:
    """IWDAN's weights: the site's prevalence (the validation shapes' estimate from the run's own scores of the
    site's films, no label) over the training split's, for normal and pneumonia."""
    shapes = calibrate.ValidationShapes(calibrate.site_logits(own_val), sets["val"][1].numpy().astype(int), TARGET)
    site = shapes.fit(np.sort(calibrate.site_logits(own_site))).prevalence
    trained = float(sets["train"][1].mean())
    return (1 - site) / (1 - trained), site / trained


def thresholds(predictor: infer.Predictor, sets: dict, site_prob: np.ndarray) -> dict[str, float]:
    """The model's validation threshold, and the validation shapes' threshold fitted on the site's scores."""
    val_prob, _ = predictor.predict(sets["val"][0])
    val_y = sets["val"][1].numpy().astype(int)
    shapes = calibrate.ValidationShapes(calibrate.site_logits(val_prob), val_y, TARGET)
    site = calibrate.unlabelled_threshold(calibrate.site_logits(site_prob), shapes)
    return {"validation": evaluate.choose_threshold(val_y, val_prob, f"sens={TARGET}"),
            "validation shapes": float("nan") if "refused" in site else site["threshold"]}


def one_run(run: Path, args, done: dict) -> dict:
    """`done` with every method of args.methods it lacks: {method: {threshold: {sensitivity, specificity, accuracy,
    auc}, "wall": seconds per fine-tuning, "probe_rho": the layout probe's Spearman among half A's normals}}, and how
    right the pseudo-labels were. AUC and Spearman are the mean of the scored halves'."""
    config = json.loads((run / "config.json").read_text())
    ckpt = runs.read_checkpoint(run / "best.pt")
    sets = splits(run, config)
    y, _, paths = read_predictions(next((run / "external").glob("*/predictions.csv")))
    films = infer.load_predictor(ckpt, CPU)
    images = torch.from_numpy(films.decode(paths, show=False)[0])[:, None]
    own = films.predict(images)[0]  # the run's model on the films' pixels
    own_val = films.predict(sets["val"][0])[0]  # and on its validation films, for IWDAN's prevalence estimate
    first = first_half(np.array([data.patient_id(p) for p in paths]))
    names = [Path(p).name for p in paths]  # the ceiling's healthy films, by name
    layout = layout_probe(run).score(thumbnails(paths))
    every = np.ones(len(y), bool)
    folds = [(first, ~first), (~first, first)] if args.setting == "cross-fit" else [(every, every)]  # fit, score
    control = None

    def tuned(method: str, fit_on: np.ndarray) -> infer.Predictor:
        nonlocal control
        if method == "control":  # sees no site film: one model serves both halves
            control = control or fine_tune(ckpt, sets, config, args)
            return control
        site = images[np.flatnonzero(fit_on)]
        if method == "adversarial":
            return site_fine_tune(ckpt, sets, config, args, site, Critic)
        if method in ("importance-weighted", "retrained importance-weighted"):
            weights = class_weight(own[fit_on], own_val, sets)
            return site_fine_tune(ckpt, sets, config, args, site, lambda model: Critic(model, weights),
                                  fresh=method.startswith("retrained"))
        if method in ("consistency", "retrained consistency"):
            return site_fine_tune(ckpt, sets, config, args, site, Teacher, fresh=method.startswith("retrained"))
        taken, labels = pseudo_labels(own[fit_on])
        extra = images[np.flatnonzero(fit_on)[taken]], torch.from_numpy(labels).float()
        return fine_tune(ckpt, sets, config, args, extra, fresh=method == "retrained")

    result = dict(done)
    for method in (m for m in args.methods if m not in done):
        calls = {t: np.zeros(len(y), int) for t in ("validation", "validation shapes")}
        aucs, rhos, walls, scored = [], [], [], np.zeros(len(y))
        for fit_on, score_on in folds:
            start = time.perf_counter()
            model = tuned(method, fit_on)
            walls.append(time.perf_counter() - start)
            prob = model.predict(images)[0]
            scored[score_on] = prob[score_on]
            for name, t in thresholds(model, sets, prob[fit_on]).items():
                calls[name][score_on] = prob[score_on] >= t
            aucs.append(evaluate.binary_metrics(y[score_on], prob[score_on], 0.5)["auc"])
            rhos.append(shortcut.audit(y[score_on], prob[score_on], 0.5, layout[score_on], {})["spearman_negatives"])
        result[method] = {"wall": walls, "probe_rho": float(np.mean(rhos)),
                          "ceiling": ceiling(y, scored, names)}
        for name, c in calls.items():
            m = evaluate.binary_metrics(y, c.astype(float), 0.5)
            result[method][name] = {k: m[k] for k in ("sensitivity", "specificity", "accuracy")} | \
                {"auc": float(np.mean(aucs))}
    taken = [pseudo_labels(own[h]) for h, _ in folds]  # scored afterwards: how right the pseudo-labels were
    result["pseudo_label_precision"] = float(np.mean(np.concatenate(
        [y[np.flatnonzero(h)[rows]] == lab for (h, _), (rows, lab) in zip(folds, taken)])))
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for run in args.runs:
        path = args.out / (f"{run.name}.json" if args.setting == "cross-fit" else f"{run.name}.{args.setting}.json")
        done = json.loads(path.read_text()) if path.exists() else {}
        if any(m not in done for m in args.methods):
            runs.write_json(path, one_run(run, args, done))
        results.append(json.loads(path.read_text()))
        print(f"{run}: " + ", ".join(f"{m} {max(results[-1][m]['wall']):.0f} s" for m in METHODS if m in results[-1]),
              flush=True)
    print(f"\n{len(results)} runs, {args.setting} on half A; fine-tuning {args.epochs} epochs at lr {args.lr}, "
          f"retraining each run's own recipe; pseudo-labels right: "
          f"{mean_sd([r['pseudo_label_precision'] for r in results])}")
    print("| model | threshold | sensitivity | specificity | accuracy | AUC | probe rho among normals |\n"
          "|---|---|---|---|---|---|---|")
    for method in (m for m in METHODS if all(m in r for r in results)):
        rho = [r[method].get("probe_rho") for r in results]  # results written before it was measured lack it
        for name in ("validation", "validation shapes"):
            rows = [r[method][name] for r in results]
            print(f"| {method} | {name} | " + " | ".join(mean_sd([row[k] for row in rows])
                                                          for k in ("sensitivity", "specificity", "accuracy", "auc"))
                  + f" | {'-' if None in rho else mean_sd(rho)} |")
    print_ceilings(results)
    return 0


def print_ceilings(results: list[dict]) -> None:
    """Per method: the most any threshold could give on its scores of half A (sensitivity GOAL kept, half A's labels
    seen; cross-fit, the two scored halves together), and the healthy films still above that threshold."""
    print(f"\nthe best threshold for sensitivity {GOAL} on each model's scores, half A's labels seen (a ceiling)\n"
          "| model | sensitivity | specificity | AUC |\n|---|---|---|---|")
    done = [m for m in METHODS if all("ceiling" in r.get(m, {}) for r in results)]  # older results lack it
    for method in done:
        cells = [mean_sd([r[method]["ceiling"][k] for r in results]) for k in ("sensitivity", "specificity", "auc")]
        print(f"| {method} | " + " | ".join(cells) + " |")
    for method in done:
        print(f"{method}: " + films_above([r[method]["ceiling"] for r in results]))


if __name__ == "__main__":
    sys.exit(main())
