"""``vseinf search``: query an index by text, image or video from the command line (one query, or a
file of them answered as JSON lines). :func:`add_engine_settings` is shared with ``vseinf serve``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..search.build import encode_texts_np
from ..search.engines import ENGINES, HNSW_EF_SEARCH, IVF_NPROBE, IVF_RERANK, engine_settings, tune_engine
from ..search.files import json_text
from ..search.gallery import Gallery, embed_query_images, embed_query_video, load_query_image
from ..search.sources import printable
from .argtypes import positive_int


def add_engine_settings(p) -> None:
    """The ``--ef-search``, ``--nprobe`` and ``--rerank`` options of ``search`` and ``serve``."""
    p.add_argument("--ef-search", type=positive_int,
                   help=f"HNSW: candidate list per query (default {HNSW_EF_SEARCH}; larger = better recall, slower)")
    p.add_argument("--nprobe", type=positive_int, help=f"IVF-PQ: cells scanned per query (default {IVF_NPROBE})")
    p.add_argument("--rerank", type=positive_int, help=f"IVF-PQ: candidates re-scored exactly (default {IVF_RERANK})")


def add_search_parser(sub):
    p = sub.add_parser("search", help="search an index by text, image or video",
                       description='vseinf search INDEX "a dog runs on the beach" -k 10, or --image photo.jpg, '
                                   'or --video clip.mp4, or --queries FILE (one text query a line → JSON lines)')
    p.add_argument("index", help="index directory made by `vseinf encode`")
    p.add_argument("query", nargs="?", help="text query")
    p.add_argument("--queries", metavar="FILE",
                   help="text queries, one a line ('-': standard input); prints one JSON line per query, "
                        '{"line": N, "query": …, "results": […]}, so a script pays the start-up once')
    p.add_argument("--image", help="search with this image instead of text")
    p.add_argument("--video", help="search with this video file instead of text (or, for a video model, a "
                                   "T×D .npy file of frame features)")
    p.add_argument("-k", type=positive_int, default=10, help="number of results (default 10)")
    p.add_argument("--json", action="store_true", help='print {"results": [{"path": …, "file": …, "score": …}, '
                                                       '…]}: path relative to the gallery folder (as in '
                                                       '/api/search), file its full path (video galleries: + '
                                                       '"id", "kind", "thumb")')
    p.add_argument("--model", help="checkpoint directory (default: the model that built the index)")
    p.add_argument("--engine", choices=list(ENGINES), help="override the index's engine")
    p.add_argument("--device", default="cpu", help="where the model and the exact engine run (cpu, cuda, cuda:1…)")
    add_engine_settings(p)
    return p


def read_queries_file(path: str) -> list[tuple[int, str]]:
    """``(line number, query)`` for each non-blank line of ``path`` (``"-"``: standard input)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: queries file not found") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, not a queries file") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


# Queries embedded and searched per step of --queries: output streams, and memory stays bounded.
QUERY_CHUNK = 256


def _search_many(gallery: Gallery, model, queries: list[tuple[int, str]], k: int) -> None:
    """Print one JSON line per query, in file order, flushed after each chunk."""
    for start in range(0, len(queries), QUERY_CHUNK):
        chunk = queries[start:start + QUERY_CHUNK]
        vectors = encode_texts_np(model, [q for _, q in chunk])
        for (line, query), results in zip(chunk, gallery.search(vectors, k, absolute=True)):
            print(json_text({"line": line, "query": query, "results": results}))
        sys.stdout.flush()


def _embed_one_text(model, text: str) -> np.ndarray:
    """One text query → 1 × d, computed on one thread. A query is a few tokens: too little work to
    share between threads, and on a busy machine every op would wait for a descheduled partner
    thread (one MiniLM query took 5–8 s with 2 threads against 0.3 s with one on a loaded 2-core CPU)."""
    import torch  # lazy: see vseinf.search

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return encode_texts_np(model, [text])
    finally:
        torch.set_num_threads(threads)


def run_search(args, extra) -> int:
    video_query = getattr(args, "video", None)
    queries_file = getattr(args, "queries", None)
    if sum(x is not None for x in (args.query, args.image, video_query, queries_file)) != 1:
        raise ValueError("search: give a text query or --image FILE or --video FILE or --queries FILE (one of them)")
    if args.k < 1:
        raise ValueError(f"search: -k must be a positive integer, got {args.k}")
    if args.query is not None and not args.query.strip():
        raise ValueError("search: the query is empty")
    queries = read_queries_file(queries_file) if queries_file is not None else None
    if queries is not None and not queries:
        raise ValueError(f"search: {queries_file} holds no queries")
    gallery = Gallery.load(args.index, engine=args.engine, device=args.device)
    tune_engine(gallery.engine, **engine_settings(args))
    image = load_query_image(args.image) if args.image is not None else None  # fail before loading the model
    if video_query is not None and not Path(video_query).is_file():
        raise FileNotFoundError(f"{video_query}: query video not found")
    # Text queries need only the text tower: no CNN, no transformers import (start-up is most of a query).
    text = image is None and video_query is None
    model = gallery.load_model(args.model, device=args.device, text_only=text)
    if queries is not None:
        _search_many(gallery, model, queries, args.k)
        return 0
    if image is not None:
        query = embed_query_images(gallery, model, [image])
    elif video_query is not None:
        query = embed_query_video(gallery, model, video_query)
    else:
        query = _embed_one_text(model, args.query)
    results = gallery.search(query, args.k, absolute=True)[0]
    if args.json:
        print(json_text({"results": results}))
        return 0
    for rank, r in enumerate(results, 1):
        text = f"  {r['caption']}" if "caption" in r else ""
        print(f"{rank:3d}. {r['score']:.4f}  {printable(r.get('file', r['path']))}{text}")
    return 0
