"""A local stand-in for the Hugging Face Hub's HTTP API (model info + file resolve), on 127.0.0.1.

It serves files from a folder exactly as the Hub does for `huggingface_hub` (ETag, X-Repo-Commit,
Content-Length headers), so ember's real download path (model_info, hf_hub_download into the cache
layout) runs end to end in tests without network access. It records every requested path.
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, Path]):
        self.repos = repos  # "org/name" -> folder whose files are the repo's files
        self.requests: list[str] = []
        self.commit = COMMIT  # the revision's commit the Hub reports (a test may move it to publish a new one)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body=b"", headers=None, head=False):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _route(self, head):
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"]:
                    repo = "/".join(parts[2:4])
                    if repo not in hub.repos:
                        return self._send(404, b'{"error":"Repository not found"}',
                                          {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"}, head)
                    root = hub.repos[repo]
                    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
                    if len(parts) > 4 and parts[4] == "tree":  # list_repo_tree (snapshot_download lists the files)
                        tree = [{"type": "file", "path": f, "size": (root / f).stat().st_size,
                                 "oid": hashlib.sha1((root / f).read_bytes()).hexdigest()} for f in files]
                        return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, head)
                    body = json.dumps({"id": repo, "modelId": repo, "sha": hub.commit,
                                       "siblings": [{"rfilename": f} for f in files]}).encode()
                    return self._send(200, body, {"Content-Type": "application/json"}, head)
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, name = "/".join(parts[:2]), "/".join(parts[4:])
                    f = hub.repos.get(repo, Path("/nonexistent")) / name
                    if not f.is_file():
                        return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
                    data = f.read_bytes()
                    etag = '"' + hashlib.sha256(data).hexdigest() + '"'
                    return self._send(200, data, {"ETag": etag, "X-Repo-Commit": hub.commit,
                                                  "Content-Type": "application/octet-stream"}, head)
                return self._send(404, b"")

            def do_GET(self):
                self._route(False)

            def do_HEAD(self):
                self._route(True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *a):
        self.server.shutdown()
        self.server.server_close()
