"""Distributed training with torchrun on CPU (gloo): two processes train exactly like one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["--max_train_images", "24", "--max_val_images", "12", "--image_size", "96", "--embed_dim", "64",
        "--epochs", "2", "--lr_decay_epoch", "1", "--size_augment", "false", "--log_every", "1",
        "--save_every", "0", "--precision", "fp32"]


def _train(cmd, env):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_gloo_processes_equal_one_process(flickr8k_root, tmp_path, use_cache):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["--data", str(flickr8k_root), *ARGS]
    one = tmp_path / "one"
    _train([sys.executable, "-m", "vseinf", "train", "--out", str(one), "--batch_size", "16", "--no-progress",
            *common], env)
    two = tmp_path / "two"
    _train(["torchrun", "--nproc_per_node", "2", "--master_port", "29517", "-m", "vseinf", "train",
            "--out", str(two), "--batch_size", "8", "--no-progress", *common], env)
    a = load_file(str(one / "last" / "model.safetensors"))
    b = load_file(str(two / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    # only rank 0 writes: one log line per step, not two
    steps = [line for line in (two / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == len([line for line in (one / "log.jsonl").read_text().splitlines() if '"loss"' in line])
