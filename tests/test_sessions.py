"""Cost and sessions: usage and cost per provider, model and Claude Code session; key pools
that rotate past rate limits and refused keys; failover on a missing model and on a context
overflow; the /model picker's ids and route aliases."""
from __future__ import annotations

import calendar
import email.utils
import json
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

import anthropic
import pytest

import ccproxy
from helpers import (PROVIDER_KEY, REPO, MockUpstream, RunningProxy, anthropic_message,
                     anthropic_provider, anthropic_stream_events, answer_of, dead_url,
                     json_reply, sdk, stream_reply)

SESSION = "0b6f1c7e-5a2d-4c61-9a0e-3d2b8f4e7a11"
KEY_A, KEY_B = "sk-pool-key-aaaaaaaaaaaaaaaaaaaaaaaa", "sk-pool-key-bbbbbbbbbbbbbbbbbbbbbbbb"


def get(proxy, path, headers=None):
    request = urllib.request.Request(proxy.url + path, headers=dict(
        {"x-api-key": "client"}, **(headers or {})))
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def with_usage(message: dict, **usage) -> dict:
    return dict(message, usage=dict({"input_tokens": 0, "output_tokens": 0}, **usage))


def ask(proxy, model="claude-sonnet-4-5", session=SESSION, stream=False, **options):
    headers = {"x-claude-code-session-id": session} if session else {}
    return answer_of(sdk(proxy), stream, model=model, max_tokens=20, extra_headers=headers,
                     messages=[{"role": "user", "content": "hi"}], **options)


PRICED = {"name": "claude-sonnet-4-5", "price": {"input": 3, "output": 15, "cache_read": 0.3,
                                                  "cache_write": 3.75}}


# --- usage and cost ---------------------------------------------------------------------------

def test_each_session_and_model_adds_up_its_usage_and_cost(start_proxy, upstream):
    upstream.script = lambda r: json_reply(with_usage(
        anthropic_message(), input_tokens=1000, output_tokens=200, cache_read_input_tokens=10000,
        cache_creation_input_tokens=2000))
    proxy = start_proxy({"providers": [anthropic_provider(upstream, models=[PRICED])]})
    ask(proxy)
    ask(proxy)
    ask(proxy, session="other-session")
    status, session = get(proxy, "/sessions/" + SESSION)
    assert status == 200
    assert {k: session[k] for k in ("requests", "input_tokens", "output_tokens",
                                    "cache_read_input_tokens", "cache_creation_input_tokens",
                                    "provider", "model")} == {
        "requests": 2, "input_tokens": 2000, "output_tokens": 400,
        "cache_read_input_tokens": 20000, "cache_creation_input_tokens": 4000,
        "provider": "anthropic", "model": "claude-sonnet-4-5"}
    per_answer = (1000 * 3 + 200 * 15 + 10000 * 0.3 + 2000 * 3.75) / 1e6
    assert session["cost_usd"] == pytest.approx(2 * per_answer)
    assert session["unpriced_requests"] == 0
    usage = get(proxy, "/status")[1]["usage"]
    assert [s["session_id"] for s in usage["sessions"]] == ["other-session", SESSION]
    (model,) = usage["by_model"]
    assert (model["requests"], model["cost_usd"]) == (3, pytest.approx(3 * per_answer))


def test_streamed_answers_count_their_cache_tokens_too(start_proxy, upstream):
    events = anthropic_stream_events()
    start = json.loads(events[0].split(b"data: ")[1])
    start["message"]["usage"] = {"input_tokens": 7, "output_tokens": 1,
                                 "cache_read_input_tokens": 900,
                                 "cache_creation_input_tokens": 50}
    events[0] = b"event: message_start\ndata: %s\n\n" % json.dumps(start).encode()
    upstream.script = lambda r: stream_reply(events)
    proxy = start_proxy({"providers": [anthropic_provider(upstream)]})
    ask(proxy, stream=True)
    session = get(proxy, "/sessions/" + SESSION)[1]
    assert (session["input_tokens"], session["cache_read_input_tokens"],
            session["cache_creation_input_tokens"]) == (7, 900, 50)


def test_usage_without_a_known_price_has_no_made_up_cost(start_proxy, upstream):
    price_without_cache = {"name": "claude-sonnet-4-5", "price": {"input": 3, "output": 15}}
    upstream.script = lambda r: json_reply(with_usage(
        anthropic_message(), input_tokens=10, output_tokens=5, cache_read_input_tokens=100))
    proxy = start_proxy({"providers": [anthropic_provider(upstream,
                                                          models=[price_without_cache])]})
    ask(proxy)
    session = get(proxy, "/sessions/" + SESSION)[1]
    assert (session["cost_usd"], session["unpriced_requests"]) == (0.0, 1)


def openrouter_usage(**extra) -> dict:
    """OpenRouter's usage, as a real answer carries it (its cost beside the tokens)."""
    return dict({"prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500,
                 "prompt_tokens_details": {"cached_tokens": 200, "cache_write_tokens": 0}},
                **extra)


def openrouter_answer(usage: dict, stream: bool):
    if not stream:
        return json_reply({"id": "gen-1", "object": "chat.completion", "created": 1,
                           "model": "z-ai/glm-5", "usage": usage, "choices": [{
                               "index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": "ok"}}]})
    chunks = [{"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
              {"choices": [], "usage": usage}]
    return stream_reply([b"data: %s\n\n" % json.dumps(dict(
        chunk, id="gen-1", object="chat.completion.chunk", created=1, model="z-ai/glm-5")).encode()
        for chunk in chunks] + [b"data: [DONE]\n\n"])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("reported, cost", [
    ({"cost": 0.00405, "is_byok": False,                       # what a real answer carries:
      "cost_details": {"upstream_inference_cost": 0.00405}},   # the same figure twice
     0.00405),
    ({"cost": 0.0002, "is_byok": True,                         # own provider key: OpenRouter's
      "cost_details": {"upstream_inference_cost": 0.004}},     # fee plus the provider's charge
     0.0042),
    ({"cost": 0}, 0.0)])                                       # a free model costs nothing
def test_openrouter_answers_cost_what_openrouter_reports(start_proxy, upstream, stream,
                                                         reported, cost):
    upstream.script = lambda r: openrouter_answer(openrouter_usage(**reported), stream)
    priced = {"name": "z-ai/glm-5", "price": {"input": 100, "output": 100, "cache_read": 100}}
    proxy = start_proxy({"providers": [{"name": "openrouter", "api_key": PROVIDER_KEY,
                                        "api_base_url": upstream.url, "models": [priced]}]})
    ask(proxy, model="openrouter,z-ai/glm-5", stream=stream)
    session = get(proxy, "/sessions/" + SESSION)[1]
    assert (session["input_tokens"], session["cache_read_input_tokens"]) == (1000, 200)
    assert (session["cost_usd"], session["unpriced_requests"]) == (pytest.approx(cost), 0)
    (model,) = get(proxy, "/status")[1]["usage"]["by_model"]
    assert model["cost_usd"] == pytest.approx(cost)


@pytest.mark.parametrize("reported", [{"cost": -1}, {"cost": "0.5"}, {"cost": True},
                                      {"cost": float("nan")}, {"cost": float("inf")},
                                      {"cost": 1e300}, {"cost": None}, {}])
def test_a_reported_cost_that_is_no_amount_of_money_is_not_believed(start_proxy, upstream,
                                                                   reported):
    upstream.script = lambda r: openrouter_answer(openrouter_usage(**reported), False)
    proxy = start_proxy({"providers": [{"name": "openrouter", "api_key": PROVIDER_KEY,
                                        "api_base_url": upstream.url}]})
    ask(proxy, model="openrouter,z-ai/glm-5")
    session = get(proxy, "/sessions/" + SESSION)[1]
    assert (session["cost_usd"], session["unpriced_requests"]) == (0.0, 1)


def test_only_a_provider_known_to_report_its_cost_is_believed(start_proxy, upstream):
    upstream.script = lambda r: openrouter_answer(openrouter_usage(cost=5.0), False)
    proxy = start_proxy({"providers": [{"name": "gateway", "type": "openai",
                                        "api_key": PROVIDER_KEY, "api_base_url": upstream.url,
                                        "models": ["z-ai/glm-5"]}]})
    ask(proxy, model="gateway,z-ai/glm-5")
    session = get(proxy, "/sessions/" + SESSION)[1]
    assert (session["cost_usd"], session["unpriced_requests"]) == (0.0, 1)


def test_sessions_are_bounded_and_odd_session_headers_ignored(start_proxy, upstream):
    ledger = ccproxy.UsageLedger()
    record = {"provider": "p", "model": "m", "usage": {"input_tokens": 1}}
    for number in range(ccproxy.MAX_SESSIONS + 5):
        ledger.add(record, "s%d" % number, None)
    assert len(ledger.sessions) == ccproxy.MAX_SESSIONS
    assert "s0" not in ledger.sessions and "s204" in ledger.sessions
    proxy = start_proxy({"providers": [anthropic_provider(upstream)]})
    ask(proxy, session="<script>alert(1)</script>")
    assert get(proxy, "/status")[1]["usage"]["sessions"] == []
    status, error = get(proxy, "/sessions/nobody")
    assert status == 404 and "no answer recorded for session nobody" in error["error"]["message"]


@pytest.mark.parametrize("price, problem", [
    ({"input": 1}, "price.output: is required in a price"),
    ({"input": "1", "output": 2}, "price.input: must be a number of US dollars"),
    ({"input": -1, "output": 2}, "price.input: must be a number of US dollars"),
    ("cheap", "price: must be an object of US dollars per million tokens")])
def test_a_bad_price_names_its_key(price, problem):
    with pytest.raises(ccproxy.ConfigError) as caught:
        ccproxy.build_config({"providers": [{"name": "openai", "api_key": "k", "models": [
            {"name": "gpt-5", "price": price}]}]}, "prices.json", {})
    assert "prices.json: providers[0].models[0]." + problem in str(caught.value)


# --- key pools --------------------------------------------------------------------------------

def keyed_script(answers: dict):
    """Answer by the key the request carries: key -> (status, headers) or a message."""
    def script(request):
        key = request["headers"].get("x-api-key")
        status, headers = answers.get(key, (200, {}))
        if status == 200:
            return json_reply(anthropic_message("served by %s" % key[-4:]))
        return json_reply({"type": "error", "error": {"type": "rate_limit_error",
                                                      "message": "slow down"}},
                          status=status, headers=headers)
    return script


def pool_provider(upstream, **extra):
    provider = anthropic_provider(upstream, api_keys=[KEY_A, KEY_B], **extra)
    del provider["api_key"]
    return provider


def test_a_rate_limited_key_rests_while_the_next_key_serves(start_proxy, upstream, ccproxy_log):
    upstream.script = keyed_script({KEY_A: (429, {"retry-after": "120"})})
    proxy = start_proxy({"providers": [pool_provider(upstream)]})
    texts = [ask(proxy).content[0].text for _ in range(3)]
    assert texts == ["served by bbbb"] * 3
    used = [r["headers"]["x-api-key"] for r in upstream.requests]
    assert used == [KEY_A, KEY_B, KEY_B, KEY_B]          # A was tried once, then rested
    (view,) = get(proxy, "/status")[1]["providers"]
    assert [(k["key"], k["state"]) for k in view["api_keys"]] == [
        ("sk-p…aaaa", "resting"), ("sk-p…bbbb", "ready")]
    assert 110 < view["api_keys"][0]["ready_in_seconds"] <= 120
    logged = "\n".join(ccproxy_log)
    assert "key sk-p…aaaa rate-limited (HTTP 429); resting 120 s" in logged
    assert KEY_A not in logged and KEY_B not in json.dumps(view)


@pytest.mark.parametrize("retry_after, shortest, longest", [
    ("inf", 0, 86400), ("nan", 0, 86400), ("1e300", 0, 86400),   # not for good: a day at most
    ("an HTTP date 300 s ahead", 280, 300)])       # RFC 9110 allows it; it had counted as none
def test_a_retry_after_rests_a_key_as_long_as_it_says_within_a_day(start_proxy, upstream,
                                                                    retry_after, shortest,
                                                                    longest):
    if retry_after.startswith("an HTTP date"):
        retry_after = email.utils.formatdate(time.time() + 300, usegmt=True)
    upstream.script = keyed_script({KEY_A: (429, {"retry-after": retry_after})})
    proxy = start_proxy({"providers": [pool_provider(upstream)]})
    assert ask(proxy).content[0].text == "served by bbbb"
    (view,) = get(proxy, "/status")[1]["providers"]
    assert view["api_keys"][0]["state"] == "resting"
    assert shortest < view["api_keys"][0]["ready_in_seconds"] <= longest


def test_a_refused_key_is_set_aside_and_every_key_out_fails_over(start_proxy, upstream,
                                                                  second_upstream, ccproxy_log):
    upstream.script = keyed_script({KEY_A: (401, {}), KEY_B: (429, {"retry-after": "60"})})
    second_upstream.script = lambda r: json_reply(anthropic_message("from the second"))
    proxy = start_proxy({"providers": [
        pool_provider(upstream, name="pooled", type="anthropic"),
        anthropic_provider(second_upstream, name="second", type="anthropic")]})
    assert ask(proxy).content[0].text == "from the second"
    assert ask(proxy).content[0].text == "from the second"
    assert len(upstream.requests) == 2                 # once each; then every key was out
    assert any("pooled: key sk-p…aaaa refused (HTTP 401); set aside" in m for m in ccproxy_log)
    states = [k["state"] for k in get(proxy, "/status")[1]["providers"][0]["api_keys"]]
    assert states == ["refused", "resting"]


def test_a_request_too_large_for_the_plan_rests_no_key(start_proxy, upstream):
    """Groq's 413 for a request over the plan's tokens a minute: the key is not rate-limited,
    and a smaller request (Claude Code's background calls) must still find it ready."""
    upstream.script = lambda r: json_reply({"type": "error", "error": {
        "type": "invalid_request_error", "message": "Request too large for model `m` on tokens "
        "per minute (TPM): Limit 6000, Requested 12328"}}, status=413)
    proxy = start_proxy({"providers": [pool_provider(upstream)]})
    with pytest.raises(anthropic.RateLimitError):
        ask(proxy)
    assert len(upstream.requests) == 1
    (view,) = get(proxy, "/status")[1]["providers"]
    assert [k["state"] for k in view["api_keys"]] == ["ready", "ready"]


def test_a_pool_whose_every_key_was_refused_says_so(start_proxy, upstream):
    upstream.script = keyed_script({KEY_A: (401, {}), KEY_B: (403, {})})
    proxy = start_proxy({"providers": [pool_provider(upstream)], "failover": False})
    with pytest.raises(anthropic.AuthenticationError) as caught:
        ask(proxy)
    assert "anthropic refused every key of its api_keys" in caught.value.message
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert KEY_A not in caught.value.response.text


@pytest.mark.parametrize("entry, problem", [
    ({"api_key": "k", "api_keys": ["a"]}, "api_keys: give api_key or api_keys, not both"),
    ({"api_keys": []}, "api_keys: must be a list of non-empty keys"),
    ({"api_keys": ["a", "a"]}, "api_keys: lists one key twice"),
    ({"api_keys": "a,b"}, "api_keys: must be a list of keys")])
def test_a_bad_key_pool_names_its_key(entry, problem):
    with pytest.raises(ccproxy.ConfigError) as caught:
        ccproxy.build_config({"providers": [dict({"name": "openai"}, **entry)]}, "keys.json", {})
    assert "keys.json: providers[0]." + problem in str(caught.value)


# --- failover on a missing model and a context overflow --------------------------------------

def missing_model(request):
    return json_reply({"type": "error", "error": {"type": "not_found_error",
                                                  "message": "model: gone-model"}}, status=404)


def overflow(request):
    return json_reply({"type": "error", "error": {
        "type": "invalid_request_error",
        "message": "prompt is too long: 250000 tokens > 200000 maximum"}}, status=400)


@pytest.mark.parametrize("switch", [True, False])
def test_a_missing_model_falls_through_the_route_chain_unless_turned_off(
        start_proxy, upstream, second_upstream, switch):
    upstream.script = missing_model
    second_upstream.script = lambda r: json_reply(anthropic_message("fallback answered"))
    proxy = start_proxy({
        "providers": [anthropic_provider(upstream, name="first", type="anthropic"),
                      anthropic_provider(second_upstream, name="second", type="anthropic")],
        "routes": {"default": {"provider": "first", "model": "gone-model",
                               "fallbacks": ["second,claude-sonnet-4-5"]}},
        "failover": {"other_providers": False, "missing_model": switch}})
    if switch:
        assert ask(proxy).content[0].text == "fallback answered"
    else:
        with pytest.raises(anthropic.BadRequestError) as caught:
            ask(proxy)
        assert "first has no model 'gone-model'; fix routes.default.model" in \
            caught.value.message
        assert second_upstream.requests == []


@pytest.mark.parametrize("switch", [True, False])
def test_a_context_overflow_moves_on_to_the_long_context_route(start_proxy, upstream,
                                                                second_upstream, switch):
    upstream.script = overflow
    second_upstream.script = lambda r: json_reply(anthropic_message("a bigger window"))
    proxy = start_proxy({
        "providers": [anthropic_provider(upstream, name="small", type="anthropic"),
                      anthropic_provider(second_upstream, name="big", type="anthropic")],
        "routes": {"default": {"provider": "small", "model": "claude-sonnet-4-5"},
                   "longContext": {"provider": "big", "model": "claude-sonnet-4-5-1m"}},
        "failover": {"other_providers": False, "context_overflow": switch}})
    if switch:
        assert ask(proxy).content[0].text == "a bigger window"
        assert second_upstream.requests[0]["json"]["model"] == "claude-sonnet-4-5-1m"
    else:
        with pytest.raises(anthropic.BadRequestError) as caught:
            ask(proxy)
        assert caught.value.body["error"]["message"].startswith(          # Claude Code compacts
            "prompt is too long")
        assert second_upstream.requests == []


def test_an_overflow_with_no_long_context_route_left_is_answered_for_compaction(
        start_proxy, upstream):
    upstream.script = overflow
    proxy = start_proxy({"providers": [anthropic_provider(upstream)],
                         "routes": {"longContext": {"provider": "anthropic",
                                                    "model": "claude-sonnet-4-5"}}})
    with pytest.raises(anthropic.BadRequestError) as caught:
        ask(proxy)
    assert caught.value.body["error"]["message"].startswith(
        "prompt is too long: 250000 tokens > 200000")
    assert len(upstream.requests) == 1                # the same target is not tried twice


def test_a_bad_failover_setting_names_its_key():
    for value, problem in (({"context_overflow": "yes"}, "f.json: failover.context_overflow"),
                           ("sometimes", "f.json: failover: must be true, false or")):
        with pytest.raises(ccproxy.ConfigError) as caught:
            ccproxy.build_config({"failover": value}, "f.json", {})
        assert problem in str(caught.value)
    config = ccproxy.build_config({"failover": {"missing_modle": False}}, "f.json", {})
    assert any("failover.missing_modle" in w and "missing_model" in w for w in config.warnings)


# --- the /model picker ------------------------------------------------------------------------

PICKER_PROVIDERS = [{"name": "openai", "api_key": "sk-o", "models": ["gpt-5"]},
                    {"name": "openrouter", "api_key": "sk-r",
                     "models": ["anthropic/claude-sonnet-4.5"]}]


def test_claude_code_is_listed_ids_its_picker_keeps_and_they_route_back(start_proxy, upstream):
    providers = [dict(p, api_base_url=upstream.url + "/v1") for p in PICKER_PROVIDERS]
    proxy = start_proxy({"providers": providers})
    for agent, expected in (("claude-code/2.1.330", [
            "claude-via-ccproxy/openai,gpt-5", "openrouter,anthropic/claude-sonnet-4.5"]),
                            ("python-httpx/0.28", ["openai,gpt-5",
                                                   "openrouter,anthropic/claude-sonnet-4.5"])):
        listed = get(proxy, "/v1/models", {"user-agent": agent})[1]["data"]
        assert [m["id"] for m in listed] == expected
        assert listed[0]["display_name"] == "gpt-5 (openai, via ccproxy)"
    upstream.script = lambda r: json_reply({
        "id": "c", "object": "chat.completion", "created": 1, "model": "gpt-5", "choices": [
            {"index": 0, "finish_reason": "stop",
             "message": {"role": "assistant", "content": "ok"}}]})
    ask(proxy, model="claude-via-ccproxy/openai,gpt-5")
    assert upstream.requests[-1]["json"]["model"] == "gpt-5"


@pytest.mark.parametrize("alias, target", [("claude-via-ccproxy/think", "thinker"),
                                           ("claude-via-ccproxy/background", "small"),
                                           ("claude-via-ccproxy/default", "main")])
def test_the_picker_aliases_go_where_their_routes_say(alias, target):
    config = ccproxy.build_config({
        "providers": [{"name": "openai", "api_key": "k", "models": ["main", "small", "thinker"]}],
        "routes": {"default": "openai,main", "background": "openai,small",
                   "think": "openai,thinker"}}, "c", {})
    plan = ccproxy.plan_route(config, {"model": alias, "max_tokens": 5, "messages": [
        {"role": "user", "content": "hi"}]}, ccproxy.Headers())
    assert plan[0].model == target


def test_code_points_the_picker_at_the_routes_and_keeps_the_users_own_settings():
    config = ccproxy.build_config({
        "providers": [{"name": "openai", "api_key": "k", "models": ["gpt-5", "gpt-5-mini"]}],
        "routes": {"default": "openai,gpt-5", "background": "openai,gpt-5-mini"}}, "c", {})
    variables = ccproxy.claude_variables("http://127.0.0.1:3456", config, {
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": "mine"})
    assert variables["CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY"] == "1"
    assert variables["ANTHROPIC_DEFAULT_SONNET_MODEL"] == "claude-via-ccproxy/default"
    assert variables["ANTHROPIC_DEFAULT_SONNET_MODEL_NAME"] == "gpt-5 (openai)"
    assert "ANTHROPIC_DEFAULT_HAIKU_MODEL" not in variables          # the user's own stays
    assert variables["ANTHROPIC_DEFAULT_HAIKU_MODEL_NAME"] == "gpt-5-mini (openai)"
    assert "ANTHROPIC_DEFAULT_OPUS_MODEL" not in variables           # no think route
    assert "CLAUDE_CODE_USE_FOUNDRY" in ccproxy.CLAUDE_UNSET_VARIABLES


def test_provider_key_stays_out_of_the_session_and_status_views(start_proxy, upstream):
    proxy = start_proxy({"providers": [anthropic_provider(upstream, models=[PRICED])]})
    ask(proxy)
    for path in ("/status", "/sessions/" + SESSION):
        assert PROVIDER_KEY not in json.dumps(get(proxy, path)[1])


# --- the status line --------------------------------------------------------------------------

def statusline(proxy_url, tmp_path, data, apikey=""):
    """The status line's client, asking the proxy a pidfile names."""
    pidfile = tmp_path / "ccproxy.pid"
    pidfile.write_text(json.dumps({"pid": 1, "url": proxy_url}))
    return ccproxy.statusline_client(str(pidfile), json.dumps(data).encode(), 2.0, apikey)


def test_the_status_line_shows_the_sessions_model_tokens_and_cost(start_proxy, upstream,
                                                                  tmp_path):
    upstream.script = lambda r: json_reply(with_usage(
        anthropic_message(), input_tokens=1000, output_tokens=1500, cache_read_input_tokens=9000))
    proxy = start_proxy({"providers": [anthropic_provider(upstream, models=[PRICED])]})
    assert statusline(proxy.url, tmp_path, {"session_id": SESSION}) == (404, "ccproxy: up")
    ask(proxy)
    line = "ccproxy: claude-sonnet-4-5 (anthropic) · 10.0k in (90% cached) · 1.5k out" \
           " · $0.0282 · today 11.5k tokens $0.0282"
    assert statusline(proxy.url, tmp_path, {"session_id": SESSION, "model": {"id": "x"}}) == (
        200, line)
    assert get(proxy, "/sessions/" + SESSION)[1]["statusline"] == line   # formatted by the proxy
    assert statusline(proxy.url, tmp_path, {}) == (200, "ccproxy: up")
    assert statusline(proxy.url, tmp_path, {"session_id": "a b\r\nx-evil: 1"}) == (
        200, "ccproxy: up")                          # not an id: /health, nothing sent as-is
    assert ccproxy.statusline_client(str(tmp_path / "none.pid"), b"{}", 2.0) == (
        None, "ccproxy: down")
    (tmp_path / "ccproxy.pid").write_text("not json")
    assert ccproxy.statusline_client(str(tmp_path / "ccproxy.pid"), b"{}", 2.0)[0] is None
    proxy.stop()
    assert statusline(proxy.url, tmp_path, {"session_id": SESSION}) == (None, "ccproxy: down")


def test_the_status_line_uses_the_key_claude_code_was_given_for_this_proxy_only(
        start_proxy, upstream, tmp_path, monkeypatch):
    proxy = start_proxy({"apikey": "team-key-0123456789",
                         "providers": [anthropic_provider(upstream)]})
    sdk(proxy, key="team-key-0123456789").messages.create(
        model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-claude-code-session-id": SESSION})
    monkeypatch.setenv("ANTHROPIC_AUTH_TOKEN", "team-key-0123456789")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "https://api.anthropic.com")
    assert statusline(proxy.url, tmp_path, {"session_id": SESSION}) == (401, "ccproxy: up")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", proxy.url + "/")
    status, line = statusline(proxy.url, tmp_path, {"session_id": SESSION})
    assert status == 200 and line.startswith("ccproxy: claude-sonnet-4-5 (anthropic) · ")
    monkeypatch.setenv("ANTHROPIC_AUTH_TOKEN", "team-key\r\nx-evil: 1")   # never a header
    assert statusline(proxy.url, tmp_path, {"session_id": SESSION}) == (401, "ccproxy: up")


def test_the_status_line_reads_the_proxys_key_from_its_config_when_it_must(
        start_proxy, upstream, tmp_path, monkeypatch):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"apikey": "${TEAM_KEY}", "providers": [
        anthropic_provider(upstream)]}))
    monkeypatch.setenv("TEAM_KEY", "team-key-0123456789")
    monkeypatch.setenv("HOME", str(tmp_path))
    proxy = start_proxy({"apikey": "team-key-0123456789",
                         "providers": [anthropic_provider(upstream)]})
    sdk(proxy, key="team-key-0123456789").messages.create(
        model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-claude-code-session-id": SESSION})
    ccproxy.write_private_file(ccproxy.pidfile_path(), json.dumps(
        {"pid": 1, "url": proxy.url, "config": str(config)}))
    result = subprocess.run([sys.executable, str(REPO / "ccproxy.py"), "status", "--statusline"],
                            input=json.dumps({"session_id": SESSION}), capture_output=True,
                            text=True, env=dict(os.environ), timeout=30)
    assert result.stdout.startswith("ccproxy: claude-sonnet-4-5 (anthropic) · "), result


def test_the_status_line_command_says_down_when_nothing_runs(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "ccproxy.py"), "status", "--statusline"],
                            input='{"session_id": "s"}', capture_output=True, text=True,
                            env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=30)
    assert (result.returncode, result.stdout) == (0, "ccproxy: down\n")


@pytest.mark.parametrize("data", [b"", b"not json", b"[]", b'{"session_id": 5}',
                                  b'{"session_id": "a/b"}',
                                  pytest.param(b"[" * 100000, id="nested too deeply")])
def test_stdin_a_status_line_cannot_use_names_no_session(data):
    assert ccproxy.statusline_session(data) is None


def test_claude_settings_nested_too_deeply_read_as_unreadable(tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text('{"env": ' + "[" * 100000)
    assert ccproxy.settings_env(str(settings)) == {}
    assert ccproxy.merged_settings(str(settings), {"env": {}}) is None
    assert ccproxy.merged_settings('{"env": ' + "[" * 100000, {"env": {}}) is None


def test_with_no_proxy_of_its_own_the_status_line_asks_the_one_claude_code_uses(
        start_proxy, upstream, tmp_path, monkeypatch, capsys):
    proxy = start_proxy({"client_keys": {"alice": "alice-key-0123456789"},
                         "providers": [anthropic_provider(upstream, models=[PRICED])]})
    sdk(proxy, key="alice-key-0123456789").messages.create(
        model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-claude-code-session-id": SESSION})
    monkeypatch.setenv("HOME", str(tmp_path))              # no pidfile: a team's proxy only
    monkeypatch.setenv("ANTHROPIC_BASE_URL", proxy.url + "/")
    monkeypatch.setenv("ANTHROPIC_AUTH_TOKEN", "alice-key-0123456789")

    def line(data) -> str:
        ccproxy.print_statusline(json.dumps(data).encode())
        return capsys.readouterr().out

    assert line({"session_id": SESSION}).startswith("ccproxy: claude-sonnet-4-5 (anthropic) · ")
    assert line({"session_id": "a-session-with-no-answer-yet"}) == "ccproxy: up\n"
    monkeypatch.setenv("ANTHROPIC_AUTH_TOKEN", "not-a-key-of-this-proxy")
    assert line({"session_id": SESSION}) == "ccproxy: up (the key Claude Code has is refused)\n"
    monkeypatch.setenv("ANTHROPIC_BASE_URL", dead_url())
    assert line({"session_id": SESSION}) == "ccproxy: down\n"
    fronted = MockUpstream()                 # what fronts the proxy says its backend is down
    fronted.script = lambda r: json_reply({"message": "bad gateway"}, status=502)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fronted.url)
    try:
        assert line({"session_id": SESSION}) == "ccproxy: down\n"
    finally:
        fronted.close()
    hostile = MockUpstream()                                # what crossed a network is shown
    hostile.script = lambda r: json_reply({"statusline": "\x1b]0;owned\x07ccproxy: " + "x" * 999})
    monkeypatch.setenv("ANTHROPIC_BASE_URL", hostile.url)
    try:
        shown = line({"session_id": SESSION})
    finally:
        hostile.close()
    assert shown == ("]0;ownedccproxy: " + "x" * 999)[:200] + "\n"


# --- usage kept across a restart ----------------------------------------------------------------

def test_usage_survives_a_restart_in_the_usage_file(start_proxy, upstream, tmp_path):
    upstream.script = lambda r: json_reply(with_usage(anthropic_message(), input_tokens=10,
                                                      output_tokens=5))
    usage_file = tmp_path / "state" / "usage.json"
    config = {"usage_file": str(usage_file),
              "providers": [anthropic_provider(upstream, models=[PRICED])]}
    first = start_proxy(config)
    ask(first)
    first.stop()
    assert stat.S_IMODE(os.stat(usage_file).st_mode) == 0o600
    saved = json.loads(usage_file.read_text())
    assert "hi" not in usage_file.read_text() and saved["sessions"][0]["session_id"] == SESSION
    second = start_proxy(config)
    ask(second)
    usage = get(second, "/status")[1]["usage"]
    assert usage["by_model"][0]["requests"] == 2 and usage["today"]["by_model"][0][
        "output_tokens"] == 10
    assert get(second, "/sessions/" + SESSION)[1]["requests"] == 2


def test_a_usage_file_another_copy_keeps_is_left_to_it_with_a_warning(start_proxy, upstream,
                                                                       tmp_path, ccproxy_log):
    upstream.script = lambda r: json_reply(with_usage(anthropic_message(), input_tokens=10,
                                                      output_tokens=5))
    usage_file = tmp_path / "usage.json"
    config = {"usage_file": str(usage_file),
              "providers": [anthropic_provider(upstream, models=[PRICED])]}
    first, second = start_proxy(config), start_proxy(config)
    warning = ("usage_file %s is kept by another ccproxy; this one counts in memory only (give "
               "each copy its own file)" % usage_file)
    assert [m for m in ccproxy_log if m.startswith("usage_file")] == [warning]
    ask(first)
    for _ in range(3):
        ask(second, session="another-session")
    second.stop()
    first.stop()                                 # the last to stop, its counts would win
    saved = json.loads(usage_file.read_text())
    assert [s["session_id"] for s in saved["sessions"]] == [SESSION]
    third = start_proxy(config)                  # let go at stop: the next copy keeps it
    assert get(third, "/sessions/" + SESSION)[1]["requests"] == 1
    assert [m for m in ccproxy_log if m.startswith("usage_file")] == [warning]


@pytest.mark.parametrize("content", [b'{"models": [{"provider": "anthropic", "requests"',
                                     b"[" * 100000, b"\xff\xfe{}"],
                         ids=["cut short", "nested too deeply", "not UTF-8"])
def test_an_unreadable_usage_file_is_kept_aside_not_overwritten(start_proxy, upstream, tmp_path,
                                                                ccproxy_log, content):
    """A file cut short by a full disk (or edited by hand) still holds counts someone may
    want: it is moved to <file>.unreadable, byte for byte, and counting starts from zero."""
    upstream.script = lambda r: json_reply(with_usage(anthropic_message(), input_tokens=10,
                                                      output_tokens=5))
    usage_file = tmp_path / "usage.json"
    usage_file.write_bytes(content)
    proxy = start_proxy({"usage_file": str(usage_file),
                         "providers": [anthropic_provider(upstream, models=[PRICED])]})
    ask(proxy)
    proxy.stop()
    assert (tmp_path / "usage.json.unreadable").read_bytes() == content
    assert json.loads(usage_file.read_text())["sessions"][0]["requests"] == 1
    warnings = [m for m in ccproxy_log if m.startswith("usage_file")]
    assert len(warnings) == 1 and warnings[0].startswith("usage_file %s could not be read ("
                                                         % usage_file)
    assert warnings[0].endswith("it is kept as %s.unreadable, and the counters start from zero"
                                % usage_file)


def test_a_usage_file_that_cannot_be_opened_is_left_as_it_is(start_proxy, upstream, tmp_path,
                                                             ccproxy_log):
    upstream.script = lambda r: json_reply(anthropic_message())
    usage_file = tmp_path / "usage.json"
    usage_file.mkdir()                     # unreadable as a file, even for root
    proxy = start_proxy({"usage_file": str(usage_file),
                         "providers": [anthropic_provider(upstream, models=[PRICED])]})
    ask(proxy)
    assert get(proxy, "/sessions/" + SESSION)[1]["requests"] == 1     # counted in memory
    proxy.stop()
    assert usage_file.is_dir() and not (tmp_path / "usage.json.unreadable").exists()
    assert [m.split(":")[0] for m in ccproxy_log if m.startswith("usage_file")] == [
        "usage_file %s could not be read; this ccproxy counts in memory only and leaves the "
        "file as it is" % usage_file]


def test_a_usage_file_changed_by_a_reload_applies_at_the_next_start(upstream, tmp_path,
                                                                     ccproxy_log):
    config_file, kept, other = (tmp_path / name for name in ("c.json", "kept", "other"))
    config_file.write_text(json.dumps({"port": 0, "usage_file": str(kept),
                                       "providers": [anthropic_provider(upstream)]}))
    proxy = RunningProxy(ccproxy.load_config(str(config_file), {}))
    try:
        config_file.write_text(config_file.read_text().replace(str(kept), str(other)))
        assert proxy.server.app.reload_config()
        ask(proxy)
    finally:
        proxy.stop()
    assert kept.exists() and not other.exists()
    assert "a usage_file change applies at the next start" in ccproxy_log


ALICE, BOB, SHARED = ("sk-client-alice-0123456789abcdef", "sk-client-bob-0123456789abcdef0",
                      "sk-the-shared-apikey-0123456")


def test_usage_is_counted_per_client_key_everywhere_usage_shows(start_proxy, upstream, tmp_path,
                                                                capsys):
    """/status, `status`, /metrics and the usage file: per client_keys name, never the key."""
    upstream.script = lambda r: json_reply(with_usage(anthropic_message(), input_tokens=10,
                                                      output_tokens=5))
    usage_file = tmp_path / "usage.json"
    config = {"apikey": SHARED, "client_keys": {"alice": ALICE, "bob": BOB},
              "usage_file": str(usage_file), "performance": {"metrics_enabled": True},
              "providers": [anthropic_provider(upstream, models=[PRICED])]}
    proxy = start_proxy(config)
    for key, times in ((ALICE, 2), (BOB, 1), (SHARED, 1)):
        for _ in range(times):
            sdk(proxy, key).messages.create(model="claude-sonnet-4-5", max_tokens=20,
                                            messages=[{"role": "user", "content": "hi"}])
    usage = get(proxy, "/status", {"x-api-key": BOB})[1]["usage"]
    clients = {totals["client"]: totals for totals in usage["by_client"]}
    assert sorted(clients) == ["alice", "bob"]        # the apikey's answers are no client's
    assert (clients["alice"]["requests"], clients["alice"]["output_tokens"]) == (2, 10)
    assert clients["bob"]["cost_usd"] == pytest.approx((10 * 3 + 5 * 15) / 1e6)
    assert usage["today"]["by_client"] == usage["by_client"] and usage["by_model"][0][
        "requests"] == 4
    request = urllib.request.Request(proxy.url + "/metrics", headers={"x-api-key": ALICE})
    metrics = urllib.request.urlopen(request, timeout=10).read().decode()
    assert 'ccproxy_client_usage_tokens_total{client="alice",type="output"} 10' in metrics
    assert 'ccproxy_client_usage_cost_dollars_total{client="bob"} 0.000105' in metrics
    ccproxy.print_status({"version": "v", "url": proxy.url, "pid": 1, "uptime_seconds": 1,
                          "started_by": "test", "config": None, "providers": [], "usage": usage})
    assert "  client alice: 2 answers, " in capsys.readouterr().out
    proxy.stop()
    saved = usage_file.read_text()
    assert [totals["client"] for totals in json.loads(saved)["clients"]] == ["alice", "bob"]
    assert not any(key in text for key in (ALICE, BOB, SHARED)
                   for text in (saved, metrics, json.dumps(usage)))
    again = get(start_proxy(config), "/status", {"x-api-key": SHARED})[1]["usage"]
    assert {totals["client"]: totals["requests"] for totals in again["by_client"]} == {
        "alice": 2, "bob": 1}
    assert again["today"]["by_client"] == again["by_client"]


def test_an_unreadable_usage_file_starts_from_zero_with_a_warning(start_proxy, upstream,
                                                                 tmp_path, ccproxy_log):
    usage_file = tmp_path / "usage.json"
    usage_file.write_text("{not json")
    proxy = start_proxy({"usage_file": str(usage_file),
                         "providers": [anthropic_provider(upstream)]})
    assert get(proxy, "/status")[1]["usage"]["by_model"] == []
    assert any("usage_file %s could not be read" % usage_file in m for m in ccproxy_log)


def test_entries_of_a_usage_file_that_are_not_counts_or_names_are_left_out(start_proxy, upstream,
                                                                           tmp_path):
    """A usage file edited by hand or cut short: an endless or negative counter, a client or
    session that is not a name, are skipped, and /status stays JSON a browser can read."""
    counts = {"requests": 1, "cost_usd": 0.5, "unpriced_requests": 0, "input_tokens": 10,
              "output_tokens": 5, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
    usage_file = tmp_path / "usage.json"
    usage_file.write_text(json.dumps({"version": 1, "day": "2000-01-01", "models": [
        dict(counts, provider="p", model="kept"), dict(counts, provider="p", model="endless",
                                                       cost_usd=float("inf")),
        dict(counts, provider="p", model="nan", input_tokens=float("nan")),
        dict(counts, provider="p", model="negative", requests=-1)],
        "clients": [dict(counts, client="alice"), dict(counts, client=True),
                    dict(counts, client=7)],
        "sessions": [dict(counts, session_id="s-1"), dict(counts, session_id=12345)]}))
    proxy = start_proxy({"usage_file": str(usage_file),
                         "providers": [anthropic_provider(upstream)]})
    with urllib.request.urlopen(proxy.url + "/status", timeout=10) as answer:
        usage = json.loads(answer.read(), parse_constant=pytest.fail)["usage"]
    assert [totals["model"] for totals in usage["by_model"]] == ["kept"]
    assert [totals["client"] for totals in usage["by_client"]] == ["alice"]
    assert [totals["session_id"] for totals in usage["sessions"]] == ["s-1"]


def test_past_a_thousand_models_the_answers_of_new_ones_are_counted_together():
    """A client that names a new model at every request (a server that answers any name)
    cannot make the counters, /metrics and the usage file grow without end."""
    ledger = ccproxy.UsageLedger()
    for number in range(ccproxy.MAX_MODELS + 5):
        ledger.add({"provider": "llama", "model": "m%d" % number, "usage": {"output_tokens": 2}},
                   None, None)
    ledger.add({"provider": "llama", "model": "m7", "usage": {"output_tokens": 2}}, None, None)
    by_model = {totals["model"]: totals for totals in ledger.view()["by_model"]}
    assert len(by_model) == ccproxy.MAX_MODELS + 1 and by_model["m7"]["requests"] == 2
    assert by_model[ccproxy.OTHER_MODELS]["output_tokens"] == 10
    assert ledger.today_totals()["requests"] == ccproxy.MAX_MODELS + 6


def test_a_preset_model_has_its_published_price_unless_the_config_gives_one():
    config = ccproxy.build_config({"providers": [
        {"name": "openai", "api_key": "k", "models": [
            "gpt-5", {"name": "gpt-5-codex", "price": {"input": 2, "output": 20}}]},
        {"name": "mistral", "api_key": "k", "models": ["mistral-large-latest"]}]}, "c", {})
    openai, mistral = config.providers
    usage = {"input_tokens": 1_000_000, "output_tokens": 1_000_000,
             "cache_read_input_tokens": 1_000_000}
    assert openai.cost("gpt-5", usage) == pytest.approx(1.25 + 10 + 0.125)
    assert openai.cost("gpt-5-codex", {"input_tokens": 1_000_000}) == pytest.approx(2)
    assert mistral.cost("mistral-large-latest", usage) is None    # no page checked: no price


def test_gpt_6_2_sol_costs_its_page_s_rates_and_more_past_272k_input_tokens():
    """Cache writes at $2.50; a request of more than 272K input tokens (cached ones too) pays
    twice the input and cache rates and 1.5 times the output rate, for all its tokens."""
    config = ccproxy.build_config({"providers": [{"name": "openai", "api_key": "k"}]}, "c", {})
    (openai,) = config.providers
    usage = {"input_tokens": 200_000, "cache_read_input_tokens": 60_000,
             "cache_creation_input_tokens": 12_000, "output_tokens": 1000}
    assert openai.cost("gpt-6.2-sol", usage) == pytest.approx(
        (200_000 * 2.0 + 60_000 * 0.1 + 12_000 * 2.5 + 1000 * 10.0) / 1e6)
    longer = dict(usage, input_tokens=200_001)
    assert openai.cost("gpt-6.2-sol", longer) == pytest.approx(
        (200_001 * 4.0 + 60_000 * 0.2 + 12_000 * 5.0 + 1000 * 15.0) / 1e6)
    assert openai.context_window("gpt-6.2-sol") == 922_000
    assert openai.output_cap("gpt-6.2-sol") == 128_000


def test_claude_models_through_the_anthropic_preset_cost_what_the_pricing_page_says(
        start_proxy, upstream):
    upstream.script = lambda r: json_reply(with_usage(
        anthropic_message(model="claude-sonnet-5-5"), input_tokens=1000, output_tokens=2000,
        cache_read_input_tokens=100_000, cache_creation_input_tokens=4000))
    proxy = start_proxy({"providers": [anthropic_provider(upstream)]})   # named "anthropic"
    ask(proxy, model="claude-sonnet-5-5")
    session = get(proxy, "/sessions/" + SESSION)[1]
    assert session["cost_usd"] == pytest.approx(
        (1000 * 2.0 + 2000 * 10.0 + 100_000 * 0.2 + 4000 * 2.5) / 1e6)
    haiku = ccproxy.PRESET_MODEL_PRICES["anthropic"]["claude-haiku-4-5-20251001"]
    assert haiku == {"input": 1.0, "cache_write": 1.25, "cache_read": 0.1, "output": 5.0}
    opus = ccproxy.PRESET_MODEL_PRICES["anthropic"]["claude-opus-5-5"]   # reads at 0.05 × input
    assert opus == {"input": 4.0, "cache_write": 5.0, "cache_read": 0.2, "output": 20.0}
    assert "claude-sonnet-4-5" not in ccproxy.PRESET_MODEL_PRICES["anthropic"]     # retired


@pytest.mark.parametrize("stream", [False, True])
def test_groq_models_cost_what_groqs_pages_say_cached_input_at_half(start_proxy, upstream,
                                                                    stream):
    usage = {"prompt_tokens": 10_000, "completion_tokens": 500,
             "prompt_tokens_details": {"cached_tokens": 8000}}
    if stream:                                   # Groq's stream tells its usage in x_groq
        chunks = [{"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}]},
                  {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "x_groq": {"id": "req_1", "usage": usage}}]
        upstream.script = lambda r: stream_reply([b"data: %s\n\n" % json.dumps(dict(
            chunk, id="c", object="chat.completion.chunk", created=1,
            model="openai/gpt-oss-120b")).encode() for chunk in chunks] + [b"data: [DONE]\n\n"])
    else:
        upstream.script = lambda r: openrouter_answer(usage, False)
    proxy = start_proxy({"providers": [{"name": "groq", "api_key": PROVIDER_KEY,
                                        "api_base_url": upstream.url}]})
    ask(proxy, model="groq,openai/gpt-oss-120b", stream=stream)
    session = get(proxy, "/sessions/" + SESSION)[1]
    assert session["cost_usd"] == pytest.approx((2000 * 0.15 + 8000 * 0.075 + 500 * 0.60) / 1e6)
    assert ccproxy.PRESET_MODEL_PRICES["groq"]["llama-3.1-8b-instant"] == {
        "input": 0.05, "cache_read": 0.025, "output": 0.08}


# What an xAI answer reports (sub2api#5771's, anonymised): reasoning apart from completion_tokens,
# the total their sum with the prompt; billed as output all the same.
XAI_USAGE = {"prompt_tokens": 10120, "completion_tokens": 1499, "total_tokens": 14428,
             "prompt_tokens_details": {"cached_tokens": 128},
             "completion_tokens_details": {"reasoning_tokens": 2809}}


@pytest.mark.parametrize("stream", [False, True])
def test_an_xai_answer_counts_its_reasoning_as_output_and_costs_what_xais_pages_say(
        start_proxy, upstream, stream):
    upstream.script = lambda r: openrouter_answer(XAI_USAGE, stream)
    proxy = start_proxy({"providers": [{"name": "xai", "api_key": PROVIDER_KEY,
                                        "api_base_url": upstream.url}]})
    answer = ask(proxy, model="xai,grok-4.7", stream=stream)
    assert answer.usage.output_tokens == 1499 + 2809
    assert answer.usage.input_tokens == 10120 - 128
    session = get(proxy, "/sessions/" + SESSION)[1]
    assert session["output_tokens"] == 1499 + 2809
    assert session["cost_usd"] == pytest.approx(
        ((10120 - 128) * 2.0 + 128 * 0.5 + (1499 + 2809) * 6.0) / 1e6)


def test_reasoning_within_completion_tokens_is_counted_once():
    """OpenAI's own usage: the reasoning is part of completion_tokens (and of output_tokens in
    the Responses API), the total the prompt and the completion."""
    chat = ccproxy.anthropic_usage_from_openai({
        "prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150,
        "completion_tokens_details": {"reasoning_tokens": 30}})
    responses = ccproxy.anthropic_usage_from_responses({
        "input_tokens": 100, "output_tokens": 50, "total_tokens": 150,
        "output_tokens_details": {"reasoning_tokens": 30}})
    for usage in (chat, responses):
        assert usage["output_tokens"] == 50
        assert usage["output_tokens_details"] == {"thinking_tokens": 30}
    apart = ccproxy.anthropic_usage_from_responses({
        "input_tokens": 100, "output_tokens": 5, "total_tokens": 135,
        "output_tokens_details": {"reasoning_tokens": 30}})
    assert apart["output_tokens"] == 35


@pytest.mark.parametrize("model", ["grok-4.7", "grok-4.6"])
def test_an_xai_prompt_that_reaches_200k_tokens_pays_twice_every_rate(model):
    config = ccproxy.build_config({"providers": [
        {"name": "xai", "api_key": "k", "models": [model]}]}, "c", {})
    (xai,) = config.providers
    usage = {"input_tokens": 150_000, "cache_read_input_tokens": 49_999, "output_tokens": 1000}
    below = (150_000 * 2.0 + 49_999 * 0.5 + 1000 * 6.0) / 1e6
    assert xai.cost(model, usage) == pytest.approx(below)
    reached = dict(usage, cache_read_input_tokens=50_000)
    assert xai.cost(model, reached) == pytest.approx(
        (150_000 * 4.0 + 50_000 * 1.0 + 1000 * 12.0) / 1e6)
    assert xai.cost("grok-4", usage) is None                   # no page checked: tokens only


def utc(*moment) -> float:
    """The Unix time of a moment in UTC: (year, month, day, hour, minute)."""
    return float(calendar.timegm(moment + (0,) * (6 - len(moment))))


MONDAY = (2026, 12, 7)
DEEPSEEK_USAGE = {"input_tokens": 1_000_000, "cache_read_input_tokens": 1_000_000,
                  "cache_creation_input_tokens": 1_000_000, "output_tokens": 1_000_000}


@pytest.mark.parametrize("preset", ["deepseek", "deepseek-anthropic"])
@pytest.mark.parametrize("model, off_peak", [        # input, cache read, cache write, output
    ("deepseek-flash", 0.15 + 0.003 + 0.15 + 0.60), ("deepseek-v4-pro", 0.66 + 0.022 + 0.66 + 1.98),
    ("deepseek-v4-flash", 0.15 + 0.003 + 0.15 + 0.60)])                  # retired: billed as Flash
def test_deepseek_models_cost_twice_the_off_peak_rates_in_deepseeks_peak_hours(preset, model,
                                                                               off_peak):
    config = ccproxy.build_config({"providers": [
        {"name": preset, "api_key": "k", "models": [model]}]}, "c", {})
    (deepseek,) = config.providers
    peak = [utc(*MONDAY, 1), utc(*MONDAY, 3, 59), utc(*MONDAY, 6), utc(*MONDAY, 9, 59),
            utc(2026, 12, 11, 7, 30)]                                  # and a Friday
    off = [utc(*MONDAY, 0, 59), utc(*MONDAY, 4), utc(*MONDAY, 5, 59), utc(*MONDAY, 10),
           utc(2026, 12, 5, 2), utc(2026, 12, 6, 7)]                   # a Saturday, a Sunday
    for when in peak:
        assert deepseek.cost(model, DEEPSEEK_USAGE, when) == pytest.approx(2 * off_peak), when
    for when in off:
        assert deepseek.cost(model, DEEPSEEK_USAGE, when) == pytest.approx(off_peak), when


def test_a_deepseek_answer_through_the_proxy_costs_the_rate_of_the_hour_it_came(start_proxy,
                                                                              upstream):
    upstream.script = lambda r: openrouter_answer({
        "prompt_tokens": 10_000, "completion_tokens": 500, "prompt_cache_hit_tokens": 8000,
        "prompt_cache_miss_tokens": 2000}, False)
    proxy = start_proxy({"providers": [{"name": "deepseek", "api_key": PROVIDER_KEY,
                                        "api_base_url": upstream.url}]})
    before = time.time()
    ask(proxy, model="deepseek,deepseek-flash")
    after = time.time()
    cost = get(proxy, "/sessions/" + SESSION)[1]["cost_usd"]
    off_peak = (2000 * 0.15 + 8000 * 0.003 + 500 * 0.60) / 1e6
    rates = {2 if ccproxy.in_peak_hours(ccproxy.DEEPSEEK_MODEL_PRICES["deepseek-flash"]["peak"],
                                        moment) else 1 for moment in (before, after)}
    assert cost in [pytest.approx(off_peak * rate) for rate in rates]


def test_a_price_can_have_peak_hours_of_its_own():
    config = ccproxy.build_config({"providers": [{"name": "nightly", "type": "openai",
                                                  "api_key": "k", "api_base_url": "http://h",
                                                  "models": [{"name": "m", "price": {
        "input": 1, "output": 2, "peak": {"utc_hours": [[22, 24], [0, 2]], "output": 4}}}]}]},
        "c", {})
    (provider,) = config.providers
    usage = {"input_tokens": 1_000_000, "output_tokens": 1_000_000}
    assert provider.cost("m", usage, utc(2026, 12, 5, 23)) == pytest.approx(1 + 4)   # Saturday:
    assert provider.cost("m", usage, utc(2026, 12, 6, 1, 59)) == pytest.approx(1 + 4)  # every day
    assert provider.cost("m", usage, utc(2026, 12, 6, 2)) == pytest.approx(1 + 2)


@pytest.mark.parametrize("peak, problem", [
    ({"input": 2}, "models[0].price.peak.utc_hours: must be a list of [start, end] hours UTC"),
    ({"utc_hours": [], "input": 2}, "models[0].price.peak.utc_hours: must be a list"),
    ({"utc_hours": [[4, 1]]}, "models[0].price.peak.utc_hours: must be a list"),
    ({"utc_hours": [[0, 25]]}, "models[0].price.peak.utc_hours: must be a list"),
    ({"utc_hours": [[1.5, 4]]}, "models[0].price.peak.utc_hours: must be a list"),
    ({"utc_hours": [1, 4]}, "models[0].price.peak.utc_hours: must be a list"),
    ({"utc_hours": [[1, 4]], "weekdays_only": "yes"},
     "models[0].price.peak.weekdays_only: must be true or false"),
    ({"utc_hours": [[1, 4]], "input": -1}, "models[0].price.peak.input: must be a number"),
    ({"utc_hours": [[1, 4]], "weekday_only": True}, "models[0].price.peak.weekday_only"),
    ("01-04", "models[0].price.peak: must be an object"),
    ({"utc_hours": [[1, 4]], "above": {}}, "models[0].price.peak.above"),
    (None, "models[0].price.peak: cannot be given with above")])
def test_a_peak_hours_price_that_makes_no_sense_names_its_key(peak, problem):
    price = {"input": 1, "output": 2, "peak": peak}
    if peak is None:
        price = {"input": 1, "output": 2, "above": {"tokens": 1000, "input": 2},
                 "peak": {"utc_hours": [[1, 4]], "input": 2}}
    with pytest.raises(ccproxy.ConfigError) as error:
        ccproxy.build_config({"providers": [{"name": "gemini", "api_key": "k", "models": [
            {"name": "m", "price": price}]}]}, "c", {})
    assert problem in str(error.value)


def test_a_long_prompt_pays_the_long_prompt_rates_where_a_price_has_them():
    config = ccproxy.build_config({"providers": [{"name": "gemini", "api_key": "k", "models": [
        {"name": "gemini-2.5-pro", "price": {
            "input": 1.25, "output": 10, "cache_read": 0.125,
            "above": {"tokens": 200_000, "input": 2.5, "output": 15}}}]}]}, "c", {})
    (gemini,) = config.providers
    short = {"input_tokens": 100_000, "cache_read_input_tokens": 100_000, "output_tokens": 1000}
    assert gemini.cost("gemini-2.5-pro", short) == pytest.approx(
        (100_000 * 1.25 + 100_000 * 0.125 + 1000 * 10) / 1e6)         # 200,000: not above
    long = dict(short, input_tokens=100_001)
    assert gemini.cost("gemini-2.5-pro", long) == pytest.approx(
        (100_001 * 2.5 + 100_000 * 0.125 + 1000 * 15) / 1e6)          # cache_read kept its rate


@pytest.mark.parametrize("above, problem", [
    ({"input": 2}, "models[0].price.above.tokens: must be a whole number"),
    ({"tokens": 0, "input": 2}, "models[0].price.above.tokens: must be a whole number"),
    ({"tokens": 1000, "input": "2"}, "models[0].price.above.input: must be a number"),
    ({"tokens": 1000, "inptu": 2}, "models[0].price.above.inptu"),
    ([200000], "models[0].price.above: must be an object"),
    (None, "models[0].price.cache_raed: unknown key (did you mean 'cache_read'?)")])
def test_a_long_prompt_price_that_makes_no_sense_names_its_key(above, problem):
    with pytest.raises(ccproxy.ConfigError) as error:
        price = {"input": 1, "output": 2, "cache_raed": 0.1} if above is None else {
            "input": 1, "output": 2, "above": above}
        ccproxy.build_config({"providers": [{"name": "gemini", "api_key": "k", "models": [
            {"name": "m", "price": price}]}]}, "c", {})
    assert problem in str(error.value)
