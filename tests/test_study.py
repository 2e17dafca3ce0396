"""``vseinf study pooling`` and ``vseinf plot-pooling``: what a researcher running the study relies on.

The end-to-end tests train real (tiny) models through ``vseinf.train.train`` on a small precomputed
dataset written here: Flickr8k captions when the shared copy is present (synthetic ones
otherwise) and random region features, so every cell takes a second.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vseinf.studies.pooling_study
from vseinf.cli.plot_pooling import add_plot_pooling_parser, run_plot_pooling
from vseinf.cli.study import add_study_parser, run_study
from vseinf.pooling import build_pooling, pooling_coefficients
from vseinf.studies.plots import default_sizes
from vseinf.studies.pooling_study import Cell, cell_dir, parse_grid, plan_cells, study_config

SHARED = Path(os.environ.get("VSEINF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared/data")) / "flickr8k"


def _captions(n: int) -> list[str]:
    token_file = SHARED / "Flickr8k_text" / "Flickr8k.token.txt"
    if token_file.is_file():
        with open(token_file, encoding="utf-8") as f:
            lines = [next(f).split("\t", 1)[1].strip() for _ in range(n)]
        return lines
    rng = np.random.default_rng(0)
    words = "a dog man woman runs on the beach grass red ball child plays water".split()
    return [" ".join(rng.choice(words, 6)) for _ in range(n)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """precomp/{train,dev}_{ims.npy,caps.txt}: 16 and 8 images, 5 captions each, 5 regions × 8."""
    root = tmp_path_factory.mktemp("study_data")
    folder = root / "precomp"
    folder.mkdir()
    caps = _captions(120)
    rng = np.random.default_rng(0)
    for split, n, offset in (("train", 16, 0), ("dev", 8, 80)):
        np.save(folder / f"{split}_ims.npy", rng.standard_normal((n, 5, 8)).astype(np.float32))
        (folder / f"{split}_caps.txt").write_text("\n".join(caps[offset:offset + 5 * n]) + "\n")
    return root


@pytest.fixture()
def config_file(dataset, tmp_path) -> Path:
    cfg = {
        "model": {"image_encoder": "region", "feature_dim": 8, "text_encoder": "bigru", "word_dim": 8,
                  "embed_dim": 8},
        "data": {"path": str(dataset)},
        "train": {"epochs": 2, "lr_decay_epoch": 1, "batch_size": 8, "max_steps_per_epoch": 2, "log_every": 1},
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    return path


def parse(argv: list[str], add=add_study_parser):
    parser = argparse.ArgumentParser()
    add(parser.add_subparsers(dest="command"))
    return parser.parse_known_args(argv)


def study(config_file: Path, out: Path, *more: str) -> dict:
    args, extra = parse(["study", "pooling", "--config", str(config_file), "--out", str(out), "--no-progress", *more])
    assert run_study(args, extra) == 0
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------
# Planning the cells


def test_grid_plans_every_pair_plus_gpo_and_n_means_average_pooling():
    cells = plan_cells(parse_grid("1, 5,N"))
    assert len(cells) == 10
    assert Cell("kmax:1", "avg") in cells and Cell("avg", "kmax:5") in cells
    assert cells[-1] == Cell("gpo", "gpo")


def test_aggregators_vary_one_side_each_cls_is_text_only_and_nothing_runs_twice():
    cells = plan_cells(parse_grid("1,N"), ["avg", "cls", "gpo", "fspool"], no_size_augment_too=True)
    assert Cell("cls", "gpo") not in cells and Cell("gpo", "cls") in cells
    assert Cell("avg", "gpo") in cells and Cell("gpo", "avg") in cells
    assert Cell("fspool", "gpo", False) in cells and Cell("gpo", "gpo", False) in cells
    assert len(cells) == len(set(cells))
    assert cells.count(Cell("gpo", "gpo")) == 1  # the grid's GPO cell is the aggregators' too
    # grid 4 + gpo, then per size-augmentation setting: avg×2, cls, gpo (shared), fspool×2
    assert len(cells) == 5 + 5 + 6


@pytest.mark.parametrize("text", ["1,x", "0,2", "1,1", ""])
def test_bad_grids_are_rejected(text):
    with pytest.raises(ValueError, match="--grid"):
        parse_grid(text)


def test_epochs_scale_the_decay_epoch_and_explicit_overrides_win(config_file):
    cfg = study_config(str(config_file), None, 4, [])
    assert (cfg.train.epochs, cfg.train.lr_decay_epoch) == (4, 2)
    cfg = study_config(str(config_file), None, 4, ["--lr_decay_epoch", "3", "--lr", "1e-3"])
    assert (cfg.train.lr_decay_epoch, cfg.train.lr) == (3, 1e-3)


def test_unknown_aggregators_and_missing_work_are_errors(config_file, tmp_path):
    args, extra = parse(["study", "pooling", "--config", str(config_file), "--out", str(tmp_path / "o.json"),
                         "--aggregators", "avg,median"])
    with pytest.raises(ValueError, match="median"):
        run_study(args, extra)
    args, extra = parse(["study", "pooling", "--config", str(config_file), "--out", str(tmp_path / "o.json")])
    with pytest.raises(ValueError, match="nothing to run"):
        run_study(args, extra)


# ---------------------------------------------------------------------------------------------
# Running: real training on a tiny dataset


def test_study_trains_each_cell_writes_json_and_pictures_and_resumes(config_file, tmp_path, monkeypatch):
    out = tmp_path / "res" / "study.json"
    result = study(config_file, out, "--grid", "1,N", "--aggregators", "cls,fspool")
    assert result["split"] == "dev"
    got = {(c["visual"], c["text"], c["size_augment"]) for c in result["cells"]}
    assert got == {("kmax:1", "kmax:1", True), ("kmax:1", "avg", True), ("avg", "kmax:1", True),
                   ("avg", "avg", True), ("gpo", "gpo", True), ("gpo", "cls", True),
                   ("fspool", "gpo", True), ("gpo", "fspool", True)}
    for c in result["cells"]:
        assert 0 <= c["rsum"] <= 600 and c["seconds"] > 0
        run = Path(c["run_dir"])
        saved = json.loads((run / "config.json").read_text())
        assert (saved["model"]["image_pooling"], saved["model"]["text_pooling"]) == (c["visual"], c["text"])
        assert sum("val" in json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()) == 2
    for png in ("study_grid.png", "study_aggregators.png"):
        with Image.open(out.parent / png) as im:
            assert im.size[0] > 300 and im.size[1] > 200

    # Re-running trains nothing and reports the same cells.
    def no_training(*a, **k):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(vseinf.studies.pooling_study, "train", no_training)
    again = study(config_file, out, "--grid", "1,N", "--aggregators", "cls,fspool", "--plots", str(tmp_path / "d" / "p"))
    assert [c["rsum"] for c in again["cells"]] == [c["rsum"] for c in result["cells"]]
    assert (tmp_path / "d" / "p_grid.png").is_file() and (tmp_path / "d" / "p_aggregators.png").is_file()

    # A cell killed after its last checkpoint resumes from it instead of starting over.
    killed = Path(result["cells"][2]["run_dir"])
    (killed / "metrics.json").unlink()
    (killed / "study_cell.json").unlink()
    calls = []
    monkeypatch.setattr(vseinf.studies.pooling_study, "train", lambda cfg, run_dir, resume=False, progress=True:
                        (calls.append((Path(run_dir), resume)), real_train(cfg, run_dir, resume, progress))[1])
    again = study(config_file, out, "--grid", "1,N", "--aggregators", "cls,fspool")
    assert calls == [(killed, True)]
    assert again["cells"][2]["rsum"] == result["cells"][2]["rsum"]


real_train = vseinf.studies.pooling_study.train


def test_a_changed_recipe_gets_new_run_directories(config_file):
    base = study_config(str(config_file), None, None, [])
    longer = study_config(str(config_file), None, 3, [])
    cell = Cell("max", "gpo")
    assert cell_dir(Path("r"), cell, cell.config(base)) != cell_dir(Path("r"), cell, cell.config(longer))
    assert cell_dir(Path("r"), cell, cell.config(base)) == cell_dir(Path("r"), cell, cell.config(base))


def test_pooling_lr_mult_retrains_only_cells_with_pooling_parameters(config_file):
    base = study_config(str(config_file), None, None, [])
    faster = study_config(str(config_file), None, None, ["--pooling_lr_mult", "10"])
    for cell in (Cell("kmax:5", "avg"), Cell("max", "cls")):
        assert cell_dir(Path("r"), cell, cell.config(base)) == cell_dir(Path("r"), cell, cell.config(faster))
    for cell in (Cell("gpo", "gpo"), Cell("kmax:5", "gem")):
        assert cell_dir(Path("r"), cell, cell.config(base)) != cell_dir(Path("r"), cell, cell.config(faster))
        assert cell.config(faster).train.pooling_lr_mult == 10.0


def test_parallel_jobs_give_the_sequential_results_in_planned_order(config_file, tmp_path):
    """``--jobs 2`` trains cells in worker processes; each cell is the same deterministic run."""
    one = study(config_file, tmp_path / "one" / "s.json", "--grid", "1,N")
    two = study(config_file, tmp_path / "two" / "s.json", "--grid", "1,N", "--jobs", "2")
    assert [(c["visual"], c["text"]) for c in two["cells"]] == [(c["visual"], c["text"]) for c in one["cells"]]
    assert [c["rsum"] for c in two["cells"]] == [c["rsum"] for c in one["cells"]]
    assert two["jobs"] == 2 and two["wall_seconds"] > 0


# ---------------------------------------------------------------------------------------------
# Coefficient plots


def test_fixed_pools_coefficients_are_their_definitions():
    sizes = [3, 8]
    avg = pooling_coefficients(build_pooling("avg", 4), sizes)
    torch.testing.assert_close(avg[1], torch.full((8,), 1 / 8))
    torch.testing.assert_close(avg[0], torch.tensor([1 / 3] * 3 + [0.0] * 5))
    assert pooling_coefficients(build_pooling("max", 4), sizes)[:, 0].eq(1).all()
    kmax = pooling_coefficients(build_pooling("kmax:5", 4), sizes)
    torch.testing.assert_close(kmax[1], torch.tensor([0.2] * 5 + [0.0] * 3))
    gpo = build_pooling("gpo", 4)
    torch.testing.assert_close(pooling_coefficients(gpo, sizes), gpo.coefficients(torch.tensor(sizes), 8))
    assert pooling_coefficients(build_pooling("gpo-perdim", 4), sizes).shape == (2, 8)
    for name in ("attention", "gpo-features", "gem"):
        with pytest.raises(ValueError, match="depend"):
            pooling_coefficients(build_pooling(name, 4), sizes)
    assert default_sizes(49) == [12, 24, 37, 49]


def test_plot_pooling_draws_a_trained_checkpoint(config_file, tmp_path):
    cfg = study_config(str(config_file), None, 1, [])
    run = tmp_path / "run"
    real_train(cfg, run, progress=False)
    args, extra = parse(["plot-pooling", str(run), "--out", str(tmp_path / "theta.png"), "--text-sizes", "3,6,9"],
                        add=add_plot_pooling_parser)
    assert run_plot_pooling(args, extra) == 0
    with Image.open(tmp_path / "theta.png") as im:
        assert im.size[0] > 500
    bad, extra = parse(["plot-pooling", str(run), "--out", str(tmp_path / "x.png"), "--text-sizes", "3,-1"],
                       add=add_plot_pooling_parser)
    with pytest.raises(ValueError, match="--text-sizes"):
        run_plot_pooling(bad, extra)
