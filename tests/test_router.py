"""Minimal routing: a listed model, routes.default, the first enabled provider."""
from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import re
import warnings

import anthropic
import pytest

import ccproxy
from helpers import (anthropic_message, anthropic_provider, anthropic_stream_events, dead_url,
                     json_reply, Reply, sdk, stream_reply, wait_until)


def status_of(proxy):
    return sdk(proxy).get("/status", cast_to=object)


def route(raw, model):
    config = ccproxy.build_config(raw, "config.json", {})
    routing = ccproxy.route_request(config, {"model": model})
    return routing.provider.name, routing.model


PROVIDERS = [
    {"name": "anthropic", "api_key": "k", "models": ["claude-a", "claude-b"]},
    {"name": "gateway", "type": "anthropic", "api_base_url": "http://127.0.0.1:1",
     "models": ["shared-model"]},
    {"name": "spare", "type": "anthropic", "api_base_url": "http://127.0.0.1:2", "enabled": False,
     "models": ["spare-model"]},
]


def test_a_listed_model_goes_to_its_provider():
    assert route({"providers": PROVIDERS}, "shared-model") == ("gateway", "shared-model")
    assert route({"providers": PROVIDERS}, "claude-b") == ("anthropic", "claude-b")


def test_routes_default_takes_unlisted_models():
    raw = {"providers": PROVIDERS, "routes": {"default": {"provider": "gateway", "model": "gw"}}}
    assert route(raw, "claude-opus-4-8") == ("gateway", "gw")
    assert route(raw, "claude-a") == ("anthropic", "claude-a")


def test_without_routes_the_first_enabled_provider_and_its_first_model():
    assert route({"providers": PROVIDERS}, "unknown") == ("anthropic", "claude-a")
    disabled_first = [dict(PROVIDERS[0], enabled=False)] + PROVIDERS[1:]
    assert route({"providers": disabled_first}, "unknown") == ("gateway", "shared-model")


def test_a_provider_without_models_keeps_the_requested_model():
    raw = {"providers": [{"name": "anthropic", "api_key": "k"}]}
    assert route(raw, "claude-opus-4-8") == ("anthropic", "claude-opus-4-8")


def test_a_disabled_provider_is_never_chosen():
    assert route({"providers": PROVIDERS}, "spare-model") == ("anthropic", "claude-a")
    raw = {"providers": PROVIDERS, "routes": {"default": {"provider": "spare", "model": "x"}}}
    assert route(raw, "other") == ("anthropic", "claude-a")


def test_route_names():
    config = ccproxy.build_config({"providers": PROVIDERS, "routes": {
        "default": {"provider": "gateway", "model": "gw"}}}, "config.json", {})
    assert ccproxy.route_request(config, {"model": "claude-a"}).route == "model"
    assert ccproxy.route_request(config, {"model": "other"}).route == "default"
    config = ccproxy.build_config({"providers": PROVIDERS}, "config.json", {})
    assert ccproxy.route_request(config, {"model": "other"}).route == "first"


def test_no_enabled_provider():
    config = ccproxy.build_config({"providers": [dict(PROVIDERS[2])]}, "config.json", {})
    with pytest.raises(ccproxy.InvalidRequestError, match="every provider in config.json is "
                       'disabled \\("enabled": false\\); enable one'):    # not "add one"
        ccproxy.route_request(config, {"model": "x"})
    assert ccproxy.route_request(config, {"model": "x"}, required=False) is None


# --- routing rules and their precedence ------------------------------------------------------

RULES = {
    "providers": [{"name": "anthropic", "api_key": "k", "models": ["claude-listed"]},
                  {"name": "openai", "api_key": "k", "models": ["gpt-main", "gpt-other"]},
                  {"name": "deepseek", "api_key": "k", "models": ["deepseek-flash"]}],
    "routes": {
        "default": {"provider": "openai", "model": "gpt-main",
                    "fallbacks": ["deepseek,deepseek-flash"]},
        "background": {"provider": "deepseek", "model": "bg"},
        "think": {"provider": "anthropic", "model": "thinker"},
        "longContext": {"provider": "anthropic", "model": "long"},
        "webSearch": {"provider": "openai", "model": "searcher"},
        "image": {"provider": "openai", "model": "vision"},
        "teamBlue": {"provider": "deepseek", "model": "blue",
                     "conditions": [{"type": "header", "header": "x-team", "operator": "==",
                                     "value": "blue"}]},
        "bigTools": {"provider": "openai", "model": "tools-model",
                     "conditions": [{"type": "tools", "operator": "contains", "value": "Agent"},
                                    {"type": "model", "operator": "matches", "value": "^claude-opus"}]},
        "longContextThreshold": 3000,
    },
}


def plan(body, headers=(), raw=RULES):
    config = ccproxy.build_config(raw, "config.json", {})
    body = dict({"model": "claude-sonnet-4-5", "max_tokens": 10,
                 "messages": [{"role": "user", "content": "hi"}]}, **body)
    return [(r.provider.name, r.model, r.route)
            for r in ccproxy.plan_route(config, body, ccproxy.Headers(headers))]


def first(body, headers=()):
    return plan(body, headers)[0]


def test_provider_comma_model_goes_exactly_there():
    assert first({"model": "deepseek,deepseek-reasoner"}) == ("deepseek", "deepseek-reasoner",
                                                             "explicit")
    with pytest.raises(ccproxy.InvalidRequestError, match="'nobody'"):
        first({"model": "nobody,x"})


def test_an_explicit_provider_model_is_tried_alone_unless_its_route_lists_fallbacks():
    raw = dict(RULES, routes={"default": {"provider": "openai", "model": "gpt-main"}})
    assert plan({"model": "deepseek,deepseek-flash"}, (), raw) == [
        ("deepseek", "deepseek-flash", "explicit")]              # no failover to openai
    raw = dict(RULES, routes={"default": {"provider": "openai", "model": "gpt-main"},
                              "cheap": {"provider": "deepseek", "model": "deepseek-flash",
                                        "fallbacks": ["openai,gpt-other"],
                                        "conditions": [{"type": "model", "operator": "==",
                                                        "value": "never"}]}})
    assert plan({"model": "deepseek,deepseek-flash"}, (), raw) == [
        ("deepseek", "deepseek-flash", "explicit"), ("openai", "gpt-other", "cheap")]


def test_an_explicit_choice_of_a_provider_that_is_down_names_it_and_nobody_else(start_proxy,
                                                                                upstream):
    proxy = start_proxy({"providers": [
        {"name": "local", "type": "openai", "api_base_url": dead_url() + "/v1", "models": ["m"]},
        {"name": "other", "type": "anthropic", "api_base_url": upstream.url,
         "api_key": "sk-other-0123456789"}]})
    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk(proxy).messages.create(model="local,m", max_tokens=5,
                                   messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502
    assert caught.value.body["error"]["message"].startswith(
        "local cannot be reached; check providers[0].api_base_url in test-config.json")
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert upstream.requests == []                              # the other provider never asked


def test_a_provider_refusing_its_key_fails_over_and_each_call_is_logged(start_proxy, upstream,
                                                                       second_upstream,
                                                                       ccproxy_log):
    upstream.script = lambda r: json_reply({"type": "error", "error": {
        "type": "authentication_error", "message": "invalid x-api-key"}}, 401)
    proxy = two_providers(start_proxy, upstream.url, second_upstream.url)
    message, headers = ask(proxy)
    assert headers["x-ccproxy-provider"] == "backup"
    failed = [line for line in ccproxy_log if line.startswith("upstream call failed")]
    assert failed == ["upstream call failed: provider=primary model=claude-x status=401: primary "
                      "refused its API key; fix providers[0].api_key in test-config.json "
                      "(invalid x-api-key)"]


def test_a_model_the_provider_lacks_is_a_400_naming_the_route_key(start_proxy, upstream):
    upstream.script = lambda r: json_reply({"error": {
        "message": "The model `gpt-x` does not exist or you do not have access to it.",
        "type": "invalid_request_error", "code": "model_not_found"}}, 404)
    proxy = start_proxy({"providers": [{"name": "openai", "api_base_url": upstream.url + "/v1",
                                        "api_key": "sk-test-0123456789abcdef"}],
                         "routes": {"default": "openai,gpt-x"}})
    with pytest.raises(anthropic.BadRequestError) as caught:
        ask(proxy)
    assert caught.value.body["error"]["message"] == (
        "openai has no model 'gpt-x'; fix routes.default.model in test-config.json (openai: HTTP "
        "404: The model `gpt-x` does not exist or you do not have access to it.)")
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_a_transient_failure_stays_retryable(start_proxy, upstream):
    upstream.script = lambda r: Reply(503, b"{}")
    proxy = two_providers(start_proxy, upstream.url, dead_url())
    with pytest.raises(anthropic.APIStatusError) as caught:
        ask(proxy)
    # the backup's address is wrong (final), but the primary may recover: retry is worth it
    assert "x-should-retry" not in caught.value.response.headers
    assert caught.value.body["error"]["message"].startswith("every provider failed: 1. primary")


def test_a_listed_model_beats_every_route():
    assert first({"model": "gpt-other", "thinking": {"type": "enabled", "budget_tokens": 2000}}) \
        == ("openai", "gpt-other", "model")


def test_custom_routes_need_all_their_conditions():
    agent = {"tools": [{"name": "Agent", "input_schema": {"type": "object"}}]}
    assert first(dict(agent, model="claude-opus-4-8")) == ("openai", "tools-model", "bigTools")
    assert first(dict(agent, model="claude-sonnet-4-5"))[2] == "default"
    assert first({}, [("x-team", "blue")]) == ("deepseek", "blue", "teamBlue")
    assert first({}, [("x-team", "red")])[2] == "default"


def test_custom_routes_come_before_scenario_routes():
    assert first({"thinking": {"type": "enabled", "budget_tokens": 2000}},
                 [("x-team", "blue")])[2] == "teamBlue"


@pytest.mark.parametrize("body, route", [
    ({"messages": [{"role": "user", "content": "word " * 4000}]}, "longContext"),
    ({"model": "claude-haiku-4-5"}, "background"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "webSearch"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2000}}, "think"),
    ({"thinking": {"type": "adaptive"}}, "think"),
    ({"thinking": {"type": "disabled"}}, "default"),
    ({"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A"}}]}]}]},
     "image"),
    ({}, "default"),
])
def test_scenario_routes(body, route):
    assert first(body)[2] == route


def test_scenario_precedence_long_context_then_background_then_search_then_think():
    everything = {"model": "claude-haiku-4-5", "thinking": {"type": "enabled", "budget_tokens": 2000},
                  "tools": [{"type": "web_search_20250305", "name": "web_search"}]}
    searching = dict(RULES, routes=dict(RULES["routes"], background={
        "provider": "anthropic", "model": "bg"}))          # anthropic can search
    assert plan(everything, raw=searching)[0][2] == "background"
    assert plan(dict(everything, messages=[{"role": "user", "content": "w " * 8000}]),
                raw=searching)[0][2] == "longContext"
    assert first(dict(everything, model="claude-x"))[2] == "webSearch"
    assert first(everything)[:2] == ("openai", "searcher")  # deepseek's bg cannot search


def test_long_context_route_with_its_own_token_condition():
    raw = {"providers": RULES["providers"], "routes": {"longContext": {
        "provider": "anthropic", "model": "long",
        "conditions": [{"type": "tokenCount", "operator": ">", "value": 50}]}}}
    assert plan({"messages": [{"role": "user", "content": "word " * 100}]}, raw=raw)[0][2] == \
        "longContext"
    assert plan({}, raw=raw)[0][2] == "first"


def test_candidates_are_the_route_then_its_fallbacks_then_the_others():
    assert plan({}) == [("openai", "gpt-main", "default"), ("deepseek", "deepseek-flash", "default"),
                        ("anthropic", "claude-listed", "failover")]
    no_failover = dict(RULES, failover=False)
    assert plan({}, raw=no_failover) == [("openai", "gpt-main", "default"),
                                         ("deepseek", "deepseek-flash", "default")]


@pytest.mark.parametrize("condition, problem", [
    ({"type": "weather", "operator": "==", "value": 1}, "conditions[0].type: must be one of"),
    ({"type": "model", "operator": "~", "value": 1}, "conditions[0].operator: must be one of"),
    ({"type": "model", "operator": "matches", "value": "("},
     "conditions[0].value: not a valid regular expression"),
    ({"type": "model", "operator": "matches", "value": "a{99999999999}"},
     "conditions[0].value: not a valid regular expression: the repetition number is too large"),
    ({"type": "header", "operator": "==", "value": "x"}, "conditions[0].header"),
])
def test_bad_conditions_name_the_key(condition, problem):
    raw = {"providers": RULES["providers"],
           "routes": {"r": {"provider": "openai", "model": "m", "conditions": [condition]}}}
    with pytest.raises(ccproxy.ConfigError, match=r"config\.json: routes\.r\." + re.escape(problem)):
        ccproxy.build_config(raw, "config.json", {})


def test_a_pattern_a_later_python_reads_differently_is_a_warning_naming_the_key():
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # nothing printed: it is in the warnings
        config = ccproxy.build_config({"providers": RULES["providers"], "routes": {"r": {
            "provider": "openai", "model": "gpt-main", "conditions": [
                {"type": "model", "operator": "matches", "value": "[[:alpha:]]"}]}}},
            "config.json", {})
    assert config.warnings == ["config.json: routes.r.conditions[0].value: Possible nested set "
                               "at position 1: a later Python will read it differently (in a "
                               "set, escape [ as \\[; Python has no [:alpha:] classes)"]


# One request per condition type that makes that condition hold (and not the default).
CONDITION_CASES = {
    "tokenCount": ({"type": "tokenCount", "operator": ">", "value": 100},
                   {"messages": [{"role": "user", "content": "word " * 400}]}, ()),
    "model": ({"type": "model", "operator": "contains", "value": "opus"},
              {"model": "claude-opus-4-8"}, ()),
    "thinking": ({"type": "thinking", "operator": "==", "value": True},
                 {"thinking": {"type": "enabled", "budget_tokens": 2000}}, ()),
    "header": ({"type": "header", "header": "x-task", "operator": "==", "value": "review"},
               {}, [("x-task", "review")]),
    "tools": ({"type": "tools", "operator": ">=", "value": 2},
              {"tools": [{"name": "a", "input_schema": {}}, {"name": "b", "input_schema": {}}]}, ()),
    "agent": ({"type": "agent", "operator": "matches", "value": "^a2"},
              {}, [("x-claude-code-agent-id", "a2152d16dc4a6fbe4")]),
}
SCENARIO_CASES = {
    "longContext": {"messages": [{"role": "user", "content": "word " * 4000}]},
    "background": {"model": "claude-haiku-4-5"},
    "webSearch": {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
    "think": {"thinking": {"type": "adaptive"}},
    "image": {"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "A"}}]}]},
    "subagent": {},
}
# Claude Code marks a subagent's requests with its id (seen from 2.1.197 and 2.1.330).
SCENARIO_HEADERS = {"subagent": [("x-claude-code-agent-id", "a37f57f2dbd845d6d")]}


def test_one_table_each_drives_validation_and_routing_of_conditions_and_scenarios():
    assert set(CONDITION_CASES) == set(ccproxy.CONDITIONS)       # a new type needs a case here
    assert set(SCENARIO_CASES) == set(ccproxy.SCENARIOS)
    for kind, (condition, body, headers) in CONDITION_CASES.items():
        raw = {"providers": RULES["providers"], "routes": {
            "default": {"provider": "openai", "model": "gpt-main"},
            "custom": {"provider": "deepseek", "model": "c", "conditions": [condition]}}}
        assert plan(body, headers, raw)[0][2] == "custom", kind
        assert plan({}, (), raw)[0][2] == "default", kind
    for name, body in SCENARIO_CASES.items():
        raw = {"providers": RULES["providers"], "routes": {
            "default": {"provider": "openai", "model": "gpt-main"},
            name: {"provider": "anthropic", "model": "claude-listed"},
            "longContextThreshold": 3000}}
        assert not ccproxy.build_config(raw, "config.json", {}).warnings
        headers = SCENARIO_HEADERS.get(name, ())
        assert plan(body, headers, raw)[0][2] == name and plan({}, (), raw)[0][2] == "default"


def test_a_route_no_request_would_use_is_warned_about():
    raw = {"providers": RULES["providers"],
           "routes": {"longcontext": {"provider": "openai", "model": "gpt-main"}}}
    warnings = ccproxy.build_config(raw, "config.json", {}).warnings
    assert warnings == ["config.json: routes.longcontext: not a scenario route (longContext, "
                        "subagent, background, webSearch, think, image, default) and without "
                        "conditions: no request will use it"]


def test_fallback_naming_an_unknown_provider_is_an_error():
    raw = {"providers": RULES["providers"],
           "routes": {"default": {"provider": "openai", "model": "m", "fallbacks": ["ghost,m"]}}}
    with pytest.raises(ccproxy.ConfigError, match=r"routes\.default\.fallbacks\[0\]\.provider"):
        ccproxy.build_config(raw, "config.json", {})


# --- failover, retries and the circuit breaker, through the SDK ---------------------------------

def two_providers(start_proxy, first_url, second_url, **performance):
    return start_proxy({"providers": [
        {"name": "primary", "type": "anthropic", "api_base_url": first_url, "api_key": "k1"},
        {"name": "backup", "type": "anthropic", "api_base_url": second_url, "api_key": "k2"}],
                        "performance": performance})


def ask(proxy, stream=False):
    client = sdk(proxy)
    request = dict(model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    if stream:
        with client.messages.stream(**request) as s:
            return s.get_final_message(), None
    raw = client.messages.with_raw_response.create(**request)
    return raw.parse(), raw.headers


def test_refused_connection_fails_over_to_a_healthy_provider(start_proxy, upstream):
    proxy = two_providers(start_proxy, dead_url(), upstream.url)
    message, headers = ask(proxy)
    assert message.content[0].text == "Hello from upstream"
    assert (headers["x-ccproxy-provider"], headers["x-ccproxy-route"]) == ("backup", "failover")
    assert status_of(proxy)["failovers"] == 1


@pytest.mark.parametrize("reply", [
    Reply(500, {"type": "error", "error": {"type": "api_error", "message": "boom"}}),
    Reply(529, {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}),
    Reply(429, {"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}},
          headers={"retry-after": "120"}),
    Reply(502, b"<html>bad gateway</html>", content_type="text/html"),
])
def test_server_errors_fail_over(start_proxy, upstream, second_upstream, reply):
    upstream.script = lambda r: reply
    proxy = two_providers(start_proxy, upstream.url, second_upstream.url)
    message, headers = ask(proxy)
    assert message.content[0].text == "Hello from upstream" and headers["x-ccproxy-provider"] == "backup"
    assert len(upstream.requests) == 1 and len(second_upstream.requests) == 1


def test_a_silent_provider_fails_over_after_the_timeout(start_proxy, upstream, second_upstream):
    upstream.script = lambda r: json_reply(anthropic_message(), delay=5)
    second_upstream.script = lambda r: stream_reply()
    proxy = two_providers(start_proxy, upstream.url, second_upstream.url, request_timeout="300ms")
    message, headers = ask(proxy, stream=True)
    assert message.content[0].text == "Hello!"
    assert len(second_upstream.requests) == 1


def test_the_requests_own_errors_are_not_retried(start_proxy, upstream, second_upstream):
    upstream.script = lambda r: json_reply({"type": "error", "error": {
        "type": "invalid_request_error", "message": "bad"}}, 400)
    proxy = two_providers(start_proxy, upstream.url, second_upstream.url)
    with pytest.raises(anthropic.BadRequestError) as caught:
        ask(proxy)
    assert caught.value.response.headers["x-ccproxy-provider"] == "primary"
    assert second_upstream.requests == []


def test_no_retry_once_the_answer_has_begun(start_proxy, upstream, second_upstream):
    upstream.script = lambda r: stream_reply(anthropic_stream_events()[:3], cut=True)
    proxy = two_providers(start_proxy, upstream.url, second_upstream.url)
    with pytest.raises(anthropic.APIStatusError) as caught:
        ask(proxy, stream=True)
    assert caught.value.body["error"]["type"] == "api_error"
    assert second_upstream.requests == []


def test_when_every_provider_fails_the_error_lists_what_each_answered(start_proxy):
    proxy = two_providers(start_proxy, dead_url(), dead_url())
    with pytest.raises(anthropic.APIStatusError) as caught:
        ask(proxy)
    assert caught.value.status_code == 502
    message = caught.value.body["error"]["message"]
    assert re.match(r"every provider failed: 1\. primary \(claude-x\): primary cannot be "
                    r"reached; check providers\[0\]\.api_base_url in test-config\.json and that "
                    r"its server runs \(primary: cannot reach http://127.0.0.1:\d+/v1/messages: "
                    r".*\); 2\. backup \(claude-x\): backup cannot be reached; check "
                    r"providers\[1\]\.api_base_url", message), message
    assert caught.value.response.headers["x-ccproxy-provider"] == "backup"
    # nothing served at either address: a configuration problem, not worth retrying
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_retries_the_same_provider_with_backoff(start_proxy, upstream, second_upstream):
    answers = [Reply(500, b"{}"), Reply(503, b"{}"), json_reply(anthropic_message("third time"))]
    upstream.script = lambda r: answers.pop(0)
    proxy = two_providers(start_proxy, upstream.url, second_upstream.url, max_retries=2)
    message, headers = ask(proxy)
    assert message.content[0].text == "third time" and len(upstream.requests) == 3
    assert second_upstream.requests == []


def test_a_retry_after_beyond_the_budget_moves_on_at_once(start_proxy, upstream, second_upstream):
    upstream.script = lambda r: Reply(429, b"{}", headers={"retry-after": "600"})
    proxy = two_providers(start_proxy, upstream.url, second_upstream.url, max_retries=3,
                          retry_budget="5s")
    assert ask(proxy)[1]["x-ccproxy-provider"] == "backup"
    assert len(upstream.requests) == 1


def breaker(proxy, name="primary"):
    return proxy.server.app.failover.breakers[name]


def test_circuit_breaker_opens_skips_probes_and_closes(start_proxy, upstream, second_upstream):
    failing = [True]
    upstream.script = lambda r: Reply(500, b"{}") if failing[0] else json_reply(anthropic_message("A"))
    proxy = two_providers(start_proxy, upstream.url, second_upstream.url,
                          circuit_breaker_enabled=True, circuit_breaker_threshold=2,
                          circuit_breaker_cooldown="1h")
    ask(proxy)
    assert status_of(proxy)["providers"][0]["circuit"]["state"] == "closed"
    ask(proxy)
    circuit = status_of(proxy)["providers"][0]["circuit"]
    assert circuit["state"] == "open" and circuit["consecutive_failures"] == 2
    assert ask(proxy)[1]["x-ccproxy-provider"] == "backup"
    assert len(upstream.requests) == 2                   # skipped while open
    breaker(proxy)._opened_at -= 3600                    # the cooldown has passed
    ask(proxy)                                           # the probe fails: open again
    assert len(upstream.requests) == 3 and breaker(proxy).state == "open"
    breaker(proxy)._opened_at -= 3600
    failing[0] = False
    message, headers = ask(proxy)                        # the probe succeeds: closed
    assert message.content[0].text == "A" and headers["x-ccproxy-provider"] == "primary"
    assert breaker(proxy).state == "closed"
    providers = sdk(proxy).get("/providers", cast_to=object)
    assert providers["providers"][0]["circuit"]["state"] == "closed"


def post_from(proxy, source_address, key):
    """(status, JSON) of a Messages request whose connection comes from source_address (any
    address of 127.0.0.0/8 reaches the proxy), presenting key."""
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10,
                                            source_address=(source_address, 0))
    body = json.dumps(dict(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}]))
    connection.request("POST", "/v1/messages", body, {"x-api-key": key,
                                                       "content-type": "application/json"})
    response = connection.getresponse()
    answer = (response.status, json.loads(response.read()), response.getheader("retry-after"))
    connection.close()
    return answer


def test_rate_limit_per_client_address_not_per_unchecked_key(start_proxy, upstream):
    proxy = start_proxy({"providers": [anthropic_provider(upstream)],
                         "performance": {"rate_limit_enabled": True, "rate_limit_rpm": 1,
                                         "rate_limit_burst": 2}})
    assert post_from(proxy, "127.0.0.1", "client-a")[0] == 200
    assert post_from(proxy, "127.0.0.1", "client-b")[0] == 200
    for fake_key in ("client-c", "client-d"):        # rotating made-up keys gains nothing
        status, error, retry_after = post_from(proxy, "127.0.0.1", fake_key)
        assert status == 429 and error["error"]["type"] == "rate_limit_error"
        assert int(retry_after) >= 1
    status, answer, _ = post_from(proxy, "127.0.0.2", "client-a")
    assert status == 200 and answer["content"][0]["text"] == "Hello from upstream"


def test_holders_of_client_keys_are_rate_limited_each_on_their_own_behind_one_address(
        start_proxy, upstream):
    """Behind one balancer every client has its address: a checked client key keeps each
    apart; the shared apikey (or an address without keys) is still one client."""
    alice, bob, shared = "sk-client-alice-0123456789", "sk-client-bob-0123456789", "sk-shared-0123"
    proxy = start_proxy({"providers": [anthropic_provider(upstream)], "apikey": shared,
                         "client_keys": {"alice": alice, "bob": bob},
                         "performance": {"rate_limit_enabled": True, "rate_limit_rpm": 1,
                                         "rate_limit_burst": 1}})
    assert post_from(proxy, "127.0.0.1", alice)[0] == 200
    assert post_from(proxy, "127.0.0.1", alice)[0] == 429
    assert post_from(proxy, "127.0.0.1", bob)[0] == 200
    assert post_from(proxy, "127.0.0.1", shared)[0] == 200
    assert post_from(proxy, "127.0.0.1", shared)[0] == 429
    assert post_from(proxy, "127.0.0.1", "made-up")[0] == 401     # no bucket of its own


def test_a_full_rate_limiter_forgets_only_the_least_recent_client():
    config = ccproxy.build_config({"performance": {"rate_limit_enabled": True,
                                                   "rate_limit_rpm": 1, "rate_limit_burst": 1}},
                                  "c", {})
    app = ccproxy.ProxyApp(config)
    request = ccproxy.Request("POST", "/v1/messages", "HTTP/1.1", ccproxy.Headers())
    try:
        for number in range(ccproxy.MAX_RATE_BUCKETS):
            app.check_rate("10.%d.%d.1" % divmod(number, 256), request)
        app.check_rate("10.0.0.1", request)          # the first client comes back: refused
    except ccproxy.ProxyError as error:
        assert error.status == 429
    else:
        raise AssertionError("the oldest client's bucket was forgotten")
    app.check_rate("192.0.2.1", request)             # a new client evicts the least recent
    assert len(app.rate_limiter.buckets) == ccproxy.MAX_RATE_BUCKETS
    assert "10.0.0.1" in app.rate_limiter.buckets and "10.0.1.1" not in app.rate_limiter.buckets
    app.close("test over")


# --- observability ------------------------------------------------------------------------

def metrics_of(proxy):
    import urllib.request
    with urllib.request.urlopen(proxy.url + "/metrics", timeout=5) as response:
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        return response.read().decode()


def test_metrics_in_prometheus_text(start_proxy, upstream, second_upstream):
    proxy = start_proxy({"providers": [
        {"name": "primary", "type": "anthropic", "api_base_url": dead_url(), "api_key": "k1"},
        {"name": "backup", "type": "anthropic", "api_base_url": upstream.url, "api_key": "k2"}],
        "performance": {"metrics_enabled": True, "circuit_breaker_enabled": True}})
    ask(proxy)
    upstream.script = lambda r: stream_reply()
    ask(proxy, stream=True)
    text = metrics_of(proxy)
    assert 'ccproxy_requests_total{provider="backup",route="failover",status="200"} 2' in text
    assert 'ccproxy_request_duration_seconds_count{provider="backup"} 2' in text
    assert 'ccproxy_request_duration_seconds_bucket{provider="backup",le="+Inf"} 2' in text
    assert 'ccproxy_time_to_first_token_seconds_count{provider="backup"} 1' in text
    assert 'ccproxy_tokens_total{provider="backup",direction="input"} 24' in text
    assert 'ccproxy_tokens_total{provider="backup",direction="output"} 10' in text
    assert "ccproxy_active_streams 0" in text
    assert 'ccproxy_circuit_state{provider="primary"} 0' in text
    assert "ccproxy_failovers_total 2" in text
    for line in text.splitlines():
        assert line.startswith("#") or re.match(r'^[a-z_]+(\{[^}]*\})? [0-9.e+-]+$', line), line


def test_metrics_are_off_unless_enabled(proxy):
    with pytest.raises(anthropic.NotFoundError) as caught:
        sdk(proxy).get("/metrics", cast_to=object)
    assert "metrics_enabled" in caught.value.body["error"]["message"]


def test_subagent_tag_picks_the_model_and_is_removed(start_proxy, upstream):
    proxy = start_proxy({"providers": [
        {"name": "other", "type": "anthropic", "api_base_url": dead_url(), "api_key": "k"},
        anthropic_provider(upstream)]})
    client = sdk(proxy)
    raw = client.messages.with_raw_response.create(
        model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "hi"}],
        system=[{"type": "text", "text": "Main prompt."},
                {"type": "text", "text": "<CCR-SUBAGENT-MODEL>anthropic,claude-sub</CCR-SUBAGENT-MODEL>"
                                         "You review code.", "cache_control": {"type": "ephemeral"}}])
    assert raw.headers["x-ccproxy-route"] == "subagent"
    sent = upstream.requests[0]["json"]
    assert sent["model"] == "claude-sub"
    assert sent["system"] == [{"type": "text", "text": "Main prompt."},
                              {"type": "text", "text": "You review code.",
                               "cache_control": {"type": "ephemeral"}}]


def test_subagent_tag_in_a_string_system_prompt():
    body = {"system": "<CCR-SUBAGENT-MODEL> openai,gpt-4.1 </CCR-SUBAGENT-MODEL>\nBe brief."}
    assert ccproxy.take_subagent_tag(body) == "openai,gpt-4.1"
    assert body["system"] == "Be brief."
    assert ccproxy.take_subagent_tag({"system": "no tag"}) is None


# --- model windows: overflow answered before any provider ------------------------------------

WINDOWED = {
    "providers": [
        {"name": "small", "type": "anthropic", "api_base_url": "http://127.0.0.1:1",
         "models": [{"name": "s-32k", "context_window": 1000}]},
        {"name": "big", "type": "anthropic", "api_base_url": "http://127.0.0.1:2",
         "models": [{"name": "b-1m", "context_window": 1000000}]}],
    "routes": {"default": {"provider": "small", "model": "s-32k"}},
    "failover": False,
}
LONG = {"messages": [{"role": "user", "content": "word " * 3000}]}    # about 3,000 tokens


def test_a_prompt_over_the_known_window_is_refused_in_anthropics_words():
    with pytest.raises(ccproxy.InvalidRequestError) as caught:
        plan(LONG, raw=WINDOWED)
    assert re.match(r"prompt is too long: \d+ tokens > 1000 maximum \(small,s-32k; estimated\)$",
                    caught.value.message)
    assert plan({}, raw=WINDOWED)[0][:2] == ("small", "s-32k")


def test_an_overflow_goes_to_the_long_context_route_when_its_window_fits():
    raw = dict(WINDOWED, routes=dict(WINDOWED["routes"], longContext={
        "provider": "big", "model": "b-1m"}, longContextThreshold=100000))
    assert plan(LONG, raw=raw) == [("big", "b-1m", "longContext")]
    small_long = dict(raw, routes=dict(raw["routes"], longContext={
        "provider": "small", "model": "s-32k"}))
    with pytest.raises(ccproxy.InvalidRequestError, match="prompt is too long"):
        plan(LONG, raw=small_long)


def test_failover_candidates_that_cannot_fit_are_left_out():
    raw = dict(WINDOWED, failover=True)
    assert plan(LONG, raw=raw) == [("big", "b-1m", "failover")]


def test_the_window_check_allows_for_the_estimate_being_high():
    tokens = ccproxy.estimate_request_tokens(dict(LONG, model="m", max_tokens=5))
    just_under = dict(WINDOWED, providers=[dict(WINDOWED["providers"][0], models=[
        {"name": "s-32k", "context_window": int(tokens / 1.08)}])])
    assert plan(LONG, raw=just_under)[0][:2] == ("small", "s-32k")


def test_an_overflow_is_answered_without_calling_the_provider(start_proxy, upstream):
    proxy = start_proxy({"providers": [dict(anthropic_provider(upstream), models=[
        {"name": "tiny", "context_window": 500}])]})
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(proxy).messages.create(model="tiny", max_tokens=5,
                                   messages=[{"role": "user", "content": "word " * 2000}])
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert re.match(r"prompt is too long: \d+ tokens > 500 maximum", caught.value.body["error"][
        "message"])
    assert upstream.requests == []


# --- Ollama: the window it runs a model with, from /api/ps ------------------------------------

def ollama_model(loaded):
    """An Ollama server: /api/ps lists `loaded` (with odd entries), chat answers "ok"."""
    def answer(request):
        if request["path"] == "/api/ps":
            return json_reply({"models": ["junk", {"name": ["x"], "context_length": 5},
                                          {"name": "other", "context_length": "big"}] + [
                {"name": name, "model": name, "context_length": window}
                for name, window in loaded.items()]})
        return json_reply({"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 12, "completion_tokens": 1}})
    return answer


def chat_calls(upstream):
    return [r for r in upstream.requests if r["path"].endswith("/chat/completions")]


def test_ollamas_loaded_context_length_is_the_window(start_proxy, upstream, monkeypatch):
    """Ollama cuts a prompt longer than the context length it runs a model with, without an
    error: the length its /api/ps gives becomes the model's window (no allowance for the
    estimate: a prompt over it is cut, not refused), so the client gets the 400 Claude Code
    compacts on, and nothing is cut. A model not loaded yet is loaded first, so that even the
    first request is checked."""
    loaded = {"qwen3-coder:latest": 4096}
    upstream.script = ollama_model(loaded)
    proxy = start_proxy({"providers": [{"name": "ollama", "api_base_url": upstream.url + "/v1",
                                        "models": ["qwen3-coder", "big-window"]},
                                       {"name": "ollama-two", "type": "openai", "api_key": "k",
                                        "api_base_url": upstream.url + "/v1",
                                        "models": ["other"]}], "failover": False})
    client = sdk(proxy)
    paths = lambda: [r["path"] for r in upstream.requests]     # noqa: E731

    def ask(words, model="qwen3-coder"):
        return client.messages.create(model=model, max_tokens=5, messages=[
            {"role": "user", "content": "word " * words}])

    over = next(words for words in itertools.count(3000, 10) if ccproxy.estimate_request_tokens(
        {"messages": [{"role": "user", "content": "word " * words}]}) > 4096 * 1.04)
    for words in (6000, over):              # the latter within a configured window's allowance
        with pytest.raises(anthropic.BadRequestError) as caught:
            ask(words)
        assert re.match(r"prompt is too long: \d+ tokens > 4096 maximum \(ollama,qwen3-coder; "
                        r"estimated; the context length Ollama runs it with: give it more with "
                        r"OLLAMA_CONTEXT_LENGTH, e.g. 65536\)$",
                        caught.value.body["error"]["message"])
    load = upstream.requests[paths().index("/api/generate")]
    assert load["json"] == {"model": "qwen3-coder"} and chat_calls(upstream) == []
    shown = sdk(proxy).get("/providers/ollama", cast_to=object)["loaded_windows"]
    assert shown == {"qwen3-coder:latest": 4096, "qwen3-coder": 4096}
    assert ask(10).content[0].text == "ok"
    asked = paths().count("/api/ps")
    assert ask(6000, "big-window").content[0].text == "ok"      # loaded, not listed: unknown
    assert paths().count("/api/generate") == 2 and paths().count("/api/ps") == asked + 1
    assert ask(10, "ollama,made-up").content[0].text == "ok"     # not in models: not loaded
    assert paths().count("/api/generate") == 2
    with pytest.raises(anthropic.BadRequestError):
        ask(6000)
    assert paths().count("/api/ps") == asked + 1                  # asked at most once in 10 s
    monkeypatch.setattr(ccproxy, "LOADED_WINDOWS_EVERY_SECONDS", 0.0)
    loaded.clear()                          # Ollama restarted: the model will load anew
    with pytest.raises(anthropic.BadRequestError):
        ask(6000)                           # planned before the new answer came
    assert wait_until(lambda: not proxy.server.app.config.providers[0].loaded_windows, 5)
    assert ask(6000).content[0].text == "ok"
    assert all("authorization" not in r["headers"] for r in upstream.requests
               if r["path"].startswith("/api/"))    # only Ollama is asked, not ollama-two (k)


def test_only_an_ollama_server_of_ones_own_is_asked_for_its_context_lengths():
    def provider(**entry):
        return ccproxy.build_config({"providers": [dict({"name": "ollama"}, **entry)]},
                                    "c.json", {}).providers[0]
    assert provider().runs_models_itself
    assert provider(api_base_url="http://gpu-box.lan:11434/v1").runs_models_itself
    assert not provider(api_base_url="https://ollama.com/v1",
                        api_key="k").runs_models_itself              # its cloud: full length
    assert not provider(name="local", type="openai",
                        api_base_url="http://127.0.0.1:11434/v1").runs_models_itself


def test_an_ollama_provider_without_a_models_list_remembers_a_bounded_number_of_loads(
        upstream, monkeypatch):
    monkeypatch.setattr(ccproxy, "MAX_MODELS_REMEMBERED", 2)
    upstream.script = lambda r: json_reply({"models": []})
    provider = ccproxy.build_config({"providers": [{"name": "ollama", "api_base_url":
                                                    upstream.url + "/v1"}]}, "c.json", {}
                                    ).providers[0]

    async def load_each(names):
        calls = ccproxy.Upstream(2)
        try:
            for name in names:
                await ccproxy.load_for_window(calls, ccproxy.Routing(provider, name, "t"))
        finally:
            calls.close("done")
    asyncio.run(load_each(["a", "b", "c"]))
    assert list(provider.loads_tried) == ["c"]
    assert [r["json"]["model"] for r in upstream.requests if r["path"] == "/api/generate"] == [
        "a", "b", "c"]


def test_ollamas_anthropic_endpoint_is_held_to_the_same_context_length(start_proxy, upstream):
    """Ollama's own advice for Claude Code is its Anthropic endpoint (base URL with no /v1):
    the same cut, the same window learnt from /api/ps."""
    upstream.script = lambda r: json_reply({"models": [
        {"name": "qwen3-coder:latest", "context_length": 4096}]} if r["path"] == "/api/ps"
        else anthropic_message("ok"))
    proxy = start_proxy({"providers": [{"name": "ollama", "type": "anthropic",
                                        "api_base_url": upstream.url,
                                        "models": ["qwen3-coder"]}]})
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(proxy).messages.create(model="qwen3-coder", max_tokens=5, messages=[
            {"role": "user", "content": "word " * 6000}])
    assert caught.value.body["error"]["message"].startswith("prompt is too long: ")
    assert {r["path"] for r in upstream.requests} == {"/api/generate", "/api/ps"}
    answer = sdk(proxy).messages.create(model="qwen3-coder", max_tokens=5, messages=[
        {"role": "user", "content": "hi"}])
    assert answer.content[0].text == "ok" and upstream.requests[-1]["path"] == "/v1/messages"


def test_a_configured_window_wins_over_ollamas_loaded_one(start_proxy, upstream):
    upstream.script = ollama_model({"qwen3-coder": 4096})
    proxy = start_proxy({"providers": [{"name": "ollama", "api_base_url": upstream.url + "/v1",
                                        "models": [{"name": "qwen3-coder",
                                                    "context_window": 100000}]}]})
    provider = proxy.server.app.config.providers[0]
    sdk(proxy).messages.create(model="qwen3-coder", max_tokens=5,
                               messages=[{"role": "user", "content": "hi"}])
    assert wait_until(lambda: provider.loaded_windows, 5)
    answer = sdk(proxy).messages.create(model="qwen3-coder", max_tokens=5, messages=[
        {"role": "user", "content": "word " * 6000}])
    assert answer.content[0].text == "ok" and provider.context_window("qwen3-coder") == 100000


@pytest.mark.parametrize("kind", ["anthropic", "openai", "gemini"])
def test_max_tokens_is_lowered_to_the_models_output_limit(start_proxy, upstream, kind):
    provider = {"name": "p", "type": kind, "api_key": "k", "api_base_url": upstream.url,
                "models": [{"name": "m", "max_output_tokens": 1000}]}
    upstream.script = {
        "anthropic": lambda r: json_reply(anthropic_message()),
        "openai": lambda r: json_reply({"choices": [{"message": {"content": "ok"},
                                                     "finish_reason": "stop"}]}),
        "gemini": lambda r: json_reply({"candidates": [{"content": {"parts": [{"text": "ok"}]},
                                                        "finishReason": "STOP"}]})}[kind]
    proxy = start_proxy({"providers": [provider]})
    sdk(proxy).messages.create(model="m", max_tokens=16000,
                               messages=[{"role": "user", "content": "hi"}])
    sent = upstream.requests[0]["json"]
    assert (sent.get("max_tokens") or sent.get("generationConfig", {}).get("maxOutputTokens")) \
        == 1000
