"""The exported model against predict, on real films: probabilities, calls, heatmaps and distances; export cost.

Usage: `python benchmarks/export_parity.py RUN_DIR [RUN_DIR ...] [--shared ../shared/data]`
Each RUN_DIR is a finished training run. Its best.pt is exported (timed, into a temp folder) and both the graph
(onnxruntime) and the PyTorch path (fp32, as `predict --precision fp32` scores) score half A of the official test
and the full-resolution films, decoded once by lib/images.py. Heatmaps are compared at the Grad-CAM layer's
resolution (Pearson r per image, over images whose PyTorch map is not all zero).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from app import export  # noqa: E402
import gradcam  # noqa: E402
from lib import infer  # noqa: E402
from lib import ood  # noqa: E402
from lib import runs  # noqa: E402
from lib.cache import ImageCache, load_images  # noqa: E402


def films(folder: Path, side: int) -> np.ndarray:
    """Every image below `folder`, decoded as predict decodes it (nothing cached)."""
    files, _ = data.list_files([str(folder)])
    images, errors = load_images(files, side, ImageCache(None, side), None, False)
    return images[[i for i, e in enumerate(errors) if e is None]]


def torch_side(ckpt: dict, batch: np.ndarray) -> dict:
    predictor = infer.load_predictor(ckpt, torch.device("cpu"))
    x = torch.from_numpy(batch).unsqueeze(1)
    logits, features = predictor.logits_and_features(x)
    prob, _ = infer.probabilities(logits)
    maps = np.concatenate([gradcam.ensemble_layer_maps(predictor.members, predictor.model_input(x[s:s + 64]))
                           .detach().numpy() for s in range(0, len(x), 64)])
    detector = ood.Detector.from_state(ckpt["ood"]) if ckpt.get("ood") else None
    distance = detector.distance(features) if detector is not None and detector.members else None
    return {"probability": prob, "heatmap": maps, "distance": distance}


def onnx_side(folder: Path, batch: np.ndarray) -> dict:
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    parts = [dict(zip(names, session.run(None, {"images": batch[s:s + 64, None]}))) for s in range(0, len(batch), 64)]
    return {k: np.concatenate([p[k] for p in parts]) for k in names}


def compare(ckpt: dict, folder: Path, batch: np.ndarray) -> str:
    ours, theirs = torch_side(ckpt, batch), onnx_side(folder, batch)
    threshold = ckpt["threshold"]
    dp = np.abs(ours["probability"] - theirs["probability"]).max()
    calls = int(((ours["probability"] >= threshold) != (theirs["probability"] >= threshold)).sum())
    live = [i for i in range(len(batch)) if ours["heatmap"][i].std() > 0]
    r = [np.corrcoef(ours["heatmap"][i].ravel(), theirs["heatmap"][i].ravel())[0, 1] for i in live]
    dd = np.abs(ours["distance"] - theirs["distance"]).max() if ours["distance"] is not None else float("nan")
    return (f"{len(batch)} images | max |dp| {dp:.2e} | calls differing {calls} | heatmap r min "
            f"{min(r) if r else float('nan'):.6f} ({len(live)} non-zero maps) | max |d distance| {dd:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = parser.parse_args()
    sets = {"half A": Path(args.shared) / "official_test_a_224sq",
            "full-resolution films": Path(args.shared) / "chest_xray_fullres_train"}
    for run in args.runs:
        ckpt = runs.read_checkpoint(Path(run) / "best.pt")
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            meta = export.write(str(Path(run) / "best.pt"), Path(tmp))
            kind = "three classes" if len(meta["classes"]) == 3 else "one logit"
            print(f"{run}: {len(ckpt['members'])} member(s), {kind}; "
                  f"export {time.perf_counter() - started:.1f} s, model.onnx {meta['export']['bytes'] / 1e6:.2f} MB")
            side = meta["input"]["side"]
            for name, folder in sets.items():
                if folder.is_dir():
                    print(f"  {name}: {compare(ckpt, Path(tmp), films(folder, side))}", flush=True)


if __name__ == "__main__":
    main()
