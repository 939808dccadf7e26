"""Errors: one class per status, each answering for itself; provider errors mapped by status;
secrets masked in every form, wherever a message goes."""
from __future__ import annotations

import base64
import contextlib
import gc
import json
import logging
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import anthropic
import pytest

import ccproxy
from helpers import PROVIDER_KEY, REPO, Reply, anthropic_message, json_reply, raw_exchange, sdk, sse

KEY = "sk-proj-abc/def+ghi=0123456789xyz"       # '/', '+', '=' change when URL-encoded


# --- the tree ----------------------------------------------------------------------------------

@pytest.mark.parametrize("status, error_type", [
    (400, "invalid_request_error"), (401, "authentication_error"), (402, "billing_error"),
    (403, "permission_error"), (404, "not_found_error"), (405, "invalid_request_error"),
    (408, "timeout_error"), (409, "invalid_request_error"), (413, "request_too_large"),
    (429, "rate_limit_error"), (431, "invalid_request_error"), (500, "api_error"),
    (502, "api_error"), (504, "timeout_error"), (529, "overloaded_error")])
def test_every_status_has_its_class_and_type(status, error_type):
    error = ccproxy.error_for_status(status, "why", [("retry-after", "7")])
    assert type(error) is ccproxy.ERROR_CLASS_BY_STATUS[status] and error.status == status
    assert error.error_type == error_type and error.retry_after() == 7.0
    assert json.loads(error.body("req_1")) == {"type": "error", "request_id": "req_1",
                                               "error": {"type": error_type, "message": "why"}}


def test_statuses_without_a_class_fall_in_by_range():
    assert type(ccproxy.error_for_status(418, "x")) is ccproxy.InvalidRequestError
    assert type(ccproxy.error_for_status(599, "x")) is ccproxy.InternalError


def test_an_error_answers_for_itself_before_and_after_a_stream_began():
    error = ccproxy.RateLimitError("slow down", [("retry-after", "3")])
    response = error.response("req_9")
    assert (response.status, response.stream) == (429, None)
    assert ("retry-after", "3") in response.headers
    assert json.loads(response.body)["error"] == {"type": "rate_limit_error", "message": "slow down"}
    assert error.event() == (b'event: error\ndata: {"type": "error", "error": {"type": '
                             b'"rate_limit_error", "message": "slow down"}}\n\n')
    assert ccproxy.RateLimitError("x", [("retry-after", "soon")]).retry_after() is None


def test_a_relayed_error_keeps_the_providers_body_and_status():
    body = b'{"type":"error","error":{"type":"overloaded_error","message":"busy"}}'
    error = ccproxy.RelayedError(529, body, [("request-id", "req_up")])
    assert (error.status, error.message, error.body("req_1")) == (529, "busy", body)
    assert error.response("req_1").headers[-1] == ("request-id", "req_up")


@pytest.mark.parametrize("body, message", [
    (b'{"error": {"message": "bad key", "type": "invalid"}}', "bad key"),
    (b'{"error": "plain"}', "plain"),
    (b'{"detail": "not here"}', "not here"),
    (b"<html><body><h1>502 Bad Gateway</h1></body></html>", "502 Bad Gateway"),
    (b"", "(empty body)"),
    (b"[" * 100000, "[" * 1000),
])
def test_the_most_useful_message_of_any_error_body(body, message):
    with collector_paused():          # this process's finalizers, deep in a parse (Python 3.8)
        assert ccproxy.upstream_error_message(body) == message


@contextlib.contextmanager
def collector_paused():
    """The cyclic garbage collector off for a moment: CPython 3.8 aborts when one of its
    passes, begun deep in a parse near the recursion limit, runs a finalizer that overflows
    (see test_deep_json_cannot_abort_the_server); the pytest process is full of such garbage
    (event loops, sockets), and only `start` takes the collector's passes in hand."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# A fine answer in each protocol, for a request nested deep but not too deep to walk.
FINE_ANSWERS = {
    "openai": {"id": "c", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1}},
    "gemini": {"candidates": [{"content": {"role": "model", "parts": [{"text": "ok"}]},
                               "finishReason": "STOP"}],
               "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1}},
    "anthropic": anthropic_message("ok")}
TOO_DEEP_TO_WALK = "the request nests too deeply to check, route and translate (hundreds of levels)"


def tool_results_within_tool_results(depth: int) -> bytes:
    """A request whose message holds a tool result inside a tool result, depth times, written
    out as text (a JSON writer would run out of stack first)."""
    result = '[{"type": "tool_result", "tool_use_id": "toolu_1", "content": '
    return ('{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": %s%s%s}]}'
            % (result * depth, '[{"type": "text", "text": "x"}]', "}]" * depth)).encode()


@pytest.mark.parametrize("kind", ["openai", "gemini", "anthropic"])
def test_a_request_nested_too_deeply_to_walk_is_a_400(start_proxy, upstream, kind):
    """Tool results inside tool results, hundreds deep: JSON reads more levels than the steps
    that walk a request (checks, routing, translation) can follow, by how much depending on the
    Python version. Each depth is an answer, a 400 saying it nests too deeply to walk, or one
    that it is too deep to read; never an internal error."""
    upstream.script = lambda r: json_reply(FINE_ANSWERS[kind])
    proxy = start_proxy({"providers": [{"name": "p", "type": kind, "api_key": PROVIDER_KEY,
                                        "api_base_url": upstream.url, "models": ["m"]}]})
    outcomes = set()
    for depth in (300, 450, 600, 1200):
        request = urllib.request.Request(
            proxy.url + "/v1/messages", tool_results_within_tool_results(depth),
            {"x-api-key": "client", "content-type": "application/json"})
        try:
            with collector_paused(), urllib.request.urlopen(request, timeout=30) as answer:
                outcomes.add(json.loads(answer.read())["content"][0]["text"])
        except urllib.error.HTTPError as error:
            message = json.loads(error.read())["error"]["message"]
            outcomes.add((error.code, message.split(":")[0]))      # the parser's says why
    assert (400, TOO_DEEP_TO_WALK) in outcomes
    assert outcomes <= {"ok", (400, TOO_DEEP_TO_WALK),
                        (400, "request body is not a valid JSON object")}


# One process as `start` makes it (tune_garbage_collector), forced into Python 3.8's regime on
# any version: JSON nested past the recursion limit, with a collector pass due deep inside the
# parse (800 empty siblings there, the threshold reached among them) and garbage whose
# finalizer calls a few functions, as an unclosed HTTP response's does. Then cyclic garbage
# past the threshold, which the loop's own passes collect.
DEEP_JSON_IN_THE_SERVERS_PROCESS = r"""
import asyncio, gc, sys, weakref
sys.path.insert(0, sys.argv[1])
import ccproxy


class Finalized:
    def __del__(self):
        def down(n):
            return n and down(n - 1)
        down(5)


def parse_deep_json():
    for depth in range(900, 1000):
        gc.set_threshold(depth + 300)
        garbage = Finalized()
        garbage.cycle = [garbage]
        del garbage
        text = "[" * depth + "[]," * 800 + "[" * 2000
        for parse in (lambda: ccproxy.parse_json_object('{"messages": %s}' % text),
                      lambda: ccproxy.decode_event_json(text)):
            try:
                parse()
            except (ValueError, RecursionError):
                pass
        assert ccproxy.upstream_error_message(text.encode()).startswith("[[[")


async def main():
    ccproxy.COLLECTOR_ABORTS_DEEP = True
    ccproxy.tune_garbage_collector()
    parse_deep_json()
    assert not gc.isenabled()
    gc.set_threshold(700, 10, 1000)
    lost = Finalized()
    lost.cycle = [lost] + [[] for _ in range(800)]
    gone = weakref.ref(lost)
    del lost
    for _ in range(100):
        if gone() is None:
            print("collected")
            return
        await asyncio.sleep(0.05)


asyncio.run(main())
"""


def test_deep_json_cannot_abort_the_server(tmp_path):
    """Python 3.8 aborted here without the server's own collector passes (Fatal Python
    error: Cannot recover from stack overflow); every version parses each body to an error,
    and the passes the loop makes collect what the collector would have."""
    script = tmp_path / "deep.py"
    script.write_text(DEEP_JSON_IN_THE_SERVERS_PROCESS)
    done = subprocess.run([sys.executable, str(script), str(REPO)], capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "collected\n"), done.stderr[-2000:]


# --- masking -----------------------------------------------------------------------------------

def test_provider_key_echoed_in_an_upstream_error_is_masked(proxy, upstream):
    error = {"type": "error", "error": {"type": "authentication_error",
                                        "message": "invalid x-api-key %s" % PROVIDER_KEY}}
    upstream.script = lambda r: json_reply(error, status=401)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        sdk(proxy).messages.create(model="m", max_tokens=5,
                                   messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["error"]["message"].endswith("(invalid x-api-key sk-a…6789)")
    assert PROVIDER_KEY not in json.dumps(caught.value.body)


def test_provider_key_echoed_in_a_foreign_error_is_masked(proxy, upstream):
    upstream.script = lambda r: Reply(500, ("oops key=%s" % PROVIDER_KEY).encode(),
                                      content_type="text/plain")
    with pytest.raises(anthropic.InternalServerError) as caught:
        sdk(proxy).messages.create(model="m", max_tokens=5,
                                   messages=[{"role": "user", "content": "hi"}])
    assert PROVIDER_KEY not in json.dumps(caught.value.body)
    assert caught.value.body["error"]["message"] == "anthropic: HTTP 500: oops key=sk-a…6789"


def test_provider_key_echoed_in_an_anthropic_stream_error_event_is_masked(proxy, upstream):
    """An Anthropic-protocol stream passes as it came, but for the secrets in an error event."""
    error = {"type": "error", "error": {"type": "overloaded_error",
                                        "message": "key %s is overloaded" % PROVIDER_KEY}}
    upstream.script = lambda r: Reply(200, pieces=[sse("error", error)],
                                      content_type="text/event-stream")
    with pytest.raises(anthropic.APIStatusError) as caught:
        with sdk(proxy).messages.stream(model="m", max_tokens=5,
                                        messages=[{"role": "user", "content": "hi"}]) as stream:
            stream.until_done()
    assert "key sk-a…6789 is overloaded" in str(caught.value.body)
    assert PROVIDER_KEY not in str(caught.value.body)


def test_every_form_of_a_secret_is_masked():
    masker = ccproxy.SecretMasker([KEY, "sk-with-newline-0123456789\n"])
    forms = [KEY, json.dumps(KEY)[1:-1], urllib.parse.quote(KEY, safe=""),
             urllib.parse.quote_plus(KEY), repr(KEY.encode())[2:-1],
             repr("sk-with-newline-0123456789\n")[1:-1],
             repr(b"Bearer sk-with-newline-0123456789\n")]
    forms += [base64.b64encode(prefix + KEY.encode()).decode()     # as in Basic user:key
              for prefix in (b"", b"u:", b"user:", b"a-longer-user:")]
    forms.append(base64.urlsafe_b64encode(b"x" + KEY.encode()).decode())
    for form in forms:
        masked = masker.text("error: %s (end)" % form)
        assert "0123456789" not in masked and masked.startswith("error: ") and "(end)" in masked
        assert "…" in masked or "****" in masked
    assert masker.data(b"plain text") == b"plain text"


def test_an_upstream_that_echoes_the_key_in_any_form_never_shows_it(start_proxy, upstream):
    echoed = "key %s or %s or %s rejected" % (KEY, urllib.parse.quote(KEY, safe=""),
                                              json.dumps(KEY)[1:-1])
    upstream.script = lambda r: json_reply({"error": {"message": echoed}}, 500)
    proxy = start_proxy({"providers": [{"name": "foai", "type": "openai", "api_key": KEY,
                                        "api_base_url": upstream.url + "/v1"}],
                         "performance": {"circuit_breaker_enabled": True}})
    with pytest.raises(anthropic.InternalServerError) as caught:
        sdk(proxy).messages.create(model="gpt", max_tokens=5,
                                   messages=[{"role": "user", "content": "hi"}])
    status = sdk(proxy).get("/status", cast_to=object)
    providers = sdk(proxy).get("/providers", cast_to=object)
    shown = json.dumps([caught.value.body, status, providers], ensure_ascii=False)
    assert "0123456789xyz" not in shown and "sk-p…9xyz" in shown
    assert "rejected" in status["providers"][0]["circuit"]["last_error"]


def test_placeholders_flags_and_a_presets_own_headers_leave_the_text_alone():
    """`ollama` or `EMPTY` for a key, `1` or `true` for a header, OpenRouter's own referer and
    title: sought in text they would mask the provider's name, `stream=true`, digits and this
    very file's name in every line. A real key or header secret is still masked."""
    config = ccproxy.build_config({"providers": [
        {"name": "ollama", "api_key": "ollama"},
        {"name": "openrouter", "api_key": KEY,
         "headers": {"X-Flag": "1", "X-Mode": "true", "X-Token": "tok-secret-0123456789"}}]},
        "c.json", {})
    line = ("req_1 provider=ollama stream=true status=201 python3 ccproxy.py status "
            "http://localhost:3456")
    assert config.masker.text(line) == line
    assert config.masker.text("%s and tok-secret-0123456789" % KEY) == "sk-p…9xyz and tok-…6789"
    shown = config.providers[1].public_view()["headers"]
    assert shown["X-Flag"] == "****" and shown["X-Token"] == "tok-…6789"


def test_logged_tracebacks_are_masked_too():
    try:
        raise ValueError("Invalid header value b'Bearer %s\\n'" % KEY)
    except ValueError:
        record = logging.LogRecord("ccproxy", logging.ERROR, __file__, 1, "failed: %s", (KEY,),
                                   sys.exc_info())
    masker = ccproxy.SecretMasker([KEY])
    assert ccproxy.SafeLogFilter(lambda: masker).filter(record)
    text = record.getMessage() + record.exc_text
    assert "0123456789xyz" not in text and "Invalid header value" in text


def test_a_client_value_with_control_characters_cannot_forge_or_colour_a_log_line():
    """A model name with a line break, a carriage return or a terminal escape is written into
    the log with those as escapes; a traceback keeps its lines."""
    try:
        raise ValueError("one\ntwo")
    except ValueError:
        record = logging.LogRecord("ccproxy", logging.WARNING, __file__, 1, "%s model=%s", (
            "req_1", "m\nFORGED status=200\r\x1b[31m\x9b"), sys.exc_info())
    assert ccproxy.SafeLogFilter(lambda: ccproxy.SecretMasker()).filter(record)
    assert record.getMessage() == "req_1 model=m\\x0aFORGED status=200\\x0d\\x1b[31m\\x9b"
    assert record.exc_text.endswith("ValueError: one\ntwo")


def test_error_responses_carry_a_request_id(proxy):
    reply = raw_exchange(proxy.port, b"GET /nope HTTP/1.0\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    request_id = [l for l in head.decode().split("\r\n") if l.startswith("request-id: ")][0][12:]
    assert json.loads(body)["request_id"] == request_id


def test_internal_error_is_an_anthropic_500_and_the_server_goes_on(proxy, monkeypatch):
    def broken(body, for_count=False):
        raise RuntimeError("boom with sk-internal-detail")
    monkeypatch.setattr(ccproxy, "check_messages_request", broken)
    with pytest.raises(anthropic.InternalServerError) as caught:
        sdk(proxy).messages.create(model="m", max_tokens=5,
                                   messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["error"] == {"type": "api_error",
                                          "message": "internal error in ccproxy; see its log"}
    assert sdk(proxy).get("/health", cast_to=object)["status"] == "ok"


def test_a_server_that_says_something_new_at_every_refusal_is_sent_again_a_few_times_only(
        start_proxy, upstream):
    """Each refusal of this server gives a smaller room for the answer than the last (and each
    would be learned from): sent again at every one, it was called some 965 times, until
    Python's recursion ran out and the client got a 500. Now the client gets the last refusal,
    in Anthropic's words, after MAX_SENDS_AGAIN more calls, and the server serves on."""
    def shrinking_room(request):
        inputs, sent = 50000 + len(upstream.requests), request["json"]["max_tokens"]
        return json_reply({"error": {"message": (
            "This model's maximum context length is 100000 tokens. However, you requested %d "
            "tokens (%d in the messages, %d in the completion)." % (inputs + sent, inputs,
                                                                     sent))}}, 400)
    upstream.script = shrinking_room
    proxy = start_proxy({"providers": [{"name": "v", "type": "openai", "api_key": PROVIDER_KEY,
                                        "api_base_url": upstream.url + "/v1"}]})
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(proxy).messages.create(model="m", max_tokens=60000, timeout=60,
                                   messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["error"]["message"].startswith(
        "input length and `max_tokens` exceed context limit: ")
    assert len(upstream.requests) == 1 + ccproxy.MAX_SENDS_AGAIN
    upstream.script = lambda r: json_reply({"id": "c", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": "ok"}, "finish_reason": "stop"}]})
    assert sdk(proxy).messages.create(model="m", max_tokens=100, messages=[
        {"role": "user", "content": "hi"}]).content[0].text == "ok"
