"""Gallery search: embed a folder of images or videos (or a captions file, or frame-feature files)
once into an index folder, then search it by text, image or video.

One concept a module, each readable top to bottom:

- :mod:`.engines` — the search engines (exact chunked scan, FAISS HNSW, FAISS IVF-PQ), their
  settings, and which one a gallery gets;
- :mod:`.sources` — what a gallery is made of: image and video files, captions files, frame features;
- :mod:`.identity` — which model made a gallery's embeddings, and whether another one matches;
- :mod:`.files` — the index folder on disk: its files, the lock, the atomic swap, reading them back;
- :mod:`.journal` — the progress an interrupted encode of an image folder leaves to resume from;
- :mod:`.build` — encoding a gallery into an index folder (:func:`encode_gallery`);
- :mod:`.gallery` — a loaded index (:class:`Gallery`) and the queries it answers.

Imports flow one way: ``vseinf.cli`` (``encode``, ``search``) and ``vseinf.serve`` → ``vseinf.search``
→ ``vseinf.model`` / ``vseinf.encoders`` → ``vseinf.pooling``. Inside the package, each module imports
only those listed before it: engines and sources stand alone, identity needs the model, files
builds on engines, journal on identity, gallery on engines and files, and build on all of them
(it reads a previous index through gallery to reuse its rows).

Importing this package loads numpy and the standard library only: torch, the model, the video code
and the data package (which loads PIL) are imported by the functions that use them, because they
take seconds to load and ``vseinf encode --help``, ``vseinf serve --help`` or a text search (no PIL,
no CNN) need none of them.
"""

from .build import EncodeReport, encode_gallery, encode_image_files, encode_texts_np
from .engines import (
                      ENGINES,
                      FAISS_THRESHOLD,
                      ExactIndex,
                      GalleryIndex,
                      HNSWIndex,
                      IndexFormatError,
                      IVFPQIndex,
                      build_engine,
                      choose_engine,
                      exact_search_reference,
                      tune_engine,
)
from .files import IndexLock, IndexLockedError, meta_schema, read_rows, thumb_name
from .gallery import (
                      Gallery,
                      check_model,
                      embed_query_images,
                      embed_query_video,
                      load_query_image,
)
from .identity import model_identity
from .sources import (
                      Skipped,
                      detect_gallery_kind,
                      printable,
                      read_captions_file,
                      scan_images,
                      scan_videos,
)

__all__ = [
    "FAISS_THRESHOLD", "ENGINES", "ExactIndex", "HNSWIndex", "IVFPQIndex", "GalleryIndex", "Gallery",
    "EncodeReport", "Skipped", "build_engine", "choose_engine", "tune_engine", "encode_gallery", "encode_image_files",
    "encode_texts_np", "exact_search_reference",
    "model_identity", "read_captions_file", "scan_images", "scan_videos", "detect_gallery_kind", "check_model",
    "load_query_image", "embed_query_images", "embed_query_video", "thumb_name",
    "IndexFormatError", "IndexLock", "IndexLockedError", "meta_schema", "read_rows", "printable",
]
