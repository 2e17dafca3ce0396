"""A BERT encoder in plain PyTorch, and a word-piece tokenizer on the ``tokenizers`` library, for
embedding text queries without importing ``transformers``.

``vseinf search INDEX "text"`` answers one query and exits, so its start-up is its running time:
importing ``transformers``' auto classes takes about as long again as importing torch. A text query
only needs a BERT-layout transformer's forward pass, which is a few dozen lines:
:class:`BertLite` reads a Hugging Face BERT folder (``config.json`` + ``model.safetensors``) and
:class:`WordPieceTokenizer` its ``tokenizer.json``. Both keep the names and call signatures the
text tower uses (:class:`~vseinf.encoders.text.TransformerTextEncoder` takes them as ``bert=`` and
``tokenizer=``), and the parameter names are transformers' ``BertModel``'s, so checkpoints that
store a fine-tuned or converted transformer load unchanged.

The transformers path stays the reference (and the one training uses): tests/test_bert_lite.py
holds this one to it (same token ids, hidden states within 1e-5).

Inference only: no dropout, no gradient checkpointing, absolute position embeddings, token type 0.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

__all__ = ["BertLiteConfig", "BertLite", "WordPieceTokenizer", "lite_transformer_folder", "load_lite_transformer"]

WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
# Stored by transformers but not used for the last hidden states.
_UNUSED_KEYS = ("pooler.", "embeddings.position_ids")
_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class BertLiteConfig:
    """The fields of a BERT ``config.json`` that the forward pass uses."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_dict(cls, fields: dict, source: str = "config") -> "BertLiteConfig":
        """Read a transformers config dict; ValueError when it is not a plain BERT."""
        if fields.get("model_type", "bert") != "bert":
            raise ValueError(f"{source}: model_type {fields.get('model_type')!r} is not 'bert'")
        if fields.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{source}: position_embedding_type {fields['position_embedding_type']!r} "
                             "is not 'absolute'")
        if fields.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise ValueError(f"{source}: hidden_act {fields['hidden_act']!r} is not one of {', '.join(_ACTIVATIONS)}")
        names = cls.__dataclass_fields__
        config = cls(**{k: v for k, v in fields.items() if k in names})
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"{source}: hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_attention_heads}")
        return config


def _drop_unused_keys(module, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: a transformers BertModel's pooler and position-id buffer have no
    counterpart here (also when the BERT is a submodule: a checkpoint's ``text.bert.*``)."""
    for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):].startswith(_UNUSED_KEYS)]:
        del state_dict[key]


class BertOutput(NamedTuple):
    """What :meth:`BertLite.forward` returns (the field the text tower reads)."""

    last_hidden_state: torch.Tensor


# Weights are always loaded, so the layers skip their random initialisation (BERT-base's would take
# a second). Not via the meta device: initialising on it imports torch._dynamo, as slow as torch.

class _Linear(nn.Linear):
    def reset_parameters(self) -> None:
        pass


class _Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass


# Submodule names below follow transformers' BertModel, so its state dicts load as they are.

class _Embeddings(nn.Module):
    def __init__(self, c: BertLiteConfig):
        super().__init__()
        self.word_embeddings = _Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = _Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = _Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, c: BertLiteConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = _Linear(c.hidden_size, c.hidden_size)
        self.key = _Linear(c.hidden_size, c.hidden_size)
        self.value = _Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape

        def split(t):  # B × N × H → B × heads × N × H/heads
            return t.view(b, n, self.heads, h // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                             attn_mask=keep)
        return out.transpose(1, 2).reshape(b, n, h)


class _AddNorm(nn.Module):
    """dense → + residual → LayerNorm (BERT's "output" blocks)."""

    def __init__(self, c: BertLiteConfig, in_features: int):
        super().__init__()
        self.dense = _Linear(in_features, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, c: BertLiteConfig):
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _AddNorm(c, c.hidden_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, keep), x)


class _Intermediate(nn.Module):
    def __init__(self, c: BertLiteConfig):
        super().__init__()
        self.dense = _Linear(c.hidden_size, c.intermediate_size)
        self.act = _ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, c: BertLiteConfig):
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _AddNorm(c, c.intermediate_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, keep)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, c: BertLiteConfig):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


class BertLite(nn.Module):
    """BERT's encoder stack for inference: token ids → last hidden states.

    Built with uninitialised weights: they are always loaded (:meth:`from_pretrained`, or a
    checkpoint's ``text.bert.*``, both checked to hold every weight).

    Args:
        config: the architecture.
    """

    def __init__(self, config: BertLiteConfig):
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        self.register_load_state_dict_pre_hook(_drop_unused_keys)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "BertLite":
        """Load a Hugging Face BERT folder (``config.json`` + ``model.safetensors``)."""
        path = Path(path)
        config = BertLiteConfig.from_dict(json.loads((path / "config.json").read_text()), str(path / "config.json"))
        model = cls(config)
        state = {k.removeprefix("bert."): v for k, v in load_file(str(path / WEIGHTS_FILE)).items()}
        model.load_weights(state, str(path / WEIGHTS_FILE), assign=True)
        return model.eval()

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "state dict", assign: bool = False) -> None:
        """Load a transformers ``BertModel`` state dict; every weight must be there, or ValueError.

        ``assign``: take the tensors themselves instead of copying them in (for tensors nothing else
        holds, e.g. just read from a file: saves a copy of every weight at start-up).
        """
        if assign:  # the parameters become these tensors: keep the module's float32
            state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        missing, unexpected = self.load_state_dict(state, strict=False, assign=assign)
        if missing or unexpected:
            raise ValueError(f"{source}: not a BERT of this shape: missing {missing[:3]}, unexpected {unexpected[:3]}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> BertOutput:
        """input_ids: B × L; attention_mask: B × L, 1 for tokens, 0 for padding (default: all 1)."""
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"{input_ids.shape[1]} tokens; this transformer takes at most "
                             f"{self.config.max_position_embeddings}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep = attention_mask.bool()[:, None, None, :]  # which keys each query may attend to
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return BertOutput(x)


class WordPieceTokenizer:
    """A ``tokenizer.json`` (the fast tokenizer's file) behind the part of transformers' tokenizer
    interface the text tower calls: ``tok(texts, padding=, truncation=, max_length=, return_tensors=)``.

    Args:
        path: the ``tokenizer.json`` file.
    """

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer  # installed with transformers (the `text` extra)

        self.path = Path(path)
        self._tok = Tokenizer.from_file(str(self.path))
        self._tok.no_padding()  # the file may pin a fixed padding/truncation; each call sets its own
        self._tok.no_truncation()
        ids = {name: self._tok.token_to_id(name) for name in ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")}
        if None in ids.values():
            lacking = [k for k, v in ids.items() if v is None]
            raise ValueError(f"{self.path}: not a BERT word-piece tokenizer (no {', '.join(lacking)} token)")
        if ids["[PAD]"] != 0:
            # The attention mask is "token id != 0" (the authors' convention): padding must be id 0.
            raise ValueError(f"{self.path}: tokenizer pads with id {ids['[PAD]']}; id 0 is required")
        self.pad_token_id = 0
        self.mask_token_id = ids["[MASK]"]
        self.all_special_ids = sorted(set(ids.values()))

    def __call__(self, texts: str | Sequence[str], padding: bool = False, truncation: bool = False,
                 max_length: int | None = None, return_tensors: str | None = None) -> dict:
        single = isinstance(texts, str)
        if truncation and max_length:
            self._tok.enable_truncation(max_length)
        else:
            self._tok.no_truncation()
        ids = [e.ids for e in self._tok.encode_batch([texts] if single else list(texts))]
        if single:
            return {"input_ids": ids[0]}
        if padding:
            width = max(map(len, ids), default=0)
            ids = [row + [self.pad_token_id] * (width - len(row)) for row in ids]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(ids, dtype=torch.long)}
        if return_tensors is not None:
            raise ValueError(f"return_tensors: only 'pt' is supported, got {return_tensors!r}")
        return {"input_ids": ids}


def lite_transformer_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a BERT folder this module can load (else use transformers)."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
        BertLiteConfig.from_dict(config)
    except (OSError, ValueError):
        return False
    return (path / WEIGHTS_FILE).is_file() and (path / TOKENIZER_FILE).is_file()


def load_lite_transformer(path: str | os.PathLike | None = None, config: dict | None = None,
                          tokenizer_path: str | os.PathLike | None = None) -> tuple[BertLite, WordPieceTokenizer]:
    """A BERT and its tokenizer without transformers.

    Args:
        path: a Hugging Face BERT folder to load (weights, config, tokenizer).
        config: instead of ``path``: build this architecture with weights still to be loaded
            (a checkpoint that stores the whole transformer, e.g. the authors' BERT-base).
        tokenizer_path: the folder whose ``tokenizer.json`` to use with ``config``.
    """
    if path is not None:
        return BertLite.from_pretrained(path), WordPieceTokenizer(Path(path) / TOKENIZER_FILE)
    if config is None or tokenizer_path is None:
        raise ValueError("load_lite_transformer: pass a folder, or a config and a tokenizer folder")
    return BertLite(BertLiteConfig.from_dict(config)).eval(), WordPieceTokenizer(Path(tokenizer_path) / TOKENIZER_FILE)

