"""predict on any number of files in bounded memory: decoded, scored and written a chunk at a time; resumable
after Ctrl-C, a crash or a kill; shared between torchrun's processes.

Usage: `rows = streaming.score_files(scorer, files, out, ranks, options)` (rank 0 gets every row, the others None).
Each chunk of CHUNK files becomes one part file in out/.parts, written atomically: a chunk is there whole or not at
all. Rank 0 appends the parts, in order, to predictions.csv as they finish, so the CSV grows during the run and is
a pure function of the parts: a resumed or sharded run writes the same bytes as one uninterrupted process. Only
per-file rows (name, probability, flags) are kept, never the images; the page reads the few it shows again.
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lib import distributed
import evaluate
import gradcam
from lib import progress
from lib import runs
from lib.labels import DEMO_CHECKPOINT

CHUNK = 1024  # files per part: one chunk's images are all that is ever decoded at once
PARTS = ".parts"
STATE = "predict.json"  # the command's settings, the input listing's fingerprint: what --resume continues
DEMO_NOTE = f"model {DEMO_CHECKPOINT}"  # beside every call of a demo checkpoint in the CSV


@dataclass(frozen=True)
class Options:
    """What changes a chunk's rows besides the model: predict's flags."""

    workers: int | None = None
    strict: bool = False  # flagged files left unscored
    cam: bool = False  # a Grad-CAM overlay per scored file
    show: bool = True


def listing_digest(files: list[str]) -> str:
    """A fingerprint of the files to score, in order: a resume must see the same listing."""
    return hashlib.sha256("\n".join(files).encode("utf-8", "surrogateescape")).hexdigest()


def part_path(out: Path, chunk: int) -> Path:
    return out / PARTS / f"{chunk:07d}.jsonl"


def write_part(path: Path, p: evaluate.Predictions) -> None:
    """One chunk's rows as JSON lines, written atomically (floats exactly, NaN as null; a name that is not UTF-8
    keeps its escaped bytes)."""
    def row(i):
        return {"path": p.paths[i], "patient": p.patients[i], "prob": runs.finite(float(p.prob[i])),
                "classes": None if p.classes is None else runs.finite([float(v) for v in p.classes[i]]),
                "notes": p.notes[i], "flags": p.flags[i], "error": p.errors[i], "ood": runs.finite(float(p.ood[i]))}
    lines = "".join(json.dumps(row(i)) + "\n" for i in range(len(p.paths)))
    runs.atomic_write(path, lambda f: f.write(lines.encode()))


def read_part(path: Path, outputs: int) -> evaluate.Predictions:
    """The rows write_part wrote."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]

    def number(v):
        return np.nan if v is None else v
    return evaluate.Predictions(
        [r["path"] for r in rows], [r["patient"] for r in rows],
        np.full(len(rows), -1), np.array([number(r["prob"]) for r in rows], dtype=np.float64),
        [r["notes"] for r in rows], [r["flags"] for r in rows], [r["error"] for r in rows],
        np.array([number(r["ood"]) for r in rows], dtype=np.float64),
        np.array([[number(v) for v in r["classes"]] for r in rows], dtype=np.float64).reshape(len(rows), outputs)
        if outputs > 1 else None)


def score_chunk(scorer: evaluate.Scorer, files: list[str], first: int, out: Path,
                options: Options) -> evaluate.Predictions:
    """Decode, score and check files[...] (the chunk starting at row `first`): every file's row, unscored ones with
    the reason; with `options.cam` each scored file's Grad-CAM overlay is written."""
    decoded = scorer.predictor.decode(files, options.workers, show=False)
    images, errors, _ = decoded
    good = [i for i, e in enumerate(errors) if e is None]
    scored = scorer.assess(torch.from_numpy(images[good]).unsqueeze(1)) if good else (np.zeros(0), None, None)
    rows = evaluate.file_predictions(scorer, files, decoded, scored, [])
    if options.strict:
        for i in np.flatnonzero(rows.flagged()):
            rows.prob[i], rows.errors[i] = np.nan, "flagged, not scored (--strict): " + "; ".join(rows.flags[i])
    if scorer.synthetic:  # a row copied out of the CSV still carries the demo checkpoint's warning
        for i in good:
            rows.notes[i] = rows.notes[i] + [DEMO_NOTE]
    if options.cam:
        keep = [i for i in good if rows.prob[i] == rows.prob[i]]
        if keep:
            gradcam.save_overlays(scorer, torch.from_numpy(images[keep]).unsqueeze(1), rows.prob[keep],
                                  [files[i] for i in keep], out, rows=[first + i for i in keep])
    return rows


class Merger:
    """Rank 0's side: appends the finished parts, in chunk order, to predictions.csv and keeps their rows."""

    def __init__(self, out: Path, chunks: int, outputs: int, threshold: float, bar):
        self.out, self.chunks, self.outputs, self.threshold, self.bar = out, chunks, outputs, threshold, bar
        self.parts: list[evaluate.Predictions] = []
        self.csv = open(out / "predictions.csv", "wb")  # a resume writes it again from the parts: same bytes
        self.csv.write(runs.csv_bytes([evaluate.prediction_header(outputs > 1)]))

    def catch_up(self) -> None:
        """Append every part that is ready and follows the last one appended."""
        while len(self.parts) < self.chunks and part_path(self.out, len(self.parts)).exists():
            part = read_part(part_path(self.out, len(self.parts)), self.outputs)
            self.append(part)
            self.bar.update(len(part.paths))

    def append(self, part: evaluate.Predictions) -> None:
        """The part's rows into the CSV; kept without the demo note, which the terminal and page say once."""
        self.csv.write(runs.csv_bytes(evaluate.prediction_rows(part, self.threshold)))
        self.csv.flush()
        part.notes = [[n for n in notes if n != DEMO_NOTE] for notes in part.notes]
        self.parts.append(part)

    def close(self) -> evaluate.Predictions:
        self.csv.close()
        return evaluate.Predictions.concat(self.parts)


def score_files(scorer: evaluate.Scorer, files: list[str], skipped: list[tuple[str, str]], out: Path,
                ranks: distributed.Context, *, options: Options) -> evaluate.Predictions | None:
    """Every file's row, chunk by chunk, into out/predictions.csv (then the skipped files' rows); chunks already in
    out/.parts (a resumed run) are not scored again. Under torchrun rank r scores chunks r, r + N, ...; rank 0
    merges. Returns every row on rank 0, None on the others."""
    chunks = -(-len(files) // CHUNK)
    merger = None
    if ranks.main:
        bar = progress.track(len(files), "scoring", "images", options.show and len(files) > 1)
        merger = Merger(out, chunks, scorer.predictor.outputs, scorer.threshold, bar)
    for chunk in range(ranks.rank, chunks, ranks.world):
        path = part_path(out, chunk)
        if not path.exists():
            start = chunk * CHUNK
            write_part(path, score_chunk(scorer, files[start:start + CHUNK], start, out, options))
        if merger is not None:
            merger.catch_up()
    distributed.barrier(ranks)  # every part is written
    if merger is None:
        return None
    merger.catch_up()
    merger.bar.close()
    if skipped:
        merger.append(evaluate.file_predictions(scorer, [], (np.zeros((0, 1, 1), np.uint8), [], np.zeros(0)),
                                                (np.zeros(0), None, None), skipped))
    return merger.close()


def remove_parts(out: Path) -> None:
    """The parts, once predictions.csv holds every row."""
    for path in (out / PARTS).glob("*"):
        path.unlink()
    (out / PARTS).rmdir()


class Reread:
    """The files decoded again, a few at a time: what the page and the flagged thumbnails show, since no image is
    kept while scoring."""

    def __init__(self, predictor, files: list[str]):
        self.predictor, self.files = predictor, files

    def images(self, rows) -> tuple[np.ndarray, list]:
        """rows' images (k x S x S uint8) and per row None or why it could not be read now."""
        images, errors, _ = self.predictor.decode([self.files[i] for i in rows], show=False)
        return images, errors

    def __getitem__(self, rows) -> torch.Tensor:
        """rows' images as a k x 1 x S x S uint8 batch (zeros for a file that could not be read)."""
        return torch.from_numpy(self.images(list(rows))[0]).unsqueeze(1)
