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
