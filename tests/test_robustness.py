"""Bad files in a real archive, resume after interruption, determinism."""
import csv
import dataclasses
import json
import os
import signal
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib import images
from lib import runs
from lib import transforms
import main
from conftest import shared

# the precision pinned: --precision auto times this machine in each run, and runs compared here must compute alike
TINY = ["--demo", "--demo-patients", "12", "--epochs", "3", "--image-size", "64", "--quiet", "--precision", "fp32"]


def _bad_zoo(root, good):
    """Add each bad case to a class folder; returns {path: expected reason fragment} and extra good files."""
    normal, pneu = root / "train" / "NORMAL", root / "train" / "PNEUMONIA"
    bad = {}
    (normal / "empty.jpeg").write_bytes(b"")
    bad[normal / "empty.jpeg"] = "unreadable image"
    raw = good[0].read_bytes()
    (normal / "truncated.jpeg").write_bytes(raw[: len(raw) // 3])
    bad[normal / "truncated.jpeg"] = "unreadable image"
    (pneu / "notes.jpeg").write_text("this is text")
    bad[pneu / "notes.jpeg"] = "unreadable image"
    Image.new("L", (12000, 12000)).save(pneu / "bomb.png")  # 144 M pixels: over Pillow's guard
    bad[pneu / "bomb.png"] = "DecompressionBomb"
    (normal / ".DS_Store").write_bytes(b"\0junk")
    bad[normal / ".DS_Store"] = "hidden or OS metadata"
    (normal / "Thumbs.db").write_bytes(b"\0junk")
    bad[normal / "Thumbs.db"] = "hidden or OS metadata"
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._x.jpeg").write_bytes(b"\0")
    bad[root / "__MACOSX"] = "hidden or OS metadata"
    (root / "train" / ".ipynb_checkpoints").mkdir()  # hidden folder beside the class folders
    bad[root / "train" / ".ipynb_checkpoints"] = "hidden or OS metadata"
    (root / "train" / "COVID").mkdir()
    shutil.copy(good[1], root / "train" / "COVID" / "covid1.jpeg")
    bad[root / "train" / "COVID"] = "not a class"
    os.symlink(normal, normal / "loop")
    bad[normal / "loop"] = "symlink loop"
    os.symlink(normal / "missing.jpeg", normal / "dangling.jpeg")
    bad[normal / "dangling.jpeg"] = "broken symlink"
    return bad


def _good_variants(root, normal_src, pneumonia_src):
    """Valid images in awkward formats: 16-bit PNG, RGB/RGBA/LA/P/CMYK, upper-case names, EXIF, a symlink.

    Each is a copy of a file filed under the same label, so it is merged as a duplicate, never used twice.
    """
    gray = np.asarray(Image.open(pneumonia_src).convert("L"))
    pneu, normal = root / "train" / "PNEUMONIA", root / "train" / "NORMAL"
    files = []
    Image.fromarray(gray.astype(np.uint16) * 200).save(pneu / "person9001_virus_1.png")
    files.append(pneu / "person9001_virus_1.png")
    for k, mode in enumerate(("RGB", "RGBA", "LA", "P")):
        Image.fromarray(gray).convert(mode).save(pneu / f"person{9002 + k}_bacteria_1.PNG")
        files.append(pneu / f"person{9002 + k}_bacteria_1.PNG")
    gray = np.asarray(Image.open(normal_src).convert("L"))
    Image.fromarray(gray).convert("CMYK").save(normal / "IM-9001-0001.JPG")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(gray).save(normal / "IM-9002-0001.jpeg", exif=exif)
    os.symlink(normal_src, normal / "IM-9003-0001.jpeg")
    return files + [normal / "IM-9001-0001.JPG", normal / "IM-9002-0001.jpeg", normal / "IM-9003-0001.jpeg"]


def test_zoo_archive_accounts_for_every_file(tmp_path, capsys):
    real = shared("chest_xray_256") / "train"
    root = tmp_path / "zoo"
    picks = []
    for label in ("NORMAL", "PNEUMONIA"):
        files = sorted((real / label).glob("*.jpeg"))[:40]
        (root / "train" / label).mkdir(parents=True)
        for f in files:
            shutil.copy(f, root / "train" / label / f.name)
            picks.append(root / "train" / label / f.name)
    variants = _good_variants(root, picks[0], picks[-1])
    bad = _bad_zoo(root, picks)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="ignoring folder .*COVID"):
        assert main.main(["--data", str(root), "--out", str(out), "--epochs", "1", "--image-size", "64", "--quiet",
                          "--cache-dir", str(tmp_path / "cache")]) == 0
    shown = capsys.readouterr().out
    assert f"{len(bad)} files skipped" in shown and "4 hidden or OS metadata" in shown and "4 unreadable image" in shown
    skipped = {row["path"]: row["reason"] for row in csv.DictReader(open(out / "skipped.csv"))}
    assert set(skipped) == {str(p) for p in bad}, set(skipped) ^ {str(p) for p in bad}
    for path, fragment in bad.items():
        assert fragment in skipped[str(path)], (path, skipped[str(path)])
    used = {row["path"] for row in csv.DictReader(open(out / "split.csv"))}
    dups = {row["path"] for row in csv.DictReader(open(out / "duplicates.csv"))}
    assert {str(p) for p in picks + variants} == used | dups
    audit = json.loads((out / "metrics.json").read_text())["data"]
    assert audit["skipped"] == len(bad) and audit["ignored_folders"] == [str(root / "train" / "COVID")]
    gray = images.decode_image(str(picks[-1]), 70).astype(int)
    deep = images.decode_image(str(root / "train" / "PNEUMONIA" / "person9001_virus_1.png"), 70).astype(int)
    assert np.abs(gray - deep).mean() < 2  # 16-bit: same picture, not clipped


def _comparable(run):
    history = [{k: v for k, v in row.items() if k != "seconds"}  # wall seconds vary
               for row in csv.DictReader(open(run / "history.csv"))]
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["provenance"].pop("command")  # names the run folder, which differs by design
    return metrics, history


@pytest.fixture(scope="module")
def uncut(tmp_path_factory):
    """members -> a finished run of `interrupted(members)`'s arguments, trained once for every place it is cut."""
    made = {}

    def run(members: int) -> Path:
        if members not in made:
            made[members] = tmp_path_factory.mktemp("uncut") / "whole"
            assert main.main(interrupted(members) + ["--out", str(made[members])]) == 0
        return made[members]
    return run


def interrupted(members: int) -> list[str]:
    return TINY + ["--batch-size", "8", "--ensemble", str(members)]


def test_same_seed_gives_identical_results(tmp_path, uncut):
    whole = uncut(1)  # the same arguments, trained once for the module
    assert main.main(interrupted(1) + ["--out", str(tmp_path / "b")]) == 0
    assert _comparable(whole) == _comparable(tmp_path / "b")
    assert main.main(interrupted(1) + ["--out", str(tmp_path / "c"), "--seed", "1"]) == 0
    assert _comparable(whole)[0] != _comparable(tmp_path / "c")[0]


@pytest.fixture
def selftrain(uncut, monkeypatch):
    """benchmarks/site_selftrain.py, with a finished one-member run's config, checkpoint and training splits."""
    monkeypatch.setattr(sys, "path", [*sys.path, str(Path(main.__file__).parent / "benchmarks")])  # after the project
    import site_selftrain
    run = uncut(1)
    config = json.loads((run / "config.json").read_text())
    return site_selftrain, config, runs.read_checkpoint(run / "best.pt"), site_selftrain.splits(run, config)


def test_the_benchmarks_retraining_without_site_films_gives_back_the_run_as_trained(selftrain):
    """benchmarks/site_selftrain.py's "retrained" method credits the site's films with every difference from the run
    as trained, which is its control; so without them it must rebuild the run's kept weights exactly."""
    site_selftrain, config, ckpt, sets = selftrain
    again = site_selftrain.fine_tune(ckpt, sets, config, None, fresh=True).members[0].state_dict()
    kept = ckpt["members"][0]  # a run of this version keeps its weights as members
    assert kept.keys() == again.keys()
    assert all(torch.equal(kept[k], again[k]) for k in kept)
    nudged = dict(config, lr=config["lr"] / 2)  # and the comparison sees a slip in the recipe
    other = site_selftrain.fine_tune(ckpt, sets, nudged, None, fresh=True).members[0].state_dict()
    assert not all(torch.equal(kept[k], other[k]) for k in kept)


def test_the_benchmarks_adversarial_retraining_starts_from_the_runs_initialisation_and_trains_its_epochs(selftrain):
    """site_selftrain's "retrained importance-weighted": a new network drawn as the run drew its own, trained for the
    run's epochs (not the fine-tuning's), the critic seeing every step."""
    import argparse
    import math
    import train
    from model import build, place
    site_selftrain, config, ckpt, sets = selftrain
    seen = {"done": []}

    class Counting(site_selftrain.Critic):
        def loss(self, logits, features, labels, done, site_view):
            seen["done"].append(done)
            return super().loss(logits, features, labels, done, site_view)

    def critic(model):
        seen["start"] = {k: v.clone() for k, v in model.state_dict().items()}
        return Counting(model, (0.5, 2.0))

    fine_tuning = argparse.Namespace(epochs=1, lr=1e-4)  # what a fine-tuning would use; a retraining must not
    tuned = site_selftrain.site_fine_tune(ckpt, sets, config, fine_tuning, sets["val"][0][:16], critic, fresh=True)
    train.set_seed(config["seed"])
    drawn = place(build(ckpt["model_config"]), torch.device("cpu")).state_dict()
    assert all(torch.equal(drawn[k], seen["start"][k]) for k in drawn)
    steps = math.ceil(len(sets["train"][0]) / config["batch_size"])
    assert len(seen["done"]) == config["epochs"] * steps and config["epochs"] > fine_tuning.epochs
    after = tuned.members[0].state_dict()
    assert not all(torch.equal(drawn[k], after[k]) for k in drawn)


def test_the_benchmarks_adversarial_fine_tuning_does_not_depend_on_what_ran_before_it(selftrain):
    """site_selftrain fits several methods in one process: a critic's initial weights must come from the run's seed,
    not from whatever the stream holds after the methods fitted before it (which once changed its rows)."""
    import argparse
    site_selftrain, config, ckpt, sets = selftrain
    fine_tuning = argparse.Namespace(epochs=1, lr=1e-3)

    def tuned(drawn_before: int) -> dict:
        torch.rand(drawn_before)  # what a method fitted earlier in the process leaves in the stream
        model = site_selftrain.site_fine_tune(ckpt, sets, config, fine_tuning, sets["val"][0][:16],
                                              site_selftrain.Critic)
        return model.members[0].state_dict()

    first = tuned(1)
    assert all(torch.equal(first[k], v) for k, v in tuned(1000).items())


@pytest.mark.parametrize("where, sig, members", [("mid-epoch", signal.SIGINT, 1),
                                                 ("last step of an epoch", signal.SIGTERM, 1),
                                                 ("mid-epoch of the second member", signal.SIGINT, 2)])
def test_interrupted_run_resumes_to_identical_metrics(tmp_path, monkeypatch, uncut, where, sig, members):
    argv, whole = interrupted(members), uncut(members)
    n_train = sum(r["split"] == "train" for r in csv.DictReader(open(whole / "split.csv")))
    steps = -(-n_train // 8)
    # the n-th training batch overall; TINY trains 3 epochs a member
    stop_at = {"mid-epoch": steps + 2, "last step of an epoch": 2 * steps}.get(where, 3 * steps + steps + 2)
    calls = {"n": 0}
    real = transforms.Preprocess.train

    def interrupting(self, batch, generator, *share):
        calls["n"] += 1
        if calls["n"] == stop_at:
            os.kill(os.getpid(), sig)  # the handler lets this step finish, then saves
        return real(self, batch, generator, *share)

    monkeypatch.setattr(transforms.Preprocess, "train", interrupting)
    assert main.main(argv + ["--out", str(tmp_path / "cut")]) == 130
    assert (tmp_path / "cut" / "INCOMPLETE").exists() and (tmp_path / "cut" / "last.pt").exists()
    assert not (tmp_path / "cut" / "metrics.json").exists()
    if members > 1:  # the first member finished and is kept on disk; the second stopped in its second epoch
        assert runs.load_checkpoint(tmp_path / "cut" / "last.pt")["state"]["member"] == 1
        assert (tmp_path / "cut" / "members" / "member0.pt").exists()
    monkeypatch.setattr(transforms.Preprocess, "train", real)
    assert main.main(["--resume", str(tmp_path / "cut"), "--quiet"]) == 0
    assert not (tmp_path / "cut" / "INCOMPLETE").exists() and not (tmp_path / "cut" / "members").exists()
    assert _comparable(tmp_path / "cut") == _comparable(whole)
    whole, cut = (runs.load_checkpoint(run / "best.pt")["members"] for run in (whole, tmp_path / "cut"))
    assert len(whole) == len(cut) == members
    assert all(torch.equal(a[k], b[k]) for a, b in zip(whole, cut) for k in a)  # the same ensemble, weight for weight


def test_a_resumed_run_keeps_the_precision_auto_chose_when_it_started(tmp_path, monkeypatch):
    from lib import precision
    auto = [a for a in TINY if a not in ("--precision", "fp32")] + ["--out", str(tmp_path / "run")]
    monkeypatch.setattr(precision, "probe", lambda *a, **k: {"fp32": 100.0, "bf16": 50.0})
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})  # a CPU with bf16, where auto times
    real = transforms.Preprocess.train

    def interrupting(self, batch, generator, *share):
        os.kill(os.getpid(), signal.SIGINT)  # stop after the first step
        return real(self, batch, generator, *share)

    monkeypatch.setattr(transforms.Preprocess, "train", interrupting)
    assert main.main(auto) == 130
    monkeypatch.setattr(transforms.Preprocess, "train", real)
    monkeypatch.setattr(precision, "probe", lambda *a, **k: {"fp32": 50.0, "bf16": 100.0})  # would choose fp32 now
    assert main.main(["--resume", str(tmp_path / "run"), "--quiet"]) == 0
    chosen = json.loads((tmp_path / "run" / "metrics.json").read_text())["provenance"]["precision"]
    assert chosen["chosen"] == "bf16" and chosen["timings_ms"] == {"fp32": 100.0, "bf16": 50.0}


def test_resume_refuses_a_finished_run(demo_run, capsys):
    assert main.main(["--resume", str(demo_run)]) == 2
    assert "not an interrupted run" in capsys.readouterr().err


def test_nan_loss_stops_with_message_and_still_evaluates(tmp_path, monkeypatch, capsys):
    import train
    real = train.train_one_epoch

    def poisoned(parts, images, labels, batch_size, state, **rest):
        if len(state.history) >= 2:  # poison the third epoch
            parts = dataclasses.replace(parts, loss_fn=lambda logits, y: logits.sum() * float("inf"))
        return real(parts, images, labels, batch_size, state, **rest)

    monkeypatch.setattr(train, "train_one_epoch", poisoned)
    assert main.main(TINY + ["--out", str(tmp_path / "nan")]) == 0
    err = capsys.readouterr().err
    assert "epoch 3, step 1" in err and "evaluating what was kept: the weights of the epoch with the best" in err
    m = json.loads((tmp_path / "nan" / "metrics.json").read_text())
    kept = m["training"]["members"][0]
    assert "epoch 3" in m["training_failure"] and kept["kept_epochs"][0] <= 2 and kept["epochs_run"] == 2


def test_full_disk_mid_run_ends_with_one_sentence_and_a_loadable_checkpoint(tmp_path, monkeypatch, capsys):
    import errno
    import train
    real = train.write_history

    def full_after_first_epoch(path, history):
        if len(history) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, history)

    monkeypatch.setattr(train, "write_history", full_after_first_epoch)
    out = tmp_path / "run"
    assert main.main(["--demo", "--out", str(out), "--epochs", "3", "--demo-patients", "8", "--image-size", "48",
                      "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and str(out / "history.csv") in err
    assert "Traceback" not in err and (out / "INCOMPLETE").exists()
    assert runs.load_checkpoint(out / "last.pt")["state"]["epoch"] == 1  # the last complete checkpoint loads
