"""Import a checkpoint saved by the authors' VSE∞ code into a vseinf checkpoint directory (docs/recipe.md §9).

    vseinf convert coco_butd_region_bert.pth --out ckpt/coco_region_bert --trust-pickle
    vseinf convert f30k_region_bigru.pth --vocab f30k_precomp_vocab.json --out ckpt/f30k --trust-pickle

The authors' files are ``torch.save`` pickles of ``{"model": [image_state_dict, text_state_dict],
"opt": argparse.Namespace, "epoch", "best_rsum", "Eiters"}``. Unpickling can run arbitrary code, so
the file is only opened when the user passes ``--trust-pickle`` (``trust_pickle=True``); this module
holds the project's only ``torch.load(..., weights_only=False)``.

What is converted (the authors' module names are kept by our towers, so most keys map one to one):

- image, precomputed regions: ``fc.*``, ``mlp.layers.*``, ``mlp.bns.*``, ``gpool.*`` → ``image.*``;
- image, grid: the CNN under ``backbone.resnet.*`` (or plain ``backbone.*``) → ``image.backbone.*``;
  the wrapper's duplicate views ``backbone.base.N.*`` / ``backbone.top.0.*`` are checked and dropped;
  ``image_encoder.fc.*``, ``image_encoder.gpool.*`` → ``image.image_encoder.*``;
- text, BERT-base: ``bert.*``, ``linear.*``, ``gpool.*`` → ``text.*`` (BERT-base is rebuilt from its
  config and its weights stored in our checkpoint: ``model.text_model = "bert-base-uncased-config"``);
- text, BiGRU: ``embed.weight``, ``rnn.*``, ``gpool.*`` → ``text.*``, with the vocabulary JSON the
  model was trained with (its ``word2idx`` ids index ``embed.weight``).

The model config is read off the tensors (embedding size, feature size, CNN depth and groups) and
the pickled ``opt`` (backbone source, input scale). Every tensor of our model must be filled by the
file and every tensor of the file must be used or deliberately dropped; anything else is an error
naming the keys, so a conversion never silently leaves random weights behind.
"""

from __future__ import annotations

import argparse  # the authors' checkpoints pickle their options as an argparse.Namespace
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, RunConfig, TrainConfig
from ..encoders.cnn import BACKBONE_NAMES
from ..encoders.text import BERT_BASE_CONFIG, Vocabulary
from .vse import BERT_BASE_FROM_CHECKPOINT, build_model, load_model, save_model

__all__ = [
    "UntrustedPickleError",
    "AuthorsCheckpoint",
    "ConversionReport",
    "read_authors_checkpoint",
    "convert_checkpoint",
]

TRUST_FLAG = "--trust-pickle"


class UntrustedPickleError(ValueError):
    """The user has not said the pickle is trusted, so it is not opened."""


# ---------------------------------------------------------------------------------------------
# Reading the pickle


@dataclass
class AuthorsCheckpoint:
    """What the authors' training code saved.

    Args:
        path: the file.
        image: the image encoder's state dict.
        text: the text encoder's state dict.
        opt: the training options (``vars(opt)``; empty when the file has none).
        epoch, best_rsum, eiters: training progress recorded in the file (None when absent).
    """

    path: Path
    image: dict
    text: dict
    opt: dict
    epoch: int | None = None
    best_rsum: float | None = None
    eiters: int | None = None


def _unpickle(path: Path):
    """The one place in vseinf that unpickles arbitrary objects; callers check trust first."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # unpickling fails in many exception types; all mean "not a checkpoint"
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"{path}: not a PyTorch checkpoint file ({type(err).__name__}: {first})") from None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_module(state: dict) -> dict:
    # nn.DataParallel (the authors' multi-GPU training) saves every name under "module.".
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _describe(obj) -> str:
    if isinstance(obj, dict):
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        return f"a dict with keys {keys}" + (" …" if len(obj) > 8 else "")
    return f"a {type(obj).__name__}"


def _check_may_open(path: str | Path, trust_pickle: bool) -> Path:
    """The file exists and the user trusts it (checked before anything heavy is imported)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; `vseinf convert` takes the authors' checkpoint file "
                         "(e.g. model_best.pth), and a directory is already in vseinf's format")
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    if not trust_pickle:
        raise UntrustedPickleError(
            f"{path}: refusing to open it: the authors' checkpoints are Python pickles, and loading a "
            f"pickle can run arbitrary code. Only convert files you trust (e.g. downloaded from the "
            f"authors' release), then pass {TRUST_FLAG}.")
    return path


def read_authors_checkpoint(path: str | Path, trust_pickle: bool = False) -> AuthorsCheckpoint:
    """Open a checkpoint saved by the authors' code.

    Args:
        path: the ``.pth`` / ``.pth.tar`` file.
        trust_pickle: the user vouches for the file. Without it nothing is loaded: unpickling a
            file can run any code its author put in it.

    Raises:
        UntrustedPickleError: ``trust_pickle`` is False.
        ValueError: the file is missing, not a PyTorch checkpoint, or not laid out as the authors' is.
    """
    path = _check_may_open(path, trust_pickle)
    obj = _unpickle(path)
    model = obj.get("model") if isinstance(obj, dict) else None
    if (not isinstance(model, (list, tuple)) or len(model) != 2
            or not all(_is_state_dict(sd) for sd in model)):
        found = _describe(obj) if not isinstance(obj, dict) or "model" not in obj else \
            f"'model' holding {_describe(model)}"
        raise ValueError(f"{path}: not a checkpoint saved by the authors' VSE∞ code: expected a dict whose "
                         f"'model' is [image_encoder_state_dict, text_encoder_state_dict]; found {found}")
    opt = obj.get("opt")
    if isinstance(opt, argparse.Namespace):
        opt = vars(opt)
    if not isinstance(opt, dict):
        opt = {}

    def number(key, kind):
        value = obj.get(key)
        try:
            return kind(value) if value is not None else None
        except (TypeError, ValueError):
            return None

    return AuthorsCheckpoint(path=path, image=_strip_module(model[0]), text=_strip_module(model[1]),
                             opt=dict(opt), epoch=number("epoch", int), best_rsum=number("best_rsum", float),
                             eiters=number("Eiters", int))


# ---------------------------------------------------------------------------------------------
# Helpers shared by the towers


def _shape(state: dict, key: str, where: str) -> tuple:
    if key not in state:
        raise ValueError(f"{where}: missing tensor {key!r}")
    return tuple(state[key].shape)


def _prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _check_gpo(state: dict, where: str) -> None:
    """The authors' GPO: GRU(32 → 32, bidirectional) + Linear(32 → 1, no bias)."""
    gpool = _prefixed(state, "gpool.")
    if not gpool:
        raise ValueError(f"{where}: no 'gpool.*' tensors; only checkpoints pooled with GPO can be converted")
    if "gru.weight_ih_l0_reverse" not in gpool or "linear.weight" not in gpool:
        raise ValueError(f"{where}: 'gpool.*' is not the authors' GPO (a bidirectional GRU and a linear "
                         f"scorer); found {', '.join(sorted(gpool)[:6])}")


def _opt(opt: dict, key: str, default=None):
    value = opt.get(key, default)
    return default if value is None else value


# ---------------------------------------------------------------------------------------------
# Image tower


def _convert_region(sd: dict, where: str) -> tuple[dict, dict]:
    """Region encoder: the names are ours already; check the shapes tell one consistent model."""
    out_dim, in_dim = _shape(sd, "fc.weight", where)
    if "mlp.layers.0.weight" not in sd:
        raise ValueError(f"{where}: region encoder without the 'mlp.*' residual MLP; vseinf's region "
                         "tower is fc(x) + mlp(x) (the authors' 'basic' encoder)")
    if any(k.startswith("mlp.layers.2.") for k in sd):
        raise ValueError(f"{where}: the region MLP has more than 2 layers; vseinf's has exactly 2")
    hidden = _shape(sd, "mlp.layers.0.weight", where)
    last = _shape(sd, "mlp.layers.1.weight", where)
    if hidden != (out_dim // 2, in_dim) or last != (out_dim, out_dim // 2):
        raise ValueError(f"{where}: MLP shapes {hidden} and {last} do not match fc {out_dim}×{in_dim} "
                         f"(expected ({out_dim // 2}, {in_dim}) and ({out_dim}, {out_dim // 2}))")
    _check_gpo(sd, where)
    fields = {"image_encoder": "region", "feature_dim": in_dim, "embed_dim": out_dim}
    return {f"image.{k}": v for k, v in sd.items()}, fields


# The authors' grid CNNs (lib/modules/resnet.py). ResNeXt sources are torchvision models (from
# torchvision / torch.hub): the same architecture and names as vseinf's. The other sources use the
# authors' own ResNet class, which holds torchvision-shaped tensors but computes differently: a
# downsampling block strides on its first 1×1 convolution (torchvision: on the 3×3), and the stem
# max-pool has no padding and rounds up. "detector" (the bottom-up-attention ResNet-101, from Caffe)
# also takes BGR input scaled 0..255 minus per-channel means.
TORCHVISION_SOURCES = {"wsl", "vsepp_wsl", "imagenet_resnext", "vsepp_resnext"}
AUTHORS_RESNET_SOURCES = {"detector", "vsepp_detector", "imagenet", "vsepp_imagenet", "imagenet_res50",
                          "vsepp_imagenet_res50", "imagenet_res152", "vsepp_imagenet_res152"}
DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
# vseinf backbones that compute what the authors' own ResNet class computes (see above).
AUTHORS_RESNET_NAMES = {50: "resnet50_v1", 101: "resnet101_v1", 152: "resnet152_v1"}
BUTD_RESNET_NAME = "resnet101_butd"  # + BGR / pixel-mean input, folded into conv1 here

# The wrapper's Sequential views of the same modules: base = (conv1, bn1, relu, maxpool, layer1,
# layer2, layer3), top = (layer4,).
_VIEWS = {"base.0.": "conv1.", "base.1.": "bn1.", "base.4.": "layer1.", "base.5.": "layer2.",
          "base.6.": "layer3.", "top.0.": "layer4."}


def _backbone_state(sd: dict, where: str) -> tuple[dict, list]:
    """The CNN's tensors in torchvision layout; returns (state, dropped keys)."""
    backbone = _prefixed(sd, "backbone.")
    dropped = []
    views = {k: v for k, v in backbone.items() if k.startswith(("base.", "top."))}
    if any(k.startswith("resnet.") for k in backbone):
        state = _prefixed(backbone, "resnet.")
        for key, value in views.items():
            view = next((v for v in _VIEWS if key.startswith(v)), None)
            if view is None:
                raise ValueError(f"{where}: unexpected tensor 'backbone.{key}'")
            twin = _VIEWS[view] + key[len(view):]
            # The views share storage with backbone.resnet.* in the authors' model; a difference
            # means the file is not what we think it is, and either copy could be the wrong one.
            if twin not in state or state[twin].shape != value.shape or not torch.equal(state[twin], value):
                raise ValueError(f"{where}: 'backbone.{key}' should be a view of 'backbone.resnet.{twin}' "
                                 "(the authors' wrapper) but the two differ")
            dropped.append(f"backbone.{key}")
        stray = [k for k in backbone if not k.startswith(("resnet.", "base.", "top."))]
    elif views:
        # Only the Sequential views: rebuild the names from them. The classifier is not among them.
        state = {}
        for key, value in views.items():
            view = next((v for v in _VIEWS if key.startswith(v)), None)
            if view is None:
                raise ValueError(f"{where}: unexpected tensor 'backbone.{key}'")
            state[_VIEWS[view] + key[len(view):]] = value
        stray = [k for k in backbone if not k.startswith(("base.", "top."))]
    else:
        state, stray = dict(backbone), []
    if stray:
        raise ValueError(f"{where}: unexpected backbone tensors: {', '.join('backbone.' + k for k in stray[:6])}")
    if "conv1.weight" not in state or "layer4.0.conv1.weight" not in state:
        raise ValueError(f"{where}: the grid backbone is not a ResNet/ResNeXt (no conv1 / layer4 tensors); "
                         "only the authors' ResNet-family backbones can be converted")
    return state, dropped


def _resnet_layout(state: dict, where: str) -> tuple[int, int, int]:
    """(depth, groups, width per group) read off the tensors."""
    blocks = []
    for stage in range(1, 5):
        ids = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(max(ids) + 1 if ids else 0)
    depth = DEPTHS.get(tuple(blocks))
    if depth is None:
        raise ValueError(f"{where}: a ResNet with {blocks} blocks per stage is none of ResNet-50/101/152 "
                         f"({', '.join(str(list(b)) for b in DEPTHS)})")
    width, per_group = _shape(state, "layer1.0.conv2.weight", where)[:2]
    groups = width // per_group
    return depth, groups, width // groups


def _grid_backbone_name(depth: int, groups: int, width_per_group: int, source: str, where: str) -> str:
    if groups > 1:
        if (depth, groups, width_per_group) != (101, 32, 8):
            raise ValueError(f"{where}: ResNeXt-{depth} {groups}×{width_per_group}d is not available in "
                             "vseinf (only resnext101_32x8d)")
        if source and source not in TORCHVISION_SOURCES:
            raise ValueError(f"{where}: opt.backbone_source={source!r} names a plain ResNet, but the tensors "
                             "are a ResNeXt")
        return "resnext101_32x8d"
    if source in TORCHVISION_SOURCES:
        raise ValueError(f"{where}: opt.backbone_source={source!r} names a ResNeXt, but the tensors are a "
                         f"plain ResNet-{depth}")
    if source not in AUTHORS_RESNET_SOURCES:
        raise ValueError(f"{where}: unknown opt.backbone_source={source!r}; known sources: "
                         f"{', '.join(sorted(TORCHVISION_SOURCES | AUTHORS_RESNET_SOURCES))}")
    if "detector" in source:
        if depth != 101:
            raise ValueError(f"{where}: the 'detector' backbone is a ResNet-101, these tensors are a ResNet-{depth}")
        name = BUTD_RESNET_NAME
    else:
        name = AUTHORS_RESNET_NAMES[depth]
    if name not in BACKBONE_NAMES:
        raise ValueError(
            f"{where}: opt.backbone_source={source!r} is the authors' own ResNet-{depth}, which strides on the "
            f"first 1×1 convolution of a block and max-pools without padding (ceil mode)"
            + (", on BGR 0..255 pixels minus means" if "detector" in source else "")
            + f"; vseinf has no such backbone yet ('{name}'), and its torchvision-style ResNet would compute "
            "different features from the same weights, so this checkpoint cannot be converted faithfully. "
            "ResNeXt grid checkpoints (backbone_source 'wsl' / 'imagenet_resnext') and region checkpoints can.")
    return name


def _convert_grid(sd: dict, opt: dict, where: str) -> tuple[dict, dict, list, list]:
    state, dropped = _backbone_state(sd, where)
    depth, groups, wpg = _resnet_layout(state, where)
    notes = []
    source = str(_opt(opt, "backbone_source", "")).strip()
    if not source:
        source = "wsl" if groups > 1 else "detector"  # the authors' default for a plain ResNet
        notes.append(f"no opt.backbone_source in the file; assumed {source!r} from the tensors")
    name = _grid_backbone_name(depth, groups, wpg, source, where)
    if name == BUTD_RESNET_NAME:
        # The detector reads BGR: reorder conv1's input channels so the converted model takes RGB.
        state["conv1.weight"] = state["conv1.weight"][:, [2, 1, 0]].contiguous()
        notes.append("conv1 input channels reordered BGR → RGB (the detector was trained on BGR images)")
    head = _prefixed(sd, "image_encoder.")
    if any(k.startswith("mlp.") for k in head):
        raise ValueError(f"{where}: the grid head has an MLP ('image_encoder.mlp.*'); vseinf's grid head is fc only")
    embed_dim, feat_dim = _shape(head, "fc.weight", where + " (image_encoder)")
    _check_gpo(head, where + " (image_encoder)")
    stray = [k for k in sd if not k.startswith(("backbone.", "image_encoder."))]
    if stray:
        raise ValueError(f"{where}: unexpected tensors in a grid image encoder: {', '.join(stray[:6])}")
    scale = float(_opt(opt, "input_scale_factor", 1.0))
    fields = {"image_encoder": "grid", "backbone": name, "backbone_weights": "none",
              "image_size": int(round(256 * scale)), "feature_dim": feat_dim, "embed_dim": embed_dim}
    out = {f"image.backbone.{k}": v for k, v in state.items()}
    out.update({f"image.image_encoder.{k}": v for k, v in head.items()})
    notes.append(f"grid backbone: {name} (backbone_source {source!r}, ResNet-{depth}"
                 + (f" {groups}×{wpg}d" if groups > 1 else "") + f"), input {fields['image_size']}×"
                 f"{fields['image_size']}")
    return out, fields, dropped, notes


def convert_image_state(sd: dict, opt: dict, where: str = "image encoder") -> tuple[dict, dict, list, list]:
    """The image encoder's state dict → (our ``image.*`` tensors, ModelConfig fields, dropped, notes)."""
    if any(k.startswith("backbone.") for k in sd):
        return _convert_grid(sd, opt, where)
    if "fc.weight" in sd:
        state, fields = _convert_region(sd, where)
        return state, fields, [], []
    raise ValueError(f"{where}: neither a region encoder (fc.*, mlp.*, gpool.*) nor a grid encoder "
                     f"(backbone.*, image_encoder.*); found {', '.join(sorted(sd)[:6])}")


# ---------------------------------------------------------------------------------------------
# Text tower

# The authors' text transformer is always bert-base-uncased; see BERT_BASE_CONFIG in encoders.text.
_IGNORED_BERT_BUFFERS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")


def _convert_bert(sd: dict, where: str) -> tuple[dict, dict, list, list]:
    state, dropped = {}, []
    for key, value in sd.items():
        if key in _IGNORED_BERT_BUFFERS:  # index buffers some transformers versions save; rebuilt here
            dropped.append(key)
            continue
        # pytorch-pretrained-bert era names for LayerNorm parameters.
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))
        state[key] = value
    vocab, hidden = _shape(state, "bert.embeddings.word_embeddings.weight", where)
    layers = len({m.group(1) for k in state if (m := re.match(r"bert\.encoder\.layer\.(\d+)\.", k))})
    inter = _shape(state, "bert.encoder.layer.0.intermediate.dense.weight", where)[0]
    positions = _shape(state, "bert.embeddings.position_embeddings.weight", where)[0]
    found = {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
             "intermediate_size": inter, "max_position_embeddings": positions}
    wrong = {k: v for k, v in found.items() if v != BERT_BASE_CONFIG[k]}
    if wrong:
        raise ValueError(f"{where}: the authors' text transformer is bert-base-uncased, but this BERT has "
                         + ", ".join(f"{k}={v} (BERT-base: {BERT_BASE_CONFIG[k]})" for k, v in wrong.items()))
    embed_dim, in_dim = _shape(state, "linear.weight", where)
    if in_dim != hidden:
        raise ValueError(f"{where}: linear.weight is {embed_dim}×{in_dim}, expected input size {hidden}")
    _check_gpo(state, where)
    fields = {"text_encoder": "transformer", "text_model": BERT_BASE_FROM_CHECKPOINT, "embed_dim": embed_dim}
    return {f"text.{k}": v for k, v in state.items()}, fields, dropped, []


def _convert_bigru(sd: dict, vocab, opt: dict, where: str) -> tuple[dict, dict, list, list]:
    rows, word_dim = _shape(sd, "embed.weight", where)
    if "rnn.weight_ih_l0_reverse" not in sd:
        raise ValueError(f"{where}: the GRU is one-directional; vseinf's BiGRU tower averages two directions")
    if "rnn.weight_ih_l1" in sd:
        raise ValueError(f"{where}: the GRU has more than one layer; vseinf's BiGRU tower has one")
    embed_dim = _shape(sd, "rnn.weight_hh_l0", where)[1]
    _check_gpo(sd, where)
    if vocab is None:
        hint = f" (e.g. {opt['data_name']}_vocab.json)" if opt.get("data_name") else ""
        raise ValueError(f"{where}: a BiGRU text encoder needs the vocabulary it was trained with: pass "
                         f"--vocab FILE, the authors' vocabulary JSON with 'word2idx'{hint}")
    if len(vocab) != rows:
        raise ValueError(f"{where}: the vocabulary has {len(vocab)} words but embed.weight has {rows} rows; "
                         "it is not the vocabulary this model was trained with")
    fields = {"text_encoder": "bigru", "word_dim": word_dim, "embed_dim": embed_dim, "glove": False}
    return {f"text.{k}": v for k, v in sd.items()}, fields, [], []


def convert_text_state(sd: dict, opt: dict, vocab=None, where: str = "text encoder") -> tuple[dict, dict, list, list]:
    """The text encoder's state dict → (our ``text.*`` tensors, ModelConfig fields, dropped, notes)."""
    if any(k.startswith("bert.") for k in sd):
        state, fields, dropped, notes = _convert_bert(sd, where)
        if vocab is not None:
            notes.append("--vocab ignored: the text encoder is BERT (word pieces, not a word vocabulary)")
        return state, fields, dropped, notes
    if "embed.weight" in sd:
        return _convert_bigru(sd, vocab, opt, where)
    raise ValueError(f"{where}: neither BERT (bert.*, linear.*, gpool.*) nor a BiGRU (embed.*, rnn.*, "
                     f"gpool.*); found {', '.join(sorted(sd)[:6])}")


# ---------------------------------------------------------------------------------------------
# Putting it together


@dataclass
class ConversionReport:
    """What :func:`convert_checkpoint` did (printed by ``vseinf convert``)."""

    source: Path
    out: Path
    image_encoder: str
    backbone: str
    text_encoder: str
    embed_dim: int
    epoch: int | None
    best_rsum: float | None
    eiters: int | None
    n_image_tensors: int
    n_text_tensors: int
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        image = self.image_encoder + (f" ({self.backbone})" if self.image_encoder == "grid" else "")
        progress = ", ".join(f"{name} {value}" for name, value in
                             (("epoch", self.epoch), ("best_rsum", self.best_rsum), ("Eiters", self.eiters))
                             if value is not None) or "no training progress recorded"
        lines = [
            f"converted {self.source} → {self.out}",
            f"  image: {image}, {self.n_image_tensors} tensors; text: {self.text_encoder}, "
            f"{self.n_text_tensors} tensors; embed_dim {self.embed_dim}",
            f"  from the authors' run: {progress}",
        ]
        if self.dropped:
            lines.append(f"  dropped {len(self.dropped)} duplicate/derived tensors "
                         f"(e.g. {', '.join(self.dropped[:3])})")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _json_value(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(v is None or isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    return str(value)


def _train_fields(opt: dict, grid: bool, bert: bool) -> dict:
    """The authors' recipe where its meaning is the same as ours (for re-training from the import)."""
    fields: dict[str, Any] = {"finetune_backbone": grid, "finetune_text": bert}
    for ours, theirs in (("epochs", "num_epochs"), ("lr", "learning_rate"), ("lr_decay_epoch", "lr_update"),
                         ("batch_size", "batch_size"), ("grad_clip", "grad_clip"), ("margin", "margin")):
        if isinstance(opt.get(theirs), (int, float)) and not isinstance(opt.get(theirs), bool):
            fields[ours] = opt[theirs]
    if grid and isinstance(opt.get("backbone_lr_factor"), (int, float)):
        fields["backbone_lr_mult"] = opt["backbone_lr_factor"]
    return fields


def _check_against_model(state: dict, expected: dict, where: str) -> None:
    """Every tensor of the model filled, none left over, all shapes equal."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = [f"{where}: the converted tensors do not fit the inferred vseinf model"]
        if missing:
            parts.append(f"missing ({len(missing)}): {', '.join(missing[:6])}")
        if unexpected:
            parts.append(f"unexpected ({len(unexpected)}): {', '.join(unexpected[:6])}")
        if shapes:
            parts.append(f"wrong shapes ({len(shapes)}): {', '.join(shapes[:4])}")
        raise ValueError("; ".join(parts))


def convert_checkpoint(path: str | Path, out: str | Path, *, trust_pickle: bool = False,
                       vocab: str | Path | None = None, overwrite: bool = False,
                       verify: bool = True) -> ConversionReport:
    """Convert the authors' checkpoint at ``path`` into a vseinf checkpoint directory ``out``.

    Args:
        path: the authors' ``torch.save`` file.
        out: the checkpoint directory to write (loadable with :func:`vseinf.load_model`).
        trust_pickle: the user vouches for the file (see :func:`read_authors_checkpoint`).
        vocab: the vocabulary JSON of a BiGRU model (the authors' ``word2idx`` format).
        overwrite: replace ``out`` if it already holds something.
        verify: load the written checkpoint back with ``load_model`` and check every tensor.
    """
    _check_may_open(path, trust_pickle)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out}: already exists and is not empty; choose another --out or pass --overwrite")
    vocabulary = None
    if vocab is not None:
        vocabulary = Vocabulary.load(vocab)
    ckpt = read_authors_checkpoint(path, trust_pickle=trust_pickle)
    name = ckpt.path.name
    img_state, img_fields, img_dropped, img_notes = convert_image_state(ckpt.image, ckpt.opt, f"{name}: image encoder")
    txt_state, txt_fields, txt_dropped, txt_notes = convert_text_state(ckpt.text, ckpt.opt, vocabulary,
                                                                       f"{name}: text encoder")
    if img_fields["embed_dim"] != txt_fields["embed_dim"]:
        raise ValueError(f"{name}: the image encoder embeds into {img_fields['embed_dim']} dimensions but the "
                         f"text encoder into {txt_fields['embed_dim']}")
    notes = img_notes + txt_notes
    opt_dim = ckpt.opt.get("embed_size")
    if isinstance(opt_dim, int) and opt_dim != img_fields["embed_dim"]:
        notes.append(f"opt.embed_size={opt_dim} but the tensors embed into {img_fields['embed_dim']}; "
                     "the tensors win")
    for flag in ("no_imgnorm", "no_txtnorm"):
        if ckpt.opt.get(flag):
            notes.append(f"opt.{flag} is set: the authors' model did not l2-normalise that side, vseinf always "
                         "does, so rankings may differ from theirs")

    model_cfg = ModelConfig(**{**img_fields, **txt_fields, "image_pooling": "gpo", "text_pooling": "gpo"})
    grid, bert = model_cfg.image_encoder == "grid", model_cfg.text_encoder == "transformer"
    run_cfg = RunConfig(model=model_cfg, train=dataclasses.replace(TrainConfig(), **_train_fields(ckpt.opt, grid, bert)))
    state = {**img_state, **txt_state}
    for key in list(state):
        state[key] = state[key].detach().to("cpu", copy=False)

    # Build the model's skeleton on the meta device (no memory, no random init: every tensor is
    # about to be replaced), check the converted tensors fill it exactly, then take them over.
    with torch.device("meta"):
        model = build_model(model_cfg, vocab=vocabulary, pretrained=False)
    expected = model.state_dict()
    for key, value in expected.items():  # BatchNorm counters from files older than PyTorch 0.4.1
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    if grid and "image.backbone.fc.weight" not in state and "image.backbone.fc.weight" in expected:
        # Rebuilt from the wrapper's views, which leave out the (unused) ImageNet classifier.
        for key in ("image.backbone.fc.weight", "image.backbone.fc.bias"):
            state[key] = torch.zeros(expected[key].shape, dtype=expected[key].dtype)
        notes.append("the file has no CNN classifier (unused for embeddings); stored as zeros")
    _check_against_model(state, expected, name)
    model.load_state_dict(state, strict=True, assign=True)

    metrics = {
        "converted_from": str(ckpt.path), "epoch": ckpt.epoch, "best_rsum": ckpt.best_rsum, "Eiters": ckpt.eiters,
        "authors_opt": {k: _json_value(v) for k, v in ckpt.opt.items()},
    }
    save_model(model, out, run_cfg, metrics)
    if verify:
        loaded = load_model(out).state_dict()
        bad = [k for k, v in state.items() if k not in loaded or not torch.equal(loaded[k], v)]
        if bad:
            raise ValueError(f"{out}: the written checkpoint does not load back as converted "
                             f"(tensors differ: {', '.join(bad[:5])})")
    return ConversionReport(
        source=ckpt.path, out=out, image_encoder=model_cfg.image_encoder, backbone=model_cfg.backbone,
        text_encoder=("BERT-base" if bert else "BiGRU"), embed_dim=model_cfg.embed_dim, epoch=ckpt.epoch,
        best_rsum=ckpt.best_rsum, eiters=ckpt.eiters, n_image_tensors=len(img_state),
        n_text_tensors=len(txt_state), dropped=img_dropped + txt_dropped, notes=notes)
