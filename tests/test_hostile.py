"""Hostile names, shared folders, huge DICOMs, odd values, Ctrl-C and GPUs without bf16: nothing crashes, nothing is
lost, nothing is injected. Every case on synthetic files in tmp_path."""
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from lib import distributed
from lib import images
import main
from lib import names
from lib import precision
from app import report
from lib import runs
from conftest import ROOT, write_image
from test_dicom import write_dicom

TINY = ["--demo", "--demo-patients", "12", "--epochs", "2", "--image-size", "64", "--quiet", "--precision", "fp32"]
HOSTILE = ["=HYPERLINK(\"x\",\"y\")", "@SUM(1+1)", "+cmd", "-2+3", "\tx", "\rx", "'=quoted", "''@twice",
           "-5", "plain", "it's", "'"]
LATIN1 = b"caf\xe9"  # a name written on a Latin-1 system: not UTF-8


def non_utf8(folder: Path, stem: bytes = LATIN1, suffix: str = ".png") -> Path:
    """A path in `folder` whose file name is not valid UTF-8 (Python keeps such bytes as surrogates)."""
    return Path(os.fsdecode(os.fsencode(str(folder)) + b"/" + stem + suffix.encode()))


def copy_demo(demo_run: Path, to: Path) -> Path:
    shutil.copytree(demo_run / "demo_data", to)
    return to


def outside_code_spans(markdown: str) -> str:
    """What a Markdown renderer would read as text or HTML: everything but the code spans (CommonMark 6.1)."""
    return re.sub(r"(`+)(.+?)(?<!`)\1(?!`)", "", markdown)


# ---------------------------------------------------------------- names as data
def test_every_csv_cell_that_would_start_a_formula_is_neutralised_and_read_back_as_it_was(tmp_path):
    rows = [[name, 0.5, -1] for name in HOSTILE]
    runs.write_csv(tmp_path / "t.csv", ["path", "p", "n"], rows)
    with open(tmp_path / "t.csv", newline="") as f:
        cells = [row[0] for row in csv.reader(f)][1:]  # as a spreadsheet sees them
    assert len(cells) == len(HOSTILE)
    for written, name in zip(cells, HOSTILE):
        live = written[:1] in names.FORMULA_START and not re.fullmatch(r"-?\d+", written)
        assert not live, f"{name!r} was written as {written!r}"
    assert [r["path"] for r in runs.read_csv(tmp_path / "t.csv")] == HOSTILE
    assert names.cell("-5") == "-5" and names.cell(-5) == -5  # numbers stay numbers


def test_a_name_that_is_not_utf8_is_written_to_csv_byte_for_byte_and_read_back_to_a_path_that_opens(tmp_path):
    path = write_image(non_utf8(tmp_path), seed=1)
    runs.write_csv(tmp_path / "t.csv", ["path"], [[str(path)]])
    assert os.fsencode(str(tmp_path)) + b"/" + LATIN1 + b".png" in (tmp_path / "t.csv").read_bytes()
    back = runs.read_csv(tmp_path / "t.csv")[0]["path"]
    assert back == str(path) and os.path.isfile(back)


def test_names_are_printable_on_the_terminal_and_cannot_close_a_markdown_code_span():
    assert names.shown("a\x1b[2Jb\x07\x9bc\n") == "a\\x1b[2Jb\\x07\\x9bc\n"
    assert names.shown(os.fsdecode(LATIN1)) == "caf\\xe9"
    for text in ["a`b", "``x``", "`", "x` <img src=x onerror=alert(1)> `y"]:
        span = names.code(text)
        assert outside_code_spans(f"see {span} here") == "see  here", span


def test_the_model_card_keeps_a_hostile_folder_name_inside_its_code_spans(demo_run, tmp_path):
    import json
    metrics = json.loads((demo_run / "metrics.json").read_text())
    config = json.loads((demo_run / "config.json").read_text())
    evil = "data`<img src=x onerror=alert(1)>`|x"
    config.update(data=evil, demo=False)
    metrics["sets"][evil] = {**metrics["sets"]["test split"], "kind": "external"}
    metrics["provenance"]["command"] = f"python main.py --data '{evil}'"
    groups = metrics["sets"]["test split"]["shortcut"]["groups"]
    groups["manufacturer"] = {"<img src=x onerror=alert(2)>": next(iter(groups["series"].values()))}  # data too
    card = report.write_model_card(tmp_path, config, metrics).read_text()
    assert "<img" in card and "<img" not in outside_code_spans(card)


def test_formula_names_and_a_formula_patient_id_round_trip_through_predictions_and_split_csv(demo_run, tmp_path):
    data_dir = tmp_path / "site"
    pixels = np.asarray(Image.open(next((demo_run / "demo_data").rglob("*.png"))).convert("L"))
    for j, label in enumerate(("NORMAL", "PNEUMONIA")):
        (data_dir / label).mkdir(parents=True)
        for k in range(3):
            shifted = np.roll(pixels, 7 * (3 * j + k), axis=1)  # six different pictures
            write_dicom(data_dir / label / f"{HOSTILE[3 * j + k].strip()}{k}.dcm", shifted,
                        patient=f"=cmd|' /C calc'!A{3 * j + k}")
    out = tmp_path / "ev"
    assert main.main(["evaluate", "--checkpoint", str(demo_run / "best.pt"), "--data", str(data_dir), "--out",
                      str(out), "--no-cache", "--quiet"]) == 0
    for name in ("split.csv", "predictions.csv"):
        text = (out / name).read_text()
        assert "=cmd" in text and not re.search(r'(^|,)"?[=+@\-]', text, re.M), name
    split = runs.read_csv(out / "split.csv")
    assert {r["patient"] for r in split} == {f"=cmd|' /C calc'!A{i}" for i in range(6)}
    assert all(os.path.isfile(r["path"]) for r in split)
    # and the project reads its own split.csv back: evaluate --data split.csv scores the very same files
    found = data.find_labelled(str(out / "split.csv"))
    assert set(found.paths) == {r["path"] for r in split if r["split"] == "test"}


def test_predict_scores_a_non_utf8_name_a_formula_name_and_an_escape_sequence(demo_run, tmp_path, capfd):
    folder = tmp_path / "in"
    write_image(non_utf8(folder), seed=1, size=160)
    write_image(folder / "=HYPERLINK(1).png", seed=2, size=160)
    (folder / "x\x1b[2J\x1b[31mred.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main.main(["predict", str(folder), "--checkpoint", str(demo_run / "best.pt"), "--out", str(out),
                      "--cam"]) == 0
    captured = capfd.readouterr()
    # the unreadable file's name in predict's answer, escaped, with why it was not scored beside it
    assert "\x1b" not in captured.out + captured.err and "\\x1b[2J" in captured.out
    rows = runs.read_csv(out / "predictions.csv")
    assert {Path(r["path"]).name for r in rows} == {os.fsdecode(LATIN1) + ".png", "=HYPERLINK(1).png",
                                                  "x\x1b[2J\x1b[31mred.png"}
    scored = [r for r in rows if r["probability"]]
    assert len(scored) == 2 and all(os.path.isfile(r["path"]) for r in scored)
    assert (out / "report.html").exists() and not (out / runs.MARKER).exists()


def test_a_non_utf8_name_goes_through_training_and_resume(demo_run, tmp_path, monkeypatch):
    from lib import transforms
    data_dir = copy_demo(demo_run, tmp_path / "data")
    first = sorted((data_dir / "images" / "NORMAL").glob("*.png"))[0]
    os.rename(first, non_utf8(first.parent, stem=LATIN1 + first.stem.encode()))
    argv = ["--data", str(data_dir), "--epochs", "2", "--image-size", "64", "--quiet", "--precision", "fp32",
            "--no-cache", "--out", str(tmp_path / "run")]
    real = transforms.Preprocess.train

    def interrupting(self, batch, generator, *share):
        os.kill(os.getpid(), signal.SIGINT)  # stop after the first step: last.pt is written
        return real(self, batch, generator, *share)

    monkeypatch.setattr(transforms.Preprocess, "train", interrupting)
    assert main.main(argv) == 130
    assert (tmp_path / "run" / "last.pt").exists()
    monkeypatch.setattr(transforms.Preprocess, "train", real)
    assert main.main(["--resume", str(tmp_path / "run"), "--quiet"]) == 0
    paths = {r["path"] for r in runs.read_csv(tmp_path / "run" / "split.csv")}
    assert any(os.fsencode(p).endswith(LATIN1 + first.stem.encode() + b".png") for p in paths)
    assert all(os.path.isfile(p) for p in paths)
    assert (tmp_path / "run" / "MODEL_CARD.md").exists() and (tmp_path / "run" / "report.html").exists()


def test_a_mathtext_name_in_an_external_set_does_not_stop_the_end_of_a_run(tmp_path):
    external = tmp_path / "ext"
    for j, label in enumerate(("NORMAL", "PNEUMONIA")):
        for k in range(3):
            write_image(external / label / f"$\\foo{{{k}}}$ and $x^{j}$.png", seed=10 * j + k, size=80)
    out = tmp_path / "run"
    assert main.main(TINY + ["--out", str(out), "--external", str(external)]) == 0
    assert all((out / name).exists() for name in ("metrics.json", "report.html", "MODEL_CARD.md"))


# ---------------------------------------------------------------- decoders
def test_a_dicom_decompression_bomb_is_refused_before_its_pixels_are_decoded(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from hostile_inputs import dicom  # the benchmark's RLE writer: a 2 MB file of 144 M pixels
    bomb = dicom(tmp_path / "bomb.dcm", rle_shape=(12000, 12000))
    assert bomb.stat().st_size < 3e6
    tracemalloc.start()
    try:
        with pytest.raises(Image.DecompressionBombError, match="144000000 pixels"):
            images.decode_image(str(bomb), 141)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50e6  # the header and the compressed bytes only (decoding took 4.7 GB)
    from lib import cache
    _, reason, _ = cache._decode_job((str(bomb), 141))
    assert "DecompressionBombError" in reason  # the same kind of reason as a PNG bomb's


def test_an_adult_dicom_is_flagged_with_its_age_in_either_spelling(demo_run, tmp_path):
    pixels = np.asarray(Image.open(next((demo_run / "demo_data").rglob("*.png"))).convert("L"))
    (tmp_path / "in").mkdir()
    for age in ("062Y", "62"):
        write_dicom(tmp_path / "in" / f"a{age}.dcm", pixels, PatientAge=age)
    write_dicom(tmp_path / "in" / "child.dcm", pixels, PatientAge="004Y")
    out = tmp_path / "out"
    assert main.main(["predict", str(tmp_path / "in"), "--checkpoint", str(demo_run / "best.pt"), "--out",
                      str(out)]) == 0
    flags = {Path(r["path"]).name: r["warnings"] for r in runs.read_csv(out / "predictions.csv")}
    assert "an adult (PatientAge 062Y)" in flags["a062Y.dcm"] and "an adult (PatientAge 62)" in flags["a62.dcm"]
    assert "adult" not in flags["child.dcm"]
    assert images.age_in_years("018M") == 1.5 and images.age_in_years("") is None


# ---------------------------------------------------------------- output folders
def test_two_commands_racing_for_one_out_folder_one_wins_and_the_other_is_refused(tmp_path):
    for attempt in range(5):
        out, gate, results = tmp_path / f"race{attempt}", threading.Barrier(2), []

        def claim():
            gate.wait()
            try:
                results.append(runs.create(str(out)))
            except runs.RunError as err:
                results.append(err)

        threads = [threading.Thread(target=claim) for _ in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert sum(isinstance(r, Path) for r in results) == 1, results
        assert "claimed by another command" in str(next(r for r in results if isinstance(r, runs.RunError)))


def test_default_folder_names_never_collide_even_in_one_second(tmp_path):
    gate, made = threading.Barrier(6), []

    def claim():
        gate.wait()
        made.append(runs.create(None, "predict-", tmp_path))

    threads = [threading.Thread(target=claim) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(set(made)) == 6 and all(p.parent == tmp_path for p in made)


def test_two_predicts_with_one_out_never_mix_their_rows(demo_run, tmp_path):
    folder = tmp_path / "in"
    for i in range(6):
        write_image(folder / f"a{i}.png", seed=i, size=160)
    cmd = [sys.executable, str(ROOT / "main.py"), "predict", str(folder), "--checkpoint", str(demo_run / "best.pt"),
           "--out", str(tmp_path / "out")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    refusal = next(err for rc, err in results if rc == 2)
    assert "choose another --out" in refusal and len(refusal.strip().splitlines()) == 1
    assert len(runs.read_csv(tmp_path / "out" / "predictions.csv")) == 6


@pytest.mark.parametrize("where", ["class folder", "input folder", "file"])
def test_out_inside_the_data_or_onto_a_file_is_refused_in_one_sentence(demo_run, tmp_path, capsys, where):
    data_dir = copy_demo(demo_run, tmp_path / "data")
    (tmp_path / "a-file").write_text("x")
    out = {"class folder": data_dir / "images" / "NORMAL" / "ev", "input folder": data_dir / "runs" / "ev",
           "file": tmp_path / "a-file"}[where]
    assert main.main(["evaluate", "--checkpoint", str(demo_run / "best.pt"), "--data", str(data_dir), "--out",
                      str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    expected = {"class folder": "inside the class folder", "input folder": "which this command reads",
                "file": "is an existing file, not a folder"}[where]
    assert expected in err and len(err.splitlines()) == 1 and "disk" not in err
    assert not (out / "metrics.json").exists()


# ---------------------------------------------------------------- refusals
def test_the_wrong_kind_of_checkpoint_is_refused_in_one_sentence(demo_run, tmp_path, capsys):
    assert main.main(["predict", str(demo_run / "demo_data"), "--checkpoint", str(demo_run / "last.pt")]) == 2
    assert "is a training state (the last.pt that --resume continues from)" in capsys.readouterr().err
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    (run / runs.MARKER).write_text("x")
    (run / "members").mkdir()
    torch.save({"weights": threading.Lock}, run / "members" / "member0.pt")  # a pickle this project did not write
    assert main.main(["--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot be loaded safely" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flags, says", [(["--seed", "-5"], "--seed: expected a whole number in [0, 2147483647]"),
                                         (["--lr", "1e308"], "--lr: expected a number in (0, 10.0]"),
                                         (["--image-size", "100000"],
                                          "--image-size: expected a whole number in [16, 1024]")])
def test_out_of_range_values_are_refused_before_a_folder_is_made(tmp_path, capsys, flags, says):
    with pytest.raises(SystemExit) as exit_:
        main.main(TINY + ["--out", str(tmp_path / "run"), *flags])
    assert exit_.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_evaluate_refuses_a_csv_that_is_not_a_split_csv(demo_run, tmp_path, capsys):
    (tmp_path / "foreign.csv").write_text("path,label\nx.png,NORMAL\n")
    assert main.main(["evaluate", "--checkpoint", str(demo_run / "best.pt"), "--data",
                      str(tmp_path / "foreign.csv"), "--out", str(tmp_path / "ev")]) == 2
    assert "is not a run's split.csv: it needs the columns path, label and split and has path, label" in \
        capsys.readouterr().err


def test_a_run_that_keeps_nothing_says_it_cannot_be_resumed(tmp_path, monkeypatch, capsys):
    import dataclasses
    import train
    real = train.train_one_epoch

    def poisoned(parts, *rest, **keywords):
        parts = dataclasses.replace(parts, loss_fn=lambda logits, y: logits.sum() * float("inf"))
        return real(parts, *rest, **keywords)

    monkeypatch.setattr(train, "train_one_epoch", poisoned)
    assert main.main(TINY + ["--out", str(tmp_path / "run")]) == 1
    assert "cannot be resumed" in capsys.readouterr().err
    assert main.main(["--resume", str(tmp_path / "run")]) == 2
    assert "this run cannot be resumed" in capsys.readouterr().err


# ---------------------------------------------------------------- Ctrl-C
def test_ctrl_c_in_predict_exits_130_with_one_line_and_leaves_the_folder_marked_incomplete(demo_run, tmp_path):
    folder = tmp_path / "many"
    for i in range(300):
        write_image(folder / f"m{i:03d}.png", seed=i, size=400)
    out = tmp_path / "out"
    log = open(tmp_path / "stderr.txt", "w")  # a file, not a pipe: 300 flagged lines would fill a pipe and block it
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "predict", str(folder), "--checkpoint",
                             str(demo_run / "best.pt"), "--out", str(out), "--cam", "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=log)
    marker = out / runs.MARKER
    for _ in range(1200):  # wait until predict draws its overlays, after scoring, before its report
        if list(out.glob("gradcam/*.png")) + list(out.glob("*_cam.png")) or proc.poll() is not None:
            break
        threading.Event().wait(0.05)
    assert proc.poll() is None, "predict finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    log.close()
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("predict interrupted (Ctrl-C)")
    assert marker.exists() and not (out / "report.html").exists()


# ---------------------------------------------------------------- GPUs, mocked
@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((8, 0), "bf16")])
def test_auto_takes_bf16_only_on_a_gpu_with_bf16_units(monkeypatch, capability, expected):
    # torch's own check, as it answers on a T4 (7.5: emulated bf16 counts unless including_emulation=False) and an A100
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or capability >= (8, 0))
    choice = precision.resolve("auto", torch.device("cuda"), None, 64, 8)
    assert choice.name == expected
    if expected == "fp16":
        with pytest.raises(ValueError, match="no bf16 units"):
            precision.resolve("bf16", torch.device("cuda"), None, 64, 8)


def test_fp16_can_be_forced_on_cuda_and_is_refused_elsewhere():
    assert precision.resolve("fp16", torch.device("cuda"), None, 64, 8).name == "fp16"
    with pytest.raises(ValueError, match="CUDA GPU only"):
        precision.resolve("fp16", torch.device("cpu"), None, 64, 8)


def test_a_local_rank_without_its_gpu_is_refused_in_one_sentence(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"LOCAL_RANK 1, but only 1 GPU\(s\) are visible.*--nproc_per_node=1"):
        distributed.start(distributed.Context(rank=1, world=2, local_rank=1), torch.device("cuda"))


def test_each_rank_resumes_its_own_cuda_random_state(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((int(state[0]), device)))
    generator = torch.Generator()
    base = {"generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "state": {}}
    states = [torch.tensor([10], dtype=torch.uint8), torch.tensor([11], dtype=torch.uint8)]
    runs.restore_last({**base, "cuda_rng_per_rank": states}, {}, generator, 1, torch.device("cuda", 1))
    assert calls == [(11, torch.device("cuda", 1))]
    runs.restore_last({**base, "cuda_rng_per_rank": states}, {}, generator, 2, torch.device("cuda", 0))
    assert len(calls) == 1  # a rank the saved run did not have keeps its seeded state
    # a last.pt from before: rank 0's list of every GPU it saw, here one; a second GPU finds no entry, no IndexError
    runs.restore_last({**base, "cuda_rng": states[:1]}, {}, generator, 1, torch.device("cuda", 1))
    assert len(calls) == 1
    runs.restore_last({**base, "cuda_rng": states[:1]}, {}, generator, 0, torch.device("cuda", 0))
    assert calls[-1] == (10, torch.device("cuda", 0))


def test_a_ctrl_c_that_python_could_not_raise_still_stops_a_scoring_command(tmp_path):
    # Python's own handler, or SIG_IGN where the suite was started in the background of a script (`pytest &`)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(runs.Interrupted, match="predict interrupted"):
        with runs.partial(tmp_path, "predict"):
            (tmp_path / "predictions.csv").write_text("path\n")  # something written: the folder stays, marked
            try:
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt:
                pass  # as in a fork hook, where Python only prints it and goes on
    assert (tmp_path / runs.MARKER).exists()
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


def test_a_one_process_torchrun_job_is_a_process_group_of_one(monkeypatch):
    from app import settings
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("WORLD_SIZE", "1")
    ranks = distributed.Context.from_env()
    assert ranks.active and ranks.main and ranks.world == 1  # NCCL on one GPU runs the same code as on eight
    assert settings.launcher() == ["torchrun", "--nproc_per_node=1"]
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert not distributed.Context.from_env().active


def test_a_word_that_is_no_sub_command_is_refused_naming_the_sub_commands(capsys):
    assert main.main(["prdict", "x.png"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: 'prdict' is not a sub-command; use evaluate, predict, calibrate or export (each with "
                   "--help), or flags alone to train")


def test_a_sub_command_refused_before_its_first_file_leaves_no_folder_behind(demo_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["evaluate", "--checkpoint", str(demo_run / "best.pt"), "--data", str(tmp_path / "empty"), "--out",
            str(tmp_path / "ev")]
    assert main.main(argv) == 2 and "no images" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()  # so the same --out works once the data is right
    assert main.main(argv[:4] + [str(demo_run / "demo_data")] + argv[5:] + ["--quiet"]) == 0
    assert (tmp_path / "ev" / "metrics.json").exists() and not (tmp_path / "ev" / runs.MARKER).exists()
