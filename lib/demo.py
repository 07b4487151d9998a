"""Synthetic chest-X-ray phantoms for `python main.py --demo`: not real X-rays, not a medical result.

Usage: `make_phantoms("runs/X/demo_data")` writes `images/{NORMAL,PNEUMONIA}/*.png` and `masks/*.png`.
Kept apart from data.py because generating data is a different job from reading it.
"""
from pathlib import Path

import numpy as np
from PIL import Image

from lib.labels import CLASSES

SIZE = 192


def _ellipse(yy, xx, centre, radii) -> np.ndarray:
    (cy, cx), (ry, rx) = centre, radii
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _smooth_noise(rng, size: int, scale: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: random values on a coarse grid, upsampled smoothly."""
    coarse = rng.random((size // scale + 2, size // scale + 2)).astype(np.float32)
    img = Image.fromarray(coarse).resize((size + 2 * scale, size + 2 * scale), Image.BICUBIC)
    return np.clip(np.asarray(img)[scale:scale + size, scale:scale + size], 0, 1)


def _anatomy(rng, patient: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Body, lungs, ribs, spine and heart shadow; returns the image in [0, 1] and the lung mask."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    c = SIZE / 2 + patient.normal(0, 3, 2)
    img = np.full((SIZE, SIZE), 0.05, np.float32)
    img[_ellipse(yy, xx, (c[0] + 10, c[1]), (SIZE * 0.47, SIZE * 0.40))] = 0.45  # soft tissue
    lung_r = SIZE * (0.30 + patient.normal(0, 0.015)), SIZE * 0.14
    left = _ellipse(yy, xx, (c[0] - 2, c[1] - SIZE * 0.19), lung_r)
    right = _ellipse(yy, xx, (c[0] - 2, c[1] + SIZE * 0.19), lung_r)
    lungs = left | right
    img[lungs] = 0.16
    for k in range(7):  # ribs: bright arcs over the lungs
        arc = np.abs(yy - (c[0] - SIZE * 0.27 + k * SIZE * 0.085 + 0.0025 * (xx - c[1]) ** 2 * 0.5)) < 2.2
        img[arc & lungs] += 0.12
    img[np.abs(xx - c[1]) < SIZE * 0.045] = 0.62  # spine
    heart = _ellipse(yy, xx, (c[0] + SIZE * 0.12, c[1] - SIZE * 0.05), (SIZE * 0.13, SIZE * 0.12))
    img[heart] = 0.55
    lungs &= ~heart
    img += 0.06 * (_smooth_noise(rng, SIZE, 16) - 0.5) + rng.normal(0, 0.015, img.shape).astype(np.float32)
    return img, lungs


def _opacities(rng, lungs: np.ndarray) -> np.ndarray:
    """One to three patchy blobs inside the lungs: the 'pneumonia' the model must find."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    ys, xs = np.nonzero(lungs)
    density = np.zeros((SIZE, SIZE), np.float32)
    for _ in range(rng.integers(1, 4)):
        i = rng.integers(len(ys))
        r = rng.uniform(9, 16)
        density += np.exp(-(((yy - ys[i]) ** 2 + (xx - xs[i]) ** 2) / (2 * r * r)))
    density *= 0.6 + 0.8 * _smooth_noise(rng, SIZE, 6)  # patchy, not a clean disc
    return np.where(lungs, np.clip(density, 0, 1), 0)


def make_phantoms(out: str | Path, patients_per_class: int = 60, images_per_patient: int = 3, seed: int = 0) -> Path:
    """Write a Kaggle-like labelled folder of phantoms, several images per 'patient', plus lesion masks."""
    out = Path(out)
    for name in ("images/NORMAL", "images/PNEUMONIA", "masks"):  # masks outside the class folders' parent
        (out / name).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    serial = 1000
    for label in CLASSES:
        for p in range(1, patients_per_class + 1):
            patient = np.random.default_rng(rng.integers(2**32))  # shared look across one child's images
            kind = "bacteria" if p % 3 else "virus"
            for k in range(1, images_per_patient + 1):
                img, lungs = _anatomy(rng, np.random.default_rng(patient.integers(2**32)))
                if label == CLASSES[0]:
                    name = f"IM-{p:04d}-{k:04d}.png"
                else:
                    serial += 1
                    name = f"person{p}_{kind}_{serial}.png"
                    density = _opacities(rng, lungs)
                    img += 0.45 * density
                    Image.fromarray(((density > 0.3) * 255).astype(np.uint8)).save(out / "masks" / name)
                Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(out / "images" / label / name)
    (out / "README.txt").write_text("SYNTHETIC phantoms made by demo.py: not real X-rays, not a medical result.\n")
    return out


def make_site(out: str | Path, films: int = 120, pneumonia_share: float = 0.4, gamma: float = 0.95,
              seed: int = 1) -> Path:
    """Write an unlabelled 'new site' of phantoms: a shifted generator (every film's grey levels raised to `gamma`,
    as another exposure would) and flat file names made of each image's own hash, so no name or folder tells a
    label. Returns the folder; the truth goes to a labels.csv beside it, for tests, never read by the product."""
    import hashlib
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth = []
    for i in range(films):
        img, lungs = _anatomy(rng, np.random.default_rng(rng.integers(2**32)))
        sick = i < round(films * pneumonia_share)
        if sick:
            img += 0.45 * _opacities(rng, lungs)
        pixels = (np.clip(img, 0, 1) ** gamma * 255).astype(np.uint8)
        name = hashlib.blake2b(pixels.tobytes(), digest_size=8).hexdigest() + ".png"
        Image.fromarray(pixels).save(out / name)
        truth.append(f"{name},{CLASSES[int(sick)]}")
    (out.parent / f"{out.name}_labels.csv").write_text("file,label\n" + "\n".join(truth) + "\n")
    return out


def load_masks(data_root: str | Path, paths: list[str], size: int) -> np.ndarray:
    """Lesion masks matching `paths` at the stored image size (all-false for images without one)."""
    from lib.images import decode_image  # the same resize as the images
    masks = np.zeros((len(paths), size, size), bool)
    for i, p in enumerate(paths):
        mask = Path(data_root) / "masks" / Path(p).name
        if mask.exists():
            masks[i] = decode_image(str(mask), size) > 127
    return masks
