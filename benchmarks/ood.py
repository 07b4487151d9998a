"""How well `predict` knows when an input is not a frontal pediatric chest film: wrong inputs flagged, real films
left alone, and what the checks cost.

Usage: `python benchmarks/ood.py RUN [--films DIR] [--out DIR]` (RUN: a training run folder with best.pt and
split.csv; a checkpoint made before the detector existed gets one fitted here on its own training and
validation splits, as training fits it).

The wrong inputs are built offline from what is at hand: photographs and pictures that ship with
matplotlib and scikit-learn (and their grey versions), an MRI slice and maps from matplotlib's sample
data, generated blanks, noise, text pages and patterns, and real films from --films turned, flipped,
inverted or cropped to a corner. Each kind is scored through `main.py predict`; the real films of
--films and of the run's pooled test split through `main.py evaluate`. Printed: per kind the share
flagged and the AUROC of the detector's distance against the real films; the false alarms on the real
films; and the checks' cost against predict's time per image, measured side by side.
"""
import argparse
import csv
import gzip
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import sklearn
from PIL import Image, ImageDraw, ImageFont
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
from lib import infer  # noqa: E402
from lib import ood  # noqa: E402
from lib import runs  # noqa: E402
from lib.cache import ImageCache, ImageRows, TensorRows, load_images  # noqa: E402
from lib.images import cache_size  # noqa: E402
from app.settings import default_cache_dir  # noqa: E402

SHARED = Path(os.environ.get("PNEUMONIA_SHARED_DATA", ROOT.parent / "shared" / "data"))
SAMPLES = Path(matplotlib.get_data_path()) / "sample_data"
SK_IMAGES = Path(sklearn.__file__).parent / "datasets" / "images"
PHOTOS = [SAMPLES / "grace_hopper.jpg", SK_IMAGES / "china.jpg", SK_IMAGES / "flower.jpg",
          SAMPLES / "Minduka_Present_Blue_Pack.png", SAMPLES / "logo2.png"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="training run folder (best.pt, split.csv)")
    p.add_argument("--films", default=str(SHARED / "official_test_a_224sq"), help="real films: false alarms, and "
                                                                                  "the source of the transformed ones")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ood"), help="results folder")
    p.add_argument("--per-kind", type=int, default=12, help="transformed films per kind")
    return p.parse_args(argv)


def crops(image: Image.Image, n: int = 4) -> list[Image.Image]:
    """The picture and a few crops of it: more inputs of the same kind."""
    w, h = image.size
    boxes = [(0, 0, w // 2, h // 2), (w // 2, h // 2, w, h), (w // 4, h // 4, 3 * w // 4, 3 * h // 4), (0, h // 3, w,
                                                                                                        h)]
    return [image] + [image.crop(b) for b in boxes[:n]]


def photographs() -> dict[str, list[Image.Image]]:
    """Colour photographs and pictures, and the same in grey (a grey photo is a harder case than a colour one)."""
    colour = [c for p in PHOTOS if p.exists() for c in crops(Image.open(p).convert("RGB"))]
    return {"colour photograph or picture": colour, "grey photograph or picture": [c.convert("L") for c in colour]}


def other_imaging() -> dict[str, list[Image.Image]]:
    """Other grey images: an MRI slice of a head, a microscopy image, elevation maps (matplotlib's sample data)."""
    out = []
    mri = SAMPLES / "s1045.ima.gz"
    if mri.exists():
        slice_ = np.frombuffer(gzip.open(mri).read(), np.uint16).reshape(256, 256).astype(np.float32)
        out += [Image.fromarray(np.uint8(255 * slice_ / slice_.max())).rotate(a) for a in (0, 90, 180)]
    membrane = SAMPLES / "membrane.dat"
    if membrane.exists():
        m = np.fromfile(membrane, dtype=np.float32)
        side = int(np.sqrt(len(m)))
        m = m[:side * side].reshape(side, side)
        out.append(Image.fromarray(np.uint8(255 * (m - m.min()) / (np.ptp(m) or 1))).resize((256, 256)))
    for name in ("topobathy.npz", "jacksboro_fault_dem.npz"):
        if (SAMPLES / name).exists():
            z = np.load(SAMPLES / name)
            z = z[z.files[0]].astype(np.float32)
            out.append(Image.fromarray(np.uint8(255 * (z - z.min()) / (np.ptp(z) or 1))))
    return {"other imaging or maps": out}


def generated(rng: np.random.Generator) -> dict[str, list[Image.Image]]:
    """Blanks, noise, text pages and patterns."""
    blanks = [Image.new("L", (600, 600), g) for g in (0, 40, 128, 220, 255)] + \
             [Image.new("RGB", (800, 600), c) for c in ((135, 206, 235), (200, 30, 30), (30, 160, 60))]
    noise = [Image.fromarray(rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)),
             Image.fromarray(rng.integers(0, 256, (400, 400), dtype=np.uint8)),
             Image.fromarray(np.uint8(np.clip(rng.normal(128, 40, (400, 400)), 0, 255))),
             Image.fromarray(np.uint8(np.clip(rng.normal(90, 15, (400, 400)), 0, 255))),
             Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).resize((400, 400), Image.BICUBIC),
             Image.fromarray(np.uint8(255 * (rng.random((400, 400)) > 0.5)))]
    font = ImageFont.load_default()
    text = []
    for k in range(6):
        page = Image.new("L", (850, 1100), 255 if k % 2 == 0 else 235)
        draw = ImageDraw.Draw(page)
        for line in range(60):
            words = " ".join("".join(chr(97 + int(c)) for c in rng.integers(0, 26, rng.integers(2, 9)))
                             for _ in range(12))
            draw.text((40, 20 + 17 * line), words, fill=0 if k < 4 else 60, font=font)
        text.append(page)
    yy, xx = np.mgrid[0:400, 0:400]
    patterns = [Image.fromarray(np.uint8(255 * (((yy // s) + (xx // s)) % 2))) for s in (10, 40)] + \
               [Image.fromarray(np.uint8(255 * ((xx // 20) % 2))), Image.fromarray(np.uint8(255 * ((yy // 15) % 2))),
                Image.fromarray(np.uint8(xx * 255 / 399)), Image.fromarray(np.uint8(yy * 255 / 399)),
                Image.fromarray(np.uint8(127 + 127 * np.sin(np.hypot(yy - 200, xx - 200) / 8))),
                Image.fromarray(np.uint8(127 + 127 * np.sin(xx / 9) * np.cos(yy / 13)))]
    return {"blank": blanks, "noise": noise, "text page": text, "pattern": patterns}


def transformed_films(films: list[str], per_kind: int, rng: np.random.Generator) -> dict[str, list[Image.Image]]:
    """Real films turned, flipped, inverted or cropped to a corner."""
    picks = [films[i] for i in rng.choice(len(films), min(per_kind, len(films)), replace=False)]
    grey = [Image.open(f).convert("L") for f in picks]
    return {"film turned 90 degrees": [g.transpose(Image.ROTATE_90) for g in grey],
            "film upside down (turned 180)": [g.transpose(Image.ROTATE_180) for g in grey],
            "film flipped top to bottom": [g.transpose(Image.FLIP_TOP_BOTTOM) for g in grey],
            "film negative": [Image.fromarray(255 - np.asarray(g)) for g in grey],
            "film cropped to a corner": [g.crop((0, 0, g.width // 3, g.height // 3)) for g in grey]}


def write_inputs(out: Path, kinds: dict[str, list[Image.Image]]) -> dict[str, list[str]]:
    """Every wrong input as a file (JPEG for photos, PNG for the rest), by kind."""
    files = {}
    for kind, pictures in kinds.items():
        folder = out / "inputs" / kind.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        files[kind] = []
        for i, picture in enumerate(pictures):
            path = folder / f"{i:03d}.{'jpg' if picture.mode == 'RGB' else 'png'}"
            picture.save(path)
            files[kind].append(str(path))
    return files


def checkpoint_with_detector(run: Path, out: Path) -> Path:
    """best.pt itself, or (made before the detector) a copy with one fitted on the run's own splits."""
    ckpt = runs.load_checkpoint(run / "best.pt")
    if ckpt.get("ood"):
        return run / "best.pt"
    path = out / "best_with_detector.pt"
    if not path.exists():
        predictor = infer.load_predictor(ckpt, infer.torch.device("cpu"))
        size = cache_size(predictor.prep.image_size)
        with open(run / "split.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        store = ImageCache(default_cache_dir(), size)
        sets = {}
        for name in ("train", "val"):
            paths = [r["path"] for r in rows if r["split"] == name]
            images = load_images(paths, size, store, show=False)[0]
            sets[name] = (TensorRows(ImageRows(images)), np.array([r["label"] == "PNEUMONIA" for r in rows
                                                                         if r["split"] == name], int))
        detector = ood.fit(predictor, sets["train"][0], sets["train"][1], sets["val"][0])
        if "model" in ckpt:  # format 1: one model
            ckpt["members"] = [ckpt.pop("model")]
        runs.save_checkpoint(path, {**{k: v for k, v in ckpt.items() if k not in ("format", "versions")},
                                    "ood": detector.state()})
    return path


def command(args: list[str]) -> None:
    subprocess.run([sys.executable, str(ROOT / "main.py"), *args], check=True, capture_output=True)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def cost(checkpoint: Path, files: list[str]) -> tuple[float, float]:
    """Seconds per image of decoding and scoring (predict's work) and of the checks, on the same files."""
    ckpt = runs.load_checkpoint(checkpoint)
    predictor = infer.load_predictor(ckpt, infer.torch.device("cpu"))
    detector = ood.Detector.from_state(ckpt["ood"])
    start = time.perf_counter()
    images, errors, colours = predictor.decode(files, show=False)
    logits, features = predictor.logits_and_features(infer.torch.from_numpy(images).unsqueeze(1))
    work = time.perf_counter() - start
    start = time.perf_counter()
    ood.inspect(files, images, features, predictor.prep, detector, colours=colours)
    checks = time.perf_counter() - start
    return work / len(files), checks / len(files)


def main(argv=None) -> int:
    args = parse_args(argv)
    out, run = Path(args.out), Path(args.run)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    films = data.find_labelled(args.films).paths
    kinds = {**photographs(), **other_imaging(), **generated(rng), **transformed_films(films, args.per_kind, rng)}
    files = write_inputs(out, kinds)
    checkpoint = checkpoint_with_detector(run, out)
    every = [f for fs in files.values() for f in fs]
    if not (out / "wrong" / "predictions.csv").exists():
        command(["predict", *every, "--checkpoint", str(checkpoint), "--out", str(out / "wrong")])
    for name, source in (("films", args.films), ("pooled", str(run / "split.csv"))):
        if not (out / name / "predictions.csv").exists():
            command(["evaluate", "--checkpoint", str(checkpoint), "--data", source, "--out", str(out / name),
                     "--quiet"])
    wrong = {r["path"]: r for r in read_rows(out / "wrong" / "predictions.csv")}
    real = read_rows(out / "films" / "predictions.csv")
    real_scores = [float(r["ood_score"]) for r in real]
    print(f"{'kind':34s} {'inputs':>6s} {'flagged':>8s} {'AUROC':>6s}  reasons")
    flagged_all = 0
    for kind, paths in files.items():
        rows = [wrong[p] for p in paths]
        flagged = sum(r["flagged"] == "yes" for r in rows)
        flagged_all += flagged
        scores = [float(r["ood_score"]) if r["ood_score"] else np.inf for r in rows]
        auroc = roc_auc_score([0] * len(real_scores) + [1] * len(scores), real_scores + scores)
        reasons = sorted({ood.kind_of(w) for r in rows for w in r["warnings"].split("; ") if w})
        print(f"{kind:34s} {len(rows):6d} {flagged / len(rows):8.0%} {auroc:6.3f}  {', '.join(reasons)[:90]}")
    print(f"{'all wrong inputs':34s} {len(every):6d} {flagged_all / len(every):8.1%}")
    for name in ("films", "pooled"):
        rows = read_rows(out / name / "predictions.csv")
        alarms = [r for r in rows if r["flagged"] == "yes"]
        print(f"false alarms on {name} ({'half A' if name == 'films' else 'pooled test split'}): {len(alarms)} of "
              f"{len(rows)} = {len(alarms) / len(rows):.1%}" + "".join(f"\n    {Path(r['path']).name}: {r['warnings']}"
                                                                      for r in alarms[:10]))
    work, checks = cost(checkpoint, films[:200])
    print(f"cost per image (this CPU, {len(films[:200])} real films): predict's decode and scoring {1000 * work:.2f} "
          f"ms, the checks {1000 * checks:.2f} ms = {checks / work:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
