"""End to end through main(): outputs, errors, evaluate, predict."""
import csv
import dataclasses
import json
import os
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest

import evaluate
from app import commands
import main
from lib import infer
from lib import runs
from lib.distributed import Context
from app.settings import Settings, UsageError
from conftest import ROOT, shared, stray_figures, write_image

OUTPUTS = ["config.json", "split.csv", "skipped.csv", "history.csv", "best.pt", "metrics.json", "roc.png",
           "predictions.csv", "predictions_val.csv",
           "confusion_matrix.png", "pr.png", "calibration.png", "training_curves.png", "gradcam_grid.png",
           "gradcam_randomisation.png", "report.html", "MODEL_CARD.md"]


def test_demo_run_writes_every_output_and_learns(demo_run):
    for name in OUTPUTS:
        assert (demo_run / name).is_file(), name
    assert len(list((demo_run / "gradcam").glob("TP_*.png"))) >= 1
    assert not (demo_run / "INCOMPLETE").exists()
    m = json.loads((demo_run / "metrics.json").read_text(),
                   parse_constant=lambda token: pytest.fail(f"{token} in metrics.json: not strict JSON"))
    assert m["schema"] == runs.METRICS_SCHEMA and list(m["sets"]) == ["test split",
                                                                      "other_site"]  # test, then --external
    test = m["sets"]["test split"]["rates"]
    assert m["synthetic"] is True
    assert set(test) >= {"accuracy", "auc", "sensitivity", "specificity", "ppv", "npv", "threshold", "tp", "tn", "fp",
                         "fn"}
    assert test["auc"] >= 0.95
    for k, (lo, hi) in test["ci95"].items():
        assert lo <= test[k] <= hi, k
    assert m["data"]["patients_in_several_splits"] == 0 and m["data"]["duplicates_across_splits"] == 0
    assert m["validation"]["threshold"] == test["threshold"]
    page = (demo_run / "report.html").read_text()
    assert "SYNTHETIC" in page and "data:image/png;base64," in page and "<script" not in page and "http" not in page


def test_the_demo_page_and_card_say_the_truth_once(demo_run):
    page = (demo_run / "report.html").read_text()
    title = page.split("<title>")[1].split("</title>")[0]
    assert "synthetic demo" in title and len(title) < 60 and page.count("not real X-rays, not a medical result") == 1
    assert "<details><summary>" in page  # the configuration folded
    assert ": -" not in page and "among the rest: -" not in page  # a figure that cannot be computed says why
    card = (demo_run / "MODEL_CARD.md").read_text()
    assert "Guangzhou" not in card and "Phantoms, not patients" in card and "pointing game" in card
    assert "license:" not in card.split("---\n")[1]


def test_outputs_get_the_users_umask_like_any_program(demo_run, tmp_path):
    """A run a colleague or a web server can read: every file's mode is what the umask gives, PNG or checkpoint."""
    expected = runs.umask_mode()
    made = [p for p in demo_run.rglob("*") if p.is_file()]  # the run's outputs, phantoms and calibration included
    files = [p for p in made if not {"demo_data", "demo_site"} & set(p.parts)]
    wrong = {p.name: oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o777 != expected}
    assert files and not wrong
    old = os.umask(0o027)
    try:
        runs.write_json(tmp_path / "a.json", {})
        runs.save_checkpoint(tmp_path / "a.pt", {})
        assert {(tmp_path / n).stat().st_mode & 0o777 for n in ("a.json", "a.pt")} == {0o640}
    finally:
        os.umask(old)


def test_demo_gradcam_points_at_the_phantom_lesions(demo_run):
    g = json.loads((demo_run / "metrics.json").read_text())["sets"]["test split"]["gradcam"]
    loc = g["localisation"]
    print(f"pointing game {loc['pointing_game']:.3f} on {loc['images']} images, mass ratio {loc['mass_ratio']:.2f}")
    assert loc["images"] >= 10 and loc["pointing_game"] >= 0.85
    assert loc["mass_in_lesions"] > 2 * loc["lesion_area"]
    assert g["randomisation"]["passed"]


def test_empty_archive_exits_2_with_download_instructions(tmp_path, capsys):
    (tmp_path / "archive").mkdir()
    assert main.main(["--data", str(tmp_path / "archive"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "Kaggle" in err and "chest_xray/train/NORMAL" in err and "--demo" in err
    assert not (tmp_path / "r").exists()  # no empty run folder left behind


def test_command_line_without_archive_has_no_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no archive/ here: main.main must answer, not raise
    assert main.main(["--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "Download" in err


@pytest.mark.parametrize("command", ["train", "evaluate", "predict"])
def test_help_documents_every_flag(capsys, command):
    from app import settings
    parser = {"train": settings.build_parser, "evaluate": settings.build_evaluate_parser,
              "predict": settings.build_predict_parser}[command]()
    with pytest.raises(SystemExit):
        main.main(([] if command == "train" else [command]) + ["--help"])
    text = capsys.readouterr().out
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) > 5
    for action in flags:
        assert action.help and len(action.help) > 15, f"{action.option_strings[0]} has no help text"
        assert action.option_strings[-1] in text, action.option_strings[-1]
    if command == "train":  # every setting saved in config.json is a flag, and every flag a setting
        saved = {f.name for f in dataclasses.fields(Settings)} - {"given", "command"}
        assert saved == {a.dest for a in flags}
        assert "default: 0.6" in text and "evaluate" in text and "torchrun" in text


@pytest.mark.parametrize("argv, message", [
    (["--data", "MISSING"], "No chest X-rays found"),
    (["--out", "{existing}"], "already exists"),
    (["--out", "{a_file}/run"], "cannot write"),
    (["--data", "{one_class}"], "only NORMAL images"),
    (["--data", "{few}"], "too few patients"),
])
def test_unusable_input_gives_one_clear_sentence(tmp_path, capsys, argv, message):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "x").write_text("x")
    a_file = tmp_path / "a_file"  # a folder cannot be made under a file, even by root
    a_file.write_text("x")
    for i in range(4):
        write_image(tmp_path / "one" / "NORMAL" / f"IM-{i:04d}-0001.png", i)
        write_image(tmp_path / "few" / "NORMAL" / f"IM-{i:04d}-0001.png", 10 + i)
        write_image(tmp_path / "few" / "PNEUMONIA" / f"person{i}_virus_1.png", 20 + i)
    fill = {"existing": existing, "a_file": a_file, "one_class": tmp_path / "one", "few": tmp_path / "few"}
    argv = [a.format(**fill) for a in argv]
    full = argv + (["--out", str(tmp_path / "run")] if "--out" not in argv else []) + ["--cache-dir",
                                                                                       str(tmp_path / "c")]
    assert main.main(full) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") <= 8


def test_evaluate_on_the_runs_own_test_split_reproduces_metrics(demo_run, tmp_path):
    out = tmp_path / "ev"
    assert main.main(["evaluate", "--checkpoint", str(demo_run / "best.pt"), "--data", str(demo_run / "split.csv"),
                      "--out", str(out), "--quiet", "--no-cache"]) == 0
    original = json.loads((demo_run / "metrics.json").read_text())
    again = json.loads((out / "metrics.json").read_text())
    (name, block), = again["sets"].items()
    assert name == "test split" and block["kind"] == "evaluated"
    assert block["rates"] == original["sets"]["test split"]["rates"]
    assert block["gradcam"]["border"] == original["sets"]["test split"]["gradcam"]["border"]
    assert (out / "report.html").is_file() and (out / "roc.png").is_file()


PREDICTION_COLUMNS = ["path", "patient", "label", "probability", "predicted", "warnings", "error", "flagged",
                      "ood_score"]


def _predictions(path) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == PREDICTION_COLUMNS
        return list(reader)


def test_external_block_equals_evaluate_on_the_same_folder(demo_run, tmp_path):
    m = json.loads((demo_run / "metrics.json").read_text())
    (name, block), = ((n, b) for n, b in m["sets"].items() if b["kind"] == "external")
    test = m["sets"]["test split"]
    assert set(block) == set(test) and block["rates"]["threshold"] == test["rates"]["threshold"]
    assert block["folder"] == f"external/{name}"
    folder = json.loads((demo_run / "config.json").read_text())["external"][0]
    assert name == Path(folder).name
    assert main.main(["evaluate", "--checkpoint", str(demo_run / "best.pt"), "--data", folder,
                      "--out", str(tmp_path / "ev"), "--quiet", "--no-cache"]) == 0
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["sets"][name]["rates"] == block["rates"] and again["sets"][name]["ood"] == block["ood"]
    own = _predictions(demo_run / block["folder"] / "predictions.csv")
    assert _predictions(tmp_path / "ev" / "predictions.csv") == own
    assert (demo_run / "roc_all.png").is_file() and (demo_run / "external" / name / "gradcam_grid.png").is_file()
    page = (demo_run / "report.html").read_text()
    assert "Test split and external sets" in page and f"External: {name}" in page


def test_prediction_csvs_list_every_scored_image_at_the_validation_threshold(demo_run):
    m = json.loads((demo_run / "metrics.json").read_text())
    test = _predictions(demo_run / "predictions.csv")
    split = list(csv.DictReader(open(demo_run / "split.csv")))
    assert sorted(r["path"] for r in test) == sorted(r["path"] for r in split if r["split"] == "test")
    rates = m["sets"]["test split"]["rates"]
    threshold = rates["threshold"]
    for r in test:
        assert r["predicted"] == ("PNEUMONIA" if float(r["probability"]) >= threshold else "NORMAL")
    tp = sum(r["label"] == r["predicted"] == "PNEUMONIA" for r in test)
    assert tp == rates["tp"] and len(test) == rates["images"]
    val = _predictions(demo_run / "predictions_val.csv")
    assert sorted(r["path"] for r in val) == sorted(r["path"] for r in split if r["split"] == "val")
    ys = np.array([r["label"] == "PNEUMONIA" for r in val])
    ps = np.array([float(r["probability"]) for r in val])
    policy = m["validation"]["threshold_policy"]
    assert evaluate.choose_threshold(ys, ps, policy) == pytest.approx(threshold, abs=1e-6)  # chosen there, nowhere else


def test_evaluate_external_folder_and_checkpoint_errors(demo_run, tmp_path, capsys):
    folder = demo_run / "demo_data" / "images"
    assert main.main(["evaluate", "--checkpoint", str(demo_run / "best.pt"), "--data", str(folder),
                      "--out", str(tmp_path / "ext"), "--quiet", "--no-cache"]) == 0
    external = json.loads((tmp_path / "ext" / "metrics.json").read_text())
    assert external["sets"]["images"]["rates"]["images"] == 240 and external["data"]["splits"]["test"]["patients"] == 80
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main.main(["evaluate", "--checkpoint", str(bad), "--data", str(folder)]) == 2
    assert "cannot be loaded safely" in capsys.readouterr().err


def test_predict_single_image_folder_and_bad_files(demo_run, tmp_path, capsys):
    image = next((demo_run / "demo_data" / "images" / "PNEUMONIA").glob("*.png"))
    assert main.main(["predict", str(image), "--checkpoint", str(demo_run / "best.pt"), "--out",
                      str(tmp_path / "one")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(image.name))
    assert row.split()[2] == "PNEUMONIA" and 0.5 < float(row.split()[1]) <= 1 and "Grad-CAM overlays" in out
    assert len(list((tmp_path / "one").glob("*_cam.png"))) == 1
    folder = tmp_path / "mixed"
    folder.mkdir()
    for f in sorted((demo_run / "demo_data" / "images" / "NORMAL").glob("*.png"))[:3]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "notes.jpeg").write_text("not an image")
    (folder / "Thumbs.db").write_bytes(b"\0" * 64)  # OS metadata: skipped by the same rule as in training
    (folder / "labels.txt").write_text("x")
    assert main.main(["predict", str(folder), "--checkpoint", str(demo_run / "best.pt"), "--out",
                      str(tmp_path / "many"), "--cam"]) == 0
    rows = _predictions(tmp_path / "many" / "predictions.csv")  # the schema of training's and evaluate's CSVs
    assert len(rows) == 6
    why = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert "unreadable image" in why["notes.jpeg"] and why["Thumbs.db"] == "hidden or OS metadata"
    assert why["labels.txt"] == "not an image file extension" and len(why) == 3
    bad = [r for r in rows if r["path"].endswith("notes.jpeg")][0]
    assert bad["probability"] == "" and "unreadable image" in bad["error"]
    assert all(r["label"] == "" for r in rows)  # predict knows no truth: the column stays empty, never the model's call
    assert all(r["predicted"] in ("NORMAL",
                                  "PNEUMONIA") and r["patient"].startswith("IM-") for r in rows if not r["error"])
    assert all(r["predicted"] == r["patient"] == "" for r in rows if r["error"])
    out = capsys.readouterr().out
    assert "6 files:" in out and "3 not scored" in out and len(list((tmp_path / "many").glob("*_cam.png"))) == 3
    for name, why in (("notes.jpeg", "unreadable image"), ("Thumbs.db", "hidden or OS metadata")):
        assert why in next(line for line in out.splitlines() if line.startswith(name))  # the reason beside the file
    page = (tmp_path / "many" / "report.html").read_text()
    assert page.count('class="card"') == 6 and page.count("data:image/png;base64,") >= 6  # thumbnail and overlay


def test_predict_on_many_files_summarises_and_shows_a_bounded_gallery(demo_run, tmp_path, capsys):
    from app import report
    films = sorted((demo_run / "demo_data" / "images").rglob("*.png"))[::2][:60]
    assert main.main(["predict", *map(str, films), "--checkpoint", str(demo_run / "best.pt"), "--out",
                      str(tmp_path / "p"), "--quiet"]) == 0
    out = capsys.readouterr().out
    rows = _predictions(tmp_path / "p" / "predictions.csv")
    calls = [r["predicted"] for r in rows]
    assert f"60 files: {calls.count('NORMAL')} NORMAL, {calls.count('PNEUMONIA')} PNEUMONIA" in out
    assert "WARNING: this checkpoint was trained on synthetic phantoms" in out  # a demo checkpoint says so
    listed = [line.split()[0] for line in out.splitlines() if line.endswith((".png", "NORMAL", "PNEUMONIA"))]
    assert "nearest the threshold:" in out and 0 < len(listed) <= 15 < 60  # the few worth a look, not every file
    p = np.array([float(r["probability"]) for r in rows])
    counts = next(line for line in out.splitlines() if line.startswith("60 files:"))
    threshold = float(counts.split("threshold ")[1])
    nearest = Path(rows[int(np.argmin(np.abs(np.log(p) - np.log(threshold))))]["path"]).name
    assert out.split("nearest the threshold:")[1].splitlines()[2].startswith(nearest)
    page = (tmp_path / "p" / "report.html").read_text()
    assert "Nearest the threshold" in page and "are in predictions.csv only" in page
    assert 0 < page.count('class="card"') <= 4 * report.EACH and "synthetic phantoms" in page
    assert all("synthetic phantoms" in r["warnings"] for r in rows)  # and beside every call in the CSV


def test_predict_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main.main(["predict", str(tmp_path)]) == 2
    assert "no checkpoint given" in capsys.readouterr().err


def test_predict_matches_training_preprocessing_on_real_files(demo_run, tmp_path):
    folder = shared("chest_xray_fullres_train") / "NORMAL"
    assert main.main(["predict", str(folder), "--checkpoint", str(demo_run / "best.pt"), "--out",
                      str(tmp_path / "p")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p" / "predictions.csv")))
    assert len(rows) == 60 and all(r["error"] == "" for r in rows)
    # the training path: decode as for training (cache format), then the scoring used on test splits
    from lib import cache
    from lib import images
    import torch
    (model,), prep = infer.load_models(runs.load_checkpoint(demo_run / "best.pt"), torch.device("cpu"))
    files = [r["path"] for r in rows]
    decoded, _ = cache.load_images(files, images.cache_size(prep.image_size), cache.ImageCache(None, 0), show=False)
    expected, _ = infer.Predictor([model], prep, torch.device("cpu")).predict(torch.from_numpy(decoded).unsqueeze(1))
    assert np.allclose([float(r["probability"]) for r in rows], expected, atol=2e-6)


def test_checkpoint_of_another_model_config_is_refused(demo_run, tmp_path, capsys):
    import torch
    ckpt = runs.load_checkpoint(demo_run / "best.pt")
    ckpt["model_config"]["widths"] = [8, 8, 8]  # weights no longer fit the model it describes
    runs.save_checkpoint(tmp_path / "other.pt", ckpt)
    image = next((demo_run / "demo_data" / "images" / "NORMAL").glob("*.png"))
    assert main.main(["predict", str(image), "--checkpoint", str(tmp_path / "other.pt"), "--out",
                      str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "Traceback" not in err
    torch.save({**ckpt, "format": 0}, tmp_path / "old.pt")
    assert main.main(["predict", str(image), "--checkpoint", str(tmp_path / "old.pt")]) == 2
    assert "not a checkpoint of this project's format" in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (["--epochs", "0"], "--epochs"), (["--lr", "-1"], "--lr"), (["--batch-size", "0"], "--batch-size"),
    (["--threshold", "banana"], "--threshold"), (["--threshold", "sens=1.5"], "--threshold"),
    (["--widths", "0", "4", "4"], "--widths"), (["--pos-weight", "-1"], "--pos-weight"),
    (["--patience", "-1"], "--patience"), (["--lr", "nan"], "--lr"), (["--image-size", "8"], "--image-size"),
    (["--contrast", "1"], "--contrast"), (["--label-smoothing", "1"], "--label-smoothing"),
    (["--zoom", "-0.1"], "--zoom"), (["predict", "x", "--batch-size", "0"], "--batch-size"),
    (["evaluate", "--checkpoint", "x", "--data", "y", "--seed", "one"], "--seed"),
])
def test_each_bad_flag_value_is_refused_with_one_sentence(argv, flag, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main.main(argv + ["--out", str(tmp_path / "r")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {flag}: expected" in err and "--help" in err
    assert not (tmp_path / "r").exists()


def test_resume_applies_runtime_flags_and_refuses_the_others(demo_run, tmp_path, capsys):
    run = tmp_path / "interrupted"
    run.mkdir()
    (run / "config.json").write_text((demo_run / "config.json").read_text())
    (run / "INCOMPLETE").write_text("")
    (run / "last.pt").write_bytes((demo_run / "last.pt").read_bytes())  # a training state; refused before it matters
    assert main.main(["--resume", str(run), "--epochs", "30", "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "--epochs, --lr cannot change now" in err and err.count("\n") == 1
    args, _, _ = commands.resolve_run(Settings.parse(["--resume", str(run), "--device", "cpu", "--quiet"]), Context())
    saved = json.loads((run / "config.json").read_text())
    assert args.device == "cpu" and args.quiet and args.epochs == saved["epochs"] and args.demo is True


def test_model_card_figures_all_come_from_metrics_json(demo_run):
    card = (demo_run / "MODEL_CARD.md").read_text()
    m = json.loads((demo_run / "metrics.json").read_text())
    # every metric row of every scored set, value and interval, as metrics.json has it
    sets = {"## Performance on the test split" if b["kind"] == "test" else f"## Performance on the external set `{n}`":
            b["rates"] for n, b in m["sets"].items()}
    for heading, metrics in sets.items():
        section = card.split(heading)[1].split("\n## ")[0]
        for f in evaluate.FIGURES:  # every figure of the one list, with its interval where it has one
            ci = metrics["ci95"].get(f.key)
            interval = f"{ci[0]:.3f} - {ci[1]:.3f}" if ci else ""
            assert f"| {f.label} | {metrics[f.key]:.3f} | {interval} |" in section, (heading, f.key)
        assert f"{metrics['images']} images of {metrics['patients']} patients" in section
    assert not stray_figures(card, m)
    threshold = m["sets"]["test split"]["rates"]["threshold"]
    assert f"{threshold:.4f}" in card and m["validation"]["threshold_policy"] in card
    for split, a in m["data"]["splits"].items():
        assert f"| {split} | {a['images']} | {a['patients']} | {a['normal']} | {a['pneumonia']} |" in card
    assert "SYNTHETIC" in card and "python main.py --demo" in card and "not intended" in card.lower()
    assert "Network: the custom CNN" in card and "`--arch cnn`" in card
    assert 'href="MODEL_CARD.md"' in (demo_run / "report.html").read_text()


def test_a_run_started_with_an_experiment_that_left_is_refused_on_resume_naming_it():
    from app.settings import Settings
    now = Settings.parse(["--resume", "runs/old"])
    saved = Settings.parse([]).config()
    assert now.resumed({**saved, "debias": "none", "framing": 0.0}).epochs == saved["epochs"]  # off: it resumes
    for gone, shown in (({"debias": "poe"}, "--debias poe"), ({"layout_swap": 0.5}, "--layout-swap 0.5"),
                        ({"intensity": "equalise"}, "--intensity equalise")):
        with pytest.raises(UsageError, match=f"was started with {shown}, an experiment that left the product"):
            now.resumed({**saved, **gone})


def test_optimiser_constants_are_settings_that_reach_sgd_and_onecycle_and_survive_resume(tmp_path):
    import torch
    import train
    from model import PneumoniaCNN
    from lib.transforms import Preprocess
    s = Settings.parse(["--momentum", "0.8", "0.9", "--weight-decay", "0.001", "--warmup", "0.5", "--epochs", "2",
                        "--batch-size", "4",
                        "--quiet"])
    cfg = train.TrainConfig.of(s, 0, torch.device("cpu"), Context(), None)
    g = torch.Generator().manual_seed(0)
    images, labels = (torch.rand(16, 1, 24, 24, generator=g) * 255).to(torch.uint8), (torch.arange(16) % 2).float()
    train.fit(PneumoniaCNN((4, 4, 4), stem=4), (images, labels), (images, labels), Preprocess(20), cfg,
              run_dir=tmp_path)
    last = runs.load_checkpoint(tmp_path / "last.pt")
    group = last["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == 0.001 and group["nesterov"]
    assert (group["base_momentum"], group["max_momentum"]) == (0.8, 0.9) and 0.8 <= group["momentum"] <= 0.9
    lrs = [h["lr"] for h in train_history(tmp_path)]
    assert lrs[0] > 0.8 * s.lr  # the warm-up ends half way, so epoch 1 of 2 ends near the peak (0.2: near half of it)
    assert s.config()["momentum"] == [0.8, 0.9] and s.config()["warmup"] == 0.5
    restored = Settings.parse(["--resume", "x"]).resumed(s.config())
    assert (restored.momentum, restored.weight_decay, restored.warmup) == ((0.8, 0.9), 0.001, 0.5)
    older = {k: v for k, v in s.config().items() if k not in ("momentum", "weight_decay", "warmup")}
    assert Settings.parse(["--resume", "x"]).resumed(older).momentum == (0.85, 0.95)  # an older run: the old constants


def train_history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items() if k in ("epoch", "loss", "val_loss", "val_auc", "lr")}
                for row in csv.DictReader(f)]


def test_a_log_redirected_to_a_file_gets_lines_not_progress_frames(tmp_path, capsys):
    assert main.main(["--demo", "--demo-patients", "12", "--epochs", "3", "--image-size", "64", "--widths", "8", "8",
                      "8", "--out", str(tmp_path / "r")]) == 0
    captured = capsys.readouterr()  # streams that are not a terminal, as a file or a pipe is
    log = captured.out + captured.err
    assert "\r" not in log
    for epoch in (1, 2, 3):
        assert f"epoch {epoch}/3: loss " in log and "val AUC" in log
    for step in ("decoding images (once): ", "training: ", "scoring: ", "Grad-CAM maps: "):
        line = next(line for line in log.splitlines() if line.startswith(step))
        assert " in " in line and "/s)" in line, line  # count, seconds and rate


@pytest.mark.parametrize("argv", [["--help"], ["evaluate", "--help"], ["predict", "--help"], ["calibrate", "--help"],
                                  ["export", "--help"], ["--seed", "-5"], ["--arch", "vit"], ["prdict", "x.png"],
                                  ["evaluate", "--data", "x"]])
def test_help_and_every_refusal_answer_before_torch_is_imported(argv):
    code = ("import runpy, sys\nsys.argv = ['main.py', *sys.argv[1:]]\ntry:\n    runpy.run_path('main.py', "
            "run_name='__main__')\nexcept SystemExit as e:\n    status = e.code\nprint('torch loaded:', 'torch' in "
            "sys.modules, 'status:', status)")
    done = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    status = 0 if argv[-1] == "--help" else 2
    assert done.stdout.splitlines()[-1] == f"torch loaded: False status: {status}", done.stderr
    if argv[-1] != "--help":
        assert done.stderr.count("\n") == 1 and "error:" in done.stderr  # one sentence
