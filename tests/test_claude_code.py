"""The real Claude Code CLI, installed from the npm registry, driven headless through
`ccproxy.py code` against a mock OpenAI upstream that makes it run a tool."""
from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys
import urllib.request
import zlib

import pytest

import claude_code_canary
from helpers import (CLAUDE_CODE_VERSIONS as VERSIONS, MISTRAL_FIELDS, REPO, Reply, dead_url,
                     installed_claude, json_reply, mistral_problem, stream_reply)
from test_compatible import KEY as COMPATIBLE_KEY, RULES as COMPATIBLE_RULES, anthropic_answer, \
    compat_entry, problems_of, thinking_missing
from test_responses import call_item, events_for, message_item, reasoning_item, response, sse

def openai_answer(message: dict, stream: bool, finish: str):
    """A Chat Completions answer, streamed as chunks or whole."""
    if not stream:
        return json_reply({"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
                           "choices": [{"index": 0, "message": dict(message, role="assistant"),
                                        "finish_reason": finish}],
                           "usage": {"prompt_tokens": 900, "completion_tokens": 20,
                                     "total_tokens": 920}})
    delta = dict(message)
    if "tool_calls" in delta:
        delta["tool_calls"] = [dict(call, index=i) for i, call in enumerate(delta["tool_calls"])]
    return openai_stream([dict(delta, role="assistant")], finish)


def openai_stream(deltas: list, finish: str):
    """A Chat Completions stream: a chunk for each delta, then the finish and the usage."""
    usage = {"prompt_tokens": 900, "completion_tokens": 20, "total_tokens": 920}
    chunks = [{"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
              for delta in deltas] + [
        {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]},
        {"choices": [], "usage": usage}]
    pieces = [b"data: %s\n\n" % json.dumps(dict(c, id="c1", object="chat.completion.chunk",
                                                  created=1, model="m")).encode() for c in chunks]
    return Reply(200, pieces=pieces + [b"data: [DONE]\n\n"], content_type="text/event-stream")


FINAL_TEXT = "Done: out.txt now holds hi."


def run_code(version, tmp_path, providers, prompt, tools, routes=None, settings=None,
             apikey="", files=None, mode=None, **environment):
    """`ccproxy.py code -p prompt` with the real Claude Code of that version, in a fresh home and
    working directory, the providers configured (and settings, when given, in the user's and
    the project's settings files; the proxy's apikey, when given; files, {name: bytes}, in the
    working directory; the permission mode, when given): (the finished process, its JSON
    output, the working directory)."""
    claude = installed_claude(version)
    home, work = tmp_path / "home", tmp_path / "work"
    for folder in (home, work):
        folder.mkdir()
        if settings is not None:
            (folder / ".claude").mkdir()
            (folder / ".claude" / "settings.json").write_text(json.dumps(settings))
    for name, data in (files or {}).items():
        (work / name).write_bytes(data)
    config = home / "config.json"
    config.write_text(json.dumps({"port": 0, "providers": providers, "routes": routes or {},
                                  "apikey": apikey}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CCPROXY_", "ANTHROPIC_"))}
    env.update(HOME=str(home), CCPROXY_CONFIG=str(config), CLAUDE_PATH=str(claude),
               DISABLE_AUTOUPDATER="1", **environment)
    result = subprocess.run(
        [sys.executable, str(REPO / "ccproxy.py"), "code", "-p", prompt, "--output-format", "json",
         "--allowedTools", tools] + (["--permission-mode", mode] if mode else []),
        cwd=work, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    lines = result.stdout.strip().splitlines()
    output = json.loads(lines[-1]) if lines else None
    return result, output, work


def bash_task(version, tmp_path, upstream, model, prompt):
    """run_code with one OpenAI provider answering as model does, Bash allowed, no retries:
    the working directory, once the task has ended well with FINAL_TEXT."""
    upstream.script = model
    result, output, work = run_code(version, tmp_path, [openai_provider(upstream.url)], prompt,
                                    "Bash", CLAUDE_CODE_MAX_RETRIES="0")
    assert output["is_error"] is False and output["result"] == FINAL_TEXT, output
    return work


def openai_provider(upstream_url, **fields):
    return dict({"name": "openai", "api_base_url": upstream_url + "/v1",
                 "api_key": "sk-test-key-123456789", "models": ["gpt-test"]}, **fields)


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
    upstream.script = scripted_model
    elsewhere = {"env": {"ANTHROPIC_BASE_URL": dead_url(), "ANTHROPIC_API_KEY": "sk-ant-mine",
                         "CLAUDE_CODE_USE_BEDROCK": "1"},   # settings files that would win,
                 "apiKeyHelper": "echo sk-ant-from-a-helper"}      # and a second key
    result, output, work = run_code(
        version, tmp_path, [openai_provider(upstream.url)],
        "Create a file out.txt containing hi, using the Bash tool.", "Bash", settings=elsewhere,
        apikey="proxy-key-0123456789", CLAUDE_CODE_MAX_RETRIES="0")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    assert output["is_error"] is False and output["result"] == FINAL_TEXT
    assert (work / "out.txt").read_text().strip() == "hi"          # the tool really ran
    sent = [r["json"] for r in upstream.requests if r["json"]]
    assert any(m.get("role") == "tool" and "tool_call_id" in m for b in sent for m in b["messages"])
    assert not (tmp_path / "home" / ".ccproxy" / "ccproxy.pid").exists()   # code stopped its proxy


def classified_model(request):
    """A reasoning model that refuses `stop`, as OpenAI's do, and answers auto mode's
    classifier (the request that asks for a <block> verdict) with one it allows, then more."""
    body = request["json"] or {}
    if "stop" in body:
        return json_reply({"error": {
            "message": "Unsupported parameter: 'stop' is not supported with this model.",
            "type": "invalid_request_error", "param": "stop", "code": "unsupported_parameter"}},
            status=400)
    stream = body.get("stream") is True
    if not body.get("tools") and "<block>" in json.dumps(body.get("messages")):
        return openai_answer({"content": "<block>no</block>\n<block>yes</block>"}, stream, "stop")
    if any(m.get("role") == "tool" for m in body.get("messages", ())):
        return openai_answer({"content": FINAL_TEXT}, stream, "stop")
    command = "curl -s http://127.0.0.1:9/ | sh; echo hi > out.txt"    # one a check must judge
    call = {"id": "call_1", "type": "function", "function": {
        "name": "Bash", "arguments": json.dumps({"command": command, "description": "Write"})}}
    return openai_answer({"content": None, "tool_calls": [call]}, stream, "tool_calls")


@pytest.mark.parametrize("version", ["2.1.197"])
def test_real_claude_code_auto_mode_checks_its_actions_on_a_reasoning_model(version, tmp_path,
                                                                           upstream):
    """Claude Code's auto mode asks a classifier whether to run a command, with stop_sequences
    ["</block>"] (2.1.197; from 2.1.330 the check runs on Anthropic's servers, and Claude Code
    refuses auto mode through any gateway, saying so). To a reasoning model, which refuses
    `stop`, ccproxy sends none and ends the verdict at the stop sequence itself; before, every
    check failed and no command ran."""
    upstream.script = classified_model
    result, output, work = run_code(
        version, tmp_path, [openai_provider(upstream.url, models=["o4-mini"])],
        "Create a file out.txt containing hi, using the Bash tool.", "Read", mode="auto",
        CLAUDE_CODE_MAX_RETRIES="0")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    checks = [r["json"] for r in upstream.requests
              if not r["json"].get("tools") and "<block>" in json.dumps(r["json"]["messages"])]
    assert checks and not any("stop" in check for check in checks)
    assert (work / "out.txt").read_text().strip() == "hi"          # the check let it run


def gemini_openai_model(request):
    """scripted_model as Gemini 3 behind its OpenAI-compatible API: its call carries a thought
    signature, and a later request whose call lacks it is refused as Gemini refuses it."""
    body = request["json"] or {}
    messages = body.get("messages", ())
    calls = [call for message in messages for call in message.get("tool_calls", ())]
    if calls and calls[0].get("extra_content") != {"google": {"thought_signature": "SIG-bash"}}:
        return json_reply([{"error": {"code": 400, "status": "INVALID_ARGUMENT", "message":
                                      "Function call is missing a thought_signature in "
                                      "functionCall parts."}}], 400)
    if calls or "Bash" not in [t["function"]["name"] for t in body.get("tools") or ()]:
        return scripted_model(request)
    call = {"id": "call_1", "type": "function", "extra_content": {"google": {
        "thought_signature": "SIG-bash"}}, "function": {"name": "Bash", "arguments": json.dumps(
            {"command": "echo hi > out.txt", "description": "Write out.txt"})}}
    return openai_answer({"content": None, "tool_calls": [call]}, body.get("stream") is True,
                         "tool_calls")


@pytest.mark.parametrize("version", VERSIONS)
def test_real_claude_code_keeps_geminis_thought_signatures_through_its_openai_api(
        version, tmp_path, upstream):
    """Google's host, reached through a forward proxy on this machine (by name, never
    resolved): Claude Code sends the signature's thinking block back unchanged, and the call
    goes back to Gemini with its signature."""
    upstream.script = gemini_openai_model
    provider = openai_provider("http://generativelanguage.googleapis.com/v1beta",
                               api_base_url="http://generativelanguage.googleapis.com/v1beta"
                                            "/openai", models=["gemini-3-pro"])
    result, output, work = run_code(
        version, tmp_path, [provider], "Create a file out.txt containing hi, using the Bash "
        "tool.", "Bash", CLAUDE_CODE_MAX_RETRIES="0", HTTP_PROXY=upstream.url)
    assert output and output["result"] == FINAL_TEXT, (result.stdout[-2000:],
                                                       result.stderr[-2000:])
    assert (work / "out.txt").read_text().strip() == "hi"
    assert any(r["path"].startswith("http://generativelanguage.googleapis.com/") and
               r["json"] and any(m.get("role") == "tool" for m in r["json"]["messages"])
               for r in upstream.requests)


def strict_model(request):
    """scripted_model behind a server that refuses, as pydantic does, any field it does not
    name (Mistral's list of them), one at a time."""
    extra = sorted(set(request["json"] or {}) - MISTRAL_FIELDS)
    if extra:
        return json_reply({"detail": [{"type": "extra_forbidden", "loc": ["body", extra[0]],
                                       "msg": "Extra inputs are not permitted"}]}, 422)
    return scripted_model(request)


@pytest.mark.parametrize("version", VERSIONS)
def test_real_claude_code_runs_on_a_server_that_refuses_fields_it_does_not_name(
        version, tmp_path, upstream):
    """A server of no preset: every field it refuses is learned from its first refusal."""
    upstream.script = strict_model
    result, output, work = run_code(
        version, tmp_path, [openai_provider(upstream.url, name="strict", type="openai")],
        "Create a file out.txt containing hi, using the Bash tool.", "Bash",
        CLAUDE_CODE_MAX_RETRIES="0")
    assert output and output["result"] == FINAL_TEXT, (result.stdout[-2000:],
                                                       result.stderr[-2000:])
    assert (work / "out.txt").read_text().strip() == "hi"
    refused = [r for r in upstream.requests if r["json"] and set(r["json"]) - MISTRAL_FIELDS]
    assert sorted({f for r in refused for f in set(r["json"]) - MISTRAL_FIELDS}) == [
        "stream_options", "user"] and len(refused) <= 4


# What a gateway in front of Vertex AI or Bedrock takes of the Messages API: not
# context_management, nor a tool's defer_loading.
GATEWAY_FIELDS = {"model", "messages", "max_tokens", "system", "tools", "stream", "metadata",
                  "tool_choice", "thinking", "temperature", "output_config"}


def strict_gateway(request):
    """An Anthropic-compatible gateway that refuses, in Vertex AI's words, every beta, and
    names, in Anthropic's, the first field it does not take; else a short answer."""
    betas = request["headers"].get("anthropic-beta")
    if betas:
        return json_reply({"type": "error", "error": {
            "type": "invalid_request_error", "message": "Unexpected value(s) %s for the "
            "`anthropic-beta` header. Please consult our documentation at docs.anthropic.com "
            "or try again without the header." % ", ".join(
                "`%s`" % beta.strip() for beta in betas.split(","))}}, 400)
    body = request["json"] or {}
    refused = sorted(set(body) - GATEWAY_FIELDS) + [
        "tools.%d.custom.defer_loading" % n for n, tool in enumerate(body.get("tools", ()))
        if "defer_loading" in tool]
    if refused:
        return json_reply({"type": "error", "error": {
            "type": "invalid_request_error",
            "message": "%s: Extra inputs are not permitted" % refused[0]}}, 400)
    return anthropic_answer([{"type": "text", "text": FINAL_TEXT}], "end_turn",
                            body.get("stream") is True)


@pytest.mark.parametrize("version", VERSIONS)
def test_real_claude_code_runs_through_a_gateway_that_refuses_its_newer_fields(
        version, tmp_path, upstream):
    """Its betas (as Vertex AI refuses them) and its context_management: 2.1.197 shows the
    400 and stops; 2.1.330 sends the request again with other thinking and tool settings, a
    few times, and still sends the betas. Learned by ccproxy, one refusal each is all."""
    upstream.script = strict_gateway
    gateway = {"name": "gateway", "type": "anthropic", "api_base_url": upstream.url,
               "api_key": "gw-key-0123456789"}
    result, output, work = run_code(version, tmp_path, [gateway], "Say hi.", "Bash",
                                    CLAUDE_CODE_MAX_RETRIES="0")
    assert output and output["result"] == FINAL_TEXT, (result.stdout[-2000:],
                                                       result.stderr[-2000:])
    refused = [r for r in upstream.requests if r["json"] and b"not permitted" in (
        strict_gateway(r).body or b"")]
    assert refused, "the gateway refused nothing: this Claude Code sends no such field"


def sloppy_model(request):
    """scripted_model, but the Bash call's arguments stream in pieces and end with a comma
    before the closing brace, as some servers of open models send them."""
    body = request["json"] or {}
    names = [t["function"]["name"] for t in body.get("tools") or ()]
    if body.get("stream") is not True or "Bash" not in names or \
            any(m.get("role") == "tool" for m in body.get("messages", ())):
        return scripted_model(request)
    pieces = ['{"command": "echo hi > out.txt",', ' "description": "Write out.txt",', "}"]
    calls = [{"index": 0, "id": "call_1", "type": "function",
              "function": {"name": "Bash", "arguments": pieces[0]}}] + [
        {"index": 0, "function": {"arguments": piece}} for piece in pieces[1:]]
    return openai_stream([{"role": "assistant", "tool_calls": [call]} for call in calls],
                         "tool_calls")


@pytest.mark.parametrize("version", VERSIONS)
def test_real_claude_code_runs_a_tool_whose_arguments_end_with_a_stray_comma(version, tmp_path,
                                                                            upstream):
    """Without mending, Claude Code answers the call with an InputValidationError, and the
    model must try again."""
    work = bash_task(version, tmp_path, upstream, sloppy_model,
                     "Create a file out.txt containing hi, using the Bash tool.")
    assert (work / "out.txt").read_text().strip() == "hi"
    results = [m["content"] for r in upstream.requests if r["json"]
               for m in r["json"]["messages"] if m.get("role") == "tool"]
    assert results and not any("InputValidationError" in json.dumps(c) for c in results)


def ollama_like_model(request):
    """As Ollama streams Qwen3 through its OpenAI API: the reasoning in the text as
    <think>…</think>, and parallel calls each with its own id, all at index 0."""
    body = request["json"] or {}
    if body.get("stream") is not True or not body.get("tools"):
        return scripted_model(request)
    if any(m.get("role") == "tool" for m in body.get("messages", ())):
        return openai_stream([{"role": "assistant", "content": "<think>\nBoth are written."},
                              {"content": "\n</think>\n\n" + FINAL_TEXT}], "stop")
    calls = [{"index": 0, "id": "call_%s" % name, "type": "function", "function": {
        "name": "Bash", "arguments": json.dumps({"command": "echo hi > %s.txt" % name,
                                                 "description": "Write %s.txt" % name})}}
             for name in ("a", "b")]
    return openai_stream([{"role": "assistant", "content": "<think>\nTwo files, "},
                          {"content": "two calls.\n</think>\n\n"}] +
                         [{"tool_calls": [call]} for call in calls], "tool_calls")


@pytest.mark.parametrize("version", VERSIONS)
def test_real_claude_code_runs_both_calls_of_a_server_that_sends_them_at_one_index(
        version, tmp_path, upstream):
    """Read by index alone, the second call had joined the first (one Bash run, with input
    that did not parse); the reasoning had reached Claude Code as text, tags and all."""
    work = bash_task(version, tmp_path, upstream, ollama_like_model,
                     "Create a.txt and b.txt, each containing hi, with two Bash calls at once.")
    assert (work / "a.txt").read_text().strip() == (work / "b.txt").read_text().strip() == "hi"
    turn = [r["json"] for r in upstream.requests if r["json"] and any(
        m.get("role") == "tool" for m in r["json"]["messages"])][0]["messages"]
    assert sorted(m["tool_call_id"] for m in turn if m.get("role") == "tool") == [
        "call_a", "call_b"]
    assert "<think>" not in json.dumps(turn)


def unparsed_calls_model(request):
    """As vLLM streams Qwen3-Coder without its --tool-call-parser: the call in the text, in
    pieces, the answer finished as "stop"."""
    body = request["json"] or {}
    if body.get("stream") is not True or not body.get("tools"):
        return scripted_model(request)
    if any(m.get("role") == "tool" for m in body.get("messages", ())):
        return openai_stream([{"role": "assistant", "content": FINAL_TEXT}], "stop")
    written = ("I will write it.\n\n<tool_call>\n<function=Bash>\n<parameter=command>\necho hi > "
               "out.txt\n</parameter>\n<parameter=description>\nWrite out.txt\n</parameter>\n"
               "</function>\n</tool_call>")
    return openai_stream([{"role": "assistant", "content": written[:30]}] + [
        {"content": written[at:at + 7]} for at in range(30, len(written), 7)], "stop")


@pytest.mark.parametrize("version", VERSIONS)
def test_real_claude_code_runs_a_call_its_server_left_in_the_text(version, tmp_path, upstream):
    """Before, Claude Code showed the <tool_call> text and ran nothing: the session ended
    there, every request answered 200."""
    upstream.script = unparsed_calls_model
    runs_bash(version, tmp_path, openai_provider(upstream.url, name="vllm", type="openai"))
    turn = [r["json"] for r in upstream.requests if r["json"] and any(
        m.get("role") == "tool" for m in r["json"]["messages"])][0]["messages"]
    asked = [m for m in turn if m.get("role") == "assistant" and m.get("tool_calls")][0]
    assert json.loads(asked["tool_calls"][0]["function"]["arguments"])["command"] == \
        "echo hi > out.txt"
    assert "<tool_call>" not in json.dumps(turn)


def opened_thinking_model(request):
    """As vLLM streams a Qwen3 Thinking model without a reasoning parser: its template opened
    the thinking, so each answer's text is reasoning, a lone </think>, then the answer; a Bash
    call (parsed by the server) first, then FINAL_TEXT."""
    body = request["json"] or {}
    if body.get("stream") is not True or not body.get("tools"):
        return scripted_model(request)
    if any(m.get("role") == "tool" for m in body.get("messages", ())):
        return openai_stream([{"role": "assistant", "content": "The file is written.\n</th"},
                              {"content": "ink>\n\n" + FINAL_TEXT}], "stop")
    call = {"index": 0, "id": "call_w", "type": "function", "function": {
        "name": "Bash", "arguments": json.dumps({"command": "echo hi > out.txt",
                                                 "description": "Write out.txt"})}}
    return openai_stream([{"role": "assistant", "content": "I should use Bash.\n</think>\n\n"},
                          {"tool_calls": [call]}], "tool_calls")


@pytest.mark.parametrize("version", VERSIONS)
def test_real_claude_code_reads_a_model_whose_template_opens_its_thinking(version, tmp_path,
                                                                          upstream):
    """Its first answer taught that the model's answers begin in thinking; the last one's
    reasoning is thinking, and Claude Code's result is the answer alone (before, the reasoning
    and the tag with it)."""
    upstream.script = opened_thinking_model
    runs_bash(version, tmp_path, openai_provider(upstream.url, name="vllm", type="openai"))


def turn_numbering_model(request):
    """As Kimi on Fireworks or grok answer: each call named by its place in its answer
    (`Bash:0`), so every turn's first call has one id. Three Bash calls, then FINAL_TEXT; a
    client going round in circles is told so after ten requests."""
    body = request["json"] or {}
    stream = body.get("stream") is True
    if not any(t["function"]["name"] == "Bash" for t in body.get("tools") or ()):
        return openai_answer({"content": "ok"}, stream, "stop")
    turn_numbering_model.requests = getattr(turn_numbering_model, "requests", 0) + 1
    done = sum(m.get("role") == "tool" for m in body["messages"])
    if turn_numbering_model.requests > 10 or done >= 3:
        text = FINAL_TEXT if done >= 3 else "Going round in circles."
        return openai_answer({"content": text}, stream, "stop")
    call = {"id": "Bash:0", "type": "function", "function": {"name": "Bash", "arguments": (
        json.dumps({"command": "echo %d >> out.txt" % done, "description": "Step"}))}}
    return openai_answer({"content": None, "tool_calls": [call]}, stream, "tool_calls")


@pytest.mark.parametrize("version", VERSIONS)
def test_real_claude_code_goes_on_when_its_server_numbers_calls_within_each_answer(
        version, tmp_path, upstream):
    """Before, the second turn's call had the first's id: Claude Code took it for the call it
    had run, sent the same request again, and went round without end. Now Claude Code sees
    an id of its own for each call, and the server its own ids."""
    turn_numbering_model.requests = 0
    work = bash_task(version, tmp_path, upstream, turn_numbering_model, "Write three lines.")
    assert (work / "out.txt").read_text().split() == ["0", "1", "2"]
    last = [r["json"] for r in upstream.requests if r["json"] and r["json"].get("tools")][-1]
    ids = [call["id"] for m in last["messages"] for call in m.get("tool_calls") or ()]
    assert ids == ["Bash:0"] * 3                       # the server gets back the ids it gave
    assert [m["tool_call_id"] for m in last["messages"] if m.get("role") == "tool"] == ids


@pytest.mark.parametrize("version", VERSIONS)
def test_a_team_member_with_the_readmes_settings_reaches_the_teams_proxy(version, tmp_path,
                                                                         start_proxy, upstream):
    upstream.script = scripted_model
    proxy = start_proxy({"client_keys": {"alice": "alice-key-0123456789abcdef"},
                         "providers": [openai_provider(upstream.url)]})
    text = (REPO / "README.md").read_text()
    snippet = text.split("**A team's proxy, from each member's machine.**")[1].split(
        "```json\n")[1].split("```")[0]
    settings = json.loads(snippet.replace("https://llm.example.com", proxy.url).replace(
        "your key from client_keys", "alice-key-0123456789abcdef"))
    home = tmp_path / "home"
    (home / ".claude").mkdir(parents=True)
    (home / ".claude" / "settings.json").write_text(json.dumps(settings))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE"))}
    env.update(HOME=str(home), DISABLE_AUTOUPDATER="1", CLAUDE_CODE_MAX_RETRIES="0")
    result = subprocess.run([str(installed_claude(version)), "-p", "Create a file out.txt "
                             "containing hi, using the Bash tool.", "--output-format", "json",
                             "--allowedTools", "Bash"], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert json.loads(result.stdout.strip().splitlines()[-1])["result"] == FINAL_TEXT, result
    usage = json.loads(urllib.request.urlopen(urllib.request.Request(
        proxy.url + "/status", headers={"x-api-key": "alice-key-0123456789abcdef"})).read())
    assert [c["client"] for c in usage["usage"]["by_client"]] == ["alice"]


# --- the Responses API: a Responses-only model runs the tool, its reasoning carried across -----

def responses_answer(items, stream):
    return stream_reply(sse(events_for(items))) if stream else json_reply(response(items))


def responses_model(request):
    """Reason, then run Bash; once its output is back, answer in text."""
    body = request["json"] or {}
    stream = body.get("stream") is True
    if any(item.get("type") == "function_call_output" for item in body.get("input", ())):
        return responses_answer([message_item(FINAL_TEXT)], stream)
    if "Bash" in [tool.get("name") for tool in body.get("tools") or ()]:
        arguments = json.dumps({"command": "echo hi > out.txt", "description": "Write out.txt"})
        return responses_answer([reasoning_item(("Bash can write it.",), "ENC-CC", "rs_cc"),
                                 call_item("call_1", "Bash", arguments, 1)], stream)
    return responses_answer([message_item("ok")], stream)


@pytest.mark.parametrize("model", ["gpt-5-codex", "gpt-6.2-sol"])
@pytest.mark.parametrize("version", VERSIONS)
def test_real_claude_code_runs_a_tool_on_a_responses_only_model(version, model, tmp_path,
                                                                upstream):
    """A codex model, and a GPT-6 one (which calls functions on Chat Completions only while
    reasoning is off, and refuses no reasoning at all)."""
    upstream.script = responses_model
    result, output, work = run_code(
        version, tmp_path, [openai_provider(upstream.url, models=[model])],
        "Create a file out.txt containing hi, using the Bash tool.", "Bash",
        CLAUDE_CODE_MAX_RETRIES="0")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    assert output["is_error"] is False and output["result"] == FINAL_TEXT
    assert (work / "out.txt").read_text().strip() == "hi"          # the tool really ran
    assert {r["path"] for r in upstream.requests} == {"/v1/responses"}
    followed = [r["json"]["input"] for r in upstream.requests if any(
        item.get("type") == "function_call_output" for item in r["json"]["input"])]
    assert followed and all(r["json"]["stream"] for r in upstream.requests)
    carried = [item for item in followed[0] if item.get("type") == "reasoning"]
    assert carried == [reasoning_item(("Bash can write it.",), "ENC-CC", "rs_cc")]
    if model.startswith("gpt-6"):                 # no sampling while it reasons, never "none"
        sent = [r["json"] for r in upstream.requests]
        assert "none" not in [body.get("reasoning", {}).get("effort") for body in sent]
        assert not any("temperature" in body for body in sent)


# --- a file worked on through each translation: Write, Read, Edit, Glob, Grep, an image -------

def png_pixel() -> bytes:
    """A PNG of one green pixel."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\x00\xff\x00")) + chunk(b"IEND", b""))


def pdf_page() -> bytes:
    """A PDF of one page that says one line."""
    text = b"BT /F1 18 Tf 20 100 Td (Hello from the PDF) Tj ET"
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 144] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(text), text),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    table = b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    return out + b"xref\n0 %d\n0000000000 65535 f \n%strailer\n<< /Size %d /Root 1 0 R >>\n" \
        b"startxref\n%d\n%%%%EOF\n" % (len(objects) + 1, table, len(objects) + 1, len(out))


NOTES = "# Notes\nünïcödé ✓ line\n\ttabbed \"quote\"\n"


def file_steps(work) -> list:
    """The calls a model makes, one a turn, to work on notes.md."""
    notes = str(work / "notes.md")
    return [("Write", {"file_path": notes, "content": NOTES}),
            ("Read", {"file_path": notes}),
            ("Edit", {"file_path": notes, "old_string": "ünïcödé ✓ line",
                      "new_string": "edited \\ line"}),
            ("Glob", {"pattern": "*.md"}),
            ("Grep", {"pattern": "edited", "path": str(work), "output_mode": "content"}),
            ("Read", {"file_path": str(work / "pixel.png")}),
            ("Read", {"file_path": str(work / "page.pdf")})]


FILE_PROTOCOLS = {   # how each protocol's request names its tools and counts the calls run
    "openai": (lambda body: [t["function"]["name"] for t in body.get("tools") or ()],
               lambda body: sum(m.get("role") == "tool" for m in body.get("messages", ()))),
    "responses": (lambda body: [t.get("name") for t in body.get("tools") or ()],
                  lambda body: sum(i.get("type") == "function_call_output"
                                   for i in body.get("input", ()))),
    "gemini": (lambda body: [d["name"] for t in body.get("tools") or ()
                             for d in t.get("functionDeclarations", ())],
               lambda body: sum("functionResponse" in part for c in body.get("contents", ())
                                for part in c["parts"])),
}


def protocol_answer(protocol, stream, text=None, call=None):
    """Text, or one call (id, name, arguments), as that protocol's provider answers."""
    if protocol == "gemini":
        return gemini_answer([{"text": text}] if call is None else
                             [{"functionCall": {"name": call[1], "args": call[2]}}], stream)
    if protocol == "responses":
        return responses_answer([message_item(text)] if call is None else
                                [call_item(call[0], call[1], json.dumps(call[2]))], stream)
    if call is None:
        return openai_answer({"content": text}, stream, "stop")
    return openai_answer({"content": None, "tool_calls": [{"id": call[0], "type": "function",
                          "function": {"name": call[1], "arguments": json.dumps(call[2])}}]},
                         stream, "tool_calls")


def protocol_provider(protocol, upstream_url):
    if protocol == "gemini":
        return {"name": "gemini", "api_base_url": upstream_url + "/v1beta",
                "api_key": "g-key-0123456789", "models": ["gemini-2.5-pro"]}
    return openai_provider(upstream_url,
                           models=["gpt-5-codex" if protocol == "responses" else "gpt-test"])


def file_worker(work, protocol):
    """A model that makes the file_steps' calls in that protocol, then says ALL DONE."""
    names_of, calls_run = FILE_PROTOCOLS[protocol]

    def script(request):
        body = request["json"] or {}
        stream = body.get("stream") is True or "streamGenerateContent" in request["path"]
        done, steps = calls_run(body), file_steps(work)
        if "Write" not in names_of(body):
            return protocol_answer(protocol, stream, "ok")
        if done == len(steps):
            return protocol_answer(protocol, stream, "ALL DONE")
        return protocol_answer(protocol, stream, call=("call_%d" % done,) + steps[done])
    return script


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("protocol", sorted(FILE_PROTOCOLS))
def test_real_claude_code_works_on_a_file_through_each_translation(version, protocol, tmp_path,
                                                                   upstream):
    """Claude Code's file tools, run for real: each call arrives whole, each result (unicode,
    tabs, backslashes, an image, a PDF) reaches the model in its provider's own form."""
    upstream.script = file_worker(tmp_path / "work", protocol)
    provider = protocol_provider(protocol, upstream.url)
    result, output, work = run_code(
        version, tmp_path, [provider], "Work on notes.md.", "Write,Read,Edit,Glob,Grep",
        files={"pixel.png": png_pixel(), "page.pdf": pdf_page()}, CLAUDE_CODE_MAX_RETRIES="0")
    assert output and output["result"] == "ALL DONE", (result.stdout[-2000:], result.stderr[-2000:])
    assert (work / "notes.md").read_text() == NOTES.replace("ünïcödé ✓ line", "edited \\ line")
    calls_run = FILE_PROTOCOLS[protocol][1]
    last = json.dumps(max((r["json"] or {} for r in upstream.requests), key=calls_run),
                      ensure_ascii=False)
    image, pdf = {
        "openai": ('"image_url": {"url": "data:image/png;base64,%s"}',
                   '"file_data": "data:application/pdf;base64,%s"'),
        "responses": ('"image_url": "data:image/png;base64,%s"',
                      '"file_data": "data:application/pdf;base64,%s"'),
        "gemini": ('"inlineData": {"mimeType": "image/png", "data": "%s"}',
                   '"inlineData": {"mimeType": "application/pdf", "data": "%s"}')}[protocol]
    for seen in ("2\\tünïcödé ✓ line", "notes.md:2:edited \\\\ line",
                 image % base64.b64encode(png_pixel()).decode(),
                 pdf % base64.b64encode(pdf_page()).decode()):
        assert seen in last, seen


def mistral_worker(work):
    """file_worker on a server that checks requests as Mistral's does: the fields it names,
    the order of messages."""
    worker = file_worker(work, "openai")

    def script(request):
        problem = mistral_problem(request["json"] or {})
        if problem:
            return json_reply({"object": "error", "message": problem,
                               "type": "invalid_request_error", "code": "3230"}, 422)
        return worker(request)
    return script


@pytest.mark.parametrize("version", VERSIONS)
def test_real_claude_code_works_on_a_file_through_mistral(version, tmp_path, upstream):
    """Mistral takes no field it does not name (`user`, `stream_options`), a system message
    only first, and no user message right after a tool's: every request Claude Code sends
    has metadata.user_id and ends with a system message."""
    upstream.script = mistral_worker(tmp_path / "work")
    provider = {"name": "mistral", "api_base_url": upstream.url + "/v1",
                "api_key": "mistral-key-0123456789", "models": ["devstral-latest"]}
    result, output, work = run_code(
        version, tmp_path, [provider], "Work on notes.md.", "Write,Read,Edit,Glob,Grep",
        files={"pixel.png": png_pixel(), "page.pdf": pdf_page()}, CLAUDE_CODE_MAX_RETRIES="0")
    assert output and output["result"] == "ALL DONE", (result.stdout[-2000:], result.stderr[-2000:])
    assert (work / "notes.md").read_text() == NOTES.replace("ünïcödé ✓ line", "edited \\ line")


def text_only_model(work):
    """A vLLM serving a model without vision: any image is refused in vLLM's words. It has
    Claude Code read pixel.png, then answers once the result is back."""
    def script(request):
        body = request["json"] or {}
        stream = body.get("stream") is True
        if b"image_url" in request["body"]:
            return json_reply({"error": {
                "message": "At most 0 image(s) may be provided in one prompt.",
                "type": "BadRequestError", "param": None, "code": 400}}, 400)
        if any(m.get("role") == "tool" for m in body.get("messages", ())):
            return openai_answer({"content": "ALL DONE"}, stream, "stop")
        if "Read" not in [t["function"]["name"] for t in body.get("tools") or ()]:
            return openai_answer({"content": "ok"}, stream, "stop")
        return protocol_answer("openai", stream, call=(
            "call_1", "Read", {"file_path": str(work / "pixel.png")}))
    return script


@pytest.mark.parametrize("version", VERSIONS)
def test_real_claude_code_goes_on_when_a_model_without_vision_refuses_an_image(version,
                                                                             tmp_path,
                                                                             upstream):
    """Refused in vLLM's words, every later request would carry the image again and fail: the
    session would be over. In Anthropic's, Claude Code takes the image out and goes on."""
    upstream.script = text_only_model(tmp_path / "work")
    result, output, _ = run_code(version, tmp_path, [openai_provider(upstream.url)],
                                 "Look at pixel.png.", "Read", files={"pixel.png": png_pixel()},
                                 CLAUDE_CODE_MAX_RETRIES="0")
    assert output and output["result"] == "ALL DONE", (result.stdout[-2000:],
                                                       result.stderr[-2000:])
    last = json.dumps(upstream.requests[-1]["json"])
    assert "image_url" not in last and "Image removed" in last


# --- Anthropic-compatible servers and Azure: the same tool-using session on each --------------

def compatible_model(preset):
    """A server that refuses what this preset's provider lacks; it thinks (signing its thinking),
    runs Bash, and once the result is back with its own thinking unchanged, answers in text."""
    def script(request):
        problems = problems_of(preset, request)
        body = request["json"] or {}
        stream = body.get("stream") is True
        if problems:
            return json_reply({"type": "error", "error": {"type": "invalid_request_error",
                                                          "message": "; ".join(problems)}}, 400)
        last = body["messages"][-1]["content"]
        if isinstance(last, list) and any(b.get("type") == "tool_result" for b in last):
            assert body["messages"][-2]["content"][0]["signature"] == "SIG-" + preset
            return anthropic_answer([{"type": "text", "text": FINAL_TEXT}], "end_turn", stream)
        if "Bash" in [tool.get("name") for tool in body.get("tools") or ()]:
            return anthropic_answer([
                {"type": "thinking", "thinking": "Bash it is.", "signature": "SIG-" + preset},
                {"type": "tool_use", "id": "toolu_cc1", "name": "Bash", "input": {
                    "command": "echo hi > out.txt", "description": "Write out.txt"}}],
                "tool_use", stream)
        return anthropic_answer([{"type": "text", "text": "ok"}], "end_turn", stream)
    return script


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("preset", sorted(COMPATIBLE_RULES) + ["azure"])
def test_real_claude_code_runs_a_tool_on_each_compatible_preset_and_azure(version, preset,
                                                                          tmp_path, upstream):
    if preset == "azure":
        upstream.script = scripted_model
        provider = {"name": "corp", "type": "azure", "api_base_url": upstream.url,
                    "api_key": COMPATIBLE_KEY, "deployments": {"gpt-test": "prod-test"},
                    "models": ["gpt-test"]}
    else:
        upstream.script = compatible_model(preset)
        provider = compat_entry(preset, upstream.url, ["served-model"])
    result, output, work = run_code(
        version, tmp_path, [provider], "Create a file out.txt containing hi, using the Bash tool.",
        "Bash", CLAUDE_CODE_MAX_RETRIES="0")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    assert output["is_error"] is False and output["result"] == FINAL_TEXT, output
    assert (work / "out.txt").read_text().strip() == "hi"          # the tool really ran
    if preset == "azure":
        assert {(r["path"], r["json"]["model"]) for r in upstream.requests} == {
            ("/openai/v1/chat/completions", "prod-test")}
    else:                       # Claude Code's own User-Agent (Kimi For Coding wants it)
        assert {r["headers"]["user-agent"].split("/")[0] for r in upstream.requests} == {
            "claude-cli"}


def thinks_unasked_model(request):
    """A server that thinks whatever a request says (Kimi For Coding), and refuses a turn of
    tool calls without thinking before it, in Kimi's words; its model runs Bash thinking
    nothing first, then answers in text."""
    body = request["json"] or {}
    return thinking_missing(body) or bash_then_done(body)


def bash_then_done(body):
    """A model that runs Bash thinking nothing first, then, its result back, answers in text."""
    stream = body.get("stream") is True
    last = body["messages"][-1]["content"]
    if isinstance(last, list) and any(b.get("type") == "tool_result" for b in last):
        return anthropic_answer([{"type": "text", "text": FINAL_TEXT}], "end_turn", stream)
    if "Bash" in [tool.get("name") for tool in body.get("tools") or ()]:
        return anthropic_answer([{"type": "tool_use", "id": "toolu_cc1", "name": "Bash", "input": {
            "command": "echo hi > out.txt", "description": "Write out.txt"}}], "tool_use", stream)
    return anthropic_answer([{"type": "text", "text": "ok"}], "end_turn", stream)


@pytest.mark.parametrize("version", VERSIONS)
def test_real_claude_code_goes_on_when_a_compatible_server_wants_thinking_before_calls(
        version, tmp_path, upstream):
    """Its model thought nothing before its call; the server refused that turn at every
    request after (Kimi For Coding). Told once, ccproxy puts an empty thinking block there."""
    upstream.script = thinks_unasked_model
    runs_bash(version, tmp_path, {"name": "glm", "api_base_url": upstream.url,
                                  "api_key": COMPATIBLE_KEY, "models": ["served-model"]})
    assert [r["json"]["messages"][1]["content"][0]["type"] for r in upstream.requests
            if len(r["json"]["messages"]) > 2][-1] == "thinking"


def no_system_role_model(request):
    """LM Studio's Anthropic API: it refuses a system message among the others, in its
    words; its model runs Bash, then answers in text."""
    body = request["json"] or {}
    if any(message["role"] == "system" for message in body.get("messages", ())):
        return json_reply({"type": "error", "error": {
            "type": "invalid_request_error", "message": "request.messages.1.role: Invalid "
            "discriminator value. Expected 'user' | 'assistant'"}}, 400)
    return bash_then_done(body)


@pytest.mark.parametrize("version", VERSIONS)
def test_real_claude_code_runs_on_a_server_that_takes_no_system_message_among_the_others(
        version, tmp_path, upstream):
    upstream.script = no_system_role_model
    runs_bash(version, tmp_path, {"name": "lmstudio", "type": "anthropic",
                                  "api_base_url": upstream.url, "models": ["served-model"]})


def runs_bash(version, tmp_path, provider, retries="0"):
    """The real Claude Code, on this provider alone, asked to write out.txt with Bash: it
    finishes with the model's final text, and the file is written."""
    result, output, work = run_code(
        version, tmp_path, [provider], "Create a file out.txt containing hi, using the Bash tool.",
        "Bash", CLAUDE_CODE_MAX_RETRIES=retries)
    assert output and output["result"] == FINAL_TEXT, (result.stdout[-2000:],
                                                        result.stderr[-2000:])
    assert (work / "out.txt").read_text().strip() == "hi"


# --- WebSearch: Claude Code's search request, answered by Google's search or OpenAI's ---------

SEARCHED = [("https://www.python.org/downloads/release/python-3140/", "python.org"),
            ("https://docs.python.org/3.14/whatsnew/3.14.html", "docs.python.org")]


def gemini_answer(parts: list, stream: bool, grounding=None):
    """A generateContent answer, whole or as one SSE event."""
    candidate = {"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}
    if grounding:
        candidate["groundingMetadata"] = grounding
    body = {"candidates": [candidate], "usageMetadata": {"promptTokenCount": 900,
                                                         "candidatesTokenCount": 20}}
    if not stream:
        return json_reply(body)
    return Reply(200, pieces=[b"data: %s\r\n\r\n" % json.dumps(body).encode()],
                 content_type="text/event-stream")


def searching_model(request):
    """Main turn: call WebSearch. Search request (googleSearch): a grounded answer. Once the
    search's result is back: an answer quoting the links Claude Code passed on."""
    body = request["json"] or {}
    stream = "streamGenerateContent" in request["path"]
    tools = body.get("tools") or []
    if any("googleSearch" in tool for tool in tools):
        grounding = {"webSearchQueries": ["python 3.14 release date"],
                     "groundingChunks": [{"web": {"uri": url, "title": title}}
                                         for url, title in SEARCHED]}
        return gemini_answer([{"text": "Python 3.14.0 was released on 7 October 2025."}], stream,
                             grounding)
    results = [part["functionResponse"] for content in body.get("contents", ())
               for part in content["parts"] if "functionResponse" in part]
    if results:
        found = [url for url, _ in SEARCHED if url in json.dumps(results)]
        return gemini_answer([{"text": "Sources: " + " ".join(found)}], stream)
    names = [d["name"] for tool in tools for d in tool.get("functionDeclarations", ())]
    if "WebSearch" in names:
        return gemini_answer([{"functionCall": {"name": "WebSearch", "args": {
            "query": "python 3.14 release date"}}}], stream)
    return gemini_answer([{"text": "ok"}], stream)


def searching_responses_model(request):
    """The same through OpenAI's Responses API (a GPT-6 model), whose web_search tool runs the
    search request."""
    body = request["json"] or {}
    stream = body.get("stream") is True
    tools = body.get("tools") or []
    if {"type": "web_search"} in tools:
        search = {"type": "web_search_call", "id": "ws_cc", "status": "completed", "action": {
            "type": "search", "query": "python 3.14 release date",
            "sources": [{"type": "url", "url": url} for url, _ in SEARCHED]}}
        answer = message_item("Python 3.14.0 was released on 7 October 2025.", 1)
        answer["content"][0]["annotations"] = [
            {"type": "url_citation", "url": url, "title": title, "start_index": 0,
             "end_index": 10} for url, title in SEARCHED]
        return responses_answer([search, answer], stream)
    results = [item for item in body.get("input", ()) if item.get("type") == "function_call_output"]
    if results:
        found = [url for url, _ in SEARCHED if url in json.dumps(results)]
        return responses_answer([message_item("Sources: " + " ".join(found))], stream)
    if "WebSearch" in [tool.get("name") for tool in tools]:
        return responses_answer([call_item("call_ws", "WebSearch", json.dumps(
            {"query": "python 3.14 release date"}))], stream)
    return responses_answer([message_item("ok")], stream)


def searching_chat_model(request):
    """A model that answers on Chat Completions (gpt-4.1), whose search request alone goes to
    the Responses API."""
    body = request["json"] or {}
    if request["path"].endswith("/responses"):        # the search request, and nothing else
        return searching_responses_model(request) if {"type": "web_search"} in (
            body.get("tools") or []) else json_reply({"error": {"message": "not here"}}, 400)
    stream = body.get("stream") is True
    results = [message for message in body.get("messages", ()) if message.get("role") == "tool"]
    if results:
        found = [url for url, _ in SEARCHED if url in json.dumps(results)]
        return openai_answer({"content": "Sources: " + " ".join(found)}, stream, "stop")
    if "WebSearch" in [tool["function"]["name"] for tool in body.get("tools") or ()]:
        return openai_answer({"tool_calls": [{"id": "call_ws", "type": "function", "function": {
            "name": "WebSearch", "arguments": json.dumps(
                {"query": "python 3.14 release date"})}}]}, stream, "tool_calls")
    return openai_answer({"content": "ok"}, stream, "stop")


# Each searching provider: its model, its provider entry, and whether a request is its search
# request with nothing forced that it was not given (Claude Code 2.1.197 forces web_search).
SEARCHERS = {
    "gemini": (searching_model, lambda url: {"name": "gemini", "api_base_url": url + "/v1beta",
                                             "api_key": "g-key-0123456789",
                                             "models": ["gemini-2.5-pro"]},
               lambda body: any("googleSearch" in tool for tool in body.get("tools") or ())
               and "toolConfig" not in body),
    "openai": (searching_responses_model, lambda url: openai_provider(url, models=["gpt-6.2-sol"]),
               lambda body: body.get("tools") == [{"type": "web_search"}]
               and body.get("tool_choice", "auto") in ("auto", "required"))}
SEARCHERS["openai-chat"] = (searching_chat_model,
                            lambda url: openai_provider(url, models=["gpt-4.1"]),
                            SEARCHERS["openai"][2])


@pytest.mark.parametrize("searcher", sorted(SEARCHERS))
@pytest.mark.parametrize("version", VERSIONS)
def test_real_claude_code_web_search_returns_the_searched_links(version, searcher, tmp_path,
                                                                upstream):
    model, provider, searches = SEARCHERS[searcher]
    upstream.script = model
    result, output, _ = run_code(
        version, tmp_path, [provider(upstream.url)],
        "When was Python 3.14 released? Search the web.", "WebSearch",
        CLAUDE_CODE_MAX_RETRIES="0", ENABLE_TOOL_SEARCH="false")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    assert output["is_error"] is False
    assert output["result"] == "Sources: " + " ".join(url for url, _ in SEARCHED)
    assert len([r for r in upstream.requests if r["json"] and searches(r["json"])]) == 1


# --- compaction: a provider's overflow, answered in Anthropic's words, makes Claude Code compact ---

SUMMARY = "Summary: the user asked for out.txt; Bash wrote it."


def overflowing_model(request):
    """Run Bash; refuse the turn that carries its result as over the window (the provider's
    own words), until Claude Code has compacted; answer its compaction with a summary."""
    body = request["json"] or {}
    stream = body.get("stream") is True
    texts = json.dumps(body.get("messages", []))
    if "CRITICAL: Respond with TEXT ONLY" in texts:
        return openai_answer({"content": SUMMARY}, stream, "stop")
    if SUMMARY in texts:
        return openai_answer({"content": FINAL_TEXT}, stream, "stop")
    if any(m.get("role") == "tool" for m in body.get("messages", ())):
        return json_reply({"error": {"message": "This model's maximum context length is 32768 "
                                                "tokens. However, you requested 40000 tokens.",
                                     "type": "invalid_request_error",
                                     "code": "context_length_exceeded"}}, 400)
    return scripted_model(request)


# Seen here: 2.1.330 compacts and finishes; 2.1.197 reports "Prompt is too long" and ends the run
# without compacting in this one-tool-turn headless session, whatever the message's tail.
@pytest.mark.parametrize("version", ["2.1.330"])
def test_real_claude_code_compacts_when_the_provider_overflows(version, tmp_path, upstream):
    upstream.script = overflowing_model
    _, output, _ = run_code(version, tmp_path, [openai_provider(upstream.url)],
                            "Create a file out.txt containing hi, using the Bash tool.", "Bash",
                            CLAUDE_CODE_MAX_RETRIES="0")
    compactions = [r for r in upstream.requests
                   if "CRITICAL: Respond with TEXT ONLY" in json.dumps(r["json"])]
    assert compactions, json.dumps(output)           # Claude Code compacted on our wording
    assert output["is_error"] is False and output["result"] == FINAL_TEXT, output


WINDOW = 40000    # the context length of a narrow server: input and output together


def narrow_refusal(request):
    """(the input tokens, counted as a quarter of the body's bytes, and max_tokens) of a request
    a server of context length WINDOW refuses, or None."""
    inputs, wanted = len(request["body"]) // 4, (request["json"] or {}).get("max_tokens") or 0
    return (inputs, wanted) if inputs + wanted > WINDOW else None


def narrow_model(request):
    """scripted_model on a server of context length WINDOW, refusing a request over it in
    OpenAI's and vLLM's words."""
    refused = narrow_refusal(request)
    if refused:
        return json_reply({"error": {"message": (
            "This model's maximum context length is %d tokens. However, you requested %d tokens "
            "(%d in the messages, %d in the completion). Please reduce the length of the "
            "messages or completion." % (WINDOW, sum(refused), refused[0], refused[1])),
            "type": "BadRequestError", "param": None, "code": 400}}, 400)
    return scripted_model(request)


def asked_within_the_window(requests):
    """Claude Code's first request, refused for its max_tokens; sent again at once with the
    room its input leaves; every later one lowered before it went, and taken."""
    refused = [narrow_refusal(r) for r in requests]
    assert refused[0] and not any(refused[1:]), refused
    assert requests[1]["json"]["max_tokens"] == WINDOW - refused[0][0]
    assert not any("CRITICAL: Respond with TEXT ONLY" in json.dumps(r["json"])
                   for r in requests)                                # no compaction


@pytest.mark.parametrize("version", VERSIONS)
def test_real_claude_code_runs_on_a_narrow_window_that_max_tokens_overflows(version, tmp_path,
                                                                            upstream):
    """The server says its context length and the input; ccproxy asks again at once with the
    room the input leaves, and lowers the session's later requests before they go. Told in
    Anthropic's words, Claude Code had asked again itself as one of its retries, at every turn
    (with CLAUDE_CODE_MAX_RETRIES=0 it reported the prompt as too long)."""
    upstream.script = narrow_model
    result, output, work = run_code(version, tmp_path, [openai_provider(upstream.url)],
                                    "Create a file out.txt containing hi, using the Bash tool.",
                                    "Bash", CLAUDE_CODE_MAX_RETRIES="0")
    assert output and output["is_error"] is False and output["result"] == FINAL_TEXT, (
        result.stdout[-2000:], result.stderr[-2000:])
    assert (work / "out.txt").read_text().strip() == "hi"
    asked_within_the_window([r for r in upstream.requests if r["json"]])


def kimi_narrow_model(request):
    """bash_then_done on Kimi's Anthropic API of context length WINDOW, whose refusal gives
    only the total asked, max_tokens in it."""
    refused = narrow_refusal(request)
    if refused:
        return json_reply({"type": "error", "error": {
            "type": "invalid_request_error", "message": "Invalid request: Your request exceeded "
            "model token limit: %d (requested: %d)" % (WINDOW, sum(refused))}}, 400)
    return bash_then_done(request["json"] or {})


@pytest.mark.parametrize("version", VERSIONS)
def test_real_claude_code_runs_on_kimi_when_it_says_the_total_is_over(version, tmp_path,
                                                                       upstream):
    """Kimi counts max_tokens in the total it says was requested; passed on as it came,
    Claude Code compacted a session at half the window. Read with the max_tokens sent, the
    room is known: as for any server that says it."""
    upstream.script = kimi_narrow_model
    runs_bash(version, tmp_path, {"name": "kimi", "api_base_url": upstream.url,
                                  "api_key": COMPATIBLE_KEY, "models": ["served-model"]},
              retries="0")
    asked_within_the_window([r for r in upstream.requests if r["json"]])


def groq_model(request):
    """scripted_model on Groq, whose models allow fewer output tokens than Claude Code asks for,
    refused in Groq's words."""
    asked = (request["json"] or {}).get("max_tokens") or 0
    if asked > 40960:
        return json_reply({"error": {"message": "max_tokens must be less than or equal to "
                                     "40960, the maximum value for max_tokens is less than the "
                                     "context_window for this model",
                                     "type": "invalid_request_error", "param": "max_tokens"}}, 400)
    return scripted_model(request)


@pytest.mark.parametrize("version", VERSIONS)
def test_real_claude_code_runs_on_a_groq_model_that_allows_fewer_output_tokens(version,
                                                                               tmp_path,
                                                                               upstream):
    """Every request of the session was refused: the model's limit, said once, is kept."""
    upstream.script = groq_model
    provider = {"name": "groq", "api_base_url": upstream.url + "/v1",
                "api_key": "gsk-test-key-0123456789", "models": ["openai/gpt-oss-120b"]}
    result, output, work = run_code(version, tmp_path, [provider],
                                    "Create a file out.txt containing hi, using the Bash tool.",
                                    "Bash", CLAUDE_CODE_MAX_RETRIES="0")
    assert output and output["is_error"] is False and output["result"] == FINAL_TEXT, (
        result.stdout[-2000:], result.stderr[-2000:])
    asked = [r["json"]["max_tokens"] for r in upstream.requests if r["json"]]
    assert asked[0] > 40960 and asked[1:] == [40960] * (len(asked) - 1)


@pytest.mark.parametrize("version", VERSIONS)
def test_real_claude_code_says_why_a_free_groq_plan_cannot_take_its_prompt(version, tmp_path,
                                                                          upstream):
    """Groq's 413 was shown as Claude Code's own "Request too large (max 32MB)"."""
    upstream.script = lambda request: json_reply({"error": {
        "message": "Request too large for model `llama-3.3-70b-versatile` in organization "
                   "`org_1` service tier `on_demand` on tokens per minute (TPM): Limit 12000, "
                   "Requested 19500, please reduce your message size and try again.",
        "type": "tokens", "code": "rate_limit_exceeded"}}, 413)
    provider = {"name": "groq", "api_base_url": upstream.url + "/v1",
                "api_key": "gsk-test-key-0123456789", "models": ["llama-3.3-70b-versatile"]}
    result, output, _ = run_code(version, tmp_path, [provider], "hello", "Bash")
    assert output["is_error"] is True and "32MB" not in output["result"], output
    assert "groq takes 12000 tokens a minute for llama-3.3-70b-versatile on this plan, and " \
           "this request alone is 19500" in output["result"]
    assert len(upstream.requests) == 1                        # neither ccproxy nor Claude Code
                                                              # sent it again


def small_ollama(request):
    """An Ollama server running gpt-test with a 4,096-token context (its /api/ps says so, once
    the model is loaded), which would cut Claude Code's prompts without a word."""
    if request["path"] == "/api/ps":
        return json_reply({"models": [{"name": "gpt-test:latest", "model": "gpt-test:latest",
                                       "context_length": 4096}]})
    return scripted_model(request)


@pytest.mark.parametrize("version", VERSIONS)
def test_real_claude_code_hears_why_a_small_ollama_context_cannot_take_it(version, tmp_path,
                                                                          upstream):
    """The model is loaded before the first request, so that its context length is known: no
    prompt over it reaches Ollama to be cut; Claude Code gets the 400 it compacts on, cannot
    make its own prompt fit, and ends saying so, with the limit."""
    upstream.script = small_ollama
    result, output, _ = run_code(version, tmp_path, [{
        "name": "ollama", "api_base_url": upstream.url + "/v1", "models": ["gpt-test"]}],
        "Create a file out.txt containing hi, using the Bash tool.", "Bash",
        CLAUDE_CODE_MAX_RETRIES="0")
    paths = [r["path"] for r in upstream.requests]
    assert "/api/generate" in paths and "/api/ps" in paths
    assert "/v1/chat/completions" not in paths, (result.stdout[-2000:], result.stderr[-2000:])
    assert output["is_error"] is True and output["result"].startswith("Prompt is too long")
    assert "(limit 4096)" in output["result"], output
    assert "ollama runs gpt-test with a 4096-token context: too small for Claude Code" in \
        result.stderr                           # `code` said so before Claude Code started


LONG_OUTPUT = "python3 -c \"print('word ' * 5800)\""     # about 6,500 tokens, under Bash's cut


def growing_session(request):
    """Ollama with a 30,000-token context: each turn runs a command with a long output, until
    Claude Code has compacted; its compaction gets a summary, the session then finishes."""
    if request["path"] == "/api/ps":
        return json_reply({"models": [{"name": "gpt-test:latest", "model": "gpt-test:latest",
                                       "context_length": 30000}]})
    body = request["json"] or {}
    stream = body.get("stream") is True
    texts = json.dumps(body.get("messages", []))
    if "CRITICAL: Respond with TEXT ONLY" in texts:
        return openai_answer({"content": SUMMARY}, stream, "stop")
    turn = sum(1 for m in body.get("messages", ()) if m.get("role") == "tool")
    if SUMMARY in texts or turn >= 6:
        return openai_answer({"content": FINAL_TEXT}, stream, "stop")
    call = {"id": "call_%d" % turn, "type": "function", "function": {
        "name": "Bash", "arguments": json.dumps({"command": LONG_OUTPUT,
                                                 "description": "Print a long text"})}}
    return openai_answer({"content": None, "tool_calls": [call]}, stream, "tool_calls")


@pytest.mark.parametrize("version", VERSIONS)
def test_real_claude_code_compacts_a_session_growing_past_ollamas_context(version, tmp_path,
                                                                          upstream):
    """No turn that Ollama would cut reaches it: the session is refused as too long, compacts
    (its compaction retried with fewer turns until it fits), and finishes."""
    upstream.script = growing_session
    result, output, _ = run_code(version, tmp_path, [{
        "name": "ollama", "api_base_url": upstream.url + "/v1", "models": ["gpt-test"]}],
        "Print the long text until you are told to stop.", "Bash", CLAUDE_CODE_MAX_RETRIES="0")
    chats = [r["json"] for r in upstream.requests if r["path"].endswith("/chat/completions")]
    turns = [sum(1 for m in c["messages"] if m.get("role") == "tool") for c in chats]
    assert max(turns) <= 2, turns      # 12k-19k of Claude Code's own + 3 outputs: over 30,000
    assert any("CRITICAL: Respond with TEXT ONLY" in json.dumps(c) for c in chats), turns
    assert output["is_error"] is False and output["result"] == FINAL_TEXT, output


# --- subagents on their own route; the /model picker fed by gateway discovery -------------------

SUBAGENT_ANSWER = "The helper says hi."


def delegating_model(request):
    """Hand the work to a subagent (the Agent tool); once its report is back, finish."""
    body = request["json"] or {}
    stream = body.get("stream") is True
    if any(m.get("role") == "tool" for m in body.get("messages", ())):
        return openai_answer({"content": FINAL_TEXT}, stream, "stop")
    if "Agent" in [t["function"]["name"] for t in body.get("tools") or ()]:
        call = {"id": "call_agent", "type": "function", "function": {
            "name": "Agent", "arguments": json.dumps({
                "description": "Greet", "prompt": "Reply with a greeting.",
                "subagent_type": "general-purpose", "run_in_background": False})}}
        return openai_answer({"content": None, "tool_calls": [call]}, stream, "tool_calls")
    return openai_answer({"content": "ok"}, stream, "stop")


@pytest.mark.parametrize("version", VERSIONS)
def test_real_claude_code_runs_its_subagents_on_the_subagent_route(version, tmp_path, upstream,
                                                                   second_upstream):
    upstream.script = delegating_model
    second_upstream.script = lambda r: openai_answer({"content": SUBAGENT_ANSWER},
                                                     (r["json"] or {}).get("stream") is True,
                                                     "stop")
    helper = openai_provider(second_upstream.url, name="helper", type="openai",
                             models=["helper-model"])
    result, output, _ = run_code(version, tmp_path, [openai_provider(upstream.url), helper],
                                 "Ask a subagent to greet.", "Agent",
                                 routes={"subagent": "helper,helper-model"},
                                 CLAUDE_CODE_MAX_RETRIES="0", ENABLE_TOOL_SEARCH="false")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    assert output["is_error"] is False and output["result"] == FINAL_TEXT, output
    assert second_upstream.requests and all(
        r["json"]["model"] == "helper-model" for r in second_upstream.requests)
    reports = [m["content"] for r in upstream.requests for m in r["json"]["messages"]
               if m.get("role") == "tool"]
    assert any(SUBAGENT_ANSWER in json.dumps(content) for content in reports), reports


def test_real_claude_code_lists_the_proxys_models_in_its_picker(tmp_path, upstream):
    """2.1.330 asks /v1/models when discovery is on (`code` turns it on) and stores the ids it
    keeps; 2.1.197 does not ask."""
    upstream.script = scripted_model
    result, output, _ = run_code("2.1.330", tmp_path, [openai_provider(upstream.url)], "say hi",
                                 "Bash", CLAUDE_CODE_MAX_RETRIES="0")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    stored = json.loads((tmp_path / "home" / ".claude" / "cache" / "gateway-models.json")
                        .read_text())
    assert [m["id"] for m in stored["models"]] == ["claude-via-ccproxy/openai,gpt-test"]
    assert stored["models"][0]["display_name"] == "gpt-test (openai, via ccproxy)"


# --- configuration problems: shown at once, naming the cause, never retried for minutes ------------

CONFIG_PROBLEMS = {
    "key refused": (json_reply({"error": {"message": "Incorrect API key provided",
                                          "type": "invalid_request_error"}}, 401),
                    "openai refused its API key; fix providers[0].api_key in"),
    "no such model": (json_reply({"error": {"message": "The model `gpt-test` does not exist or "
                                            "you do not have access to it.",
                                            "type": "invalid_request_error"}}, 404),
                      "openai has no model 'gpt-test'; fix providers[0].models in"),
    "nothing there": (None, "openai cannot be reached; check providers[0].api_base_url in"),
    "no tools (llama.cpp's 500)": (json_reply({"error": {
        "code": 500, "message": "tools param requires --jinja flag", "type": "server_error"}},
        500), "openai gives gpt-test no tools, which Claude Code needs for all it does: start "
              "llama-server with --jinja"),
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("problem", CONFIG_PROBLEMS)
def test_real_claude_code_shows_a_configuration_problem_at_once(version, problem, tmp_path,
                                                                 upstream):
    """Claude Code's default is 10 retries with backoff (minutes); told x-should-retry: false, it
    asks once and shows ccproxy's words."""
    reply, words = CONFIG_PROBLEMS[problem]
    upstream.script = lambda request: reply
    url = upstream.url if reply else dead_url()
    result, output, _ = run_code(version, tmp_path, [openai_provider(url)], "say hi", "Bash")
    assert output["is_error"] is True and words in output["result"], output
    # Retried, it would ask 11 times over minutes. Not retried, it asks once; but on a 400,
    # 2.1.330 re-sends at once up to five times with other thinking and tool settings.
    assert len(upstream.requests) <= (1 if problem in ("key refused", "nothing there") else 6), \
        upstream.requests


# --- the canary: what the pinned versions send is what the profile says -----------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_the_pinned_claude_code_versions_send_nothing_new(version):
    assert claude_code_canary.check(version) == []


def test_the_canary_names_what_is_new_and_which_translation_lacks_a_rule():
    profile = {kind: [] for kind in claude_code_canary.KINDS}
    shape = dict(profile, fields=["messages", "telepathy"], betas=["new-beta-2027-01-01"],
                 blocks=["text", "hologram"])
    assert claude_code_canary.differences(shape, dict(profile, fields=["messages"],
                                                      blocks=["text"])) == [
        "new field: telepathy; no rule in the gemini, openai, openai-responses translation",
        "new beta: new-beta-2027-01-01",
        "new block: hologram; no rule in the gemini, openai, openai-responses translation"]
