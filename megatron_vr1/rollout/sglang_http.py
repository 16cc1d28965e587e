"""Blocking JSON calls to an SGLang server's control endpoints (health, flush, weight updates, pause).

Generation goes through aiohttp in ``sglang_engine``; control calls are rare and sequential, so the standard
library is enough and keeps ``weight_sync`` free of an event loop. Every call has a timeout.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

MAX_RESPONSE_BYTES = 64 << 20
"""Control responses are small; a larger one is a bug or a wrong URL, so refuse to buffer it."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where an SGLang server (or an sglang-router in front of several) answers."""

    url: str
    """e.g. http://127.0.0.1:30000 (no trailing slash needed)."""
    api_key: str = ""

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def route(self, path: str) -> str:
        return self.url.rstrip("/") + "/" + path.lstrip("/")


class SGLangHTTPError(RuntimeError):
    """An SGLang endpoint answered with an error, or did not answer in time."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        """True for connection errors, timeouts and 5xx: the server may be dead and worth restarting."""


def call(endpoint: Endpoint, path: str, payload: dict[str, Any] | None = None, *, method: str = "POST",
         timeout: float = 60.0) -> Any:
    """Send one request; return the decoded JSON body (or the text when the body is not JSON).

    Raises SGLangHTTPError naming the URL, the status and the server's message. SGLang reports a failed update
    as 200/400 with ``{"success": false, "message": ...}``; that is turned into an error too.
    """
    url = endpoint.route(path)
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=endpoint.headers())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as e:
        detail = e.read(4096).decode(errors="replace")
        raise SGLangHTTPError(f"{method} {url} -> HTTP {e.code}: {detail}", status=e.code,
                              retryable=e.code >= 500) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        raise SGLangHTTPError(f"{method} {url} failed: {e}", retryable=True) from None
    if len(body) > MAX_RESPONSE_BYTES:
        raise SGLangHTTPError(f"{method} {url}: response larger than {MAX_RESPONSE_BYTES} bytes")
    try:
        decoded = json.loads(body)
    except json.JSONDecodeError:
        return body.decode(errors="replace")
    if isinstance(decoded, dict) and decoded.get("success") is False:
        raise SGLangHTTPError(f"{method} {url}: server refused: {decoded.get('message')}", status=200)
    return decoded


def is_healthy(endpoint: Endpoint, timeout: float = 10.0) -> bool:
    """True when /health_generate answers 200 (SGLang runs a 1-token generation for it)."""
    try:
        call(endpoint, "/health_generate", method="GET", timeout=timeout)
        return True
    except SGLangHTTPError:
        return False


def weight_version(endpoint: Endpoint, timeout: float = 30.0) -> int:
    """The weight version the server reports (/model_info). A fresh server reports "default", read as 0."""
    info = call(endpoint, "/model_info", method="GET", timeout=timeout)
    return parse_weight_version(info.get("weight_version") if isinstance(info, dict) else None)


def parse_weight_version(value: Any) -> int:
    """Our versions are integers sent as strings; anything else (a fresh server's "default") is version 0."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
