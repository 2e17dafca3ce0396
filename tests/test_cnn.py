"""CNN backbones: layouts users' weight files rely on, bundled weights that really classify, weight
loading and its errors, frozen BatchNorm, feature-map shapes."""

from __future__ import annotations

import argparse
import copy
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from vseinf.encoders.cnn import (
    BACKBONE_NAMES,
    FrozenBatchNorm2d,
    _SameConv2d,
    build_backbone,
    bundled_weights_path,
    freeze_batchnorm,
    fuse_conv_bn,
    read_state_dict,
    set_trainable,
)

# torchvision's parameter counts (classifier included), the numbers its model cards list.
TORCHVISION_PARAMS = {
    "mobilenet_v2": 3_504_872,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext101_32x8d": 88_791_336,
}
IMAGENET_DOGS = range(151, 269)


def _flickr8k() -> Path | None:
    candidates = []
    if os.environ.get("VSEINF_SHARED_DATA"):
        env = Path(os.environ["VSEINF_SHARED_DATA"])
        candidates += [env / "flickr8k", env / "data" / "flickr8k", env]
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k")
    for path in candidates:
        if (path / "Flicker8k_Dataset").is_dir() and (path / "Flickr8k_text" / "Flickr8k.token.txt").is_file():
            return path
    return None


@pytest.fixture(scope="module")
def mobilenet():
    return build_backbone("mobilenet_v2")


# ---------------------------------------------------------------------------------------------
# Layouts


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_parameter_count_matches_torchvision(name):
    v1 = {"resnet50_v1", "resnet101_v1", "resnet152_v1", "resnet101_butd"}  # the authors' ResNet variant
    assert set(BACKBONE_NAMES) == set(TORCHVISION_PARAMS) | {"efficientnet_lite0"} | v1
    model = build_backbone(name, weights=None)
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name]
    if name.startswith("resnet") and f"{name}_v1" in v1:
        # same tensors (the authors' files load), different strides
        v1_model = build_backbone(f"{name}_v1", weights=None)
        assert {k: v.shape for k, v in v1_model.state_dict().items()} == \
            {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,blocks", [("resnet50", [3, 4, 6, 3]), ("resnet152", [3, 8, 36, 3]),
                                         ("resnext101_32x8d", [3, 4, 23, 3])])
def test_resnet_state_dict_uses_torchvision_names(name, blocks):
    state = build_backbone(name, weights=None).state_dict()
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = {"conv1.weight", "fc.weight", "fc.bias"} | {f"bn1.{s}" for s in bn}
    for stage, n in enumerate(blocks, start=1):
        for b in range(n):
            for i in (1, 2, 3):
                expected.add(f"layer{stage}.{b}.conv{i}.weight")
                expected |= {f"layer{stage}.{b}.bn{i}.{s}" for s in bn}
        expected.add(f"layer{stage}.0.downsample.0.weight")
        expected |= {f"layer{stage}.0.downsample.1.{s}" for s in bn}
    assert set(state) == expected
    width = 256 if name.startswith("resnext") else 64  # 32 groups × 8 channels vs plain 64
    groups = 32 if name.startswith("resnext") else 1
    assert state["layer1.0.conv2.weight"].shape == (width, width // groups, 3, 3)
    assert state["layer4.0.downsample.0.weight"].shape == (2048, 1024, 1, 1)
    assert state["fc.weight"].shape == (1000, 2048)


def test_resnet_strides_are_on_the_3x3_conv():
    # torchvision ("v1.5") puts the stride on conv2; weights trained that way break elsewhere.
    model = build_backbone("resnet50", weights=None)
    assert model.layer2[0].conv1.stride == (1, 1)
    assert model.layer2[0].conv2.stride == (2, 2)


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_bundled_weights_have_exactly_our_layout(name):
    file_state = read_state_dict(bundled_weights_path(name))
    model_state = build_backbone(name, weights=None).state_dict()
    assert list(file_state) == list(model_state)
    assert all(file_state[k].shape == v.shape for k, v in model_state.items())


def test_bundled_weights_are_loaded(mobilenet):
    file_state = read_state_dict(bundled_weights_path("mobilenet_v2"))
    assert torch.equal(mobilenet.state_dict()["features.18.0.weight"], file_state["features.18.0.weight"])
    assert not mobilenet.training


def test_normalisation_constants():
    assert build_backbone("mobilenet_v2", None).mean == pytest.approx((0.485, 0.456, 0.406))
    lite = build_backbone("efficientnet_lite0", None)
    # TensorFlow's edge models: (pixel - 127) / 128 on 0..255
    assert lite.mean == pytest.approx((127 / 255,) * 3) and lite.std == pytest.approx((128 / 255,) * 3)
    x = torch.full((1, 3, 2, 2), 127 / 255)
    assert torch.allclose(lite.normalize(x), torch.zeros_like(x), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The bundled weights classify real photos


def _captioned_images(root: Path):
    captions = defaultdict(list)
    for line in (root / "Flickr8k_text" / "Flickr8k.token.txt").read_text().splitlines():
        key, _, caption = line.partition("\t")
        captions[key.split("#")[0]].append(caption.lower())
    dev = (root / "Flickr8k_text" / "Flickr_8k.devImages.txt").read_text().split()
    return dev, captions


def _load(root: Path, names: list[str]) -> torch.Tensor:
    arrays = [np.array(Image.open(root / "Flicker8k_Dataset" / n).convert("RGB").resize((224, 224))) for n in names]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def dog_and_other_photos():
    root = _flickr8k()
    if root is None:
        pytest.skip("Flickr8k data not found (../shared/data/flickr8k or $VSEINF_SHARED_DATA)")
    dev, captions = _captioned_images(root)
    dogs = [n for n in dev if len(captions[n]) == 5 and all(" dog" in c for c in captions[n])][:12]
    animal_words = ("dog", "puppy", "puppies", "animal", "cat", "horse", "bird", "cow", "sheep", "pet")
    others = [n for n in dev if not any(w in c for c in captions[n] for w in animal_words)][:12]
    return _load(root, dogs), _load(root, others)


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_bundled_weights_recognise_dogs(name, dog_and_other_photos):
    dogs, others = dog_and_other_photos
    model = build_backbone(name)
    with torch.no_grad():
        dog_top5 = model.classify(model.normalize(dogs)).topk(5, dim=1).indices
        other_top1 = model.classify(model.normalize(others)).argmax(dim=1)
    dog_hit = ((dog_top5 >= IMAGENET_DOGS.start) & (dog_top5 < IMAGENET_DOGS.stop)).any(dim=1)
    assert dog_hit.float().mean() >= 0.75, dog_top5.tolist()
    # Control: photos whose captions mention no animal are rarely called a dog.
    other_dog = (other_top1 >= IMAGENET_DOGS.start) & (other_top1 < IMAGENET_DOGS.stop)
    assert other_dog.float().mean() <= 0.25, other_top1.tolist()


# ---------------------------------------------------------------------------------------------
# Weight files


def test_resnet_state_dict_round_trips_through_a_file(tmp_path):
    model = build_backbone("resnet50", weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save(model.state_dict(), path)
    loaded = build_backbone("resnet50", weights=path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_wrapped_prefixed_and_safetensors_files_load(tmp_path, mobilenet):
    state = mobilenet.state_dict()
    wrapped = {"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "ddp.pt")
    torch.save({"model": state, "step": torch.tensor(5)}, tmp_path / "model.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    for name in ("ddp.pt", "model.pth", "w.safetensors"):
        loaded = build_backbone("mobilenet_v2", weights=str(tmp_path / name))
        assert torch.equal(loaded.state_dict()["classifier.1.weight"], state["classifier.1.weight"]), name


def test_old_files_without_num_batches_tracked_load(tmp_path, mobilenet):
    state = {k: v for k, v in mobilenet.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    loaded = build_backbone("mobilenet_v2", tmp_path / "old.pth")
    assert torch.equal(loaded.features[0][1].running_var, mobilenet.features[0][1].running_var)


def test_wrong_layout_names_the_missing_keys(tmp_path, mobilenet):
    torch.save(mobilenet.state_dict(), tmp_path / "mobilenet.pth")
    with pytest.raises(ValueError) as err:
        build_backbone("resnet50", tmp_path / "mobilenet.pth")
    message = str(err.value)
    assert "mobilenet.pth" in message and "resnet50" in message
    assert "missing keys" in message and "conv1.weight" in message
    assert "unexpected keys" in message and "features.0.0.weight" in message

    state = mobilenet.state_dict()
    del state["features.5.conv.1.0.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): features\.5\.conv\.1\.0\.weight"):
        build_backbone("mobilenet_v2", tmp_path / "partial.pth")


def test_wrong_shapes_are_reported(tmp_path, mobilenet):
    state = mobilenet.state_dict()
    state["classifier.1.weight"] = torch.zeros(10, 1280)
    state["classifier.1.bias"] = torch.zeros(10)
    torch.save(state, tmp_path / "ten_classes.pth")
    with pytest.raises(ValueError, match=r"wrong shapes.*classifier\.1\.weight \(10, 1280\)"):
        build_backbone("mobilenet_v2", tmp_path / "ten_classes.pth")


def test_arbitrary_pickles_are_refused(tmp_path, mobilenet):
    # A checkpoint holding a non-tensor object needs full unpickling: refused, not executed.
    torch.save({"state_dict": mobilenet.state_dict(), "opt": argparse.Namespace(lr=1.0)}, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match="weights_only"):
        build_backbone("mobilenet_v2", tmp_path / "ckpt.pth")


def test_bad_requests_raise_value_errors(tmp_path):
    with pytest.raises(ValueError, match="pass weights="):
        build_backbone("resnet101")  # no bundled weights
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        build_backbone("vgg16")
    with pytest.raises(ValueError, match="not found"):
        build_backbone("resnet50", tmp_path / "nope.pth")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown weights format"):
        build_backbone("resnet50", tmp_path / "w.npz")
    torch.save({"epoch": 3, "weights": [torch.zeros(1)]}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="no state dict found.*epoch"):
        build_backbone("resnet50", tmp_path / "odd.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a state dict"):
        build_backbone("resnet50", tmp_path / "list.pth")


# ---------------------------------------------------------------------------------------------
# Frozen BatchNorm


def test_freeze_batchnorm_keeps_running_statistics(mobilenet):
    import copy

    model = copy.deepcopy(mobilenet)
    images = torch.randn(2, 3, 64, 64) * 2 + 1  # statistics unlike ImageNet's
    with torch.no_grad():
        expected = model.eval()(images)

    # Control: an ordinary model in train() mode does update (and use) batch statistics.
    plain = copy.deepcopy(mobilenet).train()
    plain(images)
    assert not torch.equal(plain.features[0][1].running_mean, mobilenet.features[0][1].running_mean)

    keys = list(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    freeze_batchnorm(model).train()
    assert isinstance(model.features[0][1], FrozenBatchNorm2d)
    out = model(images)
    out.square().mean().backward()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # running stats and counters untouched
    assert list(model.state_dict()) == keys
    assert torch.allclose(out.detach(), expected, atol=1e-5)  # train mode normalises like eval
    bn = model.features[0][1]
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0  # affine params still train


def test_set_trainable(mobilenet):
    import copy

    model = copy.deepcopy(mobilenet)
    set_trainable(model, False)
    assert not any(p.requires_grad for p in model.parameters())
    set_trainable(model, True)
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# BatchNorm folded into the convolutions (inference copies)


def _random_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN layer non-trivial running statistics and affine parameters (a random-init
    backbone has mean 0, var 1, γ 1, β 0, which would make folding look right by accident)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
    return model


@pytest.mark.parametrize("name,weights", [("mobilenet_v2", "default"), ("efficientnet_lite0", None),
                                          ("resnet50", None), ("resnet50_v1", None)])
def test_fused_backbone_equals_the_unfused_reference(name, weights):
    """fuse_conv_bn folds every BN (none is left) and the feature maps equal the unfused model's
    in eval mode (cosine ≥ 0.99999 per image, the issue's bar is 1e-4), in both memory layouts;
    the reference itself is left unchanged."""
    model = freeze_batchnorm(build_backbone(name, weights)).eval()
    if weights is None:
        _random_statistics(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_conv_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    torch.manual_seed(1)
    images = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        want = model(images)
        got = fused(images)
        got_cl = copy.deepcopy(fused).to(memory_format=torch.channels_last)(
            images.contiguous(memory_format=torch.channels_last))
    for out in (got, got_cl):
        assert out.shape == want.shape
        assert F.cosine_similarity(out.flatten(1), want.flatten(1)).min().item() >= 0.99999
        assert ((out - want).abs().max() / want.abs().max()).item() < 1e-4


def test_fusing_keeps_a_conv_bias_and_refuses_bn_without_statistics():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
    bn = _random_statistics(nn.Sequential(nn.BatchNorm2d(4)))[0]
    model = nn.Sequential(conv, bn, nn.ReLU()).eval()
    fused = fuse_conv_bn(model)
    assert isinstance(fused[1], nn.Identity)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5)
    with pytest.raises(ValueError, match="running statistics"):
        fuse_conv_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)))


# ---------------------------------------------------------------------------------------------
# Feature maps


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
@pytest.mark.parametrize("size,grid", [(224, 7), (512, 16)])
def test_light_feature_map_shapes(name, size, grid):
    model = build_backbone(name, weights=None)
    with torch.no_grad():
        fmap = model(torch.randn(1, 3, size, size))
    assert fmap.shape == (1, model.out_channels, grid, grid)
    assert model.out_channels == 1280


@pytest.mark.parametrize("name", ["resnet50", "resnet101", "resnet152", "resnext101_32x8d"])
def test_resnet_feature_map_shapes(name):
    # Shapes at full resolution on the "meta" device (no arithmetic), one real pass at 64×64.
    model = build_backbone(name, weights=None)
    assert model.out_channels == 2048
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 2, 2)
        meta = model.to("meta")
        assert meta(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 2048, 7, 7)
        assert meta(torch.empty(1, 3, 512, 512, device="meta")).shape == (1, 2048, 16, 16)
        assert meta.classify(torch.empty(2, 3, 512, 512, device="meta")).shape == (2, 1000)


@pytest.mark.parametrize("size", [15, 16, 17, 224, 225])
@pytest.mark.parametrize("kernel", [3, 5])
def test_tf_same_padding(size, kernel):
    torch.manual_seed(0)
    x = torch.randn(1, 2, size, size)
    strided = _SameConv2d(2, 2, kernel, stride=2)
    assert strided(x).shape[-1] == -(-size // 2)  # ceil(size / 2)
    # TensorFlow pads the extra pixel at the bottom/right: compare with explicit padding.
    total = max((-(-size // 2) - 1) * 2 + kernel - size, 0)
    padded = nn.functional.pad(x, [total // 2, total - total // 2, total // 2, total - total // 2])
    assert torch.allclose(strided(x), nn.functional.conv2d(padded, strided.weight, stride=2), atol=1e-6)
    # With stride 1 "SAME" is ordinary symmetric padding.
    plain = _SameConv2d(2, 2, kernel)
    reference = nn.functional.conv2d(x, plain.weight, padding=kernel // 2)
    assert torch.allclose(plain(x), reference, atol=1e-6)


def test_efficientnet_accepts_odd_sizes():
    model = build_backbone("efficientnet_lite0", weights=None)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 225, 97)).shape == (1, 1280, 8, 4)
