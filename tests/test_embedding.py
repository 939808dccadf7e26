"""Use from Python: serve_in_thread() inside another program, vendored under any name, with
nothing else in that program disturbed."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import types

import anthropic
import pytest

import ccproxy
from helpers import PROVIDER_KEY, REPO, anthropic_provider, json_reply, stream_reply, wait_until
from test_responses import message_item, response

SIDE_EFFECTS = r'''
import asyncio, json, logging, os, signal, sys, threading
sys.path.insert(0, sys.argv[1])
watched = ("SIGINT", "SIGTERM", "SIGHUP")
def state():
    return {"signals": [str(signal.getsignal(getattr(signal, s))) for s in watched],
            "root": [len(logging.getLogger().handlers), logging.getLogger().level],
            "cwd": os.getcwd(), "env": dict(os.environ), "hook": str(sys.excepthook),
            "policy": type(asyncio.get_event_loop_policy()).__name__,
            "threads": sorted(t.name for t in threading.enumerate()),
            "files": sorted(os.listdir(os.environ["HOME"])) + sorted(os.listdir("."))}
before = state()
import llm_proxy
after_import = state()
with llm_proxy.serve_in_thread({"providers": [{"name": "p", "type": "anthropic",
                                               "api_base_url": sys.argv[2]}]}) as proxy:
    serving = proxy.url
after_serving = state()
logger = logging.getLogger("ccproxy")
print(json.dumps({"before": before, "import": after_import, "served": after_serving,
                  "url": serving, "logger_handlers": len(logger.handlers) + len(logger.filters),
                  "module": llm_proxy.__name__,
                  "undocumented": [n for n in llm_proxy.__all__ if n != "__version__"
                                   and not getattr(llm_proxy, n).__doc__]}))
'''


def test_a_vendored_copy_under_another_name_disturbs_nothing(tmp_path, upstream):
    vendor, home, work = tmp_path / "vendor", tmp_path / "home", tmp_path / "work"
    for folder in (vendor, home, work):
        folder.mkdir()
    shutil.copy(REPO / "ccproxy.py", vendor / "llm_proxy.py")
    (work / "config.json").write_text('{"port": 1}')          # must not be read
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_")}
    env.update(HOME=str(home), CCPROXY_PORT="9", CCPROXY_API_KEY="must-not-apply")
    result = subprocess.run([sys.executable, "-c", SIDE_EFFECTS, str(vendor), upstream.url],
                            cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["before"] == report["import"] == report["served"]
    assert report["logger_handlers"] == 0 and report["module"] == "llm_proxy"
    assert report["undocumented"] == []
    assert re.match(r"http://127\.0\.0\.1:\d+$", report["url"]) and not report["url"].endswith(":9")
    assert os.listdir(home) == [] and os.listdir(work) == ["config.json"]
    assert result.stderr == ""


def ask(url, **extra):
    with anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0) as client:
        return client.messages.create(model="m", max_tokens=5,
                                      messages=[{"role": "user", "content": "hi"}], **extra)


def test_dict_path_and_config_objects_all_serve(tmp_path, upstream, monkeypatch):
    monkeypatch.setenv("EMBED_KEY", "sk-from-the-environment-0123")
    config = {"providers": [anthropic_provider(upstream, api_key="${EMBED_KEY}")]}
    path = tmp_path / "embedded.json"
    path.write_text(json.dumps(config))
    built = ccproxy.build_config({"providers": [anthropic_provider(upstream)]}, None, {})
    for given in (config, str(path), path, built):
        with ccproxy.serve_in_thread(given) as proxy:
            assert ask(proxy.url).content[0].text == "Hello from upstream"
    assert upstream.requests[0]["headers"]["x-api-key"] == "sk-from-the-environment-0123"


def test_two_proxies_in_one_process_share_nothing(upstream, second_upstream):
    upstream.script = lambda r: json_reply({"type": "error", "error": {
        "type": "api_error", "message": "down"}}, 500)
    breaker = {"circuit_breaker_enabled": True, "circuit_breaker_threshold": 1,
               "circuit_breaker_cooldown": "1h", "rate_limit_enabled": True,
               "rate_limit_rpm": 1, "rate_limit_burst": 1}
    first = ccproxy.serve_in_thread({"providers": [anthropic_provider(upstream)],
                                     "failover": False, "performance": breaker})
    second = ccproxy.serve_in_thread({"providers": [anthropic_provider(second_upstream)],
                                      "performance": {"metrics_enabled": True}})
    try:
        with pytest.raises(anthropic.InternalServerError):
            ask(first.url)
        assert first.app.failover.breakers["anthropic"].state == "open"
        assert ask(second.url).content[0].text == "Hello from upstream"
        assert ask(second.url).content[0].text == "Hello from upstream"     # no shared bucket
        assert second.app.failover.breakers["anthropic"].failures == 0
        assert wait_until(lambda: (first.app.requests_total, second.app.requests_total) == (1, 2))
        first.close()
        assert ask(second.url).content[0].text == "Hello from upstream"
    finally:
        first.close()
        second.close()


def test_an_embedding_programs_log_gets_records_masked_and_escaped(upstream):
    """While a proxy serves, the `ccproxy` logger's records reach the program's own handlers
    with every proxy's keys masked and control characters escaped; after, as they were."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("ccproxy")
    logger.addHandler(handler)
    try:
        with ccproxy.serve_in_thread({"providers": [anthropic_provider(upstream)]}), \
                ccproxy.serve_in_thread({"providers": [anthropic_provider(
                    upstream, name="other", type="anthropic",
                    api_key="sk-the-other-key-0123456789")]}):
            logger.warning("keys %s and %s, model %s", PROVIDER_KEY,
                           "sk-the-other-key-0123456789", "m\nFORGED")
        assert logger.filters == []
    finally:
        logger.removeHandler(handler)
    assert records == ["keys sk-a…6789 and sk-t…6789, model m\\x0aFORGED"]


def test_a_bad_config_or_a_busy_port_raises_in_the_callers_thread(tmp_path):
    threads = threading.active_count()
    with pytest.raises(ccproxy.ConfigError, match=r"^config: providers\[0\]\.type: must be"):
        ccproxy.serve_in_thread({"providers": [{"name": "x"}]})
    path = tmp_path / "bad.json"
    path.write_text('{"providers": "openai"}')
    with pytest.raises(ccproxy.ConfigError, match=re.escape(str(path)) + ": providers: must be"):
        ccproxy.serve_in_thread(str(path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        started = time.monotonic()
        with pytest.raises(OSError, match="already in use"):
            ccproxy.serve_in_thread({}, port=taken.getsockname()[1])
        assert time.monotonic() - started < 5
    assert threading.active_count() == threads


@pytest.mark.parametrize("listen, problem", [
    ({"port": 70000}, "port: must be between 0 and 65535, not 70000"),   # not 70000 - 65536
    ({"port": "8080"}, 'port: must be a port number, not "8080"'),
    ({"host": None}, "host: must be a host name or address, not null"),  # not every interface
    ({"host": "a b"}, "host: must be an address"),
])
def test_a_bad_host_or_port_is_named_as_the_callers_argument(listen, problem):
    built = ccproxy.build_config({}, None)
    for config in ({}, built):
        with pytest.raises(ccproxy.ConfigError, match="^" + re.escape(
                "serve_in_thread(): " + problem)):
            ccproxy.serve_in_thread(config, **listen)


def test_close_during_a_stream_ends_it_with_an_error_event(upstream):
    upstream.script = lambda r: stream_reply(pause_before=3)
    proxy = ccproxy.serve_in_thread({"providers": [anthropic_provider(upstream)]})
    client = anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as caught:
        with client.messages.stream(model="m", max_tokens=5,
                                    messages=[{"role": "user", "content": "hi"}]) as stream:
            next(iter(stream))
            threading.Thread(target=proxy.close, kwargs={"timeout": 0.2}).start()
            for _ in stream:
                pass
    assert "shutting down" in str(caught.value)
    deadline = time.monotonic() + 10
    while proxy._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not proxy._thread.is_alive()


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


def test_thirty_start_close_cycles_leave_nothing_behind(upstream):
    config = {"providers": [anthropic_provider(upstream)]}
    with ccproxy.serve_in_thread(config) as proxy:          # warm up lazy imports and pools
        ask(proxy.url)
    threads, descriptors = threading.active_count(), open_descriptors()
    for _ in range(30):
        with ccproxy.serve_in_thread(config) as proxy:
            ask(proxy.url)
    assert wait_until(lambda: threading.active_count() <= threads), threading.enumerate()
    # the mock upstream lives in this process: its handler closes its side of the proxy's
    # last connection a moment after the proxy closed it, so its descriptor is waited for
    assert wait_until(lambda: open_descriptors() <= descriptors), os.listdir("/proc/self/fd")


def readme_python(section: str) -> list:
    """The python code blocks of one README section."""
    text = (REPO / "README.md").read_text()
    body = text.split("## " + section + "\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)


def test_the_readmes_examples_run(upstream, monkeypatch, capsys):
    example, fixture = readme_python("Use it from Python")
    upstream.script = lambda r: json_reply(response([message_item("Hi!")]) if r["path"].endswith(
        "/responses") else {   # the example's GPT-6 model goes to the Responses API, Ollama not
        "id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})
    for preset in ("openai", "ollama"):
        monkeypatch.setitem(ccproxy.PROVIDER_PRESETS, preset, dict(
            ccproxy.PROVIDER_PRESETS[preset], api_base_url=upstream.url + "/v1"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-example-0123456789")
    monkeypatch.setitem(sys.modules, "ccproxy", ccproxy)
    exec(compile(example, "README example", "exec"), {})
    assert capsys.readouterr().out == "Hi!\n"
    namespace = {}
    stub = types.ModuleType("pytest")
    stub.fixture = lambda *args, **kwargs: (lambda function: function)
    monkeypatch.setitem(sys.modules, "pytest", stub)
    exec(compile(fixture, "README fixture", "exec"), namespace)
    fixtures = [v for k, v in namespace.items() if callable(v) and not isinstance(v, type)
                and getattr(v, "__module__", None) is None and k != "serve_in_thread"]
    for make in fixtures:
        generator = make()
        url = next(generator)
        assert ask(url).content[0].text == "Hi!"
        next(generator, None)
