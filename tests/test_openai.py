"""OpenAI-family translation: request mapping, the stream translator, and the anthropic SDK
through the proxy against a scripted mock Chat Completions server."""
from __future__ import annotations

import json
import os
import random
import re
import urllib.request
import warnings

import anthropic
import openai
import pytest
from hypothesis import assume, example, given, settings, strategies as st

import ccproxy
from helpers import (answer_of, check_grammar, CLAUDE_CODE_VERSIONS, json_reply,
                     mistral_order_problem, mistral_problem, open_stream, parse_events,
                     read_to_end, Reply, sdk, stream_reply)

OPENAI_KEY = "sk-openai-secret-0123456789abcdef"


# --- helpers -------------------------------------------------------------------------------

def chunk(delta=None, finish=None, usage=None, no_choices=False):
    """One chat.completion.chunk as OpenAI sends it."""
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-test", "choices": []}
    if not no_choices:
        body["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    if usage is not None:
        body["usage"] = usage
    return body


def completion(message, finish="stop", usage=None):
    """One chat.completion as OpenAI answers without streaming."""
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-test",
            "choices": [{"index": 0, "message": dict({"role": "assistant"}, **message),
                         "finish_reason": finish}],
            "usage": usage or {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


def call_fragment(index, call_id=None, name=None, arguments=None):
    function = {}
    if name is not None:
        function["name"] = name
    if arguments is not None:
        function["arguments"] = arguments
    fragment = {"index": index, "function": function}
    if call_id:
        fragment.update(id=call_id, type="function")
    return {"tool_calls": [fragment]}


def sse_pieces(chunks, done=True):
    pieces = [b"data: %s\n\n" % json.dumps(c).encode() for c in chunks]
    return pieces + ([b"data: [DONE]\n\n"] if done else [])


USAGE = {"prompt_tokens": 120, "completion_tokens": 7, "total_tokens": 127,
         "prompt_tokens_details": {"cached_tokens": 100}}

SCENARIOS = {
    "plain_text": [chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}),
                   chunk({"content": "lo"}), chunk({}, "stop"), chunk(no_choices=True, usage=USAGE)],
    "one_tool_many_fragments": [
        chunk({"role": "assistant"}), chunk(call_fragment(0, "call_a", "get_weather", "")),
        chunk(call_fragment(0, arguments='{"loc')), chunk(call_fragment(0, arguments='ation": ')),
        chunk(call_fragment(0, arguments='"Oslo"}')), chunk({}, "tool_calls")],
    "interleaved_tools": [
        chunk(call_fragment(0, "call_a", "get_weather", '{"location":')),
        chunk(call_fragment(1, "call_b", "get_time", '{"tz":')),
        chunk(call_fragment(0, arguments='"Oslo"}')),
        chunk(call_fragment(1, arguments='"UTC"}')), chunk({}, "tool_calls")],
    "text_then_tools": [
        chunk({"content": "Let me check."}),
        chunk(call_fragment(0, "call_a", "get_weather", '{"location":"Oslo"}')),
        chunk(call_fragment(1, "call_b", "get_time", '{"tz":"UTC"}')), chunk({}, "tool_calls")],
    "reasoning_content_then_text": [
        chunk({"reasoning_content": "Let me"}), chunk({"reasoning_content": " think"}),
        chunk({"content": "4"}), chunk({}, "stop")],
    "reasoning_then_text": [chunk({"reasoning": "Hmm."}), chunk({"content": "Yes"}),
                            chunk({}, "stop")],
    "finish_in_last_content_chunk": [chunk({"content": "Done"}, "stop")],
    "empty_deltas": [chunk({}), chunk({"content": None}), chunk({"content": ""}),
                     chunk({"content": "x"}), chunk({}), chunk({}, "stop")],
    "usage_on_finish_chunk": [chunk({"content": "x"}), chunk({}, "stop", usage=USAGE)],
}

EXPECTED_CONTENT = {
    "plain_text": [{"type": "text", "text": "Hello"}],
    "one_tool_many_fragments": [{"type": "tool_use", "id": "call_a", "name": "get_weather",
                                 "input": {"location": "Oslo"}}],
    "interleaved_tools": [
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"location": "Oslo"}},
        {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {"tz": "UTC"}}],
    "text_then_tools": [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"location": "Oslo"}},
        {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {"tz": "UTC"}}],
    "reasoning_content_then_text": [
        {"type": "thinking", "thinking": "Let me think", "signature": "ccpx1.openai"},
        {"type": "text", "text": "4"}],
    "reasoning_then_text": [{"type": "thinking", "thinking": "Hmm.", "signature": "ccpx1.openai"},
                            {"type": "text", "text": "Yes"}],
    "finish_in_last_content_chunk": [{"type": "text", "text": "Done"}],
    "empty_deltas": [{"type": "text", "text": "x"}],
    "usage_on_finish_chunk": [{"type": "text", "text": "x"}],
}


def context(tools=(), model="claude-x", provider_name="openai", provider=None):
    config = ccproxy.build_config({"providers": [provider or {"name": provider_name,
                                                              "api_key": "k"}]}, "c", {})
    request = ccproxy.Request("POST", "/v1/messages", "HTTP/1.1", ccproxy.Headers())
    request.body = b"x" * 400
    return ccproxy.TranslationContext(config.providers[0], request,
                                      {"model": model, "tools": list(tools), "max_tokens": 100},
                                      ccproxy.openai_tool_name)


def translate(chunks, done=True, **where):
    translator = ccproxy.OpenAIStreamTranslator(context(**where))
    out = b"".join(translator.feed(c) for c in chunks)
    if done:
        translator.done()
    return parse_events(out + translator.finish())


def content_of(events):
    """The message an SDK would assemble from the events."""
    blocks = []
    for name, payload in events:
        if name == "content_block_start":
            blocks.append(dict(payload["content_block"], _json=""))
        elif name == "content_block_delta":
            delta, block = payload["delta"], blocks[payload["index"]]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            else:
                block["_json"] += delta["partial_json"]
    for block in blocks:
        raw = block.pop("_json")
        if block["type"] == "tool_use":
            block["input"] = json.loads(raw) if raw else {}
    return blocks


# --- the mock chunks are what the official openai SDK accepts ----------------------------------

@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_mock_chunks_validate_as_openai_sdk_types(name):
    for item in SCENARIOS[name]:
        openai.types.chat.ChatCompletionChunk.model_validate(item)


def test_mock_completion_validates_as_openai_sdk_type():
    openai.types.chat.ChatCompletion.model_validate(completion(
        {"content": "x", "tool_calls": [{"id": "c", "type": "function",
                                         "function": {"name": "f", "arguments": "{}"}}]}))


# --- the stream translator, sans IO ------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_translator_scenarios(name):
    events = translate(SCENARIOS[name])
    check_grammar(events)
    assert content_of(events) == EXPECTED_CONTENT[name]


def test_translator_stop_reasons_and_usage():
    events = translate(SCENARIOS["plain_text"])
    delta = [p for n, p in events if n == "message_delta"][0]
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert delta["usage"] == {"input_tokens": 20, "output_tokens": 7,
                              "cache_read_input_tokens": 100, "cache_creation_input_tokens": 0}
    tools = [p for n, p in translate(SCENARIOS["text_then_tools"]) if n == "message_delta"][0]
    assert tools["delta"]["stop_reason"] == "tool_use"
    length = translate([chunk({"content": "x"}, "length")])
    assert [p for n, p in length if n == "message_delta"][0]["delta"]["stop_reason"] == "max_tokens"


def test_parallel_calls_whose_headers_come_first_keep_every_argument():
    chunks = [chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                     "function": {"name": "Read", "arguments": ""}},
                                    {"index": 1, "id": "call_b", "type": "function",
                                     "function": {"name": "Grep", "arguments": ""}}]}),
              chunk(call_fragment(0, arguments='{"path":')), chunk(call_fragment(1, arguments='{"q":')),
              chunk(call_fragment(0, arguments='"a.py"}')), chunk(call_fragment(1, arguments='"x"}')),
              chunk({}, "tool_calls")]
    events = translate(chunks)
    check_grammar(events)
    assert [(b["name"], b["input"]) for b in content_of(events)] == [
        ("Read", {"path": "a.py"}), ("Grep", {"q": "x"})]


def test_parallel_calls_a_server_sends_all_at_index_0_stay_apart():
    # Ollama (ollama/ollama#15457), SGLang and vLLM builds: each call has its own id, all index 0;
    # a later fragment may have an id of its own (Poolside's API), but never a name
    chunks = [chunk(call_fragment(0, "call_a", "Read", '{"path":')),
              chunk(call_fragment(0, arguments='"a.py"}')),
              chunk(call_fragment(0, "call_b", "Grep", '{"q"')),
              chunk({"tool_calls": [{"index": 0, "id": "call_b2",
                                     "function": {"arguments": ':"x"}'}}]}),
              chunk(call_fragment(0, "call_c", "Read", '{"path":"b.py"}')), chunk({}, "tool_calls")]
    events = translate(chunks)
    check_grammar(events)
    assert [(b["id"], b["name"], b["input"]) for b in content_of(events)] == [
        ("call_a", "Read", {"path": "a.py"}), ("call_b", "Grep", {"q": "x"}),
        ("call_c", "Read", {"path": "b.py"})]


def test_calls_a_server_gives_one_id_get_ids_of_their_own(openai_proxy, upstream):
    # Xinference gives every call of an answer one id (xorbitsai/inference#4237)
    calls = [{"id": "call_x", "type": "function", "function": {"name": name, "arguments": "{}"}}
             for name in ("Read", "Grep")]
    upstream.script = lambda r: json_reply(completion({"tool_calls": calls}, "tool_calls"))
    whole = [block.id for block in sdk(openai_proxy).messages.create(**REQUEST).content]
    events = translate([chunk({"tool_calls": [dict(call, index=n) for n, call in
                                              enumerate(calls)]}), chunk({}, "tool_calls")])
    streamed = [block["id"] for block in content_of(events)]
    for ids in (whole, streamed):
        assert ids[0] == "call_x" and ids[1].startswith("toolu_") and len(set(ids)) == 2


def test_a_call_with_the_id_of_a_call_before_it_in_the_conversation_gets_one_of_its_own(
        openai_proxy, upstream):
    """A server that numbers calls within each answer (grok's call_0, Kimi on Fireworks'
    Bash:0) gives every turn's first call one id; Claude Code took the second for the first,
    already run, and asked again without end. Each repeat now has an id of its own, which
    gives the server back the id it gave."""
    history = dict(REQUEST, messages=REQUEST["messages"] + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_0", "name": "get_time",
                                           "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_0",
                                      "content": "noon"}]}])
    call = {"id": "call_0", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    upstream.script = lambda r: json_reply(completion({"tool_calls": [call]}, "tool_calls"))
    whole = sdk(openai_proxy).messages.create(**history).content[0].id
    upstream.script = lambda r: Reply(200, pieces=sse_pieces([
        chunk({"tool_calls": [dict(call, index=0)]}), chunk({}, "tool_calls")]),
        content_type="text/event-stream")
    with sdk(openai_proxy).messages.stream(**history) as stream:
        streamed = stream.get_final_message().content[0].id
    assert whole.startswith("ccpxre_") and streamed.startswith("ccpxre_") and whole != streamed
    assert sdk(openai_proxy).messages.create(**REQUEST).content[0].id == "call_0"
    upstream.script = lambda r: json_reply(completion({"content": "noon again"}))
    sdk(openai_proxy).messages.create(**dict(history, messages=history["messages"] + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": whole, "name": "get_time",
                                           "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": whole,
                                      "content": "noon"}]}]))
    sent = upstream.requests[-1]["json"]["messages"]            # the server's own ids, back
    assert [m["tool_calls"][0]["id"] for m in sent if m.get("tool_calls")] == ["call_0", "call_0"]
    assert [m["tool_call_id"] for m in sent if m["role"] == "tool"] == ["call_0", "call_0"]


CALL_IDS = st.sampled_from(["call_0", "call_1", "Bash:0", "functions.Read:1", "x" * 50, "é"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(CALL_IDS, min_size=1, max_size=3, unique=True), min_size=1,
                max_size=6))
def test_call_ids_are_the_clients_own_and_go_back_as_the_server_gave_them(turns):
    """Whatever ids a server gives its calls, turn after turn: the client never gets one id
    for two calls, and the server gets back, for each call, the id it gave."""
    config = ccproxy.build_config({"providers": [{"name": "openai", "api_key": "k"}]}, "c", {})
    request = ccproxy.Request("POST", "/v1/messages", "HTTP/1.1", ccproxy.Headers())
    request.body, history, given_to_client = b"{}", [], []
    for server_ids in turns:
        context = ccproxy.TranslationContext(config.providers[0], request, {
            "model": "m", "max_tokens": 5, "messages": list(history)}, ccproxy.openai_tool_name)
        ids = ccproxy.AnswerToolIds(context)
        client_ids = [ids.own(ccproxy.tool_use_id(server_id)) for server_id in server_ids]
        given_to_client += client_ids
        assert [ccproxy.openai_tool_id(client_id, None) for client_id in client_ids] == \
            server_ids
        history += [{"role": "assistant", "content": [
            {"type": "tool_use", "id": client_id, "name": "f", "input": {}}
            for client_id in client_ids]}, {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": client_id} for client_id in client_ids]}]
    assert len(set(given_to_client)) == len(given_to_client)


def test_a_call_id_over_40_characters_reaches_openai_in_40_paired_with_its_result(
        openai_proxy, upstream):
    """OpenAI refuses a longer one ("string too long. Expected a string with maximum length
    40"), at every turn after a session came from a server that gives them (vLLM: 46)."""
    long_id, short_id = "chatcmpl-tool-" + "0123456789abcdef" * 2, "toolu_01short"
    messages = REQUEST["messages"] + [
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": tool_id, "name": "get_time", "input": {}}
            for tool_id in (long_id, short_id)]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id,
                                      "content": "noon"} for tool_id in (long_id, short_id)]}]
    upstream.script = lambda r: json_reply(completion({"content": "ok"}))
    sdk(openai_proxy).messages.create(**dict(REQUEST, messages=messages))
    sent = upstream.requests[-1]["json"]["messages"]
    calls = [call["id"] for m in sent for call in m.get("tool_calls") or ()]
    assert len(calls[0]) == 40 and calls[0].startswith("call_") and calls[1] == short_id
    assert [m["tool_call_id"] for m in sent if m["role"] == "tool"] == calls


def test_a_streamed_refusal_is_text_with_stop_reason_refusal():
    events = translate([chunk({"role": "assistant", "refusal": "I can't "}),
                        chunk({"refusal": "help with that."}), chunk({}, "stop")])
    assert content_of(events) == [{"type": "text", "text": "I can't help with that."}]
    assert [p for n, p in events if n == "message_delta"][0]["delta"]["stop_reason"] == "refusal"


THOUGHTS = st.text("ab \n<>/thik", max_size=12).filter(lambda t: "</think>" not in t)


@settings(max_examples=300, deadline=None)
@given(THOUGHTS, st.text("ab \n<>/thik", max_size=12), st.sampled_from(["", " ", "\n"]),
       st.sampled_from(["", "\n", "\n\n"]), st.lists(st.integers(min_value=1), max_size=5))
def test_reasoning_left_in_think_tags_at_the_start_becomes_thinking(thought, answer, before,
                                                                    after, cuts):
    """Ollama and vLLM serving Qwen3 or DeepSeek-R1 without a reasoning parser write the
    reasoning into the text as <think>…</think>; Claude Code showed the tags and sent them back
    as text at every turn. In any pieces: thinking, then the answer, neither with the tags or
    the space around them; text that does not open with the tag stays as it came."""
    text = before + "<think>\n" + thought + "\n</think>" + after + answer
    bounds = sorted({cut % len(text) for cut in cuts} - {0}) + [len(text)]
    events = translate([chunk({"role": "assistant", "content": ""})] + [
        chunk({"content": text[a:b]}) for a, b in zip([0] + bounds, bounds)] +
        [chunk({}, "stop")])
    check_grammar(events)
    expected = ([{"type": "thinking", "thinking": thought.strip()}] if thought.strip() else []) \
        + ([{"type": "text", "text": answer.lstrip()}] if answer.strip() else [])
    assert [{k: v for k, v in b.items() if k != "signature"} for b in content_of(events)] \
        == expected
    plain = translate([chunk({"content": "So " + answer + "<think>x</think>"}),
                       chunk({}, "stop")])
    assert content_of(plain) == [{"type": "text", "text": "So " + answer + "<think>x</think>"}]


def test_think_tags_in_a_whole_answer_and_before_a_tool_call(openai_proxy, upstream):
    upstream.script = lambda r: json_reply(completion({
        "content": "<think>\nOkay, the user said hello.\n</think>\n\nHello! How can I help?"}))
    message = sdk(openai_proxy).messages.create(**REQUEST)
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None))
            for b in message.content] == [("thinking", "Okay, the user said hello."),
                                          ("text", "Hello! How can I help?")]
    events = translate([chunk({"content": "<think>\nNeeds the tool.\n</think>\n\n"}),
                        chunk(call_fragment(0, "c1", "Bash", '{"command": "ls"}')),
                        chunk({}, "tool_calls")])
    check_grammar(events)
    assert [b["type"] for b in content_of(events)] == ["thinking", "tool_use"]


def opened_thinking_turns(chunks_of_turns, provider=None, model="qwen3-thinking"):
    """Streams of one model, one after the other, through one provider (a server of no preset
    unless said): each turn's content blocks, and the models the provider learned."""
    server = ccproxy.build_config({"providers": [provider or VLLM]}, "c", {}).providers[0]
    request = ccproxy.Request("POST", "/v1/messages", "HTTP/1.1", ccproxy.Headers())
    request.body, turns = b"x" * 400, []
    for chunks in chunks_of_turns:
        translator = ccproxy.OpenAIStreamTranslator(ccproxy.TranslationContext(
            server, request, {"model": "claude-x", "max_tokens": 100}, ccproxy.openai_tool_name,
            model))
        events = parse_events(b"".join(translator.feed(c) for c in chunks) + translator.finish())
        check_grammar(events)
        turns.append([{k: v for k, v in b.items() if k != "signature"}
                      for b in content_of(events)])
    return turns, server.opens_thinking


def pieces_of(text, cuts):
    """text as stream chunks, cut at these places."""
    bounds = sorted({cut % len(text) for cut in cuts} - {0}) + [len(text)]
    return [chunk({"content": text[a:b]}) for a, b in zip([0] + bounds, bounds)]


@settings(max_examples=200, deadline=None)
@given(THOUGHTS.filter(lambda t: "<think>" not in t and t.strip()),
       st.text("ab \n<>/thik", max_size=12).filter(lambda t: "<think>" not in t),
       st.sampled_from(["", "\n", "\n\n"]), st.lists(st.integers(min_value=1), max_size=5))
def test_a_model_whose_template_opens_its_thinking_is_read_so_after_its_first_answer(
        thought, answer, after, cuts):
    """Qwen3's Thinking models, DeepSeek-R1 and V4 on vLLM or SGLang without a reasoning parser
    write no <think> (their template wrote it) and close it: the first answer's text goes out
    as it came (it has streamed before the </think> shows), the model's next answers begin in
    thinking, in any pieces."""
    text = thought + "\n</think>" + after + answer
    turns, learned = opened_thinking_turns([pieces_of(text, cuts) + [chunk({}, "stop")]] * 2)
    assert turns[0] == [{"type": "text", "text": text}] and learned == {"qwen3-thinking"}
    assert turns[1] == [{"type": "thinking", "thinking": thought.strip()}] + (
        [{"type": "text", "text": answer.lstrip()}] if answer.strip() else [])


def test_an_opened_thinking_that_never_ends_is_given_as_text_unless_cut_or_calling():
    """Once learned, an answer with no </think> was one the model did not think before (its
    template closed the tag): it goes as text too, never lost; cut at max_tokens, or followed
    by a call, it was thinking."""
    first = [chunk({"content": "Hmm.</think>Hi."}), chunk({}, "stop")]
    turns, _ = opened_thinking_turns([
        first, [chunk({"content": "Plain answer."}), chunk({}, "stop")],
        [chunk({"content": "Still thinking"}), chunk({}, "length")],
        [chunk({"content": "I need ls."}), chunk(call_fragment(0, "c1", "Bash", "{}")),
         chunk({}, "tool_calls")]])
    assert turns[1] == [{"type": "thinking", "thinking": "Plain answer."},
                        {"type": "text", "text": "Plain answer."}]
    assert turns[2] == [{"type": "thinking", "thinking": "Still thinking"}]
    assert [b["type"] for b in turns[3]] == ["thinking", "tool_use"]


@pytest.mark.parametrize("text", ["Use <think> and </think> tags.", "So <think>x</think> it is."])
def test_tags_of_its_own_teach_nothing(text):
    turns, learned = opened_thinking_turns([[chunk({"content": text}), chunk({}, "stop")]] * 2)
    assert turns == [[{"type": "text", "text": text}]] * 2 and learned == set()


def test_a_whole_answer_that_closes_a_thinking_it_never_opened(start_proxy, upstream):
    """Whole, the answer is split at once; a preset's server (OpenAI's) is not watched."""
    upstream.script = lambda r: json_reply(completion({
        "content": "The user greets me.\n</think>\n\nHello!"}))
    proxy = start_proxy({"providers": [dict(VLLM, api_base_url=upstream.url + "/v1",
                                            models=["qwen3-thinking"]),
                                       preset_provider("openai", upstream)]})
    message = sdk(proxy).messages.create(**dict(REQUEST, model="vllm,qwen3-thinking"))
    assert [(b.type, getattr(b, "thinking", None) or b.text) for b in message.content] == [
        ("thinking", "The user greets me."), ("text", "Hello!")]
    views = json.loads(urllib.request.urlopen(proxy.url + "/providers", timeout=10).read())
    assert views["providers"][0]["opens_thinking"] == ["qwen3-thinking"]
    plain = sdk(proxy).messages.create(**dict(REQUEST, model="openai,gpt-5"))
    assert [b.text for b in plain.content] == ["The user greets me.\n</think>\n\nHello!"]


# --- tool calls a server of no preset leaves in the text (vLLM, SGLang without its parser) ----

VLLM = {"name": "vllm", "type": "openai", "api_base_url": "http://127.0.0.1:9/v1"}
CALL_TOOLS = [{"name": "Bash", "input_schema": {"type": "object", "properties": {
                  "command": {"type": "string"}, "timeout": {"type": "number"}}}},
              {"name": "Read", "input_schema": {"type": "object", "properties": {
                  "file_path": {"type": "string"}}}}]
WRITTEN_CALLS = [   # (as a model writes it, the input Claude Code should get)
    ('<tool_call>\n{"name": "Bash", "arguments": {"command": "ls -la | wc -l"}}\n</tool_call>',
     {"command": "ls -la | wc -l"}),                                # Hermes, Qwen2.5, Qwen3
    ('<tool_call>\n<function=Bash>\n<parameter=command>\nls -la | wc -l\n</parameter>\n'
     '<parameter=timeout>\n5000\n</parameter>\n</function>\n</tool_call>',
     {"command": "ls -la | wc -l", "timeout": 5000}),              # Qwen3-Coder
    ('<tool_call>\n<function=Bash>\n<parameter=command>\nls -la | wc -l\n\n\n</tool_call>',
     {"command": "ls -la | wc -l"}),                  # its closing tags left out (vLLM#21571)
    ('<function=Bash>\n<parameter=command>\nls -la | wc -l\n</parameter>\n</function>',
     {"command": "ls -la | wc -l"}),                                # without the outer tags
    ('<function=Bash>{"command": "ls -la | wc -l"}</function>',
     {"command": "ls -la | wc -l"}),                                # the input's JSON (Llama)
]
AROUND = st.text("ab \n<>/=", max_size=10)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(WRITTEN_CALLS), AROUND, AROUND, st.lists(st.integers(min_value=1),
                                                                 max_size=6))
def test_a_tool_call_a_server_left_in_the_text_is_a_call(written, before, after, cuts):
    """vLLM or SGLang without the model's --tool-call-parser (or with another model's) leave
    the model's calls in the text: Claude Code showed them and ran none. In any pieces, the
    text around the call stays text (the space next to it dropped) and the call is a call."""
    call, arguments = written
    text = before + call + after
    bounds = sorted({cut % len(text) for cut in cuts} - {0}) + [len(text)]
    events = translate([chunk({"role": "assistant", "content": ""})] + [
        chunk({"content": text[a:b]}) for a, b in zip([0] + bounds, bounds)] +
        [chunk({}, "stop")], provider=VLLM, tools=CALL_TOOLS)
    check_grammar(events)
    blocks = [{k: v for k, v in b.items() if k != "id"} for b in content_of(events)]
    assert blocks == ([{"type": "text", "text": before.rstrip()}] if before.strip() else []) + [
        {"type": "tool_use", "name": "Bash", "input": arguments}] + (
        [{"type": "text", "text": after.lstrip()}] if after.strip() else [])
    assert [p for n, p in events if n == "message_delta"][0]["delta"]["stop_reason"] == \
        "tool_use"


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "Write", "arguments": {"path": "x"}}</tool_call>',   # no such tool
    '<tool_call>{"name": "Bash", "arguments": [1]}</tool_call>',             # no object
    '<tool_call>{"name": "Bash", "arguments": {"command": </tool_call>',     # no JSON
    'Write it as <tool_call>{"name": "Bash"',                                # cut short
])
def test_what_does_not_read_as_a_call_of_the_request_stays_text(text):
    events = translate([chunk({"content": text}), chunk({}, "stop")], provider=VLLM,
                       tools=CALL_TOOLS)
    assert content_of(events) == [{"type": "text", "text": text}]
    assert [p for n, p in events if n == "message_delta"][0]["delta"]["stop_reason"] == \
        "end_turn"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["<tool_call>", "</tool_call>", "<function=Bash>", "</function>",
                                 "<parameter=command>", "<", "tool", "a", " ", "\n", "{",
                                 '"name": "Bash"', "}", "```", "`"]), max_size=14),
       st.lists(st.integers(min_value=1), max_size=6))
def test_text_with_no_call_that_reads_loses_nothing(parts, cuts):
    """Held back while it might be a call, in any pieces: all of it comes back as text."""
    text = "".join(parts)
    reader = ccproxy.TextToolCalls({"Bash": {"command": {"type": "string"}}})
    bounds = sorted({cut % max(len(text), 1) for cut in cuts} - {0}) + [len(text)]
    pieces = [p for a, b in zip([0] + bounds, bounds) for p in reader.split(text[a:b])]
    pieces += reader.flush()
    assume(not reader.found)
    assert "".join(piece for kind, piece in pieces) == text


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_a_call_in_a_code_block_is_an_example_and_stays_text(size):
    """A model explaining the format (this very feature, say) writes a call as an example, in
    a ``` code block: run, it would be a command nobody asked for."""
    call = '<tool_call>\n{"name": "Bash", "arguments": {"command": "ls"}}\n</tool_call>'
    text = "The format:\n```xml\n" + call + "\n```\nNow for real:\n" + call
    events = translate([chunk({"content": text[at:at + size]}) for at in range(0, len(text),
                                                                                size)] +
                       [chunk({}, "stop")], provider=VLLM, tools=CALL_TOOLS)
    assert [(b["type"], b.get("text") or b.get("input")) for b in content_of(events)] == [
        ("text", "The format:\n```xml\n" + call + "\n```\nNow for real:"),
        ("tool_use", {"command": "ls"})]


def test_two_calls_left_in_the_text_after_thinking_are_two_calls():
    """Qwen3 on vLLM with neither parser: <think> first, then text, then two calls."""
    text = "<think>\nNeed both.\n</think>\n\nReading.\n" + "\n".join(
        "<tool_call>\n<function=Read>\n<parameter=file_path>\n/%s\n</parameter>\n</function>\n"
        "</tool_call>" % name for name in ("a", "b"))
    events = translate([chunk({"content": text[at:at + 3]}) for at in range(0, len(text), 3)] +
                       [chunk({}, "stop")], provider=VLLM, tools=CALL_TOOLS)
    check_grammar(events)
    assert [(b["type"], b.get("thinking") or b.get("text") or b.get("input"))
            for b in content_of(events)] == [
        ("thinking", "Need both."), ("text", "Reading."), ("tool_use", {"file_path": "/a"}),
        ("tool_use", {"file_path": "/b"})]


def test_a_long_call_in_small_pieces_is_read_whole_and_one_past_the_limit_is_text(monkeypatch):
    """A Write of a big file, 5 characters a chunk: each piece is looked through once (only
    the newest, and the closing tag's length before it); past TEXT_CALL_HELD_CHARS it was no
    call, and comes back as text, all of it."""
    content = "".join("line %d </parameter\n" % n for n in range(20000))
    written = "<tool_call>\n<function=Write>\n<parameter=content>\n%s\n</parameter>\n" \
              "</function>\n</tool_call>" % content
    reader = ccproxy.TextToolCalls({"Write": {"content": {"type": "string"}}})
    pieces = [p for at in range(0, len(written), 5) for p in reader.split(written[at:at + 5])]
    assert pieces + reader.flush() == [("call", ("Write", {"content": content}))]
    monkeypatch.setattr(ccproxy, "TEXT_CALL_HELD_CHARS", 1000)
    reader = ccproxy.TextToolCalls({"Write": {"content": {"type": "string"}}})
    pieces = [p for at in range(0, len(written), 5) for p in reader.split(written[at:at + 5])]
    pieces += reader.flush()
    assert not reader.found and "".join(text for kind, text in pieces) == written


def test_calls_in_the_text_are_read_for_servers_of_no_preset_or_when_asked(start_proxy,
                                                                          upstream):
    written = WRITTEN_CALLS[1][0]
    upstream.script = lambda r: json_reply(completion({"content": "Listing.\n" + written}))
    ask = dict(REQUEST, tools=CALL_TOOLS)
    read = [dict(VLLM, api_base_url=upstream.url + "/v1"),
            {"name": "openai", "api_key": "k", "api_base_url": upstream.url + "/v1",
             "text_tool_calls": True}]
    for provider in read:
        message = sdk(start_proxy({"providers": [provider]})).messages.create(**ask)
        assert [(b.type, getattr(b, "text", None), getattr(b, "input", None))
                for b in message.content] == [
            ("text", "Listing.", None),
            ("tool_use", None, {"command": "ls -la | wc -l", "timeout": 5000})]
        assert message.stop_reason == "tool_use" and message.content[1].id.startswith("toolu_")
    left = [dict(VLLM, api_base_url=upstream.url + "/v1", text_tool_calls=False),
            {"name": "openai", "api_key": "k", "api_base_url": upstream.url + "/v1"}]
    for provider in left:
        message = sdk(start_proxy({"providers": [provider]})).messages.create(**ask)
        assert [b.type for b in message.content] == ["text"] and message.stop_reason == "end_turn"
    with pytest.raises(ccproxy.ConfigError, match=r"providers\[0\]\.text_tool_calls: must be "
                                                  r"true or false"):
        ccproxy.build_config({"providers": [dict(VLLM, text_tool_calls="yes")]}, "c", {})


def test_the_stop_string_a_server_names_becomes_stop_sequence(openai_proxy, upstream):
    final = chunk({}, "stop")
    final["choices"][0]["stop_reason"] = "END"          # vLLM and SGLang say which one matched
    events = translate([chunk({"content": "done"}), final])
    delta = [p for n, p in events if n == "message_delta"][0]["delta"]
    assert delta == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    numbered = chunk({}, "stop")
    numbered["choices"][0]["stop_reason"] = 128001      # a token id: not a stop string
    assert [p for n, p in translate([numbered]) if n == "message_delta"][0]["delta"] == {
        "stop_reason": "end_turn", "stop_sequence": None}
    answer = completion({"content": "done"})
    answer["choices"][0]["stop_reason"] = "END"
    upstream.script = lambda r: json_reply(answer)
    message = sdk(openai_proxy).messages.create(**dict(REQUEST, stop_sequences=["END"]))
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "END")


def test_message_start_carries_an_input_estimate_and_a_ping_follows():
    events = translate(SCENARIOS["plain_text"])
    assert events[0][1]["message"]["usage"]["input_tokens"] == 100      # 400 body bytes / 4
    assert events[0][1]["message"]["model"] == "claude-x"
    assert events[1][0] == "ping"


def test_stream_without_done_but_with_finish_ends_normally():
    events = translate(SCENARIOS["finish_in_last_content_chunk"], done=False)
    assert events[-1][0] == "message_stop"


def test_done_without_finish_reason_ends_normally():
    events = translate([chunk({"content": "x"})], done=True)
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"


def test_stream_cut_without_finish_or_done_ends_with_an_error_event():
    events = translate([chunk({"content": "partial"})], done=False)
    assert events[-1][0] == "error"
    assert "ended before completion" in events[-1][1]["error"]["message"]
    assert "message_stop" not in [name for name, _ in events]


def test_upstream_error_chunk_raises_a_mapped_error():
    translator = ccproxy.OpenAIStreamTranslator(context())
    translator.feed(chunk({"content": "x"}))
    with pytest.raises(ccproxy.ProxyError) as caught:
        translator.feed({"error": {"message": "Rate limit reached", "code": 429}})
    assert caught.value.status == 429 and caught.value.error_type == "rate_limit_error"
    events = parse_events(translator.finish(caught.value))
    assert events == [("error", {"type": "error", "error": {
        "type": "rate_limit_error", "message": "openai: Rate limit reached"}})]


def test_whole_arguments_and_late_names():
    events = translate([chunk({"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                               "function": {"name": "f", "arguments": {"a": 1}}}]}),
                        chunk({"tool_calls": [{"index": 1, "id": "c2", "function": {"arguments": '{"b":'}}]}),
                        chunk({"tool_calls": [{"index": 1, "function": {"name": "g", "arguments": "2}"}}]}),
                        chunk({}, "tool_calls")])
    check_grammar(events)
    assert content_of(events) == [{"type": "tool_use", "id": "c1", "name": "f", "input": {"a": 1}},
                                  {"type": "tool_use", "id": "c2", "name": "g", "input": {"b": 2}}]


def test_tool_call_without_arguments_has_empty_input():
    events = translate([chunk(call_fragment(0, "c1", "ls", "")), chunk({}, "tool_calls")])
    assert content_of(events) == [{"type": "tool_use", "id": "c1", "name": "ls", "input": {}}]
    assert not any(p.get("delta", {}).get("type") == "input_json_delta" for _, p in events)


def test_odd_tool_ids_are_encoded_reversibly():
    events = translate([chunk(call_fragment(0, "functions.Bash:0", "Bash", "{}")),
                        chunk({}, "tool_calls")])
    tool_id = content_of(events)[0]["id"]
    assert tool_id.startswith("ccpxid_")
    assert ccproxy.openai_tool_id(tool_id, None) == "functions.Bash:0"


def test_text_after_a_tool_call_opens_a_new_text_block():
    events = translate([chunk(call_fragment(0, "c1", "f", "{}")), chunk({"content": "after"}),
                        chunk({}, "tool_calls")])
    check_grammar(events)
    assert [b["type"] for b in content_of(events)] == ["tool_use", "text"]


def arguments_of(events):
    """The input JSON of the first tool block, as the client gets it."""
    return "".join(p["delta"]["partial_json"] for n, p in events if n == "content_block_delta"
                   and p["delta"]["type"] == "input_json_delta")


MENDED = [  # fragments a model streamed, the input it meant
    (['{"command": "ls",', ' "description": "List",}'], {"command": "ls", "description": "List"}),
    (['{"command": "ls"'], {"command": "ls"}),
    (['{"edits": [{"a": 1}, {"b": 2,},', "]"], {"edits": [{"a": 1}, {"b": 2}]}),
    (['{"command": "ls"}', "}"], {"command": "ls"}),
    (['{"code": "x = [1, ]",', ' "n": [1,', " 2}"], {"code": "x = [1, ]", "n": [1, 2]}),
]


@pytest.mark.parametrize("fragments, meant", MENDED)
def test_streamed_arguments_that_end_badly_are_mended(fragments, meant):
    """Claude Code answers input that does not parse with an InputValidationError and a turn
    lost; Anthropic's input JSON always parses. A model's mistakes at the end are mended, while
    the rest still streams as it comes."""
    translator = ccproxy.OpenAIStreamTranslator(context())
    first = parse_events(translator.feed(chunk(call_fragment(0, "c1", "Bash", fragments[0]))))
    assert arguments_of(first) and fragments[0].startswith(arguments_of(first))   # live
    rest = b"".join(translator.feed(chunk(call_fragment(0, arguments=f))) for f in fragments[1:])
    events = first + parse_events(rest + translator.feed(chunk({}, "tool_calls")) +
                                  translator.finish())
    check_grammar(events)
    assert json.loads(arguments_of(events)) == meant
    assert content_of(events)[0]["input"] == meant


RESENT = [  # fragments a server streamed, sending again what it had sent; the input meant
    (['{"command"', '{"command": "l', '{"command": "ls"}'], {"command": "ls"}),  # Baidu Qianfan
    (['{"', '{"a"', '{"a":', '{"a": [', '{"a": [1', '{"a": [1]}'], {"a": [1]}),
    (['{"command":', ' "ls"', '{"command": "ls"}'], {"command": "ls"}),  # vLLM's GLM parser
    (['{"command": "ls"}', '{"command":"ls"}'], {"command": "ls"}),
    (['{"command": "ls"}', json.dumps('{"command": "ls"}')], {"command": "ls"}),  # LiteLLM
    (['{"a":', '{"a": 1}', "}"], {"a": {"a": 1}}),       # an object inside is no resend
    (['{"a": [', '{"a": []}', "]}"], {"a": [{"a": []}]}),
]


@pytest.mark.parametrize("fragments, meant", RESENT)
def test_arguments_a_server_sends_again_are_sent_once(fragments, meant):
    events = translate([chunk(call_fragment(0, "c1", "Bash", fragments[0]))] +
                       [chunk(call_fragment(0, arguments=f)) for f in fragments[1:]] +
                       [chunk({}, "tool_calls")])
    check_grammar(events)
    assert json.loads(arguments_of(events)) == meant == content_of(events)[0]["input"]


def test_fragments_that_could_be_sent_again_cost_no_more_than_their_length(monkeypatch):
    """A server sending a long call in fragments that each open a brace: each is checked
    against the arguments so far only while it is at least half as long as them."""
    joined = []
    monkeypatch.setattr(ccproxy, "json_object_prefix",
                        lambda text: joined.append(len(text)) or True)
    events = translate([chunk(call_fragment(0, "c1", "Write", '{"content": "'))] +
                       [chunk(call_fragment(0, arguments="{x")) for _ in range(2000)] +
                       [chunk(call_fragment(0, arguments='"}')), chunk({}, "tool_calls")])
    assert json.loads(arguments_of(events)) == {"content": "{x" * 2000}
    assert sum(joined) < 200


def test_a_long_call_left_open_is_not_read_again_at_every_fragment_of_another(monkeypatch):
    """Another call's fragments coming while a long one is open: the open call's arguments
    had been joined and read at every one (2.4 s of the event loop for 2,000 behind 1 MB)."""
    translator = ccproxy.OpenAIStreamTranslator(context())
    opening = '{"content": "' + "x" * 10**5
    pieces = [translator.feed(chunk(call_fragment(0, "c1", "Write", opening))),
              translator.feed(chunk(call_fragment(1, "c2", "Read", "")))]
    read, loads = [], json.loads
    monkeypatch.setattr(ccproxy.json, "loads", lambda text, *a, **k: read.append(len(text))
                        or loads(text, *a, **k))
    pieces += [translator.feed(chunk(call_fragment(1, arguments=p))) for p in ('{"path":', '"a"}')]
    monkeypatch.undo()
    assert sum(read) < 1000
    pieces += [translator.feed(chunk(call_fragment(0, arguments='"}'))),
               translator.feed(chunk({}, "tool_calls")), translator.finish()]
    events = parse_events(b"".join(pieces))
    assert [b["input"] for b in content_of(events)] == [{"content": "x" * 100000}, {"path": "a"}]


@pytest.mark.parametrize("fragments", [['{"command": "ls"}'], ['{"command": "ls', 'x'],
                                       ['{"a": tru'], ['{"a": 1}{"a": 2}']])
def test_arguments_that_are_whole_or_cannot_be_mended_pass_as_they_came(fragments):
    events = translate([chunk(call_fragment(0, "c1", "Bash", fragments[0]))] +
                       [chunk(call_fragment(0, arguments=f)) for f in fragments[1:]] +
                       [chunk({}, "tool_calls")])
    check_grammar(events)
    assert arguments_of(events) == "".join(fragments)


def test_arguments_cut_at_max_tokens_stay_as_cut():
    """Cut by the token limit, the input is unfinished, not mistaken: a Write whose content was
    cut must not run as if whole."""
    events = translate([chunk(call_fragment(0, "c1", "Write", '{"file_path": "a.py"')),
                        chunk(call_fragment(0, arguments=', "content": "x = 1"')),
                        chunk({}, "length")])
    assert arguments_of(events) == '{"file_path": "a.py", "content": "x = 1"'
    assert [p for n, p in events if n == "message_delta"][0]["delta"]["stop_reason"] \
        == "max_tokens"


@pytest.mark.parametrize("arguments, meant", [
    ('{"code": "x = [1, ]", "n": 1,}', {"code": "x = [1, ]", "n": 1}),   # a string kept as it is
    ('{"a": {"b": [1', {"a": {"b": [1]}}),
    ('"{\\"a\\": 1,}"', {"a": 1}),
    ('{"a": 1', {"a": 1}),
    ('{"a": 1}{"a":1}\n{"a": 1}', {"a": 1}),                 # the same object again and again
    ("not json", {"arguments": "not json"}),
])
def test_whole_arguments_are_mended_the_same_way(arguments, meant):
    assert ccproxy.tool_input_from_arguments(arguments) == meant


def test_an_event_stream_answered_to_a_request_for_a_whole_answer_is_read_whole(openai_proxy,
                                                                               upstream):
    """A server that streams whatever it is asked had made every request for a whole answer a
    502 ("the answer is not JSON"): its events are translated as a stream's, then gathered."""
    events = sse_pieces([chunk({"role": "assistant", "content": "Let me check."}),
                         chunk(call_fragment(0, "call_a", "get_weather", '{"location": "Oslo"}')),
                         chunk({}, "tool_calls"), chunk(no_choices=True, usage=USAGE)])
    upstream.script = lambda r: Reply(200, pieces=events, content_type="text/event-stream")
    message = sdk(openai_proxy).messages.create(**REQUEST)
    assert upstream.requests[0]["json"].get("stream") in (None, False)
    assert [block.type for block in message.content] == ["text", "tool_use"]
    assert message.content[1].input == {"location": "Oslo"}
    assert message.stop_reason == "tool_use" and message.usage.output_tokens == 7
    upstream.script = lambda r: Reply(200, pieces=events[:1], content_type="text/event-stream")
    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk(openai_proxy).with_options(max_retries=0).messages.create(**REQUEST)
    assert caught.value.status_code == 502


def test_a_whole_answer_cut_at_max_tokens_keeps_its_call_unmended():
    call = {"id": "c1", "type": "function",
            "function": {"name": "Write", "arguments": '{"file_path": "a.py"'}}
    message = ccproxy.anthropic_message_from_openai(
        completion({"content": None, "tool_calls": [call]}, "length"), context())
    assert message["stop_reason"] == "max_tokens"
    assert message["content"][0]["input"] == {"arguments": '{"file_path": "a.py"'}


RUNAWAY_ARGUMENTS = "[" * 50000      # a model repeating a bracket until its output limit


@pytest.mark.parametrize("stream", [True, False])
def test_arguments_nested_past_what_python_reads_pass_as_they_came(openai_proxy, upstream,
                                                                   stream):
    """A small model stuck repeating `[` writes arguments that json.loads cannot read without
    running out of stack (RecursionError, not ValueError): they pass as they came, like other
    arguments that cannot be mended, instead of a 500 or a stream ending in an error."""
    call = {"id": "c1", "type": "function",
            "function": {"name": "Bash", "arguments": RUNAWAY_ARGUMENTS}}
    upstream.script = lambda r: stream_reply(sse_pieces([
        chunk(call_fragment(0, "c1", "Bash", RUNAWAY_ARGUMENTS)), chunk({}, "tool_calls")])) \
        if stream else json_reply(completion({"content": None, "tool_calls": [call]}, "tool_calls"))
    raw = urllib.request.urlopen(urllib.request.Request(
        openai_proxy.url + "/v1/messages", json.dumps(dict(REQUEST, stream=stream)).encode(),
        {"content-type": "application/json"}), timeout=30).read()
    if stream:
        events = parse_events(raw)
        check_grammar(events)
        assert arguments_of(events) == RUNAWAY_ARGUMENTS
    else:
        assert json.loads(raw)["content"][0]["input"] == {"arguments": RUNAWAY_ARGUMENTS}


def test_arguments_nested_too_deeply_are_no_object_to_mend():
    assert ccproxy.json_object_of(RUNAWAY_ARGUMENTS) is None
    assert ccproxy.repaired_json_object('{"a": ' + RUNAWAY_ARGUMENTS) is None
    assert ccproxy.tool_input_from_arguments(RUNAWAY_ARGUMENTS) == {
        "arguments": RUNAWAY_ARGUMENTS}


def test_sse_decoder_handles_crlf_comments_split_lines_and_multiline_data():
    decoder = ccproxy.SSEDecoder()
    assert decoder.feed(b": OPENROUTER PROCESSING\r\n\r\ndata: {\"a\"") == []
    assert decoder.feed(b":1}\r\n\r\nevent: error\ndata: x\ndata: y\n\n") == [
        ("message", '{"a":1}'), ("error", "x\ny")]


# --- request mapping ------------------------------------------------------------------------

def provider(name="openai", **extra):
    entry = {"name": name, "api_key": "k"}
    if name not in ccproxy.PROVIDER_PRESETS:
        entry.update(type="openai", api_base_url="http://127.0.0.1:1/v1")
    entry.update(extra)
    return ccproxy.build_config({"providers": [entry]}, "c", {}).providers[0]


def mapped(body, name="openai", model="gpt-4.1", **extra):
    body = dict({"model": "claude-x", "max_tokens": 100}, **body)
    return ccproxy.openai_request_from_anthropic(body, provider(name, **extra), model)


def test_full_conversation_maps_to_the_exact_chat_completions_body():
    body = {
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=1; cch=ab;"},
                   {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "Be exact."}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                         {"type": "image", "source": {"type": "base64",
                                                                      "media_type": "image/png",
                                                                      "data": "iVBO"}},
                                         {"type": "image", "source": {"type": "url",
                                                                      "url": "https://x/y.png"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"path": "a"}},
                {"type": "tool_use", "id": "toolu_2", "name": "Bash", "input": {}}]},
            {"role": "user", "content": [
                {"type": "text", "text": "also this"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "ENOENT",
                 "is_error": True},
                {"type": "tool_result", "tool_use_id": "toolu_1", "cache_control": {"type": "ephemeral"},
                 "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"},
                             {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                                          "data": "AA"}}]}]},
            {"role": "system", "content": "Mid-conversation note."},
            {"role": "user", "content": "go on"},
        ],
        "tools": [{"name": "Read", "description": "Reads", "input_schema": {"type": "object"},
                   "cache_control": {"type": "ephemeral"}},
                  {"name": "Bash", "input_schema": {"type": "object", "properties": {}}},
                  {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"], "temperature": 0.2, "top_p": 0.9, "top_k": 5,
        "metadata": {"user_id": "user_abc"}, "stream": True,
        "context_management": {"edits": []}, "service_tier": "auto",
    }
    assert mapped(body) == {
        "model": "gpt-4.1",
        "messages": [
            {"role": "system", "content": "You are terse.\n\nBe exact."},
            {"role": "user", "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "toolu_1", "type": "function",
                 "function": {"name": "Read", "arguments": '{"path":"a"}'}},
                {"id": "toolu_2", "type": "function", "function": {"name": "Bash", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: ENOENT"},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "a\nb"},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AA"}},
                {"type": "text", "text": "also this"}]},
            {"role": "system", "content": "Mid-conversation note."},
            {"role": "user", "content": "go on"},
        ],
        "max_tokens": 100, "temperature": 0.2, "top_p": 0.9, "stop": ["END"],
        "stream": True, "stream_options": {"include_usage": True},
        "tools": [{"type": "function", "function": {"name": "Read", "description": "Reads",
                                                    "parameters": {"type": "object"}}},
                  {"type": "function", "function": {"name": "Bash",
                                                    "parameters": {"type": "object", "properties": {}}}}],
        "tool_choice": "required", "parallel_tool_calls": False, "user": "user_abc",
    }


@pytest.mark.parametrize("choice, expected", [
    ({"type": "auto"}, {"tool_choice": "auto"}), ({"type": "none"}, {"tool_choice": "none"}),
    ({"type": "any"}, {"tool_choice": "required"}),
    ({"type": "tool", "name": "Read"}, {"tool_choice": {"type": "function",
                                                         "function": {"name": "Read"}}}),
])
def test_tool_choice(choice, expected):
    request = mapped({"messages": [{"role": "user", "content": "x"}], "tool_choice": choice,
                      "tools": [{"name": "Read", "input_schema": {"type": "object"}}]})
    assert {k: request[k] for k in expected} == expected


def test_no_tools_means_no_tool_choice():
    request = mapped({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "any"},
                      "tools": [{"type": "web_search_20250305", "name": "web_search"}]})
    assert "tools" not in request and "tool_choice" not in request


def test_system_message_between_calls_and_results_waits_for_the_results():
    request = mapped({"messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
        {"role": "system", "content": "note"},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]}]})
    assert [m["role"] for m in request["messages"]] == ["user", "assistant", "tool", "system"]


def test_orphan_results_become_text_and_missing_results_are_filled():
    request = mapped({"messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}},
                                          {"type": "tool_use", "id": "t2", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"},
                                     {"type": "tool_result", "tool_use_id": "t9", "content": "late"}]}]})
    assert request["messages"][2:] == [
        {"role": "tool", "tool_call_id": "t1", "content": "ok"},
        {"role": "tool", "tool_call_id": "t2", "content": "[no result: the tool call was interrupted]"},
        {"role": "user", "content": "[tool result t9]\nlate"}]


def test_adjacent_user_turns_merge_and_empty_assistant_turns_drop():
    request = mapped({"messages": [{"role": "user", "content": "a"},
                                   {"role": "assistant", "content": [{"type": "text", "text": " "}]},
                                   {"role": "user", "content": "b"}]})
    assert request["messages"] == [{"role": "user", "content": "a\nb"}]


@pytest.mark.parametrize("model, field", [("o3-mini", "max_completion_tokens"),
                                          ("gpt-5", "max_completion_tokens"),
                                          ("gpt-4.1", "max_tokens")])
def test_openai_reasoning_models_take_max_completion_tokens_and_no_sampling(model, field):
    request = mapped({"messages": [{"role": "user", "content": "x"}], "temperature": 0.5,
                      "top_p": 0.5, "thinking": {"type": "enabled", "budget_tokens": 31999}},
                     model=model)
    assert request[field] == 100
    reasoning = field == "max_completion_tokens"
    assert ("temperature" in request) is not reasoning
    assert request.get("reasoning_effort") == ("high" if reasoning else None)


@pytest.mark.parametrize("thinking, effort", [
    ({"type": "enabled", "budget_tokens": 1024}, "low"),
    ({"type": "enabled", "budget_tokens": 10000}, "medium"),
    ({"type": "enabled", "budget_tokens": 31999}, "high"),
    ({"type": "enabled", "budget_tokens": 64000}, "high"),     # xhigh: o4-mini stops at high
    ({"type": "adaptive"}, "high"), ({"type": "disabled"}, "low")])    # the least o4-mini does
def test_thinking_maps_to_reasoning_effort(thinking, effort):
    request = mapped({"messages": [{"role": "user", "content": "x"}], "thinking": thinking},
                     model="o4-mini")
    assert request.get("reasoning_effort") == effort


@pytest.mark.parametrize("preset, model, asked, sent", [
    ("openai", "gpt-5.2", "xhigh", {"reasoning_effort": "xhigh"}),
    ("openai", "gpt-5.2", "max", {"reasoning_effort": "xhigh"}),
    ("openai", "gpt-5-mini", "xhigh", {"reasoning_effort": "high"}),
    ("openai", "gpt-5-mini", "low", {"reasoning_effort": "low"}),
    ("openrouter", "z-ai/glm-5", "xhigh", {"reasoning": {"effort": "xhigh"}}),
    ("openrouter", "z-ai/glm-5", "max", {"reasoning": {"effort": "xhigh"}}),
    ("groq", "openai/gpt-oss-120b", "xhigh", {"reasoning_effort": "high"}),
    ("groq", "llama-3.3-70b-versatile", "high", {}),             # no effort scale: none sent
    ("xai", "grok-4.7", "xhigh", {"reasoning_effort": "xhigh"}),
    ("xai", "grok-3-mini", "medium", {"reasoning_effort": "low"}),
    ("deepseek", "deepseek-flash", "xhigh", {"thinking": {"type": "enabled"},   # it maps
                                             "reasoning_effort": "xhigh"}),  # each itself
    ("mistral", "mistral-small-latest", "low", {"reasoning_effort": "high"}),
    ("mistral", "mistral-small-2603", "max", {"reasoning_effort": "high"}),
    ("mistral", "mistral-medium-3-5", "medium", {"reasoning_effort": "high"}),
    ("mistral", "mistral-small-2506", "high", {}),        # Small 3.2: no reasoning_effort
    ("mistral", "mistral-large-latest", "high", {}),
])
def test_effort_is_mapped_onto_each_providers_own_scale(preset, model, asked, sent):
    request = mapped({"messages": [{"role": "user", "content": "x"}],
                      "thinking": {"type": "adaptive"}, "output_config": {"effort": asked}},
                     preset, model=model)
    fields = {k: request[k] for k in ("reasoning_effort", "reasoning", "thinking") if k in request}
    assert fields == sent


@pytest.mark.parametrize("preset, model, thinking, sent", [
    ("openai", "gpt-5", {"type": "disabled"}, {"reasoning_effort": "minimal"}),
    ("openai", "gpt-5-mini-2025-08-07", {"type": "disabled"}, {"reasoning_effort": "minimal"}),
    ("openai", "gpt-5.1", {"type": "disabled"}, {"reasoning_effort": "none"}),
    ("openai", "gpt-5.4-nano", {"type": "disabled"}, {"reasoning_effort": "none"}),
    ("openai", "o4-mini", {"type": "disabled"}, {"reasoning_effort": "low"}),
    ("openai", "gpt-5-codex", {"type": "disabled"}, {}),      # its default: none is unknown
    ("openai", "gpt-5.3", {"type": "disabled"}, {}),
    ("openai", "gpt-4.1", {"type": "disabled"}, {}),          # no reasoning to turn off
    ("openai", "gpt-5", None, {}),                            # not asked: the model decides
    ("xai", "grok-4.7", {"type": "disabled"}, {}),
    ("groq", "openai/gpt-oss-120b", {"type": "disabled"}, {"reasoning_effort": "low"}),
    ("openrouter", "z-ai/glm-4.5-air", {"type": "disabled"}, {"reasoning": {"effort": "none"}}),
])
def test_thinking_turned_off_asks_for_the_least_reasoning_the_model_does(preset, model,
                                                                        thinking, sent):
    """Claude Code's side requests (titles, auto mode's checks) turn thinking off and allow a
    few dozen output tokens, which a reasoning model at its default effort can spend before it
    writes a word."""
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 64}
    if thinking:
        body["thinking"] = thinking
    request = mapped(body, preset, model=model)
    fields = {k: request[k] for k in ("reasoning_effort", "reasoning", "thinking") if k in request}
    assert fields == sent


@pytest.mark.parametrize("thinking", [None, {"type": "disabled"}])
def test_deepseek_is_told_not_to_think_when_the_request_does_not_ask(thinking):
    """DeepSeek thinks at high effort unless told not to (api-docs.deepseek.com/guides/
    thinking_mode); Anthropic's models think only when asked."""
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 64}
    if thinking:
        body["thinking"] = thinking
    request = mapped(body, "deepseek", model="deepseek-flash")
    assert request["thinking"] == {"type": "disabled"} and "reasoning_effort" not in request


def test_deepseek_preset():
    body = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "see"},
                                     {"type": "image", "source": {"type": "url", "url": "u"}}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "plan", "signature": "s"},
                                          {"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]}],
        "max_tokens": 500000, "thinking": {"type": "enabled", "budget_tokens": 2000}, "top_k": 3}
    request = mapped(body, "deepseek", model="deepseek-v4-pro")
    assert request["max_tokens"] == 384000                  # the model's published output limit
    assert (request["thinking"], request["reasoning_effort"]) == ({"type": "enabled"}, "low")
    assert request["messages"][0]["content"] == "see\n[image omitted]"     # Pro takes none
    assert request["messages"][1]["reasoning_content"] == "plan"
    assert "top_k" not in request


@pytest.mark.parametrize("model", ["deepseek-flash", "deepseek-v4-flash",
                                   "deepseek-v4-flash-vision-exp"])
def test_deepseek_flash_takes_images_in_messages_and_tool_results(model):
    """DeepSeek's Flash model (and the retired names it answers) sees images over the OpenAI
    format, a screenshot in a tool result included; Pro gets text in their place."""
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBOR"}}
    body = {"max_tokens": 50, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "see"}, image]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "shot",
                                           "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": [image]}]}]}
    sent = json.dumps(mapped(body, "deepseek", model=model))
    assert sent.count("data:image/png;base64,iVBOR") == 2 and "image omitted" not in sent
    sent = json.dumps(mapped(body, "deepseek", model="deepseek-v4-pro"))
    assert "iVBOR" not in sent and sent.count("[image omitted]") == 2


def test_openrouter_preset():
    request = mapped({"messages": [{"role": "user", "content": "x"}], "top_k": 3,
                      "thinking": {"type": "enabled", "budget_tokens": 2000}}, "openrouter")
    assert request["reasoning"] == {"max_tokens": 2000} and request["top_k"] == 3
    headers = ccproxy.openai_request_headers(provider("openrouter"))
    assert headers["HTTP-Referer"] and headers["X-Title"] == "ccproxy.py"
    assert headers["authorization"] == "Bearer k"


def test_groq_preset_drops_schema_keys():
    request = mapped({"messages": [{"role": "user", "content": "x"}],
                      "tools": [{"name": "f", "input_schema": {"$schema": "http://json-schema.org/x",
                                                               "type": "object"}}]}, "groq")
    assert request["tools"][0]["function"]["parameters"] == {"type": "object"}


def test_mistral_preset_maps_tool_ids_both_ways_consistently():
    body = {"messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01ABCDEFGH", "name": "f",
                                           "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01ABCDEFGH",
                                      "content": "ok"}, {"type": "text", "text": "and?"}]}]}
    messages = mapped(body, "mistral")["messages"]
    call_id = messages[1]["tool_calls"][0]["id"]
    assert len(call_id) == 9 and call_id.isalnum()
    assert messages[2] == {"role": "tool", "tool_call_id": call_id, "content": "ok"}
    assert messages[3]["role"] == "assistant" and messages[4] == {"role": "user", "content": "and?"}
    assert ccproxy.openai_tool_id(call_id, "alnum9") == call_id


def test_ollama_needs_no_key_and_custom_servers_take_any_base_url():
    assert "authorization" not in ccproxy.openai_request_headers(provider("ollama", api_key=""))
    assert ccproxy.openai_request_headers(provider("ollama", api_key="k"))["authorization"] == "Bearer k"
    custom = provider("vllm", api_base_url="http://127.0.0.1:8000/v1/chat/completions")
    assert ccproxy.openai_endpoint_url(custom.base_url) == "http://127.0.0.1:8000/v1/chat/completions"
    assert ccproxy.openai_endpoint_url("http://h/v1/") == "http://h/v1/chat/completions"


def test_config_max_tokens_cap_and_long_user_ids_and_long_tool_names():
    long_name = "mcp__server__" + "x" * 80
    request = mapped({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000,
                      "metadata": {"user_id": '{"device":"abc","session":"' + "s" * 100 + '"}'},
                      "tools": [{"name": long_name, "input_schema": {"type": "object"}}]},
                     max_tokens=1000)
    assert request["max_tokens"] == 1000
    assert request["user"].startswith("u_") and len(request["user"]) == 34
    name = request["tools"][0]["function"]["name"]
    assert len(name) <= 64 and ccproxy.OPENAI_TOOL_NAME_RE.match(name)


def test_unexpressible_content_is_a_400_naming_the_block():
    with pytest.raises(ccproxy.InvalidRequestError, match=r"messages\[0\].content\[0\].*file"):
        mapped({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "file", "file_id": "f1"}}]}]})
    with pytest.raises(ccproxy.InvalidRequestError, match="'hologram'"):
        mapped({"messages": [{"role": "user", "content": [{"type": "hologram"}]}]})


def all_patterns(node):
    """Every `pattern` keyword in a schema (property names called "pattern" are not)."""
    if isinstance(node, list):
        return [p for child in node for p in all_patterns(child)]
    if not isinstance(node, dict):
        return []
    found = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
    for key, value in node.items():
        children = value.values() if key in ("properties", "$defs", "definitions") and \
            isinstance(value, dict) else [value]
        found += [p for child in children for p in all_patterns(child)]
    return found


UNICODE_CLASS_TOOL = {"name": "Artifact", "input_schema": {"type": "object", "properties": {
    "title": {"type": "string", "pattern": "^[^\\p{Cc}]{1,80}$"},
    "pattern": {"type": "string", "description": "a property that is called pattern"},
    "slug": {"type": "string", "pattern": "^[a-z0-9-]+$"},
    "items": {"type": "array", "items": {"anyOf": [
        {"type": "string", "pattern": "\\P{L}+"}, {"type": "integer"}]}}},
    "required": ["title"]}}


def test_patterns_openai_cannot_compile_are_left_out_and_the_rest_kept():
    tool = ccproxy.openai_tools_from_anthropic([UNICODE_CLASS_TOOL], provider().quirks)[0]
    parameters = tool["function"]["parameters"]
    assert all_patterns(UNICODE_CLASS_TOOL["input_schema"]) == [
        "^[^\\p{Cc}]{1,80}$", "^[a-z0-9-]+$", "\\P{L}+"]
    assert all_patterns(parameters) == ["^[a-z0-9-]+$"]
    assert parameters["properties"]["pattern"] == {
        "type": "string", "description": "a property that is called pattern"}
    assert parameters["properties"]["title"] == {"type": "string"}
    assert parameters["required"] == ["title"]


def test_a_pattern_python_only_warns_about_is_kept_and_nothing_is_printed():
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": "[[a]]+"}}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # a FutureWarning would be printed by the server
        assert ccproxy.openai_schema(schema) == schema


@pytest.mark.parametrize("version", CLAUDE_CODE_VERSIONS)
def test_every_claude_code_tool_schema_compiles_for_openai(claude_code_requests, version):
    body = claude_code_requests[version][0]["json"]
    request = ccproxy.openai_request_from_anthropic(body, provider(), "gpt-4.1")
    for tool in request["tools"]:
        for pattern in all_patterns(tool["function"]["parameters"]):
            re.compile(pattern)
    kept = {t["function"]["name"]: t["function"]["parameters"] for t in request["tools"]}
    for tool in body["tools"]:
        if "input_schema" in tool and not any(ccproxy.regex_problems(p)[0] for p in all_patterns(
                tool["input_schema"])):
            assert kept[ccproxy.openai_tool_name(tool["name"])] == tool["input_schema"]


@pytest.mark.parametrize("version", CLAUDE_CODE_VERSIONS)
@pytest.mark.parametrize("name", ["mistral", "openrouter", "groq", "my-vllm"])
def test_claude_code_system_messages_join_the_conversation_where_only_one_first_is_taken(
        claude_code_requests, version, name):
    """Claude Code ends every request with a system message; Mistral refuses one anywhere but
    first, as do many chat templates. Each joins the message before it, word for word."""
    body = claude_code_requests[version][0]["json"]
    assert body["messages"][-1]["role"] == "system"
    request = ccproxy.openai_request_from_anthropic(body, provider(name), "m")
    assert [m["role"] for m in request["messages"]][:2] == ["system", "user"]
    assert "system" not in [m["role"] for m in request["messages"][1:]]
    assert mistral_order_problem(request["messages"]) is None
    if name == "mistral":                                  # and no field Mistral does not name
        assert mistral_problem(ccproxy.openai_request_from_anthropic(
            dict(body, stream=True), provider(name), "m")) is None
    last = body["messages"][-1]["content"]
    text = last if isinstance(last, str) else last[0]["text"]
    assert request["messages"][-1]["content"].endswith(text)


TITLE_SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}},
                "required": ["title"], "additionalProperties": False}


def test_a_json_schema_output_format_is_the_servers_response_format():
    """Claude Code asks for its session titles (and `--json-schema` answers) so."""
    body = {"model": "x", "max_tokens": 10, "system": "Name the session.",
            "messages": [{"role": "user", "content": "hi"}],
            "output_config": {"format": {"type": "json_schema", "schema": TITLE_SCHEMA}}}
    request = mapped(body)
    assert request["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "structured_output", "schema": TITLE_SCHEMA, "strict": True}}
    assert request["messages"][0] == {"role": "system", "content": "Name the session."}


def test_deepseek_which_takes_json_mode_only_gets_it_with_the_schema_said():
    """DeepSeek takes response_format json_object only, and wants "json" in the prompt."""
    body = {"model": "x", "max_tokens": 10, "system": "Name the session.",
            "messages": [{"role": "user", "content": "hi"}],
            "output_config": {"format": {"type": "json_schema", "schema": TITLE_SCHEMA}}}
    request = mapped(body, name="deepseek", model="deepseek-flash")
    assert request["response_format"] == {"type": "json_object"}
    assert request["messages"][0] == {"role": "system", "content": (
        "Name the session.\nAnswer with one JSON object that follows this JSON schema: "
        + json.dumps(TITLE_SCHEMA))}
    del body["system"]
    assert mapped(body, name="deepseek", model="deepseek-flash")["messages"][0]["role"] == "system"


def test_system_messages_stay_in_place_where_any_is_taken():
    body = {"model": "x", "max_tokens": 10, "messages": [
        {"role": "user", "content": "hi"}, {"role": "system", "content": "# Environment"}]}
    assert [m["role"] for m in mapped(body)["messages"]] == ["user", "system"]     # openai


def test_a_system_message_joins_a_tool_result_or_follows_an_assistant_as_the_users():
    body = {"model": "x", "max_tokens": 10, "system": "main", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f",
                                           "input": {}}]},
        {"role": "system", "content": "between"},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": "ok"}]},
        {"role": "system", "content": "after the result"},
        {"role": "assistant", "content": "done"},
        {"role": "system", "content": "after the answer"}]}
    messages = mapped(body, name="mistral")["messages"]
    assert [(m["role"], m.get("content")) for m in messages if m["role"] != "assistant"] == [
        ("system", "main"), ("user", "hi"), ("tool", "ok\nbetween\nafter the result"),
        ("user", "after the answer")]
    assert mistral_order_problem(messages) is None


@pytest.mark.parametrize("version", CLAUDE_CODE_VERSIONS)
def test_claude_code_request_maps_cleanly(claude_code_requests, version):
    body = claude_code_requests[version][0]["json"]
    request = ccproxy.openai_request_from_anthropic(body, provider(), "gpt-4.1")
    json.dumps(request)
    assert request["messages"][0]["role"] == "system"
    assert not any("cache_control" in json.dumps(m) for m in request["messages"])
    assert all(t["type"] == "function" for t in request["tools"])
    assert set(request) <= {"model", "messages", "max_tokens", "stream", "stream_options", "tools",
                            "tool_choice", "user", "temperature", "top_p", "stop",
                            "parallel_tool_calls"}


# --- through the proxy, with the anthropic SDK as the client -------------------------------------

PRESETS = ["openai", "deepseek", "openrouter", "groq", "mistral", "xai", "ollama", "custom"]


def preset_provider(preset, upstream, **extra):
    entry = {"name": preset, "api_base_url": upstream.url + "/v1", "api_key": OPENAI_KEY,
             "models": ["gpt-test"]}
    if preset == "custom":
        entry.update(type="openai", api_base_url=upstream.url + "/v1/chat/completions")
    entry.update(extra)
    return entry


def chat_request(upstream):
    """The request for the answer (the ollama preset also has Ollama load the model and say
    its context length: /api/generate, /api/ps)."""
    (sent,) = [r for r in upstream.requests if not r["path"].startswith("/api/")]
    return sent


def with_signature(blocks, preset):
    """Expected blocks with the thinking signature ccproxy gives this provider."""
    return [dict(b, signature="ccpx1." + preset) if b["type"] == "thinking" else b for b in blocks]


@pytest.fixture
def openai_proxy(start_proxy, upstream):
    return start_proxy({"providers": [preset_provider("openai", upstream)]})


REQUEST = dict(model="claude-test-model", max_tokens=200,
               messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
               tools=[{"name": "get_weather", "description": "Weather",
                       "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}}},
                      {"name": "get_time", "input_schema": {"type": "object"}}])


def block_dicts(message):
    return [b.model_dump(exclude_none=True, exclude={"citations", "caller"}) for b in message.content]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_sdk_stream_scenarios(start_proxy, upstream, name, preset):
    proxy = start_proxy({"providers": [preset_provider(preset, upstream)]})
    upstream.script = lambda r: stream_reply(sse_pieces(SCENARIOS[name]))
    with sdk(proxy).messages.stream(**REQUEST) as stream:
        final = stream.get_final_message()
    assert block_dicts(final) == with_signature(EXPECTED_CONTENT[name], preset)
    assert final.model == "claude-test-model"
    sent = chat_request(upstream)
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["authorization"] == "Bearer " + OPENAI_KEY
    assert sent["json"]["stream"] is True and sent["json"]["model"] == "gpt-test"
    assert sent["json"].get("stream_options") == (      # Mistral's API refuses the field
        None if preset == "mistral" else {"include_usage": True})
    expected_stop = "tool_use" if any(b["type"] == "tool_use" for b in EXPECTED_CONTENT[name]) \
        else "end_turn"
    assert final.stop_reason == expected_stop


def test_sdk_stream_usage_reaches_the_final_message(openai_proxy, upstream):
    upstream.script = lambda r: stream_reply(sse_pieces(SCENARIOS["plain_text"]))
    with sdk(openai_proxy).messages.stream(**REQUEST) as stream:
        final = stream.get_final_message()
    assert final.usage.input_tokens == 20 and final.usage.output_tokens == 7
    assert final.usage.cache_read_input_tokens == 100


@pytest.mark.parametrize("later", [True, False], ids=["in a later receive", "in the same one"])
def test_what_a_provider_sends_after_done_is_no_answer(openai_proxy, upstream, later):
    """[DONE] ends the stream: junk or an error event a provider sends after it would have
    turned a whole answer into an error event (the client's SDK then raises, and Claude Code
    asks again); it is dropped."""
    after = [b"data: {broken\n\n", b'event: error\ndata: {"error": {"message": "late"}}\n\n']
    pieces = sse_pieces(SCENARIOS["plain_text"])
    reply = stream_reply(pieces + after if later else [b"".join(pieces + after)],
                         pause_before=len(pieces) if later else None)
    upstream.script = lambda r: reply
    with sdk(openai_proxy).messages.stream(**REQUEST) as stream:
        for event in stream:
            if event.type == "text":          # the text is out: the junk may come now
                reply.release.set()
        final = stream.get_final_message()
    assert block_dicts(final) == [{"type": "text", "text": "Hello"}]
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 7


NON_STREAM_CASES = {
    "text": (completion({"content": "Hello"}), [{"type": "text", "text": "Hello"}], "end_turn"),
    "tools": (completion({"content": None, "tool_calls": [
        {"id": "call_a", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"location":"Oslo"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": ""}}]},
        "tool_calls"),
        [{"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"location": "Oslo"}},
         {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {}}], "tool_use"),
    "reasoning_text_and_tool_in_any_order": (completion({
        "tool_calls": [{"id": "call_a", "type": "function",
                        "function": {"name": "get_time", "arguments": '{"tz":"UTC",}'}}],
        "content": "Checking.", "reasoning_content": "Plan."}, "stop"),
        [{"type": "thinking", "thinking": "Plan.", "signature": "ccpx1.openai"},
         {"type": "text", "text": "Checking."},
         {"type": "tool_use", "id": "call_a", "name": "get_time", "input": {"tz": "UTC"}}],
        "tool_use"),
    "length": (completion({"content": "Trunc"}, "length"), [{"type": "text", "text": "Trunc"}],
               "max_tokens"),
    "content_filter": (completion({"content": ""}, "content_filter"), [], "refusal"),
}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", sorted(NON_STREAM_CASES))
def test_sdk_non_stream_cases(start_proxy, upstream, name, preset):
    proxy = start_proxy({"providers": [preset_provider(preset, upstream)]})
    answer, expected, stop_reason = NON_STREAM_CASES[name]
    upstream.script = lambda r: json_reply(answer)
    message = sdk(proxy).messages.create(**REQUEST)
    assert block_dicts(message) == with_signature(expected, preset)
    assert message.stop_reason == stop_reason
    assert re.fullmatch("msg_[0-9a-f]{24}", message.id) and message.model == "claude-test-model"
    assert "stream" not in chat_request(upstream)["json"]


def test_ids_the_proxy_makes_have_anthropics_shape_and_do_not_repeat():
    for prefix in ("msg_", "toolu_", "srvtoolu_"):
        ids = {ccproxy.random_id(prefix) for _ in range(20000)}
        assert len(ids) == 20000
        assert all(re.fullmatch(prefix + "[0-9a-f]{24}", made) for made in ids)
    random.seed(7)                      # a program around ccproxy seeds random: no repeats
    first = ccproxy.random_id("msg_")
    random.seed(7)
    assert ccproxy.random_id("msg_") != first


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_makes_ids_of_its_own():
    """(The child only writes its id and exits: the fork warning Python 3.12+ gives a process
    with threads does not apply.)"""
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:                      # the child: its next id, then out at once
        os.write(writing, ccproxy.random_id("msg_").encode())
        os._exit(0)
    os.close(writing)
    os.waitpid(child, 0)
    assert os.read(reading, 100).decode() != ccproxy.random_id("msg_")
    os.close(reading)


def test_sdk_non_stream_usage_counts_cache_reads_apart(openai_proxy, upstream):
    upstream.script = lambda r: json_reply(completion({"content": "x"}, usage=USAGE))
    usage = sdk(openai_proxy).messages.create(**REQUEST).usage
    assert (usage.input_tokens, usage.output_tokens, usage.cache_read_input_tokens) == (20, 7, 100)


def test_a_count_no_model_could_give_is_no_count(openai_proxy, upstream):
    """A count over a billion tokens (an unsigned counter gone below zero, say) or an integer
    of 5,000 digits, which Python cannot read, fills neither the client's context meter nor
    the usage counters: it counts as none, as a negative or a string does."""
    usage = {"prompt_tokens": 2 ** 64 - 1, "completion_tokens": 7,
             "prompt_tokens_details": {"cached_tokens": -3}}
    body = json.dumps(completion({"content": "x"}, usage=usage)).replace(
        '"completion_tokens": 7', '"completion_tokens": 7, "total_tokens": %s' % ("9" * 5000))
    upstream.script = lambda r: json_reply(body.encode())
    answer = sdk(openai_proxy).messages.create(**REQUEST).usage
    assert (answer.input_tokens, answer.output_tokens, answer.cache_read_input_tokens) == (0, 7, 0)
    totals = sdk(openai_proxy).get("/status", cast_to=object)["usage"]["by_model"][0]
    assert (totals["input_tokens"], totals["output_tokens"]) == (0, 7)


def test_a_json_answer_to_a_stream_request_is_streamed(openai_proxy, upstream):
    upstream.script = lambda r: json_reply(NON_STREAM_CASES["tools"][0])
    with sdk(openai_proxy).messages.stream(**REQUEST) as stream:
        final = stream.get_final_message()
    assert block_dicts(final) == NON_STREAM_CASES["tools"][1]


def openai_error_body(message, code=None):
    return {"error": {"message": message, "type": "invalid_request_error", "param": None,
                      "code": code}}


@pytest.mark.parametrize("status, error_class, error_type, client_status", [
    (400, anthropic.BadRequestError, "invalid_request_error", 400),
    (401, anthropic.AuthenticationError, "authentication_error", 401),
    (403, anthropic.PermissionDeniedError, "permission_error", 403),
    (404, anthropic.InternalServerError, "api_error", 502),
    (429, anthropic.RateLimitError, "rate_limit_error", 429),
    (500, anthropic.InternalServerError, "api_error", 500),
    (503, anthropic.APIStatusError, "overloaded_error", 529),
])
def test_upstream_errors_are_mapped(openai_proxy, upstream, status, error_class, error_type,
                                    client_status):
    upstream.script = lambda r: json_reply(openai_error_body("went wrong " + OPENAI_KEY), status,
                                           headers={"retry-after": "3"})
    with pytest.raises(error_class) as caught:
        sdk(openai_proxy).messages.create(**REQUEST)
    assert caught.value.status_code == client_status
    assert caught.value.body["error"]["type"] == error_type
    message = caught.value.body["error"]["message"]
    assert "openai: HTTP %d: went wrong" % status in message
    assert OPENAI_KEY not in json.dumps(caught.value.body)
    # a key refused or nothing at the address: named as configuration, not to be retried
    config_fix = {401: "openai refused its API key; fix providers[0].api_key in",
                  403: "openai refused its API key; fix providers[0].api_key in",
                  404: "openai has nothing at that address; check providers[0].api_base_url in"}
    if status in config_fix:
        assert message.startswith(config_fix[status])
        assert caught.value.response.headers["x-should-retry"] == "false"
    else:
        assert "x-should-retry" not in caught.value.response.headers
    if status == 429:
        assert caught.value.response.headers["retry-after"] == "3"


def test_a_server_for_coding_agents_only_is_told_to_use_its_anthropic_address(start_proxy,
                                                                             upstream):
    """Kimi For Coding's OpenAI-compatible API answers an agent it does not know with a 403;
    the key is not the problem, and its Anthropic API gets Claude Code's own User-Agent."""
    upstream.script = lambda r: json_reply({"error": {
        "message": "Kimi For Coding is currently only available for Coding Agents such as Kimi "
                   "CLI, Claude Code, Roo Code, Kilo Code, etc.",
        "type": "access_terminated_error"}}, 403)
    proxy = start_proxy({"providers": [{"name": "kimi-code", "type": "openai", "api_key": "k",
                                       "api_base_url": upstream.url + "/coding/v1"}]})
    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        sdk(proxy).messages.create(**REQUEST)
    message = caught.value.body["error"]["message"]
    assert message.startswith(
        'kimi-code serves only the coding agents it knows, whatever the key: set '
        'providers[0].type to "anthropic" and providers[0].api_base_url to its Anthropic '
        'address (Kimi For Coding: https://api.kimi.com/coding)')
    assert "refused its API key" not in message


def test_a_404_at_a_base_url_without_v1_says_to_try_it(start_proxy, upstream):
    upstream.script = lambda r: json_reply({"detail": "Not Found"}, 404)
    proxy = start_proxy({"providers": [{"name": "vllm", "type": "openai",
                                       "api_base_url": upstream.url + "/"}]})
    with pytest.raises(anthropic.InternalServerError) as caught:
        sdk(proxy).messages.create(**REQUEST)
    assert caught.value.body["error"]["message"].startswith(
        "vllm has nothing at that address: its API is most often under /v1, try %s/v1; check "
        "providers[0].api_base_url" % upstream.url)


def test_html_error_page_is_mapped(openai_proxy, upstream):
    upstream.script = lambda r: Reply(502, b"<html><h1>502 Bad Gateway</h1></html>",
                                      content_type="text/html")
    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk(openai_proxy).messages.create(**REQUEST)
    assert caught.value.status_code == 502
    assert caught.value.body["error"]["message"] == "openai: HTTP 502: 502 Bad Gateway"


def test_error_inside_a_200_answer_is_mapped(openai_proxy, upstream):
    upstream.script = lambda r: json_reply({"error": {"message": "Provider returned error",
                                                      "code": 429}})
    with pytest.raises(anthropic.RateLimitError):
        sdk(openai_proxy).messages.create(**REQUEST)


def test_an_answer_without_choices_is_a_502(openai_proxy, upstream):
    upstream.script = lambda r: json_reply({"id": "x", "choices": []})
    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk(openai_proxy).messages.create(**REQUEST)
    assert caught.value.status_code == 502 and "no choices" in caught.value.body["error"]["message"]


@pytest.mark.parametrize("wording", [
    "This model's maximum context length is 128000 tokens.",
    "the request exceeds the available context size, try increasing it",     # llama.cpp, older
    "Please reduce the length of the messages or completion.",                # Groq
    # the rest of what Claude Code 2.1.332 reads as an overflow (the list in its binary)
    "litellm.ContextWindowExceededError: litellm.BadRequestError: too long",
    "Range of input length should be [1, 129024]",                            # Qwen
    "Invalid request: Your request exceeded model token limit: 131072",       # Kimi
    "Input is too long for requested model.",                                 # Bedrock
    "Input token length too long", "This model's maximum context limit is 8192",
    "The maximum prompt length is 8192", "prompt exceeds max length",
    "tokens in request more than max tokens allowed",
    "Requested 200000 tokens but model only supports up to 131072",
    "The context exceeds your deployment's limit",
])
def test_context_overflow_says_prompt_is_too_long(openai_proxy, upstream, wording):
    upstream.script = lambda r: json_reply(openai_error_body(wording), 400)   # no code to go by
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(openai_proxy).messages.create(**REQUEST)
    assert caught.value.body["error"]["message"].startswith("prompt is too long: ")


@pytest.mark.parametrize("wording, numbers", [
    ("This model's maximum context length is 131072 tokens. However, you requested 140000 "
     "tokens (139000 in the messages, 1000 in the completion).", "140000 tokens > 131072"),
    ("Input tokens exceed the configured limit of 272,000 tokens. Your messages resulted in "
     "297,006 tokens.", "297006 tokens > 272000"),
    ("request (4476 tokens) exceeds the available context size (4096 tokens)",   # llama.cpp
     "4476 tokens > 4096"),
    ("The decoder prompt (length 9254) is longer than the maximum model length of 4096. Make "
     "sure that `max_model_len` is no smaller than the number of text tokens.",  # vLLM
     "9254 tokens > 4096"),
])
def test_a_providers_overflow_carries_its_numbers_in_anthropics_form(openai_proxy, upstream,
                                                                     wording, numbers):
    upstream.script = lambda r: json_reply(openai_error_body(wording), 400)
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(openai_proxy).messages.create(**REQUEST)
    message = caught.value.body["error"]["message"]
    assert message.startswith("prompt is too long: %s maximum (openai: HTTP 400: " % numbers)


@pytest.mark.parametrize("wording, numbers", [
    ("This model's maximum context length is 32768 tokens. However, you requested 47000 tokens "
     "(15000 in the messages, 32000 in the completion). Please reduce the length of the "
     "messages or completion.", "15000 + 32000 > 32768"),                     # OpenAI, vLLM
    ("'max_tokens' or 'max_completion_tokens' is too large: 32000. This model's maximum context "
     "length is 32768 tokens and your request has 15000 input tokens (32000 > 32768 - 15000).",
     "15000 + 32000 > 32768"),                                               # vLLM, newer
    ("This endpoint's maximum context length is 131072 tokens. However, you requested about "
     "170000 tokens (100000 of text input, 6000 of tool input, 64000 in the output). Please "
     "reduce the length of either one", "106000 + 64000 > 131072"),          # OpenRouter
    ("Input validation error: `inputs` tokens + `max_new_tokens` must be <= 32769. Given: 1000 "
     "`inputs` tokens and 32000 `max_new_tokens`", "1000 + 32000 > 32769"),  # TGI (Together)
])
def test_an_overflow_by_max_tokens_is_asked_again_with_the_room_the_input_leaves(
        openai_proxy, upstream, wording, numbers):
    """The server says its context length and the input: the request goes again at once with
    the room the input leaves, and the length is remembered for the model. (Told in
    Anthropic's words, Claude Code asked again itself, as one of its retries, at every turn.)"""
    inputs, asked, window = map(int, re.findall(r"\d+", numbers))
    upstream.script = lambda r: json_reply(openai_error_body(wording), 400) \
        if r["json"]["max_tokens"] + inputs > window else json_reply(completion({"content": "ok"}))
    message = sdk(openai_proxy).messages.create(**dict(REQUEST, max_tokens=asked), timeout=30)
    assert message.content[0].text == "ok"
    assert [r["json"]["max_tokens"] for r in upstream.requests] == [asked, window - inputs]
    views = json.loads(urllib.request.urlopen(openai_proxy.url + "/providers", timeout=10).read())
    assert views["providers"][0]["learned_context_lengths"] == {
        upstream.requests[0]["json"]["model"]: window}


def test_a_server_that_refuses_the_room_it_gave_has_its_overflow_said_in_anthropics_words(
        openai_proxy, upstream):
    """Asked again once; refused again, the client gets Anthropic's words for an overflow
    that max_tokens makes, on which Claude Code lowers max_tokens itself."""
    upstream.script = lambda r: json_reply(openai_error_body(
        "This model's maximum context length is 32768 tokens. However, you requested 47000 "
        "tokens (15000 in the messages, 32000 in the completion)."), 400)
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(openai_proxy).messages.create(**dict(REQUEST, max_tokens=32000), timeout=30)
    assert caught.value.body["error"]["message"].startswith(
        "input length and `max_tokens` exceed context limit: 15000 + 32000 > 32768, decrease "
        "input length or `max_tokens` and try again (openai: HTTP 400: ")
    assert [r["json"]["max_tokens"] for r in upstream.requests] == [32000, 17768]


def test_a_learned_context_length_lowers_max_tokens_before_the_request_goes():
    """With room for an answer left, max_tokens is lowered to it, a thinking budget within
    it; with too little, the request goes as it is, for the server to say the prompt is too
    long (Claude Code then compacts)."""
    provider = ccproxy.build_config({"providers": [VLLM]}, "c", {}).providers[0]
    provider.learned_context_lengths["m"] = 32768
    body = {"model": "m", "max_tokens": 32000, "thinking": {"type": "enabled",
                                                          "budget_tokens": 31999},
            "messages": [{"role": "user", "content": "word " * 8000}]}
    room = 32768 - int(ccproxy.estimate_request_tokens(body) * 1.1)
    assert 4000 < room < 32000
    assert ccproxy.within_context_length(body, provider, "m") == dict(
        body, max_tokens=room, thinking={"type": "enabled", "budget_tokens": room - 1})
    crowded = dict(body, messages=[{"role": "user", "content": "word " * 27000}])
    assert ccproxy.within_context_length(crowded, provider, "m") is crowded


@pytest.mark.parametrize("max_tokens, starts", [
    (128000, "input length and `max_tokens` exceed context limit: 141030 + 128000 > 262144"),
    (None, "prompt is too long: 269030 tokens > 262144 maximum"),      # the request's unknown
    (8000, "prompt is too long: 269030 tokens > 262144 maximum")])     # the input is over
def test_an_overflow_said_as_a_total_is_split_by_the_requests_max_tokens(max_tokens, starts):
    """Kimi's words give only the total asked, max_tokens in it (MoonshotAI/kimi-cli#2011)."""
    message = ccproxy.overflow_message("Invalid request: Your request exceeded model token "
                                       "limit: 262144 (requested: 269030)", max_tokens)
    assert message.startswith(starts)


def test_an_overflow_leaving_no_room_to_answer_is_a_prompt_too_long():
    """With under 4,000 tokens left for the answer, Claude Code would not ask again: it must
    compact."""
    message = ccproxy.overflow_message(
        "This model's maximum context length is 32768 tokens. However, you requested 62000 "
        "tokens (30000 in the messages, 32000 in the completion).")
    assert message.startswith("prompt is too long: 62000 tokens > 32768 maximum (")


@pytest.mark.parametrize("status, wording", [
    (400, "At most 0 image(s) may be provided in one prompt."),                # vLLM
    (500, "image input is not supported - hint: if this is unexpected, you may need to provide "
          "the mmproj"),                                                        # llama.cpp
    (404, "No endpoints found that support image input"),                      # OpenRouter
    (400, "Invalid content type. image_url is only supported by certain models."),   # OpenAI
])
def test_a_refusal_of_images_is_anthropics_could_not_process_image(start_proxy, upstream,
                                                                  status, wording):
    """Claude Code answers these words by taking the image out and asking again: a model
    without vision must not end the session (see test_claude_code.py)."""
    proxy = start_proxy({"providers": [preset_provider("openai", upstream)],
                         "performance": {"max_retries": 2}})
    upstream.script = lambda r: json_reply(openai_error_body(wording), status)
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(proxy).messages.create(**REQUEST)
    assert caught.value.body["error"]["message"] == (
        "Could not process image: openai refused the request's images (openai: HTTP %d: %s)" % (
            status, wording))
    assert len(upstream.requests) == 1                    # not retried: it would be refused again


def test_a_refusal_of_pdfs_is_anthropics_could_not_process_pdf(openai_proxy, upstream):
    upstream.script = lambda r: json_reply(openai_error_body("Unknown part type: file"), 400)
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(openai_proxy).messages.create(**REQUEST)
    assert caught.value.body["error"]["message"] == (
        "Could not process PDF: openai refused the request's PDFs (openai: HTTP 400: Unknown "
        "part type: file)")


def test_a_pdf_in_a_tool_result_follows_it_and_a_text_document_stays_in_it():
    """Claude Code's Read puts a PDF's document block in the tool result (from 2.1.330)."""
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                          "data": "JVBERi0x"}}
    notes = {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                            "data": "plain words"}}
    body = {"model": "x", "max_tokens": 10, "messages": [
        {"role": "user", "content": "read them"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Read",
                                           "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
            {"type": "text", "text": "PDF file read"}, pdf, notes]}]}]}
    messages = mapped(body)["messages"]
    assert messages[-2] == {"role": "tool", "tool_call_id": "t1",
                            "content": "PDF file read\n[document]\nplain words"}
    assert messages[-1] == {"role": "user", "content": [{"type": "file", "file": {
        "filename": "document.pdf", "file_data": "data:application/pdf;base64,JVBERi0x"}}]}
    # Ollama's OpenAI-compatible API answers a file part "invalid message format"
    assert mapped(body, name="ollama")["messages"][-1] == {"role": "user",
                                                           "content": "[PDF omitted]"}


@pytest.mark.parametrize("preset, limit, wording", [
    ("groq", 40960, "max_completion_tokens must be less than or equal to 40960, the maximum "
                    "value for max_completion_tokens is less than the context_window for this "
                    "model"),
    ("groq", 16384, "`max_tokens` must be less than or equal to `16384`, the maximum value for "
                    "`max_tokens` is less than the `context_window` for this model"),
    ("groq", 8000, "max_tokens for `llama-3.1-8b-instant` must be less than or equal to 8000"),
    ("openai", 16384, "max_tokens is too large: 64000. This model supports at most 16384 "
                      "completion tokens, whereas you provided 64000."),
    ("deepseek", 8192, "Invalid max_tokens value, the valid range of max_tokens is [1, 8192]"),
    ("openai", 32768, "The max_tokens parameter is illegal.\uff1a\u9650\u5236\u6570\u503c"
                      "\u8303\u56f4[1,32768]"),                  # a GLM host's, in Chinese
])
def test_an_output_limit_a_provider_states_is_learned_and_the_request_sent_again(
        start_proxy, upstream, preset, limit, wording):
    """Claude Code asks for 32,000 to 128,000 output tokens, and every request of a session
    was refused where the model allows fewer and its limit was not in the config."""
    proxy = start_proxy({"providers": [preset_provider(preset, upstream)]})

    def provider(request):
        asked = request["json"].get("max_tokens") or request["json"].get("max_completion_tokens")
        if asked > limit:
            return json_reply(openai_error_body(wording), 400)
        return json_reply(completion({"content": "fits"}))
    upstream.script = provider
    for turn in range(2):
        assert block_dicts(sdk(proxy).messages.create(
            **dict(REQUEST, max_tokens=64000), timeout=30)) == [{"type": "text", "text": "fits"}]
    asked = [r["json"].get("max_tokens") or r["json"].get("max_completion_tokens")
             for r in upstream.requests if r["json"]]
    assert asked == [64000, limit, limit]            # refused once, then lowered, also later
    view = json.loads(urllib.request.urlopen(proxy.url + "/providers").read())
    assert view["providers"][0]["learned_output_limits"] == {"gpt-test": limit}


THOUGHT_CALL_HISTORY = [
    {"role": "user", "content": "list"},
    {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "ls shows the files.", "signature": "ccpx1.kimi"},
        {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                  "content": "a.txt"}]}]


@pytest.mark.parametrize("wording", [
    "thinking is enabled but reasoning_content is missing in assistant tool call message at "
    "index 1",                                                  # Kimi, and hosts serving it
    "Missing `reasoning_content` field in the assistant message at message index 1. For more "
    "information, please refer to https://api-docs.deepseek.com/guides/thinking_mode#tool-calls",
    "The `reasoning_content` in the thinking mode must be passed back to the API."])
def test_reasoning_a_server_wants_back_is_learned_and_the_request_sent_again(
        start_proxy, upstream, wording):
    """A thinking model behind a server of no preset (Kimi on Moonshot's OpenAI-compatible API,
    or on a host that serves it) refuses a history whose tool-call turns lack its reasoning:
    Claude Code's session ended at its second turn."""
    proxy = start_proxy({"providers": [preset_provider("custom", upstream,
                                                       name="kimi-openai")]})

    def kimi(request):
        turns = [m for m in request["json"]["messages"] if m.get("tool_calls")]
        if any("reasoning_content" not in m for m in turns):
            return json_reply({"error": {"message": wording, "type": "invalid_request_error"}},
                              400)
        return json_reply(completion({"content": "one file"}))
    upstream.script = kimi
    for turn in range(2):
        message = sdk(proxy).messages.create(**dict(REQUEST, messages=THOUGHT_CALL_HISTORY,
                                                    thinking={"type": "adaptive"}))
        assert block_dicts(message) == [{"type": "text", "text": "one file"}]
    sent = [r["json"] for r in upstream.requests]
    assert len(sent) == 3                     # refused once, then sent with it, also later
    assert [m.get("reasoning_content") for m in sent[2]["messages"] if m.get("tool_calls")] \
        == ["ls shows the files."]
    view = json.loads(urllib.request.urlopen(proxy.url + "/providers").read())
    assert view["providers"][0]["reasoning_replay"] is True


def test_reasoning_a_server_wants_on_every_turn_is_learned(start_proxy, upstream):
    """A model that keeps all its thinking (Kimi's thinking.keep=all) wants it back on every
    assistant message, text turns too (MoonshotAI/kimi-cli#2498)."""
    proxy = start_proxy({"providers": [preset_provider("custom", upstream,
                                                       name="kimi-openai")]})

    def kimi(request):
        turns = [m for m in request["json"]["messages"] if m["role"] == "assistant"]
        if any("reasoning_content" not in m for m in turns):
            return json_reply({"error": {"type": "invalid_request_error", "message": (
                "preserved thinking (thinking.keep=all) requires reasoning_content on every "
                "assistant message, but assistant message at index 1 is missing "
                "reasoning_content")}}, 400)
        return json_reply(completion({"content": "ok"}))
    upstream.script = kimi
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "Greet back.", "signature": "ccpx1.kimi"},
        {"type": "text", "text": "hello"}]}] + THOUGHT_CALL_HISTORY
    message = sdk(proxy).messages.create(**dict(REQUEST, messages=history,
                                                thinking={"type": "adaptive"}))
    assert block_dicts(message) == [{"type": "text", "text": "ok"}]
    assert [m.get("reasoning_content") for m in upstream.requests[-1]["json"]["messages"]
            if m["role"] == "assistant"] == ["Greet back.", "ls shows the files."]
    view = json.loads(urllib.request.urlopen(proxy.url + "/providers").read())
    assert view["providers"][0]["reasoning_replay"] == "all"


@pytest.mark.parametrize("field, status, wording", [
    ("user", 400, "Unrecognized request argument supplied: user"),
    ("user", 400, "Unknown parameter: 'user'."),
    ("user", 422, {"object": "error", "message": {"detail": [{
        "type": "extra_forbidden", "loc": ["body", "user"], "msg": "Extra inputs are not "
        "permitted", "input": "u"}]}, "type": "invalid_request_message_error"}),   # Mistral's
    ("stream_options", 422, {"detail": [{"loc": ["body", "stream_options"], "msg": "Extra "
                                         "inputs are not permitted", "type": "extra_forbidden"}]}),
    ("temperature", 400, "Unsupported parameter: 'temperature' is not supported with this "
                         "model."),
    ("temperature", 400, "Unsupported value: 'temperature' does not support 0.5 with this "
                         "model. Only the default (1) value is supported."),
    ("user", 400, "property 'user' is unsupported"),
    ("max_tokens", 400, "Unsupported parameter: 'max_tokens' is not supported with this model. "
                        "Use 'max_completion_tokens' instead."),
])
def test_a_field_a_server_refuses_is_learned_and_left_out(start_proxy, upstream, field, status,
                                                          wording):
    """A strict server refuses any field it does not name, at every request (the mistral
    preset says which; a server of no preset could not): the first refusal is learned for the
    model, and the request goes again at once without the field."""
    proxy = start_proxy({"providers": [preset_provider("custom", upstream)]})

    def strict(request):
        if field in request["json"]:
            body = wording if isinstance(wording, dict) else openai_error_body(wording)
            return json_reply(body, status)
        return stream_reply(sse_pieces([chunk({"content": "fine"}, "stop")])) \
            if request["json"].get("stream") else json_reply(completion({"content": "fine"}))
    upstream.script = strict
    request = dict(REQUEST, extra_body={"temperature": 0.5, "metadata": {"user_id": "u"}})
    for stream in (True, False):
        assert block_dicts(answer_of(sdk(proxy), stream, **request)) == [
            {"type": "text", "text": "fine"}]
    sent = [r["json"] for r in upstream.requests]
    assert field in sent[0] and all(field not in body for body in sent[1:]) and len(sent) == 3
    if field == "max_tokens":
        assert sent[1]["max_completion_tokens"] == REQUEST["max_tokens"]
    view = json.loads(urllib.request.urlopen(proxy.url + "/providers").read())
    assert view["providers"][0]["refused_fields"] == {"gpt-test": [field]}


def test_a_field_a_request_cannot_do_without_is_not_left_out(start_proxy, upstream):
    proxy = start_proxy({"providers": [preset_provider("custom", upstream)]})
    upstream.script = lambda r: json_reply(openai_error_body(
        "Unrecognized request argument supplied: messages"), 400)
    with pytest.raises(anthropic.BadRequestError):
        sdk(proxy).messages.create(**REQUEST)
    assert len(upstream.requests) == 1


def test_an_output_limit_stated_again_is_not_asked_again(openai_proxy, upstream):
    upstream.script = lambda r: json_reply(openai_error_body(
        "max_tokens is too large: 64000. This model supports at most 16384 completion tokens"),
        400)
    with pytest.raises(anthropic.BadRequestError):
        sdk(openai_proxy).messages.create(**dict(REQUEST, max_tokens=64000), timeout=30)
    assert len([r for r in upstream.requests if r["json"]]) == 2     # once lowered, no more


GROQ_TPM = ("Request too large for model `llama-3.3-70b-versatile` in organization `org_1` "
            "service tier `on_demand` on tokens per minute (TPM): Limit 12000, Requested 14137, "
            "please reduce your message size and try again.")


@pytest.mark.parametrize("status, wording", [
    (413, GROQ_TPM),
    (429, "Request too large for gpt-4o on tokens per min (TPM): Limit 30000, Requested 342389. "
          "The input or output tokens must be reduced in order to run successfully."),
])
def test_a_request_larger_than_the_plan_takes_a_minute_is_a_final_429(start_proxy, upstream,
                                                                     status, wording):
    """No wait serves it: not retried, shown at once (Claude Code shows a 413 as its own
    "Request too large (max 32MB)")."""
    proxy = start_proxy({"providers": [preset_provider("groq", upstream)],
                         "performance": {"max_retries": 2}})
    upstream.script = lambda r: json_reply({"error": {
        "message": wording, "type": "tokens", "code": "rate_limit_exceeded"}}, status)
    with pytest.raises(anthropic.RateLimitError) as caught:
        sdk(proxy).messages.create(**REQUEST)
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert caught.value.body["error"]["message"].startswith(
        "groq takes %s tokens a minute for gpt-test on this plan, and this request alone is %s: "
        % re.search(r"Limit (\d+), Requested (\d+)", wording).groups())
    assert len(upstream.requests) == 1


def test_a_request_larger_than_the_plan_takes_goes_to_the_next_provider(start_proxy, upstream):
    proxy = start_proxy({"providers": [
        preset_provider("groq", upstream, models=["small"]),
        preset_provider("openai", upstream, models=["large"])],
        "routes": {"default": {"provider": "groq", "model": "small",
                               "fallbacks": ["openai,large"]}}})
    upstream.script = lambda r: json_reply({"error": {"message": GROQ_TPM, "type": "tokens"}},
                                           413) if r["json"]["model"] == "small" \
        else json_reply(completion({"content": "served"}))
    message = sdk(proxy).messages.create(**REQUEST)
    assert block_dicts(message) == [{"type": "text", "text": "served"}]
    assert [r["json"]["model"] for r in upstream.requests] == ["small", "large"]


# Groq's refusal of a tool call its model wrote wrongly: a 400 to a whole request, an error
# event in a stream (as public reports show them).
GROQ_CALL_FAILED = {"message": "Failed to call a function. Please adjust your prompt. See "
                               "'failed_generation' for more details.",
                    "type": "invalid_request_error", "code": "tool_use_failed",
                    "failed_generation": "<function=Bash>{\"command\": \"ls\"}</function>"}


def groq_refusing_first_call(stream):
    """A Groq that refuses the model's first tool call, and answers the request asked again."""
    def answer(request):
        if len(upstream_calls) == 0:
            upstream_calls.append(request)
            if stream:
                return stream_reply([b"event: error\ndata: %s\n\n" % json.dumps(
                    {"error": dict(GROQ_CALL_FAILED, status_code=400)}).encode()])
            return json_reply({"error": GROQ_CALL_FAILED}, 400)
        upstream_calls.append(request)
        if stream:
            return stream_reply(sse_pieces([chunk({"content": "listed"}, "stop")]))
        return json_reply(completion({"content": "listed"}))
    upstream_calls = []
    return answer


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_groq_could_not_read_is_asked_again(start_proxy, upstream, stream):
    """The request was sound and the model's answer was not: asking again usually works, so it
    is retried like a server's failure, whether streamed or not (Claude Code falls back to a
    whole request when a stream fails, and a 400 there ended the turn)."""
    proxy = start_proxy({"providers": [preset_provider("groq", upstream)],
                         "performance": {"max_retries": 2}})
    upstream.script = groq_refusing_first_call(stream)
    message = answer_of(sdk(proxy), stream, **REQUEST)
    assert block_dicts(message) == [{"type": "text", "text": "listed"}]
    assert len(upstream.requests) == 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_groq_never_reads_is_a_retryable_502_that_says_why(start_proxy, upstream,
                                                                        stream):
    proxy = start_proxy({"providers": [preset_provider("groq", upstream)],
                         "performance": {"max_retries": 0}})
    upstream.script = lambda r: stream_reply([b"event: error\ndata: %s\n\n" % json.dumps(
        {"error": dict(GROQ_CALL_FAILED, status_code=400)}).encode()]) if stream else json_reply(
        {"error": GROQ_CALL_FAILED}, 400)
    with pytest.raises(anthropic.InternalServerError) as caught:
        answer_of(sdk(proxy), stream, **REQUEST)
    assert caught.value.status_code == 502
    assert caught.value.body["error"]["type"] == "api_error"
    assert caught.value.body["error"]["message"].startswith(
        "groq: the model wrote a tool call that groq could not read (tool_use_failed); the same "
        "request usually succeeds when asked again: ")


@pytest.mark.parametrize("generation, blocks, stop_reason", [
    ('<function=get_weather>{"location": "Oslo"}</function>',          # a call of the request
     [{"type": "tool_use", "name": "get_weather", "input": {"location": "Oslo"}}], "tool_use"),
    ("<analysis>The user asked for a summary.</analysis>\nSummary: done.",   # no call at all
     [{"type": "text", "text": "<analysis>The user asked for a summary.</analysis>\nSummary: "
                               "done."}], "end_turn"),
])
def test_what_the_model_wrote_in_a_tool_use_failed_is_the_answer_when_it_reads(
        start_proxy, upstream, generation, blocks, stop_reason):
    """Groq took the text for a call and refused it; asked again, the model writes the same:
    Claude Code's compaction asks for <analysis> and failed at every try (CCR#295). A call
    ccproxy reads is the call; text with no call in it is the text."""
    proxy = start_proxy({"providers": [preset_provider("groq", upstream)],
                         "performance": {"max_retries": 2}})
    upstream.script = lambda r: json_reply({"error": dict(
        GROQ_CALL_FAILED, failed_generation=generation)}, 400)
    message = sdk(proxy).messages.create(**REQUEST)
    assert [{k: v for k, v in b.items() if k != "id"} for b in block_dicts(message)] == blocks
    assert message.stop_reason == stop_reason and len(upstream.requests) == 1


def test_free_model_requests_of_the_day_spent_are_a_final_429(start_proxy, upstream):
    proxy = start_proxy({"providers": [preset_provider("openrouter", upstream)],
                         "performance": {"max_retries": 2}})
    upstream.script = lambda r: json_reply({"error": {
        "message": "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free "
                   "model requests per day", "code": 429}}, 429)
    with pytest.raises(anthropic.RateLimitError) as caught:
        sdk(proxy).messages.create(**REQUEST)
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert caught.value.body["error"]["message"].startswith(
        "openrouter's requests of the day for free models are spent: no retry today serves them")
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("affordable, served", [(2666, True), (0, False)])
def test_a_max_tokens_the_credits_cannot_cover_is_lowered_to_what_they_can(
        start_proxy, upstream, affordable, served):
    """OpenRouter refuses a request whose max_tokens the balance cannot cover, whatever the
    answer would cost: with a low balance, every Claude Code request was a 402."""
    proxy = start_proxy({"providers": [preset_provider("openrouter", upstream)]})

    def provider(request):
        asked = request["json"]["max_tokens"]
        if asked > affordable:
            return json_reply({"error": {"code": 402, "message": (
                "This request requires more credits, or fewer max_tokens. You requested up to "
                "%d tokens, but can only afford %d. To increase, visit "
                "https://openrouter.ai/settings/credits" % (asked, affordable))}}, 402)
        return json_reply(completion({"content": "cheap"}))
    upstream.script = provider
    if served:
        message = sdk(proxy).messages.create(**dict(REQUEST, max_tokens=32000), timeout=30)
        assert block_dicts(message) == [{"type": "text", "text": "cheap"}]
        assert [r["json"]["max_tokens"] for r in upstream.requests] == [32000, 2666]
    else:
        with pytest.raises(anthropic.APIStatusError) as caught:
            sdk(proxy).messages.create(**dict(REQUEST, max_tokens=32000), timeout=30)
        assert caught.value.status_code == 402 and len(upstream.requests) == 1


@pytest.mark.parametrize("status, wording, fix", [
    (400, "registry.ollama.ai/library/gemma3:latest does not support tools",
     "pick a model that has them (`ollama show MODEL` lists its capabilities)"),
    (400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
     "start vLLM with --enable-auto-tool-choice and the --tool-call-parser of the model"),
    (500, "tools param requires --jinja flag", "start llama-server with --jinja"),
    (404, "No endpoints found that support tool use", "pick a model that has them"),
])
def test_a_server_that_gives_the_model_no_tools_says_how_to(start_proxy, upstream, status,
                                                           wording, fix):
    """Claude Code needs tools for all it does; llama.cpp's 500 read as an outage (retried,
    and counted by the circuit breaker), OpenRouter's 404 as a wrong address."""
    proxy = start_proxy({"providers": [preset_provider("openai", upstream)],
                         "performance": {"max_retries": 2}})
    upstream.script = lambda r: json_reply(openai_error_body(wording), status)
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(proxy).messages.create(**REQUEST)
    assert caught.value.body["error"]["message"].startswith(
        "openai gives gpt-test no tools, which Claude Code needs for all it does: " + fix)
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(upstream.requests) == 1


def test_an_overflow_with_a_number_too_long_to_read_is_still_the_providers_400(openai_proxy,
                                                                                upstream):
    """Python 3.11 refuses int() of over 4,300 digits: such a number made ccproxy's own 500."""
    upstream.script = lambda r: json_reply(openai_error_body(
        "This model's maximum context length is %s tokens." % ("9" * 5000)), 400)
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(openai_proxy).messages.create(**REQUEST)
    assert caught.value.body["error"]["message"].startswith("prompt is too long: ")


def test_a_context_filled_while_answering_is_an_overflow_not_a_server_error(openai_proxy,
                                                                            upstream):
    """llama.cpp's server (and LM Studio) answer 500 when the answer fills the context: not a
    failure a retry mends, but a prompt too long for the room, which Claude Code compacts."""
    upstream.script = lambda r: json_reply({"error": {
        "code": 500, "message": "Context size has been exceeded.", "type": "server_error"}}, 500)
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(openai_proxy).with_options(max_retries=0).messages.create(**REQUEST)
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert caught.value.body["error"]["message"].startswith("prompt is too long: ")
    assert len(upstream.requests) == 1                     # not retried


def test_max_tokens_probe_of_a_reasoning_model_is_answered(openai_proxy, upstream):
    upstream.script = lambda r: json_reply(openai_error_body(
        "Could not finish the message because max_tokens or model output limit was reached."), 400)
    message = sdk(openai_proxy).messages.create(**dict(REQUEST, max_tokens=1))
    assert message.content == [] and message.stop_reason == "max_tokens"
    with sdk(openai_proxy).messages.stream(**dict(REQUEST, max_tokens=1)) as stream:
        assert stream.get_final_message().stop_reason == "max_tokens"


def test_error_before_the_first_chunk_keeps_its_http_status(openai_proxy, upstream):
    upstream.script = lambda r: stream_reply(
        [b'data: {"error": {"message": "Rate limit reached", "code": 429}}\n\n'])
    with pytest.raises(anthropic.RateLimitError) as caught:
        with sdk(openai_proxy).messages.stream(**REQUEST) as stream:
            stream.get_final_message()
    assert caught.value.status_code == 429


def test_error_mid_stream_becomes_an_error_event(openai_proxy, upstream):
    pieces = sse_pieces([chunk({"content": "Hel"})], done=False) + [
        b'data: {"error": {"message": "server overloaded", "code": 503}}\n\n']
    upstream.script = lambda r: stream_reply(pieces)
    with pytest.raises(anthropic.APIStatusError) as caught:
        with sdk(openai_proxy).messages.stream(**REQUEST) as stream:
            stream.get_final_message()
    assert caught.value.body["error"] == {"type": "overloaded_error",
                                          "message": "openai: server overloaded"}


def test_dropped_connection_mid_stream_is_an_error_not_end_turn(openai_proxy, upstream):
    upstream.script = lambda r: stream_reply(sse_pieces([chunk({"content": "Hel"})], done=False),
                                             cut=True)
    with pytest.raises(anthropic.APIStatusError) as caught:
        with sdk(openai_proxy).messages.stream(**REQUEST) as stream:
            stream.get_final_message()
    assert caught.value.body["error"]["type"] == "api_error"


def test_stream_ending_cleanly_without_finish_or_done_is_an_error(openai_proxy, upstream):
    upstream.script = lambda r: stream_reply(sse_pieces([chunk({"content": "Hel"})], done=False))
    with pytest.raises(anthropic.APIStatusError) as caught:
        with sdk(openai_proxy).messages.stream(**REQUEST) as stream:
            stream.get_final_message()
    assert "ended before completion" in caught.value.body["error"]["message"]


def test_silent_upstream_gets_pings_to_the_client(start_proxy, upstream, monkeypatch):
    monkeypatch.setattr(ccproxy, "STREAM_PING_SECONDS", 0.05)
    proxy = start_proxy({"providers": [{"name": "openai", "api_base_url": upstream.url,
                                        "api_key": OPENAI_KEY}]})
    reply = stream_reply(sse_pieces(SCENARIOS["plain_text"]), pause_before=2)
    upstream.script = lambda r: reply
    body = json.dumps(dict(REQUEST, stream=True)).encode()
    sock, received = open_stream(proxy.port, lambda data: data.count(b"event: ping") >= 3, body)
    with sock:
        reply.release.set()
        received = read_to_end(sock, received)
    events = parse_events(received.split(b"\r\n\r\n", 1)[1])
    check_grammar(events)
    assert content_of(events) == EXPECTED_CONTENT["plain_text"]


def test_config_headers_and_cap_reach_the_provider(start_proxy, upstream):
    proxy = start_proxy({"providers": [preset_provider("openrouter", upstream, max_tokens=50,
                                                       headers={"X-Team": "blue"})]})
    upstream.script = lambda r: json_reply(completion({"content": "x"}))
    sdk(proxy).messages.create(**REQUEST)
    sent = upstream.requests[0]
    assert sent["headers"]["x-team"] == "blue" and sent["headers"]["x-title"] == "ccproxy.py"
    assert sent["json"]["max_tokens"] == 50


# --- stop sequences, kept by ccproxy where the provider cannot ------------------------------------

@pytest.mark.parametrize("stops, pieces, sent, matched", [
    (["</block>"], ["Answer: <block>yes</bl", "ock>\nand more"], "Answer: <block>yes", "</block>"),
    (["</block>"], ["x", "</b", "lock>", "<", "/block>"], "x", "</block>"),
    (["</block>"], ["a <", "b", "</block"], "a <b</block", None),   # held back, then sent
    (["STOP", "END"], ["STOP here", " or END"], "", "STOP"),
    (["STOP", "END"], ["one END two STOP"], "one ", "END"),    # the first to appear
    (["ab", "b"], ["xa", "b"], "x", "ab"),                     # ending together: the longer
    (["abc", "b"], ["abc"], "a", "b"),                          # the first to end
    (["ab", "a"], ["a", "b"], "", "a"),
])
def test_stop_sequences_are_found_across_the_pieces_of_text(stops, pieces, sent, matched):
    watch, out = ccproxy.StopSequences(stops), ""
    for piece in pieces:
        out += watch.text(piece)
        if watch.matched:
            break
    assert (out + watch.take_held(), watch.matched) == (sent, matched)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text("ab</>", max_size=6), max_size=8),
       st.lists(st.text("ab</>", min_size=1, max_size=4), min_size=1, max_size=3))
def test_stop_sequences_end_any_text_where_the_whole_text_would(pieces, stops):
    """However a text comes in pieces, what is sent is the whole text cut before the stop
    sequence a model writing it would meet first (the one that ends first; of two that end
    together, the longer), or all of it."""
    watch, out = ccproxy.StopSequences(stops), ""
    for piece in pieces:
        out += watch.text(piece)
        if watch.matched:
            break
    out += "" if watch.matched else watch.take_held()
    whole = "".join(pieces)
    found = min(((whole.find(s) + len(s), whole.find(s), s) for s in stops if s in whole),
                default=None)
    assert (out, watch.matched) == ((whole[:found[1]], found[2]) if found else (whole, None))


CLASSIFIER = dict(REQUEST, model="o4-mini", stop_sequences=["</block>"],
                  messages=[{"role": "user", "content": "Allowed? Answer <block>yes|no</block>"}])


@pytest.mark.parametrize("by_thread", [False, True], ids=["loop reads", "thread reads"])
@pytest.mark.parametrize("first", ["<block>no</bl", "<block>no</block> because"])
def test_a_reasoning_model_is_sent_no_stop_and_its_stream_ends_at_the_stop_sequence(
        start_proxy, upstream, first, by_thread, monkeypatch):
    """Claude Code's auto-mode classifier asks with stop_sequences ["</block>"]; OpenAI's
    reasoning models refuse `stop` ("Unsupported parameter: 'stop'"). ccproxy sends none, ends
    the answer itself before the sequence, as Anthropic does, and closes the provider's stream,
    which stops its generation."""
    if by_thread:                  # as on Windows' default loop, which cannot watch sockets
        monkeypatch.setattr(ccproxy, "loop_watches_sockets", lambda loop: False)
    proxy = start_proxy({"providers": [preset_provider("openai", upstream, models=["o4-mini"])]})
    upstream.script = lambda r: stream_reply(sse_pieces([
        chunk({"role": "assistant", "content": first}), chunk({"content": "ock> because"}),
        chunk({"content": " it deletes files"}), chunk({}, "stop")]), pause_before=2)
    with sdk(proxy).messages.stream(**CLASSIFIER) as stream:
        final = stream.get_final_message()
    assert "stop" not in chat_request(upstream)["json"]
    assert [b.text for b in final.content] == ["<block>no"]
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "</block>")
    assert upstream.peer_closed.wait(5)          # before the provider's third chunk


def test_a_whole_answer_ends_at_the_stop_sequence_and_drops_what_follows(start_proxy, upstream):
    proxy = start_proxy({"providers": [preset_provider("openai", upstream, models=["o4-mini"])]})
    call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    upstream.script = lambda r: json_reply(completion(
        {"content": "<block>yes</block> and then", "tool_calls": [call]}, "tool_calls"))
    message = sdk(proxy).messages.create(**CLASSIFIER)
    assert [b.model_dump(exclude_none=True) for b in message.content] == [
        {"type": "text", "text": "<block>yes"}]
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "</block>")


def test_stop_sequences_past_the_four_chat_completions_takes_are_kept_too(start_proxy, upstream):
    proxy = start_proxy({"providers": [preset_provider("openai", upstream)]})
    stops = ["S1", "S2", "S3", "S4", "S5", "S6"]
    upstream.script = lambda r: stream_reply(sse_pieces([
        chunk({"role": "assistant", "content": "one two S"}), chunk({"content": "6 three"}),
        chunk({}, "stop")]))
    with sdk(proxy).messages.stream(**dict(REQUEST, stop_sequences=stops)) as stream:
        final = stream.get_final_message()
    assert chat_request(upstream)["json"]["stop"] == stops[:4]
    assert ([b.text for b in final.content], final.stop_sequence) == (["one two "], "S6")


@pytest.mark.parametrize("stops", [["S%d" % n for n in range(33)], ["x" * 201]])
def test_more_stop_sequences_than_ccproxy_keeps_are_a_400_before_any_call(openai_proxy, upstream,
                                                                          stops):
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(openai_proxy).messages.create(**dict(REQUEST, stop_sequences=stops))
    assert caught.value.body["error"]["message"] == (
        "stop_sequences: at most 32, of at most 200 characters each, when translated for "
        "openai (ccproxy keeps them itself, searching every piece of the answer's text)")
    assert upstream.requests == []


@pytest.mark.parametrize("wording", [
    "Argument not supported on this model: stop",
    "Model grok-4.6 does not support parameter stop."])
def test_a_server_that_refuses_stop_is_learned_and_ccproxy_keeps_the_sequences(
        start_proxy, upstream, wording):
    """xAI's reasoning models refuse `stop` in these words."""
    proxy = start_proxy({"providers": [preset_provider("xai", upstream)]})
    upstream.script = lambda r: json_reply(
        {"code": "Client specified an invalid argument", "error": wording}, status=400) \
        if "stop" in r["json"] else json_reply(completion({"content": "<block>no</block>."}))
    for _ in range(2):
        message = sdk(proxy).messages.create(**dict(CLASSIFIER, model="gpt-test"))
        assert ([b.text for b in message.content], message.stop_reason) == (
            ["<block>no"], "stop_sequence")
    assert ["stop" in r["json"] for r in upstream.requests] == [True, False, False]


# --- web search: OpenAI's search models and OpenRouter's web search ----------------------------

SEARCH_REQUEST = dict(model="claude-test-model", max_tokens=300, extra_body={"temperature": 0.5},
                      messages=[{"role": "user", "content":
                                 "Perform a web search for the query: oslo weather today"}],
                      tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 8}],
                      tool_choice={"type": "tool", "name": "web_search"})
ANSWER = "Oslo is 4°C and cloudy today."
ANNOTATIONS = [
    {"type": "url_citation", "url_citation": {"url": "https://yr.no/oslo", "title": "Yr: Oslo",
                                              "start_index": 0, "end_index": 29}},
    {"type": "url_citation", "url_citation": {"url": "https://met.no/", "title": "MET Norway",
                                              "start_index": 9, "end_index": 29}},
    {"type": "url_citation", "url_citation": {"url": "https://yr.no/oslo", "title": "Yr: Oslo",
                                              "start_index": 17, "end_index": 29}}]


def search_answer(stream):
    if not stream:
        return json_reply(completion({"content": ANSWER, "annotations": ANNOTATIONS}))
    chunks = [chunk({"role": "assistant", "content": ANSWER[:10]}), chunk({"content": ANSWER[10:]}),
              chunk({"annotations": ANNOTATIONS}), chunk({}, "stop")]
    return stream_reply(sse_pieces(chunks))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("preset, model", [("openai", "gpt-4o-search-preview"),
                                           ("openrouter", "anthropic/claude-sonnet-4.5")])
def test_a_web_search_runs_at_the_providers_own_search(start_proxy, upstream, preset, model,
                                                       stream):
    proxy = start_proxy({"providers": [dict(preset_provider(preset, upstream), models=[model])]})
    upstream.script = lambda r: search_answer(stream)
    message = answer_of(sdk(proxy), stream, **SEARCH_REQUEST)
    sent = upstream.requests[0]["json"]
    if preset == "openai":          # a search model: web_search_options, no tools, no sampling
        assert sent["web_search_options"] == {} and "tools" not in sent
        assert "temperature" not in sent and "tool_choice" not in sent
    else:                           # OpenRouter's own web search tool; no forced choice
        assert sent["tools"] == [{"type": "openrouter:web_search"}]
        assert "tool_choice" not in sent and "web_search_options" not in sent
    text, use, result = message.content
    assert text.text == ANSWER and [c.url for c in text.citations] == [
        "https://yr.no/oslo", "https://met.no/", "https://yr.no/oslo"]
    assert text.citations[1].cited_text == ANSWER[9:29]
    assert use.input == {"query": "oslo weather today"} and result.tool_use_id == use.id
    assert [(r.url, r.title) for r in result.content] == [("https://yr.no/oslo", "Yr: Oslo"),
                                                          ("https://met.no/", "MET Norway")]


def test_a_provider_that_cannot_search_says_so_or_hands_over_to_the_web_search_route(
        start_proxy, upstream, second_upstream):
    plain = dict(preset_provider("deepseek", upstream), models=["deepseek-chat"])
    proxy = start_proxy({"providers": [plain]})
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(proxy).messages.create(**SEARCH_REQUEST)
    assert caught.value.body["error"]["message"] == (
        "deepseek cannot search the web (model deepseek-chat); set routes.webSearch to a "
        "provider that can: gemini, openrouter, anthropic or openai")
    assert upstream.requests == []
    searcher = dict(preset_provider("openrouter", second_upstream), models=["x-ai/grok-4"])
    proxy = start_proxy({"providers": [plain, searcher], "failover": False, "routes": {
        "default": {"provider": "deepseek", "model": "deepseek-chat"},
        "webSearch": {"provider": "openrouter", "model": "x-ai/grok-4"}}})
    second_upstream.script = lambda r: search_answer(False)
    raw = sdk(proxy).messages.with_raw_response.create(**dict(SEARCH_REQUEST,
                                                              model="deepseek,deepseek-chat"))
    assert raw.headers["x-ccproxy-provider"] == "openrouter" and upstream.requests == []
    assert [b.type for b in raw.parse().content][1:] == ["server_tool_use", "web_search_tool_result"]


# --- shapes recorded from real providers (public HTTP recordings) ------------------------------

def test_an_empty_legacy_function_call_beside_text_is_no_call(openai_proxy, upstream):
    upstream.script = lambda r: json_reply(completion(
        {"content": "Hello!", "function_call": {"name": "", "arguments": ""}}, "stop"))
    message = sdk(openai_proxy).messages.create(**REQUEST)
    assert block_dicts(message) == [{"type": "text", "text": "Hello!"}]
    assert message.stop_reason == "end_turn"


def test_cache_reads_and_writes_never_add_up_to_more_than_the_prompt():
    usage = ccproxy.anthropic_usage_from_openai({
        "prompt_tokens": 2168, "completion_tokens": 12, "completion_tokens_details": {
            "reasoning_tokens": 5}, "prompt_tokens_details": {"cached_tokens": 2161,
                                                              "cache_write_tokens": 2161}})
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] + \
        usage["cache_creation_input_tokens"] == 2168
    assert usage["cache_read_input_tokens"] == 2161
    assert usage["output_tokens_details"] == {"thinking_tokens": 5}


def test_mistral_thinking_chunks_become_thinking_when_asked_for():
    chunks = [chunk({"role": "assistant", "content": [
                  {"type": "thinking", "thinking": [{"type": "text", "text": "Let me "}]}]}),
              chunk({"content": [{"type": "thinking", "thinking": [{"type": "text",
                                                                    "text": "think."}]}]}),
              chunk({"content": [{"type": "text", "text": "Four."}]}), chunk({}, "stop")]
    thinking_context = context()
    thinking_context.wants_thinking = True
    translator = ccproxy.OpenAIStreamTranslator(thinking_context)
    events = parse_events(b"".join(translator.feed(c) for c in chunks) + translator.finish())
    blocks = content_of(events)
    assert [b["type"] for b in blocks] == ["thinking", "text"]
    assert blocks[0]["thinking"] == "Let me think." and blocks[1]["text"] == "Four."
    quiet = translate(chunks)                               # not asked for: not shown
    assert content_of(quiet) == [{"type": "text", "text": "Four."}]
    whole = ccproxy.anthropic_message_from_openai(completion({"content": [
        {"type": "thinking", "thinking": [{"type": "text", "text": "Hm."}]},
        {"type": "text", "text": "Yes."}]}), thinking_context)
    assert [(b["type"], b.get("thinking") or b.get("text")) for b in whole["content"]] == [
        ("thinking", "Hm."), ("text", "Yes.")]


def test_mistral_small_4_is_asked_to_think_and_its_thinking_comes_back(start_proxy, upstream):
    """Claude Code asks for adaptive thinking at an effort: Mistral Small 4 takes it as
    reasoning_effort "high" (a field its API names: the strict mock would refuse another), and
    its thinking chunks reach the client as a thinking block."""
    proxy = start_proxy({"providers": [preset_provider("mistral", upstream,
                                                       models=["mistral-small-latest"])]})

    def answer(request):
        problem = mistral_problem(request["json"])
        if problem:
            return json_reply({"detail": problem}, 422)
        return stream_reply(sse_pieces([
            chunk({"role": "assistant", "content": [{"type": "thinking", "thinking": [
                {"type": "text", "text": "Two and two."}]}]}),
            chunk({"content": [{"type": "text", "text": "Four."}]}), chunk({}, "stop")]))
    upstream.script = answer
    message = answer_of(sdk(proxy), True, **dict(
        REQUEST, model="mistral-small-latest", max_tokens=4000,
        thinking={"type": "adaptive"}, extra_body={"output_config": {"effort": "medium"}}))
    assert upstream.requests[0]["json"]["reasoning_effort"] == "high"
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None))
            for b in message.content] == [("thinking", "Two and two."), ("text", "Four.")]


# --- Gemini's OpenAI-compatible API: thought signatures on tool calls ---------------------------
# Gemini 3 refuses a history whose calls lack the signature it gave them ("Function call is
# missing a thought_signature in functionCall parts"), the error peers' users report most with
# Gemini; its OpenAI-compatible API carries it as extra_content.google.thought_signature.

GEMINI_OPENAI_URL = "http://generativelanguage.googleapis.com/v1beta/openai"
CALL_HISTORY = [{"role": "user", "content": "list"}]
CALLED = {"id": "call_1", "type": "function", "function": {"name": "Bash",
                                                           "arguments": '{"command":"ls"}'}}


def gemini_openai(stream):
    """A Gemini behind its OpenAI-compatible API: a signed call to the first request, and to
    the next a 400 unless the call comes back with its signature (Gemini 3's rule)."""
    def answer(request):
        calls = [c for m in request["json"]["messages"] for c in m.get("tool_calls", ())]
        if calls and calls[0].get("extra_content") != {"google": {"thought_signature": "SIG-1"}}:
            return json_reply([{"error": {"code": 400, "status": "INVALID_ARGUMENT", "message":
                                          "Function call is missing a thought_signature in "
                                          "functionCall parts."}}], 400)
        if calls:
            reply = {"content": "listed"}
        else:
            reply = {"content": None, "tool_calls": [dict(
                CALLED, index=0, extra_content={"google": {"thought_signature": "SIG-1"}})]}
        if stream:
            return stream_reply(sse_pieces([chunk(dict(reply, role="assistant"),
                                                  "tool_calls" if not calls else "stop")]))
        return json_reply(completion(reply, "tool_calls" if not calls else "stop"))
    return answer


@pytest.mark.parametrize("stream", [False, True])
def test_gemini_openai_thought_signatures_go_to_the_client_and_back(start_proxy, upstream,
                                                                    monkeypatch, stream):
    """Reached through a forward proxy on this machine (by name, never resolved), so that the
    provider is Google's host; the SDK itself goes straight to ccproxy."""
    monkeypatch.setenv("HTTP_PROXY", upstream.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    proxy = start_proxy({"providers": [{"name": "gem", "type": "openai", "api_key": "g-0123456789",
                                        "api_base_url": GEMINI_OPENAI_URL}]})
    upstream.script = gemini_openai(stream)
    tools = [{"name": "Bash", "input_schema": {"type": "object"}}]
    first = answer_of(sdk(proxy), stream, model="gemini-3-pro", max_tokens=500, tools=tools,
                      messages=CALL_HISTORY)
    blocks = [block.model_dump(exclude_none=True) for block in first.content]
    assert [b["type"] for b in blocks] == ["thinking", "tool_use"]
    assert blocks[0]["signature"] == "ccpx1.gemini.SIG-1" and blocks[0]["thinking"] == ""
    history = CALL_HISTORY + [
        {"role": "assistant", "content": blocks},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": blocks[1]["id"],
                                      "content": "a.txt"}]}]
    second = answer_of(sdk(proxy), stream, model="gemini-3-pro", max_tokens=500, tools=tools,
                       messages=history)
    assert block_dicts(second) == [{"type": "text", "text": "listed"}]
    assert upstream.requests[0]["path"] == GEMINI_OPENAI_URL + "/chat/completions"


def test_a_call_made_elsewhere_goes_to_gemini_openai_with_googles_placeholder():
    body = {"messages": CALL_HISTORY + [
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}},
            {"type": "tool_use", "id": "toolu_2", "name": "Bash", "input": {"command": "pwd"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "/"}]}]}
    calls = mapped(body, "gem", api_base_url=GEMINI_OPENAI_URL)["messages"][1]["tool_calls"]
    assert [c.get("extra_content") for c in calls] == [
        {"google": {"thought_signature": "skip_thought_signature_validator"}}, None]


def test_no_other_openai_compatible_server_gets_a_thought_signature():
    body = {"messages": CALL_HISTORY + [
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "", "signature": "ccpx1.gemini.SIG-1"},
            {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": "a"}]}]}
    for name in ("openai", "mistral", "my-vllm"):
        call = mapped(body, name)["messages"][1]["tool_calls"][0]
        assert "extra_content" not in call and not mistral_problem(mapped(body, "mistral"))
    assert ccproxy.build_config({"providers": [{
        "name": "v", "type": "openai", "api_base_url": "http://127.0.0.1:8000/v1"}]}, "c",
        {}).providers[0].quirks["thought_signatures"] is False


# --- reasoning that must come back: OpenRouter's reasoning_details ------------------------------

DETAILS = [{"type": "reasoning.text", "text": "Check the weather tool.", "signature": "sig-abc",
            "format": "anthropic-claude-v1", "index": 0},
           {"type": "reasoning.encrypted", "data": "ENCRYPTED==", "format": "google-gemini-v1",
            "index": 1}]


def openrouter_reply(stream):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"location":"Oslo"}'}}
    if not stream:
        return json_reply(completion({"content": None, "reasoning": "Check the weather tool.",
                                      "reasoning_details": DETAILS, "tool_calls": [call]},
                                     "tool_calls"))
    pieces = [chunk({"role": "assistant", "reasoning": "Check the ",
                     "reasoning_details": [{"type": "reasoning.text", "text": "Check the ",
                                            "format": "anthropic-claude-v1", "index": 0}]}),
              chunk({"reasoning": "weather tool.", "reasoning_details": [
                  {"type": "reasoning.text", "text": "weather tool.", "index": 0}]}),
              chunk({"reasoning_details": [{"type": "reasoning.text", "signature": "sig-abc",
                                            "index": 0}, DETAILS[1]]}),
              chunk({"tool_calls": [dict(call, index=0)]}), chunk({}, "tool_calls")]
    return stream_reply(sse_pieces(pieces))


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_details_survive_a_tool_turn_through_openrouter(start_proxy, upstream, stream):
    proxy = start_proxy({"providers": [preset_provider("openrouter", upstream)]})
    upstream.script = lambda r: openrouter_reply(stream)
    request = dict(REQUEST, thinking={"type": "enabled", "budget_tokens": 2048})
    if stream:
        with sdk(proxy).messages.stream(**request) as events:
            first = events.get_final_message()
    else:
        first = sdk(proxy).messages.create(**request)
    thinking, call = first.content
    assert thinking.type == "thinking" and thinking.thinking == "Check the weather tool."
    assert thinking.signature.startswith("ccpx1.rd.")
    upstream.script = lambda r: json_reply(completion({"content": "It is 4°C."}))
    follow_up = dict(request, messages=request["messages"] + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                      "content": "4°C"}]}])
    sdk(proxy).messages.create(**follow_up)
    assistant = [m for m in upstream.requests[-1]["json"]["messages"] if m["role"] == "assistant"]
    assert assistant[0]["reasoning_details"] == DETAILS


def test_reasoning_details_go_back_only_to_hosts_that_take_them():
    block = {"type": "thinking", "thinking": "x",
             "signature": ccproxy.reasoning_details_signature(DETAILS)}
    body = {"messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": [block, {"type": "tool_use", "id": "t",
                                                                    "name": "f", "input": {}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                       "content": "r"}]}]}
    assert "reasoning_details" in mapped(body, "openrouter")["messages"][1]
    assert "reasoning_details" not in mapped(body, "openai")["messages"][1]


# --- the hot path: text-only chunks ------------------------------------------------------------

def text_chunk(text, **extra):
    return dict({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]},
                **extra)


@pytest.mark.parametrize("texts", [["Hel", "lo", " wörld ", "", "\"quoted\"\n\t\\", "😀"],
                                   ["a\ud800b", "ok"]])
def test_text_only_chunks_take_the_short_way_to_the_same_events(texts):
    """Text-only chunks are told apart at a glance and written through the text template; a
    chunk with anything more takes the full way. Both give the same events, and a lone
    surrogate (which UTF-8 cannot carry) comes out escaped instead of breaking the stream."""
    ending = [{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
    short = translate([text_chunk(t) for t in texts] + ending)
    full = translate([text_chunk(t, x_unknown=None) for t in texts] + ending)
    assert ccproxy.plain_text_delta(text_chunk("x")) == "x"
    assert ccproxy.plain_text_delta(text_chunk("x", x_unknown=None)) is None
    assert ccproxy.plain_text_delta(text_chunk("x", usage=None)) == "x"     # include_usage
    assert ccproxy.plain_text_delta(text_chunk("x", usage={"prompt_tokens": 1})) is None
    assert short[1:] == full[1:]                       # message_start differs by its id only
    assert "".join(p["delta"]["text"] for n, p in short if n == "content_block_delta") == \
        "".join(texts)


def sse_data(chunk, compact=True, ascii_only=True) -> bytes:
    separators = (",", ":") if compact else (", ", ": ")
    return b"data: %s\n\n" % json.dumps(chunk, separators=separators,
                                          ensure_ascii=ascii_only).encode()


def relay_events(data: bytes, cuts=()):
    """The events a relay makes of a Chat Completions stream's bytes, fed in pieces."""
    translation = context()
    relay = ccproxy.TranslatedStreamRelay(ccproxy.OpenAIStreamTranslator(translation),
                                          translation)
    edges = [0] + sorted(set(cut % (len(data) + 1) for cut in cuts)) + [len(data)]
    out = b"".join(relay.feed(data[a:b]) for a, b in zip(edges, edges[1:]) if b > a)
    return parse_events(out + relay.finish())


def test_text_only_chunks_after_the_first_are_not_decoded_at_all(monkeypatch):
    """The first text-only chunk (here the opening one) is decoded and its JSON learnt; the
    stream's other text chunks are read from their raw JSON (the id, model and the rest as
    learnt), never decoded; so are chunks padded with a random obfuscation string, once one
    of them has been learnt."""
    decoded = []

    def counting(data):
        decoded.append(data)
        return json.loads(data)
    monkeypatch.setattr(ccproxy, "decode_event_json", counting)
    texts = ["w%d \"ö\" \\ \n" % n for n in range(50)]
    padded = [text_chunk(t, usage=None, obfuscation="p" * n) for n, t in enumerate(texts)]
    chunks = [text_chunk(""), *[text_chunk(t) for t in texts], *padded, dict(
        text_chunk(""), choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}])]
    events = relay_events(b"".join(sse_data(c) for c in chunks) + b"data: [DONE]\n\n")
    assert "".join(p["delta"]["text"] for n, p in events if n == "content_block_delta") == \
        "".join(texts) * 2
    assert len(decoded) == 3        # the opening chunk, the first padded one (learnt), the ending


def test_the_template_takes_only_the_learnt_json_around_one_whole_string():
    template = ccproxy.PlainChunkTemplate()
    learnt = json.dumps(text_chunk("Hel"), separators=(",", ":"))
    assert template.text(learnt) is None                          # nothing learnt yet
    template.learn(learnt, "Hel")
    again = json.dumps(text_chunk('w\u00f6"r\\ld'), separators=(",", ":"))
    assert template.text(again) == 'w\u00f6"r\\ld'
    assert template.text(json.dumps(text_chunk("x"))) is None            # other spacing
    assert template.text(json.dumps(text_chunk("x", id="d"), separators=(",", ":"))) is None
    assert template.text(learnt.replace('"Hel"', '"a","x":"b"')) is None    # two strings
    assert template.text(learnt.replace('"Hel"', '"a\x01"')) is None      # not valid JSON
    assert template.text(learnt.replace('"Hel"', '"a\\q"')) is None      # nor this
    logprobs = text_chunk("x")
    logprobs["choices"][0]["logprobs"] = {"content": [{"token": "x"}]}
    padded = ccproxy.PlainChunkTemplate()                 # OpenAI's obfuscation after the text
    padded.learn(json.dumps(text_chunk("Hel", obfuscation="k2P")), "Hel")
    assert padded.text(json.dumps(text_chunk("lo", obfuscation="Zx9q\\"))) == "lo"
    assert padded.text(json.dumps(text_chunk("lo", obfuscation=7))) is None
    assert padded.text(json.dumps(text_chunk("lo", obfuscation="a", id="d"))) is None
    assert ccproxy.learnable_chunk(text_chunk("x"))
    assert not ccproxy.learnable_chunk(logprobs)                             # not learnt from
    assert not ccproxy.learnable_chunk(text_chunk("x", provider={"a": 1}))


OTHER_CHUNKS = st.sampled_from([
    {"index": 0, "delta": {"reasoning_content": "hmm"}, "finish_reason": None},
    {"index": 0, "delta": {"content": "lp"}, "logprobs": {"content": [{"token": "lp"}]},
     "finish_reason": None},
    {"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                           "function": {"name": "f", "arguments": "{}"}}]},
     "finish_reason": None}])
STREAM_CHUNKS = st.lists(st.one_of(
    st.tuples(st.just("text"), st.text(max_size=6), st.sampled_from(["c", "d"]), st.booleans(),
              st.booleans()),
    st.tuples(st.just("other"), OTHER_CHUNKS, st.just("c"), st.booleans(), st.just(True))),
    max_size=25)


@settings(max_examples=150, deadline=None)
@given(STREAM_CHUNKS, st.lists(st.integers(min_value=0), max_size=4))
def test_text_read_from_the_template_gives_the_events_of_decoding_every_chunk(items, cuts):
    """Any mix of text chunks (any text, JSON spacing, changing ids, a null usage and an
    obfuscation string as OpenAI sends them), other chunks, and any cuts between reads: the
    events are those of decoding every chunk."""
    chunks, data = [text_chunk("")], [sse_data(text_chunk(""))]
    for kind, value, chunk_id, compact, ascii_only in items:
        if kind == "text":
            padding = {"usage": None, "obfuscation": value[::-1] + "="} if chunk_id == "d" else {}
            chunk = text_chunk(value, id=chunk_id, **padding)
        else:
            chunk = dict(text_chunk(""), choices=[value])
        chunks.append(chunk)
        data.append(sse_data(chunk, compact, ascii_only or not is_utf8(json.dumps(chunk))))
    ending = dict(text_chunk(""), choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}])
    chunks.append(ending)
    data.append(sse_data(ending) + b"data: [DONE]\n\n")
    short, full = relay_events(b"".join(data), cuts), translate(chunks)
    assert short[1:] == full[1:]                       # message_start differs by its id only


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES, st.sampled_from(["", " ", "\n", "x", "}"]),
       st.sampled_from(["", " ", "\t", "{"]))
def test_event_data_decodes_exactly_as_json_loads(value, after, before):
    data = before + json.dumps(value) + after
    try:
        expected = ("value", json.loads(data))
    except ValueError:
        expected = ("error", None)
    try:
        got = ("value", ccproxy.decode_event_json(data))
    except ValueError:
        got = ("error", None)
    assert got == expected


JSON_OBJECTS = st.dictionaries(st.text(alphabet='ab",]}{[\\ ', max_size=4), JSON_VALUES,
                               max_size=3)


@settings(max_examples=300, deadline=None)
@given(JSON_OBJECTS, st.sampled_from(["", ",", " ,", "}", ",}", "]", "no }"]),
       st.lists(st.integers(min_value=1), max_size=4), st.booleans())
@example({"{": []}, " ,", [2], False)        # `{"` then `{":[] ,}`: no cumulative stream
def test_any_object_streamed_in_any_pieces_arrives_as_meant(value, mistake, cuts, spaced):
    """Any object (its strings full of brackets, commas and quotes), in any pieces, whole or
    with a mistake at its end: the client's input JSON is the object, and all but its end went
    out as it came."""
    text = json.dumps(value, separators=None if spaced else (",", ":"))
    sent = {",": text[:-1] + ",}", " ,": text[:-1] + " ,}", "no }": text[:-1]}.get(
        mistake, text + mistake)
    bounds = sorted({cut % len(sent) for cut in cuts} - {0}) + [len(sent)]
    pieces = [sent[a:b] for a, b in zip([0] + bounds, bounds)]
    events = translate([chunk(call_fragment(0, "c1", "f", pieces[0]))] +
                       [chunk(call_fragment(0, arguments=p)) for p in pieces[1:]] +
                       [chunk({}, "tool_calls")])
    arguments = arguments_of(events)
    assert json.loads(arguments) == value
    assert arguments.rstrip(" ,}]") == sent.rstrip(" ,}]")


@settings(max_examples=300, deadline=None)
@given(JSON_OBJECTS, st.lists(st.integers(min_value=1), max_size=4), st.booleans(),
       st.sampled_from(["pieces", "cumulative", "whole again", "whole again after all but }",
                        "whole again, double-encoded"]))
def test_any_object_sent_again_in_any_way_arrives_once(value, cuts, spaced, way):
    """Any object in any pieces, as a server sends it: piece by piece; each piece being all so
    far (cumulative, from the model's first token on); the pieces then the whole again, after
    all of it or all but its last brace, or double-encoded after all of it. The client's input
    JSON is the object, once. (A cumulative stream is recognised at the first fragment that
    could not go on from those before: one whose first key begins with a space or a colon may
    not be, as `{"` then `{" ` could be the start of `{"{" : 1}`.)"""
    assume(way != "cumulative" or all(key[:1].isalnum() for key in value))
    text = json.dumps(value, separators=None if spaced else (",", ":"))
    bounds = sorted({cut % len(text) for cut in cuts} - {0}) + [len(text)]
    pieces = [text[a:b] for a, b in zip([0] + bounds, bounds)]
    if way == "cumulative":
        pieces = [text[:b] for b in sorted({min(2, len(text))} | set(bounds))]
    elif way.endswith("double-encoded"):
        pieces = pieces + [json.dumps(json.dumps(value))]
    elif way.startswith("whole again"):
        pieces = ([p for p in pieces if p] if way == "whole again" else
                  [p for p in (pieces[:-1] + [pieces[-1][:-1]]) if p]) + [json.dumps(value)]
    events = translate([chunk(call_fragment(0, "c1", "f", pieces[0]))] +
                       [chunk(call_fragment(0, arguments=p)) for p in pieces[1:]] +
                       [chunk({}, "tool_calls")])
    assert json.loads(arguments_of(events)) == value


@settings(max_examples=300, deadline=None)
@given(JSON_OBJECTS)
def test_a_json_object_prefix_is_told_from_text_json_cannot_go_on_from(value):
    text = json.dumps(value)
    assert all(ccproxy.json_object_prefix(text[:end]) for end in range(len(text) + 1))
    assert not ccproxy.json_object_prefix(text + text[:1])
    assert not ccproxy.json_object_prefix(text[:-1] + "]" if text != "{}" else "{]")


# --- thinking the client asked to have omitted (Claude Code 2.1.332 asks at every request) ------

OMITTED = dict(REQUEST, thinking={"type": "adaptive"},
               extra_body={"thinking": {"type": "adaptive", "display": "omitted"}})


def reasoning_then_call(stream: bool):
    """DeepSeek's answer: its reasoning, then a tool call."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"location": "Oslo"}'}}
    if not stream:
        return json_reply(completion({"reasoning_content": "Oslo needs the tool.",
                                      "tool_calls": [call]}, "tool_calls"))
    return stream_reply(sse_pieces([
        chunk({"role": "assistant", "reasoning_content": "Oslo needs "}),
        chunk({"reasoning_content": "the tool."}), chunk({"tool_calls": [dict(call, index=0)]}),
        chunk({}, "tool_calls")]))


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_asked_omitted_comes_empty_and_its_text_goes_back_in_the_signature(
        start_proxy, upstream, stream):
    """thinking.display "omitted" gets what Anthropic sends: thinking blocks without their text
    (no thinking_delta in a stream), the signature carrying it; DeepSeek, which refuses a
    tool-call turn without its reasoning, still gets it back at the next turn."""
    proxy = start_proxy({"providers": [preset_provider("deepseek", upstream)]})
    upstream.script = lambda r: reasoning_then_call(stream)
    if stream:
        with sdk(proxy).messages.stream(**OMITTED) as events:
            deltas = [event.delta.type for event in events
                      if event.type == "content_block_delta"]
            first = events.get_final_message()
        assert "thinking_delta" not in deltas and deltas[0] == "signature_delta"
    else:
        first = sdk(proxy).messages.create(**OMITTED)
    content = [b.model_dump(exclude_none=True) for b in first.content]
    thinking, call = content
    assert thinking["type"] == "thinking" and thinking["thinking"] == ""
    assert thinking["signature"].startswith("ccpx1.text.")
    upstream.script = lambda r: json_reply(completion({"content": "It is 4°C."}))
    sdk(proxy).messages.create(**dict(OMITTED, messages=OMITTED["messages"] + [
        {"role": "assistant", "content": content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"],
                                      "content": "4°C"}]}]))
    assistant = [m for m in upstream.requests[-1]["json"]["messages"] if m["role"] == "assistant"]
    assert assistant[0]["reasoning_content"] == "Oslo needs the tool."


def test_thinking_not_asked_omitted_comes_whole(start_proxy, upstream):
    proxy = start_proxy({"providers": [preset_provider("deepseek", upstream)]})
    upstream.script = lambda r: reasoning_then_call(False)
    message = sdk(proxy).messages.create(**dict(REQUEST, thinking={"type": "adaptive"}))
    assert message.content[0].thinking == "Oslo needs the tool."
    assert message.content[0].signature == "ccpx1.deepseek"


@pytest.mark.parametrize("stream", [False, True])
def test_omitted_thinking_whose_signature_carries_the_reasoning_keeps_that_signature(
        start_proxy, upstream, stream):
    """OpenRouter's reasoning_details ride on the signature already: only the text goes."""
    proxy = start_proxy({"providers": [preset_provider("openrouter", upstream)]})
    upstream.script = lambda r: openrouter_reply(stream)
    if stream:
        with sdk(proxy).messages.stream(**OMITTED) as events:
            first = events.get_final_message()
    else:
        first = sdk(proxy).messages.create(**OMITTED)
    assert first.content[0].thinking == "" and first.content[0].signature.startswith("ccpx1.rd.")
    upstream.script = lambda r: json_reply(completion({"content": "It is 4°C."}))
    sdk(proxy).messages.create(**dict(OMITTED, messages=OMITTED["messages"] + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": first.content[1].id,
                                      "content": "4°C"}]}]))
    assistant = [m for m in upstream.requests[-1]["json"]["messages"] if m["role"] == "assistant"]
    assert assistant[0]["reasoning_details"] == DETAILS
