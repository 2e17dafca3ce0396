"""Feature extraction that is stopped resumes where it stopped and leaves nothing behind: the
resumable cache writer, grid features of real images with a real (shrunk) CNN, token features."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vseinf.data.cache import FeatureCache, FeatureCacheWriter
from vseinf.data.splits import open_split
from vseinf.features import BROKEN_KEY, image_sets, text_sets


def items(n: int, dim: int = 3) -> list[np.ndarray]:
    return [np.full((1 + i % 4, dim), float(i)) for i in range(n)]


def test_a_resumable_writer_continues_from_its_last_record(tmp_path):
    target, data = tmp_path / "c", items(10)
    first = FeatureCacheWriter(target, dim=3, n_items=10, resumable=True, checkpoint_every=4, keys=list("abcdefghij"))
    for x in data[:7]:
        first.append(x)
    first.keys[5] = "broken"
    first.abort()  # as after Ctrl-C: the items up to the last record (8 would be next) stay
    assert not target.exists()
    second = FeatureCacheWriter(target, dim=3, n_items=10, resumable=True, checkpoint_every=4, keys=list("abcdefghij"))
    assert second.count == second.resumed == 4  # items 4..6 came after the last record: written again
    assert second.keys == list("abcdefghij")  # the record holds the keys as they were at item 4
    for x in data[4:]:
        second.append(x)
    cache = second.close()
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no partial folder, no progress file, no lock
    assert sorted(p.name for p in target.iterdir()) == ["features.npy", "meta.json", "offsets.npy"]
    for i, x in enumerate(data):
        np.testing.assert_array_equal(cache[i], x)
    # the same as a writer that was never stopped
    with FeatureCacheWriter(tmp_path / "once", dim=3, n_items=10, keys=list("abcdefghij")) as once:
        for x in data:
            once.append(x)
    assert (target / "features.npy").read_bytes() == (tmp_path / "once" / "features.npy").read_bytes()


def test_other_settings_a_restart_or_a_busy_partial_start_over(tmp_path):
    target = tmp_path / "c"
    w = FeatureCacheWriter(target, dim=3, n_items=10, resumable=True, checkpoint_every=2, signature={"w": 1})
    for x in items(5):
        w.append(x)
    w.abort()
    assert FeatureCacheWriter(target, dim=3, n_items=10, resumable=True, signature={"w": 2}).count == 0
    w = FeatureCacheWriter(target, dim=3, n_items=10, resumable=True, checkpoint_every=2, signature={"w": 1})
    for x in items(5):
        w.append(x)
    w.abort()
    assert FeatureCacheWriter(target, dim=3, n_items=10, resumable=True, signature={"w": 1}, restart=True).count == 0
    # while one writer holds the partial folder, a second one (another process) writes a private copy
    holder = FeatureCacheWriter(target, dim=3, n_items=2, resumable=True, signature={"w": 1})
    other = FeatureCacheWriter(target, dim=3, n_items=2, resumable=True, signature={"w": 1})
    assert ".tmp-" in other._tmp.name and holder._tmp.name == ".c.partial"
    for w in (holder, other):
        for x in items(2):
            w.append(x)
    holder.close()
    other.close()  # keeps the cache the first one published
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_temporary_folders_of_killed_writers_are_removed(tmp_path):
    """A writer killed outright (SIGKILL) leaves its private folder; the next writer of that cache
    removes it, but not the folder of a writer that is still running."""
    script = ("import os, sys, numpy as np\n"
              "from vseinf.data.cache import FeatureCacheWriter\n"
              "w = FeatureCacheWriter(sys.argv[1], dim=2, n_items=3)\n"
              "w.append(np.ones((1, 2)))\n"
              "os.kill(os.getpid(), 9)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "c")], env=env)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".c.tmp-")
    running = FeatureCacheWriter(tmp_path / "c", dim=2, n_items=1)  # this process: alive
    assert [p.name for p in tmp_path.iterdir()] == [running._tmp.name]
    FeatureCacheWriter(tmp_path / "c", dim=2, n_items=1).abort()
    assert [p.name for p in tmp_path.iterdir()] == [running._tmp.name]
    running.abort()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Grid features of real images


@pytest.fixture(scope="module")
def photo_split(tmp_path_factory):
    """A folder of 21 photos (one unreadable) with a captions.csv."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    rows = ["image,caption"]
    for i in range(21):
        name = f"p{i:02d}.jpg"
        if i == 9:
            (root / name).write_bytes(b"not a jpeg")
        else:
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / name)
        rows.append(f"{name},photo number {i}")
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return open_split(root)


@pytest.fixture(scope="module")
def small_model():
    from vseinf.config import ModelConfig
    from vseinf.encoders.text import Vocabulary
    from vseinf.model import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(image_size=64, text_encoder="bigru", word_dim=16, embed_dim=16)
    return build_model(cfg, vocab=Vocabulary.build(["photo number"], min_count=1)).eval()


def test_stopped_grid_extraction_resumes_to_the_same_cache(photo_split, small_model, tmp_path, monkeypatch,
                                                           capsys):
    import vseinf.features as features

    real = small_model.image.features
    calls = []

    def stop_at_the_fourth_batch(pixels):
        calls.append(len(pixels))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(pixels)

    monkeypatch.setenv("VSEINF_CACHE", str(tmp_path / "resumed"))
    original = features.extract_grid_features

    def small_records(*args, **kwargs):  # a record every 2 batches of 4 images
        return original(*args, **dict(kwargs, checkpoint_every=8))

    monkeypatch.setattr(features, "extract_grid_features", small_records)
    monkeypatch.setattr(small_model.image, "features", stop_at_the_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        features.image_sets(small_model, photo_split, batch_size=4, progress=False)
    # the probe (1 image) and 2 batches ran; the 3rd (images 8-11, 9 unreadable) came after the record at 8
    assert calls == [1, 4, 4, 3]
    assert "8 of 21 images kept; run the same command again to continue" in capsys.readouterr().out
    monkeypatch.setattr(small_model.image, "features", lambda pixels: calls.append(len(pixels)) or real(pixels))
    calls.clear()
    resumed = features.image_sets(small_model, photo_split, batch_size=4, progress=False)
    assert "resuming after 8 of 21 images" in capsys.readouterr().out
    assert calls == [1, 3, 4, 4, 1]  # images 8..20, one of them (9) unreadable
    assert resumed.broken.tolist() == [i == 9 for i in range(21)] and resumed.cache.keys[9] == BROKEN_KEY
    cache_root = tmp_path / "resumed" / "features"
    assert [p.name for p in cache_root.iterdir()] == [resumed.cache.directory.name]

    monkeypatch.setenv("VSEINF_CACHE", str(tmp_path / "once"))
    monkeypatch.setattr(small_model.image, "features", real)
    once = image_sets(small_model, photo_split, batch_size=4, progress=False)
    assert resumed.cache.keys == once.cache.keys
    np.testing.assert_array_equal(resumed.cache.batch(range(21))[0], once.cache.batch(range(21))[0])


# ---------------------------------------------------------------------------------------------
# Token features


class CountingText:
    """A stand-in transformer: token features that depend only on the caption; stops on request."""

    hidden_size = 4

    def __init__(self, stop_at_call: int | None = None):
        self.calls: list[int] = []
        self.stop_at_call = stop_at_call

    def token_features(self, captions, batch_size=64, max_length=None, progress=None):
        self.calls.append(len(captions))
        if len(self.calls) == self.stop_at_call:
            raise KeyboardInterrupt
        return [torch.full((len(c.split()), 4), float(len(c))) for c in captions]


def test_stopped_text_extraction_resumes_by_chunks(photo_split, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VSEINF_CACHE", str(tmp_path))
    (tmp_path / "minilm").mkdir()
    config = SimpleNamespace(text_encoder="transformer", text_model=str(tmp_path / "minilm"), max_text_length=16)
    model = SimpleNamespace(config=config, text=CountingText(stop_at_call=3))
    with pytest.raises(KeyboardInterrupt):
        text_sets(model, photo_split, progress=False, chunk=5)
    assert model.text.calls == [5, 5, 5]
    assert "10 of 21 captions kept" in capsys.readouterr().out
    model.text = CountingText()
    cache = text_sets(model, photo_split, progress=False, chunk=5).cache
    assert model.text.calls == [5, 5, 1]
    for i, caption in enumerate(photo_split.captions):
        np.testing.assert_array_equal(cache[i], np.full((len(caption.split()), 4), float(len(caption))))


def test_a_cache_keyed_by_the_path_as_typed_is_still_used(photo_split, small_model, tmp_path, monkeypatch):
    """Caches are keyed by the image folder's resolved path, so the same data typed from another
    folder finds its cache; one made when the key was the path as typed is found too."""
    import vseinf.features as features
    from vseinf.data.cache import cache_path

    monkeypatch.setenv("VSEINF_CACHE", str(tmp_path / "cache"))
    root = Path(photo_split.image_root)
    monkeypatch.chdir(root.parent)
    typed = open_split(root.name)  # "photos0/captions.csv", relative
    cfg = small_model.config
    name = f"{typed.name}-{cfg.backbone}-{cfg.image_size}"
    signature = {"kind": "grid", "backbone": cfg.backbone, "weights": f"default:{cfg.backbone}",
                 "image_size": cfg.image_size, "images": features._split_id(typed, resolved=False),
                 "n_images": typed.n_images}
    old = features.extract_grid_features(small_model, typed, cache_path(name, signature), signature, 8,
                                         progress=False)

    def no_extraction(pixels):
        raise AssertionError("the cache was not found")

    monkeypatch.setattr(small_model.image, "features", no_extraction)
    assert features.image_sets(small_model, typed, progress=False).cache.directory == old.directory
