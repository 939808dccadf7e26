#!/usr/bin/env python3
"""ccproxy: let Claude Code, or any Anthropic Messages API client, use any LLM provider.

One file, Python 3.8+ standard library only. It speaks the Anthropic Messages API to its
clients and each provider's own API behind it, with routing and clear Anthropic-shaped errors.

Usage (under any file name; also `python3 -m ccproxy` or the installed `ccproxy`):
    python3 ccproxy.py code [claude arguments]   start the proxy if needed, run Claude Code
    python3 ccproxy.py start [--foreground] [--host HOST] [--port PORT] [--config FILE]
    python3 ccproxy.py start --check [--probe]   validate the config (and call each provider)
    python3 ccproxy.py stop | status [--json] [--config FILE]
    python3 ccproxy.py env [--shell SHELL] [--statusline] | version | --version | COMMAND --help

Sections, in the order a request travels (grep -n '^# [0-9]' ccproxy.py), and their parts:
    1. Constants
    2. Errors
    3. Config
        3.1 Reading: JSONC, ${VAR}, durations, layers
        3.2 The configuration: providers, routes, limits
        3.3 Validation: every problem, with its file and key
            3.3.1 Values, and the top level: client keys, performance, access
            3.3.2 Providers: presets, keys, models, prices
            3.3.3 Routes: targets, conditions, patterns
            3.3.4 A config built and loaded, and keys other users could read
        3.4 A Claude Code Router config, converted when read
    4. HTTP/1.1
        4.1 Messages: parsing requests, writing responses (sans-IO)
        4.2 The server: listening, accepting within limits, draining
        4.3 Connections: keep-alive, limits, timeouts, streaming
    5. Access
    6. Endpoints
        6.1 The app and the request body
        6.2 Messages, token counts, models
        6.3 Health, status, metrics, the request log
        6.4 Provider management
        6.5 The endpoint table
    7. Token estimator
    8. Router and resilience
        8.1 Routing: what a request needs, and the plan of providers it goes to
        8.2 Resilience: retries, key pools, circuit breakers, failover
            8.2.1 Retries, keys, circuits, and the next candidate
            8.2.2 What a provider's refusal says it wants: learned, and the request sent again
            8.2.3 Refusals that are the configuration's: plans, tools, keys, models, addresses
    9. Transformers
        9.1 Shared by every protocol: the client's request and events, the relay
            9.1.1 Protocols, a provider's call, and what a translation knows
            9.1.2 The client's request: what each translation reads, maps and leaves out
            9.1.3 A provider's refusals, in the words Claude Code acts on
            9.1.4 Streams: the provider's events read, translated and relayed
            9.1.5 The client's answer: messages, events, tool arguments, signatures
        9.2 Anthropic Messages (pass-through)
            9.2.1 The request: its address, headers and body
            9.2.2 The history as each server takes it: thinking, text, calls and their results
            9.2.3 The answer: marked for a compatible server, whole or streamed, and errors
        9.3 OpenAI Chat Completions
            9.3.1 The request, and the conversation as messages
            9.3.2 The request's tools, effort, formats, caching and address
            9.3.3 The answer: text, reasoning, calls, usage, stop reason, errors
            9.3.4 The stream
        9.4 OpenAI Responses
        9.5 Gemini
        9.6 The protocol registry (a new protocol: a sub-section above, a line here)
    10. Upstream
        10.1 Worker threads, and the way back to the event loop
        10.2 A call to a provider: sent, answered, cut
        10.3 Answers read by the event loop, or by a thread
        10.4 Provider connections: kept alive, timed out, and their answers' heads
    11. Daemon
        11.1 The server in the foreground: signals, the config watched, usage kept
        11.2 Logs, and the files in ~/.ccproxy: pidfile and locks
        11.3 The background server: found, started, stopped
    12. CLI
        12.1 Arguments, and the config a command runs on
        12.2 start, and what --check --probe finds
        12.3 stop and status
        12.4 env and code: Claude Code through the proxy
        12.5 version, and main
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import codecs
import collections
import copy
import difflib
import email.parser
import email.utils
import errno
import functools
import gc
import hashlib
import hmac
import http
import http.client
import io
import ipaddress
import itertools
import json
import logging
import logging.handlers
import math
import os
import queue
import random
import re
import shutil
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings

__version__ = "0.1.0"
__all__ = ["serve_in_thread", "ProxyThread", "ProxyServer", "Config", "ConfigError",
           "load_config", "build_config", "estimate_request_tokens", "main", "__version__"]

log = logging.getLogger("ccproxy")



###############################################################################
# 1. Constants
###############################################################################

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3456
MAX_HEADER_BYTES = 64 * 1024
MAX_CHUNK_LINE_BYTES = 4096                      # a chunk's size line, or a trailer line
TLS_HANDSHAKE_RECORD = b"\x16"                   # how a TLS client's first byte looks
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024        # Anthropic's own request size limit
DEFAULT_HEADER_TIMEOUT_SECONDS = 30.0
DEFAULT_KEEPALIVE_TIMEOUT_SECONDS = 75.0
DEFAULT_BODY_TIMEOUT_SECONDS = 120.0             # a whole request body, however it trickles in
DEFAULT_REQUEST_TIMEOUT_SECONDS = 600.0          # inactivity: a whole answer may stream for minutes
DEFAULT_WORKER_THREADS = 1024                    # one per upstream call being sent (~16 KB each)
DEFAULT_SHUTDOWN_TIMEOUT_SECONDS = 30.0          # in-flight answers may finish this long on stop
DEFAULT_LONG_CONTEXT_TOKENS = 60000              # above this, the longContext route applies
WINDOW_ESTIMATE_MARGIN = 0.10                    # the token estimate may be this much too high
LOADED_WINDOWS_EVERY_SECONDS = 10.0              # Ollama's /api/ps is asked at most this often
OLLAMA_CODING_CONTEXT = 64000                    # what Ollama advises for coding tools
MAX_MODELS_REMEMBERED = 256                      # per provider: models asked to load (Ollama),
                                                 # and those it said something of (limits,
                                                 # fields, how their answers begin)
OFFLOADED_BODY_BYTES = 1024 * 1024               # a request this large is read, checked, routed
                                                 # and translated on a worker thread
RETRY_BASE_SECONDS = 0.25                        # first backoff; doubles per retry
RETRY_CAP_SECONDS = 8.0
MAX_RATE_BUCKETS = 10000                         # clients tracked by the rate limiter
LISTEN_BACKLOG = 1024                            # connections the kernel queues before accept
RESERVED_FILE_DESCRIPTORS = 64                   # kept free for upstream calls, logs, config
MAX_AUTO_CONNECTIONS = 10000                     # the automatic connection limit stops here
MIN_AUTO_CONNECTIONS = 16
FALLBACK_MAX_CONNECTIONS = 1000                  # where the descriptor limit cannot be read
ACCEPT_RETRY_SECONDS = 1.0                       # pause after accept() ran out of descriptors
MAX_FILE_LIMIT = 65536                           # the server raises its descriptor limit to this
LATENCY_BUCKETS_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CIRCUIT_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}
BODY_READ_SLICE_BYTES = 1024 * 1024
LINGER_SECONDS = 2.0                             # an early answer: the rest of its request dropped
UPSTREAM_READ_BYTES = 64 * 1024
UPSTREAM_ERROR_BODY_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 64 * 1024 * 1024              # a whole answer, read at most this far
ANSWER_SLICE_BYTES = 64 * 1024                   # one read of an answer of no stated length
UPSTREAM_JOINED_BODY_BYTES = 64 * 1024           # a request body up to this goes with its head
STREAM_QUEUE_CHUNKS = 64                         # chunks a slow client may leave unread per stream
STREAM_PING_SECONDS = 15.0                       # a ping to the client after this much silence
UPSTREAM_IDLE_SECONDS = 30.0                     # an idle provider connection is kept this long
UPSTREAM_IDLE_WHEN_QUIET = 16                    # idle connections per provider host kept once
                                                 # the server is quiet; while busy, up to
UPSTREAM_IDLE_SHARE = 8                          # 1/8 of max_connections in all
DEFAULT_ANTHROPIC_VERSION = "2023-06-01"
CONFIG_SEARCH_PATHS = ("./config.json", "~/.ccproxy/config.json", "/etc/ccproxy/config.json",
                       "~/.claude-code-router/config.json")     # the last converted when read
USER_AGENT = "ccproxy/" + __version__
LOG_FILE_MAX_BYTES = 10 * 1024 * 1024            # the detached log rotates at this size
LOG_FILE_BACKUPS = 3
PROBE_TIMEOUT_SECONDS = 15.0                     # `start --check --probe` waits this long
START_WAIT_SECONDS = 15.0                        # `start` waits this long for /health
STOP_POLL_SECONDS = 0.05
START_FAILURE_LINES = 15                         # of its stderr and log, when `start` fails
STOP_REPORT_SECONDS = 2.0                        # `stop` says it is still waiting this often
STATUS_SESSIONS_SHOWN = 5                        # `status` lists this many recent sessions
STATUSLINE_TIMEOUT_SECONDS = 0.5                 # `status --statusline` waits this long
STATUSLINE_INPUT_BYTES = 1024 * 1024
STATUSLINE_REMOTE_TIMEOUT_SECONDS = 2.0          # the same, for a team's proxy across a network
STATUSLINE_MAX_CHARS = 200                       # of a line a team's proxy sends
STOP_MARGIN_SECONDS = 5.0                        # beyond shutdown_timeout before a kill
SESSION_CHECK_SECONDS = 2.0                      # how often a proxy `code` started checks leases
START_LOCK_QUIET_SECONDS = 1.0                   # then `code` and `start` say what they wait for
START_LOCK_WAIT_SECONDS = 120.0                  # at most this long for another start or stop
CONFIG_WATCH_SECONDS = 2.0                       # how often the config file is checked for edits
CLAUDE_API_TIMEOUT_MS = 3000000                  # Claude Code's own request timeout, 50 minutes
CLAUDE_MIN_COMPACT_WINDOW = 100000               # Claude Code reads a smaller window as this
CLAUDE_DEFAULT_MAX_OUTPUT_TOKENS = 64000         # the least max_tokens Claude Code 2.1 sends
WINDOWS_QUERY_LIMITED_INFORMATION = 0x1000
WINDOWS_STILL_ACTIVE = 259

ERROR_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "api_error",
    502: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

# An Anthropic error type -> its status, for an error that came without one (an error event).
STATUS_BY_ERROR_TYPE = {kind: status for status, kind in ERROR_TYPE_BY_STATUS.items()
                        if status in (400, 401, 402, 403, 404, 413, 429, 500, 504, 529)}

# Upstream status -> the status the client sees: the Messages API's own statuses; a gateway's
# "503 unavailable" as Anthropic's 529 (overloaded, which clients retry); 422 as 400.
CLIENT_STATUS_BY_UPSTREAM_STATUS = {
    400: 400, 401: 401, 402: 402, 403: 403, 404: 404, 408: 504, 413: 413, 422: 400, 429: 429,
    500: 500, 502: 502, 503: 529, 504: 504, 529: 529,
}

REASON_PHRASES = {status.value: status.phrase for status in http.HTTPStatus}
REASON_PHRASES[529] = "Overloaded"

# Request headers that are passed on to an Anthropic-protocol provider; everything else
# (the client's key, hop-by-hop headers, Accept-Encoding) stays here.
ANTHROPIC_FORWARDED_HEADERS = ("anthropic-version", "anthropic-beta")
# What Claude Code says of a request's origin (2.1.197 and 2.1.330 send these): its session, and
# on a subagent's requests that agent's id (a nested one adds its parent's).
SESSION_ID_HEADER = "x-claude-code-session-id"
AGENT_ID_HEADER = "x-claude-code-agent-id"
# Response headers relayed back from an Anthropic-protocol provider.
RELAYED_RESPONSE_HEADERS = ("request-id", "retry-after")
RELAYED_RESPONSE_HEADER_PREFIX = "anthropic-ratelimit-"


def json_text_function(separators=(", ", ": ")):
    """json.dumps(value, ensure_ascii=False, separators=separators) with its C encoder made
    once: json.dumps makes one at every call, over half of what a small event costs."""
    make = json.encoder.c_make_encoder
    if make is None:                   # a Python built without the _json module
        return lambda value: json.dumps(value, ensure_ascii=False, separators=separators)
    encode = make(None, json.JSONEncoder().default, json.encoder.encode_basestring, None,
                  separators[1], separators[0], False, False, True)
    return lambda value: "".join(encode(value, 0))


JSON_TEXT = json_text_function()                   # as Anthropic writes it: {"a": 1, "b": 2}
COMPACT_JSON_TEXT = json_text_function((",", ":"))   # {"a":1,"b":2}



###############################################################################
# 2. Errors
###############################################################################

class ProxyError(Exception):
    """An error a client sees, and its answer: status, Anthropic error type, message, extra
    headers. Each status ccproxy answers with has a class below (error_for_status() picks one
    for a status that comes from a provider); an error answers for itself, as a response
    before a stream has begun and as an SSE `error` event after."""

    status = 500
    # Retrying cannot mend it (a configuration problem, a wrong key): clients are told so with
    # x-should-retry: false, which Claude Code and Anthropic's SDKs obey instead of retrying
    # for minutes; failover still moves on, since another provider may serve.
    final = False
    kind = ""                 # a failure treated apart: "missing_model" (failover), "over_plan"
                              # (a key pool does not rest the key)

    def __init__(self, message: str, headers=()):
        super().__init__(message)
        self.message = message
        self.headers = list(headers)

    def made_final(self):
        """This error, marked final."""
        self.final = True
        return self

    @property
    def error_type(self) -> str:
        return ERROR_TYPE_BY_STATUS.get(self.status, "api_error" if self.status >= 500
                                        else "invalid_request_error")

    def body(self, request_id: str = "") -> bytes:
        """The Anthropic error JSON: {"type":"error","error":{"type":…,"message":…}}."""
        payload = {"type": "error", "error": {"type": self.error_type, "message": self.message}}
        if request_id:
            payload["request_id"] = request_id
        return JSON_TEXT(payload).encode()

    def response(self, request_id: str) -> Response:
        """The error as a whole answer."""
        return Response(self.status, self.body(request_id),
                        self.headers + ([("x-should-retry", "false")] if self.final else []))

    def event(self) -> bytes:
        """The error as an SSE `error` event, for a stream that has already begun."""
        return b"event: error\ndata: " + self.body() + b"\n\n"

    def retry_after(self) -> float | None:
        """Seconds from the error's retry-after header, if it has one: a number of seconds or
        an HTTP date (RFC 9110 allows both); a day at most ("inf" or "nan" from a provider
        would rest a key for good)."""
        for name, value in self.headers:
            if name == "retry-after":
                seconds = seconds_of_retry_after(value)
                return min(max(seconds, 0.0), 86400.0) if math.isfinite(seconds) else None
        return None


def seconds_of_retry_after(value: str) -> float:
    """A Retry-After value in seconds from now; NaN when it is neither seconds nor a date."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError, IndexError, OverflowError):
        return math.nan


class InvalidRequestError(ProxyError):
    """The request is malformed or cannot be expressed (400)."""
    status = 400


class AuthenticationError(ProxyError):
    """The proxy key is missing or wrong, or a provider refused its key (401)."""
    status = 401


class BillingError(ProxyError):
    """A provider wants payment (402)."""
    status = 402


class PermissionDeniedError(ProxyError):
    """The client may not do this (403)."""
    status = 403


class NotFoundError(ProxyError):
    """No such endpoint, provider or model (404)."""
    status = 404


class MethodNotAllowedError(ProxyError):
    """The path exists, the method does not; the `allow` header lists those that do (405)."""
    status = 405


class RequestTimeoutError(ProxyError):
    """The client was too slow to send its request (408)."""
    status = 408


class ConflictError(ProxyError):
    """A change that clashes with the configuration as it is (409)."""
    status = 409


class RequestTooLargeError(ProxyError):
    """The request body is over the size limit (413)."""
    status = 413


class RateLimitError(ProxyError):
    """Too many requests, from this client or at the provider (429, with retry-after)."""
    status = 429


class HeaderTooLargeError(ProxyError):
    """The request head is over the size limit (431)."""
    status = 431


class InternalError(ProxyError):
    """Something failed inside ccproxy or at the provider (500)."""
    status = 500

    def __init__(self, message: str = "internal error in ccproxy; see its log", headers=()):
        super().__init__(message, headers)


class UpstreamError(ProxyError):
    """The provider could not be reached, broke the connection or answered nonsense (502)."""
    status = 502


class UpstreamTimeoutError(ProxyError):
    """The provider stayed silent for request_timeout (504)."""
    status = 504


class OverloadedError(ProxyError):
    """A provider is overloaded or skipped for now, or ccproxy is shutting down (529)."""
    status = 529


class RelayedError(ProxyError):
    """A provider's own Anthropic-shaped error, answered with its status and body unchanged."""

    def __init__(self, status: int, body: bytes, headers=()):
        try:
            inner = json.loads(body).get("error") or {}
        except (ValueError, AttributeError, RecursionError):
            inner = {}
        message = inner.get("message") if isinstance(inner, dict) else None
        super().__init__(message if isinstance(message, str) else "HTTP %d" % status, headers)
        self.status = status
        self._body = body

    def body(self, request_id: str = "") -> bytes:
        return self._body


ERROR_CLASS_BY_STATUS = {error.status: error for error in (
    InvalidRequestError, AuthenticationError, BillingError, PermissionDeniedError, NotFoundError,
    MethodNotAllowedError, RequestTimeoutError, ConflictError, RequestTooLargeError,
    RateLimitError, HeaderTooLargeError, InternalError, UpstreamError, UpstreamTimeoutError,
    OverloadedError)}


def error_for_status(status: int, message: str, headers=()) -> ProxyError:
    """The error of a status that came from elsewhere: its class, else 500 or 400 by range."""
    error_class = ERROR_CLASS_BY_STATUS.get(status) or (
        InternalError if status >= 500 else InvalidRequestError)
    return error_class(message, headers)


class ClientDisconnected(Exception):
    """The client went away; nothing more can be written to it."""


class ConfigError(Exception):
    """A mistake in the operator's configuration; the message names the file and the key."""


def mask_secret(secret: str) -> str:
    """Show just enough of a key to recognise it: 'sk-a…wxyz'; keys under 20 characters
    become '****'."""
    if not secret:
        return ""
    if len(secret) < 20:
        return "****"
    return secret[:4] + "…" + secret[-4:]


def secret_forms(secret: str) -> set:
    """Every way a secret may be written into a message: as is, escaped the way repr() and JSON
    escape it (a key with a stray newline shows up as `sk-…\\n`), URL-encoded, and base64."""
    forms = {secret, json.dumps(secret)[1:-1], repr(secret)[1:-1],
             repr(secret.encode("utf-8", "surrogatepass"))[2:-1],
             urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret, safe="")}
    forms.update(base64_forms(secret.encode("utf-8", "surrogatepass")))
    return {form for form in forms if form}


def base64_forms(secret: bytes) -> set:
    """What any base64 text (standard or URL-safe) that holds the secret always reads, at each
    of the three places in a 3-byte group it may start (`Basic base64("user:" + key)` holds a
    key after five bytes): the characters that encode its bits and no others'."""
    forms = set()
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + secret).decode()
        start, end = -(-8 * offset // 6), 8 * (offset + len(secret)) // 6
        if end - start >= 16:                     # shorter could be anything's base64
            forms.update((encoded[start:end], encoded[start:end].translate(BASE64_URL_SAFE)))
    return forms


BASE64_URL_SAFE = str.maketrans("+/", "-_")


# A shorter "secret" is a placeholder (`ollama`, `EMPTY`) or a flag (`1`, `true`): sought in
# text, it would mask every word that holds it. It is still never shown where it is a value.
MIN_SEARCHED_SECRET_CHARS = 8


class SecretMasker:
    """Replaces every form of every secret it knows by the secret's masked form, in one pass."""

    def __init__(self, secrets=()):
        masked = {}
        for secret in secrets:
            if len(secret) >= MIN_SEARCHED_SECRET_CHARS:
                masked.update((form, mask_secret(secret)) for form in secret_forms(secret))
        self._masked = masked
        forms = sorted(masked, key=len, reverse=True)       # longest first: no partial hits
        self._pattern = re.compile("|".join(map(re.escape, forms))) if forms else None

    def text(self, text: str) -> str:
        """text with every secret masked."""
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda match: self._masked[match.group()], text)

    def data(self, data: bytes) -> bytes:
        """data with every secret masked; the same object when none occurs."""
        if self._pattern is None:
            return data
        text = data.decode("utf-8", "replace")
        masked = self.text(text)
        return data if masked == text else masked.encode()


def upstream_error_message(body: bytes) -> str:
    """The most useful message in an upstream error body, whatever its shape: error.message
    (OpenAI, Anthropic, Gemini), a bare error string, message or detail, or an HTML page's
    words."""
    text = body[:UPSTREAM_ERROR_BODY_BYTES].decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
        if isinstance(inner, str):
            return inner
        for key in ("message", "detail", "Message"):
            if isinstance(data.get(key), str):
                return data[key]
    text = re.sub(r"<[^>]*>", " ", text)           # an HTML error page: keep its words
    return " ".join(text.split())[:1000] or "(empty body)"


def error_from_upstream(provider, status: int, body: bytes, headers=()) -> ProxyError:
    """The error the client sees for an upstream error answer: the status mapped, the
    provider's own message kept (without secrets), a retry-after passed on."""
    if status in CLIENT_STATUS_BY_UPSTREAM_STATUS:
        client_status = CLIENT_STATUS_BY_UPSTREAM_STATUS[status]
    else:
        client_status = 500 if status >= 500 else 400
    message = "%s: HTTP %d: %s" % (provider.name, status, upstream_error_message(body))
    kept = [(k, v) for k, v in headers if k == "retry-after"]
    return error_for_status(client_status, provider.masker.text(message), kept)



###############################################################################
# 3. Config
###############################################################################


# -----------------------------------------------------------------------------
# 3.1 Reading: JSONC, ${VAR}, durations, layers
# -----------------------------------------------------------------------------

DEFAULT_CONFIG = {
    "host": DEFAULT_HOST,
    "port": DEFAULT_PORT,
    "apikey": "",
    "admin_key": "",
    "client_keys": {},
    "log": False,
    "log_file": "~/.ccproxy/ccproxy.log",
    "log_bodies": False,
    "usage_file": "",
    "failover": True,
    "providers": [],
    "routes": {},
    "security": {"allowed_ips": []},
    "management": {"read_only": False},
    "performance": {
        "request_timeout": DEFAULT_REQUEST_TIMEOUT_SECONDS,
        "header_timeout": DEFAULT_HEADER_TIMEOUT_SECONDS,
        "keepalive_timeout": DEFAULT_KEEPALIVE_TIMEOUT_SECONDS,
        "body_timeout": DEFAULT_BODY_TIMEOUT_SECONDS,
        "shutdown_timeout": DEFAULT_SHUTDOWN_TIMEOUT_SECONDS,
        "drain_delay": 0.0,
        "max_request_body_size": DEFAULT_MAX_BODY_BYTES,
        "max_connections": 0,
        "worker_threads": DEFAULT_WORKER_THREADS,
        "max_retries": 0,
        "retry_budget": 30.0,
        "metrics_enabled": False,
        "rate_limit_enabled": False,
        "rate_limit_rpm": 60,
        "rate_limit_burst": 20,
        "circuit_breaker_enabled": False,
        "circuit_breaker_threshold": 5,
        "circuit_breaker_cooldown": 30.0,
    },
}


BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "on": True,
                 "false": False, "0": False, "no": False, "off": False, "": False}

# Environment variables of the original's table, in the order they apply (later wins):
# variable -> (key, kind of value). LOG is a common name that other tools use too, so a
# value that is not a boolean is ignored with a warning rather than refused.
ENV_SETTINGS = (
    ("LOG", "log", "lenient bool"),
    ("CCPROXY_LOG", "log", "bool"),
    ("CCPROXY_HOST", "host", "text"),
    ("CCPROXY_PORT", "port", "port"),
    ("CCPROXY_API_KEY", "apikey", "text"),
    ("CCPROXY_ADMIN_KEY", "admin_key", "text"),
    ("CCPROXY_LOG_FILE", "log_file", "text"),
)
PROVIDER_KEY_ENV_RE = re.compile(r"^CCPROXY_PROVIDERS_(\d{1,9})_API_KEY$")

JSONC_TOKEN_RE = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*|/\*[\s\S]*?(?:\*/|$)')
JSONC_TRAILING_COMMA_RE = re.compile(r'"(?:\\.|[^"\\])*"|,(?=\s*[}\]])')
JSONC_BARE_KEY_RE = re.compile(r'"(?:\\.|[^"\\])*"|([{,]\s*)([A-Za-z_$][\w$]*)(\s*:)')
ENV_REFERENCE_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
DURATION_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_DURATION_SECONDS = 30 * 86400     # longer is a slip (and past what a socket's time-out takes)


def parse_jsonc(text: str, source: str):
    """Parse JSON that may carry // and /* */ comments, trailing commas and unquoted keys (as
    Claude Code Router's JSON5 files may).

    Comments become blanks of the same shape, so the line of a syntax error still points into
    the file as the user wrote it.
    """
    def blank(match):
        token = match.group()
        if token.startswith('"'):
            return token
        return re.sub(r"[^\n]", " ", token)

    text = JSONC_TOKEN_RE.sub(blank, text)
    text = JSONC_TRAILING_COMMA_RE.sub(lambda m: m.group() if m.group() != "," else " ", text)
    text = JSONC_BARE_KEY_RE.sub(lambda m: '%s"%s"%s' % m.groups() if m.group(2) else m.group(),
                                 text)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError("%s: not valid JSON: %s" % (source, exc)) from None
    except RecursionError:
        raise ConfigError(TOO_DEEP % source) from None


MAX_CONFIG_DEPTH = 32
TOO_DEEP = "%%s: nested more than %d levels deep; a config needs a few" % MAX_CONFIG_DEPTH


def nesting_depth(value) -> int:
    """How many levels a parsed JSON value has, counted level by level (not by recursion,
    which a deep one would exhaust)."""
    depth, level = 0, [value]
    while level:
        depth += 1
        level = [child for node in level if isinstance(node, (dict, list))
                 for child in (node.values() if isinstance(node, dict) else node)]
    return depth


def expand_env_references(value, path: str, source: str, environ):
    """Replace ${VAR} (or ${VAR:-default}) in every string of a parsed config; one error names
    every variable that is not set."""
    unset = []
    expanded = expanded_references(value, path, environ, unset)
    if unset:
        raise ConfigError("\n".join("%s: %s: environment variable %s is not set" % (
            source, where, name) for where, name in unset))
    return expanded


def expanded_references(value, path: str, environ, unset: list):
    """value with its ${VAR} references replaced; (path, VAR) of each one not set, to unset."""
    if isinstance(value, dict):
        return {k: expanded_references(v, join_key(path, k), environ, unset)
                for k, v in value.items()}
    if isinstance(value, list):
        return [expanded_references(v, "%s[%d]" % (path, i), environ, unset)
                for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match):
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is None:
            unset.append((path, name))
        return default or ""

    return ENV_REFERENCE_RE.sub(substitute, value)


def join_key(path: str, key: str) -> str:
    """A key path: join_key("performance", "port") is "performance.port", and
    join_key("api_keys", "[1]") is "api_keys[1]"."""
    return "%s%s%s" % (path, "" if key.startswith("[") else ".", key) if path else key


def parse_duration(value, zero: bool = False) -> float:
    """Seconds from 30, 2.5, "30s", "5m", "1h30m" or "500ms" (0 too, with zero), up to 30
    days; raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = DURATION_PART_RE.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError("not a duration") from None
            seconds = sum(float(n) * DURATION_UNIT_SECONDS[u] for n, u in parts)
    if seconds != seconds:                              # "nan"
        raise ValueError("not a duration")
    if seconds < 0 or (seconds == 0 and not zero):
        raise ValueError("must be more than zero")
    if seconds > MAX_DURATION_SECONDS:                  # "inf" too
        raise ValueError("must be %d days or less" % (MAX_DURATION_SECONDS // 86400))
    return seconds


def parse_bool(text: str) -> bool:
    """true/false, 1/0, yes/no, on/off, as environment variables write them."""
    try:
        return BOOLEAN_WORDS[text.strip().lower()]
    except KeyError:
        raise ValueError("not a boolean (true/false)") from None


def parse_port_text(text: str) -> int:
    """A port number written out, as an environment variable holds it."""
    if not (text.isascii() and text.strip().isdigit()):
        raise ValueError("not a port number")
    return int(text)


ENV_VALUE_PARSERS = {"text": str, "bool": parse_bool, "lenient bool": parse_bool,
                     "port": parse_port_text}


def find_config_file(explicit: str | None, environ, notes: list) -> str | None:
    """The config file to read: --config, else CCPROXY_CONFIG, else the first of the search
    paths that exists. ./config.json counts only when it is a router's config (a project's
    own config.json is not): one skipped adds a line to notes naming the file used instead."""
    named = explicit or environ.get("CCPROXY_CONFIG")
    if named:
        path = os.path.expanduser(named)
        if not os.path.isfile(path):
            raise ConfigError("%s: %s" % (named, "a directory, not a config file"
                                          if os.path.isdir(path) else "config file not found"))
        return os.path.abspath(path)        # written back later, whatever the working directory
    found, skipped = None, None
    for candidate in CONFIG_SEARCH_PATHS:
        path = os.path.abspath(os.path.expanduser(candidate))
        if os.path.isfile(path):
            why_not = None if candidate != "./config.json" else not_a_router_config(path)
            if why_not is None:
                found = path
                break
            skipped = skipped or "%s skipped: %s" % (path, why_not)
    if skipped:
        notes.append("%s; using %s" % (skipped, found or "built-in defaults"))
    return found


def not_a_router_config(path: str) -> str | None:
    """Why the file is not a config for ccproxy (or for Claude Code Router), or None when it is:
    it names providers or routes, or every key it has is one of ccproxy's."""
    try:
        content = read_config_file(path)
    except ConfigError as exc:
        return str(exc).split(": ", 1)[-1]
    if set(content) & {"providers", "routes", "Providers", "Router"}:
        return None
    if content and set(content) <= set(DEFAULT_CONFIG):
        return None
    return "not a ccproxy config (it has no providers or routes)"


def read_config_file(path: str) -> dict:
    """Read and parse one config file (${VAR} references left as written)."""
    try:
        with open(path, "rb") as handle:
            text = config_text(handle.read(), path)
    except OSError as exc:
        raise ConfigError("%s: cannot read: %s" % (path, exc)) from None
    raw = parse_jsonc(text, path)
    if not isinstance(raw, dict):
        raise ConfigError("%s: the top level must be a JSON object" % path)
    return raw


def config_text(data: bytes, path: str) -> str:
    """A config file's text: UTF-8, with or without a byte order mark, or UTF-16 with one
    (what Windows PowerShell 5's `>` and `Out-File` write); anything else is refused, saying
    where it stops being UTF-8."""
    encoding = "utf-16" if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise ConfigError("%s: cannot read: not UTF-8 text (byte 0x%02x at offset %d); save it "
                          "as UTF-8" % (path, data[exc.start], exc.start)) from None


def merge_config(base: dict, override: dict) -> dict:
    """Deep-merge override into a copy of base: nested objects merge, other values replace."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_config(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_environment(raw: dict, environ, origins: dict, warnings: list) -> dict:
    """Layer the original's environment variables over the file's values."""
    raw = dict(raw)
    for variable, key, kind in ENV_SETTINGS:
        if variable not in environ:
            continue
        text = environ[variable]
        try:
            raw[key] = ENV_VALUE_PARSERS[kind](text)
        except ValueError as exc:
            if kind != "lenient bool":
                raise ConfigError("%s: %s: %r" % (variable, exc, text)) from None
            warnings.append("%s: %s: %r; ignored" % (variable, exc, text))
            continue
        origins[key] = variable
    entries = raw.get("providers")
    providers = [dict(p) if isinstance(p, dict) else p for p in entries] \
        if isinstance(entries, list) else []
    for variable in sorted(environ):
        match = PROVIDER_KEY_ENV_RE.match(variable)
        if not match:
            continue
        index = int(match.group(1))
        if index >= len(providers) or not isinstance(providers[index], dict):
            warnings.append("%s: there is no providers[%d]; ignored" % (variable, index))
            continue
        providers[index]["api_key"] = environ[variable]
        origins["providers[%d].api_key" % index] = variable
    if providers:
        raw["providers"] = providers
    return raw


def apply_flags(raw: dict, flags: dict, origins: dict) -> dict:
    """Layer command-line flags (host, port) over everything else."""
    raw = dict(raw)
    for key, value in flags.items():
        if value is not None:
            raw[key] = value
            origins[key] = "--" + key
    return raw


def file_signature(path: str | None) -> tuple | None:
    """What tells a file's versions apart (modification time and size: a file system that
    keeps the time to the second or two may give an edit the time of the write before it), or
    None when there is no such file."""
    try:
        stat = os.stat(path) if path else None
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size) if stat else None


# -----------------------------------------------------------------------------
# 3.2 The configuration: providers, routes, limits
# -----------------------------------------------------------------------------

# Effort levels of a request (output_config.effort), lowest first; a provider's scale names
# those it has (effort -> its own value) and each request takes the highest it has at or
# below what was asked (the lowest when it has none below). Checked 2026-12-05:
#   OpenAI reasoning_effort, https://platform.openai.com/docs/guides/reasoning: low, medium,
#   high; xhigh on gpt-5.1-codex-max, gpt-5.2 on and the GPT-6 models (checked 2026-12-07 on
#   developers.openai.com/api/docs/models/gpt-6-sol and gpt-6.2-sol: none to xhigh, and a max
#   that Chat Completions does not take). OpenRouter reasoning.effort,
#   https://openrouter.ai/docs/use-cases/reasoning-tokens: up to xhigh. Groq's gpt-oss:
#   low, medium, high (https://console.groq.com/docs/reasoning). xAI, https://docs.x.ai/:
#   grok-4.7 low to xhigh, grok-3-mini low and high. Gemini thinkingLevel,
#   https://ai.google.dev/gemini-api/docs/thinking: low and high on Gemini 3 Pro, with medium on
#   Gemini 3 Flash; Gemini 2.5 takes a thinkingBudget instead (GEMINI_BUDGET_BY_EFFORT).
#   Mistral reasoning_effort, https://docs.mistral.ai/capabilities/reasoning/ (checked
#   2026-12-06): "high" (thinks, and says so) or "none", on mistral-small-latest (Small 4,
#   mistral-small-2603) and mistral-medium-3-5; "high" is its advice for agents and code.
EFFORTS = ("low", "medium", "high", "xhigh", "max")
EFFORTS_TO_HIGH = {"low": "low", "medium": "medium", "high": "high"}
EFFORTS_TO_XHIGH = dict(EFFORTS_TO_HIGH, xhigh="xhigh")
OPENAI_EFFORT_SCALES = ((r"^gpt-(?:5\.(?:[2-9]|1-codex-max)|6)", EFFORTS_TO_XHIGH),
                        (r"^(o\d|gpt-5)", EFFORTS_TO_HIGH))
# The least reasoning each asks for, sent when a request turns thinking off (Claude Code's side
# requests do, with a few dozen output tokens, which a model reasoning at its default, medium,
# can spend before it writes a word): "none" (no reasoning) for gpt-5.1, gpt-5.2, gpt-5.4-mini
# and -nano and gpt-5.5, "minimal" for the first gpt-5 models (before gpt-5.1 none is refused),
# "low" for the o-series. Checked 2026-12-06 in Azure's copy of OpenAI's reasoning_effort
# (learn.microsoft.com/en-us/javascript/api/@azure/ai-projects/reasoningeffort) and OpenAI's
# own 400, which lists what gpt-5.1 takes ("'none', 'low', 'medium', and 'high'"); other gpt-5.x,
# codex and pro models keep their default. GPT-6 Sol and Luna take "none"; GPT-6 Astra, 6.1 Sol
# and 6.2 Sol refuse it ("The API rejects requests that set reasoning effort to none",
# developers.openai.com/api/docs/models/gpt-6.2-sol, checked 2026-12-07), and think least at
# "low".
OPENAI_THINKING_OFF = (
    (r"^gpt-5\.(?:[125]|4-(?:mini|nano))(?:-mini|-nano)?(?:-\d{4}-\d\d-\d\d)?$", "none"),
    (r"^gpt-6-(?:sol|luna)(?:-\d{4}-\d\d-\d\d)?$", "none"),
    (r"^gpt-6(?:\.\d+)?-(?:astra|sol)(?:-\d{4}-\d\d-\d\d)?$", "low"),
    (r"^gpt-5(?:-mini|-nano)?(?:-\d{4}-\d\d-\d\d)?$", "minimal"),
    (r"^o\d(?:-mini)?(?:-\d{4}-\d\d-\d\d)?$", "low"))
# The models OpenAI serves only on the Responses API: the Responses-only entries of the
# official SDK's ResponsesModel (openai-python 3.63, types/shared/responses_model.py) and the
# codex family (platform.openai.com/docs/models, checked 2026-12-05); and the GPT-6 models,
# which call functions on Chat Completions only while reasoning is off ("Use the Responses API
# for built-in tools and function calling. Chat Completions supports function calling only with
# reasoning_effort set to none": developers.openai.com/api/docs/models/gpt-6-sol, checked
# on 2026-12-07), where Claude Code sends tools at every turn and thinks at most of them.
OPENAI_RESPONSES_MODELS = (r"^(o\d+-pro|o\d+(-mini)?-deep-research|computer-use|codex-|"
                           r"gpt-[\d.]+-(pro|codex|cyber|rosalind)|gpt-[\d.]+-\w+-codex|"
                           r"gpt-rosalind|gpt-[\d.]+-(astra|sol)-|gpt-daybreak|gpt-6)")
# Prompt caching (https://platform.openai.com/docs/guides/prompt-caching, checked 2026-12-05):
# automatic from 1,024 tokens; prompt_cache_key groups a session's calls; prompt_cache_retention
# "24h" (extended caching) on the gpt-5 family and gpt-4.1, in both APIs. A tool call's id is
# at most 40 characters ("Invalid 'messages[3].tool_calls[0].id': string too long. Expected a
# string with maximum length 40", code string_above_max_length: its refusal, quoted in
# agno-agi/agno#5382 and microsoft/autogen#6377), as Azure's (Portkey-AI/gateway#1062).
OPENAI_QUIRKS = {"reasoning_models": r"^(o\d|gpt-[56])", "reasoning_style": "effort",
                 "effort_scales": OPENAI_EFFORT_SCALES, "thinking_off": OPENAI_THINKING_OFF,
                 "system_anywhere": True, "tool_id_style": "max40",
                 "responses_models": OPENAI_RESPONSES_MODELS, "prompt_cache_key": True,
                 "cache_retention_models": r"^(gpt-5|gpt-4\.1)"}
GEMINI_EFFORT_SCALES = ((r"^gemini-3[\w.-]*flash", EFFORTS_TO_HIGH),
                        (r"^gemini-3", {"low": "low", "high": "high"}))
# The least thinking each does, for a request that turns thinking off (checked 2026-12-06,
# ai.google.dev/gemini-api/docs/thinking): 2.5 Flash and Flash-Lite none (a budget of 0), 2.5 Pro
# its smallest budget, 128; Gemini 3 cannot stop thinking, and "low" is the least level Pro and
# Flash both take (Flash also takes "minimal").
GEMINI_THINKING_OFF = ((r"^gemini-3", "low"), (r"^gemini-2\.5-flash", 0),
                       (r"^gemini-2\.5-pro", 128))
# Mistral's models think or not: any effort asked for is its "high".
MISTRAL_EFFORT_SCALES = ((r"^(mistral-small-(latest|26\d\d)|mistral-medium-3-5)$",
                          {"low": "high"}),)


# What a provider's server accepts; a preset overrides what its server does otherwise.
PROVIDER_QUIRKS = {
    "reasoning_models": None,   # model ids (regex) that take max_completion_tokens, no sampling
    "reasoning_style": None,    # how thinking is asked for: "effort", "deepseek", "openrouter"
    "reasoning_replay": False,  # thinking goes back as reasoning_content on tool-call turns
                                # (or, "all", on every turn)
    "reasoning_details": False,  # reasoning_details (signed, encrypted) go back on the next turn
    "stream_usage": True,       # accepts stream_options.include_usage
    "user_field": True,         # accepts `user` (metadata.user_id)
    "top_k": False,             # accepts top_k
    "vision": True,             # accepts image parts: True, False or the model ids (regex) that do
    "files": True,              # accepts file parts (PDFs)
    "json_schema": True,        # accepts a json_schema response_format (else: json_object)
    "tool_id_style": None,      # "alnum9": tool call ids are 9 letters or digits; "max40": at
                                # most 40 characters
    "user_after_tool": True,    # accepts a user message right after tool messages
    "system_anywhere": False,   # accepts system messages after the first (see fold_system)
    "schema_drop_keys": (),     # top-level tool schema keys the server rejects
    "thinking_level_models": None,  # Gemini model ids (regex) that take thinkingLevel
    "effort_scales": (),        # (model regex, {effort: the provider's value}) for the first match
    "thinking_off": (),         # (model regex, the value for no thinking) for the first match
    "search": None,             # how it searches the web: "web_search_options", "web_plugin"
    "search_models": None,      # model ids (regex) that can search with web_search_options
    "responses_search": False,  # its Responses API runs OpenAI's web_search tool
    "cache_control_models": None,   # model ids (regex) whose text parts keep cache_control
    "api": None,                # "responses": every model goes to the Responses API
    "responses_models": None,   # model ids (regex) that go to the Responses API
    "azure": None,              # {api_version, deployments} for an Azure OpenAI resource
    "anthropic_compat": None,   # for a server that copies Anthropic's API: what it lacks (below)
    "prompt_cache_key": False,  # takes prompt_cache_key (a session's calls share cache routing)
    "cache_retention_models": None,  # model ids (regex) that keep a cache 24 hours when asked
    "reports_cost": False,      # usage.cost is what the answer cost (note_reported_cost)
    "loaded_windows": False,    # /api/ps says each loaded model's context length (Ollama's)
    "thought_signatures": False,    # calls carry Gemini's thought signature (its OpenAI API)
    "text_tool_calls": False,   # tool calls its model writes in the text are read (TextToolCalls)
}

# What a server that copies Anthropic's Messages API lacks, as its preset or its entry's
# `compatible` says (each key's default here). Whatever it says, thinking it did not make
# itself is not sent to it, and the signatures of its own thinking are marked on the way out so
# that no other provider gets them.
ANTHROPIC_COMPAT = {
    "auth": "x-api-key",        # how the key goes: "x-api-key" or "bearer"
    "drop_betas": False,        # leave out the anthropic-beta header
    "drop_fields": (),          # request fields it rejects or ignores
    "no_blocks": (),            # block types it takes nowhere (tool results included): as text
    "thinking_with_calls": False,   # in thinking mode, tool calls want a thinking block first
    "thinks_unasked": False,    # thinks when a request does not say: told not to instead
    "effort_needs_thinking": False,     # refuses output_config.effort with thinking off
}
# Anthropic-compatible endpoints, from each provider's own page (checked 2026-12-05):
#   deepseek-anthropic: https://api-docs.deepseek.com/guides/anthropic_api (x-api-key; ignores
#     anthropic-beta, container, mcp_servers, service_tier, top_k; no image, document,
#     search_result or redacted_thinking; in thinking mode its own thinking must come back with
#     tool calls, and a turn of calls without it is refused; by its refusals, an effort with
#     thinking off, and a metadata.user_id of more than [a-zA-Z0-9_-], are refused too)
#   minimax: https://platform.minimax.io/docs/api-reference/text-anthropic-api (x-api-key; text
#     and tool calls only, no image or document; top_k and stop_sequences ignored)
#   kimi, moonshot: https://platform.moonshot.ai/docs/guide/agent-support (Bearer key)
#   glm, zai: https://docs.z.ai/scenario-example/develop-tools/claude (Bearer key)
#   mimo, xiaomi: https://platform.xiaomimimo.com/docs/en-US/api/chat/anthropic-api (its key as
#     api-key or Bearer, and names no x-api-key; updated 2026-06-03, checked 2026-12-07)
# Kimi and GLM publish no table of what they lack. Kimi's own refusals say it: "Input tag
# 'document' … does not match any of the expected tags: 'image', 'server_tool_use', 'text',
# 'thinking', 'tool_result', 'tool_use', 'web_search_tool_result'" (on 2026-03-12,
# MoonshotAI/Kimi-K2.5#27), "unsupported content type … tool_reference" (on 2026-03-19,
# MoonshotAI/Kimi-K2#118), and, like DeepSeek, "thinking is enabled but reasoning_content is
# missing" for a turn of tool calls without its thinking (farion1231/cc-switch#3377, May 2026).
# GLM's model reads a tool_reference as no tool found (zai-org/GLM-5#76, June 2026), and its
# API answered a history holding one "[1210] Invalid API parameter" (farion1231/cc-switch#4989).
# DeepSeek's Flash model takes images over its OpenAI-format APIs; deepseek-v4-pro takes none
# (https://api-docs.deepseek.com/guides/vision and .../quick_start/pricing, checked 2026-12-05:
# deepseek-v4-flash and deepseek-v4-flash-vision-exp are retired names Flash now answers).
DEEPSEEK_VISION_MODELS = r"^deepseek-(v4-)?flash"
# DeepSeek thinks, at high effort, unless told not to (in both its APIs), and maps any effort
# asked to its own (low; medium, high and xhigh as high; max):
# https://api-docs.deepseek.com/guides/thinking_mode (checked 2026-12-06). Its response_format
# takes json_object only, and then wants "json" in the prompt
# (https://api-docs.deepseek.com/guides/json_mode, checked 2026-12-06).
DEEPSEEK_ANTHROPIC = {"type": "anthropic", "api_base_url": "https://api.deepseek.com/anthropic",
                      "quirks": {"anthropic_compat": {
                          "drop_betas": True, "thinking_with_calls": True,
                          "thinks_unasked": True, "effort_needs_thinking": True,
                          "drop_fields": ("container", "mcp_servers", "service_tier", "top_k"),
                          "no_blocks": ("image", "document", "search_result",
                                        "redacted_thinking")}}}
KIMI = {"type": "anthropic", "api_base_url": "https://api.moonshot.ai/anthropic",
        "quirks": {"anthropic_compat": {
            "auth": "bearer", "thinking_with_calls": True,
            "no_blocks": ("document", "redacted_thinking", "search_result", "tool_reference",
                          "web_fetch_tool_result", "code_execution_tool_result",
                          "bash_code_execution_tool_result",
                          "text_editor_code_execution_tool_result", "tool_search_tool_result",
                          "advisor_tool_result", "mcp_tool_use", "mcp_tool_result",
                          "container_upload")}}}
GLM = {"type": "anthropic", "api_base_url": "https://api.z.ai/api/anthropic",
       "quirks": {"anthropic_compat": {"auth": "bearer", "no_blocks": ("tool_reference",)}}}
MIMO = {"type": "anthropic", "api_base_url": "https://api.xiaomimimo.com/anthropic",
        "quirks": {"anthropic_compat": {"auth": "bearer"}}}
MINIMAX = {"type": "anthropic", "api_base_url": "https://api.minimax.io/anthropic",
           "quirks": {"anthropic_compat": {"drop_fields": ("top_k", "stop_sequences"),
                                           "no_blocks": ("image", "document")}}}

# Provider presets: a provider named like a preset needs only its key.
# `key_optional` for servers that need no key; `count_tokens` whether it answers count_tokens;
# `headers` go with every call (the user's own headers win); `quirks` as above.
PROVIDER_PRESETS = {
    "anthropic": {"type": "anthropic", "api_base_url": "https://api.anthropic.com",
                  "count_tokens": True},
    "openai": {"type": "openai", "api_base_url": "https://api.openai.com/v1",
               "quirks": dict(OPENAI_QUIRKS, search="web_search_options",
                              search_models=r"search", responses_search=True)},
    "gemini": {"type": "gemini", "api_base_url": "https://generativelanguage.googleapis.com/v1beta",
               "count_tokens": True, "quirks": {"thinking_level_models": r"^gemini-3",
                                                "effort_scales": GEMINI_EFFORT_SCALES,
                                                "thinking_off": GEMINI_THINKING_OFF}},
    "deepseek": {"type": "openai", "api_base_url": "https://api.deepseek.com",
                 "quirks": {"reasoning_style": "deepseek", "reasoning_replay": True,
                            "vision": DEEPSEEK_VISION_MODELS, "json_schema": False}},
    # OpenRouter takes reasoning.effort from "none" to "xhigh" for any model, mapped to its own
    # (openrouter.ai/docs/use-cases/reasoning-tokens, checked 2026-12-06).
    "openrouter": {"type": "openai", "api_base_url": "https://openrouter.ai/api/v1",
                   "headers": {"HTTP-Referer": "http://localhost:3456",
                               "X-OpenRouter-Title": "ccproxy.py", "X-Title": "ccproxy.py"},
                   "quirks": {"reasoning_style": "openrouter", "top_k": True,
                              "reasoning_details": True,
                              "cache_control_models": r"^(anthropic|google)/",
                              "effort_scales": ((r"", EFFORTS_TO_XHIGH),),
                              "thinking_off": ((r"", "none"),),
                              "search": "web_plugin", "reports_cost": True}},
    "groq": {"type": "openai", "api_base_url": "https://api.groq.com/openai/v1",
             "quirks": {"schema_drop_keys": ("$schema",), "reasoning_style": "effort",
                        "effort_scales": ((r"^openai/gpt-oss", EFFORTS_TO_HIGH),),
                        "thinking_off": ((r"^openai/gpt-oss", "low"),)}},
    # Mistral refuses any field its API does not name (422 "Extra inputs are not permitted"),
    # `user` and `stream_options` among them; its streams end with their usage unasked: the
    # request models of its SDK, github.com/mistralai/client-python docs/models (2026-06-30).
    "mistral": {"type": "openai", "api_base_url": "https://api.mistral.ai/v1",
                "quirks": {"tool_id_style": "alnum9", "user_after_tool": False,
                           "stream_usage": False, "user_field": False,
                           "reasoning_style": "effort", "effort_scales": MISTRAL_EFFORT_SCALES}},
    "xai": {"type": "openai", "api_base_url": "https://api.x.ai/v1",
            "quirks": {"reasoning_style": "effort", "effort_scales": (
                (r"^grok-4\.7", EFFORTS_TO_XHIGH),
                (r"^grok-3-mini", {"low": "low", "high": "high"}))}},
    # Ollama cuts a prompt longer than the context length it runs a model with, without an
    # error (the oldest messages, then the prompt's middle): docs.ollama.com/context-length,
    # its server/prompt.go and llm/llama_server.go, and issues 3839 and 14259 (checked
    # 2026-12-06). GET /api/ps lists each loaded model with that context_length (its
    # docs/openapi.yaml; since July 2025); POST /api/generate {"model"} loads a model. Its
    # OpenAI-compatible API takes text, image_url and input_audio parts, and answers any other
    # "invalid message format" (openai/openai.go).
    "ollama": {"type": "openai", "api_base_url": "http://localhost:11434/v1", "key_optional": True,
               "quirks": {"top_k": True, "loaded_windows": True, "files": False}},
    "deepseek-anthropic": DEEPSEEK_ANTHROPIC,
    "kimi": KIMI, "moonshot": KIMI,
    "glm": GLM, "zai": GLM,
    "minimax": MINIMAX,
    "mimo": MIMO, "xiaomi": MIMO,
}
# A provider of any name whose base URL is on a preset's host, of the preset's type, is taken
# for that server, with its preset's quirks, limits and prices ("openai-work" at
# api.openai.com; a second Mistral account): each preset's own host (a local server's aside),
# and the China and coding-plan twins of the Anthropic-compatible APIs. Kimi For Coding:
# https://api.kimi.com/coding, Moonshot's China platform: https://api.moonshot.cn/anthropic,
# Zhipu's: https://open.bigmodel.cn/api/anthropic (docs.bigmodel.cn/cn/guide/develop/claude),
# MiniMax's: https://api.minimaxi.com/anthropic (platform.minimaxi.com/docs/api-reference/
# text-anthropic-api); Xiaomi's token plans: https://token-plan-cn.xiaomimimo.com/anthropic and
# other hosts of xiaomimimo.com (a host's domain is looked up too); checked 2026-12-07. Any
# other "type": "anthropic" address is taken for Anthropic behind a gateway.
PRESET_HOSTS = {(preset["type"], urllib.parse.urlsplit(preset["api_base_url"]).hostname): name
                for name, preset in reversed(list(PROVIDER_PRESETS.items()))
                if not preset.get("key_optional")}
PRESET_HOSTS.update({("anthropic", host): name for host, name in (
    ("api.moonshot.cn", "kimi"), ("api.kimi.com", "kimi"), ("open.bigmodel.cn", "glm"),
    ("api.minimaxi.com", "minimax"), ("xiaomimimo.com", "mimo"))})
PROVIDER_DEFAULTS = {"type": None, "api_base_url": None, "api_key": "", "api_keys": None,
                     "models": [],
                     "enabled": True, "headers": {}, "max_tokens": None, "count_tokens": False,
                     "api": None, "responses_models": None, "deployments": {},
                     "api_version": "v1", "text_tool_calls": None, "compatible": None}


# Published limits of each preset's well-known models: model -> (context window: the most input
# tokens it takes, the most output tokens it writes); None where the page gives none. Checked on
# the providers' model pages on 2026-12-05:
#   openai: https://platform.openai.com/docs/models (gpt-5: 400,000 in all, of which input at most
#           272,000 and output 128,000; gpt-4.1: 1,047,576 / 32,768; gpt-4o: 128,000 / 16,384;
#           o3: 200,000 / 100,000); developers.openai.com/api/docs/models/gpt-6-sol and
#           gpt-6.2-sol (checked 2026-12-07: 1,050,000 in all, input at most 922,000, output
#           128,000). o4-mini and gpt-4.1-nano are retired (OPENAI_RETIRED).
#   gemini: https://ai.google.dev/gemini-api/docs/models (1,048,576 input / 65,536 output)
#   deepseek: https://api-docs.deepseek.com/quick_start/pricing (deepseek-flash, which also
#           answers the retired deepseek-v4-flash, and deepseek-v4-pro: 1M context, 384K
#           output; deepseek-chat and deepseek-reasoner ended on 2026-07-24)
#   xai: https://docs.x.ai/developers/models (grok-4.7: 500,000; grok-4, grok-code-fast-1:
#           256,000; no output limit given)
#   deepseek-anthropic: as deepseek; minimax: its Anthropic API page (above), no output limit
# Groq, Mistral, OpenRouter, Ollama and Anthropic serve too many or too changeable models (or,
# for Anthropic, answer an overflow in the very words Claude Code needs): set their limits in
# the config's models list.
PRESET_MODEL_LIMITS = {
    "openai": {
        "gpt-6.2-sol": (922000, 128000), "gpt-6-sol": (922000, 128000),
        "gpt-5": (272000, 128000), "gpt-5-mini": (272000, 128000),
        "gpt-5-nano": (272000, 128000), "gpt-4.1": (1047576, 32768),
        "gpt-4.1-mini": (1047576, 32768), "gpt-4o": (128000, 16384),
        "gpt-4o-mini": (128000, 16384), "o3": (200000, 100000),
    },
    "gemini": {
        "gemini-3-pro-preview": (1048576, 65536), "gemini-2.5-pro": (1048576, 65536),
        "gemini-2.5-flash": (1048576, 65536), "gemini-2.5-flash-lite": (1048576, 65536),
    },
    "deepseek": {
        "deepseek-flash": (1000000, 384000), "deepseek-v4-pro": (1000000, 384000),
        "deepseek-v4-flash": (1000000, 384000),
    },
    "xai": {
        "grok-4.7": (500000, None), "grok-4": (256000, None), "grok-code-fast-1": (256000, None),
    },
    "deepseek-anthropic": {
        "deepseek-flash": (1000000, 384000), "deepseek-v4-pro": (1000000, 384000),
        "deepseek-v4-flash": (1000000, 384000),
    },
    "minimax": {
        "MiniMax-M3": (1000000, None), "MiniMax-M2.7": (204800, None),
        "MiniMax-M2.7-highspeed": (204800, None), "MiniMax-M2.5": (204800, None),
        "MiniMax-M2.1": (204800, None), "MiniMax-M2": (204800, None),
    },
}
# Published prices (US dollars per million tokens) where the provider's own page gives one rate
# for a model, checked 2026-12-05:
#   openai: developers.openai.com/api/docs/models/gpt-5-codex (GPT-5 and GPT-5-Codex, standard)
#       and .../models/gpt-6.2-sol (checked 2026-12-07: cache writes $2.50 for the 30-minute
#       retention; "for requests with more than 272K input tokens, input and cache rates double
#       and output costs 1.5 times the short-context rate for the full request")
#   anthropic: platform.claude.com/docs/en/about-claude/pricing (the table of every model) and
#       .../models/sonnet-5-5/overview, .../models/sonnet-5/overview; cache_write is the 5-minute
#       rate, the one Claude Code writes unless ENABLE_PROMPT_CACHING_1H is set or it is logged in
#       as a claude.ai subscriber (seen in 2.1.330); .../models/opus-5-5/overview (its zh-CN
#       copy, checked 2026-12-07: Opus 5.5 reads its cache at 0.05 times input, not 0.1). Haiku
#       5.5 and Fable 5.2 are left out: their cache rates (and Haiku 5.5's prompt-size tiers)
#       were not on a page checked; Sonnet 4.5 retired.
#   groq: console.groq.com/docs/models (its production models) and .../docs/prompt-caching
#       (cached input at half the input rate, no charge to write)
#   deepseek, deepseek-anthropic: api-docs.deepseek.com/quick_start/pricing (off-peak rates
#       half the peak ones; peak 09:00-12:00 and 14:00-18:00 Beijing time, Monday to Friday,
#       China's public holidays aside; no charge to write the cache: a miss pays the input rate;
#       the retired deepseek-v4-flash is billed as Flash)
#   xai: docs.x.ai/developers/grok-4-7 (grok-4.7: input $2.00, output $6.00) and the model pages
#       under docs.x.ai/developers/models (grok-4.6's, seen in a copy: the same rates, cached
#       input $0.50; grok-4.20-0309's), checked 2026-12-07: cached input at a quarter of the
#       input rate (also the docs' cookbook, examples/prompt-caching), nothing to write the
#       cache, and "requests whose prompt reaches 200k tokens are billed at the higher rate for
#       all tokens in the request": every rate twice. Grok 4.7 kept Grok 4.6's rates (LiteLLM's
#       note on it, BerriAI/litellm discussions/42287).
# Not given for Gemini and Mistral (their pricing pages were not reachable to check; Gemini
# bills long prompts at a higher rate): a model without a price shows tokens only.
# OpenRouter reports each answer's cost (note_reported_cost).
ANTHROPIC_PRICES = {  # input, 5-minute cache write, cache read, output
    ("claude-fable-5-1",): (10.0, 12.5, 0.25, 50.0), ("claude-fable-5",): (10.0, 12.5, 1.0, 50.0),
    ("claude-opus-5-5",): (4.0, 5.0, 0.2, 20.0),
    ("claude-opus-5", "claude-opus-4-8", "claude-opus-4-7", "claude-opus-4-6", "claude-opus-4-5",
     "claude-opus-4-5-20251101"): (5.0, 6.25, 0.5, 25.0),
    ("claude-sonnet-5-5", "claude-sonnet-5"): (2.0, 2.5, 0.2, 10.0),
    ("claude-sonnet-4-6",): (3.0, 3.75, 0.3, 15.0),
    ("claude-haiku-4-5", "claude-haiku-4-5-20251001"): (1.0, 1.25, 0.1, 5.0),
}
GROQ_PRICES = {"openai/gpt-oss-120b": (0.15, 0.60), "openai/gpt-oss-20b": (0.075, 0.30),  # in, out
               "llama-3.3-70b-versatile": (0.59, 0.79), "llama-3.1-8b-instant": (0.05, 0.08)}
DEEPSEEK_PRICES = {"deepseek-flash": (0.15, 0.003, 0.60),      # off-peak: input, cache read,
                   "deepseek-v4-pro": (0.66, 0.022, 1.98)}    # output
DEEPSEEK_PRICES["deepseek-v4-flash"] = DEEPSEEK_PRICES["deepseek-flash"]    # retired: as Flash
DEEPSEEK_PEAK_UTC_HOURS = [(1, 4), (6, 10)]                    # 09-12 and 14-18 in Beijing
XAI_PRICES = {"grok-4.7": (2.0, 0.5, 6.0), "grok-4.6": (2.0, 0.5, 6.0)}  # in, cache read, out
XAI_LONG_PROMPT_TOKENS = 199_999           # a prompt that "reaches 200k" pays the long rates


def twice(rates: dict) -> dict:
    """Every rate of a price doubled (DeepSeek's peak hours, xAI's long prompts)."""
    return {kind: rate * 2 for kind, rate in rates.items()}


def deepseek_price(input_rate: float, cache_read: float, output: float) -> dict:
    """A DeepSeek model's price from its off-peak rates: twice them in peak hours."""
    rates = {"input": input_rate, "cache_write": input_rate, "cache_read": cache_read,
             "output": output}
    return dict(rates, peak=dict(twice(rates), utc_hours=DEEPSEEK_PEAK_UTC_HOURS,
                                 weekdays_only=True))


def xai_price(input_rate: float, cache_read: float, output: float) -> dict:
    """An xAI model's price from its rates for prompts under 200k tokens: twice them from
    there on, for every token of the request."""
    rates = {"input": input_rate, "cache_read": cache_read, "output": output}
    return dict(rates, above=dict(twice(rates), tokens=XAI_LONG_PROMPT_TOKENS))


DEEPSEEK_MODEL_PRICES = {model: deepseek_price(*rates) for model, rates in DEEPSEEK_PRICES.items()}
GPT_6_2_SOL_PRICE = {"input": 2.0, "cache_read": 0.1, "cache_write": 2.5, "output": 10.0,
                     "above": {"tokens": 272000, "input": 4.0, "cache_read": 0.2,
                               "cache_write": 5.0, "output": 15.0}}
PRESET_MODEL_PRICES = {
    "openai": {"gpt-6.2-sol": GPT_6_2_SOL_PRICE,
               **{model: {"input": 1.25, "cache_read": 0.125, "output": 10.0}
                  for model in ("gpt-5", "gpt-5-codex")}},
    "anthropic": {model: dict(zip(("input", "cache_write", "cache_read", "output"), rates))
                  for models, rates in ANTHROPIC_PRICES.items() for model in models},
    "groq": {model: {"input": rates[0], "cache_read": rates[0] / 2, "output": rates[1]}
             for model, rates in GROQ_PRICES.items()},
    "deepseek": DEEPSEEK_MODEL_PRICES, "deepseek-anthropic": DEEPSEEK_MODEL_PRICES,
    "xai": {model: xai_price(*rates) for model, rates in XAI_PRICES.items()},
}
# Models a preset's provider has retired: model -> (the day it ended, what replaces it). A config
# naming one is warned about, by key, at startup and by `start --check`; requests are not
# changed. Sources: DeepSeek's news of 2026-04-24 and pricing page (checked 2026-12-05: only
# deepseek-flash and deepseek-v4-pro are listed); platform.claude.com's model pages.
DEEPSEEK_RETIRED = {"deepseek-chat": ("2026-07-24", "deepseek-flash"),
                    "deepseek-reasoner": ("2026-07-24", "deepseek-flash")}
# OpenAI's, from developers.openai.com/api/docs/deprecations (checked 2026-12-07): gpt-5, -mini
# and -nano and their snapshots end on 2026-12-11, for gpt-6.1-sol, gpt-6.1-terra and gpt-6-luna
# (the last cut short in the copy read, "gpt-6…"), o3 with them; o1, o3-mini, o4-mini and
# gpt-4.1-nano ended on 2026-10-23 (the page as copied on 2026-10-15, with its replacements then).
OPENAI_RETIRED = dict(
    {name: ("2026-12-11", successor) for names, successor in (
        (("gpt-5", "gpt-5-2025-08-07", "o3", "o3-2025-04-16"), "gpt-6.1-sol"),
        (("gpt-5-mini", "gpt-5-mini-2025-08-07"), "gpt-6.1-terra"),
        (("gpt-5-nano", "gpt-5-nano-2025-08-07"), "gpt-6-luna")) for name in names},
    **{name: ("2026-10-23", successor) for names, successor in (
        (("o1", "o1-2024-12-17", "o3-mini", "o3-mini-2025-01-31"), "gpt-5.6-sol"),
        (("o4-mini", "o4-mini-2025-04-16"), "gpt-5.6-terra"),
        (("gpt-4.1-nano", "gpt-4.1-nano-2025-04-14"), "gpt-5.6-luna")) for name in names})
# Gemini's, from ai.google.dev/gemini-api/docs/deprecations (checked 2026-12-07):
# gemini-3-pro-preview ended on 2026-03-09; gemini-2.5-pro and -flash on 2026-12-01 (the page as
# read on 2026-11-10, aideprecations.com; gemini-2.5-flash-lite stays).
GEMINI_RETIRED = {"gemini-3-pro-preview": ("2026-03-09", "gemini-3.1-pro-preview"),
                  "gemini-2.5-pro": ("2026-12-01", "gemini-3.8-flash"),
                  "gemini-2.5-flash": ("2026-12-01", "gemini-3.5-flash-lite")}
RETIRED_MODELS = {
    "deepseek": DEEPSEEK_RETIRED, "deepseek-anthropic": DEEPSEEK_RETIRED, "openai": OPENAI_RETIRED,
    "gemini": GEMINI_RETIRED,
    "anthropic": {"claude-sonnet-4-5": ("2026-11-30", "claude-sonnet-5"),
                  "claude-sonnet-4-5-20250929": ("2026-11-30", "claude-sonnet-5")},
}
MODEL_LIMIT_KEYS = ("name", "context_window", "max_output_tokens")
MODEL_ENTRY_KEYS = MODEL_LIMIT_KEYS + ("price",)
# A model's price: US dollars per million tokens of each kind (its usage field beside it).
PRICED_USAGE_FIELDS = (("input", "input_tokens"), ("output", "output_tokens"),
                       ("cache_read", "cache_read_input_tokens"),
                       ("cache_write", "cache_creation_input_tokens"))
PROMPT_USAGE_FIELDS = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


def in_peak_hours(peak: dict, when: float) -> bool:
    """Whether the moment `when` (a Unix time) is in a price's peak hours."""
    moment = time.gmtime(when)
    if peak["weekdays_only"] and moment.tm_wday >= 5:          # Saturday, Sunday
        return False
    return any(start <= moment.tm_hour < end for start, end in peak["utc_hours"])


def quirk_holds(value, model: str) -> bool:
    """Whether a quirk given as True, False (or None) or the model ids it holds for (a regex,
    searched) holds for model."""
    if isinstance(value, str):
        return re.search(value, model) is not None
    return bool(value)


class Provider:
    """One configured provider, with preset defaults filled in and validated."""

    CONFIGURED = ("name", "protocol", "base_url", "api_keys", "models", "enabled", "headers",
                  "max_tokens", "count_tokens", "quirks", "model_limits", "prices")
    __slots__ = CONFIGURED + ("api_key", "masker", "runs_models_itself", "loaded_windows",
                              "windows_asked", "loads_tried", "learned_output_limits",
                              "learned_context_lengths",
                              "refused_fields", "refused_betas", "refuses_system_messages",
                              "opens_thinking", "adaptive_thinking_only")

    def __init__(self, **fields):
        for key in self.CONFIGURED:
            setattr(self, key, fields[key])
        self.api_key = self.api_keys[0] if self.api_keys else ""    # the one a call uses
        self.masker = SecretMasker(self.secrets())
        # An Ollama server of one's own runs each model with a context length of its own (its
        # cloud, ollama.com, runs each at its full length): it is asked for them.
        self.runs_models_itself = bool(self.quirks["loaded_windows"]) and urllib.parse.urlsplit(
            self.base_url).hostname != "ollama.com"
        self.loaded_windows = {}      # model -> the context length the server runs it with
        self.windows_asked = -math.inf    # when the server was last asked for them
        self.loads_tried = {}         # model -> when the server was asked to load it
        self.learned_output_limits = {}   # model -> the most output tokens it said it allows
        self.learned_context_lengths = {}     # model -> its input and output at most, it said
        self.refused_fields = {}      # model -> the request fields the server said it refuses
        self.refused_betas = frozenset()  # the anthropic-beta values the server said it refuses
        self.refuses_system_messages = False  # an Anthropic-protocol server said it takes none
        self.opens_thinking = set()   # models whose answers begin in thinking (ThinkTags)
        self.adaptive_thinking_only = set()   # models that said they think only adaptively

    def with_key(self, key: str) -> "Provider":
        """This provider, calling with one key of its pool."""
        chosen = copy.copy(self)
        chosen.api_key = key
        return chosen

    def cost(self, model: str, usage: dict, when: float | None = None) -> float | None:
        """What the usage cost in US dollars at the model's configured prices (its long-prompt
        rates when the prompt was longer than price.above.tokens, its peak rates when the answer
        came, at `when` or now, in price.peak's hours); None when a price is not known for a kind
        of token it used."""
        prices = self.prices.get(model)
        if prices is None:
            return None
        above, peak = prices.get("above"), prices.get("peak")
        if above and sum(usage.get(f) or 0 for f in PROMPT_USAGE_FIELDS) > above["tokens"]:
            prices = dict(prices, **above)
        elif peak and in_peak_hours(peak, time.time() if when is None else when):
            prices = dict(prices, **peak)
        total = 0.0
        for kind, field in PRICED_USAGE_FIELDS:
            tokens = usage.get(field) or 0
            if tokens and prices.get(kind) is None:
                return None
            total += tokens * (prices.get(kind) or 0.0) / 1e6
        return total

    def model_quirks(self, model: str) -> dict:
        """The quirks, with those given per model (vision, cache_control_models) settled for
        this model."""
        quirks = self.quirks
        return dict(quirks, vision=quirk_holds(quirks["vision"], model),
                    cache_control=quirk_holds(quirks["cache_control_models"], model))

    def context_window(self, model: str) -> int | None:
        """The most input tokens the model takes, when known: configured (or from the
        preset), else the context length the server runs the model with, when it says (Ollama's
        list of loaded models; a refusal that gave it, within_context_length)."""
        return self.model_limits.get(model, (None, None))[0] or self.loaded_windows.get(
            model) or self.learned_context_lengths.get(model)

    def window_is_loaded(self, model: str) -> bool:
        """Whether the model's window is the one the server runs it with (Ollama's, which cuts
        a longer prompt without saying so), not a configured one."""
        return not self.model_limits.get(model, (None, None))[0] and model in self.loaded_windows

    def output_cap(self, model: str) -> int | None:
        """The most output tokens a request may ask of the model: the smallest of the
        provider's max_tokens, the model's own limit and what the provider said it allows,
        when any is known."""
        caps = [cap for cap in (self.max_tokens, self.model_limits.get(model, (None, None))[1],
                                self.learned_output_limits.get(model)) if cap]
        return min(caps) if caps else None

    def sent_max_tokens(self, model: str, asked: int) -> int:
        """max_tokens as the model gets it: what was asked, within its output cap."""
        cap = self.output_cap(model)
        return min(asked, cap) if cap else asked

    def secrets(self) -> list:
        """Values that must never be shown: the keys and every header value the user gave (a
        preset's own headers, in this file for all to read, are none)."""
        preset = PROVIDER_PRESETS.get(self.name.lower(), {}).get("headers", {})
        return list(self.api_keys) + [value for name, value in self.headers.items()
                                      if preset.get(name) != value]

    def public_view(self) -> dict:
        """What /status and /providers show: everything, with secrets masked."""
        return {
            "name": self.name, "type": self.protocol, "api_base_url": self.base_url,
            "api_key": mask_secret(self.api_key), "models": list(self.models),
            "enabled": self.enabled, "max_tokens": self.max_tokens,
            "headers": {k: mask_secret(v) for k, v in self.headers.items()},
            "prices": {model: dict(prices) for model, prices in self.prices.items()},
        }

    def __repr__(self):
        return "Provider(%r, %s, %s)" % (self.name, self.protocol, self.base_url)


Route = collections.namedtuple("Route", "name provider model conditions fallbacks")


class Config:
    """The validated configuration the server runs on; built by build_config()."""

    def __init__(self, raw: dict, source: str | None, providers: list, routes: dict,
                 allowed_networks: list, warnings: list):
        performance = raw["performance"]
        self.raw, self.source = raw, source
        self.host, self.port = raw["host"], raw["port"]
        self.apikey, self.admin_key = raw["apikey"], raw["admin_key"]
        self.client_keys = dict(raw["client_keys"])    # name -> key, usage counted by name
        self.client_keys_in_use = dict(                 # what a client may present ("": apikey)
            {"": self.apikey} if self.apikey else {}, **self.client_keys)
        self.log_requests, self.log_bodies = raw["log"], raw["log_bodies"]
        self.log_file = os.path.abspath(os.path.expanduser(raw["log_file"]))
        self.usage_file = raw["usage_file"] and os.path.abspath(os.path.expanduser(
            raw["usage_file"]))
        self.providers, self.routes = providers, routes
        self.long_context_threshold = raw["routes"].get(LONG_CONTEXT_THRESHOLD_KEY,
                                                        DEFAULT_LONG_CONTEXT_TOKENS) \
            if isinstance(raw["routes"], dict) else DEFAULT_LONG_CONTEXT_TOKENS
        self.failover = failover_switches(raw["failover"])
        self.allowed_networks = allowed_networks
        self.request_timeout = performance["request_timeout"]
        self.header_timeout = performance["header_timeout"]
        self.keepalive_timeout = performance["keepalive_timeout"]
        self.body_timeout = performance["body_timeout"]
        self.shutdown_timeout = performance["shutdown_timeout"]
        self.drain_delay = performance["drain_delay"]
        self.read_only = raw["management"]["read_only"]
        self.max_body_bytes = performance["max_request_body_size"]
        self.max_connections = performance["max_connections"] or default_max_connections()
        self.worker_threads = performance["worker_threads"]
        self.max_retries = performance["max_retries"]
        self.retry_budget = performance["retry_budget"]
        self.metrics_enabled = performance["metrics_enabled"]
        self.rate_limit = (performance["rate_limit_rpm"], performance["rate_limit_burst"]) \
            if performance["rate_limit_enabled"] else None
        self.breaker_settings = (performance["circuit_breaker_threshold"],
                                 performance["circuit_breaker_cooldown"],
                                 performance["circuit_breaker_enabled"])
        self.warnings = warnings
        self.notes = []             # what was done that the user should hear of (not a problem)
        self.converted_from = None  # the router whose config file this was converted from
        self.masker = SecretMasker(self.secrets())
        self.file_content, self.environ, self.flags = raw, {}, {}   # set by load_config

    def enabled_providers(self) -> list:
        return [p for p in self.providers if p.enabled]

    def own_client_key(self) -> str:
        """The key this machine's own clients (code, env, the status line) present: the apikey,
        or the first of client_keys by name."""
        return self.apikey or next((self.client_keys[name] for name in sorted(self.client_keys)),
                                   "")

    def provider_named(self, name: str):
        return next((p for p in self.providers if p.name == name), None)

    def secrets(self) -> list:
        """Every secret the config holds, for masking logs and messages."""
        found = [key for key in (self.apikey, self.admin_key) if key]
        found += self.client_keys.values()
        for provider in self.providers:
            found.extend(s for s in provider.secrets() if s)
        return found


def default_max_connections() -> int:
    """The client connections served at once when performance.max_connections is 0: half the
    file descriptors this process may open (a connection may hold an upstream one too), less a
    reserve, so that accept() never runs out of descriptors."""
    try:
        import resource           # Unix only
    except ImportError:
        return FALLBACK_MAX_CONNECTIONS
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_AUTO_CONNECTIONS
    return max(MIN_AUTO_CONNECTIONS,
               min(MAX_AUTO_CONNECTIONS, (soft - RESERVED_FILE_DESCRIPTORS) // 2))


# -----------------------------------------------------------------------------
# 3.3 Validation: every problem, with its file and key
# -----------------------------------------------------------------------------

PROVIDER_KEYS = ("name", "type", "api_base_url", "api_key", "api_keys", "models", "enabled",
                 "headers",
                 "max_tokens", "count_tokens", "api", "responses_models", "deployments",
                 "api_version", "text_tool_calls", "compatible")
ROUTE_KEYS = ("provider", "model", "conditions", "fallbacks")
LONG_CONTEXT_THRESHOLD_KEY = "longContextThreshold"
# failover: other_providers after a route's own targets; missing_model: a target without the
# model moves on; context_overflow: a provider's refusal of a prompt over its window moves on
# to the longContext route.
FAILOVER_DEFAULTS = {"other_providers": True, "missing_model": True, "context_overflow": True}
FAILOVER_SWITCHES = tuple(FAILOVER_DEFAULTS)
PERFORMANCE_SWITCHES = ("metrics_enabled", "rate_limit_enabled", "circuit_breaker_enabled")
# Never echoed in a message.
SECRET_KEYS = ("apikey", "admin_key", "api_key", "api_keys", "headers")
CONTROL_CHARACTER_RE = re.compile(r"[\x00-\x1f\x7f]")
NOT_PRINTABLE_ASCII_RE = re.compile(r"[^\x20-\x7e]")
# $NAME (a shell's) or %NAME% (Windows'), written where ccproxy reads ${NAME}.
SHELL_VARIABLE_RE = re.compile(r"(?:\$([A-Za-z_]\w*)|%([A-Za-z_]\w*)%)\Z")
HTTP_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class ConfigChecker:
    """Validates a merged raw config; every problem names its source file (or variable) and key."""

    def __init__(self, source: str, origins: dict):
        self.source = source
        self.origins = origins
        self.problems = []
        self.warnings = []

    def fail(self, key: str, problem: str) -> None:
        self.problems.append("%s: %s: %s" % (self.origins.get(key, self.source), key, problem))

    def warn(self, key: str, problem: str) -> None:
        self.warnings.append("%s: %s: %s" % (self.origins.get(key, self.source), key, problem))

    def unknown_keys(self, section: dict, known, path: str, refuse: bool = False) -> None:
        """Warn about (or, with refuse, fail on) each key not in known, with a "did you mean"
        for a near miss."""
        for key in section:
            if key not in known:
                near = difflib.get_close_matches(str(key), [str(k) for k in known], 1, 0.75)
                problem = ("unknown key%s" % (" (did you mean %r?)" % near[0] if near else "")) + (
                    "" if refuse else ", ignored")
                (self.fail if refuse else self.warn)(join_key(path, key), problem)

    def typed(self, section: dict, key: str, path: str, kinds, kind_name: str):
        """The value if it has the right JSON type, else record a problem and return None."""
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        value = section.get(key)
        if isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds):
            return value
        shown = type(value).__name__ if key in SECRET_KEYS else json.dumps(value)
        self.fail(join_key(path, key), "must be %s, not %s" % (kind_name, shown))
        return None

    def plain(self, path: str, text: str) -> bool:
        """Whether text is free of control characters (it goes into headers, names and log
        lines); a problem is recorded when it is not."""
        problem = control_character_problem(text)
        if problem:
            self.fail(path, problem)
        return problem is None

    def secret(self, section: dict, key: str, path: str) -> str | None:
        """A key or header value: a string, surrounding whitespace (a pasted newline) removed,
        then refused for what secret_problem() finds."""
        value = self.typed(section, key, path, str, "a string")
        if value is None:
            return None
        value = value.strip()
        problem = secret_problem(value)
        if problem:
            self.fail(join_key(path, key), problem)
        return None if problem else value


# 3.3.1 Values, and the top level: client keys, performance, access
# .............................................................................

def control_character_problem(text: str) -> str | None:
    """Why text may not go into a header or a name: its first control character, by code and
    position only (the text may be a secret)."""
    match = CONTROL_CHARACTER_RE.search(text)
    if match is None:
        return None
    return "must not contain control characters (U+%04X at position %d)" % (
        ord(match.group()), match.start())


def secret_problem(text: str) -> str | None:
    """Why text cannot be a key or a header value, by position only (it may be a secret): a
    control character; any other character outside printable ASCII, which HTTP cannot send
    (a space of zero width or a typographic dash, pasted from a web page); or a shell's
    variable, which ccproxy does not read."""
    match = NOT_PRINTABLE_ASCII_RE.search(text)
    if match is not None and CONTROL_CHARACTER_RE.match(match.group()) is None:
        return ("must be printable ASCII (U+%04X at position %d is not: pasted from a web "
                "page?)" % (ord(match.group()), match.start()))
    variable = SHELL_VARIABLE_RE.match(text)
    if variable is not None:
        return "is the name of a variable: write ${%s} for ccproxy to read it from the " \
            "environment" % (variable.group(1) or variable.group(2))
    return control_character_problem(text)


def base_url_problem(url) -> str | None:
    """Why url cannot be a provider's base URL: it must be a plain http(s) origin with an
    optional path, no user name, query string or fragment (ccproxy adds what each API needs)."""
    if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
        return "not an http(s) URL: %s" % json.dumps(url.split("?")[0] if isinstance(url, str)
                                                      else url)
    if control_character_problem(url) or re.search(r"\s", url):
        return "must not contain spaces or control characters"
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as error:                      # "http://[::1": "Invalid IPv6 URL"
        return "not a URL: %s (%s)" % (json.dumps(url), error)
    if "?" in url or "#" in url:
        return "must not have a query string or fragment (%s…)" % url.split("?")[0].split("#")[0]
    if "@" in parts.netloc:
        return "must not hold a user name or password; put the key in api_key"
    try:
        parts.port
    except ValueError:
        return "has an invalid port: %s" % json.dumps(url)
    outside = NOT_PRINTABLE_ASCII_RE.search(parts.path)
    if outside is not None:          # said by position: a gateway's path may hold a token
        return "must be ASCII in its path (HTTP sends no other): percent-encode U+%04X at " \
            "position %d of the path" % (ord(outside.group()), outside.start())
    return None


CLIENT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
CLIENT_KEY_MIN_CHARS = 16


def clean_client_keys(checker: ConfigChecker, raw: dict) -> dict:
    """client_keys: {name: key}, a key for each client (a person, a team) whose usage is
    counted apart; each key its own, none the apikey's or the admin_key's. A name is shown
    (in /status, /metrics, the log), so an entry whose name or key is wrong is named by its
    place: a key written where its name goes must not be shown either."""
    entries = raw.get("client_keys")
    if not isinstance(entries, dict):
        checker.fail("client_keys", "must be an object of name: key")
        return {}
    taken = {raw[key]: key for key in ("apikey", "admin_key") if raw.get(key)}
    cleaned = {}
    for number, name in enumerate(entries, 1):
        if not CLIENT_NAME_RE.match(name):
            checker.fail("client_keys", "entry %d: its name must be letters, digits, '_', '.' "
                         "and '-' (up to 64, the first a letter or digit)" % number)
            continue
        key = checker.secret(entries, name, "client_keys")
        if key is not None and len(key) < CLIENT_KEY_MIN_CHARS:
            checker.fail("client_keys", "entry %d: its key has %d characters, fewer than %d (a "
                         "name and its key swapped? it is {\"name\": \"key\"})" % (
                             number, len(key), CLIENT_KEY_MIN_CHARS))
        elif key in taken:
            checker.fail("client_keys.%s" % name, "is the same key as %s: each client needs a "
                         "key of its own" % taken[key])
        elif key is not None:
            taken[key], cleaned[name] = "client_keys.%s" % name, key
    return cleaned


HOST_NAME_RE = re.compile(r"(?!-)[\w-]{1,63}(?:\.(?!-)[\w-]{1,63})*\.?\Z", re.ASCII)


def host_problem(host: str) -> str | None:
    """Why host cannot be listened on: a URL, brackets or a port written with it, or no
    address or host name at all; None when it is one."""
    if "://" in host:
        try:
            named = urllib.parse.urlsplit(host).hostname or host
        except ValueError:                               # "http://[::1": no URL at all
            named = host
        return "must be an address or a host name, not a URL: %s" % json.dumps(named)
    if host.startswith("[") and host.endswith("]"):
        return "write the address without brackets: %s" % json.dumps(host[1:-1])
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        if host.count(":") > 1:                 # IPv6 with a zone (fe80::1%eth0) on 3.8
            return None
    if host.count(":") == 1:
        return "must not hold a port (set `port`): %s" % json.dumps(host.split(":")[0])
    try:
        ascii_name = host.encode("idna").decode("ascii")     # a name in another script too
    except UnicodeError:
        ascii_name = ""
    if not HOST_NAME_RE.match(ascii_name):
        return "must be an address (127.0.0.1, ::1, 0.0.0.0) or a host name, not %s" % \
            json.dumps(host)
    return None


def check_listen_address(checker: ConfigChecker, raw: dict) -> None:
    """Validate host and port (of a config, or given to serve_in_thread)."""
    host = checker.typed(raw, "host", "", str, "a host name or address")
    problem = host_problem(host) if host else None
    if problem:
        checker.fail("host", problem)
    port = checker.typed(raw, "port", "", int, "a port number")
    if port is not None and not 0 <= port <= 65535:
        checker.fail("port", "must be between 0 and 65535, not %d" % port)


def clean_top_level(checker: ConfigChecker, raw: dict) -> None:
    """Validate host, port, apikey, log and log_file."""
    checker.unknown_keys(raw, DEFAULT_CONFIG, "")
    check_listen_address(checker, raw)
    for key in ("apikey", "admin_key"):
        raw[key] = checker.secret(raw, key, "")
    raw["client_keys"] = clean_client_keys(checker, raw)
    checker.typed(raw, "log", "", bool, "true or false")
    checker.typed(raw, "log_file", "", str, "a file path")
    checker.typed(raw, "usage_file", "", str, "a file path (\"\": usage is not kept)")
    checker.typed(raw, "log_bodies", "", bool, "true or false")
    failover = raw.get("failover")
    if isinstance(failover, dict):
        checker.unknown_keys(failover, FAILOVER_SWITCHES, "failover")
        for key in FAILOVER_SWITCHES:
            if key in failover:
                checker.typed(failover, key, "failover", bool, "true or false")
    elif not isinstance(failover, bool):
        checker.fail("failover", "must be true, false or {%s}" % ", ".join(FAILOVER_SWITCHES))


def failover_switches(value) -> dict:
    """failover as its three switches: true or false is other_providers alone."""
    if isinstance(value, bool):
        return dict(FAILOVER_DEFAULTS, other_providers=value)
    return dict(FAILOVER_DEFAULTS, **value)


PERFORMANCE_DURATIONS = ("request_timeout", "header_timeout", "keepalive_timeout", "body_timeout",
                         "shutdown_timeout", "drain_delay", "retry_budget",
                         "circuit_breaker_cooldown")
MILLISECONDS_LIKELY = 100000      # a bare number of seconds this large was meant in milliseconds


def performance_durations(checker: ConfigChecker, section: dict) -> dict:
    """performance.*'s durations in seconds; a bare number of over a day may have been meant in
    milliseconds (as Claude Code's API_TIMEOUT_MS is), and the warning or error asks."""
    durations = {}
    for key in PERFORMANCE_DURATIONS:
        raw, path = section[key], "performance." + key
        bare = re.fullmatch(r"\d+(\.\d*)?", str(raw)) is not None
        hint = "; was it meant in milliseconds?" if bare and float(raw) >= MILLISECONDS_LIKELY \
            else ""
        try:
            durations[key] = parse_duration(raw, zero=key == "drain_delay")
        except ValueError as exc:
            checker.fail(path, "%s (use seconds or \"30s\", \"5m\"): %s%s" % (
                exc, json.dumps(raw), hint))
            continue
        if hint:
            checker.warn(path, "%s is %.1f days: durations are in seconds (or \"10m\", \"30s\")%s"
                         % (json.dumps(raw), durations[key] / 86400, hint))
    return durations


def build_performance(checker: ConfigChecker, section) -> dict:
    """Validate performance.*; durations become seconds."""
    if not isinstance(section, dict):
        checker.fail("performance", "must be an object")
        return dict(DEFAULT_CONFIG["performance"])
    checker.unknown_keys(section, DEFAULT_CONFIG["performance"], "performance")
    checked = dict(section)
    checked.update(performance_durations(checker, section))
    for key in ("max_request_body_size", "worker_threads", "rate_limit_rpm", "rate_limit_burst",
                "circuit_breaker_threshold"):
        value = checker.typed(section, key, "performance", int, "a positive integer")
        if value is not None and value <= 0:
            checker.fail("performance." + key, "must be a positive integer")
    for key in ("max_retries", "max_connections"):
        value = checker.typed(section, key, "performance", int, "0 or more")
        if value is not None and value < 0:
            checker.fail("performance." + key, "must be 0 or more")
    for key in PERFORMANCE_SWITCHES:
        checker.typed(section, key, "performance", bool, "true or false")
    return checked


def check_management(checker: ConfigChecker, section) -> None:
    """Validate management.*."""
    if not isinstance(section, dict):
        checker.fail("management", "must be an object")
        return
    checker.unknown_keys(section, DEFAULT_CONFIG["management"], "management")
    checker.typed(section, "read_only", "management", bool, "true or false")


def build_allowed_networks(checker: ConfigChecker, section) -> list:
    """Validate security.allowed_ips; returns the parsed networks."""
    if not isinstance(section, dict):
        checker.fail("security", "must be an object")
        return []
    checker.unknown_keys(section, DEFAULT_CONFIG["security"], "security")
    entries = checker.typed(section, "allowed_ips", "security", list, "a list of CIDRs")
    networks = []
    for index, entry in enumerate(entries or []):
        try:
            networks.append(ipaddress.ip_network(str(entry), strict=False))
        except ValueError:
            checker.fail("security.allowed_ips[%d]" % index,
                         "not an IP address or CIDR: %s" % json.dumps(entry))
    return networks


# 3.3.2 Providers: presets, keys, models, prices
# .............................................................................

def build_provider(checker: ConfigChecker, entry, index: int, path: str = "") -> Provider | None:
    """Validate one providers[i] entry (or one at path) and fill in its preset."""
    path = path or "providers[%d]" % index
    if not isinstance(entry, dict):
        checker.fail(path, "must be an object")
        return None
    name = provider_name(checker, entry, path)
    if name is None:
        return None
    preset = PROVIDER_PRESETS.get(name.lower(), {})
    # A typo in a preset's entry (api_bse_url) would send its traffic, and its key, to the
    # preset's public address: that is an error, not a warning.
    checker.unknown_keys(entry, PROVIDER_KEYS, path, refuse=bool(preset))
    fields = dict(PROVIDER_DEFAULTS, **dict(preset, **entry))
    protocol = fields["type"]
    if not isinstance(protocol, str) or protocol not in PROTOCOLS:
        checker.fail(path + ".type", "must be one of %s for a provider not named like a preset (%s)"
                     % (", ".join(PROTOCOLS), ", ".join(PROVIDER_PRESETS)))
        return None
    problems_before = len(checker.problems)
    clean_provider_fields(checker, fields, path)
    if (fields["enabled"] is True and preset and not preset.get("key_optional")
            and not fields["api_keys"]):
        checker.fail(path + ".api_key", "required for %s (or set CCPROXY_PROVIDERS_%d_API_KEY)"
                     % (name, index))
    if len(checker.problems) > problems_before:
        return None
    headers = dict(preset.get("headers", {}), **fields["headers"])
    served = served_preset(fields)
    limits = dict(PRESET_MODEL_LIMITS.get(served, {}))
    limits.update(fields["model_limits"])
    return Provider(name=name, protocol=protocol, base_url=fields["api_base_url"].rstrip("/"),
                    api_keys=tuple(fields["api_keys"]), models=tuple(fields["models"]),
                    enabled=fields["enabled"], headers=headers, max_tokens=fields["max_tokens"],
                    count_tokens=fields["count_tokens"],
                    quirks=provider_quirks(fields, PROVIDER_PRESETS.get(served, {})),
                    model_limits=limits,
                    prices=dict(PRESET_MODEL_PRICES.get(served, {}), **fields["prices"]))


def served_preset(fields: dict) -> str:
    """The preset whose data a provider takes: its name's, or, for a provider of any other
    name, that of the server its base URL is on (PRESET_HOSTS, by type and host or the host's
    domain); "" for none."""
    name = str(fields.get("name")).lower()
    if name in PROVIDER_PRESETS:
        return name
    try:
        host = (urllib.parse.urlsplit(str(fields.get("api_base_url"))).hostname or "").lower()
    except ValueError:                                   # said at api_base_url
        return ""
    kind = fields.get("type")
    return PRESET_HOSTS.get((kind, host)) or PRESET_HOSTS.get((kind, host.partition(".")[2]), "")


def provider_quirks(fields: dict, preset: dict) -> dict:
    """What the provider's server accepts: the defaults, its preset's (an Azure resource has
    OpenAI's; Gemini's OpenAI-compatible API, found by its host, wants thought signatures
    back), then what its entry says of the Responses API and Azure."""
    host = (urllib.parse.urlsplit(fields["api_base_url"]).hostname or "").lower()
    quirks = dict(PROVIDER_QUIRKS, **preset.get("quirks", {}))
    quirks["anthropic_compat"] = compatible_server(quirks["anthropic_compat"],
                                                   fields["compatible"])
    if fields["type"] == "azure":
        quirks.update(OPENAI_QUIRKS, azure={"api_version": fields["api_version"],
                                            "deployments": fields["deployments"]})
    if fields["type"] == "openai" and host.endswith(".googleapis.com"):
        quirks["thought_signatures"] = True       # Gemini's OpenAI-compatible API
    if fields["api"] is not None:
        quirks["api"] = fields["api"]
    if fields["responses_models"] is not None:
        quirks["responses_models"] = fields["responses_models"]
    quirks["text_tool_calls"] = fields["text_tool_calls"] if fields["text_tool_calls"] is not None \
        else not preset and fields["type"] == "openai" and not quirks["thought_signatures"]
    return quirks


def compatible_server(preset_lacks: dict | None, declared) -> dict | None:
    """What a server that copies Anthropic's API lacks (ANTHROPIC_COMPAT's keys): its preset's,
    then what the provider's `compatible` says (true: such a server; an object: what it lacks,
    over its preset's; false: Anthropic itself, or a gateway in front of it). None for
    Anthropic."""
    if declared is False or (declared is None and preset_lacks is None):
        return None
    lacks = dict(ANTHROPIC_COMPAT)
    lacks.update(preset_lacks or {})
    lacks.update(declared if isinstance(declared, dict) else {})
    return lacks


def provider_name(checker: ConfigChecker, entry: dict, path: str) -> str | None:
    """The entry's name, or None once the problem with it is recorded."""
    name = checker.typed(entry, "name", path, str, "a non-empty string")
    if not name:
        if name == "":
            checker.fail(path + ".name", "must be a non-empty string")
        return None
    if not checker.plain(path + ".name", name):
        return None
    if "," in name:
        checker.fail(path + ".name", "must not contain a comma (requests name a provider's "
                                     "model as \"provider,model\")")
        return None
    return name


def clean_provider_fields(checker: ConfigChecker, fields: dict, path: str) -> None:
    """The type and shape of each provider field, preset defaults included; the key and the
    header values are stripped of surrounding whitespace in fields."""
    problem = base_url_problem(fields["api_base_url"]) if fields["api_base_url"] is not None \
        else "missing: give the provider's API address, or name the provider after a preset " \
             "(%s) for its own" % ", ".join(sorted(PROVIDER_PRESETS))
    if problem:
        checker.fail(path + ".api_base_url", problem)
    fields["api_keys"] = provider_keys(checker, fields, path)
    models = checker.typed(fields, "models", path, list, "a list of model names")
    preset_limits = PRESET_MODEL_LIMITS.get(served_preset(fields), {})
    fields["models"], fields["model_limits"], fields["prices"] = [], {}, {}
    for index, model in enumerate(models or ()):
        where = "%s.models[%d]" % (path, index)
        entry = clean_model_entry(checker, model, where, preset_limits)
        if entry is not None:
            warn_if_retired(checker, fields.get("name"), entry[0], where)
            fields["models"].append(entry[0])
            if entry[1] is not None:
                fields["model_limits"][entry[0]] = entry[1]
            if isinstance(model, dict) and "price" in model:
                fields["prices"][entry[0]] = model_price(checker, model["price"], where + ".price")
    checker.typed(fields, "enabled", path, bool, "true or false")
    headers = checker.typed(fields, "headers", path, dict, "an object of header: value")
    fields["headers"] = {}
    for name in headers or ():
        where = "%s.headers.%s" % (path, name)
        if not HTTP_TOKEN_RE.match(name):
            checker.fail(where, "not a valid header name")
        else:
            fields["headers"][name] = checker.secret(headers, name, path + ".headers")
    if fields["max_tokens"] is not None:
        cap = checker.typed(fields, "max_tokens", path, int, "a positive integer")
        if cap is not None and cap <= 0:
            checker.fail(path + ".max_tokens", "must be a positive integer")
    checker.typed(fields, "count_tokens", path, bool, "true or false")
    if fields["text_tool_calls"] is not None:
        checker.typed(fields, "text_tool_calls", path, bool, "true or false")
    clean_openai_fields(checker, fields, path)
    clean_compatible(checker, fields, path)


# What a `compatible` object may say (ANTHROPIC_COMPAT has each key's meaning): the values of
# a choice, and the names a list may not hold, with why.
COMPATIBLE_CHOICES = {"auth": ("x-api-key", "bearer"), "thinking_with_calls": (True, False,
                                                                              "always")}
COMPATIBLE_NAME_LISTS = {
    "drop_fields": (("model", "messages", "max_tokens"),
                    "every request of the Messages API has model, messages and max_tokens"),
    "no_blocks": (("text", "tool_use", "tool_result"),
                  "a server that serves Claude Code takes text, tool_use and tool_result")}


def clean_compatible(checker: ConfigChecker, fields: dict, path: str) -> None:
    """An anthropic provider's `compatible`: true, false, or an object of what its server
    lacks; its lists made tuples in fields."""
    value, where = fields["compatible"], path + ".compatible"
    if value is None:
        return
    if fields["type"] != "anthropic":
        checker.fail(where, 'is for a "type": "anthropic" provider: it says whether its '
                     "server is Anthropic's or copies Anthropic's API")
    elif not isinstance(value, (bool, dict)):
        checker.fail(where, "must be true, false or an object of what the server lacks (%s)"
                     % ", ".join(ANTHROPIC_COMPAT))
    elif isinstance(value, dict):
        checker.unknown_keys(value, tuple(ANTHROPIC_COMPAT), where, refuse=True)
        fields["compatible"] = {key: compatible_value(checker, value, key, where)
                                for key in value if key in ANTHROPIC_COMPAT}


def compatible_value(checker: ConfigChecker, lacks: dict, key: str, path: str):
    """One value of a `compatible` object, checked (a list as a tuple of names)."""
    value, where = lacks[key], join_key(path, key)
    if key in COMPATIBLE_NAME_LISTS:
        names = checker.typed(lacks, key, path, list, "a list of names") or []
        if not all(isinstance(name, str) and name and checker.plain(where, name)
                   for name in names):
            checker.fail(where, "must be a list of non-empty names")
        needed, why = COMPATIBLE_NAME_LISTS[key]
        taken = [name for name in needed if name in names]
        if taken:
            checker.fail(where, "cannot name %s: %s" % (", ".join(taken), why))
        return tuple(names)
    choices = COMPATIBLE_CHOICES.get(key, (True, False))
    if not any(value is choice or (isinstance(choice, str) and value == choice)
               for choice in choices):
        checker.fail(where, "must be %s" % " or ".join(json.dumps(c) for c in choices))
    return value


def provider_key(checker: ConfigChecker, section: dict, key: str, path: str) -> str | None:
    """One of a provider's keys, as checker.secret() takes it, without a scheme before it
    (ccproxy writes the one the provider's API asks for)."""
    value = checker.secret(section, key, path)
    if value and value[:7].lower() == "bearer ":
        checker.fail(join_key(path, key), "starts with \"Bearer \": give the key alone "
                     "(ccproxy adds what the provider's API asks for)")
        return None
    return value


def provider_keys(checker: ConfigChecker, fields: dict, path: str) -> list:
    """The provider's keys: api_key alone, or the api_keys pool (not both), each cleaned."""
    if fields["api_keys"] is None:
        key = provider_key(checker, fields, "api_key", path)
        return [key] if key else []
    if fields["api_key"]:
        checker.fail(path + ".api_keys", "give api_key or api_keys, not both")
    pool = checker.typed(fields, "api_keys", path, list, "a list of keys") or []
    keys = [provider_key(checker, {"[%d]" % n: key}, "[%d]" % n, path + ".api_keys")
            for n, key in enumerate(pool)]
    if not pool or "" in keys:
        checker.fail(path + ".api_keys", "must be a list of non-empty keys")
    elif len(set(keys)) < len(keys):
        checker.fail(path + ".api_keys", "lists one key twice")
    return [key for key in keys if key]


def clean_openai_fields(checker: ConfigChecker, fields: dict, path: str) -> None:
    """The fields of OpenAI's APIs: api, responses_models, and an Azure resource's
    deployments and api_version."""
    if fields["api"] not in (None, "chat", "responses"):
        checker.fail(path + ".api", 'must be "chat" or "responses"')
    pattern = fields["responses_models"]
    if pattern is not None and not isinstance(pattern, str):
        checker.fail(path + ".responses_models", "must be a regular expression")
    elif pattern is not None:
        check_regex(checker, pattern, path + ".responses_models")
    deployments = checker.typed(fields, "deployments", path, dict,
                                "an object of model: deployment name")
    for model, name in (deployments or {}).items():
        where = "%s.deployments.%s" % (path, model)
        if not isinstance(name, str) or not name:
            checker.fail(where, "must be a deployment name")
        else:
            checker.plain(where, name)
    version = checker.typed(fields, "api_version", path, str, 'a version ("v1" or dated)')
    if version is not None and not re.match(r"^(v1|\d{4}-\d{2}-\d{2}(-preview)?)$", version):
        checker.fail(path + ".api_version", 'must be "v1" or a date like "2025-04-01-preview"')


def clean_model_entry(checker: ConfigChecker, model, path: str, preset_limits: dict):
    """(name, (context window, output limit) or None) of a models[] entry: a name, or an
    object {name, context_window?, max_output_tokens?} whose limits override the preset's."""
    if isinstance(model, str):
        if not model:
            checker.fail(path, "must be a non-empty string")
            return None
        return (model, None) if checker.plain(path, model) else None
    if not isinstance(model, dict):
        checker.fail(path, "must be a model name or {name, context_window, max_output_tokens}")
        return None
    checker.unknown_keys(model, MODEL_ENTRY_KEYS, path)
    name = model.get("name")
    if not isinstance(name, str) or not name or not checker.plain(path + ".name", name):
        if not isinstance(name, str) or not name:
            checker.fail(path + ".name", "must be a non-empty string")
        return None
    limits = list(preset_limits.get(name, (None, None)))
    for position, key in enumerate(MODEL_LIMIT_KEYS[1:]):
        if key in model:
            value = checker.typed(model, key, path, int, "a positive number of tokens")
            if value is not None and value <= 0:
                checker.fail(join_key(path, key), "must be a positive number of tokens")
            limits[position] = value
    return name, tuple(limits)


def model_price(checker: ConfigChecker, price, path: str) -> dict:
    """A model's price ({input, output, cache_read?, cache_write?}: US dollars per million
    tokens; `above` {tokens, and rates}: what a prompt longer than tokens pays instead, where the
    provider bills long prompts higher; `peak` {utc_hours, weekdays_only?, and rates}: what an
    answer in those hours pays instead, where the provider bills by the time of day); a kind
    left out has no known price, so usage of it has no known cost."""
    if not isinstance(price, dict):
        checker.fail(path, "must be an object of US dollars per million tokens: "
                           "{input, output, cache_read, cache_write, above or peak}")
        return {}
    kinds = [kind for kind, _ in PRICED_USAGE_FIELDS]
    # an unknown key is refused, not warned about: a typo would mean a wrong cost
    checker.unknown_keys(price, kinds + ["above", "peak"], path, refuse=True)
    clean = price_rates(checker, price, kinds, path)
    for kind in ("input", "output"):
        if kind not in price:
            checker.fail(join_key(path, kind), "is required in a price")
    if "above" in price and "peak" in price:
        checker.fail(join_key(path, "peak"), "cannot be given with above: a price has long-prompt "
                                             "rates or peak-hour rates, not both")
    elif "above" in price:
        clean["above"] = long_prompt_price(checker, price["above"], join_key(path, "above"))
    elif "peak" in price:
        clean["peak"] = peak_hours_price(checker, price["peak"], join_key(path, "peak"))
    return clean


def price_rates(checker: ConfigChecker, price: dict, kinds: list, path: str) -> dict:
    """The rates a price gives, as floats; a rate that is not a sane number is a problem."""
    clean = {}
    for kind in kinds:
        value = price.get(kind)
        if kind in price and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not 0 <= value < 1e6):
            checker.fail(join_key(path, kind), "must be a number of US dollars per million tokens")
        elif kind in price:
            clean[kind] = float(value)
    return clean


def long_prompt_price(checker: ConfigChecker, above, path: str) -> dict:
    """price.above: {tokens, and the rates that change}: rates left out stay the base ones."""
    kinds = [kind for kind, _ in PRICED_USAGE_FIELDS]
    if not isinstance(above, dict):
        checker.fail(path, "must be an object: {tokens, input, output, cache_read, cache_write}")
        return {}
    checker.unknown_keys(above, kinds + ["tokens"], path, refuse=True)
    tokens = above.get("tokens")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        checker.fail(join_key(path, "tokens"), "must be a whole number of prompt tokens (a long "
                                               "prompt has more), e.g. 200000")
    return dict(price_rates(checker, above, kinds, path), tokens=tokens)


def peak_hours_price(checker: ConfigChecker, peak, path: str) -> dict:
    """price.peak: {utc_hours: [[start, end], ...], weekdays_only, and the rates that change}:
    an answer from start up to end o'clock UTC (Monday to Friday only, with weekdays_only) pays
    these rates; rates left out stay the base ones."""
    kinds = [kind for kind, _ in PRICED_USAGE_FIELDS]
    if not isinstance(peak, dict):
        checker.fail(path, "must be an object: {utc_hours, weekdays_only, input, output, "
                           "cache_read, cache_write}")
        return {}
    checker.unknown_keys(peak, kinds + ["utc_hours", "weekdays_only"], path, refuse=True)
    hours = peak.get("utc_hours")
    if not (isinstance(hours, list) and hours and all(is_hour_span(span) for span in hours)):
        checker.fail(join_key(path, "utc_hours"), "must be a list of [start, end] hours UTC, "
                                                  "0 <= start < end <= 24, e.g. [[1, 4], [6, 10]]")
        hours = []
    weekdays_only = peak.get("weekdays_only", False)
    if not isinstance(weekdays_only, bool):
        checker.fail(join_key(path, "weekdays_only"), "must be true or false")
    return dict(price_rates(checker, peak, kinds, path), utc_hours=[tuple(s) for s in hours],
                weekdays_only=weekdays_only is True)


def is_hour_span(span) -> bool:
    """Whether span is [start, end]: whole hours of a day, start before end."""
    return (isinstance(span, list) and len(span) == 2
            and all(isinstance(hour, int) and not isinstance(hour, bool) for hour in span)
            and 0 <= span[0] < span[1] <= 24)


def build_providers(checker: ConfigChecker, entries) -> list:
    """Validate providers[]; names must be unique."""
    if not isinstance(entries, list):
        checker.fail("providers", "must be a list of provider objects")
        return []
    providers, seen = [], set()
    for index, entry in enumerate(entries):
        provider = build_provider(checker, entry, index)
        if provider is None:
            continue
        if provider.name in seen:
            checker.fail("providers[%d].name" % index, "duplicate provider %r" % provider.name)
        seen.add(provider.name)
        providers.append(provider)
    return providers


# 3.3.3 Routes: targets, conditions, patterns
# .............................................................................

def build_routes(checker: ConfigChecker, section, providers: list, declared=()) -> dict:
    """Validate routes: each {provider, model} (or "provider,model") naming a configured
    provider, with optional conditions and fallbacks; longContextThreshold is a number.
    `declared` names the providers the file has, those with problems (not in providers) too."""
    if not isinstance(section, dict):
        checker.fail("routes", "must be an object of route name: {provider, model}")
        return {}
    by_name = dict.fromkeys(declared, None)          # a provider with problems: None
    by_name.update((p.name, p) for p in providers)
    routes = {}
    for name, entry in section.items():
        path = "routes." + name
        if not checker.plain("routes", name):
            continue
        if name == LONG_CONTEXT_THRESHOLD_KEY:
            if not isinstance(entry, int) or isinstance(entry, bool) or entry <= 0:
                checker.fail(path, "must be a positive number of tokens")
            continue
        route = build_route(checker, name, route_entry(entry), by_name)
        if route is not None:
            routes[name] = route
    return routes


def route_entry(value):
    """A route or fallback as an object: "provider,model" (as other routers write it) too."""
    if isinstance(value, str) and "," in value:
        return dict(zip(("provider", "model"), (part.strip() for part in value.split(",", 1))))
    return value


def build_route(checker: ConfigChecker, name: str, entry, providers: dict) -> Route | None:
    """One route: its target, conditions and fallbacks, each naming a configured provider."""
    path = "routes." + name
    if not isinstance(entry, dict):
        checker.fail(path, 'must be {"provider", "model"} or "provider,model"')
        return None
    checker.unknown_keys(entry, ROUTE_KEYS, path)
    target = build_route_target(checker, entry, path, providers)
    conditions = build_conditions(checker, entry.get("conditions", []), path + ".conditions")
    if not conditions and name not in SCENARIOS and name != "default":
        checker.warn(path, "not a scenario route (%s, default) and without conditions: no "
                           "request will use it" % ", ".join(SCENARIOS))
    fallbacks, given = [], entry.get("fallbacks") or []
    if not isinstance(given, list):
        checker.fail(path + ".fallbacks", 'must be a list of {"provider", "model"} or '
                                          '"provider,model"')
        given = []
    for index, fallback in enumerate(given):
        where = "%s.fallbacks[%d]" % (path, index)
        fallback = route_entry(fallback)
        if not isinstance(fallback, dict):
            checker.fail(where, 'must be {"provider", "model"} or "provider,model"')
            continue
        fallbacks.append(build_route_target(checker, fallback, where, providers))
    if target is None or None in fallbacks:
        return None
    return Route(name, target[0], target[1], conditions, fallbacks)


def build_route_target(checker: ConfigChecker, entry: dict, path: str,
                       providers: dict) -> tuple | None:
    """(provider, model) of a route or fallback naming a configured provider; a model the
    provider does not list is warned about (a typo would only show when Claude Code runs)."""
    provider = checker.typed(entry, "provider", path, str, "a provider name")
    model = checker.typed(entry, "model", path, str, "a model name")
    if model is not None and not checker.plain(path + ".model", model):
        return None
    if provider is not None and providers.get(provider) is None:
        checker.fail(path + ".provider", "no provider named %r" % provider if provider not in
                     providers else "provider %r has the problems shown for it" % provider)
        return None
    listed = providers[provider].models if provider else ()
    if model and listed and model not in listed:
        checker.warn(path + ".model", "%r is not among %s's models (%s)" % (
            model, provider, ", ".join(listed)))
    if provider and model:
        warn_if_retired(checker, provider, model, path + ".model")
    return (provider, model) if provider and model else None


def warn_if_retired(checker: ConfigChecker, provider, model: str, path: str) -> None:
    """A warning at path when the preset's provider has retired the model (its calls fail), or
    has said the day it will."""
    day, successor = RETIRED_MODELS.get(str(provider).lower(), {}).get(model, (None, None))
    if day is not None:
        coming = day > time.strftime("%Y-%m-%d", time.gmtime())
        checker.warn(path, "%s %s %r on %s: its calls fail%s; use %r" % (
            provider, "retires" if coming else "retired", model, day,
            " from then" if coming else "", successor))


def build_conditions(checker: ConfigChecker, conditions, path: str) -> list:
    """Route conditions {type, operator, value} (header conditions also name the header)."""
    if not isinstance(conditions, list):
        checker.fail(path, "must be a list of {type, operator, value}")
        return []
    checked = []
    for index, condition in enumerate(conditions):
        where = "%s[%d]" % (path, index)
        if not isinstance(condition, dict):
            checker.fail(where, "must be an object with type, operator and value")
            continue
        kind, operator = condition.get("type"), condition.get("operator", "==")
        if not isinstance(kind, str) or kind not in CONDITIONS:
            checker.fail(where + ".type", "must be one of " + ", ".join(CONDITIONS))
        elif not isinstance(operator, str) or operator not in COMPARISONS:
            checker.fail(where + ".operator", "must be one of " + " ".join(COMPARISONS))
        elif kind == "header" and not isinstance(condition.get("header"), str):
            checker.fail(where + ".header", "must name the request header to test")
        elif operator != "matches" or check_regex(checker, condition.get("value"),
                                                  where + ".value"):
            checked.append(dict(condition, operator=operator))
    return checked


def check_regex(checker: ConfigChecker, value, path: str) -> bool:
    """Whether a config value is a regular expression Python takes (a problem naming path when
    not); one that a later Python will read differently is taken, with a warning."""
    error, warning = regex_problems(str(value))
    if error:
        checker.fail(path, "not a valid regular expression: %s" % error)
    elif warning:
        checker.warn(path, "%s: a later Python will read it differently (in a set, escape [ as "
                           "\\[; Python has no [:alpha:] classes)" % warning)
    return error is None


@functools.lru_cache(maxsize=1024)     # a client's tool schemas come with every request
def regex_problems(pattern: str) -> tuple:
    """(why Python refuses pattern: a \\p{…} class, a possessive, a repeat too large; the
    warning it gives for what a later Python will read differently, such as a nested set), each
    None when there is none. Nothing is printed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as exc:
            return str(exc), None
    return None, (str(caught[0].message) if caught else None)


# 3.3.4 A config built and loaded, and keys other users could read
# .............................................................................

def build_config(raw: dict, source: str | None, environ=None, flags=None,
                 label: str | None = None) -> Config:
    """Layer defaults <- file (raw) <- environment <- flags, validate, and build the Config;
    problems name the file (or `label`, for a config that has none)."""
    environ = os.environ if environ is None else environ
    origins, env_warnings = {}, []
    merged = merge_config(DEFAULT_CONFIG, raw)
    merged = apply_environment(merged, environ, origins, env_warnings)
    merged = apply_flags(merged, flags or {}, origins)
    checker = ConfigChecker(source or label or "defaults", origins)
    clean_top_level(checker, merged)
    merged["performance"] = build_performance(checker, merged.get("performance"))
    networks = build_allowed_networks(checker, merged.get("security"))
    check_management(checker, merged.get("management"))
    providers = build_providers(checker, merged.get("providers"))
    routes = build_routes(checker, merged.get("routes"), providers,
                          [entry.get("name") for entry in list_of(merged.get("providers"))
                           if isinstance(entry, dict) and isinstance(entry.get("name"), str)])
    if checker.problems:
        raise ConfigError("\n".join(checker.problems))
    return Config(merged, source, providers, routes, networks, env_warnings + checker.warnings)


def load_config(config_path: str | None = None, environ=None, flags=None) -> Config:
    """Find and read the config file (if any), then build_config() over it."""
    environ = os.environ if environ is None else environ
    notes = []
    path = find_config_file(config_path, environ, notes)
    content, converted_from = read_router_config(path, notes) if path else ({}, None)
    config = config_from_file_content(content, path, environ, flags)
    config.notes[:0] = notes
    config.converted_from = converted_from
    return config


def config_from_file_content(content: dict, path: str | None, environ, flags,
                             settings: bool = True, label: str = "defaults") -> Config:
    """A Config from a config file's parsed content, remembering how it was made so that it
    can be rebuilt (reload) and written back (provider management). ${VAR} references come
    from environ; so do the CCPROXY_* settings, unless settings is false (an embedded proxy)."""
    if nesting_depth(content) > MAX_CONFIG_DEPTH:
        raise ConfigError(TOO_DEEP % (path or label))
    config = build_config(expand_env_references(content, "", path or label, environ), path,
                          environ if settings else {}, flags, label)
    config.file_content, config.environ, config.flags = content, environ, flags
    exposure = config_file_exposure(path, content)
    if exposure:
        config.warnings.append(exposure)
    return config


def literal_secret_paths(content: dict) -> list:
    """The key paths of a config file's content that hold a key written out, not a ${VAR}."""
    def literal(value) -> bool:
        return isinstance(value, str) and bool(value) and not ENV_REFERENCE_RE.fullmatch(value)
    found = [key for key in ("apikey", "admin_key") if literal(content.get(key))]
    found += ["client_keys.%s" % name for name, key in dict_of(content.get("client_keys")).items()
              if literal(key)]
    for index, entry in enumerate(content.get("providers") or ()):
        if isinstance(entry, dict):
            found += ["providers[%d].api_key" % index] if literal(entry.get("api_key")) else []
            found += ["providers[%d].api_keys[%d]" % (index, number) for number, key in
                      enumerate(list_of(entry.get("api_keys"))) if literal(key)]
            found += ["providers[%d].headers.%s" % (index, name) for name, value in
                      dict_of(entry.get("headers")).items() if literal(value)]
    return found


def config_file_exposure(path: str | None, content: dict) -> str | None:
    """A warning when a config file that others may read holds keys written out."""
    if path is None or os.name == "nt":
        return None
    mode = os.stat(path).st_mode & 0o777
    secrets = literal_secret_paths(content) if mode & 0o044 else []
    if not secrets:
        return None
    return ("%s: readable by other users (mode %04o) and holds a key at %s; run chmod 600 %s, or "
            "use ${VAR} references" % (path, mode, ", ".join(secrets), path))


# -----------------------------------------------------------------------------
# 3.4 A Claude Code Router config, converted when read
# -----------------------------------------------------------------------------
# Its documented shape (github.com/musistudio/claude-code-router, README, checked 2026-12-05):
# APIKEY, HOST, PORT, LOG, API_TIMEOUT_MS, PROXY_URL, Providers [{name, api_base_url (the full
# endpoint), api_key, models, transformer: {use: [name | [name, options]], <model>: {use}}}],
# Router {default, background, think, longContext, longContextThreshold, webSearch, image} as
# "provider,model" strings, $VAR or ${VAR} anywhere in a string.

CCR_SETTINGS = {            # its top-level key -> ccproxy's key path, or why there is none
    "APIKEY": ("apikey",), "HOST": ("host",), "PORT": ("port",), "LOG": ("log",),
    "API_TIMEOUT_MS": ("performance", "request_timeout"),
    "PROXY_URL": "set HTTPS_PROXY in ccproxy's environment instead (provider calls use it)",
    "LOG_LEVEL": "ccproxy logs warnings and, with log, one line per request",
    "NON_INTERACTIVE_MODE": "not needed: `code` passes claude's terminal through",
    "CUSTOM_ROUTER_PATH": "a JavaScript router cannot run here; write routes with conditions",
    "transformers": "JavaScript transformer plugins cannot run here",
}
# Transformers that ccproxy's protocols and presets already are, and those it cannot be.
CCR_BUILT_IN_TRANSFORMERS = {"anthropic", "openai", "deepseek", "gemini", "openrouter", "groq",
                             "reasoning", "cleancache", "sampling", "maxtoken"}
CCR_UNSERVED_TRANSFORMERS = {"vertex-gemini", "gemini-cli", "qwen-cli", "rovo-cli"}
CCR_VARIABLE_RE = re.compile(r"\$(?!\{)([A-Za-z_][A-Za-z0-9_]*)")


def read_router_config(path: str, notes: list):
    """(a config file's content for ccproxy, the router it was converted from or None): a
    Claude Code Router config is converted, with a note per setting that has no equivalent."""
    content = read_config_file(path)
    if "providers" in content or not ({"Providers", "Router"} & set(content)):
        return content, None
    notes.append("%s is a Claude Code Router config, converted (`start --check` prints the "
                 "result to save as a ccproxy config)" % path)
    return ccr_converted(ccr_variables(content), notes), "Claude Code Router"


def ccr_variables(value):
    """Its $VAR references written as ccproxy's ${VAR}, in every string."""
    if isinstance(value, dict):
        return {key: ccr_variables(item) for key, item in value.items()}
    if isinstance(value, list):
        return [ccr_variables(item) for item in value]
    return CCR_VARIABLE_RE.sub(r"${\1}", value) if isinstance(value, str) else value


def ccr_converted(content: dict, notes: list) -> dict:
    """The ccproxy config for a Claude Code Router config's content."""
    converted = {}
    for key, value in content.items():
        target = CCR_SETTINGS.get(key)
        if isinstance(target, tuple):
            place = converted
            for part in target[:-1]:
                place = place.setdefault(part, {})
            place[target[-1]] = ccr_setting(key, value)
        elif key not in ("Providers", "Router") and value not in (False, None, ""):
            notes.append("%s: no equivalent in ccproxy, ignored%s" % (
                key, "; " + target if target else ""))
    converted["providers"] = [ccr_provider(entry, index, notes) for index, entry in
                              enumerate(list_of(content.get("Providers")))]
    converted["routes"] = ccr_routes(dict_of(content.get("Router")), notes)
    return converted


def ccr_setting(key: str, value):
    """A top-level setting's value in ccproxy's terms (a port as a number, seconds for ms)."""
    if key == "PORT" and isinstance(value, str) and value.isdigit():
        return int(value)
    if key == "API_TIMEOUT_MS" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value / 1000
    return value


def ccr_provider(entry, index: int, notes: list) -> dict:
    """One of its Providers as a ccproxy provider: the protocol from its transformers and
    address, the address as a base URL, maxtoken as max_tokens and model limits."""
    entry = dict_of(entry)
    where = "Providers[%d]" % index
    url = str(entry.get("api_base_url") or "")
    transformer = dict_of(entry.get("transformer"))
    uses = [ccr_use(item) for item in list_of(transformer.get("use"))]
    names = {name.lower() for name, _ in uses}
    protocol = ("gemini" if "gemini" in names or "generativelanguage." in url else
                "anthropic" if "anthropic" in names or url.rstrip("/").endswith("/v1/messages")
                else "openai")
    provider = {"name": entry.get("name"), "type": protocol,
                "api_base_url": re.sub(r"/models/?$", "", url) if protocol == "gemini" else url,
                "api_key": entry.get("api_key") or "", "models": list_of(entry.get("models"))}
    for name, options in uses:
        ccr_transformer(provider, name, options, None, "%s.transformer.use" % where, notes)
    for model, settings in ((k, v) for k, v in transformer.items() if k != "use"):
        for name, options in (ccr_use(item) for item in list_of(dict_of(settings).get("use"))):
            ccr_transformer(provider, name, options, model, "%s.transformer.%s" % (where, model),
                            notes)
    unknown = sorted(set(entry) - {"name", "api_base_url", "api_key", "models", "transformer"})
    notes.extend("%s.%s: no equivalent in ccproxy, ignored" % (where, key) for key in unknown)
    return provider


def ccr_use(item) -> tuple:
    """(name, options) of one transformer in a `use` list: "name" or ["name", {options}]."""
    if isinstance(item, list) and item:
        return str(item[0]), dict_of(item[1] if len(item) > 1 else {})
    return str(item), {}


def ccr_transformer(provider: dict, name: str, options: dict, model, where: str,
                    notes: list) -> None:
    """What one transformer means for the converted provider (for one model, or all)."""
    limit = options.get("max_tokens")
    if name == "maxtoken" and isinstance(limit, int):
        if model is None:
            provider["max_tokens"] = limit
        else:
            provider["models"] = [m for m in provider["models"] if m != model] + [
                {"name": model, "max_output_tokens": limit}]
    elif name.lower() in CCR_UNSERVED_TRANSFORMERS:
        provider["enabled"] = False
        notes.append("%s: %r has no equivalent in ccproxy; the provider is disabled" % (
            where, name))
    elif name.lower() not in CCR_BUILT_IN_TRANSFORMERS or (options and name != "maxtoken"):
        notes.append("%s: %r%s has no equivalent in ccproxy, ignored" % (
            where, name, " with options" if options else ""))


def ccr_routes(router: dict, notes: list) -> dict:
    """Its Router as routes: the scenario names are the same, and "provider,model" strings
    are taken as they are."""
    routes = {}
    for name, value in router.items():
        if name == LONG_CONTEXT_THRESHOLD_KEY or (
                name in SCENARIOS or name == "default") and isinstance(value, str):
            routes[name] = value
        elif value:
            notes.append("Router.%s: no equivalent in ccproxy, ignored" % name)
    return routes


###############################################################################
# 4. HTTP/1.1
###############################################################################


# -----------------------------------------------------------------------------
# 4.1 Messages: parsing requests, writing responses (sans-IO)
# -----------------------------------------------------------------------------

REQUEST_LINE_RE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([^\s]+) HTTP/(\d)\.(\d)")
# One header line, anchored at a line start: a block is valid when every line matches.
HEADER_LINE_RE = re.compile(rb"(?m)^([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\r\n\x00]*)\r\n")
CHUNK_SIZE_RE = re.compile(rb"[0-9A-Fa-f]{1,15}")
CHUNKED = -1


class Headers:
    """Request headers: names case-insensitive, repeated headers kept in order."""

    __slots__ = ("_items", "_first")

    def __init__(self, items=()):
        self._items = list(items)
        self._first = {}
        for name, value in self._items:
            self._first.setdefault(name, value)

    def get(self, name: str, default=None):
        return self._first.get(name.lower(), default)

    def get_all(self, name: str) -> list:
        name = name.lower()
        return [v for k, v in self._items if k == name]

    def __repr__(self):
        return "Headers(%r)" % self._items


class Request:
    """One parsed HTTP request; the body is filled in after the head has been admitted."""

    __slots__ = ("method", "target", "path", "query", "version", "headers", "body",
                 "body_text", "body_spans", "record", "rewritten")

    def __init__(self, method: str, target: str, version: str, headers: Headers):
        self.method = method
        self.target = target
        path, _, self.query = target.partition("?")
        self.path = path.rstrip("/") or "/"
        self.version = version
        self.headers = headers
        self.body = b""
        self.body_text = ""
        self.body_spans = {}
        self.record = None            # what happened to it: route, provider, model, usage
        self.rewritten = set()        # top-level body keys ccproxy changed before forwarding

    def drop_body(self) -> None:
        """Let go of the body and its decoded text once they are handled: a stream may run
        for minutes, and a Claude Code body for hundreds of KB."""
        self.body, self.body_text, self.body_spans = b"", "", {}

    @property
    def keep_alive(self) -> bool:
        """HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 only when asked."""
        tokens = {t.strip().lower() for v in self.headers.get_all("connection")
                  for t in v.split(",")}
        if self.version == "HTTP/1.1":
            return "close" not in tokens
        return "keep-alive" in tokens

    def __repr__(self):
        return "Request(%s %s)" % (self.method, self.target)


class Response:
    """An answer: status, headers and either a body or an async iterator of body pieces."""

    __slots__ = ("status", "headers", "body", "stream")

    def __init__(self, status: int = 200, body: bytes = b"", headers=None, stream=None,
                 content_type: str = "application/json"):
        self.status = status
        self.headers = [("content-type", content_type)] + list(headers or ())
        self.body = body
        self.stream = stream

    def __repr__(self):
        return "Response(%d)" % self.status


def json_response(payload, status: int = 200, headers=()) -> Response:
    """A JSON response of payload."""
    return Response(status, JSON_TEXT(payload).encode(), headers)


def parse_request_head(data: bytes) -> Request:
    """Parse a request head (request line and header lines, CRLF-separated) into a Request.

    Leading empty lines are ignored (RFC 9112 §2.2); obsolete line folding, a space before
    the colon, bytes that cannot be in a header, and versions other than HTTP/1.x are errors;
    a later HTTP/1 than 1.1 is read as 1.1, the highest this server speaks (RFC 9110 §2.5).
    The header block is split by one regular expression rather than line by line.
    """
    data = data.lstrip(b"\r\n")
    line_end = data.find(b"\r\n")
    match = REQUEST_LINE_RE.fullmatch(data, 0, line_end)
    if not match:
        raise InvalidRequestError("malformed HTTP request line")
    method, target, major, minor = match.groups()
    if major != b"1":
        raise InvalidRequestError("unsupported HTTP version %s.%s: ccproxy speaks HTTP/1.1 (for "
                                  "curl, leave out --http2-prior-knowledge)"
                                  % (major.decode(), minor.decode()))
    fields = data[line_end + 2:-2]
    pairs = HEADER_LINE_RE.findall(fields)
    if len(pairs) != fields.count(b"\n"):
        raise InvalidRequestError(header_block_problem(fields))
    items = [(name.decode("ascii").lower(), value.rstrip(b" \t").decode("latin-1"))
             for name, value in pairs]
    target_text = target.decode("latin-1")
    if target_text.startswith(("http://", "https://")):
        target_text = "/" + target_text.split("/", 3)[3] if target_text.count("/") >= 3 else "/"
    if not target_text.startswith("/"):
        raise InvalidRequestError("request target must be a path")
    version = "HTTP/1.0" if minor == b"0" else "HTTP/1.1"     # HTTP/1.9 is read as 1.1
    return Request(method.decode("ascii"), target_text, version, Headers(items))


def header_block_problem(fields: bytes) -> str:
    """Why a header block that failed to parse is malformed (only run on failures)."""
    for line in fields.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            return "obsolete header line folding is not accepted"
        if line and not HEADER_LINE_RE.fullmatch(line + b"\r\n"):
            return "malformed header line %r" % line[:80].decode("latin-1")
    return "malformed header block"


def parse_body_framing(headers: Headers) -> int:
    """The body length from Content-Length, CHUNKED, or 0; rejects ambiguous framing. Only
    spaces and tabs around a value are dropped (RFC 9110 §5.6.3): `chunked` followed by a
    vertical tab is no `chunked`, which a proxy in front may have read otherwise."""
    codings = [c.strip(" \t").lower() for v in headers.get_all("transfer-encoding")
               for c in v.split(",") if c.strip(" \t")]
    lengths = {part.strip(" \t") for v in headers.get_all("content-length")
               for part in v.split(",")}
    if codings:
        if lengths:
            raise InvalidRequestError("both Content-Length and Transfer-Encoding are set")
        if codings != ["chunked"]:
            raise InvalidRequestError("unsupported Transfer-Encoding %r: only chunked is accepted"
                                      % ", ".join(codings))
        return CHUNKED
    if not lengths:
        return 0
    if len(lengths) != 1:
        raise InvalidRequestError("conflicting Content-Length values")
    length = lengths.pop()
    if not length.isdigit() or not length.isascii():
        raise InvalidRequestError("invalid Content-Length %r" % length)
    return int(length)


def keeps_connection(request: Request | None, response: Response, body_read: bool,
                     draining: bool) -> bool:
    """Whether the connection may carry another request after this answer: the request was
    read whole (or came without a body) and did not ask to close, the server is not stopping,
    and the answer has an end its client can see (HTTP/1.0 has no chunks: a stream to it ends
    with the connection)."""
    body_read = body_read or (request is not None and carries_no_body(request))
    return body_read and request.keep_alive and not draining and (
        response.stream is None or request.version == "HTTP/1.1")


def carries_no_body(request: Request) -> bool:
    """Whether the request came without a body, so an early answer leaves nothing unread."""
    return not request.headers.get_all("transfer-encoding") and \
        request.headers.get("content-length", "0").strip(" \t") == "0"


def parse_chunk_size(line: bytes) -> int:
    """The size from a chunk-size line (without its CRLF); chunk extensions are ignored."""
    if CHUNK_SIZE_RE.fullmatch(line):            # the usual line: nothing but the size
        return int(line, 16)
    size = line.split(b";", 1)[0].strip(b" \t")
    if not CHUNK_SIZE_RE.fullmatch(size):
        raise InvalidRequestError("invalid chunk size line")
    return int(size, 16)


class ChunkedDecoder:
    """Sans-IO decoder of the chunked transfer coding: feed() raw bytes, get the body's bytes.

    Used on upstream answers, read whatever a socket read returns, so several events that
    arrived together are handed on together. `done` turns true after the last chunk and
    its trailer; bytes after that are ignored. A size or trailer line may run to
    MAX_CHUNK_LINE_BYTES: one that arrives a byte at a time is searched again at every byte,
    which that bound keeps to milliseconds (at 64 KB it held the event loop for 1.4 s).
    """

    def __init__(self):
        self._buffer = b""
        self._remaining = 0            # bytes of chunk data still to come
        self._after_data = False       # the CRLF that ends chunk data is due
        self._in_trailer = False
        self.done = False

    def feed(self, data: bytes) -> bytes:
        buffer = self._buffer + data if self._buffer else data
        pieces, position, end = [], 0, len(buffer)
        while position < end and not self.done:
            if self._remaining:
                take = min(self._remaining, end - position)
                pieces.append(buffer[position:position + take])
                position += take
                self._remaining -= take
                self._after_data = self._remaining == 0
            elif self._after_data:
                if end - position < 2:
                    break
                if buffer[position:position + 2] != b"\r\n":
                    raise InvalidRequestError("chunk data not followed by CRLF")
                position += 2
                self._after_data = False
            else:
                line_end = buffer.find(b"\r\n", position)
                if line_end < 0 or line_end - position > MAX_CHUNK_LINE_BYTES:
                    if end - position > MAX_CHUNK_LINE_BYTES:
                        raise InvalidRequestError("chunk line too long")
                    break
                line, position = buffer[position:line_end], line_end + 2
                self._take_line(line)
                after = position + self._remaining
                if self._remaining and buffer[after:after + 2] == b"\r\n":   # all of it here
                    pieces.append(buffer[position:after])
                    position, self._remaining = after + 2, 0
        self._buffer = buffer[position:]
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    @property
    def expects_more(self) -> bool:
        """Whether the connection's end would cut the body short."""
        return not self.done

    def _take_line(self, line: bytes) -> None:
        if self._in_trailer:
            self.done = not line
            return
        size = parse_chunk_size(line)
        if size:
            self._remaining = size
        else:
            self._in_trailer = True


class LengthDecoder:
    """Sans-IO framing of a body by its Content-Length, or, without one (None), of a body that
    runs until the connection closes: the same feed() and done as ChunkedDecoder."""

    def __init__(self, length: int | None):
        self._remaining = length
        self.done = length == 0

    def feed(self, data: bytes) -> bytes:
        if self._remaining is None:
            return data
        data = data[:self._remaining]
        self._remaining -= len(data)
        self.done = self._remaining == 0
        return data

    @property
    def expects_more(self) -> bool:
        """Whether the connection's end would cut the body short."""
        return bool(self._remaining)


def body_decoder(response):
    """The decoder of an http.client response's body as it comes off the socket."""
    return ChunkedDecoder() if response.chunked else LengthDecoder(response.length)


def build_response_head(status: int, headers) -> bytes:
    """Status line and header lines, ending with the blank line; every value made safe."""
    lines = ["HTTP/1.1 %d %s" % (status, REASON_PHRASES.get(status, "Unknown"))]
    lines.extend("%s: %s" % (name, header_safe(value)) for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def header_safe(value: str) -> str:
    """value fit for a header line: printable ASCII stays, anything else (CR, LF, other
    control characters, non-ASCII such as a model name in another script) is percent-encoded
    as UTF-8, so no value can end a header line or break the response's encoding."""
    if value.isascii() and value.isprintable():
        return value
    return "".join(char if " " <= char <= "~" else "".join(
        "%%%02X" % byte for byte in char.encode("utf-8", "surrogatepass")) for char in value)


# -----------------------------------------------------------------------------
# 4.2 The server: listening, accepting within limits, draining
# -----------------------------------------------------------------------------

DESCRIPTORS_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
PAUSE_LOG_SECONDS = 60.0                         # at most one "not accepting" line this often


def open_listeners(host: str, port: int) -> list:
    """Non-blocking listening sockets on every address host resolves to (all interfaces for
    ""), with a backlog of LISTEN_BACKLOG; with port 0 they share the first free port found."""
    listeners, address = [], (host, port)
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            listener = socket.socket(family, kind, proto)
            listeners.append(listener)
            if os.name != "nt":
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(listeners) > 1:
                address = (address[0], listeners[0].getsockname()[1]) + tuple(address[2:])
            listener.bind(address)
            listener.listen(LISTEN_BACKLOG)
            listener.setblocking(False)
    except OSError as exc:
        for listener in listeners:
            listener.close()
        raise OSError(exc.errno, "cannot listen on %s: %s" % (address[:2], exc.strerror or exc)) \
            from exc
    return listeners


class ProxyServer:
    """The listening server: accepts connections and serves them until stopped, then drains.

    It accepts connections itself, so that it can stop accepting while it serves
    performance.max_connections of them (or runs out of file descriptors): new clients then
    wait in the kernel's queue instead of failing, and the log gets one line, not thousands.
    """

    def __init__(self, config: Config):
        self.app = ProxyApp(config)
        self._listeners = []
        self._accepting = []          # one accept task per listening socket
        self._room = None             # set while fewer than max_connections are open
        self._open_connections = 0
        self._pause_logged_at = -PAUSE_LOG_SECONDS
        self._loop = None
        self._stopping = self._cut = None
        self._grace = None            # seconds in-flight answers get on stop (None: the config's)
        self._stop_asked = False      # a second stop() cuts what is in flight
        self._connections = {}        # task -> ClientConnection

    @property
    def url(self) -> str:
        """The URL a client on this machine uses, the port really bound (loopback for a
        wildcard host)."""
        return client_url(*self.app.listen_address)

    async def start(self) -> None:
        """Bind and listen; raises OSError when the address cannot be bound."""
        config = self.app.config
        self._loop = asyncio.get_running_loop()
        self._stopping, self._cut = asyncio.Event(), asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._listeners = open_listeners(config.host, config.port)
        self.app.listen_address = (config.host, self._listeners[0].getsockname()[1])
        self._accepting = [self._loop.create_task(self._accept_loop(listener))
                           for listener in self._listeners]

    async def _accept_loop(self, listener) -> None:
        """Accept connections while there is room; pause while there is none."""
        while True:
            await self._room.wait()
            try:
                sock, _ = await self._loop.sock_accept(listener)
            except OSError as exc:
                if listener.fileno() < 0:
                    return
                if exc.errno in DESCRIPTORS_EXHAUSTED:
                    self._note_pause("the process is out of file descriptors (%s)" % exc.strerror)
                    await asyncio.sleep(ACCEPT_RETRY_SECONDS)
                continue
            self._open_connections += 1
            if self._open_connections >= self.app.config.max_connections:
                self._room.clear()
                self._note_pause("%d connections are open (performance.max_connections)"
                                 % self._open_connections)
            self._loop.create_task(self._serve_socket(sock))

    def _note_pause(self, reason: str) -> None:
        now = time.monotonic()
        if now - self._pause_logged_at >= PAUSE_LOG_SECONDS:
            self._pause_logged_at = now
            log.warning("not accepting new connections for now: %s; new clients wait in the "
                        "queue until a connection closes", reason)

    async def _serve_socket(self, sock) -> None:
        """Serve one accepted connection, then make room for the next."""
        try:
            reader = ClientStreamReader(limit=MAX_HEADER_BYTES)
            protocol = asyncio.StreamReaderProtocol(reader)
            transport, _ = await self._loop.connect_accepted_socket(lambda: protocol, sock)
            writer = asyncio.StreamWriter(transport, protocol, reader, self._loop)
            await self._accept(reader, writer)
        except OSError:
            sock.close()
        finally:
            self._open_connections -= 1
            if self._open_connections < self.app.config.max_connections:
                self._room.set()
            self.app.memory.after_burst()

    async def serve(self, on_ready=None) -> None:
        """Start, call on_ready(self), and serve until stop() is called. Meanwhile the records
        of the `ccproxy` logger, wherever they go (the CLI's log, or an embedding program's
        handlers), have this server's secrets masked and control characters escaped."""
        safe_log = SafeLogFilter(lambda: self.app.config.masker)
        log.addFilter(safe_log)
        try:
            await self._serve(on_ready)
        finally:
            log.removeFilter(safe_log)

    async def _serve(self, on_ready) -> None:
        await self.start()
        watch_config_file(self.app)
        keep_usage(self.app)
        self.app.phase = "ready"
        if on_ready is not None:
            on_ready(self)
        try:
            await self._stopping.wait()
        finally:
            await self._shutdown()
            self.app.upstream.join()

    def stop(self, grace: float | None = None) -> None:
        """Ask the server to stop, letting answers in flight finish for `grace` seconds (default
        performance.shutdown_timeout); safe from any thread and from signal handlers. serve()
        returns once the server has drained. /ready answers 503 from now on. Asked again
        (a second Ctrl-C), it cuts what is still in flight at once."""
        again = self._stop_asked
        if not again:
            self._grace = grace
        self.app.phase = "draining"
        if self._loop is not None and self._stopping is not None:
            self._stop_asked = True
            try:
                self._loop.call_soon_threadsafe((self._cut if again else self._stopping).set)
            except RuntimeError:          # the loop has already ended: nothing to stop
                pass

    async def _accept(self, reader, writer) -> None:
        task = asyncio.current_task()
        connection = ClientConnection(self.app, reader, writer)
        self._connections[task] = connection
        if self.app.draining:
            connection.close_if_idle()
        try:
            await connection.run()
        except asyncio.CancelledError:     # the end of the grace period cuts what is left
            pass
        except Exception:
            log.exception("connection handler failed")
        finally:
            self._connections.pop(task, None)

    def _stop_accepting(self) -> None:
        for task in self._accepting:
            task.cancel()
        for listener in self._listeners:
            listener.close()

    async def _shutdown(self) -> None:
        """Stop accepting, end idle connections, let answers in flight finish within
        shutdown_timeout, then cut what is left. First, for performance.drain_delay, it goes on
        serving as before, so that a balancer probing /ready has seen the 503 when it stops."""
        if self._grace is None and self.app.config.drain_delay:
            await self._unless_cut(asyncio.sleep(self.app.config.drain_delay),
                                   self.app.config.drain_delay)
        self._stop_accepting()
        self.app.draining = True
        for connection in list(self._connections.values()):
            connection.close_if_idle()
        if self._connections:
            grace = self.app.config.shutdown_timeout if self._grace is None else self._grace
            log.info("stopping: %d open connection%s may finish within %g s; stop again "
                     "(Ctrl-C) to cut them now", len(self._connections),
                     "s" if len(self._connections) > 1 else "", grace)
            await self._unless_cut(asyncio.wait(list(self._connections)), grace)
        self.app.close("ccproxy is shutting down; the answer was cut")
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=STOP_MARGIN_SECONDS / 2)
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=5)
        await asyncio.gather(*self._accepting, return_exceptions=True)
        stop_keeping_usage(self.app)

    async def _unless_cut(self, waiting, seconds: float) -> None:
        """Await waiting for at most seconds, or until stop() is asked again."""
        waiting, cut = asyncio.ensure_future(waiting), asyncio.ensure_future(self._cut.wait())
        try:
            await asyncio.wait([waiting, cut], timeout=seconds,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            cut.cancel()
        if self._cut.is_set():
            log.info("stopping now: what was still in flight is cut")


class ProxyThread:
    """A proxy serving from its own event loop in a daemon thread, made by serve_in_thread().
    `url` is where it listens; close() drains and ends it; a `with` block closes it."""

    def __init__(self, config: Config):
        self._server = ProxyServer(config)
        self._ready = threading.Event()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="ccproxy-server", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve(on_ready=lambda server: self._ready.set()))
        except BaseException as exc:          # handed to the caller's thread by _start()
            self._error = exc
        finally:
            self._ready.set()

    def _start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    @property
    def url(self) -> str:
        """http://host:port, the port really bound."""
        return self._server.url

    @property
    def app(self) -> ProxyApp:
        return self._server.app

    def close(self, timeout: float | None = None) -> None:
        """Stop as SIGTERM stops the CLI's server: answers in flight may finish for `timeout`
        seconds (default performance.shutdown_timeout) or end with an SSE error event; returns
        once the thread has ended and the port is closed."""
        self._server.stop(timeout)
        self._thread.join()

    def __enter__(self) -> ProxyThread:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self):
        return "ProxyThread(%s)" % self.url


def serve_in_thread(config, host: str = DEFAULT_HOST, port: int = 0) -> ProxyThread:
    """Run a proxy inside this program: `config` is a dict shaped like the config file (same
    keys, ${VAR} from the environment, same validation), a config file's path, or a Config.
    Returns once it listens on host:port (0: a free port); raises ConfigError or OSError in the
    caller's thread otherwise, leaving nothing running. No signal handler, log handler, pidfile
    or file of its own; the CCPROXY_* environment settings are the CLI's, not applied here."""
    flags = {"host": host, "port": port}
    checker = ConfigChecker("serve_in_thread()", {})
    check_listen_address(checker, flags)
    if checker.problems:
        raise ConfigError("\n".join(checker.problems))
    if isinstance(config, Config):
        built = copy.copy(config)
        built.host, built.port = host, port
    elif isinstance(config, dict):
        built = config_from_file_content(config, None, os.environ, flags, settings=False,
                                         label="config")
    else:
        path = find_config_file(os.fspath(config), {}, [])
        built = config_from_file_content(read_router_config(path, [])[0], path, os.environ,
                                         flags, settings=False)
    proxy = ProxyThread(built)
    proxy._start()
    return proxy


# -----------------------------------------------------------------------------
# 4.3 Connections: keep-alive, limits, timeouts, streaming
# -----------------------------------------------------------------------------

class Deadline:
    """A timeout moved on many times a second, on one timer: set() pushes the deadline later
    without a new timer (the timer, when it fires early, moves itself on), pause() lets it
    lapse, clear() ends it for good, forgetting the callback (mostly a bound method of the
    owner, which then needs no garbage collection to go); callback() runs once the latest
    deadline has passed."""

    __slots__ = ("_loop", "_callback", "_when", "_timer")

    def __init__(self, loop, callback):
        self._loop, self._callback = loop, callback
        self._when = None
        self._timer = None

    def set(self, seconds: float) -> None:
        self._when = when = self._loop.time() + seconds
        if self._timer is None or self._timer.when() > when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(when, self._fire)

    def pause(self) -> None:
        self._when = None

    def clear(self) -> None:
        self._when = self._callback = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        if self._when is None or self._callback is None:
            return
        if self._loop.time() < self._when:
            self._timer = self._loop.call_at(self._when, self._fire)
            return
        self._when = None
        self._callback()


class ClientStreamReader(asyncio.StreamReader):
    """A StreamReader that reports the end of the client's side of the connection.

    The end arrives while the proxy is busy with an upstream call and not reading, so it is
    taken from the protocol's own notification rather than from a read kept pending.
    """

    on_end = None
    _awaiting_head = False        # a request head is being read
    _tail = b""                   # the last bytes of the head received so far

    def watch_head(self, awaiting: bool) -> None:
        """While awaiting, fail a request head that ends in a bare LF's empty line at once."""
        self._awaiting_head, self._tail = awaiting, b""

    def feed_data(self, data):
        if self._awaiting_head:       # first, so that a read waiting is woken with the error
            self._refuse_bare_line_feeds(data)
        super().feed_data(data)

    def _refuse_bare_line_feeds(self, data: bytes) -> None:
        """Fail the head being read at once when it ends in an empty line made of a bare LF
        (a hand-typed request through nc): it would otherwise wait for the header timeout.
        The seam with the bytes before is searched too, and nothing after the head's end."""
        seam, self._tail = self._tail + data[:3], (self._tail + data[-3:])[-3:]
        if b"\r\n\r\n" in seam:
            return
        head_end = data.find(b"\r\n\r\n")
        if b"\n\n" in seam or data.find(b"\n\n", 0, len(data) if head_end < 0 else head_end) >= 0:
            self.set_exception(InvalidRequestError(
                "request lines must end in CRLF (\\r\\n), not a bare LF (with nc, use nc -C)"))

    def feed_eof(self):
        super().feed_eof()
        if self.on_end is not None:
            self.on_end()

    def set_exception(self, exc):
        super().set_exception(exc)
        if self.on_end is not None:
            self.on_end()


class ClientConnection:
    """Serves the requests of one client connection in turn, keep-alive included.

    Lifecycle of a request: read the head (header timeout, 64 KiB limit), find its endpoint,
    admit it (access rules), read the body (size limit, 100-continue), handle it, write the
    answer. Errors before the body is read close the connection, since the unread body would
    be taken for the next request. Timeouts are one Deadline moved on per wait, not a task per
    read.
    """

    def __init__(self, app, reader: ClientStreamReader, writer: asyncio.StreamWriter):
        self._app = app
        self._reader = reader
        self._writer = writer
        self._peer = parse_peer_address(writer.get_extra_info("peername"))
        self._peer_user_found = None      # (user id or None), once asked
        self._deadline = Deadline(asyncio.get_running_loop(), self._expire)
        self._timeout_error = None    # makes what a client out of time is told, if anything
        self._body_deadline = 0.0
        self._request_left_unread = False   # answered before its body was read
        self.busy = False             # a request is being served

    def _peer_user(self) -> int | None:
        """The user a loopback client runs as, when that decides access (no client keys) and
        the system says: asked of the kernel once per connection, and only then."""
        if self._app.config.client_keys_in_use or self._peer is None \
                or not self._peer.is_loopback:
            return None
        if self._peer_user_found is None:
            self._peer_user_found = (loopback_peer_user(
                self._writer.get_extra_info("sockname"), self._writer.get_extra_info("peername")),)
        return self._peer_user_found[0]

    def close_if_idle(self) -> None:
        """End a connection that waits for its next request (used when draining)."""
        if not self.busy:
            self._writer.close()

    async def run(self) -> None:
        idle_timeout = self._app.config.header_timeout
        try:
            while True:
                head = await self._read_head(idle_timeout)
                if head is None:
                    return
                keep_open = await self._serve(head)
                if not keep_open:
                    if self._request_left_unread:
                        await self._linger()
                    return
                idle_timeout = self._app.config.keepalive_timeout
        except (ConnectionError, ClientDisconnected):
            return
        finally:
            self._deadline.clear()
            self._reader.on_end = None
            self._writer.close()

    async def _linger(self) -> None:
        """After an answer given before the request was read whole: end the answer (a FIN),
        then read and drop what the client still sends, for LINGER_SECONDS at most. Closed
        with bytes unread, the connection would be reset, and a reset can take the answer out
        of the client's buffers before it is read (Node's fetch then says ECONNRESET, not
        413)."""
        try:
            await self._writer.drain()
            if self._writer.can_write_eof():
                self._writer.write_eof()
            self._arm(LINGER_SECONDS)
            while await self._reader.read(BODY_READ_SLICE_BYTES):
                pass
        except (ConnectionError, ProxyError):
            pass
        finally:
            self._disarm()

    def cancel_on_disconnect(self, callback) -> None:
        """Call callback() if the client closes its connection before its answer is done."""
        if self._reader.at_eof() or self._reader.exception() is not None:
            callback()
        self._reader.on_end = callback

    def _arm(self, seconds: float, make_error=None) -> None:
        """Close the connection after seconds, first answering 408 with make_error() if given
        (a function, so no error is made for the usual request that is on time)."""
        self._timeout_error = make_error
        self._deadline.set(seconds)

    def _disarm(self) -> None:
        self._deadline.pause()

    def _expire(self) -> None:
        if self._timeout_error is not None:
            self._answer_last(self._timeout_error())
        self._writer.close()          # the pending read then ends and run() returns

    def _answer_last(self, error: ProxyError) -> None:
        """Write error as the connection's last answer, without waiting for it to drain."""
        request_id = self._app.next_request_id()
        self._writer.write(self._response_bytes(None, error.response(request_id), request_id,
                                                False))

    async def _read_head(self, idle_timeout: float) -> bytes | None:
        """The next request head, or None when the client closed, idled out or was too slow."""
        header_timeout, reader = self._app.config.header_timeout, self._reader
        try:
            self._arm(idle_timeout, None)
            reader.watch_head(True)
            first = await reader.read(1)
            if not first:
                return None
            if first == TLS_HANDSHAKE_RECORD:
                await self._refuse_tls()
                return None
            self._arm(header_timeout, lambda: RequestTimeoutError(
                "request head not received within %g s" % header_timeout))
            return first + await reader.readuntil(b"\r\n\r\n")
        except InvalidRequestError as error:     # set on the reader, which drain() would raise
            self._answer_last(error)
            return None
        except asyncio.LimitOverrunError:
            self._disarm()
            await self._send_error(HeaderTooLargeError("request header block is larger than %d "
                                                       "bytes" % MAX_HEADER_BYTES))
            await self._linger()
            return None
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        finally:
            reader.watch_head(False)
            self._disarm()

    async def _serve(self, head: bytes) -> bool:
        """Answer one request; True when the connection may carry another."""
        app = self._app
        request_id = app.next_request_id()
        started = time.monotonic()
        request = None
        body_read = False
        app.requests_active += 1
        self.busy = True
        try:
            try:
                request = parse_request_head(head)
                request.record = {"id": request_id, "started": started}
                endpoint = find_endpoint(request)
                client = check_access(app.config, self._peer, request,
                                      endpoint in MANAGEMENT_HANDLERS, self._peer_user())
                if client is not None:
                    request.record["client"] = client
                app.check_rate(self._peer, request)
                await self._read_body(request)
                body_read = True
                response = await endpoint(app, request, self)
                if response.stream is not None:
                    request.drop_body()
            except ProxyError as error:
                error.message = app.config.masker.text(error.message)   # any secret, any form
                response = error.response(request_id)
            except (ClientDisconnected, ConnectionError):
                raise
            except Exception:
                log.exception("%s: internal error", request_id)
                response = InternalError().response(request_id)
            keep_open = keeps_connection(request, response, body_read, app.draining)
            self._request_left_unread = not (body_read or request and carries_no_body(request))
            await self._write_response(request, response, request_id, keep_open)
        finally:
            app.requests_active -= 1
            self._reader.on_end = None
            self.busy = False
        app.count_response(request, response.status)
        app.memory.after_burst()
        return keep_open

    async def _read_body(self, request: Request) -> None:
        """Read the body by Content-Length or chunked coding, within the size limit and the
        body timeout (a total: a body that trickles in is cut as surely as one that stalls)."""
        length = parse_body_framing(request.headers)
        limit = self._app.config.max_body_bytes
        self._body_deadline = time.monotonic() + self._app.config.body_timeout
        if length > limit:
            raise RequestTooLargeError("request body of %d bytes exceeds the limit of %d bytes"
                                       % (length, limit))
        if length == 0:
            return
        if (request.headers.get("expect", "").lower() == "100-continue"
                and request.version == "HTTP/1.1"):
            self._writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if length == CHUNKED:
            request.body = await self._read_chunked(limit)
        else:
            request.body = await self._read_exactly(length)

    async def _read_exactly(self, length: int) -> bytes:
        """Read length bytes, each slice within the header timeout (an inactivity limit)."""
        parts = []
        while length > 0:
            part = await self._timed(self._reader.readexactly(min(length, BODY_READ_SLICE_BYTES)))
            parts.append(part)
            length -= len(part)
        return b"".join(parts)

    async def _read_chunked(self, limit: int) -> bytes:
        parts, total = [], 0
        while True:
            size = parse_chunk_size((await self._read_line())[:-2])
            if size == 0:
                while await self._read_line() != b"\r\n":     # trailer fields are dropped
                    pass
                return b"".join(parts)
            total += size
            if total > limit:
                raise RequestTooLargeError("request body exceeds the limit of %d bytes" % limit)
            parts.append(await self._read_exactly(size))
            if await self._read_exactly(2) != b"\r\n":
                raise InvalidRequestError("chunk data not followed by CRLF")

    async def _read_line(self) -> bytes:
        try:
            return await self._timed(self._reader.readuntil(b"\r\n"))
        except asyncio.LimitOverrunError:
            raise InvalidRequestError("chunk line too long") from None

    async def _timed(self, awaitable):
        """Await a body read; a pause longer than the header timeout, or a body not whole within
        the body timeout, ends with 408."""
        config = self._app.config
        left = self._body_deadline - time.monotonic()
        if left < config.header_timeout:
            error = lambda: RequestTimeoutError(  # noqa: E731
                "request body not received within %g s (performance.body_timeout)"
                % config.body_timeout)
        else:
            left = config.header_timeout
            error = lambda: RequestTimeoutError(  # noqa: E731
                "request body paused for more than %g s (performance.header_timeout)" % left)
        self._arm(max(left, 0.0), error)
        try:
            return await awaitable
        except asyncio.IncompleteReadError:
            raise ClientDisconnected() from None
        finally:
            self._disarm()

    async def _refuse_tls(self) -> None:
        """A client began a TLS handshake on this plain-HTTP port (it was given https://): a
        400 it fails on at once, rather than a wait for the header timeout, and a warning in
        the log the first time."""
        if not self._app.tls_refused:
            self._app.tls_refused = True
            log.warning("a client at %s began a TLS handshake: ccproxy speaks plain HTTP, so "
                        "give clients http://, not https://", self._peer)
        await self._send_error(InvalidRequestError("this port speaks plain HTTP: use http://, "
                                                   "not https://"))

    async def _send_error(self, error: ProxyError) -> None:
        request_id = self._app.next_request_id()
        await self._write_response(None, error.response(request_id), request_id, keep_open=False)

    @staticmethod
    def _response_bytes(request, response: Response, request_id: str, keep_open: bool) -> bytes:
        """The head of a response, with its body when the body is whole and not for HEAD.

        A stream goes out chunked to HTTP/1.1 clients and close-delimited to HTTP/1.0 ones.
        A provider's own request-id, relayed, is kept instead of the proxy's.
        """
        headers = list(response.headers)
        if not any(name == "request-id" for name, _ in headers):
            headers.append(("request-id", request_id))
        if not keep_open:
            headers.append(("connection", "close"))
        if response.stream is None:
            headers.append(("content-length", str(len(response.body))))
        elif request.version == "HTTP/1.1":
            headers.append(("transfer-encoding", "chunked"))
        head = build_response_head(response.status, headers)
        if response.stream is not None or (request is not None and request.method == "HEAD"):
            return head
        return head + response.body

    async def _write_response(self, request, response: Response, request_id: str,
                              keep_open: bool) -> None:
        """Write a response: at once when whole, piece by piece when streamed. One that cannot
        be written (a bug) becomes a 500; a stream is released however writing ends."""
        stream = response.stream
        try:
            try:
                head = self._response_bytes(request, response, request_id, keep_open)
            except Exception:
                log.exception("%s: the answer could not be written", request_id)
                response = InternalError().response(request_id)
                head = self._response_bytes(request, response, request_id, keep_open)
            if response.stream is None:
                self._writer.write(head)
                await self._writer.drain()
            else:
                await self._write_stream(stream, head, request.version == "HTTP/1.1",
                                         request.record)
        finally:
            if stream is not None:
                await stream.aclose()

    async def _write_stream(self, stream, head: bytes, chunked: bool, record) -> None:
        """Write the head with the first piece, each piece as it comes, and the stream's ending
        with the end of the chunked body: the usual piece goes out in one send, without a wait
        (the writer is drained only when the client has not taken everything yet, or has
        gone). A bug mid-stream still ends with an error event."""
        writer = self._writer
        transport = writer.transport
        unsent = head

        def write(piece: bytes, last: bytes = b"") -> bool:
            nonlocal unsent
            data = (b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece) if piece else b""
            if unsent:
                if record is not None:
                    record["first_byte"] = time.monotonic()
                data, unsent = unsent + data, b""
            writer.write(data + last if last else data)
            return bool(transport.get_write_buffer_size() or transport.is_closing())
        self._app.active_streams += 1
        try:
            try:
                ending = await stream.send(write, writer.drain)
            except (ClientDisconnected, ConnectionError):
                raise
            except Exception:
                log.exception("stream relay failed")
                ending = InternalError().event()
            write(ending, b"0\r\n\r\n" if chunked else b"")
            await writer.drain()
        finally:
            self._app.active_streams -= 1



###############################################################################
# 5. Access
###############################################################################

def parse_peer_address(peername):
    """The client's IP address from a socket peername; IPv4-mapped IPv6 becomes IPv4."""
    if not peername:
        return None
    host = peername[0] if isinstance(peername, tuple) else str(peername)
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=64)
def names_loopback(host: str) -> bool:
    """Whether a host name or address (no brackets, no port) is this machine's loopback:
    a loopback address, localhost, or a name under it (RFC 6761; browsers never ask DNS).
    Asked of every request's Host, so the few answers are remembered (parsing an address
    took a twentieth of what the event loop spends to start a stream)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        name = host.lower().rstrip(".")
        return name == "localhost" or name.endswith(".localhost")


# Linux's socket table, asked as `ss` asks it: one socket by its addresses (sock_diag).
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST = 4, 20, 1
INET_DIAG_NO_COOKIE = 0xFFFFFFFF
INET_DIAG_UID_OFFSET = 80          # netlink header (16), inet_diag_msg's uid after 64 bytes


def loopback_peer_user(sockname, peername) -> int | None:
    """The user id of the program at the other end of a loopback TCP connection, from Linux's
    socket table (about 8 µs); None on other systems, or when the kernel does not say."""
    if not hasattr(socket, "AF_NETLINK") or not sockname or not peername:
        return None
    unmapped = [address[7:] if address.startswith("::ffff:") and "." in address else address
                for address in (peername[0], sockname[0])]
    family = socket.AF_INET6 if ":" in unmapped[0] else socket.AF_INET
    try:
        client, server = (socket.inet_pton(family, address) for address in unmapped)
        request = struct.pack("=BBBBL", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + (
            struct.pack("!HH16s16s", peername[1], sockname[1], client, server)) + (
            struct.pack("=LLL", 0, INET_DIAG_NO_COOKIE, INET_DIAG_NO_COOKIE))
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as table:
            table.settimeout(1)
            table.send(struct.pack("=LHHLL", 16 + len(request), SOCK_DIAG_BY_FAMILY,
                                   NLM_F_REQUEST, 1, 0) + request)
            answer = table.recv(8192)
    except (OSError, ValueError):
        return None
    if len(answer) < INET_DIAG_UID_OFFSET + 4 or answer[4:6] != struct.pack(
            "=H", SOCK_DIAG_BY_FAMILY):
        return None
    return struct.unpack_from("=L", answer, INET_DIAG_UID_OFFSET)[0]


def another_users_program(config: Config, peer_user: int | None) -> bool:
    """Whether a loopback client of a proxy without client keys runs as another user of this
    machine (not ccproxy's user, not root): on a shared machine, everyone else's programs
    could otherwise spend the user's credits and change where their prompts go."""
    if config.client_keys_in_use or peer_user in (None, 0):
        return False
    return peer_user != (os.geteuid() if hasattr(os, "geteuid") else None)


def host_name(host: str) -> str:
    """The name or address in a Host header: no brackets, no port."""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def client_keys_presented(headers: Headers) -> list:
    """The keys the client presented: x-api-key, then Authorization: Bearer. Claude Code sends
    both when its settings have an apiKeyHelper (the helper's key as x-api-key, the proxy's
    as the token): either may be the one asked for."""
    keys = [headers.get("x-api-key") or ""]
    scheme, _, token = headers.get("authorization", "").partition(" ")
    keys.append(token.strip() if scheme.lower() == "bearer" else "")
    return [key for key in keys if key]


def check_access(config: Config, peer, request: Request, management: bool = False,
                 peer_user: int | None = None):
    """Admit the request or raise: web pages, allow-list, then the loopback rule or the
    proxy's keys. Returns the client_keys name of the key presented (None for the apikey, or
    no key).

    A browser's request for a page of another origin is never served. With no apikey and no
    client_keys, only loopback peers are served, whatever address is bound: requests addressed
    to this machine, from programs of ccproxy's own user (peer_user, where the system says).
    With them, every request but the public ones (/ and /health) must present one.
    Management (changing providers) needs more than a client's key: the admin_key, or without
    one, a loopback peer.
    """
    accepted = config.client_keys_in_use
    if peer is None:
        raise PermissionDeniedError("cannot determine the client's address")
    refuse_other_web_pages(request.headers)
    if not accepted:
        refuse_other_host_names(config, request.headers)
    if config.allowed_networks and not any(peer in net for net in config.allowed_networks):
        raise PermissionDeniedError("client address %s is not in security.allowed_ips" % peer)
    if not accepted and not peer.is_loopback:
        raise PermissionDeniedError("ccproxy serves only loopback clients when no apikey is "
                                    "configured; set apikey to accept %s" % peer)
    if another_users_program(config, peer_user):
        raise PermissionDeniedError(
            "without an apikey ccproxy serves only the programs of the user it runs as (and "
            "root); this client runs as user %d: set apikey (or client_keys) to serve the other "
            "users of this machine" % peer_user)
    if management and config.admin_key:
        check_key(request, {"": config.admin_key}, lambda: "the admin_key")
    elif management and not peer.is_loopback:
        raise PermissionDeniedError("providers can be changed only from this machine unless "
                                    "admin_key is configured")
    elif accepted and request.path not in PUBLIC_PATHS:
        return check_key(request, accepted, lambda: client_keys_wanted(config))
    return None


def refuse_other_web_pages(headers: Headers) -> None:
    """Raise for a request a web page made a browser send to ccproxy from another origin: the
    page could spend the user's credits, or read and change ccproxy, with no key to guess
    (a plain-text POST needs no CORS preflight). Browsers say so in Origin and Sec-Fetch-Site;
    other clients send neither. ccproxy's own status page is the same origin."""
    origin, site = headers.get("origin"), headers.get("sec-fetch-site", "")
    if site.lower() in ("cross-site", "same-site") or origin is not None and not same_origin(
            origin, headers.get("host")):
        raise PermissionDeniedError("ccproxy does not answer requests a web page sends from "
                                    "another origin (%s): only its own status page may use it "
                                    "from a browser" % (origin or "sec-fetch-site: " + site))


def same_origin(origin: str, host: str | None) -> bool:
    """Whether an Origin header names the address the request was sent to (its Host)."""
    try:
        return bool(host) and urllib.parse.urlsplit(origin).netloc.lower() == host.lower()
    except ValueError:                                   # "http://[": no URL at all
        return False


def refuse_other_host_names(config: Config, headers: Headers) -> None:
    """Without client keys, raise for a request addressed to a name that is not this machine:
    a web page whose name the attacker points at 127.0.0.1 (DNS rebinding) is same-origin to
    the browser, so it could read ccproxy's answers and change its providers; and a reverse
    proxy passing its public name would serve everyone with no key."""
    host = headers.get("host")
    name = host_name(host) if host is not None else None
    if name is not None and not names_loopback(name) and name.lower() != config.host.lower():
        raise PermissionDeniedError(
            "the request is addressed to %s, not to this machine: without apikey or client_keys "
            "ccproxy answers only requests to localhost or a loopback address (a guard against "
            "DNS rebinding); set apikey to serve other names" % host[:200])


def client_keys_wanted(config: Config) -> str:
    """How a 401 names the keys a client may present."""
    return " or ".join(setting for setting, wanted in (
        ("the apikey", config.apikey), ("a key in client_keys", config.client_keys)) if wanted)


def check_key(request: Request, keys: dict, wanted):
    """The name of the key in keys (name -> key) the request presents, None for the name "";
    401 when it presents none of them, naming what wanted() says is asked for (worded only
    then: this runs at every request). Every key is compared, each in constant time."""
    presented = client_keys_presented(request.headers)
    if not presented:
        raise AuthenticationError("missing API key (this needs %s): send it as x-api-key or "
                                  "Authorization: Bearer" % wanted()).made_final()
    found = None
    for given in presented:
        given = given.encode("utf-8", "surrogateescape")
        for name, key in keys.items():
            if hmac.compare_digest(given, key.encode("utf-8", "surrogateescape")) and found is None:
                found = name
    if found is None:
        raise AuthenticationError("invalid API key (this needs %s)" % wanted()).made_final()
    return found or None


class TokenBucket:
    """`per_minute` requests a minute on average, bursts of up to `burst`."""

    def __init__(self, per_minute: int, burst: int):
        self._rate = per_minute / 60.0
        self._capacity = float(burst)
        self._tokens = float(burst)
        self._updated = time.monotonic()

    def take(self) -> float:
        """0 when a request may go now, else the seconds until one may."""
        now = time.monotonic()
        self._tokens = min(self._capacity, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self._rate


class RateLimiter:
    """A token bucket per client address. A key a client presents is not checked here, so
    rotating made-up keys gains nothing; at MAX_RATE_BUCKETS clients, the least recently seen
    is forgotten first."""

    def __init__(self):
        self.buckets = collections.OrderedDict()      # client address -> TokenBucket

    def check(self, client: str, per_minute: int, burst: int) -> None:
        """Take one request from the client's bucket, or raise 429 with retry-after."""
        bucket = self.buckets.get(client)
        if bucket is None:
            if len(self.buckets) >= MAX_RATE_BUCKETS:
                self.buckets.popitem(last=False)
            bucket = self.buckets[client] = TokenBucket(per_minute, burst)
        else:
            self.buckets.move_to_end(client)
        wait = bucket.take()
        if wait:
            raise RateLimitError("rate limit of %d requests per minute exceeded; retry in %d s"
                                 % (per_minute, math.ceil(wait)),
                                 [("retry-after", str(math.ceil(wait)))])



###############################################################################
# 6. Endpoints
###############################################################################


# -----------------------------------------------------------------------------
# 6.1 The app and the request body
# -----------------------------------------------------------------------------

class ProxyApp:
    """State shared by every connection: config, counters, the upstream worker pool."""

    def __init__(self, config: Config):
        self.config = config
        self.started_at = time.time()
        self.listen_address = (config.host, config.port)
        self.requests_total = 0
        self.requests_active = 0
        self.status_counts = {}
        self.upstream = Upstream(config.worker_threads, max(
            UPSTREAM_IDLE_WHEN_QUIET, config.max_connections // UPSTREAM_IDLE_SHARE))
        self.draining = False         # shutting down: answer in-flight requests, take no more
        self.phase = "starting"       # then "ready", then "draining" once asked to stop
        self.tls_refused = False      # a client has spoken TLS to this port (logged once)
        self.config_signature = file_signature(config.source)
        self.config_problem = None    # why the file, edited since, did not load (it still runs)
        self.usage_kept = None        # (usage_file, its lock) while this server keeps it
        self.active_streams = 0
        self.metrics = Metrics()
        self.failover = Failover()
        self.rate_limiter = RateLimiter()
        self.key_pools = {}           # provider name -> KeyPool, for providers with api_keys
        self.usage = UsageLedger()
        self.memory = MemoryReturn(self)
        self.background = set()       # tasks of the server's own (kept: asyncio holds weakly)
        self._inbox = None
        self._request_ids = itertools.count(1)
        self._request_id_prefix = os.urandom(4).hex()

    async def off_the_loop(self, request: Request, function, *args):
        """function(*args), on a worker thread when the request's body is large: the event
        loop serves everyone else meanwhile (taking its turn at each of Python's thread
        switches) instead of stopping for as long as a large request takes to read, check, route
        and translate. A small one is done here, quicker than a thread's round trip. Each
        step walks the client's body: one that runs out of stack on the way is a 400."""
        try:
            if len(request.body or b"") < OFFLOADED_BODY_BYTES:
                return function(*args)
            return await self.upstream.run(function, *args)
        except RecursionError:
            raise InvalidRequestError("the request nests too deeply to check, route and "
                                      "translate (hundreds of levels)") from None

    def refresh_loaded_windows(self) -> None:
        """Have each enabled provider that runs models with a context length of its own
        (Ollama) say them, at most every LOADED_WINDOWS_EVERY_SECONDS, in the background."""
        now = time.monotonic()
        for provider in self.config.providers:
            if provider.runs_models_itself and provider.enabled \
                    and now - provider.windows_asked >= LOADED_WINDOWS_EVERY_SECONDS:
                provider.windows_asked = now
                task = asyncio.ensure_future(ask_loaded_windows(self.upstream, provider))
                self.background.add(task)
                task.add_done_callback(self.background.discard)

    def check_rate(self, peer, request: Request) -> None:
        """Refuse with 429 a client over its request rate, when rate limiting is on: a client
        key's holder by its name (checked already, so no one can make names up, and clients
        behind one balancer's address are apart), anyone else by address."""
        if self.config.rate_limit is not None and request.path not in PUBLIC_PATHS:
            client = (request.record or {}).get("client")
            self.rate_limiter.check("client_keys." + client if client else str(peer),
                                    *self.config.rate_limit)

    def change_config_file(self, change) -> Config:
        """Apply change() to a copy of the config file's content, validate it like a config
        file, write it back (atomically, 0600) and put it live for new requests."""
        self.take_edits_on_disk()
        managed = managed_elsewhere(self.config)
        if managed:
            raise PermissionDeniedError("the configuration is managed outside ccproxy (%s): "
                                        "change it there and reload (SIGHUP, or the file "
                                        "watch picks it up)" % managed)
        if self.config.converted_from:
            raise ConflictError("%s is a %s config, converted when read; ccproxy does not rewrite "
                                "it. Save the converted config that `start --check` prints as "
                                "the config file, then change providers" % (
                                    self.config.source, self.config.converted_from))
        content = json.loads(json.dumps(self.config.file_content))
        change(content)
        path = self.config.source or os.path.join(ccproxy_home(), "config.json")
        try:
            config = config_from_file_content(content, path, self.config.environ,
                                              self.config.flags)
        except ConfigError as exc:
            raise ConflictError("the change would make the configuration invalid: %s"
                                % exc) from None
        write_private_file(path, json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        self.swap_config(config)
        return config

    def take_edits_on_disk(self) -> None:
        """Load the config file again when it was edited since it was read (the file watch
        has not seen it yet), so that a change made through the API keeps the edit instead of
        writing over it; an edit that left the file invalid is refused (409)."""
        current = file_signature(self.config.source)
        if current is None or current == self.config_signature:
            return
        try:
            config = load_config(self.config.source, self.config.environ, self.config.flags)
        except ConfigError as exc:
            raise ConflictError("the config file was edited and is not valid now; fix it, then "
                                "make the change: %s" % exc) from None
        self.swap_config(config)
        log.info("configuration reloaded from %s before a change through the management API",
                 config.source)

    def reload_config(self) -> bool:
        """Read the config file again; an invalid one is refused and the old one stays."""
        try:
            config = load_config(self.config.source, self.config.environ, self.config.flags)
        except ConfigError as exc:
            for problem in str(exc).splitlines():
                log.error("configuration not reloaded, the running one stays: %s", problem)
            self.config_problem = str(exc).replace("\n", "; ")
            return False
        if (config.host, config.port) != (self.config.host, self.config.port):
            log.warning("host and port changes apply at the next start")
        if config.usage_file != self.config.usage_file:
            log.warning("a usage_file change applies at the next start")
        self.swap_config(config)
        log.info("configuration reloaded from %s (%d providers)", config.source or "defaults",
                 len(config.providers))
        return True

    def swap_config(self, config: Config) -> None:
        """New requests use config; requests in flight keep the providers they started with."""
        self.config = config
        self.config_signature = file_signature(config.source)
        self.config_problem = None
        self.key_pools = {}

    def key_pool(self, provider: Provider) -> KeyPool | None:
        """The provider's key pool, when it has more than one key."""
        if len(provider.api_keys) < 2:
            return None
        pool = self.key_pools.get(provider.name)
        if pool is None or pool.keys != provider.api_keys:
            pool = self.key_pools[provider.name] = KeyPool(provider.api_keys)
        return pool

    def provider_view(self, provider: Provider) -> dict:
        """A provider as /status and /providers show it: masked, with its circuit state."""
        circuit = self.failover.breaker(provider.name, self.config.breaker_settings).public_view()
        circuit["last_error"] = self.config.masker.text(circuit["last_error"])
        view = dict(provider.public_view(), circuit=circuit)
        if provider.loaded_windows:
            view["loaded_windows"] = dict(provider.loaded_windows)
        if provider.learned_output_limits:
            view["learned_output_limits"] = dict(provider.learned_output_limits)
        if provider.learned_context_lengths:
            view["learned_context_lengths"] = dict(provider.learned_context_lengths)
        if provider.quirks["reasoning_replay"]:
            view["reasoning_replay"] = provider.quirks["reasoning_replay"]
        compat = provider.quirks["anthropic_compat"]
        if provider.protocol == "anthropic":
            view["compatible"] = compat is not None
        if compat and compat["thinking_with_calls"]:
            view["thinking_with_calls"] = compat["thinking_with_calls"]
        if provider.refuses_system_messages:
            view["refuses_system_messages"] = True
        if provider.opens_thinking:
            view["opens_thinking"] = sorted(provider.opens_thinking)
        if provider.adaptive_thinking_only:
            view["adaptive_thinking_only"] = sorted(provider.adaptive_thinking_only)
        if provider.refused_fields:
            view["refused_fields"] = {model: sorted(names)
                                      for model, names in provider.refused_fields.items()}
        if provider.refused_betas:
            view["refused_betas"] = sorted(provider.refused_betas)
        pool = self.key_pool(provider)
        if pool is not None:
            view["api_keys"] = pool.view()
        return view

    def next_request_id(self) -> str:
        return "req_%s%08x" % (self._request_id_prefix, next(self._request_ids))

    def count_response(self, request: Request | None, status: int) -> None:
        """Count an answered request: its usage and cost, and in the metrics and the request
        log when they are on."""
        self.requests_total += 1
        self.status_counts[status] = self.status_counts.get(status, 0) + 1
        if request is not None and request.record is not None:
            record = request.record
            if "provider" in record:
                cost = self.cost_of(record)
                if record.get("usage"):
                    self.usage.add(record, session_id(request.headers), cost)
                self.usage.note_request(record, status, cost)
            if self.config.metrics_enabled and "provider" in request.record:
                self.metrics.observe(request.record, status)
            if self.config.log_requests:
                log.info("%s", format_request_log(request, status))

    def cost_of(self, record: dict) -> float | None:
        """What an answer cost: as its provider reported it, else at the model's price; None
        when neither is known."""
        if "reported_cost" in record:
            return record["reported_cost"]
        provider = self.config.provider_named(record["provider"])
        return provider.cost(record["model"], record.get("usage") or {}) if provider else None

    def close(self, reason: str) -> None:
        """End every upstream call (its client gets an error saying why)."""
        self.upstream.close(reason)


MEMORY_RETURN_SECONDS = 2.0           # idle this long after a burst, memory goes back


class MemoryReturn:
    """Gives memory back to the system once the server has been idle for a moment after a
    burst, and again once the burst's idle worker threads have ended: the idle provider
    connections a burst left shrink to a few per host, and the C allocator, which keeps freed
    memory for reuse, is trimmed, so a thousand streams do not leave their peak behind for
    good (glibc's malloc_trim, elsewhere no trim; see server_environment)."""

    def __init__(self, app):
        self._app = app
        self._quiet = None            # a Deadline, made on first use (on the server's loop)
        self._trim = None             # malloc_trim, once looked up; False where there is none

    def after_burst(self) -> None:
        """A request or a connection ended: give memory back once nothing has run for a
        moment."""
        if self._quiet is None:
            self._quiet = Deadline(asyncio.get_running_loop(), self._give_back)
        self._quiet.set(MEMORY_RETURN_SECONDS)

    def _give_back(self) -> None:
        if self._app.requests_active or self._app.active_streams:
            return
        self._app.upstream.connections.shrink(UPSTREAM_IDLE_WHEN_QUIET)
        if self._trim is None:
            self._trim = malloc_trim_function()
        if self._trim:
            gc.collect()
            self._trim(0)
        if self._app.upstream.threads:      # the burst's idle workers end a little later: what
            self._quiet.set(WORKER_IDLE_SECONDS)    # they held goes back once they have


# CPython 3.8 aborts the whole process ("Fatal Python error: Cannot recover from stack
# overflow") when a collector pass, begun by an allocation deep in the parse or walk of JSON
# nested near the recursion limit (a body of 100,000 brackets), runs a finalizer that overflows
# the stack, and the parse then goes on down: an overflow while handling one. 3.9 and later
# raise RecursionError (a 400; an answer's, a 502). There the server makes the passes itself.
COLLECTOR_ABORTS_DEEP = sys.version_info < (3, 9)
COLLECTOR_SECONDS = 1.0               # how often the server looks for a pass due (3.8)


def tune_garbage_collector() -> None:
    """For a process that is a server and nothing else (start): what startup made is put out
    of the cyclic garbage collector's way (gc.freeze), and its full passes come a tenth as
    often, leaving them to MemoryReturn at each quiet moment. A stream's parts leave no
    cycles (they are freed as it ends), so a full pass during a burst only walks the live
    streams: 50-90 ms with a thousand open, a pause every stream waited out. On Python 3.8
    the passes are made from the event loop's top (collect_from_the_loop)."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, old * 10)
    if COLLECTOR_ABORTS_DEEP:
        gc.disable()
        collect_from_the_loop(asyncio.get_running_loop())


def collect_from_the_loop(loop) -> None:
    """The pass the collector would have made by now (the oldest generation over its
    threshold), made every COLLECTOR_SECONDS from the top of the event loop, where no parse
    or walk of a request or an answer is under way (see COLLECTOR_ABORTS_DEEP)."""
    counts, thresholds = gc.get_count(), gc.get_threshold()
    due = [generation for generation in (2, 1, 0) if counts[generation] > thresholds[generation]]
    if due:
        gc.collect(due[0])
    loop.call_later(COLLECTOR_SECONDS, collect_from_the_loop, loop)


def malloc_trim_function():
    """glibc's malloc_trim, or False where the C library has none."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        return ctypes.CDLL(None).malloc_trim
    except (ImportError, OSError, AttributeError):
        return False


def managed_elsewhere(config: Config) -> str:
    """Why the management API may not change this config ("" when it may): read_only is
    set, or its file (or the file's directory, for the atomic write) is not writable."""
    if config.read_only:
        return "management.read_only is true"
    path = config.source
    if path and not (os.access(path, os.W_OK) and os.access(os.path.dirname(path) or ".",
                                                            os.W_OK)):
        return "%s is not writable by ccproxy" % path
    return ""


def refuse_json_constant(name: str):
    """NaN and Infinity are not JSON, though Python's parser accepts them."""
    raise ValueError("%s is not a JSON value" % name)


def finite_float(text: str) -> float:
    """A JSON number as a float; one too large to be finite (1e999) is refused."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("the number %s is out of range" % text[:40])
    return value


JSON_INT_DIGITS = 4300


def bounded_int(text: str) -> int:
    """A JSON integer of at most JSON_INT_DIGITS digits: Python's own limit, on every version,
    refused in words for the client (Python's message names a Python function)."""
    digits = len(text) - text.startswith("-")
    if digits > JSON_INT_DIGITS:
        raise ValueError("a number has %d digits, more than the %d taken" % (
            digits, JSON_INT_DIGITS))
    return int(text)


JSON_WHITESPACE_RE = re.compile(r"[ \t\n\r]*")
JSON_DECODER = json.JSONDecoder(parse_constant=refuse_json_constant, parse_float=finite_float,
                                parse_int=bounded_int)
SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")
# Every escape of a JSON text, read left to right (so an escaped backslash is never taken for
# the start of another): a surrogate pair, a lone surrogate (six characters), anything else.
JSON_ESCAPE_RE = re.compile(r"\\(?:u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
                            r"|u[dD][89a-fA-F][0-9a-fA-F]{2}|.)", re.S)


def parse_json_object(text: str):
    """Parse a JSON object like json.loads, also returning where each top-level value lies.

    Returns (object, {key: (start, end)}): the spans let a transformer replace one value
    (the model, say) without re-encoding a body of hundreds of kilobytes. Raises ValueError.
    """
    skip = JSON_WHITESPACE_RE.match
    position = skip(text).end()
    if text[position:position + 1] != "{":
        raise ValueError("it begins with a byte order mark (U+FEFF), which JSON does not allow"
                         if text.startswith("\ufeff") else "the top level is not an object")
    position = skip(text, position + 1).end()
    result, spans = {}, {}
    closing = text[position:position + 1] == "}"
    while not closing:
        if text[position:position + 1] != '"':
            raise ValueError("expecting a property name in double quotes at char %d" % position)
        key, position = json.decoder.scanstring(text, position + 1)
        position = skip(text, position).end()
        if text[position:position + 1] != ":":
            raise ValueError("expecting ':' at char %d" % position)
        start = skip(text, position + 1).end()
        result[key], end = JSON_DECODER.raw_decode(text, start)
        spans[key] = (start, end)
        position = skip(text, end).end()
        separator = text[position:position + 1]
        if separator not in (",", "}"):
            raise ValueError("expecting ',' or '}' at char %d" % position)
        position = skip(text, position + 1).end() if separator == "," else position
        closing = separator == "}"
    if skip(text, position + 1).end() != len(text):
        raise ValueError("extra data after the object at char %d" % (position + 1))
    return result, spans


def parse_json_body(request: Request, mend_surrogates: bool = False) -> dict:
    """The request body as a JSON object, or a 400 saying what is wrong with it.

    Keeps the decoded text and the spans of its top-level values on the request. A lone
    UTF-16 surrogate escape is a 400, or with mend_surrogates a U+FFFD (mended_surrogates).
    """
    if not request.body:
        raise InvalidRequestError("request body is empty; a JSON object is required")
    try:
        request.body_text = request.body.decode("utf-8")
        body, request.body_spans = parse_json_object(request.body_text)
    except UnicodeDecodeError as exc:
        raise InvalidRequestError("request body is not UTF-8: %s" % exc) from None
    except (ValueError, RecursionError) as exc:
        raise InvalidRequestError("request body is not a valid JSON object: %s" % exc) from None
    if SURROGATE_ESCAPE_RE.search(request.body_text):
        if mend_surrogates:
            return mended_surrogates(request, body)
        check_no_lone_surrogate(body)
    return body


def check_no_lone_surrogate(body: dict) -> None:
    """A 400 when a \\uD800-\\uDFFF escape stands alone: it decodes to no character, and no
    provider's JSON could carry it (only run when such an escape occurs at all)."""
    try:
        JSON_TEXT(body).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError("request body holds a lone UTF-16 surrogate escape (\\u%04x), "
                                  "which is not a Unicode character" % ord(exc.object[exc.start]))


def mended_surrogates(request: Request, body: dict) -> dict:
    """The body with each lone surrogate escape as U+FFFD, as UTF-8 encoders write one.

    Claude Code cuts long tool output by UTF-16 units, at times through an emoji's pair, and
    sends the half; Anthropic refuses the body ("no low surrogate in string") and every turn
    after, since the half stays in the history. Here it is a replacement character instead.
    """
    lone = []

    def mend(match):
        escape = match.group()
        if len(escape) != 6 or escape[1] != "u":
            return escape
        lone.append(escape)
        return "\\ufffd"
    text = JSON_ESCAPE_RE.sub(mend, request.body_text)
    if not lone:
        return body
    request.body_text, request.body = text, text.encode("utf-8")
    body, request.body_spans = parse_json_object(text)
    log.warning("a request held %d lone UTF-16 surrogate escape%s (half a character, %s): "
                "sent as U+FFFD", len(lone), "" if len(lone) == 1 else "s", lone[0])
    return body


MESSAGE_ROLES = ("user", "assistant", "system")


def check_messages_request(body: dict, for_count: bool = False) -> None:
    """Reject what no provider could accept, naming the field (never forwarded upstream)."""
    require_field(body, "model", "a non-empty string", lambda v: isinstance(v, str) and v)
    require_field(body, "messages", "a non-empty list", lambda v: isinstance(v, list) and v)
    for index, message in enumerate(body["messages"]):
        check_message(message, index)
    if not for_count or body.get("max_tokens") is not None:      # a count needs none
        require_field(body, "max_tokens", "a positive integer", lambda v: isinstance(v, int)
                      and not isinstance(v, bool) and v >= 1)
    for key, problem_of in OPTIONAL_FIELD_CHECKS.items():
        problem = problem_of(body[key]) if body.get(key) is not None else None
        if problem:
            raise InvalidRequestError("%s: %s" % (key, problem))


def require_field(body: dict, key: str, wanted: str, valid) -> None:
    """A 400 for a required field that is missing (in the Messages API's words) or is not
    what valid() accepts (saying what it is instead)."""
    value = body.get(key)
    if valid(value):
        return
    if value is None:
        raise InvalidRequestError("%s: Field required (%s)" % (key, wanted))
    raise InvalidRequestError("%s: must be %s, not %s" % (key, wanted, json_sketch(value)))


def json_sketch(value) -> str:
    """A JSON value as an error names it: a container by its kind, anything else itself (cut
    short)."""
    if isinstance(value, (dict, list)):
        return ("an empty " if not value else "a ") + ("object" if isinstance(value, dict)
                                                       else "list")
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_message(message, index: int) -> None:
    """Reject a message that is not {role, content} with typed content blocks."""
    if not isinstance(message, dict):
        raise InvalidRequestError("messages[%d]: must be an object" % index)
    if message.get("role") not in MESSAGE_ROLES:
        raise InvalidRequestError("messages[%d].role: must be one of %s"
                                  % (index, ", ".join(MESSAGE_ROLES)))
    content = message.get("content")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise InvalidRequestError("messages[%d].content: must be a string or a list of blocks"
                                  % index)
    for position, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise InvalidRequestError("messages[%d].content[%d]: must be an object with a type"
                                      % (index, position))
        if block["type"] == "text" and not isinstance(block.get("text"), str):
            raise InvalidRequestError("messages[%d].content[%d].text: must be a string"
                                      % (index, position))


def is_number(value) -> bool:
    """A JSON number (an int or a float, never a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def unit_interval_problem(value) -> str | None:
    """temperature and top_p: a number from 0 to 1, as the Messages API documents."""
    return None if is_number(value) and 0 <= value <= 1 else "must be a number from 0 to 1"


def top_k_problem(value) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else "must be an integer of 0 or more"


def stop_sequences_problem(value) -> str | None:
    return None if isinstance(value, list) and all(isinstance(v, str) for v in value) \
        else "must be a list of strings"


def tools_problem(value) -> str | None:
    return None if isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and t["name"] for t in value) \
        else "must be a list of objects, each with a name"


def tool_choice_problem(value) -> str | None:
    if not isinstance(value, dict) or value.get("type") not in ("auto", "any", "tool", "none"):
        return "must be an object whose type is auto, any, tool or none"
    if value["type"] == "tool" and not isinstance(value.get("name"), str):
        return "must name the tool (name) when its type is tool"
    return None


def thinking_problem(value) -> str | None:
    if not isinstance(value, dict) or value.get("type") not in ("enabled", "disabled", "adaptive"):
        return "must be an object whose type is enabled, disabled or adaptive"
    budget = value.get("budget_tokens")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool)
                               or budget < 1):
        return "budget_tokens must be a positive integer"
    return None


def kind_problem(kinds, name: str):
    """A check that the value is of one of kinds (named `name` in the message)."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)

    def problem_of(value) -> str | None:
        wrong = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
        return "must be %s" % name if wrong else None
    return problem_of


# The optional fields of a Messages request that are read or forwarded, and what each must be
# (Anthropic's API reference); a wrong one is a 400 naming it, before any provider sees it.
OPTIONAL_FIELD_CHECKS = {
    "stream": kind_problem(bool, "true or false"),
    "system": kind_problem((str, list), "a string or a list of text blocks"),
    "tools": tools_problem,
    "tool_choice": tool_choice_problem,
    "thinking": thinking_problem,
    "temperature": unit_interval_problem,
    "top_p": unit_interval_problem,
    "top_k": top_k_problem,
    "stop_sequences": stop_sequences_problem,
    "metadata": kind_problem(dict, "an object"),
    "output_config": kind_problem(dict, "an object"),
}


# -----------------------------------------------------------------------------
# 6.2 Messages, token counts, models
# -----------------------------------------------------------------------------

async def handle_messages(app: ProxyApp, request: Request, conn) -> Response:
    """POST /v1/messages: validate, plan the route, then try each candidate until one
    answers (failover), relaying its answer."""
    body = await app.off_the_loop(request, checked_messages_body, request)
    subagent_choice = take_subagent_tag(body)
    if subagent_choice:
        request.rewritten.add("system")
    app.refresh_loaded_windows()
    plan = await app.off_the_loop(request, plan_route, app.config, body, request.headers,
                                  subagent_choice)
    if plan[0].provider.runs_models_itself and await load_for_window(app.upstream, plan[0]):
        plan = plan_route(app.config, body, request.headers, subagent_choice)
    if request.record is not None:
        request.record["stream"] = body.get("stream") is True
        if app.config.log_bodies:
            log.info("%s body: %s", request.record["id"], request.body_text)
    return await app.failover.run(plan, lambda routing: send_to(app, request, conn, body,
                                                                routing), app.config)


def checked_messages_body(request: Request, for_count: bool = False) -> dict:
    """The request's Messages body, parsed and checked (a 400 naming what is wrong)."""
    body = parse_json_body(request, mend_surrogates=True)
    check_messages_request(body, for_count=for_count)
    return body


async def send_to(app: ProxyApp, request: Request, conn, body: dict, routing: Routing):
    """One attempt at a candidate: with its key, or each ready key of its pool in turn until
    one serves (a key refused or rate-limited is put out and the next one tried)."""
    provider, model, route = routing
    if request.record is not None:
        request.record.update(route=route, provider=provider.name, model=model)
    if model in provider.learned_context_lengths:       # lowered before it goes
        body = rewritten(request, body, await app.off_the_loop(
            request, within_context_length, body, provider, model))
    if model in provider.adaptive_thinking_only:
        body = rewritten(request, body, with_adaptive_thinking(body))
    pool = app.key_pool(provider)
    if pool is None:
        return await call_with_key(app, request, conn, body, routing)
    while True:                        # each key in turn, until one serves or all are out
        key = pool.pick()
        if key is None:
            raise pool.exhausted(provider.name)
        try:
            response = await call_with_key(app, request, conn, body,
                                           routing._replace(provider=provider.with_key(key)))
        except ProxyError as error:
            if not pool.put_out(key, error, provider.name):
                raise
        else:
            pool.served(key)
            return response


async def call_with_key(app: ProxyApp, request: Request, conn, body: dict, routing: Routing,
                        sent_again: int = 0):
    """One call to the routing's provider with the key it holds: the protocol builds it,
    relay_call() answers with it, sent again as the provider's refusal says (at most
    MAX_SENDS_AGAIN times); a failure is logged, a configuration problem named as such."""
    provider, model, _ = routing
    protocol = protocol_for(provider, model, body)
    protocol.check_request(body)
    outgoing = await app.off_the_loop(request, protocol.messages_request, provider, model,
                                      request, body)
    call = app.upstream.call(provider, outgoing, app.config.request_timeout, model)
    try:
        return await relay_call(protocol, call, conn, request, body)
    except ProxyError as error:
        again = body_to_send_again(error, provider, model, body) \
            if sent_again < MAX_SENDS_AGAIN else None
        if again is not None:
            return await call_with_key(app, request, conn, rewritten(request, body, again),
                                       routing, sent_again + 1)
        error = diagnosed(error, routing, app.config)
        call.log_failure(error)
        raise error from None


def rewritten(request: Request, body: dict, changed: dict) -> dict:
    """changed, the body ccproxy made of the client's, its changed top-level values noted for
    a pass-through (anthropic_body splices them into the client's text)."""
    request.rewritten.update(key for key, value in changed.items() if body.get(key) is not value)
    return changed


async def handle_count_tokens(app: ProxyApp, request: Request, conn) -> Response:
    """POST /v1/messages/count_tokens: ask the routed provider when it can count (Anthropic's
    count_tokens, Gemini's countTokens), else, or when that fails, the estimator answers."""
    body = await app.off_the_loop(request, checked_messages_body, request, True)
    routed = await app.off_the_loop(request, route_request, app.config, body, False)
    count = None
    if routed is not None and routed.provider.count_tokens:
        count = await count_at_provider(app, routed, request, body, conn)
    if count is None:
        count = await app.off_the_loop(request, estimate_request_tokens, body)
    return json_response({"input_tokens": count})


async def count_at_provider(app: ProxyApp, routing: Routing, request: Request, body: dict,
                            conn) -> int | None:
    """The provider's own count of a request's input tokens, or None (logged) when it has no
    way to count or the call failed in any way."""
    provider, model, _ = routing
    protocol = protocol_for(provider, model)
    outgoing = protocol.count_tokens_request(provider, model, request, body)
    if outgoing is None:
        return None
    call = app.upstream.call(provider, outgoing, app.config.request_timeout)
    try:
        status = await call_provider(call, conn)
    except ProxyError as error:
        log.warning("%s: count_tokens failed, estimating instead: %s", provider.name,
                    error.message)
        return None
    if status != 200:
        log.warning("%s: count_tokens answered HTTP %d, estimating instead", provider.name, status)
        return None
    return protocol.input_tokens(call.body)


async def handle_models(app: ProxyApp, request: Request, conn) -> Response:
    """GET /v1/models: every configured model as `provider,model`, in Anthropic's list shape;
    for Claude Code's /model picker, ids it would drop are given the picker's prefix."""
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(app.started_at))
    picker = (request.headers.get("user-agent") or "").startswith(CLAUDE_CODE_AGENTS)
    models = [{"type": "model", "id": model_list_id(p.name, m, picker),
               "display_name": "%s (%s, via ccproxy)" % (m, p.name), "created_at": created}
              for p in app.config.enabled_providers() for m in p.models]
    return json_response({"data": models, "has_more": False,
                          "first_id": models[0]["id"] if models else None,
                          "last_id": models[-1]["id"] if models else None})


# Claude Code's model discovery (CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY=1; asked by 2.1.330,
# not by 2.1.197) keeps only ids with "claude" or "anthropic" in them, in any case: other ids
# are listed to it with this prefix, which routing takes off again.
CLAUDE_CODE_AGENTS = ("claude-code/", "claude-cli/")
PICKER_ID_PREFIX = "claude-via-ccproxy/"
PICKER_KEPT_RE = re.compile(r"claude|anthropic", re.I)


def model_list_id(provider_name: str, model: str, picker: bool) -> str:
    """A model's id in /v1/models: `provider,model`, prefixed for the picker when needed."""
    name = "%s,%s" % (provider_name, model)
    return PICKER_ID_PREFIX + name if picker and not PICKER_KEPT_RE.search(name) else name


# -----------------------------------------------------------------------------
# 6.3 Health, status, metrics, the request log
# -----------------------------------------------------------------------------

async def handle_root(app: ProxyApp, request: Request, conn) -> Response:
    """`HEAD /` is Claude Code's reachability check; GET / is the status page to a browser,
    and says what this is to anything else. The page holds no data: it reads /status with the
    key the browser gives it, so the same access rules apply."""
    if "text/html" in (request.headers.get("accept") or ""):
        return Response(200, STATUS_PAGE, [("cache-control", "no-store"),
                                           ("content-security-policy", STATUS_PAGE_POLICY)],
                        content_type="text/html; charset=utf-8")
    return json_response({"name": "ccproxy", "status": "ok"})


# The status page: one file, no external assets; its script fills it from /status every 5 s,
# with textContent only (a provider's error text is never markup). No page may frame it (its
# key form under another page's disguise).
STATUS_PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                      "connect-src 'self'; frame-ancestors 'none'")
STATUS_PAGE = br"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ccproxy</title>
<style>
:root { --bg: #fafafa; --fg: #1d1d1f; --muted: #6e6e73; --line: #dedee3; --card: #fff;
        --ok: #1a7f37; --warn: #9a6700; --bad: #cf222e; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #111214; --fg: #e6e6e9; --muted: #9a9aa2; --line: #2c2d31; --card: #1a1b1e;
          --ok: #3fb950; --warn: #d29922; --bad: #f85149; } }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
       background: var(--bg); color: var(--fg); }
main { max-width: 1200px; margin: 0 auto; padding: 16px; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 15px; margin: 24px 0 8px; }
#meta, .muted { color: var(--muted); }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 12px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
        padding: 10px 14px; min-width: 130px; }
.card b { display: block; font-size: 20px; }
.table { overflow-x: auto; background: var(--card); border: 1px solid var(--line);
         border-radius: 8px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line);
         white-space: nowrap; }
th { color: var(--muted); font-weight: 600; } tr:last-child td { border-bottom: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.closed, .s2 { color: var(--ok); } .half_open, .s4 { color: var(--warn); }
.open, .s5 { color: var(--bad); }
form { margin-top: 16px; } input { font: inherit; padding: 6px; width: 260px; }
</style></head>
<body><main>
<h1>ccproxy</h1><div id="meta">loading&hellip;</div>
<p id="config-problem" class="open" hidden></p>
<form id="login" hidden><label>This proxy needs its key:
<input id="key" type="password" autocomplete="off"></label> <button>Show</button></form>
<div class="cards" id="totals"></div>
<h2>Providers</h2><div class="table"><table id="providers"></table></div>
<h2>Routes</h2><div class="table"><table id="routes"></table></div>
<h2>Usage today</h2><div class="table"><table id="usage"></table></div>
<div id="by-client" hidden><h2>Usage today by client key</h2>
<div class="table"><table id="clients"></table></div></div>
<h2>Last requests</h2><div class="table"><table id="requests"></table></div>
<p class="muted">Refreshes every 5 s. Nothing of what was said is kept or shown.</p>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
function fill(table, head, rows) {
  table.replaceChildren();
  const tr = table.insertRow();
  for (const name of head) { const th = document.createElement("th"); th.textContent = name;
                             tr.appendChild(th); }
  for (const row of rows) {
    const line = table.insertRow();
    for (const cell of row) {
      const td = line.insertCell();
      const [text, cls] = Array.isArray(cell) ? cell : [cell, ""];
      td.textContent = text === null || text === undefined ? "\u2013" : String(text);
      if (cls) td.className = cls;
    }
  }
  if (!rows.length) { const td = table.insertRow().insertCell(); td.colSpan = head.length;
                      td.className = "muted"; td.textContent = "none yet"; }
}
const n = (x) => [Number(x || 0).toLocaleString("en-US"), "num"];
const dollars = (x) => "$" + Number(x).toFixed(x > 0.5 ? 2 : 4);     // as dollars() does
const money = (x, unpriced) => [unpriced && !x ? "\u2013" : dollars(x), "num"];
function card(label, value) {
  const div = document.createElement("div"); div.className = "card";
  const b = document.createElement("b"); b.textContent = value;
  div.append(b, document.createTextNode(label)); return div;
}
function usageCells(t) {
  return [n(t.requests),
          n(t.input_tokens + t.cache_read_input_tokens + t.cache_creation_input_tokens),
          n(t.cache_read_input_tokens), n(t.output_tokens), money(t.cost_usd, t.unpriced_requests)];
}
function render(s) {
  const u = s.usage, today = u.today.by_model;
  $("meta").textContent = "version " + s.version + " \u00b7 up " +
    Math.round(s.uptime_seconds) + " s \u00b7 " + s.requests.total + " requests \u00b7 " +
    s.active_streams + " streams open \u00b7 " + (s.config_file || "no config file");
  $("config-problem").hidden = !s.config_problem;
  $("config-problem").textContent = "The config file was edited and does not load; the " +
    "proxy runs on the config it loaded before: " + (s.config_problem || "");
  const sum = (f) => today.reduce((a, m) => a + (m[f] || 0), 0);
  $("totals").replaceChildren(
    card("answers today", sum("requests").toLocaleString("en-US")),
    card("tokens in today", (sum("input_tokens") + sum("cache_read_input_tokens") +
                             sum("cache_creation_input_tokens")).toLocaleString("en-US")),
    card("tokens out today", sum("output_tokens").toLocaleString("en-US")),
    card("cost today", dollars(sum("cost_usd"))));
  fill($("providers"), ["provider", "type", "enabled", "circuit", "failures", "last error",
                        "models"],
       s.providers.map((p) => [p.name, p.type, p.enabled ? "yes" : "no",
                               [p.circuit.state, p.circuit.state], n(p.circuit.failures),
                               p.circuit.last_error || "", p.models.map((m) =>
                                 m in (p.loaded_windows || {}) ? m + " (context " +
                                 p.loaded_windows[m] + ")" : m).join(", ")]));
  fill($("routes"), ["route", "goes to", "then"],
       s.routes.map((r) => [r.name, r.provider + "," + r.model, r.fallbacks.join(" \u2192 ")]));
  const used = ["answers", "tokens in", "cached", "tokens out", "cost"];
  fill($("usage"), ["provider", "model"].concat(used),
       today.map((m) => [m.provider, m.model].concat(usageCells(m))));
  const clients = u.today.by_client || [];
  $("by-client").hidden = !clients.length;
  fill($("clients"), ["client"].concat(used), clients.map((c) => [c.client].concat(usageCells(c))));
  fill($("requests"), ["time", "route", "provider", "model", "status", "latency", "tokens in",
                       "tokens out", "cost"],
       u.recent_requests.map((r) => [new Date(r.time * 1000).toLocaleTimeString(), r.route,
                                     r.provider, r.model, [r.status, "s" + String(r.status)[0]],
                                     [r.latency_ms.toFixed(0) + " ms", "num"],
                                     n(r.input_tokens), n(r.output_tokens),
                                     money(r.cost_usd, r.cost_usd === null)]));
}
async function refresh() {
  const key = sessionStorage.getItem("ccproxy-key");
  const answer = await fetch("/status", {headers: key ? {"x-api-key": key} : {}});
  if (answer.status === 401) { $("login").hidden = false; $("meta").textContent =
                               "the proxy asks for its key"; return; }
  $("login").hidden = true;
  if (!answer.ok) { $("meta").textContent = "/status answered " + answer.status; return; }
  render(await answer.json());
}
$("login").addEventListener("submit", (event) => {
  event.preventDefault(); sessionStorage.setItem("ccproxy-key", $("key").value); refresh(); });
refresh().catch((e) => { $("meta").textContent = "cannot reach the proxy: " + e; });
setInterval(() => refresh().catch(() => {}), 5000);
</script></body></html>
"""


async def handle_health(app: ProxyApp, request: Request, conn) -> Response:
    """GET /health: alive, and the version; nothing else (liveness)."""
    return json_response({"status": "ok", "version": __version__})


async def handle_ready(app: ProxyApp, request: Request, conn) -> Response:
    """GET /ready: 200 while this replica should get traffic; 503 while it starts or drains,
    or when no enabled provider's circuit lets requests through (readiness)."""
    if app.phase != "ready":
        return json_response({"status": app.phase}, 503)
    settings = app.config.breaker_settings
    able = [p.name for p in app.config.enabled_providers()
            if app.failover.breaker(p.name, settings).state in ("closed", "disabled")]
    if not able:
        return json_response({"status": "no provider available"}, 503)
    return json_response({"status": "ready", "providers": able})


async def handle_status(app: ProxyApp, request: Request, conn) -> Response:
    """GET /status: process, listener, providers (masked) and counters."""
    host, port = app.listen_address
    return json_response({
        "status": "running",
        "version": __version__,
        "pid": os.getpid(),
        "uptime_seconds": round(time.time() - app.started_at, 3),
        "listen": {"host": host, "port": port},
        "config_file": app.config.source,
        "config_problem": app.config_problem,
        "providers": [app.provider_view(p) for p in app.config.providers],
        "failovers": app.failover.count,
        "active_streams": app.active_streams,
        "requests": {"total": app.requests_total, "active": app.requests_active,
                     "by_status": {str(k): v for k, v in sorted(app.status_counts.items())}},
        "upstream": {"calls_open": len(app.upstream.calls), "threads": app.upstream.threads,
                     "threads_busy": app.upstream.threads_busy,
                     "connections_idle": app.upstream.connections.idle},
        "routes": [{"name": r.name, "provider": r.provider, "model": r.model,
                    "fallbacks": ["%s,%s" % target for target in r.fallbacks]}
                   for r in app.config.routes.values()],
        "usage": app.usage.view(),
    })


async def handle_session(app: ProxyApp, request: Request, conn) -> Response:
    """GET /sessions/{id}: one Claude Code session's usage, cost and last provider and model
    (what the status line shows)."""
    name = urllib.parse.unquote(request.path[len("/sessions/"):])
    session = app.usage.sessions.get(name)
    if session is None:
        raise NotFoundError("no answer recorded for session %s (the most recent %d are kept)"
                            % (name if SESSION_ID_RE.match(name) else "(invalid id)",
                               MAX_SESSIONS))
    today = app.usage.today_totals()
    return json_response(dict(session, session_id=name, today=today,
                              statusline=statusline_text(session, today)))


def statusline_text(session: dict, today: dict) -> str:
    """The status line Claude Code shows for a session: its last model and totals, then
    today's tokens and cost (the proxy formats it, so the command that prints it stays tiny)."""
    line = "ccproxy: " + session_summary(session)
    if today.get("requests"):
        line += " · today %s tokens" % short_count(sum(today.get(f, 0) for f in USAGE_FIELDS))
        if today["requests"] > today.get("unpriced_requests", 0):
            line += " " + dollars(today.get("cost_usd", 0))
    return line


def session_summary(session: dict) -> str:
    """A session's last model and its totals, in a few words."""
    return "%s (%s) · %s" % (session["model"], session["provider"], usage_words(session))


def answers_words(totals: dict) -> str:
    """How many answers, then their usage_words: a line of `status` after its name."""
    count = totals["requests"]
    return "%d answer%s, %s" % (count, "" if count == 1 else "s", usage_words(totals))


def usage_words(totals: dict) -> str:
    """Totals of usage in a few words: tokens in (the share read from the cache), out, cost."""
    cached = totals["cache_read_input_tokens"]
    total_in = sum(totals[field] for field in PROMPT_USAGE_FIELDS)
    parts = ["%s in" % short_count(total_in)]
    if total_in:
        parts[-1] += " (%d%% cached)" % (100 * cached // total_in)
    parts.append("%s out" % short_count(totals["output_tokens"]))
    if totals["requests"] > totals["unpriced_requests"]:
        parts.append(dollars(totals["cost_usd"]))
    return " · ".join(parts)


def dollars(cost: float) -> str:
    """A cost as Claude Code writes one: cents above half a dollar, else four decimals, so that
    a session's first cents show (the status page writes them the same way)."""
    return "$%.2f" % cost if cost > 0.5 else "$%.4f" % cost


def short_count(number: int) -> str:
    """1234 as 1.2k, 1234567 as 1.2M."""
    for size, suffix in ((1e6, "M"), (1e3, "k")):
        if number >= size:
            return "%.1f%s" % (number / size, suffix)
    return str(number)


async def handle_metrics(app: ProxyApp, request: Request, conn) -> Response:
    """GET /metrics: Prometheus text, when performance.metrics_enabled."""
    if not app.config.metrics_enabled:
        raise NotFoundError("metrics are off; set performance.metrics_enabled to true")
    return Response(200, app.metrics.render(app).encode(),
                    content_type="text/plain; version=0.0.4; charset=utf-8")


MAX_SESSIONS = 200                  # sessions whose usage is kept, most recent first
RECENT_REQUESTS = 50                # requests the status page lists
MAX_MODELS = 1000                   # provider and model pairs counted apart (and saved)
OTHER_MODELS = "(other models)"     # where the answers of any pair past those are counted
SESSION_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")
USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_read_input_tokens",
                "cache_creation_input_tokens")


def session_id(headers) -> str | None:
    """The Claude Code session a request belongs to (x-claude-code-session-id), when the
    header holds a plausible id."""
    value = headers.get(SESSION_ID_HEADER) or ""
    return value if SESSION_ID_RE.match(value) else None


class UsageLedger:
    """Tokens and cost of every answer: per provider and model, and per client key (by its
    client_keys name), in all (since start, or since the usage file began) and today; per
    Claude Code session (the most recent MAX_SESSIONS, with the provider and model that
    answered last); and the last RECENT_REQUESTS requests. No message content."""

    def __init__(self):
        self.models = {}                                # (provider, model) -> totals
        self.day, self.today = local_day(), {}          # (provider, model) -> totals, today
        self.clients, self.clients_today = {}, {}       # client name -> totals, in all, today
        self.sessions = collections.OrderedDict()       # session id -> totals, latest last
        self.recent = collections.deque(maxlen=RECENT_REQUESTS)
        self.changed = False                            # since the usage file was written

    def add(self, record: dict, session: str | None, cost: float | None) -> None:
        """Count one answer's usage (and its cost, None when no price is known)."""
        key, day = (record["provider"], record["model"]), local_day()
        if key not in self.models and len(self.models) >= MAX_MODELS:
            key = (record["provider"], OTHER_MODELS)      # a client naming models without end
        if self.day != day:
            self.day, self.today, self.clients_today = day, {}, {}
        places = [totals_in(self.models, key), totals_in(self.today, key)]
        if record.get("client") is not None:
            places += [totals_in(place, record["client"])
                       for place in (self.clients, self.clients_today)]
        if session is not None:
            entry = self.sessions.pop(session, None) or new_totals()
            self.sessions[session] = entry
            entry.update(provider=record["provider"], model=record["model"],
                         route=record.get("route"), last_seen=round(time.time(), 3))
            places.append(entry)
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
        for totals in places:
            add_usage(totals, record["usage"], cost)
        self.changed = True

    def today_totals(self) -> dict:
        """Today's totals over every provider and model."""
        day = new_totals()
        for totals in (self.today.values() if self.day == local_day() else ()):
            for name in day:
                day[name] += totals[name]
        return day

    def note_request(self, record: dict, status: int, cost: float | None) -> None:
        """One routed request for the recent list: what happened, never what was said."""
        usage = record.get("usage") or {}
        self.recent.append({
            "time": round(time.time(), 3), "route": record.get("route"),
            "provider": record["provider"], "model": record["model"], "status": status,
            "latency_ms": round((time.monotonic() - record["started"]) * 1000, 1),
            "input_tokens": sum(usage.get(f) or 0 for f in USAGE_FIELDS if f != "output_tokens"),
            "output_tokens": usage.get("output_tokens") or 0,
            "cost_usd": None if cost is None else round(cost, 6)})

    def view(self) -> dict:
        """Usage per provider and model and per client (in all and today), the sessions and
        the recent requests, most recent first, for /status."""
        today = self.day == local_day()
        return {"by_model": totals_list(self.models), "by_client": clients_list(self.clients),
                "today": {"date": self.day, "by_model": totals_list(self.today if today else {}),
                          "by_client": clients_list(self.clients_today if today else {})},
                "sessions": [dict(totals, session_id=name)
                             for name, totals in reversed(self.sessions.items())],
                "recent_requests": list(reversed(self.recent))}

    def saved(self) -> str:
        """What the usage file holds: the totals and the sessions (no recent requests)."""
        self.changed = False
        return json.dumps({"version": 1, "day": self.day, "models": totals_list(self.models),
                           "today": totals_list(self.today),
                           "clients": clients_list(self.clients),
                           "clients_today": clients_list(self.clients_today),
                           "sessions": [dict(t, session_id=n) for n, t in self.sessions.items()]})

    def restore(self, content: dict) -> None:
        """Take back what saved() wrote (entries that do not fit are skipped)."""
        for name, place in (("models", self.models), ("today", self.today)):
            if name == "today" and content.get("day") != self.day:
                continue
            for entry in list_of(content.get(name))[:MAX_MODELS]:
                totals = restored_totals(entry)
                if totals is not None:
                    place[(str(entry.get("provider")), str(entry.get("model")))] = totals
        for name, place in (("clients", self.clients), ("clients_today", self.clients_today)):
            for entry in list_of(content.get(name))[:MAX_MODELS]:
                totals = restored_totals(entry)
                if totals is not None and CLIENT_NAME_RE.match(str_of(entry.get("client"))) and (
                        name == "clients" or content.get("day") == self.day):
                    place[entry["client"]] = totals
        for entry in list_of(content.get("sessions"))[-MAX_SESSIONS:]:
            totals = restored_totals(entry)
            if totals is not None and SESSION_ID_RE.match(str_of(entry.get("session_id"))):
                self.sessions[entry["session_id"]] = dict(totals, **{
                    k: entry.get(k) for k in ("provider", "model", "route", "last_seen")})


def local_day() -> str:
    """Today's date here, YYYY-MM-DD."""
    return day_of_second(int(time.time()))


@functools.lru_cache(maxsize=1)
def day_of_second(second: int) -> str:
    """The local date of a second since the epoch (once a second, not once a request)."""
    return time.strftime("%Y-%m-%d", time.localtime(second))


def totals_list(totals_by_model: dict) -> list:
    return [dict(totals, provider=provider, model=model)
            for (provider, model), totals in sorted(totals_by_model.items())]


def clients_list(totals_by_client: dict) -> list:
    return [dict(totals, client=name) for name, totals in sorted(totals_by_client.items())]


def restored_totals(entry) -> dict | None:
    """The counters of a saved entry, or None when they are not all counts (a finite number, 0
    or more)."""
    totals = new_totals()
    for name in totals:
        value = dict_of(entry).get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                0 <= value < math.inf):
            return None
        totals[name] = value
    return totals


def totals_in(place: dict, key) -> dict:
    """The totals place holds for key, new ones made only when it has none."""
    totals = place.get(key)
    if totals is None:
        totals = place[key] = new_totals()
    return totals


def new_totals() -> dict:
    return dict({"requests": 0, "cost_usd": 0.0, "unpriced_requests": 0},
                **{field: 0 for field in USAGE_FIELDS})


def add_usage(totals: dict, usage: dict, cost: float | None) -> None:
    """Add one answer's tokens and cost to totals."""
    totals["requests"] += 1
    for field in USAGE_FIELDS:
        value = usage.get(field)
        totals[field] += count_of(value)
    if cost is None:
        totals["unpriced_requests"] += 1
    else:
        totals["cost_usd"] = round(totals["cost_usd"] + cost, 6)


class Metrics:
    """Counters and histograms for /metrics, fed with each routed request when it ends."""

    def __init__(self):
        self.requests = collections.Counter()       # (provider, route, status)
        self.tokens = collections.Counter()         # (provider, "input" | "output")
        self.latency = {}                           # provider -> Histogram
        self.first_token = {}

    def observe(self, record: dict, status: int) -> None:
        provider = record["provider"]
        self.requests[(provider, record.get("route", ""), status)] += 1
        now = time.monotonic()
        self.latency.setdefault(provider, Histogram()).observe(now - record["started"])
        if record.get("first_byte"):
            self.first_token.setdefault(provider, Histogram()).observe(
                record["first_byte"] - record["started"])
        for key, direction in (("input_tokens", "input"), ("output_tokens", "output")):
            self.tokens[(provider, direction)] += (record.get("usage") or {}).get(key, 0)

    def render(self, app) -> str:
        """The Prometheus text exposition of everything counted so far."""
        lines = metric_header("ccproxy_requests_total", "counter",
                              "Requests answered, by provider, route and status.")
        lines += ["ccproxy_requests_total{%s} %d" % (labels(provider=p, route=r, status=s), n)
                  for (p, r, s), n in sorted(self.requests.items())]
        for name, help_text, histograms in (
                ("ccproxy_request_duration_seconds", "Time to the end of the answer.",
                 self.latency),
                ("ccproxy_time_to_first_token_seconds", "Time to the first byte of a stream.",
                 self.first_token)):
            lines += metric_header(name, "histogram", help_text)
            for provider, histogram in sorted(histograms.items()):
                lines += histogram.render(name, provider)
        lines += metric_header("ccproxy_tokens_total", "counter", "Tokens in and out.")
        lines += ["ccproxy_tokens_total{%s} %d" % (labels(provider=p, direction=d), n)
                  for (p, d), n in sorted(self.tokens.items())]
        lines += usage_metrics(app.usage)
        lines += metric_header("ccproxy_active_streams", "gauge", "Streams being relayed now.")
        lines.append("ccproxy_active_streams %d" % app.active_streams)
        lines += metric_header("ccproxy_circuit_state", "gauge",
                               "Circuit breaker per provider: 0 closed, 1 half-open, 2 open.")
        lines += ["ccproxy_circuit_state{%s} %d" % (labels(provider=name), CIRCUIT_STATE_VALUES[
            breaker.state]) for name, breaker in sorted(app.failover.breakers.items())]
        lines += metric_header("ccproxy_failovers_total", "counter",
                               "Times a request moved on to the next provider.")
        lines.append("ccproxy_failovers_total %d" % app.failover.count)
        return "\n".join(lines) + "\n"


USAGE_METRIC_TYPES = (("input_tokens", "input"), ("output_tokens", "output"),
                      ("cache_read_input_tokens", "cache_read"),
                      ("cache_creation_input_tokens", "cache_write"))


def usage_metrics(usage: UsageLedger) -> list:
    """Usage and cost per provider and model (the same counters /status and the status page
    show), as Prometheus counters."""
    lines = metric_header("ccproxy_usage_tokens_total", "counter",
                          "Tokens of the answers, by provider, model and type.")
    lines += ["ccproxy_usage_tokens_total{%s} %d" % (labels(provider=p, model=m, type=kind),
                                                     totals[field])
              for (p, m), totals in sorted(usage.models.items())
              for field, kind in USAGE_METRIC_TYPES]
    lines += metric_header("ccproxy_usage_cost_dollars_total", "counter",
                           "Cost of the answers in US dollars, as the provider reported it "
                           "(OpenRouter) or at the model's price.")
    lines += ["ccproxy_usage_cost_dollars_total{%s} %.6f" % (labels(provider=p, model=m),
                                                            totals["cost_usd"])
              for (p, m), totals in sorted(usage.models.items())]
    return lines + client_usage_metrics(usage.clients) if usage.clients else lines


def client_usage_metrics(clients: dict) -> list:
    """Usage and cost per client key (by its client_keys name), as Prometheus counters."""
    lines = metric_header("ccproxy_client_usage_tokens_total", "counter",
                          "Tokens of the answers, by client key (its client_keys name) and type.")
    lines += ["ccproxy_client_usage_tokens_total{%s} %d" % (labels(client=name, type=kind),
                                                            totals[field])
              for name, totals in sorted(clients.items()) for field, kind in USAGE_METRIC_TYPES]
    lines += metric_header("ccproxy_client_usage_cost_dollars_total", "counter",
                           "Cost of the answers by client key, in US dollars.")
    lines += ["ccproxy_client_usage_cost_dollars_total{%s} %.6f" % (labels(client=name),
                                                                   totals["cost_usd"])
              for name, totals in sorted(clients.items())]
    return lines


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus histograms are."""

    def __init__(self):
        self.counts = [0] * len(LATENCY_BUCKETS_SECONDS)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        for index, bound in enumerate(LATENCY_BUCKETS_SECONDS):
            if seconds <= bound:
                self.counts[index] += 1
        self.total += seconds
        self.count += 1

    def render(self, name: str, provider: str) -> list:
        lines = ["%s_bucket{%s} %d" % (name, labels(provider=provider, le="%g" % bound), count)
                 for bound, count in zip(LATENCY_BUCKETS_SECONDS, self.counts)]
        lines.append('%s_bucket{%s} %d' % (name, labels(provider=provider, le="+Inf"), self.count))
        lines.append("%s_sum{%s} %.6f" % (name, labels(provider=provider), self.total))
        lines.append("%s_count{%s} %d" % (name, labels(provider=provider), self.count))
        return lines


def metric_header(name: str, kind: str, help_text: str) -> list:
    """The # HELP and # TYPE lines of one metric."""
    return ["# HELP %s %s" % (name, help_text), "# TYPE %s %s" % (name, kind)]


def labels(**values) -> str:
    """Prometheus label pairs, values escaped."""
    return ",".join('%s="%s"' % (key, str(value).replace("\\", "\\\\").replace('"', '\\"')
                                 .replace("\n", "\\n")) for key, value in values.items())


def format_request_log(request: Request, status: int) -> str:
    """One request log line: no message content, only what happened to the request."""
    record = request.record
    now = time.monotonic()
    usage = record.get("usage") or {}
    first = record.get("first_byte")
    return ("%s %s %s route=%s provider=%s model=%s stream=%s status=%d in=%s out=%s "
            "latency_ms=%.1f ttft_ms=%s client=%s" % (
                record["id"], request.method, request.path, record.get("route", "-"),
                record.get("provider", "-"), record.get("model", "-"),
                str(record.get("stream", False)).lower(), status,
                usage.get("input_tokens", "-"), usage.get("output_tokens", "-"),
                (now - record["started"]) * 1000,
                "%.1f" % ((first - record["started"]) * 1000) if first else "-",
                record.get("client", "-")))


# -----------------------------------------------------------------------------
# 6.4 Provider management
# -----------------------------------------------------------------------------

async def handle_providers(app: ProxyApp, request: Request, conn) -> Response:
    """GET /providers: every provider, secrets masked, with its circuit state."""
    return json_response({"providers": [app.provider_view(p) for p in app.config.providers]})


async def handle_provider_get(app: ProxyApp, request: Request, conn) -> Response:
    """GET /providers/{name}: one provider, masked."""
    provider = app.config.provider_named(provider_name_of(request))
    if provider is None:
        raise NotFoundError("no provider named %r" % provider_name_of(request))
    return json_response(app.provider_view(provider))


async def handle_provider_create(app: ProxyApp, request: Request, conn) -> Response:
    """POST /providers: add a provider, live and in the config file."""
    entry = provider_entry_from(app, request)
    if app.config.provider_named(entry["name"]) is not None:
        raise ConflictError("provider %r already exists; change it with PUT /providers/%s"
                            % (entry["name"], entry["name"]))
    config = app.change_config_file(lambda content: file_providers(content).append(entry))
    return json_response(app.provider_view(config.provider_named(entry["name"])), 201)


async def handle_provider_replace(app: ProxyApp, request: Request, conn) -> Response:
    """PUT /providers/{name}: replace a provider, live and in the config file."""
    name = provider_name_of(request)
    entry = provider_entry_from(app, request, name)
    index = entry_index(app.config.file_content, name)

    def replace(content):
        file_providers(content)[index] = entry
    return json_response(app.provider_view(app.change_config_file(replace).provider_named(name)))


async def handle_provider_delete(app: ProxyApp, request: Request, conn) -> Response:
    """DELETE /providers/{name}: remove a provider (refused while a route names it)."""
    name = provider_name_of(request)
    index = entry_index(app.config.file_content, name)
    app.change_config_file(lambda content: file_providers(content).pop(index))
    return json_response({"deleted": name})


def provider_name_of(request: Request) -> str:
    """The {name} of /providers/{name}."""
    return urllib.parse.unquote(request.path[len("/providers/"):])


def provider_entry_from(app: ProxyApp, request: Request, name: str | None = None) -> dict:
    """The provider a management request sends, validated like the config file (a 400
    names the field). Values from a client are never expanded: a ${VAR} reference is refused,
    since the proxy's environment is not the client's to read."""
    entry = parse_json_body(request)
    if name is not None:
        entry.setdefault("name", name)
        if entry["name"] != name:
            raise InvalidRequestError("name: %r does not match the %r in the path; a provider "
                                      "cannot be renamed" % (entry["name"], name))
    check_no_env_references(entry, "provider")
    checker = ConfigChecker("request body", {})
    provider = build_provider(checker, dict(entry), 0, "provider")
    if checker.problems or provider is None:
        raise InvalidRequestError("; ".join(checker.problems) or "provider: invalid")
    return entry


def check_no_env_references(value, path: str) -> None:
    """A 400 naming the first string that holds `${`: through the management API it would be
    written to the config file and expanded from the proxy's environment at the next load."""
    if isinstance(value, dict):
        for key, item in value.items():
            check_no_env_references(key, path)
            check_no_env_references(item, join_key(path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_no_env_references(item, "%s[%d]" % (path, index))
    elif isinstance(value, str) and "${" in value:
        raise InvalidRequestError("%s: ${…} references are not accepted through the management "
                                  "API (they would read the proxy's environment); send the value "
                                  "itself, or put the reference in the config file" % path)


def file_providers(content: dict) -> list:
    """The config file content's providers list (made when missing)."""
    providers = content.get("providers")
    if not isinstance(providers, list):
        providers = content["providers"] = []
    return providers


def entry_index(content: dict, name: str) -> int:
    """Where provider `name` stands in the config file's providers, or a 404."""
    for index, entry in enumerate(file_providers(content)):
        if isinstance(entry, dict) and entry.get("name") == name:
            return index
    raise NotFoundError("no provider named %r" % name)


# -----------------------------------------------------------------------------
# 6.5 The endpoint table
# -----------------------------------------------------------------------------

PUBLIC_PATHS = ("/", "/health", "/ready")

ENDPOINTS = {
    "/": {"GET": handle_root},
    "/health": {"GET": handle_health},
    "/ready": {"GET": handle_ready},
    "/status": {"GET": handle_status},
    "/metrics": {"GET": handle_metrics},
    "/providers": {"GET": handle_providers, "POST": handle_provider_create},
    "/v1/messages": {"POST": handle_messages},
    "/v1/messages/count_tokens": {"POST": handle_count_tokens},
    "/v1/models": {"GET": handle_models},
}
# Endpoints with a parameter in the path: prefix -> methods.
PREFIX_ENDPOINTS = (
    ("/sessions/", {"GET": handle_session}),
    ("/providers/", {"GET": handle_provider_get, "PUT": handle_provider_replace,
                     "DELETE": handle_provider_delete}),
)
# Handlers that change the configuration: they need the admin_key, or a loopback client.
MANAGEMENT_HANDLERS = frozenset((handle_provider_create, handle_provider_replace,
                                 handle_provider_delete))


OPENAI_CLIENT_PATHS = ("/chat/completions", "/completions", "/responses", "/embeddings")
CLIENT_API_PATHS = ("/v1/messages", "/v1/messages/count_tokens", "/v1/models")


def endpoint_hint(path: str) -> str:
    """What a client that asked for a path nobody serves should change: the usual cases are a
    base URL with a path of its own (/v1/v1/messages) and an OpenAI client pointed at ccproxy."""
    if path.endswith(tuple(api[len("/v1"):] for api in CLIENT_API_PATHS)):
        return ("the Messages API is at /v1/messages: give clients the proxy's address with no "
                "path (ANTHROPIC_BASE_URL=http://HOST:PORT)")
    if path.endswith(OPENAI_CLIENT_PATHS):
        return ("ccproxy speaks Anthropic's Messages API (/v1/messages) to its clients, and "
                "OpenAI's API only to providers")
    return "ccproxy serves clients %s and %s" % (", ".join(CLIENT_API_PATHS[:-1]),
                                                  CLIENT_API_PATHS[-1])


def find_endpoint(request: Request):
    """The handler for the request's path and method; HEAD is served by GET handlers."""
    methods = ENDPOINTS.get(request.path) or next(
        (methods for prefix, methods in PREFIX_ENDPOINTS
         if request.path.startswith(prefix) and len(request.path) > len(prefix)), None)
    if methods is None:
        raise NotFoundError("no endpoint %s: %s" % (request.path, endpoint_hint(request.path)))
    handler = methods.get("GET" if request.method == "HEAD" else request.method)
    if handler is None:
        allowed = ", ".join(sorted(set(methods) | ({"HEAD"} if "GET" in methods else set())))
        raise MethodNotAllowedError("method %s is not allowed on %s" % (request.method,
                                                                       request.path),
                                    [("allow", allowed)])
    return handler



###############################################################################
# 7. Token estimator
###############################################################################

# Character classes and their weights in tokens, fitted to o200k_base on ../shared/tokcorpus
# (English, code, JSON, CJK, base64, emoji). A run of ASCII letters splits at case changes,
# as BPE vocabularies split identifiers and random strings.
ASCII_TOKEN_CLASSES = (
    (re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])"), 1.12),       # word pieces
    (re.compile(r"[0-9]{1,3}"), 1.77),                         # digit groups
    (re.compile(r"\n[ \t]*"), 0.32),                           # line breaks with indent
    (re.compile(r"(?<!\n)[ \t]{2,}"), 0.6),                    # runs of spaces
    (re.compile(r"[!-/:-@\[-`{-~]"), 0.48),                    # punctuation
)
CJK_CHARS = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
NON_ASCII_TOKEN_CLASSES = (
    (re.compile("[%s]" % CJK_CHARS), 0.88),                             # CJK, kana, hangul
    (re.compile(r"[^\W\d_\x00-\x7f%s]" % CJK_CHARS), 0.35),             # other letters
    (re.compile(r"[^\w\s\x00-\x7f%s]" % CJK_CHARS), 1.39),              # emoji, symbols
)
IMAGE_TOKENS = 1600          # Anthropic's cost of an image scaled to its maximum size
DOCUMENT_TOKENS = 1600       # a PDF page or so; documents are rare in Claude Code traffic
MESSAGE_OVERHEAD_TOKENS = 3
TOOL_OVERHEAD_TOKENS = 8
TOOLS_PREAMBLE_TOKENS = 346  # the tool-use system prompt Anthropic adds when tools are present


ESTIMATE_REMEMBERED_CHARS = 64    # a text this long is counted once, then looked up
ESTIMATE_REMEMBERED_TEXTS = 8192  # how many such texts' counts are kept (2 MB at most; about
                                  # 170 for a Claude Code session of 80 turns)


class TextEstimates:
    """The estimates of the texts seen last. Every Claude Code request sends the whole
    conversation again with one turn more, and counting a text's characters takes about 90 ns
    each (30 ms for a 340 KB conversation, on the event loop), so only the new texts are
    counted. Keyed by a text's length and hash: the texts themselves are not kept."""

    def __init__(self, size: int):
        self._size = size
        self._counts = collections.OrderedDict()      # (length, hash) -> tokens, oldest first
        self._lock = threading.Lock()                 # (the library may be used from threads)

    def tokens(self, text: str) -> int:
        """text's estimate, counted only if it is not remembered."""
        key = (len(text), hash(text))
        with self._lock:
            tokens = self._counts.get(key)
            if tokens is not None:
                self._counts.move_to_end(key)
                return tokens
        tokens = count_text_tokens(text)
        with self._lock:
            self._counts[key] = tokens
            if len(self._counts) > self._size:
                self._counts.popitem(last=False)
        return tokens

    def __len__(self) -> int:
        return len(self._counts)


TEXT_ESTIMATES = TextEstimates(ESTIMATE_REMEMBERED_TEXTS)


def estimate_text_tokens(text: str) -> int:
    """Estimated BPE tokens in text (remembered for a text of ESTIMATE_REMEMBERED_CHARS or
    more)."""
    if len(text) < ESTIMATE_REMEMBERED_CHARS:
        return count_text_tokens(text)
    return TEXT_ESTIMATES.tokens(text)


def count_text_tokens(text: str) -> int:
    """Estimated BPE tokens in text, from counts of character classes (no vocabulary)."""
    total = 0.0
    for pattern, weight in ASCII_TOKEN_CLASSES:
        total += weight * len(pattern.findall(text))
    if not text.isascii():
        for pattern, weight in NON_ASCII_TOKEN_CLASSES:
            total += weight * len(pattern.findall(text))
    return int(total + 0.5)


def estimate_block_tokens(block) -> int:
    """Tokens of one content block: text, thinking, tool_use input, tool_result, image…"""
    if isinstance(block, str):
        return estimate_text_tokens(block)
    if not isinstance(block, dict):
        return 0
    kind = block.get("type")
    if kind == "image":
        return IMAGE_TOKENS
    if kind == "document":
        source = block.get("source")
        if isinstance(source, dict) and isinstance(source.get("data"), str) \
                and source.get("type") == "text":
            return estimate_text_tokens(source["data"])
        return DOCUMENT_TOKENS
    if kind == "tool_use":
        return (estimate_text_tokens(str(block.get("name", "")))
                + estimate_text_tokens(JSON_TEXT(block.get("input", {}))))
    if kind == "tool_result":
        content = block.get("content", "")
        blocks = content if isinstance(content, list) else [content]
        return MESSAGE_OVERHEAD_TOKENS + sum(estimate_block_tokens(b) for b in blocks)
    for field in ("text", "thinking", "data"):
        if isinstance(block.get(field), str):
            return estimate_text_tokens(block[field])
    return estimate_text_tokens(JSON_TEXT(block))


def estimate_request_tokens(body: dict) -> int:
    """Estimated input tokens of a Messages request: system, messages, tools."""
    total = 0
    system = body.get("system")
    blocks = system if isinstance(system, list) else [system] if system else []
    total += sum(estimate_block_tokens(b) for b in blocks)
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        blocks = content if isinstance(content, list) else [content] if content else []
        total += MESSAGE_OVERHEAD_TOKENS + sum(estimate_block_tokens(b) for b in blocks)
    tools = body.get("tools") or ()
    if tools:
        total += TOOLS_PREAMBLE_TOKENS
    for tool in tools:
        total += TOOL_OVERHEAD_TOKENS + estimate_text_tokens(JSON_TEXT(tool))
    return max(total, 1)



###############################################################################
# 8. Router and resilience
###############################################################################


# -----------------------------------------------------------------------------
# 8.1 Routing: what a request needs, and the plan of providers it goes to
# -----------------------------------------------------------------------------

Routing = collections.namedtuple("Routing", "provider model route")

SUBAGENT_TAG_RE = re.compile(r"<CCR-SUBAGENT-MODEL>(.*?)</CCR-SUBAGENT-MODEL>\s*", re.S)


def thinking_asked(body: dict) -> bool:
    """Whether a Messages request asks for thinking (enabled, or adaptive)."""
    return dict_of(body.get("thinking")).get("type") in ("enabled", "adaptive")


class RequestFacts:
    """What routing rules ask about a request, each worked out once and only when asked."""

    def __init__(self, config: Config, body: dict, headers: Headers):
        self._config, self.body, self.headers = config, body, headers
        self._tokens = None

    @property
    def model(self) -> str:
        return str(self.body.get("model") or "")

    @property
    def alias(self) -> str:
        """The route a /model picker alias names (claude-via-ccproxy/think), else ""."""
        model = self.model
        return model[len(PICKER_ID_PREFIX):] if model.startswith(PICKER_ID_PREFIX) else ""

    @property
    def tokens(self) -> int:
        if self._tokens is None:
            self._tokens = estimate_request_tokens(self.body)
        return self._tokens

    @property
    def thinking(self) -> bool:
        return thinking_asked(self.body)

    @property
    def tool_names(self) -> list:
        return [str(t.get("name")) for t in self.body.get("tools") or () if isinstance(t, dict)]

    @property
    def web_search(self) -> bool:
        return web_search_tool(self.body) is not None

    @property
    def images(self) -> bool:
        return any(block_has_image(b) for m in self.body.get("messages") or ()
                   if isinstance(m, dict) and isinstance(m.get("content"), list)
                   for b in m["content"])

    @property
    def long_context(self) -> bool:
        return self.tokens > self._config.long_context_threshold

    @property
    def agent(self) -> str:
        """The id Claude Code gives a subagent's requests (x-claude-code-agent-id); "" for the
        main conversation's."""
        return self.headers.get(AGENT_ID_HEADER) or ""


def block_has_image(block) -> bool:
    """Whether a content block is an image or a tool_result holding one."""
    if not isinstance(block, dict):
        return False
    if block.get("type") == "image":
        return True
    inner = block.get("content") if block.get("type") == "tool_result" else None
    return isinstance(inner, list) and any(block_has_image(b) for b in inner)


def compare(left, operator: str, right) -> bool:
    """left <operator> right for route conditions: numbers, strings and booleans."""
    if operator in NUMERIC_COMPARISONS:
        try:
            return NUMERIC_COMPARISONS[operator](float(left), float(right))
        except (TypeError, ValueError):
            return False
    if isinstance(left, bool):
        right = right if isinstance(right, bool) else str(right).lower() in ("true", "1", "yes")
    else:
        left, right = str(left), str(right)
    return COMPARISONS[operator](left, right)


def tools_condition_holds(names: list, operator: str, value) -> bool:
    """tools: == / contains (a tool of that name is present), != (none is), matches (a name
    matches), and the numeric comparisons on how many tools there are."""
    if operator in ("==", "contains"):
        return str(value) in names
    if operator == "!=":
        return str(value) not in names
    if operator == "matches":
        return any(re.search(str(value), name) for name in names)
    return compare(len(names), operator, value)


NUMERIC_COMPARISONS = {">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
                       "<": lambda a, b: a < b, "<=": lambda a, b: a <= b}
# Every operator of a route condition (config validation reads this table too).
COMPARISONS = dict(NUMERIC_COMPARISONS, **{
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
    "contains": lambda a, b: str(b) in str(a),
    "matches": lambda a, b: re.search(str(b), str(a)) is not None,
})
# Custom route conditions: type -> whether a {type, operator, value} condition holds for the
# request's facts (config validation reads the names from here, routing the predicates).
CONDITIONS = {
    "tokenCount": lambda facts, c: compare(facts.tokens, c["operator"], c.get("value")),
    "model": lambda facts, c: compare(facts.model, c["operator"], c.get("value")),
    "thinking": lambda facts, c: compare(facts.thinking, c["operator"], c.get("value")),
    "header": lambda facts, c: compare(facts.headers.get(c["header"], ""), c["operator"],
                                       c.get("value")),
    "tools": lambda facts, c: tools_condition_holds(facts.tool_names, c["operator"],
                                                    c.get("value")),
    "agent": lambda facts, c: compare(facts.agent, c["operator"], c.get("value")),
}
# The scenario routes, in the order they are tried when configured: name -> whether it applies
# to the request (config validation reads the names from here, routing the predicates).
SCENARIOS = {
    "longContext": lambda facts: facts.long_context,
    "subagent": lambda facts: bool(facts.agent),
    "background": lambda facts: "haiku" in facts.model.lower() or facts.alias == "background",
    "webSearch": lambda facts: facts.web_search,
    "think": lambda facts: facts.thinking or facts.alias == "think",
    "image": lambda facts: facts.images,
}


def explicit_choice(config: Config, text: str, route: str):
    """The Routing of a `provider,model` string (or its /model picker id), or a 400 saying
    which provider is missing."""
    if text.startswith(PICKER_ID_PREFIX):
        text = text[len(PICKER_ID_PREFIX):]
    name, _, model = text.partition(",")
    provider = config.provider_named(name.strip())
    if provider is None or not provider.enabled:
        raise InvalidRequestError("model %r names provider %r, which is not configured or not "
                                  "enabled" % (text, name.strip()))
    return Routing(provider, model.strip(), route)


def explicit_candidates(config: Config, text: str, route: str) -> list:
    """The Routing a `provider,model` string names, then the fallbacks of a route with that
    same target, if there is one."""
    chosen = explicit_choice(config, text, route)
    for configured in config.routes.values():
        if (configured.provider, configured.model) == (chosen.provider.name, chosen.model):
            return [chosen] + route_candidates(config, configured)[1:]
    return [chosen]


def route_target(config: Config, route: Route):
    """A route's (enabled) provider and model as a Routing, or None."""
    provider = config.provider_named(route.provider)
    return Routing(provider, route.model, route.name) if provider and provider.enabled else None


def take_subagent_tag(body: dict) -> str | None:
    """The `provider,model` of a <CCR-SUBAGENT-MODEL> tag in the system prompt, removed from
    it (other routers' convention for choosing a sub-agent's model), or None."""
    system = body.get("system")
    blocks = [system] if isinstance(system, str) else system if isinstance(system, list) else []
    for index, block in enumerate(blocks):
        text = block if isinstance(block, str) else block.get("text") \
            if isinstance(block, dict) else None
        match = SUBAGENT_TAG_RE.search(text) if isinstance(text, str) else None
        if match:
            cleaned = text[:match.start()] + text[match.end():]
            if isinstance(system, str):
                body["system"] = cleaned
            else:
                body["system"] = system[:index] + [dict(block, text=cleaned)] + system[index + 1:]
            return match.group(1).strip()
    return None


def no_provider_problem(config: Config) -> str:
    """What to do when no provider is enabled: add one, or enable one."""
    where = config.source or "a config file (see --help)"
    if config.providers:
        return "every provider in %s is disabled (\"enabled\": false); enable one" % where
    return "ccproxy has no enabled provider; add one to %s" % where


def plan_route(config: Config, body: dict, headers: Headers, subagent_choice=None) -> list:
    """Every (provider, model, route) to try, best first.

    The first choice, by precedence: a `provider,model` model string; a sub-agent tag's
    `provider,model`; a model that enabled providers list; the first custom route whose
    conditions all hold (config order); the scenario routes longContext, background,
    webSearch, think, image; routes.default; the first enabled provider. Then that route's
    fallbacks, then (unless failover is false) every other enabled provider with its first
    model. A `provider,model` the request names is tried alone, unless a route with that target
    lists fallbacks: the user asked for that provider, and another's answer would mislead.
    """
    facts = RequestFacts(config, body, headers)
    requested = facts.model
    enabled = config.enabled_providers()
    if "," in requested or subagent_choice:
        return able_plan(config, facts, explicit_candidates(
            config, subagent_choice or requested, "subagent" if subagent_choice else "explicit"))
    plan = [Routing(p, requested, "model") for p in enabled if requested in p.models]
    if not plan:
        plan = routed_by_rules(config, facts)
    if not plan and enabled:
        first = enabled[0]
        plan = [Routing(first, first.models[0] if first.models else requested, "first")]
    if not plan:
        raise InvalidRequestError(no_provider_problem(config))
    if config.failover["other_providers"]:
        tried = {routing.provider.name for routing in plan}
        plan += [Routing(p, p.models[0] if p.models else requested, "failover")
                 for p in enabled if p.name not in tried]
    return able_plan(config, facts, plan)


def able_plan(config: Config, facts: RequestFacts, plan: list) -> list:
    """The plan without the candidates that cannot serve the request: a model whose known window
    it is over, a provider that cannot search when it asks for a web search. When the first
    choice cannot, the longContext or webSearch route is tried first; when no candidate can, a
    400 says why (for the window, in the words Claude Code answers by compacting)."""
    if any(r.provider.context_window(r.model) for r in plan):
        plan = narrowed(config, plan, lambda routing: window_fits(routing, facts.tokens),
                        "longContext") or refuse_overflow(plan[0], facts.tokens)
    if facts.web_search:
        plan = narrowed(config, plan, lambda routing: can_search(routing, facts.body),
                        "webSearch") or refuse_search(plan[0])
    return plan


def window_fits(routing: Routing, tokens: int) -> bool:
    """Whether the request's estimated tokens fit the model's known window, allowing for the
    estimate being up to WINDOW_ESTIMATE_MARGIN too high (the provider itself refuses the
    rare request that is over it by less); with no allowance for the window a server runs a
    model with, which it does not refuse but cuts."""
    provider, model = routing.provider, routing.model
    window = provider.context_window(model)
    margin = 0 if provider.window_is_loaded(model) else WINDOW_ESTIMATE_MARGIN
    return window is None or tokens <= window * (1 + margin)


def can_search(routing: Routing, body: dict) -> bool:
    """Whether the candidate can run the request's web search: its protocol's own search, for
    its model."""
    provider, model = routing.provider, routing.model
    return protocol_for(provider, model, body).can_search(provider, model)


def narrowed(config: Config, plan: list, able, route_name: str) -> list:
    """The able candidates of the plan, route_name's first when the first choice is not able."""
    route = config.routes.get(route_name)
    if not able(plan[0]) and route is not None:
        plan = route_candidates(config, route) + plan
    kept, seen = [], set()
    for routing in plan:
        if able(routing) and (routing.provider.name, routing.model) not in seen:
            seen.add((routing.provider.name, routing.model))
            kept.append(routing)
    return kept


def refuse_overflow(routing: Routing, tokens: int):
    """Raise Anthropic's own 400 for a prompt over the window, which Claude Code answers by
    compacting the conversation."""
    provider, model = routing.provider, routing.model
    raise InvalidRequestError(prompt_too_long(tokens, provider.context_window(model)) + (
        " (%s,%s; estimated%s)" % (provider.name, model, "; the context length Ollama runs it "
                                   "with: give it more with OLLAMA_CONTEXT_LENGTH, e.g. 65536"
                                   if provider.window_is_loaded(model) else "")))


def ollama_url(provider: Provider, path: str) -> str:
    """The URL of one of Ollama's own endpoints, beside its OpenAI-compatible /v1."""
    return re.sub(r"/v1$", "", provider.base_url) + path


async def ask_loaded_windows(upstream, provider: Provider) -> None:
    """Learn from Ollama's GET /api/ps the context length each loaded model runs with; a model
    no longer listed (unloaded, or the server restarted) is forgotten, as it will load with
    whatever context length is set then. No answer leaves what was known."""
    url = ollama_url(provider, "/api/ps")
    outgoing = UpstreamRequest(url, openai_request_headers(provider), None)
    try:
        status, answer = await probe_call(upstream, provider, outgoing)
        models = list_of(dict_of(json.loads(answer)).get("models")) if status == 200 else None
    except (RuntimeError, ValueError, RecursionError):     # stopping; not JSON
        status, models = 0, None
    if models is None:
        log.debug("%s: no list of loaded models at %s (HTTP %d)", provider.name, url, status)
        return
    windows = {}
    for entry in map(dict_of, models):
        for name in (entry.get("name"), entry.get("model")):
            if count_of(entry.get("context_length")) and isinstance(name, str):
                windows[name] = windows[re.sub(r":latest$", "", name)] = entry["context_length"]
    if windows != provider.loaded_windows:
        log.info("%s: the context lengths of its loaded models: %s", provider.name,
                 ", ".join("%s %d" % item for item in sorted(windows.items())) or "none")
    provider.loaded_windows.clear()
    provider.loaded_windows.update(windows)


async def load_for_window(upstream, routing: Routing) -> bool:
    """Before the first request to an Ollama model that is not loaded, have Ollama load it and
    say its context length: otherwise that request would go before the window is known.
    Whether the window is known now; tried once a LOADED_WINDOWS_EVERY_SECONDS, and waited for
    up to PROBE_TIMEOUT_SECONDS (a slower load goes on in Ollama). Only a model the provider's
    `models` list, when it has one, is loaded: a client's made-up names load nothing."""
    provider, model = routing.provider, routing.model
    if not provider.runs_models_itself or provider.context_window(model) \
            or (provider.models and model not in provider.models) \
            or time.monotonic() - provider.loads_tried.get(model, -math.inf) \
            < LOADED_WINDOWS_EVERY_SECONDS:
        return False
    if len(provider.loads_tried) >= MAX_MODELS_REMEMBERED:
        provider.loads_tried.clear()
    provider.loads_tried[model] = time.monotonic()
    await probe_call(upstream, provider, UpstreamRequest(
        ollama_url(provider, "/api/generate"), openai_request_headers(provider),
        json_bytes({"model": model})))
    await ask_loaded_windows(upstream, provider)
    return provider.context_window(model) is not None


def prompt_too_long(tokens: int, window: int) -> str:
    """The words of Anthropic's overflow error, which Claude Code reads both numbers from."""
    return "prompt is too long: %d tokens > %d maximum" % (tokens, window)


def refuse_search(routing: Routing):
    """Raise a 400 for a web search that no candidate can run."""
    raise InvalidRequestError(
        "%s cannot search the web (model %s); set routes.webSearch to a provider that can: "
        "gemini, openrouter, anthropic or openai" % (
            routing.provider.name, routing.model))


def routed_by_rules(config: Config, facts: RequestFacts) -> list:
    """The routing of the first route rule that applies, with its fallbacks; [] if none."""
    chosen = None
    for route in config.routes.values():
        if route.conditions and all(CONDITIONS[c["type"]](facts, c) for c in route.conditions):
            chosen = route_target(config, route)
            if chosen:
                break
    for name, applies in SCENARIOS.items():
        route = config.routes.get(name)
        if chosen is None and route is not None and not route.conditions and applies(facts):
            chosen = route_target(config, route)
    if chosen is None and "default" in config.routes:
        chosen = route_target(config, config.routes["default"])
    return route_candidates(config, config.routes[chosen.route]) if chosen else []


def route_candidates(config: Config, route: Route) -> list:
    """A route's (enabled) target, then its fallbacks, as Routings."""
    targets = [route_target(config, route)] + [
        route_target(config, Route(route.name, p, m, [], [])) for p, m in route.fallbacks]
    return [target for target in targets if target is not None]


def route_request(config: Config, body: dict, required: bool = True, headers=None):
    """The first choice of plan_route(), or None when nothing is enabled and not required."""
    try:
        return plan_route(config, body, headers or Headers())[0]
    except InvalidRequestError:
        if required or config.enabled_providers():
            raise
        return None


def default_target(config: Config):
    """Where an ordinary request goes: routes.default's target, else the first enabled
    provider's first model; None when there is neither."""
    route = config.routes.get("default")
    target = route_target(config, route) if route else None
    enabled = config.enabled_providers()
    if target is None and enabled and enabled[0].models:
        target = Routing(enabled[0], enabled[0].models[0], "first")
    return target


# -----------------------------------------------------------------------------
# 8.2 Resilience: retries, key pools, circuit breakers, failover
# -----------------------------------------------------------------------------

# 8.2.1 Retries, keys, circuits, and the next candidate
# .............................................................................

RETRYABLE_STATUSES = frozenset((408, 409, 429, 500, 502, 503, 504, 529))


class RetryPolicy:
    """Exponential backoff with jitter, honouring Retry-After, within a total time budget."""

    def __init__(self, max_retries: int, budget_seconds: float):
        self._max_retries = max_retries
        self._deadline = time.monotonic() + budget_seconds

    def next_delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds to wait before retrying the same candidate, or None to move on."""
        if attempt >= self._max_retries:
            return None
        delay = retry_after if retry_after is not None else min(
            RETRY_BASE_SECONDS * 2 ** attempt, RETRY_CAP_SECONDS) * random.uniform(0.5, 1.5)
        return delay if time.monotonic() + delay < self._deadline else None


# A key answered with 429 (or a quota error) rests this long when the provider gives no
# retry-after, doubling for each such answer in a row.
KEY_COOLDOWN_SECONDS = 10.0
KEY_COOLDOWN_CAP_SECONDS = 600.0
QUOTA_WORDS_RE = re.compile(r"quota|billing|credit|rate.?limit|too many requests", re.I)


class KeyPool:
    """A provider's keys (api_keys): calls take turns over the keys that are ready. A key
    answered with a rate limit or a quota error cools down for the provider's retry-after (or
    a doubling backoff); one refused (401, 403) is set aside until the config is reloaded."""

    def __init__(self, keys):
        self.keys = tuple(keys)
        self.cool_until = {}          # key -> time.monotonic() when it may be used again
        self.strikes = {}             # key -> rate limits in a row
        self.refused = set()
        self._turn = 0

    def pick(self) -> str | None:
        """The next ready key, or None when every key is cooling down or set aside."""
        now = time.monotonic()
        for _ in self.keys:
            key = self.keys[self._turn % len(self.keys)]
            self._turn += 1
            if key not in self.refused and self.cool_until.get(key, 0.0) <= now:
                return key
        return None

    def put_out(self, key: str, error: ProxyError, provider_name: str) -> bool:
        """Whether the error puts the key out (cooling or set aside), so that another key may
        serve the call; the key's rate-limit count starts over on any other outcome."""
        refused = error.status == 401 or (error.status == 403 and not QUOTA_WORDS_RE.search(
            error.message))
        if refused:
            self.refused.add(key)
            log.warning("%s: key %s refused (HTTP %d); set aside until the config is reloaded",
                        provider_name, mask_secret(key), error.status)
            return True
        if error.status not in (402, 403, 429) or error.kind == "over_plan":
            self.strikes.pop(key, None)
            return False
        strikes = self.strikes[key] = self.strikes.get(key, 0) + 1
        rest = error.retry_after() or min(KEY_COOLDOWN_SECONDS * 2 ** (strikes - 1),
                                          KEY_COOLDOWN_CAP_SECONDS)
        self.cool_until[key] = time.monotonic() + rest
        log.info("%s: key %s rate-limited (HTTP %d); resting %.0f s", provider_name,
                 mask_secret(key), error.status, rest)
        return True

    def served(self, key: str) -> None:
        self.strikes.pop(key, None)

    def exhausted(self, provider_name: str) -> ProxyError:
        """The error for a call with every key out: a 429 until the first is ready again, or,
        when every key was refused, a final 401."""
        now = time.monotonic()
        waits = [self.cool_until[k] - now for k in self.keys if k not in self.refused]
        if not waits:
            return AuthenticationError("%s refused every key of its api_keys" % provider_name
                                       ).made_final()
        wait = max(min(waits), 0.0)
        return RateLimitError("%s: every key is resting after rate limits; the first is ready in "
                              "%.0f s" % (provider_name, wait),
                              [("retry-after", "%d" % math.ceil(wait))])

    def view(self) -> list:
        """Each key's state, masked, for /status."""
        now = time.monotonic()
        return [{"key": mask_secret(key), "state": "refused" if key in self.refused else (
            "resting" if self.cool_until.get(key, 0.0) > now else "ready"),
            "ready_in_seconds": max(round(self.cool_until.get(key, 0.0) - now, 1), 0.0)}
            for key in self.keys]


class CircuitBreaker:
    """Per provider: opens after `threshold` failures in a row, refuses requests while open,
    lets one probe through after `cooldown` seconds (half-open), closes on a success."""

    def __init__(self, threshold: int, cooldown: float, enabled: bool):
        self._threshold, self._cooldown, self._enabled = threshold, cooldown, enabled
        self.state = "closed"
        self.failures = 0
        self.last_error = ""
        self._opened_at = 0.0

    def allows_request(self) -> bool:
        if not self._enabled or self.state == "closed":
            return True
        if self.state == "open" and time.monotonic() - self._opened_at >= self._cooldown:
            self.state = "half_open"           # this request is the probe
            return True
        return False

    def abandon(self) -> None:
        """A request ended without an outcome (its client left): a probe it carried is owed
        again, so the next request becomes the probe."""
        if self.state == "half_open":
            self.state = "open"
            self._opened_at = time.monotonic() - self._cooldown

    def record(self, status: int, error: str) -> None:
        """The outcome of a request: 5xx and unreachable count as failures, 4xx do not."""
        if status < 500:
            self.state, self.failures = "closed", 0
            return
        self.failures += 1
        self.last_error = error
        if self._enabled and (self.state == "half_open" or self.failures >= self._threshold):
            self.state = "open"
            self._opened_at = time.monotonic()

    def public_view(self) -> dict:
        return {"state": self.state if self._enabled else "disabled",
                "consecutive_failures": self.failures, "last_error": self.last_error}


def with_route_headers(answer, routing: Routing):
    """The answer or error, with headers naming where the request went."""
    answer.headers += [("x-ccproxy-provider", routing.provider.name),
                       ("x-ccproxy-model", routing.model), ("x-ccproxy-route", routing.route)]
    return answer


class Failover:
    """Tries a route plan's candidates in order, each with retries and backoff while the retry
    budget lasts, skipping providers whose circuit is open. A failure before the answer began
    moves on; the request's own 4xx does not. Owns a circuit breaker per provider and counts
    how often a request moved on. Every answer and error names where it went (x-ccproxy-*)."""

    def __init__(self):
        self.breakers = {}            # provider name -> CircuitBreaker
        self.count = 0                # times a request moved on to the next candidate

    def breaker(self, name: str, settings) -> CircuitBreaker:
        """The provider's breaker, made with settings (threshold, cooldown, on) when new."""
        breaker = self.breakers.get(name)
        if breaker is None:
            breaker = self.breakers[name] = CircuitBreaker(*settings)
        return breaker

    async def run(self, plan: list, attempt, config: Config) -> Response:
        """The first answer of attempt(routing) along the plan; else an error: the one that
        stopped it, or, when every candidate failed, one naming what each of them answered."""
        policy = RetryPolicy(config.max_retries, config.retry_budget)
        plan = list(plan)             # a context overflow may add the longContext route
        failures = []                 # (routing, error) of each candidate that failed
        for position, routing in enumerate(plan):
            breaker = self.breaker(routing.provider.name, config.breaker_settings)
            if not breaker.allows_request():
                failures.append((routing, OverloadedError(
                    "%s: circuit open after repeated failures (%s)"
                    % (routing.provider.name, breaker.last_error))))
                continue
            try:
                return with_route_headers(await self._retried(routing, attempt, breaker, policy),
                                          routing)
            except ProxyError as failure:
                if not moves_on(failure, plan, position, config):
                    raise with_route_headers(failure, routing)
                failures.append((routing, failure))
            if position + 1 < len(plan):
                self.count += 1
                log.warning("%s failed (HTTP %d); trying %s", routing.provider.name,
                            failures[-1][1].status, plan[position + 1].provider.name)
        raise with_route_headers(every_failure(failures), failures[-1][0])

    @staticmethod
    async def _retried(routing: Routing, attempt, breaker: CircuitBreaker,
                       policy: RetryPolicy) -> Response:
        """attempt(routing), again after a backoff while the policy allows."""
        for number in itertools.count():
            try:
                return await Failover._recorded(routing, attempt, breaker)
            except ProxyError as error:
                delay = policy.next_delay(number, error.retry_after()) \
                    if error.status in RETRYABLE_STATUSES and not error.final else None
                if delay is None:
                    raise
            await asyncio.sleep(delay)

    @staticmethod
    async def _recorded(routing: Routing, attempt, breaker: CircuitBreaker) -> Response:
        """attempt(routing), whose outcome the breaker always learns: the answer or error it
        ended with, or, when it ended otherwise (the client left, a bug), that it proved
        nothing, so that a half-open circuit's probe is never lost."""
        try:
            response = await attempt(routing)
        except ProxyError as error:
            breaker.record(error.status, error.message)
            raise
        except BaseException:
            breaker.abandon()
            raise
        breaker.record(response.status, "")
        return response


def moves_on(failure: ProxyError, plan: list, position: int, config: Config) -> bool:
    """Whether the failed candidate's error lets the request move on along the plan: a failure
    of the provider (retryable, or a configuration problem), a missing model, and a prompt over
    the model's window, for which the longContext route's targets are put next. Each comes
    before any of the answer, so moving on repeats nothing."""
    switches = config.failover
    if failure.status in (400, 413) and CONTEXT_OVERFLOW_RE.search(failure.message):
        route = config.routes.get("longContext")
        tried = {(r.provider.name, r.model) for r in plan[:position + 1]}
        fresh = [r for r in route_candidates(config, route)
                 if (r.provider.name, r.model) not in tried] if route and switches[
                     "context_overflow"] else []
        plan[position + 1:position + 1] = fresh
        return bool(fresh)
    if failure.kind == "missing_model":
        return switches["missing_model"]
    return failure.final or failure.status in RETRYABLE_STATUSES


# 8.2.2 What a provider's refusal says it wants: learned, and the request sent again
# .............................................................................

# A count of tokens in a provider's words, as read from its error messages ("32768", "32,768"):
# at most 15 digits, not part of a longer run (Python 3.11 refuses int() of 4,300 digits).
TOKEN_COUNT = r"(?<![\d,])(?:\d{1,3}(?:,\d{3}){1,4}|\d{1,15})(?!,?\d)"


def token_count(text: str) -> int:
    """A TOKEN_COUNT's number."""
    return int(text.replace(",", ""))


# A provider's refusal of max_tokens above a model's output limit, with the limit: Groq's
# "max_completion_tokens must be less than or equal to 40960" (and "`max_tokens` … `16384`",
# "max_tokens for `m` … 8000"), OpenAI's "This model supports at most 16384 completion tokens",
# DeepSeek's "the valid range of max_tokens is [1, 8192]", a GLM host's "The max_tokens
# parameter is illegal.：限制数值范围[1,131072]" (diegosouzapw/OmniRoute#4518), Anthropic's
# "max_tokens: 64000 > 32000, which is the maximum allowed number of output tokens".
OUTPUT_LIMIT_RE = re.compile(r"max_(?:completion_)?tokens`?(?: for `[^`]*`)? must be less than "
                             r"or equal to `?(%s)|supports at most (%s) completion tokens|"
                             r"max_tokens\b[^\[\]]{0,40}\[1, ?(\d{1,15})\]|max_tokens: \d+ > "
                             r"(%s), which is the maximum allowed number of output tokens"
                             % ((TOKEN_COUNT,) * 3), re.I)


# A request is sent again, as a refusal says, this many times at most: each learns something
# (a field, a beta, a limit), and a server that says something new at every refusal (or gives
# a smaller room each time) would otherwise be called until Python's recursion ran out.
MAX_SENDS_AGAIN = 8


def body_to_send_again(error: ProxyError, provider: Provider, model: str,
                       body: dict) -> dict | None:
    """The request to send again at once after a provider's refusal that says what it wants
    instead, now learned or known: fewer output tokens (the model's limit; what the credits
    cover), its reasoning back or its thinking before calls, no field, beta or system message
    it does not take, adaptive thinking. None after any other."""
    if (learns_output_limit(error, provider, model, body)
            or learns_reasoning_replay(error, provider)
            or learns_thinking_with_calls(error, provider, body)
            or learns_refused_field(error, provider, model)
            or learns_refused_betas(error, provider)
            or learns_system_messages_refused(error, provider)):
        return body
    return (affordable_body(error, provider, body)
            or body_within_context(error, provider, model, body)
            or adaptive_thinking_body(error, provider, model, body))


# OpenRouter's 402 for a max_tokens the account's credits cannot cover, whatever the answer
# would cost: "This request requires more credits, or fewer max_tokens. You requested up
# to 64000 tokens, but can only afford 2666".
AFFORDABLE_RE = re.compile(r"requested up to (%s) tokens, but can only afford (%s)"
                           % (TOKEN_COUNT, TOKEN_COUNT), re.I)
LEAST_OUTPUT_WORTH_ASKING = 1024    # below this, the 402 itself goes to the client


def affordable_body(error: ProxyError, provider: Provider, body: dict) -> dict | None:
    """The request with max_tokens lowered to what the provider says the account's credits
    cover, when that is less than asked and still worth an answer (Claude Code asks for 32,000
    to 128,000 output tokens, and a low balance refused every request); else None."""
    found = AFFORDABLE_RE.search(error.message) if error.status == 402 else None
    affordable = token_count(found.group(2)) if found else 0
    if not LEAST_OUTPUT_WORTH_ASKING <= affordable < body["max_tokens"]:
        return None
    log.warning("%s: the account's credits cover %d output tokens, not the %d asked; sent again "
                "with max_tokens %d (add credits to lift it)", provider.name, affordable,
                body["max_tokens"], affordable)
    return dict(body, max_tokens=affordable)


# Anthropic's words for an overflow that max_tokens makes, in which ccproxy says another
# server's (overflow_message): "input length and `max_tokens` exceed context limit: 6000 + 64000
# > 32768, decrease input length or `max_tokens` and try again".
MAX_TOKENS_OVERFLOW_RE = re.compile(r"input length and `max_tokens` exceed context limit: "
                                    r"(\d{1,15}) \+ \d{1,15} > (\d{1,15})")


def body_within_context(error: ProxyError, provider: Provider, model: str,
                        body: dict) -> dict | None:
    """The request with max_tokens lowered to the room the model's context length leaves its
    input, where another server than Anthropic said max_tokens is what overflows (vLLM's
    "maximum context length is 32768 tokens. However, you requested 70000 tokens (6000 in the
    messages, 64000 in the completion)", Kimi's total; said again in Anthropic's words): the
    length is remembered for the model, and later requests are lowered before they go
    (within_context_length). Claude Code asks for 32,000 to 128,000 output tokens; told, it
    asked again itself, but as one of its retries (none left: the turn failed), at every turn.
    None after any other refusal, and Anthropic's own (its window depends on the request)."""
    found = MAX_TOKENS_OVERFLOW_RE.match(error.message) if error.status == 400 else None
    if found is None or (provider.protocol == "anthropic"
                         and provider.quirks["anthropic_compat"] is None):
        return None
    inputs, window = int(found.group(1)), int(found.group(2))
    sent = provider.sent_max_tokens(model, body["max_tokens"])
    if provider.learned_context_lengths.get(model) != window:
        if len(provider.learned_context_lengths) >= MAX_MODELS_REMEMBERED:
            provider.learned_context_lengths.clear()
        provider.learned_context_lengths[model] = window
        log.info("%s: %s takes %d tokens of input and output together, it says; max_tokens is "
                 "lowered to the room its input leaves from now on", provider.name, model,
                 window)
    room = window - inputs
    return with_max_tokens(body, room) if OUTPUT_ROOM_CLAUDE_CODE_TAKES <= room < sent else None


def within_context_length(body: dict, provider: Provider, model: str) -> dict:
    """The request with max_tokens lowered to the room the model's learned context length
    leaves its estimated input, where that is less than asked and enough to answer in; else
    the request itself (a server that refuses it still says the room: body_within_context).
    The estimate is taken as up to WINDOW_ESTIMATE_MARGIN too low here: the server counts its
    chat template too."""
    length = provider.learned_context_lengths[model]
    sent = provider.sent_max_tokens(model, body["max_tokens"])
    room = length - int(estimate_request_tokens(body) * (1 + WINDOW_ESTIMATE_MARGIN))
    return with_max_tokens(body, room) if OUTPUT_ROOM_CLAUDE_CODE_TAKES <= room < sent else body


def with_max_tokens(body: dict, most: int) -> dict:
    """The request asking for at most `most` output tokens, a thinking budget within them."""
    thinking = dict_of(body.get("thinking"))
    budget = thinking.get("budget_tokens")
    if isinstance(budget, int) and budget >= most:
        return dict(body, max_tokens=most, thinking=dict(thinking, budget_tokens=most - 1))
    return dict(body, max_tokens=most)


# Anthropic's 400 for thinking turned off, or given a budget, on a model that thinks only
# adaptively (Claude Opus 5.5 and Fable 5.1: '"thinking.type.disabled" is not supported for this
# model. Use "thinking.type.adaptive" and "output_config.effort" to control thinking behavior.',
# platform.claude.com/docs/en/models/opus-5-5/whats-new-opus-5-5, checked 2026-12-07). Claude
# Code sends either to a model it does not know as such: a route's, or one named "provider,model".
ADAPTIVE_ONLY_RE = re.compile(r'"thinking\.type\.(?:disabled|enabled)" is not supported')


def adaptive_thinking_body(error: ProxyError, provider: Provider, model: str,
                           body: dict) -> dict | None:
    """The request with adaptive thinking, where the provider's 400 says the model thinks no
    other way (remembered for the model: later requests go so from the start); else None."""
    changed = with_adaptive_thinking(body)
    if error.status != 400 or changed is body or not ADAPTIVE_ONLY_RE.search(error.message):
        return None
    if len(provider.adaptive_thinking_only) >= MAX_MODELS_REMEMBERED:
        provider.adaptive_thinking_only.clear()
    provider.adaptive_thinking_only.add(model)
    log.info("%s: %s thinks only adaptively, it says; thinking turned off or given a budget goes "
             "as adaptive thinking at an effort from now on", provider.name, model)
    return changed


def with_adaptive_thinking(body: dict) -> dict:
    """The request with thinking turned off, or given a budget, as adaptive thinking at the
    least effort, or at the budget's (thinking_effort); any other request as it is."""
    thinking = dict_of(body.get("thinking"))
    if thinking.get("type") not in ("disabled", "enabled"):
        return body
    effort = "low" if thinking["type"] == "disabled" else thinking_effort(body)
    adaptive = {"type": "adaptive"}
    if "display" in thinking:
        adaptive["display"] = thinking["display"]
    return dict(body, thinking=adaptive,
                output_config=dict(dict_of(body.get("output_config")), effort=effort))


def learns_output_limit(error: ProxyError, provider: Provider, model: str, body: dict) -> bool:
    """Whether a provider's 400 says the model's output limit, below what was asked of it:
    remembered for the model (max_tokens above it is lowered from then on, as for a limit in
    the config), so that the request may be sent again at once. Claude Code asks for 32,000
    to 128,000 output tokens, more than many models allow (Groq's most of all)."""
    found = OUTPUT_LIMIT_RE.search(error.message) if error.status == 400 else None
    limit = token_count(next(group for group in found.groups() if group)) if found else 0
    asked = provider.sent_max_tokens(model, body["max_tokens"])
    if not 0 < limit < asked:
        return False
    if len(provider.learned_output_limits) >= MAX_MODELS_REMEMBERED:
        provider.learned_output_limits.clear()
    provider.learned_output_limits[model] = limit
    log.info("%s: %s answers at most %d output tokens, it says; max_tokens is lowered to that "
             "from now on (give it max_output_tokens in models to say so)", provider.name,
             model, limit)
    return True


# A server's refusal of a request field it does not take, and the field: OpenAI's
# "Unrecognized request argument supplied: x", "Unknown parameter: 'x'", "Unsupported
# parameter: 'x' is not supported with this model" (max_tokens on its reasoning models, which
# want max_completion_tokens) and "Unsupported value: 'temperature' does not support 0.2 with
# this model", pydantic servers' "Extra inputs are not permitted" at ["body", "x"] (Mistral's,
# FastAPI's), "property 'x' is unsupported", and xAI's "Argument not supported on this model:
# stop" and "Model grok-4.6 does not support parameter stop" (its reasoning models).
REFUSED_FIELD_RE = re.compile(
    r"(?:Unrecognized request argument supplied|Unknown parameter|Unsupported parameter|"
    r"Argument not supported on this model|does not support parameter):? "
    r"'?(\w+)'?|Unsupported value: '(\w+)' does not support|"
    r"extra_forbidden\W[^}]*?\"loc\"\s*:\s*\[\s*\"body\"\s*,\s*\"(\w+)\"|"
    r"\"loc\"\s*:\s*\[\s*\"body\"\s*,\s*\"(\w+)\"\s*\][^}]*?Extra inputs are not permitted|"
    r"Extra inputs are not permitted:? body\.(\w+)|property '(\w+)' is unsupported", re.I)
# The fields a Chat Completions request is whole without: one a server refuses is left out.
FIELDS_A_REQUEST_DOES_WITHOUT = frozenset((
    "user", "stream_options", "parallel_tool_calls", "prompt_cache_key",
    "prompt_cache_retention", "reasoning_effort", "reasoning", "thinking", "top_k", "top_p",
    "temperature", "metadata", "service_tier", "store", "seed", "web_search_options",
    "stop"))                         # (ccproxy keeps the stop sequences itself)


# The same in a server's copy of Anthropic's words ("context_management: Extra inputs are not
# permitted", "tools.0.custom.defer_loading: …"): gateways in front of Vertex AI, Bedrock or
# LiteLLM refuse the fields of Claude Code that are newer than they are, at every request.
MESSAGES_REFUSED_FIELD_RE = re.compile(r"\b(tools\.\d+\.(?:custom\.)?|thinking\.|output_config\.)?"
                                       r"([a-z_]+): Extra inputs are not permitted")
# The fields (and tools' fields) a Messages request is whole without.
MESSAGES_FIELDS_A_REQUEST_DOES_WITHOUT = frozenset((
    "context_management", "output_config", "thinking", "metadata", "service_tier", "container",
    "top_k", "top_p", "temperature", "stop_sequences", "speed", "inference_geo", "diagnostics",
    "user_profile_id", "workspace_id", "tools.defer_loading", "tools.cache_control",
    "tools.strict", "tools.input_examples", "tools.eager_input_streaming", "thinking.display",
    "output_config.effort"))


def refused_field(error: ProxyError, provider: Provider) -> str:
    """The field a provider's 400 (or 422) says its server does not take, when the request
    does without it ("tools.x" for a tools' field; max_tokens, which a Chat Completions server
    may want as max_completion_tokens); "" for any other error, and from Anthropic itself."""
    if error.status != 400:
        return ""
    if provider.protocol == "openai":
        found = REFUSED_FIELD_RE.search(error.message)
        name = next((group for group in found.groups() if group), "") if found else ""
        return name if name in FIELDS_A_REQUEST_DOES_WITHOUT | {"max_tokens"} else ""
    found = MESSAGES_REFUSED_FIELD_RE.search(error.message) if provider.protocol == "anthropic" \
        and urllib.parse.urlsplit(provider.base_url).hostname != "api.anthropic.com" else None
    outer = (found.group(1) or "").split(".")[0] if found else ""
    name = (outer + "." if outer else "") + found.group(2) if found else ""
    return name if name in MESSAGES_FIELDS_A_REQUEST_DOES_WITHOUT else ""


def learns_refused_field(error: ProxyError, provider: Provider, model: str) -> bool:
    """Whether a provider's 400 (or 422) names a field of the request that its server does not
    take and the request does without: remembered for the model, so that the request may go
    again at once without it. Servers that refuse every field they do not name refused every
    request."""
    name, refused = refused_field(error, provider), provider.refused_fields.get(model, ())
    if not name or name in refused:
        return False
    if len(provider.refused_fields) >= MAX_MODELS_REMEMBERED:
        provider.refused_fields.clear()
    provider.refused_fields[model] = set(refused) | {name}
    log.info("%s refuses %s for %s, it says; it is left out from now on", provider.name,
             "max_tokens (max_completion_tokens is sent)" if name == "max_tokens" else name,
             model)
    return True


# An Anthropic-compatible server's refusal of betas the client asked for, Vertex AI's above all
# (and gateways in front of it): "Unexpected value(s) `effort-2025-11-24`,
# `web-search-2025-03-05` for the `anthropic-beta` header. … try again without the header";
# a gateway's "Unexpected beta header "advisor-tool-2026-03-01"" (anthropics/claude-code#70563);
# Bedrock's "invalid beta flag", which names none: then every beta is left out (ALL_BETAS).
MAX_BETAS_REMEMBERED = 64     # Claude Code sends a dozen; a provider naming more starts afresh
BETAS_REFUSED_RE = re.compile(r"Unexpected value\(s\) ((?:`[^`]{1,100}`,? ?){1,50}) for the "
                              r"`anthropic-beta` header|Unexpected beta header \"([^\"]{1,100})\""
                              r"|(invalid beta flag)")
ALL_BETAS = "*"


def learns_refused_betas(error: ProxyError, provider: Provider) -> bool:
    """Whether an Anthropic-compatible server's 400 (not Anthropic's) names anthropic-beta
    values it refuses, not yet known: remembered for the provider and left out of the header
    from then on, so that the request may go again at once. Claude Code sends a dozen betas,
    newer than such servers, and each of its requests was refused."""
    found = BETAS_REFUSED_RE.search(error.message) if error.status == 400 and \
        provider.protocol == "anthropic" and urllib.parse.urlsplit(
            provider.base_url).hostname != "api.anthropic.com" else None
    betas = frozenset(re.findall(r"`([^`]+)`", found.group(1)) if found.group(1) else [
        found.group(2) or ALL_BETAS]) if found else frozenset()
    if betas <= provider.refused_betas:
        return False
    kept = provider.refused_betas if len(provider.refused_betas) < MAX_BETAS_REMEMBERED else ()
    provider.refused_betas = frozenset(kept) | betas
    log.info("%s refuses the betas %s, it says; they are left out from now on",
             provider.name, ", ".join(sorted(betas)))
    return True


# An Anthropic-protocol server's refusal of the system messages Claude Code puts among the
# others (one ends each of its requests, from 2.1.15x on): LM Studio's "request.messages.1.role:
# Invalid discriminator value. Expected 'user' | 'assistant'" (lmstudio-bug-tracker#1399), a
# pydantic server's "messages.1.role: Input should be 'user' or 'assistant'", MiniMax's "chat
# content has invalid message role: system", a Rust server's "messages[1].role: unknown variant
# `system`, expected `user` or `assistant`" (DeepSeek's, May 2026), FastAPI's 422 at ["body",
# "messages", 1, "role"], and Anthropic's own words without the beta, "Unexpected role "system"".
SYSTEM_ROLE_REFUSED_RE = re.compile(
    r"role\b.{0,20}?(?:Invalid discriminator value\. Expected 'user' \| 'assistant'|Input should "
    r"be 'user' or 'assistant'|must be either 'user' or 'assistant'|unknown variant `?system)|"
    r"invalid message role: system|Unexpected role \W?system", re.I | re.S)


def learns_system_messages_refused(error: ProxyError, provider: Provider) -> bool:
    """Whether an Anthropic-protocol server's 400 says, in the words above, that it takes no
    system message among the others: remembered for the provider, whose requests get them
    joined to the user's from then on (as a compatible server's do), so that the request may
    be sent again at once. Each request of Claude Code's was refused."""
    if error.status not in (400, 422) or provider.protocol != "anthropic" or \
            provider.refuses_system_messages or not SYSTEM_ROLE_REFUSED_RE.search(error.message):
        return False
    provider.refuses_system_messages = True
    log.info("%s takes no system message among the others, it says; they are joined to the "
             "user's from now on", provider.name)
    return True


# A thinking model's refusal of a history whose tool-call turns lack the reasoning it gave them
# (Kimi's "thinking is enabled but reasoning_content is missing in assistant tool call message
# at index 8", from Moonshot and the hosts that serve Kimi, in both its APIs; DeepSeek's
# "Missing `reasoning_content` field in the assistant message" and "The `reasoning_content` in
# the thinking mode must be passed back to the API", and from its Anthropic API "The
# `content[].thinking` in the thinking mode must be passed back to the API"). A model that
# keeps all its thinking wants it on every turn: Kimi's "preserved thinking (thinking.keep=all)
# requires reasoning_content on every assistant message, but assistant message at index 6 is
# missing reasoning_content" (MoonshotAI/kimi-cli#2498).
REASONING_MISSING_RE = re.compile(r"(?:reasoning_content|thinking)\W{0,3} (?:is missing|field "
                                  r"in the assistant|in the thinking mode must be passed back)|"
                                  r"is missing reasoning_content", re.I)
REASONING_ON_EVERY_TURN_RE = re.compile(r"reasoning_content on every assistant message", re.I)


def learns_reasoning_replay(error: ProxyError, provider: Provider) -> bool:
    """Whether a Chat Completions provider's 400 says that its model's reasoning must come back
    on tool-call turns (or, "all", on every turn), which its preset (or having none) did not
    say: remembered for the provider (as the deepseek preset says it), so that the request may
    be sent again at once. Claude Code sends each turn's thinking back; it was dropped, and
    each such turn refused."""
    if error.status != 400 or provider.protocol != "openai" or \
            not REASONING_MISSING_RE.search(error.message):
        return False
    wanted = "all" if REASONING_ON_EVERY_TURN_RE.search(error.message) else True
    if provider.quirks["reasoning_replay"] in (wanted, "all"):
        return False
    provider.quirks["reasoning_replay"] = wanted
    log.info("%s wants its models' reasoning back on %s, it says; it is sent from now on",
             provider.name, "every turn" if wanted == "all" else "tool-call turns")
    return True


def learns_thinking_with_calls(error: ProxyError, provider: Provider, body: dict) -> bool:
    """Whether an Anthropic-compatible server's 400 says, in the words above, that a turn of
    tool calls wants its thinking first, where its preset (or having none) did not say so for
    such a request: remembered for the provider, for requests in thinking mode, or for all
    ("always") when this one did not ask for thinking (Kimi For Coding thinks unasked), so
    that the request may be sent again at once with an empty thinking block before each turn
    of calls that has none (another provider's turn, or one its model thought nothing in)."""
    compat = provider.quirks["anthropic_compat"]
    if error.status != 400 or compat is None or not REASONING_MISSING_RE.search(error.message):
        return False
    wanted = True if thinking_asked(body) else "always"
    if compat["thinking_with_calls"] in (wanted, "always"):
        return False
    compat["thinking_with_calls"] = wanted
    log.info("%s wants a thinking block before each turn of tool calls, it says; an empty one "
             "is put where there is none from now on", provider.name)
    return True


# 8.2.3 Refusals that are the configuration's: plans, tools, keys, models, addresses
# .............................................................................

# Words of a provider's 400 that mean it does not have the model asked for (a 404 need only
# mention a model: Anthropic's says "model: claude-…").
MISSING_MODEL_RE = re.compile(r"model\b.{0,120}?\b(not[ _]found|does not exist|not exist|no such|"
                              r"not available)|\b(unknown|invalid) model|not a valid model",
                              re.I | re.S)


# A provider's refusal of a request larger than the plan allows in a minute, whose numbers
# say no wait can serve it: Groq's 413 and OpenAI's 429 "… on tokens per minute (TPM):
# Limit 6000, Requested 12328". Claude Code's own prompt is 12-19k tokens, over many free plans.
TOKENS_PER_MINUTE_RE = re.compile(r"tokens per min(?:ute)? \(TPM\): Limit (%s), Requested "
                                  r"(%s)" % (TOKEN_COUNT, TOKEN_COUNT), re.I)
# OpenRouter's 429 once an account's free-model requests of the day are spent ("Rate limit
# exceeded: free-models-per-day. Add 10 credits to unlock 1000 free model requests per day").
FREE_MODELS_DAY_RE = re.compile(r"free-models-per-day", re.I)


def over_the_plan(error: ProxyError, routing: Routing) -> ProxyError | None:
    """A provider's refusal that no wait within a session mends (a request larger than the
    plan takes in a minute; free-model requests of the day spent), as a final 429 that says so:
    Claude Code shows a 413's message as its own "Request too large (max 32MB)", and retries
    a 429 in vain for minutes. None for any other error."""
    found = TOKENS_PER_MINUTE_RE.search(error.message) if error.status in (413, 429) else None
    if found and token_count(found.group(2)) > token_count(found.group(1)):
        why = "%s takes %s tokens a minute for %s on this plan, and this request alone is %s: " \
              "no wait serves it" % (routing.provider.name, found.group(1), routing.model,
                                     found.group(2))
    elif error.status == 429 and FREE_MODELS_DAY_RE.search(error.message):
        why = "%s's requests of the day for free models are spent: no retry today serves " \
              "them" % routing.provider.name
    else:
        return None
    error = error_for_status(429, "%s; a larger plan, or another provider in routes, does (%s)"
                             % (why, error.message)).made_final()
    error.kind = "over_plan"          # the key is not rate-limited: it is not rested
    return error


# A server's refusal of a request's tools, and how to give them: Ollama's "<model> does not
# support tools" (server/images.go), vLLM's "\"auto\" tool choice requires
# --enable-auto-tool-choice and --tool-call-parser to be set", llama.cpp's 500 "tools param
# requires --jinja flag", OpenRouter's 404 "No endpoints found that support tool use".
TOOLS_REFUSALS = (
    (re.compile(r"does not support tools", re.I), "pick a model that has them (`ollama show "
     "MODEL` lists its capabilities) and set it in %s"),
    (re.compile(r"requires --enable-auto-tool-choice", re.I), "start vLLM with "
     "--enable-auto-tool-choice and the --tool-call-parser of the model (or pick another in %s)"),
    (re.compile(r"requires --jinja", re.I), "start llama-server with --jinja (or pick another "
     "model in %s)"),
    (re.compile(r"endpoints found that support tool use", re.I), "pick a model that has them "
     "and set it in %s"))


def tools_refused(error: ProxyError, routing: Routing, setting: str) -> ProxyError | None:
    """A server's refusal of the request's tools as a final 400 saying how to give them (a
    retry cannot; llama.cpp's is a 500 and OpenRouter's a 404, which read as an outage and a
    wrong address); None for any other error."""
    for words, fix in TOOLS_REFUSALS:
        if words.search(error.message):
            return InvalidRequestError("%s gives %s no tools, which Claude Code needs for all it "
                                       "does: %s (%s)" % (routing.provider.name, routing.model,
                                                          fix % setting,
                                                          error.message)).made_final()
    return None


def nothing_there(provider: Provider) -> str:
    """What a 404 naming no model means: the address is not the API's; most often an
    OpenAI-compatible server's (vLLM, llama.cpp, LM Studio) without the /v1 its API is under."""
    parts = urllib.parse.urlsplit(provider.base_url)
    if provider.protocol in ("openai", "openai-responses") and parts.path in ("", "/") and \
            not provider.quirks["azure"]:
        return "nothing at that address: its API is most often under /v1, try %s://%s/v1" % (
            parts.scheme, parts.netloc)
    return "nothing at that address"


def diagnosed(error: ProxyError, routing: Routing, config: Config) -> ProxyError:
    """A provider's failure that is a configuration problem (its key refused, no such model,
    nothing serving at its address, no tools, a plan too small for the request) as a final
    error that names the provider, the cause and what to fix; any other error as it is."""
    plan = over_the_plan(error, routing)
    if plan is not None:
        return plan
    provider = routing.provider
    index = next((number for number, known in enumerate(config.providers)
                  if known.name == provider.name), 0)
    place = " in %s" % config.source if config.source else ""
    refused = tools_refused(error, routing, model_setting(config, routing, index) + place)
    if refused is not None:
        return refused
    if error.status in (401, 403):
        fix = refused_key_fix(error, provider, "providers[%d]" % index, place)
    elif (error.status == 404 and "model" in error.message.lower()) or (
            error.status == 400 and MISSING_MODEL_RE.search(error.message)):
        fix = "%s has no model %r; fix %s%s" % (provider.name, routing.model,
                                                model_setting(config, routing, index), place)
        error = InvalidRequestError("%s (%s)" % (fix, error.message)).made_final()
        error.kind = "missing_model"
        return error
    elif error.status == 404:        # a 502, as Claude Code hides a 404's words behind its own
        return UpstreamError("%s has %s; check providers[%d].api_base_url%s (%s)" % (
            provider.name, nothing_there(provider), index, place, error.message)).made_final()
    elif error.final and isinstance(error, UpstreamError) and \
            "CERTIFICATE_VERIFY_FAILED" in error.message:
        fix = "%s's TLS certificate does not verify: where a proxy inspects TLS (or the server " \
              "has a certificate of its own), set SSL_CERT_FILE to the CA bundle that signs " \
              "it, then restart ccproxy" % provider.name
    elif error.final and isinstance(error, UpstreamError):
        fix = "%s cannot be reached; check providers[%d].api_base_url%s and that its server " \
              "runs" % (provider.name, index, place)
    else:
        return error
    return error_for_status(error.status, "%s (%s)" % (fix, error.message),
                            error.headers).made_final()


# Kimi For Coding's refusal of a client it does not know for a coding agent (its OpenAI-
# compatible API knows them by their User-Agent, and ccproxy's translations send their own):
# "Kimi For Coding is currently only available for Coding Agents such as Kimi CLI, Claude
# Code, Roo Code, Kilo Code, etc." (403 access_terminated_error).
CODING_AGENTS_ONLY_RE = re.compile(r"only available for Coding Agents", re.I)


def refused_key_fix(error: ProxyError, provider: Provider, entry: str, place: str) -> str:
    """What to fix after a 401 or 403: the key, or, where the server serves only the coding
    agents it knows, the address: its Anthropic API gets the client's own User-Agent."""
    if error.status == 403 and CODING_AGENTS_ONLY_RE.search(error.message):
        return ("%s serves only the coding agents it knows, whatever the key: set %s.type to "
                "\"anthropic\" and %s.api_base_url to its Anthropic address (Kimi For Coding: "
                "https://api.kimi.com/coding)%s, where Claude Code's own User-Agent goes"
                % (provider.name, entry, entry, place))
    return "%s refused its API key; fix %s.api_key%s" % (provider.name, entry, place)


def model_setting(config: Config, routing: Routing, index: int) -> str:
    """Where the config chose a routing's model, as a key path (or how the request named it)."""
    route = config.routes.get(routing.route)
    if route is not None:
        if (route.provider, route.model) == (routing.provider.name, routing.model):
            return "routes.%s.model" % route.name
        for number, target in enumerate(route.fallbacks):
            if target == (routing.provider.name, routing.model):
                return "routes.%s.fallbacks[%d]" % (route.name, number)
    if routing.route in ("explicit", "subagent"):
        return "the \"provider,model\" the request named (Claude Code: /model)"
    return "providers[%d].models" % index


def every_failure(failures: list) -> ProxyError:
    """The error when every candidate failed: the last one's status (final only when all
    were), its message listing what each provider answered."""
    routing, last = failures[-1]
    if len(failures) == 1:
        return last
    lines = "; ".join("%d. %s (%s): %s" % (number, r.provider.name, r.model, e.message)
                      for number, (r, e) in enumerate(failures, 1))
    error = error_for_status(last.status, "every provider failed: %s" % lines,
                             [h for h in last.headers if h[0] == "retry-after"])
    return error.made_final() if all(e.final for _, e in failures) else error



###############################################################################
# 9. Transformers
###############################################################################


# -----------------------------------------------------------------------------
# 9.1 Shared by every protocol: the client's request and events, the relay
# -----------------------------------------------------------------------------

# 9.1.1 Protocols, a provider's call, and what a translation knows
# .............................................................................

MAX_UNKNOWN_NAMES_LOGGED = 200     # per protocol and process: a client making up names at
MAX_LOGGED_NAME_CHARS = 100        # every request fills neither memory nor the log


class Protocol:
    """One provider protocol as the endpoints use it: a subclass per protocol (9.2 on), one
    object of each in PROTOCOLS (9.6), which config validation and dispatch both read.

    Every method takes data and returns data; relay_call() does the I/O around them. The
    defaults fit a translating protocol, which turns a whole answer into a message and a
    stream into events with a stream translator (feed_event, finish, complete).
    """

    name = ""
    coverage = None          # what a translation maps, drops and refuses (None: passes all on)

    def __init__(self):
        self._warned = set()     # unknown names already logged, once per process

    def check_request(self, body: dict) -> None:
        """Refuse (400) what the translation cannot carry, naming it and why; log once, by name
        and never by value, each request field, block type or tool field it does not know."""
        if self.coverage is None:
            return
        check_stop_sequences(body.get("stop_sequences"), self.name)
        for kind, name in request_parts(body):
            action, why = self.coverage[kind].get(name, ("unknown", ""))
            if action == "refused":
                raise InvalidRequestError("%s %r cannot be sent to a %s provider: %s"
                                          % (kind, name, self.name, why))
            if action == "unknown" and (kind, name) not in self._warned \
                    and len(self._warned) < MAX_UNKNOWN_NAMES_LOGGED:
                self._warned.add((kind, name))
                log.warning("%s translation: the %s %r is new to ccproxy and was not translated",
                            self.name, kind, name[:MAX_LOGGED_NAME_CHARS])

    def upstream_tool_name(self, name: str) -> str:
        """The name a client's tool has at this provider."""
        return name

    def messages_request(self, provider: Provider, model: str, request: Request,
                         body: dict) -> UpstreamRequest:
        """The provider call for a Messages request."""
        raise NotImplementedError

    def count_tokens_request(self, provider: Provider, model: str, request: Request,
                             body: dict) -> UpstreamRequest | None:
        """The provider call that counts a request's input tokens; None when it has none."""
        return None

    def input_tokens(self, answer: bytes) -> int | None:
        """The count in the provider's answer to count_tokens_request(), if it holds one."""
        return None

    def models_request(self, provider: Provider) -> UpstreamRequest | None:
        """The provider call (a GET) that lists its models; None when it has none."""
        return None

    def listed_models(self, answer) -> list:
        """The model names in the provider's answer to models_request() (parsed JSON)."""
        return [str_of(entry.get("id")) for entry in list_of(dict_of(answer).get("data"))
                if isinstance(entry, dict)]

    def can_search(self, provider: Provider, model: str) -> bool:
        """Whether the provider can run the web_search server tool for this model."""
        return False

    def message(self, answer, context: TranslationContext) -> dict:
        """The client's message for the provider's whole answer (parsed JSON)."""
        raise NotImplementedError

    def stream_translator(self, context: TranslationContext):
        """A translator of the provider's stream events into the client's events."""
        raise NotImplementedError

    def answer(self, call, context: TranslationContext, stream: bool) -> Response:
        """The client's answer for a whole 2xx answer."""
        return message_response(self.message(parse_upstream_json(call), context), context,
                                stream)

    def stream_relay(self, context: TranslationContext):
        """The relay of the provider's event stream (feed, finish, complete, broken)."""
        return TranslatedStreamRelay(self.stream_translator(context), context)

    def error(self, call) -> ProxyError:
        """The client's error for the provider's error status."""
        return error_from_upstream(call.provider, call.status, call.body, call.relayed_headers())

    def rescued_message(self, call, context: TranslationContext) -> dict | None:
        """The client's message for an error status that holds what the model wrote, or None
        (the error is the answer)."""
        return None

    def __repr__(self):
        return "<%s protocol>" % self.name


async def relay_call(protocol: Protocol, call, conn, request: Request, body: dict) -> Response:
    """The one path of every provider call: send it, then turn the provider's error, whole
    answer or event stream into the client's answer, through the protocol's translation."""
    context = TranslationContext(call.provider, request, body, protocol.upstream_tool_name,
                                 call.model)
    stream = body.get("stream") is True
    status = await call_provider(call, conn, stream)
    if status >= 400:
        rescued = protocol.rescued_message(call, context)
        if rescued is not None:
            return message_response(rescued, context, stream)
        return answer_to_error(protocol.error(call), context, stream)
    if not 200 <= status < 300:
        location = call.header("location")
        raise UpstreamError("%s: answered HTTP %d%s; check its api_base_url" % (
            call.provider.name, status, " (a redirect to %s)" % location if location else ""))
    if call.body is not None and not stream and call.answers_with_events():
        return json_response(message_of_event_stream(call, protocol.stream_relay(context)))
    if call.body is not None:
        return protocol.answer(call, context, stream)
    return await stream_response(call, protocol.stream_relay(context))


def message_of_event_stream(call, relay) -> dict:
    """The message a provider streamed in answer to a request for a whole one (a server that
    streams whatever it is asked): its events read as a stream's are, then gathered."""
    events = relay.feed(without_bom(call.body)) + relay.finish(None)
    if relay.broken is not None:
        raise relay.broken
    try:
        message = message_from_events(events) if relay.complete else None
    except (ValueError, LookupError, TypeError, AttributeError):       # a server's own events
        message = None
    if not isinstance(message, dict) or message.get("stop_reason") is None:
        raise UpstreamError("%s: answered a request for a whole answer with an event stream "
                            "that does not hold a whole message" % call.provider.name)
    return message


async def call_provider(call, conn, stream: bool = False) -> int:
    """Send a provider call that is cut when the client leaves; the answer's status."""
    conn.cancel_on_disconnect(call.cancel)
    return await call.send(stream)


def history_tool_ids(messages) -> frozenset:
    """The ids of the conversation's tool calls, which a call of the answer must not take:
    a server that numbers its calls from 0 in every answer (or whose model writes the
    numbers) gives each turn's first call one id, and Anthropic refuses a history whose
    ids are not unique ("tool_use ids must be unique"), at every turn after. Read when the
    request is (an open stream keeps no part of its body)."""
    return frozenset(block["id"] for message in list_of(messages)
                     if dict_of(message).get("role") == "assistant"
                     for block in list_of(message.get("content"))
                     if dict_of(block).get("type") == "tool_use"
                     and isinstance(block.get("id"), str))


class TranslationContext:
    """What a response translator needs to know about its request."""

    def __init__(self, provider: Provider, request: Request, body: dict, upstream_tool_name,
                 routed_model: str = ""):
        self.provider = provider
        self.model, self.routed_model = body.get("model"), routed_model
        asked = body.get("max_tokens")
        self.max_tokens = provider.sent_max_tokens(routed_model, asked) if isinstance(
            asked, int) else asked
        self.record = request.record
        self.input_estimate = max(len(request.body) // 4, 1)   # cheap; real usage comes later
        self._tools = body.get("tools")
        self.history_ids = history_tool_ids(body.get("messages"))
        self._tool_names = {upstream_tool_name(str(t.get("name"))): str(t.get("name"))
                            for t in self._tools or () if isinstance(t, dict)}
        self.probe = body.get("max_tokens") == 1
        self.search_query = web_search_query(body) if web_search_tool(body) else None
        self.wants_thinking = thinking_effort(body) is not None
        self.thinking_omitted = dict_of(body.get("thinking")).get("display") == "omitted"
        stops = [s for s in list_of(body.get("stop_sequences")) if isinstance(s, str) and s]
        self.stops = StopSequences(stops) if stops else None

    def tool_name(self, name) -> str:
        """The client's name for a tool the provider named (a name the provider could not take
        was changed on the way there)."""
        if not isinstance(name, str) or not name:
            return "unknown_tool"
        return self._tool_names.get(name, name)

    @property
    def tool_schemas(self) -> dict:
        """Each tool's name as the provider knows it -> its input schema's properties."""
        properties = {str(t.get("name")): dict_of(dict_of(t.get("input_schema")).get(
            "properties")) for t in list_of(self._tools) if isinstance(t, dict)}
        return {upstream: properties.get(name, {}) for upstream, name in self._tool_names.items()}

    def estimated_usage(self, output_chars: int) -> dict:
        return {"input_tokens": self.input_estimate, "output_tokens": max(output_chars // 4, 1),
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


# 9.1.2 The client's request: what each translation reads, maps and leaves out
# .............................................................................

TOOL_USE_ID_RE = re.compile(r"[a-zA-Z0-9_-]+\Z")     # what a tool_use id may hold
SERVER_TOOL_ID_RE = re.compile(r"srvtoolu_[a-zA-Z0-9_]+\Z")   # and a server_tool_use id
ENCODED_TOOL_ID_PREFIX = "ccpxid_"       # a provider's call id that a tool_use id could not hold
REPEATED_TOOL_ID_PREFIX = "ccpxre_"      # 12 hex digits, then the id of a call it repeats
INTERRUPTED_CALL_RESULT = "[no result: the tool call was interrupted]"   # for a call without one
BILLING_HEADER_PREFIX = "x-anthropic-billing-header:"      # Claude Code's, not for providers
# Server tools' blocks: Anthropic runs these tools itself; no other provider has them. The
# advisor's result (Claude Code's /advisor, beta advisor-tool-2026-03-01) among them: a session
# that had one failed with a 400 at every turn once routed elsewhere.
SERVER_BLOCK_TYPES = ("server_tool_use", "web_search_tool_result", "web_fetch_tool_result",
                      "code_execution_tool_result", "bash_code_execution_tool_result",
                      "text_editor_code_execution_tool_result", "tool_search_tool_result",
                      "advisor_tool_result", "mcp_tool_use", "mcp_tool_result",
                      "search_result", "container_upload")
ASSISTANT_BLOCK_TYPES = ("text", "tool_use", "thinking", "redacted_thinking") + SERVER_BLOCK_TYPES
# The blocks that name a server tool's call: its use, and its result (by tool_use_id).
SERVER_CALL_BLOCK_TYPES = tuple(kind for kind in SERVER_BLOCK_TYPES if kind == "server_tool_use"
                                or kind.endswith("_tool_result") and not kind.startswith("mcp_"))


def request_parts(body: dict):
    """(kind, name) of every field, content block type and tool field of a request."""
    yield from (("field", key) for key in body)
    for message in list_of(body.get("messages")):
        for block in list_of(dict_of(message).get("content")):
            if isinstance(dict_of(block).get("type"), str):
                yield "block", block["type"]
    for tool in list_of(body.get("tools")):
        yield from (("tool field", key) for key in dict_of(tool))


def coverage(mapped=(), dropped=None, refused=None) -> dict:
    """A translation's table for one kind of request part: name -> (action, why)."""
    table = {name: ("mapped", "") for name in mapped}
    table.update((name, ("dropped", why)) for name, why in (dropped or {}).items())
    table.update((name, ("refused", why)) for name, why in (refused or {}).items())
    return table


# What every translating protocol does with a Messages request, beyond its own differences.
ANTHROPIC_ONLY = "an Anthropic account or service setting, with no meaning elsewhere"
CACHE_MARKS_WHY = ("the provider caches prompt prefixes its own way (OpenRouter's Anthropic and "
                   "Gemini models keep the marks on text parts)")
TRANSLATED_FIELDS = coverage(
    mapped=("model", "messages", "max_tokens", "system", "stream", "tools", "tool_choice",
            "thinking", "temperature", "top_p", "top_k", "stop_sequences", "output_config",
            "output_format", "metadata"),
    dropped={"context_management": "Anthropic edits the context on its side; the conversation "
                                   "goes on as the client holds it",
             "cache_control": CACHE_MARKS_WHY,
             "service_tier": ANTHROPIC_ONLY, "container": ANTHROPIC_ONLY,
             "diagnostics": ANTHROPIC_ONLY, "inference_geo": ANTHROPIC_ONLY,
             "speed": ANTHROPIC_ONLY, "user_profile_id": ANTHROPIC_ONLY,
             "workspace_id": ANTHROPIC_ONLY},
    refused={"mcp_servers": "Anthropic's MCP connector runs those tools on Anthropic's side"})
TRANSLATED_BLOCKS = coverage(
    mapped=("text", "image", "document", "tool_use", "tool_result", "tool_reference", "thinking",
            "search_result", "server_tool_use", "web_search_tool_result", "web_fetch_tool_result",
            "code_execution_tool_result", "mcp_tool_use", "mcp_tool_result"),
    dropped={"redacted_thinking": "another provider's encrypted thinking means nothing here"},
    refused={"container_upload": "files uploaded to Anthropic's containers are not readable"})
TRANSLATED_TOOL_FIELDS = coverage(
    mapped=("name", "description", "input_schema", "type", "defer_loading", "max_uses"),
    dropped={"cache_control": CACHE_MARKS_WHY,
             "strict": "schemas go as they are; strict decoding is Anthropic's",
             "input_examples": "no equivalent; the description and schema keep the tool's use",
             "eager_input_streaming": "arguments stream as the provider sends them",
             "allowed_domains": "no equivalent at the providers that search (logged)",
             "blocked_domains": "no equivalent at the providers that search (logged)",
             "user_location": "no equivalent at the providers that search"})
TRANSLATED_REQUEST = {"field": TRANSLATED_FIELDS, "block": TRANSLATED_BLOCKS,
                      "tool field": TRANSLATED_TOOL_FIELDS}


def tool_use_id(call_id) -> str:
    """The tool_use id for an upstream call id: kept when a tool_use id may hold it, else encoded
    reversibly, or a fresh id when there is none."""
    if not isinstance(call_id, str) or not call_id:
        return random_id("toolu_")
    if TOOL_USE_ID_RE.match(call_id):
        return call_id
    return ENCODED_TOOL_ID_PREFIX + id_text(call_id)


PLAIN_USER_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")     # OpenAI's `user`: 64 at most


def plain_user_id(metadata) -> str | None:
    """metadata.user_id as a server that takes only letters, digits, _ and - can: as is when it
    is so, else a stable digest (Claude Code sends JSON there); None when there is none."""
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if not isinstance(user_id, str) or not user_id:
        return None
    if PLAIN_USER_ID_RE.fullmatch(user_id):
        return user_id
    return "u_" + hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def id_text(text: str) -> str:
    """text in characters a tool_use id may hold (base64url, unpadded); text_of_id reverses it."""
    return base64.urlsafe_b64encode(text.encode("utf-8", "surrogatepass")).decode().rstrip("=")


def text_of_id(encoded: str) -> str | None:
    """The text id_text() made encoded of, or None when it made none."""
    try:
        return base64.urlsafe_b64decode(encoded + "==").decode()
    except (ValueError, UnicodeDecodeError):
        return None


def own_tool_id(tool_id: str, taken: set, history) -> str:
    """tool_id, unless a call already has it (it then joins taken, the answer's ids).

    A call with the id of an earlier call of the same answer gets a fresh one: Xinference
    gives every call of an answer one id (xorbitsai/inference#4237), and Claude Code paired
    the results of all with one call. A call with the id of a call earlier in the
    conversation (history) gets one that carries its own: the provider gets back the id it
    gave, and Claude Code, which takes a repeated id for the call it has run, a new one.
    """
    if tool_id in taken:
        tool_id = random_id("toolu_")
    elif tool_id in history:
        tool_id = "%s%012x%s" % (REPEATED_TOOL_ID_PREFIX, ID_GENERATOR.getrandbits(48),
                                 id_text(tool_id))
    taken.add(tool_id)
    return tool_id


class AnswerToolIds:
    """The ids of an answer's tool calls, each made one no earlier call has (own_tool_id)."""

    def __init__(self, context: TranslationContext):
        self._taken, self._history = set(), context.history_ids

    def own(self, tool_id):
        """The id the client gets for a call the provider named tool_id."""
        return own_tool_id(tool_id, self._taken, self._history) \
            if isinstance(tool_id, str) else tool_id


def first_tool_id(tool_id: str) -> str:
    """The tool_use id a call was first given, for an id own_tool_id made for its repeat."""
    if tool_id.startswith(REPEATED_TOOL_ID_PREFIX):
        return text_of_id(tool_id[len(REPEATED_TOOL_ID_PREFIX) + 12:]) or tool_id
    return tool_id


WEB_SEARCH_QUERY_RE = re.compile(r"Perform a web search for the query: (.+)", re.S)
MAX_SERVER_BLOCK_CHARS = 20000           # the most of a server tool's output kept as text


def web_search_tool(body: dict) -> dict | None:
    """The web_search server tool of a request (Claude Code's WebSearch sends it), if any."""
    return next((tool for tool in body.get("tools") or () if isinstance(tool, dict)
                 and str(tool.get("type", "")).startswith("web_search")), None)


def web_search_query(body: dict) -> str:
    """What a search request asks to search for: Claude Code's "Perform a web search for the
    query: …", else the last user text."""
    for message in reversed(body.get("messages") or ()):
        content = message.get("content") if isinstance(message, dict) else None
        texts = [content] if isinstance(content, str) else [
            b.get("text") for b in list_of(content) if isinstance(b, dict)
            and isinstance(b.get("text"), str)]
        if message.get("role") == "user" and texts:
            text = "\n".join(texts).strip()
            match = WEB_SEARCH_QUERY_RE.search(text)
            return (match.group(1) if match else text).strip()[:500]
    return ""


def search_blocks(query: str, results: list) -> list:
    """The server_tool_use and web_search_tool_result blocks that report a search a provider
    ran; results are (url, title) pairs. Claude Code takes the links it shows from the result
    block."""
    tool_id = random_id("srvtoolu_")
    return [{"type": "server_tool_use", "id": tool_id, "name": "web_search",
             "input": {"query": query}},
            {"type": "web_search_tool_result", "tool_use_id": tool_id, "content": [
                {"type": "web_search_result", "url": url, "title": title, "page_age": None,
                 "encrypted_content": ""} for url, title in results]}]


def with_search_blocks(content: list, results: list, citations: list, query: str) -> list:
    """A whole answer's blocks with the search its provider ran: the citations on its first
    text block, then the blocks that report the search (none when it found nothing)."""
    text_blocks = [block for block in content if block["type"] == "text"]
    if citations and text_blocks:
        text_blocks[0]["citations"] = citations
    return content + search_blocks(query, results) if results else content


def search_citation(url: str, title: str, cited_text: str) -> dict:
    """A citation of a search result, as Anthropic attaches them to text."""
    return {"type": "web_search_result_location", "url": url, "title": title,
            "encrypted_index": "", "cited_text": cited_text}


def server_block_text(block: dict) -> str | None:
    """A block of a server tool Anthropic ran (web search, fetch, code execution, MCP) as text
    another provider's model can read: what was asked and what came back. Encrypted content
    is never passed on. None for a block with nothing readable (a container upload)."""
    kind = block.get("type")
    if kind in ("server_tool_use", "mcp_tool_use"):
        arguments = dict_of(block.get("input"))
        if block.get("name") == "web_search" and "query" in arguments:
            return "[web search: %s]" % arguments["query"]
        return "[%s %s: %s]" % (kind.replace("_", " "), block.get("name"),
                                JSON_TEXT(arguments))
    if kind == "web_search_tool_result":
        return web_search_result_text(block.get("content"))
    if kind == "container_upload":
        return None
    texts = [text for text in nested_texts(block) if text]
    return ("[%s]\n%s" % (kind.replace("_", " "), "\n".join(texts)))[:MAX_SERVER_BLOCK_CHARS]


def web_search_result_text(content) -> str:
    """A web_search_tool_result's results as numbered lines of title and URL."""
    if isinstance(content, dict):
        return "[web search failed: %s]" % content.get("error_code", "unknown error")
    lines = ["%d. %s %s" % (number, item.get("title") or "", item.get("url") or "")
             for number, item in enumerate((i for i in list_of(content) if isinstance(i, dict)),
                                           1)]
    return "[web search results]\n" + ("\n".join(lines) or "(no results)")


def nested_texts(value) -> list:
    """Every readable string inside a server tool's block: text, stdout, stderr, URLs, titles,
    a fetched document's text; never encrypted content or base64 data."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [text for item in value for text in nested_texts(item)]
    if not isinstance(value, dict) or value.get("type") == "base64":
        return []
    return [text for key, item in value.items() if key in READABLE_BLOCK_KEYS
            for text in nested_texts(item)]


READABLE_BLOCK_KEYS = ("text", "title", "url", "source", "stdout", "stderr", "content", "data",
                       "retrieved_at", "error_code")


def text_of_system(system) -> str:
    """The system prompt as one string: text blocks joined by blank lines, without Claude
    Code's billing-header block (meaningless elsewhere)."""
    if isinstance(system, str):
        return system.strip() and system
    return "\n\n".join(b["text"] for b in system_text_blocks(system))


def system_text_blocks(system) -> list:
    """The system prompt's text blocks, without Claude Code's billing-header block."""
    return [b for b in system or () if isinstance(b, dict) and b.get("type") == "text"
            and visible_text(b.get("text")) and not b["text"].startswith(BILLING_HEADER_PREFIX)]


def tool_result_text(block: dict) -> str:
    """A tool_result's content as text: strings and text blocks joined, never their JSON; a
    tool_reference (what Claude Code's tool search returns) as the name of the tool it loaded;
    a search result or document as its readable text; images and PDFs are sent apart."""
    content = block.get("content")
    texts, media = [], tool_result_media(block)
    for item in content if isinstance(content, list) else [content]:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and item.get("type") == "text":
            texts.append(str(item.get("text", "")))
        elif isinstance(item, dict) and item.get("type") == "tool_reference":
            texts.append(tool_reference_text(item))
        elif isinstance(item, dict) and item.get("type") is not None and item not in media:
            texts.append("[%s]\n%s" % (item["type"], "\n".join(
                t for t in nested_texts(item) if t))[:MAX_SERVER_BLOCK_CHARS])
    text = "\n".join(t for t in texts if t)
    return text or ("[%s attached below]" % media[0]["type"] if media else "")


def offered_tools(body: dict) -> list:
    """The request's tools a translating provider should see: a tool marked defer_loading only
    once a tool_reference in the conversation has named it (Claude Code's tool search loads
    tools that way; sent from the start, every deferred tool would cost tokens on every turn)."""
    tools = [tool for tool in list_of(body.get("tools")) if isinstance(tool, dict)]
    if not any(tool.get("defer_loading") is True for tool in tools):
        return tools
    loaded = {dict_of(item).get("tool_name") for message in list_of(body.get("messages"))
              for block in list_of(dict_of(message).get("content"))
              if dict_of(block).get("type") == "tool_result"
              for item in list_of(dict_of(block).get("content"))
              if dict_of(item).get("type") == "tool_reference"}
    return [tool for tool in tools if tool.get("defer_loading") is not True
            or tool.get("name") in loaded]


def tool_result_media(block: dict) -> list:
    """The blocks inside a tool_result that go apart from its text: images, and PDFs (Claude
    Code's Read puts a PDF's document block there, from 2.1.330 on)."""
    content = block.get("content")
    return [item for item in content if isinstance(item, dict) and (
        item.get("type") == "image" or item.get("type") == "document"
        and dict_of(item.get("source")).get("type") == "base64")] \
        if isinstance(content, list) else []


def thinking_effort(body: dict) -> str | None:
    """The effort a request asks to think with (one of EFFORTS), None when it asks for no
    thinking: output_config.effort with adaptive thinking (Anthropic's default there is high),
    or a level from thinking.budget_tokens."""
    thinking = body.get("thinking")
    if not isinstance(thinking, dict):
        return None
    if thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        budget = budget if isinstance(budget, int) else 8192
        return "low" if budget < 4096 else "medium" if budget < 16384 else "high" \
            if budget < 32768 else "xhigh"
    if thinking.get("type") == "adaptive":
        effort = dict_of(body.get("output_config")).get("effort")
        return effort if effort in EFFORTS else "high"
    return None


def thinking_off_level(body: dict, quirks: dict, model: str) -> str | int | None:
    """The provider's value for the least reasoning the model does, when the request turns
    thinking off (`{"type": "disabled"}`); None otherwise, or where the model has none."""
    if dict_of(body.get("thinking")).get("type") != "disabled":
        return None
    return next((level for pattern, level in quirks["thinking_off"]
                 if re.search(pattern, model)), None)


def provider_effort(effort: str, scales, model: str) -> str | None:
    """The provider's own level for an effort, on the scale of the first pattern that matches
    the model: the highest it has at or below the effort asked for (never a silent medium).
    None when the model has no scale."""
    scale = next((levels for pattern, levels in scales if re.search(pattern, model)), None)
    if not scale:
        return None
    rank = EFFORTS.index(effort)
    below = [level for level in scale if EFFORTS.index(level) <= rank]
    chosen = below[-1] if below else next(iter(scale))
    if chosen != effort:
        log.debug("%s has no %s effort; asking for %s", model, effort, scale[chosen])
    return scale[chosen]


def list_of(value) -> list:
    """value when it is a list, else an empty one: JSON from outside may have any shape."""
    return value if isinstance(value, list) else []


def dict_of(value) -> dict:
    """value when it is an object, else an empty one."""
    return value if isinstance(value, dict) else {}


def content_blocks(content) -> list:
    """A message's content as a list of blocks (a string as one text block)."""
    return [{"type": "text", "text": content}] if isinstance(content, str) else list_of(content)


def visible_text(value) -> bool:
    """Whether value is a string with more than whitespace in it (read, never copied)."""
    return isinstance(value, str) and value != "" and not value.isspace()


def str_of(value) -> str:
    """value when it is a string, else an empty one."""
    return value if isinstance(value, str) else ""


def converted_schema(what: str, convert, *args):
    """convert(*args): a schema of the request (what names it) in a provider's dialect; a 400
    naming it when it nests too deeply for the conversion (hundreds of levels: none real)."""
    try:
        return convert(*args)
    except RecursionError:
        raise InvalidRequestError("%s nests too deeply to translate" % what) from None


def tool_schema_name(tool: dict) -> str:
    """How an error names a tool's input schema."""
    return "tools: the input_schema of %r" % str(tool.get("name"))[:80]


def requested_output_schema(body: dict) -> dict | None:
    """The JSON schema the answer must follow (output_config.format, or the older
    output_format, of type json_schema: Claude Code's session titles, `claude -p
    --json-schema`), or None."""
    config = body.get("output_config")
    output_format = body.get("output_format") or (config.get("format") if isinstance(config, dict)
                                                  else None)
    if not isinstance(output_format, dict) or output_format.get("type") != "json_schema":
        return None
    return output_format.get("schema") if isinstance(output_format.get("schema"), dict) else {}


# 9.1.3 A provider's refusals, in the words Claude Code acts on
# .............................................................................

# Words of a provider's 400 that mean the prompt is over the model's window: OpenAI's, vLLM's
# "maximum model length", llama.cpp's and LM Studio's "context size", Groq's "reduce the
# length of the messages", and the rest of those Claude Code 2.1.332 itself reads as one (its
# binary's list: LiteLLM's ContextWindowExceededError, Qwen's "range of input length", Kimi's
# "exceeded model token limit", Bedrock's "input is too long for requested model", …).
CONTEXT_OVERFLOW_RE = re.compile("|".join((
    r"maximum context length", r"context[ _]length", r"too many tokens", r"prompt is too long",
    r"context ?window", r"input tokens? exceeds? ", r"exceeds the maximum number of tokens",
    r"maximum model length", r"context size", r"reduce the length of the messages",
    r"`max_new_tokens` must be", r"input is too long for requested model",
    r"exceeded model token limit", r"input token length too long", r"maximum context limit",
    r"maximum prompt length", r"prompt exceeds max length", r"more than max tokens allowed",
    r"range of input length should be", r"but model only supports up to",
    r"context exceeds your deployment")), re.I)
MAX_TOKENS_PROBE_RE = re.compile(r"max_tokens|output limit|max_completion_tokens", re.I)
OVERFLOW_LIMIT_RE = re.compile(r"(?:maximum|limit|allowed|context length|context size|must be <=|"
                               r"up to|should be \[1,)\D{0,40}?(%s)" % TOKEN_COUNT, re.I)
# How such a 400 splits what was asked, where it says: OpenAI's and vLLM's "(1000 in the
# messages, 32000 in the completion)", OpenRouter's "(1000 of text input, 200 of tool
# input, 32000 in the output)", vLLM's newer "is too large: 32000. … your request has 1000 input
# tokens", and text-generation-inference's "Given: 1000 `inputs` tokens and 32000
# `max_new_tokens`" (Together, Hugging Face).
INPUT_PART_RE = re.compile(r"(%s) (?:in the messages|of \w+ input|`inputs` tokens)|"
                           r"request has (%s) input tokens" % (TOKEN_COUNT, TOKEN_COUNT), re.I)
OUTPUT_PART_RE = re.compile(r"(%s) (?:in the completion|in the output|`max_new_tokens`)|"
                            r"is too large: (%s)" % (TOKEN_COUNT, TOKEN_COUNT), re.I)
# Or its total only, max_tokens in it: Kimi's "exceeded model token limit: 262144
# (requested: 269030)" with a prompt of half that (MoonshotAI/kimi-cli#2011).
REQUESTED_TOTAL_RE = re.compile(r"\(requested: ?(%s)\)" % TOKEN_COUNT, re.I)
# Claude Code answers Anthropic's "input length and `max_tokens` exceed context limit" by asking
# again with max_tokens = window - input - 1,000, when that is at least 3,000 (2.1.197, 2.1.332).
OUTPUT_ROOM_CLAUDE_CODE_TAKES = 4000
# llama.cpp's server (and LM Studio) answer 500 when an answer fills the context as it is made.
CONTEXT_FULL_RE = re.compile(r"context size has been exceeded", re.I)
# Words of a provider's refusal of a request's images, whatever its status: vLLM's "At most 0
# image(s) may be provided in one prompt" (a model without vision, or fewer images allowed),
# llama.cpp's "image input is not supported" (a 500), OpenRouter's "No endpoints found that
# support image input" (a 404), OpenAI's "image_url is only supported by certain models".
IMAGES_REFUSED_RE = re.compile(r"image\(s\) may be provided|image input is not supported|"
                               r"support image input|image_url is only supported|"
                               r"does not support images?\b|vision is not supported", re.I)
# And of its PDFs: vLLM's "Unknown part type: file", and others' "does not support PDF".
PDFS_REFUSED_RE = re.compile(r"part type: file\b|does not support (?:pdfs?|files?)\b|"
                             r"(?:pdf|file) input is not supported", re.I)
# Anthropic's words for each, on which Claude Code takes such blocks out and asks again.
MEDIA_REFUSALS = ((IMAGES_REFUSED_RE, "Could not process image", "images"),
                  (PDFS_REFUSED_RE, "Could not process PDF", "PDFs"))


# Groq's refusal of a tool call its own model wrote wrongly ("Failed to call a function. Please
# adjust your prompt", code tool_use_failed): a 400 to a whole request, an error event in a
# stream. The request was sound and that answer was not; asked again, it usually succeeds.
UNREADABLE_CALL_RE = re.compile(r"Failed to call a function\. Please adjust your prompt", re.I)


def unreadable_call(error: ProxyError, provider: Provider) -> ProxyError:
    """A provider's refusal of its model's own malformed tool call as a failure worth asking
    again (a 502: retried, then the next candidate, then Claude Code's own retries); any other
    error as it is."""
    if not UNREADABLE_CALL_RE.search(error.message):
        return error
    return UpstreamError("%s: the model wrote a tool call that %s could not read "
                         "(tool_use_failed); the same request usually succeeds when asked "
                         "again: %s" % (provider.name, provider.name, error.message))


def answer_to_error(error: ProxyError, context: TranslationContext, stream: bool) -> Response:
    """Raise a translated provider's error, reworded where Claude Code needs Anthropic's words
    ("prompt is too long", which it answers by compacting; "Could not process image" or "PDF",
    on which it takes those out and asks again); but a reasoning model's refusal of Claude Code's
    max_tokens=1 availability probe is answered as Anthropic would answer the probe: an empty
    message that stopped at max_tokens."""
    if isinstance(error, RelayedError):
        raise max_tokens_overflow(error, context) or error
    error = unreadable_call(error, context.provider)
    for words, anthropics, what in MEDIA_REFUSALS:        # a retry would be refused again
        if words.search(error.message):
            raise InvalidRequestError("%s: %s refused the request's %s (%s)" % (
                anthropics, context.provider.name, what, error.message))
    if context.probe and error.status == 400 and MAX_TOKENS_PROBE_RE.search(error.message):
        usage = dict(context.estimated_usage(0), output_tokens=0)
        return message_response(new_message(context.model, [], "max_tokens", usage), context,
                                stream)
    if error.status >= 500 and CONTEXT_FULL_RE.search(error.message):
        error = InvalidRequestError(error.message)     # a retry would fill it again
    if error.status in (400, 413) and CONTEXT_OVERFLOW_RE.search(error.message) \
            and not error.message.startswith("prompt is too long"):
        error.message = overflow_message(error.message, context.max_tokens)
    raise error


def max_tokens_overflow(error: RelayedError, context: TranslationContext) -> ProxyError | None:
    """A compatible server's overflow (its words passed on) that max_tokens makes, its total
    over the window while the input fits with room to answer, in Anthropic's words for that;
    else None. As it came (Kimi's), Claude Code compacted a session at half the window."""
    if error.status != 400 or not REQUESTED_TOTAL_RE.search(error.message):
        return None
    message = overflow_message(error.message, context.max_tokens)
    return InvalidRequestError(message) if message.startswith("input length") else None


def overflow_message(message: str, max_tokens=None) -> str:
    """A provider's context-overflow message in Anthropic's words, with its numbers where it
    gives them ("maximum context length is 131072 tokens … requested 140000 tokens"). When the
    input fits with room to answer and max_tokens (the request's, when the message gives only
    a total) is what overflows, Anthropic's words for that, on which Claude Code lowers
    max_tokens and asks again: compacting would not help."""
    limit = OVERFLOW_LIMIT_RE.search(message)
    numbers = [token_count(number) for number in re.findall(TOKEN_COUNT, message)]
    window = token_count(limit.group(1)) if limit else 0
    inputs, output = (sum(token_count(a or b) for a, b in pattern.findall(message))
                      for pattern in (INPUT_PART_RE, OUTPUT_PART_RE))
    total = REQUESTED_TOTAL_RE.search(message)
    if not output and total and isinstance(max_tokens, int) and \
            0 < max_tokens < token_count(total.group(1)):
        inputs, output = token_count(total.group(1)) - max_tokens, max_tokens
    if window and output and inputs + output > window \
            and window - inputs >= OUTPUT_ROOM_CLAUDE_CODE_TAKES:
        return ("input length and `max_tokens` exceed context limit: %d + %d > %d, decrease "
                "input length or `max_tokens` and try again (%s)" % (inputs, output, window,
                                                                     message))
    if window and max(numbers) > window:
        return "%s (%s)" % (prompt_too_long(max(numbers), window), message)
    return "prompt is too long: " + message


# 9.1.4 Streams: the provider's events read, translated and relayed
# .............................................................................

async def stream_response(call, relay) -> Response:
    """The client's event stream, opened once the relay has its first events."""
    chunks = call.chunks(STREAM_PING_SECONDS)
    try:
        first = await first_piece(chunks, relay, call.provider)
    except BaseException:
        await chunks.aclose()
        raise
    headers = [("cache-control", "no-cache")] + call.relayed_headers()
    return Response(200, headers=headers, content_type="text/event-stream",
                    stream=UpstreamStream(call, chunks, relay, first))


async def first_piece(chunks, relay, provider: Provider) -> bytes:
    """Read the stream until the relay has something to send. A failure before that raises,
    so the client still gets it as an HTTP status, and failover can try another provider. A
    byte order mark the stream begins with is dropped, as the SSE standard asks."""
    start = b""                    # the stream's first bytes, until told apart from a BOM
    async for chunk in chunks:
        if start is not None and chunk:
            start += chunk
            if len(start) < len(UTF8_BOM) and UTF8_BOM.startswith(start):
                continue
            chunk, start = without_bom(start), None
        piece = relay.feed(chunk) if chunk else b""
        if relay.broken is not None:          # nothing was sent yet: the client gets a status
            raise relay.broken
        if piece:
            return piece
    if not relay.complete:
        raise UpstreamError("%s: the stream ended before completion" % provider.name)
    return b""


UTF8_BOM = b"\xef\xbb\xbf"


def without_bom(data: bytes) -> bytes:
    """data without the byte order mark an event stream may begin with."""
    return data[len(UTF8_BOM):] if data.startswith(UTF8_BOM) else data


class AnswerEnded(Exception):
    """Raised to stop reading a provider's stream once the client's answer is over (it met
    one of the request's stop sequences): not a failure."""


class UpstreamStream:
    """A streamed answer for the client: `first`, then each upstream chunk through the relay,
    then the relay's ending (an error event when the stream failed).

    aclose() releases the upstream call whether or not the stream was ever read, so an answer
    that fails before its first write leaves no connection behind.
    """

    def __init__(self, call, chunks, relay, first: bytes = b""):
        self._call, self._chunks, self._relay, self._first = call, chunks, relay, first
        self._write = None
        self._last = b""              # the events of the body's last receive, kept for the ending

    async def send(self, write, drain) -> bytes:
        """Write the stream with write(piece), which returns true when the client is behind:
        drain() is then awaited. The body pushes its pieces through the relay (from the loop's
        callback when the loop reads it). Returns the relay's ending, for the caller to write
        last, after the events of the body's last receive: one send for both (for a short
        answer, one for the whole stream)."""
        self._write = write
        if self._chunks.ended:
            self._last = self._first
        elif self._first and write(self._first):
            await drain()
        error = None
        try:
            if not self._relay.ended:
                await self._chunks.push(self._consume, drain)
        except AnswerEnded:
            pass                        # the provider's call is closed unread, which stops it
        except ProxyError as failure:
            error = failure
        if error is not None or not self._relay.complete:
            self._call.log_failure(error or self._relay.broken or UpstreamError(
                "the stream ended before it was complete"), " after its stream began")
        return self._last + self._relay.finish(error)

    def _consume(self, chunk: bytes) -> bool:
        piece = self._relay.feed(chunk)
        if self._relay.broken is not None:       # what came before the break is written
            if piece:
                self._write(piece)
            raise self._relay.broken
        if not (self._chunks.ended or self._relay.ended):
            return bool(piece) and self._write(piece)
        self._last = piece
        if self._relay.ended:
            raise AnswerEnded
        return False

    async def aclose(self) -> None:
        await self._chunks.aclose()
        self._call.close_unread()


def finite_or_null(text: str) -> float | None:
    """A provider's JSON number as a float; None for one too large to be finite (1e999)."""
    value = float(text)
    return value if math.isfinite(value) else None


def int_or_null(text: str) -> int | None:
    """A provider's JSON integer; None for one of over 4,300 digits, which Python refuses to
    read (and JavaScript reads as Infinity)."""
    return int(text) if len(text) - text.startswith("-") <= JSON_INT_DIGITS else None


# A provider's JSON is read as JavaScript writes a number that JSON cannot hold: NaN, Infinity,
# a float too large (1e999) and an integer of 5,000 digits become null, so no answer the client
# gets is unreadable JSON (Python's parser takes the first three, and its writer would write them
# back), and none fails to be read.
PROVIDER_JSON_NUMBERS = {"parse_constant": lambda name: None, "parse_float": finite_or_null,
                         "parse_int": int_or_null}
PROVIDER_JSON = json.JSONDecoder(**PROVIDER_JSON_NUMBERS)
DECODE_JSON = PROVIDER_JSON.decode             # json.loads of a str, without its wrapping
SCAN_JSON = json.scanner.make_scanner(PROVIDER_JSON)          # the C scanner decode() calls


def decode_event_json(data: str):
    """An event's JSON value, straight from the C scanner (decode() adds two regular-expression
    passes for surrounding whitespace); whitespace or an error goes through decode() itself."""
    try:
        value, end = SCAN_JSON(data, 0)
    except StopIteration:
        return DECODE_JSON(data)
    return value if end == len(data) else DECODE_JSON(data)


SCAN_JSON_STRING = json.decoder.scanstring     # the C one: a JSON string's text and its end
CONTENT_STRING_RE = re.compile(r'"content"[ \t\n\r]*:[ \t\n\r]*"')
OBFUSCATION_STRING_RE = re.compile(r'"obfuscation"[ \t\n\r]*:[ \t\n\r]*"')


class PlainChunkTemplate:
    """The raw JSON of a stream's text-only chunks, which differ only in their text (the id,
    model and the rest stay the same from chunk to chunk): learnt from one decoded text-only
    chunk, it gives the text of a later chunk that has the same JSON around its text, without
    decoding that chunk. A chunk is taken only when the same JSON is around one whole string
    token, so it is exactly the learnt chunk with another text; or, where the provider pads each
    chunk with a random `obfuscation` string after the text (OpenAI), around those two."""

    __slots__ = ("_before", "_between", "_after")

    def __init__(self):
        self._before = self._between = self._after = None

    def text(self, data: str) -> str | None:
        """The chunk's text when it has the learnt JSON around it, else None."""
        before, after = self._before, self._after
        if before is None or not data.startswith(before) or not data.endswith(after):
            return None
        try:
            text, end = SCAN_JSON_STRING(data, len(before))
            if self._between is not None:
                if not data.startswith(self._between, end):
                    return None
                _, end = SCAN_JSON_STRING(data, end + len(self._between))
        except ValueError:
            return None
        return text if end == len(data) - len(after) else None

    def learn(self, data: str, text: str | None) -> None:
        """Learn from a decoded chunk whose only text is `text` under its only "content" key
        (None: the chunk is not one to learn from)."""
        found = CONTENT_STRING_RE.search(data) if text is not None else None
        if found is None:
            return
        try:
            value, end = SCAN_JSON_STRING(data, found.end())
            padding = OBFUSCATION_STRING_RE.search(data, end)
            tail = SCAN_JSON_STRING(data, padding.end())[1] if padding else end
        except ValueError:
            return
        if value == text:
            self._before, self._after = data[:found.end()], data[tail:]
            self._between = data[end:padding.end()] if padding else None


class TranslatedStreamRelay:
    """Bytes of a provider's event stream in, the client's events out, for every translating
    protocol: SSE decoding and JSON parsing around the protocol's stream translator, which
    takes each (event name, payload); `[DONE]` comes as a None payload, and ends the stream:
    what a provider sends after it is no answer, and is dropped. An empty chunk (upstream
    silence) becomes a ping. An event that is not a JSON object, or that the
    translator fails on (the provider's own error event), breaks the stream: what came before
    it, in the same receive too, is sent, then the stream ends with an error event, never as
    complete.

    A translator with feed_text(text) and learnable_text (the text of the last chunk it was
    fed, when a PlainChunkTemplate may learn from that chunk) has its text-only chunks, most of
    every stream, told apart by the template and not decoded at all."""

    def __init__(self, translator, context: TranslationContext):
        self._decoder = SSEDecoder()
        self._translator = translator
        self._plain = PlainChunkTemplate() if hasattr(translator, "feed_text") else None
        self._stops = context.stops
        self._over = False            # the provider has said [DONE]
        self.broken = None
        self.provider = context.provider

    def feed(self, chunk: bytes) -> bytes:
        if self.broken is not None:
            raise self.broken
        if self._over:
            return b""
        if not chunk:
            return SSE_PING
        out = []
        plain = self._plain
        for event, data in self._decoder.feed(chunk):
            text = plain.text(data) if plain is not None and event == "message" else None
            piece = self._translator.feed_text(text) if text is not None else None
            if piece is not None:
                out.append(piece)
                continue
            if len(data) < 16 and data.strip() == "[DONE]":
                self._translator.feed_event(event, None)
                self._over = True
                break
            try:
                payload = decode_event_json(data)
            except (ValueError, RecursionError):
                payload = None
            if not isinstance(payload, dict):
                self.broken = UpstreamError("%s: the stream held an event that is not a JSON "
                                             "object; text of the answer was lost"
                                             % self.provider.name)
                break
            try:
                out.append(self._translator.feed_event(event, payload))
            except ProxyError as failure:        # the provider's error event, mostly
                self.broken = failure
                break
            if plain is not None:
                plain.learn(data, self._translator.learnable_text)
        return b"".join(out)

    @property
    def ended(self) -> bool:
        """Whether the client's answer is over before the provider's (a stop sequence came)."""
        return self._stops is not None and self._stops.matched is not None

    @property
    def complete(self) -> bool:
        return (self._translator.complete or self.ended) and self.broken is None

    def finish(self, error: ProxyError | None = None) -> bytes:
        return b"" if self.ended else self._translator.finish(error or self.broken)


def parse_upstream_json(call):
    """The provider's answer body as JSON, or a 502 quoting it."""
    try:
        return json.loads(call.body, **PROVIDER_JSON_NUMBERS)
    except (ValueError, RecursionError):
        raise UpstreamError("%s: the answer is not JSON: %s" % (
            call.provider.name, upstream_error_message(call.body))) from None


def count_in(answer: bytes, key: str) -> int | None:
    """The integer at key in a JSON answer, if it is one."""
    try:
        count = dict_of(json.loads(answer)).get(key)
    except (ValueError, RecursionError):
        return None
    return count if isinstance(count, int) and not isinstance(count, bool) else None


SSE_PING = b'event: ping\ndata: {"type": "ping"}\n\n'
MAX_SSE_LINE_BYTES = 16 * 1024 * 1024


def sse_event(name: str, payload: dict) -> bytes:
    """One event of the client's stream: `event: <name>` and its JSON `data:` line."""
    data = JSON_TEXT(payload).encode()
    return b"event: %s\ndata: %s\n\n" % (name.encode(), data)


def sse_complete_length(data: bytes) -> int:
    """How many leading bytes of data form complete SSE events (LF or CRLF line endings)."""
    lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


class HeldBytes:
    """The unfinished end of an event stream, kept as pieces so that a long line costs linear
    time, and refused (502) beyond MAX_SSE_LINE_BYTES."""

    def __init__(self):
        self._parts = []
        self._size = 0

    def hold(self, data: bytes) -> None:
        if data:
            self._parts.append(data)
            self._size += len(data)
            if self._size > MAX_SSE_LINE_BYTES:
                raise UpstreamError("the provider sent an event-stream event longer than %d bytes"
                                    % MAX_SSE_LINE_BYTES)

    def release(self, data: bytes) -> bytes:
        """What was held, followed by data; nothing is held afterwards."""
        if not self._parts:
            return data
        self._parts.append(data)
        joined = b"".join(self._parts)
        self._parts, self._size = [], 0
        return joined

    def tail(self, length: int) -> bytes:
        """The last `length` bytes held (every piece holds at least one)."""
        return b"".join(self._parts[-length:])[-length:] if self._parts else b""


PLAIN_DATA_EVENT_RE = re.compile(rb"data: ([^\n]*)\n\n")     # 8 bytes besides the data


class SSEDecoder:
    """Sans-IO server-sent events parser: feed() bytes, get the (event, data) of each complete
    event. LF or CRLF line endings, comments (`: …`), multi-line `data:` joined with "\\n"."""

    def __init__(self):
        self._held = HeldBytes()
        self._event = ""
        self._data = []

    def feed(self, chunk: bytes) -> list:
        if chunk.endswith(b"\n\n") and not self._data and not self._event:
            text = self._held.release(chunk)
            events = self._plain_events(text)
            return self._feed_lines(text) if events is None else events
        if b"\n" not in chunk:
            self._held.hold(chunk)
            return []
        return self._feed_lines(self._held.release(chunk))

    def _feed_lines(self, text: bytes) -> list:
        lines = text.split(b"\n")
        self._held.hold(lines.pop())
        events = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append((self._event or "message", "\n".join(self._data)))
                self._event, self._data = "", []
            elif line[:1] != b":":
                field, _, value = line.partition(b":")
                if value[:1] == b" ":
                    value = value[1:]
                if field == b"data":
                    self._data.append(value.decode("utf-8", "replace"))
                elif field == b"event":
                    self._event = value.decode("utf-8", "replace")
        return events

    @staticmethod
    def _plain_events(text: bytes) -> list | None:
        """The events of text made of whole one-line `data: …` events and nothing else (most
        streams), found by one regular-expression pass; None when anything else is there (the
        events found then do not cover the text) or a CR is."""
        found = PLAIN_DATA_EVENT_RE.findall(text)
        if sum(map(len, found)) + 8 * len(found) != len(text) or b"\r" in text:
            return None
        return [("message", data.decode("utf-8", "replace")) for data in found]


# 9.1.5 The client's answer: messages, events, tool arguments, signatures
# .............................................................................

# Ids come from a generator of ccproxy's own, seeded from the system's (and again in a forked
# child), so that a program that seeds `random` (ccproxy used from Python) cannot repeat them.
ID_GENERATOR = random.Random()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=ID_GENERATOR.seed)


def random_id(prefix: str) -> str:
    """An id in Anthropic's shape: prefix and 24 hex digits, from ID_GENERATOR rather than
    os.urandom, a system call that lets worker threads take the GIL from the event loop at
    every message. An id is unique, not secret."""
    return "%s%024x" % (prefix, ID_GENERATOR.getrandbits(96))


def new_message(model: str, content: list, stop_reason: str, usage: dict,
                stop_sequence: str | None = None) -> dict:
    """A whole assistant message in the Messages API's shape."""
    return {"id": random_id("msg_"), "type": "message", "role": "assistant",
            "model": model, "content": content, "stop_reason": stop_reason,
            "stop_sequence": stop_sequence, "usage": usage}


def message_response(message: dict, context: TranslationContext, stream: bool) -> Response:
    """A whole answer as the client asked for it: the message as JSON, or as its events (a
    provider may answer at once what was asked as a stream)."""
    if context.record is not None:
        context.record["usage"] = message["usage"]
    if context.stops is not None:
        message = cut_at_stop_sequence(message, context.stops.stops)
    message = omitted_thinking(message, context)
    own_ids(message["content"], AnswerToolIds(context))
    if not stream:
        return json_response(message)
    return Response(200, events_from_message(message, context), [("cache-control", "no-cache")],
                    content_type="text/event-stream")


def events_from_message(message: dict, context: TranslationContext) -> bytes:
    """The events that stream a whole message: each block whole, in order, then its end."""
    emit = EventEmitter(context)
    emit.start()
    for index, block in enumerate(message["content"]):
        kind = block["type"]
        if kind == "text":
            emit.text(block["text"], index)
        elif kind == "thinking":
            emit.thinking(block["thinking"], index)
            emit.signature = block.get("signature") or emit.signature
        elif kind in ("tool_use", "server_tool_use"):
            emit.open_block(index, dict(block, input={}))
            emit.tool_arguments(JSON_TEXT(block["input"]))
        else:
            emit.open_block(index, block)
        if kind == "text" and block.get("citations"):
            emit.cite(block["citations"])
    emit.stop(message["stop_reason"], message["usage"], message.get("stop_sequence"))
    return emit.take()


def message_from_events(data: bytes) -> dict:
    """The message that a stream of the client's events describes."""
    message, blocks, partial = None, [], {}
    for frame in data.split(b"\n\n"):
        lines = frame.split(b"\n")
        if len(lines) < 2 or not lines[1].startswith(b"data: "):
            continue
        event = json.loads(lines[1][6:])
        kind = event["type"]
        if kind == "message_start":
            message = dict(event["message"], content=blocks)
        elif kind == "content_block_start":
            blocks.append(dict(event["content_block"]))
        elif kind == "content_block_delta":
            apply_delta(blocks[event["index"]], event["delta"], partial, event["index"])
        elif kind == "message_delta":
            message.update(event["delta"], usage=event["usage"])
    for index, text in partial.items():
        blocks[index]["input"] = tool_input_from_arguments(text, mend=False)
    return message


def apply_delta(block: dict, delta: dict, partial: dict, index: int) -> None:
    """Add one content_block_delta to the block it belongs to."""
    kind = delta["type"]
    if kind == "text_delta":
        block["text"] += delta["text"]
    elif kind == "thinking_delta":
        block["thinking"] += delta["thinking"]
    elif kind == "signature_delta":
        block["signature"] = delta["signature"]
    elif kind == "input_json_delta":
        partial[index] = partial.get(index, "") + delta["partial_json"]
    elif kind == "citations_delta":
        block.setdefault("citations", []).append(delta["citation"])


TEXT_DELTA = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
              b'"delta":{"type":"text_delta","text":%s}}\n\n')
THINKING_DELTA = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
                  b'"delta":{"type":"thinking_delta","thinking":%s}}\n\n')
INPUT_JSON_DELTA = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
                    b'"delta":{"type":"input_json_delta","partial_json":%s}}\n\n')
BLOCK_STOP = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n'
MESSAGE_STOP = sse_event("message_stop", {"type": "message_stop"})


def failed_ending(error: ProxyError | None, complete: bool, provider: Provider) -> bytes | None:
    """The error event that ends a translated stream that failed, or that ended before the
    provider said it was complete; None for a whole one."""
    if error is None and not complete:
        error = UpstreamError("%s: the stream ended before completion" % provider.name)
    return error.event() if error is not None else None


def json_bytes(value) -> bytes:
    """value as compact UTF-8 JSON bytes (a lone surrogate, which UTF-8 cannot carry, as its
    \\u escape)."""
    try:
        return COMPACT_JSON_TEXT(value).encode()
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


ENCODE_JSON_STRING = json.encoder.encode_basestring     # C; leaves non-ASCII as it is


def json_text(text: str) -> bytes:
    """A string as JSON in UTF-8 bytes: json_bytes for the hot path of every text, thinking
    and argument delta."""
    try:
        return ENCODE_JSON_STRING(text).encode()
    except UnicodeEncodeError:
        return json.dumps(text).encode()


JSON_TOKEN_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\],]|[^"{}\[\],]+')
JSON_CLOSERS = {"{": "}", "[": "]"}
ARGUMENTS_TAIL = " \t\r\n,}]"     # what may end a tool's arguments: held back until their end


def repaired_json_object(text: str, keep: int = 0):
    """(text, value) of the JSON object a model meant where its text is none: a comma before a
    closing bracket or the end dropped, a closing bracket that closes nothing open dropped, one
    that skips an open one preceded by it, missing ones added, nothing after the object. The
    first keep characters (already sent) must stay; None when that cannot mend it (a string cut
    short, a value missing)."""
    out, stack, comma, position, whole = [], [], None, 0, False
    for match in JSON_TOKEN_RE.finditer(text):
        token = match.group()
        if match.start() != position:
            return None
        position = match.end()
        if whole and not token.isspace():
            if text[match.start():].strip(ARGUMENTS_TAIL):
                return None
            break
        if token in ("}", "]"):
            if comma is not None:
                out[comma] = ""
            if token not in [JSON_CLOSERS[opener] for opener in stack]:
                continue
            while JSON_CLOSERS[stack[-1]] != token:
                out.append(JSON_CLOSERS[stack.pop()])
            stack.pop()
            whole = not stack
        elif token in ("{", "["):
            stack.append(token)
        comma = len(out) if token == "," else comma if token.isspace() else None
        out.append(token)
    else:
        if position != len(text):
            return None
        if comma is not None:
            out[comma] = ""
    mended = "".join(out + [JSON_CLOSERS[opener] for opener in reversed(stack)])
    return json_object_of(mended) if mended.startswith(text[:keep]) else None


def fresh_arguments(call: dict, fragment: str) -> str:
    """What is new in a fragment of a streamed tool call's arguments, after those the call has
    (call["arguments"], call["chars"] long): all of it, but where a server sends again what it
    sent. Some send the arguments so far in every fragment (DeepSeek at Baidu Qianfan): what
    follows them is new. Some send the whole arguments again at the end, after them in full or
    short of their last brace (vLLM's parser for GLM models), or double-encoded (a LiteLLM
    proxy): nothing is. Joined, either is no JSON, and Claude Code refuses the call; a fragment
    that would make JSON joined is never taken for either (but by a call already seen to be
    cumulative)."""
    # Most fragments are told without joining anything; the rest are at least half as long as
    # what is joined, so that no server can make the work grow with the square of its answer.
    if len(fragment) * 2 < call["chars"] or (
            len(fragment) <= call["chars"] and not fragment.lstrip().startswith("{")):
        return fragment
    sent = "".join(call["arguments"])
    cumulative = len(fragment) > len(sent) and fragment.startswith(sent)
    if not (cumulative and call.get("cumulative")) and (
            json_object_prefix(sent + fragment) or repaired_json_object(sent + fragment)):
        return fragment         # joined, they make JSON, or what a model meant ({"{": 1 ,})
    if cumulative:
        call["cumulative"] = True
        return fragment[len(sent):]
    again = arguments_object(fragment)
    before = again and (json_object_of(sent) or repaired_json_object(sent))
    return "" if before and before[1] == again[1] else fragment


def arguments_object(text: str):
    """(text, value) of the object a call's arguments are, written out or as a JSON string that
    holds it (double-encoded, as the summary chunk a LiteLLM proxy adds at a stream's end, BerriAI
    /litellm#20480), else None."""
    if text.lstrip().startswith("{"):
        return json_object_of(text)
    try:
        inner = json.loads(text) if text.lstrip().startswith('"') else None
    except (ValueError, RecursionError):
        return None
    return json_object_of(inner) if isinstance(inner, str) else None


JSON_PREFIX_TOKEN_RE = re.compile(r'"(?:[^"\\]|\\.)*(?:"|\\?\Z)|[{}\[\],:]|[^\s"{}\[\],:]+|\s+')


def json_object_prefix(text: str) -> bool:
    """Whether text begins a JSON object (or is one): no token where JSON has none. Numbers
    and literals are taken as any run of other characters, a string cut short as a string."""
    # What may come: a value, a key, a colon, the next (a comma or a close), the end; a value
    # or a key "or close" just after `[` or `{`.
    stack, expect = [], "value"
    for match in JSON_PREFIX_TOKEN_RE.finditer(text):
        token = match.group()
        if token.isspace():
            continue
        if token in ("{", "[") and expect.startswith("value") and (stack or token == "{"):
            stack.append(token)
            expect = "key or close" if token == "{" else "value or close"
        elif token in ("}", "]") and stack and JSON_CLOSERS[stack[-1]] == token and (
                expect == "next" or expect.endswith("close")):
            stack.pop()
            expect = "next" if stack else "end"
        elif token == "," and expect == "next":
            expect = "key" if stack[-1] == "{" else "value"
        elif token == ":" and expect == "colon":
            expect = "value"
        elif token[0] == '"' and expect.startswith("key"):
            expect = "colon"
        elif token[0] not in '{}[],:' and expect.startswith("value") and stack:
            expect = "next"
        else:
            return False
    return True


def repeated_json_object(text: str):
    """(text, value) of the object when text is one JSON object written twice or more (a
    server that sends a call's arguments again: `{"a":1}{"a": 1}`), else None."""
    copies, position, text = [], 0, text.strip()
    try:
        while position < len(text):
            value, end = JSON_DECODER.raw_decode(text, position)
            copies.append((text[position:end], value))
            position = len(text) - len(text[end:].lstrip())
    except (ValueError, RecursionError):
        return None
    same = len(copies) > 1 and isinstance(copies[0][1], dict) and all(
        value == copies[0][1] for _, value in copies)
    return copies[0] if same else None


def json_object_of(text: str):
    """(text, value) when text is a JSON object, else None (nested past what Python reads, as
    a model repeating `[` until its output limit writes, included)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return (text, value) if isinstance(value, dict) else None


def arguments_ending(text: str, held: str, provider: Provider) -> str:
    """What ends a tool's streamed arguments (text, whose tail held was held back): the tail as
    it came when the whole is JSON or cannot be mended, else the tail that mends it."""
    try:
        json.loads(text)
        return held
    except (ValueError, RecursionError):
        pass
    mended = repaired_json_object(text, len(text) - len(held))
    if mended is None:
        return held
    log.info("%s: a tool call's arguments did not end as JSON; their end was mended",
             provider.name)
    return mended[0][len(text) - len(held):]


class StopSequences:
    """A request's stop sequences, kept by ccproxy itself: a provider may take none (the
    Responses API, OpenAI's and xAI's reasoning models) or fewer than asked (4 for Chat
    Completions, 5 for Gemini). The answer's text ends before the first one it meets, as
    Anthropic's does; the end of each piece of text that could begin one is held back until
    the next piece says whether it does."""

    def __init__(self, stops: list):
        self.stops = stops
        self.held = ""                # the end of the text so far, which may begin one
        self.matched = None           # the stop sequence the answer met, once it has
        self._beginnings = {stop[:size] for stop in stops for size in range(1, len(stop))}
        self._longest = max(map(len, stops)) - 1

    def text(self, text: str) -> str:
        """The text that may be sent now, up to the stop sequence when it met one."""
        pending = self.held + text
        found = first_stop_sequence(pending, self.stops)
        if found is not None:
            self.held, self.matched = "", found[1]
            return pending[:found[0]]
        kept = next((size for size in range(min(len(pending), self._longest), 0, -1)
                     if pending[-size:] in self._beginnings), 0)
        self.held = pending[len(pending) - kept:]
        return pending[:len(pending) - kept]

    def take_held(self) -> str:
        """The text held back, at the end of its block: it began no stop sequence."""
        held, self.held = self.held, ""
        return held


MAX_KEPT_STOP_SEQUENCES = 32           # what ccproxy keeps itself, each at most
MAX_KEPT_STOP_SEQUENCE_CHARS = 200     # this long: every streamed piece of text is searched


def check_stop_sequences(stops, protocol: str) -> None:
    """A 400 for more stop sequences, or longer ones, than a translation keeps."""
    if not isinstance(stops, list):
        return
    if len(stops) > MAX_KEPT_STOP_SEQUENCES or any(
            len(stop) > MAX_KEPT_STOP_SEQUENCE_CHARS for stop in stops):
        raise InvalidRequestError(
            "stop_sequences: at most %d, of at most %d characters each, when translated for "
            "%s (ccproxy keeps them itself, searching every piece of the answer's text)"
            % (MAX_KEPT_STOP_SEQUENCES, MAX_KEPT_STOP_SEQUENCE_CHARS, protocol))


def first_stop_sequence(text: str, stops: list) -> tuple | None:
    """(where, stop) of the stop sequence a model writing text would meet first: the one that
    ends first (of two that end together, the longer), or None."""
    found = [(where + len(stop), where, stop) for where, stop in
             ((text.find(stop), stop) for stop in stops) if where >= 0]
    return min(found)[1:] if found else None


def cut_at_stop_sequence(message: dict, stops: list) -> dict:
    """A whole answer as it would have ended at the first of the request's stop sequences in
    its text: that text block cut before it, and nothing after it."""
    for index, block in enumerate(message["content"]):
        found = first_stop_sequence(block["text"], stops) if block["type"] == "text" else None
        if found is not None:
            block["text"] = block["text"][:found[0]]
            message["content"] = message["content"][:index + bool(block["text"])]
            message.update(stop_reason="stop_sequence", stop_sequence=found[1])
            break
    return message


class EventEmitter:
    """Writes the client's event stream (the Messages API's) for every translating protocol.

    Keeps the order the contract demands: message_start (and a ping) first, one block open at a
    time under a key, indexes from 0 without gaps, a thinking block closed with its signature,
    then message_delta and message_stop. Events accumulate until take().
    """

    def __init__(self, context: TranslationContext):
        self._context = context
        self._out = []
        self.started = False
        self.block = -1               # index of the last block started
        self.open = None              # the key of the open block, None when none is open
        self._open_type = None        # the type of the open block
        self.signature = thinking_signature(context.provider.name)   # or a callable giving it
        self._thoughts = [] if context.thinking_omitted else None   # thinking kept from view
        self.output_chars = 0
        self._arguments = []          # the open tool block's input JSON, as it came
        self._held = ""               # its end, held back until the block ends
        self._stops = context.stops   # the request's stop sequences, or None
        self._ending = None           # the events up to the end a stop sequence made
        self._tool_ids = AnswerToolIds(context)

    def take(self) -> bytes:
        """The events written since the last take(); once a stop sequence has ended the
        answer, none after that end."""
        if self._ending is not None:
            out, self._ending, self._out = self._ending, b"", []
            return out
        out, self._out = self._out, []
        return b"".join(out)

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        usage = self._context.estimated_usage(0)
        usage["output_tokens"] = 1
        self._out.append(sse_event("message_start", {"type": "message_start", "message": {
            "id": random_id("msg_"), "type": "message", "role": "assistant",
            "model": self._context.model, "content": [], "stop_reason": None,
            "stop_sequence": None, "usage": usage}}) + SSE_PING)

    def open_block(self, key, content_block: dict) -> None:
        """Start a block under key, closing the open one; nothing when key is already open."""
        if self.open == key:
            return
        self.start()
        self.close()
        self.block += 1
        self.open, self._open_type = key, content_block["type"]
        self._out.append(sse_event("content_block_start", {
            "type": "content_block_start", "index": self.block, "content_block": content_block}))

    def text(self, text: str, key="text") -> None:
        if self.open != key:
            self.open_block(key, {"type": "text", "text": ""})
        if self._stops is None:
            self._send_text(text)
        elif self._ending is None:
            self._send_text(self._stops.text(text))
            if self._stops.matched is not None:
                self.stop("stop_sequence", None, self._stops.matched)
                self._ending, self._out = b"".join(self._out), []

    def _send_text(self, text: str) -> None:
        self._out.append(TEXT_DELTA % (self.block, json_text(text)))
        self.output_chars += len(text)

    def thinking(self, text: str, key="thinking") -> None:
        """Thinking text, as deltas of a thinking block; when the request asked for it omitted,
        only its signature at the block's end carries it (see omitted_thinking)."""
        if self.open != key:
            self.open_block(key, {"type": "thinking", "thinking": "", "signature": ""})
        if text and self._thoughts is not None:
            self._thoughts.append(text)
        elif text:
            self._out.append(THINKING_DELTA % (self.block, json_text(text)))
        self.output_chars += len(text)

    def open_tool(self, key, tool_id: str, name: str) -> None:
        """Open a tool_use block, with an id no other block of the answer has."""
        self.open_block(key, {"type": "tool_use", "id": self._tool_ids.own(tool_id),
                              "name": name, "input": {}})

    def cite(self, citations: list) -> None:
        """Citations of the open text block (what the provider says supports its text)."""
        if self._open_type == "text":
            for citation in citations:
                self._out.append(sse_event("content_block_delta", {
                    "type": "content_block_delta", "index": self.block,
                    "delta": {"type": "citations_delta", "citation": citation}}))

    def search(self, query: str, results: list) -> None:
        """A web search the provider ran, as Anthropic reports one: a server_tool_use block,
        then a web_search_tool_result block listing each (url, title)."""
        use, result = search_blocks(query, results)
        self.open_block(("search", use["id"]), dict(use, input={}))
        self.tool_arguments(JSON_TEXT(use["input"]))
        self.open_block(("result", use["id"]), result)
        self.close()

    def tool_arguments(self, fragment: str) -> None:
        """A piece of the open tool block's input JSON. Closing brackets and commas at its end
        wait for the next piece or the block's end, where a model's mistakes there are mended:
        Anthropic's input JSON always parses."""
        self._arguments.append(fragment)
        pending = self._held + fragment
        sent = pending.rstrip(ARGUMENTS_TAIL)
        self._held = pending[len(sent):]
        if sent:
            self._out.append(INPUT_JSON_DELTA % (self.block, json_text(sent)))
        self.output_chars += len(fragment)

    def close(self, mend: bool = True) -> None:
        """End the open block; a tool block's input is mended unless mend is false (an answer
        cut at max_tokens, whose input stays as cut)."""
        if self.open is None:
            return
        if self._open_type == "thinking":
            signature = self.signature() if callable(self.signature) else self.signature
            if self._thoughts is not None:
                signature = signature_keeping(signature, "".join(self._thoughts))
                self._thoughts = []
            self._out.append(sse_event("content_block_delta", {
                "type": "content_block_delta", "index": self.block,
                "delta": {"type": "signature_delta", "signature": signature}}))
            self.signature = thinking_signature(self._context.provider.name)
        elif self._arguments:
            self._end_arguments(mend)
        elif self._open_type == "text" and self._stops is not None and self._stops.held:
            self._send_text(self._stops.take_held())
        self._out.append(BLOCK_STOP % self.block)
        self.open = None

    def _end_arguments(self, mend: bool) -> None:
        text, ending = "".join(self._arguments), self._held
        self._arguments, self._held = [], ""
        if mend:
            ending = arguments_ending(text, ending, self._context.provider)
        if ending:
            self._out.append(INPUT_JSON_DELTA % (self.block, json_text(ending)))

    def stop(self, stop_reason: str, usage: dict | None, stop_sequence: str | None = None) -> None:
        """Close the open block and end the message."""
        self.start()
        self.close(mend=stop_reason != "max_tokens")
        usage = usage or self._context.estimated_usage(self.output_chars)
        if self._context.record is not None:
            self._context.record["usage"] = usage
        self._out.append(sse_event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": usage}))
        self._out.append(MESSAGE_STOP)


PROXY_SIGNATURE_PREFIX = "ccpx1."          # starts the signature of thinking ccproxy made


def thinking_signature(provider_name: str) -> str:
    """The signature of a thinking block ccproxy made: recognisable when it comes back."""
    return PROXY_SIGNATURE_PREFIX + provider_name


# Thinking the client asked to have omitted (thinking.display "omitted", which Claude Code sends
# from 2.1.332 on) comes as Anthropic's does: an empty thinking block whose signature carries
# the thinking, so that a provider that wants its reasoning back (DeepSeek's reasoning_content
# in a turn with tool calls) still gets it. Signatures that carry a provider's reasoning
# already (OpenRouter's details, the Responses API's items, Gemini's) stay as they are.
THINKING_TEXT_PREFIX = PROXY_SIGNATURE_PREFIX + "text."


def signature_keeping(signature: str, thinking: str) -> str:
    """The signature of a thinking block ccproxy made, carrying its text when nothing else of
    the signature does."""
    if not thinking or signature.startswith((REASONING_DETAILS_PREFIX, RESPONSES_SIGNATURE_PREFIX,
                                             GEMINI_SIGNATURE_PREFIX)):
        return signature
    return THINKING_TEXT_PREFIX + base64.urlsafe_b64encode(thinking.encode()).decode()


def thinking_text_of(block: dict) -> str:
    """A thinking block's text: its own, or, when it came omitted, what its signature carries."""
    signature = block.get("signature")
    if block["thinking"] or not isinstance(signature, str) or not signature.startswith(
            THINKING_TEXT_PREFIX):
        return block["thinking"]
    try:
        return base64.urlsafe_b64decode(signature[len(THINKING_TEXT_PREFIX):]).decode()
    except ValueError:                  # (binascii.Error and UnicodeDecodeError are ValueErrors)
        return ""


def omitted_thinking(message: dict, context: TranslationContext) -> dict:
    """A whole answer as the client asked for it when it wants thinking omitted: each thinking
    block ccproxy made emptied, its text in its signature."""
    if not context.thinking_omitted:
        return message
    made = thinking_signature(context.provider.name)
    return dict(message, content=[emptied_thinking(block, made) for block in message["content"]])


def emptied_thinking(block: dict, made_signature: str) -> dict:
    """A thinking block without its text, its signature carrying it (any other block as it
    is)."""
    if block.get("type") != "thinking" or not isinstance(block.get("thinking"), str):
        return block
    signature = str(block.get("signature") or made_signature)
    return dict(block, thinking="", signature=signature_keeping(signature, block["thinking"]))


# A Gemini model's thought signature for a call rides to the client on an empty thinking block
# before the call, and back: in Gemini's own API and in its OpenAI-compatible one. A turn's
# first call without one gets Google's documented placeholder
# (https://ai.google.dev/gemini-api/docs/thought-signatures).
GEMINI_SIGNATURE_PREFIX = PROXY_SIGNATURE_PREFIX + "gemini."
GEMINI_SKIP_SIGNATURE = "skip_thought_signature_validator"


def gemini_signature_of(signature) -> str | None:
    """The Gemini thought signature a thinking block's signature carries, or None."""
    if isinstance(signature, str) and signature.startswith(GEMINI_SIGNATURE_PREFIX):
        return signature[len(GEMINI_SIGNATURE_PREFIX):]
    return None


def anthropic_usage(input_tokens: int, output_tokens: int, cache_read: int, cache_write: int,
                    thinking_tokens: int = 0) -> dict:
    """Usage as the Messages API reports it: input apart from cache reads and writes, and the
    reasoning share of the output in output_tokens_details (what Claude Code 2.1.330 reads)."""
    usage = {"input_tokens": input_tokens, "output_tokens": output_tokens,
             "cache_creation_input_tokens": cache_write, "cache_read_input_tokens": cache_read}
    if thinking_tokens:
        usage["output_tokens_details"] = {"thinking_tokens": min(thinking_tokens, output_tokens)}
    return usage


MAX_TOKEN_COUNT = 10 ** 9      # a hundred times the largest window: past it, a provider's bug


def count_of(value) -> int:
    """A token count from upstream JSON: an integer up to MAX_TOKEN_COUNT, else 0 (a float, a
    string, a negative, or an unsigned counter that went below zero: 18446744073709551615),
    which would otherwise fill the client's context meter and the usage counters for good."""
    return value if isinstance(value, int) and not isinstance(value, bool) and \
        0 < value <= MAX_TOKEN_COUNT else 0


# -----------------------------------------------------------------------------
# 9.2 Anthropic Messages (pass-through)
# -----------------------------------------------------------------------------

class AnthropicProtocol(Protocol):
    """Anthropic's Messages API, and any server that speaks it: a pass-through."""

    name = "anthropic"

    def messages_request(self, provider, model, request, body) -> UpstreamRequest:
        url = anthropic_endpoint_url(provider.base_url, "messages")
        if request.query:
            url += "?" + request.query
        return UpstreamRequest(url, anthropic_request_headers(provider, request),
                               anthropic_body(request, body, model, provider))

    def count_tokens_request(self, provider, model, request, body) -> UpstreamRequest:
        url = anthropic_endpoint_url(provider.base_url, "messages/count_tokens")
        return UpstreamRequest(url, anthropic_request_headers(provider, request),
                               anthropic_body(request, body, model, provider,
                                              counting=True))

    def input_tokens(self, answer: bytes) -> int | None:
        return count_in(answer, "input_tokens")

    def models_request(self, provider) -> UpstreamRequest:
        return UpstreamRequest(anthropic_endpoint_url(provider.base_url, "models?limit=1000"),
                               anthropic_request_headers(provider), None)

    def can_search(self, provider, model) -> bool:
        return provider.quirks["anthropic_compat"] is None   # Anthropic runs web_search itself

    def answer(self, call, context, stream: bool) -> Response:
        """The provider's own answer, unchanged (but for the mark on a compatible server's
        thinking signatures), once it is known to be a message: a 200, the Messages API's one
        success (another 2xx, a 204 with its body, would reach no client)."""
        answer = check_anthropic_answer(call)
        if context.record is not None:
            note_anthropic_usage(call.body, context.record)
        body = call.body
        if call.provider.quirks["anthropic_compat"] is not None:
            marked_signatures(answer.get("content"), call.provider.name)
            own_ids(answer.get("content"), AnswerToolIds(context))
            answer = dict(answer, model=context.model)
            body = json_bytes(answer)
        elif may_hold_unreadable_numbers(body):          # written as null
            body = json_bytes(answer)
        if stream:                  # asked as a stream, answered whole: a server that ignores it
            return Response(200, events_of_whole_answer(answer, call, context), [(
                "cache-control", "no-cache")] + call.relayed_headers(),
                content_type="text/event-stream")
        return Response(200, body, call.relayed_headers(),
                        content_type=call.header("content-type") or "application/json")

    def stream_relay(self, context):
        marked = context.provider.quirks["anthropic_compat"] is not None
        return AnthropicStreamRelay(context.provider, context.record,
                                    context.model if marked else None,
                                    AnswerToolIds(context) if marked else None)

    def error(self, call) -> ProxyError:
        return anthropic_error(call)


# 9.2.1 The request: its address, headers and body
# .............................................................................

def anthropic_endpoint_url(base_url: str, endpoint: str) -> str:
    """The URL of /v1/{endpoint} from a base given as host, …/v1, or a full …/v1/messages
    URL."""
    base = base_url.rstrip("/")
    for suffix in ("/messages/count_tokens", "/messages"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    if not base.endswith("/v1"):
        base += "/v1"
    return base + "/" + endpoint


def anthropic_request_headers(provider: Provider, request: Request | None = None) -> dict:
    """The provider's key (as its preset says), the client's anthropic-* headers (unless the
    server ignores the betas; less those it said it refuses) and User-Agent (Kimi For Coding
    serves only the coding agents it knows by theirs, a 403 to any other), and the
    provider's extra headers."""
    agent = request.headers.get("user-agent") if request is not None else None
    headers = {"content-type": "application/json",
               "user-agent": header_safe(agent) if agent else USER_AGENT,
               "anthropic-version": DEFAULT_ANTHROPIC_VERSION}
    compat = provider.quirks["anthropic_compat"] or ANTHROPIC_COMPAT
    for name in ANTHROPIC_FORWARDED_HEADERS if request is not None else ():
        value = request.headers.get(name)
        if value and name == "anthropic-beta" and provider.refused_betas:
            value = "" if ALL_BETAS in provider.refused_betas else ",".join(
                beta for beta in value.split(",") if beta.strip() not in provider.refused_betas)
        if value and not (name == "anthropic-beta" and compat["drop_betas"]):
            headers[name] = header_safe(value)
    if provider.api_key and compat["auth"] == "bearer":
        headers["authorization"] = "Bearer " + provider.api_key
    elif provider.api_key:
        headers["x-api-key"] = provider.api_key
    headers.update(provider.headers)
    return headers


def anthropic_body(request: Request, body: dict, model: str, provider: Provider,
                   counting: bool = False) -> bytes:
    """The client's body with the routed model, max_tokens within the provider's cap (unless
    counting), and what a compatible server lacks, or said it refuses, taken out.

    Only the changed values are re-encoded, spliced into the client's own text; with nothing
    to change, the client's bytes go on as they came.
    """
    changes = {key: body[key] for key in request.rewritten}
    if body.get("model") != model:    # the model is not changed in body: failover needs it
        changes["model"] = model
    compat = provider.quirks["anthropic_compat"]
    messages = anthropic_messages_for(body, provider)
    if messages is not None:
        changes["messages"] = messages
    cap = None if counting else provider.output_cap(model)
    if cap is not None and body.get("max_tokens", 0) > cap:
        changes["max_tokens"] = cap
    refused = provider.refused_fields.get(model, ())
    if refused:
        changes.update(without_refused_inner_fields(body, refused))
    if compat:
        changes.update(compatible_changes(body, changes, compat))
    dropped = [key for key in tuple((compat or ANTHROPIC_COMPAT)["drop_fields"]) + tuple(refused)
               if key in body] + [key for key, value in changes.items() if value is None]
    added = {"thinking": {"type": "disabled"}} if compat and compat["thinks_unasked"] \
        and "thinking" not in body else {}    # Anthropic's models think only when asked
    if dropped or added or not changes.keys() <= request.body_spans.keys():   # not splicable
        return json_bytes(dict({key: changes.get(key, value) for key, value in body.items()
                                if key not in dropped}, **added))
    if not changes:
        return request.body
    return splice_json_values(request.body_text, request.body_spans, changes)


def compatible_changes(body: dict, changes: dict, compat: dict) -> dict:
    """What else a compatible server gets changed (None: left out): its user id made plain;
    the tools as it takes them (compatible_tools); where it refuses an effort without
    thinking, none then."""
    fields = plain_metadata(body)
    tools = compatible_tools(body, changes.get("tools", body.get("tools")), compat)
    if tools is not None:
        fields["tools"] = tools
    if compat["effort_needs_thinking"] and not thinking_asked(body):
        fields.update(without_effort(changes.get("output_config", body.get("output_config"))))
    return fields


def compatible_tools(body: dict, tools, compat: dict) -> list | None:
    """The tools as a compatible server takes them, or None when as they are: where it takes
    no tool_reference, as it can load them (loaded_tools_only); each input schema whole."""
    loaded = loaded_tools_only(dict(body, tools=tools)) if "tool_reference" in compat[
        "no_blocks"] else None
    whole = tools_with_whole_schemas(list_of(tools if loaded is None else loaded))
    return loaded if whole is None else whole


def tools_with_whole_schemas(tools: list) -> list | None:
    """The tools with each custom tool's input_schema an object with properties, as a
    compatible server wants one: MiniMax's answers one of {"type": "object"} alone (an MCP
    tool's without parameters), or none, with "function name or parameters is empty (2013)",
    at every request; None when each is whole."""
    custom = [isinstance(tool, dict) and tool.get("type") in (None, "custom") for tool in tools]
    if all(whole_schema(tool.get("input_schema")) is tool.get("input_schema")
           for tool, mine in zip(tools, custom) if mine):
        return None
    return [dict(tool, input_schema=whole_schema(tool.get("input_schema"))) if mine else tool
            for tool, mine in zip(tools, custom)]


def whole_schema(schema) -> dict:
    """A tool's input_schema as an object with properties (none given: none taken); itself
    when it is one."""
    schema = schema if isinstance(schema, dict) else {}
    if schema.get("type") == "object" and isinstance(schema.get("properties"), dict):
        return schema
    properties = schema.get("properties")
    return dict(schema, type="object", properties=properties if isinstance(
        properties, dict) else {})


def without_effort(output_config) -> dict:
    """{"output_config": without its effort, or None when nothing else is left}; {} when it
    has none. DeepSeek refuses an effort with thinking off ("thinking options type cannot be
    disabled when reasoning_effort is set", deepseek-ai/DeepSeek-V3#1397): Claude Code
    2.1.166 on sends one so to its subagents when CLAUDE_CODE_EFFORT_LEVEL is set."""
    if not isinstance(output_config, dict) or "effort" not in output_config:
        return {}
    rest = {key: value for key, value in output_config.items() if key != "effort"}
    return {"output_config": rest or None}


def plain_metadata(body: dict) -> dict:
    """{"metadata": the request's, its user_id made plain} for a compatible server when it is
    not plain (plain_user_id): DeepSeek's refuses Claude Code's, JSON, since May 2026 ("Invalid
    'user_id': string does not match pattern", deepseek-ai/DeepSeek-V3#1277), at every request;
    {} when it needs no change."""
    metadata = body.get("metadata")
    user_id = plain_user_id(metadata)
    if user_id is None or user_id == metadata["user_id"]:
        return {}
    return {"metadata": dict(metadata, user_id=user_id)}


def loaded_tools_only(body: dict) -> list | None:
    """For a compatible server that takes no tool_reference (the text that stands for one
    loads nothing there), the tools as the translations send them: a deferred tool once a
    reference has loaded it, unmarked, so that it is there whether or not the server reads
    defer_loading; None when no tool is deferred."""
    if not any(dict_of(tool).get("defer_loading") is True for tool in list_of(body.get("tools"))):
        return None
    return [{key: value for key, value in tool.items() if key != "defer_loading"}
            for tool in offered_tools(body)]


def without_refused_inner_fields(body: dict, refused) -> dict:
    """The fields of a Messages body that hold a field its server refuses ("tools.x": each
    tool's x; "thinking.display"), without it."""
    inner = collections.defaultdict(set)
    for name in refused:
        outer, _, key = name.partition(".")
        if key:
            inner[outer].add(key)
    changes = {}
    for outer, keys in inner.items():
        value = body.get(outer)
        if outer == "tools" and isinstance(value, list):
            changes[outer] = [{k: v for k, v in tool.items() if k not in keys}
                              if isinstance(tool, dict) else tool for tool in value]
        elif isinstance(value, dict):
            changes[outer] = {k: v for k, v in value.items() if k not in keys}
    return changes


def splice_json_values(text: str, spans: dict, changes: dict) -> bytes:
    """text with the top-level values named in changes replaced by their JSON encoding."""
    pieces, last = [], 0
    for key in sorted(changes, key=lambda name: spans[name][0]):
        start, end = spans[key]
        pieces += [text[last:start], JSON_TEXT(changes[key])]
        last = end
    pieces.append(text[last:])
    return "".join(pieces).encode()


# 9.2.2 The history as each server takes it: thinking, text, calls and their results
# .............................................................................

def anthropic_messages_for(body: dict, provider: Provider):
    """The messages as this provider may see them, or None when they need no change. Anthropic
    gets no thinking another provider made through ccproxy (its signature is ccproxy's), no
    text block of only whitespace (which it refuses at every turn after: Claude Code sends
    some, and other servers write them), and each call's id in the form it takes
    (ids_anthropic_takes); a compatible server gets its own thinking only (signatures
    unmarked), the blocks it lacks as text, system messages as the user's, and, where its
    thinking mode wants one, an empty thinking block before tool calls. A message left with
    no block is left out for Anthropic, but the last."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    compat = provider.quirks["anthropic_compat"]
    thinking_on = thinking_asked(body) or (compat or {}).get("thinking_with_calls") == "always"
    folded = system_messages_as_users(messages) if compat is not None or \
        provider.refuses_system_messages else messages
    changed, cleaned = folded is not messages, []
    for number, message in enumerate(folded, 1):
        fixed = anthropic_message_for(message, provider.name, compat, thinking_on)
        changed = changed or fixed is not message
        if compat is None and number < len(folded) and blank_message(fixed):
            changed = True              # "all messages must have non-empty content" but the last
            continue
        cleaned.append(fixed)
    paired = paired_tool_results(unique_call_ids(cleaned) if compat is None else cleaned)
    return paired if changed or paired is not cleaned else None


def anthropic_message_for(message, provider_name: str, compat, thinking_on: bool):
    """One message as the provider may see it (see anthropic_messages_for); itself when it
    needs no change."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    kept = anthropic_blocks_for(content, provider_name, compat)
    if compat and compat["thinking_with_calls"] and thinking_on and any(
            b.get("type") == "tool_use" for b in kept) and not any(
            b.get("type") == "thinking" for b in kept):
        kept.insert(0, {"type": "thinking", "thinking": "", "signature": ""})
    return message if kept == content else dict(message, content=kept)


def blank_message(message) -> bool:
    """Whether a message holds nothing: no block, or a text of only whitespace."""
    content = dict_of(message).get("content")
    return not content if isinstance(content, list) else not visible_text(content)


def unique_call_ids(messages: list) -> list:
    """The messages with each repeat of an earlier call's id made its own, in the call and in
    the result that follows it: Anthropic refuses a history whose ids repeat ("tool_use ids
    must be unique") at every turn after. Claude Code 2.1.19 sent such, and servers that
    number each answer's calls made them before ccproxy gave repeats ids of their own. The
    messages themselves when no id repeats."""
    seen, fixed, renamed, changed = {}, [], {}, False      # seen: each id's calls so far
    for message in messages:
        role = message.get("role") if type(message) is dict else None
        if role == "assistant":
            message, renamed = renamed_calls(message, seen)
            changed = changed or bool(renamed)
        elif role == "user" and renamed:
            message, renamed = renamed_results(message, renamed), {}
        fixed.append(message)
    return fixed if changed else messages


def renamed_calls(message: dict, seen: dict) -> tuple:
    """(an assistant message with each call whose id came before renamed, {the id: the new
    ids its results take, in order, None for the first when the first call is here too})."""
    calls = [block["id"] for block in list_of(message.get("content")) if type(block) is dict
             and block.get("type") == "tool_use" and type(block.get("id")) is str]
    if seen.keys().isdisjoint(calls) and len(set(calls)) == len(calls):
        seen.update(dict.fromkeys(calls, 1))        # no repeat: the common case, at a glance
        return message, {}
    renamed, blocks, here = {}, [], set()
    for block in list_of(message.get("content")):
        call_id = block.get("id") if dict_of(block).get("type") == "tool_use" else None
        if isinstance(call_id, str) and call_id in seen:
            new = ENCODED_TOOL_ID_PREFIX + id_text("%s~%d" % (call_id, seen[call_id]))
            renamed.setdefault(call_id, [None] if call_id in here else []).append(new)
            block = dict(block, id=new)
        if isinstance(call_id, str):
            here.add(call_id)
            seen[call_id] = seen.get(call_id, 0) + 1
        blocks.append(block)
    return (dict(message, content=blocks) if renamed else message), renamed


def renamed_results(message: dict, renamed: dict) -> dict:
    """A user message whose results of renamed calls take their new ids, in order."""
    waiting, blocks = {call_id: list(ids) for call_id, ids in renamed.items()}, []
    for block in content_blocks(message.get("content")):
        call_id = block.get("tool_use_id") if dict_of(block).get("type") == "tool_result" \
            else None
        if isinstance(call_id, str) and waiting.get(call_id):
            new = waiting[call_id].pop(0)
            block = block if new is None else dict(block, tool_use_id=new)
        blocks.append(block)
    return dict(message, content=blocks)


def paired_tool_results(messages: list) -> list:
    """The messages with a result right after each tool call that has none (one interrupted:
    Claude Code at times sends such a history, which every Anthropic API refuses at every
    turn after: "tool_use ids were found without tool_result blocks immediately after"), and
    a result that answers no call of the message before as text ("unexpected tool_use_id
    found in tool_result blocks"). The messages themselves when each call has its result."""
    paired, open_ids, changed = [], [], False
    for message in messages:
        role = message.get("role") if type(message) is dict else None
        if role == "system":              # Anthropic's API takes one between calls and results
            paired.append(message)
            continue
        blocks = message["content"] if role and type(message.get("content")) is list else ()
        if role == "user" and [block.get("tool_use_id") for block in blocks if type(
                block) is dict and block.get("type") == "tool_result"] != open_ids:
            fixed = answering_turn(message, open_ids)       # a call unanswered, or a result
            changed, message = changed or fixed is not message, fixed      # of none
        elif role != "user" and open_ids:
            paired.append({"role": "user", "content": interrupted_results(open_ids)})
            changed = True
        paired.append(message)
        open_ids = [block["id"] for block in blocks if type(block) is dict and block.get(
            "type") == "tool_use" and type(block.get("id")) is str] if role == "assistant" else []
    return paired if changed else messages


def answering_turn(message: dict, open_ids: list) -> dict:
    """A user message with one result for each of the calls before it, first, and the results
    that answer none of them (or one already answered) as text; the message itself when it
    has just one result for each."""
    results = [block for block in list_of(message.get("content"))
               if dict_of(block).get("type") == "tool_result"]
    answered = [block.get("tool_use_id") for block in results]
    if sorted(map(str, answered)) == sorted(map(str, open_ids)):
        return message
    answers, missing = answered_calls([block.get("tool_use_id") for block in results], open_ids)
    kept = [block for block, call_id in zip(results, answers) if call_id is not None]
    orphans = [block for block, call_id in zip(results, answers) if call_id is None]
    others = [block for block in content_blocks(message.get("content"))
              if dict_of(block).get("type") != "tool_result" and not (
                  dict_of(block).get("type") == "text" and not visible_text(block.get("text")))]
    texts = [{"type": "text", "text": unanswering_result_text(block, tool_result_text(block))}
             for block in orphans]
    return dict(message, content=kept + interrupted_results(missing) + texts + others)


def answered_calls(result_ids: list, open_ids: list) -> tuple:
    """(for each tool result, by the call id it names, the open call it answers, or None; the
    open calls none answers). The first result for an open call answers it; another, or one
    for no open call, answers none. The one rule of every protocol's history."""
    awaiting, answers = set(open_ids), []
    for call_id in result_ids:
        answers.append(call_id if isinstance(call_id, str) and call_id in awaiting else None)
        awaiting.discard(answers[-1])
    return answers, [call_id for call_id in open_ids if call_id in awaiting]


def interrupted_results(call_ids: list) -> list:
    """A tool_result for each of these calls, which were interrupted before they had one."""
    return [{"type": "tool_result", "tool_use_id": call_id, "is_error": True,
             "content": INTERRUPTED_CALL_RESULT} for call_id in call_ids]


def system_messages_as_users(messages: list) -> list:
    """The messages with each system message (Claude Code ends every request with one) joined
    to the user's message before it, to the results after it when it comes between calls and
    their results, or as the user's own: MiniMax's Anthropic API refuses any ("chat content
    has invalid message role: system"), and the other compatible servers document none. The
    messages themselves when there is none."""
    if not any(dict_of(message).get("role") == "system" for message in messages):
        return messages
    folded, held = [], []         # held: what came between calls and their results
    for message in messages:
        role = dict_of(message).get("role")
        if role == "system":
            blocks = content_blocks(message.get("content"))
            if folded and dict_of(folded[-1]).get("role") == "user":
                folded[-1] = dict(folded[-1], content=content_blocks(
                    folded[-1].get("content")) + blocks)
            elif folded and any(dict_of(block).get("type") == "tool_use"
                                for block in list_of(dict_of(folded[-1]).get("content"))):
                held += blocks
            else:
                folded.append(dict(message, role="user"))
            continue
        if held and role == "user":
            message = dict(message, content=content_blocks(message.get("content")) + held)
        elif held:
            folded.append({"role": "user", "content": held})
        folded.append(message)
        held = []
    return folded + ([{"role": "user", "content": held}] if held else [])


def anthropic_blocks_for(blocks: list, provider_name: str, compat) -> list:
    """A message's blocks for the provider (see anthropic_messages_for); a tool result's
    content is cleaned the same way. A tool call whose input is no object (GLM's API answers
    one with a list at times) goes with its input inside one, as every Anthropic API wants:
    sent back as it was, GLM's failed with a 500 at every turn after, compaction too
    (zai-org/zai-coding-plugins#14)."""
    kept = []
    for block in blocks:
        if not isinstance(block, dict):
            kept.append(block)
            continue
        kind = block.get("type")
        if compat is None and kind == "text" and not visible_text(block.get("text")):
            continue        # "text content blocks must contain non-whitespace text"
        if kind in ("thinking", "redacted_thinking"):
            block = own_thinking(block, provider_name, compat)
        elif kind == "tool_use" and not isinstance(block.get("input"), dict):
            block = dict(block, input={} if block.get("input") is None else {
                "input": block["input"]})
        elif compat is not None and kind in compat["no_blocks"]:
            block = {"type": "text", "text": block_as_text(block, provider_name)}
        elif kind == "tool_result" and compat is not None and isinstance(
                block.get("content"), list):
            block = dict(block, content=anthropic_blocks_for(block["content"], provider_name,
                                                             compat))
        if compat is None and kind in TOOL_ID_BLOCK_TYPES:
            block = ids_anthropic_takes(block)
        elif compat is not None and kind in ("tool_use", "tool_result"):
            block = first_ids(block)
        if block is not None:
            kept.append(block)
    return kept


TOOL_ID_BLOCK_TYPES = ("tool_use", "tool_result") + SERVER_CALL_BLOCK_TYPES


def ids_anthropic_takes(block: dict) -> dict:
    """The block with its call's id as Anthropic takes one (a tool_use id of letters, digits,
    _ and -; a server tool's srvtoolu_ and letters, digits, _), where another server gave
    another (Kimi's "functions.Bash:0"): Anthropic refused the session's every turn after a
    switch to it. An id is encoded the same way in a call and its result, so they still pair."""
    key = "id" if block["type"] in ("tool_use", "server_tool_use") else "tool_use_id"
    tool_id = block.get(key)
    if not isinstance(tool_id, str):
        return block
    if block["type"] in ("tool_use", "tool_result"):
        if TOOL_USE_ID_RE.match(tool_id):
            return block
        encoded = ENCODED_TOOL_ID_PREFIX + id_text(tool_id)
    elif SERVER_TOOL_ID_RE.match(tool_id):
        return block
    else:
        encoded = "srvtoolu_" + tool_id.encode("utf-8", "surrogatepass").hex()
    return dict(block, **{key: encoded})


def first_ids(block: dict) -> dict:
    """A tool_use or tool_result block with the id its server first gave the call (a repeat's
    own id carries it): a compatible server gets back the ids it gave."""
    key = "id" if block["type"] == "tool_use" else "tool_use_id"
    tool_id = block.get(key)
    if isinstance(tool_id, str) and tool_id.startswith(REPEATED_TOOL_ID_PREFIX):
        return dict(block, **{key: first_tool_id(tool_id)})
    return block


def own_thinking(block: dict, provider_name: str, compat) -> dict | None:
    """A thinking block as the provider may see it: Anthropic, every block but ccproxy's and
    those with no signature, which it refuses; a compatible server, only its own (its
    signature unmarked)."""
    signature = str(block.get("signature", ""))
    if compat is None:
        unsigned = block.get("type") == "thinking" and not signature
        return None if unsigned or signature.startswith(PROXY_SIGNATURE_PREFIX) else block
    mark = signature_mark(provider_name)
    return dict(block, signature=signature[len(mark):]) if signature.startswith(mark) else None


def block_as_text(block: dict, provider_name: str) -> str:
    """What a block the provider cannot take says, as text."""
    readable = server_block_text(block) if block.get("type") in SERVER_BLOCK_TYPES else None
    if readable is not None:
        return readable
    if block.get("type") == "document":
        return document_text(block) or "[document omitted]"
    if block.get("type") == "tool_reference":
        return tool_reference_text(block)
    return "[%s omitted: %s takes none]" % (str(block.get("type")).replace("_", " "),
                                            provider_name)


def tool_reference_text(block: dict) -> str:
    """A tool_reference (what Claude Code's tool search returns) as the tool it loaded."""
    return "[tool loaded: %s]" % block.get("tool_name")


# 9.2.3 The answer: marked for a compatible server, whole or streamed, and errors
# .............................................................................

def signature_mark(provider_name: str) -> str:
    """What starts the signature of thinking a compatible server made, as its clients see it:
    the provider's name in base64url, which holds no dot, so no mark is another's prefix (and
    the signature keeps to the characters Claude Code sends back)."""
    return "%sas.%s." % (PROXY_SIGNATURE_PREFIX, id_text(provider_name))


def marked_signatures(blocks, provider_name: str) -> None:
    """Mark the signatures of the thinking blocks (whole, or a content_block_start's, or a
    signature_delta) a compatible server sent, an empty or missing one too: unmarked, its
    thinking would go to Anthropic, which refuses a signature it did not make."""
    for block in list_of(blocks):
        if isinstance(block, dict) and block.get("type") in ("thinking", "signature_delta"):
            signature = block.get("signature")
            block["signature"] = signature_mark(provider_name) + (
                signature if isinstance(signature, str) else "")


def own_ids(blocks, tool_ids: AnswerToolIds) -> None:
    """Give each tool_use block (whole, or a content_block_start's) an id of its own."""
    for block in list_of(blocks):
        if isinstance(block, dict) and block.get("type") == "tool_use":
            block["id"] = tool_ids.own(block.get("id"))


STREAMED_BLOCK_FIELDS = {"text": ("text", str), "thinking": ("thinking", str),
                         "tool_use": ("input", dict), "server_tool_use": ("input", dict)}


def events_of_whole_answer(answer: dict, call, context) -> bytes:
    """The events of a message an Anthropic-protocol server answered whole to a request for a
    stream (some ignore `stream`), as a client that asked for a stream reads it; a 502 when
    its blocks are not what a stream can carry."""
    content = answer.get("content")
    if not isinstance(content, list) or not all(map(streamable_block, content)):
        raise UpstreamError("%s: answered a request for a stream with a whole message whose "
                            "content is not blocks a stream can carry" % call.provider.name)
    usage = answer.get("usage")
    usage = dict(usage, **{field: count_of(usage.get(field)) for field in USAGE_FIELDS}) \
        if isinstance(usage, dict) else None                          # counts as ccproxy takes them
    message = dict(answer, usage=usage, stop_reason=str_of(answer.get("stop_reason")) or None)
    return events_from_message(message, context)


def streamable_block(block) -> bool:
    """Whether a content block has the type and the field events_from_message() reads."""
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        return False
    field, kind = STREAMED_BLOCK_FIELDS.get(block["type"], ("type", str))
    return isinstance(block.get(field), kind) and isinstance(block.get("citations") or [], list) \
        and isinstance(block.get("signature") or "", str)


def check_anthropic_answer(call) -> dict:
    """The answer of a 2xx, parsed; a 502 unless it is an Anthropic message: a gateway's HTML
    page, an empty body or an answer cut short is not passed on as a success."""
    try:
        answer = json.loads(call.body, **PROVIDER_JSON_NUMBERS)
    except (ValueError, RecursionError):
        answer = None
    if not isinstance(answer, dict) or answer.get("type") != "message":
        raise UpstreamError("%s: answered HTTP %d with something that is not an Anthropic "
                            "message: %s" % (call.provider.name, call.status,
                                             call.provider.masker.text(
                                                 upstream_error_message(call.body)[:200])))
    return answer


def anthropic_error(call) -> ProxyError:
    """An upstream error: an Anthropic-shaped body passes unchanged with its status (an error
    status); any other body (an HTML gateway page, a bare message, an error without its type
    and message, NaN in it) is mapped to one."""
    headers = call.relayed_headers()
    if 400 <= call.status <= 599 and anthropic_error_shaped(call.body):
        return RelayedError(call.status, call.provider.masker.data(call.body), headers)
    return error_from_upstream(call.provider, call.status, call.body, headers)


def anthropic_error_shaped(body: bytes) -> bool:
    """Whether body is an Anthropic error as clients read one: strict JSON, its error's type
    and message strings."""
    try:
        error = json.loads(body, parse_constant=refuse_json_constant)
    except (ValueError, RecursionError):
        return False
    inner = error.get("error") if isinstance(error, dict) else None
    return error.get("type") == "error" and isinstance(inner, dict) and all(
        isinstance(inner.get(field), str) for field in ("type", "message"))


class AnthropicStreamRelay:
    """Relays an Anthropic event stream unchanged, whole events at a time.

    feed() returns the complete events in a chunk and keeps a trailing partial event for the
    next chunk, so a stream cut mid-event never leaves half an event before the error event
    that finish() adds when the stream ended without message_stop or error. Upstream silence
    (an empty chunk) becomes a ping between events. Events that speak of an error have the
    provider's secrets masked (a provider may echo the key it was given). An event whose data
    is not a JSON object (which a client's SDK cannot read) breaks the stream, as it does a
    translated one: the events before it are relayed, never it. What comes before the first
    named event (a comment, `data: [DONE]`, junk) is dropped, as no client reads it: until
    then the answer has not begun, and a stream that ends there may still fail over. What
    comes after message_stop (or an error event) is dropped too: the stream is over.
    """

    ended = False                     # never before the provider's end

    def __init__(self, provider: Provider, record=None, client_model: str | None = None,
                 tool_ids: AnswerToolIds | None = None):
        self._provider = provider
        self._held = HeldBytes()
        self._begun = False           # whether a named event has come
        self._over = False            # message_stop or an error event has come
        self.broken = None
        self._record = record
        # A compatible server's stream: its thinking signatures are marked, the message is of
        # the model the client asked for (Claude Code drops thinking from another model), and
        # a call whose id an earlier call had gets one of its own.
        self._client_model = client_model
        self._tool_ids = tool_ids

    def feed(self, chunk: bytes) -> bytes:
        if self._over:
            return b""                # the stream is over: what a provider adds is no answer
        if not chunk:
            return SSE_PING
        tail = self._held.tail(3)             # an event boundary may straddle two chunks
        end = sse_complete_length(tail + chunk) - len(tail)
        if end <= 0:
            self._held.hold(chunk)
            return b""
        complete = self._held.release(chunk[:end])
        self._held.hold(chunk[end:])
        ending = stream_end(complete) if b"message_stop" in complete or b"error" in complete \
            else None
        if ending is not None:
            complete, self._over = complete[:ending], True
        complete = self._readable(complete)
        if not self._begun:
            if not self._begins(complete):
                return b""
            self._begun = True
        if complete and self._record is not None:
            note_anthropic_usage(complete, self._record)
        if b"error" in complete:
            complete = self._provider.masker.data(complete)
        if self._client_model is not None and (b'"signature' in complete
                                               or b'"message_start"' in complete
                                               or b'"content_block_start"' in complete):
            complete = marked_events(complete, self._provider.name, self._client_model,
                                     self._tool_ids)
        return complete

    def _begins(self, events: bytes) -> bool:
        """Whether these events begin the answer: a named event has come. An error event before
        any other is the provider's failure before the answer began (self.broken, with the
        status of its type), so that failover may try the next provider."""
        name = SSE_EVENT_NAME_RE.search(events)
        if name is None:
            return False
        if name.group(1).strip() != b"error":
            return True
        data = SSE_DATA_RE.search(events, name.end())
        body = data.group(1) if data else b""
        if anthropic_error_shaped(body):
            kind = json.loads(body)["error"]["type"]
            self.broken = RelayedError(STATUS_BY_ERROR_TYPE.get(kind, 502),
                                       self._provider.masker.data(body))
        else:
            self.broken = UpstreamError("%s: the stream began with an error event: %s" % (
                self._provider.name, self._provider.masker.text(upstream_error_message(body))))
        return False

    def _readable(self, events: bytes) -> bytes:
        """The events a client can read: those before the first whose data is not a JSON
        object (which breaks the stream), with numbers no client can read written as null, and
        no frame that names an event without data."""
        unreadable = first_unreadable_event(events)
        if unreadable is not None:
            events = events[:unreadable]
            self.broken = UpstreamError("%s: the stream held an event that is not a JSON object; "
                                        "text of the answer was lost" % self._provider.name)
        if may_hold_unreadable_numbers(events):
            events = SSE_DATA_RE.sub(data_line_readable, events)
        if events.count(b"event:") > events.count(b"data:"):
            events = without_dataless_events(events)
        return events

    @property
    def complete(self) -> bool:
        return self._over and self.broken is None

    def finish(self, error: ProxyError | None = None) -> bytes:
        if self.complete:
            return b""
        if error is None:
            error = self.broken or UpstreamError("%s: the stream ended before message_stop"
                                                 % self._provider.name)
        return error.event()


SSE_EVENT_END_RE = re.compile(rb"\r?\n\r?\n")
SSE_EVENT_NAME_RE = re.compile(rb"^event: ?([^\r\n]*)", re.M)
SSE_DATA_RE = re.compile(rb"^data: ?([^\r\n]*)", re.M)


def first_unreadable_event(events: bytes) -> int | None:
    """Where the first of these whole events whose data is not a JSON object begins, if one
    is. Only a named event is read by a client's SDK: one without a name (`data: [DONE]`, which
    some gateways add), without data, or a comment passes. Events of one data line each, every
    event of Anthropic's streams, are checked line by line without being split apart."""
    previous = None                   # the end of the last data line checked
    for data in SSE_DATA_RE.finditer(events):
        if previous is not None and events.find(b"\n\n", previous, data.start()) < 0 and \
                events.find(b"\n\r\n", previous, data.start()) < 0:
            break                     # no blank line since: a second data line of one event
        if not json_object_text(data.group(1)):
            break
        previous = data.end()
    else:
        return None
    start = 0                         # else event by event, to find where the culprit begins
    for end in SSE_EVENT_END_RE.finditer(events):
        data = SSE_DATA_RE.findall(events, start, end.start())
        if data and SSE_EVENT_NAME_RE.search(events, start, end.start()) \
                and not json_object_text(b"\n".join(data)):
            return start
        start = end.end()
    return None


def without_dataless_events(events: bytes) -> bytes:
    """The events but any frame that names an event and carries no data: no event at all to
    SSE, which some clients (the Anthropic SDK for Python 3.8) read as one with empty data,
    and fail on."""
    kept, start = [], 0
    for end in SSE_EVENT_END_RE.finditer(events):
        frame = events[start:end.end()]
        if SSE_DATA_RE.search(frame) or not SSE_EVENT_NAME_RE.search(frame):
            kept.append(frame)
        start = end.end()
    return b"".join(kept) + events[start:]


def stream_end(events: bytes) -> int | None:
    """Where these whole events end the stream as a client reads it: just after the first
    frame whose last event field names message_stop or error (a frame without data is no event
    at all); None when none does."""
    start = 0
    for end in SSE_EVENT_END_RE.finditer(events):
        frame = events[start:end.start()]
        names = SSE_EVENT_NAME_RE.findall(frame)
        if names and names[-1] in (b"message_stop", b"error") and SSE_DATA_RE.search(frame):
            return end.end()
        start = end.end()
    return None


def data_line_readable(line: re.Match) -> bytes:
    """A data line of one JSON object, its NaN, Infinity (which Python's JSON writes and a
    JavaScript client cannot read) and integers of over 4,300 digits (which a Python client
    cannot) written as null, as a translated stream has them."""
    data = line.group(1)
    if not may_hold_unreadable_numbers(data) or not json_object_text(data):
        return line.group(0)
    return b"data: " + json_bytes(decode_event_json(data.decode("utf-8")))


LONG_INTEGER_RE = re.compile(rb"\d{%d}" % (JSON_INT_DIGITS + 1))


def may_hold_unreadable_numbers(data: bytes) -> bool:
    """Whether JSON text may hold NaN or Infinity (Python's JSON writes them; JSON has not),
    or an integer of over 4,300 digits (which Python's JSON cannot read)."""
    return b"NaN" in data or b"Infinity" in data or (
        len(data) > JSON_INT_DIGITS and max(map(len, data.split(b"\n"))) > JSON_INT_DIGITS
        and LONG_INTEGER_RE.search(data) is not None)


def json_object_text(data: bytes) -> bool:
    """Whether data is the UTF-8 text of a JSON object."""
    try:
        return isinstance(decode_event_json(data.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False


def marked_events(data: bytes, provider_name: str, client_model: str,
                  tool_ids: AnswerToolIds) -> bytes:
    """Whole events of a compatible server's stream: the signatures of its thinking marked,
    the message of the model the client asked for, each call with an id of its own."""
    events = data.split(b"\n\n")
    for index, event in enumerate(events):
        head, found, payload = event.partition(b"data: ")
        if not found or not (b'"signature' in payload or b'"message_start"' in payload
                             or b'"content_block_start"' in payload):
            continue
        try:
            parsed = json.loads(payload, **PROVIDER_JSON_NUMBERS)
        except (ValueError, RecursionError):
            continue
        if not isinstance(parsed, dict):
            continue
        marked_signatures([dict_of(parsed.get("content_block")), dict_of(parsed.get("delta"))],
                          provider_name)
        own_ids([parsed.get("content_block")], tool_ids)
        if parsed.get("type") == "message_start":
            dict_of(parsed.get("message"))["model"] = client_model
        events[index] = head + found + json_bytes(parsed)
    return b"\n\n".join(events)


USAGE_FIELD_RE = re.compile(rb'"(input_tokens|output_tokens|cache_read_input_tokens|'
                            rb'cache_creation_input_tokens)"\s*:\s*(\d{1,12})(?!\d)')


def note_anthropic_usage(data: bytes, record: dict) -> None:
    """Token counts found in Anthropic JSON or events, for the usage (last one wins)."""
    if b"_tokens" not in data:
        return
    usage = record.setdefault("usage", {})
    for name, value in USAGE_FIELD_RE.findall(data):
        usage[name.decode()] = count_of(int(value))


# -----------------------------------------------------------------------------
# 9.3 OpenAI Chat Completions
# -----------------------------------------------------------------------------

OPENAI_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                       "function_call": "tool_use", "content_filter": "refusal"}
OPENAI_TOOL_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MISTRAL_TOOL_ID_RE = re.compile(r"^[a-zA-Z0-9]{9}$")
MAX_OPENAI_STOP_SEQUENCES = 4
OPENAI_ENDPOINTS = ("chat/completions", "responses")      # a full endpoint URL may end so


class OpenAIChatProtocol(Protocol):
    """OpenAI's Chat Completions API, and the many servers that copy it."""

    name = "openai"
    coverage = TRANSLATED_REQUEST

    def upstream_tool_name(self, name: str) -> str:
        return openai_tool_name(name)

    def messages_request(self, provider, model, request, body) -> UpstreamRequest:
        payload = openai_request_from_anthropic(body, provider, model)
        payload.update(openai_cache_fields(provider, model, request))
        url, payload["model"] = openai_target(provider, model, "chat/completions")
        return UpstreamRequest(url, openai_request_headers(provider), json_bytes(payload))

    def models_request(self, provider) -> UpstreamRequest:
        return UpstreamRequest(openai_target(provider, "", "models")[0],
                               openai_request_headers(provider), None)

    def can_search(self, provider, model) -> bool:
        return openai_search_style(provider, model) is not None

    def message(self, answer, context) -> dict:
        return anthropic_message_from_openai(answer, context)

    def rescued_message(self, call, context) -> dict | None:
        generation = failed_generation(call.body) if call.status == 400 else None
        return message_of_generation(generation, context) if generation is not None else None

    def stream_translator(self, context):
        return OpenAIStreamTranslator(context)


# 9.3.1 The request, and the conversation as messages
# .............................................................................

def openai_request_from_anthropic(body: dict, provider: Provider, model: str) -> dict:
    """The Chat Completions body for a Messages body
    (https://platform.openai.com/docs/api-reference/chat/create)."""
    quirks = provider.model_quirks(model)
    reasoning_model = quirk_holds(quirks["reasoning_models"], model)
    request = {"model": model, "messages": openai_messages_from_anthropic(body, quirks)}
    cap = provider.output_cap(model)
    max_tokens = min(body["max_tokens"], cap) if cap else body["max_tokens"]
    request["max_completion_tokens" if reasoning_model else "max_tokens"] = max_tokens
    search = web_search_tool(body) and openai_search_style(provider, model)
    search_model = search == "web_search_options"       # they take no sampling parameters
    sampling = () if reasoning_model or search_model else ("temperature", "top_p") + (
        ("top_k",) if quirks["top_k"] else ())
    for key in sampling:
        if isinstance(body.get(key), (int, float)) and not isinstance(body.get(key), bool):
            request[key] = body[key]
    stops = body.get("stop_sequences")
    if isinstance(stops, list) and stops and not reasoning_model:     # they refuse it
        request["stop"] = stops[:MAX_OPENAI_STOP_SEQUENCES]   # ccproxy keeps them all itself
    if body.get("stream") is True:
        request["stream"] = True
        if quirks["stream_usage"]:
            request["stream_options"] = {"include_usage": True}
    tools = openai_tools_from_anthropic(offered_tools(body), quirks)
    if search == "web_plugin":
        tools.append({"type": "openrouter:web_search"})
    if tools:
        request["tools"] = tools
        request.update(openai_tool_choice(body.get("tool_choice"), {
            t["function"]["name"] for t in tools if t["type"] == "function"}))
    if search_model:
        request["web_search_options"] = {}
    user = plain_user_id(body.get("metadata")) if quirks["user_field"] else None
    if user:
        request["user"] = user
    request.update(openai_reasoning_fields(body, quirks, model))
    request.update(openai_response_format(body))
    if "response_format" in request and not quirks["json_schema"]:
        json_mode_instead(request)
    return without_refused_fields(request, provider.refused_fields.get(model, ()))


def without_refused_fields(request: dict, refused) -> dict:
    """A Chat Completions request less the fields its server refuses (learned), max_tokens
    sent as max_completion_tokens where the server wants that instead."""
    for name in refused:
        if name == "max_tokens" and name in request:
            request["max_completion_tokens"] = request.pop(name)
        elif name != "max_tokens":
            request.pop(name, None)
    return request


def openai_messages_from_anthropic(body: dict, quirks: dict) -> list:
    """The conversation as Chat Completions messages: system first, each assistant turn with
    its tool calls, each call's result as a tool message right after it."""
    messages = []
    system = openai_system_content(body.get("system"), quirks)
    if system:
        messages.append({"role": "system", "content": system})
    open_calls = []          # ids of the last assistant turn's calls, awaiting results
    deferred = []            # system messages that came between calls and their results
    for index, message in enumerate(body["messages"]):
        where = "messages[%d].content" % index
        blocks = content_blocks(message["content"])
        role = message["role"]
        if role == "assistant":
            messages.extend(missing_tool_results(open_calls) + deferred)
            deferred = []
            converted = openai_assistant_message(blocks, quirks, where)
            open_calls = [c["id"] for c in converted.get("tool_calls", ())] if converted else []
            if converted:
                messages.append(converted)
        elif role == "system":
            system = openai_system_content(blocks, quirks)
            if system:
                (deferred if open_calls else messages).append({"role": "system",
                                                               "content": system})
        else:
            messages.extend(openai_user_turn(blocks, open_calls, quirks, where) + deferred)
            open_calls, deferred = [], []
    messages += deferred
    if not quirks["system_anywhere"]:
        messages = fold_system(messages, quirks.get("cache_control"))
    return merge_adjacent_user_messages(messages, quirks.get("cache_control"))


def fold_system(messages: list, keep_parts: bool) -> list:
    """Each system message after the first joins the message before it (the user's, a tool's,
    the first system message), or after an assistant's becomes the user's. For a server that
    takes a system message only first, as many chat templates and Mistral's validator do
    ("Unexpected role 'system' after role 'assistant'", and the last message must be the
    user's or a tool's), where Claude Code sends one at the end of every request."""
    folded = messages[:1]
    for message in messages[1:]:
        previous = folded[-1]
        if message["role"] != "system":
            folded.append(message)
        elif previous["role"] == "assistant":
            folded.append(dict(message, role="user"))
        else:
            previous["content"] = joined_content(previous["content"], message["content"],
                                                 keep_parts)
    return folded


def openai_system_content(system, quirks: dict):
    """The system prompt as one string, or, where the model honours cache_control through
    this host (OpenRouter's Anthropic and Gemini models), as text parts that keep it (parts
    whether marked or not, so the prompt is the same when a mark moves)."""
    if not quirks.get("cache_control") or isinstance(system, str):
        return text_of_system(system)
    return [cached_text_part(block["text"], block) for block in system_text_blocks(system)]


def cached_text_part(text: str, block: dict) -> dict:
    """A text content part that keeps the block's cache_control mark, if it has one."""
    part = {"type": "text", "text": text}
    if "cache_control" in block:
        part["cache_control"] = block["cache_control"]
    return part


def openai_assistant_message(blocks, quirks: dict, where: str) -> dict | None:
    """An assistant turn: text joined, tool_use as tool_calls, thinking dropped (another
    provider's signed or redacted thinking means nothing here) or replayed, server tools'
    blocks as the text of what they asked and found."""
    texts, calls, thoughts, details, signature = [], [], [], [], None
    for position, block in enumerate(blocks):
        kind = block.get("type")
        readable = server_block_text(block) if kind in SERVER_BLOCK_TYPES else None
        if kind not in ASSISTANT_BLOCK_TYPES or (kind in SERVER_BLOCK_TYPES and readable is None):
            raise InvalidRequestError("%s[%d]: a %r block cannot be sent to an OpenAI-compatible "
                                      "provider" % (where, position, kind))
        if readable is not None:
            texts.append(readable)
        elif kind == "text" and visible_text(block.get("text")):
            texts.append(block["text"])
        elif kind == "tool_use":
            calls.append(openai_tool_call(block, quirks, signature, first=not calls))
            signature = None
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            thoughts.append(thinking_text_of(block))
            details += reasoning_details_of(block.get("signature"))
            signature = gemini_signature_of(block.get("signature")) or signature
    if not texts and not calls:
        return None
    message = {"role": "assistant", "content": "\n".join(texts) or None}
    if details and quirks["reasoning_details"]:
        message["reasoning_details"] = details
    if calls:
        message["tool_calls"] = calls
    if (calls and quirks["reasoning_replay"]) or quirks["reasoning_replay"] == "all":
        message["reasoning_content"] = "".join(thoughts)
    return message


def openai_tool_call(block: dict, quirks: dict, signature: str | None, first: bool) -> dict:
    """A tool_use block as a tool call; to Gemini's OpenAI-compatible API, with the thought
    signature it came with, and a turn's first call with one in any case."""
    call = {"id": openai_tool_id(str(block.get("id", "")), quirks["tool_id_style"]),
            "type": "function",
            "function": {"name": openai_tool_name(str(block.get("name", ""))),
                         "arguments": COMPACT_JSON_TEXT(block.get("input") or {})}}
    if quirks["thought_signatures"] and (signature or first):
        call["extra_content"] = {"google": {
            "thought_signature": signature or GEMINI_SKIP_SIGNATURE}}
    return call


def matched_tool_results(blocks, open_calls: list, quirks: dict, where: str) -> tuple:
    """(each tool_result of a user turn as (the open call it answers, or None, the block, its
    text, its images and documents), the open calls none answers). The first result for an
    open call answers it; another, or one for no open call, answers none."""
    results = [(position, block) for position, block in enumerate(blocks)
               if block.get("type") == "tool_result"]
    answers, unanswered = answered_calls([openai_tool_id(str(block.get(
        "tool_use_id", "")), quirks["tool_id_style"]) for _, block in results], open_calls)
    return [(call_id, block) + tool_result_text_and_media(block, quirks, "%s[%d]" % (
        where, position)) for (position, block), call_id in zip(results, answers)], unanswered


def unanswering_result_text(block: dict, text: str) -> str:
    """A tool result that answers no open call, as text of the user's turn."""
    return "[tool result %s]\n%s" % (block.get("tool_use_id"), text)


def openai_user_turn(blocks, open_calls: list, quirks: dict, where: str) -> list:
    """A user turn: one tool message per answered call first (Chat Completions wants them
    right after the calls), then the turn's other content."""
    results, unanswered = matched_tool_results(blocks, open_calls, quirks, where)
    tool_messages, extra_parts = [], []
    for call_id, block, text, media in results:
        if call_id is not None:
            tool_messages.append({"role": "tool", "tool_call_id": call_id, "content": [
                cached_text_part(text, block)] if quirks.get("cache_control") else text})
        else:
            extra_parts.append({"type": "text", "text": unanswering_result_text(block, text)})
        extra_parts.extend(media)
    tool_messages += missing_tool_results(unanswered)
    parts = extra_parts + openai_user_parts(
        [b for b in blocks if b.get("type") != "tool_result"], quirks, where)
    result = tool_messages
    if parts:
        if tool_messages and not quirks["user_after_tool"]:
            result.append({"role": "assistant", "content": "Noted."})
        result.append({"role": "user", "content": openai_content(
            parts, quirks.get("cache_control"))})
    elif not tool_messages:
        result.append({"role": "user", "content": "..."})
    return result


def openai_user_parts(blocks, quirks: dict, where: str) -> list:
    """User blocks other than tool results as Chat Completions content parts."""
    parts = []
    for position, block in enumerate(blocks):
        kind = block.get("type")
        if kind == "text":
            if visible_text(block.get("text")):
                parts.append(cached_text_part(block["text"], block) if quirks.get("cache_control")
                             else {"type": "text", "text": block["text"]})
        elif kind == "image":
            parts.append(openai_image_part(block, "%s[%d]" % (where, position)) if quirks["vision"]
                         else {"type": "text", "text": "[image omitted]"})
        elif kind == "document":
            parts.append(openai_document_part(block, quirks))
        elif kind in SERVER_BLOCK_TYPES and server_block_text(block) is not None:
            parts.append({"type": "text", "text": server_block_text(block)})
        elif kind not in ("thinking", "redacted_thinking"):
            raise InvalidRequestError("%s[%d]: a %r block cannot be sent to an OpenAI-compatible "
                                      "provider" % (where, position, kind))
    return parts


def openai_image_part(block: dict, where: str) -> dict:
    """An image block as an image_url part (a data: URL for base64); a Files API reference
    cannot be sent."""
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    if source.get("type") == "base64":
        url = "data:%s;base64,%s" % (source.get("media_type", "image/png"), source.get("data", ""))
    elif source.get("type") == "url":
        url = source.get("url", "")
    else:
        raise InvalidRequestError("%s: an image with source type %r cannot be sent to an "
                                  "OpenAI-compatible provider" % (where, source.get("type")))
    return {"type": "image_url", "image_url": {"url": url}}


def openai_document_part(block: dict, quirks: dict) -> dict:
    """A document block as its text, or as a file part (a base64 PDF, where the server takes
    one)."""
    source = dict_of(block.get("source"))
    text = document_text(block)
    if text is not None:
        return {"type": "text", "text": text}
    if source.get("type") == "base64" and quirks["files"]:
        data = "data:%s;base64,%s" % (source.get("media_type", "application/pdf"),
                                      source.get("data", ""))
        return {"type": "file", "file": {"filename": "document.pdf", "file_data": data}}
    return {"type": "text", "text": "[PDF omitted]" if source.get("type") == "base64" else
            "[document omitted: %s source]" % source.get("type")}


def document_text(block: dict) -> str | None:
    """A document's own text (a text or content source), else None."""
    source = dict_of(block.get("source"))
    if source.get("type") == "text":
        return str(source.get("data", ""))
    if source.get("type") == "content":
        return "\n".join(str(b.get("text", "")) for b in list_of(source.get("content"))
                         if isinstance(b, dict))
    return None


def openai_content(parts: list, keep_parts: bool = False):
    """Content parts as Chat Completions wants them: one string when all are text (the form
    every OpenAI-compatible server accepts), unless cache marks may come and go on them (the
    parts then stay parts, so the prompt is the same with or without its marks)."""
    if not keep_parts and all(part["type"] == "text" for part in parts):
        return "\n".join(part["text"] for part in parts)
    return parts


def tool_result_text_and_media(block: dict, quirks: dict, where: str):
    """A tool_result's text (an error result marked "Error: ") and its images and PDFs as
    parts (a tool message cannot hold them, so they follow in a user message)."""
    text = tool_result_text(block)
    media = [openai_document_part(item, quirks) if item["type"] == "document"
             else openai_image_part(item, where) if quirks["vision"]
             else {"type": "text", "text": "[image omitted]"}
             for item in tool_result_media(block)]
    return ("Error: " + text if block.get("is_error") else text), media


def missing_tool_results(call_ids) -> list:
    """Stand-in results for calls the conversation never answered (Chat Completions refuses a
    call without its result)."""
    return [{"role": "tool", "tool_call_id": call_id,
             "content": INTERRUPTED_CALL_RESULT} for call_id in call_ids]


def merge_adjacent_user_messages(messages: list, keep_parts: bool = False) -> list:
    """Two user messages in a row become one (some servers refuse two in a row)."""
    merged = []
    for message in messages:
        previous = merged[-1] if merged else None
        if previous is not None and previous["role"] == message["role"] == "user":
            previous["content"] = joined_content(previous["content"], message["content"],
                                                 keep_parts)
        else:
            merged.append(message)
    return merged


def joined_content(first, second, keep_parts: bool):
    """Two messages' contents (strings or parts) as one message's."""
    parts = [{"type": "text", "text": c} if isinstance(c, str) else c for c in (first, second)]
    return openai_content([p for c in parts for p in (c if isinstance(c, list) else [c])],
                          keep_parts)


# 9.3.2 The request's tools, effort, formats, caching and address
# .............................................................................

def openai_search_style(provider: Provider, model: str) -> str | None:
    """How the provider searches the web for this model, if it can: "web_plugin" (OpenRouter's
    openrouter:web_search server tool, https://openrouter.ai/docs/guides/features/server-tools/
    web-search) or "web_search_options" (OpenAI's search models,
    https://platform.openai.com/docs/guides/tools-web-search)."""
    style = provider.quirks["search"]
    if style == "web_search_options" and not quirk_holds(provider.quirks["search_models"], model):
        return None
    return style


def openai_tools_from_anthropic(tools, quirks: dict) -> list:
    """Custom tools as functions; web search is asked for apart (see
    openai_request_from_anthropic); other server tools have no equivalent (logged)."""
    functions = []
    for tool in tools or ():
        if tool.get("type") not in (None, "custom") or "input_schema" not in tool:
            if not str(tool.get("type")).startswith("web_search"):
                log.info("tool %r (%s) has no OpenAI equivalent; not sent", tool.get("name"),
                         tool.get("type"))
            continue
        parameters = converted_schema(tool_schema_name(tool), openai_schema, tool.get(
            "input_schema") or {
            "type": "object", "properties": {}})
        dropped = quirks["schema_drop_keys"]
        if dropped and isinstance(parameters, dict):
            parameters = {k: v for k, v in parameters.items() if k not in dropped}
        function = {"name": openai_tool_name(str(tool["name"])), "parameters": parameters}
        if tool.get("description"):
            function["description"] = tool["description"]
        functions.append({"type": "function", "function": function})
    return functions


SCHEMA_MAP_KEYWORDS = ("properties", "patternProperties", "$defs", "definitions",
                       "dependentSchemas")
SCHEMA_LIST_KEYWORDS = ("anyOf", "allOf", "oneOf", "prefixItems")
SCHEMA_KEYWORDS = ("items", "additionalProperties", "not", "contains", "if", "then", "else",
                   "propertyNames", "unevaluatedProperties", "additionalItems")


def openai_schema(node):
    """A tool schema as OpenAI's validator takes it: a `pattern` its regular-expression dialect
    cannot compile (`\\p{…}` classes, as Claude Code 2.1.265 sent; checked with Python's re, the
    same family) is left out, recursively; everything else is kept."""
    if not isinstance(node, dict):
        return node
    cleaned = {}
    for key, value in node.items():
        if key == "pattern" and isinstance(value, str) and regex_problems(value)[0]:
            log.debug("a tool schema pattern OpenAI cannot compile was left out: %r", value[:80])
            continue
        if key in SCHEMA_MAP_KEYWORDS and isinstance(value, dict):
            value = {name: openai_schema(child) for name, child in value.items()}
        elif key in SCHEMA_LIST_KEYWORDS and isinstance(value, list):
            value = [openai_schema(child) for child in value]
        elif key in SCHEMA_KEYWORDS:
            value = openai_schema(value)
        cleaned[key] = value
    return cleaned


def openai_tool_name(name: str) -> str:
    """An OpenAI function name for a tool name: kept when it fits ^[a-zA-Z0-9_-]{1,64}$ (what
    Chat Completions accepts), else cleaned and made unique with a short hash."""
    if OPENAI_TOOL_NAME_RE.match(name):
        return name
    cleaned = re.sub(r"[^a-zA-Z0-9_-]", "_", name)[:55] or "unnamed_tool"
    return "%s_%s" % (cleaned, hashlib.sha256(name.encode()).hexdigest()[:8])


def openai_tool_id(tool_id: str, style: str | None) -> str:
    """The id an OpenAI-family server gets for an Anthropic tool_use id; the same id always maps
    to the same result, so calls and their results stay paired."""
    tool_id = first_tool_id(tool_id)
    if tool_id.startswith(ENCODED_TOOL_ID_PREFIX):
        tool_id = text_of_id(tool_id[len(ENCODED_TOOL_ID_PREFIX):]) or tool_id
    if style == "alnum9" and not MISTRAL_TOOL_ID_RE.match(tool_id):
        return base62_digest(tool_id, 9)
    if style == "max40" and len(tool_id) > 40:     # another server's (vLLM's have 46)
        return "call_" + base62_digest(tool_id, 35)
    return tool_id


def base62_digest(text: str, length: int) -> str:
    """A stable alphanumeric digest of text, `length` characters long."""
    number = int.from_bytes(hashlib.sha256(text.encode()).digest(), "big")
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    digits = []
    while len(digits) < length:
        number, remainder = divmod(number, 62)
        digits.append(alphabet[remainder])
    return "".join(digits)


def openai_tool_choice(choice, functions: set) -> dict:
    """tool_choice and parallel_tool_calls for a tool_choice; a choice of a tool that was not
    sent as a function (Claude Code forces web_search) is left out rather than sent."""
    if not isinstance(choice, dict):
        return {}
    kind = choice.get("type")
    fields = {}
    name = openai_tool_name(str(choice.get("name", "")))
    if kind in ("auto", "none"):
        fields["tool_choice"] = kind
    elif kind == "any":
        fields["tool_choice"] = "required"
    elif kind == "tool" and name in functions:
        fields["tool_choice"] = {"type": "function", "function": {"name": name}}
    if choice.get("disable_parallel_tool_use") is True:
        fields["parallel_tool_calls"] = False
    return fields


def openai_reasoning_fields(body: dict, quirks: dict, model: str) -> dict:
    """The provider's own way of asking for reasoning, per its preset: reasoning_effort on the
    model's scale (OpenAI, Groq, xAI), thinking and the effort as asked (DeepSeek, which maps
    each to its own and thinks unless told not to), reasoning (OpenRouter: the budget when one
    was given, else the effort); with thinking turned off, the least the model does."""
    effort = thinking_effort(body)
    style = quirks["reasoning_style"]
    if style == "deepseek":
        return {"thinking": {"type": "enabled"}, "reasoning_effort": effort} if effort else {
            "thinking": {"type": "disabled"}}
    if effort is None:
        off = thinking_off_level(body, quirks, model)
        if not off:
            return {}
        return {"reasoning_effort": off} if style == "effort" else {"reasoning": {"effort": off}}
    if style is None:
        return {}
    level = provider_effort(effort, quirks["effort_scales"], model)
    if style == "effort":
        return {"reasoning_effort": level} if level else {}
    budget = dict_of(body.get("thinking")).get("budget_tokens")
    return {"reasoning": {"max_tokens": budget} if isinstance(budget, int) else {"effort": level}}


def openai_response_format(body: dict) -> dict:
    """A JSON-schema output format as response_format."""
    schema = requested_output_schema(body)
    if schema is None:
        return {}
    return {"response_format": {"type": "json_schema", "json_schema": {
        "name": "structured_output", "schema": schema, "strict": True}}}


def json_mode_instead(request: dict) -> None:
    """For a server that takes JSON mode only (DeepSeek, which then wants "json" said): JSON
    mode, with the schema said at the end of the system message."""
    said = "Answer with one JSON object that follows this JSON schema: " + JSON_TEXT(
        request["response_format"]["json_schema"]["schema"])
    messages = request["messages"]
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = joined_content(messages[0]["content"], said, False)
    else:
        messages.insert(0, {"role": "system", "content": said})
    request["response_format"] = {"type": "json_object"}


ONE_HOUR_CACHE_RE = re.compile(rb'"ttl"\s*:\s*"1h"')


def openai_cache_fields(provider: Provider, model: str, request: Request) -> dict:
    """prompt_cache_key from Claude Code's session id (a digest with the provider's name, never
    the client's own string), and 24-hour retention when the request asks for an hour-long
    cache and the model keeps one that long; for providers that take them."""
    quirks = provider.quirks
    azure = quirks["azure"]
    if not quirks["prompt_cache_key"] or (azure is not None and azure["api_version"] != "v1"):
        return {}
    fields = {}
    session = request.headers.get(SESSION_ID_HEADER)
    if session:
        digest = hashlib.sha256(("%s\0%s" % (provider.name, session)).encode()).hexdigest()
        fields["prompt_cache_key"] = "ccpx-" + digest[:40]
    if quirk_holds(quirks["cache_retention_models"], model) and ONE_HOUR_CACHE_RE.search(
            request.body):
        fields["prompt_cache_retention"] = "24h"
    return fields


def openai_endpoint_url(base_url: str, endpoint: str = "chat/completions") -> str:
    """…/{endpoint} from a base (…/v1) or from a full endpoint URL (…/chat/completions)."""
    base = base_url.rstrip("/")
    for suffix in OPENAI_ENDPOINTS:
        if base.endswith("/" + suffix):
            base = base[:-len(suffix) - 1]
            break
    return base + "/" + endpoint


def openai_target(provider: Provider, model: str, endpoint: str) -> tuple:
    """(URL, the model's name in the body) of an OpenAI API endpoint at the provider. At an
    Azure resource: the v1 API's path, or a dated api_version's (a deployment's path for Chat
    Completions), with the model's deployment name (https://learn.microsoft.com/azure/
    ai-foundry/openai/api-version-lifecycle, checked 2026-12-05)."""
    azure = provider.quirks["azure"]
    if azure is None:
        return openai_endpoint_url(provider.base_url, endpoint), model
    deployment = azure["deployments"].get(model, model)
    base = provider.base_url.rstrip("/") + "/openai"
    if azure["api_version"] == "v1":
        return "%s/v1/%s" % (base, endpoint), deployment
    if endpoint == "chat/completions":
        endpoint = "deployments/%s/chat/completions" % urllib.parse.quote(deployment, safe="")
    return "%s/%s?api-version=%s" % (base, endpoint, urllib.parse.quote(
        azure["api_version"], safe="")), deployment


def openai_request_headers(provider: Provider) -> dict:
    """Headers of an OpenAI API call: the key as Bearer (as api-key at Azure), extra headers."""
    headers = {"content-type": "application/json", "user-agent": USER_AGENT}
    if provider.api_key:
        if provider.quirks["azure"] is not None:
            headers["api-key"] = provider.api_key
        else:
            headers["authorization"] = "Bearer " + provider.api_key
    headers.update(provider.headers)
    return headers


# 9.3.3 The answer: text, reasoning, calls, usage, stop reason, errors
# .............................................................................

def anthropic_message_from_openai(data: dict, context) -> dict:
    """An Anthropic message from a Chat Completions answer: reasoning as thinking, text,
    refusal as text, tool calls as tool_use blocks."""
    choice = openai_choice(data, context.provider)
    message = dict_of(choice.get("message"))
    content, text = openai_thinking_and_text(message, context)
    calls = openai_calls(message)
    content, text_calls = with_text_calls(content, context) if not calls else (content, False)
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        content.append({"type": "text", "text": refusal})
    whole = choice.get("finish_reason") != "length"        # cut calls are not mended
    for call in calls:
        signature = google_signature(call)
        if signature:                       # Gemini's OpenAI-compatible API: it must come back
            content.append({"type": "thinking", "thinking": "",
                            "signature": GEMINI_SIGNATURE_PREFIX + signature})
        content.append(anthropic_tool_use(call, context, whole))
    results, citations = openai_search_results(message.get("annotations"), text)
    content = with_search_blocks(content, results, citations, context.search_query or "")
    stop_sequence = matched_stop_sequence(choice)
    stop_reason = "refusal" if refusal else openai_stop_reason(
        choice.get("finish_reason"), bool(calls) or text_calls, stop_sequence)
    usage = anthropic_usage_from_openai(data.get("usage")) if data.get("usage") \
        else context.estimated_usage(sum(len(json.dumps(block)) for block in content))
    note_reported_cost(data.get("usage"), context)
    return new_message(context.model, content, stop_reason, usage, stop_sequence)


def with_text_calls(content: list, context) -> tuple:
    """(the blocks, whether a call was read) with the tool calls the provider left in the
    text read as tool_use blocks (see TextToolCalls)."""
    reader = text_tool_calls(context)
    if reader is None:
        return content, False
    blocks = []
    for block in content:
        blocks += text_call_blocks(reader, block["text"], context) \
            if block["type"] == "text" else [block]
    return blocks, reader.found


def text_call_blocks(reader: TextToolCalls, text: str, context) -> list:
    """The text and tool_use blocks of a text the reader splits (see TextToolCalls)."""
    return [{"type": "text", "text": piece} if kind == "text" else {
        "type": "tool_use", "id": random_id("toolu_"), "name": context.tool_name(piece[0]),
        "input": piece[1]} for kind, piece in reader.split(text) + reader.flush()]


def failed_generation(body) -> str | None:
    """What the model wrote when the server could not read it as the tool call it took it for:
    Groq's 400 `tool_use_failed`, the text as `failed_generation`. Claude Code answers a 400
    by stopping, its compaction too, where the text was often a fine answer (the summary)."""
    try:
        error = dict_of(dict_of(json.loads(body or b"")).get("error"))
    except (ValueError, RecursionError):
        return None
    text = error.get("failed_generation")
    return text if error.get("code") == "tool_use_failed" and isinstance(text, str) \
        and text.strip() else None


def message_of_generation(text: str, context) -> dict | None:
    """The client's message for a generation the server refused as a failed tool call: the
    calls in it that ccproxy reads (see TextToolCalls), the rest as text; or, where it wrote a
    call ccproxy cannot read either, None: asked again, the model mostly writes it right."""
    reader = TextToolCalls(context.tool_schemas)
    content = text_call_blocks(reader, text, context)
    if not reader.found and TEXT_TOOL_CALL_RE.search(text):
        return None
    return new_message(context.model, content, "tool_use" if reader.found else "end_turn",
                       context.estimated_usage(len(text)))


def google_signature(call: dict) -> str:
    """The thought signature Gemini's OpenAI-compatible API gives a tool call, or ""."""
    return str_of(dict_of(dict_of(call.get("extra_content")).get("google")).get(
        "thought_signature"))


def openai_choice(data, provider: Provider) -> dict:
    """The first choice of a Chat Completions answer; a 502 (or the error the answer holds)
    when it has none."""
    if not isinstance(data, dict):
        raise UpstreamError("%s: the answer is not a JSON object" % provider.name)
    choices = list_of(data.get("choices"))
    if not choices:
        if data.get("error"):
            raise openai_error(provider, data["error"])
        raise UpstreamError("%s: the answer has no choices" % provider.name)
    return choices[0] if isinstance(choices[0], dict) else {}


def openai_thinking_and_text(message: dict, context) -> tuple:
    """(the thinking and text blocks of a Chat Completions message, its text): reasoning
    (with OpenRouter's reasoning_details on the signature), Mistral's chunks, the content (what
    opens it as <think>…</think> as thinking: see ThinkTags)."""
    content = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    details = [d for d in list_of(message.get("reasoning_details")) if isinstance(d, dict)]
    if (isinstance(reasoning, str) and reasoning) or details:
        content.append({"type": "thinking", "thinking": reasoning if isinstance(reasoning, str)
                        else "", "signature": reasoning_details_signature(details)
                        if details else thinking_signature(context.provider.name)})
    text = message.get("content")
    if isinstance(text, list):                        # Mistral: thinking and text chunks
        chunks = content_chunks(text, context.wants_thinking)
        content += [{"type": "thinking", "thinking": t, "signature": thinking_signature(
            context.provider.name)} for kind, t in chunks if kind == "thinking"]
        text = "".join(t for kind, t in chunks if kind == "text")
    pieces = think_pieces(text, context) if isinstance(text, str) else None
    if pieces is not None:
        content += [{"type": "thinking", "thinking": piece, "signature": thinking_signature(
            context.provider.name)} for kind, piece in pieces if kind == "thinking"]
        text = "".join(piece for kind, piece in pieces if kind == "text")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    return content, text


def openai_calls(message: dict) -> list:
    """A Chat Completions message's tool calls (or its one legacy function_call)."""
    calls = [c for c in list_of(message.get("tool_calls")) if isinstance(c, dict)]
    legacy = dict_of(message.get("function_call"))
    if not calls and isinstance(legacy.get("name"), str) and legacy["name"]:
        calls = [{"function": legacy}]                # an empty one is no call
    return calls


def content_chunks(content: list, wants_thinking: bool) -> list:
    """(kind, text) of content given as chunks: text chunks, and the thinking chunks Mistral's
    reasoning models send ({"type": "thinking", "thinking": [{"type": "text", …}]},
    https://docs.mistral.ai/capabilities/reasoning), kept when the request asked for thinking."""
    found = []
    for chunk in content:
        chunk = dict_of(chunk)
        if chunk.get("type") == "thinking" and wants_thinking:
            inner = chunk.get("thinking")
            texts = [inner] if isinstance(inner, str) else [
                dict_of(item).get("text") for item in list_of(inner)]
            found += [("thinking", t) for t in texts if isinstance(t, str) and t]
        elif isinstance(chunk.get("text"), str) and chunk["text"] \
                and chunk.get("type") != "thinking":
            found.append(("text", chunk["text"]))
    return found


def anthropic_tool_use(call: dict, context, mend: bool = True) -> dict:
    """A tool_use block from an OpenAI tool call."""
    function = call.get("function") if isinstance(call.get("function"), dict) else {}
    return {"type": "tool_use", "id": tool_use_id(call.get("id")),
            "name": context.tool_name(function.get("name")),
            "input": tool_input_from_arguments(function.get("arguments"), mend)}


def openai_search_results(annotations, text) -> tuple:
    """(results, citations) of url_citation annotations (OpenAI's search models, OpenRouter's
    web search): each URL once with its title, and a citation of the text each one marks."""
    results, citations, seen = [], [], set()
    text = text if isinstance(text, str) else ""
    for annotation in list_of(annotations):
        cited = dict_of(dict_of(annotation).get("url_citation"))
        url = cited.get("url")
        if not isinstance(url, str) or not url:
            continue
        title = cited.get("title") if isinstance(cited.get("title"), str) else url
        if url not in seen:
            seen.add(url)
            results.append((url, title))
        start, end = cited.get("start_index"), cited.get("end_index")
        span = text[start:end] if isinstance(start, int) and isinstance(end, int) else ""
        citations.append(search_citation(url, title, span))
    return results, citations


def tool_input_from_arguments(arguments, mend: bool = True) -> dict:
    """A tool_use input object from OpenAI arguments, whatever shape they came in (a JSON
    string, a string inside a string, an object, JSON to mend unless mend is false: see
    repaired_json_object)."""
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):
        value = (mend and (repaired_json_object(arguments) or repeated_json_object(arguments))
                 or (None, None))[1]
    if isinstance(value, str):
        return tool_input_from_arguments(value, mend)
    if isinstance(value, dict):
        return value
    log.warning("tool arguments are not a JSON object; passed as {\"arguments\": …}")
    return {"arguments": arguments}


def note_reported_cost(usage, context: TranslationContext) -> None:
    """Record what an answer cost where its provider reports it in usage, a figure that wins
    over any price table. OpenRouter (openrouter.ai/docs/use-cases/usage-accounting, checked
    2026-12-05): cost, in credits, which are US dollars; with the user's own provider key
    (is_byok) cost is only OpenRouter's fee, and the provider's own charge to that key is
    cost_details.upstream_inference_cost (without is_byok that figure is already in cost)."""
    usage = dict_of(usage)
    cost = usage.get("cost")
    if context.record is None or not context.provider.quirks["reports_cost"] \
            or not is_amount(cost):
        return
    upstream = dict_of(usage.get("cost_details")).get("upstream_inference_cost")
    if usage.get("is_byok") is True and is_amount(upstream):
        cost += upstream
    context.record["reported_cost"] = float(cost)


MAX_REPORTED_COST = 1e6               # US dollars: more than any one answer could cost


def is_amount(value) -> bool:
    """A sum of money from upstream JSON one answer could cost: a number, not negative, less
    than MAX_REPORTED_COST (so that no total can overflow to infinity)."""
    return is_number(value) and 0 <= value < MAX_REPORTED_COST


def anthropic_usage_from_openai(usage) -> dict:
    """Anthropic usage from OpenAI usage: cache reads counted apart from input (Anthropic's
    input_tokens excludes them; OpenAI's prompt_tokens includes them)."""
    usage = dict_of(usage)
    details = dict_of(usage.get("prompt_tokens_details"))
    prompt = count_of(usage.get("prompt_tokens"))
    cache_read = min(count_of(details.get("cached_tokens")) or count_of(
        usage.get("prompt_cache_hit_tokens")), prompt)
    cache_write = min(count_of(details.get("cache_write_tokens")), prompt - cache_read)
    reasoning = count_of(dict_of(usage.get("completion_tokens_details")).get("reasoning_tokens"))
    output = output_with_reasoning(usage, prompt, count_of(usage.get("completion_tokens")),
                                   reasoning)
    return anthropic_usage(prompt - cache_read - cache_write, output, cache_read, cache_write,
                           reasoning)


def output_with_reasoning(usage: dict, prompt: int, output: int, reasoning: int) -> int:
    """The output tokens of an OpenAI-style usage, its reasoning among them. OpenAI counts the
    reasoning within completion_tokens (and output_tokens); xAI counts it apart, billed as output
    all the same (its total_tokens is the prompt, the completion and the reasoning: issues of
    vercel/ai#12425, inspect_ai#5528): the total tells which."""
    if reasoning and count_of(usage.get("total_tokens")) == prompt + output + reasoning:
        return output + reasoning
    return output


REASONING_DETAILS_PREFIX = PROXY_SIGNATURE_PREFIX + "rd."


def reasoning_details_signature(details: list) -> str:
    """A thinking block's signature carrying the reasoning_details an OpenAI-compatible host
    returned (OpenRouter: signed or encrypted reasoning, https://openrouter.ai/docs/use-cases/
    reasoning-tokens#preserving-reasoning-blocks), so they go back with the next turn."""
    return REASONING_DETAILS_PREFIX + base64.urlsafe_b64encode(json_bytes(details)).decode()


def reasoning_details_of(signature) -> list:
    """The reasoning_details a thinking block's signature carries, or [] when none."""
    if not isinstance(signature, str) or not signature.startswith(REASONING_DETAILS_PREFIX):
        return []
    try:
        details = json.loads(base64.urlsafe_b64decode(signature[len(REASONING_DETAILS_PREFIX):]))
    except (ValueError, RecursionError):
        return []
    return [d for d in list_of(details) if isinstance(d, dict)]


def merge_reasoning_details(kept: list, pieces: list) -> list:
    """Streamed reasoning_details pieces added to those kept: a piece with the index of a kept
    one extends its text and summary and brings its other fields (signature, data)."""
    by_index = {d.get("index", n): d for n, d in enumerate(kept)}
    for piece in pieces:
        index = piece.get("index", len(by_index))
        detail = by_index.setdefault(index, {})
        for key, value in piece.items():
            if key in ("text", "summary") and isinstance(value, str) and \
                    isinstance(detail.get(key), str):
                detail[key] += value
            elif value is not None:
                detail[key] = value
    return list(by_index.values())


def openai_stop_reason(finish_reason, made_calls: bool, stop_sequence=None) -> str:
    """The stop_reason of a finish_reason: tool_use whenever calls were made (some servers say
    "stop" after calls), stop_sequence when the server named the stop string that matched,
    refusal for a content filter, end_turn for anything unknown; max_tokens for an answer cut
    short, calls or not (Claude Code runs a cut call whose input parses)."""
    if made_calls and finish_reason != "length":
        return "tool_use"
    if stop_sequence is not None:
        return "stop_sequence"
    reason = OPENAI_STOP_REASONS.get(finish_reason, "end_turn") \
        if isinstance(finish_reason, str) else "end_turn"
    return "end_turn" if reason == "tool_use" else reason


def matched_stop_sequence(choice: dict) -> str | None:
    """The stop string that ended a choice, where the server says which (vLLM and SGLang put
    it in the choice's stop_reason; a number there is a token id, not a string)."""
    matched = choice.get("stop_reason")
    return matched if choice.get("finish_reason") == "stop" and isinstance(matched, str) \
        and matched else None


def openai_error(provider: Provider, error, status: int = 502) -> ProxyError:
    """An error object inside a 200 answer or a stream as the client's error, its status
    from the error's code when it is an HTTP status."""
    error = error if isinstance(error, dict) else {"message": str(error)}
    code = error.get("code")
    if isinstance(code, str) and code.isdigit():
        code = int(code)
    if isinstance(code, int) and 400 <= code < 600:
        status = CLIENT_STATUS_BY_UPSTREAM_STATUS.get(code, 500 if code >= 500 else 400)
    message = "%s: %s" % (provider.name, error.get("message") or json.dumps(error))
    return unreadable_call(error_for_status(status, provider.masker.text(message)), provider)


# 9.3.4 The stream
# .............................................................................

PLAIN_CHUNK_KEYS = frozenset(("id", "object", "created", "model", "choices", "usage",
                              "system_fingerprint", "service_tier", "provider", "obfuscation"))
PLAIN_CHOICE_KEYS = frozenset(("index", "delta", "finish_reason", "logprobs"))
PLAIN_DELTA_KEYS = frozenset(("content", "role"))


def plain_text_delta(chunk: dict) -> str | None:
    """The text of a chunk that carries nothing but text (most of every stream; its usage, when
    asked for, null until the last chunk), else None: the common case, told apart at a glance."""
    choices = chunk.get("choices")
    if choices.__class__ is not list or len(choices) != 1 or not chunk.keys() <= PLAIN_CHUNK_KEYS \
            or chunk.get("usage") is not None:
        return None
    choice = choices[0]
    delta = choice.get("delta") if choice.__class__ is dict else None
    if delta.__class__ is not dict or choice.get("finish_reason") is not None \
            or not delta.keys() <= PLAIN_DELTA_KEYS or not choice.keys() <= PLAIN_CHOICE_KEYS:
        return None
    text = delta.get("content")
    return text if text.__class__ is str else None


def learnable_chunk(chunk: dict) -> bool:
    """Whether a text-only chunk's only "content" key is its delta's (every other value a plain
    one, no logprobs), so that a PlainChunkTemplate may learn from it."""
    choice = chunk["choices"][0]
    values = [v for k, v in chunk.items() if k != "choices"] + [
        choice.get("index"), choice["delta"].get("role")]
    return choice.get("logprobs") is None and all(
        value is None or value.__class__ in (str, int, float, bool) for value in values)


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ThinkTags:
    """Reasoning a server leaves in the answer's text, as `<think>…</think>` at its start
    (Ollama and vLLM serving Qwen3 or DeepSeek-R1 without a reasoning parser): the text as it
    streams in, split into ("thinking" or "text", piece), the tags and the whitespace around
    them dropped. Text that does not open with the tag is text as it came; `passing` once
    there is nothing more to split. A model whose chat template opens the thinking itself
    (Qwen3's Thinking models, DeepSeek-R1 and V4: the prompt ends with `<think>`) writes only
    its end: `opened` says the answer begins in thinking (learned: see LoneThinkClose)."""

    def __init__(self, opened: bool = False):
        self._state = "start"         # start, thinking, answer (its leading space dropped), text
        self._held = ""
        self._thought = False         # whether thinking has been given (its leading space gone)
        self._opened = opened
        self._thoughts = [] if opened else None     # an opened thinking, kept until it ends

    @property
    def passing(self) -> bool:
        return self._state == "text"

    def split(self, text: str) -> list:
        pieces = self._split(text)
        if self._thoughts is not None:
            self._thoughts += [piece for kind, piece in pieces if kind == "thinking"]
        return pieces

    def _split(self, text: str) -> list:
        held, self._held = self._held + text, ""
        if self._state == "start":
            opening = held.lstrip()
            if THINK_OPEN.startswith(opening):          # "", "<", "<th", …: not yet told
                self._held = held
                return []
            if not opening.startswith(THINK_OPEN) and not self._opened:
                self._state = "text"
                return [("text", held)]
            self._state = "thinking"
            held = opening[len(THINK_OPEN):] if opening.startswith(THINK_OPEN) else opening
        if self._state == "thinking":
            return self._thinking(held)
        answer = held.lstrip() if self._state == "answer" else held
        self._state = "text" if answer else "answer"
        return [("text", answer)] if answer else []

    def _thinking(self, held: str) -> list:
        held = held if self._thought else held.lstrip()
        end = held.find(THINK_CLOSE)
        if end < 0:                   # held back: what may begin the tag, and space before it
            keep = next((n for n in range(len(THINK_CLOSE) - 1, 0, -1)
                         if held.endswith(THINK_CLOSE[:n])), 0)
            thought = held[:len(held) - keep].rstrip()
            self._held, self._thought = held[len(thought):], self._thought or bool(thought)
            return [("thinking", thought)] if thought else []
        self._state, self._thoughts = "answer", None
        pieces = [("thinking", held[:end].rstrip())] if held[:end].strip() else []
        return pieces + self._split(held[end + len(THINK_CLOSE):])

    def flush(self, ended: bool = False) -> list:
        """What is held at the answer's end (or before its first tool call). An opened thinking
        that never ended, in an answer that ended by itself without a call (`ended`), was the
        answer of a model that did not think (its template closed the tag): given as text too."""
        held, self._held = self._held, ""
        pieces = [("thinking" if self._state == "thinking" else "text", held)] \
            if held.strip() else []
        if ended and self._state == "thinking" and self._thoughts:
            pieces.append(("text", "".join(self._thoughts) + held))
        return pieces


class LoneThinkClose:
    """An answer's text watched for a `</think>` with no `<think>` before it: the model's
    template opened the thinking (vLLM or SGLang without a reasoning parser,
    vllm-project/vllm#31045), so its answers begin in thinking. A reader needs a look only at
    text that holds a `<`, or follows one (`tail`)."""

    __slots__ = ("tail",)

    def __init__(self):
        self.tail = ""                # the text's last characters, where a tag may begin

    def sees(self, text: str, context) -> "LoneThinkClose | None":
        """Itself, or None once the text has said (a lone `</think>`: learned for the model;
        a `<think>` first: nothing to learn)."""
        seen = self.tail + text
        if closes_alone(seen):
            learns_opened_thinking(context)
        if THINK_CLOSE in seen or THINK_OPEN in seen:
            return None
        last = seen.rfind("<", max(len(seen) - len(THINK_CLOSE) + 1, 0))
        self.tail = seen[last:] if last >= 0 else ""
        return self


def closes_alone(text: str) -> bool:
    """Whether text holds a `</think>` with no `<think>` before it."""
    closing = text.find(THINK_CLOSE)
    return closing >= 0 and not 0 <= text.find(THINK_OPEN) < closing


def lone_think_close(context) -> LoneThinkClose | None:
    """A watch for a lone `</think>` on a server whose models' calls are read from the text
    (one that may parse none of its model's output), for a model not known to open in
    thinking; None where none is kept."""
    provider = context.provider
    if not provider.quirks["text_tool_calls"] or context.routed_model in provider.opens_thinking:
        return None
    return LoneThinkClose()


def think_pieces(text: str, context) -> list | None:
    """A whole answer's text split as ThinkTags splits a stream (its thinking opened at the
    start, or by the template: a lone `</think>`); None when it is text as it came."""
    if not text.lstrip().startswith(THINK_OPEN):
        if THINK_CLOSE not in text:
            return None
        watch = lone_think_close(context)
        if watch is not None:
            watch.sees(text, context)           # a lone </think> is learned
        if context.routed_model not in context.provider.opens_thinking:
            return None
    tags = ThinkTags(opened=True)
    return tags.split(text) + tags.flush()


def learns_opened_thinking(context) -> None:
    """Where an answer's text closed a thinking it never opened (see LoneThinkClose), the
    model's answers are taken to begin in thinking from then on (a stream that said so has
    gone out as text). Shown in /status as opens_thinking."""
    provider, model = context.provider, context.routed_model
    if len(provider.opens_thinking) >= MAX_MODELS_REMEMBERED:
        provider.opens_thinking.clear()
    provider.opens_thinking.add(model)
    log.info("%s: %s begins its answers in thinking and writes only </think> (a server without "
             "a reasoning parser); its answers are read so from now on", provider.name, model)


# Tool calls a server leaves in the text when it does not parse its model's (vLLM or SGLang
# without --tool-call-parser, or with another model's, vllm-project/vllm#21571, #46863):
# Hermes' and Qwen's <tool_call>{"name": …, "arguments": {…}}</tool_call>, and Qwen3-Coder's
# <tool_call><function=NAME><parameter=P>VALUE</parameter>…</function></tool_call>, its outer
# tags or its closing ones at times left out.
TEXT_CALL_CLOSERS = {"<tool_call>": "</tool_call>", "<function=": "</function>"}
TEXT_CALL_HELD_CHARS = 1 << 20        # a call still open past this much was no call: text
TEXT_CALL_SPACE_CHARS = 256           # space held to see whether a call follows, at most
XML_FUNCTION_RE = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|\Z)", re.S)
XML_PARAMETER_RE = re.compile(
    r"<parameter=([^>\s]+)>(.*?)(?:</parameter>|(?=<parameter=)|(?=</function>)|\Z)", re.S)


class TextToolCalls:
    """The answer's text as it streams in, split into ("text", piece) and ("call", (name,
    input)): a tool call the server left in the text (TEXT_CALL_CLOSERS) that names a tool of
    the request and whose input reads as an object becomes a call; everything else, such a
    call that does not read too, stays text as it came. Text that may begin a call is held
    until it is seen to be one or not, and space at the end of a piece until what follows
    it: the space around a call is dropped. A call inside a ``` code block is an example (a
    model explaining the format), and stays text. A call being written is kept in pieces and
    only its newest looked through, so a long one costs no more than its length."""

    def __init__(self, tools: dict):
        self._tools = tools           # each tool's name as the server knows it -> properties
        self._held = ""               # space, or what may begin a call's opening tag
        self._closer = None           # the closing tag of a call being written, and
        self._parts, self._size = [], 0     # its pieces so far and their size
        self._tail = ""               # its last characters, where the closing tag may begin
        self._after_call = False      # the space after a call is dropped
        self._fences = 0              # ``` fences in the text given: odd inside a code block
        self._ticks = ""              # backticks at its end, which a fence may go on from
        self.found = False            # whether a call was read

    def split(self, text: str) -> list:
        if self._closer is not None:
            return self._writing(text)
        if not self._held and "<" not in text:
            given = len(text.rstrip())            # the space at its end waits for what follows
            self._held = text[given:]
            return self._text(text[:given])
        held, self._held, pieces = self._held + text, "", []
        while held:
            start, opener = first_text_call(held)
            if opener is None:
                return pieces + self._hold(held, len(held[:opener_start(held)].rstrip()))
            end = held.find(TEXT_CALL_CLOSERS[opener], start)
            if end < 0:
                given = len(held[:start].rstrip())
                self._closer, self._tail = TEXT_CALL_CLOSERS[opener], ""
                self._parts, self._size = [], 0
                return pieces + self._text(held[:given]) + self._writing(held[given:])
            end += len(TEXT_CALL_CLOSERS[opener])
            pieces += self._piece(held[:start], held[start:end])
            held = held[end:]
        return pieces

    def flush(self) -> list:
        """What is held at the answer's end (or before a call the server parsed): a call
        whose closing tags never came, when it reads as one, else text."""
        held, self._held = self._held, ""
        if self._closer is not None:
            self._closer = None
            return self._piece("", "".join(self._parts))
        return self._text(held)

    def _hold(self, held: str, given: int) -> list:
        """held up to given as text, the rest held: space (up to TEXT_CALL_SPACE_CHARS of
        it), and what may begin a call's opening tag."""
        pieces, rest = self._text(held[:given]), held[given:]
        if len(rest) > TEXT_CALL_SPACE_CHARS:
            pieces += self._text(rest[:len(rest) - len(rest.lstrip())])
            rest = rest.lstrip()
        self._held = rest
        return pieces

    def _writing(self, text: str) -> list:
        """The next piece of a call being written: held until its closing tag."""
        window = self._tail + text
        at = window.find(self._closer)
        if at < 0:
            self._parts.append(text)
            self._size += len(text)
            self._tail = window[-(len(self._closer) - 1):]
            if self._size <= TEXT_CALL_HELD_CHARS:
                return []
            self._closer = None
            return self._text("".join(self._parts))
        end = at - len(self._tail) + len(self._closer)
        self._closer = None
        return self._piece("", "".join(self._parts) + text[:end]) + self.split(text[end:])

    def _piece(self, before: str, call_text: str) -> list:
        written = call_text.lstrip()
        call = None if self._in_code_block(before) else self._read(written)
        if call is None:
            return self._text(before + call_text)
        pieces = self._text((before + call_text[:len(call_text) - len(written)]).rstrip())
        self._after_call = self.found = True
        return pieces + [("call", call)]

    def _text(self, text: str) -> list:
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        ticks = self._ticks + text
        self._fences += ticks.count("```")
        self._ticks = "`" * ((len(ticks) - len(ticks.rstrip("`"))) % 3)
        return [("text", text)] if text else []

    def _in_code_block(self, before: str) -> bool:
        """Whether what follows the text given and `before` is inside a ``` code block, where
        a call is an example (a model explaining the format), not a call."""
        return (self._fences + (self._ticks + before).count("```")) % 2 == 1

    def _read(self, text: str):
        """(name, input) of a call written out, or None when it is none."""
        if text.startswith("<tool_call>"):
            text = text[len("<tool_call>"):]
            text = text[:-len("</tool_call>")] if text.endswith("</tool_call>") else text
            text = text.strip()
        if text.startswith("<function="):
            return self._xml_call(text)
        try:
            call = json.loads(text)
        except (ValueError, RecursionError):
            return None
        call = dict_of(call)
        name, arguments = call.get("name"), call.get("arguments", call.get("parameters", {}))
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except (ValueError, RecursionError):
            return None
        return (name, arguments) if isinstance(name, str) and name in self._tools and \
            isinstance(arguments, dict) else None

    def _xml_call(self, text: str):
        """Qwen3-Coder's <function=NAME><parameter=P>…, or a function tag around the input's
        JSON (as Llama models write one to Groq)."""
        found = XML_FUNCTION_RE.match(text)
        if found is None or found.group(1) not in self._tools:
            return None
        body, schema = found.group(2).strip(), self._tools[found.group(1)]
        if body.startswith("{"):
            try:
                arguments = json.loads(body)
            except (ValueError, RecursionError):
                return None
            return (found.group(1), arguments) if isinstance(arguments, dict) else None
        return found.group(1), {name: xml_parameter_value(value, schema.get(name))
                                for name, value in XML_PARAMETER_RE.findall(body)}


def first_text_call(text: str) -> tuple:
    """(where, opener) of the first tool call written out in text, or (-1, None)."""
    found = [(text.find(opener), opener) for opener in TEXT_CALL_CLOSERS if opener in text]
    return min(found) if found else (-1, None)


def opener_start(text: str) -> int:
    """Where text's end may begin a call's opening tag (len(text) when it may not)."""
    start = text.rfind("<")
    tail = text[start:] if start >= 0 else ""
    return start if tail and any(o.startswith(tail) for o in TEXT_CALL_CLOSERS) else len(text)


def xml_parameter_value(text: str, schema):
    """A parameter's value as Qwen3-Coder writes it (a newline on each side), as its schema
    types it: a string as written, anything else read as JSON where it reads."""
    text = text[1:] if text.startswith("\n") else text
    text = text[:-1] if text.endswith("\n") else text
    kinds = dict_of(schema).get("type")
    if kinds == "string" or (isinstance(kinds, list) and "string" in kinds):
        return text
    try:
        return json.loads(text.strip())
    except (ValueError, RecursionError):
        return text


def text_tool_calls(context: TranslationContext) -> TextToolCalls | None:
    """A reader of the tool calls the provider may leave in the text, or None when it does not
    (its quirk) or the request has no tools."""
    schemas = context.tool_schemas if context.provider.quirks["text_tool_calls"] else None
    return TextToolCalls(schemas) if schemas else None


class OpenAIStreamTranslator:
    """Sans-IO: decoded Chat Completions chunks in, Anthropic SSE events (bytes) out.

    A tool call streams live while it is the current one; a call that starts while the current
    call's arguments are not yet a whole JSON value (not even begun) is buffered and sent whole
    at the end, so interleaved indexes never send a delta to a closed block. feed() per chunk,
    done() on [DONE], finish() last.
    """

    def __init__(self, context: TranslationContext):
        self._context = context
        self._emit = EventEmitter(context)
        self._calls = {}              # call key -> {"id", "name", "arguments": [...], "sent"}
        self._latest_at = {}          # index -> key of the last call begun there, if reused
        self._finish_reason = None
        self._stop_sequence = None    # the stop string that ended the answer, when told
        self._refused = False
        self._annotations = []        # url_citation annotations of a web search
        self._details = []            # reasoning_details of the open thinking block
        self._text = []               # the answer's text, kept to quote what they cite
        self._done = False
        self._usage = None
        self.learnable_text = None    # the last chunk's text, when a template may learn it
        self._think = ThinkTags(context.routed_model in context.provider.opens_thinking)
        self._lone_close = lone_think_close(context)      # until the text has said
        self._text_calls = text_tool_calls(context)
        self._text_call_count = 0

    def feed(self, chunk: dict) -> bytes:
        text = plain_text_delta(chunk)
        self.learnable_text = text if text is not None and learnable_chunk(chunk) else None
        piece = self.feed_text(text) if text is not None else None
        if piece is not None:
            return piece
        if chunk.get("error"):
            raise openai_error(self._context.provider, chunk["error"])
        self._emit.start()
        usage = chunk.get("usage") or dict_of(chunk.get("x_groq")).get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        for choice in list_of(chunk.get("choices")):
            if isinstance(choice, dict):
                self._feed_choice(choice)
        return self._emit.take()

    def feed_text(self, text: str) -> bytes | None:
        """The events of a chunk that carries nothing but text; None when the stream cannot
        take it the short way (its message has not started, or a web search gathers text)."""
        if not self._emit.started or self._context.search_query is not None:
            return None
        if self._lone_close is not None:
            self._watch(text)
        if self._think is not None or self._text_calls is not None:
            self._split_text(text)
        elif text:
            self._emit.text(text)
        return self._emit.take()

    def done(self) -> None:
        """The upstream said [DONE]."""
        self._done = True

    def feed_event(self, event: str, payload: dict | None) -> bytes:
        """One decoded SSE event: a chunk, an error event, or [DONE] (None)."""
        if payload is None:
            self.done()
            return b""
        if event == "error" or payload.get("object") == "error":
            raise openai_error(self._context.provider, payload.get("error") or payload)
        return self.feed(payload)

    @property
    def complete(self) -> bool:
        """Whether the upstream said the answer is over (finish_reason or [DONE])."""
        return self._finish_reason is not None or self._done

    def finish(self, error: ProxyError | None = None) -> bytes:
        """The end of the stream: message_delta and message_stop, or an error event."""
        ending = failed_ending(error, self.complete, self._context.provider)
        if ending is not None:
            return ending
        self._flush_text(ended=self._finish_reason != "length" and not self._calls
                         and not self._text_call_count)
        results, citations = openai_search_results(self._annotations, "".join(self._text))
        self._emit.cite(citations)
        made_calls = bool(self._calls) or self._text_call_count > 0
        reason = "refusal" if self._refused else openai_stop_reason(
            self._finish_reason, made_calls, self._stop_sequence)
        self._emit.close(mend=reason != "max_tokens")
        for key in list(self._calls):
            if not self._calls[key]["sent"]:
                self._send_whole_call(key, mend=reason != "max_tokens")
        if results:
            self._emit.search(self._context.search_query or "", results)
        usage = anthropic_usage_from_openai(self._usage) if self._usage else None
        note_reported_cost(self._usage, self._context)
        self._emit.stop(reason, usage, self._stop_sequence)
        return self._emit.take()

    def _feed_choice(self, choice: dict) -> None:
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            self._emit.thinking(reasoning)
        details = [d for d in list_of(delta.get("reasoning_details")) if isinstance(d, dict)]
        if details:
            self._emit.thinking("")
            self._details = merge_reasoning_details(self._details, details)
            self._emit.signature = lambda kept=self._details: reasoning_details_signature(kept)
        content = delta.get("content")
        if isinstance(content, list):                 # Mistral: thinking and text chunks
            for kind, text in content_chunks(content, self._context.wants_thinking):
                (self._emit.thinking if kind == "thinking" else self._emit.text)(text)
        elif isinstance(content, str) and content:
            self._content(content)
        self._annotations += list_of(delta.get("annotations"))
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            self._refused = True
            self._emit.text(refusal)
        if delta.get("tool_calls"):
            self._flush_text()
        for position, call in enumerate(list_of(delta.get("tool_calls"))):
            if isinstance(call, dict):
                self._feed_call(call, position)
        if choice.get("finish_reason") == "error":
            raise openai_error(self._context.provider, choice.get("error") or
                               "the provider reported an error mid-stream")
        if choice.get("finish_reason"):
            self._finish_reason = choice["finish_reason"]
            self._stop_sequence = matched_stop_sequence(choice)

    def _content(self, content: str) -> None:
        if self._lone_close is not None:
            self._watch(content)
        self._split_text(content)

    def _watch(self, text: str) -> None:
        """Text that may hold a lone </think> looked through (see LoneThinkClose)."""
        watch = self._lone_close
        if "<" in text or watch.tail:
            self._lone_close = watch.sees(text, self._context)

    def _split_text(self, content: str) -> None:
        """The answer's text, what opens it as <think>…</think> as thinking (see ThinkTags)."""
        if self._think is None:
            self._pieces((("text", content),))
            return
        self._pieces(self._think.split(content))
        if self._think.passing:
            self._think = None

    def _flush_text(self, ended: bool = False) -> None:
        """Text held back to be told apart (thinking, a tool call), given out as what it is:
        at the answer's end (`ended`: by itself, without a call), or before a tool call the
        server parsed."""
        if self._think is not None:
            self._pieces(self._think.flush(ended))
        if self._text_calls is not None:
            self._calls_or_text(self._text_calls.flush())

    def _pieces(self, pieces) -> None:
        for kind, piece in pieces:
            if kind == "thinking":
                self._emit.thinking(piece)
            elif self._text_calls is not None:
                self._calls_or_text(self._text_calls.split(piece))
            else:
                self._answer_text(piece)

    def _answer_text(self, piece: str) -> None:
        self._emit.text(piece)
        if self._context.search_query is not None:
            self._text.append(piece)

    def _calls_or_text(self, pieces) -> None:
        """Text, and the tool calls the server left in it (see TextToolCalls), as blocks."""
        for kind, piece in pieces:
            if kind == "text":
                self._answer_text(piece)
                continue
            self._text_call_count += 1
            self._emit.open_tool(("text call", self._text_call_count), random_id("toolu_"),
                                 self._context.tool_name(piece[0]))
            self._emit.tool_arguments(JSON_TEXT(piece[1]))
            self._emit.close()

    def _call_key(self, call: dict, function: dict, position: int):
        """The key of the call a tool_calls delta continues or begins: its index (else its id,
        else its place in the delta), unless it begins a call (a name) with another id than the
        call at that index. Ollama, SGLang and vLLM builds send every parallel call at index 0
        (ollama/ollama#15457), each with its own id: read by index alone, the second call's
        arguments joined the first's. A fragment with another id and no name goes on with the
        call (Poolside's API gives a call's later fragments an id of their own)."""
        index = call.get("index", call.get("id") or position)
        index = index if isinstance(index, (int, str)) else position
        key = self._latest_at.get(index, ("call", index))
        known, given = self._calls[key]["id"] if key in self._calls else None, call.get("id")
        if known and given and function.get("name") and isinstance(given, str) and given != known:
            key = self._latest_at[index] = ("call", index, given)
        return key

    def _feed_call(self, call: dict, position: int) -> None:
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        key = self._call_key(call, function, position)
        arguments = function.get("arguments")
        if isinstance(arguments, dict):
            arguments = JSON_TEXT(arguments)
        state = self._calls.get(key)
        if state is None:
            state = self._calls[key] = {"id": None, "name": None, "arguments": [], "sent": False,
                                        "signature": "", "chars": 0}
        if isinstance(arguments, str) and state["chars"]:
            arguments = fresh_arguments(state, arguments)
        state["id"] = state["id"] or call.get("id")
        state["signature"] = state["signature"] or google_signature(call)
        state["name"] = state["name"] or function.get("name") or None
        if isinstance(arguments, str) and arguments:
            if self._emit.open == key:
                self._emit.tool_arguments(arguments)
                state["arguments"].append(arguments)
                state["chars"] += len(arguments)
                return
            if state["sent"]:
                log.warning("%s: arguments for a finished tool call were dropped",
                            self._context.provider.name)
                return
            state["arguments"].append(arguments)
            state["chars"] += len(arguments)
        if not state["sent"] and state["name"] and self._may_start_call():
            self._start_call(key)

    def _may_start_call(self) -> bool:
        """A new call may open now unless the open call's arguments are not yet a whole JSON
        value: incomplete, or not begun (their fragments may still come, interleaved). They are
        read only when they end as an object (or a string holding one) may: a long call left
        open while another's fragments come is not read again at every fragment."""
        if self._emit.open not in self._calls:
            return True
        arguments = self._calls[self._emit.open]["arguments"]
        if not next((piece.rstrip() for piece in reversed(arguments) if piece.strip()),
                    "").endswith(("}", '"')):
            return False
        try:
            json.loads("".join(arguments))
        except (ValueError, RecursionError):
            return False
        return True

    def _start_call(self, key) -> None:
        state = self._calls[key]
        state["sent"] = True
        if state["signature"]:              # Gemini's OpenAI-compatible API: it must come back
            self._emit.thinking("")
            self._emit.signature = GEMINI_SIGNATURE_PREFIX + state["signature"]
        self._emit.open_tool(key, tool_use_id(state["id"]),
                             self._context.tool_name(state["name"] or "unknown_tool"))
        if state["arguments"]:
            self._emit.tool_arguments("".join(state["arguments"]))

    def _send_whole_call(self, key, mend: bool) -> None:
        self._start_call(key)
        self._emit.close(mend)


# -----------------------------------------------------------------------------
# 9.4 OpenAI Responses
# -----------------------------------------------------------------------------
# https://platform.openai.com/docs/api-reference/responses (checked 2026-12-05). Stateless:
# store false, and each reasoning item (encrypted) rides on a thinking block's signature to the
# client and back, restored as a `reasoning` input item with its id on the next turn.

RESPONSES_SIGNATURE_PREFIX = PROXY_SIGNATURE_PREFIX + "resp."
RESPONSES_STOP_REASONS = {"max_output_tokens": "max_tokens", "content_filter": "refusal"}


class OpenAIResponsesProtocol(OpenAIChatProtocol):
    """OpenAI's Responses API (type openai-responses; an openai or azure provider's models that
    only it serves): Chat Completions' tool names, model list and coverage, its own request and
    answers."""

    name = "openai-responses"

    def messages_request(self, provider, model, request, body) -> UpstreamRequest:
        payload = responses_request_from_anthropic(body, provider, model)
        payload.update(openai_cache_fields(provider, model, request))
        url, payload["model"] = openai_target(provider, model, "responses")
        return UpstreamRequest(url, openai_request_headers(provider), json_bytes(payload))

    def can_search(self, provider, model) -> bool:
        return provider.quirks["responses_search"]

    def message(self, answer, context) -> dict:
        return anthropic_message_from_responses(answer, context)

    def stream_translator(self, context):
        return ResponsesStreamTranslator(context)


def responses_request_from_anthropic(body: dict, provider: Provider, model: str) -> dict:
    """The Responses body for a Messages body: instructions, input items, function tools, the
    output cap, reasoning and output format; nothing stored at the provider."""
    quirks = provider.model_quirks(model)
    request = {"model": model, "input": responses_input_from_anthropic(body, quirks),
               "store": False, "include": ["reasoning.encrypted_content"]}
    instructions = text_of_system(body.get("system"))
    if instructions:
        request["instructions"] = instructions
    cap = provider.output_cap(model)
    request["max_output_tokens"] = min(body["max_tokens"], cap) if cap else body["max_tokens"]
    if not quirk_holds(quirks["reasoning_models"], model):
        request.update((key, body[key]) for key in ("temperature", "top_p") if isinstance(
            body.get(key), (int, float)) and not isinstance(body.get(key), bool))
    if body.get("stream") is True:
        request["stream"] = True
    request.update(responses_tool_fields(body, quirks))
    if any(tool["type"] == "web_search" for tool in request.get("tools", ())):
        request["include"].append("web_search_call.action.sources")   # every page it read
    request.update(responses_reasoning(body, quirks, model))
    response_format = openai_response_format(body).get("response_format")
    if response_format:
        request["text"] = {"format": dict(response_format["json_schema"], type="json_schema")}
    user = plain_user_id(body.get("metadata"))
    if user:
        request["safety_identifier"] = user
    return request


def responses_tool_fields(body: dict, quirks: dict) -> dict:
    """tools (the functions, and OpenAI's web_search for the web_search server tool where the
    provider runs it), tool_choice and parallel_tool_calls, and max_tool_calls for the search's
    max_uses. A forced web_search, the only tool (Claude Code 2.1.197's search request), is
    `required`: the API takes no choice of a named hosted tool."""
    functions = [dict(tool["function"], type="function", strict=False)
                 for tool in openai_tools_from_anthropic(offered_tools(body), quirks)]
    search = web_search_tool(body) if quirks["responses_search"] else None
    tools = functions + ([responses_search_tool(search)] if search else [])
    if not tools:
        return {}
    fields = dict(openai_tool_choice(body.get("tool_choice"), {t["name"] for t in functions}),
                  tools=tools)
    if isinstance(fields.get("tool_choice"), dict):
        fields["tool_choice"] = {"type": "function",
                                 "name": fields["tool_choice"]["function"]["name"]}
    elif search and not functions and forced_tool(body) == search.get("name"):
        fields["tool_choice"] = "required"
    uses = search.get("max_uses") if search else None
    if isinstance(uses, int) and not isinstance(uses, bool) and uses > 0:
        fields["max_tool_calls"] = uses
    return fields


def forced_tool(body: dict) -> str | None:
    """The name of the tool the request's tool_choice forces, if it forces one."""
    choice = dict_of(body.get("tool_choice"))
    return choice.get("name") if choice.get("type") == "tool" else None


def responses_search_tool(tool: dict) -> dict:
    """OpenAI's web_search tool for Anthropic's (developers.openai.com/api/docs/guides/
    tools-web-search, checked 2026-12-07): allowed_domains as its filter (no scheme), the
    user's location as it came; blocked_domains it has no equivalent of (logged)."""
    search = {"type": "web_search"}
    domains = [re.sub(r"^https?://", "", domain) for domain in list_of(tool.get(
        "allowed_domains")) if isinstance(domain, str) and domain]
    if domains:
        search["filters"] = {"allowed_domains": domains}
    location = {key: value for key, value in dict_of(tool.get("user_location")).items()
                if key in ("city", "region", "country", "timezone") and isinstance(value, str)}
    if location:
        search["user_location"] = dict(location, type="approximate")
    if tool.get("blocked_domains"):
        log.info("web search blocked_domains have no OpenAI equivalent; searching without them")
    return search


def responses_reasoning(body: dict, quirks: dict, model: str) -> dict:
    """reasoning: the effort on the model's scale, with a summary to show as thinking."""
    effort = thinking_effort(body)
    if effort is None:
        off = thinking_off_level(body, quirks, model)
        return {"reasoning": {"effort": off}} if off else {}
    level = provider_effort(effort, quirks["effort_scales"], model)
    return {"reasoning": {"effort": level, "summary": "auto"}} if level else {}


def responses_input_from_anthropic(body: dict, quirks: dict) -> list:
    """The conversation as input items, in order: messages, each assistant turn's reasoning and
    function calls, each call's output paired by call_id (a missing one stood in for)."""
    items, open_calls = [], []
    for index, message in enumerate(body["messages"]):
        where = "messages[%d].content" % index
        blocks = content_blocks(message["content"])
        if message["role"] == "assistant":
            items += responses_missing_outputs(open_calls)
            turn = responses_assistant_items(blocks, quirks, where)
            open_calls = [item["call_id"] for item in turn if item.get("type") == "function_call"]
            items += turn
        elif message["role"] == "system":
            text = text_of_system(blocks)
            if text:
                items.append({"role": "system", "content": text})
        else:
            items += responses_user_items(blocks, open_calls, quirks, where)
            open_calls = []
    return items + responses_missing_outputs(open_calls)


def responses_assistant_items(blocks, quirks: dict, where: str) -> list:
    """An assistant turn as items: its text as messages, its calls as function_call items, and
    reasoning that came from the Responses API restored in place (other thinking is dropped)."""
    items, texts = [], []
    for position, block in enumerate(blocks):
        kind = block.get("type")
        readable = server_block_text(block) if kind in SERVER_BLOCK_TYPES else None
        if kind not in ASSISTANT_BLOCK_TYPES or (kind in SERVER_BLOCK_TYPES and readable is None):
            raise InvalidRequestError("%s[%d]: a %r block cannot be sent to the Responses API"
                                      % (where, position, kind))
        if readable is not None or (kind == "text" and visible_text(block.get("text"))):
            texts.append(readable if readable is not None else block["text"])
            continue
        item = responses_reasoning_item(block) if kind == "thinking" else \
            responses_function_call(block, quirks) if kind == "tool_use" else None
        if item is not None:
            items += responses_text_message(texts) + [item]
            texts = []
    return items + responses_text_message(texts)


def responses_text_message(texts: list) -> list:
    """The assistant's text so far as one message item (none when there is none)."""
    return [{"role": "assistant", "content": "\n".join(texts)}] if texts else []


def responses_function_call(block: dict, quirks: dict) -> dict:
    """A tool_use block as a function_call item."""
    return {"type": "function_call",
            "call_id": openai_tool_id(str(block.get("id", "")), quirks["tool_id_style"]),
            "name": openai_tool_name(str(block.get("name", ""))),
            "arguments": COMPACT_JSON_TEXT(block.get("input") or {})}


def responses_reasoning_item(block: dict) -> dict | None:
    """The reasoning item a thinking block carries in its signature (id included), or None
    for thinking that did not come from the Responses API."""
    signature = block.get("signature")
    if not isinstance(signature, str) or not signature.startswith(RESPONSES_SIGNATURE_PREFIX):
        return None
    try:
        kept = json.loads(base64.urlsafe_b64decode(
            signature[len(RESPONSES_SIGNATURE_PREFIX):] + "==").decode())
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(kept, dict) or not isinstance(kept.get("id"), str):
        return None
    item = {"type": "reasoning", "id": kept["id"], "summary": list_of(kept.get("summary"))}
    if isinstance(kept.get("encrypted_content"), str):
        item["encrypted_content"] = kept["encrypted_content"]
    return item


def responses_reasoning_signature(item: dict) -> str:
    """A thinking block's signature carrying a reasoning item: its id, summary and encrypted
    content."""
    kept = {key: item[key] for key in ("id", "summary", "encrypted_content") if key in item}
    return RESPONSES_SIGNATURE_PREFIX + base64.urlsafe_b64encode(
        json.dumps(kept, separators=(",", ":")).encode()).decode().rstrip("=")


def responses_user_items(blocks, open_calls: list, quirks: dict, where: str) -> list:
    """A user turn: a function_call_output per answered call (images in it too), then the
    turn's other content as one user message."""
    results, unanswered = matched_tool_results(blocks, open_calls, quirks, where)
    items, parts = [], []
    for call_id, block, text, media in results:
        if call_id is not None:
            output = [{"type": "input_text", "text": text}] + [
                responses_part(part) for part in media] if media else text
            items.append({"type": "function_call_output", "call_id": call_id, "output": output})
        else:
            parts.append({"type": "input_text", "text": unanswering_result_text(block, text)})
    items += responses_missing_outputs(unanswered)
    parts += [responses_part(part) for part in openai_user_parts(
        [b for b in blocks if b.get("type") != "tool_result"], quirks, where)]
    if parts or not items:
        items.append({"role": "user", "content": parts or "..."})
    return items


def responses_part(part: dict) -> dict:
    """A Chat Completions content part as a Responses input part."""
    if part["type"] == "image_url":
        return {"type": "input_image", "image_url": part["image_url"]["url"], "detail": "auto"}
    if part["type"] == "file":
        return dict(part["file"], type="input_file")
    return {"type": "input_text", "text": part["text"]}


def responses_missing_outputs(call_ids) -> list:
    """Stand-in outputs for calls the conversation never answered (the API wants one each)."""
    return [{"type": "function_call_output", "call_id": call_id,
             "output": INTERRUPTED_CALL_RESULT} for call_id in call_ids]


def anthropic_message_from_responses(data, context) -> dict:
    """An Anthropic message from a response object: reasoning as thinking (the item on its
    signature), text, refusal, function calls; the stop reason from status and calls."""
    if not isinstance(data, dict):
        raise UpstreamError("%s: the answer is not a JSON object" % context.provider.name)
    if data.get("status") == "failed" or data.get("error"):
        raise responses_error(context.provider, data.get("error"))
    if not isinstance(data.get("output"), list):
        raise UpstreamError("%s: the answer has no output: it is no response of the Responses "
                            "API" % context.provider.name)
    content, refused = [], False
    for item in data["output"]:
        kind = dict_of(item).get("type")
        if kind == "reasoning":
            content.append({"type": "thinking", "thinking": reasoning_text(item),
                            "signature": responses_reasoning_signature(item)})
        elif kind == "message":
            for part in map(dict_of, list_of(item.get("content"))):
                text = part.get("text") or part.get("refusal")
                refused = refused or part.get("type") == "refusal"
                if isinstance(text, str) and text:
                    content.append({"type": "text", "text": text})
        elif kind == "function_call":
            content.append(anthropic_tool_use({"id": item.get("call_id"), "function": item},
                                              context, data.get("status") != "incomplete"))
    results, citations, queries = responses_search(data["output"])
    content = with_search_blocks(content, results, citations,
                                 queries[0] if queries else context.search_query or "")
    reason = responses_stop_reason(data, any(b["type"] == "tool_use" for b in content), refused)
    usage = anthropic_usage_from_responses(data.get("usage")) if data.get("usage") else \
        context.estimated_usage(sum(len(json.dumps(block)) for block in content))
    return new_message(context.model, content, reason, usage)


def responses_search(output: list) -> tuple:
    """(results, citations, queries) of the web searches a response ran (its web_search_call
    items): each URL its text cites, with the title and the text each url_citation marks, then
    the other pages the searches read (the actions' sources and pages, their URL as title)."""
    cited, citations, read, queries = [], [], [], []
    for item in map(dict_of, output):
        if item.get("type") == "web_search_call":
            action = dict_of(item.get("action"))
            queries += [query for query in [action.get("query")] + list_of(action.get("queries"))
                        if isinstance(query, str) and query]
            read += [dict_of(source).get("url") for source in list_of(action.get("sources"))]
            read.append(action.get("url"))               # a page it opened or looked through
        elif item.get("type") == "message":
            for part in map(dict_of, list_of(item.get("content"))):
                found, marked = openai_search_results(url_citations(part), part.get("text"))
                cited += found
                citations += marked
    titles = {}
    for url, title in cited + [(url, url) for url in read if isinstance(url, str) and url]:
        titles.setdefault(url, title)
    return list(titles.items()), citations, queries


def url_citations(part: dict) -> list:
    """An output_text part's url_citation annotations, in Chat Completions' shape (the URL, title
    and indexes under "url_citation")."""
    return [{"url_citation": annotation} for annotation in map(dict_of, list_of(part.get(
        "annotations"))) if annotation.get("type") == "url_citation"]


def reasoning_text(item: dict) -> str:
    """What a reasoning item says: its summaries (or its reasoning text), in order."""
    parts = list_of(item.get("summary")) or list_of(item.get("content"))
    return "\n\n".join(str(dict_of(part).get("text") or "") for part in parts)


def responses_stop_reason(response: dict, made_calls: bool, refused: bool) -> str:
    """end_turn, tool_use, max_tokens (incomplete at max_output_tokens) or refusal."""
    if response.get("status") == "incomplete":
        reason = dict_of(response.get("incomplete_details")).get("reason")
        return RESPONSES_STOP_REASONS.get(str_of(reason), "max_tokens")
    if refused:
        return "refusal"
    return "tool_use" if made_calls else "end_turn"


def anthropic_usage_from_responses(usage) -> dict:
    """Anthropic usage from a response's: cache reads and writes counted apart from input
    (the response's input_tokens holds them), reasoning in output."""
    usage = dict_of(usage)
    total = count_of(usage.get("input_tokens"))
    details = dict_of(usage.get("input_tokens_details"))
    cached = min(count_of(details.get("cached_tokens")), total)
    written = min(count_of(details.get("cache_write_tokens")), total - cached)
    reasoning = count_of(dict_of(usage.get("output_tokens_details")).get("reasoning_tokens"))
    output = output_with_reasoning(usage, total, count_of(usage.get("output_tokens")), reasoning)
    return anthropic_usage(total - cached - written, output, cached, written, reasoning)


def responses_error(provider: Provider, error) -> ProxyError:
    """A failed response's error ({code, message}) as the client's error: rate limits 429,
    a refused prompt 400, anything else 502 (the provider failed)."""
    error = dict_of(error) or {"message": "the response failed without saying why"}
    status = {"rate_limit_exceeded": 429, "invalid_prompt": 400, "server_error": 502}.get(
        str_of(error.get("code")), 502)
    return openai_error(provider, error, status)


class ResponsesStreamTranslator:
    """Sans-IO: decoded Responses stream events in, Anthropic SSE events (bytes) out. Output
    items come one after another, each a block: reasoning (thinking, its item on the signature
    once done), message text, a function call with its arguments as they stream."""

    def __init__(self, context: TranslationContext):
        self._context = context
        self._emit = EventEmitter(context)
        self._reasoning = {}          # output index -> the finished reasoning item
        self._summaries = {}          # output index -> the summary part being streamed
        self._streamed = set()        # output indexes of calls whose arguments streamed
        self._texts = set()           # output indexes of messages whose text streamed
        self._made_calls = False
        self._refused = False
        self._response = None         # the final response (completed or incomplete)

    def feed_event(self, event: str, payload: dict | None) -> bytes:
        kind = (payload or {}).get("type") or event
        handler = RESPONSES_EVENT_HANDLERS.get(kind) if isinstance(kind, str) else None
        if payload is not None and handler is not None:
            self._emit.start()
            index = payload.get("output_index")
            getattr(self, handler)(payload, index if isinstance(index, int) else None)
        return self._emit.take()

    @property
    def complete(self) -> bool:
        return self._response is not None

    def finish(self, error: ProxyError | None = None) -> bytes:
        ending = failed_ending(error, self.complete, self._context.provider)
        if ending is not None:
            return ending
        if self._context.search_query is not None:
            self._report_search(list_of(self._response.get("output")))
        usage = dict_of(self._response).get("usage")
        self._emit.stop(responses_stop_reason(self._response, self._made_calls, self._refused),
                        anthropic_usage_from_responses(usage) if usage else None)
        return self._emit.take()

    def _report_search(self, output: list) -> None:
        """The searches the response ran, from its final output (the text has streamed): the
        citations on the open text block, then the blocks that report them."""
        results, citations, queries = responses_search(output)
        self._emit.cite(citations)
        if results:
            self._emit.search(queries[0] if queries else self._context.search_query, results)

    def _item_added(self, payload: dict, index) -> None:
        item = dict_of(payload.get("item"))
        if item.get("type") == "reasoning":
            self._emit.thinking("", ("thinking", index))
            self._emit.signature = lambda: responses_reasoning_signature(
                self._reasoning.get(index) or item)
        elif item.get("type") == "function_call":
            self._emit.open_tool(("tool", index), tool_use_id(item.get("call_id")),
                                 self._context.tool_name(item.get("name")))

    def _item_done(self, payload: dict, index) -> None:
        item = dict_of(payload.get("item"))
        if item.get("type") == "reasoning":
            self._reasoning[index] = item
        elif item.get("type") == "function_call":
            self._made_calls = True
            if index not in self._streamed:           # arguments only in the finished item
                self._item_added(payload, index)
                self._emit.tool_arguments(str(item.get("arguments") or ""))
        elif item.get("type") == "message" and index not in self._texts:
            self._message_done(item, index)

    def _message_done(self, item: dict, index) -> None:
        """A message whose text came only in the finished item (a server that streams no
        deltas): its text and refusal parts, as they would have streamed."""
        for part in map(dict_of, list_of(item.get("content"))):
            kind, text = part.get("type"), part.get("text", part.get("refusal"))
            if kind in ("output_text", "refusal") and isinstance(text, str) and text:
                self._refused = self._refused or kind == "refusal"
                self._emit.text(text, ("text", index))

    def _thinking(self, payload: dict, index) -> None:
        part = payload.get("summary_index", 0)
        separator = "\n\n" if self._summaries.get(index, part) != part else ""
        self._summaries[index] = part
        self._emit.thinking(separator + str(payload.get("delta") or ""), ("thinking", index))

    def _text(self, payload: dict, index) -> None:
        self._texts.add(index)
        self._emit.text(str(payload.get("delta") or ""), ("text", index))

    def _refusal(self, payload: dict, index) -> None:
        self._refused = True
        self._text(payload, index)

    def _arguments(self, payload: dict, index) -> None:
        if self._emit.open == ("tool", index):
            self._streamed.add(index)
            self._emit.tool_arguments(str(payload.get("delta") or ""))

    def _finished(self, payload: dict, index) -> None:
        self._response = dict_of(payload.get("response"))

    def _failed(self, payload: dict, index) -> None:
        raise responses_error(self._context.provider, dict_of(payload.get("response")).get(
            "error") if payload.get("type") == "response.failed" else payload)


# Each stream event the translator acts on, and its method; others (created, in_progress,
# content parts, annotations, hosted tools' progress) say nothing the client needs.
RESPONSES_EVENT_HANDLERS = {
    "response.output_item.added": "_item_added",
    "response.output_item.done": "_item_done",
    "response.reasoning_summary_text.delta": "_thinking",
    "response.reasoning_text.delta": "_thinking",
    "response.output_text.delta": "_text",
    "response.refusal.delta": "_refusal",
    "response.function_call_arguments.delta": "_arguments",
    "response.completed": "_finished",
    "response.incomplete": "_finished",
    "response.failed": "_failed",
    "error": "_failed",
}


# -----------------------------------------------------------------------------
# 9.5 Gemini
# -----------------------------------------------------------------------------

GEMINI_TOOL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_.:-]{0,63}$")
GEMINI_SCHEMA_KEYS = ("description", "title", "nullable", "minimum", "maximum", "minItems",
                      "maxItems", "minLength", "maxLength", "minProperties", "maxProperties",
                      "pattern", "propertyOrdering")
GEMINI_TYPES = {"string": "STRING", "number": "NUMBER", "integer": "INTEGER",
                "boolean": "BOOLEAN", "array": "ARRAY", "object": "OBJECT"}
GEMINI_FORMATS = {"STRING": ("enum", "date-time"), "NUMBER": ("float", "double"),
                  "INTEGER": ("int32", "int64")}
MAX_SCHEMA_REF_DEPTH = 8
MAX_GEMINI_STOP_SEQUENCES = 5
# Gemini 2.5's thinkingBudget for an effort asked without a budget (-1: the model decides; the
# most 2.5 Flash takes is 24,576, https://ai.google.dev/gemini-api/docs/thinking).
GEMINI_BUDGET_BY_EFFORT = {"low": 1024, "medium": 8192, "high": -1, "xhigh": 24576,
                           "max": 24576}
GEMINI_REFUSALS = ("SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
                   "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "LANGUAGE")
GEMINI_BAD_CALLS = ("MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL", "TOO_MANY_TOOL_CALLS")
GEMINI_STATUS_BY_CODE = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400,
                         "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
                         "RESOURCE_EXHAUSTED": 429, "INTERNAL": 500, "UNAVAILABLE": 529,
                         "DEADLINE_EXCEEDED": 504}


class GeminiProtocol(Protocol):
    """Google's Gemini API (generateContent, streamGenerateContent, countTokens)."""

    name = "gemini"
    coverage = dict(TRANSLATED_REQUEST, field=dict(TRANSLATED_FIELDS, metadata=(
        "dropped", "Gemini has no per-user field")))

    def upstream_tool_name(self, name: str) -> str:
        return gemini_tool_name(name)

    def messages_request(self, provider, model, request, body) -> UpstreamRequest:
        payload = gemini_request_from_anthropic(body, provider, model)
        return UpstreamRequest(gemini_endpoint_url(provider.base_url, model,
                                                   body.get("stream") is True),
                               gemini_request_headers(provider), json_bytes(payload))

    def count_tokens_request(self, provider, model, request, body) -> UpstreamRequest:
        """The generateContent request, wrapped in a countTokens call."""
        payload = gemini_request_from_anthropic(dict(body, max_tokens=body.get("max_tokens") or 1),
                                                provider, model)
        payload["model"] = "models/" + (model[len("models/"):] if model.startswith("models/")
                                        else model)
        url = gemini_endpoint_url(provider.base_url, model, False).replace(":generateContent",
                                                                           ":countTokens")
        return UpstreamRequest(url, gemini_request_headers(provider), JSON_TEXT(
            {"generateContentRequest": payload}).encode())

    def input_tokens(self, answer: bytes) -> int | None:
        return count_in(answer, "totalTokens")

    def models_request(self, provider) -> UpstreamRequest:
        return UpstreamRequest(provider.base_url.rstrip("/") + "/models?pageSize=1000",
                               gemini_request_headers(provider), None)

    def listed_models(self, answer) -> list:
        return [str(entry.get("name") or "")[len("models/"):]
                for entry in list_of(dict_of(answer).get("models")) if isinstance(entry, dict)]

    def can_search(self, provider, model) -> bool:
        return True                   # grounding with Google Search

    def message(self, answer, context) -> dict:
        return message_from_events(events_from_gemini_answer(answer, context))

    def stream_translator(self, context):
        return GeminiStreamTranslator(context)

    def error(self, call) -> ProxyError:
        try:
            error = json.loads(call.body).get("error")
        except (ValueError, AttributeError, RecursionError):
            error = None
        if isinstance(error, dict):
            return gemini_error(call.provider, error, call.status)
        return super().error(call)


def gemini_request_from_anthropic(body: dict, provider: Provider, model: str) -> dict:
    """The generateContent body for a Messages body
    (https://ai.google.dev/api/generate-content#request-body)."""
    contents, system = gemini_contents_from_anthropic(body)
    request = {"contents": contents}
    if system:
        request["systemInstruction"] = {"parts": [{"text": system}]}
    tools = gemini_tools_from_anthropic(offered_tools(body))
    if tools:
        request["tools"] = tools
        declared = {d["name"] for d in tools[0].get("functionDeclarations", ())}
        tool_config = gemini_tool_config(body.get("tool_choice"), declared)
        if tool_config and declared:
            request["toolConfig"] = tool_config
    request["generationConfig"] = gemini_generation_config(body, provider, model)
    return request


def gemini_contents_from_anthropic(body: dict):
    """(contents, system text): turns as user/model contents, consecutive same-role turns
    merged; system messages in the conversation join the system instruction."""
    contents, system_texts, calls = [], [text_of_system(body.get("system"))], []
    for index, message in enumerate(body["messages"]):
        where = "messages[%d].content" % index
        blocks = content_blocks(message["content"])
        if message["role"] == "system":
            system_texts.append(text_of_system(blocks))
            continue
        if message["role"] == "assistant":
            calls = []
            role, parts = "model", gemini_model_parts(blocks, calls, where)
        else:
            role, parts = "user", gemini_user_parts(blocks, calls, where)
            calls = []
        if not parts:
            continue
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    return contents, "\n\n".join(t for t in system_texts if t)


def gemini_model_parts(blocks, calls: list, where: str) -> list:
    """An assistant turn as model parts; each call's thought signature is restored from the
    thinking block before it, and a turn's first call without one gets Google's documented
    placeholder (https://ai.google.dev/gemini-api/docs/thought-signatures)."""
    parts, signature, first_call = [], None, True
    for position, block in enumerate(blocks):
        kind = block.get("type")
        if kind == "text" and visible_text(block.get("text")):
            parts.append({"text": block["text"]})
        elif kind == "thinking":
            signature = gemini_signature_of(block.get("signature")) or signature
        elif kind == "tool_use":
            name = gemini_tool_name(str(block.get("name", "")))
            part = {"functionCall": dict({"name": name, "args": block.get("input") or {}},
                                         **gemini_call_id(block.get("id")))}
            if signature or first_call:
                part["thoughtSignature"] = signature or GEMINI_SKIP_SIGNATURE
            parts.append(part)
            calls.append((str(block.get("id", "")), name))
            signature, first_call = None, False
        elif kind in SERVER_BLOCK_TYPES and server_block_text(block) is not None:
            parts.append({"text": server_block_text(block)})
        elif kind not in ASSISTANT_BLOCK_TYPES or kind in SERVER_BLOCK_TYPES:
            raise InvalidRequestError("%s[%d]: a %r block cannot be sent to Gemini"
                                      % (where, position, kind))
    return parts


def gemini_user_parts(blocks, calls: list, where: str) -> list:
    """A user turn: one functionResponse per call of the model turn before, in call order
    (missing ones filled in: Gemini wants as many responses as calls), then orphan results as
    text, then the rest."""
    found = [(position, block) for position, block in enumerate(blocks)
             if block.get("type") == "tool_result"]
    answers, _ = answered_calls([str(block.get("tool_use_id", "")) for _, block in found],
                                [call_id for call_id, _ in calls])
    results, extra = {}, []
    for (position, block), call_id in zip(found, answers):
        text = tool_result_text(block)
        images = [gemini_inline_part(b, "%s[%d]" % (where, position))
                  for b in tool_result_media(block)]
        if call_id is not None:
            results[call_id] = ({"error": text} if block.get("is_error") else {"output": text},
                                images)
        else:
            extra += [{"text": unanswering_result_text(block, text)}] + images
    parts = []
    for call_id, name in calls:
        response, images = results.get(call_id, ({"error": INTERRUPTED_CALL_RESULT}, []))
        parts.append({"functionResponse": dict({"name": name, "response": response},
                                               **gemini_call_id(call_id))})
        extra += images
    for position, block in enumerate(blocks):
        kind = block.get("type")
        if kind == "text" and visible_text(block.get("text")):
            extra.append({"text": block["text"]})
        elif kind in ("image", "document"):
            extra.append(gemini_inline_part(block, "%s[%d]" % (where, position)))
        elif kind in SERVER_BLOCK_TYPES and server_block_text(block) is not None:
            extra.append({"text": server_block_text(block)})
        elif kind not in ("text", "tool_result", "thinking", "redacted_thinking"):
            raise InvalidRequestError("%s[%d]: a %r block cannot be sent to Gemini"
                                      % (where, position, kind))
    return parts + extra


def gemini_inline_part(block: dict, where: str) -> dict:
    """A base64 image or PDF as inlineData; Gemini's API cannot fetch other URLs."""
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    if source.get("type") == "base64":
        return {"inlineData": {"mimeType": source.get("media_type", "application/octet-stream"),
                               "data": source.get("data", "")}}
    if source.get("type") == "text":
        return {"text": str(source.get("data", ""))}
    raise InvalidRequestError("%s: Gemini takes images and documents only inline (base64), not "
                              "as a %r source" % (where, source.get("type")))


def gemini_tools_from_anthropic(tools) -> list:
    """Custom tools in one functionDeclarations entry; web search as Google Search grounding
    (https://ai.google.dev/gemini-api/docs/google-search), beside them when both are asked."""
    declarations, search = [], False
    for tool in tools or ():
        kind = tool.get("type")
        if kind in (None, "custom") and "input_schema" in tool:
            declarations.append(gemini_function_declaration(tool))
        elif str(kind).startswith("web_search"):
            search = True
            if tool.get("allowed_domains") or tool.get("blocked_domains"):
                log.info("web search domain filters have no Gemini equivalent; searching "
                         "without them")
        else:
            log.info("tool %r (%s) has no Gemini equivalent; not sent", tool.get("name"), kind)
    return ([{"functionDeclarations": declarations}] if declarations else []) + (
        [{"googleSearch": {}}] if search else [])


def gemini_function_declaration(tool: dict) -> dict:
    """One Anthropic tool as a functionDeclaration; no parameters when it takes none."""
    schema = tool.get("input_schema") if isinstance(tool.get("input_schema"), dict) else {}
    definitions = dict(dict_of(schema.get("definitions")), **dict_of(schema.get("$defs")))
    declaration = {"name": gemini_tool_name(str(tool["name"]))}
    if tool.get("description"):
        declaration["description"] = tool["description"]
    parameters = converted_schema(tool_schema_name(tool), gemini_schema, schema, definitions)
    if parameters.get("properties"):
        declaration["parameters"] = parameters
    return declaration


# The id Gemini's Developer API gives a functionCall "must be sent back in the associated
# FunctionResponse" (firebase.google.com/docs/reference/js/ai.functioncall, checked 2026-12-07):
# it rides to the client in the tool_use id, marked as Gemini's, and back in both.
GEMINI_CALL_ID_PREFIX = "gemini_"


def gemini_tool_use_id(call_id) -> str:
    """The tool_use id for a functionCall's id: Gemini's, marked; a fresh one when it has none."""
    if isinstance(call_id, str) and TOOL_USE_ID_RE.match(call_id):
        return GEMINI_CALL_ID_PREFIX + call_id
    return tool_use_id(call_id)


def gemini_call_id(tool_id) -> dict:
    """{"id": Gemini's id} for a tool_use id that carries one, else {}: the field of the
    functionCall and functionResponse a tool_use and its result become."""
    tool_id = first_tool_id(tool_id) if isinstance(tool_id, str) else tool_id
    if isinstance(tool_id, str) and tool_id.startswith(GEMINI_CALL_ID_PREFIX):
        return {"id": tool_id[len(GEMINI_CALL_ID_PREFIX):]}
    return {}


def gemini_tool_name(name: str) -> str:
    """A Gemini function name for a tool name: kept when it fits Gemini's rule (a letter or _
    first, then letters, digits, _ . : -, at most 64), else cleaned and made unique."""
    if GEMINI_TOOL_NAME_RE.match(name):
        return name
    cleaned = re.sub(r"[^a-zA-Z0-9_.:-]", "_", name)
    cleaned = cleaned if re.match(r"[a-zA-Z_]", cleaned) else "_" + cleaned
    return "%s_%s" % (cleaned[:55], hashlib.sha256(name.encode()).hexdigest()[:8])


def gemini_schema(node, definitions: dict, depth: int = 0) -> dict:
    """A JSON Schema cleaned to the OpenAPI subset Gemini accepts, recursively
    (https://ai.google.dev/api/caching#Schema): $ref inlined, allOf merged, type lists and
    null as nullable, only the keywords it knows."""
    if not isinstance(node, dict):
        return {"type": "STRING"}
    if "$ref" in node:
        target = definitions.get(str(node["$ref"]).rsplit("/", 1)[-1])
        if not isinstance(target, dict) or depth >= MAX_SCHEMA_REF_DEPTH:
            return {"type": "OBJECT", "description": "JSON object"}
        return gemini_schema(dict(target, **{k: v for k, v in node.items() if k != "$ref"}),
                             definitions, depth + 1)
    if isinstance(node.get("allOf"), list):
        node = merge_all_of(node)
    choices = node.get("anyOf") or node.get("oneOf")
    if isinstance(choices, list):
        return gemini_any_of(node, choices, definitions, depth)
    types = node.get("type")
    types = [types] if isinstance(types, str) else [t for t in list_of(types) if isinstance(t, str)]
    nullable = "null" in types
    types = [t for t in types if t != "null"]
    if len(types) > 1:
        return gemini_any_of(node, [dict(node, type=t) for t in types], definitions, depth)
    if not types:
        types = ["object"] if "properties" in node else ["array"] if "items" in node else \
            [type_of_values(node)] if "enum" in node or "const" in node else []
    if not types:             # any JSON value: Gemini has no such type, so offer each of them
        any_value = [{"type": t} for t in ("string", "number", "boolean", "object", "array")]
        return gemini_any_of(node, any_value, definitions, depth)
    cleaned = {k: node[k] for k in GEMINI_SCHEMA_KEYS if k in node}
    if nullable:
        cleaned["nullable"] = True
    cleaned["type"] = GEMINI_TYPES.get(types[0], "STRING")
    gemini_schema_values(node, cleaned)
    gemini_schema_children(node, cleaned, definitions, depth)
    if "example" not in cleaned and isinstance(node.get("examples"), list) and node["examples"]:
        cleaned["example"] = node["examples"][0]
    return cleaned


VALUE_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number"}


def type_of_values(node: dict) -> str:
    """The JSON type of a typeless schema's enum or const values ({"const": 1} is an integer,
    not a string): the one they share, "number" for integers and others, else "string"."""
    values = [node["const"]] if "const" in node else list_of(node.get("enum"))
    kinds = {VALUE_TYPES.get(type(value), "string") for value in values}
    if len(kinds) == 1:
        return kinds.pop()
    return "number" if kinds == {"integer", "number"} else "string"


def gemini_schema_values(node: dict, cleaned: dict) -> None:
    """enum (strings only, const included) and format (only those Gemini knows)."""
    values = node.get("enum")
    if "const" in node:
        values = [node["const"]]
    if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
        values = [v for v in values if v]
        if values:
            cleaned["enum"] = values
            cleaned["type"] = "STRING"
    kind = cleaned.get("type")
    if node.get("format") in GEMINI_FORMATS.get(kind, ()) and "enum" not in cleaned:
        cleaned["format"] = node["format"]


def gemini_schema_children(node: dict, cleaned: dict, definitions: dict, depth: int) -> None:
    """properties and required for objects, items for arrays."""
    kind = cleaned.get("type")
    if kind == "OBJECT":
        properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        if properties:
            cleaned["properties"] = {name: gemini_schema(value, definitions, depth)
                                     for name, value in properties.items()}
            required = [name for name in list_of(node.get("required"))
                        if isinstance(name, str) and name in properties]
            if required:
                cleaned["required"] = required
        elif "description" not in cleaned:
            cleaned["description"] = "JSON object"
    elif kind == "ARRAY":
        items = node.get("items")
        cleaned["items"] = gemini_schema(items, definitions, depth) if isinstance(items, dict) \
            and items else {"type": "STRING"}


def gemini_any_of(node: dict, choices: list, definitions: dict, depth: int) -> dict:
    """anyOf/oneOf: null choices become nullable; one choice left is used as the node itself."""
    nullable = any(isinstance(c, dict) and c.get("type") == "null" for c in choices)
    options = [gemini_schema(c, definitions, depth) for c in choices
               if not (isinstance(c, dict) and c.get("type") == "null")]
    cleaned = options[0] if len(options) == 1 else {"anyOf": options}
    if isinstance(node.get("description"), str):
        cleaned["description"] = node["description"]
    if nullable:
        cleaned["nullable"] = True
    return cleaned


def merge_all_of(node: dict) -> dict:
    """allOf of object schemas merged into one object schema."""
    merged = {k: v for k, v in node.items() if k != "allOf"}
    properties, required = dict(dict_of(merged.get("properties"))), list_of(merged.get("required"))
    for part in node["allOf"]:
        if isinstance(part, dict):
            properties.update(part.get("properties") or {})
            required += [r for r in list_of(part.get("required")) if r not in required]
            merged.setdefault("type", part.get("type"))
    if properties:
        merged.update(type="object", properties=properties, required=required)
    return merged


def gemini_tool_config(choice, declared: set) -> dict:
    """toolConfig.functionCallingConfig for a tool_choice: auto, any (ANY), none, or one of the
    declared functions (ANY with allowedFunctionNames); a choice of a tool that is not a
    function (Claude Code forces web_search) is left out rather than sent."""
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool":
        name = gemini_tool_name(str(choice.get("name", "")))
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}} \
            if name in declared else {}
    mode = {"auto": "AUTO", "any": "ANY", "none": "NONE"}.get(kind)
    return {"functionCallingConfig": {"mode": mode}} if mode else {}


def gemini_generation_config(body: dict, provider: Provider, model: str) -> dict:
    """generationConfig: output cap, sampling, stop sequences (at most 5), a JSON output
    format, thinking."""
    cap = provider.output_cap(model)
    config = {"maxOutputTokens": min(body["max_tokens"], cap) if cap else body["max_tokens"]}
    for source, target in (("temperature", "temperature"), ("top_p", "topP"), ("top_k", "topK")):
        value = body.get(source)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            config[target] = value
    stops = body.get("stop_sequences")
    if isinstance(stops, list) and stops:
        config["stopSequences"] = stops[:MAX_GEMINI_STOP_SEQUENCES]
    config.update(gemini_response_format(body))
    config.update(gemini_thinking_config(body, provider, model))
    return config


def gemini_thinking_config(body: dict, provider: Provider, model: str) -> dict:
    """thinkingConfig: the effort asked, with the thoughts (thinkingLevel for Gemini 3,
    thinkingBudget before); the least the model does when thinking is turned off."""
    off = thinking_off_level(body, provider.quirks, model)
    if off is not None:
        return {"thinkingConfig": {"thinkingBudget": off} if isinstance(off, int) else {
            "thinkingLevel": off}}
    effort = thinking_effort(body)
    if effort is None:
        return {}
    level = provider_effort(effort, provider.quirks["effort_scales"], model)
    if quirk_holds(provider.quirks["thinking_level_models"], model) and level:
        thinking = {"thinkingLevel": level}
    else:
        budget = dict_of(body.get("thinking")).get("budget_tokens")
        thinking = {"thinkingBudget": budget if isinstance(budget, int)
                    else GEMINI_BUDGET_BY_EFFORT[effort]}
    return {"thinkingConfig": dict(thinking, includeThoughts=True)}


def gemini_response_format(body: dict) -> dict:
    """A JSON-schema output format as JSON output with a responseSchema in Gemini's subset
    (https://ai.google.dev/gemini-api/docs/structured-output)."""
    schema = requested_output_schema(body)
    if schema is None:
        return {}
    definitions = dict(dict_of(schema.get("definitions")), **dict_of(schema.get("$defs")))
    return {"responseMimeType": "application/json", "responseSchema": converted_schema(
        "output_config.format: the schema", gemini_schema, schema, definitions)}


def gemini_endpoint_url(base_url: str, model: str, stream: bool) -> str:
    """…/models/{model}:generateContent, or :streamGenerateContent?alt=sse for streams."""
    model = model[len("models/"):] if model.startswith("models/") else model
    action = ":streamGenerateContent?alt=sse" if stream else ":generateContent"
    return "%s/models/%s%s" % (base_url.rstrip("/"), urllib.parse.quote(model, safe="-._~"), action)


def gemini_request_headers(provider: Provider) -> dict:
    """The key in x-goog-api-key (never in the URL) and the provider's extra headers."""
    headers = {"content-type": "application/json", "user-agent": USER_AGENT}
    if provider.api_key:
        headers["x-goog-api-key"] = provider.api_key
    headers.update(provider.headers)
    return headers


def events_from_gemini_answer(data, context: TranslationContext) -> bytes:
    """The client's events for a whole generateContent answer."""
    if not isinstance(data, dict):
        raise UpstreamError("%s: the answer is not a JSON object" % context.provider.name)
    translator = GeminiStreamTranslator(context)
    events = translator.feed(data)
    if not translator.complete:
        raise UpstreamError("%s: the answer has no finishReason" % context.provider.name)
    return events + translator.finish()


class GeminiStreamTranslator:
    """Sans-IO: GenerateContentResponse chunks in, Anthropic SSE events (bytes) out.

    Parts become blocks in the order they come: thoughts as thinking, text as text, each
    functionCall (always whole) as a tool_use block with its input in one delta. A call's
    thoughtSignature rides on the thinking block just before it, so it comes back.
    """

    def __init__(self, context: TranslationContext):
        self._context = context
        self._emit = EventEmitter(context)
        self._finish_reason = None
        self._block_reason = None
        self._usage = None
        self._grounding = None        # groundingMetadata: what a Google Search found
        self._calls = 0

    def feed(self, chunk: dict) -> bytes:
        if chunk.get("error"):
            raise gemini_error(self._context.provider, chunk["error"])
        self._emit.start()
        if isinstance(chunk.get("usageMetadata"), dict):
            self._usage = chunk["usageMetadata"]
        feedback = chunk.get("promptFeedback")
        if isinstance(feedback, dict) and feedback.get("blockReason"):
            self._block_reason = feedback["blockReason"]
        candidates = list_of(chunk.get("candidates"))
        candidate = candidates[0] if candidates and isinstance(candidates[0], dict) else {}
        content = candidate.get("content") if isinstance(candidate.get("content"), dict) else {}
        for part in list_of(content.get("parts")):
            if isinstance(part, dict):
                self._feed_part(part)
        if candidate.get("finishReason"):
            self._finish_reason = candidate["finishReason"]
        if isinstance(candidate.get("groundingMetadata"), dict):
            self._grounding = candidate["groundingMetadata"]
        return self._emit.take()

    def feed_event(self, event: str, payload: dict | None) -> bytes:
        """One decoded SSE event (Gemini sends no [DONE]; errors come inside the payload)."""
        return self.feed(payload) if payload is not None else b""

    @property
    def complete(self) -> bool:
        return self._finish_reason is not None or self._block_reason is not None

    def finish(self, error: ProxyError | None = None) -> bytes:
        ending = failed_ending(error, self.complete, self._context.provider)
        if ending is not None:
            return ending
        if self._grounding is not None:
            self._report_search()
        notice = gemini_notice(self._finish_reason, self._block_reason)
        if notice:
            self._emit.text(notice)
        reason = "refusal" if self._block_reason else gemini_stop_reason(self._finish_reason,
                                                                         self._calls > 0)
        self._emit.stop(reason, anthropic_usage_from_gemini(self._usage) if self._usage else None)
        return self._emit.take()

    def _report_search(self) -> None:
        """The Google Search behind the answer (it arrives with the last chunk): citations on
        the text it supports, then the search and its results as Anthropic reports them."""
        results, citations, queries = gemini_search_results(self._grounding)
        self._emit.cite(citations)
        self._emit.close()
        if results or queries:
            self._emit.search(queries[0] if queries else self._context.search_query or "",
                              results)

    def _feed_part(self, part: dict) -> None:
        text = part.get("text")
        signature = str_of(part.get("thoughtSignature"))
        if part.get("thought") and not isinstance(part.get("functionCall"), dict):
            self._emit.thinking(text if isinstance(text, str) else "")
            if signature:
                self._emit.signature = GEMINI_SIGNATURE_PREFIX + signature
        elif isinstance(part.get("functionCall"), dict):   # a call, whatever its thought flag
            if signature:
                self._emit.thinking("")
                self._emit.signature = GEMINI_SIGNATURE_PREFIX + signature
            call = part["functionCall"]
            self._calls += 1
            self._emit.open_tool(("call", self._calls), gemini_tool_use_id(call.get("id")),
                                 self._context.tool_name(call.get("name")))
            self._emit.tool_arguments(JSON_TEXT(dict_of(call.get("args"))))
            self._emit.close()
        elif isinstance(text, str) and text:
            self._emit.text(text)


def gemini_search_results(grounding: dict) -> tuple:
    """(results, citations, queries) of groundingMetadata
    (https://ai.google.dev/gemini-api/docs/google-search): each groundingChunks web source as a
    (uri, title) result, each groundingSupports segment as citations of the sources it names."""
    sources = [dict_of(dict_of(chunk).get("web")) for chunk in list_of(grounding.get(
        "groundingChunks"))]
    results = [(source["uri"], str(source.get("title") or source["uri"])) for source in sources
               if isinstance(source.get("uri"), str) and source["uri"]]
    citations = []
    for support in list_of(grounding.get("groundingSupports")):
        segment = dict_of(dict_of(support).get("segment"))
        for index in list_of(dict_of(support).get("groundingChunkIndices")):
            if isinstance(index, int) and 0 <= index < len(sources) and sources[index].get("uri"):
                source = sources[index]
                citations.append(search_citation(source["uri"], str(source.get("title") or ""),
                                                 str(segment.get("text") or "")))
    queries = [q for q in list_of(grounding.get("webSearchQueries")) if isinstance(q, str) and q]
    return results, citations, queries


def gemini_stop_reason(finish_reason, made_calls: bool) -> str:
    """The stop_reason of a finishReason: tool_use whenever calls were made (Gemini says
    STOP), max_tokens, refusal for safety stops, else end_turn."""
    if made_calls:
        return "tool_use"
    if finish_reason == "MAX_TOKENS":
        return "max_tokens"
    return "refusal" if finish_reason in GEMINI_REFUSALS else "end_turn"


def gemini_notice(finish_reason, block_reason) -> str | None:
    """The text a user should see when Gemini stopped for a reason of its own."""
    if block_reason:
        return "[Gemini blocked the prompt: %s]" % block_reason
    if finish_reason in GEMINI_REFUSALS:
        return "[Gemini stopped the answer: %s]" % finish_reason
    if finish_reason in GEMINI_BAD_CALLS:
        return "[Gemini could not produce a valid tool call: %s]" % finish_reason
    return None


def anthropic_usage_from_gemini(usage) -> dict:
    """Anthropic usage from usageMetadata: cached tokens apart, thoughts counted as output (the
    provider bills them as output)."""
    usage = dict_of(usage)
    prompt = count_of(usage.get("promptTokenCount")) \
        + count_of(usage.get("toolUsePromptTokenCount"))
    cached = min(count_of(usage.get("cachedContentTokenCount")), prompt)
    thoughts = count_of(usage.get("thoughtsTokenCount"))
    return anthropic_usage(prompt - cached, count_of(usage.get("candidatesTokenCount")) + thoughts,
                           cached, 0, thoughts)


def gemini_error(provider: Provider, error, status: int = 502) -> ProxyError:
    """A Gemini error object ({code, message, status, details}) as the client's error, its
    status from the error's status name, a RetryInfo delay as retry-after."""
    error = error if isinstance(error, dict) else {"message": str(error)}
    message = str(error.get("message") or json.dumps(error))
    code = error.get("code") if isinstance(error.get("code"), int) else status
    status_name = error.get("status") if isinstance(error.get("status"), str) else ""
    status = GEMINI_STATUS_BY_CODE.get(status_name) or CLIENT_STATUS_BY_UPSTREAM_STATUS.get(
        code, 500 if code >= 500 else 400)
    if "API_KEY_INVALID" in json.dumps(error) or "API key not valid" in message:
        status = 401
    headers = [("retry-after", delay) for delay in gemini_retry_delays(error)][:1]
    return error_for_status(status, provider.masker.text("%s: %s" % (provider.name, message)),
                            headers)


def gemini_retry_delays(error: dict) -> list:
    """Seconds from RetryInfo.retryDelay ("32s"), as retry-after values."""
    delays = []
    for detail in list_of(error.get("details")):
        delay = detail.get("retryDelay") if isinstance(detail, dict) else None
        if isinstance(delay, str) and re.match(r"^\d+(\.\d+)?s$", delay):
            delays.append(str(max(1, int(float(delay[:-1]) + 0.999))))
    return delays


# -----------------------------------------------------------------------------
# 9.6 The protocol registry (a new protocol: a sub-section above, a line here)
# -----------------------------------------------------------------------------

PROTOCOLS = {protocol.name: protocol for protocol in (
    AnthropicProtocol(),
    OpenAIChatProtocol(),
    OpenAIResponsesProtocol(),
    GeminiProtocol(),
)}
PROTOCOLS["azure"] = PROTOCOLS["openai"]          # OpenAI's APIs at an Azure resource


def protocol_for(provider: Provider, model: str, body: dict | None = None) -> Protocol:
    """The protocol a call of a model speaks: its provider's, except that an OpenAI or Azure
    provider sends the Responses API what it says it should ("api": "responses", or a model
    that responses_models matches), and OpenAI's a request (body) with a web search that Chat
    Completions cannot run for the model: there OpenAI runs its web_search tool for any."""
    quirks = provider.quirks
    if provider.protocol in ("openai", "azure") and (
            quirks["api"] == "responses" or quirk_holds(quirks["responses_models"], model)
            or body is not None and searches_on_responses(provider, model, body)):
        return PROTOCOLS["openai-responses"]
    return PROTOCOLS[provider.protocol]


def searches_on_responses(provider: Provider, model: str, body: dict) -> bool:
    """Whether the request is a web search that goes to OpenAI's Responses API: its model is
    none of Chat Completions' search models (which search there)."""
    return provider.quirks["responses_search"] and openai_search_style(provider, model) is None \
        and web_search_tool(body) is not None



###############################################################################
# 10. Upstream
###############################################################################


# -----------------------------------------------------------------------------
# 10.1 Worker threads, and the way back to the event loop
# -----------------------------------------------------------------------------

UpstreamRequest = collections.namedtuple("UpstreamRequest", "url headers body")
WORKER_IDLE_SECONDS = 5.0             # an idle worker thread ends after this long


class WorkerPool:
    """Threads for blocking steps, started as work arrives (up to `limit`) and ending after
    WORKER_IDLE_SECONDS without work, so a burst leaves no threads behind. Jobs go through a
    SimpleQueue: the event loop hands one over without taking a lock a worker may hold (with
    a Condition, the loop waited on workers swapping the GIL at every hand-over)."""

    def __init__(self, limit: int):
        self._limit = limit
        self._jobs = queue.SimpleQueue()
        self._lock = threading.Lock()           # the thread set and idle count, workers' side
        self._threads = set()
        self._idle = 0                          # threads waiting for a job
        self._closed = False

    def submit(self, job, hand_over) -> None:
        """Have a worker thread call job(), then hand_over(what it returned) once the thread
        counts as idle again: a job submitted in answer (a client's next request, one after
        another) finds the thread waiting, where it would otherwise start a second one and the
        two would take turns, each woken cold."""
        if self._closed:
            raise RuntimeError("the worker pool has shut down")
        self._jobs.put((job, hand_over))
        if self._idle < self._jobs.qsize() and len(self._threads) < self._limit:
            thread = threading.Thread(target=self._work, name="ccproxy-upstream", daemon=True)
            with self._lock:
                self._threads.add(thread)
                self._idle += 1
            thread.start()

    def _work(self) -> None:
        while True:
            taken = self._next_job()
            if taken is None:
                return
            job, hand_over = taken
            result = job()
            with self._lock:
                self._idle += 1
            hand_over(result)
            del taken, job, hand_over, result    # a thread waiting holds nothing of its last job

    def _next_job(self):
        """The next (job, hand_over), or None when the thread should end (idle too long, or shut
        down); the thread counts as idle until it has one. A thread that timed out stops
        counting as idle as it looks once more before it goes: a job put after that look sees
        one idle thread fewer, and starts a thread if need be."""
        while True:
            try:
                taken = self._jobs.get(timeout=WORKER_IDLE_SECONDS)
            except queue.Empty:
                taken = None
            with self._lock:
                self._idle -= 1
                if taken is not None or self._closed or self._jobs.empty():
                    if taken is None:
                        self._threads.discard(threading.current_thread())
                    return taken
                self._idle += 1               # a job came after the time-out: wait for it

    @property
    def threads(self) -> int:
        return len(self._threads)

    def shutdown(self, wait: bool = True, **kwargs) -> None:
        """No new jobs; idle threads end at once, busy ones after their job."""
        self._closed = True
        with self._lock:
            threads = list(self._threads)
            self._threads.clear()
        for _ in threads:
            self._jobs.put(None)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()


class LoopInbox:
    """Hands items from worker threads to the event loop with at most one wake-up pending.

    Waking the loop writes a byte to its self-pipe; one write per stream chunk from hundreds
    of streams can fill that pipe, and a full pipe loses signals (a `stop` that never
    arrives). Here a wake-up is sent only when none is outstanding, and the loop then takes
    everything that has gathered.
    """

    def __init__(self, loop):
        self._loop = loop
        self._items = collections.deque()
        self._lock = threading.Lock()
        self._rung = False

    def post(self, deliver, item) -> None:
        """Worker thread: have deliver(item) called on the loop."""
        with self._lock:
            self._items.append((deliver, item))
            if self._rung:
                return
            self._rung = True
        try:
            self._loop.call_soon_threadsafe(self._deliver_all)
        except RuntimeError:          # the loop has closed: nobody is waiting any more
            pass

    def _deliver_all(self) -> None:
        with self._lock:
            items, self._items = self._items, collections.deque()
            self._rung = False
        for deliver, item in items:
            deliver(item)


def settle(future, value) -> None:
    """Give a future its result, unless it has one."""
    if not future.done():
        future.set_result(value)


def settle_outcome(item) -> None:
    """(future, (result, exception)) from a worker: settle the future, unless it is done."""
    future, (result, exception) = item
    if not future.done():
        if exception is None:
            future.set_result(result)
        else:
            future.set_exception(exception)


class Upstream:
    """Everything that reaches the providers, for one server: the worker threads that run
    urllib's blocking calls, the inbox through which they reach the event loop, the opener,
    idle keep-alive connections, and the calls in flight (cut when the server stops)."""

    def __init__(self, worker_threads: int, idle_connections: int = UPSTREAM_IDLE_WHEN_QUIET):
        self._workers = WorkerPool(worker_threads)
        self.opener = build_upstream_opener()
        self.connections = ConnectionPool(idle_connections)
        self.calls = set()            # UpstreamCalls whose answer is not yet released
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._inbox = None

    def call(self, provider: Provider, outgoing: UpstreamRequest, timeout: float,
             model: str = ""):
        """A call of outgoing to provider (for model), not yet sent; silent for `timeout` s,
        it fails."""
        return UpstreamCall(self, provider, outgoing, timeout, model)

    def run(self, function, *args) -> asyncio.Future:
        """Run a blocking step on a worker thread, counted while it runs: a future of its
        result, settled through the inbox (no concurrent Future and callback chain per step).
        A step whose future was cancelled before a worker took it is not run."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.inbox(loop)

        def job():
            if future.cancelled():
                return None
            with self._busy_lock:
                self._busy += 1
            try:
                return future, (function(*args), None)
            except BaseException as exc:        # handed to whoever awaits the step
                return future, (None, exc)
            finally:
                with self._busy_lock:
                    self._busy -= 1
        self._workers.submit(job, self._hand_over)
        return future

    def _hand_over(self, settlement) -> None:
        """A worker thread, free again: have the loop settle the step's future."""
        if settlement is not None:
            self._inbox.post(settle_outcome, settlement)

    def inbox(self, loop) -> LoopInbox:
        """The inbox through which worker threads reach the event loop."""
        if self._inbox is None:
            self._inbox = LoopInbox(loop)
        return self._inbox

    @property
    def threads_busy(self) -> int:
        return self._busy

    @property
    def threads(self) -> int:
        """Worker threads alive (busy or idle for a few seconds)."""
        return self._workers.threads

    def close(self, reason: str) -> None:
        """Cut every call in flight (its client is told `reason`), end the workers and close
        idle connections."""
        for call in list(self.calls):
            call.cancel(reason)
        self._workers.shutdown(wait=False)
        self.connections.close_all()

    def join(self) -> None:
        """Wait for the worker threads to end (after close())."""
        self._workers.shutdown(wait=True)


# -----------------------------------------------------------------------------
# 10.2 A call to a provider: sent, answered, cut
# -----------------------------------------------------------------------------

class UpstreamCall:
    """One HTTP call to a provider: a worker thread sends it through urllib, the event loop
    reads the answer, and the loop may cut it.

    send() sends the request and waits for the answer, body included, unless the answer is an
    event stream: chunks() then gives the body piece by piece as the event loop reads it.
    Where the loop cannot watch sockets (Windows' default loop), and through an HTTPS proxy's
    tunnel, the worker thread reads the answer's head and whole bodies, and another worker a
    stream. cancel() (the client went away) cuts the socket, so whatever reads it returns at
    once.
    """

    def __init__(self, upstream: Upstream, provider: Provider, outgoing: UpstreamRequest,
                 timeout: float, model: str = ""):
        self.provider = provider
        self.model = model
        self._upstream = upstream
        self.timeout = timeout
        self._outgoing = outgoing     # the request to send; None once sent (a body may be MBs)
        self._url = outgoing.url
        self.connections = upstream.connections
        self._socket = None
        self._reader = None           # the event loop's SocketReader, once it reads the answer
        self._response = None
        self._cancelled = False
        self._finished = False        # the answer was read to its end, or released
        self._pumping = False         # chunks() has taken over the streamed body
        self._body_complete = False
        self._lock = threading.Lock()
        self._cancel_reason = ""
        self.status = 0
        self.body = None

    def attach_socket(self, sock) -> None:
        self._socket = sock
        if self._cancelled:
            self._shutdown_socket()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self, reason: str = "") -> None:
        """Cut the call: the worker thread's next or current socket operation fails. With a
        reason the client is told (an error event); without, the client is gone. A call
        whose answer was read to the end is left alone (its connection may be reused)."""
        with self._lock:
            if self._finished:
                return
            self._cancel_reason = self._cancel_reason or reason
            self._cancelled = True
        self._shutdown_socket()

    def close_unread(self) -> None:
        """Release a streamed answer that nobody read (its response failed before the first
        write): cut its connection and forget the call. Once chunks() has started, it does this
        itself."""
        if self._pumping or self._finished or self._response is None:
            return
        self.cancel()
        self._stop_reading()
        self._release(False)
        self._upstream.calls.discard(self)

    def _stop_reading(self) -> None:
        """The event loop stops watching the socket (before it is closed or pooled)."""
        if self._reader is not None:
            self._reader.close()

    def _release(self, complete: bool) -> None:
        """Close the response (from its worker thread, or from the loop when no worker reads
        it); its connection goes back to the pool when the answer was read to its end and
        nobody cut the call."""
        response = self._response
        with self._lock:
            self._finished = True
            reusable = complete and not self._cancelled and not response.will_close
        response.close()
        key, connection = getattr(response, "pooled", (None, None))
        if connection is not None:
            if reusable:
                self.connections.give(key, connection)
            else:
                connection.close()

    def _shutdown_socket(self) -> None:
        sock = self._socket
        if sock is not None:
            try:   # the plain socket's shutdown: safe while another thread reads, TLS or not
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def header(self, name: str) -> str | None:
        return self._response.headers.get(name) if self._response is not None else None

    def log_failure(self, error: ProxyError, when: str = "") -> None:
        """One warning line for a call that failed, whatever else is logged: provider, model,
        the status the client gets, and why."""
        log.warning("upstream call failed%s: provider=%s model=%s status=%d: %s", when,
                    self.provider.name, self.model or "-", error.status, error.message)

    def relayed_headers(self) -> list:
        """The provider's response headers that the client should see too."""
        if self._response is None or self._response.headers is None:
            return []
        return [(k.lower(), v) for k, v in self._response.headers.items()
                if k.lower() in RELAYED_RESPONSE_HEADERS
                or k.lower().startswith(RELAYED_RESPONSE_HEADER_PREFIX)]

    async def send(self, stream: bool = False) -> int:
        """Send the request and return the answer's status once its head has arrived.

        The body is read into `body`, unless stream is true and the answer is a successful
        event stream: then `body` is None and chunks() delivers it.
        """
        self._upstream.calls.add(self)
        try:
            await self._send_and_read(stream)
        except BaseException:
            self._upstream.calls.discard(self)
            raise
        self._outgoing = None
        if self.body is not None:
            self._upstream.calls.discard(self)
        return self.status

    async def _send_and_read(self, stream: bool) -> None:
        """A worker thread sends the request; the event loop reads the answer where it can
        (a worker thread that waited for it would take the GIL from the loop at every receive,
        which a burst of calls pays for in time to first token). A pooled connection that the
        provider has closed meanwhile shows only as the answer's absence: the request is then
        sent again on a fresh connection."""
        loop = asyncio.get_running_loop()
        read_by_loop = loop_watches_sockets(loop)
        for reuse in (True, False):
            sent = await self._upstream.run(self._send_blocking, stream, read_by_loop, reuse)
            if sent is None:                  # a worker thread has read the answer
                return
            if await self._read_head(loop, sent):
                break
        if not self._streams(stream):
            self.body = await self._read_body()
            self._check_body()

    def _send_blocking(self, stream: bool, read_by_loop: bool, reuse: bool):
        """Worker thread: send the request through urllib. Where the event loop reads the
        answer, what was sent (a SentRequest); otherwise the answer is read here, its body too
        unless it is a stream, and None."""
        outgoing = self._outgoing
        request = urllib.request.Request(outgoing.url, data=outgoing.body, headers=outgoing.headers,
                                         method="GET" if outgoing.body is None else "POST")
        request.upstream_call = self
        request.answer_read_by_loop, request.reuse_connection = read_by_loop, reuse
        try:
            answer = self._upstream.opener.open(request, timeout=self.timeout)
        except Exception as exc:
            raise self.failure(exc) from None
        if isinstance(answer, SentRequest):
            return answer
        self._response = answer
        self.status = answer.status
        if not self._streams(stream):
            self._read_body_blocking(answer)
        return None

    def answers_with_events(self) -> bool:
        """Whether the answer is an event stream (asked for or not)."""
        return (self.header("content-type") or "").startswith("text/event-stream")

    def _streams(self, stream: bool) -> bool:
        """Whether the answer's body is a stream for chunks(): asked for, and a successful
        event stream."""
        return stream and self.status < 400 and self.answers_with_events()

    def _read_body_blocking(self, response) -> None:
        """Worker thread: the body, read to its end (an error's, only its beginning)."""
        try:
            self.body = response.read(UPSTREAM_ERROR_BODY_BYTES) if self.status >= 400 \
                else read_whole(response, MAX_ANSWER_BYTES)
        except Exception as exc:
            raise self.failure(exc) from None
        finally:
            self._release(response.isclosed())
        self._check_body()

    def _check_body(self) -> None:
        if self.body is None:
            raise UpstreamError("%s answered with more than %d MiB, more than any answer of a "
                                "model; check that its api_base_url is its API" % (
                                    self.provider.name, MAX_ANSWER_BYTES >> 20))

    async def _read_head(self, loop, sent) -> bool:
        """The event loop reads the answer's head from the socket the request went out on:
        True once it has come, False when a reused connection turned out closed before any of
        it (the request is to be sent again). Other failures raise the client's error."""
        self._reader = SocketReader(loop, sent.connection.sock)
        try:
            received = await read_answer_head(self._reader, self.timeout, self.provider.name)
            response = answer_from_head(received, sent)
        except BaseException as exc:
            self._stop_reading()
            sent.connection.close()
            if sent.reused and not self._cancelled and isinstance(exc, STALE_CONNECTION_ERRORS):
                return False
            if isinstance(exc, (OSError, http.client.HTTPException)):
                raise self.failure(exc) from None
            raise
        self._reader.unread(response.rest)
        self._response, self.status = response, response.status
        return True

    async def _read_body(self) -> bytes | None:
        """The event loop reads the answer's body: an error's first UPSTREAM_ERROR_BODY_BYTES,
        or a whole answer, None as soon as it is known to be over MAX_ANSWER_BYTES."""
        body = LoopBody(self, self._reader, body_decoder(self._response), None)
        whole = self.status < 400
        limit = MAX_ANSWER_BYTES if whole else UPSTREAM_ERROR_BODY_BYTES
        if whole and (self._response.length or 0) > limit:
            body.close()
            return None
        parts, total = [], 0
        try:
            async for piece in body:
                parts.append(piece)
                total += len(piece)
                if total > limit or total == limit and not whole:
                    break
        finally:
            body.close()
        return None if whole and total > limit else b"".join(parts)[:limit]

    def failure(self, exc: BaseException) -> Exception:
        """The client's error for a failed socket operation: the reason the call was cut, or
        the provider's failure."""
        if self._cancelled:
            return OverloadedError(self._cancel_reason) if self._cancel_reason \
                else ClientDisconnected()
        if isinstance(exc, ProxyError):             # the provider's, said already
            return exc
        answered = self._response is not None or isinstance(exc, http.client.IncompleteRead)
        return upstream_failure(self.provider, self._url, exc, self.timeout, answered)

    def chunks(self, silence_seconds: float | None = None):
        """The streamed body as it arrives (an async iterator); failures raise ProxyError.

        With silence_seconds, an empty chunk is yielded whenever the upstream has sent nothing
        for that long, so the relay can keep the client's connection alive. The event loop
        reads the socket itself; where it cannot watch sockets (Windows' default loop), a
        worker thread reads it.
        """
        self._pumping = True
        loop = asyncio.get_running_loop()
        if self._reader is None and self._socket is not None and loop_watches_sockets(loop):
            self._reader = SocketReader(loop, self._socket, self._response.fp)
            self._drop_buffered_file()
        if self._reader is not None:
            return LoopBody(self, self._reader, body_decoder(self._response), silence_seconds)
        return ThreadBody(self._read_by_thread(silence_seconds))

    def _drop_buffered_file(self) -> None:
        """The loop reads the socket itself from here on, and the reader has taken what the
        response's buffered file held: close that file now (the socket stays open), so its
        8 KB buffer goes at once rather than at the stream's end. The response counts as
        closed from here; the connection's fate is still decided by _release()."""
        file, self._response.fp = self._response.fp, None
        file.close()

    def body_ended(self, complete: bool) -> None:
        """The event loop has stopped reading the streamed body: the call is over, and its
        connection goes back to the pool when the body came whole."""
        if not complete:
            self.cancel()
        self._release(complete)
        self._upstream.calls.discard(self)

    async def _read_by_thread(self, silence_seconds: float | None):
        """The body read by a worker thread, handed over through a bounded queue."""
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()
        slots = threading.Semaphore(STREAM_QUEUE_CHUNKS)
        pump = self._upstream.run(self._pump_blocking, self._upstream.inbox(loop), queue,
                                       slots)
        watch = SilenceWatch(loop, queue, silence_seconds) if silence_seconds else None
        try:
            while True:
                item = await queue.get()
                if item.__class__ is bytes:
                    slots.release()
                    if watch is not None:
                        watch.heard += 1
                    yield item
                elif item is None:
                    return
                elif item is SILENCE:
                    yield b""
                else:
                    raise item
        finally:
            if watch is not None:
                watch.stop()
            self.cancel()
            slots.release()
            await asyncio.shield(pump)
            self._upstream.calls.discard(self)

    def _pump_blocking(self, inbox, queue: asyncio.Queue, slots: threading.Semaphore) -> None:
        """Worker thread: hand each piece of the body to the loop, at most `slots` ahead."""
        ending = None
        try:
            for piece in self._body_pieces():
                slots.acquire()
                if self._cancelled:
                    break
                inbox.post(queue.put_nowait, piece)
        except Exception as exc:
            ending = self.failure(exc)
        finally:
            self._release(self._body_complete)
            inbox.post(queue.put_nowait, ending)

    def _body_pieces(self):
        """Worker thread: the body as whatever each socket read returns, de-chunked here.

        Reading the response's raw file rather than its read1() lets everything that arrived
        together travel together, instead of one HTTP chunk (one event) per hand-over.
        """
        read = self._response.fp.read1
        decoder = body_decoder(self._response)
        while not decoder.done and not self._cancelled:
            data = read(UPSTREAM_READ_BYTES)
            if not data:
                if decoder.expects_more:
                    raise http.client.IncompleteRead(b"")
                return
            piece = unframed(decoder, data, self.provider)
            self._body_complete = decoder.done
            if piece:
                yield piece


def read_whole(response, limit: int) -> bytes | None:
    """An answer's body, read to its end; None, as soon as it is known to be over limit bytes
    (a base URL that serves something else, a server that never ends), before it fills the
    memory. A body of no stated length is read in slices: http.client's read(n) on Python
    3.8 makes an n-byte buffer first."""
    if response.length is not None:
        return response.read() if response.length <= limit else None
    parts, total = [], 0
    while total <= limit:
        part = response.read(ANSWER_SLICE_BYTES)
        if not part:
            return b"".join(parts)
        parts.append(part)
        total += len(part)
    return None


def upstream_failure(provider: Provider, url: str, exc: BaseException, timeout: float,
                     answered: bool) -> ProxyError:
    """The client-facing error for a call that failed before or while its answer came."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return UpstreamTimeoutError("%s: the provider sent nothing for %g s "
                                    "(performance.request_timeout)" % (provider.name, timeout))
    detail = str(reason) or type(reason).__name__
    if isinstance(reason, http.client.HTTPException) and not isinstance(
            reason, (http.client.IncompleteRead, ConnectionError)):
        message = "%s: answered with what HTTP/1.1 cannot read (%s: %s); check its api_base_url" \
            % (provider.name, type(reason).__name__, detail[:200])
        return UpstreamError(provider.masker.text(message))
    if answered:
        message = "%s: the connection broke while the answer was arriving: %s" % (
            provider.name, detail)
        return UpstreamError(provider.masker.text(message))
    message = "%s: cannot reach %s: %s" % (provider.name, url.split("?", 1)[0], detail)
    error = UpstreamError(provider.masker.text(message))
    return error.made_final() if cannot_connect(reason) else error


def cannot_connect(reason) -> bool:
    """Whether a failure means the provider's address is wrong or nothing serves there (refused,
    no such host, no route, a certificate that does not verify), as opposed to a fault on the
    way that another try may not meet."""
    return (isinstance(reason, (ConnectionRefusedError, socket.gaierror))
            or getattr(reason, "errno", None) in (errno.EHOSTUNREACH, errno.ENETUNREACH)
            or "CERTIFICATE_VERIFY_FAILED" in str(reason))


# -----------------------------------------------------------------------------
# 10.3 Answers read by the event loop, or by a thread
# -----------------------------------------------------------------------------

def unframed(decoder, data: bytes, provider: Provider) -> bytes:
    """decoder.feed(data): what an answer's body holds of data, read by the event loop or a
    thread. Broken framing is the provider's failure (a 502), not the client's request's."""
    try:
        return decoder.feed(data)
    except InvalidRequestError as exc:
        raise UpstreamError("%s: the chunked framing of its answer is broken: %s" % (
            provider.name, exc)) from None


def loop_watches_sockets(loop) -> bool:
    """Whether the event loop can wait for a socket to be readable (selector loops can;
    Windows' default proactor loop cannot)."""
    return isinstance(loop, asyncio.SelectorEventLoop)


HEAD_END_RE = re.compile(rb"\n\r?\n")              # where http.client's reading of a head ends
INTERIM_HEAD_RE = re.compile(rb"\S+ +1(?!01\b)\d\d\b")    # 100 Continue, 103 Early Hints, …
MAX_ANSWER_HEAD_BYTES = 1024 * 1024


async def read_answer_head(reader, wait: float, provider_name: str) -> bytes:
    """An answer's head, and whatever came with it, read by the event loop from a SocketReader
    (past any interim answer, a 100 Continue or a 103 Early Hints); each wait for more bytes
    lasts at most `wait` seconds. A connection that ends or breaks before the head is whole
    fails as it would in http.client: RemoteDisconnected before any byte, IncompleteRead after
    some. A head trickling in a byte at a time costs no more than one arriving whole."""
    received, searched = bytearray(), 0
    while True:
        end = HEAD_END_RE.search(received, max(0, searched - 2))
        if end is not None and not INTERIM_HEAD_RE.match(received):
            return bytes(received)
        if end is not None:
            del received[:end.end()]
            searched = 0
            continue
        if len(received) > MAX_ANSWER_HEAD_BYTES:
            raise UpstreamError("%s answered with a head of more than %d MiB, more than any "
                                "API's; check that its api_base_url is its API" % (
                                    provider_name, MAX_ANSWER_HEAD_BYTES >> 20))
        searched = len(received)
        try:
            more = await reader.read(wait)
        except ConnectionError:
            if received:
                raise http.client.IncompleteRead(bytes(received)) from None
            raise
        if more is None:
            raise socket.timeout("timed out")
        if not more:
            raise http.client.IncompleteRead(bytes(received)) if received else \
                http.client.RemoteDisconnected("Remote end closed connection without response")
        received += more


class ReceivedBytes:
    """Bytes received, in the shape http.client's response reads an answer from (a socket's
    makefile())."""

    def __init__(self, data: bytes):
        self._data = data

    def makefile(self, mode: str):
        return io.BytesIO(self._data)


def answer_from_head(received: bytes, sent: SentRequest) -> http.client.HTTPResponse:
    """The answer whose head the event loop has received for a SentRequest, as http.client's
    getresponse() would have made it; `rest` holds what came after the head. The connection
    counts as answered (http.client's state for a request whose answer it read), so it can
    take another request once the body is read."""
    response = HeadFieldsResponse(ReceivedBytes(received), method=sent.method)
    response.begin()
    file, response.fp = response.fp, None
    response.rest = file.read()
    response.pooled = (sent.key, sent.connection)
    response.will_close = response.will_close or not sent.whole
    sent.connection._HTTPConnection__state = http.client._CS_IDLE
    return response


class LoopBody:
    """An answer's body read by the event loop, with no thread held. It is an async
    iterator of de-framed pieces (b"" after each `silence_seconds` without data), and push()
    hands each piece on from the loop's callback for a readable socket itself: one receive,
    its events, one write, and no task woken in between."""

    def __init__(self, call: UpstreamCall, reader, decoder, silence_seconds: float | None):
        self._call, self._reader, self._decoder = call, reader, decoder
        self._silence = silence_seconds
        self._clock = asyncio.get_running_loop().time
        self._heard = self._clock()
        self._ended = decoder.done    # the body has all come, or the connection ended it
        self._closed = False
        self._consume = None

    @property
    def ended(self) -> bool:
        """Whether the whole body has been received."""
        return self._ended

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        try:
            while not self._ended:
                data = await self._reader.read(self._wait())
                piece = self._silent() if data is None else self._take(data)
                if piece is not None:
                    return piece
        except BaseException as exc:
            raise self._stopped(exc) from None
        self.close()
        raise StopAsyncIteration

    async def push(self, consume, drain) -> None:
        """Hand each piece to consume(piece) until the body ends, b"" after a silence.
        consume returns true when the client is behind: drain() is awaited before reading on."""
        self._consume = consume
        try:
            while not self._ended:
                if await self._reader.push(self._wait(), self._pushed):
                    behind = not self._ended
                else:
                    piece = self._silent()
                    behind = piece is not None and consume(piece)
                if behind:
                    await drain()
        except BaseException as exc:
            raise self._stopped(exc) from None
        finally:
            self._consume = None
        self.close()

    def _pushed(self, data: bytes) -> bool:
        piece = self._take(data)
        return piece is not None and self._consume(piece) or self._ended

    def _wait(self) -> float:
        """Seconds to wait for data: until the next silence, or the call's timeout."""
        left = self._call.timeout - (self._clock() - self._heard)
        if left <= 0:
            raise socket.timeout("silent")
        return min(left, self._silence) if self._silence else left

    def _silent(self) -> bytes | None:
        """Nothing came while waiting: b"" once a whole silence has passed (None before)."""
        quiet = self._clock() - self._heard
        if quiet >= self._call.timeout:
            raise socket.timeout("silent")
        return b"" if self._silence and quiet >= self._silence else None

    def _take(self, data: bytes) -> bytes | None:
        """One receive, de-framed; None when it holds nothing to hand on."""
        self._heard = self._clock()
        if not data or self._call.cancelled:
            if self._decoder.expects_more or self._call.cancelled:
                raise http.client.IncompleteRead(b"")
            self._ended = True
            return None
        piece = unframed(self._decoder, data, self._call.provider)
        self._ended = self._decoder.done
        return piece or None

    def _stopped(self, exc: BaseException) -> BaseException:
        """Reading failed or was stopped: the call ends, and the client's error is made (from
        the call as it was: closing cuts it)."""
        if isinstance(exc, (OSError, http.client.HTTPException)):
            exc = self._call.failure(exc)
        self.close()
        return exc

    def close(self) -> None:
        """Stop reading: the call is over (its connection kept when the body came whole)."""
        if not self._closed:
            self._closed = True
            self._reader.close()
            self._call.body_ended(self._decoder.done)

    async def aclose(self) -> None:
        """close(), for callers that close any stream of pieces the same way."""
        self.close()


class ThreadBody:
    """A streamed answer's body read by a worker thread (where the event loop cannot watch
    sockets): an async generator's pieces, with the same push() as a LoopBody."""

    ended = False                     # not known before the last piece has been handed on

    def __init__(self, pieces):
        self._pieces = pieces

    def __aiter__(self):
        return self

    def __anext__(self):
        return self._pieces.__anext__()

    async def push(self, consume, drain) -> None:
        """consume(piece) for each piece; drain() is awaited whenever it returns true."""
        async for piece in self._pieces:
            if consume(piece):
                await drain()

    async def aclose(self) -> None:
        """Stop reading: the worker thread lets go of the call."""
        await self._pieces.aclose()


class SocketReader:
    """Reads an upstream socket from the event loop: first what the response's buffered file
    already holds, then each receive as data arrives. The socket stays watched between reads
    (one registration per stream, dropped while nobody waits for it); a plain socket whose
    last receive took all there was is waited on at once, while a TLS socket is read until it
    would block, so records the TLS layer has buffered are handed on before the loop waits.
    read() waits for one receive; push() hands every receive to a function, from the loop's
    callback for a readable socket."""

    def __init__(self, loop, sock, buffered_file=None):
        sock.setblocking(False)
        self._loop, self._sock, self._fd = loop, sock, sock.fileno()
        ssl_module = sys.modules.get("ssl")
        self._tls = ssl_module is not None and isinstance(sock, ssl_module.SSLSocket)
        self._would_block = (BlockingIOError, InterruptedError) + (
            (ssl_module.SSLWantReadError, ssl_module.SSLWantWriteError) if self._tls else ())
        self._buffered = b"" if buffered_file is None else buffered_bytes(buffered_file,
                                                                          self._would_block)
        self._drained = False         # the last receive took everything that had arrived
        self._waiter = None
        self._watching = False
        self._timeout = Deadline(loop, self._on_timeout)
        self._taker, self._wait = None, 0.0       # push()'s function and silence

    async def read(self, wait: float) -> bytes | None:
        """The next bytes (b"" at the end), or None when none came within wait seconds."""
        while True:
            data = self._receive()
            if data is not None:
                return data
            if not await self._readable(wait):
                return None

    async def push(self, wait: float, take) -> bool:
        """take(data) for each receive until it returns true (then True); False once nothing
        has come for wait seconds. Errors, take's too, are raised here."""
        data = self._receive()
        while data is not None:
            if take(data):
                return True
            data = self._receive()
        self._taker, self._wait = take, wait
        try:
            return await self._readable(wait)
        finally:
            self._taker = None

    def unread(self, data: bytes) -> None:
        """Have data (what came after an answer's head) read before the socket is."""
        self._buffered = data + self._buffered

    def _receive(self) -> bytes | None:
        """What has arrived (b"" at the end), or None when nothing has yet."""
        if self._buffered:
            data, self._buffered = self._buffered, b""
            return data
        if self._drained:
            self._drained = False
            return None
        try:
            data = self._sock.recv(UPSTREAM_READ_BYTES)
        except self._would_block:
            return None
        self._drained = not self._tls and 0 < len(data) < UPSTREAM_READ_BYTES
        return data

    async def _readable(self, wait: float) -> bool:
        self._waiter = future = self._loop.create_future()
        if not self._watching:
            self._loop.add_reader(self._fd, self._on_readable)
            self._watching = True
        self._timeout.set(wait)
        try:
            return await future
        finally:
            self._waiter = None

    def _on_timeout(self) -> None:
        if self._waiter is not None:
            settle(self._waiter, False)

    def _on_readable(self) -> None:
        waiter = self._waiter
        if waiter is None:                # nobody waits: stop watching until someone does
            self._loop.remove_reader(self._fd)
            self._watching = False
        elif self._taker is None:
            settle(waiter, True)
        elif not waiter.done():
            self._push_all(waiter)

    def _push_all(self, waiter) -> None:
        """Everything that has arrived, to push()'s function, right here in the callback."""
        try:
            data = self._receive()
            while data is not None:
                if self._taker(data):
                    settle(waiter, True)
                    return
                data = self._receive()
        except Exception as exc:
            if not waiter.done():         # (a write that failed may have ended the wait)
                waiter.set_exception(exc)
            return
        self._timeout.set(self._wait)

    def close(self) -> None:
        """Stop watching the socket (before it is closed or reused)."""
        self._timeout.clear()
        if self._watching:
            self._loop.remove_reader(self._fd)
            self._watching = False


def buffered_bytes(file, would_block) -> bytes:
    """What a socket's buffered file holds already (the bytes that came with the answer's
    head), without waiting for more."""
    try:
        held = file.peek()
    except would_block:
        return b""
    return file.read1(len(held)) if held else b""


SILENCE = object()      # queued by a SilenceWatch when the upstream has been quiet


class SilenceWatch:
    """Queues SILENCE every `seconds` during which no chunk was heard (counted in `heard`)."""

    def __init__(self, loop, queue: asyncio.Queue, seconds: float):
        self.heard = 0
        self._seen = 0
        self._loop, self._queue, self._seconds = loop, queue, seconds
        self._timer = loop.call_later(seconds, self._tick)

    def _tick(self) -> None:
        if self.heard == self._seen:
            self._queue.put_nowait(SILENCE)
        self._seen = self.heard
        self._timer = self._loop.call_later(self._seconds, self._tick)

    def stop(self) -> None:
        self._timer.cancel()


# -----------------------------------------------------------------------------
# 10.4 Provider connections: kept alive, timed out, and their answers' heads
# -----------------------------------------------------------------------------

class ConnectionPool:
    """Idle keep-alive connections to providers, so that a call does not pay for a new TCP
    and TLS handshake. A connection comes back only after its answer was read to the end.
    During a burst up to `limit` stay idle in all (the next wave of calls reuses them); once
    the server is quiet, shrink() keeps a few per host."""

    def __init__(self, limit: int):
        self._idle = {}               # (connection class, host) -> [(connection, since)]
        self._lock = threading.Lock()
        self._limit = limit
        self._count = 0               # idle connections, every host

    def take(self, key):
        """An idle connection for key, or None."""
        with self._lock:
            entries = self._idle.get(key) or []
            while entries:
                connection, since = entries.pop()
                self._count -= 1
                if time.monotonic() - since < UPSTREAM_IDLE_SECONDS:
                    return connection
                connection.close()
        return None

    def give(self, key, connection) -> None:
        """Keep a connection whose answer was read to its end (it forgets its call, and with it
        the call's request, and its closed answer), or close it when enough are idle."""
        connection.upstream_call = None
        # http.client forgets a closed answer at the connection's next request; forgotten now,
        # an idle connection holds no answer and its headers while it waits
        connection._HTTPConnection__response = None
        with self._lock:
            if self._count < self._limit:
                self._idle.setdefault(key, []).append((connection, time.monotonic()))
                self._count += 1
                return
        connection.close()

    @property
    def idle(self) -> int:
        """Idle connections kept, every host."""
        return self._count

    def shrink(self, per_host: int) -> None:
        """Close all but the per_host most recently used idle connections of each host."""
        closing = []
        with self._lock:
            for entries in self._idle.values():
                if len(entries) > per_host:
                    closing += entries[:len(entries) - per_host]
                    del entries[:len(entries) - per_host]
            self._count -= len(closing)
        for connection, _ in closing:
            connection.close()

    def close_all(self) -> None:
        with self._lock:
            idle, self._idle, self._count = self._idle, {}, 0
        for entries in idle.values():
            for connection, _ in entries:
                connection.close()


# whole: the request went out whole (else the provider cut it short, maybe answering first).
SentRequest = collections.namedtuple("SentRequest", "key connection reused method whole")


def open_pooled(handler, req, connection_class, **connection_options):
    """urllib's do_open for a provider call, on a pooled connection when one is idle (unless
    req.reuse_connection is false): the answer, its head read; or, when the event loop reads
    it (req.answer_read_by_loop), the request sent, as a SentRequest.

    A pooled connection the provider has meanwhile closed fails at once; the request is then
    sent again on a fresh connection (by the caller, when it is the loop that finds out).
    Calls through an HTTPS proxy tunnel are not pooled, and their answers' heads read here.
    """
    call = req.upstream_call
    if getattr(req, "_tunnel_host", None):          # set by urllib's ProxyHandler
        return handler.do_open(_tracked_connection_factory(connection_class, req), req,
                               **connection_options)
    key = (connection_class, req.host)
    headers = dict(req.unredirected_hdrs)
    headers.update((k, v) for k, v in req.headers.items() if k not in headers)
    headers = {name.title(): value for name, value in headers.items()}
    for reuse in (True, False) if req.reuse_connection else (False,):
        connection = call.connections.take(key) if reuse else None
        if connection is None:
            reuse = False
            connection = connection_class(req.host, timeout=req.timeout, **connection_options)
        else:
            set_upstream_timeout(connection.sock, req.timeout)
            call.attach_socket(connection.sock)
        connection.upstream_call = call
        try:
            whole = send_request(connection, req, headers, reuse)
            if req.answer_read_by_loop:
                return SentRequest(key, connection, reuse, req.get_method(), whole)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            if reuse and isinstance(exc, STALE_CONNECTION_ERRORS) and not call.cancelled:
                continue
            raise urllib.error.URLError(exc) from None
        response.will_close = response.will_close or not whole
        response.pooled = (key, connection)
        return response


def send_request(connection, req, headers: dict, reused: bool) -> bool:
    """Send req: True when it went out whole. False when the provider cut a fresh connection
    short while it went out: it may have answered first (a 413 for a body too large), and the
    answer is then read as any other. A pooled connection cut short had been closed meanwhile:
    that raises, and the request goes again on a fresh one."""
    try:
        connection.request(req.get_method(), req.selector, req.data, headers)
    except (BrokenPipeError, ConnectionResetError):
        if reused:
            raise
        return False
    return True


STALE_CONNECTION_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError,
                           http.client.RemoteDisconnected, http.client.BadStatusLine)


HEAD_FIELD_LINE_RE = re.compile(rb"[\x21-\x39\x3b-\x7e]+:[^\r\n]*\r\n")   # `Name: value` CRLF


def read_head_fields(file) -> http.client.HTTPMessage:
    """An answer's header fields, read as http.client.parse_headers reads them (its limits on
    a line's length and on their number, the same HTTPMessage), but a head of plain `Name:
    value` lines is not handed to the email package's parser, which takes five times as long.
    Anything else (a folded line, a stray CR, a line that is no field) still goes to it."""
    lines = []
    while not lines or lines[-1] not in (b"\r\n", b"\n", b""):
        line = file.readline(http.client._MAXLINE + 1)
        if len(line) > http.client._MAXLINE:
            raise http.client.LineTooLong("header line")
        lines.append(line)
        if len(lines) > http.client._MAXHEADERS:
            raise http.client.HTTPException("got more than %d headers" % http.client._MAXHEADERS)
    fields = lines[:-1]
    if not all(map(HEAD_FIELD_LINE_RE.fullmatch, fields)):
        return email.parser.Parser(_class=http.client.HTTPMessage).parsestr(
            b"".join(lines).decode("iso-8859-1"))
    message = http.client.HTTPMessage()
    for line in fields:
        name, _, value = line.decode("iso-8859-1").partition(":")
        message[name] = value.lstrip(" \t")[:-2]
    return message


class HeadFieldsResponse(http.client.HTTPResponse):
    """http.client's answer, its head's fields read by read_head_fields. begin() works out
    what http.client's does (the same from Python 3.8 to 3.13): a 100 Continue skipped, the
    version, the body's framing (chunked, a length, or until the connection closes), whether
    the connection closes after it. Any other interim answer (103 Early Hints) is skipped too,
    as RFC 9110 §15.2 asks of a client; http.client takes it for the answer."""

    def begin(self):
        if self.headers is not None:
            return
        version, status, reason = self._read_status()
        while 100 <= status < 200 and status != http.client.SWITCHING_PROTOCOLS:
            read_head_fields(self.fp)
            version, status, reason = self._read_status()
        if version not in ("HTTP/1.0", "HTTP/0.9") and not version.startswith("HTTP/1."):
            raise http.client.UnknownProtocol(version)
        self.code = self.status = status
        self.reason = reason.strip()
        self.version = 10 if version in ("HTTP/1.0", "HTTP/0.9") else 11
        self.headers = self.msg = read_head_fields(self.fp)
        self.chunked = (self.headers.get("transfer-encoding") or "").lower() == "chunked"
        if self.chunked:
            self.chunk_left = None
        self.will_close = self._check_close()
        self.length = None if self.chunked else content_length(self.headers)
        if status in (204, 304) or 100 <= status < 200 or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True


def content_length(headers) -> int | None:
    """An answer's Content-Length as http.client takes it: None when absent, not a number, or
    negative."""
    try:
        length = int(headers.get("content-length") or "")
    except ValueError:
        return None
    return length if length >= 0 else None


KERNEL_TIMES_SOCKETS = sys.platform.startswith("linux")   # SO_RCVTIMEO takes a C timeval


class KernelTimedSocket(socket.socket):
    """A plain connection's socket that a worker thread uses blocking, each receive and send
    timed out by the kernel (SO_RCVTIMEO, SO_SNDTIMEO) rather than by Python: Python waits in
    poll() before every receive and send on a socket with a time-out, two more system calls
    per call to a provider, at each of which the worker lets go of the GIL and must take it
    back from the event loop. An operation the kernel timed out fails with EAGAIN, raised here
    as the socket.timeout Python would have raised. (Over TLS a timed-out read looks like the
    connection's end, so TLS sockets keep Python's time-outs.)"""

    __slots__ = ("kernel_timeout",)

    def wait_at_most(self, seconds: float) -> None:
        """Blocking, a receive or send failing after `seconds` without progress."""
        if self.gettimeout() is not None:
            self.settimeout(None)
        if getattr(self, "kernel_timeout", None) != seconds:   # in µs, never 0 (no limit)
            timeval = struct.pack("ll", *divmod(max(1, round(seconds * 1e6)), 1000000))
            self.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            self.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            self.kernel_timeout = seconds

    def recv_into(self, *args):
        try:
            return super().recv_into(*args)
        except BlockingIOError:
            raise self._timed_out() from None

    def sendall(self, *args):
        try:
            return super().sendall(*args)
        except BlockingIOError:
            raise self._timed_out() from None

    def _timed_out(self) -> OSError:
        """What an EAGAIN means: a time-out on a blocking socket, else "not yet" (the event
        loop reads this socket without blocking once a stream's head has come)."""
        if self.gettimeout() is None:
            return socket.timeout("timed out")
        return BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))


def kernel_timed_connection(address, timeout, source_address=None) -> KernelTimedSocket:
    """socket.create_connection (connecting within `timeout`), as a KernelTimedSocket."""
    connected = socket.create_connection(address, timeout, source_address)
    sock = KernelTimedSocket(connected.family, connected.type, connected.proto,
                             connected.detach())
    sock.settimeout(None)         # (its descriptor is non-blocking still, from Python's time-out)
    sock.wait_at_most(timeout)
    return sock


def set_upstream_timeout(sock, seconds: float) -> None:
    """Have a pooled connection's socket time out after `seconds` again (the event loop may
    have made it non-blocking; setting a time-out is a system call, so only when it changed)."""
    if isinstance(sock, KernelTimedSocket):
        sock.wait_at_most(seconds)
    elif sock.gettimeout() != seconds:
        sock.settimeout(seconds)


class TrackedConnection:
    """What ccproxy's connections to providers add to http.client's (both classes below): the
    socket remembered on the UpstreamCall, so the call can be cut from another thread; answers
    read by HeadFieldsResponse; and a request's head sent with its body in one send, where
    http.client makes two (the provider then reads one segment, not two), for a body of up to
    UPSTREAM_JOINED_BODY_BYTES (a larger one would be copied for little gain)."""

    upstream_call = None
    response_class = HeadFieldsResponse
    _head_waits = False               # the next send() is a request's head, its body follows
    _head = b""

    def connect(self):
        super().connect()
        self.upstream_call.attach_socket(self.sock)

    def request(self, method, url, body=None, *args, **kwargs):
        self._head_waits = isinstance(body, bytes) and 0 < len(body) <= UPSTREAM_JOINED_BODY_BYTES
        self._head = b""
        super().request(method, url, body, *args, **kwargs)

    def send(self, data):
        if self._head_waits:
            self._head_waits, self._head = False, data
            return
        if self._head:
            data, self._head = self._head + data, b""
        super().send(data)


class _TrackedHTTPConnection(TrackedConnection, http.client.HTTPConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if KERNEL_TIMES_SOCKETS:
            self._create_connection = kernel_timed_connection


class _TrackedHTTPSConnection(TrackedConnection, http.client.HTTPSConnection):
    pass


def _tracked_connection_factory(connection_class, request):
    def factory(host, **kwargs):
        connection = connection_class(host, **kwargs)
        connection.upstream_call = request.upstream_call
        return connection
    return factory


class _TrackedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return open_pooled(self, req, _TrackedHTTPConnection)


class _TrackedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return open_pooled(self, req, _TrackedHTTPSConnection, context=self._context)


class _ProxyHandlerPassingLoopback(urllib.request.ProxyHandler):
    """urllib's ProxyHandler for HTTP(S)_PROXY and NO_PROXY, but a provider on this machine
    (Ollama, LM Studio, vLLM on localhost) is called directly: a proxy elsewhere reaches its
    own loopback, not this machine's, and a corporate proxy set for everything made every
    local model fail (Go's HTTP client decides the same)."""

    def proxy_open(self, req, proxy, scheme):
        if names_loopback(urllib.parse.urlsplit(req.full_url).hostname or ""):
            return None
        return super().proxy_open(req, proxy, scheme)


def build_upstream_opener():
    """A urllib opener that honours HTTPS_PROXY/NO_PROXY and lets calls be cut mid-flight.

    Only the handlers a provider call needs: no redirects, no error processing (an error
    status comes back as a response like any other), nothing for file: or ftp: URLs.
    """
    opener = urllib.request.OpenerDirector()
    for handler in (_ProxyHandlerPassingLoopback(), _TrackedHTTPHandler(),
                    _TrackedHTTPSHandler()):
        opener.add_handler(handler)
    return opener



###############################################################################
# 11. Daemon
###############################################################################


# -----------------------------------------------------------------------------
# 11.1 The server in the foreground: signals, the config watched, usage kept
# -----------------------------------------------------------------------------

def run_foreground(config: Config, detached: bool = False, started_by: str = "foreground",
                   watch_code_sessions: bool = False) -> int:
    """Serve in this process until SIGINT/SIGTERM, with a pidfile; the exit status."""
    server = ProxyServer(config)
    try:
        configure_logging(config, detached, lambda: server.app.config.masker)
    except OSError as exc:
        print("ccproxy: cannot write the log file %s (log_file): %s" % (
            config.log_file, exc.strerror or exc), file=sys.stderr)
        return 1
    for note in config.warnings + serving_warnings(config):
        log.warning("%s", note)

    def on_ready(ready: ProxyServer) -> None:
        write_pidfile(pidfile_record(ready, config, started_by))
        log.info("ccproxy %s listening on %s (pid %d, config: %s)", __version__,
                 listening_on(ready), os.getpid(), config.source or "built-in defaults")
        tune_garbage_collector()

    stop_lock = StartLock()       # held from a decision to stop for want of sessions

    async def main_task():
        install_signal_handlers(server)
        if watch_code_sessions:
            watch_sessions(server, stop_lock)
        await server.serve(on_ready)

    try:
        asyncio.run(main_task())
    except OSError as exc:
        log.error("%s", listen_problem(config.host, config.port, exc))
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        remove_pidfile(os.getpid())
        stop_lock.release()
    log.info("ccproxy stopped")
    return 0


def raise_file_limit() -> None:
    """Let the server open as many files as the system allows it (the soft limit is often
    1,024 while the hard one is far higher), up to MAX_FILE_LIMIT; the connection limit
    follows. The server process only: an embedding program keeps its own limits."""
    try:
        import resource           # Unix only
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_FILE_LIMIT if hard == resource.RLIM_INFINITY else min(hard, MAX_FILE_LIMIT)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass


def serving_warnings(config: Config) -> list:
    """What the operator should know before the first request, beyond the config's own
    warnings: what the server will refuse to do as configured."""
    notes = []
    if not config.providers:
        notes.append("no provider configured: /v1/messages will answer 400 until one is added")
    elif not config.enabled_providers():
        notes.append("every provider is disabled: /v1/messages will answer 400 until one is "
                     "enabled")
    if not names_loopback(config.host) and not config.client_keys_in_use:
        notes.append("bound to %s without an apikey: only loopback clients will be served; set "
                     "apikey (or client_keys) to accept others" % bound_address(config.host))
    return notes


def install_signal_handlers(server: ProxyServer) -> None:
    """SIGINT and SIGTERM stop the server cleanly, SIGHUP reloads the config (where the
    platform has them)."""
    loop = asyncio.get_running_loop()
    actions = [(signal.SIGINT, server.stop), (signal.SIGTERM, server.stop)]
    if hasattr(signal, "SIGHUP"):
        actions.append((signal.SIGHUP, server.app.reload_config))
    for signum, action in actions:
        try:
            loop.add_signal_handler(signum, action)
        except (NotImplementedError, RuntimeError):
            pass


def every(seconds: float, action) -> None:
    """Call action() every `seconds` on the running loop, until it returns False."""
    loop = asyncio.get_running_loop()

    def tick():
        if action() is not False:
            loop.call_later(seconds, tick)

    loop.call_later(seconds, tick)


def watch_config_file(app: ProxyApp) -> None:
    """Reload the config when its file changes (checked every few seconds)."""
    def check():
        current = file_signature(app.config.source)
        if current is not None and current != app.config_signature:
            app.config_signature = current
            app.reload_config()

    every(CONFIG_WATCH_SECONDS, check)


USAGE_SAVE_SECONDS = 30.0            # the usage file is written this often, when changed


def keep_usage(app: ProxyApp) -> None:
    """With usage_file set: take back the usage it holds, then write it every little while
    when it has changed (and at stop), so counters outlive a restart. The file is the first
    copy's that keeps it (a lock beside it): another that names it warns and counts in memory
    only, where each would have overwritten the other's counts."""
    path = app.config.usage_file
    if not path:
        return
    lock = FileLock(path + ".lock")
    if not lock.acquire(0):
        log.warning("usage_file %s is kept by another ccproxy; this one counts in memory only "
                    "(give each copy its own file)", path)
        return
    if not restore_usage(app, path):
        lock.release()
        return
    app.usage_kept = (path, lock)
    every(USAGE_SAVE_SECONDS, lambda: save_usage(app))


def restore_usage(app: ProxyApp, path: str) -> bool:
    """Take back the usage a usage file holds; False when the file is there but must be left
    as it is (it cannot be read, nor moved aside): this server then counts in memory only."""
    try:
        with open(path, encoding="utf-8") as handle:
            app.usage.restore(dict_of(json.load(handle)))
    except FileNotFoundError:
        pass
    except (ValueError, RecursionError) as exc:
        return set_aside_unreadable(path, exc)
    except OSError as exc:
        log.warning("usage_file %s could not be read; this ccproxy counts in memory only and "
                    "leaves the file as it is: %s", path, exc)
        return False
    return True


def set_aside_unreadable(path: str, problem: Exception) -> bool:
    """Move a usage file that is not the JSON ccproxy writes (cut short by a full disk, edited
    by hand) to <path>.unreadable, so that counting from zero overwrites nothing; False, the
    file left alone, when it cannot be moved."""
    problem = "nested too deeply" if isinstance(problem, RecursionError) else problem
    try:
        os.replace(path, path + ".unreadable")
    except OSError as exc:
        log.warning("usage_file %s could not be read (%s) nor moved aside (%s); this ccproxy "
                    "counts in memory only and leaves the file as it is", path, problem, exc)
        return False
    log.warning("usage_file %s could not be read (%s); it is kept as %s.unreadable, and the "
                "counters start from zero", path, problem, path)
    return True


def save_usage(app: ProxyApp) -> None:
    """Write the usage file this server keeps (atomically, 0600) when there is news for it."""
    if app.usage_kept is not None and app.usage.changed:
        path = app.usage_kept[0]
        try:
            write_private_file(path, app.usage.saved())
        except OSError as exc:
            log.warning("usage_file %s could not be written: %s", path, exc)


def stop_keeping_usage(app: ProxyApp) -> None:
    """The server's last save of its usage file, and the file let go to another copy."""
    save_usage(app)
    if app.usage_kept is not None:
        app.usage_kept[1].release()
        app.usage_kept = None


def watch_sessions(server: ProxyServer, lock: StartLock) -> None:
    """Stop the server once no `code` session is alive (checked every few seconds), so a
    proxy that `code` started does not outlive its sessions, even crashed ones. The check is
    made under the start lock, which a decision to stop keeps (the caller lets it go once the
    server has ended): a session that begins meanwhile waits, then starts a proxy of its own
    rather than joining this one as it goes."""
    def check():
        if lock.acquire(0) and live_sessions() == 0:
            log.info("no Claude Code session left; stopping")
            server.stop()
            return False
        lock.release()
        return True

    every(SESSION_CHECK_SECONDS, check)


# -----------------------------------------------------------------------------
# 11.2 Logs, and the files in ~/.ccproxy: pidfile and locks
# -----------------------------------------------------------------------------

class SafeLogFilter(logging.Filter):
    """Makes each log record safe to write, whatever code logged it: every secret of the
    running configuration (as it is now: providers added live included) masked, its traceback
    too, and the control characters of its line escaped (see printable_log_line)."""

    def __init__(self, current_masker):
        super().__init__()
        self._current_masker = current_masker

    def filter(self, record: logging.LogRecord) -> bool:
        masker = self._current_masker()
        record.msg, record.args = printable_log_line(masker.text(record.getMessage())), ()
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = masker.text(record.exc_text)
        return True


LOG_UNSAFE_CHARACTER_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable_log_line(line: str) -> str:
    """A log line with its control characters written as escapes: a line break or a terminal
    escape that a client put in a model name or a path neither forges a line nor colours one
    (a traceback, logged apart, keeps its lines)."""
    return LOG_UNSAFE_CHARACTER_RE.sub(lambda found: "\\x%02x" % ord(found.group()), line)


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A size-rotated log whose files are created with mode 0600 (a log may hold request
    bodies, with log_bodies)."""

    def _open(self):
        descriptor = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if os.name != "nt":
            os.chmod(self.baseFilename, 0o600)       # a file an older version left readable
        return os.fdopen(descriptor, "a", encoding=self.encoding or "utf-8")


def configure_logging(config: Config, detached: bool, current_masker) -> None:
    """Log to stderr in the foreground, to log_file (rotated by size, 0600) when detached;
    secrets masked either way, as current_masker() knows them."""
    if detached:
        ensure_private_directory(os.path.dirname(config.log_file))
        handler = PrivateRotatingFileHandler(config.log_file, maxBytes=LOG_FILE_MAX_BYTES,
                                             backupCount=LOG_FILE_BACKUPS, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s ccproxy %(levelname)s %(message)s"))
    handler.addFilter(SafeLogFilter(current_masker))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def ccproxy_home() -> str:
    """~/.ccproxy: the pidfile, session leases and (by default) the log live here."""
    return os.path.join(os.path.abspath(os.path.expanduser("~")), ".ccproxy")


def pidfile_path() -> str:
    """~/.ccproxy/ccproxy.pid."""
    return os.path.join(ccproxy_home(), "ccproxy.pid")


def ensure_private_directory(path: str) -> None:
    """Make the directory (mode 0700) if it is missing; ~/.ccproxy is tightened to 0700 when
    an older version left it open to others."""
    if not path:
        return
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.name != "nt" and os.path.abspath(path) == ccproxy_home():
        mode = os.stat(path).st_mode & 0o777
        if mode & 0o077:
            os.chmod(path, 0o700)


def write_private_file(path: str, text: str) -> None:
    """Write a file atomically (temporary file, then rename) with mode 0600, in a directory
    made 0700 when it has to be made."""
    ensure_private_directory(os.path.dirname(path))
    temporary = "%s.%d.tmp" % (path, os.getpid())
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


def read_pidfile() -> dict | None:
    """The pidfile's record (pid, url, version, started_at, config, started_by), if readable."""
    try:
        with open(pidfile_path(), encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError, RecursionError):
        return None
    valid = isinstance(record, dict) and type(record.get("pid")) is int and record["pid"] > 0 \
        and isinstance(record.get("url"), str)
    return record if valid else None


def remove_pidfile(pid: int) -> None:
    """Remove the pidfile if it still names pid (another instance may have replaced it)."""
    record = read_pidfile()
    if record is not None and record["pid"] == pid:
        try:
            os.remove(pidfile_path())
        except OSError:
            pass


class FileLock:
    """A lock of an open file at path, for one process at a time: the system lets it go when
    its holder dies (flock; a byte lock on Windows)."""

    def __init__(self, path: str):
        self.path = path
        self._descriptor = None

    def acquire(self, seconds: float) -> bool:
        """Take the lock, trying for up to `seconds`; False when another process held it all
        that time. Where no lock can be kept (a folder that cannot be written, where what the
        lock guards then fails saying why; a file system without locks), it counts as taken."""
        try:
            ensure_private_directory(os.path.dirname(self.path))
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return True
        deadline = time.monotonic() + seconds
        while not lock_open_file(descriptor):
            if time.monotonic() >= deadline:
                os.close(descriptor)
                return False
            time.sleep(STOP_POLL_SECONDS)
        self._descriptor = descriptor
        return True

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None


class StartLock(FileLock):
    """~/.ccproxy/start.lock: held while a command decides to start the background proxy or to
    stop it, and by a proxy that `code` started from the moment it decides to stop on its own
    until it has ended. `code` sessions that begin or end together then share one proxy, where
    each started its own and all but one found the port taken."""

    def __init__(self):
        super().__init__(os.path.join(ccproxy_home(), "start.lock"))

    def __enter__(self) -> "StartLock":
        if not self.acquire(START_LOCK_QUIET_SECONDS):
            print("ccproxy: waiting for another ccproxy to finish starting or stopping",
                  file=sys.stderr)
            if not self.acquire(START_LOCK_WAIT_SECONDS):
                print("ccproxy: going on without %s, held for %g s by another process" % (
                    self.path, START_LOCK_WAIT_SECONDS), file=sys.stderr)
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


LOCK_HELD_ERRNOS = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES,
                    getattr(errno, "EDEADLOCK", errno.EDEADLK))


def lock_open_file(descriptor: int) -> bool:
    """Lock an open file for this process alone, without waiting: False when another process
    holds it (True when locked, or when the file system keeps no locks)."""
    try:
        try:
            import fcntl             # Unix
        except ImportError:
            import msvcrt            # Windows
            msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno not in LOCK_HELD_ERRNOS
    return True


def write_pidfile(record: dict) -> None:
    """Write the pidfile; where the home cannot be written (systemd's ProtectHome=, a read-only
    file system), say so and serve on: status, stop and code will not find this proxy."""
    try:
        write_private_file(pidfile_path(), json.dumps(record))
    except OSError as exc:
        log.warning("cannot write the pidfile %s: %s; serving without it (status, stop and code "
                    "will not find this proxy)", pidfile_path(), exc.strerror or exc)


def pidfile_record(server: ProxyServer, config: Config, started_by: str) -> dict:
    """What the pidfile says about this server."""
    host, port = server.app.listen_address
    return {"pid": os.getpid(), "url": client_url(host, port), "host": host, "port": port,
            "version": __version__, "started_at": time.time(), "config": config.source,
            "started_by": started_by, "shutdown_timeout": config.shutdown_timeout}


# -----------------------------------------------------------------------------
# 11.3 The background server: found, started, stopped
# -----------------------------------------------------------------------------

WILDCARD_HOSTS = {"": "every address, IPv4 and IPv6", "0.0.0.0": "every IPv4 address",
                  "::": "every IPv6 address"}


def bound_address(host: str) -> str:
    """host as an operator reads it: a wildcard said in words."""
    return "%s (%s)" % (host or '""', WILDCARD_HOSTS[host]) if host in WILDCARD_HOSTS else host


def listening_on(server) -> str:
    """Where the server listens, for its first log line: its URL, and for a wildcard host the
    addresses it covers and the URL this machine's clients use."""
    host, port = server.app.listen_address
    if host not in WILDCARD_HOSTS:
        return server.url
    return "port %d of %s; on this machine %s" % (port, bound_address(host), server.url)


def client_url(host: str, port: int) -> str:
    """The URL a client on this machine uses: a wildcard bind is reached on loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return "http://%s:%d" % ("[%s]" % host if ":" in host else host, port)


def process_alive(pid: int) -> bool:
    """Whether a process with that pid exists."""
    if os.name == "nt":
        return windows_process_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def windows_process_alive(pid: int) -> bool:
    """Windows has no signal 0: ask for the process's exit code (259 means still running)."""
    import ctypes          # only on Windows, where it is part of every Python
    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(WINDOWS_QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:
        return False
    code = ctypes.c_ulong()
    found = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
    kernel32.CloseHandle(handle)
    return bool(found) and code.value == WINDOWS_STILL_ACTIVE


def process_is_ccproxy(pid: int) -> bool:
    """Whether pid runs ccproxy, under its own name or this file's (a recycled pid belongs to
    some other program)."""
    names = (b"ccproxy", os.path.basename(__file__).encode())
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            command = handle.read()
    except OSError:
        try:
            command = subprocess.run(["ps", "-o", "command=", "-p", str(pid)],
                                     capture_output=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return True
    return any(name in command for name in names)


def local_get(url: str, path: str, apikey: str = "", timeout: float = 2.0):
    """GET a path of a local ccproxy, never through a user's HTTP proxy; (status, JSON) or None."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        request = urllib.request.Request(url + path,
                                         headers={"x-api-key": apikey} if apikey else {})
        with opener.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, None
    except (OSError, ValueError, http.client.HTTPException):    # one: a port that is no number
        return None


def running_proxy() -> dict | None:
    """The pidfile record of a live ccproxy, or None; a stale pidfile is removed. A ccproxy
    that holds its port but does not answer /health in time (a loop held up, a process
    stopped) is still running: its record says "answering": False, and is kept, so that
    `stop` can still end it."""
    record = read_pidfile()
    if record is None:
        return None
    pid = record["pid"]
    if process_alive(pid) and process_is_ccproxy(pid):
        answer = local_get(record.get("url", ""), "/health")
        if answer is not None and answer[0] == 200:
            return record
        if accepts_connections(record.get("url", "")):
            return dict(record, answering=False)
    remove_pidfile(pid)
    return None


NOT_ANSWERING = "it does not answer /health (busy, or its process stopped?)"


def accepts_connections(url: str) -> bool:
    """Whether something listens at the URL's host and port."""
    try:
        parts = urllib.parse.urlsplit(url)
        with socket.create_connection((parts.hostname, parts.port), timeout=1):
            return True
    except (OSError, ValueError, TypeError):
        return False


def sessions_dir() -> str:
    """~/.ccproxy/sessions: one lease file per running `code` session (holding the settings it
    gives claude)."""
    return os.path.join(ccproxy_home(), "sessions")


def live_sessions() -> int:
    """How many `code` sessions are alive; leases of sessions that died are removed (as is one
    whose pid another program has since been given, after a crash and a reboot)."""
    try:
        names = os.listdir(sessions_dir())
    except OSError:
        return 0
    alive = 0
    for name in filter(str.isdigit, names):   # not a lease being written (its .tmp file)
        if process_alive(int(name)) and process_is_ccproxy(int(name)):
            alive += 1
        else:
            try:
                os.remove(os.path.join(sessions_dir(), name))
            except OSError:
                pass
    return alive


def port_problem(host: str, port: int) -> str | None:
    """Why the proxy could not listen on host:port, found by trying; None when it can."""
    if port == 0:
        return None
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            if os.name != "nt":
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        return listen_problem(host, port, exc)
    return None


def listen_problem(host: str, port: int, exc: OSError) -> str:
    """What to do about a failure to listen on host:port."""
    if exc.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
        return ("port %d on %s is already in use (another program, or another user's "
                "ccproxy, listens there): choose another with --port or the config's "
                "`port`" % (port, host))
    if exc.errno in (errno.EACCES, getattr(errno, "WSAEACCES", -1)):
        return ("port %d on %s is not this user's to take (ports under 1024 need privileges "
                "on most systems): choose one from 1024 up with --port or the config's "
                "`port`" % (port, host))
    cause = exc.__cause__ or exc                  # what open_listeners() met, when it says
    return "cannot listen on %s:%d: %s" % (host, port, cause.strerror or cause)


def detach_options() -> dict:
    """Popen options that detach a child from this terminal and session."""
    options = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL,
               "stderr": subprocess.DEVNULL, "close_fds": True}
    if os.name == "nt":
        options["creationflags"] = (getattr(subprocess, "DETACHED_PROCESS", 0)
                                    | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0))
    else:
        options["start_new_session"] = True
    return options


# The background server loads this file by its path, whatever its name (it may be vendored as
# tools/anything.py), as a module rather than a script, so that Python's bytecode cache spares
# it compiling ~10,000 lines (tens of MB and ms).
DETACHED_LAUNCHER = (
    "import importlib.util, sys; "
    "spec = importlib.util.spec_from_file_location('ccproxy', %r); "
    "module = importlib.util.module_from_spec(spec); sys.modules['ccproxy'] = module; "
    "spec.loader.exec_module(module); sys.exit(module.main())")


def server_environment() -> dict:
    """The environment a server process starts in. With glibc, Python's small-object allocator
    gives way to the C one (PYTHONMALLOC=malloc, unless set): what a burst of streams leaves
    free then goes back to the system page by page (MemoryReturn), where the small-object
    allocator keeps each 1 MB arena for as long as any one object in it lives."""
    environment = dict(os.environ)
    if malloc_trim_function():
        environment.setdefault("PYTHONMALLOC", "malloc")
    return environment


def start_detached(config: Config, started_by: str) -> dict | None:
    """Start the proxy in the background and wait until it answers /health; its pidfile
    record, or None after printing why it could not start (what the child wrote to stderr
    and to the log before it ended)."""
    problem = port_problem(config.host, config.port)
    if problem:
        print("ccproxy: %s" % problem, file=sys.stderr)
        return None
    command = [sys.executable, "-c", DETACHED_LAUNCHER % os.path.abspath(__file__), "start",
               "--foreground", "--detached", "--started-by", started_by,
               "--host", config.host, "--port", str(config.port)]
    if config.source:
        command += ["--config", config.source]
    if started_by == "code":
        command.append("--watch-sessions")
    log_size = file_size(config.log_file)
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen(command, env=server_environment(),
                                 **dict(detach_options(), stderr=errors))
        deadline = time.monotonic() + START_WAIT_SECONDS
        while time.monotonic() < deadline and child.poll() is None:
            record = read_pidfile()
            if record is not None and record["pid"] == child.pid and local_get(
                    record["url"], "/health") is not None:
                return record
            time.sleep(0.05)
        reason = "it exited with status %s" % child.returncode if child.poll() is not None \
            else "it did not answer within %g s" % START_WAIT_SECONDS
        errors.seek(0)
        said = errors.read().decode("utf-8", "replace") + text_since(config.log_file, log_size)
    print("ccproxy: could not start: %s%s" % (reason, "".join(
        "\n  " + line for line in said.strip().splitlines()[-START_FAILURE_LINES:])),
        file=sys.stderr)
    return None


def file_size(path: str) -> int:
    """The size of a file, 0 when it does not exist."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def text_since(path: str, offset: int) -> str:
    """What was written to a file after offset ("" when it cannot be read)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


def stop_proxy(record: dict, report=None) -> str:
    """SIGTERM, wait for the drain, then kill; says how it ended. report, when given, hears
    what it waits for, every few seconds."""
    pid, grace = record["pid"], record.get("shutdown_timeout")
    grace = grace if is_number(grace) and grace > 0 else DEFAULT_SHUTDOWN_TIMEOUT_SECONDS
    if report is not None:
        report("ccproxy (pid %d): stopping; open requests may finish within %g s "
               "(performance.shutdown_timeout)" % (pid, grace))
    os.kill(pid, signal.SIGTERM)
    if wait_for_exit(pid, grace + STOP_MARGIN_SECONDS, report):
        remove_pidfile(pid)
        return "stopped"
    os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))
    wait_for_exit(pid, STOP_MARGIN_SECONDS)
    remove_pidfile(pid)
    return "killed after the %g s grace period" % grace


def wait_for_exit(pid: int, seconds: float, report=None) -> bool:
    """Wait up to seconds for pid to end; whether it did. report, when given, hears every
    STOP_REPORT_SECONDS how long is left."""
    deadline = time.monotonic() + seconds
    next_report = time.monotonic() + STOP_REPORT_SECONDS
    while time.monotonic() < deadline:
        if not process_alive(pid) or not process_is_ccproxy(pid):
            return True
        if report is not None and time.monotonic() >= next_report:
            report("  still finishing open requests; %d s before it is killed"
                   % (deadline - time.monotonic()))
            next_report += STOP_REPORT_SECONDS
        time.sleep(STOP_POLL_SECONDS)
    return False



###############################################################################
# 12. CLI
###############################################################################

# -----------------------------------------------------------------------------
# 12.1 Arguments, and the config a command runs on
# -----------------------------------------------------------------------------

def build_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser: one subcommand per verb of the original; name is how the user ran
    this program, for the usage lines and examples."""
    parser = argparse.ArgumentParser(
        prog=name, description="Let Claude Code use any LLM provider.",
        epilog="example: %s code" % name)
    parser.add_argument("--version", action="version", version="ccproxy %s" % __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_start_parser(commands, name)
    stop = commands.add_parser(
        "stop", help="stop the running proxy",
        description="Stop the running proxy: in-flight answers may finish within "
                    "performance.shutdown_timeout, then it is killed. Not running: exit 0. "
                    "With --config, only a proxy started with that config file is stopped.",
        epilog="example: %s stop" % name)
    add_config_flags(stop, listen=False)
    status = commands.add_parser(
        "status", help="show whether the proxy runs",
        description="Show pid, address, uptime, version, config file and providers; exit 0 when "
                    "running, 3 when not. With --config, running means started with that file.",
        epilog="example: %s status --json" % name)
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--statusline", action="store_true",
                        help="print one line for Claude Code's statusLine setting (reads its "
                             "JSON on stdin: this session's model, tokens and cost)")
    add_config_flags(status, listen=False)
    commands.add_parser("code", help="run Claude Code through the proxy (starts it if needed)",
                        add_help=False)
    env = commands.add_parser(
        "env", help="print the environment for Claude Code",
        description="Print the variables that point Claude Code at the proxy, for your shell.",
        epilog='example: eval "$(%s env)"' % name)
    env.add_argument("--shell", choices=sorted(SHELL_RENDERERS),
                     help="shell syntax (default: from $SHELL, PowerShell on Windows)")
    env.add_argument("--statusline", action="store_true",
                     help="print instead the statusLine setting for ~/.claude/settings.json")
    add_config_flags(env)
    commands.add_parser("version", help="print the version", description="Print the version.",
                        epilog="example: %s version" % name)
    return parser


def add_start_parser(commands, name: str) -> None:
    """The `start` subcommand: its flags, and the hidden ones of a background server."""
    start = commands.add_parser(
        "start", help="start the proxy in the background (or --foreground)",
        description="Start the proxy: in the background, returning once it answers, or in the "
                    "foreground with --foreground. Already running: says where, exit 0.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="examples:\n" + "\n".join(
            "  %s start %s" % (name, flags) for flags in (
                "--config ~/.ccproxy/config.json", "--check", "--check --probe")))
    start.add_argument("--foreground", action="store_true",
                       help="stay attached, log to stderr (systemd, containers)")
    start.add_argument("--check", action="store_true",
                       help="validate the configuration, print the result and exit 0 or 1")
    start.add_argument("--probe", action="store_true",
                       help="with --check: call each enabled provider once and print a table")
    add_config_flags(start)
    start.add_argument("--detached", action="store_true", help=argparse.SUPPRESS)
    start.add_argument("--started-by", default="foreground", help=argparse.SUPPRESS)
    start.add_argument("--watch-sessions", action="store_true", help=argparse.SUPPRESS)


def build_code_parser(name: str) -> argparse.ArgumentParser:
    """The help of `code`: its own flags; every other argument goes to claude."""
    parser = argparse.ArgumentParser(
        prog=name + " code", usage="%s code [--config FILE] [--host H] [--port P] "
                                   "[--subagent-model PROVIDER,MODEL] [--statusline] "
                                   "[claude arguments…] [-- claude arguments…]" % name,
        description="Start the proxy if it is not running, then run Claude Code ('claude', or "
                    "$CLAUDE_PATH) through it. Arguments not listed here go to claude unchanged; "
                    "after -- everything does. Returns claude's exit status. A proxy that code "
                    "started stops when the last code session ends.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  %s code\n  %s code -p \"fix the tests\"\n  %s code -- --help"
               % (name, name, name))
    add_config_flags(parser)
    parser.add_argument("--subagent-model", metavar="PROVIDER,MODEL",
                        help="the model Claude Code's subagents use (CLAUDE_CODE_SUBAGENT_MODEL); "
                             "without it they follow routes.subagent")
    parser.add_argument("--statusline", action="store_true",
                        help="show ccproxy's status line in this session (passed to claude as "
                             "--settings; your settings files are not changed)")
    return parser


def add_config_flags(parser: argparse.ArgumentParser, listen: bool = True) -> None:
    """The --config flag, and (with listen) --host and --port."""
    parser.add_argument("--config", metavar="FILE", help="config file (default: search "
                        + ", ".join(CONFIG_SEARCH_PATHS) + ")")
    if listen:
        parser.add_argument("--host", help="address to listen on (default %s)" % DEFAULT_HOST)
        parser.add_argument("--port", type=int, help="port to listen on (default %d)"
                            % DEFAULT_PORT)


def config_from_args(config_file: str | None, flags: dict | None = None,
                     logged: bool = False) -> Config | None:
    """The Config for a command, flags layered on top, or None once its error is printed.
    What the user should know goes to stderr: which file is in use, what was skipped or
    converted, and each warning (unless logged: a server logs those itself)."""
    try:
        config = load_config(config_file, os.environ, flags)
    except ConfigError as exc:
        print("ccproxy: configuration error:\n%s" % exc, file=sys.stderr)
        return None
    for note in config.notes:
        print("ccproxy: %s" % note, file=sys.stderr)
    if not logged:
        for warning in config.warnings:
            print("ccproxy: warning: %s" % warning, file=sys.stderr)
        print("ccproxy: config: %s" % (config.source or "none found, built-in defaults"),
              file=sys.stderr)
    return config


def same_file(first: str | None, second: str | None) -> bool:
    """Whether two config paths (None: built-in defaults) name the same file."""
    if first is None or second is None:
        return first == second
    return os.path.abspath(os.path.expanduser(first)) == os.path.abspath(os.path.expanduser(second))


def started_with_other_config(record: dict, config_file: str | None) -> str | None:
    """When --config names a file other than the one the running proxy was started with: a
    sentence saying so, else None."""
    if config_file is None or same_file(record.get("config"), config_file):
        return None
    return "the proxy running at %s (pid %d) was started with %s, not %s" % (
        record["url"], record["pid"], record.get("config") or "built-in defaults", config_file)


def config_of(record: dict, fallback: Config) -> Config:
    """The configuration a running proxy was started with (for its apikey), if readable."""
    try:
        return load_config(record.get("config"), os.environ) if record.get("config") else fallback
    except ConfigError:
        return fallback


# -----------------------------------------------------------------------------
# 12.2 start, and what --check --probe finds
# -----------------------------------------------------------------------------

def cmd_start(args) -> int:
    """start: in the background (default) or the foreground, or --check (and --probe)."""
    if args.foreground:
        raise_file_limit()
    config = config_from_args(args.config, {"host": args.host, "port": args.port},
                              logged=args.foreground)
    if config is None:
        return 1
    if args.check:
        return check_config(config, args.probe)
    if args.foreground:
        running = running_proxy()
        if running is not None:
            return told_running(running, args.config, True)
        return run_foreground(config, args.detached, args.started_by, args.watch_sessions)
    with StartLock():
        running = running_proxy()
        record = start_detached(config, "start") if running is None else None
    if running is not None:
        return told_running(running, args.config, False)
    if record is None:
        return 1
    print("ccproxy %s started at %s (pid %d); log: %s" % (
        __version__, record["url"], record["pid"], config.log_file))
    for note in serving_warnings(config):
        print("ccproxy: warning: %s" % note, file=sys.stderr)
    return 0


def told_running(running: dict, config_path: str | None, foreground: bool) -> int:
    """start's exit status when a proxy already runs, having said so (and, when it runs
    another config than the one asked for, how to change that)."""
    other = started_with_other_config(running, config_path)
    if other:
        print("ccproxy: %s; stop it first (%s stop)" % (other, command_name()), file=sys.stderr)
        return 1
    print("ccproxy is already running at %s (pid %d)" % (running["url"], running["pid"]))
    note_running_proxy(running)
    return 1 if foreground else 0


def note_running_proxy(running: dict) -> None:
    """Say so when the running proxy does not answer, or is another version than this file (one
    replaced by a newer copy while it ran), and how to end it."""
    if running.get("answering") is False:
        print("ccproxy: the proxy running at %s (pid %d): %s; `%s stop` ends it" % (
            running["url"], running["pid"], NOT_ANSWERING, command_name()), file=sys.stderr)
    if running.get("version") != __version__:
        print("ccproxy: the proxy running at %s is version %s, this file is %s; `%s stop` ends "
              "it, and the next start runs this one" % (running["url"], running.get("version"),
                                                        __version__, command_name()),
              file=sys.stderr)


def check_config(config: Config, probe: bool) -> int:
    """start --check: the verdict on the config (and, for another router's, the converted
    one); with probe, a table of what each enabled provider answered. Exit status 1 when a
    provider or model that routes use failed."""
    verdict = sys.stdout
    if config.converted_from:         # stdout is the converted config alone, ready to save
        print(json.dumps(config.file_content, indent=2, ensure_ascii=False))
        verdict = sys.stderr
    print("configuration OK: %s (%d provider%s)" % (
        config.source or "built-in defaults", len(config.providers),
        "" if len(config.providers) == 1 else "s"), file=verdict)
    for note in serving_warnings(config):
        print("ccproxy: warning: %s" % note, file=sys.stderr)
    if not probe:
        return 0
    if not config.enabled_providers():
        print("nothing to probe: no provider is enabled", file=sys.stderr)
        return 1
    rows = asyncio.run(probe_providers(config))
    print(render_table(("provider", "reachable", "key", "latency", "models"),
                       [row[:5] for row in rows]), file=verdict)
    failed = [row[0] for row in rows if row.failed and row.routed]
    if failed:
        print("routed providers or models failing: %s" % ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


ProbeRow = collections.namedtuple("ProbeRow",
                                  "provider reachable key latency models failed routed")


async def probe_providers(config: Config) -> list:
    """A ProbeRow per enabled provider, all probed at once."""
    providers = config.enabled_providers()
    upstream = Upstream(max(len(providers), 1))
    try:
        return await asyncio.gather(*(
            probe_provider(upstream, provider, routed_models(config, provider))
            for provider in providers))
    finally:
        upstream.close("the probe is over")


def routed_models(config: Config, provider: Provider):
    """The models that routes (and their fallbacks) send to a provider, or None when no route
    names it; with no routes at all, requests reach the first enabled provider's first model."""
    if not config.routes:
        first = config.enabled_providers()[0]
        return first.models[:1] if provider is first else None
    named = [model for route in config.routes.values()
             for name, model in [(route.provider, route.model)] + list(route.fallbacks)
             if name == provider.name]
    return list(dict.fromkeys(named)) or None


async def probe_provider(upstream: Upstream, provider: Provider, models) -> ProbeRow:
    """Call the provider's model list once (or, without one, send each routed model the
    smallest request) and say what came back."""
    protocol = PROTOCOLS[provider.protocol]
    started = time.monotonic()
    outgoing = protocol.models_request(provider)
    status, listed = await probe_call(upstream, provider, outgoing) if outgoing else (404, None)
    latency = "%d ms" % ((time.monotonic() - started) * 1000)
    routed = models is not None
    if isinstance(listed, ProxyError):
        return ProbeRow(provider.name, "no", "-", "-", listed.message, True, routed)
    if status in (401, 403):
        return ProbeRow(provider.name, "yes", "refused (HTTP %d)" % status, latency,
                        upstream_error_message(listed or b""), True, routed)
    if status != 200:
        known = {model: await probe_model(upstream, provider, model) for model in models or ()}
    else:
        names = listed_names(protocol, listed)     # Ollama lists "qwen3-coder:latest"
        known = {model: "ok" if {model, model + ":latest"} & names else "not listed"
                 for model in models or ()}
    tools_verdict = tools_check(provider)
    if tools_verdict is not None:
        known = {model: await tools_verdict(upstream, provider, model)
                 if verdict == "ok" else verdict for model, verdict in known.items()}
    notes = [await ollama_context_note(upstream, provider, model) if verdict == "ok" else ""
             for model, verdict in known.items()]
    shown = "; ".join("%s %s%s" % (model, verdict, note) for (model, verdict), note in zip(
        known.items(), notes)) or "(none routed here)"
    return ProbeRow(provider.name, "yes", "accepted", latency, shown,
                    any(not verdict.startswith("ok") for verdict in known.values()), routed)


def tools_check(provider: Provider):
    """How the probe finds out whether a provider's models can use Claude Code's tools: an
    Ollama server says so of each model; a server of no preset (vLLM, llama.cpp, LM Studio)
    is asked to call one; a provider with a preset parses its models' calls (None)."""
    if provider.runs_models_itself:
        return ollama_tools_verdict
    if provider.name.lower() not in PROVIDER_PRESETS and provider.protocol == "openai" \
            and not provider.quirks["azure"] and not provider.quirks["api"]:
        return tool_call_verdict
    return None


# How open models write a tool call as text when their server does not parse it (vLLM without
# the model's --tool-call-parser, llama.cpp without --jinja): Hermes' and Qwen's <tool_call>,
# Qwen3-Coder's <function=…>, Mistral's [TOOL_CALLS], Llama's <|python_tag|>, DeepSeek's own.
TEXT_TOOL_CALL_RE = re.compile(r"<tool_call>|<function=|\[TOOL_CALLS\]|<\|python_tag\|>|"
                               "<\uff5ctool\u2581calls\u2581begin\uff5c>")
PROBE_TOOL_REQUEST = {"max_tokens": 512, "tools": [{
    "name": "current_time", "description": "Tells the current time.",
    "input_schema": {"type": "object", "properties": {}}}], "messages": [{
        "role": "user", "content": "What time is it? Call current_time to find out."}]}


async def tool_call_verdict(upstream: Upstream, provider: Provider, model: str) -> str:
    """"ok", or what keeps a model of a server of no preset from calling Claude Code's tools,
    from one request that asks it to call one: the server refuses tools, or gives the call
    back as text (it does not parse the model's calls: Claude Code would only show them)."""
    status, answer = await probe_messages(upstream, provider, dict(PROBE_TOOL_REQUEST,
                                                                   model=model))
    if isinstance(answer, ProxyError) or status >= 400:
        words = answer.message if isinstance(answer, ProxyError) else upstream_error_message(
            answer or b"")
        fix = next((fix for refusal, fix in TOOLS_REFUSALS if refusal.search(words)), None)
        return "gives it no tools: " + fix % "routes" if fix else "ok"
    try:
        message = dict_of(dict_of(list_of(dict_of(json.loads(answer)).get("choices"))[0]).get(
            "message"))
    except (ValueError, RecursionError, IndexError):
        return "ok"
    return written_calls_verdict(message, provider) + opened_thinking_note(
        message.get("content"))


def written_calls_verdict(message: dict, provider: Provider) -> str:
    """"ok", or what the probe's answer says of the calls its model writes as text."""
    text = message.get("content")
    if message.get("tool_calls") or not isinstance(text, str) \
            or not TEXT_TOOL_CALL_RE.search(text):
        return "ok"
    if provider.quirks["text_tool_calls"] and reads_a_text_call(text):
        return "ok, though it writes its tool calls as text, which ccproxy reads (" + \
            TEXT_CALLS_FIX + " has the server parse them)"
    return ("writes its tool calls as text, which Claude Code would only show: the server "
            "does not parse them (%s)" % TEXT_CALLS_FIX)


TEXT_CALLS_FIX = "vLLM: --enable-auto-tool-choice and the model's --tool-call-parser; " \
                 "llama-server: --jinja"


def opened_thinking_note(text) -> str:
    """What the probe says of an answer whose text closes a thinking it never opened (see
    learns_opened_thinking); "" of any other."""
    if not isinstance(text, str) or not closes_alone(text):
        return ""
    return (", and writes its thinking into the text with only the closing tag, which ccproxy "
            "reads from its second answer on (vLLM, SGLang: the model's --reasoning-parser "
            "has the server split it)")


def reads_a_text_call(text: str) -> bool:
    """Whether TextToolCalls reads the probe's call in an answer's text."""
    reader = TextToolCalls({tool["name"]: {} for tool in PROBE_TOOL_REQUEST["tools"]})
    reader.split(text)
    reader.flush()
    return reader.found


async def ollama_tools_verdict(upstream: Upstream, provider: Provider, model: str) -> str:
    """"ok", or that a model of an Ollama server has no tools, by the capabilities its POST
    /api/show lists (docs/openapi.yaml): Ollama would refuse every request of Claude Code,
    which needs them for all it does."""
    status, answer = await probe_call(upstream, provider, UpstreamRequest(
        ollama_url(provider, "/api/show"), openai_request_headers(provider),
        json_bytes({"model": model})))
    try:
        capabilities = dict_of(json.loads(answer)).get("capabilities") if status == 200 else None
    except (TypeError, ValueError, RecursionError):       # no answer; not JSON
        capabilities = None
    if isinstance(capabilities, list) and "tools" not in capabilities:
        return "has no tools, which Claude Code needs (pick a model whose `ollama show` lists them)"
    return "ok"


async def ollama_context_note(upstream: Upstream, provider: Provider, model: str) -> str:
    """For a model of an Ollama server: the context length it runs the model with, loading it
    to find out, and whether that is the 64k Ollama advises for coding tools."""
    await load_for_window(upstream, Routing(provider, model, "probe"))
    window = provider.loaded_windows.get(model)
    if window is None:
        return ""
    advice = small_context_advice(window)
    return " (context %d%s)" % (window, ": " + advice if advice else "")


def small_context_advice(window: int) -> str:
    """What to do about a context length Ollama runs a model with, when it is under the 64k
    Ollama advises for coding tools; "" when it is not."""
    if window >= OLLAMA_CODING_CONTEXT:
        return ""
    return ("too small for Claude Code, whose own prompt is 12-19k tokens; Ollama advises 64k "
            "or more: set OLLAMA_CONTEXT_LENGTH=65536")


def listed_names(protocol: Protocol, answer: bytes) -> set:
    """The model names in a model list answer (none, when it is not JSON)."""
    try:
        return set(protocol.listed_models(json.loads(answer)))
    except (ValueError, RecursionError):
        return set()


async def probe_call(upstream: Upstream, provider: Provider, outgoing: UpstreamRequest):
    """(status, body) of one call, or (0, the ProxyError) when it got no answer."""
    call = upstream.call(provider, outgoing, PROBE_TIMEOUT_SECONDS)
    try:
        return await call.send(), call.body
    except ProxyError as error:
        return 0, error


async def probe_messages(upstream: Upstream, provider: Provider, body: dict):
    """(status, body) of one Messages request to a provider, in its protocol; (0, the
    ProxyError) when it got no answer."""
    request = Request("POST", "/v1/messages", "HTTP/1.1", Headers())
    request.body = json_bytes(body)
    body = parse_json_body(request)
    outgoing = protocol_for(provider, body["model"]).messages_request(provider, body["model"],
                                                                      request, body)
    return await probe_call(upstream, provider, outgoing)


async def probe_model(upstream: Upstream, provider: Provider, model: str) -> str:
    """"ok", or what is wrong, from the smallest Messages request to one model."""
    status, answer = await probe_messages(upstream, provider, {
        "model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "ping"}]})
    if isinstance(answer, ProxyError):
        return answer.message
    message = upstream_error_message(answer or b"") if status >= 400 else ""
    if (status == 404 and "model" in message.lower()) or (
            status == 400 and MISSING_MODEL_RE.search(message)):
        return "missing (HTTP %d: %s)" % (status, message)
    if status == 404:
        return "%s (HTTP 404: %s): check api_base_url" % (nothing_there(provider), message)
    return "ok" if status < 500 and status not in (401, 403) else "HTTP %d: %s" % (status, message)


def render_table(titles, rows) -> str:
    """Rows of text under titles, in columns as wide as their widest cell (the last is free)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(titles, *rows)]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in
                               zip(line[:-1], widths)) + "  " + str(line[-1])
                     for line in [titles] + list(rows))


# -----------------------------------------------------------------------------
# 12.3 stop and status
# -----------------------------------------------------------------------------

def cmd_stop(args) -> int:
    """stop: drain, then end the running proxy (with --config, only one started with that
    file); not running is fine."""
    record = running_proxy()
    if record is None:
        print("ccproxy is not running")
        return 0
    other = started_with_other_config(record, args.config)
    if other:
        print("ccproxy: %s; left running" % other)
        return 0
    sessions = live_sessions()
    if sessions:
        print("ccproxy: %d Claude Code session%s of `code` use%s it: their requests fail until "
              "a proxy runs at %s again" % (sessions, "s" if sessions > 1 else "",
                                            "" if sessions > 1 else "s", record["url"]))
    ended = stop_proxy(record, lambda line: print(line, flush=True))
    print("ccproxy (pid %d) %s" % (record["pid"], ended))
    return 0


def cmd_status(args) -> int:
    """Exit 0 when running (with --config: started with that file), 3 when not (LSB)."""
    if args.statusline:
        print_statusline(sys.stdin.buffer.read(STATUSLINE_INPUT_BYTES))
        return 0
    record = running_proxy()
    other = started_with_other_config(record, args.config) if record else None
    if record is None or other:
        print(json.dumps({"running": False}) if args.json else "ccproxy is not running%s" % (
            " with %s: %s" % (args.config, other) if other else ""))
        return 3
    details, problem, unloaded = status_details(record) \
        if record.get("answering") is not False else ({}, NOT_ANSWERING, None)
    report = {"running": True, "pid": record["pid"], "url": record["url"],
              "version": record.get("version"), "started_by": record.get("started_by"),
              "config": record.get("config"),
              "uptime_seconds": details.get("uptime_seconds",
                                            round(time.time() - record.get("started_at", 0), 3)),
              "providers": details.get("providers", []),
              "usage": details.get("usage", {"by_model": [], "sessions": []})}
    if problem:
        report["providers_problem"] = problem
    if details.get("config_problem"):
        report["config_problem"] = details["config_problem"]
    if unloaded and unloaded != details.get("config_problem"):
        report["config_problem_here"] = unloaded
    if args.json:
        print(json.dumps(report))
    else:
        print_status(report)
    return 0


def print_status(report: dict) -> None:
    """The text form of `status`."""
    print("ccproxy %s is running at %s (pid %d, up %ds, started by %s)" % (
        report["version"], report["url"], report["pid"], report["uptime_seconds"],
        report["started_by"]))
    print("  config: %s" % (report["config"] or "built-in defaults"))
    if "config_problem" in report:
        print("  config file edited and not reloaded (the proxy runs on the config it loaded "
              "before): %s" % printable_log_line(report["config_problem"]))
    if "config_problem_here" in report:
        print("  config file does not load in this shell: %s" % printable_log_line(
            report["config_problem_here"]))
    if "providers_problem" in report:
        print("  providers not shown: %s" % report["providers_problem"])
    for provider in report["providers"]:
        windows = provider.get("loaded_windows") or {}
        models = ["%s (context %s)" % (model, windows[model]) if model in windows else model
                  for model in provider["models"]]
        print("  %-12s %-9s %-8s circuit %-9s %s" % (
            provider["name"], provider["type"], "enabled" if provider["enabled"] else "disabled",
            provider["circuit"]["state"], ", ".join(models) or "(any model)"))
    usage = report["usage"]
    for totals in usage["by_model"]:
        print("  %s,%s: %s" % (totals["provider"], totals["model"], answers_words(totals)))
    for totals in usage.get("by_client", ()):
        print("  client %s: %s" % (totals["client"], answers_words(totals)))
    for session in usage["sessions"][:STATUS_SESSIONS_SHOWN]:
        print("  session %s: %s" % (session["session_id"], session_summary(session)))
    if len(usage["sessions"]) > STATUS_SESSIONS_SHOWN:
        print("  (%d sessions in all; status --json lists them)" % len(usage["sessions"]))


def print_statusline(data: bytes) -> None:
    """status --statusline: the line; when the proxy asks for a key this shell was not given,
    the one its config file names (read only then: this runs on every prompt). With no proxy
    of this user's running, the one Claude Code's ANTHROPIC_BASE_URL names (a team's)."""
    record = read_pidfile()
    base_url = os.environ.get("ANTHROPIC_BASE_URL", "")
    if record is None and base_url.startswith(("http://", "https://")):
        print(remote_statusline(base_url.rstrip("/"), data))
        return
    status, line = statusline_client(pidfile_path(), data, STATUSLINE_TIMEOUT_SECONDS)
    if status == 401 and record is not None and record.get("config"):
        try:
            apikey = load_config(record["config"], os.environ).own_client_key()
        except ConfigError:
            line = "ccproxy: up (its key cannot be read here)"
        else:
            line = statusline_client(pidfile_path(), data, STATUSLINE_TIMEOUT_SECONDS, apikey)[1]
    print(line)


def remote_statusline(base_url: str, data: bytes) -> str:
    """The status line from the ccproxy at base_url, asked with the key Claude Code was given
    (it sends it there anyway): the session's line, `ccproxy: up` before its first answer or
    when the key is refused (said so), or `ccproxy: down` (also when what fronts it answers
    5xx). What comes back is shown printable only and cut short: it crossed a network."""
    session = statusline_session(data)
    key = os.environ.get("ANTHROPIC_AUTH_TOKEN") or os.environ.get("ANTHROPIC_API_KEY", "")
    sendable = key and key.isascii() and key.isprintable()
    request = urllib.request.Request(base_url + ("/sessions/" + session if session else "/health"),
                                     headers={"x-api-key": key} if sendable else {})
    try:
        with urllib.request.urlopen(request, timeout=STATUSLINE_REMOTE_TIMEOUT_SECONDS) as answer:
            line = dict_of(json.loads(answer.read(STATUSLINE_INPUT_BYTES))).get("statusline")
    except urllib.error.HTTPError as error:
        if error.code >= 500:
            return "ccproxy: down"
        refused = error.code in (401, 403)
        return "ccproxy: up (the key Claude Code has is refused)" if refused else "ccproxy: up"
    except (OSError, ValueError, http.client.HTTPException):
        return "ccproxy: down"
    if not isinstance(line, str):
        return "ccproxy: up"
    return "".join(c for c in line if c.isprintable())[:STATUSLINE_MAX_CHARS]


def statusline_session(data):
    """The session id in the JSON Claude Code writes to a status line command's stdin, when it
    is one a URL path may carry, else None; part of the status line's self-contained client."""
    import json
    try:
        session = json.loads(data or b"{}").get("session_id")
    except (ValueError, AttributeError, RecursionError):
        return None
    named = isinstance(session, str) and 0 < len(session) <= 128 and all(
        c.isascii() and (c.isalnum() or c in "._:-") for c in session)
    return session if named else None


def statusline_client(pidfile, data, timeout, apikey=""):
    """Claude Code's status line: (HTTP status or None, the line the proxy the pidfile names
    formats for the session in data, the JSON Claude Code writes to the command's stdin).
    Self-contained with statusline_get, so `code --statusline` runs their own source under
    `python -I -S` (about 35 ms here; importing this file takes 130). The key is apikey, else the
    one Claude Code was given when its ANTHROPIC_BASE_URL is this proxy."""
    import json
    import os
    try:
        with open(pidfile, encoding="utf-8") as handle:
            url = str(json.load(handle)["url"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None, "ccproxy: down"
    session = statusline_session(data)
    if not apikey and os.environ.get("ANTHROPIC_BASE_URL", "").rstrip("/") == url:
        apikey = os.environ.get("ANTHROPIC_AUTH_TOKEN") or os.environ.get("ANTHROPIC_API_KEY", "")
    status, body = statusline_get(url, "/sessions/" + session if session else "/health",
                                  apikey if apikey.isascii() and apikey.isprintable() else "",
                                  timeout)
    try:
        return status, json.loads(body)["statusline"] if status == 200 and session else (
            "ccproxy: up" if status else "ccproxy: down")
    except (ValueError, KeyError, TypeError):
        return status, "ccproxy: up"


def statusline_get(url, path, apikey, timeout):
    """(status, body) of a GET to a local proxy over a plain socket, (None, b"") when it does
    not answer; part of the status line's self-contained client."""
    import socket
    answer = b""
    try:
        host, port = url[len("http://"):].rsplit(":", 1)
        request = "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n%s\r\n" % (
            path, host, "x-api-key: %s\r\n" % apikey if apikey else "")
        with socket.create_connection((host.strip("[]"), int(port)), timeout) as connection:
            connection.sendall(request.encode())
            while len(answer) < 1 << 20:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body
    except (OSError, ValueError, IndexError):
        return None, b""


def status_details(record: dict):
    """(the running proxy's /status, or {}; why it could not be read, or None; why its config
    file does not load in this shell, or None). /status needs the proxy's apikey or a client
    key, read from that file in this shell's environment; a proxy with no key answers without,
    whether the file loads here or not (an edit may have broken it since the proxy read it)."""
    apikey, unloaded = "", None
    try:
        apikey = load_config(record["config"], os.environ).own_client_key() \
            if record.get("config") else ""
    except ConfigError as exc:
        unloaded = str(exc).replace("\n", "; ")
    answer = local_get(record["url"], "/status", apikey)
    if answer is not None and answer[0] == 200:
        return answer[1], None, unloaded
    if unloaded is not None:
        return {}, "its config file does not load in this shell, so its key is unknown", unloaded
    return {}, "/status %s" % ("answered HTTP %d" % answer[0] if answer else "did not answer"), \
        None


# -----------------------------------------------------------------------------
# 12.4 env and code: Claude Code through the proxy
# -----------------------------------------------------------------------------

def cmd_env(args) -> int:
    """env: print the variables for Claude Code in the user's shell syntax (with --statusline,
    the status line setting instead)."""
    if args.statusline:
        print(json.dumps({"statusLine": {"type": "command", "command": statusline_command()}}))
        return 0
    config = config_from_args(args.config, {"host": args.host, "port": args.port})
    if config is None:
        return 1
    record = running_proxy()
    if record is None:
        print("ccproxy: not running yet; start it with: %s start" % command_name(),
              file=sys.stderr)
    url = record["url"] if record else client_url(config.host, config.port)
    shell = args.shell or default_shell(os.environ)
    variables = claude_variables(url, config, os.environ)
    unquotable = [name for name, value in variables.items()
                  if shell == "cmd" and CMD_UNQUOTABLE_RE.search(value)]
    if unquotable:
        print("ccproxy: %s holds a character cmd cannot set as it is written (\", %% or !): use "
              "--shell powershell" % ", ".join(unquotable), file=sys.stderr)
        return 2
    print(render_environment(variables, CLAUDE_UNSET_VARIABLES, shell))
    for path, names in overriding_settings_files():
        print("ccproxy: warning: %s sets %s, which Claude Code applies over this environment: "
              "remove it there, or run Claude Code with `%s code`, which overrides it" % (
                  path, ", ".join(names), command_name()), file=sys.stderr)
    told_of_managed_settings(url, config_of(record, config) if record else config, "warning: ")
    return 0


def overriding_settings_files() -> list:
    """(settings file, the routing variables its env sets) for each of Claude Code's settings
    files here (the user's, in $CLAUDE_CONFIG_DIR when set; this project's) that would send it
    elsewhere than `env` says."""
    found, read = [], set()
    user_folder = os.environ.get("CLAUDE_CONFIG_DIR") or os.path.join("~", ".claude")
    for path in (os.path.join(user_folder, "settings.json"),
                 os.path.join(".claude", "settings.json"),
                 os.path.join(".claude", "settings.local.json")):
        real = os.path.realpath(os.path.expanduser(path))
        env = settings_env(real)
        names = [name for name in CLAUDE_ROUTING_VARIABLES + CLAUDE_UNSET_VARIABLES
                 if env.get(name)]
        if names and real not in read:
            found.append((path, names))
        read.add(real)
    return found


def settings_env(path: str) -> dict:
    """The env of one of Claude Code's settings files; empty when there is none to read."""
    try:
        with open(path, encoding="utf-8") as handle:
            return dict_of(dict_of(json.load(handle)).get("env"))
    except (OSError, ValueError, RecursionError):
        return {}


def managed_settings_files() -> list:
    """Claude Code's managed settings files on this machine: managed-settings.json and the
    .json files of managed-settings.d, in its folder for the platform."""
    drop_ins = os.path.join(CLAUDE_MANAGED_FOLDER, "managed-settings.d")
    try:
        names = sorted(name for name in os.listdir(drop_ins) if name.endswith(".json"))
    except OSError:
        names = []
    return ([os.path.join(CLAUDE_MANAGED_FOLDER, "managed-settings.json")]
            + [os.path.join(drop_ins, name) for name in names])


def managed_settings_conflicts(url: str, config: Config) -> list:
    """(managed settings file, the variables in its env that take Claude Code away from the
    proxy at url): another ANTHROPIC_BASE_URL, a provider switch, or a token the proxy does
    not accept. An administrator's managed settings outrank --settings, so `code` cannot
    override them (ANTHROPIC_API_KEY there is harmless: the proxy's token still goes too)."""
    keys = {key for key in [config.apikey] + list(config.client_keys.values()) if key}
    found = []
    for path in managed_settings_files():
        env = {name: str(value).strip() for name, value in settings_env(path).items()}
        names = [name for name in CLAUDE_PROVIDER_SWITCHES
                 if env.get(name, "").lower() in ("1", "true", "yes", "on")]
        if env.get("ANTHROPIC_BASE_URL", url).rstrip("/") != url.rstrip("/"):
            names.insert(0, "ANTHROPIC_BASE_URL")
        if keys and "ANTHROPIC_AUTH_TOKEN" in env and env["ANTHROPIC_AUTH_TOKEN"] not in keys:
            names.append("ANTHROPIC_AUTH_TOKEN")
        if names:
            found.append((path, names))
    return found


def told_of_managed_settings(url: str, config: Config, lead: str) -> bool:
    """Say so for each managed settings file that takes Claude Code away from the proxy at url
    (lead: "warning: ", or "" for a refusal); whether there was one."""
    conflicts = managed_settings_conflicts(url, config)
    for path, names in conflicts:
        print("ccproxy: %s%s, Claude Code's managed settings, sets %s: an administrator's "
              "settings outrank the environment and every other settings file, so Claude Code "
              "would not use this proxy at %s, or would be refused by it; ask whoever manages "
              "this machine" % (lead, path, ", ".join(names), url), file=sys.stderr)
    return bool(conflicts)


CLAUDE_INSTALL_HINT = "npm install -g @anthropic-ai/claude-code"
# Variables that would make Claude Code bypass ANTHROPIC_BASE_URL (and skip model discovery,
# which 2.1.197 and 2.1.330 ask of a "firstParty" setup only) or use another key.
CLAUDE_PROVIDER_SWITCHES = ("CLAUDE_CODE_USE_BEDROCK", "CLAUDE_CODE_USE_VERTEX",
                            "CLAUDE_CODE_USE_FOUNDRY", "CLAUDE_CODE_USE_ANTHROPIC_AWS",
                            "CLAUDE_CODE_USE_ANTHROPIC_GOOGLE_CLOUD", "CLAUDE_CODE_USE_MANTLE")
CLAUDE_UNSET_VARIABLES = CLAUDE_PROVIDER_SWITCHES + ("ANTHROPIC_API_KEY",)
# Claude Code applies the env of its settings files (~/.claude/settings.json, a project's
# .claude/settings.json and settings.local.json) over its own environment, and a --settings
# flag over those (seen in 2.1.197 and 2.1.332): `code` passes these in --settings too, and
# the variables above as empty, so no settings file can send the session elsewhere.
CLAUDE_ROUTING_VARIABLES = ("ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN")
# Managed settings, an administrator's (in managed-settings.json or managed-settings.d/*.json
# here), outrank even --settings (seen in 2.1.197 and 2.1.332): `code` refuses a session they
# would send elsewhere, and `env` warns.
CLAUDE_MANAGED_FOLDER = {"darwin": "/Library/Application Support/ClaudeCode",
                         "win32": "C:\\Program Files\\ClaudeCode"}.get(sys.platform,
                                                                      "/etc/claude-code")
# The /model picker's Opus, Sonnet and Haiku entries: the route each stands for.
PICKER_ROUTES = (("OPUS", "think"), ("SONNET", "default"), ("HAIKU", "background"))


def claude_variables(url: str, config: Config, environ) -> dict:
    """The environment that points Claude Code at the proxy and keeps it from calling home."""
    no_proxy = [p for p in (environ.get("NO_PROXY") or environ.get("no_proxy") or "").split(",")
                if p.strip()]
    no_proxy += [h for h in ("127.0.0.1", "localhost", "::1") if h not in no_proxy]
    variables = {
        "ANTHROPIC_BASE_URL": url,
        "ANTHROPIC_AUTH_TOKEN": config.own_client_key() or "ccproxy",
        "API_TIMEOUT_MS": str(CLAUDE_API_TIMEOUT_MS),
        "DISABLE_TELEMETRY": "1",
        "DISABLE_COST_WARNINGS": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "NO_PROXY": ",".join(no_proxy),
        "no_proxy": ",".join(no_proxy),
    }
    chosen = dict(window_variables(config), **picker_variables(config))
    variables.update((name, value) for name, value in chosen.items()
                     if name not in environ)          # the user's own setting stays
    return variables


def picker_variables(config: Config) -> dict:
    """Claude Code's /model picker through the proxy: model discovery on (it lists the proxy's
    models), and its Opus, Sonnet and Haiku entries as the think, default and background
    routes, named by the model each route goes to."""
    variables = {"CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY": "1"}
    for family, name in PICKER_ROUTES:
        route = config.routes.get(name)
        target = default_target(config) if name == "default" else (
            route_target(config, route) if route else None)
        if target is not None:
            setting = "ANTHROPIC_DEFAULT_%s_MODEL" % family
            variables[setting] = PICKER_ID_PREFIX + name
            variables[setting + "_NAME"] = "%s (%s)" % (target.model, target.provider.name)
            variables[setting + "_DESCRIPTION"] = "routes.%s, through ccproxy" % name
    return variables


def window_variables(config: Config) -> dict:
    """What Claude Code should know of the default route's model: its window (so it compacts in
    time; Claude Code reads any value under 100,000 as 100,000, so a smaller window is left to
    the proxy's "prompt is too long" answer, which Claude Code also answers by compacting) and
    its output limit, when that is below what Claude Code asks for."""
    target = default_target(config)
    if target is None:
        return {}
    variables = {}
    window = target.provider.context_window(target.model)
    if window and window >= CLAUDE_MIN_COMPACT_WINDOW:
        variables["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] = str(window)
    cap = target.provider.output_cap(target.model)
    if cap and cap < CLAUDE_DEFAULT_MAX_OUTPUT_TOKENS:
        variables["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(cap)
    return variables


SHELL_RENDERERS = {
    "bash": (lambda k, v: "export %s=%s" % (k, shell_quote(v)), lambda k: "unset %s" % k),
    "zsh": (lambda k, v: "export %s=%s" % (k, shell_quote(v)), lambda k: "unset %s" % k),
    "fish": (lambda k, v: "set -gx %s '%s';" % (k, v.replace("\\", "\\\\").replace("'", "\\'")),
             lambda k: "set -e %s;" % k),
    "powershell": (lambda k, v: "$env:%s = '%s'" % (k, v.replace("'", "''")),
                   lambda k: "Remove-Item Env:%s -ErrorAction SilentlyContinue" % k),
    "cmd": (lambda k, v: 'set "%s=%s"' % (k, v), lambda k: "set %s=" % k),
}


CMD_UNQUOTABLE_RE = re.compile(r'["%!]')   # cmd ends a quote at ", expands %NAME% and !NAME!


def shell_quote(value: str) -> str:
    """value in single quotes for POSIX shells."""
    return "'" + value.replace("'", "'\\''") + "'"


def render_environment(variables: dict, unset, shell: str) -> str:
    """Lines that set (and unset) the variables in the given shell."""
    assign, remove = SHELL_RENDERERS[shell]
    lines = [remove(name) for name in unset] + [assign(k, v) for k, v in variables.items()]
    return "\n".join(lines)


def default_shell(environ) -> str:
    """The user's shell from $SHELL; PowerShell on Windows; bash otherwise."""
    name = os.path.basename(environ.get("SHELL", ""))
    if name in SHELL_RENDERERS:
        return name
    return "powershell" if os.name == "nt" else "bash"


def cmd_code(argv) -> int:
    """Run claude through the proxy, starting the proxy if needed; claude's exit status."""
    try:
        own, claude_arguments = split_code_arguments(argv)
    except ValueError as exc:
        print("ccproxy code: %s" % exc, file=sys.stderr)
        return 2
    if own["help"]:
        build_code_parser(command_name()).print_help()
        return 0
    claude = find_claude(os.environ)
    if claude is None:
        print("ccproxy: Claude Code (claude) was not found%s; install it with: %s" % (
            " at CLAUDE_PATH" if os.environ.get("CLAUDE_PATH") else " on PATH",
            CLAUDE_INSTALL_HINT), file=sys.stderr)
        return 127
    port = int(own["--port"]) if own["--port"] is not None else None
    config = config_from_args(own["--config"], {"host": own["--host"], "port": port})
    if config is None:
        return 1
    running = running_proxy()
    if conflicts_with_running_proxy(own, running) or told_of_managed_settings(
            running["url"] if running else client_url(config.host, config.port),
            config_of(running, config) if running else config, ""):
        return 1
    session = {"env": {"CLAUDE_CODE_SUBAGENT_MODEL": own["--subagent-model"]}
               if own["--subagent-model"] else {}}
    if own["statusline"]:
        session["statusLine"] = {"type": "command", "command": statusline_command()}
    return run_code_session(claude, claude_arguments, config, session, own["--settings"])


def conflicts_with_running_proxy(own: dict, running: dict | None) -> bool:
    """Whether the running proxy was started with another config file than --config names
    (said: the session would reach providers that file does not name). One that listens
    elsewhere than --host or --port say is used as it is, with a note."""
    if running is None:
        return False
    other = started_with_other_config(running, own["--config"])
    if other:
        print("ccproxy: %s; stop it first (%s stop), or leave out --config to use it" % (
            other, command_name()), file=sys.stderr)
        return True
    moved = ["%s %s" % (flag, own[flag]) for flag, now in (
        ("--host", running.get("host")), ("--port", str(running.get("port"))))
        if own[flag] is not None and own[flag] != now]
    if moved:
        print("ccproxy: using the proxy running at %s; %s take effect once it is stopped "
              "(%s stop)" % (running["url"], " and ".join(moved), command_name()),
              file=sys.stderr)
    return False


def statusline_command() -> str:
    """The command for Claude Code's statusLine setting: the status line's self-contained
    client, its own source run by a Python that skips site packages (it runs on every prompt),
    for this user's pidfile."""
    import inspect                               # only here
    source = "".join(inspect.getsource(f) for f in (statusline_get, statusline_session,
                                                     statusline_client))
    source += ("import sys\nprint(statusline_client(sys.argv[1], sys.stdin.buffer.read(%d),"
               " %r)[1])" % (STATUSLINE_INPUT_BYTES, STATUSLINE_TIMEOUT_SECONDS))
    return "%s -I -S -c %s %s" % (shlex.quote(sys.executable), shlex.quote(source),
                                  shlex.quote(pidfile_path()))


def split_code_arguments(argv):
    """(code's own options, claude's arguments): --config/--host/--port, --subagent-model,
    --statusline and --help are code's, as is claude's --settings (merged with code's own:
    claude reads only the last); `--` hands everything after it to claude; anything else goes
    to claude too."""
    own, passed, index = {"--config": None, "--host": None, "--port": None,
                          "--subagent-model": None, "--settings": None, "help": False,
                          "statusline": False}, [], 0
    while index < len(argv):
        argument = argv[index]
        name, equals, value = argument.partition("=")
        if argument == "--":
            passed += argv[index + 1:]
            break
        if argument in ("-h", "--help"):
            own["help"] = True
        elif argument == "--statusline":
            own["statusline"] = True
        elif name in own:
            if not equals:
                if index + 1 >= len(argv):
                    raise ValueError("%s needs a value" % name)
                index, value = index + 1, argv[index + 1]
            own[name] = value
        else:
            passed.append(argument)
        index += 1
    if own["--port"] is not None and not own["--port"].isdigit():
        raise ValueError("--port needs a number, not %r" % own["--port"])
    return own, passed


def merged_settings(given: str | None, ours: dict) -> dict | None:
    """The settings for claude's one --settings: ours over those the user gave (claude reads
    only the last --settings), our env over theirs; None when theirs cannot be read."""
    try:
        theirs = read_settings_value(given) if given is not None else {}
    except (OSError, ValueError, RecursionError):
        return None
    merged = dict(theirs, **ours)
    merged["env"] = dict(dict_of(theirs.get("env")), **ours["env"])
    return merged


def run_claude_with_settings(command: list, settings: dict | None, lease: str,
                             environment: dict) -> int:
    """Run claude with settings kept in the session's lease (0600, removed when the session
    ends, or by the next look at the leases after a crash) and named by --settings: a path on
    its command line, not the JSON, which `ps` shows every user (the proxy's key is in it)."""
    if settings is not None:
        write_private_file(lease, json.dumps(settings))
        command = command[:1] + ["--settings", lease] + command[1:]
    return run_claude(command, environment)


def read_settings_value(value: str) -> dict:
    """What claude's --settings names: JSON given in place, or a JSON file."""
    if not value.lstrip().startswith("{"):
        with open(value, encoding="utf-8") as handle:
            value = handle.read()
    settings = json.loads(value)
    if not isinstance(settings, dict):
        raise ValueError("not a JSON object")
    return settings


def find_claude(environ) -> str | None:
    """The claude executable: $CLAUDE_PATH, else `claude` on PATH."""
    named = environ.get("CLAUDE_PATH")
    if named:
        return named if os.path.isfile(named) and os.access(named, os.X_OK) else None
    return shutil.which("claude")


def run_code_session(claude: str, arguments: list, config: Config, session: dict,
                     given_settings: str | None = None) -> int:
    """Hold a session lease while claude runs, with the proxy's variables and the session's
    settings (its env among them; merged with the --settings given); stop a proxy `code`
    started when the last session ends."""
    lease = os.path.join(sessions_dir(), str(os.getpid()))
    try:
        write_private_file(lease, "")
    except OSError as exc:
        print("ccproxy: cannot write %s: %s; `code` keeps its sessions in %s, which must be "
              "writable" % (lease, exc.strerror or exc, ccproxy_home()), file=sys.stderr)
        return 1
    record = None
    try:
        with StartLock():
            record = running_proxy() or start_for_code(config)
        if record is None:
            return 1
        note_running_proxy(record)
        environment = {k: v for k, v in os.environ.items() if k not in CLAUDE_UNSET_VARIABLES}
        session_config = config_of(record, config)
        learn_ollama_window(session_config)
        environment.update(claude_variables(record["url"], session_config, os.environ))
        environment.update(session["env"])
        routing = dict({name: "" for name in CLAUDE_UNSET_VARIABLES}, **{
            name: environment[name] for name in CLAUDE_ROUTING_VARIABLES})
        settings = merged_settings(given_settings, dict(session, env=dict(routing,
                                                                          **session["env"])))
        if settings is None:          # theirs cannot be read: passed on, for claude to say why
            arguments = ["--settings", given_settings] + arguments
        return run_claude_with_settings([claude] + arguments, settings, lease, environment)
    finally:
        os.remove(lease)
        if record is not None and record.get("started_by") == "code":
            with StartLock():
                if live_sessions() == 0 and running_proxy() is not None:
                    stop_proxy(record)


def learn_ollama_window(config: Config) -> None:
    """When the default route goes to an Ollama server: have it load the model and say the
    context length it runs it with, before Claude Code starts, so that Claude Code is told a
    window of 100,000 or more, and the user is warned of one too small for Claude Code."""
    target = default_target(config)
    if target is None or not target.provider.runs_models_itself:
        return
    upstream = Upstream(1)
    try:
        asyncio.run(load_for_window(upstream, target))
    finally:
        upstream.close("the look is over")
    window = target.provider.loaded_windows.get(target.model)
    advice = small_context_advice(window) if window else ""
    if advice:
        print("ccproxy: warning: %s runs %s with a %d-token context: %s" % (
            target.provider.name, target.model, window, advice), file=sys.stderr)


FIRST_CONFIG_EXAMPLE = (  # the Quick start's
    '{"providers": [{"name": "openai", "api_key": "${OPENAI_API_KEY}", '
    '"models": ["gpt-6.2-sol"]}]}')


def start_for_code(config: Config) -> dict | None:
    """Start the proxy for a `code` session, unless its config gives it nowhere to send
    Claude Code's requests (every one would fail): then say how to give it one."""
    if config.enabled_providers():
        return start_detached(config, "code")
    print("ccproxy: no provider is %s (config: %s), so Claude Code's requests would have "
          "nowhere to go; write one into ~/.ccproxy/config.json, e.g.\n  %s\nthen check it "
          "with: %s start --check --probe" % (
              "enabled" if config.providers else "configured",
              config.source or "none found", FIRST_CONFIG_EXAMPLE, command_name()),
          file=sys.stderr)
    return None


def run_claude(command: list, environment: dict) -> int:
    """Run claude in the foreground; Ctrl-C is claude's to handle, not ours. Its exit status,
    as a shell gives it: 128 + the signal's number when a signal ended it."""
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        status = subprocess.call(command, env=environment)
    finally:
        signal.signal(signal.SIGINT, previous)
    return 128 - status if status < 0 else status


# -----------------------------------------------------------------------------
# 12.5 version, and main
# -----------------------------------------------------------------------------

def cmd_version(args) -> int:
    """version: print the version."""
    print("ccproxy %s" % __version__)
    return 0


COMMANDS = {"start": cmd_start, "stop": cmd_stop, "status": cmd_status, "env": cmd_env,
            "version": cmd_version}


def command_name() -> str:
    """How the user ran this program, for help texts and hints: the installed `ccproxy`,
    `python3 -m ccproxy`, or `python3 path/to/the/file.py` (under whatever name it has)."""
    python = "python" if os.name == "nt" else "python3"
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name not in ("__main__", "") and spec.origin == __file__:
        return "%s -m %s" % (python, spec.name)
    script = sys.argv[0] if sys.argv else ""
    if script.endswith(".py"):
        return "%s %s" % (python, script)
    if script and not script.startswith("-"):
        return os.path.basename(script)
    return "%s %s" % (python, __file__)


def main(argv=None) -> int:
    """Run the command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["code"]:
        return cmd_code(argv[1:])
    parser = build_parser(command_name())
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "start" and args.foreground and not args.check:
        serve_from_bytecode(argv)
    return COMMANDS[args.command](args)


def serve_from_bytecode(argv: list) -> None:
    """When this file runs as a script, become (exec: same pid) a Python that imports it as a
    module instead, from the bytecode cache, as the background server does: compiling ~10,000
    lines leaves tens of MB behind in a server that runs for weeks. POSIX only."""
    if __spec__ is not None or os.name != "posix" or __name__ != "__main__":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-c", DETACHED_LAUNCHER % os.path.abspath(
        __file__)] + argv, server_environment())


if __name__ == "__main__":
    sys.exit(main())
