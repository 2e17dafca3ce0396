"""Search over videos: `vseinf encode` on a folder of real video files (an image model frame by frame,
and a video model through its frame extractor and video tower) and on frame-feature files; clip
thumbnails; `vseinf search` by text and by video; the web app's video results and thumbnails."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vseinf.cli import main
from vseinf.model import BUNDLED_DIR
from vseinf.search.build import encode_gallery, encode_texts_np
from vseinf.search.files import thumb_name
from vseinf.search.gallery import Gallery
from vseinf.video import FrameExtractor, FrameSampler, VideoEmbedder, embed_video_files, middle_frame


def _shared(name: str) -> Path:
    env = os.environ.get("VSEINF_SHARED_DATA")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return base / name


VIDEOS = _shared("videos")
needs_videos = pytest.mark.skipif(not (VIDEOS / "bikes.mp4").is_file(),
                                  reason="shared video clips not present (../shared/data/videos)")
CLIPS = ("bigbuckbunny.mp4", "bikes.mp4")
# Queries on which the bundled Flickr8k model tells the two clips apart (bikes: a cyclist in a
# street; bigbuckbunny: a big grey cartoon animal on grass).
BIKE_QUERY = "a man riding a bicycle on the street"
BUNNY_QUERY = "a big grey animal standing on green grass"


def corrupt_video(folder: Path, name: str = "broken.mp4") -> Path:
    bad = folder / name
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    return bad


def clip_folder(root: Path) -> Path:
    """The two real clips (copied: links to files outside a gallery are refused), a corrupt
    .mp4 and a text file."""
    root.mkdir(parents=True)
    for name in CLIPS:
        shutil.copy2(VIDEOS / name, root / name)
    corrupt_video(root)
    (root / "notes.txt").write_text("not a video")
    return root


def frames_model(feature_dim: int = 1280, seed: int = 0):
    """A real VSE∞ video model, untrained and small: frames tower (fc + MLP → GPO), BiGRU text, 32-d."""
    from vseinf.config import ModelConfig
    from vseinf.encoders.text import Vocabulary
    from vseinf.model import VSEModel

    torch.manual_seed(seed)
    words = "a man rides bike on the street rabbit in grass".split()
    return VSEModel(ModelConfig(image_encoder="frames", feature_dim=feature_dim, text_encoder="bigru",
                                embed_dim=32, word_dim=8),
                    vocab=Vocabulary.build([" ".join(words)], min_count=1).words).eval()


def save_checkpoint(model, path: Path) -> Path:
    from vseinf.config import RunConfig
    from vseinf.model import save_model

    save_model(model, path, RunConfig(model=model.config))
    return path


def small_extractor() -> FrameExtractor:
    return FrameExtractor("mobilenet_v2", "default", image_size=64, sampler=FrameSampler(num_frames=3))


def jpeg(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    assert im.format == "JPEG"
    im.load()
    return im


@pytest.fixture(scope="module")
def bundled():
    if not (BUNDLED_DIR / "model.safetensors").is_file():
        pytest.skip("the bundled model is not installed")
    from vseinf.model import load_model

    return load_model()


@pytest.fixture(scope="module")
def image_model_gallery(tmp_path_factory, bundled):
    """The real clips encoded with the bundled image model (3 frames a clip): (root, index, report)."""
    if not (VIDEOS / "bikes.mp4").is_file():
        pytest.skip("shared video clips not present")
    base = tmp_path_factory.mktemp("videos")
    root = clip_folder(base / "clips")
    index = base / "index"
    report = encode_gallery(root, index, bundled, progress=False,
                            video=VideoEmbedder(bundled, FrameSampler(num_frames=3)))
    return root, index, report


# ---------------------------------------------------------------------------------------------
# Video files, image model


@needs_videos
def test_video_folder_gallery_has_every_clip_and_a_middle_frame_thumbnail(image_model_gallery):
    root, index, report = image_model_gallery
    gallery = Gallery.load(index)
    assert gallery.kind == "videos" and gallery.video_source == "files"
    assert [it["path"] for it in gallery.items] == list(CLIPS) and len(gallery) == 2
    assert gallery.embeddings.shape == (2, gallery.load_model().embed_dim)
    np.testing.assert_allclose(np.linalg.norm(gallery.embeddings, axis=1), 1.0, atol=1e-5)
    embedder = VideoEmbedder.from_settings(gallery.load_model(), gallery.meta["video"]["embedder"])
    assert embedder.sampler == FrameSampler(num_frames=3) and not embedder.video_model
    for row, item in enumerate(gallery.items):
        assert item["frames"] == 3 and item["thumb"] == thumb_name(item["path"])
        thumb = gallery.thumb_file(item["path"])
        assert thumb is not None and thumb.parent == index.resolve()
        im = jpeg(thumb.read_bytes())
        assert max(im.size) == 256
        # With 3 uniform frames the middle one is the clip's middle frame: the thumbnail shows it.
        middle = middle_frame(root / item["path"]).convert("RGB").resize(im.size)
        diff = np.abs(np.asarray(im, np.float32) - np.asarray(middle, np.float32)).mean()
        assert diff < 12, f"{item['path']}: thumbnail is not the middle frame (mean |Δ| {diff:.1f})"
        # The stored row is the clip's embedding: the mean of its frame embeddings, renormalised.
        np.testing.assert_allclose(gallery.embeddings[row], embedder.embed_file(root / item["path"])[0],
                                   atol=1e-4)


@needs_videos
def test_corrupt_video_and_other_files_are_named_and_skipped(image_model_gallery):
    _, index, report = image_model_gallery
    assert report.kind == "videos" and report.total == report.encoded == 2
    skipped = {s.path: s.reason for s in report.skipped}
    assert set(skipped) == {"broken.mp4", "notes.txt"}
    assert "not a video file" in skipped["notes.txt"]
    assert skipped["broken.mp4"].startswith("not a readable video")
    summary = report.summary()
    assert "2 clips" in summary and "skipped broken.mp4:" in summary
    assert {s["path"] for s in Gallery.load(index).meta["skipped"]} == {"broken.mp4", "notes.txt"}


@needs_videos
def test_text_search_ranks_the_clips(image_model_gallery, bundled):
    root, index, _ = image_model_gallery
    gallery = Gallery.load(index)
    for query, first in ((BIKE_QUERY, "bikes"), (BUNNY_QUERY, "bigbuckbunny")):
        results = gallery.search(encode_texts_np(bundled, [query]), 10)[0]
        assert [r["id"] for r in results][0] == first and len(results) == 2
        assert results[0]["score"] > results[1]["score"]
        assert all(r["kind"] == "video" and r["thumb"] == thumb_name(r["path"]) for r in results)


@needs_videos
def test_search_command_prints_clips(image_model_gallery, capsys):
    root, index, _ = image_model_gallery
    assert main(["search", str(index), BIKE_QUERY, "--json", "-k", "5"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["id"] for r in results] == ["bikes", "bigbuckbunny"]
    assert results[0]["path"] == "bikes.mp4" and results[0]["file"] == str(root.resolve() / "bikes.mp4")
    assert jpeg(Path(results[0]["thumb"]).read_bytes()) and results[0]["kind"] == "video"
    # video → video: the clip itself comes first, at cosine ≈ 1
    assert main(["search", str(index), "--video", str(root / "bigbuckbunny.mp4"), "-k", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("bigbuckbunny.mp4") and " 1.0000 " in lines[0]
    assert main(["search", str(index), "--video", str(root / "broken.mp4")]) == 2
    assert "broken.mp4" in capsys.readouterr().err


@needs_videos
def test_re_encoding_reuses_unchanged_clips_and_their_thumbnails(tmp_path):
    from vseinf.config import ModelConfig
    from vseinf.encoders.text import Vocabulary
    from vseinf.model import build_model

    torch.manual_seed(0)  # a small image model (MobileNetV2 at 64 px, random heads): only reuse matters here
    model = build_model(ModelConfig(image_size=64, text_encoder="bigru", word_dim=8, embed_dim=16),
                        vocab=Vocabulary.build(["a bike"], min_count=1)).eval()
    root = tmp_path / "clips"
    root.mkdir()
    shutil.copy2(VIDEOS / "bikes.mp4", root / "bikes.mp4")
    index = tmp_path / "index"
    video = VideoEmbedder(model, FrameSampler(num_frames=1))
    first = encode_gallery(root, index, model, progress=False, video=video)
    assert (first.encoded, first.reused) == (1, 0)
    before = Gallery.load(index)
    thumb = before.thumb_file("bikes.mp4").read_bytes()
    row = np.array(before.embeddings[0])

    (root / "sub").mkdir()
    shutil.copy2(VIDEOS / "bigbuckbunny.mp4", root / "sub" / "bunny.mp4")
    second = encode_gallery(root, index, model, progress=False, video=video)
    assert (second.total, second.encoded, second.reused) == (2, 1, 1)
    after = Gallery.load(index)
    assert [it["path"] for it in after.items] == ["bikes.mp4", "sub/bunny.mp4"]
    assert after.thumb_file("bikes.mp4").read_bytes() == thumb
    np.testing.assert_array_equal(after.embeddings[0], row)
    assert jpeg(after.thumb_file("sub/bunny.mp4").read_bytes())

    (root / "bikes.mp4").unlink()
    third = encode_gallery(root, index, model, progress=False, video=video)
    assert (third.total, third.encoded, third.removed) == (1, 0, 1)
    assert sorted(p.name for p in index.glob("thumb-*.jpg")) == [thumb_name("sub/bunny.mp4")]
    # Other frame settings cannot reuse the rows.
    other = encode_gallery(root, index, model, progress=False, video=VideoEmbedder(model, FrameSampler(num_frames=2)))
    assert other.encoded == 1 and "other frame settings" in other.note


# ---------------------------------------------------------------------------------------------
# The web app


@needs_videos
def test_served_video_gallery_shows_clips_with_thumbnails(image_model_gallery, bundled):
    pytest.importorskip("fastapi")
    try:
        from fastapi.testclient import TestClient
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"FastAPI's TestClient is unavailable ({exc})")
    from vseinf.serve.app import create_app

    root, index, _ = image_model_gallery
    gallery = Gallery.load(index)
    (index.parent / "secret.jpg").write_bytes(gallery.thumb_file("bikes.mp4").read_bytes())
    with TestClient(create_app(gallery=gallery, model=bundled), base_url="http://localhost") as client:
        info = client.get("/api/info").json()
        assert info["kind"] == "videos" and info["size"] == 2 and info["skipped"] == 2
        assert info["video_source"] == "files" and info["image_queries"] is True

        r = client.get("/api/search", params={"q": BIKE_QUERY, "k": 5})
        assert r.status_code == 200
        results = r.json()["results"]
        assert [x["id"] for x in results] == ["bikes", "bigbuckbunny"]
        assert all(x["kind"] == "video" and x["path"] in CLIPS for x in results)
        for x in results:
            assert x["thumb"] == f"/api/thumb?path={x['path']}"
            t = client.get(x["thumb"])
            assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
            assert t.content == gallery.thumb_file(x["path"]).read_bytes() and max(jpeg(t.content).size) == 256
            original = client.get(x["file"])  # the clip itself, to open from the page
            assert original.status_code == 200 and original.content == (root / x["path"]).read_bytes()

        # A photo of the bunny (its middle frame) finds the bunny clip.
        buf = io.BytesIO()
        middle_frame(root / "bigbuckbunny.mp4").save(buf, "PNG")
        r = client.post("/api/search/image", files={"file": ("bunny.png", buf.getvalue(), "image/png")})
        assert r.status_code == 200 and r.json()["results"][0]["id"] == "bigbuckbunny"

        # Only the thumbnails of listed clips are reachable.
        for bad in ("../secret.jpg", "../../etc/passwd", gallery.items[0]["thumb"], "gallery.json",
                    str(root / "bikes.mp4"), "notes.txt", "broken.mp4"):
            t = client.get("/api/thumb", params={"path": bad})
            assert t.status_code == 404 and "not a clip of this gallery" in t.json()["detail"]
        assert client.get("/api/thumb").status_code == 400

        page = client.get("/")
        assert page.status_code == 200 and "/static/app.js" in page.text
        script = client.get("/static/app.js").text
        assert "clipPicture" in script and "placeholder" in script

    # A gallery.json edited to point a clip's thumbnail elsewhere still serves nothing outside.
    meta = json.loads((index / "gallery.json").read_text())
    meta["items"][0]["thumb"] = "../secret.jpg"
    tampered = Gallery(gallery.path, meta, gallery.embeddings, gallery.engine)
    assert tampered.thumb_file(meta["items"][0]["path"]) is None


# ---------------------------------------------------------------------------------------------
# Video files, video model (frame extractor → video tower)


@needs_videos
def test_video_model_encodes_video_files_with_the_recorded_extractor(tmp_path, capsys):
    model = frames_model()
    checkpoint = save_checkpoint(model, tmp_path / "ckpt")
    extractor = small_extractor()
    settings = tmp_path / "extract.json"
    settings.write_text(json.dumps(extractor.settings()))
    root = clip_folder(tmp_path / "clips")
    index = tmp_path / "index"
    assert main(["encode", str(root), "--out", str(index), "--model", str(checkpoint),
                 "--extract-settings", str(settings), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "2 clips (2 encoded" in printed and "skipped broken.mp4" in printed
    gallery = Gallery.load(index)
    assert [it["path"] for it in gallery.items] == list(CLIPS)
    assert gallery.meta["video"]["embedder"]["extractor_settings"] == extractor.settings()
    # The same vectors as decoding → frame features → the video tower, file by file.
    direct, ok, _ = embed_video_files(model, [root / c for c in CLIPS], small_extractor())
    assert ok.all()
    np.testing.assert_allclose(gallery.embeddings, direct.numpy(), atol=1e-5)
    assert all(jpeg(gallery.thumb_file(c).read_bytes()) for c in CLIPS)

    assert main(["search", str(index), "--video", str(root / "bikes.mp4"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert results[0]["id"] == "bikes" and results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert main(["search", str(index), "a man rides a bike", "--json"]) == 0
    assert {r["id"] for r in json.loads(capsys.readouterr().out)["results"]} == {"bikes", "bigbuckbunny"}

    # Without the settings, frames from another backbone width are refused before any decoding.
    small = save_checkpoint(frames_model(feature_dim=128), tmp_path / "ckpt128")
    assert main(["encode", str(root), "--out", str(tmp_path / "other"), "--model", str(small),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "128-d frame features" in err and "1280-d" in err and "--extract-settings" in err
    assert not (tmp_path / "other").exists()


# ---------------------------------------------------------------------------------------------
# Frame-feature files (no video decoding; works without the shared clips)


@pytest.fixture
def feature_folder(tmp_path):
    """Four <id>.npy clips of 16-d frame features, plus one of the wrong width and one with a NaN."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "features"
    folder.mkdir()
    arrays = {}
    for vid, t in (("clip0", 5), ("clip1", 9), ("clip2", 3), ("clip3", 7)):
        arrays[vid] = rng.standard_normal((t, 16)).astype(np.float32)
        np.save(folder / f"{vid}.npy", arrays[vid])
    np.save(folder / "wide.npy", rng.standard_normal((4, 20)).astype(np.float32))
    nan = rng.standard_normal((4, 16)).astype(np.float32)
    nan[1, 2] = np.nan
    np.save(folder / "holey.npy", nan)
    return folder, arrays


def test_feature_folder_gallery(tmp_path, feature_folder, capsys):
    folder, arrays = feature_folder
    model = frames_model(feature_dim=16)
    checkpoint = save_checkpoint(model, tmp_path / "ckpt")
    index = tmp_path / "index"
    assert main(["encode", str(folder), "--out", str(index), "--model", str(checkpoint), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "4 clips (4 encoded" in printed and "skipped wide:" in printed and "skipped holey:" in printed
    gallery = Gallery.load(index)
    assert gallery.kind == "videos" and gallery.video_source == "features"
    assert [it["path"] for it in gallery.items] == ["clip0", "clip1", "clip2", "clip3"]
    assert [it["frames"] for it in gallery.items] == [5, 9, 3, 7]
    reasons = {s["path"]: s["reason"] for s in gallery.meta["skipped"]}
    assert "20-d" in reasons["wide"] and "non-finite" in reasons["holey"]
    expected = model.encode_image_features([torch.from_numpy(arrays[v]) for v in sorted(arrays)]).numpy()
    np.testing.assert_allclose(gallery.embeddings, expected, atol=1e-5)
    assert not list(index.glob("thumb-*"))

    # Search: text and a feature file as the query; no thumbnails (the page shows the clip id).
    assert main(["search", str(index), "a man rides a bike", "--json", "-k", "3"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert len(results) == 3 and all(r["kind"] == "video" and r["thumb"] is None for r in results)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert main(["search", str(index), "--video", str(folder / "clip2.npy"), "--json", "-k", "1"]) == 0
    top = json.loads(capsys.readouterr().out)["results"][0]
    assert top["id"] == "clip2" and top["score"] == pytest.approx(1.0, abs=1e-5)
    assert main(["search", str(index), "--video", str(folder / "wide.npy")]) == 2
    assert "expected T × 16" in capsys.readouterr().err

    # Re-encoding (with the same checkpoint) reuses every row; a changed file is encoded again.
    model = gallery.load_model()
    again = encode_gallery(folder, index, model, progress=False)
    assert (again.encoded, again.reused) == (0, 4)
    np.save(folder / "clip1.npy", arrays["clip1"][:4])
    changed = encode_gallery(folder, index, model, progress=False)
    assert (changed.encoded, changed.reused) == (1, 3)
    assert Gallery.load(index).items[1]["frames"] == 4


def test_feature_files_need_a_video_model_of_their_width(tmp_path, feature_folder):
    folder, _ = feature_folder
    with pytest.raises(ValueError, match=r"16-d frame features, but the model takes 32-d"):
        encode_gallery(folder, tmp_path / "a", frames_model(feature_dim=32), progress=False)
    from vseinf.config import ModelConfig
    from vseinf.encoders.text import Vocabulary
    from vseinf.model import build_model

    image_model = build_model(ModelConfig(image_size=64, backbone_weights="none", text_encoder="bigru",
                                          word_dim=8, embed_dim=16),
                              vocab=Vocabulary.build(["a"], min_count=1), pretrained=False)
    with pytest.raises(ValueError, match="need a video model"):
        encode_gallery(folder, tmp_path / "b", image_model, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_served_feature_gallery_has_placeholders_not_thumbnails(tmp_path, feature_folder):
    pytest.importorskip("fastapi")
    try:
        from fastapi.testclient import TestClient
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"FastAPI's TestClient is unavailable ({exc})")
    from vseinf.serve.app import create_app

    folder, _ = feature_folder
    model = frames_model(feature_dim=16)
    encode_gallery(folder, tmp_path / "index", model, progress=False)
    with TestClient(create_app(tmp_path / "index", model=model), base_url="http://localhost") as client:
        info = client.get("/api/info").json()
        assert info["kind"] == "videos" and info["video_source"] == "features" and info["image_queries"] is False
        results = client.get("/api/search", params={"q": "a bike", "k": 2}).json()["results"]
        assert len(results) == 2 and all(r["thumb"] is None and r["id"] == r["path"] for r in results)
        assert all("file" not in r for r in results)  # feature files are not something to open
        t = client.get("/api/thumb", params={"path": "clip0"})
        assert t.status_code == 404 and "frame-feature files" in t.json()["detail"]
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), "red").save(buf, "PNG")
        r = client.post("/api/search/image", files={"file": ("red.png", buf.getvalue(), "image/png")})
        assert r.status_code == 400 and "search it by text" in r.json()["detail"]


def test_hdf5_frame_features(tmp_path, feature_folder):
    h5py = pytest.importorskip("h5py")
    _, arrays = feature_folder
    with h5py.File(tmp_path / "clips.h5", "w") as f:
        for vid, x in arrays.items():
            f[vid] = x
    model = frames_model(feature_dim=16)
    report = encode_gallery(tmp_path / "clips.h5", tmp_path / "index", model, progress=False)
    assert report.kind == "videos" and report.total == 4 and not report.skipped
    gallery = Gallery.load(tmp_path / "index")
    assert gallery.video_source == "features" and [it["id"] for it in gallery.items] == sorted(arrays)
    expected = model.encode_image_features([torch.from_numpy(arrays[v]) for v in sorted(arrays)]).numpy()
    np.testing.assert_allclose(gallery.embeddings, expected, atol=1e-5)
