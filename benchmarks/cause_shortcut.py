"""Does a --task cause model read the image frame (markers, text, collimation) instead of the lungs?

Usage: `python benchmarks/cause_shortcut.py RUN [EXTERNAL_DIR ...]` (RUN: a finished --task cause run).
Scores bacterial vs viral among the pneumonia cases of the run's test split (its split.csv) and of
each external folder three ways, with the same model and no retraining: the whole input; the outer
frame (10% a side, the band Grad-CAM's border mass measures) replaced by each image's mean grey, so
only the centre is seen; and the centre replaced, so only the frame is seen. If the frame alone keeps
much of the AUC, or hiding it costs much, the model leans on a shortcut. Prints one table.
"""
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import evaluate  # noqa: E402
import infer  # noqa: E402
import runs  # noqa: E402
from cache import ImageCache  # noqa: E402
from images import cache_size  # noqa: E402
from settings import default_cache_dir  # noqa: E402

FRAME = 0.10


def masked(images: torch.Tensor, size: int, keep: str) -> torch.Tensor:
    """Images whose model-visible crop has its outer FRAME ('centre') or its inside ('frame') set to the image mean."""
    out = images.clone()
    offset = (images.shape[-1] - size) // 2
    band = int(round(size * FRAME))
    inner = torch.zeros(images.shape[-2:], dtype=torch.bool)
    inner[offset + band:offset + size - band, offset + band:offset + size - band] = True
    hide = ~inner if keep == "centre" else inner
    mean = images.float().mean((1, 2, 3), keepdim=True).round().to(images.dtype)
    return torch.where(hide, mean.expand_as(images), out)


def bacterial_vs_viral_auc(scorer: evaluate.Scorer, images: torch.Tensor, causes: np.ndarray) -> float:
    """AUC of P(b) / (P(b) + P(v)) for bacterial among the pneumonia images."""
    _, classes = scorer.predictor.predict(images)
    pneumonia = causes > 0
    return float(roc_auc_score(causes[pneumonia] == 1, evaluate.bacterial_share(classes[pneumonia])))


def main(run: str, externals: list[str]) -> None:
    ckpt = runs.read_checkpoint(Path(run) / "best.pt")
    predictor = infer.load_predictor(ckpt, torch.device("cpu"))
    prep = predictor.prep
    scorer = evaluate.Scorer(predictor, ckpt["threshold"])
    cache = ImageCache(default_cache_dir(), cache_size(prep.image_size))
    sets = {"test split": data.find_labelled(str(Path(run) / "split.csv")),
            **{Path(e).name: data.find_labelled(e) for e in externals}}
    print(f"bacterial vs viral AUC, {FRAME:.0%} frame; model {run}")
    print(f"{'set':28s} {'whole':>8s} {'centre only':>12s} {'frame only':>11s}")
    for name, found in sets.items():
        ds = data.decode_found(found, cache, progress=False)
        images = torch.from_numpy(np.asarray(ds.images)).unsqueeze(1)
        aucs = [bacterial_vs_viral_auc(scorer, x, ds.causes) for x in
                (images, masked(images, prep.image_size, "centre"), masked(images, prep.image_size, "frame"))]
        print(f"{name:28s} {aucs[0]:8.3f} {aucs[1]:12.3f} {aucs[2]:11.3f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
