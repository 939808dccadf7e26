"""Claude Code canary: what does this Claude Code version send that ccproxy has not seen?

    python3 tests/claude_code_canary.py                      # the pinned versions, against the profile
    python3 tests/claude_code_canary.py --version latest     # the newest release on the npm registry
    python3 tests/claude_code_canary.py --version 2.1.330 --update   # record a version's profile

Installs the version (npm, into the test cache), runs a scripted headless session through
ccproxy to a mock Anthropic API — a subagent, tool search, a tool run, thinking — and records
the *shape* of every request Claude Code sent: body fields, `anthropic-beta` values, content
block types, tool names, tool fields and JSON-schema keywords. Names only: none of Claude
Code's text is recorded. The shape is compared with tests/data/claude_code_profile.json; the
exit status is 1 when something is new, with a list of it and of the translations that have no
rule for it (they would log it as unknown and not translate it). Loopback only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import (CLAUDE_CODE_VERSIONS, MockUpstream, RunningProxy,  # noqa: E402
                     installed_claude, json_reply)
import ccproxy  # noqa: E402

PROFILE = Path(__file__).resolve().parent / "data" / "claude_code_profile.json"
KINDS = ("fields", "betas", "blocks", "tool names", "tool fields", "schema keywords")
COVERAGE_KIND = {"fields": "field", "blocks": "block", "tool fields": "tool field"}
SUBAGENT_TOOLS = ("Agent", "Task")


def reply(content, stop_reason="end_turn"):
    """An Anthropic message answering with these blocks."""
    return json_reply({"id": "msg_canary", "type": "message", "role": "assistant",
                       "model": "canary", "content": content, "stop_reason": stop_reason,
                       "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 5}})


def tool_call(name, arguments, number):
    return reply([{"type": "tool_use", "id": "toolu_canary_%d" % number, "name": name,
                   "input": arguments}], "tool_use")


def scripted_session(request):
    """The main thread: start a subagent, load a deferred tool, run Bash, then answer. A
    subagent (it says so in a header) answers at once. Non-streamed: Claude Code accepts it."""
    body = request["json"] or {}
    if request["headers"].get("x-claude-code-agent-id"):
        return reply([{"type": "text", "text": "subagent done"}])
    names = [tool.get("name") for tool in body.get("tools") or ()]
    results = [b.get("tool_use_id") for m in body.get("messages", ())
               for b in (m.get("content") if isinstance(m.get("content"), list) else ())
               if isinstance(b, dict) and b.get("type") == "tool_result"]
    subagent = next((name for name in SUBAGENT_TOOLS if name in names), None)
    steps = [(subagent, {"description": "Say hi", "prompt": "Say hi, nothing else.",
                         "subagent_type": "general-purpose"}),
             ("ToolSearch" if "ToolSearch" in names else None, {"query": "select:WebSearch"}),
             ("Bash", {"command": "echo canary", "description": "Print canary"})]
    steps = [step for step in steps if step[0]]
    if len(results) < len(steps):
        name, arguments = steps[len(results)]
        return tool_call(name, arguments, len(results))
    return reply([{"type": "text", "text": "canary done"}])


def schema_keywords(node, found: set) -> set:
    """Every JSON-schema keyword used in a schema (property names are not keywords)."""
    if isinstance(node, list):
        for child in node:
            schema_keywords(child, found)
    elif isinstance(node, dict):
        for key, value in node.items():
            found.add(key)
            if key in ("properties", "$defs", "definitions", "patternProperties") and \
                    isinstance(value, dict):
                for child in value.values():
                    schema_keywords(child, found)
            elif key not in ("enum", "const", "default", "examples", "required"):
                schema_keywords(value, found)
    return found


def shape_of(requests: list) -> dict:
    """The names that describe what Claude Code sent, by kind."""
    shape = {kind: set() for kind in KINDS}
    for request in requests:
        body = request["json"]
        shape["fields"].update(body)
        shape["betas"].update(b.strip() for b in request["headers"].get("anthropic-beta", "")
                              .split(",") if b.strip())
        for kind, name in ccproxy.request_parts(body):
            if kind == "block":
                shape["blocks"].add(name)
        for message in body.get("messages", ()):
            for block in message.get("content") if isinstance(message.get("content"), list) else ():
                for inner in block.get("content") if isinstance(block.get("content"), list) else ():
                    shape["blocks"].add(inner.get("type"))
        for tool in body.get("tools") or ():
            shape["tool names"].add(tool.get("name"))
            shape["tool fields"].update(tool)
            schema_keywords(tool.get("input_schema"), shape["schema keywords"])
    return {kind: sorted(name for name in names if isinstance(name, str))
            for kind, names in shape.items()}


def run_session(version: str) -> dict:
    """Install the version, run the scripted session through ccproxy, return its shape."""
    claude = installed_claude(version)
    mock = MockUpstream()
    mock.script = scripted_session
    proxy = RunningProxy(ccproxy.build_config({"port": 0, "providers": [
        {"name": "mock", "type": "anthropic", "api_base_url": mock.url}]}, "canary", {}))
    try:
        with tempfile.TemporaryDirectory() as folder:
            home = Path(folder) / "home"
            home.mkdir()
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("ANTHROPIC_", "CLAUDE", "CCPROXY_"))}
            env.update(HOME=str(home), ANTHROPIC_BASE_URL=proxy.url, ANTHROPIC_AUTH_TOKEN="c",
                       DISABLE_TELEMETRY="1", CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
                       DISABLE_AUTOUPDATER="1", CLAUDE_CODE_MAX_RETRIES="0",
                       ENABLE_TOOL_SEARCH="true", MAX_THINKING_TOKENS="2048")
            result = subprocess.run(
                [str(claude), "-p", "Start a subagent, then run echo canary with Bash.",
                 "--output-format", "json", "--allowedTools", "Bash,Agent,Task,ToolSearch"],
                cwd=folder, env=env, capture_output=True, text=True, timeout=300,
                stdin=subprocess.DEVNULL)
            if result.returncode != 0:
                raise RuntimeError("claude %s failed: %s" % (version, result.stderr[-1000:]))
        return shape_of([r for r in mock.requests if r["method"] == "POST" and r["json"]])
    finally:
        proxy.stop()
        mock.close()


def differences(shape: dict, profile: dict) -> list:
    """Lines naming what is new in shape, and the translations that have no rule for it."""
    lines = []
    for kind in KINDS:
        for name in sorted(set(shape[kind]) - set(profile.get(kind, ()))):
            missing = sorted({protocol.name for protocol in ccproxy.PROTOCOLS.values()
                              if protocol.coverage is not None and kind in COVERAGE_KIND
                              and name not in protocol.coverage[COVERAGE_KIND[kind]]})
            lines.append("new %s: %s%s" % (kind.rstrip("s") if kind != "betas" else "beta", name,
                                           "; no rule in the %s translation" % ", ".join(missing)
                                           if missing else ""))
    return lines


def check(version: str, update: bool = False) -> list:
    """The differences of a version from its recorded profile (latest: from the newest one)."""
    profiles = json.loads(PROFILE.read_text()) if PROFILE.exists() else {}
    shape = run_session(version)
    if update:
        profiles[version] = shape
        PROFILE.write_text(json.dumps(profiles, indent=1, sort_keys=True) + "\n")
        return []
    known = profiles.get(version) or profiles[max(profiles, key=lambda v: tuple(
        int(part) for part in v.split(".")))]
    return differences(shape, known)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="append", help="a Claude Code version, or latest")
    parser.add_argument("--update", action="store_true", help="record the version's profile")
    args = parser.parse_args(argv)
    failed = False
    for version in args.version or CLAUDE_CODE_VERSIONS:
        lines = check(version, args.update)
        print("%s: %s" % (version, "recorded" if args.update else
                          "nothing new" if not lines else "%d new" % len(lines)))
        for line in lines:
            print("  " + line)
        failed = failed or bool(lines)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
