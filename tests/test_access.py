"""Access: the loopback rule, the proxy key, the allow-list; peers of every address family."""
from __future__ import annotations


import anthropic
import pytest

import ccproxy
from helpers import anthropic_provider, ipv6_loopback_available, raw_exchange


def decide(peername, raw=None, headers=(), path="/v1/messages"):
    """None when admitted, else the status of the refusal."""
    config = ccproxy.build_config(raw or {}, "config.json", {})
    request = ccproxy.parse_request_head(b"POST %s HTTP/1.1\r\n%s\r\n" % (
        path.encode(), b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers)))
    try:
        ccproxy.check_access(config, ccproxy.parse_peer_address(peername), request)
    except ccproxy.ProxyError as error:
        return error.status
    return None


LOOPBACK_PEERS = [("127.0.0.1", 5000), ("127.8.9.10", 5000), ("::1", 5000, 0, 0),
                  ("::ffff:127.0.0.1", 5000, 0, 0)]
REMOTE_PEERS = [("192.168.1.20", 5000), ("10.0.0.1", 5000), ("2001:db8::1", 5000, 0, 0),
                ("::ffff:10.0.0.1", 5000, 0, 0), ("fe80::1%eth0", 5000, 0, 2)]


@pytest.mark.parametrize("peer", LOOPBACK_PEERS)
def test_loopback_peers_are_served_without_a_key(peer):
    assert decide(peer) is None


@pytest.mark.parametrize("peer", REMOTE_PEERS)
def test_remote_peers_are_refused_without_a_key(peer):
    assert decide(peer) == 403
    assert decide(peer, path="/health") == 403


def test_a_bound_non_loopback_host_does_not_open_the_door():
    assert decide(("192.168.1.20", 1), {"host": "0.0.0.0"}) == 403


@pytest.mark.parametrize("peer", LOOPBACK_PEERS + REMOTE_PEERS)
def test_with_a_key_every_peer_must_present_it(peer):
    raw = {"apikey": "proxy-secret"}
    assert decide(peer, raw) == 401
    assert decide(peer, raw, [("x-api-key", "wrong")]) == 401
    assert decide(peer, raw, [("authorization", "Bearer wrong")]) == 401
    assert decide(peer, raw, [("authorization", "Basic proxy-secret")]) == 401
    assert decide(peer, raw, [("x-api-key", "proxy-secret")]) is None
    assert decide(peer, raw, [("authorization", "Bearer proxy-secret")]) is None
    assert decide(peer, raw, [("authorization", "bearer  proxy-secret")]) is None


def test_a_client_presenting_two_keys_is_admitted_by_either():
    """Claude Code with an apiKeyHelper in its settings sends the helper's key as x-api-key and
    the proxy's as a Bearer token (seen with 2.1.197 and 2.1.332)."""
    raw = {"apikey": "proxy-secret", "client_keys": {"alice": "alice-key-0123456789"}}
    peer = ("10.0.0.1", 1)
    config = ccproxy.build_config(raw, "config.json", {})

    def client(x_api_key, token):
        request = ccproxy.parse_request_head(
            b"POST /v1/messages HTTP/1.1\r\nx-api-key: %s\r\nAuthorization: Bearer %s\r\n\r\n"
            % (x_api_key.encode(), token.encode()))
        return ccproxy.check_access(config, ccproxy.parse_peer_address(peer), request)

    assert client("sk-ant-from-a-helper", "alice-key-0123456789") == "alice"
    assert client("alice-key-0123456789", "wrong") == "alice"
    assert client("sk-ant-from-a-helper", "proxy-secret") is None
    assert client("proxy-secret", "alice-key-0123456789") is None     # the first one counts
    with pytest.raises(ccproxy.AuthenticationError, match="invalid API key"):
        client("sk-ant-from-a-helper", "wrong")


def test_health_and_root_need_no_key():
    raw = {"apikey": "proxy-secret"}
    assert decide(("10.0.0.1", 1), raw, path="/health") is None
    assert decide(("10.0.0.1", 1), raw, path="/") is None
    assert decide(("10.0.0.1", 1), raw, path="/status") == 401


@pytest.mark.parametrize("peer, admitted", [
    (("10.1.2.3", 1), True), (("::ffff:10.1.2.3", 1, 0, 0), True), (("10.2.0.1", 1), False),
    (("2001:db8::5", 1, 0, 0), True), (("2001:db9::5", 1, 0, 0), False),
    (("127.0.0.1", 1), False),
])
def test_allowed_ips_narrow_further(peer, admitted):
    raw = {"apikey": "k", "security": {"allowed_ips": ["10.1.0.0/16", "2001:db8::/32"]}}
    assert decide(peer, raw, [("x-api-key", "k")]) == (None if admitted else 403)


def test_allowed_ips_apply_to_loopback_without_a_key():
    raw = {"security": {"allowed_ips": ["127.0.0.2/32"]}}
    assert decide(("127.0.0.2", 1), raw) is None
    assert decide(("127.0.0.1", 1), raw) == 403


def test_x_forwarded_for_is_not_trusted():
    assert decide(("10.0.0.1", 1), headers=[("x-forwarded-for", "127.0.0.1")]) == 403


def test_unparseable_peer_is_refused():
    assert decide(None) == 403
    assert decide(("not-an-ip", 1)) == 403


def test_key_check_over_the_wire_with_the_sdk(start_proxy, upstream):
    proxy = start_proxy({"apikey": "proxy-secret", "providers": [anthropic_provider(upstream)]})
    request = dict(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic.Anthropic(base_url=proxy.url, api_key="wrong", max_retries=0).messages.create(
            **request)
    assert caught.value.body["error"]["type"] == "authentication_error"
    assert upstream.requests == []
    good = anthropic.Anthropic(base_url=proxy.url, auth_token="proxy-secret", max_retries=0)
    assert good.messages.create(**request).content[0].text == "Hello from upstream"
    assert raw_exchange(proxy.port, b"GET /health HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200")


def test_refused_peer_over_the_wire_gets_403(start_proxy):
    proxy = start_proxy({"security": {"allowed_ips": ["127.0.0.99/32"]}})
    reply = raw_exchange(proxy.port, b"GET /status HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 403") and b'"permission_error"' in reply


@pytest.mark.skipif(not ipv6_loopback_available(), reason="this machine has no IPv6 loopback")
def test_ipv6_loopback_client_is_served(start_proxy):
    proxy = start_proxy({"host": "::1"})
    assert proxy.url.startswith("http://[::1]:")
    reply = raw_exchange(proxy.port, b"GET /status HTTP/1.0\r\n\r\n", host="::1")
    assert reply.startswith(b"HTTP/1.1 200")


def test_startup_warns_about_a_public_bind_without_key():
    notes = ccproxy.serving_warnings(ccproxy.build_config({"host": "0.0.0.0"}, "c", {}))
    assert any("without an apikey" in note for note in notes)
    quiet = ccproxy.serving_warnings(ccproxy.build_config(
        {"providers": [{"name": "anthropic", "api_key": "k"}]}, "c", {}))
    assert quiet == []
