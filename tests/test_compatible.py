"""Servers that speak Anthropic's Messages API themselves (DeepSeek, Kimi, GLM, MiniMax, and one
the config declares): each one's mock refuses what its provider's compatibility page (or the
config) says it lacks, and requests shaped like Claude Code's still get through; the thinking
each server makes goes back to it alone."""
from __future__ import annotations

import json
import re
import urllib.request

import anthropic
import pytest

import ccproxy
from helpers import answer_of, json_reply, raw_exchange, sdk, sse, stream_reply

KEY = "sk-compat-0123456789abcdef"
# preset: (how it wants the key, block types it refuses anywhere, fields it refuses, betas too)
RULES = {
    "deepseek-anthropic": ("x-api-key", {"image", "document", "search_result",
                                         "redacted_thinking"},
                           {"container", "mcp_servers", "service_tier", "top_k"}, False),
    "minimax": ("x-api-key", {"image", "document"}, {"top_k", "stop_sequences"}, True),
    "kimi": ("bearer", {"document", "redacted_thinking", "search_result", "tool_reference",
                        "web_fetch_tool_result", "code_execution_tool_result", "mcp_tool_use",
                        "mcp_tool_result", "container_upload"}, set(), True),
    "glm": ("bearer", {"tool_reference"}, set(), True),
    "mimo": ("bearer", set(), set(), True),
    "inhouse": ("bearer", {"image", "document", "redacted_thinking"}, {"top_k"}, False),
}
# A server of no preset, which the config says copies Anthropic's API, and what it lacks.
DECLARED = {"inhouse": {"type": "anthropic", "compatible": {
    "auth": "bearer", "drop_betas": True, "drop_fields": ["top_k"],
    "no_blocks": ["image", "document", "redacted_thinking"]}}}
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}


def block_types(value):
    """Every block type anywhere in a request body."""
    if isinstance(value, dict):
        found = {value["type"]} if isinstance(value.get("type"), str) else set()
        return found.union(*(block_types(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(block_types(v) for v in value)) if value else set()
    return set()


def problems_of(preset, request):
    """What this preset's server would refuse in a request."""
    auth, blocks, fields, betas = RULES[preset]
    body, headers, problems = request["json"], request["headers"], []
    if auth == "bearer" and (headers.get("authorization") != "Bearer " + KEY
                             or "x-api-key" in headers):
        problems.append("wants the key as Bearer")
    if auth == "x-api-key" and headers.get("x-api-key") != KEY:
        problems.append("wants the key as x-api-key")
    problems += ["block %s" % kind for kind in sorted(block_types(body["messages"]) & blocks)]
    problems += ["field %s" % key for key in sorted(set(body) & fields)]
    if not betas and "anthropic-beta" in headers:
        problems.append("anthropic-beta")
    if "ccpx1." in json.dumps(body):
        problems.append("a signature it never made")
    if any(message["role"] == "system" for message in body["messages"]):   # MiniMax's 2013
        problems.append("chat content has invalid message role: system")
    user_id = (body.get("metadata") or {}).get("user_id", "u")       # DeepSeek's since May 2026
    if preset == "deepseek-anthropic" and not re.fullmatch(r"[a-zA-Z0-9_-]+", user_id):
        problems.append("Invalid 'user_id': string does not match pattern. Expected a string "
                        "that matches the pattern '^[a-zA-Z0-9_-]+$'.")
    return problems


def answer(preset, stream, signature):
    """A thinking block signed by this server, then text; whole or streamed."""
    return anthropic_answer([{"type": "thinking", "thinking": "Mine.", "signature": signature},
                             {"type": "text", "text": "ok"}], "end_turn", stream)


def anthropic_answer(content, stop_reason, stream):
    """An Anthropic message of these blocks, whole or as the events that stream it."""
    message = {"id": "msg_c", "type": "message", "role": "assistant", "model": "served",
               "content": content, "stop_reason": stop_reason, "stop_sequence": None,
               "usage": {"input_tokens": 10, "output_tokens": 3}}
    if not stream:
        return json_reply(message)
    events = [sse("message_start", {"type": "message_start", "message": dict(
        message, content=[], stop_reason=None)})]
    for index, block in enumerate(content):
        events += block_events(index, block)
    return stream_reply(events + [
        sse("message_delta", {"type": "message_delta", "usage": {"output_tokens": 3},
                              "delta": {"stop_reason": stop_reason, "stop_sequence": None}}),
        sse("message_stop", {"type": "message_stop"})])


def block_events(index, block):
    """content_block_start, its deltas, content_block_stop."""
    start, deltas = block, []
    if block["type"] == "thinking":
        start = dict(block, thinking="", signature="")
        deltas = [{"type": "thinking_delta", "thinking": block["thinking"]},
                  {"type": "signature_delta", "signature": block["signature"]}]
    elif block["type"] == "text":
        start, deltas = dict(block, text=""), [{"type": "text_delta", "text": block["text"]}]
    elif block["type"] == "tool_use":
        start = dict(block, input={})
        deltas = [{"type": "input_json_delta", "partial_json": json.dumps(block["input"])}]
    return ([sse("content_block_start", {"type": "content_block_start", "index": index,
                                         "content_block": start})]
            + [sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                           "delta": delta}) for delta in deltas]
            + [sse("content_block_stop", {"type": "content_block_stop", "index": index})])


def strict_server(preset):
    """The script of a mock that refuses, as its provider does, what it lacks."""
    def script(request):
        problems = problems_of(preset, request)
        if problems:
            return json_reply({"type": "error", "error": {"type": "invalid_request_error",
                                                          "message": "; ".join(problems)}}, 400)
        return answer(preset, request["json"].get("stream") is True, "SIG-" + preset)
    return script


def compat_entry(preset, url, models=("m",)):
    """A provider entry for this preset's server (or a declared one's) at url."""
    return dict({"name": preset, "api_key": KEY, "models": list(models), "api_base_url": url},
                **DECLARED.get(preset, {}))


def compat_proxy(start_proxy, upstream, *presets):
    return start_proxy({"providers": [compat_entry(preset, upstream.url) for preset in presets]})


CLAUDE_CODE_USER_ID = json.dumps({"device_id": "8ca5" * 16, "account_uuid": "",
                                  "session_id": "7322ccaf-2f7c-4536-9218-3d95db342e72"},
                                 separators=(",", ":"))
# Claude Code's user id (2.1.332's shape), which DeepSeek refuses, and its kinds of content
# that some of these servers refuse: an image in the prompt and in a tool result (a
# screenshot), a document, a redacted thinking block, another provider's thinking; a beta
# header; top_k and stop_sequences.
CLAUDE_CODE_LIKE = dict(
    model="m", max_tokens=100, stop_sequences=["END"], extra_body={"top_k": 5},
    metadata={"user_id": CLAUDE_CODE_USER_ID},
    extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"},
    messages=[
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, IMAGE, {
            "type": "document", "source": {"type": "text", "media_type": "text/plain",
                                           "data": "the spec"}}]},
        {"role": "assistant", "content": [
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "thinking", "thinking": "x", "signature": "ccpx1.openai"},
            {"type": "tool_use", "id": "toolu_1", "name": "screenshot", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": [{"type": "text", "text": "here"}, IMAGE, {
                                          "type": "tool_reference", "tool_name": "Grep"}]}]},
        {"role": "system", "content": "Working directory: /w"}])       # as Claude Code ends


@pytest.mark.parametrize("preset", sorted(RULES))
@pytest.mark.parametrize("stream", [False, True])
def test_each_preset_sends_only_what_its_server_takes(start_proxy, upstream, preset, stream):
    upstream.script = strict_server(preset)
    proxy = compat_proxy(start_proxy, upstream, preset)
    if stream:
        with sdk(proxy).messages.stream(**CLAUDE_CODE_LIKE) as answered:
            message = answered.get_final_message()
    else:
        message = sdk(proxy).messages.create(**CLAUDE_CODE_LIKE)
    assert message.content[1].text == "ok"
    sent = upstream.requests[0]["json"]["messages"]
    refused = RULES[preset][1]
    if "image" in refused:
        assert sent[0]["content"][1] == {"type": "text",
                                         "text": "[image omitted: %s takes none]" % preset}
        assert sent[2]["content"][0]["content"][1]["type"] == "text"      # inside the result
        assert sent[0]["content"][2] == {"type": "text", "text": "the spec"}
    else:
        assert sent[0]["content"][1] == IMAGE
    assert [b["type"] for b in sent[1]["content"]] == ["tool_use"]        # no foreign thinking
    if "tool_reference" in refused:                                       # Claude Code's search
        assert sent[2]["content"][0]["content"][2] == {"type": "text",
                                                       "text": "[tool loaded: Grep]"}
    assert len(sent) == 3 and sent[2]["content"][-1] == {"type": "text",  # the system message
                                                         "text": "Working directory: /w"}
    user_id = upstream.requests[0]["json"]["metadata"]["user_id"]
    assert re.fullmatch(r"u_[0-9a-f]{32}", user_id)         # stable: a digest of Claude Code's
    assert user_id == ccproxy.plain_user_id({"user_id": CLAUDE_CODE_USER_ID})


def test_anthropic_itself_gets_claude_codes_user_id_as_it_came(start_proxy, upstream):
    upstream.script = lambda r: answer("anthropic", False, "SIG")
    proxy = start_proxy({"providers": [{"name": "anthropic", "api_key": KEY,
                                        "api_base_url": upstream.url}]})
    sdk(proxy).messages.create(model="m", max_tokens=9, metadata={
        "user_id": CLAUDE_CODE_USER_ID}, messages=[{"role": "user", "content": "hi"}])
    assert upstream.requests[0]["json"]["metadata"] == {"user_id": CLAUDE_CODE_USER_ID}


@pytest.mark.parametrize("stream", [False, True])
def test_a_servers_own_thinking_goes_back_to_it_and_to_nobody_else(start_proxy, upstream,
                                                                   second_upstream, stream):
    upstream.script = strict_server("deepseek-anthropic")
    second_upstream.script = strict_server("kimi")
    proxy = start_proxy({"providers": [
        {"name": "deepseek-anthropic", "api_key": KEY, "api_base_url": upstream.url},
        {"name": "kimi", "api_key": KEY, "api_base_url": second_upstream.url}]})
    ask = dict(max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    if stream:
        with sdk(proxy).messages.stream(model="deepseek-anthropic,m", **ask) as answered:
            first = answered.get_final_message()
    else:
        first = sdk(proxy).messages.create(model="deepseek-anthropic,m", **ask)
    thinking = first.content[0].model_dump()
    assert thinking["signature"] == "ccpx1.as.ZGVlcHNlZWstYW50aHJvcGlj.SIG-deepseek-anthropic"
    assert first.model == "deepseek-anthropic,m"         # as asked: Claude Code keeps thinking
    history = ask["messages"] + [{"role": "assistant", "content": [thinking]},
                                 {"role": "user", "content": "more"}]
    for target, mock in (("deepseek-anthropic", upstream), ("kimi", second_upstream)):
        sdk(proxy).messages.create(model=target + ",m", max_tokens=50, messages=history)
        back = mock.requests[-1]["json"]["messages"][1]["content"]
        assert back == ([dict(thinking, signature="SIG-deepseek-anthropic")]
                        if target == "deepseek-anthropic" else [])


def unsigned_answer(thinking):
    """A stream whose thinking block has no signature at all: none at its start, no
    signature_delta."""
    message = {"id": "msg_c", "type": "message", "role": "assistant", "model": "served",
               "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": 10, "output_tokens": 3}}
    return stream_reply([
        sse("message_start", {"type": "message_start", "message": message}),
        sse("content_block_start", {"type": "content_block_start", "index": 0,
                                    "content_block": {"type": "thinking", "thinking": ""}}),
        sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
            "type": "thinking_delta", "thinking": thinking["thinking"]}}),
        sse("content_block_stop", {"type": "content_block_stop", "index": 0})] +
        block_events(1, {"type": "text", "text": "ok"}) + [
        sse("message_delta", {"type": "message_delta", "usage": {"output_tokens": 3},
                              "delta": {"stop_reason": "end_turn", "stop_sequence": None}}),
        sse("message_stop", {"type": "message_stop"})])


@pytest.mark.parametrize("stream", [False, True])
def test_a_servers_unsigned_thinking_is_its_own_and_never_reaches_anthropic(
        start_proxy, upstream, second_upstream, stream):
    """A server that signs no thinking (an empty signature; none at all): its blocks are
    marked as its own all the same. Anthropic refuses an unsigned block ("Invalid `signature`
    in `thinking` block", what users who switch to Claude from another provider meet)."""
    thinking = {"type": "thinking", "thinking": "Mine."}
    upstream.script = lambda r: unsigned_answer(thinking) if stream else anthropic_answer(
        [thinking, {"type": "text", "text": "ok"}], "end_turn", False)
    second_upstream.script = lambda r: anthropic_answer([{"type": "text", "text": "ok"}],
                                                        "end_turn", False)
    proxy = start_proxy({"providers": [
        {"name": "kimi", "api_key": KEY, "api_base_url": upstream.url},
        {"name": "anthropic", "api_key": KEY, "api_base_url": second_upstream.url}]})
    ask = dict(max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    first = answer_of(sdk(proxy), stream, model="kimi,m", **ask).content[0].model_dump()
    assert first == dict(thinking, signature="ccpx1.as.a2ltaQ.")
    history = ask["messages"] + [{"role": "assistant", "content": [first, {
        "type": "thinking", "thinking": "Made elsewhere, unsigned.", "signature": ""}, {
        "type": "text", "text": "ok"}]}, {"role": "user", "content": "more"}]
    sdk(proxy).messages.create(model="kimi,m", max_tokens=50, messages=history)
    assert upstream.requests[-1]["json"]["messages"][1]["content"][0] == dict(thinking,
                                                                              signature="")
    sdk(proxy).messages.create(model="anthropic,claude-x", max_tokens=50, messages=history)
    assert second_upstream.requests[-1]["json"]["messages"][1]["content"] == [
        {"type": "text", "text": "ok"}]


def test_a_compatible_servers_nan_reaches_the_client_as_null(start_proxy, upstream):
    """A compatible server's whole answer, which ccproxy writes anew (its signatures marked,
    the model the client asked for), is JSON a JavaScript client reads: NaN and Infinity as
    null. (Its streams pass as they come, but for the events ccproxy marks.)"""
    upstream.script = lambda r: anthropic_answer([
        {"type": "thinking", "thinking": "t", "signature": "S"},
        {"type": "tool_use", "id": "toolu_1", "name": "f",
         "input": {"x": float("nan"), "y": float("inf")}}], "tool_use", False)
    proxy = compat_proxy(start_proxy, upstream, "kimi")
    body = json.dumps({"model": "kimi,m", "max_tokens": 50,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    received = raw_exchange(proxy.port, b"POST /v1/messages HTTP/1.1\r\nConnection: close\r\n"
                                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert b"NaN" not in received and b"Infinity" not in received
    assert b'"input":{"x":null,"y":null}' in received.replace(b" ", b"")


def test_anthropic_itself_gets_no_thinking_a_compatible_server_made(start_proxy, upstream):
    upstream.script = lambda r: json_reply({"id": "m", "type": "message", "role": "assistant",
                                            "model": "c", "content": [], "stop_reason": "end_turn",
                                            "stop_sequence": None,
                                            "usage": {"input_tokens": 1, "output_tokens": 1}})
    proxy = start_proxy({"providers": [{"name": "anthropic", "api_key": KEY,
                                        "api_base_url": upstream.url}]})
    sdk(proxy).messages.create(model="c", max_tokens=50, messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "t", "signature": "ccpx1.as.a2ltaQ.SIG"},
            {"type": "thinking", "thinking": "real", "signature": "EqQBAnthropic"},
            {"type": "text", "text": "a"}]},
        {"role": "user", "content": "more"}])
    assert upstream.requests[0]["json"]["messages"][1]["content"] == [
        {"type": "thinking", "thinking": "real", "signature": "EqQBAnthropic"},
        {"type": "text", "text": "a"}]
    sdk(proxy).messages.create(model="c", max_tokens=50, messages=[   # no ccproxy mark at all
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "unsigned", "signature": ""},
            {"type": "text", "text": "a"}]},
        {"role": "user", "content": "more"}])
    assert upstream.requests[1]["json"]["messages"][1]["content"] == [
        {"type": "text", "text": "a"}]


def minimax_and_anthropic(start_proxy, upstream, second_upstream):
    """A proxy in front of MiniMax (a strict mock, which refuses system messages) and of
    Anthropic (answering ok)."""
    upstream.script = strict_server("minimax")
    second_upstream.script = lambda r: anthropic_answer([{"type": "text", "text": "ok"}],
                                                        "end_turn", False)
    return start_proxy({"providers": [
        {"name": "minimax", "api_key": KEY, "api_base_url": upstream.url},
        {"name": "anthropic", "api_key": KEY, "api_base_url": second_upstream.url}]})


def test_system_messages_join_the_users_for_a_compatible_server_and_stay_for_anthropic(
        start_proxy, upstream, second_upstream):
    proxy = minimax_and_anthropic(start_proxy, upstream, second_upstream)
    messages = [{"role": "user", "content": "hi"},
                {"role": "system", "content": [{"type": "text", "text": "MCP: use it"}]},
                {"role": "assistant", "content": "hello"},
                {"role": "system", "content": "Working directory: /w"},
                {"role": "user", "content": "go on"}]
    for target in ("minimax,m", "anthropic,c"):
        sdk(proxy).messages.create(model=target, max_tokens=50, messages=messages)
    assert upstream.requests[-1]["json"]["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "hi"},
                                     {"type": "text", "text": "MCP: use it"}]},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Working directory: /w"},
        {"role": "user", "content": "go on"}]
    assert second_upstream.requests[-1]["json"]["messages"] == messages


def test_a_system_message_between_calls_and_results_joins_the_results_for_a_compatible_server(
        start_proxy, upstream, second_upstream):
    """Claude Code puts one there at times. As the user's own, it came between the calls and
    their results; Anthropic takes it in place."""
    proxy = minimax_and_anthropic(start_proxy, upstream, second_upstream)
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                                                   "name": "Bash", "input": {}}]},
                {"role": "system", "content": "Working directory: /w"},
                {"role": "user", "content": [result]}]
    for target in ("minimax,m", "anthropic,c"):
        sdk(proxy).messages.create(model=target, max_tokens=50, messages=messages)
    assert upstream.requests[-1]["json"]["messages"][2:] == [
        {"role": "user", "content": [result, {"type": "text", "text": "Working directory: /w"}]}]
    assert second_upstream.requests[-1]["json"]["messages"] == messages


def test_a_tool_call_whose_input_is_no_object_goes_back_inside_one(start_proxy, upstream,
                                                                    second_upstream):
    """GLM's Anthropic API answers a call with a list for its input at times; sent back as it
    was, its every answer after was a 500 (compaction too), and Anthropic's a 400."""
    for mock in (upstream, second_upstream):
        mock.script = lambda r: anthropic_answer([{"type": "text", "text": "ok"}], "end_turn",
                                                 False)
    proxy = start_proxy({"providers": [
        {"name": "glm", "api_key": KEY, "api_base_url": upstream.url},
        {"name": "anthropic", "api_key": KEY, "api_base_url": second_upstream.url}]})
    calls = [{"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": [{"command": "ls"}]},
             {"type": "tool_use", "id": "toolu_2", "name": "Bash", "input": {"command": "pwd"}}]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": calls},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                     "content": "InputValidationError"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "/w"}]}]
    for target, mock in (("glm,m", upstream), ("anthropic,c", second_upstream)):
        sdk(proxy).messages.create(model=target, max_tokens=50, messages=messages)
        assert [b["input"] for b in mock.requests[-1]["json"]["messages"][1]["content"]] == [
            {"input": [{"command": "ls"}]}, {"command": "pwd"}]


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_id_kimi_repeats_reaches_claude_code_as_its_own_and_kimi_as_kimis(
        start_proxy, upstream, stream):
    """Kimi's model writes its calls' ids, "functions.Bash:0", and may number them from 0 in
    every answer; Claude Code takes a repeated id for a call it has run and asks again
    without end. A repeat gets an id of its own, which goes back to Kimi as Kimi gave it."""
    call = {"type": "tool_use", "id": "functions.Bash:0", "name": "Bash", "input": {}}
    upstream.script = lambda r: anthropic_answer([call], "tool_use", stream)
    proxy = compat_proxy(start_proxy, upstream, "kimi")
    turn = [{"role": "user", "content": "go"}, {"role": "assistant", "content": [call]},
            {"role": "user", "content": [{"type": "tool_result",
                                          "tool_use_id": "functions.Bash:0", "content": "a"}]}]
    if stream:
        with sdk(proxy).messages.stream(model="kimi,m", max_tokens=50, messages=turn) as events:
            repeat = events.get_final_message().content[0].id
    else:
        repeat = sdk(proxy).messages.create(model="kimi,m", max_tokens=50, messages=turn
                                            ).content[0].id
    assert repeat.startswith("ccpxre_")
    sdk(proxy).messages.create(model="kimi,m", max_tokens=50, messages=turn + [
        {"role": "assistant", "content": [dict(call, id=repeat)]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": repeat,
                                      "content": "b"}]}])
    sent = upstream.requests[-1]["json"]["messages"]
    assert [sent[3]["content"][0]["id"], sent[4]["content"][0]["tool_use_id"]] == [
        "functions.Bash:0"] * 2


@pytest.mark.parametrize("preset", ["deepseek-anthropic", "kimi"])
def test_deepseek_and_kimi_in_thinking_mode_get_a_thinking_block_before_tool_calls(
        start_proxy, upstream, preset):
    upstream.script = strict_server(preset)
    proxy = compat_proxy(start_proxy, upstream, preset)
    sdk(proxy).messages.create(model="m", max_tokens=5000, thinking={
        "type": "enabled", "budget_tokens": 2000}, messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "ls", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": "a"}]}])
    assert upstream.requests[0]["json"]["messages"][1]["content"] == [
        {"type": "thinking", "thinking": "", "signature": ""},
        {"type": "tool_use", "id": "toolu_1", "name": "ls", "input": {}}]


@pytest.mark.parametrize("thinking, sent", [
    (None, {"type": "disabled"}),                # Anthropic's models think only when asked
    ({"type": "disabled"}, {"type": "disabled"}),
    ({"type": "adaptive"}, {"type": "adaptive"})])
def test_deepseek_is_told_not_to_think_when_a_request_does_not_say(start_proxy, upstream,
                                                                    thinking, sent):
    """DeepSeek's Anthropic API thinks unless told not to (api-docs.deepseek.com/guides/
    thinking_mode), and then wants its thinking before every turn of tool calls."""
    upstream.script = strict_server("deepseek-anthropic")
    proxy = compat_proxy(start_proxy, upstream, "deepseek-anthropic")
    request = dict(model="m", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    if thinking:
        request["thinking"] = thinking
    sdk(proxy).messages.create(**request)
    assert upstream.requests[0]["json"]["thinking"] == sent


def test_a_generic_anthropic_server_gets_the_request_as_it_came(start_proxy, upstream):
    upstream.script = lambda r: answer("gateway", False, "SIG")
    proxy = start_proxy({"providers": [{"name": "gateway", "type": "anthropic", "api_key": KEY,
                                        "api_base_url": upstream.url + "/llm"}]})
    raw = json.dumps({"model": "m", "max_tokens": 9, "top_k": 3, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, IMAGE]}]})
    request = urllib.request.Request(proxy.url + "/v1/messages", data=raw.encode(), headers={
        "content-type": "application/json", "anthropic-beta": "x-2025"})
    urllib.request.urlopen(request, timeout=10).read()
    sent = upstream.requests[0]
    assert sent["path"] == "/llm/v1/messages" and sent["body"] == raw.encode()
    assert sent["headers"]["x-api-key"] == KEY and sent["headers"]["anthropic-beta"] == "x-2025"


def test_compatible_presets_cannot_search_and_know_their_limits():
    config = ccproxy.build_config({"providers": [
        {"name": name, "api_key": KEY} for name in ("deepseek-anthropic", "minimax", "moonshot",
                                                    "zai", "anthropic")]}, "config.json", {})
    searches = {p.name: ccproxy.protocol_for(p, "m").can_search(p, "m") for p in config.providers}
    assert searches == {"deepseek-anthropic": False, "minimax": False, "moonshot": False,
                        "zai": False, "anthropic": True}
    assert config.provider_named("deepseek-anthropic").context_window("deepseek-v4-pro") == \
        1000000
    assert config.provider_named("minimax").context_window("MiniMax-M3") == 1000000
    assert config.provider_named("moonshot").base_url == "https://api.moonshot.ai/anthropic"
    assert config.provider_named("zai").base_url == "https://api.z.ai/api/anthropic"


@pytest.mark.parametrize("url, served", [
    ("https://api.kimi.com/coding", "kimi"), ("https://api.moonshot.cn/anthropic", "kimi"),
    ("https://open.bigmodel.cn/api/anthropic", "glm"),
    ("https://api.minimaxi.com/anthropic", "minimax"),
    ("https://api.deepseek.com/anthropic", "deepseek-anthropic"),
    ("https://token-plan-cn.xiaomimimo.com/anthropic", "mimo"),
    ("https://llm.example.com/anthropic", None)])
def test_a_provider_of_any_name_on_a_compatible_servers_host_is_taken_for_that_server(url,
                                                                                      served):
    """Kimi For Coding (a plan of its own, beside Moonshot's API), or GLM in China, under a
    name of the user's: it gets what that server lacks, not the requests Anthropic takes."""
    config = ccproxy.build_config({"providers": [
        {"name": "mine", "type": "anthropic", "api_key": KEY, "api_base_url": url}]},
        "config.json", {})
    mine = config.provider_named("mine")
    preset = ccproxy.PROVIDER_PRESETS.get(served, {"quirks": {"anthropic_compat": None}})
    expected = preset["quirks"]["anthropic_compat"]
    assert mine.quirks["anthropic_compat"] == (dict(ccproxy.ANTHROPIC_COMPAT, **expected)
                                               if served else None)
    assert mine.model_limits == ccproxy.PRESET_MODEL_LIMITS.get(served, {})   # and its data
    assert mine.prices == ccproxy.PRESET_MODEL_PRICES.get(served, {})
    request = {"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                        "data": "the spec"}}]}]}
    sent = ccproxy.anthropic_messages_for(request, config.provider_named("mine"))
    as_text = served in ("kimi", "minimax", "deepseek-anthropic")
    assert sent == ([{"role": "user", "content": [{"type": "text", "text": "the spec"}]}]
                    if as_text else None)


def thinking_missing(body):
    """Kimi For Coding's refusal (it thinks whatever a request says) of a history with a turn
    of tool calls that has no thinking before them, or None."""
    for index, message in enumerate(body["messages"]):
        blocks = message["content"] if isinstance(message["content"], list) else []
        if any(b["type"] == "tool_use" for b in blocks) and blocks[0]["type"] != "thinking":
            return json_reply({"type": "error", "error": {
                "type": "invalid_request_error", "message": "thinking is enabled but "
                "reasoning_content is missing in assistant tool call message at index %d"
                % index}}, 400)
    return None


def kimi_for_coding(request):
    """A mock of Kimi For Coding."""
    return thinking_missing(request["json"]) or answer(
        "glm", request["json"].get("stream") is True, "SIG")


CALLED_BEFORE = [{"role": "user", "content": "hi"},
                 {"role": "assistant", "content": [
                     {"type": "tool_use", "id": "toolu_1", "name": "ls", "input": {}}]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                               "content": "a"}]}]


@pytest.mark.parametrize("stream", [False, True])
def test_a_compatible_server_that_wants_thinking_before_calls_says_so_once(start_proxy,
                                                                           upstream, stream):
    """A server whose preset does not say it (or one of no preset) refuses a turn of calls
    without thinking before them, at every turn after the first call: said once, it is
    remembered, and the request goes again at once with an empty thinking block there."""
    upstream.script = kimi_for_coding
    proxy = compat_proxy(start_proxy, upstream, "glm")
    for turn in range(2):
        message = answer_of(sdk(proxy), stream, model="m", max_tokens=50,
                            messages=CALLED_BEFORE)
        assert message.content[-1].text == "ok"
    sent = [request["json"]["messages"][1]["content"][0] for request in upstream.requests]
    assert [block["type"] for block in sent] == ["tool_use", "thinking", "thinking"]
    assert sent[1] == {"type": "thinking", "thinking": "", "signature": ""}
    providers = json.loads(urllib.request.urlopen(proxy.url + "/providers", timeout=10).read())
    assert providers["providers"][0]["thinking_with_calls"] == "always"   # it thinks unasked


@pytest.mark.parametrize("words", [
    "thinking is enabled but reasoning_content is missing in assistant tool call message at "
    "index 1", "The `content[].thinking` in the thinking mode must be passed back to the API."])
def test_thinking_asked_for_is_learned_for_requests_that_ask(start_proxy, upstream, words):
    """Learned from a request in thinking mode, the block goes only where thinking is asked
    for; a server that refuses the request again has its refusal reach the client."""
    upstream.script = lambda r: json_reply({"type": "error", "error": {
        "type": "invalid_request_error", "message": words}}, 400)
    proxy = compat_proxy(start_proxy, upstream, "minimax")
    with pytest.raises(anthropic.BadRequestError, match="passed back|is missing"):
        sdk(proxy).messages.create(model="m", max_tokens=5000, messages=CALLED_BEFORE,
                                   thinking={"type": "enabled", "budget_tokens": 2000})
    assert [r["json"]["messages"][1]["content"][0]["type"] for r in upstream.requests] == [
        "tool_use", "thinking"]
    upstream.script = lambda r: answer("minimax", False, "SIG")
    sdk(proxy).messages.create(model="m", max_tokens=50, messages=CALLED_BEFORE)
    assert upstream.requests[-1]["json"]["messages"][1]["content"][0]["type"] == "tool_use"


def test_anthropic_protocol_servers_get_the_clients_user_agent(start_proxy, upstream):
    """Kimi For Coding answers only the coding agents it knows by their User-Agent ("Kimi For
    Coding is currently only available for Coding Agents such as Kimi CLI, Claude Code",
    a 403 to any other); one the client did not send is ccproxy's."""
    upstream.script = lambda r: answer("kimi", False, "SIG")
    proxy = compat_proxy(start_proxy, upstream, "kimi")
    body = json.dumps({"model": "m", "max_tokens": 9, "messages": [
        {"role": "user", "content": "hi"}]}).encode()
    for agent in (b"User-Agent: claude-cli/2.1.332 (external, cli)\r\n",
                  b"User-Agent: tab\there\r\n", b""):
        raw_exchange(proxy.port, b"POST /v1/messages HTTP/1.1\r\nConnection: close\r\n%s"
                     b"Content-Length: %d\r\n\r\n%s" % (agent, len(body), body))
    assert [r["headers"]["user-agent"] for r in upstream.requests] == [
        "claude-cli/2.1.332 (external, cli)", "tab%09here", ccproxy.USER_AGENT]


@pytest.mark.parametrize("preset", ["kimi", "glm", "minimax"])
def test_a_server_that_takes_no_tool_reference_gets_the_tools_it_loaded(start_proxy, upstream,
                                                                          preset):
    """Claude Code's tool search: deferred tools, loaded by a tool_reference in a result. A
    server that takes none gets the reference as text, so it gets each loaded tool plainly
    (and no tool still deferred), as the translations send them; one that takes them gets the
    request as it came."""
    upstream.script = strict_server(preset)
    proxy = compat_proxy(start_proxy, upstream, preset)
    schema = {"type": "object", "properties": {}}
    tools = [{"name": "Bash", "input_schema": schema},
             {"name": "Grep", "input_schema": schema, "defer_loading": True},
             {"name": "WebSearch", "input_schema": schema, "defer_loading": True}]
    sdk(proxy).messages.create(model="m", max_tokens=50, tools=tools, messages=[
        {"role": "user", "content": "find it"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                                           "name": "ToolSearch", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": [{"type": "tool_reference",
                                                   "tool_name": "Grep"}]}]}])
    sent = upstream.requests[0]["json"]["tools"]
    assert sent == (tools if preset == "minimax" else [
        {"name": "Bash", "input_schema": schema}, {"name": "Grep", "input_schema": schema}])


@pytest.mark.parametrize("thinking, output_config, sent", [
    (None, {"effort": "max"}, None),                      # thinking off (the preset's)
    ({"type": "disabled"}, {"effort": "max", "format": {"type": "json_schema"}},
     {"format": {"type": "json_schema"}}),
    ({"type": "adaptive"}, {"effort": "max"}, {"effort": "max"})])
def test_deepseek_gets_no_effort_with_thinking_off(start_proxy, upstream, thinking,
                                                   output_config, sent):
    """Claude Code 2.1.166 on sends its subagents thinking off and, with
    CLAUDE_CODE_EFFORT_LEVEL set, an effort, which DeepSeek refuses together."""
    def deepseek(request):
        body = request["json"]
        if body["thinking"] == {"type": "disabled"} and "effort" in body.get(
                "output_config", {}):
            return json_reply({"type": "error", "error": {
                "type": "invalid_request_error", "message": "thinking options type cannot be "
                "disabled when reasoning_effort is set"}}, 400)
        return answer("deepseek-anthropic", False, "SIG")
    upstream.script = deepseek
    proxy = compat_proxy(start_proxy, upstream, "deepseek-anthropic")
    request = dict(model="m", max_tokens=50, messages=[{"role": "user", "content": "hi"}],
                   extra_body={"output_config": output_config})
    if thinking:
        request["thinking"] = thinking
    sdk(proxy).messages.create(**request)
    assert upstream.requests[0]["json"].get("output_config") == sent


@pytest.mark.parametrize("preset", ["minimax", "anthropic"])
def test_a_tool_schema_without_properties_reaches_a_compatible_server_whole(start_proxy,
                                                                            upstream, preset):
    """An MCP tool without parameters comes as {"type": "object"} alone: MiniMax answers it
    "function name or parameters is empty (2013)", at every request, since tools go with each.
    Anthropic takes it as it is."""
    def minimax(request):
        for tool in request["json"]["tools"]:
            if not isinstance(tool["input_schema"].get("properties"), dict):
                return json_reply({"type": "error", "error": {
                    "type": "invalid_request_error",
                    "message": "invalid params, function name or parameters is empty (2013)"}},
                    400)
        return answer(preset, False, "SIG")
    upstream.script = minimax if preset == "minimax" else lambda r: answer(preset, False, "S")
    proxy = compat_proxy(start_proxy, upstream, preset)
    tools = [{"name": "mcp__clock__now", "input_schema": {"type": "object"}},
             {"name": "Bash", "input_schema": {"type": "object", "properties": {
                 "command": {"type": "string"}}}}]
    sdk(proxy).messages.create(model="m", max_tokens=50, tools=tools,
                               messages=[{"role": "user", "content": "what time is it"}])
    sent = upstream.requests[0]["json"]["tools"]
    assert sent == (tools if preset == "anthropic" else [
        {"name": "mcp__clock__now", "input_schema": {"type": "object", "properties": {}}}]
        + tools[1:])


def test_kimis_overflow_that_max_tokens_makes_is_asked_again_within_its_window(start_proxy,
                                                                              upstream):
    """Its total counts max_tokens (passed on as it came, Claude Code compacted at half the
    window): read with the max_tokens sent, the request goes again at once with the room the
    input leaves, spliced into the client's body, a thinking budget within it. An overflow of
    the input itself goes as it came."""
    refusal = "Invalid request: Your request exceeded model token limit: 50000 (requested: %d)"
    inputs = [40000]

    def kimi(request):
        total = inputs[0] + request["json"]["max_tokens"]
        return json_reply({"type": "error", "error": {
            "type": "invalid_request_error", "message": refusal % total}}, 400) \
            if total > 50000 else answer("kimi", False, "SIG")
    upstream.script = kimi
    proxy = compat_proxy(start_proxy, upstream, "kimi")
    ask = dict(model="m", messages=[{"role": "user", "content": "hi"}])
    message = sdk(proxy).messages.create(max_tokens=20000, thinking={
        "type": "enabled", "budget_tokens": 19999}, **ask)
    assert message.content[-1].text == "ok"
    assert [(r["json"]["max_tokens"], r["json"]["thinking"]["budget_tokens"])
            for r in upstream.requests] == [(20000, 19999), (10000, 9999)]
    inputs[0] = 60000
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(proxy).messages.create(max_tokens=1000, **ask)
    assert caught.value.body["error"]["message"] == refusal % 61000


def test_a_gateway_declared_compatible_keeps_its_thinking_from_anthropic(start_proxy, upstream,
                                                                         second_upstream):
    """A gateway in front of other models than Claude, declared `"compatible": true`: its
    thinking is marked as its own, goes back to it, and never reaches Anthropic after a switch
    (Anthropic refused the session's every turn after: "Invalid `signature`")."""
    upstream.script = lambda r: answer("gateway", False, "SIG-gateway")
    second_upstream.script = lambda r: answer("anthropic", False, "EqQBAnthropic")
    proxy = start_proxy({"providers": [
        {"name": "gateway", "type": "anthropic", "api_key": KEY, "api_base_url": upstream.url,
         "compatible": True},
        {"name": "anthropic", "api_key": KEY, "api_base_url": second_upstream.url}]})
    ask = [{"role": "user", "content": "hi"}]
    thinking = sdk(proxy).messages.create(model="gateway,m", max_tokens=50,
                                          messages=ask).content[0].model_dump()
    assert thinking["signature"] == "ccpx1.as.Z2F0ZXdheQ.SIG-gateway"
    history = ask + [{"role": "assistant", "content": [thinking, {"type": "text", "text": "a"}]},
                     {"role": "user", "content": "more"}]
    for target, mock, back in (("gateway", upstream, [dict(thinking, signature="SIG-gateway")]),
                               ("anthropic", second_upstream, [])):
        sdk(proxy).messages.create(model=target + ",m", max_tokens=50, messages=history)
        assert mock.requests[-1]["json"]["messages"][1]["content"][:-1] == back
    assert upstream.requests[0]["headers"]["x-api-key"] == KEY          # Anthropic's way
    views = json.loads(urllib.request.urlopen(proxy.url + "/providers", timeout=10).read())
    assert [view["compatible"] for view in views["providers"]] == [True, False]


def test_a_preset_declared_not_compatible_is_taken_for_anthropic(start_proxy, upstream):
    """`"compatible": false`: Anthropic itself, or a gateway in front of it, at any address:
    the request as it came, the key as x-api-key, its thinking not marked."""
    upstream.script = lambda r: answer("kimi", False, "EqQBAnthropic")
    proxy = start_proxy({"providers": [dict(compat_entry("kimi", upstream.url),
                                            compatible=False)]})
    raw = json.dumps({"model": "m", "max_tokens": 9, "messages": [
        {"role": "user", "content": "hi"}, {"role": "system", "content": "Working in /w"}]})
    request = urllib.request.Request(proxy.url + "/v1/messages", data=raw.encode(),
                                     headers={"content-type": "application/json"})
    answered = json.loads(urllib.request.urlopen(request, timeout=10).read())
    assert answered["content"][0]["signature"] == "EqQBAnthropic"
    sent = upstream.requests[0]
    assert sent["body"] == raw.encode() and sent["headers"]["x-api-key"] == KEY
    assert "authorization" not in sent["headers"]


@pytest.mark.parametrize("entry, problem", [
    ({"type": "openai", "compatible": True},
     'providers[0].compatible: is for a "type": "anthropic" provider'),
    ({"compatible": "yes"}, "providers[0].compatible: must be true, false or an object of what "
                            "the server lacks (auth, drop_betas,"),
    ({"compatible": {"auht": "bearer"}},
     "providers[0].compatible.auht: unknown key (did you mean 'auth'?)"),
    ({"compatible": {"auth": "Bearer"}},
     'providers[0].compatible.auth: must be "x-api-key" or "bearer"'),
    ({"compatible": {"thinking_with_calls": "yes"}},
     'providers[0].compatible.thinking_with_calls: must be true or false or "always"'),
    ({"compatible": {"drop_betas": 1}}, "providers[0].compatible.drop_betas: must be true or "
                                        "false"),
    ({"compatible": {"no_blocks": "image"}},
     'providers[0].compatible.no_blocks: must be a list of names, not "image"'),
    ({"compatible": {"no_blocks": ["image", ""]}},
     "providers[0].compatible.no_blocks: must be a list of non-empty names"),
    ({"compatible": {"no_blocks": ["tool_result"]}},
     "providers[0].compatible.no_blocks: cannot name tool_result: a server that serves Claude "
     "Code takes text, tool_use and tool_result"),
    ({"compatible": {"drop_fields": ["top_k", "max_tokens"]}},
     "providers[0].compatible.drop_fields: cannot name max_tokens: every request of the "
     "Messages API has model, messages and max_tokens")])
def test_a_wrong_compatible_names_its_key_and_file(tmp_path, entry, problem):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"providers": [dict({
        "name": "inhouse", "type": "anthropic", "api_base_url": "http://127.0.0.1:9"}, **entry)]}))
    with pytest.raises(ccproxy.ConfigError) as refused:
        ccproxy.load_config(str(config))
    assert "%s: %s" % (config, problem) in str(refused.value)


def test_a_compatible_objects_keys_replace_the_presets_one_by_one():
    config = ccproxy.build_config({"providers": [dict(compat_entry("glm", "https://api.z.ai"),
                                                      compatible={"no_blocks": ["image"]}),
                                                 compat_entry("inhouse", "http://127.0.0.1:9")]},
                                  "config.json", {})
    glm, inhouse = config.providers
    assert glm.quirks["anthropic_compat"] == dict(ccproxy.ANTHROPIC_COMPAT, auth="bearer",
                                                  no_blocks=("image",))
    assert inhouse.quirks["anthropic_compat"] == dict(
        ccproxy.ANTHROPIC_COMPAT, auth="bearer", drop_betas=True, drop_fields=("top_k",),
        no_blocks=("image", "document", "redacted_thinking"))
