"""Minimal routing: a listed model, routes.default, the first enabled provider."""
from __future__ import annotations

import pytest

import ccproxy


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
    with pytest.raises(ccproxy.InvalidRequestError, match="no enabled provider"):
        ccproxy.route_request(config, {"model": "x"})
    assert ccproxy.route_request(config, {"model": "x"}, required=False) is None
