"""Config: JSONC, ${VAR}, durations, layering, file search, validation messages, --check."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings, strategies as st

import ccproxy
from helpers import changed_anywhere, REPO, dead_url, json_reply


def build(raw, environ=None, flags=None):
    return ccproxy.build_config(raw, "config.json", environ or {}, flags)


def test_jsonc_comments_and_trailing_commas_are_accepted():
    text = """{
      // a line comment
      "host": "127.0.0.1",  /* a block
      comment */ "apikey": "a//b/*c*/", "providers": [],
    }"""
    assert ccproxy.parse_jsonc(text, "c.json") == {"host": "127.0.0.1", "apikey": "a//b/*c*/",
                                                   "providers": []}


def test_jsonc_syntax_error_names_file_and_original_line():
    with pytest.raises(ccproxy.ConfigError, match=r"c\.json: not valid JSON: .*line 3"):
        ccproxy.parse_jsonc('{\n /* two\n */ "a": }', "c.json")


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-be"])
def test_a_config_file_saved_as_windows_tools_save_it_is_read(tmp_path, encoding):
    # Notepad writes UTF-8 with a byte order mark; Windows PowerShell 5's `>` writes UTF-16 LE
    path = tmp_path / "config.json"
    text = '{"host": "127.0.0.1", // the café\r\n "providers": []}'
    path.write_bytes((("\ufeff" if encoding == "utf-16-be" else "") + text).encode(encoding))
    assert ccproxy.read_config_file(str(path)) == {"host": "127.0.0.1", "providers": []}


def test_a_config_file_in_another_encoding_says_where_and_what_to_do(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes('{"providers": [], "x": "café"}'.encode("latin-1"))
    with pytest.raises(ccproxy.ConfigError, match=r"config\.json: cannot read: not UTF-8 text "
                       r"\(byte 0xe9 at offset 27\); save it as UTF-8"):
        ccproxy.read_config_file(str(path))


def test_a_config_in_the_originals_documented_shape_parses():
    text = (REPO / "tests" / "data" / "original-shape.jsonc").read_text()
    config = build(ccproxy.parse_jsonc(text, "original.json"))
    assert [p.name for p in config.providers] == ["anthropic", "openai", "gemini"]
    assert config.routes["default"][1:3] == ("anthropic", "claude-mid")
    assert config.routes["longContext"].conditions == [
        {"type": "tokenCount", "operator": ">", "value": 60000}]
    assert config.request_timeout == 30.0 and config.max_body_bytes == 10485760
    assert config.apikey == "team-proxy-key" and config.metrics_enabled
    assert not config.provider_named("gemini").enabled


def test_env_references_are_expanded():
    raw = {"apikey": "${PROXY_KEY}", "log_file": "${LOGDIR:-/var/log}/c.log",
           "providers": [{"name": "openai", "api_key": "pre-${OPENAI_KEY}"}]}
    expanded = ccproxy.expand_env_references(raw, "", "c.json",
                                             {"PROXY_KEY": "k1", "OPENAI_KEY": "k2"})
    assert expanded["apikey"] == "k1"
    assert expanded["log_file"] == "/var/log/c.log"
    assert expanded["providers"][0]["api_key"] == "pre-k2"


def test_missing_env_reference_names_the_key():
    with pytest.raises(ccproxy.ConfigError, match=r"c\.json: providers\[0\]\.api_key: environment "
                                                  r"variable NOPE is not set"):
        ccproxy.expand_env_references({"providers": [{"api_key": "${NOPE}"}]}, "", "c.json", {})


def test_every_missing_env_reference_is_named_at_once():
    raw = {"apikey": "${TEAM}", "providers": [{"api_key": "${A}", "api_base_url": "${U:-}"},
                                               {"api_key": "${B}"}]}
    with pytest.raises(ccproxy.ConfigError) as caught:
        ccproxy.expand_env_references(raw, "", "c.json", {})
    assert str(caught.value).splitlines() == [
        "c.json: apikey: environment variable TEAM is not set",
        "c.json: providers[0].api_key: environment variable A is not set",
        "c.json: providers[1].api_key: environment variable B is not set"]


@pytest.mark.parametrize("value, seconds", [(30, 30.0), (2.5, 2.5), ("30s", 30.0), ("5m", 300.0),
                                            ("1h30m", 5400.0), ("500ms", 0.5), ("45", 45.0)])
def test_durations(value, seconds):
    assert ccproxy.parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "5x", "m5", "-3s", 0, True, "5m garbage", None])
def test_bad_durations(value):
    with pytest.raises(ValueError):
        ccproxy.parse_duration(value)


def test_defaults():
    config = build({})
    assert (config.host, config.port, config.apikey) == ("127.0.0.1", 3456, "")
    assert config.max_body_bytes == 32 * 1024 * 1024
    assert config.request_timeout == 600.0


def test_layering_defaults_file_env_flags():
    raw = {"port": 8080, "host": "127.0.0.2", "apikey": "file-key"}
    assert build(raw).port == 8080
    env = {"CCPROXY_PORT": "9090", "CCPROXY_API_KEY": "env-key"}
    assert build(raw, env).port == 9090
    assert build(raw, env).apikey == "env-key"
    config = build(raw, env, {"port": 7070, "host": None})
    assert (config.port, config.host) == (7070, "127.0.0.2")


def test_every_env_var_of_the_original_table():
    raw = {"providers": [{"name": "openai", "api_key": "a"}, {"name": "deepseek", "api_key": "b"}]}
    env = {"CCPROXY_HOST": "0.0.0.0", "CCPROXY_PORT": "4000", "CCPROXY_API_KEY": "k",
           "CCPROXY_LOG": "true", "CCPROXY_LOG_FILE": "/tmp/x.log",
           "CCPROXY_PROVIDERS_0_API_KEY": "env-a", "CCPROXY_PROVIDERS_1_API_KEY": "env-b"}
    config = build(raw, env)
    assert (config.host, config.port, config.apikey, config.log_requests, config.log_file) == (
        "0.0.0.0", 4000, "k", True, "/tmp/x.log")
    assert [p.api_key for p in config.providers] == ["env-a", "env-b"]
    assert build({}, {"LOG": "1"}).log_requests is True


def test_provider_key_env_for_a_missing_provider_warns():
    config = build({}, {"CCPROXY_PROVIDERS_3_API_KEY": "x"})
    assert "CCPROXY_PROVIDERS_3_API_KEY: there is no providers[3]; ignored" in config.warnings


def test_bad_env_value_names_the_variable():
    for text in ("abc", "-1", "1e3", ""):     # it had said "invalid literal for int() with base 10"
        with pytest.raises(ccproxy.ConfigError) as caught:
            build({}, {"CCPROXY_PORT": text})
        assert str(caught.value) == "CCPROXY_PORT: not a port number: %r" % text
    with pytest.raises(ccproxy.ConfigError, match="CCPROXY_LOG: not a boolean"):
        build({}, {"CCPROXY_LOG": "maybe"})


def test_env_key_fills_a_provider_whose_file_has_none():
    config = build({"providers": [{"name": "openai"}]}, {"CCPROXY_PROVIDERS_0_API_KEY": "sk"})
    assert config.providers[0].api_key == "sk"


def test_presets_fill_base_url_and_protocol():
    config = build({"providers": [{"name": "deepseek", "api_key": "k"},
                                  {"name": "ollama"}, {"name": "anthropic", "api_key": "k"}]})
    deepseek, ollama, anthropic = config.providers
    assert (deepseek.protocol, deepseek.base_url) == ("openai", "https://api.deepseek.com")
    assert ollama.api_key == ""
    assert anthropic.count_tokens is True


@pytest.mark.parametrize("raw, message", [
    ({"providers": [{"name": "a", "type": "openai", "api_base_url": "ftp://x"}]},
     'config.json: providers[0].api_base_url: not an http(s) URL: "ftp://x"'),
    ({"providers": [{"name": "a", "type": "openai", "api_base_url": "http://[::1/v1"}]},
     'config.json: providers[0].api_base_url: not a URL: "http://[::1/v1" (Invalid IPv6 URL)'),
    ({"providers": [{"name": "vllm"}]}, "config.json: providers[0].type: must be one of"),
    ({"providers": [{"name": "openai"}]}, "config.json: providers[0].api_key: required for openai"),
    ({"providers": [{"name": "openai", "api_key": "k", "models": "gpt-4"}]},
     "config.json: providers[0].models: must be a list of model names"),
    ({"providers": [{"name": "openai", "api_key": "k"}, {"name": "openai", "api_key": "k"}]},
     "config.json: providers[1].name: duplicate provider 'openai'"),
    ({"port": 70000}, "config.json: port: must be between 0 and 65535"),
    ({"port": "3456"}, 'config.json: port: must be a port number, not "3456"'),
    ({"log": "yes"}, "config.json: log: must be true or false"),
    ({"performance": {"request_timeout": "soon"}}, "config.json: performance.request_timeout: "),
    ({"performance": {"request_timeout": "nan"}},
     'config.json: performance.request_timeout: not a duration (use seconds or "30s", "5m"): '
     '"nan"'),
    ({"performance": {"request_timeout": "inf"}},
     "config.json: performance.request_timeout: must be 30 days or less"),
    ({"performance": {"keepalive_timeout": 1e12}},
     "config.json: performance.keepalive_timeout: must be 30 days or less"),
    ({"performance": {"request_timeout": 3000000}},       # Claude Code's API_TIMEOUT_MS, copied
     'config.json: performance.request_timeout: must be 30 days or less (use seconds or "30s", '
     '"5m"): 3000000; was it meant in milliseconds?'),
    ({"performance": {"max_request_body_size": 0}},
     "config.json: performance.max_request_body_size: must be a positive integer"),
    ({"security": {"allowed_ips": ["10.0.0.0/33"]}},
     'config.json: security.allowed_ips[0]: not an IP address or CIDR: "10.0.0.0/33"'),
    ({"routes": {"default": {"provider": "nobody", "model": "m"}}},
     "config.json: routes.default.provider: no provider named 'nobody'"),
    ({"providers": [{"name": "openai", "api_key": "$OPENAI_API_KEY"}],   # there, with problems
      "routes": {"default": "openai,gpt-5"}},
     "config.json: routes.default.provider: provider 'openai' has the problems shown for it"),
    ({"providers": {"name": "openai"}}, "config.json: providers: must be a list"),
])
def test_validation_names_file_and_key(raw, message):
    with pytest.raises(ccproxy.ConfigError) as caught:
        build(raw)
    assert message in str(caught.value)


def test_a_duration_that_looks_like_milliseconds_warns():
    config = build({"performance": {"request_timeout": "600000", "shutdown_timeout": 99999}})
    assert config.warnings == [
        'config.json: performance.request_timeout: "600000" is 6.9 days: durations are in seconds '
        '(or "10m", "30s"); was it meant in milliseconds?']
    assert config.request_timeout == 600000


@pytest.mark.parametrize("host, problem", [
    ("http://0.0.0.0", 'must be an address or a host name, not a URL: "0.0.0.0"'),
    ("0.0.0.0:3456", 'must not hold a port (set `port`): "0.0.0.0"'),
    ("[::1]", 'write the address without brackets: "::1"'),
    ("http://[::1", 'must be an address or a host name, not a URL: "http://[::1"'),
    ("my host", 'must be an address (127.0.0.1, ::1, 0.0.0.0) or a host name, not "my host"'),
])
def test_a_host_that_cannot_be_listened_on_is_said_at_check(host, problem):
    """Such a host had passed `start --check`, and `start` failed on it."""
    with pytest.raises(ccproxy.ConfigError) as caught:
        build({"host": host})
    assert str(caught.value) == "config.json: host: " + problem


@pytest.mark.parametrize("host", ["", "0.0.0.0", "::", "::1", "127.0.0.1", "localhost",
                                  "ccproxy.internal", "my_service", "fe80::1%eth0"])
def test_every_host_that_can_be_listened_on_passes(host):
    assert build({"host": host}).host == host


def test_validation_reports_every_problem_at_once():
    with pytest.raises(ccproxy.ConfigError) as caught:
        build({"port": -1, "log": 3})
    assert len(str(caught.value).splitlines()) == 2


def test_flag_problem_names_the_flag():
    with pytest.raises(ccproxy.ConfigError, match="--port: port: must be between"):
        build({}, flags={"port": 99999})


def test_unknown_keys_warn_with_the_near_miss():
    config = build({"hots": "x", "performance": {"request_timeot": 5, "zzz": 1},
                    "providers": [{"name": "local", "type": "openai",
                                   "api_base_url": "http://127.0.0.1:1/v1", "modles": []}]})
    assert "config.json: hots: unknown key (did you mean 'host'?), ignored" in config.warnings
    assert ("config.json: performance.request_timeot: unknown key (did you mean "
            "'request_timeout'?), ignored") in config.warnings
    assert "config.json: performance.zzz: unknown key, ignored" in config.warnings
    assert ("config.json: providers[0].modles: unknown key (did you mean 'models'?), ignored"
            in config.warnings)


def test_an_unknown_key_in_a_preset_provider_is_an_error():
    """A typo in a preset's base URL key would send its traffic, and its key, to the public API."""
    with pytest.raises(ccproxy.ConfigError) as caught:
        build({"providers": [{"name": "openai", "api_key": "sk-x",
                              "api_bse_url": "http://127.0.0.1:9/v1"}]})
    assert ("config.json: providers[0].api_bse_url: unknown key (did you mean 'api_base_url'?)"
            in str(caught.value))


def test_file_search_order(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ccproxy").mkdir(parents=True)
    (home / ".ccproxy" / "config.json").write_text('{"port": 2}')
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert ccproxy.load_config(environ={}).port == 2
    (work / "config.json").write_text('{"port": 1}')
    assert ccproxy.load_config(environ={}).port == 1
    named = tmp_path / "named.json"
    named.write_text('{"port": 3}')
    assert ccproxy.load_config(environ={"CCPROXY_CONFIG": str(named)}).port == 3
    other = tmp_path / "other.json"
    other.write_text('{"port": 4}')
    assert ccproxy.load_config(str(other), environ={"CCPROXY_CONFIG": str(named)}).port == 4


def test_named_config_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(ccproxy.ConfigError, match="missing.json: config file not found"):
        ccproxy.load_config(str(tmp_path / "missing.json"), environ={})
    with pytest.raises(ccproxy.ConfigError, match=": a directory, not a config file"):
        ccproxy.load_config(str(tmp_path), environ={})


def test_a_provider_that_is_no_preset_needs_its_address_and_is_told_so():
    """It had read 'api_base_url: not an http(s) URL: null'."""
    with pytest.raises(ccproxy.ConfigError) as caught:
        ccproxy.build_config({"providers": [{"name": "work", "type": "openai", "api_key": "k"}]},
                             "c.json", {})
    assert "c.json: providers[0].api_base_url: missing: give the provider's API address, or " \
        "name the provider after a preset (anthropic, deepseek," in str(caught.value)
    named = ccproxy.build_config({"providers": [{"name": "openai", "api_key": "k"}]}, "c.json", {})
    assert named.providers[0].base_url == "https://api.openai.com/v1"


def test_load_config_expands_env_in_the_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"providers": [{"name": "openai", "api_key": "${MY_KEY}"}]}')
    config = ccproxy.load_config(str(path), environ={"MY_KEY": "sk-live"})
    assert config.providers[0].api_key == "sk-live" and config.source == str(path)


def run_check(tmp_path, text, *flags):
    path = tmp_path / "config.json"
    path.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_")}
    return subprocess.run([sys.executable, str(REPO / "ccproxy.py"), "start", "--check",
                           "--config", str(path)] + list(flags), capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.mark.parametrize("depth", [40, 600, 100_000])
def test_a_config_nested_without_end_is_refused_naming_the_file(tmp_path, depth):
    """Past the parser's own limit (100,000 levels) or under it (600: deeper than the checks
    that read a config could go), the same clear error, never a RecursionError."""
    result = run_check(tmp_path, '{"routes": %s1%s}' % ('{"a":' * depth, "}" * depth))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "config.json: nested more than 32 levels deep" in result.stderr
    nested = json.loads('{"a":' * depth + "1" + "}" * depth) if depth < 1000 else None
    if nested is not None:
        with pytest.raises(ccproxy.ConfigError, match="^config: nested more than 32 levels"):
            ccproxy.serve_in_thread({"routes": {"x": nested}})


def test_check_accepts_a_good_config(tmp_path):
    result = run_check(tmp_path, '{"providers": [{"name": "ollama"}], "bogus": 1} // ok')
    assert result.returncode == 0
    assert "configuration OK" in result.stdout
    assert "bogus: unknown key, ignored" in result.stderr


def test_check_says_what_the_server_would_refuse_and_probe_needs_a_provider(tmp_path):
    result = run_check(tmp_path, '{"host": "0.0.0.0"}')
    assert result.returncode == 0 and "configuration OK" in result.stdout
    assert "ccproxy: warning: no provider configured: /v1/messages will answer 400" in \
        result.stderr and "bound to 0.0.0.0 (every IPv4 address) without an apikey" in result.stderr
    assert "(0 providers)" in result.stdout
    disabled = run_check(tmp_path, '{"providers": [{"name": "ollama", "enabled": false}]}')
    assert "ccproxy: warning: every provider is disabled: /v1/messages will answer 400 until " \
        "one is enabled" in disabled.stderr and "(1 provider)\n" in disabled.stdout
    probed = run_check(tmp_path, '{"providers": [{"name": "ollama", "enabled": false}]}',
                       "--probe")
    assert probed.returncode == 1 and "nothing to probe: no provider is enabled" in \
        probed.stderr


def test_check_rejects_a_bad_config_naming_the_key(tmp_path):
    result = run_check(tmp_path, '{"providers": [{"name": "x", "type": "openai", '
                                 '"api_base_url": "nope"}]}')
    assert result.returncode == 1
    assert "providers[0].api_base_url: not an http(s) URL" in result.stderr
    assert str(tmp_path / "config.json") in result.stderr


def test_check_does_not_leak_keys_in_errors(tmp_path):
    result = run_check(tmp_path, json.dumps({"providers": [
        {"name": "openai", "api_key": "sk-very-secret-key-123456", "models": 5}]}))
    assert result.returncode == 1
    assert "sk-very-secret" not in result.stderr + result.stdout


def test_a_foreign_log_variable_is_ignored_with_a_warning():
    config = build({"log": True}, {"LOG": "debug"})
    assert config.log_requests is True
    assert "LOG: not a boolean (true/false): 'debug'; ignored" in config.warnings


def test_ccproxy_log_wins_over_log():
    assert build({}, {"LOG": "true", "CCPROXY_LOG": "false"}).log_requests is False


def test_masking_keeps_short_secrets_whole_hidden():
    assert ccproxy.mask_secret("sk-ant-api03-abcdefghijklmnop") == "sk-a…mnop"
    assert ccproxy.mask_secret("short-proxy-key") == "****"
    assert ccproxy.mask_secret("") == ""


def test_a_mistyped_key_is_not_echoed():
    with pytest.raises(ccproxy.ConfigError) as caught:
        build({"apikey": ["proxy-secret-value"],
               "providers": [{"name": "openai", "api_key": {"k": "sk-secret-value"}}]})
    message = str(caught.value)
    assert "apikey: must be a string, not list" in message
    assert "secret-value" not in message


def test_the_example_config_is_valid_and_warns_of_nothing():
    config = ccproxy.load_config(str(REPO / "example.config.json"), {"ANTHROPIC_API_KEY": "k"})
    assert config.warnings == [] and [p.name for p in config.providers] == ["anthropic", "openai"]


def test_models_may_carry_their_window_and_output_limit():
    provider = build({"providers": [{"name": "local", "type": "openai",
                                     "api_base_url": "http://127.0.0.1:1/v1", "models": [
                                         "plain", {"name": "qwen", "context_window": 32768},
                                         {"name": "big", "context_window": 200000,
                                          "max_output_tokens": 8192}]}]}).providers[0]
    assert provider.models == ("plain", "qwen", "big")
    assert [provider.context_window(m) for m in provider.models] == [None, 32768, 200000]
    assert [provider.output_cap(m) for m in provider.models] == [None, None, 8192]


def test_presets_carry_published_limits_and_config_overrides_them():
    config = build({"providers": [
        {"name": "openai", "api_key": "k", "max_tokens": 20000,
         "models": ["gpt-4o", {"name": "gpt-4.1", "context_window": 500000}]},
        {"name": "groq", "api_key": "k", "models": ["llama-3.3-70b-versatile"]}]})
    openai, groq = config.providers
    assert (openai.context_window("gpt-4o"), openai.output_cap("gpt-4o")) == (128000, 16384)
    assert (openai.context_window("gpt-4.1"), openai.output_cap("gpt-4.1")) == (500000, 20000)
    assert openai.context_window("gpt-5") == 272000                  # listed or not
    assert groq.context_window("llama-3.3-70b-versatile") is None    # unknown: no limit


@pytest.mark.parametrize("model, problem", [
    ({"name": "m", "context_window": 0}, "models[0].context_window: must be a positive number"),
    ({"name": "m", "context_window": "128k"}, "models[0].context_window: must be a positive"),
    ({"name": "m", "max_output_tokens": -1}, "models[0].max_output_tokens: must be a positive"),
    ({"context_window": 1000}, "models[0].name: must be a non-empty string"),
    (["m"], "models[0]: must be a model name or {name, context_window, max_output_tokens}"),
    ("", "models[0]: must be a non-empty string"),
])
def test_bad_model_limits_name_the_key(model, problem):
    with pytest.raises(ccproxy.ConfigError) as caught:
        build({"providers": [{"name": "p", "type": "openai", "api_base_url": "http://h/v1",
                              "models": [model]}]})
    assert "config.json: providers[0]." + problem in str(caught.value)


def test_an_unknown_key_in_a_model_entry_is_warned_about():
    config = build({"providers": [{"name": "p", "type": "openai", "api_base_url": "http://h/v1",
                                   "models": [{"name": "m", "context_windw": 9}]}]})
    assert ("config.json: providers[0].models[0].context_windw: unknown key (did you mean "
            "'context_window'?), ignored") in \
        config.warnings


def test_routes_and_fallbacks_take_the_provider_model_string_form():
    config = build({"providers": [{"name": "a", "type": "openai", "api_base_url": "http://h/v1"},
                                  {"name": "b", "type": "openai", "api_base_url": "http://h/v1"}],
                    "routes": {"default": "a, m1", "think": {"provider": "b", "model": "m2",
                                                             "fallbacks": ["a,m3"]}}})
    assert (config.routes["default"].provider, config.routes["default"].model) == ("a", "m1")
    assert config.routes["think"].fallbacks == [("a", "m3")]


def test_a_route_naming_a_model_the_provider_does_not_list_is_warned_about():
    config = build({"providers": [{"name": "a", "type": "openai", "api_base_url": "http://h/v1",
                                   "models": ["gpt-x", "gpt-y"]}],
                    "routes": {"default": "a,gpt-z", "think": {"provider": "a", "model": "gpt-x"}}})
    assert config.warnings == [
        "config.json: routes.default.model: 'gpt-z' is not among a's models (gpt-x, gpt-y)"]


def test_a_model_its_provider_retired_is_warned_about_where_it_is_named(tmp_path):
    """deepseek-chat (ended 2026-07-24) and claude-sonnet-4-5 (2026-11-30): each place the config
    names one is warned about, with the day and the model to use; current names are not, nor
    the same name at a provider that is not the preset's."""
    raw = {"providers": [
        {"name": "deepseek", "api_key": "k", "models": ["deepseek-flash", "deepseek-v4-pro",
                                                         "deepseek-chat", "deepseek-reasoner"]},
        {"name": "anthropic", "api_key": "k"},
        {"name": "gateway", "type": "openai", "api_base_url": "http://h/v1",
         "models": ["deepseek-chat"]}],
        "routes": {"default": "anthropic,claude-sonnet-4-5",
                   "think": {"provider": "deepseek", "model": "deepseek-v4-pro",
                             "fallbacks": ["deepseek,deepseek-reasoner"]}}}
    retired = "retired %r on %s: its calls fail; use %r"
    assert sorted(build(raw).warnings) == sorted([
        "config.json: providers[0].models[2]: deepseek " + retired % (
            "deepseek-chat", "2026-07-24", "deepseek-flash"),
        "config.json: providers[0].models[3]: deepseek " + retired % (
            "deepseek-reasoner", "2026-07-24", "deepseek-flash"),
        "config.json: routes.default.model: anthropic " + retired % (
            "claude-sonnet-4-5", "2026-11-30", "claude-sonnet-5"),
        "config.json: routes.think.fallbacks[0].model: deepseek " + retired % (
            "deepseek-reasoner", "2026-07-24", "deepseek-flash")])
    result = run_check(tmp_path, json.dumps(raw))
    assert result.returncode == 0 and "retired 'deepseek-chat' on 2026-07-24" in result.stderr


@pytest.mark.parametrize("today, verb, tense", [
    ("2026-12-07", "retires", "its calls fail from then"),
    ("2026-12-11", "retired", "its calls fail")])
def test_an_openai_model_is_warned_about_before_and_after_its_shutdown_day(monkeypatch, today,
                                                                          verb, tense):
    """OpenAI's deprecations page: gpt-5 ends on 2026-12-11 (for gpt-6.1-sol), o4-mini ended on
    2026-10-23 (for gpt-5.6-terra); Gemini's: gemini-2.5-pro ended on 2026-12-01; current models
    (gemini-2.5-flash-lite stays) are not warned about."""
    moment = time.strptime(today, "%Y-%m-%d")
    monkeypatch.setattr(ccproxy.time, "gmtime", lambda *seconds: moment)
    raw = {"providers": [{"name": "openai", "api_key": "k",
                          "models": ["gpt-6.1-sol", "gpt-5", "o4-mini-2025-04-16"]},
                         {"name": "gemini", "api_key": "k",
                          "models": ["gemini-2.5-flash-lite", "gemini-2.5-pro"]}]}
    assert build(raw).warnings == [
        "config.json: providers[0].models[1]: openai %s 'gpt-5' on 2026-12-11: %s; use "
        "'gpt-6.1-sol'" % (verb, tense),
        "config.json: providers[0].models[2]: openai retired 'o4-mini-2025-04-16' on 2026-10-23: "
        "its calls fail; use 'gpt-5.6-terra'",
        "config.json: providers[1].models[1]: gemini retired 'gemini-2.5-pro' on 2026-12-01: its "
        "calls fail; use 'gemini-3.8-flash'"]


def test_check_names_the_file_in_use_and_each_warning_with_a_near_miss(tmp_path):
    result = run_check(tmp_path, '{"providers": [{"name": "ollama"}], "prot": 1}')
    assert result.returncode == 0
    assert "ccproxy: config: %s" % (tmp_path / "config.json") in result.stderr.splitlines()
    assert "ccproxy: warning: %s: prot: unknown key (did you mean 'port'?), ignored" % (
        tmp_path / "config.json") in result.stderr.splitlines()


def test_a_project_config_json_is_skipped_with_a_note_naming_the_file_used(tmp_path,
                                                                           monkeypatch):
    home, project = tmp_path / "home", tmp_path / "project"
    (home / ".ccproxy").mkdir(parents=True)
    (home / ".ccproxy" / "config.json").write_text('{"providers": [{"name": "ollama"}]}')
    project.mkdir()
    (project / "config.json").write_text('{"name": "my-app", "port": 8080}')
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(project)
    config = ccproxy.load_config(environ={})
    assert config.source == str(home / ".ccproxy" / "config.json")
    assert config.notes == ["%s skipped: not a ccproxy config (it has no providers or routes); "
                            "using %s" % (project / "config.json", config.source)]
    (project / "config.json").write_text('{"routes": {}, "port": 3457}')   # one of ours: used
    assert ccproxy.load_config(environ={}).port == 3457
    (project / "config.json").write_text('{"port": ')                      # unreadable: said so
    assert ccproxy.load_config(environ={}).notes[0].startswith(
        "%s skipped: not valid JSON" % (project / "config.json"))


# --- start --check --probe: each provider called once, a table of what it answered -------------

def probed(tmp_path, providers, routes):
    result = run_check(tmp_path, json.dumps({"providers": providers, "routes": routes}),
                       "--probe")
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[2:]}
    return result, rows


def openai_entry(name, url, **fields):
    return dict({"name": name, "type": "openai", "api_base_url": url + "/v1",
                 "api_key": "sk-probe-0123456789"}, **fields)


def calling_server(answers: dict):
    """An OpenAI-compatible server of no preset that lists answers' models, and answers a
    request to each as answers[model] says: "calls" (a parsed tool call), "writes" (a call
    written as text, as Qwen3-Coder's is under vLLM without its parser), or a Reply."""
    def script(request):
        if request["method"] == "GET":
            return json_reply({"object": "list", "data": [{"id": name} for name in answers]})
        answer = answers[request["json"]["model"]]
        if not isinstance(answer, str):
            return answer
        message = {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "current_time",
                                                          "arguments": "{}"}}]}
        if answer == "writes":
            message = {"role": "assistant", "content": "<tool_call>\n<function=current_time>\n"
                                                       "</function>\n</tool_call>"}
        elif answer == "writes its own way":                # Mistral's, which ccproxy cannot read
            message = {"role": "assistant", "content": "[TOOL_CALLS]current_time[ARGS]{}"}
        elif answer == "thinks in the text":        # a template that opens the thinking
            message["content"] = "The user wants the time.\n</think>\n\n"
        return json_reply({"id": "c", "choices": [{"index": 0, "message": message,
                                                   "finish_reason": "stop"}]})
    return script


def test_probe_reports_each_provider_and_exits_0_when_routed_ones_work(tmp_path, upstream):
    upstream.script = calling_server({"m1": "calls", "m2": "calls"})
    result, rows = probed(tmp_path, [openai_entry("ok", upstream.url)],
                          {"default": "ok,m1", "think": "ok,m2"})
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"ok +yes +accepted +\d+ ms +m1 ok; m2 ok", rows["ok"])
    assert [(r["method"], r["path"]) for r in upstream.requests] == [
        ("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
        ("POST", "/v1/chat/completions")]
    assert upstream.requests[0]["headers"]["authorization"] == "Bearer sk-probe-0123456789"


def test_probe_asks_a_server_of_no_preset_to_call_a_tool(tmp_path, upstream):
    """vLLM with the wrong --tool-call-parser, or llama.cpp without --jinja, hands the model's
    call back as text: Claude Code would show it and do nothing, the session's requests all
    answered 200. The probe asks each routed model to call a tool, and says so beforehand."""
    upstream.script = calling_server({
        "parsed": "calls", "qwen3-coder": "writes", "mistral": "writes its own way",
        "no-jinja": json_reply({"error": {"message": "tools param requires --jinja flag"}}, 500)})
    result, rows = probed(tmp_path, [openai_entry("local", upstream.url)], {
        "default": "local,parsed", "think": "local,qwen3-coder", "longContext": "local,mistral",
        "background": "local,no-jinja"})
    assert result.returncode == 1
    fix = ("vLLM: --enable-auto-tool-choice and the model's --tool-call-parser; llama-server: "
           "--jinja")
    assert rows["local"].endswith(
        "parsed ok; qwen3-coder ok, though it writes its tool calls as text, which ccproxy reads "
        "(%s has the server parse them); mistral writes its tool calls as text, which Claude "
        "Code would only show: the server does not parse them (%s); no-jinja gives it no tools: "
        "start llama-server with --jinja (or pick another model in routes)" % (fix, fix)), rows
    asked = [r["json"] for r in upstream.requests if r["method"] == "POST"]
    assert [b["tools"][0]["function"]["name"] for b in asked] == ["current_time"] * 4
    upstream.script = calling_server({"qwen3-coder": "writes"})
    result, rows = probed(tmp_path, [openai_entry("local", upstream.url)],
                          {"default": "local,qwen3-coder"})
    assert result.returncode == 0 and "ccproxy reads" in rows["local"], rows
    assert "tool_choice" not in asked[0] or asked[0]["tool_choice"] == "auto"


def test_probe_says_when_a_model_writes_its_thinking_with_only_the_closing_tag(tmp_path,
                                                                               upstream):
    upstream.script = calling_server({"qwen3-thinking": "thinks in the text", "m": "calls"})
    result, rows = probed(tmp_path, [openai_entry("local", upstream.url)],
                          {"default": "local,qwen3-thinking", "think": "local,m"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert rows["local"].endswith(
        "qwen3-thinking ok, and writes its thinking into the text with only the closing tag, "
        "which ccproxy reads from its second answer on (vLLM, SGLang: the model's "
        "--reasoning-parser has the server split it); m ok"), rows


def test_probe_asks_no_model_of_a_preset_to_call_a_tool(tmp_path, upstream):
    upstream.script = calling_server({"llama-3.3-70b-versatile": "writes"})
    groq = {k: v for k, v in openai_entry("groq", upstream.url).items() if k != "type"}
    result, rows = probed(tmp_path, [groq],
                          {"default": "groq,llama-3.3-70b-versatile"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["method"] for r in upstream.requests] == ["GET"]


def test_a_model_list_of_any_shape_is_read_for_the_names_it_holds(tmp_path, upstream):
    upstream.script = lambda r: json_reply({"data": [{"id": ["m1"]}, {"id": {"m": 1}}, "m1",
                                                     {"id": "m2"}]})
    result, rows = probed(tmp_path, [openai_entry("odd", upstream.url)],
                          {"default": "odd,m1", "think": "odd,m2"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.fullmatch(r"odd +yes +accepted +\d+ ms +m1 not listed; m2 ok", rows["odd"])


def test_probe_names_what_fails_and_exits_1(tmp_path, upstream, second_upstream):
    upstream.script = lambda r: json_reply({"data": [{"id": "m1"}]})
    second_upstream.script = lambda r: json_reply(
        {"error": {"message": "Incorrect API key provided"}}, 401)
    result, rows = probed(tmp_path, [
        openai_entry("lacking", upstream.url), openai_entry("refusing", second_upstream.url),
        openai_entry("down", dead_url()), openai_entry("unused", dead_url())],
        {"default": "lacking,m9", "think": "refusing,m1", "background": "down,m1"})
    assert result.returncode == 1
    assert re.fullmatch(r"lacking +yes +accepted +\d+ ms +m9 not listed", rows["lacking"])
    assert re.fullmatch(r"refusing +yes +refused \(HTTP 401\) +\d+ ms +Incorrect API key "
                        r"provided", rows["refusing"])
    assert re.fullmatch(r"down +no +- +- +down: cannot reach http://127.0.0.1:\d+/v1/models: .*"
                        r"refused", rows["down"])
    assert "unused" in rows          # shown, though no route uses it (and not counted)
    assert result.stderr.splitlines()[-1] == \
        "routed providers or models failing: lacking, refusing, down"


def test_probe_lists_gemini_and_anthropic_models_their_way(tmp_path, upstream, second_upstream):
    upstream.script = lambda r: json_reply({"models": [{"name": "models/gemini-2.5-pro"}]})
    second_upstream.script = lambda r: json_reply({"data": [{"id": "claude-x",
                                                             "type": "model"}]})
    result, rows = probed(tmp_path, [
        {"name": "gemini", "api_base_url": upstream.url + "/v1beta", "api_key": "g-0123456789"},
        {"name": "anthropic", "api_base_url": second_upstream.url, "api_key": "sk-ant-0123456789"}],
        {"default": "gemini,gemini-2.5-pro", "think": "anthropic,claude-x"})
    assert result.returncode == 0, result.stdout + result.stderr
    gemini, anthropic_call = upstream.requests[0], second_upstream.requests[0]
    assert gemini["path"] == "/v1beta/models?pageSize=1000"
    assert gemini["headers"]["x-goog-api-key"] == "g-0123456789"
    assert anthropic_call["path"] == "/v1/models?limit=1000"
    assert anthropic_call["headers"]["x-api-key"] == "sk-ant-0123456789"
    assert rows["gemini"].endswith("gemini-2.5-pro ok") and rows["anthropic"].endswith(
        "claude-x ok")


def ollama_server(models: dict, capabilities=None):
    """A mock Ollama server that lists `models` (name -> the context length /api/ps says it
    runs the model with once loaded, None for not loaded), loads them on POST /api/generate,
    and says their capabilities on POST /api/show when given."""
    def script(request):
        if request["path"] == "/api/ps":
            return json_reply({"models": [{"name": name, "model": name, "context_length": length}
                                          for name, length in models.items() if length]})
        if request["path"] == "/api/generate":
            return json_reply({"model": request["json"]["model"], "response": "", "done": True})
        if request["path"] == "/api/show" and capabilities is not None:
            return json_reply({"capabilities": capabilities[request["json"]["model"]]})
        return json_reply({"object": "list", "data": [{"id": name} for name in models]})
    return script


def test_probe_finds_ollamas_tagged_models_and_says_the_context_it_runs_them_with(tmp_path,
                                                                                 upstream):
    """Ollama lists "qwen3-coder:latest" for "qwen3-coder"; it loads each routed model to say
    its context length, and whether Claude Code can work in it (the exit status is not
    changed by that: a small model may serve small requests)."""
    upstream.script = ollama_server({"qwen3-coder:latest": 4096, "big:32b": 131072})
    result, rows = probed(tmp_path, [{"name": "ollama", "api_base_url": upstream.url + "/v1"}],
                          {"default": "ollama,qwen3-coder", "think": "ollama,big:32b"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.fullmatch(r"ollama +yes +accepted +\d+ ms +qwen3-coder ok \(context 4096: too "
                        r"small for Claude Code, whose own prompt is 12-19k tokens; Ollama "
                        r"advises 64k or more: set OLLAMA_CONTEXT_LENGTH=65536\); big:32b ok "
                        r"\(context 131072\)", rows["ollama"]), rows
    loads = [r["json"]["model"] for r in upstream.requests if r["path"] == "/api/generate"]
    assert loads == ["qwen3-coder"]          # big:32b was listed as loaded by then


def test_probe_says_which_ollama_model_has_no_tools(tmp_path, upstream):
    """Ollama refuses every request with tools to a model without them, and Claude Code sends
    tools in every request: the capabilities POST /api/show lists say so beforehand."""
    upstream.script = ollama_server({"coder:latest": None, "gemma3:latest": None},
                                    {"coder": ["completion", "tools"], "gemma3": ["completion"]})
    result, rows = probed(tmp_path, [{"name": "ollama", "api_base_url": upstream.url + "/v1"}],
                          {"default": "ollama,coder", "background": "ollama,gemma3"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert rows["ollama"].endswith("coder ok; gemma3 has no tools, which Claude Code needs "
                                   "(pick a model whose `ollama show` lists them)"), rows
    assert sorted(r["json"]["model"] for r in upstream.requests if r["path"] == "/api/show") \
        == ["coder", "gemma3"]


def test_probe_without_a_model_list_sends_each_routed_model_the_smallest_request(tmp_path,
                                                                                 upstream):
    def script(request):
        if request["method"] == "GET":
            return json_reply({"error": "no such endpoint"}, 404)
        if request["json"]["model"] == "real":
            return json_reply({"id": "c", "choices": [{"index": 0, "finish_reason": "length",
                                                       "message": {"content": "p"}}]})
        return json_reply({"error": {"message": "model 'fake' not found"}}, 404)
    upstream.script = script
    result, rows = probed(tmp_path, [openai_entry("p", upstream.url)],
                          {"default": "p,real", "think": "p,fake"})
    assert result.returncode == 1
    assert re.search(r"real ok; fake missing \(HTTP 404: model 'fake' not found\)$", rows["p"])
    sent = [r["json"] for r in upstream.requests if r["method"] == "POST"]
    assert [(b["model"], b["max_tokens"], b["messages"]) for b in sent[:2]] == [
        (m, 16, [{"role": "user", "content": "ping"}]) for m in ("real", "fake")]
    assert [(b["model"], "tools" in b) for b in sent[2:]] == [("real", True)]  # asked to call


def test_probe_says_a_server_without_its_v1_has_nothing_at_that_address(tmp_path, upstream):
    """vLLM, llama.cpp and LM Studio serve their API under /v1: a base URL without it is
    answered 404 everywhere, which is no missing model."""
    upstream.script = lambda request: json_reply({"detail": "Not Found"}, 404)
    result, rows = probed(tmp_path, [dict(openai_entry("bare", upstream.url),
                                          api_base_url=upstream.url)], {"default": "bare,qwen"})
    assert result.returncode == 1
    assert rows["bare"].endswith(
        "qwen nothing at that address: its API is most often under /v1, try %s/v1 (HTTP 404: "
        "Not Found): check api_base_url" % upstream.url)


# --- any value in any place: taken, or refused naming the file and the key ----------------------

EVERY_SETTING = {
    "host": "127.0.0.1", "port": 3456, "apikey": "client-key-0123456789abc",
    "admin_key": "admin-key-0123456789abcdef", "client_keys": {"alice": "alice-key-0123456789abc"},
    "log": False, "log_file": "/tmp/ccproxy.log", "log_bodies": False, "usage_file": "",
    "failover": {"other_providers": True, "missing_model": False, "context_overflow": True},
    "providers": [
        {"name": "anthropic", "api_key": "k", "enabled": True, "headers": {"X-Team": "a"},
         "max_tokens": 100, "count_tokens": True,
         "models": ["claude-sonnet-5", {"name": "m2", "context_window": 100000,
                                        "max_output_tokens": 1000,
                                        "price": {"input": 1, "output": 2, "cache_read": 0.1,
                                                  "cache_write": 1.25}}]},
        {"name": "openai", "api_keys": ["a", "b"], "api": "responses",
         "responses_models": "codex", "models": ["gpt-6.1-sol"]},
        {"name": "az", "type": "azure", "api_base_url": "https://r.openai.azure.com",
         "api_key": "k", "deployments": {"gpt-4.1": "d"}, "api_version": "2025-04-01-preview"},
        {"name": "gem", "type": "gemini", "api_base_url": "https://g.example/v1beta",
         "api_key": "k", "models": ["gemini-2.5-pro"]}],
    "routes": {
        "default": {"provider": "anthropic", "model": "claude-sonnet-5",
                    "fallbacks": ["openai,gpt-6.1-sol",
                                  {"provider": "gem", "model": "gemini-2.5-pro"}]},
        "background": "openai,gpt-6.1-sol", "longContext": "gem,gemini-2.5-pro",
        "longContextThreshold": 60000,
        "reviews": {"provider": "az", "model": "gpt-4.1", "conditions": [
            {"type": "header", "header": "x-task", "operator": "==", "value": "review"},
            {"type": "model", "operator": "matches", "value": "^c"}]}},
    "security": {"allowed_ips": ["127.0.0.1/32"]},
    "management": {"read_only": True},
    "performance": {"request_timeout": "10m", "drain_delay": "1s", "max_connections": 100,
                    "worker_threads": 64, "max_retries": 1, "circuit_breaker_enabled": True,
                    "rate_limit_rpm": 60, "metrics_enabled": True},
}


def test_every_setting_of_the_fuzzed_config_is_valid_as_written():
    assert build(EVERY_SETTING).warnings == []


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_value_in_any_place_is_taken_or_refused_naming_the_file(data):
    """A wrong type anywhere (a list for a provider's type, a number for its fallbacks) is a
    config error that names the file, never a crash."""
    try:
        build(changed_anywhere(data, EVERY_SETTING))
    except ccproxy.ConfigError as error:
        assert str(error).startswith("config.json: ")


@pytest.mark.parametrize("kind, url, served", [
    ("openai", "https://api.openai.com/v1", "openai"),
    ("openai", "https://api.mistral.ai/v1", "mistral"),       # its calls' ids of 9 characters
    ("openai", "https://api.groq.com/openai/v1", "groq"),
    ("openai", "https://api.deepseek.com", "deepseek"),
    ("gemini", "https://generativelanguage.googleapis.com/v1beta", "gemini"),
    ("anthropic", "https://api.deepseek.com/anthropic", "deepseek-anthropic"),
    ("anthropic", "https://api.anthropic.com", "anthropic"),
    ("openai", "https://api.anthropic.com/v1", None),          # no preset of that type there
    ("openai", "http://localhost:11434/v1", None),             # a local server: any could be
    ("openai", "https://llm.example.com/v1", None)])
def test_a_provider_of_any_name_on_a_presets_address_is_taken_for_it(kind, url, served):
    """A second account ("openai-work", "mistral-eu") gets what its server needs, as the
    preset's own name does: Mistral refuses every other form of a call's id at every turn
    after, and a model's limits and prices are the preset's."""
    provider = build({"providers": [{"name": "mine", "type": kind, "api_key": "k",
                                     "api_base_url": url}]}).providers[0]
    preset = build({"providers": [{"name": served or "x", "api_key": "k", "type": kind,
                                   "api_base_url": url}]}).providers[0]
    assert (provider.quirks, provider.model_limits, provider.prices) == (
        preset.quirks, preset.model_limits, preset.prices)
    assert ccproxy.served_preset({"name": "mine", "type": kind, "api_base_url": url}) == (
        served or "")
