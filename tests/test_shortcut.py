"""The shortcut audit: a layout probe fitted on the training split only, its figures by hand, the groups."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from app import report
from lib import runs
from lib import shortcut
from lib.labels import SERIES_PATTERN
from test_dicom import write_dicom


def test_the_probe_is_fitted_on_the_training_split_only(tmp_path, monkeypatch):
    seen = {}
    fit = shortcut.fit_probe

    def recording(images, labels, patients):
        seen.update(patients=list(patients), images=len(images))
        seen["probe"] = fit(images, labels, patients)
        return seen["probe"]

    monkeypatch.setattr(shortcut, "fit_probe", recording)
    out = tmp_path / "run"
    assert main.main(["--demo", "--out", str(out), "--epochs", "1", "--demo-patients", "12", "--image-size", "48",
                      "--quiet", "--precision", "fp32"]) == 0
    split = list(csv.DictReader(open(out / "split.csv")))
    by_split = {name: {r["patient"] for r in split if r["split"] == name} for name in ("train", "val", "test")}
    assert set(seen["patients"]) == by_split["train"]
    assert not set(seen["patients"]) & (by_split["val"] | by_split["test"])
    assert seen["images"] == sum(r["split"] == "train" for r in split)
    stored = runs.read_checkpoint(out / "best.pt")["probe"]
    assert torch.equal(stored["coef"], torch.from_numpy(seen["probe"].coef)) and stored["side"] == shortcut.SIDE
    block = json.loads((out / "metrics.json").read_text())["sets"]["test split"]["shortcut"]
    assert block["probe"] and 0 <= block["probe_auc"] <= 1 and set(block["groups"]) == {"series"}
    assert block["aspect"]["films"] == sum(r["split"] == "test" for r in split)  # every test film's header read


def test_the_audit_matches_a_hand_computation():
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    model = np.array([0.9, 0.8, 0.2, 0.1, 0.7, 0.9, 0.6, 0.3])  # called pneumonia at 0.5: 0, 1, 4, 5, 6
    layout = np.array([0.9, 0.6, 0.7, 0.2, 0.1, 0.8, 0.4, 0.9])  # the probe calls pneumonia: 0, 1, 2, 5, 7
    groups = {"series": ["IM", "IM", "NORMAL2-IM", "NORMAL2-IM", "NORMAL2-IM", "person", "person", "other"]}
    a = shortcut.audit(y, model, 0.5, layout, groups)
    # probe AUC: 15 (normal, pneumonia) pairs; the pneumonia ranks higher in 10, one tie (0.9, 0.9) counts half
    assert a["probe_auc"] == pytest.approx(10.5 / 15)
    # Spearman among normals: model ranks (5, 4, 2, 1, 3) against probe ranks (5, 3, 4, 2, 1)
    assert a["spearman_negatives"] == pytest.approx(1 - 6 * (0 + 1 + 4 + 1 + 4) / (5 * 24))
    # normals the probe calls pneumonia: 0, 1, 2, of which the model calls 2 normal -> 1 of 3; the rest: 3, 4 -> 1 of 2
    assert (a["specificity_probe_positive"]["k"], a["specificity_probe_positive"]["n"]) == (1, 3)
    assert (a["specificity_probe_negative"]["k"], a["specificity_probe_negative"]["n"]) == (1, 2)
    lo, hi = a["specificity_probe_positive"]["ci95"]
    assert lo < 1 / 3 < hi and a["specificity_probe_positive"]["rate"] == pytest.approx(1 / 3)
    series = a["groups"]["series"]
    assert series["IM"]["specificity"]["k"] == 0 and series["IM"]["specificity"]["n"] == 2
    assert (series["NORMAL2-IM"]["specificity"]["k"], series["NORMAL2-IM"]["specificity"]["n"]) == (2, 3)
    assert (series["person"]["sensitivity"]["k"], series["person"]["sensitivity"]["n"]) == (2, 2)
    assert series["other"]["sensitivity"]["k"] == 0 and series["other"]["specificity"]["n"] == 0
    without = shortcut.audit(y, model, 0.5, None, groups)
    assert without == {"probe": False, "groups": a["groups"]}


def test_the_aspect_audit_matches_a_hand_computation_and_says_when_it_cannot_tell(tmp_path):
    sizes = [(120, 100), (110, 100), (130, 100), (150, 100), (140, 100)]  # width x height
    paths = []
    for i, size in enumerate(sizes):
        Image.new("L", size, 90).save(tmp_path / f"f{i}.png")
        paths.append(str(tmp_path / f"f{i}.png"))
    (tmp_path / "bad.png").write_bytes(b"not an image")  # no readable size: left out of the figures
    dicom = write_dicom(tmp_path / "scan.dcm", np.zeros((50, 100), np.uint8))  # 100 columns, 50 rows
    ratios = shortcut.aspect_ratios([*paths, str(tmp_path / "bad.png"), str(dicom)])
    assert ratios[:5].tolist() == [1.2, 1.1, 1.3, 1.5, 1.4] and np.isnan(ratios[5]) and ratios[6] == 2.0
    y = np.array([0, 0, 0, 1, 1, 0, 1])
    a = shortcut.aspect_audit(y, ratios)
    # the known films: normals 1.2, 1.1, 1.3 against pneumonias 1.5, 1.4, 2.0, every pneumonia wider
    assert a == {"films": 6, "median_normal": 1.2, "median_pneumonia": 1.5, "auc": 1.0, "same_for_all": False}
    assert shortcut.aspect_audit(np.array([0, 1, 1, 0]), np.array([1.4, 1.2, 1.3, 1.1]))["auc"] == pytest.approx(0.5)
    squashed = shortcut.aspect_audit(np.array([0, 1, 1]), np.ones(3))  # every film re-encoded to a square
    assert squashed["auc"] is None and squashed["same_for_all"]
    assert "cannot show whether it differs by class" in report.aspect_text(squashed)
    assert "AUC 1.000: median 1.200 among the normals and 1.500" in report.aspect_text(a)
    block = shortcut.audit(y, np.full(7, 0.5), 0.5, None, {"series": ["x"] * 7}, ratios=ratios)
    assert block["aspect"] == a and report.aspect_text(a) in report.shortcut_text(block)


def test_wilson_intervals_match_the_formula():
    w = shortcut.wilson(8, 10)
    assert w["rate"] == 0.8 and w["ci95"] == pytest.approx([0.4902, 0.9433], abs=1e-4)  # Wilson 1927, z = 1.96
    assert shortcut.wilson(0, 0)["rate"] is None


def test_groups_come_from_the_file_name_pattern_and_from_dicom_headers(tmp_path):
    pixels = (np.arange(64 * 64) % 251).reshape(64, 64).astype(np.uint8)
    dicom = write_dicom(tmp_path / "scan1.dcm", pixels, Manufacturer="ACME", StationName="ROOM2", PatientSex="F",
                        PatientAge="004Y")
    bare = write_dicom(tmp_path / "scan2.dcm", pixels)  # no manufacturer, station, sex or age
    paths = ["/a/NORMAL2-IM-0007-0001.jpeg", "/a/IM-0001-0001.jpeg", "/a/person10_virus_35.jpeg", "/a/other.png",
             str(dicom), str(bare)]
    groups = shortcut.groups_of(paths, SERIES_PATTERN)
    assert groups["series"] == ["NORMAL2-IM", "IM", "person", "other", "other", "other"]
    assert groups["manufacturer"] == ["not DICOM"] * 4 + ["ACME", "unknown"]
    assert groups["station"][4:] == ["ROOM2", "unknown"] and groups["view"][4:] == ["PA", "PA"]
    assert groups["sex"][4:] == ["F", "unknown"] and groups["age"][4:] == ["1-5", "unknown"]
    assert set(shortcut.groups_of(paths[:4], r"^(\w+?)\d")) == {"series"}  # no DICOM: no header groupings
    assert shortcut.groups_of(paths[:2], r"^([A-Z]+)")["series"] == ["NORMAL", "IM"]


def test_a_groups_pattern_without_a_group_is_refused_in_one_sentence(capsys):
    evaluate = ["evaluate", "--checkpoint", "x", "--data", "y"]
    for argv, message in ((["--groups", "IM-.*"], "argument --groups: needs a (group)"),
                          ([*evaluate, "--groups", "("], "not a regular expression")):
        with pytest.raises(SystemExit) as stop:
            main.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and err.count("\n") == 1


def test_a_checkpoint_without_a_probe_still_scores_and_says_so(demo_run, tmp_path, capsys):
    ckpt = runs.load_checkpoint(demo_run / "best.pt")
    assert "probe" in ckpt
    del ckpt["probe"]  # as every best.pt made before the shortcut audit
    runs.save_checkpoint(tmp_path / "old.pt", ckpt)
    assert main.main(["evaluate", "--checkpoint", str(tmp_path / "old.pt"), "--data", str(demo_run / "split.csv"),
                      "--out", str(tmp_path / "ev"), "--quiet", "--no-cache", "--groups", r"^(person\d+)"]) == 0
    block = json.loads((tmp_path / "ev" / "metrics.json").read_text())["sets"]["test split"]
    assert block["shortcut"]["probe"] is False and "probe_auc" not in block["shortcut"]
    assert all(g.startswith("person") or g == "other" for g in block["shortcut"]["groups"]["series"])
    assert "this checkpoint has no layout probe" in capsys.readouterr().out
    assert "has no layout probe" in (tmp_path / "ev" / "report.html").read_text()
    own = json.loads((demo_run / "metrics.json").read_text())["sets"]["test split"]
    assert block["rates"] == own["rates"]  # everything else scores as before


def test_the_operating_point_benchmark_sets_the_validation_threshold_beside_the_hindsight_one(tmp_path, capsys,
                                                                                            monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import operating_point
    run = tmp_path / "run"
    (run / "external" / "site").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"validation": {"threshold": 0.5}}))
    # 4 normals, 4 pneumonias; at 0.5: pneumonias 0.9, 0.8, 0.6 called (3 of 4), normals 0.7, 0.55 called (2 of 4)
    scores = [("NORMAL", 0.1), ("NORMAL", 0.7), ("NORMAL", 0.55), ("NORMAL", 0.3),
              ("PNEUMONIA", 0.9), ("PNEUMONIA", 0.8), ("PNEUMONIA", 0.6), ("PNEUMONIA", 0.2), ("PNEUMONIA", "")]
    with open(run / "external" / "site" / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "probability"])
        w.writerows([(f"f{i}.png", label, p) for i, (label, p) in enumerate(scores)])  # the unscored row is left out
    y, p = operating_point.read_predictions(run / "external" / "site" / "predictions.csv")
    assert len(y) == 8
    # sensitivity >= 0.75 keeps 3 of 4: threshold 0.6, so normals 0.1, 0.55, 0.3 are below it -> 3 of 4
    assert operating_point.hindsight_specificity(y, p, 0.75) == 0.75
    assert operating_point.hindsight_specificity(y, p, 1.0) == 0.25  # keeping 0.2 calls every normal but 0.1
    assert operating_point.run_line(run, "site", 0.75) == (0.5, 0.75, 0.5, 0.75)
    argv = ["operating_point.py", str(run), str(run), "--set", "site", "--sensitivity", "0.75"]
    monkeypatch.setattr("sys.argv", argv)
    operating_point.main()
    printed = capsys.readouterr().out
    assert "specificity 0.500; best specificity at sensitivity >= 0.75 in hindsight 0.750" in printed
    assert "mean over 2 runs: specificity at the validation threshold 0.500±0.000, in hindsight 0.750" in printed
    monkeypatch.setattr("sys.argv", ["operating_point.py", str(run), "--set", "missing"])
    with pytest.raises(SystemExit, match="cannot read its threshold or the predictions of 'missing'"):
        operating_point.main()
