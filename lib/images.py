"""Decode one chest X-ray (JPEG, PNG, ... or DICOM) to a small grayscale array; cache.py keeps the results.

Usage: `image = decode_image(path, cache_size(128))`; `image, colour = decode_with_colour(path, size)`.
DICOM files follow the display pipeline of PS3.3 C.11: Modality LUT (rescale), then the VOI LUT or
window, then MONOCHROME1 inversion; `header(path)` reads what predict warns about without the pixels.
"""
import functools
import re
import warnings
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.pixels import apply_modality_lut

DICOM_SUFFIXES = (".dcm", ".dicom")
FRONTAL_VIEWS = {"", "AP", "PA"}  # ViewPosition values of a frontal chest film (empty: not recorded)
CHEST_PARTS = {"", "CHEST", "THORAX", "LUNG", "PORT CHEST"}  # BodyPartExamined values of a chest film
MAX_ASPECT = 2.5  # longer side / shorter side; the Kaggle originals run from 1.0 to 2.4
ADULT_YEARS = 18  # PatientAge from which a film is flagged: the training children were 1 to 5 years old
AGE_UNITS = {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}  # PatientAge (DICOM AS) units per year


class NotARadiograph(ValueError):
    """A readable file whose content is not one grayscale radiograph; the message is the reason it is skipped."""


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


def is_dicom(path: str) -> bool:
    """A .dcm/.dicom file, or an extension-less file with the DICOM preamble ('DICM' at byte 128)."""
    suffix = Path(path).suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix:
        return False
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


@functools.lru_cache(maxsize=4096)
def header(path: str) -> dict:
    """What a DICOM header says about the image, without reading the pixels (cached per path and process)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {"patient": str(ds.get("PatientID", "") or ""), "view": str(ds.get("ViewPosition", "") or "").upper(),
            "body_part": str(ds.get("BodyPartExamined", "") or "").upper(),
            "photometric": str(ds.get("PhotometricInterpretation", "") or ""),
            "width": int(ds.get("Columns", 0) or 0), "height": int(ds.get("Rows", 0) or 0),
            "age": str(ds.get("PatientAge", "") or "").strip(), "sex": str(ds.get("PatientSex", "") or "").strip(),
            "manufacturer": str(ds.get("Manufacturer", "") or "").strip(),
            "station": str(ds.get("StationName", "") or "").strip()}


def age_in_years(text: str) -> float | None:
    """A PatientAge in years: the standard's nnnD/W/M/Y ("062Y", "018M"), or a bare number of years ("62", written
    by some systems against the standard); None when empty or unreadable."""
    match = re.fullmatch(r"(\d{1,3})\s*([DWMY]?)", text.strip().upper())
    if not match:
        return None
    return int(match[1]) / AGE_UNITS[match[2] or "Y"]


def age_problem(facts: dict) -> str | None:
    """Why a header's PatientAge says this film is not of the training population (an adult), or None."""
    years = age_in_years(facts.get("age", ""))
    if years is not None and years >= ADULT_YEARS:
        return f"an adult (PatientAge {facts['age']}): the model learned from children aged 1 to 5"
    return None


def view_problem(facts: dict) -> str | None:
    """Why a DICOM header says this is not a frontal chest film, or None."""
    if facts["view"] not in FRONTAL_VIEWS:
        return f"not a frontal view (ViewPosition {facts['view']})"
    if facts["body_part"] not in CHEST_PARTS:
        return f"not a chest image (BodyPartExamined {facts['body_part']})"
    return None


def describe(path: str) -> dict:
    """Header facts of any image file: its size and mode, plus for DICOM the photometric, view, body part and
    patient."""
    if is_dicom(path):
        return {**header(path), "mode": "DICOM"}
    with Image.open(path) as img:  # reads the header only
        width, height = img.size
        mode = img.mode
    return {"patient": "", "view": "", "body_part": "", "photometric": "", "width": width, "height": height,
            "mode": mode, "age": ""}


def input_checks(path: str, image: np.ndarray, prep, facts: dict | None = None) -> tuple[list[str], list[str]]:
    """What the header (`facts`, read when not given) and grey level say about one decoded image: notes, and flags
    (not the training films' kind).

    Notes: an inverted (MONOCHROME1) source, a size or aspect unlike the training films. Flags: not a
    frontal chest view, an adult's PatientAge, a mean grey level outside every training image's (`prep.grey_range`).
    """
    facts, notes, flags = facts or describe(path), [], []
    flags += [problem for problem in (view_problem(facts), age_problem(facts)) if problem]
    if facts["photometric"] == "MONOCHROME1":
        notes.append("inverted photometric (MONOCHROME1), turned to MONOCHROME2 before scoring")
    short, long = sorted((facts["width"], facts["height"]))
    if short < image.shape[-1]:
        notes.append(f"small image ({facts['width']}x{facts['height']}), enlarged to {image.shape[-1]} px")
    elif long > MAX_ASPECT * short:
        notes.append(f"unusual aspect ratio ({facts['width']}x{facts['height']})")
    grey = prep.grey_level(image)
    if prep.grey_range and not prep.grey_range[0] <= grey <= prep.grey_range[1]:
        flags.append(f"mean grey level {grey:.2f} outside the training range "
                     f"[{prep.grey_range[0]:.2f}, {prep.grey_range[1]:.2f}]")
    return notes, flags


COLOUR_MODES = {"RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "P", "PA", "LAB", "HSV"}


def colourfulness(path: str) -> float:
    """How colourful a file's picture is (Hasler and Suesstrunk's measure, on [0, 1] grey levels): about 0 for a
    radiograph, even one stored as RGB, and 0.1 or more for a photograph. Grey files cost a header read only;
    colour JPEGs decode at 1/8 scale. predict measures it while decoding (decode_with_colour)."""
    if is_dicom(path):
        return 0.0  # a colour DICOM is refused when decoded
    with Image.open(path) as img:
        if img.mode not in COLOUR_MODES:
            return 0.0
        if img.format == "JPEG":
            img.draft("YCbCr", (img.width // 8 or 1, img.height // 8 or 1))
        return _colourfulness(img)


def _colourfulness(img: Image.Image) -> float:
    """Hasler and Suesstrunk's colourfulness of an open colour picture, on a 64 x 64 copy."""
    rgb = np.asarray(img.resize((64, 64), Image.BILINEAR).convert("RGB"), dtype=np.float32) / 255.0
    rg, yb = rgb[..., 0] - rgb[..., 1], (rgb[..., 0] + rgb[..., 1]) / 2 - rgb[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def _dicom_gray(path: str) -> Image.Image:
    """A DICOM radiograph as an 8-bit display image: rescale, VOI LUT or window (else its full range), MONOCHROME1
    inverted."""
    ds = pydicom.dcmread(path)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise NotARadiograph("no pixel data (a report, presentation state or other non-image object)")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if int(ds.get("SamplesPerPixel", 1)) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise NotARadiograph(f"colour image ({photometric or 'no PhotometricInterpretation'}), not a radiograph")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise NotARadiograph(f"{ds.NumberOfFrames} frames (a cine or multi-frame object), not one radiograph")
    check_pixel_budget(int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0))
    stored = ds.pixel_array  # decodes the compressed transfer syntaxes pydicom has a plug-in for
    plain_8bit = int(ds.get("BitsStored", 8)) <= 8 and "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds
    values = apply_modality_lut(stored, ds).astype(np.float64)
    if "VOILUTSequence" in ds:
        unit = _voi_lut(values, ds.VOILUTSequence[0])
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        unit = _window(values, _first(ds.WindowCenter), _first(ds.WindowWidth))
    elif plain_8bit:
        unit = values / 255.0  # 8-bit values with no LUT are already display values: keep them as they are
    else:
        lo, hi = values.min(), values.max()
        unit = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    if photometric == "MONOCHROME1":  # 0 means white: turn it into the usual black background
        unit = 1.0 - unit
    return Image.fromarray(np.round(np.clip(unit, 0, 1) * 255).astype(np.uint8), "L")


def check_pixel_budget(pixels: int) -> None:
    """Refuse a picture over Pillow's decompression-bomb limit before decoding it, as Pillow does for PNG and JPEG:
    a compressed DICOM of a few MB can hold gigabytes of pixels (RLE, JPEG 2000)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and pixels > limit:
        raise Image.DecompressionBombError(f"Image size ({pixels} pixels) exceeds limit of {limit} pixels, "
                                           f"could be decompression bomb DOS attack.")


def _voi_lut(values: np.ndarray, item: pydicom.Dataset) -> np.ndarray:
    """A VOI LUT (PS3.3 C.11.2.1.1), mapped to [0, 1] by its output bit depth.

    Our own lookup: pydicom 3.0.2's apply_voi indexes an 8-bit LUT with uint8 indices, so a 4096-entry
    LUT wraps round and returns nonsense (found by a test here).
    """
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    raw = item.LUTData
    lut = np.frombuffer(raw, "<u2") if isinstance(raw, bytes) else np.asarray(raw, dtype=np.float64)
    index = np.clip(np.round(values) - first, 0, (entries or 65536) - 1).astype(np.int64)
    return lut[index].astype(np.float64) / (2 ** bits - 1)


def _first(value) -> float:
    """The first of a multi-valued DICOM element (several windows may be offered), as a float."""
    return float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """The LINEAR window of PS3.3 C.11.2.1.2.1, mapped to [0, 1]."""
    if width <= 1:  # the standard's width-1 window is a threshold
        return (values >= center - 0.5) * 1.0
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def decode_image(path: str, size: int) -> np.ndarray:
    """Decode any image to a size x size uint8 grayscale array (see decode_with_colour)."""
    return decode_with_colour(path, size)[0]


def decode_with_colour(path: str, size: int) -> tuple[np.ndarray, float]:
    """Decode any image to a size x size uint8 grayscale array, and measure how colourful it is (`colourfulness`).

    JPEGs decode straight to near that size: `draft` lets libjpeg scale by 1/2, 1/4 or 1/8 inside the
    IDCT, which is most of the cost of a 2000x1500 X-ray. It is asked for twice the final size: the
    DCT's box-like scaling alone drifts up to 3 grey levels from a full decode, while leaving the last
    halving to Pillow's antialiased resize stays within 1.3 (measured on the 120 full-resolution
    samples). A colour JPEG decodes as YCbCr, whose Y is exactly the grey a grey decode gives, so the
    colour costs only its chroma. Pillow's decompression-bomb warning is raised as an error, so such
    files are refused. Raises on any unreadable file.
    """
    if is_dicom(path):  # a colour DICOM is refused by _dicom_gray
        return np.asarray(_dicom_gray(path).resize((size, size), Image.BILINEAR), dtype=np.uint8), 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            colour = img.mode in COLOUR_MODES
            if img.format == "JPEG":
                img.draft("YCbCr" if colour else "L", (2 * size, 2 * size))
            img = ImageOps.exif_transpose(img)
            gray = img.getchannel(0) if img.mode == "YCbCr" else _to_gray(img)
            image = np.asarray(gray.resize((size, size), Image.BILINEAR), dtype=np.uint8)
            return image, _colourfulness(img) if colour else 0.0


def decode_naive(path: str, size: int) -> np.ndarray:
    """The reference decode: full-resolution decode, grayscale, resize (used in tests and benchmarks)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("L").resize((size, size), Image.BILINEAR), dtype=np.uint8)
