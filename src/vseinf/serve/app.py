"""The search web app: a page, a JSON API and the GPO coefficient plot, over one gallery index.

    vseinf serve INDEX --port 8000          # then open http://127.0.0.1:8000/

Routes
    GET  /                     search page: a text box → grid of thumbnails (or captions, or video
                               clips: a middle-frame thumbnail, the clip name) with scores, and an
                               image upload → nearest images (captions, clips)
    GET  /gpo                  the model's learned GPO coefficients θ over sorted positions, for
                               several set sizes, per modality (the paper's Figure 5)
    GET  /api/info             what is being served
    GET  /api/search?q=&k=     {"results": [{"path": …, "file": URL, "score": …}, …]}: path relative to the
                               gallery folder (as `vseinf search --json` reports it), file the original's URL
                               (+ "caption" for text galleries; video galleries: + "id", "kind": "video",
                               "thumb": URL or null; clips made from feature files have no file)
    POST /api/search/image     multipart field "file" (+ optional k) → the same shape
    GET  /api/thumb?path=      a JPEG thumbnail of an indexed image, or the stored thumbnail of an indexed
                               clip (nothing else on disk is reachable)
    GET  /api/file?path=       the original image (or video file) of a result; only files listed in the
                               index and inside the gallery folder are served
    GET  /api/gpo              θ as JSON;  GET /api/gpo.svg?modality=image|text  the plot

Bad input (empty or over-long query, k not a positive integer, a non-image or over-size upload, a
path that is not in the gallery) gets a 4xx whose JSON ``detail`` says what was wrong.

Privacy (:mod:`vseinf.serve.security`): only requests whose Host header names this server are
answered (localhost and the ``--host`` address; ``--allow-host`` adds names), so another web site
cannot read the index through DNS rebinding; every answer carries a strict Content-Security-Policy
(no framing, no foreign scripts) and ``nosniff``; ``/openapi.json`` and ``/docs`` exist only with
``--api-docs``; ``/api/info`` names no paths of the serving machine.

All model calls run on one worker thread (:class:`QueryWorker`): the tokenizer and the model are
not meant to be driven from many threads at once, and text queries that arrive together are
embedded as one batch, which costs little more than a single query — so a burst of concurrent
queries is answered in a few batched passes instead of one pass each.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations at run
# time. This module needs the ``serve`` extra (fastapi, uvicorn); only ``vseinf serve`` imports it,
# after checking that the extra is installed.
import asyncio
import concurrent.futures
import contextlib
import html
import json
import queue
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from ..pooling import BranchPool, pooling_coefficients
from ..search.build import encode_texts_np
from ..search.engines import IndexFormatError
from ..search.gallery import Gallery, check_model, embed_query_images, load_query_image
from ..search.sources import printable
from ..thumbnails import THUMB_SIZE, ThumbnailError, ThumbnailMaker, image_thumb_name
from .security import HostPolicy, SecurityMiddleware

STATIC_DIR = Path(__file__).resolve().parent / "static"

MAX_QUERY_CHARS = 1000
MAX_K = 100
DEFAULT_K = 12
MAX_UPLOAD_BYTES = 10 << 20
TEXT_SET_SIZES = (5, 10, 15, 20, 30)


class BadRequest(ValueError):
    """A request the user can fix; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------
# Input checks (plain functions, so the rules are readable and testable without a server)


def parse_query(q: str | None, max_chars: int = MAX_QUERY_CHARS) -> str:
    if q is None or not q.strip():
        raise BadRequest("the query is empty: type a few words, e.g. ?q=a dog on the beach")
    if len(q) > max_chars:
        raise BadRequest(f"the query is too long ({len(q)} characters; at most {max_chars})", 413)
    return q.strip()


def parse_k(k: str | None, max_k: int = MAX_K, default: int = DEFAULT_K) -> int:
    if k is None or k == "":
        return default
    try:
        value = int(k.strip())
    except ValueError:
        raise BadRequest(f"k must be a positive integer, got {k[:40]!r}") from None
    if value < 1:
        raise BadRequest(f"k must be a positive integer, got {value}")
    if value > max_k:
        raise BadRequest(f"k must be at most {max_k}, got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# The model worker


@dataclass
class _Job:
    kind: str  # "text" or "image"
    payload: object
    k: int
    future: concurrent.futures.Future


class QueryWorker:
    """Embeds queries and searches the gallery on one thread; concurrent text queries share a batch.

    Before each batch it checks the index on disk: an index that ``vseinf encode`` replaced is
    loaded and answers from then on (if it cannot be used, the copy loaded before keeps
    answering), and a memory-mapped embeddings file changed under the server is never read
    (:meth:`vseinf.search.gallery.Gallery.check_files`): the index is reloaded, or the batch fails with
    :class:`vseinf.search.engines.IndexFormatError` saying why.

    Args:
        model: the model that encoded the gallery.
        gallery: the loaded index.
        max_batch: most text queries embedded in one pass.
    """

    def __init__(self, model, gallery: Gallery, max_batch: int = 64):
        self.model = model
        self.gallery = gallery
        self.max_batch = max_batch
        self._failed: tuple | None = None  # (gallery.json on disk, why it could not be loaded)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="vseinf-query-worker", daemon=True)
        self._thread.start()

    def submit_text(self, text: str, k: int) -> concurrent.futures.Future:
        return self._submit("text", text, k)

    def submit_image(self, image, k: int) -> concurrent.futures.Future:
        return self._submit("image", image, k)

    def _submit(self, kind, payload, k) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not self._thread.is_alive():
            future.set_exception(RuntimeError("the query worker has stopped"))
            return future
        self._queue.put(_Job(kind, payload, k, future))
        return future

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs, stop = [job], False
            while len(jobs) < self.max_batch:  # whatever else is already waiting joins this pass
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                jobs.append(more)
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            texts = [j for j in jobs if j.kind == "text"]
            if texts:
                self._run(texts, lambda: encode_texts_np(self.model, [j.payload for j in texts]))
            for j in jobs:
                if j.kind == "image":
                    self._run([j], lambda j=j: embed_query_images(self.gallery, self.model, [j.payload]))
            if stop:
                return

    def _refresh(self) -> None:
        """Swap in the index now on disk if it was replaced; raise IndexFormatError if the loaded one
        cannot be read any more and no usable one replaces it."""
        gallery = self.gallery
        damaged = None
        try:
            gallery.check_files()
        except IndexFormatError as exc:
            damaged = exc
        now = gallery.on_disk()
        if damaged is None and (now is None or now == gallery._meta_id):
            return
        if self._failed is not None and self._failed[0] == now:  # tried already: same files, same answer
            error = self._failed[1]
        else:
            try:
                new = gallery.reload()
                check_model(new, self.model)
            except (ValueError, OSError) as exc:
                error = str(exc)
                self._failed = (now, error)
                print(f"vseinf serve: the index in {gallery.path} changed but cannot be loaded: {error}",
                      file=sys.stderr, flush=True)
            else:
                self.gallery, self._failed = new, None
                return
        if damaged is not None:
            raise IndexFormatError(f"{damaged}; reloading the index failed: {error}")
        # otherwise the copy loaded before is intact and keeps answering

    def _run(self, jobs: list[_Job], embed) -> None:
        try:
            self._refresh()
            queries = embed()
            results = self.gallery.search(queries, max(j.k for j in jobs))
            for j, res in zip(jobs, results):
                j.future.set_result(res[:j.k])
        except Exception as exc:  # answer every waiting request; the worker itself keeps running
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(exc)


# ---------------------------------------------------------------------------------------------
# GPO coefficients (the paper's Figure 5)


def _set_size_of_images(model) -> int:
    """How many vectors the image tower pools: grid cells of the CNN map, or 36 regions."""
    if model.config.image_encoder != "grid":
        return 36
    size = model.config.image_size
    with torch.no_grad():
        feats = model.image.features(torch.zeros(1, 3, size, size, device=model.device))
    return int(feats.shape[1])


def _learned_coefficients(pool, sizes: list[int]) -> np.ndarray | None:
    """θ (len(sizes) × max(sizes)) of a pooling with learned, size-only coefficients; else None."""
    if pool is None or not hasattr(pool, "coefficients"):
        return None
    try:
        return pooling_coefficients(pool, sizes).numpy()
    except ValueError:  # gpo-features: θ depends on the feature values, not only on the set size
        return None


def gpo_coefficients(model) -> dict:
    """θ over positions for a few set sizes, per modality: ``{modality: {"pooling", "sizes", "theta"}}``.

    ``theta[i]`` has ``sizes[i]`` values (position 1 = the largest value of each dimension). A
    pooling without learned coefficients (avg, max, …) or whose weights depend on the feature values
    gets empty lists and its name. A branched pooling ("gpo+max") shows its first branch, named
    with the branches ("GPO of gpo+max").
    """
    n_image = _set_size_of_images(model)
    image_sizes = sorted({max(2, round(n_image * f)) for f in (0.25, 0.5, 0.8, 1.0)})
    out = {}
    for modality, pool, sizes in (("image", getattr(model.image_head, "gpool", None), image_sizes),
                                  ("text", getattr(model.text, "gpool", None), list(TEXT_SET_SIZES))):
        name = type(pool).__name__
        if isinstance(pool, BranchPool):
            name, pool = f"{type(pool.branches[0]).__name__} of {'+'.join(pool.names)}", pool.branches[0]
        entry = {"pooling": name, "sizes": [], "theta": []}
        theta = _learned_coefficients(pool, sizes)
        if theta is not None:
            entry["sizes"] = sizes
            entry["theta"] = [np.round(theta[i, :n].astype(np.float64), 6).tolist() for i, n in enumerate(sizes)]
        out[modality] = entry
    return out


_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def _nice_step(span: float, ticks: int) -> float:
    raw = span / max(ticks, 1)
    magnitude = 10 ** np.floor(np.log10(raw)) if raw > 0 else 1.0
    for m in (1, 2, 5, 10):
        if raw <= m * magnitude:
            return float(m * magnitude)
    return float(10 * magnitude)


def svg_text(label: str) -> str:
    """``label`` as SVG text content: escaped, and ``x_k`` written with k as a subscript."""
    head, sep, sub = label.partition("_")
    if not sep or not sub or " " in sub:
        return html.escape(label)
    return f'{html.escape(head)}<tspan baseline-shift="sub" font-size="75%">{html.escape(sub)}</tspan>'


def line_plot_svg(title: str, curves: list[tuple[str, list[float]]], xlabel: str = "position k (sorted, largest first)",
                  ylabel: str = "θ_k", width: int = 640, height: int = 360) -> str:
    """A small self-contained SVG line chart; curve i is drawn over x = 1..len(values). In the axis
    labels ``_x`` is a subscript (``θ_k`` → θ with a subscript k)."""
    left, right, top, bottom = 60, 140, 36, 48
    pw, ph = width - left - right, height - top - bottom
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{left}" y="22" font-size="15" font-weight="bold">{html.escape(title)}</text>']
    if not curves:
        parts.append(f'<text x="{left}" y="{top + ph / 2}">no learned coefficients for this pooling</text></svg>')
        return "".join(parts)
    x_max = max(len(v) for _, v in curves)
    y_max = max(max(v) for _, v in curves) or 1.0
    y_step = _nice_step(y_max, 5)
    y_top = y_step * np.ceil(y_max / y_step)
    x_step = max(1, int(_nice_step(max(x_max - 1, 1), 8)))

    def sx(x):  # data → pixel
        return left + (x - 1) / max(x_max - 1, 1) * pw

    def sy(y):
        return top + ph - y / y_top * ph

    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    for i in range(int(round(y_top / y_step)) + 1):
        y = i * y_step
        parts.append(f'<line x1="{left - 4}" x2="{left + pw}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 8}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    for x in sorted({1, *range(x_step, x_max + 1, x_step)}):  # 1 once, also when the step is 1
        parts.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#444"/>'
                     f'<text x="{sx(x):.1f}" y="{top + ph + 18}" text-anchor="middle">{x}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">{svg_text(xlabel)}</text>'
                 f'<text x="16" y="{top + ph / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 16 {top + ph / 2})">{svg_text(ylabel)}</text>')
    for i, (label, values) in enumerate(curves):
        colour = _PALETTE[i % len(_PALETTE)]
        points = " ".join(f"{sx(x + 1):.1f},{sy(v):.1f}" for x, v in enumerate(values))
        parts.append(f'<polyline class="curve" fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
        ly = top + 14 + 18 * i
        parts.append(f'<line x1="{left + pw + 12}" x2="{left + pw + 36}" y1="{ly}" y2="{ly}" stroke="{colour}" '
                     f'stroke-width="2"/><text x="{left + pw + 42}" y="{ly + 4}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def gpo_svg(coefficients: dict, modality: str) -> str:
    entry = coefficients[modality]
    what = "image (grid/region vectors)" if modality == "image" else "text (tokens)"
    title = f"{what}: {entry['pooling']} coefficients"
    curves = [(f"N = {n}", theta) for n, theta in zip(entry["sizes"], entry["theta"])]
    return line_plot_svg(title, curves)


# ---------------------------------------------------------------------------------------------
# Upload size limit


class BodyLimitMiddleware:
    """Answer 413 to request bodies over ``limit`` bytes without reading them into memory.

    A declared Content-Length over the limit is refused before anything is read; a body without
    one is counted as it streams, and the request is answered 413 as soon as it passes the limit.

    Args:
        app: the ASGI app to wrap.
        limit: largest body accepted, in bytes.
        message: the ``detail`` of the 413 answer.
    """

    def __init__(self, app, limit: int, message: str = "the request body is too large"):
        self.app = app
        self.limit = limit
        self.message = message

    async def _refuse(self, send) -> None:
        body = json.dumps({"detail": self.message}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        state = {"seen": 0, "over": False, "answered": False}

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > self.limit:
                    state["over"] = True
                    return {"type": "http.disconnect"}  # the app stops reading; we answer below
            return message

        async def guarded_send(message):
            if state["over"]:  # whatever the app says about the cut-off body, the answer is 413
                if not state["answered"]:
                    state["answered"] = True
                    await self._refuse(send)
                return
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["answered"]:
            state["answered"] = True
            await self._refuse(send)


# ---------------------------------------------------------------------------------------------
# The app



def present_results(gallery: Gallery, results: list[dict]) -> list[dict]:
    """Search results as the API returns them: names that are not UTF-8 as printable text (JSON and
    URLs need it; /api/thumb takes them back), a video's thumbnail and an original's file as URLs."""
    results = [{**r, "path": printable(r["path"]), **({"id": printable(r["id"])} if "id" in r else {})}
               for r in results]
    if gallery.kind == "videos":  # the thumbnail as a URL the page can load, not a file name
        results = [{**r, "thumb": "/api/thumb?path=" + urllib.parse.quote(r["path"], safe="")
                    if r.get("thumb") else None} for r in results]
    if gallery.kind == "images" or gallery.video_source == "files":  # where to open the original
        results = [{**r, "file": "/api/file?path=" + urllib.parse.quote(r["path"], safe="")} for r in results]
    return results


def accepts_image_queries(gallery: Gallery, model) -> bool:
    """Whether an uploaded image can be embedded in this gallery's space."""
    if model.config.image_encoder == "grid":
        return True
    return gallery.kind == "videos" and bool((gallery.meta.get("video") or {}).get("embedder"))


def gallery_info(gallery: Gallery, model, max_k: int, max_query_chars: int, max_upload_bytes: int) -> dict:
    """What /api/info tells the page about the index and the server's limits."""
    m = gallery.meta["model"]
    return {"kind": gallery.kind, "size": len(gallery), "engine": gallery.engine.name,
            "engine_settings": gallery.engine.describe(),
            "video_source": gallery.video_source, "image_queries": accepts_image_queries(gallery, model),
            # the checkpoint's folder name only: the page needs no paths of the serving machine
            "model": {"checkpoint": Path(m["checkpoint"]).name if m.get("checkpoint") else None,
                      "bundled": m.get("bundled") or None, "config_hash": m.get("config_hash")},
            "skipped": len(gallery.meta.get("skipped", [])), "max_k": max_k,
            "max_query_chars": max_query_chars, "max_upload_bytes": max_upload_bytes}


def thumbnail_bytes(gallery: Gallery, path: str | None, thumbs: ThumbnailMaker) -> bytes:
    """The JPEG thumbnail of a gallery item named by its result ``path`` (BadRequest if none)."""
    if gallery.kind == "captions":
        raise BadRequest("this gallery holds captions, not images", 404)
    if not path:
        raise BadRequest("give the image as ?path=… (a path from the search results)")
    if gallery.kind == "videos":
        if gallery.video_source == "features":
            raise BadRequest("this gallery's clips were indexed from frame-feature files: they have no "
                             "thumbnails", 404)
        full = gallery.thumb_file(path)
        if full is None:
            raise BadRequest(f"{path[:200]!r} is not a clip of this gallery", 404)
        try:
            return full.read_bytes()
        except OSError as exc:  # strerror: the message without the file's full path
            raise BadRequest(f"{path}: cannot read the thumbnail any more ({exc.strerror})", 410) from None
    full = gallery.file_path(path)
    if full is None:
        raise BadRequest(f"{path[:200]!r} is not an image of this gallery", 404)
    try:
        # The thumbnail `vseinf encode` stored for the file as it is now (its name hashes the
        # path, size and mtime); else (an older index, a photo changed since) one made here.
        st = full.stat()
        stored = gallery.path / image_thumb_name(path, st.st_size, st.st_mtime_ns)
        return stored.read_bytes() if stored.is_file() else thumbs.get(full)
    except ThumbnailError as exc:
        raise BadRequest(f"{path}: {exc}", 415) from None
    except OSError as exc:
        raise BadRequest(f"{path}: cannot read the image any more ({exc.strerror})", 410) from None



async def read_uploaded_image(file, max_upload_bytes: int, too_large: str):
    """The PIL image of an uploaded query photo (BadRequest: missing, too large or unreadable)."""
    if file is None:
        raise BadRequest("send an image in the multipart form field 'file'")
    data = await file.read(max_upload_bytes + 1)
    if len(data) > max_upload_bytes:
        raise BadRequest(too_large, 413)
    name = file.filename or "upload"
    try:
        return await asyncio.to_thread(load_query_image, data)
    except ValueError as exc:
        raise BadRequest(f"{name}: {exc}", 415 if "not a readable image" in str(exc) else 400) from None


def add_page_routes(app) -> None:
    """The web page, the GPO plot page and the favicon (static files)."""
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/gpo", include_in_schema=False)
    def gpo_page():
        return FileResponse(STATIC_DIR / "gpo.html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")


def add_gpo_routes(app, model) -> None:
    """/api/gpo (the model's learned pooling coefficients as JSON) and /api/gpo.svg (their plot),
    computed on the first request."""
    coefficients: dict = {}

    def get_coefficients() -> dict:
        if not coefficients:
            coefficients.update(gpo_coefficients(model))
        return coefficients

    @app.get("/api/gpo")
    def gpo_json():
        return get_coefficients()

    @app.get("/api/gpo.svg")
    def gpo_plot(modality: str = "image"):
        if modality not in ("image", "text"):
            raise BadRequest(f"modality must be 'image' or 'text', got {modality[:40]!r}")
        return Response(gpo_svg(get_coefficients(), modality), media_type="image/svg+xml")


def create_app(index_dir: str | Path | None = None, *, gallery: Gallery | None = None, model=None,
               model_path: str | Path | None = None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               max_query_chars: int = MAX_QUERY_CHARS, max_k: int = MAX_K, device: str = "cpu",
               host: str = "127.0.0.1", allow_hosts: Sequence[str] = (), api_docs: bool = False,
               max_thumb_decodes: int = 2):
    """The FastAPI app serving one index.

    Args:
        index_dir: the index directory (or pass ``gallery``).
        gallery: an already loaded :class:`vseinf.search.gallery.Gallery`.
        model: the loaded model (default: the one that built the index, or ``model_path``).
        model_path: checkpoint directory to load instead of the index's own.
        max_upload_bytes: largest accepted image upload.
        max_query_chars: longest accepted text query.
        max_k: most results per request.
        device: where the model and the exact engine run (``"cpu"``, ``"cuda"``…) when this
            function loads them.
        host: the address the server listens on; requests are answered only when their Host
            header names it or this machine (see :class:`vseinf.serve.security.HostPolicy`).
        allow_hosts: more host names to answer (``"*"``: any).
        api_docs: serve the OpenAPI schema at ``/openapi.json`` and its page at ``/docs``.
        max_thumb_decodes: photos decoded at once for thumbnails the index does not store (each
            may take its full size in memory while it decodes, e.g. a PNG).
    """
    policy = HostPolicy(host, allow_hosts)  # before loading anything: a bad --allow-host fails fast
    if gallery is None:
        if index_dir is None:
            raise ValueError("create_app: pass index_dir or gallery")
        gallery = Gallery.load(index_dir, device=device)
    if model is None:
        model = gallery.load_model(model_path, device=device)
    else:
        check_model(gallery, model)
    worker = QueryWorker(model, gallery)
    # Thumbnails the index does not hold: at most max_thumb_decodes photos decoded at a time.
    thumbs = ThumbnailMaker(THUMB_SIZE, max_decodes=max_thumb_decodes)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()

    # The API docs are off unless asked for: the schema describes every route to whoever asks, and
    # the docs page loads its scripts from a CDN.
    app = FastAPI(title="vseinf", description="VSE∞ image/video–text search", lifespan=lifespan,
                  openapi_url="/openapi.json" if api_docs else None, docs_url="/docs" if api_docs else None,
                  redoc_url=None)
    app.state.gallery = gallery
    app.state.model = model
    app.state.worker = worker
    too_large = f"the upload is too large (at most {max_upload_bytes:,} bytes)"
    app.add_middleware(BodyLimitMiddleware, limit=max_upload_bytes + (64 << 10), message=too_large)  # + framing
    # Added last, so outermost: a request for another host is refused before anything reads it.
    app.add_middleware(SecurityMiddleware, policy=policy, docs_path="/docs" if api_docs else None)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    add_page_routes(app)
    add_gpo_routes(app, model)

    @app.get("/api/info")
    def info():
        # the index now served (reloaded when `vseinf encode` replaces it)
        return gallery_info(worker.gallery, model, max_k, max_query_chars, max_upload_bytes)

    async def answer(future) -> dict:
        try:
            results = await asyncio.wrap_future(future)
        except IndexFormatError as exc:  # the index on disk is damaged: the server itself is fine
            raise BadRequest(f"the index cannot be searched now: {exc}", 503) from None
        except ValueError as exc:  # e.g. an image the model cannot take
            raise BadRequest(str(exc)) from None
        return {"results": present_results(worker.gallery, results)}

    @app.get("/api/search")
    async def search_text(q: str | None = None, k: str | None = None):
        query = parse_query(q, max_query_chars)
        return await answer(worker.submit_text(query, parse_k(k, max_k)))

    @app.post("/api/search/image")
    async def search_image(file: UploadFile | None = File(None), k: str | None = Form(None),
                           k_query: str | None = Query(None, alias="k")):
        n = parse_k(k if k is not None else k_query, max_k)
        image = await read_uploaded_image(file, max_upload_bytes, too_large)
        return await answer(worker.submit_image(image, n))

    add_file_routes(app, worker, gallery, thumbs)
    return app


def add_file_routes(app, worker: QueryWorker, gallery: Gallery, thumbs: ThumbnailMaker) -> None:
    """``/api/thumb`` (a result's thumbnail) and ``/api/file`` (the indexed file itself)."""

    @app.get("/api/thumb")
    def thumb(path: str | None = None):
        data = thumbnail_bytes(worker.gallery, path, thumbs)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/file")
    def original(path: str | None = None):
        if not path:
            raise BadRequest("give the file as ?path=… (a path from the search results)")
        full = gallery.file_path(path)
        if full is None:
            raise BadRequest(f"{path[:200]!r} is not a file of this gallery", 404)
        # Only indexed images and video files get here; nosniff keeps browsers to the declared type.
        return FileResponse(full, headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=3600"})


@contextlib.contextmanager
def background_server(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0):
    """Run ``app`` with uvicorn on a thread; yields its base URL (port 0 = any free port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(app, log_level="warning", backlog=2048, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
