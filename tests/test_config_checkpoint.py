"""Configs (defaults = the paper, overrides, errors) and checkpoints (atomic, safetensors + JSON)."""

from __future__ import annotations

import json

import pytest
import torch

from vseinf.checkpoint import (
    CheckpointError, load_checkpoint, load_trainer_state, optimizer_from_flat, optimizer_to_flat,
    save_checkpoint, save_dir_atomic,
)
from vseinf.config import ConfigError, RunConfig, load_config, parse_overrides


def test_defaults_reproduce_the_paper():
    cfg = RunConfig()
    assert cfg.model.embed_dim == 1024 and cfg.model.image_size == 512
    assert cfg.model.image_pooling == cfg.model.text_pooling == "gpo"
    t = cfg.train
    assert (t.lr, t.weight_decay, t.batch_size, t.epochs, t.lr_decay_epoch) == (5e-4, 1e-4, 128, 25, 15)
    assert (t.grad_clip, t.margin, t.warmup_epochs, t.backbone_lr_mult, t.text_backbone_lr_mult) == \
        (2.0, 0.2, 1, 0.1, 0.1)


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  embed_dim: 256\ntrain:\n  lr: 1.0e-4\nepochs: 3\n")
    cfg = load_config(path, parse_overrides(["--train.lr", "2e-4", "--image-pooling=max", "--size_augment", "false"]))
    assert cfg.model.embed_dim == 256 and cfg.train.epochs == 3
    assert cfg.train.lr == 2e-4 and cfg.model.image_pooling == "max" and cfg.model.size_augment is False


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, [("epochs", "7"), ("backbone", "resnet50")])
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert load_config(path) == cfg


@pytest.mark.parametrize("pairs, message", [
    ([("no_such", "1")], "unknown config key 'no_such'"),
    ([("train.nope", "1")], "unknown key train.nope"),
    ([("epochs", "three")], "expected int"),
    ([("size_augment", "maybe")], "expected true/false"),
    ([("bogus.lr", "1")], "unknown section"),
])
def test_bad_overrides_name_the_key(pairs, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, pairs)


def test_bad_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_checkpoint_round_trip(tmp_path):
    state = {"a.weight": torch.randn(3, 4), "b": torch.arange(5)}
    save_checkpoint(tmp_path / "ck", state, {"model": {"x": 1}}, {"rsum": 300.0})
    got, config, metrics = load_checkpoint(tmp_path / "ck")
    assert torch.equal(got["a.weight"], state["a.weight"]) and torch.equal(got["b"], state["b"])
    assert config == {"model": {"x": 1}} and metrics == {"rsum": 300.0}


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path):
    target = tmp_path / "ck"
    save_checkpoint(target, {"w": torch.zeros(2)}, {"v": 1})

    def dies_halfway(tmp):
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_dir_atomic(target, dies_halfway)
    state, config, _ = load_checkpoint(target)
    assert config == {"v": 1} and torch.equal(state["w"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary left behind


def test_swap_interrupted_between_renames_recovers(tmp_path):
    target = tmp_path / "ck"
    save_checkpoint(target, {"w": torch.ones(1)}, {"v": 2})
    target.rename(tmp_path / ".ck.old")  # as if killed after moving the old one away
    state, config, _ = load_checkpoint(target)
    assert config == {"v": 2}


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing")
    pth = tmp_path / "model_best.pth"
    pth.write_bytes(b"\x80\x02")
    with pytest.raises(CheckpointError, match="vseinf convert"):
        load_checkpoint(pth)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path / "empty")


def test_optimizer_state_survives_safetensors_and_json(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    tensors, state = optimizer_to_flat(opt)
    save_checkpoint(tmp_path / "last", model.state_dict(), {}, None, (tensors, {"optimizer": state}))
    t2, s2 = load_trainer_state(tmp_path / "last")
    model2 = torch.nn.Linear(4, 3)
    model2.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    optimizer_from_flat(opt2, t2, s2["optimizer"])
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    torch.testing.assert_close(model.weight, model2.weight)
