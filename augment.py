"""The training augmentation's settings, without torch, so that the command line parses before torch loads.

Usage: `Augment(rotation=10)`; transforms.Preprocess draws and applies them.
"""
from dataclasses import dataclass

PADDING = ("border", "reflection", "zeros")
# the side of a film's thumbnail at which its layout (framing, collimation, markers) survives and a pneumonia's
# texture does not: the shortcut audit's probe sees films at this side, and --layout-swap swaps layouts at it
LAYOUT_SIDE = 12
INTENSITY = ("dataset", "image", "equalise")


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
    # collimation: the field of view scaled as a whole by [1/(1+framing), 1+framing], log-uniform, on top of zoom,
    # so that lungs filling the frame (a tight field) and shoulders, arms and abdomen in view (a wide one) both
    # occur in each class
    framing: float = 0.0
    # against the training folder's confound: normals' fields only tightened, by [1, 1+counter_framing], log-uniform,
    # so that lungs filling the frame (as its early-period pneumonias are collimated) occur in normals too. Widening
    # the pneumonias as well was worse: the padding it pulls in marked them. Needs the labels, so training only
    counter_framing: float = 0.0
    # normals' fields cut at the bottom only: the height magnified by [1, 1+cut_bottom], log-uniform, the top edge
    # kept, so less of the abdomen shows, as in the training folder's pneumonias (docs/generalisation.md). Training only
    cut_bottom: float = 0.0
    # aspect ratio alone, the area kept: width x sqrt(r), height / sqrt(r), r in [1/(1+aspect), 1+aspect], log-uniform.
    # The training folder's pneumonia films are wider than its normals (median width/height 1.50 against 1.21,
    # benchmarks/aspect.py), and squashing every film to a square turns that into the chest's proportions
    aspect: float = 0.0
    erase_corners: float = 0.0  # probability that one corner's square (10-25% of the side), where markers sit, is
    # filled with the image's mean grey
    # probability that a film's coarse layout (its LAYOUT_SIDE x LAYOUT_SIDE average, smoothly upsampled) is replaced
    # by another film's of the batch, drawn whatever the labels: at that scale the layout then says nothing of the
    # label, while the film's own finer detail, where a pneumonia's texture is, stays
    layout_swap: float = 0.0

    @classmethod
    def plain(cls, rotation: float = 15.0) -> "Augment":
        """The original project's transform: rotation and crop position only, zero padding."""
        return cls(rotation=rotation, zoom=0.0, translate=0.0, gamma=0.0, contrast=0.0, brightness=0.0, noise=0.0,
                   padding="zeros", sharpness=0.0, framing=0.0, counter_framing=0.0, cut_bottom=0.0,
                   aspect=0.0, erase_corners=0.0, layout_swap=0.0)
