"""Thumbnails: decoded small (draft / reduce) and matching the slow reference, stored in the index
at encode time, served from there, and made on request at most a few at a time, once per photo."""

import io
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageFile

from vseinf import thumbnails
from vseinf.thumbnails import (
    THUMB_SIZE,
    ThumbnailError,
    ThumbnailMaker,
    image_thumb_name,
    load_thumbnail,
    load_thumbnail_reference,
    make_image_thumbnails,
)


def _gradient(w, h, mode="RGB"):
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.broadcast_to((x + y) / 2, (h, w, 1))], axis=2).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").convert(mode)


def _photos(folder):
    """Files of the kinds a photo folder holds, with their expected thumbnail sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    _gradient(4000, 3000).save(folder / "big.jpg", quality=90)
    _gradient(1200, 900).save(folder / "plain.png")
    _gradient(600, 800, "RGBA").save(folder / "alpha.png")
    _gradient(900, 300).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.gif")
    _gradient(100, 80).save(folder / "small.jpg")
    rotated = _gradient(800, 600)
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored sideways: displayed rotated 90° clockwise, i.e. 600 × 800
    rotated.save(folder / "sideways.jpg", exif=exif.tobytes())
    return {"big.jpg": (256, 192), "plain.png": (256, 192), "alpha.png": (192, 256), "palette.gif": (256, 85),
            "small.jpg": (100, 80), "sideways.jpg": (192, 256)}


def test_thumbnails_match_the_slow_reference(tmp_path):
    for name, size in _photos(tmp_path).items():
        fast, slow = load_thumbnail(tmp_path / name), load_thumbnail_reference(tmp_path / name)
        assert fast.mode == "RGB" and fast.size == size == slow.size, name
        diff = np.abs(np.asarray(fast, np.float32) - np.asarray(slow, np.float32))
        assert diff.mean() < 3.0, (name, diff.mean())  # draft/reduce filter a little differently


def test_large_photos_are_decoded_small_and_never_copied_at_full_size(tmp_path, monkeypatch):
    _photos(tmp_path)
    seen = []
    for method in ("convert", "copy", "transpose"):
        original = getattr(Image.Image, method)

        def spy(self, *args, _original=original, _method=method, **kwargs):
            seen.append((_method, self.size))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Image.Image, method, spy)
    decoded = []
    original_load = ImageFile.ImageFile.load

    def load_spy(self):
        decoded.append(self.size)
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load_spy)
    for name in ("big.jpg", "plain.png", "sideways.jpg"):
        seen.clear()
        decoded.clear()
        load_thumbnail(tmp_path / name)
        assert all(max(size) <= THUMB_SIZE for _, size in seen), (name, seen)
        if name == "big.jpg":  # the JPEG decoder itself scaled it: 4000 × 3000 → 1/4 (twice 256 or more)
            assert decoded and max(max(s) for s in decoded) <= 4000 // 4


def test_unreadable_and_oversized_files(tmp_path, monkeypatch):
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ThumbnailError, match="not a readable image"):
        load_thumbnail(tmp_path / "text.jpg")
    _gradient(400, 300).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 120,000 pixels is over twice the limit
    with pytest.raises(ThumbnailError, match="too large"):
        load_thumbnail(tmp_path / "bomb.png")


def test_maker_decodes_each_photo_once_however_many_ask_together(tmp_path):
    _gradient(300, 200).save(tmp_path / "a.png")
    calls = []
    release = threading.Event()

    def make(path, size):
        calls.append(path)
        release.wait(30)
        return b"jpeg"

    maker = ThumbnailMaker(make=make)
    threads = [threading.Thread(target=lambda: results.append(maker.get(tmp_path / "a.png"))) for _ in range(4)]
    results = []
    for t in threads:
        t.start()
    release.set()
    for t in threads:
        t.join(30)
    assert results == [b"jpeg"] * 4 and len(calls) == 1
    assert maker.get(tmp_path / "a.png") == b"jpeg" and len(calls) == 1  # cached
    _gradient(300, 201).save(tmp_path / "a.png")  # changed: made again
    assert maker.get(tmp_path / "a.png") == b"jpeg" and len(calls) == 2


def test_maker_decodes_at_most_max_decodes_photos_at_once(tmp_path):
    paths = []
    for i in range(6):
        _gradient(50, 40 + i).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    state = {"now": 0, "most": 0}
    lock = threading.Lock()

    def make(path, size):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.05)  # overlapping calls, if the cap let them (the assertion holds however slow)
        with lock:
            state["now"] -= 1
        return path.name.encode()

    maker = ThumbnailMaker(max_decodes=2, make=make)
    threads = [threading.Thread(target=maker.get, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert state["most"] <= 2 and all(maker.get(p) == p.name.encode() for p in paths)


def test_make_image_thumbnails_reuses_the_previous_index_s(tmp_path):
    root = tmp_path / "photos"
    _photos(root)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    items = []
    for p in sorted(root.iterdir()):
        st = p.stat()
        items.append({"path": p.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    staging = tmp_path / "staging"
    staging.mkdir()
    files = make_image_thumbnails(root, items, None, staging)
    by_path = {it["path"]: it for it in items}
    assert by_path["broken.jpg"]["thumb"] is None
    assert len(files) == len(items) - 1 and all(p.parent == staging for p in files.values())
    for it in items:
        if it["thumb"]:
            assert it["thumb"] == image_thumb_name(it["path"], it["size"], it["mtime_ns"])
            assert Image.open(files[it["thumb"]]).size == load_thumbnail(root / it["path"]).size
    index = tmp_path / "index"
    index.mkdir()
    for name, path in files.items():
        shutil.copy2(path, index / name)
    again = [{k: v for k, v in it.items() if k != "thumb"} for it in items]
    staging2 = tmp_path / "staging2"
    staging2.mkdir()
    files2 = make_image_thumbnails(root, again, index, staging2)
    assert {n: p.parent for n, p in files2.items()} == {n: index for n in files}  # nothing decoded again
    assert not any(staging2.iterdir())


# ---------------------------------------------------------------------------------------------
# Encode and serve


@pytest.fixture(scope="module")
def model():
    from test_serve import tiny_model

    return tiny_model()


def _thumb_files(index):
    return sorted(p.name for p in index.glob("thumb-*.jpg"))


def test_encode_stores_a_thumbnail_per_image_and_the_server_reads_it(tmp_path, model, monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from vseinf.search.build import encode_gallery
    from vseinf.search.gallery import Gallery
    from vseinf.serve.app import create_app

    root = tmp_path / "photos"
    _photos(root)
    index = tmp_path / "index"
    encode_gallery(root, index, model, progress=False)
    gallery = Gallery.load(index)
    names = [it["thumb"] for it in gallery.items]
    assert all(names) and _thumb_files(index) == sorted(names)
    for it in gallery.items:
        with Image.open(index / it["thumb"]) as im:
            assert im.format == "JPEG" and max(im.size) <= THUMB_SIZE
    # re-encoding the unchanged folder keeps the thumbnails (no decode); a changed photo gets a new one
    made = []
    real = thumbnails.thumbnail_jpeg
    monkeypatch.setattr(thumbnails, "thumbnail_jpeg", lambda path, size=THUMB_SIZE: made.append(path) or real(path, size))
    encode_gallery(root, index, model, progress=False)
    assert made == [] and _thumb_files(index) == sorted(names)
    _gradient(640, 480).save(root / "plain.png")
    encode_gallery(root, index, model, progress=False)
    assert made == [root / "plain.png"] and len(_thumb_files(index)) == len(names)
    gallery = Gallery.load(index)

    decoded = []
    real_load = thumbnails.load_thumbnail
    with TestClient(create_app(gallery=gallery, model=model), base_url="http://localhost") as client:
        monkeypatch.setattr(thumbnails, "load_thumbnail", lambda *a, **k: decoded.append(a) or 1 / 0)
        for it in gallery.items:  # served from the index: the photos are not decoded
            r = client.get("/api/thumb", params={"path": it["path"]})
            assert r.status_code == 200 and r.content == (index / it["thumb"]).read_bytes()
        assert decoded == []
        monkeypatch.setattr(thumbnails, "load_thumbnail", real_load)
        _gradient(320, 100).save(root / "small.jpg")  # changed since it was indexed: made on request
        r = client.get("/api/thumb", params={"path": "small.jpg"})
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (256, 80)
        (root / "big.jpg").write_text("no longer an image")
        r = client.get("/api/thumb", params={"path": "big.jpg"})
        assert r.status_code == 415 and "not a readable image" in r.json()["detail"]


def test_server_makes_thumbnails_for_an_index_without_them(tmp_path, model):
    """Indexes written before thumbnails were stored (no "thumb" in their items) still get them."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from vseinf.search.build import encode_gallery
    from vseinf.search.gallery import Gallery
    from vseinf.serve.app import create_app

    root = tmp_path / "photos"
    _photos(root)
    index = tmp_path / "index"
    encode_gallery(root, index, model, progress=False)
    for p in index.glob("thumb-*.jpg"):
        p.unlink()
    with TestClient(create_app(gallery=Gallery.load(index), model=model), base_url="http://localhost") as client:
        r = client.get("/api/thumb", params={"path": "big.jpg"})
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (256, 192)
