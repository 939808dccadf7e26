"""Benchmark: the latency ccproxy adds, per JSON request and per streamed event, against the
same mock upstream reached directly in the same run; plus start-to-healthy time and memory, and
how translating a turn grows with its tool calls.

    python3 tests/bench_proxy.py [--requests 500]

Everything runs on 127.0.0.1: a small asyncio mock provider (Anthropic and OpenAI shapes) in
one process, ccproxy in another, this client in a third. Figures are medians; they depend on the
machine, so compare ratios between runs, not absolute numbers. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVENTS = 200

MOCK = r'''
import asyncio, json, sys
def sse(name, data): return b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(data).encode())
MESSAGE = json.dumps({"id": "m", "type": "message", "role": "assistant", "model": "m",
    "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 1, "output_tokens": 1}}).encode()
ANTHROPIC = [sse("message_start", {"type": "message_start", "message": {"id": "m", "type": "message",
    "role": "assistant", "model": "m", "content": [], "stop_reason": None, "stop_sequence": None,
    "usage": {"input_tokens": 1, "output_tokens": 1}}}),
    sse("content_block_start", {"type": "content_block_start", "index": 0,
                                "content_block": {"type": "text", "text": ""}})]
ANTHROPIC += [sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                  "delta": {"type": "text_delta", "text": "tok "}})] * EVENTS_COUNT
ANTHROPIC += [sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
              sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                    "usage": {"output_tokens": EVENTS_COUNT}}),
              sse("message_stop", {"type": "message_stop"})]
def chunk(delta, finish=None):
    return b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1,
        "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}).encode() + b"\n\n"
OPENAI = [chunk({"content": "tok "})] * EVENTS_COUNT + [chunk({}, "stop"),
    b'data: {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": EVENTS_COUNT}}\n\n', b"data: [DONE]\n\n"]
COMPLETION = json.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(l.split(b":")[1]) for l in head.split(b"\r\n")
                           if l.lower().startswith(b"content-length:")), 0)
            body = await reader.readexactly(length)
            openai = b"chat/completions" in head.split(b"\r\n")[0]
            if b'"stream":true' in body.replace(b" ", b""):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                for event in (OPENAI if openai else ANTHROPIC):
                    writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            else:
                answer = COMPLETION if openai else MESSAGE
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
asyncio.run(main())
'''.replace("EVENTS_COUNT", str(EVENTS))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(url: str, seconds: float = 10) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            return time.perf_counter() - started
        except OSError:
            time.sleep(0.002)
    raise SystemExit("no answer from " + url)


def timed_requests(port: int, path: bytes, stream: bool, count: int, model: str = "m") -> float:
    """Median microseconds per request on one keep-alive connection."""
    body = json.dumps({"model": model, "max_tokens": 5, "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" \
              b"Content-Length: %d\r\n\r\n%s" % (path, len(body), body)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = sock.makefile("rb")
    times = []
    for _ in range(count):
        started = time.perf_counter()
        sock.sendall(request)
        reader.readline()
        headers = {}
        while True:
            line = reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        if "content-length" in headers:
            reader.read(int(headers["content-length"]))
        else:
            while True:
                size = int(reader.readline(), 16)
                reader.read(size + 2)
                if size == 0:
                    break
        times.append(time.perf_counter() - started)
    sock.close()
    return statistics.median(times) * 1e6


def rss_kb(pid: int) -> int:
    try:
        return int(Path("/proc/%d/status" % pid).read_text().split("VmHWM:")[1].split()[0])
    except (OSError, IndexError):
        return 0


def tool_search_saving() -> None:
    """What deferring tools saves: the first request of a real Claude Code 2.1.330 run with
    ENABLE_TOOL_SEARCH=true, translated for an OpenAI provider, with and without the deferred
    tools (ccproxy's estimate of the upstream input tokens)."""
    sys.path[:0] = [str(REPO), str(REPO / "tests")]          # (no install needed)
    import ccproxy
    from helpers import capture_claude_code
    with tempfile.TemporaryDirectory() as folder:
        body = capture_claude_code("2.1.330", Path(folder), env={"ENABLE_TOOL_SEARCH": "true"})[0]["json"]
    provider = ccproxy.build_config({"providers": [{"name": "openai", "api_key": "k"}]}, "b",
                                    {}).providers[0]
    deferred = [t for t in body["tools"] if t.get("defer_loading")]
    every = dict(body, tools=[dict(t, defer_loading=False) for t in body["tools"]])
    sizes = [ccproxy.estimate_text_tokens(json.dumps(ccproxy.openai_request_from_anthropic(
        b, provider, "gpt-4.1"))) for b in (every, body)]
    print("tool search (2.1.330, %d of %d tools deferred): first request %d tokens upstream with "
          "every tool, %d with deferred tools held back (%.0f%% less)" % (
              len(deferred), len(body["tools"]), sizes[0], sizes[1],
              100.0 * (sizes[0] - sizes[1]) / sizes[0]))


def translation_scaling() -> None:
    """How translating a turn grows with its tool calls (each answered in the next turn): as
    the calls do, for each protocol (a turn of 4,000 took 0.17 s to Chat Completions and 0.37 s
    to Gemini, 8,000 four times that, while each result was looked for among all the calls)."""
    sys.path.insert(0, str(REPO))
    import ccproxy
    providers = ccproxy.build_config({"providers": [
        {"name": "openai", "api_key": "k"}, {"name": "gemini", "api_key": "k"},
        {"name": "responses", "type": "openai", "api": "responses", "api_key": "k",
         "api_base_url": "https://example.invalid/v1"}]}, "bench", {}).providers
    for calls in (2000, 4000, 8000):
        raw = json.dumps({"model": "m", "max_tokens": 100, "messages": [
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t%d" % n,
                                               "name": "Read", "input": {}} for n in range(calls)]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t%d" % n,
                                          "content": "ok"} for n in range(calls)]}]}).encode()
        request = ccproxy.parse_request_head(b"POST /v1/messages HTTP/1.1\r\n\r\n")
        request.body = raw
        row = []
        for provider in providers:
            body = ccproxy.checked_messages_body(request)
            started = time.perf_counter()
            ccproxy.protocol_for(provider, "m").messages_request(provider, "m", request, body)
            row.append("%s %.0f ms" % (provider.name, (time.perf_counter() - started) * 1000))
        print("translating a turn of %d tool calls (%d KB): %s" % (calls, len(raw) // 1024,
                                                                   ", ".join(row)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    count = parser.parse_args().requests
    translation_scaling()
    if shutil.which("npm"):
        tool_search_saving()
    with tempfile.TemporaryDirectory() as home:
        upstream_port, proxy_port = free_port(), free_port()
        mock = subprocess.Popen([sys.executable, "-c", MOCK, str(upstream_port)])
        config = Path(home) / "config.json"
        upstream = "http://127.0.0.1:%d" % upstream_port
        config.write_text(json.dumps({"providers": [
            {"name": "anthropic", "api_key": "k", "api_base_url": upstream, "models": ["m"]},
            {"name": "openai", "api_key": "k", "api_base_url": upstream + "/v1",
             "models": ["openai-m"]}]}))
        started = time.perf_counter()
        proxy = subprocess.Popen([sys.executable, str(REPO / "ccproxy.py"), "start", "--foreground",
                                  "--port", str(proxy_port), "--config", str(config)],
                                 stderr=subprocess.DEVNULL, env=dict(os.environ, HOME=home))
        try:
            wait_healthy("http://127.0.0.1:%d" % proxy_port)
            startup = time.perf_counter() - started
            wait_healthy(upstream)
            print("start to healthy: %.3f s" % startup)
            print("%-26s %12s %12s %12s %10s" % ("case", "direct µs", "proxy µs", "added µs",
                                                "µs/event"))
            for name, stream in (("anthropic json", False), ("anthropic stream", True)):
                timed_requests(upstream_port, b"/v1/messages", stream, 50)
                timed_requests(proxy_port, b"/v1/messages", stream, 50)
                direct = timed_requests(upstream_port, b"/v1/messages", stream, count)
                proxied = timed_requests(proxy_port, b"/v1/messages", stream, count)
                print("%-26s %12.0f %12.0f %12.0f %10s" % (
                    name, direct, proxied, proxied - direct,
                    "%.1f" % ((proxied - direct) / EVENTS) if stream else "-"))
            for name, stream in (("openai json", False), ("openai stream", True)):
                timed_requests(proxy_port, b"/v1/messages", stream, 50, "openai-m")
                proxied = timed_requests(proxy_port, b"/v1/messages", stream, count, "openai-m")
                direct = timed_requests(upstream_port, b"/v1/chat/completions", stream, count)
                print("%-26s %12.0f %12.0f %12.0f %10s" % (
                    name, direct, proxied, proxied - direct,
                    "%.1f" % ((proxied - direct) / EVENTS) if stream else "-"))
        finally:
            print("proxy peak RSS: %d KB" % rss_kb(proxy.pid))
            proxy.terminate()
            mock.terminate()
            proxy.wait(10)
            mock.wait(10)


if __name__ == "__main__":
    main()
