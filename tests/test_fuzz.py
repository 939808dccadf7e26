"""Bad input never crashes a translator: any body that passes validation either translates to
JSON or is refused with a 400 saying why, and any answer a provider gives, of any shape, reaches
the client through the running proxy as a well-formed message, event stream or error."""
from __future__ import annotations

import http.client
import json
import re

import pytest

from hypothesis import given, settings, strategies as st

import ccproxy
from helpers import (anthropic_stream_events, changed_anywhere, check_grammar, MockUpstream,
                     parse_events, Reply, RunningProxy, STOP_REASONS, strict_json)

anything = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                        lambda children: st.lists(children, max_size=3)
                        | st.dictionaries(st.text(max_size=6), children, max_size=3),
                        max_leaves=8)
block_types = st.sampled_from(["text", "image", "tool_use", "tool_result", "thinking",
                               "redacted_thinking", "document", "server_tool_use", "hologram"])
field_names = st.sampled_from(["text", "source", "id", "name", "input", "content", "is_error",
                               "tool_use_id", "thinking", "signature", "cache_control"])
blocks = st.builds(lambda kind, fields: dict(fields, type=kind), block_types,
                   st.dictionaries(field_names, anything, max_size=4))
messages = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant", "system"]),
    "content": st.one_of(st.text(max_size=10), st.lists(blocks, max_size=4))}), min_size=1,
    max_size=5)
bodies = st.fixed_dictionaries(
    {"model": st.just("m"), "max_tokens": st.integers(1, 100000), "messages": messages},
    optional={"system": st.one_of(st.text(max_size=10), st.lists(blocks, max_size=3)),
              "tools": st.lists(st.fixed_dictionaries({"name": st.text(min_size=1, max_size=70)},
                                                      optional={"input_schema": anything,
                                                                "type": anything,
                                                                "description": anything}),
                                max_size=3),
              "tool_choice": anything, "thinking": anything, "stop_sequences": anything,
              "temperature": anything, "top_p": anything, "top_k": anything,
              "metadata": anything, "output_config": anything, "stream": st.booleans()})


def providers():
    config = ccproxy.build_config({"providers": [
        {"name": "openai", "api_key": "k"}, {"name": "deepseek", "api_key": "k"},
        {"name": "mistral", "api_key": "k"}, {"name": "gemini", "api_key": "k"}]}, "c", {})
    return config.providers


PROVIDERS = providers()
TRANSLATIONS = [(provider, ccproxy.gemini_request_from_anthropic if provider.protocol == "gemini"
                 else ccproxy.openai_request_from_anthropic) for provider in PROVIDERS]
TRANSLATIONS.append((PROVIDERS[0], ccproxy.responses_request_from_anthropic))
ANTHROPIC_PROVIDERS = ccproxy.build_config({"providers": [
    {"name": name, "api_key": "k"} for name in ("anthropic", "kimi", "glm", "minimax",
                                                 "deepseek-anthropic", "mimo")] + [
    {"name": "declared", "type": "anthropic", "api_base_url": "http://127.0.0.1:9",
     "compatible": {"auth": "bearer", "drop_betas": True, "drop_fields": ["top_k", "container"],
                    "no_blocks": ["image", "document", "tool_reference", "search_result"],
                    "thinking_with_calls": "always", "thinks_unasked": True,
                    "effort_needs_thinking": True}}]},
    "c", {}).providers


@settings(max_examples=400, deadline=None)
@given(bodies)
def test_translators_give_json_or_a_400(body):
    check_translations(body)


def check_translations(body: dict) -> None:
    """A body the door lets in translates to JSON for every protocol, or is refused with a
    400 saying why."""
    try:
        ccproxy.check_messages_request(body)
    except ccproxy.InvalidRequestError:
        return
    for provider, translate in TRANSLATIONS:
        try:
            json.dumps(translate(json.loads(json.dumps(body)), provider, "model-x"))
        except ccproxy.InvalidRequestError:
            pass
    for provider in ANTHROPIC_PROVIDERS:          # the history and fields each server takes
        json.dumps(ccproxy.anthropic_messages_for(body, provider))
        compat = provider.quirks["anthropic_compat"]
        if compat is not None:
            json.dumps(ccproxy.compatible_changes(body, {}, compat))


IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "iVBORw0KGgo="}}
# A request with one of everything a client sends: every block type in both roles, cache
# marks, citations, server tool blocks, a tool schema with $defs, a pattern and anyOf.
EVERYTHING_REQUEST = {
    "model": "m", "max_tokens": 100, "stream": True, "temperature": 0.5, "top_p": 0.9,
    "top_k": 5, "stop_sequences": ["X"], "tool_choice": {"type": "auto"},
    "thinking": {"type": "enabled", "budget_tokens": 50}, "output_config": {"effort": "high"},
    "metadata": {"user_id": "user_abc_account__session_123e4567-e89b-12d3-a456-426614174000"},
    "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
    "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "hello", "cache_control": {"type": "ephemeral"}}, IMAGE,
            {"type": "document", "title": "d", "citations": {"enabled": True},
             "source": {"type": "text", "media_type": "text/plain", "data": "doc"}},
            {"type": "search_result", "source": "https://s", "title": "T",
             "content": [{"type": "text", "text": "r"}]}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "t", "signature": "s"},
            {"type": "redacted_thinking", "data": "xx"},
            {"type": "text", "text": "ok", "citations": [
                {"type": "web_search_result_location", "url": "https://x", "title": "t",
                 "encrypted_index": "e", "cited_text": "c"}]},
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search",
             "input": {"query": "q"}},
            {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [
                {"type": "web_search_result", "url": "https://x", "title": "t",
                 "encrypted_content": "e"}]},
            {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"a": 1}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1",
             "content": [{"type": "text", "text": "out"}, IMAGE]},
            {"type": "text", "text": "next"}]}],
    "tools": [{"name": "Read", "description": "read", "input_schema": {
        "type": "object", "required": ["a"], "additionalProperties": False,
        "properties": {"a": {"type": "integer"}, "b": {"$ref": "#/$defs/B"},
                       "c": {"type": "string", "pattern": "^\\p{L}"}},
        "$defs": {"B": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}},
        {"name": "mcp__server__do", "input_schema": {"type": "object"},
         "cache_control": {"type": "ephemeral"}}],
}


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_requests_a_client_gets_almost_right_translate_or_get_a_400(data):
    """Any value anywhere in a request with one of everything replaced by any other: a tool
    schema from an MCP server, say, with a $defs entry that is a list."""
    check_translations(changed_anywhere(data, EVERYTHING_REQUEST, most=4))


chunk_keys = st.sampled_from(["choices", "delta", "usage", "error", "candidates", "content",
                              "parts", "finishReason", "finish_reason", "tool_calls", "function",
                              "arguments", "index", "id", "name", "text", "thought", "reasoning",
                              "functionCall", "args", "thoughtSignature", "usageMetadata",
                              "promptFeedback", "blockReason", "reasoning_content", "x_groq",
                              "object", "status", "code", "message", "details", "retryDelay",
                              "refusal", "function_call", "prompt_tokens", "cached_tokens"])
chunk_like = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5)
                          | st.sampled_from(["<think>", "</think>", "</th", "ink>\n"]),
                          lambda children: st.lists(children, max_size=3)
                          | st.dictionaries(chunk_keys, children, max_size=4), max_leaves=12)


def translation_context(search=False, server="openai"):
    """What a translator knows of its request: a plain one, or Claude Code's web search; to
    OpenAI, or to a server of no preset ("vllm": its model's thinking watched for a lone
    </think>; "vllm-opened": its model's answers known to begin in thinking)."""
    config = ccproxy.build_config({"providers": [
        {"name": "openai", "api_key": "k"} if server == "openai" else
        {"name": "vllm", "type": "openai", "api_base_url": "http://127.0.0.1:9/v1"}]}, "c", {})
    if server == "vllm-opened":
        config.providers[0].opens_thinking.add("model-x")
    request = ccproxy.Request("POST", "/v1/messages", "HTTP/1.1", ccproxy.Headers())
    body = {"model": "m", "tools": [{"name": "Read", "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": "hi"}]}
    if search:
        body.update(tools=[{"type": "web_search_20250305", "name": "web_search"}], messages=[
            {"role": "user", "content": "Perform a web search for the query: ccproxy"}])
    return ccproxy.TranslationContext(config.providers[0], request, body,
                                      ccproxy.openai_tool_name, "model-x")


def check_translated(translator, events) -> None:
    """What a stream translator makes of (event, payload) pairs, ended as the relay ends a
    stream (finish(), or finish(error) once the provider's error stopped the feeding), is in
    the Anthropic order, or is only the error that the client gets as an HTTP error."""
    out, error = b"", None
    for event, payload in events:
        try:            # as the relay gives it: decoded by ccproxy (NaN in Python's JSON: null)
            out += translator.feed_event(event, ccproxy.decode_event_json(json.dumps(payload)))
        except ccproxy.ProxyError as failure:
            error = failure
            break
    made = parse_events(out + translator.finish(error))
    if [name for name, _ in made] != ["error"]:
        check_grammar(made, finished=made[-1][0] != "error")


STREAM_SEEDS = {
    "chat": [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]},
             {"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]},
             {"choices": [{"index": 0, "delta": {"tool_calls": [
                 {"index": 0, "id": "call_1", "function": {"name": "Read", "arguments": "{"}}]}}]},
             {"choices": [{"index": 0, "delta": {"tool_calls": [
                 {"index": 0, "function": {"arguments": "}"}}]}}]},
             {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
             {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}],
    "responses": [
        {"type": "response.output_item.added", "output_index": 0,
         "item": {"type": "reasoning", "id": "rs_1", "summary": []}},
        {"type": "response.reasoning_summary_text.delta", "output_index": 0, "delta": "hm"},
        {"type": "response.output_item.done", "output_index": 0,
         "item": {"type": "reasoning", "id": "rs_1", "encrypted_content": "e"}},
        {"type": "response.output_text.delta", "output_index": 1, "delta": "Hi"},
        {"type": "response.output_item.added", "output_index": 2,
         "item": {"type": "function_call", "call_id": "call_1", "name": "Read"}},
        {"type": "response.function_call_arguments.delta", "output_index": 2, "delta": "{}"},
        {"type": "response.completed", "response": {"status": "completed", "output": [],
                                                    "usage": {"input_tokens": 5}}}],
    "gemini": [{"candidates": [{"content": {"parts": [{"text": "hm", "thought": True}]}}]},
               {"candidates": [{"content": {"parts": [{"text": "Hi"}]}}]},
               {"candidates": [{"content": {"parts": [{"functionCall": {"name": "Read",
                                                                        "args": {}}}]},
                                "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2}}],
}
WHOLE_SEEDS = {
    "chat": {"choices": [{"message": {"content": "Hi", "tool_calls": [
        {"id": "call_1", "function": {"name": "Read", "arguments": "{}"}}]},
        "finish_reason": "tool_calls"}], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
    "responses": {"status": "completed", "output": [
        {"type": "message", "content": [{"type": "output_text", "text": "Hi"}]},
        {"type": "function_call", "call_id": "call_1", "name": "Read", "arguments": "{}"}],
        "usage": {"input_tokens": 5, "output_tokens": 2}},
    "gemini": STREAM_SEEDS["gemini"][2],
}
# What else each protocol's answers hold: refusals, answers cut at the limit, failures and
# errors, search grounding, a blocked prompt, a malformed call, usage details, citations.
STREAM_SEEDS["chat"] += [
    {"choices": [{"index": 0, "delta": {"refusal": "no"}, "finish_reason": "content_filter"}]},
    {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "length"}],
     "usage": {"prompt_tokens": 5, "completion_tokens": 2,
               "prompt_tokens_details": {"cached_tokens": 1},
               "completion_tokens_details": {"reasoning_tokens": 1}}},
    {"error": {"message": "overloaded", "code": 529}},
    {"choices": [{"index": 0, "delta": {"content": "So.\n</th"}}]},        # a thinking the
    {"choices": [{"index": 0, "delta": {"content": "ink>\n\nHi"}}]}]      # template opened
STREAM_SEEDS["responses"] += [
    {"type": "response.refusal.delta", "output_index": 3, "delta": "no"},
    {"type": "response.output_item.done", "output_index": 2, "item": {
        "type": "function_call", "call_id": "call_2", "name": "Read", "arguments": "{}"}},
    {"type": "response.incomplete", "response": {
        "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}},
    {"type": "response.failed", "response": {"error": {"code": "server_error", "message": "x"}}},
    {"type": "error", "code": "rate_limit_exceeded", "message": "slow down"},
    {"type": "response.completed", "response": {"status": "completed", "output": [
        {"type": "web_search_call", "action": {"type": "search", "query": "q", "sources": [
            {"type": "url", "url": "https://x"}]}},
        {"type": "message", "content": [{"type": "output_text", "text": "Hi", "annotations": [
            {"type": "url_citation", "url": "https://y", "title": "t", "start_index": 0,
             "end_index": 2}]}]}]}}]
STREAM_SEEDS["gemini"] += [
    {"candidates": [{"content": {"parts": [{"functionCall": {"name": "Read", "args": {}},
                                            "thoughtSignature": "sig"}]},
                     "finishReason": "STOP", "groundingMetadata": {
                         "webSearchQueries": ["q"],
                         "groundingChunks": [{"web": {"uri": "https://x", "title": "t"}}],
                         "groundingSupports": [{"segment": {"endIndex": 2, "text": "Hi"},
                                                "groundingChunkIndices": [0]}]}}]},
    {"promptFeedback": {"blockReason": "SAFETY"}},
    {"candidates": [{"finishReason": "MALFORMED_FUNCTION_CALL"}]},
    {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "slow", "details": [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "3s"}]}}]
WHOLE_SEEDS = {protocol: [answer] for protocol, answer in WHOLE_SEEDS.items()}
WHOLE_SEEDS["chat"].append({"choices": [{"message": {
    "content": "Hi", "reasoning_content": "r", "refusal": "no"}, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2,
              "prompt_tokens_details": {"cached_tokens": 1}}})
WHOLE_SEEDS["responses"].append({
    "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"},
    "output": [{"type": "reasoning", "id": "rs_1", "encrypted_content": "e",
                "summary": [{"type": "summary_text", "text": "x"}]},
               {"type": "web_search_call", "action": {"type": "open_page", "url": "https://z"}},
               {"type": "web_search_call", "action": {
                   "type": "search", "queries": ["q"], "sources": [{"type": "url",
                                                                     "url": "https://x"}]}},
               {"type": "message", "content": [
                   {"type": "output_text", "text": "Hi", "annotations": [
                       {"type": "url_citation", "url": "https://x", "title": "t"}]},
                   {"type": "refusal", "refusal": "no"}]}]})
WHOLE_SEEDS["gemini"].append({
    "candidates": [{"content": {"parts": [{"text": "a", "thought": True, "thoughtSignature": "s"},
                                          {"text": "b"}]},
                    "finishReason": "MAX_TOKENS"}],
    "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2,
                      "cachedContentTokenCount": 1, "thoughtsTokenCount": 1}})
PROTOCOL_OF = {"chat": ccproxy.PROTOCOLS["openai"],
               "responses": ccproxy.PROTOCOLS["openai-responses"],
               "gemini": ccproxy.PROTOCOLS["gemini"]}


@settings(max_examples=400, deadline=None)
@given(protocol=st.sampled_from(sorted(STREAM_SEEDS)), search=st.booleans(), data=st.data())
def test_streams_a_provider_gets_almost_right_translate_in_order_or_fail_cleanly(protocol, search,
                                                                                data):
    """Each protocol's usual events, with any value in them replaced by any other."""
    events = data.draw(st.lists(st.sampled_from(STREAM_SEEDS[protocol]), min_size=1, max_size=9))
    server = data.draw(st.sampled_from(["openai", "vllm", "vllm-opened"]))
    check_translated(PROTOCOL_OF[protocol].stream_translator(translation_context(search, server)),
                     [("", event) for event in changed_anywhere(data, events)
                      if isinstance(event, dict)])


@settings(max_examples=400, deadline=None)
@given(protocol=st.sampled_from(sorted(WHOLE_SEEDS)), search=st.booleans(), data=st.data())
def test_answers_a_provider_gets_almost_right_translate_or_fail_cleanly(protocol, search, data):
    answer = changed_anywhere(data, data.draw(st.sampled_from(WHOLE_SEEDS[protocol])))
    server = data.draw(st.sampled_from(["openai", "vllm", "vllm-opened"]))
    check_whole(PROTOCOL_OF[protocol], answer, translation_context(search, server))


@settings(max_examples=600, deadline=None)
@given(st.lists(chunk_like, max_size=6), st.sampled_from(["openai", "vllm", "vllm-opened"]))
def test_stream_translators_survive_any_chunks(chunks, server):
    for translator in (ccproxy.OpenAIStreamTranslator(translation_context(server=server)),
                       ccproxy.GeminiStreamTranslator(translation_context())):
        check_translated(translator, [("", chunk) for chunk in chunks if isinstance(chunk, dict)])


responses_keys = st.sampled_from(["type", "output_index", "item", "response", "delta", "id",
                                  "summary_index", "call_id", "name", "arguments", "status",
                                  "output", "usage", "error", "summary", "encrypted_content",
                                  "content", "text", "input_tokens", "incomplete_details"])
responses_like = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                              lambda children: st.lists(children, max_size=3)
                              | st.dictionaries(responses_keys, children, max_size=4),
                              max_leaves=12)
responses_events = st.fixed_dictionaries(
    {"type": st.sampled_from(sorted(ccproxy.RESPONSES_EVENT_HANDLERS)) | responses_like},
    optional={key: responses_like for key in ("output_index", "item", "response", "delta",
                                              "summary_index")})


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["", "error", "message"]), responses_events | st.none()),
                max_size=6))
def test_the_responses_stream_translator_survives_any_events(events):
    """Any event a Responses stream may hold, of any shape, is translated in the Anthropic
    order or refused with a provider error; none is a bug in ccproxy."""
    check_translated(ccproxy.ResponsesStreamTranslator(translation_context()), events)


@settings(max_examples=600, deadline=None)
@given(chunk_like | responses_like)
def test_whole_answers_of_any_shape_translate_or_fail_cleanly(answer):
    for protocol in PROTOCOL_OF.values():
        check_whole(protocol, answer, translation_context())


def check_whole(protocol, answer, context) -> None:
    """A provider's whole answer is a well-formed message, and streams as one, or it is refused
    with a provider error."""
    try:
        message = protocol.message(json.loads(json.dumps(answer), **ccproxy.PROVIDER_JSON_NUMBERS),
                                   context)
    except ccproxy.ProxyError:
        return
    check_message(json.loads(json.dumps(message)))
    check_grammar(parse_events(ccproxy.events_from_message(message, context)))


# What each kind of block must hold, and of what type.
BLOCK_FIELDS = {"text": {"text": str}, "thinking": {"thinking": str, "signature": str},
                "redacted_thinking": {"data": str},
                "tool_use": {"id": str, "name": str, "input": dict},
                "server_tool_use": {"id": str, "name": str, "input": dict}}


def check_message(message: dict) -> None:
    """A whole Anthropic message as the SDKs parse one."""
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["stop_reason"] in STOP_REASONS
    assert all(isinstance(message["usage"][name], int)
               for name in ("input_tokens", "output_tokens"))
    for block in message["content"]:
        for field, kind in BLOCK_FIELDS.get(block["type"], {}).items():
            assert isinstance(block[field], kind), block


# --- every content block type, through every translator -----------------------------------------

def marked(kind):
    return "MARK_" + kind.upper()


USER_BLOCKS = {
    "text": {"type": "text", "text": marked("text")},
    "image": {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                          "data": marked("image")}},
    "document": {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                                "data": marked("document")}},
    "search_result": {"type": "search_result", "source": "https://s.example", "title": "T",
                      "content": [{"type": "text", "text": marked("search_result")}]},
    "container_upload": {"type": "container_upload", "file_id": "file_1"},
    "hologram": {"type": "hologram", "text": marked("hologram")},
}
ASSISTANT_BLOCKS = {
    "text": {"type": "text", "text": marked("text")},
    "tool_use": {"type": "tool_use", "id": "toolu_1", "name": "Read",
                 "input": {"path": marked("tool_use")}},
    "server_tool_use": {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search",
                        "input": {"query": marked("server_tool_use")}},
    "web_search_tool_result": {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1",
                               "content": [{"type": "web_search_result", "title": "T",
                                            "url": "https://%s.example" % marked("result"),
                                            "encrypted_content": "ENCRYPTED_NEVER_SENT"}]},
    "web_fetch_tool_result": {"type": "web_fetch_tool_result", "tool_use_id": "srvtoolu_2",
                              "content": {"type": "web_fetch_result", "url": "https://f.example",
                                          "content": {"type": "document", "source": {
                                              "type": "text", "media_type": "text/plain",
                                              "data": marked("web_fetch")}}}},
    "code_execution_tool_result": {"type": "code_execution_tool_result", "tool_use_id": "x",
                                   "content": {"type": "code_execution_result", "return_code": 0,
                                               "stdout": marked("code_execution"), "stderr": ""}},
    "advisor_tool_result": {"type": "advisor_tool_result", "tool_use_id": "srvtoolu_3",  # /advisor
                            "content": {"type": "advisor_result", "text": marked("advisor")}},
    "mcp_tool_use": {"type": "mcp_tool_use", "id": "mcptoolu_1", "name": "lookup",
                     "server_name": "docs", "input": {"q": marked("mcp_tool_use")}},
    "mcp_tool_result": {"type": "mcp_tool_result", "tool_use_id": "mcptoolu_1",
                        "content": [{"type": "text", "text": marked("mcp_tool_result")}]},
    "thinking": {"type": "thinking", "thinking": marked("thinking"), "signature": "s"},
    "redacted_thinking": {"type": "redacted_thinking", "data": marked("redacted")},
    "container_upload": {"type": "container_upload", "file_id": "file_1"},
    "hologram": {"type": "hologram", "text": marked("hologram")},
}
# Dropped on purpose, and documented: another provider's thinking means nothing elsewhere.
DROPPED = {"thinking", "redacted_thinking"}


@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.name)
@pytest.mark.parametrize("role, kind", [("user", k) for k in USER_BLOCKS] +
                         [("assistant", k) for k in ASSISTANT_BLOCKS])
def test_every_block_type_is_carried_as_readable_content_or_refused_by_name(provider, role, kind):
    block = (USER_BLOCKS if role == "user" else ASSISTANT_BLOCKS)[kind]
    messages = [{"role": "user", "content": "start"}, {"role": role, "content": [block]},
                {"role": "user", "content": "go on"}]
    if kind == "tool_use":
        messages.append({"role": "user", "content": [{"type": "tool_result",
                                                      "tool_use_id": "toolu_1", "content": "ok"}]})
    translate = ccproxy.PROTOCOLS[provider.protocol].messages_request
    request = ccproxy.Request("POST", "/v1/messages", "HTTP/1.1", ccproxy.Headers())
    try:
        sent = translate(provider, "model-x", request, {"model": "m", "max_tokens": 5,
                                                        "messages": messages}).body.decode()
    except ccproxy.InvalidRequestError as error:
        assert repr(kind) in error.message and kind in ("container_upload", "hologram")
        return
    assert "ENCRYPTED_NEVER_SENT" not in sent
    readable = re.findall(r"MARK_[A-Z_]+", json.dumps(block))
    if kind in DROPPED or (kind == "image" and not provider.model_quirks("model-x")["vision"]):
        return
    assert readable and all(value in sent for value in readable), (kind, sent)


# --- tool search: deferred tools and the tool references that load them --------------------------

DEFERRED = {"model": "m", "max_tokens": 5, "tools": [
    {"name": "Bash", "input_schema": {"type": "object"}},
    {"name": "ToolSearch", "input_schema": {"type": "object"}},
    {"name": "WebSearch", "input_schema": {"type": "object"}, "defer_loading": True},
    {"name": "NotebookEdit", "input_schema": {"type": "object"}, "defer_loading": True}]}
LOADED = [{"role": "user", "content": "search the web"},
          {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_9",
                                             "name": "ToolSearch",
                                             "input": {"query": "select:WebSearch"}}]},
          {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9",
                                        "content": [{"type": "tool_reference",
                                                     "tool_name": "WebSearch"}]},
                                       {"type": "text", "text": "Tool loaded."}]}]


def sent_tools(provider, messages):
    """(the tool names sent, the body sent) for a conversation."""
    request = ccproxy.Request("POST", "/v1/messages", "HTTP/1.1", ccproxy.Headers())
    outgoing = ccproxy.PROTOCOLS[provider.protocol].messages_request(
        provider, "model-x", request, dict(DEFERRED, messages=messages))
    sent = json.loads(outgoing.body)
    names = [d["name"] for t in sent.get("tools", ()) for d in t.get("functionDeclarations", ())] \
        if provider.protocol == "gemini" else [t["function"]["name"] for t in sent.get("tools", ())]
    return names, outgoing.body.decode()


@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.name)
def test_deferred_tools_are_sent_once_a_tool_reference_loaded_them(provider):
    assert sent_tools(provider, [{"role": "user", "content": "hi"}])[0] == ["Bash", "ToolSearch"]
    names, sent = sent_tools(provider, LOADED)
    assert names == ["Bash", "ToolSearch", "WebSearch"]
    assert "[tool loaded: WebSearch]" in sent


# --- a history Anthropic takes, whatever a session holds -------------------------------------------

HISTORY_TEXTS = st.sampled_from(["ok", "", " ", "\n\t", "done."])
HISTORY_IDS = st.sampled_from(["toolu_1", "functions.Bash:0", "call_0", "a b", "ccpxre_x"])


@st.composite
def histories(draw):
    """A session as Claude Code may send it after other providers and interruptions: blank
    texts, foreign and unsigned thinking, calls without results, results without calls, ids
    of any form, some repeated."""
    messages, ids = [], iter(range(1000))
    for _ in range(draw(st.integers(1, 7))):
        role = draw(st.sampled_from(["user", "assistant", "user", "assistant", "system"]))
        if role == "system":                  # as Claude Code sends one: at times between
            messages.append({"role": role, "content": "Working directory: /w"})   # calls
            continue                                                        # and results
        content = []
        for _ in range(draw(st.integers(0, 3))):
            kind = draw(st.sampled_from(["text", "call", "result", "thinking"]))
            if kind == "text":
                content.append({"type": "text", "text": draw(HISTORY_TEXTS)})
            elif kind == "call" and role == "assistant":
                kind = draw(st.integers(0, 9))        # an id of its own, a repeat, none
                content.append({"type": "tool_use", "name": "Bash", "input": {},
                                "id": "%s%d" % (draw(HISTORY_IDS), next(ids)) if kind > 2
                                else draw(HISTORY_IDS) if kind else draw(st.sampled_from(
                                    [None, 7]))})
            elif kind == "result" and role == "user":
                called = [b["id"] for m in messages for b in ccproxy.content_blocks(
                    m["content"]) if b["type"] == "tool_use"] + ["gone"]
                content.append({"type": "tool_result", "tool_use_id": draw(st.sampled_from(
                    called)), "content": draw(HISTORY_TEXTS)})
            elif kind == "thinking" and role == "assistant":
                content.append({"type": "thinking", "thinking": "hm", "signature": draw(
                    st.sampled_from(["", "ccpx1.openai", "EqQBCkYIAxgC"]))})
        messages.append({"role": role, "content": content or draw(HISTORY_TEXTS)})
    return messages


@settings(max_examples=400, deadline=None)
@given(histories())
def test_a_history_reaches_anthropic_as_it_takes_it(messages):
    """What Anthropic gets holds no blank text, no thinking but its own, no message without
    content but the last, ids of its form, no id twice, and each call answered right after it
    by a result of its own, each result after its call (system messages aside, which it takes
    between them): the rules on which it refuses a whole session."""
    anthropic = ccproxy.build_config({"providers": [{"name": "anthropic", "api_key": "k"}]},
                                     "c", {}).providers[0]
    sent = ccproxy.anthropic_messages_for({"messages": messages}, anthropic) or messages
    assert [m for m in sent if m["role"] == "system"] == [
        m for m in messages if m["role"] == "system"]
    sent = [m for m in sent if m["role"] != "system"]
    ids = [b["id"] for m in sent for b in ccproxy.content_blocks(m["content"])
           if b["type"] == "tool_use" and isinstance(b["id"], str)]
    assert len(ids) == len(set(ids))
    for number, message in enumerate(sent):
        blocks = ccproxy.content_blocks(message["content"])
        assert blocks or number == len(sent) - 1
        for block in blocks:
            assert block["type"] != "text" or block["text"].strip() or len(blocks) == 1 \
                and number == len(sent) - 1 or isinstance(message["content"], str)
            assert block["type"] != "thinking" or block["signature"] == "EqQBCkYIAxgC"
            assert block["type"] != "tool_use" or not isinstance(block["id"], str) or \
                re.fullmatch(r"[a-zA-Z0-9_-]+", block["id"])
        calls = [b["id"] for b in blocks if b["type"] == "tool_use" and isinstance(b["id"], str)]
        answered = [b["tool_use_id"] for m in sent[number + 1:number + 2]
                    for b in ccproxy.content_blocks(m["content"]) if b["type"] == "tool_result"
                    and m["role"] == "user"]
        if message["role"] == "assistant" and number < len(sent) - 1:
            assert sorted(answered) == sorted(calls)
        if message["role"] == "user":
            before = sent[number - 1] if number else {"role": "user", "content": []}
            results = [b["tool_use_id"] for b in blocks if b["type"] == "tool_result"]
            assert not results or before["role"] == "assistant"


# --- nothing unknown is silent ---------------------------------------------------------------------

def test_an_unknown_field_block_or_tool_field_is_logged_once_by_name(caplog):
    protocol = ccproxy.OpenAIChatProtocol()
    body = {"model": "m", "max_tokens": 5, "telepathy": {"secret": "VALUE-NEVER-LOGGED"},
            "messages": [{"role": "user", "content": [{"type": "hologram", "text": "x"}]}],
            "tools": [{"name": "f", "input_schema": {}, "sparkle": "VALUE-NEVER-LOGGED"}]}
    with caplog.at_level("WARNING", logger="ccproxy"):
        protocol.check_request(body)
        protocol.check_request(body)
    lines = [r.getMessage() for r in caplog.records]
    assert sorted(lines) == [
        "openai translation: the block 'hologram' is new to ccproxy and was not translated",
        "openai translation: the field 'telepathy' is new to ccproxy and was not translated",
        "openai translation: the tool field 'sparkle' is new to ccproxy and was not translated"]
    assert "VALUE-NEVER-LOGGED" not in caplog.text


def test_a_client_making_up_names_fills_neither_memory_nor_the_log(caplog):
    protocol = ccproxy.OpenAIChatProtocol()
    long_name = "x" * 10_000
    with caplog.at_level("WARNING", logger="ccproxy"):
        protocol.check_request({long_name: 1})
        for number in range(ccproxy.MAX_UNKNOWN_NAMES_LOGGED + 50):
            protocol.check_request({"made_up_%d" % number: 1})
    assert len(caplog.records) == ccproxy.MAX_UNKNOWN_NAMES_LOGGED
    assert len(protocol._warned) == ccproxy.MAX_UNKNOWN_NAMES_LOGGED
    assert "'%s'" % ("x" * ccproxy.MAX_LOGGED_NAME_CHARS) in caplog.records[0].getMessage()
    assert len(caplog.records[0].getMessage()) < 200


def test_what_a_translation_cannot_carry_is_refused_naming_it():
    with pytest.raises(ccproxy.InvalidRequestError, match="field 'mcp_servers' cannot be sent "
                                                          "to a gemini provider: Anthropic's MCP"):
        ccproxy.PROTOCOLS["gemini"].check_request({"mcp_servers": [{"url": "https://m"}]})
    ccproxy.PROTOCOLS["anthropic"].check_request({"mcp_servers": []})     # passed on as is


@pytest.mark.parametrize("version", ["2.1.197", "2.1.330"])
@pytest.mark.parametrize("name", ["openai", "gemini"])
def test_everything_claude_code_sends_is_known_to_every_translation(claude_code_requests, version,
                                                                    name, caplog):
    protocol = type(ccproxy.PROTOCOLS[name])()          # a fresh one: nothing warned yet
    with caplog.at_level("WARNING", logger="ccproxy"):
        for request in claude_code_requests[version]:
            protocol.check_request(request["json"])
    assert caplog.records == []


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats()
                           | st.text(), lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=6), children, max_size=4),
                           max_leaves=20)


@pytest.mark.parametrize("without_c_encoder", [False, True])
@given(value=json_values)
def test_json_made_once_is_what_json_dumps_writes(value, without_c_encoder):
    """The encoders made once (events, bodies) write exactly what json.dumps does, with the C
    encoder or, in a Python without it, through json.dumps itself."""
    make = json.encoder.c_make_encoder
    try:
        if without_c_encoder:
            json.encoder.c_make_encoder = None
        spaced, compact = ccproxy.json_text_function(), ccproxy.json_text_function((",", ":"))
    finally:
        json.encoder.c_make_encoder = make
    assert spaced(value) == json.dumps(value, ensure_ascii=False)
    assert compact(value) == json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    assert ccproxy.JSON_TEXT(value) == json.dumps(value, ensure_ascii=False)


def test_json_made_once_refuses_what_json_dumps_refuses():
    for encode in (ccproxy.JSON_TEXT, ccproxy.COMPACT_JSON_TEXT):
        with pytest.raises(TypeError, match="not JSON serializable"):
            encode({"a": object()})


# --- provider answers of any shape, through the running proxy -------------------------------------

SSE_ODDITIES = [b"data: {bad json\n\n", b": a comment\n\n", b"data: [DONE]\n\n", b"data: 1\n\n",
                b"event: error\n", b"\n\n\n", b"data: \xff\xfe\n\n"]


@pytest.fixture(scope="module")
def answering_proxy():
    """A proxy in front of one mock that answers as each test example scripts it, for a Chat
    Completions, a Responses, a Gemini and an Anthropic provider."""
    upstream = MockUpstream()
    config = ccproxy.build_config({"port": 0, "failover": False, "providers": [
        {"name": "anthropic", "api_base_url": upstream.url, "api_key": "k"},
        {"name": "chat", "type": "openai", "api_base_url": upstream.url + "/v1", "api_key": "k"},
        {"name": "responses", "type": "openai", "api": "responses",
         "api_base_url": upstream.url + "/v1", "api_key": "k"},
        {"name": "gemini", "api_base_url": upstream.url + "/v1beta", "api_key": "k"}]},
        "c.json", {})
    proxy = RunningProxy(config)
    yield proxy, upstream
    proxy.stop()
    upstream.close()


def any_answer(data, protocol: str, stream: bool) -> Reply:
    """The provider's answer: its usual events or whole answer, with any of them replaced by
    any other value and values anywhere in them changed (NaN and Infinity among them, which
    Python's JSON writes), SSE oddities between, and the stream cut short or not."""
    shaped = chunk_like | responses_events | responses_like
    if not stream:
        answer = data.draw(st.sampled_from(WHOLE_SEEDS[protocol]) | shaped)
        return Reply(200, json.dumps(changed_anywhere(data, answer)).encode())
    events = data.draw(st.lists(st.sampled_from(STREAM_SEEDS[protocol]) | shaped, max_size=8))
    pieces = [b"data: %s\n\n" % json.dumps(event).encode()
              for event in changed_anywhere(data, events)]
    for oddity in data.draw(st.lists(st.sampled_from(SSE_ODDITIES), max_size=2)):
        pieces.insert(data.draw(st.integers(0, len(pieces))), oddity)
    return Reply(200, pieces=pieces, content_type="text/event-stream", cut=data.draw(st.booleans()))


@settings(max_examples=200, deadline=None)
@given(protocol=st.sampled_from(sorted(STREAM_SEEDS)), stream=st.booleans(), data=st.data())
def test_provider_answers_of_any_shape_reach_the_client_well_formed(answering_proxy, protocol,
                                                                   stream, data):
    """Whatever a provider answers, the client gets an Anthropic message, an event stream in
    the Anthropic order (ended by an error event when the answer broke off), or an error; none
    is a bug in ccproxy."""
    proxy, upstream = answering_proxy
    reply = any_answer(data, protocol, stream)
    upstream.script = lambda request: reply
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    connection.request("POST", "/v1/messages", json.dumps({
        "model": protocol + ",m", "max_tokens": 50, "stream": stream,
        "tools": [{"name": "Read", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": "hi"}]}))
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert b"internal error in ccproxy" not in body
    if response.status != 200:
        error = strict_json(body)
        assert error["type"] == "error" and isinstance(error["error"]["message"], str)
    elif stream:
        events = parse_events(body)
        check_grammar(events, finished=events[-1][0] != "error")
    else:
        check_message(strict_json(body))


ANTHROPIC_EVENTS = parse_events(b"".join(anthropic_stream_events()))


def client_events(body: bytes) -> list:
    """(event name, data) of each event of a stream as a client's SDK reads it (comments, and
    events without data or without a name, skipped), each event's data parsed as JSON."""
    events = []
    for frame in re.split(rb"\r?\n\r?\n", body)[:-1]:
        fields = [line.rstrip(b"\r").partition(b":")[::2] for line in frame.split(b"\n")]
        data = [value[1:] if value[:1] == b" " else value for name, value in fields
                if name == b"data"]
        names = [value.strip() for name, value in fields if name == b"event"]
        if data and names:
            events.append((names[-1].decode(), strict_json(b"\n".join(data).decode())))
    return events


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_a_pass_through_stream_of_any_shape_reaches_the_client_readable(answering_proxy, data):
    """Whatever an Anthropic-compatible server streams, every event its client gets carries a
    JSON object (an SDK parses each one), and the stream ends with message_stop, or with an
    error event when the provider's did not end so."""
    proxy, upstream = answering_proxy
    payloads = changed_anywhere(data, [payload for _, payload in ANTHROPIC_EVENTS])
    pieces = [b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(payload).encode())
              for (name, _), payload in zip(ANTHROPIC_EVENTS, payloads)]
    for oddity in data.draw(st.lists(st.sampled_from(SSE_ODDITIES), max_size=2)):
        pieces.insert(data.draw(st.integers(0, len(pieces))), oddity)
    pieces = pieces[:data.draw(st.integers(1, len(pieces)))]
    reply = Reply(200, pieces=pieces, content_type="text/event-stream",
                  cut=data.draw(st.booleans()))
    upstream.script = lambda request: reply
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    connection.request("POST", "/v1/messages", json.dumps({
        "model": "anthropic,m", "max_tokens": 50, "stream": True,
        "messages": [{"role": "user", "content": "hi"}]}))
    response = connection.getresponse()
    body = response.read()
    connection.close()
    if response.status != 200:
        assert strict_json(body)["type"] == "error" and response.status == 502
        return
    events = client_events(body)
    assert all(isinstance(payload, dict) for _, payload in events)
    assert events and events[-1][0] in ("message_stop", "error")


# --- a provider's error words: whatever numbers they hold, read without fail ----------------------

ERROR_WORDS = ["maximum context length is ", " tokens. However, you requested ", " tokens (",
               " in the messages, ", " in the completion)", "must be less than or equal to ",
               "supports at most ", " completion tokens", "valid range of max_tokens is [1, ",
               "on tokens per minute (TPM): Limit ", ", Requested ", "You requested up to ",
               " tokens, but can only afford ", "is too large: ", "request has ",
               " input tokens", "Given: ", " `inputs` tokens and ", " `max_new_tokens`",
               "context size (", "free-models-per-day", "`max_new_tokens` must be <= ", ",",
               "The max_tokens parameter is illegal.\uff1a[1,", "]",
               "exceeded model token limit: ", " (requested: ", ")"]
error_numbers = st.one_of(st.integers(0, 10 ** 7).map(str), st.integers(0, 10 ** 7).map(
    "{:,}".format), st.integers(1, 6000).map(lambda n: "9" * n))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(ERROR_WORDS), error_numbers), max_size=12),
       st.sampled_from([400, 402, 413, 429, 500]), st.integers(1, 200000))
def test_a_providers_error_words_are_read_without_fail(parts, status, max_tokens):
    """Numbers of any size in a provider's error (Python 3.11 refuses int() of over 4,300
    digits) never turn its error into ccproxy's own 500: every rewording reads them or lets
    them be."""
    message = "".join(parts)
    provider = ccproxy.build_config({"providers": [{"name": "groq", "api_key": "k"}]}, "c",
                                    {}).providers[0]
    error = ccproxy.error_for_status(status, message)
    ccproxy.overflow_message(message, max_tokens)
    ccproxy.learns_output_limit(error, provider, "m", {"max_tokens": max_tokens})
    ccproxy.affordable_body(error, provider, {"max_tokens": max_tokens})
    ccproxy.over_the_plan(error, ccproxy.Routing(provider, "m", "default"))
