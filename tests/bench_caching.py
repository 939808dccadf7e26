"""Benchmark: the share of a long Claude Code session's input that each provider can serve from
its prompt cache once ccproxy has translated it.

    python3 tests/bench_caching.py [--turns 20]

A session of Claude Code's shape is replayed turn by turn through ccproxy (the first request is
captured from the Claude Code CLI the test suite installs when npm is here, else one of the same
shape is made up; each turn adds thinking, text, a Bash call and its result, and moves the cache
mark to the newest block, as Claude Code does). The mock provider on 127.0.0.1 caches prefixes
by each provider's documented rule (checked 2026-12-05) and reports usage in its own fields;
the figures printed are read back from ccproxy's Anthropic-shaped answers:

  OpenAI (Chat and Responses): automatic from 1,024 tokens, in 128-token steps
    (https://platform.openai.com/docs/guides/prompt-caching)
  DeepSeek (both APIs): automatic, in 64-token units
    (https://api-docs.deepseek.com/guides/kv_cache)
  Gemini: implicit, from 4,096 tokens (https://ai.google.dev/gemini-api/docs/caching)
  Anthropic, and Anthropic models on OpenRouter: at cache_control breakpoints, a breakpoint
    finding a prefix cached at any block up to 20 before it, from 1,024 tokens
    (https://docs.claude.com/en/docs/build-with-claude/prompt-caching,
    https://openrouter.ai/docs/features/prompt-caching)

The mock counts a token per 4 bytes of the provider's own JSON. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_proxy import REPO, free_port, wait_healthy  # noqa: E402
from helpers import without_cache_marks  # noqa: E402

# translator -> (provider config, model, the mock's cache rule)
TRANSLATORS = {
    "openai chat": ({"name": "openai"}, "gpt-5", "openai"),
    "openai responses": ({"name": "openai"}, "gpt-5-codex", "openai"),
    "openrouter (anthropic)": ({"name": "openrouter"}, "anthropic/claude-sonnet-4.5",
                               "breakpoints"),
    "deepseek chat": ({"name": "deepseek"}, "deepseek-v4-pro", "deepseek"),
    "deepseek anthropic": ({"name": "deepseek-anthropic"}, "deepseek-v4-pro", "deepseek"),
    "gemini": ({"name": "gemini"}, "gemini-2.5-pro", "gemini"),
    "anthropic": ({"name": "anthropic"}, "claude-sonnet-4-5", "breakpoints"),
}
IMPLICIT_RULES = {"openai": (1024, 128), "deepseek": (64, 64), "gemini": (4096, 1)}


# --- the provider's prompt, as blocks ---------------------------------------------------------

def prompt_blocks(path: str, body: dict) -> list:
    """(bytes, marked) per block of the prompt in the order the provider reads it: tools, then
    the system prompt, then the conversation."""
    if path.endswith("/messages"):
        system = body.get("system") or []
        parts = body.get("tools", []) + (system if isinstance(system, list) else [system])
        parts += body["messages"]
    elif path.endswith("/responses"):
        parts = body.get("tools", []) + [body.get("instructions")] + body["input"]
    elif ":generateContent" in path:
        parts = body.get("tools", []) + [body.get("systemInstruction")] + body["contents"]
    else:
        parts = body.get("tools", []) + body["messages"]
    return [(json.dumps(without_cache_marks(part), ensure_ascii=False).encode(),
             "cache_control" in json.dumps(part)) for part in parts]


class PromptCache:
    """One provider's prompt cache, by its documented rule."""

    def __init__(self, rule: str):
        self.rule, self.prompts, self.written = rule, [], set()

    def serve(self, blocks: list) -> tuple:
        """(tokens read from cache, tokens written to it, all input tokens) for one prompt."""
        total = sum(len(data) for data, _ in blocks) // 4
        if self.rule == "breakpoints":
            read, write = self.breakpoints(blocks)
        else:
            read, write = self.implicit(b"".join(data for data, _ in blocks)), 0
        return read, write, total

    def implicit(self, prompt: bytes) -> int:
        least, step = IMPLICIT_RULES[self.rule]
        common = max((common_prefix(prompt, seen) for seen in self.prompts), default=0) // 4
        self.prompts.append(prompt)
        return 0 if common < least else common // step * step

    def breakpoints(self, blocks: list) -> tuple:
        ends, digest, size = [], hashlib.sha256(), 0
        for data, _ in blocks:
            digest.update(data)
            size += len(data)
            ends.append((digest.copy().hexdigest(), size // 4))
        marks = [i for i, (_, marked) in enumerate(blocks) if marked]
        read = max((ends[j][1] for m in marks for j in range(max(0, m - 20), m + 1)
                    if ends[j][0] in self.written), default=0)
        fresh = [ends[m] for m in marks if ends[m][1] >= 1024]
        self.written.update(key for key, _ in fresh)
        return read, max([tokens for _, tokens in fresh] + [read]) - read


def common_prefix(a: bytes, b: bytes) -> int:
    size = min(len(a), len(b))
    low, high = 0, size
    while low < high:                    # binary search on equal prefixes
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


# --- the mock provider ------------------------------------------------------------------------

def usage_answer(path: str, model: str, read: int, write: int, total: int) -> dict:
    """A whole answer "ok" with the usage in the provider's own fields."""
    if path.endswith("/messages"):
        return {"id": "msg_1", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                "stop_sequence": None, "usage": {
                    "input_tokens": total - read - write, "output_tokens": 1,
                    "cache_read_input_tokens": read, "cache_creation_input_tokens": write}}
    if path.endswith("/responses"):
        return {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed",
                "model": model, "output": [{"type": "message", "id": "msg_1", "role": "assistant",
                                            "status": "completed", "content": [
                                                {"type": "output_text", "text": "ok",
                                                 "annotations": []}]}],
                "usage": {"input_tokens": total, "output_tokens": 1, "total_tokens": total + 1,
                          "input_tokens_details": {"cached_tokens": read},
                          "output_tokens_details": {"reasoning_tokens": 0}}}
    if ":generateContent" in path:
        return {"candidates": [{"content": {"role": "model", "parts": [{"text": "ok"}]},
                                "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": total, "candidatesTokenCount": 1,
                                  "cachedContentTokenCount": read}}
    return {"id": "c", "object": "chat.completion", "created": 1, "model": model, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": total, "completion_tokens": 1,
                  "prompt_tokens_details": {"cached_tokens": read, "cache_write_tokens": write}}}


def mock_handler(caches: dict):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            rule = self.path.split("/")[1]
            key = (rule, body.get("prompt_cache_key"))
            cache = caches.setdefault(key, PromptCache(rule))
            counts = cache.serve(prompt_blocks(self.path, body))
            answer = json.dumps(usage_answer(self.path, body.get("model", "m"), *counts)).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass
    return Handler


# --- the session ------------------------------------------------------------------------------

def first_request() -> tuple:
    """(Claude Code's first request of a session, where it came from)."""
    if shutil.which("npm"):
        from helpers import CLAUDE_CODE_VERSIONS, capture_claude_code
        version = CLAUDE_CODE_VERSIONS[-1]
        with tempfile.TemporaryDirectory() as folder:
            return (capture_claude_code(version, Path(folder))[0]["json"],
                    "captured from Claude Code " + version)
    words = random.Random(7).choices("the a file tool run read edit code test line shell "
                                     "output path error result project".split(), k=12000)
    text = " ".join(words)
    tools = [{"name": "Tool%d" % n, "description": text[n * 900:n * 900 + 2400],
              "input_schema": {"type": "object", "properties": {
                  "command": {"type": "string", "description": text[n * 50:n * 50 + 300]}}}}
             for n in range(16)]
    return ({"model": "claude-sonnet-4-5", "max_tokens": 32000, "stream": False, "tools": tools,
             "system": [{"type": "text", "text": "You are a coding agent."},
                        {"type": "text", "text": text[:30000],
                         "cache_control": {"type": "ephemeral"}}],
             "messages": [{"role": "user", "content": [
                 {"type": "text", "text": "<system-reminder>" + text[:3000]},
                 {"type": "text", "text": "Fix the failing test.",
                  "cache_control": {"type": "ephemeral"}}]}]}, "made up in Claude Code's shape")


def session(first: dict, turns: int) -> list:
    """Each turn's request: the last one's conversation plus the assistant's thinking, text and
    tool call and the call's result, the cache mark moved to the newest block."""
    bodies, body = [], dict(copy.deepcopy(first), stream=False)
    sizes = random.Random(3)
    for number in range(turns):
        if number:
            body["messages"] = [m if m["role"] == "system" else without_cache_marks(m)
                                for m in body["messages"]]     # the system's marks stay
            body["messages"] += [
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "Looking at step %d." % number,
                     "signature": "sig-%d" % number},
                    {"type": "text", "text": "Running step %d." % number},
                    {"type": "tool_use", "id": "toolu_%02d" % number, "name": "Bash",
                     "input": {"command": "cat part-%d.py" % number}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_%02d" % number,
                     "content": "line %d\n" % number * sizes.randint(40, 400),
                     "cache_control": {"type": "ephemeral"}}]}]
        bodies.append(copy.deepcopy(body))
    return bodies


def replay(proxy: str, name: str, bodies: list) -> list:
    """The cached share of each turn's input, from ccproxy's answers."""
    provider, model, _ = TRANSLATORS[name]
    shares = []
    for body in bodies:
        request = urllib.request.Request(
            proxy + "/v1/messages", json.dumps(dict(body, model=provider["name"] + "," + model))
            .encode(), {"content-type": "application/json", "x-claude-code-session-id":
                        "bench-session-" + name})
        usage = json.load(urllib.request.urlopen(request, timeout=60))["usage"]
        total = usage["input_tokens"] + usage["cache_read_input_tokens"] + usage[
            "cache_creation_input_tokens"]
        shares.append(usage["cache_read_input_tokens"] / total)
    return shares


def provider_config(mock: str) -> list:
    bases = {"openai": "/openai/v1", "openrouter": "/breakpoints/api/v1",
             "deepseek": "/deepseek", "deepseek-anthropic": "/deepseek/anthropic",
             "gemini": "/gemini/v1beta", "anthropic": "/breakpoints"}
    return [{"name": name, "api_key": "k", "api_base_url": mock + path}
            for name, path in bases.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=20)
    turns = parser.parse_args().turns
    first, origin = first_request()
    bodies = session(first, turns)
    server = ThreadingHTTPServer(("127.0.0.1", 0), mock_handler({}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mock = "http://127.0.0.1:%d" % server.server_address[1]
    with tempfile.TemporaryDirectory() as home:
        config, port = Path(home) / "config.json", free_port()
        config.write_text(json.dumps({"providers": provider_config(mock)}))
        proxy = subprocess.Popen([sys.executable, str(REPO / "ccproxy.py"), "start",
                                  "--foreground", "--port", str(port), "--config", str(config)],
                                 stderr=subprocess.DEVNULL, env=dict(os.environ, HOME=home))
        try:
            wait_healthy("http://127.0.0.1:%d" % port)
            report(origin, turns, {name: replay("http://127.0.0.1:%d" % port, name, bodies)
                                   for name in TRANSLATORS})
        finally:
            proxy.terminate()
            proxy.wait(10)
            server.shutdown()


def report(origin: str, turns: int, shares: dict) -> None:
    print("prompt cache, %d-turn session (%s): share of input tokens read from the cache"
          % (turns, origin))
    print("%-24s %7s %7s %7s %14s %14s  %s" % ("translator", "turn 1", "turn 2", "turn 3",
                                              "from 3: min", "from 3: mean", "goal ≥ 90%"))
    for name, values in shares.items():
        later = values[2:]
        print("%-24s %6.1f%% %6.1f%% %6.1f%% %13.1f%% %13.1f%%  %s" % (
            name, *(100 * v for v in values[:3]), 100 * min(later),
            100 * sum(later) / len(later), "met" if min(later) >= 0.9 else "NOT MET"))


if __name__ == "__main__":
    main()
