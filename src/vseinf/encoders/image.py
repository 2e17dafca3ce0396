"""Image towers of VSE∞: a set of visual vectors → one l2-normalised embedding (docs/recipe.md §3).

- :class:`RegionEncoder` — precomputed region features (e.g. 36 × 2048 BUTD boxes):
  ``fc(x) + mlp(x)`` (a linear map plus a 2-layer MLP residual) → pooling → l2norm.
- :class:`GridHead` — a CNN feature map (or its cached, flattened form): h·w vectors → ``fc`` →
  pooling → l2norm.
- :class:`GridImageEncoder` — a CNN backbone (BatchNorm statistics frozen) followed by a GridHead,
  trained end to end on raw images.

Submodule names are the authors' (``fc``, ``mlp.layers``, ``mlp.bns``, ``gpool``; ``backbone``,
``image_encoder.fc``, ``image_encoder.gpool``) so their checkpoints' tensors line up name for name.

Size augmentation (dropping ~20% of the set elements, training mode only) lets the pooling see many
set sizes. RegionEncoder drops regions *before* the fc/MLP, as the authors' data loader does, so the
MLP's BatchNorm statistics are those of the kept regions; GridHead drops grid vectors after the fc
(the authors drop them after the CNN; the fc is per-vector, so the two orders are the same).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..pooling import build_pooling, check_set_batch, l2norm, size_augment, valid_mask
from .cnn import Backbone, build_backbone, freeze_batchnorm, fuse_conv_bn, set_trainable

__all__ = ["RegionMLP", "RegionEncoder", "GridHead", "GridImageEncoder", "InferenceGridTower"]


HEAD_INITS = ("default", "xavier")


def head_linear(in_dim: int, out_dim: int, init: str = "default") -> nn.Linear:
    """The head's Linear layer.

    ``init="default"`` keeps PyTorch's (Kaiming-uniform, a=√5: weights ~ U(±1/√in)); ``"xavier"``
    is the authors' image fc (Xavier-uniform weights, zero bias). On frozen MobileNetV2 grids the
    authors' init costs ~5 dev RSUM (README, "Closing the gap"): its weights are ~2.4× larger at
    in=1280, so the pooled embeddings start far from where the text side's start.
    """
    if init not in HEAD_INITS:
        raise ValueError(f"model.head_init: expected one of {', '.join(HEAD_INITS)}, got {init!r}")
    fc = nn.Linear(in_dim, out_dim)
    if init == "xavier":
        bound = math.sqrt(6.0) / math.sqrt(in_dim + out_dim)
        nn.init.uniform_(fc.weight, -bound, bound)
        nn.init.zeros_(fc.bias)
    return fc


def _check_sets(features: torch.Tensor, in_dim: int, who: str) -> None:
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"{who} expects features of shape B×N×{in_dim}, got {shape}")
    if features.shape[2] != in_dim:
        raise ValueError(f"{who} was built for {in_dim}-d features, got {features.shape[2]}-d "
                         f"(shape {tuple(features.shape)})")


class RegionMLP(nn.Module):
    """Two-layer MLP in → hidden → out with BatchNorm + ReLU between the layers.

    ``layers`` and ``bns`` mirror the authors' module: ``bns[1]`` (over the output) exists in their
    checkpoints but their forward never applies it, so it is kept for loading and left unused here.
    BatchNorm sees only the valid (non-padding) rows of the batch, so padding cannot shift its
    statistics in training mode.

    Args:
        in_dim: input feature size.
        hidden_dim: hidden size (the paper: embed_dim / 2).
        out_dim: output size.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.out_dim = out_dim
        self.layers = nn.ModuleList([nn.Linear(in_dim, hidden_dim), nn.Linear(hidden_dim, out_dim)])
        self.bns = nn.ModuleList([nn.BatchNorm1d(hidden_dim), nn.BatchNorm1d(out_dim)])

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """B × N × in features, B × N boolean validity mask → B × N × out (zeros at padding)."""
        rows = features[mask]  # M × in, the valid elements only
        hidden = F.relu(self.bns[0](self.layers[0](rows)))
        out = features.new_zeros(features.shape[0], features.shape[1], self.out_dim)
        out[mask] = self.layers[1](hidden).to(out.dtype)
        return out


class RegionEncoder(nn.Module):
    """Region-feature tower: ``fc(x) + mlp(x)`` → pooling → l2norm.

    Args:
        in_dim: region feature size (2048 for BUTD features).
        embed_dim: joint embedding size (the paper: 1024).
        pooling: pooling name for :func:`vseinf.pooling.build_pooling` ("gpo", "avg", "max", "kmax:K", …).
        size_augment: in training mode, drop regions at random (mode "region") before encoding.
        head_init: "default" (PyTorch's Linear init) or "xavier" (the authors'); see :func:`head_linear`.
    """

    def __init__(self, in_dim: int = 2048, embed_dim: int = 1024, pooling: str = "gpo", size_augment: bool = True,
                 head_init: str = "default"):
        super().__init__()
        if embed_dim % 2:
            raise ValueError(f"embed_dim must be even (the MLP's hidden size is embed_dim / 2), got {embed_dim}")
        self.in_dim = in_dim
        self.embed_dim = embed_dim
        self.size_augment = size_augment
        self.fc = head_linear(in_dim, embed_dim, head_init)
        self.mlp = RegionMLP(in_dim, embed_dim // 2, embed_dim)
        self.gpool = build_pooling(pooling, embed_dim)

    def forward(self, features: torch.Tensor, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode B × R × in_dim region sets with ``lengths`` valid regions each (None: all R).

        Returns (B × embed_dim unit-norm embeddings, B × R' pooling weights), R' <= R.
        """
        _check_sets(features, self.in_dim, "RegionEncoder")
        lengths = check_set_batch(features, lengths)
        if self.training and self.size_augment:
            features, lengths = size_augment(features, lengths, mode="region")
        mask = valid_mask(lengths, features.shape[1])
        # Padding rows are zeroed so that non-finite padding cannot leak through the fc.
        features = features.masked_fill(~mask.unsqueeze(2), 0.0)
        embedded = self.fc(features) + self.mlp(features, mask)
        pooled, weights = self.gpool(embedded, lengths)
        return l2norm(pooled, dim=-1), weights

    @property
    def head(self) -> "RegionEncoder":
        """The part that runs on precomputed sets: all of this tower (it has no backbone)."""
        return self


class GridHead(nn.Module):
    """Grid-feature head: h·w vectors of a CNN feature map → ``fc`` → pooling → l2norm.

    Args:
        in_dim: channels of the feature map (``backbone.out_channels``).
        embed_dim: joint embedding size (the paper: 1024).
        pooling: pooling name for :func:`vseinf.pooling.build_pooling`.
        size_augment: in training mode, drop grid vectors at random (mode "grid").
        head_init: "default" (PyTorch's Linear init) or "xavier" (the authors'); see :func:`head_linear`.
        mlp: add the region tower's 2-layer MLP residual (``fc(x) + mlp(x)``). The authors' grid
            checkpoints have no MLP (keys ``fc`` and ``gpool`` only), so it is off by default.
    """

    def __init__(self, in_dim: int, embed_dim: int = 1024, pooling: str = "gpo", size_augment: bool = True,
                 head_init: str = "default", mlp: bool = False):
        super().__init__()
        self.in_dim = in_dim
        self.embed_dim = embed_dim
        self.size_augment = size_augment
        self.fc = head_linear(in_dim, embed_dim, head_init)
        self.mlp = RegionMLP(in_dim, embed_dim // 2, embed_dim) if mlp else None
        self.gpool = build_pooling(pooling, embed_dim)

    @staticmethod
    def flatten(feature_map: torch.Tensor) -> torch.Tensor:
        """B × C × h × w → B × (h·w) × C, row-major over the grid."""
        return feature_map.flatten(2).transpose(1, 2)

    def forward(self, features: torch.Tensor, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a feature map (B × C × h × w) or flattened grids (B × N × C, with ``lengths``,
        e.g. from a feature cache; None: all N valid).

        Returns (B × embed_dim unit-norm embeddings, B × N' pooling weights), N' <= N.
        """
        if isinstance(features, torch.Tensor) and features.dim() == 4:
            if lengths is not None:
                raise ValueError("GridHead: lengths are only meaningful for flattened B×N×C grids, "
                                 "not for a B×C×h×w feature map")
            features = self.flatten(features)
        _check_sets(features, self.in_dim, "GridHead")
        lengths = check_set_batch(features, lengths)
        mask = valid_mask(lengths, features.shape[1])
        features = features.masked_fill(~mask.unsqueeze(2), 0.0)
        embedded = self.fc(features)
        if self.mlp is not None:
            embedded = embedded + self.mlp(features, mask)
        if self.training and self.size_augment:
            embedded, lengths = size_augment(embedded, lengths, mode="grid")
        pooled, weights = self.gpool(embedded, lengths)
        return l2norm(pooled, dim=-1), weights


class GridImageEncoder(nn.Module):
    """End-to-end grid tower: CNN backbone (BatchNorm statistics frozen) → :class:`GridHead`.

    Args:
        backbone_name: a name from :data:`vseinf.encoders.cnn.BACKBONE_NAMES`.
        weights: backbone weights: "default" (bundled, where a package provides them), None (random)
            or a path (see :func:`vseinf.encoders.cnn.build_backbone`).
        embed_dim: joint embedding size.
        pooling: pooling name for the head.
        size_augment: drop grid vectors at random in training mode.
        head_init: initialisation of the head's Linear layer (see :func:`head_linear`).
        mlp: the head's MLP residual (see :class:`GridHead`).

    Images are expected normalised with ``backbone.mean`` / ``backbone.std`` (``backbone.normalize``
    maps 0..1 RGB to that); the paper resizes them to 512 × 512 for training.
    """

    def __init__(self, backbone_name: str, weights: str | Path | None = "default", embed_dim: int = 1024,
                 pooling: str = "gpo", size_augment: bool = True, head_init: str = "default", mlp: bool = False):
        super().__init__()
        self.backbone: Backbone = freeze_batchnorm(build_backbone(backbone_name, weights))
        self.image_encoder = GridHead(self.backbone.out_channels, embed_dim, pooling, size_augment, head_init, mlp)

    @property
    def embed_dim(self) -> int:
        return self.image_encoder.embed_dim

    @property
    def head(self) -> GridHead:
        """The part after the CNN, which also runs on cached grids (``image_encoder``: the authors' name)."""
        return self.image_encoder

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's grid as a set: B × (h·w) × C (what a feature cache stores)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"GridImageEncoder expects images of shape B×3×H×W, got {shape}")
        return GridHead.flatten(self.backbone(images))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images B × 3 × H × W → (B × embed_dim unit-norm embeddings, pooling weights)."""
        return self.image_encoder(self.features(images))

    def for_inference(self) -> "InferenceGridTower":
        """A faster copy of this tower for embedding images (``vseinf encode``): BatchNorm folded
        into the convolutions and channels-last memory layout (see :class:`InferenceGridTower`)."""
        return InferenceGridTower(self)

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freeze (False) or unfreeze (True) the CNN's parameters; BN statistics stay frozen either way."""
        set_trainable(self.backbone, trainable)


class InferenceGridTower(nn.Module):
    """:class:`GridImageEncoder` for inference only, same call: images → (embeddings, weights).

    Two changes, each measured on a 2-core AVX2 CPU with MobileNetV2 (benchmarks/encode_speed.py):
    the backbone's BatchNorm layers are folded into its convolutions
    (:func:`~vseinf.encoders.cnn.fuse_conv_bn`: one pass less over every feature map), and the
    backbone runs in channels-last layout, which oneDNN's convolutions (the depthwise ones above
    all) run much faster than the default layout. Embeddings equal the tower's in eval mode up to
    float rounding (tests/test_image_encoders.py).

    A snapshot, always in eval mode: build a new one after the tower's weights change.

    Args:
        tower: the grid tower to copy.
    """

    def __init__(self, tower: GridImageEncoder):
        super().__init__()
        self.backbone = fuse_conv_bn(tower.backbone).to(memory_format=torch.channels_last)
        self.image_encoder = copy.deepcopy(tower.image_encoder).requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "InferenceGridTower":
        if mode:
            raise ValueError("InferenceGridTower is for inference only; train the GridImageEncoder")
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        return self.image_encoder.embed_dim

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images B × 3 × H × W → (B × embed_dim unit-norm embeddings, pooling weights)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"InferenceGridTower expects images of shape B×3×H×W, got {shape}")
        grid = self.backbone(images.contiguous(memory_format=torch.channels_last))
        return self.image_encoder(GridHead.flatten(grid))
