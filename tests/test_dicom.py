"""DICOM input: DICOMs built with pydicom from real JPEGs decode to the same picture, score the same, or are
skipped or flagged with their reason; a mixed JPEG + DICOM archive counts each image and child once."""
import csv
import json

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless, generate_uid

import data
from lib import cache
from lib import images
import main
from conftest import shared

SIZE = 141  # the stored size of a 128 px model


def sources(n: int = 1) -> list:
    """n NORMAL and n PNEUMONIA real JPEGs (grayscale originals, shorter side 256)."""
    root = shared("chest_xray_256") / "train"
    return sorted((root / "NORMAL").glob("*.jpeg"))[:n] + sorted((root / "PNEUMONIA").glob("*.jpeg"))[:n]


def gray(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L"))


def write_dicom(path, pixels: np.ndarray | None, bits: int = 8, photometric: str = "MONOCHROME2",
                patient: str = "", preamble: bool = True, **tags):
    """A DX-like DICOM file holding `pixels` (None: a dataset with no pixel data)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128 if preamble else None)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality, ds.ViewPosition, ds.BodyPartExamined = patient, "DX", "PA", "CHEST"
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.SamplesPerPixel = 1 if pixels.ndim == 2 else pixels.shape[2]
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 8 if bits <= 8 else 16
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
        if pixels.ndim == 3:
            ds.PlanarConfiguration = 0
        ds.PixelData = pixels.astype(np.uint8 if bits <= 8 else np.uint16).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=preamble)
    return path


def lut_item(lut: np.ndarray) -> pydicom.Dataset:
    """A VOI LUT Sequence item with 8-bit output."""
    item = pydicom.Dataset()
    item.add_new("LUTDescriptor", "US", [len(lut), 0, 8])
    item.add_new("LUTData", "US", lut.astype(np.uint16).tolist())
    return item


def variants(src, folder) -> dict:
    """The same picture as DICOM in each way a department may store it, plus the files to skip or flag."""
    x = gray(src).astype(np.int64)
    out = {}
    out["mono2_8bit"] = write_dicom(folder / "mono2.dcm", x)
    out["mono1_inverted"] = write_dicom(folder / "mono1.dcm", 255 - x, photometric="MONOCHROME1")
    # 12-bit stored values, turned into display values by a rescale slope/intercept (no window: full range)
    out["rescale_12bit"] = write_dicom(folder / "rescale.dcm", x * 15 + 60, bits=12, RescaleSlope=0.5,
                                       RescaleIntercept=-30)
    # 16-bit values with a window that maps them exactly onto 0..255
    out["window_16bit"] = write_dicom(folder / "window.dcm", x * 16, bits=16, WindowCenter=2040.5, WindowWidth=4081)
    lut_ds = write_dicom(folder / "voilut.dcm", x * 16, bits=12)
    ds = pydicom.dcmread(lut_ds)
    ds.VOILUTSequence = pydicom.Sequence([lut_item(np.arange(4096) // 16)])
    ds.save_as(lut_ds)
    out["voi_lut_12bit"] = lut_ds
    rle = pydicom.dcmread(write_dicom(folder / "rle.dcm", x))
    rle.compress(RLELossless)
    rle.save_as(folder / "rle.dcm")
    out["rle_compressed"] = folder / "rle.dcm"
    jpeg = pydicom.dcmread(write_dicom(folder / "jpeg.dcm", x))
    jpeg.PixelData = pydicom.encaps.encapsulate([src.read_bytes()])  # the JPEG itself, in a DICOM wrapper
    jpeg.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    jpeg.save_as(folder / "jpeg.dcm")
    out["jpeg_baseline"] = folder / "jpeg.dcm"
    out["no_extension"] = write_dicom(folder / "IMG0001", x)
    return out


def test_each_dicom_variant_decodes_to_the_jpegs_picture(tmp_path):
    src = sources()[0]
    reference = images.decode_image(str(src), SIZE).astype(int)
    for name, path in variants(src, tmp_path).items():
        assert images.is_dicom(str(path)), name
        decoded = images.decode_image(str(path), SIZE).astype(int)
        diff = np.abs(decoded - reference)
        # the JPEG path decodes through libjpeg's DCT scaling: a grey level or two from a full decode
        assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 6, (name, diff.mean())
    # a MONOCHROME1 file read without inverting, or a 12-bit one without rescaling, is far off
    wrong = 255 - images.decode_image(str(tmp_path / "mono2.dcm"), SIZE).astype(int)
    assert np.abs(wrong - reference).mean() > 40


def test_unusable_dicoms_are_skipped_with_their_reason(tmp_path):
    x = gray(sources()[0])
    cases = {
        "no pixel data": write_dicom(tmp_path / "report.dcm", None),
        "colour image (RGB)": write_dicom(tmp_path / "us.dcm", np.stack([x] * 3, -1), photometric="RGB"),
        "frames": write_dicom(tmp_path / "cine.dcm", np.concatenate([x, x]), NumberOfFrames=2),
    }
    decoded, errors = cache.load_images([str(p) for p in cases.values()], SIZE, cache.ImageCache(None, SIZE),
                                         workers=1, show=False)
    for (reason, _), error in zip(cases.items(), errors):
        assert error is not None and reason in error, (reason, error)


def test_predict_matches_the_jpeg_and_flags_what_it_cannot_vouch_for(demo_run, tmp_path):
    src = sources()[0]
    (tmp_path / "dicom").mkdir()
    found = variants(src, tmp_path / "dicom")
    lateral = write_dicom(tmp_path / "dicom" / "lateral.dcm", gray(src), ViewPosition="LL")
    empty = write_dicom(tmp_path / "dicom" / "empty.dcm", None)
    out = tmp_path / "pred"
    assert main.main(["predict", str(src), str(tmp_path / "dicom"), "--checkpoint", str(demo_run / "best.pt"),
                      "--out", str(out)]) == 0
    rows = {r["path"]: r for r in csv.DictReader(open(out / "predictions.csv"))}
    jpeg_prob = float(rows[str(src)]["probability"])
    for name, path in found.items():
        row = rows[str(path)]
        assert abs(float(row["probability"]) - jpeg_prob) <= 0.02, name
        assert ("inverted photometric" in row["warnings"]) == (name == "mono1_inverted"), name
    assert "not a frontal view (ViewPosition LL)" in rows[str(lateral)]["warnings"]
    assert rows[str(lateral)]["probability"]  # scored, but flagged
    assert "no pixel data" in rows[str(empty)]["error"] and not rows[str(empty)]["probability"]


def test_warnings_for_size_aspect_and_grey_level(demo_run, tmp_path):
    bright = tmp_path / "bright.png"
    Image.fromarray(np.full((300, 900), 250, np.uint8)).save(bright)  # 3:1, and far brighter than any phantom
    small = tmp_path / "small.png"
    Image.fromarray(np.full((60, 60), 90, np.uint8)).save(small)
    out = tmp_path / "pred"
    assert main.main(["predict", str(bright), str(small), "--checkpoint", str(demo_run / "best.pt"),
                      "--out", str(out)]) == 0
    rows = {r["path"]: r["warnings"] for r in csv.DictReader(open(out / "predictions.csv"))}
    assert "unusual aspect ratio (900x300)" in rows[str(bright)] and "outside the training range" in rows[str(bright)]
    assert "small image (60x60)" in rows[str(small)]


def test_discovery_skips_lateral_and_takes_the_patient_from_the_header(tmp_path):
    x = gray(sources()[0])
    folder = tmp_path / "archive" / "NORMAL"
    folder.mkdir(parents=True)
    write_dicom(folder / "a.dcm", x, patient="child-7")
    write_dicom(folder / "b.dcm", x, ViewPosition="LL")
    write_dicom(folder / "c.dcm", x, BodyPartExamined="KNEE")
    found = data.find_images(str(tmp_path / "archive"))
    assert found.paths == [str(folder / "a.dcm")] and data.patient_id(found.paths[0]) == "child-7"
    reasons = dict(found.skipped)
    assert reasons[str(folder / "b.dcm")] == "not a frontal view (ViewPosition LL)"
    assert reasons[str(folder / "c.dcm")] == "not a chest image (BodyPartExamined KNEE)"


def test_a_mixed_jpeg_and_dicom_archive_counts_each_image_and_child_once(tmp_path):
    root = tmp_path / "archive"
    srcs = [p for label in ("NORMAL", "PNEUMONIA")
            for p in sorted((shared("chest_xray_256") / "train" / label).glob("*.jpeg"))[:16]]
    for i, src in enumerate(srcs):
        label = src.parent.name
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / src.name).write_bytes(src.read_bytes())
        patient = data.patient_id(src.name)
        write_dicom(root / label / f"copy{i:03d}.dcm", gray(src), patient=patient)
    out = tmp_path / "run"
    assert main.main(["--data", str(root), "--out", str(out), "--epochs", "1", "--image-size", "32",
                      "--no-cache", "--quiet"]) == 0
    split = list(csv.DictReader(open(out / "split.csv")))
    dups = list(csv.DictReader(open(out / "duplicates.csv")))
    assert len(split) == len(srcs) and len(dups) == len(srcs)
    assert {r["why"] for r in dups} == {"the same image after decoding"}
    assert all({r["path"][-4:], r["duplicate_of"][-4:]} == {".dcm", "jpeg"} for r in dups)
    audit = json.loads((out / "metrics.json").read_text())["data"]
    assert audit["patients_in_several_splits"] == 0 and audit["identical_pixels_across_splits"] == 0
