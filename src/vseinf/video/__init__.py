"""Video files: decoding, frame features for training, and video embeddings for search.

- ``decode`` — which frames of a clip to keep (:class:`FrameSampler`) and decoding them with PyAV;
- ``extract`` — a frozen image backbone over the sampled frames: ``T × D`` features per clip,
  stored as ``<video_id>.npy`` by ``vseinf extract --videos`` (:class:`FrameExtractor`);
- ``embed`` — a trained model's video embeddings, from stored frame features or straight from
  files (:class:`VideoEmbedder`, used by ``vseinf encode`` / ``search`` on video folders).

Video *datasets* (captions + stored frame features) are read by :mod:`vseinf.data.video_datasets`.
"""

from .decode import (
    VIDEO_SUFFIXES,
    FrameSampler,
    VideoDecodeError,
    decode_all_frames,
    decode_frames,
    list_videos,
    middle_frame,
)
from .embed import (
    IMAGE_MODEL_FRAMES,
    VIDEO_MODEL_FRAMES,
    VideoEmbedder,
    embed_frame_features,
    embed_video_files,
)
from .extract import (
    SETTINGS_FILE,
    ExtractReport,
    FrameExtractor,
    extract_video_features,
)

__all__ = [
    "IMAGE_MODEL_FRAMES",
    "SETTINGS_FILE",
    "VIDEO_MODEL_FRAMES",
    "VIDEO_SUFFIXES",
    "ExtractReport",
    "FrameExtractor",
    "FrameSampler",
    "VideoDecodeError",
    "VideoEmbedder",
    "decode_all_frames",
    "decode_frames",
    "embed_frame_features",
    "embed_video_files",
    "extract_video_features",
    "list_videos",
    "middle_frame",
]
