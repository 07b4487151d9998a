"""The decode cache: one memory-mapped uint8 array per dataset and image size, built once and shared by every process.

Usage: `images, errors = load_images(paths, cache_size(160), ImageCache(cache_dir, cache_size(160)))`.
Each dataset (its files' content hashes, in order) gets `<key>.u8`, N x S x S raw bytes, and `<key>.json`,
its index: the content hash, decode error and CRC-32 of every row. Both are written through a temp file
and renamed, and every row's CRC is checked on load, so a damaged or truncated array is rebuilt, never
used; rows of other arrays in the folder are reused by content hash, so a changed file costs one decode.
The array is mapped read-only: processes on one machine share its pages through the kernel's page
cache, and an archive larger than RAM trains without being loaded whole. A cache folder that is
read-only or full costs speed, never the run: one warning, then the images are decoded into memory.
"""
import hashlib
import json
import mmap
import os
import signal
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from lib import images as decoding
from lib import progress
from lib.runs import atomic_write

CACHE_VERSION = 3  # bump when images.decode_image changes what it returns
RELEASE_BYTES = 64 << 20  # mapped pages a process keeps resident before handing them back to the page cache


def file_hash(path: str) -> str:
    """Content hash of a file (blake2b: as safe as sha256 for dedup and about twice as fast)."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _crc(row: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(row).data)


class ImageCache:
    """Where decoded datasets of one image size live (None: nowhere), with a (path, size, mtime) -> content hash
    index."""

    def __init__(self, directory: str | None, size: int):
        self.size = size
        self.dir = Path(directory) / f"v{CACHE_VERSION}-{size}px" if directory else None
        self.index = {}
        self.warned = False
        if self.dir and (self.dir / "hashes.json").exists():
            try:
                self.index = json.loads((self.dir / "hashes.json").read_text())
            except (OSError, ValueError):
                self.index = {}  # a damaged index only costs re-hashing

    def hash(self, path: str) -> str:
        """Content hash of `path`, from the index when size and mtime are unchanged."""
        st = os.stat(path)
        key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self.index:
            self.index[key] = file_hash(path)
        return self.index[key]

    def key(self, hashes: list[str | None]) -> str:
        """The name of the array holding exactly these contents, in this order."""
        text = "\n".join(h or "-" for h in hashes)
        return hashlib.blake2b(f"{CACHE_VERSION}|{self.size}|{text}".encode(), digest_size=16).hexdigest()

    def open(self, key: str, hashes: list[str | None]) -> tuple[np.ndarray, list[str | None]] | None:
        """The array `key`, mapped read-only, and its decode errors; None unless every row checks out."""
        index = self._read_index(self.dir / f"{key}.json")
        if index is None or index["hashes"] != hashes:
            return None
        rows = _checked_rows(self.dir / f"{key}.u8", index, self.size)
        if rows is None or not rows.all():
            return None
        return map_array(self.dir / f"{key}.u8", len(hashes), self.size), index["errors"]

    def known_rows(self) -> dict[str, tuple[Path, int]]:
        """content hash -> (array file, row) of every intact row of every array in the folder, to reuse."""
        found = {}
        for path in sorted(self.dir.glob("*.json")) if self.dir and self.dir.is_dir() else []:
            index = self._read_index(path)
            rows = _checked_rows(path.with_suffix(".u8"), index, self.size) if index else None
            for row in np.flatnonzero(rows) if rows is not None else []:
                if index["hashes"][row] and index["errors"][row] is None:
                    found.setdefault(index["hashes"][row], (path.with_suffix(".u8"), int(row)))
        return found

    @staticmethod
    def _read_index(path: Path) -> dict | None:
        try:
            index = json.loads(path.read_text())
            return index if index.get("version") == CACHE_VERSION else None
        except (OSError, ValueError, AttributeError):
            return None

    def save_hashes(self) -> None:
        """Persist the path-to-hash index atomically; a folder that cannot be written only costs re-hashing."""
        if self.dir:
            try:
                atomic_write(self.dir / "hashes.json", lambda f: f.write(json.dumps(self.index).encode()))
            except OSError:
                pass  # warned about once by load_images

    def warn(self, err: OSError) -> None:
        """One warning per cache: it cannot be written, so images stay in memory."""
        if not self.warned:
            warnings.warn(f"decode cache '{self.dir}' cannot be written ({err.strerror or err}): decoding into memory "
                          f"instead; this run is unaffected but the next one decodes again", stacklevel=3)
            self.warned = True


def _checked_rows(path: Path, index: dict, size: int) -> np.ndarray | None:
    """Per row of an array file, whether its bytes match the CRC in the index (False past a truncated end)."""
    row_bytes = size * size
    try:
        n = min(len(index["hashes"]), os.path.getsize(path) // row_bytes)
        good = np.zeros(len(index["hashes"]), dtype=bool)
        with open(path, "rb") as f:  # read, not mapped: checking a large array must not fill this process
            for start in range(0, n, 1024):
                block = np.frombuffer(f.read(row_bytes * min(1024, n - start)), np.uint8).reshape(-1, size, size)
                good[start:start + len(block)] = [_crc(r) == c for r, c in zip(block, index["crc"][start:])]
        return good
    except (OSError, KeyError, TypeError, ValueError):
        return None


def map_array(path: Path, n: int, size: int) -> np.ndarray:
    """An N x S x S read-only array backed by the file's pages (its .base chain ends at the mmap)."""
    if n == 0:
        return np.zeros((0, size, size), dtype=np.uint8)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), n * size * size, access=mmap.ACCESS_READ)
    return np.frombuffer(mapped, dtype=np.uint8).reshape(n, size, size)


def _decode_job(job: tuple[str, int]) -> tuple[np.ndarray | None, str | None, float]:
    """Decode one file (in a worker process); returns (image, None, colourfulness) or (None, the reason it is
    skipped, NaN)."""
    path, size = job
    try:
        image, colour = decoding.decode_with_colour(path, size)
        return image, None, colour
    except decoding.NotARadiograph as err:
        return None, str(err), float("nan")
    except Exception as err:  # any unreadable file is skipped with its reason, never fatal
        return None, f"unreadable image: {type(err).__name__}: {err}".splitlines()[0][:200], float("nan")


def _decode_all(paths: list[str], size: int, todo: list[int], put, workers: int | None, *, show: bool,
                colours: np.ndarray | None = None) -> None:
    """Decode paths[i] for i in todo, on every core, handing each (i, image or None, error) to `put`, and each
    file's colourfulness to `colours` when given."""
    jobs = [(paths[i], size) for i in todo]
    # every core, but at least 8 files per worker: for fewer, starting a process costs more than it saves
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs) // 8))
    bar = progress.track(len(jobs), "decoding images (once)", "images", show)
    pool = ProcessPoolExecutor(workers, initializer=_leave_interrupts_to_parent) if workers > 1 else _Serial()
    try:
        results = pool.map(_decode_job, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers))))
        for i, (image, err, colour) in zip(todo, results):
            put(i, image, err)
            if colours is not None:
                colours[i] = colour
            bar.update()
    except BaseException:  # Ctrl-C: drop the queued files instead of decoding them all before leaving
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    bar.close()


def _leave_interrupts_to_parent() -> None:
    """A decode worker ignores Ctrl-C, which the terminal sends to every process: the parent stops the pool, so
    one line is printed instead of a traceback per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Serial:
    """A pool of no processes: map in this one."""

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass

    @staticmethod
    def map(fn, jobs, chunksize=1):
        return map(fn, jobs)


def load_images(paths: list[str], size: int, cache: ImageCache, workers: int | None = None,
                show: bool = True, *, colours: np.ndarray | None = None) -> tuple[np.ndarray, list[str | None]]:
    """Decode `paths` to an N x size x size uint8 array (mapped from the cache when it has one).

    Returns the images and, per path, None or the reason it could not be read (its image is zeros).
    Without a cache, `colours` (NaN-filled, one per path) receives each decoded file's colourfulness.
    """
    hashes: list[str | None] = []
    unreadable: dict[int, str] = {}
    for i, path in enumerate(paths):
        try:
            hashes.append(cache.hash(path) if cache.dir else None)
        except OSError as err:
            hashes.append(None)
            unreadable[i] = f"unreadable file: {err.strerror}"
    if cache.dir:
        key = cache.key(hashes)
        try:
            opened = cache.open(key, hashes)
            if opened is None:  # the CRCs were just computed from the images written: no second read to check them
                errors = _build(cache, key, paths, hashes, unreadable, workers=workers, show=show)
                opened = map_array(cache.dir / f"{key}.u8", len(paths), size), errors
        except OSError as err:  # read-only folder, no space left, a file that cannot be mapped: slower, never fatal
            cache.warn(err)
            opened = None
        cache.save_hashes()
        if opened is not None:
            return opened
    images = np.zeros((len(paths), size, size), dtype=np.uint8)
    errors: list[str | None] = [unreadable.get(i) for i in range(len(paths))]

    def put(i, image, err):
        images[i], errors[i] = (image if image is not None else 0), err
    _decode_all(paths, size, [i for i in range(len(paths)) if i not in unreadable], put, workers, show=show,
                colours=colours)
    return images, errors


def _build(cache: ImageCache, key: str, paths: list[str], hashes: list[str | None], unreadable: dict[int, str],
           *, workers: int | None, show: bool) -> list[str | None]:
    """Write the array `key`: rows other arrays hold are copied, the rest decoded; then its index, both atomically.
    Returns the decode error (or None) of every row.

    Rows are written with pwrite, never through a mapping, so a full disk raises an OSError here
    instead of killing the process.
    """
    size, row_bytes = cache.size, cache.size * cache.size
    known = cache.known_rows()
    errors: list[str | None] = [unreadable.get(i) for i in range(len(paths))]
    crc = [0] * len(paths)
    cache.dir.mkdir(parents=True, exist_ok=True)
    final = cache.dir / f"{key}.u8"
    tmp = cache.dir / f".tmp-{key}-{os.getpid()}.u8"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        def put(i, image, err):
            image = image if image is not None else np.zeros((size, size), np.uint8)
            errors[i], crc[i] = err if err is not None else errors[i], _crc(image)
            if os.pwrite(fd, image.tobytes(), i * row_bytes) != row_bytes:
                raise OSError(28, "short write: no space left on device", str(tmp))
        todo = []
        for i, h in enumerate(hashes):
            if h in known and i not in unreadable:
                source, row = known[h]
                with open(source, "rb") as f:
                    f.seek(row * row_bytes)
                    put(i, np.frombuffer(f.read(row_bytes), np.uint8).reshape(size, size), None)
            elif i in unreadable:
                put(i, None, unreadable[i])
            else:
                todo.append(i)
        _decode_all(paths, size, todo, put, workers, show=show)
        os.close(fd)
        fd = -1
        os.replace(tmp, final)
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp.exists():
            tmp.unlink()
    index = {"version": CACHE_VERSION, "size": size, "hashes": hashes, "errors": errors, "crc": crc}
    atomic_write(cache.dir / f"{key}.json", lambda f: f.write(json.dumps(index).encode()))
    return errors


def _mapping(array: np.ndarray) -> mmap.mmap | None:
    """The mmap an array's memory comes from, or None for an array in memory."""
    base = array
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.base if isinstance(base, np.ndarray) else base.obj
    return base if isinstance(base, mmap.mmap) else None


class _Source:
    """The whole decoded array, plus how many mapped bytes this process has touched since it last let them go."""

    def __init__(self, array: np.ndarray):
        self.array, self.mapping, self.touched = array, _mapping(array), 0

    def read(self, rows) -> np.ndarray:
        """A copy of the rows asked for. Pages of a mapped array are released every RELEASE_BYTES read:
        they stay in the kernel's page cache, shared, but stop counting in this process's resident set."""
        out = self.array[rows]
        if self.mapping is not None:
            self.touched += out.nbytes
            if self.touched > RELEASE_BYTES:
                self.mapping.madvise(mmap.MADV_DONTNEED)
                self.touched = 0
        return out


class ImageRows:
    """Some rows of a decoded N x S x S uint8 array, indexed like an array of just those rows.

    Indexing reads only the rows asked for, so a split of a mapped archive never has to fit in memory.
    """

    def __init__(self, array, rows: np.ndarray | None = None):
        self.source = array if isinstance(array, _Source) else _Source(array)
        self.rows = np.arange(len(self.source.array)) if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.rows), *self.source.array.shape[1:])

    def __getitem__(self, idx) -> np.ndarray:
        return self.source.read(self.rows[idx])

    def take(self, idx) -> "ImageRows":
        """A view of some of these rows (an index array or a boolean mask), nothing read."""
        return ImageRows(self.source, self.rows[idx])

    def chunks(self, n: int = 1024):
        """The images in order, n at a time."""
        for start in range(0, len(self.rows), n):
            yield self[start:start + n]

    def __iter__(self):
        for chunk in self.chunks():
            yield from chunk

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class TensorRows:
    """ImageRows as the N x 1 x S x S uint8 tensor training and scoring index: `images[idx]` reads those rows only."""

    def __init__(self, rows: ImageRows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        n, h, w = self.rows.shape
        return n, 1, h, w

    def __getitem__(self, idx) -> torch.Tensor:
        idx = idx.cpu().numpy() if isinstance(idx, torch.Tensor) else idx
        return torch.from_numpy(self.rows[idx]).unsqueeze(1)

    def take(self, idx) -> "TensorRows":
        """A view of some of these rows, nothing read."""
        return TensorRows(self.rows.take(idx.cpu().numpy() if isinstance(idx, torch.Tensor) else idx))

    def to(self, device: torch.device) -> torch.Tensor:
        """All rows as one tensor on `device`, copied a chunk at a time."""
        out = torch.empty(self.shape, dtype=torch.uint8, device=device)
        for start in range(0, len(self), 4096):
            out[start:start + 4096] = self[slice(start, start + 4096)].to(device)
        return out
