"""Stored uint8 images to model input: centre crop, normalisation, and batched training augmentation.

Usage: `prep = Preprocess(128, mean, std); x = prep.train(batch, generator)` (or `prep.eval(batch)`).
"""
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from augment import INTENSITY, LAYOUT_SIDE, PADDING, Augment  # noqa: F401 (Augment is part of this module's interface)

def centre_crop(images, size: int):
    """The centre size x size of the last two axes (numpy or torch): edges, markers and text cut off."""
    offset = (images.shape[-1] - size) // 2
    return images[..., offset:offset + size, offset:offset + size]


def _uniform(shape, generator: torch.Generator, bound: float) -> torch.Tensor:
    """Uniform draws in [-bound, bound] from the training generator (on the CPU, so runs are reproducible)."""
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def equalise(x: torch.Tensor, levels: int = 256) -> torch.Tensor:
    """Histogram equalisation of each [0, 1] image of an N x 1 x H x W batch: every pixel becomes the share of its
    image's pixels at or below its grey level (of `levels`). A monotone change of exposure or contrast leaves the
    result as it was. Written with scatter-add, cumulative sum and gather, so that it exports to ONNX."""
    q = (x.clamp(0, 1) * (levels - 1)).round().long().flatten(1)
    counts = torch.zeros(x.shape[0], levels, dtype=x.dtype, device=x.device).scatter_add_(1, q, torch.ones_like(
        q, dtype=x.dtype))
    cdf = counts.cumsum(1) / q.shape[1]
    return cdf.gather(1, q).view_as(x)


def erase_corners(x: torch.Tensor, draw: "_Draws", probability: float) -> torch.Tensor:
    """With `probability` per image, one corner's square (side 10-25% of the image's) filled with the image's mean:
    the side markers ("R", "L", a hospital's letters) that a model could read instead of the lungs."""
    side = x.shape[-1]
    chosen = draw.unit() < probability
    corner = (draw.unit() * 4).long().clamp(max=3)  # 0 top left, 1 top right, 2, 3 bottom
    size = ((draw.uniform(draw.n, 0.075) + 0.175) * side).round()
    pos = torch.arange(side, dtype=torch.float32)
    # distance from the chosen corner along each axis: inside the square where both are below its side
    dx = torch.where((corner % 2 == 1)[:, None], side - 1 - pos, pos)
    dy = torch.where((corner >= 2)[:, None], side - 1 - pos, pos)
    inside = (dy[:, :, None] < size[:, None, None]) & (dx[:, None, :] < size[:, None, None]) & chosen[:, None, None]
    inside = inside[:, None].to(x.device)
    return torch.where(inside, x.mean((1, 2, 3), keepdim=True).expand_as(x), x)


def swap_layout(x: torch.Tensor, draw: "_Draws", probability: float, side: int = LAYOUT_SIDE) -> torch.Tensor:
    """With `probability` per image, the image's coarse layout (its side x side average, bilinearly upsampled)
    replaced by that of another image of the same batch: x - low(x) + low(partner), kept in [0, 1].

    The partners form one random cycle through the images of this process's batch, chosen from draws made for the
    whole global batch, so that the generators stay equal on every rank; labels play no part in it."""
    chosen = (draw.unit() < probability).view(-1, 1, 1, 1).to(x.device)
    order = draw.uniform(draw.n, 0.5).argsort()
    partner = torch.empty_like(order)
    partner[order] = order.roll(1)
    low = F.interpolate(F.adaptive_avg_pool2d(x, side), size=x.shape[-2:], mode="bilinear", align_corners=False)
    swapped = (x - low + low[partner.to(x.device)]).clamp(0, 1)
    return torch.where(chosen, swapped, x)


class _Draws:
    """Random draws for a batch of n images, of which only the rows `keep` (None: all) are used."""

    def __init__(self, generator: torch.Generator, n: int, keep: torch.Tensor | None):
        self.generator, self.n, self.keep = generator, n, keep

    def _kept(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.keep is None else values[self.keep]

    def uniform(self, shape, bound: float) -> torch.Tensor:
        return self._kept(_uniform(shape, self.generator, bound))

    def unit(self) -> torch.Tensor:
        """One draw in [0, 1] per image."""
        return self.uniform(self.n, 0.5) + 0.5

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
        """Standardise [0, 1] images by the dataset statistics or by each image's own, or equalise each image's
        histogram (then every image is near uniform on [0, 1], whose mean and sd are 1/2 and 1/sqrt(12))."""
        if self.intensity == "image":
            mean = x.mean((1, 2, 3), keepdim=True)
            return (x - mean) / x.std((1, 2, 3), keepdim=True).clamp_min(1e-3)
        if self.intensity == "equalise":
            return (equalise(x) - 0.5) * math.sqrt(12)
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
              keep: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Augment (geometry, then intensity) and normalise a uint8 batch.

        Draws only what the settings use, in a fixed order, so `Augment.plain()` reproduces the
        original rotation-and-crop transform draw for draw. Under torchrun `batch` is one rank's share
        of a global batch of `of` images, at positions `keep`: every rank draws for the whole global
        batch and uses its share, so the generators stay equal on every rank, the shuffled order with
        them, and each image is augmented as a single process would have augmented it. `labels` (of `batch`; 0 is
        NORMAL) steer `counter_framing` and `cut_bottom`, which need them.
        """
        a, n, side = self.augment, of or batch.shape[0], batch.shape[-1]
        draw = _Draws(generator, n, keep)
        angle = torch.deg2rad(draw.uniform(n, a.rotation))
        # crop position plus extra translation; written as (u * pixels) / side to match the original rounding
        shift = draw.uniform((n, 2), 1.0) * (side - self.image_size + 2 * a.translate * side) / side
        zoom = torch.exp(draw.uniform((n, 2), math.log1p(a.zoom))) if a.zoom else torch.ones(len(batch), 2)
        if a.framing:  # drawn after the settings above, so that a run without it draws as before
            zoom = zoom * torch.exp(draw.uniform(n, math.log1p(a.framing)))[:, None]
        if a.counter_framing or a.cut_bottom:
            if labels is None:
                raise ValueError("counter_framing and cut_bottom need the labels of the batch")
            normal = labels.cpu() == 0

        def normals_magnified(bound: float) -> torch.Tensor:  # a factor in [1, 1+bound] for normals, 1 for the rest
            return torch.exp(torch.where(normal, draw.uniform(n, math.log1p(bound)).abs(), 0.0))

        if a.counter_framing:  # zoom > 1 magnifies: a tighter field
            zoom = zoom * normals_magnified(a.counter_framing)[:, None]
        if a.aspect:  # drawn only when set, so that a run without it draws as before
            half = torch.exp(draw.uniform(n, math.log1p(a.aspect)) / 2)
            zoom = zoom * torch.stack([half, 1 / half], 1)
        scale = self.image_size / side  # the output grid covers image_size / zoom of the side pixels
        if a.cut_bottom:  # the height magnified, the field moved up by what it lost: its top stays (before rotation)
            cut = normals_magnified(a.cut_bottom)
            shift = shift - torch.stack([torch.zeros(len(cut)), scale / zoom[:, 1] * (1 - 1 / cut)], 1)
            zoom = zoom * torch.stack([torch.ones(len(cut)), cut], 1)
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        zx, zy = zoom[:, 0], zoom[:, 1]
        theta = torch.stack([torch.stack([cos / zx, -sin / zy, shift[:, 0]], 1),
                             torch.stack([sin / zx, cos / zy, shift[:, 1]], 1)], 1).to(batch.device)
        grid = F.affine_grid(theta, [len(batch), 1, self.image_size, self.image_size], align_corners=False)
        x = F.grid_sample(batch.float() / 255.0, grid, mode="bilinear", padding_mode=a.padding, align_corners=False)
        x = self._intensity(x, draw)
        if a.layout_swap:  # drawn only when set, so that a run without it draws as before
            x = swap_layout(x, draw, a.layout_swap)
        return self.normalise(erase_corners(x, draw, a.erase_corners) if a.erase_corners else x)

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
        """Rebuild from `state()`; checkpoints of format 1 stored only `max_rotation`."""
        state = dict(state)
        augment = Augment(**state.pop("augment")) if "augment" in state else Augment.plain(state.pop("max_rotation",
                                                                                                     15.0))
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
