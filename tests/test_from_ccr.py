"""A path from Claude Code Router: its config files, recognised and converted when read, with a
line for each setting that has no equivalent; `start --check` prints the converted config."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import anthropic
import pytest

import ccproxy
from helpers import REPO, RunningProxy, json_reply, sdk
from test_openai import completion

CCR = REPO / "tests" / "data" / "ccr"
ENV = {"DEEPSEEK_API_KEY": "sk-ds-0123456789", "GEMINI_API_KEY": "g-0123456789",
       "PROXY_SECRET": "proxy-secret-0123"}


def test_every_documented_setting_is_converted_or_named():
    notes = []
    content, converted_from = ccproxy.read_router_config(str(CCR / "full.json"), notes)
    assert converted_from == "Claude Code Router"
    assert content == {
        "apikey": "my-proxy-secret", "host": "127.0.0.1", "port": 3456, "log": True,
        "performance": {"request_timeout": 600.0},
        "providers": [
            {"name": "openrouter", "type": "openai", "api_key": "sk-or-example",
             "api_base_url": "https://openrouter.ai/api/v1/chat/completions",
             "models": ["google/gemini-2.5-pro-preview", "anthropic/claude-sonnet-4"]},
            {"name": "deepseek", "type": "openai", "api_key": "${DEEPSEEK_API_KEY}",
             "api_base_url": "https://api.deepseek.com/chat/completions",
             "models": ["deepseek-chat", "deepseek-reasoner"]},
            {"name": "ollama", "type": "openai", "api_key": "ollama",
             "api_base_url": "http://localhost:11434/v1/chat/completions",
             "models": ["qwen2.5-coder:latest"]},
            {"name": "gemini", "type": "gemini", "api_key": "${GEMINI_API_KEY}",
             "api_base_url": "https://generativelanguage.googleapis.com/v1beta",
             "models": ["gemini-2.5-flash", "gemini-2.5-pro"]},
            {"name": "modelscope", "type": "openai", "api_key": "ms-example",
             "api_base_url": "https://api-inference.modelscope.cn/v1/chat/completions",
             "models": ["Qwen/Qwen3-Coder-480B-A35B-Instruct",
                        "Qwen/Qwen3-235B-A22B-Thinking-2507"], "max_tokens": 65536},
            {"name": "siliconflow", "type": "openai", "api_key": "sf-example",
             "api_base_url": "https://api.siliconflow.cn/v1/chat/completions",
             "models": ["moonshotai/Kimi-K2-Instruct"], "max_tokens": 16384},
            {"name": "vertex", "type": "openai", "api_key": "unused", "enabled": False,
             "api_base_url": "https://us-central1-aiplatform.googleapis.com/v1/projects/p/"
                             "locations/us-central1/publishers/google/models/",
             "models": ["gemini-2.5-pro"]},
            {"name": "claude", "type": "anthropic", "api_key": "sk-ant-example",
             "api_base_url": "https://api.anthropic.com/v1/messages",
             "models": ["claude-sonnet-4-5"]}],
        "routes": {"default": "deepseek,deepseek-chat",
                   "background": "ollama,qwen2.5-coder:latest",
                   "think": "deepseek,deepseek-reasoner",
                   "longContext": "openrouter,google/gemini-2.5-pro-preview",
                   "longContextThreshold": 60000, "webSearch": "gemini,gemini-2.5-flash",
                   "image": "gemini,gemini-2.5-pro"}}
    assert notes[1:] == [
        "PROXY_URL: no equivalent in ccproxy, ignored; set HTTPS_PROXY in ccproxy's environment "
        "instead (provider calls use it)",
        "LOG_LEVEL: no equivalent in ccproxy, ignored; ccproxy logs warnings and, with log, one "
        "line per request",
        "OPENAI_API_KEY: no equivalent in ccproxy, ignored",
        "CUSTOM_ROUTER_PATH: no equivalent in ccproxy, ignored; a JavaScript router cannot run "
        "here; write routes with conditions",
        "transformers: no equivalent in ccproxy, ignored; JavaScript transformer plugins cannot "
        "run here",
        "Providers[0].transformer.anthropic/claude-sonnet-4: 'openrouter' with options has no "
        "equivalent in ccproxy, ignored",
        "Providers[1].transformer.deepseek-chat: 'tooluse' has no equivalent in ccproxy, ignored",
        "Providers[4].transformer.use: 'enhancetool' has no equivalent in ccproxy, ignored",
        "Providers[6].transformer.use: 'vertex-gemini' has no equivalent in ccproxy; the "
        "provider is disabled"]
    assert notes[0].startswith("%s is a Claude Code Router config, converted" % (CCR / "full.json"))


def test_the_converted_config_loads_and_routes_like_the_original():
    config = ccproxy.load_config(str(CCR / "full.json"), ENV)
    assert config.converted_from == "Claude Code Router" and len(config.notes) == 10
    assert config.apikey == "my-proxy-secret" and config.request_timeout == 600
    deepseek = config.provider_named("deepseek")
    assert (deepseek.protocol, deepseek.api_key) == ("openai", "sk-ds-0123456789")
    assert ccproxy.openai_endpoint_url(deepseek.base_url) == \
        "https://api.deepseek.com/chat/completions"
    assert config.provider_named("modelscope").output_cap("anything") == 65536
    assert not config.provider_named("vertex").enabled
    for model, expected in [("claude-opus-4-5", ("deepseek", "deepseek-chat")),
                            ("claude-haiku-4-5", ("ollama", "qwen2.5-coder:latest"))]:
        routing = ccproxy.route_request(config, {"model": model, "messages": []})
        assert (routing.provider.name, routing.model) == expected


def test_a_json5_config_with_bare_keys_and_dollar_variables_is_read():
    config = ccproxy.load_config(str(CCR / "json5.json"), ENV)
    assert config.apikey == "proxy-secret-0123" and config.port == 3457
    assert config.routes["default"].provider == "local"


def test_a_ccr_config_serves_requests_through_its_providers(tmp_path, upstream):
    upstream.script = lambda r: json_reply(completion({"role": "assistant", "content":
                                                      "hello from the router's provider"}))
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "Providers": [{"name": "mine", "api_base_url": upstream.url + "/v1/chat/completions",
                       "api_key": "sk-mine-0123456789", "models": ["m1"]}],
        "Router": {"default": "mine,m1"}}))
    proxy = RunningProxy(ccproxy.load_config(str(path), {}, {"port": 0}))   # not 3456: in use
    try:
        message = sdk(proxy).messages.create(model="claude-sonnet-4-5", max_tokens=10,
                                             messages=[{"role": "user", "content": "hi"}])
        assert message.content[0].text == "hello from the router's provider"
        assert upstream.requests[0]["path"] == "/v1/chat/completions"
        assert upstream.requests[0]["json"]["model"] == "m1"
        with pytest.raises(anthropic.APIStatusError) as caught:   # management does not rewrite it
            sdk(proxy).post("/providers", cast_to=object, body={
                "name": "x", "type": "openai", "api_base_url": "http://127.0.0.1:9/v1"})
        assert caught.value.status_code == 409
        assert "is a Claude Code Router config, converted when read" in str(caught.value)
    finally:
        proxy.stop()


def test_check_prints_the_converted_config_ready_to_save(tmp_path):
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_")}, **ENV)
    result = subprocess.run([sys.executable, str(REPO / "ccproxy.py"), "start", "--check",
                             "--config", str(CCR / "full.json")], capture_output=True,
                            text=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    saved = tmp_path / "config.json"
    saved.write_text(result.stdout)                    # stdout is the converted config alone
    assert "ccproxy: Providers[1].transformer.deepseek-chat: 'tooluse' has no equivalent in " \
           "ccproxy, ignored" in result.stderr.splitlines()
    assert "configuration OK: %s (8 providers)" % (CCR / "full.json") in result.stderr
    again = ccproxy.load_config(str(saved), ENV)
    assert again.converted_from is None and again.notes == []
    original = ccproxy.load_config(str(CCR / "full.json"), ENV)
    assert [p.public_view() for p in again.providers] == \
        [p.public_view() for p in original.providers]


def test_the_ccr_config_in_its_own_home_is_found_when_ccproxy_has_none(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".claude-code-router").mkdir(parents=True)
    shutil.copy(CCR / "json5.json", home / ".claude-code-router" / "config.json")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    config = ccproxy.load_config(environ=ENV)
    assert config.source == str(home / ".claude-code-router" / "config.json")
    assert config.converted_from == "Claude Code Router"
