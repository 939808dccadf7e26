"""Fixtures: scripted mock upstreams on 127.0.0.1 and in-process proxies, each stopped after its
test. The helpers they are built on (and that tests use directly) are in helpers.py."""
from __future__ import annotations

import logging

import pytest

from helpers import (CLAUDE_CODE_VERSIONS, MockUpstream, RunningProxy,  # first: ccproxy on the path
                     anthropic_provider, capture_claude_code)
import ccproxy  # noqa: E402  (isort: skip)

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(autouse=True)
def no_proxy_settings(monkeypatch):
    """Tests decide for themselves whether ccproxy's upstream calls go through a proxy."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture(autouse=True)
def ccproxy_logger_restored():
    """A test that runs configure_logging (a foreground start) leaves the ccproxy logger as it
    found it: its handlers, level and propagation, which caplog in a later test relies on."""
    logger = logging.getLogger("ccproxy")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:], logger.propagate = handlers, propagate
    logger.setLevel(level)


@pytest.fixture
def ccproxy_log():
    """The messages ccproxy logs during the test (at INFO and above), whatever another test
    did to logging's propagation."""
    class Collector(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    collector = Collector()
    logger = logging.getLogger("ccproxy")
    level = logger.level
    logger.addHandler(collector)
    logger.setLevel(logging.INFO)
    yield collector.messages
    logger.removeHandler(collector)
    logger.setLevel(level)


@pytest.fixture
def upstream():
    mock = MockUpstream()
    yield mock
    mock.close()


@pytest.fixture
def second_upstream():
    mock = MockUpstream()
    yield mock
    mock.close()


@pytest.fixture
def start_proxy():
    """start_proxy(raw_config, environ=None) -> RunningProxy, stopped after the test."""
    running = []

    def start(raw=None, environ=None):
        raw = dict(raw or {})
        raw.setdefault("port", 0)
        config = ccproxy.build_config(raw, "test-config.json", environ or {})
        proxy = RunningProxy(config)
        running.append(proxy)
        return proxy

    yield start
    for proxy in running:
        proxy.stop()


@pytest.fixture
def proxy(start_proxy, upstream):
    """A proxy with one Anthropic provider: the mock upstream."""
    return start_proxy({"providers": [anthropic_provider(upstream)]})


@pytest.fixture(scope="session")
def claude_code_requests(tmp_path_factory):
    """version -> the requests each Claude Code version the suite installs sends in a one-turn
    headless run, every tool in `tools` (ENABLE_TOOL_SEARCH=false). Captured from the real CLI
    at test time: Claude Code's own prompts and tool schemas are not stored in the project."""
    return {version: capture_claude_code(version, tmp_path_factory.mktemp("claude-" + version),
                                         env={"ENABLE_TOOL_SEARCH": "false"})
            for version in CLAUDE_CODE_VERSIONS}
