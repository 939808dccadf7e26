"""Three ccproxy replicas behind a real nginx (Debian's package) with contrib/nginx.conf:
sessions keep to one replica, and a rolling restart under 200 concurrent streams loses none."""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from helpers import REPO
from bench_proxy import free_port

STREAM_TEXT = "Hi mock.chunks=30 mock.chars=4 mock.delay_ms=100"     # a 3-second stream
QUICK_TEXT = "Hi mock.chunks=2 mock.chars=4 mock.delay_ms=0"


def wait_for(url: str, seconds: float = 20, process=None, log=None) -> None:
    """Until url answers 200; a process that ended meanwhile fails at once, with its log."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            if process is not None and process.poll() is not None:
                break
            time.sleep(0.05)
    said = log.read_text()[-2000:] if log is not None and log.exists() else ""
    ended = "" if process is None or process.poll() is None else (
        " (it ended with status %s)" % process.returncode)
    raise AssertionError("no answer from %s within %g s%s %s" % (url, seconds, ended, said))


class Replica:
    """One `ccproxy.py start --foreground`, its provider named after it (so every answer's
    x-ccproxy-provider says which replica gave it)."""

    def __init__(self, folder, number: int, mock_url: str):
        self.name, self.port = "replica%d" % number, free_port()
        self.home = folder / self.name
        self.home.mkdir()
        self.config = self.home / "config.json"
        self.config.write_text(json.dumps({"port": self.port, "providers": [
            {"name": self.name, "type": "openai", "api_base_url": mock_url + "/v1",
             "api_key": "sk-replica-0123456789", "models": ["mock-model"]}],
            "routes": {"default": "%s,mock-model" % self.name},
            "performance": {"drain_delay": "1s", "shutdown_timeout": "30s"}}))
        self.process = None

    def start(self) -> None:
        log = self.home / "stderr.log"
        with log.open("ab") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(REPO / "ccproxy.py"), "start", "--foreground", "--config",
                 str(self.config)], env=dict(os.environ, HOME=str(self.home)), stderr=stderr)
        wait_for("http://127.0.0.1:%d/ready" % self.port, process=self.process, log=log)

    def restart(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)
        self.start()


def nginx_config(folder, replicas, port: int) -> str:
    """contrib/nginx.conf inside the few lines a stand-alone nginx needs, on free ports.
    Every port is swapped in one pass: a free port may itself contain "3461"."""
    ports = {"3456": port}
    ports.update(("346%d" % number, replica.port) for number, replica in enumerate(replicas, 1))
    example = re.sub(r"(?<=127\.0\.0\.1:)\d+", lambda found: str(ports[found.group()]),
                     (REPO / "contrib" / "nginx.conf").read_text())
    path = folder / "nginx.conf"
    path.write_text("""daemon off; user root; worker_processes 1; pid %s/nginx.pid;
error_log %s/error.log;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path %s; proxy_temp_path %s;
%s
}
""" % (folder, folder, folder, folder, example))
    return str(path)


@pytest.fixture
def cluster(tmp_path):
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                      else None)
    if nginx is None:
        pytest.skip("no nginx here (Debian: apt-get install nginx)")
    mock_port = free_port()
    mock = subprocess.Popen([sys.executable, str(REPO / "tests" / "bench" / "mock_openai.py"),
                             "--port", str(mock_port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    replicas = [Replica(tmp_path, n, "http://127.0.0.1:%d" % mock_port) for n in (1, 2, 3)]
    balancer = None
    try:
        wait_for("http://127.0.0.1:%d/health" % mock_port)
        for replica in replicas:
            replica.start()
        port = free_port()
        config = nginx_config(tmp_path, replicas, port)
        checked = subprocess.run([nginx, "-t", "-c", config, "-p", str(tmp_path)],
                                 capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr            # the example is valid
        balancer = subprocess.Popen([nginx, "-c", config, "-p", str(tmp_path)],
                                    stderr=subprocess.DEVNULL)
        wait_for("http://127.0.0.1:%d/health" % port)
        yield port, replicas
    finally:
        for process in [balancer, mock] + [r.process for r in replicas]:
            if process is not None and process.poll() is None:
                ended(process)


def ended(process) -> None:
    """Stop a process: SIGTERM first (nginx's master takes its workers along), then SIGKILL."""
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def one_turn(port: int, session: str, text: str = STREAM_TEXT) -> tuple:
    """(the replica that answered, "complete" | "error event" | "cut") of a streamed turn."""
    body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 200, "stream": True,
                       "messages": [{"role": "user", "content": text}]})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", "/v1/messages", body, {
            "content-type": "application/json", "x-claude-code-session-id": session})
        answer = connection.getresponse()
        data = answer.read()
    except (OSError, http.client.HTTPException):
        return None, "cut"
    finally:
        connection.close()
    replica = answer.getheader("x-ccproxy-provider")
    if answer.status != 200 or b"event: error" in data:
        return replica, "error event"
    return replica, "complete" if data.rstrip().endswith(b'"message_stop"}') else "cut"


def test_each_session_keeps_to_one_replica(cluster):
    port, _ = cluster
    sessions = ["session-%02d" % n for n in range(20)]
    seen = {session: {one_turn(port, session, QUICK_TEXT)[0] for _ in range(3)}
            for session in sessions}
    assert all(len(replicas) == 1 for replicas in seen.values()), seen
    assert len(set().union(*seen.values())) > 1            # and sessions spread over replicas


def test_a_rolling_restart_under_200_streams_loses_none(cluster):
    port, replicas = cluster
    outcomes, lock, restarted = [], threading.Lock(), threading.Event()

    def client(number: int) -> None:
        while not restarted.is_set():            # turn after turn until every copy restarted
            replica, outcome = one_turn(port, "session-%02d" % (number % 20))
            with lock:
                outcomes.append((number % 20, replica, outcome))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(200)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    for replica in replicas:                                 # one at a time, under load
        replica.restart()
    restarted.set()
    for thread in threads:
        thread.join(120)
    counts = {kind: sum(1 for _, _, outcome in outcomes if outcome == kind)
              for kind in ("complete", "error event", "cut")}
    moved = sum(1 for session in range(20)            # its copy restarted: it went elsewhere
                if len({replica for s, replica, _ in outcomes if s == session}) > 1)
    print("rolling restart: %d streams, %s, %d of 20 sessions moved" % (
        len(outcomes), counts, moved))
    assert not any(thread.is_alive() for thread in threads) and len(outcomes) >= 400
    assert counts["cut"] == 0 and counts["error event"] == 0, counts
