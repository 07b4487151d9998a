"""predict on an archive: rows written chunk by chunk in bounded memory, --resume after a stop, torchrun shards."""
import os
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

import main
from lib import runs
from app import streaming
from conftest import ROOT
from test_distributed import ENV


def archive(folder: Path, source: Path, n: int) -> Path:
    """n files, symlinks to the demo run's phantoms (cycled): an archive costs no disk."""
    films = sorted(source.rglob("*.png"))
    folder.mkdir()
    for i in range(n):
        os.symlink(films[i % len(films)], folder / f"f{i:05d}.png")
    return folder


def predict(paths: list[Path], checkpoint: Path, out: Path, *extra: str) -> int:
    return main.main(["predict", *map(str, paths), "--checkpoint", str(checkpoint), "--out", str(out), "--quiet",
                      *extra])


@pytest.fixture
def films(demo_run, tmp_path) -> Path:
    return archive(tmp_path / "films", demo_run / "demo_data", 230)


def test_a_stopped_predict_keeps_whole_chunks_and_resumes_to_the_same_bytes(demo_run, films, tmp_path, monkeypatch,
                                                                             capsys):
    monkeypatch.setattr(streaming, "CHUNK", 50)
    assert predict([films], demo_run / "best.pt", tmp_path / "whole") == 0
    whole = (tmp_path / "whole" / "predictions.csv").read_bytes()
    assert len(whole.splitlines()) == 231 and not (tmp_path / "whole" / streaming.PARTS).exists()

    real, calls = streaming.score_chunk, []

    def stopped(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the third chunk is scored
        return real(*args)
    monkeypatch.setattr(streaming, "score_chunk", stopped)
    out = tmp_path / "stopped"
    assert predict([films], demo_run / "best.pt", out) == 130
    assert f"continue with: python main.py predict --resume {out}" in capsys.readouterr().err
    # the CSV holds the two finished chunks, every row whole, and the folder says it is not finished
    assert (out / "predictions.csv").read_bytes() == b"".join(whole.splitlines(keepends=True)[:101])
    assert (out / runs.MARKER).exists() and not (out / "report.html").exists()
    (out / streaming.PARTS / ".tmp-torn").write_bytes(b'{"path": "f0')  # as a kill mid-write leaves it

    monkeypatch.setattr(streaming, "score_chunk", real)
    rescored = []
    monkeypatch.setattr(streaming, "score_chunk", lambda *args: rescored.append(args[2]) or real(*args))
    assert main.main(["predict", "--resume", str(out), "--quiet"]) == 0
    assert rescored == [100, 150, 200]  # the first rows of the chunks it scored: never one twice
    assert (out / "predictions.csv").read_bytes() == whole
    assert not (out / runs.MARKER).exists() and not (out / streaming.PARTS).exists()
    assert (out / "report.html").exists()
    assert main.main(["predict", "--resume", str(out)]) == 2
    assert "has finished" in capsys.readouterr().err


def test_resume_refuses_other_files_and_a_folder_that_is_no_predict(demo_run, films, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(streaming, "CHUNK", 100)
    monkeypatch.setattr(streaming, "score_chunk", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    out = tmp_path / "out"
    assert predict([films], demo_run / "best.pt", out) == 130
    os.symlink(next(films.iterdir()).resolve(), films / "new.png")
    assert main.main(["predict", "--resume", str(out)]) == 2
    assert "now holds other files than when" in capsys.readouterr().err
    assert main.main(["predict", "--resume", str(demo_run)]) == 2
    assert "is not the output folder of a predict" in capsys.readouterr().err
    assert main.main(["predict", str(films), "--resume", str(out)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main.main(["predict", "--resume", str(out), "--checkpoint", "other.pt", "--strict"]) == 2
    assert "so --checkpoint, --strict cannot be given now" in capsys.readouterr().err


def test_memory_does_not_grow_with_the_number_of_files(demo_run, tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "CHUNK", 100)
    real, peaks = streaming.score_files, []

    def traced(*args, **keywords):  # the peak of Python's (and numpy's) allocations while the files are scored
        tracemalloc.start()
        try:
            return real(*args, **keywords)
        finally:
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
    monkeypatch.setattr(streaming, "score_files", traced)
    for n in (500, 2500):
        folder = archive(tmp_path / f"f{n}", demo_run / "demo_data", n)
        assert predict([folder], demo_run / "best.pt", tmp_path / f"out{n}", "--workers", "1") == 0
    image_bytes = 141 * 141  # one decoded 128 px film (stored 10% larger): what holding every image would cost
    # 2,000 more files: their rows (name, probability, flags: under 1 KB each), not 2,000 more images (40 MB); the
    # margin is for Python's table of interned strings, which pathlib grows with every new name and which doubles
    # at once when full, whenever that happens to fall (7.5 MB measured at 1,500 files)
    assert peaks[1] - peaks[0] < 2000 * image_bytes / 2, peaks


# main.py with chunks of 100 files (two chunks are 160 files rather than 1,084), noting in CHUNK_LOG which rank
# scores which chunk
SMALL_CHUNKS = """import os, sys
sys.path.insert(0, os.environ["PROJECT_ROOT"])
from app import streaming
streaming.CHUNK, real = 100, streaming.score_chunk
def noted(*args):
    with open(os.environ["CHUNK_LOG"], "a") as log:
        log.write(f"{os.environ['RANK']} {args[2]}\\n")
    return real(*args)
streaming.score_chunk = noted
import main
sys.exit(main.main())
"""


def test_two_torchrun_processes_share_the_chunks_and_write_the_same_csv(demo_run, tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "CHUNK", 100)
    films = archive(tmp_path / "films", demo_run / "demo_data", 160)
    command = ["predict", str(films), "--checkpoint", str(demo_run / "best.pt"), "--quiet"]
    assert main.main([*command, "--out", str(tmp_path / "one")]) == 0
    script, log = tmp_path / "small_chunks.py", tmp_path / "chunks.log"
    script.write_text(SMALL_CHUNKS)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), *command, "--out", str(tmp_path / "two")],
                         env={**ENV, "PROJECT_ROOT": str(ROOT), "CHUNK_LOG": str(log)}, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert sorted(log.read_text().splitlines()) == ["0 0", "1 100"]  # chunk 0 on rank 0, chunk 1 on rank 1
    csv_one = (tmp_path / "one" / "predictions.csv").read_bytes()
    assert csv_one == (tmp_path / "two" / "predictions.csv").read_bytes()
    names = [line.split(b",")[0] for line in csv_one.splitlines()[1:]]
    assert names == sorted(names) and len(names) == 160  # the input order, every file once
    assert two.stdout.count("files:") == 1  # rank 0 alone answers
    assert not (tmp_path / "two" / runs.MARKER).exists() and (tmp_path / "two" / "report.html").exists()


def test_a_log_says_the_rate_and_the_time_left_while_a_long_step_runs(monkeypatch, capsys):
    from lib import progress
    monkeypatch.setattr(progress, "EVERY", 0.0)
    bar = progress.Lines(100, "scoring", "images")
    bar.update(25)
    assert re.fullmatch(r"scoring: 25 of 100 images, [\d,.]+ images/s, \d+ min left\n", capsys.readouterr().out)
    bar.update(75)  # the last: no running line, the closing one
    bar.close()
    assert re.fullmatch(r"scoring: 100 images in [\d.]+ s \(.*\)\n", capsys.readouterr().out)


def test_under_torchrun_only_predict_shares_its_work_and_the_other_sub_commands_say_so(monkeypatch, capsys):
    from app.settings import parse_command
    monkeypatch.setenv("WORLD_SIZE", "2")
    commands = (["evaluate", "--checkpoint", "x.pt", "--data", "d"],
                ["calibrate", "--checkpoint", "x.pt", "--data", "d"], ["export", "--checkpoint", "x"])
    for command in commands:
        assert main.main(command) == 2
        assert f"{command[0]} runs in one process" in capsys.readouterr().err
    assert parse_command(["predict", "films", "--checkpoint", "x.pt"])[0] == "predict"


def test_a_damaged_predict_json_is_refused_in_one_sentence(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / streaming.STATE).write_text("{not json")
    (out / runs.MARKER).write_text("predict did not finish")
    assert main.main(["predict", "--resume", str(out)]) == 2
    assert "cannot be read (JSONDecodeError); start a new predict" in capsys.readouterr().err
