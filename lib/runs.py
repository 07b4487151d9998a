"""Run folders and checkpoints: create, mark incomplete, resume, finish; the best.pt and last.pt formats.

Usage: `run_dir = runs.create(out)`, `runs.save_best(run_dir / "best.pt", ...)`; `runs.read_checkpoint(path)` reads
one.
Every file is written whole or not at all (`atomic_write`): a killed run or a full disk never leaves
half a file, so the last checkpoint written always loads.
"""
import csv
import hashlib
import io
import json
import math
import os
import platform
import signal
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import torch

from lib.errors import Interrupted, UserError
from lib.labels import CLASSES
from lib.names import cell, uncell
from lib.transforms import Preprocess

# 2: every scored set's figures in one block, metrics["sets"][name]; 1 (no "schema" key): the test split's figures at
# the top ("test", "gradcam", "ood", "cause", "cause_gradcam") and each external set's spread over "external_*" dicts
METRICS_SCHEMA = 2
SET_PARTS = {"test": "rates", "gradcam": "gradcam", "ood": "ood", "cause": "cause", "cause_gradcam": "cause_gradcam"}
# what a set's block may hold besides these: "shortcut" (the layout probe and the rates per group), since schema 2
CHECKPOINT_FORMAT = 2  # 2: best.pt holds a list of members (an ensemble of one or more); 1: one "model"
READABLE_FORMATS = (1, 2)
PROJECT_VERSION = "1.3.0"
MARKER = "INCOMPLETE"  # present while a training run has not finished
MEMBERS = "members"  # folder of the finished ensemble members of a run that has not finished


class RunError(UserError):
    """A run folder or checkpoint that cannot be used; the message says why and what to do."""




# ---------------------------------------------------------------- files
def umask_mode() -> int:
    """The mode a plain new file gets under this process's umask (0644 under the usual 022).

    Read from /proc, not by setting the umask and back: that is process-wide, and a thread writing between the two
    calls would make a world-writable file."""
    try:
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):  # no /proc (macOS): the only portable way left
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename; an OSError names `path`, not the temp file.

    The file gets the mode any program's new file gets (mkstemp's private 0600 would survive the rename, and no
    colleague or web server could read the run)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from err
    try:
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as err:
        os.unlink(tmp)
        if isinstance(err, OSError):
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def write_json(path: Path, obj) -> None:
    """Pretty, strict JSON, written atomically: a figure that could not be computed (NaN) is null, since most
    readers (jq, JavaScript, pandas' strict mode) refuse the NaN token Python writes by default."""
    atomic_write(path, lambda f: f.write(json.dumps(finite(obj), indent=2, allow_nan=False).encode()))


def finite(value):
    """`value` with every NaN or infinite float, at any depth, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_text(path: Path, text: str) -> None:
    """A UTF-8 text file, written atomically; a name that was not UTF-8 on disk is shown escaped (\\udce9)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8", "backslashreplace")))


def write_csv(path: Path, header, rows) -> None:
    """A CSV file with a header row, written atomically and safe to open in a spreadsheet (`names.cell`).

    Bytes of a file name that are not UTF-8 are written back as they were (surrogateescape), so `read_csv`
    returns the very name that opens the file.
    """
    text = csv_bytes([header, *rows])
    atomic_write(path, lambda f: f.write(text))


def csv_bytes(rows) -> bytes:
    """CSV rows as write_csv writes them (predict appends its chunks' rows with this)."""
    buf = io.StringIO()
    csv.writer(buf).writerows([cell(v) for v in row] for row in rows)
    return buf.getvalue().encode("utf-8", "surrogateescape")


def read_csv(path: str | Path) -> list[dict]:
    """The rows of a CSV file this project wrote, every cell as `write_csv` was given it."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return [{k: uncell(v) if isinstance(v, str) else v for k, v in row.items()} for row in csv.DictReader(f)]


def read_metrics(path: str | Path) -> dict:
    """A metrics.json in today's schema; one written before the "sets" block (schema 1) is rebuilt into it."""
    return upgrade_metrics(json.loads(Path(path).read_text()))


def upgrade_metrics(metrics: dict) -> dict:
    """Schema 1 to METRICS_SCHEMA: the test split's top-level figures and every external_* dict become one block
    per set; everything else is kept as it was."""
    if metrics.get("schema", 1) >= METRICS_SCHEMA:
        return metrics
    old = {k: v for k, v in metrics.items() if k in SET_PARTS or k == "external" or k.startswith("external_")}
    sets = {"test split": {"kind": "test", "folder": ".",
                           **{part: old[key] for key, part in SET_PARTS.items() if key in old}}}
    for name in old.get("external", {}):
        blocks = {part: old.get("external" if key == "test" else f"external_{key}", {}) for key,
                  part in SET_PARTS.items()}
        sets[name] = {"kind": "external", "folder": f"external/{name}",
                      **{part: block[name] for part, block in blocks.items() if name in block}}
    rest = {k: v for k, v in metrics.items() if k not in old}
    return {"schema": METRICS_SCHEMA, "sets": sets, **rest}


def file_sha256(path: str | Path) -> str:
    """A file's fingerprint (a checkpoint's, for the provenance of what was made from it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict:
    """The versions a run depends on, for its model card."""
    found = {"python": platform.python_version(), "project": PROJECT_VERSION}
    for package in ("torch", "torchvision", "numpy", "scikit-learn", "pillow", "pydicom"):
        found[package] = version(package)
    return found


# ---------------------------------------------------------------- run folders
CLAIM = ".claimed"  # created with O_EXCL: the one command that made it owns the folder


def cpu_name() -> str:
    """The CPU's model name, for the provenance block (timings mean little without it)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def create(out: str | None, prefix: str = "", parent: str | Path = "runs", inputs=()) -> Path:
    """A fresh, writable output folder that this command alone writes to.

    Without `out`: <parent>/<prefix><YYYYmmdd-HHMMSS>, with -2, -3, ... added when another command took that name
    in the same second. An explicit `out` that is not empty, or that another command has just claimed, is refused;
    so is one inside a class folder or inside a folder this command reads (`inputs`), where the next walk of that
    data would take this command's own pictures for films.
    """
    if out:
        path = Path(out)
        _check_place(path, inputs)
        why = _claim(path)
        if why:
            resume = f" (or `--resume {path}` if it is an interrupted run)" if why.startswith("already") else ""
            raise RunError(f"output folder '{path}' {why}; choose another --out{resume}")
        return path
    stamp = Path(parent) / (prefix + time.strftime("%Y%m%d-%H%M%S"))
    for n in range(1, 1000):
        path = stamp if n == 1 else stamp.with_name(f"{stamp.name}-{n}")
        if not _claim(path):
            return path
    raise RunError(f"could not find a free output folder name beside '{stamp}'; pass --out")


def _check_place(path: Path, inputs) -> None:
    """Refuse an --out that is a file, or that lies in a class folder or in a folder this command reads."""
    if path.exists() and not path.is_dir():
        raise RunError(f"--out '{path}' is an existing file, not a folder; choose a folder name")
    where = path.resolve()
    for folder in [where, *where.parents]:
        if folder.name.upper() in CLASSES:
            raise RunError(f"--out '{path}' lies inside the class folder '{folder}', where the next walk of that data "
                           f"would take this command's own pictures for films; choose a folder outside the data")
    for given in inputs:
        if os.path.isdir(given) and where.is_relative_to(Path(given).resolve()):
            raise RunError(f"--out '{path}' lies inside '{given}', which this command reads; the next run on that "
                           f"folder would take this command's own pictures for films; choose a folder outside it")


def _claim(path: Path) -> str | None:
    """Make `path` (if need be) and claim it; None when this command now owns it, else why it cannot."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        if any(p.name != CLAIM for p in path.iterdir()):
            return "already exists and is not empty"
        return "was claimed by another command that is writing to it now"
    except OSError as err:
        raise RunError(f"cannot write to output folder '{path}' ({err.strerror}); choose a writable --out") from None
    if any(p.name != CLAIM for p in path.iterdir()):
        (path / CLAIM).unlink()
        return "already exists and is not empty"
    return None


@contextmanager
def partial(out: Path, command: str, again: str = ""):
    """Mark `out` INCOMPLETE while `command` writes into it, so that a folder left by Ctrl-C, a crash or a full disk
    never looks finished; Ctrl-C becomes Interrupted, naming the folder. `again`: the command line that continues
    it, where one does (else the user runs the command again).

    Python cannot raise a Ctrl-C that lands in a fork hook (as a decode pool starts its workers) and prints a
    traceback instead: the signal is recorded here, that traceback dropped, and the command stops at the end.
    """
    (out / MARKER).write_text(f"{command} did not finish: the files beside this one are partial; "
                              f"{'continue with: ' + again if again else 'run it again'}\n")
    asked, hook = [], sys.unraisablehook

    def interrupt(signum, frame):
        asked.append(signum)
        raise KeyboardInterrupt

    def quiet(unraisable):
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            hook(unraisable)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, interrupt) if main_thread else None
    sys.unraisablehook = quiet
    try:
        yield
        if asked:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        if discard_if_empty(out):
            raise Interrupted(f"{command} interrupted (Ctrl-C) before it wrote anything; '{out}' was removed") from None
        raise Interrupted(f"{command} interrupted (Ctrl-C): '{out}' holds partial files and an {MARKER} file "
                          f"that says so" + (f"; continue with: {again}" if again else "")) from None
    except BaseException:
        discard_if_empty(out)  # a refusal before the first file leaves no folder that blocks the same --out
        raise
    finally:
        sys.unraisablehook = hook
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    (out / MARKER).unlink()


def start(run_dir: Path, config: dict) -> None:
    """Write config.json and the INCOMPLETE marker that --resume looks for."""
    write_json(run_dir / "config.json", config)
    (run_dir / MARKER).write_text("training has not finished; resume with: python main.py --resume " + str(run_dir))


def mark_unresumable(run_dir: Path, why: str) -> None:
    """The INCOMPLETE marker of a run that cannot go on says so, and why (--resume refuses such a run)."""
    (run_dir / MARKER).write_text(f"{why}; this run cannot be resumed: start a new one\n")


def finish(run_dir: Path) -> None:
    """The run is complete: best.pt holds every member, so their own files go, then the marker."""
    for path in (run_dir / MEMBERS).glob("member*.pt"):
        path.unlink()
    if (run_dir / MEMBERS).is_dir():
        (run_dir / MEMBERS).rmdir()
    (run_dir / MARKER).unlink(missing_ok=True)


def discard_if_empty(run_dir: Path) -> bool:
    """Leave no folder behind a command that wrote nothing (its claim and INCOMPLETE marker aside); whether it
    removed one."""
    if not run_dir.is_dir() or any(p.name not in (CLAIM, MARKER) for p in run_dir.iterdir()):
        return False
    for name in (CLAIM, MARKER):
        (run_dir / name).unlink(missing_ok=True)
    run_dir.rmdir()
    return True


def interrupted_config(run_dir: Path) -> dict:
    """The saved settings of an interrupted run, after checking it can be resumed."""
    if not (run_dir / MARKER).exists():
        raise RunError(f"'{run_dir}' is not an interrupted run (no {MARKER} marker); nothing to resume")
    if not (run_dir / "last.pt").exists():
        said = (run_dir / MARKER).read_text().strip()
        raise RunError(f"'{run_dir}' has no last.pt to resume from"
                       + (f" ({said})" if "cannot be resumed" in said else "; start a new run"))
    saved = json.loads((run_dir / "config.json").read_text())
    saved.setdefault("augment", "none")  # runs from before the augmentation flags used the plain transform
    saved.setdefault("keep", "best")  # runs from before --keep kept the best validation epoch
    return saved


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save with the format and versions added, written atomically."""
    payload = {"format": CHECKPOINT_FORMAT, "versions": {"torch": str(torch.__version__), "project": PROJECT_VERSION},
               **payload}
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write(Path(path), lambda f: f.write(buf.getvalue()))


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint without running any code (weights_only), checking its format: for a file this project
    wrote itself (tests, benchmarks), so torch's own errors pass through. A path a user typed goes through
    read_checkpoint, which also checks the kind and turns every failure into one RunError sentence."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE_FORMATS:
        raise ValueError(f"'{path}' is not a checkpoint of this project's formats {READABLE_FORMATS}")
    saved = ckpt.get("versions", {})
    if saved.get("torch") != torch.__version__ or saved.get("project") != PROJECT_VERSION:
        warnings.warn(f"checkpoint made with torch {saved.get('torch')} / project {saved.get('project')}; "
                      f"running torch {torch.__version__} / project {PROJECT_VERSION}")
    return ckpt


# what each kind of checkpoint holds, and how a user would name it
KINDS = {"model": ("members", "a model (the best.pt of a finished run)"),
         "last": ("state", "a training state (the last.pt that --resume continues from)"),
         "member": ("weights", "an ensemble member of an unfinished run (members/memberN.pt)")}


def kind_of(ckpt: dict) -> str | None:
    """Which of KINDS a loaded checkpoint is, or None; a last.pt holds a "model" state dict too, so "state" is
    asked first, and a format-1 best.pt holds one "model" instead of "members"."""
    for kind in ("last", "member", "model"):
        if KINDS[kind][0] in ckpt:
            return kind
    return "model" if "model" in ckpt else None


def read_checkpoint(path: str | Path | None, kind: str = "model") -> dict:
    """The checkpoint at a path a user gave, which must be of `kind`; every failure is one RunError sentence."""
    if not path:
        raise RunError("no checkpoint given; pass --checkpoint runs/<run>/best.pt from a finished training run")
    if not Path(path).is_file():
        raise RunError(f"checkpoint '{path}' does not exist; pass the best.pt of a finished run")
    try:
        ckpt = load_checkpoint(path)
    except Exception as err:  # pickle errors, refused globals, wrong format: all mean 'not ours'
        raise RunError(f"'{path}' cannot be loaded safely as a checkpoint of this project "
                       f"({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None
    found = kind_of(ckpt)
    if found != kind:
        what = KINDS[found][1] if found else "no checkpoint kind this project writes"
        raise RunError(f"'{path}' is {what}, but {KINDS[kind][1]} is needed here"
                       + ("; pass the run's best.pt" if kind == "model" else ""))
    return ckpt


def save_best(path: Path, *, model_config: dict, members: list[dict], prep: Preprocess, thresholds: dict,
              policy: str, tta: bool, training: list[dict], ood: dict, probe: dict, validation: dict,
              seen: list[str], config: dict, precision: str) -> None:
    """best.pt: what scoring new data needs (every member's weights, the model config, preprocessing, thresholds,
    whether to average test-time views, the out-of-distribution detector, the precision the thresholds were chosen
    at), the shortcut audit's layout probe, and how the members were trained, with the run's config.

    `thresholds` holds "threshold" (on P(pneumonia)) and, for three-class models, "cause_threshold". `validation`
    (the validation split's scores) and `seen` (short content hashes of the training and validation films) are
    what calibrating to a site without labels needs.
    """
    save_checkpoint(path, {"members": members, "model_config": model_config, "preprocess": prep.state(), **thresholds,
                           "threshold_policy": policy, "tta": tta, "training": training, "ood": ood, "probe": probe,
                           "validation": validation, "seen": seen, "config": config,
                           "precision": precision})


def save_calibrated(path: Path, ckpt: dict, members: list[dict], threshold: float, cause_threshold: float | None,
                    *, metrics: dict, precision: str) -> None:
    """A calibrated best.pt: the source checkpoint `ckpt` with the site's member weights (BatchNorm statistics),
    thresholds, the precision they were chosen at, and a provenance block from calibrate's `metrics`."""
    calibrated = {k: v for k, v in ckpt.items() if k not in ("model", "format", "versions")}
    calibrated.update(members=[{k: v.cpu() for k, v in m.items()} for m in members], threshold=threshold,
                      threshold_policy=metrics["calibration"]["policy"], precision=precision,
                      calibration={**metrics["calibration"], "expected": metrics["expected"]})
    if "before" in metrics:  # a labelled sample measured the source threshold there
        calibrated["calibration"]["before"] = {k: metrics["before"][k] for k in ("threshold", "sensitivity",
                                                                                 "specificity")}
    if cause_threshold is not None:
        calibrated["cause_threshold"] = cause_threshold
    if metrics["calibration"]["adapt_bn"] and calibrated.get("ood"):
        # the distance was fitted to the features of the training statistics; the site's no longer match them
        calibrated["ood"] = {**calibrated["ood"], "members": []}
    save_checkpoint(path, calibrated)


# ---------------------------------------------------------------- ensemble members of an unfinished run
def save_member(run_dir: Path, member: int, weights: dict, summary: dict, history: list[dict]) -> None:
    """A finished member's kept weights, so a resumed run trains only the members after it."""
    save_checkpoint(run_dir / MEMBERS / f"member{member}.pt", {"weights": weights, "summary": summary,
                                                              "history": history})


def read_members(run_dir: Path) -> list[dict]:
    """The finished members of a run, in order (each: weights, summary, history); the first gap ends the list."""
    members = []
    while (path := run_dir / MEMBERS / f"member{len(members)}.pt").exists():
        members.append(read_checkpoint(path, "member"))
    return members


def cuda_rng(device: torch.device) -> torch.Tensor | None:
    """The CUDA random-number state of `device` (this rank's GPU), or None off CUDA."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def save_last(path: Path, parts: dict, generator: torch.Generator, state: dict,
              cuda_states: list | None = None) -> None:
    """last.pt: every state dict in `parts`, every random-number state and the loop position `state`.

    `cuda_states` holds each rank's own GPU state, in rank order (under torchrun rank 0 gathers them).
    """
    rng = {"generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
           "cuda_rng_per_rank": [s for s in cuda_states or [] if s is not None]}
    save_checkpoint(path, {**{k: v.state_dict() for k, v in parts.items()}, **rng, "state": state})


def restore_last(ckpt: dict, parts: dict, generator: torch.Generator, rank: int = 0,
                 device: torch.device = torch.device("cpu")) -> dict:
    """Put a last.pt back into `parts` and the random-number generators; returns the loop position.

    Each rank takes its own saved GPU state; a rank the saved run did not have (resumed on more GPUs) keeps the
    state its seed gave it. A last.pt from before per-rank states held every GPU of rank 0: this rank takes the
    entry of its own device, when there is one.
    """
    for name, part in parts.items():
        part.load_state_dict(ckpt[name])
    generator.set_state(ckpt["generator"])
    torch.set_rng_state(ckpt["torch_rng"])
    if device.type == "cuda":
        per_rank, legacy, index = ckpt.get("cuda_rng_per_rank", []), ckpt.get("cuda_rng", []), device.index or 0
        state = None
        if per_rank:
            state = per_rank[rank] if rank < len(per_rank) else None
        elif index < len(legacy):
            state = legacy[index]
        if state is not None:
            torch.cuda.set_rng_state(state, device)
    return ckpt["state"]
