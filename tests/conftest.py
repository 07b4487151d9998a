"""Shared fixtures: tiny generated archives, the real data in ../shared/data (skipped when absent),
and one small demo run reused by the tests that read a finished run's outputs."""
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

try:
    import fcntl  # the lock that lets pytest-xdist workers share one built run
except ImportError:  # Windows: each worker builds its own
    fcntl = None

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("PNEUMONIA_SHARED_DATA", ROOT.parent / "shared" / "data"))


def pytest_configure(config):
    """Under pytest-xdist (`-n`), the cores shared out among the workers: torch's own threads in every worker would
    ask for more cores than there are, and spin-waiting threads then slow every one of them. The same holds for
    numpy's and scipy's BLAS and scikit-learn's OpenMP: the layout probe's logistic regression took 0.25 CPU-s with
    two BLAS threads and 0.12 with one, in the same wall time."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import sklearn.linear_model  # noqa: F401  (loads scipy's BLAS and scikit-learn's OpenMP, so both are limited)
        import torch
        from threadpoolctl import threadpool_limits
        share = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(share)
        threadpool_limits(share)  # every BLAS and OpenMP library loaded so far (threadpoolctl: scikit-learn's own)


# The slowest modules, in the order pytest-xdist hands them to the workers (longest first, so that the short ones
# fill the gaps at the end): test_main builds the shared demo run on one worker while the self-contained torchrun
# module keeps the other busy, instead of waiting for that run. Seconds on a quiet 2-core machine: 80, 135, 65, 85,
# 75, 60, 50, 30; every other module takes under 15.
FIRST = ("test_main", "test_distributed", "test_robustness", "test_hostile", "test_streaming", "test_calibrate",
         "test_ensemble", "test_export")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(Path(item.nodeid.split("::")[0]).stem, len(FIRST)))  # stable otherwise


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


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder `name`, filled by `build(folder)` once per test session, also when pytest-xdist runs the session
    in several processes: the first to ask builds it under a file lock, the others wait and read it. Only for
    folders the tests read and never write."""
    root = tmp_path_factory.getbasetemp()
    if fcntl is not None and os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the folder every worker's own temporary folder sits in
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"{name}.built").exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            folder.mkdir()
            build(folder)
            (root / f"{name}.built").touch()
    return folder


def _demo_run(base: Path) -> None:
    from lib import demo
    import main
    external = demo.make_phantoms(base / "other_site", patients_per_class=8, seed=99)  # an 'external' labelled folder
    # fp32 pinned: auto takes bf16 on some CPUs, which trains another model; the pointing game of 18 demo images
    # moves with the model (0.72-1.00 over seeds 1-4, in fp32 and bf16 alike), and the tests check this one
    assert main.main(["--demo", "--out", str(base / "run"), "--epochs", "6", "--demo-patients", "40",
                      "--image-size", "128", "--quiet", "--external", str(external), "--precision", "fp32"]) == 0


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """One finished demo run, small enough for CI, shared by several tests (and by every pytest-xdist worker)."""
    return built_once(tmp_path_factory, "demo", _demo_run) / "run"


def _cause_run(base: Path) -> None:
    import main
    assert main.main(["--demo", "--task", "cause", "--out", str(base / "run"), "--epochs", "2", "--demo-patients",
                      "20", "--image-size", "64", "--quiet"]) == 0


@pytest.fixture(scope="session")
def cause_run(tmp_path_factory) -> Path:
    """One finished --task cause demo run (normal, bacterial, viral), shared by the tests that read it."""
    return built_once(tmp_path_factory, "cause", _cause_run) / "run"


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
