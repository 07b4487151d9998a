"""Inference, in one place: uint8 images in, logits and probabilities out; image files in, with their decode errors.

Usage: `predictor = Predictor([model], prep, device); prob, classes = predictor.predict(images)`.
Training's validation, the test split, every external set, `evaluate`, `predict` and Grad-CAM all
score through a Predictor. An ensemble scores the mean of its members' logits; with test-time
augmentation every member's logit is also averaged over a fixed set of zoom and aspect views.
"""
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import progress
import runs
from cache import ImageCache, load_images
from images import cache_size
from transforms import Preprocess

# (x, y) magnification of the centre view: the image as trained, zoomed out and in, wider and taller.
# Training jitters each axis by up to 1.25x, so these views stay inside what the model has seen.
TTA_VIEWS = ((1.0, 1.0), (0.9, 0.9), (1.1, 1.1), (1.1, 1 / 1.1), (1 / 1.1, 1.1))


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it, fp16 on older CUDA GPUs, none on the CPU (it is slower there)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last, the faster layout for these convolutions, except on MPS where it is not supported."""
    return torch.contiguous_format if device.type == "mps" else torch.channels_last


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

    @property
    def outputs(self) -> int:
        """1 for the pneumonia logit, 3 for a --task cause model."""
        return getattr(self.members[0], "outputs", 1)

    def model_input(self, images: torch.Tensor, zoom: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        """A uint8 N x 1 x S x S batch as the model takes it: the centre view (magnified by `zoom`), normalised."""
        x = self.prep.view(images.to(self.device, non_blocking=True), zoom)
        return x.contiguous(memory_format=memory_format(self.device))

    @torch.no_grad()
    def logits(self, images, show: bool = False) -> torch.Tensor:
        """The members' mean logit (over the TTA views too) per uint8 image, as float32 on the CPU.

        Every member scores in eval mode; each member's own mode is restored afterwards. `show`: progress.
        """
        modes = [m.training for m in self.members]
        for m in self.members:
            m.eval()
        dtype, views = amp_dtype(self.device), TTA_VIEWS if self.tta else TTA_VIEWS[:1]
        out = [torch.zeros((0,) if self.outputs == 1 else (0, self.outputs))]
        bar = progress.track(len(images), "scoring", "images", show)
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            inputs = [self.model_input(batch, zoom) for zoom in views]
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                out.append(torch.stack([m(x).float() for m in self.members for x in inputs]).mean(0).cpu())
            bar.update(len(batch))
        bar.close()
        for m, mode in zip(self.members, modes):
            m.train(mode)
        return torch.cat(out)

    def predict(self, images, show: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """P(pneumonia) per uint8 image, and the three class probabilities of a --task cause model (else None)."""
        return probabilities(self.logits(images, show))

    def predict_files(self, files: list[str], workers: int | None = None,
                      show: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[str | None]]:
        """Decode image files (as for training, on every core) and score them.

        Returns the decoded uint8 images (N x S x S), P(pneumonia) (NaN where unreadable), the class
        probabilities of a cause model (else None) and, per file, None or the reason it could not be read.
        """
        size = cache_size(self.prep.image_size)
        images, errors = load_images(files, size, ImageCache(None, size), workers, show)
        good = [i for i, e in enumerate(errors) if e is None]
        prob = np.full(len(files), np.nan)
        classes = np.full((len(files), self.outputs), np.nan) if self.outputs > 1 else None
        if good:
            prob[good], scored = self.predict(torch.from_numpy(images[good]).unsqueeze(1), show)
            if classes is not None:
                classes[good] = scored
        return images, prob, classes, errors


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, inputs) -> None:
    """Replace every BatchNorm layer's running statistics by the mean of those of the batches `inputs` yields
    (model inputs, already preprocessed), as torch.optim.swa_utils.update_bn does; the model's mode is restored.

    Used for averaged weights (SWA, on augmented training batches) and for a new site's images (AdaBN).
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative mean over the batches, each batch weighing the same
    was_training = model.training
    model.train()
    for x in inputs:
        model(x)
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    model.train(was_training)


def load_predictor(ckpt: dict, device: torch.device) -> Predictor:
    """The Predictor a best.pt describes (its members, and whether it averages test-time views), on `device`."""
    models, prep = runs.load_models(ckpt, device)
    return Predictor(models, prep, device, tta=bool(ckpt.get("tta", False)))
