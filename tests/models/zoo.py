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
    "ZOO",
    "build",
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


ZOO = {
    "mobilenet_v3_small": MobileNetV3Small,
    "squeezenet1_1": SqueezeNet11,
    "shufflenet_v2_x0_5": ShuffleNetV2,
}


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


def build(
    name: str, seed: int = 0, n_data: int = 64, size: int = 32
) -> tuple[nn.Module, np.ndarray]:
    """A zoo model with random weights and batch-norm statistics from random images, and
    those images (``(n_data, 3, size, size)`` float64)."""
    torch.manual_seed(seed)
    model = ZOO[name]()
    x = np.random.default_rng(seed).normal(size=(n_data, 3, size, size))
    gather_batch_norm_statistics(model, torch.as_tensor(x, dtype=torch.float32))
    return model, x
