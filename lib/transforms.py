"""Stored uint8 images to model input: centre crop, normalisation, and batched training augmentation.

Usage: `prep = Preprocess(128, mean, std); x = prep.train(batch, generator)` (or `prep.eval(batch)`).
"""
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F

from lib.augment import INTENSITY, PADDING, Augment  # noqa: F401 (Augment is part of this module's interface)

def centre_crop(images, size: int):
    """The centre size x size of the last two axes (numpy or torch): edges, markers and text cut off."""
    offset = (images.shape[-1] - size) // 2
    return images[..., offset:offset + size, offset:offset + size]


def _uniform(shape, generator: torch.Generator, bound: float) -> torch.Tensor:
    """Uniform draws in [-bound, bound] from the training generator (on the CPU, so runs are reproducible)."""
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


class _Draws:
    """Random draws for a batch of n images, of which only the rows `keep` (None: all) are used."""

    def __init__(self, generator: torch.Generator, n: int, keep: torch.Tensor | None):
        self.generator, self.n, self.keep = generator, n, keep

    def _kept(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.keep is None else values[self.keep]

    def uniform(self, shape, bound: float) -> torch.Tensor:
        return self._kept(_uniform(shape, self.generator, bound))

    def normal(self, shape) -> torch.Tensor:
        return self._kept(torch.randn(shape, generator=self.generator))


@dataclass
class Preprocess:
    """Turns stored uint8 images into model input: crop the edges to `image_size`, normalise.

    `intensity` 'dataset' normalises with the training split's mean and std; 'image' standardises
    each image by its own mean and std, the same in training and scoring. Training batches are
    also augmented (see Augment) in one batched pass.
    """

    image_size: int
    mean: float = 0.5
    std: float = 0.25
    augment: Augment = field(default_factory=Augment)
    intensity: str = "dataset"
    grey_range: tuple[float, float] | None = None  # lowest and highest mean grey level of the training images

    def grey_level(self, image: np.ndarray) -> float:
        """Mean grey level, in [0, 1], of the pixels the model sees of one stored uint8 image."""
        return float(centre_crop(image, self.image_size).mean() / 255.0)

    def crop(self, batch: torch.Tensor) -> torch.Tensor:
        """Centre crop of a uint8 N x 1 x S x S batch, as floats in [0, 1]: the pixels the model sees."""
        return centre_crop(batch, self.image_size).float() / 255.0

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Standardise [0, 1] images by the dataset statistics or by each image's own."""
        if self.intensity == "image":
            mean = x.mean((1, 2, 3), keepdim=True)
            return (x - mean) / x.std((1, 2, 3), keepdim=True).clamp_min(1e-3)
        return (x - self.mean) / self.std

    def eval(self, batch: torch.Tensor) -> torch.Tensor:
        """Centre crop and normalise a uint8 N x 1 x S x S batch."""
        return self.normalise(self.crop(batch))

    def view(self, batch: torch.Tensor, zoom: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        """The centre view of a uint8 batch magnified by (x, y) `zoom`, normalised; (1, 1) is `eval` exactly.

        The other views resample like training's zoom jitter (border padding), without its randomness.
        """
        if tuple(zoom) == (1.0, 1.0):
            return self.eval(batch)
        scale = self.image_size / batch.shape[-1]
        theta = torch.tensor([[scale / zoom[0], 0.0, 0.0], [0.0, scale / zoom[1], 0.0]], device=batch.device)
        grid = F.affine_grid(theta.expand(len(batch), 2, 3), [len(batch), 1, self.image_size, self.image_size],
                             align_corners=False)
        x = F.grid_sample(batch.float() / 255.0, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return self.normalise(x)

    def train(self, batch: torch.Tensor, generator: torch.Generator, of: int | None = None,
              keep: torch.Tensor | None = None) -> torch.Tensor:
        """Augment (geometry, then intensity) and normalise a uint8 batch.

        Draws only what the settings use, in a fixed order, so `Augment.plain()` reproduces the
        original rotation-and-crop transform draw for draw. Under torchrun `batch` is one rank's share
        of a global batch of `of` images, at positions `keep`: every rank draws for the whole global
        batch and uses its share, so the generators stay equal on every rank, the shuffled order with
        them, and each image is augmented as a single process would have augmented it.
        """
        a, n, side = self.augment, of or batch.shape[0], batch.shape[-1]
        draw = _Draws(generator, n, keep)
        angle = torch.deg2rad(draw.uniform(n, a.rotation))
        # crop position plus extra translation; written as (u * pixels) / side to match the original rounding
        shift = draw.uniform((n, 2), 1.0) * (side - self.image_size + 2 * a.translate * side) / side
        zoom = torch.exp(draw.uniform((n, 2), math.log1p(a.zoom))) if a.zoom else torch.ones(len(batch), 2)
        scale = self.image_size / side  # the output grid covers image_size / zoom of the side pixels
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        zx, zy = zoom[:, 0], zoom[:, 1]
        theta = torch.stack([torch.stack([cos / zx, -sin / zy, shift[:, 0]], 1),
                             torch.stack([sin / zx, cos / zy, shift[:, 1]], 1)], 1).to(batch.device)
        grid = F.affine_grid(theta, [len(batch), 1, self.image_size, self.image_size], align_corners=False)
        x = F.grid_sample(batch.float() / 255.0, grid, mode="bilinear", padding_mode=a.padding, align_corners=False)
        return self.normalise(self._intensity(x, draw))

    def _intensity(self, x: torch.Tensor, draw: "_Draws") -> torch.Tensor:
        """Gamma, contrast, brightness, sharpness and noise per image, on [0, 1] images; the result stays in [0, 1]."""
        a, n, dev = self.augment, draw.n, x.device

        def per_image(bound):
            return draw.uniform(n, bound).view(-1, 1, 1, 1).to(dev)

        if a.gamma:
            x = x.clamp(0, 1) ** torch.exp(per_image(a.gamma))
        if a.contrast or a.brightness:
            mean = x.mean((1, 2, 3), keepdim=True)
            x = ((x - mean) * (1 + per_image(a.contrast)) + mean + per_image(a.brightness)).clamp(0, 1)
        if a.sharpness:
            blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
            x = (x + per_image(a.sharpness) * (blurred - x)).clamp(0, 1)
        if a.noise:
            x = (x + a.noise * draw.normal((n, *x.shape[1:])).to(dev)).clamp(0, 1)
        return x

    def state(self) -> dict:
        """Plain-type settings for a checkpoint."""
        return {"image_size": self.image_size, "mean": self.mean, "std": self.std,
                "augment": vars(self.augment).copy(), "intensity": self.intensity,
                "grey_range": list(self.grey_range) if self.grey_range else None}

    @classmethod
    def from_state(cls, state: dict) -> "Preprocess":
        """Rebuild from `state()`; checkpoints of format 1 stored only `max_rotation`. Augmentation settings that
        left the product (--framing, --layout-swap, ...: docs/generalisation.md) acted in training only, so a
        checkpoint that holds them scores as before without them; equalised input cannot be scored any more."""
        state = dict(state)
        if state.get("intensity", "dataset") not in INTENSITY:
            raise ValueError(f"this checkpoint normalises its input by '{state.get('intensity')}' (--intensity), "
                             f"which left the product after commit 0b2105c; score it with that commit")
        known = {f.name for f in fields(Augment)}
        augment = Augment(**{k: v for k, v in state.pop("augment").items() if k in known}) if "augment" in state \
            else Augment.plain(state.pop("max_rotation", 15.0))
        grey_range = state.pop("grey_range", None)  # absent before project 1.2
        return cls(**state, augment=augment, grey_range=tuple(grey_range) if grey_range else None)


def fit_normalisation(chunks: Iterable[np.ndarray], image_size: int) -> tuple[float, float, tuple[float, float]]:
    """Mean and std of the centre crops of the training images, in [0, 1] units, and the range of their grey levels.

    The images come in chunks (N x S x S uint8), so a training split larger than memory is read once,
    a chunk at a time. The range (lowest to highest mean grey level of any training image) is what
    predict calls in range.
    """
    mean, squares, count, per_image = 0.0, 0.0, 0, []
    for chunk in chunks:  # chunk statistics combined as Chan et al.'s parallel variance: no cancellation
        crop = centre_crop(chunk, image_size).astype(np.float64) / 255.0
        m = crop.mean()
        delta, total = m - mean, count + crop.size
        mean += delta * crop.size / total
        squares += np.square(crop - m).sum() + delta * delta * count * crop.size / total
        count = total
        per_image.append(crop.reshape(len(crop), -1).mean(1))
    per_image = np.concatenate(per_image)
    return float(mean), math.sqrt(squares / count), (float(per_image.min()), float(per_image.max()))
