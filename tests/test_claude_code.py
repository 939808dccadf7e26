"""The real Claude Code CLI, installed from the npm registry, driven headless through
`ccproxy.py code` against a mock OpenAI upstream that makes it run a tool."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, Reply, json_reply

VERSIONS = ["2.1.197", "2.1.330"]      # the two seen to send different requests
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


def openai_answer(message: dict, stream: bool, finish: str):
    """A Chat Completions answer, streamed as chunks or whole."""
    usage = {"prompt_tokens": 900, "completion_tokens": 20, "total_tokens": 920}
    if not stream:
        return json_reply({"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
                           "choices": [{"index": 0, "message": dict(message, role="assistant"),
                                        "finish_reason": finish}], "usage": usage})
    delta = dict(message)
    if "tool_calls" in delta:
        delta["tool_calls"] = [dict(call, index=i) for i, call in enumerate(delta["tool_calls"])]
    chunks = [{"choices": [{"index": 0, "delta": dict(delta, role="assistant"),
                            "finish_reason": None}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]},
              {"choices": [], "usage": usage}]
    pieces = [b"data: %s\n\n" % json.dumps(dict(c, id="c1", object="chat.completion.chunk",
                                                  created=1, model="m")).encode() for c in chunks]
    return Reply(200, pieces=pieces + [b"data: [DONE]\n\n"], content_type="text/event-stream")


FINAL_TEXT = "Done: out.txt now holds hi."


def scripted_model(request):
    """First make Claude Code run Bash; once the tool result is back, answer in text."""
    body = request["json"] or {}
    stream = body.get("stream") is True
    names = [t["function"]["name"] for t in body.get("tools") or ()]
    if any(m.get("role") == "tool" for m in body.get("messages", ())):
        return openai_answer({"content": FINAL_TEXT}, stream, "stop")
    if "Bash" in names:
        call = {"id": "call_1", "type": "function", "function": {
            "name": "Bash", "arguments": json.dumps({"command": "echo hi > out.txt",
                                                     "description": "Write out.txt"})}}
        return openai_answer({"content": None, "tool_calls": [call]}, stream, "tool_calls")
    return openai_answer({"content": "ok"}, stream, "stop")


@pytest.mark.parametrize("version", VERSIONS)
def test_real_claude_code_runs_a_tool_through_ccproxy(version, tmp_path, upstream):
    claude = installed_claude(version)
    upstream.script = scripted_model
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    with __import__("socket").socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = home / "config.json"
    config.write_text(json.dumps({"port": port, "providers": [
        {"name": "openai", "api_base_url": upstream.url + "/v1", "api_key": "sk-test-key-123456789",
         "models": ["gpt-test"]}]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CCPROXY_", "ANTHROPIC_"))}
    env.update(HOME=str(home), CCPROXY_CONFIG=str(config), CLAUDE_PATH=str(claude),
               DISABLE_AUTOUPDATER="1", CLAUDE_CODE_MAX_RETRIES="0")
    result = subprocess.run(
        [sys.executable, str(REPO / "ccproxy.py"), "code", "-p",
         "Create a file out.txt containing hi, using the Bash tool.",
         "--output-format", "json", "--allowedTools", "Bash"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["is_error"] is False and output["result"] == FINAL_TEXT
    assert (work / "out.txt").read_text().strip() == "hi"          # the tool really ran
    sent = [r["json"] for r in upstream.requests if r["json"]]
    assert any(m.get("role") == "tool" and "tool_call_id" in m for b in sent for m in b["messages"])
    assert not (home / ".ccproxy" / "ccproxy.pid").exists()         # code stopped its proxy
