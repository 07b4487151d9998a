"""Grad-CAM against pytorch-grad-cam, hooks, modes, batching, signs and the sanity checks."""
import numpy as np
import pytest
import torch

import gradcam
from model import PneumoniaCNN


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = PneumoniaCNN((8, 16, 16), stem=8)
    with torch.no_grad():  # a little structure, so maps are not flat
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def test_shapes_range_and_hooks_removed(model):
    x = torch.randn(5, 1, 64, 64)
    with gradcam.GradCAM(model, model.cam_layer) as cam:
        maps = cam(x)
        assert len(model.cam_layer._forward_hooks) == 1
    assert maps.shape == (5, 64, 64) and maps.min() >= 0 and maps.max() <= 1
    assert all(len(m._forward_hooks) == 0 and len(m._backward_hooks) == 0 for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_mode_unchanged_and_exceptions_propagate(model):
    model.train()
    with pytest.raises(ZeroDivisionError):
        with gradcam.GradCAM(model, model.cam_layer) as cam:
            cam(torch.randn(2, 1, 32, 32))
            assert model.training
            1 / 0
    assert model.training and len(model.cam_layer._forward_hooks) == 0


def test_batch_equals_one_at_a_time(model):
    x = torch.randn(4, 1, 64, 64)
    with gradcam.GradCAM(model, model.cam_layer) as cam:
        together = cam(x)
        alone = torch.cat([cam(x[i:i + 1]) for i in range(4)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_all_negative_cam_is_zero_not_nan():
    cam = gradcam.normalise(torch.zeros(2, 8, 8))
    assert torch.equal(cam, torch.zeros(2, 8, 8))
    model = PneumoniaCNN((4, 4, 4), stem=4).eval()
    with torch.no_grad():
        model.head[-1].weight.fill_(0.0)  # zero gradients everywhere: ReLU(0) maps
    with gradcam.GradCAM(model, model.cam_layer) as c:
        maps = c(torch.randn(3, 1, 32, 32))
    assert not torch.isnan(maps).any() and maps.abs().sum() == 0


def test_normal_target_is_the_negated_logit(model):
    x = torch.randn(3, 1, 64, 64)
    with gradcam.GradCAM(model, model.cam_layer) as cam:
        pos, neg = cam.layer_maps(x, "pneumonia"), cam.layer_maps(x, "normal")
    # ReLU(s) and ReLU(-s) of the same weighted sum s never overlap and add up to |s|
    assert (torch.minimum(pos, neg) == 0).all()
    assert (pos + neg).sum() > 0


def test_agrees_with_pytorch_grad_cam(model):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    class TwoD(torch.nn.Module):  # pytorch-grad-cam expects N x classes outputs
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)[:, None]

    x = torch.randn(8, 1, 64, 64)
    with gradcam.GradCAM(model, model.cam_layer) as cam:
        ours = cam(x).numpy()
    with pgc.GradCAM(model=TwoD(model), target_layers=[model.cam_layer]) as ref:
        theirs = ref(input_tensor=x, targets=[BinaryClassifierOutputTarget(1)] * 8)
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours, theirs)]
    print(f"min Pearson vs pytorch-grad-cam: {min(corr):.5f}")
    assert min(corr) >= 0.99


def test_randomisation_test_flags_maps_that_ignore_the_weights(model):
    x = torch.randn(6, 1, 64, 64)
    result, examples = gradcam.randomisation_test(model, x)
    assert result["stages"] == ["head", "block3", "block2", "block1", "stem"]
    assert len(examples) == 6 and result["passed"] and result["fully_randomised_median_spearman"] < 0.5
    assert not np.allclose(examples[0], examples[-1])  # the stages really change the maps
    assert all(p.grad is None for p in model.parameters())
    before = torch.get_rng_state()
    gradcam.randomisation_test(model, x)
    assert torch.equal(before, torch.get_rng_state())  # the caller's RNG is untouched

    class Fixed(torch.nn.Module):  # a 'model' whose map is the input itself: weights don't matter
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(1, 1, 1)
            self.cam = torch.nn.Identity()

        @property
        def cam_layer(self):
            return self.cam

        def forward(self, x):
            return self.cam(x * 1.0).mean((1, 2, 3)) + 0 * self.stem.weight.sum()

    with pytest.warns(UserWarning, match="randomised"):
        bad, _ = gradcam.randomisation_test(Fixed(), torch.rand(4, 1, 16, 16))
    assert not bad["passed"] and bad["fully_randomised_median_spearman"] > 0.9


def test_border_mass_and_pointing_game():
    maps = np.zeros((2, 10, 10), np.float32)
    maps[0, 0, :] = 1.0  # all mass on the top row: the frame
    maps[1, 4:6, 4:6] = 1.0  # all mass in the centre
    b = gradcam.border_mass(maps)
    assert b["border_area_share"] == pytest.approx(0.36) and b["border_mass_share"] == pytest.approx(0.5)
    masks = np.zeros((2, 10, 10), bool)
    masks[:, 4:6, 4:6] = True
    loc = gradcam.localisation(maps, masks)
    assert loc["pointing_game"] == 0.5 and loc["lesion_area"] == pytest.approx(0.04)
