"""Tests for video–text retrieval: dataset readers, lazy frame features, decoding, extraction,
and a short training run on the shared MSR-VTT subset."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vseinf.data import DataFormatError, open_split
from vseinf.data.video import (
    H5Frames,
    NpyFrameFolder,
    VideoSplit,
    is_video_dataset,
    open_frame_features,
    open_video_split,
    read_id_list,
    read_msrvtt,
    read_vatex,
    read_video_pairs,
)


def _shared(name: str) -> Path:
    env = os.environ.get("VSEINF_SHARED_DATA")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return base / name


MSRVTT = _shared("msrvtt_frames")
VIDEOS = _shared("videos")
needs_msrvtt = pytest.mark.skipif(not (MSRVTT / "MSRVTT_data.json").is_file(),
                                  reason="shared MSR-VTT subset not present")
needs_videos = pytest.mark.skipif(not (VIDEOS / "bikes.mp4").is_file(),
                                  reason="shared video clips not present")


def _features(folder: Path, lengths: dict[str, int], dim: int = 8, seed: int = 0) -> dict:
    """Writes <id>.npy files of T × dim random features; returns the arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for vid, t in lengths.items():
        arrays[vid] = rng.standard_normal((t, dim)).astype(np.float32)
        np.save(folder / f"{vid}.npy", arrays[vid])
    return arrays


def _msrvtt_json(path: Path, videos: dict[str, str], captions: dict[str, list[str]]) -> Path:
    data = {"info": {"year": 2016},
            "videos": [{"video_id": v, "split": s, "category": 3} for v, s in videos.items()],
            "sentences": [{"video_id": v, "caption": c, "sen_id": k}
                          for k, (v, c) in enumerate((v, c) for v, cs in captions.items() for c in cs)]}
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def msrvtt_dir(tmp_path):
    """A miniature MSR-VTT folder: 20 / 3 / 1 / 2 captions, T = 5, 9, 3, 7 frames of 8-d."""
    root = tmp_path / "msrvtt"
    root.mkdir()
    captions = {"video0": [f"a man cooks dish {k}" for k in range(20)],
                "video1": ["a cat", "a cat plays", "a cat sleeps"],
                "video2": ["a car race"],
                "video3": ["news anchor talks", "a woman reads the news"]}
    _msrvtt_json(root / "MSRVTT_data.json",
                 {"video0": "train", "video1": "train", "video2": "validate", "video3": "test"},
                 captions)
    arrays = _features(root / "features", {"video0": 5, "video1": 9, "video2": 3, "video3": 7})
    return root, captions, arrays


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def test_msrvtt_splits_captions_and_variable_length_frames(msrvtt_dir):
    root, captions, arrays = msrvtt_dir
    train = open_split(root, "train")
    assert isinstance(train, VideoSplit) and train.image_root is None
    assert train.image_keys == ["video0", "video1"]
    assert train.captions == captions["video0"] + captions["video1"]
    assert train.captions_per_image.tolist() == [20, 3]
    src = train.feature_source
    assert len(src) == 2 and src.dim == 8 and not src.broken.any()
    feats, lengths = src.batch([1, 0])
    assert feats.shape == (2, 9, 8) and feats.dtype == torch.float32
    assert lengths.tolist() == [9, 5]
    assert torch.equal(feats[0], torch.from_numpy(arrays["video1"]))
    assert torch.equal(feats[1, :5], torch.from_numpy(arrays["video0"]))
    assert (feats[1, 5:] == 0).all()  # padding

    # "val", "dev", "validate" all name the JSON's "validate" clips.
    for name in ("val", "dev", "validate", "validation"):
        assert open_split(root, name).image_keys == ["video2"]
    with pytest.raises(DataFormatError, match="splits are: test, train, validate"):
        open_split(root, "restval")


def test_batch_matches_reference_and_subset_keeps_alignment(msrvtt_dir):
    root, _, arrays = msrvtt_dir
    split = read_msrvtt(root / "MSRVTT_data.json", None, root / "features")
    assert split.image_keys == ["video0", "video1", "video2", "video3"]
    src = split.feature_source
    for idx in ([0], [3, 1, 2], [2, 2, 0]):
        fast, fl = src.batch(idx)
        slow, sl = src.batch_reference(idx)
        assert torch.equal(fast, slow) and torch.equal(fl, sl)
    sub = split.subset([3, 1])
    assert isinstance(sub, VideoSplit)
    assert sub.image_keys == sub.feature_source.video_ids == ["video3", "video1"]
    feats, lengths = sub.feature_source.batch([0])
    assert lengths.tolist() == [7] and torch.equal(feats[0], torch.from_numpy(arrays["video3"]))
    assert sub.captions == ["news anchor talks", "a woman reads the news", "a cat", "a cat plays",
                            "a cat sleeps"]


def test_community_split_lists(msrvtt_dir):
    root, captions, _ = msrvtt_dir
    # The 9k list as CLIP4Clip ships it: a CSV with one video_id column; captions from the JSON.
    (root / "MSRVTT_train.9k.csv").write_text("video_id\nvideo1\nvideo3\nvideo0\n")
    nine = open_split(root, "train9k")
    assert nine.image_keys == ["video1", "video3", "video0"]
    assert nine.captions_per_image.tolist() == [3, 2, 20]
    # A plain text list of ids, named by path.
    (root / "my_list.txt").write_text("video2\n\nvideo1\n")
    assert open_split(root, str(root / "my_list.txt")).image_keys == ["video2", "video1"]
    assert open_split(root, "my_list.txt").captions == ["a car race"] + captions["video1"]
    # The 1K-A test CSV: its sentences are the captions (one per clip), not the JSON's.
    (root / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\n"
        "ret0,msr7579,video3,\"a woman, reading news\"\n"
        "ret1,msr7725,video0,a man is cooking\n")
    test = open_split(root, "test1k")
    assert test.image_keys == ["video3", "video0"]
    assert test.captions == ["a woman, reading news", "a man is cooking"]
    assert read_id_list(root / "MSRVTT_JSFUSION_test.csv")[0] == ["video3", "video0"]
    with pytest.raises(DataFormatError, match="MSRVTT_train.7k.csv"):
        open_split(root, "train7k")
    with pytest.raises(DataFormatError, match="not found"):
        open_split(root, "missing_list.txt")


def test_missing_and_malformed_feature_files_are_named_and_skipped(msrvtt_dir, caplog):
    root, _, _ = msrvtt_dir
    feats = root / "features"
    (feats / "video1.npy").unlink()                                      # missing
    extra = {"video4": "train", "video5": "train", "video6": "train", "video7": "train",
             "video8": "train"}
    data = json.loads((root / "MSRVTT_data.json").read_text())
    data["videos"] += [{"video_id": v, "split": s} for v, s in extra.items()]
    data["sentences"] += [{"video_id": v, "caption": f"clip {v}"} for v in extra]
    (root / "MSRVTT_data.json").write_text(json.dumps(data))
    (feats / "video4.npy").write_text("this is not an array")               # garbage bytes
    np.save(feats / "video5.npy", np.zeros((4, 3, 8), np.float32))         # wrong rank
    np.save(feats / "video6.npy", np.zeros((4, 16), np.float32))           # other width
    np.save(feats / "video7.npy", np.zeros((0, 8), np.float32))            # no frames
    full = np.ones((6, 8), np.float32)
    np.save(feats / "video8.npy", full)
    raw = (feats / "video8.npy").read_bytes()
    (feats / "video8.npy").write_bytes(raw[:-40])                          # truncated
    with caplog.at_level(logging.WARNING):
        split = open_split(root, "train")
    src = split.feature_source
    broken = dict(zip(src.video_ids, src.broken))
    assert broken == {"video0": False, "video1": True, "video4": True, "video5": True,
                      "video6": True, "video7": True, "video8": True}
    assert "video1.npy not found" in src.problems["video1"]
    assert "video4.npy is not a readable" in src.problems["video4"]
    assert "T×D" in src.problems["video5"]
    assert "16-d" in src.problems["video6"]
    assert "no frames" in src.problems["video7"]
    assert "video8.npy" in src.problems["video8"]
    assert "video1" in caplog.text and "6 of 7 clips skipped" in caplog.text
    # Broken clips still batch (one zero frame) so a whole batch never fails.
    x, lengths = src.batch([0, 1])
    assert lengths.tolist() == [5, 1] and (x[1] == 0).all()


def test_values_that_turn_bad_after_opening_are_caught_at_read_time(msrvtt_dir, caplog):
    root, _, _ = msrvtt_dir
    split = open_split(root, "train")
    bad = np.full((9, 8), np.nan, dtype=np.float32)
    np.save(root / "features" / "video1.npy", bad)  # same header, NaN values
    with caplog.at_level(logging.WARNING):
        x, lengths = split.feature_source.batch([0, 1])
    assert split.feature_source.broken.tolist() == [False, True]
    assert lengths.tolist() == [5, 1] and torch.isfinite(x).all()
    assert "video1" in caplog.text and "non-finite" in caplog.text


def test_no_usable_features_is_an_error(tmp_path):
    (tmp_path / "features").mkdir()
    (tmp_path / "captions.csv").write_text("video,caption\nv1,a dog\n")
    with pytest.raises(DataFormatError, match="no clip has usable frame features"):
        open_split(tmp_path, None)


def test_lazy_reading_touches_only_the_requested_files(msrvtt_dir, monkeypatch):
    root, _, _ = msrvtt_dir
    reads = []
    original = np.load

    def counting_load(path, *args, **kwargs):
        reads.append((Path(path).name, kwargs.get("mmap_mode")))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(np, "load", counting_load)
    split = read_msrvtt(root / "MSRVTT_data.json", None, root / "features")
    # Opening maps each file (header only) and reads no data.
    assert {m for _, m in reads} == {"r"} and len(reads) == 4
    reads.clear()
    split.feature_source.batch([2])
    assert reads == [("video2.npy", None)]
    # Files are read when asked for, not remembered: a rewritten file shows its new values.
    new = np.full((3, 8), 7.0, np.float32)
    np.save(root / "features" / "video2.npy", new)
    assert torch.equal(split.feature_source.batch([2])[0][0], torch.from_numpy(new))


def test_vatex_folder_with_hdf5_features(tmp_path):
    h5py = pytest.importorskip("h5py")
    train = [{"videoID": "Ptf_2VRj-V0_000122_000132", "enCap": [f"cap {k}" for k in range(10)],
              "chCap": ["中文"]},
             {"videoID": "abc_000001_000011", "enCap": ["one", "two"]}]
    val = [{"videoID": "val_clip_000000_000010", "enCap": ["a dog runs"]},
           {"videoID": "val_missing_000000_000010", "enCap": ["absent features"]}]
    (tmp_path / "vatex_training_v1.0.json").write_text(json.dumps(train))
    (tmp_path / "vatex_validation_v1.0.json").write_text(json.dumps(val))
    rng = np.random.default_rng(1)
    with h5py.File(tmp_path / "features.h5", "w") as f:
        f["Ptf_2VRj-V0_000122_000132"] = rng.standard_normal((32, 6)).astype(np.float32)
        f["abc_000001_000011"] = rng.standard_normal((12, 6)).astype(np.float16)
        f["val_clip_000000_000010"] = rng.standard_normal((4, 6))
    assert is_video_dataset(tmp_path)
    tr = open_split(tmp_path, "train")
    assert tr.captions_per_image.tolist() == [10, 2]
    assert isinstance(tr.feature_source, H5Frames)
    x, lengths = tr.feature_source.batch([1, 0])
    assert x.shape == (2, 32, 6) and lengths.tolist() == [12, 32]
    with h5py.File(tmp_path / "features.h5", "r") as f:
        assert torch.equal(x[1], torch.from_numpy(f["Ptf_2VRj-V0_000122_000132"][()]))
    va = open_split(tmp_path, "validation")
    assert va.feature_source.broken.tolist() == [False, True]
    assert "no dataset 'val_missing_000000_000010'" in va.feature_source.problems[
        "val_missing_000000_000010"]
    (tmp_path / "vatex_bad.json").write_text(json.dumps([{"videoID": "x", "enCap": "not a list"}]))
    with pytest.raises(DataFormatError, match=r"\[0\]\.enCap"):
        read_vatex(tmp_path / "vatex_bad.json")


def test_video_pairs_csv_and_jsonl(tmp_path):
    _features(tmp_path / "features", {"a": 3, "b": 4, "c": 2})
    (tmp_path / "captions.csv").write_text(
        "video,caption,split\na,first of a,train\nb,only b,val\na,\"second, of a\",train\n"
        "c,c caption,train\n")
    assert is_video_dataset(tmp_path)
    tr = open_split(tmp_path, "train")
    assert tr.image_keys == ["a", "c"] and tr.captions == ["first of a", "second, of a", "c caption"]
    assert open_split(tmp_path, "validate").image_keys == ["b"]
    jl = tmp_path / "pairs.jsonl"
    jl.write_text('{"video": "b", "caption": ["x", "y"]}\n\n{"video_id": "c", "caption": "z"}\n')
    s = read_video_pairs(jl, features=tmp_path / "features")
    assert s.captions_per_image.tolist() == [2, 1] and s.feature_source.lengths.tolist() == [4, 2]
    with pytest.raises(DataFormatError, match="no 'split' column"):
        read_video_pairs(jl, split="train")
    jl.write_text('{"video": "b", "caption": ["x", "y"]}\n{"video": "c"}\n')
    with pytest.raises(DataFormatError, match=r"pairs.jsonl:2"):
        read_video_pairs(jl, features=tmp_path / "features")


def test_image_datasets_are_not_taken_for_videos(tmp_path):
    (tmp_path / "captions.csv").write_text("image,caption\na.jpg,a dog\n")
    assert not is_video_dataset(tmp_path) and not is_video_dataset(tmp_path / "captions.csv")
    assert not isinstance(open_split(tmp_path), VideoSplit)
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": []}))
    assert not is_video_dataset(tmp_path / "dataset_flickr8k.json")


def test_open_frame_features_folder_without_ids(tmp_path):
    arrays = _features(tmp_path, {"b": 2, "a": 5})
    src = open_frame_features(tmp_path)
    assert isinstance(src, NpyFrameFolder) and src.video_ids == ["a", "b"]
    assert torch.equal(src.batch([0])[0][0], torch.from_numpy(arrays["a"]))
    with pytest.raises(DataFormatError):
        open_frame_features(tmp_path / "nope")


@needs_msrvtt
def test_shared_subset_reads_as_documented():
    train, val = open_split(MSRVTT, "train"), open_split(MSRVTT, "val")
    assert (train.n_images, train.n_captions, val.n_images) == (700, 700, 100)
    assert val.image_keys[0] == "video700" and train.image_keys[-1] == "video699"
    assert val.feature_source.dim == 128 and not val.feature_source.broken.any()
    x, lengths = val.feature_source.batch([0, 99])
    assert x.shape == (2, 50, 128) and lengths.tolist() == [50, 50]
    assert torch.equal(x[1], torch.from_numpy(np.load(MSRVTT / "features" / "video799.npy")))
