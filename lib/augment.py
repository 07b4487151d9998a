"""The training augmentation's settings, without torch, so that the command line parses before torch loads.

Usage: `Augment(rotation=10)`; transforms.Preprocess draws and applies them.
"""
from dataclasses import dataclass

PADDING = ("border", "reflection", "zeros")
# the side of a film's thumbnail at which its layout (framing, collimation, markers) survives and a pneumonia's
# texture does not: the shortcut audit's probe sees films at this side
LAYOUT_SIDE = 12
INTENSITY = ("dataset", "image")


@dataclass(kw_only=True)  # by name only: a field inserted later cannot shift the others
class Augment:
    """Training augmentation for acquisition shift; every value is drawn per image, uniformly in +-range.

    Geometry (rotation, per-axis zoom, which changes size and aspect ratio, translation) is one affine
    resampling of the whole batch; intensity (gamma, contrast, brightness, noise) follows in [0, 1].
    `padding` fills what the resampling pulls in from outside the stored image.
    """

    rotation: float = 15.0  # degrees
    zoom: float = 0.25  # each axis scaled by a factor in [1/(1+zoom), 1+zoom], log-uniform
    translate: float = 0.0  # extra shift, as a fraction of the side, beyond the random crop position
    gamma: float = 0.5  # x ** exp(u), u in +-gamma: keeps black and white, bends the grey levels
    contrast: float = 0.3  # (x - image mean) * (1 + u) + image mean
    brightness: float = 0.1  # + u, in [0, 1] grey units
    noise: float = 0.0  # std of added Gaussian noise, in [0, 1] grey units
    padding: str = "border"
    sharpness: float = 0.0  # x + u (3x3 box blur of x - x): u > 0 blurs, u < 0 sharpens

    @classmethod
    def plain(cls, rotation: float = 15.0) -> "Augment":
        """The original project's transform: rotation and crop position only, zero padding."""
        return cls(rotation=rotation, zoom=0.0, translate=0.0, gamma=0.0, contrast=0.0, brightness=0.0, noise=0.0,
                   padding="zeros", sharpness=0.0)
