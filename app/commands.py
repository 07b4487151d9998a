"""The commands, wired step by step: training (with its scoring and explaining), evaluate, predict, calibrate and
export. Usage: `commands.RUN[name](parsed)`, called by main.py once the command line is accepted.

Each function here only connects the steps that live in data, train, evaluate, gradcam, report and the rest.
"""
import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from app import calibrate
import data
from lib import demo
from lib import distributed
import evaluate
from app import export
import gradcam
from lib import infer
import model
from lib import ood
from lib import precision
from app import report
from lib import runs
from lib import shortcut
from app import streaming
import train
from lib.cache import ImageCache
from lib.images import cache_size
from lib.labels import DEMO_WARNING, SERIES_PATTERN
from lib.names import say
from app.settings import Settings, UsageError, build_calibrate_parser
from lib.errors import Interrupted
from lib.transforms import Preprocess, fit_normalisation

DOWNLOAD_HELP = """No chest X-rays found in '{root}'.
Download "Chest X-Ray Images (Pneumonia)" from Kaggle (https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia),
unzip it into {root}/ so that it looks like
    {root}/chest_xray/train/NORMAL/*.jpeg   {root}/chest_xray/train/PNEUMONIA/*.jpeg
    {root}/chest_xray/val/...               {root}/chest_xray/test/...
(any depth works: every NORMAL/ and PNEUMONIA/ folder is used), then run `python main.py` again.
To try the tool without the download: `python main.py --demo`."""
SYNTHETIC = "SYNTHETIC DEMO DATA (generated phantoms): not real X-rays, not a medical result."


def on_main(step, ranks: distributed.Context):
    """`step()` on rank 0, its result (or its refusal, raised) on every rank."""
    result = None
    if ranks.main:
        try:
            result = step()
        except (UsageError, runs.RunError) as err:
            result = err
    result = distributed.broadcast(result, ranks)
    if isinstance(result, Exception):
        raise result
    return result


def resolve_run(s: Settings, ranks: distributed.Context) -> tuple[Settings, Path, dict | None]:
    """A new run folder, or the interrupted one in --resume with its saved settings and last.pt.

    Under torchrun rank 0 alone creates or checks the folder and sends the result, or its refusal, to the others.
    """
    def folder() -> tuple[Settings, Path]:
        if s.resume:
            return s.resumed(runs.interrupted_config(Path(s.resume))), Path(s.resume)
        return s, runs.create(s.out, inputs=[s.data, *s.external])
    s, run_dir = on_main(folder, ranks)
    return s, run_dir, runs.read_checkpoint(run_dir / "last.pt", "last") if s.resume else None


def choose_precision(requested: str, device: torch.device, make_model, image_size: int, batch_size: int, *,
                     train: bool = True, ranks: distributed.Context = distributed.Context(),
                     deterministic: bool = False, recorded: dict | None = None,
                     scored_at: str | None = None) -> precision.Choice:
    """--precision resolved once, by rank 0 under torchrun (every rank must compute alike), and said in one line;
    a resumed run takes the choice it `recorded` when it started; scoring a checkpoint, auto keeps the precision
    its threshold was chosen at (`scored_at`)."""
    def resolve() -> precision.Choice:
        try:
            return precision.Choice.recorded(recorded) if recorded else \
                precision.resolve(requested, device, make_model, image_size, batch_size, train=train,
                                  deterministic=deterministic, scored_at=scored_at)
        except ValueError as err:
            raise UsageError(str(err)) from None
    choice = on_main(resolve, ranks)
    say(f"precision: {choice.name} ({'as when the run started: ' if recorded else ''}{choice.reason})")
    return choice


def scoring_precision(requested: str, ckpt: dict, device: torch.device, batch_size: int = 64) -> precision.Choice:
    """--precision for scoring the checkpoint `ckpt`: auto keeps the precision its threshold was chosen at, and times
    a forward pass of its model where it records none."""
    return choose_precision(requested, device, lambda: model.build(ckpt["model_config"]),
                            ckpt["preprocess"]["image_size"], batch_size, train=False, scored_at=ckpt.get("precision"))


def configure_device(name: str, deterministic: bool = False) -> torch.device:
    """Resolve --device once and set the determinism / autotuning switches for it."""
    try:
        return train.setup_device(name, deterministic)
    except ValueError as err:
        raise UsageError(str(err)) from None


def decode_cache(cache_dir: str | None, image_size: int) -> ImageCache:
    """The decode cache for a model of `image_size` (images are stored 10% larger); None keeps nothing."""
    return ImageCache(cache_dir, cache_size(image_size))


def load_training_data(s: Settings, run_dir: Path, resumed: bool, ranks: distributed.Context) -> data.Dataset:
    """Phantoms for --demo, else the archive; a missing archive gives the download instructions."""
    root = str(run_dir / "demo_data") if s.demo else s.data
    if s.demo and not Path(root).exists() and ranks.local_rank == 0:
        demo.make_phantoms(root, patients_per_class=s.demo_patients, seed=s.seed)
    cache = None if s.no_cache or s.demo else s.cache_dir
    try:
        return data.load_dataset(root, s.image_size, s.split, s.seed, cache, workers=s.workers, progress=not s.quiet,
                                 task=s.task)
    except data.DataError as err:
        if not resumed and ranks.main:
            runs.discard_if_empty(run_dir)
        if isinstance(err, data.NoImagesFound):
            raise UsageError(DOWNLOAD_HELP.format(root=root)) from None
        raise


def run_train(s: Settings) -> int:
    """Train (or resume) in this process, or in this rank of a torchrun job; returns the exit status."""
    ranks = distributed.Context.from_env()
    device = configure_device(s.device, s.deterministic)
    if ranks.world > s.batch_size:
        raise UsageError(f"--batch-size {s.batch_size} is the global batch and must be at least the number of "
                         f"processes ({ranks.world})")
    try:
        device = distributed.start(ranks, device)
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:
        status = train_and_score(s, ranks, device)
    except BaseException as err:
        if ranks.active and isinstance(err, RuntimeError):  # most often a collective that lost a dead rank
            say(f"error: rank {ranks.rank} stopped: {str(err).splitlines()[0][:200]}\nIf another rank died, "
                  f"torchrun's report names it; `--resume` the run folder to continue from its last finished "
                  f"epoch.", file=sys.stderr)
        distributed.stop(ranks, finished=False)
        raise
    distributed.stop(ranks)
    return status


def train_and_score(s: Settings, ranks: distributed.Context, device: torch.device) -> int:
    """Train every member, then (rank 0 only) evaluate and explain; every rank trains on its share of each batch."""
    s, run_dir, resume = resolve_run(s, ranks)
    if not ranks.main:
        s = dataclasses.replace(s, quiet=True)  # no progress bars off rank 0 (stdout is silenced by distributed.start)
    with distributed.local_main_first(ranks):  # the first rank of each machine fills the decode cache
        ds = load_training_data(s, run_dir, resume is not None, ranks)
    if resume is None and ranks.main:
        runs.start(run_dir, s.config())
        data.write_split_files(run_dir, ds)
    print("config:", json.dumps({**s.config(), "device": str(device), "processes": ranks.world}))
    audit = data.audit(ds) if ranks.main else {}
    if ranks.main:
        say(report.data_summary(audit))
    prep = fit_preprocessing(s, ds)
    # a resumed run keeps the precision it started with (rank 0 decides, so only it reads the record)
    recorded = json.loads((run_dir / "config.json").read_text()).get("precision_choice") \
        if resume is not None and ranks.main else None
    choice = choose_precision(s.precision, device, lambda: network(s, device), s.image_size,
                              max(1, s.batch_size // ranks.world), ranks=ranks, deterministic=s.deterministic,
                              recorded=recorded)
    if resume is None and ranks.main:
        runs.write_json(run_dir / "config.json", {**s.config(), "precision_choice": choice.record()})
    started = time.perf_counter()
    on_device = [(train.to_device(images, device), labels.to(device))
                 for images, labels, _ in (ds.subset("train", s.task), ds.subset("val", s.task))]
    probe = layout_probe(ds)
    try:
        members = train_members(s, ranks, device, prep, on_device, run_dir=run_dir, resume=resume,
                                autocast=choice.dtype)
    except Interrupted as err:  # from training, once last.pt is saved: the message names the signal
        if ranks.main:
            say(f"\n{err} received: saved {run_dir / 'last.pt'}; continue with: python main.py --resume {run_dir}"
                  + (" (under torchrun, with any number of processes)" if ranks.active else ""), file=sys.stderr)
        return 130
    # every rank leaves the process group now: rank 0's scoring, Grad-CAM and --external decoding can outlast any
    # collective's timeout, and a peer waiting in a barrier would then be killed with rank 0 mid-report
    distributed.stop(ranks)
    if not ranks.main:
        return 0
    kept = [m for m in members if m["weights"] is not None]  # a member that failed in its first epoch kept nothing
    failure = training_failure(s, members, bool(kept))
    if not kept:
        runs.mark_unresumable(run_dir, f"training {failure} before any weights were kept")
        return 1
    predictor = infer.Predictor([network(s, device, m["weights"]) for m in kept], prep, device, tta=s.tta,
                                autocast=choice.dtype)
    train_images, _, train_idx = ds.subset("train")
    detector = ood.fit(predictor, train_images, ds.labels[train_idx].astype(int), ds.subset("val")[0], s.seed)
    threshold, cause_threshold, val_auc, validation = evaluate.choose_thresholds(
        predictor, detector, ds, s.threshold, run_dir / "predictions_val.csv")
    scorer = evaluate.Scorer(predictor, threshold, cam_target=s.cam_target, seed=s.seed,
                             cause_threshold=cause_threshold, detector=detector, probe=probe, groups=s.groups)
    save_best(s, run_dir, kept, ds, scorer, validation=validation, precision_name=choice.name)
    history = [h for m in members for h in m["history"]]
    evaluate.plot_history(history, run_dir / "training_curves.png")
    metrics = {**score_run(s, run_dir, ds, scorer), "synthetic": s.demo, "split": s.split, "data": audit,
               "validation": {"auc": val_auc, "threshold_policy": s.threshold, "threshold": scorer.threshold},
               **training_record(s, members, scorer, failure),
               "provenance": {"command": s.command, "versions": runs.versions(), "device": str(device),
                              "cpu": runs.cpu_name(), "precision": choice.record(), "processes": ranks.world}}
    runs.write_json(run_dir / "timing.json", {"seconds_since_data_loaded": round(time.perf_counter() - started, 1),
                                              "epochs_run": len(history)})
    write_results(s, run_dir, metrics)
    if s.demo:
        calibrate_demo_site(s, run_dir)
    return 0


def calibrate_demo_site(s: Settings, run_dir: Path) -> None:
    """--demo's last step: the run calibrated without labels to a phantom site from a shifted generator, with
    flat hashed names, as a user would calibrate to their own films (into calibrate-unlabelled/)."""
    site = demo.make_site(run_dir / "demo_site", films=5 * s.demo_patients, seed=s.seed + 1)
    args = build_calibrate_parser().parse_args([  # not parse_command, which refuses sub-commands under torchrun
        "--checkpoint", str(run_dir / "best.pt"), "--unlabelled", str(site), "--no-cache", "--device", s.device,
        "--out", str(run_dir / "calibrate-unlabelled"), *(["--quiet"] if s.quiet else [])])
    try:
        calibrate_unlabelled(args)
    except UsageError as err:  # a demo model too weak to show two classes in its scores: said, not a failure
        say(f"calibration to the demo's unlabelled site refused: {err}")


def training_record(s: Settings, members: list[dict], scorer: evaluate.Scorer, failure: str | None) -> dict:
    """metrics.json's account of the training: every member's summary, the detector, any failure."""
    return {"ood_detector": {"threshold": scorer.detector.threshold,
                             "validation_false_alarms": scorer.detector.validation_false_alarms},
            "training": {"keep": s.keep, "patience": s.patience, "ensemble": len(scorer.predictor.members),
                         "tta": s.tta, "members": [m["summary"] for m in members]},
            "training_failure": failure}


def training_failure(s: Settings, members: list[dict], kept: bool) -> str | None:
    """Why a member's training failed (said on stderr, with what is evaluated instead, if anything), or None."""
    failure = next((m["summary"]["stopped"] for m in members if m["summary"]["stopped"].startswith("failed")), None)
    if failure:
        say(f"error: {'member ' + str(len(members)) + ': ' if s.ensemble > 1 else ''}{failure}", file=sys.stderr)
        if kept:
            say(f"evaluating what was kept: {members[-1]['summary']['kept'] or 'the members before it'}",
                file=sys.stderr)
        else:
            say("nothing was kept, so nothing is evaluated and the run cannot be resumed: start a new run (with a "
                "lower --lr if the loss diverged)", file=sys.stderr)
    return failure


def layout_probe(ds: data.Dataset) -> shortcut.Probe:
    """The shortcut audit's layout probe, fitted on the training split only, as the model is: validation and test
    never reach it. Refitted alike on --resume (it is deterministic)."""
    train_images, _, train_idx = ds.subset("train")
    return shortcut.fit_probe(train_images, ds.labels[train_idx].astype(int), [ds.patients[i] for i in train_idx])


def train_members(s: Settings, ranks: distributed.Context, device: torch.device, prep: Preprocess, sets: list,
                  *, run_dir: Path, resume: dict | None, autocast: torch.dtype | None = None) -> list[dict]:
    """Train the members one after the other (one for a single model), each from its own seed; returns each
    member's kept weights, summary and history. A resumed run reads its finished members and continues the
    member its last.pt holds. Training stops at a member that fails; what it kept is still returned."""
    done = runs.read_members(run_dir) if resume is not None else []
    first = len(done)
    for member in range(first, s.ensemble):
        seed = train.member_seed(s.seed, member)
        train.set_seed(seed)  # the member's initial weights and dropout
        net = network(s, device)
        if member == first:
            say(f"model: {s.arch}, {sum(p.numel() for p in net.parameters()):,} parameters, "
                f"{model.count_flops(net, s.image_size) / 1e6:.0f} M multiply-adds per image")
        if s.ensemble > 1:
            say(f"ensemble member {member + 1} of {s.ensemble} (seed {seed})")
        state_resume = resume if member == first and resume is not None and resume["state"].get("member", 0) == member \
            else None
        earlier = [h for m in done for h in m["history"]]
        cfg = train.TrainConfig.of(s, member, device, ranks, autocast)
        state = train.fit(net, *sets, prep, cfg, run_dir=run_dir, resume=state_resume, earlier=earlier)
        done.append({"weights": state.kept_model, "summary": state.summary, "history": state.history})
        if state.kept_model is None or state.failure:
            break
        if ranks.main:
            runs.save_member(run_dir, member, **done[-1])
    return done


def fit_preprocessing(s: Settings, ds: data.Dataset) -> Preprocess:
    """The preprocessing, its normalisation fitted on the training split."""
    mean, std, grey_range = fit_normalisation(ds.images.take(ds.split == "train").chunks(), s.image_size)
    return Preprocess(image_size=s.image_size, mean=mean, std=std, augment=s.augmentation(), intensity=s.intensity,
                      grey_range=grey_range)


def network(s: Settings, device: torch.device, weights: dict | None = None) -> model.Network:
    """The network the settings describe: freshly initialised from the current seed to be trained, or holding kept
    `weights` in eval mode, to be scored and explained (Grad-CAM keeps the mode it is given)."""
    net = model.build(s.model_config())
    if weights is not None:
        net.load_state_dict(weights)
        net.eval()
    return model.place(net, device)


def write_results(s: Settings, run_dir: Path, metrics: dict) -> None:
    """metrics.json, MODEL_CARD.md and report.html; then the run is complete and its summary printed."""
    runs.write_json(run_dir / "metrics.json", metrics)
    banner = SYNTHETIC if s.demo else ""
    report.write_model_card(run_dir, s.config(), metrics, banner)
    report.write_report(run_dir, "Pneumonia CNN" + (" - synthetic demo" if banner else "") + f" - run {run_dir.name}",
                        s.config(), metrics, banner)
    runs.finish(run_dir)
    say(report.terminal_summary(metrics, run_dir, banner))


def save_best(s: Settings, run_dir: Path, members: list[dict], ds: data.Dataset, scorer: evaluate.Scorer,
              *, validation: dict, precision_name: str) -> None:
    """best.pt: the kept members, their thresholds, detector and probe, the validation scores and the training and
    validation films' hashes (for calibrating to a site without labels)."""
    seen = [h for h, split in zip(ds.hashes, ds.split) if split in ("train", "val")]
    runs.save_best(run_dir / "best.pt", model_config=scorer.predictor.members[0].config,
                   members=[m["weights"] for m in members], prep=scorer.predictor.prep,
                   thresholds={"threshold": scorer.threshold, "cause_threshold": scorer.cause_threshold},
                   policy=s.threshold, tta=s.tta, training=[m["summary"] for m in members], ood=scorer.detector.state(),
                   probe=scorer.probe.state(), validation=validation, seen=calibrate.short_hashes(seen),
                   config=s.config(), precision=precision_name)


def score_run(s: Settings, run_dir: Path, ds: data.Dataset, scorer: evaluate.Scorer) -> dict:
    """Score the test split once, then each --external folder; returns the metrics."""
    idx = np.flatnonzero(ds.split == "test")
    masks = demo.load_masks(run_dir / "demo_data", [ds.paths[i] for i in idx], ds.images.shape[-1]) if s.demo else None
    note = ", test split" + (" [SYNTHETIC DEMO]" if s.demo else "")
    test = evaluate.score_set(scorer, ds, idx, run_dir, note, masks=masks, show=not s.quiet)
    cache = decode_cache(None if s.no_cache else s.cache_dir, s.image_size)
    externals = evaluate.score_externals(scorer, s.external, cache, run_dir, show=not s.quiet)
    return evaluate.collect_sets(test, externals, run_dir / "roc_all.png")


def load_scorer(args, device: torch.device | None = None) -> evaluate.Scorer:
    """The checkpoint's predictor and thresholds on `device` (else --device), at the chosen precision."""
    ckpt = runs.read_checkpoint(args.checkpoint)
    device = device or configure_device(args.device)
    choice = scoring_precision(args.precision, ckpt, device, getattr(args, "batch_size", 64))
    predictor = infer.load_predictor(ckpt, device, choice.dtype)
    if args.cam_target in ("bacterial", "viral") and predictor.outputs == 1:
        raise UsageError(f"--cam-target {args.cam_target} needs a model trained with --task cause; "
                         f"'{args.checkpoint}' tells pneumonia from normal only")
    return evaluate.Scorer(predictor, threshold=ckpt["threshold"], cam_target=args.cam_target,
                           seed=getattr(args, "seed", 0), cause_threshold=ckpt.get("cause_threshold", 0.5),
                           detector=load_detector(ckpt), groups=getattr(args, "groups", SERIES_PATTERN),
                           probe=shortcut.Probe.from_state(ckpt["probe"]) if ckpt.get("probe") else None,
                           synthetic=bool(ckpt.get("config", {}).get("demo")))


def load_detector(ckpt: dict) -> ood.Detector | None:
    """The checkpoint's out-of-distribution detector, or None for one made before it existed."""
    return ood.Detector.from_state(ckpt["ood"]) if ckpt.get("ood") else None


def run_evaluate(args) -> int:
    """Score a checkpoint on a labelled folder or a run's test split, with every plot and the report."""
    scorer = load_scorer(args)
    out = runs.create(args.out, "evaluate-", Path(args.checkpoint).parent, inputs=[args.data])
    with runs.partial(out, "evaluate"):
        cache = decode_cache(None if args.no_cache else args.cache_dir, scorer.predictor.prep.image_size)
        ds = data.decode_found(data.find_labelled(args.data), cache, progress=not args.quiet)
        data.write_split_files(out, ds)
        name = "test split" if Path(args.data).suffix == ".csv" else Path(args.data).name  # a run's split.csv
        block = evaluate.score_set(scorer, ds, np.flatnonzero(ds.split == "test"), out, note=f", {name}",
                                   show=not args.quiet)[0]
        metrics = {"schema": runs.METRICS_SCHEMA, "sets": {name: {"kind": "evaluated", "folder": ".", **block}},
                   "data": data.audit(ds), "evaluated": {"checkpoint": args.checkpoint, "data": args.data}}
        runs.write_json(out / "metrics.json", metrics)
        banner = DEMO_WARNING if scorer.synthetic else ""
        report.write_report(out, f"Pneumonia CNN - evaluation of {args.checkpoint} on {args.data}", vars(args), metrics,
                            banner)
        say(report.terminal_summary(metrics, out, banner))
    return 0


def run_predict(args) -> int:
    """Probabilities and calls at the stored threshold for images and folders of any size, every input checked; bad
    files are reported and skipped, and with --strict so are flagged ones. Scored a chunk at a time (app/streaming.py),
    shared between the processes of a torchrun job, continued by --resume."""
    ranks = distributed.Context.from_env()
    args, started = resumed_predict(args) if args.resume else (args, None)
    try:
        device = distributed.start(ranks, configure_device(args.device))
    except ValueError as err:
        raise UsageError(str(err)) from None
    finished = False
    try:
        scorer = load_scorer(args, device)
        scorer.predictor.batch_size = args.batch_size
        files, skipped, out = on_main(lambda: predict_inputs(args, started), ranks)
        options = streaming.Options(args.workers, args.strict, args.cam or len(files) == 1, show=not args.quiet)
        if ranks.main:
            with runs.partial(out, "predict", again=f"python main.py predict --resume {out}"):
                if not args.resume:
                    runs.write_json(out / streaming.STATE, {"settings": {k: v for k, v in vars(args).items()
                                                                         if k not in ("resume", "quiet")},
                                                            "files": len(files),
                                                            "listing": streaming.listing_digest(files)})
                rows = streaming.score_files(scorer, files, skipped, out, ranks, options=options)
                report_predictions(scorer, rows, files, out, args, cam=options.cam)
                streaming.remove_parts(out)
        else:
            streaming.score_files(scorer, files, skipped, out, ranks, options=options)
        finished = True
    finally:
        distributed.stop(ranks, finished)
    return 0


def resumed_predict(args) -> tuple[argparse.Namespace, dict]:
    """The settings an interrupted predict started with, with --quiet and --workers as given now, and its folder's
    predict.json (the listing its rows follow)."""
    out = Path(args.resume)
    state = out / streaming.STATE
    if not state.is_file():
        raise UsageError(f"'{out}' is not the output folder of a predict (it has no {streaming.STATE}); give the "
                         f"folder predict was writing to")
    if not (out / runs.MARKER).exists():
        raise UsageError(f"the predict in '{out}' has finished: its predictions.csv is complete")
    try:
        started = json.loads(state.read_text())
        saved = started["settings"]
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"'{state}' cannot be read ({type(err).__name__}); start a new predict") from None
    return argparse.Namespace(**{**saved, "resume": str(out), "quiet": args.quiet,
                                 "workers": args.workers if args.workers is not None else saved["workers"]}), started


def predict_inputs(args, started: dict | None) -> tuple[list[str], list[tuple[str, str]], Path]:
    """The files to score, those the folder rules skip, and the output folder: a new one, or that of --resume,
    whose files must be the ones it `started` with (its predict.json)."""
    files, skipped = data.list_files(args.paths)
    if not files:
        raise UsageError(f"no image files found in {', '.join(args.paths)}"
                         + (f" ({len(skipped)} other files skipped)" if skipped else ""))
    if not args.resume:
        return files, skipped, runs.create(args.out, "predict-", inputs=args.paths)
    if started["listing"] != streaming.listing_digest(files):
        raise UsageError(f"{', '.join(args.paths)} now hold{'s' if len(args.paths) == 1 else ''} other files than "
                         f"when '{args.resume}' started ({started['files']} then, {len(files)} now): its rows would "
                         f"not match; start a new predict")
    return files, skipped, Path(args.resume)


def report_predictions(scorer: evaluate.Scorer, rows: evaluate.Predictions, files: list[str], out: Path, args,
                       *, cam: bool) -> None:
    """predict's answer on the terminal and in report.html (a card per film, of a bounded gallery for many), and
    the flagged thumbnails; the films shown are read again, since no image is kept."""
    if scorer.detector is None:
        say("note: this checkpoint has no out-of-distribution detector (made before project 1.3): only the colour, "
            "header and grey-level checks ran", file=sys.stderr)
    again = streaming.Reread(scorer.predictor, files)
    evaluate.draw_flagged(rows, again, scorer.predictor.prep, out / "ood_flagged.png")
    banner = DEMO_WARNING if scorer.synthetic else ""
    sections = report.page_sections(rows, scorer.threshold)
    shown = sorted(i for i in set().union(*sections.values()) if i < len(files))
    images, errors = again.images(shown)
    overlays = [gradcam.overlay_path(out, i, files[i]) for i in shown] if cam else [None] * len(shown)
    pictures = {i: (report.png_uri(image), overlay)
                for i, image, error, overlay in zip(shown, images, errors, overlays) if error is None}
    report.write_predict_report(out, f"Predictions of {Path(args.checkpoint).parent.name or args.checkpoint}", rows,
                                scorer.threshold, sections, pictures=pictures, banner=banner)
    say(report.predict_answer(rows, scorer.threshold, out / "predictions.csv", banner))
    drawn = int((rows.prob == rows.prob).sum()) if cam else 0
    say(f"page: {out / 'report.html'}" + (f"; {drawn} Grad-CAM overlays in {out}" if drawn else ""))


def run_calibrate(args) -> int:
    """Choose a site's threshold (after AdaBN with --adapt-bn) on its labelled sample; write a new checkpoint beside
    the source, which is never touched, with the before/after figures and what the site should expect."""
    if args.unlabelled:
        return calibrate_unlabelled(args)
    ckpt = runs.read_checkpoint(args.checkpoint)
    device = configure_device(args.device)
    choice = scoring_precision(args.precision, ckpt, device)
    store = decode_cache(None if args.no_cache else args.cache_dir, ckpt["preprocess"]["image_size"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = calibrate.site_sample(args.data, store, show=not args.quiet)
        except (calibrate.CalibrationError, data.DataError) as err:
            raise UsageError(str(err)) from None
    warning = "; ".join(str(w.message) for w in caught if issubclass(w.category, UserWarning)) or None
    if warning:
        say(f"warning: {warning}", file=sys.stderr)
    out = runs.create(args.out, "calibrate-", Path(args.checkpoint).parent, inputs=[args.data, *(args.adapt_bn or [])])
    with runs.partial(out, "calibrate"):
        site = calibrate.fit_site(args, ckpt, ds, lambda: infer.load_predictor(ckpt, device, choice.dtype), warning)
        metrics = site.metrics
        runs.save_calibrated(out / "best.pt", ckpt, [m.state_dict() for m in site.predictor.members], site.threshold,
                             site.cause_threshold, metrics=metrics, precision=choice.name)
        data.write_split_files(out, ds)
        evaluate.write_predictions(out / "predictions.csv", evaluate.labelled_predictions(
            site.predictor, load_detector(ckpt), ds, np.arange(len(site.prob)), site.prob, classes=None,
            features=None), site.threshold)
        runs.write_json(out / "metrics.json", metrics)
        report.write_calibration_report(out, f"Site calibration of {args.checkpoint} on {args.data}", metrics)
        report.write_calibrated_card(out, Path(args.checkpoint).parent / "MODEL_CARD.md", metrics)
        say(report.calibration_table(metrics).text())
        if metrics["calibration"]["shortfall"]:
            say(f"note: {metrics['calibration']['shortfall']}")
        say(f"wrote {out / 'best.pt'} (score with it as with any best.pt), {out / 'report.html'} and MODEL_CARD.md")
    return 0


def calibrate_unlabelled(args) -> int:
    """Choose a site's threshold from its unlabelled films' scores (after AdaBN with --adapt-bn); write a new
    checkpoint beside the source, with what the distribution of the scores lets the site expect."""
    ckpt = runs.read_checkpoint(args.checkpoint)
    device = configure_device(args.device)
    choice = scoring_precision(args.precision, ckpt, device)
    scorer = evaluate.Scorer(infer.load_predictor(ckpt, device, choice.dtype), ckpt["threshold"],
                             detector=load_detector(ckpt))
    films = calibrate.site_films(args.unlabelled, scorer, ckpt.get("seen"), show=not args.quiet)
    if ckpt.get("seen") is None:
        say("note: this checkpoint predates the list of its training films: films it was trained on cannot be left "
            "out", file=sys.stderr)
    try:
        site = calibrate.fit_unlabelled(args, ckpt, films, lambda: infer.load_predictor(ckpt, device, choice.dtype))
    except calibrate.CalibrationError as err:
        raise UsageError(str(err)) from None
    out = runs.create(args.out, "calibrate-", Path(args.checkpoint).parent, inputs=list(args.unlabelled))
    with runs.partial(out, "calibrate"):
        metrics = site.metrics
        runs.save_calibrated(out / "best.pt", ckpt, [m.state_dict() for m in site.predictor.members], site.threshold,
                             ckpt.get("cause_threshold"), metrics=metrics, precision=choice.name)
        rows = films.rows
        rows.prob[films.used] = site.prob  # after AdaBN, the adapted model's scores
        evaluate.write_predictions(out / "predictions.csv", rows, site.threshold)
        runs.write_json(out / "metrics.json", metrics)
        report.write_calibration_report(out, f"Site calibration of {args.checkpoint} without labels", metrics)
        report.write_calibrated_card(out, Path(args.checkpoint).parent / "MODEL_CARD.md", metrics)
        say(report.unlabelled_table(metrics).text())
        say(f"note: {report.UNLABELLED_CAVEAT}")
        say(f"wrote {out / 'best.pt'} (meant for the site of {', '.join(args.unlabelled)}; score with it as with any "
            f"best.pt), {out / 'report.html'} and MODEL_CARD.md")
    return 0


def run_export(args) -> int:
    """model.onnx and model.json for a checkpoint, for runtimes without PyTorch."""
    prepared = export.prepare(args.checkpoint)  # every refusal before a folder is made
    out = runs.create(args.out, "export-", Path(args.checkpoint).parent)
    with runs.partial(out, "export"):
        meta = export.write(args.checkpoint, out, prepared)
    say(f"wrote {out / 'model.onnx'} ({meta['export']['bytes'] / 1e6:.1f} MB, {meta['export']['seconds']:.0f} s) "
        f"and model.json; score without PyTorch: python examples/onnx_predict.py IMAGES --model {out}")
    return 0


RUN = {"train": run_train, "evaluate": run_evaluate, "predict": run_predict, "calibrate": run_calibrate,
       "export": run_export}
