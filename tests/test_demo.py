"""`vseinf demo`: indexes scikit-image's sample photos with a checkpoint, answers queries, says how to serve."""

import argparse
import shutil
from pathlib import Path

import pytest
import torch

skimage = pytest.importorskip("skimage")

from vseinf import demo  # noqa: E402
from vseinf.cli import demo as demo_cli  # noqa: E402
from vseinf.cli.encode import load_model_or_explain  # noqa: E402
from vseinf.model import BUNDLED_MODELS  # noqa: E402
from vseinf.search.gallery import Gallery  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint directory as `vseinf train` writes it, of a shrunk model (64 px MobileNetV2, BiGRU, 32-d)."""
    from vseinf.config import ModelConfig, RunConfig
    from vseinf.encoders.text import Vocabulary
    from vseinf.model import build_model, save_model

    torch.manual_seed(0)
    cfg = ModelConfig(image_size=64, text_encoder="bigru", word_dim=32, embed_dim=32)
    words = "a an the cat lying down cup of coffee on table rocket launch pad red motorcycle".split()
    model = build_model(cfg, vocab=Vocabulary.build([" ".join(words)], min_count=1))
    run = RunConfig(model=cfg)
    run.train.finetune_backbone = True  # store the backbone: reloads are identical
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "tiny", run)


def run_demo(argv):
    parser = argparse.ArgumentParser()
    demo_cli.add_demo_parser(parser.add_subparsers(dest="command"))
    return demo_cli.run_demo(parser.parse_args(["demo", *argv]), [])


def test_demo_indexes_the_sample_photos_and_answers_queries(tiny_checkpoint, tmp_path, capsys):
    work = tmp_path / "demo"
    assert run_demo(["--model", str(tiny_checkpoint), "--out", str(work), "--no-progress",
                     "--query", "a cat lying down", "--query", "a red motorcycle", "-k", "2"]) == 0
    out = capsys.readouterr().out
    shipped = [n for n in demo.SAMPLE_IMAGES if (demo.sample_images_dir() / n).is_file()]
    assert len(shipped) >= 10  # astronaut, coffee, chelsea, rocket, motorcycles, …
    gallery = Gallery.load(work / "index")
    assert sorted(it["path"] for it in gallery.items) == sorted(shipped)
    assert f"{len(shipped)} images ({len(shipped)} encoded" in out
    assert "“a cat lying down”" in out and "“a red motorcycle”" in out
    assert out.count("  1. ") == 2 and out.count("  2. ") == 2 and "  3. " not in out
    assert f"vseinf serve {work / 'index'}" in out and "http://127.0.0.1:8000/" in out
    # the index remembers its checkpoint, so `vseinf serve INDEX` needs no --model
    assert gallery.load_model().checkpoint_path == Path(tiny_checkpoint)

    assert run_demo(["--model", str(tiny_checkpoint), "--out", str(work), "--no-progress", "-k", "1"]) == 0
    again = capsys.readouterr().out
    assert f"(0 encoded, {len(shipped)} unchanged" in again  # nothing re-encoded
    for query in demo.EXAMPLE_QUERIES:
        assert f"“{query}”" in again
    # what a score is; each curated query names its photo and that photo's rank, even outside the top k
    assert "Scores are cosine similarities" in again
    assert "With this bundled model" not in again  # its typical scores are not this model's
    assert again.count(f" of {len(shipped)}\n") == len(demo.EXAMPLE_QUERIES)
    assert "A query outside what the model learned:\n\n“an astronaut in a space suit”" in again
    assert f"of {len(demo.EXAMPLES)} example queries rank the photo they describe first" in again


def load_checkpoint_model(path):
    from vseinf.model import load_model

    return load_model(path)


def test_demo_on_your_own_folder(tiny_checkpoint, tmp_path, capsys):
    photos = tmp_path / "mine"
    photos.mkdir()
    for name in ["coffee.png", "rocket.jpg"]:
        shutil.copy2(demo.sample_images_dir() / name, photos / name)
    (photos / "broken.jpg").write_bytes(b"definitely not a jpeg")
    answers = demo.run_demo_session(load_checkpoint_model(tiny_checkpoint), images=photos, workdir=tmp_path / "w",
                                    queries=["a rocket"], k=5, progress=False, echo=lambda *a: None)
    assert sorted(r["path"] for r in answers["a rocket"]) == ["coffee.png", "rocket.jpg"]
    with pytest.raises(ValueError, match="not a folder"):
        run_demo(["--model", str(tiny_checkpoint), "--images", str(photos / "nope")])


def test_missing_bundled_model_says_what_to_do(tmp_path, monkeypatch):
    import vseinf.model.vse

    monkeypatch.setattr(vseinf.model.vse, "BUNDLED_DIR", tmp_path / "not-installed")
    with pytest.raises(ValueError, match="bundled model is not installed.*--model"):
        load_model_or_explain(None)
    with pytest.raises(ValueError, match="--model"):
        run_demo(["--out", str(tmp_path / "w")])


def test_bundled_models_are_found_by_name_even_after_the_package_moves(tiny_checkpoint, tmp_path, monkeypatch):
    import vseinf.model.vse as vse
    from vseinf.eval.embedding import resolve_checkpoint
    from vseinf.model import load_model
    from vseinf.search.build import encode_gallery

    installed = tmp_path / "site-packages" / "tiny"
    shutil.copytree(tiny_checkpoint, installed)
    monkeypatch.setattr(vse, "BUNDLED_MODELS", {"tiny-bundled": installed})
    model = load_model("tiny-bundled")
    assert model.checkpoint_path == installed
    assert resolve_checkpoint("tiny-bundled") == installed  # what eval and plot-pooling take
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy2(demo.sample_images_dir() / "coffee.png", photos / "coffee.png")
    encode_gallery(photos, tmp_path / "index", model, progress=False)
    assert Gallery.load(tmp_path / "index").meta["model"]["bundled"] == "tiny-bundled"
    # a reinstall puts the package elsewhere: the index finds its model by name, not by the old path
    moved = tmp_path / "elsewhere" / "tiny"
    shutil.move(installed, moved)
    monkeypatch.setattr(vse, "BUNDLED_MODELS", {"tiny-bundled": moved})
    assert Gallery.load(tmp_path / "index").load_model().checkpoint_path == moved
    # a folder of that name in the working directory is a path, not the bundled model
    monkeypatch.chdir(tmp_path)
    shutil.copytree(moved, tmp_path / "tiny-bundled")
    assert load_model("tiny-bundled").checkpoint_path == Path("tiny-bundled")
    with pytest.raises(Exception, match="no-such-model"):
        load_model("no-such-model")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUNDLED_MODELS))
def test_bundled_model_ranks_each_curated_photo_first(tmp_path, name):
    """The demo's curated queries are what each bundled model does well: each finds its photo first;
    the one shown as a limit does not, as the demo says."""
    import vseinf

    if not (BUNDLED_MODELS[name] / "model.safetensors").is_file():
        pytest.skip(f"the bundled model {name} is not installed")
    lines = []
    answers = demo.run_demo_session(vseinf.load_model(name), workdir=tmp_path, k=1, progress=False,
                                    echo=lines.append, limit_example=demo.LIMIT_EXAMPLE)
    for query, expected in demo.EXAMPLES:
        assert answers[query][0]["path"] in expected, (query, answers[query])
    out = "\n".join(lines)
    assert f"{len(demo.EXAMPLES)} of {len(demo.EXAMPLES)} example queries rank the photo they describe first" in out
    assert " ".join(demo.BUNDLED_SCORE_NOTES[name].split()) in " ".join(out.split())
    limit, expected = demo.LIMIT_EXAMPLE
    assert answers[limit][0]["path"] not in expected
    # the miss is shown with the photo's real rank below the top k
    assert "  …\n" in out.split(f"“{limit}”")[1]
