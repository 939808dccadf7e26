"""Endpoints: health, status, providers (secrets masked), 404/405, request validation."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import anthropic
from hypothesis import given, settings, strategies as st
import pytest

import ccproxy
from helpers import (anthropic_provider, json_reply, PROVIDER_KEY, raw_exchange, sdk,
                     wait_until)


def get_json(proxy, path):
    reply = raw_exchange(proxy.port, b"GET %s HTTP/1.0\r\n\r\n" % path.encode())
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode(), json.loads(body)


def test_health_says_ok_and_version_only(proxy):
    status, head, body = get_json(proxy, "/health")
    assert status == 200 and body == {"status": "ok", "version": ccproxy.__version__}
    assert "request-id: req_" in head


def test_status_reports_process_providers_and_counters(start_proxy, upstream):
    proxy = start_proxy({"providers": [anthropic_provider(upstream, models=["claude-a"],
                                                          headers={"x-org": "org-secret-1234567"}),
                                       {"name": "ollama", "enabled": False}]})
    get_json(proxy, "/health")
    status, _, body = get_json(proxy, "/status")
    assert status == 200
    assert body["version"] == ccproxy.__version__ and isinstance(body["pid"], int)
    assert body["listen"] == {"host": "127.0.0.1", "port": proxy.port}
    assert body["uptime_seconds"] >= 0
    assert body["requests"]["by_status"]["200"] >= 1 and body["requests"]["active"] == 1
    anthropic_view, ollama_view = body["providers"]
    assert anthropic_view["enabled"] is True and anthropic_view["models"] == ["claude-a"]
    assert anthropic_view["api_key"] == "sk-a…6789"
    assert ollama_view["enabled"] is False
    text = json.dumps(body)
    assert PROVIDER_KEY not in text and "org-secret-1234567" not in text


def test_providers_lists_masked_keys(proxy):
    status, _, body = get_json(proxy, "/providers")
    assert status == 200
    assert body["providers"][0]["name"] == "anthropic"
    assert PROVIDER_KEY not in json.dumps(body)


def test_unknown_path_is_404_not_found_error(proxy):
    status, _, body = get_json(proxy, "/v1/nothing")
    assert status == 404 and body["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("path, hint", [
    ("/v1/v1/messages", "give clients the proxy's address with no path"),
    ("/anthropic/v1/messages/count_tokens", "the Messages API is at /v1/messages"),
    ("/api/v1/models", "ANTHROPIC_BASE_URL=http://HOST:PORT"),
    ("/v1/chat/completions", "OpenAI's API only to providers"),
    ("/openai/v1/responses", "speaks Anthropic's Messages API (/v1/messages) to its clients"),
    ("/v1/messages/batches", "serves clients /v1/messages, /v1/messages/count_tokens and /v1/models"),
])
def test_a_path_nobody_serves_says_what_to_change(proxy, upstream, path, hint):
    """The usual mistakes: a base URL with a path of its own, an OpenAI client; the rest are
    told what is served."""
    reply = raw_exchange(proxy.port, b"POST %s HTTP/1.1\r\nContent-Length: 2\r\n"
                                     b"Connection: close\r\n\r\n{}" % path.encode())
    assert reply.startswith(b"HTTP/1.1 404 ")
    message = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["message"]
    assert message.startswith("no endpoint %s: " % path) and hint in message
    assert upstream.requests == []


def test_wrong_method_is_405_with_allow(proxy):
    reply = raw_exchange(proxy.port, b"GET /v1/messages HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 405") and b"allow: POST" in reply
    reply = raw_exchange(proxy.port, b"DELETE /health HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 405") and b"allow: GET, HEAD" in reply


@pytest.mark.parametrize("body, message", [
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}, "model: Field required"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens: Field required"),
    ({"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]},
     "max_tokens: must be a positive integer, not 0"),
    ({"model": "m", "max_tokens": "5", "messages": [{"role": "user", "content": "x"}]},
     'max_tokens: must be a positive integer, not "5"'),
    ({"model": "m", "max_tokens": 5.5, "messages": [{"role": "user", "content": "x"}]},
     "max_tokens: must be a positive integer, not 5.5"),
    ({"model": 5, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
     "model: must be a non-empty string, not 5"),
    ({"model": "m" * 60, "max_tokens": 5, "messages": {}, "system": "x"},
     "messages: must be a non-empty list, not an empty object"),
    ({"model": "m", "max_tokens": None, "messages": [{"role": "user", "content": "x"}]},
     "max_tokens: Field required (a positive integer)"),
    ({"model": "m", "max_tokens": "9" * 60, "messages": [{"role": "user", "content": "x"}]},
     'max_tokens: must be a positive integer, not "' + "9" * 36 + "..."),
    ({"model": "m", "max_tokens": 5}, "messages: Field required"),
    ({"model": "m", "max_tokens": 5, "messages": []},
     "messages: must be a non-empty list, not an empty list"),
    ({"model": "m", "max_tokens": 5, "messages": ["hi"]}, "messages[0]: must be an object"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "bot", "content": "x"}]},
     "messages[0].role"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": 5}]},
     "messages[0].content"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"text": "x"}]}]},
     "messages[0].content[0]"),
    ({"model": "m", "max_tokens": 5, "stream": "yes",
      "messages": [{"role": "user", "content": "x"}]}, "stream"),
    ({"model": "m", "max_tokens": 5, "system": 5,
      "messages": [{"role": "user", "content": "x"}]}, "system"),
    ({"model": "m", "max_tokens": 5, "tools": [{"description": "x"}],
      "messages": [{"role": "user", "content": "x"}]}, "tools"),
])
def test_invalid_messages_requests_never_reach_the_provider(proxy, upstream, body, message):
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(proxy).post("/v1/messages", body=body, cast_to=object)
    assert message in caught.value.body["error"]["message"]
    assert upstream.requests == []


def test_count_tokens_requires_model_and_messages(proxy):
    with pytest.raises(anthropic.BadRequestError):
        sdk(proxy).post("/v1/messages/count_tokens", body={"model": "m"}, cast_to=object)


def test_no_provider_gives_a_clear_error(start_proxy):
    proxy = start_proxy({})
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(proxy).messages.create(model="m", max_tokens=5,
                                   messages=[{"role": "user", "content": "hi"}])
    assert "no enabled provider" in caught.value.body["error"]["message"]


def test_count_tokens_without_provider_still_estimates(start_proxy):
    proxy = start_proxy({})
    count = sdk(proxy).messages.count_tokens(model="m",
                                             messages=[{"role": "user", "content": "hi"}])
    assert count.input_tokens > 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children,
                                                                       max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(), json_values, max_size=6), st.sampled_from(["", " ", "\n\t "]),
       st.booleans())
def test_parse_json_object_agrees_with_json_loads_and_spans_are_exact(obj, space, ascii_only):
    text = json.dumps(obj, ensure_ascii=ascii_only, separators=("," + space, space + ":"))
    text = space + text + space
    parsed, spans = ccproxy.parse_json_object(text)
    assert parsed == json.loads(text)
    for key, (start, end) in spans.items():
        assert json.loads(text[start:end]) == parsed[key]


@pytest.mark.parametrize("text", ['[1]', '"x"', '{"a":1,}', '{"a" 1}', '{"a":1 "b":2}',
                                  '{"a":1}x', '{a:1}', '{"a":tru}', '', '{'])
def test_parse_json_object_rejects_what_is_not_one_object(text):
    with pytest.raises(ValueError):
        ccproxy.parse_json_object(text)


def test_models_lists_provider_comma_model_pairs(start_proxy):
    proxy = start_proxy({"providers": [
        {"name": "openai", "api_key": "k", "models": ["gpt-4.1", "o4-mini"]},
        {"name": "ollama", "models": ["qwen3"], "enabled": False}]})
    status, _, body = get_json(proxy, "/v1/models")
    assert status == 200 and body["has_more"] is False
    assert [m["id"] for m in body["data"]] == ["openai,gpt-4.1", "openai,o4-mini"]
    assert body["data"][0]["type"] == "model" and body["first_id"] == "openai,gpt-4.1"
    models = sdk(proxy).models.list()
    assert [m.id for m in models.data] == ["openai,gpt-4.1", "openai,o4-mini"]


# --- readiness, apart from liveness ---------------------------------------------------------------

def get_status(url, path):
    try:
        with urllib.request.urlopen(url + path, timeout=5) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_ready_needs_a_provider_whose_circuit_lets_requests_through(start_proxy, upstream):
    assert get_status(start_proxy({}).url, "/ready") == (503, {"status": "no provider available"})
    upstream.script = lambda r: json_reply({"type": "error", "error": {
        "type": "api_error", "message": "down"}}, status=500)
    proxy = start_proxy({"providers": [anthropic_provider(upstream)], "performance": {
        "circuit_breaker_enabled": True, "circuit_breaker_threshold": 1,
        "circuit_breaker_cooldown": "1m"}})
    assert get_status(proxy.url, "/ready") == (200, {"status": "ready",
                                                     "providers": ["anthropic"]})
    with pytest.raises(anthropic.InternalServerError):
        sdk(proxy).messages.create(model="m", max_tokens=5,
                                   messages=[{"role": "user", "content": "hi"}])
    assert get_status(proxy.url, "/ready")[0] == 503         # its circuit is open
    assert get_status(proxy.url, "/health")[0] == 200        # alive all the same


def test_a_draining_replica_says_so_at_once_and_serves_until_the_delay_is_over(
        start_proxy, upstream):
    proxy = start_proxy({"providers": [anthropic_provider(upstream)],
                         "performance": {"drain_delay": "1s"}})
    stopping = threading.Thread(target=proxy.stop)
    stopping.start()
    assert wait_until(lambda: get_status(proxy.url, "/ready") == (503, {"status": "draining"}))
    answer = sdk(proxy).messages.create(model="m", max_tokens=5,
                                        messages=[{"role": "user", "content": "hi"}])
    assert answer.content[0].text == "Hello from upstream"   # still served during the delay
    stopping.join(15)
    with pytest.raises(OSError):
        urllib.request.urlopen(proxy.url + "/health", timeout=2)


def test_a_large_request_is_read_routed_and_translated_off_the_event_loop(start_proxy, upstream,
                                                                           monkeypatch):
    """A request of OFFLOADED_BODY_BYTES or more is parsed, checked, routed and translated on a
    worker thread, so the event loop goes on serving everyone else; a small one is done on the
    loop. Its errors come back as they would have from the loop."""
    steps = []
    for name in ("check_messages_request", "plan_route", "estimate_request_tokens"):
        original = getattr(ccproxy, name)
        monkeypatch.setattr(ccproxy, name, lambda *a, __f=original, __n=name, **k: (
            steps.append((__n, threading.current_thread().name)), __f(*a, **k))[1])
    messages_request = ccproxy.AnthropicProtocol.messages_request
    monkeypatch.setattr(ccproxy.AnthropicProtocol, "messages_request", lambda self, *a: (
        steps.append(("messages_request", threading.current_thread().name)),
        messages_request(self, *a))[1])
    upstream.script = lambda r: json_reply({"id": "m", "type": "message", "role": "assistant",
                                            "model": "m", "content": [], "usage": {},
                                            "stop_reason": "end_turn"})
    proxy = start_proxy({"providers": [anthropic_provider(upstream)]})
    client = sdk(proxy)
    loop_thread = proxy.thread.name
    large = "x " * ccproxy.OFFLOADED_BODY_BYTES
    for text, where in (("hi", loop_thread), (large, "ccproxy-upstream")):
        steps.clear()
        client.messages.create(model="m", max_tokens=5, messages=[{"role": "user",
                                                                     "content": text}])
        client.messages.count_tokens(model="m", messages=[{"role": "user", "content": text}])
        assert {name for name, _ in steps} == {"check_messages_request", "plan_route",
                                               "messages_request", "estimate_request_tokens"}
        assert {thread for _, thread in steps} == {where}, steps
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="m", max_tokens=5, extra_body={"temperature": 5},
                               messages=[{"role": "user", "content": large}])
    assert caught.value.body["error"]["message"].startswith("temperature: ")
