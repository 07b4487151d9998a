"""Decode chest X-rays once to small grayscale arrays, and keep them in a disk cache keyed by content.

Usage: `images, errors = load_images(paths, cache_size(128), ImageCache(cache_dir, cache_size(128)))`.
"""
import hashlib
import json
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from runs import atomic_write

CACHE_VERSION = 2  # bump when decode_image changes what it returns


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


def load_images(paths: list[str], size: int, cache: ImageCache, workers: int | None = None,
                progress: bool = True) -> tuple[np.ndarray, list[str | None]]:
    """Decode `paths` to an N x size x size uint8 array, from the cache where possible.

    Returns the images and, per path, None or the reason it could not be read (its image is zeros).
    """
    images = np.zeros((len(paths), size, size), dtype=np.uint8)
    errors: list[str | None] = [None] * len(paths)
    todo, jobs = [], []
    for i, path in enumerate(paths):
        try:
            entry = cache.entry(cache.hash(path)) if cache.dir else None
        except OSError as err:
            errors[i] = f"unreadable file: {err.strerror}"
            continue
        if entry is not None and entry.exists():
            try:
                images[i] = np.load(entry)
                continue
            except (OSError, ValueError):
                pass  # a damaged entry is decoded again
        todo.append(i)
        jobs.append((path, size, str(entry) if entry else None))
    # every core, but at least 8 files per worker: for fewer, starting a process costs more than it saves
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs) // 8))
    bar = tqdm(total=len(jobs), desc="decoding images (once)", unit="img", disable=not progress or not jobs)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = pool.map(_decode_job, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers))))
            for i, (image, err) in zip(todo, results):
                images[i], errors[i] = (image if image is not None else 0), err
                bar.update()
    else:
        for i, job in zip(todo, jobs):
            image, errors[i] = _decode_job(job)
            images[i] = image if image is not None else 0
            bar.update()
    bar.close()
    cache.save_index()
    return images, errors
