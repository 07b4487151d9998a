"""The networks, and the contract every one of them keeps. Usage: `model = build({"arch": "cnn"})`.

What the rest of the project may ask of a network is written once, in `Network`: Grad-CAM explains
`cam_layer`; the out-of-distribution distance uses the features `forward_features` returns; site
calibration re-estimates the BatchNorm statistics of the `adaptable` blocks only; export rebuilds the
output from `trunk` and the linear layer that ends `head`; the checkpoint stores `config`, from which
`build` makes the same network again. Grad-CAM's randomisation test re-initialises the top-level
children (`stem`, the blocks, `head`) from the top down.
"""
import torch
from torch import nn


class Network(nn.Module):
    """The contract: a stem and blocks that end at `cam_layer` (`trunk`), then pooling and a linear `head`.

    `outputs` is 1 (the pneumonia logit) or 3 (normal, bacterial, viral logits, for --task cause).
    """

    outputs: int
    config: dict  # build(config) makes this network again; "arch" names it
    title: str  # what it is, in a few words, for the model card
    # AdaBN re-estimates only the early blocks' statistics: acquisition (exposure, contrast, framing) shows there,
    # while the deeper blocks' statistics also carry the sample's class mix (benchmarks/site_calibration.py)
    adaptable: tuple[str, ...] = ("stem", "block1")
    head: nn.Sequential  # AdaptiveAvgPool2d, Flatten, Dropout, Linear

    @property
    def cam_layer(self) -> nn.Module:
        """The block Grad-CAM explains: the last convolutional block, before pooling."""
        raise NotImplementedError

    @property
    def cam_layer_name(self) -> str:
        """`cam_layer`'s attribute path in this network ("block3", "layer4"), for what export and reports say."""
        return next(name for name, module in self.named_modules() if module is self.cam_layer)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the head: the activations of `cam_layer` (N x D x h x w)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and the penultimate features (`cam_layer` pooled over space, N x D) in one pass."""
        pool, flatten, dropout, linear = self.head
        features = flatten(pool(self.trunk(x)))
        logits = linear(dropout(features))
        return (logits.squeeze(1) if self.outputs == 1 else logits), features


def conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> list[nn.Module]:
    """A 3x3 convolution, batch norm and ReLU (no conv bias: batch norm supplies it)."""
    return [nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


def pooled_head(features: int, outputs: int, dropout: float) -> nn.Sequential:
    """Global average pooling, dropout and the linear layer that gives the logits."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(features, outputs))


class PneumoniaCNN(Network):
    """The default: a strided stem, then one single-conv and two double-conv blocks, global pooling, a linear head.

    The stem halves 128 px to 64 px at once: on a CPU the full-resolution layers cost the most and
    add the least for a whole-lung finding. The last block runs at 1/8 of the input (16x16 for 128 px)
    and is `cam_layer`, so Grad-CAM maps keep a usable resolution.
    """

    title = "the custom CNN (a strided stem and three convolutional blocks)"

    def __init__(self, widths: tuple[int, int, int] = (24, 48, 96), stem: int = 16, dropout: float = 0.2,
                 in_channels: int = 1, outputs: int = 1):
        super().__init__()
        w1, w2, w3 = widths
        self.outputs = outputs
        self.config = {"arch": "cnn", "widths": list(widths), "stem": stem, "dropout": dropout,
                       "in_channels": in_channels, "outputs": outputs}
        self.stem = nn.Sequential(*conv_bn_relu(in_channels, stem, stride=2))
        self.block1 = nn.Sequential(*conv_bn_relu(stem, w1), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(*conv_bn_relu(w1, w2), *conv_bn_relu(w2, w2), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(*conv_bn_relu(w2, w3), *conv_bn_relu(w3, w3))
        self.head = pooled_head(w3, outputs, dropout)

    @property
    def cam_layer(self) -> nn.Module:
        return self.block3

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.block3(self.block2(self.block1(self.stem(x))))


class ResNet18(Network):
    """torchvision's ResNet-18, from scratch (no weights are ever downloaded), with a one-channel stem.

    The baseline most papers and MedMNIST report. Its last stage runs at 1/32 of the input (4x4 for 128 px),
    so its Grad-CAM maps are coarse. About 7x the default's compute per image.
    """

    title = "torchvision's ResNet-18 with a one-channel stem, no pretrained weights"

    def __init__(self, dropout: float = 0.0, in_channels: int = 1, outputs: int = 1):
        super().__init__()
        from torchvision.models import resnet18  # here, not at the top: parsing flags never loads torchvision

        net = resnet18(weights=None, num_classes=outputs)
        conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits its own
        self.outputs = outputs
        self.config = {"arch": "resnet18", "dropout": dropout, "in_channels": in_channels, "outputs": outputs}
        self.stem = nn.Sequential(conv1, net.bn1, net.relu, net.maxpool)
        self.block1, self.block2, self.block3, self.block4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.head = pooled_head(net.fc.in_features, outputs, dropout)

    @property
    def cam_layer(self) -> nn.Module:
        return self.block4

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.block4(self.block3(self.block2(self.block1(self.stem(x)))))


ARCHITECTURES = {"cnn": PneumoniaCNN, "resnet18": ResNet18}


def build(config: dict) -> Network:
    """The network `config` describes, freshly initialised; a config without "arch" (a checkpoint made before
    there was a choice) is the custom CNN."""
    arch = config.get("arch", "cnn")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture '{arch}': this version builds {' or '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**{k: v for k, v in config.items() if k != "arch"})


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last, the faster layout for these convolutions, except on MPS where it is not supported."""
    return torch.contiguous_format if device.type == "mps" else torch.channels_last


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on `device` in the memory layout its inputs get there (`memory_format`)."""
    return model.to(device, memory_format=memory_format(device))


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
