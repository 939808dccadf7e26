#!/usr/bin/env python3
"""A bare Anthropic-to-OpenAI relay, for benchmarks: what an architecture costs without the work.

    python3 floor_relay.py --port PORT --upstream-port MOCK_PORT
                           [--upstream thread|urllib|thread-head|asyncio] [--work-ms MS]

It answers POST /v1/messages (JSON or a stream) by calling the OpenAI mock (mock_openai.py) and
GET /health, and does nothing else: no checks, no routing, no errors, no usage or records, the
answer's text the only thing it translates (a stream's opening and closing events are canned).
What is left is the shape itself, so a benchmark can tell what a proxy's own work costs from
what its architecture does:

  --upstream thread   ccproxy's design: an asyncio-streams server, and a worker thread that sends
                      the upstream request with http.client (urllib's HTTP layer, here without
                      urllib's handlers above it), keep-alive, one connection per client
                      connection; the event loop reads the answer, head and body
  --upstream urllib   the same, the worker sending through a urllib opener (one handler, which
                      sends on the kept-alive connection and leaves the answer to the loop): the
                      least the design ccproxy must keep (urllib makes every upstream request)
                      can cost
  --upstream thread-head
                      ccproxy's design until 2026-12-06: the worker thread also waits for the
                      answer's head, and reads a JSON answer's body; the loop reads a stream's
  --upstream asyncio  the same relay with the upstream call made by the event loop itself
                      (asyncio streams, hand-written HTTP/1.1): no worker thread, no urllib
  --work-ms MS        CPU spent on the event loop for every request before its upstream call,
                      standing in for a proxy's own work (checks, routing, translation): what
                      the targets leave a proxy to spend

Only for the mock: it trusts every byte it is sent. Loopback only; never expose it.
"""
import argparse
import asyncio
import concurrent.futures
import http.client
import json
import re
import time
import urllib.request

CONTENT = re.compile(rb'"content":"((?:[^"\\]|\\.)+)"')      # the mock's text deltas
STREAM_END = b"\r\n0\r\n\r\n"                                   # the last chunk of a chunked body
OPENING = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_floor",'
           b'"type":"message","role":"assistant","model":"%s","content":[],"stop_reason":null,'
           b'"stop_sequence":null,"usage":{"input_tokens":1,"output_tokens":0}}}\n\n'
           b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
           b'"content_block":{"type":"text","text":""}}\n\n')
TEXT_DELTA = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
              b'"delta":{"type":"text_delta","text":"%s"}}\n\n')
CLOSING = (b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
           b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
           b'"end_turn","stop_sequence":null},"usage":{"output_tokens":1}}\n\n'
           b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
MESSAGE = ('{"id":"msg_floor","type":"message","role":"assistant","model":"%s","content":'
           '[{"type":"text","text":"%s"}],"stop_reason":"end_turn","stop_sequence":null,'
           '"usage":{"input_tokens":1,"output_tokens":1}}')
MOCK_HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-floor"}
HEALTH = (b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n'
          b'{"ok":true}')


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def openai_body(request: dict) -> bytes:
    """The mock's request: the Anthropic messages' text as they are (strings only)."""
    body = {"model": "mock-model", "max_tokens": request.get("max_tokens", 1024),
            "messages": request["messages"], "stream": bool(request.get("stream"))}
    return json.dumps(body).encode()


class Relay:
    """One server: the mock's address, and how upstream calls are made."""

    def __init__(self, upstream_port: int, mode: str, work_seconds: float = 0.0):
        self.upstream_port, self.mode, self.work_seconds = upstream_port, mode, work_seconds
        self.workers = concurrent.futures.ThreadPoolExecutor(1024)
        self.opener = urllib.request.OpenerDirector()
        self.opener.add_handler(SendingHandler())
        self.url = "http://127.0.0.1:%d/v1/chat/completions" % upstream_port

    async def serve(self, reader, writer) -> None:
        upstream = Upstream(self, asyncio.get_running_loop())
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET"):
                    writer.write(HEALTH)
                    continue
                length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
                request = json.loads(await reader.readexactly(length))
                await upstream.answer(request, writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            upstream.close()
            writer.close()


class Upstream:
    """A client connection's keep-alive connection to the mock, made and read as --upstream says."""

    def __init__(self, relay: Relay, loop):
        self.relay, self.loop = relay, loop
        self.connection = http.client.HTTPConnection("127.0.0.1", relay.upstream_port, timeout=60)
        self.streams = None                      # (reader, writer) in asyncio mode

    async def answer(self, request: dict, writer) -> None:
        work_until = time.thread_time() + self.relay.work_seconds
        while time.thread_time() < work_until:
            pass
        model = request["model"].encode()
        if not request.get("stream"):
            texts = CONTENT.findall(await self.call(openai_body(request), stream=False))
            message = (MESSAGE % (request["model"], texts[0].decode() if texts else "")).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(message), message))
            return
        pending = await self.call(openai_body(request), stream=True)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n" + chunk(OPENING % model))
        while True:
            cut = pending.rfind(b"\n\n") + 2 if b"\n\n" in pending else 0   # whole events
            events = b"".join(TEXT_DELTA % text for text in CONTENT.findall(pending[:cut]))
            if events:
                writer.write(chunk(events))
            if pending.endswith(STREAM_END):
                break
            await writer.drain()
            more = await self.read_more()
            if not more:
                raise ConnectionError("the mock closed the stream before its end")
            pending = pending[cut:] + more
        self.stream_ended()
        writer.write(chunk(CLOSING) + b"0\r\n\r\n")

    async def call(self, body: bytes, stream: bool) -> bytes:
        """Send the request: the JSON answer's body, or what has come of the stream's body."""
        if self.relay.mode == "asyncio":
            return await self.call_from_loop(body, stream)
        if self.relay.mode == "thread-head":
            return await self.loop.run_in_executor(self.relay.workers, self.call_blocking, body,
                                                   stream)
        send = self.send_by_urllib if self.relay.mode == "urllib" else self.send_blocking
        await self.loop.run_in_executor(self.relay.workers, send, body)
        return await self.answer_from_loop(stream)

    def send_by_urllib(self, body: bytes) -> None:
        """Worker thread: send the request through the relay's urllib opener."""
        request = urllib.request.Request(self.relay.url, data=body, method="POST",
                                         headers=MOCK_HEADERS)
        request.relay_upstream = self
        self.relay.opener.open(request, timeout=60)

    def send_blocking(self, body: bytes, method: str = "POST",
                      path: str = "/v1/chat/completions", headers: dict = MOCK_HEADERS) -> None:
        """Worker thread: send the request (then the event loop reads the answer)."""
        if self.connection.sock is not None:
            self.connection.sock.settimeout(60)          # blocking again, for the send
        self.connection.request(method, path, body, headers)
        self.connection.sock.setblocking(False)
        self.connection._HTTPConnection__state = http.client._CS_IDLE   # answered by the loop

    async def answer_from_loop(self, stream: bool) -> bytes:
        """The event loop reads the answer from the socket the worker sent on: a JSON answer's
        body, or what has come of the stream's body after its head."""
        received = b""
        while b"\r\n\r\n" not in received:
            received += await self.loop.sock_recv(self.connection.sock, 65536)
        head, _, rest = received.partition(b"\r\n\r\n")
        if stream:
            return rest
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
        while len(rest) < length:
            rest += await self.loop.sock_recv(self.connection.sock, 65536)
        return rest

    def call_blocking(self, body: bytes, stream: bool) -> bytes:
        """Worker thread: send, read the head; the whole body of a JSON answer, and of a stream
        what came with the head (the event loop reads the rest from the socket)."""
        self.connection.request("POST", "/v1/chat/completions", body, MOCK_HEADERS)
        response = self.connection.getresponse()
        if not stream:
            return response.read()
        self.connection.sock.setblocking(False)
        buffered = response.fp.read1(65536) or b""      # no waiting: what is buffered or ready
        response.fp = None                                # the loop reads the socket from here
        response.close()
        return buffered

    async def read_more(self) -> bytes:
        if self.relay.mode == "asyncio":
            return await self.streams[0].read(65536)
        return await self.loop.sock_recv(self.connection.sock, 65536)

    def stream_ended(self) -> None:
        if self.relay.mode == "thread-head":
            self.connection.sock.settimeout(60)          # blocking again, for the next call

    async def call_from_loop(self, body: bytes, stream: bool) -> bytes:
        if self.streams is None:
            self.streams = await asyncio.open_connection("127.0.0.1", self.relay.upstream_port)
        reader, writer = self.streams
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nAuthorization: Bearer sk-floor\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        if stream:
            return await reader.read(65536)
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
        return await reader.readexactly(length)

    def close(self) -> None:
        self.connection.close()
        if self.streams is not None:
            self.streams[1].close()


class SendingHandler(urllib.request.HTTPHandler):
    """urllib's HTTP handler, sending on the client connection's kept-alive connection to the
    mock and leaving the answer to the event loop."""

    def http_open(self, req):
        headers = dict(req.unredirected_hdrs)
        headers.update(req.headers)
        req.relay_upstream.send_blocking(req.data, req.get_method(), req.selector, headers)
        return True          # the answer, for urllib: the loop reads the real one


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--upstream", choices=("thread", "urllib", "thread-head", "asyncio"),
                        default="thread")
    parser.add_argument("--work-ms", type=float, default=0.0)
    options = parser.parse_args()
    relay = Relay(options.upstream_port, options.upstream, options.work_ms / 1000)
    server = await asyncio.start_server(relay.serve, "127.0.0.1", options.port, backlog=4096)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
