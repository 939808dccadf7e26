"""Watching it: the status page in a real headless Chromium after traffic through two
providers, and the same usage and cost in /status, /metrics and the status line."""
from __future__ import annotations

import json
import re
import urllib.request

import pytest

import ccproxy
from helpers import (RunningProxy, anthropic_message, anthropic_provider, json_reply,
                     page_server, render, sdk)

SESSION = "5d0c1f7a-2b9e-4f0d-8a51-7c3e9b2d4a60"
PRICE = {"input": 3, "output": 15, "cache_read": 0.3}


def openai_reply(request):
    return json_reply({"id": "c", "object": "chat.completion", "created": 1, "model": "gpt-5",
                       "choices": [{"index": 0, "finish_reason": "stop", "message": {
                           "role": "assistant", "content": "ok"}}],
                       "usage": {"prompt_tokens": 1200, "completion_tokens": 30,
                                 "prompt_tokens_details": {"cached_tokens": 1000}}})


@pytest.fixture
def busy_proxy(start_proxy, upstream, second_upstream):
    """A proxy that has answered through two providers (with prices), and one refusal."""
    upstream.script = lambda r: json_reply(dict(anthropic_message(), usage={
        "input_tokens": 100, "output_tokens": 20}))
    second_upstream.script = openai_reply
    proxy = start_proxy({
        "providers": [anthropic_provider(upstream, models=[
                          {"name": "claude-sonnet-4-5", "price": PRICE}]),
                      {"name": "openai", "api_key": "sk-openai-0123456789",
                       "api_base_url": second_upstream.url + "/v1",
                       "models": [{"name": "gpt-5", "price": {"input": 1.25, "output": 10,
                                                              "cache_read": 0.5}}]}],
        "routes": {"default": "anthropic,claude-sonnet-4-5",
                   "background": {"provider": "openai", "model": "gpt-5",
                                  "fallbacks": ["anthropic,claude-sonnet-4-5"]}},
        "performance": {"metrics_enabled": True}})
    client = sdk(proxy)
    for model in ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-haiku-4-5"):
        client.messages.create(model=model, max_tokens=5, messages=[
            {"role": "user", "content": "hi"}], extra_headers={
                "x-claude-code-session-id": SESSION})
    return proxy


def test_the_status_page_shows_providers_routes_requests_and_todays_cost(busy_proxy,
                                                                         tmp_path):
    dom = render(busy_proxy.url + "/")
    assert "<h1>ccproxy</h1>" in dom and "version %s" % ccproxy.__version__ in dom
    rows = re.findall(r"<tr>(.*?)</tr>", dom)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in rows]
    assert ["anthropic", "anthropic", "yes", "disabled", "0", ""] == [
        c for c in cells if c[:1] == ["anthropic"] and len(c) == 7][0][:6]
    assert ["background", "openai,gpt-5", "anthropic,claude-sonnet-4-5"] in cells
    usage = {tuple(c[:2]): c[2:] for c in cells if len(c) == 7 and c[0] in ("anthropic", "openai")
             and c[1] in ("claude-sonnet-4-5", "gpt-5")}
    assert usage[("openai", "gpt-5")] == ["2", "2,400", "2,000", "60", "$0.0021"]
    assert usage[("anthropic", "claude-sonnet-4-5")] == ["1", "100", "0", "20", "$0.0006"]
    requests = [c for c in cells if len(c) == 9]
    assert len(requests) == 3 and requests[0][1:5] == ["background", "openai", "gpt-5",
                                                        "200"]
    assert "<b>$0.0027</b>cost today" in dom                  # today's total cost card
    assert '<div id="by-client" hidden="">' in dom             # no client_keys, no such table
    assert "sk-openai-0123456789" not in dom and "Hello" not in dom   # no key, no content
    for width in (1280, 390):
        shot = tmp_path / ("status-%d.png" % width)
        render(busy_proxy.url + "/", "--screenshot=%s" % shot,
               "--window-size=%d,1100" % width, "--hide-scrollbars")
        assert shot.stat().st_size > 10000


def test_the_page_asks_for_the_key_of_a_proxy_that_has_one(start_proxy, upstream):
    proxy = start_proxy({"apikey": "team-key-0123456789",
                         "providers": [anthropic_provider(upstream)]})
    dom = render(proxy.url + "/")
    assert re.search(r'<form id="login">', dom)               # shown, no longer hidden
    assert "the proxy asks for its key" in dom and "<td>anthropic</td>" not in dom


def test_the_page_shows_the_context_length_ollama_runs_a_model_with(start_proxy, upstream):
    upstream.script = lambda r: json_reply(
        {"models": [{"name": "qwen3-coder:latest", "context_length": 32768}]}
        if r["path"] == "/api/ps" else {"choices": [{"message": {"content": "ok"},
                                                     "finish_reason": "stop"}]})
    proxy = start_proxy({"providers": [{"name": "ollama", "api_base_url": upstream.url + "/v1",
                                        "models": ["qwen3-coder", "gemma4"]}]})
    sdk(proxy).messages.create(model="qwen3-coder", max_tokens=5,
                               messages=[{"role": "user", "content": "hi"}])
    dom = render(proxy.url + "/")
    assert "<td>qwen3-coder (context 32768), gemma4</td>" in dom


def test_the_page_shows_todays_usage_by_client_key_when_there_are_client_keys(start_proxy,
                                                                              upstream):
    """The page as a browser that has been given a key sees it: the page and the /status it
    read from a proxy with client_keys, served to Chromium from one loopback server (headless
    Chromium cannot type the key into the page's form)."""
    upstream.script = lambda r: json_reply(dict(anthropic_message(), usage={
        "input_tokens": 100, "output_tokens": 20}))
    keys = {"alice": "sk-client-alice-0123456789", "bob": "sk-client-bob-0123456789"}
    proxy = start_proxy({"client_keys": keys, "providers": [anthropic_provider(upstream, models=[
        {"name": "claude-sonnet-4-5", "price": PRICE}])]})
    for name in ("alice", "alice", "bob"):
        sdk(proxy, keys[name]).messages.create(model="claude-sonnet-4-5", max_tokens=5,
                                               messages=[{"role": "user", "content": "hi"}])
    status = urllib.request.urlopen(urllib.request.Request(
        proxy.url + "/status", headers={"x-api-key": keys["bob"]})).read()
    served = {"/": (ccproxy.STATUS_PAGE, "text/html"), "/status": (status, "application/json")}
    with page_server(served) as port:
        dom = render("http://127.0.0.1:%d/" % port)
    assert re.search(r'<div id="by-client">\s*<h2>Usage today by client key</h2>', dom)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", dom)]
    assert ["alice", "2", "200", "0", "40", "$0.0012"] in cells
    assert ["bob", "1", "100", "0", "20", "$0.0006"] in cells
    assert not any(key in dom for key in keys.values())


def test_status_metrics_and_the_status_line_agree_with_the_page(busy_proxy, tmp_path):
    status = json.loads(urllib.request.urlopen(busy_proxy.url + "/status").read())
    today = {(m["provider"], m["model"]): m for m in status["usage"]["today"]["by_model"]}
    assert today[("openai", "gpt-5")]["cost_usd"] == pytest.approx(
        (200 * 1.25 + 30 * 10 + 1000 * 0.5) * 2 / 1e6)
    metrics = urllib.request.urlopen(busy_proxy.url + "/metrics").read().decode()
    assert 'ccproxy_usage_tokens_total{provider="openai",model="gpt-5",type="cache_read"} ' \
           '2000' in metrics
    assert re.search(r'ccproxy_usage_cost_dollars_total\{provider="openai",model="gpt-5"\} '
                     r'0\.002100', metrics)
    pidfile = tmp_path / "ccproxy.pid"
    pidfile.write_text(json.dumps({"pid": 1, "url": busy_proxy.url}))
    status, line = ccproxy.statusline_client(str(pidfile), json.dumps(
        {"session_id": SESSION}).encode(), 2.0)
    assert line == "ccproxy: gpt-5 (openai) · 2.5k in (80% cached) · 80 out · $0.0027 · " \
                   "today 2.6k tokens $0.0027"


def test_a_cost_past_half_a_dollar_shows_in_cents_on_the_page_and_the_status_line(
        start_proxy, upstream, tmp_path):
    upstream.script = lambda r: json_reply(dict(anthropic_message(), usage={
        "input_tokens": 1000, "output_tokens": 0}))
    proxy = start_proxy({"providers": [anthropic_provider(upstream, models=[
        {"name": "claude-sonnet-4-5", "price": {"input": 1234, "output": 0}}])]})
    sdk(proxy).messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=[
        {"role": "user", "content": "hi"}], extra_headers={"x-claude-code-session-id": SESSION})
    assert "<b>$1.23</b>cost today" in render(proxy.url + "/")      # not $1.2340
    pidfile = tmp_path / "ccproxy.pid"
    pidfile.write_text(json.dumps({"pid": 1, "url": proxy.url}))
    line = ccproxy.statusline_client(str(pidfile), json.dumps({"session_id": SESSION}).encode(),
                                     2.0)[1]
    assert line.endswith("· 0 out · $1.23 · today 1.0k tokens $1.23")
    assert [ccproxy.dollars(cost) for cost in (0, 0.00271, 0.5, 0.51, 12.3)] == [
        "$0.0000", "$0.0027", "$0.5000", "$0.51", "$12.30"]


def test_an_edit_that_breaks_the_config_file_shows_until_it_is_fixed(upstream, tmp_path):
    """A team server keeps serving on the config it loaded; /status and the page say why the
    edit was not taken, until the file loads again."""
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"port": 0, "providers": [anthropic_provider(upstream)]}))
    proxy = RunningProxy(ccproxy.load_config(str(config_file), {}))
    try:
        app = proxy.server.app
        status = lambda: json.loads(urllib.request.urlopen(proxy.url + "/status").read())
        assert status()["config_problem"] is None
        config_file.write_text(config_file.read_text().replace('"providers"', '"providers":'))
        assert app.reload_config() is False
        problem = status()["config_problem"]
        assert problem.startswith("%s: not valid JSON" % config_file)
        dom = render(proxy.url + "/")
        assert '<p id="config-problem" class="open">The config file was edited and does not ' \
               'load; the proxy runs on the config it loaded before: %s</p>' % problem in dom
        assert "<td>anthropic</td>" in dom                     # still serving on the old one
        config_file.write_text(json.dumps({"port": 0, "providers": [anthropic_provider(
            upstream)]}))
        assert app.reload_config() is True and status()["config_problem"] is None
        assert '<p id="config-problem" class="open" hidden="">' in render(proxy.url + "/")
    finally:
        proxy.stop()


def test_a_plain_client_still_gets_json_at_the_root(busy_proxy):
    answer = urllib.request.urlopen(busy_proxy.url + "/")
    assert json.loads(answer.read()) == {"name": "ccproxy", "status": "ok"}
    page = urllib.request.urlopen(urllib.request.Request(busy_proxy.url + "/", headers={
        "accept": "text/html"}))
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
