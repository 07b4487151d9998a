"""Site calibration on half A of the official test: the expected rates `main.py calibrate` promises, with and
without AdaBN, for the default model and a 3-member ensemble of each seed; and AdaBN under label shift.

Usage: `python benchmarks/site_calibration.py [--runs benchmarks/results/generalisation] [--seeds 5]`.
The models are the members of generalisation.py's "ensemble 5" runs (or "ensemble 3" for a seed without
one): member 1 is the default model of its seed and members 1-3 its `--ensemble 3` (each member trains
from seed + 1000 m whatever the ensemble's size).
Every calibration is a real `main.py calibrate` run on a checkpoint of those members. Results go to --out.

Label shift: AdaBN from a subsample of half A with 20% pneumonia (labels used only to draw it), scored on
the rest of half A at the model's own validation threshold, against no adaptation and against AdaBN
from a subsample of the same size with half A's own mix; each as shipped (the early layers only) and
with every layer adapted.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib import cache  # noqa: E402
from app import calibrate  # noqa: E402
import data  # noqa: E402
import generalisation  # noqa: E402  (beside this script)
import evaluate  # noqa: E402
from lib import infer  # noqa: E402
from lib import runs  # noqa: E402
from lib.cache import ImageCache  # noqa: E402
from lib.images import cache_size  # noqa: E402
from app.settings import default_cache_dir  # noqa: E402

SHARED = Path(os.environ.get("PNEUMONIA_SHARED_DATA", ROOT.parent / "shared" / "data"))
MODELS = {"default": 1, "ensemble 3": 3}  # name -> first members of the ensemble run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", default=str(ROOT / "benchmarks" / "results" / "generalisation"),
                   help="generalisation.py's --out: its ensemble runs, one seedN/ per seed")
    p.add_argument("--site", default=str(SHARED / "official_test_a_224sq"), help="the site's labelled folder")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "site_calibration"), help="results folder")
    return p.parse_args(argv)


def source_checkpoint(run: Path, members: int, path: Path) -> Path:
    """A best.pt holding the run's first `members` members (and its validation threshold)."""
    if not path.exists():
        ckpt = runs.load_checkpoint(run / "best.pt")
        ckpt["members"], ckpt["training"] = ckpt["members"][:members], ckpt["training"][:members]
        ckpt.pop("ood", None)  # its distance threshold belongs to all the run's members together
        if members < len(runs.load_checkpoint(run / "best.pt")["members"]):  # its own threshold, on validation
            ckpt["threshold"] = validation_threshold(run, ckpt)
        runs.save_checkpoint(path, {k: v for k, v in ckpt.items() if k not in ("format", "versions")})
    return path


def validation_threshold(run: Path, ckpt: dict) -> float:
    """The threshold the run's policy chooses on its validation split for these members."""
    predictor = infer.load_predictor(ckpt, torch.device("cpu"))
    size = cache_size(predictor.prep.image_size)
    paths, y = generalisation.split_rows(run)["val"]
    images = np.array(cache.load_images(paths, size, ImageCache(default_cache_dir(), size), show=False)[0])
    prob = predictor.predict(torch.from_numpy(images).unsqueeze(1))[0]
    return evaluate.choose_threshold(y, prob, json.loads((run / "config.json").read_text())["threshold"])


def calibrated(args, source: Path, out: Path, adapt: bool) -> dict:
    """metrics.json of `main.py calibrate` on the site (run once, then read)."""
    if not (out / "metrics.json").exists():
        cmd = [sys.executable, str(ROOT / "main.py"), "calibrate", "--checkpoint", str(source), "--data", args.site,
               "--out", str(out), "--quiet", *(["--adapt-bn"] if adapt else [])]
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return json.loads((out / "metrics.json").read_text())


def label_shift(args, source: Path, seed: int) -> dict:
    """AUC, sensitivity and specificity on the rest of the site at the source threshold: no adaptation, AdaBN from a
    20%-pneumonia subsample, AdaBN from a same-size subsample with the site's own mix."""
    ckpt = runs.load_checkpoint(source)
    store = ImageCache(default_cache_dir(), cache_size(ckpt["preprocess"]["image_size"]))
    ds = data.decode_found(data.find_labelled(args.site), store, progress=False)
    rng = np.random.default_rng(seed)
    patients = np.array(ds.patients)
    y = ds.labels.astype(int)
    normal_p = rng.permutation(np.unique(patients[y == 0]))
    pneu_p = rng.permutation(np.unique(patients[y == 1]))
    n_normal = len(normal_p) // 2  # half the healthy children, and pneumonias to make them 20% of the subsample
    n_pneu = max(1, round(n_normal * 0.25))
    share = len(pneu_p) / (len(pneu_p) + len(normal_p))
    mixed_pneu = round((n_normal + n_pneu) * share)
    subsets = {"20% pneumonia": set(normal_p[:n_normal]) | set(pneu_p[:n_pneu]),
               "site's own mix": set(normal_p[:n_normal + n_pneu - mixed_pneu]) | set(pneu_p[:mixed_pneu])}
    rest = ~np.isin(patients, list(subsets["20% pneumonia"] | subsets["site's own mix"]))
    images = np.asarray(ds.images)
    result = {"rest images": int(rest.sum()), "rest pneumonia share": float(y[rest].mean())}
    for name, chosen in {"no adaptation": None, **subsets}.items():
        for every_layer, how in ((False, "early layers (shipped)"), (True, "every layer")):
            predictor = infer.load_predictor(ckpt, torch.device("cpu"))
            if chosen is not None:
                picked = np.isin(patients, list(chosen))
                calibrate.adapt_batchnorm(predictor, images[picked], every_layer)
                result[f"{name} pneumonia share"] = float(y[picked].mean())
            prob = predictor.predict(torch.from_numpy(images[rest]).unsqueeze(1))[0]
            m = evaluate.binary_metrics(y[rest], prob, ckpt["threshold"])
            result[name if chosen is None else f"{name}, {how}"] = {k: m[k] for k in ("auc", "sensitivity",
                                                                                     "specificity", "accuracy")}
            if chosen is None:
                break
    return result


def mean_sd(values) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    return f"{statistics.mean(values):.3f}±{statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, shifts = {}, []
    for seed in range(args.seeds):
        run = generalisation.source_run(Path(args.runs), seed, max(MODELS.values()))
        if run is None:
            print(f"seed {seed}: no finished ensemble run in {args.runs}; skipped")
            continue
        for name, members in MODELS.items():
            source = source_checkpoint(run, members, out / f"seed{seed}-{members}.pt")
            for adapt in (False, True):
                m = calibrated(args, source, out / f"seed{seed}-{members}{'-adabn' if adapt else ''}", adapt)
                rows.setdefault((name, adapt), []).append(m)
                e = m["expected"]
                print(f"seed {seed} {name:10s} adapt-bn {adapt!s:5s}: before spec {m['before']['specificity']:.3f} "
                      f"sens {m['before']['sensitivity']:.3f} | expected sens {e['sensitivity']:.3f} "
                      f"[{e['ci95']['sensitivity'][0]:.3f}, {e['ci95']['sensitivity'][1]:.3f}] spec "
                      f"{e['specificity']:.3f} "
                      f"[{e['ci95']['specificity'][0]:.3f}, {e['ci95']['specificity'][1]:.3f}] acc {e['accuracy']:.3f}",
                      flush=True)
        shifts.append(label_shift(args, out / f"seed{seed}-1.pt", seed))
    print("\nmean ± sd over seeds; 'before': the model as trained, at its validation threshold, on the whole site;"
          " 'expected': out-of-bag bootstrap after calibration")
    for (name, adapt), ms in rows.items():
        print(f"{name:10s} adapt-bn {adapt!s:5s} n={len(ms)}: before sens "
              f"{mean_sd([m['before']['sensitivity'] for m in ms])} "
              f"spec {mean_sd([m['before']['specificity'] for m in ms])} | expected sens "
              f"{mean_sd([m['expected']['sensitivity'] for m in ms])} spec "
              f"{mean_sd([m['expected']['specificity'] for m in ms])}"
              f" acc {mean_sd([m['expected']['accuracy'] for m in ms])} | site AUC after "
              f"{mean_sd([m['after']['auc'] for m in ms])}")
    print("\nlabel shift (default models; the rest of the site, at the validation threshold)")
    for name in ("no adaptation", *(f"{sub}, {how}" for sub in ("20% pneumonia", "site's own mix")
                                     for how in ("early layers (shipped)", "every layer"))):
        print(f"{name:15s}: " + ", ".join(f"{k} {mean_sd([s[name][k] for s in shifts])}"
                                          for k in ("auc", "sensitivity", "specificity", "accuracy")))
    (out / "summary.json").write_text(json.dumps({"label_shift": shifts}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
