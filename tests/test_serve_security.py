"""The server keeps a photo index private: Host-header check against DNS rebinding, security headers,
no API docs unless asked for, no paths of the serving machine in /api/info."""

import html.parser
import http.client
import json
import shutil
import urllib.parse

import pytest

pytest.importorskip("fastapi")
skimage = pytest.importorskip("skimage")
try:
    from fastapi.testclient import TestClient
except (ImportError, RuntimeError) as exc:  # Starlette raises RuntimeError without httpx
    pytest.skip(f"FastAPI's TestClient is unavailable ({exc})", allow_module_level=True)

from test_index import run_cli, save_tiny  # noqa: E402
from test_serve import PHOTOS, SAMPLES, tiny_model  # noqa: E402

import vseinf  # noqa: E402
from vseinf.cli.serve import add_serve_parser, run_serve  # noqa: E402
from vseinf.search.build import encode_gallery  # noqa: E402
from vseinf.search.gallery import Gallery  # noqa: E402
from vseinf.serve.app import STATIC_DIR, background_server, create_app  # noqa: E402
from vseinf.serve.security import HostPolicy, host_name  # noqa: E402


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """A small image index built by a model loaded from a checkpoint folder (an absolute path)."""
    base = tmp_path_factory.mktemp("private")
    root = base / "photos"
    root.mkdir()
    for name in PHOTOS[:3]:
        shutil.copy2(SAMPLES / name, root / name)
    model = vseinf.load_model(save_tiny(tiny_model(), base / "my-checkpoint"))
    encode_gallery(root, base / "index", model, progress=False)
    return Gallery.load(base / "index"), model, base


def client(index, base_url="http://localhost", **kwargs):
    gallery, model, _ = index
    return TestClient(create_app(gallery=gallery, model=model, **kwargs), base_url=base_url)


# ---------------------------------------------------------------------------------------------
# The Host header


@pytest.mark.parametrize("header, name", [
    ("localhost:8000", "localhost"), ("LocalHost", "localhost"), ("[::1]:8000", "::1"), ("[::1]", "::1"),
    ("127.0.0.1:80", "127.0.0.1"), ("example.com.", "example.com"), ("", None), (None, None),
    ("a b", None), ("host:port", None), ("[::1", None), ("[::1]x", None), ("user@evil.example", None),
])
def test_host_name_of_a_header(header, name):
    assert host_name(header) == name


def test_default_policy_answers_this_machine_only():
    policy = HostPolicy("127.0.0.1")
    for ok in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST.", "photos.localhost:8000"):
        assert policy.allows(ok), ok
    for bad in ("evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io",
                "192.168.1.20:8000", "", None):
        assert not policy.allows(bad), bad


def test_policy_of_a_named_or_wildcard_bind_and_allow_host():
    assert HostPolicy("192.168.1.20").allows("192.168.1.20:8000")
    assert not HostPolicy("192.168.1.20").allows("10.0.0.1")
    everywhere = HostPolicy("0.0.0.0")
    assert everywhere.allows("192.168.1.20:8000") and everywhere.allows("[fe80::1]:8000")
    assert not everywhere.allows("evil.example")  # a name (which DNS could rebind) must be allowed
    named = HostPolicy("0.0.0.0", ["photos.example", ".lan"])
    assert named.allows("photos.example:8000") and named.allows("nas.lan") and not named.allows("lan.evil")
    assert HostPolicy("127.0.0.1", ["*"]).allows("anything.example")
    with pytest.raises(ValueError, match="--allow-host: 'a/b' is not a host name"):
        HostPolicy("127.0.0.1", ["a/b"])


@pytest.mark.parametrize("url", ["/api/search?q=dog", "/", "/api/info", "/api/thumb?path=" + PHOTOS[0],
                                 "/static/app.js", "/api/gpo"])
def test_requests_for_another_host_are_refused(index, url):
    with client(index, "http://evil.example:8000") as c:
        r = c.get(url)
        assert r.status_code == 400
        detail = r.json()["detail"]
        assert "'evil.example:8000' is not served here" in detail and "--allow-host" in detail
        assert r.headers["x-content-type-options"] == "nosniff"
    with client(index, "http://localhost:8000") as c:
        assert c.get(url).status_code == 200


def test_allow_host_adds_a_name(index):
    with client(index, "http://photos.example", allow_hosts=["photos.example"]) as c:
        assert c.get("/api/search", params={"q": "a cat"}).status_code == 200
    with client(index, "http://evil.example", allow_hosts=["photos.example"]) as c:
        assert c.get("/api/search", params={"q": "a cat"}).status_code == 400


def test_rebinding_over_a_real_socket_is_refused(index):
    """The issue's reproduction: curl -H 'Host: evil.example' 127.0.0.1:PORT/api/search?q=dog → 200."""
    gallery, model, _ = index
    with background_server(create_app(gallery=gallery, model=model)) as base:
        url = urllib.parse.urlsplit(base)

        def get(host):
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
            try:
                conn.request("GET", "/api/search?q=dog", headers={"Host": host})
                response = conn.getresponse()
                return response.status, json.loads(response.read())
            finally:
                conn.close()

        status, body = get("evil.example")
        assert status == 400 and "evil.example" in body["detail"]
        status, body = get(f"127.0.0.1:{url.port}")
        assert status == 200 and len(body["results"]) == len(PHOTOS[:3])


# ---------------------------------------------------------------------------------------------
# Headers, docs, info


def test_every_answer_carries_the_security_headers(index):
    with client(index) as c:
        for url, status in [("/", 200), ("/gpo", 200), ("/api/search?q=dog", 200), ("/api/search?q=", 400),
                            ("/api/thumb?path=" + PHOTOS[0], 200), ("/api/gpo.svg", 200), ("/nothing", 404)]:
            r = c.get(url)
            assert r.status_code == status, url
            assert r.headers["x-content-type-options"] == "nosniff", url
            assert r.headers["x-frame-options"] == "DENY", url
            csp = r.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp, url
            assert "script-src 'self';" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp, url
            assert "object-src 'none'" in csp and "base-uri 'none'" in csp, url


def test_api_docs_are_off_unless_asked_for(index):
    with client(index) as c:
        assert c.get("/docs").status_code == 404
        assert c.get("/openapi.json").status_code == 404
        assert c.get("/redoc").status_code == 404
    with client(index, api_docs=True) as c:
        assert "/api/search" in c.get("/openapi.json").json()["paths"]
        docs = c.get("/docs")
        assert docs.status_code == 200 and "cdn.jsdelivr.net" in docs.headers["content-security-policy"]
        assert "cdn.jsdelivr.net" not in c.get("/").headers["content-security-policy"]  # only the docs page


def test_info_reveals_no_paths_of_the_serving_machine(index):
    _, _, base = index
    with client(index) as c:
        info = c.get("/api/info")
    assert info.status_code == 200
    assert str(base) not in info.text and "/tmp" not in info.text

    def strings(value):
        if isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)
        elif isinstance(value, str):
            yield value

    assert not [s for s in strings(info.json()) if s.startswith("/") or "\\" in s]
    assert info.json()["model"]["checkpoint"] == "my-checkpoint"  # its name says which model it is


class _InlineFinder(html.parser.HTMLParser):
    """Collects what a strict CSP would block in a page: inline scripts, styles and handlers."""

    def __init__(self):
        super().__init__()
        self.found = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script" and not attrs.get("src"):
            self.found.append("an inline <script>")
        if tag == "style":
            self.found.append("a <style> element")
        for name, value in attrs.items():
            if name == "style" or name.startswith("on"):
                self.found.append(f"a {name}= attribute on <{tag}>")
            if value and value.strip().lower().startswith("javascript:"):
                self.found.append(f"a javascript: URL on <{tag}>")


@pytest.mark.parametrize("page", sorted(p.name for p in STATIC_DIR.glob("*.html")))
def test_pages_work_under_the_content_security_policy(page):
    finder = _InlineFinder()
    finder.feed((STATIC_DIR / page).read_text())
    assert not finder.found, f"{page}: {finder.found} (move it into app.js / style.css)"


def test_serve_command_passes_the_host_policy_and_docs_flag(index, monkeypatch):
    import uvicorn

    gallery, _, _ = index
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    with pytest.raises(ValueError, match="--allow-host"):
        run_cli(add_serve_parser, run_serve, ["serve", str(gallery.path), "--allow-host", "bad/name"])
    assert not started
    assert run_cli(add_serve_parser, run_serve, ["serve", str(gallery.path), "--host", "0.0.0.0",
                                                 "--allow-host", "photos.example", "--api-docs"]) == 0
    assert started["host"] == "0.0.0.0"
    with TestClient(started["app"], base_url="http://photos.example") as c:
        assert c.get("/api/info").status_code == 200 and c.get("/openapi.json").status_code == 200
    with TestClient(started["app"], base_url="http://10.1.2.3:8000") as c:
        assert c.get("/api/info").status_code == 200
    with TestClient(started["app"], base_url="http://evil.example") as c:
        assert c.get("/api/info").status_code == 400
