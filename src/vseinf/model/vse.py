"""The two-tower VSE∞ model, built from a :class:`~vseinf.config.ModelConfig`, and ``load_model``.

    >>> import vseinf
    >>> model = vseinf.load_model()                       # the bundled Flickr8k model
    >>> small = vseinf.load_model("flickr8k-effnet-minilm")  # the smaller bundled model, by name
    >>> img = model.encode_images(["photo.jpg"])          # n × d, unit norm
    >>> txt = model.encode_texts(["a dog on the beach"])  # m × d, unit norm
    >>> scores = img @ txt.T

Each tower is an optional backbone and a head: grid (CNN → fc → pooling), region/frames (no
backbone: precomputed sets → fc + MLP → pooling), text (transformer → linear → pooling, or BiGRU →
pooling). ``model(images, image_lengths, tokens, text_lengths)`` returns both embedding batches for
training; the input's shape says how far it has come: pixels and token ids run through the whole
tower, cached backbone outputs (and region/frame sets) through ``tower.head`` only. A checkpoint
stores only what training changed: pretrained backbones that stayed frozen are rebuilt from their
packages.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import ModelConfig, RunConfig, TrainConfig, config_from_dict
from ..encoders.bert_lite import lite_transformer_folder, load_lite_transformer
from ..encoders.text import (
    BERT_BASE_CONFIG,
    BiGRUTextEncoder,
    TransformerTextEncoder,
    Vocabulary,
    augment_tokens,
    default_transformer_path,
    pad_token_features,
    pad_token_ids,
)
from ..losses import DEFAULT_LOGIT_SCALE
from .checkpoint import CheckpointError, check_shapes, load_checkpoint, save_checkpoint, upgrade_state_dict

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
# The models shipped inside the package, by name (README, "The bundled models": how each was trained, its
# scores). ``load_model()`` and ``vseinf demo`` use DEFAULT_BUNDLED; every command that takes a
# checkpoint directory also takes one of these names.
BUNDLED_MODELS = {
    # gpo+max heads on EfficientNet-Lite0 grids, then MiniLM's layers fine-tuned with them (its
    # embeddings stay pretrained); 28 MB. Flickr8k dev RSUM 316.9.
    "flickr8k-effnet-minilm-ft": ASSETS_DIR / "flickr8k_effnet_minilm_ft",
    # the same heads' first stage alone: both backbones frozen (cached features); 7 MB, dev RSUM 311.2
    "flickr8k-effnet-minilm": ASSETS_DIR / "flickr8k_effnet_minilm",
}
DEFAULT_BUNDLED = "flickr8k-effnet-minilm-ft"
BUNDLED_DIR = BUNDLED_MODELS[DEFAULT_BUNDLED]
# The text transformer's token/position embeddings: left at their pretrained values (and not stored)
# when a run fine-tunes the transformer with train.text_train_embeddings off.
TEXT_EMBEDDINGS = "text.bert.embeddings."
VOCAB_KEY = "text.vocab"  # BiGRU vocabulary, stored in the config JSON
# model.text_model value meaning "BERT-base built from its config; its weights are in the checkpoint"
# (the authors' released models, imported by ``vseinf convert``: there is no BERT-base folder here).
BERT_BASE_FROM_CHECKPOINT = "bert-base-uncased-config"


class ImageEncoding(NamedTuple):
    """What :meth:`VSEModel.encode_images` returns with ``skip_unreadable=True``."""

    embeddings: torch.Tensor  # m × d, one row per readable image, in input order
    kept: list[int]  # the input positions of those rows
    skipped: list[tuple[int, str]]  # (input position, why it was skipped)


class VSEModel(nn.Module):
    """Image (or video) tower + text tower sharing one embedding space.

    Args:
        config: the model section of a run config.
        vocab: word list for the BiGRU text encoder (built from the training captions).
        pretrained: load pretrained backbone weights (False: random init, for tests/conversion).
        logit_scale: initial log inverse temperature, for a model trained with InfoNCE (it learns
            it: ``self.logit_scale``); None (the hinge loss): no temperature.
    """

    def __init__(self, config: ModelConfig, vocab: Sequence[str] | None = None, pretrained: bool = True,
                 logit_scale: float | None = None):
        super().__init__()
        from ..encoders.image import GridImageEncoder, RegionEncoder  # lazy: keeps the CNN out of a text search

        self.config = config
        if self.branches != len(config.text_pooling.split("+")):
            raise ValueError(f"model.image_pooling {config.image_pooling!r} and model.text_pooling "
                             f"{config.text_pooling!r} must have as many '+' branches (each image branch "
                             "is compared with the text branch in the same place)")
        kind = config.image_encoder
        if kind == "grid":
            weights = config.backbone_weights if pretrained else None
            if weights in ("none", ""):
                weights = None
            self.image = GridImageEncoder(config.backbone, weights, config.embed_dim, config.image_pooling,
                                          config.size_augment, config.head_init, config.grid_mlp)
        elif kind in ("region", "frames"):
            self.image = RegionEncoder(config.feature_dim, config.embed_dim, config.image_pooling,
                                       config.size_augment, config.head_init)
        else:
            raise ValueError(f"model.image_encoder: expected 'grid', 'region' or 'frames', got {kind!r}")

        self.vocab = None
        if config.text_encoder == "transformer":
            if pretrained and config.text_model != BERT_BASE_FROM_CHECKPOINT:
                self.text = TransformerTextEncoder(config.text_model or None, config.embed_dim, config.text_pooling,
                                                   gradient_checkpointing=config.gradient_checkpointing)
            else:
                self.text = TransformerTextEncoder.build_from_config(
                    _transformer_config(config.text_model), config.embed_dim, config.text_pooling)
        elif config.text_encoder == "bigru":
            self.vocab, self.text = _bigru_text_tower(config, vocab)
        else:
            raise ValueError(f"model.text_encoder: expected 'transformer' or 'bigru', got {config.text_encoder!r}")
        if logit_scale is None:
            self.register_parameter("logit_scale", None)
        else:
            self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))

    # -- properties ----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def branches(self) -> int:
        """K for a branched pooling ("gpo+max": 2), whose embeddings hold K unit slices; else 1."""
        return len(self.config.image_pooling.split("+"))

    @property
    def image_head(self) -> nn.Module:
        """The part of the image tower that runs on cached backbone features (or region/frame sets)."""
        return self.image.head

    # -- training forward ----------------------------------------------------------------------

    def forward(self, images: torch.Tensor, image_lengths: torch.Tensor | None, texts: torch.Tensor,
                text_lengths: torch.Tensor | None):
        """Both embedding batches of a training step (and the temperature the loss needs).

        Args:
            images: B × 3 × H × W normalised pixels, or B × N × C sets (cached CNN grids, region or
                frame features); see :meth:`embed_images`.
            image_lengths: (B,) valid set elements; None for pixels.
            texts: B' × L token ids, or B' × L × H cached transformer outputs; see :meth:`embed_texts`.
            text_lengths: (B',) valid tokens (None: the non-padding count of token ids).

        Returns:
            ``(image_emb, text_emb, logit_scale)``: B × d and B' × d unit vectors, and the learned
            log inverse temperature (None for a hinge-loss model). The temperature leaves through
            ``forward`` so that DistributedDataParallel sees every trained parameter used there.
        """
        return self.embed_images(images, image_lengths), self.embed_texts(texts, text_lengths), self.logit_scale

    def embed_images(self, images: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Unit embeddings (B × d) of pixels (B × 3 × H × W: backbone, then head) or of sets
        (B × N × C with ``lengths``: the head alone — cached grids of a frozen CNN, region or frame
        features)."""
        return self._embed_images(images, lengths)[0]

    def embed_texts(self, texts: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Unit embeddings (B × d) of token ids (B × L integers: the whole text tower) or of cached
        transformer outputs (B × L × H floats with ``lengths``: the head alone)."""
        return self._embed_texts(texts, lengths)[0]

    def _embed_images(self, images, lengths):
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            if lengths is not None:
                raise ValueError("image lengths are only meaningful for B×N×C sets, not for B×3×H×W pixels")
            return self.image(images)
        return self.image.head(images, lengths)

    def _embed_texts(self, texts, lengths):
        if isinstance(texts, torch.Tensor) and texts.is_floating_point():
            return self.text.head(texts, lengths)
        return self.text(texts, lengths)

    # (embeddings, pooling weights) pairs, for callers that also look at the pooling.

    def embed_image_features(self, features: torch.Tensor, lengths: torch.Tensor):
        """Grid vectors (from a cache) or region/frame sets (B × N × C) → (unit embeddings, weights)."""
        return self.image.head(features, lengths)

    def embed_text_features(self, features: torch.Tensor, lengths: torch.Tensor):
        """Frozen transformer token outputs (B × L × H, from a cache) → (unit embeddings, weights)."""
        return self.text.head(features, lengths)

    def embed_tokens(self, token_ids: torch.Tensor, lengths: torch.Tensor):
        """Token ids (B × L) through the live text tower → (unit embeddings, weights)."""
        return self.text(token_ids, lengths)

    def tokenize(self, texts: Sequence[str],
                 augment: random.Random | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions → padded token ids and lengths for :meth:`embed_texts`.

        Args:
            texts: captions.
            augment: for training, the random stream of the authors' caption augmentation (tokens
                masked, replaced or deleted; see :func:`vseinf.encoders.text.augment_tokens`).
        """
        if augment is None:
            if self.config.text_encoder == "transformer":
                return self.text.tokenize(list(texts), max_length=self.config.max_text_length)
            return pad_token_ids([self.vocab.encode(t) for t in texts], self.vocab.pad_id)
        if self.config.text_encoder == "transformer":
            enc = self.text
            seqs = [enc.encode_ids(t, self.config.max_text_length) for t in texts]
            special, mask_id, vocab_size = enc.special_ids, enc.mask_id, enc.vocab_size
        else:
            seqs = [self.vocab.encode(t) for t in texts]
            special, mask_id, vocab_size = self.vocab.special_ids, self.vocab.mask_id, len(self.vocab)
        seqs = [augment_tokens(s, mask_id, vocab_size, augment, special_ids=special) for s in seqs]
        return pad_token_ids(seqs, 0)

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freeze (False) or unfreeze (True) the CNN of a grid model; its BatchNorm statistics stay
        frozen either way. Models without a CNN have nothing to change."""
        if self.config.image_encoder == "grid":
            self.image.set_backbone_trainable(trainable)

    def set_text_embeddings_trainable(self, trainable: bool) -> None:
        """Freeze (False) or unfreeze (True) the text transformer's token and position embeddings."""
        for name, p in self.named_parameters():
            if name.startswith(TEXT_EMBEDDINGS):
                p.requires_grad_(trainable)

    # -- inference API ---------------------------------------------------------------------------

    def image_transform(self, train: bool = False):
        from ..data.images import ImageTransform  # lazy: keeps PIL out of a text search

        if self.config.image_encoder != "grid":
            raise ValueError("this model reads precomputed features, not images")
        backbone = self.image.backbone
        return ImageTransform(self.config.image_size, train=train, mean=backbone.mean, std=backbone.std)

    def iter_image_batches(self, images, batch_size: int = 32, *, skip_unreadable: bool = True,
                           workers: int | None = None, grid_features: bool = False, reference: bool = False):
        """The one loop that runs images through the model, a batch at a time: yields ``(outputs |
        None, kept positions, skipped as (position, reason))`` per batch of ``images``.

        Images go through the tower's inference copy
        (:meth:`~vseinf.encoders.image.GridImageEncoder.for_inference`: BatchNorm folded into the
        convolutions, channels-last; equal to the tower up to float rounding) while a thread
        decodes the next batch. :meth:`encode_images`, ``vseinf encode``, ``vseinf extract`` and
        evaluation on live images are built on it.

        Args:
            images: paths or PIL images.
            batch_size: images per forward pass.
            skip_unreadable: report unreadable files in ``skipped`` (else raise
                :class:`vseinf.data.BadImageError` naming the file).
            workers: processes decoding ahead (None: none on a CPU, up to 4 on a GPU).
            grid_features: yield the backbone's grid as sets (B × N × C, what a feature cache
                stores) instead of embeddings; computed by the tower itself (``tower.features``).
            reference: the plain path the fast one is held to (the model's own tower, images
                decoded between batches on this thread).
        """
        # lazy: a text-only model (a search's query tower) never loads PIL or the image pipeline
        from PIL import Image

        from ..data.images import default_decode_workers, iter_image_batches

        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        images = list(images)
        fast = not reference and not grid_features and hasattr(self.image, "for_inference")
        tower = self.image.for_inference() if fast else self.image
        workers = default_decode_workers(len(images), batch_size, self.device) if workers is None else max(0, workers)
        batches = iter_image_batches(images, self.image_transform(train=False), batch_size,
                                     skip_unreadable=skip_unreadable, workers=workers, read_ahead=fast,
                                     pin_memory=self.device.type == "cuda")
        was_training = self.training
        self.eval()
        try:
            for pixels, kept, skipped in batches:
                outputs = None
                if pixels is not None:
                    with torch.inference_mode() if fast else torch.no_grad():
                        pixels = pixels.to(self.device, non_blocking=True)
                        outputs = tower.features(pixels) if grid_features else tower(pixels)[0]
                yield outputs, kept, skipped
        finally:
            batches.close()  # stops the decoding thread now, also when the caller stops early
            self.train(was_training)

    def encode_images(self, images, batch_size: int = 32, *, skip_unreadable: bool = False,
                      workers: int | None = None, progress: bool = False, on_batch=None,
                      reference: bool = False):
        """Embed images given as paths or PIL images → (n × d) unit vectors on the model's device.

        Args:
            images: a path, a PIL image, or a sequence of them.
            batch_size: images per forward pass.
            skip_unreadable: skip files that are not readable images and return
                ``ImageEncoding(embeddings, kept, skipped)`` (kept: positions embedded, skipped:
                ``(position, reason)``); else such a file raises :class:`vseinf.data.BadImageError`.
            workers: processes decoding ahead (None: none on a CPU, up to 4 on a GPU).
            progress: show a progress bar (images).
            on_batch: called as ``on_batch(embeddings, kept positions)`` after every batch (e.g.
                to save progress).
            reference: the plain path the fast one is held to (see :meth:`iter_image_batches`).
        """
        if isinstance(images, (str, os.PathLike)) or type(images).__module__.startswith("PIL."):
            images = [images]  # one image (PIL is imported only where images are decoded)
        images = list(images)
        out, kept, skipped = [], [], []
        bar = tqdm(total=len(images), desc="images", unit="img", file=sys.stderr) if progress else None
        try:
            for emb, batch_kept, batch_skipped in self.iter_image_batches(
                    images, batch_size, skip_unreadable=skip_unreadable, workers=workers, reference=reference):
                skipped.extend(batch_skipped)
                if emb is not None:
                    out.append(emb)
                    kept.extend(batch_kept)
                    if on_batch is not None:
                        on_batch(emb, list(batch_kept))
                if bar is not None:
                    bar.update(len(batch_kept) + len(batch_skipped))
        finally:
            if bar is not None:
                bar.close()
        embeddings = torch.cat(out) if out else torch.zeros(0, self.embed_dim, device=self.device)
        if embeddings.is_inference():  # a normal tensor for the caller (inference tensors refuse autograd use)
            embeddings = embeddings.clone()
        return ImageEncoding(embeddings, kept, skipped) if skip_unreadable else embeddings

    @torch.no_grad()
    def encode_image_features(self, features: Sequence[torch.Tensor], batch_size: int = 128) -> torch.Tensor:
        """Embed precomputed sets (a list of N_i × C arrays: regions, grid vectors or video frames)."""
        was_training = self.training
        self.eval()
        out = []
        try:
            for start in range(0, len(features), batch_size):
                chunk = [torch.as_tensor(f, dtype=torch.float32) for f in features[start:start + batch_size]]
                padded, lengths = pad_token_features(chunk)
                out.append(self.embed_images(padded.to(self.device), lengths.to(self.device)))
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim, device=self.device)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 128, progress: bool = False) -> torch.Tensor:
        """Embed captions or queries → (n × d) unit vectors on the model's device."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        was_training = self.training
        self.eval()
        out = []
        try:
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding per batch
            batches = range(0, len(texts), batch_size)
            if progress:
                batches = tqdm(batches, desc="captions", unit="batch")
            for start in batches:
                idx = order[start:start + batch_size]
                ids, lengths = self.tokenize([texts[i] for i in idx])
                out.append((idx, self.embed_texts(ids.to(self.device), lengths.to(self.device))))
        finally:
            self.train(was_training)
        if not out:
            return torch.zeros(0, self.embed_dim, device=self.device)
        result = torch.empty(len(texts), self.embed_dim, device=self.device)
        for idx, emb in out:
            result[torch.tensor(idx, device=self.device)] = emb
        return result

    # -- what a checkpoint stores ---------------------------------------------------------------

    def frozen_prefixes(self, train: TrainConfig) -> tuple[str, ...]:
        """State-dict prefixes that a run with recipe ``train`` leaves at their pretrained values, so
        that its checkpoint rebuilds them from the installed packages rather than storing them."""
        prefixes = []
        if self.config.image_encoder == "grid" and not train.finetune_backbone:
            prefixes.append("image.backbone.")
        if self.config.text_encoder == "transformer" and self.config.text_model != BERT_BASE_FROM_CHECKPOINT:
            # (BERT-base from a checkpoint has no package to rebuild it from)
            if not train.finetune_text:
                prefixes.append("text.bert.")
            elif not train.text_train_embeddings:
                prefixes.append(TEXT_EMBEDDINGS)
        return tuple(prefixes)


class TextOnlyVSEModel(VSEModel):
    """The text tower of a VSE∞ model and nothing else: what ``load_model(path, text_only=True)``
    returns, for embedding text queries (``vseinf search INDEX "text"``).

    No image tower is built (no CNN, no image transforms), and a BERT-layout transformer runs on
    :mod:`vseinf.encoders.bert_lite` rather than ``transformers`` (whose import alone takes about as
    long as torch's); it embeds text like the full model (tests/test_bert_lite.py). Image methods
    raise ValueError.

    Args:
        config: the model section of a run config.
        vocab: word list for the BiGRU text encoder.
    """

    def __init__(self, config: ModelConfig, vocab: Sequence[str] | None = None):
        nn.Module.__init__(self)  # not VSEModel's: that builds both towers
        self.config = config
        self.image = None
        self.vocab = None
        if config.text_encoder == "transformer":
            self.text = _lite_text_encoder(config)
        elif config.text_encoder == "bigru":
            self.vocab, self.text = _bigru_text_tower(config, vocab)
        else:
            raise ValueError(f"model.text_encoder: expected 'transformer' or 'bigru', got {config.text_encoder!r}")

    @property
    def image_head(self) -> nn.Module:
        raise ValueError("this model was loaded with text_only=True: it has no image tower")

    def image_transform(self, train: bool = False):
        raise ValueError("this model was loaded with text_only=True: it has no image tower")

    def _embed_images(self, images, lengths):
        raise ValueError("this model was loaded with text_only=True: it has no image tower")


def _bigru_text_tower(config: ModelConfig, vocab):
    """(vocabulary, BiGRU text tower) of a ``text_encoder: bigru`` model."""
    if vocab is None:
        raise ValueError("model.text_encoder=bigru needs a vocabulary (built from the training captions)")
    vocab = vocab if isinstance(vocab, Vocabulary) else Vocabulary(list(vocab))
    return vocab, BiGRUTextEncoder(len(vocab), config.word_dim, config.embed_dim, config.text_pooling)


def _lite_text_encoder(config: ModelConfig):
    """The transformer text tower on :mod:`vseinf.encoders.bert_lite` where the transformer is a
    BERT it can read; otherwise (another architecture, weights only as a .bin) on transformers."""
    if config.text_model == BERT_BASE_FROM_CHECKPOINT:  # weights come from the checkpoint
        bert, tokenizer = load_lite_transformer(config=BERT_BASE_CONFIG, tokenizer_path=default_transformer_path())
    else:
        folder = Path(config.text_model) if config.text_model else default_transformer_path()
        if not lite_transformer_folder(folder):
            return TransformerTextEncoder(folder, config.embed_dim, config.text_pooling)
        bert, tokenizer = load_lite_transformer(folder)
    return TransformerTextEncoder(embed_dim=config.embed_dim, pooling=config.text_pooling, bert=bert,
                                  tokenizer=tokenizer)


def _transformer_config(text_model: str) -> dict | None:
    """Config of the text transformer for building it without weights (same architecture)."""
    if text_model and (Path(text_model) / "config.json").is_file():
        return json.loads((Path(text_model) / "config.json").read_text())
    if not text_model:
        return json.loads((default_transformer_path() / "config.json").read_text())
    return None  # BERT-base


def build_model(config: ModelConfig | RunConfig, vocab: Sequence[str] | None = None, pretrained: bool = True) -> VSEModel:
    """Factory: a VSE∞ model from a config. From a whole run config, a model trained with InfoNCE
    (``train.loss``) also holds the loss's learnable temperature."""
    logit_scale = None
    if isinstance(config, RunConfig):
        logit_scale = DEFAULT_LOGIT_SCALE if config.train.loss == "infonce" else None
        config = config.model
    return VSEModel(config, vocab=vocab, pretrained=pretrained, logit_scale=logit_scale)


def save_model(model: VSEModel, path: str | Path, run_config: RunConfig, metrics: dict | None = None,
               trainer_state=None) -> Path:
    """Save the trained parts of ``model`` with the run's full config (atomically)."""
    skip = model.frozen_prefixes(run_config.train)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    config = run_config.to_dict()
    config["stored_prefixes_skipped"] = list(skip)
    if model.vocab is not None:
        config[VOCAB_KEY] = list(model.vocab.words)
    return save_checkpoint(path, state, config, metrics, trainer_state)


def checkpoint_path(path: str | os.PathLike | None) -> Path:
    """The folder of a checkpoint given as a path or as a bundled model's name (None: the default
    bundled model). A folder of that name in the working directory wins over the bundled one."""
    if path is None:
        return BUNDLED_DIR
    if isinstance(path, str) and path in BUNDLED_MODELS and not Path(path).exists():
        return BUNDLED_MODELS[path]
    return Path(path)


def bundled_name(path: str | os.PathLike | None) -> str | None:
    """The name of the bundled model stored at ``path``, or None when it is not one of them."""
    if path is None:
        return None
    where = Path(path).resolve()
    return next((name for name, folder in BUNDLED_MODELS.items() if folder.resolve() == where), None)


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu",
               text_only: bool = False) -> VSEModel:
    """Load a checkpoint directory saved by vseinf (default: the bundled Flickr8k model).

    Args:
        path: the checkpoint directory, or the name of a bundled model (:data:`BUNDLED_MODELS`).
        device: where the model runs.
        text_only: load only the text tower (a :class:`TextOnlyVSEModel`), for text queries.
    """
    path = checkpoint_path(path)
    state, config_dict, metrics = load_checkpoint(path)
    vocab = _string_list(config_dict.pop(VOCAB_KEY, None), path, VOCAB_KEY)
    skipped = tuple(_string_list(config_dict.pop("stored_prefixes_skipped", []), path, "stored_prefixes_skipped"))
    run_config = config_from_dict({k: v for k, v in config_dict.items() if k in ("model", "data", "train")},
                                  str(path / "config.json"))
    state = upgrade_state_dict(state)
    if text_only:
        model = TextOnlyVSEModel(run_config.model, vocab=vocab)
        state = {k: v for k, v in state.items() if k.startswith("text.")}
    else:
        model = build_model(run_config, vocab=vocab, pretrained=True)
    load_stored_weights(model, state, skipped, path, dataclasses.asdict(run_config.model))
    model.run_config = run_config
    model.metrics = metrics
    model.checkpoint_path = path
    return model.to(device).eval()


def load_stored_weights(model: nn.Module, state: dict, skipped: tuple[str, ...], path: Path,
                        model_config: dict) -> None:
    """Load a checkpoint's tensors (``state``, upgraded) into ``model``, which keeps its own copies of
    the frozen pretrained parts that were not stored (``skipped`` prefixes). Raises CheckpointError
    naming the checkpoint ``path`` for a tensor of the wrong shape, a stored tensor the model has no
    place for, or one it needs that is missing."""
    check_shapes(model.state_dict(), state, str(path / "model.safetensors"), model_config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Older InfoNCE checkpoints kept the temperature with the loss; embedding does not need it, and
    # models trained with another loss have none.
    missing = [k for k in missing if not k.startswith(skipped) and k != "logit_scale"]
    if missing or unexpected:
        raise CheckpointError(f"{path}: checkpoint does not match its config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")


def _string_list(value, path: Path, key: str) -> list[str] | None:
    """A list-of-strings entry of a checkpoint's config.json (None stays None)."""
    if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise CheckpointError(f"{path / 'config.json'}: {key}: expected a list of strings")
    return value

