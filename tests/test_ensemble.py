"""Ensembles, test-time augmentation and the kept weights (last, best, swa): by hand on tiny cases, then end to end."""
import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

import gradcam
from lib import infer
import main
from lib import runs
import train
from lib import transforms
from model import PneumoniaCNN

TINY = ["--demo", "--demo-patients", "12", "--epochs", "3", "--image-size", "64", "--quiet"]


class Fixed(nn.Module):
    """A 'model' whose logits are given: one row per image, whatever the image."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("values", torch.tensor(logits, dtype=torch.float32))
        self.outputs = 1 if self.values.ndim == 1 else self.values.shape[1]

    def forward(self, x):
        return self.values[: len(x)]


def test_ensemble_probability_is_the_sigmoid_of_the_members_mean_logit():
    images = torch.zeros(2, 1, 20, 20, dtype=torch.uint8)
    members = [Fixed([2.0, 0.0]), Fixed([-1.0, 4.0])]
    prob, classes = infer.Predictor(members, transforms.Preprocess(16), torch.device("cpu")).predict(images)
    expected = 1 / (1 + np.exp(-np.array([0.5, 2.0])))  # mean logits 0.5 and 2.0
    assert classes is None and prob == pytest.approx(expected, abs=1e-6)
    assert prob[0] != pytest.approx((1 / (1 + np.exp(-2)) + 1 / (1 + np.exp(1))) / 2,
                                    abs=1e-3)  # not the mean probability
    three = [Fixed([[1.0, 2.0, 0.0]]), Fixed([[3.0, 0.0, 0.0]])]  # mean logits (2, 1, 0)
    prob, classes = infer.Predictor(three, transforms.Preprocess(16), torch.device("cpu")).predict(images[:1])
    e = np.exp([2.0, 1.0, 0.0])
    assert classes[0] == pytest.approx(e / e.sum(), abs=1e-6) and prob[0] == pytest.approx((e[1] + e[2]) / e.sum())


def test_test_time_augmentation_averages_the_fixed_views_and_the_first_view_is_eval():
    torch.manual_seed(0)
    model = PneumoniaCNN((4, 4, 4), stem=4).eval()
    prep = transforms.Preprocess(24, 0.4, 0.2)
    images = (torch.rand(3, 1, 28, 28) * 255).to(torch.uint8)
    assert torch.equal(prep.view(images, (1.0, 1.0)), prep.eval(images))
    wide = prep.view(images, (1.1, 1 / 1.1))
    assert wide.shape == (3, 1, 24, 24) and not torch.allclose(wide, prep.eval(images))
    with torch.no_grad():
        by_hand = torch.stack([model(prep.view(images, z)) for z in infer.TTA_VIEWS]).mean(0)
    got = infer.Predictor([model], prep, torch.device("cpu"), tta=True).logits(images)
    assert len(infer.TTA_VIEWS) == 5 and torch.allclose(got, by_hand, atol=1e-5)
    assert not torch.allclose(got, infer.Predictor([model], prep, torch.device("cpu")).logits(images), atol=1e-4)


def test_averaged_weights_with_recomputed_batchnorm_equal_a_hand_computation():
    torch.manual_seed(1)
    states = [nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.BatchNorm2d(2)).state_dict() for _ in range(3)]
    averaged = train.average_weights(states)
    weight = (states[0]["0.weight"] + states[1]["0.weight"] + states[2]["0.weight"]) / 3
    assert torch.allclose(averaged["0.weight"],
                          weight) and averaged["1.num_batches_tracked"] == states[-1]["1.num_batches_tracked"]
    net = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.BatchNorm2d(2))
    net.load_state_dict(averaged)
    images = (torch.rand(10, 1, 12, 12) * 255).to(torch.uint8)
    prep = transforms.Preprocess(8, 0.5, 0.25, transforms.Augment(rotation=0, zoom=0, gamma=0, contrast=0,
                                                                  brightness=0))
    train.recompute_batchnorm(net, images, prep, torch.Generator().manual_seed(3), 4,
                              device=torch.device("cpu"))
    # by hand: the same batches (4, 4, 2 images, in the generator's order), each batch's mean and unbiased
    # variance of the convolution's output per channel, averaged over the batches
    generator = torch.Generator().manual_seed(3)
    means, variances = [], []
    for idx in train.batches(10, 4, generator):
        with torch.no_grad():
            out = net[0](prep.train(images[idx], generator))
        means.append(out.mean((0, 2, 3)))
        variances.append(out.transpose(0, 1).flatten(1).var(1, unbiased=True))
    assert torch.allclose(net[1].running_mean, torch.stack(means).mean(0), atol=1e-5)
    assert torch.allclose(net[1].running_var, torch.stack(variances).mean(0), atol=1e-5)
    assert net[1].momentum == 0.1  # restored


def test_ensemble_grad_cam_is_the_mean_of_the_members_maps_and_its_checks_run():
    torch.manual_seed(2)
    members = [PneumoniaCNN((4, 4, 8), stem=4).eval() for _ in range(2)]
    x = torch.randn(3, 1, 32, 32)
    with gradcam.GradCAM(members[0], members[0].cam_layer) as a, gradcam.GradCAM(members[1], members[1].cam_layer) as b:
        by_hand = gradcam.upsample((a.layer_maps(x) + b.layer_maps(x)) / 2, (32, 32))
    assert np.allclose(gradcam.compute_maps(members, x), by_hand.numpy(), atol=1e-6)
    assert np.allclose(gradcam.compute_maps(members[:1], x), gradcam.compute_maps(members[0], x))
    result, stages = gradcam.randomisation_test(members, x)
    assert result["stages"][0] == "head" and len(stages) == 1 + len(result["stages"])
    assert all(m.training is False for m in members)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same tiny demo run as a single model and as an ensemble of 2 (with an external folder)."""
    from lib import demo
    base = tmp_path_factory.mktemp("ens")
    external = demo.make_phantoms(base / "site", patients_per_class=6, seed=7)
    for name, k in (("one", 1), ("two", 2)):
        # fp32 pinned: auto times this machine in each run, and two runs could choose differently
        assert main.main(TINY + ["--ensemble", str(k), "--out", str(base / name), "--external", str(external),
                                 "--precision", "fp32"]) == 0
    return base


def _rows(path) -> list[dict]:
    return list(csv.DictReader(open(path)))


def test_an_ensemble_of_one_is_the_single_model_and_its_members_lead_larger_ensembles(pair):
    one, two = (runs.load_checkpoint(pair / n / "best.pt") for n in ("one", "two"))
    assert len(one["members"]) == 1 and len(two["members"]) == 2
    assert all(torch.equal(one["members"][0][k], two["members"][0][k]) for k in one["members"][0])  # member 1 = seed 0
    assert not torch.equal(two["members"][0]["stem.0.weight"], two["members"][1]["stem.0.weight"])
    assert [m["seed"] for m in two["training"]] == [0, 1000]
    # every scored set: the ensemble's probability is the sigmoid of its members' mean logit
    models, prep = infer.load_models(two, torch.device("cpu"))
    from lib import cache
    from lib import images
    rows = _rows(pair / "two" / "predictions.csv")
    decoded, _ = cache.load_images([r["path"] for r in rows], images.cache_size(prep.image_size),
                                   cache.ImageCache(None, 0), show=False)
    batch = torch.from_numpy(decoded).unsqueeze(1)
    with torch.no_grad():
        logits = torch.stack([m(prep.eval(batch).contiguous(memory_format=torch.channels_last)) for m in models])
    assert np.allclose([float(r["probability"]) for r in rows], torch.sigmoid(logits.mean(0)).numpy(), atol=2e-6)
    m = json.loads((pair / "two" / "metrics.json").read_text())
    assert m["training"]["ensemble"] == 2 and m["sets"]["test split"]["gradcam"]["members"] == 2 and \
        m["sets"]["test split"]["gradcam"]["randomisation"]["images"] > 0
    history = _rows(pair / "two" / "history.csv")
    assert [r["member"] for r in history] == ["0"] * 3 + ["1"] * 3 and [r["kept"] for r in history].count("yes") == 2
    assert history[2]["stopped"] == "completed all 3 epochs" and history[2]["kept"] == "yes"
    card, page = (pair / "two" / "MODEL_CARD.md").read_text(), (pair / "two" / "report.html").read_text()
    for text in (card, page):
        assert "an ensemble of 2 models" in text
        assert "the last epoch&#x27;s weights (epoch 3)" in text.replace("'", "&#x27;")


def test_evaluate_and_predict_read_ensemble_and_format_1_checkpoints(pair, tmp_path, monkeypatch, capsys):
    from lib import precision
    # as on a CPU with fast bf16: auto must still score these fp32-trained checkpoints in fp32, or re-scoring
    # the run's own test split would not give back its figures
    monkeypatch.setattr(precision, "probe", lambda *a, **k: {"fp32": 100.0, "bf16": 50.0})
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    image = sorted((pair / "two" / "demo_data" / "images" / "PNEUMONIA").glob("*.png"))[0]
    ckpt = runs.load_checkpoint(pair / "one" / "best.pt")
    assert ckpt["precision"] == "fp32"
    old = {k: v for k, v in ckpt.items() if k not in ("members", "training", "tta", "precision")}
    old.update(format=1, model=ckpt["members"][0])  # what project 1.2 wrote
    torch.save(old, tmp_path / "old.pt")
    probs = {}
    for name, path in (("one", pair / "one" / "best.pt"), ("old", tmp_path / "old.pt"), ("two",
                                                                                         pair / "two" / "best.pt")):
        # a checkpoint that records no precision is timed like any new one: fp32 asked for, to compare the weights
        pinned = ["--precision", "fp32"] if name == "old" else []
        assert main.main(["predict", str(image), "--checkpoint", str(path), "--out", str(tmp_path / f"p{name}"),
                          *pinned]) == 0
        probs[name] = float(_rows(tmp_path / f"p{name}" / "predictions.csv")[0]["probability"])
        assert main.main(["evaluate", "--checkpoint", str(path), "--data", str(pair / "two" / "split.csv"),
                          "--out", str(tmp_path / f"e{name}"), "--quiet", "--no-cache", *pinned]) == 0
    assert probs["one"] == probs["old"] != probs["two"]
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("precision:")]
    assert len(said) == 6 and all("fp32" in line.split()[1] for line in said)
    again = json.loads((tmp_path / "etwo" / "metrics.json").read_text())
    own = json.loads((pair / "two" / "metrics.json").read_text())["sets"]["test split"]["rates"]
    assert again["sets"]["test split"]["rates"] == own  # the run's own figures
    assert main.main(["predict", str(image), "--checkpoint", str(tmp_path / "old.pt"), "--out",
                      str(tmp_path / "q")]) == 0
    assert "precision: bf16 (auto on this CPU" in capsys.readouterr().out


def test_keep_swa_and_best_and_tta_end_to_end(tmp_path):
    argv = TINY + ["--epochs", "4", "--keep", "swa", "--swa-epochs", "3", "--tta"]
    assert main.main(argv + ["--out", str(tmp_path / "swa")]) == 0
    m = json.loads((tmp_path / "swa" / "metrics.json").read_text())
    kept = m["training"]["members"][0]
    assert kept["kept_epochs"] == [2, 3, 4] and "mean of epochs 2-4" in kept["kept"] and m["training"]["tta"]
    assert [r["kept"] for r in _rows(tmp_path / "swa" / "history.csv")] == ["", "yes", "yes", "yes"]
    ckpt = runs.load_checkpoint(tmp_path / "swa" / "best.pt")
    assert ckpt["tta"] is True and infer.load_predictor(ckpt, torch.device("cpu")).tta
    assert main.main(TINY + ["--keep", "best", "--out", str(tmp_path / "best")]) == 0
    best = json.loads((tmp_path / "best" / "metrics.json").read_text())["training"]["members"][0]
    history = _rows(tmp_path / "best" / "history.csv")
    top = max(history, key=lambda r: (float(r["val_auc"]), -float(r["val_loss"])))
    assert best["kept_epochs"] == [int(top["epoch"])] and top["kept"] == "yes"


def test_bf16_trains_on_the_cpu_records_its_choice_and_its_checkpoint_scores_alike_in_fp32(tmp_path, monkeypatch):
    from lib import precision
    assert main.main(TINY + ["--precision", "bf16", "--out", str(tmp_path / "bf16")]) == 0
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    m = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert config["precision_choice"]["chosen"] == m["provenance"]["precision"]["chosen"] == "bf16"
    assert "Precision: bf16" in (tmp_path / "bf16" / "MODEL_CARD.md").read_text()
    images = sorted((tmp_path / "bf16" / "demo_data" / "images").rglob("*.png"))[:12]
    probs = {}
    # auto on a CPU with native bf16 (the screen finds it not emulated), then on one that emulates it
    for name, cpu_emulates in (("fp32", None), ("bf16", None), ("auto", False), ("auto", True)):
        monkeypatch.setattr(precision, "emulated", lambda *a, **k: {"fp32": 1.0, "bf16": 9.0} if cpu_emulates else None)
        monkeypatch.setattr(precision, "cpu_flags", lambda: set())  # flags unread: the screen (faked) decides
        out = tmp_path / f"p{name}{'_emulated' if cpu_emulates else ''}"
        assert main.main(["predict", *map(str, images), "--checkpoint", str(tmp_path / "bf16" / "best.pt"),
                          "--precision", name, "--out", str(out)]) == 0
        probs[out.name[1:]] = np.array([float(r["probability"]) for r in _rows(out / "predictions.csv")])
    assert np.abs(probs["fp32"] - probs["bf16"]).max() <= 0.01
    assert np.array_equal(probs["auto"], probs["bf16"])  # auto scores in the precision the threshold was chosen at,
    assert np.array_equal(probs["auto_emulated"], probs["fp32"])  # unless this CPU emulates bf16 (~10x slower)
    monkeypatch.undo()
    assert main.main(TINY + ["--out", str(tmp_path / "auto")]) == 0  # the default: auto, measured and recorded
    auto = json.loads((tmp_path / "auto" / "config.json").read_text())["precision_choice"]
    assert auto["chosen"] in ("fp32", "bf16")  # timed, unless this CPU's flags name no bf16 instructions
    assert set(auto["timings_ms"]) == (set() if precision.lacks_bf16() else {"fp32", "bf16"})
