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
from vseinf.data.video_datasets import (
    H5Frames,
    NpyFrameFolder,
    VideoSplit,
    is_video_dataset,
    open_frame_features,
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


def test_video_pairs_unknown_split_values_and_header_only(tmp_path, caplog):
    _features(tmp_path / "features", {"a": 3, "b": 4})
    path = tmp_path / "captions.csv"
    path.write_text("video,caption,split\na,one,train\nb,two,trian\n")
    with caplog.at_level(logging.WARNING, logger="vseinf.data.records"):
        assert read_video_pairs(path, "train", features=tmp_path / "features").image_keys == ["a"]
    assert any("'trian' (1 row)" in r.getMessage() for r in caplog.records)
    path.write_text("video,caption,split\n")
    with pytest.raises(DataFormatError, match="no \\(video, caption\\) rows below the header"):
        read_video_pairs(path, "train", features=tmp_path / "features")


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


# --------------------------------------------------------------------------------------------
# Decoding and extraction from video files
# --------------------------------------------------------------------------------------------

from vseinf.cli.extract import add_extract_video_arguments, run_extract_video  # noqa: E402
from vseinf.video import (  # noqa: E402
    FrameExtractor,
    FrameSampler,
    VideoDecodeError,
    decode_all_frames,
    decode_frames,
    embed_frame_features,
    extract_video_features,
    middle_frame,
)


def _corrupt_video(tmp_path: Path) -> Path:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    return bad


def test_frame_sampler_rules():
    s = FrameSampler(num_frames=4)
    assert s.uniform_indices(100) == [12, 37, 62, 87]  # middles of four equal segments
    assert s.uniform_indices(3) == [0, 1, 2]           # short clips keep every frame
    fps = FrameSampler(num_frames=None, fps=2)
    times = [k / 10 for k in range(25)]                  # 10 fps, 2.5 s
    assert fps.select(times) == [0, 5, 10, 15, 20]
    capped = FrameSampler(num_frames=None, fps=10, max_frames=5)
    assert capped.select(times) == [2, 7, 12, 17, 22]
    with pytest.raises(ValueError):
        FrameSampler(num_frames=8, fps=1.0)


@pytest.fixture(scope="module")
def bikes_all_frames():
    """Every frame of the 10 s, 25 fps bikes clip and its time (decoded once for the module)."""
    if not (VIDEOS / "bikes.mp4").is_file():
        pytest.skip("shared video clips not present")
    return decode_all_frames(VIDEOS / "bikes.mp4")


@pytest.mark.parametrize("sampler", [FrameSampler(num_frames=8),
                                     FrameSampler(num_frames=None, fps=2.0),
                                     FrameSampler(num_frames=None, fps=4.0, max_frames=5)],
                         ids=["count", "fps", "fps-capped"])
def test_streaming_decode_equals_decode_everything_then_select(sampler, bikes_all_frames):
    frames, times = bikes_all_frames
    assert len(frames) == 250 and frames[0].size == (640, 272)
    assert times[1] == pytest.approx(0.04)
    streamed = list(decode_frames(VIDEOS / "bikes.mp4", sampler))
    kept = sampler.select(times)
    assert len(streamed) == len(kept) == {8: 8, None: 20 if sampler.fps == 2.0 else 5}[
        sampler.num_frames]
    for a, i in zip(streamed, kept):
        assert np.array_equal(np.asarray(a), np.asarray(frames[i]))


@needs_videos
def test_the_other_real_clip_decodes():
    bunny = VIDEOS / "bigbuckbunny.mp4"  # H.264 1280×720, 132 frames
    frames = list(decode_frames(bunny, FrameSampler(num_frames=3)))
    assert len(frames) == 3 and frames[0].size == (1280, 720)
    assert middle_frame(bunny).size == (1280, 720)


def test_undecodable_file_raises_a_named_error(tmp_path):
    bad = _corrupt_video(tmp_path)
    with pytest.raises(VideoDecodeError, match="broken.mp4"):
        list(decode_frames(bad, FrameSampler(num_frames=4)))


@needs_videos
def test_extract_folder_of_videos_skips_a_corrupt_file(tmp_path, caplog):
    clips = [VIDEOS / "bigbuckbunny.mp4", VIDEOS / "bikes.mp4", _corrupt_video(tmp_path)]
    extractor = FrameExtractor("mobilenet_v2", "default", image_size=64,
                               sampler=FrameSampler(num_frames=3), batch_size=2)
    out = tmp_path / "features"
    with caplog.at_level(logging.WARNING):
        report = extract_video_features(clips, out, extractor, progress=False)
    assert report.written == ["bigbuckbunny", "bikes"] and list(report.failed) == ["broken"]
    assert "broken.mp4" in caplog.text and "broken.mp4" in report.summary()
    src = open_frame_features(out)
    assert src.video_ids == ["bigbuckbunny", "bikes"] and src.dim == 1280
    assert src.lengths.tolist() == [3, 3]
    x, _ = src.batch([1])
    assert torch.isfinite(x).all() and (x >= 0).all()  # post-ReLU6 grid means
    # The stored features are the extractor's, frame by frame.
    direct = extractor.features(VIDEOS / "bikes.mp4")
    assert np.allclose(x[0].numpy(), direct, atol=1e-5)
    # Grid mean per frame, checked against the backbone run by hand on one decoded frame.
    frame = list(decode_frames(VIDEOS / "bikes.mp4", FrameSampler(num_frames=3)))[2]
    with torch.no_grad():
        fmap = extractor.backbone(extractor.transform(frame).unsqueeze(0))
    assert np.allclose(direct[2], fmap.mean(dim=(2, 3))[0].numpy(), atol=1e-5)
    # A second run keeps what is there; other settings are refused rather than mixed in.
    again = extract_video_features(clips[:2], out, extractor, progress=False)
    assert again.existing == ["bigbuckbunny", "bikes"] and not again.written
    other = FrameExtractor("mobilenet_v2", "default", image_size=64,
                           sampler=FrameSampler(num_frames=4))
    with pytest.raises(ValueError, match="other settings"):
        extract_video_features(clips[:2], out, other, progress=False)


@needs_videos
def test_extract_command_line(tmp_path, capsys):
    videos = tmp_path / "clips"
    videos.mkdir()
    (videos / "bikes.mp4").symlink_to(VIDEOS / "bikes.mp4")
    _corrupt_video(videos)
    (videos / "notes.txt").write_text("not a video")
    parser = argparse.ArgumentParser()
    add_extract_video_arguments(parser)
    args = parser.parse_args(["--videos", str(videos), "--out", str(tmp_path / "f"), "--frames", "2",
                              "--image-size", "32", "--backbone-weights", "none",
                              "--no-progress"])
    assert run_extract_video(args, []) == 0
    printed = capsys.readouterr().out
    assert "1 clip(s) extracted" in printed and "1 failed" in printed and "broken" in printed
    assert np.load(tmp_path / "f" / "bikes.npy").shape == (2, 1280)
    settings = json.loads((tmp_path / "f" / "extract.json").read_text())
    assert settings["sampler"] == {"num_frames": 2, "fps": None, "max_frames": None}
    assert settings["weights"] is None and settings["image_size"] == 32


@needs_msrvtt
def test_short_training_run_retrieves_far_above_chance(tmp_path, monkeypatch):
    """Train the frames tower briefly on the shared subset (700 clips), evaluate on the 100
    validate clips. Chance with one caption per clip: R@K = K% each way, so RSUM = 2 × (1 + 5 +
    10) = 32; the paper's recipe reaches about 200 here after 35 epochs."""
    from vseinf.config import load_config
    from vseinf.eval import evaluate_checkpoints, retrieval_metrics
    from vseinf.model import load_model
    from vseinf.train import train

    monkeypatch.setenv("VSEINF_CACHE", str(tmp_path / "cache"))
    config = Path(__file__).resolve().parents[1] / "configs" / "msrvtt_frames.yaml"
    cfg = load_config(config, [("data.path", str(MSRVTT)), ("embed_dim", "256"), ("epochs", "4"),
                               ("lr_decay_epoch", "3"), ("lr", "5e-4"), ("log_every", "1000")])
    assert cfg.model.image_encoder == "frames" and cfg.data.val_split == "validate"
    best = train(cfg, tmp_path / "run", progress=False)
    assert best["n_images"] == 100 and best["rsum"] > 3 * 32

    # vseinf eval on the same split gives the same table from the saved checkpoint.
    metrics = evaluate_checkpoints([tmp_path / "run"], data=str(MSRVTT), split="val")
    assert metrics["rsum"] == pytest.approx(best["rsum"])

    # The search path: embed a frame-feature folder's clips, rank the captions with the live
    # text tower (not the cache) — still far above chance.
    model = load_model(tmp_path / "run" / "best")
    val = open_split(MSRVTT, "validate")
    emb, ok = embed_frame_features(model, val.feature_source)
    assert emb.shape == (100, 256) and ok.all()
    assert torch.allclose(emb.norm(dim=1), torch.ones(100), atol=1e-4)
    live = retrieval_metrics((emb @ model.encode_texts(val.captions).T).cpu(), val.caption_to_image)
    assert live["rsum"] > 3 * 32


@needs_videos
def test_embedding_video_files_matches_embedding_their_extracted_features(tmp_path):
    from vseinf.config import ModelConfig
    from vseinf.encoders.text import Vocabulary
    from vseinf.model import VSEModel
    from vseinf.video import embed_video_files

    torch.manual_seed(0)
    model = VSEModel(ModelConfig(image_encoder="frames", feature_dim=1280, text_encoder="bigru",
                                 embed_dim=32, word_dim=8),
                     vocab=Vocabulary.build(["a dog"]).words).eval()
    extractor = FrameExtractor("mobilenet_v2", "default", image_size=64,
                               sampler=FrameSampler(num_frames=2))
    clips = [VIDEOS / "bikes.mp4", _corrupt_video(tmp_path)]
    extract_video_features(clips, tmp_path / "f", extractor, progress=False)
    rebuilt = FrameExtractor.from_settings(tmp_path / "f")
    emb, ok, failed = embed_video_files(model, clips, rebuilt)
    assert ok.tolist() == [True, False] and list(failed) == [str(clips[1])]
    assert (emb[1] == 0).all() and emb[0].norm().item() == pytest.approx(1.0, abs=1e-5)
    from_folder, usable = embed_frame_features(model, open_frame_features(tmp_path / "f"))
    assert usable.tolist() == [True]
    assert torch.allclose(from_folder[0], emb[0], atol=1e-5)
    with pytest.raises(ValueError, match="128-d"):
        model.config.feature_dim = 128
        embed_frame_features(model, open_frame_features(tmp_path / "f"))
