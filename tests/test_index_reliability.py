"""The index folder under faults and hostile input: files vseinf did not write are never deleted, one
writer at a time, names that are not UTF-8, symlink loops, progress saved by time, damaged
gallery.json, non-finite embeddings, and an embeddings file truncated under a reader."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_index import PHOTOS, SAMPLES, tiny_model

from vseinf.cli.search import add_search_parser, run_search
from vseinf.search.build import encode_gallery, encode_image_files
from vseinf.search.engines import ExactIndex, IndexFormatError
from vseinf.search.files import IndexLockedError, _exchange, _write_index, lock_path
from vseinf.search.gallery import Gallery
from vseinf.search.journal import EncodeJournal


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


# ---------------------------------------------------------------------------------------------
# An index folder only ever loses files vseinf wrote there


def test_reencoding_refuses_a_folder_holding_files_vseinf_did_not_write(photo_dir, tmp_path, model):
    out = tmp_path / "index"
    encode_gallery(photo_dir, out, model, progress=False)
    before = (out / "gallery.json").read_text()
    (out / "notes.txt").write_text("mine")
    (out / "holiday").mkdir()
    shutil.copy2(SAMPLES / PHOTOS[0], out / "holiday" / "beach.png")
    with pytest.raises(ValueError, match=r"holds files that vseinf did not write \(holiday/, notes.txt\)") as err:
        encode_gallery(photo_dir, out, model, progress=False)
    assert "\n" not in str(err.value)
    assert (out / "notes.txt").read_text() == "mine" and (out / "holiday" / "beach.png").is_file()
    assert (out / "gallery.json").read_text() == before


def test_a_file_put_in_the_index_during_an_encode_is_kept(photo_dir, tmp_path, model, monkeypatch):
    """The folder is checked again just before the swap: a file that appeared while the images were
    being embedded stops the swap instead of being deleted with the previous index."""
    out = tmp_path / "index"
    encode_gallery(photo_dir, out, model, progress=False)
    shutil.copy2(SAMPLES / PHOTOS[4], photo_dir / PHOTOS[4])

    def meanwhile(*args, **kwargs):
        (out / "todo.txt").write_text("written while encoding")
        return encode_image_files(*args, **kwargs)

    monkeypatch.setattr("vseinf.search.build.encode_image_files", meanwhile)
    with pytest.raises(ValueError, match=r"holds files that vseinf did not write \(todo.txt\)"):
        encode_gallery(photo_dir, out, model, progress=False)
    assert (out / "todo.txt").read_text() == "written while encoding"
    assert len(Gallery.load(out)) == 4  # the previous index, untouched
    # the work is not lost: once the file is moved away, the next run reuses the new image's row
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".index")) == [".index.partial"]
    (out / "todo.txt").unlink()
    monkeypatch.setattr("vseinf.search.build.encode_image_files", encode_image_files)
    report = encode_gallery(photo_dir, out, model, progress=False)
    assert "1 images were already encoded" in report.summary() and report.total == 5
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".index")) == []


# ---------------------------------------------------------------------------------------------
# One writer at a time; readers see the old index or the new one, never a mix

HOLD_LOCK = """
import sys
from vseinf.search.files import IndexLock
lock = IndexLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


def test_a_second_writer_is_told_which_process_holds_the_index(photo_dir, tmp_path, model):
    import subprocess
    import sys

    out = tmp_path / "index"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(IndexLockedError, match=f"index is being written by pid {holder.pid}") as err:
            encode_gallery(photo_dir, out, model, progress=False)
        assert "\n" not in str(err.value) and not out.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # the holder is gone (as after a kill -9): its lock file, even if left behind, is not stale
    lock_path(out).write_text(f"{holder.pid}\n")
    assert encode_gallery(photo_dir, out, model, progress=False).total == 4
    assert not lock_path(out).exists()


SWAPPER = """
import sys
import numpy as np
from vseinf.search.files import IndexLock, _write_index
from pathlib import Path

out, writer, rounds, locked = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
for r in range(rounds):
    n = 1 + (writer + r) % 5  # galleries of different sizes, so that a mix would show
    code = 1000 * writer + r
    meta = {"format": 1, "kind": "images", "root": "/photos", "model": {"config_hash": "c", "weights_hash": "w"},
            "items": [{"path": f"{code}-{i}.jpg"} for i in range(n)]}
    rows = np.full((n, 4), code, np.float32)
    if locked:
        with IndexLock(out, wait=True):
            _write_index(out, meta, rows, None)  # an exact index: nothing to save beside the rows
    else:
        _write_index(out, meta, rows, None)
print("done", flush=True)
"""


def _can_exchange(tmp_path) -> bool:
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    return _exchange(tmp_path / "x", tmp_path / "y")


@pytest.mark.parametrize("locked", [True, False])
def test_concurrent_swaps_never_fail_and_readers_never_see_a_mix(tmp_path, locked):
    """3 processes × 15 swaps into one folder while this process keeps loading it: every swap
    succeeds (no fixed ``.old`` name to fight over) and every load is one whole index. Without the
    lock this relies on the atomic exchange (Linux); with it, on the lock."""
    import subprocess
    import sys

    exchange = _can_exchange(tmp_path)
    if not locked and not exchange:
        pytest.skip("no atomic directory exchange on this system: concurrent writers need the lock")
    out = tmp_path / "index"
    rows = np.zeros((1, 4), np.float32)
    meta = {"format": 1, "kind": "images", "root": "/photos", "model": {"config_hash": "c", "weights_hash": "w"},
            "items": [{"path": "0-0.jpg"}]}
    _write_index(out, meta, rows, ExactIndex(rows))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    writers = [subprocess.Popen([sys.executable, "-c", SWAPPER, str(out), str(w), "15", str(int(locked))],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for w in range(3)]
    loads = 0
    while any(w.poll() is None for w in writers) or loads == 0:
        if exchange:  # without it a reader may find the folder missing between the two renames
            g = Gallery.load(out)
            codes = {it["path"].split("-")[0] for it in g.items}
            assert len(codes) == 1 and np.all(np.asarray(g.embeddings) == float(codes.pop()))
            loads += 1
        else:
            loads = 1
    for w in writers:
        stdout, stderr = w.communicate(timeout=120)
        assert w.returncode == 0 and stdout.strip() == "done", stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".index")) == []
    last = Gallery.load(out)
    assert np.asarray(last.embeddings)[0, 0] == float(last.items[0]["path"].split("-")[0])


def test_an_interrupted_swap_is_put_right_by_the_next_writer(photo_dir, tmp_path, model):
    """Killed between the two renames of the fallback swap: the index is at ``.index.old-*``, the
    folder missing. The next encode puts it back (and reuses its rows) and removes half-written folders."""
    out = tmp_path / "index"
    encode_gallery(photo_dir, out, model, progress=False)
    os.rename(out, tmp_path / ".index.old-abcd1234")
    (tmp_path / ".index.tmp-zzzz9999").mkdir()
    (tmp_path / ".index.tmp-zzzz9999" / "embeddings.npy").write_bytes(b"half")
    report = encode_gallery(photo_dir, out, model, progress=False)
    assert (report.total, report.reused) == (4, 4)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".index")) == []


def test_server_answers_from_the_index_encode_swaps_in_and_keeps_a_copy_it_cannot_replace(photo_dir, tmp_path,
                                                                                          model):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from test_index import other_model

    from vseinf.serve.app import create_app

    out = tmp_path / "index"
    encode_gallery(photo_dir, out, model, progress=False)
    app = create_app(gallery=Gallery.load(out), model=model)
    with TestClient(app, base_url="http://localhost") as client:
        def paths():
            r = client.get("/api/search", params={"q": "a red motorcycle", "k": 10})
            assert r.status_code == 200, r.text
            return sorted(x["path"] for x in r.json()["results"])

        assert len(paths()) == 4
        shutil.copy2(SAMPLES / PHOTOS[4], photo_dir / PHOTOS[4])
        encode_gallery(photo_dir, out, model, progress=False)  # while the server holds the old index
        assert PHOTOS[4] in paths() and len(paths()) == 5
        assert client.get("/api/info").json()["size"] == 5
        # an index of another model cannot answer this model's queries: the copy loaded before does
        encode_gallery(photo_dir, out, other_model(model), progress=False)
        assert len(paths()) == 5 and client.get(f"/api/thumb?path={PHOTOS[4]}").status_code == 200


# ---------------------------------------------------------------------------------------------
# File names that are not UTF-8 (a Latin-1 é from an old disk)


def test_a_file_name_that_is_not_utf8_is_indexed_losslessly(photo_dir, tmp_path, model, capsys):
    from test_index import run_cli, save_tiny

    from vseinf.model import load_model

    latin1 = Path(os.fsdecode(bytes(photo_dir)) + "/" + os.fsdecode(b"caf\xe9.png"))
    try:
        shutil.copy2(SAMPLES / PHOTOS[4], latin1)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system does not take file names that are not UTF-8")
    (photo_dir / os.fsdecode(b"notes-\xe9.txt")).write_text("not a photo")
    out = tmp_path / "index"
    report = encode_gallery(photo_dir, out, model, progress=False)
    assert report.total == 5 and "skipped notes-\\xe9.txt" in report.summary()
    gallery = Gallery.load(out)
    rel = os.fsdecode(b"caf\xe9.png")
    assert rel in [it["path"] for it in gallery.items]
    assert gallery.file_path(rel) == latin1.resolve() and gallery.file_path("caf\\xe9.png") == latin1.resolve()
    # an update reuses the row: the name read back is the name on disk
    assert encode_gallery(photo_dir, out, model, progress=False).encoded == 0

    ckpt = save_tiny(model, tmp_path / "ckpt")
    encode_gallery(photo_dir, tmp_path / "cli-index", load_model(ckpt), progress=False)
    assert run_cli(add_search_parser, run_search,
                   ["search", str(tmp_path / "cli-index"), "--image", str(latin1), "-k", "1", "--json"]) == 0
    printed = capsys.readouterr().out
    printed.encode("utf-8")  # printable on a UTF-8 terminal
    first = json.loads(printed)["results"][0]
    # the exact name, for programs: relative to the gallery in "path" (as /api/search), in full in "file"
    assert first["path"] == latin1.name and first["file"] == str(latin1)
    assert run_cli(add_search_parser, run_search,
                   ["search", str(tmp_path / "cli-index"), "--image", str(latin1), "-k", "1"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("caf\\xe9.png")

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from vseinf.serve.app import create_app

    with TestClient(create_app(gallery=gallery, model=model), base_url="http://localhost") as client:
        r = client.get("/api/search", params={"q": "a red motorcycle", "k": 10})
        assert r.status_code == 200 and "caf\\xe9.png" in [x["path"] for x in r.json()["results"]]
        assert client.get("/api/thumb", params={"path": "caf\\xe9.png"}).status_code == 200


# ---------------------------------------------------------------------------------------------
# Symbolic link loops and folders that cannot be read


def test_symlink_loops_and_unreadable_folders_are_named_and_skipped(photo_dir, tmp_path, model, monkeypatch):
    (photo_dir / "loop.jpg").symlink_to("loop.jpg")
    (photo_dir / "sub" / "ping.png").symlink_to("pong.png")
    (photo_dir / "sub" / "pong.png").symlink_to("ping.png")
    (photo_dir / "sub" / "up").symlink_to("..")  # a folder link back up: not followed, not an error
    private = photo_dir / "private"
    private.mkdir()
    shutil.copy2(SAMPLES / PHOTOS[5], private / PHOTOS[5])
    private.chmod(0)
    if os.access(private, os.R_OK):  # root reads it anyway: make the folder fail as it would for a user
        real_scandir = os.scandir

        def scandir(path="."):
            if not isinstance(path, int) and Path(os.fsdecode(path)).name == "private":
                raise PermissionError(13, "Permission denied", os.fsdecode(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        report = encode_gallery(photo_dir, tmp_path / "index", model, progress=False)
    finally:
        private.chmod(0o755)
    reasons = {s.path: s.reason for s in report.skipped}
    assert report.total == 4
    assert "symbolic link loop" in reasons["loop.jpg"]
    assert "symbolic link loop" in reasons["sub/ping.png"] and "symbolic link loop" in reasons["sub/pong.png"]
    assert reasons["private/"] == "cannot read the folder (Permission denied)"
    assert "skipped private/: cannot read the folder" in report.summary()


# ---------------------------------------------------------------------------------------------
# The encode journal is flushed by time too, so a kill -9 loses seconds of work, not 1,024 images


def test_the_journal_flushes_after_flush_seconds_whatever_the_count(tmp_path):
    now = [0.0]
    journal = EncodeJournal(tmp_path / "index", {"config_hash": "c", "weights_hash": "w", "embed_dim": 4},
                                   "/photos", flush_every=1000, flush_seconds=30, clock=lambda: now[0])
    stats = {f"{i}.jpg": (10, i) for i in range(6)}
    parts = lambda: len(list(journal.dir.glob("rows-*.json")))  # noqa: E731

    def add(i, t):
        now[0] = t
        journal.add([f"{i}.jpg"], stats, np.full((1, 4), i, np.float32))

    add(0, 0.0)
    add(1, 29.9)
    assert parts() == 0
    add(2, 30.0)  # 30 s since the journal began: the three rows go to disk
    assert parts() == 1
    add(3, 31.0)
    add(4, 59.9)
    assert parts() == 1
    add(5, 60.0)
    assert parts() == 2
    found = journal.load()
    assert sorted(found) == [f"{i}.jpg" for i in range(6)] and found["4.jpg"][2][0] == 4


def test_rows_are_on_disk_before_a_kill_that_no_handler_sees(photo_dir, tmp_path, model, monkeypatch):
    """What a kill -9 during the third image would leave: with a flush interval of 0 s, the two
    images embedded before it are already in the journal (the count-based flush alone: none)."""
    forward = model.image.forward
    journal = tmp_path / ".index.partial"
    on_disk = []

    def forward_that_looks(*args, **kwargs):
        on_disk.append(len(list(journal.glob("rows-*.json"))))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.image, "forward", forward_that_looks)
    monkeypatch.setattr(model.image, "for_inference", lambda: model.image)  # encode's fast copy: this one
    encode_gallery(photo_dir, tmp_path / "index", model, batch_size=1, progress=False, workers=0)
    assert on_disk[2] == 0  # default: every 1,024 images or 30 s
    on_disk.clear()
    monkeypatch.setattr("vseinf.search.journal.ENCODE_FLUSH_SECONDS", 0)
    journal = tmp_path / ".index2.partial"
    encode_gallery(photo_dir, tmp_path / "index2", model, batch_size=1, progress=False, workers=0)
    assert on_disk[:3] == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# gallery.json checked against its schema: a damaged file is one line naming the field


DAMAGES = [  # (what is done to gallery.json, the field the error must name)
    (lambda m: m.update(items=[1, 2, 3, 4]), "items.0"),
    (lambda m: m.update(items="four photos"), "items"),
    (lambda m: m["items"][1].pop("path"), "items.1.path"),
    (lambda m: m.update(model=None), "model"),
    (lambda m: m.update(root=["/photos"]), "root"),
    (lambda m: m.update(engine={"engine": "annoy"}), "engine.engine"),
    (lambda m: m.update(engine="hnsw"), "engine"),
    (lambda m: m.update(kind="photos"), "kind"),
    (lambda m: m["items"][0].update(size="big"), "items.0.size"),
]


@pytest.fixture(scope="module")
def built_index(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("schema")
    photos = root / "photos"
    photos.mkdir()
    for name in PHOTOS[:4]:
        shutil.copy2(SAMPLES / name, photos / name)
    encode_gallery(photos, root / "index", model, progress=False)
    return photos, root / "index"


@pytest.mark.parametrize("damage,field", DAMAGES, ids=[f for _, f in DAMAGES])
def test_a_damaged_gallery_json_is_one_line_naming_the_field(built_index, tmp_path, capsys, damage, field):
    from vseinf.cli import main

    out = tmp_path / "index"
    shutil.copytree(built_index[1], out)
    meta = json.loads((out / "gallery.json").read_text())
    damage(meta)
    (out / "gallery.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFormatError, match=f"gallery.json: field '{field}': "):
        Gallery.load(out)
    for argv in (["search", str(out), "a dog"], ["serve", str(out), "--port", "0"]):
        if argv[0] == "serve":
            pytest.importorskip("fastapi")
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"field '{field}'" in err and err.count("\n") == 1 and "Traceback" not in err


def test_encode_rebuilds_over_a_damaged_index(built_index, tmp_path, model):
    photos, built = built_index
    for damage, field in (DAMAGES[0], DAMAGES[3]):
        out = tmp_path / field
        shutil.copytree(built, out)
        meta = json.loads((out / "gallery.json").read_text())
        damage(meta)
        (out / "gallery.json").write_text(json.dumps(meta))
        report = encode_gallery(photos, out, model, progress=False)
        assert report.encoded == 4 and f"field '{field}'" in report.note and "encoding everything" in report.note
        assert len(Gallery.load(out)) == 4


# ---------------------------------------------------------------------------------------------
# Non-finite embeddings: never indexed, never loaded, never a 500


def test_a_file_whose_embedding_is_not_finite_is_named_and_skipped(photo_dir, tmp_path, model, monkeypatch):
    import torch

    forward, calls = model.image.forward, [0]

    def nan_for_the_second(*args, **kwargs):
        emb, rest = forward(*args, **kwargs)
        calls[0] += 1
        return (torch.full_like(emb, float("nan")) if calls[0] == 2 else emb), rest

    monkeypatch.setattr(model.image, "forward", nan_for_the_second)
    monkeypatch.setattr(model.image, "for_inference", lambda: model.image)  # encode's fast copy: this one
    out = tmp_path / "index"
    report = encode_gallery(photo_dir, out, model, batch_size=1, progress=False, workers=0)
    assert (report.total, report.encoded) == (3, 3)
    assert [(s.path, "not finite" in s.reason) for s in report.skipped] == [("coffee.png", True)]
    gallery = Gallery.load(out)
    assert "coffee.png" not in [it["path"] for it in gallery.items]
    assert np.isfinite(gallery.embeddings).all() and gallery.meta["skipped"][0]["path"] == "coffee.png"
    # the next run tries it again (and this time the model gives a number)
    calls[0] = 10
    report = encode_gallery(photo_dir, out, model, batch_size=1, progress=False, workers=0)
    assert (report.total, report.encoded, report.reused, report.skipped) == (4, 1, 3, [])


def _poison(out: Path, row: int) -> None:
    """Write NaN into one row of an index's embeddings, in place (a damaged disk, a buggy tool)."""
    rows = np.load(out / "embeddings.npy", mmap_mode="r+")
    rows[row] = np.nan
    rows.flush()
    del rows


def test_an_index_with_non_finite_rows_is_refused_and_rebuilt(photo_dir, tmp_path, model, capsys):
    from vseinf.cli import main

    out = tmp_path / "index"
    encode_gallery(photo_dir, out, model, progress=False)
    _poison(out, 2)
    with pytest.raises(IndexFormatError, match=r"embeddings.npy: row 2 \(sub/chelsea.png\) is not finite"):
        Gallery.load(out)
    assert main(["search", str(out), "a dog"]) == 2
    err = capsys.readouterr().err
    assert "is not finite" in err and err.count("\n") == 1
    report = encode_gallery(photo_dir, out, model, progress=False)  # not kept as "unchanged"
    assert report.encoded == 4 and "is not finite" in report.note
    assert np.isfinite(Gallery.load(out).embeddings).all()


def test_the_server_never_answers_500_for_non_finite_rows(photo_dir, tmp_path, model, monkeypatch):
    """Rows that are memory-mapped are not all read when the index opens (it can be larger than
    memory): a non-finite row that reaches the results is a 503 naming it, not a JSON error."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from vseinf.serve.app import create_app

    out = tmp_path / "index"
    encode_gallery(photo_dir, out, model, progress=False)
    _poison(out, 1)
    monkeypatch.setattr("vseinf.search.files.EMBEDDINGS_IN_MEMORY_BYTES", 0)
    with TestClient(create_app(gallery=Gallery.load(out), model=model), base_url="http://localhost") as client:
        r = client.get("/api/search", params={"q": "a red motorcycle", "k": 4})
        assert r.status_code == 503 and "row 1 (coffee.png) is not finite" in r.json()["detail"]
        assert client.get("/api/info").status_code == 200


# ---------------------------------------------------------------------------------------------
# An embeddings file truncated on disk, before or while it is in use


def test_an_embeddings_file_shorter_or_longer_than_its_header_is_refused(photo_dir, tmp_path, model):
    out = tmp_path / "index"
    encode_gallery(photo_dir, out, model, progress=False)
    rows = out / "embeddings.npy"
    data = rows.read_bytes()
    rows.write_bytes(data[:-100])
    with pytest.raises(IndexFormatError, match=rf"embeddings.npy: truncated \({len(data) - 100:,} bytes; "
                                                      rf"4 × 32 float32 rows take {len(data):,}\)"):
        Gallery.load(out)
    rows.write_bytes(data + b"\0" * 8)
    with pytest.raises(IndexFormatError, match="longer than its header says"):
        Gallery.load(out)
    rows.write_bytes(data[:40])  # not even a whole header
    with pytest.raises(IndexFormatError, match="cannot read embeddings"):
        Gallery.load(out)


def test_a_mapped_file_that_changes_under_a_reader_is_reported_not_read(photo_dir, tmp_path, model, monkeypatch):
    out = tmp_path / "index"
    encode_gallery(photo_dir, out, model, progress=False)
    in_memory = Gallery.load(out)
    monkeypatch.setattr("vseinf.search.files.EMBEDDINGS_IN_MEMORY_BYTES", 0)
    mapped = Gallery.load(out)
    assert isinstance(mapped.embeddings, np.memmap) and not isinstance(in_memory.embeddings, np.memmap)
    mapped.check_files()  # as opened: fine
    shutil.copy2(SAMPLES / PHOTOS[4], photo_dir / PHOTOS[4])
    encode_gallery(photo_dir, out, model, progress=False)  # a new index swapped in: the mapped file is as it was
    mapped.check_files()
    assert mapped.replaced() and len(mapped.reload()) == 5 and len(mapped) == 4
    mapped = Gallery.load(out)
    os.truncate(out / "embeddings.npy", 200)  # in place, under the reader
    with pytest.raises(IndexFormatError, match="embeddings.npy: truncated on disk while it was in use"):
        mapped.check_files()
    in_memory.check_files()  # rows read into memory cannot be disturbed


SERVE_WHILE_TRUNCATED = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from fastapi.testclient import TestClient
from test_index import tiny_model
import vseinf.search.files
from vseinf.search.build import encode_gallery
from vseinf.search.gallery import Gallery
from vseinf.serve.app import create_app

vseinf.search.files.EMBEDDINGS_IN_MEMORY_BYTES = 0  # memory-map the rows, as for a gallery larger than memory
photos, out = Path(sys.argv[1]), Path(sys.argv[2])
model = tiny_model()
encode_gallery(photos, out, model, progress=False)
seen = []
with TestClient(create_app(gallery=Gallery.load(out), model=model), base_url="http://localhost") as client:
    def ask():
        r = client.get("/api/search", params={"q": "a dog on the beach", "k": 3})
        seen.append([r.status_code, r.json().get("detail", str(len(r.json().get("results", []))))])
    ask()
    # emptied in place, under the server (a shorter file would still back the one page these few rows use)
    os.truncate(out / "embeddings.npy", 0)
    ask()
    ask()
    seen.append([client.get("/api/info").status_code, ""])
    encode_gallery(photos, out, model, progress=False)  # rebuilt: the server picks it up
    ask()
print(json.dumps(seen))
"""


def test_the_server_survives_its_embeddings_file_truncated_under_it(photo_dir, tmp_path):
    """Before: SIGBUS, the server gone without a word. Now: 503 naming the file, then the rebuilt
    index answers. In a child process, so that a regression cannot take the test run down with it."""
    pytest.importorskip("fastapi")
    import subprocess
    import sys

    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SERVE_WHILE_TRUNCATED, str(photo_dir), str(tmp_path / "index"),
                           tests], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen[0] == [200, "3"]
    for status, detail in seen[1:3]:
        assert status == 503 and "embeddings.npy: truncated on disk while it was in use" in detail
        assert "reloading the index failed" in detail and "re-run `vseinf encode`" in detail
    assert seen[3][0] == 200 and seen[4] == [200, "3"]
