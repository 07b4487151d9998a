"""Time the figures a run draws, one kind at a time, on generated images (no data needed).

Usage: `python benchmarks/figures.py [--repeats 5] [--root DIR]`. `--root` times another checkout's gradcam and
evaluate (for example a git worktree at an older commit), so that two versions are measured side by side:
    git worktree add /tmp/before HEAD~1
    python benchmarks/figures.py --root /tmp/before; python benchmarks/figures.py
Name the CPU beside the figures, and compare the two checkouts' seconds from runs made one after the other.
"""
import argparse
import sys
import tempfile
import timeit
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="calls per figure; the fastest counts (default 5)")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the checkout whose gradcam.py and evaluate.py are timed (default: this one)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.root))
    import evaluate
    import gradcam

    rng = np.random.default_rng(0)
    # smooth fields, as films and heatmaps are: white noise would time the PNG compressor at its worst
    image, cam = (gaussian_filter(rng.random((112, 112)), sigma) for sigma in (2, 8))
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    y = np.arange(200) % 2
    prob = np.clip(y * 0.6 + rng.random(200) * 0.5, 0, 1)
    metrics = evaluate.score(y, prob, np.arange(200), 0.5, n_resamples=50)
    out = Path(tempfile.mkdtemp())
    films = [(image * (1 + k / 8), cam, f"TP p=0.9{k} true=PNEUMONIA", out / f"o{k}.png") for k in range(8)]
    kinds = {  # name: (draw, the files it writes)
        "one overlay": (lambda: gradcam.save_overlay(image, cam, "TP p=0.93 true=PNEUMONIA", out / "o.png"),
                        ["o.png"]),
        "8 overlays, one call": (lambda: save_overlay_files(gradcam, films), [f"o{k}.png" for k in range(8)]),
        "grid of 16": (lambda: gradcam.save_grid([image] * 16, [cam] * 16, ["TP p=0.93 true=PNEUMONIA"] * 16,
                                                 out / "g.png", suptitle="Grad-CAM, up to 4 per outcome"), ["g.png"]),
        "randomisation 4 x 6": (lambda: gradcam.save_randomisation_figure(
            [image] * 4, [[cam] * 4] * 6, ["a", "b", "c", "d", "e"], [0.1] * 5, out / "r.png"), ["r.png"]),
        "ROC curve": (lambda: evaluate.plot_roc(y, prob, metrics, out / "roc.png"), ["roc.png"]),
        "confusion matrix": (lambda: evaluate.plot_confusion(metrics, out / "cm.png"), ["cm.png"]),
    }
    kinds["one overlay"][0]()  # fonts and caches warmed once
    print(f"figures of {args.root}, fastest of {args.repeats}, and the size of the files written:")
    for name, (draw, files) in kinds.items():
        fastest = min(timeit.repeat(draw, number=1, repeat=args.repeats))  # the least disturbed by other work
        size = sum((out / f).stat().st_size for f in files)
        print(f"  {name:22s} {fastest:6.3f} s {size / 1024:6.0f} KiB")


def save_overlay_files(gradcam, films) -> None:
    """The 8 overlays of a run as the checkout draws them: into one figure where it can, else a figure each."""
    if hasattr(gradcam, "save_overlay_files"):
        return gradcam.save_overlay_files(films)
    for film in films:
        gradcam.save_overlay(*film)


if __name__ == "__main__":
    main()
