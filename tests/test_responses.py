"""The OpenAI Responses translator: requests, whole answers and streams through a mock Responses
server, driven by the anthropic SDK; reasoning carried from one turn to the next; the openai
preset's routing of Responses-only models; Azure OpenAI. Every mock body and event is checked
against the official openai SDK's types."""
from __future__ import annotations

import json
import typing
import urllib.request

import anthropic
import openai
import pydantic
import pytest

from helpers import answer_of, check_grammar, json_reply, parse_events, sdk, stream_reply

KEY = "sk-resp-0123456789abcdef"
STREAM_EVENT = pydantic.TypeAdapter(openai.types.responses.ResponseStreamEvent)
CREATE_PARAMS = pydantic.TypeAdapter(
    openai.types.responses.response_create_params.ResponseCreateParams)
TOOLS = [{"name": "get_weather", "description": "Weather",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
         {"name": "get_time", "input_schema": {"type": "object"}}]
REQUEST = dict(model="claude-sonnet-4-5", max_tokens=300, tools=TOOLS,
               messages=[{"role": "user", "content": "Weather in Oslo?"}])


# --- a mock Responses server's answers, each checked against the SDK's types ------------------

def usage(total=100, cached=40, output=20, reasoning=0, written=0):
    return {"input_tokens": total,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written},
            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": total + output}


def response(output, status="completed", **extra):
    body = dict({"id": "resp_1", "object": "response", "created_at": 1, "model": "gpt-5-codex",
                 "status": status, "output": output, "parallel_tool_calls": True,
                 "tool_choice": "auto", "tools": [], "usage": usage(), "error": None,
                 "incomplete_details": None}, **extra)
    openai.types.responses.Response.model_validate(body)
    return body


def message_item(text, index=0):
    return {"type": "message", "id": "msg_%d" % index, "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def call_item(call_id, name, arguments, index=0):
    return {"type": "function_call", "id": "fc_%d" % index, "call_id": call_id, "name": name,
            "arguments": arguments, "status": "completed"}


def reasoning_item(summary=("Thinking about Oslo.",), encrypted="ENC-1", item_id="rs_1"):
    return {"type": "reasoning", "id": item_id, "encrypted_content": encrypted,
            "summary": [{"type": "summary_text", "text": text} for text in summary]}


def events_for(items, final_status="completed", **final):
    """The stream events a server sends for output items, in order, then the final event."""
    events = [{"type": "response.created", "response": response([], "in_progress")}]
    for index, item in enumerate(items):
        started = dict(item, status="in_progress")
        if item["type"] == "message":
            started["content"] = []
        elif item["type"] == "function_call":
            started["arguments"] = ""
        elif item["type"] == "reasoning":
            started["summary"], started["encrypted_content"] = [], None
        elif item["type"] == "web_search_call":             # its sources come when done
            started["action"] = {"type": "search", "query": item["action"]["query"]}
        events.append({"type": "response.output_item.added", "output_index": index,
                       "item": started})
        events += item_deltas(item, index)
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
    kind = {"completed": "response.completed", "incomplete": "response.incomplete",
            "failed": "response.failed"}[final_status]
    events.append({"type": kind, "response": response(items, final_status, **final)})
    return events


def item_deltas(item, index):
    """An item's deltas, in pieces (text and arguments in two halves, a text's annotations
    after it), or a web search's progress."""
    if item["type"] == "message":
        text = item["content"][0]["text"]
        return [{"type": "response.output_text.delta", "item_id": item["id"], "logprobs": [],
                 "output_index": index, "content_index": 0, "delta": piece}
                for piece in (text[:len(text) // 2], text[len(text) // 2:])] + [
            {"type": "response.output_text.annotation.added", "item_id": item["id"],
             "output_index": index, "content_index": 0, "annotation_index": number,
             "annotation": annotation}
            for number, annotation in enumerate(item["content"][0]["annotations"])]
    if item["type"] == "web_search_call":
        return [{"type": "response.web_search_call." + step, "item_id": item["id"],
                 "output_index": index} for step in ("in_progress", "searching", "completed")]
    if item["type"] == "function_call":
        arguments = item["arguments"]
        return [{"type": "response.function_call_arguments.delta", "item_id": item["id"],
                 "output_index": index, "delta": piece}
                for piece in (arguments[:len(arguments) // 2], arguments[len(arguments) // 2:])]
    return [{"type": "response.reasoning_summary_text.delta", "item_id": item["id"],
             "output_index": index, "summary_index": part, "delta": summary["text"]}
            for part, summary in enumerate(item["summary"])]


def sse(events, cut=False):
    """The events as the server frames them, numbered, each checked against the SDK's types."""
    pieces = []
    for number, event in enumerate(events):
        event = dict(event, sequence_number=number)
        STREAM_EVENT.validate_python(event)
        pieces.append(b"event: %s\ndata: %s\n\n" % (event["type"].encode(),
                                                    json.dumps(event).encode()))
    return pieces[:-1] if cut else pieces


def responses_provider(upstream, **fields):
    return dict({"name": "oai", "type": "openai-responses", "api_base_url": upstream.url + "/v1",
                 "api_key": KEY, "models": ["gpt-5-codex"]}, **fields)


@pytest.fixture
def responses_proxy(start_proxy, upstream):
    return start_proxy({"providers": [responses_provider(upstream)]})


# What a response may be asked to include, as the installed SDK knows it: openai 2.2.0, the
# last for Python 3.8, has no "web_search_call.action.sources" (3.63 has; the API takes it).
INCLUDABLE = set(typing.get_args(openai.types.responses.ResponseIncludable)) | {
    "web_search_call.action.sources"}


def sent_body(upstream, index=0):
    """The body the proxy sent, checked against the SDK's request type (what it may include
    against INCLUDABLE)."""
    body = upstream.requests[index]["json"]
    assert set(body.get("include", ())) <= INCLUDABLE
    CREATE_PARAMS.validate_python(dict(body, include=[
        item for item in body.get("include", ()) if item != "web_search_call.action.sources"]))
    return body


def blocks_of(message):
    return [b.model_dump(exclude_none=True, exclude={"citations", "caller"})
            for b in message.content]


# --- requests ---------------------------------------------------------------------------------

def test_a_request_becomes_a_stateless_responses_body(responses_proxy, upstream):
    upstream.script = lambda r: json_reply(response([message_item("Sunny.")]))
    sdk(responses_proxy).messages.create(**dict(
        REQUEST, system="Be brief.", extra_body={"temperature": 0.5}, metadata={"user_id": "u1"},
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "Weather in Oslo?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "AAAA"}}]}]))
    assert upstream.requests[0]["path"] == "/v1/responses"
    assert upstream.requests[0]["headers"]["authorization"] == "Bearer " + KEY
    assert sent_body(upstream) == {
        "model": "gpt-5-codex", "store": False, "include": ["reasoning.encrypted_content"],
        "instructions": "Be brief.", "max_output_tokens": 300, "temperature": 0.5,
        "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "Weather in Oslo?"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA",
             "detail": "auto"}]}],
        "tools": [{"type": "function", "name": "get_weather", "description": "Weather",
                   "parameters": TOOLS[0]["input_schema"], "strict": False},
                  {"type": "function", "name": "get_time", "parameters": {"type": "object"},
                   "strict": False}],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "safety_identifier": "u1"}


def test_history_becomes_items_with_calls_paired_and_reasoning_restored_with_its_id(
        responses_proxy, upstream):
    upstream.script = lambda r: json_reply(response([message_item("Done.")]))
    signature = thinking_block_of(reasoning_item(encrypted="ENC-9", item_id="rs_9"))["signature"]
    sdk(responses_proxy).messages.create(**dict(REQUEST, messages=[
        {"role": "user", "content": "Weather in Oslo and Bergen?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Two cities.", "signature": signature},
            {"type": "thinking", "thinking": "foreign", "signature": "EqQBCkYIBx"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Oslo"}},
            {"type": "tool_use", "id": "call_b", "name": "get_weather",
             "input": {"city": "Bergen"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_a", "content": "Sunny"},
            {"type": "text", "text": "And?"}]}]))
    assert sent_body(upstream)["input"] == [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo and Bergen?"}]},
        {"type": "reasoning", "id": "rs_9", "encrypted_content": "ENC-9",
         "summary": [{"type": "summary_text", "text": "Thinking about Oslo."}]},
        {"role": "assistant", "content": "Checking."},
        {"type": "function_call", "call_id": "call_a", "name": "get_weather",
         "arguments": '{"city":"Oslo"}'},
        {"type": "function_call", "call_id": "call_b", "name": "get_weather",
         "arguments": '{"city":"Bergen"}'},
        {"type": "function_call_output", "call_id": "call_a", "output": "Sunny"},
        {"type": "function_call_output", "call_id": "call_b",
         "output": "[no result: the tool call was interrupted]"},
        {"role": "user", "content": [{"type": "input_text", "text": "And?"}]}]


def thinking_block_of(item):
    """The thinking block ccproxy makes of a reasoning item (through the whole-answer path)."""
    import ccproxy
    from test_openai import context
    return ccproxy.anthropic_message_from_responses(response([item]), context())["content"][0]


def test_thinking_asks_for_reasoning_with_a_summary_on_the_models_scale(start_proxy, upstream):
    proxy = start_proxy({"providers": [{"name": "openai", "api_key": KEY,
                                        "api_base_url": upstream.url + "/v1"}]})
    upstream.script = lambda r: json_reply(response([message_item("ok")]))
    sdk(proxy).messages.create(**dict(REQUEST, model="openai,gpt-5.1-codex-max",
                                      thinking={"type": "enabled", "budget_tokens": 20000}))
    body = sent_body(upstream)
    assert body["reasoning"] == {"effort": "high", "summary": "auto"}
    assert "temperature" not in body and upstream.requests[0]["path"] == "/v1/responses"


# --- whole answers ----------------------------------------------------------------------------

def test_a_whole_answer_with_reasoning_text_and_calls(responses_proxy, upstream):
    upstream.script = lambda r: json_reply(response(
        [reasoning_item(), message_item("Let me look."),
         call_item("call_1", "get_weather", '{"city":"Oslo"}'),
         call_item("call_2", "get_time", "{}", 1)], usage=usage(100, 40, 20, 8, 10)))
    message = sdk(responses_proxy).messages.create(**REQUEST)
    blocks = blocks_of(message)
    assert blocks[0]["type"] == "thinking" and blocks[0]["thinking"] == "Thinking about Oslo."
    assert blocks[0]["signature"].startswith("ccpx1.resp.")
    assert blocks[1:] == [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Oslo"}},
        {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}}]
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens,
            message.usage.cache_creation_input_tokens, message.usage.output_tokens) == (
        50, 40, 10, 20)


def test_an_incomplete_answer_stops_at_max_tokens(responses_proxy, upstream):
    upstream.script = lambda r: json_reply(response(
        [message_item("Half")], "incomplete",
        incomplete_details={"reason": "max_output_tokens"}))
    message = sdk(responses_proxy).messages.create(**REQUEST)
    assert message.stop_reason == "max_tokens" and blocks_of(message) == [
        {"type": "text", "text": "Half"}]


# --- streams ----------------------------------------------------------------------------------

def expected_body(**changes):
    """The body REQUEST becomes, streamed."""
    return dict({
        "model": "gpt-5-codex", "store": False, "include": ["reasoning.encrypted_content"],
        "max_output_tokens": 300, "stream": True,
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"}]}],
        "tools": [{"type": "function", "name": "get_weather", "description": "Weather",
                   "parameters": TOOLS[0]["input_schema"], "strict": False},
                  {"type": "function", "name": "get_time", "parameters": {"type": "object"},
                   "strict": False}]}, **changes)


def stream_of(proxy, **request):
    with sdk(proxy).messages.stream(**dict(REQUEST, **request)) as stream:
        return stream.get_final_message()


def test_a_streamed_text_answer(responses_proxy, upstream):
    upstream.script = lambda r: stream_reply(sse(events_for([message_item("Sunny in Oslo.")])))
    final = stream_of(responses_proxy)
    assert blocks_of(final) == [{"type": "text", "text": "Sunny in Oslo."}]
    assert final.stop_reason == "end_turn" and final.usage.cache_read_input_tokens == 40
    assert sent_body(upstream) == expected_body()


def test_text_and_arguments_only_in_the_finished_items_are_not_lost(responses_proxy, upstream):
    """A server that streams no deltas, only each finished item: its text had come out as an
    empty answer, ended cleanly."""
    items = [message_item("Sunny in Oslo.", 0), call_item("call_0", "get_weather",
                                                           '{"city":"Oslo"}', 1)]
    events = [event for event in events_for(items) if not event["type"].endswith(".delta")]
    upstream.script = lambda r: stream_reply(sse(events))
    final = stream_of(responses_proxy)
    assert blocks_of(final) == [{"type": "text", "text": "Sunny in Oslo."}, {
        "type": "tool_use", "id": "call_0", "name": "get_weather", "input": {"city": "Oslo"}}]
    upstream.script = lambda r: stream_reply(sse(events_for(items)))      # streamed: once
    assert blocks_of(stream_of(responses_proxy))[0] == {"type": "text", "text": "Sunny in Oslo."}


@pytest.mark.parametrize("calls", [1, 2])
def test_streamed_calls_one_or_parallel(responses_proxy, upstream, calls):
    items = [call_item("call_%d" % n, "get_weather", '{"city":"C%d"}' % n, n)
             for n in range(calls)]
    upstream.script = lambda r: stream_reply(sse(events_for(items)))
    final = stream_of(responses_proxy)
    assert blocks_of(final) == [{"type": "tool_use", "id": "call_%d" % n, "name": "get_weather",
                                 "input": {"city": "C%d" % n}} for n in range(calls)]
    assert final.stop_reason == "tool_use" and sent_body(upstream) == expected_body()


def test_reasoning_then_a_call_then_the_next_turn_carries_the_reasoning_back(responses_proxy,
                                                                            upstream):
    first = [reasoning_item(("Oslo first.", "Then answer.")), call_item(
        "call_1", "get_weather", '{"city":"Oslo"}', 1)]
    upstream.script = lambda r: stream_reply(sse(events_for(first)))
    turn = stream_of(responses_proxy)
    thinking = blocks_of(turn)[0]
    assert thinking["thinking"] == "Oslo first.\n\nThen answer."
    upstream.script = lambda r: stream_reply(sse(events_for([message_item("Sunny.")])))
    stream_of(responses_proxy, messages=REQUEST["messages"] + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in turn.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1",
                                      "content": "Sunny"}]}])
    assert sent_body(upstream, 0) == expected_body()
    assert sent_body(upstream, 1)["input"][1:] == [
        reasoning_item(("Oslo first.", "Then answer.")),
        {"type": "function_call", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city":"Oslo"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"}]


def test_reasoning_asked_omitted_comes_empty_and_still_goes_back_whole(responses_proxy,
                                                                        upstream):
    """thinking.display "omitted" (Claude Code 2.1.332): the summary is not shown, and the
    reasoning item, carried by the signature, goes back as it came."""
    first = [reasoning_item(("Oslo first.", "Then answer.")), call_item(
        "call_1", "get_weather", '{"city":"Oslo"}', 1)]
    upstream.script = lambda r: stream_reply(sse(events_for(first)))
    omitted = {"extra_body": {"thinking": {"type": "adaptive", "display": "omitted"}}}
    turn = stream_of(responses_proxy, **omitted)
    thinking = blocks_of(turn)[0]
    assert thinking["thinking"] == "" and thinking["signature"].startswith("ccpx1.resp.")
    upstream.script = lambda r: stream_reply(sse(events_for([message_item("Sunny.")])))
    stream_of(responses_proxy, messages=REQUEST["messages"] + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in turn.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1",
                                      "content": "Sunny"}]}], **omitted)
    assert sent_body(upstream, 1)["input"][1] == reasoning_item(("Oslo first.", "Then answer."))


def test_a_streamed_incomplete_answer_stops_at_max_tokens(responses_proxy, upstream):
    upstream.script = lambda r: stream_reply(sse(events_for(
        [message_item("Half")], "incomplete", incomplete_details={"reason": "max_output_tokens"})))
    assert stream_of(responses_proxy).stop_reason == "max_tokens"


def streamed_arguments(proxy) -> tuple:
    """(the input JSON of the first tool block as the client got it, the stop reason)."""
    with sdk(proxy).messages.stream(**REQUEST) as stream:
        pieces = [event.delta.partial_json for event in stream
                  if event.type == "content_block_delta" and event.delta.type == "input_json_delta"]
        return "".join(pieces), stream.get_final_message().stop_reason


def test_streamed_arguments_that_end_badly_are_mended_unless_cut(responses_proxy, upstream):
    bad = call_item("call_1", "get_weather", '{"city": "Oslo",}')
    upstream.script = lambda r: stream_reply(sse(events_for([bad])))
    assert streamed_arguments(responses_proxy) == ('{"city": "Oslo"}', "tool_use")
    cut = call_item("call_1", "get_weather", '{"city": "Oslo"')
    upstream.script = lambda r: stream_reply(sse(events_for(
        [cut], "incomplete", incomplete_details={"reason": "max_output_tokens"})))
    assert streamed_arguments(responses_proxy) == ('{"city": "Oslo"', "max_tokens")
    upstream.script = lambda r: json_reply(response(
        [cut], "incomplete", incomplete_details={"reason": "max_output_tokens"}))
    message = sdk(responses_proxy).messages.create(**REQUEST)
    assert message.stop_reason == "max_tokens"
    assert blocks_of(message)[0]["input"] == {"arguments": '{"city": "Oslo"'}


def test_arguments_nested_past_what_python_reads_pass_as_they_came(responses_proxy, upstream):
    """A model repeating `[` to its output limit: arguments json.loads cannot read without
    running out of stack pass as they came, whole and streamed, never a 500 or an error event."""
    runaway = call_item("call_1", "get_weather", "[" * 50000)
    upstream.script = lambda r: stream_reply(sse(events_for([runaway])))
    events = parse_events(raw_answer(responses_proxy, stream=True))  # the SDK cannot read it
    check_grammar(events)
    assert "".join(p["delta"]["partial_json"] for n, p in events if n == "content_block_delta"
                   and p["delta"]["type"] == "input_json_delta") == "[" * 50000
    upstream.script = lambda r: json_reply(response([runaway]))
    message = sdk(responses_proxy).messages.create(**REQUEST)
    assert blocks_of(message)[0]["input"] == {"arguments": "[" * 50000}


def raw_answer(proxy, **request) -> bytes:
    return urllib.request.urlopen(urllib.request.Request(
        proxy.url + "/v1/messages", json.dumps(dict(REQUEST, **request)).encode(),
        {"content-type": "application/json"}), timeout=30).read()


def test_thinking_turned_off_is_the_least_reasoning_and_no_summary(start_proxy, upstream):
    proxy = start_proxy({"providers": [{"name": "openai", "api_base_url": upstream.url + "/v1",
                                        "api_key": KEY, "api": "responses",
                                        "models": ["gpt-5.1"]}]})
    upstream.script = lambda r: json_reply(response([message_item("Oslo")]))
    sdk(proxy).messages.create(**dict(REQUEST, thinking={"type": "disabled"}))
    # (not checked against the SDK's request type: the openai SDK that Python 3.8 still gets
    # predates "none", which gpt-5.1 takes, as OpenAI's own refusal of "minimal" lists)
    assert upstream.requests[0]["json"]["reasoning"] == {"effort": "none"}


@pytest.mark.parametrize("model, effort, off", [("gpt-6.2-sol", "xhigh", "low"),
                                                ("gpt-6-astra", "xhigh", "low"),
                                                ("gpt-6-sol", "xhigh", "none"),
                                                ("gpt-6-luna", "medium", "none")])
def test_a_gpt_6_model_reasons_on_its_scale_and_least_at_what_it_takes(start_proxy, upstream,
                                                                       model, effort, off):
    """GPT-6 models reason up to xhigh (max is Responses-only, and not every model's); with
    thinking off, Sol and Luna take "none", Astra and the later Sols refuse it and get "low".
    They take max_output_tokens, and no sampling while they reason."""
    proxy = start_proxy({"providers": [{"name": "openai", "api_key": KEY,
                                        "api_base_url": upstream.url + "/v1"}]})
    upstream.script = lambda r: json_reply(response([message_item("ok")]))
    asked = "max" if effort == "xhigh" else effort
    sdk(proxy).messages.create(**dict(REQUEST, model="openai," + model,
                                      thinking={"type": "adaptive"}, extra_body={
                                          "temperature": 0.5, "output_config": {"effort": asked}}))
    sdk(proxy).messages.create(**dict(REQUEST, model="openai," + model,
                                      thinking={"type": "disabled"}))
    thinking, plain = (upstream.requests[n]["json"] for n in (0, 1))
    assert thinking["reasoning"] == {"effort": effort, "summary": "auto"}
    assert plain["reasoning"] == {"effort": off}
    assert thinking["max_output_tokens"] == 300 and "temperature" not in thinking
    assert [r["path"] for r in upstream.requests] == ["/v1/responses"] * 2


def test_stop_sequences_the_responses_api_has_no_field_for_are_kept_by_ccproxy(
        responses_proxy, upstream):
    """The Responses API takes no stop sequences: ccproxy ends the answer before the first,
    streamed (closing the provider's stream) and whole, as Anthropic would."""
    request = dict(REQUEST, stop_sequences=["</block>"])
    upstream.script = lambda r: stream_reply(sse(events_for([message_item(
        "<block>yes</block> and more")])), pause_before=4)
    with sdk(responses_proxy).messages.stream(**request) as stream:
        final = stream.get_final_message()
    assert "stop" not in sent_body(upstream) and upstream.peer_closed.wait(5)
    assert ([b.text for b in final.content], final.stop_reason, final.stop_sequence) == (
        ["<block>yes"], "stop_sequence", "</block>")
    upstream.script = lambda r: json_reply(response([message_item("<block>yes</block> more"),
                                                     call_item("call_1", "get_weather", "{}")]))
    message = sdk(responses_proxy).messages.create(**request)
    assert ([b.text for b in message.content], message.stop_sequence) == (
        ["<block>yes"], "</block>")


def test_a_response_that_fails_before_any_output_is_its_http_error(responses_proxy, upstream):
    upstream.script = lambda r: stream_reply(sse(events_for(
        [], "failed", error={"code": "rate_limit_exceeded", "message": "slow down"})))
    with pytest.raises(anthropic.RateLimitError) as caught:
        stream_of(responses_proxy)
    assert caught.value.body["error"]["message"] == "oai: slow down"


def test_an_answer_that_is_no_response_is_a_502_not_an_empty_message(responses_proxy,
                                                                     upstream):
    """A server that answers the Responses API's path in Chat Completions' shape (an OpenAI-
    compatible server without it): its answer has no output, and the client hears so."""
    upstream.script = lambda r: json_reply({
        "id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [{
            "index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "Hi!"}}]})
    with pytest.raises(anthropic.InternalServerError) as caught:
        sdk(responses_proxy).messages.create(**REQUEST)
    assert caught.value.status_code == 502
    assert caught.value.body["error"]["message"] == (
        "oai: the answer has no output: it is no response of the Responses API")


@pytest.mark.parametrize("ending", ["failed", "cut", "failed with the last text"])
def test_a_stream_that_fails_or_is_cut_after_text_ends_with_an_error_event(
        responses_proxy, upstream, ending):
    failure = {"error": {"code": "server_error", "message": "boom"}} if ending != "cut" else {}
    pieces = sse(events_for([message_item("Partial answer")],
                            "failed" if failure else "completed", **failure), cut=ending == "cut")
    if ending == "failed with the last text":         # " answer" and the failure in one piece
        pieces = pieces[:3] + [b"".join(pieces[3:])]
    reply = stream_reply(pieces, pause_before=len(pieces) - 1)   # the end waits for the text
    upstream.script = lambda r: reply
    received = b""
    with sdk(responses_proxy).messages.with_streaming_response.create(
            **dict(REQUEST, stream=True)) as answer:
        for chunk in answer.iter_bytes():
            received += chunk
            if b"text_delta" in received:
                reply.release.set()
    events = parse_events(received)
    assert events[-1][0] == "error" and "message_stop" not in [name for name, _ in events]
    assert "Partial answer" == "".join(p["delta"]["text"] for name, p in events
                                       if name == "content_block_delta")
    assert events[-1][1]["error"]["message"] == (
        "oai: boom" if failure else "oai: the stream ended before completion")


def test_text_that_arrives_with_the_failure_in_one_receive_is_sent_before_the_error():
    import ccproxy
    from test_openai import context
    failure = {"error": {"code": "server_error", "message": "boom"}}
    pieces = sse(events_for([message_item("Partial answer")], "failed", **failure))
    translation = context()
    relay = ccproxy.TranslatedStreamRelay(ccproxy.ResponsesStreamTranslator(translation),
                                          translation)
    sent = relay.feed(b"".join(pieces[:3]))                       # "Partial"
    sent += relay.feed(b"".join(pieces[3:]))                      # " answer", then the failure
    events = parse_events(sent + relay.finish())
    assert "".join(p["delta"]["text"] for name, p in events
                   if name == "content_block_delta") == "Partial answer"
    assert events[-1][0] == "error" and not relay.complete
    assert events[-1][1]["error"]["message"] == "openai: boom"


def test_a_failure_ends_the_stream_at_once_though_the_provider_keeps_the_connection(
        start_proxy, upstream):
    """The provider's failure event ends the client's stream when it comes, not when the
    provider next sends something or falls silent for request_timeout (whose error would then
    replace the provider's own)."""
    failure = {"error": {"code": "server_error", "message": "boom"}}
    pieces = sse(events_for([message_item("Partial answer")], "failed", **failure))
    reply = stream_reply(pieces, pause_before=3, hold_open=True)    # held after the failure
    upstream.script = lambda r: reply
    proxy = start_proxy({"providers": [responses_provider(upstream)],
                         "performance": {"request_timeout": "1s"}})
    received = b""
    try:
        with sdk(proxy).messages.with_streaming_response.create(
                **dict(REQUEST, stream=True)) as answer:
            for chunk in answer.iter_bytes():
                received += chunk
                if b"text_delta" in received:
                    reply.release.set()
    finally:
        reply.release_end.set()
    events = parse_events(received)
    assert events[-1][0] == "error" and events[-1][1]["error"]["message"] == "oai: boom"


def test_the_stream_keeps_the_anthropic_event_grammar():
    import ccproxy
    from test_openai import context
    translator = ccproxy.ResponsesStreamTranslator(context())
    items = [reasoning_item(), message_item("Hi", 1), call_item("c", "get_time", "{}", 2)]
    out = b"".join(translator.feed_event(e["type"], e) for e in events_for(items))
    check_grammar(parse_events(out + translator.finish()))


# --- web search: OpenAI's own web_search tool -----------------------------------------------------

SEARCH_TOOL = {"type": "web_search_20250305", "name": "web_search", "max_uses": 8}
SEARCH_REQUEST = dict(model="openai,gpt-6.2-sol", max_tokens=300, tools=[SEARCH_TOOL],
                      messages=[{"role": "user", "content":
                                 "Perform a web search for the query: oslo weather today"}],
                      tool_choice={"type": "tool", "name": "web_search"})
SEARCH_ANSWER = "Oslo is 4°C and cloudy today."
CITED = [("https://yr.no/oslo", "Yr: Oslo", 0), ("https://met.no/", "MET Norway", 9),
         ("https://yr.no/oslo", "Yr: Oslo", 17)]


def search_items():
    """A search that read three pages, then an answer citing two of them (one twice)."""
    read = ["https://met.no/", "https://yr.no/oslo", "https://weather.example/oslo"]
    search = {"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {
        "type": "search", "query": "oslo weather", "sources": [
            {"type": "url", "url": url} for url in read]}}
    answer = message_item(SEARCH_ANSWER, 1)
    answer["content"][0]["annotations"] = [
        {"type": "url_citation", "url": url, "title": title, "start_index": start,
         "end_index": 29} for url, title, start in CITED]
    return [search, answer]


def openai_proxy(start_proxy, upstream):
    return start_proxy({"providers": [{"name": "openai", "api_key": KEY,
                                       "api_base_url": upstream.url + "/v1"}]})


@pytest.mark.parametrize("stream", [False, True])
def test_a_web_search_runs_at_openais_own_web_search_tool(start_proxy, upstream, stream):
    """Claude Code's search request to a GPT-6 model (the Responses API) goes to OpenAI's
    web_search tool, its forced choice as `required` and every page read asked for; the answer
    reports the search as Anthropic does: the links Claude Code shows are the result block's."""
    proxy = openai_proxy(start_proxy, upstream)
    upstream.script = lambda r: stream_reply(sse(events_for(search_items()))) if stream \
        else json_reply(response(search_items()))
    message = answer_of(sdk(proxy), stream, **SEARCH_REQUEST)
    sent = sent_body(upstream)
    assert (sent["tools"], sent["tool_choice"], sent["max_tool_calls"]) == (
        [{"type": "web_search"}], "required", 8)
    assert sent["include"] == ["reasoning.encrypted_content", "web_search_call.action.sources"]
    text, use, result = message.content
    assert text.text == SEARCH_ANSWER and [c.url for c in text.citations] == [
        url for url, _, _ in CITED]
    assert text.citations[1].cited_text == SEARCH_ANSWER[9:29]
    assert (use.name, use.input, result.tool_use_id) == ("web_search", {"query": "oslo weather"},
                                                         use.id)
    assert [(r.url, r.title) for r in result.content] == [
        ("https://yr.no/oslo", "Yr: Oslo"), ("https://met.no/", "MET Norway"),
        ("https://weather.example/oslo", "https://weather.example/oslo")]
    assert message.stop_reason == "end_turn"


def test_search_filters_and_location_go_with_the_tool_and_no_choice_is_forced_among_functions(
        start_proxy, upstream):
    """allowed_domains become OpenAI's filter (without a scheme) and the user's location goes as
    it came; beside functions a forced web_search is not `required` (a function would do); an
    answer that searched nothing reports no search."""
    proxy = openai_proxy(start_proxy, upstream)
    upstream.script = lambda r: json_reply(response([message_item("No need to search.")]))
    location = {"type": "approximate", "city": "Oslo", "country": "NO", "timezone": "Europe/Oslo"}
    message = sdk(proxy).messages.create(**dict(SEARCH_REQUEST, tools=TOOLS + [dict(
        SEARCH_TOOL, allowed_domains=["https://yr.no", "met.no"], user_location=location)]))
    sent = sent_body(upstream)
    assert [tool.get("name") for tool in sent["tools"]] == ["get_weather", "get_time", None]
    assert sent["tools"][2] == {"type": "web_search", "user_location": location,
                                "filters": {"allowed_domains": ["yr.no", "met.no"]}}
    assert "tool_choice" not in sent and sent["max_tool_calls"] == 8
    assert [block.type for block in message.content] == ["text"]


def test_a_chat_completions_models_search_goes_to_the_responses_api(start_proxy, upstream):
    """gpt-4.1 answers on Chat Completions, where only OpenAI's search models search: its search
    request goes to the Responses API, whose web_search tool runs for it; the rest stays."""
    proxy = openai_proxy(start_proxy, upstream)
    upstream.script = lambda r: json_reply(response(search_items()) if r["path"].endswith(
        "/responses") else {"id": "c", "object": "chat.completion", "created": 1,
                            "model": "gpt-4.1", "choices": [{"index": 0, "finish_reason": "stop",
                                                             "message": {"role": "assistant",
                                                                         "content": "ok"}}]})
    searched = sdk(proxy).messages.create(**dict(SEARCH_REQUEST, model="openai,gpt-4.1"))
    sdk(proxy).messages.create(**dict(REQUEST, model="openai,gpt-4.1"))
    assert [r["path"] for r in upstream.requests] == ["/v1/responses", "/v1/chat/completions"]
    assert sent_body(upstream)["tools"] == [{"type": "web_search"}]
    assert [block.type for block in searched.content] == ["text", "server_tool_use",
                                                          "web_search_tool_result"]


def test_another_responses_server_cannot_search_and_says_so(responses_proxy, upstream):
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(responses_proxy).messages.create(**dict(SEARCH_REQUEST, model="gpt-5-codex"))
    assert caught.value.body["error"]["message"].startswith(
        "oai cannot search the web (model gpt-5-codex); set routes.webSearch")
    assert upstream.requests == []


def test_a_streamed_search_keeps_the_anthropic_event_grammar():
    import ccproxy
    from test_openai import context
    searching = context()
    searching.search_query = "oslo weather today"
    translator = ccproxy.ResponsesStreamTranslator(searching)
    out = b"".join(translator.feed_event(e["type"], e) for e in events_for(search_items()))
    events = parse_events(out + translator.finish())
    check_grammar(events)
    assert [payload["content_block"]["type"] for name, payload in events
            if name == "content_block_start"] == ["text", "server_tool_use",
                                                  "web_search_tool_result"]


# --- which API a model goes to ----------------------------------------------------------------

@pytest.mark.parametrize("model, path", [("gpt-5-codex", "/v1/responses"),
                                         ("gpt-5.2-pro", "/v1/responses"),
                                         ("o3-pro", "/v1/responses"),
                                         ("gpt-6.2-sol", "/v1/responses"),
                                         ("gpt-6-luna", "/v1/responses"),
                                         ("gpt-4.1", "/v1/chat/completions"),
                                         ("gpt-5", "/v1/chat/completions")])
def test_the_openai_preset_sends_responses_only_models_to_the_responses_api(
        start_proxy, upstream, model, path):
    proxy = start_proxy({"providers": [{"name": "openai", "api_key": KEY,
                                        "api_base_url": upstream.url + "/v1"}]})
    upstream.script = lambda r: json_reply(
        response([message_item("ok")]) if r["path"].endswith("/responses") else {
            "id": "c", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "ok"}}]})
    sdk(proxy).messages.create(**dict(REQUEST, model="openai," + model))
    assert upstream.requests[0]["path"] == path


def test_api_responses_sends_every_model_there(start_proxy, upstream):
    proxy = start_proxy({"providers": [{"name": "gw", "type": "openai", "api": "responses",
                                        "api_base_url": upstream.url + "/v1/chat/completions",
                                        "responses_models": "^never$"}]})
    upstream.script = lambda r: json_reply(response([message_item("ok")]))
    sdk(proxy).messages.create(**dict(REQUEST, model="gw,anything"))
    assert upstream.requests[0]["path"] == "/v1/responses"


# --- Azure OpenAI -----------------------------------------------------------------------------

CHAT_ANSWER = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
               "choices": [{"index": 0, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": "ok"}}]}


@pytest.mark.parametrize("version, model, path, body_model", [
    ("v1", "gpt-4.1", "/openai/v1/chat/completions", "prod-41"),
    ("2025-04-01-preview", "gpt-4.1",
     "/openai/deployments/prod-41/chat/completions?api-version=2025-04-01-preview", "prod-41"),
    ("v1", "gpt-5-codex", "/openai/v1/responses", "codex-dep"),
    ("2025-04-01-preview", "gpt-5-codex", "/openai/responses?api-version=2025-04-01-preview",
     "codex-dep"),
    ("v1", "o4-mini", "/openai/v1/chat/completions", "o4-mini")])
def test_azure_calls_each_api_at_its_path_with_the_deployment(start_proxy, upstream, version,
                                                              model, path, body_model):
    proxy = start_proxy({"providers": [{
        "name": "corp", "type": "azure", "api_base_url": upstream.url, "api_key": KEY,
        "api_version": version, "deployments": {"gpt-4.1": "prod-41", "gpt-5-codex": "codex-dep"},
        "models": ["gpt-4.1", "gpt-5-codex", "o4-mini"]}]})
    upstream.script = lambda r: json_reply(
        response([message_item("ok")]) if "responses" in r["path"] else CHAT_ANSWER)
    message = sdk(proxy).messages.create(**dict(REQUEST, model=model))
    sent = upstream.requests[0]
    assert (sent["path"], sent["json"]["model"]) == (path, body_model)
    assert sent["headers"]["api-key"] == KEY and "authorization" not in sent["headers"]
    assert message.content[0].text == "ok"


def test_azure_settings_are_checked_naming_the_key():
    import ccproxy
    with pytest.raises(ccproxy.ConfigError) as caught:
        ccproxy.build_config({"providers": [{
            "name": "corp", "type": "azure", "api_base_url": "https://x.openai.azure.com",
            "api_version": "latest", "deployments": {"gpt-4.1": ""}, "api": "batch",
            "responses_models": "("}]}, "config.json", {})
    assert str(caught.value).splitlines() == [
        'config.json: providers[0].api: must be "chat" or "responses"',
        "config.json: providers[0].responses_models: not a valid regular expression: missing ), "
        "unterminated subpattern at position 0",
        "config.json: providers[0].deployments.gpt-4.1: must be a deployment name",
        'config.json: providers[0].api_version: must be "v1" or a date like '
        '"2025-04-01-preview"']
