"""Find, de-duplicate, split and audit labelled chest X-rays.

Usage: `ds = load_dataset("archive", 128, "patient", 0, cache_dir)`.
"""
import csv
import hashlib
import itertools
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lib.cache import ImageCache, ImageRows, TensorRows, load_images
from lib.errors import UserError
from lib.images import DICOM_SUFFIXES, cache_size, header, is_dicom, view_problem
from lib.labels import CAUSES, CLASSES
from lib.runs import read_csv, write_csv

JUNK_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
SPLITS = ("train", "val", "test")
# torchvision's IMG_EXTENSIONS, written out: importing torchvision for a tuple cost each process 155 MB
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(UserError):
    """Input that cannot be used; the message says what is wrong and how to fix it."""


class NoImagesFound(DataError):
    """The data folder is missing or holds no images in NORMAL/PNEUMONIA folders."""


@dataclass
class Found:
    """What discovery saw: usable image files, and every other file with the reason it was left out."""

    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[tuple[str, str, str]] = field(default_factory=list)  # (dropped path, kept path, why)
    ignored_folders: list[str] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)  # content hash per path, after de-duplication


# ---------------------------------------------------------------- discovery
def _walk(directory: str, seen: set[str], skipped: list):
    """Yield regular files below `directory`, following symlinks but never the same folder twice."""
    real = os.path.realpath(directory)
    if real in seen:
        skipped.append((directory, "symlink loop or folder already visited"))
        return
    seen.add(real)
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as err:
        skipped.append((directory, f"folder unreadable: {err.strerror}"))
        return
    for entry in entries:
        if entry.name.startswith(".") or entry.name in JUNK_NAMES:
            skipped.append((entry.path, "hidden or OS metadata"))
        elif entry.is_dir():
            yield from _walk(entry.path, seen, skipped)
        elif entry.is_file():
            yield entry.path
        else:
            skipped.append((entry.path, "broken symlink or not a regular file"))


def is_image_file(path: str) -> bool:
    """An image by its extension (torchvision's list, plus .dcm), or an extension-less DICOM file."""
    return path.lower().endswith(IMAGE_EXTENSIONS + DICOM_SUFFIXES) or is_dicom(path)


def list_files(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files named, plus the image files below named folders, with the skip rules of training discovery.

    Returns the files and (path, reason) for everything left out, so predict and training agree
    about every file (a Thumbs.db is OS metadata to both).
    """
    files, skipped, seen = [], [], set()
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)  # named explicitly: the decoder decides
            continue
        for found in _walk(path, seen, skipped):
            if is_image_file(found):
                files.append(found)
            else:
                skipped.append((found, "not an image file extension"))
    return files, skipped


def _class_roots(root: str, skipped: list) -> list[str]:
    """Folders that hold NORMAL/PNEUMONIA sub-folders (e.g. chest_xray/train), at any depth."""
    roots, seen = [], set()
    for dirpath, dirnames, _ in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        junk = [d for d in dirnames if d.startswith(".") or d in JUNK_NAMES]
        skipped += [(os.path.join(dirpath, d), "hidden or OS metadata") for d in sorted(junk)]
        dirnames[:] = [d for d in sorted(dirnames) if d not in junk]
        if real in seen:  # os.walk would loop for ever on a symlink cycle
            dirnames[:] = []
            continue
        seen.add(real)
        if any(d.upper() in CLASSES for d in dirnames):
            roots.append(dirpath)
            dirnames[:] = [d for d in dirnames if d.upper() not in CLASSES]
    return roots


def find_images(root: str) -> Found:
    """Every image file in NORMAL/PNEUMONIA folders under `root`, however the Kaggle zip unpacked.

    Class folders and image extensions as torchvision's ImageFolder sees them; its `make_dataset`
    walk is not used because it follows symlinks without loop detection.
    """
    found, seen = Found(), set()
    if not os.path.isdir(root):
        raise NoImagesFound(f"data folder '{root}' does not exist")
    for class_root in _class_roots(root, found.skipped):
        for name in sorted(e.name for e in os.scandir(class_root) if e.is_dir()):
            folder = os.path.join(class_root, name)
            if name.startswith(".") or name in JUNK_NAMES:
                continue  # already recorded by _class_roots
            if name.upper() not in CLASSES:
                warnings.warn(f"ignoring folder '{folder}': not a class (expected NORMAL or PNEUMONIA)")
                found.ignored_folders.append(folder)
                found.skipped.append((folder, "folder is not a class (expected NORMAL or PNEUMONIA)"))
                continue
            for path in _walk(folder, seen, found.skipped):
                problem = "not an image file extension" if not is_image_file(path) else _dicom_problem(path)
                if problem:
                    found.skipped.append((path, problem))
                else:
                    found.paths.append(path)
                    found.labels.append(CLASSES.index(name.upper()))
    return found


def _dicom_problem(path: str) -> str | None:
    """Why a DICOM file cannot be labelled data: a lateral or non-chest view, or an unreadable header.

    Training and evaluation leave such files out (a lateral film is not the population the model is
    for); predict scores them but says so in its warnings column.
    """
    if not is_dicom(path):
        return None
    try:
        return view_problem(header(path))
    except Exception as err:  # any header pydicom cannot parse
        return f"unreadable DICOM header: {type(err).__name__}: {err}".splitlines()[0][:200]


def require_two_classes(labels) -> None:
    """Refuse data with fewer than two classes: a one-class model is meaningless."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=2)
    if len(labels) == 0:
        raise DataError("no usable images found")
    if counts.min() == 0:
        present = CLASSES[int(counts.argmax())]
        raise DataError(f"only {present} images were found ({counts.max()}); put both NORMAL/ and PNEUMONIA/ folders "
                        "under the data folder")


# ---------------------------------------------------------------- patients and splits
_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+", re.IGNORECASE),
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE),
)


def patient_id(path: str) -> str:
    """The child an image belongs to: a DICOM's PatientID, else from Kaggle's file names; else its own patient."""
    if is_dicom(path) and (recorded := header(path)["patient"]):
        return recorded
    name = os.path.basename(path)
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1)
    return "file:" + path


def patient_of(path: str) -> str:
    """For predict's CSV: the child as patient_id finds it, or '' where neither a header nor the file name says."""
    try:
        found = patient_id(path)
    except Exception:  # an unreadable DICOM header: predict reports the file's own error
        return ""
    return "" if found.startswith("file:") else found


def split_groups(labels, groups, fractions=(0.70, 0.15, 0.15), seed: int = 0) -> np.ndarray:
    """Assign each image a split so that every group (patient) sits in one split, stratified by label.

    Within each label the groups are shuffled, then laid end to end by image count; a group goes to
    the split its middle image falls in, so each split gets its share of images of each label.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    names = np.array(SPLITS[: len(fractions)])
    out = np.empty(len(labels), dtype=object)
    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(groups, return_inverse=True)
    group_label = np.zeros(len(uniq), dtype=int)
    np.maximum.at(group_label, inverse, labels.astype(int))  # a patient with any pneumonia image is a pneumonia patient
    sizes = np.bincount(inverse, minlength=len(uniq))
    bounds = np.cumsum(fractions) / np.sum(fractions)
    for label in np.unique(group_label):
        members = rng.permutation(np.flatnonzero(group_label == label))
        ends = np.cumsum(sizes[members])
        middle = (ends - sizes[members] / 2) / ends[-1]
        which = np.minimum(np.searchsorted(bounds, middle), len(fractions) - 1)
        for g, s in zip(members, which):
            out[inverse == g] = names[s]
    _require_every_split(labels, groups, out, names, fractions)
    return out


def _require_every_split(labels, groups, split, names, fractions) -> None:
    """Raise a DataError naming the counts when a split lacks a class."""
    shares = "/".join(str(round(100 * f / sum(fractions))) for f in fractions)
    classes = CAUSES if labels.max() > 1 else CLASSES
    for name in names:
        for label in np.unique(labels):
            if not np.any((split == name) & (labels == label)):
                n_pat = " and ".join(f"{len(np.unique(groups[labels == c]))} {classes[c]}" for c in np.unique(labels))
                raise DataError(
                    f"too few patients for a {shares} split: {n_pat} patients leave the {name} split without "
                    f"{classes[label]} images; add data (a few patients of each class per split at least)"
                )


def assign_splits(paths, labels, patients, root: str, mode: str, *, seed: int) -> np.ndarray:
    """Split by `mode`: 'patient' (grouped 70/15/15), 'random' (image-level) or 'official' (archive's test/)."""
    if mode == "patient":
        return split_groups(labels, patients, seed=seed)
    if mode == "random":
        return split_groups(labels, np.arange(len(paths)), seed=seed)
    if mode != "official":
        raise ValueError(f"unknown split mode {mode!r}")
    in_test = np.array(["test" in Path(os.path.relpath(p, root)).parts[:-2] for p in paths])
    if not in_test.any() or in_test.all():
        raise DataError("--split official needs the archive's own train/ and test/ folders under the data folder")
    split = np.empty(len(paths), dtype=object)
    split[in_test] = "test"
    rest = np.flatnonzero(~in_test)
    split[rest] = split_groups(np.asarray(labels)[rest], np.asarray(patients)[rest], (0.85, 0.15), seed)
    return split


@dataclass
class Dataset:
    """Decoded, de-duplicated images with labels, patients and split, plus what was left out."""

    images: ImageRows  # N x S x S uint8, read from the decode cache's mapped array as needed
    labels: np.ndarray
    paths: list[str]
    patients: list[str]
    split: np.ndarray
    found: Found
    hashes: list[str]
    causes: np.ndarray  # CAUSES index per image, from the file name; -1 where unknown

    def subset(self, name: str, task: str = "pneumonia") -> tuple[TensorRows, torch.Tensor, np.ndarray]:
        """(N x 1 x S x S uint8 images, read on demand; targets; indices) of one split: float labels, or the causes
        for 'cause'."""
        idx = np.flatnonzero(self.split == name)
        targets = torch.from_numpy(self.causes[idx]) if task == "cause" else torch.from_numpy(self.labels[idx]).float()
        return TensorRows(self.images.take(idx)), targets, idx


def _merge_copies(found: Found, groups: list[list[int]], what: str) -> list[int]:
    """Keep one file of each group of copies (the shallowest path, then the first by name); returns the indices dropped.

    Copies filed under both labels are all dropped: their label cannot be trusted.
    """
    dropped = []
    for members in groups:
        if len(members) < 2:
            continue
        members = sorted(members, key=lambda i: (found.paths[i].count(os.sep), found.paths[i]))
        if len({found.labels[i] for i in members}) > 1:
            found.skipped += [(found.paths[i], f"{what} filed under both NORMAL and PNEUMONIA") for i in members]
            dropped += members
        else:
            found.duplicates += [(found.paths[i], found.paths[members[0]], what) for i in members[1:]]
            dropped += members[1:]
    return dropped


def deduplicate(found: Found, cache: ImageCache) -> None:
    """Keep one copy of byte-identical files; unreadable files move to `found.skipped`."""
    by_hash: dict[str, list[int]] = {}
    for i, path in enumerate(found.paths):
        try:
            by_hash.setdefault(cache.hash(path), []).append(i)
        except OSError as err:
            found.skipped.append((path, f"unreadable file: {err.strerror}"))
    dropped = set(_merge_copies(found, list(by_hash.values()), "identical bytes"))
    keep = sorted(i for members in by_hash.values() for i in members if i not in dropped)
    hashes = {i: h for h, members in by_hash.items() for i in members}
    found.paths = [found.paths[i] for i in keep]
    found.labels = [found.labels[i] for i in keep]
    found.hashes = [hashes[i] for i in keep]


# On the 8x8 thumbnails, distinct films of the Kaggle train split differ somewhere by 20+ grey levels,
# a JPEG and its DICOM copy by under 4 (at 32 px, where JPEG draft decoding differs most)
NEAR_COPY_GREY = 6.0
PROBE_PIXELS = [18, 21, 27, 36, 42, 45]  # of the 8x8 thumbnail: both lungs' upper and lower zones, the mediastinum


def _thumbnails(images: ImageRows, side: int = 8) -> np.ndarray:
    """Each image averaged down to side x side, flattened: what survives re-encoding and format changes."""
    size = images.shape[-1] // side * side
    out = np.zeros((len(images), side * side), dtype=np.float32)
    for start, chunk in zip(range(0, len(images), 1024), images.chunks(1024)):  # never the whole set in memory
        blocks = chunk[:, :size, :size].reshape(len(chunk), side, size // side, side, size // side)
        out[start:start + len(chunk)] = blocks.mean((2, 4), dtype=np.float32).reshape(len(chunk), -1)
    return out


def _near_pairs(thumbs: np.ndarray, limit: float) -> np.ndarray:
    """Every pair (i < j) of thumbnails that differ nowhere by more than `limit`, as a K x 2 array.

    Such a pair also differs by at most `limit` on any six of the 64 pixels, so it sits in the same or a
    neighbouring cell of a grid of that width over them: only cells 3^6 neighbours apart are compared
    (each neighbour direction once), a few million candidate pairs at a time, which keeps 100,000
    images to a minute and under a gigabyte instead of a comparison of every pair.
    """
    if len(thumbs) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    probes = thumbs[:, PROBE_PIXELS]
    cells = np.floor(probes / (limit + 0.01)).astype(np.int64)  # + 0.01: an edge float stays a neighbour
    cells -= cells.min(0) - 1  # from 1, so that a -1 offset stays a valid digit
    radix = np.cumprod(np.r_[1, cells.max(0)[:-1] + 2])
    key = cells @ radix
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    found = [np.zeros((0, 2), dtype=np.int64)]
    for offset in itertools.product((-1, 0, 1), repeat=len(PROBE_PIXELS)):
        if offset < (0,) * len(offset):
            continue  # the pairs of -offset, seen from the other side
        shifted = key + np.dot(offset, radix)
        lo = np.searchsorted(sorted_key, shifted, "left")
        counts = np.searchsorted(sorted_key, shifted, "right") - lo
        for block in np.array_split(np.arange(len(key)), 1 + counts.sum() // (1 << 20)):  # bounded memory
            n = counts[block]
            first = np.repeat(block, n)
            second = order[np.repeat(lo[block], n) + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)]
            pairs = np.stack([first, second], 1)
            pairs = pairs[pairs[:, 0] < pairs[:, 1]] if not any(offset) else np.sort(pairs, 1)
            pairs = pairs[np.abs(probes[pairs[:, 0]] - probes[pairs[:, 1]]).max(1) <= limit]  # cheap test first
            found.append(pairs[np.abs(thumbs[pairs[:, 0]] - thumbs[pairs[:, 1]]).max(1) <= limit])
    return np.concatenate(found)


def merge_copies_of_one_image(found: Found, images: ImageRows, ok: np.ndarray) -> np.ndarray:
    """`ok` without the decoded images that are copies of another: a JPEG and its DICOM, a re-encode.

    Different bytes, one image: left in, such a pair could sit in two splits and leak. Two images are
    copies when their 8x8 thumbnails differ nowhere by more than NEAR_COPY_GREY grey levels.
    """
    idx = np.flatnonzero(ok)
    parent = {int(i): int(i) for i in idx}

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in _near_pairs(_thumbnails(images.take(idx)), NEAR_COPY_GREY):
        parent[root(int(idx[b]))] = root(int(idx[a]))
    groups: dict[int, list[int]] = {}
    for i in parent:
        groups.setdefault(root(i), []).append(i)
    ok = ok.copy()
    ok[_merge_copies(found, list(groups.values()), "the same image after decoding")] = False
    return ok


def cause_of(path: str, label: int) -> int:
    """NORMAL 0, bacterial 1, viral 2, from the Kaggle file name (personN_bacteria_M / personN_virus_M); -1: unknown."""
    if label == 0:
        return 0
    name = os.path.basename(path).lower()
    if "_bacteria_" in name:
        return 1
    return 2 if "_virus_" in name else -1


def keep_known_causes(found: Found) -> None:
    """For --task cause: a pneumonia file whose name says neither bacteria nor virus moves to `found.skipped`."""
    known = [cause_of(p, label) >= 0 for p, label in zip(found.paths, found.labels)]
    found.skipped += [(p, "cause unknown: a PNEUMONIA file name with neither _bacteria_ nor _virus_")
                      for p, k in zip(found.paths, known) if not k]
    found.paths = [p for p, k in zip(found.paths, known) if k]
    found.labels = [label for label, k in zip(found.labels, known) if k]


def decode_found(found: Found, cache: ImageCache, workers: int | None = None, progress: bool = True) -> Dataset:
    """De-duplicate and decode what discovery found; unreadable files move to `found.skipped`.

    Every image starts in the 'test' split: scoring uses it as is, training re-splits it.
    """
    deduplicate(found, cache)
    decoded, errors = load_images(found.paths, cache.size, cache, workers, progress)
    images = ImageRows(decoded)
    ok = np.array([e is None for e in errors], dtype=bool)
    found.skipped += [(p, e) for p, e in zip(found.paths, errors) if e is not None]
    ok = merge_copies_of_one_image(found, images, ok)
    paths = [p for p, good in zip(found.paths, ok) if good]
    labels = np.asarray(found.labels, dtype=np.int64)[ok]
    require_two_classes(labels)
    return Dataset(images.take(np.flatnonzero(ok)), labels, paths, [patient_id(p) for p in paths],
                   np.full(len(paths), "test", dtype=object), found, [h for h, good in zip(found.hashes, ok) if good],
                   np.array([cause_of(p, label) for p, label in zip(paths, labels)], dtype=np.int64))


def load_dataset(root: str, image_size: int, split_mode: str, seed: int, cache_dir: str | None, *,
                 workers: int | None = None, progress: bool = True, task: str = "pneumonia") -> Dataset:
    """Discover, de-duplicate, decode (cached) and split every image under `root`.

    With task 'cause' the split is stratified by the three classes, not by the two labels.
    """
    found = find_images(root)
    if not found.paths:
        raise NoImagesFound(f"no images found in NORMAL/ or PNEUMONIA/ folders under '{root}'")
    if task == "cause":
        keep_known_causes(found)
    ds = decode_found(found, ImageCache(cache_dir, cache_size(image_size)), workers, progress)
    strata = ds.causes if task == "cause" else ds.labels
    ds.split = assign_splits(ds.paths, strata, ds.patients, root, split_mode, seed=seed)
    return ds


def _shared_across_splits(keys, split) -> int:
    """How many distinct keys occur in more than one split."""
    where: dict[str, set] = {}
    for k, s in zip(keys, split):
        where.setdefault(k, set()).add(s)
    return sum(len(s) > 1 for s in where.values())


def audit(ds: Dataset) -> dict:
    """Counts per split and label, plus the two leak checks a reviewer asks for first."""
    per_split = {}
    for name in SPLITS:
        idx = ds.split == name
        per_split[name] = {
            "images": int(idx.sum()),
            "patients": len({p for p, i in zip(ds.patients, idx) if i}),
            **{CLASSES[c].lower(): int((idx & (ds.labels == c)).sum()) for c in (0, 1)},
            **{CAUSES[c].lower(): int((idx & (ds.causes == c)).sum()) for c in (1, 2)},
        }
    patient_splits: dict[str, set] = {}
    for p, s in zip(ds.patients, ds.split):
        patient_splits.setdefault(p, set()).add(s)
    reasons: dict[str, int] = {}
    for _, why in ds.found.skipped:
        key = why.split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    return {
        "images": len(ds.paths),
        "splits": per_split,
        "patients_in_several_splits": sum(len(s) > 1 for s in patient_splits.values()),
        "duplicates_across_splits": _shared_across_splits(ds.hashes, ds.split),
        # re-encoded copies differ in bytes but can decode to the same pixels: a subtler leak
        "identical_pixels_across_splits": _shared_across_splits(
            [hashlib.blake2b(im.tobytes(), digest_size=16).hexdigest() for im in ds.images], ds.split),
        "duplicates_merged": len(ds.found.duplicates),
        "skipped": len(ds.found.skipped),
        "skipped_by_reason": reasons,
        "ignored_folders": ds.found.ignored_folders,
    }


def find_labelled(source: str) -> Found:
    """The labelled files of a folder (DIR/**/{NORMAL,PNEUMONIA}/*), or the test rows of a run's split.csv."""
    if source.endswith(".csv"):
        return _split_csv_test_rows(source)
    found = find_images(source)
    if not found.paths:
        raise NoImagesFound(f"no images in NORMAL/ or PNEUMONIA/ folders under '{source}'")
    return found


SPLIT_COLUMNS = ("path", "patient", "label", "split")


def _split_csv_test_rows(source: str) -> Found:
    """The test rows of a run's split.csv; any other CSV is refused with what it lacks."""
    try:
        rows = read_csv(source)
    except (OSError, UnicodeError, csv.Error) as err:
        raise DataError(f"cannot read '{source}' as a run's split.csv ({type(err).__name__}: {err})") from None
    have = list(rows[0]) if rows else []
    missing = [c for c in ("path", "label", "split") if c not in have]
    if missing or not rows:
        raise DataError(f"'{source}' is not a run's split.csv: it needs the columns path, label and split"
                        + (f" and has {', '.join(have) or 'none'}" if rows else " and has no rows"))
    bad = sorted({r["label"] for r in rows} - set(CLASSES))
    if bad:
        raise DataError(f"'{source}' has labels {', '.join(bad)[:80]}; a split.csv holds NORMAL and PNEUMONIA only")
    test = [r for r in rows if r["split"] == "test"]
    return Found(paths=[r["path"] for r in test], labels=[CLASSES.index(r["label"]) for r in test])


def write_split_files(folder: Path, ds: Dataset) -> None:
    """split.csv, skipped.csv and duplicates.csv: every file found is in exactly one of them."""
    write_csv(folder / "split.csv", SPLIT_COLUMNS,
              zip(ds.paths, ds.patients, [CLASSES[i] for i in ds.labels], ds.split))
    write_csv(folder / "skipped.csv", ["path", "reason"], ds.found.skipped)
    write_csv(folder / "duplicates.csv", ["path", "duplicate_of", "why"], ds.found.duplicates)
