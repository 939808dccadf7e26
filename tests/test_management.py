"""Provider management API and config reload: validated, live, persisted, guarded."""
from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading

import anthropic
import pytest

import ccproxy
from helpers import REPO, RunningProxy, sdk, stream_reply, wait_until

FILE = """{
  // hand-written, with a comment
  "port": 0,
  "providers": [
    {"name": "main", "type": "anthropic", "api_base_url": "%s", "api_key": "${MAIN_KEY}",
     "models": ["claude-main"]}
  ],
  "routes": {"default": {"provider": "main", "model": "claude-main"}}
}
"""
ENV = {"MAIN_KEY": "sk-main-key-0123456789abcdef"}


@pytest.fixture
def managed(tmp_path, upstream):
    path = tmp_path / "config.json"
    path.write_text(FILE % upstream.url)
    proxies = []

    def start(extra_env=None):
        config = ccproxy.load_config(str(path), dict(ENV, **(extra_env or {})))
        proxies.append(RunningProxy(config))
        return proxies[-1]

    start.path = path
    yield start
    for proxy in proxies:
        proxy.stop()


def call(proxy, method, path, body=None, key="c"):
    """(status, JSON) of a management call."""
    client = sdk(proxy, key)
    try:
        response = client.request(object, anthropic._base_client.FinalRequestOptions.construct(
            method=method, url=path, json_data=body))
        return 200, response
    except anthropic.APIStatusError as error:
        return error.status_code, error.body


def ask(proxy, model):
    return sdk(proxy).messages.with_raw_response.create(
        model=model, max_tokens=5, messages=[{"role": "user", "content": "hi"}])


NEW = {"name": "second", "type": "anthropic", "api_key": "sk-second-key-0123456789",
       "models": ["claude-second"]}


def test_create_get_replace_delete_round_trip_survives_a_restart(managed, second_upstream):
    proxy = managed()
    status, created = call(proxy, "post", "/providers", dict(NEW, api_base_url=second_upstream.url))
    assert status == 200 and created["name"] == "second"
    assert created["api_key"] == "sk-s…6789" and created["circuit"]["state"] == "disabled"
    raw = ask(proxy, "claude-second")
    assert raw.headers["x-ccproxy-provider"] == "second" and len(second_upstream.requests) == 1
    assert call(proxy, "get", "/providers/second")[1]["models"] == ["claude-second"]

    replaced = dict(NEW, api_base_url=second_upstream.url, models=["claude-renamed"])
    status, body = call(proxy, "put", "/providers/second", replaced)
    assert status == 200 and body["models"] == ["claude-renamed"]
    assert ask(proxy, "claude-renamed").headers["x-ccproxy-provider"] == "second"

    written = json.loads(managed.path.read_text())
    assert [p["name"] for p in written["providers"]] == ["main", "second"]
    assert written["providers"][0]["api_key"] == "${MAIN_KEY}"          # references kept
    assert stat.S_IMODE(managed.path.stat().st_mode) == 0o600
    proxy.stop()

    restarted = managed()
    assert [p["name"] for p in call(restarted, "get", "/providers")[1]["providers"]] == \
        ["main", "second"]
    assert call(restarted, "delete", "/providers/second") == (200, {"deleted": "second"})
    assert call(restarted, "get", "/providers/second")[0] == 404
    assert [p["name"] for p in json.loads(managed.path.read_text())["providers"]] == ["main"]


def test_a_change_keeps_an_edit_of_the_file_the_watch_has_not_seen_yet(managed, second_upstream):
    """The file watch looks every two seconds: a change through the API in between had
    written the file from the config in memory, and the edit was lost without a word."""
    proxy = managed()
    managed.path.write_text(managed.path.read_text().replace('"routes": {', '"routes": {'
        '"background": {"provider": "main", "model": "claude-main"}, '))
    status, _ = call(proxy, "post", "/providers", dict(NEW, api_base_url=second_upstream.url))
    written = json.loads(managed.path.read_text())
    assert status == 200 and [p["name"] for p in written["providers"]] == ["main", "second"]
    assert written["routes"]["background"] == {"provider": "main", "model": "claude-main"}

    managed.path.write_text(managed.path.read_text().replace('"routes"', '"routes": 5, "x"'))
    before = managed.path.read_text()
    status, error = call(proxy, "delete", "/providers/second")
    assert status == 409 and error["error"]["message"].startswith(
        "the config file was edited and is not valid now; fix it, then make the change: ")
    assert managed.path.read_text() == before
    assert call(proxy, "get", "/providers/second")[0] == 200       # the running config stays

    router = json.dumps({"Providers": [{"name": "mine", "api_base_url": second_upstream.url +
                                        "/v1/chat/completions", "api_key": "sk-mine-0123456789",
                                        "models": ["m1"]}], "Router": {"default": "mine,m1"}})
    managed.path.write_text(router)           # now Claude Code Router's, which is never rewritten
    status, error = call(proxy, "delete", "/providers/second")
    assert status == 409 and "is a Claude Code Router config, converted when read" in \
        error["error"]["message"] and managed.path.read_text() == router


@pytest.mark.parametrize("body, problem", [
    ({"name": "x", "type": "anthropic", "api_base_url": "ftp://nope"},
     "request body: provider.api_base_url: not an http(s) URL"),
    ({"name": "x"}, "request body: provider.type: must be one of"),
    ({"name": "openai"}, "request body: provider.api_key: required for openai"),
    ({"name": "x", "type": "openai", "api_base_url": "http://h", "models": "m"},
     "request body: provider.models: must be a list"),
    ({"name": "x", "type": "openai", "api_base_url": "http://h",
      "models": [{"name": "m", "context_window": -1}]},
     "request body: provider.models[0].context_window: must be a positive number of tokens"),
])
def test_a_bad_provider_gets_a_400_naming_the_field(managed, body, problem):
    proxy = managed()
    status, error = call(proxy, "post", "/providers", body)
    assert status == 400 and error["error"]["type"] == "invalid_request_error"
    assert problem in error["error"]["message"]


def test_conflicts_and_missing_providers(managed, second_upstream):
    proxy = managed()
    assert call(proxy, "post", "/providers", dict(NEW, name="main", api_base_url="http://h"))[0] == 409
    assert call(proxy, "put", "/providers/ghost", dict(NEW, name="ghost", api_base_url="http://h"))[0] == 404
    assert call(proxy, "delete", "/providers/ghost")[0] == 404
    status, error = call(proxy, "put", "/providers/main", dict(NEW, api_base_url="http://h"))
    assert status == 400 and "cannot be renamed" in error["error"]["message"]
    status, error = call(proxy, "delete", "/providers/main")     # routes.default needs it
    assert status == 409
    assert "routes.default.provider: no provider named 'main'" in error["error"]["message"]
    assert call(proxy, "get", "/providers/main")[0] == 200


def test_management_is_guarded_like_everything_else(tmp_path, upstream):
    path = tmp_path / "config.json"
    path.write_text((FILE % upstream.url).replace('"port": 0,', '"port": 0, "apikey": "admin-key",'))
    proxy = RunningProxy(ccproxy.load_config(str(path), ENV))
    try:
        status, error = call(proxy, "post", "/providers", dict(NEW, api_base_url="http://h"), key="bad")
        assert status == 401 and error["error"]["type"] == "authentication_error"
        assert call(proxy, "post", "/providers", dict(NEW, api_base_url="http://h"),
                    key="admin-key")[0] == 200
    finally:
        proxy.stop()


def test_in_flight_stream_survives_a_change_of_its_provider(managed, upstream):
    proxy = managed()
    reply = stream_reply(pause_before=3)
    upstream.script = lambda r: reply
    client = sdk(proxy)
    with client.messages.stream(model="claude-main", max_tokens=5,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        events = iter(stream)
        next(events)
        changed = dict(NEW, name="main", type="anthropic", api_base_url="http://127.0.0.1:9",
                       models=["claude-main"])
        assert call(proxy, "put", "/providers/main", changed)[0] == 200
        reply.release.set()
        final = stream.get_final_message()
    assert final.content[0].text == "Hello!"


def test_concurrent_changes_and_traffic_lose_no_request(managed, upstream):
    proxy = managed()
    failures, done = [], threading.Event()

    def traffic():
        client = sdk(proxy)
        while not done.is_set():
            try:
                client.messages.create(model="claude-main", max_tokens=5,
                                       messages=[{"role": "user", "content": "hi"}])
            except Exception as exc:      # collected and asserted below
                failures.append(exc)

    workers = [threading.Thread(target=traffic) for _ in range(4)]
    for worker in workers:
        worker.start()
    for round_number in range(15):
        name = "extra%d" % round_number
        assert call(proxy, "post", "/providers", dict(NEW, name=name, api_base_url="http://h"))[0] == 200
        assert call(proxy, "put", "/providers/" + name,
                    dict(NEW, name=name, api_base_url="http://h2"))[0] == 200
        assert call(proxy, "delete", "/providers/" + name)[0] == 200
    done.set()
    for worker in workers:
        worker.join(30)
    assert failures == [] and len(upstream.requests) > 0


def test_an_edited_file_is_reloaded_and_a_broken_one_refused(managed, second_upstream):
    proxy = managed()
    text = managed.path.read_text()
    managed.path.write_text(text.replace('"models": ["claude-main"]}',
                                         '"models": ["claude-main"]},\n    {"name": "fresh", '
                                         '"type": "anthropic", "api_base_url": "%s", '
                                         '"models": ["claude-fresh"]}' % second_upstream.url))
    os.utime(managed.path, (1, 1))                     # a new mtime whatever the clock says
    assert wait_until(lambda: call(proxy, "get", "/providers/fresh")[0] == 200, 10)
    managed.path.write_text("{ broken")
    os.utime(managed.path, (2, 2))
    assert wait_until(lambda: proxy.server.app.config_signature == (2 * 10**9, 8), 10)
    assert call(proxy, "get", "/providers/fresh")[0] == 200   # the running config stayed
    managed.path.write_text(text)           # the edit finished within the same (coarse) time
    os.utime(managed.path, (2, 2))
    assert wait_until(lambda: call(proxy, "get", "/providers/fresh")[0] == 404, 10)


def test_sighup_reloads_the_config(tmp_path, upstream):
    path = tmp_path / "config.json"
    path.write_text(FILE % upstream.url)
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_")},
               HOME=str(tmp_path), **ENV)
    process = subprocess.Popen([sys.executable, str(REPO / "ccproxy.py"), "start", "--foreground",
                                "--config", str(path)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in process.stderr:
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                break
        url = match.group(1)
        path.write_text(FILE.replace('"claude-main"]', '"claude-main", "claude-hup"]') % upstream.url)
        process.send_signal(signal.SIGHUP)
        for line in process.stderr:
            if "configuration reloaded" in line:
                break
        client = anthropic.Anthropic(base_url=url, api_key="c")
        providers = client.get("/providers", cast_to=object)["providers"]
        assert providers[0]["models"] == ["claude-main", "claude-hup"]
    finally:
        process.terminate()
        process.wait(10)


# --- a replica's config, managed outside ccproxy -------------------------------------------------

NEW_PROVIDER = {"name": "extra", "type": "openai", "api_base_url": "http://127.0.0.1:9/v1",
                "api_key": "sk-extra-0123456789"}


@pytest.mark.parametrize("how", ["read_only", "not writable"])
def test_changes_are_refused_when_the_config_is_managed_elsewhere(managed, monkeypatch, how):
    if how == "read_only":
        managed.path.write_text(managed.path.read_text().replace(
            '"port": 0,', '"port": 0, "management": {"read_only": true},'))
        reason = "management.read_only is true"
    else:                       # a ConfigMap mount (root may write anything: asked of os.access)
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(
            managed.path) else real_access(path, mode))
        reason = "%s is not writable by ccproxy" % managed.path
    proxy = managed()
    before = managed.path.read_text()
    for method, path, body in (("POST", "/providers", NEW_PROVIDER),
                               ("PUT", "/providers/main", dict(NEW_PROVIDER, name="main")),
                               ("DELETE", "/providers/main", None)):
        status, answer = call(proxy, method, path, body)
        assert status == 403, answer
        assert answer["error"]["message"].startswith(
            "the configuration is managed outside ccproxy (%s)" % reason)
    assert managed.path.read_text() == before
    assert call(proxy, "GET", "/providers")[0] == 200          # reading still works


def test_a_bad_management_section_names_its_key():
    with pytest.raises(ccproxy.ConfigError) as caught:
        ccproxy.build_config({"management": {"read_only": "yes"}}, "m.json", {})
    assert "m.json: management.read_only: must be true or false" in str(caught.value)
