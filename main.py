"""Pneumonia detector for pediatric chest X-rays: train, evaluate and explain a custom CNN.

Usage: `python main.py` (Kaggle archive in archive/), `python main.py --demo` (synthetic phantoms),
`python main.py evaluate --checkpoint runs/X/best.pt --data DIR`, `python main.py predict IMG --checkpoint ...`.
"""
import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import data
import demo
import evaluate
import gradcam
import report
import runs
import train
from images import ImageCache, cache_size
from model import PneumoniaCNN, count_flops
from transforms import INTENSITY, PADDING, Augment, Preprocess, fit_normalisation

DOWNLOAD_HELP = """No chest X-rays found in '{root}'.
Download "Chest X-Ray Images (Pneumonia)" from Kaggle (https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia),
unzip it into {root}/ so that it looks like
    {root}/chest_xray/train/NORMAL/*.jpeg   {root}/chest_xray/train/PNEUMONIA/*.jpeg
    {root}/chest_xray/val/...               {root}/chest_xray/test/...
(any depth works: every NORMAL/ and PNEUMONIA/ folder is used), then run `python main.py` again.
To try the tool without the download: `python main.py --demo`."""
SYNTHETIC = "SYNTHETIC DEMO DATA (generated phantoms): not real X-rays, not a medical result."


class UsageError(Exception):
    """A problem the user can fix; printed as one sentence, exit status 2."""


# ---------------------------------------------------------------- arguments
class Parser(argparse.ArgumentParser):
    """argparse with one-sentence errors: the flag, what it accepts, and where to read more; exit status 2.

    Abbreviated flags are off, so the flags a user typed can be told from the defaults (`given`).
    """

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def given(self, argv: list[str]) -> set[str]:
        """The destinations of the flags that appear in `argv`."""
        return {a.dest for a in self._actions for opt in a.option_strings for tok in argv
                if tok == opt or tok.startswith(opt + "=")}

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number(kind: type, low: float | None = None, high: float | None = None, open_low: bool = False,
           open_high: bool = False):
    """An argparse type for an int or float within a range; refuses anything else with what it accepts."""
    what = "a whole number" if kind is int else "a number"
    if low is not None and high is not None:
        what += f" in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    elif low is not None:
        what += f" {'>' if open_low else '>='} {low}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        too_low = low is not None and (value <= low if open_low else value < low)
        too_high = high is not None and (value >= high if open_high else value > high)
        if too_low or too_high or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


def threshold_policy(text: str) -> str:
    """--threshold: 'youden', 'sens=X' with X in (0, 1], or a probability in [0, 1]."""
    try:
        if text == "youden":
            return text
        value = float(text[5:]) if text.startswith("sens=") else float(text)
        if (0 < value <= 1) if text.startswith("sens=") else (0 <= value <= 1):
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected youden, sens=X with X in (0, 1], or a probability in [0, 1], got {text!r}")


POSITIVE_INT, COUNT = number(int, 1), number(int, 0)
def build_parser() -> argparse.ArgumentParser:
    """The training command (the default): every flag with its default."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = Parser(prog="main.py", description=__doc__.split("\n\n")[0], formatter_class=fmt,
                                epilog="Sub-commands: `main.py evaluate --help`, `main.py predict --help`.")
    p.add_argument("--data", default="archive", help="folder holding the unzipped Kaggle archive (any NORMAL/ and PNEUMONIA/ folders below it)")
    p.add_argument("--out", default=None, help="run folder (default runs/<YYYYmmdd-HHMMSS>); must not exist yet")
    p.add_argument("--epochs", type=POSITIVE_INT, default=25, help="maximum training epochs")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=32, help="training batch size")
    p.add_argument("--lr", type=number(float, 0, open_low=True), default=0.05, help="peak learning rate of the OneCycle SGD schedule")
    p.add_argument("--pos-weight", type=number(float, 0, open_low=True), default=0.6, help="BCEWithLogitsLoss pos_weight for the PNEUMONIA class")
    p.add_argument("--label-smoothing", type=number(float, 0, 1, open_high=True), default=0.0, help="training targets moved this far towards 0.5 (0 = off)")
    p.add_argument("--patience", type=COUNT, default=5, help="stop after this many epochs in which neither validation AUC nor loss improved; 0: never")
    p.add_argument("--image-size", type=number(int, 16), default=128, help="model input side in pixels (images are stored 10%% larger and edge-cropped)")
    p.add_argument("--widths", type=POSITIVE_INT, nargs=3, default=[24, 48, 96], help="channels of the three CNN blocks")
    p.add_argument("--split", choices=["patient", "random", "official"], default="patient",
                   help="patient: 70/15/15 grouped by child; random: image-level (leaky, for comparison); official: the archive's test/ folder")
    p.add_argument("--threshold", type=threshold_policy, default="sens=0.95",
                   help="decision threshold policy, applied to validation: sens=X (the strictest threshold reaching sensitivity X), youden, or a number")
    p.add_argument("--seed", type=number(int), default=0, help="seed for the split, initialisation, shuffling and augmentation")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training (CUDA)")
    p.add_argument("--deterministic", action="store_true", help="deterministic GPU algorithms (slower); CPU runs always are")
    p.add_argument("--workers", type=POSITIVE_INT, default=None, help="processes for the one-time decode; None uses every core")
    p.add_argument("--resume", metavar="RUN", default=None, help="continue the interrupted run in folder RUN")
    p.add_argument("--demo", action="store_true", help="generate synthetic phantoms into the run folder and use them as data")
    p.add_argument("--demo-patients", type=POSITIVE_INT, default=60, help="phantom patients per class for --demo (3 images each)")
    p.add_argument("--external", metavar="DIR", action="append", default=[],
                   help="labelled folder (DIR/**/{NORMAL,PNEUMONIA}/*) scored after the test split at the validation threshold; repeatable")
    add_augment_flags(p)
    add_shared_flags(p, cache=True)
    return p


def add_augment_flags(p: argparse.ArgumentParser) -> None:
    """Training augmentation against acquisition shift (Augment); the defaults are the measured best."""
    d = Augment()
    g = p.add_argument_group("augmentation", "drawn per training image, uniformly in +-range; see README 'Generalisation'")
    g.add_argument("--augment", choices=["full", "none"], default="full",
                   help="full: the settings below; none: the original project's rotation and crop only (ignores the settings below)")
    g.add_argument("--rotation", type=number(float, 0, 180), default=d.rotation, help="rotation range in degrees")
    g.add_argument("--zoom", type=number(float, 0), default=d.zoom, help="per-axis scale jitter: each axis scaled by [1/(1+z), 1+z], so size and aspect ratio change")
    g.add_argument("--translate", type=number(float, 0, 0.5), default=d.translate, help="extra shift as a fraction of the side, beyond the random crop position")
    demo_note = "; None: {} on real data, 0 with --demo (phantoms have no exposure shift; see README)"
    g.add_argument("--gamma", type=number(float, 0), default=None, help="log-gamma range: x ** exp(+-g), black and white stay fixed" + demo_note.format(d.gamma))
    g.add_argument("--contrast", type=number(float, 0, 1, open_high=True), default=None, help="contrast range around each image's mean: x (1 +- c)" + demo_note.format(d.contrast))
    g.add_argument("--brightness", type=number(float, 0, 1), default=None, help="brightness range in [0, 1] grey units" + demo_note.format(d.brightness))
    g.add_argument("--noise", type=number(float, 0), default=d.noise, help="std of added Gaussian noise in [0, 1] grey units")
    g.add_argument("--sharpness", type=number(float, 0, 1), default=d.sharpness, help="blur/sharpen range: x + u (3x3 box blur - x), u in +-s")
    g.add_argument("--padding", choices=PADDING, default=d.padding, help="fill outside the stored image (zeros paints black frames)")
    g.add_argument("--intensity", choices=INTENSITY, default="dataset",
                   help="dataset: normalise by the training split's mean/std; image: standardise each image by its own (train and scoring alike)")


def resolve_intensity_defaults(args) -> None:
    """Fill unset --gamma/--contrast/--brightness: the measured defaults, or 0 for --demo.

    The phantoms' only finding is a brightness change and their 'scanner' never changes; with
    intensity jitter the phantom model learns to compare the lungs with the heart and spine, and the
    Grad-CAM maximum moves off the drawn lesions (README, Generalisation).
    """
    defaults = Augment()
    for name in ("gamma", "contrast", "brightness"):
        if getattr(args, name) is None:
            setattr(args, name, 0.0 if args.demo else getattr(defaults, name))


def augment_from_args(args) -> Augment:
    """The Augment the flags describe."""
    if args.augment == "none":
        return Augment.plain(args.rotation)
    return Augment(args.rotation, args.zoom, args.translate, args.gamma, args.contrast, args.brightness,
                   args.noise, args.padding, args.sharpness)


def build_evaluate_parser() -> argparse.ArgumentParser:
    """`main.py evaluate`: score a checkpoint on labelled data."""
    p = Parser(prog="main.py evaluate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Score a trained model on a labelled folder (DIR/**/{NORMAL,PNEUMONIA}/*) "
                                            "or on the test rows of a run's split.csv, at the checkpoint's threshold.")
    p.add_argument("--checkpoint", required=True, help="best.pt of a finished run")
    p.add_argument("--data", required=True, help="labelled folder, or a run's split.csv (its test rows are scored)")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/evaluate-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--seed", type=number(int), default=0, help="seed of the bootstrap and the randomisation test")
    add_shared_flags(p, cache=True)
    return p


def build_predict_parser() -> argparse.ArgumentParser:
    """`main.py predict`: probabilities for unlabelled images."""
    p = Parser(prog="main.py predict", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Pneumonia probability and label for images or folders of images.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--checkpoint", default=None, help="best.pt of a finished run (required)")
    p.add_argument("--out", default=None, help="output folder (default runs/predict-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--cam", action="store_true", help="also write a Grad-CAM overlay per image (always for a single image)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64, help="images per forward pass")
    p.add_argument("--workers", type=POSITIVE_INT, default=None, help="processes for decoding; None uses every core (one per 8 files at most)")
    add_shared_flags(p, cache=False)
    return p


def add_shared_flags(p: argparse.ArgumentParser, cache: bool) -> None:
    """Flags every command shares: device and Grad-CAM target, plus the decode cache and progress bars."""
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="where to run")
    p.add_argument("--cam-target", choices=["pneumonia", "normal"], default="pneumonia", help="class whose evidence Grad-CAM shows")
    if cache:
        p.add_argument("--cache-dir", default=default_cache_dir(), help="where decoded images are kept between runs")
        p.add_argument("--no-cache", action="store_true", help="decode every image afresh and keep nothing")
        p.add_argument("--quiet", action="store_true", help="no progress bars")


def default_cache_dir() -> str:
    """Where decoded images are kept: $XDG_CACHE_HOME/pneumonia-cnn, else ~/.cache/pneumonia-cnn."""
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pneumonia-cnn")


# ---------------------------------------------------------------- run folders and files
def write_csv(path: Path, header, rows) -> None:
    """A CSV file with a header row."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_data_files(run_dir: Path, ds: data.Dataset) -> None:
    """split.csv, skipped.csv and duplicates.csv: every file found is in exactly one of them."""
    write_csv(run_dir / "split.csv", ["path", "patient", "label", "split"],
              zip(ds.paths, ds.patients, [data.CLASSES[i] for i in ds.labels], ds.split))
    write_csv(run_dir / "skipped.csv", ["path", "reason"], ds.found.skipped)
    write_csv(run_dir / "duplicates.csv", ["path", "same_bytes_as"], ds.found.duplicates)


def read_checkpoint(path: str | None) -> dict:
    """Load a checkpoint safely, turning every failure into one UsageError sentence."""
    if not path:
        raise UsageError("no checkpoint given; pass --checkpoint runs/<run>/best.pt from a finished training run")
    if not Path(path).is_file():
        raise UsageError(f"checkpoint '{path}' does not exist; pass the best.pt of a finished run")
    try:
        return train.load_checkpoint(path)
    except Exception as err:  # pickle errors, refused globals, wrong format: all mean 'not ours'
        raise UsageError(f"'{path}' cannot be loaded safely as a checkpoint of this project "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None


# ---------------------------------------------------------------- train
# flags that change how a run executes, not what it computes: a resumed run takes them from the command line
RUNTIME_FLAGS = ("quiet", "device", "workers", "cache_dir", "no_cache", "compile")


def resolve_run(args, given: set[str] = frozenset()) -> tuple[argparse.Namespace, Path, dict | None]:
    """The run folder and settings: a new folder, or an interrupted one to resume with its saved settings.

    With --resume, the runtime flags given apply; any other flag given is refused, never silently dropped.
    """
    if not args.resume:
        return args, runs.create(args.out), None
    run_dir = Path(args.resume)
    saved = runs.interrupted_config(run_dir)
    refused = sorted(given - {"resume", *RUNTIME_FLAGS})
    if refused:
        flags = ", ".join("--" + f.replace("_", "-") for f in refused)
        raise UsageError(f"--resume continues '{run_dir}' with the settings in its config.json, so {flags} cannot "
                         f"change now; drop {'them' if len(refused) > 1 else 'it'}, or start a new run")
    runtime = {k: getattr(args, k) for k in RUNTIME_FLAGS}
    resumed = argparse.Namespace(**{**vars(args), **saved, **runtime, "resume": str(run_dir)})
    return resumed, run_dir, runs.read_checkpoint(run_dir / "last.pt")


def load_training_data(args, run_dir: Path) -> data.Dataset:
    """Phantoms for --demo, else the archive; a missing archive gives the download instructions."""
    root = args.data
    if args.demo:
        root = str(run_dir / "demo_data")
        if not Path(root).exists():
            demo.make_phantoms(root, patients_per_class=args.demo_patients, seed=args.seed)
    cache = None if args.no_cache or args.demo else args.cache_dir
    try:
        return data.load_dataset(root, args.image_size, args.split, args.seed, cache, args.workers, not args.quiet)
    except data.NoImagesFound:
        raise UsageError(DOWNLOAD_HELP.format(root=root)) from None


def configure_device(name: str, deterministic: bool = False) -> torch.device:
    """Resolve --device once and set the determinism / autotuning switches for it."""
    try:
        return train.setup_device(name, deterministic)
    except ValueError as err:
        raise UsageError(str(err)) from None


def run_train(args, given: set[str] = frozenset()) -> int:
    """Train (or resume), then evaluate and explain; returns the exit status."""
    args, run_dir, resume = resolve_run(args, given)
    device = configure_device(args.device, args.deterministic)
    generator = train.set_seed(args.seed)
    try:
        ds = load_training_data(args, run_dir)
    except (UsageError, data.DataError):
        if resume is None:
            runs.discard_if_empty(run_dir)
        raise
    if resume is None:
        runs.start(run_dir, run_config(args))
        data.write_split_files(run_dir, ds)
    print("config:", json.dumps({**run_config(args), "device": str(device)}))
    audit = data.audit(ds)
    print_data_summary(audit)
    train_set, val_set = ds.subset("train"), ds.subset("val")
    mean, std = fit_normalisation(ds.images[train_set[2]], args.image_size)
    prep = Preprocess(args.image_size, mean, std, augment_from_args(args), args.intensity)
    model = PneumoniaCNN(tuple(args.widths)).to(device, memory_format=torch.channels_last)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{count_flops(model, args.image_size) / 1e6:.0f} M multiply-adds per image")
    started = time.perf_counter()
    cfg = train.TrainConfig(args.epochs, args.batch_size, args.lr, args.pos_weight, args.patience, args.label_smoothing,
                            progress=not args.quiet, compile_model=args.compile)
    on_device = [(train.to_device(s[0], device), s[1].to(device)) for s in (train_set, val_set)]
    try:
        state = train.fit(model, *on_device, prep, cfg, run_dir, device, generator, resume)
    except train.Interrupted as err:
        print(f"\n{err} received: saved {run_dir / 'last.pt'}; continue with: python main.py --resume {run_dir}", file=sys.stderr)
        return 130
    if state.failure:
        print(f"error: {state.failure}", file=sys.stderr)
        if state.best_model is None:
            return 1
        print(f"evaluating the best checkpoint so far (epoch {state.best_epoch})", file=sys.stderr)
    scorer = evaluate.Scorer(model, prep, float("nan"), device, args.cam_target, args.seed)  # save_best sets the threshold
    save_best(args, run_dir, state, ds, scorer)
    evaluate.plot_history(state.history, state.best_epoch, run_dir / "training_curves.png")
    metrics = finish_train(args, run_dir, ds, scorer)
    metrics.update({"synthetic": bool(args.demo), "split": args.split,
                    "validation": {"auc": state.best_auc, "best_epoch": state.best_epoch,
                                   "threshold_policy": args.threshold, "threshold": scorer.threshold},
                    "data": audit, "training_failure": state.failure})
    runs.write_json(run_dir / "metrics.json", metrics)
    runs.write_json(run_dir / "timing.json", {"seconds_since_data_loaded": round(time.perf_counter() - started, 1),
                                              "epochs_run": state.epoch})
    banner = SYNTHETIC if args.demo else ""
    report.write_report(run_dir, "Pneumonia CNN" + (" - " + banner if banner else "") + f" - run {run_dir.name}",
                        run_config(args), metrics, banner)
    runs.finish(run_dir)
    print_summary(metrics, run_dir, banner)
    return 0


def print_data_summary(audit: dict) -> None:
    """Images and patients per split, duplicates, and skipped files counted by reason."""
    sizes = ", ".join(f"{s} {a['images']} ({a['patients']} patients)" for s, a in audit["splits"].items())
    reasons = "; ".join(f"{n} {why}" for why, n in audit["skipped_by_reason"].items())
    print(f"data: {audit['images']} images: {sizes}; {audit['duplicates_merged']} duplicates merged; "
          f"{audit['skipped']} files skipped" + (f" ({reasons}; see skipped.csv)" if reasons else ""))


def save_best(args, run_dir: Path, state, ds: data.Dataset, scorer: evaluate.Scorer) -> None:
    """Load the best weights, choose the threshold on validation (into `scorer`), and write best.pt.

    The validation predictions go to predictions_val.csv, so another threshold policy can be checked
    later without retraining.
    """
    scorer.model.load_state_dict(state.best_model)
    scorer.model.eval()
    images, labels, idx = ds.subset("val")
    y_true, y_prob = labels.numpy().astype(int), train.predict(scorer.model, images, scorer.prep, scorer.device)
    scorer.threshold = evaluate.choose_threshold(y_true, y_prob, args.threshold)
    evaluate.write_predictions(run_dir / "predictions_val.csv", [ds.paths[i] for i in idx],
                               [ds.patients[i] for i in idx], y_true, y_prob, scorer.threshold)
    runs.save_best(run_dir / "best.pt", model=scorer.model, weights=state.best_model, prep=scorer.prep,
                   threshold=scorer.threshold, policy=args.threshold, epoch=state.best_epoch, val_auc=state.best_auc,
                   config=run_config(args))


def run_config(args) -> dict:
    """The settings that define a run (what config.json holds)."""
    return {k: v for k, v in vars(args).items() if k not in ("resume", "quiet")}


def finish_train(args, run_dir: Path, ds: data.Dataset, scorer: evaluate.Scorer) -> dict:
    """Score the test split once, then each --external folder; returns the metrics."""
    idx = np.flatnonzero(ds.split == "test")
    masks = demo.load_masks(run_dir / "demo_data", [ds.paths[i] for i in idx], ds.images.shape[-1]) if args.demo else None
    note = ", test split" + (" [SYNTHETIC DEMO]" if args.demo else "")
    metrics, y_true, y_prob = evaluate.score_set(scorer, ds, idx, run_dir, note, masks)
    cache = decode_cache(args, scorer.prep.image_size)
    externals = evaluate.score_externals(scorer, args.external, cache, run_dir, progress=not args.quiet)
    if externals:
        metrics["external"] = {name: r[0]["test"] for name, r in externals.items()}
        metrics["external_gradcam"] = {name: r[0]["gradcam"] for name, r in externals.items()}
        curves = {"test split": (y_true, y_prob, metrics["test"]), **{n: (r[1], r[2], r[0]["test"]) for n, r in externals.items()}}
        evaluate.plot_roc_sets(curves, run_dir / "roc_all.png")
    return metrics


def decode_cache(args, image_size: int) -> ImageCache:
    """The decode cache the flags ask for (--cache-dir, or none with --no-cache) at the model's stored size."""
    return ImageCache(None if args.no_cache else args.cache_dir, cache_size(image_size))


def print_summary(metrics: dict, out: Path, banner: str = "") -> None:
    """The metric table and Grad-CAM checks on the terminal."""
    if banner:
        print(banner)
    print(evaluate.summary_table(metrics["test"], "Test split (threshold chosen on validation)"))
    if metrics.get("external"):
        print(evaluate.comparison_table({"test split": metrics["test"], **metrics["external"]}))
    g = metrics["gradcam"]
    print(f"Grad-CAM: randomised-model median Spearman {g['randomisation']['fully_randomised_median_spearman']:.3f}, "
          f"border mass {g['border']['border_mass_share']:.3f} (area {g['border']['border_area_share']:.2f})"
          + (f", pointing game {g['localisation']['pointing_game']:.3f}" if "localisation" in g else ""))
    print(f"wrote {out}/report.html and everything beside it")


# ---------------------------------------------------------------- evaluate and predict
def load_scorer(args) -> tuple[evaluate.Scorer, dict]:
    """The checkpoint's model, preprocessing and threshold on the chosen device."""
    ckpt = runs.read_checkpoint(args.checkpoint)
    device = configure_device(args.device)
    model, prep = runs.load_model(ckpt, device)
    return evaluate.Scorer(model, prep, ckpt["threshold"], device, args.cam_target, getattr(args, "seed", 0)), ckpt


def run_evaluate(args) -> int:
    """Score a checkpoint on a labelled folder or a run's test split, with every plot and the report."""
    scorer, _ = load_scorer(args)
    out = runs.create(args.out or str(Path(args.checkpoint).parent / ("evaluate-" + time.strftime("%Y%m%d-%H%M%S"))))
    cache = decode_cache(args, scorer.prep.image_size)
    ds = data.decode_found(data.find_labelled(args.data), cache, progress=not args.quiet)
    data.write_split_files(out, ds)
    metrics = evaluate.score_set(scorer, ds, np.flatnonzero(ds.split == "test"), out, note=f", {Path(args.data).name}")[0]
    metrics["data"] = data.audit(ds)
    metrics["evaluated"] = {"checkpoint": args.checkpoint, "data": args.data}
    runs.write_json(out / "metrics.json", metrics)
    report.write_report(out, f"Pneumonia CNN - evaluation of {args.checkpoint} on {args.data}", vars(args), metrics)
    print_summary(metrics, out)
    return 0


def run_predict(args) -> int:
    """Probabilities and labels at the stored threshold for images and folders; bad files are reported and skipped."""
    scorer, _ = load_scorer(args)
    files, skipped = data.list_files(args.paths)
    if not files:
        raise UsageError(f"no image files found in {', '.join(args.paths)}"
                         + (f" ({len(skipped)} other files skipped)" if skipped else ""))
    out = runs.create(args.out, prefix="predict-")
    images, all_prob, errors = train.predict_files(scorer.model, files, scorer.prep, scorer.device, args.batch_size,
                                                   args.workers, progress=len(files) > 1)
    good = [i for i, e in enumerate(errors) if e is None]
    batch, prob = torch.from_numpy(images[good]).unsqueeze(1), all_prob[good]
    rows = [[f, "", "", e] for f, e in zip(files, errors)]
    for k, i in enumerate(good):
        rows[i][1:3] = [f"{prob[k]:.6f}", data.CLASSES[int(prob[k] >= scorer.threshold)]]
    rows += [[f, "", "", why] for f, why in skipped]
    for f, _, _, e in rows:
        if e:
            print(f"skipped {f}: {e}", file=sys.stderr)
    runs.write_csv(out / "predictions.csv", ["path", "probability", "label", "error"], rows)
    explain = (args.cam or len(files) == 1) and good
    overlays = gradcam.save_overlays(scorer, batch, prob, [files[i] for i in good], out) if explain else []
    if len(files) == 1 and good:
        print(f"{files[0]}: probability of pneumonia {prob[0]:.4f} -> {rows[0][2]} "
              f"(threshold {scorer.threshold:.4f}); overlay: {overlays[0]}")
    else:
        print(f"{len(good)} of {len(files)} images scored; wrote {out / 'predictions.csv'}"
              + (f" and {len(overlays)} overlays" if overlays else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch to train, evaluate or predict; user errors print one sentence and return 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["evaluate"]:
            return run_evaluate(build_evaluate_parser().parse_args(argv[1:]))
        if argv[:1] == ["predict"]:
            return run_predict(build_predict_parser().parse_args(argv[1:]))
        parser = build_parser()
        args = parser.parse_args(argv)
        resolve_intensity_defaults(args)
        return run_train(args, parser.given(argv))
    except (UsageError, data.DataError, runs.RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk or a folder that became unwritable mid-run
        print(f"error: could not write '{err.filename or 'a file'}' ({err.strerror or err}); every file written "
              f"before it is complete, checkpoints included: free space or fix permissions, then --resume the run "
              f"folder or start again", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
