"""The web app: JSON API answers and error messages (TestClient), batched queries equal single ones,
the GPO plot data, a bounded loopback load test, and an end-to-end run in a real browser."""

import concurrent.futures
import io
import json
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
skimage = pytest.importorskip("skimage")
try:
    from fastapi.testclient import TestClient
except (ImportError, RuntimeError) as exc:  # Starlette raises RuntimeError without httpx2/httpx
    pytest.skip(f"FastAPI's TestClient is unavailable ({exc})", allow_module_level=True)

from PIL import Image  # noqa: E402

from vseinf.search.build import encode_gallery, encode_texts_np  # noqa: E402
from vseinf.search.gallery import Gallery  # noqa: E402
from vseinf.serve.app import (  # noqa: E402
    BadRequest,
    QueryWorker,
    background_server,
    create_app,
    gpo_coefficients,
    parse_k,
    parse_query,
)

SAMPLES = Path(skimage.__file__).resolve().parent / "data"
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png"]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def tiny_model():
    """A real VSE∞ model, shrunk: ImageNet MobileNetV2 at 64 px, random heads, BiGRU text, 32-d space."""
    from vseinf.config import ModelConfig
    from vseinf.encoders.text import Vocabulary
    from vseinf.model import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(image_size=64, text_encoder="bigru", word_dim=32, embed_dim=32)
    words = "a an the dog cat runs on beach cup of coffee rocket motorcycle man camera astronaut red".split()
    return build_model(cfg, vocab=Vocabulary.build([" ".join(words)], min_count=1)).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def served(tmp_path_factory, model):
    """An image gallery of scikit-image photos (plus one unreadable file), its index and a client."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    for i, name in enumerate(PHOTOS):
        shutil.copy2(SAMPLES / name, (root / "sub" if i % 2 else root) / name)
    (root / "broken.jpg").write_bytes(b"\x00" * 100)
    (root.parent / "secret.txt").write_text("not for the web")
    index_dir = root.parent / "index"
    encode_gallery(root, index_dir, model, progress=False)
    gallery = Gallery.load(index_dir)
    app = create_app(gallery=gallery, model=model)
    with TestClient(app, base_url="http://localhost") as client:
        yield client, gallery, root


def png_bytes(path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Input rules


def test_parse_query_and_k():
    assert parse_query("  a dog ") == "a dog"
    assert parse_k(None) == 12 and parse_k("5") == 5
    for bad in ["", "   ", None, "x" * 10_240]:
        with pytest.raises(BadRequest):
            parse_query(bad)
    for bad in ["0", "-3", "abc", "2.5", "101", "1e3"]:
        with pytest.raises(BadRequest, match="k must be"):
            parse_k(bad)


# ---------------------------------------------------------------------------------------------
# The JSON API


def test_text_search_matches_the_index(served, model):
    client, gallery, _ = served
    r = client.get("/api/search", params={"q": "a red motorcycle", "k": 4})
    assert r.status_code == 200
    results = r.json()["results"]
    expected = gallery.search(encode_texts_np(model, ["a red motorcycle"]), 4)[0]
    assert [x["path"] for x in results] == [x["path"] for x in expected]
    np.testing.assert_allclose([x["score"] for x in results], [x["score"] for x in expected], atol=1e-5)
    assert len(results) == 4 and set(results[0]) == {"path", "file", "score"}
    # k above the gallery size: every image once
    r = client.get("/api/search", params={"q": "a cat", "k": 100})
    assert sorted(x["path"] for x in r.json()["results"]) == sorted(it["path"] for it in gallery.items)


def test_image_upload_finds_the_same_photo(served):
    client, gallery, root = served
    r = client.post("/api/search/image", files={"file": ("photo.png", png_bytes(SAMPLES / "coffee.png"), "image/png")},
                    data={"k": "3"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3 and results[0]["path"] == "coffee.png" and results[0]["score"] > 0.999
    r = client.post("/api/search/image?k=2", files={"file": ("c.jpg", (SAMPLES / "rocket.jpg").read_bytes())})
    assert [x["path"] for x in r.json()["results"]][:1] == ["sub/rocket.jpg"]


BAD_REQUESTS = [
    ("get", "/api/search", {"params": {"q": ""}}, 400, "empty"),
    ("get", "/api/search", {"params": {"q": "   "}}, 400, "empty"),
    ("get", "/api/search", {}, 400, "empty"),
    ("get", "/api/search", {"params": {"q": "dog " * 2560}}, 413, "too long"),
    ("get", "/api/search", {"params": {"q": "dog", "k": "ten"}}, 400, "positive integer"),
    ("get", "/api/search", {"params": {"q": "dog", "k": "0"}}, 400, "positive integer"),
    ("get", "/api/search", {"params": {"q": "dog", "k": "-1"}}, 400, "positive integer"),
    ("get", "/api/search", {"params": {"q": "dog", "k": "1000"}}, 400, "at most"),
    ("post", "/api/search/image", {"files": {"file": ("notes.txt", b"hello, not an image", "text/plain")}},
     415, "not a readable image"),
    ("post", "/api/search/image", {"files": {"file": ("empty.png", b"", "image/png")}}, 400, "empty"),
    ("post", "/api/search/image", {"data": {"k": "3"}}, 400, "field 'file'"),
    ("post", "/api/search/image", {"files": {"file": ("a.jpg", b"x")}, "data": {"k": "no"}}, 400, "positive integer"),
    ("get", "/api/thumb", {"params": {"path": "../secret.txt"}}, 404, "not an image of this gallery"),
    ("get", "/api/thumb", {"params": {"path": "/etc/passwd"}}, 404, "not an image of this gallery"),
    ("get", "/api/thumb", {"params": {"path": "broken.jpg"}}, 404, "not an image of this gallery"),
    ("get", "/api/thumb", {"params": {"path": "sub/../../secret.txt"}}, 404, "not an image of this gallery"),
    ("get", "/api/thumb", {}, 400, "path="),
    ("get", "/api/gpo.svg", {"params": {"modality": "audio"}}, 400, "modality"),
]


@pytest.mark.parametrize("method,url,kwargs,status,message", BAD_REQUESTS,
                         ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(served, method, url, kwargs, status, message):
    client, _, _ = served
    r = getattr(client, method)(url, **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert client.get("/api/search", params={"q": "a cat", "k": 1}).status_code == 200


def test_upload_size_limit(served, model):
    _, gallery, _ = served
    app = create_app(gallery=gallery, model=model, max_upload_bytes=20_000)
    with TestClient(app, base_url="http://localhost") as client:
        big = (SAMPLES / "coffee.png").read_bytes()  # ~470 KB
        r = client.post("/api/search/image", files={"file": ("coffee.png", big, "image/png")})
        assert r.status_code == 413 and "too large" in r.json()["detail"]
        # just over the limit, inside the multipart framing allowance: refused by the endpoint
        r = client.post("/api/search/image", files={"file": ("x.png", b"\x89PNG" + b"0" * 20_000, "image/png")})
        assert r.status_code == 413 and "20,000 bytes" in r.json()["detail"]
        small = io.BytesIO()
        Image.open(SAMPLES / "coffee.png").convert("RGB").resize((64, 48)).save(small, "JPEG")
        r = client.post("/api/search/image", files={"file": ("small.jpg", small.getvalue(), "image/jpeg")})
        assert r.status_code == 200 and r.json()["results"][0]["path"] == "coffee.png"


def test_thumbnails(served):
    client, gallery, _ = served
    for item in gallery.items:
        r = client.get("/api/thumb", params={"path": item["path"]})
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        im = Image.open(io.BytesIO(r.content))
        assert max(im.size) <= 256 and im.format == "JPEG"


def test_pages_and_info(served):
    client, gallery, _ = served
    page = client.get("/")
    assert page.status_code == 200 and 'id="q"' in page.text and "/static/app.js" in page.text
    assert "https://" not in page.text and "http://" not in page.text  # nothing from a CDN
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/gpo").status_code == 200
    info = client.get("/api/info").json()
    assert info["kind"] == "images" and info["size"] == len(gallery) == len(PHOTOS) and info["skipped"] == 1
    assert client.get("/docs").status_code == 404  # its page would load scripts from a CDN


def test_gpo_coefficients(served, model):
    client, _, _ = served
    data = client.get("/api/gpo").json()
    assert data == json.loads(json.dumps(gpo_coefficients(model)))
    for modality, pool in (("image", model.image_head.gpool), ("text", model.text.gpool)):
        entry = data[modality]
        assert entry["pooling"] == "GPO" and len(entry["sizes"]) >= 3
        for n, theta in zip(entry["sizes"], entry["theta"]):
            assert len(theta) == n and abs(sum(theta) - 1) < 1e-4
            direct = pool.coefficients(torch.tensor([n]))[0].detach().numpy()
            np.testing.assert_allclose(theta, direct, atol=1e-5)
        svg = client.get("/api/gpo.svg", params={"modality": modality})
        assert svg.headers["content-type"].startswith("image/svg+xml")
        assert svg.text.count('class="curve"') == len(entry["sizes"])


def test_captions_gallery_answers_image_uploads_with_captions(tmp_path, model):
    caps = tmp_path / "caps.txt"
    caps.write_text("img1.jpg#0\ta cat on a sofa\nimg2.jpg#0\ta red motorcycle\nimg3.jpg#0\ta cup of coffee\n")
    encode_gallery(caps, tmp_path / "index", model, progress=False)
    app = create_app(tmp_path / "index", model=model)
    with TestClient(app, base_url="http://localhost") as client:
        r = client.post("/api/search/image", files={"file": ("c.png", png_bytes(SAMPLES / "chelsea.png"))})
        results = r.json()["results"]
        assert r.status_code == 200 and len(results) == 3 and {"caption", "path", "score"} <= set(results[0])
        r = client.get("/api/search", params={"q": "a cup of coffee", "k": 1})
        assert r.json()["results"][0]["caption"] == "a cup of coffee"
        assert client.get("/api/thumb", params={"path": "img1.jpg"}).status_code == 404


def test_batched_queries_equal_single_queries(served, model):
    _, gallery, _ = served
    worker = QueryWorker(model, gallery, max_batch=64)
    try:
        queries = [f"a {w} on the beach" for w in ["dog", "cat", "man", "rocket", "red cup", "camera"]] * 4
        futures = [worker.submit_text(q, 3) for q in queries]  # queued together: embedded in few batches
        batched = [f.result(timeout=60) for f in futures]
    finally:
        worker.close()
    for q, got in zip(queries, batched):
        alone = gallery.search(encode_texts_np(model, [q]), 3)[0]
        assert [r["path"] for r in got] == [r["path"] for r in alone]
        np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in alone], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Over a real socket: load and a browser


def fetch(url: str):
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=120) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    return status, time.perf_counter() - t0, body


def test_concurrent_text_queries_over_loopback(served, model):
    _, gallery, _ = served
    app = create_app(gallery=gallery, model=model)
    words = ["dog", "cat", "beach", "coffee", "rocket", "motorcycle", "camera", "man", "astronaut", "red"]
    with background_server(app) as base:
        urls = [f"{base}/api/search?" + urllib.parse.urlencode({"q": f"a {words[i % 10]} {words[i * 7 % 10]}", "k": 5})
                for i in range(60)]
        with concurrent.futures.ThreadPoolExecutor(60) as pool:
            answers = list(pool.map(fetch, urls))
        assert fetch(f"{base}/api/search?q=")[0] == 400
        assert fetch(urls[0])[0] == 200
    statuses = [s for s, _, _ in answers]
    assert statuses == [200] * len(urls)
    assert all(len(json.loads(b)["results"]) == 5 for _, _, b in answers)
    latency = np.array([t for _, t, _ in answers]) * 1000
    print(f"60 concurrent queries: p50 {np.percentile(latency, 50):.0f} ms, p99 {np.percentile(latency, 99):.0f} ms")


def browser_or_skip():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    return sync_api


LONG_NAME = "a_very_long_file_name_of_a_photo_from_the_holidays_2023-07-14_beach_sunset.png"


def test_search_page_in_a_real_browser(served, model, tmp_path):
    sync_api = browser_or_skip()
    _, _, root = served
    # the test gallery, plus a photo whose long name must not wrap on the page
    photos = tmp_path / "photos"
    shutil.copytree(root, photos)
    shutil.copy2(SAMPLES / "coffee.png", photos / LONG_NAME)
    encode_gallery(photos, tmp_path / "index", model, progress=False)
    gallery = Gallery.load(tmp_path / "index")
    upload = tmp_path / "query.png"
    Image.open(SAMPLES / "chelsea.png").save(upload)
    app = create_app(gallery=gallery, model=model)
    results_with = "() => document.querySelectorAll('#results .result img').length === {}"
    with background_server(app) as base, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 800})
            # (the waits below are functions, not expressions: Playwright evaluates an expression
            # with eval(), which the page's CSP rightly refuses)
            refused = []  # the Content-Security-Policy must let the page do all that follows
            page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
            # a bookmarked search: the query comes from the URL
            page.goto(base + "/?" + urllib.parse.urlencode({"q": "a red motorcycle", "k": 4}))
            page.wait_for_function("() => document.getElementById('info').textContent.includes('images')")
            page.wait_for_function(results_with.format(4))
            page.wait_for_function("() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
            assert page.input_value("#q") == "a red motorcycle" and page.input_value("#k") == "4"
            scores = [float(s) for s in page.locator("#results .score").all_text_contents()]
            assert scores == sorted(scores, reverse=True)
            assert "4 results" in page.text_content("#status")
            first = page.text_content("#results .name")

            # each thumbnail links to its original photo, which the server hands out unchanged
            link = page.locator("#results .result a").first
            name = page.locator("#results .result img").first.get_attribute("alt")
            assert link.get_attribute("href") == "/api/file?path=" + urllib.parse.quote(name, safe="")
            assert link.get_attribute("target") == "_blank"
            size = page.evaluate("async (u) => (await (await fetch(u)).arrayBuffer()).byteLength",
                                 link.get_attribute("href"))
            assert size == (photos / name).stat().st_size

            # a typed search goes into the URL; Back returns to the previous one
            page.fill("#k", "12")
            page.fill("#q", "a cup of coffee")
            page.press("#q", "Enter")
            page.wait_for_function("() => document.getElementById('status').textContent.includes('coffee')")
            assert urllib.parse.parse_qs(urllib.parse.urlparse(page.url).query) == {"q": ["a cup of coffee"],
                                                                                    "k": ["12"]}
            # file names stay on one line (cut with an ellipsis), the long one included
            page.wait_for_function(results_with.format(len(gallery)))
            names = page.evaluate("""() => [...document.querySelectorAll('#results .name')].map(e => ({
                text: e.textContent, lines: e.getClientRects().length, height: e.getBoundingClientRect().height,
                font: parseFloat(getComputedStyle(e).fontSize), cut: e.scrollWidth > e.clientWidth}))""")
            assert LONG_NAME in [n["text"] for n in names]
            assert all(n["lines"] == 1 and n["height"] < 2 * n["font"] for n in names), names
            assert [n["cut"] for n in names if n["text"] == LONG_NAME] == [True]
            page.go_back()
            page.wait_for_function("() => document.getElementById('q').value === 'a red motorcycle'")
            page.wait_for_function(results_with.format(4))
            assert page.text_content("#results .name") == first

            # an uploaded photo is the query: the words leave the box and the URL
            page.set_input_files("#file", str(upload))
            page.wait_for_function("() => document.getElementById('status').textContent.includes('query.png')")
            first = page.locator("#results .result img").first.get_attribute("alt")
            assert first == "sub/chelsea.png"
            assert page.input_value("#q") == "" and "q=" not in page.url

            # an empty query gets a hint, not the API's error
            page.fill("#q", "  ")
            page.press("#q", "Enter")
            page.wait_for_function("() => document.getElementById('status').textContent.includes('Type a few words')")
            status = page.text_content("#status")
            assert "Error" not in status and "?q=" not in status
            assert page.evaluate("() => document.getElementById('status').className") != "error"

            # a favicon, on both pages
            assert page.evaluate("() => document.querySelector('link[rel=icon]').getAttribute('href')") == \
                "/static/favicon.svg"
            assert page.evaluate("() => fetch('/favicon.ico').then(r => r.status)") == 200

            # the GPO page keeps the gallery line and draws both plots
            page.goto(base + "/gpo")
            page.wait_for_function("() => document.getElementById('info').textContent.includes('images')")
            assert page.text_content("#info").startswith(f"{len(gallery)} images")
            page.wait_for_function("() => [...document.images].length === 2 && "
                                   "[...document.images].every(i => i.complete && i.naturalWidth > 0)")
            assert page.evaluate("() => document.querySelector('link[rel=icon]') !== null")
            assert not refused
        finally:
            browser.close()


def test_original_files_are_served_only_for_the_gallery(served):
    client, gallery, root = served
    results = client.get("/api/search", params={"q": "a red motorcycle", "k": 100}).json()["results"]
    assert len(results) == len(gallery)
    for r in results:  # the path as the index has it (as `vseinf search --json`), the original's URL
        assert not Path(r["path"]).is_absolute()
        assert r["file"] == "/api/file?path=" + urllib.parse.quote(r["path"], safe="")
        answer = client.get(r["file"])
        assert answer.status_code == 200 and answer.content == (root / r["path"]).read_bytes()
        assert answer.headers["content-type"].startswith("image/")
        assert answer.headers["x-content-type-options"] == "nosniff"
    for path in ["broken.jpg", "../secret.txt", str(root.parent / "secret.txt"), "sub/../../secret.txt",
                 "nothing.png", ""]:
        r = client.get("/api/file", params={"path": path})
        assert r.status_code in (400, 404) and "secret" not in r.text.replace(path, ""), path


def test_favicon_and_the_gpo_axis_label(served):
    client, _, _ = served
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    svg = client.get("/api/gpo.svg", params={"modality": "image"}).text
    assert "θ_k" not in svg and 'θ<tspan baseline-shift="sub" font-size="75%">k</tspan>' in svg
    page = client.get("/gpo").text
    assert 'id="info"' in page and "/static/common.js" in page


def test_serve_command_tunes_the_engine_and_checks_settings_before_loading_the_model(served, tmp_path,
                                                                                      monkeypatch, model):
    import uvicorn
    from test_index import run_cli, save_tiny

    from vseinf.cli.serve import add_serve_parser, run_serve

    _, gallery, _ = served
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    with pytest.raises(ValueError, match="--nprobe applies to the ivfpq engine; this index searches with exact"):
        run_cli(add_serve_parser, run_serve, ["serve", str(gallery.path), "--nprobe", "8", "--model", "/nonexistent"])
    assert not started
    import vseinf

    pytest.importorskip("faiss")
    _, _, root = served
    ckpt = save_tiny(model, tmp_path / "ckpt")
    encode_gallery(root, tmp_path / "index", vseinf.load_model(ckpt), engine="hnsw", progress=False)
    assert run_cli(add_serve_parser, run_serve, ["serve", str(tmp_path / "index"), "--ef-search", "200",
                                                 "--port", "8123"]) == 0
    engine = started["app"].state.gallery.engine
    assert started["port"] == 8123 and (engine.name, engine.ef_search) == ("hnsw", 200)
    # the page's info shows the setting in force
    with TestClient(started["app"], base_url="http://localhost") as client:
        assert client.get("/api/info").json()["engine_settings"]["ef_search"] == 200
