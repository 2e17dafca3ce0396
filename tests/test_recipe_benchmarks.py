"""The recipe ablation's own machinery: its rows are valid `vseinf train` overrides and the reference
trainer's two sampling orders each use every caption once an epoch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from vseinf.config import load_config

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import baseline_trainer  # noqa: E402
import recipe_ablation  # noqa: E402


@pytest.mark.parametrize("name", [n for n, (_, args) in recipe_ablation.ROWS.items() if args[:1] != ["baseline:"]])
def test_every_vseinf_row_is_a_valid_config(name, tmp_path):
    cmd = recipe_ablation.command(name, tmp_path / name, str(BENCHMARKS.parent / "configs" / "flickr8k.yaml"))
    args = cmd[cmd.index("auto") + 1:]
    pairs = [(args[i].removeprefix("--"), args[i + 1]) for i in range(0, len(args), 2)]
    cfg = load_config(BENCHMARKS.parent / "configs" / "flickr8k.yaml", pairs)
    if cfg.train.init_from:  # two-stage rows start from another row's run, under the same --runs
        assert Path(cfg.train.init_from).parent.parent == tmp_path


@pytest.mark.parametrize("config, row", [("flickr8k_effnet_gpo_max.yaml", "gpo+max-effnet"),
                                         ("flickr8k_effnet_ft_text.yaml", "ft-text-layers-effnet-2ep")])
def test_the_bundled_models_configs_are_their_ablation_rows(config, row, tmp_path):
    """The README reproduces each bundled model from a config file; the number it reports is the
    ablation row's: the two must be the same run."""
    cmd = recipe_ablation.command(row, tmp_path / row, str(BENCHMARKS.parent / "configs" / "flickr8k.yaml"))
    args = cmd[cmd.index("auto") + 1:]
    from_row = load_config(BENCHMARKS.parent / "configs" / "flickr8k.yaml",
                           [(args[i].removeprefix("--"), args[i + 1]) for i in range(0, len(args), 2)])
    from_file = load_config(BENCHMARKS.parent / "configs" / config, [("train.init_from", from_row.train.init_from)])
    assert from_file.to_dict() == from_row.to_dict()


@pytest.mark.parametrize("per_photo", [[5] * 300, [1, 2, 3, 4, 5, 6, 7] * 40])
def test_both_sampling_orders_use_every_caption_once(per_photo):
    cap2img = torch.repeat_interleave(torch.arange(len(per_photo)), torch.tensor(per_photo))
    for order in ("captions", "images"):
        got = baseline_trainer.caption_order(cap2img, order, torch.Generator().manual_seed(0))
        assert sorted(got.tolist()) == list(range(len(cap2img)))


def test_the_image_order_never_puts_a_photo_twice_in_a_round():
    cap2img = torch.arange(600).repeat_interleave(5)
    got = cap2img[baseline_trainer.caption_order(cap2img, "images", torch.Generator().manual_seed(0))]
    for round_ in got.view(5, 600):
        assert len(set(round_.tolist())) == 600
    shuffled = cap2img[baseline_trainer.caption_order(cap2img, "captions", torch.Generator().manual_seed(0))]
    assert any(len(set(r.tolist())) < 600 for r in shuffled.view(5, 600))  # what the order avoids


def test_bundle_model_halves_the_weights_and_checks_the_embeddings(flickr8k_root, tmp_path, monkeypatch):
    """benchmarks/bundle_model.py: fp16 tensors, machine paths replaced, embeddings checked against
    fp32 — and a bundle whose embeddings fp16 would move is refused, with nothing written."""
    import json

    import bundle_model
    from safetensors.torch import load_file

    from vseinf.config import ModelConfig, RunConfig
    from vseinf.encoders.text import Vocabulary
    from vseinf.model import build_model, save_model

    torch.manual_seed(0)
    cfg = ModelConfig(image_size=64, text_encoder="bigru", word_dim=32, embed_dim=32)
    model = build_model(cfg, vocab=Vocabulary.build(["a dog runs on the grass"], min_count=1))
    run = RunConfig(model=cfg)
    run.data.path, run.train.init_from = str(flickr8k_root), str(tmp_path / "stage1" / "best")
    ckpt = save_model(model, tmp_path / "ckpt", run)
    argv = ["bundle_model.py", str(ckpt), str(tmp_path / "bundle"), "--data", str(flickr8k_root), "--images", "8"]
    monkeypatch.setattr(sys, "argv", argv)
    assert bundle_model.main() == 0
    state = load_file(str(tmp_path / "bundle" / "model.safetensors"))
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    saved = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert saved["data"]["path"] == "data/flickr8k" and saved["train"]["init_from"] == "runs/stage1/best"
    monkeypatch.setattr(sys, "argv", argv[:2] + [str(tmp_path / "refused")] + argv[3:] + ["--min-cosine", "1.01"])
    assert bundle_model.main() == 1
    assert not (tmp_path / "refused").exists()


def test_finetune_curve_counts_each_epochs_training_time():
    import finetune_curve

    log = [{"step": 50, "sec_per_step": 2.0}, {"step": 60, "sec_per_step": 3.0},
           {"epoch": 1, "val": {"rsum": 250.0}},
           {"step": 100, "sec_per_step": 1.5},
           {"step": 80, "sec_per_step": 9.0},  # resumed from step 80: 81-100 run (and are counted) again
           {"step": 120, "sec_per_step": 1.5},
           {"epoch": 2, "val": {"rsum": 300.123}}]
    assert finetune_curve.epoch_curve(log) == [{"epoch": 1, "rsum": 250.0, "train_min": round(130 / 60, 1)},
                                               {"epoch": 2, "rsum": 300.12, "train_min": round(120 / 60, 1)}]
