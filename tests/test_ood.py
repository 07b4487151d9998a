"""Knowing when an input is not a chest film: the detector's pieces by hand, then real films and wrong inputs."""
import csv
import shutil

import numpy as np
import pytest
import sklearn
import torch
from PIL import Image
from sklearn.covariance import ledoit_wolf_shrinkage

from lib import cache
import data
from lib import infer
import main
from lib import ood
from lib import runs
from lib import transforms
from lib.cache import ImageRows, TensorRows
from conftest import shared
from model import PneumoniaCNN

PHOTO = f"{sklearn.__path__[0]}/datasets/images/china.jpg"


def test_mahalanobis_fit_equals_a_hand_computation():
    rng = np.random.default_rng(0)
    features = np.r_[rng.normal(0, 1, (30, 3)), rng.normal(2, 1, (20, 3))] * [1.0, 2.0, 0.5]
    labels = np.r_[np.zeros(30), np.ones(20)].astype(int)
    fitted = ood.fit_mahalanobis(features, labels)
    means = np.stack([features[:30].mean(0), features[30:].mean(0)])
    centred = np.r_[features[:30] - means[0], features[30:] - means[1]]
    empirical = centred.T @ centred / len(centred)
    shrink = ledoit_wolf_shrinkage(centred, assume_centered=True)
    covariance = (1 - shrink) * empirical + shrink * np.trace(empirical) / 3 * np.eye(3)
    assert np.allclose(fitted["means"], means) and np.allclose(fitted["precision"], np.linalg.inv(covariance))
    x = np.array([[0.5, -1.0, 0.2], [2.0, 4.0, 1.0]])
    by_hand = [min(np.sqrt((row - m) @ np.linalg.inv(covariance) @ (row - m)) for m in means) for row in x]
    assert np.allclose(ood.mahalanobis(x, fitted), by_hand)


def test_image_statistics_and_thumbnails_by_hand():
    image = np.zeros((1, 8, 8), np.uint8)
    image[0, :, 4:] = 255  # left half black, right half white; every second pixel: 4 x 4, two columns of each
    contrast, entropy, edges = ood.image_statistics(image)[0]
    assert contrast == pytest.approx(0.5) and entropy == pytest.approx(1.0)  # two equal bins: one bit
    assert edges == pytest.approx((0 + 4 / 12) / 2)  # one jump in every row of 3 differences, none down the columns
    assert ood.thumbnails(np.zeros((2, 64, 64), np.uint8) + 255).shape == (2, 256)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A detector fitted as training fits it, on 400 real films, with a small untrained network; held-out films."""
    folder = shared("chest_xray_256")
    found = data.find_labelled(str(folder))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(found.paths))
    held = order[500:520]  # after the 400 training and 100 validation films
    size = 77  # cache_size(70)
    store = cache.ImageCache(str(tmp_path_factory.mktemp("cache")), size)
    images, _ = cache.load_images([found.paths[i] for i in order[:520]], size, store, show=False)
    torch.manual_seed(0)
    predictor = infer.Predictor([PneumoniaCNN((8, 16, 16), stem=8).eval()], transforms.Preprocess(70, 0.5, 0.25),
                                torch.device("cpu"))
    labels = np.array(found.labels)[order[:520]]
    detector = ood.fit(predictor, TensorRows(ImageRows(images[:400])), labels[:400],
                       TensorRows(ImageRows(images[400:500])))
    return predictor, detector, images[500:520], [found.paths[i] for i in held]


def _flags(predictor, detector, images, paths):
    copied = torch.from_numpy(np.array(images)).unsqueeze(1)  # a copy: mapped rows are read-only
    _, features = predictor.logits_and_features(copied)
    return ood.inspect(paths, images, features, predictor.prep, detector)


def test_real_films_pass_and_a_photo_a_blank_and_an_upside_down_film_are_flagged(real, tmp_path):
    predictor, detector, held, paths = real
    distance, notes, flags = _flags(predictor, detector, held, paths)
    assert sum(bool(f) for f in flags) <= 2 and np.isfinite(distance).all()  # about 1.5% of films are expected
    blank = tmp_path / "blank.png"
    Image.new("L", (300, 300), 128).save(blank)
    upside = tmp_path / "upside.png"
    Image.open(paths[0]).transpose(Image.ROTATE_180).save(upside)
    wrong = [PHOTO, str(blank), str(upside)]
    images, errors, colours = predictor.decode(wrong, show=False)
    _, features = predictor.logits_and_features(torch.from_numpy(images).unsqueeze(1))
    distance, notes, flags = ood.inspect(wrong, images, features, predictor.prep, detector, colours=colours)
    assert flags[0][0].startswith("colour picture, not a radiograph") and colours[0] > 0.1
    assert "blank or near-constant image" in flags[1]
    assert "upside down?" in flags[2]
    restored = ood.Detector.from_state(detector.state())  # as best.pt stores it
    assert np.allclose(restored.distance(features), detector.distance(features))


def test_predict_flags_with_reasons_and_strict_leaves_them_unscored(demo_run, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    film = sorted((demo_run / "demo_data" / "images" / "NORMAL").glob("*.png"))[0]
    shutil.copy(film, folder / film.name)
    shutil.copy(PHOTO, folder / "photo.jpg")
    Image.new("L", (300, 300), 0).save(folder / "black.png")
    for strict in (False, True):
        out = tmp_path / f"p{strict}"
        assert main.main(["predict", str(folder), "--checkpoint", str(demo_run / "best.pt"), "--out", str(out)]
                         + (["--strict"] if strict else [])) == 0
        rows = {r["path"].split("/")[-1]: r for r in csv.DictReader(open(out / "predictions.csv"))}
        assert rows["photo.jpg"]["flagged"] == "yes" and "colour picture" in rows["photo.jpg"]["warnings"]
        assert rows["black.png"]["flagged"] == "yes" and "blank" in rows["black.png"]["warnings"]
        assert rows[film.name]["ood_score"] != ""
        scored = {n: r["probability"] != "" for n, r in rows.items()}
        assert scored["photo.jpg"] is (not strict) and scored["black.png"] is (not strict)
        if strict:
            assert rows["photo.jpg"]["error"].startswith("flagged, not scored (--strict): colour picture")
        text = capsys.readouterr()
        assert "; 2 flagged (" in text.out or rows[film.name]["flagged"] == "yes"
        photo = next(line for line in text.out.splitlines() if line.startswith("photo.jpg"))
        assert ("not scored (--strict)" if strict else "colour picture") in photo  # the reason beside the file
        assert (out / "report.html").is_file() and (out / "ood_flagged.png").is_file()


def test_a_checkpoint_without_a_detector_loads_and_says_the_check_is_unavailable(demo_run, tmp_path, capsys):
    ckpt = runs.load_checkpoint(demo_run / "best.pt")
    assert ckpt.get("ood")  # training stores one
    del ckpt["ood"]
    runs.save_checkpoint(tmp_path / "old.pt", {k: v for k, v in ckpt.items() if k not in ("format", "versions")})
    film = sorted((demo_run / "demo_data" / "images" / "NORMAL").glob("*.png"))[0]
    assert main.main(["predict", str(film), str(PHOTO), "--checkpoint", str(tmp_path / "old.pt"), "--out",
                      str(tmp_path / "p")]) == 0
    assert "no out-of-distribution detector" in capsys.readouterr().err
    rows = list(csv.DictReader(open(tmp_path / "p" / "predictions.csv")))
    assert all(r["ood_score"] == "" for r in rows) and rows[1]["flagged"] == "yes"  # the colour check needs no model


def test_a_training_run_reports_its_detector(demo_run):
    import json
    m = json.loads((demo_run / "metrics.json").read_text())
    n_val = m["data"]["splits"]["val"]["images"]
    assert m["ood_detector"]["validation_false_alarms"] <= ood.VALIDATION_FALSE_ALARMS + 1 / n_val  # one film at most
    test = m["sets"]["test split"]
    assert test["ood"]["images"] == test["rates"]["images"]
    assert "Inputs unlike the training films" in (demo_run / "MODEL_CARD.md").read_text()
    assert "Inputs unlike the training films" in (demo_run / "report.html").read_text()
