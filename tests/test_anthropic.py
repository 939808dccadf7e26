"""Anthropic pass-through, seen through the official anthropic SDK and raw sockets."""
from __future__ import annotations

import json
import re
import socket

import anthropic
import pytest

import ccproxy

from helpers import (anthropic_message, anthropic_provider, anthropic_stream_events, json_reply,
                     PROVIDER_KEY, Reply, sdk, sse, stream_reply, strict_json,
                     CLAUDE_CODE_VERSIONS)


def test_non_stream_answer_reaches_the_sdk_unchanged(proxy, upstream):
    message = sdk(proxy).messages.create(
        model="claude-upstream", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text == "Hello from upstream"
    assert message.usage.input_tokens == 12
    assert upstream.requests[0]["path"] == "/v1/messages"


def test_provider_key_is_sent_and_client_key_is_not(proxy, upstream):
    sdk(proxy, default_headers={"anthropic-beta": "tools-2024-05-16",
                                "anthropic-version": "2023-06-01"}).messages.create(
 model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    headers = upstream.requests[0]["headers"]
    assert headers["x-api-key"] == PROVIDER_KEY
    assert headers["anthropic-version"] == "2023-06-01"
    assert headers["anthropic-beta"] == "tools-2024-05-16"
    assert "client-key-not-for-upstream" not in json.dumps(headers)
    assert "authorization" not in headers


def test_bearer_client_key_is_not_forwarded(proxy, upstream):
    anthropic.Anthropic(base_url=proxy.url, auth_token="bearer-client-token",
                        max_retries=0).messages.create(
        model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert "bearer-client-token" not in json.dumps(upstream.requests[0]["headers"])


def test_model_is_set_to_the_routed_model(start_proxy, upstream):
    proxy = start_proxy({"providers": [anthropic_provider(upstream)],
                         "routes": {"default": {"provider": "anthropic", "model": "claude-routed"}}})
    sdk(proxy).messages.create(model="claude-opus-4-8", max_tokens=5,
                               messages=[{"role": "user", "content": "hi"}])
    assert upstream.requests[0]["json"]["model"] == "claude-routed"


def adaptive_only_model(request):
    """Claude Opus 5.5 as Anthropic answers it: thinking turned off or given a budget is a 400
    (its words, platform.claude.com's Opus 5.5 page), adaptive thinking an answer."""
    kind = (request["json"].get("thinking") or {}).get("type")
    if kind in ("disabled", "enabled"):
        return json_reply({"type": "error", "error": {
            "type": "invalid_request_error",
            "message": '"thinking.type.%s" is not supported for this model. Use '
                       '"thinking.type.adaptive" and "output_config.effort" to control thinking '
                       'behavior.' % kind}}, 400)
    return json_reply(anthropic_message())


def test_a_model_that_thinks_only_adaptively_gets_adaptive_thinking_at_an_effort(start_proxy,
                                                                                 upstream):
    """Thinking turned off (Claude Code's side requests, routed here) or given a budget, to a
    model that thinks only adaptively: the refusal is learned for the model, the request sent
    again with adaptive thinking at the least effort, or at the budget's; later ones go so."""
    upstream.script = adaptive_only_model
    proxy = start_proxy({"providers": [anthropic_provider(upstream)],
                         "routes": {"background": "anthropic,claude-opus-5-5"}})
    client = sdk(proxy)
    for thinking in ({"type": "disabled"}, {"type": "enabled", "budget_tokens": 20000}):
        answer = client.messages.create(model="claude-haiku-4-5", max_tokens=16000,
                                        thinking=thinking,
                                        messages=[{"role": "user", "content": "title?"}])
        assert answer.content[0].text == "Hello from upstream"
    sent = [(r["json"]["thinking"], r["json"].get("output_config")) for r in upstream.requests]
    assert sent == [({"type": "disabled"}, None),
                    ({"type": "adaptive"}, {"effort": "low"}),
                    ({"type": "adaptive"}, {"effort": "high"})]
    views = client.get("/status", cast_to=object)["providers"]
    assert views[0]["adaptive_thinking_only"] == ["claude-opus-5-5"]


def sent_to_anthropic_and_to(start_proxy, upstream, preset, history):
    """The messages Anthropic and a compatible preset's server each got for one history."""
    proxy = start_proxy({"providers": [anthropic_provider(upstream, models=["claude-x"]),
                                       {"name": preset, "api_key": "sk-compat-0123456789",
                                        "api_base_url": upstream.url, "models": ["m"]}]})
    for model in ("claude-x", preset + ",m"):
        sdk(proxy).messages.create(model=model, max_tokens=5, messages=history)
    return [r["json"]["messages"] for r in upstream.requests]


def test_ids_another_server_gave_its_calls_reach_anthropic_in_the_form_it_takes(start_proxy,
                                                                                upstream):
    """Kimi names its calls "functions.Bash:0"; Anthropic refuses any id but letters, digits,
    _ and - ("tool_use.id: String should match pattern"), and a server tool's but srvtoolu_
    ones, at every turn after a switch to it. A call and its result stay paired; a compatible
    server gets the ids as they came."""
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": [
                   {"type": "server_tool_use", "id": "search:1", "name": "web_search",
                    "input": {"query": "q"}},
                   {"type": "web_search_tool_result", "tool_use_id": "search:1", "content": []},
                   {"type": "tool_use", "id": "functions.Bash:0", "name": "Bash", "input": {}},
                   {"type": "tool_use", "id": "toolu_ok-1", "name": "Bash", "input": {}}]},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": "functions.Bash:0", "content": "a"},
                   {"type": "tool_result", "tool_use_id": "toolu_ok-1", "content": "b"}]}]
    to_anthropic, to_kimi = sent_to_anthropic_and_to(start_proxy, upstream, "kimi", history)
    uses, results = to_anthropic[1]["content"], to_anthropic[2]["content"]
    assert uses[0]["id"] == uses[1]["tool_use_id"] and re.fullmatch(r"srvtoolu_[a-z0-9]+",
                                                                    uses[0]["id"])
    assert [b["id"] for b in uses[2:]] == [b["tool_use_id"] for b in results]
    assert re.fullmatch(r"[a-zA-Z0-9_-]+", uses[2]["id"]) and uses[3]["id"] == "toolu_ok-1"
    assert to_kimi[1]["content"][2]["id"] == "functions.Bash:0"
    assert to_kimi[2]["content"][0]["tool_use_id"] == "functions.Bash:0"


def test_anthropic_gets_no_blank_text_block_and_no_message_left_empty(start_proxy, upstream):
    """Anthropic refuses a text block of only whitespace ("text content blocks must contain
    non-whitespace text") and a message with no block, at every turn after one: Claude Code
    sends some, other servers write them, and a message of another provider's thinking is
    left with none once that thinking is taken out. A compatible server gets them as they
    came."""
    history = [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                            {"type": "text", "text": ""}]},
               {"role": "assistant", "content": [
                   {"type": "text", "text": " \n"},
                   {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                             "content": "ok"}]},
               {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm",
                                                  "signature": "ccpx1.openai"}]},
               {"role": "user", "content": [{"type": "text", "text": "\t"}]},
               {"role": "user", "content": [{"type": "text", "text": "and now?"}]}]
    to_anthropic, to_glm = sent_to_anthropic_and_to(start_proxy, upstream, "glm", history)
    assert to_anthropic == [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [history[1]["content"][1]]},
        history[2], history[5]]
    assert to_glm[0] == history[0] and to_glm[1] == history[1]


def test_a_call_without_its_result_gets_one_and_a_result_without_its_call_is_text(
        start_proxy, upstream):
    """Claude Code at times sends a call whose result never came (interrupted), or a result
    whose call is gone: every Anthropic API refuses such a history ("tool_use ids were found
    without tool_result blocks immediately after"), at every turn after. Each call gets a
    result saying it was interrupted, right after it; a result of no call goes as text."""
    call = {"type": "tool_use", "name": "Bash", "input": {}}
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": [dict(call, id="a"), dict(call, id="b")]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a",
                                             "content": "ok"}, {"type": "text", "text": "on"}]},
               {"role": "assistant", "content": [dict(call, id="c")]},
               {"role": "assistant", "content": [{"type": "text", "text": "Stopped."}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "gone",
                                             "content": "late"}]},
               {"role": "assistant", "content": [dict(call, id="d")]}]
    interrupted = {"is_error": True, "content": "[no result: the tool call was interrupted]",
                   "type": "tool_result"}
    for sent in sent_to_anthropic_and_to(start_proxy, upstream, "glm", history):
        assert sent[2]["content"] == [history[2]["content"][0], dict(interrupted,
                                      tool_use_id="b"), history[2]["content"][1]]
        assert sent[4] == {"role": "user", "content": [dict(interrupted, tool_use_id="c")]}
        assert sent[5:] == [history[4], {"role": "user", "content": [
            {"type": "text", "text": "[tool result gone]\nlate"}]}, history[6]]


def test_a_call_id_that_repeats_reaches_anthropic_as_its_own_with_its_result(start_proxy,
                                                                              upstream):
    """Anthropic refuses a history whose call ids repeat ("tool_use ids must be unique"), at
    every turn after: Claude Code 2.1.19 sent two calls of one id in a message, and a server
    that numbers each answer's calls from 0 gave each turn's first call one id. Each repeat
    gets an id of its own, the same at every turn, and so does the result that answers it."""
    call = {"type": "tool_use", "name": "Bash", "input": {}, "id": "call_0"}
    result = {"type": "tool_result", "tool_use_id": "call_0", "content": "ok"}
    history = [{"role": "user", "content": "go"},
               {"role": "assistant", "content": [call, call]},
               {"role": "user", "content": [result, dict(result, content="second")]},
               {"role": "assistant", "content": [call]},
               {"role": "user", "content": [dict(result, content="third")]}]
    proxy = start_proxy({"providers": [anthropic_provider(upstream, models=["claude-x"])]})
    for _ in range(2):
        sdk(proxy).messages.create(model="claude-x", max_tokens=5, messages=history)
    to_anthropic, again = (r["json"]["messages"] for r in upstream.requests)
    calls = [b["id"] for m in to_anthropic[1::2] for b in m["content"]]
    answers = [(b["tool_use_id"], b["content"]) for m in to_anthropic[2::2] for b in m["content"]]
    assert calls[0] == "call_0" and len(set(calls)) == 3
    assert answers == list(zip(calls, ["ok", "second", "third"]))
    assert again == to_anthropic


@pytest.mark.parametrize("body, forwarded", [
    (b'{"model":"claude-x","max_tokens":7,  "messages":[{"role":"user","content":"caf\\u00e9"}]}',
     None),
    # Anthropic refuses half an emoji ("no low surrogate in string") at every turn after it:
    # only the escape is rewritten, every other byte goes on as it came
    (b'{"model":"claude-x","max_tokens":7,  "messages":[{"role":"user","content":'
     b'[{"type":"text","text":"out \\uD83D"}]}]}',
     b'{"model":"claude-x","max_tokens":7,  "messages":[{"role":"user","content":'
     b'[{"type":"text","text":"out \\ufffd"}]}]}')],
    ids=["unchanged", "a lone surrogate"])
def test_a_body_goes_on_byte_for_byte(start_proxy, upstream, body, forwarded):
    proxy = start_proxy({"providers": [anthropic_provider(upstream, models=["claude-x"])]})
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        reply = sock.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 200")
    assert upstream.requests[0]["body"] == (forwarded or body)


@pytest.mark.parametrize("version", CLAUDE_CODE_VERSIONS)
def test_claude_code_request_with_query_string_is_relayed(proxy, upstream, claude_code_requests,
                                                          version):
    request = claude_code_requests[version][0]["json"]
    upstream.script = lambda r: stream_reply()
    client = sdk(proxy)
    known = ("model", "max_tokens", "messages", "system", "tools")
    with client.messages.stream(**{k: request[k] for k in known}, extra_query={"beta": "true"},
                                extra_body={k: v for k, v in request.items()
                                            if k not in known and k != "stream"}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello!"
    assert final.stop_reason == "end_turn"
    assert upstream.requests[0]["path"] == "/v1/messages?beta=true"
    assert upstream.requests[0]["json"] == request


def test_stream_events_are_relayed_as_they_arrive(proxy, upstream):
    reply = stream_reply(pause_before=3)          # message_start, block start, "Hel", pause
    upstream.script = lambda r: reply
    seen_before_release = []
    with sdk(proxy).messages.stream(model="m", max_tokens=5,
                                    messages=[{"role": "user", "content": "hi"}]) as stream:
        for event in stream:
            if event.type == "content_block_delta" and not reply.release.is_set():
                seen_before_release.append(event.delta.text)
                reply.release.set()
        final = stream.get_final_message()
    assert seen_before_release == ["Hel"]
    assert final.content[0].text == "Hello!"


def stream_and_collect(proxy):
    """Stream through the SDK; the error it raises (if any) and the text it saw."""
    texts = []
    try:
        with sdk(proxy).messages.stream(model="m", max_tokens=5,
                                        messages=[{"role": "user", "content": "hi"}]) as s:
            for event in s:
                if event.type == "text":
                    texts.append(event.text)
    except anthropic.APIStatusError as error:
        return error, texts
    return None, texts


def test_stream_cut_by_upstream_ends_with_an_error_event(proxy, upstream):
    events = anthropic_stream_events()[:3]
    events.append(b"event: content_block_delta\ndata: {\"type\":\"content_bl")   # half an event
    upstream.script = lambda r: stream_reply(events, cut=True)
    error, texts = stream_and_collect(proxy)
    assert texts == ["Hel"]
    assert error.body["error"] == {"type": "api_error", "message": "anthropic: the connection broke "
                                   "while the answer was arriving: IncompleteRead(0 bytes read)"}


def test_stream_ending_without_message_stop_ends_with_an_error_event(proxy, upstream):
    upstream.script = lambda r: stream_reply(anthropic_stream_events()[:4])
    error, texts = stream_and_collect(proxy)
    assert texts == ["Hel", "lo"]
    assert error.body["error"]["message"] == "anthropic: the stream ended before message_stop"


@pytest.mark.parametrize("frame", [b"event: error\n", b"event: message_stop\n\n"])
def test_an_ending_only_in_name_does_not_end_the_stream(proxy, upstream, frame):
    """A frame's last event field names it, and a frame without data is no event: neither
    `event: error` overridden by a later event line nor a message_stop without data ends the
    stream, which otherwise stopped, cut short, with no error event."""
    events = anthropic_stream_events()
    upstream.script = lambda r: stream_reply(events[:3] + [frame] + events[3:5])
    error, texts = stream_and_collect(proxy)
    assert texts == ["Hel", "lo", "!"]
    assert error.body["error"]["message"] == "anthropic: the stream ended before message_stop"


def test_a_frame_naming_an_event_without_data_is_not_relayed(proxy, upstream):
    """No event to SSE, but the Anthropic SDK for Python 3.8 read one with empty data and
    failed on it; the rest passes as it came."""
    events = anthropic_stream_events()
    upstream.script = lambda r: stream_reply(events[:3] + [b"event: ping\n\n"] + events[3:])
    body = b'{"model":"m","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"x"}]}'
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        streamed = sock.makefile("rb").read().split(b"\r\n\r\n", 1)[1]
    assert streamed == b"".join(events)


def test_upstream_error_event_is_relayed_without_an_extra_one(proxy, upstream):
    upstream_error = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    upstream.script = lambda r: stream_reply(anthropic_stream_events()[:3]
                                             + [sse("error", upstream_error)])
    error, texts = stream_and_collect(proxy)
    assert error.body == upstream_error


def test_an_event_that_is_not_json_is_never_relayed(proxy, upstream):
    """An event a client's SDK cannot read (its data not a JSON object) breaks the stream: the
    SDK gets the text before it, then the proxy's error, not a parse failure of its own."""
    reply = stream_reply(anthropic_stream_events()[:3] + [
        b'event: content_block_delta\ndata: {"type": "content_block_delta", "ind\n\n']
        + anthropic_stream_events()[3:], pause_before=3)     # "Hel" is relayed before it comes
    upstream.script = lambda r: reply
    texts = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        with sdk(proxy).messages.stream(model="m", max_tokens=5,
                                        messages=[{"role": "user", "content": "hi"}]) as stream:
            for event in stream:
                if event.type == "text":
                    texts.append(event.text)
                    reply.release.set()
    assert texts == ["Hel"]
    assert caught.value.body["error"] == {
        "type": "api_error", "message": "anthropic: the stream held an event that is not a JSON "
                                        "object; text of the answer was lost"}


@pytest.mark.parametrize("later", [True, False], ids=["in a later receive", "in the same one"])
def test_what_a_provider_sends_after_message_stop_is_no_answer(proxy, upstream, later):
    """message_stop ends the stream: an unreadable event or an error event a provider sends
    after it would have followed a whole answer with an error event (the client's SDK then
    raises, and Claude Code asks again); it and any event after the end are dropped."""
    events = anthropic_stream_events()
    after = [b"event: content_block_delta\ndata: {broken\n\n", OVERLOADED_EVENT,
             b'event: ping\ndata: {"type": "ping"}\n\n']
    replies = []

    def answer(request):
        replies.append(stream_reply(events + after if later else [b"".join(events + after)],
                                    pause_before=len(events) if later else None))
        return replies[-1]
    upstream.script = answer
    body = b'{"model":"m","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"x"}]}'
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        reader, streamed = sock.makefile("rb"), b""
        for received in iter(lambda: reader.read1(65536), b""):
            streamed += received
            if b"message_stop" in streamed:         # relayed before the rest is sent
                break
        replies[-1].release.set()
        streamed = (streamed + reader.read()).split(b"\r\n\r\n", 1)[1]
    assert streamed == b"".join(events)
    with sdk(proxy).messages.stream(model="m", max_tokens=5,
                                    messages=[{"role": "user", "content": "hi"}]) as stream:
        for event in stream:
            if event.type == "message_stop":
                replies[-1].release.set()
        assert stream.get_final_message().content[0].text == "Hello!"


def test_a_relay_adds_nothing_after_the_end_not_even_a_ping():
    """After message_stop a provider that falls silent while it holds the connection open gets
    no ping sent on its behalf, and what it sends later is not relayed."""
    config = ccproxy.build_config({"providers": [{"name": "p", "type": "anthropic",
                                                  "api_base_url": "http://127.0.0.1:9"}]}, "c", {})
    relay = ccproxy.AnthropicStreamRelay(config.providers[0])
    assert relay.feed(b"") == ccproxy.SSE_PING                    # silence mid-stream: a ping
    events = b"".join(anthropic_stream_events())
    assert relay.feed(events + b"event: ping\ndata: {}\n\n") == events
    assert relay.feed(b"") == b"" and relay.feed(OVERLOADED_EVENT) == b""
    assert relay.complete and relay.finish() == b""


OVERLOADED_EVENT = (b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", '
                    b'"message": "Overloaded"}}\n\n')


@pytest.mark.parametrize("events", [
    [b"event: message_start\ndata: <html>busy</html>\n\n"] + anthropic_stream_events(),
    [b": hello\n\n", b'data: {"x": \n\n'],
    [b": hello\n\n", OVERLOADED_EVENT],
], ids=["a first event that is not JSON", "nothing named before the end", "an error first"])
def test_a_stream_that_fails_before_a_client_read_anything_fails_over(
        start_proxy, upstream, second_upstream, events):
    """Nothing a client reads came before the failure. A comment, `data: [DONE]` or junk
    without an event name, then the end, or an error event (as Anthropic's API sends one after
    its 200), had begun the answer (a 200 ending in an error event), and the next provider was
    never asked."""
    upstream.script = lambda r: stream_reply(events)
    second_upstream.script = lambda r: stream_reply()
    proxy = start_proxy({"providers": [
        anthropic_provider(upstream, name="first", type="anthropic"),
        anthropic_provider(second_upstream, name="second", type="anthropic")]})
    with sdk(proxy).messages.stream(model="m", max_tokens=5,
                                    messages=[{"role": "user", "content": "hi"}]) as stream:
        assert stream.get_final_message().content[0].text == "Hello!"
    assert len(upstream.requests) == len(second_upstream.requests) == 1


def test_an_error_event_before_the_answer_began_is_its_status_and_body(proxy, upstream):
    upstream.script = lambda r: stream_reply([OVERLOADED_EVENT])
    with pytest.raises(anthropic.APIStatusError) as caught:
        with sdk(proxy).with_options(max_retries=0).messages.stream(
                model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}]) as stream:
            stream.get_final_message()
    assert caught.value.status_code == 529
    assert caught.value.body["error"] == {"type": "overloaded_error", "message": "Overloaded"}
    odd = b'event: error\ndata: {"error": "boom with %s"}\n\n' % PROVIDER_KEY.encode()
    upstream.script = lambda r: stream_reply([odd])        # not Anthropic's shape: its message
    with pytest.raises(anthropic.APIStatusError) as caught:
        with sdk(proxy).with_options(max_retries=0).messages.stream(
                model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}]) as stream:
            stream.get_final_message()
    assert caught.value.status_code == 502
    assert caught.value.body["error"]["message"].startswith(
        "anthropic: the stream began with an error event: boom with ")
    assert PROVIDER_KEY not in json.dumps(caught.value.body)


def test_events_of_several_data_lines_and_comments_are_relayed_as_they_came(proxy, upstream):
    """Whatever is readable passes unchanged: a JSON object over two data lines (joined with a
    line break, as SSE does), CRLF line ends, comments, and an event without a name, which the
    SDKs skip (`data: [DONE]`, which some gateways add)."""
    events = anthropic_stream_events()
    split = events[2].replace(b'"delta": ', b'"delta":\ndata: ')
    crlf = events[3].replace(b"\n", b"\r\n")
    upstream.script = lambda r: stream_reply(events[:2] + [b": keep-alive\n\n", split, crlf]
                                             + events[4:] + [b"data: [DONE]\n\n"])
    error, texts = stream_and_collect(proxy)
    assert error is None and texts == ["Hel", "lo", "!"]


def test_nan_and_infinity_reach_the_client_as_null(proxy, upstream):
    """NaN and Infinity, which a server writing JSON with Python's defaults sends and a
    JavaScript client (Claude Code) cannot parse, come as null, streamed or whole; text that
    merely says NaN is left alone."""
    events = anthropic_stream_events(pieces=("NaN is not a number",))
    events[-2] = events[-2].replace(b'"output_tokens": 5', b'"output_tokens": 5, "cost": NaN')
    upstream.script = lambda r: stream_reply(events)
    body = b'{"model":"m","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"x"}]}'
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        streamed = sock.makefile("rb").read().split(b"\r\n\r\n", 1)[1]
    payloads = [strict_json(line[6:]) for line in streamed.split(b"\n") if line[:6] == b"data: "]
    assert payloads[-2]["usage"] == {"output_tokens": 5, "cost": None}
    assert payloads[2]["delta"]["text"] == "NaN is not a number"
    upstream.script = lambda r: json_reply(json.dumps(dict(anthropic_message(), score=1.0))
                                           .replace("1.0", "Infinity").encode())
    whole = sdk(proxy).messages.with_raw_response.create(
        model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert strict_json(whole.http_response.content)["score"] is None


def test_numbers_no_client_can_read_come_as_null_and_counts_none_could_be_go_uncounted(
        proxy, upstream):
    """An integer of 5,000 digits, which Python's JSON refuses to read, comes as null (the
    Anthropic SDK for Python failed on the event); a count of 2**64 - 1 passes to the client
    as sent but is not added to the usage counters."""
    events = anthropic_stream_events()
    events[-2] = events[-2].replace(b'"output_tokens": 5', b'"output_tokens": 5, "n": '
                                    + b"9" * 5000)
    upstream.script = lambda r: stream_reply(events)
    with sdk(proxy).messages.stream(model="m", max_tokens=5,
                                    messages=[{"role": "user", "content": "hi"}]) as stream:
        assert stream.get_final_message().content[0].text == "Hello!"
    huge = json.dumps(anthropic_message()).replace('"output_tokens": 5',
                                                   '"output_tokens": %d' % (2 ** 64 - 1))
    upstream.script = lambda r: json_reply(huge.encode())
    assert sdk(proxy).messages.create(model="m", max_tokens=5, messages=[
        {"role": "user", "content": "hi"}]).usage.output_tokens == 2 ** 64 - 1
    totals = sdk(proxy).get("/status", cast_to=object)["usage"]["by_model"][0]
    assert totals["output_tokens"] == 5 and totals["requests"] == 2


def test_a_whole_message_answered_to_a_stream_request_is_streamed(proxy, upstream):
    """A server of the Anthropic protocol that ignores `stream` answers with the message whole,
    as JSON; the client asked for a stream, and its SDK could not read one (the Python SDK's
    stream failed on an assertion). The message is streamed, block by block."""
    message = dict(anthropic_message("Let me look."), stop_reason="tool_use", content=[
        {"type": "thinking", "thinking": "a file", "signature": "sig-1"},
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"path": "a.py"}}])
    upstream.script = lambda r: json_reply(message)
    with sdk(proxy).messages.stream(model="m", max_tokens=50, messages=[
            {"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_message()
    assert [block.type for block in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[0].signature == "sig-1" and final.content[1].text == "Let me look."
    assert final.content[2].input == {"path": "a.py"} and final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (12, 5)
    assert upstream.requests[0]["json"]["stream"] is True


def test_a_whole_message_streamed_keeps_only_counts_a_client_can_read(proxy, upstream):
    """Its usage goes into the events as the client reads counts, and into the usage counters
    (a string or an absurd count had reached the cost, which failed on it after the answer)."""
    upstream.script = lambda r: json_reply(dict(anthropic_message("ok"), usage={
        "input_tokens": "12", "output_tokens": 2 ** 64 - 1, "service_tier": "standard"}))
    with sdk(proxy).messages.stream(model="m", max_tokens=50, messages=[
            {"role": "user", "content": "hi"}]) as stream:
        usage = stream.get_final_message().usage
    assert (usage.input_tokens, usage.output_tokens) == (0, 0)
    (counted,) = sdk(proxy).get("/status", cast_to=object)["usage"]["by_model"]
    assert counted["requests"] == 1 and counted["output_tokens"] == 0


def test_an_event_stream_answered_to_a_request_for_a_whole_answer_is_read_whole(proxy,
                                                                               upstream):
    """The other way round: a server that streams whatever it is asked had made a request for
    a whole answer a 502; the message its events describe is answered."""
    upstream.script = lambda r: stream_reply(anthropic_stream_events(("Hel", "lo")))
    message = sdk(proxy).messages.create(model="m", max_tokens=50, messages=[
        {"role": "user", "content": "hi"}])
    assert message.content[0].text == "Hello" and message.stop_reason == "end_turn"
    upstream.script = lambda r: stream_reply(anthropic_stream_events(("Hel", "lo"))[:3])
    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk(proxy).with_options(max_retries=0).messages.create(model="m", max_tokens=50, messages=[
            {"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502


@pytest.mark.parametrize("content", [None, "text", [{"type": "text", "text": 5}],
                                     [{"type": "tool_use", "id": "t", "name": "x", "input": []}]])
def test_a_whole_message_no_stream_can_carry_is_a_502(proxy, upstream, content):
    upstream.script = lambda r: json_reply(dict(anthropic_message(), content=content))
    with pytest.raises(anthropic.APIStatusError) as caught:
        with sdk(proxy).with_options(max_retries=0).messages.stream(
                model="m", max_tokens=50, messages=[{"role": "user", "content": "hi"}]) as stream:
            stream.get_final_message()
    assert caught.value.status_code == 502 and caught.value.body["error"]["message"] == (
        "anthropic: answered a request for a stream with a whole message whose content is not "
        "blocks a stream can carry")


def test_raw_stream_after_cut_has_no_partial_event(proxy, upstream):
    events = anthropic_stream_events()[:3] + [b"event: content_block_delta\ndata: {\"ty"]
    upstream.script = lambda r: stream_reply(events, cut=True)
    body = b'{"model":"m","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"x"}]}'
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        reply = sock.makefile("rb").read()
    head, payload = reply.split(b"\r\n\r\n", 1)
    assert b"transfer-encoding" not in head.lower()
    prefix = b"".join(anthropic_stream_events()[:3])
    assert payload.startswith(prefix + b"event: error\ndata: {")
    assert payload.endswith(b"}\n\n") and payload.count(b"event:") == 4


def test_upstream_error_keeps_status_and_body(proxy, upstream):
    error = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    upstream.script = lambda r: json_reply(error, status=429, headers={"retry-after": "7"})
    with pytest.raises(anthropic.RateLimitError) as caught:
        sdk(proxy).messages.create(model="m", max_tokens=5,
                                   messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 429
    assert caught.value.body == error
    assert caught.value.response.headers["retry-after"] == "7"


@pytest.mark.parametrize("status, body", [
    (429, b'{"type": "error", "error": "slow down"}'),
    (429, b'{"type": "error"}'),
    (429, b'{"type": "error", "error": {"type": 5, "message": null}}'),
    (429, b'{"type": "error", "error": {"type": "rate_limit_error", "message": "x"}, "n": NaN}'),
    (999, b'{"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}'),
])
def test_an_error_only_partly_anthropic_is_answered_as_one(proxy, upstream, status, body):
    """A provider's error body passes unchanged only when a client can read it as Anthropic's
    (strict JSON, a type and a message) under an error status; any other is mapped."""
    upstream.script = lambda r: Reply(status, body)
    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk(proxy).messages.create(model="m", max_tokens=5,
                                   messages=[{"role": "user", "content": "hi"}])
    error = strict_json(caught.value.response.content)
    assert caught.value.status_code == (429 if status == 429 else 500)
    assert error["type"] == "error" and isinstance(error["error"]["type"], str)
    assert error["error"]["message"].startswith("anthropic: HTTP %d: " % status)


def test_upstream_error_in_a_stream_request_keeps_status(proxy, upstream):
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    upstream.script = lambda r: json_reply(error, status=529)
    with pytest.raises(anthropic.APIStatusError) as caught:
        with sdk(proxy).messages.stream(model="m", max_tokens=5,
                                        messages=[{"role": "user", "content": "hi"}]) as s:
            s.get_final_message()
    assert caught.value.status_code == 529
    assert caught.value.body == error


def test_html_gateway_error_becomes_an_anthropic_error(proxy, upstream):
    upstream.script = lambda r: Reply(502, b"<html><body><h1>502 Bad Gateway</h1></body></html>",
                                      content_type="text/html")
    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk(proxy).messages.create(model="m", max_tokens=5,
                                   messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "api_error"
    assert caught.value.body["error"]["message"] == "anthropic: HTTP 502: 502 Bad Gateway"


def test_count_tokens_is_forwarded_to_anthropic(proxy, upstream):
    upstream.script = lambda r: json_reply({"input_tokens": 4242})
    count = sdk(proxy).messages.count_tokens(
        model="m", messages=[{"role": "user", "content": "hi"}])
    assert count.input_tokens == 4242
    assert upstream.requests[0]["path"] == "/v1/messages/count_tokens"
    assert upstream.requests[0]["headers"]["x-api-key"] == PROVIDER_KEY


def test_count_tokens_falls_back_to_the_estimator_when_upstream_fails(proxy, upstream):
    upstream.script = lambda r: json_reply({"type": "error", "error": {
        "type": "not_found_error", "message": "no such endpoint"}}, status=404)
    count = sdk(proxy).messages.count_tokens(
        model="m", messages=[{"role": "user", "content": "hello there, how are you?"}])
    assert 5 <= count.input_tokens <= 15


def test_count_tokens_uses_the_estimator_for_a_provider_without_it(start_proxy, upstream,
                                                                   claude_code_requests):
    proxy = start_proxy({"providers": [anthropic_provider(upstream, name="gateway",
                                                          type="anthropic")]})
    request = claude_code_requests["2.1.330"][0]["json"]
    count = sdk(proxy).messages.count_tokens(
        model=request["model"], messages=request["messages"], system=request["system"],
        tools=request["tools"])
    assert upstream.requests == []
    assert count.input_tokens > 10000


def test_max_tokens_cap_of_the_provider_is_applied(start_proxy, upstream):
    proxy = start_proxy({"providers": [anthropic_provider(upstream, max_tokens=1000)]})
    sdk(proxy).messages.create(model="m", max_tokens=20000,
                               messages=[{"role": "user", "content": "hi"}])
    assert upstream.requests[0]["json"]["max_tokens"] == 1000


@pytest.mark.parametrize("base", ["{url}", "{url}/", "{url}/v1", "{url}/v1/messages"])
def test_base_url_forms_all_reach_v1_messages(start_proxy, upstream, base):
    proxy = start_proxy({"providers": [anthropic_provider(upstream,
                                                          api_base_url=base.format(url=upstream.url))]})
    sdk(proxy).messages.create(model="m", max_tokens=5,
                               messages=[{"role": "user", "content": "hi"}])
    assert upstream.requests[0]["path"] == "/v1/messages"


def test_model_rewrite_changes_only_the_model_bytes(start_proxy, upstream):
    proxy = start_proxy({"providers": [anthropic_provider(upstream)],
                         "routes": {"default": {"provider": "anthropic", "model": "claude-ré"}}})
    body = ('{ "messages" : [{"role":"user","content":"café \\u00e9 ☕"}],\n'
            '  "model" :  "claude-opus-4-8" , "max_tokens":7}').encode()
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nConnection: close\r\nContent-Length: %d\r\n"
                     b"\r\n%s" % (len(body), body))
        assert sock.makefile("rb").read().startswith(b"HTTP/1.1 200")
    assert upstream.requests[0]["body"] == body.replace(b'"claude-opus-4-8"',
                                                        '"claude-ré"'.encode())


def test_provider_request_id_is_relayed_once(proxy, upstream):
    upstream.script = lambda r: json_reply(anthropic_message(), headers={"request-id": "req_up_1"})
    raw = sdk(proxy).messages.with_raw_response.create(
        model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert raw.headers.get_list("request-id") == ["req_up_1"]



# --- a gateway that refuses Claude Code's newer fields --------------------------------------
# Gateways in front of Vertex AI, Bedrock or LiteLLM answer Claude Code's context_management
# and its tools' defer_loading with "…: Extra inputs are not permitted", at every request.

GATEWAY_FIELDS = {"model", "messages", "max_tokens", "system", "tools", "stream", "metadata",
                  "tool_choice", "thinking", "temperature"}


def gateway(request):
    """An Anthropic-compatible gateway that names, as Anthropic does, the first field it
    does not take."""
    body = request["json"]
    refused = sorted(set(body) - GATEWAY_FIELDS) + [
        "tools.%d.custom.defer_loading" % n for n, tool in enumerate(body.get("tools", ()))
        if "defer_loading" in tool] + [
        "thinking.display" for _ in range("display" in body.get("thinking", {}))]
    if refused:
        return json_reply({"type": "error", "error": {
            "type": "invalid_request_error",
            "message": "%s: Extra inputs are not permitted" % refused[0]}}, 400)
    return json_reply(anthropic_message())


def test_fields_a_gateway_refuses_are_learned_and_left_out(start_proxy, upstream):
    proxy = start_proxy({"providers": [anthropic_provider(upstream, name="gw",
                                                          type="anthropic")]})
    upstream.script = gateway
    request = dict(model="m", max_tokens=50, messages=[{"role": "user", "content": "hi"}],
                   tools=[{"name": "Read", "input_schema": {"type": "object"}},
                          {"name": "Later", "input_schema": {"type": "object"},
                           "defer_loading": True}],
                   thinking={"type": "adaptive"},
                   extra_body={"context_management": {"edits": [
                       {"type": "clear_thinking_20251015", "keep": "all"}]},
                               "thinking": {"type": "adaptive", "display": "omitted"}})
    for turn in range(2):
        assert sdk(proxy).messages.create(**request).content[0].text == "Hello from upstream"
    sent = [r["json"] for r in upstream.requests]
    assert len(sent) == 5                           # three refusals, then served, also later
    assert "context_management" not in sent[-1] and sent[-1]["thinking"] == {"type": "adaptive"}
    assert [sorted(tool) for tool in sent[-1]["tools"]] == [["input_schema", "name"]] * 2
    view = sdk(proxy).get("/providers", cast_to=object)
    assert view["providers"][0]["refused_fields"] == {
        "m": ["context_management", "thinking.display", "tools.defer_loading"]}


def test_anthropic_itself_is_sent_what_the_client_sent_whatever_it_refuses():
    config = ccproxy.build_config({"providers": [{"name": "anthropic", "api_key": "k"}]}, "c",
                                  {})
    error = ccproxy.RelayedError(400, json.dumps({"type": "error", "error": {
        "type": "invalid_request_error",
        "message": "context_management: Extra inputs are not permitted"}}).encode())
    assert ccproxy.refused_field(error, config.providers[0]) == ""


def vertex_like(request):
    """A gateway in front of Vertex AI: it refuses, in Vertex's words, each beta it lacks."""
    betas = [b.strip() for b in request["headers"].get("anthropic-beta", "").split(",") if b]
    refused = [b for b in betas if b != "interleaved-thinking-2025-05-14"]
    if refused:
        return json_reply({"type": "error", "error": {
            "type": "invalid_request_error", "message": "Unexpected value(s) %s for the "
            "`anthropic-beta` header. Please consult our documentation at docs.anthropic.com or "
            "try again without the header." % ", ".join("`%s`" % b for b in refused)}}, 400)
    return json_reply(anthropic_message())


def test_betas_a_gateway_refuses_are_learned_and_left_out(start_proxy, upstream):
    """Claude Code sends a dozen betas, newer than Vertex AI's; every request was refused."""
    proxy = start_proxy({"providers": [anthropic_provider(upstream, name="vertex-gw",
                                                          type="anthropic")]})
    upstream.script = vertex_like
    betas = "context-1m-2025-08-07,effort-2025-11-24,interleaved-thinking-2025-05-14"
    for turn in range(2):
        assert sdk(proxy).messages.create(
            model="m", max_tokens=50, messages=[{"role": "user", "content": "hi"}],
            extra_headers={"anthropic-beta": betas}).content[0].text == "Hello from upstream"
    sent = [r["headers"].get("anthropic-beta") for r in upstream.requests]
    assert sent == [betas, "interleaved-thinking-2025-05-14", "interleaved-thinking-2025-05-14"]
    view = sdk(proxy).get("/providers", cast_to=object)
    assert view["providers"][0]["refused_betas"] == ["context-1m-2025-08-07",
                                                     "effort-2025-11-24"]


@pytest.mark.parametrize("words, sent_after", [
    ('Unexpected beta header "advisor-tool-2026-03-01"', "interleaved-thinking-2025-05-14"),
    ("invalid beta flag", None)])                      # Bedrock's, behind a gateway: none named
def test_a_refused_beta_is_learned_in_a_gateways_words_or_bedrocks(start_proxy, upstream,
                                                                    words, sent_after):
    proxy = start_proxy({"providers": [anthropic_provider(upstream, name="gw",
                                                          type="anthropic")]})
    betas = "advisor-tool-2026-03-01,interleaved-thinking-2025-05-14"
    upstream.script = lambda r: json_reply({"type": "error", "error": {
        "type": "invalid_request_error", "message": words}}, 400) if "advisor" in r[
        "headers"].get("anthropic-beta", "") else json_reply(anthropic_message())
    for turn in range(2):
        sdk(proxy).messages.create(model="m", max_tokens=50, extra_headers={
            "anthropic-beta": betas}, messages=[{"role": "user", "content": "hi"}])
    assert [r["headers"].get("anthropic-beta") for r in upstream.requests] == [
        betas, sent_after, sent_after]


def test_anthropic_itself_is_sent_the_betas_the_client_sent_whatever_it_refuses():
    config = ccproxy.build_config({"providers": [{"name": "anthropic", "api_key": "k"}]}, "c",
                                  {})
    error = ccproxy.RelayedError(400, json.dumps({"type": "error", "error": {
        "type": "invalid_request_error", "message": "Unexpected value(s) `effort-2025-11-24` "
        "for the `anthropic-beta` header."}}).encode())
    assert ccproxy.learns_refused_betas(error, config.providers[0]) is False
    assert config.providers[0].refused_betas == frozenset()


def test_a_provider_naming_endless_betas_fills_no_memory():
    config = ccproxy.build_config({"providers": [{"name": "gw", "type": "anthropic",
                                                  "api_base_url": "http://127.0.0.1:9"}]}, "c", {})
    provider = config.providers[0]
    for n in range(200):
        error = ccproxy.RelayedError(400, json.dumps({"type": "error", "error": {
            "type": "invalid_request_error", "message": "Unexpected value(s) %s for the "
            "`anthropic-beta` header." % ", ".join("`b-%d-%d`" % (n, i) for i in range(50))}}
            ).encode())
        assert ccproxy.learns_refused_betas(error, provider)
    assert len(provider.refused_betas) <= ccproxy.MAX_BETAS_REMEMBERED + 50


@pytest.mark.parametrize("status, words", [
    (400, "request.messages.1.role: Invalid discriminator value. Expected 'user' | 'assistant'"),
    (400, "messages.1.role: Input should be 'user' or 'assistant'"),
    (400, "Failed to deserialize the JSON body into the target type: messages[1].role: unknown "
          "variant `system`, expected `user` or `assistant` at line 1 column 30325"),
    (400, 'messages: Unexpected role "system". The Messages API accepts a top-level `system` '
          'parameter, not "system" as an input message role.'),
    (422, {"detail": [{"type": "literal_error", "loc": ["body", "messages", 1, "role"],
                       "msg": "Input should be 'user' or 'assistant'", "input": "system"}]})])
def test_a_server_that_takes_no_system_message_among_the_others_says_so_once(
        start_proxy, upstream, status, words):
    """Claude Code ends each request with a system message among the others; LM Studio's
    Anthropic API (and others) refused every one. Said once, they are joined to the user's."""
    proxy = start_proxy({"providers": [anthropic_provider(upstream, name="lmstudio",
                                                          type="anthropic")]})
    refusal = words if isinstance(words, dict) else {"type": "error", "error": {
        "type": "invalid_request_error", "message": words}}
    upstream.script = lambda r: json_reply(refusal, status) if any(
        m["role"] == "system" for m in r["json"]["messages"]) else json_reply(anthropic_message())
    messages = [{"role": "user", "content": "hi"},
                {"role": "system", "content": "Working directory: /w"}]
    for turn in range(2):
        assert sdk(proxy).messages.create(model="m", max_tokens=50, messages=messages
                                          ).content[0].text == "Hello from upstream"
    assert [len(r["json"]["messages"]) for r in upstream.requests] == [2, 1, 1]
    assert upstream.requests[-1]["json"]["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "text", "text": "Working directory: /w"}]}]
    view = sdk(proxy).get("/providers", cast_to=object)
    assert view["providers"][0]["refuses_system_messages"] is True


def test_anthropics_own_overflow_by_max_tokens_reaches_the_client_as_it_came(start_proxy,
                                                                             upstream):
    """Its window depends on the request (a beta widens it): Claude Code lowers max_tokens
    itself, as it does against Anthropic."""
    words = ("input length and `max_tokens` exceed context limit: 190000 + 32000 > 200000, "
             "decrease input length or `max_tokens` and try again")
    upstream.script = lambda r: json_reply({"type": "error", "error": {
        "type": "invalid_request_error", "message": words}}, 400)
    proxy = start_proxy({"providers": [{"name": "anthropic", "api_key": "sk-ant-test-0123456789",
                                        "api_base_url": upstream.url}]})
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(proxy).messages.create(model="claude-x", max_tokens=32000, timeout=30,
                                   messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["error"]["message"] == words and len(upstream.requests) == 1
