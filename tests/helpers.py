"""Test helpers shared by every test file: scripted mock upstreams on 127.0.0.1, an in-process
ccproxy, the one SDK client, raw-socket HTTP, the Anthropic event order a client reads, and
JSON changed anywhere for hypothesis. Fixtures built on them live in conftest.py."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import re
import select
import shutil
import subprocess
import socket
import ssl
import sys
import threading
import time
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anthropic
import pytest
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ccproxy  # noqa: E402

PROVIDER_KEY = "sk-ant-upstream-secret-0123456789"


def sse(event: str, data) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event.encode(), json.dumps(data).encode())


def anthropic_message(text="Hello from upstream", model="claude-upstream"):
    return {"id": "msg_01", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 5}}


def anthropic_stream_events(pieces=("Hel", "lo", "!"), model="claude-upstream"):
    """The events of a well-formed streamed text answer, one bytes item per event."""
    events = [sse("message_start", {"type": "message_start", "message": dict(
        anthropic_message("", model), content=[], stop_reason=None,
        usage={"input_tokens": 12, "output_tokens": 1})}),
        sse("content_block_start", {"type": "content_block_start", "index": 0,
                                    "content_block": {"type": "text", "text": ""}})]
    for piece in pieces:
        events.append(sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                  "delta": {"type": "text_delta", "text": piece}}))
    events += [sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
               sse("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                     "usage": {"output_tokens": 5}}),
               sse("message_stop", {"type": "message_stop"})]
    return events


# What each kind of block may carry in its deltas.
DELTAS_OF_BLOCK = {"text": ("text_delta", "citations_delta"),
                   "thinking": ("thinking_delta", "signature_delta"),
                   "tool_use": ("input_json_delta",), "server_tool_use": ("input_json_delta",)}
STOP_REASONS = ("end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal",
                "model_context_window_exceeded")


def not_json(name):
    raise AssertionError("%s is not JSON: a JavaScript client cannot read it" % name)


def strict_json(text):
    """JSON as a JavaScript client reads it: NaN and Infinity refused (Python takes them)."""
    return json.loads(text, parse_constant=not_json)


def parse_events(data: bytes):
    """(event, payload) pairs of an Anthropic SSE body, checking each frame's shape."""
    events = []
    for frame in data.decode().split("\n\n"):
        if not frame:
            continue
        lines = frame.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), frame
        name, payload = lines[0][7:], strict_json(lines[1][6:])
        assert payload["type"] == name
        events.append((name, payload))
    return events


def check_grammar(events, finished=True):
    """The Anthropic event order: message_start, blocks one at a time (each with deltas of its
    kind), message_delta, message_stop; not finished: the same up to an error event instead."""
    names = [name for name, _ in events if name != "ping"]
    assert names[0] == "message_start"
    if finished:
        assert names[-2:] == ["message_delta", "message_stop"]
        assert [p for n, p in events if n == "message_delta"][-1]["delta"]["stop_reason"] \
            in STOP_REASONS
    else:
        assert names[-1] == "error" and "message_stop" not in names
    open_index, next_index, kinds = None, 0, {}
    for name, payload in events[1:]:
        if name == "content_block_start":
            assert open_index is None and payload["index"] == next_index
            kinds[next_index] = payload["content_block"]["type"]
            open_index, next_index = payload["index"], next_index + 1
        elif name == "content_block_delta":
            assert payload["index"] == open_index
            assert payload["delta"]["type"] in DELTAS_OF_BLOCK.get(kinds[open_index],
                                                                   (payload["delta"]["type"],))
        elif name == "content_block_stop":
            assert payload["index"] == open_index
            open_index = None
    assert open_index is None or not finished


# --- JSON of any shape: a known-good value with values anywhere in it replaced -----------------

ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats()
                        | st.text(max_size=6), lambda inner: st.lists(inner, max_size=2)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=2), max_leaves=4)


def json_paths(value, path=()):
    """The path of every value inside a JSON value: object keys and list indexes."""
    if path:
        yield path
    items = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, list) else ())
    for key, item in items:
        yield from json_paths(item, path + (key,))


def holds(place, key) -> bool:
    """Whether place (a dict or list, as the changes so far left it) has key."""
    if isinstance(place, list):
        return isinstance(key, int) and key < len(place)
    return isinstance(place, dict) and key in place


def changed_anywhere(data, value, most=3):
    """A copy of a JSON value with up to `most` values anywhere in it (drawn from hypothesis
    data) replaced by any JSON value: the shapes a provider or a user gets almost right."""
    value = json.loads(json.dumps(value))
    paths = list(json_paths(value))
    for path, new in data.draw(st.lists(st.tuples(st.sampled_from(paths), ANY_JSON),
                                        max_size=most)) if paths else ():
        place = value
        for key in path[:-1]:
            place = place[key] if holds(place, key) else None
        if holds(place, path[-1]):
            place[path[-1]] = new
    return value


class Reply:
    """A scripted answer: status, headers, and body given whole or as timed pieces."""

    def __init__(self, status=200, body=b"", headers=None, pieces=None, pause_before=None,
                 release=None, cut=False, delay=0.0, content_type="application/json",
                 close_after=False, hold_open=False):
        self.status = status
        self.body = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        self.headers = dict(headers or {})
        self.headers.setdefault("content-type", content_type)
        self.pieces = pieces            # list of bytes written as separate HTTP chunks
        self.pause_before = pause_before  # index of the piece to wait before
        self.release = release or threading.Event()
        self.cut = cut                  # end the connection without the final chunk
        self.delay = delay              # wait before the response head (or for the peer)
        self.close_after = close_after  # close the connection afterwards, without saying so
        self.hold_open = hold_open      # after the pieces, wait for release_end before ending
        self.release_end = threading.Event()


# What may follow each role in a Chat Completions conversation, as Mistral's validator
# (mistral_common's MistralRequestValidator) checks; a user message after tool messages too,
# which its API refused until 2026 (issue 17761 of BerriAI/litellm, code 3230).
MISTRAL_NEXT_ROLES = {"system": {"user", "assistant", "system"},
                      "user": {"assistant", "system", "user"},
                      "assistant": {"assistant", "user", "tool"}, "tool": {"assistant", "tool"}}


# The fields Mistral's API names (github.com/mistralai/client-python, docs/models, 2026-06-30):
# it answers any other 422 "Extra inputs are not permitted".
MISTRAL_FIELDS = {"model", "messages", "temperature", "top_p", "max_tokens", "stream", "stop",
                  "random_seed", "metadata", "response_format", "tools", "tool_choice",
                  "presence_penalty", "frequency_penalty", "n", "prediction",
                  "parallel_tool_calls", "reasoning_effort", "prompt_mode", "guardrails",
                  "prompt_cache_key", "safe_prompt"}
MISTRAL_MESSAGE_FIELDS = {"system": {"role", "content"}, "user": {"role", "content"},
                          "assistant": {"role", "content", "tool_calls", "prefix"},
                          "tool": {"role", "content", "tool_call_id", "name"}}


def mistral_problem(body) -> str | None:
    """What Mistral's API would refuse in this Chat Completions body, in its words, or None."""
    extra = sorted(set(body) - MISTRAL_FIELDS) + [
        "messages.%d.%s" % (index, key) for index, message in enumerate(body.get("messages", ()))
        for key in sorted(set(message) - MISTRAL_MESSAGE_FIELDS.get(message.get("role"), set()))]
    if extra:
        return "Extra inputs are not permitted: body.%s" % extra[0]
    return mistral_order_problem(body.get("messages", ()))


def mistral_order_problem(messages) -> str | None:
    """Mistral's words for what is wrong with the order of these messages, or None: a role
    after one it may not follow; a last message that is neither the user's nor a tool's."""
    roles = [m.get("role") for m in messages]
    for before, role in zip(roles, roles[1:]):
        if role not in MISTRAL_NEXT_ROLES.get(before, ()):
            return "Unexpected role '%s' after role '%s'" % (role, before)
    if roles and roles[-1] not in ("user", "tool"):
        return "Expected last role User or Tool for serving but got %s" % roles[-1]
    return None


def json_reply(body, status=200, **kw):
    return Reply(status, body, **kw)


def stream_reply(events=None, **kw):
    return Reply(200, pieces=list(events or anthropic_stream_events()),
                 content_type="text/event-stream", **kw)


class MockUpstream:
    """A provider on 127.0.0.1 that records every request and answers as scripted.

    `script` is a function (recorded request) -> Reply; `peer_closed` is set, with the time in
    `peer_closed_at`, when the proxy closes a connection the mock is holding open.
    """

    def __init__(self, tls=None):
        self.requests = []
        self.script = lambda request: json_reply(anthropic_message())
        self.peer_closed = threading.Event()
        self.peer_closed_at = None
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self.do_POST()

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                record = {"method": self.command, "path": self.path, "peer": self.client_address,
                          "headers": {k.lower(): v for k, v in self.headers.items()},
                          "body": body}
                try:
                    record["json"] = json.loads(body)
                except ValueError:
                    record["json"] = None
                upstream.requests.append(record)
                upstream.answer(self, upstream.script(record))

            def do_CONNECT(self):
                record = {"method": "CONNECT", "path": self.path,
                          "headers": {k.lower(): v for k, v in self.headers.items()},
                          "body": b"", "json": None}
                upstream.requests.append(record)
                upstream.answer(self, upstream.script(record))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        if tls is not None:                       # (certificate file, key file)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.url = self.url.replace("http:", "https:")
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def wait_for_peer_close(self, sock, seconds):
        """Hold the connection until the proxy closes it (recorded) or seconds pass."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                try:
                    data = sock.recv(1, socket.MSG_PEEK)
                except OSError:
                    data = b""
                if not data:
                    self.peer_closed_at = time.monotonic()
                    self.peer_closed.set()
                    return True
        return False

    def pause(self, handler, release, seconds=10.0):
        """Hold the stream until released; True when the proxy closed the connection meanwhile."""
        handler.wfile.flush()
        deadline = time.monotonic() + seconds
        while not release.is_set() and time.monotonic() < deadline:
            if self.wait_for_peer_close(handler.connection, 0.05):
                return True
        return False

    def answer(self, handler, reply: Reply):
        if reply.delay:
            if self.wait_for_peer_close(handler.connection, reply.delay):
                handler.close_connection = True
                return
        handler.send_response(reply.status)
        for name, value in reply.headers.items():
            handler.send_header(name, value)
        if reply.pieces is None:
            handler.send_header("content-length", str(len(reply.body)))
            handler.end_headers()
            handler.wfile.write(reply.body)
            handler.close_connection = reply.close_after
            return
        handler.send_header("transfer-encoding", "chunked")
        handler.end_headers()
        handler.close_connection = reply.cut or reply.close_after or reply.pause_before is not None
        try:
            for index, piece in enumerate(reply.pieces):
                if index == reply.pause_before and self.pause(handler, reply.release):
                    return
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                handler.wfile.flush()
            if reply.hold_open and self.pause(handler, reply.release_end):
                return
            if not reply.cut:
                handler.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.peer_closed_at = time.monotonic()
            self.peer_closed.set()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class RawProvider:
    """A provider on 127.0.0.1 that hands each connection to answer(connection, request head),
    over TLS when given a certificate: for what MockUpstream cannot script (an answer that
    trickles in, a broken head, a request never read). With read_request false the request is
    left unread, and the socket takes in little (a small receive buffer)."""

    def __init__(self, answer, tls=None, read_request=True):
        self._answer, self._read_request = answer, read_request
        self._listener = socket.socket()
        if not read_request:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self._context = None
        if tls is not None:
            self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._context.load_cert_chain(*tls)
        self.url = "%s://127.0.0.1:%d" % ("https" if tls else "http",
                                          self._listener.getsockname()[1])
        self.connections = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self.connections.append(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection):
        try:
            if self._context is not None:
                connection = self._context.wrap_socket(connection, server_side=True)
            request = read_request(connection) if self._read_request else b""
            self._answer(connection, request)
        except OSError:
            pass
        finally:
            connection.close()

    def close(self):
        self._listener.close()
        for connection in self.connections:
            connection.close()


def read_request(connection) -> bytes:
    """A request's head and its Content-Length body, read from a provider's connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += connection.recv(65536)
    return head


HELD_PORTS = []          # sockets bound and never listening: connections to them are refused


def dead_url():
    """An http URL on 127.0.0.1 where nothing listens (connections are refused). Its port stays
    bound, not listening, so no server that starts meanwhile (a test run beside this one) can
    take it."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    HELD_PORTS.append(probe)
    return "http://127.0.0.1:%d" % probe.getsockname()[1]


class RunningProxy:
    """ccproxy serving on 127.0.0.1 from a thread of this process."""

    def __init__(self, config):
        self.server = ccproxy.ProxyServer(config)
        ready = threading.Event()
        self.error = None

        def run():
            try:
                asyncio.run(self.server.serve(on_ready=lambda s: ready.set()))
            except BaseException as exc:   # surfaced by the fixture, never swallowed
                self.error = exc
                ready.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10), "proxy did not start"
        assert self.error is None, self.error
        self.url = self.server.url
        self.port = self.server.app.listen_address[1]

    def stop(self):
        self.server.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "proxy did not stop"


def anthropic_provider(upstream, **extra):
    provider = {"name": "anthropic", "api_base_url": upstream.url, "api_key": PROVIDER_KEY}
    provider.update(extra)
    return provider


def raw_exchange(port, data: bytes, timeout=5.0, host="127.0.0.1") -> bytes:
    """Send bytes on a fresh connection and read until the server closes it."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


STREAM_BODY = b'{"model":"m","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"x"}]}'


def open_stream(port, until=b"text_delta", body=STREAM_BODY):
    """A streamed request on a raw HTTP/1.0 socket; (socket, bytes received once `until` came,
    `until` being bytes to wait for or a test of what was received)."""
    arrived = until if callable(until) else (lambda received: until in received)
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(b"POST /v1/messages HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    received = b""
    while not arrived(received):
        received += sock.recv(65536)
    return sock, received


def read_to_end(sock, received=b""):
    """received plus everything else the server sends until it closes the connection."""
    while True:
        data = sock.recv(65536)
        if not data:
            return received
        received += data


def traced_by_ccproxy() -> int:
    """Bytes of live allocations made by ccproxy's code, on any thread of this process (while
    tracemalloc traces, with enough frames to reach ccproxy's)."""
    gc.collect()
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(True, ccproxy.__file__, all_frames=True)])
    return sum(stat.size for stat in snapshot.statistics("filename"))


def wait_until(condition, seconds=5.0, interval=0.02):
    """Poll condition() until it is true or the deadline passes; returns its last value."""
    deadline = time.monotonic() + seconds
    value = condition()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = condition()
    return value



def sdk(proxy, key="client-key-not-for-upstream", **options) -> anthropic.Anthropic:
    """The one client of the tests: the official anthropic SDK, pointed at a running proxy,
    with no retries of its own."""
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, max_retries=0, **options)


CLAUDE_CODE_VERSIONS = ["2.1.197", "2.1.330"]   # the two seen to send different requests
CACHE = Path(os.environ.get("CCPROXY_TEST_CACHE", Path.home() / ".cache" / "ccproxy-tests"))


def installed_claude(version: str) -> Path:
    """node_modules/.bin/claude of that version, installed once into the cache folder."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed, so the real Claude Code CLI cannot be installed")
    folder = CACHE / ("claude-code-" + version)
    claude = folder / "node_modules" / ".bin" / "claude"
    if not claude.exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "package.json").write_text('{"name": "cc-cache", "private": true}')
        result = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error",
                                 "@anthropic-ai/claude-code@" + version], cwd=folder,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
    return claude


def capture_claude_code(version: str, folder: Path, prompt: str = "hi", env=None) -> list:
    """The requests a real Claude Code sends in one headless run (`claude -p prompt`) against a
    mock Anthropic API that answers every request with a short text: [{headers, json, path}].
    Claude Code's own text stays in memory, for the test that reads it; nothing is stored."""
    claude = installed_claude(version)
    mock = MockUpstream()
    mock.script = lambda r: stream_reply() if (r["json"] or {}).get("stream") else json_reply(
        anthropic_message())
    home = folder / "home"
    home.mkdir(parents=True, exist_ok=True)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE"))}
    environ.update(HOME=str(home), ANTHROPIC_BASE_URL=mock.url, ANTHROPIC_AUTH_TOKEN="capture",
                   DISABLE_TELEMETRY="1", CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
                   DISABLE_AUTOUPDATER="1", CLAUDE_CODE_MAX_RETRIES="0", **(env or {}))
    try:
        result = subprocess.run([str(claude), "-p", prompt, "--output-format", "json"],
                                cwd=str(folder), env=environ, capture_output=True, text=True,
                                timeout=300, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, (result.stdout[-1000:], result.stderr[-1000:])
        return [r for r in mock.requests if r["method"] == "POST" and r["json"]]
    finally:
        mock.close()


def without_cache_marks(value):
    """value without cache_control anywhere (Claude Code moves its marks between turns)."""
    if isinstance(value, dict):
        return {k: without_cache_marks(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [without_cache_marks(v) for v in value]
    return value


def answer_of(client, stream: bool, **request):
    """The message a request gets, asked streamed (assembled from the events) or whole."""
    if stream:
        with client.messages.stream(**request) as events:
            return events.get_final_message()
    return client.messages.create(**request)


def browser() -> str:
    """The headless Chromium the browser tests drive; the test skips, saying why, without it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser") or \
        shutil.which("google-chrome")
    if found is None:
        pytest.skip("no headless Chromium here (Debian: apt-get install chromium)")
    return found


def render(url: str, *extra) -> str:
    """The page's DOM once its script has run (a virtual 3 s), from headless Chromium."""
    output = list(extra) or ["--dump-dom"]
    result = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu",
                             "--virtual-time-budget=3000", *output, url],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@contextlib.contextmanager
def page_server(pages: dict, visits: list = None):
    """A loopback web server for the browser tests, serving path -> (body, content type) and
    appending each path asked for to visits; yields its port."""
    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            (visits if visits is not None else []).append(self.path)
            body, kind = pages.get(self.path, (b"", "text/plain"))
            self.send_response(200)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def ipv6_loopback_available() -> bool:
    """Whether this machine can bind ::1 (some containers have no IPv6)."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False
