"""Upstream: reaching providers, connections kept and replaced, calls cut when their client
leaves, silence and refusals as errors, proxy variables, the worker inbox."""
from __future__ import annotations

import asyncio
import gc
import http.client
import io
import json
import re
import socket
import struct
import threading
import time
import tracemalloc
import urllib.request
import weakref

import anthropic
import pytest
from hypothesis import given, settings, strategies as st

import ccproxy
from helpers import (answer_of, anthropic_message, anthropic_provider, anthropic_stream_events,
                     json_reply, MockUpstream, open_stream, PROVIDER_KEY, raw_exchange, RawProvider,
                     read_to_end, Reply, sdk, stream_reply, traced_by_ccproxy, wait_until)


def test_unreachable_upstream_is_a_final_502_naming_the_provider_and_the_key(start_proxy,
                                                                               ccproxy_log):
    with socket.socket() as probe:                  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    proxy = start_proxy({"providers": [{"name": "anthropic", "api_key": PROVIDER_KEY,
                                        "api_base_url": "http://127.0.0.1:%d" % dead_port}]})
    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk(proxy).messages.create(model="m", max_tokens=5,
                                   messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502
    message = caught.value.body["error"]["message"]
    assert message.startswith("anthropic cannot be reached; check providers[0].api_base_url in "
                              "test-config.json and that its server runs (anthropic: cannot reach "
                              "http://127.0.0.1:%d/v1/messages" % dead_port)
    assert "refused" in message.lower()
    assert caught.value.response.headers["x-should-retry"] == "false"
    # the default log (request logging off) has one warning line for the failed call
    failed = [line for line in ccproxy_log if "upstream call failed" in line]
    assert len(failed) == 1 and failed[0].startswith(
        "upstream call failed: provider=anthropic model=m status=502: anthropic cannot be "
        "reached; check providers[0].api_base_url")


def test_silent_upstream_is_504(start_proxy, upstream):
    proxy = start_proxy({"providers": [anthropic_provider(upstream)],
                         "performance": {"request_timeout": "300ms"}})
    upstream.script = lambda r: json_reply(anthropic_message(), delay=5)
    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk(proxy).messages.create(model="m", max_tokens=5,
                                   messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 504
    assert caught.value.body["error"]["type"] == "timeout_error"


def test_upstream_silent_mid_stream_ends_with_timeout_error_event(start_proxy, upstream):
    proxy = start_proxy({"providers": [anthropic_provider(upstream)],
                         "performance": {"request_timeout": "300ms"}})
    upstream.script = lambda r: stream_reply(pause_before=3)
    with pytest.raises(anthropic.APIStatusError) as caught:
        with sdk(proxy).messages.stream(model="m", max_tokens=5,
                                        messages=[{"role": "user", "content": "hi"}]) as s:
            for _ in s:
                pass
    assert "sent nothing for 0.3 s" in str(caught.value)


# --- time-outs: kept by the kernel on plain sockets (Linux), by Python over TLS ---------------

def message_in_pieces(pieces: int):
    """An Anthropic message's JSON answer: its head, and its body cut in `pieces` parts."""
    body = json.dumps(anthropic_message("trickled")).encode()
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % (
        len(body))
    step = -(-len(body) // pieces)
    return head, [body[n:n + step] for n in range(0, len(body), step)]


@pytest.fixture
def timed_proxy(start_proxy, certificate, monkeypatch):
    """timed_proxy(answer, tls, **options) -> (proxy, kernel_timed): ccproxy with a
    request_timeout of 0.3 s before a RawProvider running answer (over TLS when tls), and the
    connections made with the kernel keeping their time-outs (a list, filled as they are)."""
    monkeypatch.setenv("SSL_CERT_FILE", certificate[0])
    kernel_timed, providers = [], []
    original = ccproxy.kernel_timed_connection

    def counted(*args):
        kernel_timed.append(args)
        return original(*args)
    monkeypatch.setattr(ccproxy, "kernel_timed_connection", counted)

    def start(answer, tls, **options):
        providers.append(RawProvider(answer, tls=certificate if tls else None, **options))
        return start_proxy({"providers": [anthropic_provider(providers[-1])],
                            "performance": {"request_timeout": "300ms"}}), kernel_timed
    yield start
    for provider in providers:
        provider.close()


def kernel_timed_for(tls: bool) -> int:
    """Connections one call makes with the kernel keeping their time-outs: plain ones, on
    Linux."""
    return 0 if tls or not ccproxy.KERNEL_TIMES_SOCKETS else 1


@pytest.mark.parametrize("tls", [False, True])
def test_an_answer_that_trickles_in_slower_than_the_time_out_in_all_arrives_whole(
        timed_proxy, tls):
    """request_timeout is the longest silence, not the longest answer: a body whose pieces
    come 0.15 s apart takes 0.9 s, three time-outs, and arrives whole, over a plain socket
    (timed by the kernel on Linux) as over TLS (timed by Python)."""
    head, pieces = message_in_pieces(6)

    def trickle(connection, request):
        connection.sendall(head)
        for piece in pieces:
            time.sleep(0.15)
            connection.sendall(piece)
        time.sleep(1)
    proxy, kernel_timed = timed_proxy(trickle, tls)
    started = time.monotonic()
    message = sdk(proxy).messages.create(model="m", max_tokens=5,
                                         messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text == "trickled"
    assert time.monotonic() - started >= 0.9
    assert len(kernel_timed) == kernel_timed_for(tls)


@pytest.mark.parametrize("tls", [False, True])
def test_an_answer_that_stops_halfway_is_a_timeout_after_one_silence(timed_proxy, tls):
    head, pieces = message_in_pieces(2)

    def stop_halfway(connection, request):
        connection.sendall(head + pieces[0])
        time.sleep(3)
    proxy, kernel_timed = timed_proxy(stop_halfway, tls)
    started = time.monotonic()
    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk(proxy).messages.create(model="m", max_tokens=5,
                                   messages=[{"role": "user", "content": "hi"}])
    assert 0.3 <= time.monotonic() - started < 2.5
    assert caught.value.status_code == 504
    assert caught.value.body["error"]["type"] == "timeout_error"
    assert "the provider sent nothing for 0.3 s" in caught.value.body["error"]["message"]
    assert len(kernel_timed) == kernel_timed_for(tls)


@pytest.mark.parametrize("tls", [False, True])
def test_a_provider_that_stops_reading_the_request_is_a_timeout(timed_proxy, tls):
    """A request of 16 MB to a provider that reads none of it: the send stalls once the
    sockets' buffers are full, and fails after one silence instead of waiting for ever."""
    proxy, kernel_timed = timed_proxy(lambda connection, request: time.sleep(5), tls,
                                      read_request=False)
    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk(proxy, timeout=20).messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "x" * (16 << 20)}])
    assert caught.value.status_code == 504
    assert caught.value.body["error"]["type"] == "timeout_error"
    assert len(kernel_timed) == kernel_timed_for(tls)


@pytest.mark.skipif(not ccproxy.KERNEL_TIMES_SOCKETS, reason="the kernel keeps time-outs on Linux")
@pytest.mark.parametrize("seconds, least, most", [(0.3, 0.3, 0.3), (2.5, 2.5, 2.5),
                                                  (1e-9, 1e-6, 0.011)])
def test_a_kernel_timed_socket_times_out_as_python_would(seconds, least, most):
    """The kernel's time-out is the one asked for (the kernel rounds it up to its clock's tick),
    never zero, which would mean no limit at all; a receive that waited that long is the
    socket.timeout Python would have raised."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sock = ccproxy.kernel_timed_connection(listener.getsockname(), 5)
        sock.wait_at_most(seconds)
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)
        whole, micro = struct.unpack("ll", raw)
        assert least <= whole + micro / 1e6 <= most
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16) == raw
        assert sock.gettimeout() is None
        if seconds < 1:
            with pytest.raises(socket.timeout):
                sock.recv_into(bytearray(10))
        sock.close()


def test_a_connection_kept_from_a_stream_waits_for_its_next_answer_again(start_proxy, upstream):
    """The event loop made the socket non-blocking to read the stream; the next call on the
    kept connection waits for its answer again (0.4 s, within the time-out), rather than
    failing at once and going round on a new connection."""
    proxy = start_proxy({"providers": [anthropic_provider(upstream)],
                         "performance": {"request_timeout": "2s"}})
    replies = iter([stream_reply(), json_reply(anthropic_message("second"), delay=0.4)])
    upstream.script = lambda r: next(replies)
    client = sdk(proxy)
    with client.messages.stream(model="m", max_tokens=5,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        assert stream.get_final_message().content[0].text == "Hello!"
    message = client.messages.create(model="m", max_tokens=5,
                                     messages=[{"role": "user", "content": "again"}])
    assert message.content[0].text == "second"
    assert len(upstream.requests) == 2
    assert upstream.requests[0]["peer"] == upstream.requests[1]["peer"]


def open_stream_and_vanish(proxy):
    """Start a streamed request on a raw socket, read the first bytes, then close."""
    body = b'{"model":"m","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"x"}]}'
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    received = b""
    while b"message_start" not in received:
        received += sock.recv(65536)
    sock.close()
    return time.monotonic()


def status_of(proxy):
    return sdk(proxy).get("/status", cast_to=object)


def idle_upstream(status) -> bool:
    """No upstream call open and no worker thread busy."""
    return (status["upstream"]["calls_open"], status["upstream"]["threads_busy"]) == (0, 0)


def test_client_disconnect_mid_stream_closes_the_upstream(proxy, upstream):
    upstream.script = lambda r: stream_reply(pause_before=3)
    closed_at = open_stream_and_vanish(proxy)
    assert upstream.peer_closed.wait(2)
    assert upstream.peer_closed_at - closed_at < 2
    assert wait_until(lambda: idle_upstream(status_of(proxy)))


def test_client_disconnect_before_the_answer_closes_the_upstream(proxy, upstream):
    upstream.script = lambda r: json_reply(anthropic_message(), delay=10)
    body = b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"}]}'
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert wait_until(lambda: len(upstream.requests) == 1)
    sock.close()
    closed_at = time.monotonic()
    assert upstream.peer_closed.wait(2)
    assert upstream.peer_closed_at - closed_at < 2
    assert wait_until(lambda: idle_upstream(status_of(proxy)))


def test_other_clients_are_served_while_a_stream_is_paused(proxy, upstream):
    paused = stream_reply(pause_before=3)
    upstream.script = lambda r: paused if r["json"]["messages"][0]["content"] == "slow" \
        else json_reply(anthropic_message("quick"))
    client = sdk(proxy)
    with client.messages.stream(model="m", max_tokens=5,
                                messages=[{"role": "user", "content": "slow"}]) as stream:
        iterator = iter(stream)
        next(iterator)
        quick = client.messages.create(model="m", max_tokens=5,
                                       messages=[{"role": "user", "content": "fast"}])
        paused.release.set()
        for _ in iterator:
            pass
    assert quick.content[0].text == "quick"


OPENAI_PIECES = [b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
                 b'"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n',
                 b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
                 b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n']


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
def test_an_open_stream_keeps_no_copy_of_its_request_body(start_proxy, upstream, kind):
    """A stream may run for minutes, and a Claude Code body be hundreds of KB: once the answer
    streams, neither the client's body (its bytes and its text) nor the body sent upstream is
    held (before, each open stream held three copies)."""
    entry = anthropic_provider(upstream) if kind == "anthropic" else {
        "name": "openai", "api_base_url": upstream.url + "/v1", "api_key": PROVIDER_KEY}
    proxy = start_proxy({"providers": [entry]})
    pieces = list(anthropic_stream_events()) if kind == "anthropic" else OPENAI_PIECES
    replies = [stream_reply(pieces, pause_before=len(pieces) - 1) for _ in range(4)]
    upstream.script = lambda request: replies[len(upstream.requests) - 1]
    body = json.dumps({"model": "m", "max_tokens": 5, "stream": True, "messages": [
        {"role": "user", "content": "x" * 400000}]}).encode()
    tracemalloc.start(40)
    try:
        before = traced_by_ccproxy()
        streams = [open_stream(proxy.port, body=body) for _ in replies]
        held = traced_by_ccproxy() - before
    finally:
        tracemalloc.stop()
        for reply in replies:
            reply.release.set()
    for sock, received in streams:
        assert b"message_stop" in read_to_end(sock, received)
    assert len(upstream.requests[0]["body"]) > 400000          # the whole prompt went upstream
    assert held < 400000, held                                   # not one copy of one body


def test_upstream_connections_are_reused(proxy, upstream):
    upstream.script = lambda r: stream_reply() if r["json"].get("stream") else json_reply(
        anthropic_message())
    client = sdk(proxy)
    request = dict(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    client.messages.create(**request)
    with client.messages.stream(**request) as stream:
        stream.get_final_message()
    client.messages.create(**request)
    assert len({r["peer"] for r in upstream.requests}) == 1


def test_an_idle_pooled_connection_keeps_no_call_nor_its_request(start_proxy, upstream,
                                                                   monkeypatch):
    """Once its answer has been read, a call (and its request body, which can be large) is
    freed, though its connection waits in the pool and its worker thread waits for work."""
    calls = []
    original = ccproxy.UpstreamCall.__init__

    def recorded(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls.append(weakref.ref(self))
    monkeypatch.setattr(ccproxy.UpstreamCall, "__init__", recorded)
    upstream.script = lambda r: stream_reply() if r["json"].get("stream") else json_reply(
        anthropic_message())
    proxy = start_proxy({"providers": [anthropic_provider(upstream)]})
    client = sdk(proxy)
    request = dict(model="m", max_tokens=5, messages=[{"role": "user", "content": "x" * 100000}])
    client.messages.create(**request)
    with client.messages.stream(**request) as stream:
        stream.get_final_message()
    assert len({r["peer"] for r in upstream.requests}) == 1       # one connection, pooled
    assert len(calls) == 2
    assert wait_until(lambda: gc.collect() is not None and all(c() is None for c in calls),
                      seconds=2)       # not when a worker thread next takes a job (5 s)


def test_a_connection_the_provider_closed_is_replaced_transparently(proxy, upstream):
    upstream.script = lambda r: json_reply(anthropic_message(), close_after=True)
    client = sdk(proxy)
    request = dict(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    for _ in range(3):
        assert client.messages.create(**request).content[0].text == "Hello from upstream"
    assert len({r["peer"] for r in upstream.requests}) == 3


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_no_worker_thread_waits_while_a_provider_thinks_before_answering(start_proxy, upstream,
                                                                         stream):
    """A reasoning model may take a minute before the first byte of its answer. A worker thread
    sends the request through urllib and is free again; the event loop waits for the answer, so
    slow calls in flight hold no thread each (nor take the GIL from the loop to read)."""
    release = threading.Event()
    reply = (lambda: stream_reply(anthropic_stream_events(["thought"]))) if stream else (
        lambda: json_reply(anthropic_message("thought")))
    upstream.script = lambda r: (release.wait(10), reply())[1]
    proxy = start_proxy({"providers": [anthropic_provider(upstream)]})
    texts = []

    def ask():
        request = dict(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        if stream:
            with sdk(proxy).messages.stream(**request) as events:
                texts.append("".join(events.text_stream))
        else:
            texts.append(sdk(proxy).messages.create(**request).content[0].text)
    askers = [threading.Thread(target=ask) for _ in range(3)]
    for asker in askers:
        asker.start()
    try:
        assert wait_until(lambda: len(upstream.requests) == 3)
        upstream_state = proxy.server.app.upstream
        assert wait_until(lambda: upstream_state.threads_busy == 0, seconds=2)
        assert len(upstream_state.calls) == 3
    finally:
        release.set()
        for asker in askers:
            asker.join(10)
    assert texts == ["thought"] * 3


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
HEAD_BODY = json.dumps(anthropic_message("whole")).encode()


def byte_by_byte(answer: bytes):
    def send(connection, request):
        for byte in answer[:120]:
            connection.sendall(bytes([byte]))
            time.sleep(0.002)
        connection.sendall(answer[120:])
    return send


def sent(*parts, pause=0.05):
    """A provider's answer: each part sent, with a pause between."""
    def send(connection, request):
        for index, part in enumerate(parts):
            if index:
                time.sleep(pause)
            connection.sendall(part)
    return send


@pytest.mark.parametrize("send, status", [
    (byte_by_byte(HEAD % len(HEAD_BODY) + HEAD_BODY), 200),
    (sent((HEAD % len(HEAD_BODY)).replace(b"\r\n", b"\n") + HEAD_BODY), 200),
    (sent(b"HTTP/1.1 100 Continue\r\nX: 1\r\n\r\n", HEAD % len(HEAD_BODY) + HEAD_BODY), 200),
    (sent(b"HTTP/1.1 100 Continue\r\n\r\n", b"", pause=2), 504),
    (sent(b"HTTP/1.1 200 OK\r\nContent-Le"), 502),
    (sent(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
          b"HTTP/1.1 100 Continue\r\n\r\n", HEAD % len(HEAD_BODY) + HEAD_BODY), 200),
], ids=["byte-by-byte", "lf-only", "100-continue-first", "only-100-continue", "cut-short",
        "early-hints-first"])
def test_an_answer_head_arriving_in_any_pieces_is_read_whole_by_the_event_loop(start_proxy,
                                                                              send, status):
    """The event loop reads an answer's head as http.client would: in however many pieces it
    comes, with bare LF line ends, past a 100 Continue (one that is all there is, then silence,
    is a time-out) and any other interim answer (103 Early Hints, which http.client takes for
    the answer); a connection that ends within the head is a 502 that says so."""
    provider = RawProvider(send)
    try:
        proxy = start_proxy({"providers": [{"name": "raw", "type": "anthropic",
                                            "api_key": PROVIDER_KEY,
                                            "api_base_url": provider.url}],
                             "performance": {"request_timeout": 1}, "failover": False})
        request = dict(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        client = sdk(proxy).with_options(max_retries=0)
        if status == 200:
            assert client.messages.create(**request).content[0].text == "whole"
            return
        with pytest.raises(anthropic.APIStatusError) as caught:
            client.messages.create(**request)
        assert caught.value.status_code == status
        assert caught.value.body["error"]["message"] == {
            504: "raw: the provider sent nothing for 1 s (performance.request_timeout)",
            502: "raw: the connection broke while the answer was arriving: IncompleteRead(27 "
                 "bytes read)"}[status]
    finally:
        provider.close()


TOO_LARGE = (b'{"type":"error","error":{"type":"request_too_large","message":"Request exceeds '
             b'the maximum allowed number of bytes."}}')


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
@pytest.mark.parametrize("reader", ["loop", "thread"])
def test_an_answer_given_before_the_request_was_taken_whole_is_relayed(start_proxy, monkeypatch,
                                                                       kind, reader):
    """A provider that answers a request too large for it at once (a 413) and closes had made
    the rest of the send fail ('Broken pipe', 'Connection reset'): the client got a 502 saying
    the provider could not be reached, and failover moved on. The answer is read instead."""
    if reader == "thread":
        monkeypatch.setattr(ccproxy, "loop_watches_sockets", lambda loop: False)
    provider = RawProvider(sent(b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: "
                                b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (
                                    len(TOO_LARGE), TOO_LARGE)), read_request=False)
    try:
        proxy = start_proxy({"providers": [{"name": "raw", "type": kind, "api_key": PROVIDER_KEY,
                                            "api_base_url": provider.url + "/v1",
                                            "models": ["m"]}], "failover": False})
        with pytest.raises(anthropic.APIStatusError) as caught:
            sdk(proxy).with_options(max_retries=0).messages.create(
                model="m", max_tokens=5, messages=[{"role": "user", "content": "x" * 4000000}])
        assert caught.value.status_code == 413
        assert caught.value.body["error"]["type"] == "request_too_large"
        assert "Request exceeds the maximum allowed number of bytes." in \
            caught.value.body["error"]["message"]
    finally:
        provider.close()


BOM_STREAMS = {
    "openai": b'data: {"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":'
              b'0,"delta":{"role":"assistant","content":"streamed"},"finish_reason":"stop"}]}\n\n'
              b'data: [DONE]\n\n',
    "gemini": b'data: {"candidates":[{"content":{"parts":[{"text":"streamed"}],"role":"model"},'
              b'"finishReason":"STOP"}]}\n\n',
    "anthropic": b"".join(anthropic_stream_events(("streamed",))),
}


@pytest.mark.parametrize("kind", sorted(BOM_STREAMS))
@pytest.mark.parametrize("stream", [True, False])
def test_an_event_stream_that_begins_with_a_byte_order_mark_is_read(start_proxy, kind, stream):
    """The SSE standard lets a stream begin with a BOM, to be ignored. Its first event had been
    lost with it: an empty answer that ended cleanly (Chat Completions), a 502 (Gemini), an
    event the client's SDK failed on (the pass-through). It may come split across reads."""
    events = b"\xef\xbb\xbf" + BOM_STREAMS[kind]
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n"
    provider = RawProvider(sent(head % len(events) + events[:1], events[1:2], events[2:]))
    try:
        proxy = start_proxy({"providers": [{"name": "raw", "type": kind, "api_key": PROVIDER_KEY,
                                            "api_base_url": provider.url + {
                                                "openai": "/v1", "gemini": "/v1beta"}.get(kind, ""),
                                            "models": ["m"]}], "failover": False})
        request = dict(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        client = sdk(proxy).with_options(max_retries=0)
        if stream:
            with client.messages.stream(**request) as answer:
                message = answer.get_final_message()
        else:
            message = client.messages.create(**request)
        assert [block.text for block in message.content] == ["streamed"]
    finally:
        provider.close()


def test_an_answer_head_of_more_than_a_mebibyte_is_a_502(start_proxy):
    """A head that never ends (a misdirected base URL) is read no further than 1 MiB."""
    field = b"X-Filler: " + b"y" * 60000 + b"\r\n"
    provider = RawProvider(sent(b"HTTP/1.1 200 OK\r\n", *[field] * 40, pause=0))
    try:
        proxy = start_proxy({"providers": [{"name": "raw", "type": "anthropic",
                                            "api_key": PROVIDER_KEY,
                                            "api_base_url": provider.url}], "failover": False})
        with pytest.raises(anthropic.APIStatusError) as caught:
            sdk(proxy).with_options(max_retries=0).messages.create(
                model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 502
        assert caught.value.body["error"]["message"] == (
            "raw answered with a head of more than 1 MiB, more than any API's; check that its "
            "api_base_url is its API")
    finally:
        provider.close()


def test_a_cut_call_does_not_leave_a_broken_connection_in_the_pool(proxy, upstream):
    upstream.script = lambda r: stream_reply(pause_before=3)
    open_stream_and_vanish(proxy)
    assert upstream.peer_closed.wait(2)
    upstream.script = lambda r: json_reply(anthropic_message("after"))
    message = sdk(proxy).messages.create(
        model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert message.content[0].text == "after"


def test_worker_threads_wake_the_loop_at_most_once_per_batch():
    class RecordingLoop:
        def __init__(self):
            self.wakeups = []

        def call_soon_threadsafe(self, callback):
            self.wakeups.append(callback)

    loop = RecordingLoop()
    inbox = ccproxy.LoopInbox(loop)
    delivered = []
    for number in range(1000):
        inbox.post(delivered.append, number)
    assert len(loop.wakeups) == 1 and delivered == []
    loop.wakeups[0]()
    assert delivered == list(range(1000))
    inbox.post(delivered.append, "next")
    assert len(loop.wakeups) == 2


@pytest.fixture
def forward_proxy():
    mock = MockUpstream()
    yield mock
    mock.close()


def post_without_client_proxy(proxy):
    """POST a message on a raw socket: the SDK itself would obey the proxy variables."""
    body = b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"}]}'
    reply = raw_exchange(proxy.port, b"POST /v1/messages HTTP/1.1\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    head, _, payload = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


# A provider elsewhere, by a name never resolved: through a proxy, only the proxy is called.
FAR_PROVIDER = {"name": "far", "type": "anthropic", "api_key": PROVIDER_KEY,
                "api_base_url": "http://models.example.invalid:8080"}


def test_http_proxy_variable_is_honoured(start_proxy, forward_proxy, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    forward_proxy.script = lambda request: json_reply(anthropic_message("Hello through it"))
    proxy = start_proxy({"providers": [FAR_PROVIDER]})
    status, message = post_without_client_proxy(proxy)
    assert status == 200 and message["content"][0]["text"] == "Hello through it"
    assert forward_proxy.requests[0]["path"] == "http://models.example.invalid:8080/v1/messages"


def test_no_proxy_variable_bypasses_the_proxy(start_proxy, upstream, forward_proxy,
                                              monkeypatch):
    """The provider's name is this machine's here, so that no DNS query leaves it (one for
    the name itself had taken over 5 s on a loaded machine, and the test timed out)."""
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    monkeypatch.setenv("NO_PROXY", "example.invalid")
    resolve = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *rest, **named: resolve(
        "127.0.0.1" if host == "models.example.invalid" else host, *rest, **named))
    port = int(upstream.url.rsplit(":", 1)[1])
    proxy = start_proxy({"providers": [dict(
        FAR_PROVIDER, api_base_url="http://models.example.invalid:%d" % port)]})
    status, message = post_without_client_proxy(proxy)
    assert forward_proxy.requests == [] and len(upstream.requests) == 1
    assert status == 200 and message["content"][0]["text"] == "Hello from upstream"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_provider_on_this_machine_is_never_called_through_a_proxy(
        start_proxy, upstream, forward_proxy, monkeypatch, host):
    """A corporate HTTP_PROXY set for everything must not take local Ollama away: the proxy
    would reach its own loopback, not this machine's."""
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    provider = dict(anthropic_provider(upstream),
                    api_base_url=upstream.url.replace("127.0.0.1", host))
    status, message = post_without_client_proxy(start_proxy({"providers": [provider]}))
    assert status == 200 and message["content"][0]["text"] == "Hello from upstream"
    assert forward_proxy.requests == [] and len(upstream.requests) == 1


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("localhost", True),
    ("LOCALHOST.", True), ("ccproxy.localhost", True), ("10.0.0.1", False), ("::2", False),
    ("localhost.example", False), ("evil-localhost", False),
    ("", False), ("0.0.0.0", False)])
def test_which_hosts_are_this_machines_loopback(host, loopback):
    assert ccproxy.names_loopback(host) is loopback


def test_https_proxy_variable_tunnels_https_providers(start_proxy, forward_proxy, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", forward_proxy.url)
    forward_proxy.script = lambda r: Reply(403, b"")      # refuse the tunnel: nothing leaves
    proxy = start_proxy({"providers": [{"name": "anthropic", "api_key": PROVIDER_KEY}]})
    status, error = post_without_client_proxy(proxy)
    assert forward_proxy.requests[0]["method"] == "CONNECT"
    assert forward_proxy.requests[0]["path"] == "api.anthropic.com:443"
    assert status == 502
    assert error["error"]["message"].startswith(
        "anthropic: cannot reach https://api.anthropic.com/v1/messages: Tunnel connection failed")


# --- streams read by the event loop, over TLS too ---------------------------------------------

@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made with the openssl command at test time."""
    import shutil
    import subprocess
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return str(cert), str(key)


def test_a_certificate_that_does_not_verify_says_how_to_trust_it(start_proxy, certificate,
                                                                 monkeypatch):
    """A provider behind a proxy that inspects TLS (or with a certificate of its own) had been
    said to be out of reach, with advice to check its address; the advice is SSL_CERT_FILE,
    which the Python ccproxy runs on reads."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    mock = MockUpstream(tls=certificate)
    try:
        proxy = start_proxy({"providers": [dict(anthropic_provider(mock), name="corp",
                                                type="anthropic")],
                             "failover": False})
        with pytest.raises(anthropic.APIStatusError) as caught:
            sdk(proxy).with_options(max_retries=0).messages.create(
                model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 502
        assert caught.value.body["error"]["message"].startswith(
            "corp's TLS certificate does not verify: where a proxy inspects TLS (or the server "
            "has a certificate of its own), set SSL_CERT_FILE to the CA bundle that signs it, "
            "then restart ccproxy (")
        monkeypatch.setenv("SSL_CERT_FILE", certificate[0])             # as the advice says
        trusting = start_proxy({"providers": [anthropic_provider(mock)]})
        assert sdk(trusting).messages.create(model="m", max_tokens=5, messages=[
            {"role": "user", "content": "hi"}]).content[0].text == "Hello from upstream"
    finally:
        mock.close()


@pytest.mark.parametrize("tls", [False, True])
@pytest.mark.parametrize("by_thread", [False, True])
def test_a_stream_of_many_small_pieces_arrives_whole_over_plain_and_tls_sockets(
        start_proxy, certificate, monkeypatch, tls, by_thread):
    """Hundreds of events, each its own write (over TLS its own record), with a pause in the
    middle: the event loop reads what the TLS layer has buffered before waiting again, so
    nothing is lost, duplicated or held back; where the loop cannot watch sockets (Windows),
    a worker thread reads them instead. The loop reads the answer from its head on, so no
    buffered file (with its 8 KB buffer) is made for it."""
    monkeypatch.setenv("SSL_CERT_FILE", certificate[0])
    mock = MockUpstream(tls=certificate if tls else None)
    pieces = ["p%03d " % n for n in range(300)]
    release = threading.Event()
    events = anthropic_stream_events(pieces)
    mock.script = lambda r: stream_reply(events, pause_before=150, release=release)
    readers, files = [], []

    class RecordedReader(ccproxy.SocketReader):
        def __init__(self, loop, sock, buffered_file=None):
            readers.append(type(sock).__name__)
            if buffered_file is not None:
                files.append(weakref.ref(buffered_file))
            super().__init__(loop, sock, buffered_file)
    monkeypatch.setattr(ccproxy, "SocketReader", RecordedReader)
    if by_thread:
        monkeypatch.setattr(ccproxy, "loop_watches_sockets", lambda loop: False)
    try:
        proxy = start_proxy({"providers": [anthropic_provider(mock)]})
        threading.Timer(0.3, release.set).start()
        with sdk(proxy).messages.stream(model="claude-sonnet-4-5", max_tokens=10, messages=[
                {"role": "user", "content": "hi"}]) as stream:
            texts = stream.text_stream
            text = next(texts)
            files_left = [ref() for ref in files if ref() is not None]
            text += "".join(texts)
        assert text == "".join(pieces)
        plain = "KernelTimedSocket" if ccproxy.KERNEL_TIMES_SOCKETS else "socket"
        assert readers == ([] if by_thread else ["SSLSocket" if tls else plain])
        assert files == files_left == []
    finally:
        mock.close()


# --- worker threads: started as work comes, ended when idle -----------------------------------

def test_worker_threads_grow_with_the_work_up_to_the_limit_and_end_when_idle(monkeypatch):
    monkeypatch.setattr(ccproxy, "WORKER_IDLE_SECONDS", 0.2)
    pool = ccproxy.WorkerPool(limit=8)
    release, running, results = threading.Event(), [], []
    for n in range(20):
        pool.submit(lambda n=n: (running.append(n), release.wait(5), n * n)[2], results.append)
    assert wait_until(lambda: len(running) == 8)
    assert pool.threads == 8                              # the limit; the rest wait their turn
    release.set()
    assert wait_until(lambda: len(results) == 20)
    assert sorted(results) == [n * n for n in range(20)]
    assert wait_until(lambda: pool.threads == 0, seconds=5)     # idle threads ended
    pool.submit(lambda: "again", results.append)                # and start again on demand
    assert wait_until(lambda: results[-1] == "again")
    pool.shutdown()
    assert pool.threads == 0
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None, results.append)


def test_a_job_submitted_in_answer_to_the_last_one_finds_its_thread_free():
    """One request after another (a single client): the thread that ran a job is counted idle
    before its result is handed over, so the next job, submitted in answer, waits for it
    rather than starting a second thread that would take turns with the first."""
    pool = ccproxy.WorkerPool(limit=8)
    ran_on, done = [], threading.Event()

    def job(n):
        ran_on.append(threading.current_thread())
        return n

    def hand_over(n):
        if n < 5:
            pool.submit(lambda: job(n + 1), hand_over)
        else:
            done.set()
    pool.submit(lambda: job(0), hand_over)
    assert done.wait(5)
    assert len(ran_on) == 6 and len(set(ran_on)) == 1
    assert pool.threads == 1
    pool.shutdown()


def test_a_blocking_step_hands_back_its_result_or_its_error_and_is_skipped_once_cancelled():
    upstream = ccproxy.Upstream(worker_threads=2)
    ran = []

    async def steps():
        assert await upstream.run(lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(ZeroDivisionError):
            await upstream.run(lambda: 1 / 0)
        gate = threading.Event()
        blocker = upstream.run(gate.wait, 5)
        blocker2 = upstream.run(gate.wait, 5)        # both workers now busy
        skipped = upstream.run(ran.append, "skipped")
        skipped.cancel()
        gate.set()
        await blocker
        await blocker2
        assert await upstream.run(ran.append, "ran") is None
    asyncio.run(steps())
    upstream.close("test over")
    upstream.join()
    assert ran == ["ran"]


def openai_stream_reply(texts):
    chunks = [{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-test",
               "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
              for text in texts]
    chunks[-1]["choices"][0]["finish_reason"] = "stop"
    return stream_reply([b"data: %s\n\n" % json.dumps(c).encode() for c in chunks]
                        + [b"data: [DONE]\n\n"])


@pytest.mark.parametrize("translated", [False, True])
def test_a_stream_and_its_connection_are_freed_as_they_end_without_garbage_collection(
        start_proxy, upstream, monkeypatch, translated):
    """No part of a stream, nor of the client's connection, is held in a reference cycle: all
    of it goes the moment it ends, so a thousand streams leave the cyclic garbage collector
    nothing to do but walk the live ones (a full pass over them pauses every stream)."""
    monkeypatch.setattr(ccproxy, "MEMORY_RETURN_SECONDS", 60)    # its gc.collect() waits
    made = []
    for cls in (ccproxy.UpstreamCall, ccproxy.LoopBody, ccproxy.SocketReader,
                ccproxy.UpstreamStream, ccproxy.ClientConnection, http.client.HTTPResponse):
        def recorded(self, *args, __init=cls.__init__, **kwargs):
            __init(self, *args, **kwargs)
            made.append(weakref.ref(self))
        monkeypatch.setattr(cls, "__init__", recorded)
    if translated:
        upstream.script = lambda r: openai_stream_reply(["Hel", "lo"])
        provider = {"name": "openai", "api_base_url": upstream.url + "/v1", "api_key": "sk-x",
                    "models": ["gpt-test"]}
    else:
        upstream.script = lambda r: stream_reply(anthropic_stream_events(["Hel", "lo"]))
        provider = anthropic_provider(upstream)
    proxy = start_proxy({"providers": [provider]})
    gc.collect()
    gc.disable()
    try:
        with sdk(proxy) as client:
            with client.messages.stream(model="m", max_tokens=5, messages=[
                    {"role": "user", "content": "hi"}]) as events:
                assert "".join(events.text_stream) == "Hello"
        assert len(made) == 6           # the answer too, though its connection is pooled
        assert wait_until(lambda: all(ref() is None for ref in made), seconds=2), [
            type(ref()).__name__ for ref in made if ref() is not None]
    finally:
        gc.enable()


def test_a_server_of_its_own_leaves_full_collections_to_its_quiet_moments(monkeypatch):
    """start's process: startup's objects frozen out of the collector's way and full passes a
    tenth as often (MemoryReturn collects whenever the server is quiet)."""
    thresholds = []
    monkeypatch.setattr(gc, "set_threshold", lambda *values: thresholds.append(values))
    monkeypatch.setattr(gc, "freeze", lambda: thresholds.append("frozen"))
    monkeypatch.setattr(gc, "get_threshold", lambda: (700, 10, 10))
    monkeypatch.setattr(ccproxy, "COLLECTOR_ABORTS_DEEP", False)   # 3.8's: test_errors.py
    ccproxy.tune_garbage_collector()
    assert thresholds == ["frozen", (700, 10, 100)]


def test_a_burst_of_streams_leaves_no_worker_thread_behind(start_proxy, upstream, monkeypatch):
    monkeypatch.setattr(ccproxy, "WORKER_IDLE_SECONDS", 0.2)
    upstream.script = lambda r: stream_reply(anthropic_stream_events(["x"] * 50))
    proxy = start_proxy({"providers": [anthropic_provider(upstream)]})
    texts = []

    def stream():
        client = sdk(proxy)
        with client.messages.stream(model="m", max_tokens=5, messages=[
                {"role": "user", "content": "hi"}]) as events:
            texts.append("".join(events.text_stream))
    threads = [threading.Thread(target=stream) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert texts == ["x" * 50] * 20
    upstream_state = lambda: proxy.server.app.upstream     # noqa: E731
    assert wait_until(lambda: upstream_state().threads == 0, seconds=5)
    assert len(upstream.requests) == 20


def test_memory_goes_back_to_the_system_once_the_server_is_idle(start_proxy, upstream,
                                                                monkeypatch):
    trims = []
    monkeypatch.setattr(ccproxy, "MEMORY_RETURN_SECONDS", 0.2)
    monkeypatch.setattr(ccproxy, "malloc_trim_function", lambda: trims.append)
    proxy = start_proxy({"providers": [anthropic_provider(upstream)]})
    for _ in range(3):
        sdk(proxy).messages.create(model="m", max_tokens=5,
                                   messages=[{"role": "user", "content": "hi"}])
    assert wait_until(lambda: trims, seconds=5)               # after the burst
    assert set(trims) == {0}


def test_memory_goes_back_again_once_the_bursts_worker_threads_have_ended(start_proxy,
                                                                           upstream,
                                                                           monkeypatch):
    """The first quiet moment comes before the burst's idle workers end (each holds its
    thread's memory till then): memory goes back once more when they have, then no more."""
    threads_at_trim = []
    monkeypatch.setattr(ccproxy, "MEMORY_RETURN_SECONDS", 0.1)
    monkeypatch.setattr(ccproxy, "WORKER_IDLE_SECONDS", 3.0)
    monkeypatch.setattr(ccproxy, "malloc_trim_function", lambda: lambda pad: (
        threads_at_trim.append(proxy.server.app.upstream.threads)))
    proxy = start_proxy({"providers": [anthropic_provider(upstream)]})
    sdk(proxy).messages.create(model="m", max_tokens=5, messages=[{"role": "user",
                                                                   "content": "hi"}])
    assert wait_until(lambda: threads_at_trim, seconds=5)
    assert threads_at_trim[0] > 0                        # a worker was still waiting for work
    assert wait_until(lambda: threads_at_trim[-1] == 0, seconds=15)
    assert proxy.server.app.memory._quiet._when is None  # and nothing more is planned


def test_a_burst_keeps_its_provider_connections_for_the_next_wave_until_the_server_is_quiet(
        start_proxy, upstream, monkeypatch):
    monkeypatch.setattr(ccproxy, "MEMORY_RETURN_SECONDS", 1.0)
    monkeypatch.setattr(ccproxy, "UPSTREAM_IDLE_WHEN_QUIET", 2)
    upstream.script = lambda r: json_reply(anthropic_message(), delay=0.3)   # answers overlap
    proxy = start_proxy({"providers": [anthropic_provider(upstream)]})

    def wave():
        threads = [threading.Thread(target=lambda: sdk(proxy).messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}]))
            for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    wave()
    status = lambda: json.loads(urllib.request.urlopen(proxy.url + "/status").read())  # noqa
    assert status()["upstream"]["connections_idle"] > 16      # more than the old fixed 16
    peers = {r["peer"] for r in upstream.requests}
    wave()                                                     # the next wave reuses them
    assert len({r["peer"] for r in upstream.requests}) < 2 * len(peers)
    pool = proxy.server.app.upstream.connections      # asked directly: a request is activity
    assert wait_until(lambda: pool.idle == 2, seconds=5)


def test_a_client_that_stops_reading_holds_the_provider_back_and_loses_nothing(proxy, upstream):
    """The event loop reads the provider only as fast as the client takes the stream: a client
    that stops reading fills the socket buffers on the way, the provider's writes wait, and
    nothing piles up in the proxy; when the client reads on, every piece arrives in order."""
    pieces = ["%06d%s" % (n, "x" * 8000) for n in range(3000)]         # 24 MB of text
    written = []

    class CountedPieces(list):
        def __iter__(self):
            for piece in list.__iter__(self):
                written.append(1)
                yield piece
    events = CountedPieces(anthropic_stream_events(pieces))
    upstream.script = lambda r: Reply(200, pieces=events, content_type="text/event-stream")
    body = json.dumps({"model": "m", "max_tokens": 5, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", proxy.port))
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    counts = [-1]
    while counts[-1] < len(written):            # until the provider's writes stop advancing
        counts.append(len(written))
        time.sleep(0.3)
    assert 0 < len(written) < len(events) // 2
    received = bytearray()
    with sock:
        while not received.endswith(b"\r\n0\r\n\r\n"):
            received += sock.recv(1 << 20)
    texts = re.findall(rb'"text": ?"(\d{6})x+"', dechunked(bytes(received)))
    assert [int(text) for text in texts] == list(range(3000))


def dechunked(response: bytes) -> bytes:
    """The body of a chunked HTTP response."""
    rest = response.split(b"\r\n\r\n", 1)[1]
    body = bytearray()
    while True:
        size, rest = rest.split(b"\r\n", 1)
        if int(size, 16) == 0:
            return bytes(body)
        body += rest[:int(size, 16)]
        rest = rest[int(size, 16) + 2:]


# An answer's head, read by ccproxy's HeadFieldsResponse exactly as http.client reads it

class RawAnswer:
    """Stands in for a socket: http.client reads an answer through its makefile()."""

    def __init__(self, raw: bytes):
        self.raw = raw

    def makefile(self, mode):
        return io.BufferedReader(io.BytesIO(self.raw))


def answer_as_read(response_class, raw: bytes, method: str = "POST"):
    """What an HTTPResponse class made of raw: its fields, or the exception it raised."""
    response = response_class(RawAnswer(raw), method=method)
    try:
        response.begin()
    except http.client.HTTPException as exc:
        return type(exc).__name__
    fields = ("status", "reason", "version", "chunked", "length", "will_close")
    return ({field: getattr(response, field) for field in fields}, response.headers.items(),
            response.read())


@pytest.mark.parametrize("raw, method", [
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", "POST"),
    (b"HTTP/1.1 100 Continue\r\nX-A: 1\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx",
     "POST"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\nContent-Length: 9\r\n\r\n"
     b"2\r\nab\r\n0\r\n\r\n", "POST"),
    (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nto the end", "POST"),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\nabc", "POST"),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc", "POST"),
    (b"HTTP/1.1 200 OK\r\n\r\nno length, so until the connection closes", "POST"),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", "POST"),
    (b"HTTP/1.1 304 Not Modified\r\n\r\n", "GET"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", "HEAD"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -4\r\n\r\nbody", "POST"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: +1_0 \r\n\r\n0123456789", "POST"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\nbody", "POST"),
    (b"HTTP/1.1 429 Too Many\r\nRetry-After: 3\r\nX-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n",
     "POST"),
    (b"HTTP/1.1 200 \r\nA:\r\nB: \t v \t\r\nA: again\r\n\r\n", "GET"),
    (b"HTTP/2.0 200 OK\r\n\r\n", "GET"),
    (b"HTTX/1.1 200 OK\r\n\r\n", "GET"),
    (b"", "GET"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n", "GET"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n", "GET"),
])
def test_an_answer_head_is_read_as_http_client_reads_it(raw, method):
    """ccproxy reads provider answers' heads without the email package (five times faster):
    status, version, every field in order, the body's framing and the connection's fate are
    http.client's, for every shape of answer, and so are its refusals."""
    expected = answer_as_read(http.client.HTTPResponse, raw, method)
    assert answer_as_read(ccproxy.HeadFieldsResponse, raw, method) == expected


def test_an_interim_answer_is_skipped_where_http_client_takes_it_for_the_answer():
    """The one place ccproxy reads a head otherwise than http.client: a 1xx other than 100
    (103 Early Hints) is skipped as RFC 9110 asks, where http.client ends there; a 101 is
    the answer (to an upgrade ccproxy never asks for)."""
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
    whole = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    assert answer_as_read(http.client.HTTPResponse, hints + whole, "POST")[0]["status"] == 103
    ours = answer_as_read(ccproxy.HeadFieldsResponse, hints + whole, "POST")
    assert ours == answer_as_read(http.client.HTTPResponse, whole, "POST")
    switching = b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
    assert answer_as_read(ccproxy.HeadFieldsResponse, switching + whole, "POST")[0][
        "status"] == 101


FIELD_NAMES = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e,
                                    blacklist_characters=":"), min_size=1, max_size=12)
HEAD_LINES = st.one_of(
    st.builds(lambda name, value: name.encode() + b":" + value + b"\r\n", FIELD_NAMES,
              st.binary(max_size=30).map(lambda v: v.replace(b"\r", b"").replace(b"\n", b""))),
    st.binary(max_size=30).map(lambda v: v.replace(b"\n", b"") + b"\r\n"),     # anything at all
    st.sampled_from([b" folded\r\n", b"\tfolded\r\n", b"From someone\r\n", b":empty\r\n",
                     b"A: b\rC: d\r\n", b"Lf-only: yes\n", b"A: b\r\r\n"]))


@settings(max_examples=400, deadline=None)
@given(st.lists(HEAD_LINES, max_size=8), st.sampled_from([b"\r\n", b"\n", b""]))
def test_any_head_gives_the_fields_http_client_gives(lines, end):
    """Property: for any head (plain fields, folded lines, stray CRs, lines that are no field,
    non-ASCII), read_head_fields gives the HTTPMessage http.client.parse_headers gives."""
    raw = b"".join(lines) + end
    ours = ccproxy.read_head_fields(io.BufferedReader(io.BytesIO(raw)))
    theirs = http.client.parse_headers(io.BufferedReader(io.BytesIO(raw)))
    assert ours.items() == theirs.items()
    assert type(ours) is type(theirs)


class SentBytes:
    """Stands in for a connected socket: records each sendall()."""

    def __init__(self):
        self.sends = []

    def sendall(self, data):
        self.sends.append(bytes(data))


def sends_of(connection_class, body, method="POST"):
    connection = connection_class("provider.example")
    connection.sock = SentBytes()
    connection.request(method, "/v1/chat/completions", body,
                       {"Content-Type": "application/json", "Authorization": "Bearer sk-x"})
    return connection.sock.sends


@pytest.mark.parametrize("body, sends", [
    (b'{"model": "m", "messages": []}', 1),       # head and body in one send, one segment
    (b"x" * (ccproxy.UPSTREAM_JOINED_BODY_BYTES + 1), 2),   # too large to copy: as http.client
    (None, 1),
])
def test_a_request_goes_out_as_http_client_would_send_it_small_ones_in_one_send(body, sends):
    """The provider receives the very bytes http.client sends, and a small request's head and
    body together (http.client sends them apart: two segments for the provider to read)."""
    ours = sends_of(ccproxy._TrackedHTTPConnection, body, "GET" if body is None else "POST")
    theirs = sends_of(http.client.HTTPConnection, body, "GET" if body is None else "POST")
    assert b"".join(ours) == b"".join(theirs)
    assert len(ours) == sends


ODD_HEAD_BODY = json.dumps(anthropic_message("odd head")).encode()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n{}",          # too many fields
    b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n{}",         # a line too long
    b"ICY 200 OK\r\nContent-Length: 2\r\n\r\n{}",                      # not HTTP at all
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Bad: a\x00\x01b\r\n"
    b" folded\r\nContent-Length: %d\r\n\r\n%s" % (len(ODD_HEAD_BODY), ODD_HEAD_BODY),  # answered
], ids=["too-many-fields", "line-too-long", "not-http", "odd-fields"])
def test_a_provider_answer_with_a_broken_head_is_a_502_and_the_proxy_serves_on(
        start_proxy, upstream, answer):
    """A head http.client refuses is the client's Anthropic-shaped 502 (a readable one, odd
    bytes and all, is the provider's answer); either way the proxy goes on serving."""
    broken = RawProvider(lambda connection, request: connection.sendall(answer))
    upstream.script = lambda r: json_reply(anthropic_message("still here"))
    try:
        proxy = start_proxy({"providers": [
            {"name": "broken", "type": "anthropic", "api_key": PROVIDER_KEY,
             "api_base_url": broken.url},
            dict(anthropic_provider(upstream), name="good", type="anthropic")]})
        client = sdk(proxy)
        request = dict(max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        if b"X-Bad" in answer:
            reply = client.messages.with_raw_response.create(model="broken,m", **request)
            assert reply.status_code == 200
            assert all(ch >= " " for name, value in reply.headers.items() for ch in value)
        else:
            with pytest.raises(anthropic.APIStatusError) as caught:
                client.messages.create(model="broken,m", **request)
            assert caught.value.status_code == 502
            assert caught.value.body["type"] == "error"
            assert caught.value.body["error"]["type"] == "api_error"
            assert caught.value.body["error"]["message"].startswith(
                "broken: answered with what HTTP/1.1 cannot read (")
        assert client.messages.create(model="good,m", **request).content[0].text == "still here"
    finally:
        broken.close()


def endless_answer(framing):
    """A provider whose answer has no end, as a misdirected base URL may serve: a stated length
    of 3 GB, chunks that never stop, or a body until the connection closes."""
    def answer(connection, request):
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        head += {"length": b"Content-Length: 3000000000\r\n",
                 "chunked": b"Transfer-Encoding: chunked\r\n", "close": b""}[framing]
        piece = b"x" * 65536
        try:
            connection.sendall(head + b"\r\n")
            while True:
                connection.sendall(b"10000\r\n%s\r\n" % piece if framing == "chunked" else piece)
        except OSError:         # ccproxy stopped reading and closed the connection
            pass
    return answer


@pytest.mark.parametrize("body, problem", [
    (b"zz\r\n", "invalid chunk size line"),
    (b"5;" + b"x" * 5000 + b"\r\nhello\r\n0\r\n\r\n", "chunk line too long")],
    ids=["bad-size", "long-extension"])
@pytest.mark.parametrize("stream, by_thread", [(False, False), (True, False), (True, True)],
                         ids=["whole", "stream", "stream read by a thread"])
def test_a_provider_answer_whose_chunks_are_broken_is_the_providers_502(
        start_proxy, monkeypatch, body, problem, stream, by_thread):
    """Broken chunked framing in a provider's answer is its failure, a 502 naming it, not the
    client's 400 (the decoder is the one client request bodies go through)."""
    if by_thread:
        monkeypatch.setattr(ccproxy, "loop_watches_sockets", lambda loop: False)
    kind = b"text/event-stream" if stream else b"application/json"
    provider = RawProvider(sent(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nTransfer-Encoding: "
                                b"chunked\r\n\r\n%s" % (kind, body)))
    try:
        proxy = start_proxy({"providers": [{"name": "raw", "type": "anthropic",
                                            "api_key": PROVIDER_KEY,
                                            "api_base_url": provider.url}], "failover": False})
        with pytest.raises(anthropic.APIStatusError) as caught:
            answer_of(sdk(proxy).with_options(max_retries=0), stream, model="m", max_tokens=5,
                      messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 502
        assert caught.value.body["error"] == {
            "type": "api_error",
            "message": "raw: the chunked framing of its answer is broken: " + problem}
    finally:
        provider.close()


def endless_beside_good(endless, upstream) -> dict:
    """A config of two providers, `endless` (a RawProvider) and `good`, and no failover."""
    return {"providers": [{"name": "endless", "type": "anthropic", "api_key": PROVIDER_KEY,
                           "api_base_url": endless.url},
                          dict(anthropic_provider(upstream), name="good", type="anthropic")],
            "failover": False}


@pytest.mark.parametrize("by_thread", [False, True], ids=["loop reads", "thread reads"])
@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_an_endless_error_is_read_no_further_than_its_beginning(start_proxy, upstream, framing,
                                                                by_thread, monkeypatch):
    """A provider's error status with a body that never ends: its first 64 KB are enough for
    the client's error, and the proxy serves on; so too where a worker thread reads answers
    (Windows' default loop cannot watch sockets)."""
    if by_thread:
        monkeypatch.setattr(ccproxy, "loop_watches_sockets", lambda loop: False)

    def answer(connection, request):
        endless_answer(framing)(_ErrorStatus(connection), request)
    endless = RawProvider(answer)
    upstream.script = lambda r: json_reply(anthropic_message("still here"))
    try:
        proxy = start_proxy(endless_beside_good(endless, upstream))
        client = sdk(proxy).with_options(max_retries=0)
        request = dict(max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(anthropic.APIStatusError) as caught:
            client.messages.create(model="endless,m", **request)
        assert caught.value.status_code == 500 and caught.value.body["type"] == "error"
        assert "xxxx" in caught.value.body["error"]["message"]
        assert client.messages.create(model="good,m", **request).content[0].text == "still here"
    finally:
        endless.close()


class _ErrorStatus:
    """A connection whose answer's status line says 500 Internal Server Error."""

    def __init__(self, connection):
        self._connection = connection

    def sendall(self, data):
        self._connection.sendall(data.replace(b"HTTP/1.1 200 OK", b"HTTP/1.1 500 Oops", 1))


@pytest.mark.parametrize("by_thread", [False, True], ids=["loop reads", "thread reads"])
@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_an_answer_larger_than_any_model_gives_is_cut_off_with_a_502(start_proxy, upstream,
                                                                     monkeypatch, framing,
                                                                     by_thread):
    monkeypatch.setattr(ccproxy, "MAX_ANSWER_BYTES", 1 << 20)
    if by_thread:
        monkeypatch.setattr(ccproxy, "loop_watches_sockets", lambda loop: False)
    endless = RawProvider(endless_answer(framing))
    upstream.script = lambda r: json_reply(anthropic_message("x" * 900000))   # under it: whole
    try:
        proxy = start_proxy(endless_beside_good(endless, upstream))
        client = sdk(proxy)
        request = dict(max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(anthropic.APIStatusError) as caught:
            client.messages.create(model="endless,m", **request)
        assert caught.value.status_code == 502 and caught.value.body["error"]["message"] == (
            "endless answered with more than 1 MiB, more than any answer of a model; check that "
            "its api_base_url is its API")
        assert len(client.messages.create(model="good,m", **request).content[0].text) == 900000
    finally:
        endless.close()
