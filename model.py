"""The custom CNN: grayscale in, one pneumonia logit out (or three class logits). Usage: `model = PneumoniaCNN()`."""
import torch
from torch import nn


def conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> list[nn.Module]:
    """A 3x3 convolution, batch norm and ReLU (no conv bias: batch norm supplies it)."""
    return [nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


class PneumoniaCNN(nn.Module):
    """A strided stem, then one single-conv and two double-conv blocks, global pooling and a linear head.

    The stem halves 160 px to 80 px at once: on a CPU the full-resolution layers cost the most and
    add the least for a whole-lung finding. The last block runs at 1/8 of the input (20x20 for 160 px)
    and is `cam_layer`, so Grad-CAM maps keep a usable resolution.
    """

    def __init__(self, widths: tuple[int, int, int] = (24, 48, 96), stem: int = 16, dropout: float = 0.2,
                 in_channels: int = 1, outputs: int = 1):
        super().__init__()
        w1, w2, w3 = widths
        self.outputs = outputs  # 1: the pneumonia logit; 3: normal, bacterial, viral logits (--task cause)
        self.config = {"widths": list(widths), "stem": stem, "dropout": dropout, "in_channels": in_channels,
                       "outputs": outputs}
        self.stem = nn.Sequential(*conv_bn_relu(in_channels, stem, stride=2))
        self.block1 = nn.Sequential(*conv_bn_relu(stem, w1), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(*conv_bn_relu(w1, w2), *conv_bn_relu(w2, w2), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(*conv_bn_relu(w2, w3), *conv_bn_relu(w3, w3))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(w3, outputs))

    @property
    def cam_layer(self) -> nn.Module:
        """The block Grad-CAM explains: the last convolutional block, before pooling."""
        return self.block3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the head: the activations of `cam_layer` (N x widths[2] x S/8 x S/8)."""
        return self.block3(self.block2(self.block1(self.stem(x))))

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and the penultimate features (block3 pooled over space, N x widths[2]) in one pass."""
        pool, flatten, dropout, linear = self.head
        features = flatten(pool(self.trunk(x)))
        logits = linear(dropout(features))
        return (logits.squeeze(1) if self.outputs == 1 else logits), features


def count_flops(model: nn.Module, image_size: int) -> int:
    """Multiply-accumulates of one forward pass on a 1 x image_size x image_size input."""
    macs = 0

    def hook(module, inputs, output):
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            macs += output.numel() * k
        elif isinstance(module, nn.Linear):
            macs += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        model(torch.zeros(1, first.in_channels, image_size, image_size, device=next(model.parameters()).device))
    model.train(was_training)
    for h in handles:
        h.remove()
    return macs
