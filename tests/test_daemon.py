"""Daemon: start/stop/status as real processes, pidfiles, draining, `code` sessions, `env`."""
from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import anthropic
import pytest

import ccproxy
from helpers import (REPO, anthropic_message, anthropic_provider, ipv6_loopback_available,
                      json_reply, open_stream, read_to_end, stream_reply, wait_until)

SCRIPT = str(REPO / "ccproxy.py")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Home:
    """A temporary HOME with a config file, and the ccproxy CLI run inside it."""

    def __init__(self, path, config):
        self.path = path
        self.port = free_port()
        self.config = path / "config.json"
        self.config.write_text(json.dumps(dict({"port": self.port}, **config)))
        self.pidfile = path / ".ccproxy" / "ccproxy.pid"
        self.url = "http://127.0.0.1:%d" % self.port

    def env(self, **extra):
        env = {k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_") and k != "LOG"}
        env.update(HOME=str(self.path), CCPROXY_CONFIG=str(self.config))
        env.update(extra)
        return env

    def run(self, *args, timeout=60, script=SCRIPT, input=None, **extra):
        return subprocess.run([sys.executable, str(script)] + list(args), capture_output=True,
                              text=True, timeout=timeout, env=self.env(**extra),
                              cwd=str(self.path), input=input)

    def record(self):
        return json.loads(self.pidfile.read_text()) if self.pidfile.exists() else None

    def healthy(self):
        return healthy(self.url)


def healthy(url):
    """Whether a proxy answers /health at url."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def home(tmp_path, upstream):
    made = []

    def make(**config):
        config.setdefault("providers", [anthropic_provider(upstream)])
        made.append(Home(tmp_path, config))
        return made[-1]

    yield make
    for each in made:
        record = each.record()
        if record and type(record.get("pid")) is int and record["pid"] > 1:    # never -1 or 1
            try:
                os.kill(record["pid"], signal.SIGKILL)
            except OSError:
                pass


def test_start_status_stop_round_trip(home):
    h = home()
    started = h.run("start")
    assert started.returncode == 0, started.stderr
    record = h.record()
    assert "started at %s (pid %d)" % (h.url, record["pid"]) in started.stdout
    assert stat.S_IMODE(h.pidfile.stat().st_mode) == 0o600
    assert record["version"] and record["started_by"] == "start" and h.healthy()
    status = h.run("status")
    assert status.returncode == 0 and "is running at %s" % h.url in status.stdout
    assert re.search(r"anthropic +anthropic +enabled +circuit disabled", status.stdout)
    report = json.loads(h.run("status", "--json").stdout)
    assert report["running"] is True and report["pid"] == record["pid"]
    assert "sk-ant-upstream" not in json.dumps(report)
    stopped = h.run("stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not h.pidfile.exists() and not h.healthy()
    after = h.run("status")
    assert after.returncode == 3 and "not running" in after.stdout
    assert json.loads(h.run("status", "--json").stdout) == {"running": False}
    assert h.run("stop").stdout.strip() == "ccproxy is not running"
    assert "will answer 400" not in started.stderr and "bound to" not in started.stderr


def test_a_background_start_says_on_the_terminal_what_it_will_refuse(home):
    h = home(providers=[], host="0.0.0.0")
    started = h.run("start")
    assert started.returncode == 0 and h.healthy()
    assert "ccproxy: warning: no provider configured: /v1/messages will answer 400 until one " \
        "is added" in started.stderr
    assert "ccproxy: warning: bound to 0.0.0.0 (every IPv4 address) without an apikey: only " \
        "loopback clients will be served" in started.stderr
    assert h.run("stop").returncode == 0


@pytest.mark.skipif(not ccproxy.malloc_trim_function(), reason="glibc's malloc_trim only")
def test_the_background_server_runs_on_the_c_allocator_unless_told_otherwise(home,
                                                                           monkeypatch):
    """With glibc, what a burst leaves free goes back page by page only from the C allocator
    (Python's keeps a 1 MB arena while any object in it lives)."""
    h = home()
    assert h.run("start").returncode == 0
    environment = Path("/proc/%d/environ" % h.record()["pid"]).read_bytes().split(b"\0")
    assert b"PYTHONMALLOC=malloc" in environment
    h.run("stop")
    monkeypatch.setenv("PYTHONMALLOC", "pymalloc")          # the user's own choice stands
    assert ccproxy.server_environment()["PYTHONMALLOC"] == "pymalloc"
    monkeypatch.delenv("PYTHONMALLOC")
    monkeypatch.setattr(ccproxy, "malloc_trim_function", lambda: False)
    assert "PYTHONMALLOC" not in ccproxy.server_environment()  # no trim: nothing to gain


def test_status_and_the_status_line_show_each_sessions_usage(home, upstream):
    upstream.script = lambda r: json_reply(dict(anthropic_message(), usage={
        "input_tokens": 100, "output_tokens": 2000, "cache_read_input_tokens": 900}))
    h = home(providers=[anthropic_provider(upstream, models=[{
        "name": "claude-sonnet-4-5", "price": {"input": 3, "output": 15, "cache_read": 0.3}}])])
    assert h.run("start").returncode == 0
    try:
        anthropic.Anthropic(base_url=h.url, api_key="c", max_retries=0).messages.create(
            model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-claude-code-session-id": "s-1"})
        shown = h.run("status").stdout
        words = "claude-sonnet-4-5 (anthropic) · 1.0k in (90% cached) · 2.0k out · $0.0306"
        assert "  anthropic,claude-sonnet-4-5: 1 answer, 1.0k in (90% cached)" in shown
        assert "  session s-1: " + words in shown
        line = h.run("status", "--statusline", input='{"session_id": "s-1"}')
        assert (line.returncode, line.stdout) == (
            0, "ccproxy: " + words + " · today 3.0k tokens $0.0306\n")
        setting = json.loads(h.run("env", "--statusline").stdout)["statusLine"]
        fast = subprocess.run(setting["command"], shell=True, capture_output=True,
                              input='{"session_id": "s-1"}', text=True, env=h.env(), timeout=30)
        assert fast.stdout == line.stdout              # what `code --statusline` installs
    finally:
        h.run("stop")


def test_status_shows_the_context_length_ollama_runs_a_model_with(home, upstream):
    upstream.script = lambda r: json_reply({"models": [{
        "name": "qwen3-coder:latest", "model": "qwen3-coder:latest", "context_length": 32768}]}
        if r["path"] == "/api/ps" else {"choices": [{"message": {"content": "ok"},
                                                     "finish_reason": "stop"}]})
    h = home(providers=[{"name": "ollama", "api_base_url": upstream.url + "/v1",
                         "models": ["qwen3-coder", "gemma4"]}])
    assert h.run("start").returncode == 0
    try:
        anthropic.Anthropic(base_url=h.url, api_key="c", max_retries=0).messages.create(
            model="qwen3-coder", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        shown = h.run("status").stdout
        assert re.search(r"  ollama +openai +enabled +circuit \w+ +qwen3-coder \(context "
                         r"32768\), gemma4\n", shown), shown
    finally:
        h.run("stop")


def test_status_says_why_it_cannot_show_providers(home):
    h = home(apikey="${PROXY_KEY}")
    assert h.run("start", PROXY_KEY="proxy-key-0123").returncode == 0
    try:
        status = h.run("status")                       # PROXY_KEY is not set in this shell
        assert status.returncode == 0
        assert "providers not shown: its config file does not load in this shell" in status.stdout
        assert "config file does not load in this shell: " in status.stdout
        assert "environment variable PROXY_KEY is not set" in status.stdout
        report = json.loads(h.run("status", "--json").stdout)
        assert report["providers"] == [] and "PROXY_KEY" in report["config_problem_here"]
        assert report["providers_problem"] == \
            "its config file does not load in this shell, so its key is unknown"
        shown = h.run("status", PROXY_KEY="proxy-key-0123").stdout
        assert "providers not shown" not in shown and re.search(r"anthropic +anthropic", shown)
    finally:
        h.run("stop")


def test_status_shows_a_keyless_proxy_whose_config_file_an_edit_broke(home):
    h = home()
    assert h.run("start").returncode == 0
    try:
        h.config.write_text(h.config.read_text() + "}")       # the running config stays
        shown = h.run("status").stdout
        assert "providers not shown" not in shown and re.search(r"anthropic +anthropic", shown)
        assert "config file does not load in this shell: " in shown
        report = json.loads(h.run("status", "--json").stdout)
        assert "not valid JSON" in report["config_problem_here"]
        # the proxy finds it too, at its next look: then it is the proxy's own word
        assert wait_until(lambda: "config_problem" in json.loads(
            h.run("status", "--json").stdout), 15, 0.5)
        shown = h.run("status").stdout
        assert re.search(r"  config file edited and not reloaded \(the proxy runs on the "
                         r"config it loaded before\): .*not valid JSON", shown), shown
        assert "does not load in this shell" not in shown
    finally:
        h.run("stop")


def test_a_wildcard_host_is_said_in_words_and_reached_on_loopback(home):
    """host "" binds every address of both families; its log line and URL had read
    "http://:PORT", a URL no client can use, and the warning "bound to  without"."""
    h = home(host="")
    assert h.run("start").returncode == 0
    try:
        port = json.loads((h.path / ".ccproxy" / "ccproxy.pid").read_text())["port"]
        assert urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=5).status == 200
        if ipv6_loopback_available():
            assert urllib.request.urlopen("http://[::1]:%d/health" % port, timeout=5).status == 200
    finally:
        h.run("stop")
    text = (h.path / ".ccproxy" / "ccproxy.log").read_text()
    assert 'listening on port %d of "" (every address, IPv4 and IPv6); on this machine ' \
        "http://127.0.0.1:%d " % (port, port) in text
    assert 'bound to "" (every address, IPv4 and IPv6) without an apikey' in text
    with ccproxy.serve_in_thread({}, host="0.0.0.0") as proxy:
        assert proxy.url == "http://127.0.0.1:%d" % proxy.app.listen_address[1]


def test_detached_proxy_logs_to_its_log_file(home):
    h = home(log=True)
    assert h.run("start").returncode == 0
    urllib.request.urlopen(h.url + "/health", timeout=5).read()
    h.run("stop")
    text = (h.path / ".ccproxy" / "ccproxy.log").read_text()
    assert "listening on %s" % h.url in text and "GET /health route=-" in text
    assert "sk-ant-upstream-secret" not in text


def test_starting_twice_says_it_is_running(home):
    h = home()
    assert h.run("start").returncode == 0
    pid = h.record()["pid"]
    again = h.run("start")
    assert again.returncode == 0
    assert "already running at %s (pid %d)" % (h.url, pid) in again.stdout
    assert h.record()["pid"] == pid
    foreground = h.run("start", "--foreground")
    assert foreground.returncode == 1 and "already running" in foreground.stdout
    h.run("stop")


def test_start_and_code_say_when_the_running_proxy_is_another_version(home, claude_stand_in,
                                                                       tmp_path):
    h = home()
    assert h.run("start").returncode == 0
    record = h.record()
    h.pidfile.write_text(json.dumps(dict(record, version="0.0.9")))    # as an older copy wrote
    said = "the proxy running at %s is version 0.0.9, this file is %s; `" % (
        h.url, ccproxy.__version__)
    started = h.run("start")
    assert started.returncode == 0 and said in started.stderr and "stop` ends it" in \
        started.stderr
    session = h.run("code", CLAUDE_PATH=str(claude_stand_in),
                    RECORD_FILE=str(tmp_path / "claude.jsonl"))
    assert session.returncode == 0 and said in session.stderr
    h.pidfile.write_text(json.dumps(record))
    again = h.run("start")
    assert again.returncode == 0 and "version" not in again.stderr
    assert h.run("stop").returncode == 0


def test_stale_pidfile_is_detected_and_replaced(home):
    h = home()
    sleeper = subprocess.Popen(["sleep", "30"])           # a live pid that is not ccproxy
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for pid in (dead.pid, sleeper.pid):
            h.pidfile.parent.mkdir(parents=True, exist_ok=True)
            h.pidfile.write_text(json.dumps({"pid": pid, "url": h.url}))
            status = h.run("status")
            assert status.returncode == 3 and not h.pidfile.exists()
        h.pidfile.write_text(json.dumps({"pid": sleeper.pid, "url": h.url}))
        assert h.run("start").returncode == 0
        assert h.record()["pid"] not in (sleeper.pid, dead.pid)
        h.run("stop")
    finally:
        sleeper.kill()


@pytest.mark.parametrize("content", [
    "", "[]", '{"pid": true, "url": "http://127.0.0.1:9"}', '{"pid": -1, "url": "http://x:1"}',
    '{"pid": 1, "url": 5}', '{"pid": 1, "url": "http://127.0.0.1:notaport"}',
    '{"pid": 1, "url": ["http://127.0.0.1:9"]}', '{"pid": 1, "url": "http://[::1"}',
    pytest.param("[" * 100000, id="nested too deeply")])
def test_a_pidfile_of_any_shape_reads_as_not_running(home, content):
    """A pidfile edited by hand or cut short, even one naming a live process (pid 1), is a
    proxy that is not running to every command that reads it."""
    h = home()
    h.pidfile.parent.mkdir(parents=True, exist_ok=True)
    for args, code, said in ((["status"], 3, "ccproxy is not running"),
                             (["stop"], 0, "ccproxy is not running"),
                             (["status", "--statusline"], 0, "ccproxy: down")):
        h.pidfile.write_text(content)
        result = h.run(*args, input="{}")
        h.pidfile.unlink(missing_ok=True)
        assert (result.returncode, result.stdout.strip(), result.stderr) == (code, said, "")


def test_port_in_use_is_a_clear_error(home):
    h = home()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", h.port))
        holder.listen()
        result = h.run("start")
    assert result.returncode == 1
    assert "port %d on 127.0.0.1 is already in use" % h.port in result.stderr
    assert "choose another with --port or the config's `port`" in result.stderr
    refused = ccproxy.listen_problem("127.0.0.1", 80, OSError(errno.EACCES, "Permission denied"))
    wrapped = OSError(-2, "cannot listen on ('x.invalid', 1): Name or service not known")
    wrapped.__cause__ = socket.gaierror(-2, "Name or service not known")   # as open_listeners
    assert ccproxy.listen_problem("x.invalid", 1, wrapped) == \
        "cannot listen on x.invalid:1: Name or service not known"          # not "Unknown error"
    assert refused == "port 80 on 127.0.0.1 is not this user's to take (ports under 1024 need " \
        "privileges on most systems): choose one from 1024 up with --port or the config's `port`"


def test_stop_lets_an_active_stream_finish_and_says_what_it_waits_for(home, upstream):
    h = home(performance={"shutdown_timeout": "20s"})
    reply = stream_reply(pause_before=3)
    upstream.script = lambda r: reply
    assert h.run("start").returncode == 0
    pid = h.record()["pid"]
    sock, received = open_stream(h.port)
    stopping = subprocess.Popen([sys.executable, SCRIPT, "stop"], stdout=subprocess.PIPE,
                                text=True, env=h.env())
    said = [stopping.stdout.readline(), stopping.stdout.readline()]   # before the stream ends
    assert said == ["ccproxy (pid %d): stopping; open requests may finish within 20 s "
                    "(performance.shutdown_timeout)\n" % pid,
                    "  still finishing open requests; 22 s before it is killed\n"]
    assert not ccproxy.accepts_connections(h.url)                   # draining: no new clients
    reply.release.set()
    received = read_to_end(sock, received)
    sock.close()
    assert stopping.communicate(timeout=30)[0].splitlines()[-1] == "ccproxy (pid %d) stopped" % pid
    assert b"event: message_stop" in received
    assert not h.pidfile.exists()


def test_a_second_ctrl_c_cuts_what_the_first_lets_finish(home, upstream):
    """A foreground proxy stopped with a stream in flight had waited out shutdown_timeout in
    silence, a second Ctrl-C doing nothing: the terminal looked hung for half a minute."""
    h = home(performance={"shutdown_timeout": "20s"})
    reply = stream_reply(pause_before=3)
    upstream.script = lambda r: reply
    assert h.run("start").returncode == 0
    pid, log_file = h.record()["pid"], h.path / ".ccproxy" / "ccproxy.log"
    sock, received = open_stream(h.port)
    os.kill(pid, signal.SIGINT)
    assert wait_until(lambda: "stopping: 1 open connection may finish within 20 s; stop again "
                      "(Ctrl-C) to cut them now" in log_file.read_text(), 10)
    assert ccproxy.process_alive(pid)                       # the first lets the stream go on
    os.kill(pid, signal.SIGINT)
    received = read_to_end(sock, received)
    sock.close()
    assert wait_until(lambda: not ccproxy.process_alive(pid), 10)
    assert received.rstrip().endswith(b'"message": "ccproxy is shutting down; the answer was '
                                      b'cut"}}') and b"message_stop" not in received
    assert "stopping now: what was still in flight is cut" in log_file.read_text()
    reply.release.set()


def test_a_proxy_that_does_not_answer_for_a_while_keeps_its_pidfile(home):
    """`status` had taken a proxy that did not answer /health within 2 s (stopped here; a loop
    held up would do) for a dead one and removed its pidfile: `stop` then said it was not
    running, and the proxy went on holding its port with nothing left to stop it."""
    h = home()
    assert h.run("start").returncode == 0
    pid = h.record()["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        status = h.run("status")
        started = h.run("start")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert status.returncode == 0 and "providers not shown: it does not answer /health (busy, " \
        "or its process stopped?)" in status.stdout
    assert started.returncode == 0 and "ccproxy is already running at %s (pid %d)" % (
        h.url, pid) in started.stdout and "ccproxy: the proxy running at %s (pid %d): it does " \
        "not answer /health (busy, or its process stopped?); `python3 %s stop` ends it" % (
            h.url, pid, SCRIPT) in started.stderr
    assert h.pidfile.exists()
    assert "ccproxy (pid %d) stopped" % pid in h.run("stop").stdout and not h.healthy()


def test_vendored_under_another_name_every_command_works(home, tmp_path):
    copy = tmp_path / "tools" / "llm_gateway.py"          # no "ccproxy" in its name or folder
    copy.parent.mkdir()
    shutil.copy(SCRIPT, copy)
    h = home()
    started = h.run("start", script=copy)
    assert started.returncode == 0, started.stderr
    assert h.run("status", script=copy).returncode == 0
    assert "ANTHROPIC_BASE_URL='%s'" % h.url in h.run("env", "--shell", "bash", script=copy).stdout
    assert "usage: python3 %s stop" % copy in h.run("stop", "--help", script=copy).stdout
    assert "stopped" in h.run("stop", script=copy).stdout and not h.healthy()


def test_a_background_start_that_fails_says_why_on_the_terminal(home):
    h = home()
    h.config.write_text(json.dumps({"port": h.port, "log_file": str(h.config / "ccproxy.log")}))
    result = h.run("start")              # the log file's folder is a file: the server cannot log
    assert result.returncode == 1
    assert result.stderr.startswith("ccproxy: config: %s\nccproxy: could not start: it exited "
                                    "with status 1\n  " % h.config)
    assert result.stderr.endswith("  ccproxy: cannot write the log file %s (log_file): File "
                                  "exists\n" % (h.config / "ccproxy.log"))


def test_status_stop_start_and_code_with_config_mind_which_file_the_proxy_runs(
        home, tmp_path, claude_stand_in):
    h = home()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"port": free_port()}))
    assert h.run("start").returncode == 0
    status = h.run("status", "--config", str(other))
    assert status.returncode == 3 and status.stdout.startswith(
        "ccproxy is not running with %s: the proxy running at %s" % (other, h.url))
    assert "config: %s" % h.config in h.run("status", "--config", str(h.config)).stdout
    start = h.run("start", "--config", str(other))
    assert start.returncode == 1 and "was started with %s, not %s; stop it first" % (
        h.config, other) in start.stderr
    claude = dict(CLAUDE_PATH=str(claude_stand_in), RECORD_FILE=str(tmp_path / "claude.jsonl"))
    session = h.run("code", "--config", str(other), **claude)     # not on another provider
    assert session.returncode == 1 and "was started with %s, not %s; stop it first" % (
        h.config, other) in session.stderr and "leave out --config" in session.stderr
    assert not (tmp_path / "claude.jsonl").exists()
    assert h.run("code", "--config", str(h.config), **claude).returncode == 0
    elsewhere = h.run("code", "--port", str(free_port()), **claude)
    assert elsewhere.returncode == 0 and "using the proxy running at %s; --port " % h.url in \
        elsewhere.stderr and records(tmp_path)[-1]["env"]["ANTHROPIC_BASE_URL"] == h.url
    assert "left running" in h.run("stop", "--config", str(other)).stdout and h.healthy()
    assert "stopped" in h.run("stop", "--config", str(h.config)).stdout and not h.healthy()


STAND_IN_CLAUDE = r"""#!{python}
import json, os, sys, time, urllib.request
record = {{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in (
    "ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN", "API_TIMEOUT_MS", "DISABLE_TELEMETRY",
    "DISABLE_COST_WARNINGS", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "NO_PROXY",
    "ANTHROPIC_API_KEY", "CLAUDE_CODE_USE_BEDROCK", "CLAUDE_CODE_SUBAGENT_MODEL",
    "CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY", "CLAUDE_CODE_AUTO_COMPACT_WINDOW")}}}}
with urllib.request.urlopen(os.environ["ANTHROPIC_BASE_URL"] + "/health") as response:
    record["health"] = response.status
if sys.argv[1:2] == ["--settings"] and os.path.isfile(sys.argv[2]):
    record["settings_mode"] = oct(os.stat(sys.argv[2]).st_mode & 0o777)
    with open(sys.argv[2]) as handle:
        record["settings"] = json.load(handle)
with open(os.environ["RECORD_FILE"], "a") as handle:
    handle.write(json.dumps(record) + "\n")
while os.path.exists(os.environ.get("HOLD_FILE", "/nonexistent")):
    time.sleep(0.05)
if os.environ.get("KILLED_BY"):
    os.kill(os.getpid(), int(os.environ["KILLED_BY"]))
sys.exit(int(os.environ.get("EXIT_CODE", "0")))
"""


@pytest.fixture
def claude_stand_in(tmp_path):
    path = tmp_path / "bin" / "claude"
    path.parent.mkdir()
    path.write_text(STAND_IN_CLAUDE.format(python=sys.executable))
    path.chmod(0o755)
    return path


def records(tmp_path):
    return [json.loads(line) for line in (tmp_path / "claude.jsonl").read_text().splitlines()]


def test_code_runs_claude_through_a_proxy_it_starts_and_stops(home, claude_stand_in, tmp_path):
    h = home(apikey="proxy-key")
    result = h.run("code", "-p", "fix the tests", "--model", "openai,gpt-4.1",
                   PATH=str(claude_stand_in.parent) + os.pathsep + os.environ["PATH"],
                   RECORD_FILE=str(tmp_path / "claude.jsonl"), EXIT_CODE="7",
                   ANTHROPIC_API_KEY="sk-ant-should-not-pass", CLAUDE_CODE_USE_BEDROCK="1",
                   NO_PROXY="corp.example")
    assert result.returncode == 7, result.stderr
    (seen,) = records(tmp_path)
    assert seen["argv"][0] == "--settings"
    assert seen["argv"][2:] == ["-p", "fix the tests", "--model", "openai,gpt-4.1"]
    assert seen["settings"] == {"env": dict(                        # over any settings file's
        {name: "" for name in ccproxy.CLAUDE_UNSET_VARIABLES},
        ANTHROPIC_BASE_URL=h.url, ANTHROPIC_AUTH_TOKEN="proxy-key")}
    assert seen["settings_mode"] == "0o600" and not os.path.exists(seen["argv"][1])
    assert "proxy-key" not in " ".join(seen["argv"])         # `ps` shows argv to every user
    assert seen["health"] == 200
    env = seen["env"]
    assert env["ANTHROPIC_BASE_URL"] == h.url and env["ANTHROPIC_AUTH_TOKEN"] == "proxy-key"
    assert int(env["API_TIMEOUT_MS"]) >= 600000
    assert env["DISABLE_TELEMETRY"] == env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    assert env["DISABLE_COST_WARNINGS"] == "1"
    assert env["NO_PROXY"].split(",")[:2] == ["corp.example", "127.0.0.1"]
    assert env["ANTHROPIC_API_KEY"] is None and env["CLAUDE_CODE_USE_BEDROCK"] is None
    assert not h.pidfile.exists() and not h.healthy()


def test_code_exits_as_a_shell_would_when_a_signal_ends_claude(home, claude_stand_in,
                                                               tmp_path):
    h = home()
    result = h.run("code", CLAUDE_PATH=str(claude_stand_in), KILLED_BY=str(int(signal.SIGTERM)),
                   RECORD_FILE=str(tmp_path / "claude.jsonl"))
    assert result.returncode == 128 + signal.SIGTERM, result.stderr       # 143, not 255


@pytest.mark.parametrize("providers, word", [([], "configured"), (
    [{"name": "openai", "api_key": "sk-0123456789abcdef", "enabled": False}], "enabled")])
def test_code_with_nowhere_to_send_requests_says_how_to_give_it_a_provider(
        home, claude_stand_in, tmp_path, providers, word):
    h = home(providers=providers)
    result = h.run("code", CLAUDE_PATH=str(claude_stand_in),
                   RECORD_FILE=str(tmp_path / "claude.jsonl"))
    assert result.returncode == 1 and not (tmp_path / "claude.jsonl").exists()
    assert "ccproxy: no provider is %s (config: %s), so Claude Code's requests would have " \
        "nowhere to go; write one into ~/.ccproxy/config.json, e.g.\n  {\"providers\"" % (
            word, h.config) in result.stderr and "start --check --probe" in result.stderr
    assert not h.healthy() and h.record() is None             # nothing was started
    assert '"providers": [{"name": "openai", "api_key": "${OPENAI_API_KEY}", "models": ' \
        '["gpt-6.2-sol"]}]' in (REPO / "README.md").read_text()   # the Quick start's, word for word


def test_code_in_a_home_it_cannot_write_says_so(home, claude_stand_in, tmp_path):
    h = home()
    (h.path / ".ccproxy").write_text("")            # where its folder should be: no folder
    result = h.run("code", CLAUDE_PATH=str(claude_stand_in),
                   RECORD_FILE=str(tmp_path / "claude.jsonl"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "ccproxy: cannot write %s%s" % (h.path / ".ccproxy" / "sessions", os.sep) in \
        result.stderr and "which must be writable" in result.stderr
    assert not (tmp_path / "claude.jsonl").exists()


def test_a_foreground_server_whose_home_cannot_be_written_serves_without_a_pidfile(home):
    h = home()
    (h.path / ".ccproxy").write_text("")            # where its folder should be: no folder
    server = subprocess.Popen([sys.executable, SCRIPT, "start", "--foreground"], env=h.env(),
                              stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(h.healthy, 20)             # not "cannot listen on …"
    finally:
        server.terminate()
        _, said = server.communicate(timeout=30)
    assert "cannot write the pidfile %s: " % h.pidfile in said and "serving without it" in said
    assert "cannot listen" not in said and server.returncode == 0


def test_code_passes_everything_after_double_dash(home, claude_stand_in, tmp_path):
    h = home()
    result = h.run("code", "--", "--help", "--port", "1", CLAUDE_PATH=str(claude_stand_in),
                   RECORD_FILE=str(tmp_path / "claude.jsonl"))
    assert result.returncode == 0, result.stderr
    assert records(tmp_path)[0]["argv"][2:] == ["--help", "--port", "1"]
    assert records(tmp_path)[0]["env"]["ANTHROPIC_AUTH_TOKEN"] == "ccproxy"


def test_code_without_claude_says_how_to_install_it(home, tmp_path):
    h = home()
    result = h.run("code", "-p", "x", PATH=str(tmp_path / "empty"))
    assert result.returncode == 127
    assert "npm install -g @anthropic-ai/claude-code" in result.stderr
    missing = h.run("code", CLAUDE_PATH=str(tmp_path / "nope"))
    assert missing.returncode == 127 and "CLAUDE_PATH" in missing.stderr
    assert not h.pidfile.exists()


def test_code_leaves_a_proxy_started_with_start_running(home, claude_stand_in, tmp_path):
    h = home()
    assert h.run("start").returncode == 0
    assert h.run("code", CLAUDE_PATH=str(claude_stand_in),
                 RECORD_FILE=str(tmp_path / "claude.jsonl")).returncode == 0
    assert h.healthy() and h.record()["started_by"] == "start"
    h.run("stop")


def test_sessions_share_one_proxy_that_stops_with_the_last(home, claude_stand_in, tmp_path):
    h = home()
    hold = tmp_path / "hold"
    hold.write_text("")
    common = dict(CLAUDE_PATH=str(claude_stand_in), RECORD_FILE=str(tmp_path / "claude.jsonl"))
    first = subprocess.Popen([sys.executable, SCRIPT, "code"],
                             env=h.env(HOLD_FILE=str(hold), **common))
    assert wait_until(lambda: (tmp_path / "claude.jsonl").exists(), 20)
    pid = h.record()["pid"]
    assert h.run("code", **common).returncode == 0          # a second session comes and goes
    assert h.healthy() and h.record()["pid"] == pid
    hold.unlink()
    assert first.wait(20) == 0
    assert wait_until(lambda: not h.pidfile.exists(), 10)


def test_stop_says_which_code_sessions_lose_the_proxy(home, claude_stand_in, tmp_path):
    h = home()
    hold = tmp_path / "hold"
    hold.write_text("")
    sessions = held_sessions(h, tmp_path, claude_stand_in, 2, hold)
    assert wait_until(lambda: (tmp_path / "claude.jsonl").exists() and
                      len(records(tmp_path)) == 2, 30)
    stopped = h.run("stop")
    assert "ccproxy: 2 Claude Code sessions of `code` use it: their requests fail until a " \
        "proxy runs at %s again" % h.url in stopped.stdout and "stopped" in stopped.stdout
    hold.unlink()
    for session in sessions:
        assert session.wait(30) == 0
    assert "Claude Code session" not in h.run("stop").stdout


def test_a_crashed_session_does_not_keep_the_proxy_alive(home, claude_stand_in, tmp_path):
    h = home()
    hold = tmp_path / "hold"
    hold.write_text("")
    session = subprocess.Popen([sys.executable, SCRIPT, "code"], start_new_session=True,
                               env=h.env(HOLD_FILE=str(hold), CLAUDE_PATH=str(claude_stand_in),
                                         RECORD_FILE=str(tmp_path / "claude.jsonl")))
    assert wait_until(lambda: (tmp_path / "claude.jsonl").exists(), 20)
    os.killpg(session.pid, signal.SIGKILL)                  # the session and its claude die
    session.wait()
    assert wait_until(lambda: not h.healthy(), 15)
    assert wait_until(lambda: not h.pidfile.exists(), 5)
    assert os.listdir(str(h.path / ".ccproxy" / "sessions")) == []   # its settings are gone


def held_sessions(h, tmp_path, claude_stand_in, count, hold):
    """count `code` sessions started at once, each holding until the hold file goes."""
    common = dict(CLAUDE_PATH=str(claude_stand_in), RECORD_FILE=str(tmp_path / "claude.jsonl"))
    return [subprocess.Popen([sys.executable, SCRIPT, "code"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=h.env(HOLD_FILE=str(hold), **common)) for _ in range(count)]


def test_sessions_that_begin_together_share_one_proxy(home, claude_stand_in, tmp_path):
    h = home()
    hold = tmp_path / "hold"
    hold.write_text("")
    sessions = held_sessions(h, tmp_path, claude_stand_in, 6, hold)
    assert wait_until(lambda: any(s.poll() is not None for s in sessions) or (
        (tmp_path / "claude.jsonl").exists() and len(records(tmp_path)) == 6), 60)
    assert [s.poll() for s in sessions] == [None] * 6     # none found the port taken
    assert {(r["env"]["ANTHROPIC_BASE_URL"], r["health"]) for r in records(tmp_path)} == {
        (h.url, 200)}
    hold.unlink()
    for session in sessions:
        _, errors = session.communicate(timeout=30)
        assert session.returncode == 0, errors
        assert "could not start" not in errors
    assert wait_until(lambda: not h.pidfile.exists(), 10) and not h.healthy()


def test_a_session_that_begins_as_the_proxy_stops_starts_its_own(home, claude_stand_in,
                                                                    tmp_path):
    h = home(performance={"drain_delay": 4})     # it answers /health 4 s into its stop
    hold = tmp_path / "hold"
    hold.write_text("")
    (first,) = held_sessions(h, tmp_path, claude_stand_in, 1, hold)
    assert wait_until(lambda: (tmp_path / "claude.jsonl").exists(), 20)
    old = h.record()["pid"]
    os.kill(first.pid, signal.SIGKILL)              # it dies: the proxy decides to stop
    first.wait()
    log = h.path / ".ccproxy" / "ccproxy.log"
    assert wait_until(lambda: "no Claude Code session left" in log.read_text(), 15)
    assert h.healthy()                              # still answering while it drains
    (second,) = held_sessions(h, tmp_path, claude_stand_in, 1, hold)
    assert wait_until(lambda: len(records(tmp_path)) == 2 or second.poll() is not None, 30)
    assert second.poll() is None and records(tmp_path)[1]["health"] == 200
    assert h.record()["pid"] != old and h.healthy()
    hold.unlink()
    _, errors = second.communicate(timeout=30)
    assert second.returncode == 0 and "waiting for another ccproxy to finish starting or " \
        "stopping" in errors
    assert wait_until(lambda: not h.pidfile.exists(), 10)


def test_the_start_lock_is_one_processs_at_a_time_and_never_stops_a_command(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    other = [sys.executable, "-c", "import sys; sys.path.insert(0, %r); import ccproxy; "
             "print(ccproxy.StartLock().acquire(0.2))" % str(REPO)]
    holder = ccproxy.StartLock()
    assert holder.acquire(0)
    assert subprocess.run(other, capture_output=True, text=True).stdout.strip() == "False"
    holder.release()
    assert subprocess.run(other, capture_output=True, text=True).stdout.strip() == "True"
    shutil.rmtree(str(tmp_path / ".ccproxy"))
    (tmp_path / ".ccproxy").write_text("")        # no lock can be kept: the command goes on
    assert ccproxy.StartLock().acquire(0)


def test_a_lease_whose_pid_another_program_has_now_is_not_a_session(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    other = subprocess.Popen(["sleep", "30"])           # a crashed session's pid, given anew
    session = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                                SCRIPT, "code"])         # what a session's command line holds
    try:
        assert wait_until(lambda: ccproxy.process_is_ccproxy(session.pid), 10)    # exec'd
        for process in (other, session):
            ccproxy.write_private_file(os.path.join(ccproxy.sessions_dir(), str(process.pid)), "")
        being_written = "%d.%d.tmp" % (session.pid, session.pid)     # another session's write
        (tmp_path / ".ccproxy" / "sessions" / being_written).write_text("{")
        assert ccproxy.live_sessions() == 1
        assert set(os.listdir(ccproxy.sessions_dir())) == {being_written, str(session.pid)}
    finally:
        for process in (other, session):
            process.kill()
            process.wait()


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_env_output_evaluates_in_each_shell(home, shell):
    if shutil.which(shell) is None:
        pytest.skip("%s is not installed here" % shell)
    h = home(apikey="it's-a-key")
    exported = h.run("env", "--shell", shell).stdout
    script = exported + '\necho $ANTHROPIC_BASE_URL; echo $ANTHROPIC_AUTH_TOKEN; ' \
                        'echo "[$ANTHROPIC_API_KEY]"'
    lines = subprocess.run([shell, "-c", script], capture_output=True, text=True, timeout=30,
                           env=dict(h.env(), ANTHROPIC_API_KEY="old")).stdout.splitlines()
    assert lines == [h.url, "it's-a-key", "[]"]


@pytest.mark.parametrize("shell, expected", [
    ("bash", "export ANTHROPIC_AUTH_TOKEN='a'\\''b'"),
    ("fish", "set -gx ANTHROPIC_AUTH_TOKEN 'a\\'b';"),
    ("powershell", "$env:ANTHROPIC_AUTH_TOKEN = 'a''b'"),
    ("cmd", 'set "ANTHROPIC_AUTH_TOKEN=a\'b"'),
])
def test_env_syntax_for_each_shell(home, shell, expected):
    h = home(apikey="a'b")
    output = h.run("env", "--shell", shell).stdout
    assert expected in output.splitlines()
    assert "ANTHROPIC_BASE_URL" in output and "API_TIMEOUT_MS" in output


@pytest.mark.parametrize("key", ['a"b & calc & "-0123', "abc%PATH%-0123", "abc!x!-0123"])
def test_env_for_cmd_refuses_a_value_cmd_would_change_or_run(home, key):
    """cmd ends set "K=..." at a quote (the rest runs as commands) and expands %NAME% (and
    !NAME!) inside it: such a key had been written as it is, wrong or worse."""
    h = home(apikey=key)
    result = h.run("env", "--shell", "cmd")
    assert result.returncode == 2 and "set " not in result.stdout
    assert "ccproxy: ANTHROPIC_AUTH_TOKEN holds a character cmd cannot set as it is written " \
        '(", % or !): use --shell powershell' in result.stderr
    assert key.replace("'", "''") in h.run("env", "--shell", "powershell").stdout


def test_env_warns_of_claude_settings_files_that_would_send_it_elsewhere(home):
    h = home()
    for folder in (h.path / ".claude", h.path / "project" / ".claude"):
        folder.mkdir(parents=True)
    (h.path / ".claude" / "settings.json").write_text(json.dumps({"env": {
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:1", "DISABLE_TELEMETRY": "1"}}))
    (h.path / "project" / ".claude" / "settings.local.json").write_text(json.dumps({"env": {
        "CLAUDE_CODE_USE_BEDROCK": "1", "ANTHROPIC_API_KEY": ""}}))
    result = subprocess.run([sys.executable, SCRIPT, "env"], capture_output=True, text=True,
                            env=h.env(), cwd=str(h.path / "project"), timeout=30)
    warnings = [line for line in result.stderr.splitlines() if "Claude Code applies" in line]
    assert warnings == [
        "ccproxy: warning: %s sets %s, which Claude Code applies over this environment: remove "
        "it there, or run Claude Code with `python3 %s code`, which overrides it" % (path, names,
                                                                                   SCRIPT)
        for path, names in ((os.path.join("~", ".claude", "settings.json"),
                             "ANTHROPIC_BASE_URL"),
                            (os.path.join(".claude", "settings.local.json"),
                             "CLAUDE_CODE_USE_BEDROCK"))]
    home_run = h.run("env")                     # in the home folder: one file, one warning
    assert home_run.stderr.count("sets ANTHROPIC_BASE_URL") == 1
    (h.path / "elsewhere").mkdir()
    (h.path / "elsewhere" / "settings.json").write_text(json.dumps({"env": {
        "ANTHROPIC_AUTH_TOKEN": "sk-mine"}}))
    moved = subprocess.run([sys.executable, SCRIPT, "env"], capture_output=True, text=True,
                           env=h.env(CLAUDE_CONFIG_DIR=str(h.path / "elsewhere")),
                           cwd=str(h.path / "project"), timeout=30)     # Claude Code's own
    assert "%s sets ANTHROPIC_AUTH_TOKEN" % (h.path / "elsewhere" / "settings.json") in \
        moved.stderr and "sets ANTHROPIC_BASE_URL" not in moved.stderr


def test_env_shell_defaults_to_shell_variable(home):
    h = home()
    assert "set -gx ANTHROPIC_BASE_URL" in h.run("env", SHELL="/usr/bin/fish").stdout
    assert "export ANTHROPIC_BASE_URL" in h.run("env", SHELL="/bin/zsh").stdout


def test_stop_cuts_what_outlasts_the_grace_period(home, upstream):
    h = home(performance={"shutdown_timeout": "1s"})
    upstream.script = lambda r: stream_reply(pause_before=3)        # never released
    assert h.run("start").returncode == 0
    sock, received = open_stream(h.port)
    started = time.monotonic()
    stopped = h.run("stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert time.monotonic() - started < 10
    received = read_to_end(sock, received)
    sock.close()
    assert b"message_stop" not in received and not h.pidfile.exists()
    assert received.rstrip().endswith(b'"message": "ccproxy is shutting down; the answer was cut"}}')


@pytest.mark.parametrize("shell", ["bash", "fish"])
def test_env_tells_claude_code_the_default_models_window_and_output_limit(home, upstream, shell):
    if shutil.which(shell) is None:
        pytest.skip("%s is not installed here" % shell)
    big = {"name": "deepseek", "type": "openai", "api_base_url": upstream.url, "api_key": "k",
           "models": [{"name": "v4", "context_window": 131072, "max_output_tokens": 8192}]}
    h = home(providers=[big])
    script = h.run("env", "--shell", shell).stdout + \
        "\necho $CLAUDE_CODE_AUTO_COMPACT_WINDOW; echo $CLAUDE_CODE_MAX_OUTPUT_TOKENS"
    lines = subprocess.run([shell, "-c", script], capture_output=True, text=True, timeout=30,
                           env=h.env()).stdout.splitlines()
    assert lines == ["131072", "8192"]


def test_env_leaves_a_small_window_to_the_proxy_and_the_users_own_setting_alone(home, upstream):
    small = {"name": "local", "type": "openai", "api_base_url": upstream.url,
             "models": [{"name": "qwen", "context_window": 32768, "max_output_tokens": 65536}]}
    h = home(providers=[small])
    output = h.run("env", "--shell", "bash").stdout
    assert "CLAUDE_CODE_AUTO_COMPACT_WINDOW" not in output    # Claude Code would read 100,000
    assert "CLAUDE_CODE_MAX_OUTPUT_TOKENS" not in output      # not below Claude Code's own ask
    big = dict(small, models=[{"name": "qwen", "context_window": 200000}])
    h = home(providers=[big])
    assert "export CLAUDE_CODE_AUTO_COMPACT_WINDOW='200000'" in h.run("env", "--shell", "bash").stdout
    mine = h.run("env", "--shell", "bash", CLAUDE_CODE_AUTO_COMPACT_WINDOW="150000").stdout
    assert "CLAUDE_CODE_AUTO_COMPACT_WINDOW" not in mine


# --- the recipes in contrib/: each one's command, run as its service manager would run it -----

CONTRIB = REPO / "contrib"


def run_recipe(argv, env, home, port):
    """Run a recipe's command with the file paths it names mapped here; once /health answers,
    SIGTERM it (as the service manager stops it); its exit status and stderr."""
    mapped = [sys.executable if arg in ("python3", "/usr/bin/python3") else
              SCRIPT if arg.endswith("ccproxy.py") else arg.replace("%h", str(home))
              for arg in argv]
    server = subprocess.Popen(mapped, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: server.poll() is not None or healthy(
            "http://127.0.0.1:%d" % port), 15)
        assert server.poll() is None, server.communicate()[1]
    finally:
        server.send_signal(signal.SIGTERM)
    return server.wait(15), server.communicate()[1]


def recipe_home(tmp_path, upstream):
    """A home with a config whose provider key is a ${VAR} reference."""
    (tmp_path / ".ccproxy").mkdir()
    config = tmp_path / ".ccproxy" / "config.json"
    config.write_text(json.dumps({"providers": [
        dict(anthropic_provider(upstream), api_key="${UPSTREAM_KEY}")]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_")}
    return config, dict(env, HOME=str(tmp_path))


def test_the_container_recipe_runs_unprivileged_needs_an_apikey_and_its_healthcheck_passes(
        tmp_path, upstream):
    text = (CONTRIB / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim$", text, re.M)
    assert re.search(r"^USER ccproxy$", text, re.M) and "ENV CCPROXY_HOST=0.0.0.0" in text
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.*)$", text, re.M).group(1))
    healthcheck = json.loads(re.search(r"^  CMD (\[.*\])$", text, re.M).group(1))
    config, env = recipe_home(tmp_path, upstream)
    port = free_port()
    env.update(CCPROXY_HOST="0.0.0.0", CCPROXY_PORT=str(port), UPSTREAM_KEY="sk-up-0123456789")
    script = entrypoint[:2] + [entrypoint[2].replace("/opt/ccproxy/ccproxy.py", SCRIPT)] + \
        entrypoint[3:] + ["--config", str(config)]
    refused = subprocess.run(script, env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and "set CCPROXY_API_KEY" in refused.stderr
    env["CCPROXY_API_KEY"] = "proxy-key-0123456789"
    server = subprocess.Popen(script, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: subprocess.run(healthcheck, env=env).returncode == 0, 15)
    finally:
        server.send_signal(signal.SIGTERM)
    assert server.wait(15) == 0


def test_the_systemd_unit_starts_with_its_environment_file(tmp_path, upstream):
    unit = (CONTRIB / "ccproxy.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1).split()
    assert re.search(r"^EnvironmentFile=%h/\.config/ccproxy/env$", unit, re.M)
    config, env = recipe_home(tmp_path, upstream)
    port = free_port()
    config.write_text(config.read_text()[:-1] + ', "port": %d}' % port)
    env.update(UPSTREAM_KEY="sk-up-0123456789")          # as systemd reads it from the file
    status, stderr = run_recipe(exec_start, env, tmp_path, port)
    assert status == 0 and "listening on http://127.0.0.1:%d" % port in stderr


def test_the_launchd_agent_starts_with_its_environment_variables(tmp_path, upstream):
    import plistlib
    agent = plistlib.loads((CONTRIB / "dev.ccproxy.plist").read_bytes())
    config, env = recipe_home(tmp_path, upstream)
    port = free_port()
    config.write_text(config.read_text()[:-1] + ', "port": %d}' % port)
    argv = [arg.replace("/Users/YOU/.ccproxy/config.json", str(config))
            for arg in agent["ProgramArguments"]]
    env.update(agent["EnvironmentVariables"], UPSTREAM_KEY="sk-up-0123456789")
    assert list(agent["EnvironmentVariables"]) == ["OPENAI_API_KEY"]
    status, stderr = run_recipe(argv, env, tmp_path, port)
    assert status == 0 and "listening on http://127.0.0.1:%d" % port in stderr


def test_code_can_add_the_status_line_and_a_subagent_model_for_the_session(
        home, claude_stand_in, tmp_path):
    h = home()
    result = h.run("code", "--statusline", "--subagent-model", "openai,gpt-5-mini", "-p", "hi",
                   CLAUDE_PATH=str(claude_stand_in), RECORD_FILE=str(tmp_path / "claude.jsonl"))
    assert result.returncode == 0, result.stderr
    (seen,) = records(tmp_path)
    assert seen["argv"][0] == "--settings" and seen["argv"][2:] == ["-p", "hi"]
    settings = seen["settings"]
    assert settings["env"]["CLAUDE_CODE_SUBAGENT_MODEL"] == "openai,gpt-5-mini"
    command = settings["statusLine"]["command"]
    assert " -I -S -c " in command and command.endswith(" " + shlex.quote(str(h.pidfile)))
    line = subprocess.run(command, shell=True, input='{"session_id": "s"}', capture_output=True,
                          text=True, env=h.env(), timeout=30)
    assert line.stdout == "ccproxy: down\n"              # the session's proxy has stopped
    assert seen["env"]["CLAUDE_CODE_SUBAGENT_MODEL"] == "openai,gpt-5-mini"
    assert seen["env"]["CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY"] == "1"
    assert not (tmp_path / "home" / ".claude").exists()       # no settings file was written


@pytest.mark.parametrize("context, window, warned", [(131072, "131072", False),
                                                     (4096, None, True)])
def test_code_learns_the_context_ollama_runs_the_default_model_with(home, claude_stand_in,
                                                                    tmp_path, upstream, context,
                                                                    window, warned):
    """Before Claude Code starts on an Ollama model, Ollama loads it and says its context
    length: Claude Code is told a window of 100,000 or more, and the user is warned of one too
    small for Claude Code's own prompt."""
    upstream.script = lambda r: json_reply({"models": [
        {"name": "qwen3-coder:latest", "context_length": context}]} if r["path"] == "/api/ps"
        else {"done": True})
    h = home(providers=[{"name": "ollama", "api_base_url": upstream.url + "/v1",
                         "models": ["qwen3-coder"]}])
    result = h.run("code", "-p", "hi", CLAUDE_PATH=str(claude_stand_in),
                   RECORD_FILE=str(tmp_path / "claude.jsonl"))
    assert result.returncode == 0, result.stderr
    assert records(tmp_path)[-1]["env"]["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] == window
    assert [r["json"] for r in upstream.requests if r["path"] == "/api/generate"] == [
        {"model": "qwen3-coder"}]
    assert ("ccproxy: warning: ollama runs qwen3-coder with a 4096-token context: too small for "
            "Claude Code, whose own prompt is 12-19k tokens; Ollama advises 64k or more: set "
            "OLLAMA_CONTEXT_LENGTH=65536" in result.stderr) is warned


def test_code_merges_the_users_own_settings_flag_with_its_own(home, claude_stand_in, tmp_path):
    h = home()
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"model": "opus", "env": {"MY_FLAG": "1",
                                                         "ANTHROPIC_BASE_URL": "http://x"}}))
    claude = dict(CLAUDE_PATH=str(claude_stand_in), RECORD_FILE=str(tmp_path / "claude.jsonl"))
    for given in (["--settings", str(mine)], ["--settings=" + mine.read_text()]):
        assert h.run("code", "--statusline", *given, "-p", "hi", **claude).returncode == 0
        argv = records(tmp_path)[-1]["argv"]
        assert argv[0] == "--settings" and argv[2:] == ["-p", "hi"]    # one: claude reads one
        settings = records(tmp_path)[-1]["settings"]
        assert settings["model"] == "opus" and settings["env"]["MY_FLAG"] == "1"
        assert settings["env"]["ANTHROPIC_BASE_URL"] == h.url and "statusLine" in settings
    unreadable = h.run("code", "--settings", str(tmp_path / "nowhere.json"), "-p", "hi", **claude)
    assert records(tmp_path)[-1]["argv"] == ["--settings", str(tmp_path / "nowhere.json"), "-p",
                                             "hi"] and unreadable.returncode == 0  # claude says


MANAGED_RUNNER = """import sys
sys.path.insert(0, {repo!r})
import ccproxy
ccproxy.CLAUDE_MANAGED_FOLDER = {folder!r}     # /etc/claude-code, which a test must not write
sys.exit(ccproxy.main())
"""


def test_code_refuses_a_session_claudes_managed_settings_would_send_elsewhere(
        home, claude_stand_in, tmp_path):
    """Measured with 2.1.197 and 2.1.332: the env of /etc/claude-code/managed-settings.json or
    managed-settings.d/*.json outranks --settings, so `code` cannot make such a session use
    the proxy: it says why and runs nothing."""
    h = home(apikey="proxy-key")
    folder = tmp_path / "managed"
    (folder / "managed-settings.d").mkdir(parents=True)
    runner = tmp_path / "runner.py"
    runner.write_text(MANAGED_RUNNER.format(repo=str(REPO), folder=str(folder)))
    claude = dict(CLAUDE_PATH=str(claude_stand_in), RECORD_FILE=str(tmp_path / "claude.jsonl"))
    drop_in = folder / "managed-settings.d" / "50-gateway.json"

    def managed(env, path=folder / "managed-settings.json"):
        path.write_text(json.dumps({"env": env, "permissions": {}}))

    managed({"ANTHROPIC_BASE_URL": h.url + "/", "ANTHROPIC_API_KEY": "sk-ant-theirs",
             "CLAUDE_CODE_USE_BEDROCK": "0", "ANTHROPIC_AUTH_TOKEN": "proxy-key"})  # all harmless
    (folder / "managed-settings.d" / "notes.txt").write_text("CLAUDE_CODE_USE_VERTEX=1")
    assert h.run("code", "-p", "hi", script=runner, **claude).returncode == 0
    assert len(records(tmp_path)) == 1 and h.record() is None          # its proxy stopped
    managed({"ANTHROPIC_BASE_URL": "https://gateway.corp.example"}, drop_in)
    managed({"CLAUDE_CODE_USE_VERTEX": " True ", "ANTHROPIC_AUTH_TOKEN": "sk-corp"})
    refused = h.run("code", "-p", "hi", script=runner, **claude)
    assert refused.returncode == 1 and len(records(tmp_path)) == 1     # claude was not run
    assert h.record() is None                                          # nor a proxy started
    assert [line for line in refused.stderr.splitlines() if "managed" in line] == [
        "ccproxy: %s, Claude Code's managed settings, sets %s: an administrator's settings "
        "outrank the environment and every other settings file, so Claude Code would not use "
        "this proxy at %s, or would be refused by it; ask whoever manages this machine" % (
            path, names, h.url) for path, names in (
                (folder / "managed-settings.json",
                 "CLAUDE_CODE_USE_VERTEX, ANTHROPIC_AUTH_TOKEN"),
                (drop_in, "ANTHROPIC_BASE_URL"))]
    warned = h.run("env", script=runner)
    assert warned.returncode == 0 and "export ANTHROPIC_BASE_URL" in warned.stdout
    assert warned.stderr.count("Claude Code's managed settings") == 2 and str(drop_in) in \
        warned.stderr and "ccproxy: warning: %s" % drop_in in warned.stderr
    assert h.run("start").returncode == 0               # a running proxy's own key is asked
    managed({"ANTHROPIC_AUTH_TOKEN": "sk-corp"})
    drop_in.unlink()
    assert "sets ANTHROPIC_AUTH_TOKEN" in h.run("code", "-p", "hi", script=runner,
                                                **claude).stderr


def test_the_kubernetes_example_passes_the_schema_and_drains_within_its_grace():
    """contrib/kubernetes.yaml, checked offline against Kubernetes' own schemas
    (kubernetes-validate), and its config read as ccproxy reads it."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    import yaml
    documents = [d for d in yaml.safe_load_all((CONTRIB / "kubernetes.yaml").read_text()) if d]
    for document in documents:
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)
    kinds = {d["kind"]: d for d in documents}
    assert sorted(kinds) == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Secret",
                             "Service"]
    secret = kinds["Secret"]["stringData"]
    config = ccproxy.build_config(json.loads(kinds["ConfigMap"]["data"]["config.json"]),
                                  "kubernetes.yaml", dict(secret))
    assert config.read_only and config.host == "0.0.0.0" and config.apikey
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config.drain_delay + config.shutdown_timeout
    probes = pod["containers"][0]
    assert probes["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/health"
    assert config.drain_delay > probes["readinessProbe"]["periodSeconds"] * probes[
        "readinessProbe"]["failureThreshold"]
