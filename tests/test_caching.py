"""Prompt caching across translation: each translator's upstream body keeps the prefix of the
conversation byte for byte from one turn of a Claude Code session to the next, and each
provider gets its own cache hints (OpenAI's prompt_cache_key and retention, OpenRouter's
cache_control on the models it honours it for)."""
from __future__ import annotations

import copy
import hashlib
import json

import pytest

import ccproxy
from helpers import CLAUDE_CODE_VERSIONS, json_reply, sdk, without_cache_marks

KEY = "sk-cache-0123456789abcdef"
SESSION = "849a35f4-1ce4-446c-aaf4-e7527036ca53"


def session_turns(first: dict, count: int) -> list:
    """A Claude Code session of `count` turns from its first request: each turn adds the
    assistant's thinking, text and Bash call and the call's result, the cache mark moved to the
    newest block, as Claude Code does."""
    turns, body = [first], copy.deepcopy(first)
    for number in range(1, count):
        body = without_cache_marks(body)
        body["system"] = first["system"]                  # the system prompt keeps its marks
        body["messages"] += [
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Step %d." % number,
                 "signature": "ccpx1.deepseek"},
                {"type": "text", "text": "Running step %d." % number},
                {"type": "tool_use", "id": "toolu_%02d" % number, "name": "Bash",
                 "input": {"command": "ls -la %d" % number, "description": "List"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_%02d" % number,
                 "content": "total %d\nfile-%d.txt" % (number, number),
                 "cache_control": {"type": "ephemeral"}}]}]
        turns.append(copy.deepcopy(body))
    return turns


def provider(name, **fields):
    config = ccproxy.build_config({"providers": [dict({"name": name, "api_key": KEY,
                                                       "models": ["m"]}, **fields)]}, "c", {})
    return config.providers[0]


# translator -> (the function that builds the upstream body, provider, model)
TRANSLATORS = {
    "openai": (ccproxy.openai_request_from_anthropic, "openai", "gpt-5"),
    "openrouter": (ccproxy.openai_request_from_anthropic, "openrouter",
                   "anthropic/claude-sonnet-4.5"),
    "deepseek": (ccproxy.openai_request_from_anthropic, "deepseek", "deepseek-v4-pro"),
    "mistral": (ccproxy.openai_request_from_anthropic, "mistral", "mistral-large-latest"),
    "openai-responses": (ccproxy.responses_request_from_anthropic, "openai", "gpt-5-codex"),
    "gemini": (ccproxy.gemini_request_from_anthropic, "gemini", "gemini-2.5-pro"),
}


def translated(translator: str, body: dict) -> dict:
    build, name, model = TRANSLATORS[translator]
    return build(body, provider(name), model)


def prefix_parts(upstream: dict) -> tuple:
    """(what must not change between turns: everything but the conversation; the conversation's
    items, each serialized), cache marks aside."""
    upstream = without_cache_marks(upstream)
    conversation_key = next(k for k in ("messages", "input", "contents") if k in upstream)
    items = [json.dumps(item, ensure_ascii=False) for item in upstream.pop(conversation_key)]
    return json.dumps(upstream, ensure_ascii=False), items


@pytest.mark.parametrize("version", CLAUDE_CODE_VERSIONS)
@pytest.mark.parametrize("translator", sorted(TRANSLATORS))
def test_each_turn_keeps_the_previous_turns_upstream_prefix(claude_code_requests, version,
                                                            translator):
    first = copy.deepcopy(claude_code_requests[version][0]["json"])
    bodies = [translated(translator, turn) for turn in session_turns(first, 5)]
    for before, after in zip(bodies, bodies[1:]):
        (head_before, items_before), (head_after, items_after) = map(prefix_parts,
                                                                     (before, after))
        assert head_after == head_before                       # system, tools, settings
        assert items_after[:len(items_before)] == items_before      # every earlier item
        assert len(items_after) > len(items_before)


# --- cache hints ------------------------------------------------------------------------------

def openai_answer(request):
    if request["path"].endswith("/responses"):
        from test_responses import message_item, response
        return json_reply(response([message_item("ok")]))
    return json_reply({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": "ok"}}]})


def ask(proxy, model, session=SESSION, ttl=None):
    system = [{"type": "text", "text": "You are terse.",
               "cache_control": dict({"type": "ephemeral"}, **({"ttl": ttl} if ttl else {}))}]
    sdk(proxy).messages.create(
        model=model, max_tokens=50, system=system, messages=[{"role": "user", "content": [
            {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}],
        extra_headers={"x-claude-code-session-id": session} if session else {})


@pytest.mark.parametrize("model", ["gpt-5", "gpt-5-codex", "gpt-4o"])
def test_openai_gets_a_session_cache_key_and_a_day_long_cache_when_an_hour_is_asked(
        start_proxy, upstream, model):
    upstream.script = openai_answer
    proxy = start_proxy({"providers": [{"name": "openai", "api_key": KEY,
                                        "api_base_url": upstream.url + "/v1"}]})
    ask(proxy, "openai," + model, ttl="1h")
    ask(proxy, "openai," + model, session="another-session")
    ask(proxy, "openai," + model, session=None)
    first, second, third = (r["json"] for r in upstream.requests)
    digest = hashlib.sha256(("openai\0" + SESSION).encode()).hexdigest()[:40]
    assert first["prompt_cache_key"] == "ccpx-" + digest and SESSION not in json.dumps(first)
    assert second["prompt_cache_key"] not in (first["prompt_cache_key"], None)
    assert "prompt_cache_key" not in third
    assert first.get("prompt_cache_retention") == ("24h" if model.startswith("gpt-5") else None)
    assert "prompt_cache_retention" not in second          # no hour-long cache asked for


@pytest.mark.parametrize("version, has_key", [("v1", True), ("2025-04-01-preview", False)])
def test_azure_gets_the_cache_key_on_its_v1_api(start_proxy, upstream, version, has_key):
    upstream.script = openai_answer
    proxy = start_proxy({"providers": [{"name": "corp", "type": "azure", "api_key": KEY,
                                        "api_base_url": upstream.url, "api_version": version}]})
    ask(proxy, "corp,gpt-5")
    assert ("prompt_cache_key" in upstream.requests[0]["json"]) is has_key


def test_other_openai_compatible_providers_get_no_cache_key(start_proxy, upstream):
    upstream.script = openai_answer
    proxy = start_proxy({"providers": [{"name": "groq", "api_key": KEY,
                                        "api_base_url": upstream.url + "/v1"}]})
    ask(proxy, "groq,openai/gpt-oss-120b", ttl="1h")
    assert not {"prompt_cache_key", "prompt_cache_retention"} & set(upstream.requests[0]["json"])


@pytest.mark.parametrize("model, kept", [("anthropic/claude-sonnet-4.5", True),
                                         ("google/gemini-2.5-pro", True),
                                         ("openai/gpt-5", False)])
def test_openrouter_keeps_cache_control_for_the_models_it_honours_it_for(start_proxy, upstream,
                                                                         model, kept):
    upstream.script = openai_answer
    proxy = start_proxy({"providers": [{"name": "openrouter", "api_key": KEY,
                                        "api_base_url": upstream.url + "/v1"}]})
    ask(proxy, "openrouter," + model)
    system, user = upstream.requests[0]["json"]["messages"]
    if kept:
        assert system["content"] == [{"type": "text", "text": "You are terse.",
                                      "cache_control": {"type": "ephemeral"}}]
        assert user["content"] == [{"type": "text", "text": "hi",
                                    "cache_control": {"type": "ephemeral"}}]
    else:
        assert (system["content"], user["content"]) == ("You are terse.", "hi")


def test_openrouter_keeps_the_mark_claude_code_puts_on_the_newest_tool_result():
    body = {"model": "m", "max_tokens": 10, "messages": [
        {"role": "user", "content": "list"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash",
                                           "input": {"command": "ls"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": "a.txt",
                                      "cache_control": {"type": "ephemeral"}}]}]}
    marked = ccproxy.openai_request_from_anthropic(body, provider("openrouter"),
                                                   "anthropic/claude-sonnet-4.5")
    assert marked["messages"][-1]["content"] == [
        {"type": "text", "text": "a.txt", "cache_control": {"type": "ephemeral"}}]
    plain = ccproxy.openai_request_from_anthropic(body, provider("openrouter"), "openai/gpt-5")
    assert plain["messages"][-1]["content"] == "a.txt"
