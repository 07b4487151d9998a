"""Inference, in one place: uint8 images in, logits and probabilities out; image files in, with their decode errors.

Usage: `predictor = Predictor([model], prep, device); prob, classes = predictor.predict(images)`;
`images, errors = predictor.decode(files)` for image files.
Training's validation, the test split, every external set, `evaluate`, `predict` and Grad-CAM all
score through a Predictor. An ensemble scores the mean of its members' logits; with test-time
augmentation every member's logit is also averaged over a fixed set of zoom and aspect views.
"""
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lib import progress
from lib import runs
from model import Network, build, memory_format, place
from lib.cache import ImageCache, load_images
from lib.images import cache_size
from lib.transforms import Preprocess

# (x, y) magnification of the centre view: the image as trained, zoomed out and in, wider and taller.
# Training jitters each axis by up to 1.25x, so these views stay inside what the model has seen.
TTA_VIEWS = ((1.0, 1.0), (0.9, 0.9), (1.1, 1.1), (1.1, 1 / 1.1), (1 / 1.1, 1.1))


def probabilities(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """P(pneumonia) per image, and for a three-class model P(normal, bacterial, viral) (else None).

    For three classes P(pneumonia) = P(bacterial) + P(viral), so every binary metric and threshold
    works on either model.
    """
    if logits.ndim == 1:
        return torch.sigmoid(logits).numpy(), None
    classes = torch.softmax(logits, 1).numpy()
    return classes[:, 1:].sum(1), classes


@dataclass
class Predictor:
    """One model or an ensemble of them, with the preprocessing they were trained with, on one device."""

    members: list[nn.Module]
    prep: Preprocess
    device: torch.device
    tta: bool = False  # average every member's logit over TTA_VIEWS
    batch_size: int = 128
    autocast: torch.dtype | None = None  # bf16 or fp16 autocast (precision.py); None: fp32

    @property
    def outputs(self) -> int:
        """1 for the pneumonia logit, 3 for a --task cause model."""
        return getattr(self.members[0], "outputs", 1)

    def model_input(self, images: torch.Tensor, zoom: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        """A uint8 N x 1 x S x S batch as the model takes it: the centre view (magnified by `zoom`), normalised."""
        x = self.prep.view(images.to(self.device, non_blocking=True), zoom)
        return x.contiguous(memory_format=memory_format(self.device))

    @torch.no_grad()
    def logits_and_features(self, images, show: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The members' mean logit (over the TTA views too) per uint8 image, and every member's penultimate
        features of the plain view (K x N x D; None for a model without them), as float32 on the CPU.

        Every member scores in eval mode; each member's own mode is restored afterwards. `show`: progress.
        """
        modes = [m.training for m in self.members]
        for m in self.members:
            m.eval()
        dtype, views = self.autocast, TTA_VIEWS if self.tta else TTA_VIEWS[:1]
        with_features = all(hasattr(m, "forward_features") for m in self.members)
        logits, features = [torch.zeros((0,) if self.outputs == 1 else (0, self.outputs))], []
        bar = progress.track(len(images), "scoring", "images", show)
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            inputs = [self.model_input(batch, zoom) for zoom in views]
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                scored = [m.forward_features(x) if with_features else (m(x), None)
                          for m in self.members for x in inputs]
            logits.append(torch.stack([out.float() for out, _ in scored]).mean(0).cpu())
            if with_features:  # the plain view of each member: the first of its views
                plain = [scored[k * len(views)][1].float().cpu() for k in range(len(self.members))]
                features.append(torch.stack(plain))
            bar.update(len(batch))
        bar.close()
        for m, mode in zip(self.members, modes):
            m.train(mode)
        return torch.cat(logits), torch.cat(features, 1) if features else None

    def logits(self, images, show: bool = False) -> torch.Tensor:
        """The members' mean logit (over the TTA views too) per uint8 image, as float32 on the CPU."""
        return self.logits_and_features(images, show)[0]

    def predict(self, images, show: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """P(pneumonia) per uint8 image, and the three class probabilities of a --task cause model (else None)."""
        return probabilities(self.logits(images, show))

    def decode(self, files: list[str], workers: int | None = None,
               show: bool = True) -> tuple[np.ndarray, list, np.ndarray]:
        """Decode image files as for training (on every core, nothing cached): N x S x S uint8 images, per file
        None or the reason it could not be read (its image is then zeros), and each file's colourfulness."""
        size = cache_size(self.prep.image_size)
        colours = np.full(len(files), np.nan)
        images, errors = load_images(files, size, ImageCache(None, size), workers, show, colours=colours)
        return images, errors, colours


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, inputs, within: list[nn.Module] | None = None) -> None:
    """Replace the running statistics of every BatchNorm layer (of the modules `within`, else all) by the mean of
    those of the batches `inputs` yields (model inputs, already preprocessed), as torch.optim.swa_utils.update_bn
    does; the other layers keep theirs. The model's mode is restored.

    Used for averaged weights (SWA, on augmented training batches) and for a new site's images (AdaBN).
    """
    every = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    chosen = {id(m) for part in (within or [model]) for m in part.modules()}
    layers = [m for m in every if id(m) in chosen]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative mean over the batches, each batch weighing the same
    was_training = model.training
    model.train()
    for m in every:
        if id(m) not in chosen:
            m.eval()  # the others neither update their statistics nor normalise by the batch's
    for x in inputs:
        model(x)
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    model.train(was_training)


def load_predictor(ckpt: dict, device: torch.device, autocast: torch.dtype | None = None) -> Predictor:
    """The Predictor a best.pt describes (its members, and whether it averages test-time views), on `device`."""
    models, prep = load_models(ckpt, device)
    return Predictor(models, prep, device, tta=bool(ckpt.get("tta", False)), autocast=autocast)


def load_models(ckpt: dict, device: torch.device) -> tuple[list[Network], Preprocess]:
    """Rebuild the members (in eval mode, on `device`) and the preprocessing a best.pt describes.

    A format-1 checkpoint holds one "model": an ensemble of one; a model_config without "arch" is the custom CNN.
    """
    try:
        models = []
        for weights in ckpt["members"] if "members" in ckpt else [ckpt["model"]]:
            model = build(ckpt["model_config"])
            model.load_state_dict(weights)
            models.append(place(model, device).eval())
        prep = Preprocess.from_state(ckpt["preprocess"])
    except ValueError as err:  # an architecture this version does not know
        raise runs.RunError(f"the checkpoint cannot be rebuilt: {err}") from None
    except (KeyError, TypeError, RuntimeError) as err:
        raise runs.RunError(f"the checkpoint does not fit this model ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:160]}); it was made by another model config or version of "
                            f"this project") from None
    return models, prep
