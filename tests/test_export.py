"""ONNX export: the graph scores, explains and checks like predict; an ensemble and a three-class model export as
one graph; the runtime without PyTorch decodes like lib/images.py; a missing package or a --tta model is refused."""
import csv
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import gradcam
from lib import images
from lib import infer
import main
from lib import ood
from lib import runs
from conftest import ROOT, shared, write_image
from model import build

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
sys.path.insert(0, str(ROOT / "examples"))
import onnx_predict  # noqa: E402  (the runtime without PyTorch, as a user runs it)


def run_graph(folder, batch: np.ndarray) -> dict:
    session = ort.InferenceSession(str(folder / "model.onnx"))
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": batch[:, None]})))


def reference(ckpt: dict, batch: np.ndarray) -> dict:
    """What predict, Grad-CAM and the input checks compute for the same uint8 images, in PyTorch."""
    predictor = infer.load_predictor(ckpt, torch.device("cpu"))
    x = torch.from_numpy(batch).unsqueeze(1)
    logits, features = predictor.logits_and_features(x)
    prob, classes = infer.probabilities(logits)
    maps = gradcam.ensemble_layer_maps(predictor.members, predictor.model_input(x)).detach().numpy()
    out = {"probability": prob, "classes": classes, "heatmap": maps, "statistics": ood.image_statistics(batch)}
    if ckpt.get("ood"):
        detector = ood.Detector.from_state(ckpt["ood"])
        out["distance"] = detector.distance(features) if detector.members else None
        out["turned"] = detector.turned(batch)[1]
    return out


def assert_parity(folder, ckpt: dict, batch: np.ndarray, probability: float = 1e-5) -> dict:
    got, want = run_graph(folder, batch), reference(ckpt, batch)
    assert np.abs(got["probability"] - want["probability"]).max() <= probability
    if want["classes"] is not None:
        assert np.abs(got["class_probabilities"] - want["classes"]).max() <= 1e-5
    assert np.abs(got["heatmap"] - want["heatmap"]).max() <= 1e-4 * max(1.0, np.abs(want["heatmap"]).max())
    assert np.abs(got["statistics"] - want["statistics"]).max() <= 1e-5
    if want.get("distance") is not None:
        assert np.abs(got["distance"] - want["distance"]).max() <= 1e-3
        assert np.abs((1 - got["turn_probabilities"][:, 0]) - want["turned"]).max() <= 1e-5
    return got


def demo_batch(demo_run, n: int = 12) -> np.ndarray:
    ckpt = runs.read_checkpoint(demo_run / "best.pt")
    files = sorted((demo_run / "demo_data").rglob("*.png"))[:n]
    side = images.cache_size(ckpt["preprocess"]["image_size"])
    return np.stack([images.decode_image(str(f), side) for f in files])


@pytest.fixture(scope="module")
def exported(demo_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "demo"
    assert main.main(["export", "--checkpoint", str(demo_run / "best.pt"), "--out", str(out)]) == 0
    return out


def test_the_exported_graph_scores_explains_and_checks_like_predict(demo_run, exported):
    ckpt = runs.read_checkpoint(demo_run / "best.pt")
    got = assert_parity(exported, ckpt, demo_batch(demo_run))
    assert got["heatmap"].max() > 0  # a trained model's maps are not all zero, so the comparison means something
    meta = json.loads((exported / "model.json").read_text())
    assert meta["threshold"] == ckpt["threshold"] and meta["input"]["side"] == 141
    assert meta["source"]["sha256"] == runs.file_sha256(demo_run / "best.pt")
    assert meta["outputs"] == [o.name for o in ort.InferenceSession(str(exported / "model.onnx")).get_outputs()]
    assert not (exported / runs.MARKER).exists() and not list(exported.glob("*.data"))  # one self-contained file


def test_an_ensemble_and_a_three_class_model_each_export_as_one_graph(demo_run, tmp_path):
    base = runs.read_checkpoint(demo_run / "best.pt")
    torch.manual_seed(1)
    other = build(base["model_config"]).state_dict()  # a second member that disagrees with the first
    ensemble = {**base, "members": [base["members"][0], other],
                "ood": {**base["ood"], "members": base["ood"]["members"] * 2}}
    cause_config = {**base["model_config"], "outputs": 3}
    torch.manual_seed(2)
    cause = {**base, "model_config": cause_config, "members": [build(cause_config).eval().state_dict()],
             "ood": {**base["ood"], "members": []}, "cause_threshold": 0.5}  # after --adapt-bn: no distance
    standardised = {**base, "preprocess": {**base["preprocess"], "intensity": "image"}}  # --intensity image
    batch = demo_batch(demo_run, 6)
    layers = {}
    for name, ckpt in (("ensemble", ensemble), ("cause", cause), ("standardised", standardised)):
        runs.save_checkpoint(tmp_path / f"{name}.pt", {k: v for k, v in ckpt.items() if k not in ("format",
                                                                                                  "versions")})
        assert main.main(["export", "--checkpoint", str(tmp_path / f"{name}.pt"), "--out", str(tmp_path / name)]) == 0
        # per-image standardisation: the standard deviation as the ONNX graph computes it moves probabilities by up
        # to 1.5e-5 (measured on the demo model); the dataset normalisation stays within 1e-5
        got = assert_parity(tmp_path / name, runs.read_checkpoint(tmp_path / f"{name}.pt"), batch,
                            5e-5 if name == "standardised" else 1e-5)
        meta = json.loads((tmp_path / name / "model.json").read_text())
        assert meta["source"]["members"] == len(ckpt["members"])
        layers[name] = meta["heatmap"]["layer"]
        if name == "cause":
            assert "distance" not in got and meta["classes"] == ["NORMAL", "BACTERIAL", "VIRAL"]
    # the heatmap's layer is the network's own: ResNet-18's is its fourth block (random weights: no parity claim).
    # model.json as the three exports above write it, without exporting the ONNX graph of its 11 M weights
    from app import export
    resnet_config = {"arch": "resnet18", "outputs": 1}
    resnet = {**base, "model_config": resnet_config, "members": [build(resnet_config).eval().state_dict()],
              "ood": {**base["ood"], "members": []}}
    runs.save_checkpoint(tmp_path / "resnet.pt", {k: v for k, v in resnet.items() if k not in ("format", "versions")})
    ckpt, graph = export.prepare(str(tmp_path / "resnet.pt"))
    layers["resnet"] = export.describe(ckpt, graph, str(tmp_path / "resnet.pt"), 141)["heatmap"]["layer"]
    assert layers == {"ensemble": "block3", "cause": "block3", "standardised": "block3", "resnet": "block4"}


def test_what_cannot_be_exported_is_refused_in_one_sentence(demo_run, tmp_path, capsys, monkeypatch):
    ckpt = runs.read_checkpoint(demo_run / "best.pt")
    runs.save_checkpoint(tmp_path / "tta.pt", {**{k: v for k, v in ckpt.items() if k not in ("format", "versions")},
                                               "tta": True})
    assert main.main(["export", "--checkpoint", str(tmp_path / "tta.pt"), "--out", str(tmp_path / "a")]) == 2
    assert "averages test-time views (--tta)" in capsys.readouterr().err and not (tmp_path / "a").exists()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    assert main.main(["export", "--checkpoint", str(demo_run / "best.pt"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs the package onnxscript" in err and "pip install -r requirements-export.txt" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "b").exists()


def test_the_runtime_without_pytorch_decodes_like_images_py(tmp_path):
    files = [write_image(tmp_path / "grey.png", 1, size=300), write_image(tmp_path / "rgb.jpg", 2, 500, "RGB"),
             write_image(tmp_path / "cmyk.jpg", 3, 400, "CMYK")]
    Image.fromarray((np.arange(200 * 300, dtype=np.uint16).reshape(200, 300) * 3)).save(tmp_path / "deep.png")
    files.append(tmp_path / "deep.png")
    real = shared("chest_xray_fullres_train")
    files += sorted(real.rglob("*.jpeg"))[:4]
    for path in files:
        ours, colour = images.decode_with_colour(str(path), 141)
        theirs, their_colour, _ = onnx_predict.decode_picture(str(path), 141)
        assert np.array_equal(ours, theirs), path
        assert their_colour == pytest.approx(colour, abs=1e-6)


def test_the_runtime_writes_predict_columns_with_the_same_probabilities_and_overlays(demo_run, exported, tmp_path):
    folder = tmp_path / "in"
    for i, f in enumerate(sorted((demo_run / "demo_data").rglob("*.png"))[:5]):
        (folder / f.name).parent.mkdir(parents=True, exist_ok=True)
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "=broken.png").write_bytes(b"not an image")
    Image.new("L", (160, 160), 128).save(folder / "blank.png")  # flagged blank, and still its distance checked
    assert onnx_predict.main([str(folder), "--model", str(exported), "--csv", str(tmp_path / "onnx.csv"),
                              "--cam", str(tmp_path / "cams")]) == 0
    assert main.main(["predict", str(folder), "--checkpoint", str(demo_run / "best.pt"), "--out",
                      str(tmp_path / "torch"), "--precision", "fp32"]) == 0
    with open(tmp_path / "onnx.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == onnx_predict.COLUMNS == evaluate.PREDICTION_COLUMNS
    theirs = {r["path"]: r for r in runs.read_csv(tmp_path / "torch" / "predictions.csv")}
    for row in rows:
        path = runs.read_csv(tmp_path / "onnx.csv")[rows.index(row)]["path"]
        if row["error"]:
            assert theirs[path]["error"]  # unreadable to both
            continue
        assert abs(float(row["probability"]) - float(theirs[path]["probability"])) <= 1e-5
        assert row["predicted"] == theirs[path]["predicted"] and row["warnings"] == theirs[path]["warnings"]
    assert any("blank or near-constant image" in r["warnings"] for r in rows)
    assert len(list((tmp_path / "cams").glob("*_cam.png"))) == 6


def test_the_model_card_opens_with_yaml_front_matter_a_hub_can_read(demo_run, tmp_path):
    from app import report
    yaml = pytest.importorskip("yaml")
    metrics = json.loads((demo_run / "metrics.json").read_text())
    config = json.loads((demo_run / "config.json").read_text())
    test = metrics["sets"]["test split"]
    metrics["sets"] = {"test split": test, 'site "B": 2\x1b': {**test, "kind": "external"}}  # a name to quote
    for synthetic in (True, False):
        card = report.write_model_card(tmp_path, {**config, "demo": synthetic}, {**metrics, "synthetic": synthetic}
                                       ).read_text()
        assert card.startswith("---\n")
        meta = yaml.safe_load(card.split("---\n")[1])
        assert meta.get("license") == (None if synthetic else "cc-by-4.0")  # phantoms carry no CC BY licence
        assert meta["pipeline_tag"] == "image-classification"
        assert ("Guangzhou" in card) != synthetic and ("Phantoms, not patients" in card) == synthetic
        assert meta["datasets"] == ["synthetic-phantoms" if synthetic else "kermany-pediatric-chest-xray"]
        assert ("dataset_doi" in meta) != synthetic and meta.get("dataset_doi", "10.17632/rscbjbr9sj.2") == \
            "10.17632/rscbjbr9sj.2"
        results = meta["model-index"][0]["results"]
        auc = {r["dataset"]["name"]: m["value"] for r in results for m in r["metrics"] if m["type"] == "roc_auc"}
        assert auc == {"test split": round(test["rates"]["auc"], 4), 'site "B": 2\\x1b': round(test["rates"]["auc"], 4)}
    assert (demo_run / "MODEL_CARD.md").read_text().startswith("---\nlibrary_name: pytorch")  # every run writes it


def test_the_runtime_decodes_a_windowed_and_a_rescaled_dicom_like_images_py(tmp_path):
    from test_dicom import write_dicom
    rng = np.random.default_rng(3)
    pixels = (rng.integers(0, 4096, (180, 150))).astype(np.uint16)
    write_dicom(tmp_path / "window.dcm", pixels, bits=12, WindowCenter=2048, WindowWidth=8192)  # output 0.25-0.75
    write_dicom(tmp_path / "rescale.dcm", pixels, bits=12, RescaleSlope=2, RescaleIntercept=-1024)
    write_dicom(tmp_path / "inverted.dcm", pixels, bits=12,
                photometric="MONOCHROME1")
    for name in ("window.dcm", "rescale.dcm", "inverted.dcm"):
        ours = images.decode_image(str(tmp_path / name), 141)
        theirs, _ = onnx_predict.decode_dicom(str(tmp_path / name), 141)
        assert np.array_equal(ours, theirs), name
