"""Numeric flags are checked when the command line is parsed: a bad value exits 2 with one line
naming the flag, before any model, index or data is touched (``--batch-size 0`` used to end in a
ZeroDivisionError after the model had loaded)."""

from __future__ import annotations

import pytest

from vseinf.cli import argtypes, main

# (command line, flag, bad value, what the message says is expected)
CASES = [
    (["encode", "G", "--out", "O", "--batch-size"], "--batch-size", "0", "a positive integer"),
    (["encode", "G", "--out", "O", "--batch-size"], "--batch-size", "-5", "a positive integer"),
    (["encode", "G", "--out", "O", "--batch-size"], "--batch-size", "many", "a positive integer"),
    (["encode", "G", "--out", "O", "--workers"], "--workers", "-1", "an integer >= 0"),
    (["encode", "G", "--out", "O", "--frames"], "--frames", "0", "a positive integer"),
    (["search", "I", "q", "-k"], "-k", "0", "a positive integer"),
    (["search", "I", "q", "-k"], "-k", "2.5", "a positive integer"),
    (["search", "I", "q", "--ef-search"], "--ef-search", "0", "a positive integer"),
    (["search", "I", "q", "--nprobe"], "--nprobe", "-3", "a positive integer"),
    (["search", "I", "q", "--rerank"], "--rerank", "0", "a positive integer"),
    (["serve", "I", "--port"], "--port", "70000", "a port number 0..65535"),
    (["serve", "I", "--port"], "--port", "-1", "a port number 0..65535"),
    (["eval", "--checkpoint", "C", "--max-images"], "--max-images", "-1", "an integer >= 0"),
    (["extract", "--videos", "V", "--out", "O", "--frames"], "--frames", "0", "a positive integer"),
    (["extract", "--videos", "V", "--out", "O", "--fps"], "--fps", "0", "a positive number"),
    (["extract", "--videos", "V", "--out", "O", "--fps"], "--fps", "nan", "a positive number"),
    (["extract", "--videos", "V", "--out", "O", "--fps"], "--fps", "inf", "a positive number"),
    (["extract", "--videos", "V", "--out", "O", "--max-frames"], "--max-frames", "0", "a positive integer"),
    (["extract", "--videos", "V", "--out", "O", "--image-size"], "--image-size", "-224", "a positive integer"),
    (["extract", "--videos", "V", "--out", "O", "--frame-batch"], "--frame-batch", "0", "a positive integer"),
    (["demo", "-k"], "-k", "0", "a positive integer"),
    (["study", "pooling", "--out", "O", "--epochs"], "--epochs", "0", "a positive integer"),
    (["study", "pooling", "--out", "O", "--jobs"], "--jobs", "0", "a positive integer"),
    (["synth", "--steps"], "--steps", "0", "a positive integer"),
    (["synth", "--seed"], "--seed", "-1", "an integer >= 0"),
]


@pytest.mark.parametrize("argv, flag, value, expected", CASES,
                         ids=[f"{c[0][0]}{c[1]}={c[2]}" for c in CASES])
def test_bad_numeric_flag_exits_2_naming_the_flag(tmp_path, monkeypatch, capsys, argv, flag, value, expected):
    monkeypatch.chdir(tmp_path)  # nothing named G, I, O… exists: a parsed command would fail differently
    with pytest.raises(SystemExit) as info:
        main([*argv, value])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}: expected {expected}, got {value!r}" in err
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


@pytest.mark.parametrize("convert, text, value", [
    (argtypes.positive_int, "7", 7), (argtypes.positive_int, " 12 ", 12),
    (argtypes.nonnegative_int, "0", 0), (argtypes.positive_float, "0.5", 0.5),
    (argtypes.positive_float, "2", 2.0), (argtypes.port_number, "0", 0), (argtypes.port_number, "65535", 65535),
])
def test_good_values_pass(convert, text, value):
    assert convert(text) == value


def test_good_flags_still_parse():
    from vseinf.cli import build_parser

    args = build_parser("encode").parse_args(["encode", "g", "--out", "o", "--batch-size", "8", "--workers", "0"])
    assert (args.batch_size, args.workers) == (8, 0)
    args = build_parser("search").parse_args(["search", "i", "q", "-k", "3"])
    assert args.k == 3
