"""The network contract (model.Network) on every architecture, the factory, and the formats it writes down."""
import json
import re

import numpy as np
import pytest
import torch

from app import calibrate
import gradcam
from lib import infer
import model
from lib import ood
from app import report
from lib import runs
from app import settings
from lib import transforms
from lib.labels import CAUSES

SIZE = 64  # ResNet-18's last stage is 2x2 here: enough for every check, and fast


@pytest.fixture(params=sorted(model.ARCHITECTURES))
def network(request):
    torch.manual_seed(0)
    return model.build({"arch": request.param}).eval()


def test_the_factory_builds_each_architecture_and_refuses_an_unknown_one_in_one_sentence():
    assert set(settings.ARCHITECTURES) == set(model.ARCHITECTURES)  # the flag offers what the factory builds
    for arch in model.ARCHITECTURES:
        for outputs in (1, len(CAUSES)):
            net = model.build({"arch": arch, "outputs": outputs})
            assert isinstance(net, model.Network) and net.config["arch"] == arch and net.outputs == outputs
            again = model.build(net.config)  # the config a checkpoint stores makes the same network
            assert again.load_state_dict(net.state_dict()) is not None
    with pytest.raises(ValueError) as err:
        model.build({"arch": "vit"})
    assert str(err.value) == "unknown architecture 'vit': this version builds cnn or resnet18"


def test_a_config_from_before_the_factory_builds_the_custom_cnn():
    old = {"widths": [8, 16, 16], "stem": 8, "dropout": 0.2, "in_channels": 1, "outputs": 1}  # no "arch"
    assert isinstance(model.build(old), model.PneumoniaCNN)
    assert model.build(old).config == {"arch": "cnn", **old}


def test_every_architecture_keeps_the_contract(network):
    x = torch.rand(6, 1, SIZE, SIZE)
    logits, features = network.forward_features(x)
    assert logits.shape == (6,) and torch.allclose(network(x), logits)
    trunk = network.trunk(x)
    assert features.shape == trunk.shape[:2] and torch.allclose(features, trunk.mean((2, 3)), atol=1e-5)
    # the head is what export rebuilds: pooling, flatten, dropout, one linear layer
    assert [type(m) for m in network.head] == [torch.nn.AdaptiveAvgPool2d, torch.nn.Flatten, torch.nn.Dropout,
                                                torch.nn.Linear]
    children = dict(network.named_children())
    assert network.cam_layer in children.values() and set(network.adaptable) <= set(children)
    assert children[network.cam_layer_name] is network.cam_layer  # what metrics.json and model.json name
    assert list(children)[0] == "stem" and list(children)[-1] == "head"  # the randomisation test's cascade


def test_grad_cam_ood_features_and_adabn_run_on_every_architecture(network):
    prep = transforms.Preprocess(SIZE, 0.4, 0.25)
    predictor = infer.Predictor([network], prep, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(40, 1, SIZE + 6, SIZE + 6, generator=g) * 255).to(torch.uint8)
    x = predictor.model_input(images[:8])
    maps = gradcam.compute_maps(network, x)
    assert maps.shape == (8, SIZE, SIZE) and np.isfinite(maps).all() and maps.max() <= 1
    result, _ = gradcam.randomisation_test(network, x)
    assert result["stages"][0] == "head" and result["stages"][-1] == "stem"
    detector = ood.fit(predictor, images[:30], np.arange(30) % 2, images[30:])
    assert detector.members[0]["means"].shape == (2, network.head[-1].in_features)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    calibrate.adapt_batchnorm(predictor, images[:, 0].numpy())
    changed = {k.split(".")[0] for k, v in network.state_dict().items()
               if "running_mean" in k and not torch.equal(v, before[k])}
    assert changed == set(network.adaptable) and not network.training


def test_memory_format_is_decided_in_one_place():
    assert model.memory_format(torch.device("cpu")) == torch.channels_last
    assert model.memory_format(torch.device("mps")) == torch.contiguous_format  # MPS has no channels_last kernels
    net = model.place(model.build({"arch": "cnn"}), torch.device("cpu"))
    assert net.stem[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_an_old_checkpoint_without_an_architecture_loads_as_the_custom_cnn(tmp_path):
    net = model.PneumoniaCNN((8, 16, 16), stem=8).eval()
    config = {k: v for k, v in net.config.items() if k != "arch"}  # as checkpoints before the factory stored it
    prep = transforms.Preprocess(SIZE)
    runs.save_checkpoint(tmp_path / "best.pt", {"members": [net.state_dict()], "model_config": config,
                                                "preprocess": prep.state(), "threshold": 0.5})
    (loaded,), _ = infer.load_models(runs.read_checkpoint(tmp_path / "best.pt"), torch.device("cpu"))
    x = torch.rand(2, 1, SIZE, SIZE)
    assert isinstance(loaded, model.PneumoniaCNN) and torch.allclose(loaded(x), net(x), atol=1e-6)
    unknown = {"members": [net.state_dict()], "model_config": {**config, "arch": "vit"}, "preprocess": prep.state()}
    with pytest.raises(runs.RunError, match="cannot be rebuilt: unknown architecture 'vit'"):
        infer.load_models(unknown, torch.device("cpu"))


# a metrics.json as runs wrote it before the "sets" block (schema 1): the test split's figures at the top and each
# external set's spread over five external_* dicts
RATES = {"accuracy": 0.9, "auc": 0.95, "sensitivity": 0.92, "specificity": 0.88, "ppv": 0.9, "npv": 0.9,
         "threshold": 0.4, "tp": 9, "tn": 8, "fp": 1, "fn": 1, "images": 19, "patients": 9, "average_precision": 0.9,
         "brier": 0.1, "ece": 0.05, "bootstrap_resamples": 10,
         "ci95": {k: [0.8, 0.99] for k in ("accuracy", "auc", "sensitivity", "specificity", "ppv", "npv")}}
GRADCAM = {"target": "pneumonia", "layer": "block3", "members": 1,
           "border": {"border_mass_share": 0.3, "border_area_share": 0.36, "frame": 0.1},
           "randomisation": {"fully_randomised_median_spearman": 0.1, "images": 4, "passed": True}}
OOD = {"images": 19, "flagged": 0, "by_reason": {}, "examples": [], "detector": True}
OLD = {"test": RATES, "gradcam": GRADCAM, "ood": OOD, "external": {"site": {**RATES, "auc": 0.7}},
       "external_gradcam": {"site": GRADCAM}, "external_ood": {"site": {**OOD, "flagged": 2}}, "synthetic": False,
       "validation": {"auc": 0.99, "threshold_policy": "sens=0.95", "threshold": 0.4}}


def test_an_old_metrics_json_is_read_into_one_block_per_set_and_renders(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps(OLD))
    m = runs.read_metrics(tmp_path / "metrics.json")
    assert m["schema"] == runs.METRICS_SCHEMA and list(m["sets"]) == ["test split", "site"]
    assert m["sets"]["test split"] == {"kind": "test", "folder": ".", "rates": RATES, "gradcam": GRADCAM, "ood": OOD}
    assert m["sets"]["site"] == {"kind": "external", "folder": "external/site", "rates": {**RATES, "auc": 0.7},
                                 "gradcam": GRADCAM, "ood": {**OOD, "flagged": 2}}
    assert m["validation"] == OLD["validation"] and not any(k.startswith("external") for k in m)
    assert runs.upgrade_metrics(m) is m  # today's schema is left as it is
    page = report.write_report(tmp_path, "old run", {}, m).read_text()
    assert "External: site" in page and "0.700" in page
    assert "Input checks (site): 2 of 19" in report.terminal_summary(m, tmp_path)


def test_a_figure_an_older_metrics_json_lacks_renders_as_a_dash_everywhere(tmp_path):
    older = {k: v for k, v in RATES.items() if k not in ("brier", "ece")}  # from before those two figures
    m = runs.upgrade_metrics({**OLD, "test": older, "external": {"site": older}})
    summary = report.terminal_summary(m, tmp_path)  # the terminal, one set and the sets side by side
    assert re.search(r"^Brier score +- *$", summary, re.M) and re.search(r"^average precision +0\.900", summary, re.M)
    page = report.write_report(tmp_path, "older run", {}, m).read_text()
    assert "<td class=l>Brier score</td><td>-</td>" in page
    card = report.metric_table(m["sets"]["test split"]["rates"]).markdown()  # the model card's table
    assert re.search(r"^\| Brier score \| - \|", card, re.M)


def refuse(token):
    raise ValueError(f"{token} is not JSON")


def test_metrics_json_is_strict_json_with_null_where_a_figure_could_not_be_computed(tmp_path):
    runs.write_json(tmp_path / "m.json", {"auc": float("nan"), "border": {"share": np.float64("nan"), "k": 3},
                                          "ci95": (0.5, float("inf")), "rows": [[-float("inf"), 0.25]], "ok": 0.9})
    saved = json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse)
    assert saved == {"auc": None, "border": {"share": None, "k": 3}, "ci95": [0.5, None], "rows": [[None, 0.25]],
                     "ok": 0.9}
