"""train.precision "auto": bf16 autocast only where the hardware multiplies bf16 natively."""

import pytest
import torch

from vseinf.precision import autocast, bf16_is_fast, resolve_precision


def test_auto_follows_the_hardware_and_explicit_choices_are_kept():
    fast = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert bf16_is_fast("cpu") == fast
    assert resolve_precision("auto", "cpu") == ("bf16" if fast else "fp32")
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("fp32", "cpu") == "fp32"


def test_autocast_context_matches_the_resolved_precision():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with autocast("bf16", "cpu"):
        assert layer(x).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert layer(x).dtype == torch.float32
    with autocast("auto", "cpu"):
        expected = torch.bfloat16 if bf16_is_fast("cpu") else torch.float32
        assert layer(x).dtype == expected


def test_unknown_precision_names_the_key():
    with pytest.raises(ValueError, match="train.precision"):
        resolve_precision("fp16", "cpu")
