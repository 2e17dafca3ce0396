"""Encoders: the towers that turn an image (or text) into a set of vectors and pool it into one
l2-normalised embedding. Image towers and CNN backbones live in ``image`` and ``cnn``, text towers
in ``text`` (and a transformers-free BERT for text queries in ``bert_lite``).

The names below are imported on first use, so importing one submodule (a text query needs only
``text``) does not import the CNN code too.
"""

import importlib

_CNN = (
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
    "fuse_conv_bn",
    "load_backbone_weights",
    "read_state_dict",
    "set_trainable",
)
_IMAGE = ("GridHead", "GridImageEncoder", "InferenceGridTower", "RegionEncoder", "RegionMLP")

__all__ = [*_CNN, *_IMAGE]


def __getattr__(name: str):
    if name in _CNN or name in _IMAGE:
        module = importlib.import_module(".cnn" if name in _CNN else ".image", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
