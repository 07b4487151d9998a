"""Site calibration: the threshold chosen on a site's sample, AdaBN, the expected rates, the new checkpoint."""
import csv
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from torch import nn

from app import calibrate
from lib import demo
import evaluate
from lib import infer
import main
from lib import ood
from lib import runs
from lib import transforms
from conftest import ROOT
from model import PneumoniaCNN, build


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A site of 20 phantom children per class from another 'scanner' seed (60 images per class)."""
    return demo.make_phantoms(tmp_path_factory.mktemp("site") / "site", patients_per_class=20, seed=11)


def _calibrate(demo_run, site, out, *flags):
    return main.main(["calibrate", "--checkpoint", str(demo_run / "best.pt"), "--data", str(site), "--out", str(out),
                      "--quiet", "--no-cache", *flags])


def test_the_site_threshold_is_the_one_computed_by_hand_and_the_source_is_left_as_it_was(demo_run, site, tmp_path):
    before = (demo_run / "best.pt").read_bytes()
    assert _calibrate(demo_run, site, tmp_path / "cal", "--threshold", "sens=0.9") == 0
    assert (demo_run / "best.pt").read_bytes() == before
    ckpt = runs.load_checkpoint(tmp_path / "cal" / "best.pt")
    rows = list(csv.DictReader(open(tmp_path / "cal" / "predictions.csv")))
    y = np.array([r["label"] == "PNEUMONIA" for r in rows])
    p = np.array([float(r["probability"]) for r in rows])
    # by hand: the highest threshold that still calls at least 90% of the site's pneumonias
    positives = np.sort(p[y])[::-1]
    assert ckpt["threshold"] == pytest.approx(positives[int(np.ceil(0.9 * len(positives))) - 1], abs=1e-6)
    source = runs.load_checkpoint(demo_run / "best.pt")
    assert ckpt["threshold_policy"] == "sens=0.9" and ckpt["threshold"] != source["threshold"]
    c = ckpt["calibration"]
    assert c["source"] == {"path": str(demo_run / "best.pt"), "sha256": runs.file_sha256(demo_run / "best.pt")}
    assert c["site"]["images"] == 120 and c["site"]["normal"] == c["site"]["pneumonia"] == 60 and not c["adapt_bn"]
    m = json.loads((tmp_path / "cal" / "metrics.json").read_text())
    assert m["after"]["threshold"] == ckpt["threshold"] and m["expected"]["resamples"] > 400
    lo, hi = m["expected"]["ci95"]["sensitivity"]
    assert lo <= m["expected"]["sensitivity"] <= hi and hi - lo > 0.01  # the threshold's uncertainty is in there
    card = (tmp_path / "cal" / "MODEL_CARD.md").read_text()
    # the source's card without its front matter, whose metrics were measured at the source's threshold
    source = (demo_run / "MODEL_CARD.md").read_text().split("---\n", 2)[2].strip()
    assert card.startswith(source) and "## Site calibration" in card
    assert "before: the model as trained" in (tmp_path / "cal" / "report.html").read_text()


def test_a_calibrated_checkpoint_scores_in_evaluate_and_predict_at_its_site_threshold(demo_run, site, tmp_path):
    assert _calibrate(demo_run, site, tmp_path / "cal", "--adapt-bn") == 0
    ckpt = runs.load_checkpoint(tmp_path / "cal" / "best.pt")
    source = runs.load_checkpoint(demo_run / "best.pt")
    assert ckpt["calibration"]["adapt_bn"] and ckpt["calibration"]["adapt_bn_images"] == 120
    early = [k for k in source["members"][0] if k.startswith(PneumoniaCNN.adaptable) and k.endswith("running_mean")]
    assert early and all(not torch.equal(ckpt["members"][0][k], source["members"][0][k]) for k in early)  # adapted
    late = "block3.4.running_mean"  # later layers keep the training statistics (a guard against label shift)
    assert torch.equal(ckpt["members"][0][late], source["members"][0][late])
    assert torch.equal(ckpt["members"][0]["block3.3.weight"], source["members"][0]["block3.3.weight"])  # same weights
    assert main.main(["evaluate", "--checkpoint", str(tmp_path / "cal" / "best.pt"), "--data", str(site),
                      "--out", str(tmp_path / "ev"), "--quiet", "--no-cache"]) == 0
    (again,) = [b["rates"] for b in json.loads((tmp_path / "ev" / "metrics.json").read_text())["sets"].values()]
    after = json.loads((tmp_path / "cal" / "metrics.json").read_text())["after"]
    assert again["threshold"] == ckpt["threshold"] and again["auc"] == pytest.approx(after["auc"], abs=1e-9)
    image = sorted((site / "images" / "NORMAL").glob("*.png"))[0]
    assert main.main(["predict", str(image), "--checkpoint", str(tmp_path / "cal" / "best.pt"), "--out",
                      str(tmp_path / "p")]) == 0
    row = next(csv.DictReader(open(tmp_path / "p" / "predictions.csv")))
    site_rows = csv.DictReader(open(tmp_path / "cal" / "predictions.csv"))
    site_row = next(r for r in site_rows if r["path"].endswith(image.name))
    assert float(row["probability"]) == pytest.approx(float(site_row["probability"]), abs=2e-6)


def test_adabn_gives_the_batchnorm_statistics_computed_by_hand():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 3, bias=False),
                        nn.BatchNorm2d(2)).eval()
    prep = transforms.Preprocess(12, 0.4, 0.3)
    predictor = infer.Predictor([net], prep, torch.device("cpu"))
    images = (torch.rand(70, 16, 16) * 255).to(torch.uint8).numpy()
    conv1, conv2 = net[0], net[3]
    mean1, var1, mean2, var2 = [], [], [], []
    for start in range(0, 70, calibrate.BN_BATCH):  # batches of 32, 32, 6, in order, as the model sees them
        x = prep.eval(torch.from_numpy(images[start:start + calibrate.BN_BATCH]).unsqueeze(1))
        with torch.no_grad():
            a = conv1(x)
            mean1.append(a.mean((0, 2, 3)))
            var1.append(a.transpose(0, 1).flatten(1).var(1))
            b = conv2(torch.relu((a - a.mean((0, 2, 3), keepdim=True)) / torch.sqrt(a.var((0, 2, 3), unbiased=False,
                                                                                              keepdim=True) + 1e-5)))
            mean2.append(b.mean((0, 2, 3)))
            var2.append(b.transpose(0, 1).flatten(1).var(1))
    calibrate.adapt_batchnorm(predictor, images, every_layer=True)
    assert not net.training
    for layer, means, variances in ((net[1], mean1, var1), (net[4], mean2, var2)):
        assert torch.allclose(layer.running_mean, torch.stack(means).mean(0), atol=1e-5)
        assert torch.allclose(layer.running_var, torch.stack(variances).mean(0), atol=1e-4)


def test_adabn_as_shipped_adapts_the_early_layers_only():
    torch.manual_seed(1)
    model = PneumoniaCNN((4, 8, 8), stem=4).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    predictor = infer.Predictor([model], transforms.Preprocess(24, 0.4, 0.3), torch.device("cpu"))
    calibrate.adapt_batchnorm(predictor, (torch.rand(40, 28, 28) * 255).to(torch.uint8).numpy())
    after = model.state_dict()
    changed = {k.split(".")[0] for k in after if "running" in k and not torch.equal(after[k], before[k])}
    assert changed == set(model.adaptable) == {"stem", "block1"} and not model.training
    assert all(torch.equal(after[k], before[k]) for k in after if "running" not in k and "num_batches" not in k)


def test_expected_rates_choose_on_each_resample_and_score_the_patients_left_out():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(60), np.ones(60)].astype(int)
    separable = np.r_[rng.uniform(0, 0.4, 60), rng.uniform(0.6, 1, 60)]
    patients = [f"p{i // 2}" for i in range(120)]
    perfect = calibrate.expected_rates(y, separable, patients, "sens=0.95", resamples=200)
    # separable classes: no healthy child is ever called, but the strictest in-bag threshold for 95% leaves
    # about 5% of the left-out pneumonias below it: the promise, out of bag, is about what was asked
    assert perfect["specificity"] == 1.0 and 0.9 <= perfect["sensitivity"] < 1.0 and perfect["resamples"] == 200
    noisy = calibrate.expected_rates(y, separable + rng.normal(0, 0.25, 120), patients, "sens=0.95", resamples=200)
    assert noisy["specificity"] < 0.9 and noisy["ci95"]["sensitivity"][0] < 0.9  # the threshold's spread shows
    assert noisy["ci95"]["threshold"][1] - noisy["ci95"]["threshold"][0] > 0.05
    # a promise below the target asked for is said, with a higher target to try; one at or above it is not
    assert "sens=0.97" in calibrate.shortfall("sens=0.95", {"sensitivity": 0.944})
    assert calibrate.shortfall("sens=0.95", {"sensitivity": 0.95}) is None and calibrate.shortfall("youden",
                                                                                                   perfect) is None


def test_small_samples_warn_and_one_class_or_empty_folders_are_refused(demo_run, site, tmp_path, capsys):
    small = tmp_path / "small"
    for label in ("NORMAL", "PNEUMONIA"):
        (small / label).mkdir(parents=True)
        for f in sorted((site / "images" / label).glob("*.png"))[:20]:
            shutil.copy(f, small / label / f.name)
    assert _calibrate(demo_run, small, tmp_path / "s") == 0
    err = capsys.readouterr().err
    assert "20 NORMAL and 20 PNEUMONIA images; under 50 per class" in err
    assert "under 50 per class" in json.loads((tmp_path / "s" / "metrics.json").read_text())["calibration"]["warning"]
    shutil.rmtree(small / "PNEUMONIA")
    assert _calibrate(demo_run, small, tmp_path / "one") == 2
    err = capsys.readouterr().err
    assert "only NORMAL images" in err and "(20)" in err and err.count("\n") == 1 and not (tmp_path / "one").exists()
    (tmp_path / "empty").mkdir()
    assert _calibrate(demo_run, tmp_path / "empty", tmp_path / "none") == 2
    assert "no images in NORMAL/ or PNEUMONIA/ folders" in capsys.readouterr().err


def test_a_cause_model_gets_its_site_thresholds_for_both_decisions(cause_run, tmp_path):
    site = cause_run / "demo_data"  # the phantoms' names carry bacteria or virus, as Kaggle's do
    assert main.main(["calibrate", "--checkpoint", str(cause_run / "best.pt"), "--data", str(site),
                      "--out", str(tmp_path / "cal"), "--quiet", "--no-cache", "--adapt-bn"]) == 0
    ckpt = runs.load_checkpoint(tmp_path / "cal" / "best.pt")
    source = runs.load_checkpoint(cause_run / "best.pt")
    assert ckpt["model_config"]["outputs"] == 3 and "cause_threshold" in ckpt
    assert ckpt["cause_threshold"] != source["cause_threshold"] or ckpt["threshold"] != source["threshold"]
    assert build(ckpt["model_config"]).load_state_dict(ckpt["members"][0])


# ---------------------------------------------------------------- without labels
def _shapes_sample(a=1.5, b=1.0, share=0.4, n=3000, seed=0):
    """Validation logits of two Gaussian classes, and a site's: the same classes moved by z = a v + b."""
    rng = np.random.default_rng(seed)
    val = np.r_[rng.normal(-2, 1, 2000), rng.normal(2, 1.2, 2000)]
    val_y = np.r_[np.zeros(2000), np.ones(2000)]
    k = int(share * n)
    site = a * np.r_[rng.normal(-2, 1, n - k), rng.normal(2, 1.2, k)] + b
    return val, val_y, site


def test_the_unlabelled_threshold_lands_where_the_formula_says(monkeypatch):
    from scipy.stats import norm
    monkeypatch.setattr(sys, "path", [*sys.path, str(ROOT / "benchmarks")])  # after the project: ood not shadowed
    import site_unlabelled  # the plain two-Gaussian mixture the rule compared
    val, val_y, site = _shapes_sample()
    shapes = calibrate.ValidationShapes(val, val_y, 0.95)
    got = calibrate.unlabelled_threshold(site, shapes, resamples=50)
    # the validation threshold (95% of validation pneumonias above it) carried through the site's map 1.5 v + 1
    assert got["threshold_logit"] == pytest.approx(1.5 * calibrate.upper_quantile(val[val_y == 1], 0.95) + 1, abs=0.1)
    assert got["prevalence"] == pytest.approx(0.4, abs=0.03)
    lo, hi = got["ci95"]["sensitivity"]
    assert lo <= 0.95 <= hi and got["ci95"]["prevalence"][0] < 0.4 < got["ci95"]["prevalence"][1]
    two = site_unlabelled.GaussianMixture(0.95)
    gauss = calibrate.unlabelled_threshold(site, two, resamples=20)
    mu0, mu1, sd0, sd1 = two.fit(np.sort(site)).params  # the site's classes: N(-2, 1.5) and N(4, 1.8)
    assert (mu0, mu1, sd0, sd1) == pytest.approx((-2, 4, 1.5, 1.8), abs=0.15)
    # two Gaussians: the 5th percentile of the higher one
    assert gauss["threshold_logit"] == pytest.approx(mu1 + sd1 * norm.ppf(0.05), abs=1e-9)
    assert got["threshold"] == pytest.approx(1 / (1 + np.exp(-got["threshold_logit"])))


def test_the_cause_threshold_carried_through_the_sites_map_is_youdens_on_the_site(monkeypatch):
    from sklearn.metrics import roc_curve
    monkeypatch.setattr(sys, "path", [*sys.path, str(ROOT / "benchmarks")])
    import site_unlabelled
    val, val_bacterial, site = _shapes_sample(a=0.8, b=-1.0, share=0.65)  # bacterial the upper class
    val_share = 1 / (1 + np.exp(-val))
    model = site_unlabelled.CauseShapes(val_share, val_bacterial)
    got = calibrate.unlabelled_threshold(site, model, resamples=20)
    youden_val = evaluate.choose_threshold(val_bacterial, val_share, "youden")
    assert got["threshold_logit"] == pytest.approx(0.8 * np.log(youden_val / (1 - youden_val)) - 1.0, abs=0.1)
    assert got["prevalence"] == pytest.approx(0.65, abs=0.03)
    # Youden's J on the site's own labelled sample: the carried threshold is within a hair of the best one
    site_y = np.r_[np.zeros(len(site) - int(0.65 * len(site))), np.ones(int(0.65 * len(site)))]
    fpr, tpr, _ = roc_curve(site_y, site)
    m = evaluate.binary_metrics(site_y, site, got["threshold_logit"])
    carried = m["sensitivity"] + m["specificity"] - 1
    assert carried > (tpr - fpr).max() - 0.01
    kept = evaluate.binary_metrics(site_y, site, np.log(youden_val / (1 - youden_val)))  # the source's, unmoved
    assert kept["sensitivity"] + kept["specificity"] - 1 < carried - 0.05  # the site's shift is seen


def test_scores_that_do_not_show_two_classes_are_refused_in_one_sentence():
    val, val_y, site = _shapes_sample()
    shapes = calibrate.ValidationShapes(val, val_y, 0.95)
    few = calibrate.unlabelled_threshold(site[:30], shapes)
    healthy = calibrate.unlabelled_threshold(np.sort(site)[:1500], shapes)  # the lowest half: healthy children only
    assert "too few" in few["refused"] and "at least 50" in few["refused"]
    assert "prevalence" in healthy["refused"] and healthy["prevalence"] < 0.05
    for why in (few["refused"], healthy["refused"]):
        assert "--data" in why and "\n" not in why and ". " not in why  # one sentence, with what to do instead
    assert "threshold" not in healthy
    with pytest.raises(calibrate.CalibrationError, match="sens=X"):
        calibrate.sensitivity_target("youden")


@pytest.fixture(scope="module")
def unlabelled_site(tmp_path_factory):
    """A shifted phantom site with hashed names (150 films, 40% pneumonia), and its hidden truth beside it."""
    return demo.make_site(tmp_path_factory.mktemp("unlabelled") / "site", films=150, pneumonia_share=0.4)


def _calibrate_unlabelled(demo_run, out, *sites):
    return main.main(["calibrate", "--checkpoint", str(demo_run / "best.pt"), "--unlabelled", *map(str, sites),
                      "--out", str(out), "--quiet", "--no-cache"])


def test_names_and_folders_never_reach_the_unlabelled_path(demo_run, unlabelled_site, tmp_path):
    """The same films under names and folders that tell the opposite label give the identical calibration."""
    truth = dict(r.split(",") for r in (unlabelled_site.parent / "site_labels.csv").read_text().split()[1:])
    lying = tmp_path / "lying"
    for i, (name, label) in enumerate(sorted(truth.items())):
        told = "NORMAL" if label == "PNEUMONIA" else "PNEUMONIA"
        stem = f"person{i}_bacteria_{i}" if told == "PNEUMONIA" else f"NORMAL2-IM-{i:04d}-0001"
        (lying / "chest_xray" / "test" / told).mkdir(parents=True, exist_ok=True)
        shutil.copy(unlabelled_site / name, lying / "chest_xray" / "test" / told / f"{stem}.png")
    assert _calibrate_unlabelled(demo_run, tmp_path / "a", unlabelled_site) == 0
    assert _calibrate_unlabelled(demo_run, tmp_path / "b", lying) == 0
    a, b = (json.loads((tmp_path / x / "metrics.json").read_text()) for x in "ab")
    assert a["expected"] == b["expected"]  # threshold, prevalence, every interval: the same to the last digit
    assert {k: v for k, v in a["calibration"].items() if k not in ("site", "source")} == \
        {k: v for k, v in b["calibration"].items() if k not in ("site", "source")}
    probs = [sorted(float(r["probability"]) for r in csv.DictReader(open(tmp_path / x / "predictions.csv")))
             for x in "ab"]
    assert probs[0] == probs[1]


def test_training_copies_repeats_and_unlike_films_are_left_out_and_counted(demo_run, unlabelled_site, tmp_path):
    from PIL import Image
    site = tmp_path / "site"
    shutil.copytree(unlabelled_site, site)
    train = [r["path"] for r in csv.DictReader(open(demo_run / "split.csv")) if r["split"] in ("train", "val")]
    for i, path in enumerate(train[:3]):  # films the model learnt from, renamed
        shutil.copy(path, site / f"renamed{i}.png")
    shutil.copy(sorted(unlabelled_site.glob("*.png"))[0], site / "again.png")  # a second copy of a site film
    Image.fromarray(np.full((192, 192), 255, np.uint8)).save(site / "blank.png")  # nothing like a chest film
    (site / "notes.txt").write_text("not an image")
    ckpt = runs.load_checkpoint(demo_run / "best.pt")
    scorer = evaluate.Scorer(infer.load_predictor(ckpt, torch.device("cpu")), ckpt["threshold"],
                             detector=ood.Detector.from_state(ckpt["ood"]))
    films = calibrate.site_films([str(site)], scorer, ckpt["seen"], show=False)
    left = films.left_out
    assert left["training or validation films"] == 3 and left["repeated films"] == 1 and left["unreadable"] == 0
    blank = films.rows.paths.index(str(site / "blank.png"))
    assert films.rows.flags[blank] and blank not in films.used
    assert len(films.used) + left["unlike the training films"] == 151  # the site's 150 films and the blank
    assert len(films.images) == len(films.used) and all(not films.rows.flags[i] for i in films.used)


def test_an_unlabelled_calibration_scores_through_evaluate_predict_and_export(demo_run, unlabelled_site, tmp_path):
    before = (demo_run / "best.pt").read_bytes()
    assert _calibrate_unlabelled(demo_run, tmp_path / "cal", unlabelled_site) == 0
    assert (demo_run / "best.pt").read_bytes() == before
    ckpt = runs.load_checkpoint(tmp_path / "cal" / "best.pt")
    m = json.loads((tmp_path / "cal" / "metrics.json").read_text())
    c = ckpt["calibration"]
    assert c["kind"] == "unlabelled" and c["site"]["folders"] == [str(unlabelled_site)] and c["site"]["films"] == 150
    assert ckpt["threshold"] == m["expected"]["threshold"] != runs.load_checkpoint(demo_run / "best.pt")["threshold"]
    assert 0 < m["expected"]["prevalence"] < 1 and c["site"]["used"] + sum(c["site"]["left_out"].values()) == 150
    for page in ("report.html", "MODEL_CARD.md"):
        text = (tmp_path / "cal" / page).read_text()
        assert "WITHOUT LABELS" in text and "site_labels" not in text and str(c["site"]["used"]) in text
    external = demo_run.parent / "other_site" / "images"  # conftest's labelled 'external' phantoms
    assert main.main(["evaluate", "--checkpoint", str(tmp_path / "cal" / "best.pt"), "--data", str(external),
                      "--out", str(tmp_path / "ev"), "--quiet", "--no-cache"]) == 0
    (rates,) = [b["rates"] for b in json.loads((tmp_path / "ev" / "metrics.json").read_text())["sets"].values()]
    assert rates["threshold"] == ckpt["threshold"]
    assert "trained on synthetic phantoms" in (tmp_path / "ev" / "report.html").read_text()  # a demo checkpoint
    image = sorted(unlabelled_site.glob("*.png"))[0]
    assert main.main(["predict", str(image), "--checkpoint", str(tmp_path / "cal" / "best.pt"), "--out",
                      str(tmp_path / "p")]) == 0
    row = next(csv.DictReader(open(tmp_path / "p" / "predictions.csv")))
    assert row["predicted"] == ("PNEUMONIA" if float(row["probability"]) >= ckpt["threshold"] else "NORMAL")
    pytest.importorskip("onnxscript")
    assert main.main(["export", "--checkpoint", str(tmp_path / "cal" / "best.pt"), "--out", str(tmp_path / "x")]) == 0
    assert json.loads((tmp_path / "x" / "model.json").read_text())["threshold"] == pytest.approx(ckpt["threshold"])


def test_unlabelled_calibration_with_adabn_adapts_on_the_films_it_uses(demo_run, unlabelled_site, tmp_path):
    assert main.main(["calibrate", "--checkpoint", str(demo_run / "best.pt"), "--unlabelled", str(unlabelled_site),
                      "--adapt-bn", "--out", str(tmp_path / "cal"), "--quiet", "--no-cache"]) == 0
    ckpt, source = runs.load_checkpoint(tmp_path / "cal" / "best.pt"), runs.load_checkpoint(demo_run / "best.pt")
    c = ckpt["calibration"]
    assert c["kind"] == "unlabelled" and c["adapt_bn"] and c["adapt_bn_images"] == c["site"]["used"]
    early = [k for k in source["members"][0] if k.startswith(PneumoniaCNN.adaptable) and k.endswith("running_mean")]
    assert early and all(not torch.equal(ckpt["members"][0][k], source["members"][0][k]) for k in early)
    assert ckpt["ood"]["members"] == []  # the distance was fitted to the training statistics


def test_an_unlabelled_calibration_keeps_a_cause_models_bacterial_viral_threshold_and_says_so(demo_run,
                                                                                              unlabelled_site,
                                                                                              tmp_path):
    # the demo's cause model is too weak to pass the refusals, so the binary demo model carries a cause threshold:
    # only the threshold's path through calibration is under test here
    source = runs.load_checkpoint(demo_run / "best.pt")
    source |= {"cause_threshold": 0.4321, "config": source["config"] | {"task": "cause"}}
    runs.save_checkpoint(tmp_path / "cause.pt", source)
    assert main.main(["calibrate", "--checkpoint", str(tmp_path / "cause.pt"), "--unlabelled", str(unlabelled_site),
                      "--out", str(tmp_path / "cal"), "--quiet", "--no-cache"]) == 0
    ckpt = runs.load_checkpoint(tmp_path / "cal" / "best.pt")
    assert ckpt["cause_threshold"] == 0.4321 and ckpt["threshold"] != source["threshold"]
    assert ckpt["calibration"]["cause_threshold_kept"] == 0.4321
    for page in ("report.html", "MODEL_CARD.md"):
        assert "(0.4321), kept unchanged" in (tmp_path / "cal" / page).read_text()
    assert "bacterial" not in (demo_run / "calibrate-unlabelled" / "report.html").read_text()  # a binary model's


def test_a_refused_unlabelled_calibration_says_why_and_writes_nothing(demo_run, tmp_path, capsys):
    few = demo.make_site(tmp_path / "few", films=20)
    assert _calibrate_unlabelled(demo_run, tmp_path / "cal", few) == 2
    err = capsys.readouterr().err
    assert "too few" in err and "--data" in err and not (tmp_path / "cal").exists()


def test_the_demo_ends_calibrated_without_labels_to_a_shifted_site(demo_run):
    m = json.loads((demo_run / "calibrate-unlabelled" / "metrics.json").read_text())
    assert m["calibration"]["kind"] == "unlabelled" and m["calibration"]["site"]["films"] == 200
    assert (demo_run / "calibrate-unlabelled" / "best.pt").exists()
