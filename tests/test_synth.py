"""The synthetic check of the coefficient generators (docs/recipe.md §8): the patterns are the pools they
name, the score is the RMSE it claims to be, the quick command writes the documented JSON, and a
briefly trained GPO really learns the average and max patterns."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from vseinf.cli.synth import add_synth_arguments, run_synth_command
from vseinf.pooling import AvgPool, InterpolatedIndexPool, KMaxPool, MaxPool, build_pooling
from vseinf.studies.synth import (
    PAPER_SEEN,
    PATTERNS,
    SIZE_RANGES,
    _pattern_table,
    coefficient_rmse,
    format_table,
    pattern_coefficients,
    pooled_by_pattern,
    run_synth,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These are thousands of tiny ops: on a shared 2-core machine one thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# The patterns


def test_pattern_coefficients_by_hand():
    expect = {
        ("A", 4): [0.25] * 4,
        ("M-1", 3): [1, 0, 0],
        ("M-10", 12): [0.1] * 10 + [0, 0],
        ("M-10", 4): [0.25] * 4,  # fewer than K elements: all of them
        ("T-50%", 5): [1 / 3] * 3 + [0, 0],  # half rounded up
        ("T-50%", 6): [1 / 3] * 3 + [0, 0, 0],
        ("L", 3): [2 / 3, 1 / 3, 0],
        ("L", 1): [1],
    }
    for (pattern, n), theta in expect.items():
        torch.testing.assert_close(pattern_coefficients(pattern, n), torch.tensor(theta, dtype=torch.float64))
    for pattern in PATTERNS:
        for n in (1, 2, 19, 120):
            theta = pattern_coefficients(pattern, n)
            assert theta.shape == (n,) and (theta >= 0).all()
            assert math.isclose(theta.sum().item(), 1.0, rel_tol=1e-12)
            assert (theta[:-1] >= theta[1:]).all()  # every pattern favours the larger values
    with pytest.raises(ValueError, match="pattern"):
        pattern_coefficients("M-5", 10)


def test_targets_are_the_pools_the_patterns_name():
    features = torch.randn(6, 30, 4, generator=torch.Generator().manual_seed(0))
    features[1, 12:] = float("nan")  # padding must not leak into the target
    lengths = torch.tensor([30, 12, 1, 25, 9, 30])
    fixed = {"A": AvgPool(), "M-1": MaxPool(), "M-10": KMaxPool(10), "T-50%": None}
    for pattern, pool in fixed.items():
        target = pooled_by_pattern(features, lengths, _pattern_table(pattern, 30))
        if pool is None:  # mean of the top ⌈n/2⌉, written out
            pooled = torch.stack([features[b, :n].topk(math.ceil(n / 2), dim=0).values.mean(0)
                                  for b, n in enumerate(lengths.tolist())])
        else:
            pooled = pool(features, lengths)[0]
        torch.testing.assert_close(target, pooled)


def test_coefficient_rmse_is_zero_for_an_exact_generator_and_matches_a_hand_value():
    uniform = InterpolatedIndexPool()  # zero knots: θ_k = 1/N exactly
    assert coefficient_rmse(uniform, "A", range(10, 121)) < 1e-7
    # uniform θ on 4 positions against max: errors (−3/4, 1/4, 1/4, 1/4) → √(12/64)
    assert math.isclose(coefficient_rmse(uniform, "M-1", [4]), math.sqrt(12 / 64), rel_tol=1e-6)
    # averaged over sizes, not pooled over positions
    both = coefficient_rmse(uniform, "M-1", [2, 4])
    assert math.isclose(both, (0.5 + math.sqrt(12 / 64)) / 2, rel_tol=1e-6)


def test_unknown_pattern_or_generator_is_rejected():
    with pytest.raises(ValueError, match="pattern"):
        run_synth(patterns=("B",), progress=False)
    with pytest.raises(ValueError, match="generator"):
        run_synth(generators=("max",), progress=False)
    with pytest.raises(ValueError, match="steps"):
        run_synth(steps=0, progress=False)


# ---------------------------------------------------------------------------------------------
# The quick run, through the command-line entry point


A_MAX, M1_MAX = 0.006, 0.01  # quick GPO gets ≈ .004 and ≈ 0; a fresh GPO ≈ .011 and ≈ .14


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "table6.json"
    parser = argparse.ArgumentParser()
    add_synth_arguments(parser)
    args = parser.parse_args(["--quick", "--seed", "0", "--out", str(out), "--no-progress"])
    assert run_synth_command(args) == 0
    return json.loads(out.read_text())


def test_quick_run_writes_the_documented_json(quick_run):
    assert set(quick_run) == {"rmse", "paper", "config", "seconds"}
    assert set(quick_run["rmse"]) == {"interp", "gpo"}
    for name in quick_run["rmse"]:
        assert set(quick_run["rmse"][name]) == set(SIZE_RANGES)
        for split in SIZE_RANGES:
            values = quick_run["rmse"][name][split]
            assert set(values) == {"A", "M-1"}
            assert all(isinstance(v, float) and 0 <= v < 1 for v in values.values())
    assert quick_run["paper"] == PAPER_SEEN
    assert quick_run["config"]["quick"] is True and quick_run["config"]["train_sizes"] == [20, 100]
    assert quick_run["seconds"] > 0
    table = format_table(quick_run)
    assert "| sin/cos + BiGRU (GPO) | seen 20–100 |" in table
    assert "| paper, seen | 0 | .005 | .003 |" in table  # GPO's paper row: A, M-1, their mean


def test_quick_gpo_learns_average_and_max(quick_run):
    """GPO must get close to both patterns on the sizes it trained on and on larger unseen ones,
    and much closer than where it started (same seed, same initialisation)."""
    gpo = quick_run["rmse"]["gpo"]
    assert gpo["seen"]["A"] < A_MAX and gpo["unseen_larger"]["A"] < A_MAX
    assert gpo["seen"]["M-1"] < M1_MAX and gpo["unseen_larger"]["M-1"] < M1_MAX
    torch.manual_seed(0)
    fresh = build_pooling("gpo")
    assert gpo["seen"]["A"] < 0.5 * coefficient_rmse(fresh, "A", range(20, 101))


def test_an_untrained_gpo_fails_the_thresholds():
    for seed in range(3):
        torch.manual_seed(seed)
        fresh = build_pooling("gpo")
        assert coefficient_rmse(fresh, "A", range(20, 101)) > A_MAX
        assert coefficient_rmse(fresh, "M-1", range(20, 101)) > M1_MAX


def test_command_line_selects_patterns_and_generators(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_synth_arguments(parser)
    out = tmp_path / "sub" / "r.json"
    args = parser.parse_args(["--steps", "2", "--patterns", "L", "--generators", "sincos_mlp",
                              "--out", str(out), "--no-progress"])
    assert run_synth_command(args) == 0
    result = json.loads(out.read_text())
    assert list(result["rmse"]) == ["sincos_mlp"] and list(result["rmse"]["sincos_mlp"]["seen"]) == ["L"]
    assert result["config"]["steps"] == 2
    assert "sin/cos + MLP" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["--patterns", "Z"])
    assert "T-50%" in parser.format_help()  # '%' in help text must be escaped for argparse
