"""Finding a running host for ``mlbridge call`` / ``mlbridge status``, and talking to it over HTTP.

Which host a command uses, first match wins:

1. ``--url URL`` on the command line;
2. ``$MLBRIDGE_URL``;
3. the run-time file of a running ``mlbridge serve``
   (:func:`mlbridge.gateway.runtime_file.read_running`: ignored when its process has exited);
4. none: the command starts a throw-away host of its own, and says so on stderr.

A host named by ``--url`` or ``$MLBRIDGE_URL`` that does not answer is an error (exit 8); one
found only through the run-time file that does not answer is reported and the command falls
back to a throw-away host. The bearer token comes from ``$MLBRIDGE_TOKEN`` and is sent only in
the ``Authorization`` header, never printed.

The client is the standard library's ``urllib`` (no extra dependency for the CLI). Errors come
back in the gateway's body ``{"error": {"message", "code", ...}}``; the stable ``code`` is turned
into the same :mod:`mlbridge.errors` class the in-process API raises, so exit codes match.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .._protocol.wire_errors import CODE_TO_ERROR
from ..errors import BridgeUnavailableError, MLBridgeError, ProtocolError, RemoteError

__all__ = [
    "TOKEN_ENV",
    "URL_ENV",
    "RemoteHost",
    "find_running_host",
    "throwaway_notice",
]

URL_ENV = "MLBRIDGE_URL"
TOKEN_ENV = "MLBRIDGE_TOKEN"
_CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class RemoteHost:
    """A running host reached through its HTTP gateway."""

    url: str
    source: str  # "--url", "$MLBRIDGE_URL" or "the run-time file ... (pid N)"
    token: str | None = None
    pid: int | None = None  # the serving process, when the run-time file names it

    def __repr__(self) -> str:  # the token never shows
        return f"RemoteHost(url={self.url!r}, source={self.source!r})"

    # ------------------------------------------------------------------ requests
    def _request(
        self, method: str, path: str, body: Any = None, accept: str = "application/json"
    ) -> urllib.request.Request:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": accept}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return urllib.request.Request(self.url + path, data=data, headers=headers, method=method)

    def _open(self, req: urllib.request.Request, timeout: float | None) -> Any:
        try:
            return urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as exc:
            raise self._error(exc.code, exc.read()) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise BridgeUnavailableError(
                f"cannot reach the mlbridge host at {self.url} (from {self.source}): {reason}. "
                "Fix: start one with `mlbridge serve`, correct --url / $MLBRIDGE_URL, or unset "
                "$MLBRIDGE_URL to let the command start a throw-away host"
            ) from None

    def _error(self, status: int, raw: bytes) -> MLBridgeError:
        try:
            doc = json.loads(raw)
            info = doc["error"]
            message, code = str(info["message"]), info.get("code")
        except (ValueError, KeyError, TypeError):
            text = raw.decode("utf-8", "replace").strip()[:500]
            message, code = f"HTTP {status} from {self.url}: {text or 'no body'}", None
        if status == 401 or status == 403:
            return BridgeUnavailableError(
                f"the mlbridge host at {self.url} refused the request (HTTP {status}): {message}. "
                f"Fix: export {TOKEN_ENV}=<the token `mlbridge serve` was given>"
            )
        cls = CODE_TO_ERROR.get(code or "", RemoteError)
        return cls(message)

    def get_json(self, path: str, timeout: float | None = _CONNECT_TIMEOUT) -> Any:
        with self._open(self._request("GET", path), timeout) as resp:
            return self._decode(resp.read())

    def post_json(self, path: str, body: Any, timeout: float | None) -> Any:
        with self._open(self._request("POST", path, body), timeout) as resp:
            return self._decode(resp.read())

    def _decode(self, raw: bytes) -> Any:
        try:
            return json.loads(raw)
        except ValueError:
            raise ProtocolError(
                f"the host at {self.url} answered with something that is not JSON "
                f"({raw[:80]!r}). Fix: check that --url points at `mlbridge serve`"
            ) from None

    # ------------------------------------------------------------------ operations
    def ping(self) -> None:
        """Raise :class:`BridgeUnavailableError` unless the gateway answers ``/healthz``."""
        self.get_json("/healthz")

    def statistics(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.get_json("/api/stats")
        return stats

    def execute_msgpack(
        self, bridge: str, command: str, args: dict[str, Any], timeout: float | None
    ) -> bytes:
        """The result as MessagePack (arrays as ext type 1), as the gateway encodes it."""
        import msgpack

        path, body = _execute_request(bridge, command, args, timeout)
        req = self._request("POST", path, body, accept="application/msgpack")
        with self._open(req, _http_timeout(timeout)) as resp:
            raw = resp.read()
        try:
            doc = msgpack.unpackb(raw, raw=False, ext_hook=msgpack.ExtType, strict_map_key=False)
            packed: bytes = msgpack.packb(doc["result"], use_bin_type=True)
        except (ValueError, KeyError, TypeError, msgpack.UnpackException):
            raise ProtocolError(
                f"the host at {self.url} did not answer with a MessagePack result "
                f"({raw[:80]!r}). Fix: check that --url points at `mlbridge serve`"
            ) from None
        return packed

    def restart(self, bridge: str, timeout: float | None) -> dict[str, Any]:
        path = f"/api/frameworks/{urllib.parse.quote(bridge, safe='')}/restart"
        reply: dict[str, Any] = self.post_json(path, {}, timeout)
        return reply

    def execute(
        self, bridge: str, command: str, args: dict[str, Any], timeout: float | None
    ) -> Any:
        path, body = _execute_request(bridge, command, args, timeout)
        doc = self.post_json(path, body, _http_timeout(timeout))
        return doc["result"]

    def create_resource(
        self, bridge: str, rtype: str, config: dict[str, Any], timeout: float | None = None
    ) -> str:
        path = f"/api/frameworks/{urllib.parse.quote(bridge, safe='')}/resources"
        body: dict[str, Any] = {"type": rtype, "config": config}
        if timeout is not None:
            body["timeout"] = timeout
        return str(self.post_json(path, body, _http_timeout(timeout))["resource_id"])

    def execute_resource(
        self, bridge: str, rid: str, inputs: dict[str, Any], timeout: float | None = None
    ) -> Any:
        path = (
            f"/api/frameworks/{urllib.parse.quote(bridge, safe='')}/resources/"
            f"{urllib.parse.quote(rid, safe='')}/execute"
        )
        body: dict[str, Any] = {"inputs": inputs}
        if timeout is not None:
            body["timeout"] = timeout
        return self.post_json(path, body, _http_timeout(timeout))["result"]

    def stream_resource(
        self, bridge: str, rid: str, inputs: dict[str, Any], timeout: float | None = None
    ) -> Iterator[tuple[str, Any]]:
        path = (
            f"/api/frameworks/{urllib.parse.quote(bridge, safe='')}/resources/"
            f"{urllib.parse.quote(rid, safe='')}/stream"
        )
        body: dict[str, Any] = {"inputs": inputs}
        if timeout is not None:
            body["timeout"] = timeout
        return self._events(path, body, timeout)

    def stream(
        self, bridge: str, command: str, args: dict[str, Any], timeout: float | None
    ) -> Iterator[tuple[str, Any]]:
        """``("chunk", chunk)`` per chunk, then ``("result", value)``; an ``error`` event raises."""
        path = f"/api/frameworks/{urllib.parse.quote(bridge, safe='')}/stream"
        body: dict[str, Any] = {"command": command, "args": args}
        if timeout is not None:
            body["timeout"] = timeout
        return self._events(path, body, timeout)

    def _events(
        self, path: str, body: dict[str, Any], timeout: float | None
    ) -> Iterator[tuple[str, Any]]:
        req = self._request("POST", path, body)
        req.add_header("Accept", "text/event-stream")
        with self._open(req, _http_timeout(timeout)) as resp:
            name, data = "message", []
            for raw in resp:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip(" "))
                elif line == "" and data:
                    payload = self._decode("\n".join(data).encode())
                    if name == "error":
                        raise self._error(500, json.dumps(payload).encode())
                    if name == "result":
                        yield "result", payload.get("result")
                        return
                    yield "chunk", payload
                    name, data = "message", []


def _http_timeout(call_timeout: float | None) -> float | None:
    # The host enforces the call's timeout; the socket waits a little longer for its answer.
    return None if call_timeout is None else call_timeout + 30.0


def find_running_host(
    url: str | None, environ: Mapping[str, str] | None = None
) -> RemoteHost | None:
    """The running host this command should use (see the module docstring), or None."""
    env = os.environ if environ is None else environ
    token = env.get(TOKEN_ENV) or None
    if url:
        return RemoteHost(_normalise(url, "--url"), "--url", token)
    if env.get(URL_ENV):
        return RemoteHost(_normalise(env[URL_ENV], f"${URL_ENV}"), f"${URL_ENV}", token)
    from ..gateway.runtime_file import read_running

    running = read_running(env)
    if running is None:
        return None
    source = f"the run-time file of `mlbridge serve` (pid {running.pid})"
    host = RemoteHost(running.url, source, token, running.pid)
    try:
        host.ping()
    except MLBridgeError as exc:
        print(
            f"mlbridge: the running host at {running.url} does not answer ({exc}); "
            "using a throw-away host instead",
            file=sys.stderr,
        )
        return None
    return host


def _execute_request(
    bridge: str, command: str, args: dict[str, Any], timeout: float | None
) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"command": command, "args": args}
    if timeout is not None:
        body["timeout"] = timeout
    return f"/api/frameworks/{urllib.parse.quote(bridge, safe='')}/execute", body


def _normalise(url: str, source: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        from ._errors import UsageError

        raise UsageError(
            f"{source} must be the gateway's base URL such as http://127.0.0.1:8765, "
            f"not {url!r}. Fix: use the URL `mlbridge serve` printed"
        )
    return url.rstrip("/")


def throwaway_notice(command: str) -> None:
    """Say on stderr that this command runs a host of its own (stdout stays the result)."""
    print(
        f"mlbridge: no running host (no --url, no ${URL_ENV}, no `mlbridge serve` run-time "
        f"file): `mlbridge {command}` starts a throw-away host, whose workers stop when it ends. "
        "Run `mlbridge serve` in another terminal to keep one running.",
        file=sys.stderr,
    )
