"""Data: caption-dataset readers, image loading and transforms, and feature caches.

Modules: ``records`` (the :class:`CaptionSplit` record every reader returns, :class:`DataFormatError`,
what readers share), ``splits`` (image-caption datasets, and :func:`open_split`, which tells every
layout apart), ``video_datasets`` (video-caption datasets and their frame features), ``jsonl`` (JSONL pair
files, images and videos alike), ``images`` (loading, transforms, datasets), ``cache`` (feature
caches).

The package sits low in the import graph: it depends on numpy, PIL and torch only, never on
the model or the training loop.

    >>> from vseinf.data import open_split, ImageDataset, ImageTransform, collate_skip_broken
    >>> split = open_split("data/flickr8k", "train")         # detects the layout
    >>> ds = ImageDataset(split, ImageTransform(512, train=True, seed=0))
"""

from .cache import (
    CacheError,
    FeatureCache,
    FeatureCacheWriter,
    StaleCacheError,
    cache_dir,
    cache_path,
    open_cache,
)
from .images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BadImageError,
    ImageDataset,
    ImageTransform,
    collate_skip_broken,
    load_rgb,
    sample_crop,
    to_tensor,
)
from .records import CaptionSplit, DataFormatError
from .splits import (
    open_split,
    read_flickr8k,
    read_flickr_token_file,
    read_karpathy_json,
    read_pairs_file,
    read_precomp,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BadImageError",
    "CacheError",
    "CaptionSplit",
    "DataFormatError",
    "FeatureCache",
    "FeatureCacheWriter",
    "ImageDataset",
    "ImageTransform",
    "StaleCacheError",
    "cache_dir",
    "cache_path",
    "collate_skip_broken",
    "load_rgb",
    "open_cache",
    "open_split",
    "read_flickr8k",
    "read_flickr_token_file",
    "read_karpathy_json",
    "read_pairs_file",
    "read_precomp",
    "sample_crop",
    "to_tensor",
]
