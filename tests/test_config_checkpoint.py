"""Configs (defaults = the paper, overrides, errors) and checkpoints (atomic, safetensors + JSON)."""

from __future__ import annotations

import json

import pytest
import torch

from vseinf.config import ConfigError, RunConfig, load_config, parse_overrides
from vseinf.model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_trainer_state,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
    save_dir_atomic,
)


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


# -- damaged checkpoints: one error naming the tensor or key, never a traceback ------------------

def _tiny_checkpoint(path):
    """A small region + BiGRU model saved as a vseinf checkpoint (no pretrained packages needed)."""
    from vseinf.model import build_model, save_model

    cfg = load_config(None, [("image_encoder", "region"), ("feature_dim", "8"), ("text_encoder", "bigru"),
                             ("embed_dim", "16"), ("word_dim", "4")])
    model = build_model(cfg, vocab=["<pad>", "<start>", "<end>", "<unk>", "<mask>", "a", "dog"])
    save_model(model, path, cfg)
    return path


def _edit_config(path, edit):
    data = json.loads((path / "config.json").read_text())
    edit(data)
    (path / "config.json").write_text(json.dumps(data))


def test_tiny_checkpoint_loads(tmp_path):
    from vseinf.model import load_model

    assert load_model(_tiny_checkpoint(tmp_path / "ck")).embed_dim == 16


def test_tensor_of_the_wrong_shape_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from vseinf.model import load_model

    ck = _tiny_checkpoint(tmp_path / "ck")
    state = load_file(str(ck / "model.safetensors"))
    state["image.fc.bias"] = torch.zeros(3, 3)
    save_file(state, str(ck / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_model(ck)
    message = str(info.value)
    assert "\n" not in message
    assert "image.fc.bias" in message and "3×3" in message and "16" in message


def test_embed_dim_that_does_not_match_the_weights_is_named(tmp_path):
    from vseinf.model import load_model

    ck = _tiny_checkpoint(tmp_path / "ck")
    _edit_config(ck, lambda c: c["model"].update(embed_dim=32))
    with pytest.raises(CheckpointError) as info:
        load_model(ck)
    message = str(info.value)
    assert "\n" not in message
    assert "model.embed_dim" in message and "32" in message and "16" in message


@pytest.mark.parametrize("key, value", [("embed_dim", -4), ("embed_dim", 0), ("feature_dim", -1),
                                        ("word_dim", 0), ("image_size", -512), ("max_text_length", 0)])
def test_nonpositive_sizes_in_a_checkpoint_config_are_named(tmp_path, key, value):
    from vseinf.model import load_model

    ck = _tiny_checkpoint(tmp_path / "ck")
    _edit_config(ck, lambda c: c["model"].update({key: value}))
    with pytest.raises(ConfigError, match=rf"config\.json: model\.{key}: expected a positive integer, got {value}"):
        load_model(ck)


@pytest.mark.parametrize("text", ["[1, 2]", '"model"', "null", "3"])
def test_config_json_that_is_not_an_object(tmp_path, text):
    from vseinf.model import load_model

    ck = _tiny_checkpoint(tmp_path / "ck")
    (ck / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"config\.json: expected a JSON object"):
        load_model(ck)


def test_metrics_json_that_is_not_an_object(tmp_path):
    save_checkpoint(tmp_path / "ck", {"w": torch.zeros(1)}, {"v": 1})
    (tmp_path / "ck" / "metrics.json").write_text("[1]")
    with pytest.raises(CheckpointError, match=r"metrics\.json: expected a JSON object"):
        load_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize("key, value", [("text.vocab", 5), ("text.vocab", ["<pad>", 3]),
                                        ("stored_prefixes_skipped", 5), ("stored_prefixes_skipped", [None])])
def test_bookkeeping_keys_of_the_wrong_type_are_named(tmp_path, key, value):
    from vseinf.model import load_model

    ck = _tiny_checkpoint(tmp_path / "ck")
    _edit_config(ck, lambda c: c.update({key: value}))
    with pytest.raises(CheckpointError, match=rf"config\.json: {key}: expected a list of strings"):
        load_model(ck)


@pytest.mark.parametrize("key, value, message", [
    ("train.batch_size", "0", "train.batch_size: expected a positive integer, got 0"),
    ("epochs", "-1", "epochs: expected a positive integer, got -1"),
    ("lr", "-1e-3", "lr: expected a positive number, got -0.001"),
    ("num_workers", "-2", "num_workers: expected an integer >= 0, got -2"),
    ("margin", "nan", "margin: expected a finite number, got nan"),
])
def test_out_of_range_overrides_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [(key, value)])


def test_vseinf_eval_with_a_damaged_checkpoint_prints_one_line(tmp_path, capsys):
    from vseinf.cli import main

    ck = _tiny_checkpoint(tmp_path / "ck")
    (ck / "config.json").write_text("[]")
    assert main(["eval", "--checkpoint", str(ck), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "config.json: expected a JSON object" in err
