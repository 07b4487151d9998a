"""--task cause: normal, bacterial or viral from the Kaggle file names; metrics, Grad-CAM targets, predict."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import data
import evaluate
import gradcam
import main
from conftest import stray_figures, write_image


def test_cause_comes_from_the_file_name_and_unknown_causes_are_left_out(tiny_archive):
    assert [data.cause_of(n, label) for n, label in [("IM-0001-0001.jpeg", 0), ("person3_bacteria_9.jpeg", 1),
                                                     ("person4_virus_10.jpeg", 1), ("person5_7.jpeg", 1)]] == [0, 1, 2,
                                                                                                               -1]
    odd = write_image(tiny_archive / "chest_xray" / "train" / "PNEUMONIA" / "person99_xray_1.jpeg", seed=999)
    ds = data.load_dataset(str(tiny_archive), 32, "patient", 0, None, workers=1, progress=False, task="cause")
    assert (str(odd), "cause unknown: a PNEUMONIA file name with neither _bacteria_ nor _virus_") in ds.found.skipped
    assert set(ds.causes.tolist()) == {0, 1, 2}
    for name in data.SPLITS:  # stratified by the three classes, still by patient
        assert set(ds.causes[ds.split == name].tolist()) == {0, 1, 2}, name
    assert data.audit(ds)["patients_in_several_splits"] == 0
    # the pneumonia task keeps the file: it is a pneumonia whatever its cause
    plain = data.load_dataset(str(tiny_archive), 32, "patient", 0, None, workers=1, progress=False)
    assert str(odd) in plain.paths


def test_grad_cam_targets_are_log_odds_with_opposites():
    logits = torch.tensor([[0.3, 1.2, -0.4], [2.0, -1.0, 0.5]])
    p = torch.softmax(logits, 1)
    expected = torch.log((p[:, 1] + p[:, 2]) / p[:, 0])
    assert torch.allclose(gradcam.target_score(logits, "pneumonia"), expected, atol=1e-6)
    assert torch.allclose(gradcam.target_score(logits, "normal"), -expected)
    assert torch.allclose(gradcam.target_score(logits, "bacterial"), -gradcam.target_score(logits, "viral"))
    assert torch.allclose(gradcam.target_score(logits, "bacterial"), torch.log(p[:, 1] / p[:, 2]), atol=1e-6)
    with pytest.raises(ValueError, match="three-class"):
        gradcam.target_score(torch.tensor([0.5]), "viral")


def test_cause_block_matches_scikit_learn():
    rng = np.random.default_rng(0)
    causes = rng.integers(0, 3, 300)
    causes[:5] = -1  # unknown causes are left out
    logits = rng.normal(size=(300, 3)) + 1.5 * np.eye(3)[np.maximum(causes, 0)]
    classes = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    patients = [f"p{i // 2}" for i in range(300)]
    c = evaluate.score_cause(causes, classes, patients, 0.5, n_resamples=200)
    known = causes >= 0
    for k, name in enumerate(("normal", "bacterial", "viral")):
        auc = roc_auc_score(causes[known] == k, classes[known, k])
        assert c["one_vs_rest_auc"][name]["auc"] == pytest.approx(auc)
        lo, hi = c["one_vs_rest_auc"][name]["ci95"]
        assert lo <= auc <= hi
    assert c["macro_auc"]["auc"] == pytest.approx(roc_auc_score(causes[known], classes[known], multi_class="ovr"))
    assert np.array(c["confusion"]).sum() == known.sum() and np.trace(c["confusion"]) > known.sum() / 2
    pn = known & (causes > 0)
    share = classes[pn, 1] / (classes[pn, 1] + classes[pn, 2])
    assert c["bacterial_vs_viral"]["auc"] == pytest.approx(roc_auc_score(causes[pn] == 1, share))
    assert c["bacterial_vs_viral"]["images"] == pn.sum()


def test_cause_run_writes_the_cause_block_plots_and_class_columns(cause_run):
    m = json.loads((cause_run / "metrics.json").read_text())
    test = m["sets"]["test split"]
    assert set(test["rates"]) >= set(evaluate.METRICS)  # the binary block stays, from P(bacterial) + P(viral)
    assert set(test["cause"]) == {"classes", "one_vs_rest_auc", "macro_auc", "confusion", "bacterial_vs_viral"}
    assert set(test["cause_gradcam"]) == {"bacterial", "viral"}
    for name in ("confusion_cause.png", "roc_cause.png", "roc_bacterial_viral.png", "gradcam_cause_pairs.png"):
        assert (cause_run / name).is_file(), name
    rows = list(csv.DictReader(open(cause_run / "predictions.csv")))
    for r in rows:
        p = [float(r[k]) for k in evaluate.CLASS_COLUMNS]
        assert sum(p) == pytest.approx(1, abs=1e-5) and float(r["probability"]) == pytest.approx(p[1] + p[2], abs=1e-5)
    page = (cause_run / "report.html").read_text()
    card = (cause_run / "MODEL_CARD.md").read_text()
    bvv = test["cause"]["bacterial_vs_viral"]
    assert "Bacterial or viral" in page and "Bacterial vs viral" in card and not stray_figures(card, m)
    assert f"| auc | {bvv['auc']:.3f} | {bvv['ci95']['auc'][0]:.3f} - {bvv['ci95']['auc'][1]:.3f} |" in card


def test_evaluate_and_predict_read_the_task_from_the_checkpoint(cause_run, tmp_path):
    assert main.main(["evaluate", "--checkpoint", str(cause_run / "best.pt"), "--data", str(cause_run / "split.csv"),
                      "--out", str(tmp_path / "ev"), "--quiet", "--no-cache"]) == 0
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    own = json.loads((cause_run / "metrics.json").read_text())["sets"]["test split"]["cause"]
    assert again["sets"]["test split"]["cause"] == own
    folder = tmp_path / "films"
    folder.mkdir()
    for image in sorted((cause_run / "demo_data" / "images" / "PNEUMONIA").glob("*.png"))[:3]:
        shutil.copy(image, folder)
    (folder / "notes.txt").write_text("not a film")  # skipped by the folder rules: a row with empty class columns
    assert main.main(["predict", str(folder), "--checkpoint", str(cause_run / "best.pt"), "--out",
                      str(tmp_path / "pr"), "--cam-target", "viral", "--cam"]) == 0
    lines = list(csv.reader(open(tmp_path / "pr" / "predictions.csv")))
    assert {len(line) for line in lines} == {len(lines[0])}  # every row as wide as the header
    rows = list(csv.DictReader(open(tmp_path / "pr" / "predictions.csv")))
    assert len(rows) == 4 and all(r["p_viral"] and r["p_bacterial"] for r in rows[:3])
    assert rows[3]["error"] and rows[3]["p_viral"] == rows[3]["probability"] == ""
    assert len(list((tmp_path / "pr").glob("*_cam.png"))) == 3


def test_a_cause_target_on_a_pneumonia_model_is_refused(demo_run, tmp_path, capsys):
    image = next((demo_run / "demo_data" / "images" / "NORMAL").glob("*.png"))
    assert main.main(["predict", str(image), "--checkpoint", str(demo_run / "best.pt"), "--cam-target", "bacterial",
                      "--out", str(tmp_path / "p")]) == 2
    assert "needs a model trained with --task cause" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main.main(["--demo", "--cam-target", "viral", "--out", str(tmp_path / "r")])
    assert stop.value.code == 2 and "viral needs --task cause" in capsys.readouterr().err
