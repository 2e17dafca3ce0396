"""Encoders: the towers that turn an image (or text) into a set of vectors and pool it into one
l2-normalised embedding. Image towers and CNN backbones live in ``image`` and ``cnn``."""

from .cnn import (
    BACKBONE_NAMES,
    Backbone,
    EfficientNetLite0,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    MobileNetV2,
    ResNet,
    build_backbone,
    bundled_weights_path,
    freeze_batchnorm,
    load_backbone_weights,
    read_state_dict,
    set_trainable,
)
from .image import GridHead, GridImageEncoder, RegionEncoder, RegionMLP

__all__ = [
    # cnn
    "BACKBONE_NAMES",
    "Backbone",
    "EfficientNetLite0",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "MobileNetV2",
    "ResNet",
    "build_backbone",
    "bundled_weights_path",
    "freeze_batchnorm",
    "load_backbone_weights",
    "read_state_dict",
    "set_trainable",
    # image
    "GridHead",
    "GridImageEncoder",
    "RegionEncoder",
    "RegionMLP",
]
