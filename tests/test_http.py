"""HTTP/1.1: the sans-IO head parser and the connection loop over real sockets."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import time

import pytest
from hypothesis import example, given, settings, strategies as st

import ccproxy
from helpers import (anthropic_message, anthropic_provider, json_reply, MockUpstream, raw_exchange,
                     read_to_end, RunningProxy, stream_reply)

parse = ccproxy.parse_request_head


def test_parses_request_line_headers_and_query():
    request = parse(b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    assert (request.method, request.path, request.query) == ("POST", "/v1/messages", "beta=true")
    assert request.headers.get("HOST") == "x"
    assert request.headers.get_all("X-A") == ["1", "2"]
    assert request.headers.get("x-b") is None


def test_leading_empty_lines_are_ignored_and_trailing_slash_dropped():
    assert parse(b"\r\nGET /health/ HTTP/1.1\r\n\r\n").path == "/health"


def test_an_http2_client_is_told_ccproxy_speaks_http_1_1(proxy):
    """The HTTP/2 connection preface (a client with prior knowledge) gets a 400 that says so."""
    reply = raw_exchange(proxy.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    status, body = error_of(reply)
    assert status == 400 and "ccproxy speaks HTTP/1.1" in body["error"]["message"]


def test_absolute_form_target_becomes_its_path():
    assert parse(b"GET http://127.0.0.1:3456/status?x=1 HTTP/1.1\r\n\r\n").path == "/status"


@pytest.mark.parametrize("head", [
    b"GET /health\r\n\r\n",                              # no version
    b"GET  /health HTTP/1.1\r\n\r\n",                    # two spaces
    b"GET /health HTTP/2.0\r\n\r\n",                     # not HTTP/1.x
    b"G(T /health HTTP/1.1\r\n\r\n",                     # not a token
    b"GET health HTTP/1.1\r\n\r\n",                      # not a path
    b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",               # space before colon
    b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",        # obsolete folding
    b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
    b"\xff\xfe / HTTP/1.1\r\n\r\n",
])
def test_malformed_heads_are_invalid_requests(head):
    with pytest.raises(ccproxy.InvalidRequestError):
        parse(head)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parser_raises_only_invalid_request_on_any_bytes(data):
    try:
        parse(data + b"\r\n\r\n")
    except ccproxy.InvalidRequestError:
        pass


@pytest.mark.parametrize("headers, expected", [
    ([], 0),
    ([("content-length", "12")], 12),
    ([("content-length", "12, 12")], 12),
    ([("transfer-encoding", "chunked")], ccproxy.CHUNKED),
    ([("transfer-encoding", "\tChunked ")], ccproxy.CHUNKED),
    ([("content-length", " 12\t")], 12),
])
def test_body_framing(headers, expected):
    assert ccproxy.parse_body_framing(ccproxy.Headers(headers)) == expected


@pytest.mark.parametrize("headers", [
    [("content-length", "12"), ("transfer-encoding", "chunked")],
    [("content-length", "12"), ("content-length", "13")],
    [("content-length", "-1")],
    [("content-length", "1e3")],
    [("transfer-encoding", "gzip, chunked")],
    [("transfer-encoding", "chunked\x0b")],      # only spaces and tabs are trimmed: a proxy in
    [("content-length", "12\x0c")],              # front may have framed these otherwise
])
def test_ambiguous_framing_is_rejected(headers):
    with pytest.raises(ccproxy.InvalidRequestError):
        ccproxy.parse_body_framing(ccproxy.Headers(headers))


def test_chunk_size_lines():
    assert ccproxy.parse_chunk_size(b"1a") == 26
    assert ccproxy.parse_chunk_size(b"A;name=value") == 10
    for bad in (b"", b"zz", b"-1", b"1" * 16):
        with pytest.raises(ccproxy.InvalidRequestError):
            ccproxy.parse_chunk_size(bad)


@pytest.mark.parametrize("pieces", [1, 4097], ids=["whole", "byte-by-byte"])
def test_a_chunk_line_past_4_kb_is_refused_however_it_arrives(pieces):
    """A chunk's size line (or a trailer line) may run to 4 KB of extensions; a longer one is
    refused, whole or a byte at a time. One that trickles in is searched again at every byte:
    the bound keeps that linear enough (at 64 KB it held the event loop for over a second)."""
    fine = ccproxy.ChunkedDecoder()
    assert fine.feed(b"2;" + b"x" * 4000 + b"\r\nab\r\n0\r\n\r\n") == b"ab" and fine.done
    line = b"2;" + b"x" * 4200 + b"\r\nab\r\n"
    decoder = ccproxy.ChunkedDecoder()
    with pytest.raises(ccproxy.InvalidRequestError, match="chunk line too long"):
        for start in range(0, len(line), len(line) // pieces or 1):
            decoder.feed(line[start:start + (len(line) // pieces or 1)])


def read_response(sock_file):
    """One response from a socket file: (status, headers dict, body)."""
    status_line = sock_file.readline()
    status = int(status_line.split()[1])
    headers = {}
    while True:
        line = sock_file.readline().rstrip(b"\r\n")
        if not line:
            break
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = sock_file.read(int(headers.get("content-length", 0)))
    return status, headers, body


def test_keep_alive_serves_several_requests_on_one_connection(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        stream = sock.makefile("rb")
        for path in (b"/health", b"/status", b"/health"):
            sock.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path)
            status, headers, body = read_response(stream)
            assert status == 200 and json.loads(body)["version"] == ccproxy.__version__
            assert "connection" not in headers


def test_pipelined_requests_are_answered_in_order(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\n")
        stream = sock.makefile("rb")
        assert read_response(stream)[0] == 200
        assert read_response(stream)[0] == 404


def test_connection_close_is_honoured(proxy):
    reply = raw_exchange(proxy.port, b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200") and b"connection: close" in reply.lower()


def test_http10_closes_unless_keep_alive(proxy):
    reply = raw_exchange(proxy.port, b"GET /health HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")


def test_a_stream_to_an_http10_client_ends_with_its_connection_even_if_kept_alive(proxy,
                                                                                   upstream):
    """HTTP/1.0 has no chunked bodies: a stream's end is the connection's, so the connection
    closes after it even when the client asked to keep it (it had waited for the idle
    time-out, never knowing the answer was over)."""
    upstream.script = lambda request: stream_reply()
    body = b'{"model":"m","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"x"}]}'
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.0\r\nConnection: keep-alive\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        reply = read_to_end(sock)            # a socket.timeout here: the connection stayed open
    head, _, events = reply.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower() and b"transfer-encoding" not in head.lower()
    assert events.endswith(b'event: message_stop\ndata: {"type": "message_stop"}\n\n')


def test_a_later_http_1_is_read_as_http_1_1(proxy, upstream):
    """HTTP/1.9 is answered as HTTP/1.1 is (RFC 9110 §2.5): kept alive, its stream chunked."""
    upstream.script = lambda request: stream_reply()
    assert parse(b"GET / HTTP/1.9\r\n\r\n").version == "HTTP/1.1"
    body = b'{"model":"m","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"x"}]}'
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.9\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body) + b"GET /health HTTP/1.9\r\nConnection: close\r\n\r\n")
        reply = read_to_end(sock)
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower() and b"connection:" not in head.lower()
    assert b"message_stop" in rest and b"\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n" in rest


def test_head_has_headers_but_no_body(proxy):
    reply = raw_exchange(proxy.port, b"HEAD / HTTP/1.1\r\nConnection: close\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-length:" in head.lower()
    assert body == b""


def post(path, body, extra=b""):
    return b"POST %s HTTP/1.1\r\nConnection: close\r\n%sContent-Length: %d\r\n\r\n%s" % (
        path, extra, len(body), body)


def test_chunked_request_body_is_decoded(proxy, upstream):
    body = b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"chunked"}]}'
    chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(body[i:i + 10]), body[i:i + 10])
                      for i in range(0, len(body), 10))
    reply = raw_exchange(proxy.port, b"POST /v1/messages HTTP/1.1\r\nConnection: close\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\nX-Trailer: 1\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")
    assert upstream.requests[0]["body"] == body


def test_expect_100_continue_gets_an_interim_response(proxy, upstream):
    body = b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert read_response(sock.makefile("rb"))[0] == 200


def error_of(reply: bytes):
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_header_block_over_64k_is_431(proxy):
    reply = raw_exchange(proxy.port, b"GET /health HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n")
    status, body = error_of(reply)
    assert status == 431 and body["type"] == "error"


def test_body_over_the_limit_is_413_without_reading_it(start_proxy):
    proxy = start_proxy({"performance": {"max_request_body_size": 100}})
    reply = raw_exchange(proxy.port, b"POST /v1/messages HTTP/1.1\r\nContent-Length: 101\r\n\r\n")
    status, body = error_of(reply)
    assert status == 413 and body["error"]["type"] == "request_too_large"


def test_chunked_body_over_the_limit_is_413(start_proxy):
    proxy = start_proxy({"performance": {"max_request_body_size": 100}})
    chunk = b"x" * 60
    reply = raw_exchange(proxy.port, b"POST /v1/messages HTTP/1.1\r\nTransfer-Encoding: chunked"
                         b"\r\n\r\n" + (b"3c\r\n%s\r\n" % chunk) * 2 + b"0\r\n\r\n")
    status, body = error_of(reply)
    assert status == 413 and body["error"]["type"] == "request_too_large"


def test_malformed_request_gets_400_and_the_connection_closes(proxy):
    reply = raw_exchange(proxy.port, b"BROKEN\r\n\r\nGET /health HTTP/1.1\r\n\r\n")
    status, body = error_of(reply)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert reply.count(b"HTTP/1.1") == 1 and b"connection: close" in reply.lower()


def test_bad_chunk_framing_gets_400(proxy):
    reply = raw_exchange(proxy.port, b"POST /v1/messages HTTP/1.1\r\nTransfer-Encoding: chunked"
                         b"\r\n\r\nzz\r\n")
    assert error_of(reply)[0] == 400


def test_slow_header_is_cut_by_the_header_timeout(start_proxy):
    proxy = start_proxy({"performance": {"header_timeout": "200ms"}})
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost")
        reply = sock.makefile("rb").read()          # returns once the server closes
    assert reply.startswith(b"HTTP/1.1 408")


def test_a_tls_client_on_the_plain_http_port_fails_at_once_and_is_named_in_the_log(start_proxy,
                                                                                  ccproxy_log):
    """A client given https:// for the proxy: its handshake fails on the proxy's plain answer
    at once (not after the header timeout), the log says what to change, once."""
    proxy = start_proxy({"performance": {"header_timeout": "60s"}})
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            started = time.monotonic()
            with pytest.raises((ssl.SSLError, ConnectionError)):
                context.wrap_socket(sock).close()
            assert time.monotonic() - started < 10
    warnings = [message for message in ccproxy_log if "TLS handshake" in message]
    assert len(warnings) == 1 and "give clients http://, not https://" in warnings[0]
    assert raw_exchange(proxy.port, b"GET /health HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01\x00\x05hello")
        assert b"use http://, not https://" in sock.makefile("rb").read()


def test_a_head_of_bare_line_feeds_gets_a_400_at_once_saying_to_use_crlf(start_proxy):
    """Hand-typed requests (nc sends a bare LF per line): a 400 that says what to change, at
    once rather than after the header timeout, whether the head comes in one piece or a line
    at a time; CRLF heads split anywhere, with blank lines in their bodies, are still served."""
    proxy = start_proxy({"performance": {"header_timeout": "60s"}})
    lines = [b"GET /health HTTP/1.1\n", b"Host: 127.0.0.1\n", b"\n"]
    for pieces in ([b"".join(lines)], lines, [b"GET /health HTTP/1.1\r\n\n"]):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            for piece in pieces:
                sock.sendall(piece)
                time.sleep(0.05)                    # one packet per line, as typed
            status, body = error_of(sock.makefile("rb").read())
        assert status == 400 and "must end in CRLF" in body["error"]["message"]
    head = b"POST /v1/messages/count_tokens HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "a"}]},
                      indent=1).replace("\n", "\n\n").encode()
    whole = head % len(body) + body
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        for cut in (whole.index(b"\r\n\r\n") + 1, whole.index(b"\r\n\r\n") + 3):
            sock.sendall(whole[:cut])
            time.sleep(0.05)
            sock.sendall(whole[cut:])
            assert read_response(sock.makefile("rb"))[0] == 200


def test_idle_keep_alive_connection_is_closed(start_proxy):
    proxy = start_proxy({"performance": {"keepalive_timeout": "200ms"}})
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n\r\n")
        stream = sock.makefile("rb")
        assert read_response(stream)[0] == 200
        assert stream.read() == b""                 # EOF: the server closed the idle connection


def test_server_keeps_serving_after_garbage_from_other_clients(proxy):
    for garbage in (b"\x00\x01\x02\r\n\r\n", b"GET / HTTP/1.1\r\nX\r\n\r\n", b"GET\r\n\r\n"):
        raw_exchange(proxy.port, garbage)
    assert raw_exchange(proxy.port, b"GET /health HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200")


def test_invalid_json_body_is_400(proxy, upstream):
    for body in (b"{not json", b"[1,2]", b"[" * 100000, b"\xff\xfe"):
        status, error = error_of(raw_exchange(proxy.port, post(b"/v1/messages", body)))
        assert status == 400 and error["error"]["type"] == "invalid_request_error"
    assert upstream.requests == []


def test_an_error_answer_to_a_bodiless_request_keeps_the_connection(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        stream = sock.makefile("rb")
        for _ in range(2):
            sock.sendall(b"GET /nope HTTP/1.1\r\n\r\n")
            status, headers, _ = read_response(stream)
            assert status == 404 and "connection" not in headers
        sock.sendall(b"GET /health HTTP/1.1\r\n\r\n")
        assert read_response(stream)[0] == 200


def test_an_error_answer_before_a_body_is_read_closes_the_connection(start_proxy):
    proxy = start_proxy({"security": {"allowed_ips": ["127.0.0.99/32"]}})
    reply = raw_exchange(proxy.port, b"POST /v1/messages HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
                         b"GET /health HTTP/1.1\r\n\r\n")
    assert reply.count(b"HTTP/1.1 ") == 1 and b"connection: close" in reply.lower()


@pytest.mark.parametrize("config, extra_head", [
    ({"performance": {"max_request_body_size": 1000}}, b""),               # 413
    ({"apikey": "the-proxy-key-0123456789"}, b"x-api-key: wrong\r\n"),      # 401
])
def test_an_early_answer_reaches_a_client_still_sending_its_body(start_proxy, config, extra_head):
    """An answer given before the body is read had been followed by a close with the body
    unread: the kernel then resets the connection, and the reset took the answer with it (0 of
    10 here; Node's fetch, as Claude Code's, said 'write ECONNRESET', never 413). Now the rest
    of the request is read and dropped before the close."""
    proxy = start_proxy(config)
    body = b"x" * 4000000
    for _ in range(3):
        reply = raw_exchange(proxy.port, b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Content-Length: %d\r\n%s\r\n%s" % (len(body), extra_head, body))
        assert error_of(reply)[0] in (401, 413) and b"connection: close" in reply.lower()


def test_the_rest_of_an_early_answered_request_is_read_for_a_while_only(start_proxy):
    """The answer ends (the client reads its end at once) while the client goes on sending;
    the connection is closed LINGER_SECONDS later, however much is still to come."""
    proxy = start_proxy({"performance": {"max_request_body_size": 1000}})
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nContent-Length: 99999999\r\n\r\nxx")
        reply = b""
        while not reply.endswith(b"}"):
            reply += sock.recv(65536)
        assert error_of(reply)[0] == 413 and sock.recv(65536) == b""      # the answer's end
        answered = time.monotonic()
        with pytest.raises(OSError):
            while time.monotonic() - answered < 8:
                sock.sendall(b"x" * 1000)
                time.sleep(0.05)
    assert ccproxy.LINGER_SECONDS <= time.monotonic() - answered < ccproxy.LINGER_SECONDS + 3


# --- decoders fed whatever a socket read returns -----------------------------------------------

def split_at(data: bytes, cuts) -> list:
    """data cut at the given positions (sorted, deduplicated)."""
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=8),
       st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_chunked_bodies_decode_the_same_however_the_reads_fall(chunks, cuts):
    wire = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    decoder = ccproxy.ChunkedDecoder()
    body = b"".join(decoder.feed(piece) for piece in split_at(wire, cuts))
    assert (body, decoder.done) == (b"".join(chunks), True)


SSE_PIECES = st.sampled_from([b"data: {\"a\":1}\n\n", b"data: x\r\n\r\n", b": comment\n\n",
                              b"event: error\ndata: y\n\n", b"data: 1\ndata: 2\n\n",
                              b"data:tight\n\n", b"data: \xc3\xa9\n\n", b"data: [DONE]\n\n",
                              b"data: a\rb\n\n", b"data: \n\n", b"xdata: z\n\n", b"data: w\r\n\n"])


@settings(max_examples=300, deadline=None)
@given(st.lists(SSE_PIECES, min_size=1, max_size=10),
       st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_event_streams_decode_the_same_however_the_reads_fall(pieces, cuts):
    stream = b"".join(pieces)
    one_byte_at_a_time = ccproxy.SSEDecoder()
    expected = [e for i in range(len(stream)) for e in one_byte_at_a_time.feed(stream[i:i + 1])]
    decoder = ccproxy.SSEDecoder()
    assert [e for piece in split_at(stream, cuts) for e in decoder.feed(piece)] == expected
    assert len(expected) == sum(not p.startswith((b":", b"x")) for p in pieces)


def test_a_deadline_fires_once_after_its_latest_setting_and_never_once_cleared():
    async def scenario():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda loop, context: errors.append(context))
        fired = []
        deadline = ccproxy.Deadline(loop, lambda: fired.append(loop.time()))
        start = loop.time()
        deadline.set(0.1)
        await asyncio.sleep(0.05)
        deadline.set(0.1)                          # moved later: the same timer moves itself on
        await asyncio.sleep(0.2)                   # (loop timers run in time order)
        assert len(fired) == 1 and fired[0] - start >= 0.15
        deadline.set(0.05)
        deadline.clear()                           # for good: set() no longer arms it
        deadline.set(0.01)
        await asyncio.sleep(0.1)
        assert len(fired) == 1
        deadline = ccproxy.Deadline(loop, lambda: fired.append(loop.time()))
        deadline.set(5.0)
        deadline.set(0.01)                         # moved earlier: a new timer
        await asyncio.sleep(0.1)
        assert len(fired) == 2
        deadline.set(0.01)
        deadline.pause()                           # lapses without a call
        await asyncio.sleep(0.05)
        assert len(fired) == 2 and not errors
    asyncio.run(scenario())


# --- any request, framed so the client can tell where each answer ends ------------------------

def framed_answers(data: bytes, first_is_head: bool) -> list:
    """The answers in what a connection received until it closed, each as (status, head,
    body): interim 100s skipped; a body framed by content-length, chunked, or (only the last,
    which must say connection: close) by the close itself. Raises AssertionError otherwise."""
    answers = []
    while data:
        head, separator, data = data.partition(b"\r\n\r\n")
        assert separator and head.startswith(b"HTTP/1.1 "), head[:80]
        status, fields = int(head.split()[1]), head.lower()
        if status == 100:
            continue
        length = re.search(rb"\r\ncontent-length: (\d+)", fields)
        if first_is_head and not answers:
            body = b""
        elif length:
            body, data = data[:int(length.group(1))], data[int(length.group(1)):]
        elif b"\r\ntransfer-encoding: chunked" in fields:
            body, data = unchunked(data)
        else:
            assert b"\r\nconnection: close" in fields, "an answer the client cannot see end"
            body, data = data, b""
        answers.append((status, fields, body))
    return answers


def unchunked(data: bytes) -> tuple:
    body = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        body, data = body + data[:size], data[size + 2:]
        if size == 0:
            return body, data


@pytest.fixture(scope="module")
def framing_proxy():
    upstream = MockUpstream()
    upstream.script = lambda request: stream_reply() if (request["json"] or {}).get("stream") \
        else json_reply(anthropic_message())
    config = ccproxy.build_config({"port": 0, "providers": [anthropic_provider(upstream)]},
                                  "c.json", {})
    proxy = RunningProxy(config)
    yield proxy
    proxy.stop()
    upstream.close()


@settings(max_examples=300, deadline=None)
@example(method="POST", path="/v1/messages", version="HTTP/1.0",       # a stream HTTP/1.0 cannot
         connection="Connection: keep-alive\r\n", expect=False,       # frame: it once stayed
         framing="length", stream=True, body_end=None)                  # open after its end
@given(method=st.sampled_from(["POST", "POST", "POST", "GET", "HEAD", "PUT"]),
       path=st.sampled_from(["/v1/messages", "/v1/messages", "/v1/messages/count_tokens",
                             "/health", "/", "/x"]),
       version=st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/1.2"]),
       connection=st.sampled_from(["", "Connection: close\r\n", "Connection: keep-alive\r\n"]),
       expect=st.booleans(), framing=st.sampled_from(["length", "chunked", "none", "short"]),
       stream=st.booleans(), body_end=st.none() | st.integers(0, 100))
def test_every_answer_is_framed_so_the_client_sees_it_end(framing_proxy, method, path, version,
                                                          connection, expect, framing, stream,
                                                          body_end):
    """Whatever a client sends, then a request that asks to close: each answer ends where its
    client can see (its length, its chunks, or the connection's close announced), every
    error is Anthropic's JSON, none a 500, and the connection closes, never left hanging."""
    body = json.dumps({"model": "m", "max_tokens": 5, "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    body = body[:body_end]                        # (all of it when body_end is None)
    head = "%s %s %s\r\n%s%s" % (method, path, version, connection,
                                 "Expect: 100-continue\r\n" if expect else "")
    if framing == "chunked":
        head, body = head + "Transfer-Encoding: chunked\r\n", b"%x\r\n%s\r\n0\r\n\r\n" % (
            len(body), body) if body else b"0\r\n\r\n"
    elif framing in ("length", "short"):
        head += "Content-Length: %d\r\n" % max(len(body) - (framing == "short"), 0)
    then = b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", framing_proxy.port), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n" + body + then)
        received = read_to_end(sock)              # a socket.timeout: left hanging
    answers = framed_answers(received, method == "HEAD")
    assert answers and all(status != 500 for status, _, _ in answers)
    for status, fields, answer in answers:
        if status >= 400 and answer:
            error = json.loads(answer)
            assert error["type"] == "error" and error["error"]["message"]
    framed_exactly = framing in ("length", "chunked") or not body    # else the rest is junk
    if framed_exactly and b"\r\nconnection: close" not in answers[0][1]:
        assert answers[-1][0] == 200 and b'"status"' in answers[-1][2]   # /health came too
