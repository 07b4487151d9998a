"""Run folders and checkpoints: create, mark incomplete, resume, finish; the best.pt and last.pt formats.

Usage: `run_dir = runs.create(out)`, `runs.save_best(run_dir / "best.pt", ...)`, `models, prep = runs.load_models(ckpt, device)`.
Every file is written whole or not at all (`atomic_write`): a killed run or a full disk never leaves
half a file, so the last checkpoint written always loads.
"""
import csv
import io
import json
import os
import platform
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import torch

from model import PneumoniaCNN
from transforms import Preprocess

CHECKPOINT_FORMAT = 2  # 2: best.pt holds a list of members (an ensemble of one or more); 1: one "model"
READABLE_FORMATS = (1, 2)
PROJECT_VERSION = "1.3.0"
MARKER = "INCOMPLETE"  # present while a training run has not finished
MEMBERS = "members"  # folder of the finished ensemble members of a run that has not finished


class RunError(Exception):
    """A run folder or checkpoint that cannot be used; the message says why and what to do."""


# ---------------------------------------------------------------- files
def atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename; an OSError names `path`, not the temp file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from err
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as err:
        os.unlink(tmp)
        if isinstance(err, OSError):
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def write_json(path: Path, obj) -> None:
    """Pretty JSON, written atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, allow_nan=True).encode()))


def write_csv(path: Path, header, rows) -> None:
    """A CSV file with a header row, written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def versions() -> dict:
    """The versions a run depends on, for its model card."""
    found = {"python": platform.python_version(), "project": PROJECT_VERSION}
    for package in ("torch", "torchvision", "numpy", "scikit-learn", "pillow", "pydicom"):
        found[package] = version(package)
    return found


# ---------------------------------------------------------------- run folders
def create(out: str | None, prefix: str = "") -> Path:
    """A fresh, writable run folder (default runs/<prefix><YYYYmmdd-HHMMSS>); an existing one is refused."""
    path = Path(out) if out else Path("runs") / (prefix + time.strftime("%Y%m%d-%H%M%S"))
    if path.exists() and any(path.iterdir()):
        raise RunError(f"output folder '{path}' already exists and is not empty; choose another --out "
                       f"(or `--resume {path}` if it is an interrupted run)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / ".write-test").touch()
        (path / ".write-test").unlink()
    except OSError as err:
        raise RunError(f"cannot write to output folder '{path}' ({err.strerror}); choose a writable --out") from None
    return path


def start(run_dir: Path, config: dict) -> None:
    """Write config.json and the INCOMPLETE marker that --resume looks for."""
    write_json(run_dir / "config.json", config)
    (run_dir / MARKER).write_text("training has not finished; resume with: python main.py --resume " + str(run_dir))


def finish(run_dir: Path) -> None:
    """The run is complete: best.pt holds every member, so their own files go, then the marker."""
    for path in (run_dir / MEMBERS).glob("member*.pt"):
        path.unlink()
    if (run_dir / MEMBERS).is_dir():
        (run_dir / MEMBERS).rmdir()
    (run_dir / MARKER).unlink(missing_ok=True)


def discard_if_empty(run_dir: Path) -> None:
    """Leave no empty folder behind a run that never started."""
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


def interrupted_config(run_dir: Path) -> dict:
    """The saved settings of an interrupted run, after checking it can be resumed."""
    if not (run_dir / MARKER).exists():
        raise RunError(f"'{run_dir}' is not an interrupted run (no {MARKER} marker); nothing to resume")
    if not (run_dir / "last.pt").exists():
        raise RunError(f"'{run_dir}' has no last.pt to resume from; start a new run")
    saved = json.loads((run_dir / "config.json").read_text())
    saved.setdefault("augment", "none")  # runs from before the augmentation flags used the plain transform
    saved.setdefault("keep", "best")  # runs from before --keep kept the best validation epoch
    return saved


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save with the format and versions added, written atomically."""
    payload = {"format": CHECKPOINT_FORMAT, "versions": {"torch": str(torch.__version__), "project": PROJECT_VERSION}, **payload}
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write(Path(path), lambda f: f.write(buf.getvalue()))


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint without running any code (weights_only), checking its format."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE_FORMATS:
        raise ValueError(f"'{path}' is not a checkpoint of this project's formats {READABLE_FORMATS}")
    saved = ckpt.get("versions", {})
    if saved.get("torch") != torch.__version__ or saved.get("project") != PROJECT_VERSION:
        warnings.warn(f"checkpoint made with torch {saved.get('torch')} / project {saved.get('project')}; "
                      f"running torch {torch.__version__} / project {PROJECT_VERSION}")
    return ckpt


def read_checkpoint(path: str | Path | None) -> dict:
    """load_checkpoint, with every failure turned into one RunError sentence."""
    if not path:
        raise RunError("no checkpoint given; pass --checkpoint runs/<run>/best.pt from a finished training run")
    if not Path(path).is_file():
        raise RunError(f"checkpoint '{path}' does not exist; pass the best.pt of a finished run")
    try:
        return load_checkpoint(path)
    except Exception as err:  # pickle errors, refused globals, wrong format: all mean 'not ours'
        raise RunError(f"'{path}' cannot be loaded safely as a checkpoint of this project "
                       f"({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None


def save_best(path: Path, *, model_config: dict, members: list[dict], prep: Preprocess, thresholds: dict,
              policy: str, tta: bool, training: list[dict], ood: dict, config: dict, precision: str) -> None:
    """best.pt: what scoring new data needs (every member's weights, the model config, preprocessing, thresholds,
    whether to average test-time views, the out-of-distribution detector, the precision the thresholds were chosen
    at) and how the members were trained, with the run's config.

    `thresholds` holds "threshold" (on P(pneumonia)) and, for three-class models, "cause_threshold".
    """
    save_checkpoint(path, {"members": members, "model_config": model_config, "preprocess": prep.state(), **thresholds,
                           "threshold_policy": policy, "tta": tta, "training": training, "ood": ood, "config": config,
                           "precision": precision})


def load_models(ckpt: dict, device: torch.device) -> tuple[list[PneumoniaCNN], Preprocess]:
    """Rebuild the members (in eval mode, on `device`) and the preprocessing a best.pt describes.

    A format-1 checkpoint holds one "model": an ensemble of one.
    """
    try:
        models = []
        for weights in ckpt["members"] if "members" in ckpt else [ckpt["model"]]:
            model = PneumoniaCNN(**ckpt["model_config"])
            model.load_state_dict(weights)
            models.append(model.to(device, memory_format=torch.channels_last).eval())
        prep = Preprocess.from_state(ckpt["preprocess"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise RunError(f"the checkpoint does not fit this model ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
                       f"it was made by another model config or version of this project") from None
    return models, prep


# ---------------------------------------------------------------- ensemble members of an unfinished run
def save_member(run_dir: Path, member: int, weights: dict, summary: dict, history: list[dict]) -> None:
    """A finished member's kept weights, so a resumed run trains only the members after it."""
    save_checkpoint(run_dir / MEMBERS / f"member{member}.pt", {"weights": weights, "summary": summary,
                                                              "history": history})


def read_members(run_dir: Path) -> list[dict]:
    """The finished members of a run, in order (each: weights, summary, history); the first gap ends the list."""
    members = []
    while (path := run_dir / MEMBERS / f"member{len(members)}.pt").exists():
        members.append(load_checkpoint(path))
    return members


def save_last(path: Path, parts: dict, generator: torch.Generator, state: dict) -> None:
    """last.pt: every state dict in `parts`, every random-number state and the loop position `state`."""
    rng = {"generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
           "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    save_checkpoint(path, {**{k: v.state_dict() for k, v in parts.items()}, **rng, "state": state})


def restore_last(ckpt: dict, parts: dict, generator: torch.Generator) -> dict:
    """Put a last.pt back into `parts` and the random-number generators; returns the loop position."""
    for name, part in parts.items():
        part.load_state_dict(ckpt[name])
    generator.set_state(ckpt["generator"])
    torch.set_rng_state(ckpt["torch_rng"])
    if ckpt["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    return ckpt["state"]
