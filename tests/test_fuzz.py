"""Bad input never crashes a translator: any body that passes validation either translates to
JSON or is refused with a 400 saying why."""
from __future__ import annotations

import json

from hypothesis import given, settings, strategies as st

import ccproxy

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


@settings(max_examples=400, deadline=None)
@given(bodies)
def test_translators_give_json_or_a_400(body):
    try:
        ccproxy.check_messages_request(body)
    except ccproxy.InvalidRequestError:
        return
    for provider in PROVIDERS:
        translate = ccproxy.gemini_request_from_anthropic if provider.protocol == "gemini" \
            else ccproxy.openai_request_from_anthropic
        try:
            json.dumps(translate(json.loads(json.dumps(body)), provider, "model-x"))
        except ccproxy.InvalidRequestError:
            pass


chunk_keys = st.sampled_from(["choices", "delta", "usage", "error", "candidates", "content",
                              "parts", "finishReason", "finish_reason", "tool_calls", "function",
                              "arguments", "index", "id", "name", "text", "thought", "reasoning",
                              "functionCall", "args", "thoughtSignature", "usageMetadata",
                              "promptFeedback", "blockReason", "reasoning_content", "x_groq",
                              "object", "status", "code", "message", "details", "retryDelay",
                              "refusal", "function_call", "prompt_tokens", "cached_tokens"])
chunk_like = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                          lambda children: st.lists(children, max_size=3)
                          | st.dictionaries(chunk_keys, children, max_size=4), max_leaves=12)


@settings(max_examples=600, deadline=None)
@given(st.lists(chunk_like, max_size=6))
def test_stream_translators_survive_any_chunks(chunks):
    config = ccproxy.build_config({"providers": [{"name": "openai", "api_key": "k"}]}, "c", {})
    request = ccproxy.Request("POST", "/v1/messages", "HTTP/1.1", ccproxy.Headers())
    context = ccproxy.TranslationContext(config.providers[0], request, {"model": "m"},
                                         ccproxy.openai_tool_name)
    for translator in (ccproxy.OpenAIStreamTranslator(context),
                       ccproxy.GeminiStreamTranslator(context)):
        try:
            for chunk in chunks:
                if isinstance(chunk, dict):
                    translator.feed(chunk)
            translator.finish()
        except ccproxy.ProxyError:
            pass


@settings(max_examples=600, deadline=None)
@given(chunk_like)
def test_whole_answers_of_any_shape_translate_or_fail_cleanly(answer):
    config = ccproxy.build_config({"providers": [{"name": "openai", "api_key": "k"}]}, "c", {})
    request = ccproxy.Request("POST", "/v1/messages", "HTTP/1.1", ccproxy.Headers())
    context = ccproxy.TranslationContext(config.providers[0], request, {"model": "m"},
                                         ccproxy.openai_tool_name)
    for protocol in (ccproxy.PROTOCOLS["openai"], ccproxy.PROTOCOLS["gemini"]):
        try:
            message = protocol.message(answer, context)
        except ccproxy.ProxyError:
            continue
        json.dumps(message)
        ccproxy.events_from_message(message, context)
