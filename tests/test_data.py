"""Tests for vseinf.data: readers, image loading/transforms, the broken-image dataset, caches."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vseinf.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BadImageError,
    CacheError,
    CaptionSplit,
    DataFormatError,
    FeatureCache,
    FeatureCacheWriter,
    ImageDataset,
    ImageTransform,
    StaleCacheError,
    cache_dir,
    cache_path,
    collate_skip_broken,
    load_rgb,
    open_cache,
    open_split,
    read_flickr8k,
    read_flickr_token_file,
    read_karpathy_json,
    read_pairs_file,
    read_precomp,
    sample_crop,
)


def _shared_flickr8k() -> Path:
    env = os.environ.get("VSEINF_SHARED_DATA")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return base / "flickr8k"


FLICKR8K = _shared_flickr8k()
needs_flickr8k = pytest.mark.skipif(not (FLICKR8K / "Flickr8k_text").is_dir(),
                                    reason="Flickr8k data not present")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _jpeg(path: Path, color=(200, 30, 30), size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG")
    return path


# --------------------------------------------------------------------------------------------
# Flickr token files and the Flickr8k layout
# --------------------------------------------------------------------------------------------


def test_token_file_any_number_of_captions_and_list_order(tmp_path):
    tok = _write(tmp_path / "t.token.txt",
                 "b.jpg#0\tB one\n"
                 "a.jpg#0\tA one\n"
                 "\n"
                 "b.jpg#1\tB two\n"
                 "b.jpg#7\tB three\n"
                 "z.jpg#0\tnot listed\n")
    lst = _write(tmp_path / "list.txt", "a.jpg\nc.jpg\nb.jpg\n")  # c.jpg has no caption
    split = read_flickr_token_file(tok, tmp_path / "imgs", image_list=lst)
    assert split.image_keys == ["a.jpg", "b.jpg"]  # list order; captionless c.jpg dropped
    assert split.captions == ["A one", "B one", "B two", "B three"]
    assert split.caption_to_image.tolist() == [0, 1, 1, 1]
    assert split.captions_per_image.tolist() == [1, 3]
    assert split.image_path(1) == tmp_path / "imgs" / "b.jpg"
    assert split.caption_indices(1).tolist() == [1, 2, 3]

    everything = read_flickr_token_file(tok, None)
    assert everything.image_keys == ["b.jpg", "a.jpg", "z.jpg"]  # first appearance
    assert everything.image_root == tmp_path


@pytest.mark.parametrize("bad_line, message", [
    ("c.jpg#0 no tab here", "no tab"),
    ("c.jpg#x\tcaption", "not an integer"),
    ("c.jpg\tcaption", "#<n>"),
    ("c.jpg#0\t   ", "empty caption"),
])
def test_token_file_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    tok = _write(tmp_path / "t.txt", f"a.jpg#0\tfine\n\n{bad_line}\n")
    with pytest.raises(DataFormatError, match=message) as info:
        read_flickr_token_file(tok, tmp_path)
    assert f"{tok}:3:" in str(info.value)
    assert info.value.line == 3 and isinstance(info.value, ValueError)


def test_token_file_line_numbers_ignore_unicode_line_separators(tmp_path):
    # U+2028 inside a caption must not shift the count (str.splitlines would split there).
    tok = _write(tmp_path / "t.txt", "a.jpg#0\tone\u2028still one\nbad line\n")
    with pytest.raises(DataFormatError, match=r":2:"):
        read_flickr_token_file(tok, tmp_path)


def _mini_flickr8k(root: Path, image_dir: str = "Flickr8k_Dataset") -> Path:
    text = root / "Flickr8k_text"
    lines = [f"im{i}.jpg#{k}\tcaption {k} of image {i}" for i in range(4) for k in range(5)]
    _write(text / "Flickr8k.token.txt", "\n".join(lines) + "\n")
    _write(text / "Flickr_8k.trainImages.txt", "im0.jpg\nim1.jpg\nim2.jpg\n")
    _write(text / "Flickr_8k.devImages.txt", "im3.jpg\n")
    for i in range(4):
        _jpeg(root / image_dir / f"im{i}.jpg")
    return root


def test_flickr8k_layout_with_either_image_folder_spelling(tmp_path):
    for spelling in ("Flicker8k_Dataset", "Flickr8k_Dataset"):
        root = _mini_flickr8k(tmp_path / spelling, spelling)
        train = read_flickr8k(root, "train")
        assert (train.n_images, train.n_captions) == (3, 15)
        assert train.image_path(0) == root / spelling / "im0.jpg"
        dev = read_flickr8k(root, "val")  # alias of dev
        assert dev.name == "flickr8k/dev" and dev.image_keys == ["im3.jpg"]
        with pytest.raises(DataFormatError, match="Flickr_8k.testImages.txt"):
            read_flickr8k(root, "test")
        with pytest.raises(ValueError, match="unknown Flickr8k split"):
            read_flickr8k(root, "training")


def test_flickr8k_split_list_with_duplicate_is_an_error(tmp_path):
    root = _mini_flickr8k(tmp_path)
    _write(root / "Flickr8k_text/Flickr_8k.trainImages.txt", "im0.jpg\nim1.jpg\nim0.jpg\n")
    with pytest.raises(DataFormatError, match=r"trainImages.txt:3: .*listed twice"):
        read_flickr8k(root, "train")


@needs_flickr8k
def test_flickr8k_real_data_split_sizes():
    train = read_flickr8k(FLICKR8K, "train")
    dev = open_split(FLICKR8K, "dev")
    assert (train.n_images, train.n_captions) == (6000, 30000)
    assert (dev.n_images, dev.n_captions) == (1000, 5000)
    assert set(train.image_keys).isdisjoint(dev.image_keys)
    assert (train.captions_per_image == 5).all()
    assert np.all(np.diff(train.caption_to_image) >= 0)  # grouped by image
    assert all(train.image_path(i).is_file() for i in range(0, 6000, 500))
    assert all(c.strip() for c in train.captions)


# --------------------------------------------------------------------------------------------
# Karpathy JSON
# --------------------------------------------------------------------------------------------


def _karpathy(path: Path, images: list[dict]) -> Path:
    return _write(path, json.dumps({"images": images, "dataset": "coco"}))


def _kimg(name, split, captions, filepath=None):
    d = {"filename": name, "split": split,
         "sentences": [{"raw": c, "tokens": c.lower().split()} for c in captions]}
    if filepath:
        d["filepath"] = filepath
    return d


def test_karpathy_json_splits_restval_and_filepath(tmp_path):
    js = _karpathy(tmp_path / "dataset_coco.json", [
        _kimg("a.jpg", "train", ["a1", "a2"], "train2014"),
        _kimg("b.jpg", "restval", ["b1", "b2", "b3"], "val2014"),
        _kimg("c.jpg", "val", ["c1"], "val2014"),
        _kimg("d.jpg", "test", ["d1", "d2", "d3", "d4", "d5", "d6"], "val2014"),
        _kimg("e.jpg", "test", [], "val2014"),  # no captions: dropped
    ])
    train = read_karpathy_json(js, tmp_path / "coco", "train")
    assert train.image_keys == ["train2014/a.jpg", "val2014/b.jpg"]
    assert train.captions == ["a1", "a2", "b1", "b2", "b3"]
    assert train.image_path(1) == tmp_path / "coco" / "val2014" / "b.jpg"
    strict = read_karpathy_json(js, tmp_path, "train", restval_into_train=False)
    assert strict.image_keys == ["train2014/a.jpg"]
    assert read_karpathy_json(js, tmp_path, "dev").captions == ["c1"]
    test = read_karpathy_json(js, None, "test")
    assert test.n_images == 1 and test.n_captions == 6 and test.image_root == tmp_path
    assert read_karpathy_json(js, tmp_path, "restval").image_keys == ["val2014/b.jpg"]


def test_karpathy_json_errors_name_the_field_or_line(tmp_path):
    js = _karpathy(tmp_path / "d.json", [_kimg("a.jpg", "test", ["x"]),
                                         {"filename": "b.jpg", "split": "test"}])
    with pytest.raises(DataFormatError, match=r"d.json: field 'images\[1\].sentences'"):
        read_karpathy_json(js, tmp_path, "test")
    js = _karpathy(tmp_path / "e.json", [{"filename": "a.jpg", "split": "val",
                                          "sentences": [{"raw": "ok"}, {"raw": ""}]}])
    with pytest.raises(DataFormatError, match=r"images\[0\].sentences\[1\].raw"):
        read_karpathy_json(js, tmp_path, "val")
    broken = _write(tmp_path / "f.json", '{"images": [\n  {"filename": "a.jpg",,}\n]}')
    with pytest.raises(DataFormatError, match=r"f.json:2: invalid JSON"):
        read_karpathy_json(broken, tmp_path, "val")
    with pytest.raises(DataFormatError, match="no captioned images"):
        read_karpathy_json(_karpathy(tmp_path / "g.json", [_kimg("a.jpg", "train", ["x"])]),
                           tmp_path, "test")


# --------------------------------------------------------------------------------------------
# precomp
# --------------------------------------------------------------------------------------------


def _precomp(folder: Path, split: str, n_images: int, caps_per_image: int, regions=3, dim=4,
             features: np.ndarray | None = None) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    if features is None:
        rng = np.random.default_rng(0)
        features = rng.standard_normal((n_images, regions, dim)).astype(np.float32)
    np.save(folder / f"{split}_ims.npy", features)
    caps = [f"caption {k} of image {i}" for i in range(n_images) for k in range(caps_per_image)]
    _write(folder / f"{split}_caps.txt", "\n".join(caps) + "\n")
    return features


def test_precomp_is_memory_mapped_with_k_captions_per_image(tmp_path):
    feats = _precomp(tmp_path / "f30k_precomp", "dev", n_images=4, caps_per_image=2)
    split = read_precomp(tmp_path / "f30k_precomp", "val")  # val finds dev_*
    assert isinstance(split.features, np.memmap)
    assert split.image_root is None and split.features.shape == (4, 3, 4)
    np.testing.assert_array_equal(split.features[2], feats[2])
    assert split.caption_to_image.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert split.captions[3] == "caption 1 of image 1"
    assert split.image_keys == ["0", "1", "2", "3"]
    with pytest.raises(ValueError, match="no image files"):
        split.image_path(0)
    # a contiguous subset stays memory-mapped
    sub = split.subset(range(1, 3))
    assert isinstance(sub.features, np.memmap) and sub.captions[0] == "caption 0 of image 1"
    np.testing.assert_array_equal(split.subset([3, 0]).features, feats[[3, 0]])


def test_precomp_subfolder_ids_and_one_caption_per_row(tmp_path):
    _precomp(tmp_path / "coco" / "precomp", "test", n_images=3, caps_per_image=1)
    _write(tmp_path / "coco" / "precomp" / "test_ids.txt", "391895\n522418\n184613\n")
    split = read_precomp(tmp_path / "coco", "test")
    assert split.image_keys == ["391895", "522418", "184613"]
    assert split.caption_to_image.tolist() == [0, 1, 2]  # n_images == n_caps: 1:1


def test_precomp_repeated_rows_warn_and_collapse(tmp_path, caplog):
    base = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    feats = np.repeat(base, 5, axis=0)  # each image stored once per caption
    folder = tmp_path / "p"
    folder.mkdir()
    np.save(folder / "train_ims.npy", feats)
    _write(folder / "train_caps.txt", "".join(f"c{i}\n" for i in range(10)))
    with caplog.at_level(logging.WARNING, logger="vseinf.data.splits"):
        one_to_one = read_precomp(folder, "train")
    assert one_to_one.n_images == 10 and "collapse_repeats" in caplog.text
    collapsed = read_precomp(folder, "train", collapse_repeats=True)
    assert collapsed.n_images == 2 and collapsed.captions_per_image.tolist() == [5, 5]
    assert isinstance(collapsed.features, np.memmap)
    np.testing.assert_array_equal(collapsed.features, base)


def test_precomp_errors(tmp_path):
    folder = tmp_path / "p"
    _precomp(folder, "train", n_images=3, caps_per_image=2)
    _write(folder / "train_caps.txt", "".join(f"c{i}\n" for i in range(7)))
    with pytest.raises(DataFormatError, match=r"train_caps.txt: 7 captions do not divide"):
        read_precomp(folder, "train")
    with pytest.raises(DataFormatError, match=r"test_ims.npy: file not found \(splits here: train"):
        read_precomp(folder, "test")
    np.save(folder / "flat_ims.npy", np.zeros((3, 4), np.float32))
    _write(folder / "flat_caps.txt", "a\nb\nc\n")
    with pytest.raises(DataFormatError, match="N×R×D"):
        read_precomp(folder, "flat")
    with pytest.raises(DataFormatError, match="no '<split>_ims.npy'"):
        read_precomp(tmp_path / "nothing-here", "train")


# --------------------------------------------------------------------------------------------
# pairs files
# --------------------------------------------------------------------------------------------


def test_pairs_csv_several_rows_per_image_and_image_root(tmp_path):
    csv_path = _write(tmp_path / "data" / "pairs.csv",
                      'image,caption\n'
                      'imgs/x.jpg,"a dog, running"\n'
                      './imgs/y.jpg,a cat\n'
                      'imgs/x.jpg,"a dog\non two lines"\n'
                      '\n'
                      'imgs/y.jpg,another cat\n')
    split = read_pairs_file(csv_path)
    assert split.image_keys == ["imgs/x.jpg", "imgs/y.jpg"]
    assert split.captions == ["a dog, running", "a dog\non two lines", "a cat", "another cat"]
    assert split.caption_to_image.tolist() == [0, 0, 1, 1]
    assert split.image_path(0) == tmp_path / "data" / "imgs" / "x.jpg"
    assert read_pairs_file(csv_path, image_root=tmp_path / "elsewhere").image_path(1) == \
        tmp_path / "elsewhere" / "imgs" / "y.jpg"


def test_pairs_csv_malformed_rows_name_the_line(tmp_path):
    # the quoted two-line caption makes the bad row line 5, not row 4
    path = _write(tmp_path / "p.csv", 'image,caption,split\nx.jpg,"two\nlines",train\n'
                                      'y.jpg,ok,test\n,no image,train\n')
    with pytest.raises(DataFormatError, match=r"p.csv:5: empty image"):
        read_pairs_file(path)
    path = _write(tmp_path / "q.csv", "image,caption,split\nx.jpg,ok,train\ny.jpg,short\n")
    with pytest.raises(DataFormatError, match=r"q.csv:3: 2 columns"):
        read_pairs_file(path)
    path = _write(tmp_path / "r.csv", "file_name,text\nx.jpg,hello\n")
    with pytest.raises(DataFormatError, match=r"r.csv:1: the header"):
        read_pairs_file(path)


def test_pairs_jsonl_and_split_column(tmp_path):
    path = _write(tmp_path / "p.jsonl",
                  '{"image": "a.jpg", "caption": "first", "split": "train"}\n'
                  '\n'
                  '{"image": "b.jpg", "caption": ["b1", "b2"], "split": "val"}\n'
                  '{"image": "a.jpg", "caption": "second", "split": "train"}\n')
    split = read_pairs_file(path)
    assert split.image_keys == ["a.jpg", "b.jpg"] and split.n_captions == 4
    train = read_pairs_file(path, split="train")
    assert train.captions == ["first", "second"] and train.n_images == 1
    assert read_pairs_file(path, split="dev").captions == ["b1", "b2"]
    bad = _write(tmp_path / "bad.jsonl", '{"image": "a.jpg", "caption": "ok"}\n'
                                         '{"image": "b.jpg", "caption": "ok"\n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: invalid JSON"):
        read_pairs_file(bad)
    bad = _write(tmp_path / "bad2.jsonl", '{"image": "a.jpg"}\n')
    with pytest.raises(DataFormatError, match=r"bad2.jsonl:1: missing or empty 'caption'"):
        read_pairs_file(bad)
    nosplit = _write(tmp_path / "n.jsonl", '{"image": "a.jpg", "caption": "x"}\n')
    with pytest.raises(DataFormatError, match="no 'split' column"):
        read_pairs_file(nosplit, split="train")


def test_pairs_txt_kaggle_csv_and_tab_forms(tmp_path):
    # Kaggle's Flickr8k captions.txt: CSV with unquoted commas in the caption column.
    kaggle = _write(tmp_path / "k" / "captions.txt",
                    "image,caption\na.jpg,A dog , running .\na.jpg,Dog\n")
    assert read_pairs_file(kaggle).captions == ["A dog , running .", "Dog"]
    tabs = _write(tmp_path / "t" / "captions.txt", "a.jpg#0\tone\nb.jpg\ttwo\na.jpg#1\tthree\n")
    split = read_pairs_file(tabs)
    assert split.image_keys == ["a.jpg", "b.jpg"] and split.captions == ["one", "three", "two"]


def test_rows_with_an_unknown_split_value_are_counted_and_named(tmp_path, caplog):
    # "trian" (a typo) and "" (a damaged cell) would otherwise vanish from every split unseen
    path = _write(tmp_path / "p.csv", "image,caption,split\n"
                                      "a.jpg,one,train\nb.jpg,two,trian\nc.jpg,three,trian\n"
                                      "d.jpg,four,\ne.jpg,five,val\nf.jpg,six,test\n")
    with caplog.at_level(logging.WARNING, logger="vseinf.data.records"):
        train = read_pairs_file(path, split="train")
    assert train.image_keys == ["a.jpg"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "p.csv" in warnings[0] and "3 rows" in warnings[0]
    assert "'trian' (2 rows)" in warnings[0] and "'' (1 row)" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vseinf.data.records"):
        assert read_pairs_file(path).n_images == 6  # every row: nothing is left out, nothing to say
        assert read_pairs_file(path, split="dev").image_keys == ["e.jpg"]
    assert len([r for r in caplog.records if "trian" in r.getMessage()]) == 1
    jsonl = _write(tmp_path / "p.jsonl", '{"image": "a.jpg", "caption": "x", "split": "train"}\n'
                                         '{"image": "b.jpg", "caption": "y", "split": "tset"}\n'
                                         '{"image": "c.jpg", "caption": "z"}\n')
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vseinf.data.records"):
        read_pairs_file(jsonl, split="train")
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "2 rows" in message and "'tset' (1 row)" in message and "no split (1 row)" in message


def test_a_split_of_its_own_name_is_not_unknown(tmp_path, caplog):
    path = _write(tmp_path / "p.csv", "image,caption,split\na.jpg,one,train\nb.jpg,two,holdout\n")
    with caplog.at_level(logging.WARNING, logger="vseinf.data.records"):
        assert read_pairs_file(path, split="holdout").image_keys == ["b.jpg"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_no_rows_in_the_split_lists_the_splits_the_file_has(tmp_path):
    path = _write(tmp_path / "p.csv", "image,caption,split\na.jpg,one,trian\nb.jpg,two,test\n")
    with pytest.raises(DataFormatError, match=r"no \(image, caption\) rows in split 'train'.*test, trian"):
        read_pairs_file(path, split="train")


@pytest.mark.parametrize("name, text, line, column", [
    ("p.csv", b"image,caption\na.jpg,one\nb.jpg,caf\xe9 au lait\nc.jpg,three\n", 3, 10),
    ("p.jsonl", b'{"image": "a.jpg", "caption": "x"}\n\n\n{"image": "b.jpg", "caption": "\xff"}\n', 4, 32),
    ("p.txt", b"a.jpg#0\tone\nb\xc3\xb3.jpg\t\xff\n", 2, 8),  # a column counts characters (ó is 2 bytes)
])
def test_non_utf8_pairs_file_names_the_line(tmp_path, name, text, line, column):
    path = tmp_path / name
    path.write_bytes(text)
    with pytest.raises(DataFormatError) as info:
        read_pairs_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: not UTF-8 text") and f"column {column}" in message
    assert "at byte" not in message  # an offset into the file is no help in an editor


def test_non_utf8_karpathy_json_names_the_line(tmp_path):
    path = tmp_path / "dataset_flickr8k.json"
    path.write_bytes(b'{"images": [\n{"filename": "caf\xe9.jpg"}]}\n')
    with pytest.raises(DataFormatError, match=r"dataset_flickr8k.json:2: not UTF-8 text"):
        read_karpathy_json(path, None, "train")


@pytest.mark.parametrize("text", ["image,caption,split\n", "image,caption,split\n\n\n"])
def test_header_only_csv_says_it_has_no_rows_not_no_split_column(tmp_path, text):
    path = _write(tmp_path / "p.csv", text)
    for split in ("train", None):
        with pytest.raises(DataFormatError) as info:
            read_pairs_file(path, split=split)
        message = str(info.value)
        assert "no (image, caption) rows" in message and "header" in message
        assert "'split' column" not in message


def test_split_whose_images_are_all_missing_names_them(tmp_path):
    path = _write(tmp_path / "p.csv", "image,caption\nphotos/a.jpg,one\nphotos/b.jpg,two\nphotos/c.jpg,x\n")
    split = read_pairs_file(path)
    with pytest.raises(DataFormatError) as info:
        ImageDataset(split, ImageTransform(8, train=False))
    message = str(info.value)
    assert str(tmp_path) in message and "none of the 3 images" in message
    assert "photos/a.jpg" in message and "photos/b.jpg" in message
    assert "batch" not in message
    _jpeg(tmp_path / "photos" / "c.jpg")  # one image there: the others are skipped as before
    assert len(ImageDataset(split, ImageTransform(8, train=False))) == 3


def test_grid_features_of_a_split_with_no_readable_image_is_an_error(tmp_path, use_cache):
    from vseinf.config import load_config
    from vseinf.features import image_sets
    from vseinf.model import build_model

    (tmp_path / "photos").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "photos" / name).write_bytes(b"not a jpeg")
    split = read_pairs_file(_write(tmp_path / "p.csv", "image,caption\nphotos/a.jpg,one\nphotos/b.jpg,two\n"))
    cfg = load_config(None, [("image_size", "32"), ("text_encoder", "bigru"), ("backbone_weights", "none")])
    model = build_model(cfg, vocab=["<pad>", "<start>", "<end>", "<unk>", "<mask>"], pretrained=False)
    with pytest.raises(ValueError, match=r"none of the 2 images of p.csv could be read.*a.jpg.*b.jpg"):
        image_sets(model, split, progress=False)


# --------------------------------------------------------------------------------------------
# open_split and the record
# --------------------------------------------------------------------------------------------


def test_open_split_detects_each_layout(tmp_path):
    f8k = _mini_flickr8k(tmp_path / "f8k")
    assert open_split(f8k, "train").name == "flickr8k/train"
    js = _karpathy(tmp_path / "dataset_flickr30k.json", [_kimg("a.jpg", "test", ["x", "y"])])
    assert open_split(js, "test", image_root=tmp_path / "imgs").image_path(0) == \
        tmp_path / "imgs" / "a.jpg"
    _precomp(tmp_path / "pc" / "precomp", "testall", n_images=2, caps_per_image=5)
    assert open_split(tmp_path / "pc", "testall").n_captions == 10
    assert open_split(tmp_path / "pc" / "precomp" / "testall_ims.npy").n_images == 2
    folder = tmp_path / "mine"
    _jpeg(folder / "a.jpg")
    _write(folder / "captions.jsonl", '{"image": "a.jpg", "caption": "red"}\n')
    mine = open_split(folder)
    assert mine.captions == ["red"] and mine.image_path(0) == folder / "a.jpg"
    assert open_split(_write(tmp_path / "x.csv", "image,caption\na.jpg,hi\n")).n_images == 1
    with pytest.raises(ValueError, match="needs a split"):
        open_split(f8k)
    with pytest.raises(DataFormatError, match="cannot tell the layout"):
        open_split(tmp_path / "f8k" / "Flickr8k_Dataset")
    with pytest.raises(DataFormatError, match="no such file"):
        open_split(tmp_path / "missing")


def test_caption_split_refuses_inconsistent_records():
    with pytest.raises(ValueError, match="has no caption"):
        CaptionSplit("x", ["a", "b"], None, ["c"], np.array([0]))
    with pytest.raises(ValueError, match="outside"):
        CaptionSplit("x", ["a"], None, ["c"], np.array([1]))
    with pytest.raises(ValueError, match="feature rows"):
        CaptionSplit("x", ["a"], None, ["c"], np.array([0]), features=np.zeros((2, 1, 1)))


# --------------------------------------------------------------------------------------------
# Image loading and transforms
# --------------------------------------------------------------------------------------------


def _broken_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    good = _jpeg(folder / "good.jpg", size=(64, 48))
    data = good.read_bytes()
    files = {
        "missing": folder / "missing.jpg",
        "empty": folder / "empty.jpg",
        "random": folder / "random.jpg",
        "truncated": folder / "truncated.jpg",
        "text": folder / "notes.png",
    }
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["text"].write_text("this is not a picture")
    return files


@pytest.mark.parametrize("kind, reason", [("missing", "not found"), ("empty", "empty"),
                                          ("random", "not a readable image"),
                                          ("truncated", "not a readable image"),
                                          ("text", "not a readable image")])
def test_load_rgb_names_the_bad_file(tmp_path, kind, reason):
    path = _broken_files(tmp_path)[kind]
    with pytest.raises(BadImageError, match=reason) as info:
        load_rgb(path)
    assert str(path) in str(info.value) and info.value.path == path
    assert isinstance(info.value, ValueError)


def test_load_rgb_converts_modes(tmp_path):
    Image.new("L", (5, 4), 128).save(tmp_path / "g.png")
    Image.new("RGBA", (5, 4), (10, 20, 30, 0)).save(tmp_path / "a.png")
    for name in ("g.png", "a.png"):
        img = load_rgb(tmp_path / name)
        assert img.mode == "RGB" and img.size == (5, 4)


def test_eval_transform_shape_and_normalisation(tmp_path):
    white = Image.new("RGB", (90, 40), (255, 255, 255))
    x = ImageTransform(32, train=False)(white)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected)
    # aspect ratio is not kept: the left half of a wide image becomes the left half
    split_img = Image.new("RGB", (100, 20), (0, 0, 0))
    split_img.paste((255, 255, 255), (50, 0, 100, 20))
    y = ImageTransform(16, train=False, mean=(0, 0, 0), std=(1, 1, 1))(split_img)
    assert y[:, :, :7].max() < 0.05 and y[:, :, 9:].min() > 0.95


def test_sample_crop_stays_in_bounds_with_requested_area_and_ratio():
    g = torch.Generator().manual_seed(3)
    for width, height in [(224, 224), (640, 480), (50, 300)]:
        for _ in range(200):
            left, top, w, h = sample_crop(width, height, generator=g)
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
            if (width, height) != (50, 300):  # the tall image often needs the fallback
                assert 0.58 <= w * h / (width * height) <= 1.0
                assert 3 / 4 - 0.03 <= w / h <= 4 / 3 + 0.03


def test_train_transform_is_seeded_and_matches_a_manual_crop_and_flip():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (60, 80, 3), np.uint8))
    a = [ImageTransform(24, train=True, seed=7)(img) for _ in range(2)]
    t = ImageTransform(24, train=True, seed=7)
    first, second = t(img), t(img)
    torch.testing.assert_close(a[0], a[1])
    torch.testing.assert_close(first, a[0])
    assert not torch.equal(first, second)  # the generator moves on
    assert not torch.equal(first, ImageTransform(24, train=True, seed=8)(img))

    # reference: the same draws done by hand
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    flips = 0
    for _ in range(12):
        out = ImageTransform(24, train=True)(img, generator=g1)
        left, top, w, h = sample_crop(80, 60, (0.6, 1.0), generator=g2)
        ref = img.resize((24, 24), Image.BILINEAR, box=(left, top, left + w, top + h))
        if torch.rand(1, generator=g2).item() < 0.5:
            ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
            flips += 1
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        ref_t = (torch.from_numpy(np.asarray(ref, np.float32) / 255).permute(2, 0, 1) - mean) / std
        torch.testing.assert_close(out, ref_t)
    assert 0 < flips < 12


# --------------------------------------------------------------------------------------------
# ImageDataset with broken files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_image_dataset_skips_and_counts_broken_files(tmp_path, workers):
    bad = _broken_files(tmp_path)
    paths = [tmp_path / "good.jpg", bad["random"], _jpeg(tmp_path / "b2.jpg"), bad["empty"],
             bad["missing"], _jpeg(tmp_path / "b3.jpg")]
    ds = ImageDataset(paths, ImageTransform(16, train=False))
    loader = DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate_skip_broken)
    seen = []
    for batch in loader:
        images, idx = batch
        assert images.shape[1:] == (3, 16, 16) and len(images) == len(idx)
        seen += idx.tolist()
    assert sorted(seen) == [0, 2, 5]
    assert ds.n_skipped == 3
    assert ds.skipped == [bad["random"], bad["empty"], bad["missing"]]
    assert ds.skipped_report() == "skipped 3 unreadable images: random.jpg, empty.jpg, missing.jpg"


def test_image_dataset_warns_once_per_file_and_all_broken_batch_is_none(tmp_path, caplog):
    bad = _broken_files(tmp_path)
    ds = ImageDataset([bad["random"], bad["text"]], ImageTransform(8, train=False))
    with caplog.at_level(logging.WARNING, logger="vseinf.data.images"):
        for _ in range(2):  # two epochs
            assert collate_skip_broken([ds[0], ds[1]]) is None
    warnings = [r for r in caplog.records if "random.jpg" in r.getMessage()]
    assert len(warnings) == 1 and ds.n_skipped == 2


def test_image_dataset_refuses_precomputed_split():
    split = CaptionSplit("p", ["0"], None, ["c"], np.array([0]), features=np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="no image files"):
        ImageDataset(split, ImageTransform(8, train=False))


@needs_flickr8k
def test_image_dataset_on_real_flickr8k_images_with_workers():
    split = read_flickr8k(FLICKR8K, "dev").subset(range(6))
    ds = ImageDataset(split, ImageTransform(64, train=False))
    batches = list(DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_skip_broken))
    images = torch.cat([b[0] for b in batches])
    assert images.shape == (6, 3, 64, 64) and ds.n_skipped == 0
    assert torch.cat([b[1] for b in batches]).tolist() == list(range(6))
    # normalised photographs: roughly zero mean, unit spread
    assert abs(images.mean().item()) < 1.0 and 0.3 < images.std().item() < 2.0
    one = ImageTransform(64, train=False)(load_rgb(split.image_path(2)))
    torch.testing.assert_close(images[2], one)

    # One photo six times, two workers, one seed: each worker must draw its own crops,
    # so no two of the six augmented copies are identical.
    same = ImageDataset([split.image_path(0)] * 6, ImageTransform(64, train=True, seed=0))
    loader = DataLoader(same, batch_size=3, num_workers=2, collate_fn=collate_skip_broken)
    copies = torch.cat([b[0] for b in loader]).flatten(1)
    assert torch.cdist(copies, copies).add(torch.eye(6) * 1e9).min() > 0


# --------------------------------------------------------------------------------------------
# Feature cache
# --------------------------------------------------------------------------------------------


def test_cache_round_trip_fixed_size_sets(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((5, 4, 3)).astype(np.float32)
    sig = {"backbone": "toy", "size": (32, 32)}
    with FeatureCacheWriter(tmp_path / "grid", dim=3, n_items=5, set_size=4,
                            keys=[f"k{i}" for i in range(5)], signature=sig) as w:
        w.append_batch(torch.from_numpy(data[:2]))
        for i in range(2, 5):
            w.append(data[i])
    cache = FeatureCache(tmp_path / "grid", signature={"size": [32, 32], "backbone": "toy"})
    assert len(cache) == 5 and cache.set_size == 4 and cache.keys[3] == "k3"
    assert cache.lengths.tolist() == [4] * 5
    assert cache[1].dtype == np.float16 and isinstance(cache[1], np.memmap)
    np.testing.assert_allclose(cache[-1], data[4], rtol=1e-3, atol=1e-3)
    x, lengths = cache.batch([4, 0, 4])
    assert x.dtype == torch.float32 and x.shape == (3, 4, 3) and lengths.tolist() == [4, 4, 4]
    ref_x, ref_len = cache.batch_reference([4, 0, 4])
    torch.testing.assert_close(x, ref_x)
    torch.testing.assert_close(lengths, ref_len)
    # the features file is an ordinary .npy
    assert np.load(tmp_path / "grid" / "features.npy", mmap_mode="r").shape == (20, 3)


def test_cache_round_trip_variable_lengths(tmp_path):
    rng = np.random.default_rng(1)
    lens = [3, 0, 7, 1]
    items = [rng.standard_normal((n, 6)).astype(np.float32) * 100 for n in lens]
    w = FeatureCacheWriter(tmp_path / "tok", dim=6, n_items=4)
    w.append(items[0])
    padded = np.zeros((2, 7, 6), np.float32)
    padded[0, :0], padded[1, :7] = items[1], items[2]
    w.append_batch(padded, lengths=torch.tensor([0, 7]))
    w.append(torch.from_numpy(items[3]))
    cache = w.close()
    assert cache.lengths.tolist() == lens and cache.set_size is None
    for got, want in zip((cache[i] for i in range(4)), items):
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=1e-3, atol=0.1)
    x, lengths = cache.batch(np.array([2, 1, 0]))
    assert x.shape == (3, 7, 6) and lengths.tolist() == [7, 0, 3]
    assert (x[1] == 0).all() and (x[2, 3:] == 0).all()
    ref = cache.batch_reference([2, 1, 0])
    torch.testing.assert_close(x, ref[0])
    with pytest.raises(IndexError):
        cache[4]


def test_cache_unfinished_writer_leaves_no_readable_cache(tmp_path):
    target = tmp_path / "c"
    w = FeatureCacheWriter(target, dim=2, n_items=3)
    w.append(np.ones((2, 2)))
    w.append(np.ones((1, 2)))
    # as if the process were killed here: nothing is at the target
    with pytest.raises(CacheError, match="no feature cache"):
        FeatureCache(target)
    assert open_cache(target) is None
    with pytest.raises(ValueError, match="closed after 2 of 3"):
        w.close()
    assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".c.tmp")]
    with pytest.raises(RuntimeError), FeatureCacheWriter(target, dim=2, n_items=1) as w2:
        w2.append(np.ones((1, 2)))
        raise RuntimeError("extraction crashed")
    assert open_cache(target) is None and list(tmp_path.iterdir()) == []


def test_cache_replacement_is_atomic_and_signatures_are_checked(tmp_path):
    target = tmp_path / "c"
    with FeatureCacheWriter(target, dim=2, n_items=1, signature={"weights": "aaa"}) as w:
        w.append(np.full((1, 2), 1.0))
    new = FeatureCacheWriter(target, dim=2, n_items=1, signature={"weights": "bbb"})
    new.append(np.full((1, 2), 2.0))
    # until close() the old cache is what readers see
    assert FeatureCache(target)[0].tolist() == [[1.0, 1.0]]
    with pytest.raises(StaleCacheError, match="weights: cached 'aaa', wanted 'bbb'"):
        FeatureCache(target, signature={"weights": "bbb"})
    assert open_cache(target, {"weights": "bbb"}) is None
    new.close()
    assert FeatureCache(target, signature={"weights": "bbb"})[0].tolist() == [[2.0, 2.0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_cache_built_by_two_writers_at_once_keeps_the_first_published(tmp_path):
    """Two runs that miss the same cache both build it; the second to finish keeps the first one's
    folder (which readers may already hold open) and drops its own copy."""
    target, sig = tmp_path / "c", {"weights": "aaa"}
    first = FeatureCacheWriter(target, dim=2, n_items=1, signature=sig)
    second = FeatureCacheWriter(target, dim=2, n_items=1, signature=sig)
    first.append(np.full((1, 2), 1.0))
    second.append(np.full((1, 2), 2.0))
    reader = first.close()
    kept = second.close()
    assert kept[0].tolist() == reader[0].tolist() == [[1.0, 1.0]]
    assert FeatureCache(target, signature=sig)[0].tolist() == [[1.0, 1.0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    # A rebuild (a writer started while the cache was there) still replaces it.
    with FeatureCacheWriter(target, dim=2, n_items=1, signature=sig) as rebuild:
        rebuild.append(np.full((1, 2), 3.0))
    assert FeatureCache(target, signature=sig)[0].tolist() == [[3.0, 3.0]]
    assert reader[0].tolist() == [[1.0, 1.0]]  # an open reader keeps its (replaced) files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def _build_cache_worker(target: str, start, results, rank: int) -> None:
    items = [np.full((1 + i % 3, 4), float(i)) for i in range(50)]
    writer = FeatureCacheWriter(target, dim=4, n_items=len(items), signature={"data": "same"})
    for item in items:
        writer.append(item)
    start.wait()  # every process publishes at the same moment
    try:
        cache = writer.close()
        results[rank] = all(np.array_equal(cache[i], item) for i, item in enumerate(items))
    except Exception as e:  # reported to the test
        results[rank] = repr(e)


def test_processes_building_one_cache_at_once_all_get_it(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        start, results = manager.Barrier(4), manager.dict()
        procs = [ctx.Process(target=_build_cache_worker, args=(str(tmp_path / "c"), start, results, r))
                 for r in range(4)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(120)
        assert dict(results) == {r: True for r in range(4)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert len(FeatureCache(tmp_path / "c", signature={"data": "same"})) == 50


def test_cache_writer_validates_input(tmp_path):
    w = FeatureCacheWriter(tmp_path / "c", dim=3, n_items=2, set_size=2)
    with pytest.raises(ValueError, match="expected 2 rows"):
        w.append(np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"L×3"):
        w.append(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="float16 range"):
        w.append(np.full((2, 3), 1e6))
    w.abort()
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match="not a feature cache"):
        FeatureCacheWriter(tmp_path / "precious", dim=3, n_items=1)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        FeatureCacheWriter(tmp_path / "d", dim=3, n_items=1, signature={"f": object()})


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VSEINF_CACHE", str(tmp_path / "mycache"))
    assert cache_dir() == tmp_path / "mycache"
    a = cache_path("f8k-grid", {"backbone": "x", "size": 512})
    assert a.parent == tmp_path / "mycache" / "features" and a.name.startswith("f8k-grid-")
    assert a == cache_path("f8k-grid", {"size": 512, "backbone": "x"})
    assert a != cache_path("f8k-grid", {"backbone": "x", "size": 384})
    monkeypatch.delenv("VSEINF_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "vseinf"
