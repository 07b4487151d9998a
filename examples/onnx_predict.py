"""Score chest X-rays with an exported model, without PyTorch: numpy, pillow and onnxruntime (pydicom for DICOM).

Usage: `python examples/onnx_predict.py IMAGE_OR_FOLDER... --model EXPORT_DIR [--csv FILE] [--cam DIR]`
EXPORT_DIR holds model.onnx and model.json from `python main.py export`. Each file is decoded and resized the
way `predict` does; the graph crops, normalises, scores and computes the heatmap, the out-of-distribution
distance and the image checks. Prints path, probability, call and flags; `--csv` writes them under
predictions.csv's column names, `--cam` writes heatmap overlays. Install: `pip install -r examples/requirements.txt`.
"""
import argparse
import csv
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".dcm", ".dicom")
COLOUR_MODES = {"RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "P", "PA", "LAB", "HSV"}
COLUMNS = ("path", "patient", "label", "probability", "predicted", "warnings", "error", "flagged", "ood_score")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


# ---------------------------------------------------------------- decoding, as lib/images.py does it
def to_grey(img: Image.Image) -> Image.Image:
    """8-bit grey; 16-bit and float images stretched over their own range rather than clipped."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.round(arr).astype(np.uint8), "L")
    return img if img.mode == "L" else img.convert("L")


def colourfulness(img: Image.Image) -> float:
    """Hasler and Suesstrunk's colourfulness on a 64 x 64 copy: about 0 for a radiograph, 0.1 or more for a photo."""
    rgb = np.asarray(img.resize((64, 64), Image.BILINEAR).convert("RGB"), dtype=np.float32) / 255.0
    rg, yb = rgb[..., 0] - rgb[..., 1], (rgb[..., 0] + rgb[..., 1]) / 2 - rgb[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def decode_picture(path: str, side: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """A PNG, JPEG, ... as side x side uint8 grey, its colourfulness and its size; decompression bombs refused."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            size, colour = img.size, img.mode in COLOUR_MODES
            if img.format == "JPEG":
                img.draft("YCbCr" if colour else "L", (2 * side, 2 * side))
            img = ImageOps.exif_transpose(img)
            grey = img.getchannel(0) if img.mode == "YCbCr" else to_grey(img)
            image = np.asarray(grey.resize((side, side), Image.BILINEAR), dtype=np.uint8)
            return image, colourfulness(img) if colour else 0.0, size


def decode_dicom(path: str, side: int) -> tuple[np.ndarray, dict]:
    """A DICOM radiograph through its display pipeline (modality LUT, VOI LUT or window, MONOCHROME1 inverted),
    resized to side x side, with what its header says."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if int(ds.get("SamplesPerPixel", 1)) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"colour image ({photometric or 'no PhotometricInterpretation'}), not a radiograph")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError("several frames, not one radiograph")
    pixels = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
    if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
        raise ValueError(f"Image size ({pixels} pixels) exceeds limit of {Image.MAX_IMAGE_PIXELS} pixels")
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    plain = int(ds.get("BitsStored", 8)) <= 8 and "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds
    if "VOILUTSequence" in ds:  # the LUT's output, on [0, 1] by its bit depth
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        unit = apply_voi_lut(values, ds, prefer_lut=True).astype(np.float64) / (2 ** bits - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:  # PS3.3 C.11.2.1.2.1, the LINEAR window, on [0, 1]
        centre, width = (float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)
                         for v in (ds.WindowCenter, ds.WindowWidth))
        unit = (values >= centre - 0.5) * 1.0 if width <= 1 else \
            np.clip((values - (centre - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)
    elif plain:
        unit = values / 255.0
    else:
        lo, hi = values.min(), values.max()
        unit = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    grey = Image.fromarray(np.round(np.clip(unit, 0, 1) * 255).astype(np.uint8), "L")
    header = {"view": str(ds.get("ViewPosition", "") or "").upper(), "age": str(ds.get("PatientAge", "") or ""),
              "body_part": str(ds.get("BodyPartExamined", "") or "").upper(), "patient": str(ds.get("PatientID", ""))}
    return np.asarray(grey.resize((side, side), Image.BILINEAR), dtype=np.uint8), header


def decode(path: str, side: int) -> tuple[np.ndarray, list[str]]:
    """One file as the graph's input, and the flags its file or header raise."""
    if path.lower().endswith((".dcm", ".dicom")):
        image, header = decode_dicom(path, side)
        return image, header_flags(header)
    image, colour, _ = decode_picture(path, side)
    return image, ([f"colour picture, not a radiograph (colourfulness {colour:.2f})"] if colour > 0.05 else [])


def header_flags(header: dict) -> list[str]:
    """A lateral or non-chest view, or an adult, as a DICOM header says."""
    flags = []
    if header["view"] not in ("", "AP", "PA"):
        flags.append(f"not a frontal view (ViewPosition {header['view']})")
    if header["body_part"] not in ("", "CHEST", "THORAX", "LUNG", "PORT CHEST"):
        flags.append(f"not a chest image (BodyPartExamined {header['body_part']})")
    age = header["age"].strip().upper()
    years = None
    if age[:-1].isdigit() and age[-1:] in "DWMY":
        years = int(age[:-1]) / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[age[-1]]
    elif age.isdigit():
        years = int(age)
    if years is not None and years >= 18:
        flags.append(f"an adult (PatientAge {header['age']}): the model learned from children aged 1 to 5")
    return flags


# ---------------------------------------------------------------- the graph's checks, read against model.json
def check_flags(out: dict, i: int, checks: dict) -> list[str]:
    """The flags of image i from the graph's outputs: grey level, statistics, distance, orientation."""
    flags = []
    grey, lo_hi = float(out["grey_level"][i]), checks["grey_range"]
    if lo_hi and not lo_hi[0] <= grey <= lo_hi[1]:
        flags.append(f"mean grey level {grey:.2f} outside the training range [{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]")
    stats = out["statistics"][i]
    if stats[0] < checks["near_constant"]:  # a blank image: its statistics and orientation say nothing more
        flags.append("blank or near-constant image")
    else:
        if checks["statistics_low"]:
            for name, v, lo, hi in zip(checks["statistics"], stats, checks["statistics_low"],
                                       checks["statistics_high"]):
                if not lo <= v <= hi:
                    flags.append(f"{name} {v:.2f} unlike the training films' [{lo:.2f}, {hi:.2f}]")
        if "turn_probabilities" in out:
            p = out["turn_probabilities"][i]
            if p.argmax() and 1.0 - p[0] > checks["turned_above"]:
                flags.append(checks["turned"][str(int(p.argmax()))])
    if "distance" in out and out["distance"][i] > checks["distance_threshold"]:
        flags.append(f"not like the training films: distance {out['distance'][i]:.1f} > "
                     f"{checks['distance_threshold']:.1f}")
    return flags


def files_of(paths: list[str]) -> list[str]:
    """Named files, and the image files below named folders (hidden files and folders left out)."""
    files = []
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [os.path.join(root, n) for n in sorted(names)
                      if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")]
    return files


def cell(value):
    """A CSV cell a spreadsheet shows as text (a leading apostrophe before a formula character)."""
    text = str(value)
    return "'" + text if text[:1] in FORMULA_START and not _is_number(text) else value


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def overlay(image: np.ndarray, heatmap: np.ndarray, model_side: int, path: Path) -> None:
    """The model's view of the image with its heatmap (scaled to its own maximum) blended in red."""
    offset = (image.shape[0] - model_side) // 2
    view = image[offset:offset + model_side, offset:offset + model_side].astype(np.float32) / 255.0
    span = heatmap.max() - heatmap.min()
    cam = (heatmap - heatmap.min()) / span if span > 0 else np.zeros_like(heatmap)
    cam = np.asarray(Image.fromarray(cam.astype(np.float32), "F").resize((model_side, model_side), Image.BILINEAR))
    rgb = np.stack([view * 0.6 + 0.4 * cam, view * 0.6, view * 0.6 * (1 - cam) + 0.4 * view * (1 - cam)], -1)
    Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB").save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", metavar="IMAGE_OR_FOLDER")
    parser.add_argument("--model", required=True, help="folder holding model.onnx and model.json (main.py export)")
    parser.add_argument("--csv", default=None, help="write the rows here, under predictions.csv's column names")
    parser.add_argument("--cam", default=None, help="folder for one heatmap overlay per scored image")
    parser.add_argument("--batch-size", type=int, default=32, help="images per run of the graph")
    args = parser.parse_args(argv)
    meta = json.loads((Path(args.model) / "model.json").read_text())
    session = onnxruntime.InferenceSession(str(Path(args.model) / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    side, threshold = meta["input"]["side"], meta["threshold"]
    files = files_of(args.paths)
    if not files:
        print(f"error: no image files in {', '.join(args.paths)}", file=sys.stderr)
        return 2
    if args.cam:
        os.makedirs(args.cam, exist_ok=True)
    rows = []
    for start in range(0, len(files), args.batch_size):
        chunk = files[start:start + args.batch_size]
        decoded, errors, file_flags = [], [], []
        for path in chunk:
            try:
                image, flags = decode(path, side)
                decoded.append(image)
                errors.append("")
                file_flags.append(flags)
            except Exception as err:  # one unreadable file is reported, never fatal
                decoded.append(np.zeros((side, side), np.uint8))
                errors.append(f"unreadable image: {type(err).__name__}: {err}".splitlines()[0][:200])
                file_flags.append([])
        out = dict(zip(names, session.run(None, {"images": np.stack(decoded)[:, None]})))
        for i, path in enumerate(chunk):
            if errors[i]:
                rows.append([path, "", "", "", "", "", errors[i], "", ""])
                continue
            p, flags = float(out["probability"][i]), file_flags[i] + check_flags(out, i, meta["checks"])
            call = "PNEUMONIA" if p >= threshold else "NORMAL"
            distance = f"{out['distance'][i]:.2f}" if "distance" in out else ""
            said = flags + ([meta["note"]] if meta.get("note") else [])  # a demo checkpoint says so, as predict does
            rows.append([path, "", "", f"{p:.6f}", call, "; ".join(said), "", "yes" if flags else "", distance])
            if args.cam:
                overlay(decoded[i], out["heatmap"][i], meta["input"]["model_side"],
                        Path(args.cam) / f"{start + i:05d}_{Path(path).stem}_cam.png")
    for row in rows:
        shown = (row[0].encode("utf-8", "backslashreplace").decode()).translate({c: f"\\x{c:02x}" for c in range(32)})
        print(f"{shown}\t{row[3] or '-'}\t{row[4] or row[6]}\t{row[5]}")
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            writer.writerows([cell(v) for v in row] for row in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
