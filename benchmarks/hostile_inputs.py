"""Hostile inputs, each run as a user would run it: exit status and what was written, one table row per case.

Usage: `python benchmarks/hostile_inputs.py [--main path/to/main.py] [--only NAME ...]`
It trains one tiny demo model first (about 15 s), builds every case in a temporary folder and runs
`python main.py ...` in a subprocess for each. `--main` points at another checkout's main.py, so the same
script prints the before and the after table. Synthetic files only; nothing is written outside the temp folder.
"""
import argparse
import csv
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

FORMULA = ("=", "+", "-", "@", "\t", "\r")
# runs main.py as `python main.py ARGS` would, then reports the process's peak resident memory on stderr
PEAK = """import os, resource, runpy, sys
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print("PEAK_KB", peak, file=sys.stderr)
"""
TINY = ["--demo", "--demo-patients", "12", "--epochs", "2", "--image-size", "64", "--quiet", "--precision", "fp32"]


def picture(path: Path, seed: int, size: int = 80) -> Path:
    """A small random grey picture."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)).save(path)
    return path


def dicom(path: Path, pixels: np.ndarray | None = None, rle_shape: tuple | None = None, **tags) -> Path:
    """A chest DX DICOM holding `pixels`, or an RLE-compressed all-zero image of `rle_shape` (a small file)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
    meta.TransferSyntaxUID = RLELossless if rle_shape else ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined, ds.PatientID = "DX", "PA", "CHEST", "p1"
    ds.Rows, ds.Columns = rle_shape or pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if rle_shape:
        ds.PixelData = rle_zeros(*rle_shape)
    else:
        ds.PixelData = pixels.astype(np.uint8).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def rle_zeros(rows: int, cols: int) -> bytes:
    """An encapsulated one-segment RLE frame of zeros: each row is runs of 128 zeros (2 bytes per run)."""
    from pydicom.encaps import encapsulate
    row = b""
    left = cols
    while left:
        n = min(128, left)
        row += bytes([257 - n, 0])
        left -= n
    segment = row * rows
    segment += b"\0" * (len(segment) % 2)
    header = np.zeros(16, "<u4")
    header[0], header[1] = 1, 64
    return encapsulate([header.tobytes() + segment])


def run(main_py: str, args: list, cwd: Path, timeout: float = 300, interrupt_when: Path | None = None) -> dict:
    """One command: exit status, the last stderr line, and the peak memory of the child. With `interrupt_when`,
    Ctrl-C reaches it as soon as that file (or folder) exists."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", PEAK, main_py, *[os.fsencode(str(a)) for a in args]]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if interrupt_when is not None:
        while not interrupt_when.exists() and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=timeout)
    peak = re.findall(rb"\nPEAK_KB (\d+)\n", b"\n" + err)
    err = re.sub(rb"PEAK_KB \d+\n", b"", err)
    lines = [line for line in err.decode(errors="backslashreplace").splitlines() if line.strip()]
    return {"rc": proc.returncode, "last": lines[-1][:150] if lines else "", "stderr": err, "stdout": out,
            "peak_mb": int(peak[-1]) / 1024 if peak else None}


def cells(path: Path) -> list[str]:
    """Every cell of a CSV file (read as bytes so that any name survives)."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return [c for row in csv.reader(f) for c in row]


def live_formulas(path: Path) -> int:
    """How many cells a spreadsheet would read as a formula."""
    return sum(c[:1] in FORMULA and len(c) > 1 for c in cells(path)) if path.exists() else -1


def case_formula_names(ctx) -> str:
    folder = ctx.work / "formula"
    names = ["=HYPERLINK(\"x\").png", "@SUM(1).png", "+cmd.png", "-2+3.png"]
    for i, name in enumerate(names):
        picture(folder / name, i)
    # relative names, as a user in that folder types them: the path cell then starts with the name
    r = run(ctx.main, ["predict", "--checkpoint", ctx.ckpt, "--out", ctx.work / "out-formula", "--", *names], folder)
    live = live_formulas(ctx.work / "out-formula/predictions.csv")
    return f"exit {r['rc']}; live formula cells in predictions.csv: {live}"


def case_formula_patient(ctx) -> str:
    root = ctx.work / "formula-patient"
    for j, label in enumerate(("NORMAL", "PNEUMONIA")):
        for k in range(3):
            dicom(root / label / f"{label}{k}.dcm", np.random.default_rng(10 * j + k).integers(0, 256, (80, 80)),
                  PatientID=f"=cmd|' /C calc'!A{k}{label}")
    r = run(ctx.main, ["evaluate", "--checkpoint", ctx.ckpt, "--data", root, "--out", ctx.work / "out-fp",
                       "--no-cache", "--quiet"], ctx.work)
    return (f"exit {r['rc']}; live formula cells: split.csv {live_formulas(ctx.work / 'out-fp/split.csv')}, "
            f"predictions.csv {live_formulas(ctx.work / 'out-fp/predictions.csv')}; {r['last'][:60]}")


def case_non_utf8_predict(ctx) -> str:
    folder = ctx.work / "latin1"
    picture(Path(os.fsdecode(os.fsencode(str(folder)) + b"/caf\xe9.png")), 1)
    r = run(ctx.main, ["predict", folder, "--checkpoint", ctx.ckpt, "--out", ctx.work / "out-latin1"], ctx.work)
    written = (ctx.work / "out-latin1/predictions.csv").exists()
    return f"exit {r['rc']}; predictions.csv written: {written}; {r['last'][:80]}"


def case_non_utf8_train(ctx) -> str:
    out = ctx.work / "run-latin1"
    demo = ctx.run_dir / "demo_data"
    data = ctx.work / "data-latin1"
    os.system(f"cp -r '{demo}' '{data}'")
    first = sorted((data / "images" / "NORMAL").glob("*.png"))[0]
    os.rename(first, os.fsdecode(os.fsencode(str(first.parent)) + b"/caf\xe9.png"))
    r = run(ctx.main, ["--data", data, "--out", out, *TINY[3:], "--no-cache"], ctx.work)
    state = next((name for name in ("metrics.json", "last.pt") if (out / name).exists()), "no last.pt")
    return f"exit {r['rc']}; {state}; {r['last'][:80]}"


def case_mathtext_external(ctx) -> str:
    ext = ctx.work / "ext-math"
    for label, seed in (("NORMAL", 1), ("PNEUMONIA", 2)):
        for k in range(3):
            picture(ext / label / f"$\\foo{k}$.png", seed * 10 + k)
    out = ctx.work / "run-math"
    r = run(ctx.main, [*TINY, "--out", out, "--external", ext], ctx.work)
    done = {name: (out / name).exists() for name in ("metrics.json", "report.html")}
    return f"exit {r['rc']}; metrics.json {done['metrics.json']}, report.html {done['report.html']}"


def case_dicom_bomb(ctx) -> str:
    bomb = dicom(ctx.work / "bomb" / "bomb.dcm", rle_shape=(12000, 12000))
    r = run(ctx.main, ["predict", bomb, "--checkpoint", ctx.ckpt, "--out", ctx.work / "out-bomb"], ctx.work)
    peak = f"{r['peak_mb']:.0f} MB" if r["peak_mb"] else "not measured"
    return f"exit {r['rc']}; file {bomb.stat().st_size / 1e6:.2f} MB; peak RSS {peak}; {r['last'][:70]}"


def case_shared_out(ctx) -> str:
    folder = ctx.work / "race"
    for i in range(6):
        picture(folder / f"a{i}.png", i)
    out = ctx.work / "out-race"
    cmd = [sys.executable, ctx.main, "predict", str(folder), "--checkpoint", str(ctx.ckpt), "--out", str(out)]
    procs = [subprocess.Popen(cmd, cwd=ctx.work, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    codes = [p.wait() for p in procs]
    rows = len(list(csv.reader(open(out / "predictions.csv")))) - 1 if (out / "predictions.csv").exists() else 0
    return f"exits {codes}; rows in the shared predictions.csv: {rows} (two runs of 6)"


def case_markdown_card(ctx) -> str:
    data = ctx.work / "data`<img src=x onerror=alert(1)>`"
    os.system(f"cp -r '{ctx.run_dir / 'demo_data'}' '{data}'")
    out = ctx.work / "run-md"
    r = run(ctx.main, ["--data", data, "--out", out, *TINY[3:], "--no-cache"], ctx.work)
    card = (out / "MODEL_CARD.md").read_text() if (out / "MODEL_CARD.md").exists() else ""
    # what a Markdown renderer leaves as HTML: the text outside code spans (a span closes on a fence of its length)
    outside = re.sub(r"(`+)(.+?)(?<!`)\1(?!`)", "", card)
    return f"exit {r['rc']}; raw <img outside code spans in MODEL_CARD.md: {'<img' in outside}"


def case_terminal_escape(ctx) -> str:
    folder = ctx.work / "esc"
    path = folder / "x\x1b[2J\x1b[31mred.png"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not an image")
    picture(folder / "ok.png", 3)
    r = run(ctx.main, ["predict", folder, "--checkpoint", ctx.ckpt, "--out", ctx.work / "out-esc"], ctx.work)
    raw = b"\x1b" in r["stderr"] + r["stdout"]
    return f"exit {r['rc']}; raw ESC on the terminal: {raw}"


def case_out_in_class_folder(ctx) -> str:
    data = ctx.run_dir / "demo_data"
    copy = ctx.work / "data-copy"
    os.system(f"cp -r '{data}' '{copy}'")
    r = run(ctx.main, ["evaluate", "--checkpoint", ctx.ckpt, "--data", copy, "--out", copy / "test" / "NORMAL" / "ev",
                       "--no-cache", "--quiet"], ctx.work)
    return f"exit {r['rc']}; {r['last'][:110]}"


def case_last_pt(ctx) -> str:
    r = run(ctx.main, ["predict", ctx.run_dir / "demo_data", "--checkpoint", ctx.run_dir / "last.pt",
                       "--out", ctx.work / "out-last"], ctx.work)
    return f"exit {r['rc']}; {r['last'][:110]}"


def case_foreign_member(ctx) -> str:
    import torch
    run_dir = ctx.work / "run-foreign"
    os.system(f"cp -r '{ctx.run_dir}' '{run_dir}'")
    (run_dir / "INCOMPLETE").write_text("x")
    (run_dir / "members").mkdir(exist_ok=True)
    torch.save({"weights": argparse.Namespace()}, run_dir / "members" / "member0.pt")
    r = run(ctx.main, ["--resume", run_dir, "--quiet"], ctx.work)
    return f"exit {r['rc']}; {r['last'][:110]}"


def odd_value(flags: list):
    def case(ctx) -> str:
        out = ctx.work / ("run-odd" + "".join(c for c in "".join(flags) if c.isalnum()))
        r = run(ctx.main, [*TINY, "--out", out, *flags], ctx.work)
        return f"exit {r['rc']}; {run_state(out)}; {r['last'][:90]}"
    return case


def run_state(out: Path) -> str:
    """What a training run left in `out`."""
    if (out / "INCOMPLETE").exists() and not (out / "last.pt").exists():
        return "INCOMPLETE, no last.pt"
    if (out / "metrics.json").exists():
        return "complete"
    if (out / "last.pt").exists():
        return "resumable"
    return "nothing written" if not out.exists() else "folder left"


def case_foreign_csv(ctx) -> str:
    path = ctx.work / "foreign.csv"
    path.write_text("path,label\n" + str(next((ctx.run_dir / "demo_data").rglob("*.png"))) + ",NORMAL\n")
    r = run(ctx.main, ["evaluate", "--checkpoint", ctx.ckpt, "--data", path, "--out", ctx.work / "out-csv"], ctx.work)
    return f"exit {r['rc']}; {r['last'][:110]}"


def case_ctrl_c(ctx) -> str:
    folder = ctx.work / "many"
    for i in range(400):
        picture(folder / f"m{i}.png", i, size=600)
    out = ctx.work / "out-ctrlc"
    r = run(ctx.main, ["predict", folder, "--checkpoint", ctx.ckpt, "--out", out, "--cam"], ctx.work,
            interrupt_when=out / "predictions.csv")  # mid-way: scored, drawing the overlays
    traceback = b"Traceback" in r["stderr"]
    written = sorted(p.name for p in out.iterdir()) if out.exists() else []
    return (f"exit {r['rc']}; traceback {traceback}; written: "
            f"{', '.join(w for w in written if not w.startswith('.'))[:60] or 'nothing'}")


def case_out_is_file(ctx) -> str:
    path = ctx.work / "a-file"
    path.write_text("x")
    r = run(ctx.main, ["predict", ctx.run_dir / "demo_data", "--checkpoint", ctx.ckpt, "--out", path], ctx.work)
    return f"exit {r['rc']}; {r['last'][:110]}"


def case_adult(ctx) -> str:
    folder = ctx.work / "adult"
    pixels = np.asarray(Image.open(next((ctx.run_dir / "demo_data").rglob("*.png"))).convert("L"))
    dicom(folder / "a062Y.dcm", pixels, PatientAge="062Y")
    dicom(folder / "a62.dcm", pixels, PatientAge="62")
    out = ctx.work / "out-adult"
    run(ctx.main, ["predict", folder, "--checkpoint", ctx.ckpt, "--out", out], ctx.work)
    rows = list(csv.DictReader(open(out / "predictions.csv"))) if (out / "predictions.csv").exists() else []
    flagged = sum("adult" in (r.get("warnings") or "") for r in rows)
    return f"{flagged} of 2 adult DICOMs flagged as adult"


CASES = {
    "formula file names (predict)": case_formula_names,
    "formula PatientID (evaluate)": case_formula_patient,
    "non-UTF-8 name (predict)": case_non_utf8_predict,
    "non-UTF-8 name (training)": case_non_utf8_train,
    "mathtext name in --external": case_mathtext_external,
    "DICOM bomb, 12000x12000 RLE": case_dicom_bomb,
    "two predicts, one --out": case_shared_out,
    "backtick + <img> in --data": case_markdown_card,
    "escape sequence in a name": case_terminal_escape,
    "--out inside a class folder": case_out_in_class_folder,
    "last.pt as --checkpoint": case_last_pt,
    "foreign member file, --resume": case_foreign_member,
    "--seed -5": odd_value(["--seed", "-5"]),
    "--lr 1e308": odd_value(["--lr", "1e308"]),
    "--image-size 100000": odd_value(["--image-size", "100000"]),
    "CSV without split column": case_foreign_csv,
    "Ctrl-C in predict": case_ctrl_c,
    "--out onto a file": case_out_is_file,
    "adult DICOM (PatientAge)": case_adult,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--main", default=str(Path(__file__).resolve().parents[1] / "main.py"),
                        help="the main.py to run (another checkout's, for a before/after table)")
    parser.add_argument("--only", nargs="*", default=None, help="run only the cases whose name contains one of these")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = argparse.Namespace(main=args.main, work=Path(tmp), run_dir=Path(tmp) / "base")
        ctx.ckpt = ctx.run_dir / "best.pt"
        base = run(args.main, [*TINY, "--out", ctx.run_dir], ctx.work)
        assert base["rc"] == 0, base["stderr"].decode()[-2000:]
        print(f"main.py: {args.main}\n\n| case | outcome |\n|---|---|")
        for name, case in CASES.items():
            if args.only and not any(o in name for o in args.only):
                continue
            try:
                outcome = case(ctx)
            except Exception as err:  # a case whose command left nothing to read
                outcome = f"harness: {type(err).__name__}: {err}"[:150]
            print(f"| {name} | {outcome.replace('|', '/')} |", flush=True)


if __name__ == "__main__":
    main()
