"""Three modern CNNs, written here from their published architecture tables (torchvision
cannot be installed beside torch 2.13.0 on these machines): each mirrors torchvision's
layer structure (module order, kernel sizes, strides, channel counts, where batch norm,
activations, squeeze-and-excitation and channel shuffles sit), so that a model built
from these classes traces to the same graph as torchvision's. The code is our own.

* :class:`MobileNetV3Small` (Howard et al., "Searching for MobileNetV3", 2019, table 2;
  torchvision ``mobilenet_v3_small``): inverted residuals with hardswish/ReLU,
  squeeze-and-excitation gates ``x * hardsigmoid(fc2(relu(fc1(pool(x)))))`` with
  ``make_divisible(expanded / 4, 8)`` squeeze channels.
* :class:`SqueezeNet11` (Iandola et al., 2016, version 1.1 of the reference code;
  torchvision ``squeezenet1_1``): Fire modules (squeeze 1x1, expand 1x1 and 3x3,
  concatenated) between ``MaxPool2d(3, 2, ceil_mode=True)``.
* :class:`ShuffleNetV2` (Ma et al., "ShuffleNet V2", 2018, table 5; torchvision
  ``shufflenet_v2_x0_5`` by default): units that split the channels in two (``chunk``),
  run one half through 1x1 -> depthwise 3x3 -> 1x1, concatenate and shuffle the channels
  (``view -> transpose -> view``), and a global mean.
* :class:`ResNet18` (He et al., "Deep Residual Learning", 2016, table 1; torchvision
  ``resnet18``): 7x7 stride-2 stem, 3x3 stride-2 max pool, four stages of two basic
  blocks (64, 128, 256, 512 channels; 1x1 stride-2 projection shortcuts), global average
  pooling and a linear classifier.
* :class:`MobileNetV2` (Sandler et al., "MobileNetV2", 2018, table 2; torchvision
  ``mobilenet_v2``, any ``width_mult``): ReLU6 inverted residuals with linear
  bottlenecks, a 1280-channel 1x1 convolution, global average pooling.
* :class:`VGGSmall`: the first two blocks of VGG-16 with batch norm (Simonyan and
  Zisserman, 2015, configuration D; torchvision ``vgg16_bn``'s ``features[:14]``:
  64, 64, max pool, 128, 128, max pool), then torchvision's adaptive average pool (to
  2x2 here, not 7x7, for 32x32 inputs) and its three-layer classifier at 512 units.

Initialization follows torchvision for the last three (Kaiming normal, fan-out, for
convolutions; ``N(0, 0.01)`` for MobileNetV2's and VGG's linear layers) and for
SqueezeNet; :func:`digits_images` gives them structured inputs (scikit-learn's 8x8
digits, upscaled 4x to 32x32, three channels, standardized).

Weights are random; :func:`gather_batch_norm_statistics` runs data through the model in
training mode so that every batch norm holds real statistics, as a trained model's do.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = [
    "MobileNetV3Small",
    "SqueezeNet11",
    "ShuffleNetV2",
    "ResNet18",
    "MobileNetV2",
    "VGGSmall",
    "ZOO",
    "build",
    "digits_images",
    "gather_batch_norm_statistics",
]


def make_divisible(value: float, divisor: int = 8) -> int:
    """The nearest multiple of ``divisor`` to ``value``, not below 90% of it (the rule
    MobileNet's channel counts follow)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn(c_in: int, c_out: int, k: int, stride: int, groups: int, act: type | None):
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- MobileNetV3


class SqueezeExcitation(nn.Module):
    """``x * hardsigmoid(fc2(relu(fc1(avg_pool(x)))))``, the fc layers 1x1 convolutions."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.relu(self.fc1(self.avgpool(x)))))
        return x * scale


class InvertedResidual(nn.Module):
    """Expand 1x1 (when widening) -> depthwise k x k -> [squeeze-and-excitation] ->
    project 1x1 (no activation), with the input added when the shapes agree."""

    def __init__(
        self, c_in: int, k: int, expanded: int, c_out: int, se: bool, act: type, stride: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if expanded != c_in:
            layers.append(_conv_bn(c_in, expanded, 1, 1, 1, act))
        layers.append(_conv_bn(expanded, expanded, k, stride, expanded, act))
        if se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4, 8)))
        layers.append(_conv_bn(expanded, c_out, 1, 1, 1, None))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        return result + x if self.use_res_connect else result


#: MobileNetV3-Small's blocks: kernel, expanded channels, output channels, SE,
#: activation (RE: ReLU, HS: hardswish), stride.
MOBILENET_V3_SMALL = (
    (3, 16, 16, True, "RE", 2),
    (3, 72, 24, False, "RE", 2),
    (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2),
    (5, 240, 40, True, "HS", 1),
    (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1),
    (5, 144, 48, True, "HS", 1),
    (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1),
    (5, 576, 96, True, "HS", 1),
)


class MobileNetV3Small(nn.Module):
    """MobileNetV3-Small: a 3x3 stride-2 hardswish stem, the eleven blocks of
    :data:`MOBILENET_V3_SMALL`, a 1x1 convolution to 576 channels, global average
    pooling and a hardswish classifier (1024 hidden units)."""

    def __init__(self, num_classes: int = 10, blocks: int = len(MOBILENET_V3_SMALL)) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 16, 3, 2, 1, nn.Hardswish)]
        c_in = 16
        for k, expanded, c_out, se, act, stride in MOBILENET_V3_SMALL[:blocks]:
            activation = nn.ReLU if act == "RE" else nn.Hardswish
            layers.append(InvertedResidual(c_in, k, expanded, c_out, se, activation, stride))
            c_in = c_out
        last = 6 * c_in
        layers.append(_conv_bn(c_in, last, 1, 1, 1, nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(last, 1024), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1024, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


# --------------------------------------------------------------------------- SqueezeNet 1.1


class Fire(nn.Module):
    """Squeeze 1x1 + ReLU, then expand 1x1 + ReLU and expand 3x3 + ReLU, concatenated."""

    def __init__(self, c_in: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(c_in, squeeze, 1)
        self.squeeze_activation = nn.ReLU()
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand1x1_activation = nn.ReLU()
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat(
            [
                self.expand1x1_activation(self.expand1x1(x)),
                self.expand3x3_activation(self.expand3x3(x)),
            ],
            1,
        )


class SqueezeNet11(nn.Module):
    """SqueezeNet 1.1: a 3x3 stride-2 stem, eight Fire modules between three
    ``MaxPool2d(3, 2, ceil_mode=True)``, and a 1x1 convolution classifier + ReLU +
    global average pooling."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(64, 16, 64, 64),
            Fire(128, 16, 64, 64),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(128, 32, 128, 128),
            Fire(256, 32, 128, 128),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(256, 48, 192, 192),
            Fire(384, 48, 192, 192),
            Fire(384, 64, 256, 256),
            Fire(512, 64, 256, 256),
        )
        final = nn.Conv2d(512, num_classes, 1)
        self.classifier = nn.Sequential(nn.Dropout(0.5), final, nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        # NOTE: torchvision's initialization (with torch's default one, the random
        # network's output hardly depends on its input).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


# --------------------------------------------------------------------------- ShuffleNetV2


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups (``view -> transpose -> view``)."""
    n, c, h, w = x.size(0), x.size(1), x.size(2), x.size(3)
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: stride 1 splits the channels (``chunk``) and transforms one
    half; stride 2 transforms the input twice (depthwise 3x3 -> 1x1 on one branch); the
    halves are concatenated and shuffled."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch = c_out // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                _conv_bn(c_in, c_in, 3, stride, c_in, None),
                _conv_bn(c_in, branch, 1, 1, 1, nn.ReLU),
            )
        else:
            self.branch1 = nn.Sequential()
        first = c_in if stride > 1 else branch
        self.branch2 = nn.Sequential(
            _conv_bn(first, branch, 1, 1, 1, nn.ReLU),
            _conv_bn(branch, branch, 3, stride, branch, None),
            _conv_bn(branch, branch, 1, 1, 1, nn.ReLU),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 (x0.5 by default: stages of 48, 96 and 192 channels, repeated 4, 8
    and 4 times): 3x3 stride-2 stem + ReLU, 3x3 stride-2 max pool, the stages (each
    starting with a stride-2 unit), a 1x1 convolution to 1024 channels, a global mean and
    a linear classifier."""

    def __init__(
        self,
        num_classes: int = 10,
        channels: tuple[int, ...] = (24, 48, 96, 192, 1024),
        repeats: tuple[int, ...] = (4, 8, 4),
    ) -> None:
        super().__init__()
        self.conv1 = _conv_bn(3, channels[0], 3, 2, 1, nn.ReLU)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = channels[0]
        stages = []
        for n, c_out in zip(repeats, channels[1:-1], strict=True):
            units = [ShuffleUnit(c_in, c_out, 2)] + [
                ShuffleUnit(c_out, c_out, 1) for _ in range(n - 1)
            ]
            stages.append(nn.Sequential(*units))
            c_in = c_out
        self.stage2, self.stage3, self.stage4 = stages
        self.conv5 = _conv_bn(c_in, channels[-1], 1, 1, 1, nn.ReLU)
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage4(self.stage3(self.stage2(x))))
        return self.fc(x.mean([2, 3]))


# --------------------------------------------------------------------------- ResNet-18


def _torchvision_init(model: nn.Module, linear_std: float | None) -> None:
    """torchvision's initialization: Kaiming normal (fan-out, ReLU) convolutions with
    zero biases, unit/zero batch norms, and ``N(0, linear_std)`` linear layers with zero
    biases (``None``: torch's default, as torchvision's ResNet keeps)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """ResNet's basic block: 3x3 conv-BN-ReLU, 3x3 conv-BN, plus the input (through a
    1x1 stride-``stride`` conv-BN when the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 (torchvision's ``resnet18`` layer for layer, ``num_classes`` outputs)."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (64, 128, 256, 512)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, c_in = [], widths[0]
        for i, c_out in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        _torchvision_init(self, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------- MobileNetV2

#: MobileNetV2's bottleneck stages: expansion t, output channels c, repeats n, stride s.
MOBILENET_V2 = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidualV2(nn.Module):
    """[1x1 expand-BN-ReLU6] -> 3x3 depthwise-BN-ReLU6 -> 1x1 project-BN (linear), plus
    the input when the stride is 1 and the channels agree."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = int(round(c_in * expand))
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(c_in, hidden, 1, 1, 1, nn.ReLU6))
        layers.append(_conv_bn(hidden, hidden, 3, stride, hidden, nn.ReLU6))
        layers.append(_conv_bn(hidden, c_out, 1, 1, 1, None))
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (torchvision's ``mobilenet_v2(width_mult=...)``): 3x3 stride-2
    ReLU6 stem, the stages of :data:`MOBILENET_V2`, a 1x1 convolution to
    ``1280 * max(1, width_mult)`` channels, global average pooling, dropout, linear."""

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0) -> None:
        super().__init__()
        c_in = make_divisible(32 * width_mult, 8)
        last = make_divisible(1280 * max(1.0, width_mult), 8)
        layers: list[nn.Module] = [_conv_bn(3, c_in, 3, 2, 1, nn.ReLU6)]
        for t, c, n, s in MOBILENET_V2:
            c_out = make_divisible(c * width_mult, 8)
            for i in range(n):
                layers.append(InvertedResidualV2(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        layers.append(_conv_bn(c_in, last, 1, 1, 1, nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))
        _torchvision_init(self, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class MobileNetV2Quarter(MobileNetV2):
    """MobileNetV2 at ``width_mult=0.25``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes, width_mult=0.25)


# --------------------------------------------------------------------------- VGG


class VGGSmall(nn.Module):
    """VGG-16-BN's first two blocks (3x3 conv-BN-ReLU x2, 2x2 max pool, at 64 and 128
    channels), an adaptive average pool to ``pooled x pooled`` and torchvision's
    classifier (linear-ReLU-dropout twice, then linear) at ``hidden`` units."""

    def __init__(self, num_classes: int = 10, hidden: int = 512, pooled: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in (64, 64, "M", 128, 128, "M"):
            if c_out == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(pooled)
        self.classifier = nn.Sequential(
            nn.Linear(c_in * pooled * pooled, hidden),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(hidden, num_classes),
        )
        _torchvision_init(self, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


ZOO = {
    "mobilenet_v3_small": MobileNetV3Small,
    "squeezenet1_1": SqueezeNet11,
    "shufflenet_v2_x0_5": ShuffleNetV2,
    "resnet18": ResNet18,
    "mobilenet_v2": MobileNetV2,
    "mobilenet_v2_x0_25": MobileNetV2Quarter,
    "vgg_small_bn": VGGSmall,
}
#: The deep networks of issue 14 (``benchmarks/deep_nets.py``).
DEEP = ("resnet18", "mobilenet_v2", "mobilenet_v2_x0_25", "vgg_small_bn")


def gather_batch_norm_statistics(model: nn.Module, x: torch.Tensor, passes: int = 3) -> None:
    """Run ``x`` through ``model`` in training mode (no gradients) so that every batch
    norm's running mean and variance are the data's, then switch to eval mode."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the passes
            m.reset_running_stats()
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(x)
    model.eval()


def digits_images(start: int, count: int, size: int = 32) -> np.ndarray:
    """scikit-learn's 8x8 digits ``start .. start + count``, upscaled to ``size x size``
    (nearest neighbour), on three identical channels, standardized with the whole
    set's mean and deviation: ``(count, 3, size, size)`` float64."""
    from sklearn.datasets import load_digits

    images = load_digits().images
    images = (images - images.mean()) / images.std()
    chosen = images[start : start + count]
    if len(chosen) < count:
        raise ValueError(f"digits has {len(images)} images; asked for {start}..{start + count}")
    index = np.arange(size) * 8 // size
    upscaled = chosen[:, index][:, :, index]
    return np.repeat(upscaled[:, None], 3, axis=1)


def build(
    name: str, seed: int = 0, n_data: int = 64, size: int = 32, data: str = "noise"
) -> tuple[nn.Module, np.ndarray]:
    """A zoo model with random weights and batch-norm statistics from ``n_data`` images,
    and those images (``(n_data, 3, size, size)`` float64): seeded normal noise
    (``data="noise"``) or the first digits (``data="digits"``, :func:`digits_images`)."""
    torch.manual_seed(seed)
    model = ZOO[name]()
    if data == "digits":
        x = digits_images(0, n_data, size)
    else:
        x = np.random.default_rng(seed).normal(size=(n_data, 3, size, size))
    gather_batch_norm_statistics(model, torch.as_tensor(x, dtype=torch.float32))
    return model, x
