"""Shared fixtures: tiny generated archives, the real data in ../shared/data (skipped when absent),
and one small demo run reused by the tests that read a finished run's outputs."""
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("PNEUMONIA_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared(name: str) -> Path:
    """A folder of ../shared/data, or skip the test cleanly when it is not there."""
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"real data {path} not available")
    return path


def write_image(path: Path, seed: int, size: int = 48, mode: str = "L", fmt: str | None = None) -> Path:
    """A small random image (different bytes for each seed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).convert(mode).save(path, format=fmt)
    return path


def kaggle_names(n_patients: int, per_patient: int = 2):
    """(label, file name) pairs with Kaggle's naming: personN_bacteria_M and IM-NNNN-MMMM."""
    names = []
    for p in range(1, n_patients + 1):
        for k in range(per_patient):
            names.append(("PNEUMONIA", f"person{p}_{'bacteria' if p % 2 else 'virus'}_{100 * p + k}.jpeg"))
            names.append(("NORMAL", f"IM-{p:04d}-{k + 1:04d}.jpeg"))
    return names


@pytest.fixture
def tiny_archive(tmp_path) -> Path:
    """A Kaggle-like archive of small images, 20 patients per class, two images each."""
    root = tmp_path / "archive"
    for i, (label, name) in enumerate(kaggle_names(20)):
        write_image(root / "chest_xray" / "train" / label / name, seed=i)
    return root


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """One finished demo run, small enough for CI, shared by several tests."""
    from lib import demo
    import main
    base = tmp_path_factory.mktemp("demo")
    external = demo.make_phantoms(base / "other_site", patients_per_class=8, seed=99)  # an 'external' labelled folder
    out = base / "run"
    # fp32 pinned: auto takes bf16 on some CPUs, which trains another model; the pointing game of 18 demo images
    # moves with the model (0.72-1.00 over seeds 1-4, in fp32 and bf16 alike), and the tests check this one
    assert main.main(["--demo", "--out", str(out), "--epochs", "10", "--demo-patients", "40",
                      "--image-size", "128", "--quiet", "--external", str(external), "--precision", "fp32"]) == 0
    return out


@pytest.fixture(scope="session")
def cause_run(tmp_path_factory) -> Path:
    """One finished --task cause demo run (normal, bacterial, viral), shared by the tests that read it."""
    import main
    out = tmp_path_factory.mktemp("cause") / "run"
    assert main.main(["--demo", "--task", "cause", "--out", str(out), "--epochs", "2", "--demo-patients", "20",
                      "--image-size", "64", "--quiet"]) == 0
    return out


def _figures(obj, fmt: str) -> set[str]:
    """Every float in a metrics.json-like tree, formatted with `fmt`."""
    if isinstance(obj, dict):
        return set().union(*(_figures(v, fmt) for v in obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*(_figures(v, fmt) for v in obj)) if obj else set()
    return {format(obj, fmt)} if isinstance(obj, float) else set()


def stray_figures(text: str, metrics: dict) -> set[str]:
    """The three-decimal figures in `text` that no float of `metrics` gives (a model card must have none)."""
    return set(re.findall(r"(?<![\d.])-?\d+\.\d{3}(?![\d])", text)) - _figures(metrics, ".3f")


def train_config(**changes):
    """A TrainConfig with the parser's defaults (their one source), on the CPU in one process, changed by `changes`."""
    import dataclasses
    import torch
    import train
    from app.settings import Settings
    from lib.distributed import Context
    cfg = train.TrainConfig.of(Settings.parse(["--quiet"]), 0, torch.device("cpu"), Context(), None)
    return dataclasses.replace(cfg, **changes)


def optimiser_defaults() -> dict:
    """The parser's momentum, weight decay and warm-up, as train.make_optimizer takes them."""
    from app.settings import optimiser_defaults
    return optimiser_defaults()
