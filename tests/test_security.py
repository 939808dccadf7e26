"""Hardening: each attack of the adversarial review, as the review ran it (loopback only), and
hypothesis fuzzing of everything that ends up in a header line."""
from __future__ import annotations

import json
import os
import re
import resource
import socket
import stat
import subprocess
import sys
import time
import urllib.parse

import anthropic
import pytest
from hypothesis import given, settings, strategies as st

import ccproxy
from helpers import (anthropic_message, anthropic_provider, anthropic_stream_events, json_reply,
                     open_stream, page_server, raw_exchange, RawProvider, read_to_end, render,
                     Reply, REPO, RunningProxy, sdk, stream_reply, wait_until)

KEY = "sk-proj-abc/def+ghi=0123456789xyz"       # '/', '+', '=' change when URL-encoded


def ask(proxy, model="m", key="client", **extra):
    return sdk(proxy, key).messages.create(
        model=model, max_tokens=5, messages=[{"role": "user", "content": "hi"}], **extra)


def get(proxy, path, key="client"):
    return sdk(proxy, key).get(path, cast_to=object)


def openai_sse(*pieces_of_text, finish="stop"):
    """An OpenAI stream: one chunk per text piece, a finish chunk, [DONE]."""
    chunks = [{"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
              for text in pieces_of_text]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    return [b"data: %s\n\n" % json.dumps(c).encode() for c in chunks] + [b"data: [DONE]\n\n"]


def openai_provider(upstream, name="foai", **extra):
    return dict({"name": name, "type": "openai", "api_base_url": upstream.url + "/v1",
                 "api_key": KEY}, **extra)


def head_of(response: bytes) -> list:
    """The header lines of a raw HTTP response."""
    return response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]


# --- 1. keys with control characters, and masking of every form ----------------------------

def test_a_key_pasted_with_a_newline_is_stripped_and_works(tmp_path, upstream):
    upstream.script = lambda r: Reply(200, pieces=openai_sse("ok"), content_type="text/event-stream")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"port": 0, "providers": [
        openai_provider(upstream, api_key="${NLKEY}")]}))
    proxy = RunningProxy(ccproxy.load_config(str(path), {"NLKEY": KEY + "\n"}))
    try:
        with sdk(proxy).messages.stream(model="gpt", max_tokens=5,
                                        messages=[{"role": "user", "content": "hi"}]) as stream:
            assert stream.get_final_message().content[0].text == "ok"
    finally:
        proxy.stop()
    assert upstream.requests[0]["headers"]["authorization"] == "Bearer " + KEY


@pytest.mark.parametrize("field, value, key_path", [
    ("api_key", "sk-abc\x07def-0123456789", "providers[0].api_key"),
    ("api_key", "sk-abc\ndef-0123456789", "providers[0].api_key"),
    ("headers", {"X-Team": "a\r\nInjected: yes"}, "providers[0].headers.X-Team"),
    ("headers", {"Bad Name": "v"}, "providers[0].headers.Bad Name"),
    ("name", "evil\r\nX: y", "providers[0].name"),
    ("name", "two,parts", "providers[0].name"),
    ("models", ["ok", "m\r\nX: y"], "providers[0].models[1]"),
])
def test_control_characters_are_refused_naming_the_key_never_its_value(field, value, key_path):
    provider = {"name": "p", "type": "openai", "api_base_url": "http://127.0.0.1:9/v1",
                "api_key": "k"}
    provider[field] = value
    with pytest.raises(ccproxy.ConfigError) as caught:
        ccproxy.build_config({"providers": [provider]}, "config.json", {})
    message = str(caught.value)
    assert "config.json: %s:" % key_path in message
    assert "sk-abc" not in message and "Injected" not in message


@pytest.mark.parametrize("field, value, key_path, problem", [
    ("api_key", "sk-abc-0123456789\u200b", "providers[0].api_key",
     "must be printable ASCII (U+200B at position 17 is not: pasted from a web page?)"),
    ("api_key", "sk-abc\u20140123456789", "providers[0].api_key", "U+2014 at position 6"),
    ("api_key", "sk-ab\u00e9-0123456789", "providers[0].api_key", "U+00E9 at position 5"),
    ("api_keys", ["sk-abc-0123456789", "Bearer sk-abc-9876543210"], "providers[0].api_keys[1]",
     'starts with "Bearer ": give the key alone'),
    ("api_key", "bearer sk-abc-0123456789", "providers[0].api_key", 'starts with "Bearer "'),
    ("api_key", "$OPENAI_API_KEY", "providers[0].api_key",
     "is the name of a variable: write ${OPENAI_API_KEY} for ccproxy to read it"),
    ("api_key", "%OPENAI_API_KEY%", "providers[0].api_key", "write ${OPENAI_API_KEY}"),
    ("headers", {"X-Team": "sk-abc\u00a0team"}, "providers[0].headers.X-Team", "U+00A0"),
])
def test_a_key_http_cannot_send_is_refused_saying_why(field, value, key_path, problem):
    """A key with a character HTTP cannot send had passed the check, and every request then
    failed with a 502 'cannot reach' the provider; one HTTP can send but the provider cannot
    read ("Bearer sk-...", "$OPENAI_API_KEY") failed as a refused key. Each is refused at load,
    naming the key path, never its value."""
    provider = {"name": "p", "type": "openai", "api_base_url": "http://127.0.0.1:9/v1"}
    provider[field] = value
    with pytest.raises(ccproxy.ConfigError) as caught:
        ccproxy.build_config({"providers": [provider]}, "config.json", {})
    message = str(caught.value)
    assert "config.json: %s: %s" % (key_path, problem) in message or (
        "config.json: %s:" % key_path in message and problem in message)
    assert "sk-abc" not in message


def test_a_key_http_cannot_send_is_refused_through_the_management_api_too(managed):
    proxy, path = managed
    before = path.read_text()
    status, error = manage(proxy, "post", "/providers", {
        "name": "x", "type": "anthropic", "api_base_url": "http://127.0.0.1:9",
        "api_key": "sk-abc-0123456789\u200b"})
    assert status == 400 and "provider.api_key: must be printable ASCII (U+200B at position " \
        "17" in error["error"]["message"]
    assert path.read_text() == before and "sk-abc" not in json.dumps(error)


def test_a_key_with_spaces_inside_is_still_a_key_for_clients():
    """Client keys may be pass phrases: only what HTTP cannot send is refused there."""
    config = ccproxy.build_config({"apikey": "correct horse battery staple"}, "c.json", {})
    assert config.apikey == "correct horse battery staple"
    with pytest.raises(ccproxy.ConfigError, match="c.json: admin_key: must be printable ASCII"):
        ccproxy.build_config({"admin_key": "admin-key-0123456789\u200b"}, "c.json", {})


def test_the_proxy_keys_are_stripped_and_checked_too():
    config = ccproxy.build_config({"apikey": " client-key\n", "admin_key": "\tadmin-key "},
                                  "c.json", {})
    assert (config.apikey, config.admin_key) == ("client-key", "admin-key")
    with pytest.raises(ccproxy.ConfigError, match="CCPROXY_API_KEY: apikey: must not contain"):
        ccproxy.build_config({}, "c.json", {"CCPROXY_API_KEY": "a\x00b"})


# --- 2. management needs more than a client's key; nothing from a client is expanded --------

def decide(raw, peer, method, path, key=None):
    """None when admitted, else the refusal's status (access rules alone)."""
    config = ccproxy.build_config(raw, "c.json", {})
    head = b"%s %s HTTP/1.1\r\n%s\r\n" % (method.encode(), path.encode(),
                                          b"x-api-key: %s\r\n" % key.encode() if key else b"")
    request = ccproxy.parse_request_head(head)
    handler = ccproxy.find_endpoint(request)
    try:
        ccproxy.check_access(config, ccproxy.parse_peer_address((peer, 1)), request,
                             handler in ccproxy.MANAGEMENT_HANDLERS)
    except ccproxy.ProxyError as error:
        return error.status
    return None


def test_a_client_key_does_not_open_management_to_remote_clients():
    raw = {"apikey": "client-key"}
    assert decide(raw, "10.0.0.5", "POST", "/v1/messages", "client-key") is None
    assert decide(raw, "10.0.0.5", "GET", "/providers", "client-key") is None
    for method, path in (("POST", "/providers"), ("PUT", "/providers/x"),
                         ("DELETE", "/providers/x")):
        assert decide(raw, "10.0.0.5", method, path, "client-key") == 403
        assert decide(raw, "127.0.0.1", method, path, "client-key") is None
        assert decide(raw, "127.0.0.1", method, path, "wrong") == 401


def test_with_an_admin_key_management_needs_exactly_it():
    raw = {"apikey": "client-key", "admin_key": "admin-key-0123456789"}
    for peer in ("10.0.0.5", "127.0.0.1"):
        assert decide(raw, peer, "POST", "/providers", "client-key") == 401
        assert decide(raw, peer, "POST", "/providers") == 401
        assert decide(raw, peer, "POST", "/providers", "admin-key-0123456789") is None
    assert decide(raw, "10.0.0.5", "POST", "/v1/messages", "admin-key-0123456789") == 401


ALICE, BOB = "sk-client-alice-0123456789abcdef", "sk-client-bob-0123456789abcdef0"


def test_each_client_key_is_admitted_remote_too_and_named_and_no_other_key_is():
    raw = {"client_keys": {"alice": ALICE, "bob": BOB}}
    config = ccproxy.build_config(raw, "c.json", {})
    head = b"POST /v1/messages HTTP/1.1\r\nAuthorization: Bearer %s\r\n\r\n" % BOB.encode()
    assert ccproxy.check_access(config, ccproxy.parse_peer_address(("10.0.0.5", 1)),
                                ccproxy.parse_request_head(head)) == "bob"
    for key in (ALICE, BOB):
        assert decide(raw, "10.0.0.5", "POST", "/v1/messages", key) is None
    assert decide(raw, "10.0.0.5", "POST", "/v1/messages", "sk-client-alice") == 401
    assert decide(raw, "10.0.0.5", "POST", "/v1/messages") == 401
    assert decide(raw, "10.0.0.5", "GET", "/health") is None
    assert decide(raw, "10.0.0.5", "POST", "/providers", ALICE) == 403    # not management
    with_apikey = dict(raw, apikey="sk-the-shared-apikey-0123")
    assert decide(with_apikey, "10.0.0.5", "POST", "/v1/messages", "sk-the-shared-apikey-0123") \
        is None
    assert config.masker.text("key %s" % ALICE) == "key %s" % ccproxy.mask_secret(ALICE)


def test_a_wrong_or_missing_client_key_is_told_which_keys_are_asked_for(start_proxy, upstream):
    proxy = start_proxy({"client_keys": {"alice": ALICE},
                         "providers": [anthropic_provider(upstream)]})
    for key, problem in (("nope", "invalid API key (this needs a key in client_keys)"),
                         (None, "missing API key (this needs a key in client_keys)")):
        head = b"x-api-key: %s\r\n" % key.encode() if key else b""
        reply = raw_exchange(proxy.port, b"POST /v1/messages HTTP/1.1\r\n%sContent-Length: 2"
                                         b"\r\nConnection: close\r\n\r\n{}" % head)
        assert reply.startswith(b"HTTP/1.1 401 ") and problem.encode() in reply
    message = sdk(proxy, ALICE).messages.create(model="m", max_tokens=5, messages=[
        {"role": "user", "content": "hi"}])
    assert message.type == "message" and len(upstream.requests) == 1
    assert ALICE not in json.dumps(upstream.requests[0]["headers"])   # never sent on


@pytest.mark.parametrize("client_keys, problem", [
    ("alice", "client_keys: must be an object of name: key"),
    ({"bob": BOB, "al ice": ALICE}, "client_keys: entry 2: its name must be letters, digits"),
    ({"alice": ""}, "client_keys: entry 1: its key has 0 characters, fewer than 16"),
    ({ALICE: "alice"}, "entry 1: its key has 5 characters, fewer than 16 (a name and its key "
                       "swapped?"),
    ({"alice": 5}, "client_keys.alice: must be a string"),
    ({"alice": "sk-\nnewline-inside"}, "client_keys.alice: must not contain control characters"),
    ({"alice": ALICE, "bob": ALICE}, "client_keys.bob: is the same key as client_keys.alice"),
    ({"alice": "sk-the-shared-apikey-0123"}, "client_keys.alice: is the same key as apikey"),
    ({"alice": "admin-key-0123456789"}, "client_keys.alice: is the same key as admin_key"),
])
def test_client_keys_mistakes_name_the_key_never_its_value(client_keys, problem):
    with pytest.raises(ccproxy.ConfigError) as caught:
        ccproxy.build_config({"apikey": "sk-the-shared-apikey-0123", "client_keys": client_keys,
                              "admin_key": "admin-key-0123456789"}, "c.json", {})
    assert problem in str(caught.value)
    assert ALICE not in str(caught.value) and "shared-apikey" not in str(caught.value)


def test_client_keys_come_from_the_environment_and_this_machine_presents_the_first():
    raw = ccproxy.expand_env_references({"client_keys": {"bob": "${BOB_KEY}", "alice": ALICE}},
                                        "", "c.json", {"BOB_KEY": BOB})   # as load_config does
    config = ccproxy.build_config(raw, "c.json", {})
    assert config.client_keys == {"bob": BOB, "alice": ALICE}
    assert config.own_client_key() == ALICE                   # the first by name
    variables = ccproxy.claude_variables("http://127.0.0.1:1", config, {})
    assert variables["ANTHROPIC_AUTH_TOKEN"] == ALICE
    assert ccproxy.literal_secret_paths({"client_keys": {"bob": "${BOB_KEY}", "alice": ALICE}}) \
        == ["client_keys.alice"]
    both = ccproxy.build_config({"apikey": "sk-the-shared-apikey-0123",
                                 "client_keys": {"alice": ALICE}}, "c.json", {})
    assert both.own_client_key() == "sk-the-shared-apikey-0123"


@pytest.fixture
def managed(tmp_path, upstream):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"port": 0, "apikey": "client-key", "admin_key": "admin-key-0123",
                                "providers": [anthropic_provider(upstream, type="anthropic", name="main")]}))
    proxy = RunningProxy(ccproxy.load_config(str(path), {"SECRET": "env-secret-0123456789"}))
    yield proxy, path
    proxy.stop()


def manage(proxy, method, path, body=None, key="admin-key-0123"):
    client = sdk(proxy, key)
    try:
        return 200, client.request(object, anthropic._base_client.FinalRequestOptions.construct(
            method=method, url=path, json_data=body))
    except anthropic.APIStatusError as error:
        return error.status_code, error.body


@pytest.mark.parametrize("entry, field", [
    ({"api_key": "${SECRET}"}, "provider.api_key"),
    ({"headers": {"X-Steal": "${SECRET}"}}, "provider.headers.X-Steal"),
    ({"api_base_url": "http://127.0.0.1:9/${SECRET}"}, "provider.api_base_url"),
    ({"models": ["m-${SECRET:-x}"]}, "provider.models[0]"),
])
def test_env_references_from_a_client_are_refused_never_expanded(managed, second_upstream, entry,
                                                                 field):
    proxy, path = managed
    before = path.read_text()
    body = dict({"name": "thief", "type": "anthropic", "api_base_url": second_upstream.url,
                 "api_key": "k"}, **entry)
    status, error = manage(proxy, "post", "/providers", body)
    assert status == 400 and error["error"]["message"].startswith(field + ": ${…} references")
    assert path.read_text() == before and second_upstream.requests == []
    assert "env-secret" not in json.dumps(get(proxy, "/status", "client-key"))


@pytest.mark.parametrize("url, problem", [
    ("http://127.0.0.1:9/x?to=elsewhere", "must not have a query string"),
    ("http://127.0.0.1:9/x#frag", "must not have a query string or fragment"),
    ("http://user:pw@127.0.0.1:9", "must not hold a user name or password"),
    ("http://127.0.0.1:99999", "has an invalid port"),
    ("http://127.0.0.1:9/a b", "must not contain spaces"),
    ("http://127.0.0.1:9/v1\u00e9", "must be ASCII in its path"),
])
def test_base_urls_are_plain_origins_with_a_path(managed, url, problem):
    proxy, _ = managed
    status, error = manage(proxy, "post", "/providers", {"name": "x", "type": "anthropic",
                                                         "api_base_url": url})
    assert status == 400 and "provider.api_base_url: " + problem in error["error"]["message"]
    with pytest.raises(ccproxy.ConfigError, match="providers\\[0\\].api_base_url: " + problem):
        ccproxy.build_config({"providers": [{"name": "x", "type": "anthropic",
                                             "api_base_url": url}]}, "c.json", {})


def test_a_client_key_cannot_repoint_a_provider(managed, second_upstream):
    proxy, path = managed
    change = {"name": "main", "type": "anthropic", "api_base_url": second_upstream.url}
    assert manage(proxy, "put", "/providers/main", change, key="client-key")[0] == 401
    assert manage(proxy, "put", "/providers/main", change)[0] == 200
    assert json.loads(path.read_text())["providers"][0]["api_base_url"] == second_upstream.url


# --- 3, 4. header values: non-Latin-1, CR/LF; an answer that cannot be written -------------

def post_raw(port, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return raw_exchange(port, b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              b"Connection: close\r\n"
                              b"Content-Length: %d\r\n\r\n%s" % (len(data), data))


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
def test_a_model_name_in_another_script_answers_and_leaks_nothing(start_proxy, upstream, kind):
    if kind == "openai":
        upstream.script = lambda r: json_reply({"choices": [{"message": {"content": "ok"},
                                                             "finish_reason": "stop"}]})
        provider = openai_provider(upstream, name="fant")
    else:
        provider = anthropic_provider(upstream, type="anthropic", name="fant")
    proxy = start_proxy({"providers": [provider]})
    for _ in range(3):
        response = post_raw(proxy.port, {"model": "fant,a模", "max_tokens": 5,
                                         "messages": [{"role": "user", "content": "hi"}]})
        assert response.startswith(b"HTTP/1.1 200 ")
        assert b"x-ccproxy-model: a%E6%A8%A1" in head_of(response)
    assert wait_until(lambda: get(proxy, "/status")["upstream"]["calls_open"] == 0)
    assert len(proxy.server.app.upstream.calls) == 0


def test_cr_lf_in_a_model_name_injects_no_header(start_proxy, upstream):
    proxy = start_proxy({"providers": [anthropic_provider(upstream, type="anthropic", name="foai")]})
    response = post_raw(proxy.port, {"model": "foai,m\r\nX-Injected: yes\r\nSet-Cookie: a=b\r\n\r\n<",
                                     "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    lines = head_of(response)
    assert not any(line.lower().startswith((b"x-injected", b"set-cookie")) for line in lines)
    assert b"x-ccproxy-model: m%0D%0AX-Injected: yes%0D%0ASet-Cookie: a=b%0D%0A%0D%0A<" in lines
    assert json.loads(response.split(b"\r\n\r\n", 1)[1])["type"] == "message"


def test_route_names_and_models_with_control_characters_are_refused():
    providers = [{"name": "p", "type": "anthropic", "api_base_url": "http://127.0.0.1:9"}]
    for routes, key in (({"x\ny": {"provider": "p", "model": "m"}}, "routes: "),
                        ({"default": {"provider": "p", "model": "m\r\n"}}, "routes.default.model: ")):
        with pytest.raises(ccproxy.ConfigError, match=key + "must not contain control"):
            ccproxy.build_config({"providers": providers, "routes": routes}, "c.json", {})


def test_an_answer_that_cannot_be_written_is_a_500_and_releases_its_stream(start_proxy, upstream,
                                                                          monkeypatch):
    upstream.script = lambda r: stream_reply(pause_before=2)
    proxy = start_proxy({"providers": [anthropic_provider(upstream)]})
    real = ccproxy.build_response_head

    def broken(status, headers):
        if status == 200:
            raise UnicodeEncodeError("latin-1", "模", 0, 1, "simulated")
        return real(status, headers)
    monkeypatch.setattr(ccproxy, "build_response_head", broken)
    with pytest.raises(anthropic.InternalServerError) as caught:
        with sdk(proxy).messages.stream(model="m", max_tokens=5,
                                        messages=[{"role": "user", "content": "hi"}]) as stream:
            stream.get_final_message()
    assert caught.value.body["error"]["message"] == "internal error in ccproxy; see its log"
    assert wait_until(lambda: len(proxy.server.app.upstream.calls) == 0)
    assert upstream.peer_closed.wait(5)
    monkeypatch.setattr(ccproxy, "build_response_head", real)
    upstream.script = lambda r: json_reply(anthropic_message())
    assert ask(proxy).content[0].text == "Hello from upstream"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["x-ccproxy-model", "x-ccproxy-provider", "request-id"]),
                          st.text()), max_size=5))
def test_any_header_value_makes_a_well_formed_head(headers):
    head = ccproxy.build_response_head(200, headers)
    assert head.endswith(b"\r\n\r\n") and head.count(b"\r\n\r\n") == 1
    lines = head[:-4].split(b"\r\n")
    assert len(lines) == len(headers) + 1
    for (name, value), line in zip(headers, lines[1:]):
        shown = line.decode("ascii").split(": ", 1)[1]
        assert line.startswith(name.encode() + b": ")
        assert all(" " <= char <= "~" for char in shown)
        assert "%" in value or urllib.parse.unquote(shown, errors="surrogatepass") == value


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=12), st.lists(st.text(max_size=12), max_size=3))
def test_any_provider_or_model_name_is_refused_or_safe(name, models):
    try:
        config = ccproxy.build_config({"providers": [{"name": name, "type": "openai",
                                                      "api_base_url": "http://h/v1",
                                                      "models": models}]}, "c.json", {})
    except ccproxy.ConfigError as error:
        assert "providers[0]" in str(error)
        return
    provider = config.providers[0]
    assert "," not in provider.name
    for text in (provider.name,) + provider.models:
        assert ccproxy.control_character_problem(text) is None


MODEL_NAMES = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)


@pytest.fixture(scope="module")
def fuzz_proxy():
    config = ccproxy.build_config({"port": 0, "providers": [
        {"name": "p", "type": "anthropic", "api_base_url": "http://127.0.0.1:9"}],
        "failover": False}, "c.json", {})
    proxy = RunningProxy(config)
    yield proxy
    proxy.stop()


@settings(max_examples=60, deadline=None)
@given(MODEL_NAMES)
def test_any_model_name_over_the_wire_gets_a_well_formed_answer(fuzz_proxy, model):
    response = post_raw(fuzz_proxy.port, {"model": "p," + model, "max_tokens": 5,
                                          "messages": [{"role": "user", "content": "hi"}]})
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 ")
    assert all(line.count(b": ") >= 1 and b"\n" not in line for line in head_of(response))
    assert json.loads(body)["type"] == "error"


# --- 5. a half-open probe whose client left -----------------------------------------------

def test_a_probe_whose_client_disconnects_does_not_leave_the_circuit_half_open(start_proxy,
                                                                              upstream):
    proxy = start_proxy({"providers": [anthropic_provider(upstream)], "failover": False,
                         "performance": {"circuit_breaker_enabled": True,
                                         "circuit_breaker_threshold": 1,
                                         "circuit_breaker_cooldown": 0.2}})
    upstream.script = lambda r: json_reply({"type": "error", "error": {
        "type": "api_error", "message": "down"}}, 500)
    with pytest.raises(anthropic.InternalServerError):
        ask(proxy)
    breaker = proxy.server.app.failover.breakers["anthropic"]
    assert breaker.state == "open"
    time.sleep(0.3)                                      # the cooldown passes
    upstream.script = lambda r: Reply(200, anthropic_message(), delay=10)
    body = json.dumps({"model": "m", "max_tokens": 5,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        assert wait_until(lambda: breaker.state == "half_open")
    assert wait_until(lambda: breaker.state == "open", 5)
    upstream.script = lambda r: json_reply(anthropic_message())
    assert ask(proxy).content[0].text == "Hello from upstream"       # the next one probes
    assert breaker.state == "closed"


# --- 6. a connection limit; the backlog -------------------------------------------------------

def test_at_the_connection_limit_new_clients_wait_and_are_served_later(start_proxy, upstream,
                                                                      caplog):
    proxy = start_proxy({"providers": [anthropic_provider(upstream)],
                         "performance": {"max_connections": 3}})
    idle = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(3)]
    waiting = [socket.create_connection(("127.0.0.1", proxy.port), timeout=3)
               for _ in range(300)]                    # held in the listen backlog (1024)
    waiting[0].sendall(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
    waiting[0].settimeout(0.5)
    with pytest.raises(socket.timeout):
        waiting[0].recv(100)                             # not accepted while the house is full
    idle.pop().close()
    waiting[0].settimeout(5)
    assert read_to_end(waiting[0]).startswith(b"HTTP/1.1 200 ")
    pauses = [r for r in caplog.records if "not accepting new connections" in r.getMessage()]
    assert len(pauses) == 1 and "performance.max_connections" in pauses[0].getMessage()
    for sock in idle + waiting:
        sock.close()


def test_out_of_file_descriptors_pauses_quietly_and_recovers(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"port": 0}))
    env = dict(os.environ, HOME=str(tmp_path))

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    process = subprocess.Popen([sys.executable, str(REPO / "ccproxy.py"), "start", "--foreground",
                                "--config", str(config)], stderr=subprocess.PIPE,
                               preexec_fn=limit, env=env)
    try:
        line = process.stderr.readline().decode()
        while "listening on" not in line:
            line = process.stderr.readline().decode()
        port = int(re.search(r"listening on http://127.0.0.1:(\d+)", line).group(1))
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(300)]
        late = socket.create_connection(("127.0.0.1", port), timeout=5)
        late.sendall(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
        time.sleep(1.0)                                  # let a flood of log lines happen, if any
        for sock in idle:
            sock.close()
        assert read_to_end(late).startswith(b"HTTP/1.1 200 ")
    finally:
        process.terminate()
        errors = process.communicate(timeout=30)[1].decode()
    assert len(errors) < 4000, errors[-2000:]
    assert errors.count("not accepting new connections") == 1


# --- 7. a bare config filename -------------------------------------------------------------

def test_management_works_with_a_bare_config_filename(tmp_path, upstream, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"port": 0, "providers": [
        anthropic_provider(upstream, type="anthropic", name="main")]}))
    for config in (ccproxy.load_config("cfg.json", {}),
                   ccproxy.load_config(None, {"CCPROXY_CONFIG": "cfg.json"})):
        assert config.source == str(tmp_path / "cfg.json")
    proxy = RunningProxy(ccproxy.load_config("cfg.json", {}))
    try:
        monkeypatch.chdir("/")
        status, _ = manage(proxy, "post", "/providers", {"name": "x", "type": "anthropic",
                                                         "api_base_url": upstream.url})
        assert status == 200
        assert [p["name"] for p in json.loads((tmp_path / "cfg.json").read_text())["providers"]] \
            == ["main", "x"]
    finally:
        proxy.stop()


# --- 8. corrupt upstream streams never end as complete --------------------------------------

@pytest.mark.parametrize("kind", ["openai", "gemini"])
def test_a_stream_line_that_is_not_json_ends_with_an_error_event(start_proxy, upstream, kind):
    if kind == "openai":
        pieces = openai_sse("AAA")[:1] + [b"data: {not json\n\n"] + openai_sse("CCC")
        provider = openai_provider(upstream, name="p")
    else:
        part = lambda text: b'data: {"candidates":[{"content":{"parts":[{"text":"%s"}]}}]}\n\n' \
            % text.encode()
        pieces = [part("AAA"), b"data: {not json\n\n", part("CCC"),
                  b'data: {"candidates":[{"finishReason":"STOP"}]}\n\n']
        provider = {"name": "p", "type": "gemini", "api_base_url": upstream.url, "api_key": "k"}
    reply = Reply(200, pieces=pieces, content_type="text/event-stream", pause_before=1)
    upstream.script = lambda r: reply
    proxy = start_proxy({"providers": [provider]})
    sock, received = open_stream(proxy.port, until=b"AAA")
    reply.release.set()                 # the bad line comes once the stream has begun
    received = read_to_end(sock, received)
    sock.close()
    assert b"event: error" in received and b"message_stop" not in received
    assert b"not a JSON object" in received and b"CCC" not in received


def test_a_stream_that_breaks_before_anything_was_sent_is_an_http_error(start_proxy, upstream):
    """Text and a line that is not JSON in the provider's first receive: nothing has gone to
    the client yet, so it gets a status it can retry (and failover its chance), not half an
    answer."""
    pieces = [b"".join(openai_sse("AAA")[:1] + [b"data: {not json\n\n"])] + openai_sse("CCC")
    upstream.script = lambda r: Reply(200, pieces=pieces, content_type="text/event-stream")
    proxy = start_proxy({"providers": [openai_provider(upstream, name="p")]})
    answer = post_raw(proxy.port, {"model": "m", "max_tokens": 5, "stream": True,
                                   "messages": [{"role": "user", "content": "x"}]})
    assert answer.startswith(b"HTTP/1.1 502 ") and b"not a JSON object" in answer
    assert b"AAA" not in answer


# --- 9. web pages: requests from other origins, DNS rebinding --------------------------------

A_MESSAGE = json.dumps({"model": "m", "max_tokens": 5,
                        "messages": [{"role": "user", "content": "spend"}]}).encode()


def browser_post(port, path="/v1/messages", body=A_MESSAGE, **headers) -> tuple:
    """What a browser sends for a page's plain-text POST, which needs no CORS preflight: the
    status and the error message of the answer."""
    lines = b"".join(b"%s: %s\r\n" % (name.replace("_", "-").encode(), value.encode())
                     for name, value in headers.items())
    reply = raw_exchange(port, b"POST %s HTTP/1.1\r\n%sContent-Type: text/plain;charset=UTF-8"
                               b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                         % (path.encode(), lines, len(body), body))
    head, _, payload = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload).get("error", {}).get("message", "")


@pytest.mark.parametrize("headers", [
    {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
    {"Origin": "https://evil.example"},                       # a browser without Sec-Fetch
    {"Origin": "null"},                                       # a sandboxed frame, a file: page
    {"Origin": "http://localhost:5173", "Sec-Fetch-Site": "same-site"},  # another local app
    {"Sec-Fetch-Site": "cross-site"},
])
def test_a_web_page_of_another_origin_cannot_spend_the_users_credits(start_proxy, upstream,
                                                                      headers):
    proxy = start_proxy({"providers": [anthropic_provider(upstream)]})
    status, message = browser_post(proxy.port, Host="127.0.0.1:%d" % proxy.port, **headers)
    assert status == 403 and "does not answer requests a web page sends from another" in message
    assert upstream.requests == []


def test_its_own_status_page_and_clients_that_are_no_browser_are_served(start_proxy, upstream):
    proxy = start_proxy({"providers": [anthropic_provider(upstream)]})
    here = "127.0.0.1:%d" % proxy.port
    assert browser_post(proxy.port, Host=here, Origin="http://" + here,
                        Sec_Fetch_Site="same-origin")[0] == 200
    assert browser_post(proxy.port, Host=here)[0] == 200
    assert len(upstream.requests) == 2


def test_a_real_browser_on_another_local_page_reaches_no_provider(start_proxy, upstream):
    """Headless Chromium opens a page of another origin on this machine, whose script posts
    a message to ccproxy as plain text (no preflight) and then tells its own server."""
    proxy = start_proxy({"providers": [anthropic_provider(upstream)]})
    page = ("<script>fetch('http://127.0.0.1:%d/v1/messages', {method: 'POST', mode: 'no-cors',"
            " headers: {'content-type': 'text/plain'}, body: '%s'}).finally(() => "
            "fetch('/answered'))</script>" % (proxy.port, A_MESSAGE.decode())).encode()
    visits = []
    with page_server({"/": (page, "text/html")}, visits) as port:
        render("http://localhost:%d/" % port)
        assert wait_until(lambda: "/answered" in visits, 30)
    assert upstream.requests == []
    assert get(proxy, "/status")["requests"]["by_status"] == {"403": 1}


@pytest.mark.parametrize("path, method", [("/providers", "GET"), ("/status", "GET"),
                                          ("/v1/messages", "POST"), ("/providers", "POST")])
def test_a_name_pointed_at_this_machine_by_dns_rebinding_is_refused(request, tmp_path, path,
                                                                    method):
    """The page of a name the attacker re-points at 127.0.0.1 is same-origin to the browser:
    it sends no other Origin, and could read ccproxy's answers and change its providers."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"port": 0, "providers": [
        {"name": "main", "type": "anthropic", "api_base_url": "http://127.0.0.1:9"}]}))
    proxy = RunningProxy(ccproxy.load_config(str(config), {}))
    request.addfinalizer(proxy.stop)
    provider = json.dumps({"name": "theirs", "type": "openai",
                           "api_base_url": "https://collect.evil.example/v1", "api_key": "x"})
    reply = raw_exchange(proxy.port, b"%s %s HTTP/1.1\r\nHost: rebound.evil.example:%d\r\n"
                         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (
                             method.encode(), path.encode(), proxy.port, len(provider),
                             provider.encode()))
    assert reply.startswith(b"HTTP/1.1 403 ")
    assert b"addressed to rebound.evil.example" in reply and b"DNS rebinding" in reply
    assert [p["name"] for p in get(proxy, "/providers")["providers"]] == ["main"]


HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=40)


@settings(max_examples=400, deadline=None)
@given(host=st.one_of(st.none(), HEADER_TEXT, st.sampled_from(
           ["127.0.0.1:1", "[::1]:2", "localhost", "evil@127.0.0.1", "[::1", "127.0.0.1/x"])),
       origin=st.one_of(st.none(), HEADER_TEXT, st.sampled_from(
           ["http://127.0.0.1:1", "http://[", "https://[::1]:2", "null", ""])),
       site=st.one_of(st.none(), st.sampled_from(["same-origin", "none", "cross-site"])),
       keys=st.booleans())
def test_any_host_origin_or_fetch_site_is_admitted_or_a_403_never_a_crash(host, origin, site,
                                                                           keys):
    config = ccproxy.build_config({"apikey": "sk-proxy-key-0123456789"} if keys else {}, "c", {})
    sent = {"host": host, "origin": origin, "sec-fetch-site": site,
            "x-api-key": "sk-proxy-key-0123456789"}
    request = ccproxy.Request("POST", "/v1/messages", "HTTP/1.1", ccproxy.Headers(
        [(name, value) for name, value in sent.items() if value is not None]))
    try:
        ccproxy.check_access(config, ccproxy.parse_peer_address(("127.0.0.1", 1)), request)
    except ccproxy.PermissionDeniedError:
        return
    assert site != "cross-site"
    assert origin is None or host and origin.lower() in ("http://" + host.lower(),
                                                         "https://" + host.lower())
    assert keys or host is None or ccproxy.names_loopback(ccproxy.host_name(host))
    assert keys or host is None or "@" not in host and "/" not in host


@pytest.mark.parametrize("host", ["127.0.0.1:%d", "localhost:%d", "LocalHost", "[::1]:%d",
                                  "127.0.0.2:%d", "ccproxy.localhost"])
def test_names_of_this_machine_are_served_without_a_key(start_proxy, upstream, host):
    proxy = start_proxy({"providers": [anthropic_provider(upstream)]})
    host = host % proxy.port if "%d" in host else host
    assert browser_post(proxy.port, Host=host)[0] == 200


def test_with_a_key_any_name_is_served_as_behind_a_reverse_proxy(start_proxy, upstream):
    proxy = start_proxy({"apikey": "sk-proxy-key-0123456789",
                         "providers": [anthropic_provider(upstream)]})
    status, message = browser_post(proxy.port, Host="ccproxy.team.example")
    assert status == 401
    assert browser_post(proxy.port, Host="ccproxy.team.example",
                        x_api_key="sk-proxy-key-0123456789")[0] == 200


# --- 10. the other users of a shared machine -----------------------------------------------

LINUX_ROOT = sys.platform.startswith("linux") and hasattr(os, "fork") and os.geteuid() == 0


def exchange_as(user: int, port: int, request: bytes) -> bytes:
    """What ccproxy answers a request a program of another user of this machine sends (a child
    process that becomes that user: the interpreter's own folder may be closed to it)."""
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:                                   # only system calls until _exit
        try:
            os.setgid(user)
            os.setuid(user)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(request)
                while True:
                    piece = sock.recv(65536)
                    if not piece:
                        break
                    os.write(writing, piece)
        finally:
            os._exit(0)
    os.close(writing)
    answer = b""
    while True:
        piece = os.read(reading, 65536)
        if not piece:
            break
        answer += piece
    os.close(reading)
    os.waitpid(child, 0)
    return answer


def message_request(path=b"/v1/messages", body=A_MESSAGE, key=b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n%sContent-Type: "
            b"application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (path, b"x-api-key: %s\r\n" % key if key else b"", len(body), body))


@pytest.mark.skipif(not LINUX_ROOT, reason="needs Linux, and root to act as another user")
@pytest.mark.parametrize("path, body", [
    pytest.param(b"/v1/messages", A_MESSAGE, id="a message"),
    pytest.param(b"/providers", json.dumps({"name": "theirs", "type": "openai", "api_key": "x",
                                            "api_base_url": "https://collect.evil.example/v1"}
                                           ).encode(), id="a provider of theirs")])
def test_another_user_of_the_machine_is_refused_without_a_key(tmp_path, upstream, path, body):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"port": 0, "providers": [anthropic_provider(upstream)]}))
    proxy = RunningProxy(ccproxy.load_config(str(config), {}))
    try:
        answer = exchange_as(65534, proxy.port, message_request(path, body))
        assert answer.startswith(b"HTTP/1.1 403 ")
        assert b"this client runs as user 65534: set apikey" in answer
        assert upstream.requests == [] and "theirs" not in config.read_text()
        assert exchange_as(0, proxy.port, message_request()).startswith(b"HTTP/1.1 200 ")
    finally:
        proxy.stop()


@pytest.mark.skipif(not LINUX_ROOT, reason="needs Linux, and root to act as another user")
def test_with_a_key_another_user_of_the_machine_is_served(start_proxy, upstream):
    proxy = start_proxy({"apikey": "sk-proxy-key-0123456789",
                         "providers": [anthropic_provider(upstream)]})
    answer = exchange_as(65534, proxy.port, message_request(key=b"sk-proxy-key-0123456789"))
    assert answer.startswith(b"HTTP/1.1 200 ") and len(upstream.requests) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's socket table")
@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"),
                                          (socket.AF_INET6, "::")])
def test_the_user_at_the_other_end_of_a_loopback_connection(family, host):
    try:
        server = socket.socket(family)
        server.bind((host, 0))
    except OSError:
        pytest.skip("no %s here" % host)
    with server:
        server.listen()
        client_host = "127.0.0.1" if host == "::" else host          # an IPv4-mapped peer
        with socket.create_connection((client_host, server.getsockname()[1])) as client:
            accepted, _ = server.accept()
            with accepted:
                assert ccproxy.loopback_peer_user(accepted.getsockname(),
                                                  accepted.getpeername()) == os.geteuid()
                assert ccproxy.loopback_peer_user(accepted.getsockname(),
                                                  client.getsockname()[:1] + (1,)) is None


# --- low ------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, problem", [
    (b'{"model":"m","max_tokens":5,"temperature":NaN,"messages":[{"role":"user","content":"x"}]}',
     "NaN is not a JSON value"),
    (b'{"model":"m","max_tokens":5,"top_p":1e999,"messages":[{"role":"user","content":"x"}]}',
     "out of range"),
    (b'{"model":"m","max_tokens":5,"temperature":5,"messages":[{"role":"user","content":"x"}]}',
     "temperature: must be a number from 0 to 1"),
    (b'{"model":"m","max_tokens":1' + b"0" * 4300 + b',"messages":[{"role":"user","content":"x"}]}',
     "a number has 4301 digits, more than the 4300 taken"),
    (b'\xef\xbb\xbf{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"}]}',
     "begins with a byte order mark (U+FEFF)"),
    (b'{"model":"m","max_tokens":5,"top_k":"3","messages":[{"role":"user","content":"x"}]}',
     "top_k: must be an integer"),
    (b'{"model":"m","max_tokens":5,"stop_sequences":[1],"messages":[{"role":"user","content":"x"}]}',
     "stop_sequences: must be a list of strings"),
    (b'{"model":"m","max_tokens":5,"tool_choice":{"type":"sometimes"},'
     b'"messages":[{"role":"user","content":"x"}]}', "tool_choice: must be an object whose type"),
    (b'{"model":"m","max_tokens":5,"thinking":{"type":"enabled","budget_tokens":-1},'
     b'"messages":[{"role":"user","content":"x"}]}', "thinking: budget_tokens must be"),
    (b'{"model":"m","max_tokens":5,"metadata":"me","messages":[{"role":"user","content":"x"}]}',
     "metadata: must be an object"),
    (b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[{"type":"text",'
     b'"text":["x"]}]}]}', "messages[0].content[0].text: must be a string"),
])
def test_bad_field_values_are_a_400_naming_them_before_any_provider(start_proxy, upstream, body,
                                                                    problem):
    proxy = start_proxy({"providers": [openai_provider(upstream)]})
    response = raw_exchange(proxy.port, b"POST /v1/messages HTTP/1.1\r\nConnection: close\r\n"
                                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert response.startswith(b"HTTP/1.1 400 ")
    error = json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["type"] == "invalid_request_error" and problem in error["message"]
    assert upstream.requests == []


def test_a_lone_surrogate_reaches_a_translating_provider_as_a_replacement_character(
        start_proxy, upstream, ccproxy_log):
    """Claude Code cuts a long tool output by UTF-16 units, at times through an emoji, and
    sends the half; the session's every turn after holds it. It goes on as U+FFFD; a whole
    pair and an escaped backslash before "ud800" are left as they are."""
    proxy = start_proxy({"providers": [openai_provider(upstream)]})
    upstream.script = lambda r: json_reply({"choices": [{"message": {"content": "ok"},
                                                         "finish_reason": "stop"}]})
    body = (b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":'
            b'"cut \\ud83d|\\udE00 \\ud83d\\ude00 \\\\ud800 \\ud800\\ud800"}]}')
    response = raw_exchange(proxy.port, b"POST /v1/messages HTTP/1.1\r\nConnection: close\r\n"
                                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert response.startswith(b"HTTP/1.1 200 ")
    sent = upstream.requests[0]["json"]["messages"][-1]["content"]
    assert sent == "cut \ufffd|\ufffd \U0001f600 \\ud800 \ufffd\ufffd"
    assert any("4 lone UTF-16 surrogate escapes (half a character, \\ud83d): sent as U+FFFD"
               in message for message in ccproxy_log)


def test_a_lone_surrogate_in_a_provider_sent_to_manage_is_still_a_400(start_proxy, upstream):
    proxy = start_proxy({"providers": [openai_provider(upstream)], "apikey": "client-key",
                         "admin_key": "admin-key-0123456789"})
    body = b'{"name":"x\\ud800","type":"openai","api_key":"sk-x-0123456789"}'
    response = raw_exchange(proxy.port, b"POST /providers HTTP/1.1\r\nConnection: close\r\n"
                                        b"x-api-key: admin-key-0123456789\r\n"
                                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert response.startswith(b"HTTP/1.1 400 ")
    assert b"lone UTF-16 surrogate escape (\\\\ud800)" in response


@pytest.mark.parametrize("reply", [
    Reply(200, b"<html>Sign in to the proxy</html>", content_type="text/html"),
    Reply(200, b""),
    Reply(302, b"", headers={"location": "http://127.0.0.1:9/login"}),
    Reply(200, {"unexpected": "shape"}),
])
def test_a_200_that_is_not_an_anthropic_answer_fails_over(start_proxy, upstream, second_upstream,
                                                          reply):
    upstream.script = lambda r: reply
    proxy = start_proxy({"providers": [anthropic_provider(upstream, type="anthropic", name="first"),
                                       anthropic_provider(second_upstream, type="anthropic", name="second")]})
    raw = sdk(proxy).messages.with_raw_response.create(
        model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-ccproxy-provider"] == "second"
    assert raw.parse().content[0].text == "Hello from upstream"


@pytest.mark.parametrize("status", [201, 203])
def test_a_message_under_another_success_status_reaches_the_client_as_a_200(proxy, upstream,
                                                                             status):
    """The Messages API succeeds with 200 only: a provider's 201 or 203 with a message is
    answered as one (a 204 passed on with its body would have reached no client)."""
    upstream.script = lambda r: json_reply(anthropic_message(), status=status)
    raw = sdk(proxy).messages.with_raw_response.create(
        model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert raw.status_code == 200 and raw.parse().content[0].text == "Hello from upstream"


def test_a_204_is_no_answer(proxy, upstream):
    upstream.script = lambda r: Reply(204, b"")
    with pytest.raises(anthropic.APIStatusError) as caught:
        ask(proxy)
    assert caught.value.status_code == 502
    assert "answered HTTP 204 with something that is not an Anthropic message" in \
        caught.value.body["error"]["message"]


def test_a_cut_close_delimited_answer_is_a_502_not_a_200(start_proxy):
    cut = RawProvider(lambda connection, request: connection.sendall(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n"
        + json.dumps(anthropic_message()).encode()[:40]))
    proxy = start_proxy({"providers": [{"name": "a", "type": "anthropic",
                                        "api_base_url": cut.url}]})
    with pytest.raises(anthropic.APIStatusError) as caught:
        ask(proxy)
    cut.close()
    assert caught.value.status_code == 502
    assert "not an Anthropic message" in caught.value.body["error"]["message"]


@pytest.mark.parametrize("after_first_event", [True, False])
def test_an_endless_event_is_cut_at_the_limit(start_proxy, upstream, after_first_event):
    endless = [b"event: content_block_delta\ndata: "] + [b"x" * (1024 * 1024)] * 20
    first = anthropic_stream_events()[:1] if after_first_event else []
    upstream.script = lambda r: Reply(200, pieces=first + endless, content_type="text/event-stream")
    proxy = start_proxy({"providers": [anthropic_provider(upstream)]})
    sock, received = open_stream(proxy.port, until=b"\r\n\r\n")
    received = read_to_end(sock, received)
    sock.close()
    assert b"longer than 16777216 bytes" in received
    if after_first_event:          # the stream had begun: it ends with an error event
        assert received.startswith(b"HTTP/1.1 200 ") and b"event: error" in received
    else:                          # nothing was sent yet: an HTTP error, so failover could act
        assert received.startswith(b"HTTP/1.1 502 ")
    upstream.script = lambda r: json_reply(anthropic_message())
    assert ask(proxy).content[0].text == "Hello from upstream"


def test_held_bytes_join_once_however_many_pieces():
    config = ccproxy.build_config({"providers": [{"name": "p", "type": "anthropic",
                                                  "api_base_url": "http://127.0.0.1:9"}]}, "c", {})
    relay = ccproxy.AnthropicStreamRelay(config.providers[0])
    for _ in range(1000):
        assert relay.feed(b"y" * 100) == b""
    out = relay.feed(b"\n\nevent: message_stop\ndata: {}\n\n")
    assert out.startswith(b"y" * 100000 + b"\n\n") and out.endswith(b"message_stop\ndata: {}\n\n")
    assert relay.finish() == b""


def test_log_files_and_the_home_directory_are_private(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    home = tmp_path / ".ccproxy"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)                                # as an older version left it
    config = ccproxy.build_config({"log_file": str(home / "ccproxy.log")}, None, {})
    previous = list(ccproxy.log.handlers)
    try:
        ccproxy.configure_logging(config, True, lambda: config.masker)
        ccproxy.log.warning("hello")
    finally:
        for handler in ccproxy.log.handlers:
            handler.close()
        ccproxy.log.handlers[:] = previous
    assert stat.S_IMODE((home / "ccproxy.log").stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_a_world_readable_config_with_literal_keys_is_warned_about(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"apikey": "${PROXY_KEY}", "providers": [
        {"name": "openai", "api_key": "sk-literal-0123456789"},
        {"name": "groq", "api_key": "${GROQ}", "headers": {"X-Team": "t"}}]}))
    os.chmod(path, 0o644)
    environ = {"PROXY_KEY": "p", "GROQ": "g"}
    warnings = ccproxy.load_config(str(path), environ).warnings
    assert any("readable by other users (mode 0644) and holds a key at providers[0].api_key, "
               "providers[1].headers.X-Team; run chmod 600" in w for w in warnings)
    assert not any("sk-literal" in w for w in warnings)
    os.chmod(path, 0o600)
    assert not any("readable" in w for w in ccproxy.load_config(str(path), environ).warnings)


def test_a_body_that_trickles_in_is_cut_by_the_body_timeout(start_proxy):
    proxy = start_proxy({"performance": {"header_timeout": 1, "body_timeout": 1.5}})
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        started, answer = time.monotonic(), b""
        while not answer and time.monotonic() - started < 8:
            try:
                sock.sendall(b"1\r\nx\r\n")              # one byte every 0.4 s: never a pause > 1 s
            except OSError:
                break
            sock.settimeout(0.4)
            try:
                answer = sock.recv(65536)
            except socket.timeout:
                pass
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"performance.body_timeout" in answer


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_answer_nested_too_deeply_to_read_is_a_502_that_fails_over(
        start_proxy, upstream, second_upstream, kind, stream):
    """A 200 whose JSON (or first event) nests 100,000 deep cannot be read: a 502 before the
    answer begins, so the next provider answers."""
    deep = b"[" * 100000 + b"]" * 100000
    field = b'{"choices": ' if kind == "openai" else b'{"type": "message_start", "message": '
    if stream:
        upstream.script = lambda r: Reply(200, b"data: " + field + deep + b"}\n\n",
                                          content_type="text/event-stream")
    else:
        upstream.script = lambda r: Reply(200, field + deep + b"}")
    proxy = start_proxy({"providers": [
        anthropic_provider(upstream, type=kind, name="first"),
        anthropic_provider(second_upstream, type="anthropic", name="second")]})
    if stream:
        second_upstream.script = lambda r: stream_reply(anthropic_stream_events())
        with sdk(proxy, "client").messages.stream(
                model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}]) as answer:
            assert answer.get_final_text() == "Hello!"
        assert upstream.requests[0]["json"]["stream"] is True
    else:
        assert ask(proxy).content[0].text == "Hello from upstream"
    assert (len(upstream.requests), len(second_upstream.requests)) == (1, 1)


def test_a_deeply_nested_upstream_error_fails_over(start_proxy, upstream, second_upstream):
    upstream.script = lambda r: Reply(500, b"[" * 100000 + b"]" * 100000)
    proxy = start_proxy({"providers": [anthropic_provider(upstream, type="anthropic", name="first"),
                                       anthropic_provider(second_upstream, type="anthropic", name="second")]})
    assert ask(proxy).content[0].text == "Hello from upstream"
    assert len(second_upstream.requests) == 1
