"""API keys: `ember serve --api-key KEY` (or $EMBER_API_KEY) makes the model endpoints require
`Authorization: Bearer KEY`, as OpenAI's API does; a request without it gets OpenAI's 401.

/health, /metrics and the API docs (/docs, /openapi.json) stay open, as in vLLM (a load balancer's
probe and a Prometheus scraper need no key); CORS preflight (OPTIONS) requests pass too.
"""
from __future__ import annotations

import hmac
import json

PROTECTED = ("/v1/", "/tokenize", "/detokenize")


def protected(path: str) -> bool:
    return path.startswith(PROTECTED) or path == "/v1"


class ApiKeyMiddleware:
    """ASGI middleware: 401 on a protected path unless the request carries one of `keys` as its bearer token."""

    def __init__(self, app, keys):
        self.app = app
        self.keys = [k.encode() for k in keys if k]
        if not self.keys:
            raise ValueError("ApiKeyMiddleware needs at least one non-empty key")

    def _ok(self, scope) -> bool:
        auth = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                auth = value
                break
        scheme, _, token = auth.partition(b" ")
        token = token.strip()
        # compare_digest with every key (constant time per key): no early exit that times the match
        good = False
        for k in self.keys:
            good |= hmac.compare_digest(token, k)
        return scheme.lower() == b"bearer" and good

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or not protected(scope.get("path", "")) \
                or self._ok(scope):
            return await self.app(scope, receive, send)
        info = scope.setdefault("state", {}).get("ember_log")
        if info is not None:
            info["error"] = "invalid_api_key"
        body = json.dumps({"error": {
            "message": "Incorrect API key provided. Send it as 'Authorization: Bearer <key>' (the key the server "
                       "was started with: --api-key or EMBER_API_KEY).",
            "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
