"""Fixtures for the registry tests: a real registry (Debian's ``docker-registry``,
distribution 2.8) with its auth modes, a token server, a redirect target, a fault proxy,
credential servers, and helpers that push blobs and overlaybd images through the
registry's HTTP API as containerd's accelerated-container-image (ACI) lays them out.

Everything listens on 127.0.0.1 (or a Unix socket), is started here and stopped in the
fixture's teardown: the registry by its pid, the in-process servers by ``shutdown``.

Use as context managers (``with start_registry(tmp_path, auth="token") as reg: ...``) or
through the pytest fixtures at the bottom (import them into the test module).

Stable API (others build on it; add, don't change):

- ``start_registry(folder, *, auth="none"|"htpasswd"|"token", users=None,
  redirect=False, anonymous_pull=False, token_expires_in=300) -> Registry``
- ``Registry``: ``.host`` ("127.0.0.1:port"), ``.url``, ``.root`` (storage folder),
  ``.users``, ``.token_server``, ``.blob_store`` (redirect target or None), ``.pid``,
  ``.push_blob(repo, data|path) -> digest``,
  ``.push_manifest(repo, tag, manifest_bytes, media_type) -> digest``,
  ``.push_overlaybd_image(repo, tag, layer_files, ...) -> PushedImage``,
  ``.blob_url(repo) -> repoBlobUrl``, ``.get(path)`` (authorized GET), ``.stop()``
- ``TokenServer``: ``.requests`` (list of dicts), ``.count``, ``.expires_in`` (settable),
  ``.jwt_lifetime`` (settable; None: same as expires_in), ``.users``
- ``StaticServer`` (Range-capable file server; the registry's 307 target):
  ``.requests`` (method, path, headers dict), ``.bytes_served``
- ``FaultProxy(upstream_host, upstream_port)``: ``.host``, ``.url``,
  ``.add(pattern, action, times=1, **params)``, ``.clear()``, ``.requests``,
  ``.bytes_served``, ``.count(pattern)``; actions: drop, reset, stall, truncate, status
- ``CredentialServer`` (credentialConfig ``http`` / ``uds`` modes): ``.url`` or
  ``.socket_path``, ``.requests``, ``.auths`` (the ``auths`` object it answers with)
- ``PASSWORD`` / ``USER``: the default account (the leak tests grep for PASSWORD)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import os
import re
import secrets
import shutil
import signal
import socket
import socketserver
import ssl
import struct
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from obd.oci import annotations as A
from obd.registry.url import sha256_digest

REGISTRY_BIN = "/usr/bin/docker-registry"
USER = "obduser"
# A password no other output would contain by chance: the leak tests grep for it.
PASSWORD = "Pw-" + secrets.token_hex(12) + "-leakcheck"
SERVICE = "obd-test-registry"
ISSUER = "obd-test-token-issuer"


def require_registry() -> None:
    if not os.access(REGISTRY_BIN, os.X_OK):
        pytest.skip("docker-registry not installed (apt-get install docker-registry)")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10) -> None:
    """SIGTERM to ``proc`` by its pid, SIGKILL after ``timeout`` s; reaped either way."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def file_digest(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


# -- in-process HTTP servers ------------------------------------------------------------


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _ThreadingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextlib.contextmanager
def _serving(server: socketserver.BaseServer) -> Iterator[None]:
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        t.join(5)


def basic_auth_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _parse_basic(value: str | None) -> tuple[str, str] | None:
    if not value or not value.startswith("Basic "):
        return None
    try:
        user, _, pw = base64.b64decode(value[6:]).decode().partition(":")
    except Exception:
        return None
    return user, pw


class TokenServer:
    """A docker token server (the registry's ``token`` auth): ``GET /token?service=&scope=``
    with optional Basic credentials returns ``{"token", "access_token", "expires_in"}``, a
    JWT signed ES256 with the self-signed cert's key and the cert in ``x5c`` (what
    distribution 2.8's ``VerifySigningKey`` accepts against ``rootcertbundle``).

    ``expires_in`` is what the reply says; ``jwt_lifetime`` what the JWT's ``exp`` says
    (set it negative to issue tokens the registry rejects while the reply claims they are
    good). ``requests`` records each request (query, user or None); ``count`` their number.
    """

    def __init__(self, folder: Path, users: dict[str, str], *, anonymous_pull: bool) -> None:
        import jwt  # pyjwt[crypto]

        self._jwt = jwt
        self.users = users
        self.anonymous_pull = anonymous_pull
        self.expires_in = 300
        self.jwt_lifetime: int | None = None
        self.requests: list[dict[str, Any]] = []
        self.fail_next = 0  # answer this many requests with 500
        self.bad_next = 0  # issue this many tokens already expired (the registry refuses them)
        self.cert = folder / "token-cert.pem"
        self.key = folder / "token-key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(self.key), "-out", str(self.cert), "-days", "2",
             "-subj", "/CN=obd-test-token-issuer"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
            check=True,
            capture_output=True,
            timeout=30,
        ).stdout
        self._x5c = base64.b64encode(der).decode()
        self._key_pem = self.key.read_bytes()
        self._lock = threading.Lock()
        owner = self

        class Handler(_QuietHandler):
            def do_GET(self) -> None:
                owner._handle(self)

        self._server = _ThreadingServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.realm = f"http://127.0.0.1:{self.port}/token"

    @property
    def count(self) -> int:
        return len(self.requests)

    def _grant(self, scope: str, user: str | None) -> list[dict[str, Any]]:
        access = []
        for one in scope.split(" "):
            parts = one.split(":")
            if len(parts) < 3:
                continue
            kind, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1].split(",")
            if user is None:
                actions = [a for a in actions if a == "pull"] if self.anonymous_pull else []
            if actions:
                access.append({"type": kind, "name": name, "actions": actions})
        return access

    def issue(self, scope: str, user: str | None) -> str:
        now = int(time.time())
        lifetime = self.expires_in if self.jwt_lifetime is None else self.jwt_lifetime
        with self._lock:
            if self.bad_next > 0:
                self.bad_next -= 1
                lifetime = -600  # past the registry's 60 s leeway
        claims = {
            "iss": ISSUER,
            "sub": user or "",
            "aud": SERVICE,
            "exp": now + lifetime,
            "nbf": now - 5,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": self._grant(scope, user),
        }
        return str(
            self._jwt.encode(claims, self._key_pem, algorithm="ES256", headers={"x5c": [self._x5c]})
        )

    def _handle(self, h: _QuietHandler) -> None:
        url = urllib.parse.urlsplit(h.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        creds = _parse_basic(h.headers.get("Authorization"))
        with self._lock:
            self.requests.append(
                {"query": q, "user": creds[0] if creds else None, "path": url.path}
            )
            fail = self.fail_next > 0
            if fail:
                self.fail_next -= 1
        if fail:
            h.reply(500, b"token server failure")
            return
        user = None
        if creds is not None:
            if self.users.get(creds[0]) != creds[1]:
                h.reply(401, b'{"details":"bad credentials"}', {"Content-Type": "application/json"})
                return
            user = creds[0]
        token = self.issue(q.get("scope", ""), user)
        body = json.dumps({"token": token, "access_token": token, "expires_in": self.expires_in})
        h.reply(200, body.encode(), {"Content-Type": "application/json"})

    @contextlib.contextmanager
    def running(self) -> Iterator[TokenServer]:
        with _serving(self._server):
            yield self


class StaticServer:
    """A Range-capable static file server over ``root`` (GET/HEAD; ``bytes=a-b``,
    ``a-``, ``-n``); the target of the registry's ``redirect`` storage middleware. Records
    each request's method, path and headers, and the body bytes it served."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.bytes_served = 0
        self._lock = threading.Lock()
        owner = self

        class Handler(_QuietHandler):
            def do_GET(self) -> None:
                owner._handle(self)

            do_HEAD = do_GET

        self._server = _ThreadingServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def _handle(self, h: _QuietHandler) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(h.path).path)
        with self._lock:
            self.requests.append((h.command, path, dict(h.headers.items())))
        full = (self.root / path.lstrip("/")).resolve()
        if not str(full).startswith(str(self.root.resolve())) or not full.is_file():
            h.reply(404, b"not found")
            return
        data = full.read_bytes()
        size = len(data)
        rng = h.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m or (not m[1] and not m[2]):
                h.reply(416, b"", {"Content-Range": f"bytes */{size}"})
                return
            if m[1]:
                start, end = int(m[1]), int(m[2]) if m[2] else size - 1
            else:
                start, end = max(0, size - int(m[2])), size - 1
            end = min(end, size - 1)
            if start >= size or start > end:
                h.reply(416, b"", {"Content-Range": f"bytes */{size}"})
                return
            body = data[start : end + 1]
            headers = {"Content-Range": f"bytes {start}-{end}/{size}", "Accept-Ranges": "bytes"}
            status = 206
        else:
            body, headers, status = data, {"Accept-Ranges": "bytes"}, 200
        if h.command == "GET":
            with self._lock:
                self.bytes_served += len(body)
        h.reply(status, body, headers)

    @contextlib.contextmanager
    def running(self) -> Iterator[StaticServer]:
        with _serving(self._server):
            yield self


class _UnixHTTPServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[Any, Any]:
        conn, _ = super().get_request()
        return conn, ("uds", 0)


class CredentialServer:
    """The credential service of ``credentialConfig`` modes ``http`` and ``uds``
    (overlaybd's image_service.cpp): ``GET <path>?remote_url=<blob url>`` answers
    ``{"traceId", "success", "data": {"auths": {...}}}``. ``auths`` is what it answers
    with; ``success`` may be set False; ``requests`` records the remote_url values."""

    def __init__(
        self,
        auths: dict[str, Any],
        *,
        socket_path: Path | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.auths = auths
        self.success = True
        self.requests: list[str] = []
        owner = self

        class Handler(_QuietHandler):
            def do_GET(self) -> None:
                owner._handle(self)

        self.socket_path = socket_path
        self._server: socketserver.BaseServer
        if socket_path is not None:
            self._server = _UnixHTTPServer(str(socket_path), Handler)
            self.url = "http://localhost/auth"
        else:
            self._server = _ThreadingServer(("127.0.0.1", 0), Handler)
            port = self._server.server_address[1]
            self.url = f"http://127.0.0.1:{port}/auth"
            if ssl_context is not None:
                srv = self._server
                srv.socket = ssl_context.wrap_socket(srv.socket, server_side=True)
                self.url = f"https://127.0.0.1:{port}/auth"

    def _handle(self, h: _QuietHandler) -> None:
        query = urllib.parse.urlsplit(h.path).query
        remote = query.partition("remote_url=")[2]
        self.requests.append(remote)
        body = {"traceId": uuid.uuid4().hex, "success": self.success, "data": {"auths": self.auths}}
        h.reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    @contextlib.contextmanager
    def running(self) -> Iterator[CredentialServer]:
        with _serving(self._server):
            yield self


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(self.ca)
        return ctx


def make_tls(folder: Path) -> TlsFiles:
    """A test CA, a server certificate for 127.0.0.1 / localhost and a client
    certificate, made with ``openssl``."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    folder.mkdir(parents=True, exist_ok=True)
    f = TlsFiles(
        *(folder / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key"))
    )
    ca_key = folder / "ca.key"

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(f.ca), "-days", "2",
        "-subj", "/CN=obd-test-ca")  # fmt: skip
    for cert, key, cn, ext in (
        (f.server_cert, f.server_key, "127.0.0.1",
         "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
        (f.client_cert, f.client_key, "obd-test-client", "extendedKeyUsage=clientAuth"),
    ):  # fmt: skip
        csr = folder / (cert.name + ".csr")
        extf = folder / (cert.name + ".ext")
        extf.write_text(ext + "\n")
        run("req", "-new", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}")
        run("x509", "-req", "-in", str(csr), "-CA", str(f.ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(extf))  # fmt: skip
    return f


# -- the fault proxy ------------------------------------------------------------------


@dataclass
class FaultRule:
    pattern: re.Pattern[str]
    action: str
    times: int
    params: dict[str, Any]
    hits: int = 0


@dataclass
class ProxiedRequest:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0
    fault: str = ""
    body_bytes: int = 0


class FaultProxy:
    """A loopback HTTP/1.1 proxy of our own (threads, raw sockets) in front of the
    registry. ``add(pattern, action, times=1, **params)`` arms a fault for the next
    ``times`` requests whose ``"METHOD path"`` matches the regex ``pattern`` (-1: all):

    - ``drop``: read the request, close without a reply;
    - ``reset``: read the request, close with a TCP RST;
    - ``stall``: read the request, say nothing for ``seconds`` (default 30), then close;
    - ``truncate``: forward the reply's head and only ``keep`` body bytes (default half),
      then close;
    - ``status``: reply ``code`` (default 503) with ``headers`` (e.g. Retry-After);
    - ``strip_range``: forward the request without its Range header (the registry then
      answers 200 with the whole blob);
    - ``drip``: forward the reply, its body ``chunk`` bytes (default 16) every
      ``interval`` seconds (default 0.1).

    ``requests`` records every request (method, path, headers, status, fault, body bytes
    sent); ``bytes_served`` counts the body bytes forwarded from the registry.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.rules: list[FaultRule] = []
        self.requests: list[ProxiedRequest] = []
        self.bytes_served = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self._conns: set[socket.socket] = set()
        self.connections = 0  # client connections accepted
        self._thread: threading.Thread | None = None

    # -- control
    def add(self, pattern: str, action: str, times: int = 1, **params: Any) -> FaultRule:
        actions = ("drop", "reset", "stall", "truncate", "status", "strip_range", "drip")
        assert action in actions, action
        rule = FaultRule(re.compile(pattern), action, times, params)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def count(self, pattern: str = "") -> int:
        rx = re.compile(pattern)
        with self._lock:
            return sum(1 for r in self.requests if rx.search(f"{r.method} {r.path}"))

    def _rule_for(self, line: str) -> FaultRule | None:
        with self._lock:
            for rule in self.rules:
                if (rule.times < 0 or rule.hits < rule.times) and rule.pattern.search(line):
                    rule.hits += 1
                    return rule
        return None

    # -- serving
    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        if self._thread is not None:
            self._thread.join(5)

    @contextlib.contextmanager
    def running(self) -> Iterator[FaultProxy]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
                self.connections += 1
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()

    def _serve_conn(self, client: socket.socket) -> None:
        up: socket.socket | None = None
        cr = client.makefile("rb")
        try:
            while not self._stop.is_set():
                head = _read_head(cr)
                if head is None:
                    return
                line, headers, raw_head = head
                method, path = [*line.split(" "), "", ""][:2]
                body = b""
                n = int(headers.get("content-length", "0") or 0)
                if n:
                    body = cr.read(n)
                elif headers.get("transfer-encoding", "").lower() == "chunked":
                    body = _read_chunked_raw(cr)
                rec = ProxiedRequest(method, path, headers)
                with self._lock:
                    self.requests.append(rec)
                rule = self._rule_for(f"{method} {path}")
                if rule is not None:
                    rec.fault = rule.action
                if rule is not None and rule.action == "drop":
                    return
                if rule is not None and rule.action == "reset":
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                if rule is not None and rule.action == "stall":
                    self._stop.wait(float(rule.params.get("seconds", 30)))
                    return
                if rule is not None and rule.action == "status":
                    code = int(rule.params.get("code", 503))
                    rec.status = code
                    extra = "".join(
                        f"{k}: {v}\r\n" for k, v in rule.params.get("headers", {}).items()
                    )
                    msg = b"injected fault"
                    client.sendall(
                        f"HTTP/1.1 {code} Injected\r\n{extra}Content-Length: {len(msg)}\r\n"
                        f"Connection: close\r\n\r\n".encode()
                        + msg
                    )
                    return
                if rule is not None and rule.action == "strip_range":
                    raw_head = re.sub(rb"(?im)^range:[^\r\n]*\r?\n", b"", raw_head)
                if up is None:
                    up = socket.create_connection(self.upstream, timeout=30)
                    upr = up.makefile("rb")
                up.sendall(raw_head + body)
                rhead = _read_head(upr)
                if rhead is None:
                    return
                rline, rheaders, rraw = rhead
                rec.status = int(rline.split(" ")[1])
                client.sendall(rraw)
                keep = None
                if rule is not None and rule.action == "truncate":
                    keep = rule.params.get("keep")
                    if keep is None:
                        keep = int(rheaders.get("content-length", "2") or 2) // 2
                drip = None
                if rule is not None and rule.action == "drip":
                    drip = (int(rule.params.get("chunk", 16)), float(rule.params.get("interval", 0.1)))  # fmt: skip
                sent = self._relay_body(method, rec.status, rheaders, upr, client, keep, rec, drip)
                if not sent or rheaders.get("connection", "").lower() == "close":
                    return
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(client)
            with contextlib.suppress(OSError):
                client.close()
            if up is not None:
                with contextlib.suppress(OSError):
                    up.close()

    def _relay_body(self, method: str, status: int, headers: dict[str, str], upr: Any,
                    client: socket.socket, keep: int | None, rec: ProxiedRequest,
                    drip: tuple[int, float] | None = None) -> bool:  # fmt: skip
        """Forward the body; False when the connection must end (truncated, or EOF-framed)."""
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return True
        if headers.get("transfer-encoding", "").lower() == "chunked":
            raw = _read_chunked_raw(upr)
            out = raw if keep is None else raw[:keep]
        elif "content-length" in headers:
            out = upr.read(int(headers["content-length"]))
            if keep is not None:
                out = out[:keep]
        else:
            out = upr.read()
            keep = len(out) if keep is None else keep
        if drip is None:
            client.sendall(out)
        else:
            for i in range(0, len(out), drip[0]):
                if self._stop.wait(drip[1]):
                    return False
                client.sendall(out[i : i + drip[0]])
        rec.body_bytes = len(out)
        with self._lock:
            self.bytes_served += len(out)
        return keep is None


def _read_head(r: Any) -> tuple[str, dict[str, str], bytes] | None:
    raw = b""
    line = r.readline(65537)
    while line in (b"\r\n", b"\n"):  # stray CRLF between messages
        line = r.readline(65537)
    if not line:
        return None
    raw += line
    headers: dict[str, str] = {}
    while True:
        h = r.readline(65537)
        if not h:
            return None
        raw += h
        if h in (b"\r\n", b"\n"):
            break
        k, _, v = h.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    return line.decode("latin-1").strip(), headers, raw


def _read_chunked_raw(r: Any) -> bytes:
    out = b""
    while True:
        size_line = r.readline(65537)
        if not size_line:
            return out
        out += size_line
        n = int(size_line.split(b";")[0].strip() or b"0", 16)
        if n == 0:
            while True:
                t = r.readline(65537)
                out += t
                if t in (b"\r\n", b"\n", b""):
                    return out
        out += r.read(n + 2)


# -- the registry ------------------------------------------------------------------------


@dataclass
class PushedImage:
    repo: str
    tag: str
    digest: str  # the manifest's
    manifest: bytes
    media_type: str
    config_digest: str
    layers: list[tuple[str, int]] = field(default_factory=list)  # (digest, size), bottom first
    ref: str = ""  # host/repo:tag


def _htpasswd_line(user: str, password: str) -> str:
    r = subprocess.run(
        ["htpasswd", "-B", "-b", "-n", user, password], capture_output=True, text=True, timeout=30
    )
    if r.returncode != 0:
        raise RuntimeError("htpasswd failed")  # no output: it would hold the password
    return r.stdout.strip() + "\n"


class Registry:
    """A running ``docker-registry``. ``host``/``url`` are where clients go (the registry
    itself, or the fault proxy when the test puts one in front: see ``via``)."""

    def __init__(self, folder: Path, proc: subprocess.Popen[bytes], port: int, *, auth: str,
                 users: dict[str, str], token_server: TokenServer | None,
                 blob_store: StaticServer | None, log: Path) -> None:  # fmt: skip
        self.folder = folder
        self.root = folder / "storage"
        self.proc = proc
        self.pid = proc.pid
        self.port = port
        self.registry_host = f"127.0.0.1:{port}"
        self.host = self.registry_host
        self.url = f"http://{self.host}"
        self.scheme = "http"
        self.auth = auth
        self.users = users
        self.token_server = token_server
        self.blob_store = blob_store
        self.log = log
        self._http = httpx.Client(timeout=30, follow_redirects=False)
        self._auth_header: dict[str, str] = {}

    def blob_url(self, repo: str, host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.host}/v2/{repo}/blobs"

    # -- an admin session with the registry's own auth (push and pull) --------------------
    def _authorize(self, resp: httpx.Response) -> None:
        challenge = resp.headers.get("WWW-Authenticate", "")
        user, pw = next(iter(self.users.items())) if self.users else (None, None)
        if challenge.startswith("Basic") and user is not None:
            self._auth_header = {"Authorization": basic_auth_header(user, pw or "")}
            return
        if challenge.startswith("Bearer"):
            params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
            scope = params.get("scope", "")
            # ask for push and pull on the repository (catalog scopes pass through)
            if scope.startswith("repository:"):
                scope = scope.rsplit(":", 1)[0] + ":pull,push,delete"
            headers = {"Authorization": basic_auth_header(user, pw or "")} if user else {}
            r = self._http.get(
                params["realm"],
                params={"service": params["service"], "scope": scope},
                headers=headers,
            )
            r.raise_for_status()
            self._auth_header = {"Authorization": "Bearer " + r.json()["token"]}
            return
        raise RuntimeError(f"cannot answer challenge {challenge!r}")

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        """One request to the registry itself with the admin's credentials (retried once
        after a 401 challenge). ``url`` may be a path."""
        if url.startswith("/"):
            url = f"{self.scheme}://{self.registry_host}{url}"
        content = kw.pop("content", None)
        for _ in range(3):
            headers = {**kw.get("headers", {}), **self._auth_header}
            kw2 = {**kw, "headers": headers}
            body = content() if callable(content) else content
            r = self._http.request(method, url, content=body, **kw2)
            if r.status_code != 401:
                return r
            self._authorize(r)
        return r

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("GET", path, **kw)

    def push_blob(self, repo: str, data: bytes | str | os.PathLike[str]) -> str:
        """Upload one blob (POST then a monolithic PUT); returns its digest."""
        if isinstance(data, bytes):
            digest = sha256_digest(data)

            def content() -> Any:
                return data
        else:
            path = Path(data)
            digest = file_digest(path)

            def content() -> Any:
                return path.read_bytes()

        if self.request("HEAD", f"/v2/{repo}/blobs/{digest}").status_code == 200:
            return digest
        r = self.request("POST", f"/v2/{repo}/blobs/uploads/")
        assert r.status_code == 202, (r.status_code, r.text)
        loc = urllib.parse.urljoin(f"{self.scheme}://{self.registry_host}/", r.headers["Location"])
        sep = "&" if "?" in loc else "?"
        r = self.request(
            "PUT",
            f"{loc}{sep}digest={digest}",
            content=content,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert r.status_code == 201, (r.status_code, r.text)
        return digest

    def push_manifest(self, repo: str, tag: str, manifest: bytes, media_type: str) -> str:
        r = self.request(
            "PUT",
            f"/v2/{repo}/manifests/{tag}",
            content=manifest,
            headers={"Content-Type": media_type},
        )
        assert r.status_code == 201, (r.status_code, r.text)
        digest = sha256_digest(manifest)
        assert r.headers.get("Docker-Content-Digest", digest) == digest
        return digest

    def push_overlaybd_image(
        self,
        repo: str,
        tag: str,
        layer_files: Sequence[str | os.PathLike[str] | bytes],
        *,
        media_type: str = A.MT_DOCKER_MANIFEST,
        config_media_type: str | None = None,
        acceleration_layer: bool = False,
        fs_type: str | None = "ext4",
        annotate: bool = True,
        extra_config: dict[str, Any] | None = None,
    ) -> PushedImage:
        """Push ``layer_files`` (bottom first; overlaybd layer blobs: LSMT, ZFile or their
        tar wrapping) as an image laid out as ACI's converter commits it: each layer
        descriptor has mediaType ``application/vnd.oci.image.layer.v1.tar`` and the
        annotations ``version``, ``blob-digest``, ``blob-size`` (and ``blob-fs-type``,
        ``acceleration-layer: yes`` on the last layer when asked); the config's
        ``rootfs.diff_ids`` are the layer digests (the blobs are uncompressed). ACI's
        commitImage writes a Docker schema 2 manifest type over OCI layer descriptors;
        ``media_type`` may ask for the OCI manifest type instead. ``annotate=False`` pushes
        the same image without the overlaybd annotations (a plain image)."""
        layers = []
        for i, f in enumerate(layer_files):
            digest = self.push_blob(repo, f)
            size = len(f) if isinstance(f, bytes) else os.path.getsize(f)
            desc: dict[str, Any] = {"mediaType": A.MT_OCI_LAYER, "digest": digest, "size": size}
            if annotate:
                ann = {
                    A.VERSION: A.OVERLAYBD_VERSION,
                    A.BLOB_DIGEST: digest,
                    A.BLOB_SIZE: str(size),
                }
                if fs_type:
                    ann[A.BLOB_FS_TYPE] = fs_type
                if acceleration_layer and i == len(layer_files) - 1:
                    ann[A.ACCELERATION_LAYER] = "yes"
                desc["annotations"] = ann
            layers.append(desc)
        if config_media_type is None:
            config_media_type = (
                A.MT_OCI_CONFIG if media_type == A.MT_OCI_MANIFEST else A.MT_DOCKER_CONFIG
            )
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in layers]},
            "history": [{"created_by": "obd tests"} for _ in layers],
            **(extra_config or {}),
        }
        config_bytes = json.dumps(config, indent=3).encode()
        config_digest = self.push_blob(repo, config_bytes)
        manifest = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {
                "mediaType": config_media_type,
                "digest": config_digest,
                "size": len(config_bytes),
            },
            "layers": layers,
        }
        mbytes = json.dumps(manifest, indent=3).encode()
        digest = self.push_manifest(repo, tag, mbytes, media_type)
        return PushedImage(
            repo, tag, digest, mbytes, media_type, config_digest,
            [(d["digest"], d["size"]) for d in layers], f"{self.host}/{repo}:{tag}",
        )  # fmt: skip

    def push_index(self, repo: str, tag: str, manifests: Sequence[tuple[PushedImage, dict[str, str]]],
                   media_type: str = A.MT_OCI_INDEX) -> str:  # fmt: skip
        """Push an index over pushed images, each with its platform dict."""
        index = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [
                {"mediaType": img.media_type, "digest": img.digest, "size": len(img.manifest),
                 "platform": platform}
                for img, platform in manifests
            ],
        }  # fmt: skip
        return self.push_manifest(repo, tag, json.dumps(index).encode(), media_type)

    def stop(self) -> None:
        self._http.close()
        stop_process(self.proc)


@contextlib.contextmanager
def start_registry(
    folder: Path,
    *,
    auth: str = "none",
    users: dict[str, str] | None = None,
    redirect: bool = False,
    anonymous_pull: bool = False,
    token_expires_in: int = 300,
    tls: TlsFiles | None = None,
) -> Iterator[Registry]:
    """Start ``docker-registry`` on 127.0.0.1:<free port> with filesystem storage under
    ``folder/storage`` and ``auth`` none, htpasswd (bcrypt) or token (with a
    :class:`TokenServer` of ours); ``redirect=True`` adds the ``redirect`` storage
    middleware pointing at a :class:`StaticServer` over the storage folder, so blob GETs
    answer 307; ``tls`` serves HTTPS with that server certificate (then ``reg.url`` is
    https). Stopped by its pid on exit."""
    require_registry()
    if auth == "htpasswd" and shutil.which("htpasswd") is None:
        pytest.skip("htpasswd not installed (apt-get install apache2-utils)")
    if auth == "token" and shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "storage").mkdir(exist_ok=True)
    users = dict(users) if users is not None else {USER: PASSWORD}
    with contextlib.ExitStack() as stack:
        token_server = None
        blob_store = None
        auth_yaml = ""
        if auth == "htpasswd":
            hp = folder / "htpasswd"
            hp.write_text("".join(_htpasswd_line(u, p) for u, p in users.items()))
            auth_yaml = f"auth:\n  htpasswd:\n    realm: obd-test\n    path: {hp}\n"
        elif auth == "token":
            token_server = TokenServer(folder, users, anonymous_pull=anonymous_pull)
            token_server.expires_in = token_expires_in
            stack.enter_context(token_server.running())
            auth_yaml = (
                f"auth:\n  token:\n    realm: {token_server.realm}\n    service: {SERVICE}\n"
                f"    issuer: {ISSUER}\n    rootcertbundle: {token_server.cert}\n"
            )
        elif auth != "none":
            raise ValueError(auth)
        mw_yaml = ""
        if redirect:
            blob_store = StaticServer(folder / "storage")
            stack.enter_context(blob_store.running())
            mw_yaml = (
                "middleware:\n  storage:\n    - name: redirect\n"
                f"      options:\n        baseurl: {blob_store.url}\n"
            )
        port = free_port()
        cfg = folder / "registry.yml"
        cfg.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {folder / 'storage'}\n"
            "  delete:\n    enabled: true\n"
            "  maintenance:\n    uploadpurging:\n      enabled: false\n"
            f"http:\n  addr: 127.0.0.1:{port}\n  secret: {secrets.token_hex(16)}\n"
            + (
                f"  tls:\n    certificate: {tls.server_cert}\n    key: {tls.server_key}\n"
                if tls
                else ""
            )
            + auth_yaml
            + mw_yaml
        )
        log = folder / "registry.log"
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                [REGISTRY_BIN, "serve", str(cfg)],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        reg = Registry(folder, proc, port, auth=auth, users=users, token_server=token_server,
                       blob_store=blob_store, log=log)  # fmt: skip
        if tls is not None:
            reg.url = f"https://{reg.host}"
            reg.scheme = "https"
            ctx = ssl.create_default_context(cafile=str(tls.ca))
            reg._http = httpx.Client(timeout=30, follow_redirects=False, verify=ctx)
        try:
            _wait_port(port, 20, proc)
            yield reg
        finally:
            reg.stop()


@contextlib.contextmanager
def via(reg: Registry, proxy: FaultProxy) -> Iterator[Registry]:
    """Point ``reg.host``/``reg.url`` (what clients use) at ``proxy`` for the block."""
    old = reg.host, reg.url
    reg.host, reg.url = proxy.host, f"{reg.scheme}://{proxy.host}"
    try:
        yield reg
    finally:
        reg.host, reg.url = old


@contextlib.contextmanager
def fault_proxy(reg: Registry) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of ``reg``; clients should use ``proxy.host``."""
    proxy = FaultProxy("127.0.0.1", reg.port)
    with proxy.running(), via(reg, proxy):
        yield proxy


# -- pytest fixtures (import the ones you use into your test module) ----------------------


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """An anonymous registry."""
    with start_registry(tmp_path / "registry") as reg:
        yield reg


@pytest.fixture
def registry_basic(tmp_path: Path) -> Iterator[Registry]:
    """A registry with htpasswd (Basic) auth; account USER / PASSWORD."""
    with start_registry(tmp_path / "registry", auth="htpasswd") as reg:
        yield reg


@pytest.fixture
def registry_token(tmp_path: Path) -> Iterator[Registry]:
    """A registry with token (Bearer) auth through a TokenServer; account USER / PASSWORD."""
    with start_registry(tmp_path / "registry", auth="token") as reg:
        yield reg


@pytest.fixture
def registry_redirect(tmp_path: Path) -> Iterator[Registry]:
    """A registry with Basic auth whose blob GETs answer 307 to a StaticServer."""
    with start_registry(tmp_path / "registry", auth="htpasswd", redirect=True) as reg:
        yield reg


@pytest.fixture
def registry_proxy(registry: Registry) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the anonymous ``registry`` fixture (registry.host is the
    proxy's while the test runs)."""
    with fault_proxy(registry) as proxy:
        yield proxy


def wait_for(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return cond()
        time.sleep(0.02)
    return True
