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
from vseinf import index as vindex
from vseinf.index import Gallery, encode_gallery


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
    encode_files = vindex.encode_image_files

    def meanwhile(*args, **kwargs):
        (out / "todo.txt").write_text("written while encoding")
        return encode_files(*args, **kwargs)

    monkeypatch.setattr(vindex, "encode_image_files", meanwhile)
    with pytest.raises(ValueError, match=r"holds files that vseinf did not write \(todo.txt\)"):
        encode_gallery(photo_dir, out, model, progress=False)
    assert (out / "todo.txt").read_text() == "written while encoding"
    assert len(Gallery.load(out)) == 4  # the previous index, untouched
    # the work is not lost: once the file is moved away, the next run reuses the new image's row
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".index")) == [".index.partial"]
    (out / "todo.txt").unlink()
    monkeypatch.setattr(vindex, "encode_image_files", encode_files)
    report = encode_gallery(photo_dir, out, model, progress=False)
    assert "1 images were already encoded" in report.summary() and report.total == 5
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".index")) == []
