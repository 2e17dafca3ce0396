"""The VSE∞ model: the two towers and their forward pass (:mod:`.vse`), checkpoints on disk
(:mod:`.checkpoint`: safetensors + config.json, written atomically) and conversion of the authors'
released weights (:mod:`.convert`). The towers' parts live in :mod:`vseinf.encoders` (CNNs, text
transformers, heads) and :mod:`vseinf.pooling` (GPO)."""

from .vse import (
    BUNDLED_DIR,
    BUNDLED_MODELS,
    DEFAULT_BUNDLED,
    TextOnlyVSEModel,
    VSEModel,
    build_model,
    bundled_name,
    checkpoint_path,
    load_model,
    save_model,
)

__all__ = ["BUNDLED_DIR", "BUNDLED_MODELS", "DEFAULT_BUNDLED", "TextOnlyVSEModel", "VSEModel", "build_model",
           "bundled_name", "checkpoint_path", "load_model", "save_model"]
