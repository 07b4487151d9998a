"""Find, audit, split, decode, cache and augment chest X-rays. Usage: `found = find_images("archive")`."""
import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension
from tqdm import tqdm

CLASSES = ("NORMAL", "PNEUMONIA")  # label = index: NORMAL=0, PNEUMONIA=1
JUNK_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
CACHE_VERSION = 2  # bump when decode_image changes what it returns
SPLITS = ("train", "val", "test")


class DataError(Exception):
    """Input that cannot be used; the message says what is wrong and how to fix it."""


class NoImagesFound(DataError):
    """The data folder is missing or holds no images in NORMAL/PNEUMONIA folders."""


@dataclass
class Found:
    """What discovery saw: usable image files, and every other file with the reason it was left out."""

    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (dropped path, kept path)
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
            if has_file_allowed_extension(found, IMG_EXTENSIONS):
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

    torchvision's `find_classes` names the class folders and its extension list picks images; its
    `make_dataset` walk is not used because it follows symlinks without loop detection.
    """
    found, seen = Found(), set()
    if not os.path.isdir(root):
        raise NoImagesFound(f"data folder '{root}' does not exist")
    for class_root in _class_roots(root, found.skipped):
        for name in find_classes(class_root)[0]:
            folder = os.path.join(class_root, name)
            if name.startswith(".") or name in JUNK_NAMES:
                continue  # already recorded by _class_roots
            if name.upper() not in CLASSES:
                warnings.warn(f"ignoring folder '{folder}': not a class (expected NORMAL or PNEUMONIA)")
                found.ignored_folders.append(folder)
                found.skipped.append((folder, "folder is not a class (expected NORMAL or PNEUMONIA)"))
                continue
            for path in _walk(folder, seen, found.skipped):
                if has_file_allowed_extension(path, IMG_EXTENSIONS):
                    found.paths.append(path)
                    found.labels.append(CLASSES.index(name.upper()))
                else:
                    found.skipped.append((path, "not an image file extension"))
    return found


def require_two_classes(labels) -> None:
    """Refuse data with fewer than two classes: a one-class model is meaningless."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=2)
    if len(labels) == 0:
        raise DataError("no usable images found")
    if counts.min() == 0:
        present = CLASSES[int(counts.argmax())]
        raise DataError(f"only {present} images were found ({counts.max()}); put both NORMAL/ and PNEUMONIA/ folders under the data folder")


# ---------------------------------------------------------------- patients and splits
_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+", re.IGNORECASE),
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE),
)


def patient_id(path: str) -> str:
    """The child an image belongs to, from Kaggle's file names; an unknown name is its own patient."""
    name = os.path.basename(path)
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1)
    return "file:" + path


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
    for name in names:
        for label in (0, 1):
            if not np.any((split == name) & (labels == label)):
                n_pat = [len(np.unique(groups[labels == c])) for c in (0, 1)]
                raise DataError(
                    f"too few patients for a {shares} split: {n_pat[0]} NORMAL and {n_pat[1]} PNEUMONIA "
                    f"patients leave the {name} split without {CLASSES[label]} images; add data (a few "
                    f"patients of each class per split at least)"
                )


def assign_splits(paths, labels, patients, root: str, mode: str, seed: int) -> np.ndarray:
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


# ---------------------------------------------------------------- decoding
def cache_size(image_size: int) -> int:
    """Stored image side: 10% larger than the model input, so cropping can remove the edges."""
    return int(round(image_size * 1.1))


def _to_gray(img: Image.Image) -> Image.Image:
    """8-bit grayscale; 16-bit and float images are stretched over their own range rather than clipped."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.round(arr).astype(np.uint8), "L")
    return img if img.mode == "L" else img.convert("L")


def decode_image(path: str, size: int) -> np.ndarray:
    """Decode any image to a size x size uint8 grayscale array; JPEGs decode straight to near that size.

    `draft` lets libjpeg scale by 1/2, 1/4 or 1/8 inside the IDCT, which is most of the cost of a
    2000x1500 X-ray. It is asked for twice the final size: the DCT's box-like scaling alone drifts up
    to 3 grey levels from a full decode, while leaving the last halving to Pillow's antialiased resize
    stays within 1.3 (measured on the 120 full-resolution samples). Pillow's decompression-bomb
    warning is raised as an error, so such files are refused. Raises on any unreadable file.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("L", (2 * size, 2 * size))
            img = ImageOps.exif_transpose(img)
            gray = _to_gray(img)
            return np.asarray(gray.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def decode_naive(path: str, size: int) -> np.ndarray:
    """The reference decode: full-resolution decode, grayscale, resize (used in tests and benchmarks)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("L").resize((size, size), Image.BILINEAR), dtype=np.uint8)


def file_hash(path: str) -> str:
    """Content hash of a file (blake2b: as safe as sha256 for dedup and about twice as fast)."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename: a killed run leaves no half file."""
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
        if isinstance(err, OSError):  # name the file the caller asked for, not the temp file
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


class ImageCache:
    """Decoded images on disk keyed by content hash, image size and format version; None disables it.

    A small index maps (path, size, mtime) to the content hash so a second run need not re-read files.
    """

    def __init__(self, directory: str | None, size: int):
        self.size = size
        self.dir = Path(directory) / f"v{CACHE_VERSION}-{size}px" if directory else None
        self.index = {}
        if self.dir and (self.dir / "index.json").exists():
            try:
                self.index = json.loads((self.dir / "index.json").read_text())
            except (OSError, ValueError):
                self.index = {}  # a damaged index only costs re-hashing

    def hash(self, path: str) -> str:
        """Content hash of `path`, from the index when size and mtime are unchanged."""
        st = os.stat(path)
        key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self.index:
            self.index[key] = file_hash(path)
        return self.index[key]

    def entry(self, digest: str) -> Path | None:
        """Where the decoded image of that content lives (None without a cache)."""
        return self.dir / digest[:2] / f"{digest}.npy" if self.dir else None

    def save_index(self) -> None:
        """Persist the path-to-hash index atomically."""
        if self.dir:
            atomic_write(self.dir / "index.json", lambda f: f.write(json.dumps(self.index).encode()))


def _decode_job(job: tuple[str, int, str | None]) -> tuple[np.ndarray | None, str | None]:
    """Decode one file (in a worker process) and store it in the cache; returns (image, error)."""
    path, size, entry = job
    try:
        image = decode_image(path, size)
    except Exception as err:  # any unreadable file is skipped with its reason, never fatal
        return None, f"unreadable image: {type(err).__name__}: {err}".splitlines()[0][:200]
    if entry:
        atomic_write(Path(entry), lambda f: np.save(f, image))
    return image, None


def decode_stream(paths: list[str], size: int, cache: ImageCache, workers: int | None = None,
                  progress: bool = True):
    """Yield (index, image or None, error or None) for every path: cache hits first, then each decode
    as soon as worker processes finish it, so a consumer can work while later files decode."""
    todo, jobs = [], []
    for i, path in enumerate(paths):
        try:
            entry = cache.entry(cache.hash(path)) if cache.dir else None
        except OSError as err:
            yield i, None, f"unreadable file: {err.strerror}"
            continue
        if entry is not None and entry.exists():
            try:
                image = np.load(entry)
            except (OSError, ValueError):
                image = None  # a damaged entry is decoded again
            if image is not None:
                yield i, image, None
                continue
        todo.append(i)
        jobs.append((path, size, str(entry) if entry else None))
    # at least 8 files per worker: for fewer, starting a process costs more than it saves
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs) // 8))
    bar = tqdm(total=len(jobs), desc="decoding images (once)", unit="img", disable=not progress or not jobs)
    try:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                chunk = max(1, min(16, len(jobs) // (4 * workers)))  # small chunks: results flow early
                for i, (image, err) in zip(todo, pool.map(_decode_job, jobs, chunksize=chunk)):
                    bar.update()
                    yield i, image, err
        else:
            for i, job in zip(todo, jobs):
                image, err = _decode_job(job)
                bar.update()
                yield i, image, err
    finally:
        bar.close()
        cache.save_index()


def load_images(paths: list[str], size: int, cache: ImageCache, workers: int | None = None,
                progress: bool = True) -> tuple[np.ndarray, list[str | None]]:
    """Decode `paths` to an N x size x size uint8 array, from the cache where possible.

    Returns the images and, per path, None or the reason it could not be read (its image is zeros).
    """
    images = np.zeros((len(paths), size, size), dtype=np.uint8)
    errors: list[str | None] = [None] * len(paths)
    for i, image, err in decode_stream(paths, size, cache, workers, progress):
        if image is not None:
            images[i] = image
        errors[i] = err
    return images, errors


@dataclass
class Dataset:
    """Decoded, de-duplicated images with labels, patients and split, plus what was left out."""

    images: np.ndarray  # N x S x S uint8
    labels: np.ndarray
    paths: list[str]
    patients: list[str]
    split: np.ndarray
    found: Found
    hashes: list[str]

    def subset(self, name: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """(N x 1 x S x S uint8 images, float labels, indices) of one split."""
        idx = np.flatnonzero(self.split == name)
        return torch.from_numpy(self.images[idx]).unsqueeze(1), torch.from_numpy(self.labels[idx]).float(), idx


def deduplicate(found: Found, cache: ImageCache) -> None:
    """Keep one copy of byte-identical files (the shortest path); copies under both labels are dropped."""
    by_hash: dict[str, list[int]] = {}
    for i, path in enumerate(found.paths):
        try:
            by_hash.setdefault(cache.hash(path), []).append(i)
        except OSError as err:
            found.skipped.append((path, f"unreadable file: {err.strerror}"))
    keep = []
    for members in by_hash.values():
        members.sort(key=lambda i: (found.paths[i].count(os.sep), found.paths[i]))
        if len({found.labels[i] for i in members}) > 1:
            found.skipped += [(found.paths[i], "identical bytes filed under both NORMAL and PNEUMONIA") for i in members]
            continue
        keep.append(members[0])
        found.duplicates += [(found.paths[i], found.paths[members[0]]) for i in members[1:]]
    keep.sort()
    hashes = {i: h for h, members in by_hash.items() for i in members}
    found.paths = [found.paths[i] for i in keep]
    found.labels = [found.labels[i] for i in keep]
    found.hashes = [hashes[i] for i in keep]


def decode_found(found: Found, cache: ImageCache, workers: int | None = None, progress: bool = True) -> Dataset:
    """De-duplicate and decode what discovery found; unreadable files move to `found.skipped`.

    Every image starts in the 'test' split: scoring uses it as is, training re-splits it.
    """
    deduplicate(found, cache)
    images, errors = load_images(found.paths, cache.size, cache, workers, progress)
    ok = np.array([e is None for e in errors], dtype=bool)
    found.skipped += [(p, e) for p, e in zip(found.paths, errors) if e is not None]
    paths = [p for p, good in zip(found.paths, ok) if good]
    labels = np.asarray(found.labels, dtype=np.int64)[ok]
    require_two_classes(labels)
    return Dataset(images[ok], labels, paths, [patient_id(p) for p in paths],
                   np.full(len(paths), "test", dtype=object), found, [h for h, good in zip(found.hashes, ok) if good])


def load_dataset(root: str, image_size: int, split_mode: str, seed: int, cache_dir: str | None,
                 workers: int | None = None, progress: bool = True) -> Dataset:
    """Discover, de-duplicate, decode (cached) and split every image under `root`."""
    found = find_images(root)
    if not found.paths:
        raise NoImagesFound(f"no images found in NORMAL/ or PNEUMONIA/ folders under '{root}'")
    ds = decode_found(found, ImageCache(cache_dir, cache_size(image_size)), workers, progress)
    ds.split = assign_splits(ds.paths, ds.labels, ds.patients, root, split_mode, seed)
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


# ---------------------------------------------------------------- tensors and augmentation
PADDING = ("border", "reflection", "zeros")
INTENSITY = ("dataset", "image")


@dataclass
class Augment:
    """Training augmentation for acquisition shift; every value is drawn per image, uniformly in +-range.

    Geometry (rotation, per-axis zoom, which changes size and aspect ratio, translation) is one affine
    resampling of the whole batch; intensity (gamma, contrast, brightness, noise) follows in [0, 1].
    `padding` fills what the resampling pulls in from outside the stored image.
    """

    rotation: float = 15.0  # degrees
    zoom: float = 0.25  # each axis scaled by a factor in [1/(1+zoom), 1+zoom], log-uniform
    translate: float = 0.0  # extra shift, as a fraction of the side, beyond the random crop position
    gamma: float = 0.5  # x ** exp(u), u in +-gamma: keeps black and white, bends the grey levels
    contrast: float = 0.3  # (x - image mean) * (1 + u) + image mean
    brightness: float = 0.1  # + u, in [0, 1] grey units
    noise: float = 0.0  # std of added Gaussian noise, in [0, 1] grey units
    padding: str = "border"
    sharpness: float = 0.0  # x + u (3x3 box blur of x - x): u > 0 blurs, u < 0 sharpens

    @classmethod
    def plain(cls, rotation: float = 15.0) -> "Augment":
        """The original project's transform: rotation and crop position only, zero padding."""
        return cls(rotation, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, "zeros", 0.0)


def centre_crop(images, size: int):
    """The centre size x size of the last two axes (numpy or torch): edges, markers and text cut off."""
    offset = (images.shape[-1] - size) // 2
    return images[..., offset:offset + size, offset:offset + size]


def _uniform(shape, generator: torch.Generator, bound: float) -> torch.Tensor:
    """Uniform draws in [-bound, bound] from the training generator (on the CPU, so runs are reproducible)."""
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


@dataclass
class Preprocess:
    """Turns stored uint8 images into model input: crop the edges to `image_size`, normalise.

    `intensity` 'dataset' normalises with the training split's mean and std; 'image' standardises
    each image by its own mean and std, the same in training and scoring. Training batches are
    also augmented (see Augment) in one batched pass.
    """

    image_size: int
    mean: float = 0.5
    std: float = 0.25
    augment: Augment = field(default_factory=Augment)
    intensity: str = "dataset"

    def crop(self, batch: torch.Tensor) -> torch.Tensor:
        """Centre crop of a uint8 N x 1 x S x S batch, as floats in [0, 1]: the pixels the model sees."""
        return centre_crop(batch, self.image_size).float() / 255.0

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Standardise [0, 1] images by the dataset statistics or by each image's own."""
        if self.intensity == "image":
            mean = x.mean((1, 2, 3), keepdim=True)
            return (x - mean) / x.std((1, 2, 3), keepdim=True).clamp_min(1e-3)
        return (x - self.mean) / self.std

    def eval(self, batch: torch.Tensor) -> torch.Tensor:
        """Centre crop and normalise a uint8 N x 1 x S x S batch."""
        return self.normalise(self.crop(batch))

    def train(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment (geometry, then intensity) and normalise a uint8 batch.

        Draws only what the settings use, in a fixed order, so `Augment.plain()` reproduces the
        original rotation-and-crop transform draw for draw.
        """
        a, n, side = self.augment, batch.shape[0], batch.shape[-1]
        angle = torch.deg2rad(_uniform(n, generator, a.rotation))
        # crop position plus extra translation; written as (u * pixels) / side to match the original rounding
        shift = _uniform((n, 2), generator, 1.0) * (side - self.image_size + 2 * a.translate * side) / side
        zoom = torch.exp(_uniform((n, 2), generator, math.log1p(a.zoom))) if a.zoom else torch.ones(n, 2)
        scale = self.image_size / side  # the output grid covers image_size / zoom of the side pixels
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        zx, zy = zoom[:, 0], zoom[:, 1]
        theta = torch.stack([torch.stack([cos / zx, -sin / zy, shift[:, 0]], 1),
                             torch.stack([sin / zx, cos / zy, shift[:, 1]], 1)], 1).to(batch.device)
        grid = F.affine_grid(theta, [n, 1, self.image_size, self.image_size], align_corners=False)
        x = F.grid_sample(batch.float() / 255.0, grid, mode="bilinear", padding_mode=a.padding, align_corners=False)
        return self.normalise(self._intensity(x, generator))

    def _intensity(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Gamma, contrast, brightness, sharpness and noise per image, on [0, 1] images; the result stays in [0, 1]."""
        a, n, dev = self.augment, x.shape[0], x.device

        def per_image(bound):
            return _uniform(n, generator, bound).view(n, 1, 1, 1).to(dev)

        if a.gamma:
            x = x.clamp(0, 1) ** torch.exp(per_image(a.gamma))
        if a.contrast or a.brightness:
            mean = x.mean((1, 2, 3), keepdim=True)
            x = ((x - mean) * (1 + per_image(a.contrast)) + mean + per_image(a.brightness)).clamp(0, 1)
        if a.sharpness:
            blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
            x = (x + per_image(a.sharpness) * (blurred - x)).clamp(0, 1)
        if a.noise:
            x = (x + a.noise * torch.randn(x.shape, generator=generator).to(dev)).clamp(0, 1)
        return x

    def state(self) -> dict:
        """Plain-type settings for a checkpoint."""
        return {"image_size": self.image_size, "mean": self.mean, "std": self.std,
                "augment": vars(self.augment).copy(), "intensity": self.intensity}

    @classmethod
    def from_state(cls, state: dict) -> "Preprocess":
        """Rebuild from `state()`; checkpoints of format 1 stored only `max_rotation`."""
        state = dict(state)
        augment = Augment(**state.pop("augment")) if "augment" in state else Augment.plain(state.pop("max_rotation", 15.0))
        return cls(**state, augment=augment)


def fit_normalisation(images: np.ndarray, image_size: int) -> tuple[float, float]:
    """Mean and std of the centre crops of the training images, in [0, 1] units."""
    crop = centre_crop(images, image_size).astype(np.float64) / 255.0
    return float(crop.mean()), float(crop.std())


def batches(n: int, batch_size: int, generator: torch.Generator | None = None):
    """Index batches over n items: shuffled when a generator is given, in order otherwise."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]
